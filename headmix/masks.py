"""Which keys each query may attend to: causal, sliding-window and padding masks in one place.

Every attention path (SDPA, reference, chunked, later kernels) receives the same boolean mask,
built here, with ``True`` meaning "may attend". Positions are absolute token positions, so the same
function serves a full forward pass and a decoding step against a cache.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention_mask(
    query_positions: Tensor,
    key_positions: Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    key_padding: Tensor | None = None,
) -> Tensor | None:
    """Boolean mask of shape ``(batch or 1, 1, query_len, key_len)``, or ``None`` if all is allowed.

    Args:
        query_positions: ``(query_len,)`` or ``(batch, query_len)`` absolute positions.
        key_positions: ``(key_len,)`` or ``(batch, key_len)`` absolute positions.
        causal: a query at position ``i`` sees keys at positions ``j <= i``.
        window: sliding window: a query sees keys with ``i - j < window`` (the current token and the
            ``window - 1`` before it); for non-causal attention ``|i - j| < window``.
        key_padding: ``(batch, key_len)`` bool, ``True`` for real tokens.
    """
    if not causal and window is None and key_padding is None:
        return None
    qp = query_positions if query_positions.dim() == 2 else query_positions[None]
    kp = key_positions if key_positions.dim() == 2 else key_positions[None]
    distance = qp[:, :, None] - kp[:, None, :]  # (B|1, T, S): i - j
    allowed = torch.ones_like(distance, dtype=torch.bool)
    if causal:
        allowed &= distance >= 0
    if window is not None:
        allowed &= (distance.abs() if not causal else distance) < window
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, :].bool()
    return allowed[:, None]
