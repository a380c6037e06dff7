"""The wiring of docs/online.md against the trainer's callback interface: an online run killed
between two weight changes, or right after one, and resumed, ends with bitwise the same model
and the same schedule.json as an uninterrupted run; the schedule replays the weights sampled.

Needs ``chameleon_ext.callbacks`` (the trainer's callback interface, merged on main after this
branch was cut): skipped without it. ``OnlineWeights`` below is the callback docs/online.md
sketches; the lead may move it into the package when wiring ``chameleon train --weights online``.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from chameleon_ext.trainer import TrainConfig, train

if "callbacks" not in inspect.signature(train).parameters:
    # (checked on train itself: an editable install elsewhere can make the module importable)
    pytest.skip("the trainer's callback interface is not here", allow_module_level=True)

from chameleon_ext import callbacks  # noqa: E402
from chameleon_ext.data import load_dataset  # noqa: E402
from chameleon_ext.model import GPT, GPTConfig  # noqa: E402
from chameleon_ext import online as online_mod  # noqa: E402
from chameleon_ext.online import OnlineChameleon  # noqa: E402
from chameleon_ext.schedule import ScheduleWriter, load_schedule  # noqa: E402

from .factories import TEXT_DOMAINS, write_text_domains  # noqa: E402

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
