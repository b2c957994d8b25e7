"""headmix: multi-head attention whose heads work together.

Drop-in attention layers (:class:`MultiHeadAttention`, :class:`TalkingHeadsAttention`,
:class:`DCMHA`, :class:`CollaborativeAttention`), the reference math they rest on
(:mod:`headmix.reference`) and its fast paths (:mod:`headmix.ops`).
"""

from .layers import (
    DCMHA,
    CollaborativeAttention,
    DynamicWeightProjection,
    MultiHeadAttention,
    RotaryEmbedding,
    TalkingHeadsAttention,
)
from .masks import attention_mask
from .reference import ComposeWeights, compose, composed_attention

__version__ = "0.1.0"

__all__ = [
    "DCMHA",
    "CollaborativeAttention",
    "ComposeWeights",
    "DynamicWeightProjection",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "TalkingHeadsAttention",
    "attention_mask",
    "compose",
    "composed_attention",
]
