"""DDP with two CPU processes (gloo) through the real command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_two_cpu_processes(tmp_path, cache_dir):
    cmd = [sys.executable, "src/train.py", "experiment=reopold_tiny", "trainer=ddp_cpu", "trainer.max_steps=3", "trainer.val_check_interval=3",
           "data.batch_size=4", "data.train.n=64", "data.val.n=8", "data.test.n=8", "rollout.max_new_tokens=8",
           "callbacks.progress_bar=null", "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}",
           f"paths.cache_dir={cache_dir}", "callbacks.phase_schedule.switch_step=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((tmp_path / "reopold_tiny" / "runs").iterdir())
    assert len(runs) == 1, f"one output folder expected for both ranks, got {runs}"
    assert (runs[0] / "checkpoints" / "last.ckpt").exists()
    assert (runs[0] / "checkpoints" / "hf" / "final" / "config.json").exists()
    assert "test/arithmetic/acc" in proc.stdout
