"""DCMHA's dynamic weights of a decoding step, packed, in one kernel: the spec is
:meth:`headmix.layers.dcmha.DynamicWeightProjection.forward`'s fields, packed by ``DynamicWeightProjection.rows``.

Why it exists: a compiled decoding step hands the attention kernels the query-side factors and gates as views of one
packed tensor, and the static cache its key-side row. Computed by PyTorch ops, inductor inlines the packed tensor into
each of its views and makes every view a kernel of its own before the attention op reads it (7-8 small kernels per
layer, ~1-2 us each in a CUDA graph): a custom op's output is one buffer, and views of it reach the next op as they
are. The kernel also takes the projection's GELU and its small second product (two more launches per layer).

An eager call without autograd on few positions (a short prefill) takes the same numbers in the fields' own layout
(:func:`dynamic_fields`): one launch where the PyTorch code makes about ten, each a few microseconds of host time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rows_kernel(h_ptr, f_ptr, g_ptr, out_ptr, gates_ptr, n, sht, sgt, eps, P: tl.constexpr, R: tl.constexpr,
                 M: tl.constexpr, K: tl.constexpr, MP: tl.constexpr, RP: tl.constexpr, KP: tl.constexpr,
                 ACC: tl.constexpr, FIELDS: tl.constexpr):
    """One program per (position, side, composition), kind ``c = 2 * composition + side``: the hidden layer
    ``GELU(h[t, c])`` (``K`` numbers), times the kind's factor matrix ``f[c]`` ``(K, 2R * M)``, gives the ``2R`` factor
    rows; the gate row is ``g[t, c]``; the first ``R`` rows RMS-normalised, the gate through ``tanh``; stored as
    ``out[t, side, composition]`` ``(2R + 1, M)``, or with ``FIELDS`` in the fields' own layout: factors ``out[c,
    w, t]`` ``(R, M)`` (``w`` 0: ``w_1``, 1: ``w_2``) and gates ``gates[c, t]`` ``(M,)`` (``n`` positions). Arithmetic
    in ``ACC`` (float32, float64 for float64 inputs), each result rounded to the inputs' dtype where PyTorch's ops
    round it (the hidden layer, the product)."""
    pid = tl.program_id(0)
    t = pid // (2 * P)
    side = (pid // P) % 2
    c = (pid % P) * 2 + side
    dtype = out_ptr.dtype.element_ty
    k = tl.arange(0, KP)
    h = tl.load(h_ptr + t * sht + c * K + k, mask=k < K, other=0.0).to(ACC)
    h = (0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))).to(dtype).to(ACC)  # GELU (erf), rounded
    r = tl.arange(0, RP)[:, None]
    m = tl.arange(0, MP)[None, :]
    ok = (r < 2 * R + 1) & (m < M)
    f = tl.load(f_ptr + c * K * 2 * R * M + k[:, None, None] * (2 * R * M) + (r * M + m)[None, :, :],
                mask=(k < K)[:, None, None] & (ok & (r < 2 * R))[None, :, :], other=0.0).to(ACC)
    y = tl.sum(h[:, None, None] * f, 0).to(dtype).to(ACC)
    y += tl.load(g_ptr + t * sgt + c * M + r * 0 + m, mask=ok & (r == 2 * R), other=0.0).to(ACC)
    rstd = 1.0 / tl.sqrt(tl.sum(y * y, 1) / M + eps)[:, None]
    e = tl.exp(-2.0 * tl.abs(y))  # tanh(|y|) = (1 - e) / (1 + e), no overflow
    tanh = tl.where(y < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e)
    out = tl.where(r < R, y * rstd, tl.where(r < 2 * R, y, tanh))
    if FIELDS:
        w = (r >= R).to(tl.int32)
        tl.store(out_ptr + ((c * 2 + w) * n + t) * (R * M) + (r - w * R) * M + m, out.to(dtype), mask=ok & (r < 2 * R))
        tl.store(gates_ptr + (c * n + t) * M + r * 0 + m, out.to(dtype), mask=ok & (r == 2 * R))
    else:
        tl.store(out_ptr + pid * (2 * R + 1) * M + r * M + m, out.to(dtype), mask=ok)


def _launch(h: Tensor, f: Tensor, g: Tensor, parts: int, rank: int, eps: float, out: Tensor, gates: Tensor) -> None:
    """:func:`_rows_kernel` over every position of ``h``, into ``out`` (packed rows, or with ``gates`` not ``out``
    the fields' layout)."""
    _, K, width = f.shape
    M = width // (2 * rank)
    h, g = (t if t.stride(-1) == 1 else t.contiguous() for t in (h, g))  # (rows at any stride)
    _rows_kernel[(h.shape[0] * 2 * parts,)](h, f.contiguous(), g, out, gates, h.shape[0], h.stride(0), g.stride(0),
                                            eps, P=parts, R=rank, M=M, K=K, MP=triton.next_power_of_2(M),
                                            RP=triton.next_power_of_2(2 * rank + 1), KP=triton.next_power_of_2(K),
                                            ACC=tl.float64 if h.dtype == torch.float64 else tl.float32,
                                            FIELDS=gates is not out)


def _rows(h: Tensor, f: Tensor, g: Tensor, parts: int, rank: int, eps: float) -> Tensor:
    out = torch.empty(h.shape[0], 2, parts, 2 * rank + 1, f.shape[2] // (2 * rank), dtype=h.dtype, device=h.device)
    _launch(h, f, g, parts, rank, eps, out, out)
    return out


_rows_op = torch.library.custom_op("headmix::dynamic_rows", mutates_args=())(_rows)


@_rows_op.register_fake
def _(h, f, g, parts, rank, eps):
    return h.new_empty(h.shape[0], 2, parts, 2 * rank + 1, f.shape[2] // (2 * rank))


def dynamic_rows(h: Tensor, f: Tensor, g: Tensor, parts: int, rank: int, eps: float) -> Tensor:
    """``(B*T, 2, P, 2R + 1, M)``: sides (query, key), compositions, rows ``w_1`` (RMS-normalised), ``w_2``, gate
    (``tanh``), from the hidden layer's products before the GELU ``h`` ``(B*T, 2P*K)``, the factor matrices ``f``
    ``(2P, K, 2R*M)`` and the gate products ``g`` ``(B*T, 2P*M)``, kinds in (composition, side) order. One kernel
    (the custom op ``headmix::dynamic_rows`` when traced, so that a compiled step keeps it one node)."""
    if torch.compiler.is_compiling() or type(h) is not Tensor:
        return _rows_op(h, f, g, parts, rank, eps)
    return _rows(h, f, g, parts, rank, eps)


def dynamic_fields(h: Tensor, f: Tensor, g: Tensor, parts: int, rank: int, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`dynamic_rows`' numbers in the layout of :meth:`headmix.layers.dcmha.DynamicWeightProjection.forward`'s
    fields, each field contiguous: factors ``(2P, 2, B*T, R, M)`` (kind, ``w_1``/``w_2``) and gates ``(2P, B*T, M)``,
    kinds in (composition, side) order. One launch for an eager prefill (where the PyTorch code takes about ten); no
    autograd, not traced (:func:`dynamic_rows` serves compiled steps)."""
    n, M = h.shape[0], f.shape[2] // (2 * rank)
    factors = torch.empty(2 * parts, 2, n, rank, M, dtype=h.dtype, device=h.device)
    gates = torch.empty(2 * parts, n, M, dtype=h.dtype, device=h.device)
    _launch(h, f, g, parts, rank, eps, factors, gates)
    return factors, gates
