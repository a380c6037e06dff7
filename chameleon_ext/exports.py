"""Exports of Chameleon domain weights for the trainers people use (docs/method.md, step 6).

A ``weights.json`` (see :mod:`chameleon_ext.weights`) holds the per-domain mixture weights
alpha. This module validates such a file and turns its ``weights`` into what each trainer
reads:

* Megatron-LM: the ``--data-path`` blend string ``"w1 prefix1 w2 prefix2 ..."``;
* Hugging Face ``datasets.interleave_datasets(..., probabilities=[...])``;
* a YAML mixture (``mixture: [{name, weight}, ...]``) for config-driven trainers.

Every weight is written with Python's shortest round-trip representation (``repr``), so an
export parses back to exactly the same floats. Files are written through
:func:`chameleon_ext.io.atomic_write`, so a trainer never reads a half-written mixture.

The weights.json format (``"format": "chameleon_ext.weights/2"``): ``domains`` (list),
``weights``, ``leverage`` (the scores fed to the softmax) and ``leverage_raw`` (the kernel ridge
leverage scores), each ``{domain: float}``; ``mode``, ``lambda``, ``temperature``,
``normalize`` (bool); ``proxy`` and ``embedding`` (provenance). Format 1 files (no
``format`` key; ``krls``, ``krls_raw`` and ``normalization`` instead) are read and upgraded.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections import Counter
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import yaml

from . import io
from .errors import ChameleonUserError

__all__ = [
    "load_weights",
    "megatron_blend",
    "parse_megatron_blend",
    "hf_interleave_probabilities",
    "mixture_yaml",
    "parse_mixture_yaml",
    "write_exports",
    "export_formats",
    "EXPORT_FILES",
    "WEIGHTS_FORMAT",
]

WEIGHTS_FORMAT = "chameleon_ext.weights/2"
# Format 1 field -> format 2 field (the scores were named like the op that computes them).
_FORMAT1_RENAMES = {"krls": "leverage", "krls_raw": "leverage_raw"}

SUM_TOLERANCE = 1e-6
REQUIRED_KEYS = ("domains", "weights")
# Metadata copied from a weights file into the ``chameleon:`` block of mixture.yaml.
META_KEYS = ("mode", "lambda", "temperature", "normalize")
# kind -> file name written by :func:`write_exports`.
EXPORT_FILES = {
    "megatron": "megatron_data_path.txt",
    "hf_interleave": "hf_interleave_probabilities.json",
    "mixture_yaml": "mixture.yaml",
}

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    # numbers.Real admits numpy scalars; bool is an int subclass, and a ``true`` weight in a
    # JSON file is a mistake, not 1.0.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_weight_values(weights: Mapping[str, float], source: str) -> Dict[str, float]:
    """Every weight a finite number >= 0; returns them as floats in the mapping's order."""
    if not isinstance(weights, Mapping):
        raise ChameleonUserError(f"{source}: weights must be a mapping domain -> weight, got {type(weights).__name__}")
    if len(weights) == 0:
        raise ChameleonUserError(f"{source}: weights is empty (no domains)")
    if isinstance(weights.get("weights"), Mapping):
        raise ChameleonUserError(
            f"{source}: got a whole weights.json document; pass its 'weights' entry (not the whole file)"
        )
    out: Dict[str, float] = {}
    for name, value in weights.items():
        if not isinstance(name, str) or not name:
            raise ChameleonUserError(f"{source}: domain names must be non-empty strings, got {name!r}")
        if not _is_number(value):
            raise ChameleonUserError(f"{source}: weight of domain {name!r} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ChameleonUserError(f"{source}: weight of domain {name!r} is not finite ({value!r})")
        if value < 0:
            raise ChameleonUserError(f"{source}: weight of domain {name!r} is negative ({value!r})")
        out[name] = value
    return out


def _check_domains(domains, source: str) -> List[str]:
    """``domains`` must be a list of distinct non-empty strings."""
    if not isinstance(domains, (list, tuple)):
        raise ChameleonUserError(f"{source}: 'domains' must be a list of domain names, got {type(domains).__name__}")
    if len(domains) == 0:
        raise ChameleonUserError(f"{source}: 'domains' is empty")
    for name in domains:
        if not isinstance(name, str) or not name:
            raise ChameleonUserError(f"{source}: 'domains' must hold non-empty strings, got {name!r}")
    duplicates = sorted(d for d, count in Counter(domains).items() if count > 1)
    if duplicates:
        raise ChameleonUserError(f"{source}: 'domains' lists {duplicates} more than once")
    return list(domains)


def _check_same_domains(domains: Sequence[str], names: Sequence[str], source: str, what: str) -> None:
    """The set of ``names`` (keys of ``what``) must equal the set of ``domains``."""
    name_set, domain_set = set(names), set(domains)
    missing = [d for d in domains if d not in name_set]
    extra = [n for n in names if n not in domain_set]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"not in domains {extra}")
        raise ChameleonUserError(f"{source}: {what} do not match 'domains' ({'; '.join(parts)})")


def upgrade_weights_doc(doc: dict, source: str) -> dict:
    """A weights document in the current format: format 1 (no ``format`` key) is renamed
    field by field; an unknown format is an error naming the file."""
    fmt = doc.get("format")
    if fmt == WEIGHTS_FORMAT:
        return doc
    if fmt is not None:
        raise ChameleonUserError(f"{source}: unknown weights format {fmt!r} (this version reads {WEIGHTS_FORMAT!r})")
    doc = dict(doc)
    for old, new in _FORMAT1_RENAMES.items():
        if old in doc and new not in doc:
            doc[new] = doc.pop(old)
    doc.pop("normalization", None)  # said the same as the boolean 'normalize'
    doc["format"] = WEIGHTS_FORMAT
    return doc


def load_weights(path_or_dict: Union[PathLike, Mapping]) -> dict:
    """Read and validate a ``weights.json`` (a path) or an already-loaded weights dict.

    Checks that ``domains`` and ``weights`` are present, that ``weights`` has exactly the
    ``domains`` as keys, that every weight is a finite number >= 0 and that they sum to 1
    within 1e-6. Returns a copy of the document in the current format (format 1 files are
    upgraded) whose ``weights`` are floats ordered as ``domains`` (the contract's order; a
    hand-edited file with shuffled keys is accepted). A file inside an output set with a
    manifest is checked against it (:mod:`chameleon_ext.manifest`).
    Every problem raises :class:`ChameleonUserError` naming the file and what is wrong.
    """
    if isinstance(path_or_dict, Mapping):
        source, doc = "weights dict", dict(path_or_dict)
    elif isinstance(path_or_dict, (str, os.PathLike)):
        from .manifest import check_member

        source = os.fspath(path_or_dict)
        doc = io.read_json(source, "weights file")
        check_member(source, "weights file")
    else:
        raise ChameleonUserError(
            f"load_weights expects a path to weights.json or a dict, got {type(path_or_dict).__name__}"
        )
    doc = upgrade_weights_doc(doc, source)
    missing = [key for key in REQUIRED_KEYS if key not in doc]
    if missing:
        raise ChameleonUserError(f"{source}: missing required key(s) {missing}")
    domains = _check_domains(doc["domains"], source)
    weights = _check_weight_values(doc["weights"], source)
    _check_same_domains(domains, list(weights), source, "'weights' keys")
    total = math.fsum(weights.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ChameleonUserError(
            f"{source}: weights must sum to 1 (within {SUM_TOLERANCE:g}), got sum {total!r}"
        )
    doc["domains"] = domains
    doc["weights"] = {d: weights[d] for d in domains}
    return doc


# --------------------------------------------------------------------------------------------
# Megatron-LM
# --------------------------------------------------------------------------------------------


def _format_weight(weight: float) -> str:
    # repr is the shortest string that float() maps back to the same double.
    return repr(float(weight))


def megatron_blend(weights: Mapping[str, float], prefixes: Optional[Mapping[str, str]] = None) -> str:
    """The Megatron-LM ``--data-path`` blend ``"w1 prefix1 w2 prefix2 ..."``.

    Domains keep the order of ``weights``. ``prefixes`` maps domains to their data prefix
    (the path of the ``.bin``/``.idx`` pair without extension); a domain it does not name
    (or every domain, without ``prefixes``) uses its own name as prefix; entries for other
    names are ignored. Megatron splits the argument on whitespace, so a prefix containing any is
    refused, as are two domains sharing a prefix. Weights are not renormalised (Megatron normalises the blend itself).
    """
    weights = _check_weight_values(weights, "megatron_blend")
    if prefixes is None:
        prefixes = {}
    elif not isinstance(prefixes, Mapping):
        raise ChameleonUserError(f"megatron_blend: prefixes must map domain -> prefix, got {type(prefixes).__name__}")
    tokens = []
    owner: Dict[str, str] = {}  # prefix -> the domain that uses it
    for domain, weight in weights.items():
        prefix = prefixes.get(domain, domain)
        if not isinstance(prefix, str) or not prefix:
            raise ChameleonUserError(
                f"megatron_blend: prefix of domain {domain!r} must be a non-empty string, got {prefix!r}"
            )
        if any(ch.isspace() for ch in prefix):
            raise ChameleonUserError(
                f"megatron_blend: prefix {prefix!r} of domain {domain!r} contains whitespace; "
                "Megatron splits --data-path on whitespace, so rename or symlink the data"
            )
        if prefix in owner:
            # Megatron would sample the same files under two domains, summing their weights.
            raise ChameleonUserError(
                f"megatron_blend: domains {owner[prefix]!r} and {domain!r} share the prefix {prefix!r}"
            )
        owner[prefix] = domain
        tokens += [_format_weight(weight), prefix]
    return " ".join(tokens)


def parse_megatron_blend(blend: str) -> Dict[str, float]:
    """Inverse of :func:`megatron_blend`: ``"w1 p1 w2 p2 ..."`` -> ``{p1: w1, p2: w2, ...}``."""
    if not isinstance(blend, str):
        raise ChameleonUserError(f"Megatron blend must be a string, got {type(blend).__name__}")
    tokens = blend.split()
    if not tokens:
        raise ChameleonUserError("Megatron blend string is empty")
    if len(tokens) % 2:
        raise ChameleonUserError(
            f"Megatron blend must alternate weight and prefix (an even number of tokens), got {len(tokens)} tokens"
        )
    out: Dict[str, float] = {}
    for raw_weight, prefix in zip(tokens[0::2], tokens[1::2]):
        try:
            weight = float(raw_weight)
        except ValueError:
            raise ChameleonUserError(
                f"Megatron blend: weight {raw_weight!r} (before prefix {prefix!r}) is not a number"
            ) from None
        if not math.isfinite(weight) or weight < 0:
            raise ChameleonUserError(
                f"Megatron blend: weight of prefix {prefix!r} must be finite and >= 0, got {raw_weight!r}"
            )
        if prefix in out:
            raise ChameleonUserError(f"Megatron blend: prefix {prefix!r} appears more than once")
        out[prefix] = weight
    return out


# --------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------


def hf_interleave_probabilities(weights: Mapping[str, float], domains: Optional[Sequence[str]] = None) -> List[float]:
    """The ``probabilities=`` list for ``datasets.interleave_datasets``, in ``domains`` order.

    ``domains`` defaults to the order of ``weights`` and must otherwise name exactly its keys
    (it is the order of the datasets passed to ``interleave_datasets``). The weights are
    renormalised so that ``sum(probabilities) == 1.0`` in float arithmetic whenever possible:
    the rounding residue goes on the largest entry, where it changes the mixture least (or on
    the last non-zero entry when the largest cannot absorb it exactly). Only when the last
    non-zero entry is smaller than the residue itself can a few ulps of 1.0 remain.
    """
    weights = _check_weight_values(weights, "hf_interleave_probabilities")
    if domains is None:
        domains = list(weights)
    else:
        domains = _check_domains(list(domains), "hf_interleave_probabilities")
        _check_same_domains(domains, list(weights), "hf_interleave_probabilities", "weights keys")
    values = [weights[d] for d in domains]
    total = math.fsum(values)
    if total <= 0.0:
        raise ChameleonUserError("hf_interleave_probabilities: all weights are zero, nothing to sample")
    if not math.isfinite(total):
        raise ChameleonUserError(f"hf_interleave_probabilities: the weights' sum overflows ({total!r})")
    probs = [v / total for v in values]
    # The residue goes on the largest entry, where it changes the mixture least. When the
    # rounding of the running sum cannot be steered through that entry, the last non-zero
    # entry takes it: it is added last, so 1.0 - (sum of the rest) is exact for it.
    largest = max(range(len(probs)), key=probs.__getitem__)
    if not _absorb_residue(probs, largest):
        # The last non-zero entry is added last: set it to 1 - (sum of those before it).
        # For s in [0.5, 1] that difference is exact (Sterbenz), and for s < 0.5 the final
        # addition rounds back to exactly 1.0, so the sum is 1.0 whenever it stays >= 0. The
        # change is the rounding residue of the sum: a few ulps of 1.0 in absolute terms.
        last = max(i for i, p in enumerate(probs) if p > 0.0)
        before = sum(probs[:last])
        if before <= 1.0:
            probs[last] = 1.0 - before
    return probs


_RESIDUE_MAX_REL_CHANGE = 1e-9  # a residue is a few ulps; never let it reshape a small entry
_RESIDUE_MAX_ULP_STEPS = 64


def _absorb_residue(probs: List[float], i: int) -> bool:
    """Change ``probs[i]`` (in place) so that ``sum(probs) == 1.0`` exactly, as Python's
    left-to-right ``sum`` computes it. Returns False, with ``probs`` unchanged, when no value
    within a relative ``1e-9`` of the original gets there."""
    start = probs[i]

    def within_bounds() -> bool:
        return abs(probs[i] - start) <= _RESIDUE_MAX_REL_CHANGE * start

    # Usually one or two steps of "add what is missing" settle it.
    for _ in range(4):
        residue = 1.0 - sum(probs)
        if residue == 0.0:
            if within_bounds():
                return True
            break
        probs[i] += residue
        if not within_bounds():
            break
    else:
        # Rounding of the partial sums after entry i can hide the residue: walk entry i one
        # ulp at a time towards 1.0 (the sum is monotone in it) until it lands or jumps over.
        direction = math.inf if sum(probs) < 1.0 else -math.inf
        for _ in range(_RESIDUE_MAX_ULP_STEPS):
            probs[i] = math.nextafter(probs[i], direction)
            if not within_bounds():
                break
            total = sum(probs)
            if total == 1.0:
                return True
            if (total > 1.0) == (direction > 0):
                break
    probs[i] = start
    return False


# --------------------------------------------------------------------------------------------
# YAML mixture
# --------------------------------------------------------------------------------------------


def _mixture_doc(weights: Mapping[str, float], meta: Optional[Mapping]) -> dict:
    weights = _check_weight_values(weights, "mixture_yaml")
    doc: dict = {"mixture": [{"name": d, "weight": w} for d, w in weights.items()]}
    if meta:
        chameleon = {key: meta[key] for key in META_KEYS if key in meta}
        for key, value in chameleon.items():
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise ChameleonUserError(f"mixture_yaml: meta[{key!r}] must be a scalar, got {type(value).__name__}")
        if chameleon:
            doc["chameleon"] = chameleon
    return doc


def mixture_yaml(weights: Mapping[str, float], meta: Optional[Mapping] = None) -> str:
    """A YAML mixture, domains in the order of ``weights``::

        mixture:
          - name: web
            weight: 0.31
          ...
        chameleon:
          mode: pretrain
          lambda: 10.0
          temperature: 5.0

    ``meta`` may be a whole weights.json dict: only ``mode``, ``lambda``, ``temperature`` and
    ``normalize`` are copied under ``chameleon:``.
    """
    doc = _mixture_doc(weights, meta)

    class _IndentedDumper(yaml.SafeDumper):
        # pyyaml writes list items flush with their key by default; indent them as people do.
        def increase_indent(self, flow=False, indentless=False):
            return super().increase_indent(flow, False)

    return yaml.dump(doc, Dumper=_IndentedDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def parse_mixture_yaml(text: str) -> Dict[str, float]:
    """Inverse of :func:`mixture_yaml`: YAML text -> ``{name: weight}`` in file order."""
    if not isinstance(text, str):
        raise ChameleonUserError(f"mixture YAML must be a string, got {type(text).__name__}")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ChameleonUserError(f"mixture YAML is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict) or "mixture" not in doc:
        raise ChameleonUserError("mixture YAML has no top-level 'mixture' list")
    entries = doc["mixture"]
    if not isinstance(entries, list) or not entries:
        raise ChameleonUserError("mixture YAML: 'mixture' must be a non-empty list of {name, weight} entries")
    out: Dict[str, float] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "weight" not in entry:
            raise ChameleonUserError(f"mixture YAML: entry {i} must have 'name' and 'weight', got {entry!r}")
        name, raw = str(entry["name"]), entry["weight"]
        try:
            # A weight may come back as a string ('1e-05' is not a float in YAML 1.1).
            weight = float(raw) if not isinstance(raw, bool) else math.nan
        except (TypeError, ValueError):
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise ChameleonUserError(f"mixture YAML: weight of {name!r} must be a finite number >= 0, got {raw!r}")
        if name in out:
            raise ChameleonUserError(f"mixture YAML: domain {name!r} appears more than once")
        out[name] = weight
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def export_formats() -> List[str]:
    """Every export name :func:`write_exports` knows: this module's own kinds
    (:data:`EXPORT_FILES`) and the trainer formats of :mod:`chameleon_ext.mixture_formats`."""
    from .mixture_formats import MIXTURE_FORMATS

    return list(EXPORT_FILES) + list(MIXTURE_FORMATS)


def write_exports(
    weights_json: Union[PathLike, Mapping],
    out_dir: PathLike,
    prefixes: Optional[Mapping[str, str]] = None,
    on_skip: Optional[Callable[[str], None]] = None,
    formats: Optional[Sequence[str]] = None,
    split_prefixes: Optional[Mapping[str, Mapping[str, str]]] = None,
) -> Dict[str, str]:
    """Validate a weights.json (path or dict) and write its exports into ``out_dir``: all of
    :func:`export_formats` by default, or those named in ``formats``.

    This module's kinds are ``megatron_data_path.txt``, ``hf_interleave_probabilities.json``
    (``{"domains": [...], "probabilities": [...]}``) and ``mixture.yaml``; the trainer formats
    (Megatron per-split args, NeMo, OLMo-core, nanotron, Mosaic Streaming, TorchTitan) come
    from :mod:`chameleon_ext.mixture_formats` and follow the document's ``budget`` block when it
    has one. Returns ``{name: path}``. All exports are built before the first file is written,
    so a bad prefix leaves ``out_dir`` untouched.

    An export whose format cannot hold the domains (a domain name with whitespace cannot be a
    Megatron prefix) is an error; with ``on_skip``, that export is skipped instead, ``on_skip``
    gets one line saying why, and the others are written.
    """
    from .mixture_formats import MIXTURE_FORMATS, render_mixture_formats

    doc = load_weights(weights_json)
    known = export_formats()
    if formats is None:
        selected = known
    else:
        selected = [formats] if isinstance(formats, str) else list(dict.fromkeys(formats))
        unknown = [f for f in selected if f not in known]
        if unknown or not selected:
            raise ChameleonUserError(f"unknown export format(s) {unknown or selected}; expected some of {known}")
    domains, weights = doc["domains"], doc["weights"]
    builders = {
        "megatron": lambda: megatron_blend(weights, prefixes) + "\n",
        "hf_interleave": lambda: json.dumps(
            {"domains": domains, "probabilities": hf_interleave_probabilities(weights, domains)}, indent=2) + "\n",
        "mixture_yaml": lambda: mixture_yaml(weights, doc),
    }
    for fmt in MIXTURE_FORMATS:
        builders[fmt] = (lambda fmt=fmt: render_mixture_formats(
            doc, [fmt], prefixes, _splits_for(fmt, split_prefixes))[fmt])
    files = {**EXPORT_FILES, **MIXTURE_FORMATS}
    texts = {}
    for kind in selected:
        try:
            texts[kind] = builders[kind]()
        except ChameleonUserError as exc:
            if on_skip is None:
                raise
            on_skip(f"skipped the {kind} export ({files[kind]}): {exc}")
    out_dir = io.check_writable_folder(os.fspath(out_dir), "export folder")
    paths = {}
    for kind, text in texts.items():
        path = os.path.join(out_dir, files[kind])
        io.write_text(path, text, f"{kind} export")
        paths[kind] = path
    return paths


def _splits_for(fmt: str, split_prefixes):
    """Held-out split prefixes under the names each format uses (Megatron says ``valid``,
    NeMo ``validation``); formats without held-out splits get none."""
    if not split_prefixes:
        return None
    valid = split_prefixes.get("valid") or split_prefixes.get("validation")
    test = split_prefixes.get("test")
    if fmt == "megatron-per-split":
        table = {"valid": valid, "test": test}
    elif fmt == "nemo":
        table = {"validation": valid, "test": test}
    else:
        return None
    return {k: v for k, v in table.items() if v} or None
