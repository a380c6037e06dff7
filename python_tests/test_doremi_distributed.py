"""DoReMi under torch.distributed (2 gloo processes): every rank gets the single-process
domain weights from its half of the batch, and the DRO loss's gradient averaged over ranks
(what DDP does) equals the single-process gradient on the whole batch."""

import os

import pytest
import torch

from chameleon_ext import distributed
from chameleon_ext.baselines import doremi as D

from .factories import exit_spawned_worker, set_worker_env, spawn_workers

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

WORLD, K = 2, 4


def _batch():
    g = torch.Generator().manual_seed(0)
    proxy = torch.rand(6, 5, generator=g, dtype=torch.float64) * 3
    ref = torch.rand(6, 5, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(6, 5, generator=g) > 0.2
    # rank 0 holds domains {0, 1}, rank 1 domains {1, 2}; domain 3 is absent everywhere
    ids = torch.tensor([0, 1, 0, 1, 2, 2])
    return proxy, ref, ids, mask


def _worker(rank, world, port, work):
    set_worker_env(rank, world, port, timeout_s=60)
    distributed.init_from_env(device="cpu")
    try:
        proxy, ref, ids, mask = _batch()
        rows = slice(3 * rank, 3 * rank + 3)
        w = D.DoReMiWeights(K)
        w.update(proxy[rows], ref[rows], ids[rows], mask[rows])
        out = {"alpha": w.alpha}
        for reduction in D.REDUCTIONS:
            x = proxy[rows].clone().requires_grad_(True)
            loss = D.dro_loss(x, ids[rows], w.alpha, mask[rows], reduction=reduction)
            loss.backward()
            out[reduction] = (loss.detach(), x.grad)
        torch.save(out, os.path.join(work, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()
    exit_spawned_worker()


def test_two_processes_match_one(tmp_path):
    spawn_workers(_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    proxy, ref, ids, mask = _batch()
    single = D.DoReMiWeights(K)
    single.update(proxy, ref, ids, mask)
    for r in range(WORLD):
        assert torch.equal(ranks[r]["alpha"], single.alpha)
    for reduction in D.REDUCTIONS:
        x = proxy.clone().requires_grad_(True)
        loss = D.dro_loss(x, ids, single.alpha, mask, reduction=reduction)
        loss.backward()
        mean_loss = sum(ranks[r][reduction][0] for r in range(WORLD)) / WORLD
        torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-12, atol=1e-12)
        averaged = torch.cat([ranks[r][reduction][1] for r in range(WORLD)]) / WORLD  # DDP averages
        torch.testing.assert_close(averaged, x.grad, rtol=1e-12, atol=1e-12)
