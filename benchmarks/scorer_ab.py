"""The scorers alone, A/B in one process, on the peer benchmark's models and a real rollout of its prompts.

    python ../shared/peers/tiny_setup.py FIXTURES          # once
    python benchmarks/scorer_ab.py FIXTURES [--pairs 16] [--no-keep-freed-memory]

Samples 32 tokens for the peers' first 64 prompts with the student (``--max-new-tokens``, ``--batch``), then times, in interleaved pairs (the
order alternating, so both sides see the same machine load), the teacher's scoring (no grad) and the
student's scoring forward and backward, each way:

- ``fused`` against ``hf``: ``FusedScorer`` (``src/modules/fast_score.py``) against the Hugging Face forward;
- ``prefix`` against ``no_prefix``: the fused scorer with and without computing the shared leading columns
  once (the peers' prompts all open with the same 6 tokens).

- ``prefill``: the decode loop's prefill of the 64 prompts (KV cache filled, last position's logits), through
  ``FusedScorer.prefill`` against the model's own forward;
- with ``--against OTHER/src/modules/fast_score.py``: this checkout's ``FusedScorer`` against another version's
  (e.g. ``git worktree add /tmp/prev <commit>``), backbone only (no head), teacher and student forward+backward.

Prints the median milliseconds of each side, and the minor page faults per teacher forward (the allocator
setting of ``src/utils/allocator.py`` is applied unless ``--no-keep-freed-memory``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def interleaved(fns: dict, pairs: int) -> dict[str, float]:
    """Median seconds of each of two callables, run ``pairs`` times each in alternating order."""
    (a, fa), (b, fb) = fns.items()
    times = {a: [], b: []}
    for f in (fa, fb, fa, fb):  # warm-up
        f()
    for i in range(pairs):
        for name, f in ((a, fa), (b, fb)) if i % 2 else ((b, fb), (a, fa)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def prefill_fn(model, enc, fused: bool):
    """The decode loop's prefill of ``enc``'s prompts into a fresh cache, and the last position's logits."""
    from src.modules.decode import _forward_keywords, kv_cache
    from src.modules.fast_score import FusedScorer
    from src.modules.scoring import position_ids_from_mask

    ids, mask = enc["input_ids"], enc["attention_mask"]
    cache_kw = _forward_keywords(model)[0]

    def run():
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                cache = kv_cache(model, ids.shape[1] + 1)
                if fused:
                    h = FusedScorer.for_model(model).prefill(ids, mask, cache)
                    return model.get_output_embeddings()(h)
                out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                            use_cache=True, logits_to_keep=1, **{cache_kw: cache})
                return out.logits[:, -1]
        finally:
            model.train(was_training)
    return run


def against(path: str, student, teacher, ids, mask, start, pairs: int) -> dict:
    """This checkout's ``FusedScorer`` against the one in ``path`` (loaded as a separate module), backbone only."""
    import importlib.util

    from src.modules.fast_score import FusedScorer

    spec = importlib.util.spec_from_file_location("fast_score_other", path)
    other = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = other  # dataclasses look their module up there
    spec.loader.exec_module(other)
    scorers = {"this": (FusedScorer(student), FusedScorer(teacher)),
               "other": (other.FusedScorer(student), other.FusedScorer(teacher))}
    grad = torch.randn(ids.shape[0], ids.shape[1] - start, student.config.hidden_size)

    def student_fn(k):
        def run():
            student.zero_grad(set_to_none=True)
            scorers[k][0](ids, mask, start).backward(grad)
        return run

    def teacher_fn(k):
        def run():
            with torch.no_grad():
                scorers[k][1](ids, mask, start)
        return run

    with torch.no_grad():
        diff = (scorers["this"][1](ids, mask, start) - scorers["other"][1](ids, mask, start)).abs().max()
    print(f"against {path}: teacher hidden states differ by at most {float(diff):.2e}")
    return {"against_teacher": interleaved({"this": teacher_fn("this"), "other": teacher_fn("other")}, pairs),
            "against_student": interleaved({"this": student_fn("this"), "other": student_fn("other")}, pairs)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false")
    ap.add_argument("--against", metavar="FAST_SCORE_PY", help="another version's src/modules/fast_score.py")
    args = ap.parse_args(argv)
    if args.keep_freed_memory:
        from src.utils.allocator import keep_freed_memory

        keep_freed_memory()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from src.modules.fast_score import FusedScorer
    from src.modules.rollout import HFGenerateRollout
    from src.modules.scoring import score_response

    fx = Path(args.fixtures)
    tok = AutoTokenizer.from_pretrained(fx / "tokenizer")
    student = AutoModelForCausalLM.from_pretrained(fx / "student", dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(fx / "teacher", dtype=torch.float32).eval().requires_grad_(False)
    rows = [json.loads(line) for line in (fx / "prompts.jsonl").read_text().splitlines()[: args.batch]]
    enc = tok.apply_chat_template([r["prompt"] for r in rows], add_generation_prompt=True, padding=True,
                                  return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    ro = HFGenerateRollout(max_new_tokens=args.max_new_tokens)(student, enc["input_ids"], enc["attention_mask"],
                                              [tok.eos_token_id], tok.pad_token_id)
    student.train()
    ids, mask, start = ro.input_ids, ro.attention_mask, ro.response_start
    shared = FusedScorer.shared_prefix(ids, mask, start)

    def teacher_fn(fused):
        def run():
            with torch.no_grad():
                score_response(teacher, ids, mask, start, fused=fused)
        return run

    def student_fn(fused):
        def run():
            student.zero_grad(set_to_none=True)
            logp, _ = score_response(student, ids, mask, start, with_entropy=True, fused=fused)
            (logp * ro.response_mask_BT).sum().backward()
        return run

    def without_prefix(fn):
        def run():
            keep = FusedScorer.__dict__["shared_prefix"]  # the staticmethod itself
            FusedScorer.shared_prefix = staticmethod(lambda *a: 0)
            try:
                fn()
            finally:
                FusedScorer.shared_prefix = keep
        return run

    out = {}
    for name, make in (("teacher", teacher_fn), ("student", student_fn)):
        out[f"{name}_fused_vs_hf"] = interleaved({"fused": make(True), "hf": make(False)}, args.pairs)
        out[f"{name}_prefix"] = interleaved({"prefix": make(True), "no_prefix": without_prefix(make(True))},
                                            args.pairs)
    out["prefill"] = interleaved({"fused": prefill_fn(student, enc, True), "hf": prefill_fn(student, enc, False)},
                                 args.pairs)
    if args.against:
        out.update(against(args.against, student, teacher, ids, mask, start, args.pairs))
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        teacher_fn(True)()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5
    print(f"batch={tuple(ids.shape)} response_start={start} shared_prefix={shared} threads={torch.get_num_threads()} "
          f"keep_freed_memory={args.keep_freed_memory} pairs={args.pairs} loadavg1={os.getloadavg()[0]:.2f}")
    for key, medians in out.items():
        print(f"{key}: " + " ".join(f"{k}={v * 1e3:.1f}ms" for k, v in medians.items()))
    print(f"page_faults_per_teacher_forward={faults:.0f}")
    out["page_faults_per_teacher_forward"], out["shared_prefix"] = faults, shared
    return out


if __name__ == "__main__":
    main()
