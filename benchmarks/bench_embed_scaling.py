"""Embedding extraction throughput with 1 and 2 processes (torch.distributed, gloo on CPU,
one thread per process): the windows are sharded, sums and counts all-reduced once.

Each run spawns its workers; rank 0 times the embedding call between two barriers and
reports tokens/s, which lands in extra_info (``benchmarks/summarize.py`` shows the ratio).
"""

from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch

from chameleon_ext import distributed
from chameleon_ext.data import builtin_dataset_path, load_dataset
from chameleon_ext.embed import EmbedConfig, embed_domains
from chameleon_ext.model import GPT, GPTConfig
from python_tests.factories import exit_spawned_worker, set_worker_env, spawn_workers

# (layers, width, windows per domain, window length)
CASES = [(4, 256, 32, 256)]
QUICK_CASES = [(2, 32, 4, 32)]


def _worker(rank, world, port, case, result_path):
    set_worker_env(rank, world, port)
    if world > 1:
        distributed.init_from_env(device="cpu")
    layers, width, n, length = case
    ds = load_dataset(builtin_dataset_path())
    model = GPT(GPTConfig(vocab_size=ds.vocab_size, n_layer=layers, n_head=4 if width >= 64 else 2, n_embd=width,
                          block_size=length))
    cfg = EmbedConfig(n_windows=n, window=length, batch_size=8, layer=layers)  # all blocks: pure compute
    distributed.barrier()
    t0 = time.perf_counter()
    emb = embed_domains(model, ds, cfg, device="cpu")
    distributed.barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        torch.save({"seconds": seconds, "tokens": n * length * len(ds.domains), "embeddings": emb.embeddings},
                   result_path)
    if world > 1:
        torch.distributed.destroy_process_group()
    exit_spawned_worker()


@pytest.mark.parametrize("world", [1, 2])
def bench_embed_processes(benchmark, world, case):
    load_dataset(builtin_dataset_path())  # build the token cache before the workers read it
    benchmark.group = f"embedding extraction, processes, case={list(case)} cpu"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")

        def run():
            spawn_workers(_worker, world, case, path)
            return torch.load(path, weights_only=False)

        result = benchmark.pedantic(run, rounds=1, iterations=1)
    tokens_per_s = result["tokens"] / result["seconds"]
    # The median seconds of this benchmark include process start-up; compare tokens/s.
    benchmark.extra_info.update(provider=f"world{world}", world_size=world, tokens_per_s=tokens_per_s,
                                embed_seconds=result["seconds"])
    assert torch.isfinite(result["embeddings"]).all()
