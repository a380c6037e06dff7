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

``bench_weights`` times embeddings ``[k, d]`` -> Chameleon weights (``weights_from_embeddings``)
against the reference's NumPy computation (``np.linalg.inv``), for k = 1000 domains.

Smoke run (``--benchmark-disable``) uses QUICK_CASES / QUICK_WEIGHTS_CASES: seconds in all.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from python_tests.reference_pipeline import reference_embeddings, reference_weights_numpy
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
    if "weights_case" in metafunc.fixturenames:
        quick = bool(metafunc.config.getoption("benchmark_disable", default=False))
        cases = QUICK_WEIGHTS_CASES if quick else WEIGHTS_CASES
        metafunc.parametrize("weights_case", cases, ids=[str(c).replace(" ", "") for c in cases])


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
            return weights_from_embeddings(X, "pretrain").weights.numpy()
    else:
        def run():
            return reference_weights_numpy(Xn, "pretrain")
    w = benchmark(run)
    if benchmark.stats is not None:
        benchmark.extra_info["seconds"] = benchmark.stats.stats.median
    np.testing.assert_allclose(w, reference_weights_numpy(Xn, "pretrain"), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(w.sum(), 1.0, atol=1e-12)
