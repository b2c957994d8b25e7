"""The Triton kernels of the blockwise training path (:mod:`.blockwise`): the Compose and the softmax, forward and
adjoint, with every per-position weight gradient, on ``(heads x rows x keys)`` tiles of materialised query blocks."""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import KEY_GATE, KEY_LOWRANK, NEG, QUERY_GATE, QUERY_LOWRANK, STATIC, _key_range, _valid

# -- kernels -----------------------------------------------------------------------------------------------------------
# Every kernel: one program per (query tile, key chunk, batch x group); a tile is (MP, BM, BN), every head of the group
# at BM queries and BN keys, loaded once. With no tensor-core product inside, the tile keeps the loads' layout, which
# VEC and the tile's shape set (blockwise.TILES: VEC keys per thread, a group's heads over 2-4 lanes or warps), so the
# sums over heads (the Compose's hidden terms) are in-thread adds, then a shuffle or a shared-memory round trip. Sums
# over a row's keys (softmax statistics, Delta, query-side weight gradients) are per key chunk, added up by the host in
# a fixed order; over a column's queries (key-side weight gradients), atomic adds, or per query tile when deterministic.
@triton.jit
def _side(ptr, b, pos, ok, n_full, g, r, hm, G: tl.constexpr, R: tl.constexpr, M: tl.constexpr):
    """A per-position factor ``(B, n_full, G, R, M)`` (a gate: ``R = 1``, ``r = 0``) at rank ``r`` and positions ``pos``
    (relative to ``ptr``, which points at the block's first position) as an ``(MP, len(pos))`` float32 tile, 0 where not
    ``ok`` or past the group's heads."""
    p = ptr + ((b * n_full + pos[None, :]) * G + g) * (R * M) + r * M + hm[:, None]
    return tl.load(p, mask=(hm < M)[:, None] & ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _head(x, hm, m):
    """Head ``m``'s ``(BM, BN)`` slice of an ``(MP, BM, BN)`` tile."""
    return tl.sum(tl.where((hm == m)[:, None, None], x, 0.0), 0)


@triton.jit
def _rank_terms(y, x, w1, w2, b, pos, ok, n, g, hm, G: tl.constexpr, R: tl.constexpr, M: tl.constexpr,
                ADJOINT: tl.constexpr, AXIS: tl.constexpr):
    """``y + sum_r w2[r] (w1[r] . x)`` (``ADJOINT``: the two factors swapped) for an ``(MP, BM, BN)`` tile ``x``, with
    the factors at positions ``pos`` along the tile's queries (``AXIS`` 2: query-wise) or keys (``AXIS`` 1: key-wise)."""
    for r in tl.static_range(R):
        a = _side(w1, b, pos, ok, n, g, r, hm, G, R, M)
        c = _side(w2, b, pos, ok, n, g, r, hm, G, R, M)
        if ADJOINT:
            a, c = c, a
        y += tl.expand_dims(c, AXIS) * tl.sum(tl.expand_dims(a, AXIS) * x, 0)[None, :, :]
    return y


@triton.jit
def _compose3(x, w_ptr, q1, q2, k1, k2, qg, kg, b, g, offs_i, offs_j, i_ok, j_ok, hm, T, S, G: tl.constexpr,
              M: tl.constexpr, R: tl.constexpr, FLAGS: tl.constexpr, ADJOINT: tl.constexpr):
    """Compose (``ADJOINT``: its adjoint) of an ``(MP, BM, BN)`` tile at queries ``offs_i`` and keys ``offs_j``:
    ``x + W-mix(x) + sum_r w2[r] (w1[r] . x) (query- and key-wise) + (g_q + g_k) x``; the adjoint transposes ``W`` and
    swaps the two factors."""
    y = x
    if STATIC & FLAGS:
        for m in range(0, M):  # y[n] += W[m, n] x[m]  (adjoint: y[n] += W[n, m] x[m])
            if ADJOINT:
                col = tl.load(w_ptr + g * M * M + hm * M + m, mask=hm < M, other=0.0).to(tl.float32)
            else:
                col = tl.load(w_ptr + g * M * M + m * M + hm, mask=hm < M, other=0.0).to(tl.float32)
            y += col[:, None, None] * _head(x, hm, m)[None, :, :]
    if QUERY_LOWRANK & FLAGS:
        y = _rank_terms(y, x, q1, q2, b, offs_i, i_ok, T, g, hm, G, R, M, ADJOINT, 2)
    if KEY_LOWRANK & FLAGS:
        y = _rank_terms(y, x, k1, k2, b, offs_j, j_ok, S, g, hm, G, R, M, ADJOINT, 1)
    if QUERY_GATE & FLAGS:
        y += _side(qg, b, offs_i, i_ok, T, g, 0, hm, G, 1, M)[:, :, None] * x
    if KEY_GATE & FLAGS:
        y += _side(kg, b, offs_j, j_ok, S, g, 0, hm, G, 1, M)[:, None, :] * x
    return y


@triton.jit
def _frame(C, L, off, KC, G: tl.constexpr, MP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
           CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """This program's query tile ``pid_i`` (rows ``offs_i``, in bounds ``i_ok``), key chunk ``pid_c``, batch x group
    ``bg`` (``b``, ``g``), the heads ``hm`` and its keys ``[lo, hi)``: its chunk of ``KC`` keys within the range the
    mask's structure lets the tile see."""
    pid_i = tl.program_id(0)
    pid_c = tl.program_id(1)
    bg = tl.program_id(2)
    offs_i = pid_i * BM + tl.arange(0, BM)
    lo, hi = _key_range(pid_i * BM, C, L, off, BM, BN, CAUSAL, WINDOW)
    lo = tl.maximum(lo, pid_c * KC)
    hi = tl.minimum(hi, pid_c * KC + KC)
    return pid_i, pid_c, bg, bg // G, bg % G, offs_i, offs_i < C, tl.arange(0, MP), lo, hi


@triton.jit
def _at(start_j, bg, offs_i, i_ok, hm, C, L, M: tl.constexpr, BN: tl.constexpr, VEC: tl.constexpr):
    """Keys ``offs_j`` (in bounds ``j_ok``) of the tile at ``start_j``, its offsets into a ``(B, H, C, L)`` buffer and
    their bounds. ``VEC``, a power of two dividing ``L`` (the host's promise), is the alignment of a row's start: Triton
    moves up to that many keys per thread at once and lays the tile out by it. The kernels do not specialise on ``L``
    (``do_not_specialize``), so the layout is the tile table's choice (``blockwise.TILES``), not the shape's."""
    offs_j = start_j + tl.arange(0, BN)
    j_ok = offs_j < L
    at = ((bg * M + hm[:, None, None]) * C + offs_i[None, :, None]) * (L // VEC * VEC) + offs_j[None, None, :]
    ok = (hm < M)[:, None, None] & (i_ok[:, None] & j_ok[None, :])[None, :, :]
    return offs_j, j_ok, at, ok


@triton.jit
def _zero_rest(out_ptr, lo, hi, pid_c, KC, bg, offs_i, i_ok, hm, C, L, M: tl.constexpr, MP: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, VEC: tl.constexpr):
    """Zeros in this program's key chunk wherever its loop over ``[lo, hi)`` wrote nothing (keys the mask's structure
    hides from every query of the tile): ``out`` feeds products over the whole (query x key) rectangle."""
    c0 = pid_c * KC
    c1 = tl.minimum(c0 + KC, L)
    a = tl.minimum(lo, c1)  # the loop wrote [a, e), whole tiles of BN keys from a
    e = tl.minimum(a + tl.cdiv(tl.maximum(hi - lo, 0), BN) * BN, c1)
    zero = tl.zeros((MP, BM, BN), dtype=out_ptr.dtype.element_ty)
    for start_j in range(c0, a, BN):
        _, _, at, ok = _at(start_j, bg, offs_i, i_ok, hm, C, L, M, BN, VEC)
        tl.store(out_ptr + at, zero, mask=ok)
    for start_j in range(e, c1, BN):
        _, _, at, ok = _at(start_j, bg, offs_i, i_ok, hm, C, L, M, BN, VEC)
        tl.store(out_ptr + at, zero, mask=ok)


@triton.jit(do_not_specialize=["L"])
def _pre_kernel(s_ptr, out_ptr, pm_ptr, pl_ptr, mask_ptr, w_ptr, q1, q2, k1, k2, qg, kg,
                C, L, T, S, off, scale, smb, smt, sms, KC, n_c,
                G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, R: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, FLAGS: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                HAS_MASK: tl.constexpr, VEC: tl.constexpr):
    """``S' = Compose_pre(scale * S)`` (``S = Q K^T``; float32 ``(B, H, C, L)``) on the tiles the mask's structure
    allows, and each row's max and sum of ``exp`` of the masked ``S'`` over this key chunk, ``(B, H, n_c, C)`` each."""
    pid_i, pid_c, bg, b, g, offs_i, i_ok, hm, lo, hi = _frame(C, L, off, KC, G, MP, BM, BN, CAUSAL, WINDOW)
    m_i = tl.full((MP, BM), NEG, dtype=tl.float32)
    l_i = tl.zeros((MP, BM), dtype=tl.float32)
    for start_j in range(lo, hi, BN):
        offs_j, j_ok, at, ok = _at(start_j, bg, offs_i, i_ok, hm, C, L, M, BN, VEC)
        x = tl.load(s_ptr + at, mask=ok, other=0.0) * scale
        y = _compose3(x, w_ptr, q1, q2, k1, k2, qg, kg, b, g, offs_i, offs_j, i_ok, j_ok, hm, T, S, G, M, R, FLAGS,
                      False)
        tl.store(out_ptr + at, y, mask=ok)
        valid = _valid(b, offs_i, offs_j, C, L, off, mask_ptr, smb, smt, sms, CAUSAL, WINDOW, HAS_MASK)[None, :, :]
        ys = tl.where(valid, y, NEG)
        m_new = tl.maximum(m_i, tl.max(ys, 2))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.where(valid, tl.exp(ys - m_new[:, :, None]), 0.0), 2)
        m_i = m_new
    rows = ((bg * M + hm[:, None]) * n_c + pid_c) * C + offs_i[None, :]
    rok = (hm < M)[:, None] & i_ok[None, :]
    tl.store(pm_ptr + rows, m_i, mask=rok)
    tl.store(pl_ptr + rows, l_i, mask=rok)


@triton.jit
def _probs(sp_ptr, at, ok, lse, valid):
    """``P = exp(S' - lse)`` on the allowed entries of an ``(MP, BM, BN)`` tile, 0 elsewhere."""
    x = tl.load(sp_ptr + at, mask=ok, other=0.0)
    return tl.where(valid, tl.exp(x - lse[:, :, None]), 0.0)


@triton.jit
def _stored_probs(p_ptr, at, ok, valid):
    """``P`` as the backward's post kernel stored it (float16 or float32), float32, 0 off the allowed entries (which
    that kernel may have skipped)."""
    return tl.where(valid, tl.load(p_ptr + at, mask=ok, other=0.0).to(tl.float32), 0.0)


@triton.jit(do_not_specialize=["L"])
def _post_kernel(s_ptr, sp_ptr, lse_ptr, out_ptr, mask_ptr, pw_ptr, pq1, pq2, pk1, pk2, pqg, pkg,
                 w_ptr, q1, q2, k1, k2, qg, kg, C, L, T, S, off, scale, smb, smt, sms, slb, slh, KC,
                 G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, R: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, PRE_FLAGS: tl.constexpr, FLAGS: tl.constexpr, CAUSAL: tl.constexpr,
                 WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, FROM_S: tl.constexpr, VEC: tl.constexpr):
    """``P' = Compose_post(P)``, ``P = exp(S' - lse)`` masked, into ``out_ptr`` in its dtype (zeros where the mask's
    structure skips a tile). ``S'`` is read from ``sp_ptr``, or with ``FROM_S`` (the backward, where ``lse`` is known
    before the block) made here, ``S' = Compose_pre(scale * S)`` from ``s_ptr`` with the weights ``pw_ptr ..``, and
    then ``P`` is stored in ``sp_ptr`` in its dtype (for the adjoint kernels)."""
    pid_i, pid_c, bg, b, g, offs_i, i_ok, hm, lo, hi = _frame(C, L, off, KC, G, MP, BM, BN, CAUSAL, WINDOW)
    lse = tl.load(lse_ptr + b * slb + (g * M + hm[:, None]) * slh + offs_i[None, :],
                  mask=(hm < M)[:, None] & i_ok[None, :], other=float("inf"))
    for start_j in range(lo, hi, BN):
        offs_j, j_ok, at, ok = _at(start_j, bg, offs_i, i_ok, hm, C, L, M, BN, VEC)
        valid = _valid(b, offs_i, offs_j, C, L, off, mask_ptr, smb, smt, sms, CAUSAL, WINDOW, HAS_MASK)[None, :, :]
        if FROM_S:
            x = tl.load(s_ptr + at, mask=ok, other=0.0) * scale
            sp = _compose3(x, pw_ptr, pq1, pq2, pk1, pk2, pqg, pkg, b, g, offs_i, offs_j, i_ok, j_ok, hm, T, S, G, M,
                           R, PRE_FLAGS, False)
            p = tl.where(valid, tl.exp(sp - lse[:, :, None]), 0.0)
            tl.store(sp_ptr + at, p.to(sp_ptr.dtype.element_ty), mask=ok)
        else:
            p = _probs(sp_ptr, at, ok, lse, valid)
        y = _compose3(p, w_ptr, q1, q2, k1, k2, qg, kg, b, g, offs_i, offs_j, i_ok, j_ok, hm, T, S, G, M, R, FLAGS,
                      False)
        tl.store(out_ptr + at, y.to(out_ptr.dtype.element_ty), mask=ok)
    _zero_rest(out_ptr, lo, hi, pid_c, KC, bg, offs_i, i_ok, hm, C, L, M, MP, BM, BN, VEC)


@triton.jit(do_not_specialize=["L"])
def _adjoint_kernel(x_ptr, p_ptr, dy_ptr, delta_ptr, out_ptr, mask_ptr, w_ptr, q1, q2, k1, k2, qg, kg,
                    pdelta, pq1, pq2, pqg, pk1, pk2, pkg, pw,
                    C, L, T, S, off, scale, smb, smt, sms, KC, n_c, n_i, kb, ki,
                    G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, FLAGS: tl.constexpr, CAUSAL: tl.constexpr,
                    WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, PRE_SIDE: tl.constexpr, ATOMIC: tl.constexpr,
                    VEC: tl.constexpr):
    """The adjoint of one Compose on a tile, and its weight gradients.

    Post side (``PRE_SIDE`` False): the Compose's input is ``P`` (``p_ptr``, as the post kernel stored it), its output's
    gradient ``dP'`` (``dy_ptr``); writes ``dP`` (float32, ``out_ptr``) and this key chunk's share of ``Delta = sum_j P
    dP`` per row (``pdelta``, ``(B, H, n_c, C)``). Pre side: the input is ``scale * S`` (``x_ptr``), the output's
    gradient ``dS' = P (dP - Delta)`` (``dy_ptr`` holds ``dP``, ``delta_ptr`` ``Delta`` ``(B, H, C)``); writes ``dS *
    scale`` in ``out_ptr``'s dtype (the operand of ``dQ``, ``dK``; zeros where the mask's structure skips a tile).
    Query-side weight gradients: partial sums ``(B, n_c, C, G, R, M)`` per key chunk; the static mix's ``(B * G, n_i,
    n_c, M, M)`` per program; key side: rows ``(b * kb + pid_i * ki + key) * G + g`` of a ``(.., G, R, M)`` buffer,
    stored (a partial sum per query tile: ``kb = n_i * L``, ``ki = L``) or, with ``ATOMIC``, added in place (``ki = 0``:
    every query tile into one row; the order of the additions varies from run to run)."""
    pid_i, pid_c, bg, b, g, offs_i, i_ok, hm, lo, hi = _frame(C, L, off, KC, G, MP, BM, BN, CAUSAL, WINDOW)
    rr = tl.arange(0, RP)
    rows_ok = (hm < M)[:, None] & i_ok[None, :]
    if PRE_SIDE:
        delta = tl.load(delta_ptr + (bg * M + hm[:, None]) * C + offs_i[None, :], mask=rows_ok, other=0.0)
    a_delta = tl.zeros((MP, BM), dtype=tl.float32)
    a_q1 = tl.zeros((RP, MP, BM), dtype=tl.float32)
    a_q2 = tl.zeros((RP, MP, BM), dtype=tl.float32)
    a_qg = tl.zeros((MP, BM), dtype=tl.float32)
    a_w = tl.zeros((MP, MP), dtype=tl.float32)
    for start_j in range(lo, hi, BN):
        offs_j, j_ok, at, ok = _at(start_j, bg, offs_i, i_ok, hm, C, L, M, BN, VEC)
        valid = _valid(b, offs_i, offs_j, C, L, off, mask_ptr, smb, smt, sms, CAUSAL, WINDOW, HAS_MASK)[None, :, :]
        p = _stored_probs(p_ptr, at, ok, valid)
        if PRE_SIDE:
            x = tl.load(x_ptr + at, mask=ok, other=0.0) * scale
            dy = p * (tl.load(dy_ptr + at, mask=ok, other=0.0) - delta[:, :, None])
        else:
            x = p
            dy = tl.load(dy_ptr + at, mask=ok, other=0.0)
        # dx = Compose^T(dy), the terms in _compose3's order; with the weight gradients of y = Compose(x): per rank,
        # h = w1 . x and dh = w2 . dy (sums over heads, in-thread), dx += w1 dh, dw1 = sum x dh, dw2 = sum dy h;
        # gates dg = sum dy x; static dW[m, n] = sum x[m] dy[n]. Query side summed over keys (axis 2), key side over
        # queries (axis 1).
        dx = dy
        if STATIC & FLAGS:
            for m in range(0, M):  # dx[n] += W[n, m] dy[m]; dW[m, :] += sum x[m] dy
                col = tl.load(w_ptr + g * M * M + hm * M + m, mask=hm < M, other=0.0).to(tl.float32)
                dx += col[:, None, None] * _head(dy, hm, m)[None, :, :]
                row = tl.sum(tl.sum(_head(x, hm, m)[None, :, :] * dy, 2), 1)
                a_w += tl.where((hm == m)[:, None], row[None, :], 0.0)
        if QUERY_LOWRANK & FLAGS:
            for r in tl.static_range(R):
                a = _side(q1, b, offs_i, i_ok, T, g, r, hm, G, R, M)[:, :, None]
                c = _side(q2, b, offs_i, i_ok, T, g, r, hm, G, R, M)[:, :, None]
                h = tl.sum(a * x, 0)[None, :, :]
                dh = tl.sum(c * dy, 0)[None, :, :]
                dx += a * dh
                a_q1 += tl.where((rr == r)[:, None, None], tl.sum(x * dh, 2)[None, :, :], 0.0)
                a_q2 += tl.where((rr == r)[:, None, None], tl.sum(dy * h, 2)[None, :, :], 0.0)
        kp = (b * kb + pid_i * ki + offs_j[None, :]) * G + g
        kok = (hm < M)[:, None] & j_ok[None, :]
        if KEY_LOWRANK & FLAGS:
            for r in tl.static_range(R):
                a = _side(k1, b, offs_j, j_ok, S, g, r, hm, G, R, M)[:, None, :]
                c = _side(k2, b, offs_j, j_ok, S, g, r, hm, G, R, M)[:, None, :]
                h = tl.sum(a * x, 0)[None, :, :]
                dh = tl.sum(c * dy, 0)[None, :, :]
                dx += a * dh
                _key_sum(pk1 + kp * (R * M) + r * M + hm[:, None], tl.sum(x * dh, 1), kok, ATOMIC)
                _key_sum(pk2 + kp * (R * M) + r * M + hm[:, None], tl.sum(dy * h, 1), kok, ATOMIC)
        if QUERY_GATE & FLAGS:
            dx += _side(qg, b, offs_i, i_ok, T, g, 0, hm, G, 1, M)[:, :, None] * dy
            a_qg += tl.sum(dy * x, 2)
        if KEY_GATE & FLAGS:
            dx += _side(kg, b, offs_j, j_ok, S, g, 0, hm, G, 1, M)[:, None, :] * dy
            _key_sum(pkg + kp * M + hm[:, None], tl.sum(dy * x, 1), kok, ATOMIC)
        if PRE_SIDE:
            tl.store(out_ptr + at, (dx * scale).to(out_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(out_ptr + at, dx, mask=ok)
            a_delta += tl.sum(p * dx, 2)
    if PRE_SIDE:
        _zero_rest(out_ptr, lo, hi, pid_c, KC, bg, offs_i, i_ok, hm, C, L, M, MP, BM, BN, VEC)
    qp = ((b * n_c + pid_c) * C + offs_i[None, :]) * G + g
    if not PRE_SIDE:
        tl.store(pdelta + ((bg * M + hm[:, None]) * n_c + pid_c) * C + offs_i[None, :], a_delta, mask=rows_ok)
    if QUERY_LOWRANK & FLAGS:
        p3 = qp[None, :, :] * (R * M) + rr[:, None, None] * M + hm[None, :, None]
        m3 = (rr < R)[:, None, None] & rows_ok[None, :, :]
        tl.store(pq1 + p3, a_q1, mask=m3)
        tl.store(pq2 + p3, a_q2, mask=m3)
    if QUERY_GATE & FLAGS:
        tl.store(pqg + qp * M + hm[:, None], a_qg, mask=rows_ok)
    if STATIC & FLAGS:
        wp = pw + ((bg * n_i + pid_i) * n_c + pid_c) * M * M + hm[:, None] * M + hm[None, :]
        tl.store(wp, a_w, mask=(hm < M)[:, None] & (hm < M)[None, :])


@triton.jit
def _key_sum(ptr, value, mask, ATOMIC: tl.constexpr):
    """A key-side partial sum: stored, or with ``ATOMIC`` added in place."""
    if ATOMIC:
        tl.atomic_add(ptr, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, value, mask=mask)
