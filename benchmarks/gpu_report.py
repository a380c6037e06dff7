"""The GPU goals in two tables: pooling GB/s as a share of the device's measured copy
bandwidth, and krls device time against torch.linalg at batch 4096.

    python benchmarks/gpu_report.py [--out DIR]     # on a GPU: writes DIR/report.md, report.json
    python benchmarks/gpu_report.py --quick         # a CPU dry run at small sizes (host clock)

Timing on CUDA: CUDA events around the op alone, median of the rounds, after a warm-up; the
pooling rounds first flush L2 (a write of 4x its size) so inputs come from device memory.
Inputs are generated on the device and made once per case (every provider of a case reads
the same tensors). Copy bandwidth = bytes read + written by a 1 GiB device-to-device copy.
Pooling bytes = the bytes the op must read (valid tokens x H x element size). Each pooling
op is timed with both CUDA kernel sets, v2 (the default) and v1 (CHAMELEON_POOL_CUDA_KERNEL=v1,
the previous kernels, kept for this A/B until v2 has been measured).

krls rows (batch 4096, k = 7, 16, 32, 48, 64, fp32 and fp64): `krls_ex` by events (no host
sync), the same call replayed from a CUDA graph (launch gaps removed), the checked `krls`
by host clock (it copies the status to the host), torch.linalg (cholesky_ex +
cholesky_inverse, chameleon_ext.reference.krls_torch_linalg) by events, the library path
(CHAMELEON_KRLS_PATH=library) by events, the previous fused kernels
(CHAMELEON_KRLS_CUDA_KERNEL=v1, the same as v2 for k <= 16) by events, and the max relative
error of `krls_ex` (and of v1) against a float64 oracle. The fused/library crossover is
read from the same rows: the largest k where the fused kernel beats the library path is
printed as the value for CHAMELEON_KRLS_FUSED_MAX (the built-in default is 64). Every row
is written to report.json as soon as it is measured, so an interrupt (SIGINT from the
script's time limit) keeps what ran; the tables are printed at the end, or on the interrupt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import chameleon_ext  # noqa: E402
from chameleon_ext import reference  # noqa: E402

ROWS: list[dict] = []


class Timer:
    """Median time of ``fn`` over rounds: CUDA events on a GPU, the host clock on the CPU."""

    def __init__(self, cuda: bool, rounds: int):
        self.cuda, self.rounds = cuda, rounds
        self._flush = None

    def flush_l2(self) -> None:
        if self._flush is None:
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or (64 << 20)
            self._flush = torch.empty(4 * l2, dtype=torch.uint8, device="cuda")
        self._flush.zero_()

    def device(self, fn, flush: bool = False) -> float:
        fn()
        if not self.cuda:
            return self.host(fn, warm=False)
        torch.cuda.synchronize()
        times = []
        for _ in range(self.rounds):
            if flush:
                self.flush_l2()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    def host(self, fn, warm: bool = True) -> float:
        if warm:
            fn()
        times = []
        for _ in range(self.rounds):
            t0 = time.perf_counter()
            fn()
            if self.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def record(out_dir: str, **row) -> None:
    ROWS.append(row)
    with open(os.path.join(out_dir, "report.json"), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


@contextlib.contextmanager
def guarded(out_dir: str, what: str):
    """One failing case is recorded and the next one runs."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the report
        traceback.print_exc()
        record(out_dir, section="error", case=what, error=f"{type(exc).__name__}: {str(exc)[:300]}")


def copy_bandwidth(timer: Timer, device: str) -> float:
    n = (1 << 30) if device == "cuda" else (64 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer.device(lambda: dst.copy_(src))
    return 2 * n / t / 1e9


def pooling(out_dir: str, timer: Timer, device: str, quick: bool, copy_GBps: float) -> None:
    if quick:
        cases = [(16, 512, 256, torch.bfloat16), (64, 128, 256, torch.bfloat16)]
    else:
        cases = [(1024, 512, 768, torch.bfloat16), (256, 2048, 4096, torch.bfloat16),
                 (4096, 128, 768, torch.bfloat16), (1024, 512, 768, torch.float32)]
    D = 7
    for B, T, H, dtype in cases:
        with guarded(out_dir, f"pool {B}x{T}x{H}"):
            g = torch.Generator(device=device).manual_seed(B + T + H)
            hidden = torch.randn(B, T, H, device=device, dtype=dtype, generator=g)
            mask = torch.rand(B, T, device=device, generator=g) < 0.8
            ids = torch.randint(0, D, (B,), device=device, generator=g)
            valid = int(mask.sum()) * H * hidden.element_size()
            every = B * T * H * hidden.element_size()
            ops = {}
            for kernels in POOL_KERNELS:
                ops.update({
                    f"masked_mean_pool [{kernels}]": (with_pool_kernels(kernels, lambda: chameleon_ext.masked_mean_pool(
                        hidden, mask)), valid),
                    f"masked_mean_pool mask=None [{kernels}]": (with_pool_kernels(
                        kernels, lambda: chameleon_ext.masked_mean_pool(hidden, None)), every),
                    f"domain_mean_pool D={D} [{kernels}]": (with_pool_kernels(
                        kernels, lambda: chameleon_ext.domain_mean_pool(hidden, mask, ids, D)), valid),
                })
            ops["hidden.sum(1) (yardstick)"] = (lambda: hidden.sum(1), every)
            for op, (fn, nbytes) in ops.items():
                t = timer.device(fn, flush=device == "cuda")
                gbs = nbytes / t / 1e9
                record(out_dir, section="pool", shape=[B, T, H], dtype=str(dtype)[6:], op=op, ms=t * 1e3,
                       GBps=gbs, of_copy=gbs / copy_GBps)
            # the numbers are only worth reporting if the op is right: float64 oracle on 8 rows,
            # with each kernel set
            r = min(B, 8)
            want = reference.masked_mean_pool(hidden[:r].double(), mask[:r])
            ok = all(torch.allclose(with_pool_kernels(k, lambda: chameleon_ext.masked_mean_pool(hidden, mask))()[:r]
                                    .double(), want, rtol=1e-4, atol=1e-4) for k in POOL_KERNELS)
            record(out_dir, section="pool_check", shape=[B, T, H], matches_float64_oracle=bool(ok))
            ops.clear()  # free this case's inputs before the next case is made
            hidden = mask = ids = None
            if device == "cuda":
                torch.cuda.empty_cache()


POOL_KERNELS = ("v2", "v1")  # CHAMELEON_POOL_CUDA_KERNEL: the default first


def with_pool_kernels(kernels: str, fn):
    """fn with CHAMELEON_POOL_CUDA_KERNEL=kernels (the CUDA ops read it on every call)."""
    return with_env("CHAMELEON_POOL_CUDA_KERNEL", kernels, fn)


def krls_kernels(batch: int, k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(k)
    X = torch.randn(batch, k, 2 * k, device=device, dtype=torch.float64, generator=g)
    return (X @ X.mT).to(dtype)


def graph_replay(fn, cuda: bool):
    """A CUDA graph of ``fn`` (captured after a warm-up on a side stream) and its replay."""
    if not cuda:
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def with_env(name: str, value: str, fn):
    """``fn`` run with the environment variable ``name`` set to ``value`` (the kernel
    switches are read at every call)."""
    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
    return run


def max_rel_err(S: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((S.double() - ref).abs() / ref.abs().clamp_min(1e-300)).max())


def krls(out_dir: str, timer: Timer, device: str, quick: bool) -> None:
    batch = 64 if quick else 4096
    ks = [7, 16, 32] if quick else [7, 16, 32, 48, 64]
    lam = 1.0
    for k in ks:
        for dtype in (torch.float32, torch.float64):
            with guarded(out_dir, f"krls k={k} {dtype}"):
                K = krls_kernels(batch, k, dtype, device)
                row = dict(section="krls", batch=batch, k=k, dtype=str(dtype)[6:])
                row["ex_ms"] = timer.device(lambda: chameleon_ext.krls_ex(K, lam)) * 1e3
                graph = graph_replay(lambda: chameleon_ext.krls_ex(K, lam), device == "cuda")
                row["ex_graph_ms"] = timer.device(graph.replay) * 1e3 if graph is not None else None
                row["checked_host_ms"] = timer.host(lambda: chameleon_ext.krls(K, lam)) * 1e3
                row["linalg_ms"] = timer.device(lambda: reference.krls_torch_linalg(K, lam)) * 1e3
                ex = lambda: chameleon_ext.krls_ex(K, lam)  # noqa: E731
                row["library_ms"] = timer.device(with_env("CHAMELEON_KRLS_PATH", "library", ex)) * 1e3
                v1 = with_env("CHAMELEON_KRLS_CUDA_KERNEL", "v1", ex)
                row["ex_v1_ms"] = timer.device(v1) * 1e3
                row["x_linalg"] = row["linalg_ms"] / row["ex_ms"]
                row["x_linalg_v1"] = row["linalg_ms"] / row["ex_v1_ms"]
                S, info = chameleon_ext.krls_ex(K[:64], lam)
                ref = reference.krls(K[:64].double(), lam)
                row["max_rel_err"] = max_rel_err(S, ref)
                row["max_rel_err_v1"] = max_rel_err(with_env("CHAMELEON_KRLS_CUDA_KERNEL", "v1",
                                                             lambda: chameleon_ext.krls_ex(K[:64], lam))()[0], ref)
                row["failed_matrices"] = int((info != 0).sum())
                record(out_dir, **row)


def crossover_lines(kr: list[dict]) -> list[str]:
    """Per dtype, the largest k where the fused kernel (as run by `auto`) beats the library path."""
    lines = []
    for dtype in sorted({r["dtype"] for r in kr}):
        rows = sorted((r for r in kr if r["dtype"] == dtype), key=lambda r: r["k"])
        wins = [r["k"] for r in rows if r["ex_ms"] < r["library_ms"]]
        loses = [r["k"] for r in rows if r["ex_ms"] >= r["library_ms"]]
        lines.append(f"krls crossover {dtype}: fused beats the library path at k = {wins or 'none'}"
                     + (f", loses at k = {loses}" if loses else "")
                     + (f"; CHAMELEON_KRLS_FUSED_MAX = {max(wins)} fits these rows" if wins else ""))
    return lines + [""]


def tables() -> str:
    out = []
    copy = [r for r in ROWS if r.get("section") == "copy"]
    if copy:
        out.append(f"Copy bandwidth (read + write): {copy[0]['GBps']:.0f} GB/s\n")
    pool = [r for r in ROWS if r.get("section") == "pool"]
    if pool:
        out += ["| pooling shape | dtype | op | ms | GB/s | of copy |", "|---|---|---|---:|---:|---:|"]
        out += [f"| {r['shape']} | {r['dtype']} | {r['op']} | {r['ms']:.3f} | {r['GBps']:.0f} | {r['of_copy']:.0%} |"
                for r in pool]
        out.append("")
    kr = [r for r in ROWS if r.get("section") == "krls"]
    if kr:
        out += ["| krls batch | k | dtype | krls_ex ms | graph ms | krls (checked, host) ms | torch.linalg ms "
                "| library ms | x torch.linalg | max rel err | v1 ms | v1 x torch.linalg | v1 max rel err |",
                "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in kr:
            graph = f"{r['ex_graph_ms']:.4f}" if r.get("ex_graph_ms") is not None else "-"
            out.append(f"| {r['batch']} | {r['k']} | {r['dtype']} | {r['ex_ms']:.4f} | {graph} | "
                       f"{r['checked_host_ms']:.4f} | {r['linalg_ms']:.4f} | {r['library_ms']:.4f} | "
                       f"{r['x_linalg']:.1f}x | {r['max_rel_err']:.1e} | {r['ex_v1_ms']:.4f} | "
                       f"{r['x_linalg_v1']:.1f}x | {r['max_rel_err_v1']:.1e} |")
        out.append("")
        out += crossover_lines(kr)
    out += [f"ERROR {r['case']}: {r['error']}" for r in ROWS if r.get("section") == "error"]
    out += [f"CHECK FAILED: pooling {r['shape']} differs from the float64 oracle" for r in ROWS
            if r.get("section") == "pool_check" and not r["matches_float64_oracle"]]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU dry run at small sizes")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/gpu"))
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    os.makedirs(args.out, exist_ok=True)
    open(os.path.join(args.out, "report.json"), "w").close()
    timer = Timer(cuda, args.rounds if not args.quick else 3)
    env = dict(section="env", torch=torch.__version__, cuda=torch.version.cuda, build=chameleon_ext.build_info(),
               device=torch.cuda.get_device_name(0) if cuda else "cpu (dry run: host clock, small sizes)")
    record(args.out, **env)
    status = 0
    try:
        copy_GBps = copy_bandwidth(timer, device)
        record(args.out, section="copy", GBps=copy_GBps)
        pooling(args.out, timer, device, args.quick, copy_GBps)
        krls(args.out, timer, device, args.quick)
    except KeyboardInterrupt:
        print("interrupted: the tables hold what ran", flush=True)
        status = 130
    text = f"Device: {env['device']}; torch {env['torch']}\n\n" + tables()
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print("\n== report\n" + text, flush=True)
    if any(r.get("section") == "error" or r.get("matches_float64_oracle") is False for r in ROWS):
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
