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
    ("llama", "num_key_value_heads", 2, "num_key_value_heads=2"),
    ("gpt_neox", "hidden_act", "gelu_new", "hidden_act='gelu_new'"),
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
