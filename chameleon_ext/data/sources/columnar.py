"""Columnar raw text: memory-mapped Arrow IPC files (``datasets.save_to_disk``) and Parquet
row groups; rows are drawn through the string column's offsets, never its whole text."""

from __future__ import annotations

import json
import os
from typing import Iterator, List, Optional

import numpy as np

from ...errors import ChameleonUserError
from .text import Block, TextSource, Window, encode, start_at


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
    ids = np.append(encode(tok, text), np.int64(tok.eos_id))
    stats.add(len(text.encode("utf-8")), ids.size)
    return ids


def _row_windows(rows: _Rows, rng, k, window, tok, stats) -> List[Window]:
    us = rng.integers(0, rows.n_bytes, size=k) if rows.n_bytes else np.zeros(k, np.int64)
    fractions = rng.random(size=k)
    out = []
    for u, frac in zip(us, fractions):
        w = Window(window)
        out.append(w)
        if not rows.n_bytes:
            continue
        c, r, within, length = rows.locate(int(u))
        w.key = (c, r)
        first = True
        for text in rows.texts_from(c, r):
            toks = _doc_tokens(text, tok, stats)
            w.feed(start_at(toks, (within + frac) / max(length, 1)) if first else toks)
            first = False
            if w.full:
                break
    return out


def _row_documents(rows: _Rows) -> Iterator[Iterator[str]]:
    for text in rows.texts_from(0, 0):
        if text:
            yield iter((text,))


def _row_head(rows: _Rows, n, tok, stats) -> np.ndarray:
    w = Window(n)
    for text in rows.texts_from(0, 0):
        w.feed(_doc_tokens(text, tok, stats))
        if w.full:
            break
    return w.tokens()


class _ArrowBlock(Block):
    """One memory-mapped Arrow IPC file (``datasets.save_to_disk`` writes the stream format)."""

    sequential = False

    def __init__(self, path: str, text_field: str):
        import pyarrow as pa

        self.path, self.label = path, path
        try:
            source = pa.memory_map(path, "r")  # zero-copy: the rows stay on disk until read
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


class _ParquetRowGroup(Block):
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

    rescale_key = "parquet"

    def windows(self, rng, k, window, tok, stats):
        stats.blocks_read += 1
        rows = self._rows()
        stats.measured(self.rescale_key, self.weight, rows.n_bytes)
        return _row_windows(rows, rng, k, window, tok, stats)

    def head(self, n, tok, stats):
        return _row_head(self._rows(), n, tok, stats)

    def documents(self):
        return _row_documents(self._rows())


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
