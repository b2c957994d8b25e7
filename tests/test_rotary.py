"""Rotary embeddings in one Triton kernel against their spec, ``RotaryEmbedding.forward``'s PyTorch code.

Without a GPU the kernel runs in the interpreter (``TRITON_INTERPRET=1``, conftest.py) in float32 against the spec in
float64 and float32, forward and backward; on a GPU (``-m gpu``) bf16 at a real size, and the layer's eager path.
"""

from __future__ import annotations

import pytest
import torch

from headmix import DCMHA
from headmix.layers import rotary as rotary_layer
from headmix.layers.rotary import RotaryEmbedding

kernel = pytest.importorskip("headmix.ops.triton.rotary")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def spec(rot: RotaryEmbedding, x, positions):
    """The PyTorch code (:meth:`RotaryEmbedding.rotate`), whatever the device."""
    return rot.rotate(x, *rot.cos_sin(positions, torch.promote_types(x.dtype, torch.float32)))


# (batch, heads, seq, channels, head_dim, fraction, per-batch positions): a head's full rotation, Pythia's quarter,
# two head-dim blocks in one vector (collaborative attention's shared key), per-row positions (left padding), 80
# channels (DCFormer-2.8B), a sequence that is no multiple of the kernel's position block
CASES = [(2, 3, 5, 64, 64, 1.0, False), (2, 2, 37, 64, 32, 0.5, True), (1, 2, 9, 80, 80, 0.25, False),
         (3, 1, 70, 48, 16, 1.0, True)]


@pytest.mark.parametrize("B,H,T,C,head_dim,fraction,per_batch", CASES)
def test_kernel_matches_spec_forward_and_backward(B, H, T, C, head_dim, fraction, per_batch):
    g = torch.Generator().manual_seed(T + C)
    rot = RotaryEmbedding(head_dim, fraction=fraction)
    positions = torch.randint(0, 3000, (B, T), generator=g) if per_batch else torch.arange(T) + 5
    # (batch, heads, seq, channels) as the layers make it: a transposed view of (batch, seq, heads, channels)
    x = torch.randn(B, T, H, C, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    dy = torch.randn(B, H, T, C, generator=g, dtype=torch.float64)
    expected = spec(rot, x, positions)
    grad, = torch.autograd.grad(expected, x, dy)
    x32 = x.detach().float().transpose(1, 2).contiguous().transpose(1, 2).to(DEVICE).requires_grad_()
    cos, sin = rot.cos_sin(positions.to(DEVICE), torch.float32)
    out = kernel.triton_rotary(x32, cos, sin, head_dim, rot.rot_dim)
    got, = torch.autograd.grad(out, x32, dy.float().to(DEVICE))
    assert out.dtype == torch.float32 and out.stride() == x32.stride()  # the input's layout kept
    x_t = x.detach().float().requires_grad_()
    out_t = spec(rot, x_t, positions)
    torch_run = (out_t, *torch.autograd.grad(out_t, x_t, dy.float()))
    for a, t, b in zip((out, got), torch_run, (expected, grad)):
        err, torch_err = ((c.double().cpu() - b).abs().max() / b.abs().max() for c in (a, t))
        assert err <= max(1e-6, 2 * torch_err), (err, torch_err)
    # the channels past the rotated ones pass through untouched, value and gradient
    blocks = out.detach().cpu().view(B, H, T, C // head_dim, head_dim)[..., rot.rot_dim:]
    assert torch.equal(blocks, x32.detach().cpu().view(B, H, T, C // head_dim, head_dim)[..., rot.rot_dim:])


def test_without_autograd_the_kernel_runs_without_the_autograd_function(monkeypatch):
    calls = []
    real = kernel._Rotate.apply
    monkeypatch.setattr(kernel._Rotate, "apply", lambda *a: calls.append(1) or real(*a))
    rot = RotaryEmbedding(16)
    cos, sin = rot.cos_sin(torch.arange(6, device=DEVICE))
    x = torch.randn(2, 3, 6, 16, device=DEVICE)
    plain = kernel.triton_rotary(x, cos, sin, 16, 16)
    assert plain.grad_fn is None and not calls
    tracked = kernel.triton_rotary(x.requires_grad_(), cos, sin, 16, 16)
    assert calls == [1] and tracked.grad_fn is not None
    assert torch.equal(plain, tracked.detach())


def test_refuses_what_it_cannot_rotate():
    rot = RotaryEmbedding(16)
    cos, sin = rot.cos_sin(torch.arange(6))
    with pytest.raises(ValueError, match=r"x of shape \(2, 3, 6, 24\), head_dim=16"):
        kernel.triton_rotary(torch.ones(2, 3, 6, 24), cos, sin, 16, 16)
    with pytest.raises(ValueError, match=r"tables of shape \(1, 1, 6, 16\).*\(1 or 2, 1, 7, 16\)"):
        kernel.triton_rotary(torch.ones(2, 3, 7, 16), cos, sin, 16, 16)
    with pytest.raises(ValueError, match="tables of dtype torch.float64"):
        kernel.triton_rotary(torch.ones(2, 3, 6, 16), cos.double(), sin.double(), 16, 16)


def test_layers_keep_the_pytorch_code_off_eager_cuda():
    """On the CPU, in float64, for small tensors and inside ``torch.compile`` the layer runs the PyTorch code."""
    f32 = torch.float32
    assert not rotary_layer.kernel_takes(torch.ones(2, 2, 2, 16), f32)
    rot, x = RotaryEmbedding(16), torch.randn(2, 3, 6, 16)
    assert torch.equal(rot(x, torch.arange(6)), spec(rot, x, torch.arange(6)))
    if torch.cuda.is_available():
        big = torch.ones(4, 16, 256, 64, device="cuda")
        assert rotary_layer.kernel_takes(big, f32) and not rotary_layer.kernel_takes(big, torch.float64)
        assert not rotary_layer.kernel_takes(big[:, :, :8], f32)  # under KERNEL_MIN_NUMEL
        seen = []
        torch.compile(lambda t: seen.append(rotary_layer.kernel_takes(t, f32)) or t, backend="eager")(big)
        assert seen == [False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kernel_within_one_rounding_of_the_spec(dtype):
    """Queries of a 405M layer's training batch in bf16/fp16: the kernel's rotation and its gradient are no further
    from the exact rotation of the same low-precision inputs (float64, the same float32 tables) than the PyTorch
    code's (both compute in float32 and round once; fused multiply-adds may move a result by one rounding)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rot = RotaryEmbedding(64)
    x = torch.randn(8, 2048, 16, 64, device="cuda", generator=g).to(dtype).transpose(1, 2).requires_grad_()
    dy = torch.randn(8, 16, 2048, 64, device="cuda", generator=g).to(dtype)
    cos, sin = rot.cos_sin(torch.arange(2048, device="cuda"))
    assert rotary_layer.kernel_takes(x, torch.float32)
    out = rot(x, None, (cos, sin))
    grad, = torch.autograd.grad(out, x, dy)
    ref = rot.rotate(x, cos, sin)
    ref_grad, = torch.autograd.grad(ref, x, dy)
    x64 = x.detach().double().requires_grad_()
    exact = rot.rotate(x64, cos.double(), sin.double())
    exact_grad, = torch.autograd.grad(exact, x64, dy.double())
    assert out.stride() == ref.stride()
    for a, b, c in ((out, ref, exact), (grad, ref_grad, exact_grad)):
        err, torch_err = ((t.double() - c).abs().max().item() for t in (a, b))
        assert err <= max(torch_err, torch.finfo(dtype).eps * c.abs().max().item()), (err, torch_err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_layer_rotates_queries_and_keys_in_the_kernel(monkeypatch):
    """A DCMHA layer at a training size: its queries and keys go through the kernel (spied), forward and backward."""
    calls = []
    real = kernel.triton_rotary
    monkeypatch.setattr(kernel, "triton_rotary", lambda *a: calls.append(1) or real(*a))
    layer = DCMHA(1024, 16, rotary=True, static=False, init="paper").cuda().bfloat16()
    x = torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16).requires_grad_()
    layer(x).float().square().mean().backward()
    assert len(calls) == 2 and torch.isfinite(x.grad).all()
