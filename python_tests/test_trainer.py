"""Trainer: weighted sampling, exact resume, atomic checkpoints, evaluation, finetuning."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from chameleon_ext.data import load_dataset
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.checkpoint import load_checkpoint
from chameleon_ext.data.sampler import WeightedDomainSampler, normalize_weights
from chameleon_ext.io import save_torch
from chameleon_ext.model import GPT, GPTConfig, load_model, save_model
from chameleon_ext.callbacks import Callback
from chameleon_ext.trainer import TrainConfig, TrainingDiverged, evaluate, train

from .factories import TEXT_DOMAINS, write_text_domains

BLOCK = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four small byte-level domains with clearly different statistics."""
    return load_dataset(write_text_domains(tmp_path_factory.mktemp("mix"), names=TEXT_DOMAINS))


def _model(seed=0, dropout=0.0):
    cfg = GPTConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK,
                    dropout=dropout)
    return GPT(cfg, seed=seed)


def _cfg(out_dir, **kw):
    base = dict(steps=6, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, ckpt_every=0,
                log_every=2, eval_every=0, device="cpu", out_dir=str(out_dir), quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"parameter {k} differs"


# -- sampler ---------------------------------------------------------------------------------


def test_sampler_proportions_match_weights(dataset):
    weights = {"alpha": 0.5, "digits": 0.3, "dna": 0.2, "zeta": 0.0}
    s = WeightedDomainSampler(dataset, weights, BLOCK, seed=7)
    counts = np.zeros(4)
    for _ in range(50):
        x, y, dom = s.sample(80)
        assert x.shape == y.shape == (80, BLOCK) and x.dtype == y.dtype == torch.int64
        assert dom.shape == (80,) and dom.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
        counts += np.bincount(dom.numpy(), minlength=4)
    n = counts.sum()
    p = np.array([0.5, 0.3, 0.2, 0.0])
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 4 * sigma + 1e-9), counts
    assert counts[3] == 0  # zero weight: never drawn


def test_sampler_rows_are_windows_of_their_domain(dataset):
    s = WeightedDomainSampler(dataset, "uniform", BLOCK, seed=1)
    x, y, dom = s.sample(32)
    for row, d in zip(torch.cat([x, y[:, -1:]], 1).numpy(), dom.numpy()):
        toks = np.asarray(dataset.train_tokens(dataset.domains[d]))
        hits = np.flatnonzero(toks[: len(toks) - BLOCK] == row[0])
        assert any(np.array_equal(toks[h:h + BLOCK + 1], row) for h in hits)


def test_sampler_reproducible_and_state_roundtrip(dataset):
    a = WeightedDomainSampler(dataset, [1, 2, 3, 4], BLOCK, seed=3)
    b = WeightedDomainSampler(dataset, [1, 2, 3, 4], BLOCK, seed=3)
    for _ in range(3):
        assert all(torch.equal(u, v) for u, v in zip(a.sample(8), b.sample(8)))
    state = json.loads(json.dumps(a.state_dict()))  # plain, serialisable types only
    expected = [a.sample(8) for _ in range(3)]
    c = WeightedDomainSampler(dataset, [1, 2, 3, 4], BLOCK, seed=99)
    c.load_state_dict(state)
    for e in expected:
        assert all(torch.equal(u, v) for u, v in zip(e, c.sample(8)))
    other = WeightedDomainSampler(dataset, [1, 2, 3, 4], BLOCK, seed=4)
    assert not torch.equal(other.sample(8)[0], WeightedDomainSampler(
        dataset, [1, 2, 3, 4], BLOCK, seed=3).sample(8)[0])
    d = WeightedDomainSampler(dataset, [4, 3, 2, 1], BLOCK, seed=3)
    with pytest.raises(ChameleonUserError, match="weight of domain"):
        d.load_state_dict(state)


@pytest.mark.parametrize("weights, match, name", [
    ({"alpha": 1, "digits": 1, "dna": 1, "zeta": 1, "extra": 1}, "unknown \\['extra'\\]", "extra"),
    ({"alpha": 1, "digits": 1, "dna": 1}, "missing \\['zeta'\\]", "zeta"),
    ({"alpha": 1, "digits": -1, "dna": 1, "zeta": 1}, "weight of domain 'digits' must be a finite number >= 0", "digits"),
    ({"alpha": 1, "digits": 1, "dna": float("nan"), "zeta": 1}, "finite number >= 0", "dna"),
    ({"alpha": 1, "digits": 1, "dna": 1, "zeta": float("inf")}, "finite number >= 0", "zeta"),
    ({"alpha": 0, "digits": 0, "dna": 0, "zeta": 0}, "all weights are 0", ""),
    ([1, 2, 3], "expected 4 weights", ""),
    ("proportional", "uniform", ""),
])
def test_weight_validation(dataset, weights, match, name):
    with pytest.raises(ChameleonUserError, match=match) as ei:
        normalize_weights(dataset, weights)
    assert name in str(ei.value)


def test_weights_normalised_and_window_check(dataset):
    np.testing.assert_allclose(normalize_weights(dataset, [1, 1, 2, 0]), [0.25, 0.25, 0.5, 0])
    np.testing.assert_allclose(normalize_weights(dataset, "uniform"), [0.25] * 4)
    too_long = dataset.n_tokens("digits") + 5  # digits is the shortest domain
    with pytest.raises(ChameleonUserError, match="'digits'"):
        WeightedDomainSampler(dataset, "uniform", too_long)
    # domains with weight 0 are not required to hold a window
    short = dataset.n_tokens("dna")
    WeightedDomainSampler(dataset, {"alpha": 1, "digits": 0, "dna": 0, "zeta": 0}, short)


# -- training and resume ---------------------------------------------------------------------


@pytest.mark.parametrize("grad_accum, dropout", [(1, 0.0), (2, 0.1)])
def test_resume_is_bitwise_exact(dataset, tmp_path, grad_accum, dropout):
    kw = dict(steps=8, grad_accum=grad_accum)
    straight = _model(dropout=dropout)
    res_a = train(straight, dataset, "uniform", _cfg(tmp_path / "a", **kw))
    assert res_a["step"] == 8 and res_a["model_path"]

    first = _model(dropout=dropout)
    res_b = train(first, dataset, "uniform", _cfg(tmp_path / "b", **kw), stop_at=4)
    assert res_b["step"] == 4 and res_b["model_path"] is None
    assert load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 4
    torch.manual_seed(12345)  # disturb global RNGs; the checkpoint must restore them
    np.random.seed(1)
    resumed = _model(seed=42, dropout=dropout)  # different init: weights must come from ckpt
    res_c = train(resumed, dataset, "uniform", _cfg(tmp_path / "b", **kw))
    assert res_c["step"] == 8
    _assert_same_params(straight, resumed)
    assert res_a["loss"] == res_c["loss"]
    # final model files identical in content
    assert load_model(res_a["model_path"]).content_hash == load_model(res_c["model_path"]).content_hash


def test_killed_run_resumes_exactly_from_last_checkpoint(dataset, tmp_path, monkeypatch):
    straight = _model()
    train(straight, dataset, "uniform", _cfg(tmp_path / "a", steps=7, ckpt_every=2))

    real_sample = WeightedDomainSampler.sample
    calls = {"n": 0}

    def dying_sample(self, batch_size):
        calls["n"] += 1
        if calls["n"] == 6:  # during step 6, after the step-4 checkpoint
            raise KeyboardInterrupt("simulated kill")
        return real_sample(self, batch_size)

    monkeypatch.setattr(WeightedDomainSampler, "sample", dying_sample)
    with pytest.raises(KeyboardInterrupt):
        train(_model(), dataset, "uniform", _cfg(tmp_path / "b", steps=7, ckpt_every=2))
    monkeypatch.setattr(WeightedDomainSampler, "sample", real_sample)
    assert load_checkpoint(tmp_path / "b" / "ckpt.pt")["step"] == 4  # lost only step 5

    resumed = _model(seed=5)
    train(resumed, dataset, "uniform", _cfg(tmp_path / "b", steps=7, ckpt_every=2))
    _assert_same_params(straight, resumed)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated records


def test_atomic_checkpoint_survives_crash_during_save(dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(_model(), dataset, "uniform", _cfg(out, steps=8), stop_at=2)
    before = (out / "ckpt.pt").read_bytes()

    def crashing_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("simulated crash / disk full during save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(ChameleonUserError, match="simulated"):
        train(_model(), dataset, "uniform", _cfg(out, steps=8, ckpt_every=2), stop_at=4)
    monkeypatch.undo()
    assert (out / "ckpt.pt").read_bytes() == before
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2
    # no temp files left; the previous checkpoint is kept beside it
    assert sorted(os.listdir(out)) == ["ckpt.prev.pt", "ckpt.pt", "metrics.jsonl"]

    # save_torch directly: the old file stays when the write fails
    target = tmp_path / "x.pt"
    save_torch({"v": 1}, target)
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(ChameleonUserError):
        save_torch({"v": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"v": 1}


def test_resume_rejects_changed_trajectory(dataset, tmp_path):
    train(_model(), dataset, "uniform", _cfg(tmp_path, steps=6), stop_at=2)
    with pytest.raises(ChameleonUserError, match="TrainConfig.lr"):
        train(_model(), dataset, "uniform", _cfg(tmp_path, steps=6, lr=1e-3))
    with pytest.raises(ChameleonUserError, match="weight of domain"):
        train(_model(), dataset, [1, 2, 3, 4], _cfg(tmp_path, steps=6))
    bigger = GPT(GPTConfig(vocab_size=257, n_layer=3, n_head=2, n_embd=32, block_size=BLOCK))
    with pytest.raises(ChameleonUserError, match="n_layer"):
        train(bigger, dataset, "uniform", _cfg(tmp_path, steps=6))
    # resume=False starts over instead
    res = train(_model(), dataset, "uniform", _cfg(tmp_path, steps=3, lr=1e-3), resume=False)
    assert res["step"] == 3


def test_metrics_and_eval_during_training(dataset, tmp_path):
    res = train(_model(), dataset, "uniform",
                _cfg(tmp_path, steps=4, eval_every=2, eval_windows=3, log_every=1))
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_recs = [r for r in recs if r["kind"] == "train"]
    eval_recs = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert all({"loss", "lr", "tokens_per_s", "tokens"} <= r.keys() for r in train_recs)
    assert [r["step"] for r in eval_recs] == [2, 4]
    assert res["eval"] == eval_recs[-1]["eval"]
    assert res["tokens"] == 4 * 4 * BLOCK
    assert train_recs[0]["lr"] == pytest.approx(3e-3 / 2)  # warm-up step 1 of 2


def test_train_config_validation():
    with pytest.raises(ChameleonUserError, match="TrainConfig.steps"):
        TrainConfig(steps=0)
    with pytest.raises(ChameleonUserError, match="TrainConfig.min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ChameleonUserError, match="TrainConfig.device"):
        TrainConfig(device="tpu")
    with pytest.raises(ChameleonUserError, match="TrainConfig.batch_size"):
        TrainConfig(batch_size=2.5)


def test_vocab_checked_before_training(dataset, tmp_path):
    small = GPT(GPTConfig(vocab_size=200, n_layer=1, n_head=2, n_embd=16, block_size=BLOCK))
    with pytest.raises(ChameleonUserError, match="vocabulary mismatch"):
        train(small, dataset, "uniform", _cfg(tmp_path))


# -- evaluation and finetuning ---------------------------------------------------------------


def test_evaluate_fixed_windows_and_ppl(dataset):
    model = _model(dropout=0.2)
    model.train()
    r1 = evaluate(model, dataset, n_windows=5, block_size=BLOCK, seed=0, device="cpu")
    r2 = evaluate(model, dataset, n_windows=5, block_size=BLOCK, seed=0, device="cpu")
    assert model.training  # mode restored
    assert r1 == r2  # same windows, dropout off
    assert set(r1) == set(dataset.domains) | {"average"}
    for d in dataset.domains:
        assert math.isfinite(r1[d]["loss"]) and r1[d]["ppl"] == pytest.approx(math.exp(r1[d]["loss"]))
    avg = np.mean([r1[d]["loss"] for d in dataset.domains])
    assert r1["average"]["loss"] == pytest.approx(avg)
    assert r1["average"]["ppl"] == pytest.approx(math.exp(avg))
    # untrained model: close to uniform over 257 ids
    assert abs(r1["average"]["loss"] - math.log(257)) < 0.5
    r3 = evaluate(model, dataset, n_windows=5, block_size=BLOCK, seed=1, device="cpu")
    assert r3["alpha"]["loss"] != r1["alpha"]["loss"] or r3["dna"]["loss"] != r1["dna"]["loss"]


def test_finetune_starts_from_init_from(dataset, tmp_path):
    pre = _model(seed=0)
    res = train(pre, dataset, "uniform", _cfg(tmp_path / "pre", steps=3))
    start = {k: v.clone() for k, v in pre.state_dict().items()}

    seen = {}
    ft = _model(seed=9)

    def capture(module, args):
        if not seen:
            seen.update({k: v.detach().clone() for k, v in module.state_dict().items()})

    ft.register_forward_pre_hook(capture)
    out = train(ft, dataset, {"alpha": 0, "digits": 0, "dna": 1, "zeta": 1},
                _cfg(tmp_path / "ft", steps=2), init_from=res["model_path"])
    assert out["step"] == 2
    for k in start:
        assert torch.equal(seen[k], start[k]), k
    assert not torch.equal(ft.wte.weight, start["wte.weight"])  # and it trained from there
    # a trainer checkpoint works as init_from too
    ft2 = _model(seed=9)
    ft2.register_forward_pre_hook(lambda m, a: seen.clear() or seen.update(
        {k: v.detach().clone() for k, v in m.state_dict().items()}) if not seen else None)
    seen.clear()
    train(ft2, dataset, "uniform", _cfg(tmp_path / "ft2", steps=1),
          init_from=tmp_path / "pre" / "ckpt.pt")
    assert torch.equal(seen["wte.weight"], start["wte.weight"])


def test_save_model_of_trained_proxy_is_loadable(dataset, tmp_path):
    m = _model()
    res = train(m, dataset, "uniform", _cfg(tmp_path, steps=2))
    loaded = load_model(res["model_path"])
    assert loaded.content_hash == m.content_hash
    assert save_model(tmp_path / "again.pt", loaded) == m.content_hash


# -- logged metrics resume exactly: a resumed run's metrics.jsonl equals an uninterrupted one's ----


def _records(path):
    recs = [json.loads(line) for line in open(path)]
    for r in recs:
        r.pop("tokens_per_s", None)  # wall-clock
    return recs


def test_logged_metrics_after_resume_equal_an_uninterrupted_run(dataset, tmp_path):
    kw = dict(steps=9, log_every=4, eval_every=3, eval_windows=2)  # checkpoint mid-window
    train(_model(), dataset, "uniform", _cfg(tmp_path / "a", **kw))
    train(_model(), dataset, "uniform", _cfg(tmp_path / "b", **kw), stop_at=2)
    train(_model(), dataset, "uniform", _cfg(tmp_path / "b", **kw), stop_at=6)
    res = train(_model(), dataset, "uniform", _cfg(tmp_path / "b", **kw))
    a, b = _records(tmp_path / "a" / "metrics.jsonl"), _records(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in a if r["kind"] == "train"] == [4, 8, 9]
    assert a == b
    assert res["loss"] == a[-2]["loss"] and res["eval"] == a[-1]["eval"]


def test_resume_notices_changed_domain_text(dataset, tmp_path):
    import shutil

    from chameleon_ext.data import load_dataset

    root = tmp_path / "data"
    shutil.copytree(dataset.path, root, ignore=shutil.ignore_patterns(".chameleon_cache"))
    train(_model(), load_dataset(root), "uniform", _cfg(tmp_path / "run"), stop_at=2)
    with open(root / "dna" / "data.txt", "a", encoding="utf-8") as f:
        f.write("ACGTTGCA" * 20)
    res = train(_model(), load_dataset(root), "uniform", _cfg(tmp_path / "run"))
    assert any("['dna'] changed" in n for n in res["notices"]), res["notices"]
    res = train(_model(), load_dataset(root), "uniform", _cfg(tmp_path / "run"))
    assert res["complete"] and "complete" in res["notices"][-1]


# -- callbacks ----------------------------------------------------------------------------------


class _Recorder(Callback):
    """Checks the hidden states against the model's own hidden_states(), switches the mixture
    to one domain at step 3, and counts steps in state that must survive a resume."""

    hidden_layer = 1

    def __init__(self):
        self.steps_seen, self.domains, self.hidden_ok, self.events = 0, [], [], []

    def on_batch(self, state, batch):
        ref = state.model.hidden_states(batch.x, self.hidden_layer)  # params not yet updated
        self.hidden_ok.append(torch.equal(batch.hidden[1], ref.detach()))
        self.domains.append((state.step + 1, batch.domain.tolist()))

    def on_step_end(self, state):
        self.steps_seen += 1
        if state.step == 3:
            state.set_weights({"alpha": 0, "digits": 0, "dna": 1, "zeta": 0})

    def on_eval(self, state, metrics):
        self.events.append(("eval", state.step, sorted(metrics)))

    def on_save(self, state):
        self.events.append(("save", state.step))

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = state["steps_seen"]


def test_callbacks_see_hidden_states_domains_and_change_weights(dataset, tmp_path):
    rec = _Recorder()
    train(_model(), dataset, "uniform", _cfg(tmp_path, steps=6, ckpt_every=2, eval_every=3,
                                                eval_windows=2), callbacks=[rec])
    assert len(rec.hidden_ok) == 6 and all(rec.hidden_ok)
    dna = dataset.domains.index("dna")
    assert all(d == dna for step, doms in rec.domains if step > 3 for d in doms)
    assert len({d for step, doms in rec.domains if step <= 3 for d in doms}) > 1
    assert rec.events == [("save", 2), ("eval", 3, sorted([*dataset.domains, "average"])),
                          ("save", 4), ("eval", 6, sorted([*dataset.domains, "average"])),
                          ("save", 6)]
    assert rec.steps_seen == 6


def test_callback_state_and_changed_weights_resume_exactly(dataset, tmp_path):
    straight, rec_a = _model(), _Recorder()
    train(straight, dataset, "uniform", _cfg(tmp_path / "a", steps=6), callbacks=[rec_a])
    train(_model(), dataset, "uniform", _cfg(tmp_path / "b", steps=6), stop_at=4,
          callbacks=[_Recorder()])  # stops after the weights changed at step 3
    resumed, rec_b = _model(seed=3), _Recorder()
    train(resumed, dataset, "uniform", _cfg(tmp_path / "b", steps=6), callbacks=[rec_b])
    _assert_same_params(straight, resumed)
    assert rec_b.steps_seen == 6 and rec_b.domains == rec_a.domains[4:]


def test_divergence_keeps_the_last_good_checkpoint(dataset, tmp_path):
    class Poison(Callback):
        def on_step_end(self, state):
            if state.step == 3:
                with torch.no_grad():
                    state.model.wte.weight[0, 0] = float("nan")

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"last good checkpoint .*ckpt.pt' \(step 2\)"):
        train(_model(), dataset, "uniform", _cfg(out, steps=8, ckpt_every=2, log_every=1),
              callbacks=[Poison()])
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 2 and all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values())
    assert not (out / "model.pt").exists()
    # a step with a non-finite gradient is skipped, and max_bad_steps of them stop the run
    with pytest.raises(TrainingDiverged, match=r"not finite for 2 consecutive steps \(steps 2-3\)"):
        train(_model(), dataset, "uniform", _cfg(tmp_path / "b", steps=8, max_bad_steps=2,
                                                  log_every=1, lr=1e30))
    recs = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2, 3]  # lr 1e30: step 1's update breaks the model
    assert recs[0]["loss"] > 0
    assert recs[-1]["loss"] is None and recs[-1]["skipped_steps"] == 2
