"""GPT model: HF-convention hidden states, early stopping, causality, init, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.model import (
    GPT,
    GPTConfig,
    load_hf_model,
    load_model,
    save_model,
    state_dict_sha256,
)


def _tiny(n_layer=3, seed=0, **kw):
    cfg = GPTConfig(vocab_size=61, n_layer=n_layer, n_head=2, n_embd=16, block_size=12, **kw)
    model = GPT(cfg, seed=seed)
    # Non-trivial LayerNorm and bias values so the manual recomputation checks them too.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _ids(B=3, T=12, V=61, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _manual_hidden_states(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """Independent re-computation of Hugging Face's ``output_hidden_states`` tuple.

    Uses only the raw parameters and explicit math (softmax attention with a -inf causal
    mask, tanh GELU), not the model's modules or SDPA.
    """
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    B, T = idx.shape
    H, nh = cfg.n_embd, cfg.n_head
    hd = H // nh

    def ln(x, prefix):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    def lin(x, prefix, bias=True):
        y = x @ sd[prefix + ".weight"].T
        return y + sd[prefix + ".bias"] if bias else y

    x = sd["wte.weight"][idx] + sd["wpe.weight"][torch.arange(T)]
    states = [x]
    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg.n_layer):
        p = f"blocks.{i}"
        h = ln(x, p + ".ln_1")
        q, k, v = lin(h, p + ".attn.c_attn").split(H, dim=-1)
        q, k, v = (t.reshape(B, T, nh, hd).permute(0, 2, 1, 3) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1)
        y = (att @ v).permute(0, 2, 1, 3).reshape(B, T, H)
        x = x + lin(y, p + ".attn.c_proj")
        h = lin(ln(x, p + ".ln_2"), p + ".mlp.c_fc")
        gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        x = x + lin(gelu, p + ".mlp.c_proj")
        states.append(x)
    states[-1] = ln(x, "ln_f")  # HF applies the final LayerNorm to the last entry
    logits = states[-1] @ sd["wte.weight"].T  # tied output embedding
    return states, logits


@pytest.mark.parametrize("n_layer", [1, 2, 3])
def test_hidden_states_match_hf_convention(n_layer):
    model = _tiny(n_layer)
    idx = _ids()
    states, logits = _manual_hidden_states(model, idx)
    assert len(states) == n_layer + 1
    with torch.no_grad():
        for layer in range(n_layer + 1):
            got = model.hidden_states(idx, layer)
            assert got.shape == (3, 12, 16)
            torch.testing.assert_close(got.double(), states[layer], atol=2e-5, rtol=1e-4)
        out, loss = model(idx)
        assert loss is None
        torch.testing.assert_close(out.double(), logits, atol=2e-5, rtol=1e-4)


def test_default_embedding_layer_matches_reference_arithmetic():
    for n_layer in range(1, 13):
        model_layer = (n_layer + 1) // 2
        hf_len = n_layer + 1  # len(outputs.hidden_states)
        assert model_layer == hf_len // 2
    assert _tiny(1).default_embedding_layer == 1
    assert _tiny(3).default_embedding_layer == 2  # 3 + 1 = 4 entries -> index 2
    assert GPT(GPTConfig.preset("tiny", 61, 8)).default_embedding_layer == 1
    proxy = GPTConfig.preset("proxy", 61, 8)
    assert (proxy.n_layer + 1) // 2 == 3
    with torch.no_grad():
        m = _tiny(3)
        idx = _ids()
        torch.testing.assert_close(m.hidden_states(idx), m.hidden_states(idx, 2))


def test_hidden_states_runs_only_blocks_up_to_layer():
    model = _tiny(3)
    idx = _ids()

    def forbid(name):
        def hook(*_):
            raise AssertionError(f"{name} ran past the requested layer")
        return hook

    for layer in range(3):
        handles = [b.register_forward_pre_hook(forbid(f"block {i + 1}"))
                   for i, b in enumerate(model.blocks) if i >= layer]
        handles.append(model.ln_f.register_forward_pre_hook(forbid("ln_f")))
        handles.append(model.lm_head.register_forward_pre_hook(forbid("lm_head")))
        ran = []
        handles += [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
                    for i, b in enumerate(model.blocks) if i < layer]
        try:
            with torch.no_grad():
                model.hidden_states(idx, layer)
        finally:
            for h in handles:
                h.remove()
        assert ran == list(range(layer))


def test_attention_mask_right_and_left_padding():
    model = _tiny(2)
    idx = _ids(B=2, T=10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 7:] = 0  # right padding
    with torch.no_grad():
        full = model.hidden_states(idx, 2)
        masked = model.hidden_states(idx, 2, attention_mask=mask)
        torch.testing.assert_close(masked[0, :7], full[0, :7])  # causal: pads never seen
        torch.testing.assert_close(masked[1], full[1])
        left = torch.ones(2, 10, dtype=torch.long)
        left[0, :3] = 0
        out = model.hidden_states(idx, 2, attention_mask=left)
        assert torch.isfinite(out).all()  # fully padded query rows do not produce NaN
        # real tokens after left padding ignore the padded keys: changing the padded tokens
        # does not change the real tokens' states (positions are not shifted, as in HF GPT-2)
        ref = model.hidden_states(idx[:1], 2, attention_mask=left[:1])
        idx2 = idx.clone()
        idx2[0, :3] = (idx2[0, :3] + 1) % 61
        ref2 = model.hidden_states(idx2[:1], 2, attention_mask=left[:1])
        torch.testing.assert_close(ref[0, 3:], ref2[0, 3:])
        assert not torch.allclose(ref[0, :3], ref2[0, :3])
    with pytest.raises(ChameleonUserError, match="attention_mask"):
        model.hidden_states(idx, 1, attention_mask=mask[:, :5])


def test_causal_future_tokens_do_not_change_past_logits():
    model = _tiny(2)
    idx = _ids(B=2, T=12)
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % 61
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_forward_loss_and_shapes():
    model = _tiny(2)
    idx = _ids(B=2, T=12)
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert logits.shape == (2, 11, 61)
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert model.wte.weight.grad is not None
    assert model.lm_head.weight is model.wte.weight  # tied


def test_seeded_init_and_global_rng_untouched():
    cfg = GPTConfig.preset("tiny", 257, 32)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = GPT(cfg, seed=0), GPT(cfg, seed=0), GPT(cfg, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert a.content_hash == b.content_hash != c.content_hash
    w = a.blocks[0].mlp.c_fc.weight.detach()
    assert abs(float(w.std()) - 0.02) < 0.003
    assert float(a.blocks[0].ln_1.weight.detach().min()) == 1.0
    assert float(a.blocks[0].attn.c_attn.bias.detach().abs().max()) == 0.0
    resid = a.blocks[0].attn.c_proj.weight.detach().std()
    assert float(resid) < 0.02 / math.sqrt(2 * cfg.n_layer) * 1.2


def test_presets_and_config_validation():
    shapes = {n: (c.n_layer, c.n_embd, c.n_head) for n in GPTConfig.preset_names()
              for c in [GPTConfig.preset(n, 257, 64)]}
    assert shapes == {"tiny": (2, 64, 2), "small": (4, 128, 4), "proxy": (6, 768, 12),
                      "base": (12, 768, 12)}
    with pytest.raises(ChameleonUserError, match="preset"):
        GPTConfig.preset("huge", 257, 64)
    with pytest.raises(ChameleonUserError, match="n_head"):
        GPTConfig(vocab_size=10, n_layer=1, n_head=3, n_embd=16, block_size=8)
    with pytest.raises(ChameleonUserError, match="block_size"):
        GPTConfig(vocab_size=10, n_layer=1, n_head=2, n_embd=16, block_size=0)
    model = _tiny(2)
    with pytest.raises(ChameleonUserError, match="layer"):
        model.hidden_states(_ids(), 3)
    with pytest.raises(ChameleonUserError, match="layer"):
        model.hidden_states(_ids(), -1)
    with pytest.raises(ChameleonUserError, match="block_size"):
        model(_ids(T=13))


def test_save_load_roundtrip_and_content_hash(tmp_path):
    model = _tiny(2, seed=3)
    path = tmp_path / "m" / "model.pt"
    digest = save_model(path, model)
    assert digest == model.content_hash == state_dict_sha256(model.state_dict())
    loaded = load_model(path)
    assert loaded.content_hash == digest
    assert loaded.config == model.config
    idx = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=0, rtol=0)
    assert loaded.lm_head.weight is loaded.wte.weight
    # the hash changes when any parameter changes
    with torch.no_grad():
        loaded.ln_f.bias[0] += 1e-3
    assert loaded.content_hash != digest
    # tampered file: stored hash no longer matches the weights
    obj = torch.load(path, weights_only=True)
    obj["state_dict"]["ln_f.bias"] = obj["state_dict"]["ln_f.bias"] + 1
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(ChameleonUserError, match="corrupted"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(ChameleonUserError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ChameleonUserError, match="cannot be read"):
        load_model(tmp_path / "junk.pt")


def test_load_hf_model_errors(tmp_path):
    with pytest.raises(ChameleonUserError, match="not a folder"):
        load_hf_model(tmp_path / "missing")
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ChameleonUserError, match="transformers"):
            load_hf_model(tmp_path)


def _write_model_file(path, config, state_dict, with_hash=True):
    obj = {"format": "chameleon_ext.gpt/1", "config": config, "state_dict": state_dict}
    if with_hash and isinstance(state_dict, dict):
        obj["sha256"] = state_dict_sha256(state_dict)
    torch.save(obj, path)
    return str(path)


def _malformed(model):
    cfg, sd = model.config.to_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    shrunk = dict(sd, **{"blocks.0.attn.c_attn.weight": sd["blocks.0.attn.c_attn.weight"][:-1]})
    nan = dict(sd)
    nan["blocks.1.mlp.c_fc.weight"] = sd["blocks.1.mlp.c_fc.weight"].clone()
    nan["blocks.1.mlp.c_fc.weight"][2, 3] = float("nan")
    missing = {k: v for k, v in sd.items() if k != "ln_f.bias"}
    return {
        "config None": (None, sd, "its config is NoneType"),
        "config missing a field": ({k: v for k, v in cfg.items() if k != "n_head"}, sd, "bad config"),
        "config with a bad value": (dict(cfg, n_layer=0), sd, "GPTConfig.n_layer"),
        "a list for a state dict": (cfg, list(sd.values()), "its weights are a list"),
        "wrong shape": (cfg, shrunk, "'blocks.0.attn.c_attn.weight' has shape"),
        "missing key": (cfg, missing, "missing weights ['ln_f.bias']"),
        "unexpected key": (cfg, dict(sd, extra=torch.zeros(1)), "unexpected weights ['extra']"),
        "NaN in a used weight": (cfg, nan, "'blocks.1.mlp.c_fc.weight' holds NaN"),
    }


@pytest.mark.parametrize("case", list(_malformed(_tiny())))
def test_malformed_model_files_name_the_file_and_fault(tmp_path, case):
    cfg, sd, fault = _malformed(_tiny())[case]
    path = _write_model_file(tmp_path / "m.pt", cfg, sd)
    with pytest.raises(ChameleonUserError) as ei:
        load_model(path)
    msg = str(ei.value)
    assert path in msg and fault in msg and "\n" not in msg


def test_hidden_module_output_is_hidden_states_at_that_layer():
    model = _tiny(n_layer=3)
    idx = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    for layer in range(4):
        seen = []
        h = model.hidden_module(layer).register_forward_hook(lambda m, a, out: seen.append(out))
        model(idx)
        h.remove()
        torch.testing.assert_close(seen[0], model.hidden_states(idx, layer), rtol=0, atol=0)
    with pytest.raises(ChameleonUserError, match="layer"):
        model.hidden_module(4)
