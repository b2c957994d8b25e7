"""The backward in the projected form (:mod:`.projected`): each adjoint's cross-head sums once per (query, key) pair.

Notation of :mod:`.projected`: ``x_h`` the scaled scores, ``u_r, v_r`` the pre-Compose's sums, ``y_h = S'_h``,
``p_h = P_h``, ``U_r, V_r`` the post-Compose's sums, ``z_h = P'_h``; ``dz_h = dO_h V_h^T``. The adjoint of a Compose
``y = x (1 + g_q + g_k) + Σ_r w2q_r u_r + Σ_r w2k_r v_r`` (``u_r = Σ_g w1q_r,g x_g``) is the same form with the factors
swapped: ``dx = dy (1 + g_q + g_k) + Σ_r w1q_r du_r + Σ_r w1k_r dv_r`` with the adjoint sums ``du_r = Σ_g w2q_r,g dy_g``
(:func:`~.projected._compose_head` and :func:`~.projected._add_sums` with ``w1`` and ``w2`` exchanged). So the
backward is the forward's pattern again, five launches after the forward's two sums kernels are run again:

1. ``_dz_sums_kernel`` (a program per tile pair and head group): the post adjoint's sums ``dU_r, dV_r`` of ``dz``;
2. ``_post_rows_kernel`` (a program per query tile and head): ``dp = Compose_post^T(dz)``, ``Δ = Σ_j p dp``, and the
   post-Compose's query-side weight gradients (row sums);
3. ``_dy_sums_kernel`` (pairs): ``dy = p (dp - Δ)`` head by head, the pre adjoint's sums ``dHu_r, dHv_r``;
4. ``_dq_kernel`` (query tiles x heads): ``dx = Compose_pre^T(dy)``, ``dQ = scale dx K``, the pre-Compose's query-side
   weight gradients;
5. ``_dkv_kernel`` (key tiles x heads): ``dK = scale dx^T Q``, ``dV = P'^T dO`` and every key-side weight gradient
   (column sums).

No atomics (every output element has one writer), so the result is deterministic. Every kernel recomputes its tiles'
scores (``QKᵀ``, ``dO Vᵀ``) once more, so where a query sees many keys the blockwise backward (which keeps them) is
faster; ``auto`` trains windowed layers on this one where its backward would otherwise be the blockwise one
(:data:`headmix.ops.triton.op.PROJECTED_BACKWARD_MAX_WINDOW`; timings in docs/kernels_log.md, "The projected backward
timed").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import projected  # (projected.TILES, read at each call: a benchmark's sweep may change them)
from .launch import FIELDS, _check, _flags, _mask_args
from .projected import (SUMS_DTYPE, _add_sums, _compose_head, _fields, _head_frame, _head_program, _load_sums, _pair,
                        _pair_group, _post_sums_kernel, _pre_sums_kernel, _q_tile, _scores, _store_sums, _zero_sums)
from .tiles import KEY_GATE, KEY_LOWRANK, QUERY_GATE, QUERY_LOWRANK, _query_range, _valid

# Tiles (BM, BN, warps, stages); the forward's sums kernels keep projected.TILES. The best of an 8-candidate sweep per
# kernel, one kernel at a time (H200, triton 3.6, bf16, 16 x 64, B = 8 x 2048, causal; backward ms with the kernel at
# the candidate): 23.8 at the first, spill-free offline choice (post_rows (64, 32, 8, 2), dq (32, 32, 4, 2), dkv (16,
# 32, 4, 2), dz_sums (32, 64, 4, 2)) -> 17.8. Three of them spill a little on the device (post_rows 16, dq 46, dkv 6
# bytes) and are still the fastest; at window 256 they took 6.28 against 7.37 ms (16 x 128), 12.25 against 14.34
# (32 x 80), 12.51 against 14.59 (32 x 128). docs/kernels_log.md, "The projected backward timed".
TILES = {"dz_sums": (64, 32, 4, 2), "post_rows": (64, 32, 4, 2), "dy_sums": (16, 32, 4, 2), "dq": (64, 32, 4, 2),
         "dkv": (32, 32, 4, 2)}


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b)


@triton.jit
def _rows_of(ptr, b, head, offs, ok, sb, sh, st, offs_d, d_ok):
    """A ``(BLOCK, DP)`` tile of rows ``offs`` of head ``head`` (zeros past the head dim)."""
    return tl.load(ptr + b * sb + head * sh + offs[:, None] * st + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                   other=0.0)


@triton.jit
def _head_dims(D, DV, DP: tl.constexpr, DVP: tl.constexpr):
    """``(offs_d, d_ok, offs_e, e_ok)``: the (padded) key and value head dims and which of them are real."""
    offs_d = tl.arange(0, DP)
    offs_e = tl.arange(0, DVP)
    return offs_d, offs_d < D, offs_e, offs_e < DV


@triton.jit
def _zero_grads(N: tl.constexpr):
    """One side's weight-gradient accumulators over ``N`` rows or columns: ``w1``, ``w2`` (ranks 0, 1), gate."""
    zero = tl.zeros((N,), dtype=tl.float32)
    return zero, zero, zero, zero, zero


@triton.jit
def _sums(ptr, bg, offs_i, i_ok, offs_j, j_ok, valid, T, S, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
          FLAGS: tl.constexpr):
    """A tile's four stored sums, zero where no pair is allowed (a tile no sums program saw was never written)."""
    a0, a1, b0, b1 = _load_sums(ptr, bg, offs_i, i_ok, offs_j, j_ok, T, S, R, BM, BN, FLAGS)
    return tl.where(valid, a0, 0.0), tl.where(valid, a1, 0.0), tl.where(valid, b0, 0.0), tl.where(valid, b1, 0.0)


@triton.jit
def _store_w(ptr, vec, b, pos, ok, n, g, r, m, G: tl.constexpr, R: tl.constexpr, M: tl.constexpr):
    tl.store(ptr + ((b * n + pos) * G + g) * (R * M) + r * M + m, vec, mask=ok)


@triton.jit
def _store_gate(ptr, vec, b, pos, ok, n, g, m, G: tl.constexpr, M: tl.constexpr):
    tl.store(ptr + ((b * n + pos) * G + g) * M + m, vec, mask=ok)


@triton.jit
def _store_grads(w1_ptr, w2_ptr, gate_ptr, a1_0, a1_1, a2_0, a2_1, ag, b, pos, ok, n, g, m, G: tl.constexpr,
                 R: tl.constexpr, M: tl.constexpr, LOWRANK: tl.constexpr, GATE: tl.constexpr):
    """One side's weight gradients of head ``m`` at positions ``pos``: ``w1`` (rank 0, 1), ``w2``, gate."""
    if LOWRANK:
        _store_w(w1_ptr, a1_0, b, pos, ok, n, g, 0, m, G, R, M)
        _store_w(w2_ptr, a2_0, b, pos, ok, n, g, 0, m, G, R, M)
        if R > 1:
            _store_w(w1_ptr, a1_1, b, pos, ok, n, g, 1, m, G, R, M)
            _store_w(w2_ptr, a2_1, b, pos, ok, n, g, 1, m, G, R, M)
    if GATE:
        _store_gate(gate_ptr, ag, b, pos, ok, n, g, m, G, M)


@triton.jit
def _dz_sums_kernel(do_ptr, v_ptr, dc_ptr, p2, pk2, sob, soh, sot, svb, svh, svs, T, S, DV, off, rep,
                    G: tl.constexpr, M: tl.constexpr, R: tl.constexpr, DVP: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, POST_FLAGS: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                    IEEE: tl.constexpr):
    """``dU_r = Σ_g w2q'_r,g dz_g``, ``dV_r = Σ_g w2k'_r,g dz_g`` of one tile pair (``dz_g = dO_g V_g^T``), stored."""
    offs_i, i_ok, offs_j, j_ok, seen = _pair(T, S, off, BM, BN, CAUSAL, WINDOW)
    if seen:
        bg, b, g = _pair_group(G)
        offs_e = tl.arange(0, DVP)
        e_ok = offs_e < DV
        a0, a1, c0, c1 = _zero_sums(BM, BN)
        for m in range(M):
            head = g * M + m
            dot_ = _rows_of(do_ptr, b, head, offs_i, i_ok, sob, soh, sot, offs_e, e_ok)
            vt = _rows_of(v_ptr, b, head // rep, offs_j, j_ok, svb, svh, svs, offs_e, e_ok)
            dz = _dot(dot_, tl.trans(vt), IEEE)
            a0, a1, c0, c1 = _add_sums(a0, a1, c0, c1, dz, p2, pk2, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m, G, R, M,
                                       POST_FLAGS)
        _store_sums(dc_ptr, a0, a1, c0, c1, bg, offs_i, i_ok, offs_j, j_ok, T, S, R, POST_FLAGS)


@triton.jit
def _recompute(qt, k_ptr, v_ptr, dot_, uv_ptr, dc_ptr, mask_ptr, lse, q2, k2, qg, kg, p1, pk1, pqg, pkg,
               b, g, m, bg, head, rep, offs_i, i_ok, offs_j, j_ok, offs_d, d_ok, offs_e, e_ok, skb, skh, sks,
               svb, svh, svs, smb, smt, sms, T, S, off, scale, G: tl.constexpr, M: tl.constexpr, R: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, FLAGS: tl.constexpr, POST_FLAGS: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
    """One head's tile up to ``dp``: ``(valid, x, u0, u1, v0, v1, p, dz, dU0, dU1, dV0, dV1, dp)``."""
    valid = _valid(b, offs_i, offs_j, T, S, off, mask_ptr, smb, smt, sms, CAUSAL, WINDOW, HAS_MASK)
    x = _scores(qt, k_ptr, b, head, rep, offs_j, j_ok, offs_d, d_ok, skb, skh, sks, scale, IEEE)
    u0, u1, v0, v1 = _sums(uv_ptr, bg, offs_i, i_ok, offs_j, j_ok, valid, T, S, R, BM, BN, FLAGS)
    y = _compose_head(x, u0, u1, v0, v1, q2, k2, qg, kg, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m, G, R, M, FLAGS)
    p = tl.where(valid, tl.exp(y - lse[:, None]), 0.0)
    vt = _rows_of(v_ptr, b, head // rep, offs_j, j_ok, svb, svh, svs, offs_e, e_ok)
    dz = _dot(dot_, tl.trans(vt), IEEE)
    du0, du1, dv0, dv1 = _sums(dc_ptr, bg, offs_i, i_ok, offs_j, j_ok, valid, T, S, R, BM, BN, POST_FLAGS)
    dp = _compose_head(dz, du0, du1, dv0, dv1, p1, pk1, pqg, pkg, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m, G, R, M,
                       POST_FLAGS)
    return valid, x, u0, u1, v0, v1, p, dz, du0, du1, dv0, dv1, dp


@triton.jit
def _query_head(q_ptr, do_ptr, lse_ptr, sqb, sqh, sqt, sob, soh, sot, T, S, D, DV, off, G: tl.constexpr,
                M: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """A query-major per-head program's frame: ``(bh, b, head, g, m, bg, offs_i, i_ok, offs_d, d_ok, offs_e, e_ok,
    lo, hi)``, its query tile, its ``dO`` tile and its rows' ``lse``."""
    bh, b, head, g, m, bg, offs_i, i_ok, lo, hi = _head_frame(T, S, off, G, M, BM, BN, CAUSAL, WINDOW)
    offs_d, d_ok, offs_e, e_ok = _head_dims(D, DV, DP, DVP)
    qt = _q_tile(q_ptr, b, head, offs_i, i_ok, offs_d, d_ok, sqb, sqh, sqt)
    dot_ = _rows_of(do_ptr, b, head, offs_i, i_ok, sob, soh, sot, offs_e, e_ok)
    lse = tl.load(lse_ptr + bh * T + offs_i, mask=i_ok, other=float("inf"))
    return bh, b, head, g, m, bg, offs_i, i_ok, offs_d, d_ok, offs_e, e_ok, lo, hi, qt, dot_, lse


@triton.jit
def _post_rows_kernel(q_ptr, k_ptr, v_ptr, do_ptr, uv_ptr, pv_ptr, dc_ptr, lse_ptr, delta_ptr, mask_ptr,
                      q2, k2, qg, kg, p1, pk1, pqg, pkg, gw1, gw2, gg,
                      sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot, smb, smt, sms,
                      T, S, D, DV, off, scale, rep,
                      G: tl.constexpr, M: tl.constexpr, R: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, FLAGS: tl.constexpr, POST_FLAGS: tl.constexpr,
                      CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
    """``Δ = Σ_j p dp`` of one head's query tile and the post-Compose's query-side weight gradients (row sums):
    ``dw2q'_r = Σ_j dz U_r``, ``dw1q'_r = Σ_j dU_r p``, ``dg_q' = Σ_j dz p``."""
    bh, b, head, g, m, bg, offs_i, i_ok, offs_d, d_ok, offs_e, e_ok, lo, hi, qt, dot_, lse = _query_head(
        q_ptr, do_ptr, lse_ptr, sqb, sqh, sqt, sob, soh, sot, T, S, D, DV, off, G, M, DP, DVP, BM, BN, CAUSAL, WINDOW)
    delta = tl.zeros((BM,), dtype=tl.float32)
    a1_0, a1_1, a2_0, a2_1, ag = _zero_grads(BM)
    for start_j in range(lo, hi, BN):
        offs_j = start_j + tl.arange(0, BN)
        j_ok = offs_j < S
        valid, x, u0, u1, v0, v1, p, dz, du0, du1, dv0, dv1, dp = _recompute(
            qt, k_ptr, v_ptr, dot_, uv_ptr, dc_ptr, mask_ptr, lse, q2, k2, qg, kg, p1, pk1, pqg, pkg,
            b, g, m, bg, head, rep, offs_i, i_ok, offs_j, j_ok, offs_d, d_ok, offs_e, e_ok, skb, skh, sks,
            svb, svh, svs, smb, smt, sms, T, S, off, scale, G, M, R, BM, BN, FLAGS, POST_FLAGS, CAUSAL, WINDOW,
            HAS_MASK, IEEE)
        delta += tl.sum(p * dp, 1)
        if QUERY_LOWRANK & POST_FLAGS:
            pu0, pu1, _, _ = _sums(pv_ptr, bg, offs_i, i_ok, offs_j, j_ok, valid, T, S, R, BM, BN,
                                   QUERY_LOWRANK & POST_FLAGS)
            a2_0 += tl.sum(dz * pu0, 1)
            a2_1 += tl.sum(dz * pu1, 1)
            a1_0 += tl.sum(du0 * p, 1)
            a1_1 += tl.sum(du1 * p, 1)
        if QUERY_GATE & POST_FLAGS:
            ag += tl.sum(dz * p, 1)
    tl.store(delta_ptr + bh * T + offs_i, delta, mask=i_ok)
    _store_grads(gw1, gw2, gg, a1_0, a1_1, a2_0, a2_1, ag, b, offs_i, i_ok, T, g, m, G, R, M,
                 (QUERY_LOWRANK & POST_FLAGS) != 0, (QUERY_GATE & POST_FLAGS) != 0)


@triton.jit
def _dy_sums_kernel(q_ptr, k_ptr, v_ptr, do_ptr, uv_ptr, dc_ptr, dh_ptr, lse_ptr, delta_ptr, mask_ptr,
                    q2, k2, qg, kg, p1, pk1, pqg, pkg, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot,
                    smb, smt, sms, T, S, D, DV, off, scale, rep,
                    G: tl.constexpr, M: tl.constexpr, R: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, FLAGS: tl.constexpr, POST_FLAGS: tl.constexpr,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
    """The pre adjoint's sums ``dHu_r = Σ_g w2q_r,g dy_g``, ``dHv_r`` of one tile pair, ``dy_g = p_g (dp_g - Δ_g)``."""
    offs_i, i_ok, offs_j, j_ok, seen = _pair(T, S, off, BM, BN, CAUSAL, WINDOW)
    if seen:
        bg, b, g = _pair_group(G)
        offs_d, d_ok, offs_e, e_ok = _head_dims(D, DV, DP, DVP)
        a0, a1, c0, c1 = _zero_sums(BM, BN)
        for m in range(M):
            head = g * M + m
            qt = _q_tile(q_ptr, b, head, offs_i, i_ok, offs_d, d_ok, sqb, sqh, sqt)
            dot_ = _rows_of(do_ptr, b, head, offs_i, i_ok, sob, soh, sot, offs_e, e_ok)
            lse = tl.load(lse_ptr + (b * (G * M) + head) * T + offs_i, mask=i_ok, other=float("inf"))
            delta = tl.load(delta_ptr + (b * (G * M) + head) * T + offs_i, mask=i_ok, other=0.0)
            valid, x, u0, u1, v0, v1, p, dz, du0, du1, dv0, dv1, dp = _recompute(
                qt, k_ptr, v_ptr, dot_, uv_ptr, dc_ptr, mask_ptr, lse, q2, k2, qg, kg, p1, pk1, pqg, pkg,
                b, g, m, bg, head, rep, offs_i, i_ok, offs_j, j_ok, offs_d, d_ok, offs_e, e_ok, skb, skh, sks,
                svb, svh, svs, smb, smt, sms, T, S, off, scale, G, M, R, BM, BN, FLAGS, POST_FLAGS, CAUSAL, WINDOW,
                HAS_MASK, IEEE)
            dy = p * (dp - delta[:, None])
            a0, a1, c0, c1 = _add_sums(a0, a1, c0, c1, dy, q2, k2, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m, G, R, M,
                                       FLAGS)
        _store_sums(dh_ptr, a0, a1, c0, c1, bg, offs_i, i_ok, offs_j, j_ok, T, S, R, FLAGS)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, uv_ptr, dc_ptr, dh_ptr, lse_ptr, delta_ptr, mask_ptr,
               q1, q2, k1, k2, qg, kg, p1, pk1, pqg, pkg, gw1, gw2, gg,
               sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot, smb, smt, sms, T, S, D, DV, off, scale, rep,
               G: tl.constexpr, M: tl.constexpr, R: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, FLAGS: tl.constexpr, POST_FLAGS: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
    """``dQ = scale Σ_j dx K`` of one head's query tile and the pre-Compose's query-side weight gradients:
    ``dw2q_r = Σ_j dy u_r``, ``dw1q_r = Σ_j dHu_r x``, ``dg_q = Σ_j dy x``."""
    bh, b, head, g, m, bg, offs_i, i_ok, offs_d, d_ok, offs_e, e_ok, lo, hi, qt, dot_, lse = _query_head(
        q_ptr, do_ptr, lse_ptr, sqb, sqh, sqt, sob, soh, sot, T, S, D, DV, off, G, M, DP, DVP, BM, BN, CAUSAL, WINDOW)
    delta = tl.load(delta_ptr + bh * T + offs_i, mask=i_ok, other=0.0)
    acc = tl.zeros((BM, DP), dtype=tl.float32)
    a1_0, a1_1, a2_0, a2_1, ag = _zero_grads(BM)
    for start_j in range(lo, hi, BN):
        offs_j = start_j + tl.arange(0, BN)
        j_ok = offs_j < S
        valid, x, u0, u1, v0, v1, p, dz, du0, du1, dv0, dv1, dp = _recompute(
            qt, k_ptr, v_ptr, dot_, uv_ptr, dc_ptr, mask_ptr, lse, q2, k2, qg, kg, p1, pk1, pqg, pkg,
            b, g, m, bg, head, rep, offs_i, i_ok, offs_j, j_ok, offs_d, d_ok, offs_e, e_ok, skb, skh, sks,
            svb, svh, svs, smb, smt, sms, T, S, off, scale, G, M, R, BM, BN, FLAGS, POST_FLAGS, CAUSAL, WINDOW,
            HAS_MASK, IEEE)
        dy = p * (dp - delta[:, None])
        h0, h1, e0, e1 = _sums(dh_ptr, bg, offs_i, i_ok, offs_j, j_ok, valid, T, S, R, BM, BN, FLAGS)
        dx = _compose_head(dy, h0, h1, e0, e1, q1, k1, qg, kg, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m, G, R, M,
                           FLAGS)
        kt = _rows_of(k_ptr, b, head // rep, offs_j, j_ok, skb, skh, sks, offs_d, d_ok)
        acc += _dot(dx, kt, IEEE)
        if QUERY_LOWRANK & FLAGS:
            a2_0 += tl.sum(dy * u0, 1)
            a2_1 += tl.sum(dy * u1, 1)
            a1_0 += tl.sum(h0 * x, 1)
            a1_1 += tl.sum(h1 * x, 1)
        if QUERY_GATE & FLAGS:
            ag += tl.sum(dy * x, 1)
    tl.store(dq_ptr + (bh * T + offs_i[:, None]) * D + offs_d[None, :], (acc * scale).to(dq_ptr.dtype.element_ty),
             mask=i_ok[:, None] & d_ok[None, :])
    _store_grads(gw1, gw2, gg, a1_0, a1_1, a2_0, a2_1, ag, b, offs_i, i_ok, T, g, m, G, R, M,
                 (QUERY_LOWRANK & FLAGS) != 0, (QUERY_GATE & FLAGS) != 0)


@triton.jit
def _dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, uv_ptr, pv_ptr, dc_ptr, dh_ptr, lse_ptr, delta_ptr,
                mask_ptr, q1, q2, k1, k2, qg, kg, p1, p2, pk1, pk2, pqg, pkg, gw1, gw2, gg, gpw1, gpw2, gpg,
                sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot, smb, smt, sms, T, S, D, DV, off, scale,
                rep, G: tl.constexpr, M: tl.constexpr, R: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, FLAGS: tl.constexpr, POST_FLAGS: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
    """``dK = scale Σ_i dx^T Q``, ``dV = Σ_i P'^T dO`` of one query head's key tile (per query head: the host sums
    grouped heads), and every key-side weight gradient of both Composes (column sums), pre (``gw*``) and post
    (``gpw*``)."""
    pid_j = tl.program_id(0)
    bh, b, head, g, m, bg = _head_program(G, M)
    offs_j = pid_j * BN + tl.arange(0, BN)
    j_ok = offs_j < S
    offs_d, d_ok, offs_e, e_ok = _head_dims(D, DV, DP, DVP)
    lo, hi = _query_range(pid_j * BN, T, S, off, BM, BN, CAUSAL, WINDOW)
    dk = tl.zeros((BN, DP), dtype=tl.float32)
    dv = tl.zeros((BN, DVP), dtype=tl.float32)
    e1_0, e1_1, e2_0, e2_1, eg = _zero_grads(BN)  # the pre-Compose's key side
    c1_0, c1_1, c2_0, c2_1, cg = _zero_grads(BN)  # the post-Compose's
    for start_i in range(lo, hi, BM):
        offs_i = start_i + tl.arange(0, BM)
        i_ok = offs_i < T
        qt = _q_tile(q_ptr, b, head, offs_i, i_ok, offs_d, d_ok, sqb, sqh, sqt)
        dot_ = _rows_of(do_ptr, b, head, offs_i, i_ok, sob, soh, sot, offs_e, e_ok)
        lse = tl.load(lse_ptr + bh * T + offs_i, mask=i_ok, other=float("inf"))
        delta = tl.load(delta_ptr + bh * T + offs_i, mask=i_ok, other=0.0)
        valid, x, u0, u1, v0, v1, p, dz, du0, du1, dv0, dv1, dp = _recompute(
            qt, k_ptr, v_ptr, dot_, uv_ptr, dc_ptr, mask_ptr, lse, q2, k2, qg, kg, p1, pk1, pqg, pkg,
            b, g, m, bg, head, rep, offs_i, i_ok, offs_j, j_ok, offs_d, d_ok, offs_e, e_ok, skb, skh, sks,
            svb, svh, svs, smb, smt, sms, T, S, off, scale, G, M, R, BM, BN, FLAGS, POST_FLAGS, CAUSAL, WINDOW,
            HAS_MASK, IEEE)
        pu0, pu1, pv0, pv1 = _sums(pv_ptr, bg, offs_i, i_ok, offs_j, j_ok, valid, T, S, R, BM, BN, POST_FLAGS)
        z = _compose_head(p, pu0, pu1, pv0, pv1, p2, pk2, pqg, pkg, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m, G, R,
                          M, POST_FLAGS)
        dv += _dot(tl.trans(z), dot_, IEEE)
        dy = p * (dp - delta[:, None])
        h0, h1, f0, f1 = _sums(dh_ptr, bg, offs_i, i_ok, offs_j, j_ok, valid, T, S, R, BM, BN, FLAGS)
        dx = _compose_head(dy, h0, h1, f0, f1, q1, k1, qg, kg, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m, G, R, M,
                           FLAGS)
        dk += _dot(tl.trans(dx), qt, IEEE)
        if KEY_LOWRANK & POST_FLAGS:
            c2_0 += tl.sum(dz * pv0, 0)
            c2_1 += tl.sum(dz * pv1, 0)
            c1_0 += tl.sum(dv0 * p, 0)
            c1_1 += tl.sum(dv1 * p, 0)
        if KEY_GATE & POST_FLAGS:
            cg += tl.sum(dz * p, 0)
        if KEY_LOWRANK & FLAGS:
            e2_0 += tl.sum(dy * v0, 0)
            e2_1 += tl.sum(dy * v1, 0)
            e1_0 += tl.sum(f0 * x, 0)
            e1_1 += tl.sum(f1 * x, 0)
        if KEY_GATE & FLAGS:
            eg += tl.sum(dy * x, 0)
    tl.store(dk_ptr + (bh * S + offs_j[:, None]) * D + offs_d[None, :], dk * scale,
             mask=j_ok[:, None] & d_ok[None, :])
    tl.store(dv_ptr + (bh * S + offs_j[:, None]) * DV + offs_e[None, :], dv, mask=j_ok[:, None] & e_ok[None, :])
    _store_grads(gw1, gw2, gg, e1_0, e1_1, e2_0, e2_1, eg, b, offs_j, j_ok, S, g, m, G, R, M,
                 (KEY_LOWRANK & FLAGS) != 0, (KEY_GATE & FLAGS) != 0)
    _store_grads(gpw1, gpw2, gpg, c1_0, c1_1, c2_0, c2_1, cg, b, offs_j, j_ok, S, g, m, G, R, M,
                 (KEY_LOWRANK & POST_FLAGS) != 0, (KEY_GATE & POST_FLAGS) != 0)


def _grads(w, dtype_device: Tensor, dummy: Tensor) -> dict:
    """Float32 gradient buffers for the present dynamic fields of ``w`` (``dummy`` for the others)."""
    return {f: (dummy if w is None or getattr(w, f) is None else
                torch.empty(getattr(w, f).shape, dtype=torch.float32, device=dtype_device.device))
            for f in FIELDS[1:]}


def projected_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, scale: float, mask: Tensor | None,
                       pre, post, groups: int, causal: bool, window: int, offset: int):
    """Gradients ``(dq, dk, dv, dpre, dpost)`` as :func:`headmix.ops.triton.launch.triton_backward` (``dpre``,
    ``dpost``: ``{field: gradient}`` of the present fields), from any forward's ``lse``. Rank 1 or 2, no static mix
    (:func:`.projected.applies`)."""
    B, H, T, D = q.shape
    S, Hkv, DV = k.shape[2], k.shape[1], v.shape[-1]
    M, R = _check(q, k, v, groups, pre, post)
    if R > 2 or any(w is not None and w.static is not None for w in (pre, post)):
        raise ValueError(f"projected backward: rank {R} and a static mix are not supported (rank 1 or 2, no static)")
    q, k, v, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, do))
    lse = lse.contiguous()
    window, rep = int(window or 0), H // Hkv
    DP, DVP = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(DV))
    dummy = q.new_empty(1)
    sums = SUMS_DTYPE.get(q.dtype, torch.float32)
    flags, post_flags = _flags(pre), _flags(post)
    low = 2 | 8

    def buffer(on) -> Tensor:
        return torch.empty(B * groups, 2, R, T, S, dtype=sums, device=q.device) if on else dummy

    uv, dh = buffer(flags & low), buffer(flags & low)
    pv, dc = buffer(post_flags & low), buffer(post_flags & low)
    delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    dq = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, S, D, dtype=torch.float32, device=q.device)
    dv = torch.empty(B, H, S, DV, dtype=torch.float32, device=q.device)
    gpre, gpost = _grads(pre, q, dummy), _grads(post, q, dummy)
    m, smb, smt, sms = _mask_args(mask, T, S, dummy)
    (q1, q2, k1, k2, qg, kg), (p1, p2, pk1, pk2, pqg, pkg) = _fields(pre, dummy), _fields(post, dummy)
    qk = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    vo = (v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    common = dict(G=groups, M=M, R=R, CAUSAL=bool(causal), WINDOW=window, IEEE=q.dtype == torch.float32)
    tensor_mask = dict(HAS_MASK=mask is not None)

    def launch(kernel, tile, grid_of, *args, **consts):
        BM, BN, warps, stages = tile
        kernel[grid_of(BM, BN)](*args, BM=BM, BN=BN, num_warps=warps, num_stages=stages, **common, **consts)

    def pairs(BM, BN):
        return triton.cdiv(T, BM), triton.cdiv(S, BN), B * groups

    def query_tiles(BM, BN):
        return triton.cdiv(T, BM), B * H

    def key_tiles(BM, BN):
        return triton.cdiv(S, BN), B * H

    if flags & low:  # the forward's sums again
        launch(_pre_sums_kernel, projected.TILES["pre_sums"], pairs, q, k, uv, q1, k1, *qk, T, S, D, offset, scale,
               rep, DP=DP, FLAGS=flags)
    if post_flags & low:
        launch(_post_sums_kernel, projected.TILES["post_sums"], pairs, q, k, uv, pv, lse, m, q2, k2, qg, kg, p1, pk1,
               *qk, smb, smt, sms, T, S, D, offset, scale, rep, DP=DP, FLAGS=flags, POST_FLAGS=post_flags,
               **tensor_mask)
        launch(_dz_sums_kernel, TILES["dz_sums"], pairs, do, v, dc, p2, pk2, do.stride(0), do.stride(1),
               do.stride(2), v.stride(0), v.stride(1), v.stride(2), T, S, DV, offset, rep, DVP=DVP,
               POST_FLAGS=post_flags)
    rest = (smb, smt, sms, T, S, D, DV, offset, scale, rep)
    shapes = dict(DP=DP, DVP=DVP, FLAGS=flags, POST_FLAGS=post_flags, **tensor_mask)
    launch(_post_rows_kernel, TILES["post_rows"], query_tiles, q, k, v, do, uv, pv, dc, lse, delta, m,
           q2, k2, qg, kg, p1, pk1, pqg, pkg, gpost["query_w1"], gpost["query_w2"], gpost["query_gate"], *qk, *vo,
           *rest, **shapes)
    if flags & low:
        launch(_dy_sums_kernel, TILES["dy_sums"], pairs, q, k, v, do, uv, dc, dh, lse, delta, m,
               q2, k2, qg, kg, p1, pk1, pqg, pkg, *qk, *vo, *rest, **shapes)
    launch(_dq_kernel, TILES["dq"], query_tiles, q, k, v, do, dq, uv, dc, dh, lse, delta, m,
           q1, q2, k1, k2, qg, kg, p1, pk1, pqg, pkg, gpre["query_w1"], gpre["query_w2"], gpre["query_gate"],
           *qk, *vo, *rest, **shapes)
    launch(_dkv_kernel, TILES["dkv"], key_tiles, q, k, v, do, dk, dv, uv, pv, dc, dh, lse, delta, m,
           q1, q2, k1, k2, qg, kg, p1, p2, pk1, pk2, pqg, pkg, gpre["key_w1"], gpre["key_w2"], gpre["key_gate"],
           gpost["key_w1"], gpost["key_w2"], gpost["key_gate"], *qk, *vo, *rest, **shapes)
    dk = dk.view(B, Hkv, rep, S, D).sum(2).to(k.dtype)
    dv = dv.view(B, Hkv, rep, S, DV).sum(2).to(v.dtype)
    out = [{f: g.to(getattr(w, f).dtype) for f, g in grads.items() if g is not dummy}
           for w, grads in ((pre, gpre), (post, gpost))]
    return dq, dk, dv, *out
