"""The preflight compares tokenizers by content and admits heads that differ only in padding rows."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from src.modules.distill import DistillationModule
from src.modules.models.preflight import preflight
from src.modules.models.tiny import TinyQwen2
from src.modules.scoring import Scorer
from src.train import train


@pytest.fixture
def tiny(tmp_path):
    spec = TinyQwen2(cache_dir=str(tmp_path), hidden_size=32, num_layers=1)
    return spec.load_model(), spec.load_tokenizer()


def _swapped(tok, a: str, b: str):
    """The same tokenizer (size, specials, template) with the ids of tokens ``a`` and ``b`` swapped."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    out = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  **{k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)})
    out.chat_template = tok.chat_template
    return out


def _padded(model, extra: int):
    """A copy of ``model`` whose embedding and head have ``extra`` more rows (random), as real pairs do."""
    out = copy.deepcopy(model)
    out.resize_token_embeddings(model.get_output_embeddings().weight.shape[0] + extra, mean_resizing=False)
    return out


def test_a_tokenizer_with_two_ids_swapped_is_refused_by_name(tiny):
    model, tok = tiny
    other = _swapped(tok, "1", "2")
    assert len(other) == len(tok) and other.pad_token_id == tok.pad_token_id
    with pytest.raises(ValueError, match=r"tokenizers differ in content .*'1': \d+ vs \d+; '2': \d+ vs \d+"):
        preflight(model, tok, model, other)


def test_heads_that_differ_only_in_padding_rows_are_admitted(tiny, capsys):
    model, tok = tiny
    assert preflight(model, tok, model, tok) is None
    assert "share one tokenizer" in capsys.readouterr().out
    assert preflight(model, tok, _padded(model, 64), tok) == len(tok)
    assert "both are scored over the tokenizer's" in capsys.readouterr().out
    short = copy.deepcopy(model)
    short.resize_token_embeddings(len(tok) - 2, mean_resizing=False)
    with pytest.raises(ValueError, match="model.teacher's output head has .* fewer than its tokenizer's"):
        preflight(model, tok, short, tok)


def test_a_padded_copy_scores_exactly_as_the_model_over_the_shared_ids(tiny):
    model, tok = tiny
    padded = _padded(model, 64)
    with torch.no_grad():  # padding rows that would take probability mass if they were scored
        padded.get_output_embeddings().weight[len(tok):] = 5 * model.get_output_embeddings().weight[:64]
    ids = torch.tensor([tok("12+34=46")["input_ids"]])
    mask = torch.ones_like(ids)

    def logp(m, vocab_size):
        s = Scorer(m, None, temperature=1.0, vocab_size=vocab_size)
        return s.scored(m)(ids, mask, 3, vocab_size=vocab_size)[0]

    torch.testing.assert_close(logp(padded, len(tok)), logp(model, len(tok)), rtol=0, atol=0)
    assert not torch.allclose(logp(padded, None), logp(model, None))  # what scoring every row would give


def test_self_distillation_against_a_padded_copy_has_zero_reward(make_cfg, monkeypatch):
    real, real_empty = DistillationModule._load, TinyQwen2.load_empty

    def load(self, spec, sharded):
        model = real(self, spec, sharded)
        return _padded(model, 64) if spec is self.teacher_spec else model

    def load_empty(spec):  # what the preflight reads before any weights: the padded rows too
        model = real_empty(spec)
        if spec.key == "model.teacher":
            with torch.device("meta"):
                model.resize_token_embeddings(model.get_output_embeddings().weight.shape[0] + 64, mean_resizing=False)
        return model

    monkeypatch.setattr(DistillationModule, "_load", load)
    monkeypatch.setattr(TinyQwen2, "load_empty", load_empty)
    cfg = make_cfg("model.teacher.hidden_size=${model.student.hidden_size}", "model.teacher.seed=${model.student.seed}",
                   "model.teacher.num_layers=${model.student.num_layers}", "trainer.max_steps=1",
                   "test=false", "trainer.val_check_interval=100")
    metrics, obj = train(cfg)
    assert obj["module"].scorer.vocab_size == len(obj["module"].tokenizer)
    assert metrics["train/rev_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["train/reward_mean"] == pytest.approx(0.0, abs=1e-6)


def test_the_preflight_refuses_a_pair_before_any_weights_are_read(make_cfg, monkeypatch):
    def no_weights(spec):
        raise AssertionError(f"{spec.key}: weights read before the preflight")

    real_tokenizer = TinyQwen2.load_tokenizer
    monkeypatch.setattr(TinyQwen2, "load_model", no_weights)
    monkeypatch.setattr(TinyQwen2, "load_tokenizer", lambda spec: _swapped(real_tokenizer(spec), "1", "2")
                        if spec.key == "model.teacher" else real_tokenizer(spec))
    with pytest.raises(Exception, match="tokenizers differ in content"):
        train(make_cfg("trainer.max_steps=1", "test=false"))


def test_teacher_dtype_follows_the_trainer_and_self_distillation_refuses_a_mismatch(make_cfg, capsys):
    from omegaconf import OmegaConf

    from src.modules.models.preflight import preflight_dtypes
    from src.modules.models.specs import PretrainedLM, follow_trainer_dtype

    for trainer, expected in ((dict(precision="32-true"), "float32"), (dict(precision="bf16-mixed"), "bfloat16"),
                              (dict(precision="16-mixed"), "float16"),
                              (dict(precision="32-true", strategy=dict(plan=dict(param_dtype="bfloat16"))), "bfloat16")):
        cfg = OmegaConf.create({"trainer": trainer, "model": {"teacher": {"path": "t", "dtype": None}}})
        follow_trainer_dtype(cfg)
        assert cfg.model.teacher.dtype == expected
    assert "model.teacher.dtype follows the trainer" in capsys.readouterr().out
    cfg = OmegaConf.create({"trainer": {"precision": "bf16-mixed"}, "model": {"teacher": {"dtype": "float32"}}})
    follow_trainer_dtype(cfg)
    assert cfg.model.teacher.dtype == "float32"  # set: kept

    one = dict(path="/ckpt/same")
    with pytest.raises(ValueError, match=r"self-distillation .* model.student.dtype=float32, "
                                         r"model.teacher.dtype=bfloat16: the dtype's rounding alone would be rewarded"):
        preflight_dtypes(PretrainedLM(**one, dtype="float32", key="model.student"),
                         PretrainedLM(**one, dtype="bfloat16", key="model.teacher"))
    preflight_dtypes(PretrainedLM("/ckpt/small", dtype="float32", key="model.student"),
                     PretrainedLM("/ckpt/big", dtype="bfloat16", key="model.teacher"))
    assert "model.teacher.dtype=bfloat16: the teacher scores in its own precision" in capsys.readouterr().out
