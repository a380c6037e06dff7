"""The CUDA sweep kernel (v2, 16 < k <= 64; csrc/cuda/krls_sweep.cuh): its line-by-line NumPy
transliteration (python_tests/krls_sweep_emulation.py, which also checks shared-memory races,
reads of unwritten memory and that every score is written once) against the float64 eigen
oracle on the CPU, on both sides of every size boundary; and, on a GPU, the kernel itself
against the same oracle and against the previous kernels (CHAMELEON_KRLS_CUDA_KERNEL=v1).
"""

import numpy as np
import pytest
import torch

import chameleon_ext
from chameleon_ext import reference

from .factories import CUDA, make_kernels
from .krls_sweep_emulation import (BAD_LAM, LAM_TOO_SMALL, NON_FINITE, NOT_PD, NOT_SYMMETRIC, Shared, SweepShape,
                                   cuda_krls_kernel_for, emulate_sweep_launch)
from .test_krls import exactly_indefinite_kernel
from .test_krls_accuracy import SCALES, oracle_krls, rel_err, well_conditioned_pd


def cuda_only(test):
    """Needs a GPU: skipped without one, and marked `gpu` (the GPU check runs `-m gpu`)."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="CUDA not available on this machine")(test))


def oracle(K, lam, center=True, scale_by_k=True):
    K = np.asarray(K, dtype=np.float64)
    lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), K.shape[:1])
    return np.stack([reference.krls_eigh_numpy(M, float(lv), center, scale_by_k) for M, lv in zip(K, lam)])


# --------------------------------------------------------------------------- transliteration


def test_kernel_selection_at_every_boundary():
    got = {k: cuda_krls_kernel_for(k) for k in (8, 9, 16, 17, 32, 33, 48, 63, 64, 65)}
    assert got == {8: "registers<8>", 9: "registers<16>", 16: "registers<16>", 17: "sweep<32>", 32: "sweep<32>",
                   33: "sweep<64>", 48: "sweep<64>", 63: "sweep<64>", 64: "sweep<64>", 65: "library"}
    assert cuda_krls_kernel_for(17, v2=False) == "registers<32>" and cuda_krls_kernel_for(40, v2=False) == "shared"
    # one warp per matrix and 4 matrices per block at KP = 32; 4 warps, one matrix at KP = 64
    s32, s64 = SweepShape(32), SweepShape(64)
    assert (s32.threads, s32.matrices, s32.block_threads) == (32, 4, 128)
    assert (s64.threads, s64.matrices, s64.block_threads) == (128, 1, 128)
    assert s32.shared * 8 * s32.matrices == 4608 and s64.shared * 8 == 2320  # ptxas: smem per block


def test_shared_memory_checker_catches_what_the_kernel_must_not_do():
    """The transliteration's shared-memory checks are live: a race inside a phase, a read of
    memory not written for the current matrix, an access outside the slot, a misaligned
    16-byte access."""
    smem = Shared(16)
    smem.begin_matrix(0, 8)
    smem.write(np.array([2]), np.array([0]), 1.0)
    smem.read(np.array([2]), np.array([0]))  # the writer itself: fine
    smem.barrier()
    smem.read(np.array([2, 2]), np.array([1, 2]))  # after the barrier anyone may read
    smem.barrier()
    smem.write(np.array([3]), np.array([0]), 1.0)
    smem.read(np.array([3]), np.array([1]))
    with pytest.raises(AssertionError, match="race"):
        smem.barrier()
    with pytest.raises(AssertionError, match="before it was written"):
        smem.read(np.array([4]), np.array([0]))
    with pytest.raises(AssertionError, match="outside"):
        smem.write(np.array([9]), np.array([0]), 1.0)
    with pytest.raises(AssertionError, match="misaligned"):
        smem.write2(np.array([3]), np.array([0]), 1.0, 2.0)
    smem.begin_matrix(0, 8)  # the next matrix: what the last one wrote counts as unwritten
    with pytest.raises(AssertionError, match="before it was written"):
        smem.read(np.array([2]), np.array([0]))


@pytest.mark.parametrize("k", [17, 20, 31, 32, 33, 40, 47, 48, 49, 63, 64])
def test_sweep_transliteration_matches_the_oracle(k):
    K = make_kernels(3, k, seed=k).numpy()
    for center, scale_by_k in ((True, True), (False, False)):
        for lam in (1e-3, 0.7, 1e4):
            S, status, detail = emulate_sweep_launch(K, lam, center, scale_by_k)
            assert status.tolist() == [0, 0, 0] and detail.tolist() == [0, 0, 0]
            np.testing.assert_allclose(S, oracle(K, lam, center, scale_by_k), rtol=1e-9, atol=1e-12)


def test_sweep_transliteration_exact_small_case():
    """k = 17, K = diag(1..17), no centring, mu = 1: S_i = i / (i + 1) exactly up to rounding;
    a diagonal K makes every off-diagonal update zero, so only the pivots and the scores run."""
    k = 17
    K = np.diag(np.arange(1.0, k + 1))[None]
    S, status, _ = emulate_sweep_launch(K, 1.0, center=False, scale_by_k=False)
    np.testing.assert_allclose(S[0], np.arange(1, k + 1) / np.arange(2, k + 2), rtol=1e-15)
    assert status.tolist() == [0]


@pytest.mark.parametrize("KP,k,batch", [(32, 17, 7), (32, 32, 9), (32, 25, 4), (64, 33, 3), (64, 64, 2)])
def test_sweep_transliteration_partial_blocks_and_grid_stride(KP, k, batch):
    """A batch that is not a multiple of the matrices per block, and a grid capped below the
    batch (the grid-stride loop), give the same scores as a full grid, each written once."""
    K = make_kernels(batch, k, seed=batch + k, scales=np.logspace(-3, 3, batch)).numpy()
    lam = np.linspace(0.1, 5.0, batch)
    full, status, _ = emulate_sweep_launch(K, lam, KP=KP)
    capped, status2, _ = emulate_sweep_launch(K, lam, KP=KP, max_blocks=1)
    assert (status == 0).all() and (status2 == 0).all()
    np.testing.assert_array_equal(full, capped)
    np.testing.assert_allclose(full, oracle(K, lam), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [20, 40])
def test_sweep_transliteration_float32_and_strided_inputs(k):
    K64 = make_kernels(5, k, d=2 * k, seed=k).numpy()
    K32 = K64.astype(np.float32)
    S, status, _ = emulate_sweep_launch(K32, 0.5)
    assert S.dtype == np.float32 and (status == 0).all()
    np.testing.assert_allclose(S, oracle(K32, 0.5), rtol=2e-6, atol=1e-7)
    # a transposed view and every other matrix: the kernel's stride arithmetic
    view = np.swapaxes(np.stack([K64, K64 * 2.0], 1).reshape(10, k, k), 1, 2)[::2]
    S, status, _ = emulate_sweep_launch(view, 0.5, center=False)
    np.testing.assert_allclose(S, oracle(view, 0.5, center=False), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [24, 50])
def test_sweep_transliteration_keeps_small_scores_precise(k):
    """The cancellation-free form: a kernel 1e-20 times smaller than mu keeps its relative precision."""
    K = make_kernels(2, k, seed=3).numpy() * 1e-20
    S, _, _ = emulate_sweep_launch(K, 1.0)
    np.testing.assert_allclose(S, oracle(K * 1e20, 1e20), rtol=1e-10)
    # a huge full-rank kernel, not centred (centring makes it singular, and lam = 1 would be
    # below its rounding level): scores just below 1, nothing overflows
    K = make_kernels(2, k, d=2 * k, seed=3).numpy() * 1e20
    S, status, _ = emulate_sweep_launch(K, 1.0, center=False)
    assert (status == 0).all()
    np.testing.assert_allclose(S, oracle(K, 1.0, center=False), rtol=1e-12)


def test_sweep_transliteration_accuracy_at_every_scale():
    """Against the 60-digit oracle of test_krls_accuracy: a well-conditioned uncentred kernel
    keeps every score within a few ulps at every scale (scores down to ~1e-21), and a centred
    rank-deficient one stays within the conditioning bound the CPU and library paths meet."""
    k = 17
    K0 = well_conditioned_pd(k).numpy()
    Ks = np.stack([K0 * c for c in SCALES])
    for lam in (1e-6, 1e8):
        S, status, _ = emulate_sweep_launch(Ks, lam, center=False)
        assert (status == 0).all()
        worst = max(rel_err(torch.from_numpy(S[i]), oracle_krls(Ks[i], lam, center=False)) for i in range(len(Ks)))
        assert worst < 1e-13, (lam, worst)
    k = 20
    K0 = make_kernels(1, k, d=12, seed=11)[0]
    s_max = float(torch.linalg.eigvalsh(reference.center_kernel(K0)).max())
    Ks = np.stack([K0.numpy() * c for c in SCALES])
    for lam in (1e-3, 1e3):
        S, status, _ = emulate_sweep_launch(Ks, lam)
        for i, c in enumerate(SCALES):
            mu = lam * k
            if status[i] != 0:  # only where mu is below K's rounding level, and then it blames lam
                assert status[i] == LAM_TOO_SMALL and mu <= 1024 * k * 2.2205e-16 * np.abs(Ks[i]).max()
                continue
            cond = (c * s_max + mu) / mu
            bound = 1e-10 if cond <= 1e3 else 1e-10 + 1e-13 * cond
            assert rel_err(torch.from_numpy(S[i]), oracle_krls(Ks[i], lam)) < bound, (c, lam)


@pytest.mark.parametrize("k", [17, 33, 64])
def test_sweep_transliteration_reports_failures_like_the_cpu_kernel(k):
    good = make_kernels(1, k, seed=1).numpy()[0]
    nan = good.copy()
    nan[3, 3] = np.nan
    asym = good.copy()
    asym[1, 2] += 1.0
    indefinite = -1e6 * np.eye(k)
    K = np.stack([good, nan, asym, indefinite, good])
    lam = np.array([1.0, 1.0, 1.0, 1.0, -1.0])
    S, status, detail = emulate_sweep_launch(K, lam)
    assert status.tolist() == [0, NON_FINITE, NOT_SYMMETRIC, NOT_PD, BAD_LAM]
    assert detail.tolist()[3] == 0  # the first pivot of -1e6 I (centred: still -1e6 + ...) fails
    assert np.isfinite(S[0]).all() and np.isnan(S[1:]).all()
    np.testing.assert_allclose(S[0], oracle(good[None], 1.0)[0], rtol=1e-9, atol=1e-12)
    # an exactly indefinite kernel with a tiny lam blames lam, at pivot 0
    tiny = exactly_indefinite_kernel(k).numpy()[None]
    S, status, detail = emulate_sweep_launch(tiny, 1e-300)
    assert status.tolist() == [LAM_TOO_SMALL] and detail.tolist() == [0] and np.isnan(S).all()


# --------------------------------------------------------------------------- on the GPU


@cuda_only
@pytest.mark.parametrize("kernel", ["v1", "v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [16, 17, 24, 31, 32, 33, 40, 47, 48, 49, 63, 64])
def test_cuda_sweep_and_previous_kernels(monkeypatch, kernel, dtype, k):
    """Both kernel generations, every instantiation, a batch that leaves the last block partial."""
    monkeypatch.setenv("CHAMELEON_KRLS_CUDA_KERNEL", kernel)
    K = make_kernels(37, k, d=2 * k, dtype=dtype, device="cuda")
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)
    for center, scale_by_k in ((True, True), (False, False)):
        S, info = chameleon_ext.krls_ex(K, 0.7, center, scale_by_k)
        assert int(info.abs().sum()) == 0
        torch.testing.assert_close(S.cpu().double(), reference.krls(K.cpu(), 0.7, center, scale_by_k).double(), **tol)


@cuda_only
@pytest.mark.parametrize("k", [20, 40, 64])
def test_cuda_sweep_matches_v1_and_reports_failures(monkeypatch, k):
    K = make_kernels(6, k, device="cuda")
    K[1, 0, 0] = float("nan")
    K[2, 0, 1] += 1.0
    K[3] = -1e6 * torch.eye(k, dtype=K.dtype, device="cuda")
    lam = torch.tensor([0.5, 1.0, 1.0, 1.0, -1.0, 3.0], dtype=torch.float64, device="cuda")
    out = {}
    for kernel in ("v1", "v2"):
        monkeypatch.setenv("CHAMELEON_KRLS_CUDA_KERNEL", kernel)
        out[kernel] = chameleon_ext.krls_ex(K, lam)
    assert out["v2"][1].tolist() == out["v1"][1].tolist() == [0, NON_FINITE, NOT_SYMMETRIC, NOT_PD, BAD_LAM, 0]
    torch.testing.assert_close(out["v2"][0], out["v1"][0], rtol=1e-11, atol=1e-13, equal_nan=True)
    tiny = torch.stack([exactly_indefinite_kernel(k, device="cuda"), make_kernels(1, k, device="cuda")[0]])
    S, info = chameleon_ext.krls_ex(tiny, 1e-300)
    assert info.tolist()[0] == LAM_TOO_SMALL and torch.isnan(S[0]).all()


@cuda_only
def test_cuda_sweep_grid_stride_and_transposed():
    """More matrices than the grid holds at KP = 64 (one matrix per block, grid capped at 2^20)
    would need 1M+ matrices; a transposed batch covers the stride arithmetic instead, and a
    batch of 4097 spans many waves."""
    K = make_kernels(4097, 40, device="cuda")
    S = chameleon_ext.krls(K.mT, 0.9)
    torch.testing.assert_close(S[-5:].cpu(), reference.krls(K[-5:].cpu().mT, 0.9), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(S[:5].cpu(), reference.krls(K[:5].cpu().mT, 0.9), rtol=1e-10, atol=1e-12)


@cuda_only
def test_cuda_kernel_and_crossover_switches(monkeypatch):
    K = make_kernels(3, 40, device="cuda")
    expected = reference.krls(K.cpu(), 0.9)
    monkeypatch.setenv("CHAMELEON_KRLS_FUSED_MAX", "32")  # k = 40 goes to the library path in auto
    torch.testing.assert_close(chameleon_ext.krls(K, 0.9).cpu(), expected, rtol=1e-10, atol=1e-12)
    monkeypatch.setenv("CHAMELEON_KRLS_FUSED_MAX", "65")
    with pytest.raises(ValueError, match="CHAMELEON_KRLS_FUSED_MAX must be an integer from 0 to 64"):
        chameleon_ext.krls(K, 0.9)
    monkeypatch.delenv("CHAMELEON_KRLS_FUSED_MAX")
    monkeypatch.setenv("CHAMELEON_KRLS_CUDA_KERNEL", "v3")
    with pytest.raises(ValueError, match="CHAMELEON_KRLS_CUDA_KERNEL must be 'v1' or 'v2'"):
        chameleon_ext.krls(K, 0.9)
