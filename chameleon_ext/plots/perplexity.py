"""Figures of trained models' validation or test perplexity: per-domain bars for several runs
(:func:`plot_perplexity`) and a comparison of mixtures with their intervals and their cost
(:func:`plot_comparison`). Conventions in :mod:`chameleon_ext.plots.canvas`.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Mapping, Optional

from ..errors import ChameleonUserError
from .canvas import AVERAGE_KEY, PathLike, clamp, new_figure, save_png

__all__ = ["plot_perplexity", "plot_comparison"]


def _perplexity_columns(table: Mapping[str, Mapping[str, float]]) -> List[str]:
    """Domains in first-seen order across runs, with the average last."""
    columns: Dict[str, None] = {}
    for scores in table.values():
        for domain in scores:
            columns.setdefault(str(domain), None)
    names = [c for c in columns if c != AVERAGE_KEY]
    return names + ([AVERAGE_KEY] if AVERAGE_KEY in columns else [])


def _check_perplexity_table(table, fn: str) -> Dict[str, Dict[str, float]]:
    if not isinstance(table, Mapping) or not table:
        raise ChameleonUserError(f"{fn}: table must be a non-empty mapping run -> {{domain: perplexity}}")
    checked: Dict[str, Dict[str, float]] = {}
    for run, scores in table.items():
        if not isinstance(scores, Mapping) or not scores:
            raise ChameleonUserError(f"{fn}: run {run!r} must map domain -> perplexity, got {scores!r}")
        checked[str(run)] = {}
        for domain, ppl in scores.items():
            try:
                value = float(ppl)
            except (TypeError, ValueError):
                value = math.nan
            if isinstance(ppl, bool) or not math.isfinite(value) or value <= 0:
                raise ChameleonUserError(
                    f"{fn}: perplexity of run {run!r} on domain {domain!r} must be a finite number > 0, got {ppl!r}"
                )
            checked[str(run)][str(domain)] = value
    return checked


def plot_perplexity(
    table: Mapping[str, Mapping[str, float]], path: PathLike, title: Optional[str] = None
) -> Optional[str]:
    """Grouped bar chart of per-domain validation perplexity, one colour per run.

    ``table`` is ``{run_name: {domain: ppl, ..., "average": ppl}}``; domains appear in
    first-seen order with ``average`` last, set apart by a dotted line. A run missing a
    domain simply has no bar there. Returns ``path``, or None when matplotlib is missing.
    """
    fn = "plot_perplexity"
    checked = _check_perplexity_table(table, fn)
    path = os.fspath(path)
    columns = _perplexity_columns(checked)
    runs = list(checked)
    n_cols, n_runs = len(columns), len(runs)
    width = clamp(1.5 + n_cols * (0.3 + 0.22 * n_runs), 6.0, 24.0)
    rotation = 0 if n_cols <= 8 and max(len(c) for c in columns) <= 10 else (45 if n_cols <= 30 else 90)
    fig = new_figure((width, 4.8 if rotation == 0 else 6.0), fn, path)
    if fig is None:
        return None
    ax = fig.subplots()
    bar_width = 0.8 / n_runs
    annotate = n_cols * n_runs <= 48
    for r, run in enumerate(runs):
        present = [(c, checked[run][name]) for c, name in enumerate(columns) if name in checked[run]]
        xs = [c - 0.4 + bar_width * (r + 0.5) for c, _ in present]
        bars = ax.bar(xs, [ppl for _, ppl in present], width=bar_width, label=run)
        if annotate:
            ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=7, rotation=90 if n_runs > 2 else 0)
    if AVERAGE_KEY in columns and n_cols > 1:
        ax.axvline(n_cols - 1.5, color="0.5", linestyle=":", linewidth=1)
    ax.set_xticks(
        range(n_cols), labels=columns, rotation=rotation, ha="right" if rotation else "center",
        rotation_mode="anchor", fontsize=10 if n_cols <= 20 else 8,
    )
    ax.set_xlim(-0.6, n_cols - 0.4)
    ax.margins(y=0.15)  # headroom for the annotations
    ax.set_xlabel("validation domain")
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    # Outside the axes: inside, the legend would hide the tallest bars.
    fig.legend(title="run", fontsize="small", loc="outside right upper")
    ax.set_title(title or "Validation perplexity per domain")
    return save_png(fig, path)


def plot_comparison(stats, ledger, path: PathLike, title: str) -> Optional[str]:
    """The figure of a mixture comparison: per-domain test perplexity bars with their 95%
    intervals as error bars (one colour per mixture, the average last), and beside them the
    average perplexity against the mixture's cost in FLOPs on a log axis (a free mixture is
    drawn at the axis' left edge, labelled "(free)").

    ``stats`` is a :class:`~chameleon_ext.compare_stats.ComparisonStats` (``domains``, and
    ``mixtures[name].perplexity[domain]`` intervals with ``mean`` and ``errors``, the distances
    below and above the mean: a log-scale interval is asymmetric);
    ``ledger`` a :class:`~chameleon_ext.compare_stats.ComputeLedger` (``methods()``,
    ``flops(name)``). Returns ``path``, or None when matplotlib is missing."""
    path = os.fspath(path)
    doms = list(stats.domains) + [AVERAGE_KEY]
    mixes = list(stats.mixtures)
    fig = new_figure((max(9.0, 1.2 * len(doms) + 6.0), 4.8), "compare", path)
    if fig is None:
        return None
    ax, ax2 = fig.subplots(1, 2, width_ratios=[2.2, 1])
    width = 0.8 / len(mixes)
    for r, m in enumerate(mixes):
        ivs = [stats.mixtures[m].perplexity[d] for d in doms]
        xs = [c - 0.4 + width * (r + 0.5) for c in range(len(doms))]
        err = [[iv.errors[0] for iv in ivs], [iv.errors[1] for iv in ivs]]  # log-scale: asymmetric
        ax.bar(xs, [iv.mean for iv in ivs], width=width, yerr=err, capsize=2, label=m)
    ax.set_xticks(range(len(doms)), labels=doms, rotation=30, ha="right")
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    costs = {m: ledger.flops(m) if m in ledger.methods() else 0.0 for m in mixes}
    positive = [v for v in costs.values() if v > 0]
    floor = min(positive) / 10 if positive else 1.0
    free = 0
    for m in mixes:
        iv = stats.mixtures[m].perplexity[AVERAGE_KEY]
        x = costs[m] if costs[m] > 0 else floor
        ax2.errorbar([x], [iv.mean], yerr=[[iv.errors[0]], [iv.errors[1]]], fmt="o", capsize=3)
        # the free mixtures share one x: their labels are stacked so they stay readable
        dy = 4 if costs[m] > 0 else 4 + 10 * free
        free += costs[m] <= 0
        ax2.annotate(m + ("" if costs[m] > 0 else " (free)"), (x, iv.mean), textcoords="offset points",
                     xytext=(4, dy), fontsize=8)
    ax2.set_xscale("log")
    ax2.set_xlabel("mixture cost (FLOPs, log scale)")
    ax2.set_ylabel("average test perplexity")
    ax2.grid(alpha=0.3)
    return save_png(fig, path)
