"""Token budgets and repetition caps (chameleon_ext.budget): hand-computed cases, a bisection
reference for the water-filling, and the end-of-run token-share report."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chameleon_ext.budget import (
    DomainTokenCounter,
    TokenCount,
    cap_repetition,
    plan_token_budget,
    token_share_report,
)
from chameleon_ext.errors import ChameleonUserError


def reference_targets(weights, counts, budget, max_epochs):
    """Independent reference: t_i(s) = min(r n_i, s w_i N) is monotone in s; bisect for the s
    where the targets sum to N (float64, 200 halvings)."""
    total = sum(weights.values())
    share = {d: w / total for d, w in weights.items()}

    def fill(s):
        return {d: min(max_epochs * counts[d], s * share[d] * budget) for d in weights}

    lo, hi = 0.0, 1.0
    while sum(fill(hi).values()) < budget and hi < 1e30:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(fill(mid).values()) < budget:
            lo = mid
        else:
            hi = mid
    return fill(hi)


# -- hand-computed cases ---------------------------------------------------------------------


def test_single_cap_redistributes_in_proportion():
    # a wants 500 of 1000 tokens but holds 2 x 100 = 200; the 300 left over go to b and c as
    # 3:2, so b = 300 + 180 = 480 and c = 200 + 120 = 320.
    plan = plan_token_budget({"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 100, "b": 1000, "c": 1000},
                             token_budget=1000, max_epochs=2)
    assert plan.target_tokens == {"a": 200, "b": 480, "c": 320}
    assert plan.achievable_weights == pytest.approx({"a": 0.2, "b": 0.48, "c": 0.32}, abs=1e-15)
    assert plan.epochs == pytest.approx({"a": 2.0, "b": 0.48, "c": 0.32}, abs=1e-15)
    assert plan.capped_domains == ["a"]
    assert plan.requested_weights == pytest.approx({"a": 0.5, "b": 0.3, "c": 0.2}, abs=1e-15)


def test_cap_cascades_until_stable():
    # Round 1: a (600 > 100) capped; 900 left over weight 0.4 -> b gets 675 > 200: capped too.
    # Round 2: 700 left for c alone (700 <= 10000): stable.
    plan = plan_token_budget({"a": 0.6, "b": 0.3, "c": 0.1}, {"a": 100, "b": 200, "c": 10_000},
                             token_budget=1000, max_epochs=1)
    assert plan.target_tokens == {"a": 100, "b": 200, "c": 700}
    assert plan.capped_domains == ["a", "b"]
    assert plan.epochs["c"] == pytest.approx(0.07)


def test_no_cap_reports_epochs_above_one():
    plan = plan_token_budget({"a": 0.5, "b": 0.5}, {"a": 100, "b": 10_000}, token_budget=1000)
    assert plan.target_tokens == {"a": 500, "b": 500}
    assert plan.epochs == {"a": 5.0, "b": 0.05}
    assert plan.capped_domains == [] and plan.max_epochs is None
    assert plan.achievable_weights == plan.requested_weights


def test_cap_not_binding_changes_nothing():
    plan = plan_token_budget({"a": 0.25, "b": 0.75}, {"a": 1000, "b": 1000}, token_budget=400, max_epochs=1)
    assert plan.target_tokens == {"a": 100, "b": 300} and plan.capped_domains == []


def test_whole_tokens_sum_to_budget():
    plan = plan_token_budget({"a": 1, "b": 1, "c": 1}, {"a": 50, "b": 50, "c": 50}, token_budget=10)
    assert sorted(plan.target_tokens.values()) == [3, 3, 4]
    assert sum(plan.target_tokens.values()) == 10


def test_infeasible_budget_names_the_numbers():
    with pytest.raises(ChameleonUserError) as e:
        plan_token_budget({"a": 0.5, "b": 0.5}, {"a": 100, "b": 100}, token_budget=1000, max_epochs=2)
    msg = str(e.value)
    assert "1,000" in msg and "400" in msg and "600 short" in msg and "'a'" in msg
    assert "at most 400 tokens" in msg and "max_epochs to at least 5" in msg


def test_exactly_full_capacity_is_feasible():
    plan = plan_token_budget({"a": 0.5, "b": 0.5}, {"a": 100, "b": 300}, token_budget=800, max_epochs=2)
    assert plan.target_tokens == {"a": 200, "b": 600}
    assert plan.capped_domains == ["a", "b"]


def test_zero_weight_domain_gets_nothing():
    plan = plan_token_budget({"a": 0.0, "b": 1.0}, {"a": 0, "b": 1000}, token_budget=500, max_epochs=1)
    assert plan.target_tokens == {"a": 0, "b": 500} and plan.epochs["a"] == 0.0


def test_empty_weighted_domain_needs_a_cap():
    with pytest.raises(ChameleonUserError, match=r"\['a'\] have weight but no tokens"):
        plan_token_budget({"a": 0.5, "b": 0.5}, {"a": 0, "b": 1000}, token_budget=500)
    plan = plan_token_budget({"a": 0.5, "b": 0.5}, {"a": 0, "b": 1000}, token_budget=500, max_epochs=1)
    assert plan.target_tokens == {"a": 0, "b": 500} and plan.capped_domains == ["a"]


def test_estimated_counts_keep_their_source_and_json_round_trip():
    counts = {"a": TokenCount(100, "estimated from 2048 sampled windows"), "b": {"tokens": 1000}}
    plan = plan_token_budget({"a": 0.5, "b": 0.5}, counts, token_budget=1000, max_epochs=2)
    d = json.loads(json.dumps(plan.as_dict(), allow_nan=False))
    assert d["token_count_sources"] == {"a": "estimated from 2048 sampled windows", "b": "counted"}
    assert d["capped_domains"] == ["a"] and d["target_tokens"] == {"a": 200, "b": 800}
    assert "estimated from 2048" in plan.format() and "(capped)" in plan.format()


@pytest.mark.parametrize("kwargs, match", [
    (dict(token_budget=0), "token_budget must be an integer >= 1"),
    (dict(token_budget=10.5), "token_budget must be an integer"),
    (dict(token_budget=True), "token_budget must be an integer"),
    (dict(token_budget=100, max_epochs=0), "max_epochs must be a finite number > 0"),
    (dict(token_budget=100, max_epochs=math.inf), "max_epochs must be a finite number > 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ChameleonUserError, match=match):
        plan_token_budget({"a": 1.0}, {"a": 100}, **kwargs)


def test_estimates_may_be_fractional_counts_may_not():
    plan = plan_token_budget({"a": 1.0}, {"a": TokenCount(1234.6, "estimated from bytes")}, token_budget=10)
    assert plan.domains[0].token_count == 1235
    with pytest.raises(ChameleonUserError, match="token count of domain 'a' must be an integer"):
        plan_token_budget({"a": 1.0}, {"a": 1234.6}, token_budget=10)
    with pytest.raises(ChameleonUserError, match="token count of domain 'a' must be an integer"):
        plan_token_budget({"a": 1.0}, {"a": TokenCount(math.nan, "estimated")}, token_budget=10)


def test_counts_must_match_domains():
    with pytest.raises(ChameleonUserError, match=r"^token_counts: the domains do not match \(unknown \['c'\]; missing \['b'\]"):
        plan_token_budget({"a": 0.5, "b": 0.5}, {"a": 1, "c": 1}, token_budget=10)
    with pytest.raises(ChameleonUserError, match="token count of domain 'a'"):
        plan_token_budget({"a": 1.0}, {"a": -1}, token_budget=10)
    with pytest.raises(ChameleonUserError, match="weight of domain 'a' must be a finite number >= 0"):
        plan_token_budget({"a": -1.0}, {"a": 1}, token_budget=10)


def test_float_budget_that_is_an_integer_is_accepted():
    assert plan_token_budget({"a": 1.0}, {"a": 10**9}, token_budget=1e9).token_budget == 10**9


# -- property: water-filling against the bisection reference ---------------------------------

domain_sets = st.integers(min_value=1, max_value=8).flatmap(lambda k: st.tuples(
    st.lists(st.floats(min_value=1e-4, max_value=1.0), min_size=k, max_size=k),
    st.lists(st.integers(min_value=1, max_value=10**9), min_size=k, max_size=k),
))


@settings(max_examples=300, deadline=None)
@given(domain_sets, st.integers(min_value=1, max_value=10**10),
       st.one_of(st.none(), st.floats(min_value=0.05, max_value=50)))
def test_property_caps_shares_and_proportions(sets, budget, max_epochs):
    raw_weights, raw_counts = sets
    names = [f"d{i}" for i in range(len(raw_weights))]
    weights, counts = dict(zip(names, raw_weights)), dict(zip(names, raw_counts))
    try:
        plan = plan_token_budget(weights, counts, token_budget=budget, max_epochs=max_epochs)
    except ChameleonUserError as e:
        # Only a budget beyond the capacity (or beyond its whole-token floors) may be refused.
        assert max_epochs is not None
        assert sum(math.floor(max_epochs * n) for n in raw_counts) < budget, str(e)
        return
    ach = plan.achievable_weights
    assert math.fsum(ach.values()) == pytest.approx(1.0, abs=1e-12)
    assert sum(plan.target_tokens.values()) == budget
    ref = reference_targets(weights, counts, budget, max_epochs if max_epochs is not None else math.inf)
    for d in names:
        assert ach[d] * budget == pytest.approx(ref[d], rel=1e-9, abs=1e-6 * budget)
        if max_epochs is not None:
            assert plan.target_tokens[d] <= max_epochs * counts[d] + 1e-9
            assert ach[d] * budget <= max_epochs * counts[d] * (1 + 1e-12)
    free = [d for d in names if d not in plan.capped_domains]
    total_w = sum(raw_weights)
    if free:
        # Uncapped domains keep their requested relative proportions: one common scale.
        scales = [ach[d] / (weights[d] / total_w) for d in free]
        assert max(scales) == pytest.approx(min(scales), rel=1e-9)
        assert min(scales) >= 1 - 1e-12  # redistribution only ever adds
    for d in names:
        # Capped means filled to the cap; every other domain is strictly below its cap.
        if d in plan.capped_domains:
            assert ach[d] * budget == pytest.approx(max_epochs * counts[d], rel=1e-12)
        elif max_epochs is not None:
            assert ach[d] * budget < max_epochs * counts[d]


def test_cap_repetition_floats_match_reference_on_a_cascade():
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    counts = {"a": 100, "b": 200, "c": 10_000}
    targets, capped = cap_repetition(weights, counts, 1000, 1.0)
    ref = reference_targets(weights, counts, 1000, 1.0)
    assert targets == pytest.approx(ref, rel=1e-12) and capped == ["a", "b"]


# -- end of a run: achieved vs target shares -------------------------------------------------


def test_token_share_report_plain_numbers():
    r = token_share_report({"a": 0.25, "b": 0.75}, {"a": 300, "b": 700})
    assert r.total_tokens == 1000
    assert [(d.domain, d.tokens, d.achieved_share, d.target_share) for d in r.domains] == [
        ("a", 300, 0.3, 0.25), ("b", 700, 0.7, 0.75)]
    assert r.domains[0].difference == pytest.approx(0.05) and r.domains[1].difference == pytest.approx(-0.05)
    assert r.max_abs_difference == pytest.approx(0.05)
    assert json.loads(json.dumps(r.as_dict()))["achieved_shares"] == {"a": 0.3, "b": 0.7}
    assert "+0.0500" in r.format() and "-0.0500" in r.format()


def test_token_share_report_missing_domain_is_zero_and_errors():
    r = token_share_report({"a": 2, "b": 2}, {"a": 10})
    assert [d.achieved_share for d in r.domains] == [1.0, 0.0]
    assert [d.target_share for d in r.domains] == [0.5, 0.5]
    with pytest.raises(ChameleonUserError, match=r"names domains \['z'\]"):
        token_share_report({"a": 1.0}, {"a": 1, "z": 1})
    with pytest.raises(ChameleonUserError, match="no tokens were counted"):
        token_share_report({"a": 1.0}, {"a": 0})
    with pytest.raises(ChameleonUserError, match="tokens seen in domain 'a'"):
        token_share_report({"a": 1.0}, {"a": 1.5})


def test_domain_token_counter_counts_tokens_not_rows():
    import torch

    c = DomainTokenCounter(["a", "b", "c"])
    c.add(torch.tensor([0, 1, 1, 2]), torch.tensor([512, 512, 100, 0]))  # a padded row, an empty one
    c.add([2, 2], 7)  # one int for every row
    assert c.as_dict() == {"a": 512, "b": 612, "c": 14}
    r = c.report({"a": 0.5, "b": 0.25, "c": 0.25})
    assert r.total_tokens == 1138
    assert [d.achieved_share for d in r.domains] == [512 / 1138, 612 / 1138, 14 / 1138]
    c.add(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))  # an empty batch
    assert c.as_dict()["a"] == 512
    with pytest.raises(ChameleonUserError, match=r"domain ids must be in \[0, 3\), got 0..3"):
        c.add([0, 3], 1)
    with pytest.raises(ChameleonUserError, match=r"tokens must be one int or \[B\] = \[2\]"):
        c.add([0, 1], [1, 2, 3])
    with pytest.raises(ChameleonUserError, match="distinct"):
        DomainTokenCounter(["a", "a"])
