"""The model file: :func:`save_model` writes a :class:`~chameleon_ext.model.gpt.GPT` with its
config, weights, content hash and tokenizer record atomically; :func:`load_model` reads it (or a
trainer checkpoint) back, checking every way its content can be unusable."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from .. import io
from ..errors import ChameleonUserError
from .gpt import GPT, MODEL_FORMAT, GPTConfig, state_dict_sha256

__all__ = ["save_model", "load_model", "check_same_config", "check_state_dict"]


def save_model(path: Union[str, os.PathLike], model: GPT, tokenizer: Optional[dict] = None) -> str:
    """Atomically save ``model``'s config, weights and content hash to ``path``; return the hash.

    ``tokenizer``: the :func:`~chameleon_ext.data.tokenizer.tokenizer_record` of the data the
    model was trained on (default: ``model.tokenizer_record``), so that using the model with
    another tokenizer is an error rather than garbage.
    """
    if not isinstance(model, GPT):
        raise ChameleonUserError(f"model: expected a GPT, got {type(model).__name__}")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    digest = state_dict_sha256(sd)
    record = tokenizer if tokenizer is not None else model.tokenizer_record
    io.save_torch({"format": MODEL_FORMAT, "config": model.config.to_dict(), "state_dict": sd,
                   "sha256": digest, "tokenizer": record}, path, "model file")
    return digest


def load_model(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> GPT:
    """Load a model written by :func:`save_model` or a trainer checkpoint (``ckpt.pt``).

    The stored sha256 is verified, so a corrupted file is reported rather than silently used;
    the result's :attr:`GPT.content_hash` equals it. A file whose configuration, tensor names
    or shapes do not make a :class:`GPT`, or whose weights are not all finite, is an error
    naming the file and the fault.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ChameleonUserError(f"model path {path!r} does not exist")
    obj = io.read_torch(path, "model file")
    if isinstance(obj, dict) and "state_dict" in obj and "config" in obj:
        cfg, sd, digest = obj["config"], obj["state_dict"], obj.get("sha256")
    elif isinstance(obj, dict) and "model" in obj and "model_config" in obj:  # trainer checkpoint
        cfg, sd, digest = obj["model_config"], obj["model"], obj.get("model_sha256")
    else:
        raise ChameleonUserError(
            f"model file {path!r} is not a chameleon_ext model or training checkpoint"
        )
    if not isinstance(cfg, Mapping):
        raise ChameleonUserError(
            f"model file {path!r}: its config is {type(cfg).__name__}, expected a mapping of "
            "GPTConfig fields")
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ChameleonUserError(
            f"model file {path!r}: its weights are a {type(sd).__name__}, expected a state dict "
            "(a mapping of names to tensors)")
    if digest is not None and state_dict_sha256(sd) != digest:
        raise ChameleonUserError(f"model file {path!r} is corrupted: its content hash does not match")
    try:
        model = GPT(GPTConfig.from_dict(cfg))
    except (ChameleonUserError, TypeError) as exc:
        raise ChameleonUserError(f"model file {path!r}: bad config: {exc}") from exc
    check_state_dict(model, sd, f"model file {path!r}")
    model.load_state_dict(sd)
    record = obj.get("tokenizer")
    model.tokenizer_record = dict(record) if isinstance(record, dict) else None
    return model.to(map_location)


def check_same_config(model: "GPT", saved: Mapping[str, Any], source: str) -> None:
    """Raise ChameleonUserError naming ``source`` unless the config ``saved`` (a dict) equals
    ``model``'s."""
    cur = model.config.to_dict()
    diff = [k for k in cur if cur[k] != saved.get(k)]
    if diff:
        k = diff[0]
        raise ChameleonUserError(
            f"{source}: model {k} is {saved.get(k)!r} there but {cur[k]!r} in the given model; "
            "build the model with the same configuration")


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ChameleonUserError naming ``source`` unless ``sd`` has exactly ``model``'s tensor
    names and shapes and only finite floating-point values."""
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    if missing:
        raise ChameleonUserError(f"{source}: missing weights {missing[:3]}"
                                 + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    extra = sorted(set(sd) - set(want))
    if extra:
        raise ChameleonUserError(f"{source}: unexpected weights {extra[:3]}"
                                 + (f" and {len(extra) - 3} more" if len(extra) > 3 else ""))
    for name, t in want.items():
        if tuple(sd[name].shape) != tuple(t.shape):
            raise ChameleonUserError(
                f"{source}: weight {name!r} has shape {list(sd[name].shape)}, the config needs "
                f"{list(t.shape)}")
        if sd[name].is_floating_point() and not bool(torch.isfinite(sd[name]).all()):
            raise ChameleonUserError(
                f"{source}: weight {name!r} holds NaN or infinite values (a diverged run?)")

