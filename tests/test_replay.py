"""The student's scoring from the decode's own activations (``src.modules.replay``) against scoring from the
prefill state alone: hidden states, log-probs and every parameter's gradient, and where it must stand aside."""

import pytest
import torch
from test_decode import _random_lm

from src.modules import replay
from src.modules.decode import sample
from src.modules.fast_score import FusedScorer
from src.modules.rollout import response_mask_from_ids
from src.modules.scoring import response_hidden

EOS = [3, 7, 11, 19]  # several ids, so that some rows end early


def _prompts(layout: str, V: int = 50, B: int = 5, P: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, V, (B, P), generator=g)
    mask = torch.ones_like(ids)
    if layout == "left_padded":
        mask[0, :3] = 0
        mask[2, :1] = 0
        ids[mask == 0] = 0
    elif layout == "shared_prefix":
        ids[:, :3] = ids[0, :3]
    return ids, mask


def _rollout(model, ids, mask, record: bool, compiled: bool = False, max_new: int = 7, seed: int = 5):
    torch.manual_seed(seed)
    seq, logp, _, state = sample(model, ids, mask, EOS, 0, max_new, keep_prompt_graph=True, record_activations=record,
                                 fused="compiled" if compiled else True)
    resp_mask, _ = response_mask_from_ids(seq[:, ids.shape[1]:], EOS)
    return seq, torch.cat([mask, resp_mask.to(mask.dtype)], dim=1), state


def _spy(monkeypatch):
    """Counts the scorer calls the replay served."""
    served = []
    real = replay.replay_hidden

    def spy(*args):
        out = real(*args)
        served.append(out is not None)
        return out

    monkeypatch.setattr("src.modules.fast_score.replay_hidden", spy)
    return served


@pytest.mark.parametrize("kind,layout,compiled", [
    ("qwen2", "left_padded", False), ("qwen2", "unpadded", False), ("qwen2", "shared_prefix", False),
    ("llama", "left_padded", False), ("llama_bias_yarn", "left_padded", False), ("qwen2", "left_padded", True)])
def test_replayed_scoring_gives_the_scorers_values_and_gradients(monkeypatch, kind, layout, compiled,
                                                               single_thread):
    """Hidden states, log-probs and every parameter's gradient from the recorded activations agree with the
    scorer's own forward from the same prefill state, for rows that ended early and rows that did not."""
    model = _random_lm(kind)
    ids, mask = _prompts(layout)
    P = ids.shape[1]
    served = _spy(monkeypatch)
    out = {}
    for record in (True, False):
        seq, att, state = _rollout(model, ids, mask, record, compiled)
        assert (state.replay is not None) == record
        model.zero_grad()
        h = response_hidden(model, seq, att, P, prompt_state=state)
        g = torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
        resp = att[:, P:].bool()
        ((h * g).sum(-1) * resp).sum().backward()
        out[record] = seq, resp, h.detach(), {n: p.grad for n, p in model.named_parameters()}
    assert served == [True]
    seq, resp = out[True][0], out[True][1]
    torch.testing.assert_close(seq, out[False][0])  # the same seed samples the same tokens
    assert resp.all(-1).any() and not resp.all(-1).all(), "want rows that ended early and rows that did not"
    torch.testing.assert_close(out[True][2][resp], out[False][2][resp], atol=1e-5, rtol=1e-5)
    for name, grad in out[True][3].items():  # an untied head gets none: the loss reads the hidden states
        if name == "lm_head.weight" and kind != "qwen2":
            assert grad is None and out[False][3][name] is None
            continue
        torch.testing.assert_close(grad, out[False][3][name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_a_record_that_does_not_cover_the_call_is_ignored(monkeypatch, single_thread):
    """Other tokens in the response, or a longer sequence than was decoded: the scorer runs its forward."""
    model = _random_lm("qwen2")
    ids, mask = _prompts("left_padded")
    P = ids.shape[1]
    served = _spy(monkeypatch)
    seq, att, state = _rollout(model, ids, mask, record=True)
    other = seq.clone()
    other[1, P + 1] = (other[1, P + 1] + 1) % 50
    ref = response_hidden(model, other, att, P)
    h = response_hidden(model, other, att, P, prompt_state=state)
    torch.testing.assert_close(h, ref, atol=1e-5, rtol=1e-5)
    longer = torch.cat([seq, seq[:, -2:]], dim=1)
    att_l = torch.cat([att, att[:, -2:]], dim=1)
    _, _, state = _rollout(model, ids, mask, record=True)
    torch.testing.assert_close(response_hidden(model, longer, att_l, P, prompt_state=state),
                               response_hidden(model, longer, att_l, P), atol=1e-5, rtol=1e-5)
    assert served == [False, False]


def test_records_are_kept_only_when_asked_and_in_fp32(single_thread):
    ids, mask = _prompts("unpadded")
    model = _random_lm("qwen2")
    torch.manual_seed(0)
    *_, state = sample(model, ids, mask, EOS, 0, 5, keep_prompt_graph=True)
    assert state.replay is None
    bf16 = _random_lm("qwen2", torch.bfloat16)
    *_, state = sample(bf16, ids, mask, EOS, 0, 5, keep_prompt_graph=True, record_activations=True)
    assert state.replay is None
    assert FusedScorer.for_model(model) is not None


def test_under_cpu_autocast_nothing_is_recorded_and_onednn_stands_aside(single_thread):
    """A bf16-mixed run: the records are fp32, so the loop keeps none (and does not fail); the oneDNN teacher's
    fp32 matmuls would meet bf16 activations, so the scorer uses its dense packing."""
    from src.modules.scoring import score_response

    model = _random_lm("qwen2")
    ids, mask = _prompts("left_padded")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seq, att, state = _rollout(model, ids, mask, record=True)
    assert state.replay is None
    teacher = _random_lm("qwen2").requires_grad_(False)
    P = ids.shape[1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = score_response(teacher, seq, att, P, 1.0, 1024, with_entropy=False, fused="onednn")[0]
        ref = score_response(teacher, seq, att, P, 1.0, 1024, with_entropy=False, fused=True)[0]
    torch.testing.assert_close(got, ref)


def test_a_training_step_with_reused_activations_matches_one_without(make_cfg, single_thread):
    """Through the module: the same rollout, loss and student gradients with ``rollout.reuse_activations`` on
    and off (the switch only changes where the student's scoring gets its forward from)."""
    import hydra

    from test_decode import encode

    out = {}
    for reuse in (True, False):
        cfg = make_cfg("rollout.max_new_tokens=10", "rollout.num_samples=2", f"rollout.reuse_activations={reuse}")
        module = hydra.utils.instantiate(cfg.module)
        module.configure_model()
        module.student.train()
        batch = {**encode(module.tokenizer, ["12+34=", "5+678=", "9="]), "references": ["46", "683", "9"]}
        ro = module.objective.make_rollout(module, batch)
        assert (ro.prompt_state.replay is not None) == reuse
        module.objective.prepare(ro, module, module.selection)
        module.student.zero_grad()
        loss, _ = module.objective.loss(ro, module)
        loss.backward()
        out[reuse] = ro.input_ids, loss.detach(), [p.grad.clone() for p in module.student.parameters()]
    torch.testing.assert_close(out[True][0], out[False][0])
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-6, rtol=1e-5)
    for a, b in zip(out[True][2], out[False][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_reuse_activations_must_be_a_bool():
    from src.modules.rollout import HFGenerateRollout

    with pytest.raises(ValueError, match="rollout.reuse_activations"):
        HFGenerateRollout(reuse_activations="yes")
