"""The mixture vocabulary and its checks, in one place.

A *mixture* is a list of k domain names and a weight vector over them. Everything that
accepts or produces one (the weight maths, the pipeline, the exports, the baselines, the
command line) checks its inputs with the functions here, so one kind of bad input gets one
message wherever it comes in. Every check raises :class:`~chameleon_ext.errors.ChameleonUserError`
(a ``ValueError``) naming the argument and what was expected. Pure Python: importing this
module loads neither torch nor the compiled ops.

Vocabulary
    MODES
        ``"pretrain"`` (shared structure up-weighted: the weight falls with the leverage) and
        ``"finetune"`` (distinctive domains up-weighted: the weight rises with the leverage):
        the two directions of the weight rule, what the weight maths, online Chameleon and
        ``chameleon train --mode`` take.
    PIPELINE_MODES
        :data:`MODES` and ``"transfer"`` (new domains, frozen proxy, the pretraining rule), what
        ``chameleon weights``, ``run`` and ``sweep --mode`` take; :func:`rule_of_mode` gives a
        pipeline mode's direction. Every command takes its choices from these two.
    RULES
        How leverage scores S~ (normalised to sum 1) become weights (docs/method.md, "Rules"):

        * ``"paper"``: the paper's softmax, pretrain softmax(1 / ((S~ + 1e-12) T)), finetune
          softmax(S~ / T), with the paper's constants lambda = 10, T = 5 / 0.2, no smoothing.
          ``rule="paper"`` with nothing else set is the faithful method (golden vectors).
        * ``"power"``: w ∝ S~^(-1/T) (pretrain), S~^(1/T) (finetune): the ratio of two
          weights is the ratio of their leverages to the power 1/T, so a finite leverage ratio
          can never turn into a one-hot mixture.
        * ``"calibrated"``: the paper's softmax with the temperature set so the largest /
          smallest weight ratio is a target (``ratio``) whenever the fixed temperature would
          exceed it.
    Lambda
        A number (the absolute ridge; mu = lambda k, as the paper) or ``"auto"``: lambda chosen
        from the centred kernel's spectrum so the effective dimension sum(S) is ``share`` of
        k - 1 (scale-free: multiplying the embeddings by any factor gives the same weights).
    Smoothing
        ``c`` in [0, 1): the weights become (1 - c) w + c prior (prior uniform or given), so no
        domain can take more than 1 - c (1 - prior_min).

Weight vectors
    Every entry is a finite real number >= 0 (``True`` is refused, not read as 1.0; NaN, Inf
    and negatives are refused), with the same message wherever the vector comes in. Two kinds:

    * a *mixture* (weights.json, a schedule entry, a smoothing prior, a budget's achievable
      weights) sums to 1 within :data:`WEIGHT_SUM_TOLERANCE`;
    * *relative* weights (``relative=True``: what the sampler, the trainer exports, the token
      budget and online Chameleon take from a caller, e.g. ``[1, 1, 2, 0]``) need only a
      positive sum; the consumer normalises them, so a sum off 1 is a scale, not an error.

Tolerance
    :data:`WEIGHT_SUM_TOLERANCE` = 1e-9, absolute on a sum of 1 (so also relative). Every
    mixture this package writes comes from float64 maths and is stored with Python's shortest
    round-trip repr, so its sum is 1 to a few ulps (~1e-16 per entry); 1e-9 leaves room for
    any k up to millions while catching an edited file whose entries no longer add up (a
    weight changed by 1e-7 is an error, not silently renormalised). A hand-written file should
    give exact decimals (0.25, 0.75) or, if it cannot (thirds), be passed as relative weights
    to the API that takes them; the error message gives the sum found.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from typing import List, Mapping, Optional, Sequence, Union

from .errors import ChameleonUserError

__all__ = [
    "MODES",
    "PIPELINE_MODES",
    "RULES",
    "PRIORS",
    "AUTO_LAMBDA",
    "WEIGHT_SUM_TOLERANCE",
    "COLLAPSE_THRESHOLD",
    "check_domain_names",
    "check_weights",
    "check_weight_map",
    "check_same_domains",
    "check_weights_for",
    "check_named_weights",
    "check_mode",
    "check_rule",
    "check_lambda",
    "check_positive",
    "check_temperature",
    "check_share",
    "check_smoothing",
    "check_prior",
    "rule_of_mode",
]

MODES = ("pretrain", "finetune")
PIPELINE_MODES = MODES + ("transfer",)  # transfer: new domains with the frozen proxy, pretraining rule
RULES = ("paper", "power", "calibrated")
PRIORS = ("uniform", "natural")
AUTO_LAMBDA = "auto"
WEIGHT_SUM_TOLERANCE = 1e-9
# A mixture with one weight above this has collapsed: the commands say so, and --strict stops.
COLLAPSE_THRESHOLD = 0.9


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive(name: str, value) -> float:
    """``value`` as a float; it must be a finite real number > 0 (bool refused)."""
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise ChameleonUserError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def check_domain_names(domains, k: Optional[int] = None, what: str = "domains") -> List[str]:
    """A list of ``k`` (if given) distinct non-empty strings. A bare string is refused:
    ``list("web")`` would silently invent the domains 'w', 'e', 'b'."""
    if isinstance(domains, (str, bytes)):
        raise ChameleonUserError(f"{what}: expected a list of domain names, got the string {domains!r}")
    if isinstance(domains, Mapping) or not isinstance(domains, Sequence):
        raise ChameleonUserError(f"{what}: expected a list of domain names, got {type(domains).__name__}")
    names = list(domains)
    if not names:
        raise ChameleonUserError(f"{what}: expected at least one domain name, got an empty list")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ChameleonUserError(f"{what}: names must be non-empty strings, got {name!r}")
    if k is not None and len(names) != k:
        raise ChameleonUserError(f"{what}: expected {k} names, got {len(names)}")
    duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
    if duplicates:
        raise ChameleonUserError(f"{what}: names must be unique, got {duplicates} more than once")
    return names


def _weight_vector(values: list, labels: Sequence[str], what: str, relative: bool) -> List[float]:
    """The one check of a weight vector's entries and sum (see the module doc)."""
    for label, v in zip(labels, values):
        if not _is_real(v) or not math.isfinite(float(v)) or float(v) < 0:
            raise ChameleonUserError(f"{what}: {label} must be a finite number >= 0, got {v!r}")
    floats = [float(v) for v in values]
    total = math.fsum(floats)
    if relative:
        if not total > 0:
            raise ChameleonUserError(f"{what}: all weights are 0; at least one must be > 0")
        if not math.isfinite(total):
            raise ChameleonUserError(f"{what}: the weights' sum overflows ({total!r})")
    elif abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ChameleonUserError(f"{what}: must sum to 1 (within {WEIGHT_SUM_TOLERANCE:g}), got sum {total!r}")
    return floats


def check_weights(weights, k: Optional[int] = None, what: str = "weights", relative: bool = False) -> List[float]:
    """A weight vector as a list of floats: ``k`` (if given) finite numbers >= 0 (bool
    refused) summing to 1 within :data:`WEIGHT_SUM_TOLERANCE`, or with ``relative`` any
    positive sum (returned as given, not normalised). Accepts any sequence or a 1-d
    tensor/array (anything with ``tolist``)."""
    if hasattr(weights, "tolist") and not isinstance(weights, (list, tuple)):
        weights = weights.tolist()
    if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence):
        raise ChameleonUserError(f"{what}: expected a vector of numbers, got {type(weights).__name__}")
    values = list(weights)
    if not values:
        raise ChameleonUserError(f"{what}: expected at least one weight, got an empty vector")
    if k is not None and len(values) != k:
        raise ChameleonUserError(f"{what}: expected {k} weights, got {len(values)}")
    return _weight_vector(values, [f"entry {i}" for i in range(len(values))], what, relative)


def check_same_domains(domains: Sequence[str], names: Sequence[str], what: str = "weights") -> None:
    """``names`` (the domains something gives values for) must be exactly ``domains``, in any
    order: one message for every unknown or missing domain."""
    extra = [n for n in names if n not in set(domains)]
    missing = [d for d in domains if d not in set(names)]
    if extra or missing:
        found = "; ".join(f"{label} {names}" for label, names in (("unknown", extra), ("missing", missing)) if names)
        raise ChameleonUserError(f"{what}: the domains do not match ({found}; expected {list(domains)})")


def check_weight_map(weights: Mapping[str, float], domains: Optional[Sequence[str]] = None,
                     what: str = "weights", relative: bool = False) -> dict:
    """``{domain: weight}`` checked as :func:`check_weights`, with names checked as
    :func:`check_domain_names`; with ``domains``, exactly those keys (returned in that order)."""
    if not isinstance(weights, Mapping):
        raise ChameleonUserError(f"{what}: expected a mapping domain -> weight, got {type(weights).__name__}")
    if isinstance(weights.get("weights"), Mapping):
        raise ChameleonUserError(f"{what}: got a whole weights.json document; pass its 'weights' entry (not the whole file)")
    names = check_domain_names(list(weights), what=f"{what} (domain names)")
    if domains is not None:
        order = check_domain_names(domains)
        check_same_domains(order, names, what)
        names = order
    values = _weight_vector([weights[n] for n in names], [f"weight of domain {n!r}" for n in names], what, relative)
    return dict(zip(names, values))


def check_weights_for(weights, domains: Sequence[str], what: str = "weights", relative: bool = False) -> dict:
    """Weights for the known ``domains``: a ``{domain: weight}`` mapping naming each exactly
    once, or ``len(domains)`` numbers in their order (a list, tensor or array); returned as
    ``{domain: float}`` in ``domains`` order, checked as :func:`check_weight_map`."""
    domains = check_domain_names(domains)
    if isinstance(weights, Mapping):
        return check_weight_map(weights, domains, what, relative)
    if hasattr(weights, "tolist") and not isinstance(weights, (list, tuple)):
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ChameleonUserError(f"{what}: expected a mapping domain -> weight or {len(domains)} numbers, "
                                 f"got {type(weights).__name__}")
    if len(weights) != len(domains):
        raise ChameleonUserError(f"{what}: expected {len(domains)} weights (one per domain {list(domains)}), "
                                 f"got {len(weights)}")
    values = _weight_vector(list(weights), [f"weight of domain {n!r}" for n in domains], what, relative)
    return dict(zip(domains, values))


def check_named_weights(names, values, what: str = "weights", relative: bool = False) -> dict:
    """``(name, weight)`` pairs as a file lists them, in file order (a trainer's mixture file
    read back): names checked as :func:`check_domain_names` (a name listed twice is refused,
    not summed or overwritten), weights as :func:`check_weights`; returned as ``{name: float}``."""
    names, values = list(names), list(values)
    # the weights first: in a misaligned file (names where weights belong) that is the clearer fault
    values = _weight_vector(values, [f"weight of domain {n!r}" for n in names], what, relative)
    return dict(zip(check_domain_names(names, len(values), what=f"{what} (domain names)"), values))


def check_mode(mode, allowed: Sequence[str] = MODES) -> str:
    """One of ``allowed`` (default :data:`MODES`)."""
    if not isinstance(mode, str) or mode not in allowed:
        raise ChameleonUserError(f"mode: expected one of {tuple(allowed)}, got {mode!r}")
    return mode


def rule_of_mode(mode: str) -> str:
    """The weight direction of a pipeline mode: ``transfer`` uses the pretraining one."""
    return "pretrain" if check_mode(mode, PIPELINE_MODES) == "transfer" else mode


def check_rule(rule) -> str:
    """One of :data:`RULES`."""
    if not isinstance(rule, str) or rule not in RULES:
        raise ChameleonUserError(f"rule: expected one of {RULES}, got {rule!r}")
    return rule


def check_lambda(lam) -> Union[float, str]:
    """A finite number > 0 (the absolute ridge) or ``"auto"`` (scale-free, chosen from the
    spectrum)."""
    if isinstance(lam, str):
        if lam == AUTO_LAMBDA:
            return lam
        raise ChameleonUserError(f"lambda: expected a finite number > 0 or {AUTO_LAMBDA!r}, got {lam!r}")
    if not _is_real(lam) or not math.isfinite(float(lam)) or float(lam) <= 0:
        raise ChameleonUserError(f"lambda: expected a finite number > 0 or {AUTO_LAMBDA!r}, got {lam!r}")
    return float(lam)


def check_temperature(value) -> float:
    return check_positive("temperature", value)


def check_share(value) -> float:
    """The effective-dimension share of the scale-free lambda: a number in (0, 1)."""
    if not _is_real(value) or not 0.0 < float(value) < 1.0:
        raise ChameleonUserError(f"share: expected a number in (0, 1) (effective dimension / (k - 1)), got {value!r}")
    return float(value)


def check_smoothing(value) -> float:
    """The smoothing toward the prior: a number in [0, 1)."""
    if not _is_real(value) or not 0.0 <= float(value) < 1.0:
        raise ChameleonUserError(f"smoothing: expected a number in [0, 1), got {value!r}")
    return float(value)


def check_prior(prior, k: int) -> List[float]:
    """The smoothing prior as k floats: ``"uniform"``, or a weight vector (e.g. the natural
    token shares) checked as :func:`check_weights`."""
    if isinstance(prior, str):
        if prior == "uniform":
            return [1.0 / k] * k
        raise ChameleonUserError(f"prior: expected 'uniform' or a weight vector of {k} numbers, got {prior!r}")
    return check_weights(prior, k, what="prior")
