"""A fused one-token decode step for Qwen2- and Llama-family decoders (the rollout's hot loop).

On small models, decoding one token per row costs far more in per-op overhead than in arithmetic: the
Hugging Face forward runs about 30 small ops per layer (separate q/k/v projections, ``rotate_half``'s
slices, negation and concatenation, the attention-mask bookkeeping, the cache update). This step runs the
same mathematics with fewer ops:

    x      = rms_norm(h)                         (the layer's own weight and eps)
    y      = x @ [Wq; Wk; R Wq; R Wk; Wv]^T + b   one matmul; R = rotate_half folded into the weights
    q, k   = y_qk * cos + y_Rqk * sin             = apply_rotary_pos_emb(q, k, cos, sin)
    K[:, :, n-1], V[:, :, n-1] = k, v             written into the decode loop's preallocated cache
    o      = softmax(q K^T * d^-1/2 + bias) V      grouped-query attention over the n filled columns
    h     += o @ Wo^T (+ bo)
    h     += down(silu(gate(x)) * up(x))          with x = rms_norm(h); gate and up in one matmul

``cos``/``sin`` come from the model's own rotary module, so every rope scaling it supports is supported.
The weights are packed from the live parameters at the start of each rollout (they change every optimiser
step), about a millisecond at the benchmark's size.

Used only where it computes the model's own forward (``FusedDecodeStep.build`` returns None otherwise, and
the loop keeps the Hugging Face forward): a ``qwen2`` or ``llama`` config with SiLU MLPs, no sliding-window
layers, plain ``nn.Linear`` / ``nn.Embedding`` modules (no LoRA or quantised layers), every weight at its
config's shape on one real device (no FSDP flat shards, DTensors, DeepSpeed ZeRO-3 partitions or meta
offload), no hooks (registered ones, or Accelerate's ``_hf_hook``), and at most ``MAX_PARAMS`` parameters:
the packed copies (q, k, their rotations, v, gate and up) cost about as much memory again as those
weights, and beyond small models the per-op overhead it removes no longer dominates. The attention is the
eager kind (scores in the model's dtype, softmax in fp32): in fp32 it gives the forward's tokens (the tests
assert equality); in bf16 it matches to bf16 rounding, as two attention kernels do.
``tests/test_decode.py`` checks it against the Hugging Face forward: logits, greedy and sampled tokens,
recorded log-probs and entropies, and the guards. ``rollout.fused_decode=false`` turns it off, and with it
the fused prefill (``FusedScorer.prefill``, ``src.modules.fast_score``) that fills the cache before it.

``rollout.fused_decode=compiled`` runs the same step through ``torch.compile`` (``decode_body``): shapes fixed
for a whole rollout (the new column's index a tensor, the attention over every cache column with the later ones
masked), so one compilation serves every step, and the elementwise work between the matmuls (RMSNorm, RoPE,
SiLU-gating, the softmax with its mask) becomes a few generated kernels. The generated kernels run on one
thread (``cpp.threads=1``; the matmuls keep torch's threads): with two, the eager ops after them (the teacher's
scoring, the backward) ran slower on the 2-core benchmark machine, which ate the gain
(``docs/results/performance.md``). Each step attends over the whole budget (prompt + ``max_new_tokens``
columns), the eager step over the filled part: cheap at the benchmark's 32-token budget, a growing cost for
long budgets. Compilation needs a C++ compiler on the CPU (missing, the first rollout fails) and takes about
10 s for the benchmark's student at its first rollout, and again at the first new batch size or length (then
compiled for any). Tested on the CPU; checked once on an H100 (the same tokens: docs/results/performance.md).
The tests check it against the Hugging Face forward (logits to 1e-5) and the eager step (the same sampled
tokens); it is opt-in because of the compilations, which the tests and miniatures would pay for.

Given a ``replay.DecodeRecord`` (``rollout.reuse_activations``), either step also writes what a layer's backward
needs into the record's column (the eager step as its ops' outputs, the compiled one by ``index_copy_``), for
the student's scoring to reuse (``src.modules.replay``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


def _rotate_rows(W: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of ``W`` (or a bias) reordered so that ``x @ R(W)^T = rotate_half(x @ W^T)``, head by head."""
    Wh = W.reshape(-1, head_dim, *W.shape[1:])
    half = head_dim // 2
    return torch.cat([-Wh[:, half:], Wh[:, :half]], dim=1).reshape(W.shape)


def _has_hooks(model: nn.Module) -> bool:
    """Forward hooks, or a wrapper that replaces forwards (Accelerate's offload hooks, FSDP's wrappers)."""
    wrapped = ("_hf_hook", "_fsdp_wrapped_module")
    return any(m._forward_hooks or m._forward_pre_hooks or any(hasattr(m, w) for w in wrapped)
               for m in model.modules())


class FusedDecodeStep:
    """Logits of the next token for one new token per row, reading and writing an ``_InPlaceLayer`` cache."""

    MAX_PARAMS = 500_000_000

    def __init__(self, model, compiled: bool = False):
        cfg = model.config
        self.compiled = compiled
        self._zero_bias = None
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.groups = self.n_heads // self.n_kv
        self.scale = self.head_dim**-0.5
        self.eps = cfg.rms_norm_eps
        self.layers = []
        d = self.head_dim
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            q, k, v = a.q_proj, a.k_proj, a.v_proj
            W = torch.cat([q.weight, k.weight, _rotate_rows(q.weight, d), _rotate_rows(k.weight, d),
                           v.weight])
            b = None
            if q.bias is not None:
                b = torch.cat([q.bias, k.bias, _rotate_rows(q.bias, d), _rotate_rows(k.bias, d), v.bias])
            Wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight])
            self.layers.append((layer.input_layernorm.weight, W, b, a.o_proj.weight, a.o_proj.bias,
                                layer.post_attention_layernorm.weight, Wgu, m.down_proj.weight))
        self.embed = model.model.embed_tokens.weight
        self.norm = model.model.norm.weight
        self.head = model.get_output_embeddings().weight
        self.rotary = model.model.rotary_emb

    @staticmethod
    def build(model, compiled: bool = False) -> "FusedDecodeStep | None":
        """The fused step for ``model``, or None where it would not compute the model's own forward;
        ``compiled``: through ``torch.compile`` (``decode_body``)."""
        if getattr(model, "training", True) or not fusable(model):
            return None
        return FusedDecodeStep(model, compiled)

    @torch.no_grad()
    def __call__(self, tokens_B: torch.Tensor, positions_B: torch.Tensor, cache, n: int,
                 bias_BL: torch.Tensor | None = None, record=None, column: int = 0) -> torch.Tensor:
        """Logits ``[B, V]`` after the tokens ``tokens_B`` at ``positions_B``, the ``n``-th cache column.

        ``cache`` is the loop's ``DynamicCache`` of ``_InPlaceLayer``s filled up to column ``n - 1``;
        ``bias_BL`` is the additive attention bias over the cache's columns (0 or a large negative value
        for left padding), or None without padding. ``record``: a ``replay.DecodeRecord`` that gets this
        step's activations at its column ``column``.
        """
        if self.compiled:
            return self._compiled_call(tokens_B, positions_B, cache, n, bias_BL, record, column)
        B = tokens_B.shape[0]
        nq, nk, d, G = self.n_heads, self.n_kv, self.head_dim, self.groups
        QK = (nq + nk) * d
        # recording, the ops write the activations straight into the record's column (out=None: a new tensor)
        rec = record.column(column) if record is not None else None

        def out(name: str, i: int):  # where an op writes when recording (None: a new tensor)
            return None if rec is None else rec[name][i]

        h = torch.index_select(self.embed, 0, tokens_B, out=out("hs", 0))  # = F.embedding
        cos, sin = self.rotary(h[:, None], positions_B[:, None])  # [B, 1, d], attention scaling included
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        bias = None if bias_BL is None else bias_BL[:, None, None, :n]
        for i, ((ln1, W, b, Wo, bo, ln2, Wgu, Wd), layer) in enumerate(zip(self.layers, cache.layers)):
            x = _rms_norm(h, ln1, self.eps)
            y = F.linear(x, W, b)
            qk = torch.add(y[:, :QK].view(B, nq + nk, d) * cos, y[:, QK : 2 * QK].view(B, nq + nk, d) * sin,
                           out=out("qk", i))
            layer._keys[:, :, n - 1] = qk[:, nq:]
            layer._values[:, :, n - 1] = y[:, 2 * QK :].view(B, nk, d)
            layer.length, layer.keys, layer.values = n, layer._keys[:, :, :n], layer._values[:, :, :n]
            q = qk[:, :nq].reshape(B, nk, G, d)
            scores = torch.matmul(q, layer.keys.transpose(-1, -2)).mul_(self.scale)
            if bias is not None:
                scores += bias
            o_dest = None if rec is None else out("o", i).view(B, nk, G, d)
            o = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), layer.values,
                             out=o_dest).view(B, nq * d)
            h = torch.add(h, F.linear(o, Wo, bo), out=out("h_mid", i))
            x = _rms_norm(h, ln2, self.eps)
            gu = torch.mm(x, Wgu.t(), out=out("gu", i))  # = F.linear(x, Wgu)
            gate, up = gu.chunk(2, dim=-1)
            h = torch.add(h, F.linear(F.silu(gate) * up, Wd), out=out("hs", i + 1))
        if rec is not None:
            rec["cos"].copy_(cos[:, 0])
            rec["sin"].copy_(sin[:, 0])
            rec["tokens"].copy_(tokens_B)
        return F.linear(_rms_norm(h, self.norm, self.eps), self.head)

    def _compiled_call(self, tokens_B, positions_B, cache, n: int, bias_BL, record=None, column: int = 0):
        """``__call__`` through the compiled ``decode_body``: the whole cache buffers, the column as a tensor."""
        K = [layer._keys for layer in cache.layers]
        V = [layer._values for layer in cache.layers]
        L = K[0].shape[2]
        if bias_BL is None:
            if self._zero_bias is None or self._zero_bias.shape[1] != L:
                self._zero_bias = self.embed.new_zeros(1, L)
            bias_BL = self._zero_bias
        cos, sin = self.rotary(self.embed, positions_B[:, None])  # the first argument gives dtype and device
        col = torch.full((1,), n - 1, dtype=torch.long, device=tokens_B.device)
        rec = None
        if record is not None:
            rec = (record.buffers(), torch.full((1,), column, dtype=torch.long, device=tokens_B.device))
        logits = compiled_decode_body()(tokens_B, cos.to(self.embed.dtype), sin.to(self.embed.dtype), col,
                                        bias_BL, self.layers, K, V, self.embed, self.norm, self.head,
                                        (self.n_heads, self.n_kv, self.head_dim), self.eps, self.scale, rec)
        for layer in cache.layers:
            layer.length, layer.keys, layer.values = n, layer._keys[:, :, :n], layer._values[:, :, :n]
        return logits


def decode_body(tokens_B, cos_B1d, sin_B1d, col_1, bias_BL, layers, keys, values, embed, norm, head, dims: tuple,
                eps: float, scale: float, record=None) -> torch.Tensor:
    """``FusedDecodeStep.__call__``'s mathematics with shapes that stay fixed through a rollout, so that one
    ``torch.compile`` serves every step: the new keys and values go to column ``col_1`` (a tensor, not an int the
    compiler would specialise on) of the whole preallocated buffers, and the attention reads every column, the
    ones after ``col_1`` masked (they hold zeros: ``decode._InPlaceLayer`` allocates them so, and a masked
    column must not bring a NaN in through ``0 * value``)."""
    nq, nk, d = dims
    B, G, QK = tokens_B.shape[0], nq // nk, (nq + nk) * d
    h = F.embedding(tokens_B, embed)
    L = keys[0].shape[2]
    later = torch.arange(L, device=h.device) > col_1  # [L]
    bias = bias_BL.masked_fill(later, torch.finfo(h.dtype).min)[:, None, None, :]  # [B or 1, 1, 1, L]
    if record is not None:  # (replay.DecodeRecord.buffers(), its column as a tensor)
        (r_hs, r_qk, r_o, r_mid, r_gu, r_cos, r_sin, r_tok), j_1 = record

        def put(buf, x):
            buf.index_copy_(0, j_1, x[None])
    for i, ((ln1, W, b, Wo, bo, ln2, Wgu, Wd), K, V) in enumerate(zip(layers, keys, values)):
        if record is not None:
            put(r_hs[i], h)
        x = _rms_norm(h, ln1, eps)
        y = F.linear(x, W, b)
        qk = y[:, :QK].view(B, nq + nk, d) * cos_B1d + y[:, QK : 2 * QK].view(B, nq + nk, d) * sin_B1d
        # in the cache's dtype, as the eager step's assignment casts (bf16 keys from a prefill under autocast)
        K.index_copy_(2, col_1, qk[:, nq:, None].to(K.dtype))
        V.index_copy_(2, col_1, y[:, 2 * QK :].view(B, nk, 1, d).to(V.dtype))
        q = qk[:, :nq].reshape(B, nk, G, d)
        scores = torch.matmul(q, K.transpose(-1, -2)) * scale + bias
        o = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), V).reshape(B, nq * d)
        h = h + F.linear(o, Wo, bo)
        x = _rms_norm(h, ln2, eps)
        gu = F.linear(x, Wgu)
        if record is not None:
            put(r_qk[i], qk)
            put(r_o[i], o)
            put(r_mid[i], h)
            put(r_gu[i], gu)
        gate, up = gu.chunk(2, dim=-1)
        h = h + F.linear(F.silu(gate) * up, Wd)
    if record is not None:
        put(r_hs[len(layers)], h)
        put(r_cos, cos_B1d.view(B, -1))
        put(r_sin, sin_B1d.view(B, -1))
        put(r_tok, tokens_B)
    return F.linear(_rms_norm(h, norm, eps), head)


_COMPILED_BODY = None


def compiled_decode_body():
    """``decode_body`` under ``torch.compile``, built on first use (one per process; the compiler keeps a
    specialisation per model shape and dtype, and marks a batch or cache length dynamic once it changes; past
    its recompile limit, 8, it runs the body uncompiled, slower than the eager step, with a warning)."""
    global _COMPILED_BODY
    if _COMPILED_BODY is None:
        _COMPILED_BODY = torch.compile(decode_body, fullgraph=True, options={"cpp.threads": 1})
    return _COMPILED_BODY


def fusable(model) -> bool:
    """Whether the fused kernels here (``FusedDecodeStep``, ``src.modules.fast_score.FusedScorer``) compute
    ``model``'s own forward: the conditions in the module docstring. Training mode is the caller's check
    (dropout)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "mlp_bias", False):
        return False
    if getattr(cfg, "pretraining_tp", 1) != 1 or getattr(cfg, "use_sliding_window", False):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    try:
        inner, layers = model.model, model.model.layers
        head = model.get_output_embeddings()
    except AttributeError:
        return False
    if type(inner.embed_tokens) is not nn.Embedding or type(head) is not nn.Linear or head.bias is not None:
        return False
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nq, nk = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or H // nq
    shapes = [(inner.embed_tokens.weight, (V, H)), (head.weight, (V, H)), (inner.norm.weight, (H,))]
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        linears = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
        if any(type(x) is not nn.Linear for x in linears) or any(x.bias is not None for x in linears[4:]):
            return False
        if len({a.q_proj.bias is None, a.k_proj.bias is None, a.v_proj.bias is None}) > 1:
            return False
        shapes += [(a.q_proj.weight, (nq * d, H)), (a.k_proj.weight, (nk * d, H)),
                   (a.v_proj.weight, (nk * d, H)), (a.o_proj.weight, (H, nq * d)),
                   (m.gate_proj.weight, (I, H)), (m.up_proj.weight, (I, H)), (m.down_proj.weight, (H, I)),
                   (layer.input_layernorm.weight, (H,)), (layer.post_attention_layernorm.weight, (H,))]
    if any(tuple(w.shape) != shape for w, shape in shapes):
        return False  # flattened or partitioned weights (FSDP's flat parameters, DeepSpeed ZeRO-3)
    params = list(model.parameters())
    if any(type(p.data) is not torch.Tensor or hasattr(p, "ds_id") for p in params):
        return False  # DTensor shards, DeepSpeed ZeRO-3 partitions
    if len({p.device for p in params}) != 1 or params[0].device.type == "meta":
        return False
    if sum(p.numel() for p in params) > FusedDecodeStep.MAX_PARAMS or _has_hooks(model):
        return False
    return True


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm / LlamaRMSNorm: normalised in fp32, cast back, then scaled."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
