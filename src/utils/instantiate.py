"""Config helpers for the entry points: instantiate callback and logger groups, save the config."""

from __future__ import annotations

from pathlib import Path

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf


def _instantiate_group(group: DictConfig | None, kind: str) -> list:
    out = []
    if not group:
        return out
    for name, conf in group.items():
        if conf is None or not conf:  # an empty entry (e.g. `phase: none`) adds nothing
            continue
        if "_target_" not in conf:
            raise ValueError(f"{kind}.{name} has no _target_")
        out.append(hydra.utils.instantiate(conf))
    return out


def instantiate_callbacks(cfg: DictConfig | None, progress_bar: bool = True) -> list:
    """The ``callbacks`` group; without its progress bar where ``progress_bar`` is False, since Lightning refuses
    ``trainer.enable_progress_bar=false`` beside a progress-bar callback."""
    callbacks = _instantiate_group(cfg, "callbacks")
    if not progress_bar:
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def instantiate_loggers(cfg: DictConfig | None) -> list:
    return _instantiate_group(cfg, "logger")


@rank_zero_only
def log_config(cfg: DictConfig, trainer) -> None:
    """Write the resolved config next to the run's outputs (what ``ckpt_path=last`` matches runs by), and to the
    loggers' hyperparameters."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))


def plain_errors(fn):
    """An entry point whose Hydra instantiation errors end on their cause's message: a constructor's
    ``ValueError`` naming a config key is the last line a user reads, not Hydra's ``full_key`` trailer."""
    import functools

    from hydra.errors import InstantiationException

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InstantiationException as e:
            cause = e.__cause__
            if isinstance(cause, (ValueError, TypeError, FileNotFoundError, OSError, RuntimeError)):
                raise cause from None
            raise

    return run
