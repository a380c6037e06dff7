"""Domain embeddings: the proxy's mean hidden state over sampled windows of each domain
(docs/method.md, step 2), with a cache and torch.distributed sharding.

For each domain, ``n_windows`` windows of ``window`` tokens are drawn with a generator
seeded by (seed, domain name), so a domain's windows never depend on which other domains
exist. The proxy runs only up to ``layer`` (default: the reference's middle layer); each
batch mixes windows of several domains and goes through ``domain_mean_pool`` once, which
adds every window's mean into its domain's sum. Sums and counts add across batches and
across ranks (one all-reduce), so the embedding is the same whatever the world size.

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
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

from . import distributed, io
from .errors import ChameleonUserError
from .data.dataset import SPLIT_LAYOUT
from .data.tokenizer import check_same_tokenizer, tokenizer_record
from .ops import domain_mean_pool, masked_mean_pool
from .progress import Progress

__all__ = ["EmbedConfig", "DomainEmbeddings", "embed_domains", "window_starts", "load_domain_embeddings",
           "check_proxy_tokenizer"]

# 2: the key holds the tokenizer's content hash, the transformers version, the precision
# option and the split layout (blocks spread over the stream instead of its tail).
CACHE_FORMAT = "chameleon_ext.domain_embedding/2"
POOLINGS = ("masked", "reference")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


@dataclass
class DomainEmbeddings:
    """Domain embeddings ``[k, d]`` (float64) with what produced them."""

    domains: List[str]
    embeddings: torch.Tensor  # [k, d] float64
    counts: List[int]  # windows averaged per domain (after de-duplication in reference mode)
    settings: dict
    computed: List[str] = field(default_factory=list)  # embedded now; the rest came from the cache

    def to_dict(self) -> dict:
        return {
            "domains": list(self.domains),
            "embeddings": self.embeddings.detach().cpu(),
            "counts": list(self.counts),
            "settings": dict(self.settings),
        }

    def save(self, path: str) -> None:
        """``{"domains": [...], "embeddings": Tensor[k, d], ...}``, written atomically."""
        io.save_torch(self.to_dict(), path, "embeddings file")


def load_domain_embeddings(path: str) -> DomainEmbeddings:
    """Read a ``domain_embeddings.pt`` written by :meth:`DomainEmbeddings.save`; every way its
    content can be unusable (names, shape, dtype, NaN/Inf, overflow) is an error naming the file."""
    from .manifest import check_member
    from .weights import linear_affinity

    obj = io.read_torch(path, "embeddings file")
    if not isinstance(obj, dict) or "domains" not in obj or "embeddings" not in obj:
        raise ChameleonUserError(
            f"embeddings file {path!r} holds no 'domains' and 'embeddings'; expected a domain_embeddings.pt "
            "written by 'chameleon embed' or 'chameleon weights'"
        )
    check_member(path, "embeddings file")
    domains, emb = obj["domains"], obj["embeddings"]
    if not isinstance(domains, (list, tuple)) or not all(isinstance(d, str) and d for d in domains):
        raise ChameleonUserError(f"embeddings file {path!r}: 'domains' must be a list of domain names, "
                                 f"got {domains!r:.80}")
    if len(set(domains)) != len(domains):
        dup = sorted({d for d in domains if domains.count(d) > 1})
        raise ChameleonUserError(f"embeddings file {path!r}: domain names {dup} appear more than once")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(domains):
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ChameleonUserError(
            f"embeddings file {path!r}: expected embeddings [k, d] for {len(domains)} domains, got {shape}")
    try:
        linear_affinity(emb)  # k, d >= 1, real floating point, finite, Gram without overflow
    except ValueError as exc:
        raise ChameleonUserError(f"embeddings file {path!r}: {exc}") from None
    return DomainEmbeddings(list(domains), emb.double(), list(obj.get("counts", [])), dict(obj.get("settings", {})))


def _domain_seed(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def window_starts(dataset, name: str, cfg: EmbedConfig) -> np.ndarray:
    """The ``n_windows`` window starts of domain ``name`` ``[n]``: seeded by (seed, name),
    uniform over every full window of the split (windows may cross documents)."""
    total = dataset.n_tokens(name, cfg.split)
    if total < cfg.window:
        dataset.check_window(cfg.window, cfg.split, [name])  # raises, naming the domain
    return _domain_seed(cfg.seed, name).integers(0, total - cfg.window + 1, size=cfg.n_windows)


# --------------------------------------------------------------------------- cache


def _library_versions(model) -> dict:
    """Versions of the libraries that compute a proxy's hidden states beyond torch: the
    ``transformers`` version for a Hugging Face proxy (4.x and 5.x tokenise and compute
    differently), nothing for chameleon_ext's own GPT."""
    from .model import HFCausalLM

    if isinstance(model, HFCausalLM):
        import transformers

        return {"transformers": transformers.__version__}
    return {}


def _tokenizer_hash(dataset) -> Optional[str]:
    tok = getattr(dataset, "tokenizer", None)
    return None if tok is None else tokenizer_record(tok)["sha256"]


def _cache_key(proxy_hash: str, layer: int, precision: str, dataset, name: str, cfg: EmbedConfig,
               libraries: Optional[dict] = None) -> str:
    spec = {
        "format": CACHE_FORMAT,
        "proxy": proxy_hash,
        "layer": layer,
        "precision": precision,
        "libraries": dict(libraries or {}),
        # The fingerprint covers the tokenizer's name; its full content hash is added because
        # re-tokenisation (reference pooling) uses the tokenizer itself.
        "tokenizer": _tokenizer_hash(dataset),
        "domain": name,
        "fingerprint": dataset.fingerprint(name),
        "val_fraction": getattr(dataset, "val_fraction", None),
        "test_fraction": getattr(dataset, "test_fraction", 0.0),  # test blocks leave train too
        "split_layout": SPLIT_LAYOUT,
        "n_windows": cfg.n_windows,
        "window": cfg.window,
        "seed": cfg.seed,
        "pooling": cfg.pooling,
        "split": cfg.split,
    }
    if cfg.pooling == "reference":
        # Reference pooling averages over each batch's padding, so the batch size changes the
        # result; rev 2: batches hold one domain's windows and the forward masks padded keys.
        spec.update(batch_size=cfg.batch_size, reference_rev=2)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _entry_digest(total: torch.Tensor, count: int) -> str:
    return hashlib.sha256(total.double().contiguous().numpy().tobytes() + str(int(count)).encode()).hexdigest()


def _cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"{key}.pt")


def _read_cache(cache_dir: Optional[str], key: str, name: str):
    """(sum [d], count) from the cache, or None; a damaged entry is reported and ignored."""
    if cache_dir is None:
        return None
    path = _cache_path(cache_dir, key)
    if not os.path.exists(path):
        return None
    try:
        obj = io.read_torch(path, "embedding cache entry")
        ok = (
            obj.get("format") == CACHE_FORMAT
            and obj.get("key") == key
            and obj.get("sha256") == _entry_digest(obj["sum"], obj["count"])
            and bool(torch.isfinite(obj["sum"]).all())
            and int(obj["count"]) > 0
        )
    except Exception:
        ok = False
    if not ok:
        warnings.warn(f"embedding cache entry for domain {name!r} ({path}) is damaged; recomputing it", stacklevel=3)
        return None
    return obj["sum"].double(), int(obj["count"])


def _write_cache(cache_dir: Optional[str], key: str, name: str, total: torch.Tensor, count: int) -> None:
    if cache_dir is None:
        return
    total = total.detach().double().cpu()
    io.save_torch(
        {"format": CACHE_FORMAT, "key": key, "domain": name, "sum": total, "count": int(count),
         "sha256": _entry_digest(total, count)},
        _cache_path(cache_dir, key), "embedding cache entry",
    )


# --------------------------------------------------------------------------- embedding


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


def embed_domains(
    model,
    dataset,
    config: Optional[EmbedConfig] = None,
    device=None,
    cache_dir: Optional[str] = None,
    domains: Optional[Sequence[str]] = None,
    group=None,
    progress: bool = False,
) -> DomainEmbeddings:
    """Embed the domains of ``dataset`` with ``model`` (a proxy with ``hidden_states``).

    Domains found in ``cache_dir`` are not embedded again; the rest are sharded over the
    ranks of ``group`` (or the default group when torch.distributed is initialised) and
    all-reduced. Every rank returns the same result; only rank 0 writes the cache.
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
    libraries = _library_versions(model)
    keys = {n: _cache_key(proxy_hash, layer, precision, dataset, n, cfg, libraries) for n in names}
    cached = {n: _read_cache(cache_dir, keys[n], n) for n in names}
    todo = [n for n in names if cached[n] is None]

    fresh = {}
    if todo:
        model = model.to(dev).eval()
        run = _embed_reference if cfg.pooling == "reference" else _embed_masked
        fresh = run(model, dataset, cfg, todo, layer, dev, precision, me, group, progress)
        if me.is_main:
            for n in todo:
                _write_cache(cache_dir, keys[n], n, *fresh[n])
        distributed.barrier(group)

    sums, counts = [], []
    for n in names:
        total, count = cached[n] if cached[n] is not None else fresh[n]
        sums.append(total.double().cpu() / count)
        counts.append(int(count))
    settings = dict(asdict(cfg), layer=layer, precision=precision, proxy_sha256=proxy_hash,
                    tokenizer_sha256=_tokenizer_hash(dataset), split_layout=SPLIT_LAYOUT, **libraries)
    return DomainEmbeddings(names, torch.stack(sums), counts, settings, computed=todo)


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


def _forward(model, ids: torch.Tensor, layer: int, dev: torch.device, precision: str,
             attention_mask=None) -> torch.Tensor:
    # bf16 autocast on CUDA by default ("auto"): the embedding is a mean over thousands of
    # windows, so bf16's rounding averages out, and it halves the proxy's memory traffic; CPU
    # bf16 matmuls are slow on most CPUs, so CPU stays fp32 (the cache key records the precision).
    dtype = _AUTOCAST_DTYPES.get(precision)
    with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return model.hidden_states(ids, layer, attention_mask=attention_mask)


def _work_items(dataset, cfg: EmbedConfig, todo: Sequence[str], me) -> tuple:
    """This rank's contiguous share of all (domain, window) items, and each domain's starts."""
    starts = {n: window_starts(dataset, n, cfg) for n in todo}
    total = cfg.n_windows * len(todo)
    share = distributed.shard_range(total, me.rank, me.world_size)
    return share, starts


def _progress(enabled: bool, total: int, what: str) -> Progress:
    return Progress(total, desc=f"[embed] {what}", unit="window", enabled=enabled, plain_every=0.1)


@torch.inference_mode()
def _embed_masked(model, dataset, cfg, todo, layer, dev, precision, me, group, progress):
    """Clean method: full windows (no padding), means summed per domain by domain_mean_pool."""
    share, starts = _work_items(dataset, cfg, todo, me)
    H = None
    sums = counts = None
    bar = _progress(progress and me.is_main, len(share), f"rank {me.rank}")
    tokens = 0
    items = list(share)
    for b0 in range(0, len(items), cfg.batch_size):
        chunk = items[b0 : b0 + cfg.batch_size]
        dom = np.array([i // cfg.n_windows for i in chunk])
        win = np.array([i % cfg.n_windows for i in chunk])
        windows = np.concatenate(
            [dataset.windows_at(todo[d], starts[todo[d]][win[dom == d]], cfg.window, cfg.split) for d in np.unique(dom)]
        )  # [b, l]; rows grouped by domain in the same order as `dom` (items are sorted)
        ids = torch.from_numpy(windows).to(dev)
        hidden = _forward(model, ids, layer, dev, precision)  # [b, l, H]
        s, c = domain_mean_pool(hidden, None, torch.from_numpy(dom).to(dev), len(todo))
        if sums is None:
            H = hidden.shape[-1]
            sums = torch.zeros(len(todo), H, dtype=torch.float64, device=dev)
            counts = torch.zeros(len(todo), dtype=torch.int64, device=dev)
        sums += s.double()
        counts += c
        tokens += ids.numel()
        bar.update(len(chunk), f"{tokens / max(bar.elapsed(), 1e-9):,.0f} tokens/s")
    if sums is None:  # this rank had no work (more ranks than windows)
        H = _hidden_size(model)
        sums = torch.zeros(len(todo), H, dtype=torch.float64, device=dev)
        counts = torch.zeros(len(todo), dtype=torch.int64, device=dev)
    bar.close()
    distributed.all_reduce_sum_(sums, group)
    distributed.all_reduce_sum_(counts, group)
    return {n: (sums[i].cpu(), int(counts[i])) for i, n in enumerate(todo)}


@torch.inference_mode()
def _embed_reference(model, dataset, cfg, todo, layer, dev, precision, me, group, progress):
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
    starts = {n: window_starts(dataset, n, cfg) for n in todo}
    batches = [(d, j) for d in range(len(todo)) for j in range(0, cfg.n_windows, cfg.batch_size)]
    share = [batches[i] for i in distributed.shard_range(len(batches), me.rank, me.world_size)]
    rows = []  # (domain index, window vector) for this rank, in window order
    n_items = sum(min(cfg.batch_size, cfg.n_windows - j) for _, j in share)
    bar = _progress(progress and me.is_main, n_items, f"rank {me.rank} (reference pooling)")
    tokens = 0
    for d, j in share:
        name = todo[d]
        windows = dataset.windows_at(name, starts[name][j : j + cfg.batch_size], cfg.window, cfg.split)
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
        unique = np.unique(vecs, axis=0)
        out[name] = (torch.from_numpy(unique.sum(0)), unique.shape[0])
    return out


def _hidden_size(model) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("n_embd", "hidden_size", "d_model"):
        if cfg is not None and hasattr(cfg, attr):
            return int(getattr(cfg, attr))
    raise ChameleonUserError("cannot tell the proxy's hidden size; give every rank at least one window")
