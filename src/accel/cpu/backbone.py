"""A fused teacher-forced forward for Qwen2- and Llama-family decoders: the CPU wing's ``Backbone``.

Scoring a rollout runs the backbone over prompt and response, with gradient for the student and without for the
teacher; the heads then see only the response positions (``src.modules.scoring``). ``FusedBackbone`` computes the
same final hidden states as the Hugging Face backbone with less work, where ``FusedScorer.supports`` the model, and
is the Hugging Face backbone elsewhere:

    x       = rms_norm(h)
    q, k, v = x @ [Wq; Wk; Wv]^T + b              one matmul (gate and up likewise, below)
    q, k    = rope(q), rope(k)                     the model's own rotary module
    o       = softmax(q k^T * d^-1/2 + mask) v     eager attention, grouped-query heads not repeated
    h      += o @ Wo^T (+ bo)                      the residual sum inside the matmul (addmm)
    h      += down(silu(gate(x)) * up(x))

and, in the **last layer only the rows the heads read** (``response_start - 1`` to ``T - 2``) get queries, the
attention output and the MLP; keys and values still cover every position before the last. The prompt rows of the
last layer feed nothing the scorer reads, so this is exact. The last column (``T - 1``) is not computed at all: no
row the heads read attends to it.

**Leading columns that every row holds alike** (``FusedScorer.shared_prefix``) go through the layers once, as one
row; every row's attention reads that row's keys and values, expanded over the batch, and their gradient is the
sum over the rows, as if each row had computed them. Prompts are left-padded, so a shared opening (chat template,
system prompt) is found only when every prompt of the batch has the same length, or the batch holds the samples
of one prompt.

The elementwise steps (RMSNorm, the q/k/v split with RoPE, SiLU-gating) are autograd functions with hand-written
backwards (``src.accel.cpu.ops``): each writes its input's gradient in one piece, where autograd's generic
backwards zero-fill and add up a packed projection's gradient slice by slice.

``FusedScorer.prefill`` runs the same layers over a prompt for the decode loop (``src.accel.cpu.decode_step``): it
fills the loop's KV cache and returns the last column's hidden state. **A training rollout's prefill is kept**:
where the rollout was asked for with gradient on (the decoder is built in the caller's grad mode) and the policy
has trainable weights, the prefill runs with gradient and keeps a ``PromptState`` (keys, values, the last hidden
state, the packed weights, with their graph) for that model. The next scoring of the model continues from it if
it still applies (the same prompts, the same weights, gradient on), running only the response columns, so the
prompt's forward runs once a step instead of twice; the state is dropped at that call either way. Where the
rotary frequencies depend on the call's length (``dynamic``, ``longrope``), nothing is continued and the last
column is computed too, as the model's forward would.

Attention is the eager kind (scores, fp32 softmax, values) while the score tensor is small: on the CPU, forward
and backward together, it beats ``scaled_dot_product_attention``'s flash kernel at a miniature's sizes. Above
``EAGER_MAX_SCORES`` score elements it is ``scaled_dot_product_attention``, whose CPU flash kernel takes the mask
and the grouped heads, so long sequences never hold a ``[B, heads, T, T]`` tensor.

Used where ``fusable`` (``src.accel.cpu.decode_step``) says the kernels compute the model's own forward, and
additionally: on the CPU, no dropout in training mode (``attention_dropout == 0``) and no gradient checkpointing
(``FusedScorer.supports``). A trainable model's weights are packed at every call, inside the graph when gradient
is on, so the parameters get their gradients. A frozen model's packing (no parameter requires grad: the teacher)
is kept, about half its parameters again, until a weight is replaced or changed in place (an in-place op on the
parameter; one on ``p.data`` is not seen). ``tests/test_accel_cpu.py`` checks hidden states, log-probs, entropies,
parameter gradients and a training step's loss against the Hugging Face forward.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref

import torch
import torch.nn.functional as F

from src.accel.cpu.decode_step import fusable
from src.accel.cpu.ops import rms_norm, rope_heads, swiglu
from src.modules.rollout.weights_version import weights_key
from src.modules.scoring import hf_backbone, position_ids_from_mask

log = logging.getLogger(__name__)

# B * heads * T * T score elements up to which attention is eager: 64 MiB of fp32 probabilities per layer,
# each kept for the backward when gradient is on (layers x 64 MiB at most); with left padding, one more such
# tensor per call holds the mask in the scores' layout
EAGER_MAX_SCORES = 1 << 24
# per model, held weakly (a scorer refers to its model weakly too, so a model that is dropped is freed)
_SCORERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its FusedScorer
_PREFILLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its kept PromptState
_STEPPED_ASIDE: "weakref.WeakSet" = weakref.WeakSet()  # models already logged as taking the Hugging Face forward


@dataclasses.dataclass
class PromptState:
    """What a training rollout's prefill computed, with its autograd graph: every layer's keys and values of the
    prompt columns and the last prompt column's final hidden state, with the weights key and the packed weights
    they were computed with."""

    kv: list  # per layer (k, v), [B, n_kv, P, head_dim]
    h_last: torch.Tensor  # [B, H]: predicts the first response token
    input_ids: torch.Tensor  # [B, P]
    attention_mask: torch.Tensor  # [B, P]
    weights: tuple  # weights_key(model) when computed
    packed: list  # the packed weights it ran with (in its graph): the continuation reuses them

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


class FusedBackbone:
    """The ``Backbone`` seam's CPU implementation (``accel=cpu``): ``FusedScorer`` where it computes the model's own
    forward (text-only Qwen2 / Llama on the CPU), the Hugging Face backbone elsewhere."""

    def __call__(self, model, input_ids_BT, attention_mask_BT, response_start: int, **model_kwargs) -> torch.Tensor:
        state = _PREFILLS.pop(model, None)  # a kept prefill serves this call or none
        scorer = None if model_kwargs else FusedScorer.for_model(model)
        if scorer is None:
            if model not in _STEPPED_ASIDE:
                _STEPPED_ASIDE.add(model)
                log.info("accel=cpu: %s scores through the Hugging Face forward (the fused backbone takes text-only "
                         "Qwen2/Llama models on the CPU, without dropout or gradient checkpointing)",
                         type(model).__name__)
            return hf_backbone(model, input_ids_BT, attention_mask_BT, response_start, **model_kwargs)
        return scorer(input_ids_BT, attention_mask_BT, response_start, state)


class FusedScorer:
    """``FusedScorer.for_model(model)`` or None; ``scorer(input_ids, attention_mask, response_start)`` gives the
    final (normed) hidden states that predict ``input_ids[:, response_start:]``, as ``hf_backbone`` does."""

    def __init__(self, model):
        cfg = model.config
        self._model = weakref.ref(model)
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self._packed, self._packed_key = None, None

    @property
    def model(self):
        return self._model()

    @staticmethod
    def supports(model, training: bool | None = None) -> bool:
        """Whether this forward is ``model``'s own and measured to help (checked on every call: models get
        wrapped and moved), in ``training`` mode (default: the model's own). CPU only: on CUDA,
        ``scaled_dot_product_attention`` with a mask and grouped-query heads falls back to the math kernel, which
        holds ``[B, heads, T, T]`` per layer (the Hugging Face forward repeats the key/value heads to avoid that),
        and nothing here has been timed on a GPU."""
        if not fusable(model) or next(model.parameters()).device.type != "cpu":
            return False
        # in training mode dropout would be active; gradient checkpointing is a memory choice the user made
        if not (model.training if training is None else training):
            return True
        checkpointing = getattr(model, "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing")
                                else "is_gradient_checkpointing", False)
        return not (getattr(model.config, "attention_dropout", 0.0) or checkpointing)

    def static_rope(self) -> bool:
        """Whether the rotary frequencies are the same whatever the call's length (not ``dynamic`` or
        ``longrope``, which rescale by the longest position): only then may the sequence's last column be left
        out without changing the rotation."""
        rotary = self.model.model.rotary_emb
        return getattr(rotary, "rope_type", "default") not in ("dynamic", "longrope")

    @staticmethod
    def for_model(model) -> "FusedScorer | None":
        """The model's scorer (one per model, so the frozen teacher's packed weights are reused), or None where it
        would not compute the model's own forward."""
        if not FusedScorer.supports(model):
            return None
        scorer = _SCORERS.get(model)
        if scorer is None:
            scorer = _SCORERS[model] = FusedScorer(model)
        return scorer

    def _weights_key(self) -> tuple:
        """Changes when a weight is replaced or changed in place by an autograd-visible op (not through ``p.data``).
        Keys the frozen packing: not ``weights_version.weights_key``, which also counts every optimiser step in the
        process, so the teacher would be packed again after each of the student's steps."""
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def _pack(self, keep: bool = True):
        """Per layer: (ln1, Wqkv, bqkv, Wo, bo, ln2, Wgu, Wd). Packed again on every call of a trainable model
        (in the graph when gradient is on); cached for a frozen one (no parameter requires grad) until a weight
        is replaced or changed in place (not through ``p.data``), unless not ``keep``: a prefill reuses a cached
        packing but does not leave one behind (a frozen model that only generates would hold it for good)."""
        frozen = not any(p.requires_grad for p in self.model.parameters())
        if frozen:
            key = self._weights_key()
            if key == self._packed_key:
                return self._packed
        packed = []
        for layer in self.model.model.layers:
            a, m = layer.self_attn, layer.mlp
            W = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            b = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            Wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight])
            packed.append((layer.input_layernorm.weight, W, b, a.o_proj.weight, a.o_proj.bias,
                           layer.post_attention_layernorm.weight, Wgu, m.down_proj.weight))
        if frozen and keep:
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

    @staticmethod
    def _scores_bias(mask: torch.Tensor, b: int, nk: int, G: int) -> torch.Tensor:
        """An additive ``mask`` [1 or b, 1, Tq, Tk] in the eager attention's layout [b * nk or 1, G * Tq, Tk]
        (materialised once per call and layer kind, shared by the layers)."""
        mb, _, Tq, Tk = mask.shape
        if mb == 1:
            return mask[:, :, None].expand(1, 1, G, Tq, Tk).reshape(1, G * Tq, Tk)
        return mask[:, :, None].expand(b, nk, G, Tq, Tk).reshape(b * nk, G * Tq, Tk)

    def _attend(self, q, k, v, mask, eager: bool):
        """Attention of ``q`` [b, nq, Tq, d] over ``k``, ``v`` [b, nk, Tk, d] (contiguous); ``mask`` from
        ``_scores_bias`` if ``eager``, else boolean, broadcastable to [b, 1, Tq, Tk]."""
        b, nq, Tq, d = q.shape
        nk, Tk = k.shape[1], k.shape[2]
        G = nq // nk
        if not eager:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G > 1)
        # query heads of a group share their key/value head: [b * nk, G * Tq, d] against [b * nk, Tk, d];
        # mask + (q k^T) * d^-1/2 in one op
        s = torch.baddbmm(mask, q.view(b * nk, G * Tq, d), k.view(b * nk, Tk, d).transpose(1, 2), alpha=d**-0.5)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(p, v.view(b * nk, Tk, d)).view(b, nq, Tq, d)

    def __call__(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, response_start: int,
                 state: PromptState | None = None) -> torch.Tensor:
        """Final hidden states [B, T - response_start, H] that predict ``input_ids_BT[:, response_start:]``. The
        last column predicts nothing read here and no column before it attends to it: it is left out (unless the
        rotary frequencies depend on the call's length). Continues from ``state``, a kept prefill, where it
        applies (the module docstring)."""
        T = input_ids_BT.shape[1]
        if not self.static_rope():  # the whole sequence, which sets the rotary frequencies as the model's forward
            return self._forward(input_ids_BT, attention_mask_BT, response_start - 1, T - 1)
        past = state if self._continues(state, input_ids_BT, attention_mask_BT, response_start) else None
        return self._forward(input_ids_BT[:, :-1], attention_mask_BT[:, :-1], response_start - 1, T - 1, past=past)

    def _continues(self, state: PromptState | None, input_ids_BT, attention_mask_BT, response_start: int) -> bool:
        """Whether ``state`` holds these prompts, computed with the current weights, with a graph where one is
        needed (else the prompt's share of the gradient would be lost)."""
        if state is None or state.width != response_start or state.input_ids.shape[0] != input_ids_BT.shape[0]:
            return False
        if torch.is_grad_enabled() and state.h_last.grad_fn is None and any(
                p.requires_grad for p in self.model.parameters()):
            return False
        return (state.weights == weights_key(self.model)
                and torch.equal(state.input_ids, input_ids_BT[:, :response_start])
                and torch.equal(state.attention_mask, attention_mask_BT[:, :response_start]))

    def prefill(self, input_ids_BP: torch.Tensor, attention_mask_BP: torch.Tensor, cache,
                keep_graph: bool = False) -> torch.Tensor:
        """A decode loop's prefill: every layer's keys and values go into ``cache`` (``layer.update(k, v)`` per
        layer; the Hugging Face forward's values wherever the prompt is not padding, and padding columns are
        masked in every later step); returns the last column's final hidden state [B, H]. ``keep_graph``: run
        with gradient and keep the ``PromptState`` for the model's next scoring (the cache gets the keys and values
        without their graph)."""
        P = input_ids_BP.shape[1]
        if not (keep_graph and self.static_rope()):
            return self._forward(input_ids_BP, attention_mask_BP, P - 1, P, cache, keep_packing=False)[:, 0]
        kv, packed = [], []
        weights = weights_key(self.model)  # with the optimiser steps: a fused step leaves the versions alone
        with torch.enable_grad():
            h = self._forward(input_ids_BP, attention_mask_BP, P - 1, P, cache, keep_packing=False, kv_out=kv,
                              packed_out=packed)[:, 0]  # taken inside: a view taken without grad has no graph
        _PREFILLS[self.model] = PromptState(kv, h, input_ids_BP, attention_mask_BP, weights, packed)
        return h.detach()

    def _forward(self, input_ids_BT, attention_mask_BT, first: int, stop: int, cache=None,
                 keep_packing: bool = True, past: PromptState | None = None, kv_out: list | None = None,
                 packed_out: list | None = None) -> torch.Tensor:
        """Final hidden states of columns ``first:stop``. Two streams through the layers: the ``c`` shared leading
        columns as one row, and the rest of every row, whose attention reads the shared row's keys and values
        expanded over the batch (their gradient is the sum over the rows, as if each row had computed them).
        With ``past``, its columns are not run: every row's stream starts after them and reads their keys and
        values, and the last of them contributes its final hidden state (its packed weights are reused).
        ``cache``: every layer's keys and values go into it (``layer.update(k, v)``); ``kv_out`` collects them,
        ``packed_out`` the packed weights."""
        B, T = input_ids_BT.shape
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        Q = nq * d
        inner = self.model.model
        c = 0 if past is not None else self.shared_prefix(input_ids_BT, attention_mask_BT, first + 1)
        s = past.width if past is not None else c  # the first column of every row's own stream
        if past is not None and stop <= s:  # a one-token response: the prompt's last column is all there is
            return past.h_last[:, None]
        pos_BT = position_ids_from_mask(attention_mask_BT)
        emb = inner.embed_tokens
        h = F.embedding(input_ids_BT[:, s:], emb.weight, emb.padding_idx)  # padding_idx: no gradient there
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
        autocast = torch.is_autocast_enabled(h.device.type)
        packed = past.packed if past is not None else self._pack(keep_packing)
        if packed_out is not None:
            packed_out.extend(packed)
        G = nq // nk
        score_bias = {}  # the masks in the eager attention's layout, by layer kind

        def attend(q, k, v, kind, mask):
            if eager and kind not in score_bias:
                score_bias[kind] = self._scores_bias(mask, q.shape[0], nk, G)
            return self._attend(q, k, v, score_bias[kind] if eager else mask, eager)

        def residual(h, x, W, bias=None):  # h + x @ W^T (+ bias), the sum inside the matmul
            if autocast:  # addmm would cast the residual stream itself to the autocast dtype
                return h + F.linear(x, W, bias)
            out = torch.addmm(h.reshape(-1, h.shape[-1]), x.reshape(-1, x.shape[-1]), W.t()).view(h.shape)
            return out if bias is None else out + bias

        def mlp(h, ln2, Wgu, Wd):
            return residual(h, swiglu(F.linear(rms_norm(h, ln2, self.eps), Wgu)), Wd)

        qkv, kv_only = ((nq, True), (nk, True), (nk, False)), ((nk, True), (nk, False))
        for i, (ln1, W, b, Wo, bo, ln2, Wgu, Wd) in enumerate(packed):
            last = i == len(packed) - 1
            bq, bkv = (None, None) if b is None else (b[:Q], b[Q:])
            if c:  # the shared row: in the last layer only its keys and values are read
                xp = rms_norm(hp, ln1, self.eps)
                cp, sp = cos[:1, :c], sin[:1, :c]
                if last:
                    kp, vp = rope_heads(F.linear(xp, W[Q:], bkv), cp, sp, kv_only, d)
                else:
                    qp, kp, vp = rope_heads(F.linear(xp, W, b), cp, sp, qkv, d)
                    op = attend(qp, kp, vp, "prefix", allowed[:1, :, :c, :c])
                    hp = mlp(residual(hp, op.transpose(1, 2).reshape(1, c, Q), Wo, bo), ln2, Wgu, Wd)
            # every row's own columns s..T-1; in the last layer queries only where the heads read
            rows = slice(max(first, s) - s, stop - s) if last else slice(None)
            x = rms_norm(h, ln1, self.eps)
            cc, sc = cos[:, s:], sin[:, s:]
            if last:
                h = h[:, rows]
                q, = rope_heads(F.linear(x[:, rows], W[:Q], bq), cc[:, rows], sc[:, rows], qkv[:1], d)
                k, v = rope_heads(F.linear(x, W[Q:], bkv), cc, sc, kv_only, d)  # [B, nk, Tk, d]
            else:
                q, k, v = rope_heads(F.linear(x, W, b), cc, sc, qkv, d)
            Tq = q.shape[2]
            if c:
                k = torch.cat([kp.expand(B, -1, -1, -1), k], dim=2)
                v = torch.cat([vp.expand(B, -1, -1, -1), v], dim=2)
            elif past is not None:
                k, v = torch.cat([past.kv[i][0], k], dim=2), torch.cat([past.kv[i][1], v], dim=2)
            if kv_out is not None:
                kv_out.append((k, v))
            if cache is not None:
                cache.layers[i].update(k.detach(), v.detach())
            o = attend(q, k, v, "last" if last else "row", allowed[:, :, s:][:, :, rows])
            h = mlp(residual(h, o.transpose(1, 2).reshape(B, Tq, Q), Wo, bo), ln2, Wgu, Wd)
        h = rms_norm(h, inner.norm.weight, self.eps)
        if past is not None and first < s:  # the prompt's last column, from the prefill
            h = torch.cat([past.h_last[:, None], h], dim=1)
        return h
