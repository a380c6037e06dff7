"""The ``natural`` mixture: every domain in proportion to its number of tokens.

It is what sampling the concatenated corpus uniformly at random gives, and it is the centre
of RegMix's Dirichlet draws (:mod:`chameleon_ext.baselines.regmix`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..errors import ChameleonUserError

__all__ = ["natural_weights", "dataset_token_counts"]


def natural_weights(token_counts: Mapping[str, int]) -> dict[str, float]:
    """Token shares ``{domain: n_i / sum_j n_j}`` from ``{domain: n_i}`` (order kept).

    Raises:
        ChameleonUserError: a count that is not a finite number >= 0, or all counts 0.
    """
    if not isinstance(token_counts, Mapping) or not token_counts:
        raise ChameleonUserError(
            f"token_counts: expected a non-empty {{domain: tokens}} mapping, got {token_counts!r}")
    counts = {}
    for name, n in token_counts.items():
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
            raise ChameleonUserError(
                f"token_counts: domain {name!r} has {n!r} tokens; expected a finite number >= 0")
        counts[name] = n
    total = sum(counts.values())
    if total <= 0:
        raise ChameleonUserError("token_counts: every domain has 0 tokens; the shares are undefined")
    return {name: n / total for name, n in counts.items()}


def dataset_token_counts(dataset: Any, split: str = "train") -> dict[str, int]:
    """``{domain: tokens}`` of a :class:`~chameleon_ext.data.dataset.MixtureDataset` split,
    in the dataset's domain order (the weights must come from the training split only)."""
    return {d: int(dataset.n_tokens(d, split)) for d in dataset.domains}
