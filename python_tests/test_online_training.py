"""The online and schedule trainer callbacks in a single process: an online run (``OnlineWeights``) or a
schedule-following run (``ScheduleWeights``) stopped between two weight changes, or right after
one, and resumed, ends with bitwise the same model (and schedule.json) as an uninterrupted run;
a schedule replays the weights an online run sampled, to the same model bit for bit; a resume
that does not continue the same mixture is refused. test_online_distributed.py does the same
under two processes, test_online_cli.py through the command line with real kills."""

from __future__ import annotations

import os

import pytest
import torch

from chameleon_ext import callbacks
from chameleon_ext import online as online_mod
from chameleon_ext.data import load_dataset
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.model import GPT, GPTConfig
from chameleon_ext.online import OnlineChameleon
from chameleon_ext.schedule import load_schedule
from chameleon_ext.schedule_weights import ScheduleWeights
from chameleon_ext.trainer import TrainConfig, train

from .factories import TEXT_DOMAINS, write_text_domains

STEPS = 12


class OnlineWeights(online_mod.OnlineWeights):
    """The package's callback, also recording which weights the sampler drew each step with."""

    def __init__(self, online, layer, path):
        super().__init__(online, layer, path)
        self.used = {}  # step -> weights the sampler drew that step with

    def on_batch(self, state, batch):
        self.used[state.step] = list(state.sampler.probs)
        super().on_batch(state, batch)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_dataset(write_text_domains(str(tmp_path_factory.mktemp("data")), names=TEXT_DOMAINS))


def _cfg(out):
    return TrainConfig(steps=STEPS, batch_size=4, grad_accum=2, block_size=16, lr=3e-3, warmup_steps=2,
                       ckpt_every=0, log_every=4, eval_every=0, device="cpu", out_dir=str(out), quiet=True)


def _model():
    return GPT(GPTConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=16), seed=0)


def _callback(dataset, out):
    online = OnlineChameleon(dataset.domains, every=3, warmup=4, floor=0.02)
    return OnlineWeights(online, 1, os.path.join(str(out), "schedule.json"))


def test_online_run_resumes_exactly(dataset, tmp_path):
    straight = _model()
    cb = _callback(dataset, tmp_path / "straight")
    train(straight, dataset, "uniform", _cfg(tmp_path / "straight"), callbacks=[cb])
    schedule = load_schedule(tmp_path / "straight" / "schedule.json")
    assert [e.start_step for e in schedule.entries] == [0, 4, 7, 10]  # the update at 12 applies to nothing
    for step, probs in cb.used.items():  # the schedule replays the weights the sampler drew with
        assert list(schedule.weights_at(step).values()) == pytest.approx(probs, rel=0, abs=1e-15)

    for stops in ([5], [4, 10]):  # between two changes; right after a change
        out = tmp_path / f"split{'_'.join(map(str, stops))}"
        for stop in stops:
            train(_model(), dataset, "uniform", _cfg(out), callbacks=[_callback(dataset, out)], stop_at=stop)
        resumed = _model()
        train(resumed, dataset, "uniform", _cfg(out), callbacks=[_callback(dataset, out)])
        for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), (stops, name)
        assert load_schedule(out / "schedule.json").as_dict() == schedule.as_dict(), stops


def _same_params(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class _Recording(ScheduleWeights):
    """ScheduleWeights, also recording the weights the sampler drew each step with."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.used = {}

    def on_batch(self, state, batch):
        self.used[state.step] = list(state.sampler.probs)


# A user's own schedule: changes at steps 4 and 7 (hand-written, so the expected weights per
# step are known without the code under test).
USER_SCHEDULE = {"format": "chameleon_ext.schedule/1", "domains": ["alpha", "digits", "dna", "zeta"],
                 "token_budget": None, "tokens_per_step": None,
                 "entries": [{"start_step": 0, "start_token": 0,
                              "weights": {"alpha": 0.25, "digits": 0.25, "dna": 0.25, "zeta": 0.25}},
                             {"start_step": 4, "start_token": 512,
                              "weights": {"alpha": 0.5, "digits": 0.125, "dna": 0.125, "zeta": 0.25}},
                             {"start_step": 7, "start_token": 896,
                              "weights": {"zeta": 0.0, "dna": 0.75, "digits": 0.0625, "alpha": 0.1875}}]}


def _expected_probs(step):
    order = ["alpha", "digits", "dna", "zeta"]
    entry = USER_SCHEDULE["entries"][0 if step < 4 else 1 if step < 7 else 2]
    return [entry["weights"][d] for d in order]


def _schedule_run(dataset, out, stop_at=None, schedule=USER_SCHEDULE, callback=_Recording):
    cb = callback(schedule, copy_path=os.path.join(str(out), "schedule.json"))
    model = _model()
    train(model, dataset, cb.initial_weights(), _cfg(out), callbacks=[cb], stop_at=stop_at)
    return model, cb


def test_schedule_run_follows_the_schedule_and_resumes_exactly(dataset, tmp_path):
    straight, cb = _schedule_run(dataset, tmp_path / "straight")
    assert sorted(cb.used) == list(range(STEPS))
    for step, probs in cb.used.items():  # the dataset's domains are in alphabetical order
        assert probs == _expected_probs(step), step
    assert load_schedule(tmp_path / "straight" / "schedule.json").as_dict() == USER_SCHEDULE  # the run's copy

    for stops in ([5], [4, 7]):  # between two changes; right after a change (twice)
        out = tmp_path / f"split{'_'.join(map(str, stops))}"
        for stop in stops:
            _schedule_run(dataset, out, stop_at=stop)
        resumed, cb = _schedule_run(dataset, out)
        assert sorted(cb.used) == list(range(stops[-1], STEPS))
        assert all(probs == _expected_probs(step) for step, probs in cb.used.items())
        assert _same_params(straight, resumed), stops


def test_a_schedule_replays_an_online_run_bit_for_bit(dataset, tmp_path):
    online_model = _model()
    cb = _callback(dataset, tmp_path / "online")
    train(online_model, dataset, "uniform", _cfg(tmp_path / "online"), callbacks=[cb])
    replay, rec = _schedule_run(dataset, tmp_path / "replay", schedule=str(tmp_path / "online" / "schedule.json"))
    assert rec.used == cb.used  # the very weights, step by step
    assert _same_params(online_model, replay)


def test_a_resume_must_continue_the_same_mixture(dataset, tmp_path):
    _schedule_run(dataset, tmp_path / "s", stop_at=5)
    # an entry up to the checkpoint's step changed: refused, naming the entry
    changed = {**USER_SCHEDULE, "entries": [dict(e) for e in USER_SCHEDULE["entries"]]}
    changed["entries"][1] = dict(changed["entries"][1], start_step=3)
    with pytest.raises(ChameleonUserError, match="entry 1 differs from the schedule the checkpoint at step 5"):
        _schedule_run(dataset, tmp_path / "s", schedule=changed)
    # a later entry may change: the run continues, with the new entry from its step on
    later = {**USER_SCHEDULE, "entries": USER_SCHEDULE["entries"][:2] + [dict(USER_SCHEDULE["entries"][2], start_step=9)]}
    _, cb = _schedule_run(dataset, tmp_path / "s", schedule=later)
    assert cb.used[8] == _expected_probs(5) and cb.used[9] == _expected_probs(8)
    # a plain run's checkpoint resumed on a schedule, or online, and an online one on a schedule
    train(_model(), dataset, "uniform", _cfg(tmp_path / "plain"), stop_at=3)
    with pytest.raises(ChameleonUserError, match="not written by a run following a schedule"):
        _schedule_run(dataset, tmp_path / "plain")
    with pytest.raises(ChameleonUserError, match=r"not written by an online run \(--weights online\)"):
        train(_model(), dataset, "uniform", _cfg(tmp_path / "plain"), callbacks=[_callback(dataset, tmp_path / "plain")])
    train(_model(), dataset, "uniform", _cfg(tmp_path / "on"), callbacks=[_callback(dataset, tmp_path / "on")], stop_at=5)
    with pytest.raises(ChameleonUserError, match="not written by a run following a schedule"):
        _schedule_run(dataset, tmp_path / "on", schedule=str(tmp_path / "on" / "schedule.json"))


def test_schedule_domains_must_match_the_data(dataset, tmp_path):
    other = {**USER_SCHEDULE, "domains": ["alpha", "digits", "dna", "web"],
             "entries": [{"start_step": 0, "start_token": 0,
                          "weights": {"alpha": 0.25, "digits": 0.25, "dna": 0.25, "web": 0.25}}]}
    with pytest.raises(ChameleonUserError, match=r"the schedule: the domains do not match \(unknown \['web'\]; missing \['zeta'\]"):
        # (sampler started uniform: the callback itself checks, before any step)
        train(_model(), dataset, "uniform", _cfg(tmp_path / "x"), callbacks=[ScheduleWeights(other)])


def test_online_callback_hands_the_cpu_domain_ids_to_the_op_as_they_are():
    """No ``.to(device)`` per micro-batch: domain_mean_pool takes CPU ids for CUDA states and
    copies them without a host sync, which a pageable ``.to`` would force."""
    seen = []

    class _Probe:
        def observe(self, hidden, mask, ids):
            seen.append((hidden, mask, ids))

    cb = online_mod.OnlineWeights(_Probe(), 1)
    hidden, ids = torch.zeros(2, 3, 4), torch.tensor([0, 1])
    batch = callbacks.Batch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), ids,
                            torch.zeros(()), 0, {1: hidden})
    cb.on_batch(None, batch)
    assert len(seen) == 1 and seen[0][0] is hidden and seen[0][1] is None and seen[0][2] is ids
