"""What every headmix attention layer shares: the call convention, masks, rotary, value/output projections.

A layer is called as ``layer(x)`` with ``x`` of shape ``(batch, seq, dim)`` and returns the same
shape. Subclasses say how queries and keys are made (:meth:`Attention.queries_keys`), what
per-position state their core needs (:meth:`Attention.composition_state`) and how the attention
core combines them (:meth:`Attention.attend`); masks, rotary, caching and projections live here once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .._validation import check_divisible, check_input, check_padding_mask, check_positive_int
from ..masks import attention_mask
from .rotary import RotaryEmbedding

if TYPE_CHECKING:
    from ..models.cache import LayerCache


class Attention(nn.Module):
    """Base class of the four attention layers (not used directly).

    Args:
        dim: model width ``D`` (input and output feature size).
        num_heads: number of heads ``H``.
        causal: a query sees only keys at or before its position (decoders). ``False`` for encoders.
        window: if set, a sliding window: a query sees only the ``window`` most recent positions
            (itself included).
        bias: biases on the projections.
        rotary: apply rotary position embedding to queries and keys.
        rotary_base: rotary frequency base.
        rotary_fraction: share of each head's channels that rotate (partial rotary, Pythia: 0.25).
        qk_norm: RMS-normalise each head's query and key (with a learned scale) before the product.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = True,
        window: int | None = None,
        bias: bool = False,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        rotary_fraction: float = 1.0,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        check_divisible("dim", dim, "num_heads", num_heads)
        if window is not None:
            check_positive_int("window", window)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.window = window
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.rotary = RotaryEmbedding(self.head_dim, rotary_base, rotary_fraction) if rotary else None
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else None

    # -- what subclasses provide -------------------------------------------------------------
    def queries_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Queries ``(B, H, T, Dk)`` and keys ``(B, H or 1, T, Dk)`` from ``x`` ``(B, T, D)``, before rotary."""
        raise NotImplementedError

    def composition_state(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per-position state the attention core needs besides q, k, v: ``(query_side, key_side)``,
        dicts of ``(B, T, ...)`` tensors. The key side is what a decoding cache keeps per position."""
        return {}, {}

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, state: dict[str, Tensor],
        structure: tuple[bool, int | None] | None = None,
    ) -> Tensor:
        """The attention core: ``(B, H, T, Dv)`` from projected heads ``q`` ``(B, H, T, Dk)``,
        ``k`` ``(B, H or 1, S, Dk)``, ``v`` ``(B, H, S, Dv)``.

        ``mask`` is the boolean ``(B or 1, 1, T, S)`` "may attend" mask; ``is_causal`` says that it is
        exactly the plain causal mask over ``T == S`` (so a fused causal kernel may be used);
        ``state`` holds the query-side state of the new positions and the key-side state of all ``S``
        keys (see :meth:`composition_state`). ``structure`` = ``(causal, window)`` says that ``mask`` is
        exactly that positional mask (no padding, no cache), so a kernel may skip reading it.
        """
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    def split_heads(self, t: Tensor, heads: int) -> Tensor:
        """``(B, T, heads*d)`` -> ``(B, heads, T, d)``."""
        B, T, _ = t.shape
        return t.view(B, T, heads, -1).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """Self-attention over ``x``.

        Args:
            x: ``(batch, seq, dim)``.
            padding_mask: optional ``(batch, seq)``, ``True``/1 for real tokens, ``False``/0 for padding
                (keys at padded positions are ignored; a query with no visible key outputs zeros).
            positions: optional ``(seq,)`` or ``(batch, seq)`` token positions for rotary and the
                causal/window masks (default ``0..seq-1``).
            cache: optional :class:`headmix.models.cache.LayerCache`: ``x`` holds new tokens, which
                attend to the cached ones too and are added to the cache.

        Returns:
            ``(batch, seq, dim)``.
        """
        check_input(x, self.dim)
        B, T, _ = x.shape
        if padding_mask is not None:
            padding_mask = check_padding_mask(padding_mask, B, T)
        if positions is None:
            positions = torch.arange(T, device=x.device)
        elif positions.shape not in ((T,), (B, T)):
            raise ValueError(f"positions has shape {tuple(positions.shape)}: expected ({T},) or ({B}, {T})")
        q, k = self.queries_keys(x)
        v = self.split_heads(self.v_proj(x), self.num_heads)
        q, k = self.position_queries_keys(q, k, positions, positions)
        query_state, key_state = self.composition_state(x)
        keys = {"k": k.transpose(1, 2), "v": v.transpose(1, 2), **key_state}  # every entry (B, T, ...)
        key_positions, key_valid = positions, padding_mask
        if cache is not None:
            valid = padding_mask if padding_mask is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
            keys, key_positions, key_valid = cache.update(keys, positions.expand(B, T), valid)
        mask = attention_mask(positions, key_positions, causal=self.causal, window=self.window, key_padding=key_valid)
        is_causal = self.causal and self.window is None and key_valid is None
        structure = (self.causal, self.window) if key_valid is None and cache is None else None
        out = self.attend(q, keys["k"].transpose(1, 2), keys["v"].transpose(1, 2), mask, is_causal,
                          {**query_state, **keys}, structure)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, -1))

    def position_queries_keys(
        self, q: Tensor, k: Tensor, query_positions: Tensor, key_positions: Tensor
    ) -> tuple[Tensor, Tensor]:
        """QK-norm (if enabled) then rotary (if enabled)."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, query_positions), self.rotary(k, key_positions)
        return q, k

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, causal={self.causal}, window={self.window}, "
            f"rotary={self.rotary is not None}"
        )


def zero_rows_without_keys(out: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the output of queries that may attend to no key (the convention of every headmix path)."""
    if mask is None:
        return out
    return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
