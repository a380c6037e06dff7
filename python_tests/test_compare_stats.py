"""Comparison statistics: Student-t quantiles against printed tables and mpmath, seed
intervals and paired differences computed separately here, the FLOPs ledger, the table."""

import json
import math

import mpmath
import numpy as np
import pytest

from chameleon_ext import compare_stats as S
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.model import GPT, GPTConfig

# Two-sided 95% critical values t_{0.975, dof} as printed in standard tables (3 decimals).
T_TABLE_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
              9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
T_975_2 = 4.302652729749464  # t_{0.975, 2}, 16 digits (3 seeds)
T_975_1 = 12.706204736174707  # t_{0.975, 1} = tan(0.475 pi) (2 seeds)


def mp_quantile(conf, dof):
    """Independent: P(|T| <= t) = 1 - I_{dof/(dof+t^2)}(dof/2, 1/2) (regularised incomplete
    beta, mpmath at 40 digits), solved for t by bisection."""
    mpmath.mp.dps = 40
    nu = mpmath.mpf(dof)

    def central(t):
        return 1 - mpmath.betainc(nu / 2, mpmath.mpf(1) / 2, 0, nu / (nu + t * t), regularized=True)

    lo, hi = mpmath.mpf(0), mpmath.mpf(10) ** 4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if central(mid) < conf else (lo, mid)
    return float((lo + hi) / 2)


def test_t_quantiles_match_printed_tables():
    for dof, t in T_TABLE_95.items():
        assert S.student_t_quantile(0.95, dof) == pytest.approx(t, abs=5e-4), dof
    assert S.student_t_quantile(0.95, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-13)
    assert S.student_t_quantile(0.95, 2) == pytest.approx(T_975_2, rel=1e-13)


@pytest.mark.parametrize("conf", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("dof", [1, 2, 3, 4, 5, 7, 10, 17, 30, 60])
def test_t_quantiles_match_mpmath(conf, dof):
    assert S.student_t_quantile(conf, dof) == pytest.approx(mp_quantile(conf, dof), rel=1e-11)


def test_mean_interval_by_hand():
    iv = S.mean_interval([10.0, 11.0, 12.0])  # mean 11, sd 1
    assert iv.mean == 11.0 and iv.sd == 1.0 and iv.n == 3
    assert iv.half_width == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-13)
    assert iv.low == pytest.approx(11 - 2.484138, abs=1e-6) and iv.high == pytest.approx(11 + 2.484138, abs=1e-6)
    one = S.mean_interval([7.5])
    assert (one.mean, one.low, one.high, one.sd, one.half_width) == (7.5, None, None, None, None)
    with pytest.raises(ChameleonUserError):
        S.mean_interval([])
    with pytest.raises(ChameleonUserError):
        S.mean_interval([1.0, float("inf")])


RESULTS = {
    "uniform": {0: {"a": 10.0, "b": 20.0}, 1: {"a": 11.0, "b": 19.0}, 2: {"a": 12.0, "b": 22.0}},
    "chameleon": {"0": {"a": 9.0, "b": 19.0}, "1": {"a": 10.5, "b": 18.0}, "2": {"a": 11.0, "b": 20.0}},
    "regmix": {1: {"a": 12.0, "b": 18.0}, 2: {"a": 12.5, "b": 23.0}, 3: {"a": 13.0, "b": 20.0}},
}


def np_interval(x, t):
    x = np.asarray(x, dtype=np.float64)
    half = t * x.std(ddof=1) / np.sqrt(x.size)
    return x.mean(), x.mean() - half, x.mean() + half


def check(iv, x, t):
    m, lo, hi = np_interval(x, t)
    assert iv.mean == pytest.approx(m, abs=1e-12)
    assert iv.low == pytest.approx(lo, abs=1e-12) and iv.high == pytest.approx(hi, abs=1e-12)


def check_log(iv, x, t):
    """A perplexity interval: the t interval of log x, exponentiated (numpy, float64)."""
    m, lo, hi = np_interval(np.log(np.asarray(x, dtype=np.float64)), t)
    assert iv.scale == "log"
    assert iv.mean == pytest.approx(np.exp(m), rel=1e-12)
    assert iv.low == pytest.approx(np.exp(lo), rel=1e-12) and iv.high == pytest.approx(np.exp(hi), rel=1e-12)


def test_per_domain_average_and_paired_intervals():
    st = S.compare_perplexities(RESULTS)
    assert st.domains == ["a", "b"] and st.baseline == "uniform"
    u, c, r = (st.mixtures[m] for m in ("uniform", "chameleon", "regmix"))
    check_log(u.perplexity["a"], [10, 11, 12], T_975_2)
    check_log(c.perplexity["b"], [19, 18, 20], T_975_2)
    # average: the mean of the domains' perplexities per seed, then over seeds
    check_log(c.perplexity["average"], [14.0, 14.25, 15.5], T_975_2)
    assert u.difference is None
    # paired by seed ("0" and 0 are the same seed): chameleon - uniform
    check(c.difference["a"], [-1.0, -0.5, -1.0], T_975_2)
    check(c.difference["average"], [14.0 - 15.0, 14.25 - 15.0, 15.5 - 17.0], T_975_2)
    # regmix shares seeds 1 and 2 with uniform only: n = 2, t with 1 dof
    assert r.paired_seeds == ["1", "2"] and r.difference["b"].n == 2
    check(r.difference["b"], [18 - 19, 23 - 22], T_975_1)
    d = json.loads(json.dumps(st.as_dict()))
    assert d["mixtures"]["chameleon"]["difference_to_baseline"]["a"]["n"] == 3
    assert "Student t" in d["interval"]


def test_inputs_are_checked():
    with pytest.raises(ChameleonUserError, match="domains"):
        S.compare_perplexities({"uniform": {0: {"a": 2.0}, 1: {"b": 2.0}}})
    with pytest.raises(ChameleonUserError, match=">= 1"):
        S.compare_perplexities({"uniform": {0: {"a": 0.5}}})
    with pytest.raises(ChameleonUserError, match="baseline"):
        S.compare_perplexities({"x": {0: {"a": 2.0}}})
    with pytest.raises(ChameleonUserError, match="twice"):
        S.compare_perplexities({"uniform": {0: {"a": 2.0}, "0": {"a": 3.0}}})


def test_flops_convention_by_hand():
    assert S.pass_flops("train", 1_000_000, 2_000) == 6 * 1_000_000 * 2_000
    assert S.pass_flops("forward", 1_000_000, 2_000) == 2 * 1_000_000 * 2_000
    with pytest.raises(ChameleonUserError, match="kind"):
        S.pass_flops("backward", 1, 1)
    with pytest.raises(ChameleonUserError, match="tokens"):
        S.pass_flops("train", 1, -1)


@pytest.mark.parametrize("L,H", [(1, 16), (3, 32)])
def test_non_embedding_parameters_of_gpt(L, H):
    model = GPT(GPTConfig(vocab_size=257, n_layer=L, n_head=2, n_embd=H, block_size=24))
    # per block: 2 LayerNorms (4H), qkv (3H^2 + 3H), attn proj (H^2 + H), MLP (8H^2 + 5H);
    # final LayerNorm 2H; token/position tables (and the tied lm_head) excluded
    assert S.non_embedding_parameters(model) == L * (12 * H * H + 13 * H) + 2 * H
    assert model.num_parameters(non_embedding=True) - S.non_embedding_parameters(model) == 257 * H


def test_ledger_sums_by_method_and_round_trips():
    led = S.ComputeLedger()
    led.add("doremi", "reference model", "train", 1000, 10_000, 2.5)
    led.add("doremi", "proxy", "train", 1000, 10_000, 3.0)
    led.add("doremi", "reference forward on proxy batches", "forward", 1000, 10_000, 0.5)
    led.add("chameleon", "proxy", "train", 1000, 10_000, 2.0)
    led.add("chameleon", "embedding", "forward", 1000, 4_000, 0.1)
    assert led.flops("doremi") == 6e7 + 6e7 + 2e7
    assert led.flops("chameleon") == 6e7 + 8e6
    assert led.flops() == led.flops("doremi") + led.flops("chameleon")
    assert led.wall_s("doremi") == 6.0 and led.methods() == ["doremi", "chameleon"]
    back = S.ComputeLedger.from_dict(json.loads(json.dumps(led.to_dict())))
    assert back.entries == led.entries and back.summary() == led.summary()
    with pytest.raises(ChameleonUserError, match="wall_s"):
        led.add("x", "y", "train", 1, 1, -1.0)
    with pytest.raises(ChameleonUserError, match="method"):
        led.add("", "y", "train", 1, 1)


def test_table_states_seeds_and_interval():
    st = S.compare_perplexities({k: RESULTS[k] for k in ("uniform", "chameleon")})
    led = S.ComputeLedger()
    led.add("chameleon", "proxy", "train", 1000, 10_000, 2.0)
    led.add("base", "base runs", "train", 5000, 100_000, 20.0)
    md = S.format_comparison_table(st, led)
    assert "n = 3 seeds" in md and "95% confidence interval" in md and "Student t with n - 1" in md
    assert "log scale" in md
    assert "paired difference to uniform" in md
    rows = {}  # first table only: the first row of each mixture
    for line in md.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    # geometric means [exp(mean log -+ t sd(log) / sqrt 3)] (numpy: 1320 ** (1/3) = 10.970, ...)
    assert rows["uniform"].startswith("| uniform | 10.970 [8.746, 13.759] | 20.296 [16.871, 24.415] |"), rows
    assert "| -1.083 ± 0.949 |" in rows["chameleon"]  # the paired difference stays linear
    assert " | 6e+07 | 2.0 |" in rows["chameleon"] and "—" in rows["uniform"]
    assert "Base training, all runs together: 3e+09 FLOPs" in md
    one = S.compare_perplexities({"uniform": {0: {"a": 3.0}}, "natural": {0: {"a": 2.5}}})
    md1 = S.format_comparison_table(one)
    assert "n = 1 seed" in md1 and "no confidence interval" in md1 and "| natural | 2.500 | 2.500 | -0.500 |" in md1


def test_two_seed_perplexity_intervals_stay_positive():
    """With 2 seeds t = 12.7: the linear interval of [5, 40] would reach -135; the log-scale one
    is exp(mean log +- 12.706 * sd(log) / sqrt 2), positive, around the geometric mean 14.14."""
    st = S.compare_perplexities({"uniform": {0: {"a": 5.0}, 1: {"a": 40.0}}})
    iv = st.mixtures["uniform"].perplexity["a"]
    lin = S.mean_interval([5.0, 40.0])
    assert lin.low < 0 < iv.low < iv.mean < iv.high
    assert iv.mean == pytest.approx(math.sqrt(5.0 * 40.0), rel=1e-14)
    half = T_975_1 * abs(math.log(40.0) - math.log(5.0)) / 2  # sd of two values = |x1 - x2| / sqrt 2
    assert iv.low == pytest.approx(math.sqrt(200.0) * math.exp(-half), rel=1e-12)
    assert iv.high == pytest.approx(math.sqrt(200.0) * math.exp(half), rel=1e-12)
    # tiny and huge perplexities: the same relative interval (scale free on the log scale)
    for scale in (1e-3, 1e6):
        big = S.compare_perplexities({"u": {0: {"a": 5.0 / 1e-3 * scale}, 1: {"a": 40.0 / 1e-3 * scale}}},
                                     baseline=None).mixtures["u"].perplexity["a"]
        assert big.high / big.mean == pytest.approx(iv.high / iv.mean, rel=1e-12)
    assert iv.half_width is None and iv.errors == (iv.mean - iv.low, iv.high - iv.mean)
