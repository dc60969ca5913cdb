"""The analysis notebooks run end to end on tiny inputs, so they cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_test_time_scaling_notebook_runs_on_tiny_models(tmp_path, monkeypatch, cache_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    tiny = ["model=tiny", f"paths.cache_dir={cache_dir}"]
    tiny_vl = ["model=tiny_vl", f"paths.cache_dir={cache_dir}"]
    quiet = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv", "k=4"]
    params = {
        "SETTINGS": {
            "math": {"MODELS": {"teacher": tiny, "REOPOLD": tiny, "OPD": tiny}, "TEACHER": "teacher",
                     "STUDENTS": ["REOPOLD", "OPD"],
                     "COMMON": ["data.train.n=16", "data.test.n=6", "rollout.max_new_tokens=6", *quiet]},
            "visual": {"MODELS": {"teacher": tiny_vl, "REOPOLD": tiny_vl}, "TEACHER": "teacher", "STUDENTS": ["REOPOLD"],
                       "COMMON": ["data=visual_mini", "data.train.n=8", "data.test.n=5", "rollout.max_new_tokens=6",
                                  *quiet]},
        },
        "OUT": str(tmp_path / "results"),
        "FIGURES": str(tmp_path / "figures"),
    }
    monkeypatch.setenv("REOPOLD_TTS_PARAMS", json.dumps(params))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(ROOT / "notebooks" / "test_time_scaling.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    for name in ("test_time_scaling.png", "test_time_scaling_k.png", "test_time_scaling_visual.png",
                 "test_time_scaling_visual_k.png", "test_time_scaling.md"):
        assert (tmp_path / "figures" / name).stat().st_size > 0, name
    table = (tmp_path / "figures" / "test_time_scaling.md").read_text()
    assert "## The math miniature" in table and "## The visual miniature" in table
    assert "| REOPOLD | 4 |" in table and "REOPOLD vs teacher (maj@k)" in table and "(pass@k)" in table
    for setting, models, n in (("math", ("teacher", "reopold", "opd"), 6), ("visual", ("teacher", "reopold"), 5)):
        for model in models:
            rows = (tmp_path / "results" / setting / model / "samples.jsonl").read_text().splitlines()
            assert len(rows) == n * (1 + 4), (setting, model)
