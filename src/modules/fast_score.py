"""A fused teacher-forced forward for Qwen2- and Llama-family decoders (the scorers' backbone).

Scoring a rollout runs the backbone over prompt and response, with gradient for the student and without
for the teacher; the heads then see only the response positions (``src.modules.scoring``). This forward
computes the same final hidden states as the Hugging Face backbone with less work:

    x       = rms_norm(h)
    q, k, v = x @ [Wq; Wk; Wv]^T + b              one matmul (gate and up likewise, below)
    q, k    = rope(q), rope(k)                     the model's own rotary module
    o       = softmax(q k^T * d^-1/2 + mask) v     eager attention, grouped-query heads not repeated
    h      += o @ Wo^T (+ bo)                      the residual sum inside the matmul (addmm)
    h      += down(silu(gate(x)) * up(x))

and, in the **last layer only the rows the heads read** (``response_start - 1`` to ``T - 2``) get queries,
the attention output and the MLP; keys and values still cover every position before the last. The prompt
rows of the last layer feed nothing the scorer reads, so this is exact. On the peer benchmark (27 prompt + 32
response tokens) it removes about a tenth of the backbone's arithmetic. The last column (``T - 1``) is not
computed at all: no row the heads read attends to it (the Hugging Face path of ``response_hidden`` computes
it: the stages' documented SFT results depend on that path's exact rounding).

And **leading columns that every row holds alike** (``FusedScorer.shared_prefix``) go through the layers
once, as one row; every row's attention reads that row's keys and values, expanded over the batch, and their
gradient is the sum over the rows, as if each row had computed them. Prompts are left-padded, so a shared
opening (chat template, system prompt) is found only when every prompt of the batch has the same length, or
the batch holds the samples of one prompt. On the peer benchmark every prompt has 27 tokens and opens with
the same 6 (``<|im_start|>user\n``): another tenth of the rows.

The elementwise steps (RMSNorm, the q/k/v split with RoPE, SiLU-gating) are autograd functions with
hand-written backwards (``src.modules.fused_ops``): each writes its input's gradient in one piece, where
autograd's generic backwards zero-fill and add up a packed projection's gradient slice by slice.

``FusedScorer.prefill`` runs the same layers over a prompt for the decode loop (``src.modules.decode``):
it fills the loop's KV cache and returns the last column's hidden state. The loop uses it wherever it uses
the fused decode step (``rollout.fused_decode``, not ``module.fused_scoring``, decides).
``FusedScorer.prefill_state`` does the same with gradient on and keeps a ``PromptState`` (keys, values, the
last hidden state and the packed weights, with their graph): a training rollout's student scoring continues
from it (``__call__(..., prompt_state)``), so the prompt's forward runs once. Where the rotary frequencies
depend on the call's length (``dynamic``, ``longrope``) neither this nor leaving out the last column is done.

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
gradient is on, so the parameters get their gradients (the packed copy lives until the backward; a prefill
state's from the rollout on). A frozen
model's packing (no parameter requires grad: the teacher) is kept, about half its parameters again (with
``module.fused_scoring=onednn``, every projection reordered for oneDNN, about all its parameters again, plus the
last layer's q/k/v), until a weight is replaced or changed in place (an in-place op on the parameter; one on
``p.data`` is not seen). Under CPU autocast the oneDNN packing is not used (its fp32 matmuls would meet bf16
activations).
``tests/test_fast_score.py`` checks hidden states, log-probs, entropies, parameter gradients and a training
step's loss against the Hugging Face forward. ``module.fused_scoring=false`` turns it off.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from src.modules.fast_decode import fusable
from src.modules.fused_ops import rms_norm, rope_heads, swiglu
from src.modules.replay import replay_hidden
from src.modules.weights_version import weights_key

# B * heads * T * T score elements up to which attention is eager: 64 MiB of fp32 probabilities per layer,
# each kept for the backward when gradient is on (layers x 64 MiB at most); with left padding, one more such
# tensor per call holds the mask in the scores' layout
EAGER_MAX_SCORES = 1 << 24


@dataclasses.dataclass
class PromptState:
    """What a decode loop's prefill computed, with its autograd graph (``FusedScorer.prefill_state``): every
    layer's keys and values of the prompt columns and the last prompt column's final hidden state. The
    student's scoring continues from it (``FusedScorer.__call__``) instead of running the prompt again, while
    the weights are those it was computed with."""

    kv: list  # per layer (k, v), [B, n_kv, P, head_dim]
    h_last: torch.Tensor  # [B, H]: predicts the first response token
    input_ids: torch.Tensor  # [B, P]
    attention_mask: torch.Tensor  # [B, P]
    weights: tuple  # the model's weights (storage, version) when computed
    packed: list  # the packed weights it ran with (in its graph): the continuation reuses them
    replay: object = None  # the decode's activations of the response columns (src.modules.replay.DecodeRecord)

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


class FrozenLinear:
    """A frozen weight ``[N, K]`` reordered once into oneDNN's blocked layout, applied by its matmul
    (``torch.ops.mkldnn._linear_pointwise``, the kernel ``torch.compile``'s CPU freezing uses) rather than the
    MKL ``sgemm`` behind ``F.linear``: on the 2-core benchmark machine about 15% faster at a teacher's shapes
    (thousands of rows; ``docs/results/performance.md``). ``W[a:b]`` gives the row blocks named at construction,
    each reordered on its own. The same products up to float rounding."""

    def __init__(self, W: torch.Tensor, rows_hint: int, blocks=()):
        self.shape = W.shape
        self.w = torch.ops.mkldnn._reorder_linear_weight(W.detach(), rows_hint)
        self.blocks = {blk: FrozenLinear(W[blk[0] : blk[1]], rows_hint) for blk in blocks}

    def __getitem__(self, rows: slice) -> "FrozenLinear":
        start, stop, _ = rows.indices(self.shape[0])
        return self if (start, stop) == (0, self.shape[0]) else self.blocks[(start, stop)]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, add: torch.Tensor | None = None):
        """``x @ W^T + bias``, plus ``add`` (the residual stream) where given."""
        if add is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, add, self.w, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, self.w, bias, "none", [], "")

    @staticmethod
    def available(model) -> bool:
        """fp32 weights on the CPU and a PyTorch built with oneDNN."""
        return torch.backends.mkldnn.is_available() and all(
            p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())


def _linear(x: torch.Tensor, W, b: torch.Tensor | None = None) -> torch.Tensor:
    return W(x, b) if isinstance(W, FrozenLinear) else F.linear(x, W, b)


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

    def static_rope(self) -> bool:
        """Whether the rotary frequencies are the same whatever the call's length (not ``dynamic`` or
        ``longrope``, which rescale by the longest position): only then may a prefill's state be continued, or
        the sequence's last column be left out, without changing the rotation."""
        rotary = self.model.model.rotary_emb
        return getattr(rotary, "rope_type", "default") not in ("dynamic", "longrope")

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

    def _weights_key(self) -> tuple:
        """Changes when a weight is replaced or changed in place by an autograd-visible op (not through ``p.data``,
        nor by a fused optimiser step: ``weights_version.weights_key`` counts those). Keys the frozen packing."""
        return tuple((p.data_ptr(), p._version) for p in self.model.parameters())

    def _pack(self, keep: bool = True, onednn: bool = False, rows_hint: int = 4096):
        """Per layer: (ln1, Wqkv, bqkv, Wo, bo, ln2, Wgu, Wd). Packed again on every call of a trainable model
        (in the graph when gradient is on); cached for a frozen one (no parameter requires grad) until a weight
        is replaced or changed in place (not through ``p.data``), unless not ``keep``: a prefill reuses a cached
        packing but does not leave one behind (a frozen model that only generates would hold it for good).
        ``onednn``: a frozen model's kept packing holds ``FrozenLinear``s (reordered for ``rows_hint`` rows)
        where oneDNN is available."""
        layers = self.model.model.layers
        frozen = not any(p.requires_grad for p in self.model.parameters())
        onednn = onednn and frozen and keep and FrozenLinear.available(self.model)
        if frozen:
            key = (self._weights_key(), onednn)
            if key == self._packed_key:
                return self._packed
        packed = []
        for i, layer in enumerate(layers):
            a, m = layer.self_attn, layer.mlp
            W = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            b = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            Wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight])
            Wo, Wd = a.o_proj.weight, m.down_proj.weight
            if onednn:
                Q = a.q_proj.weight.shape[0]
                # the last layer takes q and k/v apart (queries only where the heads read)
                W = FrozenLinear(W, rows_hint, blocks=[(0, Q), (Q, W.shape[0])] if i == len(layers) - 1 else ())
                Wo, Wgu, Wd = (FrozenLinear(x, rows_hint) for x in (Wo, Wgu, Wd))
            packed.append((layer.input_layernorm.weight, W, b, Wo, a.o_proj.bias,
                           layer.post_attention_layernorm.weight, Wgu, Wd))
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

    def __call__(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                 response_start: int, prompt_state: PromptState | None = None, onednn: bool = False) -> torch.Tensor:
        """Final hidden states [B, T - response_start, H] that predict ``input_ids_BT[:, response_start:]``. The
        last column predicts nothing read here and no column before it attends to it: it is left out.

        With a ``prompt_state`` of these prompts, computed with the current weights (and with gradient where
        gradient is on), only the response columns are run, attending to its keys and values; any other
        state is ignored. A state's graph serves one backward: the caller passes it once. ``onednn``: a frozen
        model's matmuls through ``FrozenLinear`` (``module.fused_scoring=onednn``)."""
        T = input_ids_BT.shape[1]
        if not self.static_rope():  # the whole sequence, which sets the rotary frequencies as the model's forward
            return self._forward(input_ids_BT, attention_mask_BT, response_start - 1, T - 1, onednn=onednn)
        past = prompt_state if self._continues(prompt_state, input_ids_BT, attention_mask_BT, response_start) else None
        if past is not None and past.replay is not None:
            h = replay_hidden(self, past, input_ids_BT)
            if h is not None:
                h = rms_norm(h, self.model.model.norm.weight, self.eps)
                return torch.cat([past.h_last[:, None], h], dim=1)
        return self._forward(input_ids_BT[:, :-1], attention_mask_BT[:, :-1], response_start - 1, T - 1, past=past,
                             onednn=onednn)

    def _continues(self, state: PromptState | None, input_ids_BT, attention_mask_BT, response_start: int) -> bool:
        if state is None or state.width != response_start or state.input_ids.shape[0] != input_ids_BT.shape[0]:
            return False
        if torch.is_grad_enabled() and state.h_last.grad_fn is None and any(
                p.requires_grad for p in self.model.parameters()):
            return False  # computed without a graph: the prompt's share of the gradient would be lost
        return (state.weights == weights_key(self.model)
                and torch.equal(state.input_ids, input_ids_BT[:, :response_start])
                and torch.equal(state.attention_mask, attention_mask_BT[:, :response_start]))

    def prefill(self, input_ids_BP: torch.Tensor, attention_mask_BP: torch.Tensor, cache) -> torch.Tensor:
        """A decode loop's prefill: every layer's keys and values go into ``cache`` (``layer.update(k, v)`` per
        layer; the Hugging Face forward's values wherever the prompt is not padding, and padding columns are
        masked in every later step); returns the last column's final hidden state [B, H]."""
        P = input_ids_BP.shape[1]
        return self._forward(input_ids_BP, attention_mask_BP, P - 1, P, cache, keep_packing=False)[:, 0]

    def prefill_state(self, input_ids_BP: torch.Tensor, attention_mask_BP: torch.Tensor, cache) -> PromptState:
        """``prefill`` with gradient on (whatever the caller's grad mode: the decode loop runs without), keeping
        what the scorer needs to continue from it; the cache gets the keys and values without their graph."""
        P, kv, packed = input_ids_BP.shape[1], [], []
        weights = weights_key(self.model)  # with the optimiser steps: a fused step leaves the versions alone
        with torch.enable_grad():
            h = self._forward(input_ids_BP, attention_mask_BP, P - 1, P, cache, keep_packing=False, kv_out=kv,
                              packed_out=packed)[:, 0]  # taken inside: a view taken without grad has no graph
        return PromptState(kv, h, input_ids_BP, attention_mask_BP, weights, packed)

    def _forward(self, input_ids_BT, attention_mask_BT, first: int, stop: int, cache=None,
                 keep_packing: bool = True, past: PromptState | None = None, kv_out: list | None = None,
                 packed_out: list | None = None, onednn: bool = False) -> torch.Tensor:
        """Final hidden states of columns ``first:stop``. Two streams through the layers: the ``c`` shared
        leading columns as one row, and the rest of every row, whose attention reads the shared row's keys and
        values expanded over the batch (their gradient is the sum over the rows, as if each row had computed
        them). With ``past``, its columns are not run: every row's stream starts after them and reads their
        keys and values, and the last of them contributes its final hidden state (its packed weights are reused).
        ``kv_out`` collects every layer's keys and values, ``packed_out`` the packed weights."""
        B, T = input_ids_BT.shape
        nq, nk, d = self.n_heads, self.n_kv, self.head_dim
        Q = nq * d
        inner = self.model.model
        c = 0 if past is not None else self.shared_prefix(input_ids_BT, attention_mask_BT, first + 1)
        s = past.width if past is not None else c  # the first column of every row's own stream
        if past is not None and stop <= s:  # a one-token response: the prompt's last column is all there is
            return past.h_last[:, None]
        pos_BT = (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)  # = position_ids_from_mask
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
        # oneDNN's fp32 matmuls would meet autocast's bf16 activations: the dense packing then
        packed = past.packed if past is not None else self._pack(keep_packing, onednn and not autocast, B * T)
        if packed_out is not None:
            packed_out.extend(packed)
        G = nq // nk
        score_bias = {}  # the masks in the eager attention's layout, by layer kind

        def attend(q, k, v, kind, mask):
            if eager and kind not in score_bias:
                score_bias[kind] = self._scores_bias(mask, q.shape[0], nk, G)
            return self._attend(q, k, v, score_bias[kind] if eager else mask, eager)

        def residual(h, x, W, bias=None):  # h + x @ W^T (+ bias), the sum inside the matmul
            if isinstance(W, FrozenLinear):
                return W(x, bias, add=h)
            if autocast:  # addmm would cast the residual stream itself to the autocast dtype
                return h + F.linear(x, W, bias)
            out = torch.addmm(h.reshape(-1, h.shape[-1]), x.reshape(-1, x.shape[-1]), W.t()).view(h.shape)
            return out if bias is None else out + bias

        def mlp(h, ln2, Wgu, Wd):
            return residual(h, swiglu(_linear(rms_norm(h, ln2, self.eps), Wgu)), Wd)

        qkv, kv_only = ((nq, True), (nk, True), (nk, False)), ((nk, True), (nk, False))
        for i, (ln1, W, b, Wo, bo, ln2, Wgu, Wd) in enumerate(packed):
            last = i == len(packed) - 1
            bq, bkv = (None, None) if b is None else (b[:Q], b[Q:])
            if c:  # the shared row: in the last layer only its keys and values are read
                xp = rms_norm(hp, ln1, self.eps)
                cp, sp = cos[:1, :c], sin[:1, :c]
                if last:
                    kp, vp = rope_heads(_linear(xp, W[Q:], bkv), cp, sp, kv_only, d)
                else:
                    qp, kp, vp = rope_heads(_linear(xp, W, b), cp, sp, qkv, d)
                    op = attend(qp, kp, vp, "prefix", allowed[:1, :, :c, :c])
                    hp = mlp(residual(hp, op.transpose(1, 2).reshape(1, c, Q), Wo, bo), ln2, Wgu, Wd)
            # every row's own columns s..T-1; in the last layer queries only where the heads read
            rows = slice(max(first, s) - s, stop - s) if last else slice(None)
            x = rms_norm(h, ln1, self.eps)
            cc, sc = cos[:, s:], sin[:, s:]
            if last:
                h = h[:, rows]
                q, = rope_heads(_linear(x[:, rows], W[:Q], bq), cc[:, rows], sc[:, rows], qkv[:1], d)
                k, v = rope_heads(_linear(x, W[Q:], bkv), cc, sc, kv_only, d)  # [B, nk, Tk, d]
            else:
                q, k, v = rope_heads(_linear(x, W, b), cc, sc, qkv, d)
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
