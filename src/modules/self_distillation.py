"""Self-distillation: the student's own weights are the teacher, reading privileged context the student does not.

``model.teacher=self`` with ``data.teacher_context`` (a template over the row, e.g. ``"Reference answer: {answer}"``,
appended to the teacher's copy of the prompt: ``PromptDataModule.teacher_messages``). The teacher scores the very
tokens the student sampled, after its own prompt (``Rollout.teacher_view``), so the reward ``log pi_t - log pi_s``,
the clip, the selection and the phases apply unchanged: a token is rewarded where knowing the answer makes the
model likelier to write it. Which weights score (``module.self_teacher.weights``):

- ``current``: the student's weights at each step, under ``no_grad`` and in eval mode (the teacher moves with the
  student; with no context the reward is 0 up to rounding);
- ``frozen``: a copy of the student as loaded, before step 0;
- ``ema``: a copy moved after every optimiser step, ``w_t <- d w_t + (1 - d) w_s`` (``ema_decay`` d), kept in
  checkpoints so a resumed run continues the same average.

Unsharded strategies only (the copy and the shared weights are not planned for FSDP2 or DeepSpeed).
"""

from __future__ import annotations

import copy

import torch

WEIGHTS = ("current", "frozen", "ema")


class SelfTeacher:
    """The teacher spec of ``model.teacher=self`` (module docstring)."""

    key = "model.teacher"
    cross_vocab = False

    def __init__(self, weights: str = "current", ema_decay: float = 0.99):
        if weights not in WEIGHTS:
            raise ValueError(f"module.self_teacher.weights must be one of {WEIGHTS}, got {weights!r}")
        if not isinstance(ema_decay, (int, float)) or not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"module.self_teacher.ema_decay must be in [0, 1), got {ema_decay!r}")
        self.weights, self.ema_decay = weights, float(ema_decay)

    def __repr__(self) -> str:
        return f"SelfTeacher(weights={self.weights!r}, ema_decay={self.ema_decay})"

    def build(self, student: torch.nn.Module) -> torch.nn.Module | None:
        """The teacher's own copy of ``student`` (frozen, in eval mode), or None where it is the student itself."""
        if self.weights == "current":
            return None
        teacher = copy.deepcopy(student)
        teacher.requires_grad_(False)
        return teacher.eval()

    @torch.no_grad()
    def update(self, teacher: torch.nn.Module | None, student: torch.nn.Module) -> None:
        """After an optimiser step: the EMA copy moves toward the student; the others do not move."""
        if self.weights != "ema":
            return
        for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
            t.lerp_(s.detach().to(t.dtype), 1.0 - self.ema_decay)
