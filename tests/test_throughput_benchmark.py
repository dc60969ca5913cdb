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
        return rate, 1.0, 0.0, 3.0 if cmd[0] == "trl-python" else 2.5 + len(calls) / 100  # peak RSS, GiB

    monkeypatch.setattr(vs_trl, "run", fake_run)
    out = tmp_path / "results.md"
    summary = vs_trl.main([str(tmp_path), "--trl-python", "trl-python", "--rounds", "2",
                           "--variant", "hf=accel=none,seed=3", "--out", str(out)])
    assert len(calls) == 8 and calls[0][0] == "trl-python" and calls[0][-4:] == ["--batch", "64", "--max-new-tokens", "32"]
    assert calls[3][-2:] == ["accel=none", "seed=3"] and summary["hf_samples_per_s"] == 90.0
    assert summary["ratio_reopold_trl"] == pytest.approx(1.25) and summary["ratio_hf_trl"] == pytest.approx(1.125)
    text = out.read_text()
    assert "--variant hf=" in text
    assert "| samples/s | 80.00 | 85.00 | 100.00 | 90.00 | 1.25x | 1.12x |" in text
    assert summary["trl_peak_rss_gib"] == 3.0 and summary["hf_peak_rss_gib"] == pytest.approx(2.58)  # the higher round
    assert "| peak RSS, GiB | 3.00 |" in text and "| per-round range |" in text


def test_accel_pays_interleaves_the_forms_and_reports_speed_ups_over_none(tmp_path, monkeypatch):
    """The wing's ablation runner's bookkeeping, with the training runs replaced by fixed step times."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import accel_pays
    finally:
        sys.path.pop(0)
    seconds = {"cpu": 0.5, "none": 0.8, "backbone": 0.64, "decoder": 1.0}
    order, real_step_seconds = [], accel_pays.step_seconds

    def fake_step_seconds(experiment, form, steps, skip, extra, folder):
        name = next(k for k, v in accel_pays.FORMS.items() if v == form)
        order.append(name)
        assert experiment == "mini_math" and steps == 6 and skip == 1 and extra == ["seed=3"]
        return seconds[name]

    monkeypatch.setattr(accel_pays, "step_seconds", fake_step_seconds)
    out = tmp_path / "pays.md"
    summary = accel_pays.main(["--rounds", "2", "--steps", "6", "--skip", "1", "--out", str(out), "seed=3"])
    assert order == ["cpu", "none", "backbone", "decoder"] * 2  # interleaved, one form after another each round
    assert summary["cpu_speedup"] == pytest.approx(1.6) and summary["decoder_speedup"] == pytest.approx(0.8)
    assert "| backbone | 0.640 | 1.25x (1.25x to 1.25x) |" in out.read_text()
    # the figure of one run: the median train/step_s after the skipped steps, read from its metrics
    run = tmp_path / "run" / "csv" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("step,train/step_s,train/loss\n0,9.0,1\n1,0.5,1\n2,,1\n3,0.7,1\n4,0.6,1\n")

    class Done:
        returncode, stdout, stderr = 0, "", ""

    monkeypatch.setattr(accel_pays.subprocess, "run", lambda *a, **k: Done())
    assert real_step_seconds("mini_math", ["accel=cpu"], 4, 1, [], tmp_path / "run") == pytest.approx(0.6)
    with pytest.raises(RuntimeError, match="fewer than --skip 5"):
        real_step_seconds("mini_math", ["accel=cpu"], 4, 5, [], tmp_path / "run")
