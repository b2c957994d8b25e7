"""The official DCFormer / DCPythia ``config.json`` <-> :class:`~headmix.models.DCFormerConfig`, for
:mod:`headmix.convert.official`: what maps, what is ignored, and a clear error naming what cannot be expressed.
"""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_choice
from ..layers.rotary import DEFAULT_BASE
from ..models.configuration import DCFormerConfig

MODEL_TYPES = {"dcformer": "llama", "dcpythia": "pythia"}
OFFICIAL_WINDOW = 256  # the official code hard-codes 256 in its named window patterns
WINDOW_TYPES = {None: "LG", "LG": "LG", "LGLL": "LGLL", "LGL6": "LGLLLLLL"}
WINDOW_CONVENTIONS = ("decode", "prefill")
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
        qk_norm=bool(get("use_qk_norm", False)), rope_theta=float(get("rope_base", DEFAULT_BASE)), rotary_pct=rotary_pct,
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
        with torch.device("meta"):
            layer = config.build_attention(0)
        for name, option, value in (("dcmha_groups", "groups", 1), ("dcmha_rank", "rank", 2),
                                    ("dcmha_hidden_dim", "hidden_dim", 4 * H)):
            if getattr(layer, option) != value:
                raise ValueError(f"{name}={getattr(layer, option)} cannot be exported: the official code hard-codes "
                                 f"{value} (attention option {option!r})")
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


