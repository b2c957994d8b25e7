"""The projected forward (``headmix.ops.triton.projected``) against the float64 reference, and where ``auto`` uses it.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, conftest.py) at tiny sizes in float32;
GPU-marked tests train in bf16 and fp16 at real sizes.
"""

from __future__ import annotations

import pytest
import torch

from headmix.masks import MaskSpec, attention_mask
from headmix.reference import ComposeWeights, compose, composed_attention

pytest.importorskip("headmix.ops.triton")
from headmix.ops.triton import launch, op, projected  # noqa: E402
from test_triton import (DEVICE, DYNAMIC, FIELDS, ON_GPU, as_cpu, as_float32,  # noqa: E402
                         assert_no_further_off_than_the_reference, compare, float32_leaves, random_weights)

CASES = [
    # B, H, H_kv, T, S, D, G, R, options
    (2, 4, 4, 40, 40, 16, 1, 2, dict(causal=True)),
    (1, 16, 4, 37, 37, 32, 1, 2, dict(causal=True, window=9)),  # grouped-query keys, a window, ragged tiles
    (2, 8, 8, 24, 24, 16, 2, 2, dict(causal=False)),  # two head groups, no mask
    (2, 4, 2, 9, 45, 20, 1, 1, dict(causal=True, padding=True)),  # decoding-like: 9 queries at the end of 45 keys
    (1, 6, 6, 30, 30, 16, 2, 2, dict(causal=True, fields=("query_w1", "key_gate"), post_on=False)),
    (1, 4, 4, 21, 21, 16, 1, 2, dict(causal=True, fields=("key_w1", "query_gate"), pre_on=False)),
    (1, 4, 4, 21, 21, 16, 1, 2, dict(causal=True, fields=("query_gate", "key_gate"))),  # gates only: no sums
]


def case_id(case) -> str:
    B, H, Hkv, T, S, D, G, R, options = case
    return f"{B}x{H}/{Hkv}x{T}x{S}x{D}-G{G}-R{R}-" + "-".join(f"{k}={v}" for k, v in options.items())


def case_inputs(case, seed: int):
    """Float64 ``q, k, v``, Compose weights (``None`` where a case turns one off), key padding (``None`` unless the
    case asks: batch 0's first third padded, the last batch row entirely, so it sees nothing) of a case, and the
    generator that drew them (for what a test draws next)."""
    B, H, Hkv, T, S, D, G, R, options = case
    g = torch.Generator().manual_seed(seed)
    fields = options.get("fields", DYNAMIC)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    pre = random_weights(B, T, S, G, H // G, R, fields, g) if options.get("pre_on", True) else None
    post = random_weights(B, T, S, G, H // G, R, fields, g) if options.get("post_on", True) else None
    padding = None
    if options.get("padding"):
        padding = torch.ones(B, S, dtype=torch.bool)
        padding[0, : S // 3] = False
        padding[-1, :] = False
    return q, k, v, pre, post, padding, g


def reference_lse(q, k, scale, mask, pre, groups):
    """Each row's log-sum-exp of the pre-Composed scores over its allowed keys (``+inf`` where none is allowed)."""
    s = scale * q @ k.transpose(-1, -2)
    if pre is not None:
        s = compose(s, pre, groups)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.where(mask.any(-1), lse, torch.full_like(lse, float("inf")))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_projected_forward_matches_reference(case):
    """Output and row ``lse`` of :func:`projected_forward` (float32) against the float64 reference: grouped-query
    keys, head groups, windows, key padding, queries at the end of a longer key range, rank 1, one Compose absent,
    gates without low-rank terms."""
    B, H, Hkv, T, S, D, G, R, options = case
    q, k, v, pre, post, padding, _ = case_inputs(case, seed=3)
    causal, window = options["causal"], options.get("window")
    mask = attention_mask(torch.arange(S - T, S), torch.arange(S), causal=causal, window=window, key_padding=padding)
    k_rep, v_rep = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    expected = composed_attention(q, k_rep, v_rep, scale=D**-0.5, mask=mask, pre=pre, post=post, groups=G)
    full = torch.ones(B, H, T, S, dtype=torch.bool) if mask is None else mask.expand(B, H, T, S)
    expected_lse = reference_lse(q, k_rep, D**-0.5, full, pre, G)

    q32, k32, v32 = (t.float().to(DEVICE) for t in (q, k, v))
    tensor_mask = None if padding is None else padding[:, None, None, :].to(DEVICE)
    out, lse = projected.projected_forward(q32, k32, v32, D**-0.5, tensor_mask, as_float32(pre), as_float32(post), G,
                                           causal, window or 0, S - T)
    error = ((out.double().cpu() - expected).norm() / expected.norm()).item()
    assert error <= 1e-5, error
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)  # rows with no allowed key: +inf
    assert torch.allclose(lse.double().cpu()[finite], expected_lse[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal, window, padding", [(True, None, False), (True, 10, True), (False, 12, False)],
                         ids=["causal", "causal-window-padding", "two-sided-window"])
def test_projected_forward_in_query_blocks_matches_reference(causal, window, padding, monkeypatch):
    """Where the whole call's sums buffers would pass ``MAX_SUMS_BYTES``, the queries go in blocks, each against the
    keys it may see (its weights' query and key fields sliced, the mask too): output and ``lse`` as the reference,
    including rows that see no key. Spied: several blocks, each with fewer keys than the call where the mask allows."""
    monkeypatch.setattr(projected, "MAX_SUMS_BYTES", 1)
    monkeypatch.setattr(projected, "MIN_BLOCK_ROWS", 16)
    calls = []
    real = projected._forward
    monkeypatch.setattr(projected, "_forward", lambda *a: calls.append((a[0].shape[2], a[1].shape[2])) or real(*a))
    g = torch.Generator().manual_seed(4)
    B, H, T, S, D, G = 2, 4, 40, 50, 16, 1
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    pre, post = (random_weights(B, T, S, G, H, 2, DYNAMIC, g) for _ in range(2))
    key_padding = None
    if padding:
        key_padding = torch.ones(B, S, dtype=torch.bool)
        key_padding[0, :25] = False  # batch 0's first block of queries sees no key
    mask = attention_mask(torch.arange(S - T, S), torch.arange(S), causal=causal, window=window,
                          key_padding=key_padding)
    expected = composed_attention(q, k, v, scale=D**-0.5, mask=mask, pre=pre, post=post, groups=G)
    full = torch.ones(B, H, T, S, dtype=torch.bool) if mask is None else mask.expand(B, H, T, S)
    expected_lse = reference_lse(q, k, D**-0.5, full, pre, G)
    tensor_mask = None if key_padding is None else key_padding[:, None, None, :].to(DEVICE)
    out, lse = projected.projected_forward(*(t.float().to(DEVICE) for t in (q, k, v)), D**-0.5, tensor_mask,
                                           as_float32(pre), as_float32(post), G, causal, window or 0, S - T)
    assert len(calls) == 3 and all(rows <= 16 for rows, _ in calls), calls
    if window:
        assert all(keys < S for _, keys in calls), calls
    assert ((out.double().cpu() - expected).norm() / expected.norm()).item() <= 1e-5
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert torch.allclose(lse.double().cpu()[finite], expected_lse[finite], rtol=1e-5, atol=1e-5)


def test_projected_forward_clamps_float16_sums_instead_of_making_nan():
    """Half inputs keep the cross-head sums in float16; scores beyond its range are clamped to it, so the softmax
    saturates (finite output) where ``inf - inf`` would have made NaN."""
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 1, 4, 20, 16
    q = (300 * torch.randn(B, H, T, D, generator=g)).half().to(DEVICE)
    k = (300 * torch.randn(B, H, T, D, generator=g)).half().to(DEVICE)
    v = torch.randn(B, H, T, D, generator=g).half().to(DEVICE)
    w = as_float32(random_weights(B, T, T, 1, H, 2, DYNAMIC, g))
    half = ComposeWeights(**{f: None if getattr(w, f) is None else getattr(w, f).detach().half() for f in FIELDS})
    assert projected.SUMS_DTYPE[torch.float16] == torch.float16
    out, _ = projected.projected_forward(q, k, v, 1.0, None, half, half, 1, True, 0, 0)
    assert torch.isfinite(out).all()


def test_projected_forward_takes_no_static_mix_and_ranks_up_to_two():
    """:func:`projected.applies` says no to a static mix and to rank 3 (the blockwise or tile forward takes those),
    and yes to the released models' Compose; asked anyway, the forward raises naming what it does not take."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 8, 16)
    dynamic = as_float32(random_weights(1, 8, 8, 1, 4, 2, DYNAMIC, g))
    static = as_float32(random_weights(1, 8, 8, 1, 4, 2, FIELDS, g))
    rank3 = as_float32(random_weights(1, 8, 8, 1, 4, 3, DYNAMIC, g))
    assert projected.applies(q, q, dynamic, dynamic, 1)
    assert not projected.applies(q, q, static, None, 1)
    assert not projected.applies(q, q, None, rank3, 1)
    with pytest.raises(ValueError, match="rank 3"):
        projected.projected_forward(q, q, q, 1.0, None, rank3, None, 1, True, 0, 0)


def training_choice(H: int, D: int, window: int | None, dtype=torch.float32, kv_heads: int | None = None, T: int = 8):
    """``op.training_choice`` for one group of ``H`` heads of head dim ``D`` (``kv_heads`` key/value heads), rank 2,
    every dynamic term: it reads shapes, dtype, window and which terms are present, not values."""
    q = torch.zeros(1, H, T, D, dtype=dtype)
    kv = q[:, : kv_heads or H]
    w = as_float32(random_weights(1, T, T, 1, H, 2, DYNAMIC, torch.Generator().manual_seed(0)))
    return op.training_choice(q, kv, kv, 1, w, w, window)


def spy(monkeypatch, calls: list) -> None:
    real = projected.projected_forward
    monkeypatch.setattr(projected, "projected_forward", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))


@pytest.mark.parametrize("training_kernels, H, D, window, max_window, expected", [
    ("auto", 16, 16, None, None, ("projected", "blockwise")),  # global: the blockwise backward
    ("blockwise", 16, 16, None, None, ("blockwise", "blockwise")),
    ("auto", 16, 16, 7, None, ("tiles", "tiles")),  # windowed, 16 heads of head dim <= 64: the tile backward
    ("tiles", 16, 16, 7, None, ("tiles", "tiles")),
    ("auto", 4, 80, 7, None, ("projected", "projected")),  # windowed, head dim 80: would be blockwise
    ("auto", 4, 80, 7, 6, ("projected", "blockwise")),  # a window wider than PROJECTED_BACKWARD_MAX_WINDOW (lowered)
], ids=["auto-global", "blockwise", "auto-window-tiles", "tiles", "auto-window-wide", "auto-wider-window"])
def test_auto_trains_on_the_projected_kernels_where_the_backward_would_be_blockwise(training_kernels, H, D, window,
                                                                                    max_window, expected,
                                                                                    monkeypatch):
    """With ``TRAINING_KERNELS = "auto"`` a training call whose backward would be the blockwise one runs the projected
    forward, and, windowed up to ``op.PROJECTED_BACKWARD_MAX_WINDOW`` keys, the projected backward too; a windowed
    layer on the tile backward and a forced path keep their own kernels. The kernels run are the ones
    ``op.training_choice`` names (spied), and output and every gradient match the float64 reference either way."""
    from headmix.ops.triton import projected_backward

    calls = []
    spy(monkeypatch, calls)
    real = projected_backward.projected_backward
    monkeypatch.setattr(projected_backward, "projected_backward", lambda *a: calls.append("bwd") or real(*a))
    monkeypatch.setattr(launch, "TRAINING_KERNELS", training_kernels)
    if max_window is not None:
        monkeypatch.setattr(op, "PROJECTED_BACKWARD_MAX_WINDOW", max_window)
    assert training_choice(H, D, window, kv_heads=H // 4, T=18) == expected
    compare(1, H, 18, 18, D, 1, 2, causal=True, window=window, fields=DYNAMIC, kv_heads=H // 4)
    assert calls.count("bwd") == (expected[1] == "projected")
    assert len(calls) - calls.count("bwd") == (expected[0] == "projected")


def test_float16_training_keeps_the_backwards_own_forward_unless_both_are_projected():
    """In float16 ``auto`` trains a global layer on the backward's own forward, a windowed one whose backward would be
    the blockwise one on the projected forward and backward (docs of ``op.training_choice``)."""
    assert training_choice(16, 16, 0) == ("projected", "blockwise")
    assert training_choice(16, 16, 0, torch.float16) == ("blockwise", "blockwise")
    assert training_choice(16, 80, 64, torch.float16) == ("projected", "projected")


def test_windowed_groups_of_more_than_16_heads_keep_the_blockwise_backward():
    """32 heads in one group, windowed: the projected forward, then the blockwise backward (no clear gain measured for
    the projected one there: ``op.PROJECTED_BACKWARD_MAX_WINDOW``'s note); 16 heads of head dim 80: both projected."""
    assert training_choice(32, 80, 256) == ("projected", "blockwise")
    assert training_choice(16, 80, 256) == ("projected", "projected")


def test_prefills_take_the_projected_forward_from_enough_scores(monkeypatch):
    """Without gradients, ``auto`` takes the projected forward from ``op.PROJECTED_MIN_SCORES`` scores and
    ``op.BLOCKWISE_MIN_QUERIES`` queries on, the tile forward below; both equal the reference."""
    calls = []
    spy(monkeypatch, calls)
    monkeypatch.setattr(op, "BLOCKWISE_MIN_QUERIES", 8)
    g = torch.Generator().manual_seed(2)
    B, H, T, D = 2, 4, 24, 16
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(DEVICE) for _ in range(3))
    w = as_float32(random_weights(B, T, T, 1, H, 2, DYNAMIC, g))
    w = ComposeWeights(**{f: None if getattr(w, f) is None else getattr(w, f).detach() for f in FIELDS})
    expected = composed_attention(q.cpu(), k.cpu(), v.cpu(), scale=D**-0.5, mask=MaskSpec(causal=True),
                                  pre=as_cpu(w), post=as_cpu(w))
    for threshold, taken in ((B * H * T * T, 1), (B * H * T * T + 1, 0)):
        calls.clear()
        monkeypatch.setattr(op, "PROJECTED_MIN_SCORES", threshold)
        with torch.no_grad():
            out = op.inference_forward(q, k, v, D**-0.5, None, w, w, 1, True, 0, 0)
        assert len(calls) == taken
        assert torch.allclose(out.cpu(), expected, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("H, head_dim, kv_heads, window", [(16, 64, 16, None), (16, 128, 4, None), (32, 80, 32, 64)],
                         ids=["16x64", "16x128", "32x80-w64"])
def test_gpu_projected_forward_trains_within_low_precision_bounds(H, head_dim, kv_heads, window, monkeypatch):
    """Training on ``auto`` in bf16 where it takes the projected forward (then the blockwise backward): the output
    within 1e-2 of float32 and no error above the reference implementation's own in bf16 (the rule of the other GPU
    tests). (Windowed 16-head layers of head dim 80 and above also take the projected backward: the forced cases.)"""
    calls = []
    spy(monkeypatch, calls)
    assert launch.TRAINING_KERNELS == "auto"
    assert_no_further_off_than_the_reference(torch.bfloat16, H, head_dim, kv_heads, DYNAMIC, B=1, T=256,
                                             window=window)
    assert calls


BACKWARD_CASES = [
    # B, H, H_kv, T, S, D, G, R, options
    (1, 4, 4, 33, 33, 16, 1, 2, dict(causal=True)),
    (1, 8, 2, 25, 25, 32, 1, 2, dict(causal=True, window=9)),  # grouped-query keys, a window, ragged tiles
    (1, 8, 8, 24, 24, 16, 2, 1, dict(causal=False)),  # two head groups, rank 1, no mask
    (2, 4, 2, 9, 30, 20, 1, 2, dict(causal=True, padding=True)),  # 9 queries at the end of 30 keys, key padding
    (1, 6, 6, 30, 30, 16, 2, 2, dict(causal=True, fields=("query_w1", "key_gate"), post_on=False)),
    (1, 4, 4, 21, 21, 16, 1, 2, dict(causal=True, fields=("key_w1", "query_gate"), pre_on=False)),
    (1, 4, 4, 21, 21, 16, 1, 2, dict(causal=True, fields=("query_gate", "key_gate"))),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=case_id)
def test_projected_backward_matches_reference(case):
    """:func:`projected_backward` (float32, from the projected forward's ``lse``): ``dq``, ``dk``, ``dv`` and the
    gradient of every present Compose field against float64 autograd through the reference."""
    from headmix.ops.triton.projected_backward import projected_backward

    B, H, Hkv, T, S, D, G, R, options = case
    q, k, v, pre, post, padding, g = case_inputs(case, seed=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    causal, window = options["causal"], options.get("window")
    mask = attention_mask(torch.arange(S - T, S), torch.arange(S), causal=causal, window=window, key_padding=padding)
    k_rep, v_rep = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    out = composed_attention(q, k_rep, v_rep, scale=D**-0.5, mask=mask, pre=pre, post=post, groups=G)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64)
    named = [("dq", q), ("dk", k), ("dv", v)] + [(f"{c}.{f}", getattr(w, f)) for c, w in (("pre", pre), ("post", post))
                                                 if w is not None for f in FIELDS if getattr(w, f) is not None]
    expected = dict(zip([n for n, _ in named], torch.autograd.grad(out, [t for _, t in named], do)))

    *args, pre32, post32 = float32_leaves(q, k, v, pre, post)
    tensor_mask = None if padding is None else padding[:, None, None, :].to(DEVICE)
    call = (D**-0.5, tensor_mask, pre32, post32, G, causal, window or 0, S - T)
    _, lse = projected.projected_forward(*args, *call)
    dq, dk, dv, dpre, dpost = projected_backward(do.float().to(DEVICE), *args, lse, *call)
    got = {"dq": dq, "dk": dk, "dv": dv, **{f"pre.{f}": t for f, t in dpre.items()},
           **{f"post.{f}": t for f, t in dpost.items()}}
    assert got.keys() == expected.keys()
    errors = {n: ((got[n].double().cpu() - e).norm() / e.norm().clamp_min(1e-30)).item() for n, e in expected.items()}
    assert all(e <= 1e-5 for e in errors.values()), errors


@pytest.mark.parametrize("case", [(1, 4, 18, 18, 16, 1, 2, dict(causal=True, kv_heads=2)),
                                  (2, 4, 5, 25, 16, 2, 1, dict(causal=True, padding=True)),
                                  (1, 4, 17, 17, 16, 1, 2, dict(causal=True, window=5, fields=("query_w1", "key_gate"),
                                                                post_on=False))], ids=["gqa", "padding",
                                                                                       "window-partial"])
def test_forced_projected_path_trains_through_the_op(case, monkeypatch):
    """``TRAINING_KERNELS = "projected"``: the custom op's forward and backward on the projected kernels (spied),
    output and every gradient against the float64 reference; with a static mix a clear error."""
    from headmix.ops.triton import projected_backward

    monkeypatch.setattr(launch, "TRAINING_KERNELS", "projected")
    calls = []
    spy(monkeypatch, calls)
    real = projected_backward.projected_backward
    monkeypatch.setattr(projected_backward, "projected_backward", lambda *a: calls.append("bwd") or real(*a))
    *shape, options = case
    compare(*shape, fields=options.pop("fields", DYNAMIC), **options)
    assert len(calls) == 2 and calls[-1] == "bwd"
    with pytest.raises(ValueError, match="without a static mix"):
        compare(1, 4, 8, 8, 16, 1, 2, causal=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H, head_dim, kv_heads, window", [(16, 64, 16, None), (16, 64, 16, 64), (32, 80, 8, None)],
                         ids=["16x64", "16x64-w64", "32x80"])
def test_gpu_forced_projected_path_trains_within_low_precision_bounds(dtype, H, head_dim, kv_heads, window,
                                                                       monkeypatch):
    """``TRAINING_KERNELS = "projected"`` (forward and backward in the projected form, one rounding of ``S'`` on both
    sides) in bf16 and fp16: the rule of the other GPU tests."""
    monkeypatch.setattr(launch, "TRAINING_KERNELS", "projected")
    assert_no_further_off_than_the_reference(dtype, H, head_dim, kv_heads, DYNAMIC, B=1, T=256, window=window)
