"""schedule.json: format round trip, validation errors, weights_at at the boundaries, the
atomic appender and resume truncation, and every export parsed back."""

from __future__ import annotations

import json
import math
import os

import pytest
import yaml

from chameleon_ext import schedule as sch
from chameleon_ext.formats import schedules as sx
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.exports import parse_megatron_blend

DOMAINS = ["web", "code", "math"]
W0 = {"web": 0.5, "code": 0.25, "math": 0.25}
W1 = {"web": 0.2, "code": 0.3, "math": 0.5}
W2 = {"web": 0.1, "code": 0.1, "math": 0.8}
TPS = 4096


def _doc(**over):
    doc = {"format": sch.SCHEDULE_FORMAT, "domains": list(DOMAINS), "token_budget": 10 * TPS,
           "tokens_per_step": TPS,
           "entries": [{"start_step": 0, "start_token": 0, "weights": dict(W0)},
                       {"start_step": 3, "start_token": 3 * TPS, "weights": dict(W1)},
                       {"start_step": 6, "start_token": 6 * TPS, "weights": dict(W2)}]}
    doc.update(over)
    return doc


def test_round_trip(tmp_path):
    path = tmp_path / "schedule.json"
    sch.write_schedule(path, _doc())
    back = sch.load_schedule(path)
    assert back.as_dict() == _doc()
    assert json.loads(path.read_text())["format"] == "chameleon_ext.schedule/1"
    # floats survive exactly, including awkward ones
    w = {"web": 0.1, "code": 0.2, "math": 1 - 0.1 - 0.2}
    doc = _doc(entries=[{"start_step": 0, "start_token": 0, "weights": w}])
    sch.write_schedule(path, doc)
    assert sch.load_schedule(path).entries[0].weights == w
    # a mapping in another key order comes back in domains order
    doc = _doc(entries=[{"start_step": 0, "start_token": 0, "weights": {"math": 0.25, "web": 0.5, "code": 0.25}}])
    assert list(sch.validate_schedule(doc).entries[0].weights) == DOMAINS


def test_weights_at_boundaries():
    s = sch.validate_schedule(_doc())
    expected = {0: W0, 2: W0, 3: W1, 5: W1, 6: W2, 9: W2, 10_000: W2}
    for step, w in expected.items():
        assert s.weights_at(step) == w, step
    assert [st["end_step"] for st in s.stages()] == [3, 6, 10]
    assert sch.validate_schedule(_doc(token_budget=None)).stages()[-1]["end_step"] is None
    assert s.end_step == 10
    assert sch.validate_schedule(_doc(token_budget=10 * TPS + 1)).end_step == 11  # a partial last step
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ChameleonUserError, match="step must be an integer >= 0"):
            s.weights_at(bad)


@pytest.mark.parametrize("change,match", [
    (dict(format="chameleon_ext.schedule/9"), "unknown schedule format"),
    (dict(domains=["web", "web"]), "more than once"),
    (dict(entries=[]), "'entries' must be a non-empty list"),
    (dict(token_budget=0), "token_budget must be an integer >= 1 or null"),
    (dict(tokens_per_step=2.5), "tokens_per_step must be an integer"),
])
def test_document_errors(change, match):
    with pytest.raises(ChameleonUserError, match=match):
        sch.validate_schedule(_doc(**change), "s.json")


@pytest.mark.parametrize("index,entry,match", [
    (0, {"start_step": 1, "start_token": 0, "weights": W0}, "entry 0: the first entry must start at step 0"),
    (1, {"start_step": 0, "start_token": 0, "weights": W1}, "entry 1: start_step 0 must be greater than"),
    (2, {"start_step": 3, "start_token": 6 * TPS, "weights": W2}, "entry 2: start_step 3 must be greater"),
    (2, {"start_step": 6, "start_token": 5, "weights": W2}, "entry 2: start_token 5 is below"),
    (1, {"start_step": -3, "start_token": 0, "weights": W1}, "entry 1: start_step must be an integer >= 0"),
    (1, {"start_step": 3, "start_token": 1, "weights": {"web": 0.5, "code": 0.5}}, "entry 1: weights: the domains do not match"),
    (1, {"start_step": 3, "start_token": 1, "weights": {"web": 0.5, "code": 0.25, "math": 0.2}},
     "entry 1: weights: must sum to 1"),
    (1, {"start_step": 3, "start_token": 1, "weights": {"web": 1.5, "code": -0.5, "math": 0.0}},
     "entry 1: weights: weight of domain 'code' must be a finite number >= 0"),
    (1, {"start_step": 3, "start_token": 1, "weights": {"web": math.nan, "code": 0.5, "math": 0.5}},
     "entry 1: weights: weight of domain 'web' must be a finite number >= 0"),
    (1, {"start_step": 3, "start_token": 1}, "entry 1: expected keys .*missing \\['weights'\\]"),
    (1, {"start_step": 3, "start_token": 1, "weights": W1, "end": 4}, "unknown \\['end'\\]"),
    (2, {"start_step": 12, "start_token": 12 * TPS, "weights": W2}, "at or past the token budget"),
])
def test_entry_errors_name_the_file_and_entry(index, entry, match):
    doc = _doc()
    doc["entries"][index] = entry
    with pytest.raises(ChameleonUserError, match="^s.json: " if "budget" in match else "s.json: entry"):
        sch.validate_schedule(doc, "s.json")
    with pytest.raises(ChameleonUserError, match=match):
        sch.validate_schedule(doc, "s.json")


def test_sum_tolerance_is_1e_9():
    ok = {"web": 0.5 + 5e-10, "code": 0.25, "math": 0.25}
    sch.validate_schedule(_doc(entries=[{"start_step": 0, "start_token": 0, "weights": ok}]))
    bad = {"web": 0.5 + 2e-9, "code": 0.25, "math": 0.25}
    with pytest.raises(ChameleonUserError, match="sum to 1"):
        sch.validate_schedule(_doc(entries=[{"start_step": 0, "start_token": 0, "weights": bad}]))


def test_load_errors(tmp_path):
    with pytest.raises(ChameleonUserError, match="does not exist"):
        sch.load_schedule(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ChameleonUserError, match="bad.json' is not valid JSON"):
        sch.load_schedule(bad)


def test_writer_appends_atomically_and_resume_truncates(tmp_path):
    path = tmp_path / "run" / "schedule.json"
    w = sch.ScheduleWriter.open(path, DOMAINS, [0.5, 0.25, 0.25], token_budget=10 * TPS, tokens_per_step=TPS)
    assert sch.load_schedule(path).as_dict()["entries"] == _doc()["entries"][:1]
    assert w.append(3, 3 * TPS, W1) is True
    assert w.append(4, 4 * TPS, dict(W1)) is False  # unchanged weights: no entry
    assert w.append(6, 6 * TPS, W2) is True
    assert sch.load_schedule(path).as_dict() == _doc()
    with pytest.raises(ChameleonUserError, match="entry 3: start_step 5 must be greater"):
        w.append(5, 5 * TPS, W0)
    assert sch.load_schedule(path).as_dict() == _doc()  # a refused entry leaves the file alone
    assert not [n for n in os.listdir(path.parent) if n != "schedule.json"]  # no temp files left

    # a checkpoint after step 5 has seen the entries at 0 and 3; the one at 6 is replayed
    r = sch.ScheduleWriter.open(path, DOMAINS, None, resume_step=5)
    assert [e.start_step for e in sch.load_schedule(path).entries] == [0, 3]
    assert r.append(6, 6 * TPS, W2)
    assert sch.load_schedule(path).as_dict() == _doc()
    # a checkpoint taken right after a change keeps that change
    sch.ScheduleWriter.open(path, DOMAINS, None, resume_step=6)
    assert [e.start_step for e in sch.load_schedule(path).entries] == [0, 3, 6]
    sch.ScheduleWriter.open(path, DOMAINS, None, resume_step=0)
    assert [e.start_step for e in sch.load_schedule(path).entries] == [0]
    with pytest.raises(ChameleonUserError, match="differ from the run's"):
        sch.ScheduleWriter.open(path, ["web", "code"], None, resume_step=3)
    with pytest.raises(ChameleonUserError, match="does not exist"):
        sch.ScheduleWriter.open(tmp_path / "nope.json", DOMAINS, None, resume_step=3)


def test_writer_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "schedule.json"
    w = sch.ScheduleWriter.open(path, DOMAINS, W0)
    before = path.read_bytes()
    monkeypatch.setenv("CHAMELEON_FAULT", "write:schedule.json:replace=enospc")
    with pytest.raises(ChameleonUserError, match="cannot write schedule file .*No space left"):
        w.append(3, 3 * TPS, W1)
    assert path.read_bytes() == before


# -- exports ---------------------------------------------------------------------------------


def test_nanotron_data_stages():
    s = sch.validate_schedule(_doc())
    doc = yaml.safe_load(sx.nanotron_data_stages_yaml(s, prefixes={"web": "/data/web"}))
    stages = doc["data_stages"]
    assert [st["start_training_step"] for st in stages] == [1, 4, 7]  # nanotron counts from 1
    for st, w in zip(stages, (W0, W1, W2)):
        ds = st["data"]["dataset"]
        assert ds["dataset_folder"] == ["/data/web", "code", "math"]
        assert ds["dataset_weights"] == [w[d] for d in DOMAINS]


def test_megatron_stages():
    s = sch.validate_schedule(_doc())
    out = sx.megatron_stages(s, prefixes={"math": "/data/math_text_document"})
    ranges = [(st["start_iteration"], st["end_iteration"]) for st in out["stages"]]
    assert ranges == [(0, 3), (3, 6), (6, 10)]
    for st, w in zip(out["stages"], (W0, W1, W2)):
        assert parse_megatron_blend(st["data_path"]) == {"web": w["web"], "code": w["code"],
                                                         "/data/math_text_document": w["math"]}
    # Every stage's launch keeps the whole run's iterations and names the stage changes, so the
    # learning-rate schedule spans the run and a resumed stage passes Megatron's scheduler check.
    assert out["train_iters"] == 10 and out["phase_transition_iterations"] == [3, 6]
    text = sx.megatron_stages_text(s)
    assert "--train-iters 10 --lr-decay-iters 10 --phase-transition-iterations 3,6" in text.splitlines()[1]
    text = sx.megatron_stages_text(sch.validate_schedule(_doc(token_budget=None)))
    lines = [line for line in text.splitlines() if not line.startswith("# Megatron") and "every launch" not in line]
    assert lines[0] == "# iterations [0, 3)" and lines[4] == "# iterations [6, end)"
    assert parse_megatron_blend(lines[5].removeprefix("--data-path ")) == W2
    bad = _doc(domains=["web site", "code", "math"])
    for e in bad["entries"]:
        e["weights"]["web site"] = e["weights"].pop("web")
    with pytest.raises(ChameleonUserError, match="contains whitespace"):
        sx.megatron_stages(bad)


def test_olmo_core_and_generic_yaml():
    s = sch.validate_schedule(_doc())
    olmo = yaml.safe_load(sx.olmo_core_stages_yaml(s))
    for st, w in zip(olmo["stages"], (W0, W1, W2)):
        assert {src["source_name"]: src["target_ratio"] for src in st["sources"]} == w
    generic = yaml.safe_load(sx.schedule_yaml(s))
    assert generic["domains"] == DOMAINS and generic["token_budget"] == 10 * TPS
    assert [(st["start_step"], st["end_step"], st["start_token"]) for st in generic["stages"]] == \
        [(0, 3, 0), (3, 6, 3 * TPS), (6, 10, 6 * TPS)]
    for st, w in zip(generic["stages"], (W0, W1, W2)):
        assert {m["name"]: m["weight"] for m in st["mixture"]} == w


def test_hf_interleave_stages_sum_to_one():
    w = {"web": 0.1, "code": 0.2, "math": 0.7}  # 0.1 + 0.2 + 0.7 != 1.0 in floats
    doc = _doc()
    doc["entries"][1]["weights"] = w
    out = sx.hf_interleave_stages(sch.validate_schedule(doc))
    assert out["domains"] == DOMAINS
    for st in out["stages"]:
        assert sum(st["probabilities"]) == 1.0
    assert out["stages"][1]["probabilities"] == pytest.approx([0.1, 0.2, 0.7], abs=1e-15)
    assert [st["start_step"] for st in out["stages"]] == [0, 3, 6]


def test_write_schedule_exports(tmp_path):
    path = tmp_path / "schedule.json"
    sch.write_schedule(path, _doc())
    paths = sx.write_schedule_exports(path, tmp_path / "exports")
    assert set(paths) == set(sx.SCHEDULE_EXPORT_FILES)
    assert json.loads(open(paths["hf_interleave"]).read())["stages"][2]["probabilities"] == [0.1, 0.1, 0.8]
    assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a domain Megatron cannot hold: an error, or skipped with on_skip
    bad = _doc(domains=["web site", "code", "math"])
    for e in bad["entries"]:
        e["weights"]["web site"] = e["weights"].pop("web")
    with pytest.raises(ChameleonUserError, match="whitespace"):
        sx.write_schedule_exports(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing written before the error
    skipped = []
    paths = sx.write_schedule_exports(bad, tmp_path / "bad", on_skip=skipped.append)
    assert "megatron" not in paths and "nanotron" in paths
    assert len(skipped) == 2 and all("whitespace" in line for line in skipped)


def _megatron_launches(text):
    """Per stage of megatron_stages.txt, the launch arguments a user copies: the flags given
    before the first stage (the "every launch" line) plus the flags of that stage's own lines,
    as ``(start, end, {flag: [value, ...]})`` (a flag given twice keeps both values)."""
    def flags(line):
        tokens = line[line.index("--"):].split() if "--" in line else []
        out, key = [], None
        for t in tokens:
            if t.startswith("--"):
                key = t
                out.append([t, []])
            elif key is not None:
                out[-1][1].append(t)
        return [(k, " ".join(v)) for k, v in out]

    shared, stages = [], []
    for line in text.splitlines():
        if line.startswith("# iterations ["):
            start, end = line.removeprefix("# iterations [").rstrip(")").split(", ")
            stages.append((int(start), None if end == "end" else int(end), []))
        elif stages:
            stages[-1][2].extend(flags(line))
        else:
            shared.extend(flags(line))
    launches = []
    for start, end, own in stages:
        merged = {}
        for k, v in shared + own:
            merged.setdefault(k, []).append(v)
        launches.append((start, end, merged))
    return launches


def _check_megatron_launches(text, full_run):
    """Every stage's launch gives --train-iters and --lr-decay-iters once each, both the whole
    run's iterations (a per-stage value decays the learning rate fully in every stage, and the
    resumed launch then fails Megatron's scheduler check), and --phase-transition-iterations =
    the starts of the stages after the first."""
    launches = _megatron_launches(text)
    assert len(launches) >= 2, "no stages in the text"
    starts = [start for start, _, _ in launches]
    for start, end, args in launches:
        assert args.get("--train-iters") == [str(full_run)], (start, args.get("--train-iters"))
        assert args.get("--lr-decay-iters") == [str(full_run)], (start, args.get("--lr-decay-iters"))
        assert args.get("--phase-transition-iterations") == [",".join(map(str, starts[1:]))], start
        assert len(args.get("--data-path", [])) == 1, start
    assert [end for _, end, _ in launches][:-1] == starts[1:] and launches[-1][1] == full_run


@pytest.mark.parametrize("budget_steps,starts", [(10, [0, 3, 6]), (11, [0, 3, 6]), (100_000, [0, 1, 99_999])])
def test_megatron_stage_launches_share_the_whole_run(tmp_path, budget_steps, starts):
    entries = [{"start_step": s, "start_token": s * TPS, "weights": dict(w)} for s, w in zip(starts, (W0, W1, W2))]
    doc = _doc(token_budget=budget_steps * TPS - (TPS // 2 if budget_steps == 11 else 0), entries=entries)
    # A token budget ending inside a step counts that partial step as the run's last iteration.
    sx.write_schedule_exports(doc, tmp_path, formats=["megatron"])
    _check_megatron_launches((tmp_path / "megatron_stages.txt").read_text(), budget_steps)
    js = json.loads((tmp_path / "megatron_stages.json").read_text())
    assert js["train_iters"] == budget_steps and js["phase_transition_iterations"] == starts[1:]
    assert [st["start_iteration"] for st in js["stages"]] == starts
    assert all(set(st) == {"start_iteration", "end_iteration", "start_token", "data_path"} for st in js["stages"])


def _per_stage_train_iters(text):
    """``text`` with ``--train-iters <stage end>`` added to each stage's launch: the old advice."""
    out, end = [], None
    for line in text.splitlines():
        if line.startswith("# iterations ["):
            end = line.rstrip(")").split(", ")[1]
        out.append(line.replace("--data-path", f"--train-iters {end} --data-path") if line.startswith("--data-path") else line)
    return "\n".join(out) + "\n"


def test_megatron_stage_launch_check_rejects_per_stage_train_iters():
    # The checker above must fail on the advice that broke resumed runs: --train-iters per stage.
    text = sx.megatron_stages_text(sch.validate_schedule(_doc()))
    _check_megatron_launches(text, 10)
    with pytest.raises(AssertionError):  # beside the shared arguments
        _check_megatron_launches(_per_stage_train_iters(text), 10)
    old = "\n".join(line for line in text.splitlines() if "every launch" not in line)
    with pytest.raises(AssertionError):  # instead of them (the old export)
        _check_megatron_launches(_per_stage_train_iters(old), 10)
    with pytest.raises(AssertionError):  # no stage changes named
        _check_megatron_launches(text.replace(" --phase-transition-iterations 3,6", ""), 10)
