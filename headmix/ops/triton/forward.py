"""The forward kernel: output and row log-sum-exp, or (decoding) the split-key statistics and partial outputs;
and the sum of the partial outputs. Decoding is three launches with no host synchronisation (graph-capturable)."""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import (KEY_GATE, KEY_LOWRANK, NEG, QUERY_GATE, QUERY_LOWRANK, STATIC, _compose, _compose_rank, _heads,
                    _key_range, _matrices, _pair_dot, _valid)


@triton.jit
def _combined_lse(stats_ptr, rows, ok, n_rows, n_split):
    """The rows' normaliser ``lse = log sum_s l_s exp(m_s - mx) + mx`` from every key split's statistics: row
    maxima ``m_s`` at ``stats_ptr + s * n_rows + rows``, sums ``l_s`` at ``stats_ptr + (n_split + s) * n_rows +
    rows``. Combined in split order, so every split's program of a row computes the same bits; a row without any
    allowed key (``l = 0`` in every split) gets ``inf``, so its probabilities are all 0. ``rows``: offsets of any
    shape (the forward's ``(MP, BM)``, the one-query kernel's ``(MP,)``), ``ok`` their mask."""
    mx = tl.load(stats_ptr + rows, mask=ok, other=NEG)
    for sp in range(1, n_split):
        mx = tl.maximum(mx, tl.load(stats_ptr + sp * n_rows + rows, mask=ok, other=NEG))
    total = tl.load(stats_ptr + n_split * n_rows + rows, mask=ok, other=0.0) * tl.exp(
        tl.load(stats_ptr + rows, mask=ok, other=NEG) - mx)
    for sp in range(1, n_split):
        m_sp = tl.load(stats_ptr + sp * n_rows + rows, mask=ok, other=NEG)
        total += tl.load(stats_ptr + (n_split + sp) * n_rows + rows, mask=ok, other=0.0) * tl.exp(m_sp - mx)
    return tl.where(total > 0, mx + tl.log(total), float("inf"))


@triton.jit
def _combined_lse_chunks(stats_ptr, rows, ok, n_rows, n_split, SC: tl.constexpr):
    """:func:`_combined_lse` for one row per head (``rows`` ``(MP,)``), reading ``SC`` splits' statistics at once
    (one memory round trip per ``SC`` splits, not two per split: the one-query decode kernel's programs all wait on
    this before their first key) and folding them in with an online maximum. The same order in every program of a
    row, so all compute the same bits."""
    mx = tl.full(rows.shape, NEG, dtype=tl.float32)
    total = tl.zeros(rows.shape, dtype=tl.float32)
    for c in range(0, n_split, SC):
        sp = c + tl.arange(0, SC)
        at = sp[:, None] * n_rows + rows[None, :]
        okc = (sp < n_split)[:, None] & ok[None, :]
        m = tl.load(stats_ptr + at, mask=okc, other=NEG)
        lsum = tl.load(stats_ptr + n_split * n_rows + at, mask=okc, other=0.0)
        new = tl.maximum(mx, tl.max(m, 0))
        total = total * tl.exp(mx - new) + tl.sum(lsum * tl.exp(m - new[None, :]), 0)
        mx = new
    return tl.where(total > 0, mx + tl.log(total), float("inf"))


@triton.jit
def _pre_scores(q, q_ptr, k_ptr, sq, sk, pre, eq_pre, b, g, offs_i, offs_j, hm, krow, T, S, kv_rep, dk_n, scale,
                G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, R: tl.constexpr, DK: tl.constexpr,
                DCS: tl.constexpr, BN: tl.constexpr, PRE: tl.constexpr, PREC: tl.constexpr, MIX_PRE: tl.constexpr,
                RELOAD: tl.constexpr, RANKR: tl.constexpr):
    """The pre-composed scores ``Compose_pre(Q K^T * scale)``, an ``(MP, BM, BN)`` float32 tile of queries ``offs_i``
    and keys ``offs_j``: what both passes of :func:`_fwd_kernel` recompute per key block. ``q``: the held query tile
    (unused with ``RELOAD`` or ``DCS < DK``); ``eq_pre``: the per-query matrices (matrix form); ``krow``: the keys'
    ``(BN, MP)`` bounds."""
    if DCS == DK:
        if RELOAD:  # large heads: re-read the query tile (from L2) rather than hold it
            q = _heads(q_ptr, b, g, offs_i, tl.arange(0, DK), sq[0], sq[1], sq[2], sq[3], T, M, hm, 1, dk_n)
        k = _heads(k_ptr, b, g, offs_j, tl.arange(0, DK), sk[0], sk[1], sk[2], sk[3], S, M, hm, kv_rep, dk_n)
        s = tl.dot(q, tl.trans(k, (0, 2, 1)), input_precision=PREC) * scale
    else:
        s = _pair_dot(q_ptr, sq, offs_i, T, k_ptr, sk, offs_j, S, b, g, hm, M, DK, DCS, PREC, kv_rep, dk_n) * scale
    if PRE != 0:
        s = _composed(s, pre, eq_pre, b, g, offs_i, offs_j, hm, krow, T, S, G, M, MP, R, BN, PRE, MIX_PRE, RANKR)
    return s


@triton.jit
def _composed(x, w, eq, b, g, offs_i, offs_j, hm, krow, T, S, G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
              R: tl.constexpr, BN: tl.constexpr, FLAGS: tl.constexpr, MIX: tl.constexpr, RANKR: tl.constexpr):
    """``Compose_w(x)`` of an ``(MP, BM, BN)`` tile (queries ``offs_i``, keys ``offs_j``), forward direction: the
    rank-R form (``RANKR``), or the per-position matrices: ``eq`` the query side's, built once per query block by
    the caller, the key side's built here."""
    if RANKR:
        y = _compose_rank(x, w, b, g, offs_i, offs_j, hm, T, S, G, M, R, FLAGS, False, MIX)
    else:
        y = _compose(x, eq, _matrices(w, b, g, offs_j, hm, krow, S, G, M, MP, R, BN, FLAGS, False, MIX), FLAGS, MIX)
    return y


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mask_ptr,
    pre_w, pre_q1, pre_q2, pre_k1, pre_k2, pre_qg, pre_kg,
    post_w, post_q1, post_q2, post_k1, post_k2, post_qg, post_kg,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, smb, smt, sms,
    T, S, off, kv_rep, dk_n, dv_n, scale, chunk, n_split,
    G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PRE: tl.constexpr, POST: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    PREC: tl.constexpr, MIX_PRE: tl.constexpr, MIX_POST: tl.constexpr, RELOAD: tl.constexpr,
    PHASE: tl.constexpr, DCS: tl.constexpr, DCV: tl.constexpr, RANKR: tl.constexpr,
):
    """``PHASE`` 0: both passes over all keys, ``O`` and ``lse`` stored. Split keys (decoding: few queries,
    many keys; program axis 2 = split of ``chunk`` keys): ``PHASE`` 1 stores each split's row max and sum
    in ``lse_ptr`` ``(2, n_split, B, H, T)``; ``PHASE`` 2 reads all splits' statistics from ``lse_ptr``,
    combines them into the row's ``lse`` on the device, and stores the split's unreduced float32 ``P' V`` in
    ``o_ptr`` ``(n_split, B, H, T, DV)`` (summed by :func:`_split_sum_kernel`).

    Wide head groups (launch.head_dim_chunks): ``DCS < DK`` accumulates the scores over ``DCS``-wide chunks of the
    head dim (tiles._pair_dot), and with ``DCV < DV`` (``PHASE`` 0 only) each program writes one ``DCV``-wide chunk
    of the output, ``program_id(2)``, recomputing the scores. ``RANKR``: the Compose in the rank-R form."""
    pid_i = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first (longest job first, a shorter tail)
        pid_i = tl.num_programs(0) - 1 - pid_i
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    start_i = pid_i * BM
    offs_i = start_i + tl.arange(0, BM)
    hm = tl.arange(0, MP)
    h_ok = hm < M
    qok = h_ok[:, None] & (offs_i < T)[None, :]
    qrow = (offs_i < T)[:, None] & h_ok[None, :]
    pre = (pre_w, pre_q1, pre_q2, pre_k1, pre_k2, pre_qg, pre_kg)
    post = (post_w, post_q1, post_q2, post_k1, post_k2, post_qg, post_kg)
    sq = (sqb, sqh, sqt, sqd)
    sk = (skb, skh, skt, skd)
    eq_pre = 0  # the rank-R form has no per-query matrices
    if not RANKR:
        eq_pre = _matrices(pre, b, g, offs_i, hm, qrow, T, G, M, MP, R, BM, PRE, True, MIX_PRE)
    q = 0  # the query tile, held here unless large heads re-read it (RELOAD) or the head dim is chunked
    if not RELOAD and DCS == DK:
        q = _heads(q_ptr, b, g, offs_i, tl.arange(0, DK), sqb, sqh, sqt, sqd, T, M, hm, 1, dk_n)
    lo, hi = _key_range(start_i, T, S, off, BM, BN, CAUSAL, WINDOW)
    h = g * M + hm
    rows = (b * G * M + h[:, None]) * T + offs_i[None, :]  # (MP, BM) offsets into (B, H, T)
    n_rows = tl.num_programs(1) * M * T  # B * H * T
    split = tl.program_id(2)
    if PHASE != 0:
        lo = tl.maximum(lo, split * chunk)
        hi = tl.minimum(hi, split * chunk + chunk)

    m_i = tl.full((MP, BM), NEG, dtype=tl.float32)
    l_i = tl.zeros((MP, BM), dtype=tl.float32)
    for start_j in range(lo, hi if PHASE != 2 else lo, BN):
        offs_j = start_j + tl.arange(0, BN)
        krow = (offs_j < S)[:, None] & h_ok[None, :]
        s = _pre_scores(q, q_ptr, k_ptr, sq, sk, pre, eq_pre, b, g, offs_i, offs_j, hm, krow, T, S, kv_rep, dk_n, scale,
                        G, M, MP, R, DK, DCS, BN, PRE, PREC, MIX_PRE, RELOAD, RANKR)
        valid = _valid(b, offs_i, offs_j, T, S, off, mask_ptr, smb, smt, sms, CAUSAL, WINDOW, HAS_MASK)[None, :, :]
        s = tl.where(valid, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 2))
        p = tl.where(valid, tl.exp(s - m_new[:, :, None]), 0.0)
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(p, 2)
        m_i = m_new
    if PHASE == 1:
        tl.store(lse_ptr + split * n_rows + rows, m_i, mask=qok)
        tl.store(lse_ptr + (n_split + split) * n_rows + rows, l_i, mask=qok)
        return
    if PHASE == 2:  # the rows' final normaliser, combined here from every split's statistics
        lse = _combined_lse(lse_ptr, rows, qok, n_rows, n_split)
    else:
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("inf"))

    eq_post = 0  # (the rank-R form has no per-query matrices)
    if not RANKR:
        eq_post = _matrices(post, b, g, offs_i, hm, qrow, T, G, M, MP, R, BM, POST, True, MIX_POST)
    if DCV == DV:
        dv = tl.arange(0, DV)
    else:  # this program's chunk of the output's head dim
        dv = tl.program_id(2) * DCV + tl.arange(0, DCV)
    acc = tl.zeros((MP, BM, DCV), dtype=tl.float32)
    for start_j in range(lo, hi, BN):
        offs_j = start_j + tl.arange(0, BN)
        krow = (offs_j < S)[:, None] & h_ok[None, :]
        s = _pre_scores(q, q_ptr, k_ptr, sq, sk, pre, eq_pre, b, g, offs_i, offs_j, hm, krow, T, S, kv_rep, dk_n, scale,
                        G, M, MP, R, DK, DCS, BN, PRE, PREC, MIX_PRE, RELOAD, RANKR)
        valid = _valid(b, offs_i, offs_j, T, S, off, mask_ptr, smb, smt, sms, CAUSAL, WINDOW, HAS_MASK)[None, :, :]
        p = tl.where(valid, tl.exp(s - lse[:, :, None]), 0.0)
        if POST != 0:
            p = _composed(p, post, eq_post, b, g, offs_i, offs_j, hm, krow, T, S, G, M, MP, R, BN, POST, MIX_POST, RANKR)
        v = _heads(v_ptr, b, g, offs_j, dv, svb, svh, svt, svd, S, M, hm, kv_rep, dv_n)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    o_ptrs = o_ptr + b * sob + h[:, None, None] * soh + offs_i[None, :, None] * sot + dv[None, None, :] * sod
    if PHASE == 2:
        o_ptrs += split * n_rows * DV
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=qok[:, :, None] & (dv < dv_n)[None, None, :])
    if PHASE == 0:
        if DCV == DV:
            tl.store(lse_ptr + rows, lse, mask=qok)
        else:  # the same row normaliser in every chunk's program: stored by chunk 0's
            tl.store(lse_ptr + rows, lse, mask=qok & (hm * 0 + tl.program_id(2) == 0)[:, None])


@triton.jit
def _split_sum_kernel(parts_ptr, o_ptr, n, n_split, BLOCK: tl.constexpr, SC: tl.constexpr):
    """``o = sum_s parts[s]`` over the ``n_split`` float32 partial outputs of the split-key forward (``n`` elements
    each, dense), stored in ``o``'s dtype. ``SC`` splits are read at once (one memory round trip each, not one per
    split) and summed as a tree, the chunks in split order: a fixed order, the same bits on every run."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, n_split, SC):
        sp = c + tl.arange(0, SC)
        part = tl.load(parts_ptr + sp[:, None] * n + offs[None, :], mask=(sp < n_split)[:, None] & ok[None, :],
                       other=0.0)
        acc += tl.sum(part, 0)
    tl.store(o_ptr + offs, acc.to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _key_rows(ptr, sb, st, b, g, r, offs, hm, ok, R: tl.constexpr, M: tl.constexpr):
    """A key-side factor at rank ``r`` (a gate: ``R = 1``, ``r = 0``) as a ``(BLOCK, MP)`` tile: positions ``offs`` of
    a ``(B, S, G, R, M)`` tensor whose batch and position strides are ``sb``, ``st`` (a static cache packs a layer's
    key-side factors and gates into one buffer, so the position stride is that buffer's row), the rest contiguous."""
    p = ptr + b * sb + offs[:, None] * st + (g * R + r) * M + hm[None, :]
    return tl.load(p, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _one_query_compose(x, cw, ks, b, g, offs_j, hm, kok, G: tl.constexpr, M: tl.constexpr, R: tl.constexpr,
                       FLAGS: tl.constexpr):
    """Compose of one query's ``(MP, BN)`` tile (heads x keys), every term applied as it is written in the
    reference (no per-key ``heads x heads`` matrices): the static mix as one ``(MP, MP)`` contraction, each rank of
    a low-rank term as a reduction over the heads and a scaled add, the gates as products. ``kok``: ``(BN, MP)``
    bounds of the key-side factors; ``ks``: the per-position fields' (batch, position) strides, ``(q1, q2, qg, k1,
    k2, kg)`` in turn (the query's own position stride unused). float32 throughout."""
    w_ptr, qw1, qw2, kw1, kw2, qg, kg = cw
    q1b, _, q2b, _, qgb, _, k1b, k1t, k2b, k2t, kgb, kgt = ks
    h_ok = hm < M
    out = x
    if STATIC & FLAGS:  # out[n, j] += sum_m W[g, m, n] x[m, j]
        w = tl.load(w_ptr + g * M * M + hm[:, None] * M + hm[None, :], mask=h_ok[:, None] & h_ok[None, :],
                    other=0.0).to(tl.float32)
        out += tl.sum(w[:, :, None] * x[:, None, :], 0)
    if QUERY_LOWRANK & FLAGS:  # the factors at the one query position
        for r in tl.static_range(R):
            a = tl.load(qw1 + b * q1b + (g * R + r) * M + hm, mask=h_ok, other=0.0).to(tl.float32)
            c = tl.load(qw2 + b * q2b + (g * R + r) * M + hm, mask=h_ok, other=0.0).to(tl.float32)
            out += c[:, None] * tl.sum(a[:, None] * x, 0)[None, :]
    if QUERY_GATE & FLAGS:
        gate = tl.load(qg + b * qgb + g * M + hm, mask=h_ok, other=0.0).to(tl.float32)
        out += gate[:, None] * x
    if KEY_LOWRANK & FLAGS:  # factors per key: (BN, MP) tiles
        for r in tl.static_range(R):
            a = tl.trans(_key_rows(kw1, k1b, k1t, b, g, r, offs_j, hm, kok, R, M))
            c = tl.trans(_key_rows(kw2, k2b, k2t, b, g, r, offs_j, hm, kok, R, M))
            out += c * tl.sum(a * x, 0)[None, :]
    if KEY_GATE & FLAGS:
        out += tl.trans(_key_rows(kg, kgb, kgt, b, g, 0, offs_j, hm, kok, 1, M)) * x
    return out


@triton.jit
def _one_query_scores(q_ptr, k_ptr, b, g, h, hm, offs_j, sqb, sqh, sqd, skb, skh, skt, skd, S, kv_rep, dk_n, scale,
                      pre, pre_ks, kok, G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, R: tl.constexpr,
                      DK: tl.constexpr, DC: tl.constexpr, BN: tl.constexpr, PRE: tl.constexpr):
    """Pre-composed scores ``(MP, BN)`` of the one query against keys ``offs_j``; the head dim in chunks of ``DC``."""
    s = tl.zeros((MP, BN), dtype=tl.float32)
    for dc in tl.static_range(0, DK, DC):
        d = dc + tl.arange(0, DC)
        q = tl.load(q_ptr + b * sqb + h[:, None] * sqh + d[None, :] * sqd,
                    mask=(hm < M)[:, None] & (d < dk_n)[None, :], other=0.0).to(tl.float32)
        k = _heads(k_ptr, b, g, offs_j, d, skb, skh, skt, skd, S, M, hm, kv_rep, dk_n).to(tl.float32)
        s += tl.sum(q[:, None, :] * k, 2)
    s = s * scale
    if PRE != 0:
        s = _one_query_compose(s, pre, pre_ks, b, g, offs_j, hm, kok, G, M, R, PRE)
    return s


@triton.jit
def _one_query_kernel(
    q_ptr, k_ptr, v_ptr, parts_ptr, stats_ptr, scores_ptr, mask_ptr,
    pre_w, pre_q1, pre_q2, pre_k1, pre_k2, pre_qg, pre_kg,
    post_w, post_q1, post_q2, post_k1, post_k2, post_qg, post_kg,
    sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, smb, sms,
    pre_q1b, pre_q1t, pre_q2b, pre_q2t, pre_qgb, pre_qgt, pre_k1b, pre_k1t, pre_k2b, pre_k2t, pre_kgb, pre_kgt,
    post_q1b, post_q1t, post_q2b, post_q2t, post_qgb, post_qgt, post_k1b, post_k1t, post_k2b, post_k2t, post_kgb,
    post_kgt,
    S, off, kv_rep, dk_n, dv_n, scale, chunk, n_split,
    G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DC: tl.constexpr, BN: tl.constexpr,
    PRE: tl.constexpr, POST: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    PHASE: tl.constexpr, SC: tl.constexpr,
):
    """Decoding with one query (``T = 1``, the query at key ``off``), keys split over program axis 1 in ``chunk``s;
    program axis 0 is (batch, head group). The tiles are ``(heads x keys)``: no query rows to pad, no per-key
    mixing matrices. ``PHASE`` 1 stores each split's row max and sum, ``(2, n_split, B * H)``, and the pre-composed
    scores ``S'``, float32 ``(B * H, S)`` (``scores_ptr``); ``PHASE`` 2 combines every split's statistics into the
    row's normaliser (:func:`_combined_lse_chunks`, ``SC`` splits at a time), reads ``S'`` back (the keys are not
    read again, nor the scores and the pre-Compose recomputed: a head's 4 bytes per key against ``2 x head dim``),
    and stores the split's float32 ``P' V``, ``(n_split, B * H, dv_n)`` (summed by :func:`_split_sum_kernel`)."""
    bg = tl.program_id(0)
    b = bg // G
    g = bg % G
    split = tl.program_id(1)
    hm = tl.arange(0, MP)
    h_ok = hm < M
    h = g * M + hm
    rows = b * G * M + h  # (MP,) offsets into (B, H)
    n_rows = tl.num_programs(0) * M  # B * H
    pre = (pre_w, pre_q1, pre_q2, pre_k1, pre_k2, pre_qg, pre_kg)
    post = (post_w, post_q1, post_q2, post_k1, post_k2, post_qg, post_kg)
    pre_ks = (pre_q1b, pre_q1t, pre_q2b, pre_q2t, pre_qgb, pre_qgt, pre_k1b, pre_k1t, pre_k2b, pre_k2t, pre_kgb,
              pre_kgt)
    post_ks = (post_q1b, post_q1t, post_q2b, post_q2t, post_qgb, post_qgt, post_k1b, post_k1t, post_k2b, post_k2t,
               post_kgb, post_kgt)
    lo = split * chunk
    hi = tl.minimum(S, lo + chunk)
    if CAUSAL:
        hi = tl.minimum(hi, off + 1)
    if WINDOW > 0:  # key tiles wholly outside the window are skipped (lo stays a multiple of BN)
        lo = tl.maximum(lo, ((off - WINDOW + 1) // BN) * BN)
    if PHASE == 1:
        m_i = tl.full((MP,), NEG, dtype=tl.float32)
        l_i = tl.zeros((MP,), dtype=tl.float32)
    else:
        lse = _combined_lse_chunks(stats_ptr, rows, h_ok, n_rows, n_split, SC)
        acc = tl.zeros((MP, DV), dtype=tl.float32)
    for start_j in range(lo, hi, BN):
        offs_j = start_j + tl.arange(0, BN)
        kok = (offs_j < S)[:, None] & h_ok[None, :]
        at = rows[:, None] * S + offs_j[None, :]  # (MP, BN) into the (B * H, S) scores
        if PHASE == 1:
            s = _one_query_scores(q_ptr, k_ptr, b, g, h, hm, offs_j, sqb, sqh, sqd, skb, skh, skt, skd, S, kv_rep,
                                  dk_n, scale, pre, pre_ks, kok, G, M, MP, R, DK, DC, BN, PRE)
            tl.store(scores_ptr + at, s, mask=tl.trans(kok))
        else:
            s = tl.load(scores_ptr + at, mask=tl.trans(kok), other=0.0)
        ok = offs_j < S
        if CAUSAL:
            ok = ok & (offs_j <= off)
        if WINDOW > 0:
            ok = ok & (off - offs_j < WINDOW)
            if not CAUSAL:
                ok = ok & (offs_j - off < WINDOW)
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + b * smb + offs_j * sms, mask=ok, other=0) != 0)
        if PHASE == 1:
            s = tl.where(ok[None, :], s, NEG)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.where(ok[None, :], tl.exp(s - m_new[:, None]), 0.0)
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(p, 1)
            m_i = m_new
        else:
            p = tl.where(ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            if POST != 0:
                p = _one_query_compose(p, post, post_ks, b, g, offs_j, hm, kok, G, M, R, POST)
            dv = tl.arange(0, DV)
            v = _heads(v_ptr, b, g, offs_j, dv, svb, svh, svt, svd, S, M, hm, kv_rep, dv_n).to(tl.float32)
            acc += tl.sum(p[:, :, None] * v, 1)
    if PHASE == 1:
        tl.store(stats_ptr + split * n_rows + rows, m_i, mask=h_ok)
        tl.store(stats_ptr + (n_split + split) * n_rows + rows, l_i, mask=h_ok)
    else:
        dv = tl.arange(0, DV)
        tl.store(parts_ptr + (split * n_rows + rows)[:, None] * dv_n + dv[None, :], acc,
                 mask=h_ok[:, None] & (dv < dv_n)[None, :])
