"""A plain YAML mixture (``mixture: [{name, weight}, ...]``) for config-driven trainers."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import yaml

from ..errors import ChameleonUserError
from .text import dump_yaml
from ..mixture import check_named_weights, check_weight_map

__all__ = ["META_KEYS", "mixture_yaml", "parse_mixture_yaml"]

# Metadata copied from a weights file into the ``chameleon:`` block of mixture.yaml.
META_KEYS = ("mode", "lambda", "temperature", "normalize")


def _mixture_doc(weights: Mapping[str, float], meta: Optional[Mapping]) -> dict:
    weights = check_weight_map(weights, what="mixture_yaml", relative=True)
    doc: dict = {"mixture": [{"name": d, "weight": w} for d, w in weights.items()]}
    if meta:
        chameleon = {key: meta[key] for key in META_KEYS if key in meta}
        for key, value in chameleon.items():
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise ChameleonUserError(f"mixture_yaml: meta[{key!r}] must be a scalar, got {type(value).__name__}")
        budget = meta.get("budget")
        if isinstance(budget, Mapping):
            # The weights above are then the budget's achievable ones: say under which budget.
            chameleon["token_budget"] = budget.get("token_budget")
            chameleon["max_epochs"] = budget.get("max_epochs")
        if chameleon:
            doc["chameleon"] = chameleon
    return doc


def mixture_yaml(weights: Mapping[str, float], meta: Optional[Mapping] = None) -> str:
    """A YAML mixture, domains in the order of ``weights``::

        mixture:
          - name: web
            weight: 0.31
          ...
        chameleon:
          mode: pretrain
          lambda: 10.0
          temperature: 5.0

    ``meta`` may be a whole weights.json dict: only ``mode``, ``lambda``, ``temperature`` and
    ``normalize`` are copied under ``chameleon:``.
    """
    doc = _mixture_doc(weights, meta)

    return dump_yaml(doc)


def parse_mixture_yaml(text: str) -> Dict[str, float]:
    """Inverse of :func:`mixture_yaml`: YAML text -> ``{name: weight}`` in file order."""
    if not isinstance(text, str):
        raise ChameleonUserError(f"mixture YAML must be a string, got {type(text).__name__}")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ChameleonUserError(f"mixture YAML is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict) or "mixture" not in doc:
        raise ChameleonUserError("mixture YAML has no top-level 'mixture' list")
    entries = doc["mixture"]
    if not isinstance(entries, list) or not entries:
        raise ChameleonUserError("mixture YAML: 'mixture' must be a non-empty list of {name, weight} entries")
    names: List[str] = []
    weights: List[float] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "weight" not in entry:
            raise ChameleonUserError(f"mixture YAML: entry {i} must have 'name' and 'weight', got {entry!r}")
        names.append(str(entry["name"]))
        weights.append(_weight(entry["weight"]))
    return check_named_weights(names, weights, what="mixture YAML", relative=True)


def _weight(raw):
    """A weight as read: a string that reads as a number becomes one ('1e-05' is not a float in
    YAML 1.1, so it comes back as a string); anything else is left for the check to name."""
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            return raw
    return raw
