"""The backward kernels: query blocks (``Delta`` and post-Compose query-side gradients, then ``dQ`` and
pre-Compose query-side gradients) and key blocks (``dK``, ``dV``, every key-side gradient)."""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import (KEY_GATE, KEY_LOWRANK, KEY_TERMS, QUERY_GATE, QUERY_LOWRANK, QUERY_TERMS, STATIC, _compose,
                    _compose_rank, _grad_matrices, _heads, _key_range, _matrices, _pair_dot, _query_range, _rank_grads,
                    _static_grad, _store_rank_grads, _store_side_grads, _store_static_grad, _store_static_rank_grad,
                    _t, _valid)


# Head dims above WHOLE_HEAD_DIM (64, launch.py) are processed in chunks (DCK of the query/key dim, DCV of the value
# dim): each program writes one chunk of dQ (or dK, dV), program axis 2, and recomputes the tile's scores
# with the products over the head dim (Q K^T, dO V^T) accumulated from re-read half-chunk tiles in a loop
# (tiles._pair_dot: not unrolled, so one set of shared-memory buffers: unrolled, the key kernel needed ~280 KB at
# head dim 128 in an offline sm_90 compile). The Compose-weight gradients, computed alike in every chunk's program,
# are stored by chunk 0's. Up to WHOLE_HEAD_DIM there is one chunk (DCK = DK, DCV = DV) and the loop-invariant
# tiles stay in registers. RANKR (more than 16 heads per group, launch.compose_form): the Compose in the rank-R
# form (tiles._compose_rank), no per-position (BLOCK, MP, MP) matrices.
@triton.jit
def _scores_dp(q, k, do, v, q_ptr, k_ptr, do_ptr, v_ptr, sq, sk, so, sv, b, g, offs_i, offs_j, hm, T, S, kv_rep, dk_n,
               dv_n, scale, M: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DCK: tl.constexpr, DCV: tl.constexpr,
               PREC: tl.constexpr):
    """A tile's scores ``S = Q K^T * scale`` and ``dP' = dO V^T`` (both ``(MP, BM, BN)`` float32), which both kernels
    recompute. Whole head dims (``DK == DCK and DV == DCV``): from the tiles ``q``, ``k``, ``do``, ``v`` (``v`` None:
    read here, after the scores); else accumulated over half-chunks read from the pointers (tiles._pair_dot)."""
    if DK == DCK and DV == DCV:
        s = tl.dot(q, tl.trans(k, (0, 2, 1)), input_precision=PREC) * scale
        if v is None:
            v = _heads(v_ptr, b, g, offs_j, tl.arange(0, DV), sv[0], sv[1], sv[2], sv[3], S, M, hm, kv_rep, dv_n)
        dp2 = tl.dot(do, tl.trans(v, (0, 2, 1)), input_precision=PREC).to(tl.float32)
    else:
        s = _pair_dot(q_ptr, sq, offs_i, T, k_ptr, sk, offs_j, S, b, g, hm, M, DK, DCK // 2, PREC, kv_rep, dk_n) * scale
        dp2 = _pair_dot(do_ptr, so, offs_i, T, v_ptr, sv, offs_j, S, b, g, hm, M, DV, DCV // 2, PREC, kv_rep, dv_n)
    return s, dp2


@triton.jit
def _probabilities(s, cw, b, g, offs_i, offs_j, hm, lse, eq, ek, T, S, off, mask_ptr, smb, smt, sms, G: tl.constexpr,
                   M: tl.constexpr, R: tl.constexpr, PRE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   HAS_MASK: tl.constexpr, MIX: tl.constexpr, RANKR: tl.constexpr):
    """``P = exp(Compose_pre(S) - lse)`` on the valid entries of a tile of scores ``S``: the Compose ``cw`` in the
    rank-R form (``RANKR``), else from the per-query and per-key matrices ``eq``, ``ek``."""
    s2 = s
    if PRE != 0:
        if RANKR:
            s2 = _compose_rank(s, cw, b, g, offs_i, offs_j, hm, T, S, G, M, R, PRE, False, MIX)
        else:
            s2 = _compose(s, eq, ek, PRE, MIX)
    valid = _valid(b, offs_i, offs_j, T, S, off, mask_ptr, smb, smt, sms, CAUSAL, WINDOW, HAS_MASK)[None, :, :]
    return tl.where(valid, tl.exp(s2 - lse[:, :, None]), 0.0)


@triton.jit
def _bwd_query_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, dq_ptr,
    pre_w, pre_q1, pre_q2, pre_k1, pre_k2, pre_qg, pre_kg,
    post_w, post_q1, post_q2, post_k1, post_k2, post_qg, post_kg,
    d_q1, d_q2, d_qg, dw_part,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, smb, smt, sms,
    T, S, off, kv_rep, dk_n, dv_n, scale, n_blocks,
    G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DCK: tl.constexpr, DCV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PRE: tl.constexpr, POST: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    PREC: tl.constexpr, MIX_PRE: tl.constexpr, MIX_POST: tl.constexpr, STAGE: tl.constexpr,
    RANKR: tl.constexpr, RP: tl.constexpr,
):
    """STAGE 1: ``Delta`` and the query-side gradients of the post-Compose (static mix included).
    STAGE 2: ``dQ`` (chunk ``program_id(2)`` of the head dim) and the query-side gradients of the
    pre-Compose. Static-mix gradients are stored per program (summed by the host). ``RANKR``: the Compose in the
    rank-R form (``RP``: the rank padded to a power of two)."""
    pid_i = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first (longest job first, a shorter tail)
        pid_i = tl.num_programs(0) - 1 - pid_i
    bg = tl.program_id(1)
    chunk = tl.program_id(2)
    b = bg // G
    g = bg % G
    start_i = pid_i * BM
    offs_i = start_i + tl.arange(0, BM)
    hm = tl.arange(0, MP)
    h_ok = hm < M
    qok = h_ok[:, None] & (offs_i < T)[None, :]
    qrow = (offs_i < T)[:, None] & h_ok[None, :]
    first = qrow & (hm * 0 + chunk == 0)[None, :]  # Compose-weight gradients: stored by chunk 0's program
    h = g * M + hm
    pre = (pre_w, pre_q1, pre_q2, pre_k1, pre_k2, pre_qg, pre_kg)
    post = (post_w, post_q1, post_q2, post_k1, post_k2, post_qg, post_kg)
    sq = (sqb, sqh, sqt, sqd)
    sk = (skb, skh, skt, skd)
    sv = (svb, svh, svt, svd)
    so = (sob, soh, sot, sod)
    eq_pre = 0  # the rank-R form has no per-position matrices
    if not RANKR:
        eq_pre = _matrices(pre, b, g, offs_i, hm, qrow, T, G, M, MP, R, BM, PRE, True, MIX_PRE)
        eq_post_t = _t(_matrices(post, b, g, offs_i, hm, qrow, T, G, M, MP, R, BM, POST, True, MIX_POST))
    dc = chunk * DCK + tl.arange(0, DCK)  # this program's chunk of the head dim
    q, do = 0, 0  # held with whole head dims; chunks are read by _scores_dp
    if DK == DCK and DV == DCV:
        q = _heads(q_ptr, b, g, offs_i, dc, sqb, sqh, sqt, sqd, T, M, hm, 1, dk_n)
        do = _heads(do_ptr, b, g, offs_i, tl.arange(0, DV), sob, soh, sot, sod, T, M, hm, 1, dv_n)
    row = (b * G * M + h[:, None]) * T + offs_i[None, :]
    lse = tl.load(lse_ptr + row, mask=qok, other=float("inf"))
    lo, hi = _key_range(start_i, T, S, off, BM, BN, CAUSAL, WINDOW)
    if RANKR:  # the stage's Compose, query side: gradients of both factors (rank on axis 0), the gate, the static mix
        d1 = tl.zeros((RP, MP, BM), dtype=tl.float32)
        d2 = tl.zeros((RP, MP, BM), dtype=tl.float32)
        dg = tl.zeros((MP, BM), dtype=tl.float32)
        dw = tl.zeros((MP, MP), dtype=tl.float32)
    else:
        gq = tl.zeros((BM, MP, MP), dtype=tl.float32)  # dE of the stage's Compose, query side
    acc_delta = tl.zeros((MP, BM), dtype=tl.float32)
    acc_dq = tl.zeros((MP, BM, DCK), dtype=tl.float32)
    delta = tl.load(delta_ptr + row, mask=qok, other=0.0)
    for start_j in range(lo, hi, BN):
        offs_j = start_j + tl.arange(0, BN)
        krow = (offs_j < S)[:, None] & h_ok[None, :]
        k = _heads(k_ptr, b, g, offs_j, dc, skb, skh, skt, skd, S, M, hm, kv_rep, dk_n)
        s, dp2 = _scores_dp(q, k, do, None, q_ptr, k_ptr, do_ptr, v_ptr, sq, sk, so, sv, b, g, offs_i, offs_j, hm, T, S,
                            kv_rep, dk_n, dv_n, scale, M, DK, DV, DCK, DCV, PREC)
        ek_pre = 0
        if not RANKR:
            ek_pre = _matrices(pre, b, g, offs_j, hm, krow, S, G, M, MP, R, BN, PRE, False, MIX_PRE)
        p = _probabilities(s, pre, b, g, offs_i, offs_j, hm, lse, eq_pre, ek_pre, T, S, off, mask_ptr, smb, smt, sms, G,
                           M, R, PRE, CAUSAL, WINDOW, HAS_MASK, MIX_PRE, RANKR)
        dp = dp2
        if POST != 0:
            if RANKR:
                dp = _compose_rank(dp2, post, b, g, offs_i, offs_j, hm, T, S, G, M, R, POST, True, MIX_POST)
            else:
                ek_post_t = _t(_matrices(post, b, g, offs_j, hm, krow, S, G, M, MP, R, BN, POST, False, MIX_POST))
                dp = _compose(dp2, eq_post_t, ek_post_t, POST, MIX_POST)
        if STAGE == 1:
            acc_delta += tl.sum(p * dp, 2)
            if RANKR:
                if (QUERY_LOWRANK | QUERY_GATE) & POST:
                    d1, d2, dg = _rank_grads(d1, d2, dg, p, dp2, post, b, g, offs_i, offs_j, hm, T, S, G, M, R, POST,
                                             True)
                if STATIC & POST:
                    dw = _static_grad(dw, p, dp2, MIX_POST)
            elif QUERY_TERMS & POST:
                gq = _grad_matrices(gq, p, dp2, True, MIX_POST)
        elif RANKR:  # the weight gradients before the adjoint (shorter live ranges), in chunk 0's programs
            ds2 = p * (dp - delta[:, :, None])  # dS'
            ds = ds2
            if PRE != 0:
                if chunk == 0:
                    if (QUERY_LOWRANK | QUERY_GATE) & PRE:
                        d1, d2, dg = _rank_grads(d1, d2, dg, s, ds2, pre, b, g, offs_i, offs_j, hm, T, S, G, M, R, PRE,
                                                 True)
                    if STATIC & PRE:
                        dw = _static_grad(dw, s, ds2, MIX_PRE)
                ds = _compose_rank(ds2, pre, b, g, offs_i, offs_j, hm, T, S, G, M, R, PRE, True, MIX_PRE)
            acc_dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        else:
            ds2 = p * (dp - delta[:, :, None])  # dS'
            ds = ds2
            if PRE != 0:
                ds = _compose(ds2, _t(eq_pre), _t(ek_pre), PRE, MIX_PRE)
            acc_dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
            if QUERY_TERMS & PRE:
                gq = _grad_matrices(gq, s, ds2, True, MIX_PRE)
    part = dw_part + ((bg * n_blocks + pid_i) * 2) * M * M
    if STAGE == 1:
        tl.store(delta_ptr + row, acc_delta, mask=qok)
        if RANKR:
            if STATIC & POST:
                _store_static_rank_grad(part + M * M, dw, hm, M)
            _store_rank_grads(d1, d2, dg, (d_q1, d_q2, d_qg), b, g, offs_i, qok, T, G, M, R, POST, True)
        else:
            if STATIC & POST:
                _store_static_grad(part + M * M, gq, hm, M)
            _store_side_grads(gq, post, d_q1, d_q2, d_qg, b, g, offs_i, hm, qrow, T, G, M, R, POST, True)
    else:
        dq_ptrs = dq_ptr + b * sqb + h[:, None, None] * sqh + offs_i[None, :, None] * sqt + dc[None, None, :] * sqd
        tl.store(dq_ptrs, (acc_dq * scale).to(dq_ptr.dtype.element_ty),
                 mask=qok[:, :, None] & (dc < dk_n)[None, None, :])
        if RANKR:
            if STATIC & PRE:
                if chunk == 0:
                    _store_static_rank_grad(part, dw, hm, M)
            _store_rank_grads(d1, d2, dg, (d_q1, d_q2, d_qg), b, g, offs_i, qok & (hm * 0 + chunk == 0)[:, None], T,
                              G, M, R, PRE, True)
        else:
            if STATIC & PRE:
                if chunk == 0:
                    _store_static_grad(part, gq, hm, M)
            _store_side_grads(gq, pre, d_q1, d_q2, d_qg, b, g, offs_i, hm, first, T, G, M, R, PRE, True)


@triton.jit
def _bwd_key_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, dk_ptr, dv_ptr,
    pre_w, pre_q1, pre_q2, pre_k1, pre_k2, pre_qg, pre_kg,
    post_w, post_q1, post_q2, post_k1, post_k2, post_qg, post_kg,
    dpre_k1, dpre_k2, dpre_kg, dpost_k1, dpost_k2, dpost_kg,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, smb, smt, sms,
    T, S, off, kv_rep, dk_n, dv_n, scale,
    G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DCK: tl.constexpr, DCV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PRE: tl.constexpr, POST: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    PREC: tl.constexpr, MIX_PRE: tl.constexpr, MIX_POST: tl.constexpr, DK_STORE: tl.constexpr,
    DV_STORE: tl.constexpr, RANKR: tl.constexpr, RP: tl.constexpr,
):
    """``dK``, ``dV`` (chunk ``program_id(2)`` of the head dim) and the key-side gradients of both Composes,
    for one block of keys. ``RANKR``: the Compose in the rank-R form (``RP``: the rank padded to a power of two)."""
    pid_j = tl.program_id(0)
    bg = tl.program_id(1)
    chunk = tl.program_id(2)
    b = bg // G
    g = bg % G
    start_j = pid_j * BN
    offs_j = start_j + tl.arange(0, BN)
    hm = tl.arange(0, MP)
    h_ok = hm < M
    kok = h_ok[:, None] & (offs_j < S)[None, :]
    krow = (offs_j < S)[:, None] & h_ok[None, :]
    first = krow & (hm * 0 + chunk == 0)[None, :]
    h = g * M + hm
    pre = (pre_w, pre_q1, pre_q2, pre_k1, pre_k2, pre_qg, pre_kg)
    post = (post_w, post_q1, post_q2, post_k1, post_k2, post_qg, post_kg)
    sq = (sqb, sqh, sqt, sqd)
    sk = (skb, skh, skt, skd)
    sv = (svb, svh, svt, svd)
    so = (sob, soh, sot, sod)
    dck = chunk * DCK + tl.arange(0, DCK)
    dcv = chunk * DCV + tl.arange(0, DCV)
    ek_pre = 0  # the rank-R form has no per-position matrices
    if not RANKR:
        ek_pre = _matrices(pre, b, g, offs_j, hm, krow, S, G, M, MP, R, BN, PRE, False, MIX_PRE)
        ek_post = _matrices(post, b, g, offs_j, hm, krow, S, G, M, MP, R, BN, POST, False, MIX_POST)
    k, v = 0, 0  # held with whole head dims; chunks are read by _scores_dp
    if DK == DCK and DV == DCV:
        k = _heads(k_ptr, b, g, offs_j, tl.arange(0, DK), skb, skh, skt, skd, S, M, hm, kv_rep, dk_n)
        v = _heads(v_ptr, b, g, offs_j, tl.arange(0, DV), svb, svh, svt, svd, S, M, hm, kv_rep, dv_n)
    acc_dk = tl.zeros((MP, BN, DCK), dtype=tl.float32)
    acc_dv = tl.zeros((MP, BN, DCV), dtype=tl.float32)
    if RANKR:  # key-side gradients of both Composes: both factors (rank on axis 0) and the gate
        d1_pre = tl.zeros((RP, MP, BN), dtype=tl.float32)
        d2_pre = tl.zeros((RP, MP, BN), dtype=tl.float32)
        dg_pre = tl.zeros((MP, BN), dtype=tl.float32)
        d1_post = tl.zeros((RP, MP, BN), dtype=tl.float32)
        d2_post = tl.zeros((RP, MP, BN), dtype=tl.float32)
        dg_post = tl.zeros((MP, BN), dtype=tl.float32)
    else:
        gk_pre = tl.zeros((BN, MP, MP), dtype=tl.float32)  # dF of the pre-Compose
        gk_post = tl.zeros((BN, MP, MP), dtype=tl.float32)
    lo, hi = _query_range(start_j, T, S, off, BM, BN, CAUSAL, WINDOW)
    for start_i in range(lo, hi, BM):
        offs_i = start_i + tl.arange(0, BM)
        qok = h_ok[:, None] & (offs_i < T)[None, :]
        qrow = (offs_i < T)[:, None] & h_ok[None, :]
        row = (b * G * M + h[:, None]) * T + offs_i[None, :]
        lse = tl.load(lse_ptr + row, mask=qok, other=float("inf"))
        delta = tl.load(delta_ptr + row, mask=qok, other=0.0)
        q = _heads(q_ptr, b, g, offs_i, dck, sqb, sqh, sqt, sqd, T, M, hm, 1, dk_n)
        do = _heads(do_ptr, b, g, offs_i, dcv, sob, soh, sot, sod, T, M, hm, 1, dv_n)
        s, dp2 = _scores_dp(q, k, do, v, q_ptr, k_ptr, do_ptr, v_ptr, sq, sk, so, sv, b, g, offs_i, offs_j, hm, T, S,
                            kv_rep, dk_n, dv_n, scale, M, DK, DV, DCK, DCV, PREC)
        eq_pre = 0
        if not RANKR:
            eq_pre = _matrices(pre, b, g, offs_i, hm, qrow, T, G, M, MP, R, BM, PRE, True, MIX_PRE)
        p = _probabilities(s, pre, b, g, offs_i, offs_j, hm, lse, eq_pre, ek_pre, T, S, off, mask_ptr, smb, smt, sms, G,
                           M, R, PRE, CAUSAL, WINDOW, HAS_MASK, MIX_PRE, RANKR)
        p2 = p
        dp = dp2
        if RANKR:  # each weight gradient as soon as its operands exist (shorter live ranges), in chunk 0's programs
            if POST != 0:
                p2 = _compose_rank(p, post, b, g, offs_i, offs_j, hm, T, S, G, M, R, POST, False, MIX_POST)
                dp = _compose_rank(dp2, post, b, g, offs_i, offs_j, hm, T, S, G, M, R, POST, True, MIX_POST)
                if (KEY_LOWRANK | KEY_GATE) & POST:
                    if chunk == 0:
                        d1_post, d2_post, dg_post = _rank_grads(d1_post, d2_post, dg_post, p, dp2, post, b, g, offs_i,
                                                                offs_j, hm, T, S, G, M, R, POST, False)
            acc_dv += tl.dot(tl.trans(p2, (0, 2, 1)).to(do.dtype), do, input_precision=PREC)
            ds2 = p * (dp - delta[:, :, None])
            ds = ds2
            if PRE != 0:
                if (KEY_LOWRANK | KEY_GATE) & PRE:
                    if chunk == 0:
                        d1_pre, d2_pre, dg_pre = _rank_grads(d1_pre, d2_pre, dg_pre, s, ds2, pre, b, g, offs_i, offs_j,
                                                             hm, T, S, G, M, R, PRE, False)
                ds = _compose_rank(ds2, pre, b, g, offs_i, offs_j, hm, T, S, G, M, R, PRE, True, MIX_PRE)
            acc_dk += tl.dot(tl.trans(ds, (0, 2, 1)).to(q.dtype), q, input_precision=PREC)
        else:
            if POST != 0:
                eq_post = _matrices(post, b, g, offs_i, hm, qrow, T, G, M, MP, R, BM, POST, True, MIX_POST)
                p2 = _compose(p, eq_post, ek_post, POST, MIX_POST)
                dp = _compose(dp2, _t(eq_post), _t(ek_post), POST, MIX_POST)
            acc_dv += tl.dot(tl.trans(p2, (0, 2, 1)).to(do.dtype), do, input_precision=PREC)
            ds2 = p * (dp - delta[:, :, None])
            ds = ds2
            if PRE != 0:
                ds = _compose(ds2, _t(eq_pre), _t(ek_pre), PRE, MIX_PRE)
            acc_dk += tl.dot(tl.trans(ds, (0, 2, 1)).to(q.dtype), q, input_precision=PREC)
            if KEY_TERMS & POST:
                gk_post = _grad_matrices(gk_post, p, dp2, False, MIX_POST)
            if KEY_TERMS & PRE:
                gk_pre = _grad_matrices(gk_pre, s, ds2, False, MIX_PRE)
    # dK, dV per query head (B, H, S, D) dense: grouped-query heads are summed by the host
    dk_ptrs = dk_ptr + ((b * G * M + h[:, None, None]) * S + offs_j[None, :, None]) * DK_STORE + dck[None, None, :]
    dv_ptrs = dv_ptr + ((b * G * M + h[:, None, None]) * S + offs_j[None, :, None]) * DV_STORE + dcv[None, None, :]
    tl.store(dk_ptrs, (acc_dk * scale).to(dk_ptr.dtype.element_ty), mask=kok[:, :, None] & (dck < dk_n)[None, None, :])
    tl.store(dv_ptrs, acc_dv.to(dv_ptr.dtype.element_ty), mask=kok[:, :, None] & (dcv < dv_n)[None, None, :])
    if RANKR:
        first = kok & (hm * 0 + chunk == 0)[:, None]  # Compose-weight gradients: stored by chunk 0's program
        _store_rank_grads(d1_pre, d2_pre, dg_pre, (dpre_k1, dpre_k2, dpre_kg), b, g, offs_j, first, S, G, M, R, PRE,
                          False)
        _store_rank_grads(d1_post, d2_post, dg_post, (dpost_k1, dpost_k2, dpost_kg), b, g, offs_j, first, S, G, M, R,
                          POST, False)
    else:
        _store_side_grads(gk_pre, pre, dpre_k1, dpre_k2, dpre_kg, b, g, offs_j, hm, first, S, G, M, R, PRE, False)
        _store_side_grads(gk_post, post, dpost_k1, dpost_k2, dpost_kg, b, g, offs_j, hm, first, S, G, M, R, POST,
                          False)
