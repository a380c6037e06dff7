"""No command trains on a collapsed mixture without saying so: `weights`, `sweep`, `train
--weights` (and `run`, `compare`, through the same functions) print which domain took the
mixture, its share, the tokens per domain and a fix that was tried on the same scores;
``--strict`` turns it into exit 2. The CLI runs in-process (factories.run_cli)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from chameleon_ext import compare, uncertainty as U, weights as W
from chameleon_ext.compare import config as compare_config, report as compare_report
from chameleon_ext.errors import ChameleonUserError

from .factories import TEXT_DOMAINS, run_cli, write_text_domains

DOMAINS = list(TEXT_DOMAINS)  # alpha, digits, dna, zeta


def centroid_embeddings(path, seed=0):
    """alpha sits at the centroid of the other three: the paper's pretraining rule gives it ~1."""
    g = torch.Generator().manual_seed(seed)
    others = torch.randn(3, 10, generator=g, dtype=torch.float64) * 4.0
    X = torch.cat([others.mean(0, keepdim=True) + 1e-4 * torch.randn(1, 10, generator=g, dtype=torch.float64),
                   others]) + 2.0
    torch.save({"domains": DOMAINS, "embeddings": X, "counts": [8] * 4, "settings": {}}, path)
    return X


@pytest.fixture
def emb_path(tmp_path):
    path = tmp_path / "emb" / "domain_embeddings.pt"
    path.parent.mkdir()
    centroid_embeddings(path)
    return path


def _weights(emb_path, out, *extra):
    return ["weights", "--embeddings", emb_path, "--out", out, "--bootstrap", 0, "--no-plots", *extra]


def test_weights_paper_rule_collapse_is_printed_with_a_fix_that_works(emb_path, tmp_path, capsys):
    code, out, err = run_cli(_weights(emb_path, tmp_path / "w", "--rule", "paper"), capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "w" / "weights.json").read_text())
    assert doc["rule"] == "paper" and doc["weights"]["alpha"] > 0.99
    assert "WARNING: collapsed mixture: 'alpha' takes" in out
    # tokens per domain over `chameleon train`'s default budget (1000 steps x 16 x 128)
    budget = 1000 * 16 * 128
    assert f"tokens per domain over this run's {budget:,} tokens: alpha {round(doc['weights']['alpha'] * budget):,}" in out
    # the fix was tried on the same embeddings: the default rule's largest weight, as printed
    fixed = W.weights_from_embeddings(torch.load(emb_path)["embeddings"]).weights
    assert float(fixed.max()) <= 0.9
    assert f"fix: the default rule and settings (drop --rule paper) gives at most {float(fixed.max()):.3f}" in out
    codes = [w["code"] for w in doc["diagnostics"]["warnings"]]
    assert "collapsed_mixture" in codes
    message = next(w["message"] for w in doc["diagnostics"]["warnings"] if w["code"] == "collapsed_mixture")
    assert "larger temperature" not in message and f"at most {float(fixed.max()):.3f}" in message


def test_weights_strict_exits_2_on_a_collapse(emb_path, tmp_path, capsys):
    code, out, err = run_cli(_weights(emb_path, tmp_path / "w", "--rule", "paper", "--strict"), capsys)
    assert code == 2 and "--strict: the mixture is collapsed ('alpha'" in err
    assert "WARNING: collapsed mixture" in out


def test_default_rule_does_not_collapse_on_the_same_embeddings(emb_path, tmp_path, capsys):
    code, out, err = run_cli(_weights(emb_path, tmp_path / "w", "--strict"), capsys)
    assert code == 0, err
    assert "WARNING" not in out
    doc = json.loads((tmp_path / "w" / "weights.json").read_text())
    assert max(doc["weights"].values()) <= 1 - W.RULE_DEFAULTS[W.DEFAULT_RULE]["smoothing"] * 0.75 + 1e-12
    assert doc["lambda_selection"]["method"] == "auto"


def test_power_rule_without_smoothing_collapse_advises_smoothing(emb_path, tmp_path, capsys):
    code, out, err = run_cli(_weights(emb_path, tmp_path / "w", "--smoothing", "0", "--temperature", "0.1"), capsys)
    assert code == 0, err
    X = torch.load(emb_path)["embeddings"]
    plain = W.weights_from_embeddings(X, smoothing=0.0, temperature=0.1).weights
    assert float(plain.max()) > 0.9 and "WARNING: collapsed mixture" in out
    assert "fix: the default rule and settings (drop --smoothing 0, --temperature 0.1)" in out
    fixed = W.weights_from_embeddings(X).weights
    assert f"gives at most {float(fixed.max()):.3f}" in out and float(fixed.max()) <= 0.9


def test_sweep_reports_collapsed_settings(emb_path, tmp_path, capsys):
    code, out, err = run_cli(["sweep", "--embeddings", emb_path, "--out", tmp_path / "s", "--no-plots",
                              "--rule", "paper", "--lam", "0.1,10"], capsys)
    assert code == 0, err
    assert "WARNING: 2 of 2 swept settings give a collapsed mixture" in out and "'alpha'" in out
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert sweep["rule"] == "paper"


def test_train_on_a_collapsed_weights_file_warns_and_strict_refuses(emb_path, tmp_path, capsys):
    data = write_text_domains(tmp_path / "data", names=TEXT_DOMAINS)
    assert run_cli(_weights(emb_path, tmp_path / "w", "--rule", "paper"), capsys)[0] == 0
    wfile = tmp_path / "w" / "weights.json"
    common = ["train", "--data", data, "--weights", wfile, "--preset", "tiny", "--block-size", 16,
              "--batch-size", 2, "--steps", 1, "--warmup", 0, "--device", "cpu", "--quiet"]
    code, out, err = run_cli(common + ["--out", tmp_path / "t1", "--strict"], capsys)
    assert code == 2 and "--strict" in err and "not training on it" in err
    assert not os.path.exists(tmp_path / "t1" / "model.pt")
    assert f"tokens per domain over this run's {1 * 2 * 16:,} tokens" in out
    # the fix names the embeddings beside the file and the default rule's result on them
    assert "chameleon weights --embeddings" in out and "the default power rule) gives at most" in out
    code, out, err = run_cli(common + ["--out", tmp_path / "t2"], capsys)
    assert code == 0, err
    assert "WARNING: collapsed mixture of" in out and os.path.exists(tmp_path / "t2" / "model.pt")


def test_compare_marks_collapsed_mixtures_and_strict_stops():
    cfg = compare.CompareConfig(mixtures=["uniform", "chameleon-paper"])
    said = []
    mixtures = {"uniform": {"weights": {d: 0.25 for d in DOMAINS}},
                "chameleon-paper": {"weights": {"alpha": 0.97, "digits": 0.01, "dna": 0.01, "zeta": 0.01}}}
    collapsed = compare_report.check_collapsed(mixtures, cfg, 1000, said.append)
    assert collapsed == {"chameleon-paper": {"domain": "alpha", "weight": 0.97}}
    assert any("collapsed mixture 'chameleon-paper'" in line for line in said)
    assert any("alpha 970, digits 10" in line for line in said)
    assert not any("fix:" in line for line in said)  # no default-rule mixture to point at
    said.clear()
    compare_report.check_collapsed({**mixtures, "chameleon": {"weights": {d: 0.25 for d in DOMAINS}}}, cfg, 1000,
                             said.append)
    assert any("fix: the chameleon mixture in this table (the default power rule) puts at most 0.250" in line
               for line in said)
    assert "COLLAPSED mixtures" in compare_report.collapsed_note(collapsed) and "chameleon-paper" in compare_report.collapsed_note(
        collapsed)
    assert compare_report.collapsed_note({}) == ""
    cfg.strict = True
    with pytest.raises(ChameleonUserError, match=r"--strict: collapsed mixture\(s\) \['chameleon-paper'\]"):
        compare_report.check_collapsed(mixtures, cfg, 1000, said.append)


def test_compare_knows_both_chameleon_variants():
    assert {"chameleon", "chameleon-paper"} <= set(compare.METHODS)
    assert compare_config.rule_of("chameleon") == W.DEFAULT_RULE and compare_config.rule_of("chameleon-paper") == "paper"
    assert "chameleon-paper" in compare.FINETUNE_METHODS


def test_collapse_lines_only_above_the_threshold():
    assert U.collapse_lines({"a": 0.9, "b": 0.1}) == []
    assert U.collapse_lines({"a": 1.0}) == []
    lines = U.collapse_lines({"a": 0.95, "b": 0.05}, 100, "do X")
    assert lines[0].startswith("WARNING: collapsed mixture: 'a' takes 0.9500")
    assert lines[1] == "  tokens per domain over this run's 100 tokens: a 95, b 5" and lines[2] == "  fix: do X"


def test_run_strict_stops_before_the_base_models(tmp_path, capsys):
    # A power rule this sharp (T = 0.01, no smoothing) puts everything on the lowest-leverage domain.
    data = write_text_domains(tmp_path / "data", names=TEXT_DOMAINS)
    argv = ["run", "--data", data, "--out", tmp_path / "r", "--preset", "tiny", "--block-size", 16, "--batch-size", 2,
            "--proxy-steps", 2, "--steps", 1, "--warmup", 0, "--n-windows", 4, "--window", 16, "--bootstrap", 0,
            "--no-plots", "--device", "cpu", "--quiet", "--smoothing", "0", "--temperature", "0.01", "--strict"]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and "--strict: the chameleon mixture is collapsed" in err
    assert "WARNING: collapsed chameleon mixture" in out and f"over this run's {1 * 2 * 16:,} tokens" in out
    assert "fix: the default rule and settings (drop --smoothing 0, --temperature 0.01) gives at most" in out
    assert not os.path.exists(tmp_path / "r" / "base")  # no base model was trained on it


def test_collapse_fix_names_every_option_it_drops_and_its_result_is_the_default(emb_path):
    X = torch.load(emb_path)["embeddings"]
    point = W.weights_from_embeddings(X, rule="paper", lam=3.0, normalize=False, domains=DOMAINS)
    fix = U.collapse_fix(point)
    assert fix.startswith("the default rule and settings (drop --rule paper, --lam 3, --no-normalize) gives at most ")
    assert f"at most {float(W.weights_from_embeddings(X).weights.max()):.3f}" in fix
    share = W.weights_from_embeddings(X, share=0.9, smoothing=0.0, temperature=0.05)
    assert "(drop --smoothing 0, --temperature 0.05, --share 0.9)" in U.collapse_fix(share)


def test_train_advice_without_embeddings_uses_the_file_s_leverage(emb_path, tmp_path, capsys):
    import shutil

    data = write_text_domains(tmp_path / "data", names=TEXT_DOMAINS)
    assert run_cli(_weights(emb_path, tmp_path / "w", "--rule", "paper"), capsys)[0] == 0
    (tmp_path / "alone").mkdir()
    shutil.copy(tmp_path / "w" / "weights.json", tmp_path / "alone" / "weights.json")
    doc = json.loads((tmp_path / "alone" / "weights.json").read_text())
    code, out, err = run_cli(["train", "--data", data, "--weights", tmp_path / "alone" / "weights.json", "--preset",
                              "tiny", "--block-size", 16, "--steps", 1, "--out", tmp_path / "t", "--strict",
                              "--device", "cpu", "--quiet"], capsys)
    assert code == 2
    w = W.weights_from_scores([doc["leverage"][d] for d in DOMAINS], "pretrain")
    assert f"on this file's leverage scores it gives at most {float(w.max()):.3f}" in out and float(w.max()) < 0.9
