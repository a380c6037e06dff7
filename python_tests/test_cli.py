"""The ``chameleon`` command line, in-process through ``chameleon_ext.cli.main``: the method
end to end on a tiny generated dataset, the files it writes, and how it reports bad input
(exit status 2, one line on stderr naming the culprit, no traceback)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import chameleon_ext
from chameleon_ext import weights as W
from chameleon_ext.cli import main
from chameleon_ext.exports import parse_megatron_blend, parse_mixture_yaml
from chameleon_ext.model import GPT, GPTConfig, load_model, save_model

from .factories import write_text_domains as _write_domains
from .factories import ok_cli as _ok, run_cli as _run

DOMAINS = ["alpha", "digits", "dna"]
COMMON = ["--device", "cpu", "--quiet"]
EMBED = ["--n-windows", "4", "--window", "32"]
TRAIN = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--warmup", "1", "--ckpt-every", "0",
         "--eval-windows", "2"]
COMMANDS = ["run", "train-proxy", "embed", "weights", "train", "eval", "export", "export-model"]




def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _write_domains(root / "data")
    return root


@pytest.fixture(scope="module")
def proxy(work):
    out = work / "proxy"
    assert main(["train-proxy", "--data", str(work / "data"), "--out", str(out), "--steps", "3", *TRAIN, *COMMON]) == 0
    return str(out / "model.pt")


@pytest.fixture(scope="module")
def weights_dir(work, proxy):
    out = work / "weights"
    args = ["weights", "--data", str(work / "data"), "--proxy", proxy, "--mode", "pretrain", "--out", str(out),
            *EMBED, *COMMON]
    assert main(args) == 0
    return out


# --------------------------------------------------------------------------- end to end


def test_train_proxy_writes_a_loadable_model(proxy):
    model = load_model(proxy)
    assert model.config.vocab_size == 257 and model.config.block_size == 32 and model.config.n_layer == 2
    assert os.path.isfile(os.path.join(os.path.dirname(proxy), "metrics.jsonl"))


def test_weights_pretrain_writes_every_file(weights_dir, proxy):
    doc = _read_json(weights_dir / "weights.json")
    assert doc["method"] == "chameleon" and doc["version"] == chameleon_ext.__version__
    assert doc["format"] == "chameleon_ext.weights/2"
    # the library's default rule: lambda chosen from the spectrum (recorded with its effective dimension)
    default = W.RULE_DEFAULTS[W.DEFAULT_RULE]
    assert doc["mode"] == "pretrain" and doc["rule"] == W.DEFAULT_RULE
    assert doc["temperature"] == default["temperature"]["pretrain"] and doc["smoothing"] == default["smoothing"]
    sel = doc["lambda_selection"]
    assert sel["method"] == "auto" and sel["share"] == W.DEFAULT_SHARE and doc["lambda"] > 0
    assert sel["effective_dimension_share"] == pytest.approx(W.DEFAULT_SHARE, abs=1e-9)
    assert doc["normalize"] is True and "normalization" not in doc and "krls" not in doc
    assert doc["domains"] == DOMAINS
    w = doc["weights"]
    assert list(w) == DOMAINS and all(0 < v < 1 for v in w.values())
    assert math.isclose(math.fsum(w.values()), 1.0, abs_tol=1e-12)
    assert list(doc["leverage"]) == DOMAINS and math.isclose(math.fsum(doc["leverage"].values()), 1.0, abs_tol=1e-12)
    assert all(0 <= v < 1 for v in doc["leverage_raw"].values())
    # pretraining rule: a lower leverage score gets a higher weight
    order = sorted(DOMAINS, key=lambda d: doc["leverage"][d])
    assert [w[d] for d in order] == sorted(w.values(), reverse=True)
    p = doc["proxy"]
    assert p["path"] == os.path.abspath(proxy)
    assert p["sha256"] == load_model(proxy).content_hash and p["layer"] == 1 and p["n_layer"] == 2
    e = doc["embedding"]
    assert (e["n_windows"], e["window"], e["seed"], e["pooling"], e["layer"]) == (4, 32, 0, "masked", 1)
    assert e["counts"] == {d: 4 for d in DOMAINS} and e["embedded_now"] == DOMAINS

    # domain_embeddings.pt -> the same weights through the public API
    emb = torch.load(weights_dir / "domain_embeddings.pt", weights_only=True)
    assert emb["domains"] == DOMAINS
    assert emb["embeddings"].dim() == 2 and emb["embeddings"].shape[0] == 3
    again = chameleon_ext.weights_from_embeddings(emb["embeddings"], "pretrain")  # the library's defaults
    np.testing.assert_allclose(again.weights.numpy(), [w[d] for d in DOMAINS], rtol=0, atol=1e-12)

    # the exports parse back to the same weights
    with open(weights_dir / "megatron_data_path.txt", encoding="utf-8") as f:
        blend = parse_megatron_blend(f.read())
    with open(weights_dir / "mixture.yaml", encoding="utf-8") as f:
        mixture = parse_mixture_yaml(f.read())
    hf = _read_json(weights_dir / "hf_interleave_probabilities.json")
    for parsed in (blend, mixture, dict(zip(hf["domains"], hf["probabilities"]))):
        assert list(parsed) == DOMAINS
        np.testing.assert_allclose([parsed[d] for d in DOMAINS], [w[d] for d in DOMAINS], rtol=0, atol=1e-12)
    for png in ("weights.png", "affinity.png"):
        path = weights_dir / png
        assert path.is_file() and path.stat().st_size > 1000
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_train_eval_export(work, weights_dir, capsys):
    data, base = work / "data", work / "base"
    out = _ok(["train", "--data", data, "--weights", weights_dir / "weights.json", "--out", base, "--steps", "2",
               *TRAIN, *COMMON], capsys)
    assert "trained to step 2" in out
    model_path = base / "model.pt"
    assert load_model(str(model_path)).config.block_size == 32

    out = _ok(["eval", "--data", data, "--model", model_path, "--eval-windows", "2", "--out", work / "eval.json",
               *COMMON], capsys)
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(\S+)\s+([0-9.]+)$", line.strip())
        if m:
            rows[m.group(1)] = float(m.group(2))
    assert set(rows) == set(DOMAINS) | {"average"}, out
    assert all(1.0 < v < 1000.0 for v in rows.values())
    ev = _read_json(work / "eval.json")
    assert set(DOMAINS) <= set(ev) and math.isclose(ev["average"]["mean_ppl"], rows["average"], abs_tol=1e-3)

    out = _ok(["export", "--weights", weights_dir / "weights.json", "--out", work / "exports",
               "--prefix", "alpha=/data/alpha_text_document"], capsys)
    assert "megatron" in out
    with open(work / "exports" / "megatron_data_path.txt", encoding="utf-8") as f:
        blend = parse_megatron_blend(f.read())
    weights = _read_json(weights_dir / "weights.json")["weights"]
    assert blend == {"/data/alpha_text_document": weights["alpha"], "digits": weights["digits"],
                     "dna": weights["dna"]}
    assert _read_json(work / "exports" / "hf_interleave_probabilities.json")["domains"] == DOMAINS


def test_weights_finetune_uses_the_cache(work, weights_dir, proxy, capsys):
    out_dir = work / "weights_ft"
    _ok(["weights", "--data", work / "data", "--proxy", proxy, "--mode", "finetune", "--out", out_dir,
         *EMBED, *COMMON], capsys)
    doc = _read_json(out_dir / "weights.json")
    assert doc["mode"] == "finetune" and doc["temperature"] == W.RULE_DEFAULTS[W.DEFAULT_RULE]["temperature"]["finetune"]
    assert doc["embedding"]["embedded_now"] == []  # embedded by the pretrain run already
    assert doc["leverage"] == _read_json(weights_dir / "weights.json")["leverage"]
    order = sorted(DOMAINS, key=lambda d: doc["leverage"][d])  # finetuning: higher leverage, higher weight
    assert [doc["weights"][d] for d in order] == sorted(doc["weights"].values())


def test_weights_transfer_embeds_only_the_new_domain(work, weights_dir, proxy, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)  # with its caches (tokens and embeddings)
    _write_domains(data, ["zeta"])
    out = _ok(["weights", "--data", data, "--proxy", proxy, "--mode", "transfer", "--out", tmp_path / "w",
               *EMBED, *COMMON], capsys)
    assert "zeta" in out
    doc = _read_json(tmp_path / "w" / "weights.json")
    assert doc["mode"] == "transfer" and doc["temperature"] == W.RULE_DEFAULTS[W.DEFAULT_RULE]["temperature"]["pretrain"]
    assert doc["domains"] == DOMAINS + ["zeta"]
    assert doc["embedding"]["embedded_now"] == ["zeta"]
    assert math.isclose(math.fsum(doc["weights"].values()), 1.0, abs_tol=1e-12)
    old = torch.load(weights_dir / "domain_embeddings.pt", weights_only=True)["embeddings"]
    new = torch.load(tmp_path / "w" / "domain_embeddings.pt", weights_only=True)["embeddings"]
    assert torch.equal(new[:3], old)  # the cached domains are the same vectors


def test_weights_from_an_embeddings_file_needs_no_data_or_proxy(weights_dir, tmp_path, capsys):
    out_dir = tmp_path / "from_emb"
    _ok(["weights", "--embeddings", weights_dir / "domain_embeddings.pt", "--out", out_dir, "--no-plots", *COMMON],
        capsys)
    doc = _read_json(out_dir / "weights.json")
    ref = _read_json(weights_dir / "weights.json")
    assert doc["domains"] == DOMAINS
    np.testing.assert_allclose([doc["weights"][d] for d in DOMAINS], [ref["weights"][d] for d in DOMAINS],
                               rtol=0, atol=1e-12)
    assert doc["proxy"] == {"embeddings": os.path.abspath(weights_dir / "domain_embeddings.pt")}
    assert not (out_dir / "weights.png").exists()


def test_embed_command_writes_the_embeddings(work, proxy, weights_dir, capsys):
    out = _ok(["embed", "--data", work / "data", "--proxy", proxy, "--out", work / "emb", *EMBED, *COMMON], capsys)
    assert "embedded 0 domain(s), 3 from the cache" in out
    emb = torch.load(work / "emb" / "domain_embeddings.pt", weights_only=True)
    ref = torch.load(weights_dir / "domain_embeddings.pt", weights_only=True)
    assert emb["domains"] == DOMAINS and torch.equal(emb["embeddings"], ref["embeddings"])


def test_run_end_to_end(tmp_path, capsys):
    data = _write_domains(tmp_path / "data")
    out_dir = tmp_path / "run"
    out = _ok(["run", "--data", data, "--out", out_dir, "--preset", "tiny", "--proxy-steps", "3", "--steps", "3",
               "--block-size", "32", "--n-windows", "4", "--window", "32", "--eval-windows", "2",
               "--batch-size", "4", *COMMON], capsys)
    assert "validation perplexity" in out
    res = _read_json(out_dir / "results.json")
    assert res["domains"] == DOMAINS
    assert math.isclose(math.fsum(res["weights"].values()), 1.0, abs_tol=1e-12)
    table = res["perplexity"]
    assert set(table) == {"uniform", "chameleon"}
    for row in table.values():
        assert set(row) == set(DOMAINS) | {"average"}
        assert all(math.isfinite(v) and v > 1.0 for v in row.values())
        assert math.isclose(row["average"], sum(row[d] for d in DOMAINS) / 3, rel_tol=1e-9)
    assert os.path.isfile(res["weights_file"]) and (out_dir / "perplexity.png").is_file()
    assert _read_json(res["weights_file"])["weights"] == res["weights"]


# --------------------------------------------------------------------------- edge cases


def test_one_domain_gets_weight_one_with_a_note(proxy, tmp_path, capsys):
    data = _write_domains(tmp_path / "one", ["alpha"])
    out = _ok(["weights", "--data", data, "--proxy", proxy, "--out", tmp_path / "w", "--no-plots", *EMBED, *COMMON],
              capsys)
    assert "note: only one domain: its weight is 1.0" in out  # a line of the command's, not a raw UserWarning
    assert _read_json(tmp_path / "w" / "weights.json")["weights"] == {"alpha": 1.0}


@pytest.mark.parametrize("names", [["alpha", "copy", "dna"], ["alpha", "copy"]])
def test_duplicate_domains_get_finite_weights(proxy, tmp_path, capsys, names):
    root = tmp_path / "dup"
    _write_domains(root, [n for n in names if n != "copy"])
    shutil.copytree(root / "alpha", root / "copy")  # identical content under another name
    _ok(["weights", "--data", root, "--proxy", proxy, "--out", tmp_path / "w", "--no-plots", *EMBED, *COMMON], capsys)
    doc = _read_json(tmp_path / "w" / "weights.json")
    assert doc["domains"] == sorted(names)
    values = list(doc["weights"].values())
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert math.isclose(math.fsum(values), 1.0, abs_tol=1e-12)
    assert all(math.isfinite(v) for v in doc["leverage"].values())


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad(work, proxy, weights_dir, tmp_path_factory):
    """Broken datasets and files, by name."""
    root = tmp_path_factory.mktemp("bad")
    paths = {"missing": root / "no_such_folder", "empty": root / "empty"}
    os.makedirs(paths["empty"])

    paths["empty_domain"] = root / "empty_domain"
    _write_domains(paths["empty_domain"], ["alpha"])
    os.makedirs(paths["empty_domain"] / "hollow")

    paths["empty_file_domain"] = root / "empty_file_domain"
    _write_domains(paths["empty_file_domain"], ["alpha"])
    os.makedirs(paths["empty_file_domain"] / "blank")
    (paths["empty_file_domain"] / "blank" / "nothing.txt").write_text("", encoding="utf-8")

    paths["short"] = root / "short"
    _write_domains(paths["short"], ["alpha"])
    os.makedirs(paths["short"] / "stub")
    (paths["short"] / "stub" / "s.txt").write_text("too short", encoding="utf-8")

    paths["non_utf8"] = root / "non_utf8"
    _write_domains(paths["non_utf8"], ["alpha"])
    os.makedirs(paths["non_utf8"] / "latin")
    (paths["non_utf8"] / "latin" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1") * 20)

    paths["big_vocab"] = root / "big_vocab"  # pre-tokenised with a GPT-2-sized vocabulary
    os.makedirs(paths["big_vocab"] / "gpt2tokens")
    np.random.default_rng(0).integers(0, 1000, 4000).astype(np.uint16).tofile(
        paths["big_vocab"] / "gpt2tokens" / "train.bin")
    (paths["big_vocab"] / "gpt2tokens" / "meta.json").write_text('{"vocab_size": 50257, "dtype": "uint16"}')

    paths["small_vocab_model"] = root / "small_vocab.pt"
    save_model(paths["small_vocab_model"], GPT(GPTConfig.preset("tiny", 100, 32)))

    paths["other_data"] = root / "other_data"
    _write_domains(paths["other_data"], ["alpha", "zeta"])
    paths.update(data=work / "data", proxy=proxy, weights=weights_dir / "weights.json",
                 embeddings=weights_dir / "domain_embeddings.pt", out=root / "out")
    return {k: str(v) for k, v in paths.items()}


# (argv with {placeholders}, what the one error line must contain)
BAD_INPUTS = {
    "missing_data_folder": ("weights --data {missing} --proxy {proxy}", ["data folder", "no_such_folder",
                                                                            "does not exist"]),
    "empty_data_folder": ("train-proxy --data {empty} --steps 1", ["data folder", "empty", "no domain subfolders"]),
    "empty_domain": ("weights --data {empty_domain} --proxy {proxy}", ["domain 'hollow' is empty"]),
    "empty_file_domain": ("train --data {empty_file_domain} --steps 1", ["domain 'blank' is empty"]),
    "domain_shorter_than_window": ("weights --data {short} --proxy {proxy} --window 32",
                                   ["domain 'stub' is shorter than one window"]),
    "domain_shorter_than_block": ("train --data {short} --steps 1 --block-size 32",
                                  ["domain 'stub' is shorter than one window"]),
    "non_utf8_file": ("weights --data {non_utf8} --proxy {proxy}", ["domain 'latin'", "latin1.txt", "UTF-8"]),
    "bin_vocab_vs_proxy": ("weights --data {big_vocab} --proxy {proxy}",
                           ["vocabulary mismatch", "'gpt2tokens'", "257"]),
    "bin_vocab_vs_eval_model": ("eval --data {big_vocab} --model {proxy}", ["vocabulary mismatch", "'gpt2tokens'"]),
    "bin_vocab_vs_init_from": ("train --data {big_vocab} --init-from {proxy} --steps 1",
                               ["vocabulary mismatch", "'gpt2tokens'"]),
    "small_vocab_proxy": ("weights --data {data} --proxy {small_vocab_model}", ["vocabulary mismatch", "100 ids"]),
    "small_vocab_eval": ("eval --data {data} --model {small_vocab_model}", ["vocabulary mismatch", "100 ids"]),
    "weights_domains_mismatch": ("train --data {other_data} --weights {weights} --steps 1",
                                 ["and the data: the domains do not match", "weights.json", "zeta"]),
    "missing_proxy": ("weights --data {data} --proxy {missing}/model.pt", ["model path", "model.pt", "does not exist"]),
    "missing_eval_model": ("eval --data {data} --model {missing}/model.pt", ["model.pt", "does not exist"]),
    "missing_init_from": ("train --data {data} --init-from {missing}/ckpt.pt --steps 1", ["ckpt.pt"]),
    "not_a_checkpoint": ("eval --data {data} --model {weights}", ["weights.json", "cannot be read"]),
    "not_an_embeddings_file": ("weights --embeddings {proxy}", ["embeddings file", "model.pt"]),
    "missing_weights_file": ("export --weights {missing}/weights.json", ["weights.json", "does not exist"]),
    "prefix_without_equals": ("export --weights {weights} --prefix alpha", ["--prefix", "DOMAIN=PATH", "'alpha'"]),
    "prefix_unknown_domain": ("export --weights {weights} --prefix nodomain=/x", ["--prefix", "nodomain"]),
    "window_beyond_proxy_block": ("weights --data {data} --proxy {proxy} --window 64",
                                  ["window", "64", "block_size 32"]),
    "layer_beyond_proxy": ("weights --data {data} --proxy {proxy} --layer 7", ["layer", "7"]),
    "zero_windows": ("weights --data {data} --proxy {proxy} --n-windows 0", ["n_windows", "0"]),
    "negative_lambda": ("weights --embeddings {embeddings} --lam -1", ["--lam", "-1"]),
    "zero_temperature": ("run --data {data} --temperature 0", ["--temperature", "0"]),
    "weights_without_proxy": ("weights --data {data}", ["--proxy"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_clear_line(bad, capsys, case):
    template, needles = BAD_INPUTS[case]
    argv = template.format(**bad).split()
    if argv[0] in ("weights", "embed", "run"):
        argv += ["--n-windows", "4"] if "--n-windows" not in argv else []
    if argv[0] != "export":
        argv += ["--device", "cpu"]
    argv += ["--out", os.path.join(bad["out"], case)] + (["--quiet"] if argv[0] != "export" else [])
    code, out, err = _run(argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"chameleon {argv[0]}: error: ")
    assert "Traceback" not in err and "Traceback" not in out
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_entry_point_reports_bad_input_as_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "chameleon_ext", "eval", "--data", str(tmp_path / "nope"),
                           "--model", str(tmp_path / "m.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    # the model is read first: its recorded tokenizer decides how the data is tokenised
    assert proc.stderr.strip().splitlines() == [
        f"chameleon eval: error: model path {str(tmp_path / 'm.pt')!r} does not exist"]


# --------------------------------------------------------------------------- help


def test_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "chameleon_ext", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    for cmd in COMMANDS:
        assert cmd in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_defaults_seed_and_device(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert out.startswith(f"usage: chameleon {command}")
    if command in ("export", "export-model"):  # file work: no seed, device or progress
        assert "--seed" not in out and "--device" not in out and "--quiet" not in out
        return
    assert "--seed" in out and "--device" in out
    assert "(default: 0)" in out and "(default: auto)" in out  # --seed, --device
    if command in ("run", "train-proxy", "train"):
        assert "--steps" in out and "--preset" in out
    if command in ("run", "weights", "embed"):
        assert "--n-windows" in out and "--window" in out and "--layer" in out
    if command in ("run", "weights"):
        assert "(default: pretrain)" in out and f"(default: {W.DEFAULT_RULE})" in out


# --------------------------------------------------------------------------- defaults


def test_parser_defaults_and_choices_are_the_library_s():
    from chameleon_ext.cli import build_parser
    from chameleon_ext.embed import POOLINGS, EmbedConfig
    from chameleon_ext.mixture import PIPELINE_MODES as MODES
    from chameleon_ext.pipeline import DEFAULT_BLOCK_SIZE, DEFAULT_PRESET
    from chameleon_ext.trainer import TrainConfig
    from chameleon_ext.weights import DEFAULT_RULE

    lib = TrainConfig()
    assert lib.min_lr == lib.lr / 10 and TrainConfig(lr=1e-3).min_lr == 1e-3 / 10  # lr / 10 lives here
    parser = build_parser()
    for command in ("train", "train-proxy", "run"):
        a = parser.parse_args([command])
        assert (a.lr, a.warmup, a.batch_size, a.grad_accum, a.eval_every, a.eval_windows, a.ckpt_every, a.seed) == (
            lib.lr, lib.warmup_steps, lib.batch_size, lib.grad_accum, lib.eval_every, lib.eval_windows,
            lib.ckpt_every, lib.seed)
        assert (a.preset, a.block_size) == (DEFAULT_PRESET, DEFAULT_BLOCK_SIZE)
    assert parser.parse_args(["eval", "--model", "m.pt"]).eval_windows == lib.eval_windows
    emb = EmbedConfig()
    w = parser.parse_args(["weights"])
    # lam None: the rule's default (weights.RULE_DEFAULTS), resolved by the library
    assert (w.lam, w.rule, w.share, w.smoothing, w.mode, w.pooling, w.embed_batch_size, w.layer) == (
        None, DEFAULT_RULE, None, None, MODES[0], emb.pooling, emb.batch_size, emb.layer)
    sub = next(a for a in parser._actions if a.dest == "command").choices
    choices = {a.dest: a.choices for a in sub["weights"]._actions if a.choices}
    assert choices["mode"] == list(MODES) and choices["pooling"] == list(POOLINGS)
    preset = next(a for a in sub["train"]._actions if a.dest == "preset")
    assert preset.choices == GPTConfig.preset_names()


# The options generated from a config dataclass (flag -> (config, field)), per command: the
# defaults of these live in the dataclass alone (cli.options.config_option).
_COMMON = {"--seed": ("TrainConfig", "seed"), "--device": ("TrainConfig", "device")}
_EMBED = {"--layer": ("EmbedConfig", "layer"), "--pooling": ("EmbedConfig", "pooling"),
          "--embed-batch-size": ("EmbedConfig", "batch_size"), "--precision": ("EmbedConfig", "precision")}
_TRAINING = {"--steps": ("TrainConfig", "steps"), "--warmup": ("TrainConfig", "warmup_steps"),
             **{"--" + n.replace("_", "-"): ("TrainConfig", n) for n in (
                 "batch_size", "grad_accum", "lr", "eval_every", "eval_windows", "ckpt_every", "max_bad_steps")}}
# compare: its own fields, and the training options with the comparison's TrainConfig defaults
_COMPARE = {**{"--" + n.replace("_", "-"): ("CompareConfig", n) for n in (
    "mixtures", "seeds", "proxy_steps", "regmix_proxies", "regmix_steps", "test_fraction", "finetune_steps")},
    **{flag: ("compare_train_config", name) for flag, (_, name) in {**_COMMON, **_TRAINING}.items()
       if flag != "--eval-every"},
    "--block-size": ("compare_train_config", "block_size"), "--embed-windows": ("compare_embed_config", "n_windows")}
GENERATED = {
    "run": {**_COMMON, **_EMBED, **{k: v for k, v in _TRAINING.items() if k != "--steps"}},  # run: its own steps
    "train-proxy": {**_COMMON, **_TRAINING}, "train": {**_COMMON, **_TRAINING},
    "embed": {**_COMMON, **_EMBED}, "weights": {**_COMMON, **_EMBED}, "sweep": {**_COMMON, **_EMBED},
    "eval": {**_COMMON, "--eval-windows": ("TrainConfig", "eval_windows")}, "compare": _COMPARE,
}


def test_generated_options_default_to_the_dataclass_fields():
    from chameleon_ext.cli import build_parser
    from chameleon_ext.cli.method import RUN_STEPS

    sub = build_parser()._subparsers._group_actions[0].choices
    found = {}
    for command, p in sub.items():
        for action in p._actions:
            source = getattr(action, "config_field", None)
            if source is None:
                continue
            config, name = source
            value = getattr(config(), name)  # an instance's value, not the helper's reading of the fields
            expected = ",".join(value) if isinstance(value, list) else value
            assert action.default == expected and type(action.default) is type(expected), (command, name)
            if isinstance(expected, (int, float)) and not isinstance(expected, bool):
                assert action.type(str(expected)) == expected, (command, name)  # the option parses its default
            found.setdefault(command, {})[action.option_strings[0]] = (config.__name__, name)
    assert found == GENERATED
    steps = next(a for a in sub["run"]._actions if a.dest == "steps")
    assert steps.config_field is None and steps.default == RUN_STEPS == 300  # set, not read from TrainConfig
    # a few by hand, so a dataclass edit that moves them shows up here
    parser = build_parser()
    c = parser.parse_args(["compare"])
    assert (c.seeds, c.preset, c.block_size, c.steps, c.warmup, c.test_fraction) == (3, "tiny", 64, 60, 10, 0.1)
    t = parser.parse_args(["train"])
    assert (t.steps, t.batch_size, t.lr, t.warmup, t.device, t.seed) == (1000, 16, 3e-3, 30, "auto", 0)


def test_config_option_reads_a_planted_dataclass():
    import argparse
    import dataclasses

    from chameleon_ext.cli.options import FIELD_HELP, config_option, field_default

    @dataclasses.dataclass
    class Planted:
        count: int = 7
        rate: float = 0.25
        names: list = dataclasses.field(default_factory=lambda: ["a", "b"])

    assert (field_default(Planted, "count"), field_default(Planted, "rate"), field_default(Planted, "names")) == (
        7, 0.25, "a,b")
    FIELD_HELP["Planted"] = {"count": "how many", "rate": "how fast", "names": "which"}
    try:
        p = argparse.ArgumentParser()
        a = config_option(p, Planted, "count")
        b = config_option(p, Planted, "rate", "--speed", default=0.5)
        c = config_option(p, Planted, "names", help="given")
    finally:
        del FIELD_HELP["Planted"]
    assert (a.option_strings, a.default, a.type, a.help, a.config_field) == (["--count"], 7, int, "how many",
                                                                              (Planted, "count"))
    assert (b.option_strings, b.default, b.type, b.config_field) == (["--speed"], 0.5, float, None)  # overridden
    assert (c.default, c.type, c.help) == ("a,b", None, "given")
    assert vars(p.parse_args(["--count", "3", "--speed", "2"])) == {"count": 3, "speed": 2.0, "names": "a,b"}


def test_unknown_preset_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "huge"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chameleon train: error: argument --preset: invalid choice: 'huge'")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_states_each_default_once(command, capsys):
    import re

    from chameleon_ext.cli import build_parser

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out and "(default: False)" not in out
    # split the help into one chunk per option; none may state its default twice
    for chunk in re.split(r"\s(?=--[a-z])", out):
        assert len(re.findall(r"\(default[ :]", chunk)) <= 1, chunk
    # every option whose default means something shows it
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS==") and action.help:
            assert "default" in sub.formatter_class("x")._get_help_string(action), action.option_strings
