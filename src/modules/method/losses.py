"""Losses: the policy-gradient surrogate (paper Eq. 4), its aggregation, and the baselines' losses.

Shapes: B sequences, T response tokens, V vocabulary (see CONTRIBUTING.md).

Policy gradient with per-token importance ratio against the rollout policy ``pi_old``::

    rho[i,t] = exp(logp[i,t] - old_logp[i,t])
    loss     = agg( -A[i,t] * rho[i,t] , M )                              (Eq. 4, negated)
    PPO clip (optional): loss_tok = max(-A*rho, -A*clamp(rho, 1-eps_low, 1+eps_high))

With one optimiser step per rollout ``rho == 1`` in value and the gradient is ``-A * grad logp``.
For REOPOLD ``A = Rhat = max(R, c)`` and ``agg = token_mean`` over the kept tokens of the batch.

``aggregate`` is the one place a per-token matrix becomes a scalar.
"""

from __future__ import annotations

import math

import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def data_parallel_ranks() -> int:
    """How many data-parallel ranks share the batch: the process group's size (DDP, FSDP, DeepSpeed), else 1."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def max_over_ranks(n: int) -> int:
    """The largest ``n`` over the data-parallel ranks (``n`` itself in one process)."""
    if data_parallel_ranks() == 1:
        return n
    dist = torch.distributed
    t = torch.tensor([n], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _per_rank(denominator: torch.Tensor) -> torch.Tensor:
    """The batch-wide denominator, as each rank's share: summed over the ranks, then divided by their number.

    Data-parallel training averages the ranks' gradients, so ``num_r / (sum_r den_r / W)`` on each rank makes
    that average the gradient of ``sum_r num_r / sum_r den_r``: the aggregate over the union of the ranks'
    batches, as one process would compute it, however the tokens fall between the ranks. Each rank's loss
    value is then its share, and the mean over the ranks is the batch's loss: what ``train/loss`` logs
    (``src.modules.distributed.over_ranks``).
    """
    ranks = data_parallel_ranks()
    if ranks == 1:
        return denominator.clamp(min=1.0)
    total = denominator.detach().clone()
    torch.distributed.all_reduce(total)
    return total.clamp(min=1.0) / ranks


def loss_count(mask_BT: torch.Tensor, agg: str) -> torch.Tensor:
    """What ``aggregate`` divides by, over the rows of ``mask_BT``: kept tokens (``token_mean``), sequences with any
    kept token (``seq_mean_token_mean``) or sequences (``seq_mean_token_sum``)."""
    mask_BT = mask_BT.bool()
    if agg == "token_mean":
        return mask_BT.sum().float()
    if agg == "seq_mean_token_mean":
        return mask_BT.any(dim=-1).sum().float()
    return torch.tensor(float(mask_BT.shape[0]), device=mask_BT.device)


def aggregate(x_BT: torch.Tensor, mask_BT: torch.Tensor, agg: str = "token_mean",
              batch_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a per-token matrix to a scalar over the tokens where ``mask_BT`` is set.

    - ``token_mean``: sum over kept tokens / number of kept tokens in the batch (Eq. 4).
    - ``seq_mean_token_mean``: mean over each sequence's kept tokens, then over sequences with any.
    - ``seq_mean_token_sum``: sum over each sequence's kept tokens, then mean over sequences.
    Masked positions never contribute, even when ``x_BT`` holds inf or NaN there. Under data parallelism
    "the batch" is every rank's batch together (``_per_rank``): each rank must call it, the same number of times.
    ``batch_mask_BT``: where ``x_BT`` is one micro-batch of a batch, the batch's mask: the division is by the
    batch's count (``loss_count``), so the micro-batches' losses sum to the batch's and their gradients accumulate
    to its gradient, whatever the micro-batch size.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"objective.agg must be one of {AGGREGATIONS}, got {agg!r}")
    mask_BT = mask_BT.bool()
    x_BT = torch.where(mask_BT, x_BT, torch.zeros((), dtype=x_BT.dtype, device=x_BT.device))
    count = loss_count(mask_BT if batch_mask_BT is None else batch_mask_BT, agg).to(x_BT.dtype)
    if agg == "token_mean":
        total = x_BT.sum()
    elif agg == "seq_mean_token_mean":
        n_B = mask_BT.sum(dim=-1).to(x_BT.dtype)
        total = (x_BT.sum(dim=-1) / n_B.clamp(min=1.0))[n_B > 0].sum()
    else:
        total = x_BT.sum()
    return total / _per_rank(count)


def policy_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantage_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    eps_low: float | None = None,
    eps_high: float | None = None,
    agg: str = "token_mean",
    batch_mask_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance-weighted policy-gradient surrogate, optionally PPO-clipped.

    Args:
        logp_BT: current policy's log-probs of the sampled tokens (with gradient), [B, T].
        old_logp_BT: rollout policy's log-probs of the same tokens, [B, T] (no gradient).
        advantage_BT: per-token advantage, e.g. the clipped reward ``Rhat`` (no gradient), [B, T].
        mask_BT: tokens that enter the loss, [B, T].
        eps_low, eps_high: PPO ratio clip range ``[1 - eps_low, 1 + eps_high]``; None disables a side.
        agg, batch_mask_BT: see ``aggregate``.
    Returns:
        (loss, metrics) with metrics ``ratio_mean``, ``ppo_clip_frac`` and ``approx_kl`` (detached).
    """
    mask_BT = mask_BT.bool()
    log_rho_BT = torch.where(mask_BT, logp_BT - old_logp_BT.detach(), torch.zeros_like(logp_BT))
    rho_BT = torch.exp(log_rho_BT)
    adv_BT = advantage_BT.detach().to(rho_BT.dtype)
    loss_BT = -adv_BT * rho_BT
    clipped_BT = torch.zeros_like(mask_BT)
    if eps_low is not None or eps_high is not None:
        lo = 1.0 - eps_low if eps_low is not None else 0.0
        hi = 1.0 + eps_high if eps_high is not None else float("inf")
        clip_loss_BT = -adv_BT * rho_BT.clamp(lo, hi)
        clipped_BT = clip_loss_BT > loss_BT
        loss_BT = torch.maximum(loss_BT, clip_loss_BT)
    loss = aggregate(loss_BT, mask_BT, agg, batch_mask_BT)
    with torch.no_grad():
        n = mask_BT.sum().clamp(min=1)
        metrics = {
            "ratio_mean": (rho_BT * mask_BT).sum() / n,
            "ppo_clip_frac": (clipped_BT & mask_BT).sum() / n,
            # k3 estimator of KL(pi_old || pi): (rho - 1) - log rho, always >= 0
            "approx_kl": (((rho_BT - 1) - log_rho_BT) * mask_BT).sum() / n,
        }
    return loss, metrics


def generalized_jsd(
    student_logp_NV: torch.Tensor, teacher_logp_NV: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-position generalized JSD of GKD over the full vocabulary, [N, V] -> [N].

    ``beta = 0``: forward KL(teacher || student); ``beta = 1``: reverse KL(student || teacher);
    otherwise ``beta * KL(teacher || M) + (1 - beta) * KL(student || M)`` with
    ``M = beta * teacher + (1 - beta) * student`` (TRL's GKD convention).
    """
    s, t = student_logp_NV, teacher_logp_NV
    if beta == 0.0:
        return _kl(t, s)
    if beta == 1.0:
        return _kl(s, t)
    m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis from log-probs; entries with p = 0 contribute 0 (not 0 * inf)."""
    terms = p_log.exp() * (p_log - q_log)
    return torch.where(p_log > -math.inf, terms, torch.zeros_like(terms)).sum(-1)


def token_nll(logp_BT: torch.Tensor, mask_BT: torch.Tensor, agg: str = "token_mean",
              batch_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the sampled tokens (SFT on teacher outputs)."""
    return aggregate(-logp_BT, mask_BT, agg, batch_mask_BT)
