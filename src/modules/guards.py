"""Non-finite guards: a NaN or inf in the rollout's log-probs, the teacher's, the rewards, the loss or the gradients
never reaches the weights or a checkpoint.

Each training step is checked twice, and every data-parallel rank acts on the same verdict (one all-reduce, ``max_over_ranks``):

- after the teacher has scored the rollout: the student's rollout-time log-probs and the teacher's log-probs on the
  response tokens (NaN or +inf; a teacher's -inf, "impossible", is a legal value the reward floor bounds), and the
  advantages the loss will weigh (any non-finite value);
- after the backward, before the optimiser step: the loss and the global gradient norm.

``module.nonfinite.policy`` says what a bad step does: ``stop`` (the default) raises ``NonFiniteError`` naming the
step and the source before anything is applied; ``skip`` drops the step (the optimiser step runs with no gradients,
so no weight and no optimiser state moves, and the step counter, the data stream and the schedule advance as
usual) and stops after ``max_skips`` bad steps in a row. Separately, a selection that keeps no response token for
``warn_empty_steps`` steps in a row is warned about: its updates are zero.
"""

from __future__ import annotations

import warnings

import torch

from src.modules.method.losses import max_over_ranks

# the sources a step is checked for, in the order they are computed (the index is what the ranks agree on)
SOURCES = ("the student's rollout log-probs", "the teacher's log-probs", "the advantages (rewards after clipping)",
           "the loss", "the student's gradients")
POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """A training step produced a NaN or inf, and the policy is to stop."""


def _bad(t: torch.Tensor | None, valid: torch.Tensor, allow_neg_inf: bool = False) -> bool:
    if t is None:
        return False
    x = t[valid] if valid is not None and t.shape == valid.shape else t
    if allow_neg_inf:
        return bool((torch.isnan(x) | (x == float("inf"))).any())
    return not bool(torch.isfinite(x).all())


def nonfinite_tensors(state: dict) -> list[str]:
    """The names of a state dict's floating tensors holding NaN or inf (a sharded tensor: this rank's shard), the
    same list on every data-parallel rank."""
    names, flags = [], []
    for name, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            local = v.to_local() if hasattr(v, "to_local") else v
            if local.device.type != "meta":
                names.append(name)
                flags.append(torch.isfinite(local).all())
    # one host sync for the whole state, not one per tensor (this runs after every optimiser step)
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist() if flags else []
    bad = [name for name, ok in zip(names, finite) if not ok]
    return bad if max_over_ranks(int(bool(bad))) else []


def nonfinite_parameters(model, key: str) -> str | None:
    """A message naming ``model``'s first non-finite weights (meta tensors, not loaded yet, are skipped)."""
    bad = nonfinite_tensors(dict(model.named_parameters()))
    if not bad:
        return None
    return f"{key} has non-finite weights in {len(bad)} tensor(s), e.g. {bad[:3]}: the checkpoint is corrupt or was " \
           f"saved from a run that diverged"


class NonFiniteGuard:
    """Args (``module.nonfinite``):
        policy: ``stop`` or ``skip`` (see the module docstring).
        max_skips: under ``skip``, the run stops at this many bad steps in a row.
        warn_empty_steps: warn when the token selection keeps nothing for this many steps in a row (0: never).
    """

    def __init__(self, policy: str = "stop", max_skips: int = 3, warn_empty_steps: int = 3):
        if policy not in POLICIES:
            raise ValueError(f"module.nonfinite.policy must be one of {POLICIES}, got {policy!r}")
        if int(max_skips) < 1:
            raise ValueError(f"module.nonfinite.max_skips must be at least 1, got {max_skips}")
        if int(warn_empty_steps) < 0:
            raise ValueError(f"module.nonfinite.warn_empty_steps must be 0 (never) or more, got {warn_empty_steps}")
        self.policy, self.max_skips, self.warn_empty_steps = policy, int(max_skips), int(warn_empty_steps)
        self.skipped_in_a_row = self.skipped = self.empty_in_a_row = 0

    def rollout_source(self, ro) -> str | None:
        """The first non-finite source of a prepared rollout, agreed over the ranks (None: all finite)."""
        valid = ro.response_mask_BT
        code = 0
        for i, (t, neg_inf_ok) in enumerate(((ro.old_logp_BT, False), (ro.teacher_logp_BT, True),
                                             (ro.advantage_BT, False))):
            if _bad(t, valid, allow_neg_inf=neg_inf_ok):
                code = i + 1
                break
        code = max_over_ranks(code)
        return SOURCES[code - 1] if code else None

    def update_source(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> str | None:
        """``the loss`` or ``the student's gradients`` when either is non-finite, agreed over the ranks."""
        code = 0
        if not bool(torch.isfinite(loss).all()):
            code = SOURCES.index("the loss") + 1
        elif grad_norm is not None and not bool(torch.isfinite(torch.as_tensor(grad_norm)).all()):
            code = SOURCES.index("the student's gradients") + 1
        code = max_over_ranks(code)
        return SOURCES[code - 1] if code else None

    def bad_step(self, step: int, source: str, can_skip: bool = True) -> None:
        """Stop (``stop``, the ``max_skips``-th bad step in a row, or a strategy that cannot drop a step) or count a
        skipped step. ``can_skip`` False: DeepSpeed, whose engine keeps the gradients and steps on its own."""
        what = f"step {step}: {source} hold NaN or inf; nothing of this step was applied to the weights"
        if self.policy == "stop":
            raise NonFiniteError(f"{what}. The run stops (module.nonfinite.policy=stop; =skip drops such steps). "
                                 f"{self._hint(source)}")
        if not can_skip:
            raise NonFiniteError(f"{what}. The run stops: DeepSpeed's engine cannot drop a step "
                                 f"(module.nonfinite.policy=skip needs another strategy). {self._hint(source)}")
        self.skipped += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.max_skips:
            raise NonFiniteError(f"{what}; that is {self.skipped_in_a_row} bad steps in a row "
                                 f"(module.nonfinite.max_skips={self.max_skips}): the run stops. {self._hint(source)}")
        warnings.warn(f"{what}: step skipped ({self.skipped_in_a_row} in a row, {self.skipped} in all)", stacklevel=2)

    def good_step(self) -> None:
        self.skipped_in_a_row = 0

    def summary(self, steps: int) -> None:
        """At the end of training: say how many steps were skipped; a run that skipped every step failed."""
        if not self.skipped:
            return
        if self.skipped >= steps:
            raise NonFiniteError(f"every one of the {steps} training steps was skipped (module.nonfinite.policy=skip): "
                                 f"the student never changed. See the warnings for the step and source")
        warnings.warn(f"{self.skipped} of {steps} training steps were skipped for NaN or inf (module.nonfinite)",
                      stacklevel=2)

    def kept_tokens(self, step: int, kept: int) -> None:
        """Count steps whose selection kept no token; warn once they reach ``warn_empty_steps`` in a row."""
        self.empty_in_a_row = self.empty_in_a_row + 1 if kept == 0 else 0
        if self.warn_empty_steps and self.empty_in_a_row == self.warn_empty_steps:
            warnings.warn(f"step {step}: the token selection kept no response token for {self.empty_in_a_row} steps "
                          f"in a row, so these updates changed nothing (is every reward below the clipping floor, or "
                          f"NaN? check train/kept_frac, train/reward_mean)", stacklevel=2)

    @staticmethod
    def _hint(source: str) -> str:
        if source == "the teacher's log-probs":
            return "Check the teacher's weights and dtype (model.teacher)."
        if source == "the student's rollout log-probs":
            return "Check the student's weights and dtype (model.student)."
        return "Lower module.optimizer.lr, set module.grad_clip, or check the reward (reward=, clipping=)."
