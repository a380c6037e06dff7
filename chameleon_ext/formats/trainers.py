"""Mixture files of OLMo-core, nanotron and Mosaic Streaming (and TorchTitan, below).

Each is a pure function of the weights (checked, or a token-budget plan's achievable weights:
:func:`chameleon_ext.formats.weights_json.budget_weights`), optional per-domain paths
(:mod:`chameleon_ext.formats.paths`) and, for OLMo-core, the repetition cap.
"""

from __future__ import annotations

from typing import List, Mapping, Optional

from .paths import Prefixes, distinct, paths_of, resolved
from .text import dump_yaml
from .weights_json import budget_field, budget_weights

__all__ = [
    "olmo_source_mixture",
    "olmo_source_mixture_yaml",
    "olmo_mixing_specs",
    "olmo_mixing_specs_yaml",
    "nanotron_dataset",
    "nanotron_dataset_yaml",
    "mosaic_streams",
    "mosaic_streams_yaml",
]


# -- OLMo-core -------------------------------------------------------------------------------


def olmo_source_mixture(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None,
                        max_epochs: Optional[float] = None) -> dict:
    """OLMo-core's ``SourceMixtureList``: ``{"sources": [{source_name, target_ratio, paths,
    max_repetition_ratio[, max_source_fraction]}, ...]}``.

    ``target_ratio`` are the weights (achievable ones with a budget). ``max_repetition_ratio``
    is the repetition cap: ``max_epochs`` (or the budget's), and OLMo-core needs it >= 1, so a
    cap r < 1 is written as ``max_repetition_ratio: 1.0, max_source_fraction: r`` (OLMo-core
    allows ``population x fraction x ratio`` tokens, the same limit). Without a cap but with a
    budget, each source gets the repetition its target needs (its epochs, at least 1), so
    OLMo-core does not refuse the mixture; with neither, the key is left out (OLMo-core's default
    1.0 then allows no repetition).
    """
    fmt = "olmo-core"
    weights = budget_weights(weights, budget, fmt)
    if max_epochs is None and budget is not None:
        max_epochs = budget_field(budget, "max_epochs")
    epochs = budget_field(budget, "epochs") if budget is not None else None
    sources = []
    for domain, weight in weights.items():
        entry = {"source_name": domain, "target_ratio": float(weight), "paths": paths_of(domain, prefixes, fmt)}
        if max_epochs is not None:
            r = float(max_epochs)
            entry["max_repetition_ratio"] = max(r, 1.0)
            if r < 1.0:
                entry["max_source_fraction"] = r
        elif epochs is not None:
            entry["max_repetition_ratio"] = max(1.0, float(epochs[domain]))
        sources.append(entry)
    return {"sources": sources}


def olmo_source_mixture_yaml(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None,
                             max_epochs: Optional[float] = None) -> str:
    """:func:`olmo_source_mixture` as YAML (``sources:`` list), with the budget in a comment."""
    doc = olmo_source_mixture(weights, prefixes, budget, max_epochs)
    lines = ["OLMo-core source mixture from chameleon_ext: the 'sources' of a SourceMixtureList,",
             "for SourceMixtureDatasetConfig(source_list=..., requested_tokens=..., global_batch_size=...)."]
    if budget is not None:
        lines.append(f"requested_tokens: {int(budget_field(budget, 'token_budget'))}")
    return dump_yaml(doc, lines)


def olmo_mixing_specs(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None,
                      max_epochs: Optional[float] = None) -> dict:
    """OLMo-core's composable mixing API (``olmo_core.data.composable``): per source the
    ``ratio``, ``max_repetition_factor`` and ``label`` of a ``MixingTokenSourceSpecConfig`` /
    ``MixingInstanceSourceSpecConfig`` / ``MixingDocumentSourceSpecConfig``, and the ``paths``
    its ``source`` config (the user's, e.g. a ``NumpyDocumentSourceConfig``) reads:
    ``{"specs": [{label, ratio, max_repetition_factor, paths}, ...], "left_out": [...]}``.

    These specs refuse a ratio <= 0, so zero-weight domains are listed under ``left_out``.
    ``max_repetition_factor`` (>= 1: 2.0 lets each item be seen twice) is the cap as in
    :func:`olmo_source_mixture`; a cap r < 1 has no fraction here and is written as 1.0, which
    the achievable ratios already respect (they ask at most r of a domain)."""
    sources = olmo_source_mixture(weights, prefixes, budget, max_epochs)["sources"]
    specs = [{"label": s["source_name"], "ratio": s["target_ratio"],
              "max_repetition_factor": s.get("max_repetition_ratio", 1.0), "paths": s["paths"]}
             for s in sources if s["target_ratio"] > 0]
    return {"specs": specs, "left_out": [s["source_name"] for s in sources if not s["target_ratio"] > 0]}


def olmo_mixing_specs_yaml(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None) -> str:
    """:func:`olmo_mixing_specs` as YAML, with how to build the specs in a comment."""
    lines = ["OLMo-core composable mixing specs from chameleon_ext (olmo_core.data.composable):",
             "MixingTokenSourceConfig(source_specs=[MixingTokenSourceSpecConfig(source=<a source config over",
             "s['paths']>, ratio=s['ratio'], max_repetition_factor=s['max_repetition_factor'], label=s['label'])",
             "for s in specs]); MixingInstanceSourceConfig / MixingDocumentSourceConfig take the same fields."]
    if budget is not None:
        lines.append(f"num_tokens: {int(budget_field(budget, 'token_budget'))}")
    return dump_yaml(olmo_mixing_specs(weights, prefixes, budget), lines)


# -- nanotron --------------------------------------------------------------------------------


def nanotron_dataset(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None) -> dict:
    """nanotron's ``NanosetDatasetsArgs``: ``{"dataset_folder": [folders], "dataset_weights":
    [weights]}`` (the block under ``data_stages[*].data.dataset`` of a nanotron config)."""
    fmt = "nanotron"
    weights = budget_weights(weights, budget, fmt)
    folders = resolved(weights, prefixes, fmt)
    distinct(folders, fmt)
    return {"dataset_folder": list(folders.values()), "dataset_weights": [float(w) for w in weights.values()]}


def nanotron_dataset_yaml(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None) -> str:
    doc = {"dataset": nanotron_dataset(weights, prefixes, budget)}
    return dump_yaml(doc, ["nanotron Nanoset mixture from chameleon_ext: paste under data_stages[*].data"])


# -- Mosaic Streaming ------------------------------------------------------------------------


def mosaic_streams(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None) -> List[dict]:
    """Keyword arguments of one ``streaming.Stream`` per domain, in order: ``{"remote": url}``
    for a path with a scheme (``s3://...``), else ``{"local": path}``, plus ``"proportion"``.
    Every stream has a proportion (Mosaic requires all streams relative or none) and the
    proportions sum to 1 (Mosaic normalises them anyway)."""
    fmt = "mosaic"
    weights = budget_weights(weights, budget, fmt)
    paths = resolved(weights, prefixes, fmt)
    distinct(paths, fmt)
    streams = []
    for domain, weight in weights.items():
        key = "remote" if "://" in paths[domain] else "local"
        streams.append({key: paths[domain], "proportion": float(weight)})
    return streams


def mosaic_streams_yaml(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None) -> str:
    """``streams:`` mapping each domain to its Stream arguments (the layout LLM Foundry's
    ``train_loader.dataset.streams`` uses)."""
    streams = mosaic_streams(weights, prefixes, budget)
    doc = {"streams": dict(zip(budget_weights(weights, budget, "mosaic"), streams))}
    return dump_yaml(doc, ["Mosaic Streaming streams from chameleon_ext:",
                           "StreamingDataset(streams=[Stream(**kw) for kw in streams.values()])"])
