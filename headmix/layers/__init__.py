"""The four drop-in attention layers, one call convention: ``Layer(dim=..., num_heads=..., **options)(x)``.

:data:`ATTENTION_LAYERS` maps each attention *kind* (the names a model config uses) to its layer class;
:func:`register_attention` adds a kind. A model builds its layers from here, so a new layer class or a
new option of a layer needs no change in the models (see ``docs/architecture.md``).
"""

from __future__ import annotations

from .base import Attention
from .cache import LayerCache, StaticLayerCache
from .collaborative import CollaborativeAttention
from .composed import ComposedAttention
from .dcmha import DCMHA, DynamicWeightProjection
from .mha import MultiHeadAttention
from .rotary import RotaryEmbedding
from .talking_heads import TalkingHeadsAttention

ATTENTION_LAYERS: dict[str, type[Attention]] = {
    "mha": MultiHeadAttention,
    "talking_heads": TalkingHeadsAttention,
    "dcmha": DCMHA,
    "collaborative": CollaborativeAttention,
}


def register_attention(kind: str, layer_class: type[Attention]) -> None:
    """Make ``layer_class`` (an :class:`Attention` subclass) buildable by models as ``attention=kind``."""
    if not (isinstance(layer_class, type) and issubclass(layer_class, Attention)):
        raise ValueError(f"layer_class={layer_class!r} is not allowed: expected a subclass of headmix.layers.Attention")
    ATTENTION_LAYERS[kind] = layer_class


__all__ = [
    "ATTENTION_LAYERS",
    "DCMHA",
    "Attention",
    "CollaborativeAttention",
    "ComposedAttention",
    "DynamicWeightProjection",
    "LayerCache",
    "StaticLayerCache",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "TalkingHeadsAttention",
    "register_attention",
]
