"""The embedding cache of :mod:`chameleon_ext.embed`: one entry per domain, keyed by
:func:`cache_key` (the proxy's content hash, the domain's data fingerprint, the tokenizer, the
split and the embedding settings), so an entry is reused only when embedding again would give
it.

Each domain-sum entry ``{key}.pt`` holds the sum of the domain's window means and their count,
with a checksum (:func:`read_cache`, :func:`write_cache`). Beside it, a second file
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
import json
import os
import warnings
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from . import io
from .data.dataset import SPLIT_LAYOUT
from .data.tokenizer import tokenizer_record
from .errors import ChameleonUserError
from .model import HFCausalLM

if TYPE_CHECKING:
    from .embed import EmbedConfig

__all__ = ["WINDOW_CACHE_FORMAT", "WINDOW_CACHE_DTYPES", "window_cache_path", "pack_window_embeddings",
           "unpack_window_embeddings", "CACHE_FORMAT", "library_versions", "tokenizer_hash", "cache_key",
           "cache_path", "read_cache", "read_window_cache", "write_cache"]

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


# --------------------------------------------------------------------------- domain-sum entries

# 2: the key holds the tokenizer's content hash, the transformers version, the precision
# option and the split layout (blocks spread over the stream instead of its tail).
CACHE_FORMAT = "chameleon_ext.domain_embedding/2"


def library_versions(model) -> dict:
    """Versions of the libraries that compute a proxy's hidden states beyond torch: the
    ``transformers`` version for a Hugging Face proxy (4.x and 5.x tokenise and compute
    differently), nothing for chameleon_ext's own GPT."""
    if isinstance(model, HFCausalLM):
        import transformers

        return {"transformers": transformers.__version__}
    return {}


def tokenizer_hash(dataset) -> Optional[str]:
    tok = getattr(dataset, "tokenizer", None)
    return None if tok is None else tokenizer_record(tok)["sha256"]


def cache_key(proxy_hash: str, layer: int, precision: str, dataset, name: str, cfg: EmbedConfig,
               libraries: Optional[dict] = None) -> str:
    spec = {
        "format": CACHE_FORMAT,
        "proxy": proxy_hash,
        "layer": layer,
        "precision": precision,
        "libraries": dict(libraries or {}),
        # The fingerprint covers the tokenizer's name; its full content hash is added because
        # re-tokenisation (reference pooling) uses the tokenizer itself.
        "tokenizer": tokenizer_hash(dataset),
        "domain": name,
        "fingerprint": dataset.fingerprint(name),
        "val_fraction": getattr(dataset, "val_fraction", None),
        "test_fraction": getattr(dataset, "test_fraction", 0.0),  # test blocks leave train too
        "split_layout": SPLIT_LAYOUT,
        "n_windows": cfg.n_windows,
        "window": cfg.window,
        "seed": cfg.seed,
        "pooling": cfg.pooling,
        "split": cfg.split,
    }
    if cfg.pooling == "reference":
        # Reference pooling averages over each batch's padding, so the batch size changes the
        # result; rev 2: batches hold one domain's windows and the forward masks padded keys.
        spec.update(batch_size=cfg.batch_size, reference_rev=2)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def entry_digest(total: torch.Tensor, count: int) -> str:
    return hashlib.sha256(total.double().contiguous().numpy().tobytes() + str(int(count)).encode()).hexdigest()


def cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"{key}.pt")


def read_cache(cache_dir: Optional[str], key: str, name: str):
    """(sum [d], count) from the cache, or None; a damaged entry is reported and ignored."""
    if cache_dir is None:
        return None
    path = cache_path(cache_dir, key)
    if not os.path.exists(path):
        return None
    try:
        obj = io.read_torch(path, "embedding cache entry")
        ok = (
            obj.get("format") == CACHE_FORMAT
            and obj.get("key") == key
            and obj.get("sha256") == entry_digest(obj["sum"], obj["count"])
            and bool(torch.isfinite(obj["sum"]).all())
            and int(obj["count"]) > 0
        )
    except Exception:
        ok = False
    if not ok:
        warnings.warn(f"embedding cache entry for domain {name!r} ({path}) is damaged; recomputing it", stacklevel=3)
        return None
    return obj["sum"].double(), int(obj["count"])


def read_window_cache(cache_dir: Optional[str], key: str, name: str, count: int, dim: int):
    """The domain's per-window means ``[count, dim]`` from the cache, or None (with a warning:
    the caller then embeds the domain again)."""
    if cache_dir is None:
        return None
    path = window_cache_path(cache_dir, key)
    if not os.path.exists(path):
        warnings.warn(f"embedding cache entry for domain {name!r} has no per-window means ({path}; written "
                      "before they were cached); embedding the domain again for the bootstrap", stacklevel=3)
        return None
    try:
        windows = unpack_window_embeddings(io.read_torch(path, "per-window embedding cache entry"), key, name)
        if tuple(windows.shape) != (count, dim):
            raise ChameleonUserError(f"holds {tuple(windows.shape)} window means, the sum entry {count} x {dim}")
    except Exception as exc:
        warnings.warn(f"per-window embedding cache entry for domain {name!r} ({path}) is damaged ({exc}); "
                      "recomputing it", stacklevel=3)
        return None
    return windows


def write_cache(cache_dir: Optional[str], key: str, name: str, total: torch.Tensor, count: int,
                 windows: Optional[torch.Tensor] = None) -> None:
    if cache_dir is None:
        return
    if windows is not None:
        # Before the sum entry: a kill between the two leaves a sum without windows, which a
        # bootstrap run treats as a miss, never windows that belong to no sum.
        io.save_torch(pack_window_embeddings(windows, key, name), window_cache_path(cache_dir, key),
                      "per-window embedding cache entry")
    total = total.detach().double().cpu()
    io.save_torch(
        {"format": CACHE_FORMAT, "key": key, "domain": name, "sum": total, "count": int(count),
         "sha256": entry_digest(total, count)},
        cache_path(cache_dir, key), "embedding cache entry",
    )
