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
from .embed_cache import pack_window_embeddings, unpack_window_embeddings, window_cache_path
from .errors import ChameleonUserError
from .mixture import check_domain_names
from .data.dataset import SPLIT_LAYOUT
from .data.tokenizer import check_same_tokenizer, tokenizer_record
from .ops import domain_mean_pool, masked_mean_pool
from .progress import Progress

__all__ = ["EmbedConfig", "DomainEmbeddings", "embed_domains", "window_starts", "load_domain_embeddings",
           "load_window_embeddings", "check_proxy_tokenizer", "WINDOW_EMBEDDINGS_NAME"]

# 2: the key holds the tokenizer's content hash, the transformers version, the precision
# option and the split layout (blocks spread over the stream instead of its tail).
CACHE_FORMAT = "chameleon_ext.domain_embedding/2"
POOLINGS = ("masked", "reference")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The per-window means beside a domain_embeddings.pt (the weights output set), and their format.
WINDOW_EMBEDDINGS_NAME = "window_embeddings.pt"
WINDOW_SET_FORMAT = "chameleon_ext.window_embedding_set/1"


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
    # Per domain, each window's pooled mean [n_i, d] float32 (the de-duplicated window vectors in
    # reference pooling), for the bootstrap; None when not asked for (embed_domains(windows=...)).
    windows: Optional[List[torch.Tensor]] = None

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

    def save_windows(self, path: str) -> None:
        """The per-window means (``window_embeddings.pt``), one checksummed entry per domain in
        the per-window cache format (:func:`chameleon_ext.embed_cache.pack_window_embeddings`),
        written atomically; read back with :func:`load_window_embeddings`."""
        if self.windows is None:
            raise ChameleonUserError("these domain embeddings carry no per-window means (embed with windows=True)")
        entries = [pack_window_embeddings(w, key=n, domain=n) for n, w in zip(self.domains, self.windows)]
        io.save_torch({"format": WINDOW_SET_FORMAT, "domains": list(self.domains), "entries": entries},
                      path, "window embeddings file")


def load_domain_embeddings(path: str, windows: bool = False) -> DomainEmbeddings:
    """Read a ``domain_embeddings.pt`` written by :meth:`DomainEmbeddings.save`; every way its
    content can be unusable (names, shape, dtype, NaN/Inf, overflow) is an error naming the file.

    ``windows=True``: also read the per-window means from the ``window_embeddings.pt`` beside
    it when there is one (``chameleon weights`` writes both); ``.windows`` stays None without it."""
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
    if domains or not isinstance(domains, (list, tuple)):  # none at all: the shape check below says k >= 1
        domains = check_domain_names(domains, what=f"embeddings file {path!r}: 'domains'")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(domains):
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ChameleonUserError(
            f"embeddings file {path!r}: expected embeddings [k, d] for {len(domains)} domains, got {shape}")
    try:
        linear_affinity(emb)  # k, d >= 1, real floating point, finite, Gram without overflow
    except ValueError as exc:
        raise ChameleonUserError(f"embeddings file {path!r}: {exc}") from None
    result = DomainEmbeddings(list(domains), emb.double(), list(obj.get("counts", [])), dict(obj.get("settings", {})))
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), WINDOW_EMBEDDINGS_NAME)
    if windows and os.path.isfile(beside):
        result.windows = load_window_embeddings(beside, result.domains)
        bad = [n for n, w in zip(result.domains, result.windows) if w.shape[1] != emb.shape[1]]
        if bad:
            raise ChameleonUserError(f"window embeddings file {beside!r}: domain(s) {bad} have d != {emb.shape[1]}, "
                                     f"the embeddings' in {path!r}")
    return result


def load_window_embeddings(path: str, domains: Sequence[str]) -> List[torch.Tensor]:
    """The per-window means ``[n_i, d]`` (float32) of ``domains`` from a ``window_embeddings.pt``
    written by :meth:`DomainEmbeddings.save_windows`; any mismatch or damage is an error naming
    the file."""
    from .manifest import check_member

    obj = io.read_torch(path, "window embeddings file")
    if not isinstance(obj, dict) or obj.get("format") != WINDOW_SET_FORMAT:
        raise ChameleonUserError(f"window embeddings file {path!r} is not a {WINDOW_EMBEDDINGS_NAME} "
                                 f"(expected format {WINDOW_SET_FORMAT!r})")
    check_member(path, "window embeddings file")
    if list(obj.get("domains", [])) != list(domains) or len(obj.get("entries", [])) != len(domains):
        raise ChameleonUserError(f"window embeddings file {path!r} is for domains {obj.get('domains')}, "
                                 f"the embeddings for {list(domains)}")
    try:
        return [unpack_window_embeddings(e, key=n, domain=n) for e, n in zip(obj["entries"], domains)]
    except ChameleonUserError as exc:
        raise ChameleonUserError(f"window embeddings file {path!r}: {exc}") from None


def _domain_seed(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def window_starts(dataset, name: str, cfg: EmbedConfig) -> np.ndarray:
    """The ``n_windows`` window starts of domain ``name`` ``[n]``: seeded by (seed, name),
    uniform over every full window of the split (windows may cross documents). A streamed
    domain has no token positions: its windows come from ``dataset.draw_windows``."""
    if getattr(dataset, "is_streamed", lambda _: False)(name):
        raise ChameleonUserError(f"domain {name!r} is streamed: it has no window starts; use dataset.draw_windows")
    total = dataset.n_tokens(name, cfg.split)
    if total < cfg.window:
        dataset.check_window(cfg.window, cfg.split, [name])  # raises, naming the domain
    return _domain_seed(cfg.seed, name).integers(0, total - cfg.window + 1, size=cfg.n_windows)


class _DomainWindows:
    """Each domain's ``n_windows`` windows ``[n, window]``, drawn on first use by
    ``dataset.draw_windows`` with the (seed, name) generator -- for cached and pre-tokenised
    domains exactly the windows at :func:`window_starts` -- holding one domain at a time
    (work items come in domain order)."""

    def __init__(self, dataset, cfg: EmbedConfig):
        self.dataset, self.cfg, self.name, self.windows = dataset, cfg, None, None

    def __call__(self, name: str, rows) -> np.ndarray:
        if name != self.name:
            cfg, ds = self.cfg, self.dataset
            if hasattr(ds, "draw_windows"):
                self.windows = ds.draw_windows(name, cfg.n_windows, cfg.window, _domain_seed(cfg.seed, name), cfg.split)
            else:  # a dataset-like object with token positions only
                self.windows = ds.windows_at(name, window_starts(ds, name, cfg), cfg.window, cfg.split)
            self.name = name
        return self.windows[rows]


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


def _read_window_cache(cache_dir: Optional[str], key: str, name: str, count: int, dim: int):
    """The domain's per-window means ``[count, dim]`` from the cache, or None (with a warning:
    the caller then embeds the domain again)."""
    if cache_dir is None:
        return None
    path = window_cache_path(cache_dir, key)
    if not os.path.exists(path):
        warnings.warn(f"embedding cache entry for domain {name!r} has no per-window means ({path}; written "
                      "before they were cached); embedding the domain again for the bootstrap", stacklevel=3)
        return None
    try:
        windows = unpack_window_embeddings(io.read_torch(path, "per-window embedding cache entry"), key, name)
        if tuple(windows.shape) != (count, dim):
            raise ChameleonUserError(f"holds {tuple(windows.shape)} window means, the sum entry {count} x {dim}")
    except Exception as exc:
        warnings.warn(f"per-window embedding cache entry for domain {name!r} ({path}) is damaged ({exc}); "
                      "recomputing it", stacklevel=3)
        return None
    return windows


def _write_cache(cache_dir: Optional[str], key: str, name: str, total: torch.Tensor, count: int,
                 windows: Optional[torch.Tensor] = None) -> None:
    if cache_dir is None:
        return
    if windows is not None:
        # Before the sum entry: a kill between the two leaves a sum without windows, which a
        # bootstrap run treats as a miss, never windows that belong to no sum.
        io.save_torch(pack_window_embeddings(windows, key, name), window_cache_path(cache_dir, key),
                      "per-window embedding cache entry")
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
    libraries = _library_versions(model)
    keys = {n: _cache_key(proxy_hash, layer, precision, dataset, n, cfg, libraries) for n in names}
    cached = {n: _read_cache(cache_dir, keys[n], n) for n in names}
    cached_windows = {}
    if windows:
        for n in names:
            if cached[n] is not None:
                total, count = cached[n]
                found = _read_window_cache(cache_dir, keys[n], n, count, total.shape[0])
                if found is None:
                    cached[n] = None  # the windows are needed: a miss
                else:
                    cached_windows[n] = found
    todo = [n for n in names if cached[n] is None]

    fresh = {}
    if todo:
        model = model.to(dev).eval()
        run = _embed_reference if cfg.pooling == "reference" else _embed_masked
        fresh = run(model, dataset, cfg, todo, layer, dev, precision, me, group, progress)
        if me.is_main:
            for n in todo:
                _write_cache(cache_dir, keys[n], n, *fresh[n])  # sum, count, window means
        distributed.barrier(group)

    sums, counts = [], []
    for n in names:
        total, count = cached[n] if cached[n] is not None else fresh[n][:2]
        sums.append(total.double().cpu() / count)
        counts.append(int(count))
    window_means = [cached_windows[n] if n in cached_windows else fresh[n][2] for n in names] if windows else None
    settings = dict(asdict(cfg), layer=layer, precision=precision, proxy_sha256=proxy_hash,
                    tokenizer_sha256=_tokenizer_hash(dataset), split_layout=SPLIT_LAYOUT, **libraries)
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


def _forward(model, ids: torch.Tensor, layer: int, dev: torch.device, precision: str,
             attention_mask=None) -> torch.Tensor:
    # bf16 autocast on CUDA by default ("auto"): the embedding is a mean over thousands of
    # windows, so bf16's rounding averages out, and it halves the proxy's memory traffic; CPU
    # bf16 matmuls are slow on most CPUs, so CPU stays fp32 (the cache key records the precision).
    dtype = _AUTOCAST_DTYPES.get(precision)
    with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return model.hidden_states(ids, layer, attention_mask=attention_mask)


def _work_items(dataset, cfg: EmbedConfig, todo: Sequence[str], me) -> tuple:
    """This rank's contiguous share of all (domain, window) items, and the domains' windows."""
    total = cfg.n_windows * len(todo)
    share = distributed.shard_range(total, me.rank, me.world_size)
    return share, _DomainWindows(dataset, cfg)


def _progress(enabled: bool, total: int, what: str) -> Progress:
    return Progress(total, desc=f"[embed] {what}", unit="window", enabled=enabled, plain_every=0.1)


@torch.inference_mode()
def _embed_masked(model, dataset, cfg, todo, layer, dev, precision, me, group, progress):
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
    domain_windows = _DomainWindows(dataset, cfg)
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
