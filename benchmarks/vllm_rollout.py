"""Rollout tokens/s: Hugging Face ``generate`` and the lean loop (``HFGenerateRollout``) against vLLM
(``VLLMRollout``), on a 0.5B-class Qwen2 with random weights (Qwen2.5-0.5B's shapes), plus the vLLM backend's
weight sync: its time, and whether the engine samples from the policy's current weights after an optimiser step.

Each backend runs in its own process (a fresh GPU, and no engine state carried between them):

    python benchmarks/vllm_rollout.py --out docs/results/vllm_rollout.json              # GPU, all backends
    python benchmarks/vllm_rollout.py --tiny --device cpu --backends loop,vllm-eager    # a CPU smoke run

Backends: ``generate`` (HF ``generate`` with the rollout's log-prob recorder), ``loop`` (the default rollout
backend), ``vllm-eager`` (``enforce_eager=True``: no CUDA graphs or compilation) and ``vllm`` (vLLM's defaults).
Tokens/s counts the sampled response tokens over the generation time (``Rollout.seconds``); ``call_s`` is the
whole rollout call, which for vLLM includes the policy's log-prob and entropy pass. Random weights put EOS at
about 1/vocab per token, so every response runs the full budget: the same work for each backend.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True)


def build_model(args):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**(TINY if args.tiny else QWEN25_05B), bos_token_id=0, eos_token_id=1)
    dtype = getattr(torch, args.dtype)
    model = Qwen2ForCausalLM(cfg).to(dtype=dtype, device=args.device).eval()
    return model


def make_rollout(backend: str, args):
    from src.modules.rollout.hf import HFGenerateRollout
    from src.modules.rollout.vllm import VLLMRollout

    common = dict(max_new_tokens=args.new_tokens, num_samples=args.samples, temperature=1.0)
    if backend in ("generate", "loop"):
        return HFGenerateRollout(backend=backend, **common)
    if backend.startswith("vllm"):
        return VLLMRollout(enforce_eager=backend == "vllm-eager", gpu_memory_utilization=args.gpu_memory_utilization,
                           max_model_len=args.prompt_len + args.new_tokens + 16, **common)
    raise ValueError(f"--backends: unknown backend {backend!r}")


def worker(backend: str, args) -> dict:
    import torch

    from src.modules.scoring import score_tokens

    model = build_model(args)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (args.prompts, args.prompt_len), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    eos = [1]
    ro_fn = make_rollout(backend, args)
    sync = lambda: torch.cuda.synchronize() if args.device == "cuda" else None  # noqa: E731

    def call(seed):
        torch.manual_seed(seed)
        sync()
        t0 = time.perf_counter()
        ro = ro_fn(model, ids, mask, eos, 0)
        sync()
        return ro, time.perf_counter() - t0

    t0 = time.perf_counter()
    ro, _ = call(0)  # warm-up; builds the vLLM engine
    out = {"backend": backend, "first_call_s": round(time.perf_counter() - t0, 2)}
    tok_s, call_s = [], []
    for r in range(args.repeats):
        ro, wall = call(100 + r)
        n = int(ro.response_mask_BT.sum())
        tok_s.append(n / ro.seconds)
        call_s.append(wall)
    out.update(sequences=int(ro.input_ids.shape[0]), tokens_per_call=n, gen_tokens_per_s=round(statistics.median(tok_s)),
               gen_tokens_per_s_all=[round(x) for x in tok_s], call_s=round(statistics.median(call_s), 3),
               peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None)
    if "vllm_logp_gap" in ro.metrics:
        out["vllm_logp_gap"] = float(ro.metrics["vllm_logp_gap"])

    if backend == "vllm-eager" and args.device != "cpu":  # one check is enough; the compiled engine loads alike
        try:
            out["sync"] = check_sync(model, ids, mask, eos, ro_fn, score_tokens)
        except Exception as e:  # noqa: BLE001 - the throughput figures above still count
            out["sync"] = {"error": repr(e)[-1500:]}
    return out


def check_sync(model, ids, mask, eos, ro_fn, score_tokens) -> dict:
    """One AdamW step on the policy (fused on CUDA), then: a rollout that pretends the engine is current (stale weights) and
    one that syncs. ``vllm_logp_gap`` (mean |vLLM - policy| log-prob of the sampled tokens) should jump on the
    stale engine and fall back to the rounding level after the sync."""
    import torch

    from src.modules.rollout.weights_version import weights_key

    model.train()
    # fused on CUDA, as the training default: its step moves no parameter version (see src/modules/rollout/weights_version.py)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, fused=model.device.type == "cuda")
    sub_ids, sub_mask = ids[:8], mask[:8]
    torch.manual_seed(7)
    ro = ro_fn(model, sub_ids, sub_mask, eos, 0)
    logp, _ = score_tokens(model, ro.input_ids, ro.attention_mask, ro.response_start, 1.0, with_entropy=False)
    loss = -(logp * ro.response_mask_BT).sum() / ro.response_mask_BT.sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    before = dict(syncs=ro_fn.syncs, gap=float(ro.metrics["vllm_logp_gap"]))
    ro_fn._synced = weights_key(model)  # pretend: the engine keeps the pre-step weights
    torch.manual_seed(8)
    stale = ro_fn(model, sub_ids, sub_mask, eos, 0)
    ro_fn._synced = None
    sync_s = []
    for k in range(3):  # the sync's time, after a change each time
        with torch.no_grad():
            next(model.parameters()).add_(0.0)  # bumps a version: the next rollout copies all weights in
        torch.manual_seed(9 + k)
        synced = ro_fn(model, sub_ids, sub_mask, eos, 0)
        sync_s.append(float(synced.metrics["vllm_sync_s"]))
    return {"before_step_gap": before["gap"], "stale_gap": float(stale.metrics["vllm_logp_gap"]),
            "synced_gap": float(synced.metrics["vllm_logp_gap"]), "sync_s": [round(s, 4) for s in sync_s],
            "syncs": ro_fn.syncs}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="generate,loop,vllm-eager,vllm")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="a tiny Qwen2 (smoke runs) instead of the 0.5B shapes")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=4, help="responses per prompt")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--timeout", type=float, default=240, help="seconds per backend")
    p.add_argument("--out", default=None, help="a JSON file for the results (appended to as each backend ends)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return
    results = []
    argv = sys.argv[1:]
    for backend in args.backends.split(","):
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, *argv, "--worker", backend], capture_output=True,
                                  text=True, timeout=args.timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(lines[-1][7:]) if lines else {"backend": backend, "error": proc.stderr[-3000:]}
        except subprocess.TimeoutExpired as e:
            res = {"backend": backend, "error": f"timed out after {args.timeout} s",
                   "stderr_tail": (e.stderr or b"")[-2000:].decode(errors="replace") if e.stderr else ""}
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        print(json.dumps(res), flush=True)
        if args.out:
            import torch

            meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__, "model": "tiny" if args.tiny else "Qwen2.5-0.5B shapes, random",
                    "dtype": args.dtype, "prompts": args.prompts, "samples": args.samples,
                    "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                    "command": "python benchmarks/vllm_rollout.py " + " ".join(argv)}
            try:
                import vllm

                meta["vllm"] = vllm.__version__
            except ImportError:
                pass
            Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print("\nbackend       gen tok/s   call s   first call s")
    for r in results:
        if "error" in r:
            print(f"{r['backend']:<13} error: {r['error'].strip().splitlines()[-1] if r['error'].strip() else ''}")
        else:
            print(f"{r['backend']:<13} {r['gen_tokens_per_s']:>9}   {r['call_s']:>6}   {r['first_call_s']:>6}")


if __name__ == "__main__":
    main()
