"""The CPU wing's autograd functions (``src.accel.cpu.ops``) against the plain PyTorch and Hugging Face
expressions they replace."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

from src.accel.cpu.ops import _RMSNorm, rms_norm, rope_heads, swiglu


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def test_rms_norm_matches_qwen2_rmsnorm_and_its_gradients():
    torch.manual_seed(0)
    ref = Qwen2RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
    x = torch.randn(3, 5, 16, requires_grad=True)
    g = torch.randn(3, 5, 16)
    out, expected = rms_norm(x, ref.weight, 1e-6), ref(x)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    for got, want in zip(_grads(out, (x, ref.weight), g), _grads(expected, (x, ref.weight), g)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_rms_norm_backward_gradcheck_and_partial_grads():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-6), (x, w))
    # only the weight needs a gradient (the input is a leaf without one)
    x32, w32 = torch.randn(4, 8), torch.randn(8, requires_grad=True)
    (dw,) = _grads(rms_norm(x32, w32, 1e-6), (w32,), torch.ones(4, 8))
    torch.testing.assert_close(dw, (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).sum(0))


def test_rms_norm_keeps_the_half_precision_recipe():
    torch.manual_seed(2)
    ref = Qwen2RMSNorm(16, eps=1e-6).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(rms_norm(x, ref.weight, 1e-6), ref(x), atol=0, rtol=0)


def _heads_ref(y, cos, sin, nq, nk, d):
    B, T, _ = y.shape
    q = y[..., : nq * d].view(B, T, nq, d).transpose(1, 2)
    k = y[..., nq * d : (nq + nk) * d].view(B, T, nk, d).transpose(1, 2)
    v = y[..., (nq + nk) * d :].view(B, T, nk, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos.squeeze(2), sin.squeeze(2))  # cos/sin [B, T, d] unsqueezed at dim 1
    return q, k, v


@pytest.mark.parametrize("halves_equal", [True, False])
def test_rope_heads_matches_apply_rotary_pos_emb(halves_equal):
    torch.manual_seed(3)
    B, T, nq, nk, d = 2, 5, 4, 2, 8
    y = torch.randn(B, T, (nq + 2 * nk) * d, requires_grad=True)
    if halves_equal:  # the rotary module's form: cat(freqs, freqs)
        ang = torch.randn(B, T, 1, d // 2)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    else:  # the functions must not rely on it
        cos, sin = torch.randn(B, T, 1, d), torch.randn(B, T, 1, d)
    got = rope_heads(y, cos, sin, ((nq, True), (nk, True), (nk, False)), d)
    want = _heads_ref(y, cos, sin, nq, nk, d)
    for a, b in zip(got, want):
        assert a.is_contiguous() and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    gs = [torch.randn_like(t) for t in want]
    (g_got,) = torch.autograd.grad(got, y, gs)
    (g_want,) = torch.autograd.grad(want, y, gs)
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-5)


def test_rope_heads_gradcheck_with_an_unused_output():
    torch.manual_seed(4)
    d = 4
    y = torch.randn(2, 3, 3 * d, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(2, 3, 1, d, dtype=torch.float64), torch.randn(2, 3, 1, d, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: rope_heads(t, cos, sin, ((2, True), (1, False)), d), (y,))
    # only the first group reaches the loss: the other group's columns get zero gradient
    q, v = rope_heads(y, cos, sin, ((2, True), (1, False)), d)
    (g,) = torch.autograd.grad(q.sum(), y)
    assert g[..., 2 * d :].abs().max() == 0 and g[..., : 2 * d].abs().max() > 0


def test_swiglu_matches_silu_gate_times_up():
    torch.manual_seed(5)
    gu = torch.randn(3, 5, 12, requires_grad=True)
    gate, up = gu.chunk(2, -1)
    want, got = F.silu(gate) * up, swiglu(gu)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    g = torch.randn_like(want)
    torch.testing.assert_close(_grads(got, gu, g)[0], _grads(want, gu, g)[0], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(swiglu(gu), want.detach(), atol=0, rtol=0)
    x64 = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (x64,))


def test_no_double_backward_and_bad_groups_are_named():
    x = torch.randn(2, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    (dx,) = torch.autograd.grad(rms_norm(x, w, 1e-6).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):  # once_differentiable: raises instead of a wrong second derivative
        dx.sum().backward()
    y = torch.randn(1, 2, 12)
    with pytest.raises(ValueError, match="do not cover the 12 columns"):
        rope_heads(y, torch.ones(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), ((1, True), (1, False)), 4)
