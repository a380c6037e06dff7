"""RegMix (Liu et al., ICLR 2025): the mixture as a regression from weights to validation loss.

1. **Propose** ``M`` mixtures (:func:`sample_mixtures`): Dirichlet draws centred on the natural
   (token-share) distribution ``p``. Each draw picks a concentration strength ``s`` uniformly
   among 15 values log-spaced in [0.1, 5.0] and samples ``Dirichlet(s * p)``: small ``s`` gives
   sparse, extreme mixtures, large ``s`` mixtures close to ``p`` (the paper's scheme; its
   public code can also flatten ``p`` with a temperature, ``p ** tau`` renormalised, available
   here as ``temperature``).
2. **Train** one small proxy per mixture and measure its validation loss (the caller's job;
   the target is one number per mixture, e.g. the mean over domains of the validation loss;
   never the test split).
3. **Fit** a regression from mixture to loss (:func:`fit_regression`). The paper uses
   LightGBM; it is used here when the ``lightgbm`` package is importable. Otherwise a ridge
   regression on features of the mixture (:func:`mixture_features`): the weights ``w_i``, their
   logs ``log(w_i + 1e-3)`` (the offset keeps the feature finite and bounded for weights that
   are 0 or vanishingly small) and the pairwise products ``w_i w_j`` (i < j). With
   ``sum_i w_i = 1``, weights and pairwise products span every quadratic function of the
   mixture. Features are standardised over the M mixtures, the intercept is not penalised,
   and the penalty ``lambda`` is the value of a log-spaced grid with the smallest exact
   leave-one-out error (closed form ``e_i / (1 - H_ii)``). Which regressor ran is recorded.
4. **Simulate** ``100 000`` candidate mixtures from the same Dirichlet scheme (seeded), predict
   their loss, and **average the 100 best** (lowest predicted loss): the output mixture.

Everything is float64 NumPy and a pure function of the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import numpy as np

from ..errors import ChameleonUserError
from ..mixture import WEIGHT_SUM_TOLERANCE

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_TOP_K",
    "DEFAULT_MIXTURES",
    "sample_mixtures",
    "propose_mixtures",
    "mixture_features",
    "RidgeRegression",
    "fit_regression",
    "regmix_weights",
    "RegMixResult",
    "RegMixSearch",
]

DEFAULT_MIXTURES = 32  # proxies; the paper trains 512 tiny ones, this project 16-32 small ones
DEFAULT_CANDIDATES = 100_000
DEFAULT_TOP_K = 100
MIN_STRENGTH, MAX_STRENGTH, N_STRENGTHS = 0.1, 5.0, 15
LOG_OFFSET = 1e-3  # log feature: log(w + LOG_OFFSET)
RIDGE_GRID = np.logspace(-10, 4, 57)  # lambda / mean eigenvalue of the centred Gram matrix
REGRESSORS = ("auto", "ridge", "lightgbm")
_PREDICT_CHUNK = 20_000


def _natural_vector(natural: Union[Mapping[str, float], Sequence[float], np.ndarray]):
    """``(names or None, p [k] float64 summing to 1)``, every entry > 0."""
    names = None
    if isinstance(natural, Mapping):
        names = [str(n) for n in natural]
        values = list(natural.values())
    else:
        values = list(np.asarray(natural, dtype=np.float64).reshape(-1))
    try:
        p = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ChameleonUserError(f"natural: expected numbers, got {values!r}") from None
    if p.ndim != 1 or p.size < 2:
        raise ChameleonUserError(f"natural: expected the weights of at least 2 domains, got {values!r}")
    if not np.all(np.isfinite(p)) or np.any(p <= 0):
        bad = int(np.flatnonzero(~np.isfinite(p) | (p <= 0))[0])
        label = names[bad] if names else str(bad)
        raise ChameleonUserError(
            f"natural: domain {label!r} has weight {values[bad]!r}; every domain needs a share > 0 "
            "to centre a Dirichlet on (drop empty domains first)")
    return names, p / p.sum()


def _check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ChameleonUserError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def sample_mixtures(natural, n: int, seed: int = 0, *, temperature: float = 1.0,
                    min_strength: float = MIN_STRENGTH, max_strength: float = MAX_STRENGTH,
                    n_strengths: int = N_STRENGTHS, stream: int = 0) -> np.ndarray:
    """``n`` mixtures ``[n, k]`` (rows sum to 1) drawn around ``natural`` (see module docstring).

    Args:
        natural: the natural distribution, ``{domain: share}`` or ``[k]`` (all shares > 0).
        seed, stream: the draws are a pure function of ``(seed, stream)``; the proposals for
            the proxies and the candidates of the simulation use different streams.
        temperature: centre on ``p ** temperature`` (renormalised); 1 keeps ``p``.
    """
    _, p = _natural_vector(natural)
    n = _check_count("n", n)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ChameleonUserError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if not 0 < min_strength <= max_strength or not math.isfinite(max_strength):
        raise ChameleonUserError(
            f"min_strength, max_strength: expected 0 < min <= max, got {min_strength!r}, {max_strength!r}")
    if temperature != 1.0:
        p = p ** temperature
        p = p / p.sum()
    rng = np.random.default_rng([int(seed), int(stream)])
    n_strengths = _check_count("n_strengths", n_strengths)
    strengths = np.logspace(math.log10(min_strength), math.log10(max_strength), n_strengths)
    s = strengths[rng.integers(0, strengths.size, size=n)]  # [n]
    out = rng.standard_gamma(s[:, None] * p[None, :])  # Dirichlet via normalised Gammas
    sums = out.sum(1)
    # With tiny concentrations every Gamma of a row can underflow to 0: redraw those rows
    # (deterministically, from the same generator).
    while np.any(sums <= 0):
        bad = np.flatnonzero(sums <= 0)
        out[bad] = rng.standard_gamma(s[bad, None] * p[None, :])
        sums = out.sum(1)
    return out / sums[:, None]


def propose_mixtures(natural: Mapping[str, float], n: int = DEFAULT_MIXTURES, seed: int = 0,
                     **kwargs) -> list[dict[str, float]]:
    """The ``n`` mixtures to train the proxies on, as ``{domain: weight}`` dicts (step 1)."""
    if not isinstance(natural, Mapping):
        raise ChameleonUserError("natural: expected a {domain: share} mapping")
    names = list(natural)
    W = sample_mixtures(natural, n, seed, stream=0, **kwargs)
    return [{d: float(w) for d, w in zip(names, row)} for row in W]


def mixture_features(W: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Ridge features of mixtures ``[n, k]``: ``[w_i, log(w_i + 1e-3), w_i w_j (i < j)]``.

    Returns ``(features [n, 2k + k(k-1)/2], names)``.
    """
    W = np.asarray(W, dtype=np.float64)
    k = W.shape[1]
    iu, ju = np.triu_indices(k, 1)
    F = np.concatenate([W, np.log(W + LOG_OFFSET), W[:, iu] * W[:, ju]], axis=1)
    names = ([f"w{i}" for i in range(k)] + [f"log(w{i}+{LOG_OFFSET:g})" for i in range(k)]
             + [f"w{i}*w{j}" for i, j in zip(iu, ju)])
    return F, names


class RidgeRegression:
    """Ridge regression on :func:`mixture_features`, lambda by exact leave-one-out.

    Solved in the dual (an ``[M, M]`` eigendecomposition of the centred Gram matrix of the
    standardised features), so any number of features costs the same and every lambda of the
    grid is scored from one decomposition.
    """

    name = "ridge"

    def fit(self, W: np.ndarray, y: np.ndarray) -> "RidgeRegression":
        F, self.feature_names = mixture_features(W)
        n = F.shape[0]
        self.mean_ = F.mean(0)
        scale = F.std(0)
        self.scale_ = np.where(scale > 1e-12, scale, 1.0)  # constant features centre to 0
        Z = (F - self.mean_) / self.scale_
        self.y_mean_ = float(y.mean())
        yc = y - self.y_mean_
        K = Z @ Z.T
        s, U = np.linalg.eigh(K)
        s = np.clip(s, 0.0, None)
        base = max(float(s.mean()), 1e-300)
        Uy = U.T @ yc
        best = None
        loo = []
        for g in RIDGE_GRID:
            lam = g * base
            shrink = s / (s + lam)
            fitted = U @ (shrink * Uy)
            # Hat matrix diagonal, the intercept included: 1/n + sum_j U_ij^2 s_j / (s_j + lam)
            h = 1.0 / n + (U * U) @ shrink
            denom = 1.0 - h
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.where(denom > 1e-10, (yc - fitted) / denom, np.inf)
            mse = float(np.mean(r * r))
            loo.append(mse)
            # ties (e.g. an exact fit) go to the larger lambda: the smoother model
            if best is None or mse <= best[0]:
                best = (mse, lam, g)
        self.loo_mse_, self.lam_, self.lam_relative_ = best
        self.loo_curve_ = list(zip(RIDGE_GRID.tolist(), loo))
        dual = U @ (Uy / (s + self.lam_))
        self.coef_ = Z.T @ dual  # primal coefficients on the standardised features
        self.n_train_ = n
        return self

    def predict(self, W: np.ndarray) -> np.ndarray:
        W = np.asarray(W, dtype=np.float64)
        out = np.empty(W.shape[0])
        for i in range(0, W.shape[0], _PREDICT_CHUNK):
            F, _ = mixture_features(W[i:i + _PREDICT_CHUNK])
            out[i:i + _PREDICT_CHUNK] = ((F - self.mean_) / self.scale_) @ self.coef_ + self.y_mean_
        return out

    def info(self) -> dict:
        return {"regressor": "ridge", "features": "w_i, log(w_i + 1e-3), w_i*w_j (i<j); standardised",
                "n_features": len(self.feature_names), "lambda": float(self.lam_),
                "lambda_relative": float(self.lam_relative_), "lambda_selection": "exact leave-one-out",
                "loo_rmse": math.sqrt(self.loo_mse_) if math.isfinite(self.loo_mse_) else None}


class _LightGBMRegression:
    """LightGBM gradient boosting on the raw weights, as in the paper."""

    name = "lightgbm"

    def __init__(self, seed: int):
        import lightgbm  # noqa: F401  (raises ImportError when absent)
        self.seed = int(seed)

    def fit(self, W: np.ndarray, y: np.ndarray) -> "_LightGBMRegression":
        import lightgbm
        n = W.shape[0]
        # The paper fits hundreds of mixtures; with a few dozen, LightGBM's default minimum
        # leaf size (20) would leave a near-constant model.
        self.params = {"objective": "regression", "n_estimators": 1000, "learning_rate": 0.01,
                       "min_child_samples": max(2, min(20, n // 4)), "random_state": self.seed,
                       "deterministic": True, "verbose": -1}
        self.model = lightgbm.LGBMRegressor(**self.params)
        self.model.fit(W, y)
        return self

    def predict(self, W: np.ndarray) -> np.ndarray:
        W = np.asarray(W, dtype=np.float64)
        return np.concatenate([np.asarray(self.model.predict(W[i:i + _PREDICT_CHUNK]), dtype=np.float64)
                               for i in range(0, W.shape[0], _PREDICT_CHUNK)])

    def info(self) -> dict:
        return {"regressor": "lightgbm", "features": "w_i", "params": dict(self.params)}


def _lightgbm_available() -> bool:
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        return False
    return True


def fit_regression(mixtures, losses, regressor: str = "auto", seed: int = 0):
    """Fit mixture ``[M, k]`` -> loss ``[M]``; returns an object with ``predict`` and ``info()``.

    ``losses`` may also be ``[M, k']`` per-domain losses: the target is then their mean over
    domains (each proxy's average validation loss). ``regressor``: ``"auto"`` (LightGBM when
    installed, else ridge), ``"ridge"`` or ``"lightgbm"`` (an error when not installed).
    """
    if regressor not in REGRESSORS:
        raise ChameleonUserError(f"regressor: expected one of {REGRESSORS}, got {regressor!r}")
    W = np.asarray(mixtures, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if W.ndim != 2 or W.shape[1] < 2:
        raise ChameleonUserError(f"mixtures: expected [M, k] with k >= 2, got shape {W.shape}")
    if y.ndim == 2:
        y = y.mean(1)
    if y.shape != (W.shape[0],):
        raise ChameleonUserError(
            f"losses: expected [M] = [{W.shape[0]}] (or [M, domains]), got shape {np.shape(losses)}")
    if W.shape[0] < 3:
        raise ChameleonUserError(f"mixtures: at least 3 mixtures are needed to fit, got {W.shape[0]}")
    if not np.all(np.isfinite(W)) or np.any(W < 0) or not np.allclose(W.sum(1), 1.0, rtol=0, atol=WEIGHT_SUM_TOLERANCE):
        raise ChameleonUserError(f"mixtures: every row must be finite weights >= 0 summing to 1 (within {WEIGHT_SUM_TOLERANCE:g})")
    if not np.all(np.isfinite(y)):
        bad = int(np.flatnonzero(~np.isfinite(y))[0])
        raise ChameleonUserError(f"losses: mixture {bad} has loss {y[bad]!r}; expected a finite number")
    if regressor == "lightgbm" and not _lightgbm_available():
        raise ChameleonUserError("regressor='lightgbm' but the lightgbm package is not installed; "
                                 "install it or use regressor='ridge' / 'auto'")
    if regressor == "lightgbm" or (regressor == "auto" and _lightgbm_available()):
        return _LightGBMRegression(seed).fit(W, y)
    return RidgeRegression().fit(W, y)


@dataclass
class RegMixResult:
    """RegMix's mixture and the record of how it was found."""

    weights: np.ndarray  # [k] the average of the top_k candidates, sums to 1
    domains: list
    regressor: dict  # which regressor ran and its settings (lambda, LOO error, ...)
    n_mixtures: int
    n_candidates: int
    top_k: int
    seed: int
    predicted_loss_top_k: float  # mean predicted loss of the top_k candidates
    predicted_loss: float  # predicted loss of the averaged mixture itself
    best_observed: dict = field(default_factory=dict)  # the proxy mixture with the lowest loss

    def as_dict(self) -> dict:
        names = self.domains or [str(i) for i in range(len(self.weights))]
        return {"method": "regmix", "weights": {n: float(w) for n, w in zip(names, self.weights)},
                "regressor": self.regressor, "n_mixtures": self.n_mixtures,
                "n_candidates": self.n_candidates, "top_k": self.top_k, "seed": self.seed,
                "predicted_loss_top_k": self.predicted_loss_top_k,
                "predicted_loss": self.predicted_loss, "best_observed": self.best_observed}


def regmix_weights(mixtures, losses, natural, seed: int = 0, *,
                   n_candidates: int = DEFAULT_CANDIDATES, top_k: int = DEFAULT_TOP_K,
                   regressor: str = "auto", temperature: float = 1.0) -> RegMixResult:
    """RegMix's mixture from the proxies' ``mixtures`` ``[M, k]`` and validation ``losses``.

    ``natural`` (``{domain: share}`` or ``[k]``) centres the candidates' Dirichlet, as it
    centred the proposals; ``seed`` seeds the candidates (a stream separate from the
    proposals'). The output is the mean of the ``top_k`` candidates of lowest predicted loss.
    """
    names, p = _natural_vector(natural)
    W = np.asarray(mixtures, dtype=np.float64)
    if W.ndim != 2 or W.shape[1] != p.size:
        raise ChameleonUserError(f"mixtures: expected [M, {p.size}] (one column per domain), got shape {W.shape}")
    n_candidates = _check_count("n_candidates", n_candidates)
    top_k = _check_count("top_k", top_k)
    if top_k > n_candidates:
        raise ChameleonUserError(f"top_k: {top_k} exceeds n_candidates {n_candidates}")
    model = fit_regression(W, losses, regressor, seed)
    candidates = sample_mixtures(p, n_candidates, seed, stream=1, temperature=temperature)
    pred = model.predict(candidates)
    # stable sort: equal predictions keep candidate order, so the result is deterministic
    top = np.argsort(pred, kind="stable")[:top_k]
    weights = candidates[top].mean(0)
    weights = weights / weights.sum()
    y = np.asarray(losses, dtype=np.float64)
    y = y.mean(1) if y.ndim == 2 else y
    best = int(np.argmin(y))
    return RegMixResult(
        weights=weights, domains=names or [], regressor=model.info(), n_mixtures=W.shape[0],
        n_candidates=n_candidates, top_k=top_k, seed=int(seed),
        predicted_loss_top_k=float(pred[top].mean()),
        predicted_loss=float(model.predict(weights[None, :])[0]),
        best_observed={"index": best, "loss": float(y[best]), "weights": W[best].tolist()})


class RegMixSearch:
    """The RegMix procedure as a resumable record: proposals, then one loss per proxy.

    ``search = RegMixSearch(natural, n_mixtures, seed)``; for each ``i`` in
    ``search.pending()`` train a proxy on ``search.mixtures[i]`` and ``search.record(i, loss)``
    (a number, or ``{domain: validation loss}``, averaged over domains); when
    ``search.done``, ``search.result()`` is the mixture. :meth:`to_dict` / :meth:`from_dict`
    are JSON-friendly, so a rerun skips every proxy already recorded.
    """

    FORMAT = "chameleon_ext.regmix_search/1"

    def __init__(self, natural: Mapping[str, float], n_mixtures: int = DEFAULT_MIXTURES, seed: int = 0,
                 temperature: float = 1.0):
        if not isinstance(natural, Mapping):
            raise ChameleonUserError("natural: expected a {domain: share} mapping")
        names, _ = _natural_vector(natural)  # validates
        # kept as given (not renormalised), so a record rebuilt from JSON draws the same bits
        self.domains, self.natural = names, dict(zip(names, (float(v) for v in natural.values())))
        self.n_mixtures, self.seed = _check_count("n_mixtures", n_mixtures, 3), int(seed)
        self.temperature = float(temperature)
        W = sample_mixtures(self.natural, self.n_mixtures, self.seed, stream=0, temperature=self.temperature)
        self.mixtures = [{d: float(w) for d, w in zip(names, row)} for row in W]
        self.losses: list = [None] * self.n_mixtures

    def pending(self) -> list:
        return [i for i, v in enumerate(self.losses) if v is None]

    @property
    def done(self) -> bool:
        return not self.pending()

    def record(self, i: int, loss) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_mixtures:
            raise ChameleonUserError(f"record: mixture index must be in [0, {self.n_mixtures}), got {i!r}")
        if isinstance(loss, Mapping):
            values = [float(v) for v in loss.values()]
            value = math.fsum(values) / len(values) if values else math.nan
        else:
            value = float(loss)
        if not math.isfinite(value):
            raise ChameleonUserError(f"record: proxy {i} has validation loss {loss!r}; expected finite")
        self.losses[i] = value

    def result(self, *, n_candidates: int = DEFAULT_CANDIDATES, top_k: int = DEFAULT_TOP_K,
               regressor: str = "auto") -> RegMixResult:
        if not self.done:
            raise ChameleonUserError(f"RegMix: proxies {self.pending()} have no validation loss yet")
        W = np.array([[m[d] for d in self.domains] for m in self.mixtures])
        return regmix_weights(W, np.array(self.losses), self.natural, self.seed, n_candidates=n_candidates,
                              top_k=top_k, regressor=regressor, temperature=self.temperature)

    def to_dict(self) -> dict:
        return {"format": self.FORMAT, "natural": dict(self.natural), "n_mixtures": self.n_mixtures,
                "seed": self.seed, "temperature": self.temperature, "mixtures": self.mixtures,
                "losses": list(self.losses)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RegMixSearch":
        if d.get("format") != cls.FORMAT:
            raise ChameleonUserError("RegMix search: not a chameleon_ext RegMix record (format mismatch)")
        search = cls(d["natural"], d["n_mixtures"], d["seed"], d["temperature"])
        if search.mixtures != d["mixtures"]:
            # the proposals are a pure function of the seed; a mismatch means another version
            raise ChameleonUserError("RegMix search: the recorded mixtures differ from the seed's proposals")
        for i, v in enumerate(d["losses"]):
            if v is not None:
                search.record(i, v)
        return search
