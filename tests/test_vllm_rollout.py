"""The vLLM rollout backend: how engine outputs become a Rollout, when weights are copied in, what it refuses.

Most tests stand a recording fake in for the ``vllm`` package (vLLM is an extra, absent from CI). The last ones
run a real engine where vLLM is installed (vllm-cpu on a CPU machine; docs/results/performance.md says how).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from src.modules.models.tiny import TinyQwen2
from src.modules.rollout.hf import HFGenerateRollout
from src.modules.rollout.vllm import VLLMRollout
from src.modules.scoring import hf_backbone, score_tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = TinyQwen2(cache_dir=str(tmp_path_factory.mktemp("m")), hidden_size=64, num_layers=2, num_heads=1,
                     num_kv_heads=1, seed=3)
    model, tok = spec.load_model().eval(), spec.load_tokenizer()
    msgs = [[{"role": "user", "content": "12+34="}], [{"role": "user", "content": "1+2345678="}]]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, padding=True, return_tensors="pt",
                                  return_dict=True)
    return model, tok, enc["input_ids"], enc["attention_mask"]


class FakeParams(SimpleNamespace):
    """vllm.SamplingParams: keeps its keyword arguments."""

    def __init__(self, **kw):
        super().__init__(**{"logprobs": None, **kw})


class FakeLLM:
    """vllm.LLM as the backend uses it. ``script(prompt_ids, i) -> (tokens, finish_reason, stop_reason)`` plays
    the sampler; every request, weight copy and cache reset is recorded."""

    built: list = []

    def __init__(self, script=None, **kwargs):
        folder = Path(kwargs["model"])
        self.kwargs, self.files = kwargs, sorted(p.name for p in folder.iterdir())
        self.script = script
        self.requests, self.rpc, self.resets = [], [], 0
        self.autocast = [torch.is_autocast_enabled("cpu")]  # at the build, then at each generate
        FakeLLM.built.append(self)

    def generate(self, prompts, params, use_tqdm=False):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            self.requests.append((p["prompt_token_ids"], sp))
            tokens, reason, stop = self.script(p["prompt_token_ids"], i)
            lps = None if sp.logprobs is None else [{t: SimpleNamespace(logprob=-0.5)} for t in tokens]
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tuple(tokens), finish_reason=reason,
                                                                 stop_reason=stop, logprobs=lps)]))
        return outs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        kwargs = dict(kwargs, weights_iterator=[(n, t.clone()) for n, t in kwargs["weights_iterator"]])
        self.rpc.append((method, args, kwargs))  # what the engine received, as it was then
        return [None]

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    """Puts the fake in place of the ``vllm`` package; returns a setter for the sampler's script."""
    box = {}
    FakeLLM.built = []
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(
        LLM=lambda **kw: FakeLLM(script=lambda ids, i: box["script"](ids, i), **kw), SamplingParams=FakeParams))
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return box


def _script(eos):
    """Row 0: EOS inside the output; row 1: a version that leaves the stop token out; row 2: truncated;
    the rest: EOS at once."""
    def play(ids, i):
        if i == 0:
            return [5, 6, eos], "stop", eos
        if i == 1:
            return [7, 8, 9, 10], "stop", eos
        if i == 2:
            return [11] * 6, "length", None
        if i == 3:
            return [eos], "stop", eos
        return [12, 13], "length", None  # cut short without EOS
    return play


def test_engine_outputs_become_a_rollout_with_the_policys_logps(tiny, fake_vllm):
    model, tok, ids, mask = tiny
    eos = tok.eos_token_id
    fake_vllm["script"] = _script(eos)
    vr = VLLMRollout(max_new_tokens=6, num_samples=2, temperature=0.7, top_p=1.0, top_k=0)
    torch.manual_seed(0)
    ro = vr(model, ids, mask, [eos], tok.pad_token_id)
    llm = FakeLLM.built[0]
    # built from the policy's own weights, with our sampling only and no tokenizer
    assert "config.json" in llm.files and any(f.endswith(".safetensors") for f in llm.files)
    assert llm.kwargs["skip_tokenizer_init"] and llm.kwargs["generation_config"] == "vllm"
    assert llm.kwargs["dtype"] == "float32" and llm.kwargs["max_model_len"] == model.config.max_position_embeddings
    # one request per sampled row, each prompt without its left padding, G copies in a row
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(2)]
    assert [r[0] for r in llm.requests] == [prompts[0], prompts[0], prompts[1], prompts[1]]
    params = [r[1] for r in llm.requests]
    assert all(p.temperature == 0.7 and p.top_p == 1.0 and p.top_k == -1 and p.max_tokens == 6 and p.logprobs == 0
               and p.detokenize is False for p in params)
    assert all(p.stop_token_ids == [eos] and p.ignore_eos for p in params)  # our EOS ids only
    assert len({p.seed for p in params}) == 4
    torch.manual_seed(0)
    vr(model, ids, mask, [eos], tok.pad_token_id)
    assert [r[1].seed for r in llm.requests[4:]] == [p.seed for p in params]  # a seeded step draws them again

    P = ids.shape[1]
    assert ro.response_start == P and ro.group_size == 2 and ro.input_ids.shape == (4, P + 6)
    resp = ro.response_ids_BT
    assert resp[0, :3].tolist() == [5, 6, eos] and resp[1, :5].tolist() == [7, 8, 9, 10, eos]
    assert ro.response_mask_BT.sum(-1).tolist() == [3, 5, 6, 1]
    assert ro.truncated_B.tolist() == [False, False, True, False]
    assert (resp[~ro.response_mask_BT] == tok.pad_token_id).all()
    assert torch.equal(ro.attention_mask[:, :P], mask.repeat_interleave(2, 0))
    assert torch.equal(ro.attention_mask[:, P:].bool(), ro.response_mask_BT)

    logp, ent = score_tokens(model, ro.input_ids, ro.attention_mask, P, 0.7)
    m = ro.response_mask_BT
    torch.testing.assert_close(ro.old_logp_BT[m], logp[m])
    torch.testing.assert_close(ro.entropy_BT[m], ent[m])
    assert (ro.old_logp_BT[~m] == 0).all() and (ro.entropy_BT[~m] == 0).all()
    given = m.clone()
    given[1, 4] = False  # the stop token the engine left out has no engine log-prob
    torch.testing.assert_close(ro.metrics["vllm_logp_gap"], (logp[given] + 0.5).abs().mean())

    greedy = vr(model, ids, mask, [eos], tok.pad_token_id, greedy=True, max_new_tokens=4)
    assert greedy.old_logp_BT is None and greedy.input_ids.shape[0] == 2
    assert all(r[1].temperature == 0.0 and r[1].max_tokens == 4 for r in llm.requests[-2:])


def test_weights_are_copied_in_after_each_optimiser_step(tiny, fake_vllm):
    model, tok, ids, mask = tiny
    eos = tok.eos_token_id
    fake_vllm["script"] = _script(eos)
    model = type(model)(model.config).train()  # a trainable copy: the module's fixture stays as it is
    vr = VLLMRollout(max_new_tokens=6)
    vr(model, ids, mask, [eos], tok.pad_token_id)
    llm = FakeLLM.built[0]
    vr.reload_in_place = True  # a GPU engine (the fake was built for a CPU model)
    ro = vr(model, ids, mask, [eos], tok.pad_token_id)
    assert llm.rpc == [] and float(ro.metrics["vllm_sync_s"]) == 0  # built from these weights: nothing to copy

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)  # the default optimiser: no version bump
    logp, _ = score_tokens(model, ro.input_ids, ro.attention_mask, ro.response_start, 1.0, with_entropy=False)
    (-(logp * ro.response_mask_BT).sum()).backward()
    opt.step()
    ro = vr(model, ids, mask, [eos], tok.pad_token_id)
    assert len(llm.rpc) == 1 and llm.resets == 1 and vr.syncs == 1 and float(ro.metrics["vllm_sync_s"]) > 0
    method, _, kwargs = llm.rpc[0]
    assert method == "reload_weights" and kwargs["is_checkpoint_format"]
    sent = dict(kwargs["weights_iterator"])
    assert sent.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(sent[n], p) for n, p in model.named_parameters())  # the values after the step
    assert not all(torch.equal(sent[n], before[n]) for n in sent)
    vr(model, ids, mask, [eos], tok.pad_token_id, greedy=True)
    assert len(llm.rpc) == 1  # unchanged since
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # any in-place change
    vr(model, ids, mask, [eos], tok.pad_token_id)
    assert len(llm.rpc) == 2 and llm.resets == 2


def test_what_the_backend_refuses(tiny, fake_vllm, monkeypatch, tmp_path):
    model, tok, ids, mask = tiny
    eos = tok.eos_token_id
    fake_vllm["script"] = _script(eos)
    with pytest.raises(ValueError, match="rollout.top_k"):
        VLLMRollout(top_k=-1)
    with pytest.raises(ValueError, match="rollout.gpu_memory_utilization"):
        VLLMRollout(gpu_memory_utilization=1.5)
    vr = VLLMRollout(max_new_tokens=4)
    with pytest.raises(ValueError, match="text prompts only"):
        vr(model, ids, mask, [eos], tok.pad_token_id, banned_ids=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"rollout.max_model_len"):
        VLLMRollout(max_new_tokens=4, max_model_len=ids.shape[1] + 3)(model, ids, mask, [eos], tok.pad_token_id)
    # the real prompt lengths count, not the padded width: one more padding column still fits
    wide, wide_mask = torch.nn.functional.pad(ids, (1, 0), value=tok.pad_token_id), torch.nn.functional.pad(mask, (1, 0))
    VLLMRollout(max_new_tokens=4, max_model_len=ids.shape[1] + 4)(model, wide, wide_mask, [eos], tok.pad_token_id)
    with pytest.raises(ValueError, match="row 1 is all padding"):
        vr(model, ids, torch.stack([mask[0], torch.zeros_like(mask[1])]), [eos], tok.pad_token_id)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(ValueError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        vr(model, ids, mask, [eos], tok.pad_token_id)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    trainable = type(model)(model.config)
    vr(trainable, ids, mask, [eos], tok.pad_token_id)
    other = TinyQwen2(cache_dir=str(tmp_path), hidden_size=32, num_layers=1).load_model()
    with pytest.raises(ValueError, match="mirrors one architecture"):
        vr(other, ids, mask, [eos], tok.pad_token_id)
    with torch.no_grad():
        trainable.lm_head.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="cannot reload weights in place"):  # vLLM's CPU build
        vr(trainable, ids, mask, [eos], tok.pad_token_id)
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'"):
        VLLMRollout()(model, ids, mask, [eos], tok.pad_token_id)


def test_masks_come_from_the_lengths_when_the_pad_id_is_an_eos_id(tiny, fake_vllm):
    """Qwen's pad id is one of its EOS ids; a row cut short without EOS stays truncated, its pads unmasked."""
    model, tok, ids, mask = tiny
    eos = tok.eos_token_id
    fake_vllm["script"] = lambda prompt, i: _script(eos)(prompt, {0: 4, 1: 1}.get(i, 3))
    ro = VLLMRollout(max_new_tokens=6, num_samples=2)(model, ids, mask, [eos], eos)
    assert ro.response_ids_BT[0].tolist() == [12, 13, eos, eos, eos]  # padded with the EOS id
    assert ro.response_mask_BT.sum(-1).tolist() == [2, 5, 1, 1]
    assert ro.truncated_B.tolist() == [True, False, False, False]
    assert (ro.old_logp_BT[0, 2:] == 0).all() and ro.attention_mask[0, -3:].sum() == 0


def test_under_autocast_the_engine_is_built_in_its_dtype_and_runs_outside_it(tiny, fake_vllm):
    model, tok, ids, mask = tiny
    eos = tok.eos_token_id
    fake_vllm["script"] = _script(eos)
    vr = VLLMRollout(max_new_tokens=6, engine_kwargs=OmegaConf.create({"compilation_config": {"mode": 0}}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ro = vr(model, ids, mask, [eos], tok.pad_token_id)
    llm = FakeLLM.built[0]
    assert llm.kwargs["dtype"] == "bfloat16" and llm.autocast == [False, False]
    assert type(llm.kwargs["compilation_config"]) is dict  # not Hydra's DictConfig
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the log-probs are the student's as the loss sees it
        logp, _ = score_tokens(model, ro.input_ids, ro.attention_mask, ro.response_start, 1.0)
    torch.testing.assert_close(ro.old_logp_BT[ro.response_mask_BT], logp[ro.response_mask_BT])
    assert VLLMRollout(dtype="float16").engine_dtype(model) == "float16"


def test_the_bound_student_samples_through_the_engine_and_others_through_the_loop(tiny, fake_vllm):
    """The module binds its student (with the trainer's compute dtype); the report callback's teacher
    evaluation and off-policy SFT sample from the teacher, which decodes with HFGenerateRollout's loop."""
    model, tok, ids, mask = tiny
    eos = tok.eos_token_id
    fake_vllm["script"] = _script(eos)
    vr = VLLMRollout(max_new_tokens=6, num_samples=2)
    teacher = type(model)(model.config).eval()
    vr.bind(tok, SimpleNamespace(student=model, chunk_size=1024, backbone=hf_backbone), torch.bfloat16)
    torch.manual_seed(0)
    ro = vr(teacher, ids, mask, [eos], tok.pad_token_id)
    assert FakeLLM.built == [] and "vllm_sync_s" not in ro.metrics
    torch.manual_seed(0)
    ref = HFGenerateRollout(max_new_tokens=6, num_samples=2)(teacher, ids, mask, [eos], tok.pad_token_id)
    assert torch.equal(ro.input_ids, ref.input_ids)
    vr(model, ids, mask, [eos], tok.pad_token_id)  # no autocast here: the bound dtype decides
    assert len(FakeLLM.built) == 1 and FakeLLM.built[0].kwargs["dtype"] == "bfloat16"


def test_a_real_engine_samples_what_the_policy_would(tiny, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    model, tok, ids, mask = tiny
    eos = tok.eos_token_id
    model = type(model)(model.config).eval()
    model.load_state_dict(tiny[0].state_dict())
    with torch.no_grad():  # toward EOS, so that rows end early (before the engine copies the weights)
        model.lm_head.weight[eos] += 0.1 * model.model.norm.weight.sign()
    vr = VLLMRollout(max_new_tokens=24, num_samples=4, enforce_eager=True)
    greedy = vr(model, ids, mask, [eos], tok.pad_token_id, greedy=True)
    ref = HFGenerateRollout(max_new_tokens=24)(model, ids, mask, [eos], tok.pad_token_id, greedy=True)
    assert torch.equal(greedy.input_ids, ref.input_ids) and torch.equal(greedy.truncated_B, ref.truncated_B)
    torch.manual_seed(0)
    ro = vr(model, ids, mask, [eos], tok.pad_token_id)
    assert ro.input_ids.shape[0] == 8 and float(ro.metrics["vllm_logp_gap"]) < 1e-4
    assert (~ro.truncated_B).any() and ro.truncated_B.any(), "some rows should end at EOS, some not"
    for b in (~ro.truncated_B).nonzero()[:, 0].tolist():
        n = int(ro.response_mask_BT[b].sum())
        assert ro.response_ids_BT[b, n - 1] == eos and (ro.response_ids_BT[b, n:] == tok.pad_token_id).all()
    torch.manual_seed(0)
    assert torch.equal(vr(model, ids, mask, [eos], tok.pad_token_id).input_ids, ro.input_ids)


def test_the_module_binds_its_student(make_cfg, fake_vllm):
    import hydra

    cfg = make_cfg("rollout=vllm", "trainer.precision=bf16-mixed")
    module = hydra.utils.instantiate(cfg.module)
    module.configure_model()  # no trainer yet: the weights' dtype
    assert module.rollout._bound is module.student and module.rollout._bound_dtype is None
    assert module.rollout._scorer is module.scorer  # its log-probs are scored as the loss scores
    module._trainer = SimpleNamespace(precision="bf16-mixed")
    assert module._compute_dtype() == torch.bfloat16


def test_evaluation_composes_with_vllm_rollouts(make_cfg):
    import hydra

    cfg = make_cfg("rollout=vllm", config="eval")
    ro = hydra.utils.instantiate(cfg.rollout)
    assert isinstance(ro, VLLMRollout)


@pytest.mark.parametrize("experiment, samples", [("reopold_tiny", 8), ("math_qwen3", 4)])
def test_the_config_group_takes_the_experiments_rollout_keys(make_cfg, experiment, samples):
    import hydra

    extra = ["algorithm=grpo"] if experiment == "reopold_tiny" else []  # grpo sets num_samples: 8
    cfg = make_cfg(f"experiment={experiment}", "rollout=vllm", *extra, fast=False)
    ro = hydra.utils.instantiate(cfg.rollout)
    assert isinstance(ro, VLLMRollout) and ro.num_samples == samples and ro.llm is None  # built on first use
    if experiment == "math_qwen3":
        assert ro.max_new_tokens == 8192 and ro.temperature == 0.6
