"""The domain embeddings :func:`chameleon_ext.embed.embed_domains` returns, and their files:
``domain_embeddings.pt`` (the ``[k, d]`` float64 embeddings with what produced them) and the
``window_embeddings.pt`` beside it (each window's pooled mean, for the bootstrap), both written
atomically and read back with every way their content can be unusable named."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from . import io
from .embed_cache import pack_window_embeddings, unpack_window_embeddings
from .errors import ChameleonUserError
from .manifest import check_member
from .mixture import check_domain_names
from .weights import linear_affinity

__all__ = ["DomainEmbeddings", "load_domain_embeddings", "load_window_embeddings", "WINDOW_EMBEDDINGS_NAME",
           "WINDOW_SET_FORMAT"]

# The per-window means beside a domain_embeddings.pt (the weights output set), and their format.
WINDOW_EMBEDDINGS_NAME = "window_embeddings.pt"
WINDOW_SET_FORMAT = "chameleon_ext.window_embedding_set/1"


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
