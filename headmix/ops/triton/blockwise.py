"""Training DCMHA on materialised query blocks: the attention products on cuBLAS, the Compose in Triton at memory speed.

The tile kernels (:mod:`.forward`, :mod:`.backward`) never write a ``(query x key)`` tensor, and pay for it: every
program holds all heads of a group next to tensor-core products, so its tiles are small, its registers spill and the
tensor cores idle (docs/kernels_log.md, "Kernels v2"). This path takes the other side of the trade, for training.
Queries go in blocks of ``C`` rows (:func:`block_rows`: the buffers are bounded, ``B x H x C x L`` float32 at most
:data:`BLOCK_ELEMENTS`, ``L`` the keys the block may see); per block

* ``S = Q K^T`` and ``dP' = dO V^T`` (float32 out), ``O = P' V``, ``dQ = dS K``, ``dK += dS^T Q``, ``dV += P'^T dO``:
  batched matrix products on cuBLAS (grouped-query heads by a reshape, no repeated ``K``, ``V``);
* the Compose and the softmax, forward and adjoint, with every per-position weight gradient: Triton kernels
  (:mod:`.blockwise_kernels`) that read
  and write those buffers once per element, one program per (query tile, key chunk, batch x group) on
  ``(heads x rows x keys)`` tiles. No tensor-core product runs inside them, so a tile keeps its loads' layout, which
  the tile table sets (:data:`TILES`: a few keys per thread, a group's heads over 2-4 lanes or warps): the Compose's
  sums over heads (``h_r = sum_m w1[r, m] x_m``) and the sums along a tile's keys or queries (weight gradients, softmax
  statistics) are in-thread adds, then warp shuffles or shared-memory round trips, which with the Compose's
  arithmetic bound the kernels (docs/kernels_log.md, "Second pass" and "Third pass");
* sums along a row (softmax statistics, ``Delta``, query-side weight gradients) are per key chunk and the static
  mix's gradient per program: partial sums, added by the host in a fixed order. Sums down a column (key-side weight
  gradients) are atomic adds into the gradient, whose order varies from run to run; under
  ``torch.use_deterministic_algorithms(True)`` they are partial sums per query tile, added by the host like the others
  (the same bits on every run, at the cost of a ``(B, n_i, L, G, R, M)`` buffer per field and block).
* the backward makes ``P`` (kept for the adjoint kernels: :data:`PROBS_DTYPE`) and ``P'`` in one pass (``lse`` is
  known), the forward in two (the softmax statistics of a row are complete only after its last key chunk).

The forward stores only ``O`` and the row log-sum-exp ``lse`` (the tile kernels' own quantity, so either backward
takes either forward's); the backward recomputes ``S``, ``P`` (the softmax of the pre-composed scores ``S'``) and
``P'`` (post-composed probabilities) block by block. Arithmetic is float32 except the products' operands (the inputs'
dtype: ``P'`` and ``dS`` are rounded to it before their products, as in the tile kernels) and the kept ``P``. It takes
every shape the tile kernels take (any rank, heads per group, head dim); which path trains is
:func:`headmix.ops.triton.launch.training_kernels`' choice. The spec is :func:`headmix.reference.composed_attention`
(``tests/test_triton.py`` checks the output and every gradient against it).
"""

from __future__ import annotations

import functools

import torch
import triton
from torch import Tensor

from .blockwise_kernels import _adjoint_kernel, _post_kernel, _pre_kernel
from ...masks import MaskSpec
from .launch import FIELDS, _check, _flags, _mask_args

BLOCK_ELEMENTS = 1 << 27  # B x H x C x L elements per query block's float32 buffer (512 MB)
# (query rows, keys, warps, VEC) of each kernel's (heads x rows x keys) tile, by padded heads per group (up to 16,
# more). VEC is the alignment of a row's start that the kernels promise Triton (the host lowers it to the largest power
# of two dividing the block's key count): with it, and the tile's shape, Triton picks the layout (keys per thread,
# heads over lanes or warps), which sets how the sums over heads, keys and queries cross lanes and warps
# (docs/kernels_log.md, "Third pass"). On an H200 (2026-12-01, bf16, B = 8 x 2048, causal, rank 2, forward+backward ms,
# one kernel's tile varied at a time, `training_paths.py --sweep-tiles`): 16 x 64 from (4, 32, 2, 4) everywhere, 15.46:
# pre (2, 32, 2, 4) 15.44, (8, 32, 4, 2) 15.77, (8, 16, 4, 16) 16.10; post (2, 64, 2, 4) 14.59, (2, 32, 2, 4) 15.20,
# (8, 32, 4, 2) 15.89, (8, 16, 4, 16) 18.31; adjoint (2, 32, 1, 4) 14.79, (2, 64, 2, 4) 15.52, (4, 16, 1, 4) 15.64,
# (2, 32, 2, 4) 17.13, (16, 16, 4, 16) 22.26. 32 x 128 in one group from the tiles below, 33.77: pre (2, 32, 2, 4)
# 34.13, (2, 32, 4, 16) 34.22; post (2, 32, 2, 2) 33.59, (2, 32, 2, 4) 34.30, (2, 32, 4, 2) 35.05, (2, 32, 4, 16)
# 41.68; adjoint (2, 16, 1, 4) 33.52, (1, 32, 1, 4) 35.76, (2, 16, 2, 4) 39.56, (4, 32, 4, 16) 39.67 (differences
# under 1% were not taken). An earlier sweep (same day, from VEC 16 everywhere) had ruled out VEC 1 (16 x 64 adjoint
# (16, 16, 4, 1): +5.6 ms) and larger programs ((4, 128, 8, 16): +13 ms). A third sweep (2026-12-01 late, 16 x 64, from
# these tiles, 13.58): small VEC-1 tiles, each thread one (query, key) position with all 16 heads (no lanes or warps
# over heads): post (2, 16, 1, 1) 12.47 (forward 3.63 -> 3.37, backward 9.95 -> 9.09), (2, 32, 2, 1) 13.46, (4, 32,
# 4, 1) 15.79; pre (2, 16, 1, 1) 13.93, (4, 32, 4, 1) 14.57; adjoint (2, 16, 1, 1) 13.76, (2, 32, 2, 1) 14.89, (1, 32,
# 1, 1) 16.03, (4, 32, 4, 1) 18.41.
TILES = {16: dict(pre=(4, 32, 2, 4), post=(2, 16, 1, 1), adjoint=(2, 32, 1, 4)),
         32: dict(pre=(2, 32, 4, 2), post=(4, 32, 4, 2), adjoint=(2, 32, 2, 4))}
# Registers per thread a kernel may use (ptxas' cap, Triton's ``maxnreg``), by padded heads per group; absent: no cap
# (every kernel then compiles to 240-255, one 1-2 warp program per 8 warps of an SM). Capping the post-Compose kernel
# at 168 lets 12 warps share an SM at the price of a few hundred bytes of spills. On an H200 (2026-12-01, bf16, B = 8 x
# 2048, causal, rank 2, no static mix, forward+backward ms; `python benchmarks/training_paths.py --shapes 16x64
# 32x128:1 --paths blockwise --sweep-registers`), post capped at 168 / uncapped / 128 / 144 / 192 / 208, pre at 168,
# adjoint at 168: 16 x 64 13.59 / 14.62 / 14.12 / 13.86 / 14.34 / 13.76, 13.95, 15.13; 32 x 128 in one group 31.21 /
# 33.30 / 32.50 / 32.24 / 33.15 / 33.10, 31.87, 33.73 (an earlier run of the same day: 168 against uncapped 13.38 /
# 14.14 and 31.03 / 33.07).
REGISTERS = {16: dict(post=168), 32: dict(post=168)}
# The dtype in which the backward keeps P = exp(S' - lse) between its post kernel and its adjoint kernels, by input
# dtype (else float32): float16 holds [0, 1] at 11 bits, half the bytes of the float32 S' kept before. On an H200
# (2026-12-02, bf16, B = 8 x 2048, causal, rank 2, no static mix; one process, .devm-style A/B), backward ms S' -> P:
# 16 x 64 9.38 -> 9.03, 16 x 128 10.00 -> 9.66, 32 x 128 in one group 23.87 -> 23.34, 16 x 128 window 256 6.52 -> 6.34;
# worst relative error of the output and every gradient against a float32 run at 16 x 64: 2.37e-3 -> 2.38e-3.
PROBS_DTYPE = {torch.bfloat16: torch.float16, torch.float16: torch.float16}
KEY_CHUNK = 256  # keys per program (its share of a row's sums): 128 / 256 / 512 gave 23.2 / 23.6 / 24.8 ms at 16 x 64
# with (8, 32, 4) tiles and 46.3 (256) / 47.7 (512) at 32 x 80 with (4, 32, 4), same runs


def tile(padded_heads: int, kernel: str) -> tuple[int, int, int, int]:
    """``(BM, BN, num_warps, VEC)`` of ``kernel`` (``"pre"``, ``"post"`` or ``"adjoint"``) for a group of
    ``padded_heads`` (a power of two) heads."""
    return TILES[16 if padded_heads <= 16 else 32][kernel]


def registers(padded_heads: int, kernel: str) -> int | None:
    """The register cap of ``kernel`` for a group of ``padded_heads`` heads (:data:`REGISTERS`), ``None`` for none."""
    return REGISTERS[16 if padded_heads <= 16 else 32].get(kernel)


def block_rows(B: int, H: int, T: int, S: int, BM: int) -> int:
    """Queries per block: a multiple of ``BM`` with ``B * H * rows * S`` at most :data:`BLOCK_ELEMENTS` (at least ``BM``),
    at most ``T`` rounded up to ``BM``. (With a window, blocks of at most one window of rows, so that the products'
    ``rows x (rows + window - 1)`` rectangles waste less, measured slower at 16 heads on an H200, 2026-12-01, bf16,
    B = 8 x 2048, window 256, fwd+bwd: 16 x 64 13.2 -> 16.4 ms, 16 x 128 14.2 -> 17.4; at 32 heads the blocks are
    256 rows either way.)"""
    rows = max(BM, (BLOCK_ELEMENTS // max(1, B * H * S)) // BM * BM)
    return min(rows, triton.cdiv(T, BM) * BM)


def _uninitialised(*shape: int, dtype: torch.dtype, device) -> Tensor:
    """A buffer the kernels write in full before anything reads it (``tests/test_triton.py`` fills these with NaN, so
    that an element read before it is written shows in the results)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _products(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` batched over the leading dims, float32 out (bf16/fp16 operands on cuBLAS accumulate in float32; a
    torch without ``bmm(out_dtype=)`` multiplies float32 copies instead, slower)."""
    if a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda and bmm_takes_out_dtype():
        lead = a.shape[:-2]
        out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
        return out.view(*lead, *out.shape[-2:])
    return torch.matmul(a.float(), b.float())


@functools.cache
def bmm_takes_out_dtype() -> bool:
    """Whether this torch's ``torch.bmm`` takes ``out_dtype`` (float32 products of bf16/fp16 operands on CUDA; older
    releases lack it, and raise ``TypeError``)."""
    x = torch.zeros(1, 1, 1)
    try:
        torch.bmm(x, x, out_dtype=torch.float32)
    except TypeError:
        return False
    except (RuntimeError, NotImplementedError):  # the argument exists; only not for these CPU operands
        pass
    return True


class _Block:
    """One query block: rows ``i0:i1``, the keys ``lo:hi`` they may see, the query offset within them and the mask's
    view."""

    def __init__(self, i0, i1, S, structure: MaskSpec, mask):
        self.i0, self.i1 = i0, i1
        self.lo, self.hi = structure.key_range(i0, i1, S, 0)  # (query_offset is given: no query count needed)
        self.C, self.L = i1 - i0, self.hi - self.lo
        self.off = i0 + structure.query_offset - self.lo  # block row i sits at block key i + off
        self.mask = None if mask is None else mask[:, i0:i1, self.lo:self.hi]

    def split(self, BM: int, BN: int) -> tuple[int, int, int]:
        """``(n_i, KC, n_c)``: query tiles of ``BM`` rows, keys per chunk (a multiple of ``BN``), key chunks."""
        KC = max(BN, KEY_CHUNK // BN * BN)
        return triton.cdiv(self.C, BM), KC, triton.cdiv(self.L, KC)


def _weights(w, blk: _Block, dummy: Tensor) -> list[Tensor]:
    """The seven fields of ``w`` (the static mix whole; the others at the block's rows / keys: views, the kernels index
    from their first position)."""
    if w is None:
        return [dummy] * 7
    out = [dummy if w.static is None else w.static.contiguous()]
    for f, rows in (("query_w1", True), ("query_w2", True), ("key_w1", False), ("key_w2", False),
                    ("query_gate", True), ("key_gate", False)):
        t = getattr(w, f)
        out.append(dummy if t is None else (t[:, blk.i0:blk.i1] if rows else t[:, blk.lo:blk.hi]))
    return out


class _Run:
    """What every launch of one call shares: shapes, mask, flags, constants."""

    def __init__(self, q, k, mask, pre, post, groups, causal, window, offset):
        B, H, T, _ = q.shape
        self.B, self.H, self.T, self.S = B, H, T, k.shape[2]
        self.Hkv, self.G, self.M = k.shape[1], groups, H // groups
        self.rep = H // self.Hkv
        self.causal, self.window = bool(causal), int(window or 0)
        self.pre, self.post = pre, post
        self.dummy = q.new_empty(1)
        m, *self.mask_strides = _mask_args(mask, T, self.S, self.dummy)  # (B or 1, T, S) uint8, its strides
        self.mask = None if mask is None else m
        self.structure = MaskSpec(causal=self.causal, window=self.window or None, query_offset=offset)
        MP = max(2, triton.next_power_of_2(self.M))
        self.tiles = {kernel: tile(MP, kernel) for kernel in ("pre", "post", "adjoint")}
        self.registers = {kernel: registers(MP, kernel) for kernel in self.tiles}
        R = _check(q, k, k, groups, pre, post)[1]  # (the rank; the caller checked the shapes)
        self.consts = dict(G=groups, M=self.M, MP=MP, R=R, CAUSAL=self.causal, WINDOW=self.window,
                           HAS_MASK=mask is not None)

    def blocks(self):
        C = block_rows(self.B, self.H, self.T, self.S, max(t[0] for t in self.tiles.values()))
        for i0 in range(0, self.T, C):
            blk = _Block(i0, min(self.T, i0 + C), self.S, self.structure, self.mask)
            if blk.L > 0:
                yield blk

    def launch(self, blk: _Block, kernel: str):
        """``(grid, (n_i, KC, n_c), constants)`` of ``kernel``'s launch on ``blk``."""
        BM, BN, warps, vec = self.tiles[kernel]
        n_i, KC, n_c = blk.split(BM, BN)
        vec = min(vec, blk.L & -blk.L)  # the kernels' rows start at multiples of it: L must be one
        cap = {} if self.registers[kernel] is None else dict(maxnreg=self.registers[kernel])
        return (n_i, n_c, self.B * self.G), (n_i, KC, n_c), dict(self.consts, BM=BM, BN=BN, VEC=vec,
                                                                  num_warps=warps, **cap)

    def mask_args(self, blk: _Block):
        """The block's view of the mask and its (batch, query, key) strides, or a dummy and zeros."""
        return (self.dummy, 0, 0, 0) if blk.mask is None else (blk.mask, *self.mask_strides)

    def geometry(self, blk: _Block):
        return (blk.C, blk.L, self.T, self.S, blk.off)

    def scores(self, q, k, blk: _Block) -> Tensor:
        """``Q K^T`` of the block, ``(B, H, C, L)`` float32 (unscaled)."""
        qb = q[:, :, blk.i0:blk.i1].reshape(self.B, self.Hkv, self.rep * blk.C, q.shape[-1])
        return _products(qb, k[:, :, blk.lo:blk.hi].transpose(-1, -2)).view(self.B, self.H, blk.C, blk.L)

    def pre_compose(self, s, blk, scale):
        """``S'`` of the block, and the per-chunk row maxima and sums ``(B, H, n_c, C)``."""
        f32 = dict(dtype=torch.float32, device=s.device)
        grid, (_, KC, n_c), consts = self.launch(blk, "pre")
        sp = _uninitialised(*s.shape, **f32)
        pm = _uninitialised(self.B, self.H, n_c, blk.C, **f32)
        pl = _uninitialised(self.B, self.H, n_c, blk.C, **f32)
        m, smb, smt, sms = self.mask_args(blk)
        _pre_kernel[grid](s, sp, pm, pl, m, *_weights(self.pre, blk, self.dummy), *self.geometry(blk), scale,
                          smb, smt, sms, KC, n_c, FLAGS=_flags(self.pre), **consts)
        return sp, pm, pl

    def post_compose(self, sp, lse, blk, dtype, s=None, scale=1.0) -> Tensor:
        """``P'`` of the block in ``dtype`` from ``S'`` (``sp``); given ``S`` (``s``), ``S'`` is made from it on the
        way and ``P`` written into ``sp`` in its dtype (the backward's one pass)."""
        pp = _uninitialised(self.B, self.H, blk.C, blk.L, dtype=dtype, device=sp.device)  # (zeros where skipped)
        m, smb, smt, sms = self.mask_args(blk)
        pre = _weights(self.pre, blk, self.dummy) if s is not None else [self.dummy] * 7
        grid, (_, KC, _), consts = self.launch(blk, "post")
        _post_kernel[grid](self.dummy if s is None else s, sp, lse[:, :, blk.i0:blk.i1], pp, m, *pre,
                           *_weights(self.post, blk, self.dummy), *self.geometry(blk), scale, smb, smt, sms,
                           lse.stride(0), lse.stride(1), KC, PRE_FLAGS=_flags(self.pre), FLAGS=_flags(self.post),
                           FROM_S=s is not None, **consts)
        return pp


def _combine_lse(pm: Tensor, pl: Tensor) -> Tensor:
    """Rows' ``lse`` from per-chunk maxima and sums ``(B, H, n_c, C)`` (``+inf`` where no key is allowed)."""
    mx = pm.max(dim=2).values
    total = (pl * torch.exp(pm - mx[:, :, None])).sum(dim=2)
    return torch.where(total > 0, mx + torch.log(total), torch.full_like(total, float("inf")))


def blockwise_forward(q, k, v, scale, mask, pre, post, groups, causal, window, offset) -> tuple[Tensor, Tensor]:
    """``(O, lse)`` as :func:`headmix.ops.triton.launch.triton_forward` without splits."""
    run = _Run(q, k, mask, pre, post, groups, causal, window, offset)
    B, H, T = run.B, run.H, run.T
    o = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, T), float("inf"), dtype=torch.float32, device=q.device)
    for blk in run.blocks():
        s = run.scores(q, k, blk)
        sp, pm, pl = run.pre_compose(s, blk, scale)
        del s
        lse[:, :, blk.i0:blk.i1] = _combine_lse(pm, pl)
        pp = run.post_compose(sp, lse, blk, q.dtype)
        del sp
        ob = torch.matmul(pp.view(B, run.Hkv, run.rep * blk.C, blk.L), v[:, :, blk.lo:blk.hi])
        o[:, :, blk.i0:blk.i1] = ob.view(B, H, blk.C, -1)
    return o, lse


def blockwise_backward(do, q, k, v, lse, scale, mask, pre, post, groups, causal, window, offset, *, cast: bool = True):
    """Gradients ``(dq, dk, dv, dpre, dpost)`` as :func:`headmix.ops.triton.launch.triton_backward` (``cast=False``:
    ``dk``, ``dv`` and the weights' gradients as their float32 sums, for a caller that adds more to them)."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    lse = lse.contiguous()
    run = _Run(q, k, mask, pre, post, groups, causal, window, offset)
    B, H, D, Hkv, G, M, rep = run.B, run.H, q.shape[-1], run.Hkv, run.G, run.M, run.rep
    R = run.consts["R"]
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.zeros_like(q)
    dk = torch.zeros(B, Hkv, run.S, D, **f32)
    dv = torch.zeros(B, Hkv, run.S, v.shape[-1], **f32)
    grads = {c: ({} if w is None else {f: torch.zeros(getattr(w, f).shape, **f32) for f in FIELDS
                                       if getattr(w, f) is not None}) for c, w in (("pre", pre), ("post", post))}
    dummy = run.dummy
    atomic = not torch.are_deterministic_algorithms_enabled()  # key-side sums added in place (see module doc)
    probs = PROBS_DTYPE.get(q.dtype, torch.float32)  # P, kept for the adjoint kernels
    for blk in run.blocks():
        C, L = blk.C, blk.L
        s = run.scores(q, k, blk)
        p = _uninitialised(*s.shape, dtype=probs, device=q.device)
        pp = run.post_compose(p, lse, blk, q.dtype, s=s, scale=scale)
        dob = do[:, :, blk.i0:blk.i1].reshape(B, Hkv, rep * C, -1)
        dv[:, :, blk.lo:blk.hi] += _products(pp.view(B, Hkv, rep * C, L).transpose(-1, -2), dob)
        del pp
        dpp = _products(dob, v[:, :, blk.lo:blk.hi].transpose(-1, -2)).view(B, H, C, L)
        m, smb, smt, sms = run.mask_args(blk)
        lse_blk = lse[:, :, blk.i0:blk.i1]
        grid, (n_i, KC, n_c), consts = run.launch(blk, "adjoint")
        delta = None
        for side, w in (("post", post), ("pre", pre)):
            g_ = grads[side]
            parts = {f: _uninitialised(*shape, **f32) if f in g_ else dummy for f, shape in (  # every program writes
                ("query_w1", (B, n_c, C, G, R, M)), ("query_w2", (B, n_c, C, G, R, M)),
                ("query_gate", (B, n_c, C, G, M)), ("static", (B * G, n_i, n_c, M, M)))}
            for f, shape in (("key_w1", (B, n_i, L, G, R, M)), ("key_w2", (B, n_i, L, G, R, M)),
                             ("key_gate", (B, n_i, L, G, M))):
                parts[f] = dummy if f not in g_ else g_[f][:, blk.lo:] if atomic else torch.zeros(shape, **f32)
            if side == "post":
                out = _uninitialised(B, H, C, L, **f32)  # dP
                pdelta = _uninitialised(B, H, n_c, C, **f32)
                x, dy = dummy, dpp
            else:
                out = _uninitialised(B, H, C, L, dtype=q.dtype, device=q.device)  # dS (zeros where skipped)
                pdelta = dummy
                x, dy = s, dp
            _adjoint_kernel[grid](
                x, p, dy, dummy if delta is None else delta, out, m, *_weights(w, blk, dummy), pdelta,
                *(parts[f] for f in ("query_w1", "query_w2", "query_gate", "key_w1", "key_w2", "key_gate", "static")),
                *run.geometry(blk), scale if side == "pre" else 1.0, smb, smt, sms, KC, n_c, n_i,
                run.S if atomic else n_i * L, 0 if atomic else L, FLAGS=_flags(w),
                PRE_SIDE=side == "pre", RP=max(2, triton.next_power_of_2(R)), ATOMIC=atomic, **consts)
            for f, t in parts.items():
                if f not in g_ or (atomic and f.startswith("key")):
                    continue
                if f == "static":
                    g_[f] += t.view(B, G, -1, M, M).sum(dim=(0, 2))
                elif f.startswith("query"):
                    g_[f][:, blk.i0:blk.i1] += t.sum(1)
                else:
                    g_[f][:, blk.lo:blk.hi] += t.sum(1)
            if side == "post":
                dp, delta = out, pdelta.sum(2)
                del dpp
            else:
                ds = out
        del s, p, dp
        dsr = ds.view(B, Hkv, rep * C, L)
        qb = q[:, :, blk.i0:blk.i1].reshape(B, Hkv, rep * C, D)
        dq[:, :, blk.i0:blk.i1] = _products(dsr, k[:, :, blk.lo:blk.hi]).view(B, H, C, D)
        dk[:, :, blk.lo:blk.hi] += _products(dsr.transpose(-1, -2), qb)
        del ds, dsr
    if not cast:
        return dq, dk, dv, grads["pre"], grads["post"]
    out = {c: {f: t.to(getattr(w, f).dtype) for f, t in grads[c].items()} for c, w in (("pre", pre), ("post", post))}
    return dq, dk.to(k.dtype), dv.to(v.dtype), out["pre"], out["post"]
