"""One kind of bad mixture input gets one error class and one core message, wherever it comes in.

Every consumer of a domain list or a weight vector (the sampler, the exports, the schedule, the
token budget, online Chameleon, the weight maths) checks it with chameleon_ext.mixture. Each case
below feeds the same malformed input through every consumer that can take it and requires the
same ChameleonUserError message core; the consumer only adds where the input came from.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from chameleon_ext import exports, mixture
from chameleon_ext.budget import plan_token_budget
from chameleon_ext.data.sampler import WeightedDomainSampler, normalize_weights
from chameleon_ext.data import load_dataset
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.online import OnlineChameleon
from chameleon_ext.schedule import SCHEDULE_FORMAT, validate_schedule
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
}
# Relative weights: the consumer normalises them, so a sum off 1 is a scale, not an error.
RELATIVE = {"sampler", "sampler_list", "exports.megatron_blend", "exports.hf_interleave_probabilities",
            "exports.mixture_yaml", "budget", "online", "online_map"}

BAD_ENTRIES = [
    ("bool", [True, 0.0, 0.0], "must be a finite number >= 0, got True"),
    ("nan", [math.nan, 0.5, 0.5], "must be a finite number >= 0, got nan"),
    ("inf", [0.5, math.inf, 0.5], "must be a finite number >= 0, got inf"),
    ("negative", [0.75, -0.25, 0.5], "must be a finite number >= 0, got -0.25"),
    ("string", [0.5, "0.25", 0.25], "must be a finite number >= 0, got '0.25'"),
]


@pytest.mark.parametrize("consumer", sorted(WEIGHT_CONSUMERS))
@pytest.mark.parametrize("case, weights, core", BAD_ENTRIES, ids=[c[0] for c in BAD_ENTRIES])
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


def test_unknown_and_missing_domains_one_message():
    core = "the domains do not match (unknown ['news']; missing ['books']"
    w = {"web": 0.5, "code": 0.25, "news": 0.25}
    for call in (lambda: normalize_weights(_dataset(), w),
                 lambda: validate_schedule({"format": SCHEDULE_FORMAT, "domains": DOMAINS,
                                            "entries": [{"start_step": 0, "start_token": 0, "weights": w}]}),
                 lambda: OnlineChameleon(DOMAINS, initial_weights=w),
                 lambda: exports.load_weights({"format": exports.WEIGHTS_FORMAT, "domains": DOMAINS, "weights": w})):
        with pytest.raises(ChameleonUserError) as ei:
            call()
        assert core in str(ei.value), str(ei.value)


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
