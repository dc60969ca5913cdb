"""A lean sampling loop: the model's forward over a KV cache, without ``generate``'s per-token machinery.

Same contract as ``generate`` with our processors (``HFGenerateRollout``): prefill the left-padded prompt
once, then one token per step from the last position's logits only (``logits_to_keep=1``). Qwen2/Llama models
take fused kernels for both where they compute the model's own forward (``FusedScorer.prefill`` on the CPU,
``FusedDecodeStep``; ``fused=False`` / ``rollout.fused_decode=false``: the model's forward throughout;
``fused="compiled"``: the fused step through ``torch.compile``)::

    z_t     = logits(last position)               banned ids set to BANNED_LOGIT (renormalised away)
    logp_t  = log_softmax(z_t / temperature)       recorded: log p(y_t) and H_t = -sum exp(logp_t) logp_t
    y_t     ~ softmax(top_p(top_k(z_t / temperature)))   (argmax of z_t when greedy)

so the recorded log-probs are those of the untruncated temperature distribution, as the scorer computes them.
Positions skip left padding (``cumsum(mask) - 1``, as ``generate`` assigns them). A row that has emitted an
EOS gets ``pad_token_id`` from then on; "all rows finished" is read on the host only every ``sync_every``
steps (a device sync on GPU), and the all-padding columns decoded past the end are cut, so the output has
``generate``'s width: the longest response, or the budget.

Text-only causal LMs only: models with 3-D rotary positions or image inputs (vision-language) keep
``generate``.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from src.modules.fast_decode import FusedDecodeStep
from src.modules.fast_score import FusedScorer
from src.modules.multimodal import is_multimodal
from src.modules.replay import DecodeRecord
from src.modules.scoring import BANNED_LOGIT, position_ids_from_mask


class _InPlaceLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in one buffer sized for the whole decode: a step writes
    its column in place, where ``DynamicLayer`` concatenates (copies the whole cache, every layer, every step:
    the largest op, ~1/3 of self time, in a CPU profile of the tiny benchmark's decode). ``keys``/``values``
    are views of the filled part."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.device, (B, H, _, D) = key_states.device, key_states.shape
            # zeros, not garbage: the compiled decode step reads unfilled columns (masked; 0 * NaN would be NaN)
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


def kv_cache(model, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` whose full-attention layers fill a preallocated buffer (sliding-window and other
    layer kinds keep their own)."""
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56: no per-layer cache
        return DynamicCache()
    cache.layers = [_InPlaceLayer(capacity) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


def loop_supports(model, model_kwargs: dict) -> bool:
    """Whether ``sample`` can decode for this model and these inputs (else use ``generate``): a text-only
    decoder with a ``config`` (an object that only offers ``generate`` keeps it)."""
    config = getattr(model, "config", None)
    return (config is not None and not model_kwargs and not is_multimodal(model)
            and not getattr(config, "is_encoder_decoder", False))


def _forward_keywords(model) -> tuple[str, bool]:
    """The cache argument's name (``cache`` from transformers 5, ``past_key_values`` before) and whether the
    forward takes ``logits_to_keep``."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


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


@torch.no_grad()
def sample(model, prompt_ids_BP: torch.Tensor, prompt_mask_BP: torch.Tensor, eos_token_ids, pad_token_id: int,
           max_new_tokens: int, greedy: bool = False, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, banned_ids: torch.Tensor | None = None, sync_every: int = 4, fused: bool | str = True,
           keep_prompt_graph: bool = False, record_activations: bool = False):
    """Decode up to ``max_new_tokens`` per row. The prefill goes through ``FusedScorer.prefill`` and each later
    token through ``FusedDecodeStep`` where they support the model (``fused=False``: always the model's own
    forward).

    Returns ``(sequences [B, P + T], logp_BT, entropy_BT)``; the last two are ``None`` when greedy, and hold
    garbage (not zeros) after each row's EOS: the caller masks them. ``keep_prompt_graph`` runs the fused
    prefill with gradient on and appends its ``PromptState`` (``src.modules.fast_score``; None where the
    prefill is not the fused one), from which the student's scoring continues. With ``record_activations`` too
    (fp32 models, no autocast), the fused step records the response columns' activations in the state's ``replay``
    (``src.modules.replay``): the student's scoring then takes them instead of running its forward.
    """
    B, P = prompt_ids_BP.shape
    device = prompt_ids_BP.device
    cache_kw, has_keep = _forward_keywords(model)
    keep = {"logits_to_keep": 1} if has_keep else {}
    cache = kv_cache(model, P + max_new_tokens)
    eos_E = torch.as_tensor(list(eos_token_ids), device=device)
    banned_K = None if banned_ids is None or not len(banned_ids) else banned_ids.to(device)
    record = not greedy
    inv_temp = 1.0 / temperature
    warps = [] if greedy else warpers(temperature, top_k, top_p)

    # Without left padding the causal mask alone is right: no 2-D mask, so the model skips building a 4-D one.
    padded = not bool(prompt_mask_BP.all())
    mask_BL = None
    if padded:
        mask_BL = torch.cat([prompt_mask_BP, prompt_mask_BP.new_ones(B, max_new_tokens)], dim=1)
    pos_BP = position_ids_from_mask(prompt_mask_BP)
    step = FusedDecodeStep.build(model, compiled=fused == "compiled") if fused and all(
        isinstance(x, _InPlaceLayer) for x in getattr(cache, "layers", [None])) else None
    # the prefill through the fused scorer's layers where it computes this model's forward (CPU)
    scorer = FusedScorer.for_model(model) if step is not None else None
    bias_BL = None
    if step is not None and mask_BL is not None:
        bias_BL = torch.zeros(mask_BL.shape, dtype=model.dtype, device=device).masked_fill_(
            mask_BL == 0, torch.finfo(model.dtype).min)
    tokens_BT = torch.full((B, max_new_tokens), pad_token_id, dtype=prompt_ids_BP.dtype, device=device)
    logp_BT = torch.empty(B, max_new_tokens, device=device) if record else None
    entropy_BT = torch.empty(B, max_new_tokens, device=device) if record else None
    unfinished_B = torch.ones(B, dtype=torch.bool, device=device)
    length_B = torch.zeros(B, dtype=torch.long, device=device)  # sampled tokens, EOS included

    ids, pos_BL, state, rec, steps = prompt_ids_BP, pos_BP, None, None, 0
    for t in range(max_new_tokens):
        if t and step is not None:
            z_BV = step(ids[:, 0], pos_BL[:, 0], cache, P + t, bias_BL, rec, t - 1).float()
            steps = t
        elif scorer is not None:
            if keep_prompt_graph:
                state = scorer.prefill_state(ids, prompt_mask_BP, cache)
                h_BH = state.h_last.detach()
                if (record_activations and model.dtype == torch.float32 and max_new_tokens > 1
                        and not torch.is_autocast_enabled(device.type)):  # the records are fp32
                    rec = state.replay = DecodeRecord.allocate(step, B, max_new_tokens - 1)
            else:
                h_BH = scorer.prefill(ids, prompt_mask_BP, cache)
            z_BV = F.linear(h_BH, step.head).float()
        else:
            out = model(input_ids=ids, attention_mask=None if mask_BL is None else mask_BL[:, : P + t],
                        position_ids=pos_BL, use_cache=True, **{cache_kw: cache}, **keep)
            z_BV = out.logits[:, -1].float()
        if banned_K is not None:
            z_BV = z_BV.index_fill(-1, banned_K, BANNED_LOGIT)
        if greedy:
            next_B = z_BV.argmax(-1)
        else:
            if record:
                lp_BV = torch.log_softmax(z_BV * inv_temp, dim=-1)
                entropy_BT[:, t] = -(lp_BV.exp() * lp_BV).sum(-1)
            for w in warps:
                z_BV = w(None, z_BV)
            # generate's own arithmetic (not exp(lp_BV)): the same seed draws the same tokens
            p_BV = torch.softmax(z_BV, dim=-1)
            next_B = torch.multinomial(p_BV, num_samples=1).squeeze(1)
            if record:
                logp_BT[:, t] = lp_BV.gather(-1, next_B[:, None]).squeeze(1)
        next_B = torch.where(unfinished_B, next_B, pad_token_id)
        tokens_BT[:, t] = next_B
        length_B += unfinished_B
        unfinished_B &= ~torch.isin(next_B, eos_E)
        if (t + 1) % sync_every == 0 and not bool(unfinished_B.any()):
            break
        ids, pos_BL = next_B[:, None], pos_BL[:, -1:] + 1
    if rec is not None:
        rec.filled = steps
        rec.keys, rec.values = [layer._keys for layer in cache.layers], [layer._values for layer in cache.layers]
    # columns decoded after every row had finished (between two syncs) hold padding only: cut them
    T = int(length_B.max())
    seq = torch.cat([prompt_ids_BP, tokens_BT[:, :T]], dim=1)
    if record:
        logp_BT, entropy_BT = logp_BT[:, :T], entropy_BT[:, :T]
    return (seq, logp_BT, entropy_BT, state) if keep_prompt_graph else (seq, logp_BT, entropy_BT)
