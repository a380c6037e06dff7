"""Multi-domain datasets: the domains of a data folder, tokenised, split, ready for windows.

A dataset is a folder with one subfolder per domain (:mod:`.layout`)::

    my_data/
      arxiv/   a.txt  b.md  sub/c.tex ...     text files, read recursively
      web/     part-0.jsonl part-1.jsonl      one JSON object per line with a "text" field
      github/  train.bin val.bin meta.json    pre-tokenised, nanoGPT layout

Every file is read through :mod:`chameleon_ext.data.sources`, whatever its format and whether
its domain is cached or streamed, so a fault in a file is the same one-line error everywhere
(:mod:`.domains` opens a domain). A domain is one of:

* **text** -- raw text: UTF-8 text files (one document each), ``.jsonl`` / ``.jsonl.gz`` /
  ``.jsonl.zst`` (a document per line, text in ``text_field``), Parquet, Hugging Face
  ``save_to_disk`` folders and ``.arrow`` files. Documents are joined with the tokenizer's
  EOS id (after every document, as in the reference's data preparation) and tokenised once,
  in bounded chunks, into the token cache (:mod:`.token_cache`). A JSONL text holding a lone
  surrogate escape (``{"text": "\\ud800"}``, not Unicode text) is an error naming file and line.
* **pre-tokenised** -- nanoGPT ``train.bin`` (optionally ``val.bin``, ``test.bin``) with
  ``meta.json`` declaring ``{"vocab_size": 50257, "dtype": "uint16"}``, or Megatron-LM
  ``PREFIX.bin`` + ``PREFIX.idx`` pairs (their vocabulary is the tokenizer's), read by ``pread``.

A raw-text domain whose files hold more than ``stream_threshold`` bytes
(:data:`STREAM_THRESHOLD_BYTES`, 256 MiB) is *streamed*: no token cache, no token array;
:meth:`MixtureDataset.draw_windows` draws from its files with ``TextSources.sample_windows``
(uniform over tokens up to each document's bytes per token; the split by a hash of each
unit's position), and its token count is estimated from a seeded draw. A pre-tokenised domain
above the threshold is not scanned whole for its largest id; each window read is checked.

:meth:`MixtureDataset.fingerprint` keys embedding caches and tells a resumed run that a
domain's data changed. A damaged cache entry is rebuilt with a warning; ids beyond the
vocabulary are found by :meth:`MixtureDataset.check_vocab` before training, and any that reach
a window anyway are a one-line error, never an IndexError inside the model.

Splits (:mod:`.splits`): validation is ``val.bin`` or ``val_fraction`` of the stream as
evenly spread blocks; test (``test_fraction`` or ``test.bin``) likewise. The test split is for
a final, untouched evaluation (``chameleon compare``); :meth:`MixtureDataset.view` hides it.
Windows are contiguous runs of ``length`` tokens starting anywhere in the split, so -- as in
the reference -- they may cross document boundaries (every full window, ``[0, n - length]``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional, Sequence, Union

import numpy as np

from .. import io
from ..errors import ChameleonUserError
from . import token_cache
from .domains import BIN_FILES, Domain, check_max, dataset_vocab, open_domain, rebuild
from .layout import DEFAULT_CACHE_DIRNAME, check_cache_location, domain_errors, domain_names
from .splits import SPLIT_LAYOUT, SPLITS, SourceTokens, SplitTokens, check_draw, check_length, check_memory
from .tokenizer import Tokenizer, load_tokenizer, tokenizer_record
from .view import DatasetView

__all__ = ["MixtureDataset", "DatasetView", "SplitTokens", "SourceTokens", "load_dataset",
           "DEFAULT_CACHE_DIRNAME", "SPLIT_LAYOUT", "STREAM_THRESHOLD_BYTES"]

VERIFY_MODES = ("sample", "full")
# A raw-text domain whose files hold more bytes than this is STREAMED: no token cache, windows
# are drawn from the files (chameleon_ext.data.sources) at the cost of the sample. Below it the
# whole domain is tokenised once into the cache, which is faster to draw from.
STREAM_THRESHOLD_BYTES = 256 << 20
# Windows and length of the seeded draw that estimates a streamed domain's token count.
_ESTIMATE_WINDOWS, _ESTIMATE_LENGTH = 256, 256


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

    def __init__(self, path: str, domains: list[Domain], tokenizer: Tokenizer,
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

    def _get(self, name: str) -> Domain:
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

    def _streamed_error(self, d: Domain, what: str) -> ChameleonUserError:
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
            with domain_errors(name):
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
            d.fingerprint = token_cache.bin_fingerprint(d.name, d.path, BIN_FILES, self.cache_dir)
        return d.fingerprint

    def view(self, domains: Optional[Sequence[str]] = None, hide_test: bool = True) -> DatasetView:
        """This dataset seen with only ``domains`` (default: all) and, with ``hide_test`` (the
        default), without its test split: any read of the test split through the view raises,
        so what is built on it cannot have been fitted on the test split."""
        return DatasetView(self, domains, hide_test)

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
            check_max(d, self.tokenizer, self.cache_dir, self.val_fraction, self.test_fraction)
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
            problem = (token_cache.verify_tokens(d.cache_path, meta, "full") if meta is not None
                       else "its metadata is missing or unreadable")
            if problem:
                rebuild(d, self.tokenizer, self.cache_dir, self.val_fraction, self.test_fraction, problem)
                rebuilt.append(name)
            d.max_checked = True
        return rebuilt

    def check_window(self, length: int, split: str = "train",
                     domains: Optional[Sequence[str]] = None) -> None:
        """Raise unless every domain (or each of ``domains``) holds at least one full window.

        Raises:
            ChameleonUserError: naming the first domain whose ``split`` is shorter than
                ``length`` tokens.
        """
        length = check_length(length)
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
        n, length = check_draw(rng, n, length)
        if not d.streamed:
            total = self._check_domain_window(name, length, split)
            check_memory(n, length + 1, name)  # the windows and their starts
            return self.windows_at(name, rng.integers(0, total - length + 1, size=n), length, split)
        if split not in ("train", "val"):
            raise ChameleonUserError(f"split: expected 'train' or 'val', got {split!r}")
        if self.val_fraction == 0.0 and split == "val":
            raise ChameleonUserError(
                f"domain {d.name!r} has no validation split (val_fraction is 0); raise val_fraction")
        check_memory(n, length, d.name)
        by_split = {} if self.val_fraction == 0.0 else {"split": split, "val_fraction": self.val_fraction}
        with domain_errors(d.name):
            return d.source.sample_windows(rng, n, length, self.tokenizer, **by_split)

    def windows_at(self, name: str, starts: np.ndarray, length: int,
                   split: str = "train") -> np.ndarray:
        """Windows of ``length`` tokens starting at ``starts`` ``[n]``: ``[n, length]`` int64
        (not for streamed domains, which have no token positions: use :meth:`draw_windows`)."""
        toks = self.tokens(name, split)
        length = check_length(length)
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        n = toks.shape[0]
        if starts.size and (int(starts.min()) < 0 or int(starts.max()) > n - length):
            raise ChameleonUserError(
                f"starts: every window start must lie in [0, {n - length}] for windows of "
                f"{length} tokens in the {split} split of domain {name!r} ({n} tokens), got "
                f"{int(starts.min())}..{int(starts.max())}")
        check_memory(starts.shape[0], length, name)
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

    names = domain_names(path)
    check_cache_location(path, cache_dir, names)
    if not names:
        raise ChameleonUserError(
            f"data folder {path!r} holds no domain subfolders; expected one subfolder per "
            "domain (e.g. web/, code/) containing text, .jsonl or train.bin files"
        )
    # Writers killed outright (SIGKILL) leave temp files; theirs are safe to delete now.
    io.remove_stale_temps(cache_dir)
    io.remove_stale_temps(os.path.join(cache_dir, "index"))

    domains = [open_domain(name, os.path.join(path, name), tok, cache_dir, val_fraction, test_fraction, verify,
                           text_field, int(stream_threshold)) for name in names]
    vocab_size = dataset_vocab(domains, tok)
    return MixtureDataset(path, domains, tok, vocab_size, val_fraction, cache_dir, test_fraction)
