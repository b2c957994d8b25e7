"""The decoding cache of the headmix models: a ``transformers`` :class:`~transformers.Cache` whose layers are
:class:`headmix.layers.cache.LayerCache` (keys, values and each attention kind's per-key state: DCMHA's key-wise
composition factors and gates, the collaborative content bias).

``generate()`` treats it as any transformers cache: ``get_seq_length``, ``reorder_cache`` (beam search),
``crop`` (assisted and prompt-lookup decoding, which undo rejected candidate tokens), ``batch_repeat_interleave``
and ``batch_select_indices`` (expansion, contrastive search), ``activate_past_recording`` (so that sliding-window
layers keep what a later ``crop`` needs), ``reset``. Sliding-window layers roll (their memory is bounded by the
window) unless recording.

:class:`HeadmixStaticCache` is the static cache, selected the Hugging Face way: ``model.generate(ids,
cache_implementation="static")`` (or ``generation_config.cache_implementation = "static"``). Its layers are
:class:`headmix.layers.cache.StaticLayerCache`: buffers allocated once, written in place, so one decoding step has
static shapes; on CUDA, ``generate()`` then runs the decoding steps through ``torch.compile`` (transformers' own
compile path: ``generation_config.compile_config``, ``disable_compile=True`` to turn it off).
"""

from __future__ import annotations

from transformers.cache_utils import Cache

from ..layers.cache import LayerCache, StaticLayerCache


class HeadmixCache(Cache):
    """One :class:`LayerCache` per layer; ``windows[i]`` is layer ``i``'s sliding window (``None``: global)."""

    def __init__(self, windows: list[int | None]) -> None:
        super().__init__(layers=[LayerCache(w) for w in windows])

    @property
    def seen_tokens(self) -> int:
        """Tokens processed so far (every layer has seen as many)."""
        return self.layers[0].seen if self.layers else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of tokens processed so far (not the number kept by rolling layers)."""
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if layer_idx >= len(self.layers):
            return query_length, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows without bound

    def update(self, *args, **kwargs):
        raise NotImplementedError("HeadmixCache is filled by headmix's attention layers (LayerCache.update), "
                                  "not by transformers' key/value update")

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens in every layer (transformers' convention from 5.x: a
        negative count, ``0`` a no-op). A positive value is the older convention (before ~5.20): the length to keep."""
        if tokens_to_remove > 0:
            tokens_to_remove = min(0, tokens_to_remove - self.get_seq_length())
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def nbytes(self) -> int:
        """Bytes held by all cached tensors."""
        return sum(layer.nbytes() for layer in self.layers)


class HeadmixStaticCache(HeadmixCache):
    """One :class:`StaticLayerCache` per layer: ``windows[i]`` is layer ``i``'s sliding window (``None``: global),
    ``max_cache_len`` the positions it holds (global layers; sliding-window layers keep a ring of ``window`` slots).

    Example:
        >>> import torch
        >>> from headmix.models import DCFormerConfig, DCFormerForCausalLM
        >>> model = DCFormerForCausalLM(DCFormerConfig.from_preset("tiny-dcformer++")).eval()
        >>> ids = torch.randint(0, 100, (1, 8))
        >>> out = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
        >>> out.shape
        torch.Size([1, 12])
    """

    def __init__(self, windows: list[int | None], max_cache_len: int) -> None:
        Cache.__init__(self, layers=[StaticLayerCache(max_cache_len, w) for w in windows])

    @property
    def max_cache_len(self) -> int:
        """Positions the cache holds (global layers; a sliding-window layer's ring never fills)."""
        return self.layers[0].max_cache_len

    @property
    def length(self):
        """The 0-d tensor count of positions seen (what a compiled step reads instead of :meth:`get_seq_length`)."""
        return self.layers[0].length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_cache_len

    def check_room(self, new: int) -> None:
        """Raise a ``ValueError`` naming the sizes if ``new`` more positions do not fit (a host synchronisation)."""
        for layer in self.layers:
            layer.check_room(new)


def reusable_static_cache(model, generation_config, max_cache_len: int, batch: int | None) -> HeadmixStaticCache:
    """The static cache ``generate(cache_implementation="static")`` decodes with: the one the model's previous such
    call used, emptied, when it fits (at least ``max_cache_len`` positions, as transformers reuses its own static
    cache, and buffers made for this batch or not made yet), else a new one. The compiled step then keeps its shapes
    (a new cache length recompiles it) and its buffers their addresses, so its CUDA graph replays: a new cache at every
    call made it record a new graph at every call, and decoding slowed as they piled up (DCFormer++-405M, batch 1,
    one H200: 305 -> 243-269 tokens/s over six calls with new caches, 304-317 with one; 2026-12-01). A kept cache
    longer than needed costs its extra slots in every step of global layers. A cache that ``generate()`` hands back
    (``return_dict_in_generate=True``) is the caller's: it is neither kept nor emptied by a later call. The model
    holds the kept cache's memory until ``model._static_cache = None``."""
    if generation_config.return_dict_in_generate:  # handed back: the caller's, so neither reused nor kept
        return model.new_cache(max_cache_len=max_cache_len)
    kept = getattr(model, "_static_cache", None)
    expected = None if batch is None else batch * max(generation_config.num_beams or 1,
                                                       generation_config.num_return_sequences or 1)
    made_for = (model.device, model.dtype)  # (a model moved or cast since: its cache's buffers are not for it)
    if (kept is not None and kept.max_cache_len >= max_cache_len and kept.layers[0].batch_size in (-1, expected)
            and getattr(kept, "made_for", None) == made_for):
        kept.reset()
        return kept
    model._static_cache = model.new_cache(max_cache_len=max_cache_len)
    model._static_cache.made_for = made_for
    return model._static_cache


__all__ = ["HeadmixCache", "HeadmixStaticCache", "LayerCache", "StaticLayerCache"]
