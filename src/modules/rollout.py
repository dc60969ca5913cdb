"""Rollouts: the policy samples ``G`` responses per prompt; the result carries everything the loss needs.

A rollout backend is any callable ``(model, prompt_ids_BP, prompt_mask_BP, eos_token_ids, pad_token_id,
num_samples, greedy, max_new_tokens, **model_kwargs) -> Rollout``. ``HFGenerateRollout`` decodes with the lean loop of
``src.modules.decode`` (the model's forward over a KV cache; temperature, top-p, top-k, max new tokens, stop at
EOS) or with Hugging Face ``generate`` (``backend: generate``, and always for vision-language inputs); both give the
same tokens and records. A vLLM backend plugs in the same way.

Rollout-time log-probs and entropies are recorded *during* decoding (under ``generate``, by a logits processor) from
the raw logits before any warper, scaled by the sampling temperature (the same distribution the scorer uses).
It keeps one ``[B, V]`` step in memory, never ``[B, T, V]``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from src.modules import decode
from src.modules.multimodal import has_images, model_inputs, repeat_vision_kwargs, split_vision_kwargs


@dataclasses.dataclass
class Rollout:
    """Prompts (left-padded, P columns) followed by responses (right-padded, T columns).

    ``*_BT`` tensors cover the response columns only; ``input_ids``/``attention_mask`` cover P + T.
    """

    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]; prompt padding and post-EOS padding are 0
    response_start: int  # P
    response_mask_BT: torch.Tensor  # [B, T] bool: tokens the policy sampled, up to and including EOS
    old_logp_BT: torch.Tensor | None  # [B, T] rollout-time log-probs at the sampling temperature
    entropy_BT: torch.Tensor | None  # [B, T] rollout-time full-vocabulary entropy
    truncated_B: torch.Tensor  # [B] bool: no EOS within the token budget
    group_size: int = 1  # G samples per prompt; rows [g*G:(g+1)*G] share a prompt
    seconds: float = 0.0  # wall time of generation
    references: list[str] = dataclasses.field(default_factory=list)
    response_texts: list[str] = dataclasses.field(default_factory=list)
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. pixel values
    tool_counts_BK: torch.Tensor | None = None  # tool rollouts: per episode, tool_rollout.TOOL_COUNTS
    # the fused prefill with its graph (fast_score.PromptState), when asked for: the student's scoring continues
    # from it once; select_rows drops it
    prompt_state: Any = None
    # filled by the objective
    teacher_logp_BT: torch.Tensor | None = None
    reward_BT: torch.Tensor | None = None
    advantage_BT: torch.Tensor | None = None
    loss_mask_BT: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def response_ids_BT(self) -> torch.Tensor:
        return self.input_ids[:, self.response_start :]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask_BT.sum())

    def minibatches(self, n: int, generator: torch.Generator | None = None):
        """Split rows into ``n`` shuffled minibatches (views of the same rollout)."""
        B = self.input_ids.shape[0]
        if n <= 1:
            yield self
            return
        order = torch.randperm(B, generator=generator).to(self.input_ids.device)
        for idx in order.chunk(n):
            yield self.select_rows(idx)

    def select_rows(self, idx: torch.Tensor) -> "Rollout":
        out = {}
        vision = split_vision_kwargs(self.model_kwargs, idx) if has_images(self.model_kwargs) else None
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.input_ids.shape[0]:
                v = v[idx]
            elif isinstance(v, list) and len(v) == self.input_ids.shape[0]:
                v = [v[i] for i in idx.tolist()]
            elif f.name == "model_kwargs" and vision is not None:
                v = vision
            elif f.name == "model_kwargs":
                v = {k: (t[idx] if isinstance(t, torch.Tensor) and t.shape[:1] == (self.input_ids.shape[0],) else t)
                     for k, t in v.items()}
            out[f.name] = v
        out["metrics"], out["prompt_state"] = {}, None
        return Rollout(**out)


class _Ban(LogitsProcessor):
    """Tokens the policy must never emit (a vision-language model's image placeholders: one sampled into a
    response would no longer match the image features when the sequence is scored)."""

    def __init__(self, banned_ids: torch.Tensor):
        self.banned_ids = banned_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from src.modules.scoring import BANNED_LOGIT

        return scores.index_fill(-1, self.banned_ids.to(scores.device), BANNED_LOGIT)


class _RecordSampledLogProbs(LogitsProcessor):
    """Records log p(sampled token) and entropy of softmax(logits / temperature) at each step.

    Step ``t``'s sampled token is only known at step ``t + 1`` (it is the last column of ``input_ids``),
    so one step of log-probs is held back and the final token is gathered after ``generate`` returns.
    """

    def __init__(self, temperature: float):
        self.inv_temp = 1.0 / temperature
        self.logps: list[torch.Tensor] = []
        self.entropies: list[torch.Tensor] = []
        self._pending: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pending is not None:
            self.logps.append(self._pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        logp_BV = torch.log_softmax(scores.float() * self.inv_temp, dim=-1)
        self.entropies.append(-(logp_BV.exp() * logp_BV).sum(-1))
        self._pending = logp_BV
        return scores

    def finish(self, last_tokens_B: torch.Tensor):
        if self._pending is not None:
            self.logps.append(self._pending.gather(-1, last_tokens_B[:, None]).squeeze(-1))
            self._pending = None
        return torch.stack(self.logps, dim=1), torch.stack(self.entropies, dim=1)


def response_mask_from_ids(response_ids_BT: torch.Tensor, eos_token_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of sampled tokens up to and including the first EOS, and whether each row was truncated."""
    ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    eos = torch.as_tensor(ids, device=response_ids_BT.device)
    is_eos_BT = torch.isin(response_ids_BT, eos)
    # number of EOS strictly before each position: 0 means the position is still part of the response
    eos_before_BT = is_eos_BT.long().cumsum(-1) - is_eos_BT.long()
    return eos_before_BT == 0, ~is_eos_BT.any(-1)


def check_sampling(temperature: float, top_p: float, top_k: int, num_samples: int) -> None:
    """A rollout backend's sampling settings, each named by its config key when out of range."""
    if temperature <= 0:
        raise ValueError(f"rollout.temperature must be > 0 (use greedy=True for argmax), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"rollout.top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"rollout.top_k must be >= 0 (0 disables it), got {top_k}")
    if num_samples < 1:
        raise ValueError(f"rollout.num_samples must be >= 1, got {num_samples}")


class HFGenerateRollout:
    """Sampling from a ``transformers`` causal LM, by the lean loop of ``src.modules.decode`` or by ``generate``.

    Args:
        max_new_tokens: token budget per response.
        temperature, top_p, top_k: sampling; ``top_k=0`` disables top-k. Log-probs use ``temperature``
            only (the untruncated distribution), the convention of vLLM and of the paper's reward.
        num_samples: G responses per prompt.
        val_max_new_tokens: budget for greedy validation decoding (defaults to ``max_new_tokens``).
        backend: ``loop`` (``src.modules.decode``; falls back to ``generate`` for inputs it does not support, such
            as images) or ``generate``.
        fused_decode: with ``backend=loop``, decode Qwen2 / Llama models through ``FusedDecodeStep``
            (``src.modules.fast_decode``; the same tokens with fewer ops); False keeps the model's own forward;
            ``compiled``: the fused step through ``torch.compile`` (a C++ compiler on the CPU; the first rollout
            compiles, about 10 s for the benchmark's student, and again the first new batch size or length;
            log-probs within float rounding).
        reuse_activations: where a training rollout keeps its prefill's graph (the fused CPU path, one minibatch
            per rollout: its first update), in fp32 without autocast, the fused step also records the
            response's activations, and the student's scoring takes them instead of running its forward again
            (``src.modules.replay``; the gradient at the decode's activations: equal to the scorer's to float
            rounding, not bit for bit).
    """

    BACKENDS = ("loop", "generate")

    def __init__(self, max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 num_samples: int = 1, val_max_new_tokens: int | None = None, backend: str = "loop",
                 fused_decode: bool | str = True, reuse_activations: bool = False):
        check_sampling(temperature, top_p, top_k, num_samples)
        if backend not in self.BACKENDS:
            raise ValueError(f"rollout.backend must be one of {self.BACKENDS}, got {backend!r}")
        if fused_decode not in (True, False, "compiled"):
            raise ValueError(f"rollout.fused_decode must be true, false or compiled, got {fused_decode!r}")
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.num_samples = num_samples
        self.val_max_new_tokens = val_max_new_tokens or max_new_tokens
        if not isinstance(reuse_activations, bool):
            raise ValueError(f"rollout.reuse_activations must be true or false, got {reuse_activations!r}")
        self.backend, self.fused_decode, self.reuse_activations = backend, fused_decode, reuse_activations

    @torch.no_grad()
    def __call__(self, model, prompt_ids_BP, prompt_mask_BP, eos_token_ids, pad_token_id,
                 num_samples: int | None = None, greedy: bool = False, max_new_tokens: int | None = None,
                 banned_ids: torch.Tensor | None = None, keep_prompt_graph: bool = False, **model_kwargs) -> Rollout:
        """``max_new_tokens`` overrides the budget (default: ``val_max_new_tokens`` greedy, else ``max_new_tokens``).
        ``banned_ids`` are never sampled (image placeholders); the recorded log-probs renormalise without them,
        as the scorer does. ``keep_prompt_graph``: the fused prefill keeps its graph in ``Rollout.prompt_state``
        (``decode.sample``), for a student's scoring with the same weights."""
        G = 1 if greedy else (num_samples or self.num_samples)
        budget = max_new_tokens or (self.val_max_new_tokens if greedy else self.max_new_tokens)
        if G > 1:
            prompt_ids_BP = prompt_ids_BP.repeat_interleave(G, dim=0)
            prompt_mask_BP = prompt_mask_BP.repeat_interleave(G, dim=0)
            if has_images(model_kwargs):  # pixel rows belong to images, not to sequences
                model_kwargs = repeat_vision_kwargs(model_kwargs, G)
            else:
                model_kwargs = {k: v.repeat_interleave(G, dim=0) if isinstance(v, torch.Tensor) else v
                                for k, v in model_kwargs.items()}
        eos_token_ids = list(eos_token_ids)
        start, prompt_state = time.perf_counter(), None
        if self.backend == "loop" and decode.loop_supports(model, model_inputs(model_kwargs)):
            seq, old_logp_BT, entropy_BT, *kept = decode.sample(
                model, prompt_ids_BP, prompt_mask_BP, eos_token_ids, pad_token_id, budget, greedy=greedy,
                temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, banned_ids=banned_ids,
                fused=self.fused_decode, keep_prompt_graph=keep_prompt_graph,
                record_activations=keep_prompt_graph and self.reuse_activations)
            prompt_state = kept[0] if kept else None
        else:
            seq, old_logp_BT, entropy_BT = self._generate(model, prompt_ids_BP, prompt_mask_BP, eos_token_ids,
                                                          pad_token_id, budget, greedy, banned_ids, model_kwargs)
        seconds = time.perf_counter() - start
        P = prompt_ids_BP.shape[1]
        response_ids_BT = seq[:, P:]
        response_mask_BT, truncated_B = response_mask_from_ids(response_ids_BT, eos_token_ids)
        if old_logp_BT is not None:
            zero = torch.zeros((), device=seq.device)
            old_logp_BT = torch.where(response_mask_BT, old_logp_BT, zero)
            entropy_BT = torch.where(response_mask_BT, entropy_BT, zero)
        attention_mask = torch.cat([prompt_mask_BP, response_mask_BT.to(prompt_mask_BP.dtype)], dim=1)
        return Rollout(
            input_ids=seq, attention_mask=attention_mask, response_start=P,
            response_mask_BT=response_mask_BT, old_logp_BT=old_logp_BT, entropy_BT=entropy_BT,
            truncated_B=truncated_B, group_size=G, seconds=seconds, model_kwargs=model_kwargs,
            prompt_state=prompt_state,
        )

    def _generate(self, model, prompt_ids_BP, prompt_mask_BP, eos_token_ids, pad_token_id, budget, greedy,
                  banned_ids, model_kwargs):
        """``generate`` with our processors: (sequences, raw rollout-time log-probs, entropies)."""
        # A fresh config, and the model's own swapped out while generating: `generate` fills every unset
        # field from `model.generation_config`, and checkpoints ship sampling defaults (Qwen: top_k=20,
        # repetition_penalty=1.05) that would silently change the sampling distribution.
        # Sampling knobs are applied by our own processors below; the config's are neutral.
        sampling = {} if greedy else dict(temperature=1.0, top_p=1.0, top_k=0)
        gen_cfg = GenerationConfig(
            max_new_tokens=budget,
            do_sample=not greedy, num_beams=1, repetition_penalty=1.0, **sampling,
            eos_token_id=eos_token_ids, pad_token_id=pad_token_id, bos_token_id=None,
            return_dict_in_generate=False, use_cache=True,
        )
        processors = LogitsProcessorList()
        if banned_ids is not None and len(banned_ids):
            processors.append(_Ban(banned_ids))
        recorder = None
        if not greedy:
            recorder = _RecordSampledLogProbs(self.temperature)
            processors.append(recorder)
            processors.extend(decode.warpers(self.temperature, self.top_k, self.top_p))
        own_cfg, model.generation_config = model.generation_config, GenerationConfig()
        try:
            seq = model.generate(
                input_ids=prompt_ids_BP, attention_mask=prompt_mask_BP, generation_config=gen_cfg,
                logits_processor=processors, **model_inputs(model_kwargs),
            )
        finally:
            model.generation_config = own_cfg
        if recorder is None:
            return seq, None, None
        return seq, *recorder.finish(seq[:, -1])


def reference_rollout(batch: dict, eos_token_id: int, pad_token_id: int) -> Rollout:
    """A Rollout whose responses are the batch's reference solutions (``target_ids``) followed by EOS.

    With ``target_mask`` (multi-turn tool-use demonstrations) only the masked tokens and the final EOS are the
    model's (``response_mask_BT``, the SFT loss); the rest (tool responses, template glue) is attended only.
    """
    prompt_ids_BP, prompt_mask_BP = batch["input_ids"], batch["attention_mask"]
    device = prompt_ids_BP.device
    targets = [list(t) + [eos_token_id] for t in batch["target_ids"]]
    masks = [list(m) + [True] for m in batch.get("target_mask", [[True] * (len(t) - 1) for t in targets])]
    T = max(len(t) for t in targets)
    response_BT = torch.full((len(targets), T), pad_token_id, dtype=prompt_ids_BP.dtype)
    written_BT = torch.zeros((len(targets), T), dtype=torch.bool)
    for i, (t, m) in enumerate(zip(targets, masks)):
        if len(m) != len(t):
            raise ValueError(f"row {i}: target_mask has {len(m) - 1} entries for {len(t) - 1} target tokens")
        response_BT[i, : len(t)] = torch.tensor(t, dtype=prompt_ids_BP.dtype)
        written_BT[i, : len(t)] = torch.tensor(m, dtype=torch.bool)
    response_BT, response_mask_BT = response_BT.to(device), written_BT.to(device)
    real_BT = torch.arange(T, device=device)[None, :] < torch.tensor([len(t) for t in targets], device=device)[:, None]
    return Rollout(
        input_ids=torch.cat([prompt_ids_BP, response_BT], dim=1),
        attention_mask=torch.cat([prompt_mask_BP, real_BT.to(prompt_mask_BP.dtype)], dim=1),
        response_start=prompt_ids_BP.shape[1], response_mask_BT=response_mask_BT, old_logp_BT=None,
        entropy_BT=None, truncated_B=torch.zeros(len(targets), dtype=torch.bool, device=device),
        references=list(batch["references"]),
        model_kwargs=batch.get("model_kwargs", {}),  # the images a vision-language row is about
    )
