"""Import a Llama-family model (Llama, Mistral, Qwen2, GPT-NeoX / Pythia) as a headmix model with the same logits.

A ``transformers`` ``LlamaForCausalLM`` is a Transformer++ (pre-RMSNorm, SwiGLU, rotary) and a
``GPTNeoXForCausalLM`` is headmix's ``pythia`` backbone, so their weights copy over tensor for tensor;
:func:`headmix.models.upcycle` then turns the multi-head attention into DCMHA (or talking-heads) with
identical outputs, ready for continued training. Everything that would change the outputs is refused
from the source's config (``config.json`` or a GGUF header) before any weight is read, naming the field.

Mapping (``{i}`` a layer index; ours are the names of :class:`headmix.models.DCFormerForCausalLM`)::

    Llama / Mistral / Qwen2                              headmix
    model.embed_tokens.weight                            model.embed_tokens.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias} model.layers.{i}.attention.{q,k,v}_proj.{weight,bias}
    model.layers.{i}.self_attn.o_proj.{weight,bias}      model.layers.{i}.attention.out_proj.{weight,bias}
    model.layers.{i}.input_layernorm.weight              model.layers.{i}.attention_norm.weight
    model.layers.{i}.post_attention_layernorm.weight     model.layers.{i}.mlp_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.*           model.layers.{i}.mlp.{gate,up,down}_proj.*
    model.norm.weight / lm_head.weight                   model.norm.weight / lm_head.weight

    GPT-NeoX
    gpt_neox.embed_in.weight                             model.embed_tokens.weight
    gpt_neox.layers.{i}.attention.query_key_value.*      ...attention.{q,k,v}_proj.* (rows (H, 3, d): per head)
    gpt_neox.layers.{i}.attention.dense.*                ...attention.out_proj.*
    gpt_neox.layers.{i}.{input,post_attention}_layernorm.*  ...{attention,mlp}_norm.*
    gpt_neox.layers.{i}.mlp.dense_h_to_4h / dense_4h_to_h   ...mlp.up_proj / down_proj
    gpt_neox.final_layer_norm.* / embed_out.weight       model.norm.* / lm_head.weight
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models.configuration import DCFormerConfig
from ..models.modeling import DCFormerForCausalLM

LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED = (*LLAMA_LIKE, "gpt_neox")
UPCYCLE_KINDS = ("dcmha", "talking_heads", "mha")


def _unsupported(model_type: str, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{model_type} config has {field}={value!r}: {why}; headmix cannot import it with the "
                      "same outputs")


def _rope_fields(source: Any, model_type: str) -> dict[str, Any]:
    """``rope_theta`` and ``rotary_pct`` from ``rope_parameters`` (transformers 5) or the older fields."""
    rope = getattr(source, "rope_parameters", None) or {}
    if "full_attention" in rope and isinstance(rope["full_attention"], dict):  # per-layer-type parameters
        kinds = {key: value for key, value in rope.items() if isinstance(value, dict)}
        if len({str(sorted(v.items())) for v in kinds.values()}) > 1:
            raise _unsupported(model_type, "rope_parameters", rope, "different RoPE per layer type is not supported")
        rope = next(iter(kinds.values()))
    scaling = getattr(source, "rope_scaling", None)
    if isinstance(scaling, dict) and not rope:
        rope = scaling
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise _unsupported(model_type, "rope_parameters.rope_type", rope_type,
                           "headmix's rotary embedding has no RoPE scaling (supported: 'default')")
    theta = rope.get("rope_theta", getattr(source, "rope_theta", None))
    if theta is None:
        theta = getattr(source, "rotary_emb_base", None)
    fraction = rope.get("partial_rotary_factor", getattr(source, "partial_rotary_factor", None))
    if fraction is None:
        fraction = getattr(source, "rotary_pct", None)
    fields = {}
    if theta is not None:
        fields["rope_theta"] = float(theta)
    if fraction is not None:
        fields["rotary_pct"] = float(fraction)
    return fields


def _window_fields(source: Any, model_type: str) -> dict[str, Any]:
    """``window_size``/``window_pattern`` from Mistral's ``sliding_window`` or Qwen2's sliding layers."""
    window = getattr(source, "sliding_window", None)
    layers = source.num_hidden_layers
    if model_type == "qwen2":
        if not getattr(source, "use_sliding_window", False):
            return {}
        kinds = getattr(source, "layer_types", None) or [
            "sliding_attention" if i >= source.max_window_layers else "full_attention" for i in range(layers)]
    elif model_type == "mistral":
        kinds = ["sliding_attention"] * layers if window is not None else ["full_attention"] * layers
    else:
        kinds = getattr(source, "layer_types", None) or ["full_attention"] * layers
    unknown = set(kinds) - {"sliding_attention", "full_attention"}
    if unknown:
        raise _unsupported(model_type, "layer_types", sorted(unknown), "headmix layers are 'full_attention' or "
                           "'sliding_attention'")
    if "sliding_attention" not in kinds:
        return {}
    if not isinstance(window, int) or window < 1:
        raise _unsupported(model_type, "sliding_window", window, "sliding layers need a positive window")
    if window >= source.max_position_embeddings:  # never binds
        return {}
    if all(kind == "sliding_attention" for kind in kinds):
        return {"window_size": window}
    return {"window_size": window, "window_pattern": "".join("L" if k == "sliding_attention" else "G" for k in kinds)}


def config_from_source(source: Any) -> DCFormerConfig:
    """The headmix config (``attention="mha"``) of a Llama/Mistral/Qwen2/GPT-NeoX ``transformers`` config.

    Raises:
        ValueError: naming the field, for a model type or a feature headmix cannot reproduce exactly (RoPE
            scaling, ``head_dim != hidden_size / num_attention_heads``, another activation, ...).
    """
    model_type = getattr(source, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type={model_type!r} is not supported: headmix imports {list(SUPPORTED)} "
                         "(transformers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPTNeoXForCausalLM)")
    dim, heads = source.hidden_size, source.num_attention_heads
    if dim % heads:
        raise _unsupported(model_type, "num_attention_heads", heads, f"hidden_size={dim} is not a multiple of it")
    head_dim = getattr(source, "head_dim", None)
    if head_dim is not None and head_dim != dim // heads:
        raise _unsupported(model_type, "head_dim", head_dim, f"headmix layers use hidden_size / num_attention_heads "
                           f"= {dim // heads} channels per head")
    kv_heads = getattr(source, "num_key_value_heads", None) or heads
    activation = getattr(source, "hidden_act", None)
    neox = model_type == "gpt_neox"
    if activation != ("gelu" if neox else "silu"):
        raise _unsupported(model_type, "hidden_act", activation, f"headmix's {'GELU' if neox else 'SwiGLU'} MLP uses "
                           f"{'gelu' if neox else 'silu'}")
    fields: dict[str, Any] = dict(
        vocab_size=source.vocab_size, hidden_size=dim, num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=source.intermediate_size,
        max_position_embeddings=source.max_position_embeddings, attention="mha",
        tie_word_embeddings=bool(getattr(source, "tie_word_embeddings", False)),
        initializer_range=getattr(source, "initializer_range", 0.02),
        **_rope_fields(source, model_type), **_window_fields(source, model_type),
    )
    rotated = int(dim // heads * fields.get("rotary_pct", 0.25 if neox else 1.0))
    if rotated % 2:
        raise _unsupported(model_type, "partial_rotary_factor", fields.get("rotary_pct"), f"it rotates {rotated} of "
                           f"{dim // heads} channels per head, an odd number: headmix rotates channel pairs")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(source, name, None) is not None:
            fields[name] = getattr(source, name)
    if neox:
        attention_bias = getattr(source, "attention_bias", True)
        fields.update(backbone="pythia", norm_eps=source.layer_norm_eps, use_bias=True,
                      parallel_residual=bool(getattr(source, "use_parallel_residual", True)),
                      attention_bias=None if attention_bias else False)
        fields.setdefault("rotary_pct", 0.25)
    else:
        mlp_bias = bool(getattr(source, "mlp_bias", False))
        attention_bias = "qkv" if model_type == "qwen2" else bool(getattr(source, "attention_bias", False))
        fields.update(backbone="llama", norm_eps=source.rms_norm_eps, use_bias=mlp_bias,
                      attention_bias=None if attention_bias == mlp_bias else attention_bias)
    return DCFormerConfig(**fields)


_LLAMA_NAMES = [
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.", r"model.layers.\1.attention.out_proj."),
    (r"model\.layers\.(\d+)\.self_attn\.", r"model.layers.\1.attention."),
    (r"model\.layers\.(\d+)\.input_layernorm\.", r"model.layers.\1.attention_norm."),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.layers.\1.mlp_norm."),
]
_NEOX_NAMES = [
    (r"gpt_neox\.embed_in\.", "model.embed_tokens."),
    (r"gpt_neox\.final_layer_norm\.", "model.norm."),
    (r"embed_out\.", "lm_head."),
    (r"gpt_neox\.layers\.(\d+)\.attention\.dense\.", r"model.layers.\1.attention.out_proj."),
    (r"gpt_neox\.layers\.(\d+)\.input_layernorm\.", r"model.layers.\1.attention_norm."),
    (r"gpt_neox\.layers\.(\d+)\.post_attention_layernorm\.", r"model.layers.\1.mlp_norm."),
    (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"model.layers.\1.mlp.up_proj."),
    (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"model.layers.\1.mlp.down_proj."),
]
_NEOX_QKV = re.compile(r"gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)")


def map_state_dict(model_type: str, state: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """The source's tensors under headmix's names (GPT-NeoX's fused ``query_key_value`` split per head)."""
    ours: dict[str, Tensor] = {}
    rules = _NEOX_NAMES if model_type == "gpt_neox" else _LLAMA_NAMES
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq") or name.endswith(".attention.bias") or name.endswith("masked_bias"):
            continue  # buffers recomputed at start-up
        fused = _NEOX_QKV.fullmatch(name) if model_type == "gpt_neox" else None
        if fused:
            layer, kind = fused.groups()
            parts = tensor.unflatten(0, (num_heads, 3, -1))  # rows are (head, q/k/v, channel)
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                ours[f"model.layers.{layer}.attention.{proj}.{kind}"] = parts[:, j].flatten(0, 1).contiguous()
            continue
        for pattern, replacement in rules:
            if re.match(pattern, name):
                name = re.sub(pattern, replacement, name, count=1)
                break
        ours[name] = tensor
    return ours
