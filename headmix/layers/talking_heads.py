"""Talking-heads attention (Shazeer et al., 2020): static learned head mixes around the softmax."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..masks import MaskSpec
from ..ops import resolve_backend
from ..reference import ComposeWeights, composed_probabilities
from .composed import ComposedAttention


class TalkingHeadsAttention(ComposedAttention):
    """Multi-head attention whose logits and weights are mixed across heads by learned ``H x H`` matrices.

    The logits are multiplied by ``P_l = I + W_pre`` before the softmax and the weights by
    ``P_w = I + W_post`` after it (Shazeer et al., 2020, with ``h_k = h = h_v = H``). The residual
    form spans every ``H x H`` matrix, like the paper's, and with ``W = 0`` at initialisation a
    fresh layer computes exactly :class:`MultiHeadAttention`. This is DCMHA's Compose with only its
    static term, and it runs on the same reference/chunked paths.

    Parameters (``D`` = dim, ``H`` = heads): ``4 * D * D + 2 * H * H`` (+ ``4 * D`` biases).

    Args:
        dim, num_heads: as for :class:`MultiHeadAttention`.
        **options: ``backend``, ``chunk_size`` (:class:`~headmix.layers.composed.ComposedAttention`) and the
            shared options (``causal``, ``window``, ``bias``, ``rotary``, ``qk_norm``).

    Example:
        >>> import torch
        >>> from headmix import TalkingHeadsAttention
        >>> TalkingHeadsAttention(dim=64, num_heads=8)(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(self, dim: int, num_heads: int, **options) -> None:
        super().__init__(dim, num_heads, **options)
        self.pre_mix = nn.Parameter(torch.zeros(1, num_heads, num_heads))  # W_pre, (groups=1, H, H)
        self.post_mix = nn.Parameter(torch.zeros(1, num_heads, num_heads))  # W_post

    def reset_parameters(self) -> None:
        """Both mixes zero: a fresh layer is multi-head attention."""
        with torch.no_grad():
            self.pre_mix.zero_()
            self.post_mix.zero_()

    def flops_per_pair(self) -> int:
        """Multi-head attention's, plus the two ``H x H`` mixes (one multiply-add per head pair each)."""
        return super().flops_per_pair() + 2 * 2 * self.num_heads**2

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, state: dict,
               structure: tuple[bool, int | None] | None = None, backend: str | None = None) -> Tensor:
        core = resolve_backend(backend or self.backend, q.shape[-2], self.chunk_size, q, kv_heads=k.shape[1])
        return core(
            q, k, v, scale=self.scale, mask=MaskSpec.of(mask, structure), chunk_size=self.chunk_size,
            pre=ComposeWeights(static=self.pre_mix), post=ComposeWeights(static=self.post_mix),
        )

    def attention_weights(self, q: Tensor, k: Tensor, mask: Tensor | None, state: dict) -> Tensor:
        """The mixed weights ``softmax(scores P_l) P_w`` (:func:`headmix.reference.composed_probabilities`)."""
        return composed_probabilities(q, k, scale=self.scale, mask=mask, pre=ComposeWeights(static=self.pre_mix),
                                      post=ComposeWeights(static=self.post_mix))
