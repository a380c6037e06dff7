"""The command line's trainer-facing outputs: ``weights --token-budget/--max-epochs`` (the plan
recorded in weights.json and carried by the trainer exports), ``export --format`` and
``export-model``. The maths behind them is tested against independent references in
test_budget.py, test_mixture_formats.py and test_hf_export.py; here the wiring is checked
against numbers recomputed from the files the commands wrote."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml

from chameleon_ext.model import GPT, GPTConfig, save_model

from .factories import write_text_domains
from .factories import run_cli as _run

COMMON = ["--device", "cpu", "--quiet"]



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_outputs")
    data = write_text_domains(root / "data")
    model = GPT(GPTConfig.preset("tiny", 257, 32), seed=0)
    save_model(root / "proxy.pt", model)
    return root, data


def test_token_budget_is_planned_from_the_data_and_exported(setup, capsys, tmp_path):
    root, data = setup
    out = tmp_path / "w"
    code, _, err = _run(["weights", "--data", data, "--proxy", root / "proxy.pt", "--out", out, "--n-windows", 4,
                         "--window", 32, "--no-plots", "--token-budget", 16_000, "--max-epochs", 2, *COMMON], capsys)
    assert code == 0, err
    doc = json.loads((out / "weights.json").read_text())
    budget = doc["budget"]
    assert budget["token_budget"] == 16_000 and budget["max_epochs"] == 2
    assert set(budget["target_tokens"]) == set(doc["domains"])
    # Independent check of the plan's invariants on the recorded numbers.
    assert sum(budget["target_tokens"].values()) == 16_000
    for d in doc["domains"]:
        assert math.isclose(budget["requested_weights"][d], doc["weights"][d], rel_tol=1e-12, abs_tol=1e-15)
        assert budget["target_tokens"][d] <= math.floor(2 * budget["token_counts"][d])
    assert budget["capped_domains"], "16,000 tokens at 2 epochs must cap a domain of this data"
    # The trainer exports carry the achievable weights, not the requested ones.
    olmo = yaml.safe_load((out / "olmo_source_mixture.yaml").read_text())
    ratios = {s["source_name"]: s["target_ratio"] for s in olmo["sources"]}
    for d in doc["domains"]:
        assert math.isclose(ratios[d], budget["achievable_weights"][d], rel_tol=1e-9, abs_tol=1e-12)


def test_token_budget_option_errors(setup, capsys, tmp_path):
    root, data = setup
    base = ["weights", "--data", data, "--proxy", root / "proxy.pt", "--out", tmp_path / "w", *COMMON]
    code, _, err = _run(base + ["--max-epochs", 2], capsys)
    assert code == 2 and "--max-epochs" in err and "--token-budget" in err
    code, _, err = _run(base + ["--token-budget", 0], capsys)
    assert code == 2 and "--token-budget: expected a positive integer" in err
    code, _, err = _run(base + ["--token-budget", 10, "--max-epochs", -1], capsys)
    assert code == 2 and "--max-epochs: expected a positive number" in err


def test_export_selects_formats(setup, capsys, tmp_path):
    weights = {"format": "chameleon_ext.weights/2", "domains": ["web", "code"], "weights": {"web": 0.75, "code": 0.25}}
    src = tmp_path / "weights.json"
    src.write_text(json.dumps(weights))
    code, out, err = _run(["export", "--weights", src, "--out", tmp_path / "e", "--format", "nanotron,mosaic",
                           "--prefix", "web=/data/web"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "e")) == ["mosaic_streams.yaml", "nanotron_dataset.yaml"]
    nanotron = yaml.safe_load((tmp_path / "e" / "nanotron_dataset.yaml").read_text())
    assert json.dumps(nanotron).count("/data/web") == 1
    code, _, err = _run(["export", "--weights", src, "--out", tmp_path / "f", "--format", "parquet"], capsys)
    assert code == 2 and "unknown export format" in err and "parquet" in err
    code, _, err = _run(["export", "--weights", src, "--out", tmp_path / "g", "--valid-prefix", "books=/x"], capsys)
    assert code == 2 and "--valid-prefix" in err and "books" in err


def test_export_model_writes_a_folder_transformers_loads(setup, capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    root, _ = setup
    code, out, err = _run(["export-model", "--model", root / "proxy.pt", "--hf", tmp_path / "hf"], capsys)
    assert code == 0, err
    assert "logits match" in out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = GPT(GPTConfig.preset("tiny", 257, 32), seed=0).eval()
    idx = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = ours(idx)
        got = hf(idx).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    code, _, err = _run(["export-model", "--model", tmp_path / "missing.pt", "--hf", tmp_path / "hf2"], capsys)
    assert code == 2 and "missing.pt" in err


def test_max_bad_steps_stops_a_diverging_run_with_one_line(setup, capsys, tmp_path):
    _, data = setup
    argv = ["train", "--data", data, "--out", tmp_path / "t", "--preset", "tiny", "--block-size", 32,
            "--batch-size", 4, "--steps", 6, "--warmup", 0, "--ckpt-every", 0, "--eval-windows", 2,
            "--lr", 1e30, "--max-bad-steps", 2, *COMMON]
    code, _, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("chameleon train: error:"), err
    assert "2" in lines[0] and ("non-finite" in lines[0] or "diverge" in lines[0]), lines[0]
    assert not (tmp_path / "t" / "model.pt").exists()  # a diverged model is never published
    code, _, err = _run(argv[:-5] + ["--max-bad-steps", 0, *COMMON], capsys)
    assert code == 2 and "--max-bad-steps: expected a positive integer" in err


def test_a_second_run_on_the_same_out_stops_and_a_dead_run_s_lock_is_taken_over(setup, capsys, tmp_path):
    import socket
    import subprocess
    import sys

    weights = {"format": "chameleon_ext.weights/2", "domains": ["web", "code"], "weights": {"web": 0.75, "code": 0.25}}
    src = tmp_path / "weights.json"
    src.write_text(json.dumps(weights))
    out = tmp_path / "e"
    out.mkdir()
    lock = out / ".chameleon.lock"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{socket.gethostname()} {live.pid}\n")
        code, _, err = _run(["export", "--weights", src, "--out", out], capsys)
        assert code == 2 and f"in use by process {live.pid}" in err and len(err.strip().splitlines()) == 1
        assert sorted(os.listdir(out)) == [".chameleon.lock"]  # nothing written beside the other run
    finally:
        live.kill()
        live.wait()
    # The holder is gone: its lock is stale, taken over with a notice, and released at the end.
    code, stdout, err = _run(["export", "--weights", src, "--out", out], capsys)
    assert code == 0, err
    assert "stale lock" in stdout + err
    assert not lock.exists() and (out / "mixture.yaml").exists()
