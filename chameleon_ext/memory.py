"""How much memory there is: the one probe behind every "this cannot fit" check (the command
line's option checks and the bootstrap's), and the one way those messages write sizes.
Importing it loads nothing heavy: torch is asked only about a CUDA device."""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["physical_memory", "available_memory", "format_bytes"]


def physical_memory() -> Optional[int]:
    """This machine's physical memory in bytes; None when unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(device="cpu") -> Optional[int]:
    """Bytes free for new tensors on ``device`` (a name or a torch.device): the GPU's free
    memory, or the host's available memory (MemAvailable, else its physical memory); None
    when unknown."""
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch

        index = getattr(device, "index", None) if not isinstance(device, str) else (
            int(device.split(":")[1]) if ":" in device else None)
        try:
            return int(torch.cuda.mem_get_info(index)[0])
        except (RuntimeError, AssertionError):  # no usable CUDA here: nothing to bound by
            return None
    if kind != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return physical_memory()


def format_bytes(n: float) -> str:
    """``1.5 GiB`` from a GiB up, ``300 MiB`` below."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"
