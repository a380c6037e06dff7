"""Where each domain's data lives, as a trainer format can hold it.

``prefixes`` maps a domain to its path in the trainer's own layout (a Megatron ``.bin``/``.idx``
prefix, OLMo-core ``.npy`` files or globs, a nanotron or Mosaic folder, an ``s3://`` URL...), a
string or a list of them (``chameleon export --prefix web=A --prefix web=B``); a domain it does
not name uses its own name. Every check here raises before any file is written.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Mapping, Optional, Sequence, Union

from ..errors import ChameleonUserError
from .text import reads_as_number

__all__ = ["Prefixes", "paths_of", "one_path", "resolved", "distinct", "megatron_prefix", "megatron_tokens"]

Prefixes = Optional[Mapping[str, Union[str, Sequence[str]]]]


def paths_of(domain: str, prefixes: Prefixes, fmt: str) -> List[str]:
    """The domain's path(s): ``prefixes[domain]`` (a string or a list) or the domain's name."""
    if prefixes is None:
        value: Union[str, Sequence[str]] = domain
    elif not isinstance(prefixes, Mapping):
        raise ChameleonUserError(f"{fmt}: prefixes must map domain -> path, got {type(prefixes).__name__}")
    else:
        value = prefixes.get(domain, domain)
    paths = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not paths or any(not isinstance(p, str) or not p for p in paths):
        raise ChameleonUserError(
            f"{fmt}: path of domain {domain!r} must be a non-empty string (or a list of them), got {value!r}")
    if len(set(paths)) != len(paths):
        raise ChameleonUserError(f"{fmt}: domain {domain!r} lists the same path twice ({paths})")
    return paths


def one_path(domain: str, prefixes: Prefixes, fmt: str, several: str = "") -> str:
    paths = paths_of(domain, prefixes, fmt)
    if len(paths) != 1:
        raise ChameleonUserError(
            f"{fmt}: domain {domain!r} has {len(paths)} paths; this format takes one per domain"
            f"{several or ' (olmo-core and the Megatron formats take several)'}")
    return paths[0]


def resolved(domains, prefixes: Prefixes, fmt: str) -> Dict[str, str]:
    return {d: one_path(d, prefixes, fmt) for d in domains}


def distinct(paths: Mapping[str, Sequence[str]], fmt: str) -> None:
    """No path under two domains: the trainer would read the same files as both and add their
    weights."""
    owner: Dict[str, str] = {}
    for domain, value in paths.items():
        for path in [value] if isinstance(value, str) else value:
            if path in owner:
                raise ChameleonUserError(f"{fmt}: domains {owner[path]!r} and {domain!r} share the path {path!r}")
            owner[path] = domain


def megatron_prefix(domain: str, prefix: str, fmt: str) -> str:
    """A prefix Megatron's blend parser reads back unchanged: it splits on whitespace, some
    front ends split lists on commas, and anything that parses as a float is a weight."""
    if any(ch.isspace() for ch in prefix):
        raise ChameleonUserError(
            f"{fmt}: path {prefix!r} of domain {domain!r} contains whitespace, which the format cannot "
            "hold (the blend is split on whitespace); rename or symlink the data")
    if "," in prefix:
        raise ChameleonUserError(
            f"{fmt}: path {prefix!r} of domain {domain!r} contains a comma, which the format cannot hold; "
            "rename or symlink the data")
    if reads_as_number(prefix):
        raise ChameleonUserError(
            f"{fmt}: path {prefix!r} of domain {domain!r} reads as a number, which the blend parser would "
            "take for a weight; use a path such as ./" + prefix)
    return prefix


# The Megatron indexed-dataset index: magic, version (<Q), dtype code (<B), sequence count
# (<Q), document count (<Q), then one int32 length per sequence.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEAD = struct.Struct("<QBQQ")


def megatron_tokens(domain: str, prefix: str, fmt: str) -> int:
    """Tokens in the Megatron indexed dataset ``prefix`` (the sum of ``prefix.idx``'s sequence
    lengths). Needed when a domain has several prefixes: Megatron weights each prefix on its
    own, so the domain's weight is split over them by their tokens."""
    import numpy as np

    path = prefix + ".idx"
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_IDX_MAGIC))
            head = f.read(_IDX_HEAD.size)
            if magic != _IDX_MAGIC or len(head) != _IDX_HEAD.size:
                raise ChameleonUserError(f"{fmt}: {path} (domain {domain!r}) is not a Megatron .idx file")
            _, _, n_seq, _ = _IDX_HEAD.unpack(head)
            lengths = np.fromfile(f, dtype="<i4", count=n_seq)
    except OSError as exc:
        raise ChameleonUserError(
            f"{fmt}: domain {domain!r} has several prefixes, so its weight is split over them by their "
            f"tokens, but {path} cannot be read ({exc.strerror or exc}); export where the data is, or give "
            "one prefix per domain") from None
    if len(lengths) != n_seq:
        raise ChameleonUserError(f"{fmt}: {path} (domain {domain!r}) is truncated")
    return int(lengths.astype(np.int64).sum())


