"""The ops registry and the chunked path: mask descriptions, grouped-query heads, window-limited key blocks."""

from __future__ import annotations

import pytest
import torch

from headmix.masks import MaskSpec, attention_mask
from headmix.ops import chunked_composed_attention
from headmix.reference import ComposeWeights, composed_attention


def _weights(B, T, S, G, M, R, generator):
    def r(*shape):
        return (0.5 * torch.randn(*shape, generator=generator, dtype=torch.float64)).requires_grad_()

    return ComposeWeights(static=r(G, M, M), query_w1=r(B, T, G, R, M), query_w2=r(B, T, G, R, M),
                          key_w1=r(B, S, G, R, M), key_w2=r(B, S, G, R, M), query_gate=r(B, T, G, M),
                          key_gate=r(B, S, G, M))


@pytest.mark.parametrize("spec_kwargs, T, S", [
    (dict(causal=True, window=5), 23, 23),
    (dict(causal=False, window=4), 19, 19),
    (dict(causal=True, window=6, query_offset=None), 9, 30),  # a block of queries against a longer cache
    (dict(causal=True), 17, 17),
])
def test_chunked_matches_reference_with_structured_masks_and_grouped_heads(spec_kwargs, T, S):
    """Forward and every gradient; k, v with 2 heads for 4 query heads, against the reference on repeated heads."""
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, D, G, R = 2, 4, 2, 8, 2, 2
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    pre, post = (_weights(B, T, S, G, H // G, R, g) for _ in range(2))
    padding = torch.ones(B, S, dtype=torch.bool)
    padding[1, :3] = False
    spec = MaskSpec(key_padding=padding, **spec_kwargs)
    dense = attention_mask(torch.arange(S - T, S), torch.arange(S), causal=spec.causal, window=spec.window,
                           key_padding=padding)
    leaves = [q, k, v, *(t for w in (pre, post) for t in vars(w).values())]
    ref = composed_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), scale=D**-0.5, mask=dense,
                             pre=pre, post=post, groups=G)
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(ref, leaves, do)
    out = chunked_composed_attention(q, k, v, scale=D**-0.5, mask=spec, pre=pre, post=post, groups=G, chunk_size=4)
    grads = torch.autograd.grad(out, leaves, do)
    for a, b in zip([out, *grads], [ref, *expected]):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max().clamp_min(1e-30)


def test_chunked_skips_key_blocks_outside_the_window(monkeypatch):
    """With a 4-key window each block of 8 queries sees at most 8 + 3 keys, whatever the sequence length."""
    import headmix.ops.chunked as chunked_module

    seen = []
    original = chunked_module.composed_attention

    def spy(q, k, *args, **kwargs):
        seen.append((q.shape[-2], k.shape[-2]))
        return original(q, k, *args, **kwargs)

    monkeypatch.setattr(chunked_module, "composed_attention", spy)
    q = torch.randn(1, 2, 40, 4)
    chunked_composed_attention(q, q, q, scale=0.5, chunk_size=8, mask=MaskSpec(causal=True, window=4))
    assert seen == [(8, 8)] + [(8, 11)] * 4


def test_mask_spec_dense_and_errors():
    spec = MaskSpec(causal=True, window=3, query_offset=2)
    expected = attention_mask(torch.arange(2, 6), torch.arange(7), causal=True, window=3)
    assert torch.equal(spec.dense(4, 7), expected)
    assert MaskSpec().dense(3, 3) is None and MaskSpec(causal=True).plain_causal
    assert not MaskSpec(causal=True, window=4).plain_causal
    with pytest.raises(ValueError, match="mask must be a MaskSpec, a bool tensor or None, got torch.float32"):
        composed_attention(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), scale=1.0,
                           mask=torch.zeros(2, 2))
