"""The RMS norm of short rows (QK-norm, DCMHA's factor norm) against its spec, ``torch.nn.functional.rms_norm``.

Without a GPU the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, conftest.py) in float32 against the
float64 spec, forward and backward; on a GPU (``-m gpu``) bf16 at a real size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headmix import DCMHA
from headmix.layers.base import HeadNorm
from headmix.ops import rms_norm

norm = pytest.importorskip("headmix.ops.triton.norm")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(3, 5, 64), (2, 7, 4, 16), (1, 80), (300, 16), (9, 1), (4, 3, 200)])
@pytest.mark.parametrize("weighted", [True, False])
def test_kernels_match_torch_forward_and_backward(shape, weighted):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g, dtype=torch.float64)).requires_grad_() if weighted else None
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    leaves = [x] + ([w] if weighted else [])
    expected = F.rms_norm(x, (shape[-1],), w, 1e-6)
    grads = torch.autograd.grad(expected, leaves, dy)
    x32 = x.detach().float().to(DEVICE).requires_grad_()
    w32 = w.detach().float().to(DEVICE).requires_grad_() if weighted else None
    out = norm.triton_rms_norm(x32, w32, 1e-6)
    got = torch.autograd.grad(out, [x32] + ([w32] if weighted else []), dy.float().to(DEVICE))
    assert out.shape == expected.shape and out.dtype == torch.float32
    # PyTorch's own float32 error bounds ours where float32 cancels (a row of one number: the gradient is ~eps/x^2)
    x_t = x.detach().float().requires_grad_()
    w_t = w.detach().float().requires_grad_() if weighted else None
    out_t = F.rms_norm(x_t, (shape[-1],), w_t, 1e-6)
    torch_run = (out_t, *torch.autograd.grad(out_t, [x_t] + ([w_t] if weighted else []), dy.float()))
    for a, t, b in zip((out, *got), torch_run, (expected, *grads)):
        err, torch_err = ((c.double().cpu() - b).abs().max() / b.abs().max() for c in (a, t))
        assert err <= max(1e-5, 4 * torch_err), (err, torch_err)


@pytest.mark.parametrize("layout", ["transposed", "column slice"])
def test_rows_out_of_memory_order_and_repeatable(layout):
    """Rows not one after another (a transposed input; a column slice, whose rows a reshape views with a stride) are
    normalised as their contiguous copy; twice, the same bits (the weight's gradient is summed per program, in
    program order)."""
    g = torch.Generator().manual_seed(1)
    if layout == "transposed":
        x = torch.randn(2, 9, 3, 64, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()
    else:
        x = torch.randn(2, 3, 9, 80, generator=g).to(DEVICE)[..., :64].requires_grad_()
    w = torch.randn(64, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(2, 3, 9, 64, generator=g).to(DEVICE)
    runs = [torch.autograd.grad(norm.triton_rms_norm(x, w, 1e-6), (x, w), dy) for _ in range(2)]
    expected = torch.autograd.grad(F.rms_norm(x, (64,), w, 1e-6), (x, w), dy)
    for a, b, c in zip(*runs, expected):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_without_autograd_the_kernel_runs_without_the_autograd_function(monkeypatch):
    """Where nothing needs a gradient (``no_grad``, or inputs that do not require one: a prefill, an evaluation) the
    forward kernel runs without the autograd function (whose Python machinery costs host time a host-bound prefill
    pays), with the same bits; with a gradient to take it goes through it."""
    calls = []
    real = norm._RMSNorm.apply
    monkeypatch.setattr(norm._RMSNorm, "apply", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(6, 5, 64, device=DEVICE), torch.randn(64, device=DEVICE)
    with torch.no_grad():
        plain = norm.triton_rms_norm(x, w, 1e-6)
    assert norm.triton_rms_norm(x, w, 1e-6).grad_fn is None and not calls
    tracked = norm.triton_rms_norm(x, w.requires_grad_(), 1e-6)
    assert calls == [1] and tracked.grad_fn is not None
    assert torch.equal(plain, tracked.detach())


def test_refuses_long_rows_and_mismatched_weights():
    with pytest.raises(ValueError, match="rows of 2048 numbers, expected at most 1024"):
        norm.triton_rms_norm(torch.ones(2, 2048), None, 1e-6)
    with pytest.raises(ValueError, match=r"weight of shape \(32,\) for rows of 64"):
        norm.triton_rms_norm(torch.ones(2, 64), torch.ones(32), 1e-6)


def test_dispatch_keeps_torch_off_eager_cuda():
    """On the CPU (and inside torch.compile, under autocast) :func:`rms_norm` is PyTorch's, bit for bit; so are
    QK-norm and DCMHA's factor norm built on it."""
    x = torch.randn(2, 3, 5, 64)
    w = torch.randn(64)
    assert torch.equal(rms_norm(x, w, 1e-6), F.rms_norm(x, (64,), w, 1e-6))
    head_norm, reference = HeadNorm(64, eps=1e-6), torch.nn.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        head_norm.weight.normal_()
        reference.weight.copy_(head_norm.weight)
    q = torch.randn(2, 7, 4 * 64).view(2, 7, 4, 64).transpose(1, 2)  # (batch, heads, seq, head_dim), as projected
    assert torch.equal(head_norm(q), reference(q))
    layer = DCMHA(dim=64, num_heads=4, qk_norm=True, init="paper")
    assert isinstance(layer.q_norm, HeadNorm)
    torch.compile(lambda t: rms_norm(t, w, 1e-6), backend="eager", fullgraph=True)(x)  # traces PyTorch's


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_qk_norm_matches_torch():
    """QK-norm's shape in bf16 on the GPU: the kernels within bf16 rounding of PyTorch's in float32, forward and
    backward, and what the layer's eager path runs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 2048, 16, 64, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(64, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(8, 2048, 16, 64, device="cuda", generator=g).to(torch.bfloat16)
    out = rms_norm(x, w, 1e-6)
    got = torch.autograd.grad(out, (x, w), dy)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    expected = F.rms_norm(x32, (64,), w32, 1e-6)
    grads = torch.autograd.grad(expected, (x32, w32), dy.float())
    for a, b in zip((out, *got), (expected, *grads)):
        err = ((a.float() - b).abs().max() / b.abs().max()).item()
        assert err <= 1e-2, err
