"""Output sets that are entirely old or entirely new.

``chameleon weights`` writes several files into one folder (weights.json, the embeddings, the
exports, the pictures). Each file is replaced atomically (:mod:`chameleon_ext.io`), but a kill
between two of them would leave a new ``weights.json`` beside the previous run's exports. So a
writer of a set:

1. writes ``manifest.json`` saying ``"complete": false`` before the first file;
2. writes its files;
3. writes ``manifest.json`` last, with ``"complete": true`` and the sha256 of every file.

Every reader of a file of such a folder (:func:`chameleon_ext.exports.load_weights`,
``--embeddings``) calls :func:`check_member`: an interrupted set, or a file whose hash is not
the recorded one (another run wrote it since), is an error naming the file. A folder without a
manifest (written before this format existed, or a hand-made file) is read as before.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable

from . import io
from .errors import ChameleonUserError

__all__ = ["MANIFEST_NAME", "MANIFEST_FORMAT", "begin_set", "finish_set", "check_member"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "chameleon_ext.output_set/1"


def begin_set(folder: str) -> None:
    """Mark ``folder``'s set as being rewritten (before its first file is replaced)."""
    io.write_json(os.path.join(folder, MANIFEST_NAME), {"format": MANIFEST_FORMAT, "complete": False},
                  "output-set manifest")


def finish_set(folder: str, paths: Iterable[str]) -> str:
    """Record the sha256 of ``paths`` (files in ``folder``) and mark the set complete."""
    files: Dict[str, str] = {}
    for path in paths:
        name = os.path.basename(path)
        if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):
            continue  # only the folder's own files belong to its set
        files[name] = io.file_sha256(path)
    doc = {"format": MANIFEST_FORMAT, "complete": True, "files": dict(sorted(files.items()))}
    return io.write_json(os.path.join(folder, MANIFEST_NAME), doc, "output-set manifest")


def check_member(path: str, what: str = "file") -> None:
    """Raise ChameleonUserError if ``path`` belongs to an interrupted or mixed output set."""
    path = os.fspath(path)
    manifest = os.path.join(os.path.dirname(os.path.abspath(path)), MANIFEST_NAME)
    if not os.path.exists(manifest) or os.path.basename(path) == MANIFEST_NAME:
        return
    doc = io.read_json(manifest, "output-set manifest")
    if doc.get("format") != MANIFEST_FORMAT:
        raise ChameleonUserError(f"output-set manifest {manifest!r} has an unknown format {doc.get('format')!r}")
    if doc.get("complete") is not True:
        raise ChameleonUserError(
            f"{what} {path!r} belongs to an incomplete output set: the run writing {os.path.dirname(manifest)!r} "
            "was interrupted (see manifest.json); run it again")
    files = doc.get("files")
    if not isinstance(files, dict):
        raise ChameleonUserError(f"output-set manifest {manifest!r} has no 'files' table")
    recorded = files.get(os.path.basename(path))
    if recorded is None:
        return  # a file added by hand beside the set: not part of it
    if io.file_sha256(path) != recorded:
        raise ChameleonUserError(
            f"{what} {path!r} does not match its output set (its sha256 differs from manifest.json): "
            "it was rewritten by another run or by hand; rerun the command that wrote the folder")
