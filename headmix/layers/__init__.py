"""The four drop-in attention layers, one call convention: ``Layer(dim=..., num_heads=..., **options)(x)``."""

from .base import Attention
from .collaborative import CollaborativeAttention
from .dcmha import DCMHA, DynamicWeightProjection
from .mha import MultiHeadAttention
from .rotary import RotaryEmbedding
from .talking_heads import TalkingHeadsAttention

__all__ = [
    "DCMHA",
    "Attention",
    "CollaborativeAttention",
    "DynamicWeightProjection",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "TalkingHeadsAttention",
]
