"""benchmarks/throughput.py runs the framework's real step on the peer fixtures (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT.parent / "shared" / "peers" / "tiny_setup.py"


@pytest.mark.skipif(not SETUP.exists(), reason="../shared/peers/tiny_setup.py not present")
def test_throughput_benchmark_runs_on_the_peer_fixtures(tmp_path, single_thread):
    subprocess.run([sys.executable, str(SETUP), str(tmp_path / "fx"), "--num-prompts", "256"], check=True,
                   capture_output=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.pop(0)
    out = throughput.main([str(tmp_path / "fx"), "--steps", "2", "--warmup", "1", "--batch", "8",
                           "--max-new-tokens", "8"])
    assert out["samples"] == 16 and out["samples_per_s"] > 0 and 0 < out["gen_tokens_per_s"] <= 8 * out["samples_per_s"]
    assert out["peak_rss_mb"] > 0
    # --phases, and Hydra overrides after the options (here: the decode loop without the fused step)
    out = throughput.main([str(tmp_path / "fx"), "--steps", "2", "--warmup", "1", "--batch", "8",
                           "--max-new-tokens", "8", "--phases", "+rollout.fused_decode=false"])
    phases = out["phases_ms"]
    assert set(phases) == {"rollout", "teacher scoring", "student scoring", "backward", "rest of the step"}
    assert all(phases[k] > 0 for k in ("rollout", "teacher scoring", "student scoring", "backward"))
    assert sum(phases.values()) == pytest.approx(1e3 * out["seconds"] / 2)
