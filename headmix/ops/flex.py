"""Plain multi-head attention under a window or padding mask, on a fused kernel: FlexAttention.

``F.scaled_dot_product_attention`` runs its flash kernel only for no mask or the plain causal mask;
given any other mask (a sliding window, padding) it falls back to the memory-efficient kernel, which
reads the whole ``(T, S)`` mask and skips nothing, so a 256-key window at 8k tokens cost *more* than
global attention (11.7 vs 6.0 ms per layer on an H200). FlexAttention
(:func:`torch.nn.attention.flex_attention.flex_attention`) compiles a flash-style Triton kernel that
visits only the key blocks a :class:`~torch.nn.attention.flex_attention.BlockMask` lists, applies the
mask element-wise only in partially masked blocks, and skips it in full ones.

What runs where (:func:`masked_attention`, the one entry point):

* CUDA tensors, at least one block of queries (:data:`BLOCK`): FlexAttention, compiled once per shape
  (``torch.compile`` of the op alone; inside a compiled model it is traced into the model's graph).
  A positional mask (``structure=(causal, window)``) gets a block mask built from ``(causal, window)``
  and cached per ``(query_len, key_len, causal, window, device)``; any other mask (padding, a decoding
  cache, custom positions) gets one built from the boolean mask itself (block-level any/all), and its
  ``mask_mod`` reads that mask in the partial blocks.
* Elsewhere (the CPU, where FlexAttention has no backward in torch 2.13 and its eager form
  materialises every score; a single decoding query; other dtypes): SDPA with the boolean mask, the
  path this module replaces on the GPU.

Both give the headmix convention for a query that may see no key: a zero output (and zero gradients).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import attention_mask

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: the SDPA path only
    BlockMask = create_block_mask = flex_attention = None

BLOCK = 128
"""Query and key block size of the block masks (FlexAttention's default tile)."""

_FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_MASKS: dict[tuple, BlockMask] = {}
_MAX_CACHED_MASKS = 64


def flex_takes(q: Tensor) -> bool:
    """Whether :func:`masked_attention` runs FlexAttention for queries ``q`` ``(B, H, T, Dk)``: CUDA tensors of
    float16/bfloat16/float32, head dim 16..256, and at least :data:`BLOCK` queries (below one block there is
    nothing to skip, and SDPA with a mask avoids a compile per short length)."""
    return (flex_attention is not None and q.is_cuda and q.dtype in _FLEX_DTYPES and 16 <= q.shape[-1] <= 256
            and q.shape[-2] >= BLOCK)


def sdpa_masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float) -> Tensor:
    """The plain path: SDPA with the boolean ``(B or 1, 1, T, S)`` mask, zero rows for queries without keys."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    if mask is None:
        return out
    return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)


def positional_mask_mod(causal: bool, window: int | None, offset: int = 0) -> Callable:
    """FlexAttention ``mask_mod`` of the causal / sliding-window mask of :func:`headmix.masks.attention_mask`,
    for queries at positions ``offset + q_idx`` and keys at ``kv_idx``."""

    def mask_mod(b, h, q_idx, kv_idx):
        distance = q_idx + offset - kv_idx  # i - j
        allowed = distance >= 0 if causal else distance == distance
        if window is not None:
            allowed = allowed & ((distance if causal else distance.abs()) < window)
        return allowed

    return mask_mod


def positional_block_mask(query_len: int, key_len: int, causal: bool, window: int | None,
                          device: torch.device) -> BlockMask:
    """The block mask of a causal and/or windowed mask with the queries at the last ``query_len`` of
    ``key_len`` positions, cached per arguments (built inside the graph when traced by ``torch.compile``)."""
    offset = key_len - query_len
    if torch.compiler.is_compiling():
        return create_block_mask(positional_mask_mod(causal, window, offset), None, None, query_len, key_len,
                                 device=device, BLOCK_SIZE=BLOCK)
    key = (query_len, key_len, causal, window, str(device))
    if key not in _BLOCK_MASKS:
        if len(_BLOCK_MASKS) >= _MAX_CACHED_MASKS:
            _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
        _BLOCK_MASKS[key] = create_block_mask(positional_mask_mod(causal, window, offset), None, None, query_len,
                                              key_len, device=device, BLOCK_SIZE=BLOCK)
    return _BLOCK_MASKS[key]


def dense_block_mask(mask: Tensor) -> BlockMask:
    """The block mask of a boolean "may attend" mask ``(B or 1, 1, T, S)``: key blocks with no allowed pair are
    skipped, blocks where every pair is allowed run unmasked, and the rest read ``mask`` element-wise."""
    batch, _, query_len, key_len = mask.shape
    nq, nk = -(-query_len // BLOCK), -(-key_len // BLOCK)
    # Padded to whole blocks (False), so the mask_mod may read the tails of the last blocks.
    padded = F.pad(mask[:, 0], (0, nk * BLOCK - key_len, 0, nq * BLOCK - query_len))
    blocks = padded.view(batch, nq, BLOCK, nk, BLOCK)
    full = blocks.all(dim=4).all(dim=2)  # (B, nq, nk)
    partial = blocks.any(dim=4).any(dim=2) & ~full

    def listing(selected: Tensor) -> tuple[Tensor, Tensor]:
        counts = selected.sum(-1, dtype=torch.int32)
        indices = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # listed first
        return counts[:, None], indices[:, None]

    kv_num_blocks, kv_indices = listing(partial)
    full_kv_num_blocks, full_kv_indices = listing(full)
    broadcast = batch == 1

    def mask_mod(b, h, q_idx, kv_idx):
        return padded[0 if broadcast else b, q_idx, kv_idx]

    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                                    BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(query_len, key_len))


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    return torch.compile(flex_attention)


# Each (batch, heads, head dim, dtype, mask kind) the compiled kernel meets may cost a recompile (lengths become
# dynamic after the first change). Dynamo's default limit of 8 per function is reached by a sweep of shapes (the
# speed report's layer table hit it on an H200, 2026-11-29) and dynamo then runs flex_attention *unfused*, building
# every score: 13x slower than global attention at seq 2048. So the kernel gets a scoped, larger limit, and should
# even that be reached, the masked SDPA path (fused, never materialising scores per head) takes over, warned once.
RECOMPILE_LIMIT = 64
_FLEX_GAVE_UP: list[str] = []


def _run_compiled_flex(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, block_mask, *, scale: float) -> Tensor:
    if not _FLEX_GAVE_UP:
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
                return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale,
                                        enable_gqa=k.shape[1] != q.shape[1])
        except torch._dynamo.exc.FailOnRecompileLimitHit as error:
            _FLEX_GAVE_UP.append(str(error))
            warnings.warn(f"headmix: FlexAttention was recompiled {RECOMPILE_LIMIT} times (one compile per new "
                          "shape, dtype or mask kind); masked attention runs on SDPA with a mask from now on",
                          RuntimeWarning, stacklevel=3)
    return sdpa_masked_attention(q, k, v, mask, scale=scale)


def flex_masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float,
                          structure: tuple[bool, int | None] | None = None) -> Tensor:
    """FlexAttention under ``structure`` = ``(causal, window)`` (a positional mask, queries at the last positions)
    or else under the boolean ``mask`` ``(B or 1, 1, T, S)``. Compiled on CUDA; on the CPU this is
    FlexAttention's unfused eager form (forward only in torch 2.13), which the tests use."""
    query_len, key_len = q.shape[-2], k.shape[-2]
    if structure is not None:
        block_mask = positional_block_mask(query_len, key_len, *structure, device=q.device)
    elif mask is not None:
        block_mask = dense_block_mask(mask)
    else:
        block_mask = None
    if q.is_cuda and not torch.compiler.is_compiling():
        if mask is None and structure is not None:  # what SDPA needs, should the compiled kernel give up
            keys = torch.arange(key_len, device=q.device)
            mask = attention_mask(keys[key_len - query_len:], keys, causal=structure[0], window=structure[1])
        return _run_compiled_flex(q, k, v, mask, block_mask, scale=scale)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float,
                     structure: tuple[bool, int | None] | None = None, backend: str = "auto") -> Tensor:
    """Softmax attention ``(B, H, T, Dv)`` of ``q`` ``(B, H, T, Dk)`` over ``k`` ``(B, H_kv, S, Dk)``, ``v``
    ``(B, H_kv, S, Dv)`` (``H_kv`` dividing ``H``: grouped-query attention) under the boolean "may attend" ``mask`` ``(B or 1, 1, T, S)`` (``None``: all keys).

    ``structure`` = ``(causal, window)`` says that ``mask`` is exactly that positional mask (no padding, queries
    at the last ``T`` of ``S`` positions), so the block mask can be cached. ``backend``: ``"auto"`` (FlexAttention
    where :func:`flex_takes`, else SDPA), ``"flex"`` or ``"sdpa"``. A query that may see no key outputs zeros.
    """
    if backend not in ("auto", "flex", "sdpa"):
        raise ValueError(f"backend={backend!r} is not known: expected 'auto', 'flex' or 'sdpa'")
    if structure is not None:
        causal, window = structure
        if window is not None and window >= k.shape[-2]:  # the window covers every key: no window at all
            structure = (causal, None)
        if structure == (True, None) and q.shape[-2] == k.shape[-2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,  # flash kernel
                                                  enable_gqa=k.shape[1] != q.shape[1])
        if structure == (False, None):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    if backend == "sdpa" or (backend == "auto" and not flex_takes(q)):
        return sdpa_masked_attention(q, k, v, mask, scale=scale)
    if flex_attention is None:
        raise ValueError("backend='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention)")
    return flex_masked_attention(q, k, v, mask, scale=scale, structure=structure)


__all__ = ["BLOCK", "dense_block_mask", "flex_masked_attention", "flex_takes", "masked_attention",
           "positional_block_mask", "sdpa_masked_attention"]
