"""Model surgery: collaborative attention inside Hugging Face BERT, RoBERTa, MiniLM, DistilBERT, ALBERT and GPT-2.

The attention modules of these models (transformers 5) all project queries, keys and values, split
heads and call one attention function chosen by ``config._attn_implementation``. headmix keeps
everything else and changes two things per attention module:

* the query and key projections become identities (the host module then hands the layer input,
  split into heads, to the attention function as "query" and "key"); GPT-2's fused ``c_attn`` keeps
  its value part;
* the attention function is headmix's (registered as ``"headmix_collaborative"``): it applies the
  shared ``W~_Q``, ``W~_K``, the mixing matrix and the content bias held by the module's
  ``headmix_collaborative`` child, then SDPA with the host's scaling and mask.

GPT-2 (a decoder) goes one step further, for the key cache: its attention modules get a forward of
their own that caches, per position, the shared key ``x W~_K`` (``D~k`` numbers) and the content
bias term ``x u_h`` (one number per head) instead of ``heads x head_dim`` key numbers; the value
cache is unchanged (:func:`kv_cache_bytes_per_token`).

Rotary-position models (LLaMA, Pythia, ...) are refused: the rotation acts per head between the
projections and the product, so the products ``W_Q^h W_K^h^T`` that are decomposed do not exist.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..layers.collaborative import content_biased_attention
from .collaborative import CollaborativeWeights, reparametrize

ATTENTION_NAME = "headmix_collaborative"
SUPPORTED = ("bert", "roberta", "distilbert", "albert", "gpt2")  # config.model_type values
ROTARY = ("llama", "gpt_neox", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "olmo", "gptj",
          "falcon", "mixtral", "headmix_dcformer")


class CollaborativeProjection(nn.Module):
    """The collaborative parameters of one attention module: ``W~_Q``, ``W~_K`` ``(key_dim, d_in)``,
    mixing ``M`` ``(heads, key_dim)`` and the content bias ``u`` ``(heads, d_in)``."""

    def __init__(self, d_in: int, heads: int, key_dim: int, content_bias: bool) -> None:
        super().__init__()
        self.query = nn.Linear(d_in, key_dim, bias=False)
        self.key = nn.Linear(d_in, key_dim, bias=False)
        self.mixing = nn.Parameter(torch.zeros(heads, key_dim))
        self.content_bias = nn.Parameter(torch.zeros(heads, d_in)) if content_bias else None

    @classmethod
    def from_weights(cls, weights: CollaborativeWeights, dtype: torch.dtype, has_bias: bool) -> CollaborativeProjection:
        heads, key_dim = weights.mixing.shape
        layer = cls(weights.query.shape[0], heads, key_dim, has_bias)
        with torch.no_grad():
            layer.query.weight.copy_(weights.query.T)
            layer.key.weight.copy_(weights.key.T)
            layer.mixing.copy_(weights.mixing)
            if has_bias:
                layer.content_bias.copy_(weights.content_bias)
        return layer.to(device=weights.query.device, dtype=dtype)


class _ValueProjection(nn.Module):
    """GPT-2's fused ``c_attn`` reduced to its value part ``x W_V + b_V`` (same parameter names)."""

    def __init__(self, c_attn: nn.Module, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(c_attn.weight[:, 2 * dim :].detach().clone())  # Conv1D: (in, out)
        self.bias = nn.Parameter(c_attn.bias[2 * dim :].detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


def shared_key(collab: CollaborativeProjection, x: Tensor) -> Tensor:
    """What a key position contributes, shared by every head: ``x W~_K`` ``(..., D~k)``, followed by the
    content-bias term ``x u_h`` of each head ``(..., H)`` when the layer has one."""
    key = collab.key(x)
    if collab.content_bias is not None:
        key = torch.cat([key, x @ collab.content_bias.T], dim=-1)
    return key


def collaborative_attention(module: nn.Module, x_q: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                            scale: float, dropout: float = 0.0) -> Tensor:
    """Collaborative attention from the query-side input ``x_q`` ``(B, T, D)``, the shared keys
    ``(B, S, D~k [+ H])`` of :func:`shared_key` and the values ``(B, H, S, d_v)``: ``(B, H, T, d_v)``."""
    collab: CollaborativeProjection = module.headmix_collaborative
    heads, key_dim = collab.mixing.shape
    T, S = x_q.shape[1], key.shape[1]
    q = collab.query(x_q)[:, None] * collab.mixing[None, :, None, :]  # (B, H, T, D~k)
    k = key[..., :key_dim][:, None].expand(-1, heads, -1, -1)  # one shared key, a stride-0 view over heads
    if mask is None and getattr(module, "is_causal", False) and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    dropout_p = dropout if module.training else 0.0
    if collab.content_bias is not None:  # x_j . u_h, the query bias's surviving term
        return content_biased_attention(q, k, value, key[..., key_dim:] * scale, mask, scale, dropout_p)
    return F.scaled_dot_product_attention(q, k, value, attn_mask=mask, scale=scale, dropout_p=dropout_p)


def collaborative_attention_function(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                     attention_mask: Tensor | None, scaling: float | None = None,
                                     dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """The attention function of converted encoder modules (signature of transformers' attention interface).

    ``query``/``key`` arrive as the layer input split into heads ``(B, H, T, d)``; the result is
    ``(B, T, H, d_v)`` like every transformers attention function.
    """
    B, H, T, d = query.shape
    x_q = query.transpose(1, 2).reshape(B, T, H * d)
    x_k = key.transpose(1, 2).reshape(B, key.shape[2], H * d)
    scale = scaling if scaling is not None else d ** -0.5
    out = collaborative_attention(module, x_q, shared_key(module.headmix_collaborative, x_k), value, attention_mask,
                                  scale, dropout)
    return out.transpose(1, 2).contiguous(), None


def _gpt2_forward(self, hidden_states: Tensor, cache=None, attention_mask: Tensor | None = None,
                  encoder_hidden_states: Tensor | None = None, past_key_values=None, **kwargs) -> tuple[Tensor, None]:
    """GPT-2 self-attention with a collaborative key cache: ``(B, 1, S, D~k [+ H])`` keys, shared by the heads.

    The block hands the layer's cache over as ``cache`` (transformers >= 5.24) or ``past_key_values``
    (5.0 - 5.23): both are accepted. A cache under any other name is refused rather than ignored, since
    ignoring it decodes every new token against itself alone (the wrong text, silently).
    """
    if encoder_hidden_states is not None:
        raise ValueError("collaborative GPT-2 attention supports self-attention only, not cross-attention")
    if cache is None:
        cache = past_key_values
    stray = [name for name, value in kwargs.items() if _is_cache(value)]
    if stray:
        raise TypeError(f"collaborative GPT-2 attention got a cache as {stray[0]!r}, which it does not know: expected "
                        "it as 'cache' or 'past_key_values' (a transformers version newer than headmix supports?)")
    B, T, _ = hidden_states.shape
    value = self.c_attn(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
    key = shared_key(self.headmix_collaborative, hidden_states)[:, None]
    if cache is not None:
        cache = getattr(cache, "self_attention_cache", cache)
        key, value = cache.update(key, value, self.layer_idx)
    out = collaborative_attention(self, hidden_states, key[:, 0], value, attention_mask, _gpt2_scaling(self),
                                  self.attn_dropout.p)
    out = out.transpose(1, 2).reshape(B, T, -1)
    return self.resid_dropout(self.c_proj(out)), None


def _gpt2_scaling(module: nn.Module) -> float:
    """GPT-2's score scale: ``1/sqrt(head_dim)`` (when ``scale_attn_weights``), divided by ``layer_idx + 1`` when
    ``scale_attn_by_inverse_layer_idx`` (computed here: transformers 5.0 has no ``module.scaling`` yet)."""
    scale = module.head_dim ** -0.5 if module.scale_attn_weights else 1.0
    return scale / (module.layer_idx + 1) if module.scale_attn_by_inverse_layer_idx else scale


def _is_cache(value: object) -> bool:
    from transformers import Cache

    return isinstance(value, Cache)


_DECODER_MODULES: dict[type, type] = {}


def _collaborative_decoder_class(base: type) -> type:
    if base not in _DECODER_MODULES:
        _DECODER_MODULES[base] = type(f"Collaborative{base.__name__}", (base,),
                                      {"forward": _gpt2_forward, "__module__": __name__})
    return _DECODER_MODULES[base]


def kv_cache_bytes_per_token(model: nn.Module, bytes_per_number: int | None = None) -> tuple[int, int] | None:
    """``(before, after)``: key + value cache bytes per token over all layers of a GPT-2 model before and
    after conversion (``None`` for encoders, which keep no cache). ``bytes_per_number`` defaults to the
    parameters' element size."""
    modules = [m for _, m in attention_modules(model) if _kind(m) == "GPT2Attention"]
    if not modules:
        return None
    size = bytes_per_number or next(model.parameters()).element_size()
    before = after = 0
    for module in modules:
        dim = module.embed_dim
        before += 2 * dim
        collab = getattr(module, "headmix_collaborative", None)
        if collab is None:
            after += 2 * dim
        else:
            heads, key_dim = collab.mixing.shape
            after += key_dim + (heads if collab.content_bias is not None else 0) + dim
    return before * size, after * size


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, collaborative_attention_function)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules of a supported model (each shared module once: ALBERT shares one)."""
    names = ("BertSelfAttention", "RobertaSelfAttention", "DistilBertSelfAttention", "AlbertAttention", "GPT2Attention")
    return [(n, m) for n, m in model.named_modules() if _kind(m) in names]


def _kind(module: nn.Module) -> str:
    """The transformers class name of an attention module (also once converted and re-classed)."""
    cls = type(module)
    return cls.__mro__[1].__name__ if cls in _DECODER_MODULES.values() else cls.__name__


def _projections(module: nn.Module) -> tuple[int, Tensor, Tensor | None, Tensor, Tensor | None]:
    """``(heads, W_q, b_q, W_k, b_k)`` as ``nn.Linear``-style ``(out, in)`` weights."""
    kind = _kind(module)
    if kind == "GPT2Attention":
        dim = module.embed_dim
        w, b = module.c_attn.weight, module.c_attn.bias  # Conv1D: (in, 3*dim)
        return module.num_heads, w[:, :dim].T, b[:dim], w[:, dim : 2 * dim].T, b[dim : 2 * dim]
    if kind == "DistilBertSelfAttention":
        q, k, heads = module.q_lin, module.k_lin, module.n_heads
    else:
        q, k, heads = module.query, module.key, module.num_attention_heads
    return heads, q.weight, q.bias, k.weight, k.bias


def check_supported(model: nn.Module) -> None:
    """Raise a ``ValueError`` saying why a model cannot be converted."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ROTARY or getattr(getattr(model, "config", None), "rope_theta", None) is not None:
        raise ValueError(
            f"model_type={model_type!r} uses rotary position embedding: the rotation acts per head between the "
            "query/key projections and their product, so there is no fixed W_Q^h W_K^h^T to decompose exactly; "
            f"supported: {SUPPORTED}"
        )
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type={model_type!r} is not supported for collaborative conversion: expected one of {SUPPORTED}")
    if not attention_modules(model):
        raise ValueError(f"found no attention module to convert in this {type(model).__name__}")


def convert_to_collaborative(
    model: nn.Module,
    key_dim: int | None = None,
    key_dim_ratio: float | None = None,
    calibration: dict[str, Tensor] | None = None,
    progress: bool = True,
    **options,
) -> dict[str, CollaborativeWeights]:
    """Turn every self-attention module of ``model`` into collaborative attention, in place.

    Args:
        model: a BERT, RoBERTa, MiniLM (BERT), DistilBERT, ALBERT or GPT-2 model of transformers 5.
        key_dim: shared key size ``D~k`` of every layer; or ``key_dim_ratio`` times ``heads * d_k``.
        calibration: ``{module name: (n, d_in) inputs}`` for the data-aware decomposition
            (see :func:`collect_attention_inputs`).
        progress: a progress bar over layers.
        **options: for :func:`headmix.convert.collaborative.reparametrize` (init, n_iter_max, tol, seed).

    Returns:
        ``{module name: CollaborativeWeights}`` with each layer's reconstruction error.
    """
    check_supported(model)
    if (key_dim is None) == (key_dim_ratio is None):
        raise ValueError("give exactly one of key_dim or key_dim_ratio")
    _register()
    results = {}
    structure = {}
    modules = attention_modules(model)
    for name, module in tqdm(modules, desc="re-parametrizing attention", disable=not progress):
        heads, wq, bq, wk, _ = _projections(module)
        dk = key_dim if key_dim is not None else max(1, round(key_dim_ratio * wq.shape[0]))
        if key_dim_ratio is not None and not 0 < key_dim_ratio <= 1:
            raise ValueError(f"key_dim_ratio={key_dim_ratio} is not allowed: expected 0 < ratio <= 1")
        has_bias = bq is not None and bool(bq.detach().abs().max() > 0)
        weights = reparametrize(wq, wk, heads, dk, query_bias=bq if has_bias else None,
                                calibration=None if calibration is None else calibration[name], **options)
        _install(module, CollaborativeProjection.from_weights(weights, wq.dtype, has_bias))
        results[name] = weights
        structure[name] = {"key_dim": dk, "content_bias": has_bias}
    _become_collaborative(model, structure)
    return results


def _install(module: nn.Module, projection: CollaborativeProjection) -> None:
    """Give ``module`` its collaborative parameters; its query/key projections become identities."""
    module.headmix_collaborative = projection
    kind = _kind(module)
    if kind == "GPT2Attention":
        module.c_attn = _ValueProjection(module.c_attn, module.embed_dim)
        module.__class__ = _collaborative_decoder_class(type(module))
    elif kind == "DistilBertSelfAttention":
        module.q_lin, module.k_lin = nn.Identity(), nn.Identity()
    else:
        module.query, module.key = nn.Identity(), nn.Identity()


# -- saving and loading: a converted model is an instance of a registered subclass of its class ---------
_CONFIGS: dict[type, type] = {}
_MODELS: dict[type, type] = {}


def _collaborative_config_class(base: type) -> type:
    if base not in _CONFIGS:
        name = f"headmix_collab_{base.model_type}"
        _CONFIGS[base] = type(f"Collaborative{base.__name__}", (base,), {"model_type": name, "__module__": __name__})
        from transformers import AutoConfig

        AutoConfig.register(name, _CONFIGS[base], exist_ok=True)
    return _CONFIGS[base]


def _collaborative_model_class(base: type) -> type:
    if base not in _MODELS:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            _register()
            for name, spec in config.headmix_collaborative.items():
                module = self.get_submodule(name)
                heads, wq, *_ = _projections(module)
                _install(module, CollaborativeProjection(wq.shape[1], heads, spec["key_dim"], spec["content_bias"]))
            self.config._attn_implementation = ATTENTION_NAME

        _MODELS[base] = type(f"Collaborative{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})
        config_class = _collaborative_config_class(base.config_class)
        _MODELS[base].config_class = config_class
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

        for auto in (AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification):
            if auto._model_mapping.get(base.config_class, None) is base:
                auto.register(config_class, _MODELS[base], exist_ok=True)
    return _MODELS[base]


def _become_collaborative(model: nn.Module, structure: dict[str, dict]) -> None:
    """Re-class ``model`` and its config so that ``save_pretrained`` writes a directory that
    ``from_pretrained`` rebuilds (after ``import headmix``) with the same structure."""
    model.__class__ = _collaborative_model_class(type(model))
    model.config.__class__ = _collaborative_config_class(type(model).__mro__[1].config_class)
    _register_output_capture(model)
    model.config.headmix_collaborative = structure
    model.config._attn_implementation = ATTENTION_NAME


def _register_output_capture(model: nn.Module) -> None:
    """Tell transformers which submodules' outputs the re-classed ``model`` records (hidden states, attentions).

    transformers keeps ``_can_record_outputs`` in a registry filled by ``PreTrainedModel.__init__`` and keyed by
    the class name, so a model re-classed after ``__init__`` must be registered by hand; the registry moved and
    changed between releases: ``utils.generic`` (5.0 - 5.4) then ``utils.output_capturing`` (5.5 on), a plain
    dict keyed by ``str(cls)`` until 5.22, a dict subclass that derives that key from the model from 5.23 on.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:
        from transformers.utils.generic import _CAN_RECORD_REGISTRY
    if type(_CAN_RECORD_REGISTRY) is dict:
        _CAN_RECORD_REGISTRY[str(type(model))] = model._can_record_outputs
    else:
        _CAN_RECORD_REGISTRY[model] = model._can_record_outputs


def register_saved_classes() -> None:
    """Register the collaborative variants of every supported class, so saved models load by Auto class."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for model_type in SUPPORTED:
        config_class = CONFIG_MAPPING[model_type]
        for auto in (AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification):
            base = auto._model_mapping.get(config_class, None)
            if base is not None:
                _collaborative_model_class(base)


@torch.no_grad()
def collect_attention_inputs(model: nn.Module, batches: Iterable[dict[str, Tensor]], max_tokens: int = 20000) -> dict[str, Tensor]:
    """Inputs of every attention module on real data (padding dropped): ``{module name: (n, d_in)}``."""
    collected: dict[str, list[Tensor]] = {name: [] for name, _ in attention_modules(model)}
    current_mask: list[Tensor | None] = [None]
    hooks = []
    for name, module in attention_modules(model):
        def hook(mod, args, kwargs, name=name):
            x = kwargs.get("hidden_states", args[0] if args else None)
            mask = current_mask[0]
            rows = x[mask.bool()] if mask is not None and mask.shape == x.shape[:2] else x.reshape(-1, x.shape[-1])
            collected[name].append(rows.double().cpu())
        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        seen = 0
        for batch in batches:
            current_mask[0] = batch.get("attention_mask")
            model(**batch)
            seen += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            if seen >= max_tokens:
                break
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(rows)[:max_tokens] for name, rows in collected.items()}
