"""Autograd functions with hand-written backwards for the fused backbone's elementwise work.

On the CPU, a small model's scoring forward and backward spend about half their time outside the matmuls
(``torch.profiler`` shows it), much of it in autograd's generic backwards for elementwise chains: ``F.rms_norm``
decomposed into six ops and their six backwards, RoPE's ``rotate_half`` (slices, a negation, a concatenation), and the ``slice_backward`` of every slice
taken from a packed projection (a zero-filled tensor of the packed width per slice, added up). Each function
here computes the same mathematics as the Hugging Face forward in fewer passes over memory (the same values
in fp32 up to rounding; RoPE's ``addcmul_`` rounds once where the Hugging Face form rounds twice, so in bf16
about a quarter of its elements differ by one unit in the last place), and writes its input's gradient in one
piece. None supports double backward (``once_differentiable``: it raises):

- ``rms_norm(x, w, eps)``: ``w * x * rsqrt(mean(x^2) + eps)`` (fp32; other dtypes keep ``rms_norm_any_dtype``, which
  normalises in fp32 and casts back first, as ``Qwen2RMSNorm`` does);
  backward ``dx = rstd * (g w - x_hat * mean(g w x_hat))``, ``dw = sum(g x_hat)``.
- ``rope_heads(y, cos, sin, groups, head_dim)``: splits a packed projection ``y`` [B, T, heads * d] into head groups
  ``[B, n, T, d]`` (attention's layout), applying ``x * cos + rotate_half(x) * sin`` to the groups marked
  for it; backward applies the transpose, ``g * cos - rotate_half(g * sin)``, straight into ``dy``.
- ``swiglu(gu)``: ``silu(gate) * up`` for ``gu = [gate, up]`` (one packed matmul's output); backward writes
  ``d gate`` and ``d up`` into one tensor.

``tests/test_accel_cpu.py`` checks values and gradients against the plain PyTorch expressions, and the backbone
built on them against the Hugging Face forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable


def rms_norm_any_dtype(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``Qwen2RMSNorm`` / ``LlamaRMSNorm``: normalised in fp32, cast back, then scaled (any dtype, no custom
    backward)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class _RMSNorm(Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, w, rstd)
        return x_hat * w

    @staticmethod
    @once_differentiable  # no double backward (none is needed): raise rather than differentiate wrongly
    def backward(ctx, g):
        x_hat, w, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx = dw = None
        if need_dx:  # dx = rstd * (g w - x_hat * mean(g w x_hat))
            gw = g * w
            dx = gw.sub_(x_hat * (gw * x_hat).mean(-1, keepdim=True)).mul_(rstd)
        if need_dw:
            dw = (g * x_hat).reshape(-1, x_hat.shape[-1]).sum(0)
        return dx, dw, None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``Qwen2RMSNorm`` / ``LlamaRMSNorm`` over the last dimension, with a one-pass backward in fp32."""
    if x.dtype != torch.float32 or w.dtype != torch.float32:
        return rms_norm_any_dtype(x, w, eps)
    if not torch.is_grad_enabled() or not (x.requires_grad or w.requires_grad):
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return _RMSNorm.apply(x, w, eps)


def _rope_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
    """``out = x * cos + sign * rotate_half(x) * sin``; ``sign=-1`` with ``rotate_half``'s transpose is the
    backward (``rotate_half(z) = [-z2, z1]``, its transpose ``[z2, -z1]``)."""
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    if sign > 0:  # [-x2 s1, x1 s2]
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    else:  # transpose: [x2 s2, -x1 s1]
        out[..., :half].addcmul_(x[..., half:], sin[..., half:])
        out[..., half:].addcmul_(x[..., :half], sin[..., :half], value=-1)


class _RopeHeads(Function):
    @staticmethod
    def forward(ctx, y, cos, sin, groups, head_dim):
        B, T, width = y.shape
        if sum(n for n, _ in groups) * head_dim != width:
            raise ValueError(f"rope_heads: groups {groups} x head_dim {head_dim} do not cover the {width} columns")
        ctx.save_for_backward(cos, sin)
        ctx.groups, ctx.head_dim = groups, head_dim
        ctx.set_materialize_grads(False)  # an output the loss does not reach arrives as None
        outs, start = [], 0
        for n, rope in groups:
            x = y[..., start * head_dim : (start + n) * head_dim].view(B, T, n, head_dim)
            out = y.new_empty(B, n, T, head_dim)
            if rope:
                _rope_into(out.transpose(1, 2), x, cos, sin, 1.0)
            else:
                out.transpose(1, 2).copy_(x)
            outs.append(out)
            start += n
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        cos, sin = ctx.saved_tensors
        d = ctx.head_dim
        some = next((g for g in grads if g is not None), None)
        if some is None:
            return None, None, None, None, None
        B, _, T, _ = some.shape
        dy = some.new_empty(B, T, sum(n for n, _ in ctx.groups) * d)
        start = 0
        for (n, rope), g in zip(ctx.groups, grads):
            part = dy[..., start * d : (start + n) * d].view(B, T, n, d)
            if g is None:
                part.zero_()
            elif rope:
                _rope_into(part, g.transpose(1, 2), cos, sin, -1.0)
            else:
                part.copy_(g.transpose(1, 2))
            start += n
        return dy, None, None, None, None


def rope_heads(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: tuple, head_dim: int):
    """Head groups of ``y`` [B, T, sum(n) * d] as contiguous ``[B, n, T, d]`` tensors, one per ``(n, rope)`` of
    ``groups``, rotated (``cos``/``sin`` [B, T, 1, d]) where ``rope``."""
    return _RopeHeads.apply(y, cos, sin, tuple(groups), head_dim)


class _SwiGLU(Function):
    @staticmethod
    def forward(ctx, gu):
        gate, up = gu.chunk(2, dim=-1)
        s = F.silu(gate)
        ctx.save_for_backward(gu, s)
        return s * up

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        gu, s = ctx.saved_tensors
        gate, up = gu.chunk(2, dim=-1)
        return torch.cat((torch.ops.aten.silu_backward(g * up, gate), g * s), dim=-1)


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gu = cat([gate, up], -1)``."""
    if not torch.is_grad_enabled() or not gu.requires_grad:
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
    return _SwiGLU.apply(gu)
