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
:func:`tokenizer_record` is what a saved proxy remembers about its tokenizer (a readable
``name``, the full ``sha256`` of its content and, for a folder, its ``path``), so that a proxy
is never fed ids from another tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from contextlib import contextmanager
from typing import Iterable, Protocol, Union, runtime_checkable

import numpy as np

from ..errors import ChameleonUserError

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "tokenizer_record",
           "has_tokenizer_files", "check_same_tokenizer"]


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

    @property
    def content_hash(self) -> str:
        """sha256 naming the encoding (by ``name``, so a subclass that changes it differs)."""
        return hashlib.sha256(f"chameleon_ext.byte_tokenizer/1\0{self.name}".encode()).hexdigest()

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
        if not has_tokenizer_files(path):
            raise ChameleonUserError(
                f"tokenizer: the folder {path!r} holds no tokenizer files (expected one of "
                f"{', '.join(_TOKENIZER_MARKERS)}); a model-only folder needs --tokenizer FOLDER "
                "naming the folder its tokenizer was saved in"
            )
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises many unrelated types here
            raise ChameleonUserError(
                f"tokenizer: could not load a Hugging Face tokenizer from {path!r}: {exc}"
            ) from exc
        if len(tok) < 2:
            # transformers returns an empty tokenizer (a single special token) when the files
            # do not define a vocabulary; tokenising with it gives no ids at all.
            raise ChameleonUserError(
                f"tokenizer: the tokenizer loaded from {path!r} has {len(tok)} token(s); its files "
                "define no vocabulary (a model-only folder, or a broken tokenizer.json / vocab.json)"
            )
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
        self.content_hash = _hash_tokenizer_files(path)
        self.name = "hf-" + self.content_hash[:16]

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
    return h.hexdigest()


# Any one of these makes a folder a tokenizer folder (a bare special_tokens_map.json does not).
_TOKENIZER_MARKERS = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


def has_tokenizer_files(path: Union[str, os.PathLike]) -> bool:
    """Whether the folder ``path`` holds the files of a tokenizer (not only a model)."""
    return any(os.path.isfile(os.path.join(os.fspath(path), f)) for f in _TOKENIZER_MARKERS)


def tokenizer_record(tok) -> dict:
    """What a saved model remembers about the tokenizer its data was made with:
    ``{"name", "sha256", "path"}`` (``path`` None for the byte tokenizer)."""
    path = getattr(tok, "path", None)
    name = str(getattr(tok, "name", type(tok).__name__))
    # a tokenizer object without a content hash is identified by its name (which keys token caches)
    digest = getattr(tok, "content_hash", None) or hashlib.sha256(name.encode()).hexdigest()
    return {
        "name": str(path or name),
        "sha256": digest,
        "path": None if path is None else os.path.abspath(path),
    }


def check_same_tokenizer(expected: dict, tok, what: str) -> None:
    """Raise unless ``tok`` is the tokenizer ``expected`` (a :func:`tokenizer_record`) describes.

    ``what`` names the owner of ``expected`` in the message (e.g. "the proxy runs/proxy/model.pt").
    """
    got = tokenizer_record(tok)
    if got["sha256"] != expected.get("sha256"):
        raise ChameleonUserError(
            f"tokenizer mismatch: {what} was trained on data tokenised with {expected.get('name')!r} "
            f"(sha256 {str(expected.get('sha256'))[:16]}), but the data is tokenised with {got['name']!r} "
            f"(sha256 {got['sha256'][:16]}); pass --tokenizer with the proxy's tokenizer (or leave it "
            "out to use the one the proxy records)"
        )


@contextmanager
def quiet_libraries(enabled: bool = True):
    """Silence the libraries' chatter while active: transformers' logging (warnings about
    unused weights, ...) and loading bars, and Python warnings issued from transformers,
    huggingface_hub, tokenizers, safetensors or torch. chameleon_ext's own warnings (e.g. a
    damaged cache entry) still show."""
    if not enabled:
        yield
        return
    restore = []
    try:
        import transformers

        tl = transformers.utils.logging
        restore.append((tl.set_verbosity, tl.get_verbosity()))
        tl.set_verbosity_error()
        bars = tl.is_progress_bar_enabled()
        tl.disable_progress_bar()
        if bars:
            restore.append((lambda _: tl.enable_progress_bar(), None))
    except Exception:  # transformers missing or too old: nothing to silence
        pass
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(transformers|huggingface_hub|tokenizers|safetensors|torch)(\.|$)")
        try:
            yield
        finally:
            for fn, value in reversed(restore):
                fn(value)


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
