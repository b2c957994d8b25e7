"""What every headmix attention layer shares: the call convention, masks, rotary, value/output projections.

A layer is called as ``layer(x)`` with ``x`` of shape ``(batch, seq, dim)`` and returns the same
shape. Subclasses say how queries and keys are made (:meth:`Attention.queries_keys`), what
per-position state their core needs (:meth:`Attention.composition_state`) and how the attention
core combines them (:meth:`Attention.attend`); masks, rotary, caching and projections live here once.

A layer class is the only home of its options: their defaults are the keyword defaults of its
``__init__`` (:meth:`Attention.option_defaults` reads them), and it answers for its own
initialisation (:meth:`Attention.reset_parameters`), size (:meth:`Attention.num_parameters`) and cost
(:meth:`Attention.flops_per_token`, :meth:`Attention.flops_per_pair`). Models build layers by kind
from :data:`headmix.layers.ATTENTION_LAYERS` and ask them; they restate none of it.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .._validation import check_divisible, check_input, check_padding_mask, check_positive_int
from ..masks import attention_mask
from ..ops import rms_norm
from ..reference import composed_probabilities, expand_kv_heads
from .rotary import DEFAULT_BASE, RotaryEmbedding

if TYPE_CHECKING:
    from .cache import LayerCache

QK_NORM_EPS = 1e-6
#: ``attn_implementation`` names (transformers' attention-interface names) that pick a backend of
#: :mod:`headmix.ops` for the layers that have one (:class:`~headmix.layers.composed.ComposedAttention`): the
#: fused Triton kernels. ``"eager"`` is the materialised reference path of every layer, ``"sdpa"`` (or ``None``)
#: each layer's own fast path (its ``backend`` option for the composed layers).
IMPLEMENTATION_BACKENDS = {"headmix_triton": "triton"}


class HeadNorm(nn.RMSNorm):
    """QK-norm: :class:`torch.nn.RMSNorm` over each head's channels of ``(batch, heads, seq, head_dim)``, computed by
    :func:`headmix.ops.rms_norm` (a Triton kernel for eager CUDA tensors) with the rows taken in memory order:
    queries and keys come from their projections as ``(batch, seq, heads, head_dim)``, seen transposed."""

    def forward(self, x: Tensor) -> Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps  # (nn.RMSNorm's default)
        return rms_norm(x.transpose(1, 2), self.weight, eps).transpose(1, 2)


class Attention(nn.Module):
    """Base class of the four attention layers (not used directly).

    Args:
        dim: model width ``D`` (input and output feature size).
        num_heads: number of heads ``H``.
        num_key_value_heads: ``H_kv``, the key/value heads (grouped-query attention, Ainslie et al., 2023):
            key/value head ``j`` serves query heads ``j * H/H_kv .. (j+1) * H/H_kv - 1``; the key and value
            projections and the decoding cache hold only these. ``None``: ``H`` (multi-head attention).
        causal: a query sees only keys at or before its position (decoders). ``False`` for encoders.
        window: if set, a sliding window: a query sees only the ``window`` most recent positions
            (itself included).
        bias: biases on the projections.
        out_bias: bias on the output projection (``None``: as ``bias``); ``bias=True, out_bias=False`` is Qwen2's
            attention (biased query, key and value projections only).
        rotary: apply rotary position embedding to queries and keys.
        rotary_base: rotary frequency base.
        rotary_fraction: share of each head's channels that rotate (partial rotary, Pythia: 0.25).
        qk_norm: RMS-normalise each head's query and key (with a learned scale) before the product.
    """

    #: The options a model sets from its own fields for every layer (mask, biases, positions); every other
    #: keyword option of a layer class is an attention option (``DCFormerConfig.attention_options``).
    MODEL_OPTIONS: ClassVar[tuple[str, ...]] = (
        "num_key_value_heads", "causal", "window", "bias", "out_bias", "rotary", "rotary_base", "rotary_fraction", "qk_norm",
    )
    #: Whether the layer has per-head keys to normalise (collaborative attention has one shared key).
    supports_qk_norm: ClassVar[bool] = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_key_value_heads: int | None = None,
        causal: bool = True,
        window: int | None = None,
        bias: bool = False,
        out_bias: bool | None = None,
        rotary: bool = False,
        rotary_base: float = DEFAULT_BASE,
        rotary_fraction: float = 1.0,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        check_divisible("dim", dim, "num_heads", num_heads)
        if window is not None:
            check_positive_int("window", window)
        kv_heads = num_heads if num_key_value_heads is None else num_key_value_heads
        check_positive_int("num_key_value_heads", kv_heads)
        check_divisible("num_heads", num_heads, "num_key_value_heads", kv_heads)
        self.dim = dim
        self.num_heads = num_heads
        self.num_key_value_heads = kv_heads
        self.head_dim = dim // num_heads
        self.kv_dim = kv_heads * self.head_dim  # width of the key and value projections
        self.causal = causal
        self.window = window
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.v_proj = nn.Linear(dim, self.kv_dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias if out_bias is None else out_bias)
        self.rotary = RotaryEmbedding(self.head_dim, rotary_base, rotary_fraction) if rotary else None
        self.q_norm = HeadNorm(self.head_dim, eps=QK_NORM_EPS) if qk_norm else None
        self.k_norm = HeadNorm(self.head_dim, eps=QK_NORM_EPS) if qk_norm else None

    # -- what a layer says about itself ----------------------------------------------------------
    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Every keyword option of this layer class with its default, read from the keyword-only
        parameters of the ``__init__`` of each class in its hierarchy (the one home of the defaults)."""
        defaults: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or not issubclass(klass, Attention):
                continue
            for parameter in inspect.signature(init).parameters.values():
                if parameter.kind is parameter.KEYWORD_ONLY:
                    defaults[parameter.name] = parameter.default
        return defaults

    @classmethod
    def attention_option_names(cls) -> tuple[str, ...]:
        """The options of this layer that are not set from the model's own fields (:attr:`MODEL_OPTIONS`)."""
        return tuple(name for name in cls.option_defaults() if name not in cls.MODEL_OPTIONS)

    def reset_parameters(self) -> None:
        """Re-initialise the parameters this layer defines itself (its composition weights); the
        projections and norms are ``nn.Linear``/``nn.RMSNorm`` children that initialise themselves."""

    def num_parameters(self) -> int:
        """Number of parameters of this layer."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """FLOPs per token outside the (query, key) pairs: every projection matrix once, 2 per multiply-add."""
        return 2 * sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_pair(self) -> int:
        """FLOPs per (query, key) pair: the products ``QK^T`` and ``PV`` of every head (2 per multiply-add);
        not counted: softmax, masks, rotary."""
        return 4 * self.num_heads * self.head_dim

    # -- what subclasses provide -------------------------------------------------------------
    def queries_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Queries ``(B, H, T, Dk)`` and keys ``(B, H_kv or 1, T, Dk)`` from ``x`` ``(B, T, D)``, before rotary."""
        raise NotImplementedError

    def composition_state(self, x: Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
        """Per-position state the attention core needs besides q, k, v: ``(query_side, key_side)``,
        dicts whose values are ``(B, T, ...)`` tensors or typed groups of them (a dict of
        :class:`~headmix.reference.ComposeWeights`, say); the two sides use different names. The key side
        is what a decoding cache keeps per position (:mod:`headmix.layers.cache`)."""
        return {}, {}

    def decoding_state(self, x: Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
        """:meth:`composition_state` of one new position per sequence, for a cache that keeps each structured key-side
        entry as one packed row per slot (:attr:`headmix.layers.cache.StaticLayerCache.packs_rows`). A layer may hand
        such an entry in as that row already packed, a ``(B, T, width)`` tensor in the cache's layout
        (:func:`headmix.layers.cache.pack`), so that a compiled decoding step writes it with one kernel instead of
        one per field; its :meth:`attend` then reads a tensor there. Default: :meth:`composition_state`."""
        return self.composition_state(x)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, state: dict[str, Tensor],
        structure: tuple[bool, int | None] | None = None,
    ) -> Tensor:
        """The attention core: ``(B, H, T, Dv)`` from projected heads ``q`` ``(B, H, T, Dk)``,
        ``k`` ``(B, H_kv or 1, S, Dk)``, ``v`` ``(B, H_kv, S, Dv)`` (``H_kv = H`` without grouped-query attention).

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

    def reads_mask(self, structure: tuple[bool, int | None] | None, is_causal: bool) -> bool:
        """Whether :meth:`attend` reads its ``mask`` given this ``structure`` and ``is_causal`` (default: always).
        A layer that says no is handed ``mask=None`` there: the ``(T x S)`` mask and the kernels that build it are
        skipped (an eager prefill or training step pays them in every layer)."""
        return True

    def attention_weights(self, q: Tensor, k: Tensor, mask: Tensor | None, state: dict[str, Any]) -> Tensor:
        """The attention weights ``(B, H, T, S)`` that multiply the values, materialised (the reference path,
        ``attn_implementation="eager"`` and ``output_attentions=True``); arguments as for :meth:`attend`.
        Multi-head attention: the softmax probabilities; layers that mix heads after the softmax override this
        with their mixed weights."""
        return composed_probabilities(q, k, scale=self.scale, mask=mask)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: LayerCache | None = None,
        *,
        allowed: Tensor | None = None,
        implementation: str | None = None,
        return_weights: bool = False,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Self-attention over ``x``.

        Args:
            x: ``(batch, seq, dim)``.
            padding_mask: optional ``(batch, seq)``, ``True``/1 for real tokens, ``False``/0 for padding
                (keys at padded positions are ignored; a query with no visible key outputs zeros).
            positions: optional ``(seq,)`` or ``(batch, seq)`` token positions for rotary and the
                causal/window masks (default ``0..seq-1``).
            cache: optional :class:`headmix.layers.cache.LayerCache`: ``x`` holds new tokens, which
                attend to the cached ones too and are added to the cache.
            allowed: optional bool "may attend" mask ``(batch or 1, 1, seq, keys)`` over the cached and new keys,
                ANDed with the layer's own (causal, window, padding) mask of ``positions``: a custom 4-D mask, or
                the block-diagonal mask of packed sequences.
            implementation: ``"eager"`` runs the materialised reference path (:meth:`attention_weights`, then
                the values); ``None`` or ``"sdpa"`` the layer's own fast path; a name of
                :data:`IMPLEMENTATION_BACKENDS` (``"headmix_triton"``) that backend in layers that have one.
            return_weights: also return the attention weights ``(batch, heads, seq, keys)`` (computed on the
                reference path).
            position_embeddings: optional rotary tables ``(cos, sin)`` of ``positions``, from this layer's
                ``rotary.cos_sin(positions, dtype)`` (``dtype``: float32, float64 for float64 inputs); a model computes
                them once per forward for all its layers (transformers' convention). Default: computed here, once for
                the queries and keys.

        Returns:
            ``(batch, seq, dim)``, and the weights when ``return_weights``.
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
        v = self.split_heads(self.v_proj(x), self.num_key_value_heads)
        q, k = self.position_queries_keys(q, k, positions, positions, position_embeddings)
        decoding = cache is not None and T == 1 and getattr(cache, "packs_rows", False)
        query_state, key_state = self.decoding_state(x) if decoding else self.composition_state(x)
        keys = {"k": k.transpose(1, 2), "v": v.transpose(1, 2), **key_state}  # every entry (B, T, ...)
        key_positions, key_valid = positions, padding_mask
        # An empty cache without padding (training with use_cache, a prefill): the keys are exactly the new
        # positions, so the causal/window structure holds and the backends keep their fast paths (no mask tensor)
        fresh = cache is None or (padding_mask is None and len(cache) == 0)
        if cache is not None:
            valid = padding_mask if padding_mask is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
            keys, key_positions, key_valid = cache.update(keys, positions.expand(B, T), valid)
            if fresh:
                key_positions, key_valid = positions, None
        is_causal = self.causal and self.window is None and key_valid is None and allowed is None
        structure = (self.causal, self.window) if key_valid is None and fresh and allowed is None else None
        materialised = return_weights or implementation == "eager"
        mask = (attention_mask(positions, key_positions, causal=self.causal, window=self.window, key_padding=key_valid)
                if materialised or self.reads_mask(structure, is_causal) else None)
        if allowed is not None:
            mask = allowed.bool() if mask is None else mask & allowed.bool()
        k, v, state = keys["k"].transpose(1, 2), keys["v"].transpose(1, 2), {**query_state, **keys}
        if materialised:
            weights = self.attention_weights(q, k, mask, state)
            out = torch.matmul(weights, expand_kv_heads(v, q.shape[1]))
        else:
            weights = None
            backend = IMPLEMENTATION_BACKENDS.get(implementation) if hasattr(self, "backend") else None
            out = self.attend(q, k, v, mask, is_causal, state, structure, **({"backend": backend} if backend else {}))
        out = self.out_proj(out.transpose(1, 2).reshape(B, T, -1))
        return (out, weights) if return_weights else out

    def position_queries_keys(
        self, q: Tensor, k: Tensor, query_positions: Tensor, key_positions: Tensor,
        cos_sin: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """QK-norm (if enabled) then rotary (if enabled). ``cos_sin``: the rotary tables of the query positions
        (see :meth:`forward`'s ``position_embeddings``); computed once for both when the positions are the same."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            if cos_sin is None and query_positions is key_positions:
                cos_sin = self.rotary.cos_sin(query_positions, torch.promote_types(q.dtype, torch.float32))
            q = self.rotary(q, query_positions, cos_sin)
            k = self.rotary(k, key_positions, cos_sin if key_positions is query_positions else None)
        return q, k

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_key_value_heads={self.num_key_value_heads}, causal={self.causal}, window={self.window}, "
            f"rotary={self.rotary is not None}"
        )


def zero_rows_without_keys(out: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the output of queries that may attend to no key (the convention of every headmix path)."""
    if mask is None:
        return out
    return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
