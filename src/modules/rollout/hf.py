"""Sampling from a Hugging Face causal LM: the lean decode loop, or ``generate``.

``HFGenerateRollout`` decodes with the lean loop of ``src.modules.rollout.decode`` (the model's forward over a KV
cache; temperature, top-p, top-k, max new tokens, stop at EOS) or with Hugging Face ``generate`` (``backend:
generate``, and always for vision-language inputs); both give the same tokens and records.

Rollout-time log-probs and entropies are recorded *during* decoding (under ``generate``, by a logits processor) from
the raw logits before any warper, scaled by the sampling temperature (the same distribution the scorer uses).
It keeps one ``[B, V]`` step in memory, never ``[B, T, V]``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from src.modules.memory_plan import rows_for_kv_budget
from src.modules.models.multimodal import kwargs_of_rows, model_inputs
from src.modules.rollout import decode
from src.modules.rollout.backend import RolloutBackend, response_mask_from_ids
from src.modules.rollout.batch import Rollout
from src.modules.scoring import BANNED_LOGIT


class _Ban(LogitsProcessor):
    """Tokens the policy must never emit (a vision-language model's image placeholders: one sampled into a
    response would no longer match the image features when the sequence is scored)."""

    def __init__(self, banned_ids: torch.Tensor):
        self.banned_ids = banned_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
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


class HFGenerateRollout(RolloutBackend):
    """Sampling from a ``transformers`` causal LM, by the lean loop of ``src.modules.rollout.decode`` or by
    ``generate``.

    Args:
        max_new_tokens, temperature, top_p, top_k, num_samples, val_max_new_tokens: ``RolloutBackend``'s.
        backend: ``loop`` (``decode.sample``; falls back to ``generate`` for inputs it does not support, such as
            images) or ``generate``.
        decoder: how the loop computes next-token logits over its KV cache: a ``decode.Decoder`` factory
            ``(model, cache, mask_BL) -> Decoder`` (the ``accel`` config group's; None: the model's own forward,
            ``decode.ModelForward``).
        kv_cache_gb: the most KV cache one call holds (GB): the rows are decoded in chunks of as many as fit, at
            their full token budget, in the dtype the student computes in (None: every row at once).
    """

    BACKENDS = ("loop", "generate")

    def __init__(self, max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 num_samples: int = 1, val_max_new_tokens: int | None = None, backend: str = "loop",
                 decoder: decode.DecoderFactory | None = None, kv_cache_gb: float | None = None):
        super().__init__(max_new_tokens, temperature, top_p, top_k, num_samples, val_max_new_tokens)
        if backend not in self.BACKENDS:
            raise ValueError(f"rollout.backend must be one of {self.BACKENDS}, got {backend!r}")
        if kv_cache_gb is not None and kv_cache_gb <= 0:
            raise ValueError(f"rollout.kv_cache_gb must be > 0 or null, got {kv_cache_gb}")
        self.use_loop = backend == "loop"
        self.decoder = decoder or decode.ModelForward
        self.kv_cache_gb, self.compute_dtype = kv_cache_gb, None

    def bind(self, tokenizer, scorer, compute_dtype: torch.dtype | None) -> None:
        self.compute_dtype = compute_dtype

    def rows_at_once(self, model, width: int) -> int:
        """How many rows of ``width`` tokens (prompt and budget) one decode holds in ``kv_cache_gb``."""
        if self.kv_cache_gb is None:
            return 1 << 62
        dtype = self.compute_dtype or next(model.parameters()).dtype
        return rows_for_kv_budget(model.config, self.kv_cache_gb, width, torch.finfo(dtype).bits // 8)

    def __call__(self, model, prompt_ids_BP, prompt_mask_BP, eos_token_ids, pad_token_id,
                 num_samples: int | None = None, greedy: bool = False, max_new_tokens: int | None = None,
                 banned_ids: torch.Tensor | None = None, **model_kwargs) -> Rollout:
        budget = self.budget(greedy, max_new_tokens)
        G, prompt_ids_BP, prompt_mask_BP, model_kwargs = self.group(greedy, num_samples, prompt_ids_BP,
                                                                    prompt_mask_BP, model_kwargs)
        eos_token_ids = list(eos_token_ids)
        start = time.perf_counter()
        B, P = prompt_ids_BP.shape
        rows = self.rows_at_once(model, P + budget)
        parts = []
        for idx in torch.arange(B).split(rows):
            kwargs = model_kwargs if len(idx) == B else kwargs_of_rows(model_kwargs, idx, B)
            parts.append(self._sample(model, prompt_ids_BP[idx], prompt_mask_BP[idx], eos_token_ids, pad_token_id,
                                      budget, greedy, banned_ids, kwargs))
        seq, old_logp_BT, entropy_BT = parts[0] if len(parts) == 1 else _stacked(parts, pad_token_id)
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
        )

    def _sample(self, model, prompt_ids_BP, prompt_mask_BP, eos_token_ids, pad_token_id, budget, greedy, banned_ids,
                model_kwargs):
        """(sequences, rollout-time log-probs, entropies) of these rows: the lean loop where it applies, else
        ``generate``."""
        if self.use_loop and decode.loop_supports(model, model_inputs(model_kwargs)):
            return decode.sample(model, prompt_ids_BP, prompt_mask_BP, eos_token_ids, pad_token_id, budget,
                                 greedy=greedy, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                 banned_ids=banned_ids, decoder=self.decoder)
        return self._generate(model, prompt_ids_BP, prompt_mask_BP, eos_token_ids, pad_token_id, budget, greedy,
                              banned_ids, model_kwargs)

    @torch.no_grad()
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


def _stacked(parts: list, pad_token_id: int):
    """Chunks of rows decoded apart, as one call's output: sequences right-padded with ``pad_token_id`` (and the
    records with 0) to the widest chunk."""
    width = max(seq.shape[1] for seq, _, _ in parts)
    seqs = [F.pad(seq, (0, width - seq.shape[1]), value=pad_token_id) for seq, _, _ in parts]
    if parts[0][1] is None:
        return torch.cat(seqs), None, None
    T = width - (parts[0][0].shape[1] - parts[0][1].shape[1])
    logps = [F.pad(lp, (0, T - lp.shape[1])) for _, lp, _ in parts]
    ents = [F.pad(en, (0, T - en.shape[1])) for _, _, en in parts]
    return torch.cat(seqs), torch.cat(logps), torch.cat(ents)
