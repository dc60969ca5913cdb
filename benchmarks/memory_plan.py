"""Per-GPU peak memory of a training run by phase, before any model loads; exits 1 if it does not fit.

    python benchmarks/memory_plan.py experiment=math_qwen3 [overrides ...] [--gpu-gb 80] [--gpus 8]
        [--prompt-tokens 1024]

The estimate and what it counts: ``src/modules/memory_plan.py``. ``src/train.py`` runs the same plan on a GPU
machine before loading anything and stops with this table when it does not fit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for src/train.py")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU (GB)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs sharing the shards (default: trainer.devices "
                        "x trainer.num_nodes, -1 counted as 8)")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="the longest prompt a row holds")
    args = parser.parse_args(argv)
    from src.modules.memory_plan import plan

    result = plan(compose(args.overrides), gpu_gb=args.gpu_gb, gpus=args.gpus, prompt_tokens=args.prompt_tokens)
    print(" ".join(args.overrides) or "(defaults)")
    print()
    print(result.table())
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
