"""What a comparison writes: the ledger, the plot, the table header, the planned budget."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from .. import io
from ..compare_stats import AVERAGE, ComputeLedger
from .config import CompareConfig


def ledger_of(entries: Sequence[dict]) -> ComputeLedger:
    return ComputeLedger.from_dict({"entries": list(entries)})


def plot_comparison(stats, ledger: ComputeLedger, path: str, title: str) -> Optional[str]:
    """Per-domain bars with error bars (95% intervals), and the average perplexity against the
    mixture's cost on a log axis (a free mixture is drawn at the axis' left edge)."""
    from ..plots import _new_figure, _save_png

    doms = list(stats.domains) + [AVERAGE]
    mixes = list(stats.mixtures)
    fig = _new_figure((max(9.0, 1.2 * len(doms) + 6.0), 4.8), "compare", path)
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
        iv = stats.mixtures[m].perplexity[AVERAGE]
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
    return _save_png(fig, path)


def write_outputs(out: str, stem: str, doc: dict, md: str, stats, ledger, title: str, plots: bool) -> dict:
    paths = {"json": io.write_json(os.path.join(out, stem + ".json"), doc, "comparison"),
             "md": io.write_text(os.path.join(out, stem + ".md"), md, "comparison table")}
    if plots:
        paths["png"] = plot_comparison(stats, ledger, os.path.join(out, stem + ".png"), title)
    return paths


def table_header(cfg: CompareConfig, title: str, domains: Sequence[str], tokens: int) -> str:
    return (f"# {title}\n\n"
            f"Every base run: {cfg.preset} model, {tokens:,} training tokens "
            f"({tokens // (cfg.batch_size * cfg.block_size)} steps x {cfg.batch_size} x {cfg.block_size}), "
            f"seeds {cfg.seed_list} (the seed sets initialisation and data order for every mixture alike). "
            f"Perplexity on the held-out **test** split ({cfg.eval_windows} windows of {cfg.block_size + 1} "
            f"tokens per domain, evaluation seed {cfg.eval_seed}, the same windows for every run); no "
            f"method saw the test split (RegMix is fitted on validation loss). Domains: "
            f"{', '.join(domains)}.\n\n")


def plan_steps(cfg: CompareConfig, mixtures: Sequence[str], extra: int = 0) -> int:
    per = {"chameleon": cfg.proxy_steps, "doremi": 2 * cfg.proxy_steps,
           "regmix": cfg.regmix_proxies * cfg.regmix_steps}
    return sum(per.get(m, 0) for m in mixtures) + extra + len(mixtures) * cfg.seeds * cfg.steps


def say_budget(cfg: CompareConfig, say, total_steps: int, what: str) -> None:
    tok = cfg.batch_size * cfg.block_size
    say(f"budget ({what}): {cfg.preset} models, {cfg.block_size}-token blocks, batch {cfg.batch_size}; "
        f"base runs {len(cfg.mixtures)} mixtures x {cfg.seeds} seeds x {cfg.steps} steps "
        f"({cfg.tokens_per_run:,} tokens each); proxies {cfg.proxy_steps} steps; RegMix "
        f"{cfg.regmix_proxies} x {cfg.regmix_steps} steps; {total_steps:,} training steps "
        f"({total_steps * tok:,} tokens) in all, before skipping finished units")
