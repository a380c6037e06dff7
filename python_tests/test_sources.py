"""Corpus sources (chameleon_ext.data.sources): each reader against files written by the
format's own library (megatron-core's IndexedDatasetBuilder, pyarrow, datasets, gzip,
zstandard), exact window contents against the full tokenisation, the window-start distribution
against the stated approximation, fingerprints, discovery and one-line errors.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct

import numpy as np
import pytest

from chameleon_ext.data.sources import (
    ArrowSource, JsonlSource, MegatronSource, NanoGPTBinSource, ParquetSource, PlainTextSource,
    TextSources, TokenSources, detect_sources, file_fingerprint,
)
from chameleon_ext.data.tokenizer import ByteTokenizer
from chameleon_ext.errors import ChameleonUserError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TOK = ByteTokenizer()
EOS = TOK.eos_id


def _megatron():
    try:
        from megatron.core.datasets import indexed_dataset
    except Exception:  # not installed (or its import needs what is missing here)
        return None
    return indexed_dataset


MEGATRON = _megatron()
needs_megatron = pytest.mark.skipif(MEGATRON is None, reason="megatron-core not installed")


# ----------------------------------------------------------------------------- helpers


def make_docs(n=40, seed=0, lo=1, hi=300):
    """Documents of varied lengths and characters, some multi-byte."""
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghij klmnop\tqrstuvwxyz") + ["é", "ü", "中", "😀"]
    return ["".join(rng.choice(alphabet, size=int(rng.integers(lo, hi)))) + f" doc{i}"
            for i in range(n)]


def reference_stream(docs):
    """Byte tokens of the documents in order, EOS after each: the full tokenisation."""
    parts = []
    for d in docs:
        if d:
            parts.append(np.frombuffer(d.encode("utf-8"), np.uint8).astype(np.int64))
            parts.append(np.array([EOS], np.int64))
    return np.concatenate(parts)


def assert_windows_in_stream(windows, stream):
    """Every window is a contiguous run of the cyclic stream (windows may wrap past its end)."""
    w = windows.shape[1]
    hay = np.concatenate([stream, stream[:w]]).astype(">u2").tobytes()
    for row in windows:
        needle = row.astype(">u2").tobytes()
        pos = hay.find(needle)
        while pos >= 0 and pos % 2:
            pos = hay.find(needle, pos + 1)
        assert pos >= 0, f"window {row[:16]}... is not a run of the full tokenisation"


def write_jsonl(path, docs, field="text", opener=open, extra=None):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            obj = {field: d}
            if extra:
                obj.update(extra(i))
            f.write(json.dumps(obj) + "\n")


def write_zst(path, docs, field="text"):
    """Two frames (a streamed one, then a one-shot one), as concatenated shards have."""
    zstd = pytest.importorskip("zstandard")
    lines = [json.dumps({field: d}) + "\n" for d in docs]
    half = len(lines) // 2
    with open(path, "wb") as f:
        with zstd.ZstdCompressor(level=3).stream_writer(f, closefd=False) as w:
            w.write("".join(lines[:half]).encode())
        f.write(zstd.ZstdCompressor(level=1).compress("".join(lines[half:]).encode()))


def write_megatron_by_spec(prefix, sequences, doc_ends, dtype_code, dtype, modes=None):
    """The .bin/.idx layout written here from the documented format, independently of the
    reader (and of megatron-core), for dtypes and layouts the builder test does not cover."""
    with open(prefix + ".bin", "wb") as f:
        for s in sequences:
            f.write(np.asarray(s, dtype=dtype).tobytes())
    lengths = np.array([len(s) for s in sequences], np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths.astype(np.int64) * np.dtype(dtype).itemsize)[:-1]]) \
        if len(sequences) else np.zeros(0, np.int64)
    docs = np.array([0] + list(doc_ends), np.int64)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code))
        f.write(struct.pack("<Q", len(sequences)) + struct.pack("<Q", len(docs)))
        f.write(lengths.tobytes() + pointers.astype(np.int64).tobytes() + docs.tobytes())
        if modes is not None:
            f.write(np.asarray(modes, np.int8).tobytes())


# ----------------------------------------------------------------------------- Megatron


@needs_megatron
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_megatron_builder_files_read_exactly(tmp_path, dtype):
    import torch

    rng = np.random.default_rng(1)
    prefix = str(tmp_path / "web_text_document")
    builder = MEGATRON.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    seqs = []
    for d in range(7):
        for _ in range(int(rng.integers(1, 4))):  # several sequences per document, some empty
            s = rng.integers(0, 200, size=int(rng.integers(0, 50)))
            seqs.append(s)
            builder.add_item(torch.from_numpy(s))
        builder.end_document()
    builder.finalize(prefix + ".idx")

    src = MegatronSource(prefix)
    assert src.contiguous  # the builder writes sequences back to back: reads are one pread
    theirs = MEGATRON.IndexedDataset(prefix)  # megatron-core's own reader as the reference
    ref = np.concatenate([np.asarray(theirs[i], np.int64) for i in range(len(theirs))])
    assert src.n_tokens == ref.size == sum(s.size for s in seqs)
    assert src.n_documents == len(theirs.document_indices) - 1 == 7
    np.testing.assert_array_equal(src.document_indices, theirs.document_indices)
    np.testing.assert_array_equal(src.read(0, src.n_tokens), ref)
    for start, length in [(0, 1), (3, 60), (src.n_tokens - 5, 5), (17, 0)]:
        np.testing.assert_array_equal(src.read(start, length), ref[start:start + length])
    starts = src.document_token_starts()
    lens = theirs.sequence_lengths
    np.testing.assert_array_equal(starts, np.concatenate([[0], np.cumsum(lens)])[theirs.document_indices])


@needs_megatron
def test_megatron_add_index_merge_and_many_prefixes(tmp_path):
    import torch

    parts = []
    for k in range(2):
        p = str(tmp_path / f"part{k}")
        b = MEGATRON.IndexedDatasetBuilder(p + ".bin", dtype=np.uint16)
        for j in range(3):
            b.add_item(torch.arange(10 * k + j, 10 * k + j + 5 + j))
            b.end_document()
        b.finalize(p + ".idx")
        parts.append(p)
    merged = str(tmp_path / "merged" / "all")
    os.makedirs(os.path.dirname(merged))
    b = MEGATRON.IndexedDatasetBuilder(merged + ".bin", dtype=np.uint16)
    for p in parts:
        b.add_index(p)
    b.finalize(merged + ".idx")
    one = MegatronSource(merged)
    both = TokenSources([MegatronSource(p) for p in parts])
    assert one.n_documents == 6 and both.n_documents == 6
    assert both.n_tokens == one.n_tokens
    # reads across the file boundary equal the merged file's
    for start in range(0, one.n_tokens - 7):
        np.testing.assert_array_equal(both.read(start, 7), one.read(start, 7))


@pytest.mark.parametrize("code,dtype", [(1, np.uint8), (2, np.int8), (3, np.int16), (4, np.int32), (5, np.int64),
                                        (6, np.float64), (7, np.float32), (8, np.uint16)])
def test_megatron_every_dtype_by_spec(tmp_path, code, dtype):
    seqs = [[1, 2, 3], [], [4, 5], [6, 7, 8, 9], [10]]
    prefix = str(tmp_path / "d")
    write_megatron_by_spec(prefix, seqs, [2, 3, 5], code, dtype)
    src = MegatronSource(prefix)
    assert src.dtype == np.dtype(dtype) and src.n_tokens == 10 and src.n_documents == 3
    np.testing.assert_array_equal(src.read(0, 10), np.arange(1, 11))
    np.testing.assert_array_equal(src.read(2, 4), [3, 4, 5, 6])  # across an empty sequence
    np.testing.assert_array_equal(src.document_token_starts(), [0, 3, 5, 10])


def test_megatron_multimodal_modes_and_noncontiguous_pointers(tmp_path):
    prefix = str(tmp_path / "mm")
    write_megatron_by_spec(prefix, [[5, 6], [7]], [1, 2], 8, np.uint16, modes=[0, 1])
    np.testing.assert_array_equal(MegatronSource(prefix).read(0, 3), [5, 6, 7])
    # pointers are honoured: swap the two sequences' places in the .bin, fix the pointers
    with open(prefix + ".bin", "wb") as f:
        f.write(np.array([7, 5, 6], np.uint16).tobytes())
    raw = bytearray(open(prefix + ".idx", "rb").read())
    struct.pack_into("<qq", raw, 34 + 2 * 4, 2, 0)
    open(prefix + ".idx", "wb").write(bytes(raw))
    src = MegatronSource(prefix)
    assert not src.contiguous
    np.testing.assert_array_equal(src.read(0, 3), [5, 6, 7])
    np.testing.assert_array_equal(src.document_token_starts(), [0, 2, 3])


def test_megatron_corrupt_files_one_line_errors(tmp_path):
    prefix = str(tmp_path / "d")
    write_megatron_by_spec(prefix, [[1, 2, 3], [4, 5]], [1, 2], 8, np.uint16)
    idx = open(prefix + ".idx", "rb").read()
    binary = open(prefix + ".bin", "rb").read()
    cases = {
        "truncated idx": (idx[:-3], binary, "truncated or corrupt"),
        "truncated header": (idx[:20], binary, "truncated"),
        "bad magic": (b"NOTANIDX!" + idx[9:], binary, "is not a Megatron index"),
        "bad dtype": (idx[:17] + b"\x09" + idx[18:], binary, "unknown dtype code 9"),
        "short bin": (idx, binary[:-2], "the .bin is truncated"),
    }
    for name, (i, b, msg) in cases.items():
        open(prefix + ".idx", "wb").write(i)
        open(prefix + ".bin", "wb").write(b)
        with pytest.raises(ChameleonUserError, match=msg) as exc:
            MegatronSource(prefix)
        assert "\n" not in str(exc.value) and "d." in str(exc.value), name


def test_megatron_negative_and_fractional_ids_refused(tmp_path):
    prefix = str(tmp_path / "neg")
    write_megatron_by_spec(prefix, [[1, -2]], [1], 3, np.int16)
    with pytest.raises(ChameleonUserError, match="negative token id"):
        MegatronSource(prefix).read(0, 2)
    write_megatron_by_spec(prefix, [[1.5]], [1], 7, np.float32)
    with pytest.raises(ChameleonUserError, match="non-integer"):
        MegatronSource(prefix).read(0, 1)


# ----------------------------------------------------------------------------- nanoGPT


def test_nanogpt_domain_and_window_draws(tmp_path):
    d = tmp_path / "code"
    d.mkdir()
    tokens = np.arange(1000, dtype=np.uint16) % 777
    tokens.tofile(d / "train.bin")
    tokens[:100].tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 777}))
    (d / "README.md").write_text("ignored")
    src = detect_sources(str(d))
    assert isinstance(src, TokenSources) and src.n_tokens == 1000 and src.vocab_size == 777
    assert src.val.n_tokens == 100
    w = src.sample_windows(np.random.default_rng(3), 50, 16)
    # reference: the same generator call the method makes, then plain slicing
    starts = np.random.default_rng(3).integers(0, 1000 - 16 + 1, size=50)
    np.testing.assert_array_equal(w, np.stack([tokens[s:s + 16].astype(np.int64) for s in starts]))
    with pytest.raises(ChameleonUserError, match="shorter than one window"):
        src.sample_windows(np.random.default_rng(0), 1, 1001)


def test_nanogpt_bad_size_and_meta(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ChameleonUserError, match="not a whole number of uint16"):
        NanoGPTBinSource(str(tmp_path / "train.bin"), np.uint16)
    with pytest.raises(ChameleonUserError, match="meta.json"):
        detect_sources(str(tmp_path))


def test_one_nanogpt_meta_reader_for_sources_and_dataset(tmp_path):
    # the sources and the dataset once parsed meta.json apart: one refused test.bin, the other
    # took a missing vocab_size; now both read it alike
    from chameleon_ext.data import load_dataset

    d = tmp_path / "data" / "code"
    d.mkdir(parents=True)
    tokens = np.arange(600, dtype=np.uint16) % 300
    tokens.tofile(d / "train.bin")
    tokens[:50].tofile(d / "test.bin")
    (d / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 300}))
    src = detect_sources(str(d))
    assert src.n_tokens == 600 and src.vocab_size == 300
    ds = load_dataset(tmp_path / "data", val_fraction=0.0)
    assert ds.n_tokens("code", "test") == 50 and ds.vocab_size == 300
    for meta, words in (({"dtype": "uint16"}, "positive integer vocab_size"),
                        ({"dtype": "uint16", "vocab_size": True}, "positive integer vocab_size"),
                        ({"dtype": "uint16", "vocab_size": 70_000}, "does not fit dtype uint16"),
                        ({"dtype": "int8", "vocab_size": 300}, "unknown token dtype 'int8'")):
        (d / "meta.json").write_text(json.dumps(meta))
        for load in (lambda: detect_sources(str(d)), lambda: load_dataset(tmp_path / "data")):
            with pytest.raises(ChameleonUserError, match=words) as ei:
                load()
            assert "meta.json" in str(ei.value) and "code" in str(ei.value)


# ----------------------------------------------------------------------------- raw text formats


def build_domain(tmp_path, fmt, docs, shards=3, field="text"):
    """A domain folder holding ``docs`` in ``fmt``, written by the format's own library."""
    d = tmp_path / fmt.replace(".", "_")
    d.mkdir()
    chunks = [docs[i::shards] for i in range(shards)]  # round robin so order is by shard
    order = [doc for c in chunks for doc in c]
    for k, c in enumerate(chunks):
        base = str(d / f"part-{k:03d}")
        if fmt == "jsonl":
            write_jsonl(base + ".jsonl", c, field)
        elif fmt == "jsonl.gz":
            write_jsonl(base + ".jsonl.gz", c, field, opener=gzip.open)
        elif fmt == "jsonl.zst":
            write_zst(base + ".jsonl.zst", c, field)
        elif fmt == "parquet":
            pq.write_table(pa.table({field: c, "id": list(range(len(c)))}), base + ".parquet", row_group_size=5)
        elif fmt == "text":
            for j, doc in enumerate(c):
                (d / f"part-{k:03d}-{j:03d}.txt").write_text(doc, encoding="utf-8")
    if fmt == "text":
        order = [doc for _, doc in sorted(
            (f"part-{k:03d}-{j:03d}.txt", doc) for k, c in enumerate(chunks) for j, doc in enumerate(c))]
    if fmt == "arrow":
        datasets = pytest.importorskip("datasets")
        ds = datasets.Dataset.from_dict({field: docs, "n": list(range(len(docs)))})
        ds.save_to_disk(str(d / "hf"), num_shards=shards)
        order = docs
    return d, order


RAW_FORMATS = ["text", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow"]


@pytest.mark.parametrize("fmt", RAW_FORMATS)
def test_raw_windows_are_runs_of_the_full_tokenisation(tmp_path, fmt):
    docs = make_docs(40)
    d, order = build_domain(tmp_path, fmt, docs)
    src = detect_sources(str(d))
    assert isinstance(src, TextSources)
    assert {s.format for s in src.sources} == {fmt}
    w = src.sample_windows(np.random.default_rng(7), 64, 48, TOK)
    assert w.shape == (64, 48) and w.dtype == np.int64
    assert_windows_in_stream(w, reference_stream(order))
    # reproducible from the seed; another seed draws other windows
    np.testing.assert_array_equal(w, detect_sources(str(d)).sample_windows(np.random.default_rng(7), 64, 48, TOK))
    assert not np.array_equal(w, src.sample_windows(np.random.default_rng(8), 64, 48, TOK))


@pytest.mark.parametrize("fmt", RAW_FORMATS)
def test_iter_documents_is_the_full_tokenisation(tmp_path, fmt):
    docs = make_docs(25, seed=2)
    d, order = build_domain(tmp_path, fmt, docs)
    got = [np.frombuffer("".join(doc).encode(), np.uint8) for doc in detect_sources(str(d)).iter_documents()]
    stream = np.concatenate([np.append(g.astype(np.int64), EOS) for g in got])
    np.testing.assert_array_equal(stream, reference_stream(order))


@pytest.mark.parametrize("fmt", [f for f in RAW_FORMATS if f != "parquet"])  # Parquet: test below
def test_raw_window_start_distribution_matches_the_stated_approximation(tmp_path, fmt):
    """Window of one token: which document it lands in, against (b_d / B) * k_d / (k_d + 1),
    with b_d the document's bytes as its format weighs it (JSON line for JSONL, text else)."""
    sizes = [3, 40, 7, 120, 1, 60]
    docs = [chr(ord("A") + i) * s for i, s in enumerate(sizes)]
    # one shard for compressed formats: across shards the draw weighs compressed bytes, which
    # these repetitive documents make far from their text bytes (the stated approximation)
    d, order = build_domain(tmp_path, fmt, docs, shards=1 if fmt in ("arrow", "jsonl.gz", "jsonl.zst") else 2)
    src = detect_sources(str(d))
    n = 6000
    w = src.sample_windows(np.random.default_rng(11), n, 1, TOK)[:, 0]
    line = {doc: len(json.dumps({"text": doc}) + "\n") for doc in docs}
    b = np.array([line[doc] if fmt.startswith("jsonl") else len(doc) for doc in docs], np.float64)
    p_doc = b / b.sum()
    k = np.array(sizes, np.float64)
    # JSONL: the start is uniform over the document's tokens (text + EOS) whatever the line's bytes
    expect_letter = p_doc * k / (k + 1)
    for i, doc in enumerate(docs):
        got = np.mean(w == ord(doc[0]))
        sd = np.sqrt(expect_letter[i] * (1 - expect_letter[i]) / n)
        assert abs(got - expect_letter[i]) < 5 * sd + 1e-9, (doc[0], got, expect_letter[i])
    exp_eos = float((p_doc / (k + 1)).sum())
    assert abs(np.mean(w == EOS) - exp_eos) < 5 * np.sqrt(exp_eos * (1 - exp_eos) / n)


def test_parquet_single_row_group_is_exactly_proportional_to_text_bytes(tmp_path):
    """Within a row group rows are drawn by their text bytes (Arrow offsets); across row groups
    by the column's uncompressed size from the metadata, an approximation not tested here."""
    sizes = [5, 50, 9, 200]
    docs = [chr(ord("a") + i) * s for i, s in enumerate(sizes)]
    pq.write_table(pa.table({"body": docs}), str(tmp_path / "x.parquet"))
    src = TextSources([ParquetSource(str(tmp_path / "x.parquet"), text_field="body")])
    n = 5000
    w = src.sample_windows(np.random.default_rng(2), n, 1, TOK)[:, 0]
    k = np.array(sizes, float)
    expect = k / k.sum() * k / (k + 1)
    for i, doc in enumerate(docs):
        got = np.mean(w == ord(doc[0]))
        assert abs(got - expect[i]) < 5 * np.sqrt(expect[i] * (1 - expect[i]) / n) + 1e-9


def test_plain_text_multi_line_file_starts_anywhere(tmp_path):
    """A text file is one document: the start is uniform over its bytes, lines included."""
    text = "ab\n" * 10 + "ccccccccc\n"  # 40 bytes, EOS at the end of the file
    (tmp_path / "f.txt").write_text(text)
    src = TextSources([PlainTextSource(str(tmp_path / "f.txt"))])
    w = src.sample_windows(np.random.default_rng(0), 8000, 1, TOK)[:, 0]
    stream = reference_stream([text])
    assert_windows_in_stream(src.sample_windows(np.random.default_rng(1), 50, 30, TOK), stream)
    # lines drawn by bytes (3 of 40 each, the last 10 of 40), starts uniform over their tokens;
    # only the last line ends the document, so only it carries an EOS (11 tokens)
    expect = {"a": 10 / 40, "b": 10 / 40, "\n": 10 / 40 + (10 / 40) / 11, "c": (10 / 40) * 9 / 11}
    expect_eos = (10 / 40) / 11
    assert abs(sum(expect.values()) + expect_eos - 1) < 1e-12
    for ch, exp in expect.items():
        got = np.mean(w == ord(ch))
        assert abs(got - exp) < 5 * np.sqrt(exp * (1 - exp) / w.size), (ch, got, exp)
    assert abs(np.mean(w == EOS) - expect_eos) < 5 * np.sqrt(expect_eos / w.size)


def test_plain_text_long_lines_are_cut_on_the_grid(tmp_path):
    from chameleon_ext.data.sources import lines as sources

    rng = np.random.default_rng(4)
    text = "".join(rng.choice(list("abcdefgh "), size=int(2.5 * (1 << 20))))  # one 2.5 MiB line
    (tmp_path / "one.txt").write_text(text)
    src = TextSources([PlainTextSource(str(tmp_path / "one.txt"))])
    w = src.sample_windows(np.random.default_rng(0), 40, 64, TOK)
    assert_windows_in_stream(w, reference_stream([text]))
    assert src.last_stats.unit_bytes <= 40 * 2 * (1 << 20)  # at most two grid pieces per draw
    # a multi-byte character split by a cut is dropped, other bytes kept; real errors still raise
    piece = "é中😀x".encode()
    assert sources._decode_cut(piece[1:-1], True, True) == "中😀"
    assert sources._decode_cut(piece[:-2], True, True) == "é中"  # 😀 lost its last byte to the cut
    with pytest.raises(UnicodeDecodeError):
        sources._decode_cut(b"ab\xffcdefgh", True, True)
    # only a real cut drops bytes: a file's own start and end are not cuts, and an invalid byte
    # near a cut is not a split character either
    for bad, head, tail in ((piece[1:], False, True), (piece[:-2], True, False), (b"ab\xff", True, True),
                            (b"ab\xe9 x", True, True)):
        with pytest.raises(UnicodeDecodeError):
            sources._decode_cut(bad, head, tail)


def test_text_field_option_and_hf_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = make_docs(12, seed=3)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": docs}),
                               "test": datasets.Dataset.from_dict({"content": ["zzz"]})})
    dom = tmp_path / "dom"
    dd.save_to_disk(str(dom / "hf"))
    src = detect_sources(str(dom), text_field="content")
    assert [s.format for s in src.sources] == ["arrow"]
    assert_windows_in_stream(src.sample_windows(np.random.default_rng(0), 20, 32, TOK), reference_stream(docs))
    with pytest.raises(ChameleonUserError, match="no column 'text'"):
        detect_sources(str(dom))
    write_jsonl(str(tmp_path / "c.jsonl"), docs, field="body")
    s2 = TextSources([JsonlSource(str(tmp_path / "c.jsonl"), text_field="body")])
    assert_windows_in_stream(s2.sample_windows(np.random.default_rng(0), 20, 32, TOK), reference_stream(docs))


def test_windows_continue_into_the_next_blocks_and_short_domains_fail(tmp_path):
    for k in range(5):  # tiny compressed shards: a window spans several of them
        write_jsonl(str(tmp_path / f"s{k}.jsonl.gz"), [f"shard{k}"], opener=gzip.open)
    src = detect_sources(str(tmp_path))
    order = [f"shard{k}" for k in range(5)]
    w = src.sample_windows(np.random.default_rng(0), 10, 20, TOK)
    assert_windows_in_stream(w, reference_stream(order))
    with pytest.raises(ChameleonUserError, match="shorter than one window"):
        src.sample_windows(np.random.default_rng(0), 1, 200, TOK)


def test_sequential_blocks_read_are_capped(tmp_path):
    docs = make_docs(60, seed=5)
    for k in range(12):
        write_jsonl(str(tmp_path / f"s{k:02d}.jsonl.gz"), docs[k::12], opener=gzip.open)
    src = detect_sources(str(tmp_path), max_sequential_blocks=3)
    w = src.sample_windows(np.random.default_rng(4), 200, 8, TOK)
    assert src.last_stats.blocks_read <= 3
    order = [doc for k in range(12) for doc in docs[k::12]]
    assert_windows_in_stream(w, reference_stream(order))
    # without the cap every shard is touched
    free = detect_sources(str(tmp_path), max_sequential_blocks=100)
    free.sample_windows(np.random.default_rng(4), 200, 8, TOK)
    assert free.last_stats.blocks_read == 12


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow", "text"])
def test_estimated_tokens_close_to_the_exact_count(tmp_path, fmt):
    docs = make_docs(300, seed=9, lo=20, hi=400)
    d, order = build_domain(tmp_path, fmt, docs, shards=4)
    src = detect_sources(str(d))
    src.sample_windows(np.random.default_rng(0), 256, 64, TOK)
    exact = reference_stream(order).size
    assert abs(src.estimated_tokens() - exact) / exact < 0.1


# ----------------------------------------------------------------------------- errors


def test_corrupt_raw_files_one_line_errors(tmp_path):
    docs = make_docs(50, seed=1)
    cases = []
    gz = tmp_path / "a" / "x.jsonl.gz"
    gz.parent.mkdir()
    write_jsonl(str(gz), docs, opener=gzip.open)
    gz.write_bytes(gz.read_bytes()[:-40])
    cases.append((gz.parent, "not a readable gz stream"))
    zst = tmp_path / "b" / "x.jsonl.zst"
    zst.parent.mkdir()
    write_zst(str(zst), docs)
    zst.write_bytes(zst.read_bytes()[:-40])
    cases.append((zst.parent, "not a readable zst stream"))
    garbage = tmp_path / "c" / "x.jsonl.zst"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not zstd at all" * 10)
    cases.append((garbage.parent, "not a readable zst stream"))
    nofield = tmp_path / "d" / "x.jsonl"
    nofield.parent.mkdir()
    write_jsonl(str(nofield), docs, field="content")
    cases.append((nofield.parent, "has no string 'text' field"))
    badjson = tmp_path / "e" / "x.jsonl"
    badjson.parent.mkdir()
    badjson.write_text('{"text": "ok"}\n{"text": broken\n' * 20)
    cases.append((badjson.parent, "not valid JSON"))
    for folder, msg in cases:
        src = detect_sources(str(folder), max_sequential_blocks=1)
        with pytest.raises(ChameleonUserError, match=msg) as exc:
            src.sample_windows(np.random.default_rng(0), 64, 4, TOK)
        assert "\n" not in str(exc.value) and "x.jsonl" in str(exc.value)

    pq.write_table(pa.table({"body": ["a", "b"]}), str(tmp_path / "n.parquet"))
    with pytest.raises(ChameleonUserError, match=r"n.parquet.*has no column 'text'"):
        ParquetSource(str(tmp_path / "n.parquet"))
    pq.write_table(pa.table({"text": [1, 2]}), str(tmp_path / "i.parquet"))
    with pytest.raises(ChameleonUserError, match="expected strings"):
        ParquetSource(str(tmp_path / "i.parquet"))
    (tmp_path / "t.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ChameleonUserError, match="not a readable Parquet file"):
        ParquetSource(str(tmp_path / "t.parquet"))
    (tmp_path / "t.arrow").write_bytes(b"garbage")
    with pytest.raises(ChameleonUserError, match="not a readable Arrow IPC file"):
        ArrowSource(str(tmp_path / "t.arrow"))


# ----------------------------------------------------------------------------- discovery, fingerprints


def test_detect_sources_formats_hidden_and_mixing(tmp_path):
    d = tmp_path / "dom"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    (d / ".hidden" / "x.bin").write_bytes(b"\0\0")
    (d / ".DS_Store").write_bytes(b"\xff\xfe")
    (d / "a.txt").write_text("hello")
    write_jsonl(str(d / "sub" / "b.jsonl.gz"), ["x"], opener=gzip.open)
    pq.write_table(pa.table({"text": ["y"]}), str(d / "c.parquet"))
    src = detect_sources(str(d))
    assert [(os.path.relpath(s.path, d), s.format) for s in src.sources] == [
        ("a.txt", "text"), ("c.parquet", "parquet"), ("sub/b.jsonl.gz", "jsonl.gz")]
    write_megatron_by_spec(str(d / "tok"), [[1, 2]], [1], 8, np.uint16)
    with pytest.raises(ChameleonUserError, match="mixes pre-tokenised files"):
        detect_sources(str(d))
    m = tmp_path / "meg"
    m.mkdir()
    for k in range(2):
        write_megatron_by_spec(str(m / f"p{k}_text_document"), [[k, k + 1]], [1], 8, np.uint16)
    (m / "README.md").write_text("notes")
    src = detect_sources(str(m))
    assert isinstance(src, TokenSources) and src.n_tokens == 4 and src.n_documents == 2
    np.testing.assert_array_equal(src.read(0, 4), [0, 1, 1, 2])
    os.remove(m / "p1_text_document.idx")
    with pytest.raises(ChameleonUserError, match="has no Megatron index"):
        detect_sources(str(m))
    with pytest.raises(ChameleonUserError, match="does not exist"):
        detect_sources(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChameleonUserError, match="is empty"):
        detect_sources(str(tmp_path / "empty"))


def test_file_fingerprint_identity_and_full(tmp_path):
    p = tmp_path / "big.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, size=3 * (1 << 20) + 7, dtype=np.uint8).tobytes())
    p.write_bytes(bytes(data))
    st = os.stat(p)
    fp, full = file_fingerprint(str(p)), file_fingerprint(str(p), full=True)
    assert fp == file_fingerprint(str(p)) and fp != full
    q = tmp_path / "copy.bin"
    shutil.copyfile(p, q)
    assert file_fingerprint(str(q)) != fp  # identity: another path
    assert file_fingerprint(str(q), full=True) == full  # content: the same bytes
    for where in (0, len(data) - 1):  # first and last MiB are hashed: detected even at equal mtime
        changed = bytearray(data)
        changed[where] ^= 1
        p.write_bytes(bytes(changed))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert file_fingerprint(str(p)) != fp
    middle = bytearray(data)
    middle[len(data) // 2] ^= 1
    p.write_bytes(bytes(middle))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_fingerprint(str(p)) == fp  # identity only: a middle edit at equal mtime passes
    assert file_fingerprint(str(p), full=True) != full  # ... which the full check catches
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert file_fingerprint(str(p)) != fp


def test_streamed_split_by_unit_hash(tmp_path):
    """train/val: a JSONL line is in val when blake2b(repr((file#0, line start byte))) / 2**64
    falls below val_fraction (recomputed here); windows of each split start only in its lines."""
    import hashlib

    chars = [chr(c) for c in range(ord("0"), ord("0") + 60)]
    docs = [ch * 40 for ch in chars]
    write_jsonl(str(tmp_path / "part.jsonl"), docs)
    starts = np.cumsum([0] + [len(json.dumps({"text": d}) + "\n") for d in docs])[:-1]

    def coord(pos):
        digest = hashlib.blake2b(repr(("part.jsonl#0", int(pos))).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0 ** 64

    val_chars = {ord(ch) for ch, s in zip(chars, starts) if coord(s) < 0.3}
    assert 5 < len(val_chars) < 35
    src = detect_sources(str(tmp_path))
    val = src.sample_windows(np.random.default_rng(0), 400, 1, TOK, split="val", val_fraction=0.3)[:, 0]
    train = src.sample_windows(np.random.default_rng(0), 400, 1, TOK, split="train", val_fraction=0.3)[:, 0]
    assert set(val.tolist()) - {EOS} <= val_chars and len(set(val.tolist()) & val_chars) > len(val_chars) // 2
    assert not (set(train.tolist()) & val_chars)
    np.testing.assert_array_equal(
        val, src.sample_windows(np.random.default_rng(0), 400, 1, TOK, split="val", val_fraction=0.3)[:, 0])
    # the whole-domain draw is unchanged by the split machinery
    whole = src.sample_windows(np.random.default_rng(5), 50, 20, TOK)
    assert_windows_in_stream(whole, reference_stream(docs))
    with pytest.raises(ChameleonUserError, match="too small"):
        TextSources([JsonlSource(str(tmp_path / "part.jsonl"))]).sample_windows(
            np.random.default_rng(0), 10, 1, TOK, split="val", val_fraction=1e-9)
    with pytest.raises(ChameleonUserError, match="split"):
        src.sample_windows(np.random.default_rng(0), 1, 1, TOK, split="test")
