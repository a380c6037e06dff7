"""RegMix: Dirichlet proposals around the natural distribution, the ridge fallback with exact
leave-one-out lambda, recovery of a planted optimum, determinism, the regressor record."""

import sys
import types

import numpy as np
import pytest

from chameleon_ext.baselines import regmix as R
from chameleon_ext.errors import ChameleonUserError

NATURAL = {"web": 0.4, "code": 0.3, "books": 0.2, "wiki": 0.1}
P = np.array(list(NATURAL.values()))
W_STAR = np.array([0.1, 0.4, 0.2, 0.3])  # planted optimum, away from the natural centre
A = np.array([[2.0, 0.3, 0.0, 0.1],
              [0.3, 1.0, 0.2, 0.0],
              [0.0, 0.2, 1.5, 0.3],
              [0.1, 0.0, 0.3, 1.2]])  # positive definite


def planted_loss(W):
    """A validation loss with a known minimiser on the simplex: 3 + (w - w*)^T A (w - w*)."""
    D = np.asarray(W) - W_STAR
    return 3.0 + np.einsum("ni,ij,nj->n", D, A, D)


def test_proposals_are_seeded_mixtures():
    a = R.sample_mixtures(NATURAL, 32, seed=5)
    b = R.sample_mixtures(NATURAL, 32, seed=5)
    c = R.sample_mixtures(NATURAL, 32, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (32, 4) and np.all(a >= 0)
    np.testing.assert_allclose(a.sum(1), 1.0, rtol=0, atol=1e-12)
    props = R.propose_mixtures(NATURAL, 32, seed=5)
    assert [list(m) for m in props] == [list(NATURAL)] * 32
    np.testing.assert_allclose([[m[d] for d in NATURAL] for m in props], a, rtol=0, atol=0)


def test_proposals_are_dirichlet_around_the_natural_distribution():
    # Dirichlet(s p) has mean p for every strength s and variance p(1-p)/(s+1); the strength
    # is uniform over 15 log-spaced values in [0.1, 5].
    W = R.sample_mixtures(NATURAL, 200_000, seed=0)
    np.testing.assert_allclose(W.mean(0), P, rtol=0, atol=0.004)
    s = np.logspace(np.log10(0.1), np.log10(5.0), 15)
    var = P * (1 - P) * np.mean(1.0 / (s + 1.0))
    np.testing.assert_allclose(W.var(0), var, rtol=0.03)


def test_temperature_flattens_the_centre():
    W = R.sample_mixtures(NATURAL, 100_000, seed=1, temperature=0.5)
    q = np.sqrt(P) / np.sqrt(P).sum()
    np.testing.assert_allclose(W.mean(0), q, rtol=0, atol=0.005)


def test_features_by_hand():
    F, names = R.mixture_features(np.array([[0.5, 0.3, 0.2]]))
    expected = [0.5, 0.3, 0.2, np.log(0.501), np.log(0.301), np.log(0.201), 0.15, 0.1, 0.06]
    np.testing.assert_allclose(F[0], expected, rtol=1e-15, atol=0)
    assert names[-3:] == ["w0*w1", "w0*w2", "w1*w2"]


def brute_force_loo(W, y, lam):
    """Leave-one-out squared error of ridge (intercept unpenalised) by refitting n times,
    standardising with the statistics of all n mixtures (as the model under test does)."""
    F, _ = R.mixture_features(W)
    sd = F.std(0)
    Z = (F - F.mean(0)) / np.where(sd > 1e-12, sd, 1.0)
    X = np.hstack([np.ones((len(y), 1)), Z])
    pen = lam * np.eye(X.shape[1])
    pen[0, 0] = 0.0
    errs = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        beta = np.linalg.solve(X[keep].T @ X[keep] + pen, X[keep].T @ y[keep])
        errs.append(y[i] - X[i] @ beta)
    return float(np.mean(np.square(errs)))


def test_ridge_leave_one_out_matches_refitting():
    rng = np.random.default_rng(0)
    W = R.sample_mixtures(NATURAL, 24, seed=3)
    y = planted_loss(W) + rng.normal(0, 0.01, len(W))
    model = R.RidgeRegression().fit(W, y)
    curve = dict(model.loo_curve_)
    F, _ = R.mixture_features(W)
    sd = F.std(0)
    Z = (F - F.mean(0)) / np.where(sd > 1e-12, sd, 1.0)
    Zc = Z - Z.mean(0)
    base = np.clip(np.linalg.eigvalsh(Zc @ Zc.T), 0, None).mean()
    for g in (1e-4, 1e-2, 1.0, 1e2):
        key = min(curve, key=lambda k: abs(np.log(k / g)))
        assert brute_force_loo(W, y, key * base) == pytest.approx(curve[key], rel=1e-6)
    assert model.loo_mse_ == min(curve.values())


def test_ridge_fits_a_quadratic_exactly():
    W = R.sample_mixtures(NATURAL, 32, seed=4)
    model = R.RidgeRegression().fit(W, planted_loss(W))
    new = R.sample_mixtures(NATURAL, 1000, seed=9)
    np.testing.assert_allclose(model.predict(new), planted_loss(new), rtol=0, atol=1e-4)


@pytest.mark.parametrize("noise", [0.0, 0.002])
def test_recovers_a_planted_optimum(noise):
    # Tolerance: every weight within 0.03 of the planted optimum w* (noise-free: 0.01).
    W = R.sample_mixtures(NATURAL, 32, seed=0)
    y = planted_loss(W) + np.random.default_rng(1).normal(0, noise, len(W))
    res = R.regmix_weights(W, y, NATURAL, seed=0)
    tol = 0.01 if noise == 0 else 0.03
    np.testing.assert_allclose(res.weights, W_STAR, rtol=0, atol=tol)
    assert res.weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert res.regressor["regressor"] == "ridge"
    assert res.n_mixtures == 32 and res.n_candidates == 100_000 and res.top_k == 100
    # the averaged mixture beats every proxy mixture on the true loss
    assert planted_loss(res.weights[None])[0] < planted_loss(W).min()
    d = res.as_dict()
    assert list(d["weights"]) == list(NATURAL) and d["regressor"]["lambda_selection"] == "exact leave-one-out"


def test_deterministic_for_a_seed_and_per_domain_losses_are_averaged():
    W = R.sample_mixtures(NATURAL, 20, seed=2)
    y = planted_loss(W)
    per_domain = np.stack([y - 0.5, y + 0.5], axis=1)  # mean over domains is y
    a = R.regmix_weights(W, y, NATURAL, seed=7, n_candidates=20_000, top_k=50)
    b = R.regmix_weights(W, per_domain, NATURAL, seed=7, n_candidates=20_000, top_k=50)
    c = R.regmix_weights(W, y, NATURAL, seed=8, n_candidates=20_000, top_k=50)
    assert np.array_equal(a.weights, b.weights)
    assert not np.array_equal(a.weights, c.weights)


class _FakeLGBMRegressor:
    """Stands in for lightgbm.LGBMRegressor (not installed here): nearest neighbour."""

    def __init__(self, **params):
        self.params = params

    def fit(self, X, y):
        self.X, self.y = np.asarray(X), np.asarray(y)
        return self

    def predict(self, X):
        d = ((np.asarray(X)[:, None, :] - self.X[None]) ** 2).sum(-1)
        return self.y[d.argmin(1)]


def test_regressor_choice_is_recorded(monkeypatch):
    W = R.sample_mixtures(NATURAL, 16, seed=0)
    y = planted_loss(W)
    try:
        import lightgbm  # noqa: F401
        have = True
    except ImportError:
        have = False
    if not have:
        assert R.regmix_weights(W, y, NATURAL, n_candidates=1000, top_k=10).regressor["regressor"] == "ridge"
        with pytest.raises(ChameleonUserError, match="lightgbm package is not installed"):
            R.regmix_weights(W, y, NATURAL, regressor="lightgbm")
    monkeypatch.setitem(sys.modules, "lightgbm", types.SimpleNamespace(LGBMRegressor=_FakeLGBMRegressor))
    res = R.regmix_weights(W, y, NATURAL, n_candidates=1000, top_k=10)
    assert res.regressor["regressor"] == "lightgbm"
    assert res.regressor["params"]["min_child_samples"] == 4 and res.regressor["params"]["random_state"] == 0
    assert R.regmix_weights(W, y, NATURAL, n_candidates=1000, top_k=10,
                            regressor="ridge").regressor["regressor"] == "ridge"


def test_bad_input_raises():
    W = R.sample_mixtures(NATURAL, 8, seed=0)
    y = planted_loss(W)
    with pytest.raises(ChameleonUserError, match="share > 0"):
        R.sample_mixtures({"a": 0.0, "b": 1.0}, 4)
    with pytest.raises(ChameleonUserError, match="summing to 1"):
        R.fit_regression(W * 2, y)
    with pytest.raises(ChameleonUserError, match="losses"):
        R.fit_regression(W, y[:5])
    with pytest.raises(ChameleonUserError, match="finite"):
        R.fit_regression(W, np.where(np.arange(8) == 3, np.nan, y))
    with pytest.raises(ChameleonUserError, match="top_k"):
        R.regmix_weights(W, y, NATURAL, n_candidates=10, top_k=11)
    with pytest.raises(ChameleonUserError, match="regressor"):
        R.fit_regression(W, y, regressor="xgboost")
    with pytest.raises(ChameleonUserError, match=r"\[M, 4\]"):
        R.regmix_weights(W[:, :3] / W[:, :3].sum(1, keepdims=True), y, NATURAL)


def test_search_record_resumes_through_json():
    import json

    search = R.RegMixSearch(NATURAL, n_mixtures=12, seed=3)
    W = np.array([[m[d] for d in NATURAL] for m in search.mixtures])
    assert np.array_equal(W, R.sample_mixtures(NATURAL, 12, seed=3))  # the proposals' stream
    y = planted_loss(W)
    for i in range(5):
        search.record(i, {"web": y[i] - 1, "code": y[i] + 1})  # per-domain: averaged
    with pytest.raises(ChameleonUserError, match="no validation loss"):
        search.result()
    again = R.RegMixSearch.from_dict(json.loads(json.dumps(search.to_dict())))
    assert again.pending() == list(range(5, 12))
    for i in again.pending():
        again.record(i, y[i])
    res = again.result(n_candidates=5000, top_k=20)
    direct = R.regmix_weights(W, y, NATURAL, seed=3, n_candidates=5000, top_k=20)
    np.testing.assert_allclose(res.weights, direct.weights, rtol=0, atol=1e-12)
    with pytest.raises(ChameleonUserError, match="finite"):
        again.record(0, float("nan"))
