"""benchmarks/throughput.py runs the framework's real step on the peer fixtures (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT.parent / "shared" / "peers" / "tiny_setup.py"


def fixtures_and_benchmark(tmp_path, prompts: int, name: str):
    """The peers' tiny fixtures with ``prompts`` prompts, and the benchmark module ``benchmarks/<name>.py``."""
    import importlib

    subprocess.run([sys.executable, str(SETUP), str(tmp_path / "fx"), "--num-prompts", str(prompts)], check=True,
                   capture_output=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return str(tmp_path / "fx"), importlib.import_module(name)
    finally:
        sys.path.pop(0)


@pytest.mark.skipif(not SETUP.exists(), reason="../shared/peers/tiny_setup.py not present")
def test_throughput_benchmark_runs_on_the_peer_fixtures(tmp_path, single_thread):
    fx, throughput = fixtures_and_benchmark(tmp_path, 256, "throughput")
    out = throughput.main([fx, "--steps", "2", "--warmup", "1", "--batch", "8",
                           "--max-new-tokens", "8"])
    assert out["samples"] == 16 and out["samples_per_s"] > 0 and 0 < out["gen_tokens_per_s"] <= 8 * out["samples_per_s"]
    assert out["peak_rss_mb"] > 0
    # --phases, and Hydra overrides after the options (here: without the CPU wing)
    out = throughput.main([fx, "--steps", "2", "--warmup", "1", "--batch", "8",
                           "--max-new-tokens", "8", "--phases", "accel=none"])
    phases = out["phases_ms"]
    assert set(phases) == {"rollout", "teacher scoring", "student scoring", "backward", "rest of the step"}
    assert all(phases[k] > 0 for k in ("rollout", "teacher scoring", "student scoring", "backward"))
    assert phases["rest of the step"] > 0  # no phase counted twice (the rest is the step less the phases)


def test_vs_trl_interleaves_the_variants_and_writes_each(tmp_path, monkeypatch):
    """The runner's bookkeeping, with the benchmark runs replaced by fixed rates (nothing is timed here)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import vs_trl
    finally:
        sys.path.pop(0)
    (tmp_path / "prompts.jsonl").write_text("{}\n")
    rates = {"trl_opd_bench.py": 80.0, "plain_opd_bench.py": 85.0, "throughput.py": 100.0}
    calls = []

    def fake_run(cmd):
        calls.append(cmd)
        rate = 90.0 if "accel=none" in cmd else rates[Path(cmd[1]).name]
        return rate, 1.0, 0.0

    monkeypatch.setattr(vs_trl, "run", fake_run)
    out = tmp_path / "results.md"
    summary = vs_trl.main([str(tmp_path), "--trl-python", "trl-python", "--rounds", "2",
                           "--variant", "hf=accel=none,seed=3", "--out", str(out)])
    assert len(calls) == 8 and calls[0][0] == "trl-python" and calls[0][-4:] == ["--batch", "64", "--max-new-tokens", "32"]
    assert calls[3][-2:] == ["accel=none", "seed=3"] and summary["hf_samples_per_s"] == 90.0
    assert summary["ratio_reopold_trl"] == pytest.approx(1.25) and summary["ratio_hf_trl"] == pytest.approx(1.125)
    text = out.read_text()
    assert "--variant hf=" in text
    assert "| 80.0 | 85.0 | 100.0 | 90.0 | 1.25x | 1.12x |" in text
