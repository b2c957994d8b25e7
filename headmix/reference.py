"""The executable specification: Compose and composed attention, materialised and plain.

Everything else in headmix (the chunked path, later kernels, the layers) is checked against the two
functions here. They materialise the full ``(batch, heads, query_len, key_len)`` tensors and read
like the equations of the DCFormer paper (Xiao et al., 2024, eq. 1-5); they are written for
clarity, not speed.

Notation (paper -> code):
    A           attention scores (before softmax) or probabilities (after), ``(B, H, T, S)``
    H, G, M     heads, head groups, heads per group (``H = G * M``); composition mixes heads
                only within a group
    R           rank of the dynamic low-rank terms
    W_b         static head mix, ``static`` ``(G, M, M)``
    w_q1, w_q2  query-wise low-rank factors at query position i, ``query_w1/query_w2`` ``(B, T, G, R, M)``
    w_k1, w_k2  key-wise low-rank factors at key position j, ``key_w1/key_w2`` ``(B, S, G, R, M)``
    w_qg, w_kg  query-wise / key-wise gates, ``query_gate`` ``(B, T, G, M)``, ``key_gate`` ``(B, S, G, M)``

For each query i and key j, with ``a = A[:, i, j]`` the row vector of one group's M head values:

    a' = a + a W_b + (a w_q1) w_q2 + (a w_k1) w_k2 + a * w_qg + a * w_kg

Talking-heads attention (Shazeer et al., 2020) is the special case with only ``W_b``.

Collaborative attention (Cordonnier, Loukas & Jaggi, 2020), :func:`collaborative_attention`:
    W~_Q, W~_K  shared query / key projections of size ``D~k``: ``q~ = x W~_Q`` ``(B, T, D~k)``,
                ``k~ = x W~_K`` ``(B, S, D~k)``
    m_h         mixing row of head h, ``mixing`` ``(H, D~k)``
    u_h         content bias of head h; ``content[b, j, h] = x_j . u_h`` times the scale, ``(B, S, H)``

    A_h[i, j] = (q~_i * m_h) . k~_j / sqrt(d) + x_j . u_h / sqrt(d)
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from .masks import MaskSpec, as_mask_spec


@dataclass
class ComposeWeights:
    """The weights of one Compose (pre-softmax or post-softmax). Absent terms are ``None``.

    Shapes (``B`` batch, ``T`` query length, ``S`` key length, ``G`` groups, ``R`` rank, ``M`` heads per group):

    ``static`` ``(G, M, M)``; ``query_w1``, ``query_w2`` ``(B, T, G, R, M)``; ``key_w1``, ``key_w2``
    ``(B, S, G, R, M)``; ``query_gate`` ``(B, T, G, M)``; ``key_gate`` ``(B, S, G, M)``.
    """

    static: Tensor | None = None
    query_w1: Tensor | None = None
    query_w2: Tensor | None = None
    key_w1: Tensor | None = None
    key_w2: Tensor | None = None
    query_gate: Tensor | None = None
    key_gate: Tensor | None = None

    def query_slice(self, start: int, end: int) -> ComposeWeights:
        """The same weights restricted to query positions ``start:end``."""
        query_side = (f.name for f in fields(self) if f.name.startswith("query_") and getattr(self, f.name) is not None)
        return replace(self, **{name: getattr(self, name)[:, start:end] for name in query_side})

    def key_slice(self, start: int, end: int) -> ComposeWeights:
        """The same weights restricted to key positions ``start:end``."""
        return replace(
            self,
            key_w1=None if self.key_w1 is None else self.key_w1[:, start:end],
            key_w2=None if self.key_w2 is None else self.key_w2[:, start:end],
            key_gate=None if self.key_gate is None else self.key_gate[:, start:end],
        )

    def is_identity(self) -> bool:
        """Whether every term is absent (``None``): then Compose leaves its input unchanged."""
        return all(getattr(self, name) is None for name in COMPOSE_FIELDS)


#: The field names of :class:`ComposeWeights`, in order (computed once: ``torch.compile`` does not trace
#: ``dataclasses.fields``).
COMPOSE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ComposeWeights))


def compose(a: Tensor, weights: ComposeWeights, groups: int = 1) -> Tensor:
    """Mix ``a`` ``(B, H, T, S)`` across heads, independently at every (query, key) position.

    Returns a tensor of the same shape: ``a' = a + a W_b + (a w_q1) w_q2 + (a w_k1) w_k2 + a*w_qg + a*w_kg``.
    """
    B, H, T, S = a.shape
    M = H // groups
    a = a.reshape(B, groups, M, T, S)  # a[b, g, m, i, j]
    out = a
    w = weights
    if w.static is not None:  # a W_b
        out = out + torch.einsum("bgmts,gmn->bgnts", a, w.static)
    if w.query_w1 is not None:  # (a w_q1) w_q2, factors taken at query position i (t)
        hidden = torch.einsum("bgmts,btgrm->bgrts", a, w.query_w1)
        out = out + torch.einsum("bgrts,btgrn->bgnts", hidden, w.query_w2)
    if w.key_w1 is not None:  # (a w_k1) w_k2, factors taken at key position j (s)
        hidden = torch.einsum("bgmts,bsgrm->bgrts", a, w.key_w1)
        out = out + torch.einsum("bgrts,bsgrn->bgnts", hidden, w.key_w2)
    if w.query_gate is not None:  # a * w_qg
        out = out + a * w.query_gate.permute(0, 2, 3, 1)[..., None]  # (B, G, M, T, 1)
    if w.key_gate is not None:  # a * w_kg
        out = out + a * w.key_gate.permute(0, 2, 3, 1)[..., None, :]  # (B, G, M, 1, S)
    return out.reshape(B, H, T, S)


def expand_kv_heads(t: Tensor, heads: int) -> Tensor:
    """Keys or values ``(B, H_kv, S, D)`` repeated to ``heads`` query heads (grouped-query attention: key/value head
    ``j`` serves query heads ``j * heads/H_kv`` to ``(j+1) * heads/H_kv - 1``); one or ``heads`` heads pass as they are."""
    return t if t.shape[1] in (1, heads) else t.repeat_interleave(heads // t.shape[1], dim=1)


def masked_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the keys of ``scores`` ``(B, H, T, S)`` where the bool ``mask`` allows (``None``: everywhere),
    in at least float32, returned in the scores' dtype; disallowed keys (and rows without any allowed key) get 0."""
    if mask is not None:
        # a finite fill keeps fully masked rows NaN-free; those rows are zeroed below
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)
    return probs if mask is None else probs.masked_fill(~mask, 0.0)


def composed_probabilities(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    mask: MaskSpec | Tensor | None = None,
    pre: ComposeWeights | None = None,
    post: ComposeWeights | None = None,
    groups: int = 1,
) -> Tensor:
    """The attention weights of :func:`composed_attention`, ``(B, H, T, S)``: the post-composed probabilities
    ``Compose(softmax(Compose(Q K^T * scale, pre)), post)`` (rows of masked-out keys are 0; a composed row need
    not sum to 1). Arguments as for :func:`composed_attention`; ``composed_attention = weights @ V``."""
    T, S = q.shape[2], k.shape[2]
    k = expand_kv_heads(k, q.shape[1])
    mask = as_mask_spec(mask).dense(T, S, q.device)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # A = Q K^T / sqrt(d)
    if pre is not None:
        scores = compose(scores, pre, groups)  # pre-softmax Compose, on the scaled logits
    probs = masked_softmax(scores, mask)  # the post-Compose runs in the input dtype again
    if post is not None:
        probs = compose(probs, post, groups)  # post-softmax Compose, on the probabilities
    return probs


def composed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    mask: MaskSpec | Tensor | None = None,
    pre: ComposeWeights | None = None,
    post: ComposeWeights | None = None,
    groups: int = 1,
) -> Tensor:
    """Attention with Compose before and after the softmax (DCFormer eq. 1-2), fully materialised.

    Args:
        q: ``(B, H, T, Dk)`` queries.
        k: ``(B, H_kv, S, Dk)`` keys; ``H_kv`` divides ``H`` (grouped-query attention: key/value head ``j``
            serves query heads ``j * H/H_kv`` to ``(j+1) * H/H_kv - 1``; ``H_kv = 1``: one shared head).
        v: ``(B, H_kv, S, Dv)`` values, with the heads of ``k`` (or ``H``).
        scale: logit scale, usually ``1/sqrt(Dk)``.
        mask: which keys each query may see: a :class:`headmix.masks.MaskSpec`, or a bool tensor
            broadcastable to ``(B, H, T, S)``, ``True`` where a query may attend.
        pre, post: Compose weights applied to the scores / probabilities (``None``: identity).
        groups: number of head groups the compositions act within.

    Returns:
        ``(B, H, T, Dv)``. A query with no allowed key returns zeros.
    """
    probs = composed_probabilities(q, k, scale=scale, mask=mask, pre=pre, post=post, groups=groups)
    return torch.matmul(probs, expand_kv_heads(v, q.shape[1]))


def collaborative_attention(
    shared_query: Tensor,
    shared_key: Tensor,
    v: Tensor,
    mixing: Tensor,
    *,
    scale: float,
    content: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Collaborative attention (Cordonnier et al., 2020, eq. 4), fully materialised.

    Args:
        shared_query: ``(B, T, D~k)`` the shared query ``x W~_Q``.
        shared_key: ``(B, S, D~k)`` the shared key ``x W~_K``.
        v: ``(B, H, S, Dv)`` values.
        mixing: ``(H, D~k)``, row ``h`` re-weights the shared dimensions for head ``h``.
        scale: logit scale, usually ``1/sqrt(head_dim)``.
        content: ``(B, S, H)`` the already scaled content bias of each key and head, or ``None``.
        mask: bool, broadcastable to ``(B, H, T, S)``, ``True`` where a query may attend.

    Returns:
        ``(B, H, T, Dv)``. A query with no allowed key returns zeros.
    """
    scores = torch.einsum("btd,hd,bsd->bhts", shared_query, mixing, shared_key) * scale  # (q~ * m_h) . k~
    if content is not None:
        scores = scores + content.permute(0, 2, 1)[:, :, None, :]  # + x_j . u_h, the same for every query
    return torch.matmul(masked_softmax(scores, mask), v)
