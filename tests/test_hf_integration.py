"""The headmix models as transformers models: attention weights, the cache as a transformers ``Cache`` (crop,
assisted and prompt-lookup decoding), ``inputs_embeds`` generation, 4-D and packed masks, ``attn_implementation``,
``torch.export``. (transformers' own common tests run in tests/test_hf_common.py.)"""

from __future__ import annotations

import pytest
import torch
from transformers import Cache

from headmix.models import DCFormerConfig, DCFormerForCausalLM, HeadmixCache
from headmix.models.modeling import CACHE_NAME, packed_sequence_mask
from headmix.reference import composed_probabilities

SHAPE = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
KINDS = {
    "dcformer++": dict(attention="dcmha", qk_norm=True, window_size=4, window_pattern="LG",
                       attention_options={"chunk_size": 4}),
    "pythia-collaborative": dict(backbone="pythia", attention="collaborative"),
    "talking_heads": dict(attention="talking_heads"),
    "mha-gqa": dict(attention="mha", num_key_value_heads=2),
}


def model_of(kind: str, seed: int = 0, **overrides) -> DCFormerForCausalLM:
    torch.manual_seed(seed)
    model = DCFormerForCausalLM(DCFormerConfig(**{**SHAPE, **KINDS[kind], **overrides})).eval()
    with torch.no_grad():  # composition weights away from their identity initialisation, so they matter
        for name, p in model.named_parameters():
            if any(part in name for part in ("dynamic", "static", "mix", "content_bias")):
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("kind", list(KINDS))
def test_eager_weights_are_what_multiplies_the_values(kind):
    """attn_implementation='eager' (the reference path) gives the fast path's logits, and its attention weights
    are the composed probabilities, masked where the window or the causal mask forbids."""
    model = model_of(kind).double()
    ids = torch.randint(0, 97, (2, 9))
    fast = model(ids).logits
    model.set_attn_implementation("eager")
    out = model(ids, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(out.logits, fast, rtol=1e-10, atol=1e-10)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 9, 9)
    assert len(out.hidden_states) == 3
    future = torch.ones(9, 9, dtype=torch.bool).triu(1)
    assert (out.attentions[1][..., future] == 0).all()
    if kind == "dcformer++":  # layer 0 is local (window 4): keys 4 or more back are never seen
        far = torch.ones(9, 9, dtype=torch.bool).tril(-4)
        assert (out.attentions[0][..., far] == 0).all()
        assert not torch.allclose(out.attentions[0].sum(-1), torch.ones(2, 4, 9, dtype=torch.float64))  # composed
    if kind == "mha-gqa":
        torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 9, dtype=torch.float64))


def test_reference_probabilities_are_the_attention_spec():
    """composed_attention is composed_probabilities times V (one source of the math)."""
    from headmix.reference import ComposeWeights, composed_attention

    q, k, v = (torch.randn(2, 4, 5, 8, dtype=torch.float64) for _ in range(3))
    pre = ComposeWeights(static=torch.randn(1, 4, 4, dtype=torch.float64))
    probs = composed_probabilities(q, k, scale=0.3, pre=pre, post=pre)
    torch.testing.assert_close(composed_attention(q, k, v, scale=0.3, pre=pre, post=pre), probs @ v)


def test_return_dict_false_and_use_cache():
    model = model_of("dcformer++")
    ids = torch.randint(0, 97, (2, 6))
    as_tuple = model(ids, return_dict=False, use_cache=True)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], model(ids).logits)
    assert isinstance(as_tuple[1], HeadmixCache) and isinstance(as_tuple[1], Cache)
    assert getattr(model(ids, use_cache=False), CACHE_NAME) is None
    model.config.use_cache = False
    assert getattr(model(ids), CACHE_NAME) is None


def test_cache_crop_undoes_steps_and_rolling_layers_need_recording():
    """crop(-n) puts the cache back as it was n tokens ago; a sliding-window layer that rolled refuses unless
    past recording was on (what assisted decoding turns on)."""
    model = model_of("dcformer++")
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        cache = model.new_cache()
        cache.activate_past_recording()
        model(ids[:, :8], cache=cache)
        model(ids[:, 8:11], cache=cache)
        cache.crop(-3)
        assert cache.get_seq_length() == 8
        resumed = model(ids[:, 8:12], cache=cache).logits
        full = model(ids).logits[:, 8:12]
        torch.testing.assert_close(resumed, full, rtol=1e-5, atol=1e-5)
        rolling = model.new_cache()
        model(ids[:, :8], cache=rolling)
        model(ids[:, 8:10], cache=rolling)
        with pytest.raises(ValueError, match="activate_past_recording"):
            rolling.crop(-2)
        with pytest.raises(ValueError, match="negative"):
            rolling.layers[0].crop(3)
        cache.crop(6)  # transformers' older convention: the length to keep
        assert cache.get_seq_length() == 6 and all(len(layer) == 6 for layer in cache.layers)


@pytest.mark.parametrize("how", ["assistant", "prompt_lookup"])
def test_assisted_and_prompt_lookup_decoding_equal_greedy(how):
    model = model_of("dcformer++")
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False)
    extra = dict(assistant_model=model_of("dcformer++", seed=1)) if how == "assistant" else dict(
        prompt_lookup_num_tokens=3)
    assisted = model.generate(ids, max_new_tokens=8, do_sample=False, **extra)
    assert torch.equal(assisted, greedy)


def test_generate_from_inputs_embeds_continues_like_input_ids():
    model = model_of("dcformer++")
    ids = torch.randint(0, 97, (2, 5))
    from_ids = model.generate(ids, max_new_tokens=6, do_sample=False)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, 5:])


def test_beam_search_runs_on_the_transformers_cache():
    model = model_of("dcformer++")
    out = model.generate(torch.randint(0, 97, (2, 5)), max_new_tokens=4, num_beams=3, do_sample=False,
                         num_return_sequences=2)
    assert out.shape == (4, 9)


def test_4d_mask_equals_padding_mask():
    """A custom 4-D mask (bool or additive float), ANDed with each layer's causal/window mask: the padding written
    out as a 4-D mask gives the logits of the 2-D padding mask."""
    model = model_of("dcformer++", window_size=None, window_pattern=None)
    ids = torch.randint(0, 97, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    reference = model(ids, attention_mask=mask).logits
    by_bool = model(ids, attention_mask=allowed, position_ids=positions).logits
    additive = torch.zeros(2, 1, 7, 7).masked_fill(~allowed, torch.finfo(torch.float32).min)
    by_float = model(ids, attention_mask=additive, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(by_bool[real], reference[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_float[real], reference[real], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="a 4-D mask must be"):
        model(ids, attention_mask=allowed[..., :6])


def test_packed_sequences_equal_separate_ones():
    """Padding-free packing: position_ids restarting at 0 keep each sequence to itself."""
    model = model_of("dcformer++")
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 4))
    packed = model(torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])).logits
    torch.testing.assert_close(packed[:, :5], model(a).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 5:], model(b).logits, rtol=1e-5, atol=1e-5)
    assert packed_sequence_mask(torch.arange(6)[None]) is None


def test_attn_implementation_names():
    """'eager', 'sdpa' and headmix's kernels name are accepted as transformers accepts its own; another model
    cannot use headmix's name."""
    import transformers

    from headmix.models.modeling import KERNELS_IMPLEMENTATION

    model = model_of("dcformer++")
    for name in ("eager", "sdpa", KERNELS_IMPLEMENTATION):
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, intermediate_size=37))
    llama.set_attn_implementation(KERNELS_IMPLEMENTATION)
    with pytest.raises(ValueError, match="runs headmix's own attention layers"):
        llama(torch.randint(0, 97, (1, 4)))


def test_torch_export_of_a_tiny_dcformer_pp():
    """torch.export traces the forward (the padding mask is applied unconditionally in the graph), and the
    exported program gives the eager logits, with and without padding."""
    model = model_of("dcformer++", use_cache=False)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    exported = torch.export.export(model, (), {"input_ids": ids, "attention_mask": mask}).module()
    for m in (mask, torch.ones_like(mask)):
        torch.testing.assert_close(exported(input_ids=ids, attention_mask=m).logits,
                                   model(input_ids=ids, attention_mask=m).logits, rtol=1e-5, atol=1e-5)
