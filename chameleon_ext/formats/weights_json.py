"""The weights.json schema: reading, checking and writing one (docs/method.md, step 6).

A ``weights.json`` holds the per-domain mixture weights alpha (format
``"chameleon_ext.weights/2"``): ``domains`` (list), ``weights``, ``leverage`` (the scores fed
to the softmax) and ``leverage_raw`` (the kernel ridge leverage scores), each ``{domain:
float}``; ``mode``, ``lambda``, ``temperature``, ``normalize`` (bool); ``proxy`` and
``embedding`` (provenance); optionally ``budget``, a token-budget plan
(:meth:`chameleon_ext.budget.BudgetPlan.as_dict`). Format 1 files (no ``format`` key;
``krls``, ``krls_raw`` and ``normalization`` instead) are read and upgraded.

With a ``budget`` block the weights a trainer can follow are the plan's *achievable* weights
(what the repetition cap leaves), not the requested ``weights``: :func:`trainer_weights` is the
one place that decides, and every export and ``chameleon train --weights`` go through it.
"""

from __future__ import annotations

import math
import numbers
import os
from collections import Counter
from typing import Dict, List, Mapping, Sequence, Union

from .. import io
from ..errors import ChameleonUserError

__all__ = [
    "WEIGHTS_FORMAT",
    "SUM_TOLERANCE",
    "BUDGET_TOLERANCE",
    "check_weight_values",
    "check_domains",
    "check_same_domains",
    "upgrade_weights_doc",
    "load_weights",
    "write_weights_json",
    "budget_weights",
    "budget_field",
    "trainer_weights",
]

WEIGHTS_FORMAT = "chameleon_ext.weights/2"
# Format 1 field -> format 2 field (the scores were named like the op that computes them).
_FORMAT1_RENAMES = {"krls": "leverage", "krls_raw": "leverage_raw"}

SUM_TOLERANCE = 1e-6
# A budget block must have been planned for the document's own weights (to rounding).
BUDGET_TOLERANCE = 1e-9
REQUIRED_KEYS = ("domains", "weights")
PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _is_real(value) -> bool:
    # numbers.Real admits numpy scalars; bool is an int subclass, and a ``true`` weight in a
    # JSON file is a mistake, not 1.0.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_weight_values(weights: Mapping[str, float], source: str) -> Dict[str, float]:
    """Every weight a finite number >= 0; returns them as floats in the mapping's order."""
    if not isinstance(weights, Mapping):
        raise ChameleonUserError(f"{source}: weights must be a mapping domain -> weight, got {type(weights).__name__}")
    if len(weights) == 0:
        raise ChameleonUserError(f"{source}: weights is empty (no domains)")
    if isinstance(weights.get("weights"), Mapping):
        raise ChameleonUserError(
            f"{source}: got a whole weights.json document; pass its 'weights' entry (not the whole file)"
        )
    out: Dict[str, float] = {}
    for name, value in weights.items():
        if not isinstance(name, str) or not name:
            raise ChameleonUserError(f"{source}: domain names must be non-empty strings, got {name!r}")
        if not _is_real(value):
            raise ChameleonUserError(f"{source}: weight of domain {name!r} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ChameleonUserError(f"{source}: weight of domain {name!r} is not finite ({value!r})")
        if value < 0:
            raise ChameleonUserError(f"{source}: weight of domain {name!r} is negative ({value!r})")
        out[name] = value
    return out


def check_domains(domains, source: str) -> List[str]:
    """``domains`` must be a list of distinct non-empty strings."""
    if not isinstance(domains, (list, tuple)):
        raise ChameleonUserError(f"{source}: 'domains' must be a list of domain names, got {type(domains).__name__}")
    if len(domains) == 0:
        raise ChameleonUserError(f"{source}: 'domains' is empty")
    for name in domains:
        if not isinstance(name, str) or not name:
            raise ChameleonUserError(f"{source}: 'domains' must hold non-empty strings, got {name!r}")
    duplicates = sorted(d for d, count in Counter(domains).items() if count > 1)
    if duplicates:
        raise ChameleonUserError(f"{source}: 'domains' lists {duplicates} more than once")
    return list(domains)


def check_same_domains(domains: Sequence[str], names: Sequence[str], source: str, what: str) -> None:
    """The set of ``names`` (keys of ``what``) must equal the set of ``domains``."""
    name_set, domain_set = set(names), set(domains)
    missing = [d for d in domains if d not in name_set]
    extra = [n for n in names if n not in domain_set]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"not in domains {extra}")
        raise ChameleonUserError(f"{source}: {what} do not match 'domains' ({'; '.join(parts)})")


def upgrade_weights_doc(doc: dict, source: str) -> dict:
    """A weights document in the current format: format 1 (no ``format`` key) is renamed
    field by field; an unknown format is an error naming the file."""
    fmt = doc.get("format")
    if fmt == WEIGHTS_FORMAT:
        return doc
    if fmt is not None:
        raise ChameleonUserError(f"{source}: unknown weights format {fmt!r} (this version reads {WEIGHTS_FORMAT!r})")
    doc = dict(doc)
    for old, new in _FORMAT1_RENAMES.items():
        if old in doc and new not in doc:
            doc[new] = doc.pop(old)
    doc.pop("normalization", None)  # said the same as the boolean 'normalize'
    doc["format"] = WEIGHTS_FORMAT
    return doc


def load_weights(path_or_dict: Union[PathLike, Mapping]) -> dict:
    """Read and validate a ``weights.json`` (a path) or an already-loaded weights dict.

    Checks that ``domains`` and ``weights`` are present, that ``weights`` has exactly the
    ``domains`` as keys, that every weight is a finite number >= 0 and that they sum to 1
    within 1e-6, and that a ``budget`` block was planned for these weights
    (:func:`budget_weights`). Returns a copy of the document in the current format (format 1 files are
    upgraded) whose ``weights`` are floats ordered as ``domains`` (the contract's order; a
    hand-edited file with shuffled keys is accepted). A file inside an output set with a
    manifest is checked against it (:mod:`chameleon_ext.manifest`).
    Every problem raises :class:`ChameleonUserError` naming the file and what is wrong.
    """
    if isinstance(path_or_dict, Mapping):
        source, doc = "weights dict", dict(path_or_dict)
    elif isinstance(path_or_dict, (str, os.PathLike)):
        from ..manifest import check_member

        source = os.fspath(path_or_dict)
        doc = io.read_json(source, "weights file")
        check_member(source, "weights file")
    else:
        raise ChameleonUserError(
            f"load_weights expects a path to weights.json or a dict, got {type(path_or_dict).__name__}"
        )
    doc = upgrade_weights_doc(doc, source)
    missing = [key for key in REQUIRED_KEYS if key not in doc]
    if missing:
        raise ChameleonUserError(f"{source}: missing required key(s) {missing}")
    domains = check_domains(doc["domains"], source)
    weights = check_weight_values(doc["weights"], source)
    check_same_domains(domains, list(weights), source, "'weights' keys")
    total = math.fsum(weights.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ChameleonUserError(
            f"{source}: weights must sum to 1 (within {SUM_TOLERANCE:g}), got sum {total!r}"
        )
    doc["domains"] = domains
    doc["weights"] = {d: weights[d] for d in domains}
    if doc.get("budget") is not None:
        budget_weights(doc["weights"], doc["budget"], source)  # the plan must be of these weights
    return doc


def budget_weights(weights: Mapping[str, float], budget, source: str = "weights") -> Dict[str, float]:
    """The weights a trainer should follow: ``weights`` checked, or, given a token-budget plan
    (a :class:`~chameleon_ext.budget.BudgetPlan` or its ``as_dict()``, the ``budget`` block of
    weights.json), its achievable weights in the order of ``weights``.

    The plan must belong to these weights: its achievable weights name the same domains and
    sum to 1, and its requested weights (when recorded) equal ``weights`` normalised, to 1e-9.
    Anything else is two inputs disagreeing, and an error naming both."""
    weights = check_weight_values(weights, source)
    if budget is None:
        return weights
    achievable = check_weight_values(budget_field(budget, "achievable_weights"), f"{source}: budget achievable_weights")
    check_same_domains(list(weights), list(achievable), source, "budget achievable_weights")
    total = math.fsum(achievable.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ChameleonUserError(f"{source}: budget achievable_weights must sum to 1, got {total!r}")
    requested = budget_field(budget, "requested_weights", required=False)
    if requested is not None:
        requested = check_weight_values(requested, f"{source}: budget requested_weights")
        check_same_domains(list(weights), list(requested), source, "budget requested_weights")
        scale = math.fsum(weights.values())
        worst = max(weights, key=lambda d: abs(weights[d] / scale - requested[d]))
        if abs(weights[worst] / scale - requested[worst]) > BUDGET_TOLERANCE:
            raise ChameleonUserError(
                f"{source}: the budget was planned for other weights (domain {worst!r}: weights "
                f"{weights[worst]!r}, budget requested_weights {requested[worst]!r}); re-plan the budget")
    return {d: achievable[d] for d in weights}


def budget_field(budget, name: str, required: bool = True):
    if isinstance(budget, Mapping):
        if name not in budget:
            if not required:
                return None
            raise ChameleonUserError(f"budget has no {name!r} entry (expected BudgetPlan.as_dict())")
        return budget[name]
    if hasattr(budget, name):
        return getattr(budget, name)
    if not required:
        return None
    raise ChameleonUserError(f"budget must be a BudgetPlan or its as_dict(), got {type(budget).__name__}")


def trainer_weights(doc: Mapping) -> Dict[str, float]:
    """The weights a trainer follows for a weights.json document (as :func:`load_weights`
    returns it): its ``weights``, or with a ``budget`` block the budget's achievable weights,
    ordered as ``domains``. Every export and ``chameleon train --weights`` use this."""
    return budget_weights(doc["weights"], doc.get("budget"), "weights.json")


def write_weights_json(path: PathLike, doc: Mapping) -> str:
    """Check ``doc`` as :func:`load_weights` does (a budget must belong to its weights) and
    write it atomically (:func:`chameleon_ext.io.write_json`); returns the path. The document
    is written as given (not reordered), so its provenance fields stay as the caller made them."""
    load_weights(doc)
    return io.write_json(os.fspath(path), dict(doc), "weights file")
