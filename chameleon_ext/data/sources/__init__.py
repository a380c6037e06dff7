"""Corpus sources: read the formats corpora ship in, at a cost that follows the sample.

A domain folder is turned into one :class:`TokenSources` (pre-tokenised) or one
:class:`TextSources` (raw text) by :func:`detect_sources`. Both draw ``n`` windows of
``window`` tokens with a seeded ``numpy.random.Generator`` and read only what those windows
need, so the time and memory to embed a domain do not grow with the domain.

Formats
-------
Pre-tokenised (random access to tokens, nothing is tokenised):

* nanoGPT: ``train.bin`` (+ ``val.bin``, ``test.bin``) flat token arrays with ``meta.json``
  declaring ``{"dtype": "uint16" | "uint32", "vocab_size": V}`` (both required; one reader,
  :func:`read_nanogpt_meta`, for the dataset and the sources).
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

With ``split="train"`` or ``"val"`` only windows starting in a unit (line, row) of that split are
kept, a unit being in ``val`` when a hash of its file and position falls below ``val_fraction``
(:meth:`TextSources.sample_windows`); the others are redrawn.

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

import os
from typing import List, Optional

from ...errors import ChameleonUserError
from ..layout import list_files
from .columnar import ArrowSource, ParquetSource
from .common import combine_fingerprints, file_fingerprint
from .lines import JsonlSource, PlainTextSource
from .text import SampleStats, TextSource, TextSources
from .tokens import (MEGATRON_DTYPES, NANOGPT_FILES, MegatronSource, NanoGPTBinSource, TokenSource, TokenSources,
                     read_nanogpt_meta)


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
    "combine_fingerprints",
    "MEGATRON_DTYPES",
    "read_nanogpt_meta",
]
_RAW_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow", ".txt", ".text")


def detect_sources(domain_dir: str, text_field: str = "text", max_sequential_blocks: int = 8,
                   files: Optional[List[str]] = None):
    """The sources of one domain folder: a :class:`TokenSources` or a :class:`TextSources`.

    Pre-tokenised: Megatron ``.bin``/``.idx`` pairs, or nanoGPT ``train.bin`` (+ ``val.bin``,
    ``test.bin``) with ``meta.json``; other files there (READMEs, scripts, JSON) are ignored, but raw-text data
    files (``.jsonl*``, ``.parquet``, ``.arrow``, ``.txt``) make it an error. Raw text: every
    other non-hidden file, by suffix (package docstring); ``save_to_disk`` folders are recognised
    by their ``state.json`` (or ``dataset_dict.json``). Hidden files and folders are skipped.
    ``files``: the domain's files (absolute paths) when the caller listed them already; by
    default they are listed by the dataset layout's rules (:func:`~..layout.list_files`).

    Raises:
        ChameleonUserError: missing or empty folder, a domain mixing pre-tokenised and raw
            formats, a ``.bin`` without its ``.idx`` (or meta.json), or a corrupt file.
    """
    domain_dir = os.path.abspath(os.fspath(domain_dir))
    if not os.path.isdir(domain_dir):
        raise ChameleonUserError(f"domain folder {domain_dir!r} does not exist or is not a folder")
    if not isinstance(text_field, str) or not text_field:
        raise ChameleonUserError(f"text_field: expected a non-empty column/field name, got {text_field!r}")
    if files is None:
        files = [full for _, full in list_files(os.path.basename(domain_dir), domain_dir)]
    files = sorted(os.path.abspath(f) for f in files)
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
             or os.path.basename(b) not in NANOGPT_FILES]
    if extra:
        raise ChameleonUserError(
            f"domain {domain_dir!r}: nanoGPT data is train.bin (+ val.bin, test.bin); also found "
            f"{os.path.relpath(extra[0], domain_dir)!r}"
        )
    dtype, vocab = read_nanogpt_meta(domain_dir, f"domain {domain_dir!r}")
    val_path = os.path.join(domain_dir, "val.bin")
    val = NanoGPTBinSource(val_path, dtype) if os.path.isfile(val_path) else None
    return TokenSources([NanoGPTBinSource(os.path.join(domain_dir, "train.bin"), dtype)],
                        val=val, vocab_size=vocab, path=domain_dir)
