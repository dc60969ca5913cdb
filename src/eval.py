"""Evaluate a model: ``python src/eval.py model=pretrained model.student.path=<HF dir or hub id> [k=8]``
(or ``ckpt_path=<.ckpt>`` for a Lightning checkpoint of a training run's student).

Mirrors ``train.py``: compose, instantiate, ``trainer.test`` on the datamodule's test split, return the
metrics. Greedy accuracy always; with ``k > 0`` also ``k`` samples per prompt for avg@k, pass@k, maj@k.
A Lightning checkpoint (``ckpt_path``) overrides the model's weights. Every response's result is written
to ``<output_dir>/samples.jsonl`` with ``meta.json`` (model, parameters, k, metrics): the input of the
test-time-scaling analysis (``src.modules.evaluation.test_time_scaling.load_results``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from src.modules.distributed import check_strategy
from src.modules.models.specs import follow_trainer_dtype
from src.utils.instantiate import instantiate_loggers, plain_errors
from src.utils.runs import claim_output_dir, existing_checkpoint
from src.utils.sharding import count_params


def _gather(records: list[dict]) -> list[dict]:
    """Every rank's records on every rank (DDP), in rank order, each response once: the distributed
    sampler pads the last ranks with repeated prompts so that every rank gets as many."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, records)
        records = [r for part in out for r in part]
    seen, unique = set(), []
    for r in records:
        if (r["prompt_id"], r["sample"]) not in seen:
            seen.add((r["prompt_id"], r["sample"]))
            unique.append(r)
    return unique


def write_results(out_dir: str | Path, records: list[dict], meta: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "samples.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def eval_checkpoint(ckpt: str | None) -> str | None:
    """The checkpoint to evaluate, checked: a path (``last`` names no run here), intact."""
    if not ckpt:
        return None
    if ckpt == "last":
        raise ValueError("ckpt_path=last: src/eval.py evaluates one checkpoint file and has no run of its own to take "
                         "the last of; pass the path, e.g. ckpt_path=logs/<task>/runs/<run>/checkpoints/last.ckpt")
    return str(existing_checkpoint(ckpt))


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict]:
    if cfg.get("keep_freed_memory", True):
        from src.utils.allocator import keep_freed_memory

        keep_freed_memory()
    L.seed_everything(cfg.seed, workers=True)
    with open_dict(cfg):  # evaluation never reads the train split (data=math needs no train path)
        data = OmegaConf.to_container(cfg.data, resolve=True)  # val/test may refer to train's settings
        data["train"] = None
        cfg.data = data
    follow_trainer_dtype(cfg)
    claim_output_dir(cfg, None)  # a folder that holds another run's samples is refused
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=instantiate_loggers(cfg.get("logger")))
    check_strategy(trainer.strategy)  # before a stage, model or dataset is built
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module)
    datamodule.set_tokenizer(module.student_spec.load_processor())  # a processor for vision-language models
    trainer.test(module, datamodule=datamodule, ckpt_path=eval_checkpoint(cfg.get("ckpt_path")), weights_only=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    records = _gather(module.evaluator.records)
    out_dir = None
    if cfg.get("save_samples") and trainer.is_global_zero:
        meta = {"model": cfg.get("model_name") or module.student_spec.path,
                "n_params": module.student_n_params or count_params(module.student),  # counted before sharding
                "k": int(cfg.module.eval_samples), "ckpt_path": cfg.get("ckpt_path"), "task": module.task,
                "seed": int(cfg.seed), "top_p": module.rollout.top_p, "top_k": module.rollout.top_k,
                "max_new_tokens": module.rollout.val_max_new_tokens, "temperature": module.rollout.temperature,
                "metrics": metrics}
        out_dir = write_results(cfg.paths.output_dir, records, meta)
        print(f"wrote {len(records)} responses to {out_dir / 'samples.jsonl'}")
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer, "out_dir": out_dir}


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    metrics, _ = plain_errors(evaluate)(cfg)
    for k, v in sorted(metrics.items()):
        print(f"{k:40s} {v:.4f}")


if __name__ == "__main__":
    main()
