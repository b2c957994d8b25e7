"""The kernels as ``torch.library`` custom ops with autograd: ``torch.compile`` traces through them (fake shapes
below) without a graph break. The entry point is :func:`triton_composed_attention`.

When a kernel does not fit the GPU (Triton's ``OutOfResources``) the op raises a ``RuntimeError`` saying so,
unless the caller passed ``fallback=True`` *and* the ops registry installed a fallback policy
(:data:`FALLBACK`, see :mod:`headmix.ops`): the policy decides what runs instead (and warns).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from triton.runtime.errors import OutOfResources

from ...masks import MaskSpec, as_mask_spec
from ...reference import ComposeWeights
from . import launch, projected, projected_backward
from .blockwise import blockwise_backward, blockwise_forward
from .launch import FIELDS, check_supported, padded_heads, training_kernels, triton_backward, triton_forward

# The most elements a q, k or v tensor may have: the kernels compute element offsets in 32 bits.
MAX_ELEMENTS = 2**31 - 1

# ``FALLBACK(error, what)`` -> a backend function to run instead of the kernels (``what``: "forward",
# "backward" or "inference"); installed by the ops registry, which owns the policy. ``None``: always raise.
FALLBACK: Callable[[Exception, str], Callable[..., Tensor]] | None = None


def _no_room(error: Exception, fallback: bool, what: str) -> Callable[..., Tensor]:
    """The backend that runs a call whose kernels do not fit this GPU, or a clear ``RuntimeError``."""
    if not fallback or FALLBACK is None:
        raise RuntimeError(f"triton backend: the fused DCMHA kernels do not fit this GPU at this shape ({error}); "
                           "backend='chunked' runs it in PyTorch") from error
    return FALLBACK(error, what)


def _run(backend, q, k, v, scale, mask, pre, post, groups, causal, window, offset) -> Tensor:
    spec = MaskSpec(causal=causal, window=window or None, allowed=mask, query_offset=offset)
    return backend(q, k, v, scale=scale, mask=spec, pre=pre, post=post, groups=groups)


def _recompute_backward(backend, do, q, k, v, scale, mask, pre, post, groups, causal, window, offset):
    """``(dq, dk, dv, dpre, dpost)`` as :func:`triton_backward`, by autograd through ``backend``."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    weights = [None if w is None else {f: getattr(w, f).detach().requires_grad_() for f in FIELDS
                                       if getattr(w, f) is not None} for w in (pre, post)]
    with torch.enable_grad():
        out = _run(backend, *leaves, scale, mask, *(None if w is None else ComposeWeights(**w) for w in weights),
                   groups, causal, window, offset)
        grads = iter(torch.autograd.grad(out, [*leaves, *(t for w in weights if w for t in w.values())], do))
    dq, dk, dv = next(grads), next(grads), next(grads)
    return dq, dk, dv, *({f: next(grads) for f in (w or {})} for w in weights)


def kernels_for(q: Tensor, k: Tensor, v: Tensor, groups: int, pre, post, window, training: bool = True) -> str:
    """"tiles" or "blockwise" for these inputs: :func:`headmix.ops.triton.launch.training_kernels`, or without
    gradients (``training=False``) :func:`inference_kernels`."""
    static = any(w is not None and w.static is not None for w in (pre, post))
    heads, head_dim = padded_heads(q.shape[1] // groups), max(q.shape[-1], v.shape[-1])
    if training:
        return training_kernels(heads, head_dim, static, window or 0)
    B, H, T, _ = q.shape
    S = k.shape[2]
    return inference_kernels(heads, head_dim, static, window or 0, B * H * T * (min(S, window) if window else S))


# Without gradients the blockwise forward needs about this many scores (batch x heads x queries x keys per query) to
# beat the tile forward (inference_kernels), by padded head dim: up to 64, and above. Round figures between the
# measured points (64: the tile forward faster at 6.7e7, the blockwise at 5.4e8; 128: the blockwise faster at 6.7e7,
# the tile forward at 3.4e7).
BLOCKWISE_MIN_SCORES = {64: 1 << 28, 128: 1 << 26}


def inference_kernels(padded_heads: int, head_dim: int, static: bool, window: int, scores: int) -> str:
    """Which forward computes a layer's output without gradients (many queries: a prefill, an evaluation), for
    ``scores`` (query, key, head) pairs (keys per query: the window, if any): the blockwise one only where it trains
    (:func:`~headmix.ops.triton.launch.training_kernels` with this ``window``) and, unless the group has more than
    :data:`~headmix.ops.triton.launch.MATRIX_FORM_HEADS` heads (whose tile forward is slow: 41.5 against 9.9 ms at
    32 x 80, H200, B = 8 x 2048), from :data:`BLOCKWISE_MIN_SCORES` scores on. Below, the tile forward wins: the
    blockwise forward's launches (bounded query blocks, several each) cost host time, about 1.1 ms a call at batch 1
    whatever the shape. Measured on an H200 (2026-12-01, bf16, rank 2, every dynamic term, causal, 512 tokens, ms
    tile / blockwise; `python benchmarks/training_paths.py --inference --batch 16 --seq 512 --shapes 16x64 16x128
    --windows 0 256`, and ``--batch 1``): batch 16: 16 x 64 0.82 / 0.98, window 256 0.60 / 1.17; 16 x 128 1.21 /
    **1.00** (6.7e7 scores), window 256 0.89 / 1.11; batch 1: 16 x 64 0.38 / 1.04, window 0.32 / 1.09; 16 x 128 0.34
    / 1.11, window 0.33 / 1.13. At B = 8 x 2048 (5.4e8 scores) the blockwise training forward of a global 16 x 64
    layer took 3.8-4.3 ms against the tile forward's 4.9 (docs/kernels_log.md, 2026-11-30 and 12-01). A forced
    :data:`~headmix.ops.triton.launch.TRAINING_KERNELS` holds here too."""
    trains = training_kernels(padded_heads, head_dim, static, window)  # (also checks the setting)
    if launch.TRAINING_KERNELS != "auto" or trains == "tiles":
        return trains
    if padded_heads > launch.MATRIX_FORM_HEADS:
        return "blockwise"
    wide = launch.next_pow2(head_dim) > launch.WHOLE_HEAD_DIM
    return "blockwise" if scores >= BLOCKWISE_MIN_SCORES[128 if wide else 64] else "tiles"


def train_forward(q, k, v, scale, mask, pre, post, groups, causal, window, offset) -> tuple[Tensor, Tensor]:
    """``(O, lse)`` for training, on the forward :func:`training_choice` names: the projected forward (the fastest at
    every training shape measured, docs/kernels_log.md) before the blockwise or projected backward, else the forward of
    the kernels :func:`training_kernels` names (a forced ``TRAINING_KERNELS`` keeps its own forward)."""
    forward = training_choice(q, k, v, groups, pre, post, window)[0]
    if forward == "projected":
        _check_projected(q, k, pre, post, groups)
    if forward != "tiles":
        check_supported(tuple(q.shape), v.shape[-1], groups, q.dtype, training=True, kv_heads=k.shape[1])
        run = projected.projected_forward if forward == "projected" else blockwise_forward
        return run(q, k, v, scale, mask, pre, post, groups, causal, window, offset)
    return triton_forward(q, k, v, scale, mask, pre, post, groups, causal, window, offset, split=False)


def train_backward(do, q, k, v, lse, scale, mask, pre, post, groups, causal, window, offset):
    """Gradients as :func:`triton_backward`, on the backward :func:`training_choice` names."""
    backward = training_choice(q, k, v, groups, pre, post, window)[1]
    if backward == "projected":
        _check_projected(q, k, pre, post, groups)
        check_supported(tuple(q.shape), v.shape[-1], groups, q.dtype, training=True, kv_heads=k.shape[1])
        return projected_backward.projected_backward(do, q, k, v, lse, scale, mask, pre, post, groups, causal, window,
                                                     offset)
    if backward == "blockwise":
        check_supported(tuple(q.shape), v.shape[-1], groups, q.dtype, training=True, kv_heads=k.shape[1])
        return blockwise_backward(do, q, k, v, lse, scale, mask, pre, post, groups, causal, window, offset)
    return triton_backward(do, q, k, v, lse, scale, mask, pre, post, groups, causal, window, offset)


# Without gradients, this many queries or more (a prefill, an evaluation forward) take the projected or blockwise
# forward where they apply; fewer keep the split-key tile forward (decoding). A round figure, not tuned.
BLOCKWISE_MIN_QUERIES = 128

# Without gradients the projected forward needs about this many scores (batch x heads x queries x keys per query) to
# beat the tile forward: its four launches cost host time the tile forward's one does not. Measured on an H200
# (2026-12-02, bf16, 16 x 64, causal, rank 2, every dynamic term; .devm-style script of that day, in
# docs/kernels_log.md), ms GPU / host per call: batch 1 x 512 (4.2e6 scores) tile forward 0.56 / 0.18, projected 0.40 /
# 0.39 (window 256: 0.41 / 0.16 against 0.46 / 0.36); batch 16 x 512 (6.7e7) GPU 1.04 against 0.69 (window 256: 0.80
# against 0.65).
PROJECTED_MIN_SCORES = 1 << 24


def inference_choice(q: Tensor, k: Tensor, v: Tensor, groups: int, pre, post, window) -> str:
    """The forward :func:`inference_forward` runs for these inputs: ``"projected"``, ``"blockwise"`` or ``"tiles"``.
    From :data:`BLOCKWISE_MIN_QUERIES` queries on: the projected forward where it applies (``TRAINING_KERNELS``
    ``"auto"``) from :data:`PROJECTED_MIN_SCORES` scores on, else the blockwise forward where :func:`inference_kernels`
    names it. Otherwise the tile forward (keys split over programs when queries are few: decoding)."""
    B, H, T, _ = q.shape
    if T < BLOCKWISE_MIN_QUERIES:
        return "tiles"
    scores = B * H * T * (min(k.shape[2], window) if window else k.shape[2])
    if launch.TRAINING_KERNELS == "auto" and scores >= PROJECTED_MIN_SCORES and projected.applies(q, k, pre, post,
                                                                                                   groups):
        return "projected"
    return kernels_for(q, k, v, groups, pre, post, window, False)


def inference_forward(q, k, v, scale, mask, pre, post, groups, causal, window, offset) -> Tensor:
    """The output without gradients, on the forward :func:`inference_choice` names."""
    choice = inference_choice(q, k, v, groups, pre, post, window)
    if choice != "tiles":
        check_supported(tuple(q.shape), v.shape[-1], groups, q.dtype, training=False, kv_heads=k.shape[1])
        run = projected.projected_forward if choice == "projected" else blockwise_forward
        return run(q, k, v, scale, mask, pre, post, groups, causal, window, offset)[0]
    return triton_forward(q, k, v, scale, mask, pre, post, groups, causal, window, offset)[0]


def _check_projected(q: Tensor, k: Tensor, pre, post, groups: int) -> None:
    if not projected.applies(q, k, pre, post, groups):
        raise ValueError("TRAINING_KERNELS = 'projected' takes Composes without a static mix, of rank 1 or 2, and head "
                         f"dims of at least 16 (got head dim {q.shape[-1]}, a static mix: "
                         f"{any(w is not None and w.static is not None for w in (pre, post))})")


# ``auto`` trains a windowed layer of up to 16 heads per group whose backward would be the blockwise one (head dims
# above 64) on the projected forward and backward, up to this window. Measured on two H200 machines (2026-12-02, bf16,
# B = 8 x 2048, causal, rank 2, every dynamic term; backward ms, blockwise -> projected, first / second machine;
# docs/kernels_log.md, "The projected backward timed"): window 256: 16 x 128 7.13 -> 6.28 / 6.25 -> 5.82; 32 heads in
# one group (kept on the blockwise backward: no clear gain) 32 x 80 13.08 -> 12.25 / 11.24 -> 11.60, 32 x 128 14.36 ->
# 12.51 / 12.11 -> 11.92; global: 16 x 64 10.15 -> 17.8, 32 x 80 23.76 -> 42.11. Between 256 keys and global: not
# measured.
PROJECTED_BACKWARD_MAX_WINDOW = 256


def training_choice(q: Tensor, k: Tensor, v: Tensor, groups: int, pre, post, window) -> tuple[str, str]:
    """``(forward, backward)`` :func:`train_forward` and :func:`train_backward` run for these inputs. With
    ``TRAINING_KERNELS`` ``"auto"``, where the backward would be the blockwise one and the projected kernels apply: a
    window of up to :data:`PROJECTED_BACKWARD_MAX_WINDOW` keys in groups of up to 16 heads trains on the projected
    forward and backward; otherwise the projected forward and the blockwise backward, except in float16 (the
    blockwise forward then).
    Otherwise the backward's own forward. A backward recomputes ``P = exp(S' - lse)`` with its own rounding of ``S'``,
    so an ``lse`` from another forward adds that forward's rounding to the gradients: on the H200 (2026-12-02, T =
    256, ``tests/test_projected.py``'s GPU rule) that stayed within the reference's own bf16 error with the blockwise
    backward, and went past it with the tile backward (bf16, window 64: a weight gradient) and in float16 (whose
    backward mixes in tf32: the reference's float16 error, ~2e-3, is below the float16 sums' rounding); the projected
    forward with its own backward passes in both."""
    backward = kernels_for(q, k, v, groups, pre, post, window)
    if launch.TRAINING_KERNELS != "auto" or backward != "blockwise" or not projected.applies(q, k, pre, post, groups):
        return backward, backward
    narrow = padded_heads(q.shape[1] // groups) <= launch.MATRIX_FORM_HEADS
    if window and window <= PROJECTED_BACKWARD_MAX_WINDOW and narrow:
        return "projected", "projected"
    return ("blockwise" if q.dtype == torch.float16 else "projected"), backward


@torch.library.custom_op("headmix::dcmha_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, groups: int, causal: bool,
                window: int, offset: int, pre_present: bool, post_present: bool, weights: list[Tensor],
                fallback: bool) -> tuple[Tensor, Tensor]:
    """``(output, row log-sum-exp)`` of the fused forward kernel (on a fallback the log-sum-exp is NaN: the
    backward kernels, bigger still, fall back too)."""
    pre, post = _unflatten(pre_present, weights[:7]), _unflatten(post_present, weights[7:])
    try:
        return train_forward(q, k, v, scale, mask, pre, post, groups, causal, window, offset)
    except OutOfResources as error:
        backend = _no_room(error, fallback, "forward")
    out = _run(backend, q, k, v, scale, mask, pre, post, groups, causal, window, offset)
    return out, q.new_full(q.shape[:3], float("nan"), dtype=torch.float32)


def _inference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, groups: int, causal: bool,
               window: int, offset: int, pre_present: bool, post_present: bool, weights: list[Tensor],
               fallback: bool) -> Tensor:
    """The output only, without gradients (:func:`inference_forward`): keys are split over programs when queries
    are few (decoding)."""
    pre, post = _unflatten(pre_present, weights[:7]), _unflatten(post_present, weights[7:])
    try:
        return inference_forward(q, k, v, scale, mask, pre, post, groups, causal, window, offset)
    except OutOfResources as error:
        backend = _no_room(error, fallback, "inference")
    return _run(backend, q, k, v, scale, mask, pre, post, groups, causal, window, offset)


_inference_op = torch.library.custom_op("headmix::dcmha_inference", mutates_args=())(_inference)


@_inference_op.register_fake
def _(q, k, v, mask, scale, groups, causal, window, offset, pre_present, post_present, weights, fallback):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@_forward_op.register_fake
def _(q, k, v, mask, scale, groups, causal, window, offset, pre_present, post_present, weights, fallback):
    B, H, T, _ = q.shape
    return q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("headmix::dcmha_backward", mutates_args=())
def _backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, mask: Tensor | None, scale: float,
                 groups: int, causal: bool, window: int, offset: int, pre_present: bool, post_present: bool,
                 weights: list[Tensor], fallback: bool) -> list[Tensor]:
    """``[dq, dk, dv, then one gradient per present Compose weight, in FIELDS order, pre then post]``."""
    pre, post = _unflatten(pre_present, weights[:7]), _unflatten(post_present, weights[7:])
    try:
        dq, dk, dv, dpre, dpost = train_backward(do, q, k, v, lse, scale, mask, pre, post, groups, causal, window,
                                                 offset)
    except OutOfResources as error:
        if fallback and FALLBACK is not None:  # recomputed through autograd by _backward (none inside a custom op)
            raise
        _no_room(error, fallback, "backward")
    return [t.contiguous() for t in (dq, dk, dv, *dpre.values(), *dpost.values())]  # present fields, FIELDS order


@_backward_op.register_fake
def _(do, q, k, v, lse, mask, scale, groups, causal, window, offset, pre_present, post_present, weights, fallback):
    present = [w for i, w in enumerate(weights) if (pre_present if i < 7 else post_present) and w.numel() > 0]
    # the kernels write dense, contiguous gradients whatever the inputs' layouts
    return [q.new_empty(t.shape, dtype=t.dtype) for t in (q, k, v, *present)]


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, scale, groups, causal, window, offset, pre_present, post_present, weights, fallback = inputs
    ctx.save_for_backward(q, k, v, output[1], mask, *weights)
    ctx.meta = (scale, groups, causal, window, offset, pre_present, post_present, fallback)


def _backward(ctx, do, _dlse):
    q, k, v, lse, mask, *weights = ctx.saved_tensors
    scale, groups, causal, window, offset, pre_present, post_present, fallback = ctx.meta
    try:
        dq, dk, dv, *present = _backward_op(do, q, k, v, lse, mask, scale, groups, causal, window, offset,
                                            pre_present, post_present, weights, fallback)
    except OutOfResources as error:  # only with a fallback (else the op raised a RuntimeError)
        backend = _no_room(error, fallback, "backward")
        pre, post = _unflatten(pre_present, weights[:7]), _unflatten(post_present, weights[7:])
        dq, dk, dv, dpre, dpost = _recompute_backward(backend, do, q, k, v, scale, mask, pre, post, groups, causal,
                                                      window, offset)
        present = [*dpre.values(), *dpost.values()]
    grads = iter(present)
    # absent weights are empty placeholders (custom ops take no None in lists): their "gradients" are empty too
    wgrads = [next(grads) if (pre_present if i < 7 else post_present) and w.numel() > 0 else torch.zeros_like(w)
              for i, w in enumerate(weights)]
    return dq, dk, dv, None, None, None, None, None, None, None, None, wgrads, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def flatten(w: ComposeWeights | None, empty: Tensor) -> list[Tensor]:
    """The seven Compose fields of ``w`` in FIELDS order, ``empty`` (no elements) for absent ones."""
    return [empty] * 7 if w is None else [empty if getattr(w, f) is None else getattr(w, f) for f in FIELDS]


def _unflatten(present: bool, tensors) -> ComposeWeights | None:
    if not present:
        return None
    return ComposeWeights(**{f: (t if t is not None and t.numel() > 0 else None) for f, t in zip(FIELDS, tensors)})


def kernel_mask(spec: MaskSpec) -> Tensor | None:
    """The tensor part of ``spec`` as one bool mask broadcastable to ``(B, 1, T, S)`` (``None``: structure only)."""
    mask = spec.allowed
    if spec.key_padding is not None:
        padding = spec.key_padding.bool()[:, None, None, :]
        mask = padding if mask is None else mask & padding
    return mask


def triton_composed_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: MaskSpec | Tensor | None = None,
    pre: ComposeWeights | None = None, post: ComposeWeights | None = None, groups: int = 1,
    chunk_size: int | None = None, fallback: bool = False,
) -> Tensor:
    """Fused composed attention; arguments as :func:`headmix.reference.composed_attention`.

    ``k``, ``v`` may have fewer heads than ``q`` (grouped-query attention: each key/value head serves
    ``H / H_kv`` consecutive query heads). The mask's structure (causal, window, query offset) is applied by
    index arithmetic, skipping whole blocks; its tensor part (key padding, an explicit mask) is read tile by
    tile. ``chunk_size`` is accepted for signature compatibility and ignored.

    A shape whose kernels do not fit the GPU (shared memory, registers) raises a ``RuntimeError`` saying so,
    or with ``fallback=True`` (what ``backend="auto"`` passes) runs what the ops registry's policy says
    (the chunked path, with a warning). Shapes the kernels never take (see :func:`check_supported`) raise a
    ``ValueError``.
    """
    spec = as_mask_spec(mask)
    weights = [getattr(w, f) for w in (pre, post) if w is not None for f in FIELDS if getattr(w, f) is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *weights))
    check_supported(tuple(q.shape), v.shape[-1], groups, q.dtype, training=needs_grad, kv_heads=k.shape[1])
    for name, big in (("q", q), ("k", k), ("v", v)):  # (before any launch: past it an offset would wrap around)
        if big.numel() > MAX_ELEMENTS:
            error = ValueError(f"triton backend: {name} of shape {tuple(big.shape)} has {big.numel():,} elements: the "
                               f"kernels address at most {MAX_ELEMENTS:,} (32-bit offsets); split the batch, or use "
                               "backend='chunked'")
            if not fallback or FALLBACK is None:
                raise error
            return FALLBACK(error, "forward" if needs_grad else "inference")(q, k, v, scale=scale, mask=spec, pre=pre,
                                                                             post=post, groups=groups)
    pre = None if pre is None or pre.is_identity() else pre
    post = None if post is None or post.is_identity() else post
    args = (q, k, v, kernel_mask(spec), float(scale), int(groups), bool(spec.causal),
            int(spec.window or 0), spec.offset(q.shape[2], k.shape[2]), pre is not None, post is not None,
            [*flatten(pre, q.new_empty(0)), *flatten(post, q.new_empty(0))], bool(fallback))
    if not needs_grad:
        # Eagerly, on plain tensors, the op's body is called directly: the dispatcher's round trip costs ~100 us
        # of host time per call (on the CPU machine), which an eager prefill (host-bound: 24 layers) pays per layer.
        # Traced (torch.compile, export, torch.jit.trace) or on tensor subclasses (fake, functional), the custom op
        if type(q) is Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            return _inference(*args)
        return _inference_op(*args)
    return _forward_op(*args)[0]
