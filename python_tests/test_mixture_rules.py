"""The mixture vocabulary (chameleon_ext.mixture), the scale-free lambda and the weight rules.

The lambda selection is checked against a float64 NumPy oracle written here (eigh of the
centred kernel + bisection on the effective dimension, independent of the krls grid search),
the rules against cases worked by hand, and the guarantees (scale invariance, the smoothing
cap, the calibrated ratio) at scales from 1e-6 to 1e6."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from chameleon_ext import mixture, weights as W
from chameleon_ext.errors import ChameleonUserError

from .factories import oracle_lambda


# --------------------------------------------------------------------------------------------
# The vocabulary's checks
# --------------------------------------------------------------------------------------------


def test_domain_names_checks():
    assert mixture.check_domain_names(["web", "code"]) == ["web", "code"]
    assert mixture.check_domain_names(("a",), 1) == ["a"]
    for bad, match in [("web", "got the string 'web'"), ([], "at least one"), (["a", ""], "non-empty strings"),
                       (["a", 3], "non-empty strings"), (["a", "b", "a"], r"unique, got \['a'\]"),
                       ({"a": 1}, "list of domain names")]:
        with pytest.raises(ChameleonUserError, match=match):
            mixture.check_domain_names(bad)
    with pytest.raises(ChameleonUserError, match="expected 3 names, got 2"):
        mixture.check_domain_names(["a", "b"], 3)


def test_weight_vector_checks():
    assert mixture.check_weights([0.25, 0.75]) == [0.25, 0.75]
    assert mixture.check_weights(torch.tensor([0.5, 0.5], dtype=torch.float64)) == [0.5, 0.5]
    # the one tolerance, absolute, on the sum
    tol = mixture.WEIGHT_SUM_TOLERANCE
    mixture.check_weights([0.5, 0.5 + 0.9 * tol])
    for bad, match in [([0.5, 0.5 + 2 * tol], "sum to 1"), ([True, False], "entry 0"), ([1.5, -0.5], "entry 1"),
                       ([float("nan"), 1.0], "entry 0"), ([float("inf"), 0.0], "entry 0"), ([], "at least one"),
                       ("ab", "vector of numbers"), ([0.5, "0.5"], "entry 1")]:
        with pytest.raises(ChameleonUserError, match=match):
            mixture.check_weights(bad)
    with pytest.raises(ChameleonUserError, match="expected 3 weights"):
        mixture.check_weights([0.5, 0.5], 3)
    assert mixture.check_weight_map({"b": 0.5, "a": 0.5}, ["a", "b"]) == {"a": 0.5, "b": 0.5}
    with pytest.raises(ChameleonUserError, match=r"the domains do not match \(missing \['c'\]"):
        mixture.check_weight_map({"a": 0.5, "b": 0.5}, ["a", "b", "c"])


def test_settings_checks():
    assert mixture.check_lambda("auto") == "auto" and mixture.check_lambda(3) == 3.0
    for bad in ("Auto", 0, -1.0, float("nan"), True, None):
        with pytest.raises(ChameleonUserError, match="lambda: expected a finite number > 0 or 'auto'"):
            mixture.check_lambda(bad)
    for bad in (0.0, 1.0, -0.1, True):
        with pytest.raises(ChameleonUserError, match=r"share: expected a number in \(0, 1\)"):
            mixture.check_share(bad)
    for bad in (1.0, -0.1, float("nan"), False):
        with pytest.raises(ChameleonUserError, match=r"smoothing: expected a number in \[0, 1\)"):
            mixture.check_smoothing(bad)
    assert mixture.check_smoothing(0) == 0.0
    with pytest.raises(ChameleonUserError, match="rule: expected one of"):
        mixture.check_rule("softmax")
    with pytest.raises(ChameleonUserError, match="mode: expected one of"):
        mixture.check_mode("transfer")
    assert mixture.rule_of_mode("transfer") == "pretrain"
    assert mixture.check_prior("uniform", 4) == [0.25] * 4
    with pytest.raises(ChameleonUserError, match="prior: expected 3 weights"):
        mixture.check_prior([0.5, 0.5], 3)
    with pytest.raises(ChameleonUserError, match="ratio: expected a number > 1"):
        W.weights_from_scores(torch.tensor([0.5, 0.5]), rule="calibrated", ratio=1.0)


# --------------------------------------------------------------------------------------------
# The scale-free lambda against a NumPy oracle
# --------------------------------------------------------------------------------------------


def oracle_effective_dimension(K: np.ndarray, lam: float) -> float:
    k = K.shape[0]
    H = np.eye(k) - 1.0 / k
    Kc = H @ K @ H
    return float(np.trace(Kc @ np.linalg.inv(Kc + lam * k * np.eye(k))))


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e6])
@pytest.mark.parametrize("share", [0.1, 0.25, 0.5, 0.9])
def test_select_lambda_matches_the_eigh_oracle(scale, share):
    g = torch.Generator().manual_seed(int(share * 100))
    X = torch.randn(7, 16, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 16, dtype=torch.float64) * scale
    K = X @ X.T
    lam, eff = W.select_lambda(K, share)
    want = oracle_lambda(K.numpy(), share)
    assert abs(float(lam) / want - 1.0) < 1e-8
    assert abs(oracle_effective_dimension(K.numpy(), float(lam)) - share * 6) < 1e-8
    assert abs(float(eff) - share * 6) < 1e-12


def test_select_lambda_is_batched_and_each_row_is_its_own_call():
    K = torch.stack([W.linear_affinity(torch.randn(5, 9, dtype=torch.float64) * 10.0 ** e) for e in (-4, 0, 4)])
    lam, eff = W.select_lambda(K, 0.3)
    assert lam.shape == (3,) and eff.shape == (3,)
    for i in range(3):
        single, _ = W.select_lambda(K[i], 0.3)
        assert abs(float(single) / float(lam[i]) - 1.0) < 1e-12
        assert abs(float(single) / oracle_lambda(K[i].numpy(), 0.3) - 1.0) < 1e-8


def test_select_lambda_low_rank_and_degenerate_kernels():
    # rank 2 kernel of 6 domains (d = 2): the share is of the rank, so the target is reachable
    X = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lam, eff = W.select_lambda(X @ X.T, 0.5)
    assert abs(oracle_effective_dimension((X @ X.T).numpy(), float(lam)) - 1.0) < 1e-6
    # all domains at one point: nothing to regularise
    lam, eff = W.select_lambda(torch.ones(4, 4, dtype=torch.float64), 0.25)
    assert float(lam) == 1.0 and float(eff) == 0.0
    lam, eff = W.select_lambda(torch.ones(1, 1, dtype=torch.float64), 0.25)
    assert float(lam) == 1.0


@pytest.mark.parametrize("rule", ["power", "calibrated", "paper"])
@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_auto_lambda_weights_do_not_depend_on_the_embeddings_scale(rule, mode):
    X = torch.randn(7, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 3.0
    ref = W.weights_from_embeddings(X, mode, lam="auto", rule=rule)
    for scale in (1e-6, 1e-3, 1e3, 1e6):
        res = W.weights_from_embeddings(X * scale, mode, lam="auto", rule=rule)
        torch.testing.assert_close(res.weights, ref.weights, rtol=0, atol=1e-9)
        assert abs(res.lam / (ref.lam * scale * scale) - 1.0) < 1e-9
        assert abs(res.effective_dimension - W.DEFAULT_SHARE * 6) < 1e-9


def test_fixed_lambda_is_not_scale_free_but_auto_is():
    # the bug: lambda = 10 means something else for every proxy scale
    X = torch.randn(7, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    small = W.weights_from_embeddings(X * 1e-3, rule="paper").weights
    large = W.weights_from_embeddings(X * 1e3, rule="paper").weights
    assert float((small - large).abs().max()) > 1e-3
    d = W.weights_from_embeddings(X * 1e-3).weights - W.weights_from_embeddings(X * 1e3).weights
    assert float(d.abs().max()) < 1e-9


# --------------------------------------------------------------------------------------------
# The rules, by hand
# --------------------------------------------------------------------------------------------


def test_two_symmetric_domains_get_half_each_under_every_rule():
    X = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    for rule in mixture.RULES:
        for mode in mixture.MODES:
            for lam in (None, "auto", 0.5):
                w = W.weights_from_embeddings(X * 1e3, mode, lam=lam, rule=rule).weights
                torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-15)


def test_power_rule_by_hand():
    S = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    # pretrain T = 1: w ~ 1/S = (2, 4, 4) -> (0.2, 0.4, 0.4)
    w = W.weights_from_scores(S, "pretrain", rule="power", temperature=1.0, smoothing=0.0)
    torch.testing.assert_close(w, torch.tensor([0.2, 0.4, 0.4], dtype=torch.float64), rtol=0, atol=1e-12)
    # T = 0.5: w ~ S^-2 = (4, 16, 16) -> (1/9, 4/9, 4/9)
    w = W.weights_from_scores(S, "pretrain", rule="power", temperature=0.5, smoothing=0.0)
    torch.testing.assert_close(w, torch.tensor([1, 4, 4], dtype=torch.float64) / 9, rtol=0, atol=1e-12)
    # finetune T = 1: w = S itself; T = 2: w ~ sqrt(S)
    w = W.weights_from_scores(S, "finetune", rule="power", temperature=1.0, smoothing=0.0)
    torch.testing.assert_close(w, S, rtol=0, atol=1e-11)
    r = torch.sqrt(S)
    w = W.weights_from_scores(S, "finetune", rule="power", temperature=2.0, smoothing=0.0)
    torch.testing.assert_close(w, r / r.sum(), rtol=0, atol=1e-11)
    # smoothing 0.25 toward uniform: 0.75 (0.2, 0.4, 0.4) + 0.25 / 3
    w = W.weights_from_scores(S, "pretrain", rule="power", temperature=1.0, smoothing=0.25)
    want = 0.75 * torch.tensor([0.2, 0.4, 0.4], dtype=torch.float64) + 0.25 / 3
    torch.testing.assert_close(w, want, rtol=0, atol=1e-12)
    # and toward a given prior
    w = W.weights_from_scores(S, "pretrain", rule="power", temperature=1.0, smoothing=0.5, prior=[0.5, 0.5, 0.0])
    torch.testing.assert_close(w, torch.tensor([0.35, 0.45, 0.2], dtype=torch.float64), rtol=0, atol=1e-12)


def test_calibrated_rule_caps_the_ratio_and_otherwise_is_the_paper_rule():
    S = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    # logits 1 / (5 S) = (0.4, 2/3, 1): spread 0.6 < log 10: the paper's weights unchanged
    paper = W.weights_from_scores(S, "pretrain", rule="paper")
    cal = W.weights_from_scores(S, "pretrain", rule="calibrated")
    torch.testing.assert_close(cal, paper, rtol=0, atol=1e-15)
    # ratio 1.5 < e^0.6: the logits are scaled so max / min is exactly 1.5
    cal = W.weights_from_scores(S, "pretrain", rule="calibrated", ratio=1.5)
    assert abs(float(cal.max() / cal.min()) - 1.5) < 1e-12
    # a near-one-hot paper mixture (one leverage 1/20 of the others)
    S = torch.tensor([0.01, 0.2, 0.2, 0.2, 0.19, 0.2], dtype=torch.float64)
    assert float(W.weights_from_scores(S, "pretrain", rule="paper").max()) > 0.999
    cal = W.weights_from_scores(S, "pretrain", rule="calibrated", ratio=10.0)
    assert abs(float(cal.max() / cal.min()) - 10.0) < 1e-9 and int(cal.argmax()) == 0


def centroid_case(k=7, d=12, seed=3, noise=0.0):
    """Embeddings whose first domain sits at (or, with noise, near) the others' centroid: the
    paper's pretraining rule gives it everything."""
    g = torch.Generator().manual_seed(seed)
    others = torch.randn(k - 1, d, generator=g, dtype=torch.float64)
    first = others.mean(0, keepdim=True) + noise * torch.randn(1, d, generator=g, dtype=torch.float64)
    return torch.cat([first, others]) * 37.0


@pytest.mark.parametrize("noise", [0.0, 1e-3, 1e-2])
def test_default_rule_is_capped_where_the_paper_rule_collapses(noise):
    X = centroid_case(noise=noise)
    paper = W.weights_from_embeddings(X, rule="paper").weights
    assert float(paper[0]) > 0.99
    res = W.weights_from_embeddings(X)
    k, c = 7, W.RULE_DEFAULTS[W.DEFAULT_RULE]["smoothing"]
    assert float(res.weights.max()) <= 1.0 - c * (1.0 - 1.0 / k) + 1e-12 < 0.9
    assert res.rule == W.DEFAULT_RULE and res.lambda_method == "auto"


def test_defaults_and_the_faithful_switch():
    assert W.DEFAULT_RULE in mixture.RULES and W.DEFAULT_RULE != "paper"
    paper = W.RULE_DEFAULTS["paper"]
    assert paper["lam"] == 10.0 and paper["temperature"] == {"pretrain": 5.0, "finetune": 0.2}
    assert paper["smoothing"] == 0.0
    X = torch.randn(5, 8, dtype=torch.float64)
    res = W.weights_from_embeddings(X, rule="paper")
    assert res.lam == 10.0 and res.temperature == 5.0 and res.lambda_method == "fixed" and res.share is None
    doc = res.as_dict()
    assert doc["rule"] == "paper" and doc["lambda_selection"]["method"] == "fixed"
    auto = W.weights_from_embeddings(X).as_dict()
    assert auto["lambda_selection"]["method"] == "auto"
    assert abs(auto["lambda_selection"]["effective_dimension_share"] - W.DEFAULT_SHARE) < 1e-9


def split_domain(X: torch.Tensor, j: int, eps: float, seed: int = 0) -> torch.Tensor:
    """Domain j replaced by two near-identical halves (x_j +- eps noise), appended last."""
    g = torch.Generator().manual_seed(seed)
    noise = eps * torch.randn(X.shape[1], generator=g, dtype=torch.float64)
    return torch.cat([X[:j], X[j + 1:], (X[j] + noise)[None], (X[j] - noise)[None]])


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_split_domain_redundancy_is_bounded_by_the_default_rule(mode):
    """Splitting a domain into two near-identical halves: the inverse-leverage (pretraining)
    rules reward the redundant pair (each half explains the other). The paper rule's reward is
    unbounded; the default rule's is smaller, and the finetuning rule (weight rising with the
    leverage) gives the pair about the original domain's weight (1.3x here, from renormalising
    over one more domain)."""
    X = torch.randn(7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(11)) * 5.0
    worst = {}
    for rule in ("paper", W.DEFAULT_RULE):
        base = W.weights_from_embeddings(X, mode, rule=rule).weights
        growth = []
        for j in range(7):
            split = W.weights_from_embeddings(split_domain(X, j, 1e-3), mode, rule=rule).weights
            growth.append(float(split[-2:].sum() / base[j]))
        worst[rule] = max(growth)
    if mode == "pretrain":
        assert worst[W.DEFAULT_RULE] < worst["paper"]
        assert worst[W.DEFAULT_RULE] < 2.0 ** (1.0 + 1.0 / W.RULE_DEFAULTS[W.DEFAULT_RULE]["temperature"]["pretrain"])
    else:  # the pair's leverage is about the original domain's: only the renormalisation over k + 1 moves it
        assert worst[W.DEFAULT_RULE] < 1.5 and worst["paper"] < 1.5


def test_calibrated_temperature_is_recorded():
    S = torch.tensor([0.01, 0.2, 0.2, 0.2, 0.19, 0.2], dtype=torch.float64)
    X = torch.randn(6, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = W.weights_from_embeddings(X, rule="calibrated")
    assert res.temperature >= 5.0 and res.ratio == 10.0
    assert float(res.weights.max() / res.weights.min()) <= 10.0 + 1e-9
    assert W.weights_from_scores(S, rule="calibrated").shape == (6,)


# --------------------------------------------------------------------------------------------
# The scale-free lambda under the bootstrap
# --------------------------------------------------------------------------------------------


def test_bootstrap_chooses_lambda_again_on_every_resample():
    from chameleon_ext import uncertainty as U

    g = torch.Generator().manual_seed(21)
    centres = torch.randn(5, 6, generator=g, dtype=torch.float64) * 3.0
    windows = [c + torch.randn(12, 6, generator=g, dtype=torch.float64) for c in centres]
    point = W.weights_from_embeddings(torch.stack([w.mean(0) for w in windows]))
    counts = [torch.randint(0, 3, (8, 12), generator=g).double() for _ in windows]
    for c in counts:
        c[:, 0] += 1.0  # at least one window per resample
    res = U.bootstrap_weights(windows, resamples=8, point=point, draw_counts=counts, window_fractions=())
    assert res.lambda_samples is not None and res.lambda_samples.shape == (8,)
    for b in range(8):
        X = torch.stack([(c[b] @ w) / c[b].sum() for c, w in zip(counts, windows)])
        own = W.weights_from_embeddings(X)  # the plain path on that resample: its own lambda
        assert abs(float(res.lambda_samples[b]) / own.lam - 1.0) < 1e-9
        torch.testing.assert_close(res.weight_samples[b], own.weights, rtol=0, atol=1e-12)
        assert abs(float(res.effective_dimension_samples[b]) - W.DEFAULT_SHARE * 4) < 1e-9
    interval = res.to_dict()["lambda_interval"]
    assert interval["point"] == point.lam and interval["low"] <= interval["high"]
    assert interval["low"] >= float(res.lambda_samples.min()) - 1e-12
    assert interval["high"] <= float(res.lambda_samples.max()) + 1e-12
    fixed = U.bootstrap_weights(windows, resamples=8, point=W.weights_from_embeddings(
        torch.stack([w.mean(0) for w in windows]), rule="paper"), draw_counts=counts, window_fractions=())
    assert fixed.lambda_samples is None and fixed.to_dict()["lambda_interval"] is None


@pytest.mark.parametrize("rule", list(mixture.RULES))
def test_degenerate_inputs_under_every_rule(rule):
    with pytest.warns(UserWarning, match="only one domain"):
        res = W.weights_from_embeddings(torch.randn(1, 8, dtype=torch.float64), rule=rule)
    assert res.weights.tolist() == [1.0]
    for mode in mixture.MODES:  # every domain at one point: nothing tells them apart
        with pytest.warns(UserWarning, match="identical embeddings"):
            res = W.weights_from_embeddings(torch.full((3, 4), 7.0, dtype=torch.float64), mode, rule=rule)
        torch.testing.assert_close(res.weights, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_the_default_never_collapses(mode):
    """The default's cap holds for any input: random embeddings of k = 2..12 domains at scales
    1e-6..1e6, with one domain on (or near) the others' centroid, and exact duplicates."""
    g = torch.Generator().manual_seed(99)
    c = W.RULE_DEFAULTS[W.DEFAULT_RULE]["smoothing"]
    for k in range(2, 13):
        for scale in (1e-6, 1.0, 1e6):
            for case in range(3):
                X = torch.randn(k, 5, generator=g, dtype=torch.float64)
                if case == 1:
                    X[0] = X[1:].mean(0)  # on the centroid: zero leverage
                if case == 2 and k > 2:
                    X[1] = X[0]  # an exact duplicate
                w = W.weights_from_embeddings(X * scale, mode).weights
                cap = 0.5 if k == 2 else 1.0 - c * (1.0 - 1.0 / k)
                assert float(w.max()) <= cap + 1e-12 and float(w.max()) <= mixture.COLLAPSE_THRESHOLD


def test_bootstrap_of_the_calibrated_rule_keeps_its_settings():
    from chameleon_ext import uncertainty as U

    g = torch.Generator().manual_seed(4)
    windows = [c + 0.3 * torch.randn(10, 6, generator=g, dtype=torch.float64)
               for c in torch.randn(5, 6, generator=g, dtype=torch.float64)]
    X = torch.stack([w.mean(0) for w in windows])
    point = W.weights_from_embeddings(X, rule="calibrated", temperature=3.0, ratio=1e3)  # not binding: T matters
    ones = [torch.ones(1, 10, dtype=torch.float64)] * 5  # the identity resample
    res = U.bootstrap_weights(windows, resamples=1, point=point, draw_counts=ones, window_fractions=())
    torch.testing.assert_close(res.weight_samples[0], point.weights, rtol=0, atol=1e-12)
    assert point.settings["temperature"] == 3.0 and point.settings["ratio"] == 1e3 and point.temperature == 3.0
