"""How far to trust a set of Chameleon weights: bootstrap intervals over the sampled windows,
lambda/temperature sweeps and diagnostics, each from ONE batched ``krls`` call.

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

Sweeps
    Weights for every (lambda, temperature) pair. All lambdas go through one ``krls`` call
    with ``lam`` as a tensor (one lambda per matrix); temperatures only change the softmax
    and need no ``krls`` call.

Diagnostics
    Effective dimension sum(S) and its share of k - 1 (the rank of a centred k x k kernel),
    and warnings ``{code, message, domains}`` with the thresholds below as module constants.

Per-window embedding cache (for :mod:`chameleon_ext.embed`)
    Beside each domain-sum entry ``{key}.pt`` of the embedding cache, a second file
    ``{key}.windows.pt`` (see :func:`window_cache_path`) with the SAME cache key holds the
    domain's per-window means, written and read with :func:`pack_window_embeddings` /
    :func:`unpack_window_embeddings`::

        {"format": "chameleon_ext.window_embeddings/1", "key": key, "domain": name,
         "windows": Tensor [n, d] float32 (or bfloat16), "count": n, "sha256": digest}

    Rows are in window order (the order of ``embed.window_starts``); in reference pooling
    they are the de-duplicated rows that were averaged, so their mean is the domain
    embedding. float32 is the default: 6.3 MB per domain at n = 2048, d = 768, and the
    windows' mean then equals the domain embedding to float32 rounding. bfloat16 halves that
    but rounds each value to 3 significant digits; the bootstrap spread is then still right,
    but the point estimate should come from the domain sums (pass ``point=``).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .errors import ChameleonUserError
from .ops import krls
from . import mixture
from .mixture import AUTO_LAMBDA, COLLAPSE_THRESHOLD
from .weights import (
    DEFAULT_RULE,
    DEFAULT_SHARE,
    RULE_DEFAULTS,
    DomainWeights,
    linear_affinity,
    rule_settings,
    select_lambda,
    weights_from_embeddings,
    weights_from_scores,
)


__all__ = [
    "DEFAULT_RESAMPLES",
    "DEFAULT_SWEEP_LAMBDAS",
    "DEFAULT_LEVEL",
    "WINDOW_FRACTIONS",
    "BootstrapResult",
    "WindowSufficiency",
    "SweepResult",
    "Diagnostics",
    "resample_counts",
    "bootstrap_bytes",
    "check_bootstrap_memory",
    "bootstrap_weights",
    "sweep_weights",
    "sweep_weights_from_affinity",
    "diagnose",
    "collapse_fix",
    "collapse_lines",
    "suggest_lambda",
    "format_bootstrap_table",
    "format_sweep_table",
    "format_diagnostics",
    "window_cache_path",
    "pack_window_embeddings",
    "unpack_window_embeddings",
]

DEFAULT_RESAMPLES = 1000
DEFAULT_SWEEP_LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0)  # `chameleon sweep`'s default --lam
DEFAULT_LEVEL = 0.95
WINDOW_FRACTIONS = (0.25, 0.5)  # subsets bootstrapped beside the full n (1.0 is always added)
WINDOWS_TOLERANCE = 0.10  # "enough windows": interval width within 10% of the width at n
WINDOWS_WIDTH_FLOOR = 1e-6  # widths below this are all "no spread" (float32 sums leave ~1e-9)

# Warning thresholds (diagnose)
COLLAPSED_WEIGHT = COLLAPSE_THRESHOLD  # one domain above this weight: the mixture has collapsed
ONE_HOT_EFFECTIVE_DOMAINS = 1.5  # exp(entropy of the weights) below this: near one-hot
NEAR_DUPLICATE_COSINE = 0.99  # cosine of two centred domain embeddings above this
DOMINANT_NORM_RATIO = 3.0  # a domain's embedding norm this many times the others' median
UNSTABLE_RANK_STABILITY = 0.8  # a domain keeping its rank in fewer resamples than this
LAMBDA_SHARE_LOW = 0.05  # effective dimension below 5% of k - 1: lambda too large
LAMBDA_SHARE_HIGH = 0.95  # above 95% of k - 1: lambda too small
SUGGESTED_SHARE = 0.5  # suggest the lambda that puts the effective dimension at half of k - 1

WINDOW_CACHE_FORMAT = "chameleon_ext.window_embeddings/1"
WINDOW_CACHE_DTYPES = (torch.float32, torch.bfloat16)


WindowsLike = Union[Sequence[Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _window_list(window_embeddings: WindowsLike, counts=None) -> List[Tensor]:
    """k tensors ``[n_i, d]`` from a list of them or a padded ``[k, n_max, d]`` plus counts."""
    if isinstance(window_embeddings, Tensor):
        if window_embeddings.dim() != 3:
            raise ChameleonUserError(
                "window_embeddings must be a list of k tensors [n_i, d] or a padded tensor [k, n_max, d], "
                f"got shape {tuple(window_embeddings.shape)}"
            )
        k, n_max = window_embeddings.shape[:2]
        if counts is None:
            n = [n_max] * k
        else:
            n = [int(c) for c in torch.as_tensor(counts).flatten().tolist()]
            if len(n) != k or any(c < 1 or c > n_max for c in n):
                raise ChameleonUserError(
                    f"counts must give k = {k} window counts, each in [1, {n_max}], got {n}"
                )
        windows = [window_embeddings[i, : n[i]] for i in range(k)]
    else:
        if counts is not None:
            raise ChameleonUserError("counts is only for a padded [k, n_max, d] tensor; a list gives each n_i itself")
        if isinstance(window_embeddings, (str, bytes)) or not isinstance(window_embeddings, Sequence):
            raise ChameleonUserError(
                f"window_embeddings must be a list of k tensors [n_i, d], got {type(window_embeddings).__name__}"
            )
        windows = list(window_embeddings)
    if not windows:
        raise ChameleonUserError("window_embeddings is empty: expected one [n_i, d] tensor per domain")
    d = None
    for i, w in enumerate(windows):
        if not isinstance(w, Tensor) or w.dim() != 2:
            shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ChameleonUserError(f"window_embeddings[{i}] must be a tensor [n_i, d], got {shape}")
        if not w.is_floating_point():
            raise ChameleonUserError(f"window_embeddings[{i}] must be floating point, got {w.dtype}")
        if w.shape[0] < 1 or w.shape[1] < 1:
            raise ChameleonUserError(
                f"window_embeddings[{i}] must hold at least one window of d >= 1, got {tuple(w.shape)}"
            )
        if d is None:
            d = w.shape[1]
        elif w.shape[1] != d:
            raise ChameleonUserError(f"window_embeddings[{i}] has d = {w.shape[1]}, but domain 0 has d = {d}")
        if w.device != windows[0].device:
            raise ChameleonUserError(f"window_embeddings[{i}] is on {w.device}, domain 0 on {windows[0].device}")
    return windows


def _window_means(windows: List[Tensor]) -> Tensor:
    """``[k, d]`` float64 means of each domain's windows; a NaN/Inf window makes its domain's
    mean non-finite, so checking the k means checks every window at no extra pass."""
    means = torch.stack([torch.mean(w, 0, dtype=torch.float64) for w in windows])
    bad = (~torch.isfinite(means)).any(1).nonzero().flatten().tolist()
    if bad:
        raise ChameleonUserError(f"window_embeddings of domain(s) {bad} (index) hold NaN or Inf")
    return means


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ChameleonUserError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ChameleonUserError(f"level must be a number in (0, 1), e.g. 0.95, got {level!r}")
    return float(level)


def _check_names(domains: Optional[Sequence[str]], k: int, what: str) -> List[str]:
    if domains is None:
        return [str(i) for i in range(k)]
    return mixture.check_domain_names(domains, k, what)


# --------------------------------------------------------------------------------------------
# The batched weight maths
# --------------------------------------------------------------------------------------------


def _softmax_rule(mode: str) -> str:
    """The temperature rule of a mode; 'transfer' (new or changed domains embedded with the
    frozen proxy, docs/method.md step 5) uses the pretraining rule, as the pipeline does."""
    return mixture.rule_of_mode(mode)


def _scores_and_weights(raw: Tensor, settings: dict, normalize: bool, prior="uniform") -> Tuple[Tensor, Tensor]:
    """Normalised scores and weights ``[N, k]`` from raw leverage ``[N, k]`` by the rule in
    ``settings`` (:func:`~chameleon_ext.weights.rule_settings`), with the plain path's special
    cases: one domain -> weight 1; zero total leverage -> uniform."""
    k = raw.shape[-1]
    total = raw.sum(-1, keepdim=True)
    degenerate = total <= 0.0
    uniform = torch.full_like(raw, 1.0 / k)
    if k == 1:
        return (torch.ones_like(raw) if normalize else raw), torch.ones_like(raw)
    if normalize:
        S = torch.where(degenerate, uniform, raw / torch.where(degenerate, torch.ones_like(total), total))
    else:
        S = raw
    weights = weights_from_scores(S, settings["mode"], settings["temperature"], settings["rule"], settings["smoothing"],
                                  prior, settings["ratio"])  # row by row, bit for bit the plain path's
    # Every domain at the same point: nothing distinguishes them (the plain path warns).
    return S, torch.where(degenerate, uniform, weights)


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


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


def available_memory(device: Union[str, torch.device] = "cpu") -> Optional[int]:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the host's available
    memory (MemAvailable, else its physical memory); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device.index if device.index is not None else None)[0])
        except (RuntimeError, AssertionError):  # no usable CUDA here: nothing to bound by
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


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

    def gib(b: float) -> str:
        return f"{b / 2**30:,.1f} GiB" if b >= 2**30 else f"{b / 2**20:,.0f} MiB"

    raise ChameleonUserError(
        f"resamples (--bootstrap) {resamples:,}: needs about {gib(need)} of memory ({len(n_windows)} domains, up to "
        f"{max(n_windows)} windows of {dim} values, {1 + len(fractions)} bootstrap blocks per resample) but "
        f"{gib(free)} is free on {torch.device(device)}; the largest --bootstrap that fits is {largest:,}")


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
            float64, others in float32 (see :func:`_resampled_embeddings`).
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
    windows = _window_list(window_embeddings, counts)
    k = len(windows)
    n = [int(w.shape[0]) for w in windows]
    level = _check_level(level)
    resamples = _check_int("resamples", resamples, 1)
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
        names = _check_names(point.domains or None, k, "domains")
    else:
        mode = mode or "pretrain"
        given = {"lam": lam, "temperature": temperature, "share": share, "smoothing": smoothing, "ratio": None}
        normalize = True if normalize is None else bool(normalize)
        names = _check_names(domains, k, "domains of window_embeddings")
        rule = DEFAULT_RULE if rule is None else rule
    settings = rule_settings(given.get("rule", rule), _softmax_rule(mode), given["lam"], given["temperature"],
                             given["share"], given["smoothing"], given["ratio"])
    auto = settings["lam"] == AUTO_LAMBDA
    fractions = sorted({float(f) for f in window_fractions})
    if any(not 0.0 < f < 1.0 for f in fractions):
        raise ChameleonUserError(f"window_fractions must lie in (0, 1), got {list(window_fractions)}")

    device = windows[0].device
    check_bootstrap_memory(resamples, n, int(windows[0].shape[1]), device, fractions,
                           8 if all(w.dtype == torch.float64 for w in windows) else 4)
    mean_embeddings = _window_means(windows)  # [k, d]
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
    S_all, w_all = _scores_and_weights(raw_all, settings, normalize, prior)

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


def format_bootstrap_table(result: BootstrapResult, digits: int = 4) -> str:
    """A short text table: per domain the weight, its interval and std, the normalised
    leverage and its interval, the rank and how often it holds."""
    pct = f"{100 * result.level:g}%"
    head = ["domain", "weight", f"{pct} interval", "std", "leverage", f"{pct} interval", "rank", "kept"]
    rows = []
    for i, name in enumerate(result.domains):
        rows.append([
            name,
            f"{float(result.point.weights[i]):.{digits}f}",
            f"[{float(result.weights_low[i]):.{digits}f}, {float(result.weights_high[i]):.{digits}f}]",
            f"{float(result.weights_std[i]):.{digits}f}",
            f"{float(result.point.leverage[i]):.{digits}f}",
            f"[{float(result.leverage_low[i]):.{digits}f}, {float(result.leverage_high[i]):.{digits}f}]",
            str(int(result.rank[i])),
            f"{100 * float(result.rank_stability[i]):.0f}%",
        ])
    title = f"bootstrap: {result.resamples} resamples of {_windows_label(result.n_windows)} windows" + (
        f", seed {result.seed}" if result.seed is not None else ""
    )
    return title + "\n" + _table(head, rows)


def _windows_label(n: Sequence[int]) -> str:
    return str(n[0]) if len(set(n)) == 1 else f"{min(n)}-{max(n)}"


def _table(head: List[str], rows: List[List[str]], left: int = 1) -> str:
    """Columns padded to their widest cell; the first ``left`` left-aligned, the rest right."""
    widths = [max(len(r[j]) for r in [head] + rows) for j in range(len(head))]

    def line(row: List[str]) -> str:
        return "  ".join(c.ljust(wd) if j < left else c.rjust(wd) for j, (c, wd) in enumerate(zip(row, widths)))

    return "\n".join(line(r) for r in [head] + rows)


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------

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
    direction = _softmax_rule(mode)
    lams = _check_values("lambdas", lambdas)
    base = rule_settings(rule, direction, smoothing=smoothing)
    temps = _check_values("temperatures", [base["temperature"]] if temperatures is None else temperatures)
    A = torch.as_tensor(affinity).to(torch.float64)
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise ChameleonUserError(f"affinity must be a square [k, k] matrix, got shape {tuple(A.shape)}")
    k = A.shape[0]
    names = _check_names(domains, k, "rows of the affinity")
    raw = _leverage_per_lambda(A, lams, center)  # [L, k]
    raw = raw.to(torch.float64)
    L, nT = len(lams), len(temps)
    weights = torch.empty(L, nT, k, dtype=torch.float64, device=raw.device)
    for j, T in enumerate(temps):  # temperatures only change the softmax: no krls call
        S, weights[:, j] = _scores_and_weights(raw, {**base, "temperature": T}, normalize)
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


def format_sweep_table(sweep: SweepResult, digits: int = 4) -> str:
    """One row per (lambda, temperature): effective dimension and each domain's weight."""
    head = ["lambda", "T", "sum(S)"] + list(sweep.domains)
    rows = []
    for i, lam in enumerate(sweep.lambdas):
        for j, T in enumerate(sweep.temperatures):
            rows.append(
                [f"{lam:g}", f"{T:g}", f"{float(sweep.effective_dimension[i]):.3f}"]
                + [f"{v:.{digits}f}" for v in sweep.weights[i, j].tolist()]
            )
    return _table(head, rows, left=0)


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


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
    from .weights import weights_from_affinity

    k = len(point.weights)
    direction = _softmax_rule(point.mode)
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
                f"embed more windows per domain (now {_windows_label(bootstrap.n_windows)}){hint}",
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


def format_diagnostics(diagnostics: Diagnostics) -> str:
    """Lines for the CLI: the effective dimension, then one line per warning."""
    share = diagnostics.effective_dimension_share
    lines = [
        f"effective dimension sum(S) = {diagnostics.effective_dimension:.3f}"
        + (f" ({100 * share:.1f}% of k - 1)" if share is not None else "")
    ]
    win = diagnostics.windows
    if win is not None:
        widths = ", ".join(f"{_windows_label(m)}: {wd:.4f}" for m, wd in zip(win.windows, win.width))
        lines.append(f"weight interval width by windows per domain: {widths}")
    lines += [f"warning [{w['code']}]: {w['message']}" for w in diagnostics.warnings]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Per-window embedding cache entries
# --------------------------------------------------------------------------------------------


def window_cache_path(cache_dir: str, key: str) -> str:
    """Where a domain's per-window means live: beside its ``{key}.pt`` sum entry."""
    return os.path.join(cache_dir, f"{key}.windows.pt")


def _windows_digest(windows: Tensor) -> str:
    t = windows.detach().cpu().contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # NumPy has no bfloat16
    return hashlib.sha256(str(t.dtype).encode() + str(tuple(t.shape)).encode() + raw.numpy().tobytes()).hexdigest()


def pack_window_embeddings(window_means: Tensor, key: str, domain: str, dtype: torch.dtype = torch.float32) -> dict:
    """A cache entry for one domain's per-window means ``[n, d]`` (stored as ``dtype``,
    float32 or bfloat16), to be written with ``io.save_torch`` at :func:`window_cache_path`."""
    if dtype not in WINDOW_CACHE_DTYPES:
        raise ChameleonUserError(f"dtype must be one of {WINDOW_CACHE_DTYPES}, got {dtype}")
    if not isinstance(window_means, Tensor) or window_means.dim() != 2 or window_means.shape[0] < 1:
        shape = tuple(window_means.shape) if isinstance(window_means, Tensor) else type(window_means).__name__
        raise ChameleonUserError(f"window_means must be a tensor [n, d] with n >= 1, got {shape}")
    if not window_means.is_floating_point() or not bool(torch.isfinite(window_means).all()):
        raise ChameleonUserError(f"window_means of domain {domain!r} must be finite floating-point values")
    windows = window_means.detach().to(device="cpu", dtype=dtype).contiguous()
    return {
        "format": WINDOW_CACHE_FORMAT, "key": str(key), "domain": str(domain), "windows": windows,
        "count": int(windows.shape[0]), "sha256": _windows_digest(windows),
    }


def unpack_window_embeddings(entry, key: str, domain: Optional[str] = None) -> Tensor:
    """The per-window means ``[n, d]`` as float32 from a cache entry, checked against ``key``
    (and ``domain``); raises ChameleonUserError naming what is wrong (the reader warns and
    recomputes, as for a damaged domain-sum entry)."""
    if not isinstance(entry, dict) or entry.get("format") != WINDOW_CACHE_FORMAT:
        raise ChameleonUserError(f"not a per-window embedding cache entry (expected format {WINDOW_CACHE_FORMAT!r})")
    if entry.get("key") != key:
        raise ChameleonUserError(f"per-window cache entry has key {entry.get('key')!r}, expected {key!r}")
    if domain is not None and entry.get("domain") != domain:
        raise ChameleonUserError(f"per-window cache entry is for domain {entry.get('domain')!r}, expected {domain!r}")
    windows = entry.get("windows")
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.dtype not in WINDOW_CACHE_DTYPES:
        raise ChameleonUserError("per-window cache entry holds no [n, d] float32/bfloat16 'windows' tensor")
    if entry.get("count") != windows.shape[0] or entry.get("sha256") != _windows_digest(windows):
        raise ChameleonUserError(f"per-window cache entry for domain {entry.get('domain')!r} is damaged (checksum)")
    return windows.to(torch.float32)
