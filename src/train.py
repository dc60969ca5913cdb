"""Train a student: ``python src/train.py [experiment=<name>] [algorithm=<name>] [key=value ...]``.

Only wiring: compose the config, instantiate the datamodule, module, callbacks, loggers and trainer,
fit, test, return the metrics. Tests call ``train(cfg)`` directly.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings

import hydra
import lightning as L
from omegaconf import DictConfig

from src.modules.distributed import check_sharding, check_strategy
from src.modules.memory_plan import check_hardware
from src.modules.models.specs import follow_trainer_dtype
from src.utils.allocator import keep_freed_memory
from src.utils.instantiate import (
    instantiate_callbacks,
    instantiate_loggers,
    log_config,
    plain_errors,
)
from src.utils.runs import claim_output_dir, resolve_ckpt_path

# The frozen teacher is in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
# Checkpoints hold the post-update state on purpose: a resumed run continues after that update.
warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict]:
    """Fit (and test) as ``cfg`` says; returns the final metrics and the objects built."""
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    L.seed_everything(cfg.seed, workers=True)
    if cfg.data.get("purpose") == "evaluation":
        raise ValueError(f"data={cfg.data.get('task')} is an evaluation preset (data.purpose=evaluation): its train "
                         f"split is the benchmark's test file. Evaluate with src/eval.py data={cfg.data.get('task')}; "
                         f"to train, use data=math or data=jsonl with data.train.path=<a training file>")
    follow_trainer_dtype(cfg)  # model.teacher.dtype: null -> the dtype the trainer computes in
    check_hardware(cfg)  # a GPU experiment on a CPU machine, or a plan that does not fit: stop before anything loads
    ckpt_path = resolve_ckpt_path(cfg)  # a matching, intact checkpoint, or a message naming what is wrong
    claim_output_dir(cfg, ckpt_path)  # a folder that holds another run is refused
    # the Trainer first: a strategy the module refuses stops here, before a stage, model or dataset is built
    progress_bar = cfg.trainer.get("enable_progress_bar") is not False  # None: Lightning's default, a bar
    callbacks = instantiate_callbacks(cfg.get("callbacks"), progress_bar=progress_bar)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    check_strategy(trainer.strategy, cfg.module.get("grad_clip"))
    check_sharding(trainer.strategy, hydra.utils.get_class(cfg.objective._target_),
                   hydra.utils.get_class(cfg.rollout._target_), cfg.objective.get("micro_batch_tokens"))
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module)
    datamodule.set_tokenizer(module.student_spec.load_processor())  # a processor for vision-language models
    if module.cross_vocab_teacher:  # its prompts rendered with its own template
        datamodule.set_teacher_tokenizer(module.teacher_spec.load_tokenizer())
    if getattr(datamodule, "teacher_context", None) is not None:  # privileged context for the teacher's prompt
        module.use_teacher_prompts()
    log_config(cfg, trainer)

    if cfg.get("validate_before"):
        trainer.validate(module, datamodule=datamodule)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        trainer.test(module, datamodule=datamodule)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer}


@hydra.main(version_base="1.3", config_path="../configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = plain_errors(train)(cfg)
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
