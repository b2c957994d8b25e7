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
(crop, reorder, repeat, select) acts on all entries alike through :func:`map_state`.

:class:`StaticLayerCache` keeps the same entries in buffers allocated once (``(batch, slots, ...)``), written in place
at a step counter held in a tensor, so that a decoding step has the same shapes, the same tensor addresses and no
host synchronisation from the first step to the last: what ``torch.compile`` and CUDA graphs need. A global layer
has one slot per position up to ``max_cache_len``; a sliding-window layer a ring of ``window`` slots (position ``n``
goes to slot ``n % window``), so its memory is bounded by the window whatever the length of the text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import is_dataclass
from typing import Any

import torch
from torch import Tensor


def packable(entry: Any) -> bool:
    """Whether a static cache packs a state entry into one buffer: a structure (not a lone tensor) of at least two
    tensors of one dtype, such as DCMHA's key-wise factors and gates of both Compose steps. One buffer ``(batch,
    slots, width)``, a row per slot with every tensor's numbers side by side, means one write per decoding step and
    one graph input for a compiled step (each input is guarded and checked at every step), not one per field."""
    if isinstance(entry, Tensor):
        return False
    leaves = list(_leaves(entry))
    return len(leaves) > 1 and len({t.dtype for t in leaves}) == 1


def pack(entry: Any, dtype: torch.dtype) -> Tensor:
    """A packable ``entry`` of ``(batch, T, ...)`` tensors as packed rows ``(batch, T, width)`` of ``dtype``."""
    return torch.cat([t.reshape(*t.shape[:2], -1) for t in _leaves(entry)], dim=-1).to(dtype)


def _width(entry: Any) -> int:
    """Numbers per position of a packable entry (its packed row)."""
    return sum(math.prod(t.shape[2:]) for t in _leaves(entry))


def unpack(buffer: Tensor, like: Any) -> Any:
    """A packed buffer ``(batch, slots, width)`` as views with the structure of ``like`` (an entry as the layer makes
    it: the same tensors in the same order, any positions), each ``(batch, slots, *tail)`` with the buffer's batch
    and slot strides. The layout comes from ``like``'s shapes, not from the cache: a compiled step reads no Python
    number of the cache's (each would be guarded at every step)."""
    views, start = [], 0
    for t in _leaves(like):
        tail = t.shape[2:]
        width = math.prod(tail)
        views.append(buffer[:, :, start:start + width].unflatten(2, tail) if tail else buffer[:, :, start])
        start += width
    found = iter(views)
    return map_state(lambda _: next(found), like)


def map_state(fn: Callable[..., Tensor], *states: Any) -> Any:
    """Apply ``fn`` leaf by leaf to matching per-position states: tensors, dicts of states, or dataclasses
    (:class:`~headmix.reference.ComposeWeights`) whose fields are tensors or ``None``."""
    first = states[0]
    if isinstance(first, Tensor):
        return fn(*states)
    if isinstance(first, dict):
        return {key: map_state(fn, *(s[key] for s in states)) for key in first}
    if is_dataclass(first):
        return type(first)(**{name: None if getattr(first, name) is None
                              else map_state(fn, *(getattr(s, name) for s in states)) for name in _field_names(first)})
    raise TypeError(f"cannot cache a {type(first).__name__}: expected tensors, dicts or dataclasses of tensors")


def _field_names(instance: Any) -> tuple[str, ...]:
    """A dataclass's field names (read from the class: ``torch.compile`` does not trace ``dataclasses.fields``)."""
    return tuple(type(instance).__dataclass_fields__)


def _leaves(state: Any):
    if isinstance(state, Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _leaves(value)
    elif is_dataclass(state):
        for name in _field_names(state):
            if getattr(state, name) is not None:
                yield from _leaves(getattr(state, name))


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

    is_compileable = False  # the tensors grow: a compiled step would recompile (StaticLayerCache is the compileable one)
    supports_early_init = False
    packs_rows = False  # entries are kept in the layer's own structure (see StaticLayerCache.packs_rows)

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

    def offload(self) -> None:
        """transformers' hook to move a layer's cache to the CPU: offloading is not supported, nothing moves."""

    def prefetch(self) -> None:
        """transformers' hook to bring an offloaded layer back: nothing was offloaded, nothing moves."""

    def nbytes(self) -> int:
        """Bytes held by this layer's cached tensors."""
        return sum(t.numel() * t.element_size() for t in _leaves(self.state))


class StaticLayerCache:
    """Cached key-side state of one attention layer in fixed-size buffers (the static cache; plain torch:
    :class:`headmix.models.HeadmixStaticCache`, a ``transformers`` ``Cache``, holds one per layer).

    The entries are those of :class:`LayerCache` (``"k"``, ``"v"``, the key side of
    :meth:`~headmix.layers.Attention.composition_state`), allocated at the first :meth:`update` from the shapes of
    what the layer hands in, each ``(batch, slots, ...)``, beside ``positions`` ``(batch, slots)`` and ``valid``
    ``(batch, slots)`` (``False`` for padding and for slots never written). A structured entry (DCMHA's key side:
    factors and gates of both Compose steps) is one packed buffer ``(batch, slots, width)`` (:func:`packable`), which
    the layer reads as views in its own structure. The attention layer attends over all
    slots; ``valid`` and the positions mask what must not be seen (eagerly, a prefill into an empty cache attends
    over its own positions only, as with the dynamic cache, so the layers keep their causal fast paths). The count of positions written so far is the
    0-d tensor :attr:`length`, updated in place, so a compiled step reads no Python number that changes.

    Slots: a global layer (``window=None``, or a window of at least ``max_cache_len``) has ``max_cache_len``, position
    ``n`` in slot ``n``; writing past the last slot raises (eagerly; a compiled step trusts ``generate()``, which
    sizes the cache to ``max_length``). A sliding-window layer has a ring of ``window`` slots, position ``n`` in slot
    ``n % window``: one new token is written first and then attended with the ``window - 1`` before it (exactly its
    window); several new tokens (a prefill, possibly longer than the window) attend over the ring and themselves
    concatenated (what :class:`LayerCache` does), then the last ``window`` of them are written.

    Args:
        max_cache_len: positions the cache holds (``generate()``: its ``max_length``).
        window: the layer's sliding window (``None``: global).
    """

    is_compileable = True
    supports_early_init = False  # the buffers take their shapes from the layer's first update
    #: A structured entry is one packed buffer, so a layer may hand in one new position's entry already packed
    #: (:meth:`headmix.layers.Attention.decoding_state`), a tensor written as it is
    packs_rows = True

    def __init__(self, max_cache_len: int, window: int | None = None) -> None:
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len={max_cache_len!r}: expected a positive number of positions")
        self.max_cache_len = max_cache_len
        self.window = window
        self.ring = window is not None and window < max_cache_len
        self.slots = window if self.ring else max_cache_len
        self.state: dict[str, Any] | None = None
        self.positions: Tensor | None = None
        self.valid: Tensor | None = None
        self.length = torch.zeros((), dtype=torch.long)
        # The same count on the host, kept by eager writes so that an eager forward (a prefill) reads it without a
        # host synchronisation per layer (each one stalls the CPU's kernel launches until the GPU catches up: on an
        # H200, Transformer++-405M's eager prefill of 16 x 512 tokens took 37.4 ms with them, 28.2 without); None
        # once a compiled step has written (then read from the device)
        self._seen: int | None = 0
        self.record_past = False

    def __len__(self) -> int:
        """Positions cached, eagerly (no host synchronisation after eager writes). Under ``torch.compile`` the number
        of slots: a compiled step attends over all of them, and reads no count on the host."""
        return self.slots if torch.compiler.is_compiling() else min(self.get_seq_length(), self.slots)

    def __repr__(self) -> str:
        kind = f"ring of {self.slots}" if self.ring else f"{self.slots} slots"
        return f"StaticLayerCache({kind}, window={self.window}, seen={self.get_seq_length()})"

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def is_sliding(self) -> bool:
        return self.window is not None

    @property
    def is_croppable(self) -> bool:
        """Whether :meth:`crop` can undo any number of steps: no ring slot was ever overwritten."""
        return not self.ring or self.get_seq_length() <= self.slots

    @property
    def batch_size(self) -> int:
        return -1 if self.positions is None else self.positions.shape[0]

    def get_seq_length(self) -> int:
        """Positions seen so far: the host's count after eager writes, read from the device (a host synchronisation)
        after a compiled step's. Not for a compiled step, which reads :attr:`length`."""
        if self._seen is None:
            self._seen = int(self.length)
        return self._seen

    @property
    def seen(self) -> int:
        """Positions seen so far, as :attr:`LayerCache.seen`."""
        return self.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(keys a query of the next step attends over, 0)``: the slots, plus the new ones on a ring's prefill."""
        return self.slots + (query_length if self.ring and query_length > 1 else 0), 0

    def check_room(self, new: int) -> None:
        """Raise a ``ValueError`` naming the sizes if ``new`` more positions do not fit (a host synchronisation;
        a ring never fills)."""
        seen = self.get_seq_length()
        if not self.ring and seen + new > self.slots:
            raise ValueError(f"the static cache holds {self.max_cache_len} positions: {seen} are cached and "
                             f"{new} more do not fit; make it with max_cache_len >= {seen + new} (generate() sizes "
                             "it to max_length: pass max_new_tokens, or generation_config.max_cache_len)")

    def _allocate(self, new: dict[str, Any], positions: Tensor) -> None:
        batch, device = positions.shape[0], positions.device
        self.state = {name: next(_leaves(entry)).new_zeros(batch, self.slots, _width(entry)) if packable(entry)
                      else map_state(lambda t: t.new_zeros((batch, self.slots, *t.shape[2:])), entry)
                      for name, entry in new.items()}
        self.positions = torch.zeros(batch, self.slots, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, self.slots, dtype=torch.bool, device=device)
        self.length = self.length.to(device)
        self._mark_static()

    def _mark_static(self) -> None:
        # fixed addresses: a compiled step mutates these in place, and a CUDA graph replays on the same memory
        if not torch.compiler.is_compiling():
            for t in (*_leaves(self.state), self.positions, self.valid, self.length):
                torch._dynamo.mark_static_address(t)

    @staticmethod
    def _packed(entry: Any, like: Any) -> bool:
        """Whether a state entry is a packed buffer: a tensor here where the layer hands in a structure."""
        return isinstance(entry, Tensor) and not isinstance(like, Tensor)

    def views(self, new: dict[str, Any]) -> dict[str, Any]:
        """The state as the layer reads it, every entry in the structure of ``new`` (what the layer hands in: a packed
        entry comes back as views of its buffer, :func:`unpack`)."""
        return {name: unpack(entry, new[name]) if self._packed(entry, new[name]) else entry
                for name, entry in self.state.items()}

    def _write(self, slots: Tensor, new: dict[str, Any], positions: Tensor, valid: Tensor) -> None:
        for name, entry in self.state.items():
            if self._packed(entry, new[name]):
                entry.index_copy_(1, slots, pack(new[name], entry.dtype))
            else:
                map_state(lambda buffer, t: buffer.index_copy_(1, slots, t.to(buffer.dtype)), entry, new[name])
        self.positions.index_copy_(1, slots, positions.to(self.positions.dtype))
        self.valid.index_copy_(1, slots, valid.bool())

    def update(self, new: dict[str, Any], positions: Tensor, valid: Tensor) -> tuple[dict[str, Any], Tensor, Tensor]:
        """Write the new positions ``(batch, T, ...)``; return the key side to attend over now: every slot (cached and
        new; ``T`` new ones also on a ring when ``T > 1``), with its positions and validity."""
        if self.state is None:
            self._allocate(new, positions)
        if positions.shape[0] != self.positions.shape[0]:
            raise ValueError(f"the static cache was made for batch {self.positions.shape[0]}, got {positions.shape[0]}")
        T = positions.shape[1]
        # Eagerly, into an empty cache (a prefill), the keys to attend over are just the new ones: the layer keeps
        # its causal/window fast paths, as with the dynamic cache. A compiled step always attends over the slots.
        seen = None if torch.compiler.is_compiling() else self.get_seq_length()
        fresh = seen == 0
        # the host's count follows eager writes; a compiled step leaves it to be read from the device
        self._seen = None if seen is None else seen + T
        index = self.length + torch.arange(T, device=self.length.device)  # sequence index of each new position
        if self.ring and T > 1:
            attended = (new, positions, valid) if fresh else (  # the ring as it was, then the new positions
                map_state(lambda buffer, t: torch.cat([buffer, t.to(buffer.dtype)], dim=1), self.views(new), new),
                torch.cat([self.positions, positions], dim=1), torch.cat([self.valid, valid.bool()], dim=1))
            keep = min(T, self.slots)  # the last ``window`` new positions are all a later query may need
            self._write(index[T - keep:] % self.slots, map_state(lambda t: t[:, T - keep:], new),
                        positions[:, T - keep:], valid[:, T - keep:])
            self.length.add_(T)
            return attended
        self._write(index % self.slots if self.ring else index, new, positions, valid)
        self.length.add_(T)
        return (new, positions, valid) if fresh else (self.views(new), self.positions, self.valid)

    def activate_past_recording(self) -> None:
        """Nothing to switch on: a ring keeps ``window`` slots; :meth:`crop` says when it cannot undo."""
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (transformers' convention: a negative count). Their slots
        are marked invalid and written again by the next steps; a ring that wrapped cannot undo (it raises)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of positions to remove "
                             "(transformers' convention)")
        remove, seen = -tokens_to_remove, self.get_seq_length()
        if not remove or self.state is None:
            return
        if remove > seen:
            raise ValueError(f"crop({tokens_to_remove}): the cache has seen only {seen} positions")
        if self.ring and seen > self.slots:
            raise ValueError(f"crop({tokens_to_remove}): this sliding-window layer's ring of {self.slots} slots has "
                             f"wrapped ({seen} positions seen): the positions it overwrote cannot come back")
        self.valid[:, seen - remove:seen] = False
        self.length.sub_(remove)
        self._seen = seen - remove

    def select(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search reordering), in place when the batch size is unchanged."""
        if self.state is None:
            return

        def pick(t: Tensor) -> Tensor:
            chosen = t.index_select(0, index.to(t.device))
            return t.copy_(chosen) if chosen.shape == t.shape else chosen

        self.state = map_state(pick, self.state)
        self.positions, self.valid = pick(self.positions), pick(self.valid)
        self._mark_static()

    reorder_cache = select
    batch_select_indices = select

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (new buffers: the batch size changes)."""
        if self.state is None:
            return
        self.state = map_state(lambda t: t.repeat_interleave(repeats, dim=0), self.state)
        self.positions = self.positions.repeat_interleave(repeats, dim=0)
        self.valid = self.valid.repeat_interleave(repeats, dim=0)
        self._mark_static()

    def reset(self) -> None:
        """Empty the layer, keeping its buffers (and their addresses) for the next generation."""
        if self.valid is not None:
            self.valid.zero_()
        self.length.zero_()
        self._seen = 0

    def offload(self) -> None:
        """transformers' hook to move a layer's cache to the CPU: offloading is not supported, nothing moves."""

    def prefetch(self) -> None:
        """transformers' hook to bring an offloaded layer back: nothing was offloaded, nothing moves."""

    def nbytes(self) -> int:
        """Bytes held by this layer's buffers (0 before the first write allocates them)."""
        return 0 if self.state is None else sum(t.numel() * t.element_size() for t in _leaves(self.state))
