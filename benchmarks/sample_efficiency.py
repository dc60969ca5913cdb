"""The study: every method at an equal rollout budget on the miniature, in two arms, resumably.

Arms (the same task, teacher and problems; the warm starts differ in one rate):

- ``regime``: the main job's warm start, trained on demonstrations that forget the carry into the hundreds in 60%
  of the problems that have one. It writes that step right in about a third of its samples: the mechanism under
  test, a teacher's per-token signal on the student's own samples, can act.
- ``control``: the same stage with every such carry forgotten (``data.train.carry_forgotten=1.0``). The student
  never samples the step; on-policy methods have nothing to reinforce, only SFT on teacher samples shows it.

Methods (``METHODS``): SFT on teacher samples, GKD at both ends of its beta (on-policy forward KL and exact
per-state reverse KL over the full vocabulary), vanilla OPD, REOPOLD, its three ablations and GRPO (8 prompts x 8
samples: the same 64 rollouts a step). Each run is its own ``src/train.py`` process on one thread: ``STEPS`` steps
(``STEPS * 64`` rollouts) at the main job's temperature, evaluated before training and every ``EVAL_EVERY`` steps on
a fixed test set of ``TEST_PROMPTS`` prompts, greedy and ``avg@4`` at the sampling temperature (the primary metric).
The budget is short because the curve is early: from this warm start REOPOLD at lr 1e-4 closed the gap within 25
steps (seed 0: avg@4 66.9% before, 99.5% at step 25 of a 200-step run), so later evaluations only add flat points,
and evaluations are what a run spends most of its time on (about 15 s each against 1.2 s a step, one thread).

Every run but GRPO's (no teacher) also logs the exact reverse and forward KL to the teacher over the full
vocabulary on 64 fixed held-out teacher traces at every evaluation (``src/callbacks/diagnostics.py``), and every
``EVAL_EVERY`` steps the cosine between its gradient and the exact reverse KL's on the same batch
(``module.grad_cosine_every``).

Phases, each resumable (a finished run keeps ``done.json`` and is skipped; a failed one keeps ``failed.json`` with
its log's tail and is retried on the next call):

1. ``tune``: each method's learning rate from ``LR_GRID`` on the tuning seed ``TUNE_SEED``, regime arm, on the
   validation split (never the test set): the rate with the largest mean primary metric over the evaluations.
2. ``refs``: the teacher's metrics on the same test set (``src/eval.py``).
3. ``runs``: every arm, method and seed at its tuned rate (``--seeds``; REOPOLD and OPD get ``--extra-seeds`` too).
4. ``mechanism``: the measure of the mechanism itself, from greedy evaluations of every finished run's final student
   and of each arm's warm start on the study's test prompts (``carry_measure``: on the problems with a carry into
   the hundreds, the share of responses whose hundreds line adds it).
5. ``analysis`` (always; alone with ``--analyse-only``): ``sample_efficiency.csv`` (``arm,method,seed,samples,val_acc``),
   ``sample_efficiency_refs.json`` (per arm ``teacher_acc`` and ``warm_acc``, and the tuned rates),
   ``sample_efficiency_analysis.md`` and ``sample_efficiency.png`` in ``--out``.

    python benchmarks/sample_efficiency.py --jobs 2                          # everything, 2 runs at once; resumes
    python benchmarks/sample_efficiency.py --phases tune refs                # part of it
    python benchmarks/sample_efficiency.py --methods reopold opd sft --seeds 0 1 --extra-seeds   # a subset
    python benchmarks/sample_efficiency.py --analyse-only                    # the files, from the runs so far
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVAL_EVERY, PROMPTS_PER_STEP, TEST_PROMPTS, EVAL_SAMPLES, TEMPERATURE = 32, 4, 64, 1024, 4, 0.6
LR_GRID, TUNE_SEED = (1e-4, 3e-4, 1e-3), 100
PRIMARY, SECONDARY = f"avg@{EVAL_SAMPLES}", "acc"
METHODS = {
    "sft": ["algorithm=sft"],
    "gkd_forward_kl": ["algorithm=gkd", "objective.beta=0.0"],
    "gkd_reverse_kl": ["algorithm=gkd", "objective.beta=1.0"],
    "opd": ["algorithm=opd"],
    "reopold": ["algorithm=reopold"],
    "reopold_no_clip": ["algorithm=reopold_no_clip"],
    "reopold_no_entropy": ["algorithm=reopold_no_entropy"],
    "reopold_no_explore": ["algorithm=reopold_no_explore"],
    "grpo": ["algorithm=grpo", "data.batch_size=8", "rollout.num_samples=8"],
}
ARMS = {"regime": [], "control": ["model.student.overrides=['data.train.carry_forgotten=1.0']"]}
# a run takes minutes: an interrupted one is rerun, not resumed, so no Lightning checkpoints (the student is kept in
# checkpoints/hf/final)
DIAGNOSTICS = "src.callbacks.diagnostics.HeldOutKL"
QUIET = ["trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "callbacks.report=null",
         "callbacks.model_checkpoint=null", "+trainer.enable_checkpointing=false"]
# two-sided 95% quantiles of Student's t, by degrees of freedom (beyond 30: the normal's)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def train_cmd(arm: str, method: str, seed: int, lr: float, run_dir: Path, split: str) -> list[str]:
    """The command of one run: ``split`` is what it evaluates on (``test``: the fixed test set; ``val``: tuning)."""
    evaluated = [f"data.val.split={split}", f"data.val.n={TEST_PROMPTS if split == 'test' else 256}"]
    if method != "grpo":  # the exact KLs to the teacher on fixed held-out teacher traces, at every evaluation
        evaluated += [f"+callbacks.diagnostics._target_={DIAGNOSTICS}", "+callbacks.diagnostics.n_prompts=64",
                      f"module.grad_cosine_every={EVAL_EVERY}"]
    return [sys.executable, "src/train.py", "experiment=mini_math", *METHODS[method], *ARMS[arm], f"seed={seed}",
            f"module.optimizer.lr={lr}", f"rollout.temperature={TEMPERATURE}", f"trainer.max_steps={STEPS}",
            f"trainer.val_check_interval={EVAL_EVERY}", f"module.eval_samples={EVAL_SAMPLES}", "validate_before=true",
            "test=false", *evaluated, f"hydra.run.dir={run_dir}", *QUIET]


def finished(run_dir: Path, cmd: list[str]) -> bool:
    """Whether ``run_dir`` holds a finished run of ``cmd`` (the interpreter's path and the folder aside: a moved
    study is reused): a run of another design (other steps, evaluations or rate) is not."""
    def design(c: list[str]) -> list[str]:
        return [x for x in c[1:] if not x.startswith("hydra.run.dir=")]

    done = run_dir / "done.json"
    return done.exists() and design(json.loads(done.read_text()).get("cmd", [None])) == design(cmd)


def run_one(cmd: list[str], run_dir: Path) -> Path | None:
    """Runs ``cmd`` on one thread unless ``run_dir`` holds a finished run of it; returns ``run_dir``, or None when the
    run failed. Every run uses one thread, so its rounding does not depend on how many run at once (``--jobs``)."""
    if finished(run_dir, cmd):
        return run_dir
    if run_dir.exists():  # an interrupted, failed or outdated attempt: start it again from nothing
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    start = time.time()
    log = run_dir.parent / f"{run_dir.name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False, env=env)
    if proc.returncode:
        tail = log.read_text()[-3000:]
        (run_dir / "failed.json").write_text(json.dumps({"exit": proc.returncode, "cmd": cmd, "log_tail": tail}))
        print(f"  FAILED (exit {proc.returncode}); see {log}", flush=True)
        return None
    seconds = round(time.time() - start, 1)
    (run_dir / "done.json").write_text(json.dumps({"seconds": seconds, "cmd": cmd}))
    print(f"  done: {run_dir.relative_to(run_dir.parents[1])} in {seconds:.0f} s", flush=True)
    return run_dir


def run_all(jobs: list[tuple[str, list[str], Path]], workers: int) -> dict[Path, Path | None]:
    """Runs ``(label, cmd, run_dir)`` jobs, ``workers`` at a time, each its own process; returns run_dir -> result."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i_job):
        i, (label, cmd, run_dir) = i_job
        if not finished(run_dir, cmd):
            print(f"[{i + 1}/{len(jobs)}] {label}", flush=True)
        return run_dir, run_one(cmd, run_dir)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(pool.map(one, enumerate(jobs)))


def metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's CSV log."""
    with next((run_dir / "csv").rglob("metrics.csv")).open() as f:  # not an evaluation's beside it (mechanism/)
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> list[float]:
    """The values ``key`` was logged with, in order."""
    return [float(r[key]) for r in rows if r.get(key)]


def curve(rows: list[dict], metric: str = PRIMARY) -> list[tuple[int, float]]:
    """(rollouts consumed, metric) at each evaluation of a run (``metrics``); the first precedes any update."""
    key = next(k for k in rows[0] if k.startswith("val/") and k.endswith(f"/{metric}"))
    per_step = {int(r["step"]): float(r["train/samples"]) for r in rows if r.get("train/samples")}
    points = []
    for r in rows:
        if not r.get(key):
            continue
        step = int(r["step"])
        rollouts = 0 if not points else int(sum(v for s, v in per_step.items() if s <= step))
        points.append((rollouts, float(r[key])))
    return points


def flops_per_rollout(method: str, length: float, n_student: int, n_teacher: int) -> float:
    """Approximate FLOPs a rollout costs (2 per parameter and token forward, 4 backward; prompts not counted):
    on-policy methods decode with the student (2 N_s), score with the teacher (2 N_t) and train (6 N_s); SFT
    decodes with the teacher (2 N_t) and trains (6 N_s); GRPO decodes and trains the student only."""
    if method == "sft":
        return length * (2 * n_teacher + 6 * n_student)
    if method == "grpo":
        return length * 8 * n_student
    return length * (8 * n_student + 2 * n_teacher)


# ---------------------------------------------------------------------------------------------------------- analysis

def gap_closed(acc: float, warm: float, teacher: float) -> float:
    """g = (acc - warm) / (teacher - warm)."""
    return (acc - warm) / (teacher - warm)


def area_under_g(points: list[tuple[float, float]], budget: float) -> float:
    """Area under g against log(rollouts) between the first evaluation after the start and ``budget``, normalised to
    [0, 1] (g clipped to [0, 1]; a trapezoid per pair of evaluations)."""
    pts = sorted((x, min(max(g, 0.0), 1.0)) for x, g in points if 0 < x <= budget)
    if len(pts) < 2:
        return float("nan")
    lo, hi = math.log(pts[0][0]), math.log(budget)
    area = sum((math.log(x1) - math.log(x0)) * (g0 + g1) / 2 for (x0, g0), (x1, g1) in itertools.pairwise(pts))
    if pts[-1][0] < budget:  # the last value held to the budget
        area += (hi - math.log(pts[-1][0])) * pts[-1][1]
    return area / (hi - lo) if hi > lo else float("nan")


def rollouts_to(points: list[tuple[float, float]], target: float) -> float:
    """The first evaluation's rollouts at which g reaches ``target``; inf when it never does (censored)."""
    return next((x for x, g in sorted(points) if g >= target), math.inf)


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences."""
    n = len(diffs)
    mean = statistics.mean(diffs)
    if n < 2:
        return mean, float("nan"), float("nan")
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def analyse(rows: list[dict], refs: dict, budget: float) -> dict:
    """Per arm and method: g curves per seed, area under g, rollouts to g = 0.5, finals."""
    out = defaultdict(dict)
    runs = defaultdict(lambda: defaultdict(list))
    for r in rows:
        runs[(r["arm"], r["method"])][r["seed"]].append((r["samples"], r["val_acc"]))
    for (arm, method), seeds in runs.items():
        teacher, warm = refs[arm]["teacher_acc"], refs[arm]["warm_acc"]
        per_seed = {}
        for seed, pts in seeds.items():
            g = [(x, gap_closed(a, warm, teacher)) for x, a in sorted(pts)]
            per_seed[seed] = {"g": g, "auc": area_under_g(g, budget), "to_half": rollouts_to(g, 0.5),
                              "final": max(pts)[1]}
        out[arm][method] = per_seed
    return out


def paired(result: dict, arm: str, method: str, other: str, key: str = "auc") -> tuple[int, tuple] | None:
    a, b = result[arm].get(method, {}), result[arm].get(other, {})
    common = sorted(set(a) & set(b))
    diffs = [a[s][key] - b[s][key] for s in common if math.isfinite(a[s][key]) and math.isfinite(b[s][key])]
    return (len(diffs), t_interval(diffs)) if diffs else None


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """"mean ± sd", or the one value where there is one seed (no spread to state)."""
    mean = f"{scale * statistics.mean(values):.{digits}f}"
    return f"{mean} ± {scale * sd(values):.{digits}f}" if len(values) > 1 else f"{mean} (one seed)"


def fmt_rollouts(values: list[float], budget: float) -> str:
    """The median of rollouts to a target, censored at ``budget`` unless more than half the seeds reach it."""
    reached = sum(math.isfinite(v) for v in values)
    if 2 * reached <= len(values):
        return f"> {budget:,.0f} ({reached}/{len(values)})"
    return f"{statistics.median(values):,.0f} ({reached}/{len(values)})"


def report(result: dict, refs: dict, budget: float, greedy: dict, kls: dict | None = None,
           cosines: dict | None = None, mechanisms: dict | None = None, failed: list[str] | None = None) -> str:
    """The analysis's text; ``greedy``: final greedy accuracies per (arm, method); ``kls``: final (reverse, forward)
    exact KLs to the teacher on the held-out traces per (arm, method); ``cosines``: the method's gradient's cosines
    with the exact reverse KL's, per (arm, method); ``mechanisms``: ``carry_measure``'s per (arm, method or
    "warm start"); ``failed``: the runs that failed (named, never silently missing)."""
    kls, cosines, mechanisms = kls or {}, cosines or {}, mechanisms or {}
    lines = [("Primary comparisons, stated before the runs: on the regime arm, (1) REOPOLD vs vanilla OPD and (2) "
              "REOPOLD vs SFT on teacher samples, by the area under g against log(rollouts) (paired by seed); (3) "
              "GRPO's rollouts to g = 0.5 over REOPOLD's. The control arm is read the same way."), "",
             (f"Every run evaluates the same {TEST_PROMPTS} test prompts before training and every {EVAL_EVERY} steps "
              f"({EVAL_EVERY * PROMPTS_PER_STEP} rollouts). The area under g is a trapezoid sum in log(rollouts) from "
              f"the first evaluation after the start ({EVAL_EVERY * PROMPTS_PER_STEP} rollouts) to the budget, so the "
              "first doubling weighs as much as the last; every method keeps the main job's schedule, a linear "
              f"warm-up over 20 steps ({20 * PROMPTS_PER_STEP:,} rollouts) of the {STEPS}, so the area weighs the "
              "warm-up heavily. Each method runs at its own tuned rate (column lr)."), ""]
    if failed:
        lines += [f"Failed runs, left out (the next call retries them): {', '.join(failed)}.", ""]
    for arm in ("regime", "control"):
        if arm not in result:
            continue
        ref = refs[arm]
        lines += [f"## Arm `{arm}`", "",
                  (f"teacher {PRIMARY} {100 * ref['teacher_acc']:.1f}%, warm start {100 * ref['warm_acc']:.1f}% "
                   f"(mean over the arm's runs before training), {TEST_PROMPTS} test prompts, budget "
                   f"{budget:,.0f} rollouts."), "",
                  (f"| method | lr | seeds | final {PRIMARY} (mean ± sd) | final greedy (mean) | final g (mean) | "
                   "area under g (mean ± sd) | rollouts to g = 0.5 (median; seeds reaching) | "
                   "final KL(student ‖ teacher) / KL(teacher ‖ student), held-out traces (mean) | "
                   "gradient cosine with exact reverse KL (mean over steps and seeds) |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method in METHODS:
            seeds = result[arm].get(method)
            if not seeds:
                continue
            finals = [s["final"] for s in seeds.values()]
            aucs = [s["auc"] for s in seeds.values() if math.isfinite(s["auc"])]
            g_final = [gap_closed(f, ref["warm_acc"], ref["teacher_acc"]) for f in finals]
            greedy_final = greedy.get((arm, method), [])
            lines.append(
                f"| {method} | {refs.get('lr', {}).get(method, '-')} | {len(seeds)} | {spread(finals)} | "
                + (f"{100 * statistics.mean(greedy_final):.1f}" if greedy_final else "-")
                + f" | {statistics.mean(g_final):.2f} | "
                + (spread(aucs, 1.0, 3) if aucs else "-")
                + f" | {fmt_rollouts([s['to_half'] for s in seeds.values()], budget)} | "
                + (" / ".join(f"{statistics.mean(v):.4f}" for v in zip(*kls[(arm, method)]))
                   if kls.get((arm, method)) else "-") + " | "
                + (f"{statistics.mean(cosines[(arm, method)]):.3f}" if cosines.get((arm, method)) else "-") + " |")
        lines += ["", "Paired differences against REOPOLD (by seed), area under g, 95% t-interval:", "",
                  "| method | seeds paired | REOPOLD - method | 95% interval |", "|---|---|---|---|"]
        for method in METHODS:
            if method == "reopold":
                continue
            p = paired(result, arm, "reopold", method)
            if p:
                n, (mean, lo, hi) = p
                interval = f"[{lo:+.3f}, {hi:+.3f}]" if n > 1 else "n/a (one seed)"
                lines.append(f"| {method} | {n} | {mean:+.3f} | {interval} |")
        rate = refs.get("lr", {})
        confounded = [m for m in METHODS if m.startswith("reopold_") and m in result[arm]
                      and rate.get(m) != rate.get("reopold")]
        if confounded:
            lines += ["", ("Tuned to another rate than REOPOLD's " + f"({rate.get('reopold')}): "
                           + ", ".join(f"{m} ({rate.get(m)})" for m in confounded)
                           + "; a difference from REOPOLD there is the rate's as much as the ablated part's.")]
        r, g = result[arm].get("reopold", {}), result[arm].get("grpo", {})
        if r and g:
            rr = [s["to_half"] for s in r.values()]
            gg = [s["to_half"] for s in g.values()]
            ratios = [g[k]["to_half"] / r[k]["to_half"] for k in sorted(set(r) & set(g))
                      if math.isfinite(g[k]["to_half"]) and math.isfinite(r[k]["to_half"])]
            lines += ["", ("GRPO's rollouts to g = 0.5 over REOPOLD's (medians, censored at the budget): "
                           f"{fmt_rollouts(gg, budget)} / {fmt_rollouts(rr, budget)}; by seed, where both reach it: "
                           + (f"median ratio {statistics.median(ratios):.2f} ({min(ratios):.2f} to {max(ratios):.2f}, "
                              f"{len(ratios)} seed{'s' * (len(ratios) != 1)})" if ratios else "no seed") + ".")]
        measured = [m for m in ("warm start", *METHODS) if mechanisms.get((arm, m))]
        if measured:
            lines += ["", ("The mechanism, from greedy responses to the same test prompts (`carry_measure`): on the "
                           "problems with a carry into the hundreds, the share whose hundreds line adds it and the "
                           "accuracy; on the others, the accuracy (final students: mean ± sd over seeds):"), "",
                      "| student | seeds | carry into the hundreds written | accuracy, with that carry | accuracy, "
                      "without |", "|---|---|---|---|---|"]
            for m in measured:
                ms = mechanisms[(arm, m)]
                cells = [spread(v) if m != "warm start" else f"{100 * v[0]:.1f}"
                         for v in ([x[k] for x in ms] for k in ("carry_written", "acc_carry", "acc_no_carry"))]
                lines.append(f"| {m if m == 'warm start' else m + ' (final)'} | {len(ms) if m != 'warm start' else '-'} | "
                             + " | ".join(cells) + " |")
            warm = mechanisms.get((arm, "warm start"), [{}])[0]
            if "pass@8" in warm:
                lines += ["", (f"The warm start's samples at temperature {TEMPERATURE} (8 a prompt): "
                               + (f"{100 * warm['carry_written_sampled']:.1f}% of those to a problem with a carry "
                                  "into the hundreds add it (what the on-policy methods can reinforce); "
                                  if "carry_written_sampled" in warm else "")
                               + f"pass@8 {100 * warm['pass@8']:.1f}%, avg@8 {100 * warm['avg@8']:.1f}% (GRPO's "
                               "signal: the share of groups of 8 with a right sample).")]
        lines.append("")
    return "\n".join(lines)


def mean_curve(per_seed: list[list[tuple[float, float]]]) -> tuple[list[float], list[float]]:
    """The x values any seed has and, at each, the mean over the seeds that have it."""
    points = [dict(pts) for pts in per_seed]
    xs = sorted({x for pts in points for x in pts})
    return xs, [statistics.mean(pts[x] for pts in points if x in pts) for x in xs]


def plot(result: dict, flops: dict, path: Path, kl_curves: dict | None = None) -> None:
    """g against rollouts and against FLOPs, and the exact reverse KL to the teacher on the held-out traces against
    rollouts (``kl_curves``: per (arm, method), per seed, (rollouts, KL) points); a method keeps its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = dict(zip(METHODS, plt.get_cmap("tab10").colors))

    def line(method: str) -> dict:
        return {"linestyle": "--" if method.startswith("reopold_") else "-", "color": colour[method], "label": method,
                "linewidth": 2.4 if method == "reopold" else 1.3}

    kl_curves = kl_curves or {}
    arms = [a for a in ("regime", "control") if a in result]
    fig, axes = plt.subplots(3, len(arms), figsize=(6.5 * len(arms), 12.5), squeeze=False)
    for col, arm in enumerate(arms):
        for method, seeds in kl_curves.get(arm, {}).items():
            xs, mean = mean_curve(list(seeds.values()))
            axes[2][col].plot([max(x, 16) for x in xs], mean, **line(method))
        ax = axes[2][col]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rollouts (the start drawn at 16)")
        ax.set_ylabel("exact KL(student ‖ teacher) per token")
        ax.set_title(f"{arm}: reverse KL on held-out teacher traces (mean over seeds)")
        ax.grid(alpha=0.3)
        if kl_curves.get(arm):
            ax.legend(fontsize=7, ncol=2)
        for method, seeds in result[arm].items():
            # log axes: from the first update on
            xs, mean = mean_curve([[(x, g) for x, g in s["g"] if x > 0] for s in seeds.values()])
            axes[0][col].plot(xs, mean, **line(method))
            per = flops.get((arm, method))
            if per:
                axes[1][col].plot([x * per for x in xs], mean, **line(method))
        for row, xlabel in enumerate(("rollouts", "FLOPs (approximate)")):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
            ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("gap closed g (mean over seeds)")
            ax.set_title(f"{arm}: g against {xlabel.split(' ')[0]}")
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------------- main

def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["arm", "method", "seed", "samples", "val_acc"])
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return [{"arm": r["arm"], "method": r["method"], "seed": int(r["seed"]), "samples": int(r["samples"]),
                 "val_acc": float(r["val_acc"])} for r in csv.DictReader(f)]


def tune(methods: list[str], runs: Path, workers: int = 1) -> dict:
    folder = {(method, lr): runs / "tune" / f"{method}-lr{lr:g}" for method in methods for lr in LR_GRID}
    results = run_all([(f"tune {method} lr {lr:g}", train_cmd("regime", method, TUNE_SEED, lr, run_dir, "val"), run_dir)
                       for (method, lr), run_dir in folder.items()], workers)
    chosen = {}
    for method in methods:
        scores = {lr: statistics.mean(a for _, a in curve(metrics(run_dir))[1:]) for lr in LR_GRID
                  if (run_dir := results[folder[method, lr]])}
        if scores:
            chosen[method] = max(scores, key=scores.get)
            print(f"[tune] {method}: " + ", ".join(f"{lr:g} -> {s:.3f}" for lr, s in scores.items())
                  + f"; chosen {chosen[method]:g}", flush=True)
    return chosen


# --------------------------------------------------------------------------------------------------------- mechanism

def mechanism_cmd(arm: str, seed: int, model_dir: Path | None, out: Path) -> list[str]:
    """Greedy evaluation of a run's final student (``model_dir``) on the study's test prompts, every response kept
    (``samples.jsonl``); for the arm's warm start (``model_dir`` None) also 8 samples a prompt at the study's
    temperature (its pass@8: whether GRPO has a signal to learn from)."""
    model = (["model=pretrained", f"model.student.path={model_dir}"] if model_dir is not None
             else ["model=mini_math", *ARMS[arm], "k=8", f"rollout.temperature={TEMPERATURE}"])
    return [sys.executable, "src/eval.py", "data=mini_math", "model.teacher=null", "accel=cpu", f"seed={seed}",
            f"data.test.n={TEST_PROMPTS}", "k=0", "rollout.max_new_tokens=48", *model, f"hydra.run.dir={out}"]


def test_rows(cmd: list[str]) -> list[dict]:
    """The test rows an evaluation command reads, in its order: its composed config's ``data.test``."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    overrides = [o for o in cmd[2:] if not o.startswith("hydra.")]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return instantiate(compose("eval", overrides=overrides).data.test)()


def carry_measure(samples: Path, rows: list[dict]) -> dict:
    """The mechanism, from the responses in ``samples`` (``src/eval.py``'s ``samples.jsonl``) to ``rows`` (the test rows
    it read, ``test_rows``): on the problems with a carry into the hundreds, the share of greedy responses whose
    hundreds line adds it (``carry_written``) and their accuracy; on the others, the accuracy; where the file holds
    sampled responses too, the share of those that add it (``carry_written_sampled``: what on-policy methods see)."""
    from src.datamodules.arithmetic import carries_into

    greedy, sampled = defaultdict(int), defaultdict(int)
    for line in samples.read_text().splitlines():
        r = json.loads(line)
        row = rows[int(r["prompt_id"])]
        if r["reference"] != row["answer"]:
            raise ValueError(f"{samples}: prompt {r['prompt_id']} answers {r['reference']}, the test rows given have "
                             f"{row['answer']}: not the prompts this evaluation read")
        a, b = map(int, row["prompt"].rstrip("=").split("+"))
        count = greedy if r["sample"] == -1 else sampled
        if 2 in carries_into(a, b):
            steps = r["response"].split("\n")
            count["carry"] += 1
            count["written"] += len(steps) > 2 and steps[2].startswith(f"{a // 100 % 10}+{b // 100 % 10}+1=")
            count["right"] += r["correct"]
        else:
            count["other"] += 1
            count["right_other"] += r["correct"]
    out = {"carry_written": greedy["written"] / greedy["carry"], "acc_carry": greedy["right"] / greedy["carry"],
           "acc_no_carry": greedy["right_other"] / max(greedy["other"], 1), "problems_with_carry": greedy["carry"]}
    if sampled["carry"]:
        out["carry_written_sampled"] = sampled["written"] / sampled["carry"]
    return out


def mechanism(runs: Path, arms: list[str], workers: int) -> None:
    """The mechanism measure of every finished run's final student and of each arm's warm start (``mechanism.json``
    beside each evaluation; a finished one is kept, a failed one reported and retried on the next call). The
    evaluations run as the study's runs do (``run_all``); the measures are taken here after."""
    jobs = []
    for arm in arms:
        for done in sorted((runs / arm).glob("*/done.json")):
            seed = int(done.parent.name.rsplit("-seed", 1)[1])
            out = done.parent / "mechanism"
            jobs.append((f"mechanism {arm} {done.parent.name}", mechanism_cmd(arm, seed, done.parent / "hf" / "final", out),
                         out))
        warm = runs / "warm" / arm  # apart from the arm's runs
        jobs.append((f"mechanism {arm} warm start", mechanism_cmd(arm, 0, None, warm), warm))
    jobs = [job for job in jobs if not (job[2] / "mechanism.json").exists()]

    def data_of(cmd: list[str]) -> tuple[str, ...]:
        return tuple(o for o in cmd[2:] if o.startswith(("data", "seed")))

    rows = {}  # composed before the threads start, once per distinct data: Hydra's global state is not for threads
    for _, cmd, _ in jobs:
        if data_of(cmd) not in rows:
            rows[data_of(cmd)] = test_rows(cmd)
    evaluated = run_all(jobs, workers)
    for label, cmd, out in jobs:
        if evaluated[out] is None:  # run_one named its log
            continue
        measure = carry_measure(out / "samples.jsonl", rows[data_of(cmd)])
        metrics = json.loads((out / "meta.json").read_text())["metrics"]
        measure.update({k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.endswith(("/pass@8", "/avg@8"))})
        (out / "mechanism.json").write_text(json.dumps(measure))
    if failed := [label for label, _, out in jobs if evaluated[out] is None]:
        print(f"[mechanism] {len(failed)} of {len(jobs)} evaluations failed (rerun to retry): {', '.join(failed)}")


def teacher_ref(runs: Path) -> float | None:
    out = runs / "teacher_eval"
    meta = out / "meta.json"
    if not meta.exists():
        cmd = [sys.executable, "src/eval.py", "data=mini_math", "model=mini_math", "model.teacher=null",
               "model.student.experiment=mini_math_teacher", f"data.test.n={TEST_PROMPTS}", f"k={EVAL_SAMPLES}",
               f"rollout.temperature={TEMPERATURE}", f"hydra.run.dir={out}", "rollout.max_new_tokens=48"]
        print("[refs] the teacher on the test set", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with (runs / "teacher_eval.log").open("w") as f:
            if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False, env=env).returncode:
                print(f"  FAILED; see {runs / 'teacher_eval.log'}", flush=True)
                return None
    metrics = json.loads(meta.read_text())["metrics"]
    return next(v for k, v in metrics.items() if k.endswith(f"/{PRIMARY}"))


def main(argv=None) -> None:
    global STEPS, EVAL_EVERY, TEST_PROMPTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", nargs="+", default=["tune", "refs", "runs", "mechanism"],
                    choices=["tune", "refs", "runs", "mechanism"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--extra-seeds", nargs="*", type=int, default=[5, 6, 7, 8, 9], help="REOPOLD and OPD only")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "sample_efficiency")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument("--steps", type=int, default=STEPS, help="a quick check of the pipeline: fewer steps")
    ap.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    ap.add_argument("--test-prompts", type=int, default=TEST_PROMPTS)
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each (2 on a 2-core machine)")
    args = ap.parse_args(argv)
    other_design = (args.steps, args.eval_every, args.test_prompts) != (STEPS, EVAL_EVERY, TEST_PROMPTS)
    if other_design and (args.runs == ap.get_default("runs") or args.out == ap.get_default("out")):
        ap.error("another design (--steps, --eval-every, --test-prompts) needs its own --runs and --out folders: "
                 "in the study's, its runs would replace the study's finished ones and its tables the study's")
    STEPS, EVAL_EVERY, TEST_PROMPTS = args.steps, args.eval_every, args.test_prompts
    args.runs.mkdir(parents=True, exist_ok=True)
    refs_path = args.runs / "refs.json"
    refs = json.loads(refs_path.read_text()) if refs_path.exists() else {}
    if not args.analyse_only:
        if "tune" in args.phases:
            refs["lr"] = {**refs.get("lr", {}), **tune(args.methods, args.runs, args.jobs)}
            refs_path.write_text(json.dumps(refs, indent=1))
        if "refs" in args.phases:
            teacher = teacher_ref(args.runs)
            if teacher is not None:
                refs["teacher_acc"] = teacher
                refs_path.write_text(json.dumps(refs, indent=1))
        if "runs" in args.phases:
            plan = [(arm, method, seed) for seed in sorted(set(args.seeds) | set(args.extra_seeds))
                    for arm in args.arms for method in args.methods
                    if seed in args.seeds or method in ("reopold", "opd")]
            jobs = []
            for arm, method, seed in plan:
                lr = refs.get("lr", {}).get(method)
                if lr is None:
                    print(f"{arm} {method} seed {seed}: no tuned lr yet (--phases tune)")
                    continue
                run_dir = args.runs / arm / f"{method}-seed{seed}"
                jobs.append((f"{arm} {method} seed {seed} lr {lr:g}", train_cmd(arm, method, seed, lr, run_dir, "test"),
                             run_dir))
            run_all(jobs, args.jobs)
        if "mechanism" in args.phases:
            mechanism(args.runs, args.arms, args.jobs)
    write_outputs(args.runs, args.out, refs)


def write_outputs(runs: Path, out: Path, refs: dict) -> None:
    rows, greedy, lengths, kls, cosines = [], defaultdict(list), defaultdict(list), defaultdict(list), defaultdict(list)
    mechanisms = defaultdict(list)  # (arm, method or "warm start") -> mechanism.json's
    kl_curves = defaultdict(dict)  # arm -> method -> seed -> [(rollouts, exact reverse KL)]
    failed = [f"{f.parent.parent.name} {f.parent.name}" for f in sorted(runs.glob("*/*/failed.json"))
              if f.parent.parent.name in ARMS]
    for measured in sorted(runs.glob("*/*/mechanism/mechanism.json")):
        mechanisms[(measured.parents[2].name, measured.parents[1].name.rsplit("-seed", 1)[0])].append(
            json.loads(measured.read_text()))
    for measured in sorted(runs.glob("warm/*/mechanism.json")):
        mechanisms[(measured.parent.name, "warm start")].append(json.loads(measured.read_text()))
    for done in sorted(runs.glob("*/*/done.json")):
        run_dir = done.parent
        arm = run_dir.parent.name
        if arm not in ARMS:
            continue
        method, seed = run_dir.name.rsplit("-seed", 1)
        logged = metrics(run_dir)
        rows += [{"arm": arm, "method": method, "seed": int(seed), "samples": x, "val_acc": a}
                 for x, a in curve(logged)]
        greedy[(arm, method)].append(curve(logged, SECONDARY)[-1][1])
        if method != "grpo":  # the diagnostics need a teacher
            reverse = curve(logged, "reverse_kl")
            kls[(arm, method)].append((reverse[-1][1], curve(logged, "forward_kl")[-1][1]))
            kl_curves[arm].setdefault(method, {})[int(seed)] = reverse
            cosines[(arm, method)] += column(logged, "train/grad_cos_exact_rkl")
        lengths[(arm, method)] += column(logged, "train/response_len")  # for the FLOPs count
    if not rows:
        print("no finished runs yet")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "sample_efficiency.csv")
    arm_refs = {}
    for arm in ARMS:
        warm = [r["val_acc"] for r in rows if r["arm"] == arm and r["samples"] == 0]
        if warm and refs.get("teacher_acc") is not None:
            arm_refs[arm] = {"teacher_acc": refs["teacher_acc"], "warm_acc": statistics.mean(warm)}
    (out / "sample_efficiency_refs.json").write_text(json.dumps(
        {**arm_refs, "metric": f"{PRIMARY} at temperature {TEMPERATURE} on {TEST_PROMPTS} test prompts",
         "lr": refs.get("lr", {})}, indent=1))
    if not arm_refs:
        print("no teacher reference yet (--phases refs)")
        return
    budget = STEPS * PROMPTS_PER_STEP
    result = analyse([r for r in rows if r["arm"] in arm_refs], arm_refs, budget)
    n_student, n_teacher = parameter_counts()
    flops = {k: flops_per_rollout(k[1], statistics.mean(v), n_student, n_teacher) for k, v in lengths.items() if v}
    text = report(result, {**arm_refs, "lr": refs.get("lr", {})}, budget, greedy, kls, cosines, mechanisms, failed)
    (out / "sample_efficiency_analysis.md").write_text(
        "# Sample efficiency: the study's tables\n\nWritten by `python benchmarks/sample_efficiency.py` from the runs "
        f"under `{runs.relative_to(ROOT) if runs.is_relative_to(ROOT) else runs}`; figure: "
        "`sample_efficiency.png` (g against rollouts and against approximate FLOPs: student "
        f"{n_student:,} and teacher {n_teacher:,} parameters, `flops_per_rollout`).\n\n" + text)
    plot(result, flops, out / "sample_efficiency.png", kl_curves)
    print(text)


def parameter_counts() -> tuple[int, int]:
    """The student's and the teacher's parameter counts, from the cached stages' configs (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from src.modules.models.stages import StageModel

    cache = os.environ.get("REOPOLD_CACHE", str(ROOT / ".cache"))
    counts = []
    for name in ("mini_math_student_init", "mini_math_teacher"):
        stage = StageModel(name, cache_dir=cache)
        _ = stage.stage_cfg  # resolves stage.path
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(stage.path))
        counts.append(sum(p.numel() for p in model.parameters()))
    return counts[0], counts[1]


if __name__ == "__main__":
    main()
