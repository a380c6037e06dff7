"""Which windows embed a domain: ``n_windows`` windows of ``window`` tokens drawn with a
generator seeded by (seed, domain name), so a domain's windows never depend on which other
domains exist."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from .errors import ChameleonUserError

if TYPE_CHECKING:
    from .embed import EmbedConfig

__all__ = ["domain_seed", "window_starts", "DomainWindows"]


def domain_seed(seed: int, name: str) -> np.random.Generator:
    """The generator that draws domain ``name``'s windows: seeded by ``seed`` and a hash of the name."""
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
    return domain_seed(cfg.seed, name).integers(0, total - cfg.window + 1, size=cfg.n_windows)


class DomainWindows:
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
                self.windows = ds.draw_windows(name, cfg.n_windows, cfg.window, domain_seed(cfg.seed, name), cfg.split)
            else:  # a dataset-like object with token positions only
                self.windows = ds.windows_at(name, window_starts(ds, name, cfg), cfg.window, cfg.split)
            self.name = name
        return self.windows[rows]
