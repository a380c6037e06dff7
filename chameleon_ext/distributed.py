"""torch.distributed plumbing shared by embedding, training and evaluation: the only module
that talks to ``torch.distributed``.

Launch with ``torchrun`` (NCCL on GPUs, gloo on CPUs); a plain ``python`` run is a world
of one and never touches torch.distributed. Everything else in the package asks this
module who it is (:func:`info`), where to run (:func:`resolve_device`), how to combine
results (:func:`all_reduce_sum_`, :func:`gather_objects`) and whether every rank got through
a phase (:func:`agree`).

Failure handling. A rank that raises must not leave the others blocked in a collective:

* every phase where one rank alone may fail (set-up and resume checks, rank 0 writing a
  checkpoint or model.pt, an evaluation pass) ends in :func:`agree`, one small all-reduce of
  per-rank failure flags that every rank reaches whether it failed or not; the failed ranks
  re-raise their own error and the others raise a RuntimeError naming them, at once;
* no collective runs on an error path (``except`` / ``finally``), so a failing rank never
  waits for peers that are somewhere else;
* a failure inside a training step (the peers are then blocked in DDP's gradient all-reduce)
  ends their wait when the failed process exits (gloo sees the closed connection; torchrun
  also stops the other workers as soon as one fails) and, in any case, after the
  process-group timeout set by :func:`init_from_env` (``CHAMELEON_DIST_TIMEOUT``, default
  600 s; NCCL's watchdog enforces it on GPUs).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from .errors import ChameleonUserError
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_from_env",
    "info",
    "is_distributed",
    "is_initialized",
    "shutdown",
    "all_reduce_sum_",
    "gather_objects",
    "agree",
    "barrier",
    "resolve_device",
    "wrap_ddp",
    "shard_range",
    "default_timeout",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_timeout() -> datetime.timedelta:
    """Collective timeout: a rank that dies makes the others fail after this, not hang.
    ``CHAMELEON_DIST_TIMEOUT`` (seconds) overrides the default of 10 minutes."""
    return datetime.timedelta(seconds=float(os.environ.get("CHAMELEON_DIST_TIMEOUT", "600")))


def is_initialized() -> bool:
    """Whether the default process group exists (torchrun and :func:`init_from_env`)."""
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Tear the default process group down, if any (while Python is fully alive: gloo's
    threads can otherwise abort the process during interpreter shutdown)."""
    if is_initialized():
        dist.destroy_process_group()


def is_distributed(group: Optional[Any] = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def info(group: Optional[Any] = None) -> DistInfo:
    """This process's rank and world size (in ``group``, default: the default group)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(group), dist.get_world_size(group), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def init_from_env(device: str = "auto", timeout: Optional[datetime.timedelta] = None) -> DistInfo:
    """Initialise the default process group when launched by torchrun (``WORLD_SIZE`` > 1).

    Backend: NCCL when the device is CUDA, else gloo. Idempotent; a single process returns
    rank 0 of 1 without initialising anything. Sets the CUDA device from ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return info()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout or default_timeout())
    return info()


def all_reduce_sum_(tensor: torch.Tensor, group: Optional[Any] = None) -> torch.Tensor:
    """In-place sum across ranks (a no-op in a single process). Returns ``tensor``."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def collective_device(group: Optional[Any] = None) -> torch.device:
    """Where tensors for collectives must live: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: Any, group: Optional[Any] = None) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not is_distributed(group):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def agree(error: Optional[BaseException], what: str, group: Optional[Any] = None,
          flag: int = 0) -> list:
    """Collective barrier that propagates failure (see the module notes): every rank calls it
    after ``what`` with the exception it caught (or None) and an optional integer ``flag``.
    Returns every rank's flag. Raises ``error`` on the ranks that failed, and on the others a
    RuntimeError naming the failed ranks, so that all ranks leave together instead of waiting
    on each other. In a single process it just re-raises ``error``."""
    if not is_distributed(group):
        if error is not None:
            raise error
        return [int(flag)]
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    t = torch.zeros(2, world, dtype=torch.int64, device=collective_device(group))
    t[0, rank] = 1 if error is not None else 0
    t[1, rank] = int(flag)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    if error is not None:
        raise error
    failed = [r for r in range(world) if int(t[0, r])]
    if failed:
        raise RuntimeError(
            f"distributed run stopped: rank(s) {failed} of {world} failed while {what} (their "
            f"own output has the error); rank {rank} stops too")
    return [int(v) for v in t[1].tolist()]


def resolve_device(device: Optional[Union[str, torch.device]] = "auto",
                   model: Optional[torch.nn.Module] = None,
                   group: Optional[Any] = None) -> torch.device:
    """The device to run on.

    ``None``: the model's device (CPU without a model); ``"auto"``: CUDA when available.
    Under torch.distributed, ``"auto"`` and a bare ``"cuda"`` mean ``cuda:LOCAL_RANK``, so each
    process of a node gets its own GPU; an explicit ``cuda:N`` is kept.
    """
    if device is None and model is not None:
        return next(model.parameters()).device
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ChameleonUserError(
            f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ChameleonUserError(f"device: {str(device)!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        local = info(group).local_rank if is_distributed(group) else 0
        if local >= torch.cuda.device_count():
            raise ChameleonUserError(
                f"device: LOCAL_RANK is {local} but this node has only "
                f"{torch.cuda.device_count()} CUDA device(s); start at most that many processes "
                "per node (torchrun --nproc_per_node)")
        dev = torch.device("cuda", local) if is_distributed(group) else dev
    return dev


def wrap_ddp(model: torch.nn.Module, device: torch.device,
             group: Optional[Any] = None) -> torch.nn.Module:
    """``DistributedDataParallel(model)``: broadcasts rank 0's parameters at construction and
    averages gradients across ranks in backward."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and object collectives use the current device
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group)


def barrier(group: Optional[Any] = None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous share ``[start, stop)`` of ``n`` items owned by ``rank``: disjoint,
    covering, sizes differing by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
