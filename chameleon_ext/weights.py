"""Domain weights from domain embeddings: the maths of Chameleon (docs/method.md, steps 3-5).

    X [k, d] -> Omega = X X^T -> Omega_c = H Omega H -> S = KRLS(Omega_c, mu = lam * k)
      -> S~ = S / sum(S) -> weights by a rule (:data:`chameleon_ext.mixture.RULES`)

The rules (docs/method.md, "Rules"; the names and checks live in :mod:`chameleon_ext.mixture`):

* ``rule="paper"`` -- the paper's method exactly: lambda = 10, pretrain softmax(1 / ((S~ + 1e-12) T))
  with T = 5, finetune softmax(S~ / T) with T = 0.2 (the golden vectors hold in this mode).
* ``rule="power"`` (the default) -- w ∝ S~^(-1/T) (pretrain) or S~^(1/T) (finetune), with the
  scale-free lambda and smoothing toward the uniform mixture (defaults in :data:`RULE_DEFAULTS`).
* ``rule="calibrated"`` -- the paper's softmax with its temperature raised where needed so the
  largest / smallest weight ratio stays at ``ratio``.

``lam="auto"`` picks lambda from the centred kernel's spectrum (:func:`select_lambda`): the
effective dimension sum(S) is then ``share`` of k - 1 whatever the scale of the embeddings.

One entry point and two variants, all returning float64 results:

* :func:`weights_from_embeddings` -- domain embeddings ``[k, d]`` -> :class:`DomainWeights`
  (the weights and every score behind them). This is the one to use.
* :func:`weights_from_affinity` -- the same from a precomputed affinity (kernel) ``[k, k]``.
* :func:`weights_from_scores` -- only the rule, on given normalised leverage scores (batched).

The leverage scores come from the fused ``krls`` op.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import mixture
from .errors import ChameleonUserError
from .mixture import AUTO_LAMBDA, RULES

__all__ = [
    "DEFAULT_RULE",
    "DEFAULT_LAMBDA",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_SHARE",
    "RULE_DEFAULTS",
    "RULES",
    "DomainWeights",
    "linear_affinity",
    "centered_affinity",
    "select_lambda",
    "rule_settings",
    "weights_from_embeddings",
    "weights_from_affinity",
    "weights_from_scores",
    # deprecated aliases
]

# The paper's constants: rule="paper"'s defaults (kept under these names for older callers).
DEFAULT_LAMBDA = 10.0
DEFAULT_TEMPERATURE = {"pretrain": 5.0, "finetune": 0.2}
# The scale-free lambda's target: effective dimension sum(S) = DEFAULT_SHARE * (k - 1).
DEFAULT_SHARE = 0.25
DEFAULT_RULE = "power"
# Each rule's defaults; a caller's explicit value always wins. docs/method.md says why these.
RULE_DEFAULTS = {
    "paper": {"lam": DEFAULT_LAMBDA, "temperature": dict(DEFAULT_TEMPERATURE), "smoothing": 0.0, "ratio": None},
    "power": {"lam": AUTO_LAMBDA, "temperature": {"pretrain": 2.0, "finetune": 1.0}, "smoothing": 0.2,
              "ratio": None},
    "calibrated": {"lam": AUTO_LAMBDA, "temperature": dict(DEFAULT_TEMPERATURE), "smoothing": 0.0, "ratio": 10.0},
}
_EPS = 1e-12  # the reference's guard in 1 / (S + eps); also keeps log(S) finite in the power rule
# The scale-free lambda's search: mu in [trace * 1e-10, trace * 1e4], 16-point log grids, 6 rounds.
_LOG_MU_RANGE = (math.log(1e-10), math.log(1e4))
_GRID, _ROUNDS = 16, 6


@dataclass
class DomainWeights:
    """Everything a weights file records: the weights and the scores behind them."""

    weights: Tensor  # [k] sums to 1
    leverage: Tensor  # [k] leverage scores fed to the rule: S / sum(S) (== leverage_raw if not normalize)
    leverage_raw: Tensor  # [k] kernel ridge leverage scores S_i in [0, 1)
    affinity: Tensor  # [k, k] centred affinity Omega_c
    mode: str
    lam: float  # the lambda used (mu = lam * k); the chosen one for lam="auto"
    temperature: float  # the rule's temperature (for "calibrated": the one used after calibration)
    normalize: bool
    domains: List[str] = field(default_factory=list)
    rule: str = "paper"
    smoothing: float = 0.0
    lambda_method: str = "fixed"  # "fixed" (a given number) or "auto" (effective-dimension share)
    share: Optional[float] = None  # the target share of k - 1 when lambda_method == "auto"
    ratio: Optional[float] = None  # the calibrated rule's largest / smallest weight target
    prior: Optional[List[float]] = None  # the smoothing prior; None: uniform
    rule_temperature: Optional[float] = None  # the rule's temperature setting (calibrated: before calibration)
    # How far to trust the weights (chameleon_ext.uncertainty), set by the pipeline on rank 0:
    # the BootstrapResult (None without per-window means or with 0 resamples) and Diagnostics.
    bootstrap: Optional[object] = field(default=None, repr=False, compare=False)
    diagnostics: Optional[object] = field(default=None, repr=False, compare=False)

    @property
    def effective_dimension(self) -> float:
        return float(self.leverage_raw.sum())

    @property
    def settings(self) -> dict:
        """What a bootstrap needs to redo these weights on a resample (:func:`weights_from_affinity`'s
        keywords; the calibrated rule's setting, not the temperature it calibrated to)."""
        T = self.temperature if self.rule_temperature is None else self.rule_temperature
        return {"mode": self.mode, "rule": self.rule, "lam": AUTO_LAMBDA if self.lambda_method == "auto" else self.lam,
                "temperature": T, "share": self.share,
                "smoothing": self.smoothing, "ratio": self.ratio, "normalize": self.normalize}

    def as_dict(self) -> dict:
        """The method's part of a weights.json (format 2; see :mod:`chameleon_ext.exports`)."""
        names = self.domains or [str(i) for i in range(len(self.weights))]
        k = len(names)
        return {
            "mode": self.mode,
            "rule": self.rule,
            "lambda": self.lam,
            "lambda_selection": {"method": self.lambda_method, "share": self.share,
                                 "effective_dimension": self.effective_dimension,
                                 "effective_dimension_share": self.effective_dimension / (k - 1) if k > 1 else None},
            "temperature": self.temperature,
            "smoothing": self.smoothing,
            "ratio": self.ratio,
            "prior": "uniform" if self.prior is None else dict(zip(names, self.prior)),
            "normalize": self.normalize,
            "domains": list(names),
            "weights": {n: float(w) for n, w in zip(names, self.weights.tolist())},
            "leverage": {n: float(s) for n, s in zip(names, self.leverage.tolist())},
            "leverage_raw": {n: float(s) for n, s in zip(names, self.leverage_raw.tolist())},
        }


def linear_affinity(embeddings: Tensor) -> Tensor:
    """Omega = X X^T in float64. ``embeddings``: ``[k, d]`` real floating point, finite."""
    if not isinstance(embeddings, Tensor):
        embeddings = torch.as_tensor(embeddings)
    if embeddings.dim() != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must be [k, d] with k, d >= 1, got shape {tuple(embeddings.shape)}")
    if embeddings.is_complex():
        # .to(float64) would drop the imaginary part with only a warning.
        raise ValueError(f"embeddings must be real, got the complex dtype {embeddings.dtype}")
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be a floating-point tensor, got {embeddings.dtype}")
    X = embeddings.to(torch.float64)
    bad = (~torch.isfinite(X)).any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"embeddings hold NaN or Inf in row(s) {bad} (domain index)")
    gram = X @ X.T
    if not torch.isfinite(gram).all():
        # Finite entries whose squares overflow float64 (|x| ~ 1e155 and beyond).
        raise ValueError(f"embeddings are too large: X X^T overflows float64 (largest |x| = {X.abs().max().item():.3g})")
    return gram


def centered_affinity(affinity: Tensor) -> Tensor:
    """Omega_c = H Omega H = Omega - row means - column means + grand mean (batched: ``[..., k, k]``)."""
    A = affinity.to(torch.float64)
    return A - A.mean(-2, keepdim=True) - A.mean(-1, keepdim=True) + A.mean((-2, -1), keepdim=True)


def select_lambda(affinity: Tensor, share: float = DEFAULT_SHARE, center: bool = True) -> Tuple[Tensor, Tensor]:
    """The scale-free lambda of each kernel in a batch ``[..., k, k]``.

    Returns ``(lam [...], effective_dimension [...])`` (float64): lambda (in the paper's units,
    mu = lam * k) at which the effective dimension sum_i S_i of the centred kernel is ``share``
    of k - 1 (or, for a kernel of lower rank, of sum(S) at mu = 1e-10 trace, when that is more
    than 1/2 below k - 1). sum(S) falls monotonically with mu, so the root is bracketed between
    mu = 1e-10 trace and 1e4 trace and found with ``_ROUNDS`` batched ``krls`` calls, each on a
    16-point log grid inside the current bracket (bracket shrinks 15x per call), then linear
    interpolation in log mu. Multiplying the kernel by c multiplies lam by c exactly in exact
    arithmetic: the weights do not change. A zero kernel (all domains at one point) and k = 1
    give lam = 1 (nothing to regularise; every score is 0).
    """
    from .ops import krls  # here: the module's constants need no compiled ops

    share = mixture.check_share(share)
    A = torch.as_tensor(affinity).to(torch.float64)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2] or A.shape[-1] < 1:
        raise ValueError(f"affinity must be [..., k, k], got shape {tuple(A.shape)}")
    Kc = centered_affinity(A) if center else A
    batch, k = Kc.shape[:-2], Kc.shape[-1]
    trace = torch.diagonal(Kc, dim1=-2, dim2=-1).sum(-1)
    ok = trace > 0
    if k == 1 or not bool(ok.any()):
        ones = torch.ones(batch, dtype=torch.float64, device=Kc.device)
        return ones, torch.zeros_like(ones)
    safe_trace = torch.where(ok, trace, torch.ones_like(trace))
    log_t = torch.log(safe_trace)
    lo, hi = log_t + _LOG_MU_RANGE[0], log_t + _LOG_MU_RANGE[1]
    steps = torch.linspace(0.0, 1.0, _GRID, dtype=torch.float64, device=Kc.device)
    Kg = Kc.unsqueeze(-3).expand(*batch, _GRID, k, k).contiguous()
    rank = krls(Kc, torch.exp(lo), center=False, scale_by_k=False).sum(-1)
    # share of k - 1, unless the kernel's rank is clearly lower (sum(S) at the tiny mu more than
    # 1/2 below k - 1): then share of that sum, so the target stays reachable.
    rank = torch.where(rank > k - 1.5, torch.full_like(rank, k - 1.0), rank)
    target = (share * rank).unsqueeze(-1)
    e_lo = e_hi = None
    for _ in range(_ROUNDS):
        grid = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * steps  # [..., G] log mu
        eff = krls(Kg, torch.exp(grid), center=False, scale_by_k=False).sum(-1)  # [..., G], decreasing
        idx = ((eff >= target).sum(-1, keepdim=True) - 1).clamp(0, _GRID - 2)
        lo, hi = grid.gather(-1, idx).squeeze(-1), grid.gather(-1, idx + 1).squeeze(-1)
        e_lo, e_hi = eff.gather(-1, idx).squeeze(-1), eff.gather(-1, idx + 1).squeeze(-1)
    t = target.squeeze(-1)
    frac = ((e_lo - t) / (e_lo - e_hi).clamp_min(1e-300)).clamp(0.0, 1.0)
    mu = torch.exp(lo + frac * (hi - lo))
    lam = torch.where(ok, mu / k, torch.ones_like(mu))
    eff = torch.where(ok, t, torch.zeros_like(t))
    return lam, eff


def rule_settings(rule: str, mode: str, lam=None, temperature=None, share=None, smoothing=None, ratio=None) -> dict:
    """The checked settings of ``rule`` for ``mode`` ("pretrain"/"finetune"), each ``None``
    replaced by the rule's default (:data:`RULE_DEFAULTS`)."""
    rule, mode = mixture.check_rule(rule), mixture.check_mode(mode)
    d = RULE_DEFAULTS[rule]
    ratio = d["ratio"] if ratio is None else mixture.check_positive("ratio", ratio)
    if rule == "calibrated" and ratio <= 1.0:
        raise ChameleonUserError(f"ratio: expected a number > 1 (largest / smallest weight), got {ratio!r}")
    return {
        "rule": rule, "mode": mode,
        "lam": mixture.check_lambda(d["lam"] if lam is None else lam),
        "temperature": mixture.check_temperature(d["temperature"][mode] if temperature is None else temperature),
        "share": mixture.check_share(DEFAULT_SHARE if share is None else share),
        "smoothing": mixture.check_smoothing(d["smoothing"] if smoothing is None else smoothing),
        "ratio": ratio if rule == "calibrated" else None,
    }


def _rule_weights(S: Tensor, mode: str, rule: str, T: float, ratio: Optional[float]) -> Tuple[Tensor, Tensor]:
    """(weights, temperature used) ``[..., k]`` / ``[...]`` of normalised scores, before smoothing."""
    if rule == "power":
        sign = -1.0 if mode == "pretrain" else 1.0
        logits = (sign / T) * torch.log(S + _EPS)
        return torch.softmax(logits, dim=-1), torch.full(S.shape[:-1], T, dtype=S.dtype, device=S.device)
    logits = 1.0 / ((S + _EPS) * T) if mode == "pretrain" else S / T
    temps = torch.full(S.shape[:-1], T, dtype=S.dtype, device=S.device)
    if rule == "calibrated":
        # Scale the logits down (raise T) only where their spread exceeds log(ratio): the
        # largest / smallest weight is then exactly `ratio`; elsewhere the paper's softmax.
        spread = logits.max(-1).values - logits.min(-1).values
        factor = torch.clamp(math.log(ratio) / spread.clamp_min(1e-300), max=1.0)
        logits = logits * factor.unsqueeze(-1)
        temps = temps / factor
    return torch.softmax(logits, dim=-1), temps  # softmax subtracts the max: stable for huge logits


def weights_from_scores(scores: Tensor, mode: str = "pretrain", temperature: Optional[float] = None,
                        rule: str = DEFAULT_RULE, smoothing: Optional[float] = None, prior="uniform",
                        ratio: Optional[float] = None) -> Tensor:
    """The rule on (normalised) leverage scores ``[k]`` -> weights ``[k]``.

    paper: pretrain softmax(1 / ((S + 1e-12) T)), default T = 5; finetune softmax(S / T), T = 0.2.
    power: pretrain w ∝ (S + 1e-12)^(-1/T), finetune w ∝ (S + 1e-12)^(1/T), default T = 1.
    calibrated: the paper's softmax with T raised where needed so max w / min w = ``ratio``.
    Then (1 - smoothing) w + smoothing prior (``prior``: "uniform" or a weight vector).

    ``scores`` may also be a batch ``[..., k]`` (one score set per row, e.g. the bootstrap's
    resamples): each row gets bit for bit the weights its own ``[k]`` call gives.
    """
    s = rule_settings(rule, mode, temperature=temperature, smoothing=smoothing, ratio=ratio)
    S = torch.as_tensor(scores).to(torch.float64)
    if S.dim() < 1 or S.shape[-1] < 1:
        raise ValueError(f"scores must be a non-empty vector [k] (or a batch [..., k]), got shape {tuple(S.shape)}")
    w, _ = _rule_weights(S, s["mode"], s["rule"], s["temperature"], s["ratio"])
    return _smooth(w, s["smoothing"], prior)


def _smooth(w: Tensor, c: float, prior) -> Tensor:
    if c == 0.0:
        return w
    p = torch.tensor(mixture.check_prior(prior, w.shape[-1]), dtype=w.dtype, device=w.device)
    return (1.0 - c) * w + c * p


def weights_from_affinity(
    affinity: Tensor,
    mode: str = "pretrain",
    lam: Union[float, str, None] = None,
    temperature: Optional[float] = None,
    normalize: bool = True,
    domains: Optional[Sequence[str]] = None,
    center: bool = True,
    rule: str = DEFAULT_RULE,
    share: Optional[float] = None,
    smoothing: Optional[float] = None,
    prior="uniform",
    ratio: Optional[float] = None,
) -> DomainWeights:
    """Weights from a precomputed affinity (kernel) matrix ``[k, k]``.

    ``rule``/``lam``/``temperature``/``share``/``smoothing``/``ratio``: see the module doc;
    ``None`` means the rule's default (:data:`RULE_DEFAULTS`). ``lam="auto"``: the
    scale-free lambda (:func:`select_lambda` with ``share``).

    With ``center=True`` (a raw Gram matrix, the default) it is centred first; centring an
    already-centred matrix changes nothing. ``center=False`` uses the matrix as the kernel
    exactly as given, as the reference does with the paper's Figure 1 matrix
    (docs/method.md, "The reference implementation")."""
    s = rule_settings(rule, mode, lam, temperature, share, smoothing, ratio)
    A = torch.as_tensor(affinity)
    if A.is_complex():
        raise ValueError(f"affinity must be real, got the complex dtype {A.dtype}")
    A = A.to(torch.float64)
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise ValueError(f"affinity must be a square [k, k] matrix, got shape {tuple(A.shape)}")
    if not torch.isfinite(A).all():
        raise ValueError("affinity holds NaN or Inf")
    k = A.shape[0]
    names = [] if domains is None else mixture.check_domain_names(domains, k)
    prior_vec = mixture.check_prior(prior, k)
    from .ops import krls  # here, not at the top: the constants above need no compiled ops

    Ac = centered_affinity(A) if center else A
    auto = s["lam"] == AUTO_LAMBDA
    lam = float(select_lambda(Ac, s["share"], center=False)[0]) if auto else s["lam"]
    raw = krls(A, lam, center=center, scale_by_k=True)
    total = float(raw.sum())
    extra = dict(rule=s["rule"], smoothing=s["smoothing"], lambda_method="auto" if auto else "fixed",
                 share=s["share"] if auto else None, ratio=s["ratio"], rule_temperature=s["temperature"],
                 prior=None if isinstance(prior, str) else prior_vec)
    T = s["temperature"]
    if k == 1:
        warnings.warn("only one domain: its weight is 1.0", stacklevel=2)
        one = torch.ones(1, dtype=torch.float64)
        return DomainWeights(one, one.clone() if normalize else raw, raw, Ac, mode, lam, T, normalize, names, **extra)
    if total <= 0.0:
        # Every domain embeds to the same point: nothing distinguishes them.
        warnings.warn("all domains have identical embeddings (zero leverage): uniform weights", stacklevel=2)
        uniform = torch.full((k,), 1.0 / k, dtype=torch.float64)
        return DomainWeights(uniform, uniform.clone() if normalize else raw, raw, Ac, mode, lam, T, normalize, names,
                             **extra)
    S = raw / total if normalize else raw
    w, temps = _rule_weights(S, s["mode"], s["rule"], T, s["ratio"])
    w = _smooth(w, s["smoothing"], prior_vec)
    return DomainWeights(w, S, raw, Ac, mode, lam, float(temps), normalize, names, **extra)


def weights_from_embeddings(
    embeddings: Tensor,
    mode: str = "pretrain",
    lam: Union[float, str, None] = None,
    temperature: Optional[float] = None,
    normalize: bool = True,
    domains: Optional[Sequence[str]] = None,
    rule: str = DEFAULT_RULE,
    share: Optional[float] = None,
    smoothing: Optional[float] = None,
    prior="uniform",
    ratio: Optional[float] = None,
) -> DomainWeights:
    """Chameleon weights from domain embeddings ``[k, d]`` with the linear kernel.

    Returns a :class:`DomainWeights`: ``.weights`` ``[k]`` (float64, sum 1), the leverage
    scores behind them (``.leverage``, ``.leverage_raw``) and the centred affinity. The
    default rule is :data:`DEFAULT_RULE`; ``rule="paper"`` is the paper's method exactly.

    >>> w = weights_from_embeddings(torch.randn(7, 64), mode="pretrain").weights
    """
    return weights_from_affinity(linear_affinity(embeddings), mode=mode, lam=lam, temperature=temperature,
                                 normalize=normalize, domains=domains, center=True, rule=rule, share=share,
                                 smoothing=smoothing, prior=prior, ratio=ratio)
