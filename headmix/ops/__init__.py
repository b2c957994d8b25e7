"""Fast paths for composed attention, each checked against :mod:`headmix.reference`.

A backend is a function with the signature of :func:`headmix.reference.composed_attention` (``mask`` a
:class:`headmix.masks.MaskSpec`, a bool tensor or ``None``; ``k``, ``v`` with ``H`` or ``H_kv`` heads) plus a
``chunk_size`` keyword. Layers look backends up by name here:

* ``"reference"``: :func:`headmix.reference.composed_attention`, materialised (the spec).
* ``"chunked"``: query blocks with activation checkpointing, linear memory (:mod:`.chunked`).
* ``"triton"``: fused Triton kernels (:mod:`.triton`), imported and registered on first use;
  runs on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1`` (slow, for tests).
* ``"auto"``: ``triton`` for CUDA tensors whose shape and dtype the kernels take (:func:`triton_takes`:
  float32/bfloat16/float16, head dims 16-128, up to 32 heads per group);
  else ``chunked`` beyond one block of queries, else ``reference`` (decoding steps). Inside ``torch.compile``
  without gradients, one block of queries (a compiled decoding step against the static cache) runs
  :data:`COMPILED_DECODE` on CUDA: the split-key kernels (three launches with no host synchronisation, which the
  step's CUDA graph captures) or the materialised path (which inductor fuses into the step's graph).

The fallback policy lives here: when ``auto`` cannot use the kernels for a CUDA tensor (a shape they do not
take, or a kernel that does not fit the GPU at run time), it runs the chunked path and warns once per reason,
naming it: the chunked path is 10-40x slower than the kernels on a GPU, which a user should not discover by
accident.

Also here: :func:`rms_norm`, RMS normalisation of short rows (QK-norm, DCMHA's dynamic-weight factors) on a Triton
kernel in eager CUDA code, PyTorch's ``rms_norm`` (its spec) everywhere else.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import check_choice, check_positive_int
from ..reference import composed_attention
from .chunked import chunked_composed_attention

Backend = Callable[..., Tensor]

#: What ``"auto"`` runs in a compiled decoding step on CUDA (``torch.compile``, no gradients, one block of queries:
#: the static cache): ``"triton"``, the split-key kernels as the ``headmix::dcmha_inference`` custom op, captured
#: in the step's CUDA graph; or ``"reference"``, the materialised path, fused by inductor. Measured (H200,
#: DCFormer++-405M, batch 16): 3,267 decode tokens/s on the kernels, 2,374 on the materialised path, and a quarter
#: of the compile time (docs/results.md, "Generation: static cache and compiled decoding"); the attention core
#: alone at a 4096-key cache is faster materialised (docs/kernels_log.md, "Decoding on the device").
COMPILED_DECODE = "triton"

_BACKENDS: dict[str, Backend] = {
    "reference": lambda q, k, v, chunk_size=None, **kw: composed_attention(q, k, v, **kw),
    "chunked": chunked_composed_attention,
}
# optional: the fused kernels need triton (shipped with CUDA builds of torch). Imported on first use, not
# with headmix: triton and the kernels' definitions cost about a second of import time.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_module():
    """:mod:`.triton`, imported on first use (importing it calls :func:`_register_triton`)."""
    from . import triton as triton_ops

    return triton_ops


def _register_triton(kernel_op, backend: Backend) -> None:
    """Called by :mod:`.triton` when it is imported: the ``"triton"`` name, and this registry's fallback policy
    for a kernel that does not fit the GPU."""
    _BACKENDS.setdefault("triton", backend)
    kernel_op.FALLBACK = _kernel_does_not_fit


def __getattr__(name: str):
    if name == "triton_composed_attention":
        return _triton_module().triton_composed_attention if _HAS_TRITON else None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _kernel_does_not_fit(error: Exception, what: str) -> Backend:
    """The policy for a kernel that does not fit the GPU under ``backend="auto"``: the chunked path, warned once."""
    _warn_once(f"no-room:{what}:{error}",
               f"headmix: the fused DCMHA kernels do not fit this GPU at this shape ({error}); backend='auto' "
               f"falls back to the chunked PyTorch path for the {what} pass (much slower)")
    return chunked_composed_attention


def register_backend(name: str, fn: Backend) -> None:
    """Make ``fn`` selectable as ``backend=name`` in every composed-attention layer."""
    _BACKENDS[name] = fn


def available_backends() -> tuple[str, ...]:
    """The names a layer's ``backend=`` takes: ``"auto"``, ``"reference"``, ``"chunked"``, and ``"triton"`` where
    triton is installed."""
    return ("auto", *_BACKENDS, *(("triton",) if _HAS_TRITON and "triton" not in _BACKENDS else ()))


def _triton_refusal(like: Tensor, groups: int, training: bool, kv_heads: int | None) -> str | None:
    """Why the kernels do not take this shape (``None``: they do)."""
    if not _HAS_TRITON:
        return "triton is not installed"
    try:
        _triton_module().check_supported(tuple(like.shape), like.shape[-1], groups, like.dtype, training, kv_heads=kv_heads)
    except ValueError as error:
        return str(error)
    return None


def _auto_refusal(like: Tensor, groups: int, training: bool, kv_heads: int | None, static: bool) -> str | None:
    """Why ``backend="auto"`` does not choose the kernels for this shape: they refuse it, or they take it but are
    not yet trusted for it (``launch.auto_refusal``); ``None``: auto chooses them."""
    refusal = _triton_refusal(like, groups, training, kv_heads)
    if refusal is None:
        from .triton import launch

        refusal = launch.auto_refusal(like.shape[1] // groups, static)
    return refusal


def triton_takes(like: Tensor, groups: int = 1, training: bool | None = None, kv_heads: int | None = None) -> bool:
    """Whether the fused kernels take queries shaped and typed like ``like`` (device aside), in ``groups`` head
    groups, with ``kv_heads`` key/value heads, with gradients when ``training`` (default:
    ``torch.is_grad_enabled()``)."""
    training = torch.is_grad_enabled() if training is None else training
    return _triton_refusal(like, groups, training, kv_heads) is None


def resolve_backend(name: str, query_len: int, chunk_size: int, like: Tensor | None = None,
                    groups: int = 1, kv_heads: int | None = None, static: bool = True) -> Backend:
    """The backend function for ``name``. ``"auto"`` picks ``triton`` for CUDA tensors ``like`` (the queries)
    whose shape and dtype the kernels take (:func:`triton_takes`), with the fallback policy above; else
    ``chunked`` when there is more than one block of queries, else ``reference``. ``static``: whether a Compose may
    have a static head mix (groups of more than 16 heads train on the fused kernels only without one:
    ``launch.TRAINING_KERNELS``)."""
    check_choice("backend", name, available_backends())
    check_positive_int("chunk_size", chunk_size)
    if name == "triton":
        _triton_module()  # imports and registers the kernels
    if name == "auto":
        # The kernels whenever they take the shape: training, prefill and decoding (the split-key kernel).
        # Decoding, measured on an H100 against a 4096-token cache (docs/kernels_log.md): head dim 64: 0.55-0.56 vs
        # 1.13 ms per step (batch 1) and 0.74-0.75 vs 1.24 ms (batch 16) for the materialised path; head dim 128:
        # 0.76-0.80 vs 1.02 ms and 0.92-0.98 vs 1.25 ms.
        if like is not None and like.is_cuda and torch.compiler.is_compiling() and not torch.is_grad_enabled() \
                and query_len <= chunk_size:
            # a compiled decoding step (the static cache), one query block over the fixed cache: the split-key
            # kernels (a custom op, its launches captured in the step's CUDA graph) when COMPILED_DECODE says so
            # and they take the shape, else the materialised path, which inductor fuses into the step's graph
            check_choice("COMPILED_DECODE", COMPILED_DECODE, ("triton", "reference"))
            if COMPILED_DECODE == "triton" and _auto_refusal(like, groups, False, kv_heads, static) is None:
                return functools.partial(_BACKENDS["triton"], fallback=True)
            return _BACKENDS["reference"]
        if like is not None and like.is_cuda:
            refusal = _auto_refusal(like, groups, torch.is_grad_enabled(), kv_heads, static)
            if refusal is None:
                return functools.partial(_BACKENDS["triton"], fallback=True)
            if query_len > chunk_size:
                _warn_once(f"refused:{refusal}", f"headmix: backend='auto' runs composed attention on the chunked "
                           f"PyTorch path (much slower than the fused kernels) because {refusal}")
        name = "chunked" if query_len > chunk_size else "reference"
    elif name == "triton" and like is not None and not like.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels slowly on "
                         "the CPU); use backend='auto' or 'chunked' on the CPU")
    return _BACKENDS[name]


#: Rows up to this many numbers go to the Triton RMS norm (:func:`rms_norm`); PyTorch's kernel gives a row a thread
#: block, which suits long rows (a model's hidden size) and wastes most of the block on a head's 64 channels.
SHORT_ROW = 256
#: ... and tensors of at least this many numbers: below it the GPU time is a few microseconds either way and PyTorch's
#: C++ call costs less host time than a Python autograd function and a Triton launch (a host-bound prefill pays it)
TRITON_NORM_MIN_NUMEL = 1 << 20


def _eager_triton(x: Tensor, min_numel: int) -> bool:
    """Whether an eager helper kernel of :mod:`.triton` (the RMS norm, rotary embeddings) may take ``x``: a CUDA tensor
    of at least ``min_numel`` numbers with triton installed, outside ``torch.compile`` (inductor fuses the kernel's
    PyTorch spec itself) and autocast. Each caller adds what its kernel itself needs."""
    return (x.is_cuda and _HAS_TRITON and x.numel() >= min_numel and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cuda"))


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """:func:`torch.nn.functional.rms_norm` over the last dim of ``x`` (``weight``: ``(x.shape[-1],)`` or ``None``).

    Eager CUDA tensors of at least :data:`TRITON_NORM_MIN_NUMEL` numbers in rows of up to :data:`SHORT_ROW` run
    :mod:`headmix.ops.triton.norm`'s kernels, forward and backward (at QK-norm's 64 channels of 8 x 2048 tokens x 16
    heads on an H200: 17 + 32 us of kernels against PyTorch's 215 us forward, 523 us forward+backward:
    docs/kernels_log.md, "RMS norm of short rows"); inside ``torch.compile`` (inductor fuses the norm itself), under
    autocast, on the CPU, without triton, for smaller tensors or longer rows, PyTorch's ``rms_norm``. The results agree
    to rounding (float32 arithmetic, one rounding of the output: ``tests/test_norm.py``)."""
    if x.shape[-1] <= SHORT_ROW and _eager_triton(x, TRITON_NORM_MIN_NUMEL):
        from .triton.norm import triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


__all__ = ["COMPILED_DECODE", "SHORT_ROW", "TRITON_NORM_MIN_NUMEL", "available_backends", "chunked_composed_attention",
           "register_backend", "resolve_backend", "rms_norm", "triton_takes"]
