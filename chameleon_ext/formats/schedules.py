"""Exports of a mixture schedule (:mod:`chameleon_ext.schedule`) for other trainers.

Per stage: nanotron ``data_stages`` (YAML), Megatron-LM (one ``--data-path`` blend per stage
with its iteration range; JSON and text), OLMo-core (per-stage ``sources``, YAML), Levanter /
Marin (``train_weights: [[step, {domain: weight}], ...]``, the one stack that follows a schedule
natively), a generic YAML, Hugging Face ``interleave_datasets`` probabilities per stage (JSON),
and a plot of the weights over training.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Union

from .. import io
from ..errors import ChameleonUserError
from ..schedule import SCHEDULE_FORMAT, as_schedule
from .hf import hf_interleave_probabilities
from .megatron import megatron_blend
from .text import dump_yaml
from .trainers import nanotron_dataset, olmo_source_mixture

__all__ = [
    "SCHEDULE_EXPORT_FILES",
    "nanotron_data_stages",
    "nanotron_data_stages_yaml",
    "megatron_stages",
    "megatron_stages_text",
    "olmo_core_stages_yaml",
    "levanter_train_weights",
    "levanter_train_weights_yaml",
    "schedule_yaml",
    "hf_interleave_stages",
    "schedule_export_formats",
    "write_schedule_exports",
]

PathLike = Union[str, "os.PathLike[str]"]

# kind -> file written by write_schedule_exports
SCHEDULE_EXPORT_FILES = {
    "nanotron": "nanotron_data_stages.yaml",
    "megatron": "megatron_stages.json",
    "megatron_text": "megatron_stages.txt",
    "olmo-core": "olmo_core_stages.yaml",
    "levanter": "levanter_train_weights.yaml",
    "yaml": "schedule.yaml",
    "hf_interleave": "hf_interleave_stages.json",
    "plot": "schedule.png",
}

# export format name (``chameleon export --schedule --format``) -> the kinds it writes
_SCHEDULE_FORMATS = {"nanotron": ("nanotron",), "megatron": ("megatron", "megatron_text"),
                     "olmo-core": ("olmo-core",), "levanter": ("levanter",), "yaml": ("yaml",), "hf_interleave": ("hf_interleave",),
                     "plot": ("plot",)}





def nanotron_data_stages(schedule, prefixes=None) -> List[dict]:
    """nanotron's ``data_stages``: one stage per entry, ``start_training_step`` 1-based (nanotron
    counts steps from 1, so an entry starting after N completed steps starts at N + 1), the
    dataset block as :func:`chameleon_ext.formats.trainers.nanotron_dataset` writes it."""
    s = as_schedule(schedule)
    return [{"name": f"stage_{i}", "start_training_step": e.start_step + 1,
             "data": {"dataset": nanotron_dataset(e.weights, prefixes)}} for i, e in enumerate(s.entries)]


def nanotron_data_stages_yaml(schedule, prefixes=None) -> str:
    doc = {"data_stages": nanotron_data_stages(schedule, prefixes)}
    return dump_yaml(doc, ["nanotron data stages from a chameleon_ext schedule: paste as data_stages",
                          "(add num_loading_workers / seed under each stage's data as your config needs)"])


def megatron_stages(schedule, prefixes=None) -> dict:
    """Megatron-LM: per stage, the ``--data-path`` blend and the iterations it covers,
    ``[start_iteration, end_iteration)`` counted as completed steps (``end_iteration`` null for
    an open-ended last stage), plus the arguments every stage's launch shares.

    Megatron takes one blend per launch. Run the stages one after the other, each resuming
    from the previous one's checkpoint with its own ``--data-path``, and give every launch the
    *same* ``--train-iters`` / ``--lr-decay-iters`` (the whole run) and
    ``--phase-transition-iterations`` (the stage starts after the first; Megatron-LM with
    megatron-core >= 0.16 saves and exits at each, and rebuilds the data for the next stage
    from there). A ``--train-iters`` per stage would decay the learning rate to its end in
    every stage, and a resumed run then fails Megatron's scheduler check. The global batch
    size must stay fixed across stages (Megatron checks it on resume)."""
    s = as_schedule(schedule)
    transitions = [e.start_step for e in s.entries[1:]]
    return {"format": SCHEDULE_FORMAT, "domains": list(s.domains),
            "train_iters": s.end_step,
            "phase_transition_iterations": transitions,
            "stages": [{"start_iteration": st["start_step"], "end_iteration": st["end_step"],
                        "start_token": st["start_token"], "data_path": megatron_blend(st["weights"], prefixes)}
                       for st in s.stages()]}


def megatron_stages_text(schedule, prefixes=None) -> str:
    """:func:`megatron_stages` as text: the arguments shared by every launch, then per stage a
    comment line with the iteration range and that stage's ``--data-path``."""
    doc = megatron_stages(schedule, prefixes)
    iters = "<the whole run's iterations>" if doc["train_iters"] is None else str(doc["train_iters"])
    lines = ["# Megatron-LM (megatron-core >= 0.16): one launch per stage, each resuming (--load) from the last;",
             f"# every launch: --train-iters {iters} --lr-decay-iters {iters}"
             + (f" --phase-transition-iterations {','.join(map(str, doc['phase_transition_iterations']))}"
                if doc["phase_transition_iterations"] else "")]
    for st in doc["stages"]:
        end = "end" if st["end_iteration"] is None else st["end_iteration"]
        lines.append(f"# iterations [{st['start_iteration']}, {end})")
        lines.append(f"--data-path {st['data_path']}")
    return "\n".join(lines) + "\n"


def levanter_train_weights(schedule) -> List[list]:
    """Levanter / Marin's ``train_weights``: ``[[start_step, {domain: weight}], ...]``, the
    form of ``LMMixtureDatasetConfig.train_weights`` (and ``LmDataConfig``) that changes the
    mixture during training. Levanter's steps are optimiser steps, as the schedule's are."""
    s = as_schedule(schedule)
    return [[e.start_step, dict(e.weights)] for e in s.entries]


def levanter_train_weights_yaml(schedule) -> str:
    doc = {"train_weights": levanter_train_weights(schedule)}
    return dump_yaml(doc, ["Levanter / Marin mixture schedule from chameleon_ext: paste under the data config",
                           "(its configs/components must be named as the domains)"])


def olmo_core_stages_yaml(schedule, prefixes=None) -> str:
    """OLMo-core: per stage, the step range and the ``sources`` of a ``SourceMixtureList``
    (:func:`chameleon_ext.formats.trainers.olmo_source_mixture`)."""
    s = as_schedule(schedule)
    stages = [{"start_step": st["start_step"], "end_step": st["end_step"], "start_token": st["start_token"],
               **olmo_source_mixture(st["weights"], prefixes)} for st in s.stages()]
    return dump_yaml({"stages": stages}, ["OLMo-core source mixtures per stage, from a chameleon_ext schedule"])


def schedule_yaml(schedule) -> str:
    """A generic YAML: the domains, the budget and per stage ``mixture: [{name, weight}]``
    (the per-stage form of :func:`chameleon_ext.formats.mixture_yaml.mixture_yaml`)."""
    s = as_schedule(schedule)
    doc = {"format": SCHEDULE_FORMAT, "domains": list(s.domains), "token_budget": s.token_budget,
           "tokens_per_step": s.tokens_per_step,
           "stages": [{"start_step": st["start_step"], "end_step": st["end_step"], "start_token": st["start_token"],
                       "mixture": [{"name": d, "weight": w} for d, w in st["weights"].items()]}
                      for st in s.stages()]}
    return dump_yaml(doc, ["mixture schedule from chameleon_ext"])


def hf_interleave_stages(schedule) -> dict:
    """Hugging Face: per stage, the ``probabilities=`` of ``datasets.interleave_datasets``
    (datasets in ``domains`` order; each list sums to 1), with its step range."""
    s = as_schedule(schedule)
    return {"domains": list(s.domains),
            "stages": [{"start_step": st["start_step"], "end_step": st["end_step"], "start_token": st["start_token"],
                        "probabilities": hf_interleave_probabilities(st["weights"], s.domains)}
                       for st in s.stages()]}


def schedule_export_formats() -> List[str]:
    """The format names :func:`write_schedule_exports` takes (``megatron`` writes both the
    JSON and the text file)."""
    return list(_SCHEDULE_FORMATS)


def write_schedule_exports(schedule, out_dir: PathLike, prefixes=None,
                           on_skip: Optional[Callable[[str], None]] = None,
                           formats: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Write every export of a schedule (path, dict or :class:`Schedule`) into ``out_dir``, or
    only those of ``formats`` (names of :func:`schedule_export_formats`); returns
    ``{kind: path}`` with the kinds of :data:`SCHEDULE_EXPORT_FILES`.

    All texts are built before the first file is written. An export whose format cannot hold
    the domains (a Megatron prefix with whitespace, two domains sharing a path) is an error; with
    ``on_skip`` it is skipped with one line saying why, and the others are written. The plot is
    skipped (with a warning) when matplotlib is missing.
    """
    s = as_schedule(schedule)
    known = schedule_export_formats()
    selected = known if formats is None else list(dict.fromkeys([formats] if isinstance(formats, str) else formats))
    unknown = [f for f in selected if f not in known]
    if unknown or not selected:
        raise ChameleonUserError(f"unknown schedule export format(s) {unknown or selected}; expected some of {known}")
    kinds = {k for f in selected for k in _SCHEDULE_FORMATS[f]}
    builders = {
        "nanotron": lambda: nanotron_data_stages_yaml(s, prefixes),
        "megatron": lambda: json.dumps(megatron_stages(s, prefixes), indent=2) + "\n",
        "megatron_text": lambda: megatron_stages_text(s, prefixes),
        "olmo-core": lambda: olmo_core_stages_yaml(s, prefixes),
        "levanter": lambda: levanter_train_weights_yaml(s),
        "yaml": lambda: schedule_yaml(s),
        "hf_interleave": lambda: json.dumps(hf_interleave_stages(s), indent=2) + "\n",
    }
    texts = {}
    for kind, build in builders.items():
        if kind not in kinds:
            continue
        try:
            texts[kind] = build()
        except ChameleonUserError as exc:
            if on_skip is None:
                raise
            on_skip(f"skipped the {kind} export ({SCHEDULE_EXPORT_FILES[kind]}): {exc}")
    out = io.check_writable_folder(os.fspath(out_dir), "export folder")
    paths = {}
    for kind, text in texts.items():
        paths[kind] = io.write_text(os.path.join(out, SCHEDULE_EXPORT_FILES[kind]), text, f"{kind} export")
    if "plot" in kinds:
        from ..plots import plot_schedule  # here: matplotlib's plumbing loads only for a figure

        png = plot_schedule(s, os.path.join(out, SCHEDULE_EXPORT_FILES["plot"]))
        if png is not None:
            paths["plot"] = png
    return paths
