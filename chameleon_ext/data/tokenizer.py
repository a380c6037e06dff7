"""Tokenizers for turning domain text into token ids.

Two tokenizers share one small interface (``name``, ``vocab_size``, ``eos_id``, ``encode``,
``encode_array``, ``decode``):

* :class:`ByteTokenizer` -- UTF-8 bytes (ids 0..255) plus one end-of-sequence id (256), so
  257 ids in all. It needs no files and no downloads, which makes it the default for the
  built-in dataset, the CPU demo and the tests.
* :class:`HFTokenizer` -- a Hugging Face tokenizer loaded from a LOCAL folder (never the
  network). ``transformers`` is optional and imported only when this class is used.

``name`` identifies the tokenizer *content*; the dataset layer uses it to key its token caches
and domain fingerprints, so two different tokenizers never share a cache entry.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Protocol, Union, runtime_checkable

import numpy as np

from ..errors import ChameleonUserError

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the dataset layer needs from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0..255 are bytes, id 256 is end-of-sequence (EOS).

    ``decode`` drops EOS ids and replaces invalid UTF-8 (e.g. a window that starts in the middle
    of a multi-byte character) with U+FFFD instead of failing.
    """

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path used when tokenising whole files: ``[n_bytes]`` uint8 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


# Files that define a Hugging Face tokenizer; their bytes make up HFTokenizer.name, so a changed
# vocabulary or merge list gives a different cache key.
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (no network access).

    Args:
        path: folder holding the tokenizer files (``tokenizer.json`` or ``vocab.json`` +
            ``merges.txt``, ...), e.g. a saved GPT-2 checkpoint folder.

    Raises:
        ChameleonUserError: the folder does not exist, ``transformers`` is not installed, the
            tokenizer cannot be loaded, or it defines no EOS token.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ChameleonUserError(
                f"tokenizer: {path!r} is not a folder; expected 'byte' or a local folder "
                "holding a Hugging Face tokenizer"
            )
        try:
            import transformers  # optional dependency, imported lazily on purpose
        except ImportError as exc:
            raise ChameleonUserError(
                f"tokenizer: loading the Hugging Face tokenizer at {path!r} needs the optional "
                "package 'transformers' (pip install transformers); or use tokenizer='byte'"
            ) from exc
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises many unrelated types here
            raise ChameleonUserError(
                f"tokenizer: could not load a Hugging Face tokenizer from {path!r}: {exc}"
            ) from exc
        if tok.eos_token_id is None:
            raise ChameleonUserError(
                f"tokenizer: the tokenizer at {path!r} defines no EOS token; documents are "
                "joined with EOS, so one is required"
            )
        # Whole files are encoded at once; silence the "sequence longer than the model's
        # maximum" warning, which is about model inputs, not about tokenising a corpus.
        tok.model_max_length = int(1e30)
        self._tok = tok
        self.path = path
        self.eos_id = int(tok.eos_token_id)
        # len() includes added tokens, unlike tok.vocab_size.
        self.vocab_size = int(len(tok))
        self.name = "hf-" + _hash_tokenizer_files(path)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _hash_tokenizer_files(path: str) -> str:
    h = hashlib.sha256(b"chameleon_ext.hf_tokenizer/1\0")
    found = False
    for fname in _HF_TOKENIZER_FILES:
        fpath = os.path.join(path, fname)
        if os.path.isfile(fpath):
            found = True
            h.update(fname.encode() + b"\0")
            with open(fpath, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    if not found:  # unusual layout: fall back to the folder's absolute path
        h.update(os.path.abspath(path).encode())
    return h.hexdigest()[:16]


def load_tokenizer(spec: Union[str, os.PathLike, Tokenizer] = "byte") -> Tokenizer:
    """Return a tokenizer from ``spec``: ``"byte"``, a local tokenizer folder, or a tokenizer.

    Raises:
        ChameleonUserError: ``spec`` is neither ``"byte"``, an existing folder nor a tokenizer.
    """
    if isinstance(spec, (ByteTokenizer, HFTokenizer)):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        if os.fspath(spec) == "byte":
            return ByteTokenizer()
        return HFTokenizer(spec)
    if isinstance(spec, Tokenizer):
        return spec
    raise ChameleonUserError(
        f"tokenizer: expected 'byte', a local tokenizer folder or a tokenizer object, "
        f"got {type(spec).__name__}"
    )
