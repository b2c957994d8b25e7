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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from .._validation import check_choice
from ..models.configuration import DCFormerConfig

logger = logging.getLogger(__name__)

MODEL_TYPES = {"dcformer": "llama", "dcpythia": "pythia"}
OFFICIAL_WINDOW = 256  # the official code hard-codes 256 in its named window patterns
WINDOW_TYPES = {None: "LG", "LG": "LG", "LGLL": "LGLL", "LGL6": "LGLLLLLL"}
WINDOW_CONVENTIONS = ("decode", "prefill")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json")
# config fields that say nothing about the architecture (or only about the official training run)
IGNORED_FIELDS = {"architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
                  "is_training", "use_gradient_checkpointing", "q_chunk_size", "prefill_pad", "bos_token_id",
                  "eos_token_id", "pad_token_id", "use_cache", "model_type", "return_dict", "output_hidden_states",
                  "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
                  "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
                  "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "id2label", "label2id",
                  "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
                  "problem_type", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
                  "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
                  "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
                  "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
                  "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
                  "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens"}
ARCHITECTURE_FIELDS = {"block_size", "vocab_size", "n_layer", "n_head", "dim", "intermediate_size", "n_local_heads",
                       "head_dim", "rope_base", "norm_eps", "use_dcmha", "use_qk_norm", "window_size", "window_type",
                       "query_wise", "tie_word_embeddings", "mgate", "mgate_dim", "rotary_pct",
                       "use_parallel_residual", "use_linear_bias"}
DERIVED_TENSORS = ("dyn_w_proj.dw_m", "dyn_w_proj.qkw_m", "dyn_w_proj.sw")
DEFAULT_SHARD_BYTES = 2 * 1024**3


# -- reading checkpoints tensor by tensor ---------------------------------------------------------
@dataclass
class TensorFile:
    """One weights file: safetensors (memory-mapped, one tensor at a time) or a ``.bin`` pickle
    (loaded with ``weights_only=True`` and memory-mapped where the file allows it)."""

    path: Path

    def read(self, only: set[str] | None = None) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` pairs, in file order (only the names in ``only`` when given)."""
        if self.path.suffix == ".safetensors":
            with self._unreadable_as_value_error():
                handle_context = safe_open(str(self.path), framework="pt")
            with handle_context as handle:
                for name in handle.keys():
                    if only is not None and name not in only:
                        continue
                    with self._unreadable_as_value_error():
                        tensor = handle.get_tensor(name)
                    yield name, tensor
            return
        with self._unreadable_as_value_error():
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:  # legacy (non-zip) serialisation cannot be memory-mapped
                if "mmap" not in str(error) and "zip" not in str(error).lower():
                    raise
                state = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{self.path} holds a {type(state).__name__}: expected a dict of tensors (a state dict)")
        names = [n for n in state if only is None or n in only]
        for name in names:
            yield name, state.pop(name)
        del state

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self.path.suffix == ".safetensors":
            with self._unreadable_as_value_error():
                with safe_open(str(self.path), framework="pt") as handle:
                    return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        return {name: tuple(t.shape) for name, t in self.read()}

    @contextlib.contextmanager
    def _unreadable_as_value_error(self) -> Iterator[None]:
        """A file that cannot be parsed becomes one ``ValueError`` naming it (a download cut short, say)."""
        try:
            yield
        except ValueError:
            raise
        except Exception as error:  # SafetensorError, RuntimeError/EOFError/UnpicklingError from torch.load
            size = self.path.stat().st_size if self.path.exists() else 0
            state = "empty (0 bytes)" if size == 0 else f"truncated or corrupt ({size:,} bytes)"
            raise ValueError(
                f"weights file {self.path} is {state}: {(type(error).__name__ + ': ' + str(error)).splitlines()[0][:200]}. "
                "Download or copy it again"
            ) from None


def weight_files(directory: Path) -> list[TensorFile]:
    """The weights files of a checkpoint directory: a safetensors or ``.bin`` index, else single files."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            files = [directory / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ValueError(f"{directory / index} lists weights files that do not exist: {missing[:3]}")
            return [TensorFile(f) for f in files]
    for single in ("model.safetensors", "pytorch_model.bin", "consolidated.pth", "model.pth"):
        if (directory / single).is_file():
            return [TensorFile(directory / single)]
    raise ValueError(
        f"{directory} has no weights: expected model.safetensors, pytorch_model.bin, or a "
        "model.safetensors.index.json / pytorch_model.bin.index.json with its shards"
    )


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` each (one shard in memory at a
    time), then names them as ``transformers`` does and writes the index."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_bytes} is not allowed: expected a positive number of bytes")
        self.directory, self.max_bytes = directory, max_bytes
        self.buffer: dict[str, Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.peak_buffer_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self.buffer or any(name in names for _, names in self.shards):
            raise ValueError(f"tensor {name!r} would be written twice: the source checkpoint has duplicate entries")
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += size
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self.buffer_bytes)

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.directory / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, rename the shards (``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` with
        ``model.safetensors.index.json``) and return their paths."""
        self.flush()
        n = len(self.shards)
        if n == 0:
            raise ValueError("no tensors to write")
        if n == 1:
            final = self.directory / "model.safetensors"
            self.shards[0][0].replace(final)
            return [final]
        weight_map, total, paths = {}, 0, []
        for i, (path, names) in enumerate(self.shards):
            final = self.directory / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.replace(final)
            paths.append(final)
            with safe_open(str(final), framework="pt") as handle:
                for name in names:
                    weight_map[name] = final.name
                    sl = handle.get_slice(name)
                    total += _numel(sl.get_shape()) * _dtype_bytes(sl.get_dtype())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return paths


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(name, 4)


# -- configs ----------------------------------------------------------------------------------------
def _unsupported(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"official config field {field}={value!r} is not supported: {allowed}")


def config_from_official(
    official: dict[str, Any], shapes: dict[str, tuple[int, ...]], static_trained: bool,
    window_convention: str = "decode",
) -> DCFormerConfig:
    """The :class:`DCFormerConfig` of an official ``config.json`` (as a dict).

    ``shapes`` (official tensor name -> shape) supply what the config does not state (the DCMHA
    rank, groups and hidden size); ``static_trained`` says whether ``pre_proj.w`` held anything but
    the identity. Every field value headmix cannot reproduce exactly raises ``ValueError``.
    """
    check_choice("window_convention", window_convention, WINDOW_CONVENTIONS)
    model_type = official.get("model_type")
    if model_type not in MODEL_TYPES:
        raise _unsupported("model_type", model_type, f"expected one of {sorted(MODEL_TYPES)}")
    unknown = sorted(set(official) - IGNORED_FIELDS - ARCHITECTURE_FIELDS)
    if unknown:
        raise ValueError(f"official config has fields headmix does not know, so cannot promise the same model: "
                         f"{unknown}. Known architecture fields: {sorted(ARCHITECTURE_FIELDS)}")
    backbone = MODEL_TYPES[model_type]
    get = official.get
    dim, heads, layers = get("dim"), get("n_head"), get("n_layer")
    for name in ("dim", "n_head", "n_layer", "vocab_size"):
        if not isinstance(get(name), int) or get(name) <= 0:
            raise _unsupported(name, get(name), "expected a positive integer")
    if dim % heads:
        raise _unsupported("n_head", heads, f"dim={dim} must be divisible by it")
    if get("head_dim") is not None and get("head_dim") != dim // heads and model_type == "dcpythia":
        raise _unsupported("head_dim", get("head_dim"), f"expected dim / n_head = {dim // heads}")
    if get("n_local_heads", -1) not in (-1, heads):
        raise _unsupported("n_local_heads", get("n_local_heads"),
                           f"headmix has no grouped-query attention; expected -1 or n_head={heads}")
    if get("query_wise", False):
        raise _unsupported("query_wise", True, "the official code drops the key-wise terms when decoding but uses "
                           "them in prefill, so no single model reproduces it; expected false")
    mgate = bool(get("mgate", False))
    if mgate and backbone != "llama":
        raise _unsupported("mgate", True, "the official DCPythia has no gated MLP; expected false")
    rotary_pct = get("rotary_pct", 1.0) if backbone == "pythia" else 1.0
    if backbone == "llama" and get("rotary_pct", 1.0) != 1.0:
        raise _unsupported("rotary_pct", get("rotary_pct"), "the official DCFormer rotates whole heads; expected 1.0")
    if backbone == "llama" and (get("use_parallel_residual") or get("use_linear_bias")):
        raise ValueError("official DCFormer (model_type 'dcformer') has no parallel residual or linear biases; "
                         f"got use_parallel_residual={get('use_parallel_residual')}, "
                         f"use_linear_bias={get('use_linear_bias')}")
    window_size, window_type = get("window_size"), get("window_type")
    if window_type not in WINDOW_TYPES:
        raise _unsupported("window_type", window_type, f"expected one of {list(WINDOW_TYPES)}")
    if window_size is not None and (not isinstance(window_size, int) or window_size <= 0):
        raise _unsupported("window_size", window_size, "expected a positive integer or null")
    if window_type is not None and window_size != OFFICIAL_WINDOW:
        raise _unsupported("window_size", window_size, f"window_type={window_type!r} hard-codes {OFFICIAL_WINDOW}-token "
                           f"local layers in the official code; expected window_size={OFFICIAL_WINDOW}")
    use_dcmha = get("use_dcmha", True)
    dcmha: dict[str, Any] = {}
    if use_dcmha:
        qkw = shapes.get("layers.0.attention.dyn_w_proj.qkw")
        if qkw is None or len(qkw) != 5 or qkw[1] != 4 or qkw[3] % 2:
            raise ValueError(f"layers.0.attention.dyn_w_proj.qkw has shape {qkw}: expected (G, 4, K, 2R, M)")
        groups, hidden, two_r, per_group = qkw[0], qkw[2], qkw[3], qkw[4]
        if groups * per_group != heads:
            raise ValueError(f"dyn_w_proj.qkw has shape {qkw}: G*M = {groups * per_group} but n_head={heads}")
        dcmha = dict(dcmha_rank=two_r // 2, dcmha_groups=groups, dcmha_hidden_dim=hidden, dcmha_static=static_trained)
    window = None if window_size is None else window_size + (1 if window_convention == "prefill" else 0)
    config = DCFormerConfig(
        backbone=backbone, vocab_size=get("vocab_size"), hidden_size=dim, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=get("intermediate_size"),
        max_position_embeddings=get("block_size", 2048), attention="dcmha" if use_dcmha else "mha",
        window_size=window, window_pattern=WINDOW_TYPES[window_type] if window is not None else None,
        qk_norm=bool(get("use_qk_norm", False)), rope_theta=float(get("rope_base", 10000.0)), rotary_pct=rotary_pct,
        parallel_residual=bool(get("use_parallel_residual", False)), use_bias=bool(get("use_linear_bias", False)),
        norm_eps=get("norm_eps", 1e-5), mlp_gate_groups=get("mgate_dim", 44) if mgate else None,
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"), pad_token_id=get("pad_token_id"),
        **dcmha,
    )
    config.official_window_convention = window_convention
    return config


def config_to_official(config: DCFormerConfig, window_convention: str | None = None) -> dict[str, Any]:
    """The official ``config.json`` of a headmix config; ``ValueError`` naming what the official code
    cannot express (talking-heads or collaborative layers, grouped composition, other ranks, ...)."""
    convention = window_convention or getattr(config, "official_window_convention", "decode")
    check_choice("window_convention", convention, WINDOW_CONVENTIONS)
    kinds = {config.layer_attention(i) for i in range(config.num_hidden_layers)}
    if kinds not in ({"dcmha"}, {"mha"}):
        raise ValueError(f"attention kinds {sorted(kinds)} cannot be exported: the official format has every "
                         "layer 'dcmha' (or every layer 'mha', written with use_dcmha=false)")
    H = config.num_attention_heads
    if kinds == {"dcmha"}:
        expected = dict(dcmha_groups=1, dcmha_rank=2, dcmha_hidden_dim=4 * H)
        for name, value in expected.items():
            actual = getattr(config, name) if name != "dcmha_hidden_dim" else (config.dcmha_hidden_dim or 4 * H)
            if actual != value:
                raise ValueError(f"{name}={actual} cannot be exported: the official code hard-codes {value}")
    pythia = config.backbone == "pythia"
    if not pythia and (config.parallel_residual or config.use_bias or config.rotary_pct != 1.0):
        raise ValueError("a 'llama' backbone exports as official DCFormer, which has no parallel residual, biases or "
                         f"partial rotary; got parallel_residual={config.parallel_residual}, "
                         f"use_bias={config.use_bias}, rotary_pct={config.rotary_pct}")
    window_size = window_type = None
    if config.window_size is not None:
        window_size = config.window_size - (1 if convention == "prefill" else 0)
        pattern = config.window_pattern
        reverse = {"LG": None, "LGLL": "LGLL", "LGLLLLLL": "LGL6"}
        if pattern not in reverse:
            raise ValueError(f"window_pattern={pattern!r} cannot be exported: the official code knows "
                             f"{sorted(reverse)} (or no local layers)")
        window_type = reverse[pattern]
        if window_type is not None and window_size != OFFICIAL_WINDOW:
            raise ValueError(f"window_pattern={pattern!r} with window_size={config.window_size} cannot be exported: "
                             f"the official code hard-codes {OFFICIAL_WINDOW} in that pattern")
    official: dict[str, Any] = {
        "model_type": "dcpythia" if pythia else "dcformer",
        "architectures": ["DCPythia" if pythia else "DCFormer"],
        "block_size": config.max_position_embeddings, "vocab_size": config.vocab_size,
        "n_layer": config.num_hidden_layers, "n_head": H, "n_local_heads": H, "dim": config.hidden_size,
        "head_dim": config.head_dim, "intermediate_size": config.intermediate_size, "rope_base": config.rope_theta,
        "norm_eps": config.norm_eps, "use_dcmha": kinds == {"dcmha"}, "use_qk_norm": config.qk_norm,
        "window_size": window_size, "window_type": window_type, "query_wise": False,
        "tie_word_embeddings": config.tie_word_embeddings, "is_training": False,
        "bos_token_id": getattr(config, "bos_token_id", None), "eos_token_id": getattr(config, "eos_token_id", None),
    }
    if pythia:
        official.update(rotary_pct=config.rotary_pct, use_parallel_residual=config.parallel_residual,
                        use_linear_bias=config.use_bias)
    else:
        official.update(mgate=config.mlp_gate_groups is not None, mgate_dim=config.mlp_gate_groups or 44)
    return official


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
            if config.dcmha_static != _is_identity(tensor):  # the file is consistent with the config
                return [(ours + f"attention.static.{sub.split('_')[0]}", tensor)] if config.dcmha_static else []
            raise ValueError(f"official tensor {name!r} is {'' if config.dcmha_static else 'not '}the identity while "
                             f"another layer's is {'not ' if config.dcmha_static else ''}: a static mix in some layers "
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


def _copy_tokenizer(src: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied


def _prepare_out(out: Path, src: Path) -> None:
    if out.resolve() == src.resolve():
        raise ValueError(f"output directory {out} is the source directory: choose another one")
    out.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in out.glob("*.safetensors")] + [p.name for p in out.glob("*.index.json")]
    if stale:
        raise ValueError(f"output directory {out} already holds weights ({stale[:3]}): choose an empty directory")


@contextlib.contextmanager
def _no_partial_output(out: Path) -> Iterator[None]:
    """On any failure, remove what the conversion wrote into ``out`` (all of ``out`` if it created it)."""
    existed = out.exists()
    before = set(out.iterdir()) if existed and out.is_dir() else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        elif out.is_dir():
            for path in set(out.iterdir()) - before:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


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
    with _no_partial_output(out):
        _prepare_out(out, src)
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
                        t = _cast(t, dtype)
                        writer.add(ours, t)
                        written[ours] = tuple(t.shape)
                        total += t.numel() * t.element_size()
                    bar.update(1)
        missing = sorted(set(expected) - set(written))
        if missing:
            raise ValueError(f"official checkpoint {src} lacks tensors for {missing[:5]} ({len(missing)} in all)")
        paths = writer.close()
        config.save_pretrained(out)
        copied = _copy_tokenizer(src, out)
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
    if config.dcmha_static and config.layer_attention(0) == "dcmha":
        warnings.warn("this model has a static head mix: the published official modules apply pre_proj.w/post_proj.w "
                      "only when built with use_sw=True", stacklevel=2)
    with _no_partial_output(out):
        _prepare_out(out, src)
        writer = ShardWriter(out, max_shard_bytes)
        pending: dict[str, dict[str, Tensor]] = {}
        total, count = 0, 0
        D, H = config.hidden_size, config.num_attention_heads

        def emit(name: str, t: Tensor) -> None:
            nonlocal total, count
            t = _cast(t, dtype)
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
            if config.layer_attention(i) == "mha" or not config.dcmha_static:
                emit(base + "pre_proj.w", eye.clone())
                emit(base + "post_proj.w", eye.clone())
        paths = writer.close()
        (out / "config.json").write_text(json.dumps(official, indent=2) + "\n")
        _copy_tokenizer(src, out)
        return ConversionReport(official, count, total, writer.peak_buffer_bytes, paths)
