"""Per-domain validation loss and perplexity on fixed held-out windows (the numbers the
paper's tables report), on one process or sharded over torch.distributed ranks."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .errors import ChameleonUserError
from .model import autocast
from .progress import Progress

__all__ = ["AVERAGE_KEY", "evaluate"]

AVERAGE_KEY = "average"


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, n_windows: int, block_size: int, seed: int = 0,
             device: Optional[Union[str, torch.device]] = None, batch_size: int = 16, *,
             group: Optional[Any] = None, progress: bool = False, split: str = "val") -> dict[str, dict[str, float]]:
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
        progress: show progress over the domains (rank 0).
        split: ``"val"`` (default; what training and every weighting method may look at) or
            ``"test"`` (the held-out test split, for a final comparison only).

    Returns:
        ``{domain: {"loss", "ppl"}}`` for every domain, plus ``"average"``: ``{"loss": mean of
        the domain losses, "ppl": exp of that, "mean_ppl": mean of the domain perplexities}``
        (the paper reports the mean perplexity over domains).

    Raises:
        ChameleonUserError: a domain's validation split is shorter than one window, or a domain
            is named ``"average"``.
        RuntimeError: another rank failed during the evaluation (that rank raises its own error).
    """
    if split not in ("val", "test"):
        raise ChameleonUserError(f"evaluate: split must be 'val' or 'test', got {split!r}")
    if AVERAGE_KEY in dataset.domains:
        raise ChameleonUserError(
            f"evaluate: a domain is named {AVERAGE_KEY!r}, which collides with the average "
            "entry of the results; rename that domain folder")
    if int(n_windows) <= 0:
        raise ChameleonUserError(f"n_windows: expected a positive integer, got {n_windows!r}")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # plain forwards: no DDP hooks or collectives per batch
    di = distributed.info(group)
    names = list(dataset.domains)
    k = len(names)
    acc = torch.zeros(2, k, dtype=torch.float64)  # per domain: loss sum, token count (exact < 2**53)
    was_training = model.training
    bar = Progress(k, desc="eval", unit="domain", enabled=progress and di.is_main, plain_every=0.25)

    def run():
        dev = distributed.resolve_device(device, model, group)
        model.to(dev)
        model.eval()
        for j, name in enumerate(names):
            rng = np.random.default_rng([int(seed), _stable_domain_int(name)])
            windows = dataset.sample_windows(name, int(n_windows), int(block_size) + 1, rng,
                                             split=split)
            mine = distributed.shard_range(windows.shape[0], di.rank, di.world_size)
            windows = windows[mine.start:mine.stop]
            for i in range(0, windows.shape[0], batch_size):
                w = torch.from_numpy(windows[i:i + batch_size]).to(dev)
                with autocast(dev):
                    logits, _ = model(w[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                       w[:, 1:].reshape(-1), reduction="sum")
                acc[0, j] += float(loss)
                acc[1, j] += w[:, 1:].numel()
            bar.update(1)

    error = None
    try:
        run()
    except Exception as exc:  # all ranks still meet in agree below
        if di.world_size == 1:
            raise
        error = exc
    finally:
        model.train(was_training)
        bar.close()
    if di.world_size > 1:
        distributed.agree(error, "evaluating", group)
        red = acc.to(distributed.collective_device(group))
        acc = distributed.all_reduce_sum_(red, group).cpu()
    results: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        mean = float(acc[0, j]) / float(acc[1, j])
        results[name] = {"loss": mean, "ppl": math.exp(mean)}
    losses = [r["loss"] for r in results.values()]
    avg = sum(losses) / len(losses)
    results[AVERAGE_KEY] = {"loss": avg, "ppl": math.exp(avg),
                            "mean_ppl": sum(r["ppl"] for r in results.values()) / len(losses)}
    return results


def _stable_domain_int(name: str) -> int:
    # Keyed by name, not index, so adding a domain leaves the others' eval windows unchanged.
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
