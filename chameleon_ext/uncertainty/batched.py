"""What the bootstrap and the sweeps share: the per-window inputs and their checks, and the
batched weight maths (raw leverage ``[N, k]`` -> normalised scores and weights, row by row the
plain path's of :mod:`chameleon_ext.weights`)."""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import mixture
from ..errors import ChameleonUserError
from ..weights import weights_from_scores

__all__ = ["WindowsLike", "window_list", "window_means", "check_int", "check_level", "check_names",
           "softmax_rule", "scores_and_weights", "windows_label"]

WindowsLike = Union[Sequence[Tensor], Tensor]


def window_list(window_embeddings: WindowsLike, counts=None) -> List[Tensor]:
    """k tensors ``[n_i, d]`` from a list of them or a padded ``[k, n_max, d]`` plus counts."""
    if isinstance(window_embeddings, Tensor):
        if window_embeddings.dim() != 3:
            raise ChameleonUserError(
                "window_embeddings must be a list of k tensors [n_i, d] or a padded tensor [k, n_max, d], "
                f"got shape {tuple(window_embeddings.shape)}"
            )
        k, n_max = window_embeddings.shape[:2]
        if counts is None:
            n = [n_max] * k
        else:
            n = [int(c) for c in torch.as_tensor(counts).flatten().tolist()]
            if len(n) != k or any(c < 1 or c > n_max for c in n):
                raise ChameleonUserError(
                    f"counts must give k = {k} window counts, each in [1, {n_max}], got {n}"
                )
        windows = [window_embeddings[i, : n[i]] for i in range(k)]
    else:
        if counts is not None:
            raise ChameleonUserError("counts is only for a padded [k, n_max, d] tensor; a list gives each n_i itself")
        if isinstance(window_embeddings, (str, bytes)) or not isinstance(window_embeddings, Sequence):
            raise ChameleonUserError(
                f"window_embeddings must be a list of k tensors [n_i, d], got {type(window_embeddings).__name__}"
            )
        windows = list(window_embeddings)
    if not windows:
        raise ChameleonUserError("window_embeddings is empty: expected one [n_i, d] tensor per domain")
    d = None
    for i, w in enumerate(windows):
        if not isinstance(w, Tensor) or w.dim() != 2:
            shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ChameleonUserError(f"window_embeddings[{i}] must be a tensor [n_i, d], got {shape}")
        if not w.is_floating_point():
            raise ChameleonUserError(f"window_embeddings[{i}] must be floating point, got {w.dtype}")
        if w.shape[0] < 1 or w.shape[1] < 1:
            raise ChameleonUserError(
                f"window_embeddings[{i}] must hold at least one window of d >= 1, got {tuple(w.shape)}"
            )
        if d is None:
            d = w.shape[1]
        elif w.shape[1] != d:
            raise ChameleonUserError(f"window_embeddings[{i}] has d = {w.shape[1]}, but domain 0 has d = {d}")
        if w.device != windows[0].device:
            raise ChameleonUserError(f"window_embeddings[{i}] is on {w.device}, domain 0 on {windows[0].device}")
    return windows


def window_means(windows: List[Tensor]) -> Tensor:
    """``[k, d]`` float64 means of each domain's windows; a NaN/Inf window makes its domain's
    mean non-finite, so checking the k means checks every window at no extra pass."""
    means = torch.stack([torch.mean(w, 0, dtype=torch.float64) for w in windows])
    bad = (~torch.isfinite(means)).any(1).nonzero().flatten().tolist()
    if bad:
        raise ChameleonUserError(f"window_embeddings of domain(s) {bad} (index) hold NaN or Inf")
    return means


def check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ChameleonUserError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_level(level) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ChameleonUserError(f"level must be a number in (0, 1), e.g. 0.95, got {level!r}")
    return float(level)


def check_names(domains: Optional[Sequence[str]], k: int, what: str) -> List[str]:
    if domains is None:
        return [str(i) for i in range(k)]
    return mixture.check_domain_names(domains, k, what)


def softmax_rule(mode: str) -> str:
    """The temperature rule of a mode; 'transfer' (new or changed domains embedded with the
    frozen proxy, docs/method.md step 5) uses the pretraining rule, as the pipeline does."""
    return mixture.rule_of_mode(mode)


def scores_and_weights(raw: Tensor, settings: dict, normalize: bool, prior="uniform") -> Tuple[Tensor, Tensor]:
    """Normalised scores and weights ``[N, k]`` from raw leverage ``[N, k]`` by the rule in
    ``settings`` (:func:`~chameleon_ext.weights.rule_settings`), with the plain path's special
    cases: one domain -> weight 1; zero total leverage -> uniform."""
    k = raw.shape[-1]
    total = raw.sum(-1, keepdim=True)
    degenerate = total <= 0.0
    uniform = torch.full_like(raw, 1.0 / k)
    if k == 1:
        return (torch.ones_like(raw) if normalize else raw), torch.ones_like(raw)
    if normalize:
        S = torch.where(degenerate, uniform, raw / torch.where(degenerate, torch.ones_like(total), total))
    else:
        S = raw
    weights = weights_from_scores(S, settings["mode"], settings["temperature"], settings["rule"], settings["smoothing"],
                                  prior, settings["ratio"])  # row by row, bit for bit the plain path's
    # Every domain at the same point: nothing distinguishes them (the plain path warns).
    return S, torch.where(degenerate, uniform, weights)


# --------------------------------------------------------------------------------------------
# Bootstrap


def windows_label(n: Sequence[int]) -> str:
    return str(n[0]) if len(set(n)) == 1 else f"{min(n)}-{max(n)}"
