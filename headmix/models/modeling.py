"""The decoder family as Hugging Face models: Transformer++, DCFormer(++), Pythia and DCPythia.

One block, two backbones (selected by ``config.backbone``) and a pluggable attention per layer
(``config.attention``)::

    llama  (Transformer++):  h = x + Attn(RMSNorm(x));  out = h + SwiGLU(RMSNorm(h))
    pythia (GPT-NeoX):       out = x + Attn(LayerNorm1(x)) + GeluMLP(LayerNorm2(x))   (parallel residual)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..layers.base import Attention
from .cache import HeadmixCache, HeadmixStaticCache, LayerCache, reusable_static_cache
from .checkpoint import verify_checkpoint
from .configuration import DCFormerConfig
from .steady import SteadyStep

# The name under which transformers passes the decoding cache to a model and returns it in outputs:
# ``cache`` from transformers 5.24 on, ``past_key_values`` before. 5.24 still accepts the old name but logs a
# deprecation warning for each use (on every forward that builds an output), so the models speak the
# installed version's name; their ``forward`` and ``prepare_inputs_for_generation`` accept both names.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


#: The ``attn_implementation`` under which headmix's fused Triton kernels run the composed layers (DCMHA,
#: talking-heads): registered in transformers' attention-interface registry, so that ``from_pretrained(...,
#: attn_implementation="headmix_triton")`` and ``model.set_attn_implementation("headmix_triton")`` accept it.
#: ``"eager"`` runs every layer's materialised reference path (what ``output_attentions`` reads), ``"sdpa"`` (the
#: default) each layer's own fast path. The mapping onto layers is :data:`headmix.layers.base.IMPLEMENTATION_BACKENDS`.
KERNELS_IMPLEMENTATION = "headmix_triton"

#: ``cache_implementation`` names that select the static cache (:class:`HeadmixStaticCache`): ``"static"``, and
#: the names transformers 5 deprecated in its favour.
STATIC_IMPLEMENTATIONS = ("static", "sliding_window", "hybrid")


def _headmix_only_attention(module, *args, **kwargs):
    """The function transformers' registry holds for :data:`KERNELS_IMPLEMENTATION`: headmix's layers never call
    it (they run their own backends); another model that asks for it gets this error."""
    raise ValueError(f"attn_implementation={KERNELS_IMPLEMENTATION!r} runs headmix's own attention layers (DCMHA, "
                     f"talking-heads); {type(module).__name__} is not one of them: use 'sdpa' or 'eager'")


AttentionInterface.register(KERNELS_IMPLEMENTATION, _headmix_only_attention)


def _one_cache(cache: HeadmixCache | None, past_key_values: HeadmixCache | None) -> HeadmixCache | None:
    """The cache given as ``cache`` (current name) or ``past_key_values`` (the name before transformers 5.24)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("got both cache and past_key_values: pass the HeadmixCache once, as cache")
    return cache if cache is not None else past_key_values


def build_attention(config: DCFormerConfig, index: int) -> Attention:
    """The attention layer of block ``index``, as the config says (:meth:`DCFormerConfig.build_attention`)."""
    return config.build_attention(index)


def _matrix_flops(module: nn.Module) -> int:
    """2 FLOPs per multiply-add of every ``nn.Linear`` weight of ``module``, once per token."""
    return 2 * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


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

    def flops_per_token(self) -> int:
        return _matrix_flops(self)


class GeluMLP(nn.Module):
    """GPT-NeoX's MLP: ``down(gelu(up(x)))``."""

    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))

    def flops_per_token(self) -> int:
        return _matrix_flops(self)


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

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, keys_per_query: float) -> float:
        """Forward FLOPs per token: the attention's and the MLP's matrices, and the attention's per (query,
        key) pair times ``keys_per_query``."""
        return (self.attention.flops_per_token() + self.mlp.flops_per_token()
                + keys_per_query * self.attention.flops_per_pair())

    def forward(self, x: Tensor, padding_mask: Tensor | None, positions: Tensor, cache: LayerCache | None,
                allowed: Tensor | None = None, implementation: str | None = None,
                output_attentions: bool = False,
                position_embeddings: tuple[Tensor, Tensor] | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """The block's output ``(batch, seq, dim)``, and the attention weights when ``output_attentions``
        (arguments as for :meth:`headmix.layers.Attention.forward`)."""
        attended = self.attention(self.attention_norm(x), padding_mask=padding_mask, positions=positions, cache=cache,
                                  allowed=allowed, implementation=implementation, return_weights=output_attentions,
                                  position_embeddings=position_embeddings)
        weights = None
        if output_attentions:
            attended, weights = attended
        if self.parallel_residual:
            out = x + attended + self.mlp(self.mlp_norm(x))
        else:
            h = x + attended
            out = h + self.mlp(self.mlp_norm(h))
        return (out, weights) if output_attentions else out


class DCFormerPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by the headmix models."""

    config_class = DCFormerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    # forward compiles as one graph (torch.compile(fullgraph=True), with the dynamic or the static cache: tested in
    # tests/test_generate_static.py); transformers' generation tests of the static cache and compiled forward run
    _can_compile_fullgraph = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, after checking a local directory's safetensors headers: a
        mis-shaped tensor or a truncated file raises a ``ValueError`` naming it. Missing and unexpected tensors
        are reported by transformers as for its own models (a warning; ``output_loading_info=True``)."""
        path = pretrained_model_name_or_path  # None with a state_dict, or a hub name: nothing local to check
        if isinstance(path, (str, os.PathLike)) and Path(path).is_dir():
            path = Path(path)
            config = kwargs.get("config")
            if not isinstance(config, DCFormerConfig):
                config = DCFormerConfig.from_pretrained(path)
            with torch.device("meta"):
                expected = cls(config)
            verify_checkpoint(path, expected, cls.base_model_prefix)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # linear and embedding weights ~ N(0, initializer_range), norms to 1/0
        layer = module if isinstance(module, Attention) else self._attention_owning(module)
        if layer is not None:
            _reset_unloaded(layer)

    def _attention_owning(self, module: nn.Module) -> Attention | None:
        """The attention layer a parameter-holding submodule belongs to (DCMHA's dynamic-weight projection, its
        static mixes), whose ``reset_parameters`` initialises it; transformers calls ``_init_weights`` on the
        module that owns a parameter missing from a checkpoint, which need not be the layer itself."""
        if isinstance(module, (nn.Linear, nn.Embedding, nn.RMSNorm, nn.LayerNorm)) \
                or next(module.parameters(recurse=False), None) is None:
            return None
        return next((layer for layer in self.modules() if isinstance(layer, Attention)
                     and any(m is module for m in layer.modules())), None)


def _reset_unloaded(layer: Attention) -> None:
    """``layer.reset_parameters()`` for the parameters the layer defines itself (not those of its
    ``nn.Linear``/norm children, which Hugging Face initialises), keeping any that were loaded from a checkpoint."""
    children = {id(p) for m in layer.modules() if isinstance(m, (nn.Linear, nn.RMSNorm, nn.LayerNorm))
                for p in m.parameters()}
    own = [p for p in layer.parameters() if id(p) not in children]
    loaded = [(p, p.detach().clone()) for p in own if getattr(p, "_is_hf_initialized", False)]
    if not own or len(loaded) == len(own):
        return
    layer.reset_parameters()
    for p, value in loaded:
        p.copy_(value)


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
        """The token embedding (transformers' accessor, used by ``resize_token_embeddings`` and tying)."""
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.embed_tokens = value

    def new_cache(self, max_cache_len: int | None = None) -> HeadmixCache:
        """An empty decoding cache for this model: the dynamic :class:`HeadmixCache` (rolling for sliding-window
        layers), or with ``max_cache_len`` the static :class:`HeadmixStaticCache` of that many positions (what
        ``generate(..., cache_implementation="static")`` makes, sized to ``max_length``)."""
        windows = [self.config.layer_window(i) for i in range(self.config.num_hidden_layers)]
        return HeadmixCache(windows) if max_cache_len is None else HeadmixStaticCache(windows, max_cache_len)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: HeadmixCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: HeadmixCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Args as in ``transformers`` decoders: ``input_ids`` ``(batch, seq)`` or ``inputs_embeds``
        ``(batch, seq, hidden)``; ``attention_mask`` ``(batch, past + seq)`` with 1 for real tokens (left or right
        padding), or a custom 4-D mask ``(batch or 1, 1, seq, past + seq)`` (bool, ``True`` = may attend, or
        additive float, 0 = may attend), ANDed with each layer's causal/window mask of the positions; optional
        ``position_ids`` (packed sequences: positions restarting at 0 start a new sequence, see
        :func:`packed_sequence_mask`); a :class:`HeadmixCache` as ``cache`` (or under its older name
        ``past_key_values``), made when ``use_cache`` (default ``config.use_cache``). ``output_attentions`` (per
        layer, the weights that multiply the values: see ``docs/architecture.md``), ``output_hidden_states`` and
        ``return_dict`` default to the config's. The output holds the cache under the installed transformers'
        name (:data:`CACHE_NAME`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (batch, seq) or inputs_embeds (batch, seq, hidden_size)")
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        use_cache = config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputed blocks would append to the cache twice
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
        static = isinstance(past_key_values, HeadmixStaticCache)
        compiling = torch.compiler.is_compiling()
        if static:
            # A compiled step reads the count of cached positions as a tensor (no host synchronisation); eagerly,
            # the sizes are checked first, with a clear error
            if not compiling:
                past_key_values.check_room(T)
            past = None if compiling else past_key_values.get_seq_length()
            new_index = past_key_values.length.to(x.device) + torch.arange(T, device=x.device)
        else:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
        padding, allowed = None, None
        if attention_mask is not None and attention_mask.dim() == 4:
            if static:
                raise ValueError("a 4-D attention_mask is not supported with the static cache (HeadmixStaticCache): "
                                 "pass a 2-D padding mask (batch, past + seq), or use the dynamic cache")
            if attention_mask.shape[-2:] != (T, past + T) or attention_mask.shape[1] != 1:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}: a 4-D mask must be "
                                 f"(batch or 1, 1, seq, past + seq) = ({B}, 1, {T}, {past + T})")
            allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        elif attention_mask is not None:
            # With the static cache the mask may be longer than past + seq (generate() pads it to the cache's
            # size, so that a compiled step sees one shape): entries past the new tokens are ignored.
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or (
                    past is not None and attention_mask.shape[1] < past + T
                    if static else attention_mask.shape[1] != past + T):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}: expected (batch, past + seq) = "
                    f"({B}, {'at least ' if static else ''}{past + T if past is not None else 'past + seq'})"
                )
            # Under torch.compile/export the mask is always applied (no data-dependent branch in the graph);
            # eagerly, a mask of all ones over the positions so far is dropped so the layers keep their plain causal
            # fast paths. generate()'s zeros past them (transformers 5.17 pads the mask to the static cache's size) do
            # not count: read whole, they sent every static-cache prefill down the masked path (FlexAttention block
            # masks built per layer: Transformer++-405M's batch-1 prefill 2.6x slower than the dynamic cache's on an H200)
            if compiling or not bool(attention_mask[:, :past + T].all()):
                if static:
                    padding = attention_mask.index_select(1, new_index).bool()
                    if position_ids is None:  # left padding: real tokens count from 0
                        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).index_select(1, new_index)
                else:
                    padding = attention_mask[:, -T:].bool()
                    if position_ids is None:  # left padding: real tokens count from 0
                        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        elif position_ids is not None and not static and past == 0 and not compiling:
            allowed = packed_sequence_mask(position_ids)  # None unless the positions restart (packed sequences)
        if position_ids is None:
            position_ids = new_index if static else torch.arange(past, past + T, device=x.device)
        implementation = getattr(config, "_attn_implementation", None)
        hidden_states: list[Tensor] = []
        attentions: list[Tensor] = []
        # rotary tables once per forward, shared by the layers whose rotary embeddings agree (an eager layer would
        # compute them itself: ~8 small kernels and their launches per layer)
        tables: dict[tuple, tuple[Tensor, Tensor]] = {}
        rotary_dtype = torch.promote_types(x.dtype, torch.float32)
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(x)
            rotary = layer.attention.rotary
            if rotary is not None and rotary.table_key not in tables:
                tables[rotary.table_key] = rotary.cos_sin(position_ids, rotary_dtype)
            x = layer(x, padding, position_ids, past_key_values.layers[i] if past_key_values is not None else None,
                      allowed, implementation, output_attentions,
                      tables[rotary.table_key] if rotary is not None else None)
            if output_attentions:
                x, weights = x
                attentions.append(weights)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        output = BaseModelOutputWithPast(
            last_hidden_state=x, hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            **{CACHE_NAME: past_key_values if use_cache else None},
        )
        return output if return_dict else output.to_tuple()


def packed_sequence_mask(position_ids: Tensor) -> Tensor | None:
    """The block-diagonal causal mask ``(batch, 1, seq, seq)`` of sequences packed in one row without padding
    (transformers' padding-free convention: ``position_ids`` restart at 0 where a sequence starts), or ``None``
    when no row restarts (one sequence per row: the layers' own causal masks apply)."""
    if position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return None
    starts = position_ids[:, 1:] <= position_ids[:, :-1]  # a position that does not increase starts a sequence
    if not bool(starts.any()):
        return None
    sequence = torch.cat([torch.zeros_like(position_ids[:, :1]), starts.long().cumsum(-1)], dim=-1)  # (B, T)
    same = sequence[:, :, None] == sequence[:, None, :]
    causal = torch.ones(position_ids.shape[1], position_ids.shape[1], dtype=torch.bool,
                        device=position_ids.device).tril()
    return (same & causal)[:, None]


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

    def get_output_embeddings(self) -> nn.Linear:
        """The language-model head (transformers' accessor, used by ``resize_token_embeddings`` and tying)."""
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        """Replace the language-model head."""
        self.lm_head = value

    def new_cache(self, max_cache_len: int | None = None) -> HeadmixCache:
        """An empty decoding cache (see :meth:`DCFormerModel.new_cache`)."""
        return self.model.new_cache(max_cache_len)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: HeadmixCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: HeadmixCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits ``(batch, seq, vocab)``; with ``labels`` also the next-token cross-entropy (labels -100 ignored).
        The other arguments as in :meth:`DCFormerModel.forward`."""
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=_one_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions, **{CACHE_NAME: getattr(outputs, CACHE_NAME)})
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()

    # -- generate() integration: our own cache (a transformers Cache); transformers' own input preparation ----
    # generate() keeps the cache in its model_kwargs under CACHE_NAME (the installed transformers' name).
    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """Make the cache ``generate()`` decodes with: the dynamic :class:`HeadmixCache`, or for
        ``cache_implementation="static"`` a :class:`HeadmixStaticCache` sized to the generation's ``max_length``
        (or ``generation_config.max_cache_len`` if larger), which ``generate()`` compiles the decoding step
        against on CUDA (transformers' auto-compile: a compileable cache, not a ``DynamicCache``)."""
        implementation = getattr(generation_config, "cache_implementation", None)
        if model_kwargs.get(CACHE_NAME) is not None:
            if implementation is not None:
                raise ValueError(f"got both cache_implementation={implementation!r} and a {CACHE_NAME} object: "
                                 "pass one of them")
            return
        if generation_config.use_cache is False:
            return
        if implementation in STATIC_IMPLEMENTATIONS:
            # transformers passes (generation_mode, batch_size, max_cache_length) after the kwargs
            length = kwargs.get("max_cache_length", args[-1] if args and isinstance(args[-1], int) else None)
            length = max(length or 0, generation_config.max_length or 0, getattr(generation_config, "max_cache_len", None) or 0)
            batch = kwargs.get("batch_size", args[-2] if len(args) > 1 and isinstance(args[-2], int) else None)
            cache = reusable_static_cache(self, generation_config, length, batch)
        elif implementation in (None, "dynamic"):
            cache = self.new_cache()
        else:
            raise ValueError(f"cache_implementation={implementation!r} is not supported by headmix models: use "
                             f"'dynamic' (the default) or 'static'")
        model_kwargs[CACHE_NAME] = cache
        if getattr(generation_config, "is_assistant", False):
            cache.activate_past_recording()  # its rejected candidates are cropped away

    def get_compiled_call(self, compile_config=None):
        """``generate()``'s compiled forward (transformers' hook, called once per ``generate()``), skipping dynamo's
        guards once the steps are steady (:class:`~headmix.models.steady.SteadyStep`). Without a config, transformers'
        default with static shapes (``dynamic=False``): another batch size recompiles for its own shapes instead of
        going symbolic, which broke inductor's code for DCFormer++ on an H200 (torch 2.11: ``NameError: s99``)."""
        if compile_config is None:  # (generate() passes generation_config.compile_config, when set)
            from transformers import CompileConfig
            compile_config = CompileConfig(dynamic=False)
        return SteadyStep(super().get_compiled_call(compile_config))

    def create_masks_for_generate(self, attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
        """What ``generate()`` passes as ``attention_mask`` with a compileable (static) cache (transformers' hook in
        ``prepare_inputs_for_generation``, called with the cache as ``cache`` or, before 5.24, ``past_key_values``):
        the 2-D padding mask ``(batch, past + seq)`` zero-padded to the cache's ``max_cache_len`` columns, so that
        every decoding step has one shape (the model reads the columns of the new tokens:
        :meth:`DCFormerModel.forward`; the layers build their own masks). ``None`` stays ``None`` (no padding)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if attention_mask is None or attention_mask.dim() != 2 or not isinstance(cache, HeadmixStaticCache):
            return attention_mask
        return F.pad(attention_mask, (0, max(cache.max_cache_len - attention_mask.shape[1], 0)))
