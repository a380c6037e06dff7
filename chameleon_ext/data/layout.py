"""Dataset layout: which folders are domains, which files a domain holds, and where the
token cache may live.

A dataset is a folder with one subfolder per domain; the subfolder name is the domain name and
domains are listed in sorted order (hidden entries, i.e. names starting with ``.``, are
skipped, which is also how the default cache folder ``.chameleon_cache`` stays out of the way).
A domain's files are every non-hidden file under its folder, read recursively. Links are
followed, but each real folder and file is read once, so a link loop (``loop -> .``) or a
second link to a file cannot repeat text; a broken link (or a loop of links) is an error
naming it, not silently skipped.

The cache folder must not be read as data: ``cache_dir`` may be outside the data folder or
under a hidden folder in it (the default), but never the data folder itself nor a folder the
loader would list (a domain folder, a folder inside one, or a non-hidden folder of the data
folder, which would become a domain); such a ``cache_dir`` is refused, naming the domain.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Optional, Sequence

from .. import io
from ..errors import ChameleonUserError

__all__ = ["DEFAULT_CACHE_DIRNAME", "check_cache_location", "check_link", "domain_errors", "domain_names",
           "list_files", "safe_name"]

DEFAULT_CACHE_DIRNAME = ".chameleon_cache"


def domain_names(path: str) -> list:
    """The domain names of the data folder ``path``: its non-hidden subfolders, sorted (a
    broken link among its entries is an error)."""
    entries = sorted(e for e in listdir(path, f"data folder {path!r}") if not e.startswith("."))
    for e in entries:
        check_link(os.path.join(path, e), f"data folder {path!r}: entry {e!r}")
    return [e for e in entries if os.path.isdir(os.path.join(path, e))]


def check_link(full: str, what: str) -> None:
    """A link that leads nowhere (a missing target, or a loop of links) would silently drop the
    data it was meant to add: an error naming it."""
    if os.path.islink(full) and not os.path.exists(full):
        raise ChameleonUserError(
            f"{what} is a broken link ({full!r} -> {os.readlink(full)!r}: its target does not "
            "exist or is a loop of links); fix or remove it")


def check_cache_location(path: str, cache_dir: str, names: list) -> None:
    """Refuse a cache folder that the loader would read as data (or that would hide data):
    the data folder itself, or a folder reached from it through non-hidden names only."""
    real_data, real_cache = os.path.realpath(path), os.path.realpath(cache_dir)
    hint = (f"put it outside the data folder or in a hidden folder such as "
            f"{os.path.join(path, DEFAULT_CACHE_DIRNAME)!r} (the default)")
    if real_cache == real_data:
        raise ChameleonUserError(
            f"cache_dir {cache_dir!r} is the data folder itself: its index/ subfolder would be "
            f"read as a domain; {hint}")
    for name in names:  # through its real path: a domain may be a link to elsewhere
        parts = _visible_parts(real_cache, os.path.realpath(os.path.join(path, name)))
        if parts is not None:
            raise ChameleonUserError(
                f"cache_dir {cache_dir!r} is inside domain {name!r}: that domain would be "
                f"dropped or would read the token cache as its text; {hint}")
    parts = _visible_parts(real_cache, real_data)
    if parts:
        raise ChameleonUserError(
            f"cache_dir {cache_dir!r} is a non-hidden folder of the data folder {path!r}: it "
            f"would be read as a domain named {parts[0]!r}; {hint}")


def _visible_parts(real: str, real_base: str) -> Optional[list]:
    """The path of ``real`` below ``real_base`` as a list of names, if it is inside it and no
    name is hidden (so a folder listing would reach it); else None."""
    rel = os.path.relpath(real, real_base)
    if rel == ".":
        return []
    parts = rel.split(os.sep)
    if parts[0] == ".." or any(p.startswith(".") for p in parts):
        return None
    return parts


def listdir(path: str, what: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as exc:
        raise ChameleonUserError(f"{what} cannot be read: {exc.strerror or exc}") from exc


def safe_name(name: str) -> str:
    """``name`` as a file-name part of cache entries."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "domain"


def list_files(name: str, dpath: str, skip: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Sorted ``(relpath, abspath)`` of every non-hidden file under ``dpath``.

    Links are followed, but each real folder is listed once and each real file read once: a
    link back up the tree (``loop -> .``) or a second link to a file already listed would
    otherwise repeat the same text, and the validation split would then copy training text.
    A link to a folder listed earlier in sorted order is skipped, as is its content, and so
    are the real folders in ``skip`` (the token cache, should a link lead to it).
    """
    found, seen_dirs = [], {os.path.realpath(p) for p in skip}
    stack = [(dpath, "")]
    while stack:
        folder, rel = stack.pop()
        real = os.path.realpath(folder)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        try:
            entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
        except OSError as exc:
            raise ChameleonUserError(
                f"domain {name!r}: cannot read folder {folder!r}: {io.os_error_reason(exc)}"
            ) from exc
        subdirs = []
        for entry in entries:
            full = os.path.join(folder, entry)
            if os.path.isdir(full):
                subdirs.append((full, f"{rel}{entry}/"))
            elif os.path.isfile(full):  # FIFOs and devices are not data
                found.append((f"{rel}{entry}", full))
            else:
                check_link(full, f"domain {name!r}: {rel}{entry}")
        stack.extend(reversed(subdirs))  # depth first, in sorted order
    found.sort()
    out, seen_files = [], set()
    for rel, full in found:
        real = os.path.realpath(full)
        if real not in seen_files:
            seen_files.add(real)
            out.append((rel, full))
    return out



@contextmanager
def domain_errors(name: str):
    """Name domain ``name`` in the file errors of the readers below it (``file '...' ...``), so
    the same fault reads the same whether the domain is cached or streamed."""
    try:
        yield
    except ChameleonUserError as exc:
        msg = str(exc)
        if msg.startswith(("file ", "cannot read file ")):
            raise type(exc)(f"domain {name!r}: {msg}") from None
        raise
