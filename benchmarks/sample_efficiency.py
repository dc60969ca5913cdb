"""Sample efficiency on the miniature: validation accuracy against rollouts consumed, per method.

Runs every method (``algorithm=`` configs, ablations included) for several seeds at an equal rollout
budget (the same number of sampled responses per step: GRPO gets 8 prompts x 8 samples where the
others get 64 x 1), each as its own ``src/train.py`` process, then writes

    <out>/sample_efficiency.csv    method,seed,samples,val_acc  (one row per evaluation point)
    <out>/sample_efficiency.png    mean curve and min-max band per method
    <out>/sample_efficiency.md     final accuracy (mean +- std) and samples to reach a target accuracy

Finished runs are skipped on a rerun (their CSV logs are reused), so an interrupted study resumes.

    python benchmarks/sample_efficiency.py                       # all methods, seeds 0 1 2
    python benchmarks/sample_efficiency.py --methods reopold opd --seeds 0 --steps 100
    python benchmarks/sample_efficiency.py --summarise-only      # redraw from the CSV
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["reopold", "opd", "grpo", "sft", "gkd", "reopold_no_clip", "reopold_no_entropy", "reopold_no_explore"]
PROMPTS_PER_STEP = 64
# GRPO needs groups: 8 prompts x 8 samples is the same 64 rollouts per step.
PER_METHOD = {"grpo": ["data.batch_size=8", "rollout.num_samples=8"]}


def run_one(method: str, seed: int, steps: int, eval_every: int, runs_dir: Path, extra: list[str]) -> Path:
    run_dir = runs_dir / f"{method}-seed{seed}"
    if (run_dir / "done.json").exists():
        return run_dir
    cmd = [sys.executable, "src/train.py", "experiment=mini_math", f"algorithm={method}", f"seed={seed}",
           f"trainer.max_steps={steps}", f"trainer.val_check_interval={eval_every}", "validate_before=true",
           "test=false", "callbacks.report=null", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
           f"data.batch_size={PROMPTS_PER_STEP}", f"hydra.run.dir={run_dir}", f"paths.log_dir={runs_dir}/logs",
           *PER_METHOD.get(method, []), *extra]
    start = time.time()
    log = (run_dir / "train.out")
    run_dir.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{method} seed {seed} failed (exit {proc.returncode}); see {log}")
    (run_dir / "done.json").write_text(json.dumps({"seconds": time.time() - start, "cmd": cmd}))
    return run_dir


def curve(run_dir: Path) -> list[tuple[int, float]]:
    """(samples consumed, val accuracy) at each evaluation of a run, from its CSV log."""
    metrics = next(run_dir.rglob("metrics.csv"))
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    acc_key = next(k for k in rows[0] if k.startswith("val/") and k.endswith("/acc"))
    per_step = {int(r["step"]): float(r["train/samples"]) for r in rows if r.get("train/samples")}
    points, seen_initial = [], False
    for r in rows:
        if not r.get(acc_key):
            continue
        step = int(r["step"])
        if not seen_initial:  # validate_before: the first evaluation precedes any update
            points.append((0, float(r[acc_key])))
            seen_initial = True
            continue
        points.append((int(sum(v for s, v in per_step.items() if s <= step)), float(r[acc_key])))
    return points


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "seed", "samples", "val_acc"])
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return [{"method": r["method"], "seed": int(r["seed"]), "samples": int(r["samples"]),
                 "val_acc": float(r["val_acc"])} for r in csv.DictReader(f)]


def samples_to_reach(points: list[tuple[int, float]], target: float) -> float:
    for samples, acc in sorted(points):
        if acc >= target:
            return samples
    return math.inf


def summarise(rows: list[dict], target: float | list[float], reference: str = "reopold") -> str:
    """Markdown table: final accuracy mean +- std, and for each target accuracy the mean samples needed
    to reach it (when every seed does) with its ratio to ``reference``'s."""
    targets = [target] if isinstance(target, (int, float)) else list(target)
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["method"]][r["seed"]].append((r["samples"], r["val_acc"]))
    head = "| method | seeds | final val acc (mean ± std) |"
    for t in targets:
        head += f" samples to reach {100 * t:.1f}% (mean) | ratio to {reference} |"
    lines = [head, "|---|---|---|" + "---|---|" * len(targets)]
    need = {t: {} for t in targets}
    for t in targets:
        for method, seeds in by.items():
            reached = [samples_to_reach(p, t) for p in seeds.values()]
            need[t][method] = statistics.mean(reached) if all(math.isfinite(x) for x in reached) else math.inf
    for method, seeds in by.items():
        finals = [max(p)[1] for p in seeds.values()]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        line = f"| {method} | {len(finals)} | {100 * statistics.mean(finals):.1f} ± {100 * std:.1f} |"
        for t in targets:
            reached = [samples_to_reach(p, t) for p in seeds.values()]
            n_ok = sum(math.isfinite(x) for x in reached)
            n = need[t][method]
            need_s = f"{n:,.0f}" if math.isfinite(n) else f"not reached ({n_ok}/{len(reached)} seeds)"
            ref = need[t].get(reference, math.inf)
            ratio = f"{n / ref:.2f}x" if math.isfinite(n) and math.isfinite(ref) and ref > 0 else "—"
            line += f" {need_s} | {ratio} |"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, teacher_acc: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        by[r["method"]][r["samples"]][r["seed"]] = r["val_acc"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for method, points in by.items():
        xs = sorted(points)
        accs = [list(points[x].values()) for x in xs]
        mean = [100 * statistics.mean(a) for a in accs]
        lo = [100 * min(a) for a in accs]
        hi = [100 * max(a) for a in accs]
        style = "-" if not method.startswith("reopold_") else "--"
        line, = ax.plot(xs, mean, style, label=method, linewidth=2.2 if method == "reopold" else 1.4)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    if teacher_acc is not None:
        ax.axhline(100 * teacher_acc, color="black", linestyle=":", label="teacher")
    ax.set_xlabel("rollouts consumed (sampled responses)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Miniature math: accuracy vs. samples (mean, band = min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--runs", type=Path, default=ROOT / "logs" / "sample_efficiency")
    ap.add_argument("--target-frac", type=float, nargs="+", default=[0.9, 0.35],
                    help="targets = these fractions of the teacher's accuracy")
    ap.add_argument("--teacher-acc", type=float, default=None, help="default: read from the teacher's stage.json")
    ap.add_argument("--summarise-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "sample_efficiency.csv"
    if not args.summarise_only:
        rows = []
        total = len(args.methods) * len(args.seeds)
        for i, (seed, method) in enumerate((s, m) for s in args.seeds for m in args.methods):
            print(f"[{i + 1}/{total}] {method} seed {seed}", flush=True)
            try:
                run_dir = run_one(method, seed, args.steps, args.eval_every, args.runs, args.overrides)
            except RuntimeError as e:  # one failed run must not lose the others
                print(f"  FAILED: {e}", flush=True)
                continue
            rows += [{"method": method, "seed": seed, "samples": s, "val_acc": a} for s, a in curve(run_dir)]
            write_csv(rows, csv_path)  # after every run: nothing lost on interruption
    rows = read_csv(csv_path)
    teacher_acc = args.teacher_acc
    if teacher_acc is None:  # the very teacher the runs used: same experiment, same config hash
        from src.modules.models.stages import StageModel

        cache = os.environ.get("REOPOLD_CACHE", str(ROOT / ".cache"))
        teacher = StageModel("mini_math_teacher", cache_dir=cache)
        teacher.stage_cfg
        stage = Path(teacher.path) / "stage.json"
        if stage.exists():
            metrics = json.loads(stage.read_text())["metrics"]
            teacher_acc = next((v for k, v in metrics.items() if k.startswith("test/") and k.endswith("/acc")), None)
    scale = teacher_acc if teacher_acc is not None else 1.0
    targets = [f * scale for f in args.target_frac]
    table = summarise(rows, targets)
    teacher_s = f"{100 * teacher_acc:.1f}%" if teacher_acc is not None else "n/a"
    (args.out / "sample_efficiency.md").write_text(
        "Targets: " + ", ".join(f"{100 * t:.1f}% ({f:.0%} of the teacher's {teacher_s})"
                                for t, f in zip(targets, args.target_frac))
        + " validation accuracy.\n\n" + table + "\n")
    plot(rows, args.out / "sample_efficiency.png", teacher_acc)
    print(table)


if __name__ == "__main__":
    main()
