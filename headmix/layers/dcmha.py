"""Dynamically Composable Multi-Head Attention (Xiao et al., 2024, "DCFormer").

Heads are mixed by :func:`headmix.reference.compose` before the softmax (on the scores) and after
it (on the probabilities), with weights that depend on the input at each query and key position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_choice, check_divisible, check_positive_int
from ..masks import MaskSpec
from ..ops import resolve_backend
from ..reference import ComposeWeights
from .mha import MultiHeadAttention

COMPOSITIONS = ("pre", "post")
SIDES = ("query", "key")
INITS = ("identity", "paper")
PAPER_INIT_STD = 0.02
FACTOR_NORM_EPS = 1e-6


class DynamicWeightProjection(nn.Module):
    """Input-dependent composition weights: ``x`` ``(B, T, D)`` -> low-rank factors and gates per position.

    For each enabled low-rank *kind* ``c`` (a (composition, side) pair such as ``("pre", "query")``)::

        hidden_c = GELU(x W_hidden[:, :, c])                       (B, T, G, K)
        [w_1 | w_2] = hidden_c W_factors[:, c]                     (B, T, G, 2R, M)
        w_1 = w_1 / rms(w_1 over M)                                RMS-normalised, no scale

    and for each gate kind ``c``: ``gate_c = tanh(x W_gates[:, :, c])`` ``(B, T, G, M)``.

    Parameters: ``hidden`` ``(D, G, C, K)``, ``factors`` ``(G, C, K, 2R, M)``, ``gates`` ``(D, G, C_g, M)``,
    i.e. ``D*G*C*K + G*C*K*2R*M + D*G*C_g*M`` numbers (these are the official code's ``dw1``,
    ``qkw`` and ``dd`` when all four kinds are on).
    """

    def __init__(
        self,
        dim: int,
        groups: int,
        heads_per_group: int,
        rank: int,
        hidden_dim: int,
        factor_kinds: tuple[tuple[str, str], ...],
        gate_kinds: tuple[tuple[str, str], ...],
    ) -> None:
        super().__init__()
        self.rank = rank
        self.factor_kinds = factor_kinds
        self.gate_kinds = gate_kinds
        G, M, K = groups, heads_per_group, hidden_dim
        self.hidden = nn.Parameter(torch.empty(dim, G, len(factor_kinds), K)) if factor_kinds else None
        self.factors = nn.Parameter(torch.empty(G, len(factor_kinds), K, 2 * rank, M)) if factor_kinds else None
        self.gates = nn.Parameter(torch.empty(dim, G, len(gate_kinds), M)) if gate_kinds else None

    def reset_parameters(self, init: str) -> None:
        """``"identity"``: second factors and gates zero, so Compose starts as the identity but every
        parameter receives a gradient within two steps. ``"paper"``: small random values everywhere."""
        with torch.no_grad():
            if self.hidden is not None:
                dim, K = self.hidden.shape[0], self.hidden.shape[-1]
                if init == "paper":
                    self.hidden.normal_(0.0, PAPER_INIT_STD)
                    self.factors.normal_(0.0, PAPER_INIT_STD)
                else:
                    self.hidden.normal_(0.0, 1.0 / math.sqrt(dim))
                    self.factors[..., : self.rank, :].normal_(0.0, 1.0 / math.sqrt(K))  # w_1: random
                    self.factors[..., self.rank :, :].zero_()  # w_2: zero -> no change at init
            if self.gates is not None:
                if init == "paper":
                    self.gates.normal_(0.0, PAPER_INIT_STD)
                else:
                    self.gates.zero_()

    def forward(self, x: Tensor) -> tuple[dict[tuple[str, str], tuple[Tensor, Tensor]], dict[tuple[str, str], Tensor]]:
        """Factors ``{kind: (w_1, w_2)}``, each ``(B, T, G, R, M)``, and gates ``{kind: (B, T, G, M)}``."""
        factors: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        gates: dict[tuple[str, str], Tensor] = {}
        if self.hidden is not None:
            hidden = F.gelu(torch.einsum("btd,dgck->btgck", x, self.hidden))
            w = torch.einsum("btgck,gckrm->btgcrm", hidden, self.factors)
            w1, w2 = w[..., : self.rank, :], w[..., self.rank :, :]
            w1 = F.rms_norm(w1, (w1.shape[-1],), eps=FACTOR_NORM_EPS)
            for c, kind in enumerate(self.factor_kinds):
                factors[kind] = (w1[:, :, :, c], w2[:, :, :, c])
        if self.gates is not None:
            g = torch.tanh(torch.einsum("btd,dgcm->btgcm", x, self.gates))
            for c, kind in enumerate(self.gate_kinds):
                gates[kind] = g[:, :, :, c]
        return factors, gates


class DCMHA(MultiHeadAttention):
    """Dynamically Composable Multi-Head Attention, a drop-in replacement for :class:`MultiHeadAttention`.

    Compose (:func:`headmix.reference.compose`) mixes the ``H`` heads at every (query ``i``, key ``j``)
    position, within ``groups`` groups of ``M = H / groups`` heads::

        a' = a + a W_b + (a w_q1) w_q2 + (a w_k1) w_k2 + a * w_qg + a * w_kg

    once on the scaled scores before the softmax (``pre``) and once, with separate parameters, on
    the probabilities after it (``post``). ``W_b`` ``(G, M, M)`` is static; the query-wise factors
    and gate come from the input at position ``i``, the key-wise ones from position ``j``
    (:class:`DynamicWeightProjection`).

    Initialisation ``"identity"`` (default) zeroes ``W_b``, the gates and the projections that make
    the second factors ``w_2``, and keeps the first factors random: a fresh DCMHA computes exactly
    what :class:`MultiHeadAttention` computes with the same projection weights, and still learns
    (zeroing both factors would be a saddle where neither ever gets a gradient). ``"paper"`` draws
    every composition parameter from ``N(0, 0.02^2)``, our stand-in for the paper's small random
    initialisation.

    Parameters (``D`` dim, ``H`` heads, ``G`` groups, ``M = H/G``, ``R`` rank, ``K`` hidden_dim,
    ``P`` = number of enabled compositions (pre/post), ``S`` = number of enabled low-rank sides
    (query/key), ``C = P*S``, ``C_g = 2P`` if gates else 0)::

        4*D*D  +  D*G*C*K + G*C*K*2R*M  +  D*G*C_g*M  +  (P*G*M*M if static)   (+ 4*D biases)

    Args:
        dim, num_heads: as for :class:`MultiHeadAttention`.
        rank: ``R``, rank of the dynamic low-rank terms (paper: 2).
        groups: ``G``, composition acts within groups of ``H / G`` heads (paper: 1).
        hidden_dim: ``K``, width of the dynamic-weight projection's hidden layer (default ``4 * H / G``).
        pre, post: enable the pre-softmax / post-softmax Compose.
        static, query_wise, key_wise, gates: enable the static mix, the query-wise and key-wise
            low-rank terms, and the query/key gates.
        init: ``"identity"`` or ``"paper"`` (see above).
        backend: ``"auto"``, ``"reference"``, ``"chunked"`` (or a registered kernel), see :mod:`headmix.ops`.
        chunk_size: query block size of the chunked path.
        **options: shared options (``causal``, ``window``, ``bias``, ``rotary``, ``qk_norm``).

    Example:
        >>> import torch
        >>> from headmix import DCMHA
        >>> layer = DCMHA(dim=64, num_heads=8, rank=2)
        >>> layer(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        rank: int = 2,
        groups: int = 1,
        hidden_dim: int | None = None,
        pre: bool = True,
        post: bool = True,
        static: bool = True,
        query_wise: bool = True,
        key_wise: bool = True,
        gates: bool = True,
        init: str = "identity",
        backend: str = "auto",
        chunk_size: int = 128,
        **options,
    ) -> None:
        super().__init__(dim, num_heads, **options)
        check_positive_int("rank", rank)
        check_positive_int("groups", groups)
        check_divisible("num_heads", num_heads, "groups", groups)
        check_choice("init", init, INITS)
        resolve_backend(backend, 1, chunk_size)  # validate now
        M = num_heads // groups
        hidden_dim = 4 * M if hidden_dim is None else hidden_dim
        check_positive_int("hidden_dim", hidden_dim)
        self.rank, self.groups, self.hidden_dim = rank, groups, hidden_dim
        self.backend, self.chunk_size, self.init = backend, chunk_size, init
        self.compositions = tuple(c for c, on in zip(COMPOSITIONS, (pre, post)) if on)
        sides = tuple(s for s, on in zip(SIDES, (query_wise, key_wise)) if on)
        self.dynamic = DynamicWeightProjection(
            dim, groups, M, rank, hidden_dim,
            factor_kinds=tuple((c, s) for c in self.compositions for s in sides),
            gate_kinds=tuple((c, s) for c in self.compositions for s in SIDES) if gates else (),
        )
        self.static = nn.ParameterDict(
            {c: nn.Parameter(torch.zeros(groups, M, M)) for c in self.compositions} if static else {}
        )
        self.reset_composition(init)

    def reset_composition(self, init: str = "identity") -> None:
        """Re-initialise every composition parameter (projections untouched); see the class docstring."""
        check_choice("init", init, INITS)
        self.dynamic.reset_parameters(init)
        with torch.no_grad():
            for w in self.static.values():
                w.normal_(0.0, PAPER_INIT_STD) if init == "paper" else w.zero_()

    def composition_state(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Dynamic composition weights of every position of ``x`` ``(B, T, D)``, split into the query
        side (``"pre.query_w1"``, ..., ``"post.query_gate"``) and the key side (``"pre.key_w1"``, ...).
        A decoding cache keeps the key side, so a new token never recomputes old positions' weights."""
        factors, gates = self.dynamic(x)
        query_side: dict[str, Tensor] = {}
        key_side: dict[str, Tensor] = {}
        for (composition, side), (w1, w2) in factors.items():
            target = query_side if side == "query" else key_side
            target[f"{composition}.{side}_w1"], target[f"{composition}.{side}_w2"] = w1, w2
        for (composition, side), gate in gates.items():
            (query_side if side == "query" else key_side)[f"{composition}.{side}_gate"] = gate
        return query_side, key_side

    def compose_weights(self, state: dict[str, Tensor]) -> dict[str, ComposeWeights]:
        """``{"pre": ComposeWeights, "post": ComposeWeights}`` from the static weights and a state of
        :meth:`composition_state` (query side for the queries, key side for all keys)."""
        fields = ("query_w1", "query_w2", "key_w1", "key_w2", "query_gate", "key_gate")
        return {
            c: ComposeWeights(
                static=self.static[c] if c in self.static else None,
                **{f: state.get(f"{c}.{f}") for f in fields},
            )
            for c in self.compositions
        }

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, state: dict,
               structure: tuple[bool, int | None] | None = None) -> Tensor:
        weights = self.compose_weights(state)
        core = resolve_backend(self.backend, q.shape[-2], self.chunk_size, q, groups=self.groups)
        return core(
            q, k, v, scale=self.scale, mask=MaskSpec.of(mask, structure), groups=self.groups,
            chunk_size=self.chunk_size, pre=weights.get("pre"), post=weights.get("post"),
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rank={self.rank}, groups={self.groups}, hidden_dim={self.hidden_dim}, "
            f"compositions={self.compositions}, backend={self.backend!r}"
        )
