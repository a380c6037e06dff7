"""How far a weights result trusts itself: the effective dimension sum(S) and its share of
k - 1 (the rank of a centred k x k kernel), and warnings ``{code, message, domains}`` (collapsed
mixture, near-duplicate domains, dominant norm, unstable ranking, lambda too large or too small),
each with advice; the thresholds are the module constants below. :func:`collapse_lines` says the
same about a collapse wherever a mixture is shown (``chameleon weights``, ``compare``)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ChameleonUserError
from ..mixture import COLLAPSE_THRESHOLD
from ..weights import DEFAULT_RULE, DEFAULT_SHARE, RULE_DEFAULTS, DomainWeights, weights_from_affinity
from .batched import softmax_rule, windows_label
from .bootstrap import BootstrapResult, WindowSufficiency

__all__ = ["COLLAPSED_WEIGHT", "Diagnostics", "diagnose", "collapse_fix", "collapse_lines", "suggest_lambda"]

# Warning thresholds (diagnose)
COLLAPSED_WEIGHT = COLLAPSE_THRESHOLD  # one domain above this weight: the mixture has collapsed
ONE_HOT_EFFECTIVE_DOMAINS = 1.5  # exp(entropy of the weights) below this: near one-hot
NEAR_DUPLICATE_COSINE = 0.99  # cosine of two centred domain embeddings above this
DOMINANT_NORM_RATIO = 3.0  # a domain's embedding norm this many times the others' median
UNSTABLE_RANK_STABILITY = 0.8  # a domain keeping its rank in fewer resamples than this
LAMBDA_SHARE_LOW = 0.05  # effective dimension below 5% of k - 1: lambda too large
LAMBDA_SHARE_HIGH = 0.95  # above 95% of k - 1: lambda too small
SUGGESTED_SHARE = 0.5  # suggest the lambda that puts the effective dimension at half of k - 1


@dataclass
class Diagnostics:
    """What a weights file should say about how far to trust itself."""

    effective_dimension: float  # sum of the raw leverage scores
    effective_dimension_share: Optional[float]  # of k - 1 (None for k = 1)
    warnings: List[dict]  # {code, message, domains}
    suggested_lambda: Optional[float] = None  # set when lambda looks too large or too small
    windows: Optional[WindowSufficiency] = None

    @property
    def codes(self) -> List[str]:
        return [w["code"] for w in self.warnings]

    def to_dict(self) -> dict:
        """The ``diagnostics`` entry of weights.json."""
        return {
            "effective_dimension": self.effective_dimension,
            "effective_dimension_share": self.effective_dimension_share,
            "suggested_lambda": self.suggested_lambda,
            "warnings": [dict(w) for w in self.warnings],
            "windows": self.windows.to_dict() if self.windows is not None else None,
        }


def _warning(code: str, message: str, domains: Sequence[str]) -> dict:
    return {"code": code, "message": message, "domains": list(domains)}


def suggest_lambda(affinity: Tensor, share: float = SUGGESTED_SHARE, center: bool = True) -> Optional[float]:
    """The lambda (mu = lam * k) at which the effective dimension sum(S) is ``share`` of the
    centred kernel's rank, from its eigenvalues: sum_j s_j / (s_j + mu) is decreasing in mu,
    so bisection in log mu. Rounded to two significant digits. None for a zero kernel."""
    A = torch.as_tensor(affinity).to(torch.float64)
    if center:
        A = A - A.mean(0, keepdim=True) - A.mean(1, keepdim=True) + A.mean()
    k = A.shape[0]
    s = torch.linalg.eigvalsh(0.5 * (A + A.T)).clamp_min(0.0)
    top = float(s.max()) if k else 0.0
    s = s[s > top * k * 1e-12] if top > 0 else s[:0]
    if s.numel() == 0:
        return None
    target = share * s.numel()
    lo, hi = math.log(float(s.min())) - 30.0, math.log(float(s.max())) + 30.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float((s / (s + math.exp(mid))).sum()) > target:
            lo = mid
        else:
            hi = mid
    lam = math.exp(0.5 * (lo + hi)) / k
    return float(f"{lam:.2g}")


def collapse_fix(point: DomainWeights) -> str:
    """Advice for a collapsed result that is tried here on the same scores: the weights the
    default rule (or, when that is already in use, a larger smoothing) gives on ``point``'s
    centred affinity, and the command-line options that give them."""
    k = len(point.weights)
    direction = softmax_rule(point.mode)
    own = RULE_DEFAULTS[point.rule]
    # The options that made this result differ from the default: the rule, and whatever was
    # set beyond that rule's own defaults.
    dropped = [f"--rule {point.rule}"] if point.rule != DEFAULT_RULE else []
    if point.smoothing != own["smoothing"]:
        dropped.append(f"--smoothing {point.smoothing:g}")
    if point.rule != "calibrated" and point.temperature != own["temperature"][direction]:
        dropped.append(f"--temperature {point.temperature:g}")
    if point.lambda_method != "auto" and point.lam != own["lam"]:
        dropped.append(f"--lam {point.lam:g}")
    if point.lambda_method == "auto" and point.share != DEFAULT_SHARE:
        dropped.append(f"--share {point.share:g}")
    if not point.normalize:
        dropped.append("--no-normalize")
    if dropped:
        kwargs, options = {}, f"the default rule and settings (drop {', '.join(dropped)})"
    else:
        c = min(0.5, max(2 * point.smoothing, 0.2))
        kwargs, options = {"smoothing": c}, f"--smoothing {c:g}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = weights_from_affinity(point.affinity, direction, center=False, rule=DEFAULT_RULE, **kwargs)
    c = fixed.smoothing
    cap = 1.0 - c * (1.0 - 1.0 / k)
    return (f"{options} gives at most {float(fixed.weights.max()):.3f} on these scores (rule {fixed.rule}, "
            f"lambda {fixed.lam:.3g} from the effective-dimension share {fixed.share:g}, smoothing {c:g}: no domain "
            f"can exceed {cap:.3f})")


def collapse_lines(weights: Dict[str, float], tokens: Optional[int] = None, fix: Optional[str] = None,
                   what: str = "mixture") -> List[str]:
    """Terminal lines for a collapsed mixture (one weight above :data:`COLLAPSED_WEIGHT`), or
    ``[]``: the domain and its share, each domain's tokens over a run of ``tokens`` tokens, and
    ``fix`` (advice that was tried, e.g. :func:`collapse_fix`)."""
    if len(weights) < 2:
        return []
    top = max(weights, key=weights.get)
    if weights[top] <= COLLAPSED_WEIGHT:
        return []
    lines = [f"WARNING: collapsed {what}: {top!r} takes {weights[top]:.4f} of the data (> {COLLAPSED_WEIGHT}); "
             "the other domains are barely trained on"]
    if tokens:
        per = ", ".join(f"{d} {int(round(w * tokens)):,}" for d, w in weights.items())
        lines.append(f"  tokens per domain over this run's {tokens:,} tokens: {per}")
    if fix:
        lines.append(f"  fix: {fix}")
    return lines


def diagnose(
    point: DomainWeights,
    embeddings: Optional[Tensor] = None,
    bootstrap: Optional[BootstrapResult] = None,
) -> Diagnostics:
    """Effective dimension and warnings for a weights result.

    Args:
        point: the plain weights (``weights_from_embeddings``).
        embeddings: the domain embeddings ``[k, d]`` behind it, for the near-duplicate and
            dominant-norm checks (skipped without them).
        bootstrap: its :class:`BootstrapResult`, for the ranking check and the window analysis.
    """
    k = len(point.weights)
    names = point.domains or [str(i) for i in range(k)]
    raw = point.leverage_raw.to(torch.float64)
    eff = float(raw.sum())
    share = eff / (k - 1) if k > 1 else None
    warns: List[dict] = []
    suggested = None
    w = point.weights.to(torch.float64)

    # Collapsed mixture: one domain takes almost everything, or the softmax is near one-hot.
    top = int(torch.argmax(w))
    entropy = float(-(w * torch.log(w.clamp_min(1e-300))).sum())
    effective_domains = math.exp(entropy)
    if k > 1 and float(w[top]) > COLLAPSED_WEIGHT:
        warns.append(_warning(
            "collapsed_mixture",
            f"domain {names[top]!r} has weight {float(w[top]):.3f} (> {COLLAPSED_WEIGHT}): the mixture has collapsed "
            f"onto it; {collapse_fix(point)}",
            [names[top]],
        ))
    elif k > 1 and effective_domains < ONE_HOT_EFFECTIVE_DOMAINS:
        warns.append(_warning(
            "collapsed_mixture",
            f"the weights are near one-hot (effective number of domains {effective_domains:.2f} of {k}); "
            f"{collapse_fix(point)}",
            [names[top]],
        ))

    if embeddings is not None:
        X = torch.as_tensor(embeddings).to(torch.float64)
        if X.dim() != 2 or X.shape[0] != k:
            raise ChameleonUserError(f"embeddings must be [k, d] with k = {k}, got shape {tuple(X.shape)}")
        # Near-duplicates: centred embeddings pointing the same way, relative to the spread.
        if k > 2:
            C = X - X.mean(0, keepdim=True)
            norms = C.norm(dim=1)
            ok = norms > norms.max() * 1e-12
            U = C / norms.clamp_min(1e-300).unsqueeze(1)
            cos = U @ U.T
            for i in range(k):
                for j in range(i + 1, k):
                    if ok[i] and ok[j] and float(cos[i, j]) > NEAR_DUPLICATE_COSINE:
                        warns.append(_warning(
                            "near_duplicate_domains",
                            f"domains {names[i]!r} and {names[j]!r} are near duplicates (cosine of centred "
                            f"embeddings {float(cos[i, j]):.4f} > {NEAR_DUPLICATE_COSINE}): they share their "
                            "leverage, so both look less distinctive; consider merging them",
                            [names[i], names[j]],
                        ))
        # One domain's norm dominating the linear kernel X X^T.
        if k > 1:
            norms = X.norm(dim=1)
            for i in range(k):
                others = torch.cat([norms[:i], norms[i + 1:]])
                ref = float(others.median())
                if ref > 0 and float(norms[i]) > DOMINANT_NORM_RATIO * ref:
                    warns.append(_warning(
                        "dominant_norm",
                        f"domain {names[i]!r} has embedding norm {float(norms[i]):.3g}, {float(norms[i]) / ref:.1f}x "
                        f"the others' median (> {DOMINANT_NORM_RATIO}x): it dominates the affinity; check its data "
                        "(very short or repetitive documents, special tokens)",
                        [names[i]],
                    ))

    if bootstrap is not None and len(bootstrap.domains) != k:
        raise ChameleonUserError(f"bootstrap has {len(bootstrap.domains)} domains, point has {k}")
    if bootstrap is not None:
        stability = bootstrap.rank_stability.tolist()
        unstable = [n for n, s in zip(bootstrap.domains, stability) if s < UNSTABLE_RANK_STABILITY]
        if unstable:
            worst = float(bootstrap.rank_stability.min())
            hint = ""
            if bootstrap.windows is not None and bootstrap.windows.enough_fraction == 1.0:
                hint = " (the intervals are still shrinking with n)"
            warns.append(_warning(
                "unstable_ranking",
                f"the {100 * bootstrap.level:g}% intervals overlap so much that domain(s) {unstable} keep their "
                f"rank in as few as {100 * worst:.0f}% of resamples (< {100 * UNSTABLE_RANK_STABILITY:.0f}%); "
                f"embed more windows per domain (now {windows_label(bootstrap.n_windows)}){hint}",
                unstable,
            ))

    if share is not None and not (LAMBDA_SHARE_LOW <= share <= LAMBDA_SHARE_HIGH):
        suggested = suggest_lambda(point.affinity, center=False)  # DomainWeights.affinity is centred
        # None: a zero kernel (all domains at one point); no lambda helps, the weights are uniform.
        if suggested is not None:
            too_large = share < LAMBDA_SHARE_LOW
            where = "0" if too_large else "their maximum 1 - 1/k"
            warns.append(_warning(
                "lambda_too_large" if too_large else "lambda_too_small",
                f"lambda = {point.lam:g} is so {'large' if too_large else 'small'} that all leverage scores sit near "
                f"{where} (effective dimension {eff:.3g}, {100 * share:.1f}% of k - 1 = {k - 1}); --lam auto "
                f"chooses lambda from the spectrum (lambda ~ {suggested:g} puts the effective dimension at half of "
                "k - 1); `chameleon sweep` shows the weights across lambdas",
                list(names),
            ))
    return Diagnostics(eff, share, warns, suggested, bootstrap.windows if bootstrap is not None else None)
