"""End to end through ``train(cfg)`` on tiny models: concrete effects, resume, phases."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from src.train import train


def _csv_rows(out_dir: str) -> list[dict]:
    path = next(Path(out_dir).rglob("metrics.csv"))
    with path.open() as f:
        return list(csv.DictReader(f))


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_reopold_end_to_end(make_cfg):
    cfg = make_cfg("callbacks.phase_schedule.switch_step=2")
    metrics, obj = train(cfg)
    module = obj["module"]

    initial_student = module.student_spec.load_model()
    changed = [k for k, v in _params(module.student).items() if not torch.equal(v, initial_student.state_dict()[k])]
    assert changed, "the student's weights did not change"

    fresh_teacher = module.teacher_spec.load_model()
    for k, v in fresh_teacher.state_dict().items():
        assert torch.equal(module.teacher.state_dict()[k], v), f"teacher weight {k} changed"
    assert not module.teacher.training and all(not m.training for m in module.teacher.modules())
    assert not any(p.requires_grad for p in module.teacher.parameters())

    rows = _csv_rows(cfg.paths.output_dir)
    phases = {int(r["step"]): float(r["train/phase"]) for r in rows if r.get("train/phase")}
    assert phases, "train/phase was not logged"
    # the CSV's step is the rollout step the row belongs to: 0, 1 explore; 2, 3 refine
    assert phases == {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}, phases
    # per-step counts: the exploration rule keeps tokens before the switch, the entropy rule after, with its threshold
    counted = {int(r["step"]): r for r in rows if r.get("train/tokens_kept_entropy")}
    for step, r in counted.items():
        exploring = step < 2
        assert (float(r["train/tokens_kept_exploration"]) > 0) == exploring or float(r["train/kept_frac"]) == 0
        assert (float(r["train/tokens_kept_entropy"]) > 0) == (not exploring)
        assert math.isnan(float(r["train/entropy_threshold"])) == exploring
        assert float(r["train/tokens_clipped"]) >= 0
    for key in ("train/reward_mean", "train/clip_frac", "train/kept_frac", "train/entropy", "train/response_len",
                "train/truncation_rate", "train/rev_kl", "train/rollout_tok_per_s", "train/train_tok_per_s",
                "train/step_s"):
        assert any(r.get(key) for r in rows), f"{key} never logged"
    assert "test/arithmetic/acc" in metrics and 0.0 <= metrics["test/arithmetic/acc"] <= 1.0
    hf = Path(cfg.paths.output_dir) / "checkpoints" / "hf" / "final"
    assert (hf / "config.json").exists() and (hf / "tokenizer_config.json").exists()
    reloaded = type(module.student).from_pretrained(hf)
    assert all(torch.equal(v, module.student.state_dict()[k]) for k, v in reloaded.state_dict().items())


def test_resume_matches_uninterrupted(make_cfg, tmp_path):
    common = ["callbacks.phase_schedule.switch_step=2", "callbacks.model_checkpoint.every_n_train_steps=2",
              "test=false", "trainer.val_check_interval=100"]
    full_metrics, full = train(make_cfg(*common, "trainer.max_steps=4"))

    first = make_cfg(*common, "trainer.max_steps=2")
    first.paths.output_dir = str(Path(first.paths.log_dir) / first.task_name / "runs" / "interrupted")
    train(first)
    ckpt = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert not any(k.startswith("teacher.") for k in state["state_dict"]), "teacher weights leaked into checkpoint"

    resumed_cfg = make_cfg(*common, "trainer.max_steps=4", "ckpt_path=last")  # newest last.ckpt: `first`'s
    resumed_cfg.paths.output_dir = str(tmp_path / "resumed")
    _, resumed = train(resumed_cfg)
    assert resumed["trainer"].global_step == 4
    phase_cb = next(c for c in resumed["trainer"].callbacks if type(c).__name__ == "PhaseSchedule")
    assert phase_cb.phase == 1
    a, b = full["module"].student.state_dict(), resumed["module"].student.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs after resume")


def test_eval_entry_point_scores_a_trained_checkpoint(make_cfg):
    from src.eval import evaluate

    cfg = make_cfg("test=false", "trainer.max_steps=2")
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    hf_dir = Path(cfg.paths.output_dir) / "checkpoints" / "hf" / "final"
    ev = make_cfg("model=pretrained", f"model.student.path={hf_dir}", "model.student.dtype=float32", config="eval")
    metrics, _ = evaluate(ev)
    assert 0.0 <= metrics["test/arithmetic/acc"] <= 1.0
    ev_ckpt = make_cfg(f"ckpt_path={ckpt}", config="eval")
    metrics_ckpt, obj = evaluate(ev_ckpt)
    assert metrics_ckpt["test/arithmetic/acc"] == metrics["test/arithmetic/acc"]


def test_several_ppo_updates_per_rollout(make_cfg):
    cfg = make_cfg("objective.epochs=2", "objective.minibatches=2", "objective.eps_low=0.2", "objective.eps_high=0.2",
                   "trainer.max_steps=8", "callbacks.phase_schedule.switch_step=1", "test=false")
    metrics, obj = train(cfg)
    assert obj["module"].updates_per_rollout == 4 and obj["trainer"].global_step == 8
    rows = _csv_rows(cfg.paths.output_dir)
    # 8 optimiser steps = 2 rollout steps; the phase counts rollout steps, so it flips for the second one
    assert sorted({float(r["train/phase"]) for r in rows if r.get("train/phase")}) == [0.0, 1.0]
    assert any(r.get("train/ppo_clip_frac") for r in rows)


def test_validate_before_training_then_fit(make_cfg):
    """validate() before fit() must leave the metric states usable (no inference-mode tensors)."""
    cfg = make_cfg("validate_before=true", "test=false")
    train(cfg)
    steps = [int(r["step"]) for r in _csv_rows(cfg.paths.output_dir) if r.get("val/arithmetic/acc")]
    assert steps[0] == 0 and len(steps) == 3  # before training, then after batches 2 and 4


def _tiny_module(tie: bool):
    from types import SimpleNamespace

    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=tie)
    module = torch.nn.Module()
    module.student, module.teacher = Qwen2ForCausalLM(cfg), torch.nn.Linear(2, 2).requires_grad_(False)
    module.processor = SimpleNamespace(save_pretrained=lambda out: (Path(out) / "processor").touch())
    return module


def _trainer(strategy, rank0: bool):
    from types import SimpleNamespace

    barriers = []
    strategy.barrier = lambda name=None: barriers.append(name)
    return SimpleNamespace(strategy=strategy, is_global_zero=rank0, global_step=3), barriers


def test_hf_export_is_collective_and_written_by_rank_zero(tmp_path, monkeypatch):
    """Every rank gathers (a sharded strategy needs them all) and waits at a barrier; rank 0 alone writes, once
    per step. ZeRO-3: every rank enters DeepSpeed's gathering context and the weights are read inside it."""
    from types import SimpleNamespace

    import deepspeed
    from transformers import Qwen2ForCausalLM

    from src.callbacks.hf_export import HFExport, student_state_dict

    module = _tiny_module(tie=True)
    own = module.student.state_dict()
    entered, inside = [], []

    class Gathered:  # records who entered, and whether the state dict was read inside the context
        def __init__(self, params, modifier_rank=None):
            entered.append(len(params))

        def __enter__(self):
            inside.append(True)

        def __exit__(self, *exc):
            inside.append(False)

    real_state_dict = module.student.state_dict
    module.student.state_dict = lambda *a, **k: (inside and inside[-1] or pytest.fail("read outside")) and real_state_dict(*a, **k)
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", Gathered)
    for rank0 in (False, True):
        sd = student_state_dict(_trainer(SimpleNamespace(zero_stage_3=True), rank0)[0], module)
        assert (sd is None) != rank0
    assert entered == [len(list(module.student.parameters()))] * 2  # rank 1 gathered too
    assert sd.keys() == own.keys() and all(torch.equal(v, own[k]) for k, v in sd.items())
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]  # tied again: written once
    module.student.state_dict = real_state_dict

    export = HFExport(dirpath=str(tmp_path), on_checkpoint=True)
    trainer, barriers = _trainer(SimpleNamespace(), rank0=False)
    export.on_save_checkpoint(trainer, module, {})
    assert barriers == ["hf_export"] and not (tmp_path / "step_3").exists()
    trainer, barriers = _trainer(SimpleNamespace(), rank0=True)
    export._exported_step = None
    export.on_save_checkpoint(trainer, module, {})
    export.on_save_checkpoint(trainer, module, {})  # the "last" checkpoint of the same step
    assert barriers == ["hf_export"]
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path / "step_3")
    assert all(torch.equal(v, own[k]) for k, v in reloaded.state_dict().items())
    assert (tmp_path / "step_3" / "processor").exists()
    # an export of a name that exists (a resumed run's final) replaces it whole, through a folder beside it
    (tmp_path / "step_3" / "stale.bin").write_bytes(b"x")
    export.export(trainer, module, "step_3")
    assert not (tmp_path / "step_3" / "stale.bin").exists() and (tmp_path / "step_3" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3"]  # nothing half-written or set aside is left


def test_hf_export_gathers_an_fsdp_student(tmp_path):
    """The FSDP branch with a real FullyShardedDataParallel (one CPU process, gloo): the student's own keys and
    values, not the teacher's, tied weights as one tensor."""
    import torch.distributed as dist
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from src.callbacks.hf_export import student_state_dict

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        module = _tiny_module(tie=True)
        own = {k: v.clone() for k, v in module.student.state_dict().items()}
        strategy = FSDPStrategy()
        strategy.model = FullyShardedDataParallel(module, auto_wrap_policy=ModuleWrapPolicy({Qwen2DecoderLayer}),
                                                  device_id=torch.device("cpu"), use_orig_params=True)
        sd = student_state_dict(_trainer(strategy, rank0=True)[0], module)
    finally:
        dist.destroy_process_group()
    assert sd.keys() == own.keys() and all(torch.equal(sd[k], own[k]) for k in own)
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]


def test_bf16_mixed_clips_gradients_with_the_fused_optimizer(make_cfg, monkeypatch):
    """Lightning's mixed-precision plugin refuses to clip for fused optimisers (the default AdamW); bf16-mixed
    scales nothing, so the module clips directly. Found on a GPU run: ``trainer=gpu`` is bf16-mixed."""
    calls = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfg = make_cfg("trainer.precision=bf16-mixed", "trainer.max_steps=2", "trainer.val_check_interval=2",
                   "module.grad_clip=0.5", "test=false")
    assert cfg.module.optimizer.fused
    _, obj = train(cfg)
    assert obj["trainer"].global_step == 2 and calls == [0.5, 0.5]


def _clip_case(plugin, fused: bool = True):
    """A DistillationModule with a fake trainer, and a fused AdamW over one parameter holding a gradient of norm
    200 (times the scaler's scale, where there is one)."""
    from types import SimpleNamespace

    from lightning import LightningModule

    from src.modules.distill import DistillationModule

    module = DistillationModule.__new__(DistillationModule)  # the method under test needs no models
    LightningModule.__init__(module)
    module.grad_clip = 1.0
    w = torch.nn.Parameter(torch.zeros(4))
    scale = 1.0
    if getattr(plugin, "scaler", None) is not None:
        plugin.scaler.scale(torch.ones(()))  # as the backward's loss scaling does: the scale comes to exist
        scale = plugin.scaler.get_scale()
    w.grad = torch.full((4,), 100.0 * scale)
    opt = torch.optim.AdamW([w], fused=fused)
    module._trainer = SimpleNamespace(precision_plugin=plugin)
    return module, opt, w


def test_fp16_mixed_unscales_before_clipping_with_the_fused_optimizer():
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    module, opt, w = _clip_case(plugin)
    torch.testing.assert_close(module._clip_gradients(opt), torch.tensor(200.0))  # the unscaled norm
    torch.testing.assert_close(w.grad.norm(), torch.tensor(1.0))  # unscaled (200), then clipped
    assert plugin.scaler._per_optimizer_states[id(opt)]["stage"].name == "UNSCALED"  # the step won't unscale again


def test_fp16_mixed_clips_still_scaled_gradients_at_a_scaled_threshold():
    """A foreach optimiser: the gradients stay scaled until the step unscales them."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    module, opt, w = _clip_case(plugin, fused=False)
    torch.testing.assert_close(module._clip_gradients(opt), torch.tensor(200.0))  # logged unscaled
    torch.testing.assert_close(w.grad.norm(), torch.tensor(1024.0))  # 1.0 once unscaled
    assert plugin.scaler._per_optimizer_states[id(opt)]["stage"].name == "READY"


@pytest.mark.parametrize("kind", ["fsdp", "zero3", "model_parallel"])
def test_sharding_strategies_it_cannot_train_under_are_refused_before_loading(kind):
    """FSDP1 fails in backward (manual optimisation inside the root forward) and ZeRO-3 while loading (both seen on
    an H100), a bare ModelParallelStrategy would not shard; the module stops first, naming the key and
    trainer=fsdp2."""
    from types import SimpleNamespace

    from lightning import LightningModule
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    from src.modules.distill import DistillationModule

    strategy = {"fsdp": FSDPStrategy, "zero3": lambda: DeepSpeedStrategy(stage=3),
                "model_parallel": ModelParallelStrategy}[kind]()
    module = DistillationModule.__new__(DistillationModule)
    LightningModule.__init__(module)
    module.student = None
    module._trainer = SimpleNamespace(strategy=strategy)
    module.student_spec = SimpleNamespace(load_tokenizer=lambda: pytest.fail("loaded before the check"))
    module.grad_clip = 1.0
    module._trainer.state = SimpleNamespace(fn="fit")
    with pytest.raises(ValueError, match="trainer.strategy: .*use trainer=fsdp2"):
        module.configure_model()


def test_ddp_zero2_and_fsdp2_pass_the_strategy_check():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    from src.modules.distributed import check_strategy
    from src.modules.sharding import FSDP2Strategy

    for strategy in (DDPStrategy(), DeepSpeedStrategy(stage=2), SingleDeviceStrategy("cpu"), FSDP2Strategy()):
        check_strategy(strategy)



def test_a_deepspeed_strategy_that_would_not_clip_as_configured_is_refused():
    """Manual optimisation leaves the clip to DeepSpeed's config; a strategy given by name gets 0 there (none)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from src.modules.distributed import check_strategy

    with pytest.raises(ValueError, match="module.grad_clip is 1.0, but DeepSpeed clips at 0.0"):
        check_strategy(DeepSpeedStrategy(stage=2), grad_clip=1.0)
    check_strategy(DeepSpeedStrategy(config={"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}), 1.0)
    check_strategy(DeepSpeedStrategy(stage=2), grad_clip=None)  # no clip asked for: nothing to match


def test_micro_batches_are_refused_under_deepspeed():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from src.modules.distributed import check_sharding
    from src.modules.method.objectives import PolicyGradient
    from src.modules.rollout.hf import HFGenerateRollout

    check_sharding(DeepSpeedStrategy(stage=2), PolicyGradient, HFGenerateRollout, None)
    with pytest.raises(ValueError, match="objective.micro_batch_tokens is not supported under DeepSpeed"):
        check_sharding(DeepSpeedStrategy(stage=2), PolicyGradient, HFGenerateRollout, 4096)
