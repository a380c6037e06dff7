"""krls on CUDA: every kernel instantiation and launch path (they skip without a GPU), and,
on any machine, NumPy transliterations of the two CUDA kernels' per-lane algorithms
(csrc/cuda/krls_cuda.cu), lane by lane, checked against the oracle. The transliterations
validate the kernels' indexing, shuffles and shared-memory layout before they ever run.
"""

import numpy as np
import pytest
import torch

import chameleon_ext
from chameleon_ext import reference

from .factories import CUDA, make_kernels
from .test_krls import exactly_indefinite_kernel


def cuda_only(test):
    """Needs a GPU: skipped without one, and marked `gpu` (the GPU check runs `-m gpu`)."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="CUDA not available on this machine")(test))


# k per size class: KMAX = 8, 16, 32 (registers), the shared-memory kernel, the library path.
CLASS_KS = [1, 2, 5, 8, 9, 16, 17, 31, 32, 33, 48, 63, 64, 65, 100]


def tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)


# --------------------------------------------------------------------------- transliterations


def emulate_registers_kernel(K, lam, center=True, scale_by_k=True, KMAX=32):
    """krls_registers_kernel for one matrix: lane r of the group is index r of axis 0;
    __shfl_sync(v, src, KMAX) reads v[src] for every lane. Returns (S [k], status, pivot)."""
    K = np.asarray(K, dtype=np.float64)
    k = K.shape[0]
    assert k <= KMAX
    rows = np.arange(KMAX)
    x = np.zeros((KMAX, KMAX))
    y = np.zeros((KMAX, KMAX))
    x[:k, :k] = K          # lane row, element j: K[row, j]
    y[:k, :k] = K.T        # K[j, row]
    maxabs = np.max(np.maximum(np.abs(x), np.abs(y)))
    maxasym = np.max(np.abs(x - y))
    finite = bool(np.isfinite(x).all() and np.isfinite(y).all())
    a = 0.5 * (x + y)
    mu = lam * k if scale_by_k else lam
    st = 0 if (mu > 0 and np.isfinite(mu)) else 5
    if st == 0 and not finite:
        st = 1
    if st == 0 and maxasym > 1e-8 * maxabs:
        st = 2
    if st != 0:
        mu, a = 1.0, np.zeros_like(a)
    if center:
        rowmean = a.sum(1) / k
        grand = rowmean.sum() / k
        for j in range(KMAX):
            rm_j = rowmean[j]
            sel = (rows < k) & (j < k)
            a[sel, j] += grand - rowmean[sel] - rm_j
    rinv = np.ones(KMAX)
    d_own = np.zeros(KMAX)
    fail = -1
    for j in range(KMAX):
        if j >= k:
            continue
        dj = a[j, j]
        piv = dj + mu
        ok = piv > 0 and np.isfinite(piv)
        if not ok and fail < 0:
            fail = j
        r = 1.0 / np.sqrt(piv if ok else 1.0)
        rinv[j], d_own[j] = r, dj
        lij = np.where(rows > j, a[:, j] * r, 0.0)
        a[rows > j, j] = lij[rows > j]
        for m in range(j + 1, KMAX):
            if m < k:
                lmj = lij[m]
                sel = m <= rows
                a[sel, m] -= lij[sel] * lmj
    w = np.zeros((KMAX, KMAX))  # lane row, element p: W[p, row]
    below = np.zeros(KMAX)
    for p in range(KMAX):
        if p >= k:
            continue
        s = (rows == p).astype(np.float64)
        for q in range(p):
            s -= a[p, q] * w[:, q]
        w[:, p] = s * rinv[p]
        below += np.where(p > rows, w[:, p] ** 2, 0.0)
    S = np.clip(d_own * rinv * rinv - mu * below, 0.0, 1.0)[:k]
    if st == 0 and fail >= 0:
        st = 3
    return (S if st == 0 else np.full(k, np.nan)), st, fail


def emulate_shared_kernel(K, lam, center=True, scale_by_k=True):
    """krls_shared_kernel for one matrix: a flat shared array with row pitch k + 1; lane l
    owns rows/columns l and 63 - l. Lanes run one after another inside each phase (between
    __syncwarp calls), which is exact when no lane reads what another writes in that phase."""
    K = np.asarray(K, dtype=np.float64)
    k = K.shape[0]
    assert k <= 64
    ld = k + 1
    A = np.zeros(k * ld + 3 * k)
    rowmean_off, dpiv_off, rinv_off = k * ld, k * ld + k, k * ld + 2 * k
    for i in range(k):
        for j in range(k):
            A[i * ld + j] = K[i, j]
    maxabs = maxasym = 0.0
    finite = True
    for lane in range(32):
        for j in (lane, 63 - lane):
            if j >= k:
                continue
            djj = A[j * ld + j]
            finite &= bool(np.isfinite(djj))
            maxabs = max(maxabs, abs(djj))
            for i in range(j + 1, k):
                xv, yv = A[i * ld + j], A[j * ld + i]
                finite &= bool(np.isfinite(xv) and np.isfinite(yv))
                maxabs = max(maxabs, abs(xv), abs(yv))
                maxasym = max(maxasym, abs(xv - yv))
                A[i * ld + j] = A[j * ld + i] = 0.5 * (xv + yv)
    mu = lam * k if scale_by_k else lam
    st = 0 if (mu > 0 and np.isfinite(mu)) else 5
    if st == 0 and not finite:
        st = 1
    if st == 0 and maxasym > 1e-8 * maxabs:
        st = 2
    if st != 0:
        mu = 1.0
        A[: k * ld] = 0.0
    if center:
        partial = 0.0
        for lane in range(32):
            for i in (lane, 63 - lane):
                if i >= k:
                    continue
                s = sum(A[i * ld + j] for j in range(k))
                A[rowmean_off + i] = s / k
                partial += s / k
        grand = partial / k
        for lane in range(32):
            for i in (lane, 63 - lane):
                if i >= k:
                    continue
                rm_i = A[rowmean_off + i]
                for j in range(k):
                    A[i * ld + j] += grand - rm_i - A[rowmean_off + j]
    fail = -1
    for j in range(k):
        dj = A[j * ld + j]
        piv = dj + mu
        ok = piv > 0 and np.isfinite(piv)
        if not ok and fail < 0:
            fail = j
        r = 1.0 / np.sqrt(piv if ok else 1.0)
        A[dpiv_off + j], A[rinv_off + j] = dj, r
        for lane in range(32):
            for i in (lane, 63 - lane):
                if j < i < k:
                    A[i * ld + j] *= r
        for lane in range(32):
            for i in (lane, 63 - lane):
                if i <= j or i >= k:
                    continue
                lij = A[i * ld + j]
                for m in range(j + 1, i + 1):
                    A[i * ld + m] -= lij * A[m * ld + j]
    if st == 0 and fail >= 0:
        st = 3
    S = np.zeros(k)
    for lane in range(32):
        for c in (lane, 63 - lane):
            if c >= k:
                continue
            wc = A[rinv_off + c]
            below = 0.0
            for p in range(c + 1, k):
                s = -A[p * ld + c] * wc
                for q in range(c + 1, p):
                    s -= A[p * ld + q] * A[c * ld + q]
                wp = s * A[rinv_off + p]
                A[c * ld + p] = wp
                below += wp * wp
            S[c] = min(max(A[dpiv_off + c] * wc * wc - mu * below, 0.0), 1.0)
    return (S if st == 0 else np.full(k, np.nan)), st, fail


@pytest.mark.parametrize("KMAX,ks", [(8, [1, 2, 5, 8]), (16, [9, 16]), (32, [17, 32])])
@pytest.mark.parametrize("center,scale_by_k", [(True, True), (False, False)])
def test_registers_kernel_transliteration(KMAX, ks, center, scale_by_k):
    for k in ks:
        K = make_kernels(1, k, seed=k)[0].numpy()
        for lam in (1e-3, 0.7, 1e4):
            S, st, _ = emulate_registers_kernel(K, lam, center, scale_by_k, KMAX)
            assert st == 0
            np.testing.assert_allclose(S, reference.krls_eigh_numpy(K, lam, center, scale_by_k), rtol=1e-9, atol=1e-12)
    # the cancellation-free form: a tiny kernel keeps its relative precision
    K = make_kernels(1, ks[-1], seed=1)[0].numpy() * 1e-20
    S, _, _ = emulate_registers_kernel(K, 1.0, center, scale_by_k, KMAX)
    exact = reference.krls_eigh_numpy(K * 1e20, 1e20, center, scale_by_k)
    np.testing.assert_allclose(S, exact, rtol=1e-10)


@pytest.mark.parametrize("k", [33, 47, 64, 20])
def test_shared_kernel_transliteration(k):
    K = make_kernels(1, k, seed=k)[0].numpy()
    for center, scale_by_k in ((True, True), (False, False)):
        S, st, _ = emulate_shared_kernel(K, 0.6, center, scale_by_k)
        assert st == 0
        np.testing.assert_allclose(S, reference.krls_eigh_numpy(K, 0.6, center, scale_by_k), rtol=1e-9, atol=1e-12)


def test_transliterations_report_failures_like_the_cpu_kernel():
    K = -1e6 * np.eye(5)
    for emulate in (lambda K, lam: emulate_registers_kernel(K, lam, KMAX=8), emulate_shared_kernel):
        S, st, fail = emulate(K, 1.0)
        assert st == 3 and fail == 0 and np.isnan(S).all()
        bad = make_kernels(1, 5)[0].numpy()
        bad[1, 2] += 1.0
        assert emulate(bad, 1.0)[1] == 2
        bad[3, 3] = np.nan
        assert emulate(bad, 1.0)[1] == 1
        assert emulate(make_kernels(1, 5)[0].numpy(), -1.0)[1] == 5


# --------------------------------------------------------------------------- on the GPU


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", CLASS_KS)
def test_cuda_every_size_class(dtype, k):
    K = make_kernels(37, k, d=2 * k, dtype=dtype, device="cuda")
    S = chameleon_ext.krls(K, 0.7)
    assert S.device == K.device and S.dtype == dtype and S.shape == (37, k)
    torch.testing.assert_close(S.cpu(), chameleon_ext.krls(K.cpu(), 0.7), **tol(dtype))
    torch.testing.assert_close(S.cpu().double(), reference.krls(K.cpu(), 0.7).double(), **tol(dtype))
    S2 = chameleon_ext.krls(K, 0.7, center=False, scale_by_k=False)
    torch.testing.assert_close(S2.cpu(), chameleon_ext.krls(K.cpu(), 0.7, center=False, scale_by_k=False), **tol(dtype))


@cuda_only
@pytest.mark.parametrize("k", [5, 16, 30, 40, 64])
def test_cuda_small_scores_without_cancellation(k):
    K = make_kernels(4, k, device="cuda") * 1e-14
    S = chameleon_ext.krls(K, 10.0).cpu()
    exact = reference.krls_eigh_numpy(K.cpu().numpy() * 1e14, 10.0 * 1e14)
    np.testing.assert_allclose(S.numpy(), exact, rtol=1e-10)


@cuda_only
@pytest.mark.parametrize("k", [7, 20, 50, 100])
def test_cuda_lam_tensor_and_krls_ex(k):
    K = make_kernels(5, k, device="cuda")
    lam = torch.tensor([0.1, 1.0, 10.0, 100.0, 1000.0], dtype=torch.float64, device="cuda")
    S = chameleon_ext.krls(K, lam)
    loop = torch.stack([chameleon_ext.krls(K[i], float(lam[i])) for i in range(5)])
    torch.testing.assert_close(S, loop, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(chameleon_ext.krls(K, lam.cpu()), S, rtol=0, atol=0)
    bad = K.clone()
    bad[1, 0, 0] = float("nan")
    bad[2, 0, 1] += 1.0
    bad[3] = -1e6 * torch.eye(k, dtype=K.dtype, device="cuda")
    lam_bad = lam.clone()
    lam_bad[4] = -1.0
    S, info = chameleon_ext.krls_ex(bad, lam_bad)
    assert info.device == K.device and info.tolist() == [0, 1, 2, 3, 5]
    assert torch.isnan(S[1:]).all() and torch.isfinite(S[0]).all()
    with pytest.raises(ValueError, match=r"K\[1\] \(batch index 1\) holds NaN"):
        chameleon_ext.krls(bad, lam_bad)
    # the indefinite matrix first: with lam = 1e-300 the centred PSD kernel after it is singular
    # to rounding, so whether it fails too is not fixed (only the first failure is asserted)
    tiny = torch.stack([exactly_indefinite_kernel(k, device="cuda"), make_kernels(1, k, device="cuda")[0]])
    with pytest.raises(ValueError, match=r"lam = 1e-300 is too small for K\[0\] \(batch index 0\)"):
        chameleon_ext.krls(tiny, 1e-300)
    S, info = chameleon_ext.krls_ex(tiny, 1e-300)
    assert info.tolist()[0] == 4 and torch.isnan(S[0]).all()


@cuda_only
def test_cuda_empty_k0_k1():
    assert chameleon_ext.krls(torch.zeros(0, 4, 4, device="cuda"), 1.0).shape == (0, 4)
    S, info = chameleon_ext.krls_ex(torch.zeros(0, 4, 4, device="cuda"), 1.0)
    assert S.shape == (0, 4) and info.shape == (0,)
    with pytest.raises(ValueError, match="K must have k >= 1"):
        chameleon_ext.krls(torch.zeros(2, 0, 0, device="cuda"), 1.0)
    S = chameleon_ext.krls(torch.full((3, 1, 1), 4.0, dtype=torch.float64, device="cuda"), 1.0)
    assert S.tolist() == [[0.0], [0.0], [0.0]]
    S = chameleon_ext.krls(torch.full((3, 1, 1), 4.0, dtype=torch.float64, device="cuda"), 1.0, center=False)
    torch.testing.assert_close(S.cpu(), torch.full((3, 1), 0.8, dtype=torch.float64), rtol=1e-15, atol=0)


@cuda_only
@pytest.mark.parametrize("k", [6, 24, 40])
def test_cuda_non_contiguous_inputs(k):
    base = make_kernels(8, k, device="cuda")
    for K in (base[::2], base.transpose(-1, -2), base.reshape(2, 4, k, k).transpose(0, 1)):
        torch.testing.assert_close(chameleon_ext.krls(K, 0.9).cpu(), reference.krls(K.cpu(), 0.9), rtol=1e-10, atol=1e-12)


@cuda_only
def test_cuda_non_default_stream():
    K = make_kernels(64, 12, device="cuda")
    expected = reference.krls(K.cpu(), 1.5)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        S, info = chameleon_ext.krls_ex(K, 1.5)
    s.synchronize()
    torch.testing.assert_close(S.cpu(), expected, rtol=1e-10, atol=1e-12)
    assert int(info.abs().sum()) == 0


@cuda_only
def test_cuda_wrong_device_inputs():
    K = make_kernels(2, 5, device="cuda")
    # a non-scalar CPU lam is accepted (copied); lam on another GPU is an error
    torch.testing.assert_close(chameleon_ext.krls(K, torch.tensor([1.0, 2.0])).cpu(),
                               chameleon_ext.krls(K.cpu(), torch.tensor([1.0, 2.0])), rtol=1e-12, atol=1e-15)
    if torch.cuda.device_count() < 2:
        pytest.skip("a second GPU is needed for the cross-device case")
    with pytest.raises(ValueError, match="lam must be on K's device"):
        chameleon_ext.krls(K, torch.tensor([1.0, 2.0], device="cuda:1"))
    K1 = K.to("cuda:1")
    torch.testing.assert_close(chameleon_ext.krls(K1, 0.5).cpu(), chameleon_ext.krls(K.cpu(), 0.5), rtol=1e-10, atol=1e-12)


@cuda_only
def test_cuda_paths_agree_and_fused_limit(monkeypatch):
    K = make_kernels(9, 40, device="cuda")
    expected = reference.krls(K.cpu(), 0.9)
    for path in ("fused", "library", "auto"):
        monkeypatch.setenv("CHAMELEON_KRLS_PATH", path)
        torch.testing.assert_close(chameleon_ext.krls(K, 0.9).cpu(), expected, rtol=1e-10, atol=1e-12)
    monkeypatch.setenv("CHAMELEON_KRLS_PATH", "fused")
    with pytest.raises(ValueError, match="the fused CUDA krls kernel handles k <= 64"):
        chameleon_ext.krls(make_kernels(1, 65, device="cuda"), 1.0)


@cuda_only
def test_cuda_batch_beyond_one_grid():
    """More matrices than blocks x matrices per block (2^20 x 16 for k <= 8): the kernel's
    grid-stride loop covers them all."""
    batch = (1 << 20) * 16 + 5
    K = torch.eye(2, device="cuda").expand(batch, 2, 2) * torch.arange(1, 3, device="cuda").view(1, 1, 2)
    S = chameleon_ext.krls(K, 0.25, center=False, scale_by_k=False)  # diag(1, 2): 0.8, 8/9
    assert S.shape == (batch, 2)
    torch.testing.assert_close(S[-3:].cpu(), torch.tensor([[0.8, 8 / 9]] * 3), rtol=1e-6, atol=0)
    assert bool(((S[:, 0] - 0.8).abs() < 1e-6).all())


@cuda_only
def test_cuda_gradcheck_and_opcheck():
    X = torch.randn(2, 5, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    lam = torch.tensor([0.3, 3.0], dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(lambda x: chameleon_ext.krls(x @ x.mT, lam), (X,))
    K = make_kernels(3, 9, device="cuda").requires_grad_()
    for packet in (torch.ops.chameleon.krls, torch.ops.chameleon.krls_ex):
        torch.library.opcheck(packet.default, (K, 0.5, True, True))
        torch.library.opcheck(packet.lam_tensor, (K, torch.tensor(0.5, dtype=torch.float64), True, True))
        torch.library.opcheck(packet.lam_tensor, (K, torch.tensor([0.5, 1.0, 2.0], device="cuda"), True, False))
