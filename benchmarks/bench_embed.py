"""Domain-embedding extraction and the weights computation, ext against the reference's way.

``bench_embed_extraction`` times, on the same proxy, the same windows and the same machine:

* ``ext``                    -- ``embed_domains`` (clean method: blocks up to the middle layer
                                only, full windows, no padding, fused per-domain pooling);
* ``ext_reference_pooling``  -- ``embed_domains(pooling="reference")``, the parity mode;
* ``reference``              -- a faithful re-creation of the reference pipeline
                                (python_tests/reference_pipeline.py): windows decoded and
                                re-tokenised, right-padded batches, EVERY block plus the final
                                LayerNorm and the LM head with every hidden state kept (what
                                ``output_hidden_states=True`` costs), mean over the padding;
* ``reference_masked``       -- the same full forward with the clean pooling, which isolates
                                what early stopping and skipping padding save.

``extra_info["tokens_per_s"]`` is windows x window tokens per second of median time (the same
work unit for every provider). Each provider's domain weights are checked against its
counterpart with the same pooling (ext vs reference_masked, ext_reference_pooling vs
reference) to 1e-5 -- outside the timed region.

``bench_hf_embed_extraction`` times the same four providers with a Hugging Face GPT-2 proxy
(transformers, GPT-2's vocabulary of 50,257, a byte-level BPE tokenizer trained on the data)
saved to a folder and loaded as ``chameleon weights --proxy FOLDER`` loads it:

* ``ext`` / ``ext_reference_pooling`` -- ``embed_domains`` on ``load_proxy(FOLDER)``: the base
  model (no LM head), stopped at the middle layer by a hook;
* ``reference`` / ``reference_masked`` -- the reference pipeline written plainly with
  transformers (``hf_reference_embeddings``): ``GPT2LMHeadModel`` with
  ``output_hidden_states=True``, ``tokenizer(texts, padding=True, truncation=True)``.

``bench_weights`` times embeddings ``[k, d]`` -> Chameleon weights (``weights_from_embeddings``)
against the reference's NumPy computation (``np.linalg.inv``), for k = 1000 domains.

Smoke run (``--benchmark-disable``) uses QUICK_CASES / QUICK_WEIGHTS_CASES: seconds in all.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from python_tests.reference_pipeline import hf_reference_embeddings, reference_embeddings, reference_weights_numpy
from chameleon_ext import weights_from_embeddings
from chameleon_ext.data import load_dataset
from chameleon_ext.embed import EmbedConfig, embed_domains, window_starts
from chameleon_ext.model import GPT, GPTConfig
from python_tests.factories import CUDA

# (domains, windows per domain, window tokens = proxy block size, proxy layers, proxy width)
# (domains, windows per domain, window tokens, proxy layers, proxy width, proxy vocabulary):
# the byte-level proxy chameleon_ext trains by default, and the same shape with GPT-2's
# vocabulary, as the reference's GPT-2 proxy has (its LM head then dominates a full forward).
CASES = [(7, 16, 256, 6, 256, 257), (7, 16, 256, 6, 256, 50257)]
QUICK_CASES = [(3, 4, 32, 2, 32, 257)]
# The GPT-2-vocabulary case with a Hugging Face GPT-2 proxy (same fields).
HF_CASES = [(7, 16, 256, 6, 256, 50257)]
QUICK_HF_CASES = [(3, 4, 32, 2, 32, 50257)]
# (domains k, embedding width d) for the weights computation
WEIGHTS_CASES = [(1000, 768)]
QUICK_WEIGHTS_CASES = [(40, 64)]

DEVICE = "cuda" if CUDA else "cpu"
BATCH = 16  # windows per forward pass, for every provider
ROUNDS = 3  # timed rounds of the (slow) extraction benchmark, after one warm-up round
# ext runs bf16 autocast on CUDA, the re-creation fp32; on CPU both are fp32.
WEIGHT_TOL = 5e-3 if CUDA else 1e-5


def pytest_generate_tests(metafunc):
    """``weights_case`` follows the conftest's CASES / QUICK_CASES convention."""
    quick = bool(metafunc.config.getoption("benchmark_disable", default=False))
    for name, (full, small) in {"weights_case": (WEIGHTS_CASES, QUICK_WEIGHTS_CASES),
                                "hf_case": (HF_CASES, QUICK_HF_CASES)}.items():
        if name in metafunc.fixturenames:
            cases = small if quick else full
            metafunc.parametrize(name, cases, ids=[str(c).replace(" ", "") for c in cases])


# --------------------------------------------------------------------------- inputs

_LETTERS = [
    "etaoinshrdlu",  # English-like
    "0123456789 .,",  # numbers
    "ACGT",  # DNA
    "{}();=+-_abcdefxyz",  # code-like
    "éèàçôüößñ aeiou",  # accented text: multi-byte UTF-8
    "αβγδεζηθικλμ",  # Greek: two bytes a character
    "<>/=\"abcdpq ",  # markup
]


def _write_dataset(root, k: int, tokens_per_domain: int) -> str:
    """k text domains of different alphabets, documents of random lengths (so windows cross
    document boundaries, as in real data, and the reference's re-tokenisation pads)."""
    rng = np.random.default_rng(0)
    for d in range(k):
        letters = _LETTERS[d % len(_LETTERS)]
        folder = os.path.join(root, f"domain{d}")
        os.makedirs(folder)
        size, j = 0, 0
        while size < tokens_per_domain:
            words = ["".join(rng.choice(list(letters), rng.integers(2, 9))) for _ in range(rng.integers(20, 300))]
            text = " ".join(words)
            with open(os.path.join(folder, f"doc{j}.txt"), "w", encoding="utf-8") as f:
                f.write(text)
            size += len(text.encode("utf-8")) + 1
            j += 1
    return root


_INPUTS = {}


def _inputs(case, tmp_root):
    """(dataset, proxy, starts) for a case, built once per session."""
    if case not in _INPUTS:
        k, n, window, n_layer, width, vocab = case
        root = os.path.join(tmp_root, f"data_{k}_{n}_{window}")
        if not os.path.isdir(root):  # cases differing only in the proxy share their data
            _write_dataset(root, k, max(8 * n * window, 4 * window))
        ds = load_dataset(root)
        cfg = GPTConfig(vocab_size=max(vocab, ds.vocab_size), n_layer=n_layer, n_head=4, n_embd=width, block_size=window)
        model = GPT(cfg, seed=0)
        with torch.no_grad():  # distinct, O(1) hidden states (a fresh init is nearly constant)
            g = torch.Generator().manual_seed(1)
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        model = model.eval().to(DEVICE)
        starts = {name: window_starts(ds, name, _embed_config(case, "masked")) for name in ds.domains}
        _INPUTS[case] = (ds, model, starts)
    return _INPUTS[case]


def _embed_config(case, pooling):
    _, n, window, _, _, _ = case
    return EmbedConfig(n_windows=n, window=window, batch_size=BATCH, seed=0, pooling=pooling)


@pytest.fixture(scope="session")
def bench_tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench_embed"))


# --------------------------------------------------------------------------- providers


def _ext(pooling):
    def run(case, ds, model, starts):
        emb = embed_domains(model, ds, _embed_config(case, pooling), device=DEVICE, cache_dir=None)
        return emb.embeddings

    return run


def _reference(pooling):
    def run(case, ds, model, starts):
        ref = reference_embeddings(model, ds, starts, case[2], BATCH, pooling=pooling, impl="modules",
                                   lm_head=True, device=DEVICE)
        return torch.from_numpy(ref.embeddings)

    return run


# provider -> (function, pooling, the provider it must agree with)
PROVIDERS = {
    "ext": (_ext("masked"), "masked", "reference_masked"),
    "ext_reference_pooling": (_ext("reference"), "reference", "reference"),
    "reference": (_reference("reference"), "reference", "ext_reference_pooling"),
    "reference_masked": (_reference("masked"), "masked", "ext"),
}


_OUTPUTS = {}  # (case, provider) -> domain embeddings [k, H]


@pytest.mark.parametrize("provider", list(PROVIDERS))
def bench_embed_extraction(benchmark, provider, case, bench_tmp):
    k, n, window, n_layer, width, vocab = case
    ds, model, starts = _inputs(case, bench_tmp)
    fn, pooling, counterpart = PROVIDERS[provider]
    benchmark.group = f"embed extraction {k} domains x {n} windows x {window} tokens, proxy {n_layer}x{width} vocab {vocab} {DEVICE}"
    tokens = k * n * window
    benchmark.extra_info.update(provider=provider, pooling=pooling, domains=k, windows=n, window=window,
                                n_layer=n_layer, width=width, batch_size=BATCH, device=DEVICE, tokens=tokens)

    emb = benchmark.pedantic(fn, args=(case, ds, model, starts), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.median

    # Same pooling, same windows, same proxy: the same domain weights (not timed; the
    # counterpart's output is reused when it was timed already).
    _OUTPUTS[(case, provider)] = emb
    other = _OUTPUTS.get((case, counterpart))
    if other is None:
        other = _OUTPUTS[(case, counterpart)] = PROVIDERS[counterpart][0](case, ds, model, starts)
    torch.testing.assert_close(emb.double(), other.double(), rtol=WEIGHT_TOL, atol=WEIGHT_TOL)
    w = weights_from_embeddings(emb.double().cpu(), "pretrain").weights
    w_other = weights_from_embeddings(other.double().cpu(), "pretrain").weights
    torch.testing.assert_close(w, w_other, rtol=WEIGHT_TOL, atol=WEIGHT_TOL)


# --------------------------------------------------------------------------- Hugging Face proxy

_HF_INPUTS = {}


def _hf_inputs(case, tmp_root):
    """(dataset, proxy folder, HF LM-head model, transformers tokenizer, starts) for a case."""
    if case not in _HF_INPUTS:
        transformers = pytest.importorskip("transformers")
        tokenizers = pytest.importorskip("tokenizers")
        from chameleon_ext.pipeline import load_proxy_and_tokenizer

        k, n, window, n_layer, width, vocab = case
        root = os.path.join(tmp_root, f"hf_data_{k}_{n}_{window}")
        if not os.path.isdir(root):
            _write_dataset(root, k, max(8 * n * window, 4 * window))
        texts = [open(os.path.join(dp, f), encoding="utf-8").read() for dp, _, fs in os.walk(root) for f in fs
                 if f.endswith(".txt")]
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                                   pad_token="<|endoftext|>")
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=window, n_embd=width, n_layer=n_layer, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
        lm = transformers.GPT2LMHeadModel(cfg)
        with torch.no_grad():  # distinct, O(1) hidden states, as for the chameleon_ext proxy
            g = torch.Generator().manual_seed(1)
            for p in lm.parameters():
                if p.dim() == 1:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        folder = os.path.join(tmp_root, f"hf_proxy_{case}".replace(" ", ""))
        lm.save_pretrained(folder)
        tok.save_pretrained(folder)
        _, hf_tok = load_proxy_and_tokenizer(folder)
        ds = load_dataset(root, tokenizer=hf_tok, cache_dir=os.path.join(tmp_root, f"hf_cache_{k}_{n}_{window}"))
        starts = {name: window_starts(ds, name, _embed_config(case, "masked")) for name in ds.domains}
        _HF_INPUTS[case] = (ds, folder, lm.eval().to(DEVICE), tok, starts)
    return _HF_INPUTS[case]


def _hf_ext(pooling):
    def run(case, ds, folder, lm, tok, starts):
        from chameleon_ext.pipeline import load_proxy

        proxy = load_proxy(folder)  # as `chameleon weights --proxy FOLDER` loads it (timed too)
        return embed_domains(proxy, ds, _embed_config(case, pooling), device=DEVICE, cache_dir=None).embeddings

    return run


def _hf_reference(pooling):
    def run(case, ds, folder, lm, tok, starts):
        ref = hf_reference_embeddings(lm, tok, ds, starts, case[2], BATCH, pooling=pooling, device=DEVICE)
        return torch.from_numpy(ref.embeddings)

    return run


HF_PROVIDERS = {
    "ext": (_hf_ext("masked"), "masked", "reference_masked"),
    "ext_reference_pooling": (_hf_ext("reference"), "reference", "reference"),
    "reference": (_hf_reference("reference"), "reference", "ext_reference_pooling"),
    "reference_masked": (_hf_reference("masked"), "masked", "ext"),
}


@pytest.mark.parametrize("provider", list(HF_PROVIDERS))
def bench_hf_embed_extraction(benchmark, provider, hf_case, bench_tmp):
    k, n, window, n_layer, width, vocab = hf_case
    inputs = _hf_inputs(hf_case, bench_tmp)
    fn, pooling, counterpart = HF_PROVIDERS[provider]
    benchmark.group = (f"HF embed extraction {k} domains x {n} windows x {window} tokens, "
                       f"GPT-2 {n_layer}x{width} vocab {vocab} {DEVICE}")
    tokens = k * n * window
    benchmark.extra_info.update(provider=provider, pooling=pooling, domains=k, windows=n, window=window,
                                n_layer=n_layer, width=width, batch_size=BATCH, device=DEVICE, tokens=tokens)
    emb = benchmark.pedantic(fn, args=(hf_case, *inputs), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.median
    key = ("hf", hf_case)
    _OUTPUTS[(key, provider)] = emb
    other = _OUTPUTS.get((key, counterpart))
    if other is None:
        other = _OUTPUTS[(key, counterpart)] = HF_PROVIDERS[counterpart][0](hf_case, *inputs)
    torch.testing.assert_close(emb.double(), other.double(), rtol=WEIGHT_TOL, atol=WEIGHT_TOL)
    w = weights_from_embeddings(emb.double().cpu(), "pretrain").weights
    w_other = weights_from_embeddings(other.double().cpu(), "pretrain").weights
    torch.testing.assert_close(w, w_other, rtol=WEIGHT_TOL, atol=WEIGHT_TOL)


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("provider", ["ext", "reference"])
def bench_weights_from_embeddings(benchmark, provider, weights_case):
    k, d = weights_case
    g = torch.Generator().manual_seed(0)
    X = torch.randn(k, d, generator=g, dtype=torch.float64) + torch.randn(1, d, generator=g, dtype=torch.float64)
    Xn = X.numpy()
    benchmark.group = f"weights from embeddings k={k} d={d} fp64 cpu"
    benchmark.extra_info.update(provider=provider, k=k, d=d)
    if provider == "ext":
        def run():
            return weights_from_embeddings(X, "pretrain", rule="paper").weights.numpy()  # the reference is the paper's rule
    else:
        def run():
            return reference_weights_numpy(Xn, "pretrain")
    w = benchmark(run)
    if benchmark.stats is not None:
        benchmark.extra_info["seconds"] = benchmark.stats.stats.median
    np.testing.assert_allclose(w, reference_weights_numpy(Xn, "pretrain"), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(w.sum(), 1.0, atol=1e-12)
