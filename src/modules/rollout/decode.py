"""A lean sampling loop: next-token logits over a KV cache, without ``generate``'s per-token machinery.

Same contract as ``generate`` with our processors (``HFGenerateRollout``): prefill the left-padded prompt once,
then one token per step from the last position's logits only::

    z_t     = logits(last position)               banned ids set to BANNED_LOGIT (renormalised away)
    logp_t  = log_softmax(z_t / temperature)       recorded: log p(y_t) and H_t = -sum exp(logp_t) logp_t
    y_t     ~ softmax(top_p(top_k(z_t / temperature)))   (argmax of z_t when greedy)

so the recorded log-probs are those of the untruncated temperature distribution, as the scorer computes them.
Positions skip left padding (``cumsum(mask) - 1``, as ``generate`` assigns them). A row that has emitted an
EOS gets ``pad_token_id`` from then on; "all rows finished" is read on the host only every ``sync_every``
steps (a device sync on GPU), and the all-padding columns decoded past the end are cut, so the output has
``generate``'s width: the longest response, or the budget.

How the logits are computed is the loop's seam: a ``Decoder`` fills the cache from the prompt (``prefill``) and
takes one token per row at a time (``step``). The default, ``ModelForward``, is the model's own forward
(``logits_to_keep=1``); the ``accel`` config group can plug in another (``rollout.decoder``). The factory is
called in the caller's grad mode and the loop then runs without gradient, so a decoder may keep what it computed
for a backward the caller runs later. The cache is a ``DynamicCache`` whose full-attention layers write into one
preallocated buffer (``InPlaceLayer``).

Text-only causal LMs only: models with 3-D rotary positions or image inputs (vision-language) keep
``generate``.
"""

from __future__ import annotations

import inspect
from typing import Callable, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from src.modules.models.multimodal import is_multimodal
from src.modules.scoring import BANNED_LOGIT, position_ids_from_mask


class InPlaceLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in one buffer sized for the whole decode: a step writes
    its column in place (``update`` for the model's forward, ``put`` for a decoder that writes one column), where
    ``DynamicLayer`` concatenates, copying the whole cache, every layer, every step. ``keys``/``values`` are views
    of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.device, (B, H, _, D) = key_states.device, key_states.shape
            # zeros, not garbage: a decoder may read unfilled columns masked (0 * NaN would be NaN)
            self._keys = key_states.new_zeros(B, H, self.capacity, D)
            Hv, Dv = value_states.shape[1], value_states.shape[-1]
            self._values = value_states.new_zeros(B, Hv, self.capacity, Dv)
            self.is_initialized = True
        end = self.length + key_states.shape[-2]
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def put(self, column: int, key_BHD: torch.Tensor, value_BHD: torch.Tensor) -> None:
        """One token's keys and values ``[B, heads, d]`` written at ``column``, the cache then filled up to it."""
        self._keys[:, :, column] = key_BHD
        self._values[:, :, column] = value_BHD
        self.length = column + 1
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]


def kv_cache(model, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` whose full-attention layers fill a preallocated buffer (sliding-window and other
    layer kinds keep their own)."""
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56: no per-layer cache
        return DynamicCache()
    cache.layers = [InPlaceLayer(capacity) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


def loop_supports(model, model_kwargs: dict) -> bool:
    """Whether ``sample`` can decode for this model and these inputs (else use ``generate``): a text-only
    decoder with a ``config`` (an object that only offers ``generate`` keeps it)."""
    config = getattr(model, "config", None)
    return (config is not None and not model_kwargs and not is_multimodal(model)
            and not getattr(config, "is_encoder_decoder", False))


def warpers(temperature: float, top_k: int, top_p: float) -> list:
    """``generate``'s own warpers, in its order, so a sample follows the same truncated distribution."""
    out = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


class Decoder(Protocol):
    """Next-token logits ``[B, V]`` over the decode loop's KV cache, for one rollout. Built by a ``DecoderFactory``
    ``(model, cache, mask_BL)`` at the start of the rollout; ``mask_BL`` is the attention mask over every cache
    column (prompt, then ``max_new_tokens`` columns of ones), None when no prompt is padded."""

    def prefill(self, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor) -> torch.Tensor:
        """Fills cache columns ``0 .. P-1`` from the prompts; the logits after each prompt's last token."""
        ...

    def step(self, ids_B: torch.Tensor, positions_B: torch.Tensor, n: int) -> torch.Tensor:
        """One token per row at cache column ``n - 1`` and position ``positions_B``; the logits after it."""
        ...


DecoderFactory = Callable[..., Decoder]


def _forward_keywords(model) -> tuple[str, bool]:
    """The cache argument's name (``cache`` from transformers 5, ``past_key_values`` before) and whether the
    forward takes ``logits_to_keep``."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


class ModelForward:
    """The default ``Decoder``: the model's own forward (any causal LM ``transformers`` runs with a cache), the
    logits of the last position only."""

    def __init__(self, model, cache, mask_BL: torch.Tensor | None):
        self.model, self.cache, self.mask_BL = model, cache, mask_BL
        self.cache_kw, has_keep = _forward_keywords(model)
        self.keep = {"logits_to_keep": 1} if has_keep else {}

    def _logits(self, ids_BT, positions_BT, n: int) -> torch.Tensor:
        mask = None if self.mask_BL is None else self.mask_BL[:, :n]
        out = self.model(input_ids=ids_BT, attention_mask=mask, position_ids=positions_BT, use_cache=True,
                         **{self.cache_kw: self.cache}, **self.keep)
        return out.logits[:, -1]

    def prefill(self, prompt_ids_BP, prompt_mask_BP):
        return self._logits(prompt_ids_BP, position_ids_from_mask(prompt_mask_BP), prompt_ids_BP.shape[1])

    def step(self, ids_B, positions_B, n: int):
        return self._logits(ids_B[:, None], positions_B[:, None], n)


def sample(model, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor, eos_token_ids, pad_token_id: int,
           max_new_tokens: int, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, banned_ids: torch.Tensor | None = None, sync_every: int = 4,
           decoder: DecoderFactory = ModelForward):
    """Decode up to ``max_new_tokens`` per row, the logits from ``decoder(model, cache, mask_BL)`` (built in the
    caller's grad mode; the loop runs without gradient).

    Returns ``(sequences [B, P + T], logp_BT, entropy_BT)``; the last two are ``None`` when greedy, and hold
    garbage (not zeros) after each row's EOS: the caller masks them.
    """
    B, P = prompt_ids_BP.shape
    device = prompt_ids_BP.device
    cache = kv_cache(model, P + max_new_tokens)
    eos_E = torch.as_tensor(list(eos_token_ids), device=device)
    banned_K = None if banned_ids is None or not len(banned_ids) else banned_ids.to(device)
    inv_temp = 1.0 / temperature
    warps = [] if greedy else warpers(temperature, top_k, top_p)
    # Without left padding the causal mask alone is right: no 2-D mask, so the model skips building a 4-D one.
    mask_BL = None
    if not bool(prompt_mask_BP.all()):
        mask_BL = torch.cat([prompt_mask_BP, prompt_mask_BP.new_ones(B, max_new_tokens)], dim=1)
    forward = decoder(model, cache, mask_BL)
    with torch.no_grad():
        return _loop(forward, prompt_ids_BP, prompt_mask_BP, eos_E, pad_token_id, max_new_tokens, greedy, inv_temp,
                     warps, banned_K, sync_every)


def _loop(forward: Decoder, prompt_ids_BP, prompt_mask_BP, eos_E, pad_token_id: int, max_new_tokens: int,
          greedy: bool, inv_temp: float, warps: list, banned_K, sync_every: int):
    B, P = prompt_ids_BP.shape
    device = prompt_ids_BP.device
    record = not greedy
    tokens_BT = torch.full((B, max_new_tokens), pad_token_id, dtype=prompt_ids_BP.dtype, device=device)
    logp_BT = torch.empty(B, max_new_tokens, device=device) if record else None
    entropy_BT = torch.empty(B, max_new_tokens, device=device) if record else None
    unfinished_B = torch.ones(B, dtype=torch.bool, device=device)
    length_B = torch.zeros(B, dtype=torch.long, device=device)  # sampled tokens, EOS included
    pos_B = position_ids_from_mask(prompt_mask_BP)[:, -1]
    next_B = None
    for t in range(max_new_tokens):
        if t == 0:
            z_BV = forward.prefill(prompt_ids_BP, prompt_mask_BP).float()
        else:
            pos_B = pos_B + 1
            z_BV = forward.step(next_B, pos_B, P + t).float()
        if banned_K is not None:
            z_BV = z_BV.index_fill(-1, banned_K, BANNED_LOGIT)
        if greedy:
            next_B = z_BV.argmax(-1)
        else:
            lp_BV = torch.log_softmax(z_BV * inv_temp, dim=-1)
            entropy_BT[:, t] = -(lp_BV.exp() * lp_BV).sum(-1)
            for w in warps:
                z_BV = w(None, z_BV)
            # generate's own arithmetic (not exp(lp_BV)): the same seed draws the same tokens
            p_BV = torch.softmax(z_BV, dim=-1)
            next_B = torch.multinomial(p_BV, num_samples=1).squeeze(1)
            logp_BT[:, t] = lp_BV.gather(-1, next_B[:, None]).squeeze(1)
        next_B = torch.where(unfinished_B, next_B, pad_token_id)
        tokens_BT[:, t] = next_B
        length_B += unfinished_B
        unfinished_B &= ~torch.isin(next_B, eos_E)
        if (t + 1) % sync_every == 0 and not bool(unfinished_B.any()):
            break
    # columns decoded after every row had finished (between two syncs) hold padding only: cut them
    T = int(length_B.max())
    seq = torch.cat([prompt_ids_BP, tokens_BT[:, :T]], dim=1)
    if record:
        logp_BT, entropy_BT = logp_BT[:, :T], entropy_BT[:, :T]
    return seq, logp_BT, entropy_BT
