"""benchmarks/summarize.py (what `make bench` runs after the benchmarks) on a small
pytest-benchmark JSON: it must not crash on a benchmark without a group, and its numbers are
the hand-computed ones."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "data", "small_bench.json")


def test_summarize_small_benchmark_json():
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "summarize.py"), FIXTURE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| group")}
    assert len(rows) == 4
    pool = "masked_mean_pool [64, 512, 768] bf16 cuda"
    # device time preferred over the host median: 2e9 bytes in 1 ms = 2000 GB/s = 50% of 4000
    assert rows[(pool, "ext")].split("|")[3:7] == [" 1.000 ", " 1.00x ", " 2000.0 ", " 50% "]
    assert rows[(pool, "reference")].split("|")[3:7] == [" 4.000 ", " 4.00x ", " 500.0 ", " 12% "]
    # no group: listed under its own name, no ratio
    assert rows[("bench_end_to_end_smoke", "bench_end_to_end_smoke")].split("|")[3:5] == [" 1500.000 ", " - "]
    assert "12,346" in rows[("embed tiny cpu", "ext")]
    assert proc.stdout.startswith("Machine: Test CPU, Linux python 3.11.7; 2026-12-06T20:00:00")
