"""MultiHeadAttention's fused path for windows and padding (headmix.ops.flex) against the plain SDPA-with-mask path.

On the CPU FlexAttention runs in its unfused eager form, which evaluates ``mask_mod`` on every (query, key) pair
and ignores the block lists; so the block lists are checked on their own (every allowed pair lies in a listed
block, full blocks are fully allowed, skipped blocks hold none), and the values through FlexAttention. The
compiled kernels (which do use the block lists) are checked on CUDA by the last tests.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import headmix.ops.flex as flex
from headmix import MultiHeadAttention
from headmix.masks import attention_mask
from headmix.layers.cache import LayerCache
from headmix.ops.flex import (BLOCK, dense_block_mask, flex_masked_attention, masked_attention,
                              positional_block_mask, sdpa_masked_attention)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def random_case(rng: random.Random, batch: int | None = None) -> dict:
    """Random shapes, window, causality and padding: sequence lengths on and off block boundaries."""
    return dict(batch=batch or rng.randint(1, 3), heads=rng.randint(1, 3), head_dim=rng.choice([8, 16]),
                seq=rng.choice([1, 5, BLOCK - 1, BLOCK, BLOCK + 3, 2 * BLOCK + 17, 3 * BLOCK]),
                window=rng.choice([None, 1, 7, BLOCK, BLOCK + 9, 300]), causal=rng.random() < 0.75,
                padding=rng.random() < 0.5)


def case_mask(case: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(padding (B, T) or None, boolean mask (B|1, 1, T, T) or None) of a case, as the layers build them."""
    B, T = case["batch"], case["seq"]
    padding = None
    if case["padding"]:
        padding = torch.rand(B, T) < 0.8
        padding[0, : T // 2] = False  # a left-padded row: its first queries see no key at all
    positions = torch.arange(T)
    return padding, attention_mask(positions, positions, causal=case["causal"], window=case["window"],
                                   key_padding=padding)


def listed_blocks(block_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) boolean block grids ``(B, nq, nk)`` from a BlockMask's index lists."""
    def grid(counts, indices):
        B, _, nq = counts.shape
        nk = indices.shape[-1]
        out = torch.zeros(B, nq, nk, dtype=torch.bool)
        for b in range(B):
            for i in range(nq):
                out[b, i, indices[b, 0, i, : counts[b, 0, i]].long()] = True
        return out

    partial = grid(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = (grid(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
            if block_mask.full_kv_num_blocks is not None else torch.zeros_like(partial))
    return partial, full


def check_block_lists(block_mask, mask: torch.Tensor) -> None:
    """Every allowed (query, key) pair is in a listed block; full blocks are all allowed; none is listed twice."""
    B, _, T, S = mask.shape
    nq, nk = -(-T // BLOCK), -(-S // BLOCK)
    padded = torch.nn.functional.pad(mask[:, 0], (0, nk * BLOCK - S, 0, nq * BLOCK - T))
    blocks = padded.view(B, nq, BLOCK, nk, BLOCK)
    has_pair = blocks.any(dim=4).any(dim=2)
    all_pairs = blocks.all(dim=4).all(dim=2)
    partial, full = listed_blocks(block_mask)
    partial, full = partial[:, :nq, :nk].expand(B, -1, -1), full[:, :nq, :nk].expand(B, -1, -1)
    assert not (partial & full).any()
    assert torch.equal(partial | full, has_pair), "a block with an allowed pair is skipped, or an empty one listed"
    assert not (full & ~all_pairs).any(), "a block listed as full holds a masked pair"


def test_block_lists_of_dense_and_positional_masks():
    rng = random.Random(0)
    for _ in range(30):
        case = random_case(rng)
        _, mask = case_mask(case)
        if mask is None:
            continue
        check_block_lists(dense_block_mask(mask), mask)
        if not case["padding"]:
            T = case["seq"]
            check_block_lists(positional_block_mask(T, T, case["causal"], case["window"], torch.device("cpu")), mask)


def test_positional_block_mask_skips_blocks_outside_the_window():
    """The point of the block mask: a 256 window over 2048 causal keys visits ~3 of 16 key blocks per query block."""
    block_mask = positional_block_mask(2048, 2048, True, 256, torch.device("cpu"))
    partial, full = listed_blocks(block_mask)
    visited = (partial | full).sum(-1)
    assert visited.max() <= 3 and visited[0, 5:].min() == 3
    assert positional_block_mask(2048, 2048, True, 256, torch.device("cpu")) is block_mask  # cached


@pytest.mark.parametrize("seed", range(3))
def test_flex_forward_matches_the_sdpa_path(seed):
    """float64: FlexAttention under the dense and the positional block masks gives the plain path's output,
    zeros included for queries that see no key."""
    rng = random.Random(seed)
    for _ in range(5):
        case = random_case(rng)
        padding, mask = case_mask(case)
        B, H, T, D = case["batch"], case["heads"], case["seq"], case["head_dim"]
        q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
        want = sdpa_masked_attention(q, k, v, mask, scale=D**-0.5)
        got = flex_masked_attention(q, k, v, mask, scale=D**-0.5)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        if padding is None:
            got = flex_masked_attention(q, k, v, mask, scale=D**-0.5, structure=(case["causal"], case["window"]))
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_flex_backward_matches_the_sdpa_path(monkeypatch):
    """float64 gradients through FlexAttention's math form. torch 2.13 refuses gradients on the CPU in its
    argument check only (its math backward exists): the check is lifted here, for this test alone."""
    monkeypatch.setattr("torch.nn.attention.flex_attention._validate_device", lambda *tensors: None)
    rng = random.Random(7)
    for _ in range(4):
        case = random_case(rng)
        case["padding"] = True
        _, mask = case_mask(case)
        B, H, T, D = case["batch"], case["heads"], case["seq"], case["head_dim"]
        leaves = [torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        grad_out = torch.randn(B, H, T, D, dtype=torch.float64)
        want = torch.autograd.grad(sdpa_masked_attention(*leaves, mask, scale=D**-0.5), leaves, grad_out)
        got = torch.autograd.grad(flex_masked_attention(*leaves, mask, scale=D**-0.5), leaves, grad_out)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_layer_on_the_flex_path_matches_the_plain_path_with_padding_and_a_cache(monkeypatch):
    """MultiHeadAttention(window=...) with padding, then decoding against its cache, with FlexAttention forced on
    (as on CUDA) against the same layer on the SDPA path, float32."""
    torch.manual_seed(1)
    layer = MultiHeadAttention(32, 4, window=9, rotary=True)
    x = torch.randn(2, 150, 32)
    padding = torch.ones(2, 150, dtype=torch.bool)
    padding[1, :20] = False

    def run():
        cache = LayerCache()
        with torch.no_grad():
            prefix = layer(x[:, :140], padding_mask=padding[:, :140], cache=cache)
            steps = [layer(x[:, t : t + 1], positions=torch.tensor([t]), cache=cache) for t in range(140, 150)]
            whole = layer(x, padding_mask=padding)
            plain = layer(x)
        return [prefix, *steps, whole, plain]

    want = run()
    calls = []
    real = flex.flex_masked_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("structure"))
        return real(*args, **kwargs)

    monkeypatch.setattr(flex, "flex_takes", lambda q: True)
    monkeypatch.setattr(flex, "flex_masked_attention", counted)
    got = run()
    assert len(calls) == 1 + 10 + 1 + 1 and calls[-1] == (True, 9) and calls[0] is None
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_window_covering_every_key_takes_the_causal_kernel(monkeypatch):
    monkeypatch.setattr(flex, "flex_masked_attention", lambda *a, **k: pytest.fail("FlexAttention was called"))
    monkeypatch.setattr(flex, "flex_takes", lambda q: True)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    mask = attention_mask(torch.arange(40), torch.arange(40), causal=True, window=64)
    got = masked_attention(q, k, v, mask, scale=0.3, structure=(True, 64))
    torch.testing.assert_close(got, sdpa_masked_attention(q, k, v, mask, scale=0.3))


def test_cpu_training_falls_back_to_sdpa_cleanly():
    """On the CPU, gradients and all: no FlexAttention, no warning, the plain path's values."""
    q, k, v = (torch.randn(2, 2, 300, 8, requires_grad=True) for _ in range(3))
    mask = attention_mask(torch.arange(300), torch.arange(300), causal=True, window=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = masked_attention(q, k, v, mask, scale=0.3, structure=(True, 20))
    out.sum().backward()
    torch.testing.assert_close(out, sdpa_masked_attention(q, k, v, mask, scale=0.3))


def test_an_unknown_backend_is_named():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="backend='fast' is not known: expected 'auto', 'flex' or 'sdpa'"):
        masked_attention(q, q, q, None, scale=1.0, backend="fast")


def cuda(test):
    """A GPU test: marked ``gpu`` and skipped without CUDA (the compiled FlexAttention kernels)."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@cuda
@pytest.mark.parametrize("dtype, head_dim, causal, window, padding", [
    (torch.bfloat16, 64, True, 100, False), (torch.bfloat16, 80, True, 300, True),
    (torch.float16, 128, False, 200, False), (torch.bfloat16, 64, True, None, True)])
def test_compiled_flex_kernels_match_float32_sdpa_on_cuda(dtype, head_dim, causal, window, padding):
    """The compiled kernels (which read the block lists) in bf16/fp16 against float32 SDPA with the mask, forward
    and backward, relative error of the whole tensor (bf16 operands: under 2e-2), 1000 tokens (not whole blocks)."""
    case = dict(batch=2, heads=3, head_dim=head_dim, seq=1000, window=window, causal=causal, padding=padding)
    _, mask = case_mask(case)
    mask = mask.cuda()
    B, H, T, D = 2, 3, 1000, head_dim
    leaves = [torch.randn(B, H, T, D, device="cuda", requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(B, H, T, D, device="cuda")
    want_out = sdpa_masked_attention(*leaves, mask, scale=D**-0.5)
    want = [want_out, *torch.autograd.grad(want_out, leaves, grad_out)]
    low = [t.detach().to(dtype).requires_grad_() for t in leaves]
    structure = None if padding else (causal, window)
    got_out = masked_attention(*low, mask, scale=D**-0.5, structure=structure)
    got = [got_out, *torch.autograd.grad(got_out, low, grad_out.to(dtype))]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        error = ((g.float() - w).norm() / w.norm()).item()
        assert error < 2e-2, (name, error)
    if padding:
        assert got_out[0, :, : T // 2].abs().max() == 0  # the padded row's first queries see no key


@cuda
def test_windowed_layer_under_torch_compile_matches_eager_on_cuda():
    """MultiHeadAttention(window=256) compiled (FlexAttention traced into the layer's graph) against eager.

    dynamo's state is reset first: after another test compiled the same ``Attention.forward`` at another length,
    this compile is a recompile, dynamo marks the sequence length dynamic, and torch 2.11's inductor fails to
    lower flex_attention with a symbolic length (LoweringException 'ShapeAsConstantBuffer' object has no attribute
    'dtype', H200, 2026-11-30; docs/kernels_log.md). Static shapes are what this test checks."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MultiHeadAttention(256, 4, window=256, rotary=True).cuda().to(torch.bfloat16)
    x = torch.randn(2, 1024, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    eager = layer(x)
    (eager_grad,) = torch.autograd.grad(eager.float().square().sum(), x)
    compiled = torch.compile(layer)(x)
    (compiled_grad,) = torch.autograd.grad(compiled.float().square().sum(), x)
    for g, w in ((compiled, eager), (compiled_grad, eager_grad)):
        assert ((g.float() - w.float()).norm() / w.float().norm()).item() < 1e-2


def test_a_kernel_past_its_recompile_limit_hands_over_to_sdpa(monkeypatch):
    """Should dynamo refuse another recompile of the FlexAttention kernel, the masked SDPA path answers (the same
    result), with one warning, instead of dynamo's unfused FlexAttention that builds every score."""
    def refuses(*args, **kwargs):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile_limit reached")

    monkeypatch.setattr(flex, "_compiled_flex", lambda: refuses)
    monkeypatch.setattr(flex, "_FLEX_GAVE_UP", [])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 160, 16, generator=g, dtype=torch.float64) for _ in range(3))
    positions = torch.arange(160)
    mask = attention_mask(positions, positions, window=32)
    expected = flex.sdpa_masked_attention(q, k, v, mask, scale=0.25)
    with pytest.warns(RuntimeWarning, match="recompiled"):
        out = flex._run_compiled_flex(q, k, v, mask, None, scale=0.25)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(flex._run_compiled_flex(q, k, v, mask, None, scale=0.25), expected, rtol=0, atol=0)
