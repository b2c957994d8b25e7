"""Import and export the official DCFormer / DCPythia checkpoint format (Xiao et al., 2024).

The authors released DCFormer-2.8B and DCPythia-6.9B in a Hugging Face layout that needs
``trust_remote_code``. :func:`import_official` turns such a directory (``config.json`` plus
safetensors or ``.bin`` weights, sharded or not) into a headmix model directory, and
:func:`export_official` writes a headmix model back in the official layout. Both stream tensor by
tensor: peak memory is about one input shard plus one output shard, never the whole model.

Mapping (``{i}`` a layer index; ours are the names of :class:`headmix.models.DCFormerForCausalLM`)::

    tok_embeddings.weight                        model.embed_tokens.weight
    norm.{weight,bias}                           model.norm.{weight,bias}
    output.weight                                lm_head.weight
    layers.{i}.attention.wqkv.{weight,bias}      ...attention.{q,k,v}_proj.{weight,bias} (rows split in 3;
                                                 older files: wq / wk / wv)
    layers.{i}.attention.wo.{weight,bias}        ...attention.out_proj.{weight,bias}
    layers.{i}.attention.{q,k}_norm.scale        ...attention.{q,k}_norm.weight
    layers.{i}.attention.dyn_w_proj.dw1          ...attention.dynamic.hidden  (D, G, 4, K)
    layers.{i}.attention.dyn_w_proj.qkw          ...attention.dynamic.factors (G, 4, K, 2R, M)
    layers.{i}.attention.dyn_w_proj.dd           ...attention.dynamic.gates   (D, G, 4M) <-> (D, G, 4, M)
    layers.{i}.attention.dyn_w_proj.{pre,post}_proj.w
                                                 ...attention.static.{pre,post} (absent when the file
                                                 holds the identity, i.e. no static mix was trained)
    layers.{i}.attention_norm / ffn_norm         ...attention_norm / mlp_norm
    layers.{i}.feed_forward.w1 / w3 / w2 / mg    ...mlp.gate_proj / up_proj / down_proj / group_gate  (DCFormer)
    layers.{i}.feed_forward.w1 / w2              ...mlp.up_proj / down_proj                            (DCPythia)

The four-way axis of ``dw1``, ``qkw`` and ``dd`` is (pre-query, pre-key, post-query, post-key), the
order of :class:`headmix.layers.DynamicWeightProjection`, so those tensors keep their values.
``dyn_w_proj.dw_m`` / ``qkw_m`` / ``sw`` (copies the official code derives from the others at
start-up) are dropped on import and not written on export.

Sliding window. headmix's ``window_size=w`` means "a query sees itself and ``w - 1`` earlier
tokens", so the official 256-token windows map to 256 keys (a query sees itself and the 255 before
it) or 257 keys (itself and 256 before it, the ``j + 256 >= i`` mask). Which one the official code
uses depends on the model and the path:

* DCFormer: prompt scoring and decoding both use 256 keys; only its training path uses 257.
* DCPythia: prompt scoring uses 257 keys, decoding 256.

``window_convention="decode"`` (default) maps 256 -> 256: DCFormer behaves as its official code
does when scoring and generating, DCPythia as its official decoding does. ``"prefill"`` maps
256 -> 257: DCPythia's official prompt scoring, and DCFormer's training mask. Export maps back with
the convention recorded in the config (``official_window_convention``).

This module maps the tensors and runs the two conversions; :mod:`.official_config` maps the configs and
:mod:`.official_files` reads and writes the weights files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..models.configuration import DCFormerConfig
from .official_config import config_from_official, config_to_official
from .official_files import (DEFAULT_SHARD_BYTES, ShardWriter, TensorFile, cast, copy_tokenizer, no_partial_output,
                             prepare_out, weight_files)

logger = logging.getLogger(__name__)

DERIVED_TENSORS = ("dyn_w_proj.dw_m", "dyn_w_proj.qkw_m", "dyn_w_proj.sw")


# -- tensor names -------------------------------------------------------------------------------------
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_OURS = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _mlp_names(backbone: str) -> dict[str, str]:
    if backbone == "pythia":
        return {"w1": "up_proj", "w2": "down_proj"}
    return {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj", "mg": "group_gate"}


def _is_identity(t: Tensor) -> bool:
    eye = torch.eye(t.shape[-1], dtype=t.dtype).expand_as(t)
    return bool(torch.equal(t, eye))


def import_tensor(name: str, tensor: Tensor, config: DCFormerConfig) -> list[tuple[str, Tensor]]:
    """The headmix tensors made from one official tensor (empty for derived copies and, when no static
    mix was trained, the identity ``pre_proj.w``/``post_proj.w``). ``ValueError`` for unknown names."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "norm.bias": "model.norm.bias", "output.weight": "lm_head.weight"}
    if name in top:
        return [(top[name], tensor)]
    m = _LAYER.match(name)
    if not m:
        raise ValueError(f"official tensor {name!r} is not part of the DCFormer/DCPythia format")
    i, rest = int(m.group(1)), m.group(2)
    if i >= config.num_hidden_layers:
        raise ValueError(f"official tensor {name!r} is for layer {i}, but n_layer={config.num_hidden_layers}")
    ours = f"model.layers.{i}."
    D = config.hidden_size
    if rest.startswith(("attention.dyn_w_proj.", "attention.kv_cache.")):
        sub = rest[len("attention.dyn_w_proj."):]
        if rest.startswith("attention.kv_cache.") or rest.endswith(DERIVED_TENSORS):
            return []  # derived copies and decoding buffers
        if config.layer_attention(i) == "mha":  # use_dcmha=false: the official code still runs these
            neutral = _is_identity(tensor) if sub in ("pre_proj.w", "post_proj.w") else not bool(tensor.any())
            if not neutral:
                raise ValueError(f"official tensor {name!r} is not neutral but use_dcmha=false; the official inference "
                                 "code would still apply it, so headmix cannot import this as plain attention")
            return []
        if sub == "dw1":
            return [(ours + "attention.dynamic.hidden", tensor)]
        if sub == "qkw":
            return [(ours + "attention.dynamic.factors", tensor)]
        if sub == "dd":
            return [(ours + "attention.dynamic.gates", tensor.reshape(D, tensor.shape[1], 4, -1))]
        if sub in ("pre_proj.w", "post_proj.w"):
            static = config.attention_option("static")
            if static != _is_identity(tensor):  # the file is consistent with the config
                return [(ours + f"attention.static.{sub.split('_')[0]}", tensor)] if static else []
            raise ValueError(f"official tensor {name!r} is {'' if static else 'not '}the identity while "
                             f"another layer's is {'not ' if static else ''}: a static mix in some layers "
                             "only is ambiguous in the official format (identity = 'none trained') and not supported")
        raise ValueError(f"official tensor {name!r} is not part of the DCFormer/DCPythia format")
    simple = {"attention.wo.weight": "attention.out_proj.weight", "attention.wo.bias": "attention.out_proj.bias",
              "attention.q_norm.scale": "attention.q_norm.weight", "attention.k_norm.scale": "attention.k_norm.weight",
              "attention.wq.weight": "attention.q_proj.weight", "attention.wk.weight": "attention.k_proj.weight",
              "attention.wv.weight": "attention.v_proj.weight", "attention.wq.bias": "attention.q_proj.bias",
              "attention.wk.bias": "attention.k_proj.bias", "attention.wv.bias": "attention.v_proj.bias"}
    for norm_from, norm_to in (("attention_norm", "attention_norm"), ("ffn_norm", "mlp_norm")):
        for p in ("weight", "bias"):
            simple[f"{norm_from}.{p}"] = f"{norm_to}.{p}"
    for w, ours_name in _mlp_names(config.backbone).items():
        for p in ("weight", "bias"):
            simple[f"feed_forward.{w}.{p}"] = f"mlp.{ours_name}.{p}"
    if rest in simple:
        return [(ours + simple[rest], tensor)]
    if rest in ("attention.wqkv.weight", "attention.wqkv.bias"):
        if tensor.shape[0] != 3 * D:
            raise ValueError(f"official tensor {name!r} has shape {tuple(tensor.shape)}: expected {3 * D} rows "
                             "(query, key, value of n_head heads each)")
        kind = rest.rsplit(".", 1)[1]
        q, k, v = tensor.split(D, dim=0)
        return [(ours + f"attention.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v))]
    raise ValueError(f"official tensor {name!r} is not part of the "
                     f"{'DCPythia' if config.backbone == 'pythia' else 'DCFormer'} format")


def export_names(name: str, config: DCFormerConfig) -> tuple[str, str | None]:
    """``(official name, part)`` of a headmix tensor; ``part`` is ``"q"``/``"k"``/``"v"`` for the pieces
    of the fused ``wqkv``. ``ValueError`` for a tensor the official format cannot hold."""
    top = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "model.norm.bias": "norm.bias", "lm_head.weight": "output.weight"}
    if name in top:
        return top[name], None
    m = _OURS.match(name)
    if not m:
        raise ValueError(f"tensor {name!r} has no place in the official format")
    i, rest = m.group(1), m.group(2)
    base = f"layers.{i}."
    qkv = re.match(r"^attention\.([qkv])_proj\.(weight|bias)$", rest)
    if qkv:
        return base + f"attention.wqkv.{qkv.group(2)}", qkv.group(1)
    table = {"attention.out_proj.weight": "attention.wo.weight", "attention.out_proj.bias": "attention.wo.bias",
             "attention.q_norm.weight": "attention.q_norm.scale", "attention.k_norm.weight": "attention.k_norm.scale",
             "attention.dynamic.hidden": "attention.dyn_w_proj.dw1",
             "attention.dynamic.factors": "attention.dyn_w_proj.qkw",
             "attention.dynamic.gates": "attention.dyn_w_proj.dd",
             "attention.static.pre": "attention.dyn_w_proj.pre_proj.w",
             "attention.static.post": "attention.dyn_w_proj.post_proj.w"}
    for p in ("weight", "bias"):
        table[f"attention_norm.{p}"] = f"attention_norm.{p}"
        table[f"mlp_norm.{p}"] = f"ffn_norm.{p}"
        for w, ours_name in _mlp_names(config.backbone).items():
            table[f"mlp.{ours_name}.{p}"] = f"feed_forward.{w}.{p}"
    if rest not in table:
        raise ValueError(f"tensor {name!r} has no place in the official format")
    return base + table[rest], None


# -- the two conversions -------------------------------------------------------------------------------
def _expected_shapes(config: DCFormerConfig) -> dict[str, tuple[int, ...]]:
    from ..models import DCFormerForCausalLM

    with torch.device("meta"):
        model = DCFormerForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


@dataclass
class ConversionReport:
    """What a conversion wrote: the config, the number of tensors and bytes, the largest output-shard
    buffer held in memory, and the files."""

    config: DCFormerConfig | dict
    tensors: int
    bytes: int
    peak_buffer_bytes: int
    files: list[Path]


def import_official(
    src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, window_convention: str = "decode",
    dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
) -> ConversionReport:
    """Convert an official DCFormer/DCPythia checkpoint directory into a headmix model directory.

    Args:
        src_dir: holds the official ``config.json`` and weights (``model.safetensors``,
            ``pytorch_model.bin`` or sharded with an index). Tokenizer files are copied along.
        out_dir: where the headmix model goes (``config.json``, safetensors shards); loads with
            ``AutoModelForCausalLM.from_pretrained(out_dir)`` after ``import headmix``.
        window_convention: ``"decode"`` or ``"prefill"`` (see the module docstring).
        dtype: cast floating tensors to this dtype (default: keep the file's).
        max_shard_bytes: size of the output shards.
        progress: show a progress bar over tensors.

    Returns:
        a :class:`ConversionReport`.

    Example:
        >>> from headmix.convert.official import import_official
        >>> import_official("DCFormer-2.8B", "dcformer-2.8b-headmix")  # doctest: +SKIP
    """
    src, out = Path(src_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json: expected an official DCFormer/DCPythia checkpoint directory")
    official = json.loads((src / "config.json").read_text())
    files = weight_files(src)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update(f.shapes())
    static = _static_trained(files, shapes)
    config = config_from_official(official, shapes, static, window_convention)
    expected = _expected_shapes(config)
    with no_partial_output(out):
        prepare_out(out, src)
        writer = ShardWriter(out, max_shard_bytes)
        written: dict[str, tuple[int, ...]] = {}
        total = 0
        with tqdm(total=len(shapes), desc="import official", unit="tensor", disable=not progress) as bar:
            for f in files:
                for name, tensor in f.read():
                    for ours, t in import_tensor(name, tensor, config):
                        if ours not in expected:
                            raise ValueError(f"official tensor {name!r} maps to {ours!r}, which this model does not have")
                        if tuple(t.shape) != expected[ours]:
                            raise ValueError(f"official tensor {name!r} has shape {tuple(tensor.shape)}: "
                                             f"{ours!r} needs {expected[ours]}")
                        t = cast(t, dtype)
                        writer.add(ours, t)
                        written[ours] = tuple(t.shape)
                        total += t.numel() * t.element_size()
                    bar.update(1)
        missing = sorted(set(expected) - set(written))
        if missing:
            raise ValueError(f"official checkpoint {src} lacks tensors for {missing[:5]} ({len(missing)} in all)")
        paths = writer.close()
        config.save_pretrained(out)
        copied = copy_tokenizer(src, out)
        logger.info("imported %d tensors (%d bytes) into %s; tokenizer files: %s", len(written), total, out, copied)
        return ConversionReport(config, len(written), total, writer.peak_buffer_bytes, paths)


def _static_trained(files: list[TensorFile], shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether any ``pre_proj.w``/``post_proj.w`` differs from the identity (reads only those small tensors)."""
    wanted = {n for n in shapes if n.endswith(("dyn_w_proj.pre_proj.w", "dyn_w_proj.post_proj.w"))}
    if not wanted:
        return False
    for f in files:
        for name, t in f.read(only=wanted):
            if not _is_identity(t):
                return True
    return False


def export_official(
    src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, window_convention: str | None = None,
    dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
) -> ConversionReport:
    """Write a headmix model directory in the official DCFormer/DCPythia layout (the inverse of
    :func:`import_official`; ``window_convention`` defaults to the one recorded at import, else
    ``"decode"``). The official modelling code itself is not written: it is the authors'.

    A model without a static mix gets identity ``pre_proj.w``/``post_proj.w``; plain-attention models
    get zero dynamic weights and ``use_dcmha=false``, which the official code computes as plain MHA.
    """
    from ..models.checkpoint import safetensors_files

    src, out = Path(src_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json: expected a headmix model directory")
    config = DCFormerConfig.from_pretrained(src)
    official = config_to_official(config, window_convention)
    files = [TensorFile(p) for p in safetensors_files(src)]
    if not files:
        raise ValueError(f"{src} has no safetensors weights (model.safetensors or an index with shards)")
    if config.attention_option("static") and config.layer_attention(0) == "dcmha":
        warnings.warn("this model has a static head mix: the published official modules apply pre_proj.w/post_proj.w "
                      "only when built with use_sw=True", stacklevel=2)
    with no_partial_output(out):
        prepare_out(out, src)
        writer = ShardWriter(out, max_shard_bytes)
        pending: dict[str, dict[str, Tensor]] = {}
        total, count = 0, 0
        D, H = config.hidden_size, config.num_attention_heads

        def emit(name: str, t: Tensor) -> None:
            nonlocal total, count
            t = cast(t, dtype)
            writer.add(name, t)
            total += t.numel() * t.element_size()
            count += 1

        n_tensors = sum(len(f.shapes()) for f in files)
        reference_dtype = None
        with tqdm(total=n_tensors, desc="export official", unit="tensor", disable=not progress) as bar:
            for f in files:
                for name, tensor in f.read():
                    reference_dtype = reference_dtype or tensor.dtype
                    target, part = export_names(name, config)
                    if part is None:
                        if target.endswith("dyn_w_proj.dd"):
                            tensor = tensor.reshape(D, tensor.shape[1], -1)
                        emit(target, tensor)
                    else:
                        parts = pending.setdefault(target, {})
                        parts[part] = tensor
                        if len(parts) == 3:
                            emit(target, torch.cat([parts["q"], parts["k"], parts["v"]], dim=0))
                            del pending[target]
                    bar.update(1)
        if pending:
            raise ValueError(f"{src} lacks query/key/value pieces of {sorted(pending)[:3]}")
        dt = reference_dtype or torch.float32
        for i in range(config.num_hidden_layers):
            base = f"layers.{i}.attention.dyn_w_proj."
            eye = torch.eye(H, dtype=dt)[None]
            if config.layer_attention(i) == "mha":
                emit(base + "dw1", torch.zeros(D, 1, 4, 4 * H, dtype=dt))
                emit(base + "qkw", torch.zeros(1, 4, 4 * H, 4, H, dtype=dt))
                emit(base + "dd", torch.zeros(D, 1, 4 * H, dtype=dt))
            if config.layer_attention(i) == "mha" or not config.attention_option("static"):
                emit(base + "pre_proj.w", eye.clone())
                emit(base + "post_proj.w", eye.clone())
        paths = writer.close()
        (out / "config.json").write_text(json.dumps(official, indent=2) + "\n")
        copy_tokenizer(src, out)
        return ConversionReport(official, count, total, writer.peak_buffer_bytes, paths)
