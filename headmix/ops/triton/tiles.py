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
QUERY_TERMS = tl.constexpr(1 | 2 | 32)  # the terms folded into the per-query matrices E_i
KEY_TERMS = tl.constexpr(8 | 64)  # the terms folded into the per-key matrices F_j


# -- tile helpers ------------------------------------------------------------------------------------
# Compose as per-position head-mixing matrices. At query i and key j a Compose maps the heads' vector
# x[:, i, j] to x + E_i x + F_j x, where E_i (query side) = W^T + sum_r w2_r w1_r^T + diag(g_q) holds the
# static mix, the query-wise rank-R term and the query gate, and F_j (key side) = sum_r w2_r w1_r^T + diag(g_k)
# the key-wise terms. E is built once per query block and F once per key block, so every term of the
# Compose becomes one batched (heads x heads) @ (heads x block) tensor-core product per tile, and the
# gradients of all of them follow from dE_i = sum_j dy x^T and dF_j = sum_i dy x^T (two more products).
@triton.jit
def _rows(ptr, b, g, r, offs, hm, ok, L, G: tl.constexpr, R: tl.constexpr, M: tl.constexpr):
    """A per-position factor ``(B, L, G, R, M)`` at rank ``r`` (a gate ``(B, L, G, M)``: ``R=1, r=0``) as a
    ``(BLOCK, MP)`` tile."""
    p = ptr + (((b * L + offs[:, None]) * G + g) * R + r) * M + hm[None, :]
    return tl.load(p, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _operand(x, MIX: tl.constexpr):
    """``x`` in the dtype the mixing products read (bf16 unless ``MIX`` asks for float32 operands)."""
    if MIX == "bf16":
        x = x.to(tl.bfloat16)
    return x


@triton.jit
def _bmm(a, b, MIX: tl.constexpr):
    """Batched ``(Z, P, K) @ (Z, K, N)`` with float32 accumulation: one tensor-core product when every dim is
    at least 16 (``MIX``: "ieee" exact float32, "tf32", or "bf16" operands), else unrolled over the small dim
    (head groups of fewer than 16 heads)."""
    if a.shape[1] >= 16 and a.shape[2] >= 16 and b.shape[2] >= 16:
        if MIX == "bf16":
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=MIX)
    else:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        out = tl.zeros((a.shape[0], a.shape[1], b.shape[2]), dtype=tl.float32)
        if a.shape[2] <= b.shape[2]:  # outer products over the contracted dim
            kk = tl.arange(0, a.shape[2])
            for k in tl.static_range(a.shape[2]):
                col = tl.sum(tl.where((kk == k)[None, None, :], a, 0.0), 2)
                row = tl.sum(tl.where((kk == k)[None, :, None], b, 0.0), 1)
                out += col[:, :, None] * row[:, None, :]
        else:  # one output column at a time
            nn = tl.arange(0, b.shape[2])
            for n in tl.static_range(b.shape[2]):
                bn = tl.sum(tl.where((nn == n)[None, None, :], b, 0.0), 2)
                out += tl.where((nn == n)[None, None, :], tl.sum(a * bn[:, None, :], 2)[:, :, None], 0.0)
    return out


@triton.jit
def _matrices(cw, b, g, offs, hm, ok, L, G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, R: tl.constexpr,
              BLOCK: tl.constexpr, FLAGS: tl.constexpr, QUERY_SIDE: tl.constexpr, MIX: tl.constexpr):
    """One side's mixing matrices ``(BLOCK, MP, MP)`` at positions ``offs`` (``E`` for the query side, ``F``
    for the key side): entry ``[p, n, m]`` is what head ``m`` adds to head ``n``. ``cw`` holds the Compose's
    7 pointers (static, qw1, qw2, kw1, kw2, qg, kg); ``FLAGS`` says which are present (bit ``k``: pointer
    ``k``)."""
    w_ptr, qw1, qw2, kw1, kw2, qg, kg = cw
    if QUERY_SIDE:
        w1, w2, gp, LOWRANK, GATE = qw1, qw2, qg, QUERY_LOWRANK & FLAGS, QUERY_GATE & FLAGS
    else:
        w1, w2, gp, LOWRANK, GATE = kw1, kw2, kg, KEY_LOWRANK & FLAGS, KEY_GATE & FLAGS
    e = tl.zeros((BLOCK, MP, MP), dtype=tl.float32)
    h_ok = hm < M
    if QUERY_SIDE:
        if STATIC & FLAGS:
            wt = tl.load(w_ptr + g * M * M + hm[None, :] * M + hm[:, None], mask=h_ok[:, None] & h_ok[None, :],
                         other=0.0)
            e += wt.to(tl.float32)[None, :, :]
    if LOWRANK:
        for r in tl.static_range(R):
            a = _rows(w1, b, g, r, offs, hm, ok, L, G, R, M)
            c = _rows(w2, b, g, r, offs, hm, ok, L, G, R, M)
            e += c[:, :, None] * a[:, None, :]
    if GATE:
        gt = _rows(gp, b, g, 0, offs, hm, ok, L, G, 1, M)
        e += tl.where((hm[:, None] == hm[None, :])[None, :, :], gt[:, :, None], 0.0)
    return _operand(e, MIX)


@triton.jit
def _compose(x, eq, ek, FLAGS: tl.constexpr, MIX: tl.constexpr):
    """Compose on an ``(MP, BM, BN)`` tile: ``x + E_i x + F_j x`` from the per-query matrices ``eq``
    ``(BM, MP, MP)`` and per-key ``ek`` ``(BN, MP, MP)`` (see :func:`_matrices`). The adjoint (what the
    backward pass needs) is the same call with both transposed."""
    out = x
    if QUERY_TERMS & FLAGS:  # static, query-wise, query gate
        out += tl.permute(_bmm(eq, _operand(tl.permute(x, (1, 0, 2)), MIX), MIX), (1, 0, 2))
    if KEY_TERMS & FLAGS:  # key-wise, key gate
        out += tl.permute(_bmm(ek, _operand(tl.permute(x, (2, 0, 1)), MIX), MIX), (1, 2, 0))
    return out


@triton.jit
def _t(e):
    """Per-position matrices transposed (the adjoint Compose)."""
    return tl.permute(e, (0, 2, 1))


@triton.jit
def _grad_matrices(acc, x, dy, QUERY_SIDE: tl.constexpr, MIX: tl.constexpr):
    """``acc += dE``: for ``y = Compose(x)`` with upstream ``dy`` (both ``(MP, BM, BN)``), the gradient of one
    side's per-position matrices, ``sum_j dy[:, i, j] x[:, i, j]^T`` per query ``i`` (or per key, summed over
    queries)."""
    if QUERY_SIDE:
        acc += _bmm(_operand(tl.permute(dy, (1, 0, 2)), MIX), _operand(tl.permute(x, (1, 2, 0)), MIX), MIX)
    else:
        acc += _bmm(_operand(tl.permute(dy, (2, 0, 1)), MIX), _operand(tl.permute(x, (2, 1, 0)), MIX), MIX)
    return acc


@triton.jit
def _store_side_grads(gm, cw, d1, d2, dg, b, g, offs, hm, ok, L, G: tl.constexpr, M: tl.constexpr,
                      R: tl.constexpr, FLAGS: tl.constexpr, QUERY_SIDE: tl.constexpr):
    """From ``gm = dE`` (or ``dF``) ``(BLOCK, MP, MP)``: gradients of the side's two factors (``(B, L, G, R, M)``
    float32) and gate (``(B, L, G, M)``) at positions ``offs``. ``E += w2_r w1_r^T`` gives
    ``dw1_r = dE^T w2_r`` and ``dw2_r = dE w1_r``; ``E += diag(g)`` gives ``dg = diag(dE)``."""
    w_ptr, qw1, qw2, kw1, kw2, qg, kg = cw
    if QUERY_SIDE:
        w1, w2, LOWRANK, GATE = qw1, qw2, QUERY_LOWRANK & FLAGS, QUERY_GATE & FLAGS
    else:
        w1, w2, LOWRANK, GATE = kw1, kw2, KEY_LOWRANK & FLAGS, KEY_GATE & FLAGS
    if LOWRANK:
        for r in tl.static_range(R):
            a = _rows(w1, b, g, r, offs, hm, ok, L, G, R, M)
            c = _rows(w2, b, g, r, offs, hm, ok, L, G, R, M)
            p = (((b * L + offs[:, None]) * G + g) * R + r) * M + hm[None, :]
            tl.store(d1 + p, tl.sum(gm * c[:, :, None], 1), mask=ok)
            tl.store(d2 + p, tl.sum(gm * a[:, None, :], 2), mask=ok)
    if GATE:
        diag = tl.sum(tl.where((hm[:, None] == hm[None, :])[None, :, :], gm, 0.0), 2)
        tl.store(dg + ((b * L + offs[:, None]) * G + g) * M + hm[None, :], diag, mask=ok)


@triton.jit
def _store_static_grad(part, gm, hm, M: tl.constexpr):
    """``dW[m, n] = sum_i dE[i, n, m]`` (this program's share) into ``part`` ``(M, M)``."""
    h_ok = hm < M
    tl.store(part + hm[None, :] * M + hm[:, None], tl.sum(gm, 0), mask=h_ok[:, None] & h_ok[None, :])


# -- the rank-R form (more than 16 heads per group: the backward kernels; docs/kernels_log.md, "32 heads per group") --
# The same Compose on the tile's own (MP, BM, BN) layout (heads, queries, keys), without per-position matrices: at
# query i and key j
#   y[m] = x[m] + sum_n W[n, m] x[n] + sum_r w2q[i, r, m] h_r + sum_r w2k[j, r, m] h'_r + (gq[i, m] + gk[j, m]) x[m]
# with h_r = sum_n w1q[i, r, n] x[n] (a reduction over the heads axis) and h'_r likewise with the key-wise factors:
# float32 element-wise work and reductions, about 2 R M multiply-adds per pair and side; the static mix W is one
# (MP, MP) @ (MP, BM * BN) product. The adjoint swaps the two factors and transposes W. Gradients per position:
# dw1[i, r, n] = sum_j x[n] dh_r, dw2[i, r, m] = sum_j dy[m] h_r, dg[i, m] = sum_j dy[m] x[m] (key side: summed over
# queries), dW = sum over the tile of x dy^T. No (BLOCK, MP, MP) tiles: at 32 heads those (and their layout
# changes) need more shared memory than an H100/H200 has.
@triton.jit
def _factor(ptr, b, g, r, offs, hm, L, G: tl.constexpr, R: tl.constexpr, M: tl.constexpr):
    """A per-position factor ``(B, L, G, R, M)`` at rank ``r`` (a gate ``(B, L, G, M)``: ``R=1, r=0``) as an
    ``(MP, BLOCK)`` tile (heads, positions ``offs``); zero outside the real heads and positions."""
    p = ptr + (((b * L + offs[None, :]) * G + g) * R + r) * M + hm[:, None]
    return tl.load(p, mask=(hm < M)[:, None] & (offs < L)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _static_mix(x, w_ptr, g, hm, M: tl.constexpr, ADJOINT: tl.constexpr, MIX: tl.constexpr):
    """``sum_n W[n, m] x[n]`` (``ADJOINT``: ``sum_n W[m, n] x[n]``) for every head ``m`` of an ``(MP, BM, BN)``
    tile ``x`` (at least 16 heads): one ``(MP, MP) @ (MP, BM * BN)`` tensor-core product."""
    base = w_ptr + g * M * M
    h_ok = hm < M
    if ADJOINT:  # a[m, n] = W[m, n]
        a = tl.load(base + hm[:, None] * M + hm[None, :], mask=h_ok[:, None] & h_ok[None, :], other=0.0)
    else:  # a[m, n] = W[n, m]
        a = tl.load(base + hm[None, :] * M + hm[:, None], mask=h_ok[:, None] & h_ok[None, :], other=0.0)
    x2 = tl.reshape(x, (x.shape[0], x.shape[1] * x.shape[2]))
    if MIX == "bf16":
        y = tl.dot(a.to(tl.bfloat16), x2.to(tl.bfloat16))
    else:
        y = tl.dot(a.to(tl.float32), x2.to(tl.float32), input_precision=MIX)
    return tl.reshape(y, (x.shape[0], x.shape[1], x.shape[2]))


@triton.jit
def _compose_rank(x, cw, b, g, offs_i, offs_j, hm, T, S, G: tl.constexpr, M: tl.constexpr, R: tl.constexpr,
                  FLAGS: tl.constexpr, ADJOINT: tl.constexpr, MIX: tl.constexpr):
    """Compose in the rank-R form (``ADJOINT``: its adjoint) on an ``(MP, BM, BN)`` tile ``x`` at queries ``offs_i``
    and keys ``offs_j``; ``cw`` the Compose's 7 pointers, ``FLAGS`` which are present (as :func:`_matrices`)."""
    w_ptr, qw1, qw2, kw1, kw2, qg, kg = cw
    x = x.to(tl.float32)
    out = x
    if STATIC & FLAGS:
        out += _static_mix(x, w_ptr, g, hm, M, ADJOINT, MIX)
    for side in tl.static_range(2):  # 0: the query-wise low-rank term (spread over the keys, axis 2); 1: key-wise
        if side == 0:
            w1, w2, offs, L, LOWRANK = qw1, qw2, offs_i, T, QUERY_LOWRANK & FLAGS
        else:
            w1, w2, offs, L, LOWRANK = kw1, kw2, offs_j, S, KEY_LOWRANK & FLAGS
        if LOWRANK:
            for r in tl.static_range(R):
                a = _factor(w1, b, g, r, offs, hm, L, G, R, M)
                c = _factor(w2, b, g, r, offs, hm, L, G, R, M)
                if ADJOINT:
                    a, c = c, a
                out += tl.expand_dims(c, 2 - side) * tl.sum(x * tl.expand_dims(a, 2 - side), 0)[None, :, :]
    if QUERY_GATE & FLAGS:
        out += _factor(qg, b, g, 0, offs_i, hm, T, G, 1, M)[:, :, None] * x
    if KEY_GATE & FLAGS:
        out += _factor(kg, b, g, 0, offs_j, hm, S, G, 1, M)[:, None, :] * x
    return out


@triton.jit
def _rank_grads(d1, d2, dg, x, dy, cw, b, g, offs_i, offs_j, hm, T, S, G: tl.constexpr, M: tl.constexpr,
                R: tl.constexpr, FLAGS: tl.constexpr, QUERY_SIDE: tl.constexpr):
    """Accumulate one side's per-position weight gradients of ``y = Compose(x)`` (rank-R form) with upstream ``dy``
    (both ``(MP, BM, BN)``): ``d1``, ``d2`` ``(RP, MP, BLOCK)`` the two factors' (rank on axis 0), ``dg``
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
def _static_grad(dw, x, dy, MIX: tl.constexpr):
    """``dw[m, n] += sum over the tile of x[m] dy[n]`` (``(MP, MP)``, the static mix's gradient, rank-R form): one
    ``(MP, BM * BN) @ (BM * BN, MP)`` tensor-core product."""
    x2 = tl.reshape(x, (x.shape[0], x.shape[1] * x.shape[2]))
    dy2 = tl.reshape(dy, (x.shape[0], x.shape[1] * x.shape[2]))
    if MIX == "bf16":
        dw += tl.dot(x2.to(tl.bfloat16), tl.trans(dy2.to(tl.bfloat16)))
    else:
        dw += tl.dot(x2.to(tl.float32), tl.trans(dy2.to(tl.float32)), input_precision=MIX)
    return dw


@triton.jit
def _store_rank_grads(d1, d2, dg, cw_grads, b, g, offs, ok, L, G: tl.constexpr, M: tl.constexpr, R: tl.constexpr,
                      FLAGS: tl.constexpr, QUERY_SIDE: tl.constexpr):
    """Store :func:`_rank_grads`' accumulators into the float32 gradients ``cw_grads = (dw1, dw2, dg)``
    (``(B, L, G, R, M)``, ``(B, L, G, R, M)``, ``(B, L, G, M)``) at positions ``offs``; ``ok`` ``(MP, BLOCK)``."""
    p1, p2, pg = cw_grads
    hm = tl.arange(0, d1.shape[1])
    if QUERY_SIDE:
        LOWRANK, GATE = QUERY_LOWRANK & FLAGS, QUERY_GATE & FLAGS
    else:
        LOWRANK, GATE = KEY_LOWRANK & FLAGS, KEY_GATE & FLAGS
    if LOWRANK:
        rr = tl.arange(0, d1.shape[0])
        p = (((b * L + offs[None, None, :]) * G + g) * R + rr[:, None, None]) * M + hm[None, :, None]
        m = (rr < R)[:, None, None] & ok[None, :, :]
        tl.store(p1 + p, d1, mask=m)
        tl.store(p2 + p, d2, mask=m)
    if GATE:
        tl.store(pg + ((b * L + offs[None, :]) * G + g) * M + hm[:, None], dg, mask=ok)


@triton.jit
def _store_static_rank_grad(part, dw, hm, M: tl.constexpr):
    """:func:`_static_grad`'s ``dw`` (this program's share of ``dW``) into ``part`` ``(M, M)``."""
    h_ok = hm < M
    tl.store(part + hm[:, None] * M + hm[None, :], dw, mask=h_ok[:, None] & h_ok[None, :])


@triton.jit
def _pair_dot(a_ptr, sa, offs_a, La, b_ptr, sb, offs_b, Lb, b, g, hm, M: tl.constexpr, D: tl.constexpr,
              DCH: tl.constexpr, PREC: tl.constexpr, rep_b, dn):
    """``sum_d a[h, offs_a, d] b[h, offs_b, d]`` for every head ``h`` of group ``g``, over the head dim ``D`` in
    chunks of ``DCH``: an ``(MP, len(offs_a), len(offs_b))`` float32 tile. ``sa``/``sb``: (batch, head, row,
    dim) strides; ``rep_b`` query heads per stored head of ``b`` (grouped-query keys and values)."""
    acc = tl.zeros((hm.shape[0], offs_a.shape[0], offs_b.shape[0]), dtype=tl.float32)
    for c in range(0, D // DCH):  # a loop, not unrolled: one set of shared-memory buffers
        d = c * DCH + tl.arange(0, DCH)
        x = _heads(a_ptr, b, g, offs_a, d, sa[0], sa[1], sa[2], sa[3], La, M, hm, 1, dn)
        y = _heads(b_ptr, b, g, offs_b, d, sb[0], sb[1], sb[2], sb[3], Lb, M, hm, rep_b, dn)
        acc += tl.dot(x, tl.trans(y, (0, 2, 1)), input_precision=PREC)
    return acc


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
