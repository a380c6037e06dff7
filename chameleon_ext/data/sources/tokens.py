"""Pre-tokenised sources: nanoGPT flat ``.bin`` files and Megatron-LM indexed datasets
(byte layout in the package docstring), read by token range without loading them."""

from __future__ import annotations

import os
import struct
from typing import List, Optional, Sequence

import numpy as np

from ... import io as files_io
from ...errors import ChameleonUserError
from .common import check_counts, combine_fingerprints, file_fingerprint, file_size


_MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
_MEGATRON_HEADER = len(_MEGATRON_MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype, S, D = 34 bytes
_INDEX_CHUNK = 1 << 22  # sequences checked per step when opening a Megatron index
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                   6: np.float64, 7: np.float32, 8: np.uint16}
NANOGPT_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
NANOGPT_FILES = ("train.bin", "val.bin", "test.bin")  # beside meta.json; val and test optional


def read_nanogpt_meta(domain_dir: str, what: str) -> tuple:
    """``(dtype, vocab_size)`` declared by the ``meta.json`` beside a nanoGPT ``train.bin``: the
    one reader of it. ``dtype`` is ``uint16`` or ``uint32``; ``vocab_size`` a positive integer
    that fits the dtype. ``what`` names the domain in the errors.

    Raises:
        ChameleonUserError: meta.json missing or unreadable, an unknown dtype, a missing,
            non-positive or too large vocab_size.
    """
    meta_path = os.path.join(domain_dir, "meta.json")
    if not os.path.lexists(meta_path):
        raise ChameleonUserError(
            f"{what}: train.bin has no meta.json beside it in {domain_dir!r}; write one like "
            '{"vocab_size": 50257, "dtype": "uint16"} so the token dtype is known')
    meta = files_io.read_json(meta_path, f"{what}: meta.json")
    dtype_name = meta.get("dtype") if isinstance(meta, dict) else None
    if not isinstance(dtype_name, str) or dtype_name not in NANOGPT_DTYPES:
        raise ChameleonUserError(
            f"{what}: unknown token dtype {dtype_name!r} in {meta_path!r}; expected one of "
            f"{sorted(NANOGPT_DTYPES)}")
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
        raise ChameleonUserError(
            f"{what}: {meta_path!r} must declare a positive integer vocab_size, got {vocab!r}")
    dtype = NANOGPT_DTYPES[dtype_name]
    if vocab > np.iinfo(dtype).max + 1:
        raise ChameleonUserError(f"{what}: vocab_size {vocab} does not fit dtype {dtype_name} in {meta_path!r}")
    return dtype, vocab


def _check_range(start: int, length: int, n_tokens: int, what: str) -> None:
    if start < 0 or length < 0 or start + length > n_tokens:
        raise ChameleonUserError(
            f"read: tokens [{start}, {start + length}) are outside {what}, which holds {n_tokens} tokens")


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
        return combine_fingerprints(type(self).__name__, [file_fingerprint(f, full) for f in self.files()])

    def _check_range(self, start: int, length: int) -> None:
        _check_range(start, length, self.n_tokens, repr(self.path))


def _as_ids(arr: np.ndarray, path: str) -> np.ndarray:
    """Token ids as int64; float or signed storage must hold whole non-negative ids."""
    if arr.dtype.kind == "f":
        if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr != np.floor(arr))):
            raise ChameleonUserError(f"{path!r} holds non-integer token ids (dtype {arr.dtype})")
    out = arr.astype(np.int64)
    if arr.dtype.kind in "if" and out.size and int(out.min()) < 0:
        raise ChameleonUserError(f"{path!r} holds a negative token id ({int(out.min())})")
    return out


class _PRead:
    """Reads byte ranges of a file with ``os.pread``: no memory map, so the pages a draw touches
    never count against the process (a mapped file's read-around made RSS grow to the file's
    size in the benchmark), and no shared file position, so forked workers can share it."""

    def __init__(self, path: str):
        self.path, self._fd = path, None

    def read(self, offset: int, nbytes: int) -> bytes:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as exc:
                raise ChameleonUserError(f"cannot read {self.path!r}: {exc.strerror or exc}") from exc
        data = os.pread(self._fd, nbytes, offset)
        if len(data) != nbytes:
            raise ChameleonUserError(
                f"{self.path!r} ended at byte {offset + len(data)} while reading {nbytes} bytes at "
                f"{offset}; it was truncated after it was opened"
            )
        return data

    def __getstate__(self):
        return {"path": self.path, "_fd": None}

    def __del__(self, _close=os.close):  # os may be gone at interpreter exit; keep close
        if getattr(self, "_fd", None) is not None:
            _close(self._fd)


class NanoGPTBinSource(TokenSource):
    """A nanoGPT flat token file (``train.bin``/``val.bin``) of ``dtype`` ids."""

    def __init__(self, path: str, dtype):
        self.path = os.path.abspath(path)
        self.dtype = np.dtype(dtype)
        size = file_size(self.path)
        if size % self.dtype.itemsize:
            raise ChameleonUserError(
                f"{self.path!r} is {size} bytes, not a whole number of {self.dtype.name} tokens; "
                "is the dtype in meta.json right?"
            )
        self.n_tokens = size // self.dtype.itemsize
        self.n_documents = None
        self._file = _PRead(self.path)

    def files(self) -> List[str]:
        return [self.path]

    def read(self, start: int, length: int) -> np.ndarray:
        start, length = int(start), int(length)
        self._check_range(start, length)
        item = self.dtype.itemsize
        raw = np.frombuffer(self._file.read(start * item, length * item), dtype=self.dtype)
        return _as_ids(raw, self.path)


class MegatronSource(TokenSource):
    """A Megatron-LM indexed dataset ``prefix.bin`` + ``prefix.idx`` (format: package docstring).

    The index arrays are memory-mapped at open and checked in chunks. When the sequences lie
    back to back in the ``.bin`` (what Megatron's builder writes), a token's byte offset is
    ``token * itemsize`` and a read is one ``pread``; otherwise reads follow each sequence's
    pointer through a ``[S + 1]`` table of token offsets.
    """

    def __init__(self, prefix: str):
        self.path = os.path.abspath(prefix)
        self.idx_path, self.bin_path = self.path + ".idx", self.path + ".bin"
        idx_size = file_size(self.idx_path)
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
        di = self.document_indices
        if n_doc and (di[0] != 0 or di[-1] > n_seq or any(
                np.any(np.diff(di[a:a + _INDEX_CHUNK + 1]) < 0) for a in range(0, n_doc, _INDEX_CHUNK))):
            raise ChameleonUserError(
                f"{self.idx_path!r}: the document index must rise from 0 to at most the sequence "
                f"count {n_seq}; it is corrupt"
            )
        self.n_documents = max(n_doc - 1, 0)
        item = self.dtype.itemsize
        # one pass over the index in chunks (bounded memory): token count, furthest byte, and
        # whether every sequence starts where the previous one ended
        n_tokens, end, contiguous, expect = 0, 0, True, 0
        for a in range(0, n_seq, _INDEX_CHUNK):
            lens = self.sequence_lengths[a:a + _INDEX_CHUNK].astype(np.int64)
            ptrs = self.sequence_pointers[a:a + _INDEX_CHUNK]
            if int(lens.min()) < 0 or int(ptrs.min()) < 0:
                raise ChameleonUserError(
                    f"{self.idx_path!r} holds a negative sequence length or pointer; it is corrupt"
                )
            ends = ptrs + lens * item
            end = max(end, int(ends.max()))
            if contiguous:
                contiguous = int(ptrs[0]) == expect and bool(np.all(ptrs[1:] == ends[:-1]))
                expect = int(ends[-1])
            n_tokens += int(lens.sum())
        self.n_tokens = n_tokens
        self.contiguous = contiguous
        self._starts = None
        if not contiguous:  # token offset of each sequence in the stream [S + 1]
            self._starts = np.zeros(n_seq + 1, dtype=np.int64)
            np.cumsum(self.sequence_lengths, out=self._starts[1:])
        bin_size = file_size(self.bin_path)
        if bin_size < end:
            raise ChameleonUserError(
                f"{self.bin_path!r} is {bin_size} bytes but its index {os.path.basename(self.idx_path)!r} "
                f"needs {end}; the .bin is truncated or belongs to another index"
            )
        self._file = _PRead(self.bin_path)

    def files(self) -> List[str]:
        return [self.idx_path, self.bin_path]

    def document_token_starts(self) -> np.ndarray:
        """Token offset where each document starts ``[n_documents + 1]`` (last: its end)."""
        if self._starts is None:
            ptrs = np.append(self.sequence_pointers, self.n_tokens * self.dtype.itemsize)
            return ptrs[self.document_indices] // self.dtype.itemsize
        return self._starts[self.document_indices]

    def read(self, start: int, length: int) -> np.ndarray:
        start, length = int(start), int(length)
        self._check_range(start, length)
        item = self.dtype.itemsize
        if self._starts is None:
            raw = np.frombuffer(self._file.read(start * item, length * item), dtype=self.dtype)
            return _as_ids(raw, self.bin_path)
        out = np.empty(length, dtype=np.int64)
        s = int(np.searchsorted(self._starts, start, side="right")) - 1
        done, pos = 0, start
        while done < length:  # sequence by sequence, through each sequence's own pointer
            while self._starts[s + 1] <= pos:  # skip empty sequences
                s += 1
            within = pos - int(self._starts[s])
            take = min(length - done, int(self._starts[s + 1]) - pos)
            b0 = int(self.sequence_pointers[s]) + within * item
            raw = np.frombuffer(self._file.read(b0, take * item), dtype=self.dtype)
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
        _check_range(start, length, self.n_tokens, f"the domain {self.path!r}")
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
        n, window = check_counts(n, window)
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
        return combine_fingerprints("tokens", parts)
