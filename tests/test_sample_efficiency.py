"""The study's summary: samples-to-target, the table and the plot, on a synthetic CSV."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sample_efficiency", ROOT / "benchmarks" / "sample_efficiency.py")
se = importlib.util.module_from_spec(spec)
spec.loader.exec_module(se)


def _rows():
    rows = []
    for seed in (0, 1, 2):
        for samples, a_fast, a_slow in ((0, 0.4, 0.4), (640, 0.8, 0.5), (1280, 0.95, 0.7), (1920, 0.97, 0.9)):
            rows.append({"method": "reopold", "seed": seed, "samples": samples, "val_acc": a_fast})
            rows.append({"method": "opd", "seed": seed, "samples": samples, "val_acc": a_slow})
    return rows


def test_samples_to_reach():
    assert se.samples_to_reach([(0, 0.1), (10, 0.5), (20, 0.9)], 0.5) == 10
    assert math.isinf(se.samples_to_reach([(0, 0.1)], 0.5))


def test_summary_table_and_ratio():
    table = se.summarise(_rows(), target=0.9)
    assert "| reopold | 3 | 97.0 ± 0.0 | 1,280 | 1.00x |" in table
    assert "| opd | 3 | 90.0 ± 0.0 | 1,920 | 1.50x |" in table


def test_csv_round_trip_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    se.write_csv(_rows(), tmp_path / "s.csv")
    rows = se.read_csv(tmp_path / "s.csv")
    assert rows == _rows()
    se.plot(rows, tmp_path / "s.png", teacher_acc=1.0)
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_summary_with_two_targets_reports_each():
    table = se.summarise(_rows(), target=[0.9, 0.75])
    assert "samples to reach 90.0% (mean) | ratio to reopold | samples to reach 75.0% (mean) |" in table
    assert "| opd | 3 | 90.0 ± 0.0 | 1,920 | 1.50x | 1,920 | 3.00x |" in table
    rows = [r for r in _rows() if not (r["method"] == "opd" and r["samples"] == 1920)]
    assert "| opd | 3 | 70.0 ± 0.0 | not reached (0/3 seeds) | — |" in se.summarise(rows, target=0.9)
