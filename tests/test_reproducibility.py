"""The reproducibility benchmark's quick variant: a run per thread count, and a stage that misses its check named."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproducibility", ROOT / "benchmarks" / "reproducibility.py")
repro = importlib.util.module_from_spec(spec)
spec.loader.exec_module(repro)

STAGE = ["data.train.digits=2", "data.train.n=60", "data.val.n=8", "data.test.n=8", "data.batch_size=8",
         "data.eval_batch_size=8", "model.student.hidden_size=32", "model.student.num_layers=1",
         "trainer.max_steps=2", "trainer.val_check_interval=2", "rollout.max_new_tokens=8", "test=false"]


def test_each_thread_count_runs_and_the_table_has_a_row_each(tmp_path):
    rows = [repro.run(tmp_path, "tiny", threads, 0) for threads in (1, 2)]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(0.0 <= r["student_after"] <= 1.0 for r in rows)
    text = repro.table(rows)
    assert "| tiny | 1 | 0 |" in text and "| tiny | 2 | 0 |" in text and "| tiny | 2 of 2 |" in text
    assert repro.run(tmp_path, "tiny", 1, 0) == rows[0]  # kept: a rerun resumes


def test_a_stage_that_misses_its_check_is_reported_as_such(tmp_path, monkeypatch):
    strict = STAGE + ["stage_check={metric: val/mini_math/acc, min: 0.99}"]
    monkeypatch.setitem(repro.MINIATURES, "strict", [
        "trainer.max_steps=1", "data.train.digits=2", "data.train.n=64", "data.val.n=8", "data.test.n=8",
        "data.batch_size=8", f"model.teacher.overrides=[{','.join(repr(o) for o in strict)}]",
        f"model.student.overrides=[{','.join(repr(o) for o in STAGE + ['stage_check=null'])}]"])  # built first
    row = repro.run(tmp_path, "strict", 1, 0)
    assert row["status"].startswith("stage check failed: stage 'mini_math_teacher' reached val/mini_math/acc"), row
    assert "stage check failed" in repro.table([row]) and "| strict | 0 of 1 |" in repro.table([row])


def test_a_run_that_stopped_runs_again_with_its_folder_kept_aside(tmp_path):
    folder = tmp_path / "tiny" / "t1" / "seed0"
    (folder / "run").mkdir(parents=True)
    (folder / "run" / "run.json").write_text("{}")  # a run killed midway: its claim on the folder is left
    (folder / "result.json").write_text('{"status": "error (exit 1)"}')
    row = repro.run(tmp_path, "tiny", 1, 0)
    assert row["status"] == "ok"
    (kept,) = folder.glob("run.stopped-*")
    assert (kept / "run.json").read_text() == "{}"
