"""Would running the teacher's prompt prefill beside the student's decode pay on two CPU cores? (It did not.)

    python benchmarks/prefill_overlap.py FIXTURES        # FIXTURES: ../shared/peers/tiny_setup.py's folder

The teacher needs only the prompts before the responses exist, so its prompt columns could be computed in a
second thread while the student decodes. On the benchmark's first batch this prints the medians (of 7) of the
decode (``module.generate``) and of the teacher's ``FusedScorer.prefill`` over the prompts, with 2 and with 1
intra-op threads, then both together in two Python threads. Keep the machine otherwise idle. Figures and the
conclusion: docs/results/performance.md, "Rerun: 2026-11-27 (session 12)".
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import throughput  # noqa: E402


def median_ms(fn, n: int = 7) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[n // 2]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures")
    args = ap.parse_args(argv)
    from src.modules.decode import kv_cache
    from src.modules.fast_score import FusedScorer

    build_args = argparse.Namespace(fixtures=args.fixtures, algorithm="reopold", max_new_tokens=32, seed=0,
                                    overrides=[], batch=64, ranks=1, warmup=1, phases=False, steps=1)
    _, module, dm, _, _ = throughput.build(build_args)
    module.configure_model()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ro = module.generate(batch)
    P = ro.response_start
    ids, mask = ro.input_ids[:, :P], ro.attention_mask[:, :P]
    scorer = FusedScorer.for_model(module.teacher)
    if scorer is None:
        raise SystemExit("the teacher has no fused scorer here; nothing to measure")

    def prefill():
        with torch.no_grad():
            scorer.prefill(ids, mask, kv_cache(module.teacher, P + 32))

    def together():
        t = threading.Thread(target=prefill)
        t.start()
        module.generate(batch)
        t.join()

    out = {}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        out[f"decode_{threads}t"] = median_ms(lambda: module.generate(batch))
        out[f"prefill_{threads}t"] = median_ms(prefill)
        out[f"together_{threads}t"] = median_ms(together)
    for k, v in out.items():
        print(f"{k}_ms={v:.1f}")
    print(f"sequential_2t_ms={out['decode_2t'] + out['prefill_2t']:.1f} (the default) vs "
          f"together_1t_ms={out['together_1t']:.1f}")
    return out


if __name__ == "__main__":
    main()
