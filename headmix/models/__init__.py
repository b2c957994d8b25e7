"""Hugging Face models of the DCFormer family, registered with the Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import HeadmixCache, HeadmixStaticCache, LayerCache, StaticLayerCache
from .configuration import ATTENTION_KINDS, PRESETS, DCFormerConfig, preset_table
from .modeling import DCFormerForCausalLM, DCFormerModel, DCFormerPreTrainedModel
from .upcycle import upcycle

AutoConfig.register(DCFormerConfig.model_type, DCFormerConfig, exist_ok=True)
AutoModel.register(DCFormerConfig, DCFormerModel, exist_ok=True)
AutoModelForCausalLM.register(DCFormerConfig, DCFormerForCausalLM, exist_ok=True)

__all__ = [
    "ATTENTION_KINDS",
    "PRESETS",
    "DCFormerConfig",
    "DCFormerForCausalLM",
    "DCFormerModel",
    "DCFormerPreTrainedModel",
    "HeadmixCache",
    "HeadmixStaticCache",
    "LayerCache",
    "StaticLayerCache",
    "preset_table",
    "upcycle",
]
