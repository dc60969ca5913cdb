"""The student's scoring forward taken from the rollout itself: the decode loop's activations, replayed.

With one optimiser step per rollout, the student that scores the response has the weights that sampled it,
so the scoring forward recomputes, in one teacher-forced pass, what the decode loop has just computed token
by token; it runs only to build the autograd graph. Where ``rollout.reuse_activations`` is on, the fused decode
step (``src.modules.fast_decode``) records, at every response column it processes, what the backward of a
Qwen2 / Llama layer needs (``DecodeRecord``): the residual stream entering the layer and after its attention,
the rotated queries, the attention output and the gate/up projection, plus the top of the residual stream. The
keys and values are in the loop's cache already. ``replay_hidden`` then hands the scorer those top states as the
output of one autograd function, ``_ReplayLayers``, whose backward is the layers' backward written out over
every response column at once (the matmuls as large as the scorer's own):

    MLP       dWd = g^T a,  da = g Wd,  d[gate, up] = swiglu', dWgu = d[gate, up]^T x2,  dx2 = d[gate, up] Wgu
    norm      dh += rstd (dx w - x_hat mean(dx w x_hat)),  dw = sum(dx x_hat)       (x_hat, rstd recomputed)
    o_proj    dWo = dh^T o,  do = dh Wo
    attention p = softmax(q K^T / sqrt(d) + mask) recomputed over prompt and response keys; dV = p^T do,
              ds = p (do V^T - rowsum(p do V^T)),  dq = ds K / sqrt(d),  dK = ds^T q / sqrt(d)
    RoPE      the transpose rotation of dq and of the response columns' dK, into [dq; dk; dv]
    q/k/v     dW = [dq; dk; dv]^T x1,  db = sum,  dx1 = [dq; dk; dv] W

and the embedding's gradient at the response tokens. The prompt columns' share (their keys' and values'
gradients) goes on into the prefill's graph (``PromptState``), so the prompt's forward also runs once. The
gradient is the one the scorer's forward would give, evaluated at the decode's activations: the same values up
to float rounding (the decode's matmuls take one column of every row at a time, the scorer's all of them), so log-probs,
the loss and the gradients agree to float tolerance (``tests/test_replay.py``), not bit for bit. That is why it is
opt-in. It saves the scoring forward (on the CPU benchmark, ``benchmarks/throughput.py --phases``, the student's
scoring went from about 31 to 3 ms a step and the backward stayed at about 95 ms) for records of
``2 * H + (heads + kv_heads) * d + heads * d + 2 * I`` floats per response token and layer (the benchmark
student: 21 kB per token, 42 MB for its 64 x 31 columns), about what autograd keeps for the forward it replaces.
Recording costs the eager step no extra op (its ops write into the record) and the compiled one a few
``index_copy_``s. Used only where the prompt state applies (the fused CPU scorer, one update per rollout), fp32,
and the eager or compiled fused decode step. A row that has ended keeps decoding padding, as the loop does; those
columns get no gradient (the loss masks them), and no earlier column attends to them. The record lives with the
prompt state: from the rollout to the first backward.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from src.modules.fused_ops import _rope_into, rms_norm_backward


@dataclasses.dataclass
class DecodeRecord:
    """Token-major ``[capacity, B, ...]`` buffers the fused decode step fills at response column ``j`` (the step
    that feeds the ``j``-th sampled token; ``filled`` columns so far): ``hs[i]`` the residual stream entering
    layer ``i`` (``hs[0]`` the embeddings, ``hs[-1]`` the top, before the final norm), and per layer ``qk`` (the
    rotated queries and keys, ``[capacity, B, heads + kv_heads, d]``), ``o`` (the attention output), ``h_mid``
    (the residual stream after the attention) and ``gu`` (the gate/up projection). The step writes them as the
    outputs of the ops that compute them, so recording costs the eager step no extra op."""

    hs: list
    qk: list
    o: list
    h_mid: list
    gu: list
    cos: torch.Tensor  # [capacity, B, d]
    sin: torch.Tensor
    tokens: torch.Tensor  # [capacity, B]: the input token of each column
    filled: int = 0
    keys: list | None = None  # the decode cache's per-layer key and value buffers [B, n_kv, P + capacity, d]
    values: list | None = None

    @staticmethod
    def allocate(step, B: int, capacity: int) -> "DecodeRecord":
        """Empty buffers for a ``FusedDecodeStep``'s model, ``B`` rows and ``capacity`` columns."""
        H = step.embed.shape[1]
        nq, nk, d = step.n_heads, step.n_kv, step.head_dim
        new = step.embed.new_empty
        L = len(step.layers)
        return DecodeRecord(
            hs=[new(capacity, B, H) for _ in range(L + 1)], qk=[new(capacity, B, nq + nk, d) for _ in range(L)],
            o=[new(capacity, B, nq * d) for _ in range(L)], h_mid=[new(capacity, B, H) for _ in range(L)],
            gu=[new(capacity, B, layer[6].shape[0]) for layer in step.layers], cos=new(capacity, B, d),
            sin=new(capacity, B, d), tokens=torch.zeros(capacity, B, dtype=torch.long, device=step.embed.device))

    def column(self, j: int) -> dict:
        """Views of column ``j``, by buffer name (what the eager step writes into)."""
        return {"hs": [x[j] for x in self.hs], "qk": [x[j] for x in self.qk], "o": [x[j] for x in self.o],
                "h_mid": [x[j] for x in self.h_mid], "gu": [x[j] for x in self.gu], "cos": self.cos[j],
                "sin": self.sin[j], "tokens": self.tokens[j]}

    def buffers(self) -> tuple:
        """The buffers in ``fast_decode.decode_body``'s order."""
        return (self.hs, self.qk, self.o, self.h_mid, self.gu, self.cos, self.sin, self.tokens)


def replay_hidden(scorer, state, input_ids_BT: torch.Tensor) -> torch.Tensor | None:
    """The pre-norm top hidden states [B, N, H] of the response columns ``0 .. N-1`` (``N = T - P - 1``, the
    columns whose outputs predict response tokens ``1 .. N``) from ``state.replay``, with ``_ReplayLayers``'s
    backward; None where the record does not cover this call (other tokens, or fewer columns)."""
    rec = getattr(state, "replay", None)
    P = state.width
    N = input_ids_BT.shape[1] - P - 1
    if rec is None or N < 1 or N > rec.filled or input_ids_BT.shape[0] != rec.tokens.shape[1]:
        return None
    if not torch.equal(rec.tokens[:N].t(), input_ids_BT[:, P : P + N]):
        return None
    model = scorer.model
    flat = [w for layer in state.packed for w in layer]
    kv = [t for pair in state.kv for t in pair]
    dims = (scorer.n_heads, scorer.n_kv, scorer.head_dim, scorer.eps, len(state.packed))
    embed = model.model.embed_tokens
    return _ReplayLayers.apply(rec, N, state.attention_mask, dims, embed.padding_idx, embed.weight, *flat, *kv)


class _ReplayLayers(Function):
    """Forward: the recorded top states. Backward: the layers' backward from the records (module docstring).
    Inputs after the constants: the embedding weight, then 8 packed weights per layer (``FusedScorer._pack``'s
    order), then the prompt's keys and values per layer."""

    @staticmethod
    def forward(ctx, rec, N, prompt_mask, dims, padding_idx, embed_w, *tensors):
        L = dims[4]
        ctx.rec, ctx.N, ctx.prompt_mask, ctx.dims, ctx.padding_idx = rec, N, prompt_mask, dims, padding_idx
        ctx.embed_w, ctx.weights, ctx.kv = embed_w, tensors[: 8 * L], tensors[8 * L :]
        ctx.set_materialize_grads(False)
        return rec.hs[-1][:N].transpose(0, 1).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, dh):
        n_const = 5
        rec, N, dims = ctx.rec, ctx.N, ctx.dims
        nq, nk, d, eps, L = dims
        weights, kv = ctx.weights, ctx.kv
        if dh is None:
            return (None,) * (n_const + 1 + len(weights) + len(kv))
        B, H = dh.shape[0], dh.shape[-1]
        G, Q, P = nq // nk, nq * d, ctx.prompt_mask.shape[1]
        R = N * B  # rows, token-major (row n * B + b), as the records are laid out
        scale = d**-0.5
        dh = dh.transpose(0, 1).contiguous()  # [N, B, H]
        cos, sin = rec.cos[:N, :, None], rec.sin[:N, :, None]  # [N, B, 1, d]
        # the additive mask over [prompt columns, response columns] for the response queries
        neg = torch.finfo(dh.dtype).min
        bias = dh.new_zeros(B, N, P + N)
        bias[:, :, :P].masked_fill_(~ctx.prompt_mask.bool()[:, None, :], neg)
        bias[:, :, P:].masked_fill_(torch.ones(N, N, dtype=torch.bool, device=dh.device).triu_(1), neg)
        bias = bias[:, None, None].expand(B, nk, G, N, P + N).reshape(B * nk, G * N, P + N)

        def heads_first(x):  # [N, B, nk * G, d] -> [B * nk, G * N, d], attention's layout
            return x.reshape(N, B, nk, G, d).permute(1, 2, 3, 0, 4).reshape(B * nk, G * N, d)

        d_weights = [None] * len(weights)
        d_kv = [None] * len(kv)
        for i in reversed(range(L)):
            ln1, W, b, Wo, bo, ln2, Wgu, Wd = weights[8 * i : 8 * i + 8]
            dW = [None] * 8
            h_in, h_mid, gu, o = rec.hs[i][:N], rec.h_mid[i][:N], rec.gu[i][:N], rec.o[i][:N]
            g2 = dh.view(R, H)
            # MLP: h_out = h_mid + (silu(gate) * up) Wd^T
            gate, up = gu.chunk(2, dim=-1)
            s = torch.nn.functional.silu(gate)
            dW[7] = g2.t() @ (s * up).view(R, -1)
            da = (g2 @ Wd).view(N, B, -1)
            dgu = torch.cat((torch.ops.aten.silu_backward(da * up, gate), da * s), dim=-1).view(R, -1)
            rstd2 = torch.rsqrt(h_mid.pow(2).mean(-1, keepdim=True).add_(eps))
            x2_hat = h_mid * rstd2
            dW[6] = dgu.t() @ (x2_hat * ln2).view(R, H)
            dh_mid, dW[5] = rms_norm_backward((dgu @ Wgu).view(N, B, H), x2_hat, ln2, rstd2)
            dh_mid += dh
            # attention output projection: h_mid = h_in + o Wo^T (+ bo)
            gm = dh_mid.view(R, H)
            dW[3] = gm.t() @ o.reshape(R, Q)
            if bo is not None:
                dW[4] = gm.sum(0)
            do = heads_first(gm @ Wo)
            # attention, probabilities recomputed: queries [B*nk, G*N, d], keys/values [B*nk, P+N, d]
            kp, vp = kv[2 * i], kv[2 * i + 1]
            K = torch.cat((kp.detach(), rec.keys[i][:, :, P : P + N]), dim=2).reshape(B * nk, P + N, d)
            V = torch.cat((vp.detach(), rec.values[i][:, :, P : P + N]), dim=2).reshape(B * nk, P + N, d)
            qg = heads_first(rec.qk[i][:N, :, :nq])
            p = torch.softmax(torch.baddbmm(bias, qg, K.transpose(1, 2), alpha=scale), dim=-1)
            dV = torch.bmm(p.transpose(1, 2), do).view(B, nk, P + N, d)
            dp = torch.bmm(do, V.transpose(1, 2))
            ds = p.mul_(dp.sub_((dp * p).sum(-1, keepdim=True)))  # p * (dp - rowsum(p dp))
            dq = torch.bmm(ds, K).mul_(scale).view(B, nk, G, N, d).permute(3, 0, 1, 2, 4)  # [N, B, nk, G, d]
            dK = torch.bmm(ds.transpose(1, 2), qg).mul_(scale).view(B, nk, P + N, d)
            d_kv[2 * i], d_kv[2 * i + 1] = dK[:, :, :P], dV[:, :, :P]
            # RoPE's transpose, straight into the packed projection's gradient [dq; dk; dv]
            dy = dh.new_empty(N, B, Q + 2 * nk * d)
            _rope_into(dy[..., :Q].view(N, B, nq, d), dq.reshape(N, B, nq, d), cos, sin, -1.0)
            _rope_into(dy[..., Q : Q + nk * d].view(N, B, nk, d), dK[:, :, P:].permute(2, 0, 1, 3), cos, sin, -1.0)
            dy[..., Q + nk * d :].view(N, B, nk, d).copy_(dV[:, :, P:].permute(2, 0, 1, 3))
            dy2 = dy.view(R, -1)
            rstd1 = torch.rsqrt(h_in.pow(2).mean(-1, keepdim=True).add_(eps))
            x1_hat = h_in * rstd1
            dW[1] = dy2.t() @ (x1_hat * ln1).view(R, H)
            if b is not None:
                dW[2] = dy2.sum(0)
            dh, dW[0] = rms_norm_backward((dy2 @ W).view(N, B, H), x1_hat, ln1, rstd1)
            dh += dh_mid
            d_weights[8 * i : 8 * i + 8] = dW
        tokens = rec.tokens[:N].reshape(-1)
        d_embed = torch.zeros_like(ctx.embed_w)
        g0 = dh.view(R, H)
        if ctx.padding_idx is not None:  # nn.Embedding's padding row gets no gradient
            g0 = g0.masked_fill((tokens == ctx.padding_idx)[:, None], 0.0)
        d_embed.index_add_(0, tokens, g0)
        return (None,) * n_const + (d_embed, *d_weights, *d_kv)
