"""The held-out KL diagnostic: exact full-vocabulary KLs on fixed teacher traces, logged at every validation."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from src.callbacks.diagnostics import HeldOutKL, first_rows
from src.modules.diagnostics import exact_kls
from src.train import train


def _kl(p_log, q_log):
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def test_exact_kls_are_the_full_distributions_kls_over_response_tokens():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from src.modules.rollout.batch import Rollout
    from src.modules.scoring import Scorer

    def lm(seed, hidden):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()

    student, teacher = lm(0, 32), lm(1, 48)
    with torch.no_grad():  # a peaked teacher: the two directions differ, so a swap would show
        teacher.lm_head.weight.mul_(20)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (3, 4 + 5), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    response = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    mask[:, 4:] = response.long()
    ro = Rollout(input_ids=ids, attention_mask=mask, response_start=4, response_mask_BT=response, old_logp_BT=None,
                 entropy_BT=None, truncated_B=torch.zeros(3, dtype=torch.bool))
    T = 0.7
    reverse, forward = exact_kls(Scorer(student, teacher, temperature=T, chunk_size=4), ro, chunk=3)

    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():  # the whole logits, the position predicting each response token
        s = torch.log_softmax(student(ids, attention_mask=mask, position_ids=pos).logits[:, 3:-1] / T, -1)[response]
        t = torch.log_softmax(teacher(ids, attention_mask=mask, position_ids=pos).logits[:, 3:-1] / T, -1)[response]
    assert reverse == pytest.approx(float(_kl(s, t).mean()), rel=1e-5)
    assert forward == pytest.approx(float(_kl(t, s).mean()), rel=1e-5)
    assert abs(reverse - forward) > 0.1 * max(reverse, forward)


def test_first_rows_joins_batches_left_padded():
    batches = [{"input_ids": torch.tensor([[5, 6], [7, 8]]), "attention_mask": torch.ones(2, 2, dtype=torch.long),
                "references": ["a", "b"]},
               {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
                "references": ["c"]}]
    out = first_rows(batches, 3, pad_id=0)
    assert out["input_ids"].tolist() == [[0, 5, 6], [0, 7, 8], [1, 2, 3]]
    assert out["attention_mask"].tolist() == [[0, 1, 1], [0, 1, 1], [1, 1, 1]]
    assert out["references"] == ["a", "b", "c"]
    assert first_rows(batches, 1, pad_id=0)["input_ids"].tolist() == [[5, 6]]
    with pytest.raises(ValueError, match="validation split is empty"):
        first_rows([], 3, pad_id=0)


def test_a_run_logs_both_kls_at_every_validation_on_the_same_traces(make_cfg):
    cfg = make_cfg("+callbacks.diagnostics._target_=src.callbacks.diagnostics.HeldOutKL",
                   "+callbacks.diagnostics.n_prompts=6", "validate_before=true", "test=false")
    _, obj = train(cfg)
    callback = next(c for c in obj["trainer"].callbacks if isinstance(c, HeldOutKL))
    assert callback.traces.input_ids.shape[0] == 6
    with next(Path(cfg.paths.output_dir).rglob("metrics.csv")).open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/diag/reverse_kl")]
    assert len(rows) == 3  # before training, steps 2 and 4
    reverse = [float(r["val/diag/reverse_kl"]) for r in rows]
    assert all(v > 0 for v in reverse) and all(float(r["val/diag/forward_kl"]) > 0 for r in rows)
    assert len(set(reverse)) == 3  # the student moved between validations; the traces did not
    state = callback.state_dict()
    again = HeldOutKL()
    again.load_state_dict(state)
    assert torch.equal(again.traces.input_ids, callback.traces.input_ids)


def test_it_needs_a_teacher(make_cfg):
    cfg = make_cfg("algorithm=grpo", "+callbacks.diagnostics._target_=src.callbacks.diagnostics.HeldOutKL",
                   "test=false")
    with pytest.raises(ValueError, match="needs a teacher"):
        train(cfg)


def _logged(cfg, key):
    with next(Path(cfg.paths.output_dir).rglob("metrics.csv")).open() as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def test_the_gradient_cosine_is_one_for_exact_reverse_kl_and_less_for_sampled_methods(make_cfg):
    """GKD at beta 1 over every token is the exact reverse KL: its gradient's cosine with it is 1. REOPOLD's
    sampled-token, clipped, selected gradient points elsewhere. Logged on the steps asked for only."""
    cfg = make_cfg("algorithm=gkd", "objective.beta=1.0", "module.grad_cosine_every=2", "test=false")
    train(cfg)
    cos = _logged(cfg, "train/grad_cos_exact_rkl")
    assert sorted(cos) == [0, 2] and all(v == pytest.approx(1.0, abs=1e-4) for v in cos.values()), cos
    for algorithm in ("reopold", "sft"):  # SFT: its gradient on the teacher's samples
        cfg = make_cfg(f"algorithm={algorithm}", "module.grad_cosine_every=1", "test=false")
        train(cfg)
        cos = _logged(cfg, "train/grad_cos_exact_rkl")
        assert sorted(cos) == [0, 1, 2, 3] and all(-1 <= v < 0.99 for v in cos.values()), (algorithm, cos)


def test_the_gradient_cosine_needs_a_teacher(make_cfg):
    from src.utils.instantiate import plain_errors

    with pytest.raises(ValueError, match="grad_cosine_every compares with the exact reverse KL"):
        plain_errors(train)(make_cfg("algorithm=grpo", "module.grad_cosine_every=1", "test=false"))
