"""Evaluate a student: ``python src/eval.py model.student.path=<HF dir or hub id> [ckpt_path=<.ckpt>]``.

Mirrors ``train.py``: compose, instantiate, ``trainer.test`` on the datamodule's test split (greedy),
return the metrics. A Lightning checkpoint (``ckpt_path``) overrides the student's weights.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from src.utils.instantiate import instantiate_loggers  # noqa: E402


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.module)
    datamodule.set_tokenizer(module.student_spec.load_tokenizer())
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=instantiate_loggers(cfg.get("logger")))
    trainer.test(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics, {"cfg": cfg, "datamodule": datamodule, "module": module, "trainer": trainer}


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
