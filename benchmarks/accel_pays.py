"""Does each piece of the CPU wing pay on a real experiment? Seconds per training step of an experiment's own run,
with the wing whole, without it, and with one piece of it at a time, interleaved.

    python benchmarks/accel_pays.py [--experiment mini_math] [--rounds 5] [--steps 8] [--skip 2] [--out FILE]
        [OVERRIDE ...]

The wing (``accel=cpu``, ``src/accel/cpu/``) has two pieces: ``FusedBackbone`` (``module.backbone``: scoring) and
``FusedDecoder`` (``rollout.decoder``: the rollout's decode loop). Each round runs ``src/train.py
experiment=<name>`` once per form, in the same order:

- ``cpu``: the whole wing; ``none``: the Hugging Face forward for both (``accel=none``);
- ``backbone``: the wing's scoring only (``accel=cpu rollout.decoder=null``);
- ``decoder``: the wing's decode loop only (``accel=cpu module.backbone=null``).

Each run trains ``--steps`` steps with validation, the report and the rollout viewer off, and its figure is the
median of ``train/step_s`` (the whole step: rollout, scoring, update) over the steps after the first ``--skip``.
The summary is, per form, the median over rounds and the median per-round ratio of ``none``'s seconds to its own
(above 1: faster than the Hugging Face forward). Keep the machine otherwise idle; one process at a time, with the
threads the experiment's own run would use.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMS = {
    "cpu": ["accel=cpu"],
    "none": ["accel=none"],
    "backbone": ["accel=cpu", "rollout.decoder=null"],
    "decoder": ["accel=cpu", "module.backbone=null"],
}
QUIET = ["trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "callbacks.report=null",
         "callbacks.rollout_viewer=null", "callbacks.model_checkpoint=null", "callbacks.hf_export=null", "test=false",
         "trainer.limit_val_batches=0", "logger=csv"]


def step_seconds(experiment: str, form: list[str], steps: int, skip: int, extra: list[str], folder: Path) -> float:
    """Median ``train/step_s`` of one run's steps after the first ``skip``."""
    cmd = [sys.executable, "src/train.py", f"experiment={experiment}", *form, f"trainer.max_steps={steps}",
           f"trainer.val_check_interval={steps}", f"hydra.run.dir={folder}", *QUIET, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    (metrics,) = folder.rglob("metrics.csv")
    seconds = [float(r["train/step_s"]) for r in csv.DictReader(metrics.open()) if r.get("train/step_s")]
    if len(seconds) <= skip:
        raise RuntimeError(f"{metrics}: {len(seconds)} steps logged train/step_s, fewer than --skip {skip} + 1")
    return statistics.median(seconds[skip:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="mini_math")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out (allocation, first calls)")
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)
    seconds = {f: [] for f in args.forms}
    with tempfile.TemporaryDirectory(prefix="accel_pays-") as tmp:
        for r in range(1, args.rounds + 1):
            for form in args.forms:
                s = step_seconds(args.experiment, FORMS[form], args.steps, args.skip, args.overrides,
                                 Path(tmp) / f"r{r}-{form}")
                seconds[form].append(s)
                print(f"round {r} {form:8s} step_s={s:.3f}", flush=True)
    summary = {f"{f}_step_s": statistics.median(x) for f, x in seconds.items()}
    if "none" in seconds:
        for f in args.forms:
            ratios = [n / s for n, s in zip(seconds["none"], seconds[f])]
            summary[f"{f}_speedup"] = statistics.median(ratios)
            summary[f"{f}_speedup_min"], summary[f"{f}_speedup_max"] = min(ratios), max(ratios)
    print(" ".join(f"{k}={v:.3f}" for k, v in summary.items()), flush=True)
    if args.out:
        extra = "".join(f" {o}" for o in args.overrides)
        lines = [f"`python benchmarks/accel_pays.py --experiment {args.experiment} --rounds {args.rounds} --steps "
                 f"{args.steps} --skip {args.skip}{extra}` ({os.cpu_count()} cores): seconds per training step, "
                 f"median over {args.rounds} interleaved rounds, and the median per-round speed-up over `accel=none` "
                 f"(its range over the rounds):", "",
                 "| form | s / step | speed-up over `accel=none` |", "|---|---|---|"]
        for f in args.forms:
            up = (f"{summary[f'{f}_speedup']:.2f}x ({summary[f'{f}_speedup_min']:.2f}x to "
                  f"{summary[f'{f}_speedup_max']:.2f}x)") if "none" in seconds else "-"
            lines.append(f"| {f} | {summary[f'{f}_step_s']:.3f} | {up} |")
        args.out.write_text("\n".join(lines) + "\n")
    return summary


if __name__ == "__main__":
    main()
