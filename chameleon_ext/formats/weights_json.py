"""The weights.json schema: reading, checking and writing one (docs/method.md, step 6).

A ``weights.json`` holds the per-domain mixture weights alpha (format
``"chameleon_ext.weights/2"``): ``domains`` (list), ``weights``, ``leverage`` (the scores fed
to the softmax) and ``leverage_raw`` (the kernel ridge leverage scores), each ``{domain:
float}``; ``mode``, ``lambda``, ``temperature``, ``normalize`` (bool); ``proxy`` and
``embedding`` (provenance); optionally ``budget``, a token-budget plan
(:meth:`chameleon_ext.budget.BudgetPlan.as_dict`). Only this format is read: a file with
another ``format`` (or none) is an error naming the file.

With a ``budget`` block the weights a trainer can follow are the plan's *achievable* weights
(what the repetition cap leaves), not the requested ``weights``: :func:`trainer_weights` is the
one place that decides, and every export and ``chameleon train --weights`` go through it.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Mapping, Union

from .. import io
from ..errors import ChameleonUserError
from ..manifest import check_member
from ..mixture import WEIGHT_SUM_TOLERANCE, check_domain_names, check_weight_map

__all__ = [
    "WEIGHTS_FORMAT",
    "SUM_TOLERANCE",
    "BUDGET_TOLERANCE",
    "load_weights",
    "write_weights_json",
    "budget_weights",
    "budget_field",
    "trainer_weights",
]

WEIGHTS_FORMAT = "chameleon_ext.weights/2"

SUM_TOLERANCE = WEIGHT_SUM_TOLERANCE  # the one tolerance (chameleon_ext.mixture)
# A budget block must have been planned for the document's own weights (to rounding).
BUDGET_TOLERANCE = 1e-9
REQUIRED_KEYS = ("domains", "weights")
PathLike = Union[str, "os.PathLike[str]"]


def load_weights(path_or_dict: Union[PathLike, Mapping]) -> dict:
    """Read and validate a ``weights.json`` (a path) or an already-loaded weights dict.

    Checks that ``domains`` and ``weights`` are present, that ``weights`` has exactly the
    ``domains`` as keys, that every weight is a finite number >= 0 and that they sum to 1
    within :data:`SUM_TOLERANCE` (1e-9), and that a ``budget`` block was planned for these weights
    (:func:`budget_weights`). Returns a copy of the document whose ``weights`` are floats ordered as ``domains`` (the contract's order; a
    hand-edited file with shuffled keys is accepted). A file inside an output set with a
    manifest is checked against it (:mod:`chameleon_ext.manifest`).
    Every problem raises :class:`ChameleonUserError` naming the file and what is wrong.
    """
    if isinstance(path_or_dict, Mapping):
        source, doc = "weights dict", dict(path_or_dict)
    elif isinstance(path_or_dict, (str, os.PathLike)):
        source = os.fspath(path_or_dict)
        doc = io.read_json(source, "weights file")
        check_member(source, "weights file")
    else:
        raise ChameleonUserError(
            f"load_weights expects a path to weights.json or a dict, got {type(path_or_dict).__name__}"
        )
    fmt = doc.get("format")
    if fmt != WEIGHTS_FORMAT:
        raise ChameleonUserError(f"{source}: unknown weights format {fmt!r} (this version reads {WEIGHTS_FORMAT!r})")
    missing = [key for key in REQUIRED_KEYS if key not in doc]
    if missing:
        raise ChameleonUserError(f"{source}: missing required key(s) {missing}")
    domains = check_domain_names(doc["domains"], what=f"{source}: 'domains'")
    doc["domains"] = domains
    doc["weights"] = check_weight_map(doc["weights"], domains, f"{source}: 'weights'")
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
    weights = check_weight_map(weights, what=source, relative=True)
    if budget is None:
        return weights
    achievable = check_weight_map(budget_field(budget, "achievable_weights"), list(weights),
                                  f"{source}: budget achievable_weights")
    requested = budget_field(budget, "requested_weights", required=False)
    if requested is not None:
        requested = check_weight_map(requested, list(weights), f"{source}: budget requested_weights")
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
