"""Hugging Face proxies and tokenizers from local folders (transformers is optional for
users; the test requirements install it). Tiny randomly initialised models, saved locally."""

import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")

from chameleon_ext.data import load_dataset  # noqa: E402
from chameleon_ext.data.tokenizer import HFTokenizer  # noqa: E402
from chameleon_ext.embed import EmbedConfig, embed_domains, window_starts  # noqa: E402
from chameleon_ext.errors import ChameleonUserError  # noqa: E402
from chameleon_ext.pipeline import load_proxy  # noqa: E402

TEXTS = {
    "prose": "the cat sat on the mat and the dog sat on the log . " * 40,
    "numbers": " ".join(str(i * 37 % 1000) for i in range(600)),
    "code": "def f ( x ) : return x + 1 ; " * 60,
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_data")
    for name, text in TEXTS.items():
        os.makedirs(root / name)
        (root / name / "doc.txt").write_text(text, encoding="utf-8")
    return str(root)


def _save_gpt2(path, n_layer=3):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=n_layer, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def test_hf_causal_lm_proxy_embeds_like_its_own_hidden_states(tmp_path, data_root):
    path = _save_gpt2(str(tmp_path / "gpt2"))
    proxy = load_proxy(path)
    assert proxy.n_layer == 3 and proxy.default_embedding_layer == 2  # len(hidden_states) // 2 = 4 // 2
    ds = load_dataset(data_root)
    cfg = EmbedConfig(n_windows=5, window=24, batch_size=2, seed=1)
    emb = embed_domains(proxy, ds, cfg, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    for i, name in enumerate(ds.domains):
        ids = torch.from_numpy(ds.windows_at(name, window_starts(ds, name, cfg), cfg.window))
        with torch.no_grad():
            h = hf(input_ids=ids, output_hidden_states=True).hidden_states[2]  # [n, l, H]
        torch.testing.assert_close(emb.embeddings[i], h.double().mean(1).mean(0), rtol=1e-5, atol=1e-6)
    # The content hash keys the cache: a changed model changes it.
    assert proxy.content_hash == load_proxy(path).content_hash
    assert proxy.content_hash != load_proxy(_save_gpt2(str(tmp_path / "gpt2b"), n_layer=2)).content_hash


def test_hf_encoder_proxy(tmp_path, data_root):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(str(tmp_path / "bert"))
    proxy = load_proxy(str(tmp_path / "bert"))
    emb = embed_domains(proxy, load_dataset(data_root), EmbedConfig(n_windows=3, window=16, batch_size=3), device="cpu")
    assert emb.embeddings.shape == (3, 32) and torch.isfinite(emb.embeddings).all()
    with pytest.raises(ChameleonUserError, match="encoder"):
        proxy(torch.zeros(1, 4, dtype=torch.long))


def test_hf_tokenizer_from_a_local_folder(tmp_path, data_root):
    model = tokenizers.models.WordLevel(unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"])
    tok.train_from_iterator(list(TEXTS.values()), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(str(tmp_path / "tok"))

    hft = HFTokenizer(str(tmp_path / "tok"))
    assert hft.vocab_size == len(fast) and hft.eos_id == fast.eos_token_id
    ids = hft.encode("the cat sat on the mat")
    assert ids == fast.encode("the cat sat on the mat", add_special_tokens=False)
    assert hft.decode(ids) == "the cat sat on the mat"

    ds = load_dataset(data_root, tokenizer=str(tmp_path / "tok"), cache_dir=str(tmp_path / "cache"))
    prose = np.asarray(ds.train_tokens("prose"))
    assert prose.max() < hft.vocab_size
    expected = fast.encode(TEXTS["prose"], add_special_tokens=False)
    assert prose.tolist() == expected[: len(prose)]
    # Tokens from a different tokenizer get a different fingerprint (and so cache key).
    assert ds.fingerprint("prose") != load_dataset(data_root, cache_dir=str(tmp_path / "cache2")).fingerprint("prose")


def test_bad_hf_folders_are_user_errors(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ChameleonUserError, match="could not load a Hugging Face"):
        load_proxy(str(tmp_path / "empty"))
    with pytest.raises(ChameleonUserError, match="tokenizer"):
        HFTokenizer(str(tmp_path / "empty"))
