"""Figures for the uncertainty of a Chameleon run: the weights with their bootstrap intervals
as error bars, and a lambda sweep (each domain's weight against lambda, log axis, with the
effective dimension sum(S) on a second axis).

Conventions in :mod:`chameleon_ext.plots.canvas`: matplotlib is optional (a missing one warns
and returns None), figures are drawn on an Agg canvas without pyplot, and PNGs are written
atomically.
"""

from __future__ import annotations

import os
from typing import List, Mapping, Optional, Sequence

from ..errors import ChameleonUserError
from .canvas import MAX_WEIGHT_LABELS, PathLike, as_floats, check_domains, clamp, new_figure, save_png

__all__ = ["plot_weight_intervals", "plot_bootstrap", "plot_sweep"]

MAX_SWEEP_LEGEND = 20  # beyond this many domains the legend is left out


def _interval_panel(ax, domains: List[str], values, low, high, xlabel: str, reference: Optional[float], fontsize):
    k = len(domains)
    positions = list(range(k))
    # Error bars from the percentile interval, which need not be symmetric about the point.
    xerr = [[max(0.0, v - lo) for v, lo in zip(values, low)], [max(0.0, hi - v) for v, hi in zip(values, high)]]
    ax.barh(positions, values, color="tab:blue", height=0.7, xerr=xerr,
            error_kw=dict(ecolor="0.15", capsize=3, elinewidth=1))
    ax.set_xlabel(xlabel)
    ax.set_ylim(k - 0.5, -0.5)  # first domain on top, as listed
    if k <= MAX_WEIGHT_LABELS:
        ax.set_yticks(positions, labels=domains, fontsize=fontsize)
    top = max(max(high), max(values), reference or 0.0)
    ax.set_xlim(0.0, top * 1.15 if top > 0 else 1.0)
    if reference is not None:
        ax.axvline(reference, color="0.4", linestyle="--", linewidth=1, label=f"uniform 1/k = {reference:.3g}")
        ax.legend(loc="lower right", fontsize="small")
    ax.grid(axis="x", alpha=0.3)


def _check_interval(values, low, high, domains, fn: str, what: str):
    v = as_floats(values, domains, fn, what)
    lo = as_floats(low, domains, fn, f"{what} low")
    hi = as_floats(high, domains, fn, f"{what} high")
    bad = [d for d, a, b in zip(domains, lo, hi) if a > b]
    if bad:
        raise ChameleonUserError(f"{fn}: {what} interval has low > high for domain(s) {bad}")
    return v, lo, hi


def plot_weight_intervals(
    domains: Sequence[str], weights, low, high, path: PathLike, title: Optional[str] = None,
    scores=None, scores_low=None, scores_high=None, level: float = 0.95,
) -> Optional[str]:
    """Bar chart of the mixture weights with their bootstrap intervals as error bars (the
    uniform 1/k dashed), and with ``scores`` (+ ``scores_low``/``scores_high``) a second
    panel for the normalised leverage. Values are [k] lists, tensors or mappings domain ->
    value (a loaded weights.json's ``bootstrap`` entries can be passed directly). Returns
    ``path``, or None when matplotlib is missing."""
    fn = "plot_weight_intervals"
    domains = check_domains(domains, fn)
    w, w_lo, w_hi = _check_interval(weights, low, high, domains, fn, "weights")
    with_scores = scores is not None
    if with_scores:
        if scores_low is None or scores_high is None:
            raise ChameleonUserError(f"{fn}: scores needs scores_low and scores_high")
        s, s_lo, s_hi = _check_interval(scores, scores_low, scores_high, domains, fn, "scores")
    path = os.fspath(path)
    k = len(domains)
    fontsize = 9 if k <= 30 else 7
    fig = new_figure((11.0 if with_scores else 7.0, clamp(0.28 * k + 1.6, 2.6, 45.0)), fn, path)
    if fig is None:
        return None
    axes = fig.subplots(1, 2 if with_scores else 1, sharey=True, squeeze=False)[0]
    pct = f"{100 * level:g}%"
    _interval_panel(axes[0], domains, w, w_lo, w_hi, "mixture weight $\\alpha_i$", 1.0 / k, fontsize)
    axes[0].set_ylabel("domain")
    axes[0].set_title(f"domain weights ({pct} interval)")
    if with_scores:
        _interval_panel(axes[1], domains, s, s_lo, s_hi, "leverage score $S_i / \\sum_j S_j$", None, fontsize)
        axes[1].set_title(f"normalised leverage ({pct} interval)")
    fig.suptitle(title or f"Chameleon domain weights with bootstrap intervals (k = {k})")
    return save_png(fig, path)


def plot_bootstrap(result, path: PathLike, title: Optional[str] = None) -> Optional[str]:
    """:func:`plot_weight_intervals` for a :class:`~chameleon_ext.uncertainty.BootstrapResult`
    or its ``to_dict()`` (the ``bootstrap`` entry of weights.json)."""
    d = result if isinstance(result, Mapping) else result.to_dict()
    try:
        domains = list(d["weights"]["point"])
        return plot_weight_intervals(
            domains, d["weights"]["point"], d["weights"]["low"], d["weights"]["high"], path, title,
            d["leverage"]["point"], d["leverage"]["low"], d["leverage"]["high"], level=float(d.get("level", 0.95)),
        )
    except (KeyError, TypeError):
        raise ChameleonUserError("plot_bootstrap: expected a BootstrapResult or its to_dict()") from None


def plot_sweep(
    sweep, path: PathLike, temperature: Optional[float] = None, title: Optional[str] = None
) -> Optional[str]:
    """Each domain's weight against lambda (log x axis) at one temperature (default: the
    first swept), with the effective dimension sum(S) on a second y axis (dashed). ``sweep``
    is a :class:`~chameleon_ext.uncertainty.SweepResult` or its ``to_dict()`` (sweep.json).
    Returns ``path``, or None when matplotlib is missing."""
    fn = "plot_sweep"
    d = sweep if isinstance(sweep, Mapping) else sweep.to_dict()
    try:
        domains = check_domains(d["domains"], fn)
        lambdas = [float(x) for x in d["lambdas"]]
        temps = [float(x) for x in d["temperatures"]]
        eff = [float(x) for x in d["effective_dimension"]]
        results = d["results"]
    except (KeyError, TypeError, ValueError):
        raise ChameleonUserError(f"{fn}: expected a SweepResult or its to_dict() (sweep.json)") from None
    if not lambdas or len(eff) != len(lambdas) or any(x <= 0 for x in lambdas):
        raise ChameleonUserError(f"{fn}: lambdas must be > 0 with one effective dimension each")
    T = temps[0] if temperature is None else float(temperature)
    if T not in temps:
        raise ChameleonUserError(f"{fn}: temperature {T:g} was not swept (swept: {temps})")
    by_lambda = {float(r["lambda"]): r["weights"] for r in results if float(r["temperature"]) == T}
    order = sorted(range(len(lambdas)), key=lambda i: lambdas[i])
    xs = [lambdas[i] for i in order]
    series: List[List[float]] = []
    for name in domains:
        series.append([float(by_lambda[x][name]) for x in xs])
    path = os.fspath(path)
    k = len(domains)
    fig = new_figure((8.5 if k <= MAX_SWEEP_LEGEND else 7.0, 4.8), fn, path)
    if fig is None:
        return None
    ax = fig.subplots()
    for name, ys in zip(domains, series):
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("ridge $\\lambda$ (log scale; $\\mu = \\lambda k$)")
    ax.set_ylabel(f"mixture weight $\\alpha_i$ (T = {T:g})")
    ax.axhline(1.0 / k, color="0.4", linestyle=":", linewidth=1)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, [eff[i] for i in order], color="black", linestyle="--", linewidth=1.5, label="sum(S)")
    ax2.set_ylabel("effective dimension $\\sum_i S_i$ (dashed)")
    ax2.set_ylim(0.0, max(1.0, k - 1) * 1.05)  # sum(S) < k - 1 for a centred kernel
    if k <= MAX_SWEEP_LEGEND:
        fig.legend(title="domain", fontsize="small", loc="outside right upper")
    ax.set_title(title or f"Chameleon weights across $\\lambda$ ({d.get('mode', '')}, k = {k})")
    return save_png(fig, path)
