"""Save the student in Hugging Face format (``save_pretrained`` plus tokenizer) next to each Lightning
checkpoint and at the end of training, so a result loads anywhere with ``from_pretrained``.

Under sharded strategies the student's weights live in pieces across the ranks, so the export is collective:
every rank takes part in gathering the full weights (FSDP: a full state dict, offloaded to rank 0's CPU;
DeepSpeed ZeRO-3: the partitions gathered around the state dict), and rank 0 writes them. A rank-0-only
``save_pretrained`` would write a shard (ZeRO-3: empty tensors) or, under FSDP, wait forever for the other
ranks' part of the gather. Single-process and DDP runs write the module's own weights, as before.

Costs under sharding: FSDP2 (``trainer=fsdp2``) gathers the student alone, tensor by tensor, into rank 0's CPU
memory; FSDP1 gathers the whole LightningModule, the frozen teacher included (only the student is kept); ZeRO-3
gathers the whole student on every rank at once. Keep ``on_checkpoint`` off for large models.
``DistillationModule`` refuses FSDP1 and ZeRO-3 (``check_strategy``); their gathers are tested on their own (a real
FullyShardedDataParallel in one CPU process, and a ZeRO-3 gather mocked), FSDP2's through ``trainer=fsdp2_cpu``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lightning import Callback


def student_state_dict(trainer, pl_module) -> dict | None:
    """The student's full state dict on global rank 0 (None elsewhere). Collective: every rank must call it."""
    strategy = trainer.strategy
    if getattr(strategy, "zero_stage_3", False):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(pl_module.student.parameters()), modifier_rank=None):
            if not trainer.is_global_zero:
                return None
            return _tie({k: v.detach().cpu().clone() for k, v in pl_module.student.state_dict().items()},
                        pl_module.student)
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    gather = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 receives, the others get {}
    if isinstance(strategy, ModelParallelStrategy):  # FSDP2: the student's shards only, never the teacher's
        full = get_model_state_dict(pl_module.student, options=gather)
        return _tie(dict(full), pl_module.student) if trainer.is_global_zero else None
    if isinstance(strategy, FSDPStrategy):  # full, whatever state_dict_type the checkpoints use
        full = get_model_state_dict(strategy.model, options=gather)
    else:
        full = pl_module.state_dict()
    if not trainer.is_global_zero:
        return None
    return _tie({k[len("student."):]: v for k, v in full.items() if k.startswith("student.")}, pl_module.student)


def _tie(state_dict: dict, model) -> dict:
    """Tied weights (embeddings and head) as one tensor again, as in the model's own state dict: a gathered
    state dict holds separate copies, which ``save_pretrained`` would write twice."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in state_dict and source in state_dict:
            state_dict[target] = state_dict[source]
    return state_dict


class HFExport(Callback):
    """
    Args:
        dirpath: where exports go; default ``<checkpoint dir>/hf``.
        on_checkpoint: also export at every Lightning checkpoint (``step_<N>``), not only at the end.
    """

    def __init__(self, dirpath: str | None = None, on_checkpoint: bool = False):
        self.dirpath, self.on_checkpoint = dirpath, on_checkpoint
        self._exported_step = None  # top-k and "last" checkpoints of one step export once

    def _root(self, trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        base = ckpt.dirpath if ckpt is not None and ckpt.dirpath else trainer.default_root_dir
        return Path(base) / "hf"

    def export(self, trainer, pl_module, name: str) -> Path | None:
        """Collective (see the module docstring); rank 0 writes ``<root>/<name>`` and returns it."""
        state_dict = student_state_dict(trainer, pl_module)
        out = None
        if trainer.is_global_zero:
            out = self._root(trainer) / name
            out.parent.mkdir(parents=True, exist_ok=True)
            # written beside it, then renamed into place: an interrupted export never leaves a half-written folder
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
            pl_module.student.save_pretrained(tmp, state_dict=state_dict)
            processor = getattr(pl_module, "processor", None) or pl_module.tokenizer
            processor.save_pretrained(tmp)  # a vision-language processor saves its tokenizer with it
            if out.exists():  # an earlier export of this name (a resumed run's final): replaced whole
                aside = out.parent / f".old-{name}-{os.getpid()}"
                os.rename(out, aside)
                os.rename(tmp, out)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(tmp, out)
        trainer.strategy.barrier("hf_export")  # no rank reads the folder before rank 0 has written it
        return out

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.on_checkpoint and trainer.global_step != self._exported_step:  # the same on every rank
            self._exported_step = trainer.global_step
            self.export(trainer, pl_module, f"step_{trainer.global_step}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module, "final")
