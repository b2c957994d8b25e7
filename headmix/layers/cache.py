"""The decoding cache: per layer, everything an attention layer needs about each cached key position.

For multi-head attention that is the key and value; for DCMHA also the key-wise composition factors
and gates of the pre- and post-softmax Compose (computed once, when the token is first seen); for
collaborative attention the single shared key. Each entry is a tensor of shape ``(batch, seq, ...)``, or a
:class:`~headmix.reference.ComposeWeights` (or a dict of them) whose present fields are such tensors.

A layer with a sliding window keeps only the ``window - 1`` most recent positions between steps
(a rolling cache): its memory is bounded by the window, whatever the length of the text.

The whole model's cache, :class:`headmix.models.HeadmixCache`, is a ``transformers`` ``Cache`` (it lives with the
models: this floor does not import ``transformers``); it holds one :class:`LayerCache` per layer. A layer's state is
a dict of per-position entries (``"k"``, ``"v"`` and what :meth:`~headmix.layers.Attention.composition_state`
returns for the key side), appended along dim 1 by :meth:`LayerCache.update`; every generation operation
(crop, reorder, repeat, select) acts on all entries alike through :func:`map_state`. A static (pre-allocated)
cache would keep the same entries in fixed-size buffers and write them at ``seen`` instead of concatenating.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, is_dataclass, replace
from typing import Any

import torch
from torch import Tensor


def map_state(fn: Callable[..., Tensor], *states: Any) -> Any:
    """Apply ``fn`` leaf by leaf to matching per-position states: tensors, dicts of states, or dataclasses
    (:class:`~headmix.reference.ComposeWeights`) whose fields are tensors or ``None``."""
    first = states[0]
    if isinstance(first, Tensor):
        return fn(*states)
    if isinstance(first, dict):
        return {key: map_state(fn, *(s[key] for s in states)) for key in first}
    if is_dataclass(first):
        return replace(first, **{f.name: None if getattr(first, f.name) is None
                                 else map_state(fn, *(getattr(s, f.name) for s in states)) for f in fields(first)})
    raise TypeError(f"cannot cache a {type(first).__name__}: expected tensors, dicts or dataclasses of tensors")


def _leaves(state: Any):
    if isinstance(state, Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _leaves(value)
    elif is_dataclass(state):
        for f in fields(state):
            if getattr(state, f.name) is not None:
                yield from _leaves(getattr(state, f.name))


class LayerCache:
    """Cached key-side state of one attention layer (plain torch: :class:`headmix.models.HeadmixCache`, a
    ``transformers`` ``Cache``, holds one per layer and forwards generation's calls to them).

    Attributes:
        window: the layer's sliding window (``None``: keep everything). Retention only: the attention layer
            applies its own window to the positions, so keeping more than ``window - 1`` is never wrong.
        state: ``{name: state}``, every tensor in it ``(batch, seq, ...)``, one entry per cached position.
        positions: ``(batch, seq)`` absolute positions of the cached keys.
        valid: ``(batch, seq)`` bool, ``False`` for padding.
        seen: how many positions were ever appended (``len(self)`` is smaller once a window rolls).
        record_past: keep every position (no rolling) so that :meth:`crop` can undo steps (assisted decoding).
    """

    is_compileable = False  # the tensors grow: a compiled step would recompile (a static cache is issue 17's)
    supports_early_init = False

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        self.state: dict[str, Any] = {}
        self.positions: Tensor | None = None
        self.valid: Tensor | None = None
        self.seen = 0
        self.record_past = False

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def __repr__(self) -> str:
        return f"LayerCache(window={self.window}, cached={len(self)}, seen={self.seen})"

    @property
    def is_initialized(self) -> bool:
        return self.positions is not None

    @property
    def is_sliding(self) -> bool:
        return self.window is not None

    @property
    def is_croppable(self) -> bool:
        """Whether :meth:`crop` can undo any number of steps: nothing ever rolled out of the window."""
        return self.window is None or self.record_past

    @property
    def batch_size(self) -> int:
        return -1 if self.positions is None else self.positions.shape[0]

    def get_seq_length(self) -> int:
        """Positions seen so far (not the number kept by a rolling layer)."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(keys a query of the next step attends over, offset of the first kept key)``."""
        return len(self) + query_length, self.seen - len(self)

    def update(self, new: dict[str, Any], positions: Tensor, valid: Tensor) -> tuple[dict[str, Any], Tensor, Tensor]:
        """Append the new positions; return the full key side (cached + new) to attend over now."""
        if self.positions is None:
            full, full_pos, full_valid = new, positions, valid
        else:
            full = map_state(lambda old, added: torch.cat([old, added], dim=1), self.state, new)
            full_pos = torch.cat([self.positions, positions], dim=1)
            full_valid = torch.cat([self.valid, valid], dim=1)
        self.seen += positions.shape[1]
        total = full_pos.shape[1]
        keep = total if self.window is None or self.record_past else min(total, self.window - 1)
        # a later query at position p needs keys from p - window + 1 on: the last window - 1 suffice
        self._keep(full, full_pos, full_valid, total - keep, total)
        return full, full_pos, full_valid

    def _keep(self, state: dict[str, Any], positions: Tensor, valid: Tensor, start: int, end: int) -> None:
        self.state = map_state(lambda t: t[:, start:end], state)
        self.positions, self.valid = positions[:, start:end], valid[:, start:end]

    def activate_past_recording(self) -> None:
        """Keep every position from now on (no rolling), so that :meth:`crop` can undo steps."""
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (transformers' convention: a negative count; ``0``
        does nothing). Raises if a sliding-window layer rolled out a position that would be needed again."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of positions to remove "
                             "(transformers' convention)")
        remove = -tokens_to_remove
        if self.positions is None:
            return
        if remove > self.seen:
            raise ValueError(f"crop({tokens_to_remove}): the cache has seen only {self.seen} positions")
        length = len(self)
        new_seen = self.seen - remove
        rolled_out = self.seen - length  # positions no longer held
        if remove and self.window is not None and rolled_out and new_seen - rolled_out < min(new_seen, self.window - 1):
            raise ValueError(f"crop({tokens_to_remove}) needs positions this sliding-window layer rolled out: call "
                             "activate_past_recording() before decoding steps that may be undone")
        self.seen = new_seen
        self._keep(self.state, self.positions, self.valid, 0, length - remove)

    def select(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search reordering)."""
        if self.positions is None:
            return
        self.state = map_state(lambda t: t.index_select(0, index.to(t.device)), self.state)
        self.positions = self.positions.index_select(0, index.to(self.positions.device))
        self.valid = self.valid.index_select(0, index.to(self.valid.device))

    reorder_cache = select
    batch_select_indices = select

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (beam search and ``num_return_sequences`` expansion)."""
        if self.positions is None:
            return
        self.state = map_state(lambda t: t.repeat_interleave(repeats, dim=0), self.state)
        self.positions = self.positions.repeat_interleave(repeats, dim=0)
        self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def reset(self) -> None:
        """Empty the layer (keeps its window and recording mode)."""
        self.state, self.positions, self.valid, self.seen = {}, None, None, 0

    def offload(self) -> None:  # transformers' offloading hooks: not supported, nothing to move
        pass

    def prefetch(self) -> None:
        pass

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _leaves(self.state))
