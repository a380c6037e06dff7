"""Figures: PNGs are written (atomically, with a sane size and visible content) for k = 1, 7
and 60 domains; bad inputs are user errors; a missing matplotlib warns and returns None."""

from __future__ import annotations

import builtins
import math
import os
import warnings

import pytest
import torch

from chameleon_ext import plots
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.weights import weights_from_embeddings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KS = [1, 7, 60]


def domain_result(k):
    """Weights, normalised KRLS and centred affinity for k domains with long-ish names."""
    names = [f"domain_{i:02d}_{'web' if i % 2 else 'code'}" for i in range(k)]
    g = torch.Generator().manual_seed(k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k = 1 warns that its weight is 1.0
        result = weights_from_embeddings(torch.randn(k, 24, generator=g, dtype=torch.float64), domains=names)
    return names, result


def check_png(path, min_side=150, max_side=6000):
    """A real PNG: signature, decodes, plausible pixel size, and not a blank canvas."""
    image_mod = pytest.importorskip("matplotlib.image")
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_SIGNATURE
    assert os.path.getsize(path) > 1000
    pixels = image_mod.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    height, width = pixels.shape[:2]
    assert min_side <= height <= max_side and min_side <= width <= max_side, pixels.shape
    ink = (pixels[..., :3].sum(axis=2) < 2.9).mean()  # fraction of non-white pixels
    assert ink > 0.01
    return height, width


def no_temporary_files(folder):
    return [name for name in os.listdir(folder) if name.endswith(".tmp")] == []


@pytest.fixture
def needs_matplotlib():
    pytest.importorskip("matplotlib")


@pytest.mark.parametrize("k", KS)
def test_plot_weights(tmp_path, needs_matplotlib, k):
    names, result = domain_result(k)
    path = str(tmp_path / f"weights_k{k}.png")
    assert plots.plot_weights(names, result.weights, path, title=f"k = {k}", scores=result.leverage) == path
    check_png(path)
    assert no_temporary_files(tmp_path)


def test_plot_weights_grows_with_k_and_accepts_mappings(tmp_path, needs_matplotlib):
    heights = {}
    for k in (7, 60):
        names, result = domain_result(k)
        doc = result.as_dict()  # mappings domain -> value, as a loaded weights.json holds
        path = str(tmp_path / f"w{k}.png")
        plots.plot_weights(doc["domains"], doc["weights"], path)
        heights[k] = check_png(path)[0]
    assert heights[60] > heights[7]  # bars keep a readable height instead of being squashed


@pytest.mark.parametrize("k", KS)
def test_plot_affinity(tmp_path, needs_matplotlib, k):
    names, result = domain_result(k)
    path = str(tmp_path / "nested" / f"affinity_k{k}.png")  # missing folders are created
    assert plots.plot_affinity(names, result.affinity, path) == path
    height, width = check_png(path)
    assert width >= height  # room for the colorbar
    assert no_temporary_files(tmp_path / "nested")


def test_plot_affinity_accepts_nested_lists_and_overwrites(tmp_path, needs_matplotlib):
    path = tmp_path / "affinity.png"
    path.write_bytes(b"old")
    matrix = [[2.0, -1.0, -1.0], [-1.0, 2.0, -1.0], [-1.0, -1.0, 2.0]]
    plots.plot_affinity(["web", "code", "book"], matrix, path)
    check_png(path)


@pytest.mark.parametrize("k", KS)
def test_plot_perplexity(tmp_path, needs_matplotlib, k):
    names, _ = domain_result(k)
    table = {}
    for r, run in enumerate(["uniform", "chameleon", "doremi"]):
        ppl = {d: 10.0 + 3.0 * math.sin(i + r) + r for i, d in enumerate(names)}
        ppl["average"] = sum(ppl.values()) / len(ppl)
        table[run] = ppl
    del table["doremi"][names[0]]  # a run missing a domain just has no bar there
    path = str(tmp_path / f"ppl_k{k}.png")
    assert plots.plot_perplexity(table, path) == path
    check_png(path)


def test_plot_input_errors(tmp_path):
    # Input checks do not need matplotlib and run before it is imported.
    path = str(tmp_path / "x.png")
    with pytest.raises(ChameleonUserError, match="k = 3 entries"):
        plots.plot_weights(["a", "b", "c"], [0.5, 0.5], path)
    with pytest.raises(ChameleonUserError, match=r"NaN or infinite for domain\(s\) \['b'\]"):
        plots.plot_weights(["a", "b"], [0.5, math.nan], path)
    with pytest.raises(ChameleonUserError, match=r"no value for domain\(s\) \['b'\]"):
        plots.plot_weights(["a", "b"], {"a": 1.0}, path)
    with pytest.raises(ChameleonUserError, match=">= 0"):
        plots.plot_weights(["a", "b"], [1.5, -0.5], path)
    with pytest.raises(ChameleonUserError, match="domains: expected at least one domain name"):
        plots.plot_weights([], [], path)
    with pytest.raises(ChameleonUserError, match=r"\[k, k\] = \[2, 2\]"):
        plots.plot_affinity(["a", "b"], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], path)
    with pytest.raises(ChameleonUserError, match="NaN"):
        plots.plot_affinity(["a", "b"], [[1.0, math.nan], [0.0, 1.0]], path)
    with pytest.raises(ChameleonUserError, match="finite number > 0"):
        plots.plot_perplexity({"run": {"web": -3.0}}, path)
    with pytest.raises(ChameleonUserError, match="non-empty mapping"):
        plots.plot_perplexity({}, path)
    assert not os.path.exists(path)


@pytest.fixture
def without_matplotlib(monkeypatch):
    """Make every ``import matplotlib...`` fail, even when it is already loaded."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib' (test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_matplotlib_warns_and_returns_none(tmp_path, without_matplotlib):
    names, result = domain_result(7)
    calls = [
        lambda p: plots.plot_weights(names, result.weights, p, scores=result.leverage),
        lambda p: plots.plot_affinity(names, result.affinity, p),
        lambda p: plots.plot_perplexity({"uniform": {"web": 20.0, "average": 20.0}}, p),
        lambda p: plots.plot_comparison(*comparison_inputs(), p, "compare"),
        lambda p: plots.plot_schedule(two_stage_schedule(), p),
    ]
    for i, call in enumerate(calls):
        path = str(tmp_path / f"plot{i}.png")
        with pytest.warns(RuntimeWarning, match="matplotlib is not available"):
            assert call(path) is None
        assert not os.path.exists(path)
    assert os.listdir(tmp_path) == []


def comparison_inputs():
    """Perplexities of three mixtures over two seeds and the FLOPs one of them cost."""
    from chameleon_ext.compare_stats import ComputeLedger, compare_perplexities

    results = {m: {s: {"web": 20.0 + r + s, "code": 12.0 + 2 * r - s} for s in (0, 1)}
               for r, m in enumerate(["uniform", "chameleon", "doremi"])}
    ledger = ComputeLedger()
    ledger.add("chameleon", "proxy", "train", n_params=10_000, tokens=1_000_000)
    return compare_perplexities(results), ledger


def two_stage_schedule():
    from chameleon_ext.schedule import validate_schedule

    return validate_schedule({"format": "chameleon_ext.schedule/1", "domains": ["web", "code"],
                              "entries": [{"start_step": 0, "start_token": 0, "weights": {"web": 0.5, "code": 0.5}},
                                          {"start_step": 10, "start_token": 40, "weights": {"web": 0.8, "code": 0.2}}]})


def test_plot_comparison(tmp_path, needs_matplotlib):
    stats, ledger = comparison_inputs()
    path = str(tmp_path / "compare.png")
    assert plots.plot_comparison(stats, ledger, path, "three mixtures") == path
    check_png(path)
    assert no_temporary_files(tmp_path)


def test_plot_schedule(tmp_path, needs_matplotlib):
    path = tmp_path / "schedule.png"
    assert plots.plot_schedule(two_stage_schedule(), path) == str(path)
    check_png(path)
    with pytest.raises(ChameleonUserError, match="expected a Schedule"):
        plots.plot_schedule({"domains": ["web"]}, tmp_path / "x.png")
    assert not os.path.exists(tmp_path / "x.png")


def test_plots_package_draws_without_importing_matplotlib_until_asked():
    """Importing every figure module is free: matplotlib loads on the first drawing only."""
    import subprocess
    import sys

    code = ("import sys, chameleon_ext.plots, chameleon_ext.plots.canvas, chameleon_ext.plots.weights, "
            "chameleon_ext.plots.uncertainty, chameleon_ext.plots.perplexity, chameleon_ext.plots.schedule\n"
            "print(sorted(m for m in ('matplotlib', 'torch', 'numpy') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
