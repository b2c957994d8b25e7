"""Every bad input raises a ValueError naming the argument, the value given and what is allowed."""

from __future__ import annotations

import pytest
import torch

from headmix import DCMHA, CollaborativeAttention, MultiHeadAttention, TalkingHeadsAttention

LAYERS = [MultiHeadAttention, TalkingHeadsAttention, DCMHA, CollaborativeAttention]


@pytest.mark.parametrize("cls", LAYERS)
def test_dim_not_divisible_by_heads(cls):
    with pytest.raises(ValueError, match=r"dim=50 must be divisible by num_heads=4"):
        cls(50, 4)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_num_heads_must_be_positive_int(cls, bad):
    with pytest.raises(ValueError, match=rf"num_heads={bad!r} is not allowed: expected an integer >= 1"):
        cls(48, bad)


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one(rank):
    with pytest.raises(ValueError, match=rf"rank={rank} is not allowed: expected an integer >= 1"):
        DCMHA(48, 6, rank=rank)


def test_groups_not_dividing_heads():
    with pytest.raises(ValueError, match=r"num_heads=6 must be divisible by groups=4"):
        DCMHA(48, 6, groups=4)


def test_unknown_backend_and_init():
    with pytest.raises(ValueError, match=r"backend='flash' is not allowed: expected one of \('auto', 'reference', 'chunked'"):
        DCMHA(48, 6, backend="flash")
    with pytest.raises(ValueError, match=r"init='zeros' is not allowed: expected one of \('identity', 'paper'\)"):
        DCMHA(48, 6, init="zeros")
    with pytest.raises(ValueError, match=r"chunk_size=0 is not allowed"):
        TalkingHeadsAttention(48, 6, chunk_size=0)


def test_key_dim_below_one():
    with pytest.raises(ValueError, match=r"key_dim=0 is not allowed: expected an integer >= 1"):
        CollaborativeAttention(48, 6, key_dim=0)


@pytest.mark.parametrize("cls", LAYERS)
def test_wrong_input_rank(cls):
    with pytest.raises(ValueError, match=r"x has shape \(10, 48\) \(2 dims\): expected 3 dims \(batch, seq, 48\)"):
        cls(48, 6)(torch.randn(10, 48))


@pytest.mark.parametrize("cls", LAYERS)
def test_wrong_feature_size(cls):
    with pytest.raises(ValueError, match=r"x has feature size 32 .* built with dim=48"):
        cls(48, 6)(torch.randn(2, 10, 32))


@pytest.mark.parametrize("cls", LAYERS)
def test_non_floating_input(cls):
    with pytest.raises(ValueError, match=r"x has dtype torch.int64: expected a floating dtype"):
        cls(48, 6)(torch.ones(2, 10, 48, dtype=torch.long))


@pytest.mark.parametrize("cls", LAYERS)
def test_padding_mask_of_wrong_shape(cls):
    with pytest.raises(ValueError, match=r"padding_mask has shape \(2, 9\): expected \(batch, key_len\) = \(2, 10\)"):
        cls(48, 6)(torch.randn(2, 10, 48), padding_mask=torch.ones(2, 9, dtype=torch.bool))


def test_float_padding_mask_refused():
    with pytest.raises(ValueError, match=r"padding_mask has dtype torch.float32: expected bool or an integer"):
        MultiHeadAttention(48, 6)(torch.randn(2, 10, 48), padding_mask=torch.ones(2, 10))


def test_bad_rotary_and_window():
    with pytest.raises(ValueError, match=r"rotary_fraction=1.5 is not allowed"):
        MultiHeadAttention(48, 6, rotary=True, rotary_fraction=1.5)
    with pytest.raises(ValueError, match=r"window=0 is not allowed"):
        MultiHeadAttention(48, 6, window=0)
    with pytest.raises(ValueError, match=r"key_dim=12 must be a multiple of head_dim=8 when rotary=True"):
        CollaborativeAttention(48, 6, key_dim=12, rotary=True)
