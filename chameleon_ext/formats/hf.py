"""Hugging Face ``datasets.interleave_datasets(..., probabilities=[...])``.

``interleave_datasets`` draws whole examples (documents), not tokens: see docs/exports.md for
what that does to a token-budget mixture.
"""

from __future__ import annotations

import math
from typing import List, Mapping, Optional, Sequence

from ..mixture import check_domain_names, check_same_domains, check_weight_map

__all__ = ["hf_interleave_probabilities"]


def hf_interleave_probabilities(weights: Mapping[str, float], domains: Optional[Sequence[str]] = None) -> List[float]:
    """The ``probabilities=`` list for ``datasets.interleave_datasets``, in ``domains`` order.

    ``domains`` defaults to the order of ``weights`` and must otherwise name exactly its keys
    (it is the order of the datasets passed to ``interleave_datasets``). The weights are
    renormalised so that ``sum(probabilities) == 1.0`` in float arithmetic whenever possible:
    the rounding residue goes on the largest entry, where it changes the mixture least (or on
    the last non-zero entry when the largest cannot absorb it exactly). Only when the last
    non-zero entry is smaller than the residue itself can a few ulps of 1.0 remain.
    """
    weights = check_weight_map(weights, what="hf_interleave_probabilities", relative=True)
    if domains is None:
        domains = list(weights)
    else:
        domains = check_domain_names(domains, what="hf_interleave_probabilities: domains")
        check_same_domains(domains, list(weights), "hf_interleave_probabilities")
    values = [weights[d] for d in domains]
    total = math.fsum(values)
    probs = [v / total for v in values]
    # The residue goes on the largest entry, where it changes the mixture least. When the
    # rounding of the running sum cannot be steered through that entry, the last non-zero
    # entry takes it: it is added last, so 1.0 - (sum of the rest) is exact for it.
    largest = max(range(len(probs)), key=probs.__getitem__)
    if not _absorb_residue(probs, largest):
        # The last non-zero entry is added last: set it to 1 - (sum of those before it).
        # For s in [0.5, 1] that difference is exact (Sterbenz), and for s < 0.5 the final
        # addition rounds back to exactly 1.0, so the sum is 1.0 whenever it stays >= 0. The
        # change is the rounding residue of the sum: a few ulps of 1.0 in absolute terms.
        last = max(i for i, p in enumerate(probs) if p > 0.0)
        before = sum(probs[:last])
        if before <= 1.0:
            probs[last] = 1.0 - before
    return probs


_RESIDUE_MAX_REL_CHANGE = 1e-9  # a residue is a few ulps; never let it reshape a small entry
_RESIDUE_MAX_ULP_STEPS = 64


def _absorb_residue(probs: List[float], i: int) -> bool:
    """Change ``probs[i]`` (in place) so that ``sum(probs) == 1.0`` exactly, as Python's
    left-to-right ``sum`` computes it. Returns False, with ``probs`` unchanged, when no value
    within a relative ``1e-9`` of the original gets there."""
    start = probs[i]

    def within_bounds() -> bool:
        return abs(probs[i] - start) <= _RESIDUE_MAX_REL_CHANGE * start

    # Usually one or two steps of "add what is missing" settle it.
    for _ in range(4):
        residue = 1.0 - sum(probs)
        if residue == 0.0:
            if within_bounds():
                return True
            break
        probs[i] += residue
        if not within_bounds():
            break
    else:
        # Rounding of the partial sums after entry i can hide the residue: walk entry i one
        # ulp at a time towards 1.0 (the sum is monotone in it) until it lands or jumps over.
        direction = math.inf if sum(probs) < 1.0 else -math.inf
        for _ in range(_RESIDUE_MAX_ULP_STEPS):
            probs[i] = math.nextafter(probs[i], direction)
            if not within_bounds():
                break
            total = sum(probs)
            if total == 1.0:
                return True
            if (total > 1.0) == (direction > 0):
                break
    probs[i] = start
    return False
