"""The forward with the heads in a loop: each Compose's cross-head sums computed once per (query, key) pair.

A Compose adds to a head's input ``x_h`` at (query ``i``, key ``j``) terms that reach across heads only through the
rank-``R`` sums ``u_r = Σ_g w1q[i, r, g] x_g`` (query-wise) and ``v_r = Σ_g w1k[j, r, g] x_g`` (key-wise)::

    y_h = x_h (1 + gate_q[i, h] + gate_k[j, h]) + Σ_r w2q[i, r, h] u_r + Σ_r w2k[j, r, h] v_r

Once a pair's ``2R`` sums are known, every head's Compose is elementwise, so no program has to hold every head's tile
at once (what limits :mod:`.tiles` to 16 x 16 tiles at 16 heads, and sends :mod:`.blockwise` through memory with
every head's score rectangle). Four kernels, each on ``(BM, BN)`` tiles of one head at a time, every score product a
tensor-core ``tl.dot``:

1. ``_pre_sums_kernel`` (a program per (query tile, key tile, head group)): every head's scores in a loop, summed into
   the pre-Compose's ``u_r, v_r``, stored (float16 for half inputs: as close to a float32 run as float32 sums, where
   bfloat16 sums were not; float32 otherwise);
2. ``_stats_kernel`` (a program per query tile and head, as FlashAttention's forward): ``S'`` of its head from its
   scores and the stored sums, the running row maximum and sum: ``lse``;
3. ``_post_sums_kernel`` (as 1): the probabilities ``P_g = exp(S'_g - lse_g)`` head by head, summed into the
   post-Compose's ``U_r, V_r``, stored;
4. ``_out_kernel`` (as 2): ``S'``, ``P`` and ``P'`` of its head from the stored sums, ``O += P' V``.

The score products run four times per (query, key, head) element (kernels 1 to 4) and ``P' V`` once; the per-head
kernels read ``4R`` stored sums per element (16-bit: L2-resident while a query tile's heads run). Measured against the
tile and blockwise forwards in docs/kernels_log.md ("The projected forward").

Forward only: the training forward (either backward takes its ``lse``), an evaluation, a prefill. Rank 1 or 2, no
static head mix (the released models train without it). The sums buffers take ``4 R B G T S`` numbers, in
query blocks where that would pass :data:`MAX_SUMS_BYTES`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...masks import MaskSpec
from .launch import FIELDS, _check, _flags, _mask_args
from .tiles import KEY_GATE, KEY_LOWRANK, NEG, QUERY_GATE, QUERY_LOWRANK, _key_range, _valid

# Tiles (BM, BN, warps, software-pipeline stages) of the four kernels: the best of a sweep of each kernel's tile in
# turn at 16 x 64, B = 8 x 2048, causal (H200, 2026-12-02, docs/kernels_log.md); the interpreter (CPU tests) takes them
# too.
TILES = {"pre_sums": (64, 32, 4, 3), "stats": (64, 32, 4, 3), "post_sums": (32, 64, 4, 2), "out": (32, 32, 4, 3)}
# The sums buffers' dtype by input dtype (float32 inputs keep float32: the path is then exact to rounding). Half
# inputs: float16 (at 16 x 64, B = 8 x 2048 the output's largest error against a float32 run was 3.98e-3 with float16
# or float32 sums, the blockwise path's own, and 5.30e-3 with bfloat16 ones; sums past float16's range are clamped
# to it).
SUMS_DTYPE = {torch.bfloat16: torch.float16, torch.float16: torch.float16}
# Largest sums buffers (bytes) one call of the kernels may allocate; above it the queries go in blocks.
MAX_SUMS_BYTES = 4 << 30
MIN_BLOCK_ROWS = 64  # the fewest query rows of a block (a multiple of every BM in TILES)


@triton.jit
def _w(ptr, b, pos, ok, n, g, r, m, G: tl.constexpr, R: tl.constexpr, M: tl.constexpr):
    """``w[b, pos, g, r, m]`` of a ``(B, n, G, R, M)`` factor, float32 (0 out of bounds)."""
    return tl.load(ptr + ((b * n + pos) * G + g) * (R * M) + r * M + m, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _gate(ptr, b, pos, ok, n, g, m, G: tl.constexpr, M: tl.constexpr):
    """``gate[b, pos, g, m]`` of a ``(B, n, G, M)`` gate, float32."""
    return tl.load(ptr + ((b * n + pos) * G + g) * M + m, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _q_tile(q_ptr, b, head, offs_i, i_ok, offs_d, d_ok, sqb, sqh, sqt):
    """Head ``head``'s queries ``offs_i``, a ``(BM, DP)`` tile (zeros past the head dim)."""
    return tl.load(q_ptr + b * sqb + head * sqh + offs_i[:, None] * sqt + offs_d[None, :],
                   mask=i_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _scores(qt, k_ptr, b, head, rep, offs_j, j_ok, offs_d, d_ok, skb, skh, sks, scale, IEEE: tl.constexpr):
    """``scale * Q_h K_h^T`` of one head on a ``(BM, BN)`` tile from its query tile ``qt``, float32 (keys of head
    ``head // rep``)."""
    kt = tl.load(k_ptr + b * skb + (head // rep) * skh + offs_j[:, None] * sks + offs_d[None, :],
                 mask=j_ok[:, None] & d_ok[None, :], other=0.0)
    if IEEE:
        x = tl.dot(qt, tl.trans(kt), input_precision="ieee")
    else:
        x = tl.dot(qt, tl.trans(kt))
    return x * scale


@triton.jit
def _add_sums(u0, u1, v0, v1, x, q1, k1, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m,
              G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, FLAGS: tl.constexpr):
    """``u_r += w1q[i, r, m] x``, ``v_r += w1k[j, r, m] x`` (``r < R <= 2``): head ``m``'s share of the sums."""
    if QUERY_LOWRANK & FLAGS:
        u0 += _w(q1, b, offs_i, i_ok, T, g, 0, m, G, R, M)[:, None] * x
        if R > 1:
            u1 += _w(q1, b, offs_i, i_ok, T, g, 1, m, G, R, M)[:, None] * x
    if KEY_LOWRANK & FLAGS:
        v0 += _w(k1, b, offs_j, j_ok, S, g, 0, m, G, R, M)[None, :] * x
        if R > 1:
            v1 += _w(k1, b, offs_j, j_ok, S, g, 1, m, G, R, M)[None, :] * x
    return u0, u1, v0, v1


@triton.jit
def _compose_head(x, u0, u1, v0, v1, q2, k2, qg, kg, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m,
                  G: tl.constexpr, R: tl.constexpr, M: tl.constexpr, FLAGS: tl.constexpr):
    """Head ``m``'s Compose output from its input ``x`` and the pair's sums ``u_r``, ``v_r`` (``(BM, BN)`` each)."""
    y = x
    if QUERY_LOWRANK & FLAGS:
        y += _w(q2, b, offs_i, i_ok, T, g, 0, m, G, R, M)[:, None] * u0
        if R > 1:
            y += _w(q2, b, offs_i, i_ok, T, g, 1, m, G, R, M)[:, None] * u1
    if KEY_LOWRANK & FLAGS:
        y += _w(k2, b, offs_j, j_ok, S, g, 0, m, G, R, M)[None, :] * v0
        if R > 1:
            y += _w(k2, b, offs_j, j_ok, S, g, 1, m, G, R, M)[None, :] * v1
    if QUERY_GATE & FLAGS:
        y += _gate(qg, b, offs_i, i_ok, T, g, m, G, M)[:, None] * x
    if KEY_GATE & FLAGS:
        y += _gate(kg, b, offs_j, j_ok, S, g, m, G, M)[None, :] * x
    return y


@triton.jit
def _sums_at(bg, k, offs_i, offs_j, T, S, R: tl.constexpr):
    """Offsets of a ``(BM, BN)`` tile of sum ``k`` (``side * R + r``; side 0 query-wise, 1 key-wise) in a
    ``(B G, 2, R, T, S)`` sums buffer."""
    return ((bg * (2 * R) + k).to(tl.int64) * T + offs_i[:, None]) * S + offs_j[None, :]


@triton.jit
def _store_sums(ptr, u0, u1, v0, v1, bg, offs_i, i_ok, offs_j, j_ok, T, S, R: tl.constexpr, FLAGS: tl.constexpr):
    """Store a tile pair's sums (float16 buffers: clamped to its finite range, so a huge score saturates the softmax
    instead of making ``inf - inf``)."""
    ok = i_ok[:, None] & j_ok[None, :]
    ty = ptr.dtype.element_ty
    if ty == tl.float16:
        u0 = tl.minimum(tl.maximum(u0, -65504.0), 65504.0)
        u1 = tl.minimum(tl.maximum(u1, -65504.0), 65504.0)
        v0 = tl.minimum(tl.maximum(v0, -65504.0), 65504.0)
        v1 = tl.minimum(tl.maximum(v1, -65504.0), 65504.0)
    if QUERY_LOWRANK & FLAGS:
        tl.store(ptr + _sums_at(bg, 0, offs_i, offs_j, T, S, R), u0.to(ty), mask=ok)
        if R > 1:
            tl.store(ptr + _sums_at(bg, 1, offs_i, offs_j, T, S, R), u1.to(ty), mask=ok)
    if KEY_LOWRANK & FLAGS:
        tl.store(ptr + _sums_at(bg, R, offs_i, offs_j, T, S, R), v0.to(ty), mask=ok)
        if R > 1:
            tl.store(ptr + _sums_at(bg, R + 1, offs_i, offs_j, T, S, R), v1.to(ty), mask=ok)


@triton.jit
def _load_sum(ptr, bg, k, offs_i, i_ok, offs_j, j_ok, T, S, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              ON: tl.constexpr):
    """Stored sum ``k`` on a ``(BM, BN)`` tile, float32 (zeros unless ``ON``)."""
    if ON:
        return tl.load(ptr + _sums_at(bg, k, offs_i, offs_j, T, S, R), mask=i_ok[:, None] & j_ok[None, :],
                       other=0.0).to(tl.float32)
    else:
        return tl.zeros((BM, BN), dtype=tl.float32)


@triton.jit
def _load_sums(ptr, bg, offs_i, i_ok, offs_j, j_ok, T, S, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               FLAGS: tl.constexpr):
    """``u0, u1, v0, v1`` of a tile from a sums buffer (zeros for absent terms)."""
    q_on: tl.constexpr = (QUERY_LOWRANK & FLAGS) != 0
    k_on: tl.constexpr = (KEY_LOWRANK & FLAGS) != 0
    u0 = _load_sum(ptr, bg, 0, offs_i, i_ok, offs_j, j_ok, T, S, R, BM, BN, q_on)
    u1 = _load_sum(ptr, bg, 1, offs_i, i_ok, offs_j, j_ok, T, S, R, BM, BN, q_on and R > 1)
    v0 = _load_sum(ptr, bg, R, offs_i, i_ok, offs_j, j_ok, T, S, R, BM, BN, k_on)
    v1 = _load_sum(ptr, bg, R + 1, offs_i, i_ok, offs_j, j_ok, T, S, R, BM, BN, k_on and R > 1)
    return u0, u1, v0, v1


@triton.jit
def _pair(T, S, off, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """A sums program's tile pair: ``(offs_i, i_ok, offs_j, j_ok, seen)`` (``seen``: the mask's structure lets some
    query of the tile see some key of it)."""
    pid_i = tl.program_id(0)
    start_j = tl.program_id(1) * BN
    lo, hi = _key_range(pid_i * BM, T, S, off, BM, BN, CAUSAL, WINDOW)
    offs_i = pid_i * BM + tl.arange(0, BM)
    offs_j = start_j + tl.arange(0, BN)
    return offs_i, offs_i < T, offs_j, offs_j < S, (start_j + BN > lo) & (start_j < hi)


@triton.jit
def _pair_group(G: tl.constexpr):
    """A sums program's ``(batch x group, batch, group)``."""
    bg = tl.program_id(2)
    return bg, bg // G, bg % G


@triton.jit
def _zero_sums(BM: tl.constexpr, BN: tl.constexpr):
    """Four float32 ``(BM, BN)`` accumulators of a tile pair's sums."""
    return (tl.zeros((BM, BN), dtype=tl.float32), tl.zeros((BM, BN), dtype=tl.float32),
            tl.zeros((BM, BN), dtype=tl.float32), tl.zeros((BM, BN), dtype=tl.float32))


@triton.jit
def _pre_sums_kernel(q_ptr, k_ptr, uv_ptr, q1, k1, sqb, sqh, sqt, skb, skh, sks, T, S, D, off, scale, rep,
                     G: tl.constexpr, M: tl.constexpr, R: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, FLAGS: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                     IEEE: tl.constexpr):
    """The pre-Compose's sums ``u_r, v_r`` of one tile pair (every head's scores in a loop), stored."""
    offs_i, i_ok, offs_j, j_ok, seen = _pair(T, S, off, BM, BN, CAUSAL, WINDOW)
    if seen:
        bg, b, g = _pair_group(G)
        offs_d = tl.arange(0, DP)
        u0, u1, v0, v1 = _zero_sums(BM, BN)
        for m in range(M):
            qt = _q_tile(q_ptr, b, g * M + m, offs_i, i_ok, offs_d, offs_d < D, sqb, sqh, sqt)
            x = _scores(qt, k_ptr, b, g * M + m, rep, offs_j, j_ok, offs_d, offs_d < D, skb, skh, sks, scale, IEEE)
            u0, u1, v0, v1 = _add_sums(u0, u1, v0, v1, x, q1, k1, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m, G, R, M,
                                       FLAGS)
        _store_sums(uv_ptr, u0, u1, v0, v1, bg, offs_i, i_ok, offs_j, j_ok, T, S, R, FLAGS)


@triton.jit
def _post_sums_kernel(q_ptr, k_ptr, uv_ptr, pv_ptr, lse_ptr, mask_ptr, q2, k2, qg, kg, p1, pk1,
                      sqb, sqh, sqt, skb, skh, sks, smb, smt, sms, T, S, D, off, scale, rep,
                      G: tl.constexpr, M: tl.constexpr, R: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, FLAGS: tl.constexpr, POST_FLAGS: tl.constexpr, CAUSAL: tl.constexpr,
                      WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
    """The post-Compose's sums ``U_r, V_r`` of one tile pair, from every head's ``P_g = exp(S'_g - lse_g)``, stored."""
    offs_i, i_ok, offs_j, j_ok, seen = _pair(T, S, off, BM, BN, CAUSAL, WINDOW)
    if seen:
        bg, b, g = _pair_group(G)
        offs_d = tl.arange(0, DP)
        u0, u1, v0, v1 = _load_sums(uv_ptr, bg, offs_i, i_ok, offs_j, j_ok, T, S, R, BM, BN, FLAGS)
        pu0, pu1, pv0, pv1 = _zero_sums(BM, BN)
        valid = _valid(b, offs_i, offs_j, T, S, off, mask_ptr, smb, smt, sms, CAUSAL, WINDOW, HAS_MASK)
        for m in range(M):
            qt = _q_tile(q_ptr, b, g * M + m, offs_i, i_ok, offs_d, offs_d < D, sqb, sqh, sqt)
            x = _scores(qt, k_ptr, b, g * M + m, rep, offs_j, j_ok, offs_d, offs_d < D, skb, skh, sks, scale, IEEE)
            y = _compose_head(x, u0, u1, v0, v1, q2, k2, qg, kg, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m, G, R, M,
                              FLAGS)
            lse = tl.load(lse_ptr + (b * (G * M) + g * M + m) * T + offs_i, mask=i_ok, other=float("inf"))
            p = tl.where(valid, tl.exp(y - lse[:, None]), 0.0)
            pu0, pu1, pv0, pv1 = _add_sums(pu0, pu1, pv0, pv1, p, p1, pk1, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m,
                                           G, R, M, POST_FLAGS)
        _store_sums(pv_ptr, pu0, pu1, pv0, pv1, bg, offs_i, i_ok, offs_j, j_ok, T, S, R, POST_FLAGS)


@triton.jit
def _head_program(G: tl.constexpr, M: tl.constexpr):
    """A per-head program's ``(bh, b, head, g, m, bg)`` from grid axis 1 (one (batch, query head) each)."""
    bh = tl.program_id(1)
    b = bh // (G * M)
    head = bh % (G * M)
    g = head // M
    return bh, b, head, g, head % M, b * G + g


@triton.jit
def _head_frame(T, S, off, G: tl.constexpr, M: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """A query-major per-head program's ``(bh, b, head, g, m, bg, offs_i, i_ok, lo, hi)``."""
    pid_i = tl.program_id(0)
    bh, b, head, g, m, bg = _head_program(G, M)
    offs_i = pid_i * BM + tl.arange(0, BM)
    lo, hi = _key_range(pid_i * BM, T, S, off, BM, BN, CAUSAL, WINDOW)
    return bh, b, head, g, m, bg, offs_i, offs_i < T, lo, hi


@triton.jit
def _stats_kernel(q_ptr, k_ptr, uv_ptr, lse_ptr, mask_ptr, q2, k2, qg, kg,
                  sqb, sqh, sqt, skb, skh, sks, smb, smt, sms, T, S, D, off, scale, rep,
                  G: tl.constexpr, M: tl.constexpr, R: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, FLAGS: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                  HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
    """One head's row ``lse`` of ``S' = Compose_pre(scale Q K^T)`` (``+inf`` where no key is allowed)."""
    bh, b, head, g, m, bg, offs_i, i_ok, lo, hi = _head_frame(T, S, off, G, M, BM, BN, CAUSAL, WINDOW)
    offs_d = tl.arange(0, DP)
    qt = _q_tile(q_ptr, b, head, offs_i, i_ok, offs_d, offs_d < D, sqb, sqh, sqt)
    m_i = tl.full((BM,), NEG, dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    for start_j in range(lo, hi, BN):
        offs_j = start_j + tl.arange(0, BN)
        j_ok = offs_j < S
        x = _scores(qt, k_ptr, b, head, rep, offs_j, j_ok, offs_d, offs_d < D, skb, skh, sks, scale, IEEE)
        u0, u1, v0, v1 = _load_sums(uv_ptr, bg, offs_i, i_ok, offs_j, j_ok, T, S, R, BM, BN, FLAGS)
        y = _compose_head(x, u0, u1, v0, v1, q2, k2, qg, kg, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m, G, R, M,
                          FLAGS)
        valid = _valid(b, offs_i, offs_j, T, S, off, mask_ptr, smb, smt, sms, CAUSAL, WINDOW, HAS_MASK)
        y = tl.where(valid, y, NEG)
        m_new = tl.maximum(m_i, tl.max(y, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.where(valid, tl.exp(y - m_new[:, None]), 0.0), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    tl.store(lse_ptr + bh * T + offs_i, lse, mask=i_ok)


@triton.jit
def _out_kernel(q_ptr, k_ptr, v_ptr, o_ptr, uv_ptr, pv_ptr, lse_ptr, mask_ptr, q2, k2, qg, kg,
                p2, pk2, pqg, pkg, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, smb, smt, sms,
                T, S, D, DV, off, scale, rep,
                G: tl.constexpr, M: tl.constexpr, R: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, FLAGS: tl.constexpr, POST_FLAGS: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr):
    """``O_h = P'_h V_h`` of one head (``P'_h`` from its own ``P_h`` and the stored post-Compose sums)."""
    bh, b, head, g, m, bg, offs_i, i_ok, lo, hi = _head_frame(T, S, off, G, M, BM, BN, CAUSAL, WINDOW)
    offs_d = tl.arange(0, DP)
    qt = _q_tile(q_ptr, b, head, offs_i, i_ok, offs_d, offs_d < D, sqb, sqh, sqt)
    offs_e = tl.arange(0, DVP)
    e_ok = offs_e < DV
    lse = tl.load(lse_ptr + bh * T + offs_i, mask=i_ok, other=float("inf"))
    acc = tl.zeros((BM, DVP), dtype=tl.float32)
    for start_j in range(lo, hi, BN):
        offs_j = start_j + tl.arange(0, BN)
        j_ok = offs_j < S
        x = _scores(qt, k_ptr, b, head, rep, offs_j, j_ok, offs_d, offs_d < D, skb, skh, sks, scale, IEEE)
        u0, u1, v0, v1 = _load_sums(uv_ptr, bg, offs_i, i_ok, offs_j, j_ok, T, S, R, BM, BN, FLAGS)
        y = _compose_head(x, u0, u1, v0, v1, q2, k2, qg, kg, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m, G, R, M,
                          FLAGS)
        valid = _valid(b, offs_i, offs_j, T, S, off, mask_ptr, smb, smt, sms, CAUSAL, WINDOW, HAS_MASK)
        p = tl.where(valid, tl.exp(y - lse[:, None]), 0.0)
        u0, u1, v0, v1 = _load_sums(pv_ptr, bg, offs_i, i_ok, offs_j, j_ok, T, S, R, BM, BN, POST_FLAGS)
        pp = _compose_head(p, u0, u1, v0, v1, p2, pk2, pqg, pkg, b, offs_i, i_ok, offs_j, j_ok, T, S, g, m, G, R, M,
                           POST_FLAGS)
        pp = tl.where(valid, pp, 0.0)  # (a sums tile no allowed pair reaches was never written)
        vt = tl.load(v_ptr + b * svb + (head // rep) * svh + offs_j[:, None] * svs + offs_e[None, :],
                     mask=j_ok[:, None] & e_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(pp, vt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(pp.to(vt.dtype), vt)
    tl.store(o_ptr + (bh * T + offs_i[:, None]) * DV + offs_e[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=i_ok[:, None] & e_ok[None, :])


def _rows_per_block(B: int, groups: int, R: int, T: int, S: int, dtype: torch.dtype) -> int:
    """Query rows per call of the four kernels: all ``T`` when both sums buffers fit :data:`MAX_SUMS_BYTES`, else the
    most (a multiple of :data:`MIN_BLOCK_ROWS`, at least that) that do."""
    per_row = 2 * B * groups * 2 * R * S * torch.empty(0, dtype=dtype).element_size()
    if per_row * T <= MAX_SUMS_BYTES:
        return T
    return max(MIN_BLOCK_ROWS, MAX_SUMS_BYTES // per_row // MIN_BLOCK_ROWS * MIN_BLOCK_ROWS)


def applies(q: Tensor, k: Tensor, pre, post, groups: int) -> bool:
    """Whether :func:`projected_forward` takes this call: no static head mix, rank 1 or 2, head dims of at least 16."""
    if any(w is not None and w.static is not None for w in (pre, post)) or q.shape[-1] < 16:
        return False
    return _check(q, k, k, groups, pre, post)[1] <= 2


def _fields(w, dummy: Tensor) -> list[Tensor]:
    """The six dynamic fields of ``w`` (FIELDS order less the static mix), contiguous, ``dummy`` where absent."""
    if w is None:
        return [dummy] * 6
    return [dummy if getattr(w, f) is None else getattr(w, f).contiguous() for f in FIELDS[1:]]


def projected_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None, pre, post, groups: int,
                      causal: bool, window: int, offset: int) -> tuple[Tensor, Tensor]:
    """``(O, lse)`` as :func:`headmix.ops.triton.launch.triton_forward` (``lse``: each row's log-sum-exp of ``S'``,
    ``+inf`` where no key is allowed), on the four kernels above. ``q`` ``(B, H, T, D)``, ``k``, ``v`` ``(B, H_kv, S,
    D)`` (grouped-query keys: ``H_kv`` divides ``H``); ``mask`` a bool mask broadcastable to ``(B, 1, T, S)``. Where
    the sums buffers of the whole call would pass :data:`MAX_SUMS_BYTES`, the queries go in blocks, each against the
    keys it may see."""
    B, H, T, D = q.shape
    S, DV = k.shape[2], v.shape[-1]
    M, R = _check(q, k, v, groups, pre, post)
    if R > 2 or any(w is not None and w.static is not None for w in (pre, post)):
        raise ValueError(f"projected forward: rank {R} and a static mix are not supported (rank 1 or 2, no static)")
    window = int(window or 0)
    rows = _rows_per_block(B, groups, R, T, S, SUMS_DTYPE.get(q.dtype, torch.float32))
    if rows >= T:
        return _forward(q, k, v, scale, mask, pre, post, groups, M, R, causal, window, offset)
    o = torch.zeros(B, H, T, DV, dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, T), float("inf"), dtype=torch.float32, device=q.device)
    if mask is not None:
        while mask.dim() < 4:
            mask = mask[None]
        mask = mask.expand(mask.shape[0], 1, T, S)
    structure = MaskSpec(causal=causal, window=window or None, query_offset=offset)
    for i0 in range(0, T, rows):
        i1 = min(T, i0 + rows)
        lo, hi = structure.key_range(i0, i1, S, T)
        if hi == lo:  # (no key for these rows: zeros, +inf)
            continue
        block = [None if w is None else w.query_slice(i0, i1).key_slice(lo, hi) for w in (pre, post)]
        o[:, :, i0:i1], lse[:, :, i0:i1] = _forward(
            q[:, :, i0:i1], k[:, :, lo:hi], v[:, :, lo:hi], scale, None if mask is None else mask[..., i0:i1, lo:hi],
            *block, groups, M, R, causal, window, offset + i0 - lo)
    return o, lse


def _forward(q, k, v, scale, mask, pre, post, groups, M, R, causal, window, offset) -> tuple[Tensor, Tensor]:
    """:func:`projected_forward` in one call of the four kernels."""
    B, H, T, D = q.shape
    S, Hkv, DV = k.shape[2], k.shape[1], v.shape[-1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    DP, DVP = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(DV))
    dummy = q.new_empty(1)
    sums = SUMS_DTYPE.get(q.dtype, torch.float32)
    flags, post_flags = _flags(pre), _flags(post)
    low = 2 | 8  # the low-rank bits: without them a Compose has no sums to store
    uv = torch.empty(B * groups, 2, R, T, S, dtype=sums, device=q.device) if flags & low else dummy
    pv = torch.empty(B * groups, 2, R, T, S, dtype=sums, device=q.device) if post_flags & low else dummy
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    o = torch.empty(B, H, T, DV, dtype=q.dtype, device=q.device)
    m, smb, smt, sms = _mask_args(mask, T, S, dummy)
    qk = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    common = dict(G=groups, M=M, R=R, DP=DP, CAUSAL=bool(causal), WINDOW=int(window or 0),
                  IEEE=q.dtype == torch.float32)
    (q1, q2, k1, k2, qg, kg), (p1, p2, pk1, pk2, pqg, pkg) = _fields(pre, dummy), _fields(post, dummy)
    rest = (T, S, D, offset, scale, H // Hkv)

    def launch(kernel, name, pairs, *args, **consts):
        BM, BN, warps, stages = TILES[name]
        grid = (triton.cdiv(T, BM), triton.cdiv(S, BN), B * groups) if pairs else (triton.cdiv(T, BM), B * H)
        kernel[grid](*args, BM=BM, BN=BN, num_warps=warps, num_stages=stages, **common, **consts)

    if flags & low:
        launch(_pre_sums_kernel, "pre_sums", True, q, k, uv, q1, k1, *qk, *rest, FLAGS=flags)
    launch(_stats_kernel, "stats", False, q, k, uv, lse, m, q2, k2, qg, kg, *qk, smb, smt, sms, *rest, FLAGS=flags,
           HAS_MASK=mask is not None)
    if post_flags & low:
        launch(_post_sums_kernel, "post_sums", True, q, k, uv, pv, lse, m, q2, k2, qg, kg, p1, pk1, *qk, smb, smt, sms,
               *rest, FLAGS=flags, POST_FLAGS=post_flags, HAS_MASK=mask is not None)
    launch(_out_kernel, "out", False, q, k, v, o, uv, pv, lse, m, q2, k2, qg, kg, p2, pk2, pqg, pkg, *qk,
           v.stride(0), v.stride(1), v.stride(2), smb, smt, sms, T, S, D, DV, offset, scale, H // Hkv, DVP=DVP,
           FLAGS=flags, POST_FLAGS=post_flags, HAS_MASK=mask is not None)
    return o, lse
