"""The figure of a mixture schedule: the domain weights over training steps as stacked areas.
Conventions in :mod:`chameleon_ext.plots.canvas`."""

from __future__ import annotations

import os
from typing import List, Optional

from ..errors import ChameleonUserError
from .canvas import PathLike, new_figure, save_png

__all__ = ["plot_schedule"]

MAX_SCHEDULE_LEGEND = 20  # beyond this many domains the legend is left out


def plot_schedule(schedule, path: PathLike, title: Optional[str] = None) -> Optional[str]:
    """Stacked areas of the weights over training steps (piecewise constant), saved as PNG.

    ``schedule`` is a validated :class:`~chameleon_ext.schedule.Schedule` (anything with
    ``domains`` and ``stages()``; load a file or a dict with
    :func:`~chameleon_ext.schedule.load_schedule` / ``validate_schedule`` first). An
    open-ended last stage is drawn as long as the mean earlier stage (at least one step).
    Returns ``path``, or None (with a warning) when matplotlib is missing."""
    fn = "plot_schedule"
    if not (hasattr(schedule, "domains") and callable(getattr(schedule, "stages", None))):
        raise ChameleonUserError(f"{fn}: expected a Schedule (load_schedule / validate_schedule), "
                                 f"got {type(schedule).__name__}")
    path = os.fspath(path)
    domains = list(schedule.domains)
    stages = schedule.stages()
    last = stages[-1]["end_step"]
    if last is None:
        span = stages[-1]["start_step"] / max(1, len(stages) - 1) if len(stages) > 1 else 1
        last = stages[-1]["start_step"] + max(1, int(span))
    xs: List[float] = []
    ys: List[List[float]] = [[] for _ in domains]
    for st in stages:
        end = st["end_step"] if st["end_step"] is not None else last
        for x in (st["start_step"], end):  # two points per stage: a flat step
            xs.append(x)
            for j, d in enumerate(domains):
                ys[j].append(st["weights"][d])
    fig = new_figure((8.0, 4.5), fn, path)
    if fig is None:
        return None
    ax = fig.subplots()
    ax.stackplot(xs, ys, labels=domains)
    ax.set_xlim(0, last)
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("mixture weight (stacked)")
    if len(domains) <= MAX_SCHEDULE_LEGEND:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    ax.set_title(title or f"mixture schedule ({len(stages)} stage{'s' if len(stages) != 1 else ''})")
    return save_png(fig, path)
