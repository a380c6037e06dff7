"""Figures of a weight computation: the domain weights (with the normalised leverage scores
beside them) and the centred affinity matrix. Conventions in :mod:`chameleon_ext.plots.canvas`.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence

from ..errors import ChameleonUserError
from .canvas import (MAX_WEIGHT_LABELS, PathLike, as_floats, as_square_matrix, check_domains, clamp, new_figure,
                     save_png)

__all__ = ["plot_weights", "plot_affinity"]

MAX_AFFINITY_TICK_LABELS = 40  # beyond this the names collide; the axes show indices instead


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
    domains = check_domains(domains, fn)
    values = as_floats(weights, domains, fn, "weights")
    if any(v < 0 for v in values):
        raise ChameleonUserError(f"{fn}: weights must be >= 0")
    normalised_scores = None
    if scores is not None:
        raw = as_floats(scores, domains, fn, "scores")
        total = math.fsum(raw)
        normalised_scores = [s / total for s in raw] if total > 0 else raw
    path = os.fspath(path)
    k = len(domains)
    fontsize = 9 if k <= 30 else 7
    width = 7.0 if scores is None else 11.0
    height = clamp(0.28 * k + 1.6, 2.6, 45.0)
    fig = new_figure((width, height), fn, path)
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
    return save_png(fig, path)


def plot_affinity(domains: Sequence[str], affinity, path: PathLike, title: Optional[str] = None) -> Optional[str]:
    """Heatmap of the centred affinity matrix Omega_c [k, k] (plotted as given; pass the
    centred matrix, e.g. ``DomainWeights.affinity``), with a diverging colormap centred at 0
    and a colorbar. Domain names label both axes up to k = 40; beyond, the axes show indices.
    Values are written in the cells for k <= 12. Returns ``path``, or None when matplotlib
    is missing.
    """
    fn = "plot_affinity"
    domains = check_domains(domains, fn)
    k = len(domains)
    matrix = as_square_matrix(affinity, k, fn)
    path = os.fspath(path)
    side = clamp(0.45 * k + 3.0, 4.5, 11.0)
    fig = new_figure((side + 1.2, side), fn, path)
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
    return save_png(fig, path)
