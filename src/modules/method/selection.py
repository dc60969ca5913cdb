"""Token selection: which response tokens enter the loss (the mask ``M`` of Eq. 4).

- ``AllTokens``: every valid response token (vanilla on-policy distillation).
- ``EntropyTopQuantile`` (Eq. 8, the refinement rule): keep tokens whose *student* entropy is at or
  above the ``(1 - ratio)`` quantile of the entropies of all valid response tokens of the batch
  (a batch quantile, not per sequence). Default ``ratio = 0.2``.
- ``RewardFloor`` (Eq. 9, the exploration rule): keep tokens with ``R >= floor``, i.e. drop the tokens
  the mixture clip would have clipped.

Each is a callable ``(x_BT, valid_BT) -> keep_BT`` (bool), and offers ``select(reward_BT, entropy_BT,
valid_BT)`` so the module calls every rule the same way.
"""

from __future__ import annotations

import torch

from src.modules.method.losses import data_parallel_ranks


class AllTokens:
    rule = "all"  # what the per-step counts call the tokens it keeps

    def __call__(self, x_BT: torch.Tensor | None, valid_BT: torch.Tensor) -> torch.Tensor:
        return valid_BT.bool()

    def select(self, reward_BT, entropy_BT, valid_BT):
        return self(None, valid_BT)


def _all_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` of every data-parallel rank, concatenated (each rank's own alone without a process group)."""
    ranks = data_parallel_ranks()
    if ranks == 1:
        return values
    dist = torch.distributed
    n = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(n) for _ in range(ranks)]
    dist.all_gather(sizes, n)
    padded = values.new_zeros(int(max(sizes)))
    padded[: values.numel()] = values
    out = [torch.empty_like(padded) for _ in range(ranks)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(k)] for o, k in zip(out, sizes)])


class EntropyTopQuantile:
    """Keep the top ``ratio`` of valid tokens by student entropy (batch quantile; under data parallelism, over
    every rank's tokens together).

    Ties at the threshold are kept (``H >= tau``), so the kept fraction is at least ``ratio`` and equals
    it up to ties and rounding.
    """

    rule = "entropy"  # what the per-step counts call the tokens it keeps

    def __init__(self, ratio: float = 0.2):
        if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
            raise ValueError(f"selection.ratio must lie in (0, 1], got {ratio!r}")
        self.ratio = float(ratio)

    def __call__(self, entropy_BT: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
        valid_BT = valid_BT.bool()
        values = _all_ranks(entropy_BT.detach()[valid_BT])  # the batch quantile over every rank's tokens
        if values.numel() == 0:
            self.threshold = float("nan")
            return valid_BT.clone()
        # The k-th largest value is the threshold: exact for the "top ratio" reading, no interpolation.
        k = max(1, int(round(self.ratio * values.numel())))
        tau = torch.topk(values, k, sorted=False).values.min()
        self.threshold = float(tau)  # the threshold in force at the latest selection (logged by the objective)
        return valid_BT & (entropy_BT.detach() >= tau)

    def select(self, reward_BT, entropy_BT, valid_BT):
        return self(entropy_BT, valid_BT)


class RewardFloor:
    """Keep tokens whose reward is at least ``floor`` (REOPOLD's exploration phase uses ``c(lam)``)."""

    rule = "exploration"  # what the per-step counts call the tokens it keeps

    def __init__(self, floor: float):
        self.floor = float(floor)

    def __call__(self, reward_BT: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
        return valid_BT.bool() & (reward_BT.detach() >= self.floor)

    def select(self, reward_BT, entropy_BT, valid_BT):
        return self(reward_BT, valid_BT)
