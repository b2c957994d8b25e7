"""Re-parametrizing multi-head attention as collaborative attention (Cordonnier et al., 2020)."""

from __future__ import annotations

import pytest
import torch

from headmix import CollaborativeAttention, MultiHeadAttention
from headmix.convert.collaborative import collaborative_from_multi_head, query_key_products, reparametrize

pytest.importorskip("tensorly")
pytestmark = pytest.mark.filterwarnings("ignore:Trying to compute SVD")


def _padding():
    return torch.arange(11)[None] < torch.tensor([[11], [8], [3]])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_full_rank_is_exact(bias, causal):
    torch.manual_seed(0)
    mha = MultiHeadAttention(48, 6, bias=bias, causal=causal)
    if bias:  # make every bias matter
        for p in (mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias, mha.out_proj.bias):
            torch.nn.init.normal_(p)
    collab, weights = collaborative_from_multi_head(mha, key_dim=48)
    assert weights.relative_error == 0.0
    x = torch.randn(3, 11, 48)
    for mask in (None, _padding()):
        ref = mha(x, padding_mask=mask)
        assert ((collab(x, padding_mask=mask) - ref).norm() / ref.norm()) <= 1e-4


def test_key_bias_cancels_and_query_bias_becomes_content_bias():
    """The derivation in the module docstring, checked numerically on the scores of one head."""
    torch.manual_seed(1)
    wq, wk = torch.randn(2 * 4, 8, dtype=torch.float64), torch.randn(2 * 4, 8, dtype=torch.float64)
    bq, bk = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    weights = reparametrize(wq, wk, 2, key_dim=8, query_bias=bq)
    for h in range(2):
        q = x @ wq[h * 4 : (h + 1) * 4].T + bq[h * 4 : (h + 1) * 4]
        k = x @ wk[h * 4 : (h + 1) * 4].T + bk[h * 4 : (h + 1) * 4]
        original = (q @ k.T).softmax(-1)
        shared = (x @ weights.query * weights.mixing[h]) @ (x @ weights.key).T + (x @ weights.content_bias[h])[None]
        torch.testing.assert_close(shared.softmax(-1), original, rtol=1e-12, atol=1e-12)


def test_lower_ranks_degrade_monotonically():
    torch.manual_seed(2)
    mha = MultiHeadAttention(48, 6)
    errors = [collaborative_from_multi_head(mha, key_dim=k)[1].relative_error for k in (48, 36, 24, 12, 6)]
    assert errors[0] == 0.0
    assert all(a < b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1.0


def test_einsum_and_khatri_rao_mttkrp_give_the_same_factors_and_backends_are_restored(monkeypatch):
    """The decomposition uses TensorLy's einsum MTTKRP (faster); it must equal the default Khatri-Rao one
    and leave the caller's TensorLy backends as they were."""
    import tensorly as tl

    torch.manual_seed(3)
    mha = MultiHeadAttention(32, 4)
    args = (mha.q_proj.weight, mha.k_proj.weight, 4, 12)
    assert torch.backends.opt_einsum.is_available()
    fast = reparametrize(*args, n_iter_max=15)
    assert (tl.get_backend(), tl.tenalg.get_backend()) == ("numpy", "core")
    monkeypatch.setattr(torch.backends.opt_einsum, "is_available", lambda: False)  # the Khatri-Rao product path
    slow = reparametrize(*args, n_iter_max=15)
    for a, b in ((fast.query, slow.query), (fast.key, slow.key), (fast.mixing, slow.mixing)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    assert abs(fast.relative_error - slow.relative_error) < 1e-10


def test_data_aware_decomposition_lowers_the_logit_error_on_real_like_inputs():
    """Inputs with a skewed covariance: whitening by it beats the plain decomposition on held-out logits."""
    torch.manual_seed(3)
    d, heads = 32, 4
    mixing = torch.randn(d, d) * torch.linspace(0.05, 2.0, d)  # anisotropic activations
    sample = lambda n: torch.randn(n, d) @ mixing  # noqa: E731
    wq, wk = torch.randn(d, d), torch.randn(d, d)
    products = query_key_products(wq.double(), wk.double(), heads)
    x_i, x_j = sample(2000).double(), sample(2000).double()

    def logit_error(w):
        approx = torch.einsum("hr,ir,jr->hij", w.mixing, w.query, w.key)
        delta = torch.einsum("ni,hij,nj->hn", x_i, approx - products, x_j)
        exact = torch.einsum("ni,hij,nj->hn", x_i, products, x_j)
        return (delta.norm() / exact.norm()).item()

    plain = reparametrize(wq, wk, heads, key_dim=12)
    aware = reparametrize(wq, wk, heads, key_dim=12, calibration=sample(4000))
    assert aware.whitened_error is not None
    assert logit_error(aware) < 0.8 * logit_error(plain)


def test_rotary_layers_are_refused():
    with pytest.raises(ValueError, match="cannot re-parametrize a layer with rotary position embedding"):
        collaborative_from_multi_head(MultiHeadAttention(48, 6, rotary=True), key_dim=24)


@pytest.mark.parametrize("key_dim,message", [(0, r"key_dim=0 is not allowed"), (49, r"key_dim=49 is not allowed: expected 1 <= key_dim <= d_in=48")])
def test_bad_key_dim(key_dim, message):
    with pytest.raises(ValueError, match=message):
        collaborative_from_multi_head(MultiHeadAttention(48, 6), key_dim=key_dim)


def test_content_bias_is_cached_per_key_when_decoding():
    from headmix.models.cache import LayerCache

    torch.manual_seed(4)
    layer = CollaborativeAttention(32, 4, key_dim=12, content_bias=True)
    torch.nn.init.normal_(layer.content_bias)
    x = torch.randn(2, 9, 32)
    full = layer(x)
    cache = LayerCache()
    steps = [layer(x[:, :4], positions=torch.arange(4), cache=cache)]
    for t in range(4, 9):
        steps.append(layer(x[:, t : t + 1], positions=torch.tensor([t]), cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-6)
    assert "content" in cache.state


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("content_bias", [False, True])
def test_layer_equals_the_reference_equation(causal, content_bias):
    """The layer's SDPA path against :func:`headmix.reference.collaborative_attention`, forward and backward
    (float64, random mixing and content bias, padding)."""
    from headmix.masks import attention_mask
    from headmix.reference import collaborative_attention

    torch.manual_seed(3)
    layer = CollaborativeAttention(24, 4, key_dim=12, content_bias=content_bias, causal=causal).double()
    with torch.no_grad():
        layer.mixing.normal_()
        if content_bias:
            layer.content_bias.normal_()
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    padding = torch.arange(7)[None] < torch.tensor([[7], [4]])
    out = layer(x, padding_mask=padding)
    positions = torch.arange(7)
    mask = attention_mask(positions, positions, causal=causal, key_padding=padding)
    v = layer.split_heads(layer.v_proj(x), 4)
    content = x @ layer.content_bias.T * layer.scale if content_bias else None
    spec = collaborative_attention(layer.query(x), layer.key(x), v, layer.mixing, scale=layer.scale,
                                   content=content, mask=mask)
    expected = layer.out_proj(spec.transpose(1, 2).reshape(2, 7, 24))
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(got, want)
