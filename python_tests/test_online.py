"""OnlineChameleon: the EMA of per-domain sums and counts against a float64 loop, the weights
against the project's weight function, the floor, warm-up, unseen domains, exact resume,
determinism, and the distributed reduction (two halves, and 2 gloo processes)."""

from __future__ import annotations

import io as _io
import json
import os

import pytest
import torch

from chameleon_ext import weights_from_embeddings
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.model import GPT, GPTConfig
from chameleon_ext.online import OnlineChameleon, floor_weights
from chameleon_ext.schedule import ScheduleWriter, load_schedule

from .factories import exit_spawned_worker, make_mask, set_worker_env, spawn_workers

DOMAINS = ["web", "code", "math", "wiki"]
K = len(DOMAINS)


def _batches(steps, micro=1, B=6, T=9, H=5, k=K, dtype=torch.float32, seed=0, ids_fn=None):
    """[steps][micro] of (hidden [B, T, H], mask [B, T], ids [B]); domain d's rows are offset
    by d so the domains differ; a few rows fully masked."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        step = []
        for m in range(micro):
            ids = torch.randint(0, k, (B,), generator=g) if ids_fn is None else ids_fn(t, m, B)
            h = torch.randn(B, T, H, generator=g) + ids.view(B, 1, 1).float() * torch.linspace(-1, 1, H)
            mask = make_mask(B, T, p_valid=0.7, seed=1000 * t + m, empty_rows=(0,) if (t + m) % 3 == 0 else ())
            step.append((h.to(dtype), mask, ids))
        out.append(step)
    return out


def _reference_ema(batches, decay, k=K):
    """float64 loop: per step, masked mean of each row summed into its domain; then the EMA."""
    H = batches[0][0][0].shape[2]
    S = torch.zeros(k, H, dtype=torch.float64)
    C = torch.zeros(k, dtype=torch.float64)
    for step in batches:
        s = torch.zeros(k, H, dtype=torch.float64)
        c = torch.zeros(k, dtype=torch.float64)
        for h, mask, ids in step:
            for b in range(h.shape[0]):
                valid = mask[b].bool()
                if valid.any():
                    s[int(ids[b])] += h[b][valid].double().mean(0)
                    c[int(ids[b])] += 1
        S = decay * S + (1 - decay) * s
        C = decay * C + (1 - decay) * c
    return S, C


def _run(online, batches):
    updates = []
    for step in batches:
        for h, mask, ids in step:
            online.observe(h, mask, ids)
        u = online.end_step()
        if u is not None:
            updates.append(u)
    return updates


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay,micro", [(0.9, 1), (0.5, 2), (0.0, 1)])
def test_ema_matches_float64_loop(dtype, decay, micro):
    batches = _batches(7, micro=micro, dtype=dtype)
    online = OnlineChameleon(DOMAINS, every=100, warmup=100, decay=decay)
    _run(online, batches)
    S, C = online.ema_state()
    S_ref, C_ref = _reference_ema(batches, decay)
    torch.testing.assert_close(C, C_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-6)  # the op pools in float32


def test_ema_hand_case():
    # one domain, one row of constant value v per step, decay 0.5: S = 0.5 S + 0.5 v, C likewise
    online = OnlineChameleon(["a", "b"], every=10, warmup=10, decay=0.5)
    for v in (2.0, 4.0):
        online.observe(torch.full((1, 3, 2), v), None, torch.tensor([0]))
        online.end_step()
    S, C = online.ema_state()
    assert S[0].tolist() == [2.5, 2.5]  # 0.5 * (0.5 * 2) + 0.5 * 4
    assert C.tolist() == [0.75, 0.0]
    # the ratio needs no bias correction: (2 * 0.25 + 4 * 0.5) / 0.75
    assert S[0, 0] / C[0] == pytest.approx((2 * 0.25 + 4 * 0.5) / 0.75, abs=0)


def test_update_equals_weight_function_on_ema_embeddings():
    batches = _batches(6)
    floor = 0.02
    online = OnlineChameleon(DOMAINS, every=3, warmup=3, decay=0.8, floor=floor)
    updates = _run(online, batches)
    assert [u.step for u in updates] == [3, 6]
    # against the independent reference EMA: embeddings, the project's weights, the floor
    S_ref, C_ref = _reference_ema(batches, 0.8)
    raw = weights_from_embeddings(S_ref / C_ref.unsqueeze(1), rule="paper").weights
    expected = (1 - K * floor) * raw + floor
    torch.testing.assert_close(updates[-1].weights, expected, rtol=1e-5, atol=1e-7)
    # and exactly the project's function on the object's own EMA embeddings
    own = weights_from_embeddings(updates[-1].embeddings, rule="paper")
    assert torch.equal(updates[-1].method_weights, own.weights)
    assert torch.equal(updates[-1].leverage, own.leverage)
    assert torch.equal(online.weights, updates[-1].weights)
    assert updates[-1].weights.dtype == torch.float64
    assert float(updates[-1].weights.sum()) == pytest.approx(1.0, abs=1e-15)


def test_finetune_mode_and_options_reach_the_weight_function():
    batches = _batches(4)
    online = OnlineChameleon(DOMAINS, every=4, warmup=4, decay=0.9, floor=0.0, mode="finetune",
                             lam=3.0, temperature=0.5)
    (u,) = _run(online, batches)
    expected = weights_from_embeddings(u.embeddings, mode="finetune", lam=3.0, temperature=0.5, rule="paper").weights
    assert torch.equal(u.weights, expected / expected.sum())


def test_floor():
    # hand case: k = 2, w = [1, 0], floor 0.1 -> [0.9, 0.1]
    assert floor_weights(torch.tensor([1.0, 0.0]), 0.1).tolist() == pytest.approx([0.9, 0.1], abs=1e-16)
    # a domain that the pretraining rule starves still gets the floor
    floor = 0.1
    online = OnlineChameleon(DOMAINS, every=2, warmup=2, floor=floor)
    updates = _run(online, _batches(6))
    assert any(float(u.method_weights.min()) < floor for u in updates)  # the rule alone goes below
    for u in updates:
        assert float(u.weights.min()) >= floor * (1 - 1e-12)
        assert float(u.weights.sum()) == pytest.approx(1.0, abs=1e-15)
        expected = (1 - K * floor) * u.method_weights + floor
        torch.testing.assert_close(u.weights, expected, rtol=1e-15, atol=1e-16)


def test_warmup_returns_initial_weights():
    init = {"web": 0.4, "code": 0.3, "math": 0.2, "wiki": 0.1}
    online = OnlineChameleon(DOMAINS, every=2, warmup=5, initial_weights=init)
    batches = _batches(9)
    due = []
    for t, step in enumerate(batches, start=1):
        for h, m, ids in step:
            online.observe(h, m, ids)
        u = online.end_step()
        if t < 5:
            assert u is None and online.weights.tolist() == [0.4, 0.3, 0.2, 0.1]
        if u is not None:
            due.append(t)
    assert due == [5, 7, 9]
    assert [online.update_due(t) for t in (0, 4, 5, 6, 7)] == [False, False, True, False, True]
    # warmup 0: the first update is after `every` steps, never at step 0
    assert [t for t in range(7) if OnlineChameleon(DOMAINS, every=3, warmup=0).update_due(t)] == [3, 6]


def test_unseen_domain_keeps_its_previous_weight():
    init = [0.1, 0.2, 0.3, 0.4]

    def no_wiki(t, m, B):  # domain 3 never appears
        return torch.arange(B) % 3

    online = OnlineChameleon(DOMAINS, every=2, warmup=2, floor=0.0, initial_weights=init)
    batches = _batches(2, ids_fn=no_wiki)
    (u,) = _run(online, batches)
    assert u.seen.tolist() == [True, True, True, False]
    assert float(u.method_weights[3]) == pytest.approx(0.4, abs=1e-15)
    among_seen = weights_from_embeddings(u.embeddings[:3], rule="paper").weights
    torch.testing.assert_close(u.method_weights[:3], 0.6 * among_seen, rtol=1e-14, atol=0)
    assert torch.isnan(u.leverage[3])
    record = json.loads(json.dumps(u.as_dict(DOMAINS), allow_nan=False))  # metrics.jsonl-ready
    assert record["leverage"]["wiki"] is None and record["seen"] == ["web", "code", "math"]
    assert record["weights"] == dict(zip(DOMAINS, u.weights.tolist()))
    # fewer than two seen domains: nothing to compare, the previous weights stay
    one = OnlineChameleon(DOMAINS, every=1, warmup=1, floor=0.0, initial_weights=init)
    one.observe(torch.randn(2, 3, 4), None, torch.tensor([1, 1]))
    u = one.end_step()
    assert u.method_weights.tolist() == pytest.approx(init, abs=1e-16)


def test_state_dict_round_trip_is_bitwise_exact():
    batches = _batches(14, micro=2)
    straight = OnlineChameleon(DOMAINS, every=3, warmup=4, decay=0.85)
    ref_updates = _run(straight, batches)

    first = OnlineChameleon(DOMAINS, every=3, warmup=4, decay=0.85)
    _run(first, batches[:7])
    first.observe(*batches[7][0])  # a checkpoint in the middle of a step (one micro-batch in)
    buf = _io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    resumed = OnlineChameleon(DOMAINS, every=3, warmup=4, decay=0.85)
    resumed.load_state_dict(state)
    resumed.observe(*batches[7][1])
    u = resumed.end_step()
    updates = ([u] if u is not None else []) + _run(resumed, batches[8:])
    tail = [r for r in ref_updates if r.step > 7]
    assert [x.step for x in updates] == [x.step for x in tail]
    for a, b in zip(updates, tail):
        assert torch.equal(a.weights, b.weights)
    sa, ca = resumed.ema_state()
    sb, cb = straight.ema_state()
    assert torch.equal(sa, sb) and torch.equal(ca, cb)


def test_determinism():
    a = _run(OnlineChameleon(DOMAINS, every=2, warmup=2), _batches(6, seed=5))
    b = _run(OnlineChameleon(DOMAINS, every=2, warmup=2), _batches(6, seed=5))
    assert all(torch.equal(x.weights, y.weights) for x, y in zip(a, b)) and len(a) == 3


def test_forward_hook_on_the_training_model():
    # the way the trainer wires it: a forward hook on block L's output during the training
    # forward; the pooled states equal those of model.hidden_states at layer L
    model = GPT(GPTConfig(vocab_size=257, n_layer=3, n_head=2, n_embd=16, block_size=12), seed=0)
    layer = model.default_embedding_layer
    online = OnlineChameleon(DOMAINS[:3], every=1, warmup=1, decay=0.0)
    x = torch.randint(0, 257, (5, 12), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 1, 2, 0, 1])
    handle = model.blocks[layer - 1].register_forward_hook(lambda mod, inp, out: online.observe(out, None, ids))
    _, loss = model(x, x)
    loss.backward()  # the hook's pooling does not touch the graph
    handle.remove()
    u = online.end_step()
    with torch.no_grad():
        h = model.hidden_states(x, layer).double().mean(1)
    expected = torch.stack([h[ids == d].mean(0) for d in range(3)])
    torch.testing.assert_close(u.embeddings, expected, rtol=1e-5, atol=1e-6)


def test_options_are_validated():
    for kwargs, match in [
        (dict(floor=0.25), "floor must be < 1/k"),
        (dict(floor=-0.1), "floor must be a number"),
        (dict(decay=1.0), "decay must be a number in"),
        (dict(every=0), "every must be an integer >= 1"),
        (dict(warmup=-1), "warmup must be an integer >= 0"),
        (dict(mode="pre"), "mode: expected one of"),
        (dict(lam=0), "lam: expected a finite number > 0"),
        (dict(initial_weights=[1, 2]), r"expected 4 weights \(one per domain"),
        (dict(initial_weights={"web": 1.0}), "domains do not match"),
        (dict(initial_weights=[0, 0, 0, 0]), "all weights are 0"),
        (dict(initial_weights=[1, -1, 0, 0]), "must be a finite number >= 0"),
    ]:
        with pytest.raises(ChameleonUserError, match=match):
            OnlineChameleon(DOMAINS, **kwargs)
    with pytest.raises(ChameleonUserError, match="more than once"):
        OnlineChameleon(["a", "a"])
    online = OnlineChameleon(DOMAINS)
    state = online.state_dict()
    with pytest.raises(ChameleonUserError, match="decay was 0.9 when saved, now 0.8"):
        OnlineChameleon(DOMAINS, decay=0.8).load_state_dict(state)
    with pytest.raises(ChameleonUserError, match="expected format"):
        online.load_state_dict({"format": "x"})
    with pytest.raises(ValueError, match="domain_ids"):
        online.observe(torch.randn(2, 3, 4), None, torch.tensor([0, 9]))


def test_two_halves_sum_to_the_whole():
    # the reduction semantics of the distributed update: each rank's EMA of its own rows,
    # summed, is the EMA of the whole batch
    batches = _batches(5, B=8)
    whole = OnlineChameleon(DOMAINS, every=100, warmup=100)
    halves = [OnlineChameleon(DOMAINS, every=100, warmup=100) for _ in range(2)]
    for step in batches:
        for h, m, ids in step:
            whole.observe(h, m, ids)
            for r, o in enumerate(halves):
                o.observe(h[4 * r:4 * r + 4], m[4 * r:4 * r + 4], ids[4 * r:4 * r + 4])
        for o in [whole] + halves:
            o.end_step()
    S, C = whole.ema_state()
    (S0, C0), (S1, C1) = halves[0].ema_state(), halves[1].ema_state()
    # the op sums a domain's rows in float32: the halves differ from the whole by its rounding
    torch.testing.assert_close(S0 + S1, S, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(C0 + C1, C, rtol=1e-12, atol=1e-12)


def _dist_worker(rank, world, port, out_dir):
    from chameleon_ext import distributed

    set_worker_env(rank, world, port, timeout_s=60)
    distributed.init_from_env(device="cpu")
    try:
        online = OnlineChameleon(DOMAINS, every=2, warmup=2)
        rows = slice(4 * rank, 4 * rank + 4)
        updates = []
        for step in _batches(4, B=8):
            for h, m, ids in step:
                online.observe(h[rows], m[rows], ids[rows])
            u = online.end_step()
            if u is not None:
                updates.append(u.weights)
        torch.save({"updates": updates, "state": online.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()
    exit_spawned_worker()


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_two_gloo_processes_get_identical_weights(tmp_path):
    spawn_workers(_dist_worker, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert len(r0["updates"]) == 2
    for a, b in zip(r0["updates"], r1["updates"]):
        assert torch.equal(a, b)  # every rank the same bits
    single = _run(OnlineChameleon(DOMAINS, every=2, warmup=2), _batches(4, B=8))
    for a, u in zip(r0["updates"], single):
        torch.testing.assert_close(a, u.weights, rtol=1e-5, atol=1e-7)
    assert (r0["state"]["rank"], r0["state"]["world_size"]) == (0, 2)
    with pytest.raises(ChameleonUserError, match="saved by rank 1 of 2"):
        OnlineChameleon(DOMAINS, every=2, warmup=2).load_state_dict(r1["state"])


def test_updates_recorded_as_a_schedule_replay_the_weights(tmp_path):
    # the online run's schedule.json, read back, gives at every step the weights it sampled with
    online = OnlineChameleon(DOMAINS, every=2, warmup=3)
    path = tmp_path / "schedule.json"
    writer = ScheduleWriter.open(path, DOMAINS, online.weights, tokens_per_step=6 * 9)
    used = []
    for t, step in enumerate(_batches(9)):
        used.append(online.weights.tolist())  # the weights step t is drawn with
        for h, m, ids in step:
            online.observe(h, m, ids)
        u = online.end_step()
        if u is not None:
            writer.append(u.step, u.step * 6 * 9, u.weights)
    schedule = load_schedule(path)
    assert [e.start_step for e in schedule.entries] == [0, 3, 5, 7, 9]
    for t, w in enumerate(used):
        assert list(schedule.weights_at(t).values()) == w  # bit for bit through JSON


def test_discarded_step_leaves_no_trace():
    # a skipped step (non-finite loss) may carry NaN hidden states: discard drops them, the
    # EMA only decays, exactly as for a step without observations
    batches = _batches(4)
    a = OnlineChameleon(DOMAINS, every=4, warmup=4, decay=0.8)
    b = OnlineChameleon(DOMAINS, every=4, warmup=4, decay=0.8)
    for t, step in enumerate(batches):
        for h, m, ids in step:
            a.observe(h, m, ids)
            if t == 2:
                b.observe(torch.full_like(h, float("nan")), m, ids)
            else:
                b.observe(h, m, ids)
        if t == 2:
            a._step_sums.zero_()  # the reference: nothing observed at step 2
            a._step_counts.zero_()
        ua, ub = a.end_step(), b.end_step(discard=(t == 2))
    assert torch.isfinite(ub.weights).all()
    assert torch.equal(ua.weights, ub.weights)
    S, C = b.ema_state()
    S_ref, C_ref = _reference_ema([s if t != 2 else [] for t, s in enumerate(batches)], 0.8)
    torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(C, C_ref, rtol=0, atol=1e-12)
