"""Corpus sources: read the formats corpora ship in, at a cost that follows the sample.

A domain folder is turned into one :class:`TokenSources` (pre-tokenised) or one
:class:`TextSources` (raw text) by :func:`detect_sources`. Both draw ``n`` windows of
``window`` tokens with a seeded ``numpy.random.Generator`` and read only what those windows
need, so the time and memory to embed a domain do not grow with the domain.

Formats
-------
Pre-tokenised (random access to tokens, nothing is tokenised):

* nanoGPT: ``train.bin`` (+ ``val.bin``) flat token arrays with ``meta.json`` declaring
  ``{"dtype": "uint16" | "uint32", "vocab_size": V}``.
* Megatron-LM indexed datasets: ``PREFIX.bin`` + ``PREFIX.idx`` pairs (many prefixes per domain).
  The ``.idx`` holds the 9-byte magic ``MMIDIDX\\0\\0``, a little-endian u64 version (1), a u8
  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16), u64
  sequence count S, u64 document-index count D, then S int32 sequence lengths, S int64 byte
  pointers into the ``.bin``, D int64 document indices (sequence numbers where documents end,
  starting at 0) and, for multimodal data, S int8 modes. The domain's token stream is the
  sequences in index order, read through their pointers; documents are the runs of sequences
  the document index delimits (``n_documents = D - 1``). Float dtypes are accepted when they
  hold whole non-negative ids.

Raw text (tokenised here, only the drawn documents):

* any other file: UTF-8 text, one document per file;
* ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: one JSON object per line, text in ``text_field``;
* ``.parquet``: text in the column ``text_field``;
* Hugging Face ``datasets`` folders written by ``save_to_disk`` (``state.json`` naming the
  ``.arrow`` files; a ``DatasetDict`` folder contributes its ``train`` split), and loose
  ``.arrow`` files: memory-mapped Arrow IPC, never loaded whole.

How raw text is sampled (the stated approximation)
--------------------------------------------------
A domain's raw text is cut into *blocks*: a seekable file (plain text, ``.jsonl``, Arrow) is one
block, a Parquet file has one block per row group, a compressed shard is one block. Each of the
``n`` window draws

1. picks a block with probability proportional to its size -- bytes on disk for files (for
   compressed shards: compressed bytes), the text column's uncompressed bytes for Parquet row
   groups, the text buffer's bytes for Arrow;
2. picks a byte uniformly within the block (uncompressed bytes for a compressed shard; the text
   buffer's bytes for Arrow and Parquet) and takes the document (JSONL line, Arrow/Parquet row)
   or, for plain text files, the line containing it (lines are also cut on a fixed 1 MiB grid,
   so one-line files cost no more; a character split by a cut is dropped);
3. tokenises that document (line), appends EOS at a document end, and starts the window at the
   token at the same relative position (``floor(fraction * n_tokens)``); the window continues
   into the following documents, then the following blocks (cyclically), so, as in the method,
   windows may cross document boundaries.

Token ``t`` of document ``d`` is therefore the window start with probability
``(b_d / B) / k_d`` (``b_d`` bytes and ``k_d`` tokens of the document, ``B`` bytes of the
domain), against ``1 / N`` for a uniform draw over the domain's ``N`` tokens: **the draw is
uniform over tokens up to each document's bytes-per-token relative to the domain's average**.
It is exact for the byte tokenizer on Arrow/Parquet/plain text (bytes are tokens, up to the
EOS per document); for JSONL the bytes are the whole JSON line (its other fields included);
across blocks it also assumes a similar compression ratio among compressed shards. Everything
is a function of the seed: the same seed and files give the same windows.

Compressed shards cannot seek. A drawn shard is decompressed once to learn its uncompressed
size and once more up to the last drawn line (memory: one line per pending window). Parquet
row groups are read whole (the text column only). To keep that cost flat, the draws that land
in such sequential blocks are confined to at most ``max_sequential_blocks`` of them (a cluster
sample: those blocks are drawn proportional to size, each draw takes one of them uniformly), so
each window's marginal distribution is unchanged while the bytes read stop growing with the
domain.

Fingerprints
------------
:func:`file_fingerprint` keys caches on a file's identity -- absolute path, size, mtime and a
sha256 of its first and last MiB -- rather than on every byte; ``full=True`` hashes the whole
content (and leaves out path and mtime, so copies agree).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np

from ..errors import ChameleonUserError

__all__ = [
    "TokenSource",
    "NanoGPTBinSource",
    "MegatronSource",
    "TokenSources",
    "TextSource",
    "PlainTextSource",
    "JsonlSource",
    "ParquetSource",
    "ArrowSource",
    "TextSources",
    "SampleStats",
    "detect_sources",
    "file_fingerprint",
    "MEGATRON_DTYPES",
]

_MIB = 1 << 20
_FINGERPRINT_FORMAT = "chameleon_ext.source_fingerprint/1"
_MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
_MEGATRON_HEADER = len(_MEGATRON_MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype, S, D = 34 bytes
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                   6: np.float64, 7: np.float32, 8: np.uint16}
_NANOGPT_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_RAW_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow", ".txt", ".text")
_STREAM_CHUNK = _MIB
_LOOKBACK = 1 << 16  # bytes read backwards per step when finding the start of a line
# Lines of plain text files are also cut every _MAX_UNIT bytes (a fixed grid), so a file with
# very long lines (minified code, one-line dumps) never makes a draw read more than this.
_MAX_UNIT = 1 << 20


# ------------------------------------------------------------------------------------------
# fingerprints


def file_fingerprint(path: str, full: bool = False) -> str:
    """Hex sha256 identifying a file for cache keys.

    Default: absolute path, size, mtime (ns) and the first and last MiB of content -- cheap on
    any size. ``full=True``: size and every byte (path and mtime left out, so copies agree).

    Raises:
        ChameleonUserError: the file cannot be read.
    """
    try:
        st = os.stat(path)
        h = hashlib.sha256(f"{_FINGERPRINT_FORMAT}\0{'full' if full else 'identity'}\0".encode())
        if not full:
            h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        else:
            h.update(f"{st.st_size}\0".encode())
        with open(path, "rb") as f:
            if full:
                for block in iter(lambda: f.read(_MIB), b""):
                    h.update(block)
            else:
                h.update(f.read(_MIB))
                if st.st_size > 2 * _MIB:
                    f.seek(st.st_size - _MIB)
                    h.update(f.read(_MIB))
                elif st.st_size > _MIB:
                    h.update(f.read())
    except OSError as exc:
        raise ChameleonUserError(f"cannot read file {path!r}: {exc.strerror or exc}") from exc
    return h.hexdigest()


def _combine(kind: str, parts: Sequence[str]) -> str:
    h = hashlib.sha256(f"{_FINGERPRINT_FORMAT}\0{kind}\0".encode())
    for p in parts:
        h.update(p.encode() + b"\0")
    return h.hexdigest()


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as exc:
        raise ChameleonUserError(f"cannot read file {path!r}: {exc.strerror or exc}") from exc


# ------------------------------------------------------------------------------------------
# pre-tokenised sources


class TokenSource:
    """A pre-tokenised token stream with random access.

    Attributes:
        path: the file (nanoGPT) or prefix (Megatron) read.
        n_tokens: tokens in the stream.
        n_documents: documents, when the format records them, else ``None``.
    """

    path: str
    n_tokens: int
    n_documents: Optional[int]

    def files(self) -> List[str]:
        raise NotImplementedError

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream as ``[length]`` int64."""
        raise NotImplementedError

    def fingerprint(self, full: bool = False) -> str:
        return _combine(type(self).__name__, [file_fingerprint(f, full) for f in self.files()])

    def _check_range(self, start: int, length: int) -> None:
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise ChameleonUserError(
                f"read: tokens [{start}, {start + length}) are outside {self.path!r}, which "
                f"holds {self.n_tokens} tokens"
            )


def _as_ids(arr: np.ndarray, path: str) -> np.ndarray:
    """Token ids as int64; float or signed storage must hold whole non-negative ids."""
    if arr.dtype.kind == "f":
        if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr != np.floor(arr))):
            raise ChameleonUserError(f"{path!r} holds non-integer token ids (dtype {arr.dtype})")
    out = arr.astype(np.int64)
    if arr.dtype.kind in "if" and out.size and int(out.min()) < 0:
        raise ChameleonUserError(f"{path!r} holds a negative token id ({int(out.min())})")
    return out


class NanoGPTBinSource(TokenSource):
    """A nanoGPT flat token file (``train.bin``/``val.bin``) of ``dtype`` ids."""

    def __init__(self, path: str, dtype):
        self.path = os.path.abspath(path)
        self.dtype = np.dtype(dtype)
        size = _size(self.path)
        if size % self.dtype.itemsize:
            raise ChameleonUserError(
                f"{self.path!r} is {size} bytes, not a whole number of {self.dtype.name} tokens; "
                "is the dtype in meta.json right?"
            )
        self.n_tokens = size // self.dtype.itemsize
        self.n_documents = None
        self._tokens = (np.memmap(self.path, dtype=self.dtype, mode="r") if self.n_tokens
                        else np.zeros(0, self.dtype))

    def files(self) -> List[str]:
        return [self.path]

    def read(self, start: int, length: int) -> np.ndarray:
        start, length = int(start), int(length)
        self._check_range(start, length)
        return _as_ids(np.asarray(self._tokens[start:start + length]), self.path)


class MegatronSource(TokenSource):
    """A Megatron-LM indexed dataset ``prefix.bin`` + ``prefix.idx`` (format: module docstring).

    Only the index arrays are memory-mapped at open; :meth:`read` touches just the sequences a
    token range overlaps.
    """

    def __init__(self, prefix: str):
        self.path = os.path.abspath(prefix)
        self.idx_path, self.bin_path = self.path + ".idx", self.path + ".bin"
        idx_size = _size(self.idx_path)
        try:
            with open(self.idx_path, "rb") as f:
                head = f.read(_MEGATRON_HEADER)
        except OSError as exc:
            raise ChameleonUserError(f"cannot read {self.idx_path!r}: {exc.strerror or exc}") from exc
        if len(head) < _MEGATRON_HEADER or not head.startswith(_MEGATRON_MAGIC):
            what = "is truncated" if _MEGATRON_MAGIC.startswith(head[:9]) else "is not"
            raise ChameleonUserError(
                f"{self.idx_path!r} {what} a Megatron index (expected the MMIDIDX header, "
                f"{_MEGATRON_HEADER} bytes at least; it has {idx_size})"
            )
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != 1:
            raise ChameleonUserError(f"{self.idx_path!r}: Megatron index version {version}, expected 1")
        if code not in MEGATRON_DTYPES:
            raise ChameleonUserError(
                f"{self.idx_path!r}: unknown dtype code {code}; expected one of {sorted(MEGATRON_DTYPES)}"
            )
        self.dtype = np.dtype(MEGATRON_DTYPES[code])
        need = _MEGATRON_HEADER + n_seq * (4 + 8) + n_doc * 8
        if idx_size not in (need, need + n_seq):  # + one int8 mode per sequence when multimodal
            raise ChameleonUserError(
                f"{self.idx_path!r} is {idx_size} bytes but its header announces {n_seq} sequences "
                f"and {n_doc} document indices ({need} bytes); the index is truncated or corrupt"
            )
        mm = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        off = _MEGATRON_HEADER
        self.sequence_lengths = np.frombuffer(mm, np.int32, n_seq, off)
        self.sequence_pointers = np.frombuffer(mm, np.int64, n_seq, off + 4 * n_seq)
        self.document_indices = np.frombuffer(mm, np.int64, n_doc, off + 12 * n_seq)
        if n_seq and int(self.sequence_lengths.min()) < 0:
            raise ChameleonUserError(f"{self.idx_path!r} holds a negative sequence length; it is corrupt")
        di = self.document_indices
        if n_doc and (di[0] != 0 or di[-1] > n_seq or np.any(np.diff(di) < 0)):
            raise ChameleonUserError(
                f"{self.idx_path!r}: the document index must rise from 0 to at most the sequence "
                f"count {n_seq}; it is corrupt"
            )
        # token offset of each sequence in the stream [S + 1]
        self._starts = np.zeros(n_seq + 1, dtype=np.int64)
        np.cumsum(self.sequence_lengths, out=self._starts[1:])
        self.n_tokens = int(self._starts[-1])
        self.n_documents = max(n_doc - 1, 0)
        bin_size = _size(self.bin_path)
        end = int((self.sequence_pointers + self.sequence_lengths.astype(np.int64) * self.dtype.itemsize).max()
                  ) if n_seq else 0
        if n_seq and int(self.sequence_pointers.min()) < 0:
            raise ChameleonUserError(f"{self.idx_path!r} holds a negative sequence pointer; it is corrupt")
        if bin_size < end:
            raise ChameleonUserError(
                f"{self.bin_path!r} is {bin_size} bytes but its index {os.path.basename(self.idx_path)!r} "
                f"needs {end}; the .bin is truncated or belongs to another index"
            )
        self._bin = np.memmap(self.bin_path, dtype=np.uint8, mode="r") if bin_size else np.zeros(0, np.uint8)

    def files(self) -> List[str]:
        return [self.idx_path, self.bin_path]

    def document_token_starts(self) -> np.ndarray:
        """Token offset where each document starts ``[n_documents + 1]`` (last: its end)."""
        return self._starts[self.document_indices]

    def read(self, start: int, length: int) -> np.ndarray:
        start, length = int(start), int(length)
        self._check_range(start, length)
        out = np.empty(length, dtype=np.int64)
        s = int(np.searchsorted(self._starts, start, side="right")) - 1
        done, pos, item = 0, start, self.dtype.itemsize
        while done < length:  # sequence by sequence, through each sequence's own pointer
            while self._starts[s + 1] <= pos:  # skip empty sequences
                s += 1
            within = pos - int(self._starts[s])
            take = min(length - done, int(self._starts[s + 1]) - pos)
            b0 = int(self.sequence_pointers[s]) + within * item
            raw = np.frombuffer(self._bin, dtype=self.dtype, count=take, offset=b0)
            out[done:done + take] = _as_ids(raw, self.bin_path)
            done, pos = done + take, pos + take
        return out


class TokenSources:
    """A pre-tokenised domain: its sources' token streams concatenated in sorted order.

    Attributes:
        sources: the streams; ``val``: an optional held-out stream (nanoGPT ``val.bin``).
        vocab_size: declared by nanoGPT's ``meta.json``, else ``None``.
    """

    kind = "tokens"

    def __init__(self, sources: Sequence[TokenSource], val: Optional[TokenSource] = None,
                 vocab_size: Optional[int] = None, path: str = ""):
        self.sources = list(sources)
        self.val = val
        self.vocab_size = vocab_size
        self.path = path
        self._starts = np.zeros(len(self.sources) + 1, dtype=np.int64)
        np.cumsum([s.n_tokens for s in self.sources], out=self._starts[1:])
        self.n_tokens = int(self._starts[-1])
        docs = [s.n_documents for s in self.sources]
        self.n_documents = None if any(d is None for d in docs) else int(sum(docs))

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the concatenated streams: ``[length]`` int64."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise ChameleonUserError(
                f"read: tokens [{start}, {start + length}) are outside the domain {self.path!r}, "
                f"which holds {self.n_tokens} tokens"
            )
        parts, pos, end = [], start, start + length
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        while pos < end:
            while self._starts[i + 1] <= pos:
                i += 1
            take = min(end, int(self._starts[i + 1])) - pos
            parts.append(self.sources[i].read(pos - int(self._starts[i]), take))
            pos += take
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def sample_windows(self, rng: np.random.Generator, n: int, window: int, tokenizer=None) -> np.ndarray:
        """``n`` windows ``[n, window]`` int64, starts uniform over every full window
        (``tokenizer`` is unused: it keeps the signature of :meth:`TextSources.sample_windows`)."""
        n, window = _check_counts(n, window)
        if self.n_tokens < window:
            raise ChameleonUserError(
                f"domain {self.path!r} is shorter than one window: {self.n_tokens} tokens, a "
                f"window needs {window}"
            )
        starts = rng.integers(0, self.n_tokens - window + 1, size=n)
        out = np.empty((n, window), dtype=np.int64)
        for i, s in enumerate(starts):
            out[i] = self.read(int(s), window)
        return out

    def estimated_tokens(self) -> int:
        return self.n_tokens

    def fingerprint(self, full: bool = False) -> str:
        parts = [s.fingerprint(full) for s in self.sources]
        if self.val is not None:
            parts.append("val:" + self.val.fingerprint(full))
        return _combine("tokens", parts)


def _check_counts(n, window):
    for name, v in (("n", n), ("window", window)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name == "n" else 1):
            raise ChameleonUserError(f"{name}: expected a {'non-negative' if name == 'n' else 'positive'} "
                                     f"integer, got {v!r}")
    return int(n), int(window)


# ------------------------------------------------------------------------------------------
# raw text: tokenising one document (or line)


def _encode(tok, text: str) -> np.ndarray:
    enc = getattr(tok, "encode_array", None)
    ids = enc(text) if enc is not None else np.asarray(tok.encode(text), dtype=np.int64)
    return np.asarray(ids, dtype=np.int64)


@dataclass
class SampleStats:
    """What a raw-text draw read, for estimating token counts without tokenising everything."""

    unit_bytes: int = 0  # bytes of the documents/lines tokenised, as blocks are weighted
    tokens: int = 0  # tokens they gave (EOS included)
    blocks_read: int = 0
    stream_bytes: int = 0  # decompressed bytes of the compressed shards read
    compressed_bytes: int = 0  # their bytes on disk

    def add(self, unit_bytes: int, n_tokens: int) -> None:
        self.unit_bytes += unit_bytes
        self.tokens += n_tokens


class _Window:
    """One window being assembled: tokens gathered so far."""

    __slots__ = ("parts", "have", "need")

    def __init__(self, need: int):
        self.parts, self.have, self.need = [], 0, need

    def feed(self, toks: np.ndarray) -> None:
        take = toks[: self.need - self.have]
        if take.size:
            self.parts.append(take)
            self.have += take.size

    @property
    def full(self) -> bool:
        return self.have >= self.need

    def tokens(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.int64)


def _start_at(toks: np.ndarray, fraction: float) -> np.ndarray:
    """Tokens of a document from its token at relative position ``fraction`` in [0, 1)."""
    return toks[int(fraction * toks.size):]


class _Block:
    """A unit read at once; ``weight`` is its share of the domain (bytes, see module doc)."""

    weight: int
    sequential: bool  # True: reading any of it costs reading (most of) it
    label: str

    def windows(self, rng, k, window, tok, stats) -> List[_Window]:
        """``k`` windows started in this block (possibly short at its end)."""
        raise NotImplementedError

    def head(self, n, tok, stats) -> np.ndarray:
        """The block's first ``n`` tokens (fewer if it holds fewer), for windows that continue."""
        raise NotImplementedError

    def documents(self) -> Iterator[Iterator[str]]:
        """Every document in order, each as an iterator of text pieces (for full tokenisation)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------
# raw text: line-based files (plain text, JSONL, compressed JSONL)


def _decode_cut(data: bytes) -> str:
    """UTF-8 of a piece cut on the byte grid: a character split by the cut is dropped (at most
    3 bytes at each end); anything else invalid still raises."""
    head = 0
    while head < min(3, len(data)) and 0x80 <= data[head] < 0xC0:
        head += 1
    data = data[head:]
    for tail in range(0, min(4, len(data) + 1)):
        try:
            return data[:len(data) - tail].decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(data) - 4:
                raise
    return data.decode("utf-8")  # raises with the real position


class _LineFormat:
    """How a line becomes text: a JSONL document (EOS after each) or a line of a text file."""

    def __init__(self, path: str, jsonl: bool, text_field: str):
        self.path, self.jsonl, self.text_field = path, jsonl, text_field

    def parse(self, line: bytes, offset: int, cut: bool = False) -> str:
        if not self.jsonl:
            try:
                return _decode_cut(line) if cut else line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ChameleonUserError(
                    f"file {self.path!r} is not valid UTF-8 text near byte {offset + exc.start} ({exc.reason})"
                ) from None
        if not line.strip():
            return ""
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ChameleonUserError(
                f"file {self.path!r}: the line at byte {offset} is not valid JSON ({exc})"
            ) from None
        text = obj.get(self.text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ChameleonUserError(
                f"file {self.path!r}: the line at byte {offset} has no string {self.text_field!r} "
                "field (choose the field with text_field / --text-field)"
            )
        return text

    def tokens(self, line: bytes, offset: int, last: bool, tok, stats, cut: bool = False) -> np.ndarray:
        """Tokens of one line; EOS closes a JSONL document and the last line of a text file."""
        text = self.parse(line, offset, cut)
        ids = _encode(tok, text) if text else np.zeros(0, np.int64)
        if (self.jsonl and text) or (not self.jsonl and last):
            ids = np.append(ids, np.int64(tok.eos_id))
        stats.add(len(line), ids.size)
        return ids


class _SeekableLines(_Block):
    """A plain text or JSONL file: byte offsets drawn uniformly, each taken to its line."""

    sequential = False

    def __init__(self, path: str, fmt: _LineFormat):
        self.path, self.fmt, self.label = path, fmt, path
        self.weight = _size(path)

    def _open(self):
        try:
            return open(self.path, "rb")
        except OSError as exc:
            raise ChameleonUserError(f"cannot read file {self.path!r}: {exc.strerror or exc}") from exc

    @staticmethod
    def _line_start(f, u: int, floor: int) -> int:
        pos = u
        while pos > floor:  # look backwards for the newline ending the previous line
            lo = max(floor, pos - _LOOKBACK)
            f.seek(lo)
            nl = f.read(pos - lo).rfind(b"\n")
            if nl >= 0:
                return lo + nl + 1
            pos = lo
        return floor

    def _grid(self, pos: int) -> tuple[int, int]:
        """The grid cell around ``pos``: text lines are also cut every ``_MAX_UNIT`` bytes."""
        if self.fmt.jsonl:  # a JSONL line is a document: never cut
            return 0, self.weight
        g = pos - pos % _MAX_UNIT
        return g, g + _MAX_UNIT

    def _unit(self, f, pos: int) -> bytes:
        """The line (or grid-cut piece of a long line) starting at ``pos``."""
        f.seek(pos)
        return f.readline(self._grid(pos)[1] - pos)

    def _tokens(self, unit: bytes, pos: int, tok, stats) -> np.ndarray:
        end = pos + len(unit)
        cut = not self.fmt.jsonl and (pos % _MAX_UNIT == 0 or end % _MAX_UNIT == 0)
        return self.fmt.tokens(unit, pos, end >= self.weight, tok, stats, cut=cut)

    def windows(self, rng, k, window, tok, stats):
        us = rng.integers(0, self.weight, size=k)
        fractions = rng.random(size=k)
        out = []
        stats.blocks_read += 1
        with self._open() as f:
            for u, frac in zip(us, fractions):
                u = int(u)
                pos = self._line_start(f, u, self._grid(u)[0])
                unit = self._unit(f, pos)
                # position of u within its unit, so the start is uniform over the unit's tokens
                frac = (u - pos + frac) / max(len(unit), 1)
                w = _Window(window)
                first = True
                while unit and not w.full:
                    toks = self._tokens(unit, pos, tok, stats)
                    w.feed(_start_at(toks, frac) if first else toks)
                    first, pos = False, pos + len(unit)
                    unit = self._unit(f, pos)
                out.append(w)
        return out

    def documents(self):
        if self.fmt.jsonl:
            with self._open() as f:
                pos = 0
                for line in f:
                    text = self.fmt.parse(line, pos)
                    pos += len(line)
                    if text:
                        yield iter((text,))
        else:
            yield self._pieces()

    def _pieces(self) -> Iterator[str]:
        with self._open() as f:
            pos = 0
            unit = self._unit(f, 0)
            while unit:
                yield self.fmt.parse(unit, pos, not self.fmt.jsonl and (pos % _MAX_UNIT == 0
                                                                         or (pos + len(unit)) % _MAX_UNIT == 0))
                pos += len(unit)
                unit = self._unit(f, pos)

    def head(self, n, tok, stats):
        w = _Window(n)
        with self._open() as f:
            pos = 0
            unit = self._unit(f, 0)
            while unit and not w.full:
                w.feed(self._tokens(unit, pos, tok, stats))
                pos += len(unit)
                unit = self._unit(f, pos)
        return w.tokens()


class _CompressedLines(_Block):
    """A ``.jsonl.gz`` / ``.jsonl.zst`` shard: streamed, as it cannot seek (module doc)."""

    sequential = True

    def __init__(self, path: str, fmt: _LineFormat, codec: str):
        self.path, self.fmt, self.codec, self.label = path, fmt, codec, path
        self.weight = _size(path)

    def _stream(self):
        try:
            raw = open(self.path, "rb")
        except OSError as exc:
            raise ChameleonUserError(f"cannot read file {self.path!r}: {exc.strerror or exc}") from exc
        if self.codec == "gz":
            return gzip.GzipFile(fileobj=raw, mode="rb"), raw
        return io.BufferedReader(_ZstdRaw(raw, self.path), buffer_size=_STREAM_CHUNK), raw

    def _errors(self):
        errs = [OSError, EOFError, zlib.error]
        if self.codec == "zst":
            import zstandard
            errs.append(zstandard.ZstdError)
        return tuple(errs)

    def _broken(self, exc) -> ChameleonUserError:
        return ChameleonUserError(
            f"file {self.path!r} is not a readable {self.codec} stream (truncated or corrupt): {exc}"
        )

    def _uncompressed_size(self) -> int:
        stream, raw = self._stream()
        total = 0
        try:
            with raw, stream:
                for chunk in iter(lambda: stream.read(_STREAM_CHUNK), b""):
                    total += len(chunk)
        except self._errors() as exc:
            raise self._broken(exc) from None
        return total

    def _lines(self, stats) -> Iterator[tuple[int, bytes]]:
        stream, raw = self._stream()
        pos = 0
        try:
            with raw, stream:
                for line in stream:
                    yield pos, line
                    pos += len(line)
        except self._errors() as exc:
            raise self._broken(exc) from None

    def windows(self, rng, k, window, tok, stats):
        stats.blocks_read += 1
        total = self._uncompressed_size()
        stats.compressed_bytes += self.weight
        stats.stream_bytes += total
        if total == 0:
            return [_Window(window) for _ in range(k)]
        us = rng.integers(0, total, size=k)
        fractions = rng.random(size=k)
        order = np.argsort(us, kind="stable")
        out = [_Window(window) for _ in range(k)]
        nxt, active = 0, []
        for pos, line in self._lines(stats):
            end = pos + len(line)
            starting = []
            while nxt < k and us[order[nxt]] < end:
                starting.append(int(order[nxt]))
                nxt += 1
            if not starting and not active:
                continue
            toks = self.fmt.tokens(line, pos, end >= total, tok, stats)
            for i in active:
                out[i].feed(toks)
            for i in starting:
                frac = (int(us[i]) - pos + fractions[i]) / max(len(line), 1)
                out[i].feed(_start_at(toks, frac))
            active = [i for i in active + starting if not out[i].full]
            if nxt >= k and not active:
                break  # nothing left to read from this shard
        return out

    def documents(self):
        for pos, line in self._lines(SampleStats()):
            text = self.fmt.parse(line, pos)
            if text:
                yield iter((text,))

    def head(self, n, tok, stats):
        w = _Window(n)
        for pos, line in self._lines(stats):  # JSONL: every document ends with EOS anyway
            w.feed(self.fmt.tokens(line, pos, False, tok, stats))
            if w.full:
                break
        return w.tokens()


class _ZstdRaw(io.RawIOBase):
    """Decompresses a zstd file frame by frame for io.BufferedReader (which splits lines).

    A decompression object per frame, so a stream that ends inside a frame -- which
    zstandard's stream reader reports as a clean end -- is an error here.
    """

    def __init__(self, raw, path: str):
        import zstandard

        self._zstd, self._raw, self._path = zstandard, raw, path
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False  # bytes of the current frame have been fed

    def readable(self):
        return True

    def readinto(self, b):
        while not self._pending:
            data = self._raw.read(_STREAM_CHUNK)
            if not data:
                if self._in_frame and not self._obj.eof:
                    raise self._zstd.ZstdError("the stream ends inside a frame")
                return 0
            while data:
                self._in_frame = True
                self._pending += self._obj.decompress(data)
                data = self._obj.unused_data if self._obj.eof else b""
                if self._obj.eof:  # next frame, if any, gets a fresh decompressor
                    self._obj = self._zstd.ZstdDecompressor().decompressobj()
                    self._in_frame = False
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


# ------------------------------------------------------------------------------------------
# raw text: columnar (Arrow IPC from save_to_disk, Parquet row groups)


def _string_chunks(column, path: str, text_field: str) -> list:
    import pyarrow as pa

    chunks = column.chunks if hasattr(column, "chunks") else [column]
    out = []
    for c in chunks:
        if pa.types.is_dictionary(c.type):
            c = c.dictionary_decode()
        if not (pa.types.is_string(c.type) or pa.types.is_large_string(c.type)):
            raise ChameleonUserError(
                f"file {path!r}: column {text_field!r} holds {c.type}, expected strings"
            )
        if len(c):
            out.append(c)
    return out


def _offsets(chunk) -> np.ndarray:
    """Zero-copy view of a string array's offsets ``[rows + 1]`` (buffer 1 in Arrow's layout)."""
    import pyarrow as pa

    dtype = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    return np.frombuffer(chunk.buffers()[1], dtype=dtype)[chunk.offset:chunk.offset + len(chunk) + 1]


class _Rows:
    """Documents as rows of string chunks; byte draws use the offsets (never the text)."""

    def __init__(self, chunks: list):
        self.chunks = chunks
        # zero-copy views of each chunk's offsets [rows + 1]; the text bytes stay on disk
        self.offsets = [_offsets(c) for c in chunks]
        spans = [int(o[-1]) - int(o[0]) for o in self.offsets]
        self.cum = np.concatenate([[0], np.cumsum(spans)]).astype(np.int64)
        self.n_bytes = int(self.cum[-1])

    def locate(self, u: int) -> tuple[int, int, int, int]:
        """Chunk, row, byte offset within the row and row length for text byte ``u``."""
        c = int(np.searchsorted(self.cum, u, side="right")) - 1
        offs = self.offsets[c]
        b = int(offs[0]) + u - int(self.cum[c])
        r = int(np.searchsorted(offs, b, side="right")) - 1
        return c, r, b - int(offs[r]), int(offs[r + 1]) - int(offs[r])

    def texts_from(self, c: int, r: int) -> Iterator[Optional[str]]:
        while c < len(self.chunks):
            chunk = self.chunks[c]
            while r < len(chunk):
                yield chunk[r].as_py()
                r += 1
            c, r = c + 1, 0


def _doc_tokens(text: Optional[str], tok, stats) -> np.ndarray:
    if not text:  # null or empty rows are no document (no EOS either)
        return np.zeros(0, np.int64)
    ids = np.append(_encode(tok, text), np.int64(tok.eos_id))
    stats.add(len(text.encode("utf-8")), ids.size)
    return ids


def _row_windows(rows: _Rows, rng, k, window, tok, stats) -> List[_Window]:
    us = rng.integers(0, rows.n_bytes, size=k) if rows.n_bytes else np.zeros(k, np.int64)
    fractions = rng.random(size=k)
    out = []
    for u, frac in zip(us, fractions):
        w = _Window(window)
        out.append(w)
        if not rows.n_bytes:
            continue
        c, r, within, length = rows.locate(int(u))
        first = True
        for text in rows.texts_from(c, r):
            toks = _doc_tokens(text, tok, stats)
            w.feed(_start_at(toks, (within + frac) / max(length, 1)) if first else toks)
            first = False
            if w.full:
                break
    return out


def _row_documents(rows: _Rows) -> Iterator[Iterator[str]]:
    for text in rows.texts_from(0, 0):
        if text:
            yield iter((text,))


def _row_head(rows: _Rows, n, tok, stats) -> np.ndarray:
    w = _Window(n)
    for text in rows.texts_from(0, 0):
        w.feed(_doc_tokens(text, tok, stats))
        if w.full:
            break
    return w.tokens()


class _ArrowBlock(_Block):
    """One memory-mapped Arrow IPC file (``datasets.save_to_disk`` writes the stream format)."""

    sequential = False

    def __init__(self, path: str, text_field: str):
        import pyarrow as pa

        self.path, self.label = path, path
        try:
            source = pa.memory_map(path, "r")
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
        except (OSError, pa.ArrowException) as exc:
            raise ChameleonUserError(f"file {path!r} is not a readable Arrow IPC file: {exc}") from None
        if text_field not in table.column_names:
            raise ChameleonUserError(
                f"file {path!r} has no column {text_field!r} (columns: {table.column_names}); "
                "choose the text column with text_field / --text-field"
            )
        self.rows = _Rows(_string_chunks(table.column(text_field), path, text_field))
        self.weight = self.rows.n_bytes

    def windows(self, rng, k, window, tok, stats):
        stats.blocks_read += 1
        return _row_windows(self.rows, rng, k, window, tok, stats)

    def head(self, n, tok, stats):
        return _row_head(self.rows, n, tok, stats)

    def documents(self):
        return _row_documents(self.rows)


class _ParquetRowGroup(_Block):
    """One row group of a Parquet file; only its text column is read, and only when drawn."""

    sequential = True

    def __init__(self, source: "ParquetSource", index: int, weight: int):
        self.source, self.index, self.weight = source, index, weight
        self.label = f"{source.path} (row group {index})"

    def _rows(self) -> _Rows:
        import pyarrow as pa

        try:
            table = self.source.file().read_row_group(self.index, columns=[self.source.text_field])
        except (OSError, pa.ArrowException) as exc:
            raise ChameleonUserError(f"file {self.source.path!r} is not a readable Parquet file: {exc}") from None
        return _Rows(_string_chunks(table.column(0), self.source.path, self.source.text_field))

    def windows(self, rng, k, window, tok, stats):
        stats.blocks_read += 1
        return _row_windows(self._rows(), rng, k, window, tok, stats)

    def head(self, n, tok, stats):
        return _row_head(self._rows(), n, tok, stats)

    def documents(self):
        return _row_documents(self._rows())


# ------------------------------------------------------------------------------------------
# raw-text sources (one file, or one save_to_disk folder) and the domain


class TextSource:
    """One raw-text file (or ``save_to_disk`` folder): its blocks and their cheap sizes.

    Attributes:
        path: the file or folder.
        format: ``"text"``, ``"jsonl"``, ``"jsonl.gz"``, ``"jsonl.zst"``, ``"parquet"`` or ``"arrow"``.
    """

    path: str
    format: str

    def blocks(self) -> List[_Block]:
        raise NotImplementedError

    def files(self) -> List[str]:
        return [self.path]

    def sizes(self) -> List[int]:
        """Each block's weight (bytes, see the module doc); no text is read."""
        return [b.weight for b in self.blocks()]

    def fingerprint(self, full: bool = False) -> str:
        return _combine(f"text:{self.format}:{getattr(self, 'text_field', '')}",
                        [file_fingerprint(f, full) for f in self.files()])


class PlainTextSource(TextSource):
    """A UTF-8 text file: one document; lines are the units drawn."""

    format = "text"

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._blocks = [_SeekableLines(self.path, _LineFormat(self.path, False, ""))]

    def blocks(self):
        return self._blocks


class JsonlSource(TextSource):
    """A JSONL file, plain or compressed (``.gz``, ``.zst``); one document per line."""

    def __init__(self, path: str, text_field: str = "text"):
        self.path, self.text_field = os.path.abspath(path), text_field
        fmt = _LineFormat(self.path, True, text_field)
        low = self.path.lower()
        if low.endswith(".gz"):
            self.format, block = "jsonl.gz", _CompressedLines(self.path, fmt, "gz")
        elif low.endswith(".zst"):
            self.format, block = "jsonl.zst", _CompressedLines(self.path, fmt, "zst")
        else:
            self.format, block = "jsonl", _SeekableLines(self.path, fmt)
        self._blocks = [block]

    def blocks(self):
        return self._blocks


class ParquetSource(TextSource):
    """A Parquet file; blocks are its row groups, weighted by the text column's bytes."""

    format = "parquet"

    def __init__(self, path: str, text_field: str = "text"):
        import pyarrow as pa

        self.path, self.text_field = os.path.abspath(path), text_field
        pf = self.file()
        names = pf.schema_arrow.names
        if text_field not in names:
            raise ChameleonUserError(
                f"file {self.path!r} has no column {text_field!r} (columns: {names}); choose the "
                "text column with text_field / --text-field"
            )
        t = pf.schema_arrow.field(text_field).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)):
            raise ChameleonUserError(f"file {self.path!r}: column {text_field!r} holds {t}, expected strings")
        col = pf.schema_arrow.get_field_index(text_field)
        md = pf.metadata
        self._blocks = [
            _ParquetRowGroup(self, i, int(md.row_group(i).column(col).total_uncompressed_size))
            for i in range(md.num_row_groups) if md.row_group(i).num_rows
        ]

    def file(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path, memory_map=True)
        except (OSError, pa.ArrowException) as exc:
            raise ChameleonUserError(f"file {self.path!r} is not a readable Parquet file: {exc}") from None

    def blocks(self):
        return self._blocks


class ArrowSource(TextSource):
    """Arrow IPC files: a ``save_to_disk`` folder (files from ``state.json``) or one ``.arrow``."""

    format = "arrow"

    def __init__(self, path: str, text_field: str = "text"):
        self.path, self.text_field = os.path.abspath(path), text_field
        self._files = _save_to_disk_files(self.path) if os.path.isdir(self.path) else [self.path]
        self._blocks = [_ArrowBlock(f, text_field) for f in self._files]

    def files(self):
        return list(self._files)

    def blocks(self):
        return self._blocks


def _save_to_disk_files(folder: str) -> List[str]:
    """The Arrow files of a ``datasets.save_to_disk`` folder, in the order ``state.json`` lists."""
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        folder = os.path.join(folder, "train")
        if not os.path.isdir(folder):
            raise ChameleonUserError(
                f"{os.path.dirname(folder)!r} is a DatasetDict folder without a 'train' split"
            )
    state = os.path.join(folder, "state.json")
    try:
        with open(state, "r", encoding="utf-8") as f:
            names = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ChameleonUserError(f"{state!r} is not a readable datasets state.json: {exc}") from None
    files = [os.path.join(folder, n) for n in names]
    for p in files:
        if not os.path.isfile(p):
            raise ChameleonUserError(f"{state!r} lists {os.path.basename(p)!r}, which is missing")
    return files


class TextSources:
    """A raw-text domain: its sources' blocks, drawn as the module docstring describes.

    Args:
        sources: the domain's sources, in a fixed (sorted) order.
        max_sequential_blocks: most compressed shards / Parquet row groups read per draw.
    """

    kind = "text"

    def __init__(self, sources: Sequence[TextSource], max_sequential_blocks: int = 8, path: str = ""):
        if isinstance(max_sequential_blocks, bool) or not isinstance(max_sequential_blocks, int) \
                or max_sequential_blocks < 1:
            raise ChameleonUserError(
                f"max_sequential_blocks: expected a positive integer, got {max_sequential_blocks!r}"
            )
        self.sources = list(sources)
        self.path = path
        self.max_sequential_blocks = max_sequential_blocks
        self.blocks = [b for s in self.sources for b in s.blocks()]
        self.weights = np.array([b.weight for b in self.blocks], dtype=np.float64)
        self.n_bytes = int(self.weights.sum())
        self.last_stats = SampleStats()

    def sizes(self) -> List[int]:
        return [b.weight for b in self.blocks]

    def iter_documents(self) -> Iterator[Iterator[str]]:
        """Every document of the domain in order, each an iterator of text pieces (a plain text
        file: its 1 MiB pieces). For small domains that are tokenised whole into a cache; the
        join rule is the samplers': EOS after every document."""
        for b in self.blocks:
            yield from b.documents()

    def fingerprint(self, full: bool = False) -> str:
        return _combine("text", [s.fingerprint(full) for s in self.sources])

    def _draw_blocks(self, rng, n) -> np.ndarray:
        p = self.weights / self.weights.sum()
        drawn = rng.choice(len(self.blocks), size=n, p=p)
        seq = np.array([b.sequential for b in self.blocks])
        in_seq = np.flatnonzero(seq[drawn])
        if np.unique(drawn[in_seq]).size > self.max_sequential_blocks:
            # cluster sample: a few sequential blocks drawn by size, each draw takes one of them
            # uniformly, so a draw still lands in a block with probability proportional to size
            ps = np.where(seq, self.weights, 0.0)
            slots = rng.choice(len(self.blocks), size=self.max_sequential_blocks, p=ps / ps.sum())
            drawn[in_seq] = slots[rng.integers(0, self.max_sequential_blocks, size=in_seq.size)]
        return drawn

    def sample_windows(self, rng: np.random.Generator, n: int, window: int, tokenizer) -> np.ndarray:
        """``n`` windows ``[n, window]`` int64 drawn as the module docstring describes.

        Only the drawn documents (and the ones a window runs on into) are tokenised; what was
        read is in :attr:`last_stats`.

        Raises:
            ChameleonUserError: the domain is empty or holds fewer than ``window`` tokens, or a
                file is corrupt, truncated or lacks the text field.
        """
        n, window = _check_counts(n, window)
        stats = SampleStats()
        self.last_stats = stats
        if not self.blocks or self.n_bytes == 0:
            raise ChameleonUserError(f"domain {self.path!r} is empty: its files hold no text")
        drawn = self._draw_blocks(rng, n)
        seeds = rng.integers(0, 2 ** 63, size=len(self.blocks))
        out = np.empty((n, window), dtype=np.int64)
        short = []  # (row, window) that ran off the end of their block
        for b in np.unique(drawn):
            rows = np.flatnonzero(drawn == b)
            ws = self.blocks[b].windows(np.random.default_rng(int(seeds[b])), rows.size, window,
                                        tokenizer, stats)
            for r, w in zip(rows, ws):
                if w.full:
                    out[r] = w.tokens()
                else:
                    short.append((int(r), int(b), w))
        heads = {}
        for r, b, w in short:  # continue into the next blocks, cyclically
            step = 1
            while not w.full:
                if step > len(self.blocks):
                    raise ChameleonUserError(
                        f"domain {self.path!r} is shorter than one window: a window needs {window} "
                        "tokens"
                    )
                nb = (b + step) % len(self.blocks)
                if nb not in heads or heads[nb].size < window:
                    heads[nb] = self.blocks[nb].head(window, tokenizer, stats)
                w.feed(heads[nb])
                step += 1
            out[r] = w.tokens()
        return out

    def estimated_tokens(self, stats: Optional[SampleStats] = None) -> int:
        """The domain's tokens estimated from a draw's tokens per byte (``last_stats``).

        Compressed shards are scaled by the decompressed/compressed ratio of the shards streamed.
        """
        s = stats or self.last_stats
        if s.unit_bytes == 0:
            raise ChameleonUserError("estimated_tokens: draw windows first (sample_windows)")
        per_byte = s.tokens / s.unit_bytes
        ratio = s.stream_bytes / s.compressed_bytes if s.compressed_bytes else 1.0
        total = sum(b.weight * (ratio if isinstance(b, _CompressedLines) else 1.0) for b in self.blocks)
        return int(round(total * per_byte))


# ------------------------------------------------------------------------------------------
# discovery


def _walk(domain_dir: str) -> List[str]:
    out = []

    def onerror(exc):
        raise ChameleonUserError(f"cannot read folder {exc.filename!r}: {exc.strerror or exc}")

    for root, dirs, files in os.walk(domain_dir, onerror=onerror, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if not f.startswith("."):
                out.append(os.path.join(root, f))
    return sorted(out)


def detect_sources(domain_dir: str, text_field: str = "text", max_sequential_blocks: int = 8):
    """The sources of one domain folder: a :class:`TokenSources` or a :class:`TextSources`.

    Pre-tokenised: Megatron ``.bin``/``.idx`` pairs, or nanoGPT ``train.bin`` (+ ``val.bin``) with
    ``meta.json``; other files there (READMEs, scripts, JSON) are ignored, but raw-text data
    files (``.jsonl*``, ``.parquet``, ``.arrow``, ``.txt``) make it an error. Raw text: every
    other non-hidden file, by suffix (module docstring); ``save_to_disk`` folders are recognised
    by their ``state.json`` (or ``dataset_dict.json``). Hidden files and folders are skipped.

    Raises:
        ChameleonUserError: missing or empty folder, a domain mixing pre-tokenised and raw
            formats, a ``.bin`` without its ``.idx`` (or meta.json), or a corrupt file.
    """
    domain_dir = os.path.abspath(os.fspath(domain_dir))
    if not os.path.isdir(domain_dir):
        raise ChameleonUserError(f"domain folder {domain_dir!r} does not exist or is not a folder")
    if not isinstance(text_field, str) or not text_field:
        raise ChameleonUserError(f"text_field: expected a non-empty column/field name, got {text_field!r}")
    files = _walk(domain_dir)
    # save_to_disk folders: their files belong to one ArrowSource
    hf_dirs = sorted({os.path.dirname(f) for f in files
                      if os.path.basename(f) in ("state.json", "dataset_dict.json")})
    hf_roots = [d for d in hf_dirs if not any(d != o and d.startswith(o + os.sep) for o in hf_dirs)]
    files = [f for f in files if not any(f.startswith(d + os.sep) for d in hf_roots)]

    rel = lambda f: os.path.relpath(f, domain_dir)  # noqa: E731
    bins = [f for f in files if f.endswith(".bin")]
    idx = {f[:-4] for f in files if f.endswith(".idx")}
    nanogpt = os.path.join(domain_dir, "train.bin")
    raw_data = [f for f in files if f.lower().endswith(_RAW_SUFFIXES)] + hf_roots

    if bins or idx:
        if raw_data:
            raise ChameleonUserError(
                f"domain {domain_dir!r} mixes pre-tokenised files ({rel((bins or sorted(idx))[0])}) "
                f"with raw text ({rel(raw_data[0])}); put them in separate domains"
            )
        if nanogpt in bins and nanogpt[:-4] not in idx:
            return _nanogpt(domain_dir, bins, idx)
        prefixes = sorted(idx)
        for b in bins:
            if b[:-4] not in idx:
                raise ChameleonUserError(
                    f"domain {domain_dir!r}: {rel(b)!r} has no Megatron index {rel(b[:-4] + '.idx')!r} "
                    "(nanoGPT data is train.bin + meta.json)"
                )
        for p in prefixes:
            if not os.path.isfile(p + ".bin"):
                raise ChameleonUserError(f"domain {domain_dir!r}: {rel(p + '.idx')!r} has no {rel(p + '.bin')!r}")
        return TokenSources([MegatronSource(p) for p in prefixes], path=domain_dir)

    sources: List[TextSource] = []
    for f in sorted(files + hf_roots):
        low = f.lower()
        if f in hf_roots or low.endswith(".arrow"):
            sources.append(ArrowSource(f, text_field))
        elif low.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
            sources.append(JsonlSource(f, text_field))
        elif low.endswith(".parquet"):
            sources.append(ParquetSource(f, text_field))
        else:
            sources.append(PlainTextSource(f))
    if not sources:
        raise ChameleonUserError(f"domain {domain_dir!r} is empty: it holds no (non-hidden) data files")
    return TextSources(sources, max_sequential_blocks=max_sequential_blocks, path=domain_dir)


def _nanogpt(domain_dir: str, bins: List[str], idx) -> TokenSources:
    extra = [b for b in bins if os.path.dirname(b) != domain_dir
             or os.path.basename(b) not in ("train.bin", "val.bin")]
    if extra:
        raise ChameleonUserError(
            f"domain {domain_dir!r}: nanoGPT data is train.bin (+ val.bin); also found "
            f"{os.path.relpath(extra[0], domain_dir)!r}"
        )
    meta_path = os.path.join(domain_dir, "meta.json")
    try:
        with open(meta_path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise ChameleonUserError(
            f"domain {domain_dir!r}: train.bin needs a readable meta.json declaring its dtype ({exc})"
        ) from None
    dtype = meta.get("dtype") if isinstance(meta, dict) else None
    if dtype not in _NANOGPT_DTYPES:
        raise ChameleonUserError(
            f"{meta_path!r}: dtype must be one of {sorted(_NANOGPT_DTYPES)}, got {dtype!r}"
        )
    vocab = meta.get("vocab_size")
    val_path = os.path.join(domain_dir, "val.bin")
    val = NanoGPTBinSource(val_path, _NANOGPT_DTYPES[dtype]) if os.path.isfile(val_path) else None
    return TokenSources([NanoGPTBinSource(os.path.join(domain_dir, "train.bin"), _NANOGPT_DTYPES[dtype])],
                        val=val, vocab_size=int(vocab) if isinstance(vocab, int) else None, path=domain_dir)
