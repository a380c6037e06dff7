"""The drawing API the figures share: a Figure on an Agg canvas, an atomic PNG writer, and the
input checks every figure makes (domain names, one finite number per domain, a [k, k] matrix).

matplotlib is optional and imported only inside :func:`new_figure`, so importing any of
:mod:`chameleon_ext.plots` costs nothing until a figure is drawn; a missing matplotlib makes
:func:`new_figure` warn and return None, and the figure function then returns None instead of
failing the run that wanted a picture. Figures never go through ``pyplot``: rendering on the
Agg canvas needs no display, leaves the caller's pyplot backend and figure list alone, and
frees each figure when it goes out of scope.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import List, Mapping, Sequence, Union

from .. import io
from ..errors import ChameleonUserError
from ..mixture import check_domain_names

__all__ = ["DPI", "MAX_WEIGHT_LABELS", "AVERAGE_KEY", "PathLike", "new_figure", "save_png", "clamp",
           "check_domains", "as_floats", "as_square_matrix"]

PathLike = Union[str, "os.PathLike[str]"]

DPI = 100
MAX_WEIGHT_LABELS = 150  # bar heights stop fitting a readable font beyond this
AVERAGE_KEY = "average"  # the column of a perplexity table that averages the domains


def new_figure(figsize, fn: str, path: str):
    """A Figure of ``figsize`` inches on an Agg canvas, or None (with a RuntimeWarning naming
    ``fn`` and the ``path`` that will not be written) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        warnings.warn(
            f"{fn}: matplotlib is not available ({e}); {path} was not written. "
            "Install it with `pip install matplotlib`.",
            RuntimeWarning,
            stacklevel=3,  # the caller of the figure function, not the figure function
        )
        return None
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: PathLike) -> str:
    """Render ``fig`` to ``path`` as PNG (creating its folder), atomically; returns ``path``."""
    path = os.fspath(path)
    with io.atomic_write(path, "picture") as f:
        # A file object has no name ending in .png, so the format is given explicitly.
        fig.savefig(f, format="png", dpi=DPI)
    return path


def clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def check_domains(domains: Sequence[str], fn: str) -> List[str]:
    """The domain names (:func:`chameleon_ext.mixture.check_domain_names`), named after the
    figure function ``fn`` in the message."""
    return check_domain_names(domains, what=f"{fn}: domains")


def as_floats(values, domains: List[str], fn: str, what: str) -> List[float]:
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


def as_square_matrix(matrix, k: int, fn: str, what: str = "affinity") -> List[List[float]]:
    """``matrix`` ([k, k] tensor, array or nested lists) as k rows of k finite floats."""
    rows = matrix.tolist() if hasattr(matrix, "tolist") else matrix
    try:
        out = [[float(v) for v in row] for row in rows]
    except (TypeError, ValueError):
        raise ChameleonUserError(f"{fn}: {what} must be a [k, k] matrix of numbers") from None
    shape = (len(out), *sorted({len(row) for row in out}))
    if shape != (k, k):
        raise ChameleonUserError(f"{fn}: {what} must be [k, k] = [{k}, {k}] (one row per domain), got rows {shape}")
    if not all(math.isfinite(v) for row in out for v in row):
        raise ChameleonUserError(f"{fn}: {what} holds NaN or infinite entries")
    return out
