"""Batched kernel ridge leverage scores: the ext op against batched torch.linalg
(cholesky_ex + cholesky_inverse) and the reference implementation's per-matrix
``np.linalg.inv`` loop, over batch x k pairs that fit in memory."""

import numpy as np
import pytest
import torch

import chameleon_ext
from chameleon_ext import reference
from python_tests.factories import CUDA, make_kernels

CASES = [(4096, 7), (4096, 16), (4096, 64), (64, 128), (64, 129), (64, 256), (1, 1024), (1, 4096)]
QUICK_CASES = [(64, 7), (8, 64), (2, 200)]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
DEVICE = "cuda" if CUDA else "cpu"
LAM = 1.0


def _numpy_loop(K):
    Kn = K.double().cpu().numpy()
    return np.stack([reference.krls_numpy_inv(M, LAM) for M in Kn])


PROVIDERS = {
    "ext": lambda K: chameleon_ext.krls(K, LAM),
    "torch_linalg": lambda K: reference.krls_torch_linalg(K, LAM),
    "numpy_loop": _numpy_loop,
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def bench_krls(benchmark, provider, dtype_name, case):
    batch, k = case
    if provider == "numpy_loop" and batch * k**3 > 4096 * 64**3:
        pytest.skip("the NumPy loop is too slow at this size to be worth timing")
    # Full-rank kernels (d = 2k) keep the float32 inputs positive definite after rounding.
    K = make_kernels(batch, k, d=2 * k, dtype=DTYPES[dtype_name], device=DEVICE)
    fn = PROVIDERS[provider]
    benchmark.group = f"krls batch={batch} k={k} {dtype_name} {DEVICE}"
    benchmark.extra_info.update(provider=provider, batch=batch, k=k, dtype=dtype_name, device=DEVICE)
    fn(K)

    def run():
        out = fn(K)
        if CUDA:
            torch.cuda.synchronize()
        return out

    S = benchmark(run)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info["matrices_per_s"] = batch / stats.stats.median
    S = torch.as_tensor(np.asarray(S.cpu() if isinstance(S, torch.Tensor) else S)).double()
    expected = reference.krls(K, LAM).double().cpu()
    torch.testing.assert_close(S, expected, rtol=1e-4, atol=1e-6)
