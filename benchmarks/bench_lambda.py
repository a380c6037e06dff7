"""The scale-free lambda (weights.select_lambda): 6 batched krls calls on 16-point log grids.
Goal: under 50 ms on a CPU for one k = 7 kernel (what `chameleon weights` does once), and
the bootstrap's batch of resamples in one call. Compared with a float64 NumPy eigh +
bisection loop over the batch (the test oracle's method), the same answer to 1e-8."""

import math

import numpy as np
import pytest
import torch

from chameleon_ext.weights import DEFAULT_SHARE, linear_affinity, select_lambda
from python_tests.factories import oracle_lambda

CASES = [(1, 7), (1, 16), (1, 64), (1000, 7), (3000, 7), (100, 64)]
QUICK_CASES = [(1, 7), (8, 16)]


def _kernels(batch: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(k)
    X = torch.randn(batch, k, 2 * k, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(
        -3, 4, (batch, 1, 1), generator=g).double()
    return X @ X.mT


def _eigh_bisection(K: torch.Tensor, share: float) -> np.ndarray:
    """The plain NumPy alternative: per kernel, an eigendecomposition and 100 bisection steps."""
    return np.array([oracle_lambda(M, share, span=40.0, steps=100) for M in K.numpy()])


PROVIDERS = {
    "select_lambda": lambda K: select_lambda(K, DEFAULT_SHARE)[0],
    "numpy_eigh_loop": lambda K: _eigh_bisection(K, DEFAULT_SHARE),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def bench_select_lambda(benchmark, provider, case):
    batch, k = case
    if provider == "numpy_eigh_loop" and batch > 1000:
        pytest.skip("the NumPy loop is too slow at this size to be worth timing")
    K = _kernels(batch, k)
    fn = PROVIDERS[provider]
    benchmark.group = f"select_lambda batch={batch} k={k} cpu"
    benchmark.extra_info.update(provider=provider, batch=batch, k=k)
    lam = benchmark(fn, K)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info["kernels_per_s"] = batch / stats.stats.median
        benchmark.extra_info["ms_per_call"] = 1e3 * stats.stats.median
    lam = np.asarray(lam.numpy() if isinstance(lam, torch.Tensor) else lam).reshape(-1)
    want = _eigh_bisection(K, DEFAULT_SHARE)
    np.testing.assert_allclose(lam, want, rtol=1e-7)


def bench_weights_with_auto_lambda(benchmark):
    """The whole default weights path for k = 7 (centring, lambda, krls, rule)."""
    from chameleon_ext.weights import weights_from_embeddings

    X = torch.randn(7, 768, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    linear_affinity(X)
    benchmark.group = "weights k=7 d=768 cpu"
    res = benchmark(weights_from_embeddings, X)
    assert abs(float(res.weights.sum()) - 1.0) < 1e-12
