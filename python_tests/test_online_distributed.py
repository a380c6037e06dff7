"""Exact resume of online weights and of schedule-following runs under torch.distributed (two CPU
processes, gloo, loopback; the environment torchrun gives, through factories.spawn_workers).

One spawn runs the uninterrupted runs and the first legs of the interrupted ones (stopped
between two weight changes, and right after one); a second spawn, new processes, resumes them.
Every rank must end with bitwise the same model as the uninterrupted run, the ranks must draw
with the same weights at every step, and the online run's schedule.json must be the same."""

from __future__ import annotations

import os

import pytest
import torch

from chameleon_ext import distributed
from chameleon_ext.data import load_dataset
from chameleon_ext.online import OnlineChameleon, OnlineWeights
from chameleon_ext.schedule import load_schedule
from chameleon_ext.schedule_weights import ScheduleWeights
from chameleon_ext.trainer import train

from .factories import TEXT_DOMAINS, exit_spawned_worker, set_worker_env, spawn_workers, write_text_domains
from .test_online_training import STEPS, USER_SCHEDULE, _cfg, _expected_probs, _model

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

WORLD = 2
SPLITS = {"a": [5], "b": [4, 10]}  # between two changes (online: 4, 7, 10); right after one


class _Used:
    """Mix-in: record the weights the sampler drew each step with (on this rank)."""

    def on_batch(self, state, batch):
        self.used[state.step] = list(state.sampler.probs)
        super().on_batch(state, batch)


class _Online(_Used, OnlineWeights):
    def __init__(self, ds, out):
        super().__init__(OnlineChameleon(ds.domains, every=3, warmup=4, floor=0.02), 1,
                         os.path.join(out, "schedule.json"))
        self.used = {}


class _Schedule(_Used, ScheduleWeights):
    def __init__(self, ds, out):
        super().__init__(USER_SCHEDULE, copy_path=os.path.join(out, "schedule.json"))
        self.used = {}


KINDS = {"online": _Online, "schedule": _Schedule}


def _run(kind, ds, out, stop_at=None):
    cb = KINDS[kind](ds, out)
    model = _model()
    weights = "uniform" if kind == "online" else cb.initial_weights()
    train(model, ds, weights, _cfg(out), callbacks=[cb], stop_at=stop_at)
    return model, cb


def _first(rank, world, data_root, work):
    ds = load_dataset(data_root)
    out = {}
    for kind in KINDS:
        model, cb = _run(kind, ds, os.path.join(work, f"{kind}_straight"))
        out[kind] = {"params": model.state_dict(), "used": cb.used}
        for name, stops in SPLITS.items():
            _run(kind, ds, os.path.join(work, f"{kind}_{name}"), stop_at=stops[0])
    torch.save(out, os.path.join(work, f"first_rank{rank}.pt"))


def _second(rank, world, data_root, work):
    ds = load_dataset(data_root)
    out = {}
    for kind in KINDS:
        for name, stops in SPLITS.items():
            folder = os.path.join(work, f"{kind}_{name}")
            used = {}
            for stop in stops[1:]:
                used.update(_run(kind, ds, folder, stop_at=stop)[1].used)
            model, cb = _run(kind, ds, folder)
            used.update(cb.used)
            out[f"{kind}_{name}"] = {"params": model.state_dict(), "used": used}
    torch.save(out, os.path.join(work, f"second_rank{rank}.pt"))


def _entry(rank, world, port, scenario, data_root, work):
    set_worker_env(rank, world, port, 60)
    distributed.init_from_env(device="cpu")
    try:
        globals()[scenario](rank, world, data_root, work)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    exit_spawned_worker()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_ddp")
    data_root = write_text_domains(str(root / "data"), names=TEXT_DOMAINS)
    load_dataset(data_root)  # the token cache, built once before the workers read it
    work = str(root / "work")
    os.makedirs(work)
    spawn_workers(_entry, WORLD, "_first", data_root, work)
    spawn_workers(_entry, WORLD, "_second", data_root, work)
    load = lambda name: [torch.load(os.path.join(work, f"{name}_rank{r}.pt"), weights_only=False)  # noqa: E731
                         for r in range(WORLD)]
    return work, load("first"), load("second")


@pytest.mark.parametrize("kind", list(KINDS))
def test_resume_under_two_processes_is_bitwise_exact(runs, kind):
    work, first, second = runs
    straight = first[0][kind]
    assert sorted(straight["used"]) == list(range(STEPS))
    for rank in range(WORLD):
        # every rank drew with the same weights at every step, and holds the same model
        assert first[rank][kind]["used"] == straight["used"], rank
        for name, a in straight["params"].items():
            assert torch.equal(first[rank][kind]["params"][name], a), (rank, name)
        for split, stops in SPLITS.items():
            resumed = second[rank][f"{kind}_{split}"]
            assert sorted(resumed["used"]) == list(range(stops[0], STEPS))
            assert all(resumed["used"][s] == straight["used"][s] for s in resumed["used"]), (rank, split)
            for name, a in straight["params"].items():
                assert torch.equal(resumed["params"][name], a), (rank, split, name)
    if kind == "schedule":  # the user's schedule, independently of the code under test
        assert all(p == _expected_probs(s) for s, p in straight["used"].items())
    else:  # weights changed (at 4, 7, 10), and the schedule written says so, the same after a resume
        changes = [s for s in range(1, STEPS) if straight["used"][s] != straight["used"][s - 1]]
        assert changes == [4, 7, 10]
        doc = load_schedule(os.path.join(work, "online_straight", "schedule.json"))
        assert [e.start_step for e in doc.entries] == [0, 4, 7, 10]
        for split in SPLITS:
            assert load_schedule(os.path.join(work, f"online_{split}", "schedule.json")).as_dict() == doc.as_dict()
