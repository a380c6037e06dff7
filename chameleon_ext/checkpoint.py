"""The trainer's checkpoint: its format, its verification, and RNG capture/restore.

A checkpoint (``ckpt.pt``) holds everything an exact resume needs:

* ``model`` (CPU state dict), ``model_config`` and ``model_sha256`` (the same hash as a
  ``model.pt``, so :func:`chameleon_ext.model.load_model` reads a checkpoint as a model);
* ``optimizer`` (AdamW state), ``step`` and ``train_config`` (the cosine schedule is a pure
  function of the step and the config, so it needs no state of its own);
* per rank, in rank order: ``samplers`` (each rank's sampler state), ``rngs`` (torch CPU and
  CUDA, numpy and Python RNG states) and ``callbacks`` (each callback's ``state_dict``,
  e.g. the loss averaged since the last log line), with ``world_size``;
* ``domains``, ``weights`` and ``fingerprints`` (each domain's data, to notice changed text);
* ``sha256``: a hash over everything above except the model (which has its own), so that
  resume verifies the whole file before trusting any of it.

Saving keeps the previous checkpoint as ``ckpt.prev.pt`` (a hard link, so it costs no space
or time), and both files are always complete: the new one is written through
:func:`chameleon_ext.io.save_torch` (temp file, fsync, atomic rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from . import io
from .errors import ChameleonUserError
from .model import state_dict_sha256

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "DamagedCheckpoint",
    "load_checkpoint",
    "save_checkpoint",
    "payload_sha256",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "chameleon_ext.train/2"
CHECKPOINT_NAME = "ckpt.pt"

# Keys every checkpoint holds; "sha256" covers all of them but the model's own three.
_KEYS = ("format", "step", "model", "model_config", "model_sha256", "optimizer", "world_size",
         "samplers", "rngs", "callbacks", "train_config", "domains", "weights", "fingerprints")
_MODEL_KEYS = ("model", "model_sha256")


class DamagedCheckpoint(ChameleonUserError):
    """A checkpoint that cannot be trusted (unreadable, incomplete, or a hash mismatch)."""


def previous_path(path: Union[str, os.PathLike]) -> str:
    folder, base = os.path.split(os.fspath(path))
    stem = base[:-3] if base.endswith(".pt") else base
    return os.path.join(folder, f"{stem}.prev.pt")


# -- hashing ---------------------------------------------------------------------------------


def _hash_tree(h, obj: Any) -> None:
    """Feed ``obj`` (nested dicts, lists, tuples, tensors, arrays and scalars) into ``h`` in a
    canonical order: dict keys sorted by their repr, tensors by dtype, shape and bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode() + b":")
            _hash_tree(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _hash_tree(h, v)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def payload_sha256(ckpt: Mapping[str, Any]) -> str:
    """sha256 over every entry of a checkpoint except the model (hashed separately) and
    ``sha256`` itself."""
    h = hashlib.sha256(CHECKPOINT_FORMAT.encode() + b"\0")
    _hash_tree(h, {k: v for k, v in ckpt.items() if k not in _MODEL_KEYS and k != "sha256"})
    return h.hexdigest()


# -- writing and reading ---------------------------------------------------------------------


def save_checkpoint(ckpt: dict, path: Union[str, os.PathLike]) -> str:
    """Hash and atomically write ``ckpt`` (built by the trainer with the keys listed in the
    module notes; ``format`` and the hashes are added here) to ``path``, first keeping the checkpoint there as :func:`previous_path`."""
    path = os.fspath(path)
    ckpt = dict(ckpt, format=CHECKPOINT_FORMAT, model_sha256=state_dict_sha256(ckpt["model"]))
    missing = [k for k in _KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint: missing entries {missing}")
    ckpt["sha256"] = payload_sha256(ckpt)
    if os.path.isfile(path):
        _keep_previous(path)
    io.save_torch(ckpt, path, "checkpoint")
    return path


def _keep_previous(path: str) -> None:
    prev = previous_path(path)
    with contextlib.suppress(OSError):
        if os.path.samefile(path, prev):
            return  # a writer killed between linking and replacing left them as one file
    tmp = io.temp_path(prev)
    try:
        try:
            os.link(path, tmp)  # same inode: free, and the old file stays whole when replaced
        except OSError:
            # Filesystems without hard links: a copy, through the one atomic writer.
            with open(path, "rb") as src:
                io.write_bytes(tmp, src.read(), "previous checkpoint")
        os.replace(tmp, prev)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise io.write_error(prev, "previous checkpoint", exc) from exc


def _verify(ckpt: Any, path: str) -> Optional[str]:
    """The fault of a checkpoint read from ``path``, or None when it is whole."""
    if not isinstance(ckpt, dict) or not str(ckpt.get("format", "")).startswith("chameleon_ext.train/"):
        return "it is not a chameleon_ext training checkpoint"
    if ckpt["format"] != CHECKPOINT_FORMAT:
        return (f"it has format {ckpt['format']!r}, written by another version of chameleon_ext "
                f"(this one reads {CHECKPOINT_FORMAT!r})")
    missing = [k for k in _KEYS + ("sha256",) if k not in ckpt]
    if missing:
        return f"it lacks {missing}"
    if not isinstance(ckpt["model"], Mapping):
        return f"its model is a {type(ckpt['model']).__name__}, not a state dict"
    if state_dict_sha256(ckpt["model"]) != ckpt["model_sha256"]:
        return "its model weights do not match their content hash"
    if payload_sha256(ckpt) != ckpt["sha256"]:
        return "its optimiser, sampler or RNG state does not match its content hash"
    return None


def load_checkpoint(path: Union[str, os.PathLike], verify: bool = True) -> dict:
    """Read a trainer checkpoint onto the CPU and check every hash it holds.

    Raises:
        DamagedCheckpoint: naming the file and the fault, and the previous checkpoint beside
            it when that one is intact (with its step), so the user can fall back to it.
    """
    path = os.fspath(path)
    try:
        ckpt = io.read_torch(path, "checkpoint")
        fault = _verify(ckpt, path) if verify else None
    except ChameleonUserError as exc:
        if not os.path.isfile(path):
            raise
        raise DamagedCheckpoint(f"{exc}{_offer_previous(path)}") from exc
    if fault:
        raise DamagedCheckpoint(f"checkpoint {path!r} is damaged: {fault}{_offer_previous(path)}")
    return ckpt


def _offer_previous(path: str) -> str:
    prev = previous_path(path)
    if os.path.abspath(prev) == os.path.abspath(path) or not os.path.isfile(prev):
        return ""
    try:
        ckpt = io.read_torch(prev, "checkpoint")
    except ChameleonUserError:
        return ""
    if _verify(ckpt, prev):
        return ""
    return (f"; the previous checkpoint {prev!r} (step {ckpt['step']}) is intact: move it to "
            f"{path!r} to resume from it, or start afresh in a new output folder")


# -- RNG capture and restore -----------------------------------------------------------------


def rng_state(device: torch.device, all_cuda: bool = True) -> dict:
    """Every RNG an exact resume depends on: torch CPU, CUDA, numpy and Python."""
    # Under torch.distributed each rank saves only its own CUDA device's generator
    # (``cuda_device``): asking for all devices would create a context on every GPU.
    np_state = np.random.get_state()
    one = device.type == "cuda" and not all_cuda
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" and all_cuda else None,
        **({"cuda_device": torch.cuda.get_rng_state(device)} if one else {}),
        "numpy": (np_state[0], [int(v) for v in np_state[1]], int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    if device.type == "cuda" and state.get("cuda_device") is not None:
        torch.cuda.set_rng_state(state["cuda_device"], device)
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    random.setstate(state["python"])
