"""Peak memory of the scorer at Qwen2.5's vocabulary (V = 151,936): chunked head against full logits.

A one-layer Qwen2 (hidden 64) keeps the backbone's own memory small, so the output head over the
vocabulary dominates, as it does for small students of large-vocabulary teachers. Three paths are
measured, each in the training pattern of ``src/modules/scoring.py``'s ``Scorer``: the teacher's log-probs under
``no_grad`` (``Scorer.teacher_logp``), then the student's log-probs and entropies with gradients, and the
backward of a per-token policy-gradient loss on them (``Scorer.student_logp``):

    backbone   the backbone alone: hidden states forward (+ backward of a trivial loss), no head.
               This is "the model's own weights and activations"; weights are resident beforehand.
    project    ``score_tokens``: the head applied ``chunk_size`` tokens at a time (``_ChunkLogpEntropy``).
    naive      ``model(...).logits``: full [B, P + T, V] logits, then ``reference_logp_entropy``.

overhead = peak(path) - peak(backbone); the target is overhead <= 1.5 GB (GB = 1e9 bytes here).
The full-size naive path does not fit (its fp32 logits alone are B * (P + T) * V * 4 bytes, ~20 GB),
so it is measured at small sizes and its overhead extrapolated linearly in the token count.

How peak memory is measured. Every (path, size) runs in a fresh Python process (this script with
``--case``), after building both models, allocating the inputs, and one tiny warm-up pass (so lazily
initialised kernels and thread pools are not counted). Then, per phase:
  CPU   the kernel's resident-set high-water mark is reset to the current RSS (``5`` written to
        ``/proc/self/clear_refs``); after the phase, peak = that mark (``VmHWM`` in
        ``/proc/self/status``) minus the RSS (``VmRSS``) read just before the first phase. Tensors
        above 32 MB are mmapped by glibc and go back to the OS when freed, so RSS tracks live tensors.
        ``VmHWM``, not ``getrusage``'s ``ru_maxrss``: the latter also keeps the high-water mark of the
        memory the process replaced at ``exec``, which after ``fork`` is the parent's RSS, so a large
        parent (a pytest session) showed through every phase. Where the mark cannot be reset
        (``per_phase`` false in the result), it is the process's, and a phase's figure includes
        what ran before it; elsewhere than Linux, ``ru_maxrss`` stands in for it.
  CUDA  ``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated`` minus ``memory_allocated``
        before the first phase (allocator figures, not ``nvidia-smi``'s reserved memory).

    python benchmarks/memory.py                        # 8 x 4096, writes docs/results/performance.md
    python benchmarks/memory.py --chunk-sizes 1024 512 256 128
    python benchmarks/memory.py --quick                # 2 x 160 tokens, prints only (the test)
    python benchmarks/memory.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 151_936
TARGET_GB = 1.5
GB = 1e9
SECTION = "## Memory"
BEGIN, END = "<!-- benchmarks/memory.py: begin -->", "<!-- benchmarks/memory.py: end -->"


# ---------------------------------------------------------------- one measurement (child process)
def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Meter:
    """Peak bytes above the level recorded by ``start()``, per phase (see the module docstring)."""

    def __init__(self, device):
        self.device = device
        self.base = 0
        self.per_phase = True

    def _rss(self) -> int:
        kb = _status_kb("VmRSS")
        if kb is None:  # not Linux: the best available stand-in
            self.per_phase = False
            return self._maxrss()
        return kb * 1024

    @staticmethod
    def _maxrss() -> int:
        kb = _status_kb("VmHWM")  # this address space's mark: the one clear_refs resets
        if kb is not None:
            return kb * 1024
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux

    def start(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()

    def reset(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.per_phase = False
            return
        if self._maxrss() > self._rss() + 16 * 2**20:  # accepted, but the mark did not come down
            self.per_phase = False

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._maxrss() - self.base


def build_model(seed: int, device):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(device)


def _teacher_phase(case, teacher, ids_BS, mask_BS, P, temperature, chunk_size):
    """Teacher log-probs of the response under no_grad, as ``Scorer.teacher_logp``."""
    import torch

    from src.modules.scoring import hf_backbone, position_ids_from_mask, score_tokens

    with torch.no_grad():
        if case == "backbone":
            return hf_backbone(teacher, ids_BS, mask_BS, P).float().mean(-1)
        if case == "project":
            return score_tokens(teacher, ids_BS, mask_BS, P, temperature, chunk_size, with_entropy=False)[0]
        logits_BSV = teacher(input_ids=ids_BS, attention_mask=mask_BS, use_cache=False,
                             position_ids=position_ids_from_mask(mask_BS)).logits
        logp_BTV = torch.log_softmax(logits_BSV[:, P - 1 : -1].float() / temperature, dim=-1)
        return logp_BTV.gather(-1, ids_BS[:, P:, None]).squeeze(-1)


def _student_phase(case, student, ids_BS, mask_BS, P, temperature, chunk_size, teacher_logp_BT):
    """Student log-probs + entropies with gradients, then the backward of a per-token PG loss."""
    from src.modules.scoring import hf_backbone, position_ids_from_mask, reference_logp_entropy, score_tokens

    if case == "backbone":
        loss = hf_backbone(student, ids_BS, mask_BS, P).float().square().mean()
    else:
        if case == "project":
            logp_BT, entropy_BT = score_tokens(student, ids_BS, mask_BS, P, temperature, chunk_size)
        else:
            logits_BSV = student(input_ids=ids_BS, attention_mask=mask_BS, use_cache=False,
                                 position_ids=position_ids_from_mask(mask_BS)).logits
            target_BT = ids_BS[:, P:]
            logp_BT, entropy_BT = reference_logp_entropy(logits_BSV[:, P - 1 : -1], target_BT, temperature)
            del logits_BSV
        advantage_BT = teacher_logp_BT - logp_BT.detach()  # reverse-KL reward, as the objectives use
        loss = -(advantage_BT * logp_BT).mean() - 1e-3 * entropy_BT.mean()
    loss.backward()
    return float(loss)


def measure(case: str, batch: int, seq: int, prompt: int, chunk_size: int, device: str,
            temperature: float = 0.6) -> dict:
    """Peak memory (bytes above the pre-work level) and seconds of each phase of ``case``."""
    import torch

    dev = torch.device(device)
    student, teacher = build_model(0, dev), build_model(1, dev)
    teacher.eval().requires_grad_(False)
    student.train()
    g = torch.Generator().manual_seed(0)

    def inputs(B, S):
        return (torch.randint(0, VOCAB, (B, S), generator=g).to(dev),
                torch.ones(B, S, dtype=torch.long, device=dev))

    # warm-up at a tiny size: kernels, thread pools and lazy module state are not what we measure
    ids, mask = inputs(1, prompt + 8)
    t_lp = _teacher_phase(case, teacher, ids, mask, prompt, temperature, chunk_size)
    _student_phase(case, student, ids, mask, prompt, temperature, chunk_size, t_lp)
    student.zero_grad(set_to_none=True)
    del ids, mask, t_lp

    ids_BS, mask_BS = inputs(batch, seq)
    meter = Meter(dev)
    meter.start()
    out = {"case": case, "batch": batch, "seq": seq, "prompt": prompt, "chunk_size": chunk_size,
           "device": device, "base_bytes": meter.base}
    for phase in ("teacher", "student"):
        meter.reset()
        t0 = time.perf_counter()
        if phase == "teacher":
            teacher_logp_BT = _teacher_phase(case, teacher, ids_BS, mask_BS, prompt, temperature, chunk_size)
        else:
            loss = _student_phase(case, student, ids_BS, mask_BS, prompt, temperature, chunk_size,
                                  teacher_logp_BT)
            out["finite"] = bool(torch.isfinite(torch.tensor(loss)))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out[f"{phase}_s"] = time.perf_counter() - t0
        out[f"{phase}_peak"] = meter.peak()
    out["peak"] = max(out["teacher_peak"], out["student_peak"])
    out["per_phase"] = meter.per_phase
    return out


# ---------------------------------------------------------------- orchestration (parent process)
def run_case(case: str, batch: int, seq: int, prompt: int, chunk_size: int, device: str) -> dict:
    """``measure`` in a fresh process, so no earlier measurement's memory is counted."""
    cmd = [sys.executable, __file__, "--case", case, "--batch", str(batch), "--seq", str(seq),
           "--prompt", str(prompt), "--chunk-size", str(chunk_size), "--device", device]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{case} {batch}x{seq} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(l for l in reversed(proc.stdout.splitlines()) if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def extrapolate(points: list[tuple[int, float]], tokens: int) -> float:
    """Least-squares line through (tokens, bytes) points, evaluated at ``tokens``."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else my / mx
    return my + slope * (tokens - mx)


def gb(x: float) -> str:
    return f"{x / GB:.2f}"


def machine() -> str:
    import torch

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()} Linux {platform.release()}, nproc {os.cpu_count()}, {ram:.0f} GiB RAM, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _rule(n: int) -> str:
    return "|" + "---|" * n


def _phases(r: dict) -> tuple[str, str, str]:
    return gb(r["teacher_peak"]), gb(r["student_peak"]), gb(r["peak"])


def _secs(r: dict) -> tuple[str, str]:
    return f"{r['student_s']:.1f}", f"{r['teacher_s']:.1f}"


def report(args, rows: dict, naive_pts: list[dict], sweep: list[dict]) -> tuple[str, dict]:
    """The markdown tables, and a summary (bytes) for callers and tests."""
    B, S, P = args.batch, args.seq, args.prompt
    tokens = B * S
    base = rows["backbone"]["peak"]
    project = rows["project"]
    chunk = project["chunk_size"]
    overhead = project["peak"] - base
    logits_bytes = tokens * VOCAB * 4
    if "naive" in rows:
        naive_peak = rows["naive"]["peak"]
    else:
        pts = [(r["batch"] * r["seq"], r["peak"] - r["backbone_peak"]) for r in naive_pts]
        naive_peak = base + extrapolate(pts, tokens)
        sizes = ", ".join(f"{r['batch']}x{r['seq']}" for r in naive_pts)
    met = overhead <= TARGET_GB * GB
    lines = [
        f"Qwen2 (V = {VOCAB:,}, hidden 64, 1 layer, 4 heads / 2 KV heads), random weights, "
        "student + teacher; "
        f"{B} x {S} tokens (prompt {P}, response {S - P}), temperature 0.6, device `{args.device}`.",
        "Peak = memory above the level after both models and the inputs exist (GB = 1e9 bytes); "
        "phases: teacher log-probs under `no_grad`, then student log-probs + entropy with the backward.",
        "",
        _row("path", "teacher phase peak", "student fwd+bwd peak", "peak", "overhead over backbone",
             "student s", "teacher s"),
        _rule(7),
        _row("backbone only (no head)", *_phases(rows["backbone"]), "—", *_secs(rows["backbone"])),
        _row(f"`score_tokens`, chunk {chunk}", *_phases(project), f"**{gb(overhead)}**", *_secs(project)),
    ]
    if "naive" in rows:
        naive = rows["naive"]
        lines.append(_row("naive full logits", *_phases(naive), gb(naive_peak - base), *_secs(naive)))
    else:
        lines.append(_row(f"naive full logits (**extrapolated**, not measured: linear fit through {sizes})",
                          "—", "—", f"~{gb(naive_peak)}", f"~{gb(naive_peak - base)}", "—", "—"))
    lines += ["", f"fp32 logits alone, {B} x {S} x {VOCAB:,} x 4 bytes: {gb(logits_bytes)} GB "
                  f"(one chunk of {chunk} tokens: {gb(chunk * VOCAB * 4)} GB).",
              f"Target (overhead <= {TARGET_GB} GB): **{'met' if met else 'NOT met'}** at chunk "
              f"{chunk} ({gb(overhead)} GB)."]
    per_phase = all(r.get("per_phase", True) for r in [*rows.values(), *naive_pts, *sweep])
    if not per_phase:
        lines += ["", "**Caution:** the resident-set high-water mark could not be reset on this machine, so "
                      "each peak is the process's since it started (model build included), not the phase's."]
    if naive_pts:
        measured = ", ".join(f"{r['batch']} x {r['seq']}: {gb(r['peak'] - r['backbone_peak'])} GB over the backbone"
                             for r in naive_pts)
        lines += ["", f"The naive path, measured at sizes that fit: {measured}."]
    if sweep:
        lines += ["", f"Chunk size against peak ({B} x {S}):", "",
                  _row("chunk_size", "logits per chunk", "teacher peak", "student peak", "overhead", "target",
                       "student s", "teacher s"), _rule(8)]
        for r in sweep:
            o = r["peak"] - base
            lines.append(_row(r["chunk_size"], gb(r["chunk_size"] * VOCAB * 4), *_phases(r)[:2], gb(o),
                              "met" if o <= TARGET_GB * GB else "not met", *_secs(r)))
    summary = {"backbone_peak": base, "project_peak": project["peak"], "overhead": overhead,
               "naive_peak": naive_peak, "naive_overhead": naive_peak - base,
               "naive_extrapolated": "naive" not in rows, "logits_bytes": logits_bytes, "target_met": met,
               "finite": project["finite"], "per_phase": per_phase,
               "sweep": {r["chunk_size"]: r["peak"] - base for r in sweep}}
    return "\n".join(lines), summary


def write_section(path: Path, body: str) -> None:
    """Put ``body`` between this script's markers in the ``## Memory`` section of ``path``.

    Text outside the markers (other sections, notes written by hand under the heading) is kept.
    """
    text = path.read_text() if path.exists() else "# Performance\n"
    block = f"{BEGIN}\n{body.strip()}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    elif SECTION + "\n" in text:
        at = text.index(SECTION + "\n") + len(SECTION) + 1
        text = text[:at] + "\n" + block + "\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + SECTION + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence, prompt included")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens (response_start)")
    p.add_argument("--chunk-size", type=int, default=1024, help="the scorer's chunk (the module's default)")
    p.add_argument("--chunk-sizes", type=int, nargs="*", default=[], help="extra chunk sizes to sweep")
    p.add_argument("--naive-sizes", nargs="*", default=["1x512", "1x1024"],
                   help="BxS sizes at which the naive path is measured when the full size would not fit")
    p.add_argument("--quick", action="store_true", help="2 x 160 tokens, chunk 256, naive measured, no file")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "performance.md")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--case", choices=["backbone", "project", "naive"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.case:
        print("RESULT " + json.dumps(measure(args.case, args.batch, args.seq, args.prompt, args.chunk_size,
                                               args.device)), flush=True)
        return {}
    if args.quick:
        args.batch, args.seq, args.prompt, args.chunk_size, args.no_write = 2, 160, 32, 256, True
    size = (args.batch, args.seq, args.prompt)
    print(machine(), flush=True)

    def run(case, *sz, chunk=args.chunk_size):
        r = run_case(case, *sz, chunk, args.device)
        print(f"  {case:8s} {sz[0]}x{sz[1]} chunk {chunk}: peak {gb(r['peak'])} GB "
              f"(teacher {gb(r['teacher_peak'])}, student {gb(r['student_peak'])}), "
              f"{r['teacher_s'] + r['student_s']:.1f} s", flush=True)
        return r

    rows = {"backbone": run("backbone", *size), "project": run("project", *size)}
    naive_pts = []
    if args.quick:
        rows["naive"] = run("naive", *size)
    else:
        for s in args.naive_sizes:
            b, t = (int(x) for x in s.split("x"))
            r = run("naive", b, t, args.prompt)
            r["backbone_peak"] = run("backbone", b, t, args.prompt)["peak"]
            naive_pts.append(r)
    sweep = [rows["project"]]
    sweep += [run("project", *size, chunk=c) for c in args.chunk_sizes if c != args.chunk_size]
    sweep = sorted(sweep, key=lambda r: -r["chunk_size"]) if len(sweep) > 1 else []
    table, summary = report(args, rows, naive_pts, sweep)
    print("\n" + table, flush=True)
    if not args.no_write:
        shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-write"]
        if "--out" in shown:  # where the file went is not part of what reproduces it
            del shown[shown.index("--out"): shown.index("--out") + 2]
        cmd = " ".join(["python benchmarks/memory.py", *shown])
        body = (f"`{cmd.strip()}` on {machine()}; method in the docstring of "
                "`benchmarks/memory.py` (fresh process per measurement, resident-set high-water mark)."
                "\n\n" + table)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_section(args.out, body)
        print(f"\nwrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
