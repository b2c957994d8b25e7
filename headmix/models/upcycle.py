"""Upcycling: turn a trained Transformer++ / Pythia into DCFormer / DCPythia with identical outputs.

A fresh DCMHA (``init="identity"``) computes exactly what multi-head attention computes with the
same projections, so copying every weight of the source model and adding fresh composition
parameters gives a model with the same logits, ready for continued pre-training.
"""

from __future__ import annotations


from .._validation import check_choice
from .configuration import LEGACY_OPTIONS
from .modeling import DCFormerForCausalLM


def upcycle(model: DCFormerForCausalLM, attention: str = "dcmha", **config_overrides) -> DCFormerForCausalLM:
    """A copy of ``model`` whose multi-head attention layers become ``attention`` layers (``"dcmha"`` or
    ``"talking_heads"``), every other weight kept, and the same outputs until it is trained further.

    Args:
        model: a headmix model whose layers use ``"mha"`` attention.
        attention: the new attention kind of those layers.
        **config_overrides: further config changes that keep outputs equal (e.g. ``attention_options={"rank": 4}``,
            or the older spelling ``dcmha_rank=4``).

    Raises:
        ValueError: if ``attention`` cannot start as an exact copy, or ``model`` is not a headmix model.
    """
    check_choice("attention", attention, ("dcmha", "talking_heads"))
    if not isinstance(model, DCFormerForCausalLM):
        raise ValueError(
            f"model is a {type(model).__name__}: expected a headmix DCFormerForCausalLM (a transformers Llama, "
            "Mistral, Qwen2 or GPT-NeoX: headmix.convert.upcycle or `headmix convert upcycle SRC OUT`; official "
            "DCFormer checkpoints: `headmix convert official` first)"
        )
    overrides = dict(config_overrides)
    options = dict(overrides.pop("attention_options", None) or {})
    options.update({option: overrides.pop(old) for old, option in LEGACY_OPTIONS.items() if old in overrides})
    if options.get("init", "identity") != "identity":
        raise ValueError("dcmha_init must stay 'identity' when upcycling (attention option 'init'): only that "
                         "initialisation reproduces MHA")
    config = model.config
    kinds = [config.layer_attention(i) for i in range(config.num_hidden_layers)]
    new_kinds = [attention if k == "mha" else k for k in kinds]
    fields = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "torch_dtype", "dtype"):
        fields.pop(key, None)
    options = {**fields.pop("attention_options", {}), **options}
    options.pop("init", None)  # the layers' default, "identity"
    attention = new_kinds if len(set(new_kinds)) > 1 else new_kinds[0]
    fields.update(overrides, attention=attention, attention_options=options)
    new_config = type(config)(**fields)
    parameter = next(model.parameters())
    new_model = DCFormerForCausalLM(new_config).to(device=parameter.device, dtype=parameter.dtype)
    missing, unexpected = new_model.load_state_dict(model.state_dict(), strict=False)
    new_only = {n for n, _ in new_model.named_parameters()} - {n for n, _ in model.named_parameters()}
    if unexpected or set(missing) - new_only:
        raise ValueError(f"upcycling could not map weights: unexpected {unexpected}, missing {sorted(set(missing) - new_only)}")
    new_model.train(model.training)
    return new_model


__all__ = ["upcycle"]
