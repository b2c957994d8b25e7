"""Re-parametrize a trained multi-head attention layer as collaborative attention (Cordonnier et al., 2020).

Head ``h`` of multi-head attention scores query ``i`` against key ``j`` as

    s_h(i, j) = (x_i W_Q^h + b_Q^h) (x_j W_K^h + b_K^h)^T / sqrt(d_k)
              = x_i W_Q^h (W_K^h)^T x_j^T        (1) the content-content term
              + x_i W_Q^h (b_K^h)^T               (2) depends on the query only
              + x_j W_K^h (b_Q^h)^T               (3) depends on the key only
              + b_Q^h (b_K^h)^T                   (4) a constant

The softmax over ``j`` is unchanged by adding the same number to every key of a row, so (2) and
(4) cancel: the key bias never matters. Term (3) does not cancel: it is kept exactly as a per-head
*content bias* on the keys, ``x_j . u_h`` with ``u_h = W_K^h (b_Q^h)^T``. Term (1) is
``x_i T_h x_j^T`` with ``T_h = W_Q^h (W_K^h)^T`` (``d_in x d_in``, rank ``d_k``). Stacking the ``T_h``
gives a ``heads x d_in x d_in`` tensor whose CP decomposition of rank ``D~k``,

    T_h ~= sum_r M[h, r] a_r b_r^T,

is collaborative attention: shared ``W~_Q = [a_r]``, ``W~_K = [b_r]`` and mixing matrix ``M``.

* At ``D~k >= heads * d_k`` the decomposition is exact and needs no solver: head ``h``'s own
  columns with a one-hot mixing row.
* Below, TensorLy's ``parafac`` (alternating least squares) finds the factors. Plain, it minimises
  the error of the weights. *Data-aware* (``calibration`` activations given), it minimises the
  expected error of the logits on real inputs: with ``C = E[x^T x]`` the second moment of the
  layer's inputs and ``S = C^{1/2}``, ``E|x_i (T - T^) x_j^T|^2 = ||S (T - T^) S||_F^2`` for
  independent ``x_i, x_j``, so it decomposes ``S T_h S`` and maps the factors back by ``S^{-1}``.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass

import torch
from torch import Tensor

from .._validation import check_choice, check_divisible, check_positive_int
from ..layers import CollaborativeAttention, MultiHeadAttention
from ..layers.collaborative import block_mixing

INITS = ("svd", "random")


@dataclass
class CollaborativeWeights:
    """The factors of one re-parametrized layer.

    Attributes:
        query: ``W~_Q`` ``(d_in, key_dim)``.
        key: ``W~_K`` ``(d_in, key_dim)``.
        mixing: ``M`` ``(heads, key_dim)``.
        content_bias: ``u`` ``(heads, d_in)`` (zeros when the query had no bias).
        relative_error: ``||T - T^||_F / ||T||_F`` of the query-key products (weights).
        whitened_error: the same error in the calibration-whitened space (``None`` without calibration).
    """

    query: Tensor
    key: Tensor
    mixing: Tensor
    content_bias: Tensor
    relative_error: float
    whitened_error: float | None = None


def query_key_products(query_weight: Tensor, key_weight: Tensor, num_heads: int) -> Tensor:
    """``T_h = W_Q^h (W_K^h)^T`` stacked: ``(heads, d_in, d_in)`` from ``nn.Linear`` weights ``(heads*d_k, d_in)``."""
    d_in = query_weight.shape[1]
    wq = query_weight.reshape(num_heads, -1, d_in)  # (H, d_k, d_in): (W_Q^h)^T
    wk = key_weight.reshape(num_heads, -1, d_in)
    return wq.transpose(1, 2) @ wk


def _sqrt_and_inverse(second_moment: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    d = second_moment.shape[0]
    c = second_moment + ridge * second_moment.trace() / d * torch.eye(d, dtype=second_moment.dtype)
    values, vectors = torch.linalg.eigh(c)
    values = values.clamp_min(values.max() * 1e-12)
    return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T


def reparametrize(
    query_weight: Tensor,
    key_weight: Tensor,
    num_heads: int,
    key_dim: int,
    *,
    query_bias: Tensor | None = None,
    calibration: Tensor | None = None,
    init: str = "svd",
    n_iter_max: int = 100,
    tol: float = 1e-8,
    seed: int = 0,
    ridge: float = 1e-6,
) -> CollaborativeWeights:
    """Collaborative factors of one attention layer's query/key projections.

    Args:
        query_weight, key_weight: ``nn.Linear`` weights ``(heads * d_k, d_in)``.
        num_heads: number of heads.
        key_dim: ``D~k``, the shared key size, ``1 <= key_dim <= d_in``.
        query_bias: ``(heads * d_k,)``, kept exactly as the content bias ``u_h = W_K^h b_Q^h``.
        calibration: ``(n, d_in)`` real inputs of this layer for the data-aware decomposition.
        init: ``"svd"`` or ``"random"`` initialisation of the ALS solver (below full rank).
        n_iter_max, tol, seed: ALS iteration cap, convergence tolerance, random seed.
        ridge: relative ridge added to the calibration second moment before its square root.

    The decomposition runs in float64, on the GPU when the weights are there. Returns float64 factors.

    Raises:
        ValueError: for a key_dim out of range, mismatched shapes or an unknown init.
    """
    check_positive_int("num_heads", num_heads)
    check_positive_int("key_dim", key_dim)
    check_choice("init", init, INITS)
    if query_weight.shape != key_weight.shape or query_weight.dim() != 2:
        raise ValueError(
            f"query_weight {tuple(query_weight.shape)} and key_weight {tuple(key_weight.shape)} must both be "
            "(heads * d_k, d_in)"
        )
    total, d_in = query_weight.shape
    check_divisible("query_weight.shape[0]", total, "num_heads", num_heads)
    if key_dim > d_in:
        raise ValueError(f"key_dim={key_dim} is not allowed: expected 1 <= key_dim <= d_in={d_in}")
    device = query_weight.device
    wq, wk = query_weight.detach().double(), key_weight.detach().double()
    d_k = total // num_heads
    content = torch.zeros(num_heads, d_in, dtype=torch.float64, device=device)
    if query_bias is not None:  # u_h = W_K^h (b_Q^h)^T
        content = torch.einsum("hkd,hk->hd", wk.reshape(num_heads, d_k, d_in), query_bias.detach().double().reshape(num_heads, d_k))
    products = query_key_products(wq, wk, num_heads)
    if key_dim >= total:  # exact: the block structure, padded with unused columns
        pad = key_dim - total
        zeros = torch.zeros(d_in, pad, dtype=torch.float64, device=device)
        mixing = torch.cat([block_mixing(num_heads, total).double().to(device),
                            torch.zeros(num_heads, pad, dtype=torch.float64, device=device)], dim=1)
        return CollaborativeWeights(torch.cat([wq.T, zeros], 1), torch.cat([wk.T, zeros], 1), mixing, content, 0.0,
                                    0.0 if calibration is not None else None)

    import tensorly as tl
    from tensorly.decomposition import parafac

    target = products
    root = inverse_root = None
    if calibration is not None:
        x = calibration.detach().double().to(device).reshape(-1, d_in)
        root, inverse_root = _sqrt_and_inverse(x.T @ x / x.shape[0], ridge)
        target = root @ products @ root  # S T_h S
    # TensorLy's einsum MTTKRP lets torch.einsum (through opt_einsum) pick the contraction order instead of
    # materialising the Khatri-Rao product: the same factors, 3.3x faster on MiniLM (1.07 vs 3.5 s a layer,
    # 2-core CPU); without opt_einsum torch would contract left to right through a huge intermediate
    mttkrp = "einsum" if torch.backends.opt_einsum.is_available() else "core"
    with tl.backend_context("pytorch"), tl.tenalg.backend_context(mttkrp), warnings.catch_warnings():
        # expected whenever key_dim > num_heads: the SVD initialisation of the head factor has only num_heads
        # singular vectors, and TensorLy fills the other columns randomly (what we want); its warning says so
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        cp = parafac(target, rank=key_dim, init=init, n_iter_max=n_iter_max, tol=tol, random_state=seed,
                     normalize_factors=False)
    weights, (mixing, a, b) = cp
    mixing = mixing * weights[None, :]
    approx = torch.einsum("hr,ir,jr->hij", mixing, a, b)
    whitened_error = None
    if root is not None:
        whitened_error = ((approx - target).norm() / target.norm()).item()
        a, b = inverse_root @ a, inverse_root @ b
        approx = torch.einsum("hr,ir,jr->hij", mixing, a, b)
    error = ((approx - products).norm() / products.norm()).item()
    return CollaborativeWeights(a, b, mixing, content, error, whitened_error)


def collaborative_from_multi_head(
    mha: MultiHeadAttention, key_dim: int, *, calibration: Tensor | None = None, **options
) -> tuple[CollaborativeAttention, CollaborativeWeights]:
    """A :class:`CollaborativeAttention` layer equivalent to ``mha`` (exactly at ``key_dim >= dim``).

    ``options`` go to :func:`reparametrize`. Rotary layers are refused: the rotation acts per head
    between the query and key projections, so ``T_h`` is not a fixed matrix.
    """
    if mha.rotary is not None or mha.q_norm is not None:
        raise ValueError(
            "cannot re-parametrize a layer with rotary position embedding or QK-norm: they act per head between "
            "the query/key projections and the product, so the per-head products W_Q^h W_K^h^T do not exist"
        )
    bias = mha.q_proj.bias
    weights = reparametrize(mha.q_proj.weight, mha.k_proj.weight, mha.num_heads, key_dim, query_bias=bias,
                            calibration=calibration, **options)
    layer = CollaborativeAttention(
        mha.dim, mha.num_heads, key_dim=key_dim, causal=mha.causal, window=mha.window,
        bias=mha.v_proj.bias is not None, content_bias=bias is not None,
    ).to(device=mha.out_proj.weight.device)
    with torch.no_grad():
        layer.query.weight.copy_(weights.query.T)
        layer.key.weight.copy_(weights.key.T)
        layer.mixing.copy_(weights.mixing)
        if layer.query.bias is not None:  # the query bias lives on in the content bias; the key bias cancels
            layer.query.bias.zero_()
            layer.key.bias.zero_()
        if layer.content_bias is not None:
            layer.content_bias.copy_(weights.content_bias)
        layer.v_proj.load_state_dict(mha.v_proj.state_dict())
        layer.out_proj.load_state_dict(mha.out_proj.state_dict())
    return layer.to(mha.out_proj.weight.dtype), weights
