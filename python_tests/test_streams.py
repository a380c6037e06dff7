"""Corpus sources wired into the data layer (its input side): every format through
``load_dataset`` (token caches against the full tokenisation, streamed windows against the
stream), ``draw_windows`` giving today's windows on cached and pre-tokenised domains,
embeddings and their cache keys, the sampler and trainer on a streamed domain (reproducible,
exact resume), token budgets, and the CLI (``--text-field``, corrupt files exit 2).
"""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest
import torch

from chameleon_ext.data import dataset as dataset_mod
from chameleon_ext.data import token_cache as cache_mod
from chameleon_ext.data import load_dataset, sampler as sampler_mod
from chameleon_ext.data.dataset import SourceTokens
from chameleon_ext.data.sampler import WeightedDomainSampler
from chameleon_ext.embed import EmbedConfig, embed_domains
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.model import GPT, GPTConfig
from chameleon_ext.trainer import TrainConfig, evaluate, train

from .factories import write_text_domains
from .test_sources import (
    RAW_FORMATS, assert_windows_in_stream, build_domain, make_docs, reference_stream,
    write_jsonl, write_megatron_by_spec,
)

BLOCK = 16


def _domain_dir(tmp_path, fmt, docs, **kw):
    """``(data folder, domain name, documents in stream order)`` with one domain in ``fmt``."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    d, order = build_domain(data, fmt, docs, **kw)
    return data, d.name, order


def _model(seed=0):
    return GPT(GPTConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=32), seed=seed)


# ----------------------------------------------------------------------------- load_dataset


@pytest.mark.parametrize("fmt", RAW_FORMATS)
def test_cached_domain_is_the_full_tokenisation(tmp_path, fmt):
    docs = make_docs(30, seed=1)
    data, name, order = _domain_dir(tmp_path, fmt, docs)
    ds = load_dataset(data, val_fraction=0.0)
    assert not ds.is_streamed(name) and ds.kind(name) == "text"
    np.testing.assert_array_equal(np.asarray(ds.train_tokens(name)).astype(np.int64), reference_stream(order))
    assert ds.token_count(name).source == "counted"
    # a second load reuses the cache (nothing is tokenised again)
    again = load_dataset(data, val_fraction=0.0)
    assert again.fingerprint(name) == ds.fingerprint(name)


def test_new_formats_cache_key_follows_file_identity_and_text_field(tmp_path, monkeypatch):
    docs = make_docs(20, seed=3)
    data, name, order = _domain_dir(tmp_path, "parquet", docs, field="body")
    with pytest.raises(ChameleonUserError, match="body|text"):
        load_dataset(data)  # no "text" column: one line naming the file
    ds = load_dataset(data, text_field="body", val_fraction=0.0)
    np.testing.assert_array_equal(np.asarray(ds.train_tokens(name)).astype(np.int64), reference_stream(order))
    monkeypatch.setattr(cache_mod, "tokenise_domain", lambda *a, **k: pytest.fail("re-tokenised"))
    assert load_dataset(data, text_field="body", val_fraction=0.0).fingerprint(name) == ds.fingerprint(name)
    monkeypatch.undo()
    f = sorted((data / name).iterdir())[0]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # identity changes
    assert load_dataset(data, text_field="body", val_fraction=0.0).fingerprint(name) != ds.fingerprint(name)


def test_verify_full_keys_source_domains_on_content(tmp_path):
    docs = make_docs(20, seed=5)
    data, name, order = _domain_dir(tmp_path, "jsonl.zst", docs)
    ident = load_dataset(data, val_fraction=0.0)
    full = load_dataset(data, val_fraction=0.0, verify="full")
    assert full.fingerprint(name) != ident.fingerprint(name)
    np.testing.assert_array_equal(np.asarray(full.train_tokens(name)), np.asarray(ident.train_tokens(name)))
    # content keys survive a copy to another path; identity keys do not
    shutil.copytree(data, tmp_path / "copy")
    assert load_dataset(tmp_path / "copy", val_fraction=0.0, verify="full").fingerprint(name) == full.fingerprint(name)
    assert load_dataset(tmp_path / "copy", val_fraction=0.0).fingerprint(name) != ident.fingerprint(name)


def test_cached_draw_windows_are_todays_windows(tmp_path):
    """Same rng calls as before: one integers() draw of the starts, windows read at them."""
    ds = load_dataset(write_text_domains(tmp_path / "d"))
    for name in ds.domains:
        got = ds.draw_windows(name, 17, 24, np.random.default_rng(5))
        toks = np.asarray(ds.train_tokens(name)).astype(np.int64)
        starts = np.random.default_rng(5).integers(0, toks.size - 24 + 1, size=17)
        np.testing.assert_array_equal(got, np.stack([toks[s:s + 24] for s in starts]))


@pytest.mark.parametrize("fmt", RAW_FORMATS)
def test_streamed_domain_windows_are_runs_of_the_stream(tmp_path, fmt):
    docs = make_docs(60, seed=4)
    data, name, order = _domain_dir(tmp_path, fmt, docs)
    ds = load_dataset(data, stream_threshold=0)
    assert ds.is_streamed(name) and ds.kind(name) == "text"
    assert not os.path.exists(os.path.join(str(data), ".chameleon_cache", "index"))  # nothing cached
    stream = reference_stream(order)
    for split in ("train", "val"):
        w = ds.draw_windows(name, 40, 24, np.random.default_rng(2), split)
        assert w.shape == (40, 24) and w.dtype == np.int64
        assert_windows_in_stream(w, stream)
        np.testing.assert_array_equal(w, load_dataset(data, stream_threshold=0).draw_windows(
            name, 40, 24, np.random.default_rng(2), split))  # a function of the seed
    with pytest.raises(ChameleonUserError, match="streamed"):
        ds.train_tokens(name)
    count = ds.token_count(name)
    assert count.source.startswith("estimated")
    exact = stream.size * 0.9
    assert abs(count.tokens - exact) <= 0.3 * exact, (count.tokens, exact)


def test_megatron_domain_reads_windows_by_pread(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 257, int(rng.integers(5, 80))) for _ in range(50)]
    d = tmp_path / "data" / "mega"
    d.mkdir(parents=True)
    write_megatron_by_spec(str(d / "shard_a"), seqs[:30], list(range(1, 31)), 8, np.uint16)
    write_megatron_by_spec(str(d / "shard_b"), seqs[30:], list(range(1, 21)), 4, np.int32)
    (d / "README.md").write_text("not data")
    write_text_domains(tmp_path / "data", names=("alpha",))
    ds = load_dataset(tmp_path / "data", val_fraction=0.0)
    stream = np.concatenate(seqs).astype(np.int64)
    assert ds.kind("mega") == "bin" and ds.vocab_size == 257
    tr = ds.train_tokens("mega")
    assert isinstance(tr, SourceTokens)
    np.testing.assert_array_equal(np.asarray(tr), stream)
    got = ds.draw_windows("mega", 9, 33, np.random.default_rng(1))
    starts = np.random.default_rng(1).integers(0, stream.size - 33 + 1, size=9)
    np.testing.assert_array_equal(got, np.stack([stream[s:s + 33] for s in starts]))
    ds.check_vocab(257)
    # ids beyond the tokenizer's vocabulary: found by the scan (small domain) and by the
    # per-window check (above the threshold, where the scan would read everything)
    bad = tmp_path / "bad" / "mega"
    bad.mkdir(parents=True)
    write_megatron_by_spec(str(bad / "x"), [np.full(50, 300)], [1], 4, np.int32)
    with pytest.raises(ChameleonUserError, match="'mega' holds token id 300"):
        load_dataset(tmp_path / "bad").check_vocab(257)
    big = load_dataset(tmp_path / "bad", stream_threshold=0)
    big.check_vocab(257)  # not scanned; its vocabulary is the tokenizer's
    with pytest.raises(ChameleonUserError, match="token id 300"):
        big.draw_windows("mega", 1, 8, np.random.default_rng(0))


def test_nanogpt_domain_is_read_through_its_source(tmp_path):
    d = tmp_path / "data" / "pre"
    d.mkdir(parents=True)
    train = np.random.default_rng(0).integers(0, 300, 2000).astype(np.uint16)
    train.tofile(d / "train.bin")
    np.arange(100, dtype=np.uint16).tofile(d / "val.bin")
    (d / "meta.json").write_text('{"dtype": "uint16", "vocab_size": 300}')
    ds = load_dataset(tmp_path / "data")
    assert isinstance(ds.train_tokens("pre"), SourceTokens) and ds.train_tokens("pre").dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(ds.val_tokens("pre")), np.arange(100))  # val.bin stays val
    got = ds.draw_windows("pre", 5, 10, np.random.default_rng(3))
    starts = np.random.default_rng(3).integers(0, 2000 - 10 + 1, size=5)
    np.testing.assert_array_equal(got, np.stack([train[s:s + 10] for s in starts]).astype(np.int64))
    ds.check_vocab(300)
    with pytest.raises(ChameleonUserError, match="'pre' holds token id"):
        ds.check_vocab(200)  # scanned: its true largest id
    big = load_dataset(tmp_path / "data", stream_threshold=0)
    big.check_vocab(300)
    with pytest.raises(ChameleonUserError, match="'pre' uses a vocabulary of 300"):
        big.check_vocab(299)  # not scanned: its declared vocabulary must fit


def test_corrupt_file_is_one_line_error(tmp_path):
    docs = make_docs(10)
    data, name, _ = _domain_dir(tmp_path, "jsonl.gz", docs)
    bad = data / name / "part-001.jsonl.gz"
    bad.write_bytes(bad.read_bytes()[:-20])
    for threshold in (dataset_mod.STREAM_THRESHOLD_BYTES, 0):
        with pytest.raises(ChameleonUserError) as e:
            ds = load_dataset(data, stream_threshold=threshold)
            for _ in range(20):  # a streamed domain is read when drawn
                ds.draw_windows(name, 64, 16, np.random.default_rng(_))
        assert "part-001.jsonl.gz" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- embeddings


def test_embed_streamed_domain_and_its_cache_key(tmp_path):
    root = tmp_path / "d"
    write_text_domains(root, names=("alpha", "dna"))
    ds = load_dataset(root, stream_threshold=0)
    cfg = EmbedConfig(n_windows=8, window=16, batch_size=4, seed=1)
    model = _model()
    cache = str(tmp_path / "emb")
    first = embed_domains(model, ds, cfg, device="cpu", cache_dir=cache)
    assert sorted(first.computed) == ["alpha", "dna"]
    # the mean of the proxy's hidden states over the windows draw_windows gives for (seed, name)
    from chameleon_ext.embed_windows import domain_seed
    for i, name in enumerate(ds.domains):
        w = ds.draw_windows(name, 8, 16, domain_seed(1, name))
        with torch.no_grad():
            ref = model.hidden_states(torch.from_numpy(w), model.default_embedding_layer).double().mean((0, 1))
        torch.testing.assert_close(first.embeddings[i], ref, rtol=1e-5, atol=1e-6)
    again = embed_domains(model, load_dataset(root, stream_threshold=0), cfg, device="cpu", cache_dir=cache)
    assert again.computed == [] and torch.equal(again.embeddings, first.embeddings)
    # touching a file changes its identity, hence the key
    f = root / "dna" / "part0.txt"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    third = embed_domains(model, load_dataset(root, stream_threshold=0), cfg, device="cpu", cache_dir=cache)
    assert third.computed == ["dna"]
    # reference pooling re-tokenises the same drawn windows (its own cache key)
    ref_cfg = EmbedConfig(n_windows=8, window=16, batch_size=4, seed=1, pooling="reference")
    pooled = embed_domains(model, ds, ref_cfg, device="cpu", cache_dir=cache)
    assert sorted(pooled.computed) == ["alpha", "dna"] and bool(torch.isfinite(pooled.embeddings).all())


def _pretokenised_domain(data, fmt):
    """A Megatron or nanoGPT domain of byte ids under ``data``; its token stream."""
    d = data / fmt
    d.mkdir(parents=True)
    stream = reference_stream(make_docs(40, seed=8))
    if fmt == "megatron":
        write_megatron_by_spec(str(d / "part"), [stream[:700], stream[700:]], [1, 2], 8, np.uint16)
    else:
        stream.astype(np.uint16).tofile(d / "train.bin")
        (d / "meta.json").write_text('{"dtype": "uint16", "vocab_size": 257}')
    return d.name, stream


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("fmt", RAW_FORMATS + ["megatron", "nanogpt"])
def test_every_format_embeds_and_trains(tmp_path, fmt, streamed):
    data = tmp_path / "data"
    write_text_domains(data, names=("alpha",))
    if fmt in ("megatron", "nanogpt"):
        name, stream = _pretokenised_domain(data, fmt)
    else:
        d, order = build_domain(data, fmt, make_docs(40, seed=8))
        name, stream = d.name, reference_stream(order)
    ds = load_dataset(data, stream_threshold=0 if streamed else dataset_mod.STREAM_THRESHOLD_BYTES)
    assert ds.is_streamed(name) == (streamed and fmt not in ("megatron", "nanogpt"))
    model = _model(seed=2)
    cfg = EmbedConfig(n_windows=6, window=16, batch_size=4, seed=3)
    emb = embed_domains(model, ds, cfg, device="cpu")
    from chameleon_ext.embed_windows import domain_seed
    w = ds.draw_windows(name, 6, 16, domain_seed(3, name))
    if not ds.is_streamed(name):  # windows of the training split (held-out blocks cut out)
        np.testing.assert_array_equal(np.asarray(ds.train_tokens(name).base).astype(np.int64), stream)
        stream = np.asarray(ds.train_tokens(name)).astype(np.int64)
    assert_windows_in_stream(w, stream)
    with torch.no_grad():
        ref = model.hidden_states(torch.from_numpy(w), model.default_embedding_layer).double().mean((0, 1))
    torch.testing.assert_close(emb.embeddings[ds.domains.index(name)], ref, rtol=1e-5, atol=1e-6)
    small = GPT(GPTConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=16, block_size=BLOCK), seed=0)
    res = train(small, ds, "uniform", TrainConfig(steps=2, batch_size=4, warmup_steps=1, ckpt_every=0, log_every=1,
                                                  eval_every=0, device="cpu", out_dir=str(tmp_path / "run"),
                                                  quiet=True))
    assert res["step"] == 2 and np.isfinite(res["loss"])


def test_streamed_weights_agree_with_cached_on_builtin_like_data(tmp_path):
    """Chameleon weights from per-window embeddings of the built-in data, drawn from the token
    cache vs streamed from the files: each streamed weight lies within twice the half-width of
    the cached estimate's 95% bootstrap interval of it (two independent samples: their
    difference has sqrt(2) times one sample's spread)."""
    from chameleon_ext.data import builtin_dataset_path
    from chameleon_ext.uncertainty import bootstrap_weights
    from chameleon_ext.weights import weights_from_embeddings

    src = builtin_dataset_path(tmp_path / "b")
    cached, streamed = load_dataset(src), load_dataset(src, stream_threshold=0)
    assert all(streamed.is_streamed(n) for n in streamed.domains)
    model = _model(seed=3)
    n, length = 96, 32

    def windows(ds):
        out = []
        for i, name in enumerate(ds.domains):
            w = torch.from_numpy(ds.draw_windows(name, n, length, np.random.default_rng([7, i])))
            with torch.no_grad():
                out.append(model.hidden_states(w, 1).double().mean(1))  # [n, H]
        return out

    wc, ws = windows(cached), windows(streamed)
    boot = bootstrap_weights(wc, resamples=200, seed=0, domains=cached.domains, window_fractions=())
    point_s = weights_from_embeddings(torch.stack([w.mean(0) for w in ws]), domains=streamed.domains).weights
    half = (boot.weights_high - boot.weights_low) / 2
    diff = (point_s - boot.point.weights).abs()
    assert bool((diff <= 2 * half + 1e-9).all()), (diff, half)


# ----------------------------------------------------------------------------- training


def _streamed_mix(tmp_path):
    """Three small text domains, the largest of them streamed: ``(dataset, its name)``."""
    root = tmp_path / "mix"
    write_text_domains(root, names=("alpha", "digits", "dna"))
    (root / "web").mkdir()  # many documents, so its validation units (by hash) are not empty
    write_jsonl(str(root / "web" / "a.jsonl"), make_docs(120, seed=6))
    sizes = {n: sum(f.stat().st_size for f in (root / n).iterdir()) for n in ("alpha", "digits", "dna", "web")}
    big = max(sizes, key=sizes.get)
    ds = load_dataset(root, stream_threshold=max(v for n, v in sizes.items() if n != big))
    assert [n for n in ds.domains if ds.is_streamed(n)] == [big]
    return ds, big


def test_sampler_streamed_rows_world_size_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(sampler_mod, "STREAM_BUFFER_WINDOWS", 3)  # refills within a few batches
    ds, big = _streamed_mix(tmp_path)
    one = WeightedDomainSampler(ds, "uniform", BLOCK, seed=4)
    batches = [one.sample(6) for _ in range(5)]
    # a streamed row is a window drawn by draw_windows with (seed, domain, refill)
    for x, y, dom in batches:
        assert torch.equal(x[:, 1:], y[:, :-1])
    # the ranks' rows make the single-process batch
    ranks = [WeightedDomainSampler(ds, "uniform", BLOCK, seed=4, rank=r, world_size=2) for r in (0, 1)]
    for x, _, dom in batches:
        parts = [s.sample(6) for s in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[2] for p in parts]), dom)
    # resume: a fresh sampler given the state after batch 2 continues the same stream
    s = WeightedDomainSampler(ds, "uniform", BLOCK, seed=4)
    for _ in range(2):
        s.sample(6)
    state = s.state_dict()
    assert state["streams"][big][0] >= 1
    resumed = WeightedDomainSampler(ds, "uniform", BLOCK, seed=4)
    resumed.load_state_dict(state)
    for x, _, _ in batches[2:]:
        assert torch.equal(resumed.sample(6)[0], x)


def test_streamed_rows_are_the_seeded_buffers(tmp_path, monkeypatch):
    import hashlib
    monkeypatch.setattr(sampler_mod, "STREAM_BUFFER_WINDOWS", 4)
    ds, big = _streamed_mix(tmp_path)
    s = WeightedDomainSampler(ds, {n: float(n == big) for n in ds.domains}, BLOCK, seed=9)
    rows = torch.cat([s.sample(3)[0] for _ in range(4)])  # 12 rows = 3 buffers of 4
    digest = int.from_bytes(hashlib.sha256(big.encode()).digest()[:8], "little")
    ref = np.concatenate([ds.draw_windows(big, 4, BLOCK + 1, np.random.default_rng([9, digest, k]))
                          for k in range(3)])
    np.testing.assert_array_equal(rows.numpy(), ref[:, :-1])


def test_train_on_streamed_domain_is_reproducible_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(sampler_mod, "STREAM_BUFFER_WINDOWS", 5)
    ds, big = _streamed_mix(tmp_path)

    def cfg(out, **kw):
        return TrainConfig(**dict(steps=6, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, ckpt_every=0,
                                  log_every=2, eval_every=0, eval_windows=2, device="cpu",
                                  out_dir=str(out), quiet=True, **kw))

    def m(seed=0):
        return GPT(GPTConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=16, block_size=BLOCK), seed=seed)

    a, b = m(), m()
    ra = train(a, ds, "uniform", cfg(tmp_path / "a"))
    train(b, ds, "uniform", cfg(tmp_path / "b"))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    c = m()
    train(c, ds, "uniform", cfg(tmp_path / "c"), stop_at=3)
    resumed = m(seed=11)
    rc = train(resumed, ds, "uniform", cfg(tmp_path / "c"))
    assert rc["loss"] == ra["loss"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # validation windows of the streamed domain come from its validation units
    ev = evaluate(a, ds, 3, BLOCK, seed=0, device="cpu")
    assert all(np.isfinite(ev[n]["ppl"]) for n in ds.domains)


# ----------------------------------------------------------------------------- budget and CLI


def test_token_budget_counts_and_estimates(tmp_path):
    from chameleon_ext.pipeline import plan_budget
    from chameleon_ext.weights import weights_from_embeddings

    ds, big = _streamed_mix(tmp_path)
    result = weights_from_embeddings(torch.eye(4, 5, dtype=torch.float64), domains=ds.domains)
    plan = plan_budget(ds, result, 10_000)
    src = {d.domain: d.token_count_source for d in plan.domains}
    small = next(n for n in ds.domains if n != big)
    assert src[small].startswith("counted") and src[big].startswith("estimated")
    n = {d.domain: d.token_count for d in plan.domains}
    assert n[small] == ds.n_tokens(small)
    exact = reference_stream(make_docs(120, seed=6)).size * 0.9
    assert abs(n[big] - exact) <= 0.2 * exact


def test_cli_text_field_and_corrupt_file(tmp_path, capsys):
    from chameleon_ext.cli import main

    data = tmp_path / "data"
    write_text_domains(data, names=("alpha",))
    d = data / "web"
    d.mkdir()
    write_jsonl(str(d / "a.jsonl.gz"), make_docs(30), field="body", opener=gzip.open)
    args = ["train-proxy", "--data", str(data), "--steps", "2", "--preset", "tiny", "--block-size", "16",
            "--batch-size", "2", "--warmup", "1", "--ckpt-every", "0", "--eval-windows", "1",
            "--device", "cpu", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "p"), "--text-field", "body"]) == 0
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "q")]) == 2  # no "text" field
    err = capsys.readouterr().err.strip()
    assert "a.jsonl.gz" in err and len(err.splitlines()) == 1
    raw = (d / "a.jsonl.gz").read_bytes()
    (d / "a.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    shutil.rmtree(data / ".chameleon_cache")
    assert main(args + ["--out", str(tmp_path / "r"), "--text-field", "body"]) == 2
    err = capsys.readouterr().err.strip()
    assert "a.jsonl.gz" in err and len(err.splitlines()) == 1
