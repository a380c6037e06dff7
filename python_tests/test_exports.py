"""Exports of the domain weights: weights.json validation, Megatron blend, HF probabilities,
YAML mixture and the files written by write_exports."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chameleon_ext import exports as E
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.weights import weights_from_embeddings

SLIMPAJAMA = ["arxiv", "book", "c4", "commoncrawl", "github", "stackexchange", "wikipedia"]
ONE_ULP_ABOVE_1 = 2.0**-52

# Positive weights of very different magnitudes, as a sharp softmax produces.
positive_weights = st.lists(
    st.floats(min_value=1e-30, max_value=1e3, allow_nan=False, allow_infinity=False), min_size=1, max_size=40
)


def weights_doc(k=7, seed=0, mode="pretrain") -> dict:
    """A weights.json as the weights module writes it, from random domain embeddings."""
    names = SLIMPAJAMA if k == 7 else [f"domain{i}" for i in range(k)]
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k = 1 warns that its weight is 1.0
        result = weights_from_embeddings(torch.randn(k, 16, generator=g, dtype=torch.float64), mode=mode, domains=names,
                                         rule="paper")
    return {"format": E.WEIGHTS_FORMAT, "method": "chameleon", "version": "0.1.0", **result.as_dict(),
            "proxy": {}, "embedding": {}}


def write_json(path, doc) -> str:
    with open(path, "w") as f:
        json.dump(doc, f)
    return str(path)


def named(values) -> dict:
    return {f"d{i}": float(v) for i, v in enumerate(values)}


# --------------------------------------------------------------------------------------------
# load_weights
# --------------------------------------------------------------------------------------------


def test_load_weights_from_file_and_dict(tmp_path):
    doc = weights_doc()
    loaded = E.load_weights(write_json(tmp_path / "weights.json", doc))
    assert loaded["domains"] == SLIMPAJAMA
    assert list(loaded["weights"]) == SLIMPAJAMA
    assert loaded["weights"] == doc["weights"]
    assert loaded["mode"] == "pretrain" and loaded["leverage"] == doc["leverage"]
    assert E.load_weights(doc)["weights"] == doc["weights"]


def test_load_weights_refuses_files_of_earlier_formats(tmp_path):
    # A weights.json of an earlier development version: no "format", scores named like the op.
    # 0.1.0 reads only its own format (CHANGELOG.md, "Removed"): an error naming the file.
    new = weights_doc()
    old = {k: v for k, v in new.items() if k not in ("format", "leverage", "leverage_raw")}
    old.update(krls=new["leverage"], krls_raw=new["leverage_raw"], normalization="S / sum(S)")
    path = write_json(tmp_path / "weights.json", old)
    with pytest.raises(ChameleonUserError, match=r"weights.json: unknown weights format None \(this version reads "
                                                 r"'chameleon_ext.weights/2'\)"):
        E.load_weights(path)
    with pytest.raises(ChameleonUserError, match="unknown weights format None"):
        E.write_exports(str(path), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert not hasattr(E, "upgrade_weights_doc")


def test_load_weights_rejects_an_unknown_format(tmp_path):
    path = write_json(tmp_path / "weights.json", {**weights_doc(), "format": "chameleon_ext.weights/9"})
    with pytest.raises(ChameleonUserError, match="unknown weights format 'chameleon_ext.weights/9'"):
        E.load_weights(path)


def test_load_weights_orders_weights_as_domains():
    doc = weights_doc()
    doc["weights"] = dict(reversed(list(doc["weights"].items())))
    assert list(E.load_weights(doc)["weights"]) == SLIMPAJAMA


def _with(doc, **changes):
    out = json.loads(json.dumps(doc))
    for key, value in changes.items():
        out[key] = value
    return out


def _bad_docs():
    doc = weights_doc()
    w = doc["weights"]
    yield "sum", _with(doc, weights={**w, "arxiv": w["arxiv"] + 0.01}), "sum to 1"
    yield "nan", _with(doc, weights={**w, "arxiv": math.nan}), "must be a finite number >= 0"
    yield "inf", _with(doc, weights={**w, "arxiv": math.inf}), "must be a finite number >= 0"
    yield "negative", _with(doc, weights={**w, "arxiv": -w["arxiv"], "book": w["book"] + 2 * w["arxiv"]}), "must be a finite number >= 0"
    yield "string", _with(doc, weights={**w, "arxiv": "0.1"}), "must be a finite number >= 0"
    yield "bool", _with(doc, weights={**w, "arxiv": True}), "must be a finite number >= 0"
    yield "missing_domain", _with(doc, domains=SLIMPAJAMA + ["pile"]), "missing ['pile']"
    yield "extra_weight", _with(doc, domains=SLIMPAJAMA[1:]), "unknown ['arxiv']"
    yield "duplicate_domain", _with(doc, domains=SLIMPAJAMA + ["c4"]), "more than once"
    yield "empty_domains", _with(doc, domains=[], weights={}), "empty"
    yield "domains_not_list", _with(doc, domains="arxiv"), "expected a list of domain names"
    yield "weights_not_mapping", _with(doc, weights=list(w.values())), "expected a mapping domain -> weight"
    no_weights = _with(doc)
    del no_weights["weights"]
    yield "no_weights_key", no_weights, "missing required key(s) ['weights']"


BAD_DOCS = list(_bad_docs())


@pytest.mark.parametrize("case, doc, problem", BAD_DOCS, ids=[c[0] for c in BAD_DOCS])
def test_load_weights_rejects_bad_documents(tmp_path, case, doc, problem):
    path = write_json(tmp_path / f"{case}.json", doc)  # json writes NaN/Infinity, as a careless writer would
    with pytest.raises(ChameleonUserError) as err:
        E.load_weights(path)
    assert problem in str(err.value)
    assert path in str(err.value)  # names the file
    with pytest.raises(ChameleonUserError, match="weights dict"):
        E.load_weights(doc)


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_load_weights_rejects_bad_files(tmp_path, content, problem):
    path = tmp_path / "weights.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ChameleonUserError, match=problem) as err:
        E.load_weights(str(path))
    assert str(path) in str(err.value)


def test_load_weights_missing_file_and_directory(tmp_path):
    with pytest.raises(ChameleonUserError, match="does not exist"):
        E.load_weights(tmp_path / "nope.json")
    with pytest.raises(ChameleonUserError, match="is a folder"):
        E.load_weights(tmp_path)
    with pytest.raises(ChameleonUserError, match="path to weights.json or a dict"):
        E.load_weights(42)


# --------------------------------------------------------------------------------------------
# Megatron
# --------------------------------------------------------------------------------------------


def test_megatron_blend_layout_and_exact_round_trip():
    w = weights_doc()["weights"]
    blend = E.megatron_blend(w)
    tokens = blend.split(" ")
    assert tokens[1::2] == SLIMPAJAMA  # weight first, then prefix, in the given order
    assert [float(t) for t in tokens[0::2]] == list(w.values())  # bit-exact: repr digits
    assert E.parse_megatron_blend(blend) == w


def test_megatron_blend_known_string():
    assert E.megatron_blend({"web": 0.31, "code": 0.69}) == "0.31 web 0.69 code"
    assert E.megatron_blend({"web": 1e-05, "code": 1.0}) == "1e-05 web 1.0 code"


@settings(max_examples=60, deadline=None)
@given(positive_weights)
def test_megatron_round_trip_is_exact(values):
    w = named(values)
    assert E.parse_megatron_blend(E.megatron_blend(w)) == w


def test_megatron_blend_with_prefixes():
    w = {"web": 0.25, "code": 0.75}
    prefixes = {"web": "/data/web/web_text_document", "code": "/data/code/code_text_document", "unused": "x"}
    blend = E.megatron_blend(w, prefixes)
    assert blend == "0.25 /data/web/web_text_document 0.75 /data/code/code_text_document"
    assert E.parse_megatron_blend(blend) == {prefixes[d]: v for d, v in w.items()}
    # A domain without an entry falls back to its own name.
    assert E.megatron_blend(w, {"code": "/data/code"}) == "0.25 web 0.75 /data/code"


@pytest.mark.parametrize("prefix", ["/data/my web", "a\tb", "a\nb", " lead"])
def test_megatron_blend_refuses_whitespace_in_prefix(prefix):
    with pytest.raises(ChameleonUserError, match="contains whitespace"):
        E.megatron_blend({"web": 0.5, "code": 0.5}, {"web": prefix, "code": "code"})
    with pytest.raises(ChameleonUserError, match="contains whitespace"):
        E.megatron_blend({prefix: 1.0})  # the domain name is the default prefix


def test_megatron_blend_errors():
    with pytest.raises(ChameleonUserError, match="share the path '/data/x'"):
        E.megatron_blend({"web": 0.5, "code": 0.5}, {"web": "/data/x", "code": "/data/x"})
    with pytest.raises(ChameleonUserError, match="non-empty string"):
        E.megatron_blend({"web": 1.0}, {"web": ""})
    with pytest.raises(ChameleonUserError, match="must be a finite number >= 0"):
        E.megatron_blend({"web": -0.5})
    with pytest.raises(ChameleonUserError, match="must be a finite number >= 0"):
        E.megatron_blend({"web": math.nan})
    with pytest.raises(ChameleonUserError, match="empty"):
        E.megatron_blend({})
    with pytest.raises(ChameleonUserError, match="not the whole file"):
        E.megatron_blend(weights_doc())


@pytest.mark.parametrize(
    "blend, problem",
    [
        ("0.5 web 0.5", "even number of tokens"),
        ("web 0.5 code 0.5", "must be a finite number >= 0, got 'web'"),
        ("0.5 web abc code", "weight of domain 'code' must be a finite number >= 0, got 'abc'"),
        ("0 web 0 code", "all weights are 0"),
        ("", "empty"),
        ("   ", "empty"),
        ("nan web", "finite"),
        ("-1 web", ">= 0"),
        ("0.5 web 0.5 web", "more than once"),
    ],
)
def test_parse_megatron_blend_errors(blend, problem):
    with pytest.raises(ChameleonUserError, match=problem):
        E.parse_megatron_blend(blend)


# --------------------------------------------------------------------------------------------
# Hugging Face interleave_datasets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 7, 13, 60])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_hf_probabilities_sum_to_exactly_one(k, seed, mode):
    w = weights_doc(k, seed, mode)["weights"]
    probs = E.hf_interleave_probabilities(w)
    assert sum(probs) == 1.0
    total = math.fsum(w.values())
    for p, v in zip(probs, w.values()):
        assert abs(p - v / total) <= 1e-12


@settings(max_examples=100, deadline=None)
@given(positive_weights)
def test_hf_probabilities_any_positive_weights(values):
    probs = E.hf_interleave_probabilities(named(values))
    # Exactly 1.0 is not reachable for every adversarial input; one ulp is the promise.
    assert abs(sum(probs) - 1.0) <= ONE_ULP_ABOVE_1
    total = math.fsum(values)
    for p, v in zip(probs, values):
        assert p >= 0.0 and abs(p - v / total) <= 1e-12


def test_hf_probabilities_renormalise_and_follow_domains_order():
    w = {"web": 2.0, "code": 1.0, "book": 1.0}
    assert E.hf_interleave_probabilities(w) == [0.5, 0.25, 0.25]
    assert E.hf_interleave_probabilities(w, ["book", "web", "code"]) == [0.25, 0.5, 0.25]
    # Residue goes on the largest entry: the small ones stay exactly w / total.
    w3 = {"a": 1.0, "b": 1.0, "c": 1.0}
    probs = E.hf_interleave_probabilities(w3)
    assert sum(probs) == 1.0 and probs.count(1.0 / 3.0) >= 2


def test_hf_probabilities_errors():
    with pytest.raises(ChameleonUserError, match=r"missing \['pile'\]"):
        E.hf_interleave_probabilities({"web": 1.0}, ["web", "pile"])
    with pytest.raises(ChameleonUserError, match=r"unknown \['code'\]"):
        E.hf_interleave_probabilities({"web": 0.5, "code": 0.5}, ["web"])
    with pytest.raises(ChameleonUserError, match="all weights are 0"):
        E.hf_interleave_probabilities({"web": 0.0, "code": 0.0})
    with pytest.raises(ChameleonUserError, match="must be a finite number >= 0"):
        E.hf_interleave_probabilities({"web": math.inf})


# --------------------------------------------------------------------------------------------
# YAML mixture
# --------------------------------------------------------------------------------------------

# Names that YAML would read as something else if written bare.
AWKWARD_NAMES = [
    "web", "yes", "No", "null", "~", "1.5", "1e-05", ".inf", "a_b/c-d.e",
    "a: b", "#hash", "- dash", "ünïcödé", "quote'd", 'dq"x',
]


def test_mixture_yaml_round_trip():
    doc = weights_doc()
    text = E.mixture_yaml(doc["weights"], doc)
    assert text.startswith("mixture:\n  - name: arxiv\n    weight: ")
    parsed = E.parse_mixture_yaml(text)
    assert list(parsed) == SLIMPAJAMA
    for d in SLIMPAJAMA:
        assert abs(parsed[d] - doc["weights"][d]) <= 1e-12
    assert "chameleon:\n  mode: pretrain\n  lambda: 10.0\n  temperature: 5.0\n  normalize: true\n" in text
    assert "krls" not in text and "method" not in text  # only the documented metadata


@settings(max_examples=40, deadline=None)
@given(positive_weights)
def test_mixture_yaml_round_trip_any_weights(values):
    w = named(values)
    parsed = E.parse_mixture_yaml(E.mixture_yaml(w))
    assert list(parsed) == list(w)
    assert all(abs(parsed[d] - w[d]) <= 1e-12 for d in w)


def test_mixture_yaml_awkward_names():
    w = {name: 1.0 / len(AWKWARD_NAMES) for name in AWKWARD_NAMES}
    w["web"] = 1e-05  # YAML 1.1 reads "1e-05" as a string; must still come back as a float
    assert E.parse_mixture_yaml(E.mixture_yaml(w)) == w


@pytest.mark.parametrize(
    "text, problem",
    [
        ("weights: {}\n", "'mixture'"),
        ("mixture:\n  - name: web\n", "'name' and 'weight'"),
        ("mixture:\n  - name: web\n    weight: lots\n", "finite number"),
        ("mixture:\n  - name: web\n    weight: -0.1\n", "finite number"),
        ("mixture:\n  - name: web\n    weight: 0.5\n  - name: web\n    weight: 0.5\n", "more than once"),
        ("mixture: [unclosed\n", "not valid YAML"),
    ],
)
def test_parse_mixture_yaml_errors(text, problem):
    with pytest.raises(ChameleonUserError, match=problem):
        E.parse_mixture_yaml(text)


# --------------------------------------------------------------------------------------------
# write_exports and atomic writes
# --------------------------------------------------------------------------------------------


def test_write_exports_writes_every_format(tmp_path):
    from chameleon_ext.mixture_formats import MIXTURE_FORMATS

    doc = weights_doc()
    src = write_json(tmp_path / "weights.json", doc)
    out = tmp_path / "exports" / "nested"
    prefixes = {d: f"/data/slimpajama/{d}_text_document" for d in SLIMPAJAMA}
    paths = E.write_exports(src, out, prefixes)
    assert set(paths) == {"megatron", "hf_interleave", "mixture_yaml"} | set(MIXTURE_FORMATS)
    assert E.export_formats() == list(paths)
    expected = sorted(list(E.EXPORT_FILES.values()) + list(MIXTURE_FORMATS.values()))
    assert sorted(os.listdir(out)) == expected  # no temporary files left

    blend = Path(paths["megatron"]).read_text()
    assert blend.endswith("\n") and blend.count("\n") == 1
    assert E.parse_megatron_blend(blend) == {prefixes[d]: w for d, w in doc["weights"].items()}

    hf = json.loads(Path(paths["hf_interleave"]).read_text())
    assert hf["domains"] == SLIMPAJAMA
    assert sum(hf["probabilities"]) == 1.0
    assert all(abs(p - doc["weights"][d]) <= 1e-12 for d, p in zip(SLIMPAJAMA, hf["probabilities"]))

    mixture = E.parse_mixture_yaml(Path(paths["mixture_yaml"]).read_text())
    assert all(abs(mixture[d] - doc["weights"][d]) <= 1e-12 for d in SLIMPAJAMA)

    # Published as ordinary shared files (chameleon_ext.io's 0o644), not mkstemp's 0600.
    assert os.stat(paths["megatron"]).st_mode & 0o777 == 0o644


def test_write_exports_selects_formats_and_split_prefixes(tmp_path):
    doc = weights_doc()
    prefixes = {d: f"/data/{d}" for d in SLIMPAJAMA}
    valid = {d: f"/data/{d}_valid" for d in SLIMPAJAMA}
    test = {d: f"/data/{d}_test" for d in SLIMPAJAMA}
    paths = E.write_exports(doc, tmp_path, prefixes, formats=["megatron-per-split", "nemo"],
                            split_prefixes={"valid": valid, "test": test})
    assert sorted(os.listdir(tmp_path)) == sorted(["megatron_per_split_data_args.json", "nemo_paths.json"])
    per_split = json.loads(Path(paths["megatron-per-split"]).read_text())
    # Megatron's list alternates weight and prefix; validation is its own unweighted-by-us blend.
    train = dict(zip(per_split["train"][1::2], map(float, per_split["train"][0::2])))
    assert {p: w for p, w in train.items()} == {prefixes[d]: doc["weights"][d] for d in SLIMPAJAMA}
    assert set(per_split["valid"][1::2]) == set(valid.values())
    nemo = json.loads(Path(paths["nemo"]).read_text())
    assert set(nemo["validation"]) == set(valid.values()) and set(nemo["test"]) == set(test.values())
    with pytest.raises(ChameleonUserError, match="unknown export format"):
        E.write_exports(doc, tmp_path / "x", prefixes, formats=["megatron", "parquet"])
    assert not (tmp_path / "x").exists()


def test_write_exports_validates_before_writing(tmp_path):
    doc = weights_doc()
    out = tmp_path / "out"
    with pytest.raises(ChameleonUserError, match="contains whitespace"):
        E.write_exports(doc, out, {d: f"my {d}" for d in SLIMPAJAMA})
    assert not out.exists() or os.listdir(out) == []
    bad = _with(doc, weights={**doc["weights"], "c4": math.nan})
    with pytest.raises(ChameleonUserError, match="must be a finite number >= 0"):
        E.write_exports(bad, out)


def test_write_exports_keeps_old_files_on_failure(tmp_path, monkeypatch):
    doc = weights_doc()
    first = E.write_exports(doc, tmp_path)
    before = {kind: Path(p).read_bytes() for kind, p in first.items()}
    monkeypatch.setenv("CHAMELEON_FAULT", "write:mixture.yaml:data=enospc")
    other = weights_doc(seed=1)
    with pytest.raises(ChameleonUserError, match=r"cannot write mixture_yaml export .*mixture.yaml.*No space left"):
        E.write_exports(other, tmp_path)
    assert Path(first["mixture_yaml"]).read_bytes() == before["mixture_yaml"]  # the previous good file
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in first.values())  # no temp file


def test_write_exports_can_skip_an_export_the_names_cannot_hold(tmp_path):
    doc = weights_doc(k=3)
    doc = _with(doc, domains=["web text", "code", "books"],
                weights={"web text": 0.5, "code": 0.25, "books": 0.25})
    with pytest.raises(ChameleonUserError, match="whitespace"):
        E.write_exports(doc, tmp_path / "strict")
    notices = []
    paths = E.write_exports(doc, tmp_path / "lenient", on_skip=notices.append)
    # Megatron prefixes (the blend and the per-split args) and NeMo paths cannot hold whitespace.
    skipped = {"megatron", "megatron-per-split", "nemo"}
    assert set(paths) == set(E.export_formats()) - skipped
    assert len(notices) == len(skipped) and all("'web text'" in n for n in notices)
    assert any("skipped the megatron export" in n for n in notices)
    assert E.parse_mixture_yaml(Path(paths["mixture_yaml"]).read_text()) == doc["weights"]
