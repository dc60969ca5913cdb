"""The compiled decode step (``rollout.fused_decode=compiled``) against the eager fused step, on any device:
the same sampled and greedy tokens, and the time of a rollout. A tiny Qwen2 built here (hidden 128, 4 layers,
random weights), 64 prompts of 24 tokens (8 left-padded), 32 new tokens, fp32:

    python benchmarks/compiled_decode.py --device cuda     # as run on a lent H100 (docs/results/performance.md)
    python benchmarks/compiled_decode.py --device cpu

The first compiled rollout includes the compilation; the timings after it alternate the two steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import torch

    from src.modules.decode import sample
    from src.modules.models import TinyQwen2

    spec = TinyQwen2(cache_dir=tempfile.mkdtemp(), hidden_size=128, num_layers=4, seed=5)
    model, tok = spec.load_model().to(args.device).eval(), spec.load_tokenizer()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (64, 24), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    mask[:8, :5] = 0
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run(fused, greedy=False, seed=0):
        torch.manual_seed(seed)
        sync()
        t = time.perf_counter()
        out = sample(model, ids, mask, [tok.eos_token_id], tok.pad_token_id, 32, greedy=greedy, fused=fused)
        sync()
        return out, time.perf_counter() - t

    t0 = time.perf_counter()
    compiled, _ = run("compiled")
    print(f"first compiled rollout: {time.perf_counter() - t0:.1f} s")
    eager, _ = run(True)
    print(f"sampled tokens equal: {torch.equal(compiled[0], eager[0])}; "
          f"log-prob max diff {float((compiled[1] - eager[1]).abs().max()):.2g}")
    print(f"greedy tokens equal: {torch.equal(run('compiled', True)[0][0], run(True, True)[0][0])}")
    for fused in ("compiled", True, "compiled", True):
        ms = statistics.median(run(fused, seed=i)[1] for i in range(args.repeats)) * 1e3
        print(f"fused_decode={fused}: rollout {ms:.1f} ms (median of {args.repeats})")


if __name__ == "__main__":
    main()
