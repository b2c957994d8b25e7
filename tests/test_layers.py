"""The four layers through their public API: equivalences, switches, learning, parameter counts."""

from __future__ import annotations

import doctest

import pytest
import torch
from helpers import composition_parameters, copy_into, randomise_composition

import headmix.layers.collaborative
import headmix.layers.dcmha
import headmix.layers.mha
import headmix.layers.talking_heads
from headmix import DCMHA, CollaborativeAttention, MultiHeadAttention, TalkingHeadsAttention

DIM, HEADS = 48, 6


def _padding(batch: int, seq: int) -> torch.Tensor:
    lengths = torch.tensor([seq, seq - 3, 2][:batch])
    return torch.arange(seq)[None] < lengths[:, None]


CASES = [
    dict(causal=True, padding=False),
    dict(causal=False, padding=False),
    dict(causal=True, padding=True),
    dict(causal=False, padding=True),
    dict(causal=True, padding=True, rotary=True, bias=True),
    dict(causal=True, padding=False, window=4, rotary=True, rotary_fraction=0.5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("groups", [1, 3])
def test_fresh_dcmha_equals_mha(case, backend, groups):
    options = {k: v for k, v in case.items() if k != "padding"}
    mha = MultiHeadAttention(DIM, HEADS, **options)
    dcmha = DCMHA(DIM, HEADS, groups=groups, backend=backend, chunk_size=4, **options)
    missing, unexpected = dcmha.load_state_dict(mha.state_dict(), strict=False)
    assert not unexpected and all(k in composition_parameters(dcmha) for k in missing)
    x = torch.randn(3, 11, DIM)
    mask = _padding(3, 11) if case["padding"] else None
    assert (dcmha(x, padding_mask=mask) - mha(x, padding_mask=mask)).abs().max() <= 1e-6


@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fresh_talking_heads_equals_mha(case):
    options = {k: v for k, v in case.items() if k != "padding"}
    mha = MultiHeadAttention(DIM, HEADS, **options)
    th = TalkingHeadsAttention(DIM, HEADS, **options)
    th.load_state_dict(mha.state_dict(), strict=False)
    x = torch.randn(3, 11, DIM)
    mask = _padding(3, 11) if case["padding"] else None
    assert (th(x, padding_mask=mask) - mha(x, padding_mask=mask)).abs().max() <= 1e-6
    with torch.no_grad():
        th.pre_mix.normal_()
    assert (th(x, padding_mask=mask) - mha(x, padding_mask=mask)).abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_collaborative_full_rank_block_mixing_equals_mha(case):
    options = {k: v for k, v in case.items() if k != "padding"}
    mha = MultiHeadAttention(DIM, HEADS, **options)
    collab = CollaborativeAttention.from_multi_head(mha)
    assert collab.key_dim == HEADS * mha.head_dim
    expected_mixing = torch.zeros(HEADS, DIM)
    for h in range(HEADS):
        expected_mixing[h, h * mha.head_dim : (h + 1) * mha.head_dim] = 1.0
    assert torch.equal(collab.mixing, expected_mixing)
    x = torch.randn(3, 11, DIM)
    mask = _padding(3, 11) if case["padding"] else None
    assert (collab(x, padding_mask=mask) - mha(x, padding_mask=mask)).abs().max() <= 1e-6


def test_collaborative_shares_one_key_across_heads():
    layer = CollaborativeAttention(DIM, HEADS, key_dim=20)
    q, k = layer.queries_keys(torch.randn(2, 5, DIM))
    assert q.shape == (2, HEADS, 5, 20) and k.shape == (2, 1, 5, 20)  # one key head, not HEADS copies


# -- switches ----------------------------------------------------------------------------------
SWITCHES = ["pre", "post", "static", "query_wise", "key_wise", "gates"]


def _zero_term(layer: DCMHA, switch: str) -> None:
    """Zero the parameters of one term in ``layer`` (which has it on), so that the term contributes nothing."""
    dyn = layer.dynamic
    with torch.no_grad():
        if switch in ("pre", "post"):
            for c, (comp, _) in enumerate(dyn.factor_kinds):
                if comp == switch:
                    dyn.factors[:, c, :, layer.rank :] = 0
            for c, (comp, _) in enumerate(dyn.gate_kinds):
                if comp == switch:
                    dyn.gates[:, :, c] = 0
            layer.static[switch].zero_()
        elif switch == "static":
            for w in layer.static.values():
                w.zero_()
        elif switch in ("query_wise", "key_wise"):
            side = switch.split("_")[0]
            for c, (_, s) in enumerate(dyn.factor_kinds):
                if s == side:
                    dyn.factors[:, c, :, layer.rank :] = 0
        elif switch == "gates":
            dyn.gates.zero_()


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_really_switches(switch):
    torch.manual_seed(1)
    on = DCMHA(DIM, HEADS, groups=2, rank=2, backend="reference")
    randomise_composition(on, seed=3)
    off = DCMHA(DIM, HEADS, groups=2, rank=2, backend="reference", **{switch: False})
    copy_into(on, off)
    assert len(composition_parameters(off)) <= len(composition_parameters(on))
    x = torch.randn(2, 9, DIM)
    with torch.no_grad():
        assert (on(x) - off(x)).abs().max() > 1e-3, "switching the term off did not change the output"
        _zero_term(on, switch)
        assert (on(x) - off(x)).abs().max() <= 1e-6, "the term changed the output with zero parameters"


# -- learning from initialisation -----------------------------------------------------------------
def _grads_over_two_sgd_steps(layer: DCMHA) -> dict[str, torch.Tensor]:
    """For each composition parameter (and each of w_1 / w_2 inside ``factors``): did any step give a non-zero gradient?"""
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    seen: dict[str, bool] = {}
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(2, 7, DIM, generator=gen)
        target = torch.randn(2, 7, DIM, generator=gen)
        optimizer.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        for name, p in composition_parameters(layer).items():
            parts = {name: p.grad}
            if name == "dynamic.factors":
                parts = {"w_1 factors": p.grad[..., : layer.rank, :], "w_2 factors": p.grad[..., layer.rank :, :]}
            for part, grad in parts.items():
                seen[part] = seen.get(part, False) or bool(grad is not None and grad.abs().max() > 0)
        optimizer.step()
    return seen


def test_every_composition_parameter_learns_from_identity_init():
    layer = DCMHA(DIM, HEADS, groups=2, backend="reference")
    seen = _grads_over_two_sgd_steps(layer)
    assert set(seen) == {"dynamic.hidden", "w_1 factors", "w_2 factors", "dynamic.gates", "static.pre", "static.post"}
    assert all(seen.values()), seen


def test_saddle_init_is_caught():
    """Zeroing both factors (the saddle) leaves w_1 and the hidden projection without gradient: the test above would fail."""
    layer = DCMHA(DIM, HEADS, backend="reference")
    with torch.no_grad():
        layer.dynamic.factors.zero_()
    seen = _grads_over_two_sgd_steps(layer)
    assert not seen["w_1 factors"] and not seen["dynamic.hidden"]


def test_paper_init_is_small_random_everywhere():
    layer = DCMHA(DIM, HEADS, init="paper")
    for name, p in composition_parameters(layer).items():
        assert 0 < p.abs().max() < 0.2, name


# -- parameter counts --------------------------------------------------------------------------
def dcmha_param_count(D, H, G, R, K, P, S, gates, static, bias=False):
    """The closed form in DCMHA's docstring."""
    M = H // G
    C, Cg = P * S, (2 * P if gates else 0)
    return 4 * D * D + D * G * C * K + G * C * K * 2 * R * M + D * G * Cg * M + (P * G * M * M if static else 0) + (
        4 * D if bias else 0
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(groups=2, rank=1),
        dict(groups=3, rank=4, hidden_dim=5, bias=True),
        dict(post=False, key_wise=False),
        dict(query_wise=False, key_wise=False, static=False),
        dict(gates=False, pre=False),
    ],
)
def test_dcmha_parameter_count_matches_formula(options):
    layer = DCMHA(DIM, HEADS, **options)
    G = options.get("groups", 1)
    expected = dcmha_param_count(
        DIM, HEADS, G, options.get("rank", 2), options.get("hidden_dim", 4 * HEADS // G),
        P=int(options.get("pre", True)) + int(options.get("post", True)),
        S=int(options.get("query_wise", True)) + int(options.get("key_wise", True)),
        gates=options.get("gates", True), static=options.get("static", True), bias=options.get("bias", False),
    )
    assert sum(p.numel() for p in layer.parameters()) == expected


@pytest.mark.parametrize("options", [{}, dict(groups=2, rank=3), dict(post=False, key_wise=False)])
def test_dcmha_composition_weights_come_out_contiguous(options):
    """Every Compose field of the dynamic projection is a contiguous tensor at any batch and length: the fused
    kernels take contiguous fields and copied each strided slice (one launch per field per call; 12 per layer of
    a 405M DCFormer++ prefill); the values are those of the per-kind einsum and slices."""
    import torch.nn.functional as F

    from headmix.layers.dcmha import FACTOR_NORM_EPS

    layer = DCMHA(DIM, HEADS, init="paper", **options)
    x = torch.randn(3, 7, DIM)
    query, key = layer.composition_state(x)
    fields = [(side, c, name, t) for side, state in (("query", query["query_weights"]), ("key", key["key_weights"]))
              for c, w in state.items() for name, t in vars(w).items() if t is not None]
    assert fields and all(t.is_contiguous() for *_, t in fields)
    dyn = layer.dynamic
    R = dyn.rank
    w = torch.einsum("btgck,gckrm->btgcrm", F.gelu(torch.einsum("btd,dgck->btgck", x, dyn.hidden)), dyn.factors)
    g = torch.tanh(torch.einsum("btd,dgcm->btgcm", x, dyn.gates)) if dyn.gates is not None else None
    for side, c, name, t in fields:
        if name.endswith("gate"):
            expected = g[:, :, :, dyn.gate_kinds.index((c, side))]
        else:
            kind = w[:, :, :, dyn.factor_kinds.index((c, side))]
            expected = (F.rms_norm(kind[..., :R, :], (kind.shape[-1],), eps=FACTOR_NORM_EPS) if name.endswith("w1")
                        else kind[..., R:, :])
        torch.testing.assert_close(t, expected)


@pytest.mark.parametrize("bias", [False, True])
def test_baseline_parameter_counts_match_formulas(bias):
    D, H, Dk = DIM, HEADS, 20
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(MultiHeadAttention(D, H, bias=bias)) == 4 * D * D + (4 * D if bias else 0)
    assert count(TalkingHeadsAttention(D, H, bias=bias)) == 4 * D * D + 2 * H * H + (4 * D if bias else 0)
    assert count(CollaborativeAttention(D, H, key_dim=Dk, bias=bias)) == 2 * D * Dk + H * Dk + 2 * D * D + (
        2 * Dk + 2 * D if bias else 0
    )


# -- dtypes, docs ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [MultiHeadAttention, TalkingHeadsAttention, DCMHA, CollaborativeAttention])
def test_low_precision_runs_and_stays_close(cls, dtype):
    layer = cls(DIM, HEADS)
    x = torch.randn(2, 9, DIM)
    ref = layer(x)
    out = layer.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 5e-2 * ref.abs().max()


@pytest.mark.parametrize(
    "module", [headmix.layers.mha, headmix.layers.talking_heads, headmix.layers.dcmha, headmix.layers.collaborative]
)
def test_docstring_examples_run(module):
    failures, tried = doctest.testmod(module, verbose=False)
    assert tried > 0 and failures == 0


@pytest.mark.parametrize("cls, window, padded, builds", [
    (MultiHeadAttention, None, False, False),  # SDPA's is_causal
    (MultiHeadAttention, 3, False, True),  # the CPU's masked SDPA reads it
    (DCMHA, 3, False, False),  # the structure (causal, window) describes it
    (TalkingHeadsAttention, None, False, False),
    (DCMHA, 3, True, True),  # padding: a tensor part
    (CollaborativeAttention, None, False, True),
])
def test_the_dense_mask_is_built_only_for_layers_that_read_it(cls, window, padded, builds, monkeypatch):
    """A layer whose core takes the causal/window structure instead of the ``(T x S)`` mask is not handed one (its
    kernels are skipped); the output equals the materialised path's, which builds it."""
    import headmix.layers.base as base

    calls = []
    real = base.attention_mask
    monkeypatch.setattr(base, "attention_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = cls(32, 4, window=window)
    randomise_composition(layer)
    x = torch.randn(2, 7, 32)
    padding = torch.tensor([[0] * 2 + [1] * 5, [1] * 7]).bool() if padded else None
    out = layer(x, padding)
    assert bool(calls) == builds
    torch.testing.assert_close(out, layer(x, padding, implementation="eager"), atol=1e-5, rtol=1e-5)
