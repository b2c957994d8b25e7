"""Fused composed attention (DCMHA) in Triton: no ``(query x key)`` tensor ever reaches device memory.

Same arguments and result as :func:`headmix.reference.composed_attention`, which is the spec this
path is tested against (forward and every gradient, ``tests/test_triton.py``).

Design. One program owns a block of ``BLOCK_M`` queries (or keys) for *all* ``M`` heads of one head
group, so the cross-head Compose happens in registers on ``(M, BLOCK_M, BLOCK_N)`` tiles.

* Forward, two passes over the keys. Pass 1: scores ``S = scale * Q K^T`` -> pre-Compose -> mask ->
  running row max and sum per head (online softmax) -> ``lse``. Pass 2: recompute, ``P =
  exp(S' - lse)``, post-Compose, ``O += P' V``. Stores ``O`` and ``lse`` (``B x H x T`` floats).
  Decoding (no gradients, few query blocks): the keys are split over programs; three launches with nothing
  read back on the host (graph-capturable): the splits' statistics; each split's partial output, the statistics
  of all splits combined into ``lse`` inside the kernel; the sum of the partial outputs.
* Compose runs as per-position head-mixing matrices on tensor cores (:mod:`.tiles`):
  ``E_i`` per query (static mix, query-wise terms, query gate) and ``F_j`` per key (key-wise terms).
* Backward, three passes, recomputing instead of storing probabilities (``dY`` denotes an upstream
  gradient; ``Compose^T`` is Compose with ``E`` and ``F`` transposed, see ``_compose`` in :mod:`.tiles`):

  1. query blocks: ``dP' = dO V^T``, ``dP = Compose_post^T(dP')``, ``Delta = sum_j P * dP`` per
     (head, query) -- the softmax needs it, and with a post-Compose it is not ``rowsum(dO * O)``;
     gradients of the query-side post-Compose weights (the static mix's as one partial sum per
     program, summed afterwards: no atomics, so results are the same on every run).
  2. query blocks: ``dS' = P (dP - Delta)``, ``dS = Compose_pre^T(dS')``, ``dQ``; query-side
     pre-Compose weights (static mix likewise).
  3. key blocks: ``dK``, ``dV`` and every key-side weight gradient.

Everything accumulates in float32; ``Q K^T``, ``P' V`` and their backward products use the
inputs' dtype on tensor cores (bf16/fp16) or exact float32 (``input_precision="ieee"``) for float32
inputs; the head-mixing products read the operands ``MIX_PRECISION`` gives for the inputs' dtype (bf16 on both sides
of the softmax for bf16 inputs; tf32 before it and bf16 after it for fp16).
Masks: causal and sliding-window structure by index arithmetic (key blocks outside the window are
skipped), or any boolean mask tensor loaded tile by tile (padding, cached decoding).

Limits: head dims 16-128 and the rank are padded to powers of two; ``M = H / groups`` heads per group up to
32, forward and backward. Above a (padded) head dim of 64 the backward works in 64-wide chunks of the head dim
(whole tiles of 128 exceed the shared memory), which needs equal (padded) key and value head dims. Groups of more
than 16 heads (DCFormer-2.8B, -6.9B: 32 in one group) hold the Compose in the rank-R form (:mod:`.tiles`), not as
per-position mixing matrices (which would need more shared memory than an H100/H200 has), and work in 32/64-wide
head-dim chunks in the forward as in the backward (``launch.head_dim_chunks``).

Grouped-query attention: ``k``, ``v`` may have ``H_kv`` heads (``H_kv`` divides ``H``); query head ``h`` reads
key/value head ``h // (H / H_kv)`` (no repeated copy in memory); ``dK``, ``dV`` are computed per query head
and summed over each key/value head's query heads on the host.

Head dims that are no power of two (80, 96: DCFormer-2.8B has 80) are padded to the next power of two inside
the kernels: loads read the padding as zeros, stores skip it.

Layout of this package, by role:

* :mod:`.tiles`: the ``@triton.jit`` tile helpers (mixing matrices, masks, block ranges) and the names of the
  Compose-term flag bits (``STATIC``, ``QUERY_LOWRANK``, ``KEY_LOWRANK``, ``QUERY_GATE``, ``KEY_GATE``);
* :mod:`.forward`, :mod:`.backward`: the tile kernels;
* :mod:`.blockwise` (launches) and :mod:`.blockwise_kernels`: the blockwise training path (materialised query
  blocks, products on cuBLAS, the Compose in Triton at memory speed), which trains wide groups and head dims above 64
  (``launch.TRAINING_KERNELS``; :mod:`.op` routes each call);
* :mod:`.projected`: the projected forward (each Compose's cross-head sums computed once per (query, key) pair, the
  heads in a loop, one head's tile at a time), auto's training forward before the blockwise backward and its prefill
  forward at larger sizes;
* :mod:`.projected_backward`: the backward in the same form, auto's for windowed layers that would otherwise train on
  the blockwise backward;
* :mod:`.launch`: what the kernels take (:func:`check_supported`), tile shapes, launches;
* :mod:`.op`: the ``torch.library`` custom ops with autograd, and the entry point
  :func:`triton_composed_attention`. What runs when a kernel does not fit the GPU is the ops registry's
  policy (:mod:`headmix.ops`), not the op's;
* :mod:`.norm`: RMS normalisation of short rows (QK-norm, the dynamic-weight factors), which
  :func:`headmix.ops.rms_norm` runs in eager CUDA code;
* :mod:`.rows`: a decoding step's DCMHA dynamic weights, packed (``DynamicWeightProjection.rows``);
* :mod:`.rotary`: rotary position embeddings in one kernel, which ``RotaryEmbedding`` runs in eager CUDA code.

Names inside the kernels (one scheme throughout):

* tensors: ``q_ptr``, ``k_ptr``, ``v_ptr``, ``o_ptr`` (``do_ptr`` its gradient), ``lse_ptr``, ``mask_ptr``;
* Compose weights: ``<compose>_<term>``, compose ``pre`` or ``post``, term ``w`` (static mix), ``q1``/``q2``
  (query-wise factors ``w_q1``/``w_q2``), ``k1``/``k2`` (key-wise), ``qg``/``kg`` (gates); their gradient
  outputs carry a ``d`` in front (``dpre_k1``; ``d_q1`` for the stage's Compose in the query kernel);
* strides: ``s`` + tensor letter + axis letter, e.g. ``sqb, sqh, sqt, sqd`` are q's batch, head, position and
  head-dim strides (``so*`` are shared by the output and its gradient, ``sm*`` are the mask's);
* tile offsets: ``offs_i`` query positions, ``offs_j`` key positions, ``hm`` heads of the group (padded to
  ``MP``), ``M`` real heads per group, ``G`` groups, ``R`` rank; ``BM``/``BN`` query/key block sizes; ``DK``/``DV``
  padded head dims, ``dk_n``/``dv_n`` the real ones; ``off`` the key position of query 0; ``kv_rep`` query heads
  per key/value head.

Triton is optional: without it (or without a GPU and ``TRITON_INTERPRET=1``) this backend is absent.
"""

from __future__ import annotations

from .launch import (FIELDS, MAX_HEADS_PER_GROUP, MIX_PRECISION, SMALL_TILE_HEADS, SPLIT_TARGET_PROGRAMS,
                     TILES, check_supported, launch_meta, next_pow2, padded_heads, tensor_core_flops, tile_key,
                     tile_shape, triton_backward, triton_forward)
from . import rotary, rows  # noqa: F401  (rows: the headmix::dynamic_rows op)
from .op import flatten, triton_composed_attention

__all__ = ["FIELDS", "MAX_HEADS_PER_GROUP", "MIX_PRECISION", "SMALL_TILE_HEADS", "SPLIT_TARGET_PROGRAMS",
           "TILES", "check_supported", "flatten", "launch_meta", "next_pow2", "padded_heads", "tensor_core_flops",
           "tile_key", "tile_shape", "triton_backward", "triton_composed_attention", "triton_forward"]

from .. import _register_triton  # noqa: E402  (the registry's name and fallback policy, set once on import)

_register_triton(op, triton_composed_attention)
