"""Raw-text domains: blocks, the window draw over them (package docstring), token estimates."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import numpy as np

from ...errors import ChameleonUserError
from .common import check_counts, combine_fingerprints, file_fingerprint


def encode(tok, text: str, int64: bool = True) -> np.ndarray:
    """``text`` as token ids ``[n]`` (the tokenizer's ``encode_array`` where it has one): int64,
    or with ``int64=False`` the tokenizer's own dtype (the token cache writes them as they come,
    without an 8-byte copy of every chunk)."""
    enc = getattr(tok, "encode_array", None)
    ids = enc(text) if enc is not None else np.asarray(tok.encode(text), dtype=np.int64)
    return np.asarray(ids, dtype=np.int64) if int64 else ids


_SPLIT_ROUNDS = 64  # rounds of redraws before a split is declared too small


def _val_hash(key) -> float:
    """A unit's split coordinate in [0, 1): stable across runs, machines and data moves."""
    digest = hashlib.blake2b(repr(key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


@dataclass
class SampleStats:
    """What a raw-text draw read, for estimating token counts without tokenising everything."""

    unit_bytes: int = 0  # bytes of the documents/lines tokenised, as blocks are weighted
    tokens: int = 0  # tokens they gave (EOS included)
    blocks_read: int = 0
    # per kind of block whose weight only approximates its text bytes (compressed shards,
    # Parquet metadata sizes): [sum of the weights of those read, sum of their true bytes]
    rescale: dict = field(default_factory=dict)

    def measured(self, key: str, weight: int, true_bytes: int) -> None:
        w = self.rescale.setdefault(key, [0, 0])
        w[0] += weight
        w[1] += true_bytes

    def add(self, unit_bytes: int, n_tokens: int) -> None:
        self.unit_bytes += unit_bytes
        self.tokens += n_tokens


class Window:
    """One window being assembled: tokens gathered so far, and ``key``, the position of the
    unit (line, row) it starts in, which decides its train/validation split."""

    __slots__ = ("parts", "have", "need", "key")

    def __init__(self, need: int):
        self.parts, self.have, self.need, self.key = [], 0, need, None

    def feed(self, toks: np.ndarray) -> None:
        take = toks[: self.need - self.have]
        if take.size:
            self.parts.append(take)
            self.have += take.size

    @property
    def full(self) -> bool:
        return self.have >= self.need

    def tokens(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.int64)


def start_at(toks: np.ndarray, fraction: float) -> np.ndarray:
    """Tokens of a document from its token at relative position ``fraction`` in [0, 1)."""
    return toks[int(fraction * toks.size):]


class Block:
    """A unit read at once; ``weight`` is its share of the domain (bytes, see the package docstring)."""

    weight: int
    sequential: bool  # True: reading any of it costs reading (most of) it
    rescale_key: Optional[str] = None  # set when ``weight`` approximates the unit bytes
    label: str

    def windows(self, rng, k, window, tok, stats) -> List[Window]:
        """``k`` windows started in this block (possibly short at its end)."""
        raise NotImplementedError

    def head(self, n, tok, stats) -> np.ndarray:
        """The block's first ``n`` tokens (fewer if it holds fewer), for windows that continue."""
        raise NotImplementedError

    def documents(self) -> Iterator[Iterator[str]]:
        """Every document in order, each as an iterator of text pieces (for full tokenisation)."""
        raise NotImplementedError


class TextSource:
    """One raw-text file (or ``save_to_disk`` folder): its blocks and their cheap sizes.

    Attributes:
        path: the file or folder.
        format: ``"text"``, ``"jsonl"``, ``"jsonl.gz"``, ``"jsonl.zst"``, ``"parquet"`` or ``"arrow"``.
    """

    path: str
    format: str

    def blocks(self) -> List[Block]:
        raise NotImplementedError

    def files(self) -> List[str]:
        return [self.path]

    def fingerprint(self, full: bool = False) -> str:
        return combine_fingerprints(f"text:{self.format}:{getattr(self, 'text_field', '')}",
                        [file_fingerprint(f, full) for f in self.files()])


class TextSources:
    """A raw-text domain: its sources' blocks, drawn as the package docstring describes.

    Args:
        sources: the domain's sources, in a fixed (sorted) order.
        max_sequential_blocks: most compressed shards / Parquet row groups read per draw.
    """

    kind = "text"

    def __init__(self, sources: Sequence[TextSource], max_sequential_blocks: int = 8, path: str = ""):
        if isinstance(max_sequential_blocks, bool) or not isinstance(max_sequential_blocks, int) \
                or max_sequential_blocks < 1:
            raise ChameleonUserError(
                f"max_sequential_blocks: expected a positive integer, got {max_sequential_blocks!r}"
            )
        self.sources = list(sources)
        self.path = path
        self.max_sequential_blocks = max_sequential_blocks
        self.blocks = [b for s in self.sources for b in s.blocks()]
        # names for split keys: relative to the domain, so moving the data keeps the split
        base = path or os.path.commonpath([s.path for s in self.sources] or ["/"])
        self._names = [os.path.relpath(getattr(b, "path", "") or b.source.path, base) + f"#{getattr(b, 'index', 0)}"
                       for b in self.blocks]
        self.weights = np.array([b.weight for b in self.blocks], dtype=np.float64)
        self.n_bytes = int(self.weights.sum())
        self.last_stats = SampleStats()

    def iter_documents(self) -> Iterator[Iterator[str]]:
        """Every document of the domain in order, each an iterator of text pieces (a plain text
        file: its 1 MiB pieces). For small domains that are tokenised whole into a cache; the
        join rule is the samplers': EOS after every document."""
        for b in self.blocks:
            yield from b.documents()

    def fingerprint(self, full: bool = False) -> str:
        return combine_fingerprints("text", [s.fingerprint(full) for s in self.sources])

    def _draw_blocks(self, rng, n) -> np.ndarray:
        p = self.weights / self.weights.sum()
        drawn = rng.choice(len(self.blocks), size=n, p=p)
        seq = np.array([b.sequential for b in self.blocks])
        in_seq = np.flatnonzero(seq[drawn])
        if np.unique(drawn[in_seq]).size > self.max_sequential_blocks:
            # cluster sample: a few sequential blocks drawn by size, each draw takes one of them
            # uniformly, so a draw still lands in a block with probability proportional to size
            ps = np.where(seq, self.weights, 0.0)
            slots = rng.choice(len(self.blocks), size=self.max_sequential_blocks, p=ps / ps.sum())
            drawn[in_seq] = slots[rng.integers(0, self.max_sequential_blocks, size=in_seq.size)]
        return drawn

    def sample_windows(self, rng: np.random.Generator, n: int, window: int, tokenizer,
                       split: Optional[str] = None, val_fraction: float = 0.1) -> np.ndarray:
        """``n`` windows ``[n, window]`` int64 drawn as the package docstring describes.

        Only the drawn documents (and the ones a window runs on into) are tokenised; what was
        read is in :attr:`last_stats`.

        ``split="train"`` / ``"val"``: only windows that start in a unit (JSONL line, text line,
        row) of that split; a unit is in ``val`` when a hash of its file (relative to the
        domain) and position falls below ``val_fraction``. Draws outside the split are redrawn
        in further rounds (so ``val`` costs about ``1 / val_fraction`` draws per window); the
        draw stays proportional to size within the split. ``None``: the whole domain.

        Raises:
            ChameleonUserError: the domain is empty or holds fewer than ``window`` tokens, a
                file is corrupt, truncated or lacks the text field, or the split is empty.
        """
        n, window = check_counts(n, window)
        if split not in (None, "train", "val"):
            raise ChameleonUserError(f"split: expected None, 'train' or 'val', got {split!r}")
        if split is not None and not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
            raise ChameleonUserError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
        stats = SampleStats()
        self.last_stats = stats
        if not self.blocks or self.n_bytes == 0:
            raise ChameleonUserError(f"domain {self.path!r} is empty: its files hold no text")
        if split is None:
            return np.stack([w for w, _ in self._draw(rng, n, window, tokenizer, stats)]) if n else \
                np.zeros((0, window), np.int64)
        share = val_fraction if split == "val" else 1.0 - val_fraction
        kept: List[np.ndarray] = []
        for _ in range(_SPLIT_ROUNDS):
            if len(kept) >= n:
                break
            need = n - len(kept)
            m = min(int(np.ceil(need / share * 1.2)) + 8, 16 * need + 64)  # bounded rounds
            for w, key in self._draw(rng, m, window, tokenizer, stats):
                if (_val_hash(key) < val_fraction) == (split == "val") and len(kept) < n:
                    kept.append(w)
        if len(kept) < n:
            raise ChameleonUserError(
                f"domain {self.path!r}: its {split!r} split (val_fraction {val_fraction}) is too "
                f"small to draw {n} windows from; it holds too few documents"
            )
        return np.stack(kept) if n else np.zeros((0, window), np.int64)

    def _draw(self, rng, n, window, tokenizer, stats) -> List[tuple]:
        """``n`` filled windows with the split key of the unit each starts in."""
        drawn = self._draw_blocks(rng, n)
        seeds = rng.integers(0, 2 ** 63, size=len(self.blocks))
        out: List[Optional[tuple]] = [None] * n
        short = []  # (row, window) that ran off the end of their block
        for b in np.unique(drawn):
            rows = np.flatnonzero(drawn == b)
            ws = self.blocks[b].windows(np.random.default_rng(int(seeds[b])), rows.size, window,
                                        tokenizer, stats)
            for r, w in zip(rows, ws):
                w.key = (self._names[b], w.key)
                if w.full:
                    out[r] = (w.tokens(), w.key)
                else:
                    short.append((int(r), int(b), w))
        heads = {}
        for r, b, w in short:  # continue into the next blocks, cyclically
            step = 1
            while not w.full:
                if step > len(self.blocks):
                    raise ChameleonUserError(
                        f"domain {self.path!r} is shorter than one window: a window needs {window} "
                        "tokens"
                    )
                nb = (b + step) % len(self.blocks)
                if nb not in heads:  # a head shorter than a window is the whole block
                    heads[nb] = self.blocks[nb].head(window, tokenizer, stats)
                w.feed(heads[nb])
                step += 1
            out[r] = (w.tokens(), w.key)
        return out

    def estimated_tokens(self, stats: Optional[SampleStats] = None) -> int:
        """The domain's tokens estimated from a draw's tokens per byte (``last_stats``).

        Blocks whose weight only approximates their bytes (compressed shards, Parquet row
        groups) are scaled by the true/weighed ratio of the blocks of their kind the draw read.
        """
        s = stats or self.last_stats
        if s.unit_bytes == 0:
            raise ChameleonUserError("estimated_tokens: draw windows first (sample_windows)")
        per_byte = s.tokens / s.unit_bytes
        ratio = {k: (t / w if w else 1.0) for k, (w, t) in s.rescale.items()}
        total = sum(b.weight * ratio.get(b.rescale_key, 1.0) for b in self.blocks)
        return int(round(total * per_byte))
