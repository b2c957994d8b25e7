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
from ..ops import _HAS_TRITON, _triton_module, resolve_backend, rms_norm
from ..reference import COMPOSE_FIELDS, ComposeWeights, composed_probabilities
from .composed import ComposedAttention

COMPOSITIONS = ("pre", "post")
SIDES = ("query", "key")
INITS = ("identity", "paper")
PAPER_INIT_STD = 0.02
FACTOR_NORM_EPS = 1e-6
HIDDEN_PER_HEAD = 4  # K = 4 M: the official code's width of the dynamic-weight projection's hidden layer
# Without autograd, calls of up to this many positions (batch x tokens) take their dynamic weights from the rows
# kernel (DynamicWeightProjection.kernel_fields), more from the PyTorch code. H200, 2026-12-01, DCFormer++-405M's eager
# 512-token forward, bf16: at batch 1 the host time per forward fell from 55.5-65.9 to 41.9-50.6 ms with this and the
# unsplit prefill forward (launch.SPLIT_MIN_KEYS_PER_QUERY) together, two interleaved rounds; at batch 16 (8,192
# positions) the kernel added ~6 ms of GPU time (38.6 -> 44.6 ms), more than it saved.
KERNEL_FIELDS_MAX_POSITIONS = 2048
SideWeights = dict[str, ComposeWeights]  # one side's weights per composition: {"pre": ..., "post": ...}


def side_fields(side: str) -> tuple[str, ...]:
    """The :class:`~headmix.reference.ComposeWeights` fields of one side, in field order:
    ``("query_w1", "query_w2", "query_gate")`` for ``"query"``, likewise for ``"key"``."""
    return _SIDE_FIELDS[side]


# worked out once: every eager forward asks for them (host time per layer in a host-bound prefill)
_SIDE_FIELDS = {side: tuple(name for name in COMPOSE_FIELDS if name.startswith(side + "_")) for side in SIDES}


def combine(*parts: ComposeWeights) -> ComposeWeights:
    """One :class:`~headmix.reference.ComposeWeights` from parts that each set some fields (the static
    weights, the query side, the key side); a field takes the first part's that is not ``None``."""
    found: dict[str, Tensor] = {}
    for part in reversed(parts):  # (plain loops: an eager prefill asks for this twice per layer)
        for name in COMPOSE_FIELDS:
            value = getattr(part, name)
            if value is not None:
                found[name] = value
    return ComposeWeights(**found)


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
        init: str = "identity",
    ) -> None:
        super().__init__()
        check_choice("init", init, INITS)
        self.init = init
        self.rank = rank
        self.factor_kinds = factor_kinds
        self.gate_kinds = gate_kinds
        G, M, K = groups, heads_per_group, hidden_dim
        self.hidden = nn.Parameter(torch.empty(dim, G, len(factor_kinds), K)) if factor_kinds else None
        self.factors = nn.Parameter(torch.empty(G, len(factor_kinds), K, 2 * rank, M)) if factor_kinds else None
        self.gates = nn.Parameter(torch.empty(dim, G, len(gate_kinds), M)) if gate_kinds else None
        kinds = tuple((c, s) for c in dict.fromkeys(c for c, _ in factor_kinds) for s in SIDES)
        # (worked out once: the shapes and kinds do not change, and every eager call without autograd asks)
        self._packs_rows = bool(factor_kinds) and G == 1 and factor_kinds == kinds and gate_kinds == kinds

    def reset_parameters(self, init: str | None = None) -> None:
        """``"identity"``: second factors and gates zero, so Compose starts as the identity but every
        parameter receives a gradient within two steps. ``"paper"``: small random values everywhere.
        ``init`` (default: the one given at construction) becomes the layer's initialisation."""
        if init is not None:
            check_choice("init", init, INITS)
            self.init = init
        init = self.init
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

    def forward(self, x: Tensor) -> dict[tuple[str, str], ComposeWeights]:
        """``{(composition, side): ComposeWeights}`` with that side's fields set (``query_w1``, ``query_w2``
        ``(B, T, G, R, M)``, ``query_gate`` ``(B, T, G, M)``; likewise ``key_*``) and every other field ``None``."""
        found: dict[tuple[str, str], dict[str, Tensor]] = {}
        B, T, _ = x.shape
        # Each field comes out contiguous (kind and factor outermost, one copy for all of them): the fused kernels
        # take contiguous fields and would otherwise copy each strided slice, one launch per field and call. Plain
        # matmul/bmm rather than einsum: the same products, a tenth of einsum's host time per call (~6 against
        # ~40 us on the CPU machine), which an eager prefill pays three times per layer
        hidden, gates = self._products(x)
        if hidden is not None:
            G, C, K, R2, M = self.factors.shape
            w = torch.bmm(F.gelu(hidden).view(B * T, G * C, K).transpose(0, 1), self.factors.reshape(G * C, K, R2 * M))
            # (G*C, B*T, [w_1 | w_2] * M) -> (2, C, B, T, G, R, M): the first factors of every kind lie together,
            # so their norm reads rows one after another
            w = w.view(G, C, B, T, 2, self.rank, M).permute(4, 1, 2, 3, 0, 5, 6).contiguous()
            # unbind, not indexing: the gradient of each field then lands in one stack, where an index's
            # gradient is a zero-filled copy of the whole tensor, added up field by field
            w1, w2 = w.unbind(0)
            w1 = rms_norm(w1, None, FACTOR_NORM_EPS).unbind(0)
            w2 = w2.unbind(0)
            for c, (composition, side) in enumerate(self.factor_kinds):
                first, second, _ = side_fields(side)
                found.setdefault((composition, side), {}).update({first: w1[c], second: w2[c]})
        if gates is not None:
            G, Cg, M = self.gates.shape[1:]
            g = torch.tanh(gates.view(B, T, G, Cg, M).permute(3, 0, 1, 2, 4).contiguous()).unbind(0)  # C_g (B, T, G, M)
            for c, (composition, side) in enumerate(self.gate_kinds):
                found.setdefault((composition, side), {})[side_fields(side)[-1]] = g[c]
        return {kind: ComposeWeights(**weights) for kind, weights in found.items()}

    def _products(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The two products with ``x`` ``(B, T, D)``: the hidden layer before its GELU ``(B*T, G*C*K)`` and the gates
        before their tanh ``(B*T, G*C_g*M)`` (``None`` for a part the projection does not have)."""
        B, T, _ = x.shape
        hidden = None if self.hidden is None else torch.matmul(x, self.hidden.flatten(1)).view(B * T, -1)
        gates = None if self.gates is None else torch.matmul(x, self.gates.flatten(1)).view(B * T, -1)
        return hidden, gates

    def kernel_fields(self, x: Tensor) -> dict[tuple[str, str], ComposeWeights]:
        """:meth:`forward`'s result with everything after the two products with ``x`` in one Triton kernel
        (:func:`headmix.ops.triton.rows.dynamic_fields`: equal to :meth:`forward` to rounding, every field contiguous),
        for :attr:`packs_rows` projections, without autograd: what an eager prefill on the kernels takes (one launch
        where :meth:`forward` makes about ten)."""
        B, T, _ = x.shape
        f = self.factors
        _, C, K, R2, M = f.shape
        hidden, gates = self._products(x)
        factors, g = _triton_module().rows.dynamic_fields(hidden, f.view(C, K, R2 * M), gates, C // 2, self.rank,
                                                          FACTOR_NORM_EPS)
        w1, w2 = factors.view(C, 2, B, T, 1, self.rank, M).unbind(1)
        w1, w2, g = w1.unbind(0), w2.unbind(0), g.view(C, B, T, 1, M).unbind(0)
        found = {}
        for c, (composition, side) in enumerate(self.factor_kinds):
            first, second, gate = _SIDE_FIELDS[side]
            found[composition, side] = ComposeWeights(**{first: w1[c], second: w2[c], gate: g[c]})
        return found

    @property
    def packs_rows(self) -> bool:
        """Whether :meth:`rows` applies: one head group, and the factors and gates of both sides of every
        composition (the full Compose of the paper's models)."""
        return self._packs_rows

    def rows(self, x: Tensor, kernel: bool = False) -> tuple[Tensor, Tensor]:
        """What :meth:`forward` computes, packed: ``(query_rows, key_rows)``, each ``(B, T, P, 2R + 1, M)`` (``P``
        compositions; rows ``w_1`` (RMS-normalised), ``w_2``, gate), for :attr:`packs_rows` projections only. The
        key rows of a position, flattened, are the static cache's packed row of the key side (the fields in
        :data:`~headmix.reference.COMPOSE_FIELDS` order, composition by composition: :func:`headmix.layers.cache.pack`).
        Without ``kernel``, :meth:`forward`'s fields stacked into that layout; with it, all after the two products
        with ``x`` (the GELU, the factor product, the normalisation, the gates' tanh) in one Triton kernel
        (:mod:`headmix.ops.triton.rows`, checked against :meth:`forward`; no autograd), which a compiled decoding step
        keeps one node."""
        B, T, _ = x.shape
        _, C, K, R2, M = self.factors.shape
        if kernel:
            hidden, gates = self._products(x)
            out = _triton_module().rows.dynamic_rows(hidden, self.factors.reshape(C, K, R2 * M), gates, C // 2,
                                                     self.rank, FACTOR_NORM_EPS).view(B, T, 2, C // 2, R2 + 1, M)
        else:  # forward's fields, packed
            found = self.forward(x)

            def packed(w: ComposeWeights, side: str) -> Tensor:  # (B, T, 2R + 1, M): the head group's axis dropped
                first, second, gate = (getattr(w, f)[:, :, 0] for f in side_fields(side))
                return torch.cat([first, second, gate[:, :, None]], dim=2)

            compositions = dict.fromkeys(c for c, _ in self.factor_kinds)
            out = torch.stack([torch.stack([packed(found[c, side], side) for c in compositions], dim=2)
                               for side in SIDES], dim=2)
        return out[:, :, 0], out[:, :, 1]


def row_weights(rows: Tensor, rank: int, side: str) -> list[ComposeWeights]:
    """One side's :class:`~headmix.reference.ComposeWeights` per composition, as views of packed ``rows`` ``(B, T, P,
    2R + 1, M)`` (:meth:`DynamicWeightProjection.rows`; one head group): fields ``(B, T, 1, R, M)`` and ``(B, T, 1,
    M)``."""
    first, second, gate = side_fields(side)
    return [ComposeWeights(**{first: rows[:, :, c, None, :rank], second: rows[:, :, c, None, rank:2 * rank],
                              gate: rows[:, :, c, None, 2 * rank]}) for c in range(rows.shape[2])]


class DCMHA(ComposedAttention):
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
        **options: ``backend``, ``chunk_size`` (:class:`~headmix.layers.composed.ComposedAttention`) and the
            shared options (``causal``, ``window``, ``bias``, ``rotary``, ``qk_norm``).

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
        **options,
    ) -> None:
        super().__init__(dim, num_heads, **options)
        check_positive_int("rank", rank)
        check_positive_int("groups", groups)
        check_divisible("num_heads", num_heads, "groups", groups)
        check_choice("init", init, INITS)
        M = num_heads // groups
        hidden_dim = HIDDEN_PER_HEAD * M if hidden_dim is None else hidden_dim
        check_positive_int("hidden_dim", hidden_dim)
        self.rank, self.groups, self.hidden_dim, self.init = rank, groups, hidden_dim, init
        self.compositions = tuple(c for c, on in zip(COMPOSITIONS, (pre, post)) if on)
        sides = tuple(s for s, on in zip(SIDES, (query_wise, key_wise)) if on)
        self.dynamic = DynamicWeightProjection(
            dim, groups, M, rank, hidden_dim,
            factor_kinds=tuple((c, s) for c in self.compositions for s in sides),
            gate_kinds=tuple((c, s) for c in self.compositions for s in SIDES) if gates else (),
            init=init,
        )
        self.static = nn.ParameterDict(
            {c: nn.Parameter(torch.zeros(groups, M, M)) for c in self.compositions} if static else {}
        )
        # whether the static mix is on, as a plain bool: torch 2.11's dynamo cannot trace bool(ParameterDict) (a
        # graph break in every layer of a compiled decoding step: DCFormer++-405M decoded 64 against 266 tokens/s on
        # an H200, 2026-12-01); 2.13's can
        self._static_on = bool(static)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every composition parameter (projections untouched) as ``init`` says (class docstring)."""
        self.dynamic.reset_parameters(self.init)
        with torch.no_grad():
            for w in self.static.values():
                w.normal_(0.0, PAPER_INIT_STD) if self.init == "paper" else w.zero_()

    def reset_composition(self, init: str = "identity") -> None:
        """Re-initialise every composition parameter with ``init``, which becomes the layer's initialisation."""
        check_choice("init", init, INITS)
        self.init = init
        self.reset_parameters()

    def flops_per_token(self) -> int:
        """Multi-head attention's projections, plus the dynamic-weight projection's matrices once per token."""
        dynamic = sum(p.numel() for p in self.dynamic.parameters())
        return super().flops_per_token() + 2 * dynamic

    def flops_per_pair(self) -> int:
        """Multi-head attention's products plus, per Compose: the static mix ``2 H M``, each low-rank side
        ``4 H R`` (project to ``R``, expand back) and each gate ``2 H``."""
        H, M, R = self.num_heads, self.num_heads // self.groups, self.rank
        sides = {side for _, side in self.dynamic.factor_kinds}
        gates = {side for _, side in self.dynamic.gate_kinds}
        per_compose = (2 * H * M if len(self.static) else 0) + len(sides) * 4 * H * R + len(gates) * 2 * H
        return super().flops_per_pair() + len(self.compositions) * per_compose

    def composition_state(self, x: Tensor) -> tuple[dict[str, SideWeights], dict[str, SideWeights]]:
        """Dynamic composition weights of every position of ``x`` ``(B, T, D)``: the query side
        ``{"query_weights": {"pre": ComposeWeights, "post": ...}}`` with only the ``query_*`` fields set, and
        the key side ``{"key_weights": {...}}`` with only the ``key_*`` fields. A decoding cache keeps the key
        side, so a new token never recomputes old positions' weights."""
        # the rows kernel for a short eager call on plain tensors (traced, the PyTorch code: the kernel launch is no
        # custom op; many positions, the PyTorch code too: the kernel, one program per position and kind, costs more
        # GPU time than it saves host time there)
        kernel = (type(x) is Tensor and not torch.compiler.is_compiling()
                  and x.shape[0] * x.shape[1] <= KERNEL_FIELDS_MAX_POSITIONS and self._kernel_rows(x))
        found = self.dynamic.kernel_fields(x) if kernel else self.dynamic(x)
        query = {c: found.get((c, "query"), ComposeWeights()) for c in self.compositions}
        key = {c: found.get((c, "key"), ComposeWeights()) for c in self.compositions}
        return {"query_weights": query}, {"key_weights": key}

    def decoding_state(self, x: Tensor) -> tuple[dict[str, SideWeights], dict[str, Tensor]]:
        """:meth:`composition_state` for a cache that packs rows (:meth:`Attention.decoding_state`): the query side as
        views of :meth:`DynamicWeightProjection.rows`' query rows, the key side as its key rows flattened, the cache's
        packed row (one write per step); layers whose projection does not pack give :meth:`composition_state`."""
        if not self.dynamic.packs_rows:
            return self.composition_state(x)
        query_rows, key_rows = self.dynamic.rows(x, self._kernel_rows(x))
        query = dict(zip(self.compositions, row_weights(query_rows, self.rank, "query")))
        return {"query_weights": query}, {"key_weights": key_rows.flatten(2)}

    def _kernel_rows(self, x: Tensor) -> bool:
        """Whether the dynamic weights of ``x`` come from the rows kernel (:mod:`headmix.ops.triton.rows`): without
        autograd (generation, evaluation), for a projection that packs rows, where the attention runs on the kernels:
        CUDA ("auto" or "triton"), or the interpreter ("triton")."""
        return (_HAS_TRITON and not torch.is_grad_enabled() and self.dynamic.packs_rows
                and (self.backend == "triton" or (self.backend == "auto" and x.is_cuda)))

    def compose_weights(self, state: dict[str, SideWeights | Tensor]) -> dict[str, ComposeWeights]:
        """``{"pre": ComposeWeights, "post": ComposeWeights}`` from the static weights and a state of
        :meth:`composition_state` (query side for the queries, key side for all keys), or of :meth:`decoding_state`
        (the key side packed rows ``(B, S, width)``)."""
        keys = state["key_weights"]
        if isinstance(keys, Tensor):
            B, S, _ = keys.shape
            M = self.num_heads // self.groups
            rows = keys.view(B, S, len(self.compositions), 2 * self.rank + 1, M)
            state = {**state, "key_weights": dict(zip(self.compositions, row_weights(rows, self.rank, "key")))}
        return {
            # (the plain bool first: a compiled step then reads nothing of an empty ParameterDict, each read a guard)
            c: combine(ComposeWeights(static=self.static[c] if self._static_on and c in self.static else None),
                       state["query_weights"][c], state["key_weights"][c])
            for c in self.compositions
        }

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, state: dict,
               structure: tuple[bool, int | None] | None = None, backend: str | None = None) -> Tensor:
        weights = self.compose_weights(state)
        core = resolve_backend(backend or self.backend, q.shape[-2], self.chunk_size, q, groups=self.groups,
                               kv_heads=k.shape[1], static=self._static_on)
        return core(
            q, k, v, scale=self.scale, mask=MaskSpec.of(mask, structure), groups=self.groups,
            chunk_size=self.chunk_size, pre=weights.get("pre"), post=weights.get("post"),
        )

    def attention_weights(self, q: Tensor, k: Tensor, mask: Tensor | None, state: dict) -> Tensor:
        """The composed probabilities: ``Compose(softmax(Compose(scores, pre)), post)``, what multiplies the
        values (:func:`headmix.reference.composed_probabilities`)."""
        weights = self.compose_weights(state)
        return composed_probabilities(q, k, scale=self.scale, mask=mask, groups=self.groups,
                                      pre=weights.get("pre"), post=weights.get("post"))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rank={self.rank}, groups={self.groups}, hidden_dim={self.hidden_dim}, "
            f"compositions={self.compositions}, backend={self.backend!r}"
        )
