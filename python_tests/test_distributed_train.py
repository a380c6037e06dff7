"""Data-parallel training and evaluation under torch.distributed (2 CPU processes, gloo, loopback).

Workers are started with ``torch.multiprocessing.spawn`` and the environment torchrun would
set (MASTER_ADDR/PORT, WORLD_SIZE, RANK, LOCAL_RANK), then call
``chameleon_ext.distributed.init_from_env(device="cpu")``. To keep the suite short, one spawn
runs several scenarios; each worker writes what it saw to files that the tests compare with
single-process runs in the pytest process.
"""

from __future__ import annotations

import json
import os
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from chameleon_ext import distributed
from chameleon_ext.callbacks import Callback
from chameleon_ext.data import load_dataset
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.model import GPT, GPTConfig, load_model
from chameleon_ext.checkpoint import load_checkpoint
from chameleon_ext.data.sampler import WeightedDomainSampler
from chameleon_ext.trainer import TrainConfig, evaluate, train

from .factories import TEXT_DOMAINS, exit_spawned_worker, set_worker_env, spawn_workers, write_text_domains

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

BLOCK = 16
WORLD = 2
WEIGHTS = {"alpha": 0.4, "digits": 0.3, "dna": 0.2, "zeta": 0.1}
STEPS = 6  # the straight run; the split run stops at STEPS // 2 and resumes in a new spawn
EVAL = dict(n_windows=5, batch_size=2)  # 5 windows over 2 ranks: uneven shards


def _model(seed=0, dropout=0.0):
    return GPT(GPTConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK,
                         dropout=dropout), seed=seed)


def _cfg(out_dir, **kw):
    base = dict(steps=STEPS, batch_size=4, grad_accum=2, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                ckpt_every=0, log_every=2, eval_every=0, eval_windows=3, eval_batch_size=2,
                device="cpu", out_dir=str(out_dir), quiet=True)
    base.update(kw)
    return TrainConfig(**base)


class _Mix(Callback):
    """Changes the mixture after step 2 (the same on every rank) and counts, per rank, the rows
    it saw of each domain: state that differs across ranks and must resume exactly."""

    LATER = {"alpha": 0.1, "digits": 0.2, "dna": 0.3, "zeta": 0.4}

    def __init__(self):
        self.rows = [0, 0, 0, 0]

    def on_batch(self, state, batch):
        for d in batch.domain.tolist():
            self.rows[d] += 1

    def on_step_end(self, state):
        if state.step == 2:
            state.set_weights(self.LATER)

    def state_dict(self):
        return {"rows": list(self.rows)}

    def load_state_dict(self, state):
        self.rows = list(state["rows"])


def _make_dataset(root):
    # builds the token cache once, before any worker reads it
    return load_dataset(write_text_domains(root, names=TEXT_DOMAINS))


# -- worker plumbing -------------------------------------------------------------------------


def _entry(rank, world, port, scenario, args, timeout_s):
    set_worker_env(rank, world, port, timeout_s)
    di = distributed.init_from_env(device="cpu")
    assert (di.rank, di.world_size) == (rank, world)
    try:
        globals()[scenario](rank, world, *args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    exit_spawned_worker()


def _spawn(scenario, *args, timeout_s=60):
    spawn_workers(_entry, WORLD, scenario, args, timeout_s)


def _save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _outcome(fn):
    """('ok', value) or (exception type name, message) -- for checking failures per rank."""
    try:
        return ("ok", fn())
    except Exception as exc:  # noqa: BLE001
        return (type(exc).__name__, str(exc))


# Scenarios (run on every rank).

def _scenario_first_run(rank, world, data_root, work):
    ds = load_dataset(data_root)
    straight, mix = _model(), _Mix()
    res = train(straight, ds, WEIGHTS, _cfg(os.path.join(work, "straight"), eval_every=3),
                callbacks=[mix])
    part = train(_model(), ds, WEIGHTS, _cfg(os.path.join(work, "split")), stop_at=STEPS // 2,
                 callbacks=[_Mix()])
    # with dropout, exact resume also needs each rank's own torch RNG state back
    straight_do = _model(dropout=0.1)
    train(straight_do, ds, WEIGHTS, _cfg(os.path.join(work, "straight_do")))
    train(_model(dropout=0.1), ds, WEIGHTS, _cfg(os.path.join(work, "split_do")),
          stop_at=STEPS // 2)
    _save({"params": straight.state_dict(), "result": res, "part_step": part["step"],
           "params_do": straight_do.state_dict(), "rows": mix.rows},
          os.path.join(work, f"first_rank{rank}.pt"))


def _scenario_second_run(rank, world, data_root, work):
    ds = load_dataset(data_root)
    out = {}
    # resume the split run in a new 2-process run; a different init must not matter
    resumed, mix = _model(seed=rank + 7), _Mix()
    out["resume"] = train(resumed, ds, WEIGHTS, _cfg(os.path.join(work, "split")),
                          callbacks=[mix])
    out["params"] = resumed.state_dict()
    out["rows"] = mix.rows
    torch.manual_seed(1234 + rank)  # disturb the global RNG: the checkpoint must restore it
    resumed_do = _model(seed=rank + 7, dropout=0.1)
    train(resumed_do, ds, WEIGHTS, _cfg(os.path.join(work, "split_do")))
    out["params_do"] = resumed_do.state_dict()
    # distributed evaluation of a fixed model (trained, so losses differ across domains)
    model = load_model(os.path.join(work, "straight", "model.pt"))
    out["eval"] = evaluate(model, ds, EVAL["n_windows"], BLOCK, seed=3, device="cpu",
                           batch_size=EVAL["batch_size"])
    # a single-process checkpoint cannot be resumed by 2 processes
    out["world_mismatch"] = _outcome(lambda: train(_model(), ds, WEIGHTS,
                                                   _cfg(os.path.join(work, "single_ckpt"))))
    # the global batch must split evenly
    out["indivisible"] = _outcome(lambda: train(_model(), ds, WEIGHTS,
                                                _cfg(os.path.join(work, "odd"), batch_size=3)))
    # a set-up error on one rank only stops the other rank at once (no hang, no timeout)
    bad = dict(WEIGHTS, dna=-1.0) if rank == 1 else WEIGHTS
    out["one_rank_bad"] = _outcome(lambda: train(_model(), ds, bad,
                                                 _cfg(os.path.join(work, "bad"))))
    # the group is still usable after those collective failures
    t = torch.ones(1)
    distributed.all_reduce_sum_(t)
    out["after"] = float(t)
    _save(out, os.path.join(work, f"second_rank{rank}.pt"))


def _scenario_rank_fails(rank, world, data_root, work, stay_alive):
    """Rank 1 raises during training step 3. With ``stay_alive`` it then keeps its process
    (and its connections) open, as a wedged process would: rank 0 must give up on its own."""
    ds = load_dataset(data_root)
    if rank == 1:
        real = WeightedDomainSampler.sample
        calls = {"n": 0}

        def dying(self, batch_size):
            calls["n"] += 1
            if calls["n"] == 5:  # step 3 (grad_accum 2)
                raise RuntimeError("simulated failure on rank 1")
            return real(self, batch_size)

        WeightedDomainSampler.sample = dying
    try:
        train(_model(), ds, WEIGHTS, _cfg(os.path.join(work, f"fail{int(stay_alive)}")))
    except BaseException as exc:
        if rank == 0:  # what stopped rank 0 (it may also be terminated before writing this)
            with open(os.path.join(work, "rank0_error.txt"), "w") as f:
                f.write(f"{type(exc).__name__}: {exc}")
        if rank == 1 and stay_alive:
            traceback.print_exc()
            time.sleep(120)  # killed by spawn once rank 0 has failed
        raise


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dmix"))
    _make_dataset(root)
    return root


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """Two 2-process runs (the second resumes the first's split run) and the single-process
    references they are compared with."""
    work = str(tmp_path_factory.mktemp("dist"))
    ds = load_dataset(data_root)
    # single-process references, and a single-process checkpoint for the world-size check
    single, single_mix = _model(), _Mix()
    single_res = train(single, ds, WEIGHTS, _cfg(os.path.join(work, "single"), eval_every=3),
                       callbacks=[single_mix])
    train(_model(), ds, WEIGHTS, _cfg(os.path.join(work, "single_ckpt")), stop_at=2)

    t0 = time.monotonic()
    _spawn("_scenario_first_run", data_root, work)
    t1 = time.monotonic()
    _spawn("_scenario_second_run", data_root, work)
    t2 = time.monotonic()
    print(f"\n2-process runs: first {t1 - t0:.1f} s, second {t2 - t1:.1f} s")
    first = [torch.load(os.path.join(work, f"first_rank{r}.pt"), weights_only=False)
             for r in range(WORLD)]
    second = [torch.load(os.path.join(work, f"second_rank{r}.pt"), weights_only=False)
              for r in range(WORLD)]
    return dict(work=work, ds=ds, single=single, single_res=single_res, first=first,
                second=second, single_rows=single_mix.rows)


# -- tests -----------------------------------------------------------------------------------


def test_global_stream_sampler_shards_the_single_process_batch(data_root):
    ds = load_dataset(data_root)
    ref = WeightedDomainSampler(ds, WEIGHTS, BLOCK, seed=5)
    shards = [WeightedDomainSampler(ds, WEIGHTS, BLOCK, seed=5, rank=r, world_size=3)
              for r in range(3)]
    for B in (6, 7):  # also uneven: shard_range sizes differ by at most one
        x, y, d = ref.sample(B)
        parts = [s.sample(B) for s in shards]
        assert [p[0].shape[0] for p in parts] == [len(distributed.shard_range(B, r, 3))
                                                  for r in range(3)]
        for i, full in enumerate((x, y, d)):
            assert torch.equal(torch.cat([p[i] for p in parts]), full)
    with pytest.raises(ChameleonUserError, match="rank"):
        WeightedDomainSampler(ds, WEIGHTS, BLOCK, rank=2, world_size=2)


def test_ddp_training_matches_single_process(runs):
    single = runs["single"].state_dict()
    r0, r1 = runs["first"][0], runs["first"][1]
    for k in single:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"ranks disagree on {k}"
        # 2e-5: the gradient all-reduce sums in another order than one process does, and Adam
        # can enlarge that float32 rounding for parameters with tiny second moments (1.1e-5 seen
        # on one of 4096 weights); a wrong data shard or step differs by orders of magnitude more.
        torch.testing.assert_close(r0["params"][k], single[k], rtol=0, atol=2e-5,
                                   msg=lambda m: f"{k}: {m}")
    # the ranks saw disjoint shares of the single process's rows, also after set_weights
    assert [a + b for a, b in zip(r0["rows"], r1["rows"])] == runs["single_rows"]
    assert r0["rows"] != r1["rows"]
    res, ref = r0["result"], runs["single_res"]
    assert res == r1["result"]  # every rank returns the same result
    assert res["step"] == ref["step"] == STEPS and res["world_size"] == WORLD
    assert res["tokens"] == ref["tokens"] == STEPS * 4 * 2 * BLOCK  # batch_size is global
    assert res["loss"] == pytest.approx(ref["loss"], abs=1e-5)  # global mean of the loss
    for d, r in ref["eval"].items():  # evaluation during training, sharded across ranks
        assert res["eval"][d]["loss"] == pytest.approx(r["loss"], abs=1e-5)
    # rank 0 alone wrote the files; the metrics carry the global loss
    out = os.path.join(runs["work"], "straight")
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl", "model.pt"]
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [3, 6]
    ref_recs = [json.loads(line) for line in open(os.path.join(runs["work"], "single",
                                                               "metrics.jsonl"))]
    for a, b in zip([r for r in recs if r["kind"] == "train"],
                    [r for r in ref_recs if r["kind"] == "train"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    for k, v in load_model(os.path.join(out, "model.pt")).state_dict().items():
        assert torch.equal(v, r0["params"][k])


def test_checkpoint_resume_under_two_processes_is_exact(runs):
    straight = runs["first"][0]["params"]
    assert runs["first"][0]["part_step"] == STEPS // 2
    for r in range(WORLD):
        out = runs["second"][r]
        assert out["resume"]["step"] == STEPS
        for k in straight:
            assert torch.equal(out["params"][k], straight[k]), f"rank {r}: {k} differs"
        assert out["resume"]["loss"] == runs["first"][0]["result"]["loss"]
        # the callback's per-rank state (rows seen after a mixture change) resumed exactly
        assert out["rows"] == runs["first"][r]["rows"]
        for k, v in runs["first"][0]["params_do"].items():  # with dropout
            assert torch.equal(out["params_do"][k], v), f"rank {r}, dropout: {k} differs"
    ckpt = load_checkpoint(os.path.join(runs["work"], "split", "ckpt.pt"))
    assert ckpt["world_size"] == WORLD and len(ckpt["samplers"]) == len(ckpt["rngs"]) == WORLD
    assert [s["rank"] for s in ckpt["samplers"]] == [0, 1]
    # each rank's own RNG state is stored (rank 1 seeds dropout differently)
    assert not torch.equal(ckpt["rngs"][0]["torch"], ckpt["rngs"][1]["torch"])


def test_distributed_evaluate_equals_single_process(runs):
    model = load_model(os.path.join(runs["work"], "straight", "model.pt"))
    ref = evaluate(model, runs["ds"], EVAL["n_windows"], BLOCK, seed=3, device="cpu",
                   batch_size=EVAL["batch_size"])
    a, b = runs["second"][0]["eval"], runs["second"][1]["eval"]
    assert a == b  # every rank returns the same result
    assert set(a) == set(ref)
    for d in ref:
        for key, v in ref[d].items():
            assert a[d][key] == pytest.approx(v, abs=1e-6, rel=1e-6), (d, key)


def test_resume_with_other_world_size_fails_clearly(runs):
    for r in range(WORLD):  # 1-process checkpoint, 2 processes
        kind, msg = runs["second"][r]["world_mismatch"]
        assert kind == "ChameleonUserError"
        assert "world size 1" in msg and "world size 2" in msg
    # 2-process checkpoint, 1 process
    with pytest.raises(ChameleonUserError, match=r"world size 2.*world size 1"):
        train(_model(), runs["ds"], WEIGHTS, _cfg(os.path.join(runs["work"], "split")))


def test_errors_are_raised_on_every_rank(runs):
    for r in range(WORLD):
        kind, msg = runs["second"][r]["indivisible"]
        assert kind == "ChameleonUserError" and "not divisible by the world size 2" in msg
    kind0, msg0 = runs["second"][0]["one_rank_bad"]
    kind1, msg1 = runs["second"][1]["one_rank_bad"]
    assert kind1 == "ChameleonUserError" and "'dna'" in msg1
    # rank 0 learnt it from the failure agreement (a collective timeout would raise a
    # DistBackendError instead), so it stopped at once
    assert kind0 == "RuntimeError" and "rank(s) [1]" in msg0
    assert runs["second"][0]["after"] == WORLD


@pytest.mark.parametrize("stay_alive", [False, True], ids=["rank-exits", "rank-wedged"])
def test_failing_rank_stops_the_run(data_root, tmp_path, stay_alive):
    with pytest.raises(mp.ProcessRaisedException) as ei:
        _spawn("_scenario_rank_fails", data_root, str(tmp_path), stay_alive, timeout_s=8)
    msg = str(ei.value)
    if stay_alive:
        # rank 1 never exits (it sleeps 120 s): rank 0 failing first means it stopped by
        # itself, through the collective timeout, not by waiting for rank 1
        assert "Process 0 terminated" in msg, msg
        with open(tmp_path / "rank0_error.txt") as f:
            assert "timed out" in f.read().lower()
    else:
        assert "simulated failure on rank 1" in msg, msg
