"""Domain weights from domain embeddings: the maths of Chameleon (METHOD.md, steps 3-5).

    X [k, d] -> Omega = X X^T -> Omega_c = H Omega H -> S = KRLS(Omega_c, mu = lam * k)
      -> S / sum(S) -> pretrain: softmax(1 / ((S + 1e-12) T_pt)),  finetune: softmax(S / T_ft)

Everything runs in float64; the leverage scores come from the fused ``krls`` op.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .ops import krls

__all__ = [
    "DEFAULT_LAMBDA",
    "DEFAULT_TEMPERATURE",
    "DomainWeights",
    "linear_affinity",
    "centered_affinity",
    "weights_from_scores",
    "chameleon_weights",
    "domain_weights",
    "domain_weights_from_affinity",
]

DEFAULT_LAMBDA = 10.0
DEFAULT_TEMPERATURE = {"pretrain": 5.0, "finetune": 0.2}
_EPS = 1e-12  # the reference's guard in 1 / (S + eps)


@dataclass
class DomainWeights:
    """Everything a weights file records: the weights and the scores behind them."""

    weights: Tensor  # [k] sums to 1
    krls: Tensor  # [k] leverage scores after normalisation (== krls_raw if normalize=False)
    krls_raw: Tensor  # [k] leverage scores S_i in [0, 1)
    affinity: Tensor  # [k, k] centred affinity Omega_c
    mode: str
    lam: float
    temperature: float
    normalize: bool
    domains: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        names = self.domains or [str(i) for i in range(len(self.weights))]
        return {
            "mode": self.mode,
            "lambda": self.lam,
            "temperature": self.temperature,
            "normalize": self.normalize,
            "domains": list(names),
            "weights": {n: float(w) for n, w in zip(names, self.weights.tolist())},
            "krls": {n: float(s) for n, s in zip(names, self.krls.tolist())},
            "krls_raw": {n: float(s) for n, s in zip(names, self.krls_raw.tolist())},
        }


def _check_mode(mode: str) -> str:
    if mode not in DEFAULT_TEMPERATURE:
        raise ValueError(f"mode must be 'pretrain' or 'finetune', got {mode!r}")
    return mode


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def linear_affinity(embeddings: Tensor) -> Tensor:
    """Omega = X X^T in float64. ``embeddings``: ``[k, d]``."""
    if not isinstance(embeddings, Tensor):
        embeddings = torch.as_tensor(embeddings)
    if embeddings.dim() != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must be [k, d] with k, d >= 1, got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be a floating-point tensor, got {embeddings.dtype}")
    X = embeddings.to(torch.float64)
    bad = (~torch.isfinite(X)).any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"embeddings hold NaN or Inf in row(s) {bad} (domain index)")
    return X @ X.T


def centered_affinity(affinity: Tensor) -> Tensor:
    """Omega_c = H Omega H = Omega - row means - column means + grand mean."""
    A = affinity.to(torch.float64)
    return A - A.mean(0, keepdim=True) - A.mean(1, keepdim=True) + A.mean()


def weights_from_scores(scores: Tensor, mode: str = "pretrain", temperature: Optional[float] = None) -> Tensor:
    """Temperature softmax of (normalised) leverage scores ``[k]`` -> weights ``[k]``.

    pretrain: softmax(1 / ((S + 1e-12) T)), default T = 5 (shared structure up-weighted);
    finetune: softmax(S / T), default T = 0.2 (distinctive domains up-weighted).
    """
    mode = _check_mode(mode)
    T = DEFAULT_TEMPERATURE[mode] if temperature is None else _check_positive("temperature", temperature)
    S = scores.to(torch.float64)
    logits = 1.0 / ((S + _EPS) * T) if mode == "pretrain" else S / T
    return torch.softmax(logits, dim=0)  # subtracts the max: stable for huge logits


def domain_weights_from_affinity(
    affinity: Tensor,
    mode: str = "pretrain",
    lam: float = DEFAULT_LAMBDA,
    temperature: Optional[float] = None,
    normalize: bool = True,
    domains: Optional[Sequence[str]] = None,
    center: bool = True,
) -> DomainWeights:
    """Weights from a precomputed affinity (kernel) matrix ``[k, k]``.

    With ``center=True`` (a raw Gram matrix, the default) it is centred first; centring an
    already-centred matrix changes nothing. ``center=False`` uses the matrix as the kernel
    exactly as given, as the reference does with the paper's Figure 1 matrix."""
    mode = _check_mode(mode)
    lam = _check_positive("lam", lam)
    T = DEFAULT_TEMPERATURE[mode] if temperature is None else _check_positive("temperature", temperature)
    A = torch.as_tensor(affinity).to(torch.float64)
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise ValueError(f"affinity must be a square [k, k] matrix, got shape {tuple(A.shape)}")
    k = A.shape[0]
    if domains is not None and len(domains) != k:
        raise ValueError(f"domains must name the {k} rows of the affinity, got {len(domains)} names")
    names = list(domains) if domains is not None else []
    Ac = centered_affinity(A) if center else A
    raw = krls(A, lam, center=center, scale_by_k=True)
    total = float(raw.sum())
    if k == 1:
        warnings.warn("only one domain: its weight is 1.0", stacklevel=2)
        one = torch.ones(1, dtype=torch.float64)
        return DomainWeights(one, one.clone() if normalize else raw, raw, Ac, mode, lam, T, normalize, names)
    if total <= 0.0:
        # Every domain embeds to the same point: nothing distinguishes them.
        warnings.warn("all domains have identical embeddings (zero leverage): uniform weights", stacklevel=2)
        uniform = torch.full((k,), 1.0 / k, dtype=torch.float64)
        return DomainWeights(uniform, uniform.clone() if normalize else raw, raw, Ac, mode, lam, T, normalize, names)
    S = raw / total if normalize else raw
    return DomainWeights(weights_from_scores(S, mode, T), S, raw, Ac, mode, lam, T, normalize, names)


def chameleon_weights(
    embeddings: Tensor,
    mode: str = "pretrain",
    lam: float = DEFAULT_LAMBDA,
    temperature: Optional[float] = None,
    normalize: bool = True,
    domains: Optional[Sequence[str]] = None,
) -> DomainWeights:
    """The full result (weights, normalised and raw KRLS, centred affinity) from domain
    embeddings ``[k, d]`` with the linear kernel."""
    return domain_weights_from_affinity(
        linear_affinity(embeddings), mode=mode, lam=lam, temperature=temperature, normalize=normalize, domains=domains,
        center=True,
    )


def domain_weights(
    embeddings: Tensor,
    mode: str = "pretrain",
    lam: float = DEFAULT_LAMBDA,
    temperature: Optional[float] = None,
    normalize: bool = True,
) -> Tensor:
    """Chameleon mixture weights ``[k]`` (float64, sum 1) from domain embeddings ``[k, d]``.

    >>> w = domain_weights(torch.randn(7, 64), mode="pretrain")
    """
    return chameleon_weights(embeddings, mode, lam, temperature, normalize).weights
