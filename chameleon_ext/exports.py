"""Exports of Chameleon domain weights for the trainers people use (docs/method.md, step 6).

The public import path of the weights.json reader and of every trainer format; the code lives
in :mod:`chameleon_ext.formats` (by kind: the weights.json schema, each trainer's format, the
schedule formats). Every export carries the weights a trainer should follow: with a token
budget, the budget's achievable weights (:func:`trainer_weights`).
"""

from __future__ import annotations

from .formats.hf import hf_interleave_probabilities
from .formats.megatron import megatron_blend, parse_megatron_blend
from .formats.mixture_yaml import META_KEYS, mixture_yaml, parse_mixture_yaml
from .formats.weights_json import (
    BUDGET_TOLERANCE,
    SUM_TOLERANCE,
    WEIGHTS_FORMAT,
    budget_weights,
    load_weights,
    trainer_weights,
    write_weights_json,
)
from .formats.writer import EXPORT_FILES, FILES, MIXTURE_FORMATS, export_formats, render_exports, write_exports

__all__ = [
    "load_weights",
    "trainer_weights",
    "budget_weights",
    "write_weights_json",
    "megatron_blend",
    "parse_megatron_blend",
    "hf_interleave_probabilities",
    "mixture_yaml",
    "parse_mixture_yaml",
    "render_exports",
    "write_exports",
    "export_formats",
    "EXPORT_FILES",
    "MIXTURE_FORMATS",
    "FILES",
    "META_KEYS",
    "WEIGHTS_FORMAT",
    "SUM_TOLERANCE",
    "BUDGET_TOLERANCE",
]
