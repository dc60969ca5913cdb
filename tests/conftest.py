"""Shared fixtures: compose the real Hydra configs with tiny models, outputs in a temp folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small and quick: 2-digit addition, tiny models, short responses, no progress bars.
FAST = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
    "data.batch_size=8",
    "data.train.n=64",
    "data.val.n=8",
    "data.test.n=8",
    "rollout.max_new_tokens=12",
]


@pytest.fixture
def single_thread():
    """Tiny tensors: intra-op threads only add contention on a 2-core box (about 50x slower when busy)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """Tiny models are built once per test session and shared by every test."""
    return os.environ.get("REOPOLD_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """``make_cfg(*overrides, config="train")`` -> composed config with hydra's runtime set."""

    made = []  # each config its own output folder, as Hydra's timestamped run folders give

    def _make(*overrides: str, config: str = "train", fast: bool = True):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            fast_ovr = [o for o in FAST if config == "train" or not o.startswith(("callbacks.", "data.batch_size"))]
            if config == "train" and not any(o.startswith("experiment=") for o in overrides):
                fast_ovr = ["experiment=reopold_tiny"] + fast_ovr
            ovr = (fast_ovr if fast else []) + [f"paths.cache_dir={cache_dir}", f"paths.log_dir={tmp_path}/logs"]
            cfg = compose(config_name=config, overrides=ovr + list(overrides), return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / ("out" if not made else f"out-{len(made)}"))
            made.append(cfg.paths.output_dir)
            del cfg["hydra"]
        return cfg

    yield _make
    GlobalHydra.instance().clear()
