"""One kind of bad mixture input gets one error class and one core message, wherever it comes in.

Every consumer of a domain list or a weight vector (the sampler, the exports and the parsers of
the trainer formats, the schedule and following it on a dataset, the token budget, online
Chameleon, the weight maths) checks it with chameleon_ext.mixture. Each case
below feeds the same malformed input through every consumer that can take it and requires the
same ChameleonUserError message core; the consumer only adds where the input came from.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

import yaml

from chameleon_ext import exports, mixture
from chameleon_ext.budget import plan_token_budget
from chameleon_ext.data.sampler import WeightedDomainSampler, normalize_weights
from chameleon_ext.data import load_dataset
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.online import OnlineChameleon
from chameleon_ext.schedule import SCHEDULE_FORMAT, check_schedule_domains, validate_schedule
from chameleon_ext.weights import weights_from_embeddings

from .factories import write_text_domains

DOMAINS = ["web", "code", "books"]
GOOD = [0.5, 0.25, 0.25]


def _dataset(domains=DOMAINS):
    return types.SimpleNamespace(domains=domains)


def _weights_doc(weights, domains=DOMAINS):
    return {"format": exports.WEIGHTS_FORMAT, "domains": domains, "weights": dict(zip(domains, weights))}


def _schedule_doc(weights, domains=DOMAINS):
    return {"format": SCHEDULE_FORMAT, "domains": domains,
            "entries": [{"start_step": 0, "start_token": 0, "weights": dict(zip(domains, weights))}]}


def _blend(weights, domains=DOMAINS):
    """A Megatron blend string ``"w1 p1 w2 p2 ..."`` (nan and inf written as Python does)."""
    return " ".join(f"{w!r} {d}" for d, w in zip(domains, weights))


def _mixture_yaml(weights, domains=DOMAINS):
    return yaml.safe_dump({"mixture": [{"name": d, "weight": w} for d, w in zip(domains, weights)]})


COUNTS = {d: 1000 for d in DOMAINS}
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)

# Every consumer of a weight vector, called with the vector for DOMAINS.
WEIGHT_CONSUMERS = {
    "sampler": lambda w: normalize_weights(_dataset(), dict(zip(DOMAINS, w))),
    "sampler_list": lambda w: normalize_weights(_dataset(), w),
    "exports.load_weights": lambda w: exports.load_weights(_weights_doc(w)),
    "exports.render_exports": lambda w: exports.render_exports(_weights_doc(w)),
    "exports.megatron_blend": lambda w: exports.megatron_blend(dict(zip(DOMAINS, w))),
    "exports.hf_interleave_probabilities": lambda w: exports.hf_interleave_probabilities(dict(zip(DOMAINS, w))),
    "exports.mixture_yaml": lambda w: exports.mixture_yaml(dict(zip(DOMAINS, w))),
    "schedule": lambda w: validate_schedule(_schedule_doc(w)),
    "budget": lambda w: plan_token_budget(dict(zip(DOMAINS, w)), COUNTS, 1000),
    "online": lambda w: OnlineChameleon(DOMAINS, initial_weights=w),
    "online_map": lambda w: OnlineChameleon(DOMAINS, initial_weights=dict(zip(DOMAINS, w))),
    "weights_from_embeddings(prior=)": lambda w: weights_from_embeddings(X, domains=DOMAINS, prior=w, smoothing=0.1),
    # the trainer formats read back (Megatron and the YAML mixture normalise their weights)
    "parse_megatron_blend": lambda w: exports.parse_megatron_blend(_blend(w)),
    "parse_mixture_yaml": lambda w: exports.parse_mixture_yaml(_mixture_yaml(w)),
}
# Relative weights: the consumer normalises them, so a sum off 1 is a scale, not an error.
RELATIVE = {"sampler", "sampler_list", "exports.megatron_blend", "exports.hf_interleave_probabilities",
            "exports.mixture_yaml", "budget", "online", "online_map", "parse_megatron_blend", "parse_mixture_yaml"}
# Faults a text format cannot hold: a blend has no booleans and no quoted strings (its words are
# numbers or not), and YAML's quoted '0.25' reads as the number (YAML 1.1 reads 1e-05 as a string).
NOT_EXPRESSIBLE = {("parse_megatron_blend", "bool"), ("parse_megatron_blend", "string"),
                   ("parse_mixture_yaml", "string")}

BAD_ENTRIES = [
    ("bool", [True, 0.0, 0.0], "must be a finite number >= 0, got True"),
    ("nan", [math.nan, 0.5, 0.5], "must be a finite number >= 0, got nan"),
    ("inf", [0.5, math.inf, 0.5], "must be a finite number >= 0, got inf"),
    ("negative", [0.75, -0.25, 0.5], "must be a finite number >= 0, got -0.25"),
    ("string", [0.5, "0.25", 0.25], "must be a finite number >= 0, got '0.25'"),
]


@pytest.mark.parametrize("consumer, case, weights, core", [
    pytest.param(consumer, *bad, id=f"{bad[0]}-{consumer}") for bad in BAD_ENTRIES for consumer in sorted(WEIGHT_CONSUMERS)
    if (consumer, bad[0]) not in NOT_EXPRESSIBLE])
def test_a_bad_weight_entry_gets_one_message_everywhere(consumer, case, weights, core):
    with pytest.raises(ChameleonUserError) as ei:
        WEIGHT_CONSUMERS[consumer](weights)
    assert core in str(ei.value), str(ei.value)
    assert "\n" not in str(ei.value)


def test_the_sampler_refuses_true_as_a_weight(tmp_path):
    # It used to read True as 1.0 (float(True)) while every export refused it.
    with pytest.raises(ChameleonUserError, match=r"weight of domain 'web' must be a finite number >= 0, got True"):
        normalize_weights(_dataset(), {"web": True, "code": 0, "books": 0})
    dataset = load_dataset(write_text_domains(tmp_path / "mix", names=("alpha", "digits", "dna")))
    with pytest.raises(ChameleonUserError, match="got True"):
        WeightedDomainSampler(dataset, [True, 1, 1], 8)
    sampler = WeightedDomainSampler(dataset, [1, 1, 2], 8)
    with pytest.raises(ChameleonUserError, match="got True"):
        sampler.set_weights([1.0, True, 0.0])
    np.testing.assert_array_equal(sampler.probs, [0.25, 0.25, 0.5])  # unchanged by the refused call


@pytest.mark.parametrize("consumer", sorted(WEIGHT_CONSUMERS))
def test_a_sum_off_by_1e7(consumer):
    off = [0.5 + 1e-7, 0.25, 0.25]  # sum 1 + 1e-7: ten times one float32 ulp, far above float64 rounding
    if consumer in RELATIVE:
        out = WEIGHT_CONSUMERS[consumer](off)  # relative weights: normalised, not refused
        if consumer.startswith("sampler"):
            np.testing.assert_allclose(out, np.array(off) / math.fsum(off), rtol=0, atol=1e-15)
        if consumer.startswith("parse_"):
            assert out == dict(zip(DOMAINS, off))  # read back as written, normalised by the trainer
        return
    with pytest.raises(ChameleonUserError) as ei:
        WEIGHT_CONSUMERS[consumer](off)
    assert f"must sum to 1 (within {mixture.WEIGHT_SUM_TOLERANCE:g}), got sum {math.fsum(off)!r}" in str(ei.value)


def test_the_one_tolerance():
    assert mixture.WEIGHT_SUM_TOLERANCE == 1e-9
    assert exports.SUM_TOLERANCE == mixture.WEIGHT_SUM_TOLERANCE
    from chameleon_ext import schedule
    assert schedule.SUM_TOLERANCE == mixture.WEIGHT_SUM_TOLERANCE
    # within the tolerance: accepted by the strict consumers, and kept as given
    near = [0.5 + 5e-10, 0.25, 0.25]
    assert exports.load_weights(_weights_doc(near))["weights"]["web"] == near[0]
    assert validate_schedule(_schedule_doc(near)).entries[0].weights["web"] == near[0]
    # float64 maths at a million domains stays far inside it
    k = 1_000_000
    w = np.random.default_rng(0).random(k)
    w = (w / w.sum()).tolist()
    assert len(mixture.check_weights(w)) == k


def test_all_zero_relative_weights_one_message():
    for name in sorted(RELATIVE):
        with pytest.raises(ChameleonUserError, match="all weights are 0; at least one must be > 0"):
            WEIGHT_CONSUMERS[name]([0, 0, 0])


# Every consumer of a domain list, called with the list.
DOMAIN_CONSUMERS = {
    "sampler": lambda d: normalize_weights(_dataset(d), [1.0] * 3),
    "exports.load_weights": lambda d: exports.load_weights({"format": exports.WEIGHTS_FORMAT, "domains": d,
                                                            "weights": {"web": 0.5, "code": 0.5}}),
    "exports.hf_interleave_probabilities": lambda d: exports.hf_interleave_probabilities(
        {"web": 0.5, "code": 0.5}, domains=d),
    "schedule": lambda d: validate_schedule({"format": SCHEDULE_FORMAT, "domains": d, "entries": []}),
    "online": lambda d: OnlineChameleon(d),
    "weights_from_embeddings": lambda d: weights_from_embeddings(X, domains=d),
}


@pytest.mark.parametrize("consumer", sorted(DOMAIN_CONSUMERS))
@pytest.mark.parametrize("case, domains, core", [
    ("duplicate", ["web", "code", "web"], "names must be unique, got ['web'] more than once"),
    ("string", "web", "expected a list of domain names, got the string 'web'"),
    ("empty_name", ["web", "", "code"], "names must be non-empty strings, got ''"),
], ids=["duplicate", "string", "empty_name"])
def test_a_bad_domain_list_gets_one_message_everywhere(consumer, case, domains, core):
    with pytest.raises(ChameleonUserError) as ei:
        DOMAIN_CONSUMERS[consumer](domains)
    assert core in str(ei.value), str(ei.value)


@pytest.mark.parametrize("parse, text", [
    (exports.parse_megatron_blend, _blend([0.5, 0.25, 0.25], ["web", "code", "web"])),
    (exports.parse_mixture_yaml, _mixture_yaml([0.5, 0.25, 0.25], ["web", "code", "web"])),
], ids=["megatron", "mixture_yaml"])
def test_a_domain_listed_twice_in_a_trainer_file_gets_the_same_message(parse, text):
    # before, each parser worded it its own way ("prefix 'web' appears more than once")
    with pytest.raises(ChameleonUserError) as ei:
        parse(text)
    assert "names must be unique, got ['web'] more than once" in str(ei.value), str(ei.value)


def _schedule_entry(w):
    return [{"start_step": 0, "start_token": 0, "weights": w}]


# Every consumer that holds weights (or counts) for a known list of domains, called with the
# mapping ``w`` given for DOMAINS.
KNOWN_DOMAIN_CONSUMERS = {
    "sampler": lambda w: normalize_weights(_dataset(), w),
    "exports.load_weights": lambda w: exports.load_weights(
        {"format": exports.WEIGHTS_FORMAT, "domains": DOMAINS, "weights": w}),
    "exports.hf_interleave_probabilities": lambda w: exports.hf_interleave_probabilities(w, domains=DOMAINS),
    "schedule": lambda w: validate_schedule({"format": SCHEDULE_FORMAT, "domains": DOMAINS, "entries": _schedule_entry(w)}),
    # a schedule followed on a dataset (train --schedule): the schedule's domains against the data's
    "schedule followed": lambda w: check_schedule_domains(
        validate_schedule({"format": SCHEDULE_FORMAT, "domains": list(w), "entries": _schedule_entry(w)}),
        DOMAINS, "--schedule"),
    # a token budget: the counts' domains against the weights'
    "budget": lambda w: plan_token_budget(dict(zip(DOMAINS, GOOD)), dict.fromkeys(w, 1000), 1000),
    "online": lambda w: OnlineChameleon(DOMAINS, initial_weights=w),
}


@pytest.mark.parametrize("consumer", sorted(KNOWN_DOMAIN_CONSUMERS))
@pytest.mark.parametrize("case, weights, core", [
    ("missing", {"web": 0.5, "code": 0.5}, "the domains do not match (missing ['books']; expected ['web', 'code', 'books'])"),
    ("extra", {"web": 0.5, "code": 0.25, "books": 0.25, "news": 0.0},
     "the domains do not match (unknown ['news']; expected ['web', 'code', 'books'])"),
    ("both", {"web": 0.5, "code": 0.25, "news": 0.25},
     "the domains do not match (unknown ['news']; missing ['books']; expected ['web', 'code', 'books'])"),
], ids=["missing", "extra", "both"])
def test_a_missing_or_extra_domain_gets_one_message_everywhere(consumer, case, weights, core):
    # the schedule followed on a dataset and the budget's counts used to word it their own way
    with pytest.raises(ChameleonUserError) as ei:
        KNOWN_DOMAIN_CONSUMERS[consumer](weights)
    assert core in str(ei.value), str(ei.value)
    assert "\n" not in str(ei.value)


def test_option_checks_one_message():
    from chameleon_ext.pipeline import check_weight_options
    from chameleon_ext import uncertainty

    # mode: the same core through the mixture module, the pipeline, online and uncertainty
    core = "expected one of ('pretrain', 'finetune'"
    for call in (lambda: mixture.check_mode("mixing"), lambda: OnlineChameleon(DOMAINS, mode="mixing"),
                 lambda: check_weight_options("mixing"),
                 lambda: uncertainty.sweep_weights(X, [1.0], mode="mixing", rule="paper")):
        with pytest.raises(ChameleonUserError) as ei:
            call()
        assert str(ei.value).startswith("mode") and core in str(ei.value), str(ei.value)
    with pytest.raises(ChameleonUserError, match=r"^temperature \(--temperature\): expected a finite number > 0, got True$"):
        check_weight_options("pretrain", temperature=True)
    with pytest.raises(ChameleonUserError, match=r"^temperature: expected a finite number > 0, got True$"):
        OnlineChameleon(DOMAINS, temperature=True)
    with pytest.raises(ChameleonUserError, match=r"^lambda \(--lam\): expected a finite number > 0 or 'auto', got nan$"):
        check_weight_options("pretrain", lam=math.nan)


# --------------------------------------------------------------------------- one vocabulary of modes


def _mode_choices():
    from chameleon_ext.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    return {command: next(a.choices for a in sub[command]._actions if a.dest == "mode")
            for command in ("train", "weights", "run", "sweep")}


def test_every_mode_option_takes_its_choices_from_the_one_vocabulary():
    choices = _mode_choices()
    # train follows the weight rule's two directions; the pipeline commands add transfer
    assert choices["train"] == list(mixture.MODES) == ["pretrain", "finetune"]
    for command in ("weights", "run", "sweep"):
        assert choices[command] == list(mixture.PIPELINE_MODES) == ["pretrain", "finetune", "transfer"]
    assert set(mixture.MODES) <= set(mixture.PIPELINE_MODES)
    assert all(mixture.rule_of_mode(m) in mixture.MODES for m in mixture.PIPELINE_MODES)


def _reference_weights(mode, lam, temperature):
    """The paper's rule in float64 NumPy, written apart from the package (docs/method.md)."""
    x = X.numpy()
    k = x.shape[0]
    H = np.eye(k) - 1.0 / k  # the centred linear kernel
    K = H @ (x @ x.T) @ H
    S = np.diag(K @ np.linalg.inv(K + lam * k * np.eye(k)))
    s = S / S.sum()
    z = 1.0 / ((s + 1e-12) * temperature) if mode == "pretrain" else s / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.parametrize("mode", mixture.PIPELINE_MODES)
def test_each_weights_mode_choice_works(mode):
    from chameleon_ext.cli import build_parser
    from chameleon_ext.embed import DomainEmbeddings
    from chameleon_ext.pipeline import weights_for_domains

    args = build_parser().parse_args(["weights", "--mode", mode, "--rule", "paper"])
    emb = DomainEmbeddings(DOMAINS, X, [1] * 3, {})
    result = weights_for_domains(emb, args.mode, rule=args.rule)
    assert result.mode == mode
    direction = "pretrain" if mode == "transfer" else mode  # transfer: the pretraining rule
    lam, temperature = result.lam, result.temperature
    np.testing.assert_allclose(result.weights.numpy(), _reference_weights(direction, lam, temperature),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", mixture.MODES)
def test_each_train_mode_choice_works(mode):
    from chameleon_ext.cli import build_parser

    args = build_parser().parse_args(["train", "--weights", "online", "--mode", mode])
    online = OnlineChameleon(DOMAINS, every=1, warmup=0, decay=0.0, floor=0.0, mode=args.mode)
    online.observe(X.float()[:, None, :], None, torch.arange(3))  # one window per domain: embeddings = X
    update = online.end_step()
    assert online.mode == mode and update is not None
    temperature = online.temperature if online.temperature is not None else \
        weights_from_embeddings(X, mode=mode, lam=online.lam, rule="paper").temperature
    np.testing.assert_allclose(update.weights.numpy(), _reference_weights(mode, online.lam, temperature),
                               rtol=1e-6, atol=1e-9)
