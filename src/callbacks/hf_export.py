"""Save the student in Hugging Face format (``save_pretrained`` plus tokenizer) next to each Lightning
checkpoint and at the end of training, so a result loads anywhere with ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback
from lightning.pytorch.utilities import rank_zero_only


class HFExport(Callback):
    """
    Args:
        dirpath: where exports go; default ``<checkpoint dir>/hf``.
        on_checkpoint: also export at every Lightning checkpoint (``step_<N>``), not only at the end.
    """

    def __init__(self, dirpath: str | None = None, on_checkpoint: bool = False):
        self.dirpath, self.on_checkpoint = dirpath, on_checkpoint

    def _root(self, trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        base = ckpt.dirpath if ckpt is not None and ckpt.dirpath else trainer.default_root_dir
        return Path(base) / "hf"

    @rank_zero_only
    def export(self, trainer, pl_module, name: str) -> Path:
        out = self._root(trainer) / name
        out.mkdir(parents=True, exist_ok=True)
        pl_module.student.save_pretrained(out)
        processor = getattr(pl_module, "processor", None) or pl_module.tokenizer
        processor.save_pretrained(out)  # a vision-language processor saves its tokenizer with it
        return out

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.on_checkpoint:
            self.export(trainer, pl_module, f"step_{trainer.global_step}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module, "final")
