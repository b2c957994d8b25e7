"""The decoding cache lives with the layers (:mod:`headmix.layers.cache`); re-exported here for old imports."""

from ..layers.cache import HeadmixCache, LayerCache

__all__ = ["HeadmixCache", "LayerCache"]
