"""Closed-form property tests of REOPOLD's building blocks (paper Sec. 1-5).

Small, seeded and CPU-only. Every test compares against a value computed independently of the code
under test (a hand-computed number, a Python loop, or a direct formula), so a sign flip, a wrong
floor, a per-sequence quantile or a leaking mask makes it fail.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from src.modules.method.clipping import MixtureClip, NoClip, mixture_floor
from src.modules.method.losses import AGGREGATIONS, aggregate, generalized_jsd, policy_loss, token_nll
from src.modules.method.rewards import LogRatioReward, OutcomeReward, group_normalise, log_ratio_reward
from src.modules.method.selection import AllTokens, EntropyTopQuantile, RewardFloor
from src.modules.rollout.backend import response_mask_from_ids
from src.modules.scoring import reference_logp_entropy, token_logp_entropy

pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Rewards (Sec. 1)
# --------------------------------------------------------------------------------------------------


def test_log_ratio_reward_is_teacher_minus_student():
    g = _gen(1)
    t = torch.randn(3, 5, generator=g)
    s = torch.randn(3, 5, generator=g)
    r = log_ratio_reward(t, s)
    torch.testing.assert_close(r, t - s)
    assert r.dtype == torch.float32 and r.shape == (3, 5)


def test_log_ratio_reward_zero_when_student_equals_teacher():
    logp = -torch.rand(4, 7, generator=_gen(2)) * 5
    r = log_ratio_reward(logp, logp.clone())
    assert torch.equal(r, torch.zeros_like(r))


def test_log_ratio_reward_is_detached():
    g = _gen(3)
    t = torch.randn(2, 4, generator=g, requires_grad=True)
    s = torch.randn(2, 4, generator=g, requires_grad=True)
    r = log_ratio_reward(t, s)
    assert not r.requires_grad and r.grad_fn is None
    # Used as an advantage, no gradient may reach the teacher or the rollout log-probs through it.
    logp = torch.randn(2, 4, generator=g, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), r, torch.ones(2, 4, dtype=torch.bool))
    loss.backward()
    assert t.grad is None and s.grad is None
    assert logp.grad is not None


def test_log_ratio_reward_component_masks_and_uses_old_logp():
    g = _gen(4)
    batch = SimpleNamespace(
        teacher_logp_BT=torch.randn(2, 4, generator=g),
        old_logp_BT=torch.randn(2, 4, generator=g),
        response_mask_BT=torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool),
    )
    r = LogRatioReward()(batch)
    expected = (batch.teacher_logp_BT - batch.old_logp_BT) * batch.response_mask_BT
    torch.testing.assert_close(r, expected)
    assert LogRatioReward.needs_teacher


# --------------------------------------------------------------------------------------------------
# Group normalisation (GRPO baseline)
# --------------------------------------------------------------------------------------------------


def test_group_normalise_zero_mean_unit_std_per_group():
    score = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0, 7.0, 9.0, 0.0, 0.0, 0.0, 1.0])
    G = 4
    adv = group_normalise(score, G, eps=0.0).view(-1, G)
    torch.testing.assert_close(adv.mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(1, unbiased=False), torch.ones(3), atol=1e-6, rtol=0)
    # hand-computed: group [3, 5, 7, 9] has mean 6 and population std sqrt(5)
    torch.testing.assert_close(adv[1], torch.tensor([-3.0, -1.0, 1.0, 3.0]) / math.sqrt(5.0))


def test_group_normalise_mean_only_and_constant_groups():
    score = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])
    adv = group_normalise(score, 3, scale=False)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    # a constant group has zero advantage (no division blow-up)
    adv_scaled = group_normalise(score, 3)
    assert torch.isfinite(adv_scaled).all()
    torch.testing.assert_close(adv_scaled[3:], torch.zeros(3))
    # G = 1: every sample is its own group -> zero advantage
    torch.testing.assert_close(group_normalise(score, 1), torch.zeros(6))


def test_group_normalise_rejects_partial_group():
    with pytest.raises(ValueError, match="group"):
        group_normalise(torch.zeros(5), 2)


def test_outcome_reward_broadcasts_group_advantage_over_response_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    batch = SimpleNamespace(
        response_texts=["a", "b", "a", "a"],
        references=["a", "a", "a", "a"],
        response_mask_BT=mask,
        group_size=2,
        metrics={},
    )
    reward = OutcomeReward(grader=lambda r, ref: float(r == ref), scale=False)(batch)
    # groups: [1, 0] -> [+0.5, -0.5]; [1, 1] -> [0, 0]
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0])[:, None] * mask
    torch.testing.assert_close(reward, expected)
    torch.testing.assert_close(batch.metrics["outcome_mean"], torch.tensor(0.75))


# --------------------------------------------------------------------------------------------------
# Mixture-based reward clipping (Sec. 2, Eq. 7)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lam, form, expected",
    [
        (0.1, "logit", -2.197),
        (0.1, "convex", -2.558),
        (0.2, "logit", -1.386),
        (0.2, "convex", -2.012),
    ],
)
def test_mixture_floor_table_values(lam, form, expected):
    assert mixture_floor(lam, form) == pytest.approx(expected, abs=1e-3)
    assert MixtureClip(lam, form).floor == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("lam", [0.01, 0.1, 0.2, 0.5, 0.9])
def test_mixture_floor_closed_forms(lam):
    assert mixture_floor(lam, "logit") == pytest.approx(math.log(lam / (1 - lam)), rel=1e-12)
    assert mixture_floor(lam, "convex") == pytest.approx(math.log(lam) / (1 - lam), rel=1e-12)
    assert mixture_floor(lam) == mixture_floor(lam, "logit")  # default form


def test_mixture_clip_defaults_to_paper_setting():
    assert MixtureClip().floor == pytest.approx(math.log(0.1 / 0.9), rel=1e-12)


@pytest.mark.parametrize("form", ["logit", "convex"])
@pytest.mark.parametrize("lam", [0.1, 0.2])
def test_mixture_clip_identity_above_floor_floor_below(lam, form):
    clip = MixtureClip(lam=lam, form=form)
    c = clip.floor
    r = torch.linspace(-10.0, 10.0, 2001, dtype=torch.float64)
    out = clip(r)
    above = r >= c
    assert above.any() and (~above).any()
    assert torch.equal(out[above], r[above])  # identity (bit-exact) above the floor
    assert torch.all(out[~above] == c)  # exactly the floor below it
    # one-sided: large positive rewards pass unchanged, -inf goes to the floor
    big = torch.tensor([1e6, 50.0, 0.0, -math.inf])
    torch.testing.assert_close(clip(big), torch.tensor([1e6, 50.0, 0.0, c], dtype=big.dtype))


def test_no_clip_is_identity():
    r = torch.tensor([-math.inf, -100.0, 0.0, 3.0])
    assert torch.equal(NoClip()(r), r)
    assert NoClip.floor == -math.inf


@pytest.mark.parametrize("lam", [0, 1, 0.0, 1.0, -0.5, 1.5, float("nan")])
def test_bad_lam_raises_naming_lam(lam):
    with pytest.raises(ValueError, match="lam"):
        mixture_floor(lam)
    with pytest.raises(ValueError, match="lam"):
        MixtureClip(lam=lam)


def test_unknown_clip_form_raises():
    with pytest.raises(ValueError, match="form"):
        mixture_floor(0.1, "sigmoid")
    with pytest.raises(ValueError, match="form"):
        MixtureClip(0.1, form="nope")


# --------------------------------------------------------------------------------------------------
# Token selection (Sec. 3 and 4, Eq. 8 and 9)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.25, 0.5, 0.9, 1.0])
def test_entropy_top_quantile_keeps_exact_fraction_on_distinct_entropies(ratio):
    ent = torch.randperm(1000, generator=_gen(5)).float().view(10, 100) / 100.0
    valid = torch.ones(10, 100, dtype=torch.bool)
    keep = EntropyTopQuantile(ratio)(ent, valid)
    k = round(ratio * 1000)
    assert keep.dtype == torch.bool
    assert int(keep.sum()) == k
    # exactly the k largest entropies are kept
    thresh = ent.flatten().sort(descending=True).values[k - 1]
    assert torch.equal(keep, ent >= thresh)


def test_entropy_top_quantile_never_keeps_invalid_tokens():
    g = _gen(6)
    ent = torch.rand(8, 125, generator=g)
    valid = torch.rand(8, 125, generator=g) > 0.3
    ent = torch.where(valid, ent, torch.full_like(ent, 1e9))  # invalid tokens have huge entropy
    keep = EntropyTopQuantile(0.2)(ent, valid)
    assert not (keep & ~valid).any()
    n_valid = int(valid.sum())
    assert int(keep.sum()) == round(0.2 * n_valid)
    # the quantile is over valid tokens only: the kept ones are the top 20% of the valid entropies
    vals = ent[valid].sort(descending=True).values
    assert float(ent[keep].min()) == float(vals[round(0.2 * n_valid) - 1])


def test_entropy_top_quantile_is_a_batch_quantile_not_per_sequence():
    g = _gen(7)
    ent = torch.rand(4, 10, generator=g)  # in [0, 1)
    ent[1] = 5.0 + torch.rand(10, generator=g)  # one sequence holds all the high-entropy tokens
    valid = torch.ones(4, 10, dtype=torch.bool)
    keep = EntropyTopQuantile(0.25)(ent, valid)  # top 10 of 40 tokens
    assert keep[1].all()
    assert not keep[[0, 2, 3]].any()
    # a per-sequence quantile would have kept some tokens in every row; check the difference matters
    assert int(keep.sum()) == 10


def test_entropy_top_quantile_ties_are_kept_and_empty_batch():
    valid = torch.ones(3, 4, dtype=torch.bool)
    keep = EntropyTopQuantile(0.2)(torch.full((3, 4), 0.7), valid)
    assert keep.all()  # all tied at the threshold -> all kept (fraction >= ratio)
    none_valid = torch.zeros(3, 4, dtype=torch.bool)
    keep = EntropyTopQuantile(0.2)(torch.rand(3, 4), none_valid)
    assert not keep.any()


def test_entropy_top_quantile_exact_fraction_for_float64_entropies():
    g = _gen(17)
    failures = 0
    for _ in range(20):
        ent = torch.rand(10, 100, generator=g, dtype=torch.float64) * 3
        keep = EntropyTopQuantile(0.2)(ent, torch.ones(10, 100, dtype=torch.bool))
        failures += int(keep.sum()) != 200
    assert failures == 0


@pytest.mark.parametrize("ratio", [0, 0.0, 1.5, -1, float("nan")])
def test_bad_ratio_raises_naming_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        EntropyTopQuantile(ratio)


def test_reward_floor_keeps_exactly_rewards_at_or_above_floor():
    g = _gen(8)
    R = torch.randn(6, 50, generator=g) * 3
    R[0, 0] = -2.0  # exactly at the floor: kept
    valid = torch.rand(6, 50, generator=g) > 0.2
    R_with_junk = torch.where(valid, R, torch.full_like(R, 100.0))  # invalid tokens with high reward
    keep = RewardFloor(-2.0)(R_with_junk, valid)
    assert torch.equal(keep, valid & (R >= -2.0))
    assert bool(keep[0, 0]) == bool(valid[0, 0])
    assert int(keep.sum()) == int((R[valid] >= -2.0).sum())
    # with the mixture floor the exploration rule drops exactly the tokens the clip would change
    clip = MixtureClip(0.1)
    keep = RewardFloor(clip.floor)(R, valid)
    assert torch.equal(keep, valid & (clip(R) == R))


def test_all_tokens_and_select_interface():
    valid = torch.tensor([[1, 1, 0], [1, 0, 0]])
    R = torch.tensor([[-5.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    H = torch.tensor([[0.1, 2.0, 9.0], [1.0, 0.0, 0.0]])
    assert torch.equal(AllTokens().select(R, H, valid), valid.bool())
    assert torch.equal(RewardFloor(-1.0).select(R, H, valid), torch.tensor([[0, 1, 0], [1, 0, 0]]).bool())
    assert torch.equal(EntropyTopQuantile(1 / 3).select(R, H, valid), torch.tensor([[0, 1, 0], [0, 0, 0]]).bool())


# --------------------------------------------------------------------------------------------------
# Aggregation and the policy-gradient surrogate (Eq. 4)
# --------------------------------------------------------------------------------------------------


def test_aggregate_closed_forms():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # token_mean: (1 + 2 + 3 + 10) / 4
    assert float(aggregate(x, m, "token_mean")) == pytest.approx(4.0)
    # seq_mean_token_mean: mean(mean(1, 2, 3), mean(10)) = (2 + 10) / 2
    assert float(aggregate(x, m, "seq_mean_token_mean")) == pytest.approx(6.0)
    # seq_mean_token_sum: mean(1 + 2 + 3, 10) = (6 + 10) / 2
    assert float(aggregate(x, m, "seq_mean_token_sum")) == pytest.approx(8.0)
    assert float(aggregate(x, m)) == pytest.approx(4.0)  # default is the paper's token mean


def test_aggregate_seq_mean_token_mean_skips_empty_rows_and_all_masked_is_zero():
    x = torch.tensor([[1.0, 3.0], [100.0, 100.0], [5.0, 0.0]])
    m = torch.tensor([[1, 1], [0, 0], [1, 0]])
    assert float(aggregate(x, m, "seq_mean_token_mean")) == pytest.approx((2.0 + 5.0) / 2)
    for agg in AGGREGATIONS:
        out = aggregate(torch.full((2, 3), math.nan), torch.zeros(2, 3), agg)
        assert torch.isfinite(out) and float(out) == 0.0


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("objective", ["policy_gradient", "sft"])
def test_micro_batches_accumulate_the_whole_batch_loss_and_gradient(agg, objective):
    """``accumulate`` over micro-batches of 2 rows (3 of them, the last of 1 row) gives the loss and the gradient
    of the whole batch at once: every micro-batch divides by the whole batch's count, whatever it holds."""
    from types import SimpleNamespace

    from src.modules.method.objectives import PolicyGradient, SupervisedDistillation, accumulate
    from src.modules.rollout.batch import Rollout

    g = torch.Generator().manual_seed(0)
    B, P, T = 5, 2, 4
    ids = torch.randint(1, 9, (B, P + T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # a row with nothing in the loss
    w = torch.ones((), requires_grad=True)

    def student_logp(ro, with_entropy=False, temperature=None):
        return -(w * ro.response_ids_BT.float()).sin() ** 2 - 0.1, None

    scorer = SimpleNamespace(student_logp=student_logp)
    results = []
    for tokens in (None, 2 * (P + T)):
        ro = Rollout(input_ids=ids, attention_mask=torch.ones_like(ids), response_start=P, response_mask_BT=mask,
                     old_logp_BT=-torch.rand(B, T, generator=torch.Generator().manual_seed(1)), entropy_BT=None,
                     truncated_B=torch.zeros(B, dtype=torch.bool))
        ro.loss_mask_BT = mask
        ro.advantage_BT = torch.randn(B, T, generator=torch.Generator().manual_seed(2))
        obj = PolicyGradient(reward=None, eps_low=0.2, eps_high=0.2, agg=agg, micro_batch_tokens=tokens) \
            if objective == "policy_gradient" else SupervisedDistillation(agg=agg, micro_batch_tokens=tokens)
        assert len(ro.micro_batches(tokens)) == (1 if tokens is None else 3)
        w.grad = None
        loss, metrics = accumulate(obj, ro, scorer, torch.Tensor.backward)
        results.append((float(loss), float(w.grad), {k: float(v) for k, v in metrics.items()}))
    (whole_loss, whole_grad, whole_metrics), (micro_loss, micro_grad, micro_metrics) = results
    assert micro_loss == pytest.approx(whole_loss, abs=1e-6) and micro_grad == pytest.approx(whole_grad, abs=1e-6)
    assert whole_grad != 0.0
    # per-token metrics (ratio_mean, ppo_clip_frac, approx_kl) weighted by the micro-batches' tokens in the loss
    assert micro_metrics == pytest.approx(whole_metrics, abs=1e-6)


def test_unknown_agg_raises_naming_agg():
    with pytest.raises(ValueError, match="agg"):
        aggregate(torch.zeros(2, 2), torch.ones(2, 2), "token_median")
    with pytest.raises(ValueError, match="agg"):
        policy_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), agg="seq_sum")


def _ragged_reference_loss(logp, old, adv, mask, agg, eps=None):
    """Per-token surrogate on the kept tokens only (Python loops), aggregated by hand."""
    seqs = []
    for b in range(logp.shape[0]):
        toks = []
        for t in range(logp.shape[1]):
            if mask[b, t]:
                rho = torch.exp(logp[b, t] - old[b, t])
                a = adv[b, t]
                tok = -a * rho
                if eps is not None:
                    tok = torch.maximum(tok, -a * rho.clamp(1 - eps, 1 + eps))
                toks.append(tok)
        seqs.append(toks)
    if agg == "token_mean":
        flat = [t for s in seqs for t in s]
        return torch.stack(flat).sum() / len(flat)
    if agg == "seq_mean_token_mean":
        return torch.stack([torch.stack(s).mean() for s in seqs if s]).mean()
    if agg == "seq_mean_token_sum":
        return torch.stack([torch.stack(s).sum() for s in seqs]).mean()
    raise AssertionError(agg)


@pytest.mark.parametrize("eps", [None, 0.2])
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_masked_tokens_never_contribute_to_loss_or_gradient(agg, eps):
    g = _gen(9)
    B, T = 4, 6
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[:, 0] = True  # every row keeps at least one token (keeps "removed" unambiguous for every agg)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    clean_logp = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)

    # poison every masked position of every input
    junk = torch.tensor([math.inf, -math.inf, math.nan, 1e30, -1e30], dtype=torch.float64)
    idx = torch.arange(B * T).view(B, T) % len(junk)
    poison = junk[idx]
    logp = torch.where(mask, clean_logp, poison).requires_grad_(True)
    old_p = torch.where(mask, old, poison.flip(0))
    adv_p = torch.where(mask, adv, poison.flip(1))

    loss, metrics = policy_loss(logp, old_p, adv_p, mask, eps_low=eps, eps_high=eps, agg=agg)
    loss.backward()
    assert torch.isfinite(loss)
    for v in metrics.values():
        assert torch.isfinite(v)
    assert torch.all(logp.grad[~mask] == 0.0)
    assert torch.isfinite(logp.grad).all()

    # equal to the loss (and gradient) with the masked positions removed altogether
    ref_logp = clean_logp.clone().requires_grad_(True)
    ref = _ragged_reference_loss(ref_logp, old, adv, mask, agg, eps)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp.grad, ref_logp.grad, rtol=1e-12, atol=1e-12)


def test_policy_loss_on_policy_value_and_gradient():
    g = _gen(10)
    B, T = 3, 5
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    loss, metrics = policy_loss(logp, logp.detach(), adv, mask)
    n = mask.sum()
    expected = -(adv * mask).sum() / n
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss.detach(), -aggregate(adv, mask, "token_mean"))
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv * mask / n)
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0)
    assert float(metrics["ppo_clip_frac"]) == 0.0
    assert float(metrics["approx_kl"]) == pytest.approx(0.0, abs=1e-12)


def test_policy_loss_off_policy_gradient_is_importance_weighted():
    g = _gen(11)
    old = -torch.rand(2, 4, generator=g, dtype=torch.float64) * 3
    delta = 0.3 * torch.randn(2, 4, generator=g, dtype=torch.float64)
    logp = (old + delta).requires_grad_(True)
    adv = torch.randn(2, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    loss, metrics = policy_loss(logp, old, adv, mask)
    loss.backward()
    rho = delta.exp()
    torch.testing.assert_close(loss.detach(), -(adv * rho).mean())
    torch.testing.assert_close(logp.grad, -adv * rho / 8)
    # k3 KL estimator is non-negative and matches its closed form
    torch.testing.assert_close(metrics["approx_kl"], ((rho - 1) - delta).mean())
    assert float(metrics["approx_kl"]) > 0


@pytest.mark.parametrize(
    "ratio, adv_sign, clipped",
    [
        (1.5, +1.0, True),  # pushing a positive-advantage token further up: clipped
        (0.5, -1.0, True),  # pushing a negative-advantage token further down: clipped
        (1.5, -1.0, False),  # moving back towards the trust region: not clipped
        (0.5, +1.0, False),
        (1.1, +1.0, False),  # inside [0.8, 1.2]
    ],
)
def test_ppo_clip(ratio, adv_sign, clipped):
    B, T = 2, 3
    old = torch.full((B, T), -1.0, dtype=torch.float64)
    logp = (old + math.log(ratio)).requires_grad_(True)
    adv = adv_sign * torch.arange(1, B * T + 1, dtype=torch.float64).view(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    loss, metrics = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    loss.backward()
    if clipped:
        assert torch.all(logp.grad == 0.0)
        assert float(metrics["ppo_clip_frac"]) == 1.0
        clamped = min(max(ratio, 0.8), 1.2)
        torch.testing.assert_close(loss.detach(), -(adv * clamped).mean())
    else:
        assert float(metrics["ppo_clip_frac"]) == 0.0
        torch.testing.assert_close(logp.grad, -adv * ratio / (B * T))
        torch.testing.assert_close(loss.detach(), -(adv * ratio).mean())


def test_ppo_clip_one_sided():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    # only the upper side clips: the ratio-1.5 token (A > 0) is frozen, the ratio-0.5 token (A < 0) is not
    loss, m = policy_loss(logp, old, adv, mask, eps_low=None, eps_high=0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0.0 and logp.grad[0, 1] != 0.0
    assert float(m["ppo_clip_frac"]) == pytest.approx(0.5)


def test_token_nll():
    logp = torch.tensor([[-1.0, -2.0, -50.0], [-4.0, math.nan, math.nan]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(token_nll(logp, mask)) == pytest.approx((1 + 2 + 4) / 3)


# --------------------------------------------------------------------------------------------------
# Generalized JSD (GKD baseline)
# --------------------------------------------------------------------------------------------------


def _rand_logp(N, V, g, scale=2.0):
    return torch.log_softmax(scale * torch.randn(N, V, generator=g, dtype=torch.float64), -1)


def test_generalized_jsd_limits_are_the_kls():
    g = _gen(12)
    s, t = _rand_logp(7, 11, g), _rand_logp(7, 11, g)
    fkl = (t.exp() * (t - s)).sum(-1)  # KL(t || s)
    rkl = (s.exp() * (s - t)).sum(-1)  # KL(s || t)
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), fkl)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), rkl)
    # cross-check against torch's kl_div (target || input)
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), F.kl_div(s, t, log_target=True, reduction="none").sum(-1))
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), F.kl_div(t, s, log_target=True, reduction="none").sum(-1))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_interior_matches_probability_space_formula(beta):
    g = _gen(13)
    s, t = _rand_logp(5, 9, g), _rand_logp(5, 9, g)
    ps, pt = s.exp(), t.exp()
    pm = beta * pt + (1 - beta) * ps
    expected = beta * (pt * (pt / pm).log()).sum(-1) + (1 - beta) * (ps * (ps / pm).log()).sum(-1)
    torch.testing.assert_close(generalized_jsd(s, t, beta), expected, rtol=1e-6, atol=1e-7)
    if beta == 0.5:  # the symmetric JSD, bounded by log 2
        torch.testing.assert_close(generalized_jsd(t, s, beta), generalized_jsd(s, t, beta), rtol=1e-6, atol=1e-7)
        assert torch.all(generalized_jsd(s, t, beta) <= math.log(2) + 1e-9)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_zero_on_equal_and_non_negative(beta):
    g = _gen(14)
    s, t = _rand_logp(16, 13, g), _rand_logp(16, 13, g)
    torch.testing.assert_close(generalized_jsd(s, s.clone(), beta), torch.zeros(16, dtype=s.dtype), atol=1e-6, rtol=0)
    d = generalized_jsd(s, t, beta)
    assert torch.all(d >= -1e-9)
    assert torch.all(d > 1e-4)  # the random pairs really differ


# --------------------------------------------------------------------------------------------------
# Rollout response mask
# --------------------------------------------------------------------------------------------------


def test_response_mask_up_to_and_including_first_eos():
    PAD, EOS = 0, 2
    ids = torch.tensor(
        [
            [5, 6, EOS, PAD, PAD],  # EOS mid-way, then padding
            [5, 6, 7, 8, 9],  # no EOS: truncated
            [EOS, PAD, PAD, PAD, PAD],  # immediate EOS
            [5, 6, 7, 8, EOS],  # EOS in the last column: not truncated
            [5, EOS, 7, EOS, EOS],  # garbage after the first EOS is excluded
        ]
    )
    mask, truncated = response_mask_from_ids(ids, [EOS])
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)
    assert torch.equal(truncated, torch.tensor([False, True, False, False, False]))


def test_response_mask_pad_equal_to_eos_and_multiple_eos_ids():
    # pad token == an EOS id (common for chat models): still stops at the first one
    ids = torch.tensor([[4, 4, 9, 9, 9], [4, 7, 4, 9, 9], [4, 4, 4, 4, 4]])
    mask, truncated = response_mask_from_ids(ids, [9, 7])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert torch.equal(truncated, torch.tensor([False, False, True]))
    # any iterable of ids (a set, a tuple) works the same way
    mask2, trunc2 = response_mask_from_ids(ids, {7, 9})
    assert torch.equal(mask2, expected) and torch.equal(trunc2, truncated)


# --------------------------------------------------------------------------------------------------
# Chunked scorer vs the unchunked reference
# --------------------------------------------------------------------------------------------------


def _scorer_problem(bias=True, seed=15):
    g = _gen(seed)
    B, T, H, V = 3, 5, 8, 13
    hidden = torch.randn(B, T, H, generator=g)
    head = torch.nn.Linear(H, V, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        if bias:
            head.bias.copy_(torch.randn(V, generator=g))
    target = torch.randint(0, V, (B, T), generator=g)
    w = torch.randn(B, T, generator=g)  # arbitrary cotangent for the backward
    return hidden, head, target, w


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 15, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_scorer_matches_reference_values(chunk_size, temperature):
    hidden, head, target, _ = _scorer_problem()
    with torch.no_grad():
        lp, ent = token_logp_entropy(hidden, head, target, temperature=temperature, chunk_size=chunk_size)
        lp_ref, ent_ref = reference_logp_entropy(head(hidden), target, temperature)
    assert lp.shape == ent.shape == target.shape
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=0)
    # the temperature really enters: T=0.6 differs from T=1
    if temperature != 1.0:
        lp1, _ = reference_logp_entropy(head(hidden), target, 1.0)
        assert (lp1 - lp).abs().max() > 1e-2
    _, none = token_logp_entropy(hidden, head, target, temperature=temperature, chunk_size=chunk_size,
                                 with_entropy=False)
    assert none is None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_scorer_gradients_match_reference(chunk_size, temperature, bias):
    hidden0, head, target, w = _scorer_problem(bias=bias)

    hidden = hidden0.clone().requires_grad_(True)
    lp, ent = token_logp_entropy(hidden, head, target, temperature=temperature, chunk_size=chunk_size)
    assert lp.requires_grad and not ent.requires_grad  # the entropy carries no gradient
    (lp * w).sum().backward()
    grads = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    head.zero_grad(set_to_none=True)

    hidden_r = hidden0.clone().requires_grad_(True)
    lp_r, ent_r = reference_logp_entropy(head(hidden_r), target, temperature)
    (lp_r * w).sum().backward()
    grads_r = [hidden_r.grad, head.weight.grad] + ([head.bias.grad] if bias else [])

    torch.testing.assert_close(lp.detach(), lp_r.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_r.detach(), atol=1e-5, rtol=0)
    for a, b in zip(grads, grads_r):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_scorer_nonpositive_chunk_size_behaves_like_one():
    hidden, head, target, _ = _scorer_problem()
    with torch.no_grad():
        lp, ent = token_logp_entropy(hidden, head, target, chunk_size=0)
        lp_ref, ent_ref = reference_logp_entropy(head(hidden), target, 1.0)
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)


def test_chunked_scorer_head_only_gradient():
    """Frozen hidden states (e.g. a LoRA-free head update): gradient still reaches the head."""
    hidden, head, target, w = _scorer_problem(seed=16)
    lp, _ = token_logp_entropy(hidden, head, target, temperature=0.6, chunk_size=4)
    (lp * w).sum().backward()
    g_chunked = head.weight.grad.clone()
    head.zero_grad(set_to_none=True)
    lp_r, _ = reference_logp_entropy(head(hidden), target, 0.6)
    (lp_r * w).sum().backward()
    torch.testing.assert_close(g_chunked, head.weight.grad, atol=1e-5, rtol=1e-5)


def test_generalized_jsd_ignores_zero_probability_entries():
    s = torch.log_softmax(torch.tensor([[0.0, 1.0, -math.inf]]), -1)
    t = torch.log_softmax(torch.tensor([[0.5, 0.2, -math.inf]]), -1)
    for beta in (0.0, 0.3, 1.0):
        v = generalized_jsd(s, t, beta)
        assert torch.isfinite(v).all() and (v >= 0).all()


# ----------------------------------------------------------------------------------------------------------------
# GKD through the Scorer: the full distributions the rollout samples from
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_loss_is_the_generalized_jsd_of_the_sampling_distributions(beta):
    """At the sampling temperature, with the head's bias and without the banned ids (as the rollout samples):
    the objective's loss equals the generalized JSD computed from the models' full logits, whatever the chunking."""
    from lm_fixtures import random_lm, scored_batch

    from src.modules.method.losses import generalized_jsd
    from src.modules.method.objectives import GeneralizedJSD
    from src.modules.rollout.batch import Rollout
    from src.modules.scoring import Scorer

    student, teacher = random_lm("llama"), random_lm("qwen2")
    student.lm_head.bias = torch.nn.Parameter(torch.randn(50))
    ids, mask, P = scored_batch()
    valid = mask[:, P:].bool()
    ro = Rollout(input_ids=ids, attention_mask=mask, response_start=P, response_mask_BT=valid, old_logp_BT=None,
                 entropy_BT=None, truncated_B=torch.zeros(4, dtype=torch.bool))
    banned = torch.tensor([3, 7])
    objective = GeneralizedJSD(beta=beta)
    objective.prepare(ro, None)
    losses = [objective.loss(ro, Scorer(student, teacher, 0.7, chunk, banned_ids=banned))[0] for chunk in (5, 1024)]
    torch.testing.assert_close(losses[0], losses[1])

    def logp(model):
        with torch.no_grad():
            z = model(input_ids=ids, attention_mask=mask).logits[:, P - 1 : -1].float() / 0.7
        z[..., banned] = -float("inf")
        return torch.log_softmax(z, -1)

    want = generalized_jsd(logp(student), logp(teacher), beta)
    want = (want * valid).sum() / valid.sum()
    torch.testing.assert_close(losses[0].detach(), want, atol=1e-4, rtol=1e-4)
