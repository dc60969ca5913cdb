"""Rollout on a tiny Qwen2: masks, rollout-time log-probs, and no inherited sampling defaults."""

from __future__ import annotations

import pytest
import torch

from src.modules.models.tiny import TinyQwen2
from src.modules.rollout.hf import HFGenerateRollout
from src.modules.scoring import score_tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = TinyQwen2(cache_dir=str(tmp_path_factory.mktemp("m")), hidden_size=32, num_layers=2, seed=5)
    model, tok = spec.load_model().eval(), spec.load_tokenizer()
    msgs = [[{"role": "user", "content": "12+34="}], [{"role": "user", "content": "1+2345678="}]]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, padding=True, return_tensors="pt",
                                  return_dict=True)
    return model, tok, enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_rollout_logps_equal_the_scorers(tiny, temperature):
    model, tok, ids, mask = tiny
    torch.manual_seed(0)
    ro = HFGenerateRollout(max_new_tokens=16, temperature=temperature, num_samples=4)(
        model, ids, mask, [tok.eos_token_id], tok.pad_token_id)
    logp, ent = score_tokens(model, ro.input_ids, ro.attention_mask, ro.response_start, temperature, chunk_size=5)
    m = ro.response_mask_BT
    torch.testing.assert_close(logp[m], ro.old_logp_BT[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[m], ro.entropy_BT[m], atol=1e-5, rtol=1e-5)


def test_masks_exclude_prompt_and_padding(tiny):
    model, tok, ids, mask = tiny
    torch.manual_seed(1)
    # bias the model toward EOS so some rows finish early and get padded
    model.lm_head.weight.data[tok.eos_token_id] += 0.5 * model.model.norm.weight.data.sign()
    try:
        ro = HFGenerateRollout(max_new_tokens=24, num_samples=8)(model, ids, mask, [tok.eos_token_id],
                                                                   tok.pad_token_id)
    finally:
        model.lm_head.weight.data[tok.eos_token_id] -= 0.5 * model.model.norm.weight.data.sign()
    P = ids.shape[1]
    assert ro.response_start == P and ro.response_mask_BT.shape[1] == ro.input_ids.shape[1] - P
    resp = ro.response_ids_BT
    finished = ~ro.truncated_B
    assert finished.any(), "the EOS bias should have finished some rows"
    for b in range(resp.shape[0]):
        n = int(ro.response_mask_BT[b].sum())
        assert ro.response_mask_BT[b, :n].all() and not ro.response_mask_BT[b, n:].any()
        if finished[b]:
            assert resp[b, n - 1] == tok.eos_token_id  # EOS itself is a sampled token: in the loss
            assert (resp[b, n:] == tok.pad_token_id).all()
        # the attention mask covers the prompt's real tokens and exactly the response mask
        assert torch.equal(ro.attention_mask[b, P:].bool(), ro.response_mask_BT[b])
        assert torch.equal(ro.attention_mask[b, :P], mask.repeat_interleave(8, 0)[b])
    assert (ro.old_logp_BT[~ro.response_mask_BT] == 0).all()


def test_checkpoint_sampling_defaults_are_not_inherited(tiny):
    model, tok, ids, mask = tiny
    saved = model.generation_config
    model.generation_config = type(saved)(**{**saved.to_dict(), "top_k": 1, "repetition_penalty": 5.0,
                                              "do_sample": True})
    try:
        torch.manual_seed(2)
        ro = HFGenerateRollout(max_new_tokens=12, num_samples=16)(model, ids, mask, [tok.eos_token_id],
                                                                    tok.pad_token_id)
    finally:
        model.generation_config = saved
    # top_k=1 would make all 16 samples of a prompt identical; a plain temperature-1 sample is diverse
    assert len({tuple(r.tolist()) for r in ro.response_ids_BT[:16]}) > 1
    assert model.generation_config is saved


def test_greedy_is_deterministic_and_records_nothing(tiny):
    model, tok, ids, mask = tiny
    r = HFGenerateRollout(max_new_tokens=10, num_samples=4)
    a = r(model, ids, mask, [tok.eos_token_id], tok.pad_token_id, greedy=True)
    b = r(model, ids, mask, [tok.eos_token_id], tok.pad_token_id, greedy=True)
    assert a.group_size == 1 and torch.equal(a.input_ids, b.input_ids) and a.old_logp_BT is None


def test_bad_rollout_settings_name_the_key():
    with pytest.raises(ValueError, match="rollout.temperature"):
        HFGenerateRollout(temperature=0)
    with pytest.raises(ValueError, match="rollout.top_p"):
        HFGenerateRollout(top_p=1.5)
    for key, value in (("max_new_tokens", 0), ("val_max_new_tokens", 0), ("val_max_new_tokens", -3)):
        with pytest.raises(ValueError, match=f"rollout.{key} must be >= 1"):
            HFGenerateRollout(**{key: value})
    r = HFGenerateRollout(max_new_tokens=8, val_max_new_tokens=None)
    assert (r.budget(True, None), r.budget(False, None), r.budget(False, 3)) == (8, 8, 3)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        r.budget(False, 0)


def test_bad_objective_settings_name_the_key():
    from src.modules.method.objectives import GeneralizedJSD, ReferenceSFT, SupervisedDistillation

    for make in (GeneralizedJSD, SupervisedDistillation, ReferenceSFT):
        with pytest.raises(ValueError, match="objective.agg must be one of"):
            make(agg="nope")
    with pytest.raises(ValueError, match="objective.epochs and objective.minibatches must be >= 1"):
        GeneralizedJSD(minibatches=0)


def test_minibatches_are_exactly_n_and_more_than_the_rows_is_refused_by_key(tiny):
    model, tok, ids, mask = tiny
    torch.manual_seed(0)
    ro = HFGenerateRollout(max_new_tokens=4, num_samples=4)(model, ids, mask, [tok.eos_token_id], tok.pad_token_id)
    rows = ro.input_ids.shape[0]
    parts = list(ro.minibatches(rows - 1))
    assert len(parts) == rows - 1 and sum(p.input_ids.shape[0] for p in parts) == rows
    with pytest.raises(ValueError, match=rf"objective.minibatches is {rows + 1}, but a rollout on this rank has "
                                         rf"{rows} rows: at most {rows}"):
        list(ro.minibatches(rows + 1))
