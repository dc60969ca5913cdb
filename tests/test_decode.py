"""The lean decoding loop (``src.modules.decode``) against ``generate`` and the teacher-forced scorer."""

from __future__ import annotations

import dataclasses

import hydra
import pytest
import torch

from src.modules.models import TinyQwen2
from src.modules.rollout import HFGenerateRollout
from src.modules.scoring import score_response

FIELDS = ["input_ids", "attention_mask", "response_mask_BT", "truncated_B"]


def encode(tok, contents):
    msgs = [[{"role": "user", "content": c}] for c in contents]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, padding=True, return_tensors="pt",
                                   return_dict=True)


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
    logp, ent = score_response(model, ro.input_ids, ro.attention_mask, ro.response_start, temperature,
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
        module.rollout.backend = backend
        ro = module.generate(batch)
        module.objective.prepare(ro, module, module.selection)
        losses[backend] = (ro, module.objective.loss(ro, module)[0])
    (loop, loss_loop), (gen, loss_gen) = losses["loop"], losses["generate"]
    for name in FIELDS:
        assert torch.equal(getattr(loop, name), getattr(gen, name)), name
    torch.testing.assert_close(loss_loop, loss_gen, atol=1e-6, rtol=1e-5)

    logp, ent = module.student_scores(loop, with_entropy=True)
    m = loop.response_mask_BT
    ref = dataclasses.replace(loop, old_logp_BT=(logp * m).detach(), entropy_BT=(ent * m).detach(),
                              metrics={})
    module.objective.prepare(ref, module, module.selection)
    torch.testing.assert_close(module.objective.loss(ref, module)[0], loss_loop, atol=1e-5, rtol=1e-5)


def test_unknown_backend_names_the_key():
    with pytest.raises(ValueError, match="rollout.backend"):
        HFGenerateRollout(backend="vllm")


# ---------------------------------------------------------------- the fused decode step (src.modules.fast_decode)
def _random_lm(kind: str, dtype=torch.float32):
    """A small random Qwen2 (q/k/v biases), Llama (no biases, head size set apart from hidden / heads) or
    Llama with biases on every attention projection (o_proj's included) and yarn rope scaling (attention
    factor != 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=50, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=kind == "qwen2")
    torch.manual_seed(11)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, head_dim=16, rope_theta=500.0))
    else:
        yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 500.0}
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=True, rope_parameters=yarn))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8) if p.dim() == 2 else p.normal_(0, 0.5)  # logits far from uniform, biases non-zero
    return model.to(dtype).eval()


@pytest.mark.parametrize("kind,dtype,atol,compiled", [
    ("qwen2", torch.float32, 1e-5, False), ("llama", torch.float32, 1e-5, False),
    ("llama_bias_yarn", torch.float32, 1e-5, False), ("qwen2", torch.bfloat16, 0.15, False),
    ("qwen2", torch.float32, 1e-5, True), ("llama_bias_yarn", torch.float32, 1e-5, True)])
def test_fused_decode_step_gives_the_models_own_logits(kind, dtype, atol, compiled, single_thread):
    """Eager and compiled (``rollout.fused_decode=compiled``: the whole cache read, later columns masked)."""
    from src.modules.decode import kv_cache
    from src.modules.fast_decode import FusedDecodeStep
    from src.modules.scoring import position_ids_from_mask

    model = _random_lm(kind, dtype)
    step = FusedDecodeStep.build(model, compiled=compiled)
    assert step is not None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    new = torch.randint(1, 50, (3, 5), generator=g)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    pos = position_ids_from_mask(full_mask)
    bias = torch.zeros(full_mask.shape, dtype=dtype).masked_fill_(full_mask == 0, torch.finfo(dtype).min)
    with torch.no_grad():
        # the reference: one teacher-forced forward over prompt and new tokens
        ref = model(input_ids=torch.cat([ids, new], 1), attention_mask=full_mask, position_ids=pos).logits
        cache = kv_cache(model, 12)
        model(input_ids=ids, attention_mask=mask, position_ids=pos[:, :7], cache=cache, use_cache=True)
        for t in range(5):
            got = step(new[:, t], pos[:, 7 + t], cache, 8 + t, bias)
            torch.testing.assert_close(got.float(), ref[:, 7 + t].float(), atol=atol, rtol=0)


def test_compiled_decode_samples_the_eager_steps_tokens(tiny, eos_bias, single_thread):
    from src.modules.decode import sample

    model, tok, ids, mask = tiny
    assert not bool(mask.all())  # left padding: the compiled step masks padding and later columns alike
    out = {}
    for fused in ("compiled", True):
        torch.manual_seed(9)
        out[fused] = sample(model, ids, mask, [tok.eos_token_id], tok.pad_token_id, 20, temperature=0.8,
                            fused=fused)
    (seq_c, lp_c, ent_c), (seq_e, lp_e, ent_e) = out["compiled"], out[True]
    assert torch.equal(seq_c, seq_e)
    m = seq_c[:, ids.shape[1]:] != tok.pad_token_id
    torch.testing.assert_close(lp_c[m], lp_e[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_c[m], ent_e[m], atol=1e-5, rtol=0)


def test_compiled_decode_step_without_padding(single_thread):
    """No padding: the step gets no bias and masks only the later columns (``_zero_bias``)."""
    from src.modules.decode import kv_cache
    from src.modules.fast_decode import FusedDecodeStep

    model = _random_lm("qwen2")
    step = FusedDecodeStep.build(model, compiled=True)
    g = torch.Generator().manual_seed(1)
    ids, new = torch.randint(1, 50, (2, 6), generator=g), torch.randint(1, 50, (2, 4), generator=g)
    pos = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        ref = model(input_ids=torch.cat([ids, new], 1)).logits
        cache = kv_cache(model, 10)
        model(input_ids=ids, cache=cache, use_cache=True)
        for t in range(4):
            got = step(new[:, t], pos[:, 6 + t], cache, 7 + t)
            torch.testing.assert_close(got, ref[:, 6 + t], atol=1e-5, rtol=0)
            assert cache.layers[0].length == 7 + t and cache.layers[0].keys.shape[2] == 7 + t


def test_decode_body_writes_the_cache_in_its_own_dtype():
    """The fused prefill under bf16 autocast leaves bf16 keys and values; the step's fp32 ones are cast on the way
    in, as the eager step's assignment does (run uncompiled: what the compiler falls back to)."""
    from src.modules.decode import kv_cache
    from src.modules.fast_decode import FusedDecodeStep, decode_body

    model = _random_lm("qwen2")
    step = FusedDecodeStep.build(model)
    cache = kv_cache(model, 6)
    ids = torch.randint(1, 50, (2, 3))
    for layer in cache.layers:  # a 3-column prefill's keys and values, in bf16
        layer.update(*(torch.randn(2, step.n_kv, 3, step.head_dim, dtype=torch.bfloat16) for _ in range(2)))
    K = [layer._keys for layer in cache.layers]
    assert K[0].dtype == torch.bfloat16
    cos, sin = step.rotary(step.embed, torch.full((2, 1), 3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as a bf16-mixed rollout runs
        logits = decode_body(ids[:, 0], cos, sin, torch.tensor([3]), step.embed.new_zeros(1, 6), step.layers, K,
                             [layer._values for layer in cache.layers], step.embed, step.norm, step.head,
                             (step.n_heads, step.n_kv, step.head_dim), step.eps, step.scale)
    assert logits.shape == (2, 50) and torch.isfinite(logits).all()
    assert K[0][:, :, 3].abs().sum() > 0 and not K[0][:, :, 4:].any()  # column 3 written, the later ones zero


def test_fused_decode_takes_true_false_or_compiled():
    for value in (True, False, "compiled"):
        HFGenerateRollout(fused_decode=value)
    with pytest.raises(ValueError, match="rollout.fused_decode must be true, false or compiled"):
        HFGenerateRollout(fused_decode="yes")


def test_fused_decode_sampling_equals_the_models_forward(tiny, eos_bias, single_thread):
    from src.modules.decode import sample
    from src.modules.fast_decode import FusedDecodeStep

    model, tok, ids, mask = tiny
    assert FusedDecodeStep.build(model) is not None  # the tiny Qwen2 of every other test here takes this path
    out = {}
    for fused in (True, False):
        torch.manual_seed(9)
        out[fused] = sample(model, ids, mask, [tok.eos_token_id], tok.pad_token_id, 20, temperature=0.8,
                            fused=fused)
    (seq_f, lp_f, ent_f), (seq_h, lp_h, ent_h) = out[True], out[False]
    assert torch.equal(seq_f, seq_h)
    m = seq_f[:, ids.shape[1]:] != tok.pad_token_id
    torch.testing.assert_close(lp_f[m], lp_h[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_f[m], ent_h[m], atol=1e-5, rtol=0)


def test_fused_decode_is_skipped_where_it_would_not_be_the_models_forward():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from src.modules.fast_decode import FusedDecodeStep

    model = _random_lm("qwen2")
    assert FusedDecodeStep.build(model) is not None
    assert FusedDecodeStep.build(model.train()) is None  # dropout could be active
    model.eval()
    handle = model.model.layers[1].mlp.register_forward_pre_hook(lambda *a: None)  # sharding / offload wrappers
    assert FusedDecodeStep.build(model) is None
    handle.remove()
    model.model.layers[0].self_attn.q_proj = torch.nn.Sequential(model.model.layers[0].self_attn.q_proj)  # adapters
    assert FusedDecodeStep.build(model) is None
    sliding = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                           sliding_window=4, max_window_layers=0)).eval()
    assert FusedDecodeStep.build(sliding) is None
    gelu = _random_lm("llama")
    gelu.config.hidden_act = "gelu"
    assert FusedDecodeStep.build(gelu) is None
    # FSDP's flat parameters and ZeRO-3 partitions: weights not at their config's shape
    sharded = _random_lm("llama")
    sharded.model.layers[1].mlp.up_proj.weight.data = torch.zeros(7)
    assert FusedDecodeStep.build(sharded) is None
    offloaded = _random_lm("llama")
    offloaded.model.layers[0]._hf_hook = object()  # Accelerate replaces forwards rather than registering hooks
    assert FusedDecodeStep.build(offloaded) is None
    on_meta = _random_lm("qwen2").to("meta")
    assert FusedDecodeStep.build(on_meta) is None
    big = _random_lm("qwen2")
    assert FusedDecodeStep.build(big) is not None
    big_limit, FusedDecodeStep.MAX_PARAMS = FusedDecodeStep.MAX_PARAMS, 1000
    try:
        assert FusedDecodeStep.build(big) is None  # beyond small models the packed copies cost too much memory
    finally:
        FusedDecodeStep.MAX_PARAMS = big_limit


def test_fused_decode_can_be_turned_off_for_both_rollouts(make_cfg):
    for rollout in ("hf", "tools"):
        cfg = make_cfg(f"rollout={rollout}", "rollout.fused_decode=false")
        built = hydra.utils.instantiate(cfg.rollout)
        assert (built.turn if rollout == "tools" else built).fused_decode is False
