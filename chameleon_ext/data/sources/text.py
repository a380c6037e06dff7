"""Raw-text domains: blocks, the window draw over them (package docstring), token estimates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import numpy as np

from ...errors import ChameleonUserError
from .common import _check_counts, _combine, file_fingerprint


def _encode(tok, text: str) -> np.ndarray:
    enc = getattr(tok, "encode_array", None)
    ids = enc(text) if enc is not None else np.asarray(tok.encode(text), dtype=np.int64)
    return np.asarray(ids, dtype=np.int64)


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


class _Window:
    """One window being assembled: tokens gathered so far."""

    __slots__ = ("parts", "have", "need")

    def __init__(self, need: int):
        self.parts, self.have, self.need = [], 0, need

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


def _start_at(toks: np.ndarray, fraction: float) -> np.ndarray:
    """Tokens of a document from its token at relative position ``fraction`` in [0, 1)."""
    return toks[int(fraction * toks.size):]


class _Block:
    """A unit read at once; ``weight`` is its share of the domain (bytes, see the package docstring)."""

    weight: int
    sequential: bool  # True: reading any of it costs reading (most of) it
    rescale_key: Optional[str] = None  # set when ``weight`` approximates the unit bytes
    label: str

    def windows(self, rng, k, window, tok, stats) -> List[_Window]:
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

    def blocks(self) -> List[_Block]:
        raise NotImplementedError

    def files(self) -> List[str]:
        return [self.path]

    def sizes(self) -> List[int]:
        """Each block's weight (bytes, see the package docstring); no text is read."""
        return [b.weight for b in self.blocks()]

    def fingerprint(self, full: bool = False) -> str:
        return _combine(f"text:{self.format}:{getattr(self, 'text_field', '')}",
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
        self.weights = np.array([b.weight for b in self.blocks], dtype=np.float64)
        self.n_bytes = int(self.weights.sum())
        self.last_stats = SampleStats()

    def sizes(self) -> List[int]:
        return [b.weight for b in self.blocks]

    def iter_documents(self) -> Iterator[Iterator[str]]:
        """Every document of the domain in order, each an iterator of text pieces (a plain text
        file: its 1 MiB pieces). For small domains that are tokenised whole into a cache; the
        join rule is the samplers': EOS after every document."""
        for b in self.blocks:
            yield from b.documents()

    def fingerprint(self, full: bool = False) -> str:
        return _combine("text", [s.fingerprint(full) for s in self.sources])

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

    def sample_windows(self, rng: np.random.Generator, n: int, window: int, tokenizer) -> np.ndarray:
        """``n`` windows ``[n, window]`` int64 drawn as the package docstring describes.

        Only the drawn documents (and the ones a window runs on into) are tokenised; what was
        read is in :attr:`last_stats`.

        Raises:
            ChameleonUserError: the domain is empty or holds fewer than ``window`` tokens, or a
                file is corrupt, truncated or lacks the text field.
        """
        n, window = _check_counts(n, window)
        stats = SampleStats()
        self.last_stats = stats
        if not self.blocks or self.n_bytes == 0:
            raise ChameleonUserError(f"domain {self.path!r} is empty: its files hold no text")
        drawn = self._draw_blocks(rng, n)
        seeds = rng.integers(0, 2 ** 63, size=len(self.blocks))
        out = np.empty((n, window), dtype=np.int64)
        short = []  # (row, window) that ran off the end of their block
        for b in np.unique(drawn):
            rows = np.flatnonzero(drawn == b)
            ws = self.blocks[b].windows(np.random.default_rng(int(seeds[b])), rows.size, window,
                                        tokenizer, stats)
            for r, w in zip(rows, ws):
                if w.full:
                    out[r] = w.tokens()
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
            out[r] = w.tokens()
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
