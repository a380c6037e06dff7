"""Trainer exports (chameleon_ext.mixture_formats), each read back by the consumer's own parser
where it installs here cheaply (pyyaml; megatron-core's blend parser when importable) and
otherwise checked against the consumer's documented schema, re-stated independently below."""

import json
import math
import os
from dataclasses import dataclass, field
from typing import List

import numpy as np
import pytest
import yaml

from chameleon_ext.budget import plan_token_budget
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.exports import WEIGHTS_FORMAT
from chameleon_ext.mixture_formats import (
    MIXTURE_FORMATS,
    megatron_per_split_args,
    mosaic_streams,
    mosaic_streams_yaml,
    nanotron_dataset,
    nanotron_dataset_yaml,
    nemo_paths,
    olmo_source_mixture_yaml,
    render_mixture_formats,
    torchtitan_mixture,
    torchtitan_mixture_json,
    write_mixture_formats,
)

# 0.1 + 0.2 and 1/3 are not short decimals: they must still come back bit for bit.
W = {"web": 0.1 + 0.2, "code": 1 / 3, "books": 1 - (0.1 + 0.2) - 1 / 3}
P = {"web": "/data/web/web_text_document", "code": "/data/code/code_text_document",
     "books": "/data/books/books_text_document"}


def weights_doc(weights=W, **extra):
    return {"format": WEIGHTS_FORMAT, "mode": "pretrain", "domains": list(weights), "weights": dict(weights), **extra}


# -- independent readers, written from each consumer's documentation -------------------------


def read_flat_blend(items):
    """megatron-core / NeMo blend list: an even-length list alternating weight and prefix, or a
    list of prefixes only; prefixes are stripped. Returns (prefixes, weights or None)."""
    if isinstance(items, str):
        items = items.split()
    assert isinstance(items, list) and items
    if len(items) % 2:
        return [p.strip() for p in items], None
    raw_w, raw_p = items[0::2], items[1::2]
    try:
        ws = [float(x) for x in raw_w]
    except ValueError:
        return [p.strip() for p in items], None
    return [p.strip() for p in raw_p], ws


def read_per_split_json(text):
    """Megatron-LM's --per-split-data-args-path: a JSON object with 'train', 'valid' and 'test',
    each a blend (string or list) or null."""
    obj = json.loads(text)
    assert set(obj) == {"train", "valid", "test"}
    return {s: (None if obj[s] is None else read_flat_blend(obj[s])) for s in ("train", "valid", "test")}


# -- Megatron-LM -----------------------------------------------------------------------------


def test_megatron_per_split_hand_written():
    got = megatron_per_split_args({"a": 0.25, "b": 0.75}, {"a": "/d/a_text_document", "b": "/d/b"})
    assert got == {"train": ["0.25", "/d/a_text_document", "0.75", "/d/b"], "valid": None, "test": None}


def test_megatron_per_split_round_trips_exactly():
    text = render_mixture_formats(weights_doc(), "megatron-per-split", prefixes=P)["megatron-per-split"]
    splits = read_per_split_json(text)
    prefixes, ws = splits["train"]
    assert prefixes == [P[d] for d in W] and ws == list(W.values())  # bit-exact floats
    assert splits["valid"] is None and splits["test"] is None


def test_megatron_per_split_held_out_splits():
    held = {s: {d: f"/held/{s}/{d}" for d in W} for s in ("valid", "test")}
    got = megatron_per_split_args(W, P, split_prefixes=held)
    for s in ("valid", "test"):
        prefixes, ws = read_flat_blend(got[s])
        assert prefixes == [f"/held/{s}/{d}" for d in W] and ws == list(W.values())
    with pytest.raises(ChameleonUserError, match=r"split_prefixes\['valid'\] has no path for domains \['books'\]"):
        megatron_per_split_args(W, P, split_prefixes={"valid": {"web": "x", "code": "y"}})
    with pytest.raises(ChameleonUserError, match=r"unknown split\(s\) \['validation'\]"):
        megatron_per_split_args(W, P, split_prefixes={"validation": held["valid"]})


def test_megatron_core_parses_it():
    pytest.importorskip("megatron.core.datasets.utils", reason="megatron-core not installed")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
        from megatron.core.datasets.utils import get_blend_from_list
    held = {"valid": {d: f"/held/{d}" for d in W}}
    obj = json.loads(json.dumps(megatron_per_split_args(W, P, split_prefixes=held)))
    # Megatron-LM's reader: strings are split, lists pass through, each split to the blend parser.
    per_split = [get_blend_from_list(obj[s].split() if isinstance(obj[s], str) else obj[s])
                 for s in ("train", "valid", "test")]
    assert per_split[0] == ([P[d] for d in W], list(W.values()))
    assert per_split[1] == ([f"/held/{d}" for d in W], list(W.values()))
    assert per_split[2] is None
    cfg = BlendedMegatronDatasetConfig(random_seed=1, sequence_length=8, blend_per_split=per_split)
    assert cfg.blend_per_split[0][1] == list(W.values())


@pytest.mark.parametrize("bad, what", [
    ("/data/my web", "contains whitespace"),
    ("/data/web,v2", "contains a comma"),
    ("30", "reads as a number"),
    ("1e-3", "reads as a number"),
    ("", "must be a non-empty string"),
])
@pytest.mark.parametrize("fmt", ["megatron-per-split", "nemo"])
def test_megatron_and_nemo_refuse_paths_they_cannot_hold(bad, what, fmt):
    with pytest.raises(ChameleonUserError) as e:
        render_mixture_formats(weights_doc(), fmt, prefixes={**P, "code": bad})
    assert what in str(e.value) and "'code'" in str(e.value) and fmt in str(e.value)


def test_domain_name_as_default_prefix_is_checked_too():
    with pytest.raises(ChameleonUserError,
                       match="megatron-per-split: path 'my web' of domain 'my web' contains whitespace"):
        megatron_per_split_args({"my web": 1.0})


def test_shared_prefix_refused():
    with pytest.raises(ChameleonUserError, match="domains 'web' and 'code' share the path '/d/x'"):
        megatron_per_split_args(W, {"web": "/d/x", "code": "/d/x", "books": "/d/b"})


# -- NeMo ------------------------------------------------------------------------------------


def test_nemo_paths_flat_without_splits():
    got = nemo_paths({"a": 0.25, "b": 0.75}, {"a": "/d/a", "b": "/d/b"})
    assert got == ["0.25", "/d/a", "0.75", "/d/b"]
    prefixes, ws = read_flat_blend(json.loads(json.dumps(got)))
    assert prefixes == ["/d/a", "/d/b"] and ws == [0.25, 0.75]


def test_nemo_paths_dict_with_splits():
    held = {s: {d: f"/held/{s}/{d}" for d in W} for s in ("validation", "test")}
    got = nemo_paths(W, P, split_prefixes=held)
    # PreTrainingDataModule documents {'train', 'validation', 'test'}, each a path list or a
    # zipped weight/path list; a full validation pass must not be weighted.
    assert set(got) == {"train", "validation", "test"}
    assert read_flat_blend(got["train"]) == ([P[d] for d in W], list(W.values()))
    for s in ("validation", "test"):
        assert read_flat_blend(got[s]) == ([f"/held/{s}/{d}" for d in W], None)
    with pytest.raises(ChameleonUserError, match="missing 'test'"):
        nemo_paths(W, P, split_prefixes={"validation": held["validation"]})


# -- OLMo-core -------------------------------------------------------------------------------

OLMO_SOURCE_KEYS = {"source_name", "target_ratio", "paths", "max_repetition_ratio", "max_source_fraction"}


def check_olmo_schema(doc):
    """SourceMixtureList / SourceMixtureConfig.validate() as documented: a non-empty 'sources'
    list; each source has a name, 0 < target_ratio <= 1, a non-empty list of paths,
    max_repetition_ratio >= 1 and 0 < max_source_fraction <= 1; the ratios sum to 1."""
    assert set(doc) == {"sources"} and doc["sources"]
    for s in doc["sources"]:
        assert set(s) <= OLMO_SOURCE_KEYS and {"source_name", "target_ratio", "paths"} <= set(s)
        assert isinstance(s["source_name"], str) and s["source_name"]
        assert isinstance(s["target_ratio"], float) and 0 < s["target_ratio"] <= 1
        assert isinstance(s["paths"], list) and s["paths"] and all(isinstance(p, str) for p in s["paths"])
        assert s.get("max_repetition_ratio", 1.0) >= 1
        assert 0 < s.get("max_source_fraction", 1.0) <= 1
    assert np.allclose(sum(s["target_ratio"] for s in doc["sources"]), 1.0)


def test_olmo_yaml_loads_with_pyyaml_and_round_trips():
    prefixes = {"web": ["/npy/web/part-0-*.npy", "/npy/web/part-1-*.npy"], "code": "/npy/code/*.npy"}
    text = olmo_source_mixture_yaml(W, prefixes)
    doc = yaml.safe_load(text)
    check_olmo_schema(doc)
    assert [s["source_name"] for s in doc["sources"]] == list(W)
    assert [s["target_ratio"] for s in doc["sources"]] == list(W.values())
    assert doc["sources"][0]["paths"] == prefixes["web"] and doc["sources"][2]["paths"] == ["books"]
    assert all("max_repetition_ratio" not in s for s in doc["sources"])  # no cap, no budget


def test_olmo_with_budget_uses_achievable_weights_and_the_cap():
    counts = {"web": 10_000, "code": 100, "books": 10_000}
    plan = plan_token_budget(W, counts, token_budget=3000, max_epochs=2.5)
    assert plan.capped_domains == ["code"]
    doc = yaml.safe_load(olmo_source_mixture_yaml(W, None, plan))
    check_olmo_schema(doc)
    ratios = {s["source_name"]: s["target_ratio"] for s in doc["sources"]}
    assert ratios == plan.achievable_weights
    assert {s["max_repetition_ratio"] for s in doc["sources"]} == {2.5}
    # OLMo-core's own sufficiency rule: int(N * ratio) <= int(population * fraction * ratio).
    for s in doc["sources"]:
        need = int(3000 * s["target_ratio"])
        have = int(counts[s["source_name"]] * s.get("max_source_fraction", 1.0) * s["max_repetition_ratio"])
        assert need <= have
    assert "requested_tokens: 3000" in olmo_source_mixture_yaml(W, None, plan.as_dict())


def test_olmo_cap_below_one_epoch_becomes_a_source_fraction():
    plan = plan_token_budget({"a": 0.5, "b": 0.5}, {"a": 100, "b": 1000}, token_budget=500, max_epochs=0.5)
    doc = yaml.safe_load(olmo_source_mixture_yaml({"a": 0.5, "b": 0.5}, None, plan))
    check_olmo_schema(doc)
    for s in doc["sources"]:
        assert s["max_repetition_ratio"] == 1.0 and s["max_source_fraction"] == 0.5
    a = doc["sources"][0]
    assert int(500 * a["target_ratio"]) <= int(100 * 0.5 * 1.0)


def test_olmo_budget_without_cap_allows_the_needed_repetition():
    plan = plan_token_budget({"a": 0.5, "b": 0.5}, {"a": 100, "b": 1000}, token_budget=1000)
    doc = yaml.safe_load(olmo_source_mixture_yaml({"a": 0.5, "b": 0.5}, None, plan))
    assert [s["max_repetition_ratio"] for s in doc["sources"]] == [5.0, 1.0]


def test_names_yaml_would_misread_stay_strings():
    weights = {"yes": 0.5, "1e3": 0.25, "a: b #c": 0.25}
    doc = yaml.safe_load(olmo_source_mixture_yaml(weights))
    assert [s["source_name"] for s in doc["sources"]] == list(weights)
    assert [s["paths"] for s in doc["sources"]] == [[n] for n in weights]


# -- nanotron --------------------------------------------------------------------------------


def test_nanotron_dataset_schema():
    got = nanotron_dataset(W, P)
    assert got == {"dataset_folder": list(P.values()), "dataset_weights": list(W.values())}
    doc = yaml.safe_load(nanotron_dataset_yaml(W, P))
    # NanosetDatasetsArgs: dataset_folder a list of folders, dataset_weights one float each.
    ds = doc["dataset"]
    assert set(ds) == {"dataset_folder", "dataset_weights"}
    assert ds["dataset_folder"] == list(P.values()) and ds["dataset_weights"] == list(W.values())
    assert len(ds["dataset_folder"]) == len(ds["dataset_weights"])
    with pytest.raises(ChameleonUserError, match="nanotron: domain 'web' has 2 paths"):
        nanotron_dataset(W, {"web": ["/a", "/b"]})


# -- Mosaic Streaming ------------------------------------------------------------------------

STREAM_KWARGS = {"remote", "local", "split", "proportion", "repeat", "choose", "download_retry",
                 "download_timeout", "validate_hash", "keep_zip"}


def check_streams(streams):
    """streaming.Stream's documented arguments: keyword-only, at most one of proportion /
    repeat / choose, all non-negative; StreamingDataset needs all streams relative
    (proportion) or none."""
    for kw in streams:
        assert set(kw) <= STREAM_KWARGS
        assert ("remote" in kw) or ("local" in kw)
        assert sum(k in kw for k in ("proportion", "repeat", "choose")) <= 1
        assert all(kw[k] >= 0 for k in ("proportion", "repeat", "choose") if k in kw)
    relative = ["proportion" in kw for kw in streams]
    assert all(relative) or not any(relative)


def test_mosaic_streams():
    prefixes = {**P, "code": "s3://bucket/mds/code"}
    streams = mosaic_streams(W, prefixes)
    check_streams(streams)
    assert streams[1] == {"remote": "s3://bucket/mds/code", "proportion": W["code"]}
    assert streams[0] == {"local": P["web"], "proportion": W["web"]}
    doc = yaml.safe_load(mosaic_streams_yaml(W, prefixes))
    assert list(doc["streams"]) == list(W)
    assert list(doc["streams"].values()) == streams
    check_streams(list(doc["streams"].values()))


# -- TorchTitan ------------------------------------------------------------------------------


def test_torchtitan_json_gives_both_versions_their_arguments():
    doc = json.loads(torchtitan_mixture_json(W, P))
    assert doc["format"] == "chameleon_ext.torchtitan/1" and doc["weights"] == "requested"
    # torchtitan 0.3.0: HFDataSource(dataset=..., dataset_path=..., weight=...) keyword arguments
    assert doc["sources"] == [{"dataset": d, "dataset_path": P[d], "weight": W[d]} for d in W]
    # main since 2026-08-19: WeightedDataset(dataset=<config for path>, weight=...)
    assert doc["datasets"] == [{"name": d, "path": P[d], "weight": W[d]} for d in W]
    assert doc["left_out"] == []


def test_torchtitan_main_leaves_out_zero_weights_and_holds_any_name():
    weights = {"it's \"quoted\"\nnew line": 0.5, "\\back": 0.5, "none": 0.0}
    doc = json.loads(torchtitan_mixture_json(weights))
    assert [s["dataset"] for s in doc["sources"]] == list(weights)  # 0.3.0 accepts weight 0
    assert [(d["name"], d["path"], d["weight"]) for d in doc["datasets"]] == [(n, n, 0.5) for n in list(weights)[:2]]
    assert doc["left_out"] == ["none"]  # main refuses weights <= 0


# -- budget info and files -------------------------------------------------------------------


def test_every_format_follows_the_budgets_achievable_weights():
    plan = plan_token_budget(W, {"web": 10_000, "code": 100, "books": 10_000}, token_budget=3000, max_epochs=1)
    ach = plan.achievable_weights
    assert ach != W
    doc = weights_doc(budget=json.loads(json.dumps(plan.as_dict())))
    texts = render_mixture_formats(doc, prefixes=P)
    assert read_per_split_json(texts["megatron-per-split"])["train"][1] == list(ach.values())
    assert read_flat_blend(json.loads(texts["nemo"]))[1] == list(ach.values())
    assert [s["target_ratio"] for s in yaml.safe_load(texts["olmo-core"])["sources"]] == list(ach.values())
    assert yaml.safe_load(texts["nanotron"])["dataset"]["dataset_weights"] == list(ach.values())
    assert [s["proportion"] for s in yaml.safe_load(texts["mosaic"])["streams"].values()] == list(ach.values())
    assert [d["weight"] for d in json.loads(texts["torchtitan"])["datasets"]] == list(ach.values())
    assert [d["weight"] for d in json.loads(texts["torchtitan"])["sources"]] == list(ach.values())


def test_budget_for_other_domains_is_refused():
    plan = plan_token_budget({"x": 1.0}, {"x": 10}, token_budget=5)
    with pytest.raises(ChameleonUserError, match="budget achievable_weights: the domains do not match"):
        render_mixture_formats(weights_doc(), "nanotron", budget=plan)


def test_write_mixture_formats_all_and_selected(tmp_path):
    paths = write_mixture_formats(weights_doc(), tmp_path / "out", prefixes=P)
    assert list(paths) == list(MIXTURE_FORMATS)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(MIXTURE_FORMATS.values())
    for fmt, path in paths.items():
        assert os.path.basename(path) == MIXTURE_FORMATS[fmt]
        assert os.stat(path).st_mode & 0o777 == 0o644
    assert read_per_split_json(open(paths["megatron-per-split"]).read())["train"][1] == list(W.values())

    wdoc = tmp_path / "weights.json"
    wdoc.write_text(json.dumps(weights_doc()))
    only = write_mixture_formats(str(wdoc), tmp_path / "one", formats=["olmo-core", "mosaic"])
    assert sorted(os.listdir(tmp_path / "one")) == ["mosaic_streams.yaml", "olmo_source_mixture.yaml"]
    assert list(only) == ["olmo-core", "mosaic"]


def test_bad_path_leaves_the_folder_untouched(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ChameleonUserError, match="nemo: path '/a b' of domain 'books'"):
        # olmo-core (first) can hold the path, nemo cannot: neither file is written.
        write_mixture_formats(weights_doc(), out, formats=["olmo-core", "nemo"], prefixes={**P, "books": "/a b"})
    assert not out.exists() or os.listdir(out) == []


def test_unknown_format_and_bad_weights():
    with pytest.raises(ChameleonUserError, match=r"unknown export format\(s\) \['megatron-lm'\]"):
        render_mixture_formats(weights_doc(), ["megatron-lm"])
    with pytest.raises(ChameleonUserError, match="must sum to 1"):
        render_mixture_formats(weights_doc({"a": 0.5, "b": 0.2}))
    with pytest.raises(ChameleonUserError, match="weight of domain 'a' must be a finite number >= 0"):
        nanotron_dataset({"a": math.nan})
