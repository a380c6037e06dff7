"""A small built-in multi-domain dataset, generated offline and deterministically.

It lets the whole pipeline (proxy training, domain embeddings, leverage scores, mixture
training) run with no downloads. Every domain is about 250 KB of text produced from a seeded
generator: the same seed gives byte-identical files on every machine and Python version (only
``random.Random(str).random()`` is used, whose sequence Python guarantees to keep stable).

The domains are chosen so that the leverage scores have something to find -- a family of
domains that share structure (which Chameleon's pretraining rule should up-weight, since the
others "explain" them) and a few distinctive ones (which its finetuning rule should favour):

==========  ==================================================================  ============
domain      content                                                             structure
==========  ==================================================================  ============
``web``     short web pages: listicles, how-tos, reviews, comments (.jsonl)     shared
``news``    news reports with datelines, figures and quotes (.jsonl)            shared
``books``   long past-tense narrative with dialogue, in chapters (.txt)         shared
``code``    Python-like modules: functions, classes, loops (.py, nested dirs)   half-shared
``math``    arithmetic drills, linear equations, word problems (.txt)           half-shared
``dna``     FASTA records of ACGT sequences from a Markov chain (.fa)           distinctive
``tables``  CSV tables of ids, years and measurements (.csv)                    distinctive
==========  ==================================================================  ============

``web``, ``news`` and ``books`` draw from one English word list and one grammar, differing in
register and sentence length. ``code`` and ``math`` reuse some of that vocabulary (identifiers,
word problems) inside very different syntax. ``dna`` and ``tables`` share almost nothing with
the rest. All arithmetic in ``math`` is correct, so a model can actually learn it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from typing import Callable, Optional, Sequence, Union

from .. import io
from ..errors import ChameleonUserError

__all__ = ["BUILTIN_VERSION", "BUILTIN_DOMAINS", "write_builtin_dataset", "builtin_dataset_path"]

BUILTIN_VERSION = "builtin-v1"
BUILTIN_DOMAINS = ("books", "code", "dna", "math", "news", "tables", "web")
_MARKER = ".complete"  # hidden, so the dataset loader ignores it
_TARGET_CHARS = 250_000  # per domain


class _Rng:
    """Deterministic helpers built only on ``random.Random.random()`` (stable across Pythons)."""

    def __init__(self, key: str):
        self._r = random.Random(key)

    def random(self) -> float:
        return self._r.random()

    def below(self, n: int) -> int:
        return min(int(self._r.random() * n), n - 1)

    def randint(self, lo: int, hi: int) -> int:  # inclusive, like random.randint
        return lo + self.below(hi - lo + 1)

    def choice(self, seq: Sequence):
        return seq[self.below(len(seq))]

    def chance(self, p: float) -> bool:
        return self._r.random() < p


# -- shared English vocabulary ---------------------------------------------------------------

_NOUNS = (
    "garden river market city teacher student engine system window house road bridge story "
    "letter village forest mountain station machine language problem answer question table "
    "kitchen library museum harbour island farmer doctor driver painter council company "
    "project report energy water light music game team school family friend neighbour "
    "morning evening winter summer journey map tower field lamp door boat train"
).split()
# (base, third person, past, -ing)
_VERBS = [tuple(v.split("/")) for v in (
    "build/builds/built/building find/finds/found/finding open/opens/opened/opening "
    "carry/carries/carried/carrying paint/paints/painted/painting visit/visits/visited/visiting "
    "repair/repairs/repaired/repairing watch/watches/watched/watching follow/follows/followed/following "
    "clean/cleans/cleaned/cleaning move/moves/moved/moving share/shares/shared/sharing "
    "plan/plans/planned/planning study/studies/studied/studying test/tests/tested/testing "
    "improve/improves/improved/improving cross/crosses/crossed/crossing close/closes/closed/closing "
    "explore/explores/explored/exploring protect/protects/protected/protecting "
    "change/changes/changed/changing measure/measures/measured/measuring "
    "describe/describes/described/describing choose/chooses/chose/choosing "
    "remember/remembers/remembered/remembering"
).split()]
_ADJS = (
    "old new small large quiet bright dark green cold warm busy empty simple strange narrow "
    "wide careful local public early late heavy light modern ancient golden silver broken "
    "useful famous hidden distant gentle"
).split()
_ADVS = "slowly quickly quietly carefully suddenly finally often rarely gently".split()
_PREPS = "near behind across under over beside beyond inside along through".split()
_NAMES = (
    "Anna Ben Clara David Elena Felix Grace Hugo Iris Jonas Kira Leo Maya Nils Olga Paul Rosa "
    "Sam Tara Victor"
).split()
_SURNAMES = "Keller Moreau Rossi Novak Silva Berg Laurent Fischer Costa Weber".split()
_CITIES = "GENEVA LYON MILAN VIENNA PORTO OSLO ZURICH TURIN BERLIN LISBON".split()
_MONTHS = ("January February March April May June July August September October November "
           "December").split()
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_ROLES = "spokesperson engineer director researcher official analyst manager".split()
_ORGS = ("city council", "regional hospital", "transport authority", "university",
         "energy company", "water board", "national museum")


def _np(r: _Rng, plural: bool = False) -> str:
    """A noun phrase: determiner, optional adjective, noun."""
    noun = r.choice(_NOUNS) + ("s" if plural else "")
    adj = r.choice(_ADJS) + " " if r.chance(0.5) else ""
    det = "the" if plural or r.chance(0.6) else ("an" if (adj or noun)[0] in "aeiou" else "a")
    return f"{det} {adj}{noun}"


def _pp(r: _Rng) -> str:
    return f"{r.choice(_PREPS)} {_np(r)}"


def _clause_past(r: _Rng) -> str:
    subj = r.choice(_NAMES) if r.chance(0.4) else _np(r)
    s = f"{subj} {r.choice(_VERBS)[2]} {_np(r, r.chance(0.3))}"
    return s + (f" {_pp(r)}" if r.chance(0.5) else "")


def _clause_present(r: _Rng) -> str:
    s = f"{_np(r)} {r.choice(_VERBS)[1]} {_np(r, r.chance(0.3))}"
    return s + (f" {_pp(r)}" if r.chance(0.4) else "")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _date(r: _Rng) -> str:
    return f"{r.choice(_MONTHS)} {r.randint(1, 28)}, {r.randint(1995, 2024)}"


# -- domain generators: each returns {relative path: file content} -----------------------------


def _files_until_target(make: Callable[[int], tuple]) -> dict[str, str]:
    """``{name: text}`` from ``make(0)``, ``make(1)``, ... (each a ``(name, text)`` file) until
    the domain holds :data:`_TARGET_CHARS` characters."""
    files, total = {}, 0
    while total < _TARGET_CHARS:
        name, text = make(len(files))
        files[name] = text
        total += len(text)
    return files


def _gen_web(r: _Rng) -> dict[str, str]:
    docs, total = [], 0
    while total < _TARGET_CHARS:
        kind = r.below(3)
        noun, verb = r.choice(_NOUNS), r.choice(_VERBS)
        if kind == 0:
            n = r.randint(3, 7)
            lines = [f"{n} {r.choice(_ADJS)} ways to {verb[0]} your {noun}", ""]
            for i in range(1, n + 1):
                lines.append(f"{i}. {_cap(r.choice(_VERBS)[0])} {_np(r)} {_pp(r)}.")
            lines += ["", f"Click here to {r.choice(_VERBS)[0]} more about {_np(r, True)}."]
        elif kind == 1:
            lines = [f"How to {verb[0]} {_np(r)}", ""]
            for _ in range(r.randint(3, 6)):
                lines.append(f"You can {r.choice(_VERBS)[0]} {_np(r)} {_pp(r)}. "
                             f"{_cap(_clause_present(r))}.")
            lines.append(f"Posted by {r.choice(_NAMES).lower()}{r.randint(1, 99)} on {_date(r)}")
        else:
            stars = r.randint(1, 5)
            lines = [f"Review: the {r.choice(_ADJS)} {noun} ({stars}/5 stars)", ""]
            for _ in range(r.randint(2, 5)):
                lines.append(f"I {verb[2]} {_np(r)} {_pp(r)} and {_clause_present(r)}.")
            lines.append(f"Comments ({r.randint(0, 40)}) | Share | Report")
        text = "\n".join(lines)
        docs.append(json.dumps({"text": text}, ensure_ascii=False))
        total += len(text)
    half = len(docs) // 2
    return {"pages-000.jsonl": "\n".join(docs[:half]) + "\n",
            "pages-001.jsonl": "\n".join(docs[half:]) + "\n"}


def _gen_news(r: _Rng) -> dict[str, str]:
    docs, total = [], 0
    while total < _TARGET_CHARS:
        city, org = r.choice(_CITIES), r.choice(_ORGS)
        paras = [f"{city}, {r.choice(_MONTHS)} {r.randint(1, 28)} (Chameleon News) - The {org} "
                 f"{r.choice(_VERBS)[2]} {_np(r)} on {r.choice(_DAYS)}, officials said."]
        for _ in range(r.randint(2, 5)):
            pick = r.below(3)
            if pick == 0:
                who = f"{r.choice(_NAMES)} {r.choice(_SURNAMES)}"
                paras.append(f"\"We {r.choice(_VERBS)[0]} {_np(r, True)} every "
                             f"{r.choice(_DAYS)},\" said {who}, a {r.choice(_ROLES)} at the {org}.")
            elif pick == 1:
                pct = r.randint(1, 199) / 10
                paras.append(f"The number of {r.choice(_NOUNS)}s {r.choice(['rose', 'fell'])} "
                             f"{pct:.1f} percent to {r.randint(100, 99999)} in {r.choice(_MONTHS)}.")
            else:
                paras.append(f"{_cap(_clause_past(r))}, and {_clause_past(r)}.")
        text = "\n\n".join(paras)
        docs.append(json.dumps({"text": text}, ensure_ascii=False))
        total += len(text)
    return {"articles.jsonl": "\n".join(docs) + "\n"}


def _gen_books(r: _Rng) -> dict[str, str]:
    def book(book: int) -> tuple:
        hero, friend = r.choice(_NAMES), r.choice(_NAMES)
        parts = [f"THE {r.choice(_ADJS).upper()} {r.choice(_NOUNS).upper()}\n"]
        for chapter in range(1, 6):
            parts.append(f"\nChapter {chapter}\n")
            for _ in range(r.randint(3, 6)):
                sents = []
                for _ in range(r.randint(3, 5)):
                    if r.chance(0.3):
                        sents.append(f"\"{_cap(_clause_present(r))},\" {r.choice([hero, friend])} "
                                     f"said {r.choice(_ADVS)}.")
                    else:
                        sents.append(f"{_cap(_clause_past(r))}, and when {_clause_past(r)}, "
                                     f"{hero} {r.choice(_VERBS)[2]} {_np(r)} "
                                     f"{r.choice(_ADVS)} {_pp(r)}.")
                parts.append(" ".join(sents) + "\n")
        text = "\n".join(parts)
        return f"book-{book:02d}.txt", text

    return _files_until_target(book)


def _gen_code(r: _Rng) -> dict[str, str]:
    def module(mod: int) -> tuple:
        noun = r.choice(_NOUNS)
        lines = [f'"""Utilities for {noun} {r.choice(_NOUNS)} handling."""', "",
                 f"import {r.choice(['math', 'os', 'json', 're', 'itertools'])}", "",
                 f"MAX_{noun.upper()} = {r.randint(2, 512)}", ""]
        for _ in range(r.randint(3, 7)):
            verb, obj = r.choice(_VERBS)[0], r.choice(_NOUNS)
            arg, var, k = f"{obj}s", obj[0], r.randint(1, 9)
            if r.chance(0.3):
                cls = _cap(obj)
                lines += [f"class {cls}:", f"    def __init__(self, size={k}):",
                          "        self.size = size", "        self.items = []", "",
                          f"    def {verb}(self, {var}):",
                          "        if len(self.items) < self.size:",
                          f"            self.items.append({var})",
                          "        return len(self.items)", ""]
            else:
                op = r.choice(["+", "-", "*", "//", "%"])
                lines += [f"def {verb}_{obj}({arg}, limit={k}):",
                          f'    """{_cap(verb)} each {obj} {_pp(r)}."""',
                          "    result = []",
                          f"    for {var} in {arg}:",
                          f"        if {var} > limit:",
                          f"            result.append({var} {op} {r.randint(1, 16)})",
                          "        else:",
                          f"            result.append({var})",
                          "    return result", ""]
        text = "\n".join(lines) + "\n"
        pkg = ("core", "util", "io")[mod % 3]
        return f"src/{pkg}/{noun}_{mod:03d}.py", text

    return _files_until_target(module)


def _gen_math(r: _Rng) -> dict[str, str]:
    def exercise_sheet(sheet: int) -> tuple:
        lines = [f"Exercise sheet {sheet + 1}", ""]
        for i in range(1, 61):
            kind = r.below(4)
            if kind == 0:
                a, b = r.randint(2, 999), r.randint(2, 999)
                op = r.choice(["+", "-", "*"])
                val = a + b if op == "+" else a - b if op == "-" else a * b
                lines.append(f"{i}. Compute {a} {op} {b}. Answer: {val}")
            elif kind == 1:
                x, a, b = r.randint(-20, 20), r.randint(2, 12), r.randint(-50, 50)
                sign = "+" if b >= 0 else "-"
                lines.append(f"{i}. Solve for x: {a}x {sign} {abs(b)} = {a * x + b}. "
                             f"Answer: x = {x}")
            elif kind == 2:
                n, price, noun = r.randint(2, 30), r.randint(1, 90), r.choice(_NOUNS)
                lines.append(f"{i}. If one {noun} costs {price} dollars, how much do {n} "
                             f"{noun}s cost? Answer: {n} * {price} = {n * price} dollars")
            else:
                a, b = r.randint(1, 40), r.randint(1, 40)
                lines.append(f"{i}. Expand ({a} + {b})^2. Answer: {a}^2 + 2*{a}*{b} + {b}^2 "
                             f"= {a * a} + {2 * a * b} + {b * b} = {(a + b) ** 2}")
        text = "\n".join(lines) + "\n"
        return f"sheet-{sheet:03d}.txt", text

    return _files_until_target(exercise_sheet)


def _gen_dna(r: _Rng) -> dict[str, str]:
    bases = "ACGT"
    motifs = ["TATAAA", "GGATCC", "GAATTC", "CCGCGG", "TTGACA"]

    def reads(file: int) -> tuple:
        chunks = []
        for j in range(25):
            rec = 25 * file + j  # records are numbered across files
            gc = 0.3 + 0.4 * r.random()  # per-record GC content
            length = r.randint(300, 1200)
            seq, prev = [], r.choice(bases)
            while len(seq) < length:
                if r.chance(0.01):
                    seq.extend(r.choice(motifs))
                    continue
                # first-order Markov chain: repeat the previous base a little more often
                if r.chance(0.15):
                    b = prev
                else:
                    b = r.choice("GC") if r.chance(gc) else r.choice("AT")
                seq.append(b)
                prev = b
            s = "".join(seq[:length])
            lines = [f">seq{rec:05d} chr{r.randint(1, 22)}:{r.randint(1, 10**8)} len={length} "
                     f"gc={sum(c in 'GC' for c in s) / length:.3f}"]
            lines += [s[i:i + 60] for i in range(0, length, 60)]
            chunks.append("\n".join(lines))
        return f"reads-{file:02d}.fa", "\n".join(chunks) + "\n"

    return _files_until_target(reads)


def _gen_tables(r: _Rng) -> dict[str, str]:
    def table(t: int) -> tuple:
        cols = ["id", "region", "year", "count", "mean", "ratio"]
        lines = [",".join(cols)]
        base = r.randint(10, 5000)
        for row in range(400):
            count = max(0, base + r.randint(-base // 3, base // 3))
            lines.append(f"{row + 1},R{r.randint(1, 12):02d},{r.randint(1990, 2024)},{count},"
                         f"{r.random() * 100:.3f},{r.random():.4f}")
        text = "\n".join(lines) + "\n"
        return f"table-{t:03d}.csv", text

    return _files_until_target(table)


_GENERATORS: dict[str, Callable[[_Rng], dict[str, str]]] = {
    "books": _gen_books, "code": _gen_code, "dna": _gen_dna, "math": _gen_math,
    "news": _gen_news, "tables": _gen_tables, "web": _gen_web,
}
assert tuple(sorted(_GENERATORS)) == BUILTIN_DOMAINS


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ChameleonUserError(f"seed: expected a non-negative integer, got {seed!r}")
    return seed


def write_builtin_dataset(path: Union[str, os.PathLike], seed: int = 0) -> str:
    """Write the built-in dataset (one subfolder per domain) into ``path``; return ``path``.

    The same ``seed`` always produces byte-identical files. Existing files with the same names
    are overwritten; nothing else in ``path`` is touched.
    """
    seed = _check_seed(seed)
    path = os.path.abspath(os.fspath(path))
    for domain, gen in _GENERATORS.items():
        # Each domain has its own stream, so adding a domain never changes the others.
        files = gen(_Rng(f"chameleon_ext:{BUILTIN_VERSION}:{seed}:{domain}"))
        for rel, text in files.items():
            _write_file(os.path.join(path, domain, *rel.split("/")), text)
    return path


def _write_file(fpath: str, text: str) -> None:
    """Write one generated file. Not through io.atomic_write: its fsync per file made a build
    (hundreds of small files) ten times slower, and builtin_dataset_path gets atomicity from
    renaming the whole folder; a failure is still one line naming the file, and the partial
    file is removed."""
    try:
        io.fault_point(f"write:{os.path.basename(fpath)}:open")
        os.makedirs(os.path.dirname(fpath), exist_ok=True)
        with open(fpath, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            io.fault_point(f"write:{os.path.basename(fpath)}:data")
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(fpath)
        raise io.write_error(fpath, "built-in dataset file", exc) from exc


def _default_root() -> str:
    env = os.environ.get("CHAMELEON_EXT_CACHE")
    if env:
        return env
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "chameleon_ext")


def builtin_dataset_path(root: Optional[Union[str, os.PathLike]] = None, seed: int = 0) -> str:
    """Folder holding the built-in dataset, generating it on first use (idempotent).

    Args:
        root: parent folder; default ``$CHAMELEON_EXT_CACHE``, else
            ``$XDG_CACHE_HOME/chameleon_ext``, else ``~/.cache/chameleon_ext``.
        seed: generator seed; the folder is ``builtin-v1`` for seed 0, else
            ``builtin-v1-seed<seed>``.

    The dataset is written to a temporary sibling folder and renamed into place once
    complete, so concurrent callers and interrupted runs never see a partial dataset.
    """
    seed = _check_seed(seed)
    root = os.path.abspath(os.fspath(root)) if root is not None else _default_root()
    name = BUILTIN_VERSION if seed == 0 else f"{BUILTIN_VERSION}-seed{seed}"
    target = os.path.join(root, name)
    marker = os.path.join(target, _MARKER)
    if os.path.isfile(marker):
        return target
    if os.path.exists(target):
        raise ChameleonUserError(
            f"builtin dataset: {target!r} exists but is not a complete built-in dataset "
            f"(no {_MARKER} marker); delete it or pass another root"
        )
    # The build folder is named like io's temp files (host and pid), so a build killed outright
    # is recognised, and removed, by the next call.
    io.remove_stale_temps(root, base=name)
    tmp = io.temp_path(os.path.join(root, name))
    try:
        os.makedirs(root, exist_ok=True)
        os.mkdir(tmp, 0o755)
    except OSError as exc:
        raise ChameleonUserError(
            f"builtin dataset: cannot write under {root!r} ({io.os_error_reason(exc)}); pass a "
            "writable root"
        ) from exc
    try:
        write_builtin_dataset(tmp, seed)
        io.write_text(os.path.join(tmp, _MARKER), f"{BUILTIN_VERSION} seed={seed}\n",
                      "built-in dataset marker")
        try:
            os.rename(tmp, target)
        except OSError as exc:
            if not os.path.isfile(marker):  # not a concurrent writer winning the race
                raise ChameleonUserError(
                    f"builtin dataset: cannot move it into place at {target!r} "
                    f"({io.os_error_reason(exc)})") from exc
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target
