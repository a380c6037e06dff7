"""Start-up cost of the command line: wall time and peak RSS of ``chameleon --help`` and of
``chameleon export`` (a weights.json into every trainer format), each in a fresh Python
process, against a bare ``python -c pass`` as the yardstick.

Neither command needs torch, transformers or the compiled ops, so their cost should stay
close to the interpreter's own (the goal: under 0.5 s and 150 MB). The figures go into
``extra_info`` (``peak_rss_MB``, ``wall_s``, ``x_bare_python``) and are printed; nothing
here asserts a time. Linux (reads ``/proc``). With ``PYTHONDONTWRITEBYTECODE`` set, every run
recompiles the modules it imports (about 0.05 s more for ``export``). Run alone with
``python -m benchmarks.bench_cli_startup``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 5
WEIGHTS = {"format": "chameleon_ext.weights/2", "method": "chameleon", "version": "0.1.0",
           "domains": ["arxiv", "book", "c4", "cc", "github", "se", "wiki"],
           "weights": {"arxiv": 0.1, "book": 0.15, "c4": 0.2, "cc": 0.25, "github": 0.1, "se": 0.1, "wiki": 0.1}}


# Each command runs in a fresh interpreter that reports its own peak RSS at exit: VmHWM of
# /proc/self/status (the high-water mark of this program's memory; ru_maxrss would also count
# the pages of the process it was forked from).
_REPORT = ("import atexit, sys\n"
           "def _peak():\n"
           "    with open('/proc/self/status') as f:\n"
           "        kib = [line.split()[1] for line in f if line.startswith('VmHWM:')][0]\n"
           "    sys.stderr.write('\\npeak_rss_kib %s\\n' % kib)\n"
           "atexit.register(_peak)\n")
_CLI = _REPORT + "import runpy\nsys.argv[0] = 'chameleon'\nrunpy.run_module('chameleon_ext', run_name='__main__')\n"


def _commands(tmp: str) -> dict:
    path = os.path.join(tmp, "weights.json")
    with open(path, "w") as f:
        json.dump(WEIGHTS, f)
    cli = [sys.executable, "-c", _CLI]
    return {
        "bare python": [sys.executable, "-c", _REPORT],
        "--help": cli + ["--help"],
        "export": cli + ["export", "--weights", path, "--out", os.path.join(tmp, "out-{i}")],
    }


def run_once(argv: list) -> tuple:
    """``(wall seconds, peak RSS in MB)`` of one run of ``argv`` in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stderr}")
    kib = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("peak_rss_kib ")]
    return wall, int(kib[-1]) / 1024


def measure(rounds: int = ROUNDS) -> dict:
    """``{command: {"wall_s": median, "peak_rss_MB": max, "x_bare_python": ratio}}``."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in _commands(tmp).items():
            walls, rss = [], []
            for i in range(rounds):
                wall, peak = run_once([a.replace("{i}", str(i)) for a in argv])
                walls.append(wall)
                rss.append(peak)
            walls.sort()
            out[name] = {"wall_s": walls[len(walls) // 2], "peak_rss_MB": max(rss)}
    bare = out["bare python"]["wall_s"]
    for row in out.values():
        row["x_bare_python"] = row["wall_s"] / bare
    return out


@pytest.mark.parametrize("command", ["--help", "export"])
def test_cli_startup(benchmark, command):
    figures = {}

    def run():
        figures.update(measure(rounds=1 if benchmark.disabled else ROUNDS))

    benchmark.pedantic(run, rounds=1, iterations=1)
    row = figures[command]
    benchmark.extra_info.update({k: round(v, 4) for k, v in row.items()})
    print(f"\nchameleon {command}: {row['wall_s']:.3f} s, {row['peak_rss_MB']:.0f} MB peak RSS, "
          f"{row['x_bare_python']:.1f}x a bare python start")


if __name__ == "__main__":
    for name, row in measure().items():
        print(f"{name:12s} {row['wall_s']:.3f} s  {row['peak_rss_MB']:6.0f} MB  {row['x_bare_python']:.1f}x bare python")
