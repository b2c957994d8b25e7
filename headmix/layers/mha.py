"""Multi-head attention (Vaswani et al., 2017), the baseline, on fused kernels: SDPA's flash kernel for global
and causal attention, FlexAttention for sliding windows and padding on the GPU (:mod:`headmix.ops.flex`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.flex import masked_attention
from .base import Attention


class MultiHeadAttention(Attention):
    """Plain multi-head attention through :func:`torch.nn.functional.scaled_dot_product_attention`, or
    FlexAttention on CUDA when a sliding window or padding masks keys (:func:`headmix.ops.flex.masked_attention`).

    Parameters (``D`` = dim): ``4 * D * D`` weights, plus ``4 * D`` biases if ``bias=True``
    (query, key, value and output projections, each ``D x D``); with ``num_key_value_heads=H_kv`` the key and
    value projections are ``D x (H_kv * D / H)`` (grouped-query attention, SDPA's ``enable_gqa``).

    Example:
        >>> import torch
        >>> from headmix import MultiHeadAttention
        >>> layer = MultiHeadAttention(dim=64, num_heads=4)
        >>> layer(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])

    See :class:`headmix.layers.base.Attention` for the shared options (``causal``, ``window``,
    ``bias``, ``rotary``, ``qk_norm``).
    """

    def __init__(self, dim: int, num_heads: int, **options) -> None:
        super().__init__(dim, num_heads, **options)
        bias = self.v_proj.bias is not None
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.kv_dim, bias=bias)

    def queries_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (self.split_heads(self.q_proj(x), self.num_heads),
                self.split_heads(self.k_proj(x), self.num_key_value_heads))

    def reads_mask(self, structure: tuple[bool, int | None] | None, is_causal: bool) -> bool:
        return not is_causal  # (the causal case is SDPA's is_causal: no mask)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, state: dict,
               structure: tuple[bool, int | None] | None = None) -> Tensor:
        if is_causal and q.shape[-2] == k.shape[-2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                  enable_gqa=k.shape[1] != q.shape[1])
        return masked_attention(q, k, v, mask, scale=self.scale, structure=structure)
