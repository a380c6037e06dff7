"""Build a real-text corpus of eight domains from text that Debian packages ship.

    python benchmarks/real_text/build_corpus.py --out /work/evidence/corpus            # installs with apt-get
    python benchmarks/real_text/build_corpus.py --out DIR --no-install --root /       # use what is installed

Each domain is a folder holding one ``text.jsonl`` (one unit of text per line, field
``text``), the layout ``chameleon --data DIR`` reads; ``SOURCES.md`` and ``sources.json``
beside the domains name every package, its version, its licence and the bytes taken from it.

Nothing is generated: the text is read from the files the packages install, found through
dpkg's own file lists (``var/lib/dpkg/info/<package>.list`` under ``--root``), so the same
packages give the same corpus. A domain's text is cut into units of about ``UNIT_BYTES`` at
blank lines; when a domain holds more than ``--domain-bytes`` the units are drawn without
replacement in an order fixed by ``--seed`` and the domain's name, and written in that order
(so chameleon's interleaved validation and test blocks sample the whole domain).
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

UNIT_BYTES = 4096          # a unit is cut at the first blank line after this many bytes
MAX_UNIT_BYTES = 16384     # ... or at a line end after this many (long paragraph-free files)
DEFAULT_DOMAIN_BYTES = 2_500_000
DEFAULT_SEED = 0


# ------------------------------------------------------------------------------------------
# readers: one installed file -> its text


def read_plain(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz" or path.name.endswith(".dz"):
        data = gzip.decompress(data)      # dictzip (.dz) is gzip with an index in the header
    return data.decode("utf-8", errors="replace")


def read_info(path: Path) -> str:
    """GNU info: drop the node separators (0x1f) and the tag table after them."""
    text = read_plain(path)
    text = text.split("\x1f\nTag Table:")[0]
    return text.replace("\x1f", "")


def read_dictd(path: Path) -> str:
    """dictd database: drop the ``00-database-*`` header entries, keep the definitions."""
    text = read_plain(path)
    start = text.find("\n\n", text.rfind("00-database-"))
    return text[start + 2:] if start >= 0 else text


def split_fortunes(text: str) -> List[str]:
    """A fortune file holds quotations separated by lines holding only ``%``."""
    return [f.strip("\n") + "\n" for f in re.split(r"^%\n", text, flags=re.M) if f.strip()]


# ------------------------------------------------------------------------------------------
# dpkg metadata under a root (so a test can point at a fake tree)


def dpkg_status(root: Path) -> Dict[str, Dict[str, str]]:
    """Installed packages from ``var/lib/dpkg/status``: name -> {Version, Priority, ...}."""
    status = root / "var/lib/dpkg/status"
    out: Dict[str, Dict[str, str]] = {}
    if not status.exists():
        return out
    for para in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields: Dict[str, str] = {}
        for line in para.splitlines():
            if line and not line[0].isspace() and ":" in line:
                k, v = line.split(":", 1)
                fields[k] = v.strip()
        name = fields.get("Package")
        if name and fields.get("Status", "").endswith(" installed"):
            out[name] = fields
    return out


def package_files(root: Path, package: str) -> List[Path]:
    """The regular files ``package`` installed, from dpkg's list (any architecture)."""
    info = root / "var/lib/dpkg/info"
    lists = sorted(info.glob(f"{package}.list")) + sorted(info.glob(f"{package}:*.list"))
    files = []
    for lst in lists:
        for line in lst.read_text(encoding="utf-8", errors="replace").splitlines():
            p = root / line.lstrip("/")
            if line and p.is_file() and not p.is_symlink():
                files.append(p)
    return sorted(set(files))


# ------------------------------------------------------------------------------------------
# domains


@dataclass
class Part:
    """Files of one package matching ``patterns``, each read by ``reader`` into documents."""
    package: str
    patterns: Sequence[str]
    reader: Callable[[Path], str] = read_plain
    splitter: Optional[Callable[[str], List[str]]] = None
    exclude: Sequence[str] = ()


@dataclass
class Domain:
    name: str
    description: str
    licence: str
    parts: List[Part] = field(default_factory=list)
    # a program that prints the domain's text: (package, argv relative to root)
    command: Optional[Tuple[str, Sequence[str]]] = None
    # extra packages whose files this domain reads, chosen when the corpus is built
    dynamic_parts: Optional[Callable[[Path], List[Part]]] = None


def licence_parts(root: Path) -> List[Part]:
    """Copyright files of the packages every Debian system has (priority required or
    important) and of the packages this corpus installs, plus the licence texts in base-files
    and in Software::License."""
    status = dpkg_status(root)
    names = {p for p, f in status.items() if f.get("Priority") in ("required", "important")}
    names |= {p for d in DOMAINS for part in d.parts for p in [part.package]}
    names |= {d.command[0] for d in DOMAINS if d.command}
    parts = [Part("base-files", ["/usr/share/common-licenses/*"]),
             Part("libsoftware-license-perl", ["/usr/share/perl5/Software/License/*.pm"])]
    parts += [Part(p, [f"/usr/share/doc/{p}/copyright"]) for p in sorted(names) if p in status]
    return parts


DOMAINS: List[Domain] = [
    Domain("scripture", "King James Bible, all 66 books (printed by the bible program)",
           "public domain (Debian copyright file of bible-kjv-text)",
           command=("bible-kjv", ["usr/bin/bible", "-p", "{root}/usr/lib", "gen1:1-rev22:21"])),
    Domain("fortunes", "fortune cookie files: quotations, jokes, poems",
           "BSD-4-clause / public domain mixture (Debian copyright files of fortunes, fortunes-min)",
           parts=[Part("fortunes", ["/usr/share/games/fortunes/*"], splitter=split_fortunes,
                       exclude=["*.dat", "*.u8"]),
                  Part("fortunes-min", ["/usr/share/games/fortunes/*"], splitter=split_fortunes,
                       exclude=["*.dat", "*.u8"])]),
    Domain("dictionary", "GNU Collaborative International Dictionary of English (Webster 1913 + WordNet)",
           "GPL-3+ (Debian copyright file of dict-gcide)",
           parts=[Part("dict-gcide", ["/usr/share/dictd/gcide.dict.dz"], reader=read_dictd)]),
    Domain("glossary", "Jargon File 4.4.7 and V.E.R.A. (computing acronyms)",
           "jargon-text: public domain; vera: GFDL-1.3+ (Debian copyright files)",
           parts=[Part("jargon-text", ["/usr/share/doc/jargon-text/jargon.txt.gz"]),
                  Part("vera", ["/usr/share/info/vera.info*"], reader=read_info)]),
    Domain("python", "CPython standard library sources (.py)",
           "PSF-2.0 (Debian copyright file of libpython3.11-stdlib)",
           parts=[Part("libpython3.11-stdlib", ["/usr/lib/python3.11/*.py"])]),
    Domain("c_headers", "Linux UAPI and GNU C library headers (.h)",
           "linux-libc-dev: GPL-2 with the Linux syscall note; libc6-dev: LGPL-2.1+",
           parts=[Part("linux-libc-dev", ["/usr/include/*.h"]),
                  Part("libc6-dev", ["/usr/include/*.h"])]),
    Domain("licences", "licence texts and Debian copyright files",
           "each text is its own licence's text (verbatim copying permitted); Software::License: "
           "Artistic-1.0-Perl or GPL-1+",
           dynamic_parts=licence_parts),
    Domain("manpages", "Linux man-pages project, sections 1-8 (roff source)",
           "GPL-2+ / BSD / verbatim-copying mixture (Debian copyright file of manpages)",
           parts=[Part("manpages", ["/usr/share/man/man*/*.gz"]),
                  Part("manpages-dev", ["/usr/share/man/man*/*.gz"])]),
]

APT_PACKAGES = sorted({p.package for d in DOMAINS for p in d.parts} | {"libsoftware-license-perl"}
                      | {d.command[0] for d in DOMAINS if d.command} | {"bible-kjv-text"})


# ------------------------------------------------------------------------------------------
# assembly


def cut_units(text: str) -> List[str]:
    """Cut ``text`` into units: at the first blank line after UNIT_BYTES bytes, or at a line
    end after MAX_UNIT_BYTES; every byte of ``text`` lands in exactly one unit."""
    units, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        size += len(line.encode("utf-8"))
        if (size >= UNIT_BYTES and not line.strip()) or size >= MAX_UNIT_BYTES:
            units.append("".join(cur))
            cur, size = [], 0
    if cur:
        units.append("".join(cur))
    return [u for u in units if u.strip()]


def domain_documents(root: Path, domain: Domain) -> List[Tuple[str, str, str]]:
    """(package, source path, text) of every document of ``domain``, in sorted file order."""
    docs = []
    if domain.command:
        package, argv = domain.command
        exe = root / argv[0]
        args = [a.replace("{root}", str(root)) for a in argv[1:]]
        out = subprocess.run([str(exe), *args], stdin=subprocess.DEVNULL, capture_output=True,
                             check=True, timeout=300).stdout
        docs.append((package, "/" + argv[0], out.decode("utf-8", errors="replace")))
    parts = list(domain.parts) + (domain.dynamic_parts(root) if domain.dynamic_parts else [])
    for part in parts:
        for f in package_files(root, part.package):
            rel = "/" + f.relative_to(root).as_posix()
            if not any(fnmatch.fnmatch(rel, pat) for pat in part.patterns):
                continue
            if any(fnmatch.fnmatch(f.name, pat) for pat in part.exclude):
                continue
            text = part.reader(f)
            pieces = part.splitter(text) if part.splitter else [text]
            docs.extend((part.package, rel, t) for t in pieces)
    return docs


def select_units(domain: str, docs: List[Tuple[str, str, str]], domain_bytes: int,
                 seed: int) -> List[Tuple[str, str, str]]:
    """Cut the documents into units and draw them (without replacement, in an order fixed by
    ``seed`` and the domain's name) until ``domain_bytes`` bytes are reached."""
    units = [(pkg, src, u) for pkg, src, text in docs for u in cut_units(text)]
    order = list(range(len(units)))
    random.Random(f"{seed}:{domain}").shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total >= domain_bytes:
            break
        chosen.append(units[i])
        total += len(units[i][2].encode("utf-8"))
    return chosen


def build(out: Path, root: Path = Path("/"), domain_bytes: int = DEFAULT_DOMAIN_BYTES,
          seed: int = DEFAULT_SEED, domains: Optional[Sequence[str]] = None) -> dict:
    """Write the corpus to ``out`` (replaced atomically) and return its sources record."""
    chosen_domains = [d for d in DOMAINS if domains is None or d.name in domains]
    unknown = set(domains or ()) - {d.name for d in DOMAINS}
    if unknown:
        raise SystemExit(f"--domains: unknown {sorted(unknown)}; expected some of "
                         f"{[d.name for d in DOMAINS]}")
    status = dpkg_status(root)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)      # mkdtemp's 0700 would hide the corpus from other users
    record = {"seed": seed, "domain_bytes": domain_bytes, "unit_bytes": UNIT_BYTES,
              "root": str(root), "domains": []}
    for d in chosen_domains:
        docs = domain_documents(root, d)
        if not docs:
            shutil.rmtree(tmp)
            raise SystemExit(f"domain {d.name}: no text found under {root} (packages "
                             f"{sorted({p.package for p in d.parts}) or [d.command[0]]} installed?)")
        units = select_units(d.name, docs, domain_bytes, seed)
        (tmp / d.name).mkdir()
        digest = hashlib.sha256()
        with open(tmp / d.name / "text.jsonl", "w", encoding="utf-8") as fh:
            for _, _, u in units:
                line = json.dumps({"text": u}, ensure_ascii=False) + "\n"
                fh.write(line)
                digest.update(line.encode("utf-8"))
        per_pkg: Dict[str, int] = {}
        for pkg, _, u in units:
            per_pkg[pkg] = per_pkg.get(pkg, 0) + len(u.encode("utf-8"))
        avail: Dict[str, int] = {}
        for pkg, _, text in docs:
            avail[pkg] = avail.get(pkg, 0) + len(text.encode("utf-8"))
        record["domains"].append({
            "domain": d.name, "description": d.description, "licence": d.licence,
            "bytes": sum(per_pkg.values()), "units": len(units),
            "available_bytes": sum(avail.values()), "sha256": digest.hexdigest(),
            "packages": [{"package": p, "version": status.get(p, {}).get("Version", "unknown"),
                          "bytes_taken": per_pkg.get(p, 0), "bytes_available": avail[p]}
                         for p in sorted(avail)],
        })
    (tmp / "sources.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    (tmp / "SOURCES.md").write_text(sources_markdown(record), encoding="utf-8")
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return record


def sources_markdown(record: dict) -> str:
    lines = ["# Real-text corpus: sources", "",
             f"Built by benchmarks/real_text/build_corpus.py (seed {record['seed']}, at most "
             f"{record['domain_bytes']:,} bytes per domain plus one unit, units of about "
             f"{record['unit_bytes']} bytes).", "",
             "| domain | bytes | units | content | licence | packages (version: bytes taken / available) |",
             "|---|---:|---:|---|---|---|"]
    for d in record["domains"]:
        pk = [p for p in d["packages"] if p["bytes_taken"]]
        pkgs = "; ".join(f"{p['package']} {p['version']}: {p['bytes_taken']:,} / "
                         f"{p['bytes_available']:,}" for p in pk[:12])
        if len(pk) > 12:
            pkgs += f"; and {len(pk) - 12} more (sources.json)"
        lines.append(f"| {d['domain']} | {d['bytes']:,} | {d['units']:,} | {d['description']} | "
                     f"{d['licence']} | {pkgs} |")
    return "\n".join(lines) + "\n"


def apt_install(packages: Sequence[str]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
                   check=True, env=env)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="corpus folder to write (replaced)")
    ap.add_argument("--root", type=Path, default=Path("/"), help="filesystem root to read (default /)")
    ap.add_argument("--domain-bytes", type=int, default=DEFAULT_DOMAIN_BYTES,
                    help=f"bytes per domain (default {DEFAULT_DOMAIN_BYTES:,})")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="draw order seed (default 0)")
    ap.add_argument("--domains", default=None, help="comma-separated subset of the domains")
    ap.add_argument("--no-install", action="store_true",
                    help="do not run apt-get; read what is installed")
    args = ap.parse_args(argv)
    if args.domain_bytes <= 0:
        ap.error(f"--domain-bytes: expected a positive number of bytes, got {args.domain_bytes}")
    if not args.no_install:
        apt_install(APT_PACKAGES)
    domains = args.domains.split(",") if args.domains else None
    record = build(args.out, args.root, args.domain_bytes, args.seed, domains)
    for d in record["domains"]:
        print(f"{d['domain']:12s} {d['bytes']:>10,} bytes {d['units']:>6,} units "
              f"(of {d['available_bytes']:,} available)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
