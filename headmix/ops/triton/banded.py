"""Sliding-window layers on the blockwise path, one window of queries per block, all blocks in one batch.

:mod:`.blockwise` cuts the queries into blocks of as many rows as its buffer holds, and gives each block every key
any of its rows may see: with a window of ``W`` keys a block of ``C`` rows gets a ``C x (C + W - 1)`` rectangle, of
which ``C x W`` is allowed (a third at ``C = 512``, ``W = 256``), and blocks run one after another. Here the queries
of a self-attention layer (``T`` a multiple of ``W``, at least ``2W``, causal, no mask tensor) are cut at every
``W`` rows instead: block ``i >= 1`` (rows ``[iW, (i+1)W)``) sees exactly the keys ``[(i-1)W, (i+1)W)``, half of its
``W x 2W`` rectangle, and the ``T/W - 1`` such blocks are stacked along the batch (overlapping key windows copied
out, ``unfold``), so one pass of :func:`~.blockwise.blockwise_forward` / :func:`~.blockwise.blockwise_backward` with
query offset ``W`` does them all; block 0 (rows ``[0, W)``, keys ``[0, W)``) is a second, small pass. The gradients
of the copied windows are folded back (each key sits in two windows), in float32, rounded once. The math is the
blockwise path's: ``tests/test_triton.py`` checks it against the reference, output and every gradient.

Off by default (:data:`ENABLED`): not yet timed on a GPU (``benchmarks/training_paths.py --banded`` prints it beside
the blockwise and tile paths).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...reference import ComposeWeights
from .blockwise import blockwise_backward, blockwise_forward
from .launch import FIELDS

ENABLED = False


def applies(q: Tensor, k: Tensor, mask, causal: bool, window: int, offset: int) -> bool:
    """Whether :func:`forward` / :func:`backward` take this call: :data:`ENABLED`, causal self-attention (as many keys
    as queries, offset 0) with a window ``W`` and no mask tensor, ``T`` a multiple of ``W`` and at least ``2W``."""
    T, S, W = q.shape[2], k.shape[2], int(window or 0)
    return ENABLED and mask is None and bool(causal) and W > 0 and offset == 0 and T == S and T % W == 0 and T >= 2 * W


def _rows(x: Tensor, dim: int, W: int) -> Tensor:
    """Positions ``[W, T)`` of ``x`` along ``dim`` (1 or 2), as ``T/W - 1`` blocks of ``W`` stacked on the batch."""
    T = x.shape[dim]
    blocks = x.narrow(dim, W, T - W).unflatten(dim, ((T - W) // W, W)).movedim(dim, 1)  # (B, n, [heads,] W, ...)
    return blocks.reshape(-1, *blocks.shape[2:]).contiguous()  # (the kernels index the factors as contiguous)


def _windows(x: Tensor, dim: int, W: int) -> Tensor:
    """The key windows ``[iW, (i+2)W)`` of ``x`` along ``dim`` (1 or 2), ``i < T/W - 1``, stacked on the batch."""
    win = x.unfold(dim, 2 * W, W).movedim(-1, dim + 1).movedim(dim, 1)  # (B, n, [heads,] 2W, ...)
    return win.reshape(-1, *win.shape[2:]).contiguous()  # (a copy: reshape may keep the overlapping view)


def _unrows(x: Tensor, dim: int, B: int) -> Tensor:
    """:func:`_rows`' inverse shape: ``(B * n, [heads,] W, ...)`` to ``(B, [heads,] n * W, ...)``."""
    x = x.unflatten(0, (B, -1)).movedim(1, dim)
    return x.flatten(dim, dim + 1)


def _fold(x: Tensor, dim: int, B: int, W: int, T: int, first: Tensor) -> Tensor:
    """The sum over key windows of their gradients ``x`` ``(B * n, [heads,] 2W, ...)`` at full length ``T``, float32,
    plus ``first`` (block 0's, positions ``[0, W)``)."""
    halves = x.float().unflatten(dim, (2, W))  # (B*n, [heads,] 2, W, ...)
    early, late = (_unrows(h, dim, B) for h in halves.unbind(dim))
    out = torch.zeros(*early.shape[:dim], T, *early.shape[dim + 1:], dtype=torch.float32, device=x.device)
    out.narrow(dim, 0, T - W).add_(early)
    out.narrow(dim, W, T - W).add_(late)
    out.narrow(dim, 0, W).add_(first.float())
    return out


def _split(w: ComposeWeights | None, W: int) -> tuple[ComposeWeights | None, ComposeWeights | None]:
    """``w`` for block 0 (positions ``[0, W)``, contiguous) and for the stacked blocks (query fields by :func:`_rows`,
    key fields by :func:`_windows`); the static mix in both."""
    if w is None:
        return None, None
    head, band = {}, {}
    for f in FIELDS:
        t = getattr(w, f)
        if t is None or f == "static":
            head[f] = band[f] = t
        else:
            head[f] = t[:, :W].contiguous()
            band[f] = _rows(t, 1, W) if f.startswith("query") else _windows(t, 1, W)
    return ComposeWeights(**head), ComposeWeights(**band)


def forward(q, k, v, scale, mask, pre, post, groups, causal, window, offset) -> tuple[Tensor, Tensor]:
    """``(O, lse)`` as :func:`~.blockwise.blockwise_forward`, for calls :func:`applies` takes."""
    W, B = int(window), q.shape[0]
    (pre0, preb), (post0, postb) = _split(pre, W), _split(post, W)
    o0, lse0 = blockwise_forward(q[:, :, :W], k[:, :, :W], v[:, :, :W], scale, None, pre0, post0, groups, True, W, 0)
    ob, lseb = blockwise_forward(_rows(q, 2, W), _windows(k, 2, W), _windows(v, 2, W), scale, None, preb, postb,
                                 groups, True, W, W)
    return torch.cat([o0, _unrows(ob, 2, B)], dim=2), torch.cat([lse0, _unrows(lseb, 2, B)], dim=2)


def backward(do, q, k, v, lse, scale, mask, pre, post, groups, causal, window, offset):
    """Gradients ``(dq, dk, dv, dpre, dpost)`` as :func:`~.blockwise.blockwise_backward`, for calls :func:`applies`
    takes."""
    W, B, T = int(window), q.shape[0], q.shape[2]
    (pre0, preb), (post0, postb) = _split(pre, W), _split(post, W)
    first = blockwise_backward(do[:, :, :W], q[:, :, :W], k[:, :, :W], v[:, :, :W], lse[:, :, :W], scale, None, pre0,
                               post0, groups, True, W, 0, cast=False)
    band = blockwise_backward(_rows(do, 2, W), _rows(q, 2, W), _windows(k, 2, W), _windows(v, 2, W), _rows(lse, 2, W),
                              scale, None, preb, postb, groups, True, W, W, cast=False)
    dq = torch.cat([first[0], _unrows(band[0], 2, B)], dim=2)
    dk, dv = (_fold(band[i], 2, B, W, T, first[i]).to(t.dtype) for i, t in ((1, k), (2, v)))
    grads = []
    for side, w in ((3, pre), (4, post)):
        g = {}
        for f, t in band[side].items():
            if f == "static":
                g[f] = t + first[side][f]
            elif f.startswith("query"):
                g[f] = torch.cat([first[side][f], _unrows(t, 1, B)], dim=1)
            else:
                g[f] = _fold(t, 1, B, W, T, first[side][f])
            g[f] = g[f].to(getattr(w, f).dtype)
        grads.append(g)
    return dq, dk, dv, grads[0], grads[1]
