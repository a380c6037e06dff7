"""Figures for a Chameleon run: the domain weights, the centred affinity, and the per-domain
validation perplexity of several trained models.

matplotlib is optional: it is imported only when a figure is drawn, and when it is missing
each function warns and returns None instead of failing the run that wanted a picture.
Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``),
never through ``pyplot``: that renders PNG without a display, leaves the caller's pyplot
backend and figure list alone, and frees each figure when it goes out of scope. Every PNG is
written atomically (:func:`chameleon_ext.io.atomic_write`).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Union

from . import io
from .errors import ChameleonUserError

__all__ = ["plot_weights", "plot_affinity", "plot_perplexity"]

PathLike = Union[str, "os.PathLike[str]"]

DPI = 100
MAX_AFFINITY_TICK_LABELS = 40  # beyond this the names collide; the axes show indices instead
MAX_WEIGHT_LABELS = 150  # bar heights stop fitting a readable font beyond this
AVERAGE_KEY = "average"


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _check_domains(domains: Sequence[str], fn: str) -> List[str]:
    if isinstance(domains, str) or not isinstance(domains, Sequence):
        raise ChameleonUserError(f"{fn}: domains must be a list of names, got {type(domains).__name__}")
    if len(domains) == 0:
        raise ChameleonUserError(f"{fn}: domains is empty")
    return [str(d) for d in domains]


def _as_floats(values, domains: List[str], fn: str, what: str) -> List[float]:
    """``values`` ([k] list, tensor, array, or mapping domain -> value) as k finite floats."""
    if isinstance(values, Mapping):
        missing = [d for d in domains if d not in values]
        if missing:
            raise ChameleonUserError(f"{fn}: {what} has no value for domain(s) {missing}")
        values = [values[d] for d in domains]
    elif hasattr(values, "tolist"):  # torch.Tensor, numpy.ndarray
        values = values.tolist()
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ChameleonUserError(f"{fn}: {what} must be a list of k = {len(domains)} numbers") from None
    if len(out) != len(domains):
        raise ChameleonUserError(f"{fn}: {what} must have k = {len(domains)} entries (one per domain), got {len(out)}")
    bad = [d for d, v in zip(domains, out) if not math.isfinite(v)]
    if bad:
        raise ChameleonUserError(f"{fn}: {what} is NaN or infinite for domain(s) {bad}")
    return out


def _as_square_matrix(affinity, k: int, fn: str) -> List[List[float]]:
    """``affinity`` ([k, k] tensor, array or nested lists) as k rows of k finite floats."""
    rows = affinity.tolist() if hasattr(affinity, "tolist") else affinity
    try:
        matrix = [[float(v) for v in row] for row in rows]
    except (TypeError, ValueError):
        raise ChameleonUserError(f"{fn}: affinity must be a [k, k] matrix of numbers") from None
    shape = (len(matrix), *sorted({len(row) for row in matrix}))
    if shape != (k, k):
        raise ChameleonUserError(f"{fn}: affinity must be [k, k] = [{k}, {k}] (one row per domain), got rows {shape}")
    if not all(math.isfinite(v) for row in matrix for v in row):
        raise ChameleonUserError(f"{fn}: affinity holds NaN or infinite entries")
    return matrix


# --------------------------------------------------------------------------------------------
# matplotlib plumbing
# --------------------------------------------------------------------------------------------


def _new_figure(figsize, fn: str, path: str):
    """A Figure on an Agg canvas, or None (with a warning) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        warnings.warn(
            f"{fn}: matplotlib is not available ({e}); {path} was not written. "
            "Install it with `pip install matplotlib`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str) -> str:
    """Render ``fig`` to ``path`` as PNG (creating its folder), atomically; returns ``path``."""
    with io.atomic_write(path, "picture") as f:
        # A file object has no name ending in .png, so the format is given explicitly.
        fig.savefig(f, format="png", dpi=DPI)
    return path


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _weight_panel(
    ax, domains: List[str], values: List[float], xlabel: str, reference: Optional[float], fontsize: float
) -> None:
    """Horizontal bars, one per domain, top to bottom in the given order, values annotated."""
    k = len(domains)
    positions = list(range(k))
    bars = ax.barh(positions, values, color="tab:blue", height=0.7)
    ax.set_xlabel(xlabel)
    ax.set_ylim(k - 0.5, -0.5)  # first domain on top, as it is listed
    if k <= MAX_WEIGHT_LABELS:
        ax.set_yticks(positions, labels=domains, fontsize=fontsize)
        ax.bar_label(bars, fmt="%.3g", padding=2, fontsize=fontsize)
    top = max(max(values), reference or 0.0)
    # Room to the right of the longest bar for its annotation.
    ax.set_xlim(0.0, top * 1.2 if top > 0 else 1.0)
    if reference is not None:
        ax.axvline(reference, color="0.4", linestyle="--", linewidth=1, label=f"uniform 1/k = {reference:.3g}")
        ax.legend(loc="lower right", fontsize="small")
    ax.grid(axis="x", alpha=0.3)


def plot_weights(
    domains: Sequence[str], weights, path: PathLike, title: Optional[str] = None, scores=None
) -> Optional[str]:
    """Bar chart of the mixture weights alpha (one bar per domain, value annotated, the
    uniform weight 1/k dashed for reference), saved as PNG at ``path``.

    ``weights`` and ``scores`` are [k] lists, tensors, arrays or mappings domain -> value (so
    a loaded weights.json's ``weights`` and ``leverage`` can be passed directly). With ``scores``
    a second panel shows the KRLS leverage scores normalised to sum to 1. Returns ``path``,
    or None (with a warning) when matplotlib is missing.
    """
    fn = "plot_weights"
    domains = _check_domains(domains, fn)
    values = _as_floats(weights, domains, fn, "weights")
    if any(v < 0 for v in values):
        raise ChameleonUserError(f"{fn}: weights must be >= 0")
    normalised_scores = None
    if scores is not None:
        raw = _as_floats(scores, domains, fn, "scores")
        total = math.fsum(raw)
        normalised_scores = [s / total for s in raw] if total > 0 else raw
    path = os.fspath(path)
    k = len(domains)
    fontsize = 9 if k <= 30 else 7
    width = 7.0 if scores is None else 11.0
    height = _clamp(0.28 * k + 1.6, 2.6, 45.0)
    fig = _new_figure((width, height), fn, path)
    if fig is None:
        return None
    axes = fig.subplots(1, 1 if scores is None else 2, sharey=True, squeeze=False)[0]
    _weight_panel(axes[0], domains, values, "mixture weight $\\alpha_i$", 1.0 / k, fontsize)
    axes[0].set_ylabel("domain")
    axes[0].set_title("domain weights")
    if normalised_scores is not None:
        _weight_panel(axes[1], domains, normalised_scores, "leverage score $S_i / \\sum_j S_j$", None, fontsize)
        axes[1].set_title("normalised leverage scores")
    fig.suptitle(title or f"Chameleon domain weights (k = {k})")
    return _save_png(fig, path)


def plot_affinity(domains: Sequence[str], affinity, path: PathLike, title: Optional[str] = None) -> Optional[str]:
    """Heatmap of the centred affinity matrix Omega_c [k, k] (plotted as given; pass the
    centred matrix, e.g. ``DomainWeights.affinity``), with a diverging colormap centred at 0
    and a colorbar. Domain names label both axes up to k = 40; beyond, the axes show indices.
    Values are written in the cells for k <= 12. Returns ``path``, or None when matplotlib
    is missing.
    """
    fn = "plot_affinity"
    domains = _check_domains(domains, fn)
    k = len(domains)
    matrix = _as_square_matrix(affinity, k, fn)
    path = os.fspath(path)
    side = _clamp(0.45 * k + 3.0, 4.5, 11.0)
    fig = _new_figure((side + 1.2, side), fn, path)
    if fig is None:
        return None
    ax = fig.subplots()
    # Symmetric limits put 0 at the colormap's neutral middle: red = similar, blue = dissimilar
    # relative to the mean domain.
    extent = max(abs(v) for row in matrix for v in row) or 1.0
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-extent, vmax=extent, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, shrink=0.85)
    colorbar.set_label("centred affinity $\\Omega_c$")
    if k <= MAX_AFFINITY_TICK_LABELS:
        fontsize = 9 if k <= 20 else 7
        ax.set_xticks(range(k), labels=domains, rotation=45, ha="right", rotation_mode="anchor", fontsize=fontsize)
        ax.set_yticks(range(k), labels=domains, fontsize=fontsize)
        ax.set_xlabel("domain")
        ax.set_ylabel("domain")
    else:
        ax.set_xlabel(f"domain index (k = {k}; names omitted)")
        ax.set_ylabel("domain index")
    if k <= 12:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                # Light text on saturated cells, dark text on pale ones.
                color = "white" if abs(value) > 0.6 * extent else "black"
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=8, color=color)
    ax.set_title(title or f"Centred domain affinity (k = {k})")
    return _save_png(fig, path)


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
    width = _clamp(1.5 + n_cols * (0.3 + 0.22 * n_runs), 6.0, 24.0)
    rotation = 0 if n_cols <= 8 and max(len(c) for c in columns) <= 10 else (45 if n_cols <= 30 else 90)
    fig = _new_figure((width, 4.8 if rotation == 0 else 6.0), fn, path)
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
    return _save_png(fig, path)


# Public names for the figure plumbing, for the plotting code of other modules.
new_figure = _new_figure
save_png = _save_png
