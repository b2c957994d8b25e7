"""The static cache (``generate(..., cache_implementation="static")``) and compiled decoding against it.

Greedy tokens with the static cache must equal the dynamic cache's for every attention kind and both backbones,
with prompts longer than the sliding window (the ring wraps), left padding, and generation past the cache size
(a clear error for global layers; the ring runs on for sliding-window layers). The compiled step (transformers'
own compile path of ``generate``, forced on the CPU with ``CompileConfig._compile_all_devices``) must compile as
one graph (``fullgraph=True``), at most twice over a whole generation, and give the eager tokens; the backend here
counts compilations and runs the captured graph eagerly (inductor would take minutes on the CI machine).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CompileConfig

from headmix import DCMHA
from headmix.layers import dcmha as dcmha_module
from headmix.layers.cache import LayerCache, StaticLayerCache, pack
from headmix.models import DCFormerConfig, DCFormerForCausalLM, HeadmixStaticCache
from headmix.models.modeling import CACHE_NAME

KINDS = ("mha", "talking_heads", "dcmha", "collaborative")
BACKBONES = {"llama": "tiny-dcformer++", "pythia": "tiny-dcpythia"}
SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, window_size=4,
             window_pattern="LG")
PROMPT, NEW = 9, 12  # prompt longer than the window of 4; the ring of 4 slots wraps several times


def small_model(backbone: str = "llama", attention=None, **overrides) -> DCFormerForCausalLM:
    """A 2-layer model (one sliding-window layer, one global) whose every parameter is perturbed, so that the
    compositions (identity at initialisation), mixes and content biases all act."""
    options = {"content_bias": True} if attention == "collaborative" else {}
    config = DCFormerConfig.from_preset(BACKBONES[backbone], **{**SMALL, **overrides},
                                        **({"attention": attention} if attention else {}),
                                        **({"attention_options": options} if options else {}))
    model = DCFormerForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def prompts(batch: int = 2, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, SMALL["vocab_size"], (batch, PROMPT))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0  # left padding in the first row
    ids[0, :pad] = 0
    return ids, mask


def greedy(model, ids, mask, **kwargs) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          pad_token_id=0, eos_token_id=None, **kwargs)[:, ids.shape[1]:]


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_gives_the_dynamic_cache_tokens(kind, backbone):
    model = small_model(backbone, kind)
    ids, mask = prompts()
    dynamic = greedy(model, ids, mask)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         pad_token_id=0, eos_token_id=None, cache_implementation="static",
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, PROMPT:], dynamic)
    cache = getattr(out, CACHE_NAME, None) or out.past_key_values
    assert isinstance(cache, HeadmixStaticCache)
    ring, full = cache.layers  # "LG": a sliding-window layer, then a global one
    assert ring.ring and ring.slots == SMALL["window_size"] and ring.state["k"].shape[1] == SMALL["window_size"]
    assert not full.ring and full.slots == cache.max_cache_len >= PROMPT + NEW - 1
    assert cache.get_seq_length() == PROMPT + NEW - 1


def test_generation_config_selects_the_static_cache():
    model = small_model()
    ids, mask = prompts()
    dynamic = greedy(model, ids, mask)
    model.generation_config.cache_implementation = "static"
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    assert isinstance(getattr(out, CACHE_NAME, None) or out.past_key_values, HeadmixStaticCache)
    assert torch.equal(out.sequences[:, PROMPT:], dynamic)


def test_unknown_cache_implementation_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match="cache_implementation='quantized'.*'dynamic'.*'static'"):
        model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, cache_implementation="quantized")


def test_static_cache_beam_search_matches_dynamic():
    model = small_model(attention="dcmha")
    ids, mask = prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, cache_implementation="static", **kwargs))


def test_generation_past_the_cache_size_names_the_sizes():
    model = small_model()
    ids, mask = prompts()
    cache = model.new_cache(max_cache_len=12)
    with pytest.raises(ValueError, match=r"holds 12 positions: 12 are cached and 1 more do not fit"):
        greedy(model, ids, mask, **{CACHE_NAME: cache})


def test_sliding_window_layers_run_past_the_cache_size_on_their_ring():
    """Every layer local: the static cache of 6 positions holds rings of 4 slots and never fills."""
    model = small_model(window_pattern=None)
    ids, mask = prompts()
    assert torch.equal(greedy(model, ids, mask, **{CACHE_NAME: model.new_cache(max_cache_len=6)}),
                       greedy(model, ids, mask))


def test_crop_and_reset_of_the_static_cache():
    """Assisted decoding's rollback: cropping the last steps and decoding them again gives the same logits."""
    model = small_model(window_pattern="G")  # global layers only: a ring that wrapped cannot undo (tested below)
    ids = torch.randint(1, 64, (1, 8))
    cache = model.new_cache(max_cache_len=16)
    model(ids[:, :5], **{CACHE_NAME: cache})
    first = model(ids[:, 5:], **{CACHE_NAME: cache}).logits
    cache.crop(-3)
    assert cache.get_seq_length() == cache.seen_tokens == 5
    assert torch.allclose(model(ids[:, 5:], **{CACHE_NAME: cache}).logits, first, atol=1e-6)
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.layers[0].valid.any()
    ring = StaticLayerCache(8, window=2)
    ring.update({"k": torch.randn(1, 3, 1, 2)}, torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="ring of 2 slots has wrapped"):
        ring.crop(-1)


def compiled_greedy(model, ids, mask, cache=None) -> tuple[torch.Tensor, int]:
    """Greedy tokens with the static cache (a new one, or ``cache``) and the decoding step compiled by ``generate()``
    (fullgraph), and the number of graphs compiled."""
    graphs = []

    def backend(graph_module, example_inputs):  # a function: CompileConfig deep-copies its backend (not a function)
        graphs.append(graph_module)
        return graph_module.forward  # the captured graph, run eagerly

    config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    torch._dynamo.reset()
    how = {CACHE_NAME: cache} if cache is not None else {"cache_implementation": "static"}
    tokens = greedy(model, ids, mask, compile_config=config, **how)
    return tokens, len(graphs)


def test_compiled_decoding_step_every_kind_one_graph():
    """One model with every attention kind (pythia backbone, one sliding-window layer): the compiled steps give
    the dynamic cache's tokens, and the whole generation compiles the step once (at most one recompile)."""
    model = small_model("pythia", attention=list(KINDS), num_hidden_layers=4,
                        attention_options={"content_bias": True})
    ids, mask = prompts()
    tokens, graphs = compiled_greedy(model, ids, mask)
    assert torch.equal(tokens, greedy(model, ids, mask))
    assert 1 <= graphs <= 2, f"{graphs} compilations over {NEW - 1} decoding steps"


def test_converted_official_dcformer_generates_the_same_tokens_compiled(tmp_path):
    """An official-format DCFormer (random weights, the tests' fixtures), converted, decodes the same greedy
    tokens compiled against the static cache as eagerly with the dynamic cache."""
    from official_fixtures import official_config, random_official_state, write_official

    from headmix.convert.official import import_official

    config = official_config("dcformer", n_layer=2, window_size=4, vocab_size=64)  # layer 0 local, 1 global
    write_official(tmp_path / "official", config, random_official_state(config, seed=3))
    import_official(tmp_path / "official", tmp_path / "headmix", progress=False)
    model = DCFormerForCausalLM.from_pretrained(tmp_path / "headmix").eval()
    assert any(model.config.layer_window(i) for i in range(2))
    ids, mask = prompts()
    tokens, graphs = compiled_greedy(model, ids, mask)
    assert torch.equal(tokens, greedy(model, ids, mask))
    assert 1 <= graphs <= 2


def test_eager_steps_read_no_count_from_the_device(monkeypatch):
    """Eagerly (the prefill), the static cache's count of positions is kept on the host: reading the device's count
    is a host synchronisation, which, once per layer, halved a GPU prefill's speed. After compiled steps (which
    count on the device only) the count is read back once and is right."""
    model = small_model(attention="dcmha")
    ids, mask = prompts()
    cache = HeadmixStaticCache([model.config.layer_window(i) for i in range(2)], PROMPT + NEW)
    reads = []
    to_int = torch.Tensor.__int__

    def counting_int(tensor):
        if any(tensor is layer.length for layer in cache.layers):
            reads.append(tensor)
        return to_int(tensor)

    monkeypatch.setattr(torch.Tensor, "__int__", counting_int)
    model(ids, attention_mask=mask, **{CACHE_NAME: cache})
    model(ids[:, :1], attention_mask=torch.ones(2, PROMPT + 1, dtype=torch.long), **{CACHE_NAME: cache})
    assert reads == [] and cache.get_seq_length() == PROMPT + 1
    monkeypatch.undo()

    cache.reset()
    tokens, _ = compiled_greedy(model, ids, mask, cache=cache)
    assert torch.equal(tokens, greedy(model, ids, mask))
    seen = ids.shape[1] + NEW - 1  # the last token is sampled, never fed back
    assert [layer._seen for layer in cache.layers] == [None, None]  # the compiled steps counted on the device
    assert cache.get_seq_length() == seen and [int(layer.length) for layer in cache.layers] == [seen, seen]


@pytest.mark.parametrize("kind", ["mha", "dcmha"])
def test_prefill_with_a_mask_padded_to_the_cache_takes_the_unmasked_path(kind, monkeypatch):
    """generate() (transformers 5.17) hands the static cache's prefill a mask as long as the cache, ones over the
    prompt and zeros past it: the zeros are later steps' slots, not padding, so the prefill keeps the layers'
    unmasked causal path (and the same logits); a real padded position still takes the masked one."""
    model = small_model(attention=kind)
    ids = torch.randint(1, SMALL["vocab_size"], (2, PROMPT))
    size = PROMPT + NEW
    mask = torch.zeros(2, size, dtype=torch.long)
    mask[:, :PROMPT] = 1
    padding = []
    attention = type(model.model.layers[0].attention)
    forward = attention.forward
    monkeypatch.setattr(attention, "forward", lambda self, x, padding_mask=None, *a, **kw: (
        padding.append(padding_mask), forward(self, x, padding_mask, *a, **kw))[1])
    logits = model(ids, attention_mask=mask, **{CACHE_NAME: model.new_cache(max_cache_len=size)}).logits
    assert padding == [None, None]
    assert torch.allclose(logits, model(ids, use_cache=False).logits, atol=1e-5)
    padding.clear()
    mask[0, 0] = 0  # a left-padded row
    model(ids, attention_mask=mask, **{CACHE_NAME: model.new_cache(max_cache_len=size)})
    assert all(p is not None and not p[0, 0] and p[1].all() for p in padding) and len(padding) == 2


def test_forward_compiles_as_one_graph():
    """``_can_compile_fullgraph = True`` is what transformers' tests read: besides the decoding steps above, the
    plain forward (padding, no cache) traces without a graph break."""
    model = small_model(attention="dcmha", num_hidden_layers=1)
    ids, mask = prompts()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    expected = model(ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(compiled(ids, attention_mask=mask, use_cache=False).logits, expected)
    assert DCFormerForCausalLM._can_compile_fullgraph


def test_static_cache_docstring_example_runs():
    import doctest

    import headmix.models.cache

    failures, tried = doctest.testmod(headmix.models.cache)
    assert tried > 0 and failures == 0


def test_compiled_decoding_step_on_the_split_kernels():
    """DCMHA layers on the fused kernels (interpreted on the CPU): the compiled static-cache steps run the split-key
    custom op, keys split over programs and their statistics combined on the device, as one graph, and give the
    reference path's dynamic-cache tokens, with left padding and a ring that wraps."""
    pytest.importorskip("headmix.ops.triton")
    model = small_model(attention="dcmha", hidden_size=64)  # head dim 16: the kernels' smallest
    ids, mask = prompts()
    new = 5
    kwargs = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    expected = model.generate(ids, **kwargs)  # backend "auto" on the CPU: the reference path
    for layer in model.model.layers:
        layer.attention.backend = "triton"
    ops = []

    def backend(graph_module, example_inputs):
        ops.append([str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"])
        return graph_module.forward

    config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True
    torch._dynamo.reset()
    cache = model.new_cache(max_cache_len=70)  # 70 slots: the global layer's keys split over programs (32 each)
    tokens = model.generate(ids, compile_config=config, **{CACHE_NAME: cache}, **kwargs)
    assert torch.equal(tokens, expected)
    assert 1 <= len(ops) <= 2 and all(any("dcmha_inference" in op for op in graph) for graph in ops)


def test_generate_compiles_with_static_shapes_unless_told(monkeypatch):
    """Without a compile config, ``generate()``'s compiled step has static shapes (``dynamic=False``): a second
    batch size recompiles for it rather than going symbolic (which broke inductor's code generation for DCFormer++ on
    a GPU). A config given to ``generate()`` or set in ``generation_config`` is taken as it is."""
    model = small_model()
    calls = []

    def compile_spy(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", compile_spy)
    model.get_compiled_call(None)
    assert calls[-1]["dynamic"] is False and calls[-1]["mode"] == CompileConfig().mode
    model.get_compiled_call(CompileConfig(dynamic=True))
    assert calls[-1]["dynamic"] is True
    model.get_compiled_call(CompileConfig(dynamic=None, fullgraph=True))  # (generate() passes generation_config's)
    assert calls[-1]["dynamic"] is None and calls[-1]["fullgraph"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("static", [True, False])
def test_gpu_compiled_decoding_step_is_one_graph_on_the_kernels(static):
    """On CUDA (torch 2.11 on the GPU machine, whose dynamo traces less than CI's 2.13), the compiled static-cache step
    of a DCMHA model, with and without the static mix, is one graph (``fullgraph=True``: a graph break raises) that runs
    the fused kernels' op, and gives the eager tokens. A graph break per layer (``bool(ParameterDict)``) once made
    DCFormer++-405M decode 4x slower there, unseen by the CPU tests."""
    pytest.importorskip("headmix.ops.triton")
    model = small_model(attention="dcmha", hidden_size=64, attention_options={"static": static}).cuda()
    ids, mask = (t.cuda() for t in prompts())
    expected = greedy(model, ids, mask, cache_implementation="static", disable_compile=True)
    ops = []

    def backend(graph_module, example_inputs):
        ops.append([str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"])
        return graph_module.forward

    torch._dynamo.reset()
    config = CompileConfig(backend=backend, fullgraph=True, mode=None, dynamic=False)
    tokens = greedy(model, ids, mask, cache_implementation="static", compile_config=config)
    assert torch.equal(tokens, expected)
    assert 1 <= len(ops) <= 2 and all(any("dcmha_inference" in op for op in graph) for graph in ops), ops


def test_dcmha_key_side_is_one_packed_buffer_per_layer():
    """The static cache keeps DCMHA's key-side factors and gates (both Compose steps) in one ``(batch, slots,
    width)`` buffer per layer, beside the keys and values: one write per step and one compiled-step input, not six.
    The layer reads the fields as views of it, and the tokens are the dynamic cache's (the tests above)."""
    model = small_model(attention="dcmha")
    ids, mask = prompts()
    cache = model.new_cache(max_cache_len=PROMPT + 2)
    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None,
                   **{CACHE_NAME: cache})
    layer = model.model.layers[1].attention
    G, M, R = layer.groups, layer.num_heads // layer.groups, layer.rank
    for static_layer in cache.layers:
        state = static_layer.state
        assert set(state) == {"k", "v", "key_weights"} and all(isinstance(t, torch.Tensor) for t in state.values())
        assert state["key_weights"].shape == (2, static_layer.slots, 2 * (2 * G * R * M + G * M))
        _, key_side = layer.composition_state(torch.randn(2, 1, layer.dim))
        views = static_layer.views({"k": state["k"], "v": state["v"], **key_side})["key_weights"]
        assert views["post"].key_gate.shape == (2, static_layer.slots, G, M)
        assert views["post"].key_gate.untyped_storage().data_ptr() == state["key_weights"].untyped_storage().data_ptr()


def test_generate_reuses_its_static_cache_across_calls(monkeypatch):
    """Calls of ``generate(cache_implementation="static")`` of one batch decode with one cache, emptied in between
    (the same shapes and buffer addresses: on CUDA the compiled step's graph replays instead of being compiled or
    recorded again), also for a shorter generation, and give the tokens of a fresh cache; another batch size, beams
    or a longer generation gets a cache of its own, as does a model cast since; a cache handed back to the caller is
    neither emptied nor reused by a later call."""
    model = small_model(attention="dcmha")
    ids, mask = prompts()
    made = []
    new_cache = type(model).new_cache
    monkeypatch.setattr(type(model), "new_cache", lambda self, max_cache_len=None: made.append(
        new_cache(self, max_cache_len)) or made[-1] if max_cache_len else new_cache(self))
    expected = greedy(model, ids, mask)
    for _ in range(3):
        assert torch.equal(greedy(model, ids, mask, cache_implementation="static"), expected)
    assert len(made) == 1
    shorter = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=0, eos_token_id=None, cache_implementation="static")
    assert torch.equal(shorter[:, ids.shape[1]:], expected[:, :4]) and len(made) == 1  # the longer cache, reused
    longer = model.generate(ids, attention_mask=mask, max_new_tokens=NEW + 2, min_new_tokens=NEW + 2, do_sample=False,
                            pad_token_id=0, eos_token_id=None, cache_implementation="static")
    assert torch.equal(longer[:, ids.shape[1]:NEW + ids.shape[1]], expected) and len(made) == 2
    one = greedy(model, ids[:1], mask[:1], cache_implementation="static")  # batch 1: a new cache
    assert torch.equal(one, greedy(model, ids[:1], mask[:1])) and len(made) == 3
    beams = dict(num_beams=2, cache_implementation="static")
    assert torch.equal(greedy(model, ids[:1], mask[:1], **beams), greedy(model, ids[:1], mask[:1], num_beams=2))
    assert len(made) == 4  # (two beams: batch 2, which the kept batch-1 cache does not fit)
    kept = model._static_cache
    model.double()  # cast since: the kept cache's buffers are float32, a new one is made
    assert torch.equal(greedy(model, ids, mask, cache_implementation="static"), greedy(model, ids, mask))
    assert model._static_cache is not kept and model._static_cache.layers[0].state["k"].dtype == torch.float64
    model.float()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         pad_token_id=0, eos_token_id=None, cache_implementation="static", return_dict_in_generate=True)
    handed = getattr(out, CACHE_NAME, None) or out.past_key_values
    seen = handed.get_seq_length()
    assert torch.equal(greedy(model, ids, mask, cache_implementation="static"), expected)
    assert handed.get_seq_length() == seen and model._static_cache is not handed


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("dtype,shape", [(torch.float64, (3, 1, 64, 8, 2)), (torch.float32, (2, 4, 48, 4, 3)),
                                         (torch.float64, (1, 2, 32, 16, 1)), (torch.float32, (2, 1, 64, 32, 2))])
def test_dcmha_hands_a_decoding_step_its_weights_packed(kernel, dtype, shape):
    """DCMHA's decoding state (a static cache, one new position): the query side's fields are those of
    ``composition_state`` (views of one packed tensor), the key side is the static cache's packed row of its fields
    (what ``pack`` makes of them), by the PyTorch code and by the rows kernel (interpreted on the CPU), also with one
    Compose; a layer whose projection does not pack (two head groups, no key-wise terms, no gates) keeps
    ``composition_state``."""
    if kernel:
        pytest.importorskip("headmix.ops.triton")
    B, T, dim, heads, rank = shape
    torch.manual_seed(sum(shape))
    layer = DCMHA(dim, heads, rank=rank, init="paper", backend="triton" if kernel else "reference").to(dtype)
    x = 3 * torch.randn(B, T, dim, dtype=dtype)
    pytorch = copy.deepcopy(layer)
    pytorch.backend = "reference"  # its composition_state: the PyTorch code (the triton layer's takes the kernel)
    with torch.no_grad():  # (the kernel serves generation: no autograd)
        query, keys = pytorch.composition_state(x)
        packed_query, packed_keys = layer.decoding_state(x)
    assert isinstance(packed_keys["key_weights"], torch.Tensor)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed_keys["key_weights"], pack(keys["key_weights"], dtype), **tol)
    for c in ("pre", "post"):
        fields = [getattr(packed_query["query_weights"][c], f) for f in ("query_w1", "query_w2", "query_gate")]
        assert len({t.untyped_storage().data_ptr() for t in fields}) == 1  # views of one tensor, no copies
        for f, t in zip(("query_w1", "query_w2", "query_gate"), fields):
            torch.testing.assert_close(t, getattr(query["query_weights"][c], f), **tol)
    for options, packs in ((dict(groups=2), False), (dict(key_wise=False), False), (dict(gates=False), False),
                           (dict(post=False), True)):
        other = DCMHA(dim, heads, rank=rank, init="paper", backend=layer.backend, **options).to(dtype)
        assert other.dynamic.packs_rows == packs
        with torch.no_grad():
            expected, got = other.composition_state(x), other.decoding_state(x)
        assert isinstance(got[1]["key_weights"], torch.Tensor) == packs
        got_keys = got[1]["key_weights"] if packs else pack(got[1]["key_weights"], dtype)
        torch.testing.assert_close(got_keys, pack(expected[1]["key_weights"], dtype), **tol)


@pytest.mark.parametrize("dtype,shape", [(torch.float64, (3, 5, 64, 8, 2)), (torch.float32, (2, 7, 48, 4, 3)),
                                         (torch.bfloat16, (2, 9, 64, 16, 2))])
def test_an_eager_prefill_takes_its_dynamic_weights_from_the_rows_kernel(dtype, shape, monkeypatch):
    """Without autograd on the kernels (interpreted here), ``composition_state`` (a short prefill, an evaluation) takes
    every Compose field from one rows-kernel launch, each field contiguous (what the attention kernels read without a
    copy) and equal to the PyTorch code's to rounding; with autograd, more positions than
    ``KERNEL_FIELDS_MAX_POSITIONS``, or a projection that does not pack, the PyTorch code's fields as they are."""
    pytest.importorskip("headmix.ops.triton")
    B, T, dim, heads, rank = shape
    torch.manual_seed(sum(shape))
    layer = DCMHA(dim, heads, rank=rank, init="paper", backend="triton").to(dtype)
    pytorch = copy.deepcopy(layer)
    pytorch.backend = "reference"
    x = 3 * torch.randn(B, T, dim, dtype=dtype)
    launches = []
    real = layer.dynamic.kernel_fields
    layer.dynamic.kernel_fields = lambda x: launches.append(x.shape) or real(x)
    with torch.no_grad():
        got, expected = layer.composition_state(x), pytorch.composition_state(x)
    assert launches == [x.shape]
    if dtype == torch.bfloat16:  # both round differently (most fields an ulp apart): each against float64 instead
        with torch.no_grad():
            exact = copy.deepcopy(pytorch).double().composition_state(x.double())
    for side in (0, 1):
        for c in ("pre", "post"):
            g, e = (next(iter(state[side].values()))[c] for state in (got, expected))
            for f in ("query_w1", "query_w2", "query_gate", "key_w1", "key_w2", "key_gate"):
                if getattr(e, f) is None:
                    assert getattr(g, f) is None
                    continue
                assert getattr(g, f).is_contiguous() and getattr(g, f).dtype == dtype
                if dtype != torch.bfloat16:
                    tol = 1e-12 if dtype == torch.float64 else 1e-6
                    torch.testing.assert_close(getattr(g, f), getattr(e, f), rtol=tol, atol=tol)
                    continue
                ref = getattr(next(iter(exact[side].values()))[c], f)
                kernel_error, pytorch_error = ((getattr(t, f).double() - ref).norm() / ref.norm() for t in (g, e))
                # both within bf16's rounding (an ulp is 2^-7 relative; measured: 0.0049 against PyTorch's 0.0032)
                assert kernel_error <= 2**-7 and pytorch_error <= 2**-7, (f, kernel_error, pytorch_error)
    with torch.enable_grad():  # training: the PyTorch code, with autograd
        layer.composition_state(x)
    monkeypatch.setattr(dcmha_module, "KERNEL_FIELDS_MAX_POSITIONS", B * T - 1)
    with torch.no_grad():
        layer.composition_state(x)
    monkeypatch.setattr(dcmha_module, "KERNEL_FIELDS_MAX_POSITIONS", B * T)
    other = DCMHA(dim, heads, rank=rank, init="paper", backend="triton", gates=False).to(dtype)  # does not pack
    other.dynamic.kernel_fields = lambda x: launches.append(x.shape)
    with torch.no_grad():
        other.composition_state(x)
    assert launches == [x.shape]


def test_a_decoding_step_passes_the_packed_weights_to_the_kernels_without_copies(monkeypatch):
    """In a static-cache decoding step on the kernels (interpreted), the one-query kernel reads the query side's
    fields as views of the step's packed rows and the key side's as views of the cache's packed buffer (one storage
    each, nothing copied), and the tokens are the reference path's."""
    pytest.importorskip("headmix.ops.triton")
    from headmix.ops.triton import launch

    model = small_model(attention="dcmha", hidden_size=64)
    ids, mask = prompts()
    expected = greedy(model, ids, mask)
    for layer in model.model.layers:
        layer.attention.backend = "triton"
    storages = []
    one_query = launch._one_query_forward

    def spy(q, k, v, scale, m, mask_strides, weights, row_strides, flags, shape):
        rows = [weights[i] for i in (1, 2, 5, 8, 9, 12)]  # query_w1, query_w2, query_gate of pre, then post
        keys = [weights[i] for i in (3, 4, 6, 10, 11, 13)]
        storages.append(({t.untyped_storage().data_ptr() for t in rows},
                         {t.untyped_storage().data_ptr() for t in keys}))
        return one_query(q, k, v, scale, m, mask_strides, weights, row_strides, flags, shape)

    monkeypatch.setattr(launch, "_one_query_forward", spy)
    tokens = greedy(model, ids, mask, **{CACHE_NAME: model.new_cache(max_cache_len=40)})
    assert torch.equal(tokens, expected)
    assert len(storages) == 2 * (NEW - 1)  # two layers, every step after the prefill
    assert all(len(rows) == 1 and len(keys) == 1 for rows, keys in storages)


def test_a_static_cache_decoding_step_keeps_its_gradients():
    """With gradients on, a decoding step against the static cache (the packed decoding state, PyTorch's code) gives
    the dynamic cache's output and the same gradients for the layer's parameters and its input."""
    torch.manual_seed(3)
    layer = DCMHA(32, 4, rank=2, init="paper", rotary=True).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    results = []
    for cache in (StaticLayerCache(8), LayerCache()):
        with torch.no_grad():
            layer(x[:, :4], cache=cache)
        new = x[:, 4:].clone().requires_grad_()
        out = layer(new, positions=torch.tensor([4]), cache=cache)
        results.append((out, torch.autograd.grad(out.square().sum(), [new, *layer.parameters()], allow_unused=True)))
    (static, static_grads), (dynamic, dynamic_grads) = results
    torch.testing.assert_close(static, dynamic)
    for a, b in zip(static_grads, dynamic_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
