"""Multi-domain datasets: discovery, tokenisation into cached memmaps, splits and windows.

Layout
------
A dataset is a folder with one subfolder per domain; the subfolder name is the domain name and
domains are listed in sorted order (hidden entries, i.e. names starting with ``.``, are
skipped, which is also how the default cache folder ``.chameleon_cache`` stays out of the way)::

    my_data/
      arxiv/   a.txt  b.md  sub/c.tex ...     text files, read recursively
      web/     part-0.jsonl part-1.jsonl      one JSON object per line with a "text" field
      github/  train.bin val.bin meta.json    pre-tokenised, nanoGPT layout

A domain is one of two kinds:

* **text** -- every non-hidden file is read as UTF-8 text, except ``*.jsonl`` files, whose
  lines are JSON objects with a string ``text`` field. Each text file and each JSON line is
  one *document*; documents are joined with the tokenizer's EOS id (EOS after every document,
  as in the reference's data preparation). Files are streamed (a file at a time, big files in
  line-aligned chunks) and the tokens are written incrementally into a uint16/uint32 memmap in
  the cache folder, so a domain never has to fit in memory.
* **pre-tokenised** -- the folder holds ``train.bin`` (and optionally ``val.bin``) as flat
  token arrays, with ``meta.json`` beside them declaring ``{"vocab_size": 50257, "dtype":
  "uint16"}`` (dtype ``uint16`` or ``uint32``). Other files in such a folder (a README, the
  script that produced the bins, ...) are ignored.

Caching and fingerprints
------------------------
Each text domain's tokens are cached under ``<dataset>/.chameleon_cache/`` (or ``cache_dir``)
in a file named by the domain's *fingerprint*: sha256 over the tokenizer name and every file's
relative path, size and bytes. A cheap stat key (paths, sizes, mtimes) points at the
fingerprint, so an unchanged domain is neither re-read nor re-tokenised on the next load; a
touched-but-identical domain is re-hashed but not re-tokenised; a changed file changes only its
own domain's fingerprint. :meth:`MixtureDataset.fingerprint` is meant to key embedding caches.

Split and windows
-----------------
Validation tokens are ``val.bin`` when given, otherwise the last ``val_fraction`` of the
domain's token stream (deterministic; no shuffling). Windows are contiguous runs of ``length``
tokens starting anywhere in the split, so -- as in the reference -- they may cross document
boundaries. (The reference draws starts from ``[0, n - length)``; every full window, i.e.
``[0, n - length]``, is allowed here.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from ..errors import ChameleonUserError
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_record

__all__ = ["MixtureDataset", "SplitTokens", "load_dataset", "DEFAULT_CACHE_DIRNAME", "SPLIT_LAYOUT"]

DEFAULT_CACHE_DIRNAME = ".chameleon_cache"
# Bump when the token-cache layout or the tokenisation rules change: old caches are ignored.
_CACHE_FORMAT = "chameleon_ext.tokens/1"
_BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_BIN_FILES = ("train.bin", "val.bin", "meta.json")
# Big text files are tokenised in line-aligned chunks of about this many characters, so memory
# stays bounded; each chunk is still part of the same document (no EOS between chunks).
_CHUNK_CHARS = 1 << 22
_HASH_BLOCK = 1 << 20
# How train/val are cut from a stream without val.bin (see the module doc). Version 1 was the
# stream's tail; bump when the rule changes, so caches of windows drawn from a split change key.
SPLIT_LAYOUT = "blocks-evenly-spread/2"
_SPLIT_MIN_BLOCK = 4096
_SPLIT_MAX_BLOCKS = 1024
_SPLIT_MIN_HELD_OUT = 32  # held-out blocks a domain gets at least, where its size allows


@dataclass
class _Domain:
    name: str
    path: str
    kind: str  # "text" or "bin"
    train: np.ndarray  # [n_train] memmap
    val: np.ndarray  # [n_val] memmap
    vocab_size: int
    files: list = field(default_factory=list)  # for text domains: [(relpath, abspath)]
    max_id: Optional[int] = None  # largest token id, when known
    fingerprint: Optional[str] = None
    stat_key: Optional[str] = None


class MixtureDataset:
    """The domains of one dataset, tokenised, split, and ready for window sampling.

    Build it with :func:`load_dataset`. Token arrays are read-only ``np.memmap`` views, so
    opening a dataset is cheap whatever its size.

    Attributes:
        path: the dataset folder.
        domains: domain names in sorted order; index ``i`` in every per-domain array (sampler
            weights, embeddings, leverage scores) refers to ``domains[i]``.
        tokenizer: the tokenizer used for text domains.
        vocab_size: vocabulary size the token ids belong to (the tokenizer's, or the one
            declared in ``meta.json`` when every domain is pre-tokenised).
        val_fraction: fraction of each token stream held out when no ``val.bin`` is given.
        cache_dir: where token caches live.
    """

    def __init__(self, path: str, domains: list[_Domain], tokenizer: Tokenizer,
                 vocab_size: int, val_fraction: float, cache_dir: str):
        self.path = path
        self._domains = {d.name: d for d in domains}
        self.domains = [d.name for d in domains]
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.val_fraction = float(val_fraction)
        self.cache_dir = cache_dir

    # -- per-domain access -------------------------------------------------------------------

    def _get(self, name: str) -> _Domain:
        try:
            return self._domains[name]
        except (KeyError, TypeError):
            raise ChameleonUserError(
                f"domain {name!r} is not in the dataset at {self.path!r}; "
                f"its domains are {self.domains}"
            ) from None

    def kind(self, name: str) -> str:
        """``"text"`` (tokenised here) or ``"bin"`` (pre-tokenised ``train.bin``)."""
        return self._get(name).kind

    def train_tokens(self, name: str) -> np.ndarray:
        """Training tokens of domain ``name``: a read-only ``[n_train]`` memmap (or, when
        blocks are held out for validation, a :class:`SplitTokens` view of the memmap)."""
        return self._get(name).train

    def val_tokens(self, name: str) -> np.ndarray:
        """Held-out tokens of domain ``name``: a read-only ``[n_val]`` memmap."""
        return self._get(name).val

    def tokens(self, name: str, split: str = "train") -> np.ndarray:
        """Tokens of ``split`` (``"train"`` or ``"val"``) of domain ``name``."""
        if split == "train":
            return self.train_tokens(name)
        if split == "val":
            return self.val_tokens(name)
        raise ChameleonUserError(f"split: expected 'train' or 'val', got {split!r}")

    def tokenizer_record(self) -> Optional[dict]:
        """The :func:`~chameleon_ext.data.tokenizer.tokenizer_record` of the tokenizer that made
        this dataset's tokens, or None when every domain is pre-tokenised (its tokenizer is
        not known here)."""
        if all(d.kind == "bin" for d in self._domains.values()):
            return None
        return tokenizer_record(self.tokenizer)

    def n_tokens(self, name: str, split: str = "train") -> int:
        return int(self.tokens(name, split).shape[0])

    def fingerprint(self, name: str) -> str:
        """Stable hex digest of domain ``name``'s content and tokenizer.

        Identical files (same relative paths and bytes) tokenised with the same tokenizer give
        the same fingerprint on any machine; changing any file of the domain changes it. Note
        that windows drawn from the *train split* also depend on :attr:`val_fraction`, so a
        cache of window embeddings should key on both.
        """
        d = self._get(name)
        if d.fingerprint is None:  # pre-tokenised domains are hashed lazily (they can be big)
            d.fingerprint = _bin_fingerprint(d, self.cache_dir)
        return d.fingerprint

    # -- checks ------------------------------------------------------------------------------

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if any domain holds a token id ``>= vocab_size`` (e.g. the model's vocab).

        Raises:
            ChameleonUserError: naming the first offending domain, its largest id and the
                vocabulary size.
        """
        vocab_size = int(vocab_size)
        for name in self.domains:
            d = self._domains[name]
            if d.max_id is None:
                d.max_id = max(_chunked_max(d.train), _chunked_max(d.val))
            if d.max_id >= vocab_size:
                raise ChameleonUserError(
                    f"vocabulary mismatch: domain {name!r} holds token id {d.max_id}, but the "
                    f"model's vocabulary has only {vocab_size} ids (0..{vocab_size - 1}); "
                    "tokenise the data with the model's tokenizer or build the model with "
                    f"vocab_size >= {d.max_id + 1}"
                )

    def check_window(self, length: int, split: str = "train",
                     domains: Optional[Sequence[str]] = None) -> None:
        """Raise unless every domain (or each of ``domains``) holds at least one full window.

        Raises:
            ChameleonUserError: naming the first domain whose ``split`` is shorter than
                ``length`` tokens.
        """
        length = _check_length(length)
        for name in self.domains if domains is None else domains:
            self._check_domain_window(name, length, split)

    def _check_domain_window(self, name: str, length: int, split: str) -> int:
        n = self.n_tokens(name, split)
        if n < length:
            hint = (" (raise val_fraction or add a val.bin)" if split == "val"
                    else " (add data or use a shorter window)")
            raise ChameleonUserError(
                f"domain {name!r} is shorter than one window: its {split} split has {n} "
                f"tokens, a window needs {length}{hint}"
            )
        return n

    # -- windows -----------------------------------------------------------------------------

    def sample_window(self, name: str, length: int, rng: np.random.Generator,
                      split: str = "train") -> np.ndarray:
        """One window of ``length`` consecutive tokens from domain ``name``: ``[length]`` int64.

        The start is uniform over all full windows; windows may cross document boundaries.
        """
        return self.sample_windows(name, 1, length, rng, split)[0]

    def sample_windows(self, name: str, n: int, length: int, rng: np.random.Generator,
                       split: str = "train") -> np.ndarray:
        """``n`` windows of ``length`` tokens from domain ``name``: ``[n, length]`` int64.

        Draws ``n`` starts from ``rng`` (one ``rng.integers`` call, so the generator advances
        deterministically) and gathers the windows from the memmap.
        """
        if not isinstance(rng, np.random.Generator):
            raise ChameleonUserError(
                f"rng: expected a numpy.random.Generator, got {type(rng).__name__}"
            )
        if int(n) < 0:
            raise ChameleonUserError(f"n: expected a non-negative window count, got {n}")
        length = _check_length(length)
        total = self._check_domain_window(name, length, split)
        starts = rng.integers(0, total - length + 1, size=int(n))
        return self.windows_at(name, starts, length, split)

    def windows_at(self, name: str, starts: np.ndarray, length: int,
                   split: str = "train") -> np.ndarray:
        """Windows of ``length`` tokens starting at ``starts`` ``[n]``: ``[n, length]`` int64."""
        toks = self.tokens(name, split)
        starts = np.asarray(starts, dtype=np.int64)
        out = np.empty((starts.shape[0], length), dtype=np.int64)
        # Row by row slicing reads each window as one contiguous run of the memmap, which beats
        # fancy indexing with an [n, length] index array on large files.
        for i, s in enumerate(starts):
            out[i] = toks[s:s + length]
        return out

    # -- reporting ---------------------------------------------------------------------------

    def summary(self) -> list[dict]:
        """One dict per domain: name, kind, train/val token counts."""
        return [
            {"domain": n, "kind": self._domains[n].kind,
             "train_tokens": self.n_tokens(n, "train"), "val_tokens": self.n_tokens(n, "val")}
            for n in self.domains
        ]

    def __len__(self) -> int:
        return len(self.domains)

    def __repr__(self) -> str:
        parts = ", ".join(f"{s['domain']}={s['train_tokens']}+{s['val_tokens']}"
                          for s in self.summary())
        return f"MixtureDataset({self.path!r}, vocab_size={self.vocab_size}, tokens: {parts})"


# ------------------------------------------------------------------------------------------
# loading


def load_dataset(path: Union[str, os.PathLike], tokenizer: Union[str, Tokenizer] = "byte",
                 cache_dir: Optional[Union[str, os.PathLike]] = None,
                 val_fraction: float = 0.1) -> MixtureDataset:
    """Discover, tokenise (with caching) and split the domains of the dataset at ``path``.

    Args:
        path: dataset folder with one subfolder per domain.
        tokenizer: ``"byte"``, a local Hugging Face tokenizer folder, or a tokenizer object;
            used for text/jsonl domains.
        cache_dir: where tokenised text domains are cached; default
            ``<path>/.chameleon_cache``.
        val_fraction: fraction in ``[0, 1)`` of each token stream held out for validation when
            the domain has no ``val.bin``.

    Raises:
        ChameleonUserError: missing/empty dataset folder, an empty domain, a non-UTF-8 or
            unreadable file, a malformed ``.jsonl`` line, a ``meta.json`` with unknown dtype,
            inconsistent vocabularies, or an invalid option.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        what = "does not exist" if not os.path.exists(path) else "is not a folder"
        raise ChameleonUserError(f"data folder {path!r} {what}")
    try:
        val_fraction = float(val_fraction)
    except (TypeError, ValueError):
        raise ChameleonUserError(f"val_fraction: expected a number in [0, 1), got {val_fraction!r}")
    if not (0.0 <= val_fraction < 1.0):
        raise ChameleonUserError(f"val_fraction: expected a number in [0, 1), got {val_fraction}")
    tok = load_tokenizer(tokenizer)
    cache_dir = (os.path.join(path, DEFAULT_CACHE_DIRNAME) if cache_dir is None
                 else os.path.abspath(os.fspath(cache_dir)))

    names = sorted(e for e in _listdir(path, f"data folder {path!r}")
                   if not e.startswith(".") and os.path.isdir(os.path.join(path, e))
                   # a user-given cache_dir inside the data folder is not a domain
                   and os.path.abspath(os.path.join(path, e)) != cache_dir)
    if not names:
        raise ChameleonUserError(
            f"data folder {path!r} holds no domain subfolders; expected one subfolder per "
            "domain (e.g. web/, code/) containing text, .jsonl or train.bin files"
        )

    domains = []
    for name in names:
        dpath = os.path.join(path, name)
        if os.path.isfile(os.path.join(dpath, "train.bin")):
            domains.append(_open_bin_domain(name, dpath, val_fraction))
        else:
            for f in ("val.bin", "meta.json"):
                if os.path.isfile(os.path.join(dpath, f)):
                    raise ChameleonUserError(
                        f"domain {name!r}: found {f} but no train.bin in {dpath!r}; a "
                        "pre-tokenised domain needs train.bin (+ meta.json)"
                    )
            domains.append(_open_text_domain(name, dpath, tok, cache_dir, val_fraction))

    vocab_size = _dataset_vocab(domains, tok)
    return MixtureDataset(path, domains, tok, vocab_size, val_fraction, cache_dir)


def _dataset_vocab(domains: list[_Domain], tok: Tokenizer) -> int:
    text = [d for d in domains if d.kind == "text"]
    bins = [d for d in domains if d.kind == "bin"]
    if text:
        vocab = int(tok.vocab_size)
        for d in bins:
            if d.vocab_size != vocab:
                raise ChameleonUserError(
                    f"vocabulary mismatch: pre-tokenised domain {d.name!r} declares vocab_size "
                    f"{d.vocab_size} in meta.json, but text domains are tokenised with "
                    f"{tok.name!r} (vocab_size {vocab}); pass the tokenizer the bins were made "
                    "with"
                )
        return vocab
    vocab = bins[0].vocab_size
    for d in bins[1:]:
        if d.vocab_size != vocab:
            raise ChameleonUserError(
                f"vocabulary mismatch: domain {d.name!r} declares vocab_size {d.vocab_size} "
                f"in meta.json but domain {bins[0].name!r} declares {vocab}"
            )
    return vocab


def _listdir(path: str, what: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as exc:
        raise ChameleonUserError(f"{what} cannot be read: {exc.strerror or exc}") from exc


def _check_length(length) -> int:
    try:
        ok = int(length) == length and int(length) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ChameleonUserError(f"length: expected a positive integer window length, got {length!r}")
    return int(length)


class SplitTokens:
    """One split of a token stream: the blocks ``[starts[j], starts[j] + lengths[j])`` of
    ``base``, concatenated in stream order, read without copying the stream.

    Behaves like a read-only 1-D array for what the dataset layer needs: ``shape``, ``dtype``,
    ``len()``, integer and contiguous-slice indexing (a slice returns a new array), and
    ``np.asarray(split)`` (the whole split, copied).
    """

    ndim = 1

    def __init__(self, base: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.base = base
        self.starts = np.asarray(starts, dtype=np.int64)  # [m] in stream coordinates
        self.lengths = np.asarray(lengths, dtype=np.int64)  # [m]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])  # [m + 1] in split coordinates
        self.shape = (int(self.offsets[-1]),)
        self.dtype = base.dtype

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
            raise IndexError(f"index {key} is out of bounds for a split of {n} tokens")
        return self._read(i, i + 1)[0]

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

    def __array__(self, dtype=None, copy=None):
        arr = self._read(0, self.shape[0])
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"SplitTokens({self.shape[0]} tokens in {len(self.starts)} runs of a {self.base.shape[0]}-token stream)"


def split_blocks(n: int, val_fraction: float) -> tuple[int, np.ndarray]:
    """``(block, held_out [n_blocks] bool)``: the block size and which blocks of a stream of
    ``n`` tokens are validation blocks (the rule in the module doc)."""
    f = float(val_fraction)
    if n <= 0 or f <= 0.0:
        return max(n, 1), np.zeros(1 if n > 0 else 0, dtype=bool)
    block = max(_SPLIT_MIN_BLOCK, -(-n // _SPLIT_MAX_BLOCKS))
    block = max(1, min(block, int(n * f / _SPLIT_MIN_HELD_OUT)))
    i = np.arange(-(-n // block), dtype=np.float64)
    held_out = np.floor((i + 1) * f + 0.5) > np.floor(i * f + 0.5)
    return block, held_out


def _split(tokens: np.ndarray, val_fraction: float):
    """``(train, val)`` of a stream without ``val.bin``: evenly spread blocks (module doc)."""
    n = int(tokens.shape[0])
    block, held_out = split_blocks(n, val_fraction)
    if not held_out.any():
        return tokens, tokens[n:]
    bounds = np.minimum(np.arange(held_out.shape[0] + 1, dtype=np.int64) * block, n)

    def runs(mask: np.ndarray) -> SplitTokens:
        # maximal runs of consecutive blocks of one split, as (start, length) in the stream
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
        first, last = edges[0::2], edges[1::2]  # block ranges [first, last)
        return SplitTokens(tokens, bounds[first], bounds[last] - bounds[first])

    return runs(~held_out), runs(held_out)


def _chunked_max(arr: np.ndarray, chunk: int = 1 << 24) -> int:
    m = -1
    for i in range(0, arr.shape[0], chunk):
        m = max(m, int(arr[i:i + chunk].max()))
    return m


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "domain"


# -- pre-tokenised domains -------------------------------------------------------------------


def _open_bin_domain(name: str, dpath: str, val_fraction: float) -> _Domain:
    meta_path = os.path.join(dpath, "meta.json")
    if not os.path.isfile(meta_path):
        raise ChameleonUserError(
            f"domain {name!r}: train.bin has no meta.json beside it in {dpath!r}; write one like "
            '{"vocab_size": 50257, "dtype": "uint16"} so the token dtype is known'
        )
    try:
        with open(meta_path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChameleonUserError(f"domain {name!r}: cannot read {meta_path!r}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ChameleonUserError(f"domain {name!r}: {meta_path!r} must hold a JSON object")
    dtype_name = meta.get("dtype")
    if dtype_name not in _BIN_DTYPES:
        raise ChameleonUserError(
            f"domain {name!r}: unknown token dtype {dtype_name!r} in {meta_path!r}; expected "
            f"one of {sorted(_BIN_DTYPES)}"
        )
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise ChameleonUserError(
            f"domain {name!r}: {meta_path!r} must declare a positive integer vocab_size, "
            f"got {vocab!r}"
        )
    dtype = _BIN_DTYPES[dtype_name]
    if vocab > np.iinfo(dtype).max + 1:
        raise ChameleonUserError(
            f"domain {name!r}: vocab_size {vocab} does not fit dtype {dtype_name} in {meta_path!r}"
        )

    train = _open_bin(name, os.path.join(dpath, "train.bin"), dtype, allow_empty=False)
    val_path = os.path.join(dpath, "val.bin")
    if os.path.isfile(val_path):
        val = _open_bin(name, val_path, dtype, allow_empty=True)
    else:
        train, val = _split(train, val_fraction)
    return _Domain(name=name, path=dpath, kind="bin", train=train, val=val, vocab_size=vocab)


def _open_bin(name: str, fpath: str, dtype, allow_empty: bool) -> np.ndarray:
    try:
        size = os.path.getsize(fpath)
    except OSError as exc:
        raise ChameleonUserError(f"domain {name!r}: cannot read {fpath!r}: {exc}") from exc
    itemsize = np.dtype(dtype).itemsize
    if size % itemsize:
        raise ChameleonUserError(
            f"domain {name!r}: {fpath!r} is {size} bytes, not a whole number of "
            f"{np.dtype(dtype).name} tokens; is the dtype in meta.json right?"
        )
    if size == 0:
        if not allow_empty:
            raise ChameleonUserError(f"domain {name!r} is empty: {fpath!r} holds no tokens")
        return np.zeros(0, dtype=dtype)
    try:
        return np.memmap(fpath, dtype=dtype, mode="r")
    except OSError as exc:
        raise ChameleonUserError(f"domain {name!r}: cannot read {fpath!r}: {exc}") from exc


def _bin_fingerprint(d: _Domain, cache_dir: str) -> str:
    """Content hash of a pre-tokenised domain, remembered per stat key in the cache folder."""
    files = [f for f in _BIN_FILES if os.path.isfile(os.path.join(d.path, f))]
    stat_key = _stat_key("bin", d.path, [(f, os.path.join(d.path, f)) for f in files])
    index_path = os.path.join(cache_dir, "index", f"{_safe_name(d.name)}-bin-{stat_key}.json")
    rec = _read_json(index_path)
    if rec and rec.get("format") == _CACHE_FORMAT and isinstance(rec.get("fingerprint"), str):
        return rec["fingerprint"]
    fp = _content_fingerprint("bin", [(f, os.path.join(d.path, f)) for f in files], d.name)
    try:  # best effort: a read-only dataset simply re-hashes next time
        _write_json_atomic(index_path, {"format": _CACHE_FORMAT, "fingerprint": fp})
    except OSError:
        pass
    return fp


# -- text domains ----------------------------------------------------------------------------


def _list_text_files(name: str, dpath: str) -> list[tuple[str, str]]:
    """Sorted ``(relpath, abspath)`` of every non-hidden file under ``dpath``."""
    out = []
    def onerror(exc: OSError):
        raise ChameleonUserError(
            f"domain {name!r}: cannot read folder {exc.filename!r}: {exc.strerror or exc}"
        )
    for root, dirs, files in os.walk(dpath, onerror=onerror, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for fname in files:
            if fname.startswith("."):
                continue
            full = os.path.join(root, fname)
            if os.path.isfile(full):
                rel = os.path.relpath(full, dpath).replace(os.sep, "/")
                out.append((rel, full))
    out.sort()
    return out


def _stat_key(kind: str, dpath: str, files: list[tuple[str, str]], tok_name: str = "") -> str:
    """Cheap key of a domain's current files: its folder, and each file's path, size, mtime."""
    h = hashlib.sha256(f"{_CACHE_FORMAT}\0{kind}\0{tok_name}\0{dpath}\0".encode())
    for rel, full in files:
        st = os.stat(full)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:32]


def _content_fingerprint(kind: str, files: list[tuple[str, str]], domain: str,
                         tok_name: str = "") -> str:
    h = hashlib.sha256(f"{_CACHE_FORMAT}\0{kind}\0{tok_name}\0".encode())
    for rel, full in files:
        try:
            size = os.path.getsize(full)
            h.update(f"{rel}\0{size}\0".encode())
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(_HASH_BLOCK), b""):
                    h.update(block)
        except OSError as exc:
            raise ChameleonUserError(
                f"domain {domain!r}: cannot read file {full!r}: {exc.strerror or exc}"
            ) from exc
    return h.hexdigest()


def _open_text_domain(name: str, dpath: str, tok: Tokenizer, cache_dir: str,
                      val_fraction: float) -> _Domain:
    files = _list_text_files(name, dpath)
    if not files:
        raise ChameleonUserError(
            f"domain {name!r} is empty: {dpath!r} holds no (non-hidden) data files"
        )
    try:
        stat_key = _stat_key("text", dpath, files, tok.name)
    except OSError as exc:
        raise ChameleonUserError(f"domain {name!r}: cannot stat {exc.filename!r}: {exc}") from exc
    safe = _safe_name(name)
    index_path = os.path.join(cache_dir, "index", f"{safe}-text-{stat_key}.json")

    # 1) unchanged since last load: the stat key names the fingerprint; nothing is read.
    rec = _read_json(index_path)
    fp = rec.get("fingerprint") if rec and rec.get("format") == _CACHE_FORMAT else None
    meta = _read_token_meta(cache_dir, safe, fp) if isinstance(fp, str) else None
    if meta is None:
        # 2) hash the content; identical content (e.g. touched or copied files) reuses tokens.
        fp = _content_fingerprint("text", files, name, tok.name)
        meta = _read_token_meta(cache_dir, safe, fp)
        if meta is None:
            # 3) new content: tokenise into the cache.
            meta = _tokenise_domain(name, files, tok, cache_dir, safe, fp)
        try:
            _write_json_atomic(index_path, {"format": _CACHE_FORMAT, "fingerprint": fp})
        except OSError as exc:
            raise _cache_error(cache_dir, exc)

    if meta["n_tokens"] == 0:
        raise ChameleonUserError(
            f"domain {name!r} is empty: its {len(files)} file(s) in {dpath!r} hold no text"
        )
    dtype = _BIN_DTYPES[meta["dtype"]]
    tokens = np.memmap(_token_path(cache_dir, safe, fp), dtype=dtype, mode="r",
                       shape=(meta["n_tokens"],))
    train, val = _split(tokens, val_fraction)
    return _Domain(name=name, path=dpath, kind="text", train=train, val=val,
                   vocab_size=int(tok.vocab_size), files=files, max_id=meta["max_id"],
                   fingerprint=fp, stat_key=stat_key)


def _token_path(cache_dir: str, safe: str, fp: str) -> str:
    return os.path.join(cache_dir, f"{safe}-{fp[:32]}.tokens")


def _read_token_meta(cache_dir: str, safe: str, fp: str) -> Optional[dict]:
    """The cache entry's metadata if it is complete and consistent, else None."""
    tpath = _token_path(cache_dir, safe, fp)
    meta = _read_json(tpath + ".json")
    if not meta or meta.get("format") != _CACHE_FORMAT or meta.get("fingerprint") != fp:
        return None
    if meta.get("dtype") not in _BIN_DTYPES or not isinstance(meta.get("n_tokens"), int):
        return None
    try:
        size = os.path.getsize(tpath)
    except OSError:
        return None
    if size != meta["n_tokens"] * np.dtype(_BIN_DTYPES[meta["dtype"]]).itemsize:
        return None
    return meta


def _cache_error(cache_dir: str, exc: OSError) -> ChameleonUserError:
    return ChameleonUserError(
        f"cache_dir: cannot write the token cache in {cache_dir!r} ({exc.strerror or exc}); "
        "pass a writable cache_dir"
    )


@contextmanager
def _reading(name: str, full: str):
    """Turn decoding and I/O errors while reading ``full`` into ChameleonUserError."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise ChameleonUserError(
            f"domain {name!r}: file {full!r} is not valid UTF-8 text ({exc.reason}); convert "
            "it to UTF-8 or remove it from the domain folder"
        ) from None
    except OSError as exc:
        raise ChameleonUserError(
            f"domain {name!r}: cannot read file {full!r}: {exc.strerror or exc}"
        ) from exc


def _iter_documents(name: str, rel: str, full: str) -> Iterator[Iterator[str]]:
    """Yield each document of one file as an iterator of text chunks.

    A ``.jsonl`` file yields one document per non-blank line (its ``text`` field); any other
    file is one document read in line-aligned chunks of about ``_CHUNK_CHARS`` characters.
    """
    with _reading(name, full):
        f = open(full, "r", encoding="utf-8", newline="")
    with f:
        if rel.lower().endswith(".jsonl"):
            with _reading(name, full):
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield iter((_jsonl_text(name, full, lineno, line),))
        else:
            yield _text_chunks(name, full, f)


def _jsonl_text(name: str, full: str, lineno: int, line: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ChameleonUserError(
            f"domain {name!r}: file {full!r} line {lineno} is not valid JSON ({exc.msg})"
        ) from None
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise ChameleonUserError(
            f"domain {name!r}: file {full!r} line {lineno} has no string 'text' field; "
            '.jsonl lines must look like {"text": "..."}'
        )
    return text


def _text_chunks(name: str, full: str, f) -> Iterator[str]:
    """Line-aligned chunks of about ``_CHUNK_CHARS`` characters of the open text file ``f``."""
    buf, size = [], 0
    with _reading(name, full):
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= _CHUNK_CHARS:
                yield "".join(buf)
                buf, size = [], 0
    if buf:
        yield "".join(buf)


def _encode(tok: Tokenizer, text: str) -> np.ndarray:
    enc = getattr(tok, "encode_array", None)
    return enc(text) if enc is not None else np.asarray(tok.encode(text), dtype=np.int64)


def _tokenise_domain(name: str, files: list[tuple[str, str]], tok: Tokenizer, cache_dir: str,
                     safe: str, fp: str) -> dict:
    """Stream every document of the domain into ``<cache>/<safe>-<fp>.tokens``; return meta.

    Tokens go to a temp file in the cache folder that is renamed into place only when
    complete, followed by its ``.json`` metadata (the commit marker), so a crash leaves no
    half-written entry that a later load could mistake for a complete one.
    """
    dtype_name = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    dtype = _BIN_DTYPES[dtype_name]
    eos = np.asarray([tok.eos_id], dtype=dtype)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{safe}-", suffix=".tmp", dir=cache_dir)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; caches may be shared
    except OSError as exc:
        raise _cache_error(cache_dir, exc)
    n_tokens, n_docs, max_id = 0, 0, -1
    try:
        with os.fdopen(fd, "wb") as out:
            for rel, full in files:
                for doc in _iter_documents(name, rel, full):
                    doc_tokens = 0
                    for chunk in doc:
                        ids = _encode(tok, chunk)
                        if ids.size == 0:
                            continue
                        m = int(ids.max())
                        if m >= tok.vocab_size or int(ids.min()) < 0:
                            raise ChameleonUserError(
                                f"tokenizer {tok.name!r} produced id {m} outside its vocabulary "
                                f"(vocab_size {tok.vocab_size}) on {full!r}"
                            )
                        max_id = max(max_id, m)
                        out.write(ids.astype(dtype, copy=False).tobytes())
                        doc_tokens += ids.size
                    if doc_tokens:  # empty documents add nothing, not even an EOS
                        out.write(eos.tobytes())
                        n_tokens += doc_tokens + 1
                        n_docs += 1
            out.flush()
            os.fsync(out.fileno())
        if n_tokens:
            max_id = max(max_id, int(tok.eos_id))
        tpath = _token_path(cache_dir, safe, fp)
        os.replace(tmp, tpath)
        meta = {"format": _CACHE_FORMAT, "domain": name, "fingerprint": fp,
                "tokenizer": tok.name, "dtype": dtype_name, "n_tokens": n_tokens,
                "n_documents": n_docs, "max_id": max_id, "files": [r for r, _ in files]}
        _write_json_atomic(tpath + ".json", meta)
        return meta
    except OSError as exc:
        raise _cache_error(cache_dir, exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- small file helpers ----------------------------------------------------------------------


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: str, obj: dict) -> None:
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
