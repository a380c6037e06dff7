"""Train/validation/test splits of a token stream, the read-only token views they return, and
the checks of a window draw from them.

Validation tokens are ``val.bin`` when given, otherwise ``val_fraction`` of the domain's token
stream, as blocks spread evenly over it (deterministic; no shuffling). A **test** split
(``test_fraction``, default 0: none) is drawn the same interleaved way: the held-out blocks
(``val_fraction + test_fraction`` of the stream, evenly spread) are dealt to validation and
test in proportion, again evenly, so every part of the stream is represented in each split
and the three are disjoint. With ``test_fraction == 0`` the train/validation split is exactly
the one of layout version 2.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from ..errors import ChameleonUserError

__all__ = ["SPLITS", "SPLIT_LAYOUT", "SplitTokens", "SourceTokens", "check_draw", "check_length", "check_memory",
           "split_parts", "split_stream"]

SPLITS = ("train", "val", "test")
# How train/val are cut from a stream without val.bin (see the module doc). Version 1 was the
# stream's tail; bump when the rule changes, so caches of windows drawn from a split change key.
# Version 3 adds the test split (version 2's split whenever test_fraction is 0).
SPLIT_LAYOUT = "blocks-evenly-spread/3"
_SPLIT_MIN_BLOCK = 4096
_SPLIT_MAX_BLOCKS = 1024
_SPLIT_MIN_HELD_OUT = 32  # held-out blocks a domain gets at least, where its size allows


class TokenView:
    """A read-only 1-D token array over some storage: ``shape``, ``dtype``, ``len()``, integer
    and contiguous-slice indexing (a slice returns a new array) and ``np.asarray(view)``, all
    through the subclass's ``_read(lo, hi)``."""

    ndim = 1

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        n = self.shape[0]
        if isinstance(key, slice):
            lo, hi, step = key.indices(n)
            if step != 1:
                return np.asarray(self)[key]
            return self._read(lo, max(lo, hi))
        i = int(key)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {key} is out of bounds for {n} tokens")
        return self._read(i, i + 1)[0]

    def _read(self, lo: int, hi: int) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None):
        arr = self._read(0, self.shape[0])
        return arr if dtype is None else arr.astype(dtype, copy=False)


class SplitTokens(TokenView):
    """One split of a token stream: the blocks ``[starts[j], starts[j] + lengths[j])`` of
    ``base``, concatenated in stream order, read without copying the stream.

    Behaves like a read-only 1-D array for what the dataset layer needs: ``shape``, ``dtype``,
    ``len()``, integer and contiguous-slice indexing (a slice returns a new array), and
    ``np.asarray(split)`` (the whole split, copied).
    """

    def __init__(self, base: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.base = base
        self.starts = np.asarray(starts, dtype=np.int64)  # [m] in stream coordinates
        self.lengths = np.asarray(lengths, dtype=np.int64)  # [m]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])  # [m + 1] in split coordinates
        self.shape = (int(self.offsets[-1]),)
        self.dtype = base.dtype

    def _read(self, lo: int, hi: int) -> np.ndarray:
        out = np.empty(hi - lo, dtype=self.dtype)
        j = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        pos = lo
        while pos < hi:
            take = min(hi, int(self.offsets[j + 1])) - pos
            src = int(self.starts[j]) + pos - int(self.offsets[j])
            out[pos - lo : pos - lo + take] = self.base[src : src + take]
            pos += take
            j += 1
        return out

    def __repr__(self) -> str:
        return f"SplitTokens({self.shape[0]} tokens in {len(self.starts)} runs of a {self.base.shape[0]}-token stream)"


class SourceTokens(TokenView):
    """A pre-tokenised token stream read through its source (``pread`` of the ranges asked
    for) instead of a memory map, so the process's memory does not grow with the file.

    Behaves like the read-only 1-D arrays of the dataset layer (``shape``, ``dtype``, ``len()``,
    integer and contiguous-slice indexing, ``np.asarray``); ``dtype`` is the file's for nanoGPT
    bins and int64 for Megatron (whose ids are checked whole and non-negative on read).
    """

    def __init__(self, source, dtype):
        self.source = source
        self.shape = (int(source.n_tokens),)
        self.dtype = np.dtype(dtype)

    def _read(self, lo: int, hi: int) -> np.ndarray:
        return self.source.read(lo, hi - lo).astype(self.dtype, copy=False)

    def __repr__(self) -> str:
        return f"SourceTokens({self.shape[0]} tokens of {self.source.path!r})"


def _evenly(n: int, f: float) -> np.ndarray:
    """``[n]`` bool: which of ``n`` slots are picked when ``f`` of them are, evenly spread
    (slot ``i`` is picked when ``round(i f)`` steps up at ``i + 1``)."""
    i = np.arange(n, dtype=np.float64)
    return np.floor((i + 1) * f + 0.5) > np.floor(i * f + 0.5)


def split_parts(n: int, val_fraction: float, test_fraction: float = 0.0) -> tuple[int, np.ndarray]:
    """``(block, part [n_blocks] int8)``: the block size and, for each block of a stream of
    ``n`` tokens, its split: 0 train, 1 validation, 2 test (the rule in the module doc).

    The held-out blocks are ``val_fraction + test_fraction`` of the blocks, evenly spread;
    they are dealt to test in the proportion ``test / (val + test)``, evenly again. The block
    is small enough that the smaller positive fraction still gets ``_SPLIT_MIN_HELD_OUT``
    blocks where the stream allows."""
    v, t = float(val_fraction), float(test_fraction)
    f = v + t
    if n <= 0 or f <= 0.0:
        return max(n, 1), np.zeros(1 if n > 0 else 0, dtype=np.int8)
    smallest = min(x for x in (v, t) if x > 0)
    block = max(_SPLIT_MIN_BLOCK, -(-n // _SPLIT_MAX_BLOCKS))
    block = max(1, min(block, int(n * smallest / _SPLIT_MIN_HELD_OUT)))
    held_out = _evenly(-(-n // block), f)
    part = held_out.astype(np.int8)
    if t > 0:
        idx = np.flatnonzero(held_out)
        part[idx[_evenly(idx.shape[0], t / f)]] = 2
    return block, part


def split_stream(tokens: np.ndarray, val_fraction: float, test_fraction: float = 0.0):
    """``(train, val, test)`` of a stream without ``val.bin``/``test.bin``: evenly spread
    blocks (module doc)."""
    n = int(tokens.shape[0])
    block, part = split_parts(n, val_fraction, test_fraction)
    if not part.any():
        return tokens, tokens[n:], tokens[n:]
    bounds = np.minimum(np.arange(part.shape[0] + 1, dtype=np.int64) * block, n)

    def runs(mask: np.ndarray) -> SplitTokens:
        # maximal runs of consecutive blocks of one split, as (start, length) in the stream
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
        first, last = edges[0::2], edges[1::2]  # block ranges [first, last)
        return SplitTokens(tokens, bounds[first], bounds[last] - bounds[first])

    test = runs(part == 2) if (part == 2).any() else tokens[n:]
    val = runs(part == 1) if (part == 1).any() else tokens[n:]
    return runs(part == 0), val, test


def check_draw(rng, n, length) -> tuple:
    """``(n, length)`` of a window draw, checked, with its generator."""
    if not isinstance(rng, np.random.Generator):
        raise ChameleonUserError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ChameleonUserError(f"n: expected a non-negative integer window count, got {n!r}")
    return int(n), check_length(length)


def check_length(length) -> int:
    """``length`` as a positive integer window length, or the one-line error."""
    try:
        ok = int(length) == length and int(length) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ChameleonUserError(f"length: expected a positive integer window length, got {length!r}")
    return int(length)


@functools.lru_cache(maxsize=1)
def _machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(n: int, length: int, name: str) -> None:
    """Refuse a window batch larger than this machine's memory before allocating it (the
    allocation may otherwise "succeed" lazily and the process be killed while filling it)."""
    need = int(n) * int(length) * 8
    total = _machine_memory()
    if total and need > total:
        raise ChameleonUserError(
            f"{n} windows of {length} tokens from domain {name!r} need {need / 2**30:.1f} GiB "
            f"as int64, more than this machine's {total / 2**30:.1f} GiB of memory; draw fewer "
            "or shorter windows")
