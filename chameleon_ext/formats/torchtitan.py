"""TorchTitan: the mixture as data (JSON) for the two data stacks TorchTitan has had.

* **torchtitan 0.3.0** (the release on PyPI): ``InterleavedHuggingFaceTextDataLoader.Config(
  sources=[HFDataSource(dataset=..., dataset_path=..., weight=...), ...])``. ``dataset`` is a
  name registered in ``torchtitan.hf_datasets.text_datasets.DATASETS`` (its loader and sample
  processor) and ``dataset_path`` the data it loads; the file's ``sources`` are those keyword
  arguments, one per domain, named after the domain (register each domain's loader under its
  name). Each source is packed to ``seq_len`` before interleaving, so the weights are shares of
  tokens.
* **TorchTitan main since 2026-08-19** (the Grain data stack): ``DatasetMixConfig(datasets=(
  WeightedDataset(dataset=<a DatasetConfig>, weight=...), ...))``. The dataset is a config
  object the user builds for each domain's ``path`` (its source, processor and packing), so the
  file's ``datasets`` give ``name``, ``path`` and ``weight`` per domain. Main refuses a weight
  <= 0, so a zero-weight domain is left out there (listed under ``left_out``). Mixing
  unpacked documents weights documents; pack each child before mixing to weight tokens.

Both take relative weights and normalise them. The weights are the achievable ones under a
token budget.
"""

from __future__ import annotations

import json
from typing import Mapping

from .paths import Prefixes, distinct, resolved
from .weights_json import budget_weights

__all__ = ["TORCHTITAN_FORMAT", "torchtitan_mixture", "torchtitan_mixture_json"]

TORCHTITAN_FORMAT = "chameleon_ext.torchtitan/1"


def torchtitan_mixture(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None) -> dict:
    """``{"format", "weights", "sources": [...], "datasets": [...], "left_out": [...]}``:
    ``sources`` are ``HFDataSource`` keyword arguments (torchtitan 0.3.0), ``datasets`` the
    ``name``/``path``/``weight`` of each ``WeightedDataset`` (TorchTitan main)."""
    fmt = "torchtitan"
    weights = budget_weights(weights, budget, fmt)
    paths = resolved(weights, prefixes, fmt)
    distinct(paths, fmt)
    return {
        "format": TORCHTITAN_FORMAT,
        "weights": "achievable under the token budget" if budget is not None else "requested",
        "sources": [{"dataset": d, "dataset_path": paths[d], "weight": float(w)} for d, w in weights.items()],
        "datasets": [{"name": d, "path": paths[d], "weight": float(w)} for d, w in weights.items() if w > 0],
        "left_out": [d for d, w in weights.items() if not w > 0],
    }


def torchtitan_mixture_json(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None) -> str:
    return json.dumps(torchtitan_mixture(weights, prefixes, budget), indent=2, ensure_ascii=False) + "\n"
