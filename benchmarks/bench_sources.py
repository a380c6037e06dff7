"""Corpus sources: the time and memory to draw n x window tokens from a domain should not grow
with the domain (the goal: a 10x larger domain takes at most 1.2x the time, memory flat).

For each format a small and a 10x larger domain are generated from the same random text
(timed run: ~200 MB and ~2 GB under $CHAMELEON_BENCH_DIR or /tmp, kept between runs; the 2 GB
domain is skipped when the disk is short), then each is drawn from in a fresh child process,
which reports, median of 3 seeds: ``cold_s``, the draw after this domain's files were evicted
from the page cache (``posix_fadvise(DONTNEED)`` on its own files only), and ``warm_s``, the same
draw again (every page it needs cached: the CPU cost); memory: ``heap_mb``, the draw's peak of
Python/NumPy allocations (tracemalloc), ``anon_mb``, the growth of anonymous resident memory,
and ``rss_mb``, the peak RSS growth, which also counts the page-cache pages of memory-mapped
files (Arrow; the kernel maps large folios around each touched row, so this one grows with the
file until the file is mapped whole: reclaimable cache, not process memory). The untimed
CI run uses tiny domains in-process. extra_info records both sizes and the ratios.

Compressed shards are 16 MB and Parquet row groups about 8 MB, because the draw reads at most
``max_sequential_blocks`` (8) of those whole: the cost is set by the shard size, not the domain.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

FORMATS = ["megatron", "nanogpt", "text", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow"]
# (small MB, large MB, windows, window length)
CASES = [(200, 2000, 2048, 512)]
QUICK_CASES = [(1, 4, 16, 32)]
DOC_BYTES = (500, 8000)  # document lengths, uniform
_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      \n", np.uint8)


def _text_pool(path, n_bytes, seed):
    """``n_bytes`` of random ASCII text (words and lines) in a file, written in chunks."""
    if os.path.isfile(path) and os.path.getsize(path) == n_bytes:
        return np.memmap(path, np.uint8, "r")
    rng = np.random.default_rng(seed)
    with open(path + ".tmp", "wb") as f:
        left = n_bytes
        while left:
            k = min(left, 1 << 26)
            f.write(_ALPHABET[rng.integers(0, _ALPHABET.size, size=k)].tobytes())
            left -= k
    os.replace(path + ".tmp", path)
    return np.memmap(path, np.uint8, "r")


def _doc_offsets(n_bytes, seed):
    rng = np.random.default_rng(seed + 1)
    lens = rng.integers(DOC_BYTES[0], DOC_BYTES[1], size=2 * n_bytes // DOC_BYTES[0] + 2)
    ends = np.cumsum(lens)
    ends = ends[ends < n_bytes]
    return np.concatenate([[0], ends, [n_bytes]]).astype(np.int64)


def _shards(pool, offs, shard_bytes):
    """Lists of document strings of about ``shard_bytes`` each."""
    i = 0
    while i < offs.size - 1:
        j = int(np.searchsorted(offs, offs[i] + shard_bytes, side="left"))
        j = max(min(j, offs.size - 1), i + 1)
        data = bytes(pool[offs[i]:offs[j]])
        base = offs[i]
        yield [data[a - base:b - base].decode("ascii") for a, b in zip(offs[i:j], offs[i + 1:j + 1])]
        i = j


def write_domain(root, fmt, mb, seed=0):
    """A domain folder of about ``mb`` MB of text in ``fmt``; reused when already complete."""
    d = os.path.join(root, f"{fmt.replace('.', '_')}-{mb}mb")
    if os.path.isfile(os.path.join(d, ".complete")):
        return d
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    n = int(mb * 1e6)
    pool = _text_pool(os.path.join(root, f".pool-{mb}mb.u8"), n, seed)
    offs = _doc_offsets(n, seed)
    if fmt == "megatron":  # the documented layout, vectorised (the builder is per item); byte ids
        prefix = os.path.join(d, "part_text_document")
        lens = np.diff(offs).astype(np.int32)
        tokens = np.memmap(prefix + ".bin", np.uint16, "w+", shape=(n,))
        for a in range(0, n, 1 << 26):
            tokens[a:a + (1 << 26)] = pool[a:a + (1 << 26)]
        tokens.flush()
        del tokens
        with open(prefix + ".idx", "wb") as f:
            f.write(b"MMIDIDX\x00\x00" + np.uint64(1).tobytes() + np.uint8(8).tobytes())
            f.write(np.uint64(lens.size).tobytes() + np.uint64(lens.size + 1).tobytes())
            f.write(lens.tobytes() + (offs[:-1] * 2).tobytes() + np.arange(lens.size + 1, dtype=np.int64).tobytes())
    elif fmt == "nanogpt":
        np.asarray(pool).astype(np.uint16).tofile(os.path.join(d, "train.bin"))
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump({"dtype": "uint16", "vocab_size": 257}, f)
    elif fmt == "text":  # files of ~64 MB, one document each
        for k, docs in enumerate(_shards(pool, offs, 64 << 20)):
            with open(os.path.join(d, f"part-{k:05d}.txt"), "w") as f:
                f.write("".join(docs))
    elif fmt.startswith("jsonl"):
        size = 64 << 20 if fmt == "jsonl" else 16 << 20
        for k, docs in enumerate(_shards(pool, offs, size)):
            data = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
            path = os.path.join(d, f"part-{k:05d}.{fmt}")
            if fmt == "jsonl":
                open(path, "wb").write(data)
            elif fmt == "jsonl.gz":
                with gzip.open(path, "wb", compresslevel=1) as f:
                    f.write(data)
            else:
                import zstandard

                open(path, "wb").write(zstandard.ZstdCompressor(level=1).compress(data))
    elif fmt == "parquet":
        for k, docs in enumerate(_shards(pool, offs, 64 << 20)):
            pq.write_table(pa.table({"text": docs}), os.path.join(d, f"part-{k:05d}.parquet"),
                           row_group_size=max(1, len(docs) // 8))
    elif fmt == "arrow":
        datasets = pytest.importorskip("datasets")
        arr = pa.LargeStringArray.from_buffers(offs.size - 1, pa.py_buffer(offs), pa.py_buffer(np.asarray(pool)))
        ds = datasets.Dataset(pa.table({"text": arr}))
        ds.save_to_disk(os.path.join(d, "hf"), num_shards=max(1, mb // 256))
    open(os.path.join(d, ".complete"), "w").close()
    return d


_CHILD = r"""
import json, os, sys, time, tracemalloc
import numpy as np
from chameleon_ext.data.sources import detect_sources
from chameleon_ext.data.tokenizer import ByteTokenizer
path, n, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tok = ByteTokenizer()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

def evict():  # drop this domain's pages from the page cache (only its files): a cold read
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

rss0, anon0 = status("VmRSS:"), status("RssAnon:")
try:  # reset the peak-RSS mark (Linux), so VmHWM is the peak of the draws, not of the imports
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
evict()
t0 = time.perf_counter()
src = detect_sources(path)
t_open = time.perf_counter() - t0
cold, warm = [], []
for seed in range(3):
    evict()
    t0 = time.perf_counter()
    src.sample_windows(np.random.default_rng(seed), n, window, tok)
    cold.append(time.perf_counter() - t0)
    t0 = time.perf_counter()  # the same windows again: every page they need is cached
    w = src.sample_windows(np.random.default_rng(seed), n, window, tok)
    warm.append(time.perf_counter() - t0)
assert w.shape == (n, window)
hwm, anon1 = status("VmHWM:") - rss0, status("RssAnon:") - anon0
tracemalloc.start()
src.sample_windows(np.random.default_rng(0), n, window, tok)
heap = tracemalloc.get_traced_memory()[1] / 2 ** 20
print(json.dumps({"open_s": t_open, "cold_s": sorted(cold)[1], "warm_s": sorted(warm)[1],
                  "rss_mb": hwm, "anon_mb": anon1, "heap_mb": heap}))
"""


def _measure_child(path, n, window):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    out = subprocess.run([sys.executable, "-c", _CHILD, path, str(n), str(window)], env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_inline(path, n, window):
    from chameleon_ext.data.sources import detect_sources
    from chameleon_ext.data.tokenizer import ByteTokenizer

    t0 = time.perf_counter()
    src = detect_sources(path)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    w = src.sample_windows(np.random.default_rng(0), n, window, ByteTokenizer())
    assert w.shape == (n, window) and w.min() >= 0 and w.max() <= 256
    dt = time.perf_counter() - t0
    return {"open_s": t_open, "cold_s": dt, "warm_s": dt, "rss_mb": float("nan"), "anon_mb": float("nan"),
            "heap_mb": float("nan")}


@pytest.mark.parametrize("fmt", FORMATS)
def bench_sources_scaling(benchmark, fmt, case, request):
    small_mb, large_mb, n, window = case
    quick = bool(request.config.getoption("benchmark_disable", default=False))
    if fmt == "jsonl.zst":
        pytest.importorskip("zstandard")
    if fmt == "arrow":
        pytest.importorskip("datasets")
    root = tempfile.mkdtemp(prefix="chameleon_bench_sources_") if quick else \
        os.environ.get("CHAMELEON_BENCH_DIR", "/tmp/chameleon_bench_sources")
    os.makedirs(root, exist_ok=True)
    try:
        free_mb = shutil.disk_usage(root).free / 1e6
        sizes = [small_mb] + ([large_mb] if free_mb > 3 * large_mb else [])
        dirs = {mb: write_domain(root, fmt, mb) for mb in sizes}
        measure = _measure_inline if quick else _measure_child
        results = {}
        benchmark.group = f"sources: draw {n} x {window} tokens, {fmt}"
        for mb in sizes:
            results[mb] = measure(dirs[mb], n, window)
        # the timed quantity: the draw on the largest domain (in-process, after the child runs)
        from chameleon_ext.data.sources import detect_sources
        from chameleon_ext.data.tokenizer import ByteTokenizer

        src = detect_sources(dirs[sizes[-1]])
        benchmark.pedantic(lambda: src.sample_windows(np.random.default_rng(0), n, window, ByteTokenizer()),
                           rounds=1 if quick else 3, iterations=1)
        info = {"provider": f"{fmt}", "tokens_per_s": n * window / results[sizes[-1]]["warm_s"]}
        keys = ("open_s", "cold_s", "warm_s", "rss_mb", "anon_mb", "heap_mb")
        for mb in sizes:
            info.update({f"{k}_{mb}mb": results[mb][k] for k in keys})
        if len(sizes) == 2:
            for k in ("cold_s", "warm_s", "heap_mb"):
                info[f"{k}_ratio_10x"] = results[large_mb][k] / max(results[small_mb][k], 1e-9)
        benchmark.extra_info.update(info)
        print(f"\n[bench_sources] {fmt}: " + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
    finally:
        if quick:
            shutil.rmtree(root, ignore_errors=True)
