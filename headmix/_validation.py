"""Argument checks shared by every public entry point.

Each check raises a :class:`ValueError` whose message names the argument, the value that was
given and what is allowed, so that a bad call fails at the user's line rather than deep inside an
``einsum``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not allowed: expected an integer >= 1")
    return value


def check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if value % by != 0:
        raise ValueError(
            f"{name}={value} must be divisible by {by_name}={by} "
            f"(remainder {value % by}); choose {name} as a multiple of {by}"
        )


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: expected one of {allowed}")


def check_input(x: Any, dim: int, name: str = "x") -> None:
    """``x`` must be a floating tensor of shape ``(batch, seq, dim)``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (batch, seq, {dim}); got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} ({x.dim()} dims): expected 3 dims (batch, seq, {dim})"
        )
    if x.shape[-1] != dim:
        raise ValueError(
            f"{name} has feature size {x.shape[-1]} (shape {tuple(x.shape)}): this layer was built "
            f"with dim={dim}, so expected shape (batch, seq, {dim})"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{name} has dtype {x.dtype}: expected a floating dtype (float16, bfloat16, float32, float64); "
            "token ids go through an embedding first"
        )


def check_padding_mask(mask: Any, batch: int, key_len: int) -> torch.Tensor:
    """A key padding mask of shape ``(batch, key_len)``; True / 1 marks a real token."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"padding_mask must be a torch.Tensor of shape ({batch}, {key_len}); got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, key_len):
        raise ValueError(
            f"padding_mask has shape {tuple(mask.shape)}: expected (batch, key_len) = ({batch}, {key_len}), "
            "True/1 for real tokens and False/0 for padding"
        )
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"padding_mask has dtype {mask.dtype}: expected bool or an integer 0/1 mask")
    return mask.bool()
