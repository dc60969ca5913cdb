"""Whether a model's weights changed since a key was taken.

A parameter's version counter moves with every in-place change made through autograd-visible ops (``copy_``,
``add_``, a foreach optimiser step), but not with a fused optimiser's step (``torch.optim.AdamW(fused=True)``,
this project's default), which writes the weights in one kernel. So the key also counts the optimiser steps taken
in this process, through torch's global step hook, registered when the first key is taken.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_steps = 0
_hook = None


def _count_step(optimizer, args, kwargs) -> None:
    global _steps
    _steps += 1


def optimizer_steps() -> int:
    """Optimiser steps taken in this process since the first ``weights_key`` (or this) call."""
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_count_step)
    return _steps


def weights_key(model: torch.nn.Module) -> tuple:
    """Equal for two calls when no parameter was replaced or changed in place in between, and no optimiser took a
    step (any optimiser: a step elsewhere only costs a needless refresh). Changes through ``p.data`` go unseen."""
    return optimizer_steps(), tuple((p.data_ptr(), p._version) for p in model.parameters())
