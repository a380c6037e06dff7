"""Bootstrap intervals of the weights: the batched path (resample-count matrices times the
per-window embeddings, one batched ``krls`` call) against a Python loop over resamples
(index the windows, average, the plain weights path), and a lambda sweep.

Goal (interactive use of `chameleon weights --bootstrap`): B = 1000, k = 7, n = 2048 windows, d = 768 in under 1 s on the 2-core CPU
(the embedding pass excluded), under 50 ms on an H200. The loop is timed at B = 100 only
(it is linear in B); the ratio is read from the B = 100 group.
"""

import pytest
import torch

from chameleon_ext import uncertainty as U
from python_tests.factories import CUDA
from python_tests.test_uncertainty import plain_weights, synthetic_windows

# (resamples B, domains k, windows n, hidden size d)
CASES = [(1000, 7, 2048, 768), (100, 7, 2048, 768)]
QUICK_CASES = [(20, 3, 64, 16)]
DEVICE = "cuda" if CUDA else "cpu"
LOOP_MAX_RESAMPLES = 100


def _python_loop(windows, B, seed=0):
    """The obvious implementation: one resample at a time."""
    g = torch.Generator(device=windows[0].device).manual_seed(seed)
    samples = []
    for _ in range(B):
        X = torch.stack([
            W[torch.randint(0, W.shape[0], (W.shape[0],), generator=g, device=W.device)].double().mean(0)
            for W in windows
        ])
        samples.append(plain_weights(X.cpu()).weights)
    w = torch.stack(samples)
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    return torch.quantile(w, q, dim=0), w.std(0)


PROVIDERS = {
    "ext": lambda windows, B: U.bootstrap_weights(windows, resamples=B, window_fractions=()),
    "ext_with_window_analysis": lambda windows, B: U.bootstrap_weights(windows, resamples=B),
    "python_loop": _python_loop,
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def bench_bootstrap(benchmark, provider, case):
    B, k, n, d = case
    if provider == "python_loop" and B > LOOP_MAX_RESAMPLES:
        pytest.skip(f"the loop is timed at B <= {LOOP_MAX_RESAMPLES} (it is linear in B)")
    windows, _ = synthetic_windows(k=k, n=n, d=d, spread=3.0, separation=0.5, seed=0)
    windows = [w.to(DEVICE) for w in windows]  # float32, as the per-window cache stores them
    fn = PROVIDERS[provider]
    benchmark.group = f"bootstrap B={B} k={k} n={n} d={d} {DEVICE}"
    benchmark.extra_info.update(provider=provider, resamples=B, k=k, n=n, d=d, device=DEVICE)

    def run():
        out = fn(windows, B)
        if CUDA:
            torch.cuda.synchronize()
        return out

    out = benchmark(run)
    if provider != "python_loop":
        assert bool((out.weights_low <= out.point.weights).all() and (out.point.weights <= out.weights_high).all())


SWEEP_CASES = [(7, 768, 64), (64, 768, 64)]


@pytest.mark.parametrize("k, d, n_lambdas", SWEEP_CASES)
def bench_sweep(benchmark, k, d, n_lambdas):
    X = torch.randn(k, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lambdas = torch.logspace(-3, 3, n_lambdas).tolist()
    benchmark.group = f"sweep k={k} lambdas={n_lambdas} temperatures=3"
    benchmark.extra_info.update(provider="ext", k=k, n_lambdas=n_lambdas)
    sweep = benchmark(lambda: U.sweep_weights(X, lambdas, [1.0, 5.0, 10.0]))
    assert sweep.weights.shape == (n_lambdas, 3, k)
