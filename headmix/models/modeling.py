"""The decoder family as Hugging Face models: Transformer++, DCFormer(++), Pythia and DCPythia.

One block, two backbones (selected by ``config.backbone``) and a pluggable attention per layer
(``config.attention``)::

    llama  (Transformer++):  h = x + Attn(RMSNorm(x));  out = h + SwiGLU(RMSNorm(h))
    pythia (GPT-NeoX):       out = x + Attn(LayerNorm1(x)) + GeluMLP(LayerNorm2(x))   (parallel residual)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..layers import DCMHA, CollaborativeAttention, DynamicWeightProjection, MultiHeadAttention, TalkingHeadsAttention
from ..layers.base import Attention
from ..layers.collaborative import block_mixing
from .cache import HeadmixCache, LayerCache
from .checkpoint import verify_checkpoint
from .configuration import DCFormerConfig

# The name under which transformers passes the decoding cache to a model and returns it in outputs:
# ``cache`` from transformers 5.24 on, ``past_key_values`` before. 5.24 still accepts the old name but logs a
# deprecation warning for each use (on every forward that builds an output), so the models speak the
# installed version's name; their ``forward`` and ``prepare_inputs_for_generation`` accept both names.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(cache: HeadmixCache | None, past_key_values: HeadmixCache | None) -> HeadmixCache | None:
    """The cache given as ``cache`` (current name) or ``past_key_values`` (the name before transformers 5.24)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("got both cache and past_key_values: pass the HeadmixCache once, as cache")
    return cache if cache is not None else past_key_values


def build_attention(config: DCFormerConfig, index: int) -> Attention:
    """The attention layer of block ``index``, as the config says."""
    kind = config.layer_attention(index)
    common = dict(
        causal=True, window=config.layer_window(index), bias=config.use_bias, rotary=True,
        rotary_base=config.rope_theta, rotary_fraction=config.rotary_pct,
    )
    D, H = config.hidden_size, config.num_attention_heads
    composed = dict(backend=config.attention_backend, chunk_size=config.attention_chunk_size)
    if kind == "mha":
        return MultiHeadAttention(D, H, qk_norm=config.qk_norm, **common)
    if kind == "talking_heads":
        return TalkingHeadsAttention(D, H, qk_norm=config.qk_norm, **common, **composed)
    if kind == "dcmha":
        return DCMHA(D, H, rank=config.dcmha_rank, groups=config.dcmha_groups, hidden_dim=config.dcmha_hidden_dim,
                     init=config.dcmha_init, static=config.dcmha_static, qk_norm=config.qk_norm, **common, **composed)
    return CollaborativeAttention(D, H, key_dim=config.collaborative_key_dim, **common)


class SwiGLU(nn.Module):
    """LLaMA's MLP: ``down(silu(gate(x)) * up(x))``.

    With ``gate_groups=E`` the hidden units are split into ``E`` consecutive groups and group ``e``
    is scaled by ``softmax(x W_g)_e`` (softmax over groups in float32) before ``down``: the official
    DCFormer code's ``mgate`` MLP.
    """

    def __init__(self, dim: int, hidden: int, bias: bool, gate_groups: int | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.group_gate = nn.Linear(dim, gate_groups, bias=False) if gate_groups else None

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if self.group_gate is not None:
            scores = self.group_gate(x).float().softmax(-1).to(h.dtype)  # (B, T, E)
            h = (h.unflatten(-1, (scores.shape[-1], -1)) * scores[..., None]).flatten(-2)
        return self.down_proj(h)


class GeluMLP(nn.Module):
    """GPT-NeoX's MLP: ``down(gelu(up(x)))``."""

    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


def _norm(config: DCFormerConfig) -> nn.Module:
    if config.backbone == "pythia":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)


class DecoderLayer(GradientCheckpointingLayer):
    """One block: attention and MLP with pre-normalisation, sequential or parallel residual."""

    def __init__(self, config: DCFormerConfig, index: int) -> None:
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.attention_norm = _norm(config)
        self.attention = build_attention(config, index)
        self.mlp_norm = _norm(config)
        if config.backbone == "pythia":
            self.mlp = GeluMLP(config.hidden_size, config.intermediate_size, config.use_bias)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.use_bias, config.mlp_gate_groups)

    def forward(self, x: Tensor, padding_mask: Tensor | None, positions: Tensor, cache: LayerCache | None) -> Tensor:
        attended = self.attention(self.attention_norm(x), padding_mask=padding_mask, positions=positions, cache=cache)
        if self.parallel_residual:
            return x + attended + self.mlp(self.mlp_norm(x))
        h = x + attended
        return h + self.mlp(self.mlp_norm(h))


class DCFormerPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by the headmix models."""

    config_class = DCFormerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # linear and embedding weights ~ N(0, initializer_range), norms to 1/0

        def fresh(*params: Tensor) -> bool:  # not loaded from a checkpoint
            return not any(getattr(p, "_is_hf_initialized", False) for p in params)

        if isinstance(module, DynamicWeightProjection):
            params = [p for p in (module.hidden, module.factors, module.gates) if p is not None]
            if fresh(*params):
                module.reset_parameters(self.config.dcmha_init)
        elif isinstance(module, DCMHA):
            for w in module.static.values():
                init.normal_(w, 0.0, 0.02) if self.config.dcmha_init == "paper" else init.zeros_(w)
        elif isinstance(module, TalkingHeadsAttention):
            init.zeros_(module.pre_mix)
            init.zeros_(module.post_mix)
        elif isinstance(module, CollaborativeAttention):
            init.copy_(module.mixing, block_mixing(module.num_heads, module.key_dim))


class DCFormerModel(DCFormerPreTrainedModel):
    """The decoder stack without the language-model head: returns the final hidden states."""

    def __init__(self, config: DCFormerConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def new_cache(self) -> HeadmixCache:
        """An empty decoding cache for this model (rolling for sliding-window layers)."""
        return HeadmixCache([self.config.layer_window(i) for i in range(self.config.num_hidden_layers)])

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: HeadmixCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: HeadmixCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Args as in ``transformers`` decoders: ``input_ids`` ``(batch, seq)``, ``attention_mask``
        ``(batch, past + seq)`` with 1 for real tokens (left padding supported), optional ``position_ids``
        and a :class:`HeadmixCache` as ``cache`` (or under its older name ``past_key_values``). The output
        holds the cache under the installed transformers' name (:data:`CACHE_NAME`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (batch, seq) or inputs_embeds (batch, seq, hidden_size)")
        past_key_values = _one_cache(cache, past_key_values)  # below, the cache goes by its pre-5.24 name
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if past_key_values is None and use_cache:
            past_key_values = self.new_cache()
        if past_key_values is not None and not isinstance(past_key_values, HeadmixCache):
            raise ValueError(
                f"past_key_values is a {type(past_key_values).__name__}: headmix models keep extra per-position state "
                "(DCMHA key-wise weights, rolling windows) and need a HeadmixCache (model.new_cache())"
            )
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        padding = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}: expected (batch, past + seq) = "
                    f"({B}, {past + T})"
                )
            if not bool(attention_mask.all()):
                padding = attention_mask[:, -T:].bool()
                if position_ids is None:  # left padding: real tokens count from 0
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, padding, position_ids, past_key_values.layers[i] if past_key_values is not None else None)
        if past_key_values is not None:
            past_key_values.seen_tokens += T
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), **{CACHE_NAME: past_key_values})


class DCFormerForCausalLM(DCFormerPreTrainedModel, GenerationMixin):
    """A headmix decoder with a language-model head; works with ``generate()``, ``Trainer`` and the Auto classes.

    Example:
        >>> import torch, headmix
        >>> from headmix.models import DCFormerConfig, DCFormerForCausalLM
        >>> model = DCFormerForCausalLM(DCFormerConfig.from_preset("tiny-dcformer++"))
        >>> model(torch.randint(0, 100, (1, 12))).logits.shape
        torch.Size([1, 12, 4096])
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DCFormerConfig) -> None:
        super().__init__(config)
        self.model = DCFormerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, after checking a local directory tensor by tensor
        (missing, unexpected or mis-shaped tensors and truncated files raise a ``ValueError`` naming them)."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            config = kwargs.get("config")
            if not isinstance(config, DCFormerConfig):
                config = DCFormerConfig.from_pretrained(path)
            with torch.device("meta"):
                expected = cls(config)
            tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
            verify_checkpoint(path, expected, tied)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def new_cache(self) -> HeadmixCache:
        return self.model.new_cache()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: HeadmixCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: HeadmixCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``(batch, seq, vocab)``; with ``labels`` also the next-token cross-entropy (labels -100 ignored).
        The cache as in :meth:`DCFormerModel.forward`."""
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=_one_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
        )
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: getattr(outputs, CACHE_NAME)})

    # -- generate() integration: our own cache, our own input slicing ----------------------------
    # generate() keeps the cache in its model_kwargs under CACHE_NAME (the installed transformers' name).
    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        if model_kwargs.get(CACHE_NAME) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_NAME] = self.new_cache()

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, cache: HeadmixCache | None = None, attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None, past_key_values: HeadmixCache | None = None, **kwargs,
    ) -> dict:
        cache = _one_cache(cache, past_key_values)
        seen = cache.get_seq_length() if cache is not None else 0
        inputs = {CACHE_NAME: cache, "attention_mask": attention_mask, "use_cache": kwargs.get("use_cache", True)}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        if kwargs.get("logits_to_keep"):
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs
