"""The lean decoding loop (``src.modules.rollout.decode``) against ``generate`` and the teacher-forced scorer."""

from __future__ import annotations

import dataclasses

import hydra
import pytest
import torch
from lm_fixtures import encode

from src.modules.models.tiny import TinyQwen2
from src.modules.rollout.hf import HFGenerateRollout
from src.modules.scoring import score_tokens

FIELDS = ["input_ids", "attention_mask", "response_mask_BT", "truncated_B"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = TinyQwen2(cache_dir=str(tmp_path_factory.mktemp("m")), hidden_size=32, num_layers=2, seed=5)
    model, tok = spec.load_model().eval(), spec.load_tokenizer()
    enc = encode(tok, ["12+34=", "1+2345678=", "7=", "99+1="])  # different lengths: left padding
    assert not enc["attention_mask"].all()
    return model, tok, enc["input_ids"], enc["attention_mask"]


@pytest.fixture
def eos_bias(tiny):
    """Push the model toward EOS so some rows finish mid-way and others run out of budget."""
    model, tok, _, _ = tiny
    bias = 0.35 * model.model.norm.weight.data.sign()
    model.lm_head.weight.data[tok.eos_token_id] += bias
    yield
    model.lm_head.weight.data[tok.eos_token_id] -= bias


@pytest.fixture
def sharp(tiny):
    """Weights x10: a random model's greedy path otherwise repeats one token in every row."""
    model = tiny[0]
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved:
                p.mul_(10)
    yield
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])


def rollouts(tiny, seed=0, eos=None, **kw):
    model, tok, ids, mask = tiny
    call = {k: kw.pop(k) for k in ["greedy", "banned_ids"] if k in kw}
    out = {}
    for backend in ["loop", "generate"]:
        torch.manual_seed(seed)
        out[backend] = HFGenerateRollout(backend=backend, **kw)(model, ids, mask, eos or [tok.eos_token_id],
                                                                 tok.pad_token_id, **call)
    return out["loop"], out["generate"]


def test_greedy_loop_equals_generate_token_for_token(tiny, sharp, single_thread):
    model, tok, ids, mask = tiny
    banned = torch.tensor(tok.convert_tokens_to_ids(["1", "+"]))
    # a random model's greedy path never meets its EOS: take as a second EOS a token that one row emits
    # mid-way and another never does, so some rows stop early and others run out of budget
    free = HFGenerateRollout(backend="generate")(model, ids, mask, [tok.eos_token_id], tok.pad_token_id,
                                                 greedy=True, max_new_tokens=24, banned_ids=banned)
    free = free.response_ids_BT
    stop = next(int(t) for a in free for t in a[2:] if t not in a[:2] and any(t not in b for b in free))
    loop, gen = rollouts(tiny, eos=[tok.eos_token_id, stop], greedy=True, max_new_tokens=24, num_samples=4,
                         banned_ids=banned)
    for name in FIELDS:
        assert torch.equal(getattr(loop, name), getattr(gen, name)), name
    assert loop.old_logp_BT is None and loop.entropy_BT is None and loop.group_size == 1
    assert loop.truncated_B.any() and not loop.truncated_B.all()
    assert not torch.isin(loop.response_ids_BT[loop.response_mask_BT], banned).any()


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_sampling_loop_equals_generate_with_the_same_seed(tiny, eos_bias, kw, single_thread):
    loop, gen = rollouts(tiny, max_new_tokens=20, num_samples=3, **kw)
    assert loop.truncated_B.any() and not loop.truncated_B.all()
    for name in FIELDS:
        assert torch.equal(getattr(loop, name), getattr(gen, name)), name
    torch.testing.assert_close(loop.old_logp_BT, gen.old_logp_BT, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loop.entropy_BT, gen.entropy_BT, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 8, 0.8)])
def test_recorded_logps_and_entropies_equal_the_scorers(tiny, eos_bias, temperature, top_k, top_p,
                                                        single_thread):
    model, tok, ids, mask = tiny
    banned = torch.tensor(tok.convert_tokens_to_ids(["3"]))
    torch.manual_seed(3)
    rollout = HFGenerateRollout(max_new_tokens=20, temperature=temperature, top_k=top_k, top_p=top_p,
                                num_samples=4)
    ro = rollout(model, ids, mask, [tok.eos_token_id], tok.pad_token_id, banned_ids=banned)
    assert ro.truncated_B.any() and not ro.truncated_B.all()
    logp, ent = score_tokens(model, ro.input_ids, ro.attention_mask, ro.response_start, temperature,
                             chunk_size=7, banned_ids=banned)
    m = ro.response_mask_BT
    torch.testing.assert_close(ro.old_logp_BT[m], logp[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ro.entropy_BT[m], ent[m], atol=1e-5, rtol=1e-5)
    assert (ro.old_logp_BT[~m] == 0).all() and (ro.entropy_BT[~m] == 0).all()


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5)])
def test_top_k_and_top_p_restrict_the_samples(tiny, top_k, top_p, single_thread):
    model, tok, ids, mask = tiny

    def outside(ro):
        """Sampled tokens outside the top-k / top-p set of their step's distribution at temperature 1.3."""
        P = ro.response_start
        with torch.no_grad():
            pos = (ro.attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits
        p_BTV = torch.softmax(logits[:, P - 1 : -1].float() / 1.3, dim=-1)
        above_BTV = p_BTV > p_BTV.gather(-1, ro.response_ids_BT[..., None])  # strictly more probable tokens
        out_BT = above_BTV.sum(-1) >= top_k if top_k else (p_BTV * above_BTV).sum(-1) >= top_p
        return out_BT & ro.response_mask_BT

    def sample(**kw):
        torch.manual_seed(4)
        return HFGenerateRollout(max_new_tokens=16, temperature=1.3, num_samples=8, **kw)(
            model, ids, mask, [tok.eos_token_id], tok.pad_token_id)

    assert not outside(sample(top_k=top_k, top_p=top_p)).any()
    assert outside(sample()).any()  # the unrestricted sampler leaves the set: the restriction bites


def test_a_training_steps_loss_agrees_between_loop_and_generate(make_cfg, single_thread):
    """Same seed, both backends: same rollout, same recorded log-probs and entropies, same loss; and the loss
    with the loop's records equals the loss with the records recomputed by teacher forcing."""
    cfg = make_cfg("rollout.max_new_tokens=16", "rollout.num_samples=2")
    module = hydra.utils.instantiate(cfg.module)
    module.configure_model()
    enc = encode(module.tokenizer, ["12+34=", "5+678="])
    batch = {**enc, "references": ["46", "683"]}
    losses = {}
    for backend in ["loop", "generate"]:
        module.rollout.use_loop = backend == "loop"
        ro = module.objective.rollout(batch, module.sampler, module.scorer)
        module.objective.prepare(ro, module.scorer, module.selection)
        losses[backend] = (ro, module.objective.loss(ro, module.scorer)[0])
    (loop, loss_loop), (gen, loss_gen) = losses["loop"], losses["generate"]
    for name in FIELDS:
        assert torch.equal(getattr(loop, name), getattr(gen, name)), name
    torch.testing.assert_close(loss_loop, loss_gen, atol=1e-6, rtol=1e-5)

    logp, ent = module.scorer.student_logp(loop, with_entropy=True)
    m = loop.response_mask_BT
    ref = dataclasses.replace(loop, old_logp_BT=(logp * m).detach(), entropy_BT=(ent * m).detach(),
                              metrics={})
    module.objective.prepare(ref, module.scorer, module.selection)
    torch.testing.assert_close(module.objective.loss(ref, module.scorer)[0], loss_loop, atol=1e-5, rtol=1e-5)


def test_unknown_backend_names_the_key():
    with pytest.raises(ValueError, match="rollout.backend"):
        HFGenerateRollout(backend="vllm")
