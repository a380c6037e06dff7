"""The per-window embedding cache entries of :mod:`chameleon_ext.embed`.

Beside each domain-sum entry ``{key}.pt`` of the embedding cache, a second file
``{key}.windows.pt`` (see :func:`window_cache_path`) with the SAME cache key holds the
domain's per-window means, written and read with :func:`pack_window_embeddings` /
:func:`unpack_window_embeddings`::

    {"format": "chameleon_ext.window_embeddings/1", "key": key, "domain": name,
     "windows": Tensor [n, d] float32 (or bfloat16), "count": n, "sha256": digest}

Rows are in window order (the order of ``embed.window_starts``); in reference pooling
they are the de-duplicated rows that were averaged, so their mean is the domain
embedding. float32 is the default: 6.3 MB per domain at n = 2048, d = 768, and the
windows' mean then equals the domain embedding to float32 rounding. bfloat16 halves that
but rounds each value to 3 significant digits; the bootstrap spread is then still right,
but the point estimate should come from the domain sums (pass ``point=``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch
from torch import Tensor

from .errors import ChameleonUserError

__all__ = ["WINDOW_CACHE_FORMAT", "WINDOW_CACHE_DTYPES", "window_cache_path", "pack_window_embeddings",
           "unpack_window_embeddings"]

WINDOW_CACHE_FORMAT = "chameleon_ext.window_embeddings/1"
WINDOW_CACHE_DTYPES = (torch.float32, torch.bfloat16)


def window_cache_path(cache_dir: str, key: str) -> str:
    """Where a domain's per-window means live: beside its ``{key}.pt`` sum entry."""
    return os.path.join(cache_dir, f"{key}.windows.pt")


def _windows_digest(windows: Tensor) -> str:
    t = windows.detach().cpu().contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # NumPy has no bfloat16
    return hashlib.sha256(str(t.dtype).encode() + str(tuple(t.shape)).encode() + raw.numpy().tobytes()).hexdigest()


def pack_window_embeddings(window_means: Tensor, key: str, domain: str, dtype: torch.dtype = torch.float32) -> dict:
    """A cache entry for one domain's per-window means ``[n, d]`` (stored as ``dtype``,
    float32 or bfloat16), to be written with ``io.save_torch`` at :func:`window_cache_path`."""
    if dtype not in WINDOW_CACHE_DTYPES:
        raise ChameleonUserError(f"dtype must be one of {WINDOW_CACHE_DTYPES}, got {dtype}")
    if not isinstance(window_means, Tensor) or window_means.dim() != 2 or window_means.shape[0] < 1:
        shape = tuple(window_means.shape) if isinstance(window_means, Tensor) else type(window_means).__name__
        raise ChameleonUserError(f"window_means must be a tensor [n, d] with n >= 1, got {shape}")
    if not window_means.is_floating_point() or not bool(torch.isfinite(window_means).all()):
        raise ChameleonUserError(f"window_means of domain {domain!r} must be finite floating-point values")
    windows = window_means.detach().to(device="cpu", dtype=dtype).contiguous()
    return {
        "format": WINDOW_CACHE_FORMAT, "key": str(key), "domain": str(domain), "windows": windows,
        "count": int(windows.shape[0]), "sha256": _windows_digest(windows),
    }


def unpack_window_embeddings(entry, key: str, domain: Optional[str] = None) -> Tensor:
    """The per-window means ``[n, d]`` as float32 from a cache entry, checked against ``key``
    (and ``domain``); raises ChameleonUserError naming what is wrong (the reader warns and
    recomputes, as for a damaged domain-sum entry)."""
    if not isinstance(entry, dict) or entry.get("format") != WINDOW_CACHE_FORMAT:
        raise ChameleonUserError(f"not a per-window embedding cache entry (expected format {WINDOW_CACHE_FORMAT!r})")
    if entry.get("key") != key:
        raise ChameleonUserError(f"per-window cache entry has key {entry.get('key')!r}, expected {key!r}")
    if domain is not None and entry.get("domain") != domain:
        raise ChameleonUserError(f"per-window cache entry is for domain {entry.get('domain')!r}, expected {domain!r}")
    windows = entry.get("windows")
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.dtype not in WINDOW_CACHE_DTYPES:
        raise ChameleonUserError("per-window cache entry holds no [n, d] float32/bfloat16 'windows' tensor")
    if entry.get("count") != windows.shape[0] or entry.get("sha256") != _windows_digest(windows):
        raise ChameleonUserError(f"per-window cache entry for domain {entry.get('domain')!r} is damaged (checksum)")
    return windows.to(torch.float32)
