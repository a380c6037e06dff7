"""Fault injection for the data layer: kills, a full disk, read-only folders and interrupts
while token caches are written, and memory on a file with no newline.

Each test asserts the exception (or exit status), that its message is one line naming the
path, and that nothing was lost or mixed: no temp file is left, the previous good cache entry
is kept byte for byte, and the next load gives exactly the reference token stream.
Faults are injected through the ``CHAMELEON_FAULT`` points of :mod:`chameleon_ext.io`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import chameleon_ext.data.sources.lines as lines_mod
import chameleon_ext.data.token_cache as cache_mod
from chameleon_ext import io
from chameleon_ext.data import ByteTokenizer, load_dataset
from chameleon_ext.errors import ChameleonUserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = ByteTokenizer.eos_id
DOCS = {"a.txt": "alpha beta gamma\n" * 50, "b.txt": "delta epsilon\n" * 50}


def _reference(docs):
    out = []
    for k in sorted(docs):
        out += list(docs[k].encode("utf-8")) + [EOS]
    return np.asarray(out)


def _dataset(tmp_path, docs=DOCS):
    root = tmp_path / "data"
    for rel, text in docs.items():
        p = root / "dom" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


def _cache_files(root):
    cache = root / ".chameleon_cache"
    if not cache.exists():
        return {}
    out = {}
    for dirpath, _, files in os.walk(cache):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, cache)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _temps(root):
    return [f for f in _cache_files(root) if f.endswith(".chameleon-tmp")]


def _one_line_error(fn, *needles) -> str:
    with pytest.raises(ChameleonUserError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _load_in_child(root, fault):
    env = {**os.environ, io.FAULT_ENV: fault, "PYTHONPATH": ROOT}
    code = "import sys; from chameleon_ext.data import load_dataset; load_dataset(sys.argv[1])"
    return subprocess.run([sys.executable, "-c", code, str(root)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# -- kills (SIGKILL in a child process) ------------------------------------------------------


def test_kill_while_writing_tokens_then_next_run_cleans_up(tmp_path):
    root = _dataset(tmp_path)
    proc = _load_in_child(root, "write:*.tokens:replace=kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = _temps(root)
    assert len(left) == 1 and not any(f.endswith(".tokens") for f in _cache_files(root))

    ds = load_dataset(root, val_fraction=0)  # the dead writer's temp file goes, tokens are exact
    assert _temps(root) == []
    assert np.array_equal(ds.train_tokens("dom"), _reference(DOCS))


def test_kill_before_the_metadata_commit(tmp_path):
    root = _dataset(tmp_path)
    proc = _load_in_child(root, "write:*.tokens.json:data=kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    files = _cache_files(root)
    assert any(f.endswith(".tokens") for f in files) and not any(f.endswith(".tokens.json") for f in files)
    # a token file without its commit marker is never trusted: rebuilt silently (no warning)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset(root, val_fraction=0)
    assert _temps(root) == []
    assert np.array_equal(ds.train_tokens("dom"), _reference(DOCS))


# (the kills mid-data and before the metadata commit are the two tests above; each child
# process costs seconds, mostly importing torch, so the points are not all repeated here)
@pytest.mark.parametrize("point", ["write:*.tokens:open", "write:dom-text-*.json:replace"])
def test_kill_at_any_cache_write_point_then_exact_reload(tmp_path, point):
    root = _dataset(tmp_path)
    proc = _load_in_child(root, f"{point}=kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ds = load_dataset(root, val_fraction=0)
    assert np.array_equal(ds.train_tokens("dom"), _reference(DOCS))
    assert _temps(root) == [] and ds.verify() == []
    # and the entry is complete now: a second load neither re-tokenises nor warns
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_dataset(root, val_fraction=0)
    assert np.array_equal(again.train_tokens("dom"), _reference(DOCS))


def test_live_writers_temp_files_are_kept(tmp_path):
    root = _dataset(tmp_path)
    load_dataset(root)
    cache = root / ".chameleon_cache"
    # one of this (live) process's temp files, and one of a process that cannot exist
    live = io._temp_name(str(cache), "x.tokens")
    open(live, "wb").close()
    dead = os.path.join(str(cache), f".x.tokens.{io._HOST}.{2 ** 22 + 12345}.abcd1234.chameleon-tmp")
    open(dead, "wb").close()
    load_dataset(root)
    assert os.path.exists(live) and not os.path.exists(dead)


# -- full disk, interrupts -------------------------------------------------------------------


def test_full_disk_while_tokenising_keeps_previous_cache(tmp_path, monkeypatch):
    root = _dataset(tmp_path)
    load_dataset(root)
    before = _cache_files(root)
    (root / "dom" / "b.txt").write_text("changed text\n", encoding="utf-8")  # a new entry is due
    for point in ("write:*.tokens:data", "write:*.tokens:replace", "write:*.tokens.json:data"):
        monkeypatch.setenv(io.FAULT_ENV, f"{point}=enospc")
        _one_line_error(lambda: load_dataset(root), "No space left on device", ".tokens",
                        str(root / ".chameleon_cache"))
        after = _cache_files(root)
        assert _temps(root) == []
        assert {k: after[k] for k in before} == before  # the previous entry, byte for byte
        assert not any(f.endswith(".tokens.json") for f in set(after) - set(before))
    monkeypatch.delenv(io.FAULT_ENV)
    ds = load_dataset(root, val_fraction=0)
    assert np.array_equal(ds.train_tokens("dom"), _reference({**DOCS, "b.txt": "changed text\n"}))
    # the old text comes back: its entry is still there and is used as is
    (root / "dom" / "b.txt").write_text(DOCS["b.txt"], encoding="utf-8")
    monkeypatch.setattr(cache_mod, "tokenise_domain", lambda *a, **k: pytest.fail("re-tokenised"))
    assert np.array_equal(load_dataset(root, val_fraction=0).train_tokens("dom"), _reference(DOCS))


def test_interrupt_while_tokenising_leaves_nothing(tmp_path, monkeypatch):
    root = _dataset(tmp_path, {f"{i}.txt": f"document {i}\n" * 20 for i in range(5)})
    calls = []

    class Interrupted(ByteTokenizer):
        def encode_array(self, text):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return super().encode_array(text)

    with pytest.raises(KeyboardInterrupt):
        load_dataset(root, tokenizer=Interrupted())
    assert _temps(root) == [] and not any(f.endswith(".tokens") for f in _cache_files(root))


# -- read-only folders -----------------------------------------------------------------------


@pytest.fixture
def read_only(monkeypatch):
    """Make writes under the given folder fail with EACCES, as on a read-only folder (the
    tests run as root here, where chmod does not stop writes)."""
    blocked = []
    real_open, real_mkdir = os.open, os.mkdir

    def denied(path):
        return any(os.path.abspath(os.fspath(path)).startswith(b) for b in blocked)

    def fake_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and denied(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):
        if denied(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    return lambda folder: blocked.append(os.path.abspath(os.fspath(folder)))


def test_read_only_data_folder_without_cache(tmp_path, read_only):
    root = _dataset(tmp_path)
    read_only(root)
    _one_line_error(lambda: load_dataset(root), "cache_dir", str(root / ".chameleon_cache"),
                    "Permission denied", "writable cache_dir")
    assert not (root / ".chameleon_cache").exists()
    # a writable cache elsewhere works
    ds = load_dataset(root, cache_dir=tmp_path / "cache", val_fraction=0)
    assert np.array_equal(ds.train_tokens("dom"), _reference(DOCS))


def test_read_only_data_folder_with_complete_cache(tmp_path, read_only):
    root = _dataset(tmp_path)
    load_dataset(root)
    before = _cache_files(root)
    p = root / "dom" / "a.txt"
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # stat key changes: index is stale
    read_only(root)
    ds = load_dataset(root, val_fraction=0)  # the index cannot be updated: fine, it is a hint
    assert np.array_equal(ds.train_tokens("dom"), _reference(DOCS))
    assert _cache_files(root) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_data_folder_real(tmp_path):
    root = _dataset(tmp_path)
    os.chmod(root, 0o555)
    try:
        _one_line_error(lambda: load_dataset(root), "cache_dir", "writable cache_dir")
    finally:
        os.chmod(root, 0o755)


# -- memory ----------------------------------------------------------------------------------


def test_file_without_newline_streams_in_bounded_memory(tmp_path, monkeypatch):
    chunk = 1 << 20
    monkeypatch.setattr(lines_mod, "CHUNK_CHARS", chunk)
    n = 24 << 20  # 24 MB, one line, few spaces
    pattern = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ!", np.uint8)
    data = np.resize(pattern, n)
    path = tmp_path / "data" / "dom" / "big.txt"
    path.parent.mkdir(parents=True)
    data.tofile(path)
    del data
    tracemalloc.start()
    try:
        ds = load_dataset(tmp_path / "data", val_fraction=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a few chunks' worth (text, its UTF-8 bytes, the uint16 ids), far below the file size;
    # reading it whole would hold ~4 bytes per character (str + bytes + ids)
    assert peak < 12 * chunk, peak
    tokens = ds.train_tokens("dom")
    assert tokens.shape[0] == n + 1 and int(tokens[-1]) == EOS
    assert np.array_equal(tokens[:-1], np.resize(pattern, n))


# -- the built-in dataset --------------------------------------------------------------------


def test_builtin_dataset_build_killed_or_out_of_space(tmp_path, monkeypatch):
    from chameleon_ext.data import BUILTIN_DOMAINS, builtin_dataset_path

    env = {**os.environ, io.FAULT_ENV: "write:.complete:open=kill", "PYTHONPATH": ROOT}
    code = "import sys; from chameleon_ext.data import builtin_dataset_path; builtin_dataset_path(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [e for e in os.listdir(tmp_path) if e.endswith(".chameleon-tmp")]  # the dead build
    assert not (tmp_path / "builtin-v1").exists()

    monkeypatch.setenv(io.FAULT_ENV, "write:*.jsonl:data=enospc")
    _one_line_error(lambda: builtin_dataset_path(tmp_path), "No space left on device", ".jsonl")
    assert os.listdir(tmp_path) == []  # the dead build is gone, and ours after its failure
    monkeypatch.delenv(io.FAULT_ENV)
    path = builtin_dataset_path(tmp_path)
    assert os.listdir(tmp_path) == ["builtin-v1"]
    assert load_dataset(path).domains == sorted(BUILTIN_DOMAINS)
