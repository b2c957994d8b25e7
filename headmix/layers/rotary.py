"""Rotary position embedding (Su et al., 2021), "rotate half" convention, optionally partial.

Channel ``j`` of the rotated part is paired with channel ``j + rot_dim/2`` (the GPT-NeoX / LLaMA
convention, also the official DCFormer code's). With ``fraction < 1`` only the first
``fraction * head_dim`` channels of each head rotate (Pythia uses 0.25); the rest pass through.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validation import check_positive_int
from ..ops import _eager_triton, _triton_module

DEFAULT_BASE = 10000.0  # theta of Su et al. (2021), LLaMA and GPT-NeoX
#: Eager CUDA tensors of at least this many numbers rotate in one Triton kernel (:mod:`headmix.ops.triton.rotary`),
#: smaller ones (a decoding step, a short prefill) in the PyTorch code below, whose C++ calls cost less host time
KERNEL_MIN_NUMEL = 1 << 20


class RotaryEmbedding(nn.Module):
    """Rotate queries/keys by their absolute positions.

    Args:
        head_dim: channels per head.
        base: the frequency base ``theta`` (:data:`DEFAULT_BASE` in most models).
        fraction: share of each head's channels that rotate, in ``(0, 1]``.

    A vector wider than ``head_dim`` (collaborative attention's shared key) is rotated independently
    within each consecutive block of ``head_dim`` channels.
    """

    def __init__(self, head_dim: int, base: float = DEFAULT_BASE, fraction: float = 1.0) -> None:
        super().__init__()
        check_positive_int("head_dim", head_dim)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"rotary_fraction={fraction!r} is not allowed: expected 0 < fraction <= 1")
        if base <= 0:
            raise ValueError(f"rotary_base={base!r} is not allowed: expected a positive number")
        rot_dim = int(head_dim * fraction)
        rot_dim -= rot_dim % 2
        if rot_dim < 2:
            raise ValueError(
                f"rotary_fraction={fraction} of head_dim={head_dim} rotates {rot_dim} channels: need at least 2"
            )
        self.head_dim = head_dim
        self.rot_dim = rot_dim
        self.base = float(base)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``cos``, ``sin`` of shape ``(batch or 1, 1, seq, rot_dim)`` for ``positions`` ``(seq,)`` or ``(batch, seq)``."""
        pos = positions if positions.dim() == 2 else positions[None]
        # theta_k = base^(-2k / rot_dim), computed in float64 so that every dtype starts from the same angles
        inv_freq = self.base ** (-torch.arange(0, self.rot_dim, 2, dtype=torch.float64, device=pos.device) / self.rot_dim)
        angles = (pos[..., None].double() * inv_freq).to(dtype)  # (B, T, rot_dim/2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos(), angles.sin()

    @property
    def table_key(self) -> tuple[int, int, float]:
        """What :meth:`cos_sin` depends on besides the positions: rotary embeddings with equal keys share tables
        (a model computes them once per forward for all its layers)."""
        return self.head_dim, self.rot_dim, self.base

    def forward(self, x: Tensor, positions: Tensor, cos_sin: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Rotate ``x`` of shape ``(batch, heads, seq, channels)``, blockwise over ``head_dim``-sized blocks.
        ``cos_sin``: this embedding's :meth:`cos_sin` of ``positions`` in ``x``'s compute dtype (float32, or float64
        for float64 inputs), computed once and shared; ``None`` (or another dtype): computed here."""
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        if cos_sin is None or cos_sin[0].dtype != compute_dtype:
            cos_sin = self.cos_sin(positions, compute_dtype)
        cos, sin = cos_sin
        if kernel_takes(x, compute_dtype):
            return _triton_module().rotary.triton_rotary(x, cos, sin, self.head_dim, self.rot_dim)
        return self.rotate(x, cos, sin)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The rotation in PyTorch, given the tables (:meth:`cos_sin` in ``x``'s compute dtype): the spec of the
        Triton kernel that :meth:`forward` runs where :func:`kernel_takes` says."""
        compute_dtype = cos.dtype
        shape = x.shape
        blocks = x.reshape(*shape[:-1], shape[-1] // self.head_dim, self.head_dim)
        rot, rest = blocks[..., : self.rot_dim], blocks[..., self.rot_dim :]
        half = self.rot_dim // 2
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over blocks
        out = (rot.to(compute_dtype) * cos + rotated_half.to(compute_dtype) * sin).to(x.dtype)
        if rest.shape[-1] == 0:  # every channel rotates: no concatenation (a copy of x, and its backward)
            return out.reshape(shape)
        return torch.cat([out, rest], dim=-1).reshape(shape)


def kernel_takes(x: Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether :meth:`RotaryEmbedding.forward` rotates ``x`` in the Triton kernel (:mod:`headmix.ops.triton.rotary`:
    the arithmetic and rounding of :meth:`RotaryEmbedding.rotate`): eager CUDA tensors ``(B, H, T, C)`` of
    :data:`KERNEL_MIN_NUMEL` numbers or more computed in float32 (not float64), plain tensors (not a tensor subclass
    such as a fake or functorch-wrapped one), outside ``torch.compile`` (inductor fuses the PyTorch code itself) and
    autocast."""
    return (type(x) is Tensor and x.dim() == 4 and compute_dtype == torch.float32
            and _eager_triton(x, KERNEL_MIN_NUMEL))
