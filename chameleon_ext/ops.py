"""The Python face of the compiled ops: documented wrappers, fake (meta) kernels for
``torch.compile``, and autograd formulas.

The kernels live in ``csrc/cpu`` and ``csrc/cuda``; they validate their inputs and raise
``ValueError`` naming the argument for bad ones. The fake kernels only describe output
shapes and dtypes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["masked_mean_pool", "domain_mean_pool", "krls"]

_HALF = (torch.float16, torch.bfloat16)


def _pooled_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


# --------------------------------------------------------------------------- pooling


def masked_mean_pool(hidden: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean of the valid tokens of each row.

    Args:
        hidden: ``[B, T, H]`` float32 / float64 / float16 / bfloat16, any strides.
        mask: ``[B, T]`` bool or integer (non-zero = valid token), or ``None`` for all valid.
            On hidden's device.

    Returns:
        ``[B, H]``: float32 for half inputs, else hidden's dtype. Accumulates in float32 (or
        float64 for float64) over blocks of at most a few thousand tokens and adds the
        blocks in float64, so the error does not grow with T (a row of 2**28 ones pools to
        exactly 1); working memory does not depend on T. A row with no valid token gives
        zeros, never NaN. Differentiable with respect to ``hidden``. Sync-free on CUDA
        (CUDA-graph capturable).
    """
    return torch.ops.chameleon.masked_mean_pool.default(hidden, mask)


def domain_mean_pool(
    hidden: Tensor, mask: Optional[Tensor], domain_ids: Tensor, num_domains: int
) -> Tuple[Tensor, Tensor]:
    """Per-row masked means summed per domain, in one pass over ``hidden``.

    Args:
        hidden: ``[B, T, H]`` as in :func:`masked_mean_pool`.
        mask: ``[B, T]`` or ``None``.
        domain_ids: ``[B]`` integer, each in ``[0, num_domains)``, on the CPU or on hidden's
            device. CPU ids are checked on the host (a bad id raises ``ValueError`` before
            anything runs). On CUDA, ids on the GPU are never copied to the host, so the call
            does not synchronise and can be captured in a CUDA graph; a bad id there is a
            device-side assert, as for ``torch.index_select``.
        num_domains: D >= 1.

    Returns:
        ``(sums [D, H], counts [D])``: sums float32 (float64 for float64 input); counts int64,
        the number of rows with at least one valid token. Domain embedding = sums / counts.
        Both add up across batches and ranks (all-reduce them). Deterministic on CPU and
        CUDA: the sums are taken in a fixed order that depends only on the shapes and ids
        (batch order on CPU; on CUDA fixed chunks of each domain's rows, in batch order, then
        the chunks in order), in float64. Differentiable in ``hidden`` through ``sums``.
    """
    return torch.ops.chameleon.domain_mean_pool.default(hidden, mask, domain_ids, int(num_domains))


def _check_pool_devices(op: str, hidden: Tensor, mask: Optional[Tensor], domain_ids: Optional[Tensor] = None) -> None:
    """The kernels' device rules, also in the fake kernels: these serve as the ops' meta
    kernels, which the dispatcher picks when any argument is a meta tensor. Without the
    check a CPU ``hidden`` with a meta ``mask`` would return uninitialised CPU memory."""
    if mask is not None and mask.device != hidden.device:
        raise ValueError(f"{op}: mask must be on hidden's device {hidden.device}, got {mask.device}")
    if domain_ids is not None and domain_ids.device != hidden.device and domain_ids.device.type != "cpu":
        raise ValueError(
            f"{op}: domain_ids must be on the CPU or on hidden's device {hidden.device}, got {domain_ids.device}"
        )


@torch.library.register_fake("chameleon::masked_mean_pool")
def _masked_mean_pool_fake(hidden, mask):
    torch._check(hidden.dim() == 3, lambda: f"masked_mean_pool: hidden must be [B, T, H], got {tuple(hidden.shape)}")
    _check_pool_devices("masked_mean_pool", hidden, mask)
    return hidden.new_empty((hidden.shape[0], hidden.shape[2]), dtype=_pooled_dtype(hidden.dtype))


@torch.library.register_fake("chameleon::domain_mean_pool")
def _domain_mean_pool_fake(hidden, mask, domain_ids, num_domains):
    torch._check(hidden.dim() == 3, lambda: f"domain_mean_pool: hidden must be [B, T, H], got {tuple(hidden.shape)}")
    _check_pool_devices("domain_mean_pool", hidden, mask, domain_ids)
    sums = hidden.new_empty((num_domains, hidden.shape[2]), dtype=_pooled_dtype(hidden.dtype))
    counts = hidden.new_empty((num_domains,), dtype=torch.int64)
    return sums, counts


def _token_weights(mask: Optional[Tensor], B: int, T: int, like: Tensor) -> Tensor:
    """``[B, T]``: d(row mean)/d(token) = valid / count, zero for rows with no valid token."""
    if mask is None:
        return like.new_full((B, T), 1.0 / T if T > 0 else 0.0)
    m = (mask != 0).to(like.dtype)
    return m / m.sum(1, keepdim=True).clamp_min(1.0)


def _pool_setup_context(ctx, inputs, output):
    hidden, mask = inputs[0], inputs[1]
    ctx.hidden_shape = hidden.shape
    ctx.hidden_dtype = hidden.dtype
    ctx.save_for_backward(mask)


def _masked_mean_pool_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    B, T, _ = ctx.hidden_shape
    w = _token_weights(mask, B, T, grad)
    grad_hidden = (grad.unsqueeze(1) * w.unsqueeze(-1)).to(ctx.hidden_dtype)
    return grad_hidden, None


def _domain_setup_context(ctx, inputs, output):
    hidden, mask, domain_ids, _ = inputs
    ctx.hidden_shape = hidden.shape
    ctx.hidden_dtype = hidden.dtype
    ctx.save_for_backward(mask, domain_ids)
    ctx.mark_non_differentiable(output[1])


def _domain_mean_pool_backward(ctx, grad_sums, grad_counts):
    mask, domain_ids = ctx.saved_tensors
    B, T, _ = ctx.hidden_shape
    grad_rows = grad_sums.index_select(0, domain_ids.long())  # [B, H]
    w = _token_weights(mask, B, T, grad_rows)
    grad_hidden = (grad_rows.unsqueeze(1) * w.unsqueeze(-1)).to(ctx.hidden_dtype)
    return grad_hidden, None, None, None


torch.library.register_autograd(
    "chameleon::masked_mean_pool", _masked_mean_pool_backward, setup_context=_pool_setup_context
)
torch.library.register_autograd(
    "chameleon::domain_mean_pool", _domain_mean_pool_backward, setup_context=_domain_setup_context
)


# --------------------------------------------------------------------------- krls


def krls(K: Tensor, lam: float = 10.0, center: bool = True, scale_by_k: bool = True) -> Tensor:
    """Kernel ridge leverage scores of a batch of kernel matrices.

    ``S = diag(Kc (Kc + mu I)^-1)`` with ``Kc = H K H`` the centred kernel (if ``center``)
    and ``mu = lam * k`` (if ``scale_by_k``, as in Chameleon; else ``mu = lam``).

    Args:
        K: ``[..., k, k]`` symmetric positive semi-definite, float32 or float64. Factorised
            in float64 whatever its dtype.
        lam: ridge regulariser, > 0.

    Returns:
        ``[..., k]`` in K's dtype, each score in ``[0, 1)``; their sum is the effective
        dimension.

    Raises:
        ValueError: bad shape / dtype / ``lam``; a matrix holding NaN/Inf or not symmetric
            (the message names its batch index).
        torch.linalg.LinAlgError: a matrix that is not positive definite after centring and
            adding ``mu I`` (not PSD), naming its batch index.

    Differentiable with respect to ``K``.
    """
    if isinstance(lam, Tensor):
        raise TypeError("krls: lam must be a Python float, got a Tensor")
    return torch.ops.chameleon.krls.default(K, float(lam), bool(center), bool(scale_by_k))


@torch.library.register_fake("chameleon::krls")
def _krls_fake(K, lam, center=True, scale_by_k=True):
    torch._check(K.dim() >= 2, lambda: f"krls: K must be [..., k, k], got {tuple(K.shape)}")
    torch._check(K.shape[-1] == K.shape[-2], lambda: f"krls: K must be square, got {tuple(K.shape)}")
    return K.new_empty(K.shape[:-1])


def _krls_setup_context(ctx, inputs, output):
    K, lam, center, scale_by_k = inputs
    ctx.lam, ctx.center, ctx.scale_by_k = lam, center, scale_by_k
    ctx.save_for_backward(K)


def _center(M: Tensor) -> Tensor:
    return M - M.mean(-1, keepdim=True) - M.mean(-2, keepdim=True) + M.mean((-2, -1), keepdim=True)


def _krls_backward(ctx, grad):
    # S_i = 1 - mu (A^-1)_ii with A = Kc + mu I, so dL/dKc = mu A^-1 diag(g) A^-1, and the
    # centring and symmetrisation are linear and self-adjoint.
    (K,) = ctx.saved_tensors
    k = K.shape[-1]
    mu = ctx.lam * k if ctx.scale_by_k else ctx.lam
    Kd = K.double()
    Ks = 0.5 * (Kd + Kd.mT)
    Kc = _center(Ks) if ctx.center else Ks
    eye = torch.eye(k, dtype=Kd.dtype, device=Kd.device)
    Ainv = torch.cholesky_inverse(torch.linalg.cholesky(Kc + mu * eye))
    G = mu * (Ainv * grad.double().unsqueeze(-2)) @ Ainv
    if ctx.center:
        G = _center(G)
    return G.to(K.dtype), None, None, None


torch.library.register_autograd("chameleon::krls", _krls_backward, setup_context=_krls_setup_context)
