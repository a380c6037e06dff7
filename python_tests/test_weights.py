"""Domain weights: golden vectors from the reference implementation, the float64 NumPy oracle
(python_tests/reference_pipeline.py, written separately from chameleon_ext.weights), and
cases worked by hand (docs/method.md)."""

import math
import warnings

import numpy as np
import pytest
import torch

import chameleon_ext
from chameleon_ext import weights as W

from .reference_pipeline import reference_weights_numpy

TOL = dict(rtol=0, atol=1e-9)


def numpy_chameleon(X, lam, mode, T, normalize=True):
    """(scores fed to the softmax, weights) from the one NumPy oracle."""
    return reference_weights_numpy(X, mode, lam, T, normalize, return_scores=True)


def test_golden_cases_from_embeddings(golden):
    checked = 0
    for case in golden:
        if "domain_embeddings" not in case:
            continue
        X = torch.tensor(case["domain_embeddings"], dtype=torch.float64)
        lam = case["lambda_reg"]
        pt = W.weights_from_embeddings(X, "pretrain", lam=lam, rule="paper")
        ft = W.weights_from_embeddings(X, "finetune", lam=lam, rule="paper")
        name = case["name"]
        np.testing.assert_allclose(pt.affinity.numpy(), case["centered_affinity"], rtol=1e-12, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(pt.leverage_raw.numpy(), case["krls_raw"], **TOL, err_msg=name)
        np.testing.assert_allclose(pt.leverage.numpy(), case["krls_normalized"], **TOL, err_msg=name)
        np.testing.assert_allclose(pt.weights.numpy(), case["pretrain_weights_T5"], **TOL, err_msg=name)
        np.testing.assert_allclose(ft.weights.numpy(), case["finetune_weights_T0_2"], **TOL, err_msg=name)
        np.testing.assert_allclose(
            chameleon_ext.weights_from_embeddings(X, "finetune", lam=lam, rule="paper").weights.numpy(), case["finetune_weights_T0_2"], **TOL
        )
        checked += 1
    assert checked >= 8


def test_golden_cases_from_affinity(golden):
    for case in golden:
        A = torch.tensor(case["centered_affinity"], dtype=torch.float64)
        lam = case["lambda_reg"]
        # The reference uses the given matrix as the kernel as it is (the paper's Figure 1
        # matrix is centred only to its printed digits).
        pt = W.weights_from_affinity(A, "pretrain", lam=lam, center=False, rule="paper")
        ft = W.weights_from_affinity(A, "finetune", lam=lam, center=False, rule="paper")
        name = case["name"]
        np.testing.assert_allclose(pt.leverage_raw.numpy(), case["krls_raw"], **TOL, err_msg=name)
        np.testing.assert_allclose(pt.leverage.numpy(), case["krls_normalized"], **TOL, err_msg=name)
        np.testing.assert_allclose(pt.weights.numpy(), case["pretrain_weights_T5"], **TOL, err_msg=name)
        np.testing.assert_allclose(ft.weights.numpy(), case["finetune_weights_T0_2"], **TOL, err_msg=name)
    assert any(c["name"] == "paper_figure1_affinity" for c in golden)


def test_affinity_variant_centres_a_raw_gram_matrix(golden):
    case = next(c for c in golden if "domain_embeddings" in c)
    X = torch.tensor(case["domain_embeddings"], dtype=torch.float64)
    res = W.weights_from_affinity(X @ X.T, "pretrain", lam=case["lambda_reg"], rule="paper")
    np.testing.assert_allclose(res.weights.numpy(), case["pretrain_weights_T5"], **TOL)


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k,d,lam,T", [(4, 3, 10.0, None), (9, 50, 0.3, 2.0), (30, 8, 3.0, 0.5)])
def test_against_numpy_reimplementation(mode, normalize, k, d, lam, T):
    rng = np.random.default_rng(k * d)
    X = rng.normal(size=(k, d)) + rng.normal(size=(1, d))
    Tval = T if T is not None else W.DEFAULT_TEMPERATURE[mode]
    S, w = numpy_chameleon(X, lam, mode, Tval, normalize)
    res = W.weights_from_embeddings(torch.from_numpy(X), mode, lam=lam, temperature=T, normalize=normalize, rule="paper")
    np.testing.assert_allclose(res.leverage.numpy(), S, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.weights.numpy(), w, rtol=1e-8, atol=1e-12)
    assert res.weights.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_float32_embeddings_give_float64_weights_close_to_float64_path():
    X = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    w32 = chameleon_ext.weights_from_embeddings(X, rule="paper").weights
    w64 = chameleon_ext.weights_from_embeddings(X.double(), rule="paper").weights
    assert w32.dtype == torch.float64
    torch.testing.assert_close(w32, w64)


def test_one_domain_gets_weight_one_with_warning():
    with pytest.warns(UserWarning, match="only one domain"):
        w = chameleon_ext.weights_from_embeddings(torch.randn(1, 8), rule="paper").weights
    assert w.tolist() == [1.0]


def test_identical_domains_give_uniform_weights_with_warning():
    X = torch.ones(4, 6)
    with pytest.warns(UserWarning, match="identical embeddings"):
        w = chameleon_ext.weights_from_embeddings(X, rule="paper").weights
    torch.testing.assert_close(w, torch.full((4,), 0.25, dtype=torch.float64))


def test_duplicate_domains_give_finite_equal_weights():
    X = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    X[3] = X[1]
    for mode in ("pretrain", "finetune"):
        w = chameleon_ext.weights_from_embeddings(X, mode, rule="paper").weights
        assert torch.all(torch.isfinite(w))
        assert w[1].item() == pytest.approx(w[3].item(), rel=1e-9)


def test_pretrain_upweights_shared_and_finetune_upweights_distinctive():
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(1, 32, generator=g, dtype=torch.float64)
    X = torch.cat([shared + 0.05 * torch.randn(4, 32, generator=g, dtype=torch.float64),
                   5.0 * torch.randn(1, 32, generator=g, dtype=torch.float64)])
    pt = chameleon_ext.weights_from_embeddings(X, "pretrain", lam=1.0, rule="paper").weights
    ft = chameleon_ext.weights_from_embeddings(X, "finetune", lam=1.0, rule="paper").weights
    assert pt.argmin().item() == 4 and ft.argmax().item() == 4


def test_large_k_runs_through_the_library_path():
    X = torch.randn(1000, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    res = W.weights_from_embeddings(X, lam=10.0, rule="paper")
    S, w = numpy_chameleon(X.numpy(), 10.0, "pretrain", 5.0)
    np.testing.assert_allclose(res.leverage.numpy(), S, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(res.weights.numpy(), w, rtol=1e-6, atol=1e-12)


def test_as_dict_names_domains():
    res = W.weights_from_embeddings(torch.randn(3, 4), domains=["web", "code", "books"], rule="paper")
    d = res.as_dict()
    assert list(d["weights"]) == ["web", "code", "books"]
    assert sum(d["weights"].values()) == pytest.approx(1.0)


def test_bad_arguments():
    X = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"mode: expected one of \('pretrain', 'finetune'\)"):
        chameleon_ext.weights_from_embeddings(X, "train", rule="paper").weights
    for lam in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lambda: expected a finite number > 0"):
            chameleon_ext.weights_from_embeddings(X, lam=lam, rule="paper").weights
    with pytest.raises(ValueError, match="temperature: expected a finite number > 0"):
        chameleon_ext.weights_from_embeddings(X, temperature=0.0, rule="paper").weights
    with pytest.raises(ValueError, match=r"embeddings must be \[k, d\]"):
        chameleon_ext.weights_from_embeddings(torch.randn(4), rule="paper").weights
    with pytest.raises(ValueError, match="floating-point"):
        chameleon_ext.weights_from_embeddings(torch.ones(3, 2, dtype=torch.long), rule="paper").weights
    bad = X.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in row\(s\) \[2\]"):
        chameleon_ext.weights_from_embeddings(bad, rule="paper").weights
    with pytest.raises(ValueError, match="square"):
        W.weights_from_affinity(torch.randn(3, 4), rule="paper")
    with pytest.raises(ValueError, match="domains: expected 3 names, got 2"):
        W.weights_from_affinity(torch.eye(3), domains=["a", "b"], rule="paper")


def test_build_info_reports_the_build():
    info = chameleon_ext.build_info()
    assert info["version"] == chameleon_ext.__version__
    assert info["torch_version"] == torch.__version__ == info["torch_version_runtime"]
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_version"] == torch.version.cuda and info["cuda_arch_list"]


# --------------------------------------------------------------------------- worked by hand


def test_two_domains_by_hand():
    # x1 = (1, 0), x2 = (-1, 0): Omega = [[1, -1], [-1, 1]] is already centred, eigenvalues 2
    # and 0, mu = lambda k = 2; S_i = (1/2) * 2 / (2 + 2) = 1/4 each (docs/method.md).
    X = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    res = W.weights_from_embeddings(X, "pretrain", lam=1.0, rule="paper")
    assert res.affinity.tolist() == [[1.0, -1.0], [-1.0, 1.0]]
    np.testing.assert_allclose(res.leverage_raw.numpy(), [0.25, 0.25], rtol=0, atol=1e-15)
    np.testing.assert_allclose(res.leverage.numpy(), [0.5, 0.5], rtol=0, atol=1e-15)
    np.testing.assert_allclose(res.weights.numpy(), [0.5, 0.5], rtol=0, atol=1e-15)
    raw = W.weights_from_embeddings(X, "finetune", lam=3.0, normalize=False, rule="paper")
    np.testing.assert_allclose(raw.leverage_raw.numpy(), [1 / 8, 1 / 8], rtol=0, atol=1e-15)  # 1 / (2 + 2*3)


def test_three_domains_by_hand_the_domain_at_the_mean_has_zero_leverage():
    # x = (1), (-1), (0): the mean is 0, Omega = v v^T with v = (1, -1, 0), one eigenvalue 2;
    # mu = 3 lambda = 3, so S = (1/5, 1/5, 0) and S / sum(S) = (1/2, 1/2, 0).
    X = torch.tensor([[1.0], [-1.0], [0.0]], dtype=torch.float64)
    pt = W.weights_from_embeddings(X, "pretrain", lam=1.0, rule="paper")
    np.testing.assert_allclose(pt.leverage_raw.numpy(), [0.2, 0.2, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(pt.leverage.numpy(), [0.5, 0.5, 0.0], rtol=0, atol=1e-15)
    # pretrain: logits 1 / (S T) = (0.4, 0.4, 2e11): all the weight on the shared domain
    np.testing.assert_allclose(pt.weights.numpy(), [0.0, 0.0, 1.0], rtol=0, atol=1e-15)
    ft = W.weights_from_embeddings(X, "finetune", lam=1.0, rule="paper")
    e = math.exp(2.5)  # logits S / 0.2 = (2.5, 2.5, 0)
    np.testing.assert_allclose(ft.weights.numpy(), [e / (2 * e + 1), e / (2 * e + 1), 1 / (2 * e + 1)],
                               rtol=1e-14, atol=0)


def test_weights_from_scores_by_hand():
    w = W.weights_from_scores(torch.tensor([0.5, 0.5]), "finetune", temperature=1.0, rule="paper")
    assert w.tolist() == [0.5, 0.5]
    w = W.weights_from_scores(torch.tensor([math.log(3.0), 0.0], dtype=torch.float64), "finetune", temperature=1.0, rule="paper")
    np.testing.assert_allclose(w.numpy(), [0.75, 0.25], rtol=1e-15, atol=0)


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_weights_from_scores_takes_a_batch_of_rows(mode):
    """[..., k] scores (the bootstrap's resamples): each row bit for bit its own [k] call,
    and equal to the NumPy softmax."""
    S = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batch = W.weights_from_scores(S, mode, temperature=0.7, rule="paper")
    assert batch.shape == (3, 5, 7)
    for i in range(3):
        for j in range(5):
            assert torch.equal(batch[i, j], W.weights_from_scores(S[i, j], mode, temperature=0.7, rule="paper"))
    x = S.numpy()
    z = 1.0 / ((x + 1e-12) * 0.7) if mode == "pretrain" else x / 0.7
    z = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(batch.numpy(), z / z.sum(-1, keepdims=True), rtol=1e-13, atol=0)


# --------------------------------------------------------------------------- degenerate input


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 0)])
def test_empty_embeddings_are_an_error(shape):
    with pytest.raises(ValueError, match=r"k, d >= 1"):
        W.weights_from_embeddings(torch.zeros(shape, dtype=torch.float64), rule="paper")


def test_empty_scores_and_affinity_are_errors():
    with pytest.raises(ValueError, match="non-empty vector"):
        W.weights_from_scores(torch.zeros(0), rule="paper")
    with pytest.raises(ValueError, match="non-empty vector"):
        W.weights_from_scores(torch.zeros(4, 0), rule="paper")
    with pytest.raises(ValueError, match="square"):
        W.weights_from_affinity(torch.zeros(0, 0), rule="paper")
    with pytest.raises(ValueError, match="NaN or Inf"):
        W.weights_from_affinity(torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]]), rule="paper")


def test_duplicate_or_string_domain_names_are_errors():
    X = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"unique, got \['web'\]"):
        W.weights_from_embeddings(X, domains=["web", "code", "web"], rule="paper")
    with pytest.raises(ValueError, match="list of domain names, got the string 'abc'"):
        W.weights_from_embeddings(X, domains="abc", rule="paper")
    with pytest.raises(ValueError, match="non-empty strings"):
        W.weights_from_embeddings(X, domains=["web", "", "code"], rule="paper")


def test_complex_and_overflowing_embeddings_are_errors():
    with pytest.raises(ValueError, match="must be real"):
        W.weights_from_embeddings(torch.randn(3, 4, dtype=torch.complex128), rule="paper")
    with pytest.raises(ValueError, match="overflows float64"):
        W.weights_from_embeddings(torch.full((3, 2), 1e200, dtype=torch.float64), rule="paper")


# --------------------------------------------------------------------------- names


def test_the_names_of_earlier_development_versions_are_gone():
    # 0.1.0 is the first release: one public name, one signature (CHANGELOG.md, "Removed").
    import chameleon_ext.pipeline as P

    for name in ("chameleon_weights", "domain_weights", "domain_weights_from_affinity"):
        assert name not in chameleon_ext.__all__ and not hasattr(chameleon_ext, name) and not hasattr(W, name)
    assert not hasattr(P, "weights_from_embeddings") and hasattr(P, "weights_for_domains")
    X = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    res = W.weights_from_embeddings(X, "finetune", lam=2.0, domains=list("abcd"), rule="paper")
    assert not hasattr(res, "krls") and not hasattr(res, "krls_raw")
    via_affinity = W.weights_from_affinity(X @ X.T, "finetune", lam=2.0, rule="paper")
    torch.testing.assert_close(via_affinity.weights, res.weights, rtol=0, atol=1e-12)


def test_reference_oracles_are_not_public_api():
    assert "reference" not in chameleon_ext.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names never warn
        W.weights_from_embeddings(torch.randn(3, 2), rule="paper")
