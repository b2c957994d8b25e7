"""headmix: multi-head attention whose heads work together.

Drop-in attention layers (:class:`MultiHeadAttention`, :class:`TalkingHeadsAttention`,
:class:`DCMHA`, :class:`CollaborativeAttention`), the reference math they rest on
(:mod:`headmix.reference`) and its fast paths (:mod:`headmix.ops`) load with ``import headmix``, which
costs little more than ``import torch``. The DCFormer family of Hugging Face language models
(:mod:`headmix.models`: :class:`DCFormerConfig`, :class:`DCFormerForCausalLM`, ...) loads on first use,
with ``transformers``; its classes are registered with the Auto classes on ``import headmix.models`` or
as soon as ``transformers`` is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _auto_classes
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

_MODELS = ("DCFormerConfig", "DCFormerForCausalLM", "DCFormerModel", "HeadmixCache", "HeadmixStaticCache")


def __getattr__(name: str) -> Any:
    """The model classes import :mod:`headmix.models` (and ``transformers``) on first use (PEP 562);
    ``upcycle`` (headmix or Llama-family models) is :func:`headmix.convert.upcycle.upcycle`."""
    if name in _MODELS:
        return getattr(importlib.import_module(".models", __name__), name)
    if name == "upcycle":
        return importlib.import_module(".convert.upcycle", __name__).upcycle
    raise AttributeError(f"module 'headmix' has no attribute {name!r}")


_auto_classes.install()

__all__ = [
    "DCMHA",
    "CollaborativeAttention",
    "DCFormerConfig",
    "DCFormerForCausalLM",
    "DCFormerModel",
    "HeadmixCache",
    "HeadmixStaticCache",
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
