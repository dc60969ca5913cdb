"""Models produced by an earlier training stage, built on first use and cached by their config.

``StageModel(experiment="mini_math_teacher", runner=train)`` composes that experiment's config, hashes it, and
loads the student it trained from ``<cache_dir>/stages/<experiment>-<hash>/``. If nothing is cached there, it
runs the stage first (``runner(cfg)``: the training entry point, ``src.train.train``, given by the config) and
stores the exported Hugging Face model. Any change to
the stage's config (architecture, data, steps, learning rate, seed) gives a new hash and a rebuild; an
unchanged config is reused, across runs and across processes. A stage that starts from another stage's
model hashes that stage's digest too, so a change upstream rebuilds every stage built on it. Code is not
hashed: a change to what a stage computes that its config does not show (the task's text format, a model
default, the tokenizer, a library's kernels) must bump ``STAGE_VERSION``.

A stage declares what it must reach (``stage_check`` in its experiment: a validation metric and its bounds). It is
checked when the stage is built, on the stage's own validation split at its last step: a stage that misses stops
the run with a ``StageCheckError`` naming the stage, what it reached and what it needed, and is kept aside under
``<name>.failed-<pid>`` for inspection, never cached as good. A cached stage is checked again against its recorded
metrics when it is loaded, so a stricter declaration catches a stage cached before it.

A build runs in ``.build-<name>-<pid>/`` beside the cache entry. A build that was stopped (killed, interrupted, out
of memory) leaves that folder; the next build of the same stage config resumes from its ``checkpoints/last.ckpt``
instead of starting over (Lightning restores the weights, the optimizer, the schedule and the step; the data order
after the resume differs from an unstopped build's).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict

from src.modules.models.specs import BuiltOnFirstUse
from src.modules.models.tokenizer import TOKENIZER_VERSION

CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "configs")
# Where a stage writes, how it shows progress and how the process allocates memory: not what it computes.
VOLATILE = ("paths", "logger", "hydra", "task_name", "ckpt_path", "keep_freed_memory", "memory_check", "cpu_miniature",
            "stage_check")
# how a run is evaluated or reacts to a failure does not change what a successful run trains
EVAL_ONLY = ("eval_samples", "record_samples", "nonfinite")
STAGE_TARGET = "src.modules.models.stages.StageModel"
STAGE_VERSION = 3  # bump when stage outputs change in ways the config does not show


class StageCheckError(RuntimeError):
    """A stage missed what its experiment declares it must reach."""


def check_stage(experiment: str, check, metrics: dict, where: str) -> None:
    """Raise ``StageCheckError`` unless ``metrics[check.metric]`` lies within ``[check.min, check.max]``.

    ``check``: ``{metric, min, max}`` (either bound may be absent) or None (nothing declared)."""
    if not check:
        return
    metric, lo, hi = check["metric"], check.get("min"), check.get("max")
    if metric not in metrics:
        raise StageCheckError(f"stage {experiment!r} declares stage_check.metric={metric!r}, but its run logged no such "
                              f"metric (it has: {sorted(metrics)}); validate at the last step "
                              f"(trainer.val_check_interval dividing trainer.max_steps) ({where})")
    value = float(metrics[metric])
    if (lo is not None and not value >= lo) or (hi is not None and not value <= hi):
        need = " and ".join(f"{op} {b:g}" for op, b in ((">=", lo), ("<=", hi)) if b is not None)
        raise StageCheckError(f"stage {experiment!r} reached {metric} = {value:.4f}; it must be {need} "
                              f"(stage_check in configs/experiment/{experiment}.yaml) ({where})")


def compose_stage(experiment: str, overrides: list[str] | tuple[str, ...] = ()):
    """The config ``python src/train.py experiment=<experiment> <overrides>`` would run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    args = [f"experiment={experiment}", *overrides]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=args)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=args)


def _upstream_digests(node):
    """The config tree with each ``StageModel`` node given the digest of the stage it loads."""
    if isinstance(node, dict):
        out = {k: _upstream_digests(v) for k, v in node.items() if k != "runner"}  # how a stage is built, not what
        if node.get("_target_") == STAGE_TARGET:
            upstream = compose_stage(node["experiment"], list(node.get("overrides") or []))
            out["_stage_digest"] = stage_digest(upstream)
        return out
    if isinstance(node, list):
        return [_upstream_digests(v) for v in node]
    return node


def stage_digest(cfg) -> str:
    container = _upstream_digests(OmegaConf.to_container(cfg, resolve=False))
    for key in VOLATILE:
        container.pop(key, None)
    for key in ("progress_bar", "rollout_viewer"):  # what a run shows, not what it trains
        container.get("callbacks", {}).pop(key, None)
    container.get("data", {}).pop("purpose", None)  # a preset's intended use, checked before a run starts
    # options at their "off" value, left out so that adding them rebuilds no cached stage: the self-distillation
    # teacher's settings where the teacher is not the student, a teacher context that is not set
    if container.get("model", {}).get("teacher") != "self":
        container.get("module", {}).pop("self_teacher", None)
    if container.get("data", {}).get("teacher_context") is None:
        container.get("data", {}).pop("teacher_context", None)
    for key in EVAL_ONLY:
        container.get("module", {}).pop(key, None)
    for key in ("enable_progress_bar", "enable_model_summary"):
        container.get("trainer", {}).pop(key, None)
    container["_versions"] = {"stage": STAGE_VERSION, "tokenizer": TOKENIZER_VERSION}
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:12]


class StageModel(BuiltOnFirstUse):
    """The student trained by ``experiment`` (plus ``overrides``), built once and cached.

    Args:
        experiment: name of a ``configs/experiment`` file whose run produces the model.
        cache_dir: root of the cache.
        overrides: extra overrides for that run (e.g. a shorter schedule).
        runner: ``(cfg) -> (metrics, objects)``, what runs a stage (the training entry point, ``src.train.train``);
            needed only when the stage is not cached yet.
    """

    def __init__(self, experiment: str, cache_dir: str, overrides: list[str] | None = None,
                 runner: Callable | None = None, dtype: str = "float32", key: str = "model", **kwargs):
        self.experiment, self.overrides, self.runner = experiment, list(overrides or []), runner
        self.cache_root = Path(cache_dir).expanduser()
        self._cfg = None
        self._digest = None
        super().__init__(path=str(self.cache_root / "stages" / experiment), dtype=dtype, key=key, **kwargs)

    @property
    def stage_cfg(self):
        if self._cfg is None:
            self._cfg = compose_stage(self.experiment, self.overrides)
            self._digest = stage_digest(self._cfg)
            self.path = str(self.cache_root / "stages" / f"{self.experiment}-{self._digest}")
        return self._cfg

    def build(self) -> str:
        cfg = self.stage_cfg
        path = Path(self.path)
        if (path / "config.json").exists():
            self._check_cached(cfg, path)
            return str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One builder per stage: concurrent runs (a sweep, DDP ranks) wait for it instead of each training
        # the same model on the same cores.
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (path / "config.json").exists():
                self._check_cached(cfg, path)
                return str(path)
            return self._build(cfg, path)

    def _check_cached(self, cfg, path: Path) -> None:
        record = path / "stage.json"
        if cfg.get("stage_check") and record.exists():
            metrics = json.loads(record.read_text()).get("metrics", {})
            check_stage(self.experiment, cfg.stage_check, metrics,
                        f"cached at {path}: delete it to rebuild, or fix the declaration")

    def _build(self, cfg, path: Path) -> str:
        if self.runner is None:
            raise ValueError(f"{self.key}: stage {self.experiment!r} is not cached under {path.parent} and no "
                             f"runner was given to build it ({self.key}.runner: the training entry point)")
        work = path.parent / f".build-{path.name}-{os.getpid()}"
        with open_dict(cfg):
            cfg.paths.output_dir = str(work)
            cfg.paths.cache_dir = str(self.cache_root)
            cfg.task_name = self.experiment
        interrupted = self._interrupted_build(cfg, path)
        if interrupted is not None:  # an earlier build of this stage was stopped: it goes on from its last.ckpt
            os.rename(interrupted, work)
            with open_dict(cfg):
                cfg.ckpt_path = str(work / "checkpoints" / "last.ckpt")
            step = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=False, mmap=True)["global_step"]
            print(f"[stage] resuming {self.experiment} from an interrupted build ({interrupted.name}, step {step}) "
                  f"-> {path}")
        else:
            print(f"[stage] building {self.experiment} -> {path}")
        # the stage must not disturb the calling run's random state
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            metrics, _ = self.runner(cfg)
        random.setstate(py_state)
        np.random.set_state(np_state)
        failed = path.parent / f"{path.name}.failed-{os.getpid()}"
        try:
            check_stage(self.experiment, cfg.get("stage_check"), metrics,
                        f"its run is kept at {failed}; nothing was cached")
        except StageCheckError:
            os.rename(work, failed)
            raise
        print(f"[stage] {self.experiment}: "
              + (f"{cfg.stage_check.metric} = {metrics[cfg.stage_check.metric]:.4f} passes its check"
                 if cfg.get("stage_check") else "no stage_check declared"))
        export = work / "checkpoints" / "hf" / "final"
        (export / "stage.json").write_text(json.dumps(
            {"experiment": self.experiment, "overrides": self.overrides, "digest": self._digest,
             "metrics": metrics, "config": OmegaConf.to_container(cfg, resolve=True)}, indent=1, default=str))
        try:
            os.rename(export, path)
            os.rename(work, path.parent / f"{path.name}.run")  # the stage's logs and checkpoints
        except OSError:  # another process finished the same stage first
            shutil.rmtree(work, ignore_errors=True)
        return str(path)

    def _interrupted_build(self, cfg, path: Path) -> Path | None:
        """The newest earlier build of this stage that stopped with an intact ``last.ckpt`` and this config.

        Called under the stage's lock: a ``.build-*`` folder seen then belongs to a process that ended without
        finishing (killed, interrupted, out of memory); one whose config differs, or whose checkpoint is damaged,
        is left where it is and the stage builds from the start."""
        from src.utils.runs import RUN_CONFIG, check_checkpoint, config_differences

        builds = [d / "checkpoints" / "last.ckpt" for d in path.parent.glob(f".build-{path.name}-*")]
        for ckpt in sorted((c for c in builds if c.exists()), key=lambda c: c.stat().st_mtime, reverse=True):
            run_config = ckpt.parent.parent / RUN_CONFIG
            if not run_config.exists() or config_differences(OmegaConf.load(run_config), cfg):
                continue
            try:
                check_checkpoint(ckpt)
            except ValueError as e:
                print(f"[stage] not resuming {ckpt.parent.parent.name}: {e}")
                continue
            return ckpt.parent.parent
        return None

    def __repr__(self) -> str:
        return f"StageModel(experiment={self.experiment!r}, overrides={self.overrides})"
