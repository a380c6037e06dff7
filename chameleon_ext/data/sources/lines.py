"""Line-based raw text: plain text files, JSONL, and gzip / zstandard compressed JSONL shards."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from typing import Iterator, Optional

import numpy as np

from ...errors import ChameleonUserError
from .common import MIB, file_size
from .text import Block, SampleStats, TextSource, Window, encode, start_at


_STREAM_CHUNK = MIB
_LOOKBACK = 1 << 16  # bytes read backwards per step when finding the start of a line
_MAX_UNIT = 1 << 20


def _decode_cut(data: bytes, head: bool, tail: bool) -> str:
    """UTF-8 of a piece cut on the byte grid: a character split by a cut (``head``: the piece
    starts at a cut, ``tail``: it ends at one) is dropped (at most 3 bytes at each end);
    anything else invalid raises, with its position in ``data``."""
    skip = 0
    while head and skip < min(3, len(data)) and 0x80 <= data[skip] < 0xC0:
        skip += 1
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        if tail and exc.reason == "unexpected end of data" and exc.end == len(data) - skip:
            return data[skip:skip + exc.start].decode("utf-8")
        raise UnicodeDecodeError("utf-8", data, exc.start + skip, exc.end + skip, exc.reason) from None


# Plain text read whole (tokenised into the cache) comes in chunks of this to twice this many
# characters, cut at a newline or space where possible, so memory stays bounded; each chunk is
# still part of the same document (no EOS between chunks).
CHUNK_CHARS = 1 << 22
_BOM = b"\xef\xbb\xbf"
# Unpaired UTF-16 surrogates: JSON can spell them ("\ud800") but they are not Unicode text and
# cannot be encoded as UTF-8, so no tokenizer can take them.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8_error(path: str, offset: int, reason: str) -> ChameleonUserError:
    """The one error for bytes that are not UTF-8, in any text format."""
    return ChameleonUserError(
        f"file {path!r} is not valid UTF-8 text near byte {offset} ({reason}); convert it to "
        "UTF-8 or remove it from the domain folder")


def line_error(path: str, offset: int, lineno: Optional[int], what: str) -> ChameleonUserError:
    """The one error for a bad JSONL line: the file, the line (its number where the reader
    counted from the start, else its byte offset: a random draw does not count lines) and what
    is wrong."""
    where = f"line {lineno}" if lineno is not None else f"line at byte {offset}"
    return ChameleonUserError(f"file {path!r} {where} {what}")


def jsonl_text(line: bytes, path: str, offset: int, text_field: str, lineno: Optional[int] = None) -> str:
    """The text of one JSONL line (``""`` for a blank line), or the one error for its fault:
    not UTF-8, not JSON, no string ``text_field``, or a lone surrogate escape in it."""
    if offset == 0 and line.startswith(_BOM):
        line = line[len(_BOM):]  # a UTF-8 byte order mark, as some editors write: not part of the JSON
        offset = len(_BOM)
    if not line.strip():
        return ""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise utf8_error(path, offset + exc.start, exc.reason) from None
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as exc:
        raise line_error(path, offset, lineno, f"is not valid JSON ({exc.msg})") from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise line_error(path, offset, lineno, f"cannot be parsed ({exc})") from None
    except RecursionError:
        raise line_error(path, offset, lineno, "is nested too deeply to parse") from None
    text = obj.get(text_field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise line_error(path, offset, lineno, f"has no string {text_field!r} field (choose the text "
                                               "field with text_field / --text-field)")
    bad = _LONE_SURROGATE.search(text)
    if bad:
        raise line_error(path, offset, lineno,
                         f"holds a lone surrogate escape in its text (\\u{ord(bad.group()):04x} at character "
                         f"{bad.start()}), which is not Unicode text; fix or remove that line")
    return text


def _first_bad_utf8(path: str) -> tuple[int, str]:
    """Byte offset and reason of the first invalid UTF-8 in ``path`` (for the error message)."""
    pos, pending = 0, b""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_STREAM_CHUNK), b""):
            data = pending + block
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                if exc.reason != "unexpected end of data" or len(data) - exc.start >= 4:
                    return pos + exc.start, exc.reason
                pending, pos = data[exc.start:], pos + exc.start  # a character cut by the block
                continue
            pending, pos = b"", pos + len(data)
    try:
        pending.decode("utf-8")
    except UnicodeDecodeError as exc:
        return pos + exc.start, exc.reason
    return pos, "invalid UTF-8"


def text_chunks(path: str) -> Iterator[str]:
    """A whole UTF-8 text file in bounded chunks (see :func:`bounded_chunks`)."""
    def blocks():
        try:
            with open(path, "r", encoding="utf-8", newline="") as f:
                for block in iter(lambda: f.read(CHUNK_CHARS), ""):
                    yield block
        except UnicodeDecodeError:
            raise utf8_error(path, *_first_bad_utf8(path)) from None
        except OSError as exc:
            raise ChameleonUserError(f"cannot read file {path!r}: {exc.strerror or exc}") from exc
    return bounded_chunks(blocks())


def bounded_chunks(blocks: Iterator[str]) -> Iterator[str]:
    """Re-cut ``blocks`` into chunks of at most ``2 * CHUNK_CHARS`` characters, each cut after
    a newline where there is one, else after a space, else anywhere (the cut matters only to
    subword tokenizers, which see fewer split words this way). Memory stays bounded even for a
    file, or a JSONL document, with no newline at all."""
    carry = ""
    for block in blocks:
        text = carry + block
        cut = text.rfind("\n") + 1
        if cut == 0 or len(text) - cut > CHUNK_CHARS:
            cut = text.rfind(" ") + 1
            if cut == 0 or len(text) - cut > CHUNK_CHARS:
                cut = len(text)
        carry = text[cut:]
        if cut:
            yield text[:cut]
    if carry:
        yield carry


def _document(text: str) -> Iterator[str]:
    """One JSONL document as bounded pieces (a line is parsed whole, then cut for the tokenizer)."""
    return bounded_chunks(text[i:i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS))


def _numbered(f) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset, line)`` of every line of the binary stream ``f``."""
    pos = 0
    for lineno, line in enumerate(f, 1):
        yield lineno, pos, line
        pos += len(line)


def _jsonl_documents(fmt, numbered) -> Iterator[Iterator[str]]:
    """The documents of numbered JSONL lines, each as bounded pieces (blank lines are none)."""
    for lineno, pos, line in numbered:
        text = fmt.parse(line, pos, lineno=lineno)
        if text:
            yield _document(text)


class _LineFormat:
    """How a line becomes text: a JSONL document (EOS after each) or a line of a text file."""

    def __init__(self, path: str, jsonl: bool, text_field: str):
        self.path, self.jsonl, self.text_field = path, jsonl, text_field

    def parse(self, line: bytes, offset: int, cut: tuple = (False, False), lineno: Optional[int] = None) -> str:
        if self.jsonl:
            return jsonl_text(line, self.path, offset, self.text_field, lineno)
        try:
            return _decode_cut(line, *cut)
        except UnicodeDecodeError as exc:
            raise utf8_error(self.path, offset + exc.start, exc.reason) from None

    def tokens(self, line: bytes, offset: int, last: bool, tok, stats, cut: tuple = (False, False),
               lineno: Optional[int] = None) -> np.ndarray:
        """Tokens of one line; EOS closes a JSONL document and the last line of a text file."""
        text = self.parse(line, offset, cut, lineno)
        ids = encode(tok, text) if text else np.zeros(0, np.int64)
        if (self.jsonl and text) or (not self.jsonl and last):
            ids = np.append(ids, np.int64(tok.eos_id))
        stats.add(len(line), ids.size)
        return ids


class _SeekableLines(Block):
    """A plain text or JSONL file: byte offsets drawn uniformly, each taken to its line."""

    sequential = False

    def __init__(self, path: str, fmt: _LineFormat):
        self.path, self.fmt, self.label = path, fmt, path
        self.weight = file_size(path)

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
        # a text line cut by the grid (not by the file's own start or end) may split a character
        cut = (pos % _MAX_UNIT == 0 and pos > 0, end % _MAX_UNIT == 0 and end < self.weight)
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
                w = Window(window)
                w.key = pos
                first = True
                while unit and not w.full:
                    toks = self._tokens(unit, pos, tok, stats)
                    w.feed(start_at(toks, frac) if first else toks)
                    first, pos = False, pos + len(unit)
                    unit = self._unit(f, pos)
                out.append(w)
        return out

    def documents(self):
        if not self.fmt.jsonl:  # one document, read whole in bounded chunks
            yield text_chunks(self.path)
            return
        with self._open() as f:
            yield from _jsonl_documents(self.fmt, _numbered(f))

    def head(self, n, tok, stats):
        w = Window(n)
        with self._open() as f:
            pos = 0
            unit = self._unit(f, 0)
            while unit and not w.full:
                w.feed(self._tokens(unit, pos, tok, stats))
                pos += len(unit)
                unit = self._unit(f, pos)
        return w.tokens()


class _CompressedLines(Block):
    """A ``.jsonl.gz`` / ``.jsonl.zst`` shard: streamed, as it cannot seek (package docstring)."""

    sequential = True
    rescale_key = "compressed"

    def __init__(self, path: str, fmt: _LineFormat, codec: str):
        self.path, self.fmt, self.codec, self.label = path, fmt, codec, path
        self.weight = file_size(path)

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

    def _lines(self, stats) -> Iterator[tuple[int, int, bytes]]:
        stream, raw = self._stream()
        try:
            with raw, stream:
                yield from _numbered(stream)
        except self._errors() as exc:
            raise self._broken(exc) from None

    def windows(self, rng, k, window, tok, stats):
        stats.blocks_read += 1
        total = self._uncompressed_size()
        stats.measured(self.rescale_key, self.weight, total)
        if total == 0:
            return [Window(window) for _ in range(k)]
        us = rng.integers(0, total, size=k)
        fractions = rng.random(size=k)
        order = np.argsort(us, kind="stable")
        out = [Window(window) for _ in range(k)]
        nxt, active = 0, []
        for lineno, pos, line in self._lines(stats):
            end = pos + len(line)
            starting = []
            while nxt < k and us[order[nxt]] < end:
                starting.append(int(order[nxt]))
                nxt += 1
            if not starting and not active:
                continue
            toks = self.fmt.tokens(line, pos, end >= total, tok, stats, lineno=lineno)
            for i in active:
                out[i].feed(toks)
            for i in starting:
                out[i].key = pos
                frac = (int(us[i]) - pos + fractions[i]) / max(len(line), 1)
                out[i].feed(start_at(toks, frac))
            active = [i for i in active + starting if not out[i].full]
            if nxt >= k and not active:
                break  # nothing left to read from this shard
        return out

    def documents(self):
        yield from _jsonl_documents(self.fmt, self._lines(SampleStats()))

    def head(self, n, tok, stats):
        w = Window(n)
        for lineno, pos, line in self._lines(stats):  # JSONL: every document ends with EOS anyway
            w.feed(self.fmt.tokens(line, pos, False, tok, stats, lineno=lineno))
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
