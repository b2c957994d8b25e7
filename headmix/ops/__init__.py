"""Fast paths for composed attention, each checked against :mod:`headmix.reference`.

A backend is a function with the signature of :func:`headmix.reference.composed_attention` plus
``chunk_size`` and ``structure`` keywords (``structure=(causal, window)`` says the mask is exactly
that positional mask, so a kernel need not read it). Layers look backends up by name here:

* ``"reference"``: :func:`headmix.reference.composed_attention`, materialised (the spec).
* ``"chunked"``: query blocks with activation checkpointing, linear memory (:mod:`.chunked`).
* ``"triton"``: fused Triton kernels (:mod:`.triton_dcmha`), registered when ``triton`` imports;
  runs on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1`` (slow, for tests).
* ``"auto"``: ``triton`` for CUDA tensors whose shape and dtype the kernels take (:func:`triton_takes`:
  float32/bfloat16/float16, power-of-two head dims 16-128, up to 16 heads per group for training and 32
  for inference), falling back to ``chunked`` with a warning should a kernel not fit the GPU; else
  ``chunked`` beyond one block of queries, else ``reference`` (decoding steps).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch
from torch import Tensor

from .._validation import check_choice, check_positive_int
from ..reference import composed_attention
from .chunked import chunked_composed_attention

Backend = Callable[..., Tensor]

_BACKENDS: dict[str, Backend] = {
    "reference": lambda q, k, v, chunk_size=None, structure=None, **kw: composed_attention(q, k, v, **kw),
    "chunked": chunked_composed_attention,
}
# optional: the fused kernels need triton (shipped with CUDA builds of torch). Imported on first use, not
# with headmix: triton and the kernels' definitions cost about a second of import time.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_module():
    """:mod:`.triton_dcmha`, imported (and registered as ``"triton"``) on first use."""
    from . import triton_dcmha

    _BACKENDS.setdefault("triton", triton_dcmha.triton_composed_attention)
    return triton_dcmha


def __getattr__(name: str):
    if name == "triton_composed_attention":
        return _triton_module().triton_composed_attention if _HAS_TRITON else None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_backend(name: str, fn: Backend) -> None:
    """Make ``fn`` selectable as ``backend=name`` in every composed-attention layer."""
    _BACKENDS[name] = fn


def available_backends() -> tuple[str, ...]:
    return ("auto", *_BACKENDS, *(("triton",) if _HAS_TRITON and "triton" not in _BACKENDS else ()))


def triton_takes(like: Tensor, groups: int = 1, training: bool | None = None) -> bool:
    """Whether the fused kernels take queries shaped and typed like ``like`` (device aside), in ``groups`` head
    groups, with gradients when ``training`` (default: ``torch.is_grad_enabled()``)."""
    if not _HAS_TRITON:
        return False
    training = torch.is_grad_enabled() if training is None else training
    try:
        _triton_module().check_supported(tuple(like.shape), like.shape[-1], groups, like.dtype, training)
    except ValueError:
        return False
    return True


def resolve_backend(name: str, query_len: int, chunk_size: int, like: Tensor | None = None,
                    groups: int = 1) -> Backend:
    """The backend function for ``name``. ``"auto"`` picks ``triton`` for CUDA tensors ``like`` (the queries)
    whose shape and dtype the kernels take (:func:`triton_takes`), falling back to the chunked path should
    a kernel not fit the GPU; else ``chunked`` when there is more than one block of queries, else
    ``reference``."""
    check_choice("backend", name, available_backends())
    check_positive_int("chunk_size", chunk_size)
    if name == "triton":
        _triton_module()  # imports and registers the kernels
    if name == "auto":
        # The kernels whenever they take the shape: training, prefill and decoding (the split-key kernel).
        # Decoding, measured on an H100 against a 4096-token cache (docs/kernels.md): head dim 64: 0.55-0.56 vs
        # 1.13 ms per step (batch 1) and 0.74-0.75 vs 1.24 ms (batch 16) for the materialised path; head dim 128:
        # 0.76-0.80 vs 1.02 ms and 0.92-0.98 vs 1.25 ms.
        if like is not None and like.is_cuda and triton_takes(like, groups):
            return functools.partial(_BACKENDS["triton"], fallback=True)
        name = "chunked" if query_len > chunk_size else "reference"
    elif name == "triton" and like is not None and not like.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels slowly on "
                         "the CPU); use backend='auto' or 'chunked' on the CPU")
    return _BACKENDS[name]


__all__ = ["available_backends", "chunked_composed_attention", "register_backend", "resolve_backend", "triton_takes"]
