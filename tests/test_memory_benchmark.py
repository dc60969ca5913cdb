"""The memory benchmark's quick mode, its bookkeeping, and the scorer at the real Qwen2.5 vocabulary."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
mem = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mem)


def test_quick_mode_reports_sensible_peaks(capsys):
    # A parent with a large resident set, as a long pytest session is: its RSS at fork once showed through
    # every child's getrusage ru_maxrss (the kernel keeps the mark of the memory replaced at exec), and the
    # backbone's 0.04 GB read as 0.34 GB in CI. The children must measure their own address space.
    ballast = torch.ones(400_000_000)  # 1.6 GB, touched
    summary = mem.main(["--quick"])
    del ballast
    out = capsys.readouterr().out
    assert "| `score_tokens`, chunk 256 |" in out and "| naive full logits |" in out
    assert summary["finite"]
    if Path("/proc/self/clear_refs").exists():  # Linux: the high-water mark is reset per phase
        assert summary["per_phase"]
    for key in ("backbone_peak", "project_peak", "overhead", "naive_peak"):
        assert math.isfinite(summary[key]), key
    # 2 x 160 tokens: the fp32 logits alone are 0.19 GB and a 256-token chunk 0.16 GB, so the head dominates the
    # one-layer backbone well above the few MB by which resident-set peaks vary (chunk 64, 39 MB, did not)
    assert 0 <= summary["backbone_peak"] < summary["project_peak"]
    assert summary["overhead"] > 0
    assert not summary["naive_extrapolated"]
    assert summary["project_peak"] < summary["naive_peak"]
    assert summary["naive_overhead"] > summary["logits_bytes"]  # logits plus their softmax temporaries


def test_extrapolation_is_linear():
    assert mem.extrapolate([(512, 1.0), (1024, 2.0)], 4096) == 8.0
    assert mem.extrapolate([(100, 3.0), (200, 5.0), (300, 7.0)], 1000) == 21.0


def test_full_size_report_extrapolates_the_naive_path():
    """The full-size branch, on made-up figures: the naive path is a fit, the sweep says which chunk meets."""
    def r(chunk, peak, b=8, s=4096):
        return {"chunk_size": chunk, "batch": b, "seq": s, "teacher_peak": peak / 2, "student_peak": peak,
                "peak": peak, "student_s": 1.0, "teacher_s": 0.5, "finite": True}

    args = mem.argparse.Namespace(batch=8, seq=4096, prompt=64, device="cpu")
    rows = {"backbone": r(1024, 0.3e9), "project": r(1024, 3.3e9)}
    naive_pts = [dict(r(1024, 1.0e9 + 0.1e9, 1, 512), backbone_peak=0.1e9),
                 dict(r(1024, 2.0e9 + 0.1e9, 1, 1024), backbone_peak=0.1e9)]
    table, summary = mem.report(args, rows, naive_pts, [rows["project"], r(256, 1.0e9)])
    assert summary["naive_extrapolated"] and not summary["target_met"]
    assert summary["naive_overhead"] == 64e9  # 1 GB per 512 tokens, at 32,768 tokens
    assert summary["logits_bytes"] == 8 * 4096 * 151_936 * 4
    assert "**extrapolated**" in table and "**NOT met** at chunk 1024 (3.00 GB)" in table
    assert "| 256 | 0.16 | 0.50 | 1.00 | 0.70 | met | 1.0 | 0.5 |" in table


def test_write_section_keeps_notes_and_other_sections(tmp_path):
    path = tmp_path / "performance.md"
    mem.write_section(path, "first")
    assert path.read_text() == f"# Performance\n\n## Memory\n\n{mem.BEGIN}\nfirst\n{mem.END}\n"
    path.write_text(path.read_text() + "\nnotes by hand\n\n## Throughput\n\nfast\n")
    mem.write_section(path, "second")
    assert path.read_text() == (f"# Performance\n\n## Memory\n\n{mem.BEGIN}\nsecond\n{mem.END}\n"
                                "\nnotes by hand\n\n## Throughput\n\nfast\n")
    # a section someone else started, without markers: the table goes under its heading
    path.write_text("# Performance\n\n## Throughput\n\nfast\n\n## Memory\n\nintro\n")
    mem.write_section(path, "third")
    assert path.read_text() == ("# Performance\n\n## Throughput\n\nfast\n\n## Memory\n\n"
                                f"{mem.BEGIN}\nthird\n{mem.END}\n\nintro\n")


def test_chunked_scorer_matches_full_logits_at_qwen_vocab():
    """score_tokens against reference_logp_entropy on the model's own logits, V = 151,936."""
    from src.modules.scoring import reference_logp_entropy, score_tokens

    model = mem.build_model(0, torch.device("cpu"))
    ids_BS = torch.randint(0, mem.VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    mask_BS = torch.ones_like(ids_BS)
    P = 16
    with torch.no_grad():
        logp_BT, entropy_BT = score_tokens(model, ids_BS, mask_BS, P, temperature=0.6, chunk_size=20)
        logits_BSV = model(input_ids=ids_BS, attention_mask=mask_BS).logits
        logp_ref_BT, entropy_ref_BT = reference_logp_entropy(logits_BSV[:, P - 1 : -1], ids_BS[:, P:], 0.6)
    assert logp_BT.shape == (2, 48 - P)
    torch.testing.assert_close(logp_BT, logp_ref_BT, atol=1e-4, rtol=0)
    torch.testing.assert_close(entropy_BT, entropy_ref_BT, atol=1e-4, rtol=0)
