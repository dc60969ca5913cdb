"""A probe of the miniature's regime: does on-policy distillation gain over SFT on teacher samples from the same
warm start, where the teacher adds a capability the student never saw?

Arms (same teacher: the miniature's, trained on 3-digit addition; the same 3-digit test split):
- ``capability``: the student's warm start is trained on 2-digit problems only, then distilled on 3-digit prompts;
- ``control``: a 3-digit warm start of the same recipe (``RECIPE``), the mechanism absent.
Methods: ``sft`` (the teacher samples, the student imitates), ``opd`` (vanilla on-policy distillation) and
``reopold``, each for ``--steps`` steps at sampling temperature ``--temperature``, per seed.

    python benchmarks/regime_probe.py --out runs/regime_probe [--seeds 0 1] [--methods sft opd reopold]
        [--arms capability control] [--steps 200] [--temperature 0.6] [--lr 1e-4]

One ``src/train.py`` process per run; a finished run's ``result.json`` is kept and skipped on a rerun (resumable).
Writes ``results.csv`` (arm, method, seed, teacher, before, after: greedy test accuracy) and ``results.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the probe's warm-start recipe: 230 SFT steps on clean demonstrations (the main job's warm start trains 800 steps on
# noisy ones)
RECIPE = ["data.train.carry_forgotten=0.0", "trainer.max_steps=230", "trainer.val_check_interval=115",
          "stage_check=null"]
WARM_STARTS = {  # overrides of the student's warm-start stage (mini_math_student_init)
    "capability": [*RECIPE, "data.train.digits=2", "data.train.n=6000", "data.val.digits=2", "data.test.digits=2"],
    "control": RECIPE,
}
DEFAULT_LR = 1e-3  # the main job's rate when the probe ran


def run(out: Path, arm: str, method: str, seed: int, steps: int, temperature: float, lr: float | None = None) -> dict:
    folder = out / arm / (method if lr is None else f"{method}-lr{lr:g}") / f"seed{seed}"
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    stage = "[" + ",".join(f"'{o}'" for o in WARM_STARTS[arm]) + "]"
    cmd = [sys.executable, "src/train.py", "experiment=mini_math", f"algorithm={method}", f"seed={seed}",
           f"trainer.max_steps={steps}", f"rollout.temperature={temperature}", f"model.student.overrides={stage}",
           f"paths.log_dir={folder / 'logs'}", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
           f"module.optimizer.lr={DEFAULT_LR if lr is None else lr}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    (folder / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{arm}/{method}/seed{seed} failed (log: {folder / 'train.log'}):\n{proc.stderr[-2000:]}")
    (report,) = (folder / "logs").rglob("report.json")
    table = json.loads(report.read_text())
    result = {"arm": arm, "method": method, "lr": lr, "seed": seed, "seconds": round(time.perf_counter() - start, 1),
              **{role.replace(" ", "_"): table[role]["acc"] for role in ("teacher", "student before", "student after")}}
    done.write_text(json.dumps(result, indent=1))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=["sft", "opd", "reopold"])
    parser.add_argument("--arms", nargs="+", default=list(WARM_STARTS), choices=list(WARM_STARTS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {DEFAULT_LR:g})")
    args = parser.parse_args()
    results = []
    for arm in args.arms:
        for seed in args.seeds:
            for method in args.methods:
                r = run(args.out, arm, method, seed, args.steps, args.temperature, args.lr)
                print(f"{arm:10s} {method:8s} seed {seed}: teacher {r['teacher']:.3f} before "
                      f"{r['student_before']:.3f} after {r['student_after']:.3f} ({r['seconds']:.0f} s)", flush=True)
                results.append(r)
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["arm", "method", "lr", "seed", "seconds", "teacher", "student_before",
                                               "student_after"], restval="")
        writer.writeheader()
        writer.writerows(results)
    lines = ["| arm | method | lr | seed | teacher | student before | student after |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['method']} | {r.get('lr') or DEFAULT_LR:g} | {r['seed']} | {r['teacher']:.1%} | "
              f"{r['student_before']:.1%} | {r['student_after']:.1%} |" for r in results]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
