"""``chameleon train --weights online``, ``chameleon train --schedule`` and ``chameleon export
--schedule`` through the command line: the schedule an online run writes, a real kill
(``CHAMELEON_FAULT=train:step:N=kill``, SIGKILL) and a resume that ends with bitwise the same
model and schedule.json, a replay of an online run to the same model, the exports parsed back,
and one-line errors for options that do not go together."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from chameleon_ext.cli import main
from chameleon_ext.exports import parse_megatron_blend
from chameleon_ext.model import load_model
from chameleon_ext.online import OnlineChameleon
from chameleon_ext.schedule import load_schedule, write_schedule

from .factories import TEXT_DOMAINS, write_text_domains
from .factories import run_cli as _run
from .test_online_training import USER_SCHEDULE

STEPS = 12
ONLINE = ["--weights", "online", "--online-every", "3", "--online-warmup", "4"]
LIBRARY = {name: p.default for name, p in inspect.signature(OnlineChameleon).parameters.items()}


def _train_args(data, out):
    return ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--block-size", "32",
            "--batch-size", "4", "--warmup", "1", "--ckpt-every", "2", "--eval-windows", "2", "--steps", str(STEPS),
            "--device", "cpu", "--quiet"]



def _killed_at(step, argv):
    """Run the CLI in a new process that SIGKILLs itself after training step ``step``."""
    env = dict(os.environ, CHAMELEON_FAULT=f"train:step:{step}=kill")
    proc = subprocess.run([sys.executable, "-m", "chameleon_ext", *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -9, (proc.returncode, proc.stderr)


def _same_model(a, b):
    ma, mb = load_model(a), load_model(b)
    return all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_text_domains(str(tmp_path_factory.mktemp("online_cli") / "data"), names=TEXT_DOMAINS)


@pytest.fixture(scope="module")
def online_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("online_straight")
    assert main(_train_args(data, out) + ONLINE) == 0
    return out


def test_online_run_prints_its_settings_and_writes_its_schedule(data, tmp_path, capsys):
    code, out, err = _run(_train_args(data, tmp_path) + ["--weights", "online", "--steps", "2"], capsys)
    assert code == 0, err
    layer = load_model(tmp_path / "model.pt").default_embedding_layer  # the middle of the model
    assert (f"online weights: layer {layer} of 2, {LIBRARY['mode']} rule, recomputed at step {LIBRARY['warmup']} "
            f"and every {LIBRARY['every']} steps after, EMA decay {LIBRARY['decay']:g}, "
            f"floor {LIBRARY['floor']:g}; before that uniform") in out
    # no update within 2 steps: one uniform entry, with the run's budget
    doc = json.loads((tmp_path / "schedule.json").read_text())
    assert doc["entries"] == [{"start_step": 0, "start_token": 0, "weights": {d: 0.25 for d in TEXT_DOMAINS}}]
    assert (doc["tokens_per_step"], doc["token_budget"]) == (4 * 32, 2 * 4 * 32)


def test_online_run_killed_right_after_a_change_resumes_exactly(data, online_run, tmp_path, capsys):
    straight = load_schedule(online_run / "schedule.json")
    assert [e.start_step for e in straight.entries] == [0, 4, 7, 10]
    # killed after step 7, whose update is in schedule.json; the last checkpoint is at step 6
    _killed_at(7, _train_args(data, tmp_path) + ONLINE)
    assert [e.start_step for e in load_schedule(tmp_path / "schedule.json").entries] == [0, 4, 7]
    assert not (tmp_path / "model.pt").exists()
    code, out, err = _run(_train_args(data, tmp_path) + ONLINE, capsys)
    assert code == 0, err
    assert _same_model(online_run / "model.pt", tmp_path / "model.pt")
    assert load_schedule(tmp_path / "schedule.json").as_dict() == straight.as_dict()


def test_schedule_run_killed_between_two_changes_resumes_exactly(data, tmp_path, capsys):
    user = tmp_path / "user.json"
    write_schedule(user, USER_SCHEDULE)  # changes at steps 4 and 7
    code, out, err = _run(_train_args(data, tmp_path / "straight") + ["--schedule", user], capsys)
    assert code == 0, err
    assert "following" in out and "3 stage(s) at steps [0, 4, 7]" in out
    assert load_schedule(tmp_path / "straight" / "schedule.json").as_dict() == USER_SCHEDULE  # copied into --out
    _killed_at(5, _train_args(data, tmp_path / "split") + ["--schedule", user])  # checkpoint at step 4
    code, out, err = _run(_train_args(data, tmp_path / "split") + ["--schedule", user], capsys)
    assert code == 0, err
    assert _same_model(tmp_path / "straight" / "model.pt", tmp_path / "split" / "model.pt")


def test_schedule_replays_an_online_run_to_the_same_model(data, online_run, tmp_path, capsys):
    code, _, err = _run(_train_args(data, tmp_path) + ["--schedule", online_run / "schedule.json"], capsys)
    assert code == 0, err
    assert _same_model(online_run / "model.pt", tmp_path / "model.pt")


@pytest.mark.parametrize("extra, needle", [
    (["--schedule", "s.json", "--weights", "online"], "--schedule cannot be used with --weights online"),
    (["--schedule", "s.json", "--weights", "w.json"], "--schedule cannot be used with --weights w.json"),
    (["--online-every", "3", "--mode", "finetune"], "--online-every, --mode: only used with --weights online"),
    (["--online-init", "w.json", "--weights", "w.json"], "--online-init: only used with --weights online"),
    (ONLINE + ["--online-layer", "3"], "--online-layer: expected an integer in [0, 2]"),
    (ONLINE + ["--online-floor", "0.3"], "--online-floor must be < 1/k = 0.25"),
    (ONLINE + ["--online-decay", "1"], "--online-decay must be a number in [0, 1)"),
    (["--schedule", ""], "--schedule: expected a path, got an empty string"),
])
def test_options_that_do_not_go_together_are_one_line(data, tmp_path, capsys, extra, needle):
    code, _, err = _run(_train_args(data, tmp_path) + extra, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


def test_schedule_domains_and_resume_mismatch_are_one_line(data, online_run, tmp_path, capsys):
    other = dict(USER_SCHEDULE, domains=["alpha", "digits", "dna", "web"],
                 entries=[{"start_step": 0, "start_token": 0,
                           "weights": {"alpha": 0.25, "digits": 0.25, "dna": 0.25, "web": 0.25}}])
    write_schedule(tmp_path / "other.json", other)
    code, _, err = _run(_train_args(data, tmp_path / "x") + ["--schedule", tmp_path / "other.json"], capsys)
    assert code == 2 and "the schedule: the domains do not match (unknown ['web']; missing ['zeta']" in err
    # resuming the online run's folder with plain weights would silently freeze its mixture
    code, _, err = _run(_train_args(data, online_run) + ["--steps", str(STEPS + 2)], capsys)
    assert code == 2 and "holds a run that followed a mixture schedule" in err


def test_online_option_defaults_are_the_library_s(capsys):
    from chameleon_ext.cli import build_parser

    args = build_parser().parse_args(["train"])
    assert (args.weights, args.schedule, args.online_every, args.online_layer, args.mode) == ("uniform", None, None,
                                                                                              None, None)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    chunks = re.split(r"\s(?=--[a-z])", " ".join(capsys.readouterr().out.split()))  # one per option
    for option, name in (("--online-every", "every"), ("--online-warmup", "warmup"), ("--online-decay", "decay"),
                         ("--online-floor", "floor"), ("--mode", "mode")):
        assert any(c.startswith(option + " ") and c.endswith(f"(default {LIBRARY[name]})") for c in chunks), option


# --------------------------------------------------------------------------- export --schedule


def test_export_schedule_writes_every_format_parsed_back(online_run, tmp_path, capsys):
    schedule = load_schedule(online_run / "schedule.json")
    code, out, err = _run(["export", "--schedule", online_run / "schedule.json", "--out", tmp_path,
                           "--prefix", "dna=/data/dna_text_document"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == sorted([
        "nanotron_data_stages.yaml", "megatron_stages.json", "megatron_stages.txt", "olmo_core_stages.yaml",
        "schedule.yaml", "hf_interleave_stages.json", "schedule.png", "levanter_train_weights.yaml"])
    starts, ends = [0, 4, 7, 10], [4, 7, 10, STEPS]
    expected = [e.weights for e in schedule.entries]
    paths = {"alpha": "alpha", "digits": "digits", "dna": "/data/dna_text_document", "zeta": "zeta"}

    nano = yaml.safe_load((tmp_path / "nanotron_data_stages.yaml").read_text())["data_stages"]
    assert [s["start_training_step"] for s in nano] == [s + 1 for s in starts]  # nanotron counts from 1
    for stage, w in zip(nano, expected):
        ds = stage["data"]["dataset"]
        assert dict(zip(ds["dataset_folder"], ds["dataset_weights"])) == {paths[d]: v for d, v in w.items()}

    mega = json.loads((tmp_path / "megatron_stages.json").read_text())["stages"]
    assert [(s["start_iteration"], s["end_iteration"]) for s in mega] == list(zip(starts, ends))
    for stage, w in zip(mega, expected):
        assert parse_megatron_blend(stage["data_path"]) == pytest.approx({paths[d]: v for d, v in w.items()},
                                                                         rel=0, abs=1e-15)
    text = (tmp_path / "megatron_stages.txt").read_text().splitlines()
    assert f"--train-iters {STEPS} --lr-decay-iters {STEPS} --phase-transition-iterations 4,7,10" in text[1]
    assert text[2] == "# iterations [0, 4)" and text[8] == f"# iterations [10, {STEPS})"
    assert parse_megatron_blend(text[9].removeprefix("--data-path ")) == parse_megatron_blend(mega[3]["data_path"])

    olmo = yaml.safe_load((tmp_path / "olmo_core_stages.yaml").read_text())["stages"]
    assert [(s["start_step"], s["end_step"]) for s in olmo] == list(zip(starts, ends))
    for stage, w in zip(olmo, expected):
        assert {s["source_name"]: s["target_ratio"] for s in stage["sources"]} == w

    generic = yaml.safe_load((tmp_path / "schedule.yaml").read_text())
    assert generic["domains"] == list(TEXT_DOMAINS) and generic["token_budget"] == schedule.token_budget
    for stage, w in zip(generic["stages"], expected):
        assert {m["name"]: m["weight"] for m in stage["mixture"]} == w

    hf = json.loads((tmp_path / "hf_interleave_stages.json").read_text())
    assert hf["domains"] == list(TEXT_DOMAINS)
    for stage, w in zip(hf["stages"], expected):
        assert sum(stage["probabilities"]) == 1.0
        assert stage["probabilities"] == pytest.approx([w[d] for d in TEXT_DOMAINS], rel=0, abs=1e-12)
    assert (tmp_path / "schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_schedule_formats_and_exactly_one_input(online_run, tmp_path, capsys):
    sched = online_run / "schedule.json"
    code, _, err = _run(["export", "--schedule", sched, "--out", tmp_path / "m", "--format", "megatron,hf_interleave"],
                        capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "m")) == ["hf_interleave_stages.json", "megatron_stages.json",
                                                  "megatron_stages.txt"]
    for argv, needle in [
        (["--schedule", sched, "--weights", "w.json"], "give exactly one of --weights"),
        ([], "give exactly one of --weights"),
        (["--schedule", sched, "--format", "nemo"], "unknown schedule export format(s) ['nemo']"),
        (["--schedule", sched, "--prefix", "web=/x"], "--prefix: ['web'] are not domains of"),
        (["--schedule", sched, "--valid-prefix", "dna=/x"], "--valid-prefix: only used with --weights"),
    ]:
        code, _, err = _run(["export", "--out", tmp_path / "e", *argv], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], (argv, err)
    assert not (tmp_path / "e").exists() or not os.listdir(tmp_path / "e")
