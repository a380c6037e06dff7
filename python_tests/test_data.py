"""Data layer: tokenizers, dataset discovery, token caches, splits, windows, errors, builtin."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chameleon_ext.data.sources.lines as lines_mod
import chameleon_ext.data.splits as splits_mod
import chameleon_ext.data.token_cache as cache_mod
from chameleon_ext.data import (
    BUILTIN_DOMAINS,
    ByteTokenizer,
    HFTokenizer,
    builtin_dataset_path,
    load_dataset,
    load_tokenizer,
    write_builtin_dataset,
)
from chameleon_ext.errors import ChameleonUserError

BYTE = ByteTokenizer()
EOS = BYTE.eos_id


# -- helpers ---------------------------------------------------------------------------------


def _write(path, text, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "wb":
        with open(path, "wb") as f:
            f.write(text)
    else:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def _write_bin(folder, train, val=None, dtype="uint16", vocab=50257, meta=True):
    os.makedirs(folder, exist_ok=True)
    np.asarray(train, dtype=dtype).tofile(os.path.join(folder, "train.bin"))
    if val is not None:
        np.asarray(val, dtype=dtype).tofile(os.path.join(folder, "val.bin"))
    if meta:
        _write(os.path.join(folder, "meta.json"), json.dumps({"vocab_size": vocab, "dtype": dtype}))


def _encode_docs(*docs):
    out = []
    for d in docs:
        out += BYTE.encode(d) + [EOS]
    return out


TEXT_DOCS = {  # relpath -> content, for the text domain (sorted relpath order = stream order)
    "a.txt": "alpha beta gamma\nsecond line\n" * 20,
    "b.md": "# Heading\nsome *markdown* text, with unicode: caf\u00e9 \u2013 \u4e2d\u6587\n" * 20,
    "sub/c.py": "def f(x):\n    return x + 1\n" * 20,
}
JSONL_DOCS = ["first json document " * 10, "second one, \"quoted\" " * 10, "third " * 30]


@pytest.fixture
def mixed(tmp_path):
    """A dataset with one text, one jsonl and two pre-tokenised domains."""
    root = tmp_path / "data"
    for rel, text in TEXT_DOCS.items():
        _write(str(root / "prose" / rel), text)
    _write(str(root / "prose" / ".hidden.txt"), "must be skipped")
    _write(str(root / "prose" / ".git" / "x.txt"), "must be skipped too")
    _write(str(root / "jsonl" / "part.jsonl"),
           "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(JSONL_DOCS)) + "\n\n")
    rng = np.random.default_rng(0)
    _write_bin(str(root / "pretok"), rng.integers(0, 257, 1000), rng.integers(0, 257, 300),
               dtype="uint16", vocab=257)
    _write_bin(str(root / "pretok32"), rng.integers(0, 257, 500), dtype="uint32", vocab=257)
    _write(str(root / "pretok" / "README.txt"), "ignored in a pre-tokenised domain")
    _write(str(root / "notes.txt"), "top-level files are not domains")
    return root


# -- tokenizer -------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_byte_tokenizer_roundtrip(text):
    ids = BYTE.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert BYTE.decode(ids) == text
    assert BYTE.decode(ids + [EOS]) == text  # EOS is dropped on decode
    assert np.array_equal(BYTE.encode_array(text), np.asarray(ids, dtype=np.uint8))


def test_byte_tokenizer_constants():
    assert (BYTE.vocab_size, BYTE.eos_id, BYTE.name) == (257, 256, "byte")
    assert BYTE.decode(BYTE.encode("h\u00e9")[:2]) == "h\ufffd"  # cut multi-byte char: no crash


def test_load_tokenizer_specs(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    tok = ByteTokenizer()
    assert load_tokenizer(tok) is tok
    with pytest.raises(ChameleonUserError, match="not a folder"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ChameleonUserError, match="tokenizer"):
        load_tokenizer(123)


def test_hf_tokenizer_without_transformers(tmp_path, monkeypatch):
    # transformers hidden (a None entry makes its import fail), whether or not it is installed
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ChameleonUserError, match="transformers"):
        HFTokenizer(str(tmp_path))


# -- discovery and contents ------------------------------------------------------------------


def test_discovers_text_jsonl_and_bin_domains(mixed):
    ds = load_dataset(mixed, val_fraction=0.0)
    assert ds.domains == ["jsonl", "pretok", "pretok32", "prose"]
    assert [ds.kind(d) for d in ds.domains] == ["text", "bin", "bin", "text"]
    assert ds.vocab_size == 257

    # text: files in sorted relative-path order, recursive, hidden skipped, EOS after each file
    expected = _encode_docs(*(TEXT_DOCS[k] for k in sorted(TEXT_DOCS)))
    assert np.array_equal(ds.train_tokens("prose"), expected)
    # jsonl: one document per non-blank line, extra fields ignored
    assert np.array_equal(ds.train_tokens("jsonl"), _encode_docs(*JSONL_DOCS))
    # bin with val.bin: used as given; uint32 bins read with their dtype
    rng = np.random.default_rng(0)
    tr, va, tr32 = rng.integers(0, 257, 1000), rng.integers(0, 257, 300), rng.integers(0, 257, 500)
    assert np.array_equal(ds.train_tokens("pretok"), tr)
    assert np.array_equal(ds.val_tokens("pretok"), va)
    assert ds.train_tokens("pretok32").dtype == np.uint32
    assert np.array_equal(ds.train_tokens("pretok32"), tr32)
    assert isinstance(ds.train_tokens("prose"), np.memmap)


def _expected_split(full: np.ndarray, f: float):
    """Independent re-statement of the documented rule: blocks of
    b = max(1, min(max(4096, ceil(n / 1024)), floor(n f / 32))) tokens; block i is held out
    when floor((i + 1) f + 1/2) > floor(i f + 1/2); each split concatenates its blocks."""
    n = len(full)
    b = max(1, min(max(4096, math.ceil(n / 1024)), int(n * f / 32)))
    blocks = [full[i:i + b] for i in range(0, n, b)]
    held = [math.floor((i + 1) * f + 0.5) > math.floor(i * f + 0.5) for i in range(len(blocks))]
    train = np.concatenate([x for x, h in zip(blocks, held) if not h])
    val = np.concatenate([x for x, h in zip(blocks, held) if h] or [full[:0]])
    return train, val


def test_split_holds_out_blocks_spread_over_the_stream(mixed):
    ds = load_dataset(mixed, val_fraction=0.2)
    ds0 = load_dataset(mixed, val_fraction=0.0)
    for name in ("prose", "jsonl", "pretok32"):
        full = np.asarray(ds0.train_tokens(name))
        tr, va = ds.train_tokens(name), ds.val_tokens(name)
        exp_tr, exp_va = _expected_split(full, 0.2)
        assert np.array_equal(np.asarray(tr), exp_tr) and np.array_equal(np.asarray(va), exp_va)
        assert tr.shape[0] + va.shape[0] == len(full) and va.shape[0] > 0
        # a window is a contiguous run of the split, also where it crosses the seam of two runs
        for s in range(0, tr.shape[0] - 16 + 1, 7):
            assert np.array_equal(ds.windows_at(name, np.array([s]), 16)[0], exp_tr[s:s + 16])
    again = load_dataset(mixed, val_fraction=0.2)
    assert np.array_equal(np.asarray(again.val_tokens("prose")), np.asarray(ds.val_tokens("prose")))
    # val.bin, when present, wins over val_fraction, and train.bin is used whole
    assert ds.val_tokens("pretok").shape[0] == 300 and ds.train_tokens("pretok").shape[0] == 1000


@pytest.mark.parametrize("n, f", [(100_000, 0.1), (123_457, 0.05), (5_000, 0.1), (37, 0.2)])
def test_every_part_of_the_stream_is_in_both_splits(tmp_path, n, f):
    # token value = its position in the stream, so each split says where it came from
    _write_bin(str(tmp_path / "d" / "pos"), np.arange(n), dtype="uint32", vocab=n)
    ds = load_dataset(tmp_path / "d", val_fraction=f)
    tr, va = np.asarray(ds.train_tokens("pos")), np.asarray(ds.val_tokens("pos"))
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(n))  # a partition
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)  # stream order kept
    b = max(1, min(max(4096, math.ceil(n / 1024)), int(n * f / 32)))
    assert abs(len(va) - f * n) <= b  # the held-out share is f, to one block
    parts = 10 if n > 1000 else 2
    for p in range(parts):  # each tenth of the stream (the last files too) is in both splits
        lo, hi = p * n // parts, (p + 1) * n // parts
        in_val = np.count_nonzero((va >= lo) & (va < hi))
        assert in_val > 0 and np.count_nonzero((tr >= lo) & (tr < hi)) > 0
        if n > 1000:
            assert abs(in_val / (hi - lo) - f) <= 2 * b / (hi - lo)


def test_split_block_size_for_large_streams():
    for n in (10**7, 10**9, 3 * 10**10 + 7):
        block, held = splits_mod.split_parts(n, 0.1)
        assert block == max(4096, -(-n // 1024)) and held.shape[0] == -(-n // block) <= 1024
        assert held.sum() == round(held.shape[0] * 0.1)
        gaps = np.diff(np.flatnonzero(held))
        assert gaps.min() == gaps.max() == 10  # evenly spread
    assert not splits_mod.split_parts(1000, 0.0)[1].any()


def test_windows(mixed):
    ds = load_dataset(mixed)
    w1 = ds.sample_windows("prose", 5, 16, np.random.default_rng(3))
    w2 = ds.sample_windows("prose", 5, 16, np.random.default_rng(3))
    assert w1.shape == (5, 16) and w1.dtype == np.int64
    assert np.array_equal(w1, w2)
    # each window is a contiguous run of the train tokens (starts over all full windows)
    tr = np.asarray(ds.train_tokens("prose"))
    starts = np.random.default_rng(3).integers(0, tr.shape[0] - 16 + 1, size=5)
    for w, s in zip(w1, starts):
        assert np.array_equal(w, tr[s:s + 16])
    one = ds.sample_window("pretok", 8, np.random.default_rng(0), split="val")
    assert one.shape == (8,)
    # a window as long as the whole split is allowed
    n = ds.n_tokens("pretok32")
    assert np.array_equal(ds.sample_window("pretok32", n, np.random.default_rng(0)),
                          ds.train_tokens("pretok32"))


# -- cache and fingerprints ------------------------------------------------------------------


def test_cache_reuse_and_fingerprints(mixed, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    ds1 = load_dataset(mixed, cache_dir=cache)
    fps = {d: ds1.fingerprint(d) for d in ds1.domains}
    assert all(len(f) == 64 and int(f, 16) >= 0 for f in fps.values())
    assert len(set(fps.values())) == len(fps)

    # second load: nothing is re-tokenised and nothing is even re-hashed
    def boom(*a, **k):
        raise AssertionError("re-tokenised or re-hashed an unchanged domain")

    with monkeypatch.context() as m:
        m.setattr(cache_mod, "tokenise_domain", boom)
        m.setattr(cache_mod, "content_fingerprint", boom)
        ds2 = load_dataset(mixed, cache_dir=cache)
        assert {d: ds2.fingerprint(d) for d in ds2.domains} == fps
        assert np.array_equal(ds2.train_tokens("prose"), ds1.train_tokens("prose"))

    # touching a file (same content): re-hashed but not re-tokenised, same fingerprint
    p = mixed / "prose" / "a.txt"
    st_ = os.stat(p)
    os.utime(p, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10_000_000_000))
    with monkeypatch.context() as m:
        m.setattr(cache_mod, "tokenise_domain", boom)
        assert load_dataset(mixed, cache_dir=cache).fingerprint("prose") == fps["prose"]

    # changing a file changes only that domain's fingerprint, and only it is re-tokenised
    calls = []
    real = cache_mod.tokenise_domain

    def spy(name, *a, **k):
        calls.append(name)
        return real(name, *a, **k)

    _write(str(mixed / "jsonl" / "part.jsonl"), json.dumps({"text": "changed"}) + "\n")
    monkeypatch.setattr(cache_mod, "tokenise_domain", spy)
    ds3 = load_dataset(mixed, cache_dir=cache)
    assert calls == ["jsonl"]
    new = {d: ds3.fingerprint(d) for d in ds3.domains}
    assert new["jsonl"] != fps["jsonl"]
    assert {d: f for d, f in new.items() if d != "jsonl"} == {d: f for d, f in fps.items() if d != "jsonl"}
    expected_train = _expected_split(np.array(_encode_docs("changed")), ds3.val_fraction)[0]
    assert np.array_equal(np.asarray(ds3.train_tokens("jsonl")), expected_train)


def test_default_cache_dir_and_fingerprint_depends_on_tokenizer(mixed):
    ds = load_dataset(mixed)
    assert ds.cache_dir == os.path.join(str(mixed), ".chameleon_cache")
    assert os.path.isdir(ds.cache_dir)
    assert ".chameleon_cache" not in ds.domains

    class Shifted(ByteTokenizer):  # a different tokenizer: bytes shifted by one, EOS = 0
        name = "byte-shift"
        eos_id = 0

        def encode_array(self, text):
            return super().encode_array(text).astype(np.int64) + 1

    ds2 = load_dataset(mixed, tokenizer=Shifted(), cache_dir=str(mixed / ".other_cache"))
    assert ds2.domains == ds.domains  # a hidden cache_dir inside the data folder is not a domain
    assert ds2.fingerprint("prose") != ds.fingerprint("prose")
    assert int(ds2.train_tokens("prose")[0]) == int(ds.train_tokens("prose")[0]) + 1


def test_fingerprint_is_content_based(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        _write(str(root / "d" / "x.txt"), "same content\n")
    assert load_dataset(a).fingerprint("d") == load_dataset(b).fingerprint("d")


def test_large_file_streams_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(lines_mod, "CHUNK_CHARS", 64)  # force many chunks
    text = "".join(f"line {i} with some words\n" for i in range(200))
    _write(str(tmp_path / "d" / "dom" / "big.txt"), text)
    ds = load_dataset(tmp_path / "d", val_fraction=0)
    assert np.array_equal(ds.train_tokens("dom"), _encode_docs(text))  # one document, one EOS


# -- token cache integrity -------------------------------------------------------------------


def _text_dataset(root, docs=None):
    docs = docs or {"a.txt": "alpha beta gamma\n" * 40, "b.txt": "delta epsilon\n" * 40}
    for rel, text in docs.items():
        _write(str(root / "dom" / rel), text)
    return _encode_docs(*(docs[k] for k in sorted(docs)))


def _entry(ds, name="dom"):
    tpath = ds._domains[name].cache_path
    with open(tpath + ".json") as f:
        return tpath, json.load(f)


def test_token_cache_records_hash_and_true_max(tmp_path):
    expected = _text_dataset(tmp_path / "d")
    ds = load_dataset(tmp_path / "d", val_fraction=0)
    tpath, meta = _entry(ds)
    on_disk = np.fromfile(tpath, dtype=np.uint16)
    assert np.array_equal(on_disk, expected)
    assert meta["max_id"] == int(np.max(expected)) == EOS  # independent: the reference stream
    assert meta["n_tokens"] == len(expected)
    import hashlib
    with open(tpath, "rb") as f:
        raw = f.read()
    assert meta["sha256"] == hashlib.sha256(raw).hexdigest()
    bs = meta["block_size"]
    assert meta["blocks"] == [hashlib.sha256(raw[i:i + bs]).hexdigest()[:32] for i in range(0, len(raw), bs)]
    assert ds.verify() == []


def test_same_size_garbage_in_token_cache_is_rebuilt(tmp_path):
    expected = _text_dataset(tmp_path / "d")
    tpath, _ = _entry(load_dataset(tmp_path / "d", val_fraction=0))
    size = os.path.getsize(tpath)
    with open(tpath, "r+b") as f:
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    with pytest.warns(UserWarning, match="damaged") as record:
        ds = load_dataset(tmp_path / "d", val_fraction=0)
    assert len(record) == 1 and tpath in str(record[0].message) and record[0].filename == __file__
    assert np.array_equal(ds.train_tokens("dom"), expected)
    assert np.array_equal(np.fromfile(tpath, dtype=np.uint16), expected)


def test_uint32_token_cache_hashes_and_max(tmp_path, monkeypatch):
    class Wide(ByteTokenizer):  # a vocabulary too big for uint16: ids are bytes + 65536
        name, vocab_size, eos_id = "wide", 70_000, 69_999

        def encode_array(self, text):
            return super().encode_array(text).astype(np.int64) + 65536

    monkeypatch.setattr(cache_mod, "_HASH_BLOCK", 64)  # several blocks
    _write(str(tmp_path / "d" / "dom" / "a.txt"), "wide ids\n" * 30)
    ds = load_dataset(tmp_path / "d", tokenizer=Wide(), val_fraction=0)
    ref = np.asarray(list(("wide ids\n" * 30).encode()), dtype=np.int64) + 65536
    ref = np.append(ref, 69_999)
    assert ds.train_tokens("dom").dtype == np.uint32
    assert np.array_equal(ds.train_tokens("dom"), ref)
    tpath, meta = _entry(ds)
    assert meta["dtype"] == "uint32" and meta["max_id"] == 69_999 and len(meta["blocks"]) > 2
    ds.check_vocab(70_000)
    _expect_error("vocabulary mismatch", lambda: ds.check_vocab(69_999), "69999")
    assert ds.verify() == []


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of 64 bytes and no random samples: only the first and last block are checked on
    load, so damage in the middle passes the cheap check (as it may in a large file)."""
    monkeypatch.setattr(cache_mod, "_HASH_BLOCK", 64)
    monkeypatch.setattr(cache_mod, "_SAMPLE_BLOCKS", 0)


def _poke(tpath, index, value):
    arr = np.memmap(tpath, dtype=np.uint16, mode="r+")
    arr[index] = value
    arr.flush()
    del arr


def test_id_beyond_vocab_in_unsampled_block(tmp_path, tiny_blocks):
    expected = _text_dataset(tmp_path / "d")
    tpath, meta = _entry(load_dataset(tmp_path / "d", val_fraction=0))
    assert len(meta["blocks"]) > 10
    mid = len(expected) // 2
    _poke(tpath, mid, 300)  # beyond the byte vocabulary of 257

    ds = load_dataset(tmp_path / "d", val_fraction=0)  # the sampled check misses it
    assert int(ds.train_tokens("dom")[mid]) == 300
    # windows never hand it to the model: one line naming the domain and the cache file
    e = _expect_error("beyond the vocabulary", lambda: ds.windows_at("dom", [mid - 3], 8),
                      "'dom'", "300", tpath)
    assert "\n" not in str(e)
    # check_vocab scans the true maximum, finds the record wrong, and rebuilds the entry
    with pytest.warns(UserWarning, match="damaged"):
        ds.check_vocab(257)
    assert np.array_equal(ds.train_tokens("dom"), expected)
    assert np.array_equal(np.fromfile(tpath, dtype=np.uint16), expected)


def test_full_verify_finds_in_vocab_damage(tmp_path, tiny_blocks):
    expected = _text_dataset(tmp_path / "d")
    tpath, _ = _entry(load_dataset(tmp_path / "d", val_fraction=0))
    _poke(tpath, len(expected) // 2, ord("Z"))  # a valid id: only the hashes can tell
    ds = load_dataset(tmp_path / "d", val_fraction=0)
    assert not np.array_equal(ds.train_tokens("dom"), expected)
    ds.check_vocab(257)  # the max is unchanged, so this does not notice (by design)
    with pytest.warns(UserWarning, match="block .* does not match"):
        assert ds.verify() == ["dom"]
    assert np.array_equal(ds.train_tokens("dom"), expected)

    _poke(tpath, len(expected) // 3, ord("Z"))
    with pytest.warns(UserWarning, match="damaged"):
        ds = load_dataset(tmp_path / "d", val_fraction=0, verify="full")
    assert np.array_equal(ds.train_tokens("dom"), expected)
    _expect_error("verify", lambda: load_dataset(tmp_path / "d", verify="fast"), "'fast'")


def test_damaged_cache_metadata_is_rebuilt(tmp_path):
    expected = _text_dataset(tmp_path / "d")
    tpath, meta = _entry(load_dataset(tmp_path / "d", val_fraction=0))
    for bad in ({**meta, "max_id": 10**6}, {**meta, "n_tokens": meta["n_tokens"] + 1},
                {**meta, "blocks": []}, "not an object", None):
        _write(tpath + ".json", "{broken" if bad is None else json.dumps(bad))
        with pytest.warns(UserWarning, match="damaged"):
            ds = load_dataset(tmp_path / "d", val_fraction=0)
        assert np.array_equal(ds.train_tokens("dom"), expected)


def test_cache_entry_replaced_by_folder(tmp_path):
    _text_dataset(tmp_path / "d")
    tpath, _ = _entry(load_dataset(tmp_path / "d"))
    os.unlink(tpath)
    os.mkdir(tpath)
    with pytest.warns(UserWarning, match="is a folder"):
        e = _expect_error("it is a folder", lambda: load_dataset(tmp_path / "d"), tpath)
    assert "\n" not in str(e)
    os.rmdir(tpath)
    with pytest.warns(UserWarning, match="damaged"):  # metadata without its token file
        assert load_dataset(tmp_path / "d").domains == ["dom"]  # removing the folder is enough
    # the metadata replaced by a folder: reported the same way
    os.unlink(tpath + ".json")
    os.mkdir(tpath + ".json")
    with pytest.warns(UserWarning, match="metadata is unreadable"):
        e = _expect_error("it is a folder", lambda: load_dataset(tmp_path / "d"), tpath + ".json")
    assert "\n" not in str(e)
    os.rmdir(tpath + ".json")
    # an index entry replaced by a folder only costs a re-hash: the index is a hint
    load_dataset(tmp_path / "d")
    index = tmp_path / "d" / ".chameleon_cache" / "index"
    for f in os.listdir(index):
        os.unlink(index / f)
        os.mkdir(index / f)
    ds = load_dataset(tmp_path / "d", val_fraction=0)
    assert np.array_equal(ds.train_tokens("dom"), _encode_docs("alpha beta gamma\n" * 40, "delta epsilon\n" * 40))


# -- symlinks and the cache's place -----------------------------------------------------------


def test_symlink_loop_and_duplicate_links_read_once(tmp_path):
    expected = _text_dataset(tmp_path / "d")
    dom = tmp_path / "d" / "dom"
    os.symlink(".", dom / "loop")            # dom/loop -> dom: a cycle
    os.symlink("a.txt", dom / "c_alias.txt")  # a second name for a file already read
    os.mkdir(dom / "sub")
    os.symlink("..", dom / "sub" / "up")      # a cycle two levels deep
    _write(str(dom / "sub" / "z.txt"), "zeta\n")
    ds = load_dataset(tmp_path / "d", val_fraction=0)
    docs = {"a.txt": "alpha beta gamma\n" * 40, "b.txt": "delta epsilon\n" * 40, "sub/z.txt": "zeta\n"}
    assert np.array_equal(ds.train_tokens("dom"), _encode_docs(*(docs[k] for k in sorted(docs))))
    assert [r for r, _ in ds._domains["dom"].files] == ["a.txt", "b.txt", "sub/z.txt"]
    assert len(expected) < ds.n_tokens("dom")


def test_cache_dir_inside_the_data_tree_is_refused(tmp_path):
    _text_dataset(tmp_path / "d")
    _write(str(tmp_path / "d" / "web" / "x.txt"), "web text\n")
    d = tmp_path / "d"
    for cache, names in ((d, ["is the data folder itself"]),
                         (d / "web", ["inside domain 'web'"]),
                         (d / "web" / "cache", ["inside domain 'web'"]),
                         (d / "new_cache", ["read as a domain named 'new_cache'"])):
        e = _expect_error("cache_dir", lambda: load_dataset(d, cache_dir=cache), str(cache), *names)
        assert "\n" not in str(e)
    assert not os.path.exists(d / "new_cache") and not os.path.exists(d / "index")
    assert not os.path.exists(d / ".chameleon_cache")  # refused before any work
    # the default hidden cache, another hidden folder and an outside folder all work
    for cache in (None, d / ".mine", tmp_path / "outside", d / "web" / ".cache"):
        ds = load_dataset(d, cache_dir=cache, val_fraction=0)
        assert ds.domains == ["dom", "web"]
        assert np.array_equal(ds.train_tokens("web"), _encode_docs("web text\n"))
    # a link inside a domain that leads to the cache is not followed into it
    os.symlink(tmp_path / "outside", d / "web" / "to_cache")
    ds = load_dataset(d, cache_dir=tmp_path / "outside", val_fraction=0)
    assert np.array_equal(ds.train_tokens("web"), _encode_docs("web text\n"))
    os.unlink(d / "web" / "to_cache")
    # a cache reached through a link to it: refused as inside the domain the link is in
    os.symlink(d / "web", tmp_path / "web_link")
    _expect_error("inside domain 'web'", lambda: load_dataset(d, cache_dir=tmp_path / "web_link" / "c"))


def test_empty_paths_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _text_dataset(tmp_path)  # the current folder is a valid dataset: "" must not mean it
    _expect_error("data folder: expected a folder path, got an empty string", lambda: load_dataset(""))
    _expect_error("cache_dir: expected a folder path", lambda: load_dataset(".", cache_dir=""))
    _expect_error("data folder", lambda: load_dataset(None))
    _expect_error("cache_dir: expected a folder path, got int", lambda: load_dataset(".", cache_dir=5))


def test_fingerprint_is_cheap_and_stable(tmp_path, monkeypatch):
    _text_dataset(tmp_path / "d")
    _write_bin(str(tmp_path / "d" / "bin"), [1, 2, 3, 4], vocab=257)
    ds = load_dataset(tmp_path / "d")
    fps = {n: ds.fingerprint(n) for n in ds.domains}
    calls = []
    real = cache_mod.content_fingerprint
    monkeypatch.setattr(cache_mod, "content_fingerprint", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = load_dataset(tmp_path / "d")
    assert {n: again.fingerprint(n) for n in again.domains} == fps
    assert {n: again.fingerprint(n) for n in again.domains} == fps
    assert calls == []  # unchanged files: no file is read to fingerprint them
    # a changed domain says so
    _write(str(tmp_path / "d" / "dom" / "b.txt"), "changed\n")
    assert load_dataset(tmp_path / "d").fingerprint("dom") != fps["dom"]


# -- streaming and odd text ------------------------------------------------------------------


def test_jsonl_lone_surrogate_is_one_line_error(tmp_path):
    _write(str(tmp_path / "d" / "web" / "x.jsonl"), '{"text": "ok"}\n{"text": "bad \\ud800 here"}\n')
    e = _expect_error("lone surrogate", lambda: load_dataset(tmp_path / "d"), "'web'", "x.jsonl",
                      "line 2", "\\ud800")
    assert "\n" not in str(e)
    # a surrogate *pair* is one valid character
    _write(str(tmp_path / "d" / "web" / "x.jsonl"), '{"text": "ok \\ud83d\\ude00"}\n')
    ds = load_dataset(tmp_path / "d", val_fraction=0)
    assert np.array_equal(ds.train_tokens("web"), _encode_docs("ok \U0001F600"))


@pytest.mark.parametrize("text", ["x" * 1000, ("word " * 300), "ab\ncd " * 150 + "e" * 700])
def test_chunks_without_newlines_are_exact_and_bounded(tmp_path, monkeypatch, text):
    monkeypatch.setattr(lines_mod, "CHUNK_CHARS", 64)
    chunks = []
    real = cache_mod.encode
    monkeypatch.setattr(cache_mod, "encode", lambda tok, c, **k: chunks.append(len(c)) or real(tok, c, **k))
    _write(str(tmp_path / "d" / "dom" / "big.txt"), text)
    ds = load_dataset(tmp_path / "d", val_fraction=0)
    assert np.array_equal(ds.train_tokens("dom"), _encode_docs(text))
    assert max(chunks) <= 2 * 64 and sum(chunks) == len(text)


def test_windows_at_checks_starts_and_memory(mixed):
    ds = load_dataset(mixed, val_fraction=0)
    n = ds.n_tokens("prose")
    tr = np.asarray(ds.train_tokens("prose"))
    w = ds.windows_at("prose", [0, n - 8], 8)
    assert np.array_equal(w, np.stack([tr[:8], tr[n - 8:]]))
    for bad in ([-1], [n - 7], [0, n]):
        e = _expect_error("starts", lambda: ds.windows_at("prose", bad, 8), "'prose'", str(n - 8))
        assert "\n" not in e.args[0]
    e = _expect_error("GiB", lambda: ds.sample_windows("prose", 1 << 40, 8, np.random.default_rng(0)),
                      "'prose'", "fewer")
    assert ds.windows_at("prose", np.zeros(0, dtype=np.int64), 8).shape == (0, 8)
    for bad in (3.7, -1, "2", True):
        _expect_error("window count", lambda: ds.sample_windows("prose", bad, 8, np.random.default_rng(0)))


def test_deeply_nested_jsonl_and_cache_dir_that_is_a_file(tmp_path):
    _write(str(tmp_path / "d" / "web" / "x.jsonl"), "[" * 100_000 + "]" * 100_000 + "\n")
    e = _expect_error("line 1", lambda: load_dataset(tmp_path / "d"), "x.jsonl")
    assert "\n" not in str(e)
    _write(str(tmp_path / "e" / "web" / "x.txt"), "hello\n")
    _write(str(tmp_path / "cachefile"), "not a folder")
    e = _expect_error("cache_dir", lambda: load_dataset(tmp_path / "e", cache_dir=tmp_path / "cachefile"),
                      "cachefile", "existing file")
    assert "\n" not in str(e)


def test_broken_links_are_named_not_skipped(tmp_path):
    _text_dataset(tmp_path / "d")
    d = tmp_path / "d"
    os.symlink(tmp_path / "gone", d / "web")  # a domain that points nowhere
    e = _expect_error("broken link", lambda: load_dataset(d), "'web'", "gone")
    assert "\n" not in str(e)
    os.unlink(d / "web")
    os.symlink("b_loop", d / "a_loop")
    os.symlink("a_loop", d / "b_loop")  # a loop of links
    _expect_error("broken link", lambda: load_dataset(d), "'a_loop'")
    os.unlink(d / "a_loop"), os.unlink(d / "b_loop")
    os.symlink(tmp_path / "gone.txt", d / "dom" / "stale.txt")  # a file that points nowhere
    _expect_error("broken link", lambda: load_dataset(d), "'dom'", "stale.txt")
    os.unlink(d / "dom" / "stale.txt")
    os.symlink(tmp_path / "gone.txt", d / "dom" / ".hidden_stale")  # hidden: skipped as ever
    _write_bin(str(d / "gpt"), [1, 2], vocab=257)
    os.unlink(d / "gpt" / "train.bin")
    os.symlink(tmp_path / "gone.bin", d / "gpt" / "train.bin")
    _expect_error("broken link", lambda: load_dataset(d), "'gpt'", "train.bin")


def test_odd_jsonl_lines(tmp_path):
    _write(str(tmp_path / "d" / "web" / "x.jsonl"), '\ufeff{"text": "bom"}\n{"text": "two"}\n')
    ds = load_dataset(tmp_path / "d", val_fraction=0)  # a byte order mark is not an error
    assert np.array_equal(ds.train_tokens("web"), _encode_docs("bom", "two"))
    _write(str(tmp_path / "e" / "web" / "x.jsonl"), '{"text": "a"}\n{"text": "b", "n": ' + "9" * 5000 + "}\n")
    e = _expect_error("line 2", lambda: load_dataset(tmp_path / "e"), "x.jsonl")
    assert "\n" not in str(e)
    _write(str(tmp_path / "f" / "web" / "x.jsonl"), '{"text": "a"}\n\ufeff{"text": "b"}\n')
    _expect_error("line 2 is not valid JSON", lambda: load_dataset(tmp_path / "f"))  # only line 1


def test_corrupted_bin_metadata(tmp_path):
    _write_bin(str(tmp_path / "a" / "gpt"), [1, 2, 3])
    _write(str(tmp_path / "a" / "gpt" / "meta.json"), "{not json")
    e = _expect_error("not valid JSON", lambda: load_dataset(tmp_path / "a"), "'gpt'", "meta.json")
    assert "\n" not in str(e)
    for vocab in ("50257", 0, -5, 1.5, True, 1 << 17):
        _write(str(tmp_path / "a" / "gpt" / "meta.json"), json.dumps({"vocab_size": vocab, "dtype": "uint16"}))
        e = _expect_error("vocab_size", lambda: load_dataset(tmp_path / "a"), "'gpt'", "meta.json")
        assert "\n" not in str(e)
    _write(str(tmp_path / "a" / "gpt" / "meta.json"), json.dumps({"vocab_size": 257, "dtype": ["uint16"]}))
    _expect_error("unknown token dtype", lambda: load_dataset(tmp_path / "a"), "meta.json")
    _write(str(tmp_path / "a" / "gpt" / "meta.json"), "[1, 2]")
    _expect_error("JSON object", lambda: load_dataset(tmp_path / "a"), "meta.json")
    os.unlink(tmp_path / "a" / "gpt" / "train.bin")
    os.mkdir(tmp_path / "a" / "gpt" / "train.bin")
    _write(str(tmp_path / "a" / "gpt" / "meta.json"), json.dumps({"vocab_size": 257, "dtype": "uint16"}))
    _expect_error("is a folder", lambda: load_dataset(tmp_path / "a"), "train.bin")


# -- errors ----------------------------------------------------------------------------------


def _expect_error(match, fn, *names):
    with pytest.raises(ChameleonUserError, match=match) as ei:
        fn()
    for n in names:
        assert n in str(ei.value), (n, str(ei.value))
    return ei.value


def test_missing_and_empty_data_folder(tmp_path):
    _expect_error("does not exist", lambda: load_dataset(tmp_path / "missing"), "missing")
    (tmp_path / "empty").mkdir()
    _expect_error("no domain subfolders", lambda: load_dataset(tmp_path / "empty"), "empty")
    (tmp_path / "file").write_text("x")
    _expect_error("not a folder", lambda: load_dataset(tmp_path / "file"))


def test_empty_domain(tmp_path):
    _write(str(tmp_path / "d" / "ok" / "a.txt"), "hello " * 50)
    (tmp_path / "d" / "void").mkdir()
    _write(str(tmp_path / "d" / "void" / ".hidden"), "ignored")
    _expect_error("empty", lambda: load_dataset(tmp_path / "d"), "'void'")
    # files that hold no text also make an empty domain
    _write(str(tmp_path / "e" / "blank" / "a.txt"), "")
    _write(str(tmp_path / "e" / "blank" / "b.jsonl"), "\n\n")
    _expect_error("empty", lambda: load_dataset(tmp_path / "e"), "'blank'")
    _write_bin(str(tmp_path / "f" / "zero"), [], dtype="uint16", vocab=257)
    _expect_error("empty", lambda: load_dataset(tmp_path / "f"), "'zero'", "train.bin")


def test_non_utf8_and_bad_jsonl(tmp_path):
    _write(str(tmp_path / "d" / "latin" / "good.txt"), "fine")
    _write(str(tmp_path / "d" / "latin" / "bad.txt"), "caf\xe9".encode("latin-1"), mode="wb")
    _expect_error("UTF-8", lambda: load_dataset(tmp_path / "d"), "'latin'", "bad.txt")

    _write(str(tmp_path / "j" / "web" / "x.jsonl"), '{"text": "ok"}\n{"body": "no text"}\n')
    _expect_error("text", lambda: load_dataset(tmp_path / "j"), "'web'", "x.jsonl", "line 2")
    _write(str(tmp_path / "k" / "web" / "x.jsonl"), '{"text": "ok"}\n{not json\n')
    _expect_error("not valid JSON", lambda: load_dataset(tmp_path / "k"), "x.jsonl", "line 2")
    # a failed tokenisation leaves no cache entry behind, so fixing the file works
    _write(str(tmp_path / "d" / "latin" / "bad.txt"), "cafe")
    assert load_dataset(tmp_path / "d").domains == ["latin"]


def test_bad_bin_domains(tmp_path):
    _write_bin(str(tmp_path / "a" / "gpt"), [1, 2, 3], dtype="uint16")
    _write(str(tmp_path / "a" / "gpt" / "meta.json"), json.dumps({"vocab_size": 50257, "dtype": "int8"}))
    _expect_error("unknown token dtype", lambda: load_dataset(tmp_path / "a"), "'gpt'", "int8", "meta.json")

    _write_bin(str(tmp_path / "b" / "gpt"), [1, 2, 3], meta=False)
    _expect_error("meta.json", lambda: load_dataset(tmp_path / "b"), "'gpt'")

    _write_bin(str(tmp_path / "c" / "gpt"), [1, 2, 3], dtype="uint16")
    with open(tmp_path / "c" / "gpt" / "train.bin", "ab") as f:
        f.write(b"\x00")  # 7 bytes: not a whole number of uint16 tokens
    _expect_error("whole number", lambda: load_dataset(tmp_path / "c"), "'gpt'", "train.bin")

    _write(str(tmp_path / "e" / "half" / "val.bin"), b"\x00\x00", mode="wb")
    _expect_error("no train.bin", lambda: load_dataset(tmp_path / "e"), "'half'")


def test_vocab_mismatch(tmp_path):
    # a GPT-2 tokenised domain next to byte-tokenised text: declared vocabularies disagree
    _write(str(tmp_path / "a" / "text" / "a.txt"), "hello")
    _write_bin(str(tmp_path / "a" / "gpt"), [1, 50000, 3], vocab=50257)
    _expect_error("vocabulary mismatch", lambda: load_dataset(tmp_path / "a"), "'gpt'", "50257")
    # ids beyond the model's vocabulary
    _write_bin(str(tmp_path / "b" / "gpt"), [1, 50000, 3], vocab=50257)
    _write_bin(str(tmp_path / "b" / "small"), [1, 2, 3], vocab=50257)
    ds = load_dataset(tmp_path / "b")
    assert ds.vocab_size == 50257
    ds.check_vocab(50257)
    _expect_error("vocabulary mismatch", lambda: ds.check_vocab(257), "'gpt'", "50000", "257")


def test_domain_shorter_than_window_and_bad_args(mixed):
    ds = load_dataset(mixed)
    n = ds.n_tokens("pretok32")
    rng = np.random.default_rng(0)
    _expect_error("shorter than one window", lambda: ds.sample_windows("pretok32", 2, n + 1, rng),
                  "'pretok32'", str(n + 1))
    _expect_error("shorter than one window", lambda: ds.check_window(10_000), "'jsonl'")
    _expect_error("not in the dataset", lambda: ds.train_tokens("nope"), "'nope'")
    _expect_error("rng", lambda: ds.sample_windows("prose", 2, 4, rng=0))
    _expect_error("length", lambda: ds.sample_windows("prose", 2, 0, rng))
    _expect_error("val_fraction", lambda: load_dataset(mixed, val_fraction=1.0))
    ds0 = load_dataset(mixed, val_fraction=0.0)
    _expect_error("val split", lambda: ds0.sample_window("prose", 4, rng, split="val"), "'prose'")


# -- builtin dataset -------------------------------------------------------------------------


def _read_tree(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith("."):
                p = os.path.join(dirpath, f)
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, root)] = fh.read()
    return out


def test_builtin_dataset_is_deterministic(tmp_path):
    a = _read_tree(write_builtin_dataset(tmp_path / "a", seed=0))
    b = _read_tree(write_builtin_dataset(tmp_path / "b", seed=0))
    c = _read_tree(write_builtin_dataset(tmp_path / "c", seed=1))
    assert a == b
    assert a != c
    domains = sorted({k.split(os.sep)[0] for k in a})
    assert domains == sorted(BUILTIN_DOMAINS) and len(domains) >= 5
    for d in domains:
        size = sum(len(v) for k, v in a.items() if k.startswith(d + os.sep))
        assert 150_000 < size < 600_000, (d, size)
    ds = load_dataset(tmp_path / "a")
    assert ds.domains == sorted(BUILTIN_DOMAINS)
    assert all(ds.n_tokens(d, "val") > 1024 for d in ds.domains)


def test_builtin_dataset_content_is_pinned(tmp_path):
    # builtin-v1 is cached under its version name, so its bytes must never change without a new
    # version (a refactor of the generators included): the sha256 of every file, in path order
    import hashlib

    tree = _read_tree(write_builtin_dataset(tmp_path / "a", seed=0))
    h = hashlib.sha256()
    for rel in sorted(tree, key=lambda r: r.split(os.sep)):
        h.update(rel.encode() + b"\0" + tree[rel])
    assert h.hexdigest() == "797a5d88272ce977479aa397bc79b4cdd6e5498e4f09a8d885dd8d2495951c37"


def test_builtin_dataset_path_is_idempotent(tmp_path):
    p1 = builtin_dataset_path(tmp_path)
    marker_mtime = os.stat(os.path.join(p1, ".complete")).st_mtime_ns
    p2 = builtin_dataset_path(tmp_path)
    assert p1 == p2 == os.path.join(str(tmp_path), "builtin-v1")
    assert os.stat(os.path.join(p1, ".complete")).st_mtime_ns == marker_mtime
    assert [e for e in os.listdir(tmp_path) if e.startswith(".")] == []  # no temp leftovers
    assert load_dataset(p1).domains == sorted(BUILTIN_DOMAINS)


# -- views and the command line ----------------------------------------------------------------


def test_view_hides_the_test_split_and_other_domains(tmp_path):
    _write(str(tmp_path / "d" / "a" / "x.txt"), "alpha " * 4000)
    _write(str(tmp_path / "d" / "b" / "x.txt"), "beta " * 4000)
    ds = load_dataset(tmp_path / "d", val_fraction=0.1, test_fraction=0.1)
    view = ds.view(["a"])
    assert view.domains == ["a"] and ds.n_tokens("a", "test") > 0
    rng = np.random.default_rng(0)
    for read in (lambda: view.tokens("a", "test"), lambda: view.test_tokens("a"),
                 lambda: view.n_tokens("a", "test"), lambda: view.draw_windows("a", 1, 8, rng, "test"),
                 lambda: view.sample_windows("a", 1, 8, rng, split="test"),
                 lambda: view.windows_at("a", [0], 8, "test"), lambda: view.check_window(8, "test")):
        _expect_error("test split is held out", read)
    _expect_error("not in this view", lambda: view.tokens("b"))
    # what the view lets through is the dataset's own data
    assert np.array_equal(np.asarray(view.tokens("a", "val")), np.asarray(ds.val_tokens("a")))
    assert np.array_equal(view.windows_at("a", [3, 9], 5), ds.windows_at("a", [3, 9], 5))
    scored = ds.view(hide_test=False)
    assert scored.domains == ["a", "b"]
    assert np.array_equal(np.asarray(scored.tokens("b", "test")), np.asarray(ds.test_tokens("b")))
    _expect_error("not in the dataset", lambda: ds.view(["a", "zzz"]))


def test_compare_text_field_reaches_the_dataset(tmp_path, monkeypatch):
    import chameleon_ext.compare as compare_mod
    from chameleon_ext.cli import main

    for name, body in (("a", "first domain text "), ("b", "second domain text ")):
        _write(str(tmp_path / "d" / name / "x.jsonl"), json.dumps({"body": body * 200}) + "\n")
    seen = {}
    monkeypatch.setattr(compare_mod, "run_compare", lambda ds, cfg, out, **k: seen.setdefault("ds", ds))
    args = ["compare", "--data", str(tmp_path / "d"), "--mixtures", "uniform", "--out", str(tmp_path / "out"),
            "--quiet", "--no-plots", "--val-fraction", "0", "--test-fraction", "0.1"]
    assert main(args) == 2  # the lines have no "text" field: a one-line error, as before
    assert "ds" not in seen
    assert main(args + ["--text-field", "body"]) == 0
    ds = seen["ds"]
    whole = np.concatenate([np.asarray(ds.train_tokens("a")), np.asarray(ds.test_tokens("a"))])
    assert sorted(whole.tolist()) == sorted(_encode_docs("first domain text " * 200))
