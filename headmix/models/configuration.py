"""``DCFormerConfig``: one configuration for the whole decoder family, validated when built.

Transformer++ (LLaMA-style), DCFormer, DCFormer++ and Pythia / DCPythia are all this config with
different fields; presets give the paper's shapes.

The attention layers own their options (:mod:`headmix.layers`): the config names the kind of each layer
(``attention``) and records only the options a user overrode (``attention_options``, e.g. ``{"rank": 4}``);
every default stays in the layer class. Parameter counts and FLOPs are asked of the layers.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch
from transformers import PretrainedConfig

from .._validation import check_choice, check_divisible, check_positive_int
from ..layers import ATTENTION_LAYERS, Attention
from ..layers.rotary import DEFAULT_BASE

ATTENTION_KINDS = tuple(ATTENTION_LAYERS)  # the built-in kinds; register_attention adds more
BACKBONES = ("llama", "pythia")
MODEL_TYPE = "headmix_dcformer"

#: Fields of configs written before the layers owned their options -> the layer option each one set. Old
#: ``config.json`` files (ours and the official converter's) and calls such as ``DCFormerConfig(dcmha_rank=4)``
#: still work: a value other than the layer's default becomes an ``attention_options`` entry.
LEGACY_OPTIONS = {
    "dcmha_rank": "rank", "dcmha_groups": "groups", "dcmha_hidden_dim": "hidden_dim", "dcmha_init": "init",
    "dcmha_static": "static", "attention_backend": "backend", "attention_chunk_size": "chunk_size",
    "collaborative_key_dim": "key_dim",
}


def attention_option_defaults() -> dict[str, Any]:
    """Every attention option of the registered layer kinds with its default (the first kind that has it)."""
    defaults: dict[str, Any] = {}
    for layer_class in ATTENTION_LAYERS.values():
        for name, value in layer_class.option_defaults().items():
            if name not in layer_class.MODEL_OPTIONS:
                defaults.setdefault(name, value)
    return defaults


#: The ``model_type`` of checkpoints headmix converts -> the command that does it (for the message of a config
#: that is not ours). The Llama family is :mod:`headmix.convert.llama`'s, the official format :mod:`...official`'s.
FOREIGN_MODEL_TYPES = {
    **{kind: "headmix convert upcycle SRC_DIR OUT_DIR" for kind in ("llama", "mistral", "qwen2", "gpt_neox")},
    **{kind: "headmix convert official SRC_DIR OUT_DIR" for kind in ("dcformer", "dcpythia")},
}


def foreign_config_message(model_type: Any, where: str = "the config") -> str:
    """What a config of another ``model_type`` is, and which command turns it into a headmix model."""
    command = FOREIGN_MODEL_TYPES.get(model_type)
    how = (f"convert it with `{command}`" if command else
           f"headmix converts {sorted(FOREIGN_MODEL_TYPES)} checkpoints (`headmix convert --help`)")
    return f"{where} is a {model_type!r} model, not a headmix model ({MODEL_TYPE!r}): {how}"


def _general_fields() -> frozenset[str]:
    """The fields any Hugging Face config may carry besides ours (saved by ``save_pretrained``, passed by
    ``from_pretrained``, generation defaults of old files, ids of special tokens) and those our converters add."""
    import inspect

    from transformers import GenerationConfig

    fields = set(inspect.signature(PretrainedConfig.__init__).parameters) - {"self", "kwargs"}
    fields |= set(GenerationConfig._get_default_generation_params())
    fields |= {"model_type", "transformers_version", "torch_dtype", "name_or_path", "_name_or_path", "_commit_hash",
               "output_attentions", "attn_implementation", "experts_implementation", "num_labels", "use_cache",
               "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
               "tokenizer_class", "auto_map", "official_window_convention"}
    return frozenset(fields | set(LEGACY_OPTIONS))


def _multiple_of(value: float, multiple: int) -> int:
    return multiple * -(-int(value) // multiple)


def _swiglu_width(dim: int) -> int:
    """LLaMA's SwiGLU width: 8/3 of the model width, rounded up to a multiple of 256."""
    return _multiple_of(8 * dim / 3, 256)


# (layers, dim, heads) of the paper's model sizes. Transformer++/DCFormer++: the DCFormer paper's
# scaling table as we recall it (its head count at 1.4B could not be confirmed offline; we use
# Pythia-1.4B's 16); Pythia: Biderman et al. (2023), Table 1. Parameter counts are computed, never typed.
_LLAMA_SHAPES = {"405m": (24, 1024, 16), "834m": (24, 1536, 24), "1.4b": (24, 2048, 16), "2.8b": (32, 2560, 32),
                 "6.9b": (32, 4096, 32)}
_PYTHIA_SHAPES = {"70m": (6, 512, 8), "160m": (12, 768, 12), "410m": (24, 1024, 16), "1b": (16, 2048, 8),
                  "1.4b": (24, 2048, 16), "2.8b": (32, 2560, 32), "6.9b": (32, 4096, 32)}
PILE_VOCAB = 50304  # GPT-NeoX tokenizer (50277 tokens) padded to a multiple of 128, as in Pythia

#: Where the released configurations are: the authors' repository and the commit read.
RELEASE_REPOSITORY = "https://github.com/Caiyun-AI/DCFormer/tree/df8671f23b4830cb3a254c23e5576d45141cfbd6"
#: Presets that are a released configuration -> the file of :data:`RELEASE_REPOSITORY` they copy (the rest are
#: ours: the release's recipe at the paper's other sizes, or small shapes for tests and demos).
RELEASED_PRESETS = {
    "transformer++-405m": "jax/MaxText/configs/transformer_pp_405m.yml",
    "dcformer++-405m": "jax/MaxText/configs/dcformer_pp_405m.yml",
    "dcformer++-2.8b": "jax/MaxText/configs/dcformer_pp_2b8.yml",  # the recipe of the DCFormer-2.8B checkpoint
    "dcpythia-6.9b": "pytorch/dcpythia/config.json",  # the DCPythia-6.9B checkpoint's config
}
# The official JAX recipe (405M and 2.8B alike): vocab 50256, RMSNorm eps 1e-5, every linear and embedding
# weight ~ N(0, 0.006^2), DCMHA without the static mix (static_proj: False), a 256-token window in every other
# layer (window_size: [256, null]); QK-norm at 405M only ("405m use true, but 2b8 model use false").
_RELEASE_LLAMA = dict(vocab_size=50256, norm_eps=1e-5, initializer_range=0.006)
_NO_STATIC = dict(attention="dcmha", attention_options={"static": False})
_LOCAL_GLOBAL = dict(window_size=256, window_pattern="LG")


def _preset_fields() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {}
    for size, (layers, dim, heads) in _LLAMA_SHAPES.items():
        base = dict(backbone="llama", num_hidden_layers=layers, hidden_size=dim, num_attention_heads=heads,
                    intermediate_size=_swiglu_width(dim), max_position_embeddings=2048, **_RELEASE_LLAMA)
        presets[f"transformer++-{size}"] = dict(base, attention="mha")
        presets[f"dcformer-{size}"] = dict(base, **_NO_STATIC)
        presets[f"dcformer++-{size}"] = dict(base, **_NO_STATIC, **_LOCAL_GLOBAL, qk_norm=size != "2.8b")
    for size, (layers, dim, heads) in _PYTHIA_SHAPES.items():
        base = dict(backbone="pythia", num_hidden_layers=layers, hidden_size=dim, num_attention_heads=heads,
                    intermediate_size=4 * dim, vocab_size=PILE_VOCAB, max_position_embeddings=2048)
        presets[f"pythia-{size}"] = dict(base, attention="mha")
        # DCPythia-6.9B's attention (a 256 window in every other layer, QK-norm, no static mix) at each Pythia shape
        presets[f"dcpythia-{size}"] = dict(base, **_NO_STATIC, **_LOCAL_GLOBAL, qk_norm=True)
    presets["dcpythia-6.9b"]["vocab_size"] = 50257  # the released checkpoint's embedding rows
    tiny = dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, vocab_size=4096,
                max_position_embeddings=512)
    presets["tiny-transformer++"] = dict(tiny, backbone="llama", attention="mha", intermediate_size=_swiglu_width(128))
    presets["tiny-dcformer"] = dict(tiny, backbone="llama", attention="dcmha", intermediate_size=_swiglu_width(128))
    presets["tiny-dcformer++"] = dict(presets["tiny-dcformer"], qk_norm=True, window_size=32, window_pattern="LLLG")
    presets["tiny-pythia"] = dict(tiny, backbone="pythia", attention="mha", intermediate_size=512)
    presets["tiny-dcpythia"] = dict(tiny, backbone="pythia", attention="dcmha", intermediate_size=512)
    presets["125m-transformer++"] = dict(backbone="llama", attention="mha", num_hidden_layers=12, hidden_size=768,
                                         num_attention_heads=12, intermediate_size=_swiglu_width(768),
                                         vocab_size=PILE_VOCAB, max_position_embeddings=2048,
                                         tie_word_embeddings=True)  # GPT-3 "125M" counts tied embeddings
    presets["125m-dcformer++"] = dict(presets["125m-transformer++"], attention="dcmha", qk_norm=True,
                                      **_LOCAL_GLOBAL)
    return presets


PRESETS = _preset_fields()


def _attention_options(given: dict[str, Any] | None, fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``attention_options`` from the given dict and the legacy fields popped from ``fields``; a legacy value
    equal to the layers' default is dropped (old files wrote every field). Also returns option -> old name."""
    options = dict(given or {})
    defaults = attention_option_defaults()
    legacy_names: dict[str, str] = {}
    for old, option in LEGACY_OPTIONS.items():
        if old not in fields:
            continue
        value = fields.pop(old)
        if option in options or value == defaults[option]:
            continue
        options[option] = value
        legacy_names[option] = old
    return options, legacy_names


class DCFormerConfig(PretrainedConfig):
    """Configuration of the headmix decoder family (Transformer++, DCFormer, DCFormer++, Pythia, DCPythia).

    Args:
        vocab_size: number of tokens.
        hidden_size: model width ``D``.
        num_hidden_layers: number of decoder blocks.
        num_attention_heads: heads per attention layer.
        num_key_value_heads: key/value heads of every attention layer (grouped-query attention; ``None``: as
            ``num_attention_heads``); must divide ``num_attention_heads``.
        intermediate_size: MLP width (SwiGLU for ``llama``, GELU for ``pythia``).
        backbone: ``"llama"`` (Transformer++: pre-RMSNorm, SwiGLU, no biases, full rotary) or
            ``"pythia"`` (GPT-NeoX: LayerNorm, parallel residual, GELU MLP, biases, partial rotary).
        attention: attention kind of every layer, or a list with one kind per layer; kinds are
            ``"mha"``, ``"talking_heads"``, ``"dcmha"``, ``"collaborative"``.
        window_size: sliding-window size of local layers (a query sees itself and ``window_size - 1``
            earlier tokens), or ``None`` for no local layers.
        window_pattern: repeating pattern of ``"L"`` (local) and ``"G"`` (global) layers, e.g.
            ``"LG"`` or ``"LLLG"``; ``None`` with a ``window_size`` means every layer is local.
        qk_norm: RMS-normalise queries and keys per head (DCFormer++).
        attention_options: the attention layers' options that differ from their defaults, e.g.
            ``{"rank": 4, "groups": 2}`` (:class:`headmix.DCMHA`), ``{"key_dim": 64}``
            (:class:`headmix.CollaborativeAttention`), ``{"backend": "chunked"}``; each layer takes the
            options it has. The fields of older configs (``dcmha_rank``, ``attention_backend``, ...:
            :data:`LEGACY_OPTIONS`) are still accepted and land here.
        rope_theta: rotary frequency base.
        rotary_pct: share of each head's channels that rotate (default 1.0 for ``llama``, 0.25 for ``pythia``).
        parallel_residual, use_bias, tie_word_embeddings: default from the backbone.
        attention_bias: biases of the attention projections: ``None`` (as ``use_bias``), ``True`` (query, key,
            value and output), ``False`` (none) or ``"qkv"`` (query, key and value only: Qwen2).
        norm_eps: epsilon of the normalisation layers.
        mlp_gate_groups: ``E``, or ``None``: split the SwiGLU hidden units into ``E`` groups, each scaled by
            a softmax gate over groups computed from the input (the official code's ``mgate``; ``llama`` only).
        initializer_range: std of the normal initialisation of linear and embedding weights.
        use_cache: whether ``forward`` makes and returns a decoding cache when not told (``use_cache=None``).
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 2048,
        backbone: str = "llama",
        attention: str | list[str] = "mha",
        window_size: int | None = None,
        window_pattern: str | None = None,
        qk_norm: bool = False,
        attention_options: dict[str, Any] | None = None,
        rope_theta: float = DEFAULT_BASE,
        rotary_pct: float | None = None,
        parallel_residual: bool | None = None,
        use_bias: bool | None = None,
        attention_bias: bool | str | None = None,
        norm_eps: float | None = None,
        mlp_gate_groups: int | None = None,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        model_type = kwargs.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(foreign_config_message(model_type))
        self._check_field_names(kwargs)
        check_choice("backbone", backbone, BACKBONES)
        pythia = backbone == "pythia"
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.intermediate_size = intermediate_size if intermediate_size is not None else (
            4 * hidden_size if pythia else _swiglu_width(hidden_size))
        self.max_position_embeddings = max_position_embeddings
        self.backbone = backbone
        self.attention = attention
        self.window_size = window_size
        self.window_pattern = window_pattern
        self.qk_norm = qk_norm
        self.attention_options, legacy_names = _attention_options(attention_options, kwargs)
        self.rope_theta = rope_theta
        self.rotary_pct = rotary_pct if rotary_pct is not None else (0.25 if pythia else 1.0)
        self.parallel_residual = parallel_residual if parallel_residual is not None else pythia
        self.use_bias = use_bias if use_bias is not None else pythia
        self.attention_bias = attention_bias
        self.norm_eps = norm_eps if norm_eps is not None else (1e-5 if pythia else 1e-6)
        self.mlp_gate_groups = mlp_gate_groups
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        tie = tie_word_embeddings if tie_word_embeddings is not None else False
        super().__init__(tie_word_embeddings=tie, **kwargs)
        self.validate_fields(legacy_names)

    # -- validation ------------------------------------------------------------------------------
    @classmethod
    def _check_field_names(cls, extra: dict[str, Any]) -> None:
        """Refuse a keyword that is neither a field of ours nor a general Hugging Face one, naming the nearest
        field (a misspelt field would otherwise be stored and silently ignored)."""
        import inspect

        ours = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(extra) - _general_fields())
        if unknown:
            name = unknown[0]
            if name in attention_option_defaults():
                raise ValueError(f"{name!r} is an attention layer option, not a DCFormerConfig field: pass "
                                 f"attention_options={{{name!r}: {extra[name]!r}}}")
            near = difflib.get_close_matches(name, sorted(ours | set(attention_option_defaults())), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"DCFormerConfig has no field {name!r}: {hint}the fields are {sorted(ours)} "
                             "(attention layer options go in attention_options)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> DCFormerConfig:
        """``PretrainedConfig.from_pretrained``, refusing a directory of another model (a Llama's, say) with what it
        is and the command that converts it."""
        where = ("cache_dir", "local_files_only", "revision", "subfolder", "token")
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path,
                                             **{k: v for k, v in kwargs.items() if k in where})
        model_type = config_dict.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(foreign_config_message(model_type, str(pretrained_model_name_or_path)))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def validate_fields(self, legacy_names: dict[str, str] | None = None) -> None:
        """Raise ``ValueError`` naming the first bad field, its value and what is allowed (an attention
        option under the name it was given, ``legacy_names``: option -> old field name)."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings"):
            check_positive_int(name, getattr(self, name))
        check_divisible("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        check_divisible("num_attention_heads", self.num_attention_heads, "num_key_value_heads",
                        self.num_key_value_heads)
        kinds = self.attention if isinstance(self.attention, (list, tuple)) else [self.attention]
        for kind in kinds:
            check_choice("attention", kind, tuple(ATTENTION_LAYERS))
        if isinstance(self.attention, (list, tuple)) and len(self.attention) != self.num_hidden_layers:
            raise ValueError(
                f"attention has {len(self.attention)} entries: expected one kind per layer "
                f"(num_hidden_layers={self.num_hidden_layers}) or a single kind"
            )
        if self.window_size is not None:
            check_positive_int("window_size", self.window_size)
        if self.window_pattern is not None:
            if not isinstance(self.window_pattern, str) or not self.window_pattern or set(self.window_pattern) - {"L", "G"}:
                raise ValueError(
                    f"window_pattern={self.window_pattern!r} is not allowed: expected a non-empty string of "
                    "'L' (local) and 'G' (global), e.g. 'LG' or 'LLLG'"
                )
            if self.window_size is None and "L" in self.window_pattern:
                raise ValueError(f"window_pattern={self.window_pattern!r} has local layers but window_size=None: set window_size")
        if self.attention_bias not in (None, True, False, "qkv"):
            raise ValueError(f"attention_bias={self.attention_bias!r} is not allowed: expected None (as use_bias), "
                             "True, False or 'qkv' (query, key and value projections only)")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct={self.rotary_pct!r} is not allowed: expected 0 < rotary_pct <= 1")
        self._validate_attention_options(set(kinds), legacy_names or {})
        if self.mlp_gate_groups is not None:
            check_positive_int("mlp_gate_groups", self.mlp_gate_groups)
            if self.backbone != "llama":
                raise ValueError(f"mlp_gate_groups={self.mlp_gate_groups} needs backbone='llama' (a gated SwiGLU); "
                                 f"backbone is {self.backbone!r}")
            check_divisible("intermediate_size", self.intermediate_size, "mlp_gate_groups", self.mlp_gate_groups)

    def _validate_attention_options(self, kinds: set[str], legacy_names: dict[str, str]) -> None:
        """Every option is some layer's; every layer kind that is used or takes a given option builds (on the
        meta device: no memory) with them, so its own checks run now, not when the model is built."""
        known = attention_option_defaults()
        if not isinstance(self.attention_options, dict):
            raise ValueError(f"attention_options={self.attention_options!r} is not allowed: expected a dict of "
                             f"layer options, e.g. {{'rank': 4}}")
        for name in self.attention_options:
            if name not in known:
                near = difflib.get_close_matches(name, list(known), n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise ValueError(f"attention_options has {name!r}, which no attention layer takes: {hint}"
                                 f"the options are {sorted(known)}")
        for kind, layer_class in ATTENTION_LAYERS.items():
            takes = set(layer_class.attention_option_names())
            if kind not in kinds and not takes & set(self.attention_options):
                continue
            try:
                with torch.device("meta"):
                    self._build(layer_class, window=None)
            except ValueError as error:
                message = str(error)
                for option, old in legacy_names.items():
                    if message.startswith(f"{option}="):
                        message = old + message[len(option):]
                raise ValueError(f"{message} (attention options of {kind!r} layers: "
                                 f"{self.attention_options})") from None

    # -- derived -----------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def attention_option(self, name: str) -> Any:
        """The value of attention option ``name``: the override in ``attention_options``, else the layer's default."""
        defaults = attention_option_defaults()
        check_choice("attention option", name, tuple(defaults))
        return self.attention_options.get(name, defaults[name])

    def _build(self, layer_class: type[Attention], window: int | None) -> Attention:
        bias = self.use_bias if self.attention_bias is None else bool(self.attention_bias)
        model = dict(num_key_value_heads=self.num_key_value_heads, causal=True, window=window, bias=bias,
                     out_bias=bias and self.attention_bias != "qkv", rotary=True, rotary_base=self.rope_theta,
                     rotary_fraction=self.rotary_pct)
        if layer_class.supports_qk_norm:
            model["qk_norm"] = self.qk_norm
        takes = layer_class.attention_option_names()
        options = {name: value for name, value in self.attention_options.items() if name in takes}
        return layer_class(self.hidden_size, self.num_attention_heads, **model, **options)

    def build_attention(self, index: int) -> Attention:
        """The attention layer of block ``index``: its kind's class from :data:`headmix.layers.ATTENTION_LAYERS`,
        the model's mask, bias and rotary fields, and the ``attention_options`` that class takes."""
        return self._build(ATTENTION_LAYERS[self.layer_attention(index)], self.layer_window(index))

    def layer_attention(self, index: int) -> str:
        """Attention kind of layer ``index``."""
        return self.attention[index] if isinstance(self.attention, (list, tuple)) else self.attention

    def layer_window(self, index: int) -> int | None:
        """Sliding-window size of layer ``index`` (``None``: global)."""
        if self.window_size is None:
            return None
        if self.window_pattern is None:
            return self.window_size
        return self.window_size if self.window_pattern[index % len(self.window_pattern)] == "L" else None

    def _layer_kinds(self) -> dict[str, Any]:
        """One decoder block per attention kind used, built on the meta device (no memory): what counts ask."""
        from .modeling import DecoderLayer

        blocks: dict[str, Any] = {}
        with torch.device("meta"):
            for i in range(self.num_hidden_layers):
                kind = self.layer_attention(i)
                if kind not in blocks:
                    blocks[kind] = DecoderLayer(self, i)
        return blocks

    def attention_parameters(self, index: int) -> int:
        """Parameter count of layer ``index``'s attention, asked of the layer (built on the meta device)."""
        with torch.device("meta"):
            return self.build_attention(index).num_parameters()

    def num_parameters(self) -> int:
        """Parameter count of :class:`DCFormerForCausalLM` with this config: the blocks' counts asked of one
        block per attention kind built on the meta device (no memory), plus embeddings, final norm and head."""
        blocks = self._layer_kinds()
        total = sum(blocks[self.layer_attention(i)].num_parameters() for i in range(self.num_hidden_layers))
        final_norm = next(iter(blocks.values())).mlp_norm
        embeddings = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embeddings
        return embeddings + total + sum(p.numel() for p in final_norm.parameters()) + head

    def keys_per_query(self, index: int, seq_len: int, causal: bool = True) -> float:
        """Mean number of keys a query of a ``seq_len``-token sequence attends to in layer ``index``."""
        check_positive_int("seq_len", seq_len)
        if not causal:
            return float(seq_len)
        w = self.layer_window(index)
        if w is None or w >= seq_len:
            return (seq_len + 1) / 2
        return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len

    def flops_per_token(self, seq_len: int, training: bool = True, causal: bool = True) -> float:
        """Model FLOPs per token of a ``seq_len``-token sequence (2 per multiply-add; training = 3 x forward).

        Asked of the layers: per token and block, each attention layer's
        :meth:`~headmix.layers.Attention.flops_per_token` (its weight matrices once) and the MLP's, plus
        :meth:`~headmix.layers.Attention.flops_per_pair` times the keys each query sees (the causal mask
        and the layer's window, :meth:`keys_per_query`); and the output head ``2 * hidden * vocab``.
        Not counted: the embedding lookup, norms, softmax, rotary, biases.
        """
        blocks = self._layer_kinds()
        total = 2.0 * self.hidden_size * self.vocab_size  # output head
        for i in range(self.num_hidden_layers):
            total += blocks[self.layer_attention(i)].flops_per_token(self.keys_per_query(i, seq_len, causal))
        return total * (3 if training else 1)

    # -- presets -----------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DCFormerConfig:
        """A config with the shapes of a named preset (see :data:`PRESETS`), with optional field overrides.

        The table of presets, with parameter counts computed from the config, is appended to this
        docstring when headmix is imported (``help(DCFormerConfig.from_preset)``).
        """
        check_choice("preset", name, tuple(PRESETS))
        return cls(**{**PRESETS[name], **overrides})


def preset_table() -> str:
    """Markdown table of every preset: layers, dim, heads, attention, window, computed parameters, QK-norm, vocab,
    and whose shape it is: a released DCFormer configuration (:data:`RELEASED_PRESETS`, read at
    :data:`RELEASE_REPOSITORY`), Pythia's, or ours."""
    lines = ["| preset | layers | dim | heads | attention | local window | parameters | QK-norm | vocab | shape |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in PRESETS:
        c = DCFormerConfig.from_preset(name)
        window = f"{c.window_size} ({c.window_pattern})" if c.window_size else "-"
        origin = (f"released (`{RELEASED_PRESETS[name]}`)" if name in RELEASED_PRESETS
                  else "Pythia's" if name.startswith("pythia-") else "ours")
        lines.append(f"| {name} | {c.num_hidden_layers} | {c.hidden_size} | {c.num_attention_heads} | "
                     f"{c.attention} | {window} | {c.num_parameters() / 1e6:,.1f}M | {'yes' if c.qk_norm else 'no'} | "
                     f"{c.vocab_size} | {origin} |")
    return "\n".join(lines)


DCFormerConfig.from_preset.__func__.__doc__ += "\n" + preset_table().replace("\n", "\n        ") + "\n"
