"""Exact-gradient oracle for the on-policy distillation surrogate (paper Sec. 1, Eq. 4).

A tiny autoregressive "student" and "teacher" over V = 3 tokens with horizon T = 3: all V**T = 27
responses can be enumerated, so the reverse KL and its gradient are known exactly:

    KL(pi_s || pi_t) = sum_o pi_s(o) * (log pi_s(o) - log pi_t(o))

The project's estimator samples o ~ pi_s, forms the per-token reward
``R_t = log pi_t(o_t|o_<t) - log pi_s(o_t|o_<t)`` (``log_ratio_reward``, detached) and minimises
``policy_loss(logp, sg(logp), A, mask=1, agg="seq_mean_token_sum")``, whose gradient is
``-mean_i sum_t A[i,t] * grad log pi_s(o[i,t]|o[i,<t])``.

Which advantage ``A`` gives which gradient (score-function identity, E[grad log pi_s] = 0):

* ``A_t = sum_{t'} R_t'`` (full return) and ``A_t = sum_{t' >= t} R_t'`` (reward-to-go, dropping the
  zero-mean past terms by causality) are unbiased for ``+grad KL(pi_s || pi_t)``: minimising the
  surrogate descends the reverse KL.
* ``A_t = R_t`` (the sampled-token OPD form the paper's Eq. 4 uses, no reward-to-go) ignores how an
  early token changes the prefixes -- and so the rewards -- of later steps. Its expectation is the
  gradient of ``sum_t E_{o_<t ~ sg(pi_s)} KL(pi_s(.|o_<t) || pi_t(.|o_<t))``, the per-step KLs with
  the prefix distribution held fixed: the biased-but-lower-variance estimator. For T = 1 it is the
  exact reverse-KL gradient; for T > 1 it is not (checked below, so the distinction is real).

Each claim is checked twice: exactly (the expectation over all 27 responses taken *through*
``policy_loss`` by weighting each response by its probability) and by Monte Carlo (vectorised
sampling from the student, cosine > 0.99 and relative error < 5%, and within 5 standard errors
computed by enumeration). A sign flip of the reward or a wrong advantage makes these fail.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from src.modules.method.losses import policy_loss
from src.modules.method.rewards import log_ratio_reward

DT = torch.float64
V = 3


# --------------------------------------------------------------------------------------------------
# Tiny autoregressive policies. Each exposes ``tables()``: a list over steps t of the conditional
# log-probability table [V**t, V], row = base-V code of the prefix o_<t (most significant first).
# --------------------------------------------------------------------------------------------------


class TabularPolicy(torch.nn.Module):
    def __init__(self, T: int, seed: int, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.nn.ParameterList(
            [torch.nn.Parameter(scale * torch.randn(V**t, V, generator=g, dtype=DT)) for t in range(T)]
        )

    def tables(self):
        return [torch.log_softmax(th, dim=-1) for th in self.theta]


class PrefixMLPPolicy(torch.nn.Module):
    """Shared parameters across steps: one-hot prefix + step one-hot -> tanh MLP -> logits."""

    def __init__(self, T: int, seed: int, hidden: int = 16, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.T = T
        d_in = T * V + T
        self.w1 = torch.nn.Parameter(scale * torch.randn(hidden, d_in, generator=g, dtype=DT))
        self.b1 = torch.nn.Parameter(0.1 * torch.randn(hidden, generator=g, dtype=DT))
        self.w2 = torch.nn.Parameter(scale * torch.randn(V, hidden, generator=g, dtype=DT) / hidden**0.5 * 2)
        self.b2 = torch.nn.Parameter(0.1 * torch.randn(V, generator=g, dtype=DT))

    def tables(self):
        out = []
        for t in range(self.T):
            pre = all_sequences(t)  # [V**t, t]
            x = torch.zeros(V**t, self.T * V + self.T, dtype=DT)
            for j in range(t):
                x[torch.arange(V**t), j * V + pre[:, j]] = 1.0
            x[:, self.T * V + t] = 1.0
            h = torch.tanh(x @ self.w1.T + self.b1)
            out.append(torch.log_softmax(h @ self.w2.T + self.b2, dim=-1))
        return out


POLICIES = {"tabular": TabularPolicy, "mlp": PrefixMLPPolicy}


pytestmark = pytest.mark.usefixtures("single_thread")


def all_sequences(t: int) -> torch.Tensor:
    """All V**t token sequences of length t in base-V order, [V**t, t] (t = 0 gives one empty row)."""
    return torch.tensor(list(itertools.product(range(V), repeat=t)), dtype=torch.long).view(V**t, t)


def prefix_code(o_NT: torch.Tensor, t: int) -> torch.Tensor:
    code = torch.zeros(o_NT.shape[0], dtype=torch.long)
    for j in range(t):
        code = code * V + o_NT[:, j]
    return code


def token_logp(tables, o_NT: torch.Tensor) -> torch.Tensor:
    """log pi(o_t | o_<t) for every position of (possibly partial) sequences, [N, t]."""
    cols = [tables[t][prefix_code(o_NT, t), o_NT[:, t]] for t in range(o_NT.shape[1])]
    return torch.stack(cols, dim=1) if cols else torch.zeros(o_NT.shape[0], 0, dtype=DT)


def sample(tables, N: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Ancestral sampling from the (detached) conditionals, vectorised over N sequences."""
    o = torch.zeros(N, 0, dtype=torch.long)
    for t in range(T):
        probs = tables[t].detach().exp()[prefix_code(o, t)]
        o = torch.cat([o, torch.multinomial(probs, 1, replacement=True, generator=gen)], dim=1)
    return o


# --------------------------------------------------------------------------------------------------
# Oracles (exact, by enumeration)
# --------------------------------------------------------------------------------------------------


def flat_grad(scalar, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, params)])


def exact_reverse_kl(student, teacher) -> torch.Tensor:
    T = len(teacher.theta)
    o = all_sequences(T)
    seq_s = token_logp(student.tables(), o).sum(-1)
    with torch.no_grad():
        seq_t = token_logp(teacher.tables(), o).sum(-1)
    return (seq_s.exp() * (seq_s - seq_t)).sum()


def exact_stepwise_kl_fixed_prefix(student, teacher) -> torch.Tensor:
    """sum_t E_{o_<t ~ sg(pi_s)} KL(pi_s(.|o_<t) || pi_t(.|o_<t)), prefix probabilities detached."""
    T = len(teacher.theta)
    s_tab = student.tables()
    with torch.no_grad():
        t_tab = teacher.tables()
    total = torch.zeros((), dtype=DT)
    for t in range(T):
        pre = all_sequences(t)
        with torch.no_grad():
            p_prefix = token_logp(s_tab, pre).sum(-1).exp()  # [V**t], detached
        kl_rows = (s_tab[t].exp() * (s_tab[t] - t_tab[t])).sum(-1)  # [V**t]
        total = total + (p_prefix * kl_rows).sum()
    return total


# --------------------------------------------------------------------------------------------------
# The project's estimator
# --------------------------------------------------------------------------------------------------


def advantage(R_NT: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "per_token":  # sampled-token OPD: A_t = R_t
        return R_NT
    if kind == "reward_to_go":  # A_t = sum_{t' >= t} R_t'
        return R_NT.flip(-1).cumsum(-1).flip(-1)
    if kind == "full_return":  # A_t = sum_t' R_t'
        return R_NT.sum(-1, keepdim=True).expand_as(R_NT)
    raise AssertionError(kind)


def surrogate_loss(student, teacher, o_NT, kind, weight_N=None, reward_sign=1.0, agg="seq_mean_token_sum"):
    """The project's loss on sequences o_NT. ``weight_N`` (detached) reweights each sequence's advantage."""
    logp = token_logp(student.tables(), o_NT)
    with torch.no_grad():
        teacher_logp = token_logp(teacher.tables(), o_NT)
    R = reward_sign * log_ratio_reward(teacher_logp, logp)
    A = advantage(R, kind)
    if weight_N is not None:
        A = A * weight_N[:, None]
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss, _ = policy_loss(logp, logp.detach(), A, mask, agg=agg)
    return loss


def expected_surrogate_grad(student, teacher, kind, agg="seq_mean_token_sum", reward_sign=1.0) -> torch.Tensor:
    """E_{o ~ pi_s}[grad of the surrogate], exactly: every response, weighted by N * pi_s(o)."""
    T = len(teacher.theta)
    o = all_sequences(T)
    with torch.no_grad():
        p = token_logp(student.tables(), o).sum(-1).exp()
    loss = surrogate_loss(student, teacher, o, kind, weight_N=p * o.shape[0], reward_sign=reward_sign, agg=agg)
    return flat_grad(loss, list(student.parameters()))


def per_sample_grad_cov_trace(student, teacher, kind) -> float:
    """trace Cov_o[g(o)] of the single-sample surrogate gradient, by enumeration (for the MC error bar)."""
    T = len(teacher.theta)
    o = all_sequences(T)
    with torch.no_grad():
        p = token_logp(student.tables(), o).sum(-1).exp()
    params = list(student.parameters())
    G = torch.stack([flat_grad(surrogate_loss(student, teacher, o[i : i + 1], kind), params) for i in range(len(o))])
    mean = (p[:, None] * G).sum(0)
    return float((p * ((G - mean) ** 2).sum(-1)).sum())


def make_pair(policy: str, T: int, seed: int = 0):
    student = POLICIES[policy](T, seed=seed + 1)
    teacher = TabularPolicy(T, seed=seed + 2, scale=1.5)
    for q in teacher.parameters():
        q.requires_grad_(False)
    return student, teacher


def cos(a, b) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def rel_err(est, ref) -> float:
    return float((est - ref).norm() / ref.norm())


# --------------------------------------------------------------------------------------------------
# Exact checks: the expectation taken through ``policy_loss`` over all 27 responses
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["tabular", "mlp"])
@pytest.mark.parametrize("kind", ["reward_to_go", "full_return"])
def test_expected_surrogate_gradient_equals_reverse_kl_gradient(policy, kind):
    student, teacher = make_pair(policy, T=3)
    params = list(student.parameters())
    kl = exact_reverse_kl(student, teacher)
    assert float(kl.detach()) > 0.1  # the two policies really differ
    g_kl = flat_grad(kl, params)
    g_est = expected_surrogate_grad(student, teacher, kind)
    # the reward goes through float32 in log_ratio_reward, hence ~1e-6 and not 1e-12
    assert rel_err(g_est, g_kl) < 1e-5
    torch.testing.assert_close(g_est, g_kl, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("policy", ["tabular", "mlp"])
def test_expected_per_token_gradient_is_stepwise_kl_gradient_not_reverse_kl(policy):
    student, teacher = make_pair(policy, T=3)
    params = list(student.parameters())
    g_step = flat_grad(exact_stepwise_kl_fixed_prefix(student, teacher), params)
    g_kl = flat_grad(exact_reverse_kl(student, teacher), params)
    g_est = expected_surrogate_grad(student, teacher, "per_token")
    torch.testing.assert_close(g_est, g_step, atol=1e-6, rtol=1e-5)
    # for T > 1 the sampled-token (per-token) estimator is biased for grad KL: the bias is not small
    assert rel_err(g_step, g_kl) > 0.1
    # the paper's aggregation (token mean over the batch) is the same direction scaled by 1 / T
    g_tm = expected_surrogate_grad(student, teacher, "per_token", agg="token_mean")
    torch.testing.assert_close(g_tm * 3, g_step, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("policy", ["tabular", "mlp"])
def test_per_token_estimator_is_exact_at_horizon_one(policy):
    student, teacher = make_pair(policy, T=1)
    params = list(student.parameters())
    g_kl = flat_grad(exact_reverse_kl(student, teacher), params)
    g_step = flat_grad(exact_stepwise_kl_fixed_prefix(student, teacher), params)
    torch.testing.assert_close(g_step, g_kl, atol=1e-12, rtol=1e-12)
    for kind in ("per_token", "reward_to_go", "full_return"):
        torch.testing.assert_close(expected_surrogate_grad(student, teacher, kind), g_kl, atol=1e-6, rtol=1e-5)


def test_exact_check_detects_a_sign_flip():
    student, teacher = make_pair("tabular", T=3)
    g_kl = flat_grad(exact_reverse_kl(student, teacher), list(student.parameters()))
    g_flip = expected_surrogate_grad(student, teacher, "reward_to_go", reward_sign=-1.0)
    assert cos(g_flip, g_kl) < -0.999


# --------------------------------------------------------------------------------------------------
# Monte Carlo: sampled from the student, as in training
# --------------------------------------------------------------------------------------------------

N_MC = 200_000


def _mc_grad(student, teacher, T, kind, seed, reward_sign=1.0):
    o = sample(student.tables(), N_MC, T, torch.Generator().manual_seed(seed))
    loss = surrogate_loss(student, teacher, o, kind, reward_sign=reward_sign)
    return flat_grad(loss, list(student.parameters()))


@pytest.mark.parametrize("policy", ["tabular", "mlp"])
@pytest.mark.parametrize(
    "kind, target",
    [("reward_to_go", "reverse_kl"), ("full_return", "reverse_kl"), ("per_token", "stepwise_kl")],
)
def test_monte_carlo_surrogate_gradient_matches_oracle(policy, kind, target):
    T = 3
    student, teacher = make_pair(policy, T=T)
    params = list(student.parameters())
    oracle = exact_reverse_kl if target == "reverse_kl" else exact_stepwise_kl_fixed_prefix
    g_ref = flat_grad(oracle(student, teacher), params)
    g_mc = _mc_grad(student, teacher, T, kind, seed=1234)

    # error bar: standard error of the N-sample mean, from the exact per-sample gradient covariance
    se = (per_sample_grad_cov_trace(student, teacher, kind) / N_MC) ** 0.5
    err = float((g_mc - g_ref).norm())
    assert err < 5 * se, f"MC error {err:.4g} exceeds 5 standard errors ({se:.4g})"
    assert cos(g_mc, g_ref) > 0.99
    assert rel_err(g_mc, g_ref) < 0.05

    # minimising the surrogate descends the target objective (first-order): a small step lowers it
    with torch.no_grad():
        before = float(oracle(student, teacher))
        for q, gq in zip(params, torch.split(g_mc, [q.numel() for q in params])):
            q -= 1e-2 * gq.view_as(q)
        after = float(oracle(student, teacher))
    assert after < before


def test_monte_carlo_sign_flip_fails_the_oracle():
    T = 3
    student, teacher = make_pair("tabular", T=T)
    g_kl = flat_grad(exact_reverse_kl(student, teacher), list(student.parameters()))
    g_flip = _mc_grad(student, teacher, T, "reward_to_go", seed=1234, reward_sign=-1.0)
    assert cos(g_flip, g_kl) < -0.99
    assert rel_err(g_flip, g_kl) > 1.5


def test_monte_carlo_per_token_does_not_match_reverse_kl_at_t3():
    """The MC check is sharp enough to see the per-token estimator's bias for T > 1."""
    T = 3
    student, teacher = make_pair("tabular", T=T)
    g_kl = flat_grad(exact_reverse_kl(student, teacher), list(student.parameters()))
    g_pt = _mc_grad(student, teacher, T, "per_token", seed=1234)
    assert rel_err(g_pt, g_kl) > 0.3  # ~0.67 here, while the MC error is ~0.01
