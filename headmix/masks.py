"""Which keys each query may attend to: causal, sliding-window and padding masks in one place.

Every attention path (SDPA, reference, chunked, later kernels) receives the same boolean mask,
built here, with ``True`` meaning "may attend". Positions are absolute token positions, so the same
function serves a full forward pass and a decoding step against a cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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


@dataclass(frozen=True)
class MaskSpec:
    """Which keys each query may attend to, as every composed-attention backend receives it.

    The positional part is described by structure, so a kernel can skip whole blocks and read no mask:
    query ``i`` sits at key position ``i + query_offset`` (default ``S - T``: the queries are the last
    ``T`` of the ``S`` keys, as in training and in decoding against a cache). A tensor part, when present,
    is ANDed in.

    Attributes:
        causal: a query sees keys at or before its position.
        window: sliding window: keys with ``position(i) - j < window`` (``|position(i) - j| < window`` when
            not causal).
        key_padding: ``(batch, key_len)`` bool, ``True`` for real keys.
        allowed: any bool "may attend" mask broadcastable to ``(batch, 1, query_len, key_len)`` (left
            padding in generation, arbitrary positions).
        query_offset: key position of query 0 (``None``: ``key_len - query_len``).
    """

    causal: bool = False
    window: int | None = None
    key_padding: Tensor | None = None
    allowed: Tensor | None = None
    query_offset: int | None = None

    @classmethod
    def of(cls, mask: Tensor | None, structure: tuple[bool, int | None] | None = None) -> MaskSpec:
        """From a layer's dense ``mask`` and, when ``mask`` is exactly a positional mask, its ``structure``
        ``(causal, window)`` (then the tensor is dropped: kernels need not read it)."""
        if structure is not None:
            return cls(causal=structure[0], window=structure[1])
        return as_mask_spec(mask)

    @property
    def structural(self) -> bool:
        """Whether the mask is all structure (no tensor to read)."""
        return self.key_padding is None and self.allowed is None

    @property
    def plain_causal(self) -> bool:
        """Exactly the causal mask over as many queries as keys (what ``is_causal`` means to SDPA)."""
        return self.causal and self.window is None and self.structural and not self.query_offset

    def offset(self, query_len: int, key_len: int) -> int:
        return key_len - query_len if self.query_offset is None else self.query_offset

    def dense(self, query_len: int, key_len: int, device: torch.device | str | None = None) -> Tensor | None:
        """The whole mask as a bool tensor ``(batch or 1, 1, query_len, key_len)``, or ``None`` if all is allowed."""
        start = self.offset(query_len, key_len)
        mask = attention_mask(torch.arange(start, start + query_len, device=device),
                              torch.arange(key_len, device=device), causal=self.causal, window=self.window,
                              key_padding=self.key_padding)
        if self.allowed is not None:
            allowed = self.allowed.to(device) if device is not None else self.allowed
            mask = allowed if mask is None else mask & allowed
        return mask

    def key_range(self, start: int, end: int, key_len: int, query_len: int) -> tuple[int, int]:
        """The keys ``[lo, hi)`` that queries ``start:end`` may see by structure (all others are masked)."""
        offset = self.offset(query_len, key_len)
        lo, hi = 0, key_len
        if self.causal:
            hi = min(key_len, max(0, end + offset))
        if self.window is not None:
            lo = max(0, start + offset - self.window + 1)
            if not self.causal:
                hi = min(hi, max(0, end - 1 + offset + self.window))
        return lo, max(lo, hi)

    def query_slice(self, start: int, end: int, query_len: int, key_len: int) -> MaskSpec:
        """The mask of queries ``start:end`` against all keys."""
        allowed = self.allowed
        if allowed is not None and allowed.shape[-2] > 1:
            allowed = allowed[..., start:end, :]
        return replace(self, allowed=allowed, query_offset=self.offset(query_len, key_len) + start)


def as_mask_spec(mask: MaskSpec | Tensor | None) -> MaskSpec:
    """``mask`` as a :class:`MaskSpec`: a bool tensor is an explicit "may attend" mask, ``None`` allows all."""
    if mask is None:
        return MaskSpec()
    if isinstance(mask, MaskSpec):
        return mask
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a MaskSpec, a bool tensor or None, got "
                         f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
    return MaskSpec(allowed=mask)
