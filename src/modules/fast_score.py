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

And **leading columns that every row holds alike** (``FusedScorer.shared_prefix``) go through the layers
once, as one row; every row's attention reads that row's keys and values, expanded over the batch, and their
gradient is the sum over the rows, as if each row had computed them. Prompts are left-padded, so a shared
opening (chat template, system prompt) is found only when every prompt of the batch has the same length, or
the batch holds the samples of one prompt. On the peer benchmark every prompt has 27 tokens and opens with
the same 6 (``<|im_start|>user\n``): another tenth of the rows.

Attention is the eager kind (scores, fp32 softmax, values) while the score tensor is small: on the CPU,
forward and backward together, it beat ``scaled_dot_product_attention``'s flash kernel (9 against 16 ms a
layer for the benchmark student's 64 x 59 tokens; the forward alone is about even). Above
``EAGER_MAX_SCORES`` score elements it is ``scaled_dot_product_attention``, whose CPU flash kernel takes the
mask and the grouped heads, so long sequences never hold a ``[B, heads, T, T]`` tensor
(``benchmarks/memory.py``).

Used where ``fusable`` (``src.modules.fast_decode``) says the kernels compute the model's own forward, and
additionally: on the CPU (see ``FusedScorer.supports``), no dropout in training mode (``attention_dropout ==
0``) and no gradient checkpointing. It runs the model's weights, not its forward, so a ``torch.compile``d
model is scored uncompiled. A trainable model's weights are packed at every call, inside the graph when
gradient is on, so the parameters get their gradients (the packed copy lives until the backward). A frozen
model's packing (no parameter requires grad: the teacher) is kept, about half its parameters again, until a
weight is replaced or changed in place (an in-place op on the parameter; one on ``p.data`` is not seen).
``tests/test_fast_score.py`` checks hidden states, log-probs, entropies, parameter gradients and a training
step's loss against the Hugging Face forward. ``module.fused_scoring=false`` turns it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.modules.fast_decode import _rms_norm, fusable

# B * heads * T * T score elements up to which attention is eager: 64 MiB of fp32 probabilities per layer,
# each kept for the backward when gradient is on (layers x 64 MiB at most)
EAGER_MAX_SCORES = 1 << 24


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
        """Whether this forward is ``model``'s own and measured to help (checked on every call: models get
        wrapped and moved). CPU only: on CUDA, ``scaled_dot_product_attention`` with a mask and grouped-query
        heads falls back to the math kernel, which holds ``[B, heads, T, T]`` per layer (the Hugging Face
        forward repeats the key/value heads to avoid that), and nothing here has been timed on a GPU."""
        if not fusable(model) or next(model.parameters()).device.type != "cpu":
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
        is replaced or changed in place (not through ``p.data``)."""
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

    @staticmethod
    def shared_prefix(input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, response_start: int) -> int:
        """Leading columns that every row holds alike and unpadded, up to the first row the heads read. Prompts
        are left-padded, so a shared opening (chat template, system prompt) counts only when every prompt of
        the batch has the same length, or the batch is the samples of one prompt; otherwise 0."""
        if input_ids_BT.shape[0] < 2:
            return 0
        same = (input_ids_BT == input_ids_BT[:1]).all(0) & attention_mask_BT.bool().all(0)
        return max(0, min(int(same.long().cumprod(0).sum()), response_start - 1))

    def _attend(self, q, k, v, mask, eager: bool):
        """Attention of ``q`` [b, nq, Tq, d] over ``k``, ``v`` [b, nk, Tk, d]; ``mask`` additive if ``eager``,
        else boolean, broadcastable to [b, 1, Tq, Tk]."""
        b, nq, Tq, d = q.shape
        nk, Tk = k.shape[1], k.shape[2]
        G = nq // nk
        if not eager:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G > 1)
        # query heads of a group share their key/value head: [b, nk, G * Tq, d] against [b, nk, Tk, d]
        s = torch.matmul(q.reshape(b, nk, G * Tq, d), k.transpose(-1, -2))
        s = (s * d**-0.5).view(b, nk, G, Tq, Tk) + mask[:, :, None]
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p.view(b, nk, G * Tq, Tk), v).view(b, nq, Tq, d)

    def __call__(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                 response_start: int) -> torch.Tensor:
        """Two streams through the layers: the ``c`` shared leading columns as one row, and the rest of every
        row, whose attention reads the shared row's keys and values expanded over the batch (their gradient
        is the sum over the rows, as if each row had computed them)."""
        B, T = input_ids_BT.shape
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        Q, K = nq * d, nk * d
        inner = self.model.model
        grad = torch.is_grad_enabled()
        c = self.shared_prefix(input_ids_BT, attention_mask_BT, response_start)
        pos_BT = (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)  # = position_ids_from_mask
        emb = inner.embed_tokens
        h = F.embedding(input_ids_BT[:, c:], emb.weight, emb.padding_idx)  # padding_idx: no gradient there
        hp = F.embedding(input_ids_BT[:1, :c], emb.weight, emb.padding_idx)  # the shared columns, once
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

        def mlp(h, ln2, Wgu, Wd):
            gate, up = F.linear(_rms_norm(h, ln2, self.eps), Wgu).chunk(2, dim=-1)
            return h + F.linear(F.silu(gate) * up if grad else F.silu(gate).mul_(up), Wd)

        for i, (ln1, W, b, Wo, bo, ln2, Wgu, Wd) in enumerate(packed):
            last = i == len(packed) - 1
            bq, bkv = (None, None) if b is None else (b[:Q], b[Q:])
            if c:  # the shared row: in the last layer only its keys and values are read
                xp = _rms_norm(hp, ln1, self.eps)
                if last:
                    kvp = F.linear(xp, W[Q:], bkv)
                else:
                    yp = F.linear(xp, W, b)
                    qp, kvp = yp[..., :Q], yp[..., Q:]
                kp = _rope(kvp[..., :K].view(1, c, nk, d), cos[:1, :c], sin[:1, :c]).transpose(1, 2)
                vp = kvp[..., K:].view(1, c, nk, d).transpose(1, 2)
                if not last:
                    qp = _rope(qp.view(1, c, nq, d), cos[:1, :c], sin[:1, :c]).transpose(1, 2)
                    op = self._attend(qp, kp, vp, allowed[:1, :, :c, :c], eager)
                    hp = mlp(hp + F.linear(op.transpose(1, 2).reshape(1, c, Q), Wo, bo), ln2, Wgu, Wd)
            # every row's own columns c..T-1; in the last layer queries only where the heads read
            rows = slice(response_start - 1 - c, T - 1 - c) if last else slice(None)
            x = _rms_norm(h, ln1, self.eps)
            if last:
                h = h[:, rows]
                q = F.linear(x[:, rows], W[:Q], bq)
                kv = F.linear(x, W[Q:], bkv)
            else:
                y = F.linear(x, W, b)
                q, kv = y[..., :Q], y[..., Q:]
            Tq, Tk = q.shape[1], T - c
            q = _rope(q.view(B, Tq, nq, d), cos[:, c:][:, rows], sin[:, c:][:, rows]).transpose(1, 2)
            k = _rope(kv[..., :K].view(B, Tk, nk, d), cos[:, c:], sin[:, c:]).transpose(1, 2)  # [B, nk, Tk, d]
            v = kv[..., K:].view(B, Tk, nk, d).transpose(1, 2)
            if c:
                k = torch.cat([kp.expand(B, -1, -1, -1), k], dim=2)
                v = torch.cat([vp.expand(B, -1, -1, -1), v], dim=2)
            o = self._attend(q, k, v, allowed[:, :, c:][:, :, rows], eager)
            h = mlp(h + F.linear(o.transpose(1, 2).reshape(B, Tq, Q), Wo, bo), ln2, Wgu, Wd)
        return _rms_norm(h, inner.norm.weight, self.eps)
