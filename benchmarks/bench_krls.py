"""Batched kernel ridge leverage scores: the ext op against batched torch.linalg
(cholesky_ex + cholesky_inverse) and the reference implementation's per-matrix
``np.linalg.inv`` loop, over batch x k pairs that fit in memory.

Providers: ``ext`` is ``krls_ex`` (the op without the host synchronisation, what a training
loop calls); ``ext_checked`` is ``krls`` (which copies the per-matrix status to the host to
raise); on CUDA ``ext_graph`` replays ``krls_ex`` from a CUDA graph (no launch gaps) and
``ext_v1`` is ``krls_ex`` with the previous fused kernels (CHAMELEON_KRLS_CUDA_KERNEL=v1), for
an A/B against the default sweep kernel at 16 < k <= 64. On CUDA
every provider is timed by CUDA events around the call (benchmarks/timing.py), so the ratios
are device time, not a host clock with a synchronisation in it; ``ext_checked`` is the
exception by design (its host copy is what it costs). The NumPy loop is CPU-only and is not
run on CUDA. Inputs are made once per case, on the device.

``python -m benchmarks.bench_krls [ROUNDS [THREADS]]`` (CPU) prints krls_ex against
torch.linalg from interleaved rounds (median and range of the per-round ratio), the form in
which benchmarks/RESULTS.md reports the CPU ratios on a shared machine.
"""

import functools
import os
import statistics
import sys
import time

import numpy as np
import pytest
import torch

import chameleon_ext
from chameleon_ext import reference
from python_tests.factories import CUDA, make_kernels

from .timing import run_timed

CASES = [(4096, 7), (4096, 16), (4096, 32), (4096, 48), (4096, 64), (64, 128), (64, 129), (64, 256), (1, 1024),
         (1, 4096)]
QUICK_CASES = [(64, 7), (8, 64), (2, 200)]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
DEVICE = "cuda" if CUDA else "cpu"
LAM = 1.0


def _numpy_loop(K):
    Kn = K.double().cpu().numpy()
    return np.stack([reference.krls_numpy_inv(M, LAM) for M in Kn])


def _krls_ex(K):
    return chameleon_ext.krls_ex(K, LAM)[0]


_graphs: dict = {}


def _ex_graph(K):
    """krls_ex captured once per input (after a warm-up on a side stream), then replayed."""
    key = (K.data_ptr(), tuple(K.shape), K.dtype)
    if key not in _graphs:
        _graphs.clear()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _krls_ex(K)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _krls_ex(K)
        _graphs[key] = (graph, out)
    graph, out = _graphs[key]
    graph.replay()
    return out


def _krls_ex_v1(K):
    old = os.environ.get("CHAMELEON_KRLS_CUDA_KERNEL")
    os.environ["CHAMELEON_KRLS_CUDA_KERNEL"] = "v1"
    try:
        return _krls_ex(K)
    finally:
        if old is None:
            os.environ.pop("CHAMELEON_KRLS_CUDA_KERNEL", None)
        else:
            os.environ["CHAMELEON_KRLS_CUDA_KERNEL"] = old


PROVIDERS = {
    "ext": _krls_ex,
    "ext_checked": lambda K: chameleon_ext.krls(K, LAM),
    "torch_linalg": lambda K: reference.krls_torch_linalg(K, LAM),
}
if CUDA:
    PROVIDERS["ext_graph"] = _ex_graph
    PROVIDERS["ext_v1"] = _krls_ex_v1
else:
    PROVIDERS["numpy_loop"] = _numpy_loop


@functools.lru_cache(maxsize=1)
def _kernels(batch, k, dtype_name):
    # Full-rank kernels (d = 2k) keep the float32 inputs positive definite after rounding.
    # Made on the device (torch.randn there) so a large case costs no host generation or copy.
    if not CUDA:
        return make_kernels(batch, k, d=2 * k, dtype=DTYPES[dtype_name])
    g = torch.Generator(device="cuda").manual_seed(4)
    X = torch.randn(batch, k, 2 * k, generator=g, device="cuda", dtype=torch.float64)
    X = X + torch.randn(batch, 1, 2 * k, generator=g, device="cuda", dtype=torch.float64)
    return (X @ X.mT).to(DTYPES[dtype_name])


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def bench_krls(benchmark, provider, dtype_name, case):
    batch, k = case
    if provider == "numpy_loop" and batch * k**3 > 4096 * 64**3:
        pytest.skip("the NumPy loop is too slow at this size to be worth timing")
    if provider == "ext_v1" and not 16 < k <= 64:
        pytest.skip("v1 and v2 run the same kernels outside 16 < k <= 64")
    K = _kernels(batch, k, dtype_name)
    fn = PROVIDERS[provider]
    benchmark.group = f"krls batch={batch} k={k} {dtype_name} {DEVICE}"
    benchmark.extra_info.update(provider=provider, batch=batch, k=k, dtype=dtype_name, device=DEVICE)
    if provider == "ext_checked" and CUDA:
        # host clock around the call and a synchronisation: the checked op's real cost
        def run():
            out = fn(K)
            torch.cuda.synchronize()
            return out

        fn(K)
        S = benchmark(run)
    else:
        S = run_timed(benchmark, fn, K)
    stats = getattr(benchmark, "stats", None)
    seconds = benchmark.extra_info.get("device_s") or (stats.stats.median if stats is not None else 0)
    if seconds:
        benchmark.extra_info["matrices_per_s"] = batch / seconds
    S = torch.as_tensor(np.asarray(S.cpu() if isinstance(S, torch.Tensor) else S)).double()
    expected = reference.krls(K[:256].cpu(), LAM).double()
    torch.testing.assert_close(S[:256], expected, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- ratio report

REPORT_CASES = [(4096, 7), (4096, 16), (4096, 64)]


def _best_of(fn, K, calls, clock):
    best = float("inf")
    for _ in range(calls):
        t0 = clock()
        fn(K)
        best = min(best, clock() - t0)
    return best


def _fmt(values, unit=1e3, digits=2):
    """median [min-max]"""
    lo, mid, hi = (f"{v * unit:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))
    return f"{mid} [{lo}-{hi}]"


def report(cases=REPORT_CASES, rounds=9, threads=None):
    """krls_ex against torch.linalg, interleaved: every round times each provider (best of a
    few calls), so load from other processes hits both alike; prints the median and range
    over rounds of each time and of the per-round ratio. At one thread the clock is the
    thread's CPU time (waiting for a core is not counted), otherwise the wall clock. CPU only
    (on CUDA, benchmarks/gpu_report.py times device work with events)."""
    if CUDA:
        raise SystemExit("bench_krls report: CPU only; on a GPU machine run benchmarks/gpu_report.py")
    if threads:
        torch.set_num_threads(threads)
    one = torch.get_num_threads() == 1
    clock = time.thread_time if one else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, "
          f"{'thread CPU time' if one else 'wall clock'}; median [range] of {rounds} interleaved rounds\n")
    print("| batch x k | dtype | ext (krls_ex) | torch.linalg | x torch.linalg |")
    print("|---|---|---:|---:|---:|")
    for batch, k in cases:
        for name in DTYPES:
            K = _kernels(batch, k, name)
            _krls_ex(K), PROVIDERS["torch_linalg"](K)  # warm-up
            calls = 3 if k <= 32 else 1  # torch.linalg takes 0.7 s at 4096 x 64
            ext, lin = [], []
            for _ in range(rounds):
                ext.append(_best_of(_krls_ex, K, 2 * calls, clock))
                lin.append(_best_of(PROVIDERS["torch_linalg"], K, calls, clock))
            ratios = [b / a for a, b in zip(ext, lin)]
            print(f"| {batch} x {k} | {name} | {_fmt(ext, digits=3)} ms | {_fmt(lin)} ms | {_fmt(ratios, 1, 1)} |",
                  flush=True)


if __name__ == "__main__":
    # python -m benchmarks.bench_krls [ROUNDS [THREADS]]
    report(rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 9,
           threads=int(sys.argv[2]) if len(sys.argv) > 2 else None)
