"""torch.distributed plumbing shared by embedding and training.

Launch with ``torchrun`` (NCCL on GPUs, gloo on CPUs); a plain ``python`` run is a world
of one and never touches torch.distributed. Everything else in the package asks this
module who it is (:func:`info`) and how to combine results (:func:`all_reduce_sum_`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_from_env",
    "info",
    "is_distributed",
    "all_reduce_sum_",
    "broadcast_object",
    "barrier",
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


def broadcast_object(obj: Any, src: int = 0, group: Optional[Any] = None) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects)."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group: Optional[Any] = None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous share ``[start, stop)`` of ``n`` items owned by ``rank``: disjoint,
    covering, sizes differing by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
