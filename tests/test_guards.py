"""The non-finite guards (``src/modules/guards.py``): a NaN or inf never reaches the weights or a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src.modules.distill import DistillationModule
from src.modules.guards import NonFiniteError, NonFiniteGuard
from src.modules.scoring import Scorer
from src.train import train

# no rollout pages: their extra teacher scoring would shift the calls _nan_teacher_at counts
NO_TEST = ("test=false", "trainer.val_check_interval=100", "callbacks.model_checkpoint.every_n_train_steps=1",
           "callbacks.rollout_viewer=null")


def _nan_teacher_at(monkeypatch, bad_calls: set[int] | None):
    """The teacher's log-probs are NaN on the given calls (None: every call)."""
    real, calls = Scorer.teacher_logp, {"n": 0}

    def teacher_logp(self, ro, *args, **kwargs):
        out = real(self, ro, *args, **kwargs)
        calls["n"] += 1
        if bad_calls is None or calls["n"] - 1 in bad_calls:
            out = out.clone()
            out[0, 0] = float("nan")
        return out

    monkeypatch.setattr(Scorer, "teacher_logp", teacher_logp)


def _student_weights_after_steps(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Record the student's weights after every training step."""
    seen, real = [], DistillationModule.training_step

    def training_step(self, batch, batch_idx):
        out = real(self, batch, batch_idx)
        seen.append({k: v.detach().clone() for k, v in self.student.state_dict().items()})
        return out

    monkeypatch.setattr(DistillationModule, "training_step", training_step)
    return seen


def test_a_nan_teacher_log_prob_stops_the_run_before_the_weights_or_a_checkpoint(make_cfg, monkeypatch):
    _nan_teacher_at(monkeypatch, {1})
    cfg = make_cfg(*NO_TEST)
    with pytest.raises(NonFiniteError, match=r"step 1: the teacher's log-probs hold NaN or inf; nothing of this step "
                                             r"was applied.*module.nonfinite.policy=stop.*model.teacher"):
        train(cfg)
    ckpts = sorted(p.name for p in Path(cfg.paths.output_dir).rglob("*.ckpt"))
    assert ckpts and "step2.ckpt" not in " ".join(ckpts)  # step 1's checkpoint holds step 0's good update only
    for ckpt in Path(cfg.paths.output_dir).rglob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


def test_skip_drops_the_bad_step_and_the_run_goes_on(make_cfg, monkeypatch):
    _nan_teacher_at(monkeypatch, {1})
    seen = _student_weights_after_steps(monkeypatch)
    metrics, obj = train(make_cfg(*NO_TEST, "module.nonfinite.policy=skip"))
    assert obj["trainer"].global_step == 4 and len(seen) == 4
    for k in seen[0]:  # step 1 moved nothing; steps 2 and 3 trained
        assert torch.equal(seen[0][k], seen[1][k]), k
    assert any(not torch.equal(seen[1][k], seen[3][k]) for k in seen[0])
    assert all(torch.isfinite(v).all() for v in seen[-1].values())
    assert metrics["train/skipped_steps"] == 1.0


def test_skip_stops_after_max_skips_bad_steps_in_a_row(make_cfg, monkeypatch):
    _nan_teacher_at(monkeypatch, None)
    with pytest.warns(UserWarning, match="step skipped"), \
            pytest.raises(NonFiniteError, match=r"step 1: .*2 bad steps in a row \(module.nonfinite.max_skips=2\)"):
        train(make_cfg(*NO_TEST, "module.nonfinite.policy=skip", "module.nonfinite.max_skips=2"))


def test_a_non_finite_gradient_is_named_and_never_applied(make_cfg, monkeypatch):
    real = Scorer.student_logp

    def student_logp(self, ro, *args, **kwargs):  # finite values, infinite gradients
        logp, extra = real(self, ro, *args, **kwargs)
        return logp + 0.0 * logp.detach() + (logp - logp.detach()) * float("inf"), extra

    monkeypatch.setattr(Scorer, "student_logp", student_logp)
    seen = _student_weights_after_steps(monkeypatch)
    with pytest.raises(NonFiniteError, match=r"step 0: the (loss|student's gradients) hold NaN or inf"):
        train(make_cfg(*NO_TEST))
    assert not seen  # the step never finished, no weight moved


def test_non_finite_weights_are_refused_at_the_preflight(make_cfg, monkeypatch):
    real = DistillationModule._load

    def load(self, spec, sharded):
        model = real(self, spec, sharded)
        if spec is self.teacher_spec:
            with torch.no_grad():
                next(model.parameters())[0, 0] = float("nan")
        return model

    monkeypatch.setattr(DistillationModule, "_load", load)
    cfg = make_cfg(*NO_TEST)
    with pytest.raises(ValueError, match=r"preflight: model.teacher has non-finite weights in 1 tensor\(s\)"):
        train(cfg)
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))


def test_a_selection_that_keeps_nothing_is_warned_about():
    guard = NonFiniteGuard(warn_empty_steps=2)
    guard.kept_tokens(0, 0)
    with pytest.warns(UserWarning, match="step 1: the token selection kept no response token for 2 steps"):
        guard.kept_tokens(1, 0)
    guard.kept_tokens(2, 5)  # a step that keeps tokens resets the count


@pytest.mark.parametrize("bad, key", [({"policy": "ignore"}, "module.nonfinite.policy"),
                                      ({"max_skips": 0}, "module.nonfinite.max_skips"),
                                      ({"warn_empty_steps": -1}, "module.nonfinite.warn_empty_steps")])
def test_guard_settings_are_checked_by_key(bad, key):
    with pytest.raises(ValueError, match=key):
        NonFiniteGuard(**bad)


def test_a_checkpoint_of_non_finite_weights_is_never_written(make_cfg, monkeypatch):
    real = DistillationModule._update

    def update(self, ro):  # an optimiser step that overflows
        out = real(self, ro)
        if self.trainer.global_step >= 2:
            with torch.no_grad():
                next(self.student.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(DistillationModule, "_update", update)
    cfg = make_cfg(*NO_TEST)
    with pytest.raises(NonFiniteError, match=r"step 2: the student's weights hold NaN or inf in \d+ tensor\(s\).*no "
                                             r"checkpoint is written"):
        train(cfg)
    names = sorted(p.name for p in Path(cfg.paths.output_dir).rglob("*.ckpt"))
    for ckpt in Path(cfg.paths.output_dir).rglob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), names
