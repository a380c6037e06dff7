"""Every trainer format of a weights.json, by name, and the files they are written to.

======================  ====================================  =========================================
format name             file                                  read by (versions: docs/exports.md)
======================  ====================================  =========================================
``megatron``            megatron_data_path.txt                Megatron-LM ``--data-path``
``hf_interleave``       hf_interleave_probabilities.json      ``datasets.interleave_datasets``
``mixture_yaml``        mixture.yaml                          any YAML-configured trainer
``megatron-per-split``  megatron_per_split_data_args.json     Megatron-LM ``--per-split-data-args-path``
``nemo``                nemo_paths.json                       NeMo 2 ``PreTrainingDataModule(paths=...)``
``olmo-core``           olmo_source_mixture.yaml              OLMo-core ``SourceMixtureList.from_yaml``
``olmo-core-mixing``    olmo_mixing_specs.yaml                OLMo-core ``Mixing*SourceSpecConfig``
``nanotron``            nanotron_dataset.yaml                 nanotron ``NanosetDatasetsArgs``
``mosaic``              mosaic_streams.yaml                   Mosaic ``StreamingDataset(streams=...)``
``torchtitan``          torchtitan_mixture.json               TorchTitan ``WeightedDataset`` / ``HFDataSource``
======================  ====================================  =========================================

Every format carries the weights a trainer should follow
(:func:`chameleon_ext.formats.weights_json.trainer_weights`): with a ``budget`` block, its
achievable weights. All texts are built before the first file is written, so a path a format
cannot hold leaves the folder untouched; each file is written atomically
(:mod:`chameleon_ext.io`).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

from .. import io
from ..errors import ChameleonUserError
from .hf import hf_interleave_probabilities
from .megatron import SplitPrefixes, megatron_blend, megatron_per_split_args, nemo_paths
from .mixture_yaml import mixture_yaml
from .paths import Prefixes
from .torchtitan import torchtitan_mixture_json
from .trainers import mosaic_streams_yaml, nanotron_dataset_yaml, olmo_mixing_specs_yaml, olmo_source_mixture_yaml
from .weights_json import budget_weights, load_weights

__all__ = ["EXPORT_FILES", "MIXTURE_FORMATS", "export_formats", "render_exports", "write_exports",
           "render_mixture_formats", "write_mixture_formats"]

# The first three formats, written by every version of chameleon_ext.
EXPORT_FILES = {
    "megatron": "megatron_data_path.txt",
    "hf_interleave": "hf_interleave_probabilities.json",
    "mixture_yaml": "mixture.yaml",
}
# The trainer-specific formats.
MIXTURE_FORMATS = {
    "megatron-per-split": "megatron_per_split_data_args.json",
    "nemo": "nemo_paths.json",
    "olmo-core": "olmo_source_mixture.yaml",
    "olmo-core-mixing": "olmo_mixing_specs.yaml",
    "nanotron": "nanotron_dataset.yaml",
    "mosaic": "mosaic_streams.yaml",
    "torchtitan": "torchtitan_mixture.json",
}
FILES = {**EXPORT_FILES, **MIXTURE_FORMATS}

PathLike = Union[str, "os.PathLike[str]"]


def export_formats() -> List[str]:
    """Every format name :func:`write_exports` knows."""
    return list(FILES)


def _selected(formats, known: Sequence[str]) -> List[str]:
    if formats is None:
        return list(known)
    selected = [formats] if isinstance(formats, str) else list(dict.fromkeys(formats))
    unknown = [f for f in selected if f not in known]
    if unknown or not selected:
        raise ChameleonUserError(f"unknown export format(s) {unknown or selected}; expected some of {list(known)}")
    return selected


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


def _builder(fmt: str, doc: dict, prefixes: Prefixes, split_prefixes, budget) -> Callable[[], str]:
    weights = doc["weights"]
    splits = _splits_for(fmt, split_prefixes) if split_prefixes and set(split_prefixes) <= {
        "valid", "validation", "test"} else split_prefixes
    if fmt == "megatron":
        return lambda: megatron_blend(budget_weights(weights, budget, fmt), prefixes) + "\n"
    if fmt == "hf_interleave":
        return lambda: json.dumps({"domains": doc["domains"], "probabilities": hf_interleave_probabilities(
            budget_weights(weights, budget, fmt), doc["domains"])}, indent=2) + "\n"
    if fmt == "mixture_yaml":
        return lambda: mixture_yaml(budget_weights(weights, budget, fmt), dict(doc, budget=budget))
    if fmt == "megatron-per-split":
        return lambda: json.dumps(megatron_per_split_args(weights, prefixes, splits, budget), indent=2) + "\n"
    if fmt == "nemo":
        return lambda: json.dumps(nemo_paths(weights, prefixes, splits, budget), indent=2) + "\n"
    if fmt == "olmo-core":
        return lambda: olmo_source_mixture_yaml(weights, prefixes, budget)
    if fmt == "olmo-core-mixing":
        return lambda: olmo_mixing_specs_yaml(weights, prefixes, budget)
    if fmt == "nanotron":
        return lambda: nanotron_dataset_yaml(weights, prefixes, budget)
    if fmt == "mosaic":
        return lambda: mosaic_streams_yaml(weights, prefixes, budget)
    return lambda: torchtitan_mixture_json(weights, prefixes, budget)


def render_exports(weights_doc, formats=None, prefixes: Prefixes = None, split_prefixes: SplitPrefixes = None,
                   budget=None, on_skip: Optional[Callable[[str], None]] = None) -> Dict[str, str]:
    """``{format: file text}`` for a weights.json (path or dict): every format, or ``formats``.

    The budget is ``budget`` or else the document's ``budget`` block (if any); every format
    then carries its achievable weights. ``split_prefixes`` (``{"valid"|"test": {domain:
    path}}``) go to the Megatron per-split and NeMo formats. A format that cannot hold the
    domains is an error, or, with ``on_skip``, skipped with one line to ``on_skip``."""
    doc = load_weights(weights_doc)
    if budget is None:
        budget = doc.get("budget")
    texts = {}
    for fmt in _selected(formats, export_formats()):
        try:
            texts[fmt] = _builder(fmt, doc, prefixes, split_prefixes, budget)()
        except ChameleonUserError as exc:
            if on_skip is None:
                raise
            on_skip(f"skipped the {fmt} export ({FILES[fmt]}): {exc}")
    return texts


def _write(texts: Mapping[str, str], out_dir: PathLike) -> Dict[str, str]:
    out = io.check_writable_folder(os.fspath(out_dir), "export folder")
    return {fmt: io.write_text(os.path.join(out, FILES[fmt]), text, f"{fmt} export") for fmt, text in texts.items()}


def write_exports(weights_json, out_dir: PathLike, prefixes: Prefixes = None,
                  on_skip: Optional[Callable[[str], None]] = None, formats: Optional[Sequence[str]] = None,
                  split_prefixes: SplitPrefixes = None) -> Dict[str, str]:
    """Validate a weights.json (path or dict) and write its exports into ``out_dir``: every
    format of :func:`export_formats`, or those named in ``formats``. Returns ``{format: path}``.
    See :func:`render_exports` for the budget, ``split_prefixes`` and ``on_skip``."""
    return _write(render_exports(weights_json, formats, prefixes, split_prefixes, None, on_skip), out_dir)


def render_mixture_formats(weights_doc, formats=None, prefixes: Prefixes = None,
                           split_prefixes: SplitPrefixes = None, budget=None) -> Dict[str, str]:
    """:func:`render_exports` over the trainer-specific formats (:data:`MIXTURE_FORMATS`) only."""
    return render_exports(weights_doc, _selected(formats, list(MIXTURE_FORMATS)), prefixes, split_prefixes, budget)


def write_mixture_formats(weights_doc, out_dir, formats=None, prefixes: Prefixes = None,
                          split_prefixes: SplitPrefixes = None, budget=None) -> Dict[str, str]:
    """Write the selected trainer-specific formats (all by default); return ``{format: path}``."""
    return _write(render_mixture_formats(weights_doc, formats, prefixes, split_prefixes, budget), out_dir)
