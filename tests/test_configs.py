"""Every shipped config composes and instantiates; bad input fails with a message naming the culprit."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
from hydra.errors import ConfigCompositionException

from src.modules.distributed import check_strategy
from src.modules.models.specs import PretrainedLM, follow_trainer_dtype
from src.modules.models.tiny import TinyQwen2
from src.train import train

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("*.yaml"))
ALGORITHMS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "algorithm").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "trainer").glob("*.yaml"))

TINY_DATA = ["data=arithmetic", "data.batch_size=8", "data.train.n=64", "data.val.n=8", "data.test.n=8"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates_with_tiny_models(make_cfg, name):
    if name.startswith("visual"):  # vision-language experiments keep their image data, on tiny VL models
        cfg = make_cfg(f"experiment={name}", "model=tiny_vl", "data=visual_mini", *TINY_DATA[1:])
    else:
        cfg = make_cfg(f"experiment={name}", "model=tiny", *TINY_DATA)
    module = hydra.utils.instantiate(cfg.module)
    module.configure_model()
    assert module.student is not None
    assert (module.teacher is not None) == module.objective.needs_teacher
    dm = hydra.utils.instantiate(cfg.data)
    dm.set_tokenizer(module.student_spec.load_processor())
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == cfg.data.batch_size
    hydra.utils.instantiate(cfg.callbacks.get("phase_schedule") or {"_target_": "builtins.dict"})


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_keeps_its_real_settings(make_cfg, name):
    cfg = make_cfg(f"experiment={name}", fast=False)
    follow_trainer_dtype(cfg)  # as src/train.py does first
    for role in ("student", "teacher"):
        if cfg.model.get(role) == "self":  # self-distillation: the module makes the teacher from the student
            assert role == "teacher" and cfg.module.self_teacher.weights in ("current", "frozen", "ema")
        elif cfg.model.get(role) is not None:  # specs are cheap: composing and building them loads nothing
            spec = hydra.utils.instantiate(cfg.model[role])
            assert callable(spec.load_model) and callable(spec.load_tokenizer) and spec.key == f"model.{role}"


@pytest.mark.parametrize("name", TRAINERS)
def test_trainer_configs_compose(make_cfg, name):
    cfg = make_cfg(f"trainer={name}")
    assert cfg.trainer._target_.endswith("Trainer")
    if "strategy" in cfg.trainer:
        assert cfg.trainer.strategy._target_.startswith(("lightning.pytorch.strategies", "src.modules.sharding"))
        # built as the Trainer builds it (DeepSpeed's config must arrive as a plain dict; no GPU needed), and one
        # the module trains under
        strategy = hydra.utils.instantiate(cfg.trainer.strategy)
        check_strategy(strategy, cfg.module.grad_clip)
        if name.startswith("deepspeed"):
            assert isinstance(strategy.config, dict) and strategy.config["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiments_use_strategies_the_module_trains_under(make_cfg, name):
    cfg = make_cfg(f"experiment={name}", fast=False)
    if "strategy" in cfg.trainer:
        check_strategy(hydra.utils.instantiate(cfg.trainer.strategy), cfg.module.get("grad_clip"))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_trains_two_steps(make_cfg, algorithm):
    metrics, obj = train(make_cfg(f"algorithm={algorithm}", "trainer.max_steps=2", "rollout.num_samples=2",
                                  "test=false"))
    assert obj["trainer"].global_step == 2 * obj["module"].updates_per_rollout
    assert metrics["train/loss"] == metrics["train/loss"]  # not NaN
    assert (obj["module"].teacher is None) == (algorithm == "grpo")


def test_unknown_algorithm_names_the_group(make_cfg):
    with pytest.raises(ConfigCompositionException, match="algorithm"):
        make_cfg("algorithm=no_such_thing")


@pytest.mark.parametrize("lam", [0.0, 1.0, -0.1, 1.5])
def test_bad_lam_names_the_key(make_cfg, lam):
    cfg = make_cfg(f"clipping.lam={lam}")
    with pytest.raises(Exception, match="lam"):
        hydra.utils.instantiate(cfg.module)


@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.2])
def test_bad_ratio_names_the_key(make_cfg, ratio):
    cfg = make_cfg(f"selection.ratio={ratio}")
    with pytest.raises(Exception, match="ratio"):
        hydra.utils.instantiate(cfg.module)


def test_missing_model_path_names_the_key(tmp_path, monkeypatch):
    spec = PretrainedLM(path=str(tmp_path / "nope"), key="model.teacher")
    with pytest.raises(FileNotFoundError, match=r"model.teacher.path='.*nope': no such folder"):
        spec.load_model()
    # a mistyped relative folder is named at once, not sent to the hub as a model id
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"model.student.path='my_student': no such folder \({tmp_path}/my_stu"
                                                r"dent\), and not a hub id, which has the form owner/name"):
        PretrainedLM(path="my_student", key="model.student").load_tokenizer()


def test_a_teacher_padded_past_the_shared_tokenizer_is_admitted(make_cfg, tmp_path):
    # A teacher whose output embedding is padded to another size, as Qwen2.5 7B (152064) vs 1.5B (151936).
    base = TinyQwen2(cache_dir=str(tmp_path), hidden_size=32, num_layers=1, seed=3)
    model, tok = base.load_model(), base.load_tokenizer()
    model.resize_token_embeddings(len(tok) + 27)
    model.save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    cfg = make_cfg("model.teacher._target_=src.modules.models.specs.PretrainedLM", f"+model.teacher.path={tmp_path}/padded",
                   "~model.teacher.cache_dir", "~model.teacher.hidden_size", "~model.teacher.num_layers",
                   "~model.teacher.seed")
    module = hydra.utils.instantiate(cfg.module)
    module.configure_model()
    assert module.scorer.vocab_size == len(tok)  # both scored over the shared tokenizer's ids


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_composes_with_the_main_job(make_cfg, algorithm):
    from src.utils.instantiate import instantiate_callbacks

    cfg = make_cfg("experiment=mini_math", f"algorithm={algorithm}", "model=tiny", *TINY_DATA)
    callbacks = instantiate_callbacks(cfg.callbacks)
    has_phase = any(type(c).__name__ == "PhaseSchedule" for c in callbacks)
    assert has_phase == (algorithm in ("reopold", "reopold_no_clip", "reopold_no_entropy"))
    hydra.utils.instantiate(cfg.module)


def test_two_runs_started_together_get_their_own_folders(tmp_path):
    """``hydra.run.dir`` is resolved once per process (``now`` is cached): two processes started in the same
    second must still get distinct run folders."""
    import subprocess
    import sys

    code = ("from hydra import compose, initialize_config_dir\n"
            f"with initialize_config_dir(config_dir={str(Path(__file__).resolve().parents[1] / 'configs')!r}, "
            "version_base='1.3'):\n"
            f"    cfg = compose('train', overrides=['paths.log_dir={tmp_path}'], return_hydra_config=True)\n"
            "print(cfg.hydra.run.dir)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    dirs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(d.startswith(f"{tmp_path}/") and "/runs/" in d for d in dirs), dirs
    assert dirs[0] != dirs[1], dirs


def test_enable_progress_bar_false_drops_the_bar_callback(make_cfg):
    """Lightning refuses ``enable_progress_bar=False`` beside a progress-bar callback; the flag alone must do."""
    from lightning import Trainer
    from lightning.pytorch.callbacks import ProgressBar

    from src.utils.instantiate import instantiate_callbacks

    cfg = make_cfg("trainer.max_steps=1", fast=False)
    assert any(isinstance(c, ProgressBar) for c in instantiate_callbacks(cfg.callbacks))
    callbacks = instantiate_callbacks(cfg.callbacks, progress_bar=False)
    assert callbacks and not any(isinstance(c, ProgressBar) for c in callbacks)
    Trainer(enable_progress_bar=False, callbacks=callbacks, logger=False)  # refuses a bar callback



def test_train_builds_its_trainer_with_enable_progress_bar_false_alone(make_cfg, monkeypatch):
    """The bar callback stays in the config; the flag alone turns it off (the Trainer is built, then stop)."""
    import src.train

    class Built(Exception):
        pass

    def stop(strategy, grad_clip=None):
        raise Built

    cfg = make_cfg("trainer.enable_progress_bar=false", fast=False)  # stops before anything is built
    assert cfg.callbacks.progress_bar is not None
    monkeypatch.setattr(src.train, "check_strategy", stop)
    with pytest.raises(Built):
        src.train.train(cfg)


def test_a_refused_strategy_stops_train_before_the_module_is_built(make_cfg, monkeypatch):
    import hydra.utils

    import src.train

    built = []
    instantiate = hydra.utils.instantiate
    monkeypatch.setattr(hydra.utils, "instantiate", lambda node, *a, **k: built.append(node.get("_target_")) or
                        instantiate(node, *a, **k))
    cfg = make_cfg("+trainer.strategy._target_=lightning.pytorch.strategies.ModelParallelStrategy")
    with pytest.raises(ValueError, match="trainer.strategy: ModelParallelStrategy"):
        src.train.train(cfg)
    assert not any("DataModule" in str(t) or "Distillation" in str(t) for t in built), built


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_cpu_wing_builds_with_every_experiment(make_cfg, name):
    from src.accel.cpu import FusedBackbone, FusedDecoder

    cfg = make_cfg(f"experiment={name}", "accel=cpu", fast=False)
    follow_trainer_dtype(cfg)
    rollout = hydra.utils.instantiate(cfg.rollout)
    assert isinstance(getattr(rollout, "turn", rollout).decoder, FusedDecoder)
    assert isinstance(hydra.utils.instantiate(cfg.module).backbone, FusedBackbone)


def test_the_cpu_wing_trains_through_the_entry_point(make_cfg, monkeypatch):
    """Two training steps through ``src/train.py``'s path with ``accel=cpu``: the student's and the teacher's scores
    come from the fused backbone, the rollouts from the fused decode step."""
    from src.accel.cpu.backbone import FusedScorer
    from src.accel.cpu.decode_step import FusedDecodeStep

    used = []
    for cls in (FusedScorer, FusedDecodeStep):
        real = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, *a, _real=real, **k: used.append(type(self)) or
                            _real(self, *a, **k))
    metrics, obj = train(make_cfg("accel=cpu", "trainer.max_steps=2", "test=false"))
    assert obj["trainer"].global_step == 2 and metrics["train/loss"] == metrics["train/loss"]
    assert used.count(FusedScorer) >= 4 and FusedDecodeStep in used  # teacher and student, each step
