"""Rollout wall time of the two ``HFGenerateRollout`` backends, back to back on the peer benchmark's student.

    python ../shared/peers/tiny_setup.py FIXTURES          # once
    python benchmarks/rollout_ab.py FIXTURES [--rounds 15] [--batch 64] [--max-new-tokens 32]

Each round times one rollout (64 prompts, 32 new tokens, temperature 1: the throughput benchmark's) with
each backend, in alternating order, so both see the same machine load; prints the median wall and CPU
(process time: less sensitive to other processes on a shared machine) seconds of each, and the median of
the per-round ratios ``generate / loop``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--backends", default="loop,generate")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from src.modules.rollout import HFGenerateRollout

    fx = Path(args.fixtures)
    tok = AutoTokenizer.from_pretrained(fx / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(fx / "student", dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (fx / "prompts.jsonl").read_text().splitlines()[: args.batch]]
    enc = tok.apply_chat_template([r["prompt"] for r in rows], add_generation_prompt=True, padding=True,
                                  return_tensors="pt", return_dict=True)
    backends = args.backends.split(",")
    rollouts = {b: HFGenerateRollout(max_new_tokens=args.max_new_tokens, backend=b) for b in backends}
    secs, cpu = {b: [] for b in backends}, {b: [] for b in backends}
    for r in range(args.rounds + 1):  # round 0 warms up
        for b in backends if r % 2 else backends[::-1]:
            torch.manual_seed(r)
            t0, c0 = time.perf_counter(), time.process_time()
            rollouts[b](model, enc["input_ids"], enc["attention_mask"], [tok.eos_token_id], tok.pad_token_id)
            if r:
                secs[b].append(time.perf_counter() - t0)
                cpu[b].append(time.process_time() - c0)
    out = {b: statistics.median(s) for b, s in secs.items()}
    out.update({f"{b}_cpu": statistics.median(s) for b, s in cpu.items()})
    print(f"threads={torch.get_num_threads()} batch={args.batch} max_new_tokens={args.max_new_tokens} "
          f"rounds={args.rounds} loadavg1={os.getloadavg()[0]:.2f}")
    for b in backends:
        print(f"{b}: wall median {out[b] * 1e3:.1f} ms (min {min(secs[b]) * 1e3:.1f}), "
              f"cpu median {out[b + '_cpu'] * 1e3:.1f} ms")
    if len(backends) == 2:
        a, g = backends
        out["ratio"] = statistics.median(y / x for x, y in zip(secs[a], secs[g]))
        out["cpu_ratio"] = statistics.median(y / x for x, y in zip(cpu[a], cpu[g]))
        print(f"median per-round ratio {g}/{a}: wall {out['ratio']:.2f}x, cpu {out['cpu_ratio']:.2f}x")
    return out


if __name__ == "__main__":
    main()
