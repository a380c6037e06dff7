"""Plain PyTorch oracles for the compiled ops.

Written for clarity, not speed, and independently of the kernels: tests check the ops
against these, and benchmarks use them as the eager baseline.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_mean_pool(hidden: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``[B, T, H]``, ``[B, T]`` -> ``[B, H]``: mean over valid tokens, zeros for empty rows."""
    h = hidden.to(_acc_dtype(hidden.dtype))
    if mask is None:
        m = torch.ones(h.shape[:2], dtype=h.dtype, device=h.device)
    else:
        m = (mask != 0).to(h.dtype)
    total = (h * m.unsqueeze(-1)).sum(1)
    count = m.sum(1, keepdim=True)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def masked_mean_pool_bmm(hidden: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """The best plain-PyTorch formulation: one batched matmul of the mask with the states."""
    B, T, _ = hidden.shape
    if mask is None:
        m = torch.ones(B, T, dtype=hidden.dtype, device=hidden.device)
    else:
        m = (mask != 0).to(hidden.dtype)
    count = m.sum(1, keepdim=True).float() if hidden.dtype != torch.float64 else m.sum(1, keepdim=True)
    total = torch.bmm(m.unsqueeze(1), hidden).squeeze(1).to(count.dtype)
    return total / count.clamp_min(1)


def domain_mean_pool(
    hidden: Tensor, mask: Optional[Tensor], domain_ids: Tensor, num_domains: int
) -> Tuple[Tensor, Tensor]:
    """Per-domain sums of row means ``[D, H]`` and counts of non-empty rows ``[D]``."""
    means = masked_mean_pool(hidden, mask)
    if mask is None:
        nonempty = torch.full((hidden.shape[0],), hidden.shape[1] > 0, device=hidden.device)
    else:
        nonempty = (mask != 0).any(1)
    ids = domain_ids.long()[nonempty]
    sums = torch.zeros(num_domains, hidden.shape[2], dtype=means.dtype, device=means.device)
    sums.index_add_(0, ids, means[nonempty])
    counts = torch.bincount(ids, minlength=num_domains)
    return sums, counts


def center_kernel(K: Tensor) -> Tensor:
    """``H K H`` with ``H = I - 11^T / k``, written as the explicit product."""
    k = K.shape[-1]
    Hm = torch.eye(k, dtype=K.dtype, device=K.device) - 1.0 / k
    return Hm @ K @ Hm


def krls(K: Tensor, lam: float, center: bool = True, scale_by_k: bool = True) -> Tensor:
    """``diag(Kc (Kc + mu I)^-1)`` in float64 with ``torch.linalg.solve``."""
    Kd = K.to(torch.float64)
    k = Kd.shape[-1]
    mu = lam * k if scale_by_k else lam
    Kc = center_kernel(Kd) if center else Kd
    A = Kc + mu * torch.eye(k, dtype=Kd.dtype, device=Kd.device)
    # Kc and A commute, so diag(Kc A^-1) = diag(A^-1 Kc).
    S = torch.linalg.solve(A, Kc).diagonal(dim1=-2, dim2=-1)
    return S.to(K.dtype)


def krls_eigh_numpy(K: np.ndarray, lam: float, center: bool = True, scale_by_k: bool = True) -> np.ndarray:
    """Eigen-form oracle in float64 NumPy: S_i = sum_j U_ij^2 s_j / (s_j + mu)."""
    K = np.asarray(K, dtype=np.float64)
    k = K.shape[-1]
    mu = lam * k if scale_by_k else lam
    if center:
        Hm = np.eye(k) - 1.0 / k
        K = Hm @ K @ Hm
    s, U = np.linalg.eigh(0.5 * (K + np.swapaxes(K, -1, -2)))
    return np.einsum("...ij,...j->...i", U**2, s / (s + mu))


def krls_numpy_inv(K: np.ndarray, lam: float) -> np.ndarray:
    """What the reference implementation does, one matrix at a time: np.linalg.inv in float64."""
    K = np.asarray(K, dtype=np.float64)
    k = K.shape[0]
    Hm = np.eye(k) - 1.0 / k
    Kc = Hm @ K @ Hm
    return np.diag(Kc @ np.linalg.inv(Kc + lam * k * np.eye(k)))


def krls_torch_linalg(K: Tensor, lam: float, center: bool = True, scale_by_k: bool = True) -> Tensor:
    """The obvious batched torch.linalg formulation (the benchmark's baseline):
    float64 centring, ``cholesky_ex``, ``cholesky_inverse``, then ``1 - mu diag(A^-1)``."""
    Kd = K.to(torch.float64)
    k = Kd.shape[-1]
    mu = lam * k if scale_by_k else lam
    if center:
        Kd = Kd - Kd.mean(-1, keepdim=True) - Kd.mean(-2, keepdim=True) + Kd.mean((-2, -1), keepdim=True)
    A = Kd + mu * torch.eye(k, dtype=Kd.dtype, device=Kd.device)
    L, _ = torch.linalg.cholesky_ex(A)
    return (1.0 - mu * torch.cholesky_inverse(L).diagonal(dim1=-2, dim2=-1)).to(K.dtype)
