"""The ``@triton.jit`` tile helpers shared by the forward and backward kernels (see :mod:`headmix.ops.triton`)."""

from __future__ import annotations

import triton
import triton.language as tl

NEG = tl.constexpr(-1.0e30)

# Which Compose terms are present: bit i of a kernel's PRE / POST flags is field i of FIELDS (launch.py).
STATIC = tl.constexpr(1)  # static head mix W
QUERY_LOWRANK = tl.constexpr(2)  # query_w1 (and query_w2, bit 2, always with it)
KEY_LOWRANK = tl.constexpr(8)  # key_w1 (and key_w2, bit 4)
QUERY_GATE = tl.constexpr(32)
KEY_GATE = tl.constexpr(64)


# -- tile helpers ------------------------------------------------------------------------------------
# Compose in the rank-R form, on the tile's own (MP, BM, BN) layout (heads, queries, keys): at query i and key j
#   y[m] = x[m] + sum_n W[n, m] x[n] + sum_r w2q[i, r, m] h_r + sum_r w2k[j, r, m] h'_r + (gq[i, m] + gk[j, m]) x[m]
# with h_r = sum_n w1q[i, r, n] x[n] (a reduction over the heads axis, tl.sum(axis 0)) and h'_r likewise with
# the key-wise factors. The rank-R terms and gates are element-wise float32 work (about 2 R M multiply-adds per
# pair and side, no layout change); only the static mix W, one (MP, MP) matrix for every position, is a
# product: (MP, MP) @ (MP, BM * BN), on tensor cores from 16 heads. The adjoint (backward) swaps the two factors
# and transposes W. Gradients per position: dw1[i, r, n] = sum_j x[n] dh_r, dw2[i, r, m] = sum_j dy[m] h_r,
# dg[i, m] = sum_j dy[m] x[m] (key side: summed over queries), dW = sum over the tile of x dy^T.
@triton.jit
def _factor(ptr, b, g, r, offs, hm, L, G: tl.constexpr, R: tl.constexpr, M: tl.constexpr):
    """A per-position factor ``(B, L, G, R, M)`` at rank ``r`` (a gate ``(B, L, G, M)``: ``R=1, r=0``) as an
    ``(MP, BLOCK)`` tile (heads, positions ``offs``); zero outside the real heads and positions."""
    p = ptr + (((b * L + offs[None, :]) * G + g) * R + r) * M + hm[:, None]
    return tl.load(p, mask=(hm < M)[:, None] & (offs < L)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _static_mix(x, w_ptr, g, hm, M: tl.constexpr, ADJOINT: tl.constexpr, MIX: tl.constexpr):
    """``sum_n W[n, m] x[n]`` (``ADJOINT``: ``sum_n W[m, n] x[n]``) for every head ``m`` of an ``(MP, BM, BN)``
    tile: one ``(MP, MP) @ (MP, BM * BN)`` tensor-core product from 16 heads, else unrolled over the heads."""
    base = w_ptr + g * M * M
    h_ok = hm < M
    if x.shape[0] >= 16:
        if ADJOINT:  # a[m, n] = W[m, n]
            a = tl.load(base + hm[:, None] * M + hm[None, :], mask=h_ok[:, None] & h_ok[None, :], other=0.0)
        else:  # a[m, n] = W[n, m]
            a = tl.load(base + hm[None, :] * M + hm[:, None], mask=h_ok[:, None] & h_ok[None, :], other=0.0)
        x2 = tl.reshape(x, (x.shape[0], x.shape[1] * x.shape[2]))
        if MIX == "bf16":
            y = tl.dot(a.to(tl.bfloat16), x2.to(tl.bfloat16))
        else:
            y = tl.dot(a.to(tl.float32), x2.to(tl.float32), input_precision=MIX)
        out = tl.reshape(y, (x.shape[0], x.shape[1], x.shape[2]))
    else:
        out = tl.zeros_like(x)
        for n in tl.static_range(M):
            xn = tl.sum(tl.where((hm == n)[:, None, None], x, 0.0), 0)
            if ADJOINT:
                col = tl.load(base + hm * M + n, mask=h_ok, other=0.0).to(tl.float32)
            else:
                col = tl.load(base + n * M + hm, mask=h_ok, other=0.0).to(tl.float32)
            out += col[:, None, None] * xn[None, :, :]
    return out


@triton.jit
def _compose(x, cw, b, g, offs_i, offs_j, hm, T, S, G: tl.constexpr, M: tl.constexpr, R: tl.constexpr,
             FLAGS: tl.constexpr, ADJOINT: tl.constexpr, MIX: tl.constexpr):
    """Compose (``ADJOINT``: its adjoint, what the backward pass needs) on an ``(MP, BM, BN)`` tile ``x`` at
    queries ``offs_i`` and keys ``offs_j``. ``cw`` holds the Compose's 7 pointers (static, qw1, qw2, kw1, kw2,
    qg, kg); ``FLAGS`` says which are present (bit ``k``: pointer ``k``)."""
    w_ptr, qw1, qw2, kw1, kw2, qg, kg = cw
    x = x.to(tl.float32)
    out = x
    if STATIC & FLAGS:
        out += _static_mix(x, w_ptr, g, hm, M, ADJOINT, MIX)
    if QUERY_LOWRANK & FLAGS:
        for r in tl.static_range(R):
            a = _factor(qw1, b, g, r, offs_i, hm, T, G, R, M)
            c = _factor(qw2, b, g, r, offs_i, hm, T, G, R, M)
            if ADJOINT:
                a, c = c, a
            out += c[:, :, None] * tl.sum(x * a[:, :, None], 0)[None, :, :]
    if KEY_LOWRANK & FLAGS:
        for r in tl.static_range(R):
            a = _factor(kw1, b, g, r, offs_j, hm, S, G, R, M)
            c = _factor(kw2, b, g, r, offs_j, hm, S, G, R, M)
            if ADJOINT:
                a, c = c, a
            out += c[:, None, :] * tl.sum(x * a[:, None, :], 0)[None, :, :]
    if QUERY_GATE & FLAGS:
        out += _factor(qg, b, g, 0, offs_i, hm, T, G, 1, M)[:, :, None] * x
    if KEY_GATE & FLAGS:
        out += _factor(kg, b, g, 0, offs_j, hm, S, G, 1, M)[:, None, :] * x
    return out


@triton.jit
def _side_grads(d1, d2, dg, x, dy, cw, b, g, offs_i, offs_j, hm, T, S, G: tl.constexpr, M: tl.constexpr,
                R: tl.constexpr, FLAGS: tl.constexpr, QUERY_SIDE: tl.constexpr):
    """Accumulate one side's per-position weight gradients of ``y = Compose(x)`` with upstream ``dy`` (both
    ``(MP, BM, BN)``): ``d1``, ``d2`` ``(RP, MP, BLOCK)`` the two factors' (rank on axis 0), ``dg``
    ``(MP, BLOCK)`` the gate's; ``BLOCK`` is the query block (summed over the tile's keys) or the key block
    (``QUERY_SIDE=False``, summed over its queries)."""
    w_ptr, qw1, qw2, kw1, kw2, qg, kg = cw
    x = x.to(tl.float32)
    dy = dy.to(tl.float32)
    rr = tl.arange(0, d1.shape[0])
    if QUERY_SIDE:
        if QUERY_LOWRANK & FLAGS:
            for r in tl.static_range(R):
                a = _factor(qw1, b, g, r, offs_i, hm, T, G, R, M)
                c = _factor(qw2, b, g, r, offs_i, hm, T, G, R, M)
                h = tl.sum(x * a[:, :, None], 0)  # (BM, BN)
                dh = tl.sum(dy * c[:, :, None], 0)
                d1 += tl.where((rr == r)[:, None, None], tl.sum(x * dh[None, :, :], 2)[None, :, :], 0.0)
                d2 += tl.where((rr == r)[:, None, None], tl.sum(dy * h[None, :, :], 2)[None, :, :], 0.0)
        if QUERY_GATE & FLAGS:
            dg += tl.sum(dy * x, 2)
    else:
        if KEY_LOWRANK & FLAGS:
            for r in tl.static_range(R):
                a = _factor(kw1, b, g, r, offs_j, hm, S, G, R, M)
                c = _factor(kw2, b, g, r, offs_j, hm, S, G, R, M)
                h = tl.sum(x * a[:, None, :], 0)
                dh = tl.sum(dy * c[:, None, :], 0)
                d1 += tl.where((rr == r)[:, None, None], tl.sum(x * dh[None, :, :], 1)[None, :, :], 0.0)
                d2 += tl.where((rr == r)[:, None, None], tl.sum(dy * h[None, :, :], 1)[None, :, :], 0.0)
        if KEY_GATE & FLAGS:
            dg += tl.sum(dy * x, 1)
    return d1, d2, dg


@triton.jit
def _static_grad(dw, x, dy, hm, MIX: tl.constexpr):
    """``dw[m, n] += sum over the tile of x[m] dy[n]`` (``(MP, MP)``, the static mix's gradient): one
    ``(MP, BM * BN) @ (BM * BN, MP)`` tensor-core product from 16 heads, else unrolled over the heads."""
    if x.shape[0] >= 16:
        x2 = tl.reshape(x, (x.shape[0], x.shape[1] * x.shape[2]))
        dy2 = tl.reshape(dy, (x.shape[0], x.shape[1] * x.shape[2]))
        if MIX == "bf16":
            dw += tl.dot(x2.to(tl.bfloat16), tl.trans(dy2.to(tl.bfloat16)))
        else:
            dw += tl.dot(x2.to(tl.float32), tl.trans(dy2.to(tl.float32)), input_precision=MIX)
    else:
        x = x.to(tl.float32)
        dy = dy.to(tl.float32)
        for n in tl.static_range(x.shape[0]):
            dyn = tl.sum(tl.where((hm == n)[:, None, None], dy, 0.0), 0)
            col = tl.sum(tl.sum(x * dyn[None, :, :], 2), 1)
            dw += tl.where((hm == n)[None, :], col[:, None], 0.0)
    return dw


@triton.jit
def _store_side_grads(d1, d2, dg, cw_grads, b, g, offs, ok, L, G: tl.constexpr, M: tl.constexpr, R: tl.constexpr,
                      LOWRANK: tl.constexpr, GATE: tl.constexpr):
    """Store :func:`_side_grads`' accumulators into the float32 gradients ``cw_grads = (dw1, dw2, dg)``
    (``(B, L, G, R, M)``, ``(B, L, G, R, M)``, ``(B, L, G, M)``) at positions ``offs``; ``ok`` ``(MP, BLOCK)``."""
    p1, p2, pg = cw_grads
    hm = tl.arange(0, d1.shape[1])
    if LOWRANK:
        rr = tl.arange(0, d1.shape[0])
        p = (((b * L + offs[None, None, :]) * G + g) * R + rr[:, None, None]) * M + hm[None, :, None]
        m = (rr < R)[:, None, None] & ok[None, :, :]
        tl.store(p1 + p, d1, mask=m)
        tl.store(p2 + p, d2, mask=m)
    if GATE:
        tl.store(pg + ((b * L + offs[None, :]) * G + g) * M + hm[:, None], dg, mask=ok)


@triton.jit
def _store_static_grad(part, dw, hm, M: tl.constexpr):
    """This program's share of ``dW`` (``(MP, MP)``) into ``part`` ``(M, M)``."""
    h_ok = hm < M
    tl.store(part + hm[:, None] * M + hm[None, :], dw, mask=h_ok[:, None] & h_ok[None, :])


@triton.jit
def _valid(b, offs_i, offs_j, T, S, off, mask_ptr, smb, smt, sms,
           CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr):
    """``(BM, BN)`` "may attend": bounds, causal/window structure (query ``i`` sits at key ``i + off``), mask."""
    ok = (offs_i[:, None] < T) & (offs_j[None, :] < S)
    pos = offs_i[:, None] + off
    if CAUSAL:
        ok = ok & (offs_j[None, :] <= pos)
    if WINDOW > 0:
        ok = ok & (pos - offs_j[None, :] < WINDOW)
        if not CAUSAL:
            ok = ok & (offs_j[None, :] - pos < WINDOW)
    if HAS_MASK:
        m = tl.load(mask_ptr + b * smb + offs_i[:, None] * smt + offs_j[None, :] * sms, mask=ok, other=0)
        ok = ok & (m != 0)
    return ok


@triton.jit
def _heads(ptr, b, g, offs, d, sb, sh, st, sd, n, M: tl.constexpr, hm, rep, dn):
    """Rows ``offs`` of every head of group ``g`` as an ``(MP, BLOCK, D)`` tile. ``rep``: query heads per stored
    head (grouped-query keys and values: query head ``h`` reads head ``h // rep``); ``dn``: the real head dim
    (``D`` is padded to a power of two; the padding reads as zeros)."""
    h = (g * M + hm) // rep
    p = ptr + b * sb + h[:, None, None] * sh + offs[None, :, None] * st + d[None, None, :] * sd
    return tl.load(p, mask=(hm < M)[:, None, None] & (offs < n)[None, :, None] & (d < dn)[None, None, :], other=0.0)


@triton.jit
def _key_range(start_i, T, S, off, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Keys ``[lo, hi)`` (``lo`` a multiple of ``BN``) that queries ``start_i .. start_i + BM`` may see."""
    lo = 0
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, tl.maximum(0, start_i + BM + off))
    if WINDOW > 0:
        lo = tl.maximum(0, start_i + off - WINDOW + 1)
        lo = (lo // BN) * BN
        if not CAUSAL:
            hi = tl.minimum(S, tl.maximum(0, start_i + BM - 1 + off + WINDOW))
    return lo, hi


@triton.jit
def _query_range(start_j, T, S, off, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
                 WINDOW: tl.constexpr):
    """Queries ``[lo, hi)`` (``lo`` a multiple of ``BM``) that may see keys ``start_j .. start_j + BN``."""
    lo = 0
    hi = T
    if CAUSAL:
        lo = tl.maximum(0, start_j - off)
    if WINDOW > 0:
        hi = tl.minimum(T, tl.maximum(0, start_j + BN + WINDOW - 1 - off))
        if not CAUSAL:
            lo = tl.maximum(0, start_j - off - WINDOW + 1)
    lo = (lo // BM) * BM
    return lo, hi
