"""Does every miniature reproduce on another machine? A stand-in for another CPU: each miniature built and run from an
empty stage cache with 1 and with 2 threads (another summation order, as another CPU's kernels give) and 3 seeds.

Per miniature and thread count the stages are built once (their configs fix their own seeds, so the run's seed does
not change them) into a cache of their own; each seed then runs the miniature's main job on them. A stage that
misses its declared check (``stage_check``, ``src/modules/models/stages.py``) stops its run, and the row says so.

    python benchmarks/reproducibility.py [--miniatures math visual tools] [--seeds 0 1 2] [--threads 1 2]
        [--out runs/reproducibility] [--table TABLE.md] [--jobs 2] [--table-only]

One ``src/train.py`` process per run, ``OMP_NUM_THREADS`` set; a finished run's ``result.json`` is kept and skipped
on a rerun (resumable; a run that stopped on an error, or was stopped, runs again, its folder kept aside as
``run.stopped-<time>``, and a stage build that was stopped resumes from its last checkpoint); the table covers
every run under ``--out``, from this call or an earlier one (``--table-only`` writes it without running). ``--jobs
2`` runs two one-thread runs at once (2 cores). The table has a row per miniature, thread count and seed (the
stages' validation metrics, teacher, student before and after on the test split) and a spread per miniature;
``--table FILE`` writes it alone into FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "callbacks.progress_bar=null"]
MINIATURES = {  # name -> the main job's overrides (what the README's command runs)
    "math": [],
    "visual": ["experiment=visual_reasoning", "miniature=visual"],
    "tools": ["experiment=tool_use", "miniature=tools"],
    # seconds: what the suite runs (tests/test_reproducibility.py); tiny random models, no stages
    "tiny": ["experiment=reopold_tiny", "trainer.max_steps=2", "data.batch_size=8", "data.train.n=64",
             "data.val.n=8", "data.test.n=8", "rollout.max_new_tokens=8", "test=false",
             "+callbacks.report._target_=src.callbacks.report.DistillationReport", "+callbacks.report.split=test"],
}


def stage_metrics(cache: Path) -> dict[str, dict]:
    """Each built stage's declared check and what it reached, from its ``stage.json``."""
    out = {}
    for record in sorted((cache / "stages").glob("*/stage.json")):
        data = json.loads(record.read_text())
        check = (data.get("config") or {}).get("stage_check") or {}
        metric = check.get("metric")
        out[data["experiment"]] = {"metric": metric, "value": data["metrics"].get(metric) if metric else None,
                                   "min": check.get("min"), "max": check.get("max")}
    return out


def run(out: Path, miniature: str, threads: int, seed: int) -> dict:
    folder = out / miniature / f"t{threads}" / f"seed{seed}"
    done = folder / "result.json"
    if done.exists():
        result = json.loads(done.read_text())
        if result["status"] == "ok" or result["status"].startswith("stage check failed"):
            return result  # a finished run; one that stopped on an error runs again
    if (folder / "run").exists():  # a run that stopped before it finished: kept aside, the seed runs again
        os.rename(folder / "run", folder / f"run.stopped-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.mkdir(parents=True, exist_ok=True)
    cache = out / miniature / f"t{threads}" / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "src/train.py", *MINIATURES[miniature], f"seed={seed}", f"paths.cache_dir={cache}",
           f"paths.log_dir={folder / 'logs'}", f"hydra.run.dir={folder / 'run'}", *QUIET]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    (folder / "train.log").write_text(proc.stdout + proc.stderr)
    result = {"miniature": miniature, "threads": threads, "seed": seed,
              "seconds": round(time.perf_counter() - start, 1), "stages": stage_metrics(cache)}
    if proc.returncode != 0:
        failed = [line for line in (proc.stdout + proc.stderr).splitlines() if "StageCheckError" in line]
        result["status"] = ("stage check failed: " + failed[-1].split("StageCheckError:")[-1].strip()) if failed \
            else f"error (exit {proc.returncode}; log: {folder / 'train.log'})"
    else:
        (report,) = (folder / "run").rglob("report.json")
        table = json.loads(report.read_text())
        result.update(status="ok", **{role.replace(" ", "_"): table[role]["acc"]
                                      for role in ("teacher", "student before", "student after")})
    done.write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict]) -> str:
    lines = ["| miniature | threads | seed | stages (validation) | teacher | student before | student after | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        stages = "; ".join(f"{name} {s['value']:.3f}" for name, s in r["stages"].items() if s["value"] is not None)
        figures = [f"{r[k]:.1%}" if k in r else "-" for k in ("teacher", "student_before", "student_after")]
        lines.append(f"| {r['miniature']} | {r['threads']} | {r['seed']} | {stages or '-'} | {' | '.join(figures)} | "
                     f"{r['status']} |")
    lines += ["", "| miniature | runs ok | student before (min to max) | student after (min to max) |",
              "|---|---|---|---|"]
    for name in dict.fromkeys(r["miniature"] for r in results):
        ok = [r for r in results if r["miniature"] == name and r["status"] == "ok"]
        n = sum(r["miniature"] == name for r in results)
        spread = [f"{min(r[k] for r in ok):.1%} to {max(r[k] for r in ok):.1%}" if ok else "-"
                  for k in ("student_before", "student_after")]
        lines.append(f"| {name} | {len(ok)} of {n} | {spread[0]} | {spread[1]} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--miniatures", nargs="+", default=["math", "visual", "tools"], choices=list(MINIATURES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "reproducibility")
    parser.add_argument("--table", type=Path, default=None, help="also write the table here")
    parser.add_argument("--jobs", type=int, default=1, help="one-thread runs at once")
    parser.add_argument("--table-only", action="store_true", help="write the table of the runs already done")
    args = parser.parse_args()
    cases = [] if args.table_only else [(m, t, s) for m in args.miniatures for t in args.threads for s in args.seeds]
    def go(case):
        r = run(args.out, *case)
        print(f"{r['miniature']:7s} t{r['threads']} seed {r['seed']}: {r['status']} "
              + (f"teacher {r['teacher']:.3f} before {r['student_before']:.3f} after {r['student_after']:.3f}"
                 if r["status"] == "ok" else "") + f" ({r['seconds']:.0f} s)", flush=True)

    # one-thread runs share the cores; the stages of a cache are built once (a lock)
    for m in ([] if args.table_only else args.miniatures):
        single = [c for c in cases if c[0] == m and c[1] == 1]
        if single:
            go(single[0])  # builds the stages alone, then the other seeds run on them
            with ThreadPoolExecutor(max(1, args.jobs)) as pool:
                list(pool.map(go, single[1:]))
        for case in (c for c in cases if c[0] == m and c[1] != 1):
            go(case)
    # every run under --out, from this call or an earlier one (the benchmark is resumable across sittings)
    order = {name: i for i, name in enumerate(MINIATURES)}
    everything = sorted((json.loads(f.read_text()) for f in args.out.glob("*/t*/seed*/result.json")),
                        key=lambda r: (order.get(r["miniature"], 99), r["threads"], r["seed"]))
    text = table(everything)
    (args.out / "results.md").write_text(text)
    if args.table:
        args.table.write_text(text)
    print(text)
    return 0 if all(r["status"] == "ok" for r in everything) else 1


if __name__ == "__main__":
    sys.exit(main())
