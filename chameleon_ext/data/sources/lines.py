"""Line-based raw text: plain text files, JSONL, and gzip / zstandard compressed JSONL shards."""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from typing import Iterator

import numpy as np

from ...errors import ChameleonUserError
from .common import _MIB, _size
from .text import SampleStats, TextSource, _Block, _encode, _start_at, _Window


_STREAM_CHUNK = _MIB
_LOOKBACK = 1 << 16  # bytes read backwards per step when finding the start of a line
_MAX_UNIT = 1 << 20


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
                w.key = pos
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
    """A ``.jsonl.gz`` / ``.jsonl.zst`` shard: streamed, as it cannot seek (package docstring)."""

    sequential = True
    rescale_key = "compressed"

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
        stats.measured(self.rescale_key, self.weight, total)
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
                out[i].key = pos
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
