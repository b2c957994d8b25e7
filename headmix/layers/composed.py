"""What the layers that mix heads with Compose share: a backend of :mod:`headmix.ops` and its query block size."""

from __future__ import annotations

from ..ops import resolve_backend
from ..ops.chunked import DEFAULT_CHUNK_SIZE
from .mha import MultiHeadAttention


class ComposedAttention(MultiHeadAttention):
    """Multi-head attention whose core is composed attention (:func:`headmix.reference.composed_attention`),
    run by a backend of :mod:`headmix.ops` (base of :class:`TalkingHeadsAttention` and :class:`DCMHA`).

    Args:
        dim, num_heads: as for :class:`MultiHeadAttention`.
        backend: ``"auto"``, ``"reference"``, ``"chunked"`` (or a registered kernel), see :mod:`headmix.ops`.
        chunk_size: query block size of the chunked path.
        **options: shared options (``causal``, ``window``, ``bias``, ``rotary``, ``qk_norm``).
    """

    def __init__(
        self, dim: int, num_heads: int, *, backend: str = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE, **options
    ) -> None:
        super().__init__(dim, num_heads, **options)
        resolve_backend(backend, 1, chunk_size)  # validates the name now, not at the first call
        self.backend = backend
        self.chunk_size = chunk_size

    def reads_mask(self, structure: tuple[bool, int | None] | None, is_causal: bool) -> bool:
        return structure is None  # (given a structure, MaskSpec.of(mask, structure) drops the mask)
