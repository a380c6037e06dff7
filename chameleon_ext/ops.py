"""The Python face of the compiled ops: documented wrappers, fake (meta) kernels for
``torch.compile``, and autograd formulas.

The kernels live in ``csrc/cpu`` and ``csrc/cuda``; they validate their inputs and raise
``ValueError`` naming the argument for bad ones. The fake kernels only describe output
shapes and dtypes.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import require_ops

require_ops()  # without chameleon_ext._C the registrations below fail obscurely: say how to rebuild

__all__ = ["masked_mean_pool", "domain_mean_pool", "krls", "krls_ex"]

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
    if isinstance(num_domains, bool) or int(num_domains) != num_domains:
        raise ValueError(f"domain_mean_pool: num_domains must be an integer, got {num_domains!r}")
    return torch.ops.chameleon.domain_mean_pool.default(hidden, mask, domain_ids, int(num_domains))


# The fake kernels serve as the ops' meta kernels (torch.compile, FakeTensorMode, and any call
# with a meta tensor), so they make every check the compiled kernels make on shapes, dtypes and
# devices (csrc/checks.h), in the same order, with the same ValueError and message: an input the
# real op refuses must not trace. Only checks that read tensor values (a domain id outside
# [0, D), NaN in K, the value of a 0-d lam tensor) are left to the real kernels.
_POOL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _fake_check_hidden(op: str, hidden) -> None:
    torch._check_value(
        hidden.dim() == 3,
        lambda: f"{op}: hidden must be [B, T, H], got a {hidden.dim()}-d tensor of shape {_shape(hidden.shape)}",
    )
    torch._check_value(
        hidden.dtype in _POOL_DTYPES,
        lambda: f"{op}: hidden must be float32, float64, float16 or bfloat16, got {_dtype(hidden.dtype)}",
    )


def _fake_check_mask(op: str, hidden, mask) -> None:
    if mask is None:
        return
    B, T = hidden.shape[0], hidden.shape[1]
    torch._check_value(
        mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] == T,
        lambda: f"{op}: mask must be [B, T] = {_shape((B, T))}, got {_shape(mask.shape)}",
    )
    torch._check_value(
        mask.dtype == torch.bool or _is_integer_dtype(mask.dtype),
        lambda: f"{op}: mask must be bool or an integer dtype (non-zero = valid token), got {_dtype(mask.dtype)}",
    )
    torch._check_value(
        mask.device == hidden.device,
        lambda: f"{op}: mask must be on hidden's device {hidden.device}, got {mask.device}",
    )


def _shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


# c10's names for dtypes, as the compiled kernels print them in their messages.
_C10_NAMES = {
    torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
    torch.float16: "Half", torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
    torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
    torch.bool: "Bool",
}


def _dtype(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype))


@torch.library.register_fake("chameleon::masked_mean_pool")
def _masked_mean_pool_fake(hidden, mask):
    _fake_check_hidden("masked_mean_pool", hidden)
    _fake_check_mask("masked_mean_pool", hidden, mask)
    return hidden.new_empty((hidden.shape[0], hidden.shape[2]), dtype=_pooled_dtype(hidden.dtype))


@torch.library.register_fake("chameleon::domain_mean_pool")
def _domain_mean_pool_fake(hidden, mask, domain_ids, num_domains):
    op = "domain_mean_pool"
    _fake_check_hidden(op, hidden)
    _fake_check_mask(op, hidden, mask)
    B = hidden.shape[0]
    torch._check_value(num_domains >= 1, lambda: f"{op}: num_domains must be >= 1, got {num_domains}")
    torch._check_value(
        domain_ids.dim() == 1 and domain_ids.shape[0] == B,
        lambda: f"{op}: domain_ids must be [B] = [{B}], got {_shape(domain_ids.shape)}",
    )
    torch._check_value(
        _is_integer_dtype(domain_ids.dtype), lambda: f"{op}: domain_ids must be an integer dtype, got {_dtype(domain_ids.dtype)}"
    )
    torch._check_value(
        domain_ids.device == hidden.device or domain_ids.device.type == "cpu",
        lambda: f"{op}: domain_ids must be on the CPU or on hidden's device {hidden.device}, got {domain_ids.device}",
    )
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


def _lam_number(lam) -> float:
    """A number ``lam`` as the default overloads take it (``float lam``); checked for being
    finite and > 0 by the kernels, with the same message as for a 0-d tensor."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"krls: lam must be a number or a tensor, got {type(lam).__name__}")
    return float(lam)


def _krls_overload(packet, lam):
    """``(overload, lam)``: ``.lam_tensor`` for a tensor lam (one lambda per matrix, or a 0-d
    tensor), the default overload with a float for a number (nothing copied anywhere)."""
    if isinstance(lam, Tensor):
        if lam.requires_grad:
            raise ValueError("krls: gradients with respect to lam are not computed; pass lam.detach()")
        return packet.lam_tensor, lam
    return packet.default, _lam_number(lam)


def krls(K: Tensor, lam: Union[float, Tensor] = 10.0, center: bool = True, scale_by_k: bool = True) -> Tensor:
    """Kernel ridge leverage scores of a batch of kernel matrices.

    ``S = diag(Kc (Kc + mu I)^-1)`` with ``Kc = H K H`` the centred kernel (if ``center``)
    and ``mu = lam * k`` (if ``scale_by_k``, as in Chameleon; else ``mu = lam``).

    Args:
        K: ``[..., k, k]`` symmetric positive semi-definite, float32 or float64. Factorised
            in float64 whatever its dtype.
        lam: ridge regulariser, > 0: a number, or a tensor broadcastable to K's batch shape
            ``[...]`` (one lambda per matrix, e.g. a sweep over lambdas in one call), on K's
            device (sync-free) or on the CPU. Not differentiable.

    Returns:
        ``[..., k]`` in K's dtype, each score in ``[0, 1)``; their sum is the effective
        dimension. Computed without cancellation: small scores (a kernel small against mu)
        keep full relative precision (tested to 1e-10 relative against a 60-digit oracle for
        kernels scaled 1e-12..1e12 and lam 1e-6..1e8; a few ulps in practice). float32
        inputs are factorised in float64 from their exact values, so a float32 score's only
        error is its final rounding (relative 6e-8). Limit: with ``center=True`` and a kernel
        far above mu (cond = (s_max + mu) / mu above ~1e3), the float64 rounding of the
        centring itself bounds the relative error at about 1e-16 * cond, as for any float64
        method given K.

    Raises:
        ValueError: bad shape / dtype / ``lam``; a matrix holding NaN/Inf or not symmetric, or
            a lam so small that ``K + mu I`` is not numerically positive definite (the message
            names the batch index).
        torch.linalg.LinAlgError: a matrix that is not positive definite after centring and
            adding ``mu I`` (not PSD), naming its batch index.

    Differentiable with respect to ``K``. Synchronises with the device to check for failed
    matrices; :func:`krls_ex` does not.
    """
    op, lam = _krls_overload(torch.ops.chameleon.krls, lam)
    return op(K, lam, bool(center), bool(scale_by_k))


# Status codes in krls_ex's info (KrlsStatus in csrc/krls.h).
KRLS_INFO = {
    0: "ok",
    1: "K holds NaN or Inf",
    2: "K is not symmetric",
    3: "K + mu I is not positive definite (K is not PSD)",
    4: "lam is too small for K's scale",
    5: "lam is not a finite number > 0",
}


def krls_ex(
    K: Tensor, lam: Union[float, Tensor] = 10.0, center: bool = True, scale_by_k: bool = True
) -> Tuple[Tensor, Tensor]:
    """:func:`krls` without any host synchronisation (as ``torch.linalg.cholesky_ex``).

    Returns:
        ``(S [..., k], info [...] int32)``: ``info`` is 0 where the matrix was fine, else a
        status code (see ``KRLS_INFO``); the scores of such a matrix are NaN. Bad shapes,
        dtypes and a bad number ``lam`` still raise at once (they need no device data).
        Differentiable with respect to ``K`` through ``S``.
    """
    op, lam = _krls_overload(torch.ops.chameleon.krls_ex, lam)
    return op(K, lam, bool(center), bool(scale_by_k))


def _krls_fake_check(op: str, K, lam) -> None:
    """check_krls_K and check_krls_args (csrc/checks.h) on metadata; a float lam's value too."""
    torch._check_value(K.dim() >= 2, lambda: f"{op}: K must be [..., k, k], got shape {_shape(K.shape)}")
    k = K.shape[-1]
    torch._check_value(K.shape[-2] == k, lambda: f"{op}: K must be square [..., k, k], got shape {_shape(K.shape)}")
    torch._check_value(k >= 1, lambda: f"{op}: K must have k >= 1, got shape {_shape(K.shape)}")
    torch._check_value(
        K.dtype in (torch.float32, torch.float64), lambda: f"{op}: K must be float32 or float64, got {_dtype(K.dtype)}"
    )
    if not isinstance(lam, Tensor):
        if not isinstance(lam, torch.SymFloat):  # a symbolic lam is checked when it runs
            torch._check_value(
                math.isfinite(lam) and lam > 0, lambda: f"{op}: lam must be a finite number > 0, got {lam:g}"
            )
        return
    torch._check_value(
        lam.dtype.is_floating_point or _is_integer_dtype(lam.dtype),
        lambda: f"{op}: lam must be a real number or a real tensor, got dtype {_dtype(lam.dtype)}",
    )
    torch._check_value(
        lam.device == K.device or lam.device.type == "cpu",
        lambda: f"{op}: lam must be on K's device {K.device} (or on the CPU), got {lam.device}",
    )
    batch_shape = K.shape[:-2]
    broadcasts = lam.dim() <= len(batch_shape) and all(
        lam.shape[-d] == 1 or lam.shape[-d] == batch_shape[-d] for d in range(1, lam.dim() + 1)
    )
    torch._check_value(
        broadcasts,
        lambda: f"{op}: lam must be a number or a tensor broadcastable to K's batch shape "
        f"{_shape(batch_shape)}, got shape {_shape(lam.shape)}",
    )


def _krls_fake(K, lam, center=True, scale_by_k=True):
    _krls_fake_check("krls", K, lam)
    return K.new_empty(K.shape[:-1])


def _krls_ex_fake(K, lam, center=True, scale_by_k=True):
    _krls_fake_check("krls_ex", K, lam)
    return K.new_empty(K.shape[:-1]), K.new_empty(K.shape[:-2], dtype=torch.int32)


for _overload in ("", ".lam_tensor"):
    torch.library.register_fake("chameleon::krls" + _overload, _krls_fake)
    torch.library.register_fake("chameleon::krls_ex" + _overload, _krls_ex_fake)


def _krls_setup_context(ctx, inputs, output):
    K, lam, center, scale_by_k = inputs
    ctx.center, ctx.scale_by_k = center, scale_by_k
    ctx.lam_number = None if isinstance(lam, Tensor) else lam
    ctx.save_for_backward(K, lam if isinstance(lam, Tensor) else None)
    if isinstance(output, tuple):
        ctx.mark_non_differentiable(output[1])


def _center(M: Tensor) -> Tensor:
    return M - M.mean(-1, keepdim=True) - M.mean(-2, keepdim=True) + M.mean((-2, -1), keepdim=True)


def _krls_backward(ctx, grad, *unused_info_grad):
    # S_i = 1 - mu (A^-1)_ii with A = Kc + mu I, so dL/dKc = mu A^-1 diag(g) A^-1, and the
    # centring and symmetrisation are linear and self-adjoint. lam is not differentiated.
    K, lam = ctx.saved_tensors
    k = K.shape[-1]
    Kd = K.double()
    factor = k if ctx.scale_by_k else 1.0
    if lam is None:
        mu = ctx.lam_number * factor
    else:
        mu = (lam.to(device=K.device, dtype=torch.float64).expand(K.shape[:-2]) * factor)[..., None, None]
    Ks = 0.5 * (Kd + Kd.mT)
    Kc = _center(Ks) if ctx.center else Ks
    eye = torch.eye(k, dtype=Kd.dtype, device=Kd.device)
    Ainv = torch.cholesky_inverse(torch.linalg.cholesky(Kc + mu * eye))
    G = mu * (Ainv * grad.double().unsqueeze(-2)) @ Ainv
    if ctx.center:
        G = _center(G)
    return G.to(K.dtype), None, None, None


for _overload in ("", ".lam_tensor"):
    for _op in ("krls", "krls_ex"):
        torch.library.register_autograd(
            f"chameleon::{_op}{_overload}", _krls_backward, setup_context=_krls_setup_context
        )
