"""Figures of a Chameleon run, by kind: the weights and the affinity (:mod:`.weights`), their
bootstrap intervals and lambda sweeps (:mod:`.uncertainty`), trained models' perplexity and a
mixture comparison (:mod:`.perplexity`), and a mixture schedule (:mod:`.schedule`). The
drawing API they share (a figure on an Agg canvas, an atomic PNG writer, the input checks) is
:mod:`.canvas`.

Importing this package never imports matplotlib: each figure function imports it when it
draws, and warns and returns None when it is missing.
"""

from __future__ import annotations

from .canvas import new_figure, save_png
from .perplexity import plot_comparison, plot_perplexity
from .schedule import plot_schedule
from .uncertainty import plot_bootstrap, plot_sweep, plot_weight_intervals
from .weights import plot_affinity, plot_weights

__all__ = ["plot_weights", "plot_affinity", "plot_weight_intervals", "plot_bootstrap", "plot_sweep",
           "plot_perplexity", "plot_comparison", "plot_schedule", "new_figure", "save_png"]
