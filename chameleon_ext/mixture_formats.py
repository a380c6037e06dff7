"""Chameleon domain weights in the formats of particular trainers (docs/method.md, step 6).

The public import path of the trainer-specific formats; the code lives in
:mod:`chameleon_ext.formats` (:mod:`~chameleon_ext.formats.megatron` for Megatron-LM and NeMo,
:mod:`~chameleon_ext.formats.trainers` for OLMo-core, nanotron and Mosaic Streaming,
:mod:`~chameleon_ext.formats.torchtitan`, and :mod:`~chameleon_ext.formats.writer` for the
files). With a token budget every format carries the achievable weights.
"""

from __future__ import annotations

from .formats import trainers
from .formats.megatron import megatron_per_split_args, nemo_paths
from .formats.torchtitan import torchtitan_mixture, torchtitan_mixture_json
from .formats.trainers import *  # noqa: F401,F403  (OLMo-core, nanotron, Mosaic: trainers.__all__)
from .formats.weights_json import budget_weights as mixture_weights
from .formats.writer import MIXTURE_FORMATS, render_mixture_formats, write_mixture_formats

__all__ = [
    "MIXTURE_FORMATS",
    "megatron_per_split_args",
    "nemo_paths",
    *trainers.__all__,
    "torchtitan_mixture",
    "torchtitan_mixture_json",
    "mixture_weights",
    "render_mixture_formats",
    "write_mixture_formats",
]
