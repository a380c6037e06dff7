"""Bootstrap intervals, lambda/temperature sweeps, diagnostics and the per-window cache entry.

The bootstrap is checked against a float64 NumPy re-implementation written here (a plain loop
over resamples: index the windows, average, Chameleon by np.linalg.inv, np.quantile), the
sweep against a loop of scalar ``krls`` calls and the plain weights path."""

from __future__ import annotations

import functools
import json
import math
import warnings

import numpy as np
import pytest
import torch

import chameleon_ext
from chameleon_ext import embed_cache, io, uncertainty as U, weights as W
from chameleon_ext.uncertainty import sweep as sweep_module
from chameleon_ext.errors import ChameleonUserError

# the plain path every bootstrap entry must match (these tests check the paper rule against the NumPy oracle)
plain_weights = functools.partial(W.weights_from_embeddings, rule="paper")

NAMES = ["arxiv", "book", "c4", "cc", "github", "stackexchange", "wikipedia"]


def synthetic_windows(k=5, n=256, d=16, spread=1.0, separation=3.0, seed=0, dtype=torch.float32):
    """k domains: centres ~ N(0, separation^2) plus a shared offset, windows = centre +
    N(0, spread^2) noise. Returns (windows list, centres [k, d])."""
    g = torch.Generator().manual_seed(seed)
    centres = separation * torch.randn(k, d, generator=g, dtype=torch.float64) + 5.0
    windows = [(c + spread * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype) for c in centres]
    return windows, centres


# --------------------------------------------------------------------------------------------
# Independent float64 NumPy reference
# --------------------------------------------------------------------------------------------


def np_chameleon(X, lam, mode, T, normalize=True):
    """Raw KRLS, scores and weights of embeddings X [k, d] (docs/method.md steps 3-5, via inv)."""
    k = X.shape[0]
    H = np.eye(k) - 1.0 / k
    Kc = H @ (X @ X.T) @ H
    raw = np.diag(Kc @ np.linalg.inv(Kc + lam * k * np.eye(k)))
    S = raw / raw.sum() if normalize else raw
    z = 1.0 / ((S + 1e-12) * T) if mode == "pretrain" else S / T
    z = np.exp(z - z.max())
    return raw, S, z / z.sum()


def np_bootstrap(windows, indices, lam, mode, T, level):
    """indices[i]: [B, n_i] resampled window indices of domain i. A loop over resamples."""
    arrays = [w.double().numpy() for w in windows]
    B = indices[0].shape[0]
    ws, ss = [], []
    for b in range(B):
        X = np.stack([arrays[i][indices[i][b]].mean(0) for i in range(len(arrays))])
        _, S, w = np_chameleon(X, lam, mode, T)
        ws.append(w)
        ss.append(S)
    ws, ss = np.array(ws), np.array(ss)
    q = [(1 - level) / 2, (1 + level) / 2]
    _, _, w_point = np_chameleon(np.stack([x.mean(0) for x in arrays]), lam, mode, T)
    rank = np.empty(len(arrays), dtype=int)
    rank[np.argsort(-w_point, kind="stable")] = np.arange(1, len(arrays) + 1)
    kept = np.zeros(len(arrays))
    for w in ws:
        r = np.empty(len(arrays), dtype=int)
        r[np.argsort(-w, kind="stable")] = np.arange(1, len(arrays) + 1)
        kept += r == rank
    return dict(
        w_point=w_point, w_q=np.quantile(ws, q, axis=0), w_std=ws.std(0, ddof=1), s_q=np.quantile(ss, q, axis=0),
        s_std=ss.std(0, ddof=1), rank=rank, stability=kept / B,
    )


def counts_from_indices(indices, n):
    return [torch.from_numpy(np.stack([np.bincount(row, minlength=m) for row in idx]).astype(np.float64))
            for idx, m in zip(indices, n)]


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_bootstrap_matches_numpy_loop(mode):
    windows, _ = synthetic_windows(k=5, n=40, d=12, spread=2.0, separation=1.0, seed=1, dtype=torch.float64)
    windows[3] = windows[3][:29]  # unequal n
    n = [w.shape[0] for w in windows]
    rng = np.random.default_rng(7)
    B = 60
    indices = [rng.integers(0, m, size=(B, m)) for m in n]
    lam, T, level = 0.5, (3.0 if mode == "pretrain" else 0.4), 0.9
    res = U.bootstrap_weights(
        windows, resamples=B, level=level, mode=mode, lam=lam, temperature=T,
        draw_counts=counts_from_indices(indices, n), window_fractions=(), rule="paper"
    )
    ref = np_bootstrap(windows, indices, lam, mode, T, level)
    tol = dict(rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.point.weights.numpy(), ref["w_point"], **tol)
    np.testing.assert_allclose(res.weights_low.numpy(), ref["w_q"][0], **tol)
    np.testing.assert_allclose(res.weights_high.numpy(), ref["w_q"][1], **tol)
    np.testing.assert_allclose(res.weights_std.numpy(), ref["w_std"], **tol)
    np.testing.assert_allclose(res.leverage_low.numpy(), ref["s_q"][0], **tol)
    np.testing.assert_allclose(res.leverage_high.numpy(), ref["s_q"][1], **tol)
    np.testing.assert_allclose(res.leverage_std.numpy(), ref["s_std"], **tol)
    np.testing.assert_array_equal(res.rank.numpy(), ref["rank"])
    np.testing.assert_allclose(res.rank_stability.numpy(), ref["stability"], rtol=0, atol=1e-15)
    assert res.seed is None and res.n_windows == n and res.resamples == B


def test_random_draw_countsare_multinomial_draws():
    g = torch.Generator().manual_seed(3)
    counts = U.resample_counts([5, 300], 400, g)
    assert [tuple(c.shape) for c in counts] == [(400, 5), (400, 300)]
    for c, m in zip(counts, [5, 300]):
        assert torch.equal(c, c.round()) and bool((c >= 0).all())
        assert torch.equal(c.sum(1), torch.full((400,), float(m), dtype=torch.float64))
        # Each window is drawn with probability 1/n per draw: mean count 1 per window.
        assert abs(float(c.mean()) - 1.0) < 1e-12
    # Variance of a multinomial(n, 1/n) cell: (1 - 1/n); with 300 x 400 cells, close to 1.
    assert abs(float(counts[1].var()) - (1 - 1 / 300)) < 0.02


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


def test_identity_resample_reproduces_plain_weights_exactly():
    # n_i = 1: the identity resample's embedding is the window itself, bit for bit.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(7, 32, generator=g, dtype=torch.float64) + 2.0
    for mode, T in [("pretrain", None), ("finetune", None), ("pretrain", 0.7)]:
        res = U.bootstrap_weights([x.unsqueeze(0) for x in X], resamples=1, mode=mode, temperature=T,
                                  draw_counts=[torch.ones(1, 1)] * 7, window_fractions=(), domains=NAMES, rule="paper")
        plain = plain_weights(X, mode, temperature=T, domains=NAMES)
        assert torch.equal(res.weight_samples[0], plain.weights)
        assert torch.equal(res.leverage_samples[0], plain.leverage)
        assert torch.equal(res.effective_dimension_samples[0], plain.leverage_raw.sum())
        assert torch.equal(res.weights_low, plain.weights) and torch.equal(res.weights_high, plain.weights)
        assert torch.equal(res.weights_std, torch.zeros(7, dtype=torch.float64))
        assert torch.equal(res.rank_stability, torch.ones(7, dtype=torch.float64))


def test_identity_resample_of_many_windows_is_the_plain_path():
    windows, _ = synthetic_windows(k=7, n=64, d=24, seed=2, dtype=torch.float64)
    ones = [torch.ones(1, 64, dtype=torch.float64)] * 7
    res = U.bootstrap_weights(windows, resamples=1, draw_counts=ones, window_fractions=(), rule="paper")
    # The plain path on the same float64 embeddings (the windows' mean as C @ W / n).
    X = torch.stack([(ones[i] @ windows[i].double() / 64)[0] for i in range(7)])
    assert torch.equal(res.weight_samples[0], plain_weights(X).weights)
    # ... and on the windows' mean computed otherwise, to rounding.
    mean = torch.stack([w.double().mean(0) for w in windows])
    torch.testing.assert_close(res.weight_samples[0], plain_weights(mean).weights, rtol=0, atol=1e-14)
    torch.testing.assert_close(res.point.weights, plain_weights(mean).weights, rtol=0, atol=0)


def test_float32_windows_agree_with_float64_sums():
    """float32 windows are summed in float32 (after removing their common mean): the weights
    of every resample stay within a tiny fraction of the interval width of float64 sums."""
    windows, _ = synthetic_windows(k=7, n=512, d=64, spread=3.0, separation=0.3, seed=12)
    windows = [w + 40.0 for w in windows]  # a large common part, as hidden states have
    w32 = U.bootstrap_weights(windows, resamples=100, seed=4, window_fractions=(), rule="paper")
    w64 = U.bootstrap_weights([w.double() for w in windows], resamples=100, seed=4, window_fractions=(), rule="paper")
    width = float(w64.weight_interval_width.min())
    assert width > 0
    assert float((w32.weight_samples - w64.weight_samples).abs().max()) < 1e-4 * width
    assert torch.equal(w32.point.weights, w64.point.weights)  # the point uses float64 means either way
    # bfloat16 windows (a bf16 cache) are summed as their exact float32 values.
    bf16 = [w.bfloat16() for w in windows]
    a = U.bootstrap_weights(bf16, resamples=20, seed=4, window_fractions=(), rule="paper")
    b = U.bootstrap_weights([w.float() for w in bf16], resamples=20, seed=4, window_fractions=(), rule="paper")
    assert torch.equal(a.weight_samples, b.weight_samples)


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_intervals_contain_the_point_estimate(mode):
    windows, _ = synthetic_windows(k=6, n=200, d=16, spread=2.0, seed=4)
    res = U.bootstrap_weights(windows, resamples=300, mode=mode, lam=1.0, seed=0, window_fractions=(), rule="paper")
    for point, lo, hi in [
        (res.point.weights, res.weights_low, res.weights_high),
        (res.point.leverage, res.leverage_low, res.leverage_high),
    ]:
        assert bool((lo <= point).all() and (point <= hi).all()), (lo, point, hi)
        assert bool((hi - lo > 0).all())
    assert bool((res.weights_std > 0).all())
    assert abs(float(res.weight_samples.sum(1).mean()) - 1.0) < 1e-12


def test_intervals_shrink_like_one_over_sqrt_n():
    widths = {}
    for n in (100, 400, 1600):
        windows, _ = synthetic_windows(k=5, n=n, d=8, spread=3.0, seed=5)
        res = U.bootstrap_weights(windows, resamples=400, lam=1.0, seed=1, window_fractions=(), rule="paper")
        widths[n] = float(res.weight_interval_width.mean())
    # Known spread: the resampled means' std is spread / sqrt(n), so each 4x of n halves it.
    for small, large in [(100, 400), (400, 1600)]:
        assert 0.35 < widths[large] / widths[small] < 0.7, widths


def test_window_sufficiency_in_the_same_call():
    windows, _ = synthetic_windows(k=5, n=400, d=8, spread=3.0, seed=6)
    res = U.bootstrap_weights(windows, resamples=400, lam=1.0, seed=2, rule="paper")
    win = res.windows
    assert win.fractions == [0.25, 0.5, 1.0]
    assert win.windows == [[100] * 5, [200] * 5, [400] * 5]
    assert win.width[0] > win.width[1] > win.width[2]
    assert 1.5 < win.width[0] / win.width[2] < 2.6  # about sqrt(4)
    assert win.enough_fraction == 1.0 and win.enough_windows == [400] * 5  # still shrinking
    assert win.width[2] == pytest.approx(float(res.weight_interval_width.mean()), abs=1e-15)
    # Windows without spread: every subset gives the same weights, width 0 -> n/4 is enough.
    flat = [w[:1].expand(64, -1).clone() for w in windows]
    res = U.bootstrap_weights(flat, resamples=20, lam=1.0, seed=2, rule="paper")
    assert max(res.windows.width) < 1e-8 and res.windows.enough_fraction == 0.25  # float32 rounding only
    res64 = U.bootstrap_weights([w.double() for w in flat], resamples=20, lam=1.0, seed=2, rule="paper")
    assert res64.windows.width == [0.0, 0.0, 0.0] and res64.windows.enough_fraction == 0.25
    d = res.windows.to_dict()
    assert d["enough_windows"] == {str(i): 16 for i in range(5)} and d["still_shrinking"] is False


def test_same_seed_same_intervals_other_seed_others():
    windows, _ = synthetic_windows(k=4, n=100, d=8, seed=7)
    a = U.bootstrap_weights(windows, resamples=50, seed=11, rule="paper")
    b = U.bootstrap_weights(windows, resamples=np.int64(50), seed=11, rule="paper")  # any integer type
    c = U.bootstrap_weights(windows, resamples=50, seed=12, rule="paper")
    for field in ("weight_samples", "leverage_samples", "weights_low", "weights_high", "weights_std", "rank_stability"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.windows.width == b.windows.width
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    assert not torch.equal(a.weight_samples, c.weight_samples)


def test_padded_input_equals_list_input():
    windows, _ = synthetic_windows(k=3, n=30, d=6, seed=8)
    windows[1] = windows[1][:17]
    padded = torch.zeros(3, 30, 6)
    for i, w in enumerate(windows):
        padded[i, : len(w)] = w
    a = U.bootstrap_weights(windows, resamples=40, seed=3, rule="paper")
    b = U.bootstrap_weights(padded, counts=torch.tensor([30, 17, 30]), resamples=40, seed=3, rule="paper")
    assert torch.equal(a.weight_samples, b.weight_samples) and b.n_windows == [30, 17, 30]


def test_point_result_fixes_the_settings():
    windows, centres = synthetic_windows(k=4, n=50, d=8, seed=9)
    point = plain_weights(centres, "finetune", lam=2.0, temperature=0.5, domains=NAMES[:4])
    res = U.bootstrap_weights(windows, resamples=30, point=point)
    assert res.point is point and res.domains == NAMES[:4]
    own = U.bootstrap_weights(windows, resamples=30, mode="finetune", lam=2.0, temperature=0.5, rule="paper")
    assert torch.equal(res.weight_samples, own.weight_samples)
    with pytest.raises(ChameleonUserError, match="give either point or lam"):
        U.bootstrap_weights(windows, resamples=30, point=point, lam=1.0)


def test_degenerate_domains_follow_the_plain_path():
    # Every window identical everywhere: zero leverage -> uniform, as weights_from_embeddings does.
    w = torch.ones(10, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = U.bootstrap_weights([w, w.clone(), w.clone()], resamples=5, window_fractions=(), rule="paper")
        one = U.bootstrap_weights([w], resamples=5, window_fractions=(), rule="paper")
    assert torch.equal(res.weight_samples, torch.full((5, 3), 1 / 3, dtype=torch.float64))
    assert torch.equal(res.point.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.equal(one.weight_samples, torch.ones(5, 1, dtype=torch.float64))


def test_bootstrap_result_dict_and_table():
    windows, _ = synthetic_windows(k=7, n=64, d=8, seed=10)
    res = U.bootstrap_weights(windows, resamples=100, seed=5, domains=NAMES, rule="paper")
    d = json.loads(json.dumps(res.to_dict()))
    assert d["resamples"] == 100 and d["seed"] == 5 and d["level"] == 0.95 and d["lambda"] == 10.0
    assert set(d["weights"]) == {"point", "low", "high", "std"} and list(d["weights"]["low"]) == NAMES
    assert d["rank"]["arxiv"] == int(res.rank[0]) and 0 <= d["rank_stability"]["c4"] <= 1
    eff = d["effective_dimension"]
    assert eff["low"] <= eff["high"] and eff["point"] == pytest.approx(float(res.point.leverage_raw.sum()))
    table = U.format_bootstrap_table(res)
    assert "100 resamples of 64 windows, seed 5" in table
    assert all(name in table for name in NAMES) and len(table.splitlines()) == 9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(resamples=0), "resamples must be an integer >= 1"),
        (dict(level=1.0), "level must be a number in"),
        (dict(lam=-1.0), "lambda: expected a finite number > 0"),
        (dict(window_fractions=(0.5, 1.0)), "window_fractions"),
        (dict(domains=["a"]), "domains of window_embeddings: expected 2 names, got 1"),
        (dict(draw_counts=[torch.ones(3, 4)] * 2), "draw_counts must be"),
    ],
)
def test_bootstrap_bad_arguments(kwargs, match):
    windows = [torch.randn(4, 3), torch.randn(4, 3)]
    with pytest.raises(ValueError, match=match):
        U.bootstrap_weights(windows, **kwargs, rule="paper")


@pytest.mark.parametrize(
    "windows, match",
    [
        ([], "empty"),
        ([torch.randn(4, 3), torch.randn(4, 5)], "has d = 5"),
        ([torch.randn(4, 3), torch.zeros(0, 3)], r"window_embeddings\[1\] must hold"),
        ([torch.randn(4, 3), torch.tensor([[1.0, float("nan"), 0.0]])], r"domain\(s\) \[1\] \(index\) hold NaN"),
        ([torch.tensor([[float("inf"), 0.0, 0.0]]), torch.randn(4, 3)], r"domain\(s\) \[0\]"),
        ([torch.randn(4, 3), torch.ones(4, 3, dtype=torch.int64)], "floating point"),
        (torch.randn(4, 3), "padded tensor"),
        ("windows", "list of k tensors"),
    ],
)
def test_bootstrap_bad_windows(windows, match):
    with pytest.raises(ChameleonUserError, match=match):
        U.bootstrap_weights(windows, resamples=2, rule="paper")


def test_padded_counts_out_of_range():
    with pytest.raises(ChameleonUserError, match="counts must give k = 2"):
        U.bootstrap_weights(torch.randn(2, 5, 3), counts=[5, 6], resamples=2, rule="paper")


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------

LAMBDAS = [1e-3, 0.1, 1.0, 10.0, 1e3]
TEMPS = [0.2, 1.0, 5.0]


def _check_sweep_against_loops(sweep, X, mode):
    A = X @ X.T
    for i, lam in enumerate(LAMBDAS):
        raw = chameleon_ext.krls(A, lam)  # one scalar call per lambda
        torch.testing.assert_close(sweep.leverage_raw[i], raw, rtol=0, atol=1e-12)
        torch.testing.assert_close(sweep.effective_dimension[i], raw.sum(), rtol=0, atol=1e-12)
        for j, T in enumerate(TEMPS):
            plain = plain_weights(X, mode, lam=lam, temperature=T)
            torch.testing.assert_close(sweep.weights[i, j], plain.weights, rtol=0, atol=1e-12)
            torch.testing.assert_close(sweep.leverage[i], plain.leverage, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_sweep_equals_loop_of_scalar_calls(mode):
    X = torch.randn(7, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sweep = U.sweep_weights(X, LAMBDAS, TEMPS, mode=mode, domains=NAMES, rule="paper")
    assert sweep.weights.shape == (5, 3, 7)
    _check_sweep_against_loops(sweep, X, mode)
    assert torch.equal(sweep.weights_at(10.0, 1.0), sweep.weights[3, 1])


def test_sweep_is_one_krls_call_with_a_tensor_lambda(monkeypatch):
    """Every lambda goes through ONE krls call, lam a tensor with one lambda per matrix."""
    calls = []
    real_krls = sweep_module.krls

    def counting_krls(K, lam=10.0, center=True, scale_by_k=True):
        calls.append((tuple(K.shape), tuple(lam.shape) if isinstance(lam, torch.Tensor) else None))
        return real_krls(K, lam=lam, center=center, scale_by_k=scale_by_k)

    monkeypatch.setattr(sweep_module, "krls", counting_krls)
    X = torch.randn(6, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sweep = U.sweep_weights(X, LAMBDAS, TEMPS, mode="pretrain", rule="paper")
    assert calls == [((5, 6, 6), (5,))]
    _check_sweep_against_loops(sweep, X, "pretrain")


def test_sweep_dict_and_effective_dimension():
    X = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sweep = U.sweep_weights(X, [0.01, 100.0], [1.0, 2.0], mode="finetune", domains=NAMES[:4], rule="paper")
    d = json.loads(json.dumps(sweep.to_dict()))
    assert d["lambdas"] == [0.01, 100.0] and d["temperatures"] == [1.0, 2.0] and len(d["results"]) == 4
    expected = {"lambda": 0.01, "temperature": 2.0, "weights": dict(zip(NAMES[:4], sweep.weights[0, 1].tolist()))}
    assert d["results"][1] == expected
    # sum(S) falls with lambda, and stays below k - 1 = 3 (the centred kernel's rank).
    assert 3 > d["effective_dimension"][0] > d["effective_dimension"][1] > 0
    assert d["effective_dimension_share"][0] == pytest.approx(d["effective_dimension"][0] / 3)
    table = U.format_sweep_table(sweep)
    assert len(table.splitlines()) == 5 and "sum(S)" in table
    # Default temperature: the mode's.
    assert U.sweep_weights(X, [1.0], rule="paper").temperatures == [5.0]


def test_sweep_bad_arguments():
    X = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ChameleonUserError, match="lambdas must be a non-empty list"):
        U.sweep_weights(X, [], rule="paper")
    with pytest.raises(ChameleonUserError, match="lambdas"):
        U.sweep_weights(X, [1.0, -2.0], rule="paper")
    with pytest.raises(ChameleonUserError, match="temperatures"):
        U.sweep_weights(X, [1.0], [0.0], rule="paper")
    with pytest.raises(ChameleonUserError, match="square"):
        U.sweep_weights_from_affinity(torch.ones(2, 3), [1.0], rule="paper")
    with pytest.raises(ChameleonUserError, match="embeddings must be"):
        U.sweep_weights(torch.ones(3), [1.0], rule="paper")
    with pytest.raises(ChameleonUserError, match="was not swept"):
        U.sweep_weights(X, [1.0], rule="paper").weights_at(2.0, 5.0)


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


def spread_embeddings(k=6, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g, dtype=torch.float64) + 3.0


def test_clean_case_has_no_warnings():
    X = spread_embeddings()
    point = plain_weights(X, lam=0.1 * float((X - X.mean(0)).pow(2).sum(1).mean()) / 6)
    diag = U.diagnose(point, X)
    assert diag.warnings == [], diag.warnings
    assert diag.effective_dimension == pytest.approx(float(point.leverage_raw.sum()), abs=1e-15)
    assert diag.effective_dimension_share == pytest.approx(diag.effective_dimension / 5)
    assert diag.suggested_lambda is None


def test_planted_near_duplicate_domain_is_reported():
    X = spread_embeddings()
    X[4] = X[1] + 1e-3 * torch.randn(X.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = NAMES[:6]
    diag = U.diagnose(plain_weights(X, lam=1.0, domains=names), X)
    dup = [w for w in diag.warnings if w["code"] == "near_duplicate_domains"]
    assert len(dup) == 1 and dup[0]["domains"] == [names[1], names[4]]
    assert "near duplicates" in dup[0]["message"]


def test_planted_dominant_norm_is_reported():
    X = spread_embeddings()
    X[2] *= 10.0
    diag = U.diagnose(plain_weights(X, lam=1.0, domains=NAMES[:6]), X)
    dom = [w for w in diag.warnings if w["code"] == "dominant_norm"]
    assert len(dom) == 1 and dom[0]["domains"] == [NAMES[2]]
    assert "dominant_norm" not in U.diagnose(plain_weights(spread_embeddings(), lam=1.0), spread_embeddings()).codes


def test_collapsed_mixture_is_reported():
    X = spread_embeddings()
    # A domain at the centroid of the others has leverage ~0: pretrain gives it almost all.
    X[0] = X[1:].mean(0)
    diag = U.diagnose(plain_weights(X, lam=1.0, domains=NAMES[:6]), X)
    col = [w for w in diag.warnings if w["code"] == "collapsed_mixture"]
    assert col and col[0]["domains"] == [NAMES[0]] and "> 0.9" in col[0]["message"]
    # Near one-hot without one domain above 0.9: two domains share it, a tiny temperature.
    point = plain_weights(spread_embeddings(k=2), "finetune", lam=1.0, temperature=0.2)
    assert "collapsed_mixture" not in U.diagnose(point).codes
    w = torch.tensor([0.88, 0.115, 0.005], dtype=torch.float64)
    fake = plain_weights(spread_embeddings(k=3), lam=1.0)
    fake.weights = w
    diag = U.diagnose(fake)
    assert diag.codes == ["collapsed_mixture"] and "near one-hot" in diag.warnings[0]["message"]


@pytest.mark.parametrize("lam, code", [(1e9, "lambda_too_large"), (1e-9, "lambda_too_small")])
def test_extreme_lambda_is_reported_with_a_suggestion(lam, code):
    X = spread_embeddings()
    diag = U.diagnose(plain_weights(X, lam=lam), X)
    assert code in diag.codes
    suggested = diag.suggested_lambda
    assert suggested is not None and f"{suggested:g}" in diag.warnings[diag.codes.index(code)]["message"]
    # The suggestion puts the effective dimension near half of k - 1 (up to its rounding).
    share = float((plain_weights(X, lam=suggested)).leverage_raw.sum()) / 5
    assert 0.4 < share < 0.6
    assert not {"lambda_too_large", "lambda_too_small"} & set(U.diagnose(plain_weights(X, lam=suggested)).codes)


def test_identical_domains_get_no_lambda_advice():
    X = torch.ones(4, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plain path warns: uniform weights
        diag = U.diagnose(plain_weights(X), X)
    assert diag.effective_dimension == 0.0 and diag.suggested_lambda is None
    assert not {"lambda_too_large", "lambda_too_small"} & set(diag.codes)


def test_suggest_lambda_against_eigen_formula():
    X = spread_embeddings(k=5)
    lam = U.suggest_lambda(X @ X.T)
    Kc = (X - X.mean(0)) @ (X - X.mean(0)).T
    s = np.linalg.eigvalsh(Kc.numpy())
    s = s[s > s.max() * 1e-9]
    share = (s / (s + lam * 5)).sum() / len(s)
    assert abs(share - 0.5) < 0.03  # two significant digits of lambda
    assert U.suggest_lambda(torch.ones(3, 3)) is None


def test_unstable_ranking_is_reported():
    # Domains with the same centre: their order is noise, whatever n is.
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(8, generator=g, dtype=torch.float64)
    windows = [centre + torch.randn(50, 8, generator=g, dtype=torch.float64) for _ in range(4)]
    windows.append(centre + 20.0 + torch.randn(50, 8, generator=g, dtype=torch.float64))
    res = U.bootstrap_weights(windows, resamples=200, lam=1.0, seed=0, domains=NAMES[:5], rule="paper")
    diag = U.diagnose(res.point, bootstrap=res)
    unstable = [w for w in diag.warnings if w["code"] == "unstable_ranking"]
    assert unstable and NAMES[4] not in unstable[0]["domains"] and "more windows" in unstable[0]["message"]
    assert diag.windows is res.windows
    d = json.loads(json.dumps(diag.to_dict()))
    assert d["windows"]["fractions"] == [0.25, 0.5, 1.0] and d["warnings"][0]["code"] == "unstable_ranking"
    text = U.format_diagnostics(diag)
    assert "effective dimension" in text and "warning [unstable_ranking]" in text and "12: " in text


# --------------------------------------------------------------------------------------------
# Per-window cache entries
# --------------------------------------------------------------------------------------------


def test_window_cache_round_trip(tmp_path):
    W = torch.randn(33, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    path = embed_cache.window_cache_path(str(tmp_path), "abc123")
    assert path == str(tmp_path / "abc123.windows.pt")
    io.save_torch(embed_cache.pack_window_embeddings(W, "abc123", "arxiv"), path)
    back = embed_cache.unpack_window_embeddings(io.read_torch(path), "abc123", "arxiv")
    assert back.dtype == torch.float32 and torch.equal(back, W.float())
    entry = embed_cache.pack_window_embeddings(W, "abc123", "arxiv", dtype=torch.bfloat16)
    assert entry["windows"].dtype == torch.bfloat16 and entry["count"] == 33
    assert torch.equal(embed_cache.unpack_window_embeddings(entry, "abc123"), W.bfloat16().float())


def test_window_cache_rejects_damage_and_mismatch():
    entry = embed_cache.pack_window_embeddings(torch.ones(4, 3), "key", "c4")
    with pytest.raises(ChameleonUserError, match="has key"):
        embed_cache.unpack_window_embeddings(entry, "other")
    with pytest.raises(ChameleonUserError, match="for domain 'c4'"):
        embed_cache.unpack_window_embeddings(entry, "key", "book")
    damaged = dict(entry, windows=entry["windows"].clone())
    damaged["windows"][2, 1] = 5.0
    with pytest.raises(ChameleonUserError, match="damaged"):
        embed_cache.unpack_window_embeddings(damaged, "key")
    with pytest.raises(ChameleonUserError, match="not a per-window"):
        embed_cache.unpack_window_embeddings({"format": "x"}, "key")
    with pytest.raises(ChameleonUserError, match="dtype must be"):
        embed_cache.pack_window_embeddings(torch.ones(4, 3), "key", "c4", dtype=torch.float16)
    with pytest.raises(ChameleonUserError, match="finite"):
        embed_cache.pack_window_embeddings(torch.full((2, 2), math.inf), "key", "c4")
    with pytest.raises(ChameleonUserError, match=r"\[n, d\]"):
        embed_cache.pack_window_embeddings(torch.ones(3), "key", "c4")


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from chameleon_ext import plots as P

    from .test_plots import check_png

    windows, centres = synthetic_windows(k=7, n=64, d=8, seed=11)
    res = U.bootstrap_weights(windows, resamples=50, domains=NAMES, rule="paper")
    check_png(P.plot_bootstrap(res, tmp_path / "weights.png"))
    check_png(P.plot_bootstrap(json.loads(json.dumps(res.to_dict())), tmp_path / "from_dict.png"))
    sweep = U.sweep_weights(centres, LAMBDAS, TEMPS, domains=NAMES, rule="paper")
    check_png(P.plot_sweep(sweep, tmp_path / "sweep.png"))
    check_png(P.plot_sweep(json.loads(json.dumps(sweep.to_dict())), tmp_path / "sweep_T5.png", temperature=5.0))
    with pytest.raises(ChameleonUserError, match="was not swept"):
        P.plot_sweep(sweep, tmp_path / "x.png", temperature=3.0)
    with pytest.raises(ChameleonUserError, match="low > high"):
        P.plot_weight_intervals(["a", "b"], [0.5, 0.5], [0.4, 0.6], [0.6, 0.5], tmp_path / "y.png")
    with pytest.raises(ChameleonUserError, match="expected a BootstrapResult"):
        P.plot_bootstrap({"weights": {}}, tmp_path / "z.png")


def test_transfer_mode_uses_the_pretraining_rule():
    windows, centres = synthetic_windows(k=4, n=40, d=8, seed=13)
    point = plain_weights(centres, "pretrain", lam=1.0)
    point.mode = "transfer"  # as pipeline.weights_for_domains labels it
    res = U.bootstrap_weights(windows, resamples=20, seed=1, point=point)
    pre = U.bootstrap_weights(windows, resamples=20, seed=1, mode="pretrain", lam=1.0, rule="paper")
    assert torch.equal(res.weight_samples, pre.weight_samples) and res.to_dict()["mode"] == "transfer"
    own = U.bootstrap_weights(windows, resamples=20, seed=1, mode="transfer", lam=1.0, rule="paper")
    assert torch.equal(own.weight_samples, pre.weight_samples) and own.point.mode == "transfer"
    sweep = U.sweep_weights(centres, [1.0], mode="transfer", rule="paper")
    assert sweep.temperatures == [5.0] and torch.equal(sweep.weights[0, 0], point.weights)
    with pytest.raises(ValueError, match="mode: expected one of"):
        U.sweep_weights(centres, [1.0], mode="mixing", rule="paper")
