"""The token cache: text domains tokenised once into ``<cache>/<domain>-<fingerprint>.tokens``.

Each text domain's tokens are cached under ``<dataset>/.chameleon_cache/`` (or ``cache_dir``)
in a file named by the domain's *fingerprint*: sha256 over the tokenizer name and every file's
relative path, size and bytes. A cheap stat key (paths, sizes, mtimes) points at the
fingerprint, so an unchanged domain is neither re-read nor re-tokenised on the next load; a
touched-but-identical domain is re-hashed but not re-tokenised; a changed file changes only its
own domain's fingerprint. Raw text in the formats only the sources layer reads (compressed
JSONL, Parquet, Arrow, or a ``text_field`` other than ``text``) is keyed by the sources'
file-identity fingerprint, the tokenizer and ``text_field`` instead.

Every cache file is written through :func:`chameleon_ext.io.atomic_write` (temp file, fsync,
rename), so a kill, a full disk or a read-only folder never leaves a half-written entry. Each
``.tokens`` file has a ``.tokens.json`` beside it (written last: it commits the entry)
recording the token count, dtype, the sha256 of the whole file, a digest per block (at most
1024 blocks) and the true largest token id, all computed by reading the finished file back.
``verify="sample"`` checks size, the first and last block and a few random ones on every
load; ``verify="full"`` checks every block, the whole-file hash and the true maximum.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import warnings
from typing import Iterator, Optional

import numpy as np

from .. import io
from ..errors import ChameleonUserError
from .layout import domain_errors, safe_name
from .sources import TextSources, combine_fingerprints
from .sources.text import encode
from .tokenizer import Tokenizer

__all__ = ["TOKEN_DTYPES", "warn_damaged", "bin_fingerprint", "chunked_max", "content_fingerprint", "indexed_fingerprint",
           "load_token_meta", "open_tokens", "remember_fingerprint", "sources_fingerprint", "stat_key",
           "stream_fingerprint", "token_path", "tokenise_domain", "verify_tokens"]

# Bump when the tokenisation rules change: it is hashed into every fingerprint, so bumping it
# changes them all (and invalidates embedding caches keyed by them).
TOKENS_RULES = "chameleon_ext.tokens/1"
# Bump when the cache metadata layout changes: older entries are rebuilt, fingerprints stay.
_CACHE_FORMAT = "chameleon_ext.tokens/2"
# Bump when the way windows are drawn from a streamed domain changes: it is hashed into the
# streamed domain's fingerprint, so embeddings cached from older draws change key.
_STREAM_DRAW = "chameleon_ext.stream_draw/1"
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_HASH_BLOCK = 1 << 20
# Token files are verified per block: at most this many blocks of at least _HASH_BLOCK bytes.
_MAX_BLOCKS = 1024
_SAMPLE_BLOCKS = 6  # random blocks checked per load, besides the first and the last


def warn_damaged(tpath: str, name: str, problem: str) -> None:
    """Warn that a cache entry is damaged and rebuilt, attributed to the first caller outside
    the data package (the user's load_dataset or verify call, however deep the loader is)."""
    here, level, frame = os.path.dirname(os.path.abspath(__file__)), 2, sys._getframe(1)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    warnings.warn(f"token cache {tpath!r} of domain {name!r} is damaged ({problem}); rebuilding it from the "
                  "text", stacklevel=level)


def chunked_max(arr: np.ndarray, chunk: int = 1 << 24) -> int:
    m = -1
    for i in range(0, arr.shape[0], chunk):
        m = max(m, int(arr[i:i + chunk].max()))
    return m


def bin_fingerprint(name: str, dpath: str, files: list, cache_dir: str) -> str:
    """Content hash of a pre-tokenised domain's ``files`` (names in ``dpath``), remembered per
    stat key in the cache folder."""
    files = [f for f in files if os.path.isfile(os.path.join(dpath, f))]
    key = stat_key("bin", dpath, [(f, os.path.join(dpath, f)) for f in files])
    index_path = os.path.join(cache_dir, "index", f"{safe_name(name)}-bin-{key}.json")
    fp = indexed_fingerprint(index_path)
    if fp is None:
        fp = content_fingerprint("bin", [(f, os.path.join(dpath, f)) for f in files], name)
        remember_fingerprint(index_path, fp)
    return fp


def indexed_fingerprint(index_path: str) -> Optional[str]:
    rec = io.read_json_or_none(index_path)
    fp = rec.get("fingerprint") if rec and rec.get("format") == _CACHE_FORMAT else None
    return fp if isinstance(fp, str) and re.fullmatch(r"[0-9a-f]{64}", fp) else None


def remember_fingerprint(index_path: str, fp: str) -> None:
    """Point the stat key at ``fp``; best effort (a read-only cache simply re-hashes next time)."""
    try:
        io.write_json(index_path, {"format": _CACHE_FORMAT, "fingerprint": fp},
                      "token cache index entry")
    except ChameleonUserError:
        pass


def stat_key(kind: str, dpath: str, files: list[tuple[str, str]], tok_name: str = "") -> str:
    """Cheap key of a domain's current files: its folder, and each file's path, size, mtime."""
    h = hashlib.sha256(f"{_CACHE_FORMAT}\0{kind}\0{tok_name}\0{dpath}\0".encode())
    for rel, full in files:
        st = os.stat(full)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:32]


def content_fingerprint(kind: str, files: list[tuple[str, str]], domain: str,
                         tok_name: str = "") -> str:
    h = hashlib.sha256(f"{TOKENS_RULES}\0{kind}\0{tok_name}\0".encode())
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


def sources_fingerprint(src: TextSources, tok: Tokenizer, text_field: str, full: bool) -> str:
    """Key of a cached domain tokenised from its sources: file identity (or content) + tokenizer + field."""
    return combine_fingerprints(f"{TOKENS_RULES}:sources", [tok.name, text_field, src.fingerprint(full)])


def stream_fingerprint(src: TextSources, tok: Tokenizer, text_field: str, full: bool) -> str:
    """Key of a streamed domain's draws: file identity (or content), tokenizer, field, draw rules."""
    return combine_fingerprints(_STREAM_DRAW, [tok.name, text_field, src.fingerprint(full)])


def token_path(cache_dir: str, safe: str, fp: str) -> str:
    return os.path.join(cache_dir, f"{safe}-{fp[:32]}.tokens")


def _token_dtype(tok: Tokenizer) -> str:
    return "uint16" if tok.vocab_size <= 1 << 16 else "uint32"


def open_tokens(tpath: str, dtype, n_tokens: Optional[int] = None) -> np.ndarray:
    try:
        if n_tokens == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(tpath, dtype=dtype, mode="r", shape=None if n_tokens is None else (n_tokens,))
    except (OSError, ValueError) as exc:
        raise ChameleonUserError(f"cannot read token cache {tpath!r}: {io.os_error_reason(exc)}") from exc


def load_token_meta(name: str, cache_dir: str, safe: str, fp: str, tok: Tokenizer,
                     verify: str) -> tuple[Optional[dict], bool]:
    """``(metadata, damaged)``: the cache entry's metadata if it is complete and passes
    ``verify``, else None, silently for an absent entry, with a warning (and ``damaged``) for
    a damaged one, since it is then rebuilt."""
    tpath = token_path(cache_dir, safe, fp)
    meta = io.read_json_or_none(tpath + ".json")
    if meta is None:
        if os.path.lexists(tpath + ".json"):
            problem = "its metadata is unreadable"
        else:
            return None, False  # never written, or killed before its commit marker
    elif meta.get("format") != _CACHE_FORMAT:
        return None, False  # an older layout: rebuilt silently
    else:
        problem = _check_token_meta(meta, fp, tok) or verify_tokens(tpath, meta, verify)
    if problem:
        warn_damaged(tpath, name, problem)
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
    size = meta["n_tokens"] * np.dtype(TOKEN_DTYPES[meta["dtype"]]).itemsize
    if len(blocks) != -(-size // bs):
        return "its block hashes do not match its token count"
    return None


def verify_tokens(tpath: str, meta: dict, verify: str) -> Optional[str]:
    """Check the ``.tokens`` file against its metadata (sampled or full); the problem or None."""
    if os.path.isdir(tpath):
        return "the token file is a folder"
    dtype = np.dtype(TOKEN_DTYPES[meta["dtype"]])
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


def tokenise_domain(name: str, files: list[tuple[str, str]], tok: Tokenizer, cache_dir: str,
                    safe: str, fp: str, documents: Iterator[Iterator[str]]) -> dict:
    """Stream every document of the domain into ``<cache>/<safe>-<fp>.tokens``; return meta.

    Tokens go through :func:`io.atomic_write` (a temp file renamed into place only when
    complete, removed on any failure), then the file is read back to record its hashes and
    true largest id in ``.tokens.json`` (the commit marker, written last), so a crash leaves no
    entry that a later load could mistake for a complete one. ``documents``: the domain's
    documents from its sources (``TextSources.iter_documents``); ``files`` are recorded.
    """
    dtype_name = _token_dtype(tok)
    dtype = TOKEN_DTYPES[dtype_name]
    eos = np.asarray([tok.eos_id], dtype=dtype)
    _check_cache_writable(cache_dir)
    tpath = token_path(cache_dir, safe, fp)
    n_tokens, n_docs = 0, 0
    with io.atomic_write(tpath, "token cache", "wb") as out, domain_errors(name):
        for doc in documents:
            doc_tokens = 0
            for chunk in doc:
                ids = encode(tok, chunk, int64=False)
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
