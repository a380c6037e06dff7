"""Timing that measures the device, shared by the benchmarks.

On CUDA a round is timed with CUDA events around the op alone (host overhead and the
synchronisation are outside the events), after L2 has been flushed by writing a buffer
larger than it, so inputs beyond L2 are read from HBM every round. The median device time
goes into ``extra_info["device_s"]``, which benchmarks/summarize.py prefers over the host
wall time. The device's copy bandwidth (``dst.copy_(src)`` of 1 GiB, read + write bytes) is
measured once per run and stored with every CUDA case as ``copy_GBps``. On CPU, rounds are
plain pytest-benchmark rounds.
"""

from __future__ import annotations

import os
import statistics

import torch

ROUNDS = int(os.environ.get("CHAMELEON_BENCH_ROUNDS", "10"))
_state: dict = {}


def _flush_l2() -> None:
    if "flush" not in _state:
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20) or (64 << 20)
        _state["flush"] = torch.empty(4 * l2, dtype=torch.uint8, device="cuda")
    _state["flush"].zero_()


def copy_bandwidth_GBps() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of 10."""
    if "copy" not in _state:
        n = 1 << 30
        src = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        _state["copy"] = 2 * n / statistics.median(times) / 1e9
        del src, dst
    return _state["copy"]


def run_timed(benchmark, fn, *args):
    """Time ``fn(*args)`` with ``benchmark``; returns its output (from the last round)."""
    if not (args and isinstance(args[0], torch.Tensor) and args[0].is_cuda):
        return benchmark(lambda: fn(*args))
    times, out = [], {}
    fn(*args)  # warm-up (and compilation) outside the timed rounds
    torch.cuda.synchronize()

    def run():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out["v"] = fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)

    if benchmark.disabled:
        run()
    else:
        benchmark.pedantic(run, setup=_flush_l2, rounds=ROUNDS, iterations=1)
        benchmark.extra_info["device_s"] = statistics.median(times)
        benchmark.extra_info["copy_GBps"] = copy_bandwidth_GBps()
    return out["v"]
