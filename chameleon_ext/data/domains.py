"""Opening one domain: its kind (pre-tokenised, cached text, streamed text), its token arrays
and splits, and its fingerprint. Every file is read through :mod:`.sources`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from .. import io
from ..errors import ChameleonUserError
from . import token_cache
from .layout import check_link, domain_errors, list_files, safe_name
from .sources import (NANOGPT_FILES, NanoGPTBinSource, TextSources, TokenSources, combine_fingerprints,
                      detect_sources, read_nanogpt_meta)
from .splits import SourceTokens, split_stream
from .token_cache import TOKEN_DTYPES
from .tokenizer import Tokenizer

# nanoGPT's files: what a pre-tokenised domain's fingerprint hashes
BIN_FILES = (*NANOGPT_FILES, "meta.json")
# Formats whose cache key is the sources' fingerprint; a domain of text files and .jsonl read
# with the "text" field keeps the content fingerprint its caches have always had.
_SOURCE_KEYED_SUFFIXES = (".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
_HF_MARKERS = ("state.json", "dataset_dict.json")


@dataclass
class Domain:
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
    content_keyed: bool = False  # cached text keyed by its content hash (text files and .jsonl)


def open_domain(name: str, dpath: str, tok: Tokenizer, cache_dir: str, val_fraction: float,
                test_fraction: float, verify: str, text_field: str, threshold: int) -> "Domain":
    """Domain ``name`` at ``dpath``: nanoGPT bins, Megatron data, or raw text (cached or,
    above ``threshold`` bytes, streamed)."""
    if os.path.lexists(os.path.join(dpath, "train.bin")):
        return _open_bin_domain(name, dpath, val_fraction, threshold, test_fraction)
    for f in BIN_FILES[1:]:
        if os.path.lexists(os.path.join(dpath, f)):
            raise ChameleonUserError(
                f"domain {name!r}: found {f} but no train.bin in {dpath!r}; a "
                "pre-tokenised domain needs train.bin (+ meta.json)")
    files = list_files(name, dpath, skip=(cache_dir,))
    if not files:
        raise ChameleonUserError(f"domain {name!r} is empty: {dpath!r} holds no (non-hidden) data files")
    try:
        size = sum(os.path.getsize(full) for _, full in files)
    except OSError as exc:
        raise ChameleonUserError(
            f"domain {name!r}: cannot stat {exc.filename!r}: {io.os_error_reason(exc)}") from exc
    with domain_errors(name):
        src = detect_sources(dpath, text_field=text_field, files=[full for _, full in files])
    full = verify == "full"
    if isinstance(src, TokenSources):  # Megatron .bin/.idx: windows read by pread, never cached
        if src.n_tokens == 0:
            raise ChameleonUserError(f"domain {name!r} is empty: its Megatron data in {dpath!r} holds no tokens")
        train, val, test = split_stream(SourceTokens(src, np.int64), val_fraction, test_fraction)
        fp = combine_fingerprints(f"{token_cache.TOKENS_RULES}:megatron", [src.fingerprint(full)])
        # above the threshold the largest id is not scanned (it would read everything);
        # every window read is checked against the vocabulary instead
        return Domain(name=name, path=dpath, kind="bin", train=train, val=val, test=test,
                      vocab_size=int(tok.vocab_size), files=files, fingerprint=fp, source=src,
                      max_checked=size > threshold, full_fingerprint=full)
    common = dict(name=name, path=dpath, kind="text", vocab_size=int(tok.vocab_size), files=files, source=src,
                  text_field=text_field, full_fingerprint=full)
    if size > threshold:
        return Domain(**common, train=None, val=None, streamed=True, max_checked=True,
                      fingerprint=token_cache.stream_fingerprint(src, tok, text_field, full))
    lows = [rel.lower() for rel, _ in files]
    content_keyed = not any(low.endswith(_SOURCE_KEYED_SUFFIXES) or os.path.basename(low) in _HF_MARKERS
                            for low in lows) and (text_field == "text" or not any(low.endswith(".jsonl")
                                                                                   for low in lows))
    if content_keyed:
        meta, fp, key = _cached_by_content(name, dpath, files, src, tok, cache_dir, verify)
    else:
        fp, key = token_cache.sources_fingerprint(src, tok, text_field, full), None
        meta, _ = token_cache.load_token_meta(name, cache_dir, safe_name(name), fp, tok, verify)
        if meta is None:
            meta = token_cache.tokenise_domain(name, files, tok, cache_dir, safe_name(name), fp,
                                               src.iter_documents())
    if meta["n_tokens"] == 0:
        raise ChameleonUserError(f"domain {name!r} is empty: its {len(files)} file(s) in {dpath!r} hold no text")
    tpath = token_cache.token_path(cache_dir, safe_name(name), fp)
    tokens = token_cache.open_tokens(tpath, TOKEN_DTYPES[meta["dtype"]], meta["n_tokens"])
    train, val, test = split_stream(tokens, val_fraction, test_fraction)
    return Domain(**common, train=train, val=val, test=test, max_id=meta["max_id"], fingerprint=fp,
                  stat_key=key, cache_path=tpath, max_checked=full, content_keyed=content_keyed)


def _cached_by_content(name: str, dpath: str, files: list, src: TextSources, tok: Tokenizer,
                       cache_dir: str, verify: str) -> tuple:
    """``(meta, fingerprint, stat_key)`` of a domain of text files and ``.jsonl``, keyed by the
    hash of its content; a stat key (paths, sizes, mtimes) points at that hash, so an unchanged
    domain is neither re-read nor re-tokenised."""
    try:
        key = token_cache.stat_key("text", dpath, files, tok.name)
    except OSError as exc:
        raise ChameleonUserError(
            f"domain {name!r}: cannot stat {exc.filename!r}: {io.os_error_reason(exc)}") from exc
    safe = safe_name(name)
    index_path = os.path.join(cache_dir, "index", f"{safe}-text-{key}.json")
    # 1) unchanged since last load: the stat key names the fingerprint; nothing is read.
    #    verify="full" skips this shortcut and re-hashes the sources.
    fp = token_cache.indexed_fingerprint(index_path) if verify != "full" else None
    meta, damaged = token_cache.load_token_meta(name, cache_dir, safe, fp, tok, verify) if fp else (None, False)
    if meta is None:
        # 2) hash the content; identical content (e.g. touched or copied files) reuses tokens.
        indexed, fp = fp, token_cache.content_fingerprint("text", files, name, tok.name)
        if not (damaged and fp == indexed):  # an entry found damaged is not checked twice
            meta, _ = token_cache.load_token_meta(name, cache_dir, safe, fp, tok, verify)
        if meta is None:
            # 3) new content (or a damaged entry): tokenise into the cache.
            meta = token_cache.tokenise_domain(name, files, tok, cache_dir, safe, fp, src.iter_documents())
        token_cache.remember_fingerprint(index_path, fp)
    return meta, fp, key


def dataset_vocab(domains: list, tok: Tokenizer) -> int:
    """The vocabulary size the dataset's token ids belong to; declared vocabularies must agree."""
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


def check_max(d: "Domain", tok: Tokenizer, cache_dir: str, val_fraction: float, test_fraction: float) -> None:
    """Scan domain ``d``'s true largest token id once (``d.max_id``); a token cache whose true
    maximum is not the recorded one is damaged and rebuilt first."""
    if d.max_checked:
        return
    if d.kind == "text":  # (streamed domains are created max_checked)
        true_max = token_cache.chunked_max(token_cache.open_tokens(d.cache_path, d.train.dtype))
        if true_max != d.max_id:
            rebuild(d, tok, cache_dir, val_fraction, test_fraction,
                    f"it holds token id {true_max} but recorded {d.max_id} as its largest")
            true_max = token_cache.chunked_max(token_cache.open_tokens(d.cache_path, d.train.dtype))
    else:
        true_max = max(token_cache.chunked_max(d.train), token_cache.chunked_max(d.val),
                       token_cache.chunked_max(d.test) if d.test is not None else -1)
    d.max_id, d.max_checked = true_max, True


def rebuild(d: "Domain", tok: Tokenizer, cache_dir: str, val_fraction: float, test_fraction: float,
            problem: str) -> None:
    """Re-tokenise text domain ``d`` into its cache entry after ``problem`` was found."""
    token_cache.warn_damaged(d.cache_path, d.name, problem)
    if current_fingerprint(d, tok) != d.fingerprint:
        raise ChameleonUserError(
            f"domain {d.name!r}: its files in {d.path!r} changed after the dataset was loaded; load it again")
    meta = token_cache.tokenise_domain(d.name, d.files, tok, cache_dir, safe_name(d.name), d.fingerprint,
                                       d.source.iter_documents())
    tokens = token_cache.open_tokens(d.cache_path, TOKEN_DTYPES[meta["dtype"]], meta["n_tokens"])
    d.train, d.val, d.test = split_stream(tokens, val_fraction, test_fraction)
    d.max_id, d.max_checked = meta["max_id"], True


def current_fingerprint(d: "Domain", tok: Tokenizer) -> str:
    """The fingerprint text domain ``d``'s files have now (to see whether they changed)."""
    if d.content_keyed:
        return token_cache.content_fingerprint("text", d.files, d.name, tok.name)
    return token_cache.sources_fingerprint(d.source, tok, d.text_field, d.full_fingerprint)


# -- pre-tokenised domains -------------------------------------------------------------------


def _open_bin_domain(name: str, dpath: str, val_fraction: float, threshold: int,
                     test_fraction: float = 0.0) -> Domain:
    for f in BIN_FILES:
        check_link(os.path.join(dpath, f), f"domain {name!r}: {f}")
    dtype, vocab = read_nanogpt_meta(dpath, f"domain {name!r}")

    train = _open_bin(name, os.path.join(dpath, "train.bin"), dtype, allow_empty=False)
    val_path, test_path = os.path.join(dpath, "val.bin"), os.path.join(dpath, "test.bin")
    # a broken link is an error, not "no val.bin"; a given file replaces its cut from train.bin
    has_val, has_test = os.path.lexists(val_path), os.path.lexists(test_path)
    val = _open_bin(name, val_path, dtype, allow_empty=True) if has_val else None
    test = _open_bin(name, test_path, dtype, allow_empty=True) if has_test else None
    if not (has_val and has_test):
        train, cut_val, cut_test = split_stream(train, 0.0 if has_val else val_fraction,
                                          0.0 if has_test else test_fraction)
        val = val if has_val else cut_val
        test = test if has_test else cut_test
    # above the threshold the largest id is not scanned (every window read is checked instead)
    large = (train.shape[0] + val.shape[0] + test.shape[0]) * np.dtype(dtype).itemsize > threshold
    return Domain(name=name, path=dpath, kind="bin", train=train, val=val, vocab_size=vocab, test=test,
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
