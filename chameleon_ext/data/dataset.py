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
  chunks of at most 8M characters, cut at a newline or space where possible, even in a file
  with no newline) and the tokens are written incrementally into a uint16/uint32 memmap in the
  cache folder, so a domain never has to fit in memory (one JSONL line is parsed whole).
  Links are followed, but each real folder and file is read once, so a link loop
  (``loop -> .``) or a second link to a file cannot repeat text; a broken link (or a loop of
  links) is an error naming it, not silently skipped. A JSONL ``text`` holding a
  lone surrogate escape (``{"text": "\\ud800"}``, not Unicode text) is an error naming file and line.
* **pre-tokenised** -- the folder holds ``train.bin`` (and optionally ``val.bin``) as flat
  token arrays, with ``meta.json`` beside them declaring ``{"vocab_size": 50257, "dtype":
  "uint16"}`` (dtype ``uint16`` or ``uint32``). Other files in such a folder (a README, the
  script that produced the bins, ...) are ignored.

Other formats, and streamed domains
-----------------------------------
A domain may also hold what :mod:`chameleon_ext.data.sources` reads (``detect_sources``):
Megatron-LM ``PREFIX.bin`` + ``PREFIX.idx`` pairs (pre-tokenised, kind ``"bin"``; their
vocabulary is the tokenizer's), ``.jsonl.gz``/``.jsonl.zst`` shards, Parquet files, Hugging
Face ``save_to_disk`` folders and ``.arrow`` files (raw text in the field/column
``text_field``). Pre-tokenised tokens -- nanoGPT bins too -- are :class:`SourceTokens`, read
by ``pread`` rather than memory-mapped. Raw text in those formats is tokenised into the cache
like text files, from ``TextSources.iter_documents``, keyed by the sources' file-identity
fingerprint, the tokenizer and ``text_field`` (``verify="full"``: their content hash).

A raw-text domain whose files hold more than ``stream_threshold`` bytes
(:data:`STREAM_THRESHOLD_BYTES`, 256 MiB) is *streamed*: it has no token cache and no token
array; :meth:`MixtureDataset.draw_windows` draws windows from its files with
``TextSources.sample_windows`` (uniform over tokens up to each document's bytes per token;
the split by a hash of each unit's position), its :meth:`~MixtureDataset.token_count` is
estimated from a seeded draw, and its fingerprint keys on the sources' identity, the
tokenizer, ``text_field`` and the draw rules. A pre-tokenised domain above the threshold is
not scanned whole for its largest id; each window read is checked instead.

Caching and fingerprints
------------------------
Each text domain's tokens are cached under ``<dataset>/.chameleon_cache/`` (or ``cache_dir``)
in a file named by the domain's *fingerprint*: sha256 over the tokenizer name and every file's
relative path, size and bytes. A cheap stat key (paths, sizes, mtimes) points at the
fingerprint, so an unchanged domain is neither re-read nor re-tokenised on the next load; a
touched-but-identical domain is re-hashed but not re-tokenised; a changed file changes only its
own domain's fingerprint. :meth:`MixtureDataset.fingerprint` is meant to key embedding caches
and to tell a resumed run that a domain's data changed.

The cache folder must not be read as data: ``cache_dir`` may be outside the data folder or
under a hidden folder in it (the default), but never the data folder itself nor a folder the
loader would list (a domain folder, a folder inside one, or a non-hidden folder of the data
folder, which would become a domain); such a ``cache_dir`` is refused, naming the domain.

Every cache file is written through :func:`chameleon_ext.io.atomic_write` (temp file, fsync,
rename), so a kill, a full disk or a read-only folder never leaves a half-written entry; temp
files of writers that died (SIGKILL) are removed by the next load. Each ``.tokens`` file has a
``.tokens.json`` beside it (written last: it commits the entry) recording the token count,
dtype, the sha256 of the whole file, a digest per block (at most 1024 blocks) and the true
largest token id, all computed by reading the finished file back. They are checked on use:

* ``verify="sample"`` (the default) on every load: size, the first and last block and 6
  random blocks (different on each load, so repeated runs cover the whole file), and that
  those blocks hold no id above the recorded maximum;
* ``verify="full"`` (or :meth:`MixtureDataset.verify`): every block, the whole-file hash and
  the true maximum, and the sources are re-hashed even if their stat key is unchanged;
* :meth:`MixtureDataset.check_vocab` scans the true maximum id of every domain once, so an id
  beyond the model's vocabulary is found before training, whatever sampling missed.

A damaged entry is rebuilt from the text with a warning; ids beyond the vocabulary that reach a
window anyway are a one-line error, never an IndexError inside the model.

Split and windows
-----------------
Validation tokens are ``val.bin`` when given, otherwise ``val_fraction`` of the domain's
token stream, as blocks spread evenly over it (deterministic; no shuffling). A **test** split
(``test_fraction``, default 0: none) is drawn the same interleaved way: the held-out blocks
(``val_fraction + test_fraction`` of the stream, evenly spread) are dealt to validation and
test in proportion, again evenly, so every part of the stream is represented in each split
and the three are disjoint. ``test.bin`` beside ``train.bin`` is used as the test split when
given (and then nothing is cut for test); with ``val.bin`` given, test blocks are cut from
``train.bin`` alone. With ``test_fraction == 0`` the train/validation split is exactly the one
of layout version 2. The test split is for a final, untouched evaluation (``chameleon
compare``): nothing in this library fits on it. Windows are contiguous runs of ``length``
tokens starting anywhere in the split, so -- as in the reference -- they may cross document
boundaries. (The reference draws starts from ``[0, n - length)``; every full window, i.e.
``[0, n - length]``, is allowed here.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from .. import io
from ..errors import ChameleonUserError
from .sources import NanoGPTBinSource, TextSources, TokenSources, detect_sources
from .sources.common import _combine
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_record

__all__ = ["MixtureDataset", "SplitTokens", "load_dataset", "DEFAULT_CACHE_DIRNAME", "SPLIT_LAYOUT",
           "STREAM_THRESHOLD_BYTES"]

DEFAULT_CACHE_DIRNAME = ".chameleon_cache"
# Bump when the tokenisation rules change: it is hashed into every fingerprint, so bumping it
# changes them all (and invalidates embedding caches keyed by them).
_TOKENS_RULES = "chameleon_ext.tokens/1"
# Bump when the cache metadata layout changes: older entries are rebuilt, fingerprints stay.
_CACHE_FORMAT = "chameleon_ext.tokens/2"
VERIFY_MODES = ("sample", "full")
_BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_BIN_FILES = ("train.bin", "val.bin", "test.bin", "meta.json")
SPLITS = ("train", "val", "test")
# Big text files are tokenised in chunks of this to twice this many characters (cut at a newline
# or space where possible), so memory stays bounded; each chunk is still part of the same
# document (no EOS between chunks).
_CHUNK_CHARS = 1 << 22
_HASH_BLOCK = 1 << 20
# Token files are verified per block: at most this many blocks of at least _HASH_BLOCK bytes.
_MAX_BLOCKS = 1024
_SAMPLE_BLOCKS = 6  # random blocks checked per load, besides the first and the last
# How train/val are cut from a stream without val.bin (see the module doc). Version 1 was the
# stream's tail; bump when the rule changes, so caches of windows drawn from a split change key.
# Version 3 adds the test split (version 2's split whenever test_fraction is 0).
SPLIT_LAYOUT = "blocks-evenly-spread/3"
_SPLIT_MIN_BLOCK = 4096
_SPLIT_MAX_BLOCKS = 1024
_SPLIT_MIN_HELD_OUT = 32  # held-out blocks a domain gets at least, where its size allows
# A raw-text domain whose files hold more bytes than this is STREAMED: no token cache, windows
# are drawn from the files (chameleon_ext.data.sources) at the cost of the sample. Below it the
# whole domain is tokenised once into the cache, which is faster to draw from.
STREAM_THRESHOLD_BYTES = 256 << 20
# Bump when the way windows are drawn from a streamed domain changes: it is hashed into the
# streamed domain's fingerprint, so embeddings cached from older draws change key.
_STREAM_DRAW = "chameleon_ext.stream_draw/1"
# Suffixes only the sources layer reads (the legacy tokeniser reads text files and .jsonl).
_SOURCE_ONLY_SUFFIXES = (".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow", ".idx")
_HF_MARKERS = ("state.json", "dataset_dict.json")
# Windows and length of the seeded draw that estimates a streamed domain's token count.
_ESTIMATE_WINDOWS, _ESTIMATE_LENGTH = 256, 256


@dataclass
class _Domain:
    name: str
    path: str
    kind: str  # "text" or "bin"
    train: np.ndarray  # [n_train] memmap
    val: np.ndarray  # [n_val] memmap
    vocab_size: int
    test: Optional[np.ndarray] = None  # [n_test]; None is read as empty
    files: list = field(default_factory=list)  # for text domains: [(relpath, abspath)]
    max_id: Optional[int] = None  # largest token id, when known
    fingerprint: Optional[str] = None
    stat_key: Optional[str] = None
    cache_path: Optional[str] = None  # text domains: the .tokens file
    max_checked: bool = False  # max_id is the true maximum of the tokens (scanned this run)
    # the domain's chameleon_ext.data.sources reader: pre-tokenised domains read through it,
    # new raw formats are tokenised from it, streamed domains draw every window from it
    source: Optional[Union[TokenSources, TextSources]] = None
    streamed: bool = False  # raw text above the threshold: no token array, windows drawn from `source`
    estimated: Optional[int] = None  # streamed: estimated tokens of the whole domain
    text_field: str = "text"
    full_fingerprint: bool = False  # source fingerprints hash every byte (verify="full")


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
                 vocab_size: int, val_fraction: float, cache_dir: str, test_fraction: float = 0.0):
        self.path = path
        self._domains = {d.name: d for d in domains}
        self.domains = [d.name for d in domains]
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
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
        """``"text"`` (tokenised here, cached or streamed) or ``"bin"`` (pre-tokenised:
        nanoGPT ``train.bin`` or Megatron ``.bin``/``.idx``)."""
        return self._get(name).kind

    def is_streamed(self, name: str) -> bool:
        """True for a raw-text domain above the stream threshold: it has no token array, and
        its windows are drawn from its files by :meth:`draw_windows` (module doc)."""
        return self._get(name).streamed

    def _streamed_error(self, d: _Domain, what: str) -> ChameleonUserError:
        return ChameleonUserError(
            f"domain {d.name!r} is streamed (its raw text is above the stream threshold), so it has "
            f"no {what}; draw windows from it with draw_windows()")

    def train_tokens(self, name: str) -> np.ndarray:
        """Training tokens of domain ``name``: a read-only ``[n_train]`` memmap (or, when
        blocks are held out for validation, a :class:`SplitTokens` view of the memmap;
        pre-tokenised domains: a :class:`SourceTokens` read by ``pread``)."""
        d = self._get(name)
        if d.streamed:
            raise self._streamed_error(d, "token array")
        return d.train

    def val_tokens(self, name: str) -> np.ndarray:
        """Held-out tokens of domain ``name``: a read-only ``[n_val]`` memmap."""
        d = self._get(name)
        if d.streamed:
            raise self._streamed_error(d, "token array")
        return d.val

    def test_tokens(self, name: str) -> np.ndarray:
        """Test tokens of domain ``name`` (empty unless ``test_fraction > 0`` or a test.bin)."""
        d = self._get(name)
        return d.test if d.test is not None else d.val[:0]

    def tokens(self, name: str, split: str = "train") -> np.ndarray:
        """Tokens of ``split`` (``"train"``, ``"val"`` or ``"test"``) of domain ``name``."""
        if split == "train":
            return self.train_tokens(name)
        if split == "val":
            return self.val_tokens(name)
        if split == "test":
            return self.test_tokens(name)
        raise ChameleonUserError(f"split: expected one of {list(SPLITS)}, got {split!r}")

    def tokenizer_record(self) -> Optional[dict]:
        """The :func:`~chameleon_ext.data.tokenizer.tokenizer_record` of the tokenizer that made
        this dataset's tokens, or None when every domain is pre-tokenised (its tokenizer is
        not known here)."""
        if all(d.kind == "bin" for d in self._domains.values()):
            return None
        return tokenizer_record(self.tokenizer)

    def n_tokens(self, name: str, split: str = "train") -> int:
        """Tokens of ``split`` of domain ``name``: counted, except for a streamed domain, whose
        count is estimated (see :meth:`token_count`)."""
        return self.token_count(name, split).tokens

    def token_count(self, name: str, split: str = "train"):
        """Tokens of ``split`` of domain ``name`` as a :class:`chameleon_ext.budget.TokenCount`:
        counted for cached and pre-tokenised domains; for a streamed domain, estimated from a
        seeded draw of its tokens per byte (``TextSources.estimated_tokens``) times the
        split's share (``1 - val_fraction`` or ``val_fraction``)."""
        from ..budget import TokenCount

        d = self._get(name)
        if not d.streamed:
            return TokenCount(int(self.tokens(name, split).shape[0]), "counted")
        if split not in ("train", "val"):
            raise ChameleonUserError(f"split: expected 'train' or 'val', got {split!r}")
        if d.estimated is None:
            rng = np.random.default_rng([0, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")])
            d.source.sample_windows(rng, _ESTIMATE_WINDOWS, _ESTIMATE_LENGTH, self.tokenizer)
            d.estimated = int(d.source.estimated_tokens())
        share = self.val_fraction if split == "val" else 1.0 - self.val_fraction
        return TokenCount(int(round(d.estimated * share)),
                          f"estimated from {_ESTIMATE_WINDOWS} sampled windows of a streamed domain")

    def fingerprint(self, name: str) -> str:
        """Stable hex digest (sha256) of domain ``name``'s content and tokenizer.

        Identical files (same relative paths and bytes) tokenised with the same tokenizer give
        the same fingerprint on any machine and in any later release (it changes only if the
        tokenisation rules do); changing any file of the domain changes it. A run can record
        it and compare on resume, so training on changed text is noticed.

        Cheap: text domains are fingerprinted during :func:`load_dataset` (from the cache's
        stat-key index when nothing changed), so this is a lookup; a pre-tokenised domain is
        hashed on the first call, once per stat key (remembered in the cache folder when it is
        writable), then looked up. Note that windows drawn from the *train split* also depend
        on :attr:`val_fraction`, so a cache of window embeddings should key on both.
        """
        d = self._get(name)
        if d.fingerprint is None:  # pre-tokenised domains are hashed lazily (they can be big)
            d.fingerprint = _bin_fingerprint(d, self.cache_dir)
        return d.fingerprint

    # -- checks ------------------------------------------------------------------------------

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if any domain holds a token id ``>= vocab_size`` (e.g. the model's vocab).

        The true largest id of each domain is scanned once per dataset object (the recorded
        one is not trusted); a token cache whose true maximum differs from the one recorded
        with it is damaged and rebuilt first.

        Raises:
            ChameleonUserError: naming the first offending domain, its largest id and the
                vocabulary size.
        """
        vocab_size = int(vocab_size)
        for name in self.domains:
            d = self._domains[name]
            self._check_max(d)
            if d.max_id is None:
                # streamed or large pre-tokenised domains are not scanned (it would read them
                # whole): their vocabulary must fit, and every window read is checked against it
                vocab = min(d.vocab_size, self.vocab_size)
                if vocab > vocab_size:
                    raise ChameleonUserError(
                        f"vocabulary mismatch: domain {name!r} uses a vocabulary of {vocab} ids "
                        f"(too large to scan for its largest id), but the model's vocabulary has "
                        f"only {vocab_size} ids; use the model's tokenizer or a model with "
                        f"vocab_size >= {vocab}")
                continue
            if d.max_id >= vocab_size:
                raise ChameleonUserError(
                    f"vocabulary mismatch: domain {name!r} holds token id {d.max_id}, but the "
                    f"model's vocabulary has only {vocab_size} ids (0..{vocab_size - 1}); "
                    "tokenise the data with the model's tokenizer or build the model with "
                    f"vocab_size >= {d.max_id + 1}"
                )

    def _check_max(self, d: _Domain) -> None:
        if d.max_checked:
            return
        if d.kind == "text":  # (streamed domains are created max_checked)
            true_max = _chunked_max(_open_tokens(d.cache_path, d.train.dtype))
            if true_max != d.max_id:
                self._rebuild(d, f"it holds token id {true_max} but recorded {d.max_id} as its largest")
                true_max = _chunked_max(_open_tokens(d.cache_path, d.train.dtype))
        else:
            true_max = max(_chunked_max(d.train), _chunked_max(d.val),
                           _chunked_max(d.test) if d.test is not None else -1)
        d.max_id, d.max_checked = true_max, True

    def verify(self) -> list:
        """Fully verify every text domain's token cache now (each block's digest, the whole
        file's sha256 and the true largest id) and rebuild the damaged ones from the text.

        Returns:
            The names of the domains whose caches were rebuilt (empty when all were sound).
        """
        rebuilt = []
        for name in self.domains:
            d = self._domains[name]
            if d.kind != "text" or d.streamed:
                continue
            meta = io.read_json_or_none(d.cache_path + ".json")
            problem = (_verify_tokens(d.cache_path, meta, "full") if meta is not None
                       else "its metadata is missing or unreadable")
            if problem:
                self._rebuild(d, problem)
                rebuilt.append(name)
            d.max_checked = True
        return rebuilt

    def _rebuild(self, d: _Domain, problem: str) -> None:
        """Re-tokenise text domain ``d`` into its cache entry after ``problem`` was found."""
        warnings.warn(f"token cache {d.cache_path!r} of domain {d.name!r} is damaged ({problem}); "
                      "rebuilding it from the text", stacklevel=3)
        if d.source is not None:
            now = _source_text_fingerprint(d.source, self.tokenizer, d.text_field, d.full_fingerprint)
        else:
            now = _content_fingerprint("text", d.files, d.name, self.tokenizer.name)
        if now != d.fingerprint:
            raise ChameleonUserError(
                f"domain {d.name!r}: its files in {d.path!r} changed after the dataset was "
                "loaded; load it again")
        meta = _tokenise_domain(d.name, d.files, self.tokenizer, self.cache_dir,
                                _safe_name(d.name), d.fingerprint,
                                documents=None if d.source is None else d.source.iter_documents())
        tokens = _open_tokens(d.cache_path, _BIN_DTYPES[meta["dtype"]], meta["n_tokens"])
        d.train, d.val, d.test = _split3(tokens, self.val_fraction, self.test_fraction)
        d.max_id, d.max_checked = meta["max_id"], True

    def check_window(self, length: int, split: str = "train",
                     domains: Optional[Sequence[str]] = None) -> None:
        """Raise unless every domain (or each of ``domains``) holds at least one full window.

        Raises:
            ChameleonUserError: naming the first domain whose ``split`` is shorter than
                ``length`` tokens.
        """
        length = _check_length(length)
        for name in self.domains if domains is None else domains:
            if not self._get(name).streamed:  # a streamed domain's draw raises when too short
                self._check_domain_window(name, length, split)

    def _check_domain_window(self, name: str, length: int, split: str) -> int:
        n = self.n_tokens(name, split)
        if n < length:
            hint = {"val": " (raise val_fraction or add a val.bin)",
                    "test": " (raise test_fraction or add a test.bin)"}.get(
                        split, " (add data or use a shorter window)")
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
        """``n`` windows of ``length`` tokens from domain ``name``: ``[n, length]`` int64
        (same as :meth:`draw_windows`)."""
        return self.draw_windows(name, n, length, rng, split)

    def draw_windows(self, name: str, n: int, length: int, rng: np.random.Generator,
                     split: str = "train") -> np.ndarray:
        """``n`` windows of ``length`` tokens from domain ``name``: ``[n, length]`` int64.

        Cached and pre-tokenised domains: draws ``n`` starts from ``rng`` (one ``rng.integers``
        call, so the generator advances deterministically) and gathers the windows from the
        token array. Streamed domains: ``TextSources.sample_windows`` with ``rng`` (windows
        starting in units of ``split``, the units' split by hash; the module doc), reading and
        tokenising only what the windows need.
        """
        d = self._get(name)
        if d.streamed:
            return self._draw_streamed(d, n, length, rng, split)
        if not isinstance(rng, np.random.Generator):
            raise ChameleonUserError(
                f"rng: expected a numpy.random.Generator, got {type(rng).__name__}"
            )
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ChameleonUserError(f"n: expected a non-negative integer window count, got {n!r}")
        length = _check_length(length)
        total = self._check_domain_window(name, length, split)
        _check_memory(int(n), length + 1, name)  # the windows and their starts
        starts = rng.integers(0, total - length + 1, size=int(n))
        return self.windows_at(name, starts, length, split)

    def _draw_streamed(self, d: _Domain, n, length, rng, split: str) -> np.ndarray:
        if not isinstance(rng, np.random.Generator):
            raise ChameleonUserError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
        if split not in ("train", "val"):
            raise ChameleonUserError(f"split: expected 'train' or 'val', got {split!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ChameleonUserError(f"n: expected a non-negative integer window count, got {n!r}")
        length = _check_length(length)
        _check_memory(int(n), length, d.name)
        if self.val_fraction == 0.0:
            if split == "val":
                raise ChameleonUserError(
                    f"domain {d.name!r} has no validation split (val_fraction is 0); raise val_fraction")
            return d.source.sample_windows(rng, int(n), length, self.tokenizer)
        return d.source.sample_windows(rng, int(n), length, self.tokenizer, split=split,
                                       val_fraction=self.val_fraction)

    def windows_at(self, name: str, starts: np.ndarray, length: int,
                   split: str = "train") -> np.ndarray:
        """Windows of ``length`` tokens starting at ``starts`` ``[n]``: ``[n, length]`` int64
        (not for streamed domains, which have no token positions: use :meth:`draw_windows`)."""
        toks = self.tokens(name, split)
        length = _check_length(length)
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        n = toks.shape[0]
        if starts.size and (int(starts.min()) < 0 or int(starts.max()) > n - length):
            raise ChameleonUserError(
                f"starts: every window start must lie in [0, {n - length}] for windows of "
                f"{length} tokens in the {split} split of domain {name!r} ({n} tokens), got "
                f"{int(starts.min())}..{int(starts.max())}")
        _check_memory(starts.shape[0], length, name)
        out = np.empty((starts.shape[0], length), dtype=np.int64)
        # Row by row slicing reads each window as one contiguous run of the memmap, which beats
        # fancy indexing with an [n, length] index array on large files.
        for i, s in enumerate(starts):
            out[i] = toks[s:s + length]
        # One pass over a batch: an id beyond the vocabulary (damaged tokens that sampling did
        # not catch) stops here with the domain's name instead of as an IndexError in the model.
        if out.size and int(out.max()) >= self.vocab_size:
            d = self._get(name)
            where = d.cache_path if d.kind == "text" else d.path
            raise ChameleonUserError(
                f"domain {name!r}: token id {int(out.max())} in its {split} split is beyond the "
                f"vocabulary ({self.vocab_size} ids); its tokens in {where!r} are damaged "
                "(text domains: load with verify='full' to rebuild them)"
            )
        return out

    # -- reporting ---------------------------------------------------------------------------

    def summary(self) -> list[dict]:
        """One dict per domain: name, kind, train/val token counts (estimated for a
        streamed domain, which has ``"streamed": True``)."""
        return [
            {"domain": n, "kind": self._domains[n].kind,
             "train_tokens": self.n_tokens(n, "train"), "val_tokens": self.n_tokens(n, "val"),
             **({"streamed": True} if self._domains[n].streamed else {})}
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
                 val_fraction: float = 0.1, verify: str = "sample", text_field: str = "text",
                 stream_threshold: int = STREAM_THRESHOLD_BYTES, test_fraction: float = 0.0) -> MixtureDataset:
    """Discover, tokenise (with caching) and split the domains of the dataset at ``path``.

    Args:
        path: dataset folder with one subfolder per domain.
        tokenizer: ``"byte"``, a local Hugging Face tokenizer folder, or a tokenizer object;
            used for text/jsonl domains.
        cache_dir: where tokenised text domains are cached; default
            ``<path>/.chameleon_cache``. It must not be the data folder nor a folder the
            loader would list as (part of) a domain; hidden folders are fine.
        val_fraction: fraction in ``[0, 1)`` of each token stream held out for validation when
            the domain has no ``val.bin``.
        test_fraction: fraction in ``[0, 1)`` held out as the test split when the domain has
            no ``test.bin`` (default 0: no test split); ``val_fraction + test_fraction < 1``.
        verify: how token caches are checked before use: ``"sample"`` (size and a few blocks;
            cheap) or ``"full"`` (every byte, the true largest id, and the source files
            re-hashed; for domains read through ``chameleon_ext.data.sources`` the cache and
            draw keys then hash every byte instead of the files' identity). A damaged entry is
            rebuilt with a warning.
        text_field: the JSON field / Parquet or Arrow column holding the text.
        stream_threshold: a raw-text domain whose files hold more bytes than this is streamed
            (no token cache; see the module doc); default :data:`STREAM_THRESHOLD_BYTES`.

    Raises:
        ChameleonUserError: an empty, missing or unreadable dataset folder, an empty domain, a
            non-UTF-8 or unreadable file, a malformed ``.jsonl`` line, a ``meta.json`` with
            unknown dtype, inconsistent vocabularies, a misplaced or unwritable cache folder,
            or an invalid option.
    """
    if isinstance(path, (str, os.PathLike)) and os.fspath(path) == "":
        raise ChameleonUserError("data folder: expected a folder path, got an empty string")
    if not isinstance(path, (str, os.PathLike)):
        raise ChameleonUserError(f"data folder: expected a folder path, got {type(path).__name__}")
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
    try:
        test_fraction = float(test_fraction)
    except (TypeError, ValueError):
        raise ChameleonUserError(f"test_fraction: expected a number in [0, 1), got {test_fraction!r}")
    if not (0.0 <= test_fraction < 1.0) or val_fraction + test_fraction >= 1.0:
        raise ChameleonUserError(f"test_fraction: expected a number in [0, 1) with val_fraction + "
                                 f"test_fraction < 1, got {test_fraction} (val_fraction {val_fraction})")
    if verify not in VERIFY_MODES:
        raise ChameleonUserError(f"verify: expected one of {list(VERIFY_MODES)}, got {verify!r}")
    if not isinstance(text_field, str) or not text_field:
        raise ChameleonUserError(f"text_field: expected a non-empty field/column name, got {text_field!r}")
    if isinstance(stream_threshold, bool) or not isinstance(stream_threshold, (int, np.integer)) \
            or stream_threshold < 0:
        raise ChameleonUserError(
            f"stream_threshold: expected a non-negative number of bytes, got {stream_threshold!r}")
    tok = load_tokenizer(tokenizer)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise ChameleonUserError(f"cache_dir: expected a folder path, got {type(cache_dir).__name__}")
    if cache_dir is not None and os.fspath(cache_dir) == "":
        raise ChameleonUserError("cache_dir: expected a folder path, got an empty string")
    cache_dir = (os.path.join(path, DEFAULT_CACHE_DIRNAME) if cache_dir is None
                 else os.path.abspath(os.fspath(cache_dir)))

    entries = sorted(e for e in _listdir(path, f"data folder {path!r}") if not e.startswith("."))
    for e in entries:
        _check_link(os.path.join(path, e), f"data folder {path!r}: entry {e!r}")
    names = [e for e in entries if os.path.isdir(os.path.join(path, e))]
    _check_cache_location(path, cache_dir, names)
    if not names:
        raise ChameleonUserError(
            f"data folder {path!r} holds no domain subfolders; expected one subfolder per "
            "domain (e.g. web/, code/) containing text, .jsonl or train.bin files"
        )
    # Writers killed outright (SIGKILL) leave temp files; theirs are safe to delete now.
    io.remove_stale_temps(cache_dir)
    io.remove_stale_temps(os.path.join(cache_dir, "index"))

    domains = []
    for name in names:
        dpath = os.path.join(path, name)
        if os.path.lexists(os.path.join(dpath, "train.bin")):
            domains.append(_open_bin_domain(name, dpath, val_fraction, int(stream_threshold), test_fraction))
        else:
            for f in ("val.bin", "test.bin", "meta.json"):
                if os.path.lexists(os.path.join(dpath, f)):
                    raise ChameleonUserError(
                        f"domain {name!r}: found {f} but no train.bin in {dpath!r}; a "
                        "pre-tokenised domain needs train.bin (+ meta.json)"
                    )
            d = _open_raw_domain(name, dpath, tok, cache_dir, val_fraction, verify, text_field,
                                 int(stream_threshold), test_fraction)
            # None: text files and .jsonl below the threshold, cached exactly as before
            domains.append(d or _open_text_domain(name, dpath, tok, cache_dir, val_fraction, verify, test_fraction))

    vocab_size = _dataset_vocab(domains, tok)
    return MixtureDataset(path, domains, tok, vocab_size, val_fraction, cache_dir, test_fraction)


def _check_link(full: str, what: str) -> None:
    """A link that leads nowhere (a missing target, or a loop of links) would silently drop the
    data it was meant to add: an error naming it."""
    if os.path.islink(full) and not os.path.exists(full):
        raise ChameleonUserError(
            f"{what} is a broken link ({full!r} -> {os.readlink(full)!r}: its target does not "
            "exist or is a loop of links); fix or remove it")


def _check_cache_location(path: str, cache_dir: str, names: list) -> None:
    """Refuse a cache folder that the loader would read as data (or that would hide data):
    the data folder itself, or a folder reached from it through non-hidden names only."""
    real_data, real_cache = os.path.realpath(path), os.path.realpath(cache_dir)
    hint = (f"put it outside the data folder or in a hidden folder such as "
            f"{os.path.join(path, DEFAULT_CACHE_DIRNAME)!r} (the default)")
    if real_cache == real_data:
        raise ChameleonUserError(
            f"cache_dir {cache_dir!r} is the data folder itself: its index/ subfolder would be "
            f"read as a domain; {hint}")
    for name in names:  # through its real path: a domain may be a link to elsewhere
        parts = _visible_parts(real_cache, os.path.realpath(os.path.join(path, name)))
        if parts is not None:
            raise ChameleonUserError(
                f"cache_dir {cache_dir!r} is inside domain {name!r}: that domain would be "
                f"dropped or would read the token cache as its text; {hint}")
    parts = _visible_parts(real_cache, real_data)
    if parts:
        raise ChameleonUserError(
            f"cache_dir {cache_dir!r} is a non-hidden folder of the data folder {path!r}: it "
            f"would be read as a domain named {parts[0]!r}; {hint}")


def _visible_parts(real: str, real_base: str) -> Optional[list]:
    """The path of ``real`` below ``real_base`` as a list of names, if it is inside it and no
    name is hidden (so a folder listing would reach it); else None."""
    rel = os.path.relpath(real, real_base)
    if rel == ".":
        return []
    parts = rel.split(os.sep)
    if parts[0] == ".." or any(p.startswith(".") for p in parts):
        return None
    return parts


def _dataset_vocab(domains: list[_Domain], tok: Tokenizer) -> int:
    text = [d for d in domains if d.kind == "text"]
    # nanoGPT bins declare their vocabulary; Megatron data does not (it takes the tokenizer's)
    bins = [d for d in domains if d.kind == "bin" and d.source is None]
    if not bins:
        return int(tok.vocab_size)
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


class _TokenView:
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


class SplitTokens(_TokenView):
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


class SourceTokens(_TokenView):
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


def split_blocks(n: int, val_fraction: float) -> tuple[int, np.ndarray]:
    """``(block, held_out [n_blocks] bool)``: the block size and which blocks of a stream of
    ``n`` tokens are validation blocks when there is no test split (the module doc's rule)."""
    block, part = split_parts(n, val_fraction, 0.0)
    return block, part > 0


def _split(tokens: np.ndarray, val_fraction: float):
    """``(train, val)`` of a stream without ``val.bin`` and without a test split."""
    train, val, _ = _split3(tokens, val_fraction, 0.0)
    return train, val


def _split3(tokens: np.ndarray, val_fraction: float, test_fraction: float = 0.0):
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


@functools.lru_cache(maxsize=1)
def _machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _check_memory(n: int, length: int, name: str) -> None:
    """Refuse a window batch larger than this machine's memory before allocating it (the
    allocation may otherwise "succeed" lazily and the process be killed while filling it)."""
    need = int(n) * int(length) * 8
    total = _machine_memory()
    if total and need > total:
        raise ChameleonUserError(
            f"{n} windows of {length} tokens from domain {name!r} need {need / 2**30:.1f} GiB "
            f"as int64, more than this machine's {total / 2**30:.1f} GiB of memory; draw fewer "
            "or shorter windows")


def _chunked_max(arr: np.ndarray, chunk: int = 1 << 24) -> int:
    m = -1
    for i in range(0, arr.shape[0], chunk):
        m = max(m, int(arr[i:i + chunk].max()))
    return m


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "domain"


# -- pre-tokenised domains -------------------------------------------------------------------


def _open_bin_domain(name: str, dpath: str, val_fraction: float,
                     threshold: int = STREAM_THRESHOLD_BYTES, test_fraction: float = 0.0) -> _Domain:
    for f in _BIN_FILES:
        _check_link(os.path.join(dpath, f), f"domain {name!r}: {f}")
    meta_path = os.path.join(dpath, "meta.json")
    if not os.path.lexists(meta_path):
        raise ChameleonUserError(
            f"domain {name!r}: train.bin has no meta.json beside it in {dpath!r}; write one like "
            '{"vocab_size": 50257, "dtype": "uint16"} so the token dtype is known'
        )
    meta = io.read_json(meta_path, f"domain {name!r}: meta.json")
    dtype_name = meta.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in _BIN_DTYPES:
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
    val_path, test_path = os.path.join(dpath, "val.bin"), os.path.join(dpath, "test.bin")
    # a broken link is an error, not "no val.bin"; a given file replaces its cut from train.bin
    has_val, has_test = os.path.lexists(val_path), os.path.lexists(test_path)
    val = _open_bin(name, val_path, dtype, allow_empty=True) if has_val else None
    test = _open_bin(name, test_path, dtype, allow_empty=True) if has_test else None
    if not (has_val and has_test):
        train, cut_val, cut_test = _split3(train, 0.0 if has_val else val_fraction,
                                          0.0 if has_test else test_fraction)
        val = val if has_val else cut_val
        test = test if has_test else cut_test
    # above the threshold the largest id is not scanned (every window read is checked instead)
    large = (train.shape[0] + val.shape[0] + test.shape[0]) * np.dtype(dtype).itemsize > threshold
    return _Domain(name=name, path=dpath, kind="bin", train=train, val=val, vocab_size=vocab, test=test,
                   max_checked=large)


def _open_bin(name: str, fpath: str, dtype, allow_empty: bool) -> np.ndarray:
    if os.path.isdir(fpath):
        raise ChameleonUserError(f"domain {name!r}: {fpath!r} is a folder, expected a token file")
    try:
        size = os.path.getsize(fpath)
    except OSError as exc:
        raise ChameleonUserError(
            f"domain {name!r}: cannot read {fpath!r}: {io.os_error_reason(exc)}") from exc
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
    # read through the source (a pread per window), not a memory map that grows with use
    return SourceTokens(NanoGPTBinSource(fpath, dtype), dtype)


def _bin_fingerprint(d: _Domain, cache_dir: str) -> str:
    """Content hash of a pre-tokenised domain, remembered per stat key in the cache folder."""
    files = [f for f in _BIN_FILES if os.path.isfile(os.path.join(d.path, f))]
    stat_key = _stat_key("bin", d.path, [(f, os.path.join(d.path, f)) for f in files])
    index_path = os.path.join(cache_dir, "index", f"{_safe_name(d.name)}-bin-{stat_key}.json")
    fp = _indexed_fingerprint(index_path)
    if fp is None:
        fp = _content_fingerprint("bin", [(f, os.path.join(d.path, f)) for f in files], d.name)
        _remember_fingerprint(index_path, fp)
    return fp


def _indexed_fingerprint(index_path: str) -> Optional[str]:
    rec = io.read_json_or_none(index_path)
    fp = rec.get("fingerprint") if rec and rec.get("format") == _CACHE_FORMAT else None
    return fp if isinstance(fp, str) and re.fullmatch(r"[0-9a-f]{64}", fp) else None


def _remember_fingerprint(index_path: str, fp: str) -> None:
    """Point the stat key at ``fp``; best effort (a read-only cache simply re-hashes next time)."""
    try:
        io.write_json(index_path, {"format": _CACHE_FORMAT, "fingerprint": fp},
                      "token cache index entry")
    except ChameleonUserError:
        pass


# -- text domains ----------------------------------------------------------------------------


def _list_text_files(name: str, dpath: str, skip: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Sorted ``(relpath, abspath)`` of every non-hidden file under ``dpath``.

    Links are followed, but each real folder is listed once and each real file read once: a
    link back up the tree (``loop -> .``) or a second link to a file already listed would
    otherwise repeat the same text, and the validation split would then copy training text.
    A link to a folder listed earlier in sorted order is skipped, as is its content, and so
    are the real folders in ``skip`` (the token cache, should a link lead to it).
    """
    found, seen_dirs = [], {os.path.realpath(p) for p in skip}
    stack = [(dpath, "")]
    while stack:
        folder, rel = stack.pop()
        real = os.path.realpath(folder)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        try:
            entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
        except OSError as exc:
            raise ChameleonUserError(
                f"domain {name!r}: cannot read folder {folder!r}: {io.os_error_reason(exc)}"
            ) from exc
        subdirs = []
        for entry in entries:
            full = os.path.join(folder, entry)
            if os.path.isdir(full):
                subdirs.append((full, f"{rel}{entry}/"))
            elif os.path.isfile(full):  # FIFOs and devices are not data
                found.append((f"{rel}{entry}", full))
            else:
                _check_link(full, f"domain {name!r}: {rel}{entry}")
        stack.extend(reversed(subdirs))  # depth first, in sorted order
    found.sort()
    out, seen_files = [], set()
    for rel, full in found:
        real = os.path.realpath(full)
        if real not in seen_files:
            seen_files.add(real)
            out.append((rel, full))
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
    h = hashlib.sha256(f"{_TOKENS_RULES}\0{kind}\0{tok_name}\0".encode())
    for rel, full in files:
        try:
            size = os.path.getsize(full)
            h.update(f"{rel}\0{size}\0".encode())
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(_HASH_BLOCK), b""):
                    h.update(block)
        except OSError as exc:
            raise ChameleonUserError(
                f"domain {domain!r}: cannot read file {full!r}: {io.os_error_reason(exc)}"
            ) from exc
    return h.hexdigest()


def _open_text_domain(name: str, dpath: str, tok: Tokenizer, cache_dir: str,
                      val_fraction: float, verify: str = "sample", test_fraction: float = 0.0) -> _Domain:
    files = _list_text_files(name, dpath, skip=(cache_dir,))
    if not files:
        raise ChameleonUserError(
            f"domain {name!r} is empty: {dpath!r} holds no (non-hidden) data files"
        )
    try:
        stat_key = _stat_key("text", dpath, files, tok.name)
    except OSError as exc:
        raise ChameleonUserError(
            f"domain {name!r}: cannot stat {exc.filename!r}: {io.os_error_reason(exc)}") from exc
    safe = _safe_name(name)
    index_path = os.path.join(cache_dir, "index", f"{safe}-text-{stat_key}.json")

    # 1) unchanged since last load: the stat key names the fingerprint; nothing is read.
    #    verify="full" skips this shortcut and re-hashes the sources.
    fp = _indexed_fingerprint(index_path) if verify != "full" else None
    meta, damaged = _load_token_meta(name, cache_dir, safe, fp, tok, verify) if fp else (None, False)
    if meta is None:
        # 2) hash the content; identical content (e.g. touched or copied files) reuses tokens.
        indexed, fp = fp, _content_fingerprint("text", files, name, tok.name)
        if not (damaged and fp == indexed):  # an entry found damaged is not checked twice
            meta, _ = _load_token_meta(name, cache_dir, safe, fp, tok, verify)
        if meta is None:
            # 3) new content (or a damaged entry): tokenise into the cache.
            meta = _tokenise_domain(name, files, tok, cache_dir, safe, fp)
        _remember_fingerprint(index_path, fp)

    if meta["n_tokens"] == 0:
        raise ChameleonUserError(
            f"domain {name!r} is empty: its {len(files)} file(s) in {dpath!r} hold no text"
        )
    tpath = _token_path(cache_dir, safe, fp)
    tokens = _open_tokens(tpath, _BIN_DTYPES[meta["dtype"]], meta["n_tokens"])
    train, val, test = _split3(tokens, val_fraction, test_fraction)
    return _Domain(name=name, path=dpath, kind="text", train=train, val=val, test=test,
                   vocab_size=int(tok.vocab_size), files=files, max_id=meta["max_id"],
                   fingerprint=fp, stat_key=stat_key, cache_path=tpath,
                   max_checked=verify == "full")


def _open_raw_domain(name: str, dpath: str, tok: Tokenizer, cache_dir: str, val_fraction: float,
                     verify: str, text_field: str, threshold: int,
                     test_fraction: float = 0.0) -> Optional[_Domain]:
    """A domain without nanoGPT ``train.bin``: Megatron indexed data, raw text in today's
    formats tokenised into the cache as before, raw text in the formats only the sources read
    (compressed JSONL, Parquet, Arrow) tokenised into the cache from its source, or -- above
    ``threshold`` bytes -- a streamed domain. None: today's formats below the threshold,
    which :func:`_open_text_domain` caches as before (same fingerprints and caches)."""
    files = _list_text_files(name, dpath, skip=(cache_dir,))
    if not files:
        raise ChameleonUserError(
            f"domain {name!r} is empty: {dpath!r} holds no (non-hidden) data files"
        )
    lows = [rel.lower() for rel, _ in files]
    megatron = any(low.endswith((".idx", ".bin")) for low in lows)
    needs_sources = megatron or any(
        low.endswith(_SOURCE_ONLY_SUFFIXES) or os.path.basename(low) in _HF_MARKERS for low in lows
    ) or (text_field != "text" and any(low.endswith(".jsonl") for low in lows))
    try:
        size = sum(os.path.getsize(full) for _, full in files)
    except OSError as exc:
        raise ChameleonUserError(
            f"domain {name!r}: cannot stat {exc.filename!r}: {io.os_error_reason(exc)}") from exc
    if not needs_sources and size <= threshold:
        return None
    src = detect_sources(dpath, text_field=text_field)
    full = verify == "full"
    if isinstance(src, TokenSources):  # Megatron .bin/.idx: windows read by pread, never cached
        if src.n_tokens == 0:
            raise ChameleonUserError(f"domain {name!r} is empty: its Megatron data in {dpath!r} holds no tokens")
        train, val, test = _split3(SourceTokens(src, np.int64), val_fraction, test_fraction)
        fp = _combine(f"{_TOKENS_RULES}:megatron", [src.fingerprint(full)])
        # above the threshold the largest id is not scanned (it would read everything);
        # every window read is checked against the vocabulary instead
        return _Domain(name=name, path=dpath, kind="bin", train=train, val=val, test=test,
                       vocab_size=int(tok.vocab_size), files=files, fingerprint=fp, source=src,
                       max_checked=size > threshold, full_fingerprint=full)
    if size > threshold:
        return _Domain(name=name, path=dpath, kind="text", train=None, val=None,
                       vocab_size=int(tok.vocab_size), files=files,
                       fingerprint=_stream_fingerprint(src, tok, text_field, full), source=src,
                       streamed=True, max_checked=True, text_field=text_field, full_fingerprint=full)
    fp = _source_text_fingerprint(src, tok, text_field, full)
    safe = _safe_name(name)
    meta, _ = _load_token_meta(name, cache_dir, safe, fp, tok, verify)
    if meta is None:
        meta = _tokenise_domain(name, files, tok, cache_dir, safe, fp, documents=src.iter_documents())
    if meta["n_tokens"] == 0:
        raise ChameleonUserError(f"domain {name!r} is empty: its {len(files)} file(s) in {dpath!r} hold no text")
    tpath = _token_path(cache_dir, safe, fp)
    train, val, test = _split3(_open_tokens(tpath, _BIN_DTYPES[meta["dtype"]], meta["n_tokens"]), val_fraction,
                               test_fraction)
    return _Domain(name=name, path=dpath, kind="text", train=train, val=val, test=test,
                   vocab_size=int(tok.vocab_size), files=files, max_id=meta["max_id"],
                   fingerprint=fp, cache_path=tpath, max_checked=full, source=src,
                   text_field=text_field, full_fingerprint=full)


def _source_text_fingerprint(src: TextSources, tok: Tokenizer, text_field: str, full: bool) -> str:
    """Key of a cached domain tokenised from its sources: file identity (or content) + tokenizer + field."""
    return _combine(f"{_TOKENS_RULES}:sources", [tok.name, text_field, src.fingerprint(full)])


def _stream_fingerprint(src: TextSources, tok: Tokenizer, text_field: str, full: bool) -> str:
    """Key of a streamed domain's draws: file identity (or content), tokenizer, field, draw rules."""
    return _combine(_STREAM_DRAW, [tok.name, text_field, src.fingerprint(full)])


def _token_path(cache_dir: str, safe: str, fp: str) -> str:
    return os.path.join(cache_dir, f"{safe}-{fp[:32]}.tokens")


def _token_dtype(tok: Tokenizer) -> str:
    return "uint16" if tok.vocab_size <= 1 << 16 else "uint32"


def _open_tokens(tpath: str, dtype, n_tokens: Optional[int] = None) -> np.ndarray:
    try:
        if n_tokens == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(tpath, dtype=dtype, mode="r", shape=None if n_tokens is None else (n_tokens,))
    except (OSError, ValueError) as exc:
        raise ChameleonUserError(f"cannot read token cache {tpath!r}: {io.os_error_reason(exc)}") from exc


def _load_token_meta(name: str, cache_dir: str, safe: str, fp: str, tok: Tokenizer,
                     verify: str) -> tuple[Optional[dict], bool]:
    """``(metadata, damaged)``: the cache entry's metadata if it is complete and passes
    ``verify``, else None, silently for an absent entry, with a warning (and ``damaged``) for
    a damaged one, since it is then rebuilt."""
    tpath = _token_path(cache_dir, safe, fp)
    meta = io.read_json_or_none(tpath + ".json")
    if meta is None:
        if os.path.lexists(tpath + ".json"):
            problem = "its metadata is unreadable"
        else:
            return None, False  # never written, or killed before its commit marker
    elif meta.get("format") != _CACHE_FORMAT:
        return None, False  # an older layout: rebuilt silently
    else:
        problem = _check_token_meta(meta, fp, tok) or _verify_tokens(tpath, meta, verify)
    if problem:
        warnings.warn(f"token cache {tpath!r} of domain {name!r} is damaged ({problem}); "
                      "rebuilding it from the text", stacklevel=4)
        return None, True
    return meta, False


def _check_token_meta(meta: dict, fp: str, tok: Tokenizer) -> Optional[str]:
    """What is inconsistent in a token cache entry's metadata, or None."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if meta.get("fingerprint") != fp:
        return "its metadata names another fingerprint"
    if meta.get("dtype") != _token_dtype(tok):
        return f"dtype {meta.get('dtype')!r}, expected {_token_dtype(tok)!r}"
    if not is_int(meta.get("n_tokens")) or meta["n_tokens"] < 0:
        return f"bad token count {meta.get('n_tokens')!r}"
    max_id = meta.get("max_id")
    if not is_int(max_id) or not -1 <= max_id < tok.vocab_size:
        return f"recorded largest id {max_id!r} outside the vocabulary of {tok.vocab_size}"
    bs, blocks = meta.get("block_size"), meta.get("blocks")
    if not is_int(bs) or bs <= 0 or not isinstance(blocks, list) or not isinstance(meta.get("sha256"), str):
        return "its content hashes are missing"
    size = meta["n_tokens"] * np.dtype(_BIN_DTYPES[meta["dtype"]]).itemsize
    if len(blocks) != -(-size // bs):
        return "its block hashes do not match its token count"
    return None


def _verify_tokens(tpath: str, meta: dict, verify: str) -> Optional[str]:
    """Check the ``.tokens`` file against its metadata (sampled or full); the problem or None."""
    if os.path.isdir(tpath):
        return "the token file is a folder"
    dtype = np.dtype(_BIN_DTYPES[meta["dtype"]])
    try:
        size = os.path.getsize(tpath)
    except OSError as exc:
        return f"the token file cannot be read: {io.os_error_reason(exc)}"
    if size != meta["n_tokens"] * dtype.itemsize:
        return f"the token file is {size} bytes, its metadata says {meta['n_tokens'] * dtype.itemsize}"
    bs, blocks = meta["block_size"], meta["blocks"]
    if verify == "full":
        which = range(len(blocks))
    else:  # first, last and a few random blocks: a different sample on each load
        rng = np.random.default_rng()
        which = sorted({0, len(blocks) - 1, *rng.integers(0, max(len(blocks), 1), _SAMPLE_BLOCKS).tolist()})
        which = [i for i in which if 0 <= i < len(blocks)]
    whole = hashlib.sha256() if verify == "full" else None
    true_max = -1
    try:
        with open(tpath, "rb") as f:
            for i in which:
                f.seek(i * bs)
                block = f.read(bs)
                if hashlib.sha256(block).hexdigest()[:32] != blocks[i]:
                    return f"block {i} (bytes {i * bs}..{i * bs + len(block)}) does not match its hash"
                if whole is not None:
                    whole.update(block)
                if block:
                    true_max = max(true_max, int(np.frombuffer(block, dtype=dtype).max()))
    except OSError as exc:
        return f"the token file cannot be read: {io.os_error_reason(exc)}"
    if true_max > meta["max_id"]:
        return f"it holds token id {true_max} but recorded {meta['max_id']} as its largest"
    if whole is not None:
        if whole.hexdigest() != meta["sha256"]:
            return "its sha256 does not match"
        if true_max != meta["max_id"]:
            return f"its largest token id is {true_max} but {meta['max_id']} was recorded"
    return None


def _hash_tokens(tpath: str, dtype) -> dict:
    """Read a finished token file back: its sha256, block size and digests, true largest id."""
    size = os.path.getsize(tpath)
    bs = _HASH_BLOCK
    while -(-size // bs) > _MAX_BLOCKS:
        bs *= 2
    whole, blocks, max_id = hashlib.sha256(), [], -1
    with open(tpath, "rb") as f:
        for block in iter(lambda: f.read(bs), b""):
            whole.update(block)
            blocks.append(hashlib.sha256(block).hexdigest()[:32])
            max_id = max(max_id, int(np.frombuffer(block, dtype=dtype).max()))
    return {"sha256": whole.hexdigest(), "block_size": bs, "blocks": blocks, "max_id": max_id}


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
            f"domain {name!r}: cannot read file {full!r}: {io.os_error_reason(exc)}"
        ) from exc


def _iter_documents(name: str, rel: str, full: str) -> Iterator[Iterator[str]]:
    """Yield each document of one file as an iterator of text chunks.

    A ``.jsonl`` file yields one document per non-blank line (its ``text`` field; a line is
    parsed whole, so one JSON document must fit in memory); any other file is one document
    read in chunks of about ``_CHUNK_CHARS`` characters, whatever its line lengths.
    """
    with _reading(name, full):
        f = open(full, "r", encoding="utf-8", newline="")
    with f:
        if rel.lower().endswith(".jsonl"):
            with _reading(name, full):
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        text = _jsonl_text(name, full, lineno, line)
                        yield _bounded_chunks(text[i:i + _CHUNK_CHARS]
                                              for i in range(0, len(text), _CHUNK_CHARS))
        else:
            yield _text_chunks(name, full, f)


# Unpaired UTF-16 surrogates: JSON can spell them ("\ud800") but they are not Unicode text and
# cannot be encoded as UTF-8, so no tokenizer can take them.
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _jsonl_text(name: str, full: str, lineno: int, line: str) -> str:
    if lineno == 1 and line.startswith("\ufeff"):
        line = line[1:]  # a UTF-8 byte order mark, as some editors write: not part of the JSON
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ChameleonUserError(
            f"domain {name!r}: file {full!r} line {lineno} is not valid JSON ({exc.msg})"
        ) from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise ChameleonUserError(
            f"domain {name!r}: file {full!r} line {lineno} cannot be parsed ({exc})"
        ) from None
    except RecursionError:
        raise ChameleonUserError(
            f"domain {name!r}: file {full!r} line {lineno} is nested too deeply to parse"
        ) from None
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise ChameleonUserError(
            f"domain {name!r}: file {full!r} line {lineno} has no string 'text' field; "
            '.jsonl lines must look like {"text": "..."}'
        )
    bad = _LONE_SURROGATE.search(text)
    if bad:
        raise ChameleonUserError(
            f"domain {name!r}: file {full!r} line {lineno}: its text holds a lone surrogate "
            f"escape (\\u{ord(bad.group()):04x} at character {bad.start()}), which is not "
            "Unicode text; fix or remove that line"
        )
    return text


def _text_chunks(name: str, full: str, f) -> Iterator[str]:
    """The open text file ``f`` in bounded chunks (see :func:`_bounded_chunks`)."""
    def blocks():
        while True:
            with _reading(name, full):
                block = f.read(_CHUNK_CHARS)
            if not block:
                return
            yield block
    return _bounded_chunks(blocks())


def _bounded_chunks(blocks: Iterator[str]) -> Iterator[str]:
    """Re-cut ``blocks`` into chunks of at most ``2 * _CHUNK_CHARS`` characters, each cut after
    a newline where there is one, else after a space, else anywhere (the cut matters only to
    subword tokenizers, which see fewer split words this way). Memory stays bounded even for a
    file, or a JSONL document, with no newline at all."""
    carry = ""
    for block in blocks:
        text = carry + block
        cut = text.rfind("\n") + 1
        if cut == 0 or len(text) - cut > _CHUNK_CHARS:
            cut = text.rfind(" ") + 1
            if cut == 0 or len(text) - cut > _CHUNK_CHARS:
                cut = len(text)
        carry = text[cut:]
        if cut:
            yield text[:cut]
    if carry:
        yield carry


def _encode(tok: Tokenizer, text: str) -> np.ndarray:
    enc = getattr(tok, "encode_array", None)
    return enc(text) if enc is not None else np.asarray(tok.encode(text), dtype=np.int64)


def _tokenise_domain(name: str, files: list[tuple[str, str]], tok: Tokenizer, cache_dir: str,
                     safe: str, fp: str, documents: Optional[Iterator[Iterator[str]]] = None) -> dict:
    """Stream every document of the domain into ``<cache>/<safe>-<fp>.tokens``; return meta.

    Tokens go through :func:`io.atomic_write` (a temp file renamed into place only when
    complete, removed on any failure), then the file is read back to record its hashes and
    true largest id in ``.tokens.json`` (the commit marker, written last), so a crash leaves no
    entry that a later load could mistake for a complete one. ``documents``: the domain's
    documents from its sources (``TextSources.iter_documents``) instead of reading ``files``.
    """
    if documents is None:
        documents = (doc for rel, full in files for doc in _iter_documents(name, rel, full))
    dtype_name = _token_dtype(tok)
    dtype = _BIN_DTYPES[dtype_name]
    eos = np.asarray([tok.eos_id], dtype=dtype)
    _check_cache_writable(cache_dir)
    tpath = _token_path(cache_dir, safe, fp)
    n_tokens, n_docs = 0, 0
    with io.atomic_write(tpath, "token cache", "wb") as out:
        for doc in documents:
            doc_tokens = 0
            for chunk in doc:
                ids = _encode(tok, chunk)
                if ids.size == 0:
                    continue
                if int(ids.max()) >= tok.vocab_size or int(ids.min()) < 0:
                    bad = int(ids.max()) if int(ids.max()) >= tok.vocab_size else int(ids.min())
                    raise ChameleonUserError(
                        f"tokenizer {tok.name!r} produced id {bad} outside its vocabulary "
                        f"(vocab_size {tok.vocab_size}) in domain {name!r}"
                    )
                out.write(memoryview(np.ascontiguousarray(ids, dtype=dtype)))
                doc_tokens += ids.size
            if doc_tokens:  # empty documents add nothing, not even an EOS
                out.write(eos.tobytes())
                n_tokens += doc_tokens + 1
                n_docs += 1
    try:
        hashes = _hash_tokens(tpath, dtype)
    except OSError as exc:
        raise ChameleonUserError(
            f"cannot read back token cache {tpath!r}: {io.os_error_reason(exc)}") from exc
    meta = {"format": _CACHE_FORMAT, "domain": name, "fingerprint": fp,
            "tokenizer": tok.name, "dtype": dtype_name, "n_tokens": n_tokens,
            "n_documents": n_docs, "files": [r for r, _ in files], **hashes}
    io.write_json(tpath + ".json", meta, "token cache metadata")
    return meta


def _check_cache_writable(cache_dir: str) -> None:
    try:
        io.check_writable_folder(cache_dir, "cache_dir")
    except ChameleonUserError as exc:
        raise ChameleonUserError(
            f"{exc}; the text domains must be tokenised into it: pass a writable cache_dir "
            "(--cache-dir)") from None
