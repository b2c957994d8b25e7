"""Rotary position embedding ("rotate half") in one Triton kernel, forward and backward; the spec is
:meth:`headmix.layers.rotary.RotaryEmbedding.rotate`, the PyTorch code.

Why it exists: eagerly that code runs about ten elementwise kernels per tensor and as many in the backward (float32
copies of the rotated part and of its rotated half, a concatenation, two products, a sum, the cast back, and the
gradients' zero-filled slices); in a Transformer++-405M training step on an H200 they took ~34 of 138 ms (2026-12-02,
docs/kernels_log.md, "Rotary embeddings in one kernel"). Here one program rotates ``BT`` positions of one (batch, head)
row: it reads the input once, computes in float32 with the same products (``x1 cos - x2 sin``, ``x2 cos + x1 sin``)
and rounds once, as the spec does; the backward is the same kernel rotating the other way. With Triton's fused
multiply-adds (its default) a result may differ from the spec's by one rounding (H200, bf16, the queries of an 8 x
2048-token batch: 1.7e-5 of the numbers, each no further from the exact rotation than the spec's); without them
(``TRITON_DEFAULT_FP_FUSION=0``) the two agree bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_T = 32  # positions per program


@triton.jit
def _rotate_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, T, H, sxb, sxh, sxt, scb, sct, sob, soh, sot,
                   HEAD_DIM: tl.constexpr, HALF: tl.constexpr, REST: tl.constexpr, BLOCKS: tl.constexpr,
                   HALF_P: tl.constexpr, REST_P: tl.constexpr, BLOCKS_P: tl.constexpr, SIGN: tl.constexpr,
                   BT: tl.constexpr):
    """Rows ``t`` of ``x[b, h]``: in each of the ``BLOCKS`` blocks of ``HEAD_DIM`` channels, channel pairs ``(j, j +
    HALF)`` (``j < HALF``) rotate by the angle of ``(t, j)`` (``SIGN`` -1: the other way, the backward); the ``REST``
    channels after the rotated ``2 HALF`` pass through."""
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_t = pid_t * BT + tl.arange(0, BT)
    t_ok = offs_t < T
    col = tl.arange(0, BLOCKS_P * HALF_P)
    blk = col // HALF_P
    j = col % HALF_P
    c_ok = (blk < BLOCKS) & (j < HALF)
    ok = t_ok[:, None] & c_ok[None, :]
    first = blk * HEAD_DIM + j  # channel of the first of a pair, within the row
    x_row = x_ptr + b * sxb + h * sxh + offs_t[:, None].to(tl.int64) * sxt
    o_row = out_ptr + b * sob + h * soh + offs_t[:, None].to(tl.int64) * sot
    x1 = tl.load(x_row + first[None, :], mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + first[None, :] + HALF, mask=ok, other=0.0).to(tl.float32)
    at = b * scb + offs_t[:, None].to(tl.int64) * sct + j[None, :]
    cos = tl.load(cos_ptr + at, mask=ok, other=0.0)
    sin = tl.load(sin_ptr + at, mask=ok, other=0.0) * SIGN
    tl.store(o_row + first[None, :], (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(o_row + first[None, :] + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=ok)
    if REST > 0:
        rcol = tl.arange(0, BLOCKS_P * REST_P)
        rblk = rcol // REST_P
        r = rcol % REST_P
        r_ok = t_ok[:, None] & ((rblk < BLOCKS) & (r < REST))[None, :]
        chan = rblk * HEAD_DIM + 2 * HALF + r
        tl.store(o_row + chan[None, :], tl.load(x_row + chan[None, :], mask=r_ok), mask=r_ok)


def _launch(x: Tensor, cos: Tensor, sin: Tensor, head_dim: int, rot_dim: int, sign: int) -> Tensor:
    B, H, T, C = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x)  # x's layout where dense (a view of (B, T, H, D) projections stays one), else contiguous
    half, rest, blocks = rot_dim // 2, head_dim - rot_dim, C // head_dim
    cos, sin = cos.expand(B, 1, T, cos.shape[-1]), sin.expand(B, 1, T, sin.shape[-1])
    grid = (triton.cdiv(T, BLOCK_T), B * H)
    _rotate_kernel[grid](x, cos, sin, out, T, H, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(2),
                         out.stride(0), out.stride(1), out.stride(2), HEAD_DIM=head_dim, HALF=half, REST=rest,
                         BLOCKS=blocks, HALF_P=triton.next_power_of_2(half),
                         REST_P=triton.next_power_of_2(max(rest, 1)), BLOCKS_P=triton.next_power_of_2(blocks),
                         SIGN=sign, BT=BLOCK_T)
    return out


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, head_dim: int, rot_dim: int) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.dims = head_dim, rot_dim
        return _launch(x, cos, sin, head_dim, rot_dim, 1)

    @staticmethod
    def backward(ctx, dy: Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, *ctx.dims, -1), None, None, None, None


def triton_rotary(x: Tensor, cos: Tensor, sin: Tensor, head_dim: int, rot_dim: int) -> Tensor:
    """``x`` ``(B, H, T, C)`` rotated as :class:`~headmix.layers.rotary.RotaryEmbedding` does (``C`` a multiple of
    ``head_dim``; in each block of ``head_dim`` channels the first ``rot_dim`` rotate), given its float32 tables
    ``cos``, ``sin`` ``(B or 1, 1, T, rot_dim)`` (:meth:`~headmix.layers.rotary.RotaryEmbedding.cos_sin`; only their
    first halves are read). CUDA tensors, or the CPU under ``TRITON_INTERPRET=1``; the tables take no gradient."""
    B, H, T, C = x.shape
    if (C % head_dim or rot_dim % 2 or not 2 <= rot_dim <= head_dim or cos.shape != sin.shape
            or cos.dim() != 4 or cos.shape[0] not in (1, B) or cos.shape[1:] != (1, T, rot_dim)):
        raise ValueError(f"triton_rotary: x of shape {tuple(x.shape)}, head_dim={head_dim}, rot_dim={rot_dim} and "
                         f"tables of shape {tuple(cos.shape)}: expected C a multiple of head_dim, an even rot_dim "
                         f"<= head_dim and tables of shape (1 or {B}, 1, {T}, {rot_dim})")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"triton_rotary: tables of dtype {cos.dtype}/{sin.dtype}: expected torch.float32")
    cos, sin = (t.detach() if t.stride(-1) == 1 else t.detach().contiguous() for t in (cos, sin))
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotate.apply(x, cos, sin, head_dim, rot_dim)
    return _launch(x, cos, sin, head_dim, rot_dim, 1)  # (no autograd function: less host time, e.g. in a prefill)
