"""Plumbing shared by the sources: file identity fingerprints and argument checks."""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from ...errors import ChameleonUserError


MIB = 1 << 20
_FINGERPRINT_FORMAT = "chameleon_ext.source_fingerprint/1"


def file_fingerprint(path: str, full: bool = False) -> str:
    """Hex sha256 identifying a file for cache keys.

    Default: absolute path, size, mtime (ns) and the first and last MiB of content -- cheap on
    any size. ``full=True``: size and every byte (path and mtime left out, so copies agree).

    Raises:
        ChameleonUserError: the file cannot be read.
    """
    try:
        st = os.stat(path)
        h = hashlib.sha256(f"{_FINGERPRINT_FORMAT}\0{'full' if full else 'identity'}\0".encode())
        if not full:
            h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        else:
            h.update(f"{st.st_size}\0".encode())
        with open(path, "rb") as f:
            if full:
                for block in iter(lambda: f.read(MIB), b""):
                    h.update(block)
            else:
                h.update(f.read(MIB))
                if st.st_size > 2 * MIB:
                    f.seek(st.st_size - MIB)
                    h.update(f.read(MIB))
                elif st.st_size > MIB:
                    h.update(f.read())
    except OSError as exc:
        raise ChameleonUserError(f"cannot read file {path!r}: {exc.strerror or exc}") from exc
    return h.hexdigest()


def combine_fingerprints(kind: str, parts: Sequence[str]) -> str:
    """One fingerprint of ``kind`` over the fingerprints (or other strings) ``parts``, in order."""
    h = hashlib.sha256(f"{_FINGERPRINT_FORMAT}\0{kind}\0".encode())
    for p in parts:
        h.update(p.encode() + b"\0")
    return h.hexdigest()


def file_size(path: str) -> int:
    """Bytes in ``path``; an unreadable file is a one-line user error naming it."""
    try:
        return os.path.getsize(path)
    except OSError as exc:
        raise ChameleonUserError(f"cannot read file {path!r}: {exc.strerror or exc}") from exc


def check_counts(n, window):
    """``(n, window)`` as ints: ``n`` windows (>= 0) of ``window`` tokens (>= 1) to draw."""
    for name, v in (("n", n), ("window", window)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name == "n" else 1):
            raise ChameleonUserError(f"{name}: expected a {'non-negative' if name == 'n' else 'positive'} "
                                     f"integer, got {v!r}")
    return int(n), int(window)
