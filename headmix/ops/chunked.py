"""Composed attention over blocks of queries: the same math as the reference, in linear memory.

Compose acts per (query, key) position, so a block of queries needs only its own query-side
weights and the whole key side. Each block runs :func:`headmix.reference.composed_attention`; under
autograd each block is wrapped in activation checkpointing, so the backward pass recomputes the
block instead of keeping its ``(B, H, block, S)`` tensors. Peak extra memory is therefore
``O(B * H * block * S)`` instead of ``O(B * H * T * S)``, in training as in inference.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..reference import ComposeWeights, composed_attention

DEFAULT_CHUNK_SIZE = 128  # queries per block: (B, H, 128, S) scores stay small next to the weights


def chunked_composed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    mask: Tensor | None = None,
    pre: ComposeWeights | None = None,
    post: ComposeWeights | None = None,
    groups: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    structure: tuple[bool, int | None] | None = None,
) -> Tensor:
    """Same arguments and result as :func:`headmix.reference.composed_attention`, queries in blocks of
    ``chunk_size`` (``structure``, a hint for kernels, is not needed: ``mask`` says it all)."""
    T = q.shape[-2]
    if T <= chunk_size:
        return composed_attention(q, k, v, scale=scale, mask=mask, pre=pre, post=post, groups=groups)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in _tensors(q, k, v, pre, post)
    )
    outputs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        block_mask = None if mask is None else (mask[..., start:end, :] if mask.shape[-2] > 1 else mask)
        block_pre = None if pre is None else pre.query_slice(start, end)
        block_post = None if post is None else post.query_slice(start, end)

        def block(q_block: Tensor, block_mask=block_mask, block_pre=block_pre, block_post=block_post) -> Tensor:
            return composed_attention(
                q_block, k, v, scale=scale, mask=block_mask, pre=block_pre, post=block_post, groups=groups
            )

        q_block = q[..., start:end, :]
        outputs.append(checkpoint(block, q_block, use_reentrant=False) if needs_grad else block(q_block))
    return torch.cat(outputs, dim=-2)


def _tensors(q: Tensor, k: Tensor, v: Tensor, pre: ComposeWeights | None, post: ComposeWeights | None):
    yield from (q, k, v)
    for weights in (pre, post):
        if weights is not None:
            yield from vars(weights).values()
