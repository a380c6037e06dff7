"""Domain weights from domain embeddings: the maths of Chameleon (docs/method.md, steps 3-5).

    X [k, d] -> Omega = X X^T -> Omega_c = H Omega H -> S = KRLS(Omega_c, mu = lam * k)
      -> S / sum(S) -> pretrain: softmax(1 / ((S + 1e-12) T_pt)),  finetune: softmax(S / T_ft)

One entry point and two variants, all returning float64 results:

* :func:`weights_from_embeddings` -- domain embeddings ``[k, d]`` -> :class:`DomainWeights`
  (the weights and every score behind them). This is the one to use.
* :func:`weights_from_affinity` -- the same from a precomputed affinity (kernel) ``[k, k]``.
* :func:`weights_from_scores` -- only the temperature softmax of given leverage scores.

``chameleon_weights``, ``domain_weights_from_affinity`` and ``domain_weights`` are the names of
releases before 0.3; they still work and warn (:class:`DeprecationWarning`).

The leverage scores come from the fused ``krls`` op.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_LAMBDA",
    "DEFAULT_TEMPERATURE",
    "MODES",
    "DomainWeights",
    "linear_affinity",
    "centered_affinity",
    "weights_from_embeddings",
    "weights_from_affinity",
    "weights_from_scores",
    # deprecated aliases
    "chameleon_weights",
    "domain_weights",
    "domain_weights_from_affinity",
]

DEFAULT_LAMBDA = 10.0
DEFAULT_TEMPERATURE = {"pretrain": 5.0, "finetune": 0.2}
MODES = tuple(DEFAULT_TEMPERATURE)  # the two softmax rules
_EPS = 1e-12  # the reference's guard in 1 / (S + eps)


@dataclass
class DomainWeights:
    """Everything a weights file records: the weights and the scores behind them."""

    weights: Tensor  # [k] sums to 1
    leverage: Tensor  # [k] leverage scores fed to the softmax: S / sum(S) (== leverage_raw if not normalize)
    leverage_raw: Tensor  # [k] kernel ridge leverage scores S_i in [0, 1)
    affinity: Tensor  # [k, k] centred affinity Omega_c
    mode: str
    lam: float
    temperature: float
    normalize: bool
    domains: List[str] = field(default_factory=list)
    # How far to trust the weights (chameleon_ext.uncertainty), set by the pipeline on rank 0:
    # the BootstrapResult (None without per-window means or with 0 resamples) and Diagnostics.
    bootstrap: Optional[object] = field(default=None, repr=False, compare=False)
    diagnostics: Optional[object] = field(default=None, repr=False, compare=False)

    # Names of releases before 0.3 (the fields were called like the op).
    @property
    def krls(self) -> Tensor:
        warnings.warn("DomainWeights.krls is now DomainWeights.leverage", DeprecationWarning, stacklevel=2)
        return self.leverage

    @property
    def krls_raw(self) -> Tensor:
        warnings.warn("DomainWeights.krls_raw is now DomainWeights.leverage_raw", DeprecationWarning, stacklevel=2)
        return self.leverage_raw

    def as_dict(self) -> dict:
        """The method's part of a weights.json (format 2; see :mod:`chameleon_ext.exports`)."""
        names = self.domains or [str(i) for i in range(len(self.weights))]
        return {
            "mode": self.mode,
            "lambda": self.lam,
            "temperature": self.temperature,
            "normalize": self.normalize,
            "domains": list(names),
            "weights": {n: float(w) for n, w in zip(names, self.weights.tolist())},
            "leverage": {n: float(s) for n, s in zip(names, self.leverage.tolist())},
            "leverage_raw": {n: float(s) for n, s in zip(names, self.leverage_raw.tolist())},
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
    """Omega = X X^T in float64. ``embeddings``: ``[k, d]`` real floating point, finite."""
    if not isinstance(embeddings, Tensor):
        embeddings = torch.as_tensor(embeddings)
    if embeddings.dim() != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must be [k, d] with k, d >= 1, got shape {tuple(embeddings.shape)}")
    if embeddings.is_complex():
        # .to(float64) would drop the imaginary part with only a warning.
        raise ValueError(f"embeddings must be real, got the complex dtype {embeddings.dtype}")
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be a floating-point tensor, got {embeddings.dtype}")
    X = embeddings.to(torch.float64)
    bad = (~torch.isfinite(X)).any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"embeddings hold NaN or Inf in row(s) {bad} (domain index)")
    gram = X @ X.T
    if not torch.isfinite(gram).all():
        # Finite entries whose squares overflow float64 (|x| ~ 1e155 and beyond).
        raise ValueError(f"embeddings are too large: X X^T overflows float64 (largest |x| = {X.abs().max().item():.3g})")
    return gram


def centered_affinity(affinity: Tensor) -> Tensor:
    """Omega_c = H Omega H = Omega - row means - column means + grand mean."""
    A = affinity.to(torch.float64)
    return A - A.mean(0, keepdim=True) - A.mean(1, keepdim=True) + A.mean()


def weights_from_scores(scores: Tensor, mode: str = "pretrain", temperature: Optional[float] = None) -> Tensor:
    """Temperature softmax of (normalised) leverage scores ``[k]`` -> weights ``[k]``.

    pretrain: softmax(1 / ((S + 1e-12) T)), default T = 5 (shared structure up-weighted);
    finetune: softmax(S / T), default T = 0.2 (distinctive domains up-weighted).

    ``scores`` may also be a batch ``[..., k]`` (one score set per row, e.g. the bootstrap's
    resamples): the softmax runs over the last dim, and each row gets bit for bit the
    weights its own ``[k]`` call gives.
    """
    mode = _check_mode(mode)
    T = DEFAULT_TEMPERATURE[mode] if temperature is None else _check_positive("temperature", temperature)
    S = torch.as_tensor(scores).to(torch.float64)
    if S.dim() < 1 or S.shape[-1] < 1:
        raise ValueError(f"scores must be a non-empty vector [k] (or a batch [..., k]), got shape {tuple(S.shape)}")
    logits = 1.0 / ((S + _EPS) * T) if mode == "pretrain" else S / T
    return torch.softmax(logits, dim=-1)  # subtracts the max: stable for huge logits


def _check_domain_names(domains: Optional[Sequence[str]], k: int) -> List[str]:
    if domains is None:
        return []
    if isinstance(domains, (str, bytes)):
        # list("web") would silently invent the domains 'w', 'e', 'b'.
        raise ValueError(f"domains must be a list of names, got the string {domains!r}")
    names = list(domains)
    if len(names) != k:
        raise ValueError(f"domains must name the {k} rows of the affinity, got {len(names)} names")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"domains must be non-empty strings, got {name!r}")
    duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
    if duplicates:
        raise ValueError(f"domains must be unique, got {duplicates} more than once")
    return names


def weights_from_affinity(
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
    exactly as given, as the reference does with the paper's Figure 1 matrix
    (docs/method.md, "The reference implementation")."""
    mode = _check_mode(mode)
    lam = _check_positive("lam", lam)
    T = DEFAULT_TEMPERATURE[mode] if temperature is None else _check_positive("temperature", temperature)
    A = torch.as_tensor(affinity)
    if A.is_complex():
        raise ValueError(f"affinity must be real, got the complex dtype {A.dtype}")
    A = A.to(torch.float64)
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise ValueError(f"affinity must be a square [k, k] matrix, got shape {tuple(A.shape)}")
    if not torch.isfinite(A).all():
        raise ValueError("affinity holds NaN or Inf")
    k = A.shape[0]
    names = _check_domain_names(domains, k)
    from .ops import krls  # here, not at the top: the constants above need no compiled ops

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


def weights_from_embeddings(
    embeddings: Tensor,
    mode: str = "pretrain",
    lam: float = DEFAULT_LAMBDA,
    temperature: Optional[float] = None,
    normalize: bool = True,
    domains: Optional[Sequence[str]] = None,
) -> DomainWeights:
    """Chameleon weights from domain embeddings ``[k, d]`` with the linear kernel.

    Returns a :class:`DomainWeights`: ``.weights`` ``[k]`` (float64, sum 1), the leverage
    scores behind them (``.leverage``, ``.leverage_raw``) and the centred affinity.

    >>> w = weights_from_embeddings(torch.randn(7, 64), mode="pretrain").weights
    """
    return weights_from_affinity(linear_affinity(embeddings), mode=mode, lam=lam, temperature=temperature,
                                 normalize=normalize, domains=domains, center=True)


# --------------------------------------------------------------------------- deprecated names


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"chameleon_ext.{old} is deprecated; use chameleon_ext.{new}", DeprecationWarning, stacklevel=3)


def chameleon_weights(embeddings, mode="pretrain", lam=DEFAULT_LAMBDA, temperature=None, normalize=True,
                      domains=None) -> DomainWeights:
    """Deprecated name of :func:`weights_from_embeddings`."""
    _deprecated("chameleon_weights", "weights_from_embeddings")
    return weights_from_embeddings(embeddings, mode, lam, temperature, normalize, domains)


def domain_weights_from_affinity(affinity, mode="pretrain", lam=DEFAULT_LAMBDA, temperature=None, normalize=True,
                                 domains=None, center=True) -> DomainWeights:
    """Deprecated name of :func:`weights_from_affinity`."""
    _deprecated("domain_weights_from_affinity", "weights_from_affinity")
    return weights_from_affinity(affinity, mode, lam, temperature, normalize, domains, center)


def domain_weights(embeddings, mode="pretrain", lam=DEFAULT_LAMBDA, temperature=None, normalize=True) -> Tensor:
    """Deprecated: ``weights_from_embeddings(...).weights``."""
    _deprecated("domain_weights", "weights_from_embeddings(...).weights")
    return weights_from_embeddings(embeddings, mode, lam, temperature, normalize).weights
