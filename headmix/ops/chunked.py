"""Composed attention over blocks of queries: the same math as the reference, in linear memory.

Compose acts per (query, key) position, so a block of queries needs only its own query-side
weights and the key side of the keys it may see. Each block runs :func:`headmix.reference.composed_attention`
on the keys its mask's structure allows (a sliding window: ``window + block`` keys, whatever the
sequence length; causal: the keys up to the block's last query); under autograd each block is wrapped in
activation checkpointing, so the backward pass recomputes the block instead of keeping its
``(B, H, block, keys)`` tensors. Peak extra memory is therefore ``O(B * H * block * S)`` at most, in training
as in inference.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..masks import MaskSpec, as_mask_spec
from ..reference import ComposeWeights, composed_attention

DEFAULT_CHUNK_SIZE = 128  # queries per block: (B, H, 128, S) scores stay small next to the weights


def chunked_composed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    mask: MaskSpec | Tensor | None = None,
    pre: ComposeWeights | None = None,
    post: ComposeWeights | None = None,
    groups: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Same arguments and result as :func:`headmix.reference.composed_attention`, queries in blocks of
    ``chunk_size``, each against only the keys the mask's structure lets it see."""
    spec = as_mask_spec(mask)
    T, S = q.shape[-2], k.shape[-2]
    if T <= chunk_size and spec.window is None:
        return composed_attention(q, k, v, scale=scale, mask=spec, pre=pre, post=post, groups=groups)
    # one block (a short windowed call, e.g. decoding against a long cache) needs no checkpointing
    needs_grad = T > chunk_size and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in _tensors(q, k, v, pre, post)
    )
    outputs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        lo, hi = spec.key_range(start, end, S, T)
        block_mask = spec.query_slice(start, end, T, S)
        # the block sees keys lo:hi only: shift the key positions (query offset) and slice the key-side tensors
        block_mask = MaskSpec(causal=spec.causal, window=spec.window,
                              key_padding=None if spec.key_padding is None else spec.key_padding[:, lo:hi],
                              allowed=None if block_mask.allowed is None else block_mask.allowed[..., lo:hi],
                              query_offset=block_mask.offset(end - start, S) - lo)
        block_pre = None if pre is None else pre.query_slice(start, end).key_slice(lo, hi)
        block_post = None if post is None else post.query_slice(start, end).key_slice(lo, hi)

        def block(q_block: Tensor, k_block: Tensor, v_block: Tensor, block_mask=block_mask, block_pre=block_pre,
                  block_post=block_post) -> Tensor:
            return composed_attention(q_block, k_block, v_block, scale=scale, mask=block_mask, pre=block_pre,
                                      post=block_post, groups=groups)

        args = (q[..., start:end, :], k[..., lo:hi, :], v[..., lo:hi, :])
        outputs.append(checkpoint(block, *args, use_reentrant=False) if needs_grad else block(*args))
    return torch.cat(outputs, dim=-2)


def _tensors(q: Tensor, k: Tensor, v: Tensor, pre: ComposeWeights | None, post: ComposeWeights | None):
    yield from (q, k, v)
    for weights in (pre, post):
        if weights is not None:
            yield from vars(weights).values()
