"""Minimal, exactly-resumable trainer for mixture training (proxy, base model, finetuning).

Chameleon trains twice: a small *proxy* on the uniform mixture of the k domains (METHOD.md,
step 1), then the base model with domain ``i`` sampled with probability ``alpha_i`` (step 6).
Both are :func:`train` with different ``weights``; finetuning is :func:`train` with
``init_from`` pointing at a trained model.

Design points:

* **Data order is a pure function of the seed.** :class:`WeightedDomainSampler` draws each
  sequence's domain with the mixture weights, then a random window of that domain, from one
  seeded ``numpy.random.Generator`` whose state is checkpointed.
* **Exact resume.** A checkpoint holds the model, optimiser, schedule, sampler and every RNG
  state (torch CPU/CUDA, numpy, python) with the step, so stopping at step N and resuming
  gives bitwise the same parameters on CPU as an uninterrupted run. Checkpoints are written
  atomically (temp file + fsync + ``os.replace``), so a crash mid-save keeps the previous one
  and a killed run loses at most the steps since the last checkpoint.
* **Fixed evaluation windows.** :func:`evaluate` always scores the same held-out windows for
  a given seed, so numbers are comparable across steps and runs.
* **Data parallel on torch.distributed.** Under ``torchrun`` (after
  :func:`chameleon_ext.distributed.init_from_env`) :func:`train` wraps the model in
  ``DistributedDataParallel``; ``TrainConfig.batch_size`` stays the *global* batch, and every
  rank reads its share of the rows of the same seeded global stream, so the data, and the
  result up to float rounding, do not depend on the number of processes. Rank 0 alone
  writes files; checkpoints hold every rank's sampler and RNG state and the world size.
  :func:`evaluate` shards the fixed windows across ranks and all-reduces the sums. A rank
  that fails stops the others (see the notes above :func:`_agree`). ``docs/distributed.md``
  has the launch commands.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import distributed as _dist
from .data.dataset import MixtureDataset
from .distributed import shard_range
from .errors import ChameleonUserError
from .model import GPT, atomic_save, load_model, save_model, state_dict_sha256

__all__ = [
    "WeightedDomainSampler",
    "TrainConfig",
    "CosineSchedule",
    "train",
    "evaluate",
    "uniform_weights",
    "normalize_weights",
    "load_checkpoint",
]

CHECKPOINT_FORMAT = "chameleon_ext.train/1"
CHECKPOINT_NAME = "ckpt.pt"
MODEL_NAME = "model.pt"
METRICS_NAME = "metrics.jsonl"
AVERAGE_KEY = "average"

WeightsLike = Union[str, Mapping[str, float], Sequence[float], np.ndarray]


# ------------------------------------------------------------------------------------------
# mixture weights and sampling


def uniform_weights(dataset: MixtureDataset) -> dict[str, float]:
    """Equal weight on every domain (the proxy's training mixture)."""
    k = len(dataset.domains)
    return {d: 1.0 / k for d in dataset.domains}


def normalize_weights(dataset: MixtureDataset, weights: WeightsLike) -> np.ndarray:
    """Validate mixture ``weights`` against the dataset; return probabilities ``[k]`` float64.

    ``weights`` is ``"uniform"``, a ``{domain: weight}`` mapping naming every domain exactly
    once, or a sequence of k numbers in ``dataset.domains`` order. Weights must be finite and
    non-negative with a positive sum; they are normalised to sum to 1.

    Raises:
        ChameleonUserError: naming the offending domain (unknown, missing, negative, NaN, ...).
    """
    names = list(dataset.domains)
    if isinstance(weights, str):
        if weights != "uniform":
            raise ChameleonUserError(
                f"weights: expected 'uniform', a {{domain: weight}} mapping or a list of "
                f"{len(names)} numbers, got {weights!r}"
            )
        return np.full(len(names), 1.0 / len(names))
    if isinstance(weights, Mapping):
        for key in weights:
            if key not in names:
                raise ChameleonUserError(
                    f"weights: domain {key!r} is not in the dataset; its domains are {names}"
                )
        missing = [n for n in names if n not in weights]
        if missing:
            raise ChameleonUserError(
                f"weights: no weight given for domain {missing[0]!r}; give every domain a "
                f"weight (0 to leave it out). Domains: {names}"
            )
        values = [weights[n] for n in names]
    else:
        try:
            values = list(weights)
        except TypeError:
            raise ChameleonUserError(
                f"weights: expected a mapping or a sequence of numbers, got {type(weights).__name__}"
            ) from None
        if len(values) != len(names):
            raise ChameleonUserError(
                f"weights: got {len(values)} values for {len(names)} domains {names}"
            )
    out = np.empty(len(names), dtype=np.float64)
    for i, (name, v) in enumerate(zip(names, values)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ChameleonUserError(f"weights: domain {name!r} has non-numeric weight {v!r}") from None
        if not math.isfinite(f) or f < 0:
            raise ChameleonUserError(
                f"weights: domain {name!r} has weight {v!r}; expected a finite number >= 0"
            )
        out[i] = f
    total = out.sum()
    if not total > 0:
        raise ChameleonUserError("weights: all domain weights are 0; at least one must be > 0")
    return out / total


class WeightedDomainSampler:
    """Seeded batches from a domain mixture: each row's domain drawn with the given weights.

    Args:
        dataset: the mixture's domains.
        weights: see :func:`normalize_weights` (``"uniform"`` makes the proxy's mixture).
        block_size: sequence length T; each row is a window of T + 1 tokens split into inputs
            and next-token targets. Windows may cross document boundaries.
        seed: seeds the sampler's own ``numpy.random.Generator``.
        split: ``"train"`` (default) or ``"val"``.
        rank, world_size: this process's place among the data-parallel processes.
        stream: how ranks share the data (irrelevant, and identical, for one process):

            * ``"global"`` (default): every rank runs the *same* seeded stream and draws the
              domains and window starts of the whole global batch, then reads only its own
              rows, ``shard_range(batch_size, rank, world_size)``. The union of the ranks'
              rows is exactly the batch a single process draws, so the data (and, without
              dropout, the trained weights) do not depend on the world size. Drawing the
              indices of the whole batch costs a few numpy calls per batch; only the rank's
              own windows are read.
            * ``"rank"``: an independent stream per rank, seeded by ``(seed, rank)``;
              :meth:`sample` returns ``batch_size`` rows of the rank's own stream. The data
              then depend on the world size.

    Raises:
        ChameleonUserError: invalid weights, a domain with weight > 0 that holds fewer than
            ``block_size + 1`` tokens, or an invalid rank / world size / stream.
    """

    STREAMS = ("global", "rank")

    def __init__(self, dataset: MixtureDataset, weights: WeightsLike, block_size: int,
                 seed: int = 0, split: str = "train", rank: int = 0, world_size: int = 1,
                 stream: str = "global"):
        self.dataset = dataset
        self.domains = list(dataset.domains)
        self.probs = normalize_weights(dataset, weights)
        self.block_size = int(block_size)
        if self.block_size <= 0:
            raise ChameleonUserError(f"block_size: expected a positive integer, got {block_size!r}")
        if stream not in self.STREAMS:
            raise ChameleonUserError(f"stream: expected one of {self.STREAMS}, got {stream!r}")
        self.seed, self.split, self.rank = int(seed), split, int(rank)
        self.world_size, self.stream = int(world_size), stream
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ChameleonUserError(
                f"rank/world_size: expected 0 <= rank < world_size, got rank {rank!r} of "
                f"world_size {world_size!r}")
        active = [d for d, p in zip(self.domains, self.probs) if p > 0]
        dataset.check_window(self.block_size + 1, split, domains=active)
        # Highest valid window start per domain (windows are block_size + 1 tokens long).
        self._high = np.array([dataset.n_tokens(d, split) - self.block_size for d in self.domains],
                              dtype=np.int64)
        # Rank 0's stream is the same in both modes (and the same as a single process's).
        self.rng = np.random.default_rng([self.seed, self.rank if stream == "rank" else 0])

    @property
    def weights(self) -> dict[str, float]:
        return {d: float(p) for d, p in zip(self.domains, self.probs)}

    def local_batch_size(self, batch_size: int) -> int:
        """Rows :meth:`sample` returns on this rank for ``batch_size``."""
        if self.stream == "rank":
            return int(batch_size)
        return len(shard_range(int(batch_size), self.rank, self.world_size))

    def sample(self, batch_size: int):
        """Draw one batch.

        ``batch_size`` is the global batch with ``stream="global"`` (this rank gets its
        :func:`~chameleon_ext.distributed.shard_range` share of the rows) and the rank's own
        batch with ``stream="rank"``; with one process both are simply the batch.

        Returns:
            ``(x, y, domain)``: inputs ``[b, T]`` int64, targets ``[b, T]`` int64 (``x``
            shifted by one), and each row's domain index ``[b]`` int64 into
            ``dataset.domains``, where ``b`` is :meth:`local_batch_size`.
        """
        B, T = int(batch_size), self.block_size
        dom = self.rng.choice(len(self.domains), size=B, p=self.probs)
        starts = self.rng.integers(0, self._high[dom])  # one start per row, in [0, high)
        if self.stream == "global" and self.world_size > 1:
            rows = shard_range(B, self.rank, self.world_size)
            dom, starts = dom[rows.start:rows.stop], starts[rows.start:rows.stop]
        buf = np.empty((dom.shape[0], T + 1), dtype=np.int64)
        for i in range(dom.shape[0]):
            buf[i] = self.dataset.windows_at(self.domains[dom[i]], starts[i:i + 1], T + 1,
                                             self.split)[0]
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous(), torch.from_numpy(dom.astype(np.int64))

    def state_dict(self) -> dict:
        """Everything needed to continue the exact stream (plain Python types only)."""
        return {"rng": self.rng.bit_generator.state, "domains": self.domains,
                "weights": [float(p) for p in self.probs], "block_size": self.block_size,
                "seed": self.seed, "split": self.split, "rank": self.rank,
                "world_size": self.world_size, "stream": self.stream}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the RNG; the mixture itself must match (raises otherwise).

        With ``stream="rank"`` the state must come from the same rank and world size (each
        rank's stream is its own); with ``stream="global"`` all ranks hold the same stream.
        """
        if list(state["domains"]) != self.domains:
            raise ChameleonUserError(
                f"sampler state: saved for domains {list(state['domains'])}, but the dataset has "
                f"{self.domains}"
            )
        if not np.allclose(state["weights"], self.probs, rtol=0, atol=1e-12):
            saved = dict(zip(self.domains, state["weights"]))
            bad = next(d for d in self.domains if abs(saved[d] - self.weights[d]) > 1e-12)
            raise ChameleonUserError(
                f"sampler state: weight of domain {bad!r} was {saved[bad]:.6g} when saved, now "
                f"{self.weights[bad]:.6g}; use a new out_dir (or resume=False) to change weights"
            )
        if int(state["block_size"]) != self.block_size:
            raise ChameleonUserError(
                f"sampler state: saved with block_size {state['block_size']}, now {self.block_size}"
            )
        saved_stream = state.get("stream", "global")  # states from before streams were named
        saved_world = int(state.get("world_size", 1))
        if saved_world > 1 or self.world_size > 1:
            if saved_stream != self.stream:
                raise ChameleonUserError(
                    f"sampler state: saved with stream {saved_stream!r}, now {self.stream!r}")
            if self.stream == "rank" and (saved_world, int(state.get("rank", 0))) != (
                    self.world_size, self.rank):
                raise ChameleonUserError(
                    f"sampler state: saved by rank {state.get('rank', 0)} of {saved_world} "
                    f"processes, loaded by rank {self.rank} of {self.world_size}; with "
                    "stream='rank' each rank must load its own state")
        self.rng.bit_generator.state = state["rng"]


# ------------------------------------------------------------------------------------------
# configuration and schedule


@dataclass
class TrainConfig:
    """Training hyper-parameters and bookkeeping options.

    Attributes:
        steps: optimiser steps in total (a resumed run continues up to this step).
        batch_size: sequences per micro-batch in total over all processes (the *global*
            micro-batch); one step sees ``batch_size * grad_accum`` sequences of
            ``block_size`` tokens whatever the world size. Under torch.distributed it must be
            divisible by the world size; each rank takes ``batch_size / world_size`` rows.
        grad_accum: micro-batches accumulated per step.
        block_size: sequence length T; default the model's ``block_size``.
        lr, min_lr: peak and final learning rate of the cosine schedule.
        warmup_steps: linear warm-up steps from ~0 to ``lr``.
        weight_decay: AdamW decoupled weight decay, applied to matrices and embeddings only.
        beta1, beta2: AdamW betas.
        grad_clip: clip the global gradient norm to this value (0 disables).
        eval_every: evaluate on the fixed held-out windows every this many steps and at the
            end (0 disables evaluation).
        eval_windows: held-out windows per domain for evaluation.
        eval_batch_size: windows per forward pass during evaluation.
        ckpt_every: checkpoint every this many steps (0: only at the end / at ``stop_at``).
        seed: seeds the sampler, the evaluation windows and torch's RNG (dropout).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        out_dir: where ``ckpt.pt``, ``model.pt`` and ``metrics.jsonl`` are written.
        log_every: log the training loss every this many steps.
        quiet: no progress bar and no printed lines (metrics are still written).
    """

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    block_size: Optional[int] = None
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 0
    eval_windows: int = 16
    eval_batch_size: int = 16
    ckpt_every: int = 100
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/train"
    log_every: int = 10
    quiet: bool = False

    def __post_init__(self):
        def need(name, ok, what):
            if not ok:
                raise ChameleonUserError(
                    f"TrainConfig.{name}: expected {what}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batch_size"):
            need(name, is_int(getattr(self, name)) and getattr(self, name) > 0, "a positive integer")
        for name in ("warmup_steps", "eval_every", "eval_windows", "ckpt_every", "seed"):
            need(name, is_int(getattr(self, name)) and getattr(self, name) >= 0,
                 "a non-negative integer")
        need("block_size", self.block_size is None or (is_int(self.block_size) and self.block_size > 0),
             "None or a positive integer")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            need(name, isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                 and v >= 0, "a finite number >= 0")
        need("lr", self.lr > 0, "a positive learning rate")
        need("min_lr", self.min_lr <= self.lr, f"a value <= lr ({self.lr})")
        for name in ("beta1", "beta2"):
            need(name, isinstance(getattr(self, name), (int, float)) and 0 <= getattr(self, name) < 1,
                 "a value in [0, 1)")
        need("device", isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda")
                                                         or self.device.startswith("cuda:")),
             "'auto', 'cpu', 'cuda' or 'cuda:N'")
        self.out_dir = os.fspath(self.out_dir)

    def to_dict(self) -> dict:
        return asdict(self)


# Options that change the training trajectory: a resumed run must use the saved values.
_TRAJECTORY_FIELDS = ("batch_size", "grad_accum", "block_size", "lr", "min_lr", "warmup_steps",
                      "weight_decay", "beta1", "beta2", "grad_clip", "seed")


class CosineSchedule:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``.

    A pure function of the step (the step is checkpointed with the trainer), so resuming needs
    no hidden state; ``state_dict`` records the parameters for inspection and checks.
    """

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, steps: int):
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.warmup_steps, self.steps = int(warmup_steps), int(steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps,
                "steps": self.steps}


# ------------------------------------------------------------------------------------------
# helpers


def _process_info(group: Optional[Any] = None) -> tuple[int, int]:
    """(rank, world_size) in ``group`` (default: torch.distributed's default group when it is
    initialised, else a single process): the one place that asks torch.distributed."""
    di = _dist.info(group)
    return di.rank, di.world_size


def _resolve_device(device: Optional[Union[str, torch.device]], model: Optional[torch.nn.Module] = None,
                    group: Optional[Any] = None) -> torch.device:
    """``None``: the model's device; ``"auto"``: CUDA when available. Under torch.distributed,
    ``"auto"`` and a bare ``"cuda"`` mean ``cuda:LOCAL_RANK`` (an explicit ``cuda:N`` is kept)."""
    if device is None and model is not None:
        return next(model.parameters()).device
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ChameleonUserError(f"device: {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None and _dist.is_distributed(group):
        local = _dist.info(group).local_rank
        if local >= torch.cuda.device_count():
            raise ChameleonUserError(
                f"device: LOCAL_RANK is {local} but this node has only "
                f"{torch.cuda.device_count()} CUDA device(s); start at most that many processes "
                "per node (torchrun --nproc_per_node)")
        dev = torch.device("cuda", local)
    return dev


# -- torch.distributed helpers (all no-ops in a single process) ---------------------------------
#
# Failure handling. A rank that raises must not leave the others blocked in a collective:
#  * every phase where one rank alone may fail (set-up and resume checks, rank 0 writing a
#    checkpoint or model.pt, an evaluation pass) ends in :func:`_agree`, one small all-reduce
#    of per-rank failure flags that every rank reaches whether it failed or not; the failed
#    ranks re-raise their own error and the others raise a RuntimeError naming them, at once;
#  * no collective runs on an error path (``except`` / ``finally``), so a failing rank never
#    waits for peers that are somewhere else;
#  * a failure inside a training step (the peers are then blocked in DDP's gradient
#    all-reduce) ends their wait when the failed process exits (gloo sees the closed
#    connection; torchrun also stops the other workers as soon as one fails) and, in any
#    case, after the process-group timeout set by ``init_from_env``
#    (``CHAMELEON_DIST_TIMEOUT``, default 600 s; NCCL's watchdog enforces it on GPUs).


def _coll_device(group: Optional[Any] = None) -> torch.device:
    """Where tensors for collectives must live: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(error: Optional[BaseException], what: str, group: Optional[Any] = None,
           flag: int = 0) -> list[int]:
    """Collective barrier that propagates failure: every rank calls it after ``what``, with
    the exception it caught (or None) and an optional integer ``flag``. Returns every rank's
    flag. Raises ``error`` on the ranks that failed, and on the others a RuntimeError naming
    the failed ranks, so that all ranks leave together instead of waiting on each other."""
    if not _dist.is_distributed(group):
        if error is not None:
            raise error
        return [int(flag)]
    rank, world = _process_info(group)
    t = torch.zeros(2, world, dtype=torch.int64, device=_coll_device(group))
    t[0, rank] = 1 if error is not None else 0
    t[1, rank] = int(flag)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    if error is not None:
        raise error
    failed = [r for r in range(world) if int(t[0, r])]
    if failed:
        raise RuntimeError(
            f"distributed run stopped: rank(s) {failed} of {world} failed while {what} (their "
            f"own output has the error); rank {rank} stops too")
    return [int(v) for v in t[1].tolist()]


def _gather_objects(obj: Any, group: Optional[Any] = None) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not _dist.is_distributed(group):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _rank_seed(seed: int, rank: int) -> int:
    """torch seed of ``rank`` (dropout masks): ``seed`` itself on rank 0, so a single process
    is unchanged, and an independent seed derived from ``(seed, rank)`` on the others."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint64)[0] >> 1)


def _autocast(device: torch.device):
    # bf16 autocast on CUDA only: CPU bf16 matmuls are slow and would break bitwise resume tests.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    # Decay matrices and embeddings, not biases or LayerNorm parameters (nanoGPT's rule).
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kw)


def _rng_state(device: torch.device, all_cuda: bool = True) -> dict:
    # Under torch.distributed each rank saves only its own CUDA device's generator
    # (``cuda_device``): asking for all devices would create a context on every GPU.
    np_state = np.random.get_state()
    one = device.type == "cuda" and not all_cuda
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" and all_cuda else None,
        **({"cuda_device": torch.cuda.get_rng_state(device)} if one else {}),
        "numpy": (np_state[0], [int(v) for v in np_state[1]], int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    if device.type == "cuda" and state.get("cuda_device") is not None:
        torch.cuda.set_rng_state(state["cuda_device"], device)
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    random.setstate(state["python"])


def load_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """Read a trainer checkpoint (``ckpt.pt``) onto the CPU."""
    path = os.fspath(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ChameleonUserError(f"checkpoint {path!r} cannot be read: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ChameleonUserError(f"{path!r} is not a chameleon_ext training checkpoint")
    return ckpt


def _stable_domain_int(name: str) -> int:
    # Keyed by name, not index, so adding a domain leaves the others' eval windows unchanged.
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


class _Progress:
    """tqdm bar on a TTY when tqdm is installed; otherwise a plain line per log step."""

    def __init__(self, total: int, initial: int, quiet: bool):
        self.bar, self.quiet = None, quiet
        if quiet:
            return
        if sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm  # optional
                self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")
            except ImportError:
                pass

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, total: int, loss: float, lr: float, tps: float) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        else:
            print(f"step {step}/{total}  loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s", flush=True)

    def write(self, msg: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Metrics:
    """Append-only ``metrics.jsonl`` writer (main process only)."""

    def __init__(self, path: str, keep_until_step: Optional[int], enabled: bool):
        self.path, self.f = path, None
        if not enabled:
            return
        kept = []
        if keep_until_step is not None and os.path.exists(path):
            # On resume, drop records the killed run wrote after its last checkpoint: those
            # steps are about to be recomputed.
            with open(path, "r", encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line from a crash
                    if rec.get("step", 0) <= keep_until_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec, sort_keys=True) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


# ------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: MixtureDataset, n_windows: int, block_size: int,
             seed: int = 0, device: Optional[Union[str, torch.device]] = None,
             batch_size: int = 16, *, group: Optional[Any] = None) -> dict[str, dict[str, float]]:
    """Mean next-token loss and perplexity per domain on fixed held-out windows.

    For each domain, ``n_windows`` windows of ``block_size + 1`` tokens are drawn from its
    validation tokens with a generator seeded by ``(seed, domain name)``, so every call with
    the same seed scores exactly the same tokens. The model is put in eval mode (and restored).

    Under torch.distributed (``group``, default: the default group when initialised) every
    rank of the group must call this: each domain's windows are split across the ranks with
    :func:`~chameleon_ext.distributed.shard_range`, the loss sums and token counts are
    all-reduced, and every rank returns the same result, equal (up to float rounding, ~1e-7)
    to a single process's.

    Args:
        device: where to run; None uses the model's current device, ``"auto"`` prefers CUDA
            (the model is moved there; ``cuda:LOCAL_RANK`` under torch.distributed).
        group: the process group to evaluate over.

    Returns:
        ``{domain: {"loss", "ppl"}}`` for every domain, plus ``"average"``: ``{"loss": mean of
        the domain losses, "ppl": exp of that, "mean_ppl": mean of the domain perplexities}``
        (the paper reports the mean perplexity over domains).

    Raises:
        ChameleonUserError: a domain's validation split is shorter than one window, or a domain
            is named ``"average"``.
        RuntimeError: another rank failed during the evaluation (that rank raises its own error).
    """
    if AVERAGE_KEY in dataset.domains:
        raise ChameleonUserError(
            f"evaluate: a domain is named {AVERAGE_KEY!r}, which collides with the average "
            "entry of the results; rename that domain folder"
        )
    if int(n_windows) <= 0:
        raise ChameleonUserError(f"n_windows: expected a positive integer, got {n_windows!r}")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # plain forwards: no DDP hooks or collectives per batch
    rank, world = _process_info(group)
    names = list(dataset.domains)
    k = len(names)
    # Per domain: loss sum and token count (float64; counts are exact below 2**53), then
    # one failure flag per rank, so a rank that fails still joins the single all-reduce.
    acc = torch.zeros(2 * k + world, dtype=torch.float64)
    error: Optional[BaseException] = None
    model_ref = model
    was_training = model.training
    try:
        dev = _resolve_device(device, model, group)
        model.to(dev)
        model.eval()
        for j, name in enumerate(names):
            rng = np.random.default_rng([int(seed), _stable_domain_int(name)])
            windows = dataset.sample_windows(name, int(n_windows), int(block_size) + 1, rng,
                                             split="val")
            mine = shard_range(windows.shape[0], rank, world)
            windows = windows[mine.start:mine.stop]
            total, count = 0.0, 0
            for i in range(0, windows.shape[0], batch_size):
                w = torch.from_numpy(windows[i:i + batch_size]).to(dev)
                with _autocast(dev):
                    logits, _ = model(w[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                       w[:, 1:].reshape(-1), reduction="sum")
                total += float(loss)
                count += w[:, 1:].numel()
            acc[j], acc[k + j] = total, count
    except Exception as exc:  # all ranks still meet in the all-reduce below
        if world == 1:
            raise
        error = exc
    finally:
        model_ref.train(was_training)
    if world > 1:
        acc[2 * k + rank] = 1.0 if error is not None else 0.0
        red = acc.to(_coll_device(group))
        dist.all_reduce(red, op=dist.ReduceOp.SUM, group=group)
        acc = red.cpu()
        if error is not None:
            raise error
        failed = [r for r in range(world) if acc[2 * k + r] > 0]
        if failed:
            raise RuntimeError(
                f"distributed run stopped: rank(s) {failed} of {world} failed during evaluation "
                f"(their own output has the error); rank {rank} stops too")
    results: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        mean = float(acc[j]) / float(acc[k + j])
        results[name] = {"loss": mean, "ppl": math.exp(mean)}
    losses = [r["loss"] for r in results.values()]
    avg = sum(losses) / len(losses)
    results[AVERAGE_KEY] = {"loss": avg, "ppl": math.exp(avg),
                            "mean_ppl": sum(r["ppl"] for k, r in results.items()) / len(losses)}
    return results


# ------------------------------------------------------------------------------------------
# training


def _settle_ddp_buckets(ddp: torch.nn.Module, model: GPT, rows: int, T: int,
                        device: torch.device) -> None:
    """One synchronised forward/backward of a zero loss, so that DDP's gradient buckets are
    re-laid-out (DDP does that once, in the order gradients became ready in the first
    backward) before the first real step. An uninterrupted run and a resumed one then reduce
    every step with the same bucket layout, hence the same summation order, which keeps
    resume bitwise exact for any world size (without this, the first step after a resume
    would use the initial layout and differ in the last bits when world size > 2). Eval mode:
    no dropout, so no RNG is consumed; the zero gradients are discarded."""
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(rows, T, dtype=torch.long, device=device)
        with _autocast(device):
            _, loss = ddp(x, x)
        (loss * 0.0).backward()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)


def _check_model_config(model: GPT, saved: Mapping[str, Any], source: str) -> None:
    cur = model.config.to_dict()
    diff = [k for k in cur if cur[k] != saved.get(k)]
    if diff:
        k = diff[0]
        raise ChameleonUserError(
            f"{source}: model {k} is {saved.get(k)!r} there but {cur[k]!r} in the given model; "
            "build the model with the same configuration"
        )


def _tokenizer_record(dataset) -> Optional[dict]:
    """What model.pt / ckpt.pt record about the tokenizer of the training data (None if unknown)."""
    record = getattr(dataset, "tokenizer_record", None)
    return record() if callable(record) else None


def train(model: GPT, dataset: MixtureDataset, weights: WeightsLike, config: TrainConfig,
          resume: bool = True, init_from: Optional[Union[str, os.PathLike]] = None, *,
          stop_at: Optional[int] = None, group: Optional[Any] = None) -> dict:
    """Train ``model`` on the mixture ``weights`` of ``dataset`` (AdamW, warm-up + cosine).

    Data parallel under torch.distributed: when the default process group is initialised
    (e.g. ``chameleon_ext.distributed.init_from_env()`` under ``torchrun``), or ``group`` is
    given, every rank of the group must call ``train`` with the same arguments. The model is
    wrapped in ``DistributedDataParallel`` (``cuda:LOCAL_RANK`` on GPUs), ``config.batch_size``
    is the *global* batch, split evenly across the ranks, and each rank reads its share of
    the rows of the same seeded global stream (see :class:`WeightedDomainSampler`,
    ``stream="global"``), so the data, and without dropout the trained weights (up to float
    rounding), are the same whatever the world size. Rank 0 alone writes ``ckpt.pt``,
    ``model.pt`` and ``metrics.jsonl`` (the others wait); ``out_dir`` must be on a filesystem
    all ranks see. A checkpoint records the world size and every rank's sampler and RNG
    state; it resumes with the same world size only.

    Args:
        model: the :class:`GPT` to train (updated in place; identical on every rank after).
        dataset: the domains.
        weights: mixture weights (see :func:`normalize_weights`); ``"uniform"`` for the proxy.
        config: hyper-parameters; ``config.out_dir`` receives ``ckpt.pt`` (resumable state),
            ``model.pt`` (final weights, see :func:`chameleon_ext.model.load_model`) and
            ``metrics.jsonl``.
        resume: continue from ``out_dir/ckpt.pt`` when it exists (exactly: same parameters,
            bit for bit on CPU, as an uninterrupted run with the same world size). With
            ``resume=False`` a fresh run overwrites it.
        init_from: a ``model.pt`` or ``ckpt.pt`` whose weights start a fresh run (finetuning);
            optimiser and data order start fresh. Ignored when resuming.
        stop_at: stop (with a checkpoint) once this global step is reached, without changing
            the schedule -- e.g. to split a run across time-limited jobs.
        group: torch.distributed process group (default: the default group if initialised).

    Returns:
        ``{"step", "loss", "eval", "tokens", "checkpoint", "model_path", "out_dir",
        "world_size"}`` (the same on every rank; ``loss`` is the mean over all ranks);
        ``model_path`` is None until the run reaches ``config.steps``.

    Raises:
        ChameleonUserError: invalid arguments, a checkpoint that does not match (including one
            written with another world size), or a global batch not divisible by the world size.
        RuntimeError: under torch.distributed, another rank failed (it raises its own error).
    """
    if not isinstance(config, TrainConfig):
        raise ChameleonUserError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, GPT):
        raise ChameleonUserError(f"model: expected a chameleon_ext GPT, got {type(model).__name__}")
    if stop_at is not None and (not isinstance(stop_at, int) or stop_at < 0):
        raise ChameleonUserError(f"stop_at: expected None or a non-negative integer, got {stop_at!r}")
    env_world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if env_world > 1 and group is None and not (dist.is_available() and dist.is_initialized()):
        raise ChameleonUserError(
            f"train: started as one of WORLD_SIZE={env_world} processes (torchrun) but "
            "torch.distributed is not initialised; call chameleon_ext.distributed."
            "init_from_env() first, otherwise every process would train alone and write the "
            "same out_dir")
    cfg = config
    rank, world = _process_info(group)
    is_main = rank == 0
    distributed = _dist.is_distributed(group)
    out_dir = cfg.out_dir
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME)

    # -- set-up, phase 1 (local work only; every rank then meets in _agree) ------------------
    error: Optional[BaseException] = None
    exists = False
    try:
        device = _resolve_device(cfg.device, group=group)
        if distributed and device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL and object collectives use the current device
        if cfg.batch_size % world:
            raise ChameleonUserError(
                f"TrainConfig.batch_size: the global batch {cfg.batch_size} is not divisible by "
                f"the world size {world}; use a multiple of {world} (each rank takes "
                "batch_size / world_size rows per micro-batch)")
        T = cfg.block_size or model.config.block_size
        if T > model.config.block_size:
            raise ChameleonUserError(
                f"TrainConfig.block_size: {T} exceeds the model's block_size {model.config.block_size}"
            )
        dataset.check_vocab(model.config.vocab_size)
        sampler = WeightedDomainSampler(dataset, weights, T, seed=cfg.seed, rank=rank,
                                        world_size=world, stream="global")
        if is_main:
            os.makedirs(out_dir, exist_ok=True)
        model.to(device)
        model.train()
        optimizer = _make_optimizer(model, cfg, device)
        schedule = CosineSchedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
        exists = bool(resume) and os.path.exists(ckpt_path)
    except Exception as exc:
        if not distributed:
            raise
        error = exc
    seen = _agree(error, "setting up training", group, flag=int(exists))

    # -- set-up, phase 2: resume or start fresh -----------------------------------------------
    step, resumed = 0, False
    progress_msgs = []
    try:
        if any(seen) and not all(seen):
            raise ChameleonUserError(
                f"{ckpt_path!r} exists for rank(s) {[r for r in range(world) if seen[r]]} but "
                f"not for rank(s) {[r for r in range(world) if not seen[r]]}: out_dir must be on "
                "a filesystem shared by all ranks")
        if all(seen):
            ckpt = load_checkpoint(ckpt_path)
            saved_world = int(ckpt.get("world_size", 1))
            if saved_world != world:
                raise ChameleonUserError(
                    f"checkpoint {ckpt_path!r} was written by a run with world size "
                    f"{saved_world}, but this run has world size {world}; resume with "
                    f"{saved_world} process(es) in total (torchrun --nnodes N --nproc_per_node "
                    f"M with N * M = {saved_world}), or use a new out_dir / resume=False")
            _check_model_config(model, ckpt["model_config"], f"checkpoint {ckpt_path!r}")
            saved_cfg = ckpt["train_config"]
            saved_T = saved_cfg.get("block_size") or ckpt["model_config"]["block_size"]
            for key in _TRAJECTORY_FIELDS:
                cur, old = (T, saved_T) if key == "block_size" else (getattr(cfg, key),
                                                                      saved_cfg.get(key))
                if cur != old:
                    raise ChameleonUserError(
                        f"TrainConfig.{key} is {cur!r} but the checkpoint in {out_dir!r} was "
                        f"trained with {old!r}; use the same value to resume, or a new out_dir "
                        "/ resume=False"
                    )
            if saved_cfg.get("steps") != cfg.steps:
                progress_msgs.append(f"note: steps changed from {saved_cfg.get('steps')} to "
                                     f"{cfg.steps}; the cosine schedule is stretched accordingly")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            sampler.load_state_dict((ckpt.get("samplers") or [ckpt["sampler"]])[rank])
            _set_rng_state((ckpt.get("rngs") or [ckpt["rng"]])[rank], device)
            step, resumed = int(ckpt["step"]), True
            del ckpt
            progress_msgs.append(f"resumed from {ckpt_path} at step {step}")
        else:
            if init_from is not None:
                src = load_model(init_from)
                _check_model_config(model, src.config.to_dict(),
                                    f"init_from {os.fspath(init_from)!r}")
                with torch.no_grad():
                    model.load_state_dict(src.state_dict())
                progress_msgs.append(f"initialised from {os.fspath(init_from)}")
            # Seed torch's global RNG (dropout) so a fresh run is reproducible; a resumed run
            # restores the saved state instead. Ranks > 0 get their own dropout streams.
            torch.manual_seed(_rank_seed(cfg.seed, rank))
        metrics = _Metrics(os.path.join(out_dir, METRICS_NAME), step if resumed else None,
                           is_main)
    except Exception as exc:
        if not distributed:
            raise
        error = exc
    _agree(error, "loading the checkpoint / starting the run", group)

    # DDP broadcasts rank 0's parameters at construction (a no-op after a resume, where every
    # rank loaded the same checkpoint) and averages gradients across ranks in backward.
    ddp = None
    micro_batch = cfg.batch_size // world  # rows per rank per micro-batch
    if distributed:
        try:
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                process_group=group)
            _settle_ddp_buckets(ddp, model, micro_batch, T, device)
        except BaseException:
            metrics.close()
            raise
    forward = ddp if ddp is not None else model

    progress = _Progress(cfg.steps, step, cfg.quiet or not is_main)
    for msg in progress_msgs:
        progress.write(msg)

    def save_checkpoint() -> None:
        # Collective: every rank's sampler and RNG state go to rank 0, which writes; the
        # closing _agree is the barrier (nobody goes on while the file is half-written) and
        # tells every rank if the write failed.
        samplers = _gather_objects(sampler.state_dict(), group)
        rngs = _gather_objects(_rng_state(device, all_cuda=not distributed), group)
        err = None
        if is_main:
            try:
                sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                atomic_save({
                    "format": CHECKPOINT_FORMAT,
                    "step": step,
                    "model": sd,
                    "model_config": model.config.to_dict(),
                    "model_sha256": state_dict_sha256(sd),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": schedule.state_dict(),
                    "sampler": samplers[0],
                    "rng": rngs[0],
                    "world_size": world,
                    "samplers": samplers,
                    "rngs": rngs,
                    "train_config": cfg.to_dict(),
                    "domains": list(dataset.domains),
                    "weights": sampler.weights,
                    "tokenizer": _tokenizer_record(dataset),
                }, ckpt_path)
            except Exception as exc:
                if not distributed:
                    raise
                err = exc
        _agree(err, f"rank 0 was writing {ckpt_path!r}", group)

    tokens_per_step = cfg.batch_size * cfg.grad_accum * T  # batch_size is the global batch
    last_eval, last_loss, last_ckpt = None, None, step if resumed else -1
    loss_sum = torch.zeros((), device=device)
    window_steps, t0 = 0, time.perf_counter()

    def run_eval() -> dict:
        res = evaluate(model, dataset, cfg.eval_windows, T, seed=cfg.seed, device=device,
                       batch_size=cfg.eval_batch_size, group=group)
        metrics.write({"kind": "eval", "step": step, "eval": res})
        progress.write(f"eval step {step}: " + "  ".join(
            f"{d} {r['ppl']:.2f}" for d, r in res.items()) + " (ppl)")
        return res

    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    model_path = None
    try:
        while step < end:
            lr = schedule(step)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            for micro in range(cfg.grad_accum):
                x, y, _ = sampler.sample(cfg.batch_size)  # this rank's rows of the global batch
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # Gradients are all-reduced (averaged over ranks) on the last micro-step only.
                sync = (ddp.no_sync() if ddp is not None and micro < cfg.grad_accum - 1
                        else contextlib.nullcontext())
                with sync:
                    with _autocast(device):
                        _, loss = forward(x, y)
                    # Average over micro-batches (and, via DDP, over ranks, which hold equal
                    # shares of the rows) so the gradient matches one big batch.
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach() / cfg.grad_accum
            grad_norm = None
            if cfg.grad_clip > 0:
                # Gradients are identical on every rank here, so is the norm.
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            progress.update(1)

            if step % cfg.log_every == 0 or step == end:
                if distributed:  # global mean over ranks (equal shares of the rows)
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM, group=group)
                    loss_sum /= world
                last_loss = float(loss_sum) / window_steps  # one host sync per log step
                dt = max(time.perf_counter() - t0, 1e-9)
                tps = window_steps * tokens_per_step / dt
                rec = {"kind": "train", "step": step, "loss": last_loss, "lr": lr,
                       "tokens_per_s": tps, "tokens": step * tokens_per_step}
                if grad_norm is not None:
                    rec["grad_norm"] = float(grad_norm)
                if distributed:
                    rec["world_size"] = world
                metrics.write(rec)
                progress.log(step, cfg.steps, last_loss, lr, tps)
                loss_sum.zero_()
                window_steps, t0 = 0, time.perf_counter()
            if cfg.eval_every and cfg.eval_windows and (step % cfg.eval_every == 0
                                                        or step == cfg.steps):
                last_eval = run_eval()
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                save_checkpoint()
                last_ckpt = step
        if last_ckpt != step:
            save_checkpoint()
        if step >= cfg.steps:
            model_path = os.path.join(out_dir, MODEL_NAME)
            err = None
            if is_main:
                try:
                    save_model(model_path, model, tokenizer=_tokenizer_record(dataset))
                except Exception as exc:
                    if not distributed:
                        raise
                    err = exc
            _agree(err, f"rank 0 was writing {model_path!r}", group)
    finally:
        # No collectives here: on an error path the other ranks may be anywhere.
        progress.close()
        metrics.close()

    return {"step": step, "loss": last_loss, "eval": last_eval,
            "tokens": step * tokens_per_step, "checkpoint": ckpt_path, "model_path": model_path,
            "out_dir": out_dir, "world_size": world}
