"""Exploration-to-refinement phase schedule (paper Sec. 4, Eq. 9 and Eq. 10).

Before ``switch_step`` (counted in rollout steps) the module's token selection is the *exploration*
rule, by default ``RewardFloor(c(lam))``: tokens whose reward would be clipped are dropped, so early
updates are SFT-like and the student's entropy is preserved. From ``switch_step`` on it is the
*refinement* rule (the module's configured selection, by default ``EntropyTopQuantile(0.2)``).

``switch_step`` is an int (rollout steps) or a float in (0, 1) (a fraction of the run's rollout steps;
the paper switches at 150 of 300, i.e. 0.5). The phase is derived from ``trainer.global_step``, which
checkpoints restore, so a resumed run continues in the right phase.
"""

from __future__ import annotations

from lightning import Callback

EXPLORATION, REFINEMENT = 0, 1


class PhaseSchedule(Callback):
    def __init__(self, exploration, switch_step: int | float = 0.5, refinement=None):
        if isinstance(switch_step, float) and not 0.0 <= switch_step <= 1.0:
            raise ValueError(f"callbacks.phase_schedule.switch_step as a fraction must lie in [0, 1], got {switch_step}")
        if isinstance(switch_step, int) and switch_step < 0:
            raise ValueError(f"callbacks.phase_schedule.switch_step must be >= 0, got {switch_step}")
        self.exploration, self.refinement, self.switch_step = exploration, refinement, switch_step
        self.phase = EXPLORATION
        self._resolved: int | None = None  # fixed at the first step and kept across resumes

    def resolved_switch_step(self, trainer, pl_module) -> int:
        """The switch in rollout steps. A fraction is resolved once, against the first run's length, so
        resuming with a longer ``max_steps`` does not move it."""
        if self._resolved is None:
            if isinstance(self.switch_step, int):
                self._resolved = self.switch_step
            else:
                total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 \
                    else trainer.estimated_stepping_batches
                self._resolved = int(round(self.switch_step * total / pl_module.updates_per_rollout))
        return self._resolved

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.refinement is None:
            self.refinement = pl_module.selection

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rollout_step = trainer.global_step // pl_module.updates_per_rollout
        self.phase = EXPLORATION if rollout_step < self.resolved_switch_step(trainer, pl_module) else REFINEMENT
        pl_module.selection = self.exploration if self.phase == EXPLORATION else self.refinement

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log("train/phase", float(self.phase), prog_bar=True)

    def state_dict(self) -> dict:
        return {"phase": self.phase, "switch_step": self.switch_step, "resolved_switch_step": self._resolved}

    def load_state_dict(self, state_dict: dict) -> None:
        self.phase = state_dict.get("phase", EXPLORATION)
        self._resolved = state_dict.get("resolved_switch_step")
