"""``src/eval.py`` with k samples: metrics, the per-response records, and the real-data path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from src.eval import evaluate
from src.modules.evaluation.test_time_scaling import load_results, scaling_curve
from src.train import train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "math"


def test_eval_with_k_samples_writes_results_the_analysis_reads(make_cfg, single_thread, monkeypatch):
    cfg = make_cfg("test=false", "trainer.max_steps=2", "algorithm=sft")
    train(cfg)
    hf_dir = Path(cfg.paths.output_dir) / "checkpoints" / "hf" / "final"
    ev = make_cfg("model=pretrained", f"model.student.path={hf_dir}", "model.student.dtype=float32", "k=4",
                  "model_name=tiny-sft", "rollout.temperature=1.5", config="eval")
    from src.modules.distill import DistillationModule

    configure = DistillationModule.configure_model

    def counted_elsewhere(self):  # meta.json must take configure_model's count (made before any sharding)
        configure(self)
        self.student_n_params = 123_456_789
    monkeypatch.setattr(DistillationModule, "configure_model", counted_elsewhere)
    metrics, obj = evaluate(ev)
    key = "test/arithmetic"
    for name in ("acc", "avg@4", "pass@1", "pass@2", "pass@4", "maj@4", "response_len", "truncation_rate"):
        assert f"{key}/{name}" in metrics, name
    # pass@1's unbiased estimator is the mean single-sample accuracy; pass@k grows with k
    assert metrics[f"{key}/pass@1"] == pytest.approx(metrics[f"{key}/avg@4"], abs=1e-6)
    assert metrics[f"{key}/pass@1"] <= metrics[f"{key}/pass@2"] <= metrics[f"{key}/pass@4"]

    out = obj["out_dir"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    n_prompts = len({r["prompt_id"] for r in rows})
    assert n_prompts == ev.data.test.n and len(rows) == n_prompts * (1 + 4)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model"] == "tiny-sft" and meta["k"] == 4
    assert meta["n_params"] == 123_456_789

    results = load_results(out)
    greedy_acc = sum(r["correct"] for r in rows if r["sample"] == -1) / n_prompts
    assert greedy_acc == pytest.approx(metrics[f"{key}/acc"])
    curve = {row["k"]: row for row in scaling_curve(results)}
    assert curve[4]["pass@k"] == pytest.approx(metrics[f"{key}/pass@4"], abs=1e-6)
    assert curve[4]["maj@k"] == pytest.approx(metrics[f"{key}/maj@4"], abs=1e-6)


def test_eval_of_a_tool_use_model_writes_its_records(make_cfg, single_thread):
    """Multi-turn tool rollouts through src/eval.py: the records and meta.json (sampling settings included)."""
    ev = make_cfg("data=tool_mini", "data.train.n=4", "data.val.n=4", "data.test.n=4", "data.train.digits=2",
                  "+model.student.chat_template=tools", "rollout=tools", "rollout.max_turns=2",
                  "rollout.max_new_tokens=12", "k=2", "trainer.enable_progress_bar=false", config="eval")
    metrics, obj = evaluate(ev)
    assert "test/tool_mini/tools/calls_per_episode" in metrics
    rows = [json.loads(line) for line in (obj["out_dir"] / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 3
    meta = json.loads((obj["out_dir"] / "meta.json").read_text())
    assert (meta["k"], meta["top_p"], meta["top_k"]) == (2, 1.0, 0)


def test_validation_during_training_logs_pass_at_k(make_cfg, single_thread):
    cfg = make_cfg("test=false", "trainer.max_steps=2", "module.eval_samples=2")
    metrics, _ = train(cfg)
    assert {"val/arithmetic/pass@1", "val/arithmetic/pass@2", "val/arithmetic/maj@2"} <= set(metrics)


def test_eval_on_a_real_benchmark_file(make_cfg, single_thread):
    if not (DATA / "gsm8k.jsonl").exists():
        pytest.skip(f"{DATA} not present")
    root = Path(__file__).resolve().parents[1]
    ev = make_cfg("data=gsm8k", f"paths.root_dir={root}", "data.test.limit=4", "data.train.limit=4", "k=2",
                  "rollout.max_new_tokens=6", "trainer.enable_progress_bar=false", config="eval", fast=False)
    metrics, obj = evaluate(ev)
    rows = [json.loads(line) for line in (obj["out_dir"] / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 3 and rows[0]["reference"].endswith("#### 18")
    assert "test/gsm8k/pass@2" in metrics


def test_generic_math_data_needs_no_train_path_and_seed_changes_the_samples(make_cfg, single_thread):
    if not (DATA / "aime24.jsonl").exists():
        pytest.skip(f"{DATA} not present")
    common = ["data=math", f"data.test.path={DATA / 'aime24.jsonl'}", "data.test.limit=3", "k=2",
              "rollout.max_new_tokens=6", "trainer.enable_progress_bar=false",
              "+model.student.max_position_embeddings=2048"]  # AIME prompts pass 1,024 characters
    answers = []
    for seed in (0, 1):
        _, obj = evaluate(make_cfg(*common, f"seed={seed}", config="eval", fast=False))
        rows = [json.loads(line) for line in (obj["out_dir"] / "samples.jsonl").read_text().splitlines()]
        assert len(rows) == 3 * 3 and json.loads((obj["out_dir"] / "meta.json").read_text())["seed"] == seed
        answers.append([r["response"] for r in rows if r["sample"] >= 0])
    assert answers[0] != answers[1], "seed= must change the sampled responses"


def test_gathered_records_keep_each_response_once():
    from src.eval import _gather

    rows = [{"prompt_id": 1, "sample": 0}, {"prompt_id": 1, "sample": -1}, {"prompt_id": 1, "sample": 0}]
    assert _gather(rows) == rows[:2]


def test_parameter_counts_survive_sharding():
    """meta.json's n_params: a DeepSpeed ZeRO-3 partition reports numel() 0 and its size in ds_numel; a meta
    tensor (deferred initialisation) keeps its shape. Tied weights count once."""
    import torch

    from src.utils.sharding import count_params

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight  # tied, as an LM's embedding and head
    assert count_params(model) == 4 * 4 + 4
    with torch.device("meta"):
        deferred = torch.nn.Linear(5, 7)
    assert count_params(deferred) == 5 * 7 + 7
    partitioned = torch.nn.Linear(6, 2)
    for p in partitioned.parameters():
        p.ds_numel = p.numel()  # what deepspeed.zero.Init leaves, with the local storage emptied
        p.data = torch.empty(0)
    assert sum(p.numel() for p in partitioned.parameters()) == 0
    assert count_params(partitioned) == 6 * 2 + 2


def test_each_evaluation_says_its_size_and_after_the_first_how_long_it_will_take(make_cfg, single_thread, capsys):
    cfg = make_cfg("trainer.max_steps=4", "trainer.val_check_interval=2", "validate_before=true", "test=true")
    train(cfg)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("[val]", "[test]"))]
    assert lines[0] == "[val] step 0: 8 prompts, greedy each, up to 12 new tokens"
    assert any(line.startswith("[val] step 2: 8 prompts") and re.search(r"about [\d.]+ (s|min) at the last val evaluation's pace", line)
               for line in lines)
    assert lines[-1].startswith("[test] step 4: 8 prompts")
