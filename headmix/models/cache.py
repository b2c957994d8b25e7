"""The decoding cache: per layer, everything an attention layer needs about each cached key position.

For multi-head attention that is the key and value; for DCMHA also the key-wise composition factors
and gates of the pre- and post-softmax Compose (computed once, when the token is first seen); for
collaborative attention the single shared key. Each entry is a tensor of shape ``(batch, seq, ...)``.

A layer with a sliding window keeps only the ``window - 1`` most recent positions between steps
(a rolling cache): its memory is bounded by the window, whatever the length of the text.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerCache:
    """Cached key-side state of one attention layer.

    Attributes:
        window: the layer's sliding window (``None``: keep everything).
        state: ``{name: (batch, seq, ...)}`` tensors, one entry per cached position.
        positions: ``(batch, seq)`` absolute positions of the cached keys.
        valid: ``(batch, seq)`` bool, ``False`` for padding.
    """

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        self.state: dict[str, Tensor] = {}
        self.positions: Tensor | None = None
        self.valid: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def update(self, new: dict[str, Tensor], positions: Tensor, valid: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Append the new positions; return the full key side (cached + new) to attend over now."""
        if self.positions is None:
            full, full_pos, full_valid = new, positions, valid
        else:
            full = {k: torch.cat([self.state[k], v], dim=1) for k, v in new.items()}
            full_pos = torch.cat([self.positions, positions], dim=1)
            full_valid = torch.cat([self.valid, valid], dim=1)
        keep = full_pos.shape[1] if self.window is None else min(full_pos.shape[1], self.window - 1)
        # a later query at position p needs keys from p - window + 1 on: the last window - 1 suffice
        self.state = {k: v[:, full_pos.shape[1] - keep :] for k, v in full.items()}
        self.positions = full_pos[:, full_pos.shape[1] - keep :]
        self.valid = full_valid[:, full_pos.shape[1] - keep :]
        return full, full_pos, full_valid

    def select(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search reordering)."""
        if self.positions is None:
            return
        self.state = {k: v.index_select(0, index.to(v.device)) for k, v in self.state.items()}
        self.positions = self.positions.index_select(0, index.to(self.positions.device))
        self.valid = self.valid.index_select(0, index.to(self.valid.device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


class HeadmixCache:
    """The cache of a whole model: one :class:`LayerCache` per layer, and how many tokens were seen.

    Works with ``transformers``' ``generate()`` (greedy, sampling, beam search): it answers
    ``get_seq_length()`` and ``reorder_cache(beam_idx)``.
    """

    is_compileable = False  # generate() asks; the cache grows, so compiled decoding would recompile

    def __init__(self, windows: list[int | None]) -> None:
        self.layers = [LayerCache(w) for w in windows]
        self.seen_tokens = 0

    @property
    def is_linear(self) -> list[bool]:
        """Per layer, whether it is a linear-attention (state-space) layer: never. transformers >= 5.24's
        ``generate()`` asks before its prefill, once it finds the cache under its current name ``cache``."""
        return [False] * len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of tokens processed so far (not the number kept by rolling layers)."""
        return self.seen_tokens

    def reorder_cache(self, beam_idx: Tensor) -> None:
        for layer in self.layers:
            layer.select(beam_idx)

    def nbytes(self) -> int:
        """Bytes held by all cached tensors."""
        return sum(layer.nbytes() for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)
