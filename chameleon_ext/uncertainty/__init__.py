"""How far to trust a set of Chameleon weights: bootstrap intervals over the sampled windows,
lambda/temperature sweeps and diagnostics, each from ONE batched ``krls`` call.

By job:

* :mod:`.bootstrap` -- window resamples -> intervals of the weights and leverage, rank
  stability, how many windows are enough; the memory bound checked before allocating;
* :mod:`.sweep` -- weights at every (lambda, temperature) pair;
* :mod:`.diagnostics` -- the effective dimension, warnings and their advice, collapse lines;
* :mod:`.report` -- the terminal tables;
* :mod:`.batched` -- the per-window inputs and the batched weight maths the first two share.

The per-window embedding cache entries these read live in :mod:`chameleon_ext.embed_cache`.
Every public name is importable from here.
"""

from __future__ import annotations

from ..errors import ChameleonUserError
from .bootstrap import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    WINDOW_FRACTIONS,
    BootstrapResult,
    WindowSufficiency,
    bootstrap_bytes,
    bootstrap_weights,
    check_bootstrap_memory,
    resample_counts,
)
from .diagnostics import (
    COLLAPSED_WEIGHT,
    Diagnostics,
    collapse_fix,
    collapse_lines,
    diagnose,
    suggest_lambda,
)
from .report import format_bootstrap_table, format_diagnostics, format_sweep_table
from .sweep import DEFAULT_SWEEP_LAMBDAS, SweepResult, sweep_weights, sweep_weights_from_affinity

__all__ = [
    "DEFAULT_RESAMPLES",
    "DEFAULT_SWEEP_LAMBDAS",
    "DEFAULT_LEVEL",
    "WINDOW_FRACTIONS",
    "COLLAPSED_WEIGHT",
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
]
