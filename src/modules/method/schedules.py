"""Learning-rate schedules (stepped once per optimiser update)."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_ratio * lr`` at ``total_steps``."""
    if total_steps <= 0:
        raise ValueError(f"module.scheduler.total_steps must be > 0, got {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
