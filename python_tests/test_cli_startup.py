"""The command line starts without the heavy libraries: ``import chameleon_ext`` and
``chameleon --help`` / ``--version`` / ``export`` never import torch, transformers, the
compiled ops or numpy (benchmarks/bench_cli_startup.py records the time and memory this
saves); the first use of an op or a weight function still loads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers", "chameleon_ext._C", "chameleon_ext.ops", "numpy", "matplotlib")


def _loaded_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; the heavy modules it left imported, and its output."""
    probe = code + f"""
import json, sys
print(json.dumps({{"heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_and_version_import_no_heavy_library():
    for args in (["--help"], ["--version"], ["export", "--help"], ["train", "--help"]):
        got = _loaded_after(f"""
import chameleon_ext.cli
try:
    chameleon_ext.cli.main({args!r})
except SystemExit as exc:
    assert exc.code == 0, exc.code
""")
        # `train --help` builds train's options, whose defaults come from TrainConfig (torch)
        if args != ["train", "--help"]:
            assert got["heavy"] == [], (args, got)


def test_export_imports_no_heavy_library(tmp_path):
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({"format": "chameleon_ext.weights/2", "domains": ["a", "b"],
                                   "weights": {"a": 0.25, "b": 0.75}}))
    got = _loaded_after(f"""
from chameleon_ext.cli import main
assert main(["export", "--weights", {str(weights)!r}, "--out", {str(tmp_path / "out")!r}]) == 0
""")
    assert got["heavy"] == [], got
    assert json.loads((tmp_path / "out" / "hf_interleave_probabilities.json").read_text())["probabilities"] == [0.25, 0.75]


def test_package_names_load_the_ops_on_first_use():
    got = _loaded_after("""
import chameleon_ext, chameleon_ext.data
assert not any(m in sys.modules for m in ("torch", "numpy"))
import torch
w = chameleon_ext.weights_from_embeddings(torch.eye(3, dtype=torch.float64), mode="pretrain")
assert abs(sum(w.weights) - 1.0) < 1e-12
assert chameleon_ext.krls is chameleon_ext.ops.krls
assert chameleon_ext.data.load_dataset is chameleon_ext.data.dataset.load_dataset
""".replace("import chameleon_ext, chameleon_ext.data\n", "import sys, chameleon_ext, chameleon_ext.data\n"))
    assert {"torch", "chameleon_ext._C", "chameleon_ext.ops", "numpy"} <= set(got["heavy"])
