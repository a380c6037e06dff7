"""export-model (chameleon_ext.hf_export): transformers loads the folder with logits equal to the
project's model, the byte tokenizer gives the same ids, and what GPT-2 cannot express is refused."""

import json
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from chameleon_ext.data.tokenizer import ByteTokenizer  # noqa: E402
from chameleon_ext.errors import ChameleonUserError  # noqa: E402
from chameleon_ext.hf_export import export_hf  # noqa: E402
from chameleon_ext.model import GPT, GPTConfig, load_hf_model, save_model  # noqa: E402


def random_gpt(seed=0, n_layer=2, n_head=2, n_embd=64, vocab_size=257, block_size=32):
    """A tiny GPT with every parameter random (biases and LayerNorms too), so a transposed or
    misplaced tensor cannot hide behind zeros and ones."""
    model = GPT(GPTConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                          block_size=block_size), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).float().eval()


@pytest.mark.parametrize("shape", [dict(), dict(n_layer=3, n_head=4, n_embd=32, block_size=17)])
def test_transformers_logits_match(tmp_path, shape):
    model = random_gpt(**shape)
    info = export_hf(model, tmp_path / "hf")
    assert info["max_logit_diff"] is not None and info["max_logit_diff"] <= 1e-5
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                                   "tokenizer.json", "tokenizer_config.json"]
    hf = load(tmp_path / "hf")
    assert type(hf).__name__ == "GPT2LMHeadModel"
    T = model.config.block_size
    idx = torch.randint(0, 257, (3, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(idx)[0]
        got = hf(input_ids=idx).logits
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())
    # The tie survives the round trip, and the weights are the model's, not a re-initialisation.
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert torch.equal(hf.transformer.wte.weight, model.wte.weight)


def test_hidden_states_match_through_the_projects_hf_adapter(tmp_path):
    model = random_gpt(seed=3)
    export_hf(model, tmp_path / "hf")
    adapter = load_hf_model(tmp_path / "hf")
    idx = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(1))
    for layer in range(model.n_layer + 1):
        with torch.no_grad():
            assert torch.allclose(adapter.hidden_states(idx, layer), model.hidden_states(idx, layer), atol=1e-5)


def test_export_from_model_file(tmp_path):
    model = random_gpt(seed=7)
    save_model(tmp_path / "model.pt", model)
    export_hf(str(tmp_path / "model.pt"), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["n_positions"], cfg["vocab_size"]) == (2, 2, 64, 32, 257)
    assert cfg["activation_function"] == "gelu_new" and cfg["tie_word_embeddings"] is True
    assert cfg["eos_token_id"] == 256
    idx = torch.randint(0, 257, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(load(tmp_path / "hf")(input_ids=idx).logits, model(idx)[0], atol=1e-5)


TEXTS = ["hello world", "  two  spaces\nand\ttabs\r\n", "naïve café — ünïcödé, 日本語, emoji 🦎🎉",
         "literal <|endoftext|> stays bytes", "", "\x00\x01 control \x7f", "Ġ looks like a byte symbol"]


def test_byte_tokenizer_gives_the_same_ids(tmp_path):
    export_hf(random_gpt(), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ours = ByteTokenizer()
    assert tok.eos_token_id == ours.eos_id == 256 and len(tok) == 257
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text), text
        assert tok.decode(ids) == text
    assert tok.decode([104, 105, 256], skip_special_tokens=True) == "hi"


def test_hf_tokenizer_folder_is_re_saved(tmp_path):
    export_hf(random_gpt(), tmp_path / "first")  # its tokenizer files make a Hugging Face tokenizer folder
    export_hf(random_gpt(seed=4), tmp_path / "second", tokenizer=str(tmp_path / "first"))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "second", local_files_only=True)
    assert tok.encode("héllo", add_special_tokens=False) == list("héllo".encode())
    assert json.loads((tmp_path / "second" / "config.json").read_text())["eos_token_id"] == 256


# -- refusals --------------------------------------------------------------------------------


@dataclass
class RotaryConfig(GPTConfig):
    rotary: bool = True  # a field GPT-2's config has no place for


def test_unknown_config_field_is_refused(tmp_path):
    model = GPT(RotaryConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=16, block_size=8))
    with pytest.raises(ChameleonUserError, match=r"cannot express \(rotary=True\)"):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_untied_head_is_refused(tmp_path):
    model = random_gpt()
    model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    with pytest.raises(ChameleonUserError, match="not tied"):
        export_hf(model, tmp_path / "hf")


def test_other_layer_norm_is_refused(tmp_path):
    model = random_gpt()
    model.blocks[1].ln_2.eps = 1e-6
    with pytest.raises(ChameleonUserError, match=r"blocks.1.ln_2 is LayerNorm\(eps=1e-06"):
        export_hf(model, tmp_path / "hf")


def test_extra_parameter_is_refused(tmp_path):
    model = random_gpt()
    model.blocks[0].attn.register_parameter("q_norm", nn.Parameter(torch.ones(64)))
    with pytest.raises(ChameleonUserError, match=r"unexpected \['blocks.0.attn.q_norm'\]"):
        export_hf(model, tmp_path / "hf")


def test_verification_catches_a_wrong_mapping(tmp_path, monkeypatch):
    import chameleon_ext.hf_export as hx

    real = hx.gpt2_config
    monkeypatch.setattr(hx, "gpt2_config", lambda m, e: {**real(m, e), "scale_attn_weights": False})
    with pytest.raises(ChameleonUserError, match="logits up to .* away"):
        export_hf(random_gpt(), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_vocab_too_small_for_byte_tokenizer(tmp_path):
    with pytest.raises(ChameleonUserError, match="vocab_size 100, the byte tokenizer needs 257"):
        export_hf(random_gpt(vocab_size=100), tmp_path / "hf")


def test_not_a_gpt_and_foreign_folder(tmp_path):
    with pytest.raises(ChameleonUserError, match="expected a chameleon_ext GPT"):
        export_hf(nn.Linear(2, 2), tmp_path / "hf")
    with pytest.raises(ChameleonUserError, match="does not exist"):
        export_hf(str(tmp_path / "missing.pt"), tmp_path / "hf")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ChameleonUserError, match=r"holds other files \(\['pytorch_model.bin'\]\)"):
        export_hf(random_gpt(), tmp_path / "busy")


def test_re_export_into_the_same_folder(tmp_path):
    export_hf(random_gpt(seed=1), tmp_path / "hf")
    model = random_gpt(seed=2)
    export_hf(model, tmp_path / "hf")
    idx = torch.arange(32).view(1, 32)
    with torch.no_grad():
        assert torch.allclose(load(tmp_path / "hf")(input_ids=idx).logits, model(idx)[0], atol=1e-5)
