"""Domain weights: golden vectors from the reference implementation, and a float64 NumPy
re-implementation written separately from chameleon_ext.weights."""

import numpy as np
import pytest
import torch

import chameleon_ext
from chameleon_ext import weights as W

TOL = dict(rtol=0, atol=1e-9)


def numpy_chameleon(X, lam, mode, T, normalize=True):
    """METHOD.md steps 3-5, the reference's way: KernelCenterer + np.linalg.inv."""
    X = np.asarray(X, dtype=np.float64)
    k = X.shape[0]
    Kc = np.eye(k) - 1.0 / k
    Kc = Kc @ (X @ X.T) @ Kc
    S = np.diag(Kc @ np.linalg.inv(Kc + lam * k * np.eye(k)))
    S = S / S.sum() if normalize else S
    z = 1.0 / ((S + 1e-12) * T) if mode == "pretrain" else S / T
    z = np.exp(z - z.max())
    return S, z / z.sum()


def test_golden_cases_from_embeddings(golden):
    checked = 0
    for case in golden:
        if "domain_embeddings" not in case:
            continue
        X = torch.tensor(case["domain_embeddings"], dtype=torch.float64)
        lam = case["lambda_reg"]
        pt = W.chameleon_weights(X, "pretrain", lam=lam)
        ft = W.chameleon_weights(X, "finetune", lam=lam)
        name = case["name"]
        np.testing.assert_allclose(pt.affinity.numpy(), case["centered_affinity"], rtol=1e-12, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(pt.krls_raw.numpy(), case["krls_raw"], **TOL, err_msg=name)
        np.testing.assert_allclose(pt.krls.numpy(), case["krls_normalized"], **TOL, err_msg=name)
        np.testing.assert_allclose(pt.weights.numpy(), case["pretrain_weights_T5"], **TOL, err_msg=name)
        np.testing.assert_allclose(ft.weights.numpy(), case["finetune_weights_T0_2"], **TOL, err_msg=name)
        np.testing.assert_allclose(
            chameleon_ext.domain_weights(X, "finetune", lam=lam).numpy(), case["finetune_weights_T0_2"], **TOL
        )
        checked += 1
    assert checked >= 8


def test_golden_cases_from_affinity(golden):
    for case in golden:
        A = torch.tensor(case["centered_affinity"], dtype=torch.float64)
        lam = case["lambda_reg"]
        # The reference uses the given matrix as the kernel as it is (the paper's Figure 1
        # matrix is centred only to its printed digits).
        pt = W.domain_weights_from_affinity(A, "pretrain", lam=lam, center=False)
        ft = W.domain_weights_from_affinity(A, "finetune", lam=lam, center=False)
        name = case["name"]
        np.testing.assert_allclose(pt.krls_raw.numpy(), case["krls_raw"], **TOL, err_msg=name)
        np.testing.assert_allclose(pt.krls.numpy(), case["krls_normalized"], **TOL, err_msg=name)
        np.testing.assert_allclose(pt.weights.numpy(), case["pretrain_weights_T5"], **TOL, err_msg=name)
        np.testing.assert_allclose(ft.weights.numpy(), case["finetune_weights_T0_2"], **TOL, err_msg=name)
    assert any(c["name"] == "paper_figure1_affinity" for c in golden)


def test_affinity_variant_centres_a_raw_gram_matrix(golden):
    case = next(c for c in golden if "domain_embeddings" in c)
    X = torch.tensor(case["domain_embeddings"], dtype=torch.float64)
    res = W.domain_weights_from_affinity(X @ X.T, "pretrain", lam=case["lambda_reg"])
    np.testing.assert_allclose(res.weights.numpy(), case["pretrain_weights_T5"], **TOL)


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k,d,lam,T", [(4, 3, 10.0, None), (9, 50, 0.3, 2.0), (30, 8, 3.0, 0.5)])
def test_against_numpy_reimplementation(mode, normalize, k, d, lam, T):
    rng = np.random.default_rng(k * d)
    X = rng.normal(size=(k, d)) + rng.normal(size=(1, d))
    Tval = T if T is not None else W.DEFAULT_TEMPERATURE[mode]
    S, w = numpy_chameleon(X, lam, mode, Tval, normalize)
    res = W.chameleon_weights(torch.from_numpy(X), mode, lam=lam, temperature=T, normalize=normalize)
    np.testing.assert_allclose(res.krls.numpy(), S, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.weights.numpy(), w, rtol=1e-8, atol=1e-12)
    assert res.weights.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_float32_embeddings_give_float64_weights_close_to_float64_path():
    X = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    w32 = chameleon_ext.domain_weights(X)
    w64 = chameleon_ext.domain_weights(X.double())
    assert w32.dtype == torch.float64
    torch.testing.assert_close(w32, w64)


def test_one_domain_gets_weight_one_with_warning():
    with pytest.warns(UserWarning, match="only one domain"):
        w = chameleon_ext.domain_weights(torch.randn(1, 8))
    assert w.tolist() == [1.0]


def test_identical_domains_give_uniform_weights_with_warning():
    X = torch.ones(4, 6)
    with pytest.warns(UserWarning, match="identical embeddings"):
        w = chameleon_ext.domain_weights(X)
    torch.testing.assert_close(w, torch.full((4,), 0.25, dtype=torch.float64))


def test_duplicate_domains_give_finite_equal_weights():
    X = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    X[3] = X[1]
    for mode in ("pretrain", "finetune"):
        w = chameleon_ext.domain_weights(X, mode)
        assert torch.all(torch.isfinite(w))
        assert w[1].item() == pytest.approx(w[3].item(), rel=1e-9)


def test_pretrain_upweights_shared_and_finetune_upweights_distinctive():
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(1, 32, generator=g, dtype=torch.float64)
    X = torch.cat([shared + 0.05 * torch.randn(4, 32, generator=g, dtype=torch.float64),
                   5.0 * torch.randn(1, 32, generator=g, dtype=torch.float64)])
    pt = chameleon_ext.domain_weights(X, "pretrain", lam=1.0)
    ft = chameleon_ext.domain_weights(X, "finetune", lam=1.0)
    assert pt.argmin().item() == 4 and ft.argmax().item() == 4


def test_large_k_runs_through_the_library_path():
    X = torch.randn(1000, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    res = W.chameleon_weights(X, lam=10.0)
    S, w = numpy_chameleon(X.numpy(), 10.0, "pretrain", 5.0)
    np.testing.assert_allclose(res.krls.numpy(), S, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(res.weights.numpy(), w, rtol=1e-6, atol=1e-12)


def test_as_dict_names_domains():
    res = W.chameleon_weights(torch.randn(3, 4), domains=["web", "code", "books"])
    d = res.as_dict()
    assert list(d["weights"]) == ["web", "code", "books"]
    assert sum(d["weights"].values()) == pytest.approx(1.0)


def test_bad_arguments():
    X = torch.randn(4, 5)
    with pytest.raises(ValueError, match="mode must be 'pretrain' or 'finetune'"):
        chameleon_ext.domain_weights(X, "train")
    for lam in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lam must be a finite number > 0"):
            chameleon_ext.domain_weights(X, lam=lam)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        chameleon_ext.domain_weights(X, temperature=0.0)
    with pytest.raises(ValueError, match=r"embeddings must be \[k, d\]"):
        chameleon_ext.domain_weights(torch.randn(4))
    with pytest.raises(ValueError, match="floating-point"):
        chameleon_ext.domain_weights(torch.ones(3, 2, dtype=torch.long))
    bad = X.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in row\(s\) \[2\]"):
        chameleon_ext.domain_weights(bad)
    with pytest.raises(ValueError, match="square"):
        W.domain_weights_from_affinity(torch.randn(3, 4))
    with pytest.raises(ValueError, match="domains must name the 3 rows"):
        W.domain_weights_from_affinity(torch.eye(3), domains=["a", "b"])


def test_build_info_reports_the_build():
    info = chameleon_ext.build_info()
    assert info["version"] == chameleon_ext.__version__
    assert info["torch_version"] == torch.__version__ == info["torch_version_runtime"]
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_version"] == torch.version.cuda and info["cuda_arch_list"]
