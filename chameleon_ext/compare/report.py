"""What a comparison writes: the ledger, the plot, the table header, the planned budget."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from .. import io
from ..errors import ChameleonUserError
from ..compare_stats import ComputeLedger
from ..plots import plot_comparison
from .config import CompareConfig


def ledger_of(entries: Sequence[dict]) -> ComputeLedger:
    return ComputeLedger.from_dict({"entries": list(entries)})


def write_outputs(out: str, stem: str, doc: dict, md: str, stats, ledger, title: str, plots: bool) -> dict:
    paths = {"json": io.write_json(os.path.join(out, stem + ".json"), doc, "comparison"),
             "md": io.write_text(os.path.join(out, stem + ".md"), md, "comparison table")}
    if plots:
        paths["png"] = plot_comparison(stats, ledger, os.path.join(out, stem + ".png"), title)
    return paths


# What compare.json records of each base run.
RUN_KEYS = ("test", "test_loss", "tokens", "init_sha256", "data_seed", "init_seed", "evaluation", "steps")


def compare_document(cfg: CompareConfig, ds, scenario: str, command: Optional[str], tokens_per_run: int,
                     mixtures: dict, runs: dict, stats, ledger, md: str, **scenario_fields) -> dict:
    """compare.json of one scenario: the settings, the data's fingerprints, each mixture and
    each run, the statistics and the compute ledger, plus the scenario's own fields."""
    return {"format": "chameleon_ext.compare/1", "scenario": scenario, "command": command,
            "config": cfg.to_dict(), **scenario_fields,
            "data_fingerprints": {d: ds.fingerprint(d) for d in ds.domains},
            "seeds": cfg.seed_list, "tokens_per_run": tokens_per_run,
            "evaluation": {"split": "test", "windows": cfg.train.eval_windows, "seed": cfg.eval_seed,
                           "window_tokens": cfg.train.block_size + 1},
            "mixtures": {label: {"weights": m["weights"], "info": m.get("info", {})} for label, m in mixtures.items()},
            "runs": {label: {str(s): {k: r[k] for k in RUN_KEYS} for s, r in by.items()} for label, by in runs.items()},
            "stats": stats.as_dict(), "compute": ledger.to_dict(), "table": md}


def table_header(cfg: CompareConfig, title: str, domains: Sequence[str], tokens: int) -> str:
    accum = f" x {cfg.train.grad_accum}" if cfg.train.grad_accum > 1 else ""
    return (f"# {title}\n\n"
            f"Every base run: {cfg.preset} model, {tokens:,} training tokens "
            f"({tokens // cfg.tokens(1)} steps x {cfg.train.batch_size}{accum} x {cfg.train.block_size}), "
            f"seeds {cfg.seed_list} (the seed sets initialisation and data order for every mixture alike). "
            f"Perplexity on the held-out **test** split ({cfg.train.eval_windows} windows of {cfg.train.block_size + 1} "
            f"tokens per domain, evaluation seed {cfg.eval_seed}, the same windows for every run); no "
            f"method saw the test split (RegMix is fitted on validation loss). Domains: "
            f"{', '.join(domains)}.\n\n")


def plan_steps(cfg: CompareConfig, mixtures: Sequence[str], extra: int = 0) -> int:
    per = {"chameleon": cfg.proxy_steps, "chameleon-paper": cfg.proxy_steps, "doremi": 2 * cfg.proxy_steps,
           "regmix": cfg.regmix_proxies * cfg.regmix_steps}
    return sum(per.get(m, 0) for m in mixtures) + extra + len(mixtures) * cfg.seeds * cfg.train.steps


def say_budget(cfg: CompareConfig, say, total_steps: int, what: str) -> None:
    tok = cfg.tokens(1)
    say(f"budget ({what}): {cfg.preset} models, {cfg.train.block_size}-token blocks, batch {cfg.train.batch_size}; "
        f"base runs {len(cfg.mixtures)} mixtures x {cfg.seeds} seeds x {cfg.train.steps} steps "
        f"({cfg.tokens_per_run:,} tokens each); proxies {cfg.proxy_steps} steps; RegMix "
        f"{cfg.regmix_proxies} x {cfg.regmix_steps} steps; {total_steps:,} training steps "
        f"({total_steps * tok:,} tokens) in all, before skipping finished units")


def check_collapsed(mixtures: dict, cfg: CompareConfig, tokens: int, say) -> dict:
    """``{label: {"domain", "weight"}}`` of the mixtures with one domain above the collapse
    threshold, each announced with its tokens per domain; ``cfg.strict`` stops here instead."""
    from ..uncertainty import COLLAPSED_WEIGHT, collapse_lines
    from ..weights import DEFAULT_RULE

    out = {}
    default = mixtures.get("chameleon")
    for label, m in mixtures.items():
        fix = None
        if label == "chameleon-paper" and default is not None:  # the default rule on the same proxy's data
            fix = (f"the chameleon mixture in this table (the default {DEFAULT_RULE} rule) puts at most "
                   f"{max(default['weights'].values()):.3f} on one domain")
        lines = collapse_lines(m["weights"], tokens, fix, f"mixture {label!r}")
        if lines:
            top = max(m["weights"], key=m["weights"].get)
            out[label] = {"domain": top, "weight": float(m["weights"][top])}
            for line in lines:
                say(line)
    if out and cfg.strict:
        raise ChameleonUserError(f"--strict: collapsed mixture(s) {sorted(out)} (one domain > {COLLAPSED_WEIGHT}); "
                                 "not training on them")
    return out


def collapsed_note(collapsed: dict) -> str:
    """The line under a table that marks its collapsed mixtures (empty when there are none)."""
    if not collapsed:
        return ""
    items = "; ".join(f"**{label}** ({v['domain']} {v['weight']:.4f})" for label, v in collapsed.items())
    return f"\nCOLLAPSED mixtures (one domain above 0.9 of the data): {items}.\n"
