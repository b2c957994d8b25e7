"""The decoder family through the Hugging Face API: caching, generation, saving, upcycling, presets."""

from __future__ import annotations

import resource

import pytest
import torch
from helpers import randomise_composition
from transformers import AutoModelForCausalLM

import headmix  # noqa: F401  (registers the Auto classes)
from headmix import DCMHA, MultiHeadAttention
from headmix.models import PRESETS, DCFormerConfig, DCFormerForCausalLM, upcycle
import headmix.ops as ops
from headmix.masks import MaskSpec

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=256)


def tiny_model(seed: int = 0, **overrides) -> DCFormerForCausalLM:
    torch.manual_seed(seed)
    model = DCFormerForCausalLM(DCFormerConfig(**{**TINY, **overrides})).eval()
    for module in model.modules():  # make every composition term matter
        if isinstance(module, (DCMHA,)) or type(module).__name__ == "TalkingHeadsAttention":
            randomise_composition(module, std=0.3, seed=seed)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


KINDS = [
    dict(attention="mha"),
    dict(attention="talking_heads"),
    dict(attention="dcmha"),
    dict(attention="collaborative", collaborative_key_dim=16),
    dict(attention="dcmha", window_size=6, window_pattern="LG", qk_norm=True),
    dict(attention=["mha", "dcmha", "talking_heads", "collaborative"], window_size=5, window_pattern="LLLG"),
    dict(attention="dcmha", backbone="pythia", dcmha_groups=2),
    dict(attention="mha", backbone="pythia", window_size=7),
]


@pytest.mark.parametrize("options", KINDS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_incremental_decoding_matches_full_forward(options):
    model = tiny_model(**options)
    ids = torch.randint(0, TINY["vocab_size"], (2, 30))  # 30 tokens: 5x the window
    with torch.no_grad():
        full = model(ids).logits
        for prefill, step in ((8, 1), (5, 7)):  # prefill then one token at a time; chunked prefill
            cache = model.new_cache()
            pieces = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
            for start in range(prefill, ids.shape[1], step):
                pieces.append(model(ids[:, start : start + step], past_key_values=cache, use_cache=True).logits)
            assert rel_err(torch.cat(pieces, 1), full) <= 1e-4, (prefill, step)


def test_rotary_tables_are_computed_once_per_forward(monkeypatch):
    """The model computes the rotary cos/sin once per forward for all its layers (transformers' position
    embeddings), not twice per layer (queries and keys): an eager prefill launches each table's ~8 small kernels
    once. The logits are those of the layers computing their own tables."""
    from headmix.layers.rotary import RotaryEmbedding

    model = tiny_model(attention=["mha", "dcmha", "talking_heads", "collaborative"], window_size=5,
                       window_pattern="LLLG", collaborative_key_dim=16)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    calls = []
    real = RotaryEmbedding.cos_sin
    monkeypatch.setattr(RotaryEmbedding, "cos_sin", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    with torch.no_grad():
        shared = model(ids).logits
        assert len(calls) == 1
        per_layer = model.model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])
        for layer in model.model.layers:  # each layer on its own computes its table once (queries and keys)
            before = len(calls)
            per_layer = layer(per_layer, None, positions, None)
            assert len(calls) == before + 1
        alone = model.lm_head(model.model.norm(per_layer))
    torch.testing.assert_close(alone, shared, rtol=0, atol=0)


def test_rolling_cache_is_bounded_by_window():
    model = tiny_model(attention="dcmha", window_size=6, window_pattern="LG")
    cache = model.new_cache()
    ids = torch.randint(0, TINY["vocab_size"], (1, 40))
    with torch.no_grad():
        for t in range(40):
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    lengths = [len(layer) for layer in cache.layers]
    assert lengths == [5, 40, 5, 40]  # local layers keep window - 1 positions, global layers all
    state = cache.layers[0].state
    assert set(state) >= {"k", "v", "key_weights"}  # the key-side Compose weights, typed per composition
    for composition in ("pre", "post"):
        weights = state["key_weights"][composition]
        assert all(getattr(weights, f) is not None and getattr(weights, f).shape[1] == 5
                   for f in ("key_w1", "key_w2", "key_gate"))


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("cls", [MultiHeadAttention, DCMHA])
def test_token_outside_window_does_not_change_local_layer(cls, backend):
    options = dict(window=4, rotary=True) | ({"backend": backend, "chunk_size": 3} if cls is DCMHA else {})
    layer = cls(32, 4, **options)
    if cls is DCMHA:
        randomise_composition(layer)
    x = torch.randn(1, 12, 32)
    perturbed = x.clone()
    perturbed[:, 2] += 5.0
    out, out_p = layer(x), layer(perturbed)
    assert torch.equal(out[:, 6:], out_p[:, 6:])  # queries 6.. see positions >= 3 only
    assert not torch.allclose(out[:, 2:6], out_p[:, 2:6])  # inside the window it matters


def test_save_and_auto_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_model(attention="dcmha", window_size=6, window_pattern="LG")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is DCFormerForCausalLM
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


def test_load_in_bfloat16(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def _rewrite(tmp_path, edit):
    from safetensors.torch import load_file, save_file

    tiny_model(attention="dcmha").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["dynamic.factors", "static.pre"])
def test_missing_tensor_is_reported_as_transformers_reports_it(tmp_path, name):
    """A missing tensor is reported (transformers' loading info) and initialised as the layer initialises it,
    as for transformers' own models: transformers asks the submodule that owns it (the dynamic-weight projection,
    the static-mix dict), which was left as uninitialised memory before (a CI failure: NaN factors)."""
    _rewrite(tmp_path, lambda t: t.pop(f"model.layers.1.attention.{name}"))
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {f"model.layers.1.attention.{name}"}
    attention = model.model.layers[1].attention
    if name == "dynamic.factors":  # the identity init: first factors random, second factors zero
        factors, rank = attention.dynamic.factors, attention.dynamic.rank
        assert torch.isfinite(factors).all() and factors[..., :rank, :].abs().sum() > 0
        assert (factors[..., rank:, :] == 0).all()
    else:
        assert (attention.static["pre"] == 0).all()


def test_base_model_checkpoint_loads_both_ways(tmp_path):
    """``base_model_prefix``: the decoder's weights load into the LM class and the LM's into the decoder."""
    from headmix.models import DCFormerModel

    lm = tiny_model(attention="dcmha")
    lm.model.save_pretrained(tmp_path / "base")
    lm.save_pretrained(tmp_path / "lm")
    into_lm = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    into_base = DCFormerModel.from_pretrained(tmp_path / "lm")
    for name, value in lm.model.state_dict().items():
        assert torch.equal(into_lm.model.state_dict()[name], value), name
        assert torch.equal(into_base.state_dict()[name], value), name


def test_shape_mismatch_is_named(tmp_path):
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.attention.q_proj.weight": torch.zeros(16, 32)}))
    with pytest.raises(ValueError, match=r"'model.layers.0.attention.q_proj.weight' .* has shape \(16, 32\): the model expects \(32, 32\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_truncated_file_is_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model.safetensors is truncated or corrupt"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("options", [dict(attention="dcmha", window_size=6, window_pattern="LG"),
                                     dict(attention="collaborative", backbone="pythia")])
def test_greedy_generate_equals_argmax_loop(options):
    model = tiny_model(**options)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 5))
    out = model.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(15):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_beam_search_and_sampling_with_cache_match_without():
    model = tiny_model(attention="dcmha", window_size=6, window_pattern="LG")
    prompt = torch.randint(0, TINY["vocab_size"], (2, 4))
    common = dict(max_new_tokens=10, pad_token_id=0)
    beams = [model.generate(prompt, num_beams=3, do_sample=False, use_cache=c, **common) for c in (True, False)]
    assert torch.equal(beams[0], beams[1])
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        samples.append(model.generate(prompt, do_sample=True, top_k=20, use_cache=use_cache, **common))
    assert torch.equal(samples[0], samples[1])


def test_left_padded_batch_generates_like_single_prompts():
    model = tiny_model(attention="dcmha", window_size=6, window_pattern="LG")
    short, long = torch.randint(1, TINY["vocab_size"], (1, 3)), torch.randint(1, TINY["vocab_size"], (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [1] * 7])
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate((short, long)):
        alone = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(together[row, -8:], alone[0, -8:])


@pytest.mark.parametrize("backbone", ["llama", "pythia"])
@pytest.mark.parametrize("target", ["dcmha", "talking_heads"])
def test_upcycled_model_has_the_same_logits(backbone, target):
    torch.manual_seed(0)
    source = DCFormerForCausalLM(DCFormerConfig(**TINY, backbone=backbone, attention="mha", window_size=6,
                                                window_pattern="LG")).eval()
    upcycled = upcycle(source, attention=target)
    assert {upcycled.config.layer_attention(i) for i in range(4)} == {target}
    ids = torch.randint(0, TINY["vocab_size"], (2, 20))
    with torch.no_grad():
        assert (upcycled(ids).logits - source(ids).logits).abs().max() <= 1e-5
    # it is a real DCMHA model: training moves the composition away from the identity
    if target == "dcmha":
        assert any("dynamic" in n for n, _ in upcycled.named_parameters())


def test_upcycle_refuses_non_identity_init():
    with pytest.raises(ValueError, match="dcmha_init must stay 'identity'"):
        upcycle(tiny_model(), dcmha_init="paper")


PAPER_SIZES = {"405m": 405e6, "834m": 834e6, "1.4b": 1.4e9, "2.8b": 2.8e9, "6.9b": 6.9e9, "70m": 70e6,
               "160m": 160e6, "410m": 410e6, "1b": 1.0e9, "125m": 125e6}


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("tiny")])
def test_preset_parameter_count_matches_paper_size(name):
    size = next(s for key, s in PAPER_SIZES.items() if key in name.split("-") or name.endswith("-" + key)
                or name.startswith(key + "-"))
    computed = DCFormerConfig.from_preset(name).num_parameters()
    assert abs(computed - size) / size <= 0.05, (name, computed)


@pytest.mark.parametrize("name", ["tiny-dcformer++", "tiny-dcpythia", "dcpythia-70m", "dcformer++-405m",
                                  "tiny-dcformer++/no-static/mgate"])
def test_closed_form_count_equals_instantiated_model(name):
    options = dict(dcmha_static=False, mlp_gate_groups=8) if name.endswith("/mgate") else {}
    config = DCFormerConfig.from_preset(name.split("/")[0], **options)
    with torch.device("meta"):
        model = DCFormerForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()


def test_large_preset_on_meta_device_costs_no_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with torch.device("meta"):
        model = DCFormerForCausalLM(DCFormerConfig.from_preset("dcformer++-6.9b"))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert all(p.is_meta for p in model.parameters())
    assert grown_mib < 300, grown_mib  # the weights alone would be 27 GiB in float32


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(attention="flash"), r"attention='flash' is not allowed: expected one of \('mha', 'talking_heads', 'dcmha', 'collaborative'\)"),
        (dict(hidden_size=30), r"hidden_size=30 must be divisible by num_attention_heads=4"),
        (dict(backbone="gpt2"), r"backbone='gpt2' is not allowed"),
        (dict(window_size=8, window_pattern="LXG"), r"window_pattern='LXG' is not allowed"),
        (dict(window_pattern="LG"), r"window_pattern='LG' has local layers but window_size=None"),
        (dict(attention=["mha", "dcmha"]), r"attention has 2 entries: expected one kind per layer"),
        (dict(dcmha_rank=0), r"dcmha_rank=0 is not allowed"),
        (dict(rotary_pct=0.0), r"rotary_pct=0.0 is not allowed"),
        (dict(mlp_gate_groups=7, intermediate_size=64), r"intermediate_size=64 must be divisible by mlp_gate_groups=7"),
        (dict(mlp_gate_groups=4, backbone="pythia"), r"mlp_gate_groups=4 needs backbone='llama'"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        DCFormerConfig(**{**TINY, **fields})


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"preset='dcformer-7b' is not allowed: expected one of"):
        DCFormerConfig.from_preset("dcformer-7b")


def test_preset_docstring_table_is_computed():
    doc = DCFormerConfig.from_preset.__doc__
    assert "| dcformer++-2.8b | 32 | 2560 | 32 | dcmha | 256 (LG) |" in doc
    assert f"{DCFormerConfig.from_preset('pythia-70m').num_parameters() / 1e6:,.1f}M" in doc


def test_docstring_example_runs():
    import doctest

    import headmix.models.modeling

    failures, tried = doctest.testmod(headmix.models.modeling)
    assert tried > 0 and failures == 0


@pytest.mark.parametrize("attention", ["dcmha", "mha"])
def test_gradient_checkpointing_gives_the_same_gradients(attention):
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(attention=attention, window_size=6, window_pattern="LG").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
        model(ids, labels=ids).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("attention", ["mha", "talking_heads", "dcmha", "collaborative"])
def test_flops_per_token_matches_counted_matmuls(attention):
    """The closed-form FLOPs equal torch's FLOP counter over a forward pass of the materialised path.

    The reference backend computes every (query, key) pair, hence ``causal=False``. Not seen by the
    counter, so added or removed here: SDPA on the CPU (the MHA layer's attention products) and
    DCMHA's gates (element-wise).
    """
    from torch.utils.flop_counter import FlopCounterMode

    T, D, H, L = 24, 48, 6, 2
    config = DCFormerConfig(vocab_size=97, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                            attention=attention, attention_backend="reference", collaborative_key_dim=24,
                            dcmha_groups=2 if attention == "dcmha" else 1)
    model = DCFormerForCausalLM(config)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 97, (1, T)))
    counted = counter.get_total_flops() / T
    if attention == "mha":
        counted += L * T * 4 * D
    if attention == "dcmha":
        counted += L * T * 2 * 4 * H
    assert counted == config.flops_per_token(T, training=False, causal=False)
    assert config.flops_per_token(T) == 3 * config.flops_per_token(T, training=False)


def test_keys_per_query_follows_the_mask():
    from headmix.masks import attention_mask

    config = DCFormerConfig(window_size=5, window_pattern="LG")
    for T in (3, 5, 17):
        for layer in (0, 1):
            positions = torch.arange(T)
            allowed = attention_mask(positions, positions, causal=True, window=config.layer_window(layer))
            assert config.keys_per_query(layer, T) == pytest.approx(allowed.sum().item() / T)


def test_cache_api_of_the_installed_transformers_without_deprecation_warnings():
    """The models speak the installed transformers' cache API (``cache`` from 5.24 on, ``past_key_values``
    before): a forward with a cache, a training forward with labels and generate() (greedy, sampling, beam
    search) log no deprecation warning and return the cache under the current name; the older name is still
    accepted by ``forward`` and gives the same result."""
    import logging

    from transformers.utils import logging as hf_logging

    from headmix.models.modeling import CACHE_NAME

    import transformers
    from packaging.version import Version

    assert CACHE_NAME == ("cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values")
    model = tiny_model(attention="dcmha", window_size=6, window_pattern="LG")
    ids = torch.randint(1, TINY["vocab_size"], (2, 9))

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    records, library = Records(), hf_logging.get_logger()  # transformers' root logger (does not propagate)
    level = library.level
    logging.Logger.warning_once.cache_clear()  # transformers logs each distinct message once per process
    library.addHandler(records)
    library.setLevel(logging.WARNING)
    try:
        with torch.no_grad():
            out = model(ids[:, :5], **{CACHE_NAME: model.new_cache()}, use_cache=True)
            cache = getattr(out, CACHE_NAME)
            step = model(ids[:, 5:6], **{CACHE_NAME: cache}, use_cache=True)
            assert getattr(step, CACHE_NAME) is cache and cache.get_seq_length() == 6
            model(ids, labels=ids)  # what Trainer calls: no cache at all
            for options in (dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=2)):
                model.generate(ids[:, :4], max_new_tokens=4, pad_token_id=0, **options)
    finally:
        library.removeHandler(records)
        library.setLevel(level)
    deprecated = [m for m in records.messages if "deprecated" in m or "past_key_values" in m]
    assert not deprecated, deprecated

    old_name = model.new_cache()
    with torch.no_grad():
        by_old_name = model(ids[:, :5], past_key_values=old_name, use_cache=True).logits
    assert torch.equal(by_old_name, out.logits) and old_name.get_seq_length() == 5
    with pytest.raises(ValueError, match="got both cache and past_key_values"):
        model(ids, cache=model.new_cache(), past_key_values=model.new_cache())


@pytest.mark.parametrize("training", [True, False])
def test_an_empty_cache_keeps_the_causal_window_fast_path(monkeypatch, training):
    """use_cache=True (the config default) with no cache yet, as in training and in a prompt's prefill: the
    composed-attention backend gets the causal/window structure, not a dense mask tensor it must read (which
    also stops it skipping key blocks outside the window): a 405M training step was 2.7x slower for it."""
    seen = []
    chunked = ops._BACKENDS["chunked"]

    def spy(*args, mask, **kwargs):
        seen.append(mask)
        return chunked(*args, mask=mask, **kwargs)

    monkeypatch.setitem(ops._BACKENDS, "chunked", spy)
    config = DCFormerConfig.from_preset("tiny-dcformer++", num_hidden_layers=2, window_pattern="LG", window_size=8,
                                        attention_options={"chunk_size": 8})
    model = DCFormerForCausalLM(config).train(training)
    ids = torch.randint(0, config.vocab_size, (2, 24))
    out = model(ids, use_cache=True)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 24
    assert len(seen) == 2 and all(isinstance(m, MaskSpec) and m.causal for m in seen)
    assert [m.window for m in seen] == [8, None]
    assert all(m.key_padding is None and m.allowed is None for m in seen)
    with torch.no_grad():  # the same logits as without a cache
        torch.testing.assert_close(out.logits, model(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
