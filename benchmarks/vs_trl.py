"""This framework against TRL's DistillationTrainer (and the plain PyTorch floor), interleaved.

    python benchmarks/vs_trl.py FIXTURES --trl-python /path/to/trl-venv/bin/python [--rounds 3]
    python benchmarks/vs_trl.py REAL_FIXTURES --trl-python ... --batch 8 --max-new-tokens 64 --steps 3 --warmup 1

Each round runs ``trl`` (``../shared/peers/trl_opd_bench.py`` in the TRL venv), ``plain``
(``plain_opd_bench.py``) and ``reopold`` (``benchmarks/throughput.py``) once, in that order, on the same
fixtures (built with ``tiny_setup.py`` when missing) and settings, and prints each run's samples/s, the
CPU time other processes took meanwhile (a run above ``--max-others`` % of a core is redone, as the peers'
``run_bench.sh`` does) and its peak resident set, and per round the ratio of each of this framework's forms to
trl (``--variant hf=accel=none`` adds this framework without its CPU wing). Ratios drift far less than raw rates
on these machines, so the summary is the median per-round ratio. ``--out`` writes the figures as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers"
LINE = re.compile(r"^steps=(\d+) samples=(\d+) seconds=([\d.]+) samples_per_s=([\d.]+) gen_tokens_per_s=([\d.]+)")


def busy_seconds() -> float:
    """Machine-wide non-idle CPU seconds so far (/proc/stat)."""
    fields = open("/proc/stat").readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run(cmd: list[str]) -> tuple[float, float, float, float]:
    """(samples/s, gen tokens/s, CPU % of one core used by other processes, peak RSS in GiB) of one benchmark run.

    The peak is the process's own resident-set high-water mark (``wait4``'s ``ru_maxrss``), the figure
    ``/usr/bin/time -v`` prints as "Maximum resident set size"."""
    b0, t0 = busy_seconds(), time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall, busy = time.time() - t0, busy_seconds() - b0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    own = usage.ru_utime + usage.ru_stime
    m = next(LINE.match(line) for line in stdout.splitlines()[::-1] if LINE.match(line))
    return float(m.group(4)), float(m.group(5)), max(0.0, (busy - own) / wall * 100), usage.ru_maxrss / 2**20


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures")
    ap.add_argument("--trl-python", required=True, help="python of a venv with trl (see ../shared/peers/README.md)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="prompts per step (the peers' default: 64)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens per response (the peers' default: 32)")
    ap.add_argument("--max-others", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDE[,OVERRIDE...]",
                    help="also run reopold with these comma-separated Hydra overrides (none may hold a comma), "
                         "e.g. hf=accel=none")
    args = ap.parse_args(argv)
    fx = Path(args.fixtures)
    if not (fx / "prompts.jsonl").exists():
        subprocess.run([sys.executable, str(PEERS / "tiny_setup.py"), str(fx)], check=True, capture_output=True)
    common = [str(fx), "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
              "--max-new-tokens", str(args.max_new_tokens)]
    variants = {
        "trl": [args.trl_python, str(PEERS / "trl_opd_bench.py"), *common],
        "plain": [sys.executable, str(PEERS / "plain_opd_bench.py"), *common],
        "reopold": [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), *common],
    }
    for spec in args.variant:
        name, sep, overrides = spec.partition("=")
        if not sep or not overrides or name in variants:
            ap.error(f"--variant wants a new NAME=OVERRIDE[,OVERRIDE...], got {spec!r}")
        variants[name] = [*variants["reopold"], *overrides.split(",")]
    results = {v: [] for v in variants}
    peaks = {v: [] for v in variants}
    ours = [v for v in variants if v not in ("trl", "plain")]
    for r in range(1, args.rounds + 1):
        for name, cmd in variants.items():
            for attempt in range(5):
                sps, tps, others, rss = run(cmd)
                if others <= args.max_others or attempt == 4:
                    break
                print(f"round {r} {name}: DISCARDED (others {others:.0f}% of a core)", flush=True)
                time.sleep(5)
            results[name].append(sps)
            peaks[name].append(rss)
            print(f"round {r} {name:8s} samples_per_s={sps:7.2f} gen_tokens_per_s={tps:8.1f} peak_rss_gib={rss:.2f} "
                  f"others_cpu_pct={others:.0f}", flush=True)
        others = "".join(f" {v}/trl={results[v][-1] / results['trl'][-1]:.2f}" for v in ours[1:])
        print(f"round {r} ratio reopold/trl={results['reopold'][-1] / results['trl'][-1]:.2f} "
              f"reopold/plain={results['reopold'][-1] / results['plain'][-1]:.2f}{others}", flush=True)
    summary = {f"{v}_samples_per_s": statistics.median(x) for v, x in results.items()}
    to_trl = {v: [a / b for a, b in zip(results[v], results["trl"])] for v in ours}  # per round
    for v in ours:  # the median per-round ratio of each of this framework's forms to TRL
        summary[f"ratio_{v}_trl"] = statistics.median(to_trl[v])
    summary["ratio_reopold_plain"] = statistics.median(a / b for a, b in zip(results["reopold"], results["plain"]))
    summary.update({f"{v}_peak_rss_gib": max(x) for v, x in peaks.items()})  # the highest over the rounds
    print(" ".join(f"{k}={v:.2f}" for k, v in summary.items()), flush=True)
    if args.out:
        names = list(results)
        rates = " | ".join(f"{summary[f'{n}_samples_per_s']:.2f}" for n in names)
        flag = "".join(f" --variant {v}" for v in args.variant)
        if (args.batch, args.max_new_tokens, args.steps, args.warmup) != (64, 32, 20, 2):
            flag = (f" --batch {args.batch} --max-new-tokens {args.max_new_tokens} --steps {args.steps} "
                    f"--warmup {args.warmup}") + flag
        heads = " | ".join(f"{v} / trl" for v in ours)
        ratios = " | ".join(f"{summary[f'ratio_{v}_trl']:.2f}x" for v in ours)
        rss = " | ".join(f"{summary[f'{n}_peak_rss_gib']:.2f}" for n in names)
        spread = " | ".join(f"{min(to_trl[v]):.2f}x to {max(to_trl[v]):.2f}x" for v in ours)
        args.out.write_text(
            f"`python benchmarks/vs_trl.py FIXTURES --trl-python VENV/bin/python --rounds {args.rounds}{flag}` "
            f"({os.cpu_count()} cores), median of {args.rounds} interleaved rounds, samples/s, the median "
            f"per-round ratios (and their range over the rounds), and each process's peak RSS in GiB (the highest "
            f"over the rounds):\n\n| | {' | '.join(names)} | {heads} |\n|---|{'---|' * (len(names) + len(ours))}\n"
            f"| samples/s | {rates} | {ratios} |\n| per-round range | {' | '.join('' for _ in names)} | {spread} |\n"
            f"| peak RSS, GiB | {rss} | {' | '.join('' for _ in ours)} |\n")
    return summary


if __name__ == "__main__":
    main()
