"""Chameleon domain weights in the formats other trainers read (docs/method.md, step 6).

:mod:`chameleon_ext.exports` writes the Megatron ``--data-path`` blend, the Hugging Face
``interleave_datasets`` probabilities and a plain YAML mixture. This module adds, each as a
pure function of the weights (plus optional per-domain paths and token-budget info):

======================  ===============================  ==========================================
format name             file                             read by
======================  ===============================  ==========================================
``megatron-per-split``  megatron_per_split_data_args.json Megatron-LM ``--per-split-data-args-path``
``nemo``                nemo_paths.json                  NeMo 2 ``PreTrainingDataModule(paths=...)``
``olmo-core``           olmo_source_mixture.yaml         OLMo-core ``SourceMixtureList`` (``sources``)
``nanotron``            nanotron_dataset.yaml            nanotron ``NanosetDatasetsArgs``
``mosaic``              mosaic_streams.yaml              Mosaic ``StreamingDataset(streams=...)``
``torchtitan``          torchtitan_mixture.py            a ``DatasetMixConfig`` of ``WeightedDataset``
======================  ===============================  ==========================================

Paths. ``prefixes`` maps a domain to where its data lives in the trainer's own format (the
Megatron/NeMo ``.bin``/``.idx`` prefix, OLMo-core ``.npy`` files or globs, a nanotron dataset
folder, a Mosaic MDS folder or ``s3://`` URL, ...); a domain it does not name uses its own name.
Only OLMo-core takes several paths per domain (a list). ``split_prefixes`` gives held-out data
for Megatron's and NeMo's ``valid``/``validation`` and ``test`` splits.

Budgets. With a token-budget plan (:class:`chameleon_ext.budget.BudgetPlan` or its
``as_dict()``, the ``budget`` block of weights.json), every format gets the *achievable* weights
(what the repetition cap leaves), and OLMo-core also gets the cap as ``max_repetition_ratio``.

Each weight is written as Python's shortest round-trip ``repr`` (or as the YAML float pyyaml
writes), so a file parses back to exactly the same floats. A path a format cannot hold
(whitespace or a comma in a Megatron/NeMo prefix, a prefix Megatron would read as a weight)
is an error naming the domain and the format, raised before any file is written.

TorchTitan: its upstream repository (as read when this was written) has no ``DatasetMixConfig``
or ``WeightedDataset`` classes; the snippet builds ``DatasetMixConfig(datasets=[WeightedDataset(
name=..., path=..., weight=...), ...])`` from names the user's training script defines or imports
before running it, and only uses plain Python literals (``repr``), so any name or path is safe.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

from .errors import ChameleonUserError
from .exports import _check_weight_values, load_weights
from .io import check_writable_folder, write_text

__all__ = [
    "MIXTURE_FORMATS",
    "megatron_per_split_args",
    "nemo_paths",
    "olmo_source_mixture",
    "olmo_source_mixture_yaml",
    "nanotron_dataset",
    "nanotron_dataset_yaml",
    "mosaic_streams",
    "mosaic_streams_yaml",
    "torchtitan_mixture_snippet",
    "mixture_weights",
    "render_mixture_formats",
    "write_mixture_formats",
]

# format name -> file written by write_mixture_formats
MIXTURE_FORMATS = {
    "megatron-per-split": "megatron_per_split_data_args.json",
    "nemo": "nemo_paths.json",
    "olmo-core": "olmo_source_mixture.yaml",
    "nanotron": "nanotron_dataset.yaml",
    "mosaic": "mosaic_streams.yaml",
    "torchtitan": "torchtitan_mixture.py",
}

Prefixes = Optional[Mapping[str, Union[str, Sequence[str]]]]
SplitPrefixes = Optional[Mapping[str, Mapping[str, str]]]


# -- paths -----------------------------------------------------------------------------------


def _paths_of(domain: str, prefixes: Prefixes, fmt: str) -> List[str]:
    """The domain's path(s): ``prefixes[domain]`` (a string or a list) or the domain's name."""
    if prefixes is None:
        value: Union[str, Sequence[str]] = domain
    elif not isinstance(prefixes, Mapping):
        raise ChameleonUserError(f"{fmt}: prefixes must map domain -> path, got {type(prefixes).__name__}")
    else:
        value = prefixes.get(domain, domain)
    paths = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not paths or any(not isinstance(p, str) or not p for p in paths):
        raise ChameleonUserError(
            f"{fmt}: path of domain {domain!r} must be a non-empty string (or a list of them), got {value!r}")
    return paths


def _one_path(domain: str, prefixes: Prefixes, fmt: str) -> str:
    paths = _paths_of(domain, prefixes, fmt)
    if len(paths) != 1:
        raise ChameleonUserError(
            f"{fmt}: domain {domain!r} has {len(paths)} paths; this format takes one per domain "
            "(only olmo-core lists several)")
    return paths[0]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _megatron_prefix(domain: str, prefix: str, fmt: str) -> str:
    """A prefix Megatron's blend parser reads back unchanged (it splits strings on whitespace,
    strips prefixes, separates lists on commas in some front ends, and takes anything that
    parses as a float for a weight)."""
    if any(ch.isspace() for ch in prefix):
        raise ChameleonUserError(
            f"{fmt}: path {prefix!r} of domain {domain!r} contains whitespace, which the format cannot "
            "hold (the blend is split on whitespace); rename or symlink the data")
    if "," in prefix:
        raise ChameleonUserError(
            f"{fmt}: path {prefix!r} of domain {domain!r} contains a comma, which the format cannot hold; "
            "rename or symlink the data")
    if _is_number(prefix):
        raise ChameleonUserError(
            f"{fmt}: path {prefix!r} of domain {domain!r} reads as a number, which the blend parser would "
            "take for a weight; use a path such as ./" + prefix)
    return prefix


def _blend(weights: Mapping[str, float], prefixes: Mapping[str, str], fmt: str, weighted: bool = True) -> List[str]:
    """``["w1", "p1", "w2", "p2", ...]`` (or ``["p1", "p2", ...]``) with distinct prefixes."""
    owner: Dict[str, str] = {}
    out: List[str] = []
    for domain, weight in weights.items():
        if domain not in prefixes:
            raise ChameleonUserError(f"{fmt}: no path for domain {domain!r}")
        prefix = _megatron_prefix(domain, _one_path(domain, prefixes, fmt), fmt)
        if prefix in owner:
            # The trainer would read the same files as two domains and add their weights.
            raise ChameleonUserError(f"{fmt}: domains {owner[prefix]!r} and {domain!r} share the path {prefix!r}")
        owner[prefix] = domain
        out += [repr(float(weight)), prefix] if weighted else [prefix]
    return out


def _resolved(weights: Mapping[str, float], prefixes: Prefixes, fmt: str) -> Dict[str, str]:
    return {d: _one_path(d, prefixes, fmt) for d in weights}


def _split_table(split_prefixes: SplitPrefixes, names: Sequence[str], fmt: str) -> Dict[str, Mapping[str, str]]:
    if split_prefixes is None:
        return {}
    if not isinstance(split_prefixes, Mapping):
        raise ChameleonUserError(f"{fmt}: split_prefixes must map split -> {{domain: path}}")
    unknown = [s for s in split_prefixes if s not in names]
    if unknown:
        raise ChameleonUserError(f"{fmt}: unknown split(s) {unknown} in split_prefixes; expected {list(names)}")
    return {s: split_prefixes[s] for s in names if split_prefixes.get(s) is not None}


def _check_split_domains(table: Mapping[str, str], weights: Mapping[str, float], split: str, fmt: str) -> None:
    if not isinstance(table, Mapping):
        raise ChameleonUserError(f"{fmt}: split_prefixes[{split!r}] must map domain -> path")
    missing = [d for d in weights if d not in table]
    if missing:
        raise ChameleonUserError(f"{fmt}: split_prefixes[{split!r}] has no path for domains {missing}")


# -- weights ---------------------------------------------------------------------------------


def mixture_weights(weights: Mapping[str, float], budget=None, source: str = "weights") -> Dict[str, float]:
    """The weights a trainer should follow: ``weights`` checked, or, given a budget plan (a
    :class:`~chameleon_ext.budget.BudgetPlan` or its ``as_dict()``), its achievable weights in
    the order of ``weights``."""
    weights = _check_weight_values(weights, source)
    if budget is None:
        return weights
    achievable = _budget_field(budget, "achievable_weights")
    achievable = _check_weight_values(achievable, "budget achievable_weights")
    if set(achievable) != set(weights):
        raise ChameleonUserError(
            f"budget achievable_weights name domains {sorted(achievable)}, the weights {sorted(weights)}")
    total = math.fsum(achievable.values())
    if abs(total - 1.0) > 1e-6:
        raise ChameleonUserError(f"budget achievable_weights must sum to 1, got {total!r}")
    return {d: achievable[d] for d in weights}


def _budget_field(budget, name: str):
    if isinstance(budget, Mapping):
        if name not in budget:
            raise ChameleonUserError(f"budget has no {name!r} entry (expected BudgetPlan.as_dict())")
        return budget[name]
    if hasattr(budget, name):
        return getattr(budget, name)
    raise ChameleonUserError(f"budget must be a BudgetPlan or its as_dict(), got {type(budget).__name__}")


# -- Megatron-LM and NeMo --------------------------------------------------------------------


def megatron_per_split_args(weights: Mapping[str, float], prefixes: Prefixes = None,
                            split_prefixes: SplitPrefixes = None, budget=None) -> dict:
    """The JSON object for Megatron-LM ``--per-split-data-args-path``.

    ``{"train": ["w1", "prefix1", ...], "valid": [...] or null, "test": [...] or null}``: each
    split is megatron-core's flattened, zipped list of weights (as strings) and data prefixes.
    ``valid`` and ``test`` use the same weights over ``split_prefixes["valid"|"test"]``; without
    them they are null, and Megatron builds no dataset for that split (it then trains without
    evaluation: pass held-out prefixes to evaluate).
    """
    fmt = "megatron-per-split"
    weights = mixture_weights(weights, budget, fmt)
    out: dict = {"train": _blend(weights, _resolved(weights, prefixes, fmt), fmt), "valid": None, "test": None}
    for split, table in _split_table(split_prefixes, ("valid", "test"), fmt).items():
        _check_split_domains(table, weights, split, fmt)
        out[split] = _blend(weights, table, fmt)
    return out


def nemo_paths(weights: Mapping[str, float], prefixes: Prefixes = None,
               split_prefixes: SplitPrefixes = None, budget=None) -> Union[list, dict]:
    """The ``paths`` argument of NeMo 2's ``PreTrainingDataModule``.

    Without ``split_prefixes``: the flattened, zipped list ``["w1", "prefix1", ...]``, from which
    NeMo draws train, validation and test by its ``split`` argument. With them: ``{"train":
    [weighted list], "validation": [prefixes], "test": [prefixes]}``; validation and test list the
    held-out prefixes without weights (NeMo documents that a full validation pass must not be
    weighted), so each domain's held-out set is evaluated whole.
    """
    fmt = "nemo"
    weights = mixture_weights(weights, budget, fmt)
    train = _blend(weights, _resolved(weights, prefixes, fmt), fmt)
    tables = _split_table(split_prefixes, ("validation", "test"), fmt)
    if not tables:
        return train
    out: dict = {"train": train}
    for split in ("validation", "test"):
        if split not in tables:
            raise ChameleonUserError(f"nemo: split_prefixes must give both 'validation' and 'test' (missing {split!r})")
        _check_split_domains(tables[split], weights, split, fmt)
        out[split] = _blend(weights, tables[split], fmt, weighted=False)
    return out


# -- OLMo-core -------------------------------------------------------------------------------


def olmo_source_mixture(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None,
                        max_epochs: Optional[float] = None) -> dict:
    """OLMo-core's ``SourceMixtureList``: ``{"sources": [{source_name, target_ratio, paths,
    max_repetition_ratio[, max_source_fraction]}, ...]}``.

    ``target_ratio`` are the weights (achievable ones with a budget). ``max_repetition_ratio``
    is the repetition cap: ``max_epochs`` (or the budget's), and OLMo-core needs it >= 1, so a
    cap r < 1 is written as ``max_repetition_ratio: 1.0, max_source_fraction: r`` (OLMo-core
    allows ``population x fraction x ratio`` tokens, the same limit). Without a cap but with a
    budget, each source gets the repetition its target needs (its epochs, at least 1), so
    OLMo-core does not refuse the mixture; with neither, the key is left out (OLMo-core's default
    1.0 then allows no repetition).
    """
    fmt = "olmo-core"
    weights = mixture_weights(weights, budget, fmt)
    if max_epochs is None and budget is not None:
        max_epochs = _budget_field(budget, "max_epochs")
    epochs = _budget_field(budget, "epochs") if budget is not None else None
    sources = []
    for domain, weight in weights.items():
        entry = {"source_name": domain, "target_ratio": float(weight), "paths": _paths_of(domain, prefixes, fmt)}
        if max_epochs is not None:
            r = float(max_epochs)
            entry["max_repetition_ratio"] = max(r, 1.0)
            if r < 1.0:
                entry["max_source_fraction"] = r
        elif epochs is not None:
            entry["max_repetition_ratio"] = max(1.0, float(epochs[domain]))
        sources.append(entry)
    return {"sources": sources}


def _yaml():
    try:
        import yaml
    except ImportError as exc:  # pyyaml is a dependency; this is for a broken install
        raise ChameleonUserError("writing YAML needs the package 'pyyaml' (pip install pyyaml)") from exc
    return yaml


def _dump_yaml(doc, header: str) -> str:
    yaml = _yaml()

    class _Indented(yaml.SafeDumper):
        # list items indented under their key, as people write them
        def increase_indent(self, flow=False, indentless=False):
            return super().increase_indent(flow, False)

    body = yaml.dump(doc, Dumper=_Indented, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return header + body


def _header(lines: Sequence[str]) -> str:
    return "".join(f"# {line}\n" for line in lines)


def olmo_source_mixture_yaml(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None,
                             max_epochs: Optional[float] = None) -> str:
    """:func:`olmo_source_mixture` as YAML (``sources:`` list), with the budget in a comment."""
    doc = olmo_source_mixture(weights, prefixes, budget, max_epochs)
    lines = ["OLMo-core source mixture from chameleon_ext: the 'sources' of a SourceMixtureList,",
             "for SourceMixtureDatasetConfig(source_list=..., requested_tokens=..., global_batch_size=...)."]
    if budget is not None:
        lines.append(f"requested_tokens: {int(_budget_field(budget, 'token_budget'))}")
    return _dump_yaml(doc, _header(lines))


# -- nanotron --------------------------------------------------------------------------------


def nanotron_dataset(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None) -> dict:
    """nanotron's ``NanosetDatasetsArgs``: ``{"dataset_folder": [folders], "dataset_weights":
    [weights]}`` (the block under ``data_stages[*].data.dataset`` of a nanotron config)."""
    fmt = "nanotron"
    weights = mixture_weights(weights, budget, fmt)
    folders = _resolved(weights, prefixes, fmt)
    _distinct(folders, fmt)
    return {"dataset_folder": list(folders.values()), "dataset_weights": [float(w) for w in weights.values()]}


def _distinct(paths: Mapping[str, str], fmt: str) -> None:
    owner: Dict[str, str] = {}
    for domain, path in paths.items():
        if path in owner:
            raise ChameleonUserError(f"{fmt}: domains {owner[path]!r} and {domain!r} share the path {path!r}")
        owner[path] = domain


def nanotron_dataset_yaml(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None) -> str:
    doc = {"dataset": nanotron_dataset(weights, prefixes, budget)}
    return _dump_yaml(doc, _header(["nanotron Nanoset mixture from chameleon_ext: paste under data_stages[*].data"]))


# -- Mosaic Streaming ------------------------------------------------------------------------


def mosaic_streams(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None) -> List[dict]:
    """Keyword arguments of one ``streaming.Stream`` per domain, in order: ``{"remote": url}``
    for a path with a scheme (``s3://...``), else ``{"local": path}``, plus ``"proportion"``.
    Every stream has a proportion (Mosaic requires all streams relative or none) and the
    proportions sum to 1 (Mosaic normalises them anyway)."""
    fmt = "mosaic"
    weights = mixture_weights(weights, budget, fmt)
    paths = _resolved(weights, prefixes, fmt)
    _distinct(paths, fmt)
    streams = []
    for domain, weight in weights.items():
        key = "remote" if "://" in paths[domain] else "local"
        streams.append({key: paths[domain], "proportion": float(weight)})
    return streams


def mosaic_streams_yaml(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None) -> str:
    """``streams:`` mapping each domain to its Stream arguments (the layout LLM Foundry's
    ``train_loader.dataset.streams`` uses)."""
    streams = mosaic_streams(weights, prefixes, budget)
    doc = {"streams": dict(zip(mixture_weights(weights, budget, "mosaic"), streams))}
    return _dump_yaml(doc, _header(["Mosaic Streaming streams from chameleon_ext:",
                                    "StreamingDataset(streams=[Stream(**kw) for kw in streams.values()])"]))


# -- TorchTitan ------------------------------------------------------------------------------


def torchtitan_mixture_snippet(weights: Mapping[str, float], prefixes: Prefixes = None, budget=None) -> str:
    """A Python snippet assigning ``CHAMELEON_MIXTURE = DatasetMixConfig(datasets=[
    WeightedDataset(name=..., path=..., weight=...), ...])``. It imports nothing: the script that
    runs it defines or imports ``DatasetMixConfig`` and ``WeightedDataset`` first. Strings and
    floats are written with ``repr``, so the snippet is valid Python for any name or path."""
    fmt = "torchtitan"
    weights = mixture_weights(weights, budget, fmt)
    paths = _resolved(weights, prefixes, fmt)
    lines = ["# TorchTitan data mixture from chameleon_ext (Chameleon domain weights).",
             "# Define or import DatasetMixConfig and WeightedDataset before running this.",
             "CHAMELEON_MIXTURE = DatasetMixConfig(",
             "    datasets=["]
    for domain, weight in weights.items():
        lines.append(f"        WeightedDataset(name={domain!r}, path={paths[domain]!r}, weight={float(weight)!r}),")
    lines += ["    ],", ")", ""]
    return "\n".join(lines)


# -- all formats -----------------------------------------------------------------------------


def _check_formats(formats) -> List[str]:
    if formats is None:
        return list(MIXTURE_FORMATS)
    if isinstance(formats, str):
        formats = [formats]
    formats = list(formats)
    unknown = [f for f in formats if f not in MIXTURE_FORMATS]
    if unknown or not formats:
        raise ChameleonUserError(
            f"unknown export format(s) {unknown or formats}; expected some of {list(MIXTURE_FORMATS)}")
    return list(dict.fromkeys(formats))


def render_mixture_formats(weights_doc, formats=None, prefixes: Prefixes = None,
                           split_prefixes: SplitPrefixes = None, budget=None) -> Dict[str, str]:
    """``{format: file text}`` for a weights.json (path or dict), all formats or ``formats``.

    The budget is ``budget`` or else the document's ``budget`` block (if any)."""
    doc = load_weights(weights_doc)
    weights = doc["weights"]
    if budget is None:
        budget = doc.get("budget")
    texts = {}
    for fmt in _check_formats(formats):
        if fmt == "megatron-per-split":
            texts[fmt] = json.dumps(megatron_per_split_args(weights, prefixes, split_prefixes, budget), indent=2) + "\n"
        elif fmt == "nemo":
            texts[fmt] = json.dumps(nemo_paths(weights, prefixes, split_prefixes, budget), indent=2) + "\n"
        elif fmt == "olmo-core":
            texts[fmt] = olmo_source_mixture_yaml(weights, prefixes, budget)
        elif fmt == "nanotron":
            texts[fmt] = nanotron_dataset_yaml(weights, prefixes, budget)
        elif fmt == "mosaic":
            texts[fmt] = mosaic_streams_yaml(weights, prefixes, budget)
        else:
            texts[fmt] = torchtitan_mixture_snippet(weights, prefixes, budget)
    return texts


def write_mixture_formats(weights_doc, out_dir, formats=None, prefixes: Prefixes = None,
                          split_prefixes: SplitPrefixes = None, budget=None) -> Dict[str, str]:
    """Write the selected formats (all by default) into ``out_dir``; return ``{format: path}``.

    Every text is built before the first file is written, so a path a format cannot hold
    leaves ``out_dir`` untouched; each file is written atomically (:mod:`chameleon_ext.io`).
    """
    texts = render_mixture_formats(weights_doc, formats, prefixes, split_prefixes, budget)
    out_dir = check_writable_folder(os.fspath(out_dir), "export folder")
    paths = {}
    for fmt, text in texts.items():
        paths[fmt] = write_text(os.path.join(out_dir, MIXTURE_FORMATS[fmt]), text, f"{fmt} export")
    return paths
