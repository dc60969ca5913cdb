"""A fused teacher-forced forward for Qwen2- and Llama-family decoders (the scorers' backbone).

Scoring a rollout runs the backbone over prompt and response, with gradient for the student and without
for the teacher; the heads then see only the response positions (``src.modules.scoring``). This forward
computes the same final hidden states as the Hugging Face backbone with less work:

    x       = rms_norm(h)
    q, k, v = x @ [Wq; Wk; Wv]^T + b              one matmul (gate and up likewise, below)
    q, k    = rope(q), rope(k)                     the model's own rotary module
    o       = softmax(q k^T * d^-1/2 + mask) v     eager attention, grouped-query heads not repeated
    h      += o @ Wo^T (+ bo)
    h      += down(silu(gate(x)) * up(x))

and, in the **last layer only the rows the heads read** (``response_start - 1`` to ``T - 2``) get queries,
the attention output and the MLP; keys and values still cover every position. The prompt rows of the last
layer feed nothing the scorer reads, so this is exact. On the peer benchmark (27 prompt + 32 response
tokens) it removes about a tenth of the backbone's arithmetic.

Attention is the eager kind (scores, fp32 softmax, values) while the score tensor is small, where on the
CPU it is faster than ``scaled_dot_product_attention``'s flash kernel, forward and backward; above
``EAGER_MAX_SCORES`` score elements, or off the CPU, it is ``scaled_dot_product_attention``, so long
sequences never hold a ``[B, heads, T, T]`` tensor (``benchmarks/memory.py``).

Used where ``fusable`` (``src.modules.fast_decode``) says the kernels compute the model's own forward, and
additionally: no dropout in training mode (``attention_dropout == 0``) and no gradient checkpointing. With
gradient, the packed weights are concatenated from the parameters inside the graph, so the parameters get
their gradients; without, the packing is cached until a weight changes (the frozen teacher packs once).
``tests/test_fast_score.py`` checks hidden states, log-probs, entropies, parameter gradients and a training
step's loss against the Hugging Face forward. ``module.fused_scoring=false`` turns it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.modules.fast_decode import _rms_norm, fusable

EAGER_MAX_SCORES = 1 << 24  # B * heads * rows * T score elements (64 MiB in fp32) for the eager attention


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x`` [B, T, heads, d] and ``cos``/``sin`` [B, T, 1, d]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class FusedScorer:
    """``FusedScorer.for_model(model)`` or None; ``scorer(input_ids, attention_mask, response_start)`` gives the
    final (normed) hidden states that predict ``input_ids[:, response_start:]``, like ``response_hidden``."""

    def __init__(self, model):
        cfg = model.config
        self.model = model
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self._packed, self._packed_key = None, None

    @staticmethod
    def supports(model) -> bool:
        """Whether this forward is ``model``'s own (checked on every call: models get wrapped and moved)."""
        if not fusable(model):
            return False
        # in training mode dropout would be active; gradient checkpointing is a memory choice the user made
        if not model.training:
            return True
        checkpointing = getattr(model, "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing")
                                else "is_gradient_checkpointing", False)
        return not (getattr(model.config, "attention_dropout", 0.0) or checkpointing)

    @staticmethod
    def for_model(model) -> "FusedScorer | None":
        """The model's scorer (kept on the model, so the frozen teacher's packed weights are reused), or None
        where it would not compute the model's own forward."""
        if not FusedScorer.supports(model):
            return None
        scorer = model.__dict__.get("_fused_scorer")
        if scorer is None:
            scorer = model.__dict__["_fused_scorer"] = FusedScorer(model)
        return scorer

    def _pack(self):
        """Per layer: (ln1, Wqkv, bqkv, Wo, bo, ln2, Wgu, Wd). Packed again on every call of a trainable model
        (in the graph when gradient is on); cached for a frozen one (no parameter requires grad) until a weight
        is replaced or written in place."""
        layers = self.model.model.layers
        frozen = not any(p.requires_grad for p in self.model.parameters())
        if frozen:
            key = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
            if key == self._packed_key:
                return self._packed
        packed = []
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            W = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            b = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            Wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight])
            packed.append((layer.input_layernorm.weight, W, b, a.o_proj.weight, a.o_proj.bias,
                           layer.post_attention_layernorm.weight, Wgu, m.down_proj.weight))
        if frozen:
            self._packed, self._packed_key = packed, key
        return packed

    def __call__(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                 response_start: int) -> torch.Tensor:
        B, T = input_ids_BT.shape
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        G, Q, K = nq // nk, nq * d, nk * d
        inner = self.model.model
        grad = torch.is_grad_enabled()
        pos_BT = (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)  # = position_ids_from_mask
        h = F.embedding(input_ids_BT, inner.embed_tokens.weight, inner.embed_tokens.padding_idx)  # no grad there
        cos, sin = inner.rotary_emb(h, pos_BT)  # [B, T, d], attention scaling included
        cos, sin = cos.to(h.dtype)[:, :, None], sin.to(h.dtype)[:, :, None]
        allowed = torch.ones(T, T, dtype=torch.bool, device=h.device).tril_()[None, None]  # [1, 1, T, T]
        if not bool(attention_mask_BT.all()):
            allowed = allowed & attention_mask_BT.bool()[:, None, None, :]  # [B, 1, T, T]
            allowed = allowed | ~allowed.any(-1, keepdim=True)  # left-padding rows see no key: let them see all
        eager = h.device.type == "cpu" and B * nq * T * T <= EAGER_MAX_SCORES
        if eager:  # additive, as the eager attention adds it to the scores
            allowed = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill_(
                ~allowed, torch.finfo(h.dtype).min)
        packed = self._pack()
        for i, (ln1, W, b, Wo, bo, ln2, Wgu, Wd) in enumerate(packed):
            rows = slice(response_start - 1, T - 1) if i == len(packed) - 1 else slice(None)
            x = _rms_norm(h, ln1, self.eps)
            if rows == slice(None):
                y = F.linear(x, W, b)
                q, kv = y[..., :Q], y[..., Q:]
            else:  # last layer: keys and values everywhere, queries only where the heads read
                h = h[:, rows]
                q = F.linear(x[:, rows], W[:Q], None if b is None else b[:Q])
                kv = F.linear(x, W[Q:], None if b is None else b[Q:])
            Tq = q.shape[1]
            q = _rope(q.view(B, Tq, nq, d), cos[:, rows], sin[:, rows]).transpose(1, 2)  # [B, nq, Tq, d]
            k = _rope(kv[..., :K].view(B, T, nk, d), cos, sin).transpose(1, 2)  # [B, nk, T, d]
            v = kv[..., K:].view(B, T, nk, d).transpose(1, 2)
            mask = allowed[:, :, rows]
            if eager:
                # query heads of a group share their key/value head: [B, nk, G * Tq, d] against [B, nk, T, d]
                s = torch.matmul(q.reshape(B, nk, G * Tq, d), k.transpose(-1, -2))
                s = (s * d**-0.5).view(B, nk, G, Tq, T) + mask[:, :, None]
                p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
                o = torch.matmul(p.view(B, nk, G * Tq, T), v).view(B, nq, Tq, d)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G > 1)
            h = h + F.linear(o.transpose(1, 2).reshape(B, Tq, Q), Wo, bo)
            gate, up = F.linear(_rms_norm(h, ln2, self.eps), Wgu).chunk(2, dim=-1)
            act = F.silu(gate) * up if grad else F.silu(gate).mul_(up)
            h = h + F.linear(act, Wd)
        return _rms_norm(h, inner.norm.weight, self.eps)
