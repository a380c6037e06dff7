"""The fused CPU krls kernel solves 16 matrices side by side (a group, one per SIMD lane), and
takes its Cholesky entries two rows at a time and the columns of L^-1 two at a time. These
tests cover what that layout adds: every k on both sides of the pairings' parity, batches
that end in a part-filled group, scores at extreme magnitudes, and per-matrix statuses in
the middle of a group without spoiling its neighbours.
"""

import numpy as np
import pytest
import torch

import chameleon_ext

from .factories import make_kernels

KS = list(range(1, 21)) + [31, 32, 33]
BATCH = 37  # two full groups of 16 and a group of 5


def numpy_krls(K, lam):
    """diag(Kc (Kc + mu I)^-1), mu = lam * k, in float64 NumPy (one solve per matrix)."""
    K = np.asarray(K, dtype=np.float64)
    k = K.shape[-1]
    K = 0.5 * (K + np.swapaxes(K, -1, -2))
    Kc = K - K.mean(-1, keepdims=True) - K.mean(-2, keepdims=True) + K.mean((-2, -1), keepdims=True)
    A = Kc + lam * k * np.eye(k)
    return np.diagonal(np.linalg.solve(A, Kc), axis1=-2, axis2=-1)


@pytest.fixture(autouse=True)
def fused_path(monkeypatch):
    monkeypatch.setenv("CHAMELEON_KRLS_PATH", "fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", KS)
def test_every_k_matches_numpy(k, dtype):
    K = make_kernels(BATCH, k, d=2 * k, dtype=dtype)
    lam = torch.logspace(-3, 2, BATCH, dtype=torch.float64)  # scores from ~1 to ~1e-3
    S = chameleon_ext.krls(K, lam)
    expected = numpy_krls(K.double().numpy(), lam.numpy()[:, None, None])
    rtol = 1e-10 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(S.double().numpy(), expected, rtol=rtol, atol=0)
    assert S.dtype == dtype


@pytest.mark.parametrize("dtype,scales", [(torch.float64, [1e-150, 1e150]), (torch.float32, [1e-30, 1e30])])
@pytest.mark.parametrize("k", [1, 2, 7, 16, 17, 33])
def test_scores_keep_their_precision_at_extreme_magnitudes(k, dtype, scales):
    """S(c K, c lam) = S(K, lam): the scaled problem must give the unit-scale scores, both in
    the regime of scores near 1 and of small scores (lam far above the kernel), to 1e-10
    relative in float64: nothing overflows, underflows or cancels."""
    K = make_kernels(BATCH, k, d=2 * k, dtype=torch.float64)
    lam = torch.logspace(-3, 5, BATCH, dtype=torch.float64)
    expected = numpy_krls(K.numpy(), lam.numpy()[:, None, None])
    if k > 1:  # (k = 1 centres to 0)
        assert expected.min() < 1e-4 and expected.max() > 0.4
    for c in scales:
        Kc = (K * c).to(dtype)
        S = chameleon_ext.krls(Kc, lam * c).double().numpy()
        if dtype == torch.float64:
            np.testing.assert_allclose(S, expected, rtol=1e-10, atol=0)
        else:  # the input itself is rounded to float32: compare with that input's own scores
            np.testing.assert_allclose(S, numpy_krls(Kc.double().numpy() / c, lam.numpy()[:, None, None]),
                                       rtol=2e-6, atol=0)


def exactly_indefinite(k):
    """-v v^T, v = e_0 - e_1: already centred, first pivot exactly -1 (fails with any tiny lam)."""
    v = np.zeros(k)
    v[0], v[1] = 1.0, -1.0
    return torch.from_numpy(-np.outer(v, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 5, 16, 17])
def test_statuses_inside_a_group_leave_the_other_lanes_exact(k, dtype):
    batch = 40
    K = make_kernels(batch, k, d=2 * k, dtype=torch.float64)
    lam = torch.full((batch,), 0.5, dtype=torch.float64)
    # lanes 3 and 9 of the first group, lanes 0 and 15 of the second, two in the last
    K[3, 0, k - 1] = float("nan")
    K[9, k - 1, 0] = float("inf")
    K[16, 1, 0] += 1.0  # not symmetric
    K[31] = -1e6 * torch.eye(k, dtype=torch.float64)  # centred: negative definite
    K[33] = exactly_indefinite(k)
    lam[33] = 1e-300  # below K's rounding level: blames lam
    lam[38] = -1.0
    K = K.to(dtype)
    S, info = chameleon_ext.krls_ex(K, lam)
    expected_info = [0] * batch
    expected_info[3] = expected_info[9] = 1  # non-finite
    expected_info[16] = 2  # not symmetric
    expected_info[31] = 3  # not positive definite
    expected_info[33] = 4  # lam too small
    expected_info[38] = 5  # bad lam
    assert info.tolist() == expected_info
    bad = torch.tensor(expected_info) != 0
    assert torch.isnan(S[bad]).all()
    good = ~bad
    expected = numpy_krls(K[good].double().numpy(), lam[good].numpy()[:, None, None])
    rtol = 1e-10 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(S[good].double().numpy(), expected, rtol=rtol, atol=0)
    # and each good matrix alone gives the same scores as inside its group
    for b in [0, 4, 15, 32, 39]:
        torch.testing.assert_close(S[b], chameleon_ext.krls(K[b], float(lam[b])), rtol=0, atol=0)
