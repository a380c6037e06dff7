"""Hostile and careless use of training and its files, through the command line
where a user would meet it: every fault ends with its exit status and one line naming the file,
and no good file is lost or mixed. Faults are injected at named points (``CHAMELEON_FAULT``,
see chameleon_ext.io); kills are real SIGKILLs of a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from chameleon_ext import io
from chameleon_ext.checkpoint import load_checkpoint, previous_path
from chameleon_ext.cli import main
from chameleon_ext.model import GPT, GPTConfig, save_model

TRAIN = ["--preset", "tiny", "--block-size", "16", "--batch-size", "2", "--warmup", "1",
         "--eval-windows", "1", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "data"
    rng = np.random.default_rng(0)
    texts = {"alpha": " ".join("the quick brown fox" for _ in range(80)),
             "dna": "".join("ACGT"[i] for i in rng.integers(0, 4, 1500))}
    for name, text in texts.items():
        (root / name).mkdir(parents=True)
        (root / name / "a.txt").write_text(text, encoding="utf-8")
    main(["train", "--data", str(root), "--out", str(root.parent / "warm"), "--steps", "1", *TRAIN])
    return str(root)


def _train(data, out, capsys, *extra, steps=4):
    code = main(["train", "--data", data, "--out", str(out), "--steps", str(steps), *TRAIN,
                 *[str(e) for e in extra]])
    o, e = capsys.readouterr()
    return code, o, e


def _one_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _temps(folder):
    return [n for n in os.listdir(folder) if n.endswith(".chameleon-tmp")]


def _subprocess_train(data, out, steps, fault, *extra):
    env = dict(os.environ, **{io.FAULT_ENV: fault})
    cmd = [sys.executable, "-m", "chameleon_ext", "train", "--data", data, "--out", str(out),
           "--steps", str(steps), *TRAIN, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


# -- 1: damaged checkpoints are refused, naming the file, offering the previous one --------------


@pytest.mark.parametrize("damage", ["bytes", "weight", "optimizer"])
def test_damaged_checkpoint_is_refused_and_previous_offered(data, tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert _train(data, out, capsys, "--ckpt-every", "2", steps=6)[0] == 0
    ckpt = out / "ckpt.pt"
    assert load_checkpoint(ckpt)["step"] == 6 and load_checkpoint(previous_path(ckpt))["step"] == 4
    if damage == "bytes":
        raw = bytearray(ckpt.read_bytes())
        mid = len(raw) // 2
        raw[mid:mid + 2] = bytes(b ^ 0xFF for b in raw[mid:mid + 2])
        ckpt.write_bytes(bytes(raw))
    else:
        obj = torch.load(ckpt, weights_only=True)
        if damage == "weight":
            obj["model"]["wte.weight"][0, 0] += 1.0
        else:
            state = next(iter(obj["optimizer"]["state"].values()))
            state["exp_avg"].view(-1)[0] += 1.0
        torch.save(obj, ckpt)
    before = ckpt.read_bytes()
    code, _, err = _train(data, out, capsys, "--ckpt-every", "2", steps=8)
    line = _one_line(err)
    assert code == 2 and str(ckpt) in line
    assert "ckpt.prev.pt" in line and "(step 4)" in line
    if damage != "bytes":
        assert "damaged" in line and ("model weights" if damage == "weight" else "optimiser") in line
    assert ckpt.read_bytes() == before  # nothing was written over it


# -- 3, 12: kills during writes lose nothing; their temp files are cleaned up ------------------


def test_kill_while_writing_checkpoint_and_metrics(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data, out, capsys, "--ckpt-every", "2", steps=4)[0] == 0
    good = (out / "ckpt.pt").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    # killed after the new checkpoint's data is written, before the rename
    proc = _subprocess_train(data, out, 6, "write:ckpt.pt:replace=kill", "--ckpt-every", "2")
    assert proc.returncode == -9, proc.stderr
    assert (out / "ckpt.pt").read_bytes() == good
    assert len(_temps(out)) == 1  # the dead writer's temp file
    # killed while a resume rewrites metrics.jsonl (dropping records past the checkpoint)
    proc = _subprocess_train(data, out, 6, "write:metrics.jsonl:replace=kill", "--ckpt-every", "2")
    assert proc.returncode == -9, proc.stderr
    assert (out / "metrics.jsonl").read_text().startswith(metrics)  # never emptied
    # the next run cleans both temp files and resumes
    code, _, err = _train(data, out, capsys, "--ckpt-every", "2", steps=6)
    assert code == 0, err
    assert _temps(out) == []
    assert load_checkpoint(out / "ckpt.pt")["step"] == 6


def test_full_disk_while_writing_checkpoint(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert _train(data, out, capsys, "--ckpt-every", "2", steps=4)[0] == 0
    good = (out / "ckpt.pt").read_bytes()
    monkeypatch.setenv(io.FAULT_ENV, "write:ckpt.pt:data=enospc")
    code, _, err = _train(data, out, capsys, "--ckpt-every", "2", steps=6)
    line = _one_line(err)
    assert code == 2 and str(out / "ckpt.pt") in line and "No space left on device" in line
    assert (out / "ckpt.pt").read_bytes() == good
    assert _temps(out) == []


# -- 7: divergence stops the run; nothing non-finite is saved or logged ------------------------


def _strict_json(line):
    def no_constants(name):
        raise AssertionError(f"bare {name} in metrics.jsonl")
    return json.loads(line, parse_constant=no_constants)


def test_divergence_stops_with_one_line_and_keeps_finite_files(data, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _train(data, out, capsys, "--lr", "1e30", "--ckpt-every", "1", steps=20)
    line = _one_line(err)
    assert code == 2 and "training diverged" in line and "not finite" in line
    for rec in map(_strict_json, (out / "metrics.jsonl").read_text().splitlines()):
        assert rec["kind"] == "train"
    if (out / "ckpt.pt").exists():  # whatever was saved is finite
        ckpt = load_checkpoint(out / "ckpt.pt")
        assert all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values())
    assert not (out / "model.pt").exists()


def test_init_from_nan_model_is_an_error(data, tmp_path, capsys):
    model = GPT(GPTConfig.preset("tiny", 257, 16))
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight[0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    save_model(path, model)
    code, _, err = _train(data, tmp_path / "ft", capsys, "--init-from", path, steps=2)
    line = _one_line(err)
    assert code == 2 and str(path) in line and "blocks.0.mlp.c_fc.weight" in line and "NaN" in line


# -- 8: one run per output folder ---------------------------------------------------------------


def test_second_run_on_the_same_out_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    with io.FolderLock(out):
        code, _, err = _train(data, out, capsys, steps=2)
        assert code == 2 and "in use by process" in _one_line(err) and str(out) in err
    assert not (out / "ckpt.pt").exists()
    # a lock left by a dead process is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (out / io.FolderLock.NAME).write_text(f"{socket.gethostname()} {int(dead.stdout)}\n")
    assert _train(data, out, capsys, steps=2)[0] == 0
    assert not (out / io.FolderLock.NAME).exists()


# -- 11: resubmitting a finished run ------------------------------------------------------------


def test_resubmitted_finished_run_exits_zero(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data, out, capsys, steps=3)[0] == 0
    ckpt = (out / "ckpt.pt").read_bytes()
    code, o, err = _train(data, out, capsys, steps=3)
    assert code == 0 and "complete" in o and err == ""
    code, o, err = _train(data, out, capsys, steps=2)
    assert code == 0 and "past" in o and "step 3" in o and err == ""
    assert (out / "ckpt.pt").read_bytes() == ckpt


# -- 15: an --out that cannot hold the run fails before any work ---------------------------------


def test_out_that_is_a_file_is_one_line(data, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    code, _, err = _train(data, out, capsys, steps=2)
    line = _one_line(err)
    assert code == 2 and str(out) in line and "existing file" in line
    assert out.read_text() == "not a folder"


# -- 9: --init-from does not change --block-size silently ----------------------------------------


def test_init_from_smaller_block_size_is_stated(data, tmp_path, capsys):
    model = GPT(GPTConfig.preset("tiny", 257, 8))
    save_model(tmp_path / "small.pt", model)
    code = main(["train", "--data", data, "--out", str(tmp_path / "ft"), "--steps", "1",
                 *TRAIN, "--init-from", str(tmp_path / "small.pt")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "--block-size 16 exceeds the block size 8 of --init-from" in out


def test_previous_checkpoint_is_copied_where_hard_links_fail(tmp_path, monkeypatch):
    from chameleon_ext.checkpoint import _keep_previous

    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"old checkpoint")

    def no_links(*a, **k):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    _keep_previous(str(ckpt))
    assert (tmp_path / "ckpt.prev.pt").read_bytes() == b"old checkpoint"
    assert not os.path.samefile(ckpt, tmp_path / "ckpt.prev.pt")
    assert _temps(tmp_path) == []
