"""Collaborative multi-head attention (Cordonnier, Loukas & Jaggi, 2020).

All heads share one query projection ``W_Q`` and one key projection ``W_K`` of size ``key_dim``
(``D~k``, independent of ``H * head_dim``); head ``h`` re-weights the shared query dimensions by
its mixing row ``m_h``::

    scores_h = (x W_Q diag(m_h)) (x W_K)^T / sqrt(head_dim)

Values and the output projection are as in multi-head attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_positive_int
from ..reference import masked_softmax
from .base import Attention, zero_rows_without_keys
from .mha import MultiHeadAttention


class CollaborativeAttention(Attention):
    """Collaborative attention: one shared query/key of size ``key_dim`` and a mixing matrix ``M`` ``(H, key_dim)``.

    The shared key is computed once per position and enters the fused attention kernel as a single
    key head broadcast over the ``H`` query heads (a stride-0 view, never copied per head), the
    multi-query shape. At ``key_dim = H * head_dim`` with ``M`` the block "one-hot" pattern (row
    ``h`` is 1 on head ``h``'s own columns), the layer is exactly multi-head attention; see
    :meth:`from_multi_head`.

    Parameters (``D`` dim, ``H`` heads, ``Dk`` key_dim): ``2*D*Dk + H*Dk + 2*D*D``
    (+ ``2*Dk + 2*D`` biases, + ``H*D`` with ``content_bias``).

    Args:
        dim, num_heads: as for :class:`MultiHeadAttention`.
        key_dim: ``D~k``, size of the shared query/key (default ``dim``, i.e. ``H * head_dim``).
        content_bias: add a per-head content term ``x_j . u_h / sqrt(head_dim)`` to the scores of key
            ``j`` (``u`` of shape ``(H, D)``): what a query bias of multi-head attention becomes after
            re-parametrization (see :func:`headmix.convert.collaborative.reparametrize`).
        **options: shared options (``causal``, ``window``, ``bias``, ``rotary``; not ``qk_norm``). With
            rotary, ``key_dim`` must be a multiple of ``head_dim``: the rotation acts within each
            block of ``head_dim`` channels of the shared key, as it would per head.

    The mixing matrix starts as the block pattern when ``key_dim`` is a multiple of ``num_heads``
    (each head owns ``key_dim / H`` shared dimensions, "concatenate" as a starting point), else as
    all ones.

    Example:
        >>> import torch
        >>> from headmix import CollaborativeAttention
        >>> layer = CollaborativeAttention(dim=64, num_heads=8, key_dim=32)
        >>> layer(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    supports_qk_norm = False

    def __init__(
        self, dim: int, num_heads: int, *, key_dim: int | None = None, content_bias: bool = False, **options
    ) -> None:
        super().__init__(dim, num_heads, **options)
        if self.num_key_value_heads != num_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} is not supported by "
                             "CollaborativeAttention: its one shared key already serves every head, and grouped "
                             f"values are not implemented (use num_key_value_heads={num_heads})")
        key_dim = dim if key_dim is None else key_dim
        check_positive_int("key_dim", key_dim)
        if self.q_norm is not None:
            raise ValueError("qk_norm=True is not supported by CollaborativeAttention: there are no per-head keys")
        if self.rotary is not None and key_dim % self.head_dim:
            raise ValueError(
                f"key_dim={key_dim} must be a multiple of head_dim={self.head_dim} when rotary=True "
                "(the rotation acts within each block of head_dim channels of the shared key)"
            )
        self.key_dim = key_dim
        bias = self.v_proj.bias is not None
        self.query = nn.Linear(dim, key_dim, bias=bias)  # W~_Q, shared by all heads
        self.key = nn.Linear(dim, key_dim, bias=bias)  # W~_K, shared by all heads
        self.mixing = nn.Parameter(block_mixing(num_heads, key_dim))  # M, (H, D~k)
        self.content_bias = nn.Parameter(torch.zeros(num_heads, dim)) if content_bias else None  # u, (H, D)

    def reset_parameters(self) -> None:
        """The block mixing pattern (see the class docstring) and a zero content bias."""
        with torch.no_grad():
            self.mixing.copy_(block_mixing(self.num_heads, self.key_dim))
            if self.content_bias is not None:
                self.content_bias.zero_()

    def flops_per_pair(self) -> int:
        """Per head a ``key_dim``-wide query-key product, and the value product ``2 * dim`` (not counted:
        the content bias, one addition per head)."""
        return 2 * self.num_heads * self.key_dim + 2 * self.dim

    def composition_state(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if self.content_bias is None:
            return {}, {}
        return {}, {"content": x @ self.content_bias.T * self.scale}  # (B, S, H): per key, per head

    def queries_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return mixed_queries(self.query(x)[:, None], self.mixing), self.key(x)[:, None]  # keys: (B, 1, T, D~k)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, state: dict,
               structure: tuple[bool, int | None] | None = None) -> Tensor:
        if "content" not in state and is_causal and q.shape[-2] == k.shape[-2]:
            k = k.expand(-1, q.shape[1], -1, -1)  # stride-0 view over heads, no copy
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        out = collaborative_core(q, k, v, state.get("content"), mask, self.scale)
        return zero_rows_without_keys(out.nan_to_num(0.0), mask)

    def attention_weights(self, q: Tensor, k: Tensor, mask: Tensor | None, state: dict) -> Tensor:
        """The softmax probabilities of the collaborative scores, content bias included."""
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (q~ * m_h) . k~ / sqrt(d)
        if "content" in state:
            scores = scores + state["content"].permute(0, 2, 1)[:, :, None, :].to(scores.dtype)
        return masked_softmax(scores, mask)

    @classmethod
    def from_multi_head(cls, mha: MultiHeadAttention) -> CollaborativeAttention:
        """The exact collaborative form of ``mha``: ``key_dim = H * head_dim``, block one-hot mixing."""
        rotary = {} if mha.rotary is None else dict(
            rotary=True, rotary_base=mha.rotary.base, rotary_fraction=mha.rotary.rot_dim / mha.head_dim)
        layer = cls(
            mha.dim, mha.num_heads, causal=mha.causal, window=mha.window, bias=mha.v_proj.bias is not None, **rotary,
        ).to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        layer.load_state_dict(
            {
                "query.weight": mha.q_proj.weight, "key.weight": mha.k_proj.weight,
                "v_proj.weight": mha.v_proj.weight, "out_proj.weight": mha.out_proj.weight,
                **({"query.bias": mha.q_proj.bias, "key.bias": mha.k_proj.bias, "v_proj.bias": mha.v_proj.bias,
                    "out_proj.bias": mha.out_proj.bias} if mha.v_proj.bias is not None else {}),
                "mixing": block_mixing(mha.num_heads, mha.dim),
            }
        )
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, key_dim={self.key_dim}"


def mixed_queries(shared_query: Tensor, mixing: Tensor) -> Tensor:
    """Head ``h``'s query ``x W~_Q diag(m_h)``: ``shared_query`` ``(B, 1, T, D~k)`` times ``mixing`` ``(H, D~k)``
    -> ``(B, H, T, D~k)`` (:func:`headmix.reference.collaborative_attention`'s ``q~ * m_h``)."""
    return shared_query * mixing[None, :, None, :]


def collaborative_core(q: Tensor, k: Tensor, v: Tensor, content: Tensor | None, mask: Tensor | None, scale: float,
                       dropout_p: float = 0.0) -> Tensor:
    """The collaborative scores and attention on SDPA: ``q`` ``(B, H, T, D~k)`` mixed queries
    (:func:`mixed_queries`), ``k`` ``(B, 1 or H, S, D~k)`` the shared key, ``v`` ``(B, H, S, Dv)``, ``content``
    ``(B, S, H)`` the already scaled content bias or ``None``; the fast twin of
    :func:`headmix.reference.collaborative_attention` (a query with no allowed key gets NaN: callers zero it)."""
    k = k.expand(-1, q.shape[1], -1, -1)  # stride-0 view over heads, no copy
    if content is not None:
        return content_biased_attention(q, k, v, content, mask, scale, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)


def content_biased_attention(
    q: Tensor, k: Tensor, v: Tensor, content: Tensor, mask: Tensor | None, scale: float, dropout_p: float = 0.0
) -> Tensor:
    """SDPA with a per-key, per-head additive score term (the collaborative content bias).

    Args:
        q, k, v: ``(B, H, T, Dk)``, ``(B, H, S, Dk)``, ``(B, H, S, Dv)``.
        content: ``(B, S, H)``, already scaled, added to every query's score of key ``j`` in head ``h``.
        mask: ``None``, a boolean "may attend" mask or an additive float mask, broadcastable to ``(B, H, T, S)``.

    A query with no allowed key gets NaN here; callers zero such rows.
    """
    bias = content.permute(0, 2, 1)[:, :, None, :].to(q.dtype)  # (B, H, 1, S)
    if mask is None:
        attn_mask = bias
    elif mask.dtype == torch.bool:
        attn_mask = bias.masked_fill(~mask, float("-inf"))
    else:
        attn_mask = mask + bias
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p)


def block_mixing(num_heads: int, key_dim: int) -> Tensor:
    """``(H, key_dim)`` mixing matrix: head ``h`` owns columns ``h*key_dim/H .. (h+1)*key_dim/H``
    (all ones if ``key_dim`` is not a multiple of ``H``)."""
    if key_dim % num_heads:
        return torch.ones(num_heads, key_dim)
    return torch.repeat_interleave(torch.eye(num_heads), key_dim // num_heads, dim=1)
