"""The memory plan on known shapes, the shipped experiments' plans, the KV-cache budget of the rollout, and the
training entry point's stop on a machine without the GPUs an experiment needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.modules.memory_plan import GB, config_of, plan, shape_of

ROOT = Path(__file__).resolve().parents[1]


def _rounding(x: float) -> float:
    """One unit of the last digit a model card gives (cards round or truncate: Qwen2.5-7B's 7,615,616,512 is 7.61)."""
    return 10 ** -len(repr(x).split(".")[1]) + 1e-9


@pytest.mark.parametrize("hub_id,total,non_embedding", [
    # the model cards' "Number of Parameters" and "(Non-Embedding)", in billions
    ("Qwen/Qwen3-1.7B", 1.7, 1.4), ("Qwen/Qwen3-8B", 8.2, 6.95), ("Qwen/Qwen2.5-1.5B-Instruct", 1.54, 1.31),
    ("Qwen/Qwen2.5-7B-Instruct", 7.61, 6.53),
])
def test_shapes_count_the_model_cards_parameters(hub_id, total, non_embedding):
    s = shape_of(config_of(hub_id))
    tied = config_of(hub_id)["tie_word_embeddings"]
    embeddings = s.vocab * s.hidden * (1 if tied else 2)
    assert s.params / 1e9 == pytest.approx(total, abs=_rounding(total))
    assert (s.params - embeddings) / 1e9 == pytest.approx(non_embedding, abs=_rounding(non_embedding))
    assert s.largest_block * s.layers + s.root == s.params  # text models: every block a decoder layer


def test_vision_language_shapes_count_the_vision_tower_in_blocks_and_root():
    s = shape_of(config_of("Qwen/Qwen2.5-VL-32B-Instruct"))
    assert s.params / 1e9 == pytest.approx(33.45, abs=0.05) and s.hidden == 5120 and s.layers == 64
    assert s.root > s.vocab * s.hidden * 2  # embeddings, head and the vision merger


def test_the_plan_counts_what_the_issue_measured_by_hand(make_cfg):
    """math_qwen3 at its batch under ZeRO-2: 64 rows x 9,216 tokens a GPU, a KV cache of 64 x 9,216 x 28 layers x
    2 x 8 heads x 128 x 2 bytes = 67.6 GB, and about 1.5 TB of activations kept for one backward."""
    cfg = make_cfg("experiment=math_qwen3", "trainer=deepspeed_zero2", "objective.micro_batch_tokens=null",
                   "rollout.kv_cache_gb=null", "model.student.dtype=bfloat16", fast=False)
    p = plan(cfg, gpus=8)
    assert p.phases["rollout"]["KV cache"] == pytest.approx(64 * 9216 * 28 * 2 * 8 * 128 * 2 / GB)
    assert 1400 < p.phases["update"]["activations for the backward"] < 1700
    assert not p.fits


def test_fsdp2_divides_weights_gradients_and_moments_by_the_gpus(make_cfg):
    cfg = make_cfg("experiment=math_qwen3", fast=False)
    p = plan(cfg, gpus=8)
    s = shape_of(config_of("Qwen/Qwen3-1.7B"))
    assert p.phases["update"]["student weights"] == pytest.approx(4 * s.params / 8 / GB)
    assert p.phases["update"]["student grads + AdamW"] == pytest.approx(12 * s.params / 8 / GB)
    assert plan(cfg, gpus=4).peak("update") > p.peak("update")


@pytest.mark.parametrize("name", ["math_qwen3", "visual_reasoning", "tool_use"])
def test_the_shipped_experiments_fit_8_x_80_gb(name):
    proc = subprocess.run([sys.executable, "benchmarks/memory_plan.py", f"experiment={name}", "--gpu-gb", "80"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "fits in 80 GB" in proc.stdout and "| **peak** |" in proc.stdout


def test_the_plan_exits_non_zero_when_it_does_not_fit():
    proc = subprocess.run([sys.executable, "benchmarks/memory_plan.py", "experiment=visual_reasoning",
                           "trainer=deepspeed_zero2", "--gpu-gb", "80"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout


def test_a_gpu_experiment_on_a_cpu_machine_says_what_it_needs_and_the_miniature(make_cfg):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    import src.train

    cfg = make_cfg("experiment=visual_reasoning", "data.train.path=x.jsonl", "data.test.path=y.jsonl", fast=False)
    with pytest.raises(SystemExit) as stop:
        src.train.train(cfg)
    message = str(stop.value)
    assert "trains on GPUs" in message and "GB a GPU by the memory plan" in message and "CPU cores" in message
    assert "python src/train.py experiment=visual_reasoning miniature=visual" in message


def test_the_rollout_decodes_rows_in_chunks_under_a_kv_budget(tmp_path):
    """A KV budget of 3 rows: the same greedy tokens as all rows at once, and sampled rows whose recorded log-probs
    are the scorer's (the chunks' widths padded alike)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from src.modules.rollout.hf import HFGenerateRollout
    from src.modules.scoring import Scorer

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    prompts = torch.randint(3, 40, (8, 5))
    mask = torch.ones_like(prompts)
    mask[:2, :2] = 0
    per_row = 2 * 2 * 2 * 8 * 4 * (5 + 12)  # layers x K,V x kv heads x head dim x fp32 x (prompt + budget)
    whole = HFGenerateRollout(max_new_tokens=12)
    chunked = HFGenerateRollout(max_new_tokens=12, kv_cache_gb=3.5 * per_row / GB)
    assert chunked.rows_at_once(model, 5 + 12) == 3
    a = whole(model, prompts, mask, [0], 1, greedy=True)
    b = chunked(model, prompts, mask, [0], 1, greedy=True)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask_BT, b.response_mask_BT)
    torch.manual_seed(1)
    ro = chunked(model, prompts, mask, [0], 1, num_samples=1)
    logp, _ = Scorer(model, None, temperature=1.0).student_logp(ro)
    torch.testing.assert_close(ro.old_logp_BT, logp * ro.response_mask_BT, atol=1e-5, rtol=0)


def test_the_gpu_checks_settings_compose_and_fit_one_gpu():
    """``benchmarks/gpu_check_fsdp2.py`` (run where a GPU is lent) plans the very run it launches."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_check_fsdp2 import train_overrides
    from benchmarks.memory_plan import compose

    cfg = compose(train_overrides("/tmp/p.jsonl", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B", 2, 4, 1024, 8192))
    p = plan(cfg, gpu_gb=80, gpus=1, prompt_tokens=60)
    assert p.fits and p.settings["trainer"] == "fsdp2" and p.settings["rows a GPU"] == 8
    assert cfg.callbacks.model_checkpoint is None and cfg.trainer.max_steps == 3


def test_phase_peaks_record_only_on_a_gpu():
    from src.modules.memory_plan import PhasePeaks

    peaks = PhasePeaks(torch.device("cpu"))
    with peaks("rollout"):
        torch.ones(1000)
    assert peaks.logs == {}


def test_hybrid_shards_within_a_node_and_sft_rolls_out_with_the_teacher(make_cfg):
    one_node = plan(make_cfg("experiment=math_qwen3", fast=False))
    hybrid = plan(make_cfg("experiment=math_qwen3", "trainer.num_nodes=2", "trainer.strategy.plan.hybrid=true",
                           fast=False))
    flat = plan(make_cfg("experiment=math_qwen3", "trainer.num_nodes=2", fast=False))
    assert hybrid.phases["update"]["student weights"] == pytest.approx(one_node.phases["update"]["student weights"])
    assert flat.phases["update"]["student weights"] == pytest.approx(one_node.phases["update"]["student weights"] / 2)
    sft = plan(make_cfg("experiment=math_qwen3", "algorithm=sft", fast=False))
    assert "teacher gathered for the rollout" in sft.phases["rollout"] and "teacher scoring" not in sft.phases
    stage = plan(make_cfg("experiment=math_qwen3", "objective=reference_sft", fast=False))
    assert list(stage.phases) == ["update"] and "teacher weights" not in stage.phases["update"]


def test_self_distillation_plans_the_students_shape_and_a_copy_only_when_there_is_one(make_cfg):
    cfg = make_cfg("experiment=math_qwen3", "trainer=deepspeed_zero2", "model.teacher=self", fast=False)
    current = plan(cfg, gpus=8)
    s = shape_of(config_of("Qwen/Qwen3-1.7B"))
    assert "teacher weights" not in current.phases["update"] and "teacher scoring" in current.phases
    cfg.module.self_teacher.weights = "ema"
    ema = plan(cfg, gpus=8)
    assert ema.phases["update"]["teacher copy of the student"] == pytest.approx(4 * s.params / GB)
