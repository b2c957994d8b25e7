"""RMS normalisation of short rows in Triton, forward and backward: the spec is :func:`torch.nn.functional.rms_norm`.

Why it exists: PyTorch's CUDA ``rms_norm`` (2.11) gives each row a thread block, which at the rows DCFormer++
normalises (QK-norm: a head's 64 channels; the dynamic-weight factors: ``M`` = 16 numbers) leaves the block
mostly idle: on an H200 one QK-norm of 8 x 2048 tokens x 16 heads x 64 (16.8 MB) took 214 us forward, 518 us
forward+backward, against ~7 us to read and write the tensor once (``docs/kernels_log.md``, "RMS norm of short rows").
Here one program normalises ``BR`` rows at once (``BR * BN`` ~ 4096 numbers), float32 arithmetic, one rounding of
the output; the backward recomputes the normalised rows from the saved ``rstd`` and writes the weight's gradient
as a partial sum per program, added in program order on the host (the same bits on every run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

TILE_ELEMENTS = 4096  # numbers per program: BR rows of BN (the row length padded to a power of two)
MAX_ROW = 1024  # longer rows go to PyTorch's kernel (one block per row suits them)


@triton.jit
def _rms_norm_forward(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, N, eps, HAS_WEIGHT: tl.constexpr, BR: tl.constexpr,
                      BN: tl.constexpr):
    """``y = x / sqrt(mean(x^2) + eps) * w`` over rows of ``N``; stores each row's ``rstd``."""
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = tl.arange(0, BN)
    ok = (rows < n_rows)[:, None] & (cols < N)[None, :]
    at = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / N + eps)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_norm_backward(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, N, HAS_WEIGHT: tl.constexpr,
                       BR: tl.constexpr, BN: tl.constexpr):
    """``dx = rstd (g - x_hat mean(g x_hat))`` with ``g = dy w`` and ``x_hat = x rstd``; this program's share of
    ``dw = sum over rows of dy x_hat`` in row ``program_id`` of ``dw_ptr``."""
    pid = tl.program_id(0)
    rows = (pid * BR + tl.arange(0, BR)).to(tl.int64)
    cols = tl.arange(0, BN)
    ok = (rows < n_rows)[:, None] & (cols < N)[None, :]
    at = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
    x_hat = x * rstd[:, None]
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(dw_ptr + pid * N + cols, tl.sum(dy * x_hat, 0), mask=cols < N)
    dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, 1) / N)[:, None])
    tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _tile(N: int) -> tuple[int, int]:
    BN = triton.next_power_of_2(N)
    return max(1, TILE_ELEMENTS // BN), BN


def _forward(x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, x2, rstd)``: the normalised ``x``, its rows as the kernel read them, their ``rstd``."""
    # the kernels read rows one after another: a copy where they are not (reshape alone may give a view whose rows are
    # strided, e.g. of a column slice)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    n_rows, N = x2.shape
    BR, BN = _tile(N)
    y = torch.empty_like(x2)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    w = x2 if weight is None else weight  # (a pointer the kernel does not read without a weight)
    _rms_norm_forward[(triton.cdiv(n_rows, BR),)](x2, w, y, rstd, n_rows, N, eps, HAS_WEIGHT=weight is not None,
                                                  BR=BR, BN=BN)
    return y.view(x.shape), x2, rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        y, x2, rstd = _forward(x, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, N = x2.shape
        BR, BN = _tile(N)
        n_programs = triton.cdiv(n_rows, BR)
        dy2 = dy.reshape(n_rows, N).contiguous()
        dx = torch.empty_like(x2)
        dw = None if weight is None else torch.empty(n_programs, N, dtype=torch.float32, device=x2.device)
        _rms_norm_backward[(n_programs,)](x2, x2 if weight is None else weight, dy2, rstd, dx,
                                          x2 if dw is None else dw, n_rows, N, HAS_WEIGHT=weight is not None,
                                          BR=BR, BN=BN)
        return dx.view(ctx.shape), None if dw is None else dw.sum(0).to(weight.dtype), None


def triton_rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """:func:`torch.nn.functional.rms_norm` over the last dim of ``x`` (up to :data:`MAX_ROW` numbers), with an
    optional ``weight`` of that length, on the kernels above (CUDA tensors, or the CPU under ``TRITON_INTERPRET=1``)."""
    if x.shape[-1] > MAX_ROW:
        raise ValueError(f"triton_rms_norm: rows of {x.shape[-1]} numbers, expected at most {MAX_ROW}")
    if weight is not None and weight.shape != (x.shape[-1],):
        raise ValueError(f"triton_rms_norm: weight of shape {tuple(weight.shape)} for rows of {x.shape[-1]}: "
                         f"expected ({x.shape[-1]},)")
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return _RMSNorm.apply(x, weight, float(eps))
    return _forward(x, weight, float(eps))[0]  # (no autograd function: less host time, e.g. in a prefill)
