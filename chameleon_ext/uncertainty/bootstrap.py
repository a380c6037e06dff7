"""Bootstrap intervals of the Chameleon weights over the sampled windows, from ONE batched
``krls`` call, and the memory bound checked before anything is allocated.

Bootstrap (per-window embeddings -> intervals)
    Each domain i has n_i window embeddings W_i ``[n_i, d]`` (the proxy's mean hidden state
    over one window; the domain embedding x_i is their mean). A resample draws n_i windows
    with replacement; it is a count vector c ``[n_i]`` (sum n_i), and the resampled domain
    embedding is c W_i / n_i. B resamples of every domain are one matrix product per domain,
    ``C_i [B, n_i] @ W_i [n_i, d]`` (float64 for float64 windows, else float32 on the windows
    minus their common mean, which centring removes anyway), giving B embedding sets
    ``[B, k, d]``, B affinities ``[B, k, k]`` and one batched ``krls`` call. The weight maths
    is the plain path's (:mod:`chameleon_ext.weights`): linear affinity, centring and
    mu = lam * k inside ``krls``, S / sum(S), the temperature softmax; a resample of float64
    windows gives bit for bit the weights ``weights_from_embeddings`` gives for its
    embeddings. Reported per domain: percentile interval
    and standard deviation of the weight and of the normalised leverage, and rank stability
    (the fraction of resamples in which the domain keeps the rank it has in the point
    estimate). The resample counts come from a
    ``torch.Generator`` seeded with ``seed`` on the windows' device: same seed, same device,
    same intervals.

How many windows are enough
    The same call also bootstraps random subsets of n/4 and n/2 windows per domain (drawn
    without replacement, then resampled with replacement), so the interval width at n/4, n/2
    and n comes from the same single ``krls`` call. The smallest of these whose mean weight
    interval width is within 10% of the width at n is reported (widths under 1e-6 count as
    equal); when it is n itself the intervals are still shrinking (about as 1/sqrt(n)) and
    more windows would narrow them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..errors import ChameleonUserError
from ..memory import available_memory, format_bytes
from ..mixture import AUTO_LAMBDA
from ..ops import krls
from ..weights import DEFAULT_RULE, DomainWeights, rule_settings, select_lambda, weights_from_embeddings
from .batched import (
    WindowsLike,
    check_int,
    check_level,
    check_names,
    scores_and_weights,
    softmax_rule,
    window_list,
    window_means,
)

__all__ = ["DEFAULT_RESAMPLES", "DEFAULT_LEVEL", "WINDOW_FRACTIONS", "WindowSufficiency", "BootstrapResult",
           "resample_counts", "bootstrap_bytes", "check_bootstrap_memory", "bootstrap_weights"]

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
WINDOW_FRACTIONS = (0.25, 0.5)  # subsets bootstrapped beside the full n (1.0 is always added)
WINDOWS_TOLERANCE = 0.10  # "enough windows": interval width within 10% of the width at n
WINDOWS_WIDTH_FLOOR = 1e-6  # widths below this are all "no spread" (float32 sums leave ~1e-9)


def _draw_counts(n: int, resamples: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """``[resamples, n]``: how often each of n windows is drawn in n draws with replacement."""
    idx = torch.randint(0, n, (resamples, n), generator=generator, device=generator.device)
    C = torch.zeros(resamples, n, dtype=dtype, device=generator.device)
    # ones expanded, not materialised: scatter_add reads one value per index anyway
    return C.scatter_add_(1, idx, torch.ones(1, 1, dtype=dtype, device=C.device).expand_as(idx))


def resample_counts(
    n_windows: Sequence[int], resamples: int, generator: torch.Generator, dtype: torch.dtype = torch.float64,
) -> List[Tensor]:
    """Per domain, the count matrix ``[resamples, n_i]`` of n_i windows drawn with
    replacement (row sums n_i; ``dtype``, exact in float32 too), on the generator's device.
    (:func:`bootstrap_weights` draws the same matrices one domain at a time.)"""
    return [_draw_counts(n, resamples, generator, dtype) for n in n_windows]


def _summands(windows: List[Tensor], means: Tensor) -> Tuple[List[Tensor], torch.dtype]:
    """What the resample products multiply, and in which dtype.

    float64 windows are used as they are, summed in float64: a resample's weights are then
    the plain path's to the last bit. float32 and half windows are summed in float32 (twice
    as fast) after subtracting their common mean: a shift shared by all domains leaves the
    centred affinity unchanged (H (X - 1 v^T) = H X), and float32's rounding then scales with
    the windows' spread rather than with the large common part of hidden states (about 1e-9
    of the weights, against 1e-7 without the shift)."""
    if all(w.dtype == torch.float64 for w in windows):
        return list(windows), torch.float64
    offset = means.mean(0).to(torch.float32)
    return [w.to(torch.float32) - offset for w in windows], torch.float32


def _resampled_embeddings(
    summands: List[Tensor], counts: Iterable[Tensor], out: Tensor, draws: Optional[Sequence[int]] = None
) -> Tensor:
    """Fills ``out [B, k, d]`` (float64): row b of domain i is counts_i[b] @ W_i / counts_i[b].sum().
    ``draws``: the row sums when known (random resamples draw exactly n_i or m_i windows).
    ``counts`` may be a lazy iterable, so only one domain's [B, n_i] matrix is alive at once."""
    for i, (W, C) in enumerate(zip(summands, counts)):
        if draws is not None:
            total = float(draws[i])
        else:
            total = C.sum(1, keepdim=True).to(torch.float64)  # [B, 1] explicit counts
        torch.div(C @ W, total, out=out[:, i])  # one pass: cast, divide, write the strided slice
    return out


def _draws(n: int, fraction: float) -> int:
    return max(1, min(n, int(round(fraction * n))))


def _percentiles(samples: Tensor, level: float) -> Tuple[Tensor, Tensor]:
    """Percentile interval over dim 0, linear interpolation (NumPy's default quantile)."""
    q = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=samples.dtype, device=samples.device)
    lo, hi = torch.quantile(samples, q, dim=0)
    return lo, hi


def _std(samples: Tensor) -> Tensor:
    # Bootstrap standard error: sample std over resamples; 0 for a single resample.
    return samples.std(0, correction=1) if samples.shape[0] > 1 else torch.zeros_like(samples[0])


def _ranks(weights: Tensor) -> Tensor:
    """1-based rank of each domain by weight, largest first, ties by domain order. [..., k]"""
    order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(1, weights.shape[-1] + 1, device=weights.device).expand_as(order))
    return ranks


@dataclass
class WindowSufficiency:
    """Mean weight-interval width when each domain's windows are subsampled to a fraction."""

    fractions: List[float]  # ascending, the last is 1.0
    windows: List[List[int]]  # [F][k] windows per domain at each fraction
    width: List[float]  # [F] mean over domains of the weight interval width
    width_per_domain: List[List[float]]  # [F][k]
    enough_fraction: float  # the smallest fraction whose width is within tolerance of the full one
    tolerance: float
    domains: List[str] = field(default_factory=list)

    @property
    def enough_windows(self) -> List[int]:
        return self.windows[self.fractions.index(self.enough_fraction)]

    def to_dict(self) -> dict:
        return {
            "fractions": list(self.fractions),
            "windows": [dict(zip(self.domains, m)) for m in self.windows],
            "weight_interval_width": list(self.width),
            "weight_interval_width_per_domain": [dict(zip(self.domains, w)) for w in self.width_per_domain],
            "tolerance": self.tolerance,
            "enough_fraction": self.enough_fraction,
            "enough_windows": dict(zip(self.domains, self.enough_windows)),
            "still_shrinking": self.enough_fraction == 1.0,
        }


@dataclass
class BootstrapResult:
    """Percentile intervals of the weights and normalised leverage over window resamples."""

    domains: List[str]
    point: DomainWeights  # the plain weights the intervals are about
    resamples: int
    seed: Optional[int]  # None when the counts were given
    level: float
    n_windows: List[int]
    weight_samples: Tensor  # [B, k]
    leverage_samples: Tensor  # [B, k] normalised leverage (raw if normalize=False)
    effective_dimension_samples: Tensor  # [B] sum of the raw leverage
    weights_low: Tensor  # [k]
    weights_high: Tensor
    weights_std: Tensor
    leverage_low: Tensor
    leverage_high: Tensor
    leverage_std: Tensor
    rank: Tensor  # [k] 1-based rank of each domain in the point estimate (largest weight = 1)
    rank_stability: Tensor  # [k] fraction of resamples in which the domain keeps that rank
    windows: Optional[WindowSufficiency] = None
    lambda_samples: Optional[Tensor] = None  # [B] the scale-free lambda of each resample (lam="auto")

    @property
    def weight_interval_width(self) -> Tensor:
        return self.weights_high - self.weights_low

    def _lambda_interval(self) -> Optional[dict]:
        """The chosen lambda's interval over the resamples (None for a fixed lambda)."""
        if self.lambda_samples is None:
            return None
        lo, hi = _percentiles(self.lambda_samples.unsqueeze(1), self.level)
        return {"point": float(self.point.lam), "low": float(lo), "high": float(hi)}

    def to_dict(self) -> dict:
        """The ``bootstrap`` entry of weights.json (the window analysis goes under
        ``diagnostics``, see :meth:`Diagnostics.to_dict`)."""

        def per_domain(t: Tensor) -> Dict[str, float]:
            return {n: float(v) for n, v in zip(self.domains, t.tolist())}

        eff_lo, eff_hi = _percentiles(self.effective_dimension_samples.unsqueeze(1), self.level)
        return {
            "resamples": self.resamples,
            "seed": self.seed,
            "level": self.level,
            "lambda": self.point.lam,
            "mode": self.point.mode,
            "temperature": self.point.temperature,
            "n_windows": dict(zip(self.domains, self.n_windows)),
            "weights": {
                "point": per_domain(self.point.weights),
                "low": per_domain(self.weights_low),
                "high": per_domain(self.weights_high),
                "std": per_domain(self.weights_std),
            },
            "leverage": {
                "point": per_domain(self.point.leverage),
                "low": per_domain(self.leverage_low),
                "high": per_domain(self.leverage_high),
                "std": per_domain(self.leverage_std),
            },
            "effective_dimension": {
                "point": float(self.point.leverage_raw.sum()), "low": float(eff_lo), "high": float(eff_hi),
            },
            "lambda_interval": self._lambda_interval(),
            "rank": {n: int(r) for n, r in zip(self.domains, self.rank.tolist())},
            "rank_stability": per_domain(self.rank_stability),
        }


def bootstrap_bytes(n_windows: Sequence[int], dim: int, resamples: int,
                    fractions: Sequence[float] = WINDOW_FRACTIONS, sum_bytes: int = 4) -> int:
    """About how many bytes :func:`bootstrap_weights` holds at its peak for ``resamples``
    resamples of domains with ``n_windows`` windows of ``dim`` values (``sum_bytes``: 4 for
    float32 windows, 8 for float64): everything it allocates grows with the resamples."""
    k, blocks, n_max = len(n_windows), 1 + len(fractions), max(n_windows)
    per_resample = (n_max * (8 + sum_bytes) + dim * sum_bytes  # one domain's draws and their product
                    + k * dim * 8  # the resampled embeddings
                    + blocks * k * k * 8 * 2  # the affinities, and krls' work on them
                    + blocks * k * 8 * 3 + k * 8 * 4)  # leverage, scores, weights; the percentiles' sorts
    return int(resamples) * per_resample


def check_bootstrap_memory(resamples: int, n_windows: Sequence[int], dim: int, device="cpu",
                           fractions: Sequence[float] = WINDOW_FRACTIONS, sum_bytes: int = 4,
                           available: Optional[int] = None) -> None:
    """Raise, before anything is allocated, when ``resamples`` bootstrap resamples cannot fit
    in the memory free on ``device``, saying how much they need and the largest number that
    fits."""
    if resamples <= 0 or not n_windows:
        return
    free = available_memory(device) if available is None else int(available)
    need = bootstrap_bytes(n_windows, dim, resamples, fractions, sum_bytes)
    if free is None or need <= free:
        return
    largest = free // bootstrap_bytes(n_windows, dim, 1, fractions, sum_bytes)
    raise ChameleonUserError(
        f"resamples (--bootstrap) {resamples:,}: needs about {format_bytes(need)} of memory ({len(n_windows)} domains, up to "
        f"{max(n_windows)} windows of {dim} values, {1 + len(fractions)} bootstrap blocks per resample) but "
        f"{format_bytes(free)} is free on {torch.device(device)}; the largest --bootstrap that fits is {largest:,}")


def bootstrap_weights(
    window_embeddings: WindowsLike,
    counts=None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
    mode: Optional[str] = None,
    lam: Optional[float] = None,
    temperature: Optional[float] = None,
    normalize: Optional[bool] = None,
    domains: Optional[Sequence[str]] = None,
    point: Optional[DomainWeights] = None,
    window_fractions: Sequence[float] = WINDOW_FRACTIONS,
    draw_counts: Optional[Sequence[Tensor]] = None,
    rule: Optional[str] = None,
    share: Optional[float] = None,
    smoothing: Optional[float] = None,
) -> BootstrapResult:
    """Bootstrap intervals of the Chameleon weights over each domain's windows.

    Args:
        window_embeddings: per-window embeddings, a list of k tensors ``[n_i, d]`` or a
            padded ``[k, n_max, d]`` with ``counts`` ``[k]``. float64 windows are summed in
            float64, others in float32 (see ``_resampled_embeddings``).
        resamples: B >= 1. seed: the generator's seed. level: interval coverage (0.95).
        mode, lam, temperature, normalize, domains, rule, share, smoothing: as in
            :mod:`chameleon_ext.weights`' plain path (defaults: pretrain, the default rule
            with its defaults, True); or give ``point`` instead, the plain result whose
            settings (and domain names) the bootstrap then uses and whose weights it reports
            as the point estimate. Without ``point`` the point estimate is computed from the
            windows' mean.
        window_fractions: subsample fractions for the "how many windows" analysis, run in the
            same ``krls`` call (``()`` skips it).
        draw_counts: explicit per-domain count matrices ``[B, n_i]`` instead of random
            resamples (e.g. all ones: the identity resample); ``seed`` is then unused.

    Returns:
        :class:`BootstrapResult`.
    """
    windows = window_list(window_embeddings, counts)
    k = len(windows)
    n = [int(w.shape[0]) for w in windows]
    level = check_level(level)
    resamples = check_int("resamples", resamples, 1)
    prior = "uniform"
    if point is not None:
        given = {"mode": mode, "lam": lam, "temperature": temperature, "normalize": normalize, "domains": domains,
                 "rule": rule, "share": share, "smoothing": smoothing}
        clash = [name for name, v in given.items() if v is not None]
        if clash:
            raise ChameleonUserError(f"give either point or {', '.join(clash)}: point already fixes them")
        if len(point.weights) != k:
            raise ChameleonUserError(f"point has {len(point.weights)} domains, window_embeddings has {k}")
        given = point.settings
        mode, normalize = point.mode, point.normalize
        prior = point.prior if point.prior is not None else "uniform"
        names = check_names(point.domains or None, k, "domains")
    else:
        mode = mode or "pretrain"
        given = {"lam": lam, "temperature": temperature, "share": share, "smoothing": smoothing, "ratio": None}
        normalize = True if normalize is None else bool(normalize)
        names = check_names(domains, k, "domains of window_embeddings")
        rule = DEFAULT_RULE if rule is None else rule
    settings = rule_settings(given.get("rule", rule), softmax_rule(mode), given["lam"], given["temperature"],
                             given["share"], given["smoothing"], given["ratio"])
    auto = settings["lam"] == AUTO_LAMBDA
    fractions = sorted({float(f) for f in window_fractions})
    if any(not 0.0 < f < 1.0 for f in fractions):
        raise ChameleonUserError(f"window_fractions must lie in (0, 1), got {list(window_fractions)}")

    device = windows[0].device
    check_bootstrap_memory(resamples, n, int(windows[0].shape[1]), device, fractions,
                           8 if all(w.dtype == torch.float64 for w in windows) else 4)
    mean_embeddings = window_means(windows)  # [k, d]
    summands, acc = _summands(windows, mean_embeddings)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    if draw_counts is not None:
        full_counts = [torch.as_tensor(c, dtype=acc, device=device) for c in draw_counts]
        if len(full_counts) != k or any(c.shape != (resamples, n[i]) for i, c in enumerate(full_counts)):
            raise ChameleonUserError(
                f"draw_counts must be k = {k} matrices [resamples, n_i] = "
                f"{[(resamples, m) for m in n]}, got {[tuple(c.shape) for c in full_counts]}"
            )
        if any(bool((c < 0).any()) or bool((c.sum(1) <= 0).any()) for c in full_counts):
            raise ChameleonUserError("draw_counts must be >= 0 with at least one window per resample")
        seed_used, full_draws = None, None
    else:
        full_counts = (_draw_counts(ni, resamples, generator, acc) for ni in n)  # drawn as used
        seed_used, full_draws = int(seed), n

    # The full bootstrap first, then one block per subsample fraction, each B affinities of
    # one [B, k, d] embedding buffer; then one krls call for all of them.
    X = torch.empty(resamples, k, mean_embeddings.shape[1], dtype=torch.float64, device=device)
    affinity = torch.empty((1 + len(fractions)) * resamples, k, k, dtype=torch.float64, device=device)
    _resampled_embeddings(summands, full_counts, X, full_draws)
    torch.matmul(X, X.mT, out=affinity[:resamples])  # the same product as weights.linear_affinity
    del full_counts
    sub_windows = []
    for j, f in enumerate(fractions, start=1):
        m = [_draws(ni, f) for ni in n]
        subsets = [torch.randperm(ni, generator=generator, device=device)[:mi] for ni, mi in zip(n, m)]
        # The subset's windows only: the product then costs m_i, not n_i, per resample.
        sub = [w[s] for w, s in zip(summands, subsets)]
        _resampled_embeddings(sub, (_draw_counts(mi, resamples, generator, acc) for mi in m), X, m)
        torch.matmul(X, X.mT, out=affinity[j * resamples : (j + 1) * resamples])
        sub_windows.append(m)
    del X
    # The scale-free lambda is chosen again on every resample (its interval is reported).
    lam_all = select_lambda(affinity, settings["share"])[0] if auto else settings["lam"]
    raw_all = krls(affinity, lam_all, center=True, scale_by_k=True)  # [(1 + F) * B, k]
    S_all, w_all = scores_and_weights(raw_all, settings, normalize, prior)

    if point is None:
        point = weights_from_embeddings(mean_embeddings.cpu(), settings["mode"], settings["lam"],
                                        given["temperature"], normalize, names, rule=settings["rule"],
                                        share=settings["share"], smoothing=settings["smoothing"])
        point.mode = mode
    raw, S, w = raw_all[:resamples].cpu(), S_all[:resamples].cpu(), w_all[:resamples].cpu()
    lambda_samples = lam_all[:resamples].cpu() if auto else None
    w_lo, w_hi = _percentiles(w, level)
    s_lo, s_hi = _percentiles(S, level)
    rank = _ranks(point.weights.to(torch.float64))
    stability = (_ranks(w) == rank).to(torch.float64).mean(0)

    sufficiency = None
    if fractions:
        widths = []
        for j in range(len(fractions)):
            block = w_all[(j + 1) * resamples : (j + 2) * resamples].cpu()
            lo, hi = _percentiles(block, level)
            widths.append(hi - lo)
        widths.append(w_hi - w_lo)
        width = [float(x.mean()) for x in widths]
        all_fractions = fractions + [1.0]
        bound = max((1.0 + WINDOWS_TOLERANCE) * width[-1], WINDOWS_WIDTH_FLOOR)
        enough = next(f for f, wd in zip(all_fractions, width) if wd <= bound)
        sufficiency = WindowSufficiency(
            all_fractions, sub_windows + [n], width, [x.tolist() for x in widths], enough, WINDOWS_TOLERANCE, names,
        )
    return BootstrapResult(
        names, point, resamples, seed_used, level, n, w, S, raw.sum(-1),
        w_lo, w_hi, _std(w), s_lo, s_hi, _std(S), rank, stability, sufficiency, lambda_samples,
    )
