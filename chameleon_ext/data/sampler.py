"""Mixture weights and the seeded sampler that draws training batches from them.

:func:`normalize_weights` turns what a user gives (``"uniform"``, a ``{domain: weight}``
mapping, a list) into probabilities; :class:`WeightedDomainSampler` draws each row's domain
with those probabilities, then a random window of that domain, from one seeded
``numpy.random.Generator`` whose state is checkpointed, so the data order is a pure function
of the seed (and of every weight change, see :meth:`WeightedDomainSampler.set_weights`).

A streamed domain (raw text above the stream threshold, no token array) has no window starts
to draw: its rows take the next window of a per-domain buffer of :data:`STREAM_BUFFER_WINDOWS`
windows, refilled by ``dataset.draw_windows`` with a generator seeded by (seed, domain, refill
index). The refill index and the position in the buffer are part of the sampler's state, so a
run is reproducible and resumes exactly; nothing of the corpus is copied to disk.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch

from ..distributed import shard_range
from ..errors import ChameleonUserError
from ..mixture import check_domain_names, check_weights_for

__all__ = ["WeightsLike", "WeightedDomainSampler", "normalize_weights"]

WeightsLike = Union[str, Mapping[str, float], Sequence[float], np.ndarray]
# Windows drawn at once into a streamed domain's buffer: larger amortises the draw's fixed cost
# (compressed shards are streamed per draw), smaller spreads a run over more independent draws.
STREAM_BUFFER_WINDOWS = 256


def normalize_weights(dataset, weights: WeightsLike) -> np.ndarray:
    """Validate mixture ``weights`` against the dataset; return probabilities ``[k]`` float64.

    ``weights`` is ``"uniform"``, a ``{domain: weight}`` mapping naming every domain exactly
    once, or a sequence of k numbers in ``dataset.domains`` order: relative weights, checked as
    every other consumer checks them (:func:`chameleon_ext.mixture.check_weights_for`: finite
    numbers >= 0, ``True`` refused, a positive sum) and normalised to sum to 1.

    Raises:
        ChameleonUserError: naming the offending domain (unknown, missing, negative, NaN, ...).
    """
    names = check_domain_names(dataset.domains, what="dataset domains")
    if isinstance(weights, str):
        if weights != "uniform":
            raise ChameleonUserError(
                f"weights: expected 'uniform', a {{domain: weight}} mapping or a list of "
                f"{len(names)} numbers, got {weights!r}"
            )
        return np.full(len(names), 1.0 / len(names))
    values = np.array(list(check_weights_for(weights, names, "weights", relative=True).values()), dtype=np.float64)
    return values / values.sum()


class WeightedDomainSampler:
    """Seeded batches from a domain mixture: each row's domain drawn with the given weights.

    Every rank runs the *same* seeded stream and draws the domains and window starts of the
    whole global batch, then reads only its own rows,
    ``shard_range(batch_size, rank, world_size)``. The union of the ranks' rows is exactly the
    batch a single process draws, so the data (and, without dropout, the trained weights) do
    not depend on the world size. Drawing the indices of the whole batch costs a few numpy
    calls per batch; only the rank's own windows are read.

    Args:
        dataset: the mixture's domains.
        weights: see :func:`normalize_weights` (``"uniform"`` makes the proxy's mixture).
        block_size: sequence length T; each row is a window of T + 1 tokens split into inputs
            and next-token targets. Windows may cross document boundaries.
        seed: seeds the sampler's own ``numpy.random.Generator``.
        split: ``"train"`` (default) or ``"val"``.
        rank, world_size: this process's place among the data-parallel processes.

    Raises:
        ChameleonUserError: invalid weights, a domain with weight > 0 that holds fewer than
            ``block_size + 1`` tokens, or an invalid rank / world size.
    """

    def __init__(self, dataset, weights: WeightsLike, block_size: int, seed: int = 0,
                 split: str = "train", rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self.domains = list(dataset.domains)
        self.block_size = int(block_size)
        if self.block_size <= 0:
            raise ChameleonUserError(f"block_size: expected a positive integer, got {block_size!r}")
        self.seed, self.split, self.rank, self.world_size = int(seed), split, int(rank), int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ChameleonUserError(
                f"rank/world_size: expected 0 <= rank < world_size, got rank {rank!r} of "
                f"world_size {world_size!r}")
        # Streamed domains draw from buffers (module doc); their start draws are ignored but
        # kept, so the main stream does not depend on which domains are streamed.
        self._streamed = [bool(getattr(dataset, "is_streamed", lambda _: False)(d)) for d in self.domains]
        self._stream_pos = {i: [0, 0] for i, s in enumerate(self._streamed) if s}  # [refills, position]
        self._buffers: dict = {}  # domain index -> (refill index, [STREAM_BUFFER_WINDOWS, T + 1])
        # Highest valid window start per domain (windows are block_size + 1 tokens long).
        self._high = np.array([1 if s else dataset.n_tokens(d, split) - self.block_size
                               for d, s in zip(self.domains, self._streamed)], dtype=np.int64)
        # The weights the run was started with (a resume must be given the same) and the ones
        # in force now (a callback may change them during training, see set_weights).
        self.initial_probs = self._checked(weights)
        self.probs = self.initial_probs
        self.rng = np.random.default_rng([self.seed, 0])

    def _checked(self, weights: WeightsLike) -> np.ndarray:
        probs = normalize_weights(self.dataset, weights)
        active = [d for d, p in zip(self.domains, probs) if p > 0]
        self.dataset.check_window(self.block_size + 1, self.split, domains=active)
        return probs

    @property
    def weights(self) -> dict[str, float]:
        """The mixture in force now, ``{domain: probability}``."""
        return {d: float(p) for d, p in zip(self.domains, self.probs)}

    def set_weights(self, weights: WeightsLike) -> None:
        """Draw the following batches with ``weights`` (validated like the constructor's).

        Every rank must set the same weights before the same batch (the ranks share one
        stream); the weights in force are part of :meth:`state_dict`, so a resumed run
        continues with them.
        """
        self.probs = self._checked(weights)

    def sample(self, batch_size: int):
        """Draw one global batch of ``batch_size`` rows and return this rank's share.

        Returns:
            ``(x, y, domain)``: inputs ``[b, T]`` int64, targets ``[b, T]`` int64 (``x``
            shifted by one), and each row's domain index ``[b]`` int64 into
            ``dataset.domains``, where ``b`` is this rank's share of the rows,
            ``len(shard_range(batch_size, rank, world_size))``.
        """
        B, T = int(batch_size), self.block_size
        dom = self.rng.choice(len(self.domains), size=B, p=self.probs)
        starts = self.rng.integers(0, self._high[dom])  # one start per row, in [0, high)
        # every rank walks the whole batch's streamed rows, so their buffer positions agree
        slots = self._stream_slots(dom) if self._stream_pos else None
        if self.world_size > 1:
            rows = shard_range(B, self.rank, self.world_size)
            dom, starts = dom[rows.start:rows.stop], starts[rows.start:rows.stop]
            if slots is not None:
                slots = slots[rows.start:rows.stop]
        buf = np.empty((dom.shape[0], T + 1), dtype=np.int64)
        for i in range(dom.shape[0]):
            if self._streamed[dom[i]]:
                buf[i] = self._buffer(int(dom[i]), int(slots[i, 0]))[slots[i, 1]]
            else:
                buf[i] = self.dataset.windows_at(self.domains[dom[i]], starts[i:i + 1], T + 1,
                                                 self.split)[0]
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous(), torch.from_numpy(dom.astype(np.int64))

    def _stream_slots(self, dom: np.ndarray) -> np.ndarray:
        """``[B, 2]`` (refill index, position) of each row's buffered window (streamed rows;
        -1 elsewhere), advancing every streamed domain's position over the whole batch."""
        slots = np.full((dom.shape[0], 2), -1, dtype=np.int64)
        for r, i in enumerate(dom.tolist()):
            pos = self._stream_pos.get(i)
            if pos is None:
                continue
            if pos[0] == 0 or pos[1] >= STREAM_BUFFER_WINDOWS:
                pos[0], pos[1] = pos[0] + 1, 0
            slots[r] = (pos[0] - 1, pos[1])
            pos[1] += 1
        return slots

    def _buffer(self, i: int, refill: int) -> np.ndarray:
        """Domain ``i``'s buffer number ``refill``: a pure function of (seed, domain, refill)."""
        held = self._buffers.get(i)
        if held is None or held[0] != refill:
            name = self.domains[i]
            digest = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
            rng = np.random.default_rng([self.seed, digest, refill])
            windows = self.dataset.draw_windows(name, STREAM_BUFFER_WINDOWS, self.block_size + 1, rng, self.split)
            held = self._buffers[i] = (refill, windows)
        return held[1]

    def state_dict(self) -> dict:
        """Everything needed to continue the exact stream (plain Python types only)."""
        state = {"rng": self.rng.bit_generator.state, "domains": self.domains,
                 "weights": [float(p) for p in self.initial_probs], "block_size": self.block_size,
                 "seed": self.seed, "split": self.split, "rank": self.rank,
                 "world_size": self.world_size}
        if self.probs is not self.initial_probs:
            state["current_weights"] = [float(p) for p in self.probs]
        if self._stream_pos:  # streamed domains: [refills drawn, position in the last buffer]
            state["streams"] = {self.domains[i]: list(p) for i, p in self._stream_pos.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the RNG and the weights in force; the mixture the run started with must
        match this sampler's (raises otherwise)."""
        if list(state["domains"]) != self.domains:
            raise ChameleonUserError(
                f"sampler state: saved for domains {list(state['domains'])}, but the dataset has "
                f"{self.domains}"
            )
        if not np.allclose(state["weights"], self.initial_probs, rtol=0, atol=1e-12):
            saved = dict(zip(self.domains, state["weights"]))
            bad = next(d for d, p in zip(self.domains, self.initial_probs)
                       if abs(saved[d] - p) > 1e-12)
            now = float(self.initial_probs[self.domains.index(bad)])
            raise ChameleonUserError(
                f"sampler state: weight of domain {bad!r} was {saved[bad]:.6g} when saved, now "
                f"{now:.6g}; use a new out_dir (or resume=False) to change weights"
            )
        if int(state["block_size"]) != self.block_size:
            raise ChameleonUserError(
                f"sampler state: saved with block_size {state['block_size']}, now {self.block_size}"
            )
        self.rng.bit_generator.state = state["rng"]
        streams = state.get("streams", {})
        if set(streams) != {self.domains[i] for i in self._stream_pos}:
            raise ChameleonUserError(
                f"sampler state: saved with streamed domains {sorted(streams)}, but now "
                f"{sorted(self.domains[i] for i in self._stream_pos)} are streamed; load the data "
                "with the same stream threshold")
        for i in self._stream_pos:
            self._stream_pos[i] = [int(v) for v in streams[self.domains[i]]]
        self._buffers.clear()  # redrawn on demand: each buffer is a function of its refill index
        if "current_weights" in state:
            self.probs = np.asarray(state["current_weights"], dtype=np.float64)
        else:
            self.probs = self.initial_probs
