"""Upcycling from any source: a headmix model, a ``transformers`` Llama-family model, or a directory of either.

:func:`upcycle` is :func:`headmix.models.upcycle` that also takes a ``LlamaForCausalLM`` (Mistral, Qwen2,
GPT-NeoX: :mod:`headmix.convert.llama`); :func:`upcycle_directory` is ``headmix convert upcycle``: it reads the
source's config first (``config.json``, or a GGUF file's header), refuses what cannot be reproduced, then loads
the weights, converts, and writes the model with its tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._validation import check_choice
from ..models.configuration import MODEL_TYPE
from ..models.modeling import DCFormerForCausalLM
from ..models.upcycle import upcycle as upcycle_headmix
from .llama import SUPPORTED, UPCYCLE_KINDS, config_from_source, map_state_dict
from .official_files import copy_tokenizer, no_partial_output, prepare_out

SOURCES = ("a headmix model directory", "a transformers Llama, Mistral, Qwen2 or GPT-NeoX (Pythia) directory "
           "(config.json + weights)", "a directory or file of such a model in GGUF (needs the `gguf` package)")


def import_model(source: nn.Module) -> DCFormerForCausalLM:
    """A headmix Transformer++ / Pythia (``attention="mha"``) with the weights of a ``transformers``
    Llama/Mistral/Qwen2/GPT-NeoX causal LM, and the same logits."""
    config = config_from_source(source.config)
    parameter = next(source.parameters())
    with torch.device("meta"):
        model = DCFormerForCausalLM(config)
    state = map_state_dict(source.config.model_type, source.state_dict(), config.num_attention_heads)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {n for n in model.state_dict() if not (config.tie_word_embeddings and n == "lm_head.weight")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"cannot map the {type(source).__name__}'s tensors: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype=parameter.dtype).train(source.training)


def upcycle(source: nn.Module, attention: str = "dcmha", **config_overrides: Any) -> DCFormerForCausalLM:
    """``source`` as a headmix model whose multi-head attention layers are ``attention`` layers, with the same
    outputs until it is trained further.

    Args:
        source: a headmix :class:`~headmix.models.DCFormerForCausalLM`, or a ``transformers``
            ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` / ``GPTNeoXForCausalLM``.
        attention: ``"dcmha"``, ``"talking_heads"``, or ``"mha"`` (a plain import: the control of a comparison).
        **config_overrides: passed to :func:`headmix.models.upcycle` (e.g. ``attention_options={"rank": 4}``).
    """
    check_choice("attention", attention, UPCYCLE_KINDS)
    if not isinstance(source, DCFormerForCausalLM):
        model_type = getattr(getattr(source, "config", None), "model_type", None)
        if model_type not in SUPPORTED:
            raise ValueError(f"source is a {type(source).__name__} (model_type {model_type!r}): expected a headmix "
                             f"DCFormerForCausalLM or a transformers causal LM of {list(SUPPORTED)} (official "
                             "DCFormer checkpoints: `headmix convert official` first)")
        source = import_model(source)
    if attention == "mha":
        if config_overrides:
            raise ValueError(f"attention='mha' keeps the model as it is: config overrides {sorted(config_overrides)} "
                             "need attention 'dcmha' or 'talking_heads'")
        return source
    return upcycle_headmix(source, attention=attention, **config_overrides)


def _gguf_file(src: Path) -> tuple[Path, str | None]:
    """(directory, GGUF file name or None) for a SRC that is a directory or a ``.gguf`` file."""
    if src.is_file() and src.suffix == ".gguf":
        return src.parent, src.name
    if src.is_dir() and not (src / "config.json").is_file():
        ggufs = sorted(p.name for p in src.glob("*.gguf"))
        if len(ggufs) == 1:
            return src, ggufs[0]
        if len(ggufs) > 1:
            raise ValueError(f"{src} holds several GGUF files {ggufs}: pass the one to convert as SRC")
    return src, None


def read_source_config(src: str | os.PathLike) -> tuple[Any, Path, str | None]:
    """The source's config (no weights read), its directory and GGUF file name; refuses what is not convertible."""
    from transformers import AutoConfig

    import headmix.models  # noqa: F401  (registers our config with AutoConfig)

    directory, gguf = _gguf_file(Path(src))
    if not directory.is_dir() or (gguf is None and not (directory / "config.json").is_file()):
        raise ValueError(f"{src} is not a model: expected {'; '.join(SOURCES)}")
    config = AutoConfig.from_pretrained(directory, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(directory)
    if config.model_type != MODEL_TYPE:
        config_from_source(config)  # raises, naming the field, before any weight is read
    return config, directory, gguf


def upcycle_directory(src: str | os.PathLike, out: str | os.PathLike, attention: str = "dcmha",
                      **config_overrides: Any) -> DCFormerForCausalLM:
    """``headmix convert upcycle``: read ``src`` (see :data:`SOURCES`), convert with :func:`upcycle`, and write
    the model and the source's tokenizer to ``out``. Returns the converted model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_choice("attention", attention, UPCYCLE_KINDS)
    config, directory, gguf = read_source_config(src)
    out = Path(out)
    if config.model_type == MODEL_TYPE:
        source = DCFormerForCausalLM.from_pretrained(directory)
    else:
        extra = {"gguf_file": gguf} if gguf else {"dtype": "auto"}
        source = AutoModelForCausalLM.from_pretrained(directory, **extra)
    model = upcycle(source.eval(), attention=attention, **config_overrides)
    with no_partial_output(out):
        prepare_out(out, directory)
        model.save_pretrained(out)
        if gguf:
            AutoTokenizer.from_pretrained(directory, gguf_file=gguf).save_pretrained(out)
        else:
            copy_tokenizer(directory, out)
    return model
