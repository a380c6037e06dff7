"""Every export of a weights.json carries the weights a trainer can follow: with a token budget,
the budget's achievable weights (never the requested ones), without one the weights. Each file
is parsed back with plain json/yaml and compared with an independent float64 water-filling
and with a hand-computed case."""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest
import yaml

from chameleon_ext.budget import plan_token_budget
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.exports import FILES, load_weights, trainer_weights, write_exports
from chameleon_ext.pipeline import read_weights

# Hand-computed: N = 600 tokens, cap 1 epoch. news asks 0.3 * 600 = 180 > its 100 tokens, so
# it is pinned at 100 = 1/6 of the budget; the other 500 go to web : code = 5 : 2.
HAND_WEIGHTS = {"web": 0.5, "news": 0.3, "code": 0.2}
HAND_COUNTS = {"web": 1000, "news": 100, "code": 1000}
HAND_ACHIEVABLE = {"web": 25 / 42, "news": 1 / 6, "code": 10 / 42}


def reference_achievable(weights, counts, budget, max_epochs):
    """Float64 water-filling by sorting the domains on cap / weight (a different algorithm from
    chameleon_ext.budget's repeated redistribution): the domains whose cap is smallest relative
    to their share are pinned first, while the common scale would exceed their cap."""
    names = list(weights)
    w = np.array([weights[d] for d in names], dtype=np.float64)
    w = w / w.sum()
    cap = np.array([max_epochs * counts[d] for d in names], dtype=np.float64)
    order = np.argsort(cap / np.where(w > 0, w, np.inf))
    targets = np.zeros_like(w)
    remaining, free = float(budget), float(w.sum())
    for i in order:
        if w[i] == 0:
            continue
        if w[i] * remaining / free > cap[i]:  # pinned at its cap
            targets[i] = cap[i]
            remaining -= cap[i]
            free -= w[i]
        else:
            break
    pinned = targets > 0
    targets[~pinned] = w[~pinned] * remaining / free
    return dict(zip(names, (targets / budget).tolist()))


def weights_doc(weights, budget=None):
    doc = {"format": "chameleon_ext.weights/2", "mode": "pretrain", "lambda": 10.0, "temperature": 5.0,
           "normalize": True, "domains": list(weights), "weights": dict(weights)}
    if budget is not None:
        doc["budget"] = json.loads(json.dumps(budget.as_dict()))  # as read back from weights.json
    return doc


def write_idx(prefix, lengths):
    """A minimal Megatron .idx: magic, version, dtype code, sequence and document counts, lengths."""
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(lengths), len(lengths) + 1))
        f.write(np.asarray(lengths, dtype="<i4").tobytes())


def parse_every_file(out):
    """{format: {domain-or-path: weight}} from every file, read back with plain json / yaml."""
    read = lambda name: open(os.path.join(out, FILES[name]), encoding="utf-8").read()  # noqa: E731
    got = {}
    tokens = read("megatron").split()
    got["megatron"] = dict(zip(tokens[1::2], map(float, tokens[0::2])))
    hf = json.loads(read("hf_interleave"))
    got["hf_interleave"] = dict(zip(hf["domains"], hf["probabilities"]))
    got["mixture_yaml"] = {e["name"]: e["weight"] for e in yaml.safe_load(read("mixture_yaml"))["mixture"]}
    train = json.loads(read("megatron-per-split"))["train"]
    got["megatron-per-split"] = dict(zip(train[1::2], map(float, train[0::2])))
    nemo = json.loads(read("nemo"))
    got["nemo"] = dict(zip(nemo[1::2], map(float, nemo[0::2])))
    got["olmo-core"] = {s["source_name"]: s["target_ratio"] for s in yaml.safe_load(read("olmo-core"))["sources"]}
    got["olmo-core-mixing"] = {s["label"]: s["ratio"] for s in yaml.safe_load(read("olmo-core-mixing"))["specs"]}
    nano = yaml.safe_load(read("nanotron"))["dataset"]
    got["nanotron"] = dict(zip(nano["dataset_folder"], nano["dataset_weights"]))
    got["mosaic"] = {d: s["proportion"] for d, s in yaml.safe_load(read("mosaic"))["streams"].items()}
    titan = json.loads(read("torchtitan"))
    got["torchtitan"] = {s["dataset"]: s["weight"] for s in titan["sources"]}
    got["torchtitan-main"] = {s["name"]: s["weight"] for s in titan["datasets"]}
    return got


def check_all(out, expected, tol):
    got = parse_every_file(out)
    assert set(got) == set(FILES) | {"torchtitan-main"}
    for fmt, weights in got.items():
        positive_only = fmt in ("torchtitan-main", "olmo-core-mixing")  # they refuse weights <= 0
        want = {d: w for d, w in expected.items() if w > 0 or not positive_only}
        assert list(weights) == list(want), fmt
        for d in want:
            assert weights[d] == pytest.approx(want[d], rel=tol, abs=tol), (fmt, d)
    return got


def test_budget_every_file_carries_the_hand_computed_achievable_weights(tmp_path):
    plan = plan_token_budget(HAND_WEIGHTS, HAND_COUNTS, token_budget=600, max_epochs=1)
    assert plan.capped_domains == ["news"]
    write_exports(weights_doc(HAND_WEIGHTS, plan), tmp_path)
    got = check_all(tmp_path, HAND_ACHIEVABLE, 1e-12)
    # The requested 0.3 reaches no trainer: that would read news 1.8 times under a 1-epoch cap.
    assert all(weights["news"] != pytest.approx(0.3) for weights in got.values())
    text = (tmp_path / "mixture.yaml").read_text()
    assert yaml.safe_load(text)["chameleon"]["token_budget"] == 600


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [1, 10**12])  # tiny and huge corpora
def test_budget_every_file_matches_a_float64_reference(tmp_path, seed, scale):
    rng = np.random.default_rng(seed)
    k = 6
    raw = rng.dirichlet(np.full(k, 0.5))
    names = [f"d{i}" for i in range(k)]
    weights = dict(zip(names, (raw / raw.sum()).tolist()))
    counts = {d: int(c) * scale for d, c in zip(names, rng.integers(50, 2000, k))}
    max_epochs = float(rng.choice([0.5, 1.0, 2.0]))
    budget = int(0.6 * max_epochs * sum(counts.values()))
    plan = plan_token_budget(weights, counts, token_budget=budget, max_epochs=max_epochs)
    expected = reference_achievable(weights, counts, budget, max_epochs)
    write_exports(weights_doc(weights, plan), tmp_path)
    check_all(tmp_path, expected, 1e-9)


def test_no_budget_every_file_carries_the_weights_bit_for_bit(tmp_path):
    weights = {"web": 0.1 + 0.2, "code": 1 / 3, "books": 1 - (0.1 + 0.2) - 1 / 3}
    write_exports(weights_doc(weights), tmp_path)
    got = check_all(tmp_path, weights, 1e-15)
    for fmt, values in got.items():
        if fmt != "hf_interleave":  # renormalised so the list sums to exactly 1.0
            assert values == weights, fmt


def test_train_reads_the_achievable_weights(tmp_path):
    plan = plan_token_budget(HAND_WEIGHTS, HAND_COUNTS, token_budget=600, max_epochs=1)
    path = tmp_path / "weights.json"
    path.write_text(json.dumps(weights_doc(HAND_WEIGHTS, plan)))
    got = read_weights(str(path), ["code", "news", "web"])  # chameleon train --weights FILE
    assert got == pytest.approx(HAND_ACHIEVABLE, rel=1e-12)
    path.write_text(json.dumps(weights_doc(HAND_WEIGHTS)))
    assert read_weights(str(path)) == HAND_WEIGHTS


def test_a_budget_planned_for_other_weights_is_refused(tmp_path):
    plan = plan_token_budget({"web": 0.6, "news": 0.2, "code": 0.2}, HAND_COUNTS, token_budget=600, max_epochs=1)
    doc = weights_doc(HAND_WEIGHTS, plan)
    with pytest.raises(ChameleonUserError, match="budget was planned for other weights .*'web'"):
        load_weights(doc)
    with pytest.raises(ChameleonUserError, match="budget was planned for other weights"):
        write_exports(doc, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    doc = weights_doc(HAND_WEIGHTS, plan_token_budget(HAND_WEIGHTS, HAND_COUNTS, 600, 1))
    doc["budget"]["achievable_weights"].pop("code")
    with pytest.raises(ChameleonUserError, match="budget achievable_weights: the domains do not match"):
        trainer_weights({"weights": HAND_WEIGHTS, "budget": doc["budget"]})


def test_several_prefixes_per_domain_split_megatron_weights_by_tokens(tmp_path):
    write_idx(str(tmp_path / "web_a"), [100, 200])  # 300 tokens
    write_idx(str(tmp_path / "web_b"), [50, 50])  # 100 tokens
    prefixes = {"web": [str(tmp_path / "web_a"), str(tmp_path / "web_b")], "news": "/d/news", "code": "/d/code"}
    plan = plan_token_budget(HAND_WEIGHTS, HAND_COUNTS, token_budget=600, max_epochs=1)
    write_exports(weights_doc(HAND_WEIGHTS, plan), tmp_path / "out",
                  formats=["megatron", "megatron-per-split", "nemo", "olmo-core"], prefixes=prefixes)
    tokens = (tmp_path / "out" / "megatron_data_path.txt").read_text().split()
    blend = dict(zip(tokens[1::2], map(float, tokens[0::2])))
    assert blend[prefixes["web"][0]] == pytest.approx(HAND_ACHIEVABLE["web"] * 0.75, rel=1e-12)
    assert blend[prefixes["web"][1]] == pytest.approx(HAND_ACHIEVABLE["web"] * 0.25, rel=1e-12)
    assert math.fsum(blend.values()) == pytest.approx(1.0, abs=1e-12)
    olmo = yaml.safe_load((tmp_path / "out" / "olmo_source_mixture.yaml").read_text())["sources"]
    assert olmo[0]["paths"] == prefixes["web"] and olmo[0]["target_ratio"] == pytest.approx(25 / 42, rel=1e-12)
    with pytest.raises(ChameleonUserError, match="nanotron: domain 'web' has 2 paths"):
        write_exports(weights_doc(HAND_WEIGHTS), tmp_path / "o2", formats=["nanotron"], prefixes=prefixes)
    with pytest.raises(ChameleonUserError, match=r"cannot be read"):
        write_exports(weights_doc(HAND_WEIGHTS), tmp_path / "o3", formats=["megatron"],
                      prefixes={"web": ["/nonexistent/a", "/nonexistent/b"]})


@pytest.mark.parametrize("max_epochs, factor", [(2.0, 2.0), (1.0, 1.0), (0.5, 1.0)])
def test_olmo_mixing_specs_carry_ratio_and_repetition_factor(tmp_path, max_epochs, factor):
    weights = {"web": 0.5, "news": 0.3, "code": 0.2, "empty": 0.0}
    counts = {"web": 1000, "news": 100, "code": 1000, "empty": 10}
    plan = plan_token_budget(weights, counts, token_budget=int(600 * max_epochs), max_epochs=max_epochs)
    write_exports(weights_doc(weights, plan), tmp_path, formats=["olmo-core-mixing", "olmo-core"])
    doc = yaml.safe_load((tmp_path / "olmo_mixing_specs.yaml").read_text())
    assert doc["left_out"] == ["empty"]  # OLMo-core's specs refuse a ratio <= 0
    expected = reference_achievable(weights, counts, int(600 * max_epochs), max_epochs)
    assert [s["label"] for s in doc["specs"]] == ["web", "news", "code"]
    for s in doc["specs"]:
        assert s["ratio"] == pytest.approx(expected[s["label"]], rel=1e-12)
        assert s["max_repetition_factor"] == factor and s["paths"] == [s["label"]]
    sources = yaml.safe_load((tmp_path / "olmo_source_mixture.yaml").read_text())["sources"]
    assert [s["source_name"] for s in sources] == list(weights)  # SourceMixtureConfig takes 0
    if max_epochs < 1:  # OLMo-core needs max_repetition_ratio >= 1: the cap is the fraction
        assert all(s["max_repetition_ratio"] == 1.0 and s["max_source_fraction"] == 0.5 for s in sources)


def test_cli_train_samples_with_the_achievable_weights(tmp_path, capsys, monkeypatch):
    """``chameleon train --weights weights.json`` hands the trainer the budget's achievable
    weights (the trainer itself is replaced: only what reaches it is checked)."""
    import chameleon_ext.trainer as trainer

    from .factories import run_cli, write_text_domains

    data = write_text_domains(tmp_path / "data", names=("alpha", "digits", "dna"))
    weights = {"alpha": 0.5, "digits": 0.3, "dna": 0.2}
    counts = {"alpha": 1000, "digits": 100, "dna": 1000}
    plan = plan_token_budget(weights, counts, token_budget=600, max_epochs=1)
    path = tmp_path / "weights.json"
    path.write_text(json.dumps(weights_doc(weights, plan)))
    seen = {}

    def fake_train(model, dataset, mixture, cfg, **kwargs):
        seen["weights"] = mixture
        return {"complete": True, "notices": ["done"]}

    monkeypatch.setattr(trainer, "train", fake_train)
    code, _, err = run_cli(["train", "--data", data, "--weights", path, "--out", tmp_path / "run", "--steps", 1,
                            "--preset", "tiny", "--block-size", 32, "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    assert seen["weights"] == pytest.approx({"alpha": 25 / 42, "digits": 1 / 6, "dna": 10 / 42}, rel=1e-12)


def test_cli_export_keeps_every_repeated_prefix(tmp_path, capsys):
    from .factories import run_cli

    path = tmp_path / "weights.json"
    path.write_text(json.dumps(weights_doc(HAND_WEIGHTS)))
    code, _, err = run_cli(["export", "--weights", path, "--out", tmp_path / "out", "--format", "olmo-core",
                            "--prefix", "web=/d/web/a*.npy", "--prefix", "web=/d/web/b*.npy", "--prefix", "news=/d/n"],
                           capsys)
    assert code == 0, err
    sources = yaml.safe_load((tmp_path / "out" / "olmo_source_mixture.yaml").read_text())["sources"]
    assert [s["paths"] for s in sources] == [["/d/web/a*.npy", "/d/web/b*.npy"], ["/d/n"], ["code"]]
    code, _, err = run_cli(["export", "--weights", path, "--out", tmp_path / "o2", "--prefix", "web=/a",
                            "--prefix", "web=/a"], capsys)
    assert code == 2 and "--prefix: web=/a is given twice" in err
