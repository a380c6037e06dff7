"""Domain embeddings (docs/method.md, step 2): values against independent re-computations, early
stopping at the chosen layer, the reference's pooling quirks, the cache, seeding, bad input."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
import torch

import chameleon_ext
from chameleon_ext.data import load_dataset
from chameleon_ext.embed import EmbedConfig, embed_domains, load_domain_embeddings, window_starts
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.model import GPT, GPTConfig

from .factories import perturb_vectors_

from .reference_pipeline import all_hidden_states, reference_embeddings, retokenise

BLOCK = 32
WINDOW = 32
WORDS = "the quick brown fox jumps over a lazy dog café naïve".split()


def _write_data(root) -> str:
    """Four byte-level domains:

    * ``alpha`` -- short documents with multi-byte characters: windows cross documents (EOS,
      which re-tokenisation drops) and cut characters (U+FFFD, which it lengthens);
    * ``digits`` -- a .jsonl of very short documents: nearly every window holds EOS ids;
    * ``dna`` -- one long ASCII document: windows re-tokenise to themselves, no padding;
    * ``rep`` -- exactly one window's worth of training tokens (a pre-tokenised train.bin of
      ASCII bytes, with a val.bin): every window is the same.
    """
    rng = np.random.default_rng(0)
    for name in ("alpha", "digits", "dna", "rep"):
        os.makedirs(os.path.join(root, name))
    for j in range(4):
        with open(os.path.join(root, "alpha", f"d{j}.txt"), "w", encoding="utf-8") as f:
            f.write(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 60)))
    with open(os.path.join(root, "digits", "x.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(40):
            f.write('{"text": "%s"}\n' % " ".join(str(v) for v in rng.integers(0, 10**4, 8)))
    with open(os.path.join(root, "dna", "x.txt"), "w", encoding="utf-8") as f:
        f.write("".join("ACGT"[i] for i in rng.integers(0, 4, 2000)))
    rep = np.frombuffer(("repeat me " * 4).encode()[:WINDOW], dtype=np.uint8).astype(np.uint16)
    rep.tofile(os.path.join(root, "rep", "train.bin"))
    rep[:8].tofile(os.path.join(root, "rep", "val.bin"))
    with open(os.path.join(root, "rep", "meta.json"), "w") as f:
        f.write('{"vocab_size": 257, "dtype": "uint16"}')
    return str(root)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("embed_data"))


@pytest.fixture(scope="module")
def dataset(data_root):
    ds = load_dataset(data_root)
    assert ds.n_tokens("rep") == WINDOW  # one window only: the de-duplication case
    return ds


def _model(n_layer=2, seed=0, block=BLOCK):
    """A tiny GPT whose biases and LayerNorm gains are perturbed, so hidden states are O(1)
    and differ clearly between layers and domains (a fresh GPT-2 init is nearly constant)."""
    cfg = GPTConfig.preset("tiny", 257, block, n_layer=n_layer)
    model = GPT(cfg, seed=seed)
    return perturb_vectors_(model, seed)


@pytest.fixture(scope="module")
def model():
    return _model()


def _cfg(**kw):
    base = dict(n_windows=8, window=WINDOW, batch_size=3, seed=0)
    base.update(kw)
    return EmbedConfig(**base)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=tol, atol=tol)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("layer", [None, 0, 1, 2])
def test_masked_embeddings_equal_independent_recomputation(dataset, model, layer):
    cfg = _cfg(layer=layer, batch_size=5)  # 8 windows, batches of 5: batches mix domains
    emb = embed_domains(model, dataset, cfg, device="cpu")
    assert emb.domains == dataset.domains
    assert emb.embeddings.dtype == torch.float64 and emb.embeddings.shape == (4, model.config.n_embd)
    assert emb.counts == [8] * 4 and emb.computed == dataset.domains
    want_layer = (model.config.n_layer + 1) // 2 if layer is None else layer
    assert emb.settings["layer"] == want_layer
    for i, name in enumerate(dataset.domains):
        windows = dataset.windows_at(name, window_starts(dataset, name, cfg), WINDOW)  # [n, l]
        assert windows.shape == (8, WINDOW)
        # A full float64 forward from the raw parameters (every block, all states kept).
        states, _ = all_hidden_states(model, torch.from_numpy(windows), impl="manual")
        assert len(states) == model.config.n_layer + 1
        per_window = states[want_layer].mean(dim=1)  # [n, H]: mean over the window's tokens
        _close(emb.embeddings[i], per_window.mean(dim=0))


def test_embeddings_do_not_depend_on_the_other_domains(dataset, model):
    for pooling in ("masked", "reference"):
        cfg = _cfg(pooling=pooling)
        full = embed_domains(model, dataset, cfg)
        alone = embed_domains(model, dataset, cfg, domains=["digits"])
        assert alone.domains == ["digits"]
        _close(alone.embeddings[0], full.embeddings[dataset.domains.index("digits")], tol=1e-7)


@pytest.mark.parametrize("pooling", ["masked", "reference"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_proxy_runs_only_up_to_the_chosen_layer(dataset, monkeypatch, pooling, layer):
    model = _model()

    def boom(name):
        def forward(*args, **kwargs):
            raise AssertionError(f"{name} ran although layer {layer} was requested")
        return forward

    for i, block in enumerate(model.blocks):
        if i >= layer:
            monkeypatch.setattr(block, "forward", boom(f"block {i + 1}"))
    if layer < model.config.n_layer:
        monkeypatch.setattr(model.ln_f, "forward", boom("ln_f"))
    monkeypatch.setattr(model.lm_head, "forward", boom("lm_head"))
    emb = embed_domains(model, dataset, _cfg(layer=layer, pooling=pooling, n_windows=2))
    assert emb.settings["layer"] == layer and torch.isfinite(emb.embeddings).all()


@pytest.mark.parametrize("n_layer", [1, 2, 3, 4])
def test_default_layer_is_the_reference_middle(dataset, n_layer):
    model = _model(n_layer=n_layer)
    ids = torch.from_numpy(dataset.windows_at("dna", np.array([0]), WINDOW))
    n_states = len(all_hidden_states(model, ids)[0])  # len(outputs.hidden_states) in HF terms
    assert n_states == n_layer + 1
    emb = embed_domains(model, dataset, _cfg(n_windows=2))
    assert emb.settings["layer"] == n_states // 2 == model.default_embedding_layer
    explicit = embed_domains(model, dataset, _cfg(n_windows=2, layer=n_states // 2))
    assert torch.equal(emb.embeddings, explicit.embeddings)
    if n_layer == 3:  # (n + 1) // 2 = 2, not n // 2 = 1
        other = embed_domains(model, dataset, _cfg(n_windows=2, layer=1))
        assert not torch.allclose(emb.embeddings, other.embeddings, atol=1e-3)


def test_reference_pooling_matches_an_independent_reference_pipeline(dataset, model):
    cfg = _cfg(pooling="reference", batch_size=3)  # 8 windows: batches of 3, 3 and 2 per domain
    emb = embed_domains(model, dataset, cfg)
    starts = {n: window_starts(dataset, n, cfg) for n in dataset.domains}
    # The re-creation: decode -> re-tokenise -> right-pad with EOS (+ attention mask) -> FULL
    # float64 forward keeping every state -> hidden_states[len // 2].mean(dim=1) over the padded
    # length -> np.unique(axis=0) -> mean. See python_tests/reference_pipeline.py.
    ref = reference_embeddings(model, dataset, starts, WINDOW, 3, pooling="reference", impl="manual")
    assert ref.domains == emb.domains
    _close(emb.embeddings, ref.embeddings)
    assert emb.counts == ref.counts
    assert emb.counts[dataset.domains.index("rep")] == 1  # eight copies of one window: np.unique keeps one
    # The re-creation's own forward paths agree (the benchmark times the "modules" one).
    fast = reference_embeddings(model, dataset, starts, WINDOW, 3, pooling="reference", impl="modules")
    _close(fast.embeddings, ref.embeddings)
    # The case really exercises padding: re-tokenisation shortens windows that hold EOS.
    lengths = {n: [len(r) for r in retokenise(dataset.tokenizer, dataset.windows_at(n, starts[n], WINDOW), WINDOW)]
               for n in dataset.domains}
    assert min(lengths["digits"]) < WINDOW and min(lengths["alpha"]) < WINDOW
    assert min(lengths["dna"]) == WINDOW


def test_masked_pooling_differs_from_reference_pooling_only_where_padding_exists(dataset, model):
    masked = embed_domains(model, dataset, _cfg())
    ref = embed_domains(model, dataset, _cfg(pooling="reference"))
    diff = (masked.embeddings - ref.embeddings).abs().max(dim=1).values
    idx = {n: i for i, n in enumerate(dataset.domains)}
    assert diff[idx["digits"]] > 1e-4 and diff[idx["alpha"]] > 1e-4  # padded batches
    assert diff[idx["dna"]] < 1e-6 and diff[idx["rep"]] < 1e-6  # no padding, no EOS: same windows
    assert masked.counts[idx["rep"]] == 8 and ref.counts[idx["rep"]] == 1


def test_masked_pooling_matches_the_reference_pipeline_in_masked_mode(dataset, model):
    cfg = _cfg()
    emb = embed_domains(model, dataset, cfg)
    starts = {n: window_starts(dataset, n, cfg) for n in dataset.domains}
    ref = reference_embeddings(model, dataset, starts, WINDOW, 3, pooling="masked", impl="modules")
    _close(emb.embeddings, ref.embeddings)
    assert ref.counts == emb.counts


# --------------------------------------------------------------------------- cache


@pytest.fixture
def fresh_root(data_root, tmp_path):
    """A private copy of the data (its token cache included), so tests can change it."""
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    return str(root)


def _entries(cache_dir):
    """{domain: path} of the embedding cache's domain-sum entries (not the per-window files
    ``{key}.windows.pt`` beside them)."""
    out = {}
    for f in sorted(os.listdir(cache_dir)):
        if f.endswith(".pt") and not f.endswith(".windows.pt"):
            out.setdefault(torch.load(os.path.join(cache_dir, f), weights_only=True)["domain"], []).append(
                os.path.join(cache_dir, f))
    return out


def test_cache_second_call_embeds_nothing(fresh_root, model, tmp_path):
    cache = str(tmp_path / "emb")
    ds = load_dataset(fresh_root)
    first = embed_domains(model, ds, _cfg(), cache_dir=cache)
    assert first.computed == ds.domains
    second = embed_domains(model, load_dataset(fresh_root), _cfg(), cache_dir=cache)
    assert second.computed == []
    assert torch.equal(first.embeddings, second.embeddings)  # bit-identical
    assert first.counts == second.counts
    assert set(_entries(cache)) == set(ds.domains)


def test_cache_new_domain_and_changed_domain(fresh_root, model, tmp_path):
    cache = str(tmp_path / "emb")
    before = embed_domains(model, load_dataset(fresh_root), _cfg(), cache_dir=cache)

    os.makedirs(os.path.join(fresh_root, "beta"))
    with open(os.path.join(fresh_root, "beta", "b.txt"), "w", encoding="utf-8") as f:
        f.write("a brand new domain of text " * 20)
    ds = load_dataset(fresh_root)
    added = embed_domains(model, ds, _cfg(), cache_dir=cache)
    assert added.computed == ["beta"]
    for n in before.domains:
        assert torch.equal(added.embeddings[ds.domains.index(n)], before.embeddings[before.domains.index(n)])

    with open(os.path.join(fresh_root, "dna", "x.txt"), "a", encoding="utf-8") as f:
        f.write("TTTTGGGGCCCCAAAA" * 10)
    ds = load_dataset(fresh_root)
    changed = embed_domains(model, ds, _cfg(), cache_dir=cache)
    assert changed.computed == ["dna"]
    i = ds.domains.index("dna")
    assert not torch.equal(changed.embeddings[i], added.embeddings[i])
    for j, n in enumerate(ds.domains):
        if n != "dna":
            assert torch.equal(changed.embeddings[j], added.embeddings[j])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "tamper"])
def test_damaged_cache_entry_is_recomputed_with_a_warning(fresh_root, model, tmp_path, damage):
    cache = str(tmp_path / "emb")
    ds = load_dataset(fresh_root)
    first = embed_domains(model, ds, _cfg(), cache_dir=cache)
    (path,) = _entries(cache)["alpha"]
    if damage == "truncate":
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    elif damage == "garbage":
        with open(path, "wb") as f:
            f.write(os.urandom(300))
    else:  # a well-formed file whose numbers no longer match their checksum
        obj = torch.load(path, weights_only=True)
        obj["sum"] = obj["sum"] + 1.0
        torch.save(obj, path)
    with pytest.warns(UserWarning, match="'alpha'.*damaged"):
        again = embed_domains(model, ds, _cfg(), cache_dir=cache)
    assert again.computed == ["alpha"]
    _close(again.embeddings, first.embeddings, tol=1e-7)
    # The entry was rewritten: the next call is clean and embeds nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = embed_domains(model, ds, _cfg(), cache_dir=cache)
    assert third.computed == [] and torch.equal(third.embeddings, again.embeddings)


@pytest.mark.parametrize("change", ["n_windows", "window", "seed", "layer", "pooling", "batch_size_reference",
                                    "proxy_weights"])
def test_cache_misses_when_the_settings_or_the_proxy_change(fresh_root, tmp_path, change):
    cache = str(tmp_path / "emb")
    ds = load_dataset(fresh_root)
    model = _model()
    base = dict(pooling="reference") if change == "batch_size_reference" else {}
    first = embed_domains(model, ds, _cfg(**base), cache_dir=cache)
    assert embed_domains(model, ds, _cfg(**base), cache_dir=cache).computed == []
    kw = dict(base)
    if change == "n_windows":
        kw["n_windows"] = 5
    elif change == "window":
        kw["window"] = 16
    elif change == "seed":
        kw["seed"] = 1
    elif change == "layer":
        kw["layer"] = 2
    elif change == "pooling":
        kw["pooling"] = "reference"
    elif change == "batch_size_reference":
        kw["batch_size"] = 4  # padding depends on the batches in reference pooling
    else:
        with torch.no_grad():
            model.blocks[0].mlp.c_fc.bias.add_(0.5)
    second = embed_domains(model, ds, _cfg(**kw), cache_dir=cache)
    assert second.computed == ds.domains
    assert not torch.allclose(second.embeddings, first.embeddings, atol=1e-6)


@pytest.mark.parametrize("change", ["precision", "tokenizer_content", "split_layout"])
def test_cache_key_holds_precision_tokenizer_and_split_layout(fresh_root, model, tmp_path, monkeypatch, change):
    import chameleon_ext.embed as embed_mod
    import chameleon_ext.embed_cache as embed_cache
    from chameleon_ext.data.tokenizer import ByteTokenizer

    cache = str(tmp_path / "emb")
    ds = load_dataset(fresh_root)
    first = embed_domains(model, ds, _cfg(), cache_dir=cache)
    assert first.settings["precision"] == "fp32" and first.settings["split_layout"] == embed_mod.SPLIT_LAYOUT
    assert first.settings["tokenizer_sha256"] == ByteTokenizer().content_hash
    kw = {}
    if change == "precision":
        kw["precision"] = "bf16"  # bf16 autocast, here on the CPU
    elif change == "tokenizer_content":
        # same name, other content: only the content hash tells them apart
        monkeypatch.setattr(ByteTokenizer, "content_hash", "0" * 64)
    else:  # caches written under the old split (the stream's tail) must not be reused
        monkeypatch.setattr(embed_cache, "SPLIT_LAYOUT", "tail/1")
    second = embed_domains(model, ds, _cfg(**kw), cache_dir=cache)
    assert second.computed == ds.domains
    if change == "precision":
        assert second.settings["precision"] == "bf16"
        _close(second.embeddings, first.embeddings, tol=5e-2)  # bf16 rounding only
        assert not torch.equal(second.embeddings, first.embeddings)
    else:
        assert torch.equal(second.embeddings, first.embeddings)  # same numbers, fresh entries


def test_precision_option():
    assert EmbedConfig().resolved_precision(torch.device("cpu")) == "fp32"
    assert EmbedConfig().resolved_precision(torch.device("cuda")) == "bf16"
    # reference pooling keeps the reference's float32 on every device unless told otherwise
    assert EmbedConfig(pooling="reference").resolved_precision(torch.device("cuda")) == "fp32"
    assert EmbedConfig(pooling="reference", precision="bf16").resolved_precision(torch.device("cuda")) == "bf16"
    assert EmbedConfig(precision="fp32").resolved_precision(torch.device("cuda")) == "fp32"
    with pytest.raises(ChameleonUserError, match="precision"):
        EmbedConfig(precision="int8")


def test_masked_cache_is_shared_across_batch_sizes(fresh_root, model, tmp_path):
    # Masked pooling does not depend on how windows are batched, so the batch size is no key.
    cache = str(tmp_path / "emb")
    ds = load_dataset(fresh_root)
    first = embed_domains(model, ds, _cfg(batch_size=3), cache_dir=cache)
    second = embed_domains(model, ds, _cfg(batch_size=7), cache_dir=cache)
    assert second.computed == [] and torch.equal(first.embeddings, second.embeddings)


# --------------------------------------------------------------------------- seeding


def test_seeded_and_reproducible(dataset, model):
    a = embed_domains(model, dataset, _cfg(seed=5))
    b = embed_domains(model, dataset, _cfg(seed=5))
    assert torch.equal(a.embeddings, b.embeddings)
    for name in ("alpha", "digits", "dna"):
        s5 = window_starts(dataset, name, _cfg(seed=5))
        assert np.array_equal(s5, window_starts(dataset, name, _cfg(seed=5)))
        assert not np.array_equal(s5, window_starts(dataset, name, _cfg(seed=6)))
        assert s5.min() >= 0 and s5.max() <= dataset.n_tokens(name) - WINDOW
    c = embed_domains(model, dataset, _cfg(seed=6))
    i = dataset.domains.index("dna")
    assert not torch.allclose(a.embeddings[i], c.embeddings[i], atol=1e-6)


def test_saved_embeddings_round_trip(dataset, model, tmp_path):
    emb = embed_domains(model, dataset, _cfg(n_windows=2))
    path = str(tmp_path / "domain_embeddings.pt")
    emb.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["domains"] == dataset.domains and raw["embeddings"].shape == emb.embeddings.shape
    back = load_domain_embeddings(path)
    assert back.domains == emb.domains and torch.equal(back.embeddings, emb.embeddings)


# --------------------------------------------------------------------------- bad input


def test_domain_shorter_than_one_window_is_named(data_root, tmp_path, model):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    os.makedirs(root / "stub")
    (root / "stub" / "s.txt").write_text("too short", encoding="utf-8")
    ds = load_dataset(root)
    with pytest.raises(ChameleonUserError, match="'stub' is shorter than one window"):
        embed_domains(model, ds, _cfg())
    with pytest.raises(ChameleonUserError, match="'stub'"):
        window_starts(ds, "stub", _cfg())
    # the others still embed when the short domain is left out
    ok = embed_domains(model, ds, _cfg(n_windows=2), domains=["alpha", "dna"])
    assert ok.domains == ["alpha", "dna"]


def test_window_longer_than_the_proxy_block_is_an_error(dataset):
    model = _model(block=16)
    with pytest.raises(ChameleonUserError, match="window: 32 tokens exceed the proxy's block_size 16"):
        embed_domains(model, dataset, _cfg())


def test_unknown_domain_is_an_error(dataset, model):
    with pytest.raises(ChameleonUserError, match="nope"):
        embed_domains(model, dataset, _cfg(), domains=["alpha", "nope"])
    with pytest.raises(ChameleonUserError, match="at least one domain"):
        embed_domains(model, dataset, _cfg(), domains=[])


@pytest.mark.parametrize("kw, match", [
    (dict(n_windows=0), "n_windows"),
    (dict(window=-1), "window"),
    (dict(batch_size=0), "batch_size"),
    (dict(pooling="mean"), "pooling"),
    (dict(split="test"), "split"),
])
def test_bad_config_is_an_error(kw, match):
    with pytest.raises(ChameleonUserError, match=match):
        _cfg(**kw)


def test_bad_layer_is_an_error(dataset, model):
    with pytest.raises(ChameleonUserError, match="layer"):
        embed_domains(model, dataset, _cfg(layer=3))


# --------------------------------------------------------------------------- torch.distributed


DIST_DOMAINS = ["alpha", "digits", "dna"]  # reference pooling: 3 batches each, 9 batches split 5 / 4
DIST_WINDOWS = 7  # 21 windows split 11 / 10: not on a batch boundary


def _dist_worker(rank, world, port, data_root, out_dir):
    """One rank of a gloo run (what torchrun would start): embeds, writes what it got."""
    from chameleon_ext import distributed

    from .factories import set_worker_env

    set_worker_env(rank, world, port)
    try:
        distributed.init_from_env("cpu")
        ds = load_dataset(data_root)
        model = _model()
        out = {}
        for pooling in ("masked", "reference"):
            cfg = _cfg(pooling=pooling, batch_size=3, n_windows=DIST_WINDOWS)
            emb = embed_domains(model, ds, cfg, device="cpu", cache_dir=os.path.join(out_dir, "cache"),
                                domains=DIST_DOMAINS)
            again = embed_domains(model, ds, cfg, device="cpu", cache_dir=os.path.join(out_dir, "cache"),
                                  domains=DIST_DOMAINS)
            out[pooling] = {"emb": emb.embeddings, "counts": emb.counts, "computed": emb.computed,
                            "again": again.embeddings, "again_computed": again.computed}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    from .factories import exit_spawned_worker

    exit_spawned_worker()


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_two_ranks_give_the_single_process_embeddings(data_root, dataset, tmp_path):
    from .factories import spawn_workers

    spawn_workers(_dist_worker, 2, data_root, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model = _model()
    for pooling in ("masked", "reference"):
        single = embed_domains(model, dataset, _cfg(pooling=pooling, batch_size=3, n_windows=DIST_WINDOWS),
                               domains=DIST_DOMAINS)
        for got in ranks:
            g = got[pooling]
            assert torch.equal(g["emb"], ranks[0][pooling]["emb"])  # every rank returns the same
            _close(g["emb"], single.embeddings, tol=1e-7)
            assert g["counts"] == single.counts and g["computed"] == DIST_DOMAINS
            assert g["again_computed"] == [] and torch.equal(g["again"], g["emb"])  # rank 0 wrote the cache
        # and so the same weights (this test also stands for the 2-process weights check)
        w_single = chameleon_ext.weights_from_embeddings(single.embeddings).weights
        w_dist = chameleon_ext.weights_from_embeddings(ranks[0][pooling]["emb"]).weights
        torch.testing.assert_close(w_dist, w_single, rtol=0, atol=1e-6)
