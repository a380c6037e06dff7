"""krls accuracy at every scale, against an extended-precision oracle written here (mpmath,
60 significant digits, from the exact float64 inputs), and a few leverages computed by hand.

The op computes S_i = d_i W_ii^2 - mu sum_{p>i} W_pi^2 (see csrc/krls.h), which never
subtracts numbers close to 1: a small score keeps its relative precision. The old form
1 - mu ||L^-1 e_i||^2 cancelled; these tests fail on it by many orders of magnitude.
"""

import math

import mpmath
import numpy as np
import pytest
import torch

import chameleon_ext
from chameleon_ext import reference
from chameleon_ext import weights as weights_mod

from .factories import make_kernels

mpmath.mp.dps = 60

SCALES = [1e-12, 1e-8, 1e-4, 1.0, 1e4, 1e8, 1e12]
LAMS = [1e-6, 1e-3, 1.0, 1e3, 1e8]
PATHS = ["fused", "library"]


def oracle_krls(K, lam, center=True, scale_by_k=True):
    """S = diag(Kc (Kc + mu I)^-1) in 60-digit arithmetic, as mpf numbers: [k]."""
    K = np.asarray(K, dtype=np.float64)
    k = K.shape[0]
    M = mpmath.matrix([[mpmath.mpf(float(0.5 * (K[i, j] + K[j, i]))) if i != j else mpmath.mpf(float(K[i, i]))
                        for j in range(k)] for i in range(k)])
    if center:
        rm = [sum(M[i, j] for j in range(k)) / k for i in range(k)]
        g = sum(rm) / k
        M = mpmath.matrix([[M[i, j] - rm[i] - rm[j] + g for j in range(k)] for i in range(k)])
    mu = mpmath.mpf(lam) * (k if scale_by_k else 1)
    A = M + mu * mpmath.eye(k)
    Y = mpmath.inverse(A) * M  # A^-1 Kc; Kc and A commute, so diag(A^-1 Kc) = diag(Kc A^-1)
    return [Y[i, i] for i in range(k)]


def rel_err(S, exact):
    out = 0.0
    for s, e in zip(S.tolist(), exact):
        e = float(e)
        out = max(out, abs(s - e) / abs(e) if e != 0 else abs(s))
    return out


def well_conditioned_pd(k, seed=0):
    """K0 = Q diag(1..3) Q^T: condition number 3, no null space (for center=False)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    ev = torch.linspace(1.0, 3.0, k, dtype=torch.float64)
    K = Q @ torch.diag(ev) @ Q.T
    return 0.5 * (K + K.T)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [2, 7])
def test_relative_error_every_scale_uncentred(path, k, monkeypatch):
    """center=False on a well-conditioned K: the problem is well conditioned at every scale,
    so every score must be within 1e-10 relative, however small (down to ~1e-21)."""
    monkeypatch.setenv("CHAMELEON_KRLS_PATH", path)
    K0 = well_conditioned_pd(k)
    worst = 0.0
    for c in SCALES:
        for lam in LAMS:
            K = K0 * c
            S = chameleon_ext.krls(K, lam, center=False)
            err = rel_err(S, oracle_krls(K.numpy(), lam, center=False))
            assert err < 1e-10, (c, lam, err)
            worst = max(worst, err)
    assert worst < 1e-13  # in practice a few ulps


@pytest.mark.parametrize("path", PATHS)
def test_relative_error_every_scale_centred(path, monkeypatch):
    """Centred Gram kernels of rank k - 1 at every scale. Where the kernel is not far above mu
    (the regime of small scores), 1e-10 relative. Far above it, the float64 rounding of the
    centring itself (about eps * max|K| in the direction of the all-ones vector, against an
    eigenvalue mu there) bounds any float64 method: the error stays within 1e-13 of the
    condition number (c * s_max + mu) / mu."""
    monkeypatch.setenv("CHAMELEON_KRLS_PATH", path)
    k = 7
    K0 = make_kernels(1, k, d=12, seed=11)[0]
    s_max = float(torch.linalg.eigvalsh(reference.center_kernel(K0)).max())
    for c in SCALES:
        for lam in LAMS:
            K = K0 * c
            mu = lam * k
            cond = (c * s_max + mu) / mu
            if mu <= 1024 * k * 2.2205e-16 * float(K.abs().max()):
                # Below K's rounding level the centred K + mu I may not be numerically positive
                # definite at all: then the error blames lam (and never returns garbage).
                try:
                    S = chameleon_ext.krls(K, lam)
                except ValueError as e:
                    assert "too small" in str(e)
                    continue
            else:
                S = chameleon_ext.krls(K, lam)
            err = rel_err(S, oracle_krls(K.numpy(), lam))
            bound = 1e-10 if cond <= 1e3 else 1e-10 + 1e-13 * cond
            assert err < bound, (c, lam, cond, err)


@pytest.mark.parametrize("scale", [1e-7, 1e-5])
def test_domain_weights_of_tiny_embeddings_match_oracle(scale):
    """Tiny embeddings lose no accuracy: a float32 path once gave 0.16078 against 0.16338 for
    the first domain at scale 1e-7, and uniform weights at 1e-5."""
    X = torch.randn(7, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * scale
    w = chameleon_ext.weights_from_embeddings(X, "finetune", rule="paper").weights
    A = X @ X.T  # the affinity exactly as the method forms it
    S = oracle_krls(A.numpy(), weights_mod.DEFAULT_LAMBDA)
    Sn = [s / sum(S) for s in S]
    T = weights_mod.DEFAULT_TEMPERATURE["finetune"]
    z = [mpmath.exp(s / T) for s in Sn]
    expected = torch.tensor([float(v / sum(z)) for v in z], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-9)
    # and the raw scores themselves, relative
    assert rel_err(chameleon_ext.krls(A, weights_mod.DEFAULT_LAMBDA), S) < 1e-10


def test_float32_accuracy():
    """float32 inputs are factorised in float64 from their exact float32 values; the only
    float32 error is the final rounding of each score (relative 6e-8), at every scale."""
    k = 6
    K0 = well_conditioned_pd(k, seed=3).float()
    for c in [1e-12, 1e-4, 1.0, 1e4]:
        for lam in [1e-3, 1.0, 1e8]:
            K = K0 * c
            S = chameleon_ext.krls(K, lam, center=False)
            assert S.dtype == torch.float32
            assert rel_err(S.double(), oracle_krls(K.double().numpy(), lam, center=False)) < 1.2e-7


# --------------------------------------------------------------------------- by hand


@pytest.mark.parametrize("path", PATHS)
def test_two_by_two_by_hand(path, monkeypatch):
    monkeypatch.setenv("CHAMELEON_KRLS_PATH", path)
    f64 = dict(dtype=torch.float64)
    # Centred: K = diag(4, 0) -> Kc = [[1, -1], [-1, 1]] = 2 u u^T, u = (1, -1)/sqrt 2;
    # mu = 1 * 2: S_i = u_i^2 * 2 / (2 + 2) = 1/4 (to a few ulps: the pivots are irrational).
    S = chameleon_ext.krls(torch.tensor([[4.0, 0.0], [0.0, 0.0]], **f64), 1.0)
    torch.testing.assert_close(S, torch.tensor([0.25, 0.25], **f64), rtol=1e-15, atol=0)
    # Uncentred diagonal: S_i = K_ii / (K_ii + mu), mu = 1: 3/4 and 1/2.
    S = chameleon_ext.krls(torch.tensor([[3.0, 0.0], [0.0, 1.0]], **f64), 1.0, center=False, scale_by_k=False)
    torch.testing.assert_close(S, torch.tensor([0.75, 0.5], **f64), rtol=1e-15, atol=0)
    # [[2, 1], [1, 2]]: eigenvalues 3 and 1 on (1, 1)/sqrt 2 and (1, -1)/sqrt 2; mu = 1:
    # S_i = 1/2 * 3/4 + 1/2 * 1/2 = 5/8 (to a few ulps).
    S = chameleon_ext.krls(torch.tensor([[2.0, 1.0], [1.0, 2.0]], **f64), 1.0, center=False, scale_by_k=False)
    torch.testing.assert_close(S, torch.tensor([0.625, 0.625], **f64), rtol=1e-15, atol=0)
    # Tiny kernel: diag(1e-300, 0) uncentred, mu = 1: S = 1e-300 / (1 + 1e-300) = 1e-300, where
    # 1 - mu * ||L^-1 e_0||^2 gives exactly 0.
    S = chameleon_ext.krls(torch.tensor([[1e-300, 0.0], [0.0, 0.0]], **f64), 1.0, center=False, scale_by_k=False)
    assert S.tolist() == [1e-300, 0.0]


def test_small_scores_scale_exactly_with_the_kernel():
    """For a kernel far below mu, S ~ diag(Kc) / mu: halving K halves S to rounding."""
    K = make_kernels(3, 9, seed=5) * 1e-20
    S1, S2 = chameleon_ext.krls(K, 3.0), chameleon_ext.krls(K * 0.5, 3.0)
    torch.testing.assert_close(S2 * 2.0, S1, rtol=1e-13, atol=0)
    diag = torch.diagonal(reference.center_kernel(K), dim1=-2, dim2=-1) / (3.0 * 9)
    torch.testing.assert_close(S1, diag, rtol=1e-12, atol=0)
    assert math.isfinite(float(S1.min())) and float(S1.min()) > 0
