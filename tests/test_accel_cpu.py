"""The CPU wing (``src.accel.cpu``) against the Hugging Face forward it stands in for: the fused backbone's hidden
states, log-probs, entropies and parameter gradients, the fused decode step's logits and samples, a training step's
loss, and every case where the wing must step aside."""

import hydra
import pytest
import torch
from lm_fixtures import encode, random_lm, scored_batch

from src.accel.cpu import backbone as fused_backbone
from src.accel.cpu import decode_step as fused_decode
from src.accel.cpu.backbone import FusedBackbone, FusedScorer
from src.accel.cpu.decode_step import FusedDecoder, FusedDecodeStep, FusedForward
from src.modules.rollout.decode import ModelForward, kv_cache, sample
from src.modules.scoring import hf_backbone, position_ids_from_mask, score_tokens

LAYOUTS = ["left_padded", "unpadded", "shared_prefix"]
FUSED = FusedBackbone()


def _scores(model, ids, mask, P, backbone, temperature=0.7):
    return score_tokens(model, ids, mask, P, temperature, chunk_size=5, with_entropy=True, backbone=backbone)


# ---------------------------------------------------------------- the fused backbone
def test_the_shared_prefix_is_found_and_capped():
    ids, mask, P = scored_batch(layout="shared_prefix")
    assert FusedScorer.shared_prefix(ids, mask, P) == 4
    assert FusedScorer.shared_prefix(ids, mask, 3) == 2  # up to the first row the heads read (response_start - 1)
    assert FusedScorer.shared_prefix(*scored_batch(layout="left_padded")[:2], P) == 0
    assert FusedScorer.shared_prefix(ids[:1], mask[:1], P) == 0  # one row: nothing to share
    same = ids.clone()
    same[:] = ids[0]
    assert FusedScorer.shared_prefix(same, torch.ones_like(mask), P) == P - 1


@pytest.mark.parametrize("kind", ["qwen2", "llama", "llama_bias_yarn"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_backbone_gives_the_models_hidden_states_logps_and_entropies(kind, layout, single_thread):
    model = random_lm(kind)
    ids, mask, P = scored_batch(layout=layout)
    assert FusedScorer.for_model(model) is not None
    with torch.no_grad():
        h_fused, h_ref = FUSED(model, ids, mask, P), hf_backbone(model, ids, mask, P)
        (lp_f, ent_f), (lp_r, ent_r) = _scores(model, ids, mask, P, FUSED), _scores(model, ids, mask, P, hf_backbone)
    assert h_fused.shape == h_ref.shape == (4, 6, 48)
    torch.testing.assert_close(h_fused, h_ref, atol=1e-5, rtol=1e-5)
    # the model's own forward over every column agrees where rows are unpadded
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    output_hidden_states=True)
    full = out.hidden_states[-1][:, P - 1 : -1]
    real = mask[:, P - 1 : -1].bool()
    torch.testing.assert_close(h_ref[real], full[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp_f, lp_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_f, ent_r, atol=1e-5, rtol=1e-5)


def test_fused_backbone_in_bf16_matches_to_bf16_rounding(single_thread):
    model = random_lm("qwen2", torch.bfloat16)
    ids, mask, P = scored_batch()
    with torch.no_grad():
        lp_f, _ = _scores(model, ids, mask, P, FUSED)
        lp_r, _ = _scores(model, ids, mask, P, hf_backbone)
    assert (lp_f - lp_r)[mask[:, P:].bool()].abs().max() < 0.3  # log-probs of order -10: bf16's 3 digits


@pytest.mark.parametrize("kind", ["qwen2", "llama_bias_yarn"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_backbone_gives_the_same_parameter_gradients(kind, layout, single_thread):
    """The student's path: train mode, grad on; every parameter's gradient (embedding, norms, biases, the
    tied head) as through the Hugging Face forward."""
    model = random_lm(kind).train()
    model.model.embed_tokens.padding_idx = 0  # as nn.Embedding(padding_idx=pad_token_id): no gradient to that row
    ids, mask, P = scored_batch(layout=layout)
    weights = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    grads = {}
    for name, backbone in (("fused", FUSED), ("hf", hf_backbone)):
        model.zero_grad()
        lp, _ = _scores(model, ids, mask, P, backbone)
        (lp * mask[:, P:] * weights).sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert grads["fused"].keys() == grads["hf"].keys()
    for name, g_ref in grads["hf"].items():
        torch.testing.assert_close(grads["fused"][name], g_ref, atol=1e-5, rtol=1e-4, msg=name)
        assert g_ref.abs().sum() > 0, name  # every weight is reached: the comparison is not vacuous
    if kind == "qwen2":  # tied: the head gives row 0 gradient, the embedding must add none (llama: untied)
        assert grads["fused"]["model.embed_tokens.weight"][0].abs().sum() > 0
    else:
        assert grads["fused"]["model.embed_tokens.weight"][0].abs().sum() == 0


@pytest.mark.parametrize("layout", ["left_padded", "shared_prefix"])
def test_long_sequences_take_the_sdpa_branch_and_agree(monkeypatch, layout, single_thread):
    """Above EAGER_MAX_SCORES the attention is ``scaled_dot_product_attention`` (no [B, heads, T, T] scores)."""
    model = random_lm("llama")
    ids, mask, P = scored_batch(layout=layout)
    with torch.no_grad():
        eager, ref = FUSED(model, ids, mask, P), hf_backbone(model, ids, mask, P)
        monkeypatch.setattr(fused_backbone, "EAGER_MAX_SCORES", 0)
        calls = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda *a, **k: calls.append(1) or sdpa(*a, **k))
        flash = FUSED(model, ids, mask, P)
    # every layer of every row, and the shared row's in the layers before the last
    assert len(calls) == (3 if layout == "shared_prefix" else 2)
    torch.testing.assert_close(flash, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["left_padded", "shared_prefix"])
def test_the_mlps_compute_only_the_rows_they_must(monkeypatch, layout, single_thread):
    """The savings are real: the last layer's MLP sees the response rows only, the others every position but
    the last (which nothing read attends to); with a shared prefix its columns go through once (one row), and
    every row's own columns after it."""
    model = random_lm("qwen2")
    ids, mask, P = scored_batch(layout=layout)
    c = 4 if layout == "shared_prefix" else 0
    rows_seen = []
    linear = torch.nn.functional.linear
    I = model.config.intermediate_size

    def spy(x, w, b=None):
        if w.shape[0] == 2 * I:  # the packed gate/up projection
            rows_seen.append(tuple(x.shape[:2]))
        return linear(x, w, b)

    monkeypatch.setattr(fused_backbone.F, "linear", spy)
    with torch.no_grad():
        FUSED(model, ids, mask, P)
    B, T = ids.shape
    per_layer = ([(1, c)] if c else []) + [(B, T - 1 - c)]
    assert rows_seen == per_layer * (model.config.num_hidden_layers - 1) + [(B, T - P)]


def test_fused_backbone_steps_aside_where_it_would_not_be_the_models_forward(monkeypatch, single_thread):
    model = random_lm("qwen2")
    assert FusedScorer.for_model(model.train()) is not None  # no dropout configured: train mode is the same forward
    model.config.attention_dropout = 0.1
    assert FusedScorer.for_model(model) is None
    assert FusedScorer.for_model(model.eval()) is not None  # eval: dropout is off
    model.config.attention_dropout = 0.0
    enable, disable = (("activation_checkpointing_enable", "activation_checkpointing_disable")
                       if hasattr(model, "activation_checkpointing_enable")
                       else ("gradient_checkpointing_enable", "gradient_checkpointing_disable"))
    getattr(model, enable)()
    assert FusedScorer.for_model(model.train()) is None
    getattr(model, disable)()
    handle = model.model.layers[0].register_forward_hook(lambda *a: None)
    assert FusedScorer.for_model(model) is None
    handle.remove()
    # where it steps aside the backbone is the Hugging Face forward, and still right
    ids, mask, P = scored_batch()
    model.config.attention_dropout = 0.1
    with torch.no_grad():
        torch.testing.assert_close(FUSED(model.train(), ids, mask, P), hf_backbone(model.eval(), ids, mask, P))
    # and so it is for inputs it does not take (a vision-language batch's images)
    model.config.attention_dropout = 0.0
    monkeypatch.setattr(fused_backbone, "hf_backbone", lambda *a, **k: ("hf", k))
    assert FUSED(model.eval(), ids, mask, P, pixel_values=1) == ("hf", {"pixel_values": 1})


def test_a_frozen_models_packing_is_cached_until_a_weight_changes(single_thread):
    model = random_lm("qwen2").requires_grad_(False)
    ids, mask, P = scored_batch()
    scorer = FusedScorer.for_model(model)
    with torch.no_grad():
        before = FUSED(model, ids, mask, P)
        packed = scorer._packed
        FUSED(model, ids, mask, P)
        assert scorer._packed is packed and FusedScorer.for_model(model) is scorer
        model.model.layers[0].mlp.up_proj.weight.mul_(2)  # an in-place write bumps the version
        after = FUSED(model, ids, mask, P)
        assert scorer._packed is not packed
        torch.testing.assert_close(after, hf_backbone(model, ids, mask, P))
    assert not torch.allclose(before, after)


def test_under_cpu_autocast_the_residual_stream_stays_in_fp32(single_thread):
    """bf16 autocast casts each matmul's inputs; the Hugging Face forward keeps the residual sum in fp32, and so
    must the fused one (an addmm with the residual inside would round the stream itself to bf16)."""
    model = random_lm("qwen2")
    ids, mask, P = scored_batch(layout="left_padded")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused, ref = FUSED(model, ids, mask, P), hf_backbone(model, ids, mask, P)
    with torch.no_grad():
        exact = hf_backbone(model, ids, mask, P)
    assert fused.dtype == ref.dtype
    # within autocast's own error of the fp32 forward, as the Hugging Face forward under autocast is
    assert (fused.float() - exact).abs().max() <= 1.5 * (ref.float() - exact).abs().max()


def test_rotary_frequencies_that_depend_on_the_length_keep_the_last_column(single_thread):
    """Dynamic NTK rope rescales by the call's longest position: the whole sequence runs, its last column
    included, as in the model's own forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
                                         rope_parameters=rope)).eval()
    ids, mask, P = scored_batch(layout="unpadded")  # 7 prompt + 6 response tokens: past the 8 positions
    scorer = FusedScorer.for_model(model)
    assert scorer is not None and not scorer.static_rope()
    with torch.no_grad():
        torch.testing.assert_close(FUSED(model, ids, mask, P), hf_backbone(model, ids, mask, P),
                                   atol=1e-5, rtol=1e-5)


def test_a_training_steps_loss_and_gradients_agree_with_and_without_the_wing(make_cfg, single_thread):
    cfg = make_cfg("rollout.max_new_tokens=10", "rollout.num_samples=2", "accel=cpu")
    module = hydra.utils.instantiate(cfg.module)
    module.configure_model()
    assert isinstance(module.scorer.backbone, FusedBackbone) and isinstance(module.rollout.decoder, FusedDecoder)
    assert FusedScorer.for_model(module.student) is not None and FusedScorer.for_model(module.teacher) is not None
    batch = {**encode(module.tokenizer, ["12+34=", "5+678="]), "references": ["46", "683"]}
    ro = module.objective.rollout(batch, module.sampler, module.scorer)
    out = {}
    for name, backbone in (("fused", FUSED), ("hf", hf_backbone)):
        module.scorer.backbone = backbone
        module.objective.prepare(ro, module.scorer, module.selection)
        module.student.zero_grad()
        loss, _ = module.objective.loss(ro, module.scorer)
        loss.backward()
        out[name] = loss.detach(), ro.teacher_logp_BT, [p.grad.clone() for p in module.student.parameters()]
    torch.testing.assert_close(out["fused"][0], out["hf"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["fused"][1], out["hf"][1], atol=1e-5, rtol=1e-5)
    for g_fused, g_ref in zip(out["fused"][2], out["hf"][2]):
        torch.testing.assert_close(g_fused, g_ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the fused decoder
@pytest.mark.parametrize("kind,dtype,atol", [
    ("qwen2", torch.float32, 1e-5), ("llama", torch.float32, 1e-5), ("llama_bias_yarn", torch.float32, 1e-5),
    ("qwen2", torch.bfloat16, 0.15)])
def test_fused_decode_step_gives_the_models_own_logits(kind, dtype, atol, single_thread):
    model = random_lm(kind, dtype)
    assert fused_decode.fusable(model)
    step = FusedDecodeStep(model)
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
            assert cache.layers[0].length == 8 + t


@pytest.mark.parametrize("kind", ["qwen2", "llama_bias_yarn", "qwen2_sdpa"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_writes_the_models_cache_and_last_hidden_state(kind, layout, monkeypatch, single_thread):
    """The decoder's fused prefill: every layer's keys and values (where the prompt is not padding) and the last
    column's hidden state, against the Hugging Face forward's cache (``qwen2_sdpa``: through the
    ``scaled_dot_product_attention`` branch that long prompts take)."""
    from src.modules.rollout.decode import _forward_keywords

    if kind.endswith("_sdpa"):
        kind = kind.removesuffix("_sdpa")
        monkeypatch.setattr(fused_backbone, "EAGER_MAX_SCORES", 0)
    model = random_lm(kind)
    ids, mask, P = scored_batch(layout=layout)
    ids, mask = ids[:, :P], mask[:, :P]
    fused, ref = kv_cache(model, P + 3), kv_cache(model, P + 3)
    with torch.no_grad():
        h = FusedScorer.for_model(model).prefill(ids, mask, fused)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, output_hidden_states=True, **{_forward_keywords(model)[0]: ref})
    assert h.shape == (4, 48)
    torch.testing.assert_close(h, out.hidden_states[-1][:, -1], atol=1e-5, rtol=1e-5)
    real = mask.bool()[:, None, :, None]  # padding columns are masked in every later step
    for a, b in zip(fused.layers, ref.layers):
        assert a.length == b.length == P and a._keys.shape[2] == P + 3
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            torch.testing.assert_close(x * real, y * real, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])  # tied and untied heads
@pytest.mark.parametrize("layout", ["left_padded", "shared_prefix"])
def test_fused_decoding_samples_the_models_own_tokens(monkeypatch, kind, layout, single_thread):
    model = random_lm(kind)
    ids, mask, P = scored_batch(layout=layout)
    calls = []
    real = FusedScorer.prefill
    monkeypatch.setattr(FusedScorer, "prefill", lambda self, *a: calls.append(1) or real(self, *a))
    torch.manual_seed(0)
    seq, logp, ent = sample(model, ids[:, :P], mask[:, :P], [0], 0, 5, temperature=0.8, decoder=FusedDecoder())
    assert calls == [1]  # the prompt went through the fused layers
    torch.manual_seed(0)
    seq_ref, logp_ref, ent_ref = sample(model, ids[:, :P], mask[:, :P], [0], 0, 5, temperature=0.8)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logp, logp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=1e-5)


def test_a_prefill_leaves_no_packing_behind_on_a_frozen_model(single_thread):
    model = random_lm("qwen2").requires_grad_(False)
    ids, mask, P = scored_batch(layout="left_padded")
    scorer = FusedScorer.for_model(model)
    with torch.no_grad():
        scorer.prefill(ids[:, :P], mask[:, :P], kv_cache(model, P + 2))
        assert scorer._packed is None  # a teacher that only generates keeps no second copy of its weights
        scorer(ids, mask, P)
        kept = scorer._packed
        scorer.prefill(ids[:, :P], mask[:, :P], kv_cache(model, P + 2))
    assert kept is not None and scorer._packed is kept  # the scorer's cached packing is reused, not replaced


def test_the_fused_decoder_steps_aside_where_it_would_not_be_the_models_forward(monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def decoder_for(model):
        return FusedDecoder()(model, kv_cache(model, 4), None)

    model = random_lm("qwen2")
    assert isinstance(decoder_for(model), FusedForward)
    assert isinstance(decoder_for(model.train()), ModelForward)  # dropout could be active
    model.eval()
    with monkeypatch.context() as m:  # the CPU wing: a GPU keeps the model's own forward
        m.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
        assert isinstance(decoder_for(model), ModelForward)
    handle = model.model.layers[1].mlp.register_forward_pre_hook(lambda *a: None)  # sharding / offload wrappers
    assert isinstance(decoder_for(model), ModelForward)
    handle.remove()
    model.model.layers[0].self_attn.q_proj = torch.nn.Sequential(model.model.layers[0].self_attn.q_proj)  # adapters
    assert not fused_decode.fusable(model)
    sliding = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                           sliding_window=4, max_window_layers=0)).eval()
    assert not fused_decode.fusable(sliding)
    gelu = random_lm("llama")
    gelu.config.hidden_act = "gelu"
    assert not fused_decode.fusable(gelu)
    # FSDP's flat parameters and ZeRO-3 partitions: weights not at their config's shape
    sharded = random_lm("llama")
    sharded.model.layers[1].mlp.up_proj.weight.data = torch.zeros(7)
    assert not fused_decode.fusable(sharded)
    offloaded = random_lm("llama")
    offloaded.model.layers[0]._hf_hook = object()  # Accelerate replaces forwards rather than registering hooks
    assert not fused_decode.fusable(offloaded)
    assert not fused_decode.fusable(random_lm("qwen2").to("meta"))
    big = random_lm("qwen2")
    big_limit, FusedDecodeStep.MAX_PARAMS = FusedDecodeStep.MAX_PARAMS, 1000
    try:
        assert not fused_decode.fusable(big)  # beyond small models the packed copies cost too much memory
    finally:
        FusedDecodeStep.MAX_PARAMS = big_limit
    # a cache that is not the loop's preallocated one
    from transformers import DynamicCache

    assert isinstance(FusedDecoder()(random_lm("qwen2"), DynamicCache(), None), ModelForward)


def test_the_accel_group_sets_both_seams_for_every_rollout(make_cfg):
    for rollout in ("hf", "tools"):
        cfg = make_cfg(f"rollout={rollout}", "accel=cpu")
        built = hydra.utils.instantiate(cfg.rollout)
        assert isinstance((built.turn if rollout == "tools" else built).decoder, FusedDecoder)
        assert isinstance(hydra.utils.instantiate(cfg.module).backbone, FusedBackbone)
        plain = hydra.utils.instantiate(make_cfg(f"rollout={rollout}", "accel=none").rollout)
        assert (plain.turn if rollout == "tools" else plain).decoder is ModelForward


# ---------------------------------------------------------------- a training rollout's prefill, kept for the scoring
def _gate_up_rows(monkeypatch, model):
    """Records the rows [b, t] each packed gate/up projection of ``model`` sees."""
    rows, linear, I = [], torch.nn.functional.linear, model.config.intermediate_size

    def spy(x, w, b=None):
        if w.shape[0] == 2 * I:
            rows.append(tuple(x.shape[:2]))
        return linear(x, w, b)

    monkeypatch.setattr(fused_backbone.F, "linear", spy)
    return rows


def _keep_prefill(model, ids, mask, P):
    """As the decode loop runs it for a training rollout: without gradient, the graph kept all the same."""
    with torch.no_grad():
        FusedScorer.for_model(model).prefill(ids[:, :P], mask[:, :P], kv_cache(model, ids.shape[1]), keep_graph=True)
    return fused_backbone._PREFILLS.get(model)


@pytest.mark.parametrize("kind,layout,sdpa", [("qwen2", layout, False) for layout in LAYOUTS]
                         + [("llama_bias_yarn", "left_padded", False), ("qwen2", "left_padded", True)])
def test_scoring_continues_from_a_kept_prefill_with_the_same_gradients(monkeypatch, kind, layout, sdpa,
                                                                        single_thread):
    """The response columns alone, attending to the prefill's keys and values, give the full forward's hidden
    states and every parameter's gradient (through both graphs), the first response token's included."""
    model = random_lm(kind).train()
    ids, mask, P = scored_batch(layout=layout)
    B, T = ids.shape
    if sdpa:
        monkeypatch.setattr(fused_backbone, "EAGER_MAX_SCORES", 0)
    g = torch.randn(B, T - P, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    g[:, 1:] *= 0.01  # the first response token's hidden state (the prefill's own) dominates the loss
    grads = {}
    for continued in (True, False):
        model.zero_grad()
        if continued:
            assert _keep_prefill(model, ids, mask, P) is not None
        rows = _gate_up_rows(monkeypatch, model)
        h = FUSED(model, ids, mask, P)
        monkeypatch.undo()
        if continued:  # every layer ran the response columns only (the last one is never run)
            assert rows == [(B, T - 1 - P)] * model.config.num_hidden_layers
        assert model not in fused_backbone._PREFILLS  # a kept prefill serves one scoring
        (h * g).sum().backward()
        grads[continued] = h.detach(), [p.grad for p in model.parameters() if p is not model.lm_head.weight]
    torch.testing.assert_close(grads[True][0], grads[False][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_kept_prefill_that_no_longer_applies_is_not_continued(monkeypatch, single_thread):
    model = random_lm("qwen2").train()
    ids, mask, P = scored_batch(layout="left_padded")
    B, T = ids.shape
    with torch.no_grad():
        ref = hf_backbone(model, ids, mask, P)

    def continued(ids=ids, mask=mask, prepare=None):
        _keep_prefill(model, ids if prepare is None else prepare, mask, P)
        rows = _gate_up_rows(monkeypatch, model)
        h = FUSED(model, ids, mask, P)
        monkeypatch.undo()
        return rows[0][1] == T - 1 - P, h

    ok, h = continued()
    assert ok
    torch.testing.assert_close(h, ref, atol=1e-5, rtol=1e-5)
    other = ids.clone()
    other[0, P - 1] = (other[0, P - 1] + 1) % 50
    assert not continued(prepare=other)[0]  # other prompts
    _keep_prefill(model, ids, mask, P)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.0)  # an in-place change (an optimiser step)
    rows = _gate_up_rows(monkeypatch, model)
    FUSED(model, ids, mask, P)
    monkeypatch.undo()
    assert rows[0][1] == T - 1  # the whole sequence ran again
    # a fused optimiser step writes the weights without moving their version counters
    _keep_prefill(model, ids, mask, P)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    versions = [p._version for p in model.parameters()]
    torch.optim.AdamW(model.parameters(), lr=0.0, fused=True).step()
    model.zero_grad(set_to_none=True)
    assert [p._version for p in model.parameters()] == versions
    rows = _gate_up_rows(monkeypatch, model)
    FUSED(model, ids, mask, P)
    monkeypatch.undo()
    assert rows[0][1] == T - 1
    # a one-token response is the prefill's last column alone, gradient included
    grads = []
    for keep in (True, False):
        if keep:
            _keep_prefill(model, ids, mask, P)
        model.zero_grad()
        h1 = FUSED(model, ids[:, : P + 1], mask[:, : P + 1], P)
        torch.testing.assert_close(h1, ref[:, :1], atol=1e-5, rtol=1e-5)
        h1.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert grads[0][0].abs().sum() > 0


def test_rotary_frequencies_that_depend_on_the_length_keep_no_prefill(single_thread):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
                                         rope_parameters=rope))
    ids, mask, P = scored_batch(layout="unpadded")
    assert _keep_prefill(model, ids, mask, P) is None


def test_a_training_rollout_keeps_its_prefill_for_the_next_scoring_only(make_cfg, single_thread):
    """Through the module: the student's rollout with gradient on keeps its prefill, the first scoring continues
    from it (same loss and gradients as scoring from scratch); rollouts without gradient (evaluation), of the
    frozen teacher, or scored in other rows (minibatches) keep none or drop it."""
    cfg = make_cfg("rollout.max_new_tokens=10", "rollout.num_samples=2", "accel=cpu")
    module = hydra.utils.instantiate(cfg.module)
    module.configure_model()
    module.student.train()
    batch = {**encode(module.tokenizer, ["12+34=", "5+678=", "9="]), "references": ["46", "683", "9"]}
    out = []
    for keep in (True, False):
        ro = module.objective.rollout(batch, module.sampler, module.scorer)
        assert (module.student in fused_backbone._PREFILLS) is True
        if not keep:
            fused_backbone._PREFILLS.pop(module.student)
        module.objective.prepare(ro, module.scorer, module.selection)
        assert module.student in fused_backbone._PREFILLS or not keep  # the teacher's scoring leaves it alone
        module.student.zero_grad()
        loss, _ = module.objective.loss(ro, module.scorer)
        assert module.student not in fused_backbone._PREFILLS
        loss.backward()
        out.append((ro, loss.detach(), [p.grad.clone() for p in module.student.parameters()]))
    assert torch.equal(out[0][0].input_ids, out[1][0].input_ids)  # the same step seed: the same rollout
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-6, rtol=1e-5)
    for a, b in zip(out[0][2], out[1][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        module.sampler(module.student, batch, greedy=True)
    assert module.student not in fused_backbone._PREFILLS  # an evaluation rollout keeps nothing
    module.sampler(module.teacher, batch)
    assert module.teacher not in fused_backbone._PREFILLS  # nor does a frozen model's


def test_the_wing_holds_its_models_weakly(single_thread):
    """A model the run drops is freed, with its scorer and packed weights (the registries hold it weakly)."""
    import gc
    import weakref

    model = random_lm("qwen2").requires_grad_(False)
    ids, mask, P = scored_batch()
    with torch.no_grad():
        FUSED(model, ids, mask, P)
    gone = weakref.ref(model)
    assert FusedScorer.for_model(model)._packed is not None
    del model
    gc.collect()
    assert gone() is None


def test_a_prefill_is_kept_only_where_the_scoring_takes_the_fused_backbone(single_thread):
    model = random_lm("qwen2").train()
    ids, mask, P = scored_batch()

    def rollout_keeps():
        fused_backbone._PREFILLS.pop(model, None)
        model.eval()  # as the sampler puts it
        with torch.enable_grad():  # a training step's rollout
            FusedDecoder()(model, kv_cache(model, ids.shape[1]), None).prefill(ids[:, :P], mask[:, :P])
        model.train()
        return model in fused_backbone._PREFILLS

    assert rollout_keeps()
    model.config.attention_dropout = 0.1  # the training scoring would take the Hugging Face forward
    assert not rollout_keeps()
    # and a kept prefill is dropped by the model's next scoring, whichever forward that is
    model.config.attention_dropout = 0.0
    assert rollout_keeps()
    model.config.attention_dropout = 0.1
    FUSED(model, ids, mask, P)
    assert model not in fused_backbone._PREFILLS


def test_the_decode_steps_packed_weights_carry_no_graph():
    model = random_lm("qwen2")
    with torch.enable_grad():  # a training step's rollout builds its decoder with gradient on
        step = FusedDecodeStep(model)
    packed = [layer[i] for layer in step.layers for i in (1, 2, 6)]  # q/k/v (+ rotations), their bias, gate/up
    assert packed and not any(w.requires_grad for w in packed if w is not None)
