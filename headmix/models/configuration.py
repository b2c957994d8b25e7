"""``DCFormerConfig``: one configuration for the whole decoder family, validated when built.

Transformer++ (LLaMA-style), DCFormer, DCFormer++ and Pythia / DCPythia are all this config with
different fields; presets give the paper's shapes.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .._validation import check_choice, check_divisible, check_positive_int

ATTENTION_KINDS = ("mha", "talking_heads", "dcmha", "collaborative")
BACKBONES = ("llama", "pythia")
MODEL_TYPE = "headmix_dcformer"


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


def _preset_fields() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {}
    dcformer_pp = dict(attention="dcmha", qk_norm=True, window_size=256, window_pattern="LG")
    for size, (layers, dim, heads) in _LLAMA_SHAPES.items():
        base = dict(backbone="llama", num_hidden_layers=layers, hidden_size=dim, num_attention_heads=heads,
                    intermediate_size=_swiglu_width(dim), vocab_size=PILE_VOCAB, max_position_embeddings=2048)
        presets[f"transformer++-{size}"] = dict(base, attention="mha")
        presets[f"dcformer-{size}"] = dict(base, attention="dcmha")
        presets[f"dcformer++-{size}"] = dict(base, **dcformer_pp)
    for size, (layers, dim, heads) in _PYTHIA_SHAPES.items():
        base = dict(backbone="pythia", num_hidden_layers=layers, hidden_size=dim, num_attention_heads=heads,
                    intermediate_size=4 * dim, vocab_size=PILE_VOCAB, max_position_embeddings=2048)
        presets[f"pythia-{size}"] = dict(base, attention="mha")
        presets[f"dcpythia-{size}"] = dict(base, attention="dcmha")
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
    presets["125m-dcformer++"] = dict(presets["125m-transformer++"], **dcformer_pp)
    return presets


PRESETS = _preset_fields()


class DCFormerConfig(PretrainedConfig):
    """Configuration of the headmix decoder family (Transformer++, DCFormer, DCFormer++, Pythia, DCPythia).

    Args:
        vocab_size: number of tokens.
        hidden_size: model width ``D``.
        num_hidden_layers: number of decoder blocks.
        num_attention_heads: heads per attention layer.
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
        rope_theta: rotary frequency base.
        rotary_pct: share of each head's channels that rotate (default 1.0 for ``llama``, 0.25 for ``pythia``).
        parallel_residual, use_bias, tie_word_embeddings: default from the backbone.
        norm_eps: epsilon of the normalisation layers.
        dcmha_rank, dcmha_groups, dcmha_hidden_dim, dcmha_init: DCMHA options (see :class:`headmix.DCMHA`).
        dcmha_static: learn the static ``W_b`` head mix of DCMHA (the released official checkpoints did not).
        mlp_gate_groups: ``E``, or ``None``: split the SwiGLU hidden units into ``E`` groups, each scaled by
            a softmax gate over groups computed from the input (the official code's ``mgate``; ``llama`` only).
        attention_backend, attention_chunk_size: backend of composed attention (``"auto"``, ``"reference"``, ``"chunked"``).
        collaborative_key_dim: shared key size of collaborative layers (default: hidden_size).
        initializer_range: std of the normal initialisation of linear and embedding weights.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 2048,
        backbone: str = "llama",
        attention: str | list[str] = "mha",
        window_size: int | None = None,
        window_pattern: str | None = None,
        qk_norm: bool = False,
        rope_theta: float = 10000.0,
        rotary_pct: float | None = None,
        parallel_residual: bool | None = None,
        use_bias: bool | None = None,
        norm_eps: float | None = None,
        dcmha_rank: int = 2,
        dcmha_groups: int = 1,
        dcmha_hidden_dim: int | None = None,
        dcmha_init: str = "identity",
        dcmha_static: bool = True,
        mlp_gate_groups: int | None = None,
        attention_backend: str = "auto",
        attention_chunk_size: int = 128,
        collaborative_key_dim: int | None = None,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool | None = None,
        **kwargs: Any,
    ) -> None:
        check_choice("backbone", backbone, BACKBONES)
        pythia = backbone == "pythia"
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size if intermediate_size is not None else (
            4 * hidden_size if pythia else _swiglu_width(hidden_size))
        self.max_position_embeddings = max_position_embeddings
        self.backbone = backbone
        self.attention = attention
        self.window_size = window_size
        self.window_pattern = window_pattern
        self.qk_norm = qk_norm
        self.rope_theta = rope_theta
        self.rotary_pct = rotary_pct if rotary_pct is not None else (0.25 if pythia else 1.0)
        self.parallel_residual = parallel_residual if parallel_residual is not None else pythia
        self.use_bias = use_bias if use_bias is not None else pythia
        self.norm_eps = norm_eps if norm_eps is not None else (1e-5 if pythia else 1e-6)
        self.dcmha_rank = dcmha_rank
        self.dcmha_groups = dcmha_groups
        self.dcmha_hidden_dim = dcmha_hidden_dim
        self.dcmha_init = dcmha_init
        self.dcmha_static = dcmha_static
        self.mlp_gate_groups = mlp_gate_groups
        self.attention_backend = attention_backend
        self.attention_chunk_size = attention_chunk_size
        self.collaborative_key_dim = collaborative_key_dim
        self.initializer_range = initializer_range
        tie = tie_word_embeddings if tie_word_embeddings is not None else False
        super().__init__(tie_word_embeddings=tie, **kwargs)
        self.validate_fields()

    # -- validation ------------------------------------------------------------------------------
    def validate_fields(self) -> None:
        """Raise ``ValueError`` naming the first bad field, its value and what is allowed."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "dcmha_rank", "dcmha_groups", "attention_chunk_size"):
            check_positive_int(name, getattr(self, name))
        check_divisible("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        check_divisible("num_attention_heads", self.num_attention_heads, "dcmha_groups", self.dcmha_groups)
        kinds = self.attention if isinstance(self.attention, (list, tuple)) else [self.attention]
        for kind in kinds:
            check_choice("attention", kind, ATTENTION_KINDS)
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
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct={self.rotary_pct!r} is not allowed: expected 0 < rotary_pct <= 1")
        check_choice("dcmha_init", self.dcmha_init, ("identity", "paper"))
        from ..ops import available_backends

        check_choice("attention_backend", self.attention_backend, available_backends())
        if self.collaborative_key_dim is not None:
            check_positive_int("collaborative_key_dim", self.collaborative_key_dim)
        if self.mlp_gate_groups is not None:
            check_positive_int("mlp_gate_groups", self.mlp_gate_groups)
            if self.backbone != "llama":
                raise ValueError(f"mlp_gate_groups={self.mlp_gate_groups} needs backbone='llama' (a gated SwiGLU); "
                                 f"backbone is {self.backbone!r}")
            check_divisible("intermediate_size", self.intermediate_size, "mlp_gate_groups", self.mlp_gate_groups)

    # -- derived -----------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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

    def attention_parameters(self, index: int) -> int:
        """Closed-form parameter count of layer ``index``'s attention (the formulas of the layer docstrings)."""
        D, H, kind = self.hidden_size, self.num_attention_heads, self.layer_attention(index)
        bias = 4 * D if self.use_bias else 0
        qk_norm = 2 * self.head_dim if self.qk_norm else 0
        if kind == "mha":
            return 4 * D * D + bias + qk_norm
        if kind == "talking_heads":
            return 4 * D * D + 2 * H * H + bias + qk_norm
        if kind == "collaborative":
            Dk = self.collaborative_key_dim or D
            return 2 * D * Dk + H * Dk + 2 * D * D + ((2 * Dk + 2 * D) if self.use_bias else 0)
        G = self.dcmha_groups
        M = H // G
        K = self.dcmha_hidden_dim or 4 * M
        R = self.dcmha_rank
        C, Cg, P = 4, 4, 2  # all terms on, pre and post
        static = P * G * M * M if self.dcmha_static else 0
        return 4 * D * D + D * G * C * K + G * C * K * 2 * R * M + D * G * Cg * M + static + bias + qk_norm

    def num_parameters(self) -> int:
        """Closed-form parameter count of :class:`DCFormerForCausalLM` with this config (no model is built)."""
        D, F, V = self.hidden_size, self.intermediate_size, self.vocab_size
        norm = 2 * D if self.backbone == "pythia" else D
        if self.backbone == "pythia":
            mlp = 2 * D * F + ((F + D) if self.use_bias else 0)
        else:
            mlp = 3 * D * F + ((2 * F + D) if self.use_bias else 0) + D * (self.mlp_gate_groups or 0)
        blocks = sum(self.attention_parameters(i) + mlp + 2 * norm for i in range(self.num_hidden_layers))
        return V * D + blocks + norm + (0 if self.tie_word_embeddings else V * D)

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

        Counted, per token and layer: every weight matrix once (q/k/v/out projections, MLP, DCMHA's
        dynamic-weight projections ``hidden``/``factors``/``gates``) and the output head
        (``2 * matrix parameters``); per (query, key) pair the attention products ``QK^T`` and
        ``PV`` (``4 * heads * head_dim``; collaborative: ``2 * heads * key_dim + 2 * hidden``) and the
        composition: talking-heads ``2 * 2 H^2``; DCMHA per pre/post side ``2 H M`` (static, ``M``
        heads per group), ``8 H R`` (query- and key-wise rank-``R`` terms, project and expand) and
        ``4 H`` (two gates). Keys per query follow the causal mask and each layer's window
        (:meth:`keys_per_query`). Not counted: the embedding lookup, norms, softmax, rotary, biases.
        """
        D, F, V, H = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_attention_heads
        mlp = (2 if self.backbone == "pythia" else 3) * D * F
        total = 2.0 * D * V  # output head
        for i in range(self.num_hidden_layers):
            kind = self.layer_attention(i)
            pairs = self.keys_per_query(i, seq_len, causal)
            if kind == "collaborative":
                Dk = self.collaborative_key_dim or D
                total += 2.0 * (2 * D * Dk + 2 * D * D + mlp) + pairs * (2 * H * Dk + 2 * D)
                continue
            weights = 4 * D * D + mlp
            per_pair = 4 * D
            if kind == "talking_heads":
                per_pair += 2 * 2 * H * H
            elif kind == "dcmha":
                G, R = self.dcmha_groups, self.dcmha_rank
                M = H // G
                K = self.dcmha_hidden_dim or 4 * M
                weights += D * G * 4 * K + G * 4 * K * 2 * R * M + D * G * 4 * M
                per_pair += 2 * ((2 * H * M if self.dcmha_static else 0) + 8 * H * R + 4 * H)
            total += 2.0 * weights + pairs * per_pair
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
    """Markdown table of every preset: layers, dim, heads, attention, window, computed parameters."""
    lines = ["| preset | layers | dim | heads | attention | local window | parameters |", "|---|---|---|---|---|---|---|"]
    for name in PRESETS:
        c = DCFormerConfig.from_preset(name)
        window = f"{c.window_size} ({c.window_pattern})" if c.window_size else "-"
        lines.append(f"| {name} | {c.num_hidden_layers} | {c.hidden_size} | {c.num_attention_heads} | "
                     f"{c.attention} | {window} | {c.num_parameters() / 1e6:,.1f}M |")
    return "\n".join(lines)


DCFormerConfig.from_preset.__func__.__doc__ += "\n" + preset_table().replace("\n", "\n        ") + "\n"
