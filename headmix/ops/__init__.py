"""Fast paths for composed attention, each checked against :mod:`headmix.reference`.

A backend is a function with the signature of :func:`headmix.reference.composed_attention` plus a
``chunk_size`` keyword. Layers look backends up by name here; kernels register themselves with
:func:`register_backend`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .._validation import check_choice, check_positive_int
from ..reference import composed_attention
from .chunked import chunked_composed_attention

Backend = Callable[..., Tensor]

_BACKENDS: dict[str, Backend] = {
    "reference": lambda q, k, v, chunk_size=None, **kw: composed_attention(q, k, v, **kw),
    "chunked": chunked_composed_attention,
}


def register_backend(name: str, fn: Backend) -> None:
    """Make ``fn`` selectable as ``backend=name`` in every composed-attention layer."""
    _BACKENDS[name] = fn


def available_backends() -> tuple[str, ...]:
    return ("auto", *_BACKENDS)


def resolve_backend(name: str, query_len: int, chunk_size: int) -> Backend:
    """The backend function for ``name``; ``"auto"`` picks chunked when there is more than one block of queries."""
    check_choice("backend", name, available_backends())
    check_positive_int("chunk_size", chunk_size)
    if name == "auto":
        name = "chunked" if query_len > chunk_size else "reference"
    return _BACKENDS[name]


__all__ = ["available_backends", "chunked_composed_attention", "register_backend", "resolve_backend"]
