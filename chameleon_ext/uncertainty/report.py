"""The terminal tables: bootstrap intervals, sweeps and diagnostics as text."""

from __future__ import annotations

from typing import List

from .batched import windows_label
from .bootstrap import BootstrapResult
from .diagnostics import Diagnostics
from .sweep import SweepResult

__all__ = ["format_bootstrap_table", "format_sweep_table", "format_diagnostics"]


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
    title = f"bootstrap: {result.resamples} resamples of {windows_label(result.n_windows)} windows" + (
        f", seed {result.seed}" if result.seed is not None else ""
    )
    return title + "\n" + _table(head, rows)


def _table(head: List[str], rows: List[List[str]], left: int = 1) -> str:
    """Columns padded to their widest cell; the first ``left`` left-aligned, the rest right."""
    widths = [max(len(r[j]) for r in [head] + rows) for j in range(len(head))]

    def line(row: List[str]) -> str:
        return "  ".join(c.ljust(wd) if j < left else c.rjust(wd) for j, (c, wd) in enumerate(zip(row, widths)))

    return "\n".join(line(r) for r in [head] + rows)


# --------------------------------------------------------------------------------------------
# Sweeps


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


def format_diagnostics(diagnostics: Diagnostics) -> str:
    """Lines for the CLI: the effective dimension, then one line per warning."""
    share = diagnostics.effective_dimension_share
    lines = [
        f"effective dimension sum(S) = {diagnostics.effective_dimension:.3f}"
        + (f" ({100 * share:.1f}% of k - 1)" if share is not None else "")
    ]
    win = diagnostics.windows
    if win is not None:
        widths = ", ".join(f"{windows_label(m)}: {wd:.4f}" for m, wd in zip(win.windows, win.width))
        lines.append(f"weight interval width by windows per domain: {widths}")
    lines += [f"warning [{w['code']}]: {w['message']}" for w in diagnostics.warnings]
    return "\n".join(lines)
