"""The real-text corpus builder (benchmarks/real_text/build_corpus.py) on a fake package tree:
what it reads, how much it takes, and that the same inputs give the same bytes and splits.
No apt-get here: the tree holds a dpkg status file, dpkg file lists and the files they name."""

import gzip
import importlib.util
import json
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_builder():
    spec = importlib.util.spec_from_file_location(
        "build_corpus", ROOT / "benchmarks" / "real_text" / "build_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up while building
    spec.loader.exec_module(mod)
    return mod


bc = _load_builder()


def _load_tables():
    spec = importlib.util.spec_from_file_location(
        "real_text_tables", ROOT / "benchmarks" / "real_text" / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _words(rng, n_lines, width=60):
    vocab = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "kappa"]
    lines = []
    for i in range(n_lines):
        line = " ".join(rng.choice(vocab, size=width // 6))
        lines.append(line if i % 7 else "")          # a blank line every 7 lines
    return "\n".join(lines) + "\n"


def _fake_tree(root: Path, scale: int = 1) -> dict:
    """Install a fake package of each domain under ``root``; returns the raw text each domain
    holds (the independent reference for the builder's byte counts)."""
    rng = np.random.default_rng(1)
    files: dict = {}          # package -> {path: bytes}
    raw: dict = {}            # domain -> total text bytes it can draw from

    def add(pkg, path, data):
        files.setdefault(pkg, {})[path] = data

    bible = _words(rng, 300 * scale)
    add("bible-kjv", "/usr/bin/bible",
        f"#!{sys.executable}\nimport sys\nsys.stdout.write({bible!r})\n".encode())
    add("bible-kjv-text", "/usr/lib/bible.data", b"\x00binary")
    raw["scripture"] = len(bible.encode())
    fortunes = [f"fortune {i}: " + _words(rng, 2) for i in range(40 * scale)]
    add("fortunes", "/usr/share/games/fortunes/cookie", "%\n".join(fortunes).encode())
    add("fortunes", "/usr/share/games/fortunes/cookie.dat", b"\x00\x01index")
    add("fortunes-min", "/usr/share/games/fortunes/fortunes", b"Short one.\n%\nAnother.\n")
    raw["fortunes"] = sum(len((f.strip("\n") + "\n").encode()) for f in fortunes) + len(b"Short one.\nAnother.\n")
    body = _words(rng, 200 * scale)
    header = "\n00-database-url\n   ftp://x\n\n00-database-short\n   Fake\n\n"
    add("dict-gcide", "/usr/share/dictd/gcide.dict.dz", gzip.compress((header + body).encode()))
    raw["dictionary"] = len(body.encode())
    jargon = _words(rng, 100 * scale)
    info = "info\x1f\nFile: vera.info\n" + "VERA entry\n" * 20 + "\x1f\nTag Table:\nNode: Top\x7f1\n"
    add("jargon-text", "/usr/share/doc/jargon-text/jargon.txt.gz", gzip.compress(jargon.encode()))
    add("vera", "/usr/share/info/vera.info.gz", gzip.compress(info.encode()))
    raw["glossary"] = len(jargon.encode()) + len(("info\nFile: vera.info\n" + "VERA entry\n" * 20).encode())
    py = [_words(rng, 30 * scale) for _ in range(6)]
    for i, t in enumerate(py):
        add("libpython3.11-stdlib", f"/usr/lib/python3.11/{'sub/' if i % 2 else ''}m{i}.py", t.encode())
    add("libpython3.11-stdlib", "/usr/lib/python3.11/data.txt", b"not python")
    raw["python"] = sum(len(t.encode()) for t in py)
    h1, h2 = _words(rng, 80 * scale), _words(rng, 40 * scale)
    add("linux-libc-dev", "/usr/include/linux/a.h", h1.encode())
    add("libc6-dev", "/usr/include/stdio.h", h2.encode())
    add("libc6-dev", "/usr/lib/x86_64-linux-gnu/libc.a", b"\x7fELF")
    raw["c_headers"] = len(h1.encode()) + len(h2.encode())
    man = _words(rng, 90 * scale)
    add("manpages", "/usr/share/man/man7/x.7.gz", gzip.compress(man.encode()))
    add("manpages", "/usr/share/man/de/man7/x.7.gz", gzip.compress(b"localised: not read"))
    raw["manpages"] = len(man.encode())
    lic = {"base-files": ("/usr/share/common-licenses/GPL-3", _words(rng, 50 * scale)),
           "libsoftware-license-perl": ("/usr/share/perl5/Software/License/MIT.pm", _words(rng, 10 * scale)),
           "coreutils": ("/usr/share/doc/coreutils/copyright", _words(rng, 10 * scale))}
    for pkg, (path, text) in lic.items():
        add(pkg, path, text.encode())
    add("unrelated-optional", "/usr/share/doc/unrelated-optional/copyright", b"not read\n")
    # every package of the corpus has a copyright file; they count towards `licences`
    lic_bytes = sum(len(t.encode()) for _, t in lic.values())
    for pkg in bc.APT_PACKAGES:
        if pkg not in lic:
            text = f"Copyright of {pkg}\n"
            add(pkg, f"/usr/share/doc/{pkg}/copyright", text.encode())
            lic_bytes += len(text.encode())
    raw["licences"] = lic_bytes

    status = []
    info_dir = root / "var/lib/dpkg/info"
    info_dir.mkdir(parents=True)
    for pkg, pfiles in sorted(files.items()):
        prio = "required" if pkg == "coreutils" else "optional"
        status.append(f"Package: {pkg}\nStatus: install ok installed\nPriority: {prio}\n"
                      f"Version: 1.{len(pkg)}-fake\nDescription: fake\n extended line: x\n")
        dirs = set()
        for path, data in pfiles.items():
            p = root / path.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            if path == "/usr/bin/bible":
                p.chmod(p.stat().st_mode | stat.S_IXUSR)
            dirs.add(str(Path(path).parent))
        name = f"{pkg}:amd64.list" if pkg.startswith("lib") else f"{pkg}.list"
        (info_dir / name).write_text("\n".join(sorted(dirs) + sorted(pfiles)) + "\n")
    (root / "var/lib/dpkg/status").write_text("\n".join(status))
    return raw


def _read_units(path: Path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_cut_units_hand_cases(monkeypatch):
    monkeypatch.setattr(bc, "UNIT_BYTES", 10)
    monkeypatch.setattr(bc, "MAX_UNIT_BYTES", 25)
    # cut at the first blank line once 10 bytes are in; every byte kept
    assert bc.cut_units("aaaa\nbbbbbb\n\ncc\n") == ["aaaa\nbbbbbb\n\n", "cc\n"]
    assert bc.cut_units("a\n\nb\n") == ["a\n\nb\n"]           # under 10 bytes: one unit
    long = "x" * 12 + "\n"
    assert bc.cut_units(long * 3) == [long * 2, long]             # no blank line: cut past 25 bytes
    assert bc.cut_units("\n\n\n") == []                            # whitespace-only units dropped


def test_readers_hand_cases(tmp_path):
    assert bc.split_fortunes("one\n%\ntwo\nlines\n%\n") == ["one\n", "two\nlines\n"]
    p = tmp_path / "d.dict.dz"
    p.write_bytes(gzip.compress(b"\n00-database-url\n   u\n\n00-database-short\n   s\n\nWord \\W\\ n.\n   def\n"))
    assert bc.read_dictd(p) == "Word \\W\\ n.\n   def\n"
    q = tmp_path / "v.info"
    q.write_text("head\x1f\nFile: v\nA  body\n\x1f\nTag Table:\nNode: A\x7f12\n")
    assert bc.read_info(q) == "head\nFile: v\nA  body\n"


def test_build_takes_all_when_small_and_records_sources(tmp_path):
    raw = _fake_tree(tmp_path / "root")
    rec = bc.build(tmp_path / "corpus", tmp_path / "root", domain_bytes=10**9, seed=0)
    out = tmp_path / "corpus"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(d.name for d in bc.DOMAINS)
    by_name = {d["domain"]: d for d in rec["domains"]}
    for name, expected in raw.items():
        units = _read_units(out / name / "text.jsonl")
        got = sum(len(u.encode("utf-8")) for u in units)
        # everything is taken; whitespace-only units are the only bytes dropped
        assert expected - 2 * len(units) - 64 <= got <= expected, name
        assert by_name[name]["bytes"] == got and by_name[name]["units"] == len(units)
        assert by_name[name]["available_bytes"] >= got
    assert "localised" not in (out / "manpages" / "text.jsonl").read_text()
    assert "not python" not in (out / "python" / "text.jsonl").read_text()
    assert "not read" not in (out / "licences" / "text.jsonl").read_text()
    # versions come from the status file; the packages of a domain are named with their bytes
    pk = {p["package"]: p for p in by_name["c_headers"]["packages"]}
    assert pk["libc6-dev"]["version"] == f"1.{len('libc6-dev')}-fake"
    assert pk["linux-libc-dev"]["bytes_taken"] + pk["libc6-dev"]["bytes_taken"] == by_name["c_headers"]["bytes"]
    assert json.loads((out / "sources.json").read_text()) == rec
    assert "| scripture |" in (out / "SOURCES.md").read_text()


def test_build_caps_domains_deterministically(tmp_path):
    _fake_tree(tmp_path / "root", scale=4)
    cap = 6000
    rec_a = bc.build(tmp_path / "a", tmp_path / "root", domain_bytes=cap, seed=0)
    rec_b = bc.build(tmp_path / "b", tmp_path / "root", domain_bytes=cap, seed=0)
    rec_c = bc.build(tmp_path / "c", tmp_path / "root", domain_bytes=cap, seed=1)
    assert [d["sha256"] for d in rec_a["domains"]] == [d["sha256"] for d in rec_b["domains"]]
    for d in rec_a["domains"]:
        a = (tmp_path / "a" / d["domain"] / "text.jsonl").read_bytes()
        assert a == (tmp_path / "b" / d["domain"] / "text.jsonl").read_bytes()
        if d["available_bytes"] > cap + bc.MAX_UNIT_BYTES:
            # stops at the first unit that reaches the cap
            assert cap <= d["bytes"] < cap + bc.MAX_UNIT_BYTES, d["domain"]
    changed = [x["sha256"] != y["sha256"] for x, y in zip(rec_a["domains"], rec_c["domains"])]
    assert any(changed)                                    # another seed, another draw
    # a rebuild into the same folder replaces it
    bc.build(tmp_path / "a", tmp_path / "root", domain_bytes=cap, seed=1)
    assert json.loads((tmp_path / "a" / "sources.json").read_text())["seed"] == 1


def test_units_are_verbatim_source_text(tmp_path):
    _fake_tree(tmp_path / "root", scale=2)
    bc.build(tmp_path / "corpus", tmp_path / "root", domain_bytes=3000, seed=0)
    c_source = ((tmp_path / "root/usr/include/linux/a.h").read_text()
                + (tmp_path / "root/usr/include/stdio.h").read_text())
    for u in _read_units(tmp_path / "corpus" / "c_headers" / "text.jsonl"):
        assert u in c_source


def test_chameleon_reads_the_corpus_with_the_same_splits(tmp_path):
    from chameleon_ext.data.dataset import load_dataset

    _fake_tree(tmp_path / "root", scale=2)
    splits = []
    for name in ("a", "b"):
        bc.build(tmp_path / name, tmp_path / "root", domain_bytes=5000, seed=0)
        ds = load_dataset(tmp_path / name, val_fraction=0.1, test_fraction=0.1)
        assert sorted(ds.domains) == sorted(d.name for d in bc.DOMAINS)
        splits.append({(d, s): np.asarray(ds.tokens(d, s)) for d in ds.domains
                       for s in ("train", "val", "test")})
    for key, arr in splits[0].items():
        assert arr.size > 0, key
        np.testing.assert_array_equal(arr, splits[1][key])


def test_unknown_domain_and_missing_text_are_refused(tmp_path):
    _fake_tree(tmp_path / "root")
    with pytest.raises(SystemExit, match="--domains: unknown"):
        bc.build(tmp_path / "x", tmp_path / "root", domains=["nope"])
    empty = tmp_path / "empty"
    (empty / "var/lib/dpkg/info").mkdir(parents=True)
    with pytest.raises(SystemExit, match="domain fortunes: no text found"):
        bc.build(tmp_path / "y", empty, domains=["fortunes"])
    assert not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".y.")]   # temp folder removed


def test_summary_table_hand_case(tmp_path):
    """The evidence summary: interval half-widths, the signed difference, the largest weight
    and the collapse mark, on a hand-written compare.json."""
    tables = _load_tables()

    def iv(mean, low, high):
        return {"mean": mean, "low": low, "high": high}

    doc = {"stats": {"mixtures": {
        "uniform": {"perplexity": {"average": iv(10.0, 9.0, 11.0)}, "difference_to_baseline": None},
        "chameleon-paper": {"perplexity": {"average": iv(17.5, 14.0, 21.0)},
                            "difference_to_baseline": {"average": iv(7.5, 4.5, 10.5)}}}},
        "mixtures": {"uniform": {"weights": {"a": 0.5, "b": 0.5}},
                     "chameleon-paper": {"weights": {"a": 0.0625, "b": 0.9375}}},
        "collapsed": {"chameleon-paper": {"domain": "b", "weight": 0.9375}},
        "seeds": [0, 1, 2], "tokens_per_run": 1000, "command": "chameleon compare x"}
    (tmp_path / "compare.json").write_text(json.dumps(doc))
    docs = tables.load_docs([str(tmp_path)])
    assert [lab for lab, _ in docs] == ["pretrain"]
    md = tables.summary_table(docs)
    assert "| uniform | 10.00 ± 1.00 | — | a 0.500 |" in md
    assert "| chameleon-paper | 17.50 ± 3.50 | +7.50 ± 3.00 | b 0.938 **COLLAPSED** |" in md
    assert "1,000 tokens per run" in md and "`chameleon compare x`" in md
    assert tables.main([str(tmp_path / "missing")]) == 2
