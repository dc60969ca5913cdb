"""Objectives: what a rollout batch is turned into (one per algorithm family), behind one contract (``Objective``):

- ``needs_teacher``: whether the frozen teacher is loaded at all; ``epochs * minibatches`` optimiser steps follow
  each rollout;
- ``rollout(batch, sampler, scorer)``: where the batch's responses come from: the student (on-policy), the teacher
  (off-policy SFT) or the data set's reference solutions (the SFT stages);
- ``prepare(ro, scorer, selection)``: once per rollout batch, no gradient: rewards, advantages, the token mask and
  the batch metrics;
- ``loss(ro, scorer)``: on a (mini)batch or one micro-batch of it, with gradient: ``(loss, metrics)``, normalised
  by the counts of the batch (``ro.batch_loss_mask_BT``), so micro-batch losses sum to the batch's;
- ``micro_batch_tokens``: the most padded tokens a forward/backward takes at once (teacher scoring and the update;
  None: the whole batch). ``accumulate`` runs a loss over the micro-batches, gradients accumulating.

``scorer`` is a ``src.modules.scoring.Scorer`` (student and teacher scoring at the rollout temperature),
``sampler`` a ``src.modules.rollout.sampler.Sampler``.

- ``PolicyGradient``: REOPOLD, vanilla OPD and GRPO (paper Eq. 4 with a reward, a clip and a mask).
- ``GeneralizedJSD``: GKD's full-vocabulary divergence on student samples, chunked.
- ``SupervisedDistillation``: cross-entropy on responses the teacher generated.
- ``ReferenceSFT``: cross-entropy on the data set's reference solutions (how the miniature's teacher
  and the student's warm start are trained).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.utils.checkpoint import checkpoint

from src.modules.method.clipping import NoClip
from src.modules.method.losses import AGGREGATIONS, aggregate, generalized_jsd, policy_loss, token_nll
from src.modules.method.selection import AllTokens


class Objective(Protocol):
    """What the LightningModule's training step asks of an objective (see the module docstring)."""

    needs_teacher: bool
    micro_batch_tokens: int | None
    shardable: bool  # scores only through the Scorer's module calls (trainer=fsdp2 can shard the models)
    epochs: int
    minibatches: int

    def rollout(self, batch: dict, sampler, scorer): ...

    def prepare(self, ro, scorer, selection) -> None: ...

    def loss(self, ro, scorer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def accumulate(objective, ro, scorer, backward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``objective.loss`` over ``ro``'s micro-batches (at most ``objective.micro_batch_tokens`` padded tokens each),
    ``backward(loss)`` after each, so the gradients accumulate to the whole batch's and only one micro-batch's
    activations are alive at a time. Returns the batch's loss (the sum) and its metrics: the micro-batches' per-token
    means weighted by their tokens in the loss (a micro-batch with none, or a filler, weighs nothing)."""
    parts = ro.micro_batches(objective.micro_batch_tokens)
    total, sums, weight = None, {}, 0.0
    for part in parts:
        loss, part_metrics = objective.loss(part, scorer)
        backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
        w = float(part.loss_mask_BT.sum()) if len(parts) > 1 else 1.0
        weight += w
        for k, v in part_metrics.items():
            sums[k] = sums.get(k, 0.0) + v.detach() * w
    return total, {k: v / max(weight, 1.0) for k, v in sums.items()}


class OnPolicy:
    """The student samples the responses (the on-policy objectives' rollout)."""

    shardable = True

    def rollout(self, batch, sampler, scorer):
        return sampler(scorer.student, batch)


def _quantiles(x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    if x.numel() == 0:
        return {}
    q = torch.quantile(x.float()[:100_000], torch.tensor([0.1, 0.5, 0.9], device=x.device))
    return {f"{prefix}_mean": x.float().mean(), f"{prefix}_q10": q[0], f"{prefix}_q50": q[1], f"{prefix}_q90": q[2]}


def _checked(agg: str, epochs: int = 1, minibatches: int = 1, micro_batch_tokens: int | None = None):
    """The settings every objective takes, checked now (not at step 0), each named by its config key."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"objective.agg must be one of {AGGREGATIONS}, got {agg!r}")
    if epochs < 1 or minibatches < 1:
        raise ValueError(f"objective.epochs and objective.minibatches must be >= 1, got {epochs}, {minibatches}")
    if micro_batch_tokens is not None and micro_batch_tokens < 1:
        raise ValueError(f"objective.micro_batch_tokens must be >= 1 or null, got {micro_batch_tokens}")
    return agg, epochs, minibatches, micro_batch_tokens


class PolicyGradient(OnPolicy):
    """Policy-gradient surrogate with a token reward, a reward clip and a token selection.

    Args:
        reward: ``(ro) -> reward_BT`` that declares ``needs_teacher`` (``LogRatioReward``, ``OutcomeReward``).
        clipping: ``(reward_BT) -> clipped_BT`` (``NoClip`` or ``MixtureClip``).
        eps_low, eps_high: PPO ratio clip; None disables.
        agg: token aggregation (see ``losses.aggregate``).
        epochs, minibatches: optimiser steps per rollout batch = epochs * minibatches.
        micro_batch_tokens: see the module docstring.
    """

    scores_sampled_tokens = True  # the teacher is read only through its log-probs of the sampled tokens

    def __init__(self, reward, clipping=None, eps_low: float | None = None, eps_high: float | None = None,
                 agg: str = "token_mean", epochs: int = 1, minibatches: int = 1, micro_batch_tokens: int | None = None):
        self.reward, self.clipping = reward, clipping or NoClip()
        self.eps_low, self.eps_high = eps_low, eps_high
        self.agg, self.epochs, self.minibatches, self.micro_batch_tokens = _checked(agg, epochs, minibatches,
                                                                                    micro_batch_tokens)

    @property
    def needs_teacher(self) -> bool:
        return self.reward.needs_teacher

    @torch.no_grad()
    def prepare(self, ro, scorer, selection=None) -> None:
        selection = selection or AllTokens()
        if self.needs_teacher:
            ro.teacher_logp_BT = scorer.teacher_logp(ro)
        # a cross-vocabulary teacher credits its score to some tokens only (``Rollout.scored_mask_BT``): the clip
        # counts, the exploration test and the entropy quantile act among those
        valid_BT = ro.response_mask_BT if ro.scored_mask_BT is None else ro.response_mask_BT & ro.scored_mask_BT
        reward_BT = self.reward(ro)
        ro.reward_BT = reward_BT
        ro.advantage_BT = self.clipping(reward_BT)
        ro.loss_mask_BT = selection.select(reward_BT, ro.entropy_BT, valid_BT) & valid_BT
        n_valid = valid_BT.sum().clamp(min=1)
        m = ro.metrics
        m.update(_quantiles(reward_BT[valid_BT], "reward"))
        clipped = ((reward_BT < self.clipping.floor) & valid_BT).sum()
        m["clip_frac"] = clipped / n_valid
        kept = ro.loss_mask_BT.sum()
        m["kept_frac"] = kept / n_valid
        # per-step counts on this rank: which rule kept how many tokens (the other rule's count is 0), the entropy
        # threshold in force (NaN while the entropy rule is not)
        rule = getattr(selection, "rule", None)
        m["tokens_clipped"] = clipped.float()
        for name in ("exploration", "entropy"):
            m[f"tokens_kept_{name}"] = kept.float() if rule == name else torch.tensor(0.0)
        m["entropy_threshold"] = torch.tensor(getattr(selection, "threshold", float("nan")) if rule == "entropy"
                                              else float("nan"))
        if ro.teacher_logp_BT is not None:
            # sampled-token estimate of KL(student || teacher) per response token (a cross-vocabulary teacher's
            # credits sum to each span's log-ratio, so the sum is over every response token)
            mask_BT = ro.response_mask_BT
            m["rev_kl"] = ((ro.old_logp_BT - ro.teacher_logp_BT) * mask_BT).sum() / mask_BT.sum().clamp(min=1)

    def loss(self, ro, scorer):
        logp_BT, _ = scorer.student_logp(ro)
        return policy_loss(logp_BT, ro.old_logp_BT, ro.advantage_BT, ro.loss_mask_BT,
                           self.eps_low, self.eps_high, self.agg, ro.batch_loss_mask_BT)


class SupervisedDistillation:
    """Off-policy distillation: the teacher generates, the student fits it with cross-entropy."""

    needs_teacher = True
    shardable = True
    epochs = minibatches = 1

    def __init__(self, agg: str = "token_mean", micro_batch_tokens: int | None = None):
        self.agg, _, _, self.micro_batch_tokens = _checked(agg, micro_batch_tokens=micro_batch_tokens)

    def rollout(self, batch, sampler, scorer):
        ro = sampler(scorer.teacher, batch)
        ro.entropy_BT = None  # the teacher's; train/entropy is the student's
        return ro

    @torch.no_grad()
    def prepare(self, ro, scorer, selection=None) -> None:
        ro.loss_mask_BT = ro.response_mask_BT

    def loss(self, ro, scorer):
        # maximum likelihood of the demonstrations: the model's own distribution, not a tempered one
        logp_BT, _ = scorer.student_logp(ro, temperature=1.0)
        return token_nll(logp_BT, ro.loss_mask_BT, self.agg, ro.batch_loss_mask_BT), {}


class GeneralizedJSD(OnPolicy):
    """GKD: full-vocabulary generalized JSD (``beta``) between student and teacher on student samples.

    The teacher's and the student's log-probs (``Scorer.vocab_logp``: at the sampling temperature, banned ids
    renormalised away) are formed ``scorer.chunk_size`` positions at a time inside a checkpoint, so neither full
    ``[B, T, V]`` tensor is ever held. The hidden states and heads are read outside a module's forward, so FSDP2
    cannot shard the models for it (``shardable``).
    """

    needs_teacher = True
    shardable = False

    def __init__(self, beta: float = 0.5, agg: str = "token_mean", epochs: int = 1, minibatches: int = 1,
                 micro_batch_tokens: int | None = None):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"objective.beta must lie in [0, 1], got {beta!r}")
        self.beta = beta
        self.agg, self.epochs, self.minibatches, self.micro_batch_tokens = _checked(agg, epochs, minibatches,
                                                                                    micro_batch_tokens)

    @torch.no_grad()
    def prepare(self, ro, scorer, selection=None) -> None:
        ro.loss_mask_BT = ro.response_mask_BT

    def _chunk(self, scorer, head_s, head_t, hs_NH, ht_NH):
        return generalized_jsd(scorer.vocab_logp(hs_NH, head_s), scorer.vocab_logp(ht_NH, head_t), self.beta)

    def loss(self, ro, scorer):
        hs_BTH, head_s = scorer.hidden(scorer.student, ro)
        with torch.no_grad():
            ht_BTH, head_t = scorer.hidden(scorer.teacher, ro)
        B, T, _ = hs_BTH.shape
        hs, ht = hs_BTH.reshape(B * T, -1), ht_BTH.reshape(B * T, -1)
        n = scorer.chunk_size
        parts = [checkpoint(self._chunk, scorer, head_s, head_t, hs[i : i + n], ht[i : i + n], use_reentrant=False)
                 for i in range(0, B * T, n)]
        jsd_BT = torch.cat(parts).view(B, T)
        return aggregate(jsd_BT, ro.loss_mask_BT, self.agg, ro.batch_loss_mask_BT), {}


class ReferenceSFT(SupervisedDistillation):
    """Cross-entropy on the data set's reference solutions (teacher-forced, no generation, no teacher)."""

    needs_teacher = False

    def rollout(self, batch, sampler, scorer):
        return sampler.reference(batch)
