"""The fused scorer (``src.modules.fast_score``) against the Hugging Face forward it replaces: hidden states,
log-probs, entropies, parameter gradients, a training step's loss, and the cases where it must stand aside."""

import contextlib
import dataclasses

import pytest
import torch
from test_decode import _random_lm

from src.modules import fast_score
from src.modules.fast_score import FusedScorer
from src.modules.sampling import AllTokens
from src.modules.scoring import position_ids_from_mask, response_hidden, score_response


def _batch(V=50, B=4, P=7, R=6, seed=0, layout="left_padded"):
    """Prompts and responses as a rollout leaves them: responses right-padded after an 'EOS'; prompts
    ``left_padded``, ``unpadded``, or ``shared_prefix`` (every row opens with the same 4 tokens, as a chat
    template or a system prompt does)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, P + R), generator=g)
    mask = torch.ones_like(ids)
    if layout == "left_padded":
        mask[0, :3] = 0
        mask[2, :1] = 0
    elif layout == "shared_prefix":
        ids[:, :4] = ids[0, :4]
    mask[1, P + 2:] = 0  # a response that ended early
    ids[3, P + 1] = 0  # the padding id sampled as a token (see the gradient test)
    return ids, mask, P


def _scores(model, ids, mask, P, fused, temperature=0.7):
    return score_response(model, ids, mask, P, temperature, chunk_size=5, with_entropy=True, fused=fused)


LAYOUTS = ["left_padded", "unpadded", "shared_prefix"]


def test_the_shared_prefix_is_found_and_capped():
    ids, mask, P = _batch(layout="shared_prefix")
    assert FusedScorer.shared_prefix(ids, mask, P) == 4
    assert FusedScorer.shared_prefix(ids, mask, 3) == 2  # up to the first row the heads read (response_start - 1)
    assert FusedScorer.shared_prefix(*_batch(layout="left_padded")[:2], P) == 0
    assert FusedScorer.shared_prefix(ids[:1], mask[:1], P) == 0  # one row: nothing to share
    same = ids.clone()
    same[:] = ids[0]
    assert FusedScorer.shared_prefix(same, torch.ones_like(mask), P) == P - 1


@pytest.mark.parametrize("kind", ["qwen2", "llama", "llama_bias_yarn"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_scorer_gives_the_models_hidden_states_logps_and_entropies(kind, layout, single_thread):
    model = _random_lm(kind)
    ids, mask, P = _batch(layout=layout)
    assert FusedScorer.for_model(model) is not None
    with torch.no_grad():
        h_fused = response_hidden(model, ids, mask, P, fused=True)
        h_ref = response_hidden(model, ids, mask, P, fused=False)
        (lp_f, ent_f), (lp_r, ent_r) = _scores(model, ids, mask, P, True), _scores(model, ids, mask, P, False)
    assert h_fused.shape == h_ref.shape == (4, 6, 48)
    torch.testing.assert_close(h_fused, h_ref, atol=1e-5, rtol=1e-5)
    # the model's own forward over every column agrees where rows are unpadded
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    output_hidden_states=True)
    full = out.hidden_states[-1][:, P - 1 : -1]
    torch.testing.assert_close(h_ref[mask[:, P - 1 : -1].bool()], full[mask[:, P - 1 : -1].bool()], atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(lp_f, lp_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_f, ent_r, atol=1e-5, rtol=1e-5)


def test_fused_scorer_in_bf16_matches_to_bf16_rounding(single_thread):
    model = _random_lm("qwen2", torch.bfloat16)
    ids, mask, P = _batch()
    with torch.no_grad():
        lp_f, _ = _scores(model, ids, mask, P, True)
        lp_r, _ = _scores(model, ids, mask, P, False)
    assert (lp_f - lp_r)[mask[:, P:].bool()].abs().max() < 0.3  # log-probs of order -10: bf16's 3 digits


@pytest.mark.parametrize("kind", ["qwen2", "llama_bias_yarn"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_scorer_gives_the_same_parameter_gradients(kind, layout, single_thread):
    """The student's path: train mode, grad on; every parameter's gradient (embedding, norms, biases, the
    tied head) as through the Hugging Face forward."""
    model = _random_lm(kind).train()
    model.model.embed_tokens.padding_idx = 0  # as nn.Embedding(padding_idx=pad_token_id): no gradient to that row
    ids, mask, P = _batch(layout=layout)
    weights = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    grads = {}
    for fused in (True, False):
        model.zero_grad()
        lp, ent = _scores(model, ids, mask, P, fused)
        (lp * mask[:, P:] * weights).sum().backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert grads[True].keys() == grads[False].keys()
    for name, g_ref in grads[False].items():
        torch.testing.assert_close(grads[True][name], g_ref, atol=1e-5, rtol=1e-4, msg=name)
        assert g_ref.abs().sum() > 0, name  # every weight is reached: the comparison is not vacuous
    if kind == "qwen2":  # tied: the head gives row 0 gradient, the embedding must add none (llama: untied)
        assert grads[True]["model.embed_tokens.weight"][0].abs().sum() > 0
    else:
        assert grads[True]["model.embed_tokens.weight"][0].abs().sum() == 0


@pytest.mark.parametrize("layout", ["left_padded", "shared_prefix"])
def test_long_sequences_take_the_sdpa_branch_and_agree(monkeypatch, layout, single_thread):
    """Above EAGER_MAX_SCORES the attention is ``scaled_dot_product_attention`` (no [B, heads, T, T] scores)."""
    model = _random_lm("llama")
    ids, mask, P = _batch(layout=layout)
    with torch.no_grad():
        eager = response_hidden(model, ids, mask, P)
        ref = response_hidden(model, ids, mask, P, fused=False)
        monkeypatch.setattr(fast_score, "EAGER_MAX_SCORES", 0)
        calls = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda *a, **k: calls.append(1) or sdpa(*a, **k))
        flash = response_hidden(model, ids, mask, P)
    # every layer of every row, and the shared row's in the layers before the last
    assert len(calls) == (3 if layout == "shared_prefix" else 2)
    torch.testing.assert_close(flash, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["left_padded", "shared_prefix"])
def test_the_mlps_compute_only_the_rows_they_must(monkeypatch, layout, single_thread):
    """The savings are real: the last layer's MLP sees the response rows only, the others every position but
    the last (which nothing read attends to); with a shared prefix its columns go through once (one row), and
    every row's own columns after it."""
    model = _random_lm("qwen2")
    ids, mask, P = _batch(layout=layout)
    c = 4 if layout == "shared_prefix" else 0
    rows_seen = []
    linear = torch.nn.functional.linear
    I = model.config.intermediate_size

    def spy(x, w, b=None):
        if w.shape[0] == 2 * I:  # the packed gate/up projection
            rows_seen.append(tuple(x.shape[:2]))
        return linear(x, w, b)

    monkeypatch.setattr(fast_score.F, "linear", spy)
    with torch.no_grad():
        response_hidden(model, ids, mask, P)
    B, T = ids.shape
    per_layer = ([(1, c)] if c else []) + [(B, T - 1 - c)]
    assert rows_seen == per_layer * (model.config.num_hidden_layers - 1) + [(B, T - P)]


def test_fused_scorer_stands_aside_where_it_would_not_be_the_models_forward():
    model = _random_lm("qwen2")
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
    # the fallback is the Hugging Face forward, and still right
    ids, mask, P = _batch()
    model.config.attention_dropout = 0.1
    with torch.no_grad():
        torch.testing.assert_close(response_hidden(model.eval(), ids, mask, P),
                                   response_hidden(model, ids, mask, P, fused=False))


def test_a_frozen_models_packing_is_cached_until_a_weight_changes(single_thread):
    model = _random_lm("qwen2").requires_grad_(False)
    ids, mask, P = _batch()
    scorer = FusedScorer.for_model(model)
    with torch.no_grad():
        before = response_hidden(model, ids, mask, P)
        packed = scorer._packed
        response_hidden(model, ids, mask, P)
        assert scorer._packed is packed and FusedScorer.for_model(model) is scorer
        model.model.layers[0].mlp.up_proj.weight.mul_(2)  # an in-place write bumps the version
        after = response_hidden(model, ids, mask, P)
        assert scorer._packed is not packed
        torch.testing.assert_close(after, response_hidden(model, ids, mask, P, fused=False))
    assert not torch.allclose(before, after)


def test_a_training_steps_loss_and_gradients_agree_with_fused_scoring_on_and_off(make_cfg, single_thread):
    import hydra

    from test_decode import encode

    cfg = make_cfg("rollout.max_new_tokens=10", "rollout.num_samples=2")
    module = hydra.utils.instantiate(cfg.module)
    module.configure_model()
    assert FusedScorer.for_model(module.student) is not None and FusedScorer.for_model(module.teacher) is not None
    batch = {**encode(module.tokenizer, ["12+34=", "5+678="]), "references": ["46", "683"]}
    ro = module.generate(batch)
    out = {}
    for fused in (True, False):
        module.fused_scoring = fused
        module.objective.prepare(ro, module, module.selection)
        teacher_logp = module.teacher_logp(ro)
        module.student.zero_grad()
        loss, _ = module.objective.loss(ro, module)
        loss.backward()
        out[fused] = loss.detach(), teacher_logp, [p.grad.clone() for p in module.student.parameters()]
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=1e-5)
    for g_fused, g_ref in zip(out[True][2], out[False][2]):
        torch.testing.assert_close(g_fused, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["qwen2", "llama_bias_yarn", "qwen2_sdpa"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_writes_the_models_cache_and_last_hidden_state(kind, layout, monkeypatch, single_thread):
    """The decode loop's fused prefill: every layer's keys and values (where the prompt is not padding) and the
    last column's hidden state, against the Hugging Face forward's cache (``qwen2_sdpa``: through the
    ``scaled_dot_product_attention`` branch that long prompts take)."""
    from src.modules.decode import _forward_keywords, kv_cache

    if kind.endswith("_sdpa"):
        kind = kind.removesuffix("_sdpa")
        monkeypatch.setattr(fast_score, "EAGER_MAX_SCORES", 0)
    model = _random_lm(kind)
    ids, mask, P = _batch(layout=layout)
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
def test_the_decode_loop_prefills_through_the_fused_scorer(monkeypatch, kind, layout, single_thread):
    from src.modules.decode import sample

    model = _random_lm(kind)
    ids, mask, P = _batch(layout=layout)
    calls = []
    real = FusedScorer.prefill
    monkeypatch.setattr(FusedScorer, "prefill", lambda self, *a: calls.append(1) or real(self, *a))
    torch.manual_seed(0)
    seq, logp, ent = sample(model, ids[:, :P], mask[:, :P], [0], 0, 5)
    assert calls == [1]
    torch.manual_seed(0)
    seq_ref, logp_ref, ent_ref = sample(model, ids[:, :P], mask[:, :P], [0], 0, 5, fused=False)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logp, logp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=1e-5)


def test_a_prefill_leaves_no_packing_behind_on_a_frozen_model(single_thread):
    from src.modules.decode import kv_cache

    model = _random_lm("qwen2").requires_grad_(False)
    ids, mask, P = _batch(layout="left_padded")
    scorer = FusedScorer.for_model(model)
    with torch.no_grad():
        scorer.prefill(ids[:, :P], mask[:, :P], kv_cache(model, P + 2))
        assert scorer._packed is None  # a teacher that only generates keeps no second copy of its weights
        scorer(ids, mask, P)
        kept = scorer._packed
        scorer.prefill(ids[:, :P], mask[:, :P], kv_cache(model, P + 2))
    assert kept is not None and scorer._packed is kept  # the scorer's cached packing is reused, not replaced


def test_under_cpu_autocast_the_residual_stream_stays_in_fp32(single_thread):
    """bf16 autocast casts each matmul's inputs; the Hugging Face forward keeps the residual sum in fp32, and so
    must the fused one (an addmm with the residual inside would round the stream itself to bf16)."""
    model = _random_lm("qwen2")
    ids, mask, P = _batch(layout="left_padded")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = response_hidden(model, ids, mask, P, fused=True)
        ref = response_hidden(model, ids, mask, P, fused=False)
    with torch.no_grad():
        exact = response_hidden(model, ids, mask, P, fused=False)
    assert fused.dtype == ref.dtype
    # within autocast's own error of the fp32 forward, as the Hugging Face forward under autocast is
    assert (fused.float() - exact).abs().max() <= 1.5 * (ref.float() - exact).abs().max()


@contextlib.contextmanager
def _gate_up_rows(model):
    """Records the rows [b, t] each packed gate/up projection of ``model`` sees."""
    rows, linear, I = [], torch.nn.functional.linear, model.config.intermediate_size

    def spy(x, w, b=None):
        if w.shape[0] == 2 * I:
            rows.append(tuple(x.shape[:2]))
        return linear(x, w, b)

    fast_score.F.linear = spy
    try:
        yield rows
    finally:
        fast_score.F.linear = linear


def _prefill_state(scorer, ids, mask, P):
    """As the decode loop takes it: without gradient (``prefill_state`` turns it on for itself)."""
    with torch.no_grad():
        return scorer.prefill_state(ids[:, :P], mask[:, :P], None)


@pytest.mark.parametrize("kind,layout,sdpa", [("qwen2", layout, False) for layout in LAYOUTS]
                         + [("llama_bias_yarn", "left_padded", False), ("qwen2", "left_padded", True)])
def test_scoring_continues_from_a_prefill_state_and_gets_the_same_gradients(monkeypatch, kind, layout, sdpa,
                                                                            single_thread):
    """The response columns alone, attending to the prefill's keys and values, give the full forward's hidden
    states and every parameter's gradient (through both graphs), the first response token's included."""
    model = _random_lm(kind)
    ids, mask, P = _batch(layout=layout)
    B, T = ids.shape
    scorer = FusedScorer.for_model(model)
    if sdpa:
        monkeypatch.setattr(fast_score, "EAGER_MAX_SCORES", 0)
    g = torch.randn(B, T - P, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    g[:, 1:] *= 0.01  # the first response token's hidden state (the prefill's own) dominates the loss
    grads = {}
    for continued in (True, False):
        model.zero_grad()
        state = _prefill_state(scorer, ids, mask, P) if continued else None
        with _gate_up_rows(model) as rows:
            h = response_hidden(model, ids, mask, P, prompt_state=state)
        if continued:  # every layer ran the response columns only (the last one is never run)
            assert rows == [(B, T - 1 - P)] * model.config.num_hidden_layers
        (h * g).sum().backward()
        grads[continued] = h.detach(), [p.grad for p in model.parameters() if p is not model.lm_head.weight]
    torch.testing.assert_close(grads[True][0], grads[False][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_prefill_state_that_no_longer_applies_is_ignored(single_thread):
    model = _random_lm("qwen2")
    ids, mask, P = _batch(layout="left_padded")
    B, T = ids.shape
    scorer = FusedScorer.for_model(model)
    with torch.no_grad():
        ref = response_hidden(model, ids, mask, P, fused=False)

    def run(state, ids=ids, mask=mask):
        with _gate_up_rows(model) as rows:
            h = response_hidden(model, ids, mask, P, prompt_state=state)
        return h, rows[0][1] == T - 1 - P  # whether it continued

    state = _prefill_state(scorer, ids, mask, P)
    h, continued = run(state)
    assert continued
    torch.testing.assert_close(h, ref, atol=1e-5, rtol=1e-5)
    other = ids.clone()
    other[0, P - 1] = (other[0, P - 1] + 1) % 50
    assert not run(state, ids=other)[1]  # other prompts
    no_grad_state = dataclasses.replace(state, kv=[(k.detach(), v.detach()) for k, v in state.kv],
                                        h_last=state.h_last.detach())
    assert not run(no_grad_state)[1]  # without its graph the prompt's share of the gradient would be lost
    with torch.no_grad():
        assert run(no_grad_state)[1]  # ... unless none is asked for
        model.model.layers[0].mlp.down_proj.weight.mul_(1.0)  # an in-place change (an optimiser step)
    assert not run(state)[1]
    # a fused optimiser step writes the weights without moving their version counters
    state = _prefill_state(scorer, ids, mask, P)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    versions = [p._version for p in model.parameters()]
    torch.optim.AdamW(model.parameters(), lr=0.0, fused=True).step()
    model.zero_grad(set_to_none=True)
    assert [p._version for p in model.parameters()] == versions
    assert not run(state)[1]
    # a one-token response is the prefill's last column alone, gradient included
    grads = []
    for state in (_prefill_state(scorer, ids, mask, P), None):
        model.zero_grad()
        h1 = response_hidden(model, ids[:, : P + 1], mask[:, : P + 1], P, prompt_state=state)
        torch.testing.assert_close(h1, ref[:, :1], atol=1e-5, rtol=1e-5)
        h1.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert grads[0][0].abs().sum() > 0


def test_rotary_frequencies_that_depend_on_the_length_are_never_continued(single_thread):
    """Dynamic NTK rope rescales by the call's longest position: a prefill and its continuation would rotate
    with different frequencies, and so would a call without the last column; the state is ignored and the
    whole sequence runs, as in the model's own forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
                                         rope_parameters=rope)).eval()
    ids, mask, P = _batch(layout="unpadded")  # 7 prompt + 6 response tokens: past the 8 positions
    scorer = FusedScorer.for_model(model)
    assert scorer is not None and not scorer.static_rope()
    state = _prefill_state(scorer, ids, mask, P)
    with torch.no_grad():
        h = response_hidden(model, ids, mask, P, prompt_state=state)
        ref = response_hidden(model, ids, mask, P, fused=False)
    torch.testing.assert_close(h, ref, atol=1e-5, rtol=1e-5)


def test_a_training_rollout_keeps_its_prefill_for_the_first_update_only(make_cfg, single_thread):
    """The student's rollout hands its prefill graph to the loss once (same loss and gradients as scoring from
    scratch); evaluation rollouts, split minibatches and the unfused path keep none."""
    import hydra

    from test_decode import encode

    cfg = make_cfg("rollout.max_new_tokens=10", "rollout.num_samples=2")
    module = hydra.utils.instantiate(cfg.module)
    module.configure_model()
    module.student.train()
    batch = {**encode(module.tokenizer, ["12+34=", "5+678=", "9="]), "references": ["46", "683", "9"]}
    ro = module.objective.make_rollout(module, batch)
    assert ro.prompt_state is not None and ro.prompt_state.h_last.requires_grad
    assert ro.select_rows(torch.tensor([0, 1])).prompt_state is None
    module.objective.prepare(ro, module, AllTokens())  # every token in the loss, the first one's included
    assert ro.loss_mask_BT[:, 0].all()
    out = []
    for _ in range(2):  # first from the prefill's graph (handed out once), then from scratch
        continued = ro.prompt_state is not None
        module.student.zero_grad()
        with _gate_up_rows(module.student) as rows:
            loss, _ = module.objective.loss(ro, module)
        assert ro.prompt_state is None
        assert (rows[0][1] == ro.input_ids.shape[1] - 1 - ro.response_start) == continued
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in module.student.parameters()]))
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert module.generate(batch, greedy=True, keep_prompt_graph=True).prompt_state is None
    module.fused_scoring = False
    assert module.objective.make_rollout(module, batch).prompt_state is None
    module.fused_scoring = True
    module.objective.minibatches = 2
    assert module.objective.make_rollout(module, batch).prompt_state is None


@pytest.mark.parametrize("kind", ["qwen2", "llama_bias_yarn"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_onednn_scoring_of_a_frozen_model_matches_the_fused_scorer(kind, layout, single_thread):
    """``fused="onednn"``: a frozen model's matmuls through ``FrozenLinear`` (its packing holds them, kept until a
    weight changes) give the fused scorer's log-probs and entropies to float rounding; a trainable model keeps
    its tensors (and its gradients)."""
    model = _random_lm(kind).requires_grad_(False)
    ids, mask, P = _batch(layout=layout)
    ref = _scores(model, ids, mask, P, fused=True)
    got = _scores(model, ids, mask, P, fused="onednn")
    packed = FusedScorer.for_model(model)._packed
    assert all(isinstance(layer[i], fast_score.FrozenLinear) for layer in packed for i in (1, 3, 6, 7))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # a changed weight: packed again
    torch.testing.assert_close(_scores(model, ids, mask, P, fused="onednn")[0], _scores(model, ids, mask, P, True)[0],
                               atol=1e-5, rtol=1e-5)
    trainable = _random_lm(kind)
    logp, _ = _scores(trainable, ids, mask, P, fused="onednn")
    logp.sum().backward()
    assert trainable.model.layers[0].mlp.down_proj.weight.grad is not None


def test_fused_scoring_must_be_true_false_or_onednn(make_cfg):
    import hydra

    cfg = make_cfg("module.fused_scoring=fast")
    with pytest.raises(Exception, match="module.fused_scoring must be true, false or onednn") as err:
        hydra.utils.instantiate(cfg.module)
    assert isinstance(err.value.__cause__ or err.value, ValueError)
