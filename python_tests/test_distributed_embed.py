"""Domain embeddings under torch.distributed (2 CPU processes, gloo, loopback): the same
embeddings and weights as one process, and every window embedded exactly once."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch

from chameleon_ext import distributed
from chameleon_ext.data import load_dataset
from chameleon_ext.embed import EmbedConfig, embed_domains
from chameleon_ext.model import GPT, GPTConfig

from .factories import exit_spawned_worker, set_worker_env, spawn_workers

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

WORLD = 2
CONFIGS = {
    "masked": EmbedConfig(n_windows=7, window=24, batch_size=3, seed=5),  # 21 windows: uneven shards
    "reference": EmbedConfig(n_windows=5, window=24, batch_size=2, seed=5, pooling="reference"),
}


def _model():
    return GPT(GPTConfig(vocab_size=257, n_layer=3, n_head=2, n_embd=32, block_size=32), seed=3)


def _make_dataset(root):
    rng = np.random.default_rng(1)
    texts = {
        "prose": " ".join("the cat sat on the warm mat and looked at the door" for _ in range(60)),
        "numbers": " ".join(str(int(v)) for v in rng.integers(0, 10**5, 300)),
        "dna": "".join("ACGT"[int(i)] for i in rng.integers(0, 4, 2000)),
        "accents": " ".join("café naïve über façade" for _ in range(80)),  # multi-byte UTF-8
    }
    for name, text in texts.items():
        os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, name, "data.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    return load_dataset(root)


def _worker(rank, world, port, data_root, work):
    set_worker_env(rank, world, port, timeout_s=60)
    distributed.init_from_env(device="cpu")
    try:
        ds = load_dataset(data_root)
        seen = collections.Counter()
        real = ds.windows_at

        def logging_windows_at(name, starts, length, split="train"):
            for s in np.asarray(starts).tolist():
                seen[(name, int(s))] += 1
            return real(name, starts, length, split)

        ds.windows_at = logging_windows_at
        out = {}
        for name, cfg in CONFIGS.items():
            seen.clear()
            emb = embed_domains(_model(), ds, cfg, device="cpu", cache_dir=os.path.join(work, f"cache_{name}"),
                                windows=True)
            out[name] = {"embeddings": emb.embeddings, "counts": emb.counts, "seen": dict(seen),
                         "windows": emb.windows}
        torch.save(out, os.path.join(work, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()
    exit_spawned_worker()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data_root = str(tmp_path_factory.mktemp("demb_data"))
    work = str(tmp_path_factory.mktemp("demb_work"))
    ds = _make_dataset(data_root)
    spawn_workers(_worker, WORLD, data_root, work)
    ranks = [torch.load(os.path.join(work, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    single = {name: embed_domains(_model(), ds, cfg, device="cpu", windows=True) for name, cfg in CONFIGS.items()}
    return ds, ranks, single


def test_no_window_is_embedded_twice(runs):
    ds, ranks, _ = runs
    cfg = CONFIGS["masked"]
    per_rank = [collections.Counter(ranks[r]["masked"]["seen"]) for r in range(WORLD)]
    union = per_rank[0] + per_rank[1]
    assert sum(union.values()) == cfg.n_windows * len(ds.domains)
    # The single-process run draws exactly these windows: the ranks split them, disjointly.
    expected = collections.Counter()
    from chameleon_ext.embed import window_starts

    for name in ds.domains:
        for s in window_starts(ds, name, cfg).tolist():
            expected[(name, int(s))] += 1
    assert union == expected
    assert sum(per_rank[0].values()) > 0 and sum(per_rank[1].values()) > 0


@pytest.mark.parametrize("pooling", list(CONFIGS))
def test_every_rank_gets_every_window_mean(runs, pooling):
    """The per-window means (the bootstrap's input) are all-reduced: each rank holds every
    domain's [n, H] rows, equal to the single process's, in the same order."""
    _, ranks, single = runs
    for r in range(WORLD):
        got = ranks[r][pooling]["windows"]
        assert len(got) == len(single[pooling].windows)
        for w, ref in zip(got, single[pooling].windows):
            assert w.shape == ref.shape and w.dtype == torch.float32
            torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)
