"""krls against the float64 torch.linalg oracle and the eigen-form NumPy oracle."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chameleon_ext
from chameleon_ext import reference

from .factories import DEVICES, make_kernels

# The fused kernels' size limits (kFusedMaxK in csrc/cpu/krls_cpu.cpp and csrc/cuda/krls_cuda.cu):
# forcing CHAMELEON_KRLS_PATH=fused above them is an error, so tests force it only below.
FUSED_MAX_K = {"cpu": 512, "cuda": 64}


def exactly_indefinite_kernel(k, dtype=torch.float64, device="cpu"):
    """``-v v^T`` with ``v = e_0 - e_1``: symmetric, finite, already centred (its rows sum to
    exactly 0) and indefinite by a whole unit (first pivot exactly -1), so with a tiny lam the
    factorisation fails at pivot 0 on every device and rounding (a rank-deficient PSD kernel
    with lam = 1e-300 fails or not depending on the last bit of the centring)."""
    v = torch.zeros(k, dtype=torch.float64)
    v[0], v[1] = 1.0, -1.0
    return (-torch.outer(v, v)).to(dtype=dtype, device=device)

KS = [1, 2, 3, 7, 16, 33, 64, 65, 129, 200]


def tol(dtype):
    # float32 inputs are factorised in float64; only the output rounding is float32.
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", KS)
def test_krls_matches_oracles(device, dtype, k):
    batch = 3 if k <= 64 else 2
    K = make_kernels(batch, k, dtype=dtype, device=device)
    S = chameleon_ext.krls(K, 0.7)
    assert S.shape == (batch, k) and S.dtype == dtype and S.device == K.device
    torch.testing.assert_close(S, reference.krls(K, 0.7), **tol(dtype))
    eig = reference.krls_eigh_numpy(K.double().cpu().numpy(), 0.7)
    np.testing.assert_allclose(S.double().cpu().numpy(), eig, rtol=1e-6 if dtype == torch.float32 else 1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("center,scale_by_k", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("k", [5, 100])
def test_krls_options(device, center, scale_by_k, k):
    K = make_kernels(4, k, device=device)
    S = chameleon_ext.krls(K, 2.5, center=center, scale_by_k=scale_by_k)
    torch.testing.assert_close(S, reference.krls(K, 2.5, center=center, scale_by_k=scale_by_k), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_krls_unbatched_and_multi_batch_dims(device):
    K = make_kernels(6, 9, device=device)
    torch.testing.assert_close(chameleon_ext.krls(K[0], 1.0), reference.krls(K[0], 1.0), rtol=1e-10, atol=1e-12)
    K4 = K.reshape(2, 3, 9, 9)
    S = chameleon_ext.krls(K4, 1.0)
    assert S.shape == (2, 3, 9)
    torch.testing.assert_close(S, reference.krls(K4, 1.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_krls_mixed_conditioning_in_one_batch(device, dtype):
    scales = [1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6]
    k, lam = 12, 0.05
    K = make_kernels(len(scales), k, d=k + 4, dtype=dtype, device=device, scales=scales)
    S = chameleon_ext.krls(K, lam).double().cpu().numpy()
    Kd = K.double().cpu().numpy()
    eig = reference.krls_eigh_numpy(Kd, lam)
    # Forward error of either method grows with cond(A) = (s_max + mu) / mu.
    mu = lam * k
    cond = (np.linalg.eigvalsh(Kd).max(-1) + mu) / mu
    atol = 1e-14 * cond[:, None] + (1e-7 if dtype == torch.float32 else 0.0)
    assert np.all(np.abs(S - eig) <= atol + 1e-9), np.abs(S - eig).max(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [8, 150])
def test_krls_invariants(device, k):
    K = make_kernels(5, k, device=device)
    S = chameleon_ext.krls(K, 1.3)
    assert torch.all(S >= 0) and torch.all(S < 1)
    # Scaling the kernel and the regulariser together leaves the scores unchanged.
    torch.testing.assert_close(chameleon_ext.krls(K * 1000.0, 1300.0), S, rtol=1e-9, atol=1e-12)
    # The centred kernel has the all-ones vector in its null space: centring is idempotent.
    Kc = reference.center_kernel(K)
    torch.testing.assert_close(chameleon_ext.krls(Kc, 1.3), S, rtol=1e-9, atol=1e-12)
    # Sum of scores = effective dimension = sum_j s_j / (s_j + mu) over eigenvalues.
    s = torch.linalg.eigvalsh(Kc).clamp_min(0)
    mu = 1.3 * k
    torch.testing.assert_close(S.sum(-1), (s / (s + mu)).sum(-1), rtol=1e-9, atol=1e-12)


def test_krls_k1_and_zero_kernel():
    # k = 1 centred is the zero kernel: no leverage.
    assert chameleon_ext.krls(torch.tensor([[4.0]], dtype=torch.float64), 1.0).tolist() == [0.0]
    torch.testing.assert_close(chameleon_ext.krls(torch.zeros(2, 5, 5), 1.0), torch.zeros(2, 5), rtol=0, atol=1e-15)


def test_krls_empty_batch():
    assert chameleon_ext.krls(torch.zeros(0, 4, 4), 1.0).shape == (0, 4)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [6, 140])  # fused and library paths
def test_krls_bad_matrices_name_their_batch_index(device, k):
    K = make_kernels(4, k, device=device)
    bad = K.clone()
    bad[2, 0, 1] += 1.0  # not symmetric
    with pytest.raises(ValueError, match=r"K\[2\] \(batch index 2\) is not symmetric"):
        chameleon_ext.krls(bad, 1.0)
    bad = K.clone()
    bad[1, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"K\[1\] \(batch index 1\) holds NaN or Inf"):
        chameleon_ext.krls(bad, 1.0)
    bad = K.clone()
    bad[3, 4, 4] = float("inf")
    with pytest.raises(ValueError, match=r"K\[3\] \(batch index 3\) holds NaN or Inf"):
        chameleon_ext.krls(bad, 1.0)
    # Strongly indefinite: -1e6 I has eigenvalues far below -mu.
    bad = K.clone()
    bad[3] = -1e6 * torch.eye(k, dtype=K.dtype, device=device)
    with pytest.raises(torch.linalg.LinAlgError, match=r"K\[3\] \(batch index 3\) is not positive definite"):
        chameleon_ext.krls(bad, 1.0)
    nested = K.reshape(2, 2, k, k).clone()
    nested[1, 0, 0, 1] += 5.0
    with pytest.raises(ValueError, match=r"K\[1, 0\] \(batch index 2\)"):
        chameleon_ext.krls(nested, 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_krls_bad_arguments(device):
    K = make_kernels(2, 4, device=device)
    for lam in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam must be a finite number > 0"):
            chameleon_ext.krls(K, lam)
    with pytest.raises(ValueError, match="K must be square"):
        chameleon_ext.krls(K[:, :3, :], 1.0)
    with pytest.raises(ValueError, match=r"K must be \[..., k, k\]"):
        chameleon_ext.krls(K[0, 0], 1.0)
    with pytest.raises(ValueError, match="K must be float32 or float64"):
        chameleon_ext.krls(K.half(), 1.0)
    with pytest.raises(ValueError, match="K must have k >= 1"):
        chameleon_ext.krls(torch.zeros(2, 0, 0, device=device), 1.0)
    with pytest.raises(TypeError, match="lam must be a number or a tensor"):
        chameleon_ext.krls(K, "1.0")
    with pytest.raises(ValueError, match=r"lam must be a number or a tensor broadcastable to K's batch shape \[2\]"):
        chameleon_ext.krls(K, torch.ones(3, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="lam must be a real number or a real tensor"):
        chameleon_ext.krls(K, torch.ones(2, dtype=torch.complex128, device=device))
    with pytest.raises(ValueError, match="gradients with respect to lam are not computed"):
        chameleon_ext.krls(K, torch.ones(2, dtype=torch.float64, device=device, requires_grad=True))


# --------------------------------------------------------------------------- autograd / dispatcher


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("center", [True, False])
def test_krls_gradcheck(device, center):
    X = torch.randn(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    # Build K symmetric from X so gradcheck's perturbations keep K symmetric.
    assert torch.autograd.gradcheck(lambda x: chameleon_ext.krls(x @ x.mT, 0.3, center=center), (X,))
    M = torch.randn(6, 6, dtype=torch.float64, device=device)
    K = (M @ M.T).requires_grad_()
    assert torch.autograd.gradcheck(lambda k: chameleon_ext.krls(0.5 * (k + k.T), 0.8), (K,))


@pytest.mark.parametrize("device", DEVICES)
def test_krls_gradient_matches_reference_autograd(device):
    K = make_kernels(3, 7, device=device).requires_grad_()
    g = torch.randn(3, 7, dtype=torch.float64, device=device)
    (chameleon_ext.krls(K, 0.4) * g).sum().backward()
    ours = K.grad.clone()
    K.grad = None
    Ks = 0.5 * (K + K.mT)  # the op uses the symmetric part of K
    (reference.krls(Ks, 0.4) * g).sum().backward()
    torch.testing.assert_close(ours, K.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [7, 130])
def test_opcheck_krls(device, k):
    """Both overloads of both ops: the default one takes lam as a float (what the wrapper
    passes for a number), .lam_tensor a 0-d or per-matrix tensor."""
    K = make_kernels(3, k, device=device).requires_grad_()
    scalar = torch.tensor(0.5, dtype=torch.float64)
    per_matrix = torch.tensor([0.5, 2.0, 30.0], dtype=torch.float64, device=device)
    for packet in (torch.ops.chameleon.krls, torch.ops.chameleon.krls_ex):
        torch.library.opcheck(packet.default, (K, 0.5, True, True))
        torch.library.opcheck(packet.default, (K.detach().float(), 2.0, False, False))
        torch.library.opcheck(packet.lam_tensor, (K, scalar, True, True))
        torch.library.opcheck(packet.lam_tensor, (K, per_matrix, True, True))
        torch.library.opcheck(packet.lam_tensor, (K.detach().float(), scalar * 4, False, False))


@pytest.mark.parametrize("device", DEVICES)
def test_ops_take_lam_as_a_python_float(device):
    """torch.ops.chameleon.krls(K, 10.0) works as a drop-in op (overload resolution picks the
    float overload; a tensor lam picks .lam_tensor), with the same numbers as the wrapper."""
    K = make_kernels(3, 6, device=device)
    expected = reference.krls(K, 10.0)
    torch.testing.assert_close(torch.ops.chameleon.krls(K, 10.0), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.ops.chameleon.krls(K, 10), expected, rtol=1e-10, atol=1e-12)
    S, info = torch.ops.chameleon.krls_ex(K, 10.0, True, True)
    torch.testing.assert_close(S, expected, rtol=1e-10, atol=1e-12)
    assert info.tolist() == [0, 0, 0]
    lam = torch.tensor([10.0, 10.0, 10.0], dtype=torch.float64, device=device)
    torch.testing.assert_close(torch.ops.chameleon.krls(K, lam), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.ops.chameleon.krls.lam_tensor(K, lam), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chameleon_ext.krls(K, 10.0), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"krls: lam must be a finite number > 0, got -1"):
        torch.ops.chameleon.krls(K, -1.0)
    with pytest.raises(ValueError, match=r"krls_ex: lam must be a finite number > 0, got nan"):
        chameleon_ext.krls_ex(K, float("nan"))


def test_float_lam_gradient_matches_lam_tensor():
    X = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, dtype=torch.float64)
    (chameleon_ext.krls(X @ X.mT, 0.3) * g).sum().backward()
    by_float = X.grad.clone()
    X.grad = None
    (chameleon_ext.krls(X @ X.mT, torch.tensor(0.3, dtype=torch.float64)) * g).sum().backward()
    torch.testing.assert_close(by_float, X.grad, rtol=1e-13, atol=1e-15)


def test_krls_under_torch_compile_fullgraph():
    K = make_kernels(4, 6)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def weights(K):
        S = chameleon_ext.krls(K, 1.0)
        S = S / S.sum(-1, keepdim=True)
        return torch.softmax(S / 0.2, -1)

    ref = reference.krls(K, 1.0)
    torch.testing.assert_close(weights(K), torch.softmax(ref / ref.sum(-1, keepdim=True) / 0.2, -1))


# --------------------------------------------------------------------------- fuzzing


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 5),
    k=st.integers(1, 40),
    d=st.integers(1, 12),
    log_lam=st.floats(-3, 3),
    log_scale=st.floats(-3, 4),
    seed=st.integers(0, 2**16),
)
def test_fuzz_krls_against_eigen_oracle(batch, k, d, log_lam, log_scale, seed):
    K = make_kernels(batch, k, d=d, seed=seed) * 10.0**log_scale
    S = chameleon_ext.krls(K, 10.0**log_lam)
    np.testing.assert_allclose(S.numpy(), reference.krls_eigh_numpy(K.numpy(), 10.0**log_lam), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,k", [(1, 5), (9, 40), (3, 64), (2, 130)])
def test_fused_and_library_paths_agree(device, batch, k, monkeypatch):
    """CHAMELEON_KRLS_PATH forces either implementation; both match the oracle."""
    K = make_kernels(batch, k, device=device)
    expected = reference.krls(K, 0.9)
    paths = ["fused", "library", "auto"] if k <= FUSED_MAX_K[device] else ["library", "auto"]
    for path in paths:
        monkeypatch.setenv("CHAMELEON_KRLS_PATH", path)
        torch.testing.assert_close(chameleon_ext.krls(K, 0.9), expected, rtol=1e-10, atol=1e-12, msg=path)
    if k > FUSED_MAX_K[device]:
        monkeypatch.setenv("CHAMELEON_KRLS_PATH", "fused")
        with pytest.raises(ValueError, match=rf"handles k <= {FUSED_MAX_K[device]}, got k = {k}"):
            chameleon_ext.krls(K, 0.9)
    bad = K.clone()
    bad[batch - 1, 0, 0] = float("nan")
    for path in paths[:-1]:
        monkeypatch.setenv("CHAMELEON_KRLS_PATH", path)
        with pytest.raises(ValueError, match=rf"batch index {batch - 1}\) holds NaN"):
            chameleon_ext.krls(bad, 0.9)
    monkeypatch.setenv("CHAMELEON_KRLS_PATH", "fastest")
    with pytest.raises(ValueError, match="CHAMELEON_KRLS_PATH must be 'fused', 'library' or 'auto'"):
        chameleon_ext.krls(K, 0.9)


def test_ops_under_default_inductor_compile():
    """fullgraph with the default backend (Inductor): the fake kernels carry the graph and
    the real kernels run inside the compiled code."""
    from .factories import make_hidden, make_mask

    torch._dynamo.reset()
    hidden = make_hidden(4, 10, 8)
    mask = make_mask(4, 10)
    K = make_kernels(3, 5)

    @torch.compile(fullgraph=True)
    def f(h, m, K):
        pooled = chameleon_ext.masked_mean_pool(h, m)
        return pooled.sum(-1), chameleon_ext.krls(K, 2.0)

    pooled_sum, S = f(hidden, mask, K)
    torch.testing.assert_close(pooled_sum, reference.masked_mean_pool(hidden, mask).sum(-1))
    torch.testing.assert_close(S, reference.krls(K, 2.0), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- lam per matrix


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["fused", "library"])
@pytest.mark.parametrize("k", [7, 40])
def test_batched_lam_equals_loop_of_scalar_calls(device, path, k, monkeypatch):
    """One call with one lambda per matrix (a sweep) equals a loop of scalar calls, 1e-12."""
    monkeypatch.setenv("CHAMELEON_KRLS_PATH", path)
    lams = [0.1, 1.0, 10.0, 100.0, 1000.0, 1e-3]
    K = make_kernels(1, k, device=device).expand(len(lams), k, k)
    lam = torch.tensor(lams, dtype=torch.float64, device=device)
    S = chameleon_ext.krls(K, lam)
    loop = torch.stack([chameleon_ext.krls(K[i], lams[i]) for i in range(len(lams))])
    torch.testing.assert_close(S, loop, rtol=1e-12, atol=1e-15)
    # scale_by_k=False, float32 lam, lam on the CPU for a K elsewhere
    S = chameleon_ext.krls(K, lam.float().cpu(), scale_by_k=False)
    loop = torch.stack([chameleon_ext.krls(K[i], float(torch.tensor(lams[i]).float()), scale_by_k=False)
                        for i in range(len(lams))])
    torch.testing.assert_close(S, loop, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_lam_broadcasts_over_the_batch_shape(device):
    K = make_kernels(6, 5, device=device).reshape(2, 3, 5, 5)
    lam = torch.tensor([[0.5], [4.0]], dtype=torch.float64, device=device)  # [2, 1] -> [2, 3]
    S = chameleon_ext.krls(K, lam)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(S[i, j], reference.krls(K[i, j], float(lam[i, 0])), rtol=1e-12, atol=1e-15)
    # a 0-d tensor on the device and a [3] tensor broadcast too
    torch.testing.assert_close(chameleon_ext.krls(K, torch.tensor(2.0, device=device)), chameleon_ext.krls(K, 2.0))
    lam3 = torch.tensor([0.5, 1.0, 8.0], device=device)
    S3 = chameleon_ext.krls(K, lam3)
    torch.testing.assert_close(S3[1, 2], reference.krls(K[1, 2], 8.0), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [6, 140])
def test_bad_lam_entry_names_its_matrix(device, k):
    K = make_kernels(3, k, device=device)
    for bad in (0.0, -2.0, float("nan"), float("inf")):
        lam = torch.tensor([1.0, bad, 1.0], dtype=torch.float64, device=device)
        with pytest.raises(ValueError, match=r"lam for K\[1\] \(batch index 1\) must be a finite number > 0"):
            chameleon_ext.krls(K, lam)


@pytest.mark.parametrize("device", DEVICES)
def test_krls_gradcheck_with_lam_tensor(device):
    X = torch.randn(3, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    lam = torch.tensor([0.1, 1.0, 7.0], dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda x: chameleon_ext.krls(x @ x.mT, lam), (X,))
    assert torch.autograd.gradcheck(lambda x: chameleon_ext.krls_ex(x @ x.mT, lam)[0], (X,))


# --------------------------------------------------------------------------- krls_ex


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["fused", "library"])
@pytest.mark.parametrize("k", [6, 70])
def test_krls_ex_reports_per_matrix_status_without_raising(device, path, k, monkeypatch):
    if path == "fused" and k > FUSED_MAX_K[device]:
        k = FUSED_MAX_K[device]  # the largest size the fused kernel takes on this device
    monkeypatch.setenv("CHAMELEON_KRLS_PATH", path)
    K = make_kernels(6, k, device=device)
    K[1, 2, 2] = float("nan")
    K[2, 0, 1] += 1.0
    K[3] = -1e6 * torch.eye(k, dtype=K.dtype, device=device)
    K[5] = exactly_indefinite_kernel(k, device=device)
    lam = torch.tensor([0.5, 0.5, 0.5, 0.5, -1.0, 1e-300], dtype=torch.float64, device=device)
    S, info = chameleon_ext.krls_ex(K, lam)
    assert info.dtype == torch.int32 and info.shape == (6,) and info.device == K.device
    assert info.tolist() == [0, 1, 2, 3, 5, 4]
    assert chameleon_ext.ops.KRLS_INFO[4].startswith("lam is too small")
    torch.testing.assert_close(S[0], reference.krls(K[0], 0.5), rtol=1e-10, atol=1e-12)
    assert torch.isnan(S[1:]).all()
    # krls raises for the first of them, as before
    with pytest.raises(ValueError, match=r"K\[1\] \(batch index 1\) holds NaN"):
        chameleon_ext.krls(K, lam)
    S, info = chameleon_ext.krls_ex(K[:1].reshape(1, 1, k, k), 0.5)
    assert info.shape == (1, 1) and info.item() == 0 and S.shape == (1, 1, k)


@pytest.mark.parametrize("device", DEVICES)
def test_krls_ex_empty_and_unbatched(device):
    S, info = chameleon_ext.krls_ex(torch.zeros(0, 4, 4, device=device, dtype=torch.float64), 1.0)
    assert S.shape == (0, 4) and info.shape == (0,) and info.dtype == torch.int32
    K = make_kernels(1, 5, device=device)[0]
    S, info = chameleon_ext.krls_ex(K, 1.0)
    assert S.shape == (5,) and info.shape == () and info.item() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [5, 40, 100])  # registers / shared memory on CUDA, library path
def test_tiny_lam_blames_lam_not_k(device, k):
    # the indefinite matrix first: the centred PSD kernel after it is singular to rounding
    K = torch.stack([exactly_indefinite_kernel(k, device=device), make_kernels(1, k, device=device)[0]])
    with pytest.raises(ValueError, match=r"lam = 1e-300 is too small for K\[0\] \(batch index 0\)"):
        chameleon_ext.krls(K, 1e-300)


def test_forcing_fused_above_its_limit_is_an_error(monkeypatch):
    monkeypatch.setenv("CHAMELEON_KRLS_PATH", "fused")
    with pytest.raises(ValueError, match=r"CHAMELEON_KRLS_PATH=fused: the fused CPU krls kernel handles k <= 512, got k = 513"):
        chameleon_ext.krls(torch.eye(513, dtype=torch.float64), 1.0)


def test_krls_ex_under_torch_compile_fullgraph():
    K = make_kernels(4, 6)
    lam = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def scores(K, lam):
        S, info = chameleon_ext.krls_ex(K, lam)
        return torch.where(info.unsqueeze(-1) == 0, S, torch.zeros_like(S))

    expected = torch.stack([reference.krls(K[i], float(lam[i])) for i in range(4)])
    torch.testing.assert_close(scores(K, lam), expected, rtol=1e-10, atol=1e-12)
