"""Statistics of a mixture comparison: seed intervals, paired differences, compute, the table.

**Intervals over seeds.** Every mixture is trained with the same seeds (the seed sets model
initialisation and data order). For a quantity measured once per seed, ``x_1 .. x_n``, the
report gives the mean and the two-sided 95% confidence interval for the mean under the usual
normal model::

    mean +- t_{0.975, n-1} * sd / sqrt(n),   sd the sample standard deviation (n - 1 divisor)

with ``t`` the Student-t quantile with ``n - 1`` degrees of freedom (computed here exactly for
integer degrees of freedom, no SciPy needed). With one seed there is no interval (``low`` and
``high`` are None) and the table says so.

**Perplexity on the log scale.** A perplexity is ``exp(loss)``: positive, and its spread over
seeds grows with its size. Its interval is computed on the log scale (the formula above on
``log ppl_s``, i.e. on the mean test loss) and exponentiated: ``exp(mean log ppl +- h)``
around the geometric mean ``exp(mean log ppl)``. So it never goes below zero -- a linear
interval with 2 seeds (``t_{0.975, 1} = 12.7``) often does -- and it is asymmetric, as the
spread of a positive quantity is; the table prints it as ``[low, high]``.

**Paired differences.** The difference of a mixture to the baseline (uniform) is taken seed by
seed, ``d_s = ppl(mixture, s) - ppl(uniform, s)``, over the seeds both have, and its interval is
the interval of the mean of the ``d_s``: seeds share initialisation and data order, so pairing
removes that shared noise. A negative difference means lower perplexity than uniform.

**Average.** The per-seed average is the mean of the domains' perplexities (the paper's
"average perplexity"); its interval is over the per-seed averages, so it accounts for domains
moving together within a seed.

**Compute.** :class:`ComputeLedger` counts what each mixture cost to obtain in FLOPs by the
scaling-law convention (Kaplan et al. 2020): ``6 N D`` for a training pass over ``D`` tokens
(forward + backward), ``2 N D`` for a forward-only pass, ``N`` the non-embedding parameters
(:func:`non_embedding_parameters`), beside wall-clock seconds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch

from .errors import ChameleonUserError

__all__ = [
    "DEFAULT_CONFIDENCE",
    "student_t_quantile",
    "Interval",
    "mean_interval",
    "log_mean_interval",
    "MixtureStats",
    "ComparisonStats",
    "compare_perplexities",
    "TRAIN",
    "FORWARD",
    "pass_flops",
    "non_embedding_parameters",
    "ComputeEntry",
    "ComputeLedger",
    "format_comparison_table",
]

DEFAULT_CONFIDENCE = 0.95
TRAIN, FORWARD = "train", "forward"
FLOPS_PER_TOKEN_PER_PARAM = {TRAIN: 6, FORWARD: 2}
AVERAGE = "average"


# ------------------------------------------------------------------------------------------
# Student t


def _t_central_probability(t: float, dof: int) -> float:
    """P(|T| <= t) for Student's T with integer ``dof`` (Abramowitz & Stegun 26.7.3-4: finite
    series in theta = atan(t / sqrt(dof)), exact for integer degrees of freedom)."""
    theta = math.atan(t / math.sqrt(dof))
    s, c = math.sin(theta), math.cos(theta)
    c2 = c * c
    if dof % 2 == 1:
        if dof == 1:
            return 2.0 * theta / math.pi
        term, total = 1.0, 1.0
        for j in range(1, (dof - 1) // 2):  # coefficients 2/3, 2*4/(3*5), ...
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return 2.0 / math.pi * (theta + s * c * total)
    term, total = 1.0, 1.0
    for j in range(1, dof // 2):  # coefficients 1/2, 1*3/(2*4), ...
        term *= c2 * (2 * j - 1) / (2 * j)
        total += term
    return s * total


def student_t_quantile(confidence: float, dof: int) -> float:
    """The ``t`` with ``P(|T| <= t) = confidence`` for Student's T with ``dof`` degrees of
    freedom: the two-sided critical value (``t_{(1 + confidence) / 2, dof}``).

    Bisection on ``theta = atan(t / sqrt(dof))`` in [0, pi/2) to machine precision.
    """
    if isinstance(dof, bool) or not isinstance(dof, int) or dof < 1:
        raise ChameleonUserError(f"dof: expected an integer >= 1, got {dof!r}")
    if not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ChameleonUserError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    lo, hi = 0.0, math.pi / 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _t_central_probability(math.sqrt(dof) * math.tan(mid), dof) < confidence:
            lo = mid
        else:
            hi = mid
    return math.sqrt(dof) * math.tan(0.5 * (lo + hi))


# ------------------------------------------------------------------------------------------
# intervals


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` per-seed values and its two-sided Student-t confidence interval.

    ``low``/``high``/``sd`` are None when ``n == 1`` (one seed gives no interval)."""

    mean: float
    low: Optional[float]
    high: Optional[float]
    n: int
    sd: Optional[float]
    confidence: float = DEFAULT_CONFIDENCE
    # "linear": mean +- half-width; "log": computed on the logs (see log_mean_interval), mean
    # the geometric mean, sd that of the logs, low/high asymmetric around mean
    scale: str = "linear"

    @property
    def half_width(self) -> Optional[float]:
        """The half-width of a linear interval (None for one seed, or on the log scale, where
        the interval is not symmetric: use :attr:`errors`)."""
        return None if self.high is None or self.scale != "linear" else self.high - self.mean

    @property
    def errors(self) -> tuple:
        """``(mean - low, high - mean)``, ``(0, 0)`` without an interval (error bars)."""
        return (0.0, 0.0) if self.high is None else (self.mean - self.low, self.high - self.mean)

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "sd": self.sd,
                "confidence": self.confidence, "scale": self.scale}


def mean_interval(values: Iterable[float], confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """Mean and two-sided ``confidence`` interval over per-seed ``values`` (see module doc)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ChameleonUserError("mean_interval: no values (at least one seed is needed)")
    bad = [v for v in xs if not math.isfinite(v)]
    if bad:
        raise ChameleonUserError(f"mean_interval: values must be finite, got {bad[0]!r}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean, None, None, 1, None, confidence)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = student_t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd, confidence)


def log_mean_interval(values: Iterable[float], confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """The interval of positive per-seed ``values`` (perplexities) on the log scale: the
    Student-t interval of ``log values``, exponentiated; ``mean`` is the geometric mean, ``sd``
    the standard deviation of the logs (module doc)."""
    xs = [float(v) for v in values]
    bad = [v for v in xs if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ChameleonUserError(f"log_mean_interval: values must be finite and > 0, got {bad[0]!r}")
    iv = mean_interval([math.log(v) for v in xs], confidence)
    low = None if iv.low is None else math.exp(iv.low)
    high = None if iv.high is None else math.exp(iv.high)
    return Interval(math.exp(iv.mean), low, high, iv.n, iv.sd, confidence, "log")


@dataclass
class MixtureStats:
    """One mixture's row of the table."""

    perplexity: Dict[str, Interval]  # per domain, plus "average"
    difference: Optional[Dict[str, Interval]]  # paired, minus the baseline; None for the baseline
    seeds: List[str]
    paired_seeds: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"perplexity": {k: v.as_dict() for k, v in self.perplexity.items()},
                "difference_to_baseline": None if self.difference is None else
                {k: v.as_dict() for k, v in self.difference.items()},
                "seeds": list(self.seeds), "paired_seeds": list(self.paired_seeds)}


@dataclass
class ComparisonStats:
    """Per-mixture, per-domain intervals over seeds and paired differences to the baseline."""

    mixtures: Dict[str, MixtureStats]
    domains: List[str]
    baseline: Optional[str]
    confidence: float

    @property
    def n_seeds(self) -> List[int]:
        return sorted({len(m.seeds) for m in self.mixtures.values()})

    def interval_description(self) -> str:
        ns = self.n_seeds
        n_text = f"n = {ns[0]}" if len(ns) == 1 else f"n = {', '.join(map(str, ns))} (differs by mixture)"
        pct = f"{100 * self.confidence:g}%"
        if ns == [1]:
            return (f"{n_text} seed: single values, no confidence interval (one seed gives no "
                    "estimate of the spread).")
        return (f"{n_text} seeds; a perplexity x [lo, hi] is the geometric mean over seeds (the "
                f"perplexity of the mean test loss) and its two-sided {pct} confidence interval, "
                "computed on the log scale (Student t with n - 1 degrees of freedom on the per-seed "
                "log perplexities, sample standard deviation) and exponentiated, so it stays positive"
                + (f"; Δ ± h is the mean paired difference to {self.baseline} (same seeds) and the "
                   f"half-width h of its {pct} confidence interval (Student t with n - 1 degrees of "
                   "freedom)" if self.baseline else "") + ".")

    def as_dict(self) -> dict:
        return {"domains": list(self.domains), "baseline": self.baseline,
                "confidence": self.confidence, "interval": self.interval_description(),
                "mixtures": {k: v.as_dict() for k, v in self.mixtures.items()}}


def compare_perplexities(results: Mapping[str, Mapping[Any, Mapping[str, float]]],
                         baseline: Optional[str] = "uniform",
                         confidence: float = DEFAULT_CONFIDENCE) -> ComparisonStats:
    """Statistics of ``results[mixture][seed][domain] = test perplexity``.

    Every (mixture, seed) must report the same domains, each perplexity finite and >= 1.
    Seeds are matched by ``str(seed)`` (JSON turns integer keys into strings). The baseline
    (``None`` for none) must be one of the mixtures; differences use the seeds it shares with
    each mixture (listed in ``paired_seeds``).
    """
    if not isinstance(results, Mapping) or not results:
        raise ChameleonUserError("results: expected {mixture: {seed: {domain: perplexity}}}, got nothing")
    if baseline is not None and baseline not in results:
        raise ChameleonUserError(f"baseline: {baseline!r} is not among the mixtures {list(results)}")
    domains: Optional[List[str]] = None
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    for mix, by_seed in results.items():
        if not isinstance(by_seed, Mapping) or not by_seed:
            raise ChameleonUserError(f"results[{mix!r}]: expected at least one seed's {{domain: perplexity}}")
        table[mix] = {}
        for seed, ppl in by_seed.items():
            names = [d for d in ppl if d != AVERAGE]  # an "average" entry is recomputed here
            if domains is None:
                domains = names
                if not domains:
                    raise ChameleonUserError(f"results[{mix!r}][{seed!r}]: no domain")
            if sorted(names) != sorted(domains):
                raise ChameleonUserError(
                    f"results[{mix!r}][{seed!r}]: domains {sorted(names)} differ from {sorted(domains)}")
            row = {}
            for d in domains:
                v = ppl[d]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1:
                    raise ChameleonUserError(
                        f"results[{mix!r}][{seed!r}][{d!r}]: perplexity {v!r}; expected a finite number >= 1")
                row[d] = float(v)
            row[AVERAGE] = math.fsum(row[d] for d in domains) / len(domains)
            key = str(seed)
            if key in table[mix]:
                raise ChameleonUserError(f"results[{mix!r}]: seed {seed!r} appears twice")
            table[mix][key] = row
    keys = list(domains) + [AVERAGE]
    out: Dict[str, MixtureStats] = {}
    for mix, rows in table.items():
        seeds = list(rows)
        ppl_iv = {k: log_mean_interval([rows[s][k] for s in seeds], confidence) for k in keys}
        diff, paired = None, []
        if baseline is not None and mix != baseline:
            paired = [s for s in seeds if s in table[baseline]]
            if paired:
                diff = {k: mean_interval([rows[s][k] - table[baseline][s][k] for s in paired], confidence)
                        for k in keys}
        out[mix] = MixtureStats(ppl_iv, diff, seeds, paired)
    return ComparisonStats(out, list(domains), baseline, confidence)


# ------------------------------------------------------------------------------------------
# compute


def pass_flops(kind: str, n_params: int, tokens: int) -> float:
    """``6 N D`` for a training pass (``kind="train"``), ``2 N D`` for a forward-only pass."""
    if kind not in FLOPS_PER_TOKEN_PER_PARAM:
        raise ChameleonUserError(f"kind: expected {TRAIN!r} or {FORWARD!r}, got {kind!r}")
    for name, v in (("n_params", n_params), ("tokens", tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ChameleonUserError(f"{name}: expected an integer >= 0, got {v!r}")
    return float(FLOPS_PER_TOKEN_PER_PARAM[kind] * n_params * tokens)


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """``N`` of the scaling-law convention: parameters outside every ``nn.Embedding`` (token
    and position tables), each shared tensor counted once.

    For :class:`~chameleon_ext.model.GPT` this excludes ``wte`` and ``wpe``; note that
    ``GPT.num_parameters(non_embedding=True)`` (nanoGPT's convention) keeps ``wte`` because it
    is tied to the output layer."""
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in embedding:
            continue
        seen.add(id(p))
        n += p.numel()
    return n


@dataclass(frozen=True)
class ComputeEntry:
    """One pass of one model: what it was, how big, how many tokens, how long."""

    method: str  # the mixture method it was spent for, e.g. "doremi"; "base" for base runs
    name: str  # e.g. "reference model", "proxy", "reference forward on proxy batches"
    kind: str  # "train" or "forward"
    n_params: int  # non-embedding parameters N
    tokens: int
    wall_s: float = 0.0

    @property
    def flops(self) -> float:
        return pass_flops(self.kind, self.n_params, self.tokens)

    def as_dict(self) -> dict:
        return {**asdict(self), "flops": self.flops}


class ComputeLedger:
    """The compute each method spent, entry by entry (JSON-serialisable, for resumable runs)."""

    def __init__(self, entries: Optional[Iterable[ComputeEntry]] = None):
        self.entries: List[ComputeEntry] = list(entries or [])

    def add(self, method: str, name: str, kind: str, n_params: int, tokens: int,
            wall_s: float = 0.0) -> ComputeEntry:
        for label, v in (("method", method), ("name", name)):
            if not isinstance(v, str) or not v:
                raise ChameleonUserError(f"{label}: expected a non-empty string, got {v!r}")
        if isinstance(wall_s, bool) or not isinstance(wall_s, (int, float)) or not math.isfinite(wall_s) or wall_s < 0:
            raise ChameleonUserError(f"wall_s: expected a finite number >= 0, got {wall_s!r}")
        entry = ComputeEntry(method, name, kind, n_params, tokens, float(wall_s))
        entry.flops  # validates kind, n_params, tokens
        self.entries.append(entry)
        return entry

    def methods(self) -> List[str]:
        return list(dict.fromkeys(e.method for e in self.entries))

    def flops(self, method: Optional[str] = None) -> float:
        return math.fsum(e.flops for e in self.entries if method is None or e.method == method)

    def wall_s(self, method: Optional[str] = None) -> float:
        return math.fsum(e.wall_s for e in self.entries if method is None or e.method == method)

    def summary(self) -> Dict[str, dict]:
        return {m: {"flops": self.flops(m), "wall_s": self.wall_s(m),
                    "entries": sum(e.method == m for e in self.entries)} for m in self.methods()}

    def to_dict(self) -> dict:
        return {"convention": "FLOPs = 6 N tokens (train) or 2 N tokens (forward), N = non-embedding parameters",
                "entries": [e.as_dict() for e in self.entries], "summary": self.summary()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ComputeLedger":
        ledger = cls()
        for e in d.get("entries", []):
            ledger.add(e["method"], e["name"], e["kind"], int(e["n_params"]), int(e["tokens"]), float(e["wall_s"]))
        return ledger


# ------------------------------------------------------------------------------------------
# the table


def _fmt(iv: Interval, digits: int, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if iv.high is None:
        return f"{iv.mean:{sign}.{digits}f}"
    if iv.scale == "log":
        return f"{iv.mean:{sign}.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"
    return f"{iv.mean:{sign}.{digits}f} ± {iv.half_width:.{digits}f}"


def format_comparison_table(stats: ComparisonStats, ledger: Optional[ComputeLedger] = None,
                            digits: int = 3, base_method: str = "base") -> str:
    """Markdown: test perplexity per domain and on average (geometric mean [CI]), the paired
    difference of the average to the baseline, and each mixture's cost from ``ledger``
    (entries whose ``method`` is the mixture's name); then the paired differences per domain.
    The text above the tables states the number of seeds and what the interval is."""
    doms = list(stats.domains) + [AVERAGE]
    lines = [f"Test perplexity. {stats.interval_description()}", ""]
    head = ["mixture"] + doms
    if stats.baseline:
        head.append(f"Δ average vs {stats.baseline}")
    if ledger is not None:
        head += ["mixture cost (FLOPs)", "mixture cost (wall s)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for mix, ms in stats.mixtures.items():
        row = [mix] + [_fmt(ms.perplexity[d], digits) for d in doms]
        if stats.baseline:
            row.append("—" if ms.difference is None else _fmt(ms.difference[AVERAGE], digits, signed=True))
        if ledger is not None:
            spent = mix in ledger.methods()
            row += [f"{ledger.flops(mix):.3g}" if spent else "0",
                    f"{ledger.wall_s(mix):.1f}" if spent else "0"]
        lines.append("| " + " | ".join(row) + " |")
    if ledger is not None and base_method in ledger.methods():
        lines += ["", f"Base training, all runs together: {ledger.flops(base_method):.3g} FLOPs, "
                      f"{ledger.wall_s(base_method):.1f} s. FLOPs: 6 N tokens per training pass, "
                      "2 N tokens per forward-only pass, N = non-embedding parameters."]
    if stats.baseline and any(ms.difference for ms in stats.mixtures.values()):
        lines += ["", f"Paired difference to {stats.baseline} (mixture − {stats.baseline}, same "
                      "seeds; negative is better):", ""]
        lines.append("| " + " | ".join(["mixture"] + doms) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * len(doms)) + "|")
        for mix, ms in stats.mixtures.items():
            if ms.difference is not None:
                lines.append("| " + " | ".join([mix] + [_fmt(ms.difference[d], digits, signed=True)
                                                        for d in doms]) + " |")
    return "\n".join(lines) + "\n"
