"""Fused composed attention (DCMHA) in Triton: no ``(query x key)`` tensor ever reaches device memory.

Same arguments and result as :func:`headmix.reference.composed_attention`, which is the spec this
path is tested against (forward and every gradient, ``tests/test_triton.py``).

Design. One program owns a block of ``BLOCK_M`` queries (or keys) for *all* ``M`` heads of one head
group, so the cross-head Compose happens in registers on ``(M, BLOCK_M, BLOCK_N)`` tiles.

* Forward, two passes over the keys. Pass 1: scores ``S = scale * Q K^T`` -> pre-Compose -> mask ->
  running row max and sum per head (online softmax) -> ``lse``. Pass 2: recompute, ``P =
  exp(S' - lse)``, post-Compose, ``O += P' V``. Stores ``O`` and ``lse`` (``B x H x T`` floats).
  Decoding (no gradients, few query blocks): the keys are split over programs; pass 1 and pass 2
  become two launches with the splits' statistics combined on the host in between.
* Compose runs as per-position head-mixing matrices on tensor cores (see the "tile helpers" section):
  ``E_i`` per query (static mix, query-wise terms, query gate) and ``F_j`` per key (key-wise terms).
* Backward, three passes, recomputing instead of storing probabilities (``dY`` denotes an upstream
  gradient; ``Compose^T`` is Compose with ``E`` and ``F`` transposed, see :func:`_compose`):

  1. query blocks: ``dP' = dO V^T``, ``dP = Compose_post^T(dP')``, ``Delta = sum_j P * dP`` per
     (head, query) -- the softmax needs it, and with a post-Compose it is not ``rowsum(dO * O)``;
     gradients of the query-side post-Compose weights (the static mix's as one partial sum per
     program, summed afterwards: no atomics, so results are the same on every run).
  2. query blocks: ``dS' = P (dP - Delta)``, ``dS = Compose_pre^T(dS')``, ``dQ``; query-side
     pre-Compose weights (static mix likewise).
  3. key blocks: ``dK``, ``dV`` and every key-side weight gradient.

Everything accumulates in float32; ``Q K^T``, ``P' V`` and their backward products use the
inputs' dtype on tensor cores (bf16/fp16) or exact float32 (``input_precision="ieee"``) for float32
inputs; the head-mixing products use ``MIX_PRECISION`` (tf32 before the softmax, bf16 after it).
Masks: causal and sliding-window structure by index arithmetic (key blocks outside the window are
skipped), or any boolean mask tensor loaded tile by tile (padding, cached decoding).

Limits: head dims and rank are padded to powers of two; ``M = H / groups`` heads per group up to 32.
Training (the backward kernels) supports head dims up to 128: above 64 the backward works in 64-wide
chunks of the head dim (whole tiles of 128 exceed an H100's shared memory), which needs equal key
and value head dims.
Triton is optional: without it (or without a GPU and ``TRITON_INTERPRET=1``) this backend is absent.
"""

from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from ..masks import attention_mask
from ..reference import ComposeWeights
from .chunked import chunked_composed_attention

NEG = tl.constexpr(-1.0e30)
MAX_HEAD_DIM = 128  # forward and backward
WHOLE_HEAD_DIM = 64  # the backward kernels hold whole head dims up to this; above it they work in chunks:
HEAD_DIM_CHUNK = 64  # each program writes this many dims of dQ (or dK, dV)
# Compiled offline for sm_90 (benchmarks/kernel_resources.py), the backward kernels for 32 heads per group
# need 256-544 KB of shared memory (an H100 has 227 KB): training takes at most 16 (padded) heads per group.
MAX_TRAINING_HEADS_PER_GROUP = 16
FIELDS = ("static", "query_w1", "query_w2", "key_w1", "key_w2", "query_gate", "key_gate")


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
        w1, w2, gp, LOWRANK, GATE = qw1, qw2, qg, FLAGS & 2, FLAGS & 32
    else:
        w1, w2, gp, LOWRANK, GATE = kw1, kw2, kg, FLAGS & 8, FLAGS & 64
    e = tl.zeros((BLOCK, MP, MP), dtype=tl.float32)
    h_ok = hm < M
    if QUERY_SIDE:
        if FLAGS & 1:
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
    if FLAGS & 35:  # static, query-wise, query gate
        out += tl.permute(_bmm(eq, _operand(tl.permute(x, (1, 0, 2)), MIX), MIX), (1, 0, 2))
    if FLAGS & 72:  # key-wise, key gate
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
        w1, w2, LOWRANK, GATE = qw1, qw2, FLAGS & 2, FLAGS & 32
    else:
        w1, w2, LOWRANK, GATE = kw1, kw2, FLAGS & 8, FLAGS & 64
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


@triton.jit
def _valid(b, offs_i, offs_j, T, S, mask_ptr, smb, smt, sms,
           CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr):
    """``(BM, BN)`` "may attend": bounds, causal/window structure (query ``i`` sits at key ``i + S - T``), mask."""
    ok = (offs_i[:, None] < T) & (offs_j[None, :] < S)
    pos = offs_i[:, None] + (S - T)
    if CAUSAL:
        ok = ok & (offs_j[None, :] <= pos)
    if WINDOW > 0:
        ok = ok & (pos - offs_j[None, :] < WINDOW)
    if HAS_MASK:
        m = tl.load(mask_ptr + b * smb + offs_i[:, None] * smt + offs_j[None, :] * sms, mask=ok, other=0)
        ok = ok & (m != 0)
    return ok


@triton.jit
def _heads(ptr, b, g, offs, d, sb, sh, st, sd, n, M: tl.constexpr, hm):
    """Rows ``offs`` of every head of group ``g`` as an ``(MP, BLOCK, D)`` tile."""
    h = g * M + hm
    p = ptr + b * sb + h[:, None, None] * sh + offs[None, :, None] * st + d[None, None, :] * sd
    return tl.load(p, mask=(hm < M)[:, None, None] & (offs < n)[None, :, None], other=0.0)


@triton.jit
def _key_range(start_i, T, S, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    lo = 0
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, start_i + BM + S - T)
    if WINDOW > 0:
        lo = tl.maximum(0, start_i + S - T - WINDOW + 1)
        lo = (lo // BN) * BN
    return lo, hi


@triton.jit
def _query_range(start_j, T, S, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    lo = 0
    hi = T
    if CAUSAL:
        lo = tl.maximum(0, start_j - (S - T))
        lo = (lo // BM) * BM
    if WINDOW > 0:
        hi = tl.minimum(T, tl.maximum(0, start_j + BN + WINDOW - 1 - (S - T)))
    return lo, hi




# -- forward -------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mask_ptr,
    pw, pq1, pq2, pk1, pk2, pqg, pkg, tw, tq1, tq2, tk1, tk2, tqg, tkg,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, smb, smt, sms,
    T, S, scale, chunk, n_split,
    G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PRE: tl.constexpr, POST: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    PREC: tl.constexpr, MIX_PRE: tl.constexpr, MIX_POST: tl.constexpr, RELOAD: tl.constexpr,
    PHASE: tl.constexpr,
):
    """``PHASE`` 0: both passes over all keys, ``O`` and ``lse`` stored. Split keys (decoding: few queries,
    many keys; program axis 2 = split of ``chunk`` keys): ``PHASE`` 1 stores each split's row max and sum
    in ``lse_ptr`` ``(2, n_split, B, H, T)``; ``PHASE`` 2 reads the combined ``lse`` ``(B, H, T)`` and stores
    the split's unreduced float32 ``P' V`` in ``o_ptr`` ``(n_split, B, H, T, DV)`` (summed by the host)."""
    pid_i = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    start_i = pid_i * BM
    offs_i = start_i + tl.arange(0, BM)
    hm = tl.arange(0, MP)
    h_ok = hm < M
    qok = h_ok[:, None] & (offs_i < T)[None, :]
    qrow = (offs_i < T)[:, None] & h_ok[None, :]
    pre = (pw, pq1, pq2, pk1, pk2, pqg, pkg)
    post = (tw, tq1, tq2, tk1, tk2, tqg, tkg)
    eq_pre = _matrices(pre, b, g, offs_i, hm, qrow, T, G, M, MP, R, BM, PRE, True, MIX_PRE)
    if not RELOAD:
        q = _heads(q_ptr, b, g, offs_i, tl.arange(0, DK), sqb, sqh, sqt, sqd, T, M, hm)
    lo, hi = _key_range(start_i, T, S, BM, BN, CAUSAL, WINDOW)
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
        if RELOAD:  # large heads: re-read the query tile (from L2) rather than hold it
            q = _heads(q_ptr, b, g, offs_i, tl.arange(0, DK), sqb, sqh, sqt, sqd, T, M, hm)
        k = _heads(k_ptr, b, g, offs_j, tl.arange(0, DK), skb, skh, skt, skd, S, M, hm)
        s = tl.dot(q, tl.trans(k, (0, 2, 1)), input_precision=PREC) * scale
        if PRE != 0:
            ek = _matrices(pre, b, g, offs_j, hm, krow, S, G, M, MP, R, BN, PRE, False, MIX_PRE)
            s = _compose(s, eq_pre, ek, PRE, MIX_PRE)
        valid = _valid(b, offs_i, offs_j, T, S, mask_ptr, smb, smt, sms, CAUSAL, WINDOW, HAS_MASK)[None, :, :]
        s = tl.where(valid, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 2))
        p = tl.where(valid, tl.exp(s - m_new[:, :, None]), 0.0)
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(p, 2)
        m_i = m_new
    if PHASE == 1:
        tl.store(lse_ptr + split * n_rows + rows, m_i, mask=qok)
        tl.store(lse_ptr + (n_split + split) * n_rows + rows, l_i, mask=qok)
        return
    if PHASE == 2:  # the rows' final normaliser, combined from the splits' statistics by the host
        lse = tl.load(lse_ptr + rows, mask=qok, other=float("inf"))
    else:
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("inf"))

    eq_post = _matrices(post, b, g, offs_i, hm, qrow, T, G, M, MP, R, BM, POST, True, MIX_POST)
    acc = tl.zeros((MP, BM, DV), dtype=tl.float32)
    for start_j in range(lo, hi, BN):
        offs_j = start_j + tl.arange(0, BN)
        krow = (offs_j < S)[:, None] & h_ok[None, :]
        if RELOAD:  # large heads: re-read the query tile (from L2) rather than hold it
            q = _heads(q_ptr, b, g, offs_i, tl.arange(0, DK), sqb, sqh, sqt, sqd, T, M, hm)
        k = _heads(k_ptr, b, g, offs_j, tl.arange(0, DK), skb, skh, skt, skd, S, M, hm)
        s = tl.dot(q, tl.trans(k, (0, 2, 1)), input_precision=PREC) * scale
        if PRE != 0:
            ek = _matrices(pre, b, g, offs_j, hm, krow, S, G, M, MP, R, BN, PRE, False, MIX_PRE)
            s = _compose(s, eq_pre, ek, PRE, MIX_PRE)
        valid = _valid(b, offs_i, offs_j, T, S, mask_ptr, smb, smt, sms, CAUSAL, WINDOW, HAS_MASK)[None, :, :]
        p = tl.where(valid, tl.exp(s - lse[:, :, None]), 0.0)
        if POST != 0:
            ek_post = _matrices(post, b, g, offs_j, hm, krow, S, G, M, MP, R, BN, POST, False, MIX_POST)
            p = _compose(p, eq_post, ek_post, POST, MIX_POST)
        v = _heads(v_ptr, b, g, offs_j, tl.arange(0, DV), svb, svh, svt, svd, S, M, hm)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)
    dv = tl.arange(0, DV)
    o_ptrs = o_ptr + b * sob + h[:, None, None] * soh + offs_i[None, :, None] * sot + dv[None, None, :] * sod
    if PHASE == 2:
        o_ptrs += split * n_rows * DV
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=qok[:, :, None])
    if PHASE == 0:
        tl.store(lse_ptr + rows, lse, mask=qok)


# -- backward ------------------------------------------------------------------------------------------
# Head dims above WHOLE_HEAD_DIM (128) are processed in chunks (DCK of the query/key dim, DCV of the value
# dim): each program writes one chunk of dQ (or dK, dV), program axis 2, and recomputes the tile's scores
# with the products over the head dim (Q K^T, dO V^T) accumulated from re-read half-chunk tiles in a loop
# (not unrolled, so one set of shared-memory buffers: unrolled, the key kernel needed ~280 KB at head dim 128
# in an offline sm_90 compile). The Compose-weight gradients, computed alike in every chunk's program, are
# stored by chunk 0's. Up to WHOLE_HEAD_DIM there is one chunk (DCK = DK, DCV = DV) and the loop-invariant
# tiles stay in registers.
@triton.jit
def _pair_dot(a_ptr, sa, offs_a, La, b_ptr, sb, offs_b, Lb, b, g, hm, M: tl.constexpr, D: tl.constexpr,
              DCH: tl.constexpr, PREC: tl.constexpr):
    """``sum_d a[h, offs_a, d] b[h, offs_b, d]`` for every head ``h`` of group ``g``, over the head dim ``D`` in
    chunks of ``DCH``: an ``(MP, len(offs_a), len(offs_b))`` float32 tile. ``sa``/``sb``: (batch, head, row,
    dim) strides."""
    acc = tl.zeros((hm.shape[0], offs_a.shape[0], offs_b.shape[0]), dtype=tl.float32)
    for c in range(0, D // DCH):  # a loop, not unrolled: one set of shared-memory buffers
        d = c * DCH + tl.arange(0, DCH)
        x = _heads(a_ptr, b, g, offs_a, d, sa[0], sa[1], sa[2], sa[3], La, M, hm)
        y = _heads(b_ptr, b, g, offs_b, d, sb[0], sb[1], sb[2], sb[3], Lb, M, hm)
        acc += tl.dot(x, tl.trans(y, (0, 2, 1)), input_precision=PREC)
    return acc


@triton.jit
def _probabilities(s, b, offs_i, offs_j, lse, eq, ek, T, S, mask_ptr, smb, smt, sms, PRE: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, MIX: tl.constexpr):
    """``P = exp(Compose_pre(S) - lse)`` on the valid entries of a tile of scores ``S``."""
    s2 = s
    if PRE != 0:
        s2 = _compose(s, eq, ek, PRE, MIX)
    valid = _valid(b, offs_i, offs_j, T, S, mask_ptr, smb, smt, sms, CAUSAL, WINDOW, HAS_MASK)[None, :, :]
    return tl.where(valid, tl.exp(s2 - lse[:, :, None]), 0.0)


@triton.jit
def _bwd_query_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, dq_ptr,
    pw, pq1, pq2, pk1, pk2, pqg, pkg, tw, tq1, tq2, tk1, tk2, tqg, tkg,
    g_q1, g_q2, g_qg, dw_part,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, smb, smt, sms,
    T, S, scale, n_blocks,
    G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DCK: tl.constexpr, DCV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PRE: tl.constexpr, POST: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    PREC: tl.constexpr, MIX_PRE: tl.constexpr, MIX_POST: tl.constexpr, STAGE: tl.constexpr,
):
    """STAGE 1: ``Delta`` and the query-side gradients of the post-Compose (static mix included).
    STAGE 2: ``dQ`` (chunk ``program_id(2)`` of the head dim) and the query-side gradients of the
    pre-Compose. Static-mix gradients are stored per program (summed by the host)."""
    pid_i = tl.program_id(0)
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
    pre = (pw, pq1, pq2, pk1, pk2, pqg, pkg)
    post = (tw, tq1, tq2, tk1, tk2, tqg, tkg)
    sq = (sqb, sqh, sqt, sqd)
    sk = (skb, skh, skt, skd)
    sv = (svb, svh, svt, svd)
    so = (sob, soh, sot, sod)
    eq_pre = _matrices(pre, b, g, offs_i, hm, qrow, T, G, M, MP, R, BM, PRE, True, MIX_PRE)
    eq_post_t = _t(_matrices(post, b, g, offs_i, hm, qrow, T, G, M, MP, R, BM, POST, True, MIX_POST))
    dc = chunk * DCK + tl.arange(0, DCK)  # this program's chunk of the head dim
    if DK == DCK and DV == DCV:
        q = _heads(q_ptr, b, g, offs_i, dc, sqb, sqh, sqt, sqd, T, M, hm)
        do = _heads(do_ptr, b, g, offs_i, tl.arange(0, DV), sob, soh, sot, sod, T, M, hm)
    row = (b * G * M + h[:, None]) * T + offs_i[None, :]
    lse = tl.load(lse_ptr + row, mask=qok, other=float("inf"))
    lo, hi = _key_range(start_i, T, S, BM, BN, CAUSAL, WINDOW)
    gq = tl.zeros((BM, MP, MP), dtype=tl.float32)  # dE of the stage's Compose, query side
    acc_delta = tl.zeros((MP, BM), dtype=tl.float32)
    acc_dq = tl.zeros((MP, BM, DCK), dtype=tl.float32)
    delta = tl.load(delta_ptr + row, mask=qok, other=0.0)
    for start_j in range(lo, hi, BN):
        offs_j = start_j + tl.arange(0, BN)
        krow = (offs_j < S)[:, None] & h_ok[None, :]
        k = _heads(k_ptr, b, g, offs_j, dc, skb, skh, skt, skd, S, M, hm)
        if DK == DCK and DV == DCV:
            s = tl.dot(q, tl.trans(k, (0, 2, 1)), input_precision=PREC) * scale
            v = _heads(v_ptr, b, g, offs_j, tl.arange(0, DV), svb, svh, svt, svd, S, M, hm)
            dp2 = tl.dot(do, tl.trans(v, (0, 2, 1)), input_precision=PREC).to(tl.float32)  # dP'
        else:
            s = _pair_dot(q_ptr, sq, offs_i, T, k_ptr, sk, offs_j, S, b, g, hm, M, DK, DCK // 2, PREC) * scale
            dp2 = _pair_dot(do_ptr, so, offs_i, T, v_ptr, sv, offs_j, S, b, g, hm, M, DV, DCV // 2, PREC)
        ek_pre = _matrices(pre, b, g, offs_j, hm, krow, S, G, M, MP, R, BN, PRE, False, MIX_PRE)
        p = _probabilities(s, b, offs_i, offs_j, lse, eq_pre, ek_pre, T, S, mask_ptr, smb, smt, sms, PRE, CAUSAL,
                           WINDOW, HAS_MASK, MIX_PRE)
        dp = dp2
        if POST != 0:
            ek_post_t = _t(_matrices(post, b, g, offs_j, hm, krow, S, G, M, MP, R, BN, POST, False, MIX_POST))
            dp = _compose(dp2, eq_post_t, ek_post_t, POST, MIX_POST)
        if STAGE == 1:
            acc_delta += tl.sum(p * dp, 2)
            if POST & 35:
                gq = _grad_matrices(gq, p, dp2, True, MIX_POST)
        else:
            ds2 = p * (dp - delta[:, :, None])  # dS'
            ds = ds2
            if PRE != 0:
                ds = _compose(ds2, _t(eq_pre), _t(ek_pre), PRE, MIX_PRE)
            acc_dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
            if PRE & 35:
                gq = _grad_matrices(gq, s, ds2, True, MIX_PRE)
    part = dw_part + ((bg * n_blocks + pid_i) * 2) * M * M
    if STAGE == 1:
        tl.store(delta_ptr + row, acc_delta, mask=qok)
        if POST & 1:
            _store_static_grad(part + M * M, gq, hm, M)
        _store_side_grads(gq, post, g_q1, g_q2, g_qg, b, g, offs_i, hm, qrow, T, G, M, R, POST, True)
    else:
        dq_ptrs = dq_ptr + b * sqb + h[:, None, None] * sqh + offs_i[None, :, None] * sqt + dc[None, None, :] * sqd
        tl.store(dq_ptrs, (acc_dq * scale).to(dq_ptr.dtype.element_ty), mask=qok[:, :, None])
        if PRE & 1:
            if chunk == 0:
                _store_static_grad(part, gq, hm, M)
        _store_side_grads(gq, pre, g_q1, g_q2, g_qg, b, g, offs_i, hm, first, T, G, M, R, PRE, True)


@triton.jit
def _bwd_key_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, dk_ptr, dv_ptr,
    pw, pq1, pq2, pk1, pk2, pqg, pkg, tw, tq1, tq2, tk1, tk2, tqg, tkg,
    gp1, gp2, gpg, gt1, gt2, gtg,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod, smb, smt, sms,
    T, S, scale,
    G: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, R: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DCK: tl.constexpr, DCV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PRE: tl.constexpr, POST: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
    PREC: tl.constexpr, MIX_PRE: tl.constexpr, MIX_POST: tl.constexpr,
):
    """``dK``, ``dV`` (chunk ``program_id(2)`` of the head dim) and the key-side gradients of both Composes,
    for one block of keys."""
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
    pre = (pw, pq1, pq2, pk1, pk2, pqg, pkg)
    post = (tw, tq1, tq2, tk1, tk2, tqg, tkg)
    sq = (sqb, sqh, sqt, sqd)
    sk = (skb, skh, skt, skd)
    sv = (svb, svh, svt, svd)
    so = (sob, soh, sot, sod)
    dck = chunk * DCK + tl.arange(0, DCK)
    dcv = chunk * DCV + tl.arange(0, DCV)
    ek_pre = _matrices(pre, b, g, offs_j, hm, krow, S, G, M, MP, R, BN, PRE, False, MIX_PRE)
    ek_post = _matrices(post, b, g, offs_j, hm, krow, S, G, M, MP, R, BN, POST, False, MIX_POST)
    if DK == DCK and DV == DCV:
        k = _heads(k_ptr, b, g, offs_j, tl.arange(0, DK), skb, skh, skt, skd, S, M, hm)
        v = _heads(v_ptr, b, g, offs_j, tl.arange(0, DV), svb, svh, svt, svd, S, M, hm)
    acc_dk = tl.zeros((MP, BN, DCK), dtype=tl.float32)
    acc_dv = tl.zeros((MP, BN, DCV), dtype=tl.float32)
    gk_pre = tl.zeros((BN, MP, MP), dtype=tl.float32)  # dF of the pre-Compose
    gk_post = tl.zeros((BN, MP, MP), dtype=tl.float32)
    lo, hi = _query_range(start_j, T, S, BM, BN, CAUSAL, WINDOW)
    for start_i in range(lo, hi, BM):
        offs_i = start_i + tl.arange(0, BM)
        qok = h_ok[:, None] & (offs_i < T)[None, :]
        qrow = (offs_i < T)[:, None] & h_ok[None, :]
        row = (b * G * M + h[:, None]) * T + offs_i[None, :]
        lse = tl.load(lse_ptr + row, mask=qok, other=float("inf"))
        delta = tl.load(delta_ptr + row, mask=qok, other=0.0)
        q = _heads(q_ptr, b, g, offs_i, dck, sqb, sqh, sqt, sqd, T, M, hm)
        do = _heads(do_ptr, b, g, offs_i, dcv, sob, soh, sot, sod, T, M, hm)
        if DK == DCK and DV == DCV:
            s = tl.dot(q, tl.trans(k, (0, 2, 1)), input_precision=PREC) * scale
            dp2 = tl.dot(do, tl.trans(v, (0, 2, 1)), input_precision=PREC).to(tl.float32)
        else:
            s = _pair_dot(q_ptr, sq, offs_i, T, k_ptr, sk, offs_j, S, b, g, hm, M, DK, DCK // 2, PREC) * scale
            dp2 = _pair_dot(do_ptr, so, offs_i, T, v_ptr, sv, offs_j, S, b, g, hm, M, DV, DCV // 2, PREC)
        eq_pre = _matrices(pre, b, g, offs_i, hm, qrow, T, G, M, MP, R, BM, PRE, True, MIX_PRE)
        p = _probabilities(s, b, offs_i, offs_j, lse, eq_pre, ek_pre, T, S, mask_ptr, smb, smt, sms, PRE, CAUSAL,
                           WINDOW, HAS_MASK, MIX_PRE)
        p2 = p
        dp = dp2
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
        if POST & 72:
            gk_post = _grad_matrices(gk_post, p, dp2, False, MIX_POST)
        if PRE & 72:
            gk_pre = _grad_matrices(gk_pre, s, ds2, False, MIX_PRE)
    tl.store(dk_ptr + b * skb + h[:, None, None] * skh + offs_j[None, :, None] * skt + dck[None, None, :] * skd,
             (acc_dk * scale).to(dk_ptr.dtype.element_ty), mask=kok[:, :, None])
    tl.store(dv_ptr + b * svb + h[:, None, None] * svh + offs_j[None, :, None] * svt + dcv[None, None, :] * svd,
             acc_dv.to(dv_ptr.dtype.element_ty), mask=kok[:, :, None])
    _store_side_grads(gk_pre, pre, gp1, gp2, gpg, b, g, offs_j, hm, first, S, G, M, R, PRE, False)
    _store_side_grads(gk_post, post, gt1, gt2, gtg, b, g, offs_j, hm, first, S, G, M, R, POST, False)


# -- host side -----------------------------------------------------------------------------------------
def _flags(w: ComposeWeights | None) -> int:
    if w is None:
        return 0
    return sum(1 << i for i, f in enumerate(FIELDS) if getattr(w, f) is not None)


def _pointers(w: ComposeWeights | None, dummy: Tensor) -> list[Tensor]:
    if w is None:
        return [dummy] * 7
    return [dummy if getattr(w, f) is None else getattr(w, f).contiguous() for f in FIELDS]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# Tile shapes per phase ("fwd", "bwd") and padded heads per group: (BLOCK_M, BLOCK_N, num_warps, num_stages).
# One pipeline stage: the (heads x block x block) tiles already fill the shared memory. Tuning scripts
# (benchmarks/tune_triton.py) may override entries to measure alternatives.
TILES: dict[tuple[str, bool], tuple[int, int, int, int]] = {
    ("fwd", True): (16, 16, 4, 1), ("fwd", False): (32, 32, 4, 1),  # measured: docs/triton_tiles_h100.md
    ("bwd", True): (16, 16, 8, 1), ("bwd", False): (32, 32, 4, 1),
}


# Operands of the head-mixing products of the pre- and post-softmax Compose (and of their gradients) for
# 16-bit inputs; float32 inputs always mix in exact float32. "bf16" (fastest) or "tf32" (float32 operands,
# 10-bit mantissa); accumulation is float32 either way. Measured on an H100 (docs/kernels.md): bf16 mixing
# of the pre-softmax scores misses the 1e-2 bound on dq/dk at the tests' weight scale; tf32 meets it.
MIX_PRECISION = {"pre": "tf32", "post": "bf16"}


def _blocks(MP: int, phase: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``MP`` heads per group (16+ or fewer)."""
    return TILES[(phase, MP >= 16)]


def check_supported(shape: tuple[int, ...], v_dim: int, groups: int, dtype: torch.dtype, training: bool) -> None:
    """Raise a ``ValueError`` naming the value and what is allowed unless the kernels take queries of
    ``shape`` ``(B, H, T, D)`` and dtype ``dtype``, values of head dim ``v_dim``, ``groups`` head groups,
    with (``training``) or without gradients. ``backend="auto"`` asks this before choosing the kernels."""
    H, DK = shape[1], shape[-1]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"triton backend: dtype {dtype} is not supported: expected float32, bfloat16 or float16")
    if H % groups:
        raise ValueError(f"triton backend: num_heads={H} must be divisible by groups={groups}")
    M = H // groups
    if M > 32:
        raise ValueError(f"triton backend: {M} heads per group is not supported: expected at most 32")
    if DK != _next_pow2(DK) or v_dim != _next_pow2(v_dim) or DK < 16 or v_dim < 16:
        raise ValueError(f"triton backend: head dims {DK}, {v_dim} must be powers of two >= 16")
    if max(DK, v_dim) > MAX_HEAD_DIM:
        raise ValueError(f"triton backend: head dim {max(DK, v_dim)} is not supported: expected at most "
                         f"{MAX_HEAD_DIM}")
    if training and max(DK, v_dim) > WHOLE_HEAD_DIM and DK != v_dim:
        raise ValueError(f"triton backend: training with head dims above {WHOLE_HEAD_DIM} needs equal key and value "
                         f"head dims, got {DK} and {v_dim}")
    if training and _next_pow2(M) > MAX_TRAINING_HEADS_PER_GROUP:
        raise ValueError(f"triton backend: training with {M} heads per group is not supported: expected at most "
                         f"{MAX_TRAINING_HEADS_PER_GROUP} (use more groups, or backend='chunked')")


def _check(q: Tensor, k: Tensor, v: Tensor, groups: int, pre, post) -> tuple[int, int]:
    B, H, T, dk = q.shape
    if k.shape[1] not in (1, H) or v.shape[1] != H:
        raise ValueError(f"triton backend: q has {H} heads but k has {k.shape[1]} and v {v.shape[1]}")
    M = H // groups
    ranks = {getattr(w, f).shape[3] for w in (pre, post) if w is not None
             for f in ("query_w1", "key_w1") if getattr(w, f) is not None}
    if len(ranks) > 1:
        raise ValueError(f"triton backend: pre and post Compose must share one rank, got {sorted(ranks)}")
    R = ranks.pop() if ranks else 1
    if R > 8:
        raise ValueError(f"triton backend: rank {R} is not supported: expected at most 8")
    return M, R


def _launch_meta(q: Tensor, k: Tensor, v: Tensor, groups: int, pre, post, phase: str):
    check_supported(tuple(q.shape), v.shape[-1], groups, q.dtype, training=phase == "bwd")
    M, R = _check(q, k, v, groups, pre, post)
    MP = _next_pow2(M)
    DK, DV = q.shape[-1], v.shape[-1]
    BM, BN, warps, stages = _blocks(MP, phase)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    mix = {c: "ieee" if q.dtype == torch.float32 else MIX_PRECISION[c] for c in ("pre", "post")}
    return dict(G=groups, M=M, MP=MP, R=R, DK=DK, DV=DV, BM=BM, BN=BN, PREC=prec, MIX_PRE=mix["pre"],
                MIX_POST=mix["post"], num_warps=warps,
                num_stages=stages)


def _mask_args(mask: Tensor | None, B: int, T: int, S: int, dummy: Tensor):
    if mask is None:
        return dummy, 0, 0, 0
    m = mask.expand(mask.shape[0], 1, T, S)[:, 0]
    if m.dtype != torch.bool:
        raise ValueError(f"triton backend: mask must be bool, got {m.dtype}")
    m = m.to(torch.uint8)
    return m, (m.stride(0) if m.shape[0] > 1 else 0), m.stride(1), m.stride(2)


# Split the keys when the query blocks alone give fewer programs than this (decoding): about one per H100 SM.
SPLIT_TARGET_PROGRAMS = 128


def _key_splits(programs: int, S: int, BN: int) -> tuple[int, int]:
    """``(chunk, n_split)``: keys per split (a multiple of ``BN``) and the number of splits; ``(S, 1)`` when
    the query blocks already fill the device."""
    if programs * 2 > SPLIT_TARGET_PROGRAMS:
        return S, 1
    chunk = max(BN, triton.cdiv(triton.cdiv(S, SPLIT_TARGET_PROGRAMS // programs), BN) * BN)
    return chunk, triton.cdiv(S, chunk)


def triton_forward(q, k, v, scale, mask, pre, post, groups, causal, window, split: bool | None = None):
    """``(O, lse)``; ``lse`` is ``None`` on the split-key path (``split=None``: split when there are few
    query blocks, as in decoding; splits are for inference: the backward pass needs ``lse``)."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    meta = _launch_meta(q, k, v, groups, pre, post, "fwd")
    dummy = q.new_empty(1)
    m, smb, smt, sms = _mask_args(mask, B, T, S, dummy)
    n_blocks = triton.cdiv(T, meta["BM"])
    chunk, n_split = _key_splits(n_blocks * B * groups, S, meta["BN"]) if split is not False else (S, 1)
    warps = meta.pop("num_warps")
    stages = meta.pop("num_stages")
    weights = (*_pointers(pre, dummy), *_pointers(post, dummy))
    strides = (*q.stride(), k.stride(0), k.stride(1) if k.shape[1] > 1 else 0, k.stride(2), k.stride(3), *v.stride())
    flags = dict(PRE=_flags(pre), POST=_flags(post), CAUSAL=causal, WINDOW=window or 0, HAS_MASK=mask is not None,
                 RELOAD=meta["DK"] >= 128, num_warps=warps, num_stages=stages, **meta)
    if n_split == 1:
        o = torch.empty(B, H, T, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        _fwd_kernel[(n_blocks, B * groups, 1)](q, k, v, o, lse, m, *weights, *strides, *o.stride(), smb, smt, sms,
                                               T, S, scale, S, 1, PHASE=0, **flags)
        return o, lse
    stats = torch.empty(2, n_split, B, H, T, dtype=torch.float32, device=q.device)
    parts = torch.empty(n_split, B, H, T, v.shape[-1], dtype=torch.float32, device=q.device)
    grid = (n_blocks, B * groups, n_split)
    _fwd_kernel[grid](q, k, v, parts, stats, m, *weights, *strides, *parts.stride()[1:], smb, smt, sms, T, S, scale,
                      chunk, n_split, PHASE=1, **flags)
    # lse = log sum_s l_s exp(m_s); a split without keys has l = 0 (log: -inf), a fully masked row gives -inf
    lse = torch.logsumexp(stats[0] + torch.log(stats[1]), 0)
    lse = torch.nan_to_num(lse, nan=float("inf"), neginf=float("inf"))
    _fwd_kernel[grid](q, k, v, parts, lse, m, *weights, *strides, *parts.stride()[1:], smb, smt, sms, T, S, scale,
                      chunk, n_split, PHASE=2, **flags)
    return parts.sum(0).to(q.dtype), None


def triton_backward(do, q, k, v, lse, scale, mask, pre, post, groups, causal, window):
    """Gradients ``(dq, dk, dv, dpre, dpost)``; ``dpre``/``dpost`` are dicts field -> gradient."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    if k.shape[1] != H:
        raise ValueError("triton backend: the backward pass needs one key head per query head")
    meta = _launch_meta(q, k, v, groups, pre, post, "bwd")
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    G, M, R = groups, meta["M"], meta["R"]
    dummy = q.new_empty(1)
    # the gradient kernels write dq/dk/dv with the strides of q/k/v: give them dense, matching layouts (a
    # non-dense input, e.g. a view into a larger buffer under torch.compile, would otherwise be written out of place)
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    m, smb, smt, sms = _mask_args(mask, B, T, S, dummy)
    f32 = dict(dtype=torch.float32, device=q.device)
    delta = torch.empty(B, H, T, **f32)
    n_blocks = triton.cdiv(T, meta["BM"])
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), smb, smt, sms)
    flags = dict(PRE=_flags(pre), POST=_flags(post), CAUSAL=causal, WINDOW=window or 0, HAS_MASK=mask is not None)
    pre_ptrs, post_ptrs = _pointers(pre, dummy), _pointers(post, dummy)
    qgrad = {c: (torch.zeros(B, T, G, R, M, **f32), torch.zeros(B, T, G, R, M, **f32), torch.zeros(B, T, G, M, **f32))
             for c in ("pre", "post")}
    dw_part = torch.zeros(B * G, n_blocks, 2, M, M, **f32)
    DK, DV = meta["DK"], meta["DV"]
    if max(DK, DV) <= WHOLE_HEAD_DIM:
        meta.update(DCK=DK, DCV=DV)
    else:  # equal head dims (check_supported)
        meta.update(DCK=HEAD_DIM_CHUNK, DCV=HEAD_DIM_CHUNK)
    chunks = DK // meta["DCK"]
    for stage, c in ((1, "post"), (2, "pre")):
        _bwd_query_kernel[(n_blocks, B * G, 1 if stage == 1 else chunks)](
            q, k, v, do, lse, delta, m, dq, *pre_ptrs, *post_ptrs, *qgrad[c], dw_part, *common,
            T, S, scale, n_blocks, STAGE=stage, num_warps=warps, num_stages=stages, **meta, **flags,
        )
    kgrad = [torch.zeros(B, S, G, R, M, **f32), torch.zeros(B, S, G, R, M, **f32), torch.zeros(B, S, G, M, **f32),
             torch.zeros(B, S, G, R, M, **f32), torch.zeros(B, S, G, R, M, **f32), torch.zeros(B, S, G, M, **f32)]
    _bwd_key_kernel[(triton.cdiv(S, meta["BN"]), B * G, chunks)](
        q, k, v, do, lse, delta, m, dk, dv, *pre_ptrs, *post_ptrs, *kgrad, *common,
        T, S, scale, num_warps=warps, num_stages=stages, **meta, **flags,
    )
    dw = dw_part.view(B, G, n_blocks, 2, M, M).sum(dim=(0, 2))
    grads = {}
    for c, w, (k1, k2, kg), idx in (("pre", pre, kgrad[:3], 0), ("post", post, kgrad[3:], 1)):
        if w is None:
            grads[c] = {}
            continue
        full = dict(static=dw[:, idx].clone(memory_format=torch.contiguous_format), query_w1=qgrad[c][0],
                    query_w2=qgrad[c][1], query_gate=qgrad[c][2],
                    key_w1=k1, key_w2=k2, key_gate=kg)
        grads[c] = {f: full[f].to(getattr(w, f).dtype) for f in FIELDS if getattr(w, f) is not None}
    return dq, dk, dv, grads["pre"], grads["post"]


# -- torch.library custom ops: torch.compile traces through them (fake shapes below) without a graph break --------
# -- when a shape does not fit the GPU: a clear error, or (backend="auto") the chunked PyTorch path ------------
def _no_room(error: Exception, fallback: bool) -> None:
    """Raise a clear error for a kernel that does not fit this GPU, or (``fallback``) warn that the chunked
    PyTorch path takes over."""
    message = (f"the fused DCMHA kernels do not fit this GPU at this shape ({error}); backend='chunked' runs it "
               "in PyTorch")
    if not fallback:
        raise RuntimeError(f"triton backend: {message}") from error
    warnings.warn(f"headmix: {message}; backend='auto' falls back to it", RuntimeWarning, stacklevel=3)


def _positional_mask(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool, window: int) -> Tensor | None:
    """The kernels' mask as a tensor: ``mask`` and the causal/window structure (query ``i`` at key ``i + S - T``)."""
    T, S = q.shape[2], k.shape[2]
    structural = attention_mask(torch.arange(S - T, S, device=q.device), torch.arange(S, device=q.device),
                                causal=causal, window=window or None)
    if structural is None or mask is None:
        return structural if mask is None else mask
    return mask & structural


def _chunked_forward(q, k, v, scale, mask, pre, post, groups, causal, window) -> Tensor:
    kk = k if k.shape[1] == q.shape[1] else k.expand(-1, q.shape[1], -1, -1)
    return chunked_composed_attention(q, kk, v, scale=scale, mask=_positional_mask(q, k, mask, causal, window),
                                      pre=pre, post=post, groups=groups)


def _chunked_backward(do, q, k, v, scale, mask, pre, post, groups, causal, window):
    """``(dq, dk, dv, dpre, dpost)`` as :func:`triton_backward`, by autograd through the chunked path."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    weights = [None if w is None else {f: getattr(w, f).detach().requires_grad_() for f in FIELDS
                                       if getattr(w, f) is not None} for w in (pre, post)]
    with torch.enable_grad():
        out = _chunked_forward(*leaves, scale, mask, *(None if w is None else ComposeWeights(**w) for w in weights),
                               groups, causal, window)
        grads = iter(torch.autograd.grad(out, [*leaves, *(t for w in weights if w for t in w.values())], do))
    dq, dk, dv = next(grads), next(grads), next(grads)
    return dq, dk, dv, *({f: next(grads) for f in (w or {})} for w in weights)


@torch.library.custom_op("headmix::dcmha_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, groups: int, causal: bool,
                window: int, pre_present: bool, post_present: bool, weights: list[Tensor],
                fallback: bool) -> tuple[Tensor, Tensor]:
    """``(output, row log-sum-exp)`` of the fused forward kernel (on the chunked fallback the log-sum-exp is
    NaN: the backward kernels, bigger still, fall back too)."""
    pre, post = _unflatten(pre_present, weights[:7]), _unflatten(post_present, weights[7:])
    try:
        return triton_forward(q, k, v, scale, mask, pre, post, groups, causal, window, split=False)
    except OutOfResources as error:
        _no_room(error, fallback)
    out = _chunked_forward(q, k, v, scale, mask, pre, post, groups, causal, window)
    return out, q.new_full(q.shape[:3], float("nan"), dtype=torch.float32)


@torch.library.custom_op("headmix::dcmha_inference", mutates_args=())
def _inference_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, groups: int, causal: bool,
                  window: int, pre_present: bool, post_present: bool, weights: list[Tensor],
                  fallback: bool) -> Tensor:
    """The output only, without gradients: keys are split over programs when queries are few (decoding)."""
    pre, post = _unflatten(pre_present, weights[:7]), _unflatten(post_present, weights[7:])
    try:
        return triton_forward(q, k, v, scale, mask, pre, post, groups, causal, window)[0]
    except OutOfResources as error:
        _no_room(error, fallback)
    return _chunked_forward(q, k, v, scale, mask, pre, post, groups, causal, window)


@_inference_op.register_fake
def _(q, k, v, mask, scale, groups, causal, window, pre_present, post_present, weights, fallback):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@_forward_op.register_fake
def _(q, k, v, mask, scale, groups, causal, window, pre_present, post_present, weights, fallback):
    B, H, T, _ = q.shape
    return q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("headmix::dcmha_backward", mutates_args=())
def _backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, mask: Tensor | None, scale: float,
                 groups: int, causal: bool, window: int, pre_present: bool, post_present: bool,
                 weights: list[Tensor], fallback: bool) -> list[Tensor]:
    """``[dq, dk, dv, then one gradient per present Compose weight, in FIELDS order, pre then post]``."""
    pre, post = _unflatten(pre_present, weights[:7]), _unflatten(post_present, weights[7:])
    kk = k if k.shape[1] == q.shape[1] else k.expand(-1, q.shape[1], -1, -1).contiguous()
    try:
        dq, dk, dv, dpre, dpost = triton_backward(do, q, kk, v, lse, scale, mask, pre, post, groups, causal, window)
    except OutOfResources as error:
        if fallback:  # recomputed through autograd by _backward (autograd does not run inside a custom op)
            raise
        _no_room(error, fallback)
    if k.shape[1] != q.shape[1]:
        dk = dk.sum(1, keepdim=True)
    return [t.contiguous() for t in (dq, dk, dv, *dpre.values(), *dpost.values())]  # present fields, FIELDS order


@_backward_op.register_fake
def _(do, q, k, v, lse, mask, scale, groups, causal, window, pre_present, post_present, weights, fallback):
    present = [w for i, w in enumerate(weights) if (pre_present if i < 7 else post_present) and w.numel() > 0]
    # the kernels write dense, contiguous gradients whatever the inputs' layouts
    return [q.new_empty(t.shape, dtype=t.dtype) for t in (q, k, v, *present)]


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, scale, groups, causal, window, pre_present, post_present, weights, fallback = inputs
    ctx.save_for_backward(q, k, v, output[1], mask, *weights)
    ctx.meta = (scale, groups, causal, window, pre_present, post_present, fallback)


def _backward(ctx, do, _dlse):
    q, k, v, lse, mask, *weights = ctx.saved_tensors
    scale, groups, causal, window, pre_present, post_present, fallback = ctx.meta
    try:
        dq, dk, dv, *present = _backward_op(do, q, k, v, lse, mask, scale, groups, causal, window, pre_present,
                                            post_present, weights, fallback)
    except OutOfResources as error:  # only with fallback (else the op raised a RuntimeError)
        _no_room(error, fallback)
        pre, post = _unflatten(pre_present, weights[:7]), _unflatten(post_present, weights[7:])
        dq, dk, dv, dpre, dpost = _chunked_backward(do, q, k, v, scale, mask, pre, post, groups, causal, window)
        present = [*dpre.values(), *dpost.values()]
    grads = iter(present)
    # absent weights are empty placeholders (custom ops take no None in lists): their "gradients" are empty too
    wgrads = [next(grads) if (pre_present if i < 7 else post_present) and w.numel() > 0 else torch.zeros_like(w)
              for i, w in enumerate(weights)]
    return dq, dk, dv, None, None, None, None, None, None, None, wgrads, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _flatten(w: ComposeWeights | None, empty: Tensor) -> list[Tensor]:
    """The seven Compose fields of ``w`` in FIELDS order, ``empty`` (no elements) for absent ones."""
    return [empty] * 7 if w is None else [empty if getattr(w, f) is None else getattr(w, f) for f in FIELDS]


def _unflatten(present: bool, tensors) -> ComposeWeights | None:
    if not present:
        return None
    return ComposeWeights(**{f: (t if t is not None and t.numel() > 0 else None) for f, t in zip(FIELDS, tensors)})


def triton_composed_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Tensor | None = None,
    pre: ComposeWeights | None = None, post: ComposeWeights | None = None, groups: int = 1,
    chunk_size: int | None = None, structure: tuple[bool, int | None] | None = None,
    causal: bool = False, window: int | None = None, fallback: bool = False,
) -> Tensor:
    """Fused composed attention; arguments as :func:`headmix.reference.composed_attention`.

    ``causal``/``window`` describe a positional mask by structure (query ``i`` at key position
    ``i + S - T``); they may replace ``mask`` (faster: no mask reads, skipped blocks) or be combined
    with it. ``structure=(causal, window)`` says that ``mask`` is exactly that positional mask: it is
    then not read. ``chunk_size`` is accepted for signature compatibility and ignored.

    A shape whose kernels do not fit the GPU (shared memory, registers) raises a ``RuntimeError`` saying
    so, or with ``fallback=True`` (what ``backend="auto"`` passes) runs on the chunked PyTorch path with a
    warning. Shapes the kernels never take (see :func:`check_supported`) raise a ``ValueError``.
    """
    if structure is not None:
        causal, window, mask = structure[0], structure[1], None
    weights = [getattr(w, f) for w in (pre, post) if w is not None for f in FIELDS if getattr(w, f) is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *weights))
    check_supported(tuple(q.shape), v.shape[-1], groups, q.dtype, training=needs_grad)
    pre = None if pre is None or pre.is_identity() else pre
    post = None if post is None or post.is_identity() else post
    args = (q, k, v, mask, float(scale), int(groups), bool(causal), int(window or 0), pre is not None,
            post is not None, [*_flatten(pre, q.new_empty(0)), *_flatten(post, q.new_empty(0))], bool(fallback))
    if not needs_grad:
        return _inference_op(*args)
    return _forward_op(*args)[0]
