"""Mixture-based reward clipping (paper Eq. 7).

A token the teacher finds nearly impossible has ``R -> -inf`` and dominates the update. REOPOLD judges
each token against the mixture ``m = lam * pi_s + (1 - lam) * pi_t`` and bounds the reward from below:

    Rhat = max(sg(R), c(lam))

Two readings of the floor exist (see ../shared/PAPER.md, Sec. 2); both are offered:

    form="logit"  (default):  c = log(lam / (1 - lam))      lam=0.1 -> -2.197
    form="convex":            c = log(lam) / (1 - lam)      lam=0.1 -> -2.558

Clipping is one-sided: rewards above the floor pass unchanged.
"""

from __future__ import annotations

import math

import torch

FORMS = ("logit", "convex")


def mixture_floor(lam: float = 0.1, form: str = "logit") -> float:
    """The floor ``c(lam)`` of Eq. 7 for ``lam`` in (0, 1)."""
    if not (isinstance(lam, (int, float)) and 0.0 < lam < 1.0):
        raise ValueError(f"clipping.lam must lie in (0, 1), got {lam!r}")
    if form == "logit":
        return math.log(lam / (1.0 - lam))
    if form == "convex":
        return math.log(lam) / (1.0 - lam)
    raise ValueError(f"clipping.form must be one of {FORMS}, got {form!r}")


class NoClip:
    """Identity: vanilla on-policy distillation keeps the raw reward."""

    floor = -math.inf

    def __call__(self, reward_BT: torch.Tensor) -> torch.Tensor:
        return reward_BT


class MixtureClip:
    """``Rhat = max(R, c(lam))``, one-sided from below.

    Args:
        lam: mixture weight of the student, in (0, 1). Default 0.1.
        form: ``"logit"`` for ``log(lam/(1-lam))`` (default) or ``"convex"`` for ``log(lam)/(1-lam)``.
    """

    def __init__(self, lam: float = 0.1, form: str = "logit"):
        self.floor = mixture_floor(lam, form)
        self.lam, self.form = lam, form

    def __call__(self, reward_BT: torch.Tensor) -> torch.Tensor:
        return reward_BT.clamp(min=self.floor)

    def __repr__(self) -> str:
        return f"MixtureClip(lam={self.lam}, form={self.form!r}, floor={self.floor:.4f})"
