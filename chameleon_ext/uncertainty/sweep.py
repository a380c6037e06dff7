"""Weights for every (lambda, temperature) pair. All lambdas go through one ``krls`` call with
``lam`` as a tensor (one lambda per matrix); temperatures only change the softmax and need no
``krls`` call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import mixture
from ..errors import ChameleonUserError
from ..ops import krls
from ..weights import DEFAULT_RULE, linear_affinity, rule_settings
from .batched import check_names, scores_and_weights, softmax_rule

__all__ = ["DEFAULT_SWEEP_LAMBDAS", "SweepResult", "sweep_weights", "sweep_weights_from_affinity"]

DEFAULT_SWEEP_LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0)  # `chameleon sweep`'s default --lam


def _leverage_per_lambda(affinity: Tensor, lambdas: List[float], center: bool) -> Tensor:
    """Raw leverage ``[L, k]`` of one affinity ``[k, k]`` at each lambda: ONE ``krls`` call on
    the affinity repeated L times, with ``lam`` as a tensor (one lambda per matrix)."""
    L, k = len(lambdas), affinity.shape[-1]
    K = affinity.expand(L, k, k).contiguous()
    lam = torch.tensor(lambdas, dtype=affinity.dtype, device=affinity.device)
    return krls(K, lam=lam, center=center, scale_by_k=True)


@dataclass
class SweepResult:
    """Weights at every (lambda, temperature) pair, and the effective dimension per lambda."""

    domains: List[str]
    mode: str
    normalize: bool
    lambdas: List[float]  # [L]
    temperatures: List[float]  # [T]
    leverage_raw: Tensor  # [L, k] the krls scores S
    leverage: Tensor  # [L, k] normalised, S / sum(S) (== leverage_raw if normalize=False)
    weights: Tensor  # [L, T, k]
    effective_dimension: Tensor  # [L] sum of leverage_raw
    rule: str = "paper"
    smoothing: float = 0.0

    @property
    def effective_dimension_share(self) -> Optional[Tensor]:
        k = len(self.domains)
        return self.effective_dimension / (k - 1) if k > 1 else None

    def weights_at(self, lam: float, temperature: float) -> Tensor:
        """``[k]`` weights at a swept (lambda, temperature) pair."""
        try:
            i, j = self.lambdas.index(float(lam)), self.temperatures.index(float(temperature))
        except ValueError:
            raise ChameleonUserError(
                f"(lam={lam}, temperature={temperature}) was not swept; lambdas {self.lambdas}, "
                f"temperatures {self.temperatures}"
            ) from None
        return self.weights[i, j]

    def to_dict(self) -> dict:
        """The content of sweep.json."""
        share = self.effective_dimension_share
        results = []
        for i, lam in enumerate(self.lambdas):
            for j, T in enumerate(self.temperatures):
                results.append({
                    "lambda": lam,
                    "temperature": T,
                    "weights": dict(zip(self.domains, self.weights[i, j].tolist())),
                })
        return {
            "mode": self.mode,
            "rule": self.rule,
            "smoothing": self.smoothing,
            "normalize": self.normalize,
            "domains": list(self.domains),
            "lambdas": list(self.lambdas),
            "temperatures": list(self.temperatures),
            "effective_dimension": self.effective_dimension.tolist(),
            "effective_dimension_share": share.tolist() if share is not None else None,
            "leverage": [dict(zip(self.domains, s)) for s in self.leverage.tolist()],
            "leverage_raw": [dict(zip(self.domains, s)) for s in self.leverage_raw.tolist()],
            "results": results,
        }


def _check_values(name: str, values) -> List[float]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    try:
        out = [mixture.check_positive(name, v) for v in values]
    except (TypeError, ValueError) as e:
        raise ChameleonUserError(f"{name} must be a non-empty list of finite numbers > 0 ({e})") from None
    if not out:
        raise ChameleonUserError(f"{name} must be a non-empty list of finite numbers > 0, got an empty list")
    return out


def sweep_weights_from_affinity(
    affinity: Tensor,
    lambdas: Sequence[float],
    temperatures: Optional[Sequence[float]] = None,
    mode: str = "pretrain",
    normalize: bool = True,
    domains: Optional[Sequence[str]] = None,
    center: bool = True,
    rule: str = DEFAULT_RULE,
    smoothing: Optional[float] = None,
) -> SweepResult:
    """Weights for every (lambda, temperature) from an affinity ``[k, k]`` (as in
    :func:`~chameleon_ext.weights.weights_from_affinity`, with ``rule`` and ``smoothing``);
    default temperatures: the rule's for the mode. Each entry equals ``weights_from_affinity``
    at that pair."""
    direction = softmax_rule(mode)
    lams = _check_values("lambdas", lambdas)
    base = rule_settings(rule, direction, smoothing=smoothing)
    temps = _check_values("temperatures", [base["temperature"]] if temperatures is None else temperatures)
    A = torch.as_tensor(affinity).to(torch.float64)
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise ChameleonUserError(f"affinity must be a square [k, k] matrix, got shape {tuple(A.shape)}")
    k = A.shape[0]
    names = check_names(domains, k, "rows of the affinity")
    raw = _leverage_per_lambda(A, lams, center)  # [L, k]
    raw = raw.to(torch.float64)
    L, nT = len(lams), len(temps)
    weights = torch.empty(L, nT, k, dtype=torch.float64, device=raw.device)
    for j, T in enumerate(temps):  # temperatures only change the softmax: no krls call
        S, weights[:, j] = scores_and_weights(raw, {**base, "temperature": T}, normalize)
    return SweepResult(names, mode, bool(normalize), lams, temps, raw, S, weights, raw.sum(-1), base["rule"],
                       base["smoothing"])


def sweep_weights(
    embeddings: Tensor,
    lambdas: Sequence[float],
    temperatures: Optional[Sequence[float]] = None,
    mode: str = "pretrain",
    normalize: bool = True,
    domains: Optional[Sequence[str]] = None,
    rule: str = DEFAULT_RULE,
    smoothing: Optional[float] = None,
) -> SweepResult:
    """Weights for every (lambda, temperature) from domain embeddings ``[k, d]``; each entry
    equals the plain path's weights (``weights_from_embeddings``) at that pair.

    >>> sweep = sweep_weights(torch.randn(7, 64), [0.1, 1, 10, 100], [1.0, 5.0])
    >>> sweep.weights.shape  # [lambdas, temperatures, k]
    torch.Size([4, 2, 7])
    """
    try:
        A = linear_affinity(embeddings)
    except ValueError as e:
        raise ChameleonUserError(str(e)) from None
    return sweep_weights_from_affinity(A, lambdas, temperatures, mode, normalize, domains, center=True, rule=rule,
                                       smoothing=smoothing)
