"""Domain embeddings: the proxy's mean hidden state over sampled windows of each domain
(docs/method.md, step 2), with a cache and torch.distributed sharding.

For each domain, ``n_windows`` windows of ``window`` tokens are drawn with a generator
seeded by (seed, domain name), so a domain's windows never depend on which other domains
exist. The proxy runs only up to ``layer`` (default: the reference's middle layer); each
batch mixes windows of several domains and goes through ``domain_mean_pool`` once, which
adds every window's mean into its domain's sum. Sums and counts add across batches and
across ranks (one all-reduce), so the embedding is the same whatever the world size.

Each window's own pooled mean (``[n, H]`` float32 per domain, the input of the bootstrap in
:mod:`chameleon_ext.uncertainty`) is kept too: one buffer ``[domains, n, H]`` whose slots are
each written by exactly one rank, all-reduced with the sums. It is cached beside each domain's
sum (``{key}.windows.pt``, same key); ``embed_domains(..., windows=True)`` returns it and
treats a missing or damaged per-window file as a cache miss.

``pooling="reference"`` reproduces the reference implementation instead: windows are
decoded to text and re-tokenised, batches are right-padded with EOS, the mean runs over
padding too, and duplicate window vectors are dropped before averaging (docs/method.md, "The reference implementation").

Precision (``EmbedConfig.precision``): ``"auto"`` is float32 for ``pooling="reference"`` (the
reference's precision, on every device) and, for the clean method, bf16 autocast on CUDA and
float32 on the CPU; ``"fp32"``, ``"bf16"`` and ``"fp16"`` force one (the half types through
``torch.autocast`` on the model's device; sums are always accumulated in float64).

Padding: the clean method's windows are all full (``window`` tokens each), so batches are
packed without padding or attention mask. Reference pooling keeps the reference's padded
batches on purpose: its mean runs over the padded positions, whose states are part of the
result.

This module holds the configuration and :func:`embed_domains`, which puts the parts together:
:mod:`~chameleon_ext.embed_windows` (which windows), :mod:`~chameleon_ext.embed_pooling` (the
two pooling passes), :mod:`~chameleon_ext.embed_cache` (the cache) and
:mod:`~chameleon_ext.embed_files` (the result and its files, whose names are importable from
here too).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

from . import distributed
from .embed_cache import (CACHE_FORMAT, cache_key, library_versions, read_cache, read_window_cache, tokenizer_hash,
                          write_cache)
from .embed_files import (WINDOW_EMBEDDINGS_NAME, WINDOW_SET_FORMAT, DomainEmbeddings, load_domain_embeddings,
                          load_window_embeddings)
from .embed_pooling import embed_masked, embed_reference
from .embed_windows import window_starts
from .errors import ChameleonUserError
from .data.dataset import SPLIT_LAYOUT
from .data.tokenizer import check_same_tokenizer

__all__ = ["EmbedConfig", "DomainEmbeddings", "embed_domains", "window_starts", "load_domain_embeddings",
           "load_window_embeddings", "check_proxy_tokenizer", "WINDOW_EMBEDDINGS_NAME", "WINDOW_SET_FORMAT",
           "CACHE_FORMAT", "POOLINGS", "PRECISIONS", "cache_reuse_line"]

POOLINGS = ("masked", "reference")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class EmbedConfig:
    """How domain embeddings are sampled and pooled. Defaults follow the reference."""

    n_windows: int = 2048  # windows per domain (n)
    window: int = 512  # tokens per window (l)
    batch_size: int = 16
    layer: Optional[int] = None  # None: the model's default_embedding_layer (the middle)
    seed: int = 0
    pooling: str = "masked"  # "masked" (clean method) or "reference" (the reference's quirks)
    split: str = "train"
    precision: str = "auto"  # "auto", "fp32", "bf16" or "fp16" (module doc)

    def __post_init__(self):
        for name in ("n_windows", "window", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ChameleonUserError(f"{name}: expected a positive integer, got {v!r}")
        if self.pooling not in POOLINGS:
            raise ChameleonUserError(f"pooling: expected one of {POOLINGS}, got {self.pooling!r}")
        if self.split not in ("train", "val"):
            raise ChameleonUserError(f"split: expected 'train' or 'val', got {self.split!r}")
        if self.precision not in PRECISIONS:
            raise ChameleonUserError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")

    def resolved_precision(self, device: torch.device) -> str:
        """The precision actually used on ``device``: ``"fp32"``, ``"bf16"`` or ``"fp16"``."""
        if self.precision != "auto":
            return self.precision
        if self.pooling == "reference":
            return "fp32"  # the reference's precision
        return "bf16" if torch.device(device).type == "cuda" else "fp32"


def embed_domains(
    model,
    dataset,
    config: Optional[EmbedConfig] = None,
    device=None,
    cache_dir: Optional[str] = None,
    domains: Optional[Sequence[str]] = None,
    group=None,
    progress: bool = False,
    windows: bool = False,
) -> DomainEmbeddings:
    """Embed the domains of ``dataset`` with ``model`` (a proxy with ``hidden_states``).

    Domains found in ``cache_dir`` are not embedded again; the rest are sharded over the
    ranks of ``group`` (or the default group when torch.distributed is initialised) and
    all-reduced. Every rank returns the same result; only rank 0 writes the cache (the
    per-window means of every domain it embeds included).

    ``windows=True``: also return each window's pooled mean (``DomainEmbeddings.windows``, for
    the bootstrap); a cached domain whose per-window file is missing or damaged is then
    embedded again (with a warning).
    """
    cfg = config or EmbedConfig()
    names = list(dataset.domains if domains is None else domains)
    if not names:
        raise ChameleonUserError("domains: expected at least one domain to embed")
    missing = [n for n in names if n not in dataset.domains]
    if missing:
        raise ChameleonUserError(f"domains: {missing} are not in the dataset (it has {dataset.domains})")
    check_proxy_tokenizer(model, dataset, cfg)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None:
        dataset.check_vocab(vocab)
    dataset.check_window(cfg.window, cfg.split, names)
    block = getattr(getattr(model, "config", None), "block_size", None)
    if block is not None and cfg.window > block:
        raise ChameleonUserError(f"window: {cfg.window} tokens exceed the proxy's block_size {block}")
    layer = model.default_embedding_layer if cfg.layer is None else cfg.layer

    dev = distributed.resolve_device("auto" if device is None else device, group=group)
    precision = cfg.resolved_precision(dev)
    me = distributed.info(group)
    proxy_hash = model.content_hash
    libraries = library_versions(model)
    keys = {n: cache_key(proxy_hash, layer, precision, dataset, n, cfg, libraries) for n in names}
    cached = {n: read_cache(cache_dir, keys[n], n) for n in names}
    cached_windows = {}
    if windows:
        for n in names:
            if cached[n] is not None:
                total, count = cached[n]
                found = read_window_cache(cache_dir, keys[n], n, count, total.shape[0])
                if found is None:
                    cached[n] = None  # the windows are needed: a miss
                else:
                    cached_windows[n] = found
    todo = [n for n in names if cached[n] is None]

    fresh = {}
    if todo:
        model = model.to(dev).eval()
        run = embed_reference if cfg.pooling == "reference" else embed_masked
        fresh = run(model, dataset, cfg, todo, layer, dev, precision, me, group, progress)
        if me.is_main:
            for n in todo:
                write_cache(cache_dir, keys[n], n, *fresh[n])  # sum, count, window means
        distributed.barrier(group)

    sums, counts = [], []
    for n in names:
        total, count = cached[n] if cached[n] is not None else fresh[n][:2]
        sums.append(total.double().cpu() / count)
        counts.append(int(count))
    window_means = [cached_windows[n] if n in cached_windows else fresh[n][2] for n in names] if windows else None
    settings = dict(asdict(cfg), layer=layer, precision=precision, proxy_sha256=proxy_hash,
                    tokenizer_sha256=tokenizer_hash(dataset), split_layout=SPLIT_LAYOUT, **libraries)
    return DomainEmbeddings(names, torch.stack(sums), counts, settings, computed=todo, windows=window_means)


def cache_reuse_line(emb: DomainEmbeddings, cache_dir: Optional[str]) -> Optional[str]:
    """The line a command prints when ``emb`` reused cached embeddings: which domains, from
    where, and why they still hold (None when every domain was embedded now)."""
    reused = [d for d in emb.domains if d not in emb.computed]
    if not reused:
        return None
    return (f"embeddings of {len(reused)} domain(s) {reused} reused from the cache {cache_dir} (each entry is "
            "keyed by the proxy's content hash, the domain's data fingerprint, the tokenizer, the split and "
            "the embedding settings, so it is what embedding now would give)")


def check_proxy_tokenizer(model, dataset, cfg: Optional[EmbedConfig] = None) -> None:
    """Raise if the proxy records a tokenizer and the dataset's text was tokenised with another.

    Pre-tokenised domains carry no tokenizer, so a dataset made only of them is not checked
    (unless reference pooling re-tokenises windows with the dataset's tokenizer)."""
    expected = getattr(model, "tokenizer_record", None)
    tok = getattr(dataset, "tokenizer", None)
    if not expected or tok is None:
        return
    kinds = {dataset.kind(n) for n in dataset.domains} if hasattr(dataset, "kind") else {"text"}
    if "text" in kinds or (cfg is not None and cfg.pooling == "reference"):
        check_same_tokenizer(expected, tok, "the proxy")
