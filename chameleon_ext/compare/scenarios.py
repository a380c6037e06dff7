"""The scenarios (``pretrain``, ``new_domains``, ``finetune``) and :func:`run_compare`."""

from __future__ import annotations

import os
from typing import List, Optional

from .. import io
from ..compare_stats import compare_perplexities, format_comparison_table, non_embedding_parameters, FORWARD, TRAIN
from ..errors import ChameleonUserError
from ..progress import Progress
from .callbacks import DoReMiLoss
from ..data.view import DatasetView
from .config import (CHAMELEON_RULES, METHODS, OUTPUT_STEM, CompareConfig, changed_settings, default_settings,
                     pinned_extras, pinned_settings, rule_of)
from .records import digest, ledger_entry
from .report import check_collapsed, collapsed_note, compare_document, ledger_of, plan_steps, say_budget, table_header, write_outputs
from .units import Comparison


def run_compare(dataset, cfg: CompareConfig, out: str, say=print, plots: bool = True,
                command: Optional[str] = None) -> dict:
    """Run the comparison of ``cfg`` on ``dataset`` (loaded with a test split) into ``out``.
    Returns the document written to ``compare*.json``."""
    out = os.fspath(out)
    io.check_writable_folder(out, "--out")
    settings_path = os.path.join(out, "compare_settings.json")
    mine = cfg.settings(pinned_settings(cfg), pinned_extras(cfg))
    saved = io.read_json_or_none(settings_path) or {}
    changed = changed_settings(saved, cfg)
    if changed:
        defaults = default_settings(cfg)
        raise ChameleonUserError(
            f"--out {out!r} holds a comparison made with other settings ({', '.join(changed)}: "
            f"{[saved.get(k, defaults.get(k)) for k in changed]} there, {[cfg.setting(k) for k in changed]} now); "
            "use a new --out or the same settings")
    # The data may change between runs: each unit's record names the data fingerprints it was
    # computed from, and a unit whose data changed is recomputed (said per unit), so what the
    # settings file states about the data is true of every unit the new tables use.
    data = {d: dataset.fingerprint(d) for d in dataset.domains}
    before = saved.get("dataset") or {}
    moved = [d for d in data if d in before and before[d] != data[d]]
    if moved:
        say(f"note: the data of domain(s) {moved} changed since the last comparison in {out}: every unit "
            "computed from the old data is recomputed (units of unchanged data are reused)")
    # The data fingerprints are written once the tables built from that data are: a run killed
    # before then leaves the file naming the data of the last finished tables.
    io.write_json(settings_path, {**saved, **mine}, "comparison settings")
    c = Comparison(dataset, cfg, out, say)
    run = finetune_scenario if cfg.scenario == "finetune" else pretrain_scenario
    doc = run(c, dataset, cfg, out, say, plots, command)
    io.write_json(settings_path, {**saved, **mine, "dataset": {**before, **data}}, "comparison settings")
    return doc


def pretrain_scenario(c: Comparison, ds, cfg: CompareConfig, out: str, say, plots: bool, command) -> dict:
    new = list(cfg.new_domains) if cfg.scenario == "new_domains" else []
    unknown = [d for d in new if d not in ds.domains]
    if unknown:
        raise ChameleonUserError(f"--new-domains: {unknown} are not domains of the data ({ds.domains})")
    if new and len(new) >= len(ds.domains):
        raise ChameleonUserError("--new-domains: at least one domain must stay old")
    old = [d for d in ds.domains if d not in new]
    full = DatasetView(ds)
    extra = cfg.proxy_steps * sum(m in CHAMELEON_RULES for m in cfg.mixtures) if new else 0
    total = plan_steps(cfg, cfg.mixtures, extra)
    say_budget(cfg, say, total, cfg.scenario)
    c.progress = Progress(total, desc="compare", unit="step", enabled=not cfg.train.quiet, plain_every=0.05)
    try:
        say(f"[1/2] mixtures: {', '.join(cfg.mixtures)}" + (f" (new domains: {', '.join(new)})" if new else ""))
        mixtures, absorb = {}, {}
        for name in cfg.mixtures:
            label = name if name in METHODS else file_label(name)
            if new and name in CHAMELEON_RULES:
                mixtures[label], absorb[label] = chameleon_transfer(c, ds, old, new, name)
            else:
                mixtures[label] = c.build_mixture(name, full)
                if new:  # every other method simply rebuilds on all domains
                    absorb[label] = ledger_of([as_method(e, label) for e in mixtures[label]["entries"]])
        collapsed = check_collapsed(mixtures, cfg, cfg.tokens_per_run, say)
        say(f"[2/2] base runs: {len(mixtures)} mixtures x seeds {cfg.seed_list}, {cfg.train.steps} steps each")
        runs = {label: {s: c.base_run(label, m["weights"], s, ds, cfg.train.steps) for s in cfg.seed_list}
                for label, m in mixtures.items()}
    finally:
        c.progress.close()
    results = {label: {str(s): r["test"] for s, r in by.items()} for label, by in runs.items()}
    stats = compare_perplexities(results, baseline="uniform" if "uniform" in results else None)
    entries = [as_method(e, label) for label, m in mixtures.items() for e in m["entries"]]
    entries += [e for by in runs.values() for r in by.values() for e in r["entries"]]
    ledger = ledger_of(entries)
    title = ("Pretraining: test perplexity by mixture" if not new else
             f"New domains ({', '.join(new)}): test perplexity by mixture")
    md = table_header(cfg, title, ds.domains, cfg.tokens_per_run) + format_comparison_table(stats, ledger)
    md += collapsed_note(collapsed)
    if new:
        md += ("\nExtra compute each method spent to absorb the new domains (Chameleon: embedding "
               "them with its frozen proxy, the other domains' embeddings from the cache; DoReMi "
               "and RegMix: retraining every proxy on all domains; uniform, natural, online: none):\n\n"
               "| mixture | extra FLOPs | extra wall s |\n|---|---:|---:|\n")
        for label in mixtures:
            led = absorb.get(label)
            md += (f"| {label} | {led.flops():.3g} | {led.wall_s():.1f} |\n" if led is not None
                   else f"| {label} | 0 | 0 |\n")
    if command:
        md += f"\nCommand: `{command}`\n"
    doc = compare_document(cfg, ds, cfg.scenario, command, cfg.tokens_per_run, mixtures, runs, stats, ledger, md,
                           domains=list(ds.domains), new_domains=new,
                           absorb_new_domains={k: v.to_dict() for k, v in absorb.items()} if new else None,
                           collapsed=collapsed)
    paths = write_outputs(out, OUTPUT_STEM[cfg.scenario], doc, md, stats, ledger, title, plots)
    say("\n" + md)
    say("wrote " + ", ".join(p for p in paths.values() if p))
    return doc


def file_label(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    if base == "weights.json":
        return os.path.basename(os.path.dirname(os.path.abspath(path))) or "weights"
    return os.path.splitext(base)[0]


def as_method(entry: dict, method: str) -> dict:
    return {**entry, "method": method}


def chameleon_transfer(c: Comparison, ds, old: List[str], new: List[str], method: str = "chameleon"):
    """Chameleon in the new-domains scenario: the proxy trained and the embeddings computed on
    the old domains only; then the new domains embedded with the frozen proxy (transfer mode),
    the old ones read from the embedding cache. Returns (mixture, ledger of the extra cost)."""
    old_view = DatasetView(ds, old)
    base = c.build_mixture(method, old_view)  # what existed before the new domains came
    unit = f"mixture-{method}-transfer-{digest([old, new])}"
    path = base["info"]["proxy"]

    def build(key):
        from ..pipeline import load_proxy

        proxy = load_proxy(path, device="cpu")
        weights, entry = c.chameleon_weights(DatasetView(ds), proxy, path, os.path.join(
            c.out, "mixtures", key, "weights"), "transfer", new, method)
        return {"weights": weights, "entries": [entry], "info": {"proxy": path, "mode": "transfer",
                                                                  "new_domains": new, "rule": rule_of(method)}}

    provenance = c.provenance(DatasetView(ds), "chameleon", proxy_sha256=c.model_hash(path), rule=rule_of(method))
    rec = c.unit(unit, f"{method} transfer to {', '.join(new)}", provenance, build)
    mixture = {"weights": rec["weights"], "entries": base["entries"] + rec["entries"], "info": rec["info"]}
    return mixture, ledger_of(rec["entries"])


FINETUNE_METHODS = ("uniform", "natural", "chameleon", "chameleon-paper", "doremi")


def finetune_scenario(c: Comparison, ds, cfg: CompareConfig, out: str, say, plots: bool, command) -> dict:
    """The finetuning scenario (module doc): one start model, finetuned per mixture and seed."""
    from ..model import load_model

    if cfg.finetune_from:
        fdoms = list(cfg.finetune_domains or ds.domains)
    else:
        fdoms = list(cfg.finetune_domains)
    unknown = [d for d in fdoms if d not in ds.domains]
    if unknown:
        raise ChameleonUserError(f"--finetune-domains: {unknown} are not domains of the data ({ds.domains})")
    pre = [d for d in ds.domains if d not in fdoms]
    if not cfg.finetune_from and not pre:
        raise ChameleonUserError("--finetune-domains: leave at least one domain to pretrain the base model on "
                                 "(or give --finetune-from)")
    skipped = [m for m in cfg.mixtures if m in METHODS and m not in FINETUNE_METHODS]
    mixes = [m for m in cfg.mixtures if m not in skipped]
    if "uniform" not in mixes:
        mixes.insert(0, "uniform")
    if len(fdoms) == 2 and any(m in CHAMELEON_RULES for m in mixes):
        say("note: with 2 finetuning domains both always have the same leverage, so Chameleon's "
            "finetuning weights are uniform; use 3 or more domains to tell them apart")
    fview = DatasetView(ds, fdoms)
    scored = DatasetView(ds, fdoms, hide_test=False)
    total = (0 if cfg.finetune_from else cfg.train.steps) + len(mixes) * cfg.seeds * cfg.finetune_steps
    total += (2 * cfg.finetune_steps) if "doremi" in mixes else 0
    start_text = "given" if cfg.finetune_from else f"pretrained here ({cfg.train.steps} steps, uniform over {pre})"
    say(f"budget (finetune): start model {start_text}; "
        f"{len(mixes)} mixtures x {cfg.seeds} seeds x {cfg.finetune_steps} finetuning steps "
        f"({cfg.tokens(cfg.finetune_steps):,} tokens each) on {fdoms}; {total:,} training steps in all"
        + (f"; not part of this scenario: {skipped}" if skipped else ""))
    c.progress = Progress(total, desc="compare", unit="step", enabled=not cfg.train.quiet, plain_every=0.05)
    shared = []
    try:
        if cfg.finetune_from:
            start = os.path.abspath(cfg.finetune_from)
            load_model(start)  # verified now, not after the first mixture
        else:
            rec = c.base_run("uniform", {d: 1.0 / len(pre) for d in pre}, cfg.train.seed, DatasetView(ds, pre, hide_test=False),
                             cfg.train.steps, tag="start")
            start = os.path.join(c.out, "runs", rec["key"], "model.pt")
            shared = [as_method(e, "start model (shared)") for e in rec["entries"]]
        say(f"[1/2] finetuning mixtures: {', '.join(mixes)} on {', '.join(fdoms)}")
        mixtures = {}
        for name in mixes:
            label = name if name in METHODS else file_label(name)
            if name in CHAMELEON_RULES:
                unit = f"finetune-{name}-{digest([start, fdoms])}"
                provenance = c.provenance(fview, "chameleon", init_sha256=c.model_hash(start), rule=rule_of(name))
                mixtures[label] = c.unit(unit, f"{name} finetuning weights", provenance,
                                         lambda key, name=name: chameleon_finetune(c, fview, start, key, name))
            elif name == "doremi":
                unit = f"finetune-doremi-{digest([start, fdoms, cfg.finetune_steps])}"
                provenance = c.provenance(fview, name, init_sha256=c.model_hash(start),
                                          finetune_steps=cfg.finetune_steps)
                mixtures[label] = c.unit(unit, "doremi finetuning weights", provenance,
                                         lambda key: doremi_finetune(c, fview, start, key))
            else:
                mixtures[label] = c.build_mixture(name, fview)
        collapsed = check_collapsed(mixtures, cfg, cfg.tokens(cfg.finetune_steps), say)
        say(f"[2/2] finetuning runs: {len(mixtures)} mixtures x seeds {cfg.seed_list}, {cfg.finetune_steps} steps each")
        runs = {label: {s: c.base_run(label, m["weights"], s, scored, cfg.finetune_steps, init_from=start, tag="finetune")
                        for s in cfg.seed_list} for label, m in mixtures.items()}
    finally:
        c.progress.close()
    results = {label: {str(s): r["test"] for s, r in by.items()} for label, by in runs.items()}
    stats = compare_perplexities(results, baseline="uniform")
    entries = [as_method(e, label) for label, m in mixtures.items() for e in m["entries"]]
    entries += [e for by in runs.values() for r in by.values() for e in r["entries"]] + shared
    ledger = ledger_of(entries)
    improved = {}
    for label, ms in stats.mixtures.items():
        if ms.difference is None:
            continue
        diffs = {d: ms.difference[d] for d in fdoms}
        improved[label] = {"domains": len(fdoms),
                           "improved_mean": sorted(d for d, iv in diffs.items() if iv.mean < 0),
                           "improved_interval": sorted(d for d, iv in diffs.items()
                                                       if iv.high is not None and iv.high < 0),
                           "worse_interval": sorted(d for d, iv in diffs.items()
                                                    if iv.low is not None and iv.low > 0)}
    title = f"Finetuning on {', '.join(fdoms)}: test perplexity by finetuning mixture"
    md = (table_header(cfg, title, fdoms, cfg.tokens(cfg.finetune_steps))
          + f"Every run continues the same start model ({start}).\n\n" + format_comparison_table(stats, ledger))
    md += collapsed_note(collapsed)
    md += "\nFinetuning domains improved over uniform (paired, same seeds):\n\n"
    md += "| mixture | mean lower | 95% interval below 0 | 95% interval above 0 (worse) |\n|---|---:|---:|---:|\n"
    for label, imp in improved.items():
        n = imp["domains"]
        md += (f"| {label} | {len(imp['improved_mean'])} of {n} | {len(imp['improved_interval'])} of {n} | "
               f"{len(imp['worse_interval'])} of {n} |\n")
    if shared:
        md += f"\nThe start model's pretraining (shared by every mixture): {ledger_of(shared).flops():.3g} FLOPs.\n"
    if command:
        md += f"\nCommand: `{command}`\n"
    doc = compare_document(cfg, ds, "finetune", command, cfg.tokens(cfg.finetune_steps), mixtures, runs, stats, ledger,
                           md, domains=fdoms, pretrain_domains=pre, start_model=start, improved=improved,
                           not_in_scenario=skipped, collapsed=collapsed)
    paths = write_outputs(out, OUTPUT_STEM["finetune"], doc, md, stats, ledger, title, plots)
    say("\n" + md)
    say("wrote " + ", ".join(p for p in paths.values() if p))
    return doc


def chameleon_finetune(c: Comparison, fview, start: str, key: str, method: str = "chameleon") -> dict:
    """Chameleon's finetuning weights: the finetuning domains embedded with the start model
    itself as the frozen proxy (no proxy training), leverage-proportional (``mode="finetune"``)."""
    from ..model import load_model

    model = load_model(start)
    weights, entry = c.chameleon_weights(fview, model, start, os.path.join(c.out, "mixtures", key, "weights"),
                                         "finetune", fview.domains, method)
    return {"weights": weights, "entries": [entry], "info": {"proxy": start, "mode": "finetune",
                                                             "rule": rule_of(method)}}


def doremi_finetune(c: Comparison, fview, start: str, key: str) -> dict:
    """DoReMi on the finetuning domains: the reference is the start model finetuned on
    uniform; the Group-DRO proxy is finetuned from the start model too."""
    from ..baselines.doremi import DoReMiObjective, DoReMiWeights

    cfg = c.cfg
    folder = os.path.join(c.out, "mixtures", key)
    ref, wall1 = c.train_model(fview, "uniform", os.path.join(folder, "reference"), cfg.finetune_steps, cfg.train.seed,
                          init_from=start)
    objective = DoReMiObjective(ref, DoReMiWeights(fview.domains), grad_accum=cfg.train.grad_accum)
    proxy, wall2 = c.train_model(fview, "uniform", os.path.join(folder, "proxy"), cfg.finetune_steps, cfg.train.seed,
                            callbacks=[DoReMiLoss(objective)], init_from=start)
    n, tokens = non_embedding_parameters(proxy), cfg.tokens(cfg.finetune_steps)
    entries = [ledger_entry("doremi", "reference finetune", TRAIN, n, tokens, wall1),
               ledger_entry("doremi", "Group-DRO proxy finetune", TRAIN, n, tokens, wall2),
               ledger_entry("doremi", "reference forward on the proxy's batches", FORWARD, n, objective.reference_tokens, 0.0)]
    result = objective.weights.result().as_dict()
    return {"weights": result["weights"], "entries": entries, "steps_planned": 2 * cfg.finetune_steps,
            "info": result}
