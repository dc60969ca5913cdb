"""A fused one-token decode step for Qwen2- and Llama-family decoders: the CPU wing's ``Decoder``.

On small models, decoding one token per row costs far more in per-op overhead than in arithmetic: the Hugging Face
forward runs about 30 small ops per layer (separate q/k/v projections, ``rotate_half``'s slices, negation and
concatenation, the attention-mask bookkeeping, the cache update). This step runs the same mathematics with fewer
ops:

    x      = rms_norm(h)                         (the layer's own weight and eps)
    y      = x @ [Wq; Wk; R Wq; R Wk; Wv]^T + b   one matmul; R = rotate_half folded into the weights
    q, k   = y_qk * cos + y_Rqk * sin             = apply_rotary_pos_emb(q, k, cos, sin)
    K[:, :, n-1], V[:, :, n-1] = k, v             written into the decode loop's preallocated cache
    o      = softmax(q K^T * d^-1/2 + bias) V      grouped-query attention over the n filled columns
    h     += o @ Wo^T (+ bo)
    h     += down(silu(gate(x)) * up(x))          with x = rms_norm(h); gate and up in one matmul

``cos``/``sin`` come from the model's own rotary module, so every rope scaling it supports is supported. The
weights are packed from the live parameters at the start of each rollout (they change every optimiser step),
about a millisecond at a miniature's size. ``FusedDecoder`` is the seam's factory (``rollout.decoder``): the
prompt goes through the fused backbone's layers on the CPU (``FusedScorer.prefill``) and every later token through
this step, where they compute the model's own forward; elsewhere the model's own forward does
(``src.modules.rollout.decode.ModelForward``).

Used only where ``fusable``: a ``qwen2`` or ``llama`` config with SiLU MLPs, no sliding-window layers, plain
``nn.Linear`` / ``nn.Embedding`` modules (no LoRA or quantised layers), every weight at its config's shape on one
real device (no FSDP shards, DTensors, DeepSpeed ZeRO-3 partitions or meta offload), no hooks (registered ones, or
Accelerate's ``_hf_hook``), and at most ``MAX_PARAMS`` parameters: the packed copies (q, k, their rotations, v,
gate and up) cost about as much memory again as those weights, and beyond small models the per-op overhead it
removes no longer dominates. The attention is the eager kind (scores in the model's dtype, softmax in fp32): in
fp32 it gives the forward's tokens (the tests assert equality); in bf16 it matches to bf16 rounding, as two
attention kernels do. ``tests/test_accel_cpu.py`` checks it against the Hugging Face forward: logits, greedy and
sampled tokens, recorded log-probs and entropies, and the guards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.accel.cpu.ops import rms_norm_any_dtype
from src.modules.rollout.decode import InPlaceLayer, ModelForward

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
    """Logits of the next token for one new token per row, reading and writing an ``InPlaceLayer`` cache."""

    MAX_PARAMS = 500_000_000

    @torch.no_grad()  # packed copies of the weights, for sampling only: no graph to the parameters
    def __init__(self, model):
        cfg = model.config
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
            W = torch.cat([q.weight, k.weight, _rotate_rows(q.weight, d), _rotate_rows(k.weight, d), v.weight])
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

    @torch.no_grad()
    def __call__(self, tokens_B: torch.Tensor, positions_B: torch.Tensor, cache, n: int,
                 bias_BL: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, V]`` after the tokens ``tokens_B`` at ``positions_B``, the ``n``-th cache column.

        ``cache`` is the loop's ``DynamicCache`` of ``InPlaceLayer``s filled up to column ``n - 1``; ``bias_BL`` is
        the additive attention bias over the cache's columns (0 or a large negative value for left padding), or
        None without padding.
        """
        B = tokens_B.shape[0]
        nq, nk, d, G = self.n_heads, self.n_kv, self.head_dim, self.groups
        QK = (nq + nk) * d
        h = F.embedding(tokens_B, self.embed)
        cos, sin = self.rotary(h[:, None], positions_B[:, None])  # [B, 1, d], attention scaling included
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        bias = None if bias_BL is None else bias_BL[:, None, None, :n]
        for (ln1, W, b, Wo, bo, ln2, Wgu, Wd), layer in zip(self.layers, cache.layers):
            x = rms_norm_any_dtype(h, ln1, self.eps)
            y = F.linear(x, W, b)
            qk = y[:, :QK].view(B, nq + nk, d) * cos + y[:, QK : 2 * QK].view(B, nq + nk, d) * sin
            layer.put(n - 1, qk[:, nq:], y[:, 2 * QK :].view(B, nk, d))
            q = qk[:, :nq].reshape(B, nk, G, d)
            scores = torch.matmul(q, layer.keys.transpose(-1, -2)).mul_(self.scale)
            if bias is not None:
                scores += bias
            o = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), layer.values)
            h = h + F.linear(o.view(B, nq * d), Wo, bo)
            gate, up = F.linear(rms_norm_any_dtype(h, ln2, self.eps), Wgu).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, Wd)
        return F.linear(rms_norm_any_dtype(h, self.norm, self.eps), self.head)


class FusedForward:
    """A ``Decoder``: the prompt through ``FusedScorer.prefill`` on the CPU (else the model's forward), every later
    token through ``FusedDecodeStep``. ``keep_graph``: the prefill keeps its graph for the model's next scoring
    (``src.accel.cpu.backbone``)."""

    def __init__(self, model, cache, mask_BL: torch.Tensor | None, keep_graph: bool = False):
        from src.accel.cpu.backbone import FusedScorer

        self.model, self.cache, self.step_fn, self.keep_graph = model, cache, FusedDecodeStep(model), keep_graph
        self.prefill_scorer = FusedScorer.for_model(model)
        self.fallback = ModelForward(model, cache, mask_BL)
        self.bias_BL = None
        if mask_BL is not None:  # additive, in the model's dtype, built once per rollout
            self.bias_BL = torch.zeros(mask_BL.shape, dtype=model.dtype, device=mask_BL.device).masked_fill_(
                mask_BL == 0, torch.finfo(model.dtype).min)

    def prefill(self, prompt_ids_BP, prompt_mask_BP):
        if self.prefill_scorer is None:
            return self.fallback.prefill(prompt_ids_BP, prompt_mask_BP)
        h_BH = self.prefill_scorer.prefill(prompt_ids_BP, prompt_mask_BP, self.cache, self.keep_graph)
        return F.linear(h_BH, self.step_fn.head)

    def step(self, ids_B, positions_B, n: int):
        return self.step_fn(ids_B, positions_B, self.cache, n, self.bias_BL)


class FusedDecoder:
    """The ``rollout.decoder`` factory of ``accel=cpu``: ``FusedForward`` where ``fusable``, on the CPU, in eval mode
    (as a rollout puts the policy: no dropout); the model's own forward elsewhere. Called in the caller's grad
    mode: a rollout asked for with gradient on, of a policy with trainable weights (a training step's student),
    keeps its prefill's graph for the scoring that follows."""

    def __call__(self, model, cache, mask_BL: torch.Tensor | None):
        layers = getattr(cache, "layers", None)  # the loop's preallocated buffers, which the step writes in place
        in_place = bool(layers) and all(isinstance(layer, InPlaceLayer) for layer in layers)
        if getattr(model, "training", True) or not in_place or not fusable(model) or model.device.type != "cpu":
            return ModelForward(model, cache, mask_BL)
        from src.accel.cpu.backbone import FusedScorer

        # kept only where the training scoring that follows takes the fused backbone too (no dropout, no
        # checkpointing); with several minibatches per rollout it is dropped unused at the first one
        keep_graph = (torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
                      and FusedScorer.supports(model, training=True))
        return FusedForward(model, cache, mask_BL, keep_graph)


def fusable(model) -> bool:
    """Whether the fused kernels here (``FusedDecodeStep``, ``src.accel.cpu.backbone.FusedScorer``) compute
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
