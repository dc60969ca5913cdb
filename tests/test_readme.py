"""The README's commands are themselves tested."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_readme_quick_start_is_make_train_then_make_test():
    assert _quick_start_commands() == ["make train", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_make_targets_exist_and_pin_torch():
    out = subprocess.run(["make", "-n", "train", "test"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in makefile


@pytest.mark.slow
def test_main_job_default_runs_to_the_end(tmp_path):
    """`make train`'s job with the built-in default, unshortened."""
    proc = subprocess.run([sys.executable, "src/train.py", f"paths.log_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student after" in proc.stdout and "student gain" in proc.stdout
