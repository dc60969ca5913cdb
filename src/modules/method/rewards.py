"""Token rewards (paper Sec. 1 and the GRPO baseline).

On-policy distillation is policy optimisation with the per-token reward

    R[i,t] = log pi_t(o[i,t] | q, o[i,<t]) - log pi_s(o[i,t] | q, o[i,<t])

treated as a constant (stop-gradient). Its expectation under the student is minus the reverse KL,
so maximising it minimises KL(pi_s || pi_t).

The GRPO baseline replaces it with a verifiable outcome reward, normalised within each group of
``G`` samples of the same prompt and broadcast to every response token.

Every reward component is a callable ``(ro: Rollout) -> reward_BT`` (no gradient).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def log_ratio_reward(teacher_logp_BT: torch.Tensor, student_logp_BT: torch.Tensor) -> torch.Tensor:
    """``R = logp_teacher - logp_student`` per sampled token, detached.

    Args:
        teacher_logp_BT: teacher log-probability of each sampled token, [B, T].
        student_logp_BT: student (rollout-time) log-probability of the same tokens, [B, T].
    Returns:
        reward_BT, float32, [B, T], carrying no gradient.
    """
    return (teacher_logp_BT.detach().float() - student_logp_BT.detach().float())


class LogRatioReward:
    """The paper's distillation reward; needs the teacher's log-probs of the sampled tokens."""

    needs_teacher = True

    def __call__(self, batch) -> torch.Tensor:
        return log_ratio_reward(batch.teacher_logp_BT, batch.old_logp_BT) * batch.response_mask_BT


def group_normalise(score_B: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True):
    """GRPO advantage: ``(s - mean_group) / (std_group + eps)``; rows ``[g*G:(g+1)*G]`` form a group."""
    if score_B.numel() % group_size:
        raise ValueError(f"batch of {score_B.numel()} responses is not a whole number of groups of {group_size}")
    s_NG = score_B.float().view(-1, group_size)
    adv_NG = s_NG - s_NG.mean(dim=1, keepdim=True)
    if scale:
        std_NG = s_NG.std(dim=1, keepdim=True, unbiased=False) if group_size > 1 else torch.ones_like(s_NG)
        adv_NG = adv_NG / (std_NG + eps)
    return adv_NG.view(-1)


class OutcomeReward:
    """Verifiable task reward for the GRPO baseline, group-normalised per prompt.

    Args:
        grader: ``(response: str, reference: str) -> float`` (e.g. 1.0 when the answer is right:
            ``src.modules.evaluation.grading.is_correct``, as ``configs/reward/outcome.yaml`` sets).
        scale: divide by the group's standard deviation (GRPO); False gives Dr. GRPO's mean-only centring.
    """

    needs_teacher = False

    def __init__(self, grader: Callable[[str, str], float], scale: bool = True):
        self.grader = grader
        self.scale = scale

    def scores(self, responses: Sequence[str], references: Sequence[str]) -> torch.Tensor:
        return torch.tensor([float(self.grader(r, ref)) for r, ref in zip(responses, references)])

    def __call__(self, batch) -> torch.Tensor:
        score_B = self.scores(batch.response_texts, batch.references).to(batch.response_mask_BT.device)
        batch.metrics["outcome_mean"] = score_B.mean()
        adv_B = group_normalise(score_B, batch.group_size, scale=self.scale)
        return adv_B[:, None] * batch.response_mask_BT
