"""Every file format chameleon_ext reads or writes for mixtures, by kind.

* :mod:`.weights_json`: the weights.json schema (reader, checks, writer) and
  :func:`~.weights_json.trainer_weights`, the weights a trainer follows (achievable ones under a
  token budget);
* trainer mixture formats: :mod:`.megatron` (Megatron-LM, NeMo), :mod:`.hf`
  (``interleave_datasets``), :mod:`.mixture_yaml`, :mod:`.trainers` (OLMo-core, nanotron,
  Mosaic Streaming), :mod:`.torchtitan`, with the paths they can hold in :mod:`.paths`;
  :mod:`.writer` names them and writes the files;
* :mod:`.schedules`: the per-stage exports of a mixture schedule.

This package imports none of its modules itself, so that :mod:`chameleon_ext.schedule` can use
:mod:`.weights_json` while :mod:`.schedules` uses :mod:`chameleon_ext.schedule`.
"""
