"""DoReMi's Group DRO domain weights: hand-computed updates, clipping, smoothing, absent
domains, exact resume, the reweighted proxy loss, and the per-micro-batch objective."""

import io
import math

import numpy as np
import pytest
import torch

from chameleon_ext.baselines import doremi as D
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.model import GPT, GPTConfig, next_token_loss

C = 1e-3


def batch(rows):
    """rows: (domain, proxy losses, reference losses, mask) -> tensors [B, T]."""
    ids = torch.tensor([r[0] for r in rows])
    proxy = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    ref = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    mask = torch.tensor([r[3] for r in rows], dtype=torch.bool)
    return proxy, ref, ids, mask


# Step 1: domain 0 rows have per-token excess [0.5, -0.25] and [0.25, -1] -> clipped
# [0.5, 0, 0.25, 0] -> lambda_0 = 0.75 / 4 = 0.1875; domain 1's second token is masked
# (excess 8 must not count) -> lambda_1 = 1; domain 2 is below the reference -> 0.
STEP1 = [(0, [2.5, 1.0], [2.0, 1.25], [1, 1]),
         (0, [1.25, 1.0], [1.0, 2.0], [1, 1]),
         (1, [3.0, 9.0], [2.0, 1.0], [1, 0]),
         (2, [1.0, 1.0], [2.0, 1.5], [1, 1])]
# Step 2: domain 0 absent; lambda_1 = (0.5 + 0.5) / 2, lambda_2 = (0.5 + 0 + 0.25 + 0.25) / 4.
STEP2 = [(1, [1.5, 2.5], [1.0, 2.0], [1, 1]),
         (2, [1.5, 1.0], [1.0, 1.5], [1, 1]),
         (2, [2.0, 2.0], [1.75, 1.75], [1, 1])]

# alpha_t computed by hand at 40 digits (mpmath): alpha_t = (1 - c) softmax(log alpha_{t-1}
# + lambda_t) + c / 3, alpha_0 uniform, eta = 1, c = 1e-3.
ALPHA1 = [0.24503250354844947, 0.55177142581530378, 0.20319607063624675]
ALPHA2 = [0.17324751771086536, 0.64230131838752997, 0.18445116390160467]
AVERAGE = [0.20914001062965741, 0.59703637210141687, 0.19382361726892571]
ALPHA2_CARRY = [0.20171902348109251, 0.62017553575682463, 0.17810544076208287]


def by_hand(alpha, lam, eta=1.0, c=C):
    z = [a * math.exp(eta * l) for a, l in zip(alpha, lam)]
    s = sum(z)
    return [(1 - c) * v / s + c / len(z) for v in z]


def test_two_steps_against_hand_computation():
    w = D.DoReMiWeights(["a", "b", "c"])
    a1 = w.update(*batch(STEP1)[:3], mask=batch(STEP1)[3])
    np.testing.assert_allclose(w.last_excess.numpy(), [0.1875, 1.0, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(a1.numpy(), ALPHA1, rtol=0, atol=1e-15)
    proxy, ref, ids, mask = batch(STEP2)
    a2 = w.update(proxy, ref, ids, mask)
    np.testing.assert_allclose(w.last_excess.numpy(), [0.0, 0.5, 0.25], rtol=0, atol=1e-15)
    np.testing.assert_allclose(a2.numpy(), ALPHA2, rtol=0, atol=1e-15)
    # the same with plain floats, written separately
    np.testing.assert_allclose(a2.numpy(), by_hand(by_hand([1 / 3] * 3, [0.1875, 1, 0]), [0, 0.5, 0.25]),
                               rtol=0, atol=1e-15)
    np.testing.assert_allclose(w.average.numpy(), AVERAGE, rtol=0, atol=1e-15)
    assert w.steps == 2
    res = w.result().as_dict()
    assert res["weights"] == pytest.approx(dict(zip("abc", AVERAGE)), abs=1e-15)
    assert res["final_alpha"] == pytest.approx(dict(zip("abc", ALPHA2)), abs=1e-15)


def test_absent_domain_carry_rule_reuses_last_excess():
    w = D.DoReMiWeights(3, absent="carry")
    for rows in (STEP1, STEP2):
        proxy, ref, ids, mask = batch(rows)
        w.update(proxy, ref, ids, mask)
    np.testing.assert_allclose(w.last_excess.numpy(), [0.1875, 0.5, 0.25], rtol=0, atol=1e-15)
    np.testing.assert_allclose(w.alpha.numpy(), ALPHA2_CARRY, rtol=0, atol=1e-15)


def test_absent_domain_zero_rule_keeps_relative_weight_of_present_zero_excess():
    # Only domain 1 is present, with zero excess: every lambda is 0, nothing moves.
    w = D.DoReMiWeights(3, initial=[0.2, 0.3, 0.5])
    w.update(torch.ones(2, 4), torch.full((2, 4), 2.0), torch.tensor([1, 1]))
    np.testing.assert_allclose(w.alpha.numpy(), (1 - C) * np.array([0.2, 0.3, 0.5]) + C / 3, rtol=0, atol=1e-15)


def test_clipping_is_per_token_not_per_domain():
    # excess +1 and -1 in one domain: per-token clipping gives 0.5, a per-domain mean would give 0
    s, c = D.domain_excess_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([0]), 2)
    assert s.tolist() == [1.0, 0.0] and c.tolist() == [2.0, 0.0]
    # a proxy better than the reference everywhere leaves the uniform weights exactly uniform
    w = D.DoReMiWeights(3)
    w.update(torch.zeros(3, 5), torch.ones(3, 5), torch.tensor([0, 1, 2]))
    assert torch.equal(w.alpha, torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("c", [1e-3, 0.1])
def test_smoothing_floors_every_weight_at_c_over_k(c):
    w = D.DoReMiWeights(4, smoothing=c)
    # domain 0 is 500 nats worse than the reference: the softmax puts ~all mass on it
    proxy = torch.tensor([[501.0], [1.0], [1.0], [1.0]])
    w.update(proxy, torch.ones(4, 1), torch.arange(4))
    expected = np.array([1 - c + c / 4, c / 4, c / 4, c / 4])
    np.testing.assert_allclose(w.alpha.numpy(), expected, rtol=1e-12, atol=1e-300)
    assert float(w.alpha.sum()) == pytest.approx(1.0, abs=1e-15)


def test_eta_scales_the_step():
    w = D.DoReMiWeights(3, eta=0.5)
    proxy, ref, ids, mask = batch(STEP1)
    w.update(proxy, ref, ids, mask)
    np.testing.assert_allclose(w.alpha.numpy(), by_hand([1 / 3] * 3, [0.1875, 1, 0], eta=0.5), rtol=0, atol=1e-15)


def test_accumulated_micro_batches_equal_one_batch():
    proxy, ref, ids, mask = batch(STEP1)
    one = D.DoReMiWeights(3)
    one.update(proxy, ref, ids, mask)
    two = D.DoReMiWeights(3)
    two.accumulate(proxy[:2], ref[:2], ids[:2], mask[:2])
    two.accumulate(proxy[2:], ref[2:], ids[2:], mask[2:])
    two.step()
    assert torch.equal(one.alpha, two.alpha)


def random_step(w, g, k=4):
    B, T = 6, 5
    proxy = torch.rand(B, T, generator=g) * 3
    ref = torch.rand(B, T, generator=g) * 3
    ids = torch.randint(0, k, (B,), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    w.accumulate(proxy, ref, ids, mask)


def test_resume_is_bitwise():
    g = torch.Generator().manual_seed(0)
    full = D.DoReMiWeights(["w", "x", "y", "z"])
    states = []
    for t in range(6):
        random_step(full, g)
        if t == 2:  # save with a micro-batch pending, mid-step
            buf = io.BytesIO()
            torch.save(full.state_dict(), buf)
            states.append(buf.getvalue())
        full.step()
    g = torch.Generator().manual_seed(0)
    resumed = D.DoReMiWeights(["w", "x", "y", "z"])
    scratch = D.DoReMiWeights(["w", "x", "y", "z"])
    for t in range(3):
        random_step(scratch, g)  # replay the generator up to the saved point
    resumed.load_state_dict(torch.load(io.BytesIO(states[0]), weights_only=True))
    resumed.step()
    for t in range(3, 6):
        random_step(resumed, g)
        resumed.step()
    assert resumed.steps == full.steps == 6
    for name in ("alpha", "weight_sum", "last_excess"):
        assert torch.equal(getattr(resumed, name), getattr(full, name)), name
    assert torch.equal(resumed.average, full.average)


def test_state_mismatch_and_bad_input_raise():
    w = D.DoReMiWeights(["a", "b"])
    with pytest.raises(ChameleonUserError, match="domains"):
        D.DoReMiWeights(["a", "c"]).load_state_dict(w.state_dict())
    with pytest.raises(ChameleonUserError, match="eta"):
        D.DoReMiWeights(["a", "b"], eta=2.0).load_state_dict(w.state_dict())
    with pytest.raises(ChameleonUserError, match=r"domain_ids must lie in \[0, 2\)"):
        w.accumulate(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ChameleonUserError, match=r"domain_ids must be \[B\] = \[2\]"):
        w.accumulate(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0]))
    with pytest.raises(ChameleonUserError, match="mask must be"):
        w.accumulate(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0, 1]), torch.ones(2, 2, dtype=torch.bool))
    w.accumulate(torch.full((1, 2), float("nan")), torch.ones(1, 2), torch.tensor([0]))
    with pytest.raises(ChameleonUserError, match=r"domain\(s\) \['a'\] hold NaN"):
        w.step()
    assert w.steps == 0 and torch.equal(w.alpha, torch.full((2,), 0.5, dtype=torch.float64))
    # a NaN at a masked position is ignored
    w.update(torch.tensor([[1.5, float("nan")]]), torch.ones(1, 2), torch.tensor([1]),
             torch.tensor([[True, False]]))
    assert w.last_excess.tolist() == [0.0, 0.5]
    with pytest.raises(ChameleonUserError, match="initial"):
        D.DoReMiWeights(2, initial=[1.0, 0.0])
    with pytest.raises(ChameleonUserError, match="eta"):
        D.DoReMiWeights(2, eta=0)
    with pytest.raises(ChameleonUserError, match="no step"):
        D.DoReMiWeights(2).average


# ------------------------------------------------------------------------------------------
# the proxy's loss


def test_dro_loss_domain_reduction_by_hand():
    losses = torch.tensor([[1.0, 3.0], [2.0, 2.0], [4.0, 8.0]], requires_grad=True)
    ids = torch.tensor([0, 0, 2])  # domain 1 absent
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    alpha = [0.5, 0.3, 0.2]
    # L_0 = (1 + 3 + 2) / 3 = 2, L_2 = 6; present weights 0.5, 0.2 renormalised
    loss = D.dro_loss(losses, ids, alpha, mask)
    assert loss.item() == pytest.approx((0.5 * 2 + 0.2 * 6) / 0.7, abs=1e-6)
    loss.backward()
    g = np.zeros((3, 2))
    g[0] = g[1, 0] = 0.5 / 0.7 / 3
    g[2] = 0.2 / 0.7 / 2
    np.testing.assert_allclose(losses.grad.numpy(), g, rtol=1e-6, atol=1e-7)
    # all present: exactly sum_i alpha_i L_i
    ids_all = torch.tensor([0, 1, 2])
    full = D.dro_loss(losses.detach(), ids_all, alpha, mask)
    assert float(full) == pytest.approx(0.5 * 2 + 0.3 * 2 + 0.2 * 6, abs=1e-6)


def test_dro_loss_token_reduction_by_hand():
    losses = torch.tensor([[1.0, 3.0], [2.0, 2.0], [4.0, 8.0]])
    ids = torch.tensor([0, 1, 2])
    alpha = [0.5, 0.3, 0.2]
    num = 0.5 * (1 + 3) + 0.3 * (2 + 2) + 0.2 * (4 + 8)
    assert float(D.dro_loss(losses, ids, alpha, reduction="token")) == pytest.approx(num / 2.0, abs=1e-6)
    # uniform alpha: the plain mean token loss
    uniform = D.dro_loss(losses, ids, [1 / 3] * 3, reduction="token")
    assert float(uniform) == pytest.approx(losses.mean().item(), abs=1e-6)


def test_per_token_loss_matches_the_models_mean_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 11, generator=g)
    y = torch.randint(0, 11, (3, 7), generator=g)
    y[1, 4:] = -1
    losses, mask = D.per_token_loss(logits, y)
    assert losses.shape == (3, 7) and mask.sum() == 21 - 3
    assert float(losses[mask].mean()) == pytest.approx(float(next_token_loss(logits, y)), abs=1e-6)
    ref = -torch.log_softmax(logits.double(), -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    np.testing.assert_allclose(losses[mask].numpy(), ref[mask].numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# the per-micro-batch objective with real models


def tiny(seed):
    return GPT(GPTConfig(vocab_size=17, n_layer=1, n_head=2, n_embd=16, block_size=8), seed=seed)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_objective_matches_a_manual_loop(grad_accum):
    reference, proxy, proxy2 = tiny(0), tiny(1), tiny(1)
    obj = D.DoReMiObjective(reference, D.DoReMiWeights(3), grad_accum=grad_accum)
    manual = D.DoReMiWeights(3)
    assert not any(p.requires_grad for p in reference.parameters())
    g = torch.Generator().manual_seed(2)
    for call in range(4):
        x = torch.randint(0, 17, (4, 8), generator=g)
        y = torch.randint(0, 17, (4, 8), generator=g)
        ids = torch.randint(0, 3, (4,), generator=g)
        logits, _ = proxy(x)
        loss = obj(x, y, ids, logits)
        # manual: the same steps by hand
        with torch.no_grad():
            lp, _ = D.per_token_loss(proxy2(x)[0], y)
            lr, _ = D.per_token_loss(reference(x)[0], y)
        manual.accumulate(lp, lr, ids)
        if (call + 1) % grad_accum == 0:
            manual.step()
        assert torch.equal(obj.weights.alpha, manual.alpha)
        assert loss.item() == pytest.approx(float(D.dro_loss(lp, ids, manual.alpha)), abs=1e-6)
        loss.backward()
        assert proxy.wte.weight.grad is not None and reference.wte.weight.grad is None
    assert obj.weights.steps == 4 // grad_accum
    assert obj.reference_tokens == 4 * 4 * 8
    state = obj.state_dict()
    again = D.DoReMiObjective(tiny(0), D.DoReMiWeights(3), grad_accum=grad_accum)
    again.load_state_dict(state)
    assert torch.equal(again.weights.weight_sum, obj.weights.weight_sum)
    assert again.reference_tokens == obj.reference_tokens


def test_drives_a_proxy_training_loop(tmp_path):
    """The integration the trainer will do: uniform batches from WeightedDomainSampler, the
    proxy's logits through the objective, backward, AdamW step."""
    from chameleon_ext.data.dataset import load_dataset
    from chameleon_ext.trainer import WeightedDomainSampler

    rng = np.random.default_rng(0)
    texts = {"repeat": "abcabcabc " * 300,
             "noise": "".join(chr(c) for c in rng.integers(33, 127, 3000)),
             "prose": "the cat sat on the mat and the dog sat on the log. " * 60}
    for name, text in texts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "d.txt").write_text(text)
    ds = load_dataset(tmp_path, cache_dir=tmp_path / ".cache")
    cfg = GPTConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=16, block_size=16)
    reference, proxy = GPT(cfg, seed=0), GPT(cfg, seed=1)
    obj = D.DoReMiObjective(reference, D.DoReMiWeights(ds.domains))
    opt = torch.optim.AdamW(proxy.parameters(), lr=1e-2)
    sampler = WeightedDomainSampler(ds, "uniform", 16, seed=0)
    for _ in range(5):
        x, y, ids = sampler.sample(6)
        loss = obj(x, y, ids, proxy(x)[0])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    res = obj.weights.result()
    assert res.steps == 5 and list(res.weights) == ds.domains
    assert sum(res.weights.values()) == pytest.approx(1.0, abs=1e-12)
    assert min(res.weights.values()) >= C / 3
    assert obj.reference_tokens == 5 * 6 * 16


@pytest.mark.parametrize("reduction", D.REDUCTIONS)
def test_dro_loss_ignores_nan_at_masked_positions(reduction):
    losses = torch.tensor([[1.0, float("nan")], [2.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, True]])
    loss = D.dro_loss(losses, torch.tensor([0, 1]), [0.25, 0.75], mask, reduction=reduction)
    loss.backward()
    expected = 0.25 * 1 + 0.75 * 3 if reduction == "domain" else (0.25 * 1 + 0.75 * 6) / (0.25 + 1.5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert torch.isfinite(losses.grad).all() and losses.grad[0, 1] == 0
