"""Evaluation metrics over ``k`` sampled responses per prompt, as ``torchmetrics.Metric`` classes.

Each keeps sums in its state (reduced with ``sum`` across DDP ranks), so a metric logged from several
ranks is the metric of the whole evaluation set. ``correct_PG`` is a ``[P, G]`` bool tensor: P prompts,
G samples each.

- ``avg@k``  mean accuracy of single samples;
- ``pass@k`` unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)`` per prompt with n
  samples of which c are correct, computed as the stable product ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``;
- ``maj@k``  the expected accuracy of a majority vote over k of the G samples' final answers (every
  k-subset when there are few, else seeded random subsets); a response without an answer never votes,
  a tie gets the fraction of tied answers that are correct.
Both estimators are those of ``src.modules.evaluation.test_time_scaling``, so training-time validation and the
offline test-time-scaling analysis agree on the numbers.
Greedy accuracy, response length and truncation rate are means (``torchmetrics.MeanMetric``); a tool-use
episode's statistics are ``Ratio``s (malformed calls per call weighs every call alike, whatever its batch).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from src.modules.evaluation.test_time_scaling import default_ks, maj_at_k, pass_at_k


class _PromptMean(Metric):
    """Mean over prompts of a per-prompt value; sums reduce across ranks."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, values_P: torch.Tensor) -> None:
        self.total += values_P.to(torch.float64).sum().to(self.total.device)
        self.count += values_P.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class AvgAtK(_PromptMean):
    """Mean accuracy of single samples (each prompt weighted equally)."""

    def update(self, correct_PG: torch.Tensor) -> None:
        self._add(correct_PG.float().mean(-1))


class _AtK(_PromptMean):
    name = "@k"

    def __init__(self, k: int, **kwargs):
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"{self.name} needs k >= 1, got {k}")
        self.k = k


class PassAtK(_AtK):
    """Unbiased pass@k from all G >= k samples of each prompt."""

    name = "pass@k"

    def update(self, correct_PG: torch.Tensor) -> None:
        G = correct_PG.shape[1]
        self._add(torch.as_tensor(pass_at_k(G, correct_PG.sum(-1).cpu().numpy(), self.k)).reshape(-1))


class MajAtK(_AtK):
    """Expected accuracy of a majority vote over k of each prompt's samples."""

    name = "maj@k"

    def update(self, answers_PG: list[list[str | None]], correct_PG: torch.Tensor) -> None:
        correct = correct_PG.bool().tolist()
        self._add(torch.tensor([maj_at_k(a, c, self.k) for a, c in zip(answers_PG, correct)]))


class Ratio(Metric):
    """``sum(numerator) / sum(denominator)`` over an evaluation; 0 when the denominator is 0 (no calls, no
    malformed calls)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("numerator", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("denominator", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, numerator: float, denominator: float) -> None:
        self.numerator += float(numerator)
        self.denominator += float(denominator)

    def compute(self) -> torch.Tensor:
        if self.denominator <= 0:
            return torch.zeros((), dtype=torch.float32, device=self.numerator.device)
        return (self.numerator / self.denominator).float()


__all__ = ["AvgAtK", "MajAtK", "PassAtK", "Ratio", "default_ks"]
