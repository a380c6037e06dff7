"""Hugging Face proxies and tokenizers from local folders (transformers is optional for
users; the test requirements install it).

A tiny random GPT-2 (transformers) with a byte-level BPE tokenizer trained here (the
``tokenizers`` library), saved like any Hugging Face checkpoint, is the proxy. Checked:
the tokenizer comes from the proxy folder, every mismatch is an error naming both sides,
the forward pass stopped at the pooled layer equals the full forward's hidden state there,
and the weights equal a plain re-implementation of the reference pipeline (transformers
calls as the reference makes them) on the same windows.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")

from python_tests.reference_pipeline import hf_reference_embeddings, reference_weights_numpy  # noqa: E402
from chameleon_ext.cli import main  # noqa: E402
from chameleon_ext.data import load_dataset  # noqa: E402
from chameleon_ext.data.tokenizer import HFTokenizer, tokenizer_record  # noqa: E402
from chameleon_ext.embed import EmbedConfig, embed_domains, window_starts  # noqa: E402
from chameleon_ext.errors import ChameleonUserError  # noqa: E402
from chameleon_ext.model import GPT, GPTConfig, save_model  # noqa: E402
from chameleon_ext.pipeline import load_proxy, load_proxy_and_tokenizer, weights_for_domains  # noqa: E402

from .factories import perturb_vectors_  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = "<|endoftext|>"
TEXTS = {
    "prose": "the cat sat on the mat and the dog sat on the log . " * 40,
    "numbers": " ".join(str(i * 37 % 1000) for i in range(600)),
    "code": "def f ( x ) : return x + 1 ; " * 60,
    "accents": "café naïve déjà vu über straße " * 50,
}
N_LAYER = 3
WINDOW = 24


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_data")
    for name, text in TEXTS.items():
        os.makedirs(root / name)
        # several documents per domain, so windows cross EOS boundaries
        half = len(text) // 2
        for j, part in enumerate(text.split(" . ") if name == "prose" else [text[:half], text[half:]]):
            (root / name / f"doc{j}.txt").write_text(part, encoding="utf-8")
    return str(root)


def _bpe(texts, vocab_size=300):
    """A byte-level BPE tokenizer (GPT-2's kind) trained on ``texts``, as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def _gpt2(vocab, n_layer=N_LAYER, seed=0):
    """A random GPT-2 whose biases and LayerNorm gains are perturbed, so hidden states are O(1)
    and differ between domains and layers (a fresh init is nearly constant)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=n_layer, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    return perturb_vectors_(model, seed)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{"full": model + tokenizer, "model_only": model, "tok": tokenizer, "other_tok": another BPE}."""
    root = tmp_path_factory.mktemp("hf_models")
    tok = _bpe(TEXTS.values())
    assert tok.convert_tokens_to_ids(EOS) == 0
    model = _gpt2(len(tok))
    dirs = {k: str(root / k) for k in ("full", "model_only", "tok", "other_tok")}
    model.save_pretrained(dirs["full"])
    tok.save_pretrained(dirs["full"])
    model.save_pretrained(dirs["model_only"])
    tok.save_pretrained(dirs["tok"])
    _bpe(reversed(list(TEXTS.values())), vocab_size=280).save_pretrained(dirs["other_tok"])
    return dirs


def _cli(*argv):
    return main([str(a) for a in argv])


# --------------------------------------------------------------------------- the tokenizer


def test_tokenizer_comes_from_the_proxy_folder(hf_dirs, data_root, tmp_path):
    proxy, tok = load_proxy_and_tokenizer(hf_dirs["full"])
    assert isinstance(tok, HFTokenizer) and tok.path == hf_dirs["full"]
    fast = transformers.AutoTokenizer.from_pretrained(hf_dirs["full"])
    ds = load_dataset(data_root, tokenizer=tok, cache_dir=str(tmp_path / "c"), val_fraction=0.0)
    half = TEXTS["numbers"][: len(TEXTS["numbers"]) // 2]
    # Cut at a space: the last token of a prefix cut mid-word need not be a token of the whole text.
    expected = fast.encode(half[: half.rfind(" ")], add_special_tokens=False)[:-1]
    assert np.asarray(ds.train_tokens("numbers"))[: len(expected)].tolist() == expected
    assert proxy.tokenizer_record == tokenizer_record(tok)

    # the CLI: no --tokenizer means the folder's tokenizer; the same numbers as naming it
    common = ["--data", data_root, "--proxy", hf_dirs["full"], "--n-windows", 4, "--window", WINDOW,
              "--device", "cpu", "--quiet", "--cache-dir", tmp_path / "cache"]
    assert _cli("embed", *common, "--out", tmp_path / "a") == 0
    assert _cli("embed", *common, "--tokenizer", hf_dirs["tok"], "--out", tmp_path / "b") == 0
    a = torch.load(tmp_path / "a" / "domain_embeddings.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "domain_embeddings.pt", weights_only=True)
    assert torch.equal(a["embeddings"], b["embeddings"])
    assert a["settings"]["tokenizer_sha256"] == tok.content_hash
    # embedding the byte-tokenised data with this proxy (the old silent failure) is refused
    byte_ds = load_dataset(data_root, cache_dir=str(tmp_path / "c2"))
    with pytest.raises(ChameleonUserError, match=r"tokenizer mismatch.*'byte'"):
        embed_domains(proxy, byte_ds, EmbedConfig(n_windows=2, window=WINDOW), device="cpu")


def test_model_only_folder_needs_a_tokenizer(hf_dirs, data_root, tmp_path, capsys):
    with pytest.raises(ChameleonUserError, match="holds no tokenizer files.*--tokenizer"):
        load_proxy_and_tokenizer(hf_dirs["model_only"])
    out = ["--data", data_root, "--device", "cpu", "--quiet", "--n-windows", 2, "--window", WINDOW,
           "--cache-dir", tmp_path / "cache", "--out", tmp_path / "w"]
    assert _cli("weights", "--proxy", hf_dirs["model_only"], *out) == 2
    assert "holds no tokenizer files" in capsys.readouterr().err
    # a model-only folder given as the tokenizer: said so, not "domain ... is empty"
    assert _cli("weights", "--proxy", hf_dirs["full"], "--tokenizer", hf_dirs["model_only"], *out) == 2
    assert "holds no tokenizer files" in capsys.readouterr().err
    # with --tokenizer the model-only folder works, and gives the full folder's weights
    assert _cli("weights", "--proxy", hf_dirs["model_only"], "--tokenizer", hf_dirs["tok"], *out, "--no-plots") == 0
    assert _cli("weights", "--proxy", hf_dirs["full"], *out[:-1], tmp_path / "w2", "--no-plots") == 0
    w1 = torch.load(tmp_path / "w" / "domain_embeddings.pt", weights_only=True)["embeddings"]
    w2 = torch.load(tmp_path / "w2" / "domain_embeddings.pt", weights_only=True)["embeddings"]
    assert torch.equal(w1, w2)


def test_tokenizer_without_a_vocabulary_is_explained(tmp_path):
    from tokenizers import Tokenizer, models

    empty = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab={}, unk_token=None)))
    empty.save_pretrained(str(tmp_path / "empty_tok"))
    with pytest.raises(ChameleonUserError, match=r"has 0 token\(s\).*no vocabulary"):
        HFTokenizer(str(tmp_path / "empty_tok"))


def test_a_file_inside_the_hf_folder_suggests_the_folder(hf_dirs):
    for f in ("model.safetensors", "config.json"):
        with pytest.raises(ChameleonUserError, match=f"pass its folder instead: --proxy {hf_dirs['full']}"):
            load_proxy(os.path.join(hf_dirs["full"], f))


def test_chameleon_proxy_records_its_tokenizer(hf_dirs, data_root, tmp_path, capsys):
    tok = HFTokenizer(hf_dirs["tok"])
    ds = load_dataset(data_root, tokenizer=tok, cache_dir=str(tmp_path / "c"))
    gpt = GPT(GPTConfig.preset("tiny", ds.vocab_size, 32), seed=0)
    folder = tmp_path / "proxy"
    save_model(str(folder / "model.pt"), gpt, tokenizer=ds.tokenizer_record())

    # a folder holding model.pt (what train-proxy writes) is that model, not a HF folder
    proxy, got = load_proxy_and_tokenizer(str(folder))
    assert isinstance(proxy, GPT) and isinstance(got, HFTokenizer) and got.content_hash == tok.content_hash
    assert proxy.tokenizer_record["name"] == os.path.abspath(hf_dirs["tok"])
    # another tokenizer is an error naming both
    for other in ("byte", hf_dirs["other_tok"]):
        with pytest.raises(ChameleonUserError, match="tokenizer mismatch") as err:
            load_proxy_and_tokenizer(str(folder), other)
        assert os.path.abspath(hf_dirs["tok"]) in str(err.value) and str(other) in str(err.value)
    out = ["--data", data_root, "--device", "cpu", "--quiet", "--n-windows", 2, "--window", 16,
           "--cache-dir", tmp_path / "cache", "--out", tmp_path / "e"]
    assert _cli("embed", "--proxy", folder, "--tokenizer", "byte", *out) == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and "'byte'" in err and hf_dirs["tok"] in err
    assert _cli("embed", "--proxy", folder, *out) == 0  # the recorded tokenizer, found by itself
    assert _cli("eval", "--model", folder, "--tokenizer", "byte", "--data", data_root, "--quiet",
                "--cache-dir", tmp_path / "cache", "--block-size", 16, "--eval-windows", 2) == 2
    assert "tokenizer mismatch" in capsys.readouterr().err


# --------------------------------------------------------------------------- the forward pass


def test_truncated_forward_equals_the_full_forward(hf_dirs):
    proxy = load_proxy(hf_dirs["full"])
    assert isinstance(proxy.hf, transformers.GPT2Model)  # the base model: no LM head
    assert proxy.n_layer == N_LAYER and proxy.default_embedding_layer == 2  # len(hidden_states) // 2 = 4 // 2
    full = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["full"]).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, proxy.config.vocab_size, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 15:] = 0  # right padding, as reference pooling makes
    mask[2, 7:] = 0
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(proxy.blocks)]
    try:
        for attention_mask in (None, mask):
            with torch.no_grad():
                states = full(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
                for layer in range(N_LAYER + 1):
                    ran.clear()
                    h = proxy.hidden_states(ids, layer, attention_mask=attention_mask)
                    torch.testing.assert_close(h, states[layer], rtol=1e-6, atol=1e-6)
                    # only the blocks before the pooled layer ran (all of them for the last)
                    assert ran == list(range(layer if layer < N_LAYER else N_LAYER))
    finally:
        for h in hooks:
            h.remove()
    with pytest.raises(ChameleonUserError, match="embeddings only"):
        proxy(ids)


def test_encoder_proxy_truncates_too(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=257, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(str(tmp_path / "bert"))
    proxy = load_proxy(str(tmp_path / "bert"))
    full = transformers.AutoModel.from_pretrained(str(tmp_path / "bert")).eval()
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = full(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in range(4):
            torch.testing.assert_close(proxy.hidden_states(ids, layer), states[layer], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- the weights


@pytest.mark.parametrize("pooling", ["reference", "masked"])
def test_weights_equal_a_plain_reference_pipeline(hf_dirs, data_root, tmp_path, pooling):
    proxy, tok = load_proxy_and_tokenizer(hf_dirs["full"])
    ds = load_dataset(data_root, tokenizer=tok, cache_dir=str(tmp_path / "c"))
    cfg = EmbedConfig(n_windows=6, window=WINDOW, batch_size=4, seed=3, pooling=pooling)
    emb = embed_domains(proxy, ds, cfg, device="cpu")
    assert emb.settings["precision"] == "fp32"
    starts = {n: window_starts(ds, n, cfg) for n in ds.domains}
    # The reference pipeline written plainly with transformers (python_tests/reference_pipeline.py):
    # decode, tokenizer(texts, padding=True, truncation=True), the FULL LM-head model with
    # output_hidden_states, hidden_states[len // 2].mean(dim=1) over the padded length, np.unique.
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["full"]).eval()
    fast = transformers.AutoTokenizer.from_pretrained(hf_dirs["full"])
    X = hf_reference_embeddings(model, fast, ds, starts, WINDOW, 4, pooling=pooling).embeddings
    w_pt, w_ft = reference_weights_numpy(X, "pretrain"), reference_weights_numpy(X, "finetune")
    np.testing.assert_allclose(emb.embeddings.numpy(), X, rtol=1e-5, atol=1e-6)
    # parity with the reference holds in the paper's mode (rule="paper"), not the library's default rule
    np.testing.assert_allclose(weights_for_domains(emb, "pretrain", rule="paper").weights.numpy(), w_pt,
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(weights_for_domains(emb, "finetune", rule="paper").weights.numpy(), w_ft,
                               rtol=0, atol=1e-6)
    assert not np.allclose(w_ft, 1 / len(w_ft), atol=1e-3)  # the check is not vacuous: weights differ


def test_cache_key_holds_the_transformers_version(hf_dirs, data_root, tmp_path, monkeypatch):
    proxy, tok = load_proxy_and_tokenizer(hf_dirs["full"])
    ds = load_dataset(data_root, tokenizer=tok, cache_dir=str(tmp_path / "c"))
    cfg = EmbedConfig(n_windows=2, window=WINDOW)
    first = embed_domains(proxy, ds, cfg, device="cpu", cache_dir=str(tmp_path / "emb"))
    assert first.settings["transformers"] == transformers.__version__
    assert embed_domains(proxy, ds, cfg, device="cpu", cache_dir=str(tmp_path / "emb")).computed == []
    # the module object chameleon_ext imports now (transformers can swap its lazy module)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.99.0")
    again = embed_domains(proxy, ds, cfg, device="cpu", cache_dir=str(tmp_path / "emb"))
    assert again.computed == ds.domains and torch.equal(again.embeddings, first.embeddings)


def test_quiet_silences_the_libraries(hf_dirs, data_root, tmp_path):
    argv = [sys.executable, "-m", "chameleon_ext", "embed", "--data", data_root, "--proxy", hf_dirs["model_only"],
            "--tokenizer", hf_dirs["tok"], "--n-windows", "2", "--window", str(WINDOW), "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache")]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    loud = subprocess.run(argv + ["--out", str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=300)
    quiet = subprocess.run(argv + ["--out", str(tmp_path / "b"), "--quiet"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "Loading weights" in loud.stderr  # transformers' bar: what --quiet must hide
    assert quiet.stderr == "", quiet.stderr
    assert "[embed]" not in quiet.stdout


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

    ds = load_dataset(data_root, tokenizer=str(tmp_path / "tok"), cache_dir=str(tmp_path / "cache"), val_fraction=0)
    prose = np.asarray(ds.train_tokens("prose"))
    assert prose.max() < hft.vocab_size
    expected = fast.encode(TEXTS["prose"].split(" . ")[0], add_special_tokens=False)
    assert prose[: len(expected)].tolist() == expected
    # Tokens from a different tokenizer get a different fingerprint (and so cache key).
    assert ds.fingerprint("prose") != load_dataset(data_root, cache_dir=str(tmp_path / "cache2")).fingerprint("prose")


def test_bad_hf_folders_are_user_errors(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ChameleonUserError, match="neither a chameleon_ext model.pt nor a Hugging Face"):
        load_proxy(str(tmp_path / "empty"))
    with pytest.raises(ChameleonUserError, match="holds no tokenizer files"):
        HFTokenizer(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ChameleonUserError, match="could not load a Hugging Face model"):
        load_proxy(str(tmp_path / "broken"))
