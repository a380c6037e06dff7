"""A small workload that runs every CUDA kernel instantiation of chameleon_ext once, for
compute-sanitizer (memcheck, racecheck, synccheck; benchmarks/gpu_check.sh runs it with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so an out-of-bounds access inside one of the caching
allocator's blocks is still caught). Every result is also checked against the float64
oracles of chameleon_ext.reference, so a wrong answer fails the run (exit 1) even where the
sanitizer sees nothing.

What it touches, and why each case is there (csrc/cuda/krls_cuda.cu, pooling_cuda.cu):
  krls, fp32 and fp64, under both kernel generations (CHAMELEON_KRLS_CUDA_KERNEL=v2, the
  default, then v1): the register kernel at each width (KMAX 8, 16, with k below and at each
  width); v2's sweep kernel padded to 32 (one warp per matrix, 4 per block: k = 17, 24, 32)
  and to 64 (four warps per matrix: k = 33, 48, 49, 64, where whole warps are padding or
  finish early); v1's register kernel at KMAX 32 and its shared-memory kernel at 4, 3, 2 and 1
  warps per block (k = 33, 40, 48, 64); a batch of 37 that leaves the last block partial, a
  transposed (non-contiguous) K, lam per matrix on the device, center/scale_by_k off,
  rejected matrices (NaN, asymmetric, a failed pivot), and the library path (k = 65).
  pooling, bf16 / fp16 / fp32 / fp64, with both kernel sets (CHAMELEON_POOL_CUDA_KERNEL=v2,
  the default, and v1): every vector width (16-byte loads down to scalar, by the row stride)
  for short rows (v2: one warp per row, T <= 256) and for long rows (block items, T > 256),
  a misaligned start (head) and a ragged end (tail), a row long enough to be split along T
  (with the combine kernel), mask None, and domain pooling: few domains (v2: per-chunk
  partials and one combine, incl. more than 128 chunks' worth of rows and an empty domain)
  and many (the sorted segments, incl. a batch above 4096 rows: at::sort's other path).

    python benchmarks/gpu_sanitize.py            # on the GPU
    python benchmarks/gpu_sanitize.py --quick    # the same workload on the CPU (a dry run)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import chameleon_ext  # noqa: E402
from chameleon_ext import reference  # noqa: E402

FAILURES: list[str] = []
CHECKS = [0]


def check(name: str, ok: bool, detail: str = "") -> None:
    CHECKS[0] += 1
    if not ok:
        FAILURES.append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}".rstrip(), flush=True)


def close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> tuple[bool, str]:
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if got.shape != want.shape:
        return False, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs() - rtol * want.abs()
    worst = float(err.max()) if err.numel() else -1.0
    return bool(torch.isfinite(got).all() and worst <= atol), f"(max excess {worst:.2e})"


def kernels(batch: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, k, 2 * k, generator=g, dtype=torch.float64)
    return X @ X.mT


# k -> the instantiation it selects on CUDA, per kernel generation
KRLS_KS = {
    "v2": {3: "registers KMAX=8", 8: "registers KMAX=8 full", 13: "registers KMAX=16", 16: "registers KMAX=16 full",
           17: "sweep KP=32", 24: "sweep KP=32", 32: "sweep KP=32 full", 33: "sweep KP=64",
           48: "sweep KP=64, a padding warp", 49: "sweep KP=64", 64: "sweep KP=64 full", 65: "library"},
    "v1": {17: "registers KMAX=32", 32: "registers KMAX=32 full", 33: "shared 4 warps/block",
           40: "shared 3 warps/block", 48: "shared 2 warps/block", 64: "shared 1 warp/block"},
}


def krls_cases(device: str, generations=("v2", "v1")) -> None:
    for kernel, ks in KRLS_KS.items():
        if kernel not in generations:
            continue
        os.environ["CHAMELEON_KRLS_CUDA_KERNEL"] = kernel
        try:
            krls_kernel_cases(device, kernel, ks)
        finally:
            os.environ.pop("CHAMELEON_KRLS_CUDA_KERNEL", None)


def krls_kernel_cases(device: str, kernel: str, ks: dict) -> None:
    for dtype in (torch.float64, torch.float32):
        rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (1e-5, 1e-7)
        for k, what in ks.items():
            K = kernels(37, k, seed=k)  # 37: the last block is partial for every kernel
            want = reference.krls(K, 0.7)
            S, info = chameleon_ext.krls_ex(K.to(dtype).to(device), 0.7)
            ok, detail = close(S, want, rtol, atol)
            check(f"krls {kernel} k={k} {str(dtype)[6:]} ({what})", ok and int(info.abs().sum()) == 0, detail)
        for k in (13, 20, 40):  # a transposed view: strided loads in every kernel
            K = kernels(5, k, seed=100 + k)
            Kt = K.to(dtype).to(device).transpose(-1, -2)
            ok, detail = close(chameleon_ext.krls(Kt, 0.3, center=False, scale_by_k=False),
                               reference.krls(K.transpose(-1, -2), 0.3, center=False, scale_by_k=False), rtol, atol)
            check(f"krls {kernel} transposed k={k} {str(dtype)[6:]} center=False", ok, detail)
    # per-matrix lam on the device, and rejected matrices (status codes, NaN rows)
    for k in (6, 20, 40, 64):
        K = kernels(5, k, seed=200 + k)
        lam = torch.tensor([0.1, 1.0, 10.0, 100.0, 1.0], dtype=torch.float64)
        want = torch.stack([reference.krls(K[i], float(lam[i])) for i in range(5)])
        ok, detail = close(chameleon_ext.krls(K.to(device), lam.to(device)), want, 1e-9, 1e-12)
        check(f"krls {kernel} lam per matrix k={k}", ok, detail)
        bad = K.clone()
        bad[1, 0, 0] = float("nan")
        bad[2, 0, 1] += 1.0
        bad[4] = -1e6 * torch.eye(k, dtype=torch.float64)
        S, info = chameleon_ext.krls_ex(bad.to(device), lam.to(device))
        check(f"krls {kernel} rejected matrices k={k}",
              info.cpu().tolist() == [0, 1, 2, 0, 3] and bool(torch.isnan(S[[1, 2, 4]]).all()))


def strided(storage: torch.Tensor, size, stride, offset) -> torch.Tensor:
    return storage.as_strided(size, stride, offset)


# (B, T, H), strides, element offset: which geometry of the row-means kernel each one makes
POOL_VIEWS = [
    ((3, 40, 300), (40 * 304, 304, 1), 0, "widest vectors, ragged tail"),
    ((2, 30, 77), (30 * 88, 88, 1), 3, "misaligned head and tail"),
    ((2, 20, 50), (20 * 50, 50, 1), 0, "row stride 50: 2-wide vectors"),
    ((2, 20, 51), (20 * 51, 51, 1), 0, "odd row stride: scalar loads"),
    ((2, 33, 3), (33 * 4, 4, 1), 1, "H < vector width"),
    ((1, 3000, 40), (3000 * 40, 40, 1), 0, "T split + combine"),
    ((2, 700, 6), (700 * 6, 6, 1), 2, "T split, misaligned"),
    # the rows above of <= 256 tokens are v2's warp items; these are its block items (T > 256)
    # at each vector width, and the warp items' edges (T = 1, 256)
    ((3, 300, 300), (300 * 304, 304, 1), 0, "long rows, widest vectors"),
    ((2, 260, 77), (260 * 88, 88, 1), 3, "long rows, misaligned head and tail"),
    ((2, 270, 50), (270 * 52, 52, 1), 1, "long rows, row stride 52"),
    ((2, 257, 50), (257 * 50, 50, 1), 0, "long rows, row stride 50"),
    ((2, 258, 51), (258 * 51, 51, 1), 0, "long rows, odd row stride"),
    ((9, 1, 20), (20, 20, 1), 0, "T = 1, 9 rows"),
    ((5, 256, 300), (256 * 304, 304, 1), 0, "T = 256, short rows in a small batch"),
]
# v2's warp items need >= 1024 (row, strip) items: every vector width of each dtype (by the
# row stride), a misaligned head, the edge strip, several chunks per row (T = 100)
POOL_WARP_VIEWS = [
    ((1024, 5, 20), (5 * 24, 24, 1), 3, "warp items, row stride 24, misaligned"),
    ((1100, 5, 10), (5 * 12, 12, 1), 0, "warp items, row stride 12"),
    ((1100, 5, 9), (5 * 10, 10, 1), 1, "warp items, row stride 10"),
    ((1100, 5, 11), (5 * 11, 11, 1), 0, "warp items, odd row stride"),
    ((1030, 100, 20), (100 * 24, 24, 1), 0, "warp items, 4 chunks per row"),
]
POOL_KERNELS = ("v2", "v1")  # CHAMELEON_POOL_CUDA_KERNEL


def pooling_cases(device: str, generations=POOL_KERNELS) -> None:
    for kernels in (g for g in POOL_KERNELS if g in generations):
        os.environ["CHAMELEON_POOL_CUDA_KERNEL"] = kernels
        print(f"-- pooling kernels {kernels}", flush=True)
        pooling_cases_one(device, kernels)
    os.environ.pop("CHAMELEON_POOL_CUDA_KERNEL", None)


def pooling_cases_one(device: str, kernels: str) -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        tol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-4)
        for size, stride, offset, what in POOL_VIEWS + (POOL_WARP_VIEWS if kernels == "v2" else []):
            B, T, H = size
            need = offset + (B - 1) * stride[0] + (T - 1) * stride[1] + H
            g = torch.Generator().manual_seed(B * 1000 + T)
            storage = torch.randn(need, generator=g).to(dtype)
            hidden_cpu = strided(storage, size, stride, offset)
            hidden = strided(storage.to(device), size, stride, offset)
            mask = torch.rand(B, T, generator=g) < 0.6
            mask[0, : T // 2] = False
            for m in (mask, None):
                want = reference.masked_mean_pool(hidden_cpu.double(), m)
                ok, detail = close(chameleon_ext.masked_mean_pool(hidden, None if m is None else m.to(device)), want, *tol)
                label = f"{kernels} {str(dtype)[6:]} {list(size)} {what}{' mask=None' if m is None else ''}"
                check(f"masked_mean_pool {label}", ok, detail)
            ids = torch.arange(B) % 3
            sums, counts = chameleon_ext.domain_mean_pool(hidden, mask.to(device), ids.to(device), 3)
            ref_sums, ref_counts = reference.domain_mean_pool(hidden_cpu.double(), mask, ids, 3)
            ok, detail = close(sums, ref_sums, *tol)
            check(f"domain_mean_pool {kernels} {str(dtype)[6:]} {list(size)} {what}",
                  ok and torch.equal(counts.cpu(), ref_counts), detail)
    # many rows per domain, one domain empty: D = 5 and 16 (v2: per-chunk partials with 8 and
    # 16 accumulators, float and double means; 17000 rows are more than 128 chunks of 128, so
    # the chunks grow to 133 rows), D = 40 (the sorted segments, B > 4096: at::sort's other path)
    for B, D, dtype in ((5000, 5, torch.float32), (17000, 16, torch.float32), (5000, 40, torch.float32),
                        (1000, 5, torch.float64), (1000, 16, torch.float64)):
        g = torch.Generator().manual_seed(B + D)
        T, H = 3, 40
        hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
        mask = torch.rand(B, T, generator=g) < 0.7
        ids = torch.randint(0, D - 1, (B,), generator=g)
        sums, counts = chameleon_ext.domain_mean_pool(hidden.to(device), mask.to(device), ids.to(device), D)
        ref_sums, ref_counts = reference.domain_mean_pool(hidden.double(), mask, ids, D)
        ok, detail = close(sums, ref_sums, 1e-4, 1e-4)
        check(f"domain_mean_pool {kernels} {str(dtype)[6:]} B={B} D={D} (empty domain)",
              ok and torch.equal(counts.cpu(), ref_counts), detail)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="run on the CPU (a dry run of the workload)")
    ap.add_argument("--kernels", default="v2,v1",
                    help="comma-separated kernel generations to run (v2: the defaults, v1: the previous "
                         "kernels kept for the A/B); racecheck and synccheck run v2 alone to fit their budget")
    args = ap.parse_args()
    generations = tuple(g.strip() for g in args.kernels.split(","))
    if not generations or any(g not in ("v1", "v2") for g in generations):
        ap.error(f"--kernels: expected a comma-separated list of v1 and v2, got {args.kernels!r}")
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    print(f"device: {device}; torch {torch.__version__}; build {chameleon_ext.build_info()}", flush=True)
    krls_cases(device, generations)
    pooling_cases(device, generations)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"checks: {CHECKS[0]}, failures: {len(FAILURES)}" + (f" ({', '.join(FAILURES)})" if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
