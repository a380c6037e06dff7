"""The two pooling passes of :func:`chameleon_ext.embed.embed_domains` over this rank's share
of the windows: the clean method (full windows, ``domain_mean_pool``) and the reference's
(re-tokenised, right-padded batches, the mean over padding, duplicates dropped). Each returns,
per domain, the all-reduced sum of window means, their count and each window's mean."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from . import distributed
from .embed_windows import DomainWindows
from .errors import ChameleonUserError
from .ops import domain_mean_pool, masked_mean_pool
from .progress import Progress

__all__ = ["AUTOCAST_DTYPES", "embed_masked", "embed_reference"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _retokenise(tokenizer, windows: np.ndarray, length: int) -> List[List[int]]:
    """Decode each window to text and encode it again, as the reference does; truncate to
    ``length`` tokens."""
    return [list(tokenizer.encode(tokenizer.decode(w.tolist())))[:length] for w in windows]


def _pad_right(rows: List[List[int]], pad_id: int) -> tuple:
    T = max(1, max(len(r) for r in rows))
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = True
    return ids, mask

def _forward(model, ids: torch.Tensor, layer: int, dev: torch.device, precision: str,
             attention_mask=None) -> torch.Tensor:
    # bf16 autocast on CUDA by default ("auto"): the embedding is a mean over thousands of
    # windows, so bf16's rounding averages out, and it halves the proxy's memory traffic; CPU
    # bf16 matmuls are slow on most CPUs, so CPU stays fp32 (the cache key records the precision).
    dtype = AUTOCAST_DTYPES.get(precision)
    with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return model.hidden_states(ids, layer, attention_mask=attention_mask)


def _work_items(dataset, cfg, todo: Sequence[str], me) -> tuple:
    """This rank's contiguous share of all (domain, window) items, and the domains' windows."""
    total = cfg.n_windows * len(todo)
    share = distributed.shard_range(total, me.rank, me.world_size)
    return share, DomainWindows(dataset, cfg)


def _progress(enabled: bool, total: int, what: str) -> Progress:
    return Progress(total, desc=f"[embed] {what}", unit="window", enabled=enabled, plain_every=0.1)


@torch.inference_mode()
def embed_masked(model, dataset, cfg, todo, layer, dev, precision, me, group, progress):
    """Clean method: full windows (no padding), means summed per domain by domain_mean_pool;
    each window's mean is also kept, in its slot of ``window_means [domains, n, H]``."""
    share, domain_windows = _work_items(dataset, cfg, todo, me)
    H = None
    sums = counts = window_means = None
    bar = _progress(progress and me.is_main, len(share), f"rank {me.rank}")
    tokens = 0
    items = list(share)
    for b0 in range(0, len(items), cfg.batch_size):
        chunk = items[b0 : b0 + cfg.batch_size]
        dom = np.array([i // cfg.n_windows for i in chunk])
        win = np.array([i % cfg.n_windows for i in chunk])
        windows = np.concatenate(
            [domain_windows(todo[d], win[dom == d]) for d in np.unique(dom)]
        )  # [b, l]; rows grouped by domain in the same order as `dom` (items are sorted)
        ids = torch.from_numpy(windows).to(dev)
        hidden = _forward(model, ids, layer, dev, precision)  # [b, l, H]
        s, c = domain_mean_pool(hidden, None, torch.from_numpy(dom).to(dev), len(todo))
        if sums is None:
            H = hidden.shape[-1]
            sums, counts, window_means = _masked_buffers(len(todo), cfg.n_windows, H, dev)
        sums += s.double()
        counts += c
        # Rows are in chunk order (see above): window win[j] of domain dom[j].
        slots = (torch.from_numpy(dom).to(dev), torch.from_numpy(win).to(dev))
        window_means[slots] = masked_mean_pool(hidden, None).float()  # [b, H]
        tokens += ids.numel()
        bar.update(len(chunk), f"{tokens / max(bar.elapsed(), 1e-9):,.0f} tokens/s")
    if sums is None:  # this rank had no work (more ranks than windows)
        sums, counts, window_means = _masked_buffers(len(todo), cfg.n_windows, _hidden_size(model), dev)
    bar.close()
    distributed.all_reduce_sum_(sums, group)
    distributed.all_reduce_sum_(counts, group)
    # Each slot was written by exactly one rank and is zero on the others: the sum is exact.
    distributed.all_reduce_sum_(window_means, group)
    window_means = window_means.cpu()
    return {n: (sums[i].cpu(), int(counts[i]), window_means[i]) for i, n in enumerate(todo)}


def _masked_buffers(n_domains: int, n_windows: int, H: int, dev) -> tuple:
    """Zeroed sums [domains, H] float64, counts [domains] int64, window means [domains, n, H] float32."""
    return (torch.zeros(n_domains, H, dtype=torch.float64, device=dev),
            torch.zeros(n_domains, dtype=torch.int64, device=dev),
            torch.zeros(n_domains, n_windows, H, dtype=torch.float32, device=dev))


@torch.inference_mode()
def embed_reference(model, dataset, cfg, todo, layer, dev, precision, me, group, progress):
    """The reference pipeline's pooling: re-tokenised windows, right-padded batches, the
    mean over padding included, duplicates dropped (np.unique) before averaging.

    As in the reference, a batch holds ``batch_size`` consecutive windows of ONE domain (the
    reference embeds domain by domain), so a domain's padding -- and hence its embedding --
    never depends on the other domains; whole batches are sharded over the ranks. The
    forward gets the attention mask (the reference calls ``model(**tokenizer_output)``), so
    padded keys are masked out and only the final mean runs over the padding."""
    tokenizer = getattr(dataset, "tokenizer", None)
    if tokenizer is None:
        raise ChameleonUserError("pooling='reference' needs a dataset with a tokenizer (to re-tokenise windows)")
    domain_windows = DomainWindows(dataset, cfg)
    batches = [(d, j) for d in range(len(todo)) for j in range(0, cfg.n_windows, cfg.batch_size)]
    share = [batches[i] for i in distributed.shard_range(len(batches), me.rank, me.world_size)]
    rows = []  # (domain index, window vector) for this rank, in window order
    n_items = sum(min(cfg.batch_size, cfg.n_windows - j) for _, j in share)
    bar = _progress(progress and me.is_main, n_items, f"rank {me.rank} (reference pooling)")
    tokens = 0
    for d, j in share:
        name = todo[d]
        windows = domain_windows(name, slice(j, j + cfg.batch_size))
        ids, mask = _pad_right(_retokenise(tokenizer, windows, cfg.window), tokenizer.eos_id)
        hidden = _forward(model, torch.from_numpy(ids).to(dev), layer, dev, precision,
                          attention_mask=torch.from_numpy(mask).to(dev))
        pooled = masked_mean_pool(hidden, None).double().cpu().numpy()  # padding included, as the reference
        rows.extend((d, v) for v in pooled)
        tokens += ids.size
        bar.update(len(windows), f"{tokens / max(bar.elapsed(), 1e-9):,.0f} tokens/s")
    bar.close()
    rows = [r for part in distributed.gather_objects(rows, group) for r in part]
    out = {}
    for d, name in enumerate(todo):
        vecs = np.stack([v for dd, v in rows if dd == d])
        unique, first = np.unique(vecs, axis=0, return_index=True)
        # The windows are the de-duplicated vectors, in window order (first occurrence).
        windows = torch.from_numpy(vecs[np.sort(first)]).float()
        out[name] = (torch.from_numpy(unique.sum(0)), unique.shape[0], windows)
    return out


def _hidden_size(model) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("n_embd", "hidden_size", "d_model"):
        if cfg is not None and hasattr(cfg, attr):
            return int(getattr(cfg, attr))
    raise ChameleonUserError("cannot tell the proxy's hidden size; give every rank at least one window")
