"""headmix: multi-head attention whose heads work together.

Drop-in attention layers (:class:`MultiHeadAttention`, :class:`TalkingHeadsAttention`,
:class:`DCMHA`, :class:`CollaborativeAttention`), the reference math they rest on
(:mod:`headmix.reference`) and its fast paths (:mod:`headmix.ops`), and the DCFormer family of
Hugging Face language models (:mod:`headmix.models`, registered with the Auto classes on import).
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
from .models import DCFormerConfig, DCFormerForCausalLM, DCFormerModel, HeadmixCache, upcycle
from .reference import ComposeWeights, compose, composed_attention

from .convert.collaborative_hf import register_saved_classes as _register_collaborative_classes

_register_collaborative_classes()  # saved collaborative BERT/RoBERTa/DistilBERT/ALBERT/GPT-2 load by Auto class

__version__ = "0.1.0"

__all__ = [
    "DCMHA",
    "CollaborativeAttention",
    "DCFormerConfig",
    "DCFormerForCausalLM",
    "DCFormerModel",
    "HeadmixCache",
    "ComposeWeights",
    "DynamicWeightProjection",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "TalkingHeadsAttention",
    "attention_mask",
    "compose",
    "composed_attention",
    "upcycle",
]
