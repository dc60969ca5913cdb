"""How far the student is from the teacher, measured the same way at every validation: the exact per-token KL
over the full vocabulary on fixed held-out traces.

The traces are the teacher's samples (at the rollout temperature) of the first ``n_prompts`` validation prompts,
drawn once at the first validation and kept (in checkpoints too), so every evaluation of a run, and every run of a
seed, measures on the same tokens. On each response token both models' full distributions at the sampling temperature (banned ids
renormalised away, ``Scorer.vocab_logp``) give

    val/diag/reverse_kl = KL(student || teacher)    what on-policy distillation minimises, sampled
    val/diag/forward_kl = KL(teacher || student)    what SFT on teacher samples minimises, sampled

averaged over the traces' response tokens.

    python src/train.py ... +callbacks.diagnostics._target_=src.callbacks.diagnostics.HeldOutKL
"""

from __future__ import annotations

import dataclasses

import torch
from lightning.pytorch.callbacks import Callback

from src.modules.diagnostics import exact_kls
from src.modules.rollout.batch import Rollout

TRACES_STREAM = 1_000_003  # the sampling stream of the traces: apart from every evaluation batch's


def first_rows(loader, n: int, pad_id: int, teacher_pad_id: int | None = None,
               who: str = "callbacks.diagnostics") -> dict:
    """The first ``n`` prompts of ``loader``'s batches as one left-padded batch (text prompts), with the teacher's own
    prompts where the batches carry them (``teacher_input_ids``: padded with ``teacher_pad_id``, else ``pad_id``).
    ``who`` names the caller in errors."""
    parts, have = [], 0
    for batch in loader:
        if batch.get("model_kwargs"):
            raise ValueError(f"{who}: text prompts only (this split's batches carry images)")
        parts.append(batch)
        have += len(batch["input_ids"])
        if have >= n:
            break
    if not parts:
        raise ValueError(f"{who}: the validation split is empty")

    def left_padded(key, value):
        width = max(p[key].shape[1] for p in parts)
        return torch.cat([torch.nn.functional.pad(p[key], (width - p[key].shape[1], 0), value=value)
                          for p in parts])[:n]

    out = {"input_ids": left_padded("input_ids", pad_id), "attention_mask": left_padded("attention_mask", 0),
           "references": [r for p in parts for r in p["references"]][:n]}
    if "teacher_input_ids" in parts[0]:
        out["teacher_input_ids"] = left_padded("teacher_input_ids", pad_id if teacher_pad_id is None else teacher_pad_id)
        out["teacher_attention_mask"] = left_padded("teacher_attention_mask", 0)
    return out


class HeldOutKL(Callback):
    """Logs ``val/diag/reverse_kl`` and ``val/diag/forward_kl`` after every validation (see the module's text).

    Args:
        n_prompts: held-out validation prompts whose teacher samples are the traces.
    """

    def __init__(self, n_prompts: int = 64):
        if n_prompts < 1:
            raise ValueError(f"callbacks.diagnostics.n_prompts must be >= 1, got {n_prompts}")
        self.n_prompts = n_prompts
        self.traces = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if pl_module.teacher_spec is None or not pl_module.objective.needs_teacher:  # loaded in configure_model
            raise ValueError("callbacks.diagnostics: the KL to the teacher needs a teacher (this run has none)")
        if pl_module.teacher_reads_its_own_input:
            raise ValueError("callbacks.diagnostics compares full distributions over one vocabulary and prompt: not "
                             "with model.teacher=self or a cross-vocabulary teacher")
        if pl_module._fsdp2() is not None or pl_module._deepspeed():
            raise ValueError("callbacks.diagnostics reads hidden states outside a forward, which a sharded model "
                             "does not allow: use it with an unsharded strategy (the miniature, DDP)")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        was_training = pl_module.student.training
        if self.traces is None:
            batch = first_rows(trainer.val_dataloaders, self.n_prompts, pl_module.tokenizer.pad_token_id)
            batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            self.traces = pl_module.sampler(pl_module.teacher, batch, eval_batch=TRACES_STREAM)
        pl_module.student.eval()
        try:
            reverse, forward = exact_kls(pl_module.scorer, self.traces)
        finally:
            pl_module.student.train(was_training)
        pl_module.log_dict({"val/diag/reverse_kl": reverse, "val/diag/forward_kl": forward}, sync_dist=True)

    def state_dict(self) -> dict:  # a resumed run measures on the same traces
        return {"traces": None if self.traces is None else dataclasses.asdict(self.traces)}

    def load_state_dict(self, state: dict) -> None:
        self.traces = None if state.get("traces") is None else Rollout(**state["traces"])
