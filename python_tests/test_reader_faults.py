"""One reading stack: the same fault in a file is the same one-line error in every format that
can hold it, whether its domain is tokenised into the cache or streamed, and whatever the
text field is called.

Each case writes a domain whose only document holds the fault, loads it (cached), or loads it
streamed (``stream_threshold=0``) and draws windows from it, and checks the error: one line,
``domain 'web': file '<its path>' ...``, and -- for the faults every JSONL reader can meet --
the same words after the file's location in every format and mode.
"""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest

from chameleon_ext.data import load_dataset
from chameleon_ext.errors import ChameleonUserError

JSONL_FORMATS = ["jsonl", "jsonl.gz", "jsonl.zst"]
MODES = ["cached", "streamed"]
LINES = {  # one JSONL line per fault, with {field} for the text field
    "lone surrogate": b'{"%s": "bad \\ud800 here"}\n',
    "bad JSON": b'{"%s": oops}\n',
    "missing text field": b'{"other": "x", "n": "%s"}\n',
    "non-UTF-8": b'{"%s": "caf\xe9 au lait"}\n',
}
# what each fault's error says after the file's location, the same everywhere
FAULT_WORDS = {
    "lone surrogate": r"holds a lone surrogate escape in its text \(\\ud800 at character 4\), which is not "
                      r"Unicode text; fix or remove that line",
    "bad JSON": r"is not valid JSON \(Expecting value\)",
    "missing text field": r"has no string '(text|body)' field \(choose the text field with text_field / "
                          r"--text-field\)",
    "non-UTF-8": r"is not valid UTF-8 text near byte \d+ \(invalid continuation byte\); convert it to UTF-8 "
                 r"or remove it from the domain folder",
}


def _compress(data: bytes, fmt: str) -> bytes:
    if fmt == "jsonl.gz":
        return gzip.compress(data)
    if fmt == "jsonl.zst":
        zstandard = pytest.importorskip("zstandard")
        return zstandard.ZstdCompressor().compress(data)
    return data


def _domain(tmp_path, fmt: str, data: bytes):
    d = tmp_path / "data" / "web"
    d.mkdir(parents=True)
    name = "part." + fmt if fmt != "text" else "part.txt"
    (d / name).write_bytes(_compress(data, fmt))
    return tmp_path / "data", str(d / name)


def _error(root, mode: str, text_field: str = "text") -> str:
    with pytest.raises(ChameleonUserError) as ei:
        if mode == "cached":
            load_dataset(root, text_field=text_field, val_fraction=0.0)
        else:
            ds = load_dataset(root, text_field=text_field, val_fraction=0.0, stream_threshold=0)
            ds.draw_windows("web", 2, 4, np.random.default_rng(0))
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


def _after_location(msg: str, path: str) -> str:
    """The fault's words: the message without ``domain 'web': file '<path>'`` and the line."""
    head = f"domain 'web': file {path!r} "
    assert msg.startswith(head), (msg, head)
    return re.sub(r"^(line \d+ |line at byte \d+ )", "", msg[len(head):])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", JSONL_FORMATS)
@pytest.mark.parametrize("text_field", ["text", "body"])
@pytest.mark.parametrize("fault", list(LINES))
def test_jsonl_fault_is_the_same_one_line_error_everywhere(tmp_path, fault, text_field, fmt, mode):
    line = LINES[fault] % text_field.encode() if b"%s" in LINES[fault] else LINES[fault]
    root, path = _domain(tmp_path, fmt, line)
    words = _after_location(_error(root, mode, text_field), path)
    assert re.fullmatch(FAULT_WORDS[fault], words), words
    if fault == "missing text field":
        assert f"'{text_field}'" in words
    if fault == "non-UTF-8":  # the byte named is the bad one: 'caf' + 0xe9 after the JSON's opening
        bad = line.index(b"\xe9")
        assert f"near byte {bad} " in words


@pytest.mark.parametrize("mode", MODES)
def test_non_utf8_text_file_is_the_same_error_as_in_jsonl(tmp_path, mode):
    root, path = _domain(tmp_path, "text", b"caf\xe9 au lait\n")
    words = _after_location(_error(root, mode), path)
    assert re.fullmatch(FAULT_WORDS["non-UTF-8"], words) and "near byte 3 " in words, words


@pytest.mark.parametrize("mode", MODES)
def test_non_utf8_deep_in_a_big_text_file_names_its_byte(tmp_path, mode):
    # past the reader's first block, so the position is counted across blocks
    data = b"ok line\n" * 300_000 + b"caf\xe9 au lait\n"
    root, path = _domain(tmp_path, "text", data)
    if mode == "streamed":
        pytest.skip("a streamed draw reads only the lines it draws")
    words = _after_location(_error(root, mode), path)
    bad = data.index(b"\xe9")
    assert f"near byte {bad} " in words, words


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_truncated_compressed_shard(tmp_path, fmt, mode):
    data = b"".join(b'{"text": "document %d with some words"}\n' % i for i in range(2000))
    root, path = _domain(tmp_path, fmt, data)
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    words = _after_location(_error(root, mode), path)
    assert words.startswith(f"is not a readable {fmt.split('.')[-1]} stream (truncated or corrupt)"), words


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_columnar_missing_column_and_truncated_file(tmp_path, fmt, mode):
    pa = pytest.importorskip("pyarrow")
    d = tmp_path / "data" / "web"
    d.mkdir(parents=True)
    path = str(d / f"part.{fmt}")
    table = pa.table({"body": [f"document {i}" for i in range(50)]})
    if fmt == "parquet":
        import pyarrow.parquet as pq
        pq.write_table(table, path)
    else:
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    words = _after_location(_error(tmp_path / "data", mode), path)
    assert re.fullmatch(r"has no column 'text' \(columns: \['body'\]\); choose the text column with "
                        r"text_field / --text-field", words), words
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    words = _after_location(_error(tmp_path / "data", mode, "body"), path)
    kind = "Parquet file" if fmt == "parquet" else "Arrow IPC file"
    assert words.startswith(f"is not a readable {kind}"), words


def test_fault_words_do_not_depend_on_format_or_mode(tmp_path):
    # the lone surrogate with a non-default field in every JSONL format, cached and streamed:
    # one message once the file's location is taken out (the old readers gave three)
    seen = set()
    for fmt in JSONL_FORMATS:
        for mode in MODES:
            sub = tmp_path / f"{fmt}-{mode}"
            root, path = _domain(sub, fmt, LINES["lone surrogate"] % b"body")
            seen.add(_after_location(_error(root, mode, "body"), path))
    assert len(seen) == 1, seen
