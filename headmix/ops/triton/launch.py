"""Launch code of the fused DCMHA kernels: what they take (checks), tile shapes, and the launches themselves.

``triton_forward`` / ``triton_backward`` take plain tensors: ``mask`` a bool tensor (or ``None``) ANDed with
the positional structure ``causal``, ``window`` (0: none) and ``offset`` (query ``i`` sits at key ``i + offset``).
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from ..._validation import check_choice
from ...reference import COMPOSE_FIELDS, ComposeWeights
from .backward import _bwd_key_kernel, _bwd_query_kernel
from .forward import _fwd_kernel, _one_query_kernel, _split_sum_kernel

MAX_HEAD_DIM = 128  # forward and backward; head dims that are no power of two are padded inside the kernels
WHOLE_HEAD_DIM = 64  # the backward kernels hold whole (padded) head dims up to this; above it they work in chunks:
HEAD_DIM_CHUNK = 64  # each program writes this many dims of dQ (or dK, dV)
MAX_HEADS_PER_GROUP = 32  # forward and backward
# More padded heads per group than this (32: DCFormer-2.8B, DCFormer/DCPythia-6.9B) take the rank-R form of the
# Compose (tiles._compose_rank) and narrower head-dim chunks (head_dim_chunks): compiled offline for sm_90
# (benchmarks/kernel_resources.py --heads 32 --head-dim 128 --no-static), the per-position-matrix kernels need
# 288 / 192 / 320 / 416 KB of shared memory (forward / backward query stages 1, 2 / backward key), an H100/H200
# has 227 KB; docs/kernels_log.md, "32 heads per group".
MATRIX_FORM_HEADS = 16
# The form of each phase's kernels in those wider groups: "rank" or "matrix" (with the chunks of head_dim_chunks the
# matrix-form forward fits too: 128 KB and 1,544 spilled bytes per thread at 32 x 128 against the rank form's 64 KB
# and 976, offline; the matrix-form backward does not fit). On an H200 (2026-11-30, 32 x 128, B=8 x 2048, static mix
# off) the rank form's forward took 46.6 ms, the matrix form's 52.9 ms. At 16 heads the rank form (MATRIX_FORM_HEADS
# lowered to 8) lost to the matrix form: 94.0 ms fwd+bwd against 22.8 ms at 16 x 64 with 16x16 tiles, 160 ms with
# 32x32 tiles; larger tiles do not fit (278-295 KB of shared memory).
WIDE_FORMS = {"fwd": "rank", "bwd": "rank"}
# backend="auto" does not choose those wider groups' tile kernels: measured on an H200 (2026-11-30, bf16, B=8 x 2048,
# 32 heads in one group, static mix off; docs/kernels_log.md, "32 heads per group"), they train 1.9-2.1x SLOWER than the
# chunked path (fwd+bwd 347 / 400 ms at head dim 80 / 128, chunked 180 / 187 ms). Without a static mix such groups
# train on the blockwise path (TRAINING_KERNELS below: 46 / 48 ms), which auto chooses; with one auto keeps them on the
# chunked path and says why once; backend="triton" runs the tile kernels; True lets auto choose them.
WIDE_GROUPS_ON_AUTO = False
# Which kernels train (the forward that stores the row log-sum-exp, and the backward): "tiles", the fused tile kernels
# (forward.py, backward.py: nothing quadratic in memory), "blockwise" (blockwise.py: materialised query blocks, the
# products on cuBLAS, the Compose in Triton at memory speed, a bounded buffer), or "auto": blockwise where it measured
# faster. On an H200 (2026-12-01, bf16, B = 8 x 2048, causal, rank 2, forward+backward ms, tiles -> blockwise;
# `python benchmarks/training_paths.py --shapes 16x64 16x128 32x80:1 32x128:1 --windows 0 256`, docs/kernels_log.md "The
# blockwise training path"): 16 x 64 20.9 -> 18.2, window 256 5.3 -> 13.3; 16 x 128 59.8 -> 19.0, window 256 16.4 ->
# 14.2; 32 x 80 in one group 351.7 -> 38.5, window 256 96.8 -> 16.8; 32 x 128 404.9 -> 40.2, window 256 112.1 ->
# 18.1; with the static mix (2026-11-30) 16 x 64 21.0 -> 66.9. So auto takes the blockwise path without a static mix
# everywhere but windowed groups of <= 16 heads, head dims <= 64; op.training_choice adds the projected kernels.
TRAINING_KERNELS = "auto"
# Head-dim chunks of those wider groups' kernels: the output chunk one program writes, per phase, and the chunks of the
# forward's score products (the backward's are half its output chunk, as below). From offline sm_90 compiles at
# 32 x 128, static mix off (docs/kernels_log.md): the forward writing 64-wide output chunks spills 1,320 bytes per
# thread against 976 at 32, and recomputes the scores for half as many chunks; the backward's two 32-wide accumulators
# (dK and dV) already take 128 of a thread's 255 registers.
WIDE_OUTPUT_CHUNK = {"fwd": 64, "bwd": 32}
WIDE_SCORE_CHUNK = 32
# The Compose fields in the dataclass's order: bit i of a kernel's flags is field i (tiles.py names the bits;
# tests/test_triton.py::test_flag_bits_name_the_compose_fields ties the two).
FIELDS = COMPOSE_FIELDS

# Tile shapes per phase ("fwd", "bwd") and size class of the padded heads per group (tile_key: 4, fewer than
# `SMALL_TILE_HEADS` below; 16, 8 or 16; 32, more than MATRIX_FORM_HEADS): (BLOCK_M, BLOCK_N, num_warps, num_stages).
# One pipeline stage: the
# (heads x block x block) tiles already fill the shared memory. Tuning scripts (benchmarks/tune_triton.py) may
# override entries to measure alternatives. 32x32 tiles are for 1-4 heads per group only: at 8 heads they need
# more registers than a thread has (compiled offline for sm_90 by benchmarks/kernel_resources.py, head dim 64,
# bf16: forward 2,824 and query backward 8,496-10,048 spilled bytes per thread, against 544 and 120-448 with
# 16x16 tiles), and a study-sized DCFormer++ (8 layers x 512, 8 heads x 64, 32 x 1024 tokens) had not finished
# its first training step after 195 s on an H200 (2026-11-30).
TILES: dict[tuple, tuple[int, int, int, int]] = {
    ("fwd", 16): (16, 16, 4, 1), ("fwd", 4): (32, 32, 4, 1),  # measured: docs/triton_tiles_h100.md
    ("bwd", 16): (16, 16, 8, 1), ("bwd", 4): (32, 32, 4, 1),
    ("fwd", 32): (16, 16, 8, 1), ("bwd", 32): (16, 16, 8, 1),  # offline sm_90 figures only (docs/kernels_log.md)
    # Padded head dims above 64 (80, 96, 128) where they differ: at 4 warps the 16-head forward compiles to 32
    # registers and 7.8 KB of local memory per thread, at 8 to 255 and 632 B; measured on an H200 (2026-11-30, bf16,
    # 8 x 2048, causal, static off): forward 12.18 -> 7.60 ms, forward+backward 64.95 -> 60.17 ms
    ("fwd", 16, 128): (16, 16, 8, 1),
}
SMALL_TILE_HEADS = 8


def tile_key(phase: str, padded_heads: int, head_dim: int = 64) -> tuple:
    """The :data:`TILES` entry of ``phase`` ("fwd" or "bwd") for ``padded_heads`` (a power of two) heads per group
    and ``head_dim`` (padded): ``(phase, size class)`` with the size class 4 (up to 4), 16 (8-16) or 32, or
    ``(phase, size class, 128)`` where head dims above 64 have an entry of their own."""
    key = (phase, 4 if padded_heads < SMALL_TILE_HEADS else 16 if padded_heads <= MATRIX_FORM_HEADS else 32)
    wide = (*key, 128)
    return wide if head_dim > 64 and wide in TILES else key


def tile_shape(phase: str, padded_heads: int, head_dim: int = 64) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of ``phase`` for ``padded_heads`` heads per group of
    ``head_dim`` (padded) dimensions."""
    return TILES[tile_key(phase, padded_heads, head_dim)]


# Operands of the head-mixing products of the pre- and post-softmax Compose (and of their gradients), by input
# dtype; float32 inputs always mix in exact float32. "bf16" (fastest) or "tf32" (float32 operands, 10-bit mantissa);
# accumulation is float32 either way. Measured on an H200 (2026-11-30, docs/kernels_log.md "Mixing precision"): bf16
# pre-softmax mixing trains DCFormer++-405M 6.3% faster than tf32 (34.1k against 32.1k tokens/s) and, with bf16
# inputs, leaves the kernels' largest error at 0.011-0.013 against the float32 reference where the reference
# implementation run in bf16 is at 0.020-0.023; with fp16 inputs it would be 0.0073 against fp16's own 0.0027,
# so fp16 keeps tf32 (0.0029).
MIX_PRECISION: dict[torch.dtype, dict[str, str]] = {
    torch.bfloat16: {"pre": "bf16", "post": "bf16"},
    torch.float16: {"pre": "tf32", "post": "bf16"},
}


def mix_precision(dtype: torch.dtype) -> dict[str, str]:
    """The head-mixing operands ``{"pre": ..., "post": ...}`` of inputs of ``dtype`` ("ieee" for float32)."""
    if dtype == torch.float32:
        return {"pre": "ieee", "post": "ieee"}
    return MIX_PRECISION[dtype]

# Split the keys when the query blocks alone give fewer programs than this (decoding): about one per H100 SM.
SPLIT_TARGET_PROGRAMS = 128
# ... with at least this many keys per query (decoding): a split's two more launches cost a host-bound prefill more host
# time than they save GPU time (H200, 16 x 64, 1 x 512: 298 against 89 us; kernels_log.md, "The prefill's host time").
SPLIT_MIN_KEYS_PER_QUERY = 4
SPLIT_SUM_BLOCK = 256  # elements per program of the sum of the splits' partial outputs
SPLITS_READ = 8  # splits whose statistics (one-query kernel) or partial outputs (the sum) are read at once
# What decodes one query (T = 1, no gradients): "one_query", :func:`_one_query_kernel` ((heads x keys) tiles, each
# Compose term as written), or "tiles", the forward's split-key path (docs/kernels_log.md, "Decoding on the device":
# H200, 4096 keys, graph: 0.059 / 0.295 / 0.073 against 0.080 / 0.563 / 0.121 ms, head dim 64 batch 1, 16, 128 batch 1).
DECODE_KERNEL = "one_query"
# (keys per tile, head-dim chunk of the score products, warps) of the one-query kernel by (padded) head dim. 64: H200,
# 2026-12-01, bf16, 16 heads, rank 2, no static mix, graph replay, us at (batch, keys) (1, 256) (1, 640) (16, 256)
# (16, 640) (a scratch sweep; decode_splits.py --tiles repeats it): (32, 32, 4) 10.5 12.7 12.9 23.5; (16, 32, 8) 11.9
# 14.3 16.0 44.4; (32, 32, 8) 10.3 12.7 13.0 26.8; (64, 32, 8) 13.4 14.4 13.9 26.4. 128, at (1, 4096) (16, 4096) (1,
# 640) (16, 640): (16, 32, 4) 36.0 218.0 14.4 42.5; (8, 32, 8) 45.2 296.2 19.7 86.2; (16, 32, 8) 35.9 204.3 14.3 50.7
ONE_QUERY_TILES = {64: (32, 32, 4), 128: (16, 32, 4)}


def one_query_tile(head_dim: int) -> tuple[int, int, int]:
    """``(BN, DC, num_warps)`` of the one-query decode kernel for a (padded) head dim."""
    BN, DC, warps = ONE_QUERY_TILES[64 if head_dim <= 64 else 128]
    return BN, min(DC, head_dim), warps


def auto_refusal(heads_per_group: int, static: bool = True) -> str | None:
    """Why ``backend="auto"`` does not choose the kernels for a group of ``heads_per_group`` heads that they take
    (:data:`WIDE_GROUPS_ON_AUTO`; ``static``: a Compose has a static mix, or may have), or ``None``."""
    wide = padded_heads(heads_per_group) > MATRIX_FORM_HEADS
    if wide and not WIDE_GROUPS_ON_AUTO and training_kernels(padded_heads(heads_per_group), 64, static) == "tiles":
        return (f"{heads_per_group} heads per group with a static head mix run on the rank-R kernels, which train about "
                "2x slower than the chunked path on an H200 (backend='triton' runs them; "
                "headmix.ops.triton.launch.WIDE_GROUPS_ON_AUTO = True lets auto choose them; without a static mix they "
                "train on the faster blockwise kernels). Training compiled (headmix train compile=true, or "
                "torch.compile) fuses the chunked path: a 32 x 80 layer trained 3.1x faster than eager on an H200")
    return None


def training_kernels(padded_heads: int, head_dim: int, static: bool, window: int = 0) -> str:
    """"tiles" or "blockwise" (or a forced "projected"): which kernels train ``padded_heads`` heads of ``head_dim``
    dims, ``static`` whether a Compose has a static mix, ``window`` the window (:data:`TRAINING_KERNELS`)."""
    check_choice("TRAINING_KERNELS", TRAINING_KERNELS, ("auto", "tiles", "blockwise", "projected"))
    if TRAINING_KERNELS != "auto":
        return TRAINING_KERNELS
    if static:
        return "tiles"
    wide_head_dim = next_pow2(head_dim) > WHOLE_HEAD_DIM
    return "blockwise" if padded_heads > MATRIX_FORM_HEADS or not window or wide_head_dim else "tiles"


def rank_form(phase: str, padded_heads: int) -> bool:
    """Whether the kernels of ``phase`` ("fwd" or "bwd") for ``padded_heads`` heads per group hold the Compose in
    the rank-R form (``RANKR``) rather than as per-position mixing matrices."""
    return padded_heads > MATRIX_FORM_HEADS and WIDE_FORMS[phase] == "rank"


def head_dim_chunks(phase: str, padded_heads: int, DK: int, DV: int) -> tuple[int, int]:
    """The kernels' head-dim chunks for padded head dims ``DK``, ``DV``. "fwd": ``(DCS, DCV)``, the scores'
    products accumulated over ``DCS``-wide chunks, the output written in ``DCV``-wide chunks (one per program);
    "bwd": ``(DCK, DCV)``, the chunks of dQ/dK and dV one program writes (its score products: half-chunks).
    Up to 16 heads per group the forward holds whole head dims and the backward chunks above
    :data:`WHOLE_HEAD_DIM`; wider groups chunk by :data:`WIDE_OUTPUT_CHUNK` and :data:`WIDE_SCORE_CHUNK`."""
    if padded_heads > MATRIX_FORM_HEADS:
        out = WIDE_OUTPUT_CHUNK[phase]
        return (min(DK, WIDE_SCORE_CHUNK) if phase == "fwd" else min(DK, out)), min(DV, out)
    if phase == "fwd" or max(DK, DV) <= WHOLE_HEAD_DIM:
        return DK, DV
    return HEAD_DIM_CHUNK, HEAD_DIM_CHUNK  # equal (padded) head dims (check_supported)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# The tile kernels hold a group's heads padded to a power of two, and from SMALL_TILE_HEADS on to at least
# MIX_HEADS: the head-mixing products (`tiles._bmm`) are tensor-core `tl.dot`s only when every dimension is at
# least 16; below that they unroll on CUDA cores with a cross-warp reduction per head, which at 8 heads made
# a study-sized DCFormer++ (8 layers x 512, 8 heads x 64, 32 x 1024 tokens) take 1,007 ms a training step on an
# H200 (2026-11-30; Transformer++ 55 ms). The padded heads are masked (read as zeros, never stored). 1-4 heads
# keep the unrolled products (their 32x32 tiles; the interpreter tests' small cases). The one-query decode
# kernel has no head-mixing products and pads to a power of two only.
MIX_HEADS = 16


def padded_heads(heads_per_group: int) -> int:
    """The heads per group the tile kernels hold for ``heads_per_group`` real ones (see :data:`MIX_HEADS`)."""
    MP = next_pow2(heads_per_group)
    return max(MP, MIX_HEADS) if MP >= SMALL_TILE_HEADS else MP


def check_supported(shape: tuple[int, ...], v_dim: int, groups: int, dtype: torch.dtype, training: bool,
                    kv_heads: int | None = None) -> None:
    """Raise a ``ValueError`` naming the value and what is allowed unless the kernels take queries of
    ``shape`` ``(B, H, T, D)`` and dtype ``dtype``, values of head dim ``v_dim``, ``groups`` head groups,
    ``kv_heads`` key/value heads (default ``H``), with (``training``) or without gradients.
    ``backend="auto"`` asks this before choosing the kernels."""
    H, DK = shape[1], shape[-1]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"triton backend: dtype {dtype} is not supported: expected float32, bfloat16 or float16")
    if H % groups:
        raise ValueError(f"triton backend: num_heads={H} must be divisible by groups={groups}")
    if kv_heads is not None and (kv_heads < 1 or H % kv_heads):
        raise ValueError(f"triton backend: {kv_heads} key/value heads must divide the {H} query heads")
    M = H // groups
    if M > MAX_HEADS_PER_GROUP:
        raise ValueError(f"triton backend: {M} heads per group is not supported: expected at most "
                         f"{MAX_HEADS_PER_GROUP}")
    if min(DK, v_dim) < 16:
        raise ValueError(f"triton backend: head dims {DK}, {v_dim} are not supported: expected at least 16")
    if max(DK, v_dim) > MAX_HEAD_DIM:
        raise ValueError(f"triton backend: head dim {max(DK, v_dim)} is not supported: expected at most "
                         f"{MAX_HEAD_DIM}")
    whole = WHOLE_HEAD_DIM if padded_heads(M) <= MATRIX_FORM_HEADS else WIDE_OUTPUT_CHUNK["bwd"]
    if training and max(next_pow2(DK), next_pow2(v_dim)) > whole and next_pow2(DK) != next_pow2(v_dim):
        raise ValueError(f"triton backend: training with head dims above {whole} ({M} heads per group) needs equal "
                         f"key and value head dims, got {DK} and {v_dim}")


def _flags(w: ComposeWeights | None) -> int:
    """Bit ``i`` set when field ``FIELDS[i]`` of ``w`` is present (names of the bits: tiles.py)."""
    if w is None:
        return 0
    return sum(1 << i for i, f in enumerate(FIELDS) if getattr(w, f) is not None)


def _pointers(w: ComposeWeights | None, dummy: Tensor) -> list[Tensor]:
    if w is None:
        return [dummy] * 7
    return [dummy if getattr(w, f) is None else getattr(w, f).contiguous() for f in FIELDS]


ROW_FIELDS = ("query_w1", "query_w2", "query_gate", "key_w1", "key_w2", "key_gate")


def _row_pointers(w: ComposeWeights | None, dummy: Tensor) -> tuple[list[Tensor], list[int]]:
    """The seven fields of ``w`` as :func:`_pointers`, except that the per-position fields ``(B, T or S, ...)`` keep
    their batch and position strides when each position's numbers lie together (views of a static cache's packed
    buffer, or of a decoding step's packed rows: no copy per step), and those strides, (batch, position) pairs in
    :data:`ROW_FIELDS` order."""
    ptrs = _pointers(None if w is None else ComposeWeights(static=w.static), dummy)  # (the others set below)
    strides: list[int] = []
    for f in ROW_FIELDS:
        t = None if w is None else getattr(w, f)
        if t is not None and t.numel() and not t[0, 0].is_contiguous():
            t = t.contiguous()
        ptrs[FIELDS.index(f)] = dummy if t is None else t
        strides += [0, 0] if t is None else [t.stride(0), t.stride(1)]
    return ptrs, strides


def _check(q: Tensor, k: Tensor, v: Tensor, groups: int, pre, post) -> tuple[int, int]:
    B, H, T, dk = q.shape
    if k.shape[1] != v.shape[1] or H % k.shape[1]:
        raise ValueError(f"triton backend: q has {H} heads but k has {k.shape[1]} and v {v.shape[1]}: expected "
                         "k and v with the same number of heads, dividing the query heads")
    M = H // groups
    ranks = {getattr(w, f).shape[3] for w in (pre, post) if w is not None
             for f in ("query_w1", "key_w1") if getattr(w, f) is not None}
    if len(ranks) > 1:
        raise ValueError(f"triton backend: pre and post Compose must share one rank, got {sorted(ranks)}")
    R = ranks.pop() if ranks else 1
    if R > 8:
        raise ValueError(f"triton backend: rank {R} is not supported: expected at most 8")
    return M, R


def launch_meta(q: Tensor, k: Tensor, v: Tensor, groups: int, pre, post, phase: str) -> dict:
    """The kernels' compile-time parameters and launch shape for these inputs (``phase``: "fwd" or "bwd")."""
    check_supported(tuple(q.shape), v.shape[-1], groups, q.dtype, training=phase == "bwd", kv_heads=k.shape[1])
    M, R = _check(q, k, v, groups, pre, post)
    MP = padded_heads(M)
    DK, DV = next_pow2(q.shape[-1]), next_pow2(v.shape[-1])
    BM, BN, warps, stages = tile_shape(phase, MP, max(DK, DV))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    mix = mix_precision(q.dtype)
    return dict(G=groups, M=M, MP=MP, R=R, DK=DK, DV=DV, BM=BM, BN=BN, PREC=prec, MIX_PRE=mix["pre"],
                MIX_POST=mix["post"], RANKR=rank_form(phase, MP), num_warps=warps, num_stages=stages)


def _mask_args(mask: Tensor | None, T: int, S: int, dummy: Tensor):
    """``(tensor, batch stride, query stride, key stride)`` of a bool mask broadcastable to ``(B, 1, T, S)``,
    as uint8 with broadcast dimensions kept at stride 0 (a key-padding mask is read as one row per batch)."""
    if mask is None:
        return dummy, 0, 0, 0
    if mask.dtype != torch.bool:
        raise ValueError(f"triton backend: mask must be bool, got {mask.dtype}")
    m = mask.view(torch.uint8)  # the same bytes (0/1) read as uint8: no copy, no launch
    while m.dim() < 4:
        m = m[None]
    m = m.expand(m.shape[0], 1, T, S)[:, 0]
    return m, (m.stride(0) if m.shape[0] > 1 else 0), m.stride(1), m.stride(2)


def _key_splits(programs: int, S: int, BN: int, T: int = 1) -> tuple[int, int]:
    """``(chunk, n_split)``: keys per split (a multiple of ``BN``) and the number of splits for ``T`` queries against
    ``S`` keys; ``(S, 1)`` when the query blocks fill the device or :data:`SPLIT_MIN_KEYS_PER_QUERY` is not met."""
    if programs * 2 > SPLIT_TARGET_PROGRAMS or S < SPLIT_MIN_KEYS_PER_QUERY * T:
        return S, 1
    return _split_chunks(S, SPLIT_TARGET_PROGRAMS // programs, BN)


def _split_chunks(S: int, splits: int, BN: int) -> tuple[int, int]:
    """``(chunk, n_split)`` for about ``splits`` splits of ``S`` keys, each chunk a multiple of ``BN`` keys."""
    chunk = max(BN, triton.cdiv(triton.cdiv(S, splits), BN) * BN)
    return chunk, triton.cdiv(S, chunk)


def _decode_splits(programs: int, S: int, BN: int, warps: int = 8) -> tuple[int, int]:
    """``(chunk, n_split)`` of the one-query decode kernel: about ``sqrt(S)`` splits, at most ``SPLIT_TARGET_PROGRAMS
    / programs`` for 8-warp programs, ``8 / warps`` times that for smaller ones (the same warps in all), twice that
    from 2048 keys on (each program reads more keys: a second wave pays). H200, 2026-12-01, bf16, 16 heads, rank 2, no
    static mix, graph replay (a scratch sweep), 4096 keys, batch 1: 32-key tiles (head dim 64) 64 splits 24.1
    us, 128 30.2, 32 26.5; 16-key tiles (128) 34.2, 36.0, 47.3. Earlier, 8-warp programs of 16 keys: 640 keys, batch 16:
    the cap's 8 splits 52.5 us, 14 61.5 (head dim 64); 4096 keys, batch 16: 309.4 (8), 241.3 (16), 221.2 (32)."""
    cap = SPLIT_TARGET_PROGRAMS * max(1, 8 // warps) * (2 if S >= 2048 else 1)
    return _split_chunks(S, max(1, min(cap // programs, math.isqrt(S))), BN)


def _shape_args(q: Tensor, k: Tensor, v: Tensor, offset: int) -> tuple[int, ...]:
    """``T, S, off, kv_rep, dk_n, dv_n``: lengths, query offset, query heads per key/value head, real head dims."""
    return q.shape[2], k.shape[2], offset, q.shape[1] // k.shape[1], q.shape[-1], v.shape[-1]


def triton_forward(q, k, v, scale, mask, pre, post, groups, causal, window, offset, split: bool | None = None):
    """``(O, lse)``; ``lse`` is ``None`` on the split-key path (``split=None``: split when there are few
    query blocks against many keys, as in decoding; splits are for inference: the backward pass needs ``lse``)."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    meta = launch_meta(q, k, v, groups, pre, post, "fwd")
    dummy = q.new_empty(1)
    m, smb, smt, sms = _mask_args(mask, T, S, dummy)
    n_blocks = triton.cdiv(T, meta["BM"])
    chunk, n_split = _key_splits(n_blocks * B * groups, S, meta["BN"], T) if split is not False else (S, 1)
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    strides = (*q.stride(), *k.stride(), *v.stride())
    DCS, DCV = head_dim_chunks("fwd", meta["MP"], meta["DK"], meta["DV"])
    out_chunks = meta["DV"] // DCV if n_split == 1 else 1  # (the split-key launches write whole head dims)
    flags = dict(PRE=_flags(pre), POST=_flags(post), CAUSAL=causal, WINDOW=window or 0, HAS_MASK=mask is not None,
                 RELOAD=meta["DK"] >= 128, DCS=DCS, DCV=DCV if n_split == 1 else meta["DV"], num_warps=warps,
                 num_stages=stages, **meta)
    shape = _shape_args(q, k, v, offset)
    if DECODE_KERNEL not in ("tiles", "one_query"):
        raise ValueError(f"DECODE_KERNEL={DECODE_KERNEL!r} is not allowed: expected 'tiles' or 'one_query'")
    if T == 1 and split is not False and DECODE_KERNEL == "one_query":
        (pre_ptrs, pre_ks), (post_ptrs, post_ks) = _row_pointers(pre, dummy), _row_pointers(post, dummy)
        return _one_query_forward(q, k, v, scale, m, (smb, sms), (*pre_ptrs, *post_ptrs), (*pre_ks, *post_ks),
                                  flags, shape), None
    weights = (*_pointers(pre, dummy), *_pointers(post, dummy))
    if n_split == 1:
        o = torch.empty(B, H, T, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        _fwd_kernel[(n_blocks, B * groups, out_chunks)](q, k, v, o, lse, m, *weights, *strides, *o.stride(), smb, smt,
                                                        sms,
                                               *shape, scale, S, 1, PHASE=0, **flags)
        return o, lse
    stats = torch.empty(2, n_split, B, H, T, dtype=torch.float32, device=q.device)
    parts = torch.empty(n_split, B, H, T, v.shape[-1], dtype=torch.float32, device=q.device)
    grid = (n_blocks, B * groups, n_split)
    # three launches, nothing read back on the host (a CUDA graph captures them): the splits' statistics; each
    # split's partial output, with the statistics of all splits combined into the row normaliser in the kernel;
    # the sum of the partial outputs in split order, in the output dtype
    _fwd_kernel[grid](q, k, v, parts, stats, m, *weights, *strides, *parts.stride()[1:], smb, smt, sms, *shape,
                      scale, chunk, n_split, PHASE=1, **flags)
    _fwd_kernel[grid](q, k, v, parts, stats, m, *weights, *strides, *parts.stride()[1:], smb, smt, sms, *shape,
                      scale, chunk, n_split, PHASE=2, **flags)
    return _sum_splits(parts, q.dtype), None


def _sum_splits(parts: Tensor, dtype: torch.dtype) -> Tensor:
    """The last decoding launch: the float32 partial outputs ``(n_split, *shape)`` summed in split order into a
    new ``shape`` tensor of ``dtype`` (:func:`_split_sum_kernel`)."""
    o = torch.empty(parts.shape[1:], dtype=dtype, device=parts.device)
    n = o.numel()
    _split_sum_kernel[(triton.cdiv(n, SPLIT_SUM_BLOCK),)](parts, o, n, parts.shape[0], BLOCK=SPLIT_SUM_BLOCK,
                                                           SC=SPLITS_READ)
    return o


def _one_query_forward(q, k, v, scale, m, mask_strides, weights, row_strides, flags, shape) -> Tensor:
    """One query per (batch, head): :func:`_one_query_kernel`'s two phases over split keys, then the sum of the
    splits (three launches, nothing read back on the host)."""
    B, H, _, _ = q.shape
    S, dv_n = k.shape[2], v.shape[-1]
    BN, DC, warps = one_query_tile(max(flags["DK"], flags["DV"]))
    G = flags["G"]
    chunk, n_split = _decode_splits(B * G, S, BN, warps)
    consts = dict(G=G, M=flags["M"], MP=next_pow2(flags["M"]), R=flags["R"], DK=flags["DK"], DV=flags["DV"],
                  DC=min(DC, flags["DK"]), BN=BN, PRE=flags["PRE"], POST=flags["POST"], CAUSAL=flags["CAUSAL"],
                  WINDOW=flags["WINDOW"], HAS_MASK=flags["HAS_MASK"], num_warps=warps, num_stages=1)
    _, _, off, kv_rep, dk_n, _ = shape
    stats = torch.empty(2, n_split, B, H, dtype=torch.float32, device=q.device)
    parts = torch.empty(n_split, B, H, 1, dv_n, dtype=torch.float32, device=q.device)  # (the kernel: B * H rows)
    scores = torch.empty(B * H, S, dtype=torch.float32, device=q.device)
    strides = (q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), *mask_strides)
    for phase in (1, 2):
        _one_query_kernel[(B * G, n_split)](q, k, v, parts, stats, scores, m, *weights, *strides, *row_strides, S, off,
                                            kv_rep, dk_n, dv_n, scale, chunk, n_split, PHASE=phase, SC=SPLITS_READ,
                                            **consts)
    return _sum_splits(parts, q.dtype)


def triton_backward(do, q, k, v, lse, scale, mask, pre, post, groups, causal, window, offset):
    """Gradients ``(dq, dk, dv, dpre, dpost)``; ``dpre``/``dpost`` are dicts field -> gradient. ``dk``, ``dv``
    have the heads of ``k``, ``v`` (grouped-query heads: summed over the query heads that share them)."""
    B, H, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    meta = launch_meta(q, k, v, groups, pre, post, "bwd")
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    G, M, R = groups, meta["M"], meta["R"]
    dummy = q.new_empty(1)
    # the gradient kernels write dq with the strides of q: give it a dense layout (a non-dense input, e.g. a view
    # into a larger buffer under torch.compile, would otherwise be written out of place)
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    m, smb, smt, sms = _mask_args(mask, T, S, dummy)
    f32 = dict(dtype=torch.float32, device=q.device)
    delta = torch.empty(B, H, T, **f32)
    n_blocks = triton.cdiv(T, meta["BM"])
    dq = torch.empty_like(q)
    # dK, dV per query head (dense (B, H, S, D)); with shared key/value heads summed below
    dk = torch.empty(B, H, S, k.shape[-1], dtype=k.dtype if Hkv == H else torch.float32, device=q.device)
    dv = torch.empty(B, H, S, v.shape[-1], dtype=v.dtype if Hkv == H else torch.float32, device=q.device)
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), smb, smt, sms, *_shape_args(q, k, v, offset))
    flags = dict(PRE=_flags(pre), POST=_flags(post), CAUSAL=causal, WINDOW=window or 0, HAS_MASK=mask is not None)
    pre_ptrs, post_ptrs = _pointers(pre, dummy), _pointers(post, dummy)
    qgrad = {c: (torch.zeros(B, T, G, R, M, **f32), torch.zeros(B, T, G, R, M, **f32), torch.zeros(B, T, G, M, **f32))
             for c in ("pre", "post")}
    dw_part = torch.zeros(B * G, n_blocks, 2, M, M, **f32)
    DK, DV = meta["DK"], meta["DV"]
    DCK, DCV = head_dim_chunks("bwd", meta["MP"], DK, DV)
    meta.update(DCK=DCK, DCV=DCV, RP=next_pow2(R))
    chunks = DK // DCK
    for stage, c in ((1, "post"), (2, "pre")):
        _bwd_query_kernel[(n_blocks, B * G, 1 if stage == 1 else chunks)](
            q, k, v, do, lse, delta, m, dq, *pre_ptrs, *post_ptrs, *qgrad[c], dw_part, *common,
            scale, n_blocks, STAGE=stage, num_warps=warps, num_stages=stages, **meta, **flags,
        )
    kgrad = [torch.zeros(B, S, G, R, M, **f32), torch.zeros(B, S, G, R, M, **f32), torch.zeros(B, S, G, M, **f32),
             torch.zeros(B, S, G, R, M, **f32), torch.zeros(B, S, G, R, M, **f32), torch.zeros(B, S, G, M, **f32)]
    _bwd_key_kernel[(triton.cdiv(S, meta["BN"]), B * G, chunks)](
        q, k, v, do, lse, delta, m, dk, dv, *pre_ptrs, *post_ptrs, *kgrad, *common,
        scale, num_warps=warps, num_stages=stages, DK_STORE=k.shape[-1], DV_STORE=v.shape[-1], **meta, **flags,
    )
    if Hkv != H:
        dk = dk.view(B, Hkv, H // Hkv, S, -1).sum(2).to(k.dtype)
        dv = dv.view(B, Hkv, H // Hkv, S, -1).sum(2).to(v.dtype)
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


def tensor_core_flops(head_dim: int, heads_per_group: int, pairs: float) -> dict[str, float]:
    """Tensor-core FLOPs each kernel does over ``pairs`` (query, key, head) triples, every Compose term on:
    per pass ``2D`` for each of ``QK^T``, ``dO V^T``, ``P'V``, ``dS K``, ``dS^T Q``, ``P'^T dO``; ``4M`` for each
    Compose or adjoint (the ``E_i`` and ``F_j`` products, ``M`` padded heads per group), ``2M`` for each
    ``dE``/``dF`` accumulation. Groups wider than :data:`MATRIX_FORM_HEADS`: the rank-R Compose runs on CUDA cores
    (its static mix, when on, is not counted) and every head-dim chunk's program recomputes the score products
    (:func:`head_dim_chunks`). For the profile script (benchmarks/dcmha_profile.py)."""
    D, M = next_pow2(head_dim), padded_heads(heads_per_group)
    if M > MATRIX_FORM_HEADS:
        nf = D // head_dim_chunks("fwd", M, D, D)[1]
        nb = D // head_dim_chunks("bwd", M, D, D)[0]
        per = {
            "_fwd_kernel": nf * 2 * 2 * D + 2 * D + (0 if rank_form("fwd", M) else nf * 3 * 4 * M),
            "_bwd_query_kernel": (2 * D + 2 * D) + nb * (2 * D + 2 * D) + 2 * D,
            "_bwd_key_kernel": nb * (2 * D + 2 * D) + 2 * D + 2 * D,
        }
        return {name: f * pairs for name, f in per.items()}
    per = {
        "_fwd_kernel": 2 * 2 * D + 2 * D + 2 * 4 * M + 4 * M,
        "_bwd_query_kernel": (2 * D + 2 * D + 4 * M + 4 * M + 2 * M) + (2 * D + 2 * D + 3 * 4 * M + 2 * D + 2 * M),
        "_bwd_key_kernel": 2 * D * 4 + 4 * M * 4 + 2 * 2 * M,
    }
    return {name: f * pairs for name, f in per.items()}

