"""DCMHA's dynamic weights of a decoding step, packed, in one kernel: the spec is
:meth:`headmix.layers.dcmha.DynamicWeightProjection.rows` (its PyTorch path).

Why it exists: a compiled decoding step hands the attention kernels the query-side factors and gates as views of one
packed tensor, and the static cache its key-side row. Computed by PyTorch ops, inductor inlines the packed tensor into
each of its views and makes every view a kernel of its own before the attention op reads it (7-8 small kernels per
layer, ~1-2 us each in a CUDA graph, against one here): a custom op's output is one buffer, and views of it reach the
next op as they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rows_kernel(w_ptr, g_ptr, out_ptr, swc, swt, sgt, eps, P: tl.constexpr, R: tl.constexpr, M: tl.constexpr,
                 MP: tl.constexpr, RP: tl.constexpr, ACC: tl.constexpr):
    """One program per (position, side, composition): the ``2R`` factor rows ``w[c, t]`` (``c`` the kind
    ``2 * composition + side``) and the gate row ``g[t, c]`` of ``M`` numbers; the first ``R`` rows RMS-normalised, the
    gate through ``tanh``; stored as ``out[t, side, composition]`` ``(2R + 1, M)``. Arithmetic in ``ACC`` (float32,
    float64 for float64 inputs)."""
    pid = tl.program_id(0)
    t = pid // (2 * P)
    side = (pid // P) % 2
    c = (pid % P) * 2 + side
    r = tl.arange(0, RP)[:, None]
    m = tl.arange(0, MP)[None, :]
    ok = (r < 2 * R + 1) & (m < M)
    y = tl.load(w_ptr + c * swc + t * swt + r * M + m, mask=ok & (r < 2 * R), other=0.0).to(ACC)
    y += tl.load(g_ptr + t * sgt + c * M + r * 0 + m, mask=ok & (r == 2 * R), other=0.0).to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(y * y, 1) / M + eps)[:, None]
    e = tl.exp(-2.0 * tl.abs(y))  # tanh(|y|) = (1 - e) / (1 + e), no overflow
    tanh = tl.where(y < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e)
    out = tl.where(r < R, y * rstd, tl.where(r < 2 * R, y, tanh))
    tl.store(out_ptr + pid * (2 * R + 1) * M + r * M + m, out.to(out_ptr.dtype.element_ty), mask=ok)


def _rows(w: Tensor, g: Tensor, parts: int, rank: int, eps: float) -> Tensor:
    C, BT, width = w.shape
    M = width // (2 * rank)
    if w.stride(2) != 1:
        w = w.contiguous()
    if g.stride(1) != 1:
        g = g.contiguous()
    out = torch.empty(BT, 2, parts, 2 * rank + 1, M, dtype=w.dtype, device=w.device)
    _rows_kernel[(BT * 2 * parts,)](w, g, out, w.stride(0), w.stride(1), g.stride(0), eps, P=parts, R=rank, M=M,
                                    MP=triton.next_power_of_2(M), RP=triton.next_power_of_2(2 * rank + 1),
                                    ACC=tl.float64 if w.dtype == torch.float64 else tl.float32)
    return out


_rows_op = torch.library.custom_op("headmix::dynamic_rows", mutates_args=())(_rows)


@_rows_op.register_fake
def _(w, g, parts, rank, eps):
    return w.new_empty(w.shape[1], 2, parts, 2 * rank + 1, w.shape[2] // (2 * rank))


def dynamic_rows(w: Tensor, g: Tensor, parts: int, rank: int, eps: float) -> Tensor:
    """``(B*T, 2, P, 2R + 1, M)``: sides (query, key), compositions, rows ``w_1`` (RMS-normalised), ``w_2``, gate
    (``tanh``), from the factor products ``w`` ``(2P, B*T, 2R*M)`` and the gate products ``g`` ``(B*T, 2P*M)``, kinds
    in (composition, side) order. One kernel (the custom op ``headmix::dynamic_rows`` when traced, so that a compiled
    step keeps it one node)."""
    if torch.compiler.is_compiling() or type(w) is not Tensor:
        return _rows_op(w, g, parts, rank, eps)
    return _rows(w, g, parts, rank, eps)
