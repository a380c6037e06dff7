"""Intervals, diagnostics and sweeps through the package: the per-window means the embedding
pass keeps (against an independent re-computation), their cache, ``chameleon weights
--bootstrap`` and ``chameleon sweep`` end to end on a tiny dataset. The CLI's numbers are
checked against the library called directly on the cached windows, and the sweep against a
loop of plain scalar-lambda weights."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch

from chameleon_ext import embed_cache, io, uncertainty as U, weights as W
from chameleon_ext.uncertainty import bootstrap as bootstrap_module
from chameleon_ext.cli import main
from chameleon_ext.data import load_dataset
from chameleon_ext.embed import EmbedConfig, embed_domains, load_domain_embeddings, window_starts
from chameleon_ext.model import load_model
from chameleon_ext.weights import weights_from_embeddings

from .factories import TEXT_DOMAINS, write_text_domains
from .factories import ok_cli as _ok, run_cli as _run

COMMON = ["--device", "cpu", "--quiet"]
N_WINDOWS, WINDOW = 12, 32
EMBED = ["--n-windows", str(N_WINDOWS), "--window", str(WINDOW)]
TRAIN = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--warmup", "1", "--ckpt-every", "0",
         "--eval-windows", "2"]
B = 200




def _json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("uncertainty_cli")
    write_text_domains(root / "data", names=TEXT_DOMAINS)
    assert main(["train-proxy", "--data", str(root / "data"), "--out", str(root / "proxy"), "--steps", "3",
                 *TRAIN, *COMMON]) == 0
    return root


def _weights(work, out, *extra, cache="cache"):
    return ["weights", "--data", work / "data", "--proxy", work / "proxy" / "model.pt", "--out", work / out,
            "--embed-cache", work / cache, *EMBED, *COMMON, *extra]


@pytest.fixture(scope="module")
def first_run(work):
    """``chameleon weights --bootstrap 200`` from a fresh cache; (stdout, weights.json)."""
    import contextlib
    import io as _io

    buf = _io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([str(a) for a in _weights(work, "w1", "--bootstrap", B)]) == 0
    return buf.getvalue(), _json(work / "w1" / "weights.json")


def _cached_windows(cache_dir):
    """{domain: [n, d]} read straight from the per-window cache files (not through embed)."""
    out = {}
    for path in glob.glob(os.path.join(cache_dir, "*.windows.pt")):
        entry = io.read_torch(path)
        key = os.path.basename(path)[: -len(".windows.pt")]
        out[entry["domain"]] = embed_cache.unpack_window_embeddings(entry, key, entry["domain"])
    return out


# --------------------------------------------------------------------------- the per-window means


def test_window_means_match_an_independent_forward(work):
    """Each kept row is that window's mean hidden state at the pooled layer (float64 torch),
    and the windows' mean is the domain embedding."""
    model = load_model(str(work / "proxy" / "model.pt"))
    ds = load_dataset(str(work / "data"))
    cfg = EmbedConfig(n_windows=7, window=WINDOW, batch_size=3, seed=4)  # batches cross domains
    emb = embed_domains(model, ds, cfg, device="cpu", windows=True)
    layer = model.default_embedding_layer
    model.eval()
    assert emb.windows is not None and len(emb.windows) == len(ds.domains)
    for name, w, x in zip(emb.domains, emb.windows, emb.embeddings):
        ids = torch.from_numpy(ds.windows_at(name, window_starts(ds, name, cfg), WINDOW)).long()
        with torch.no_grad():
            ref = model.double().hidden_states(ids, layer).mean(1)  # [n, H] float64
        model.float()
        assert w.dtype == torch.float32 and w.shape == (7, model.config.n_embd)
        torch.testing.assert_close(w.double(), ref, rtol=0, atol=2e-5)
        torch.testing.assert_close(w.double().mean(0), x, rtol=0, atol=2e-6)


def test_reference_pooling_windows_are_the_deduplicated_vectors(work):
    model = load_model(str(work / "proxy" / "model.pt"))
    ds = load_dataset(str(work / "data"))
    cfg = EmbedConfig(n_windows=6, window=WINDOW, batch_size=4, seed=1, pooling="reference")
    emb = embed_domains(model, ds, cfg, device="cpu", windows=True)
    for w, count, x in zip(emb.windows, emb.counts, emb.embeddings):
        assert w.shape[0] == count  # one row per distinct window vector
        assert torch.unique(w, dim=0).shape[0] == count
        torch.testing.assert_close(w.double().mean(0), x, rtol=0, atol=2e-6)


# --------------------------------------------------------------------------- chameleon weights --bootstrap


def test_weights_json_matches_the_library_on_the_cached_windows(work, first_run):
    out, doc = first_run
    windows = _cached_windows(str(work / "cache"))
    assert sorted(windows) == sorted(doc["domains"])
    emb = torch.load(work / "w1" / "domain_embeddings.pt", weights_only=False)
    # the command's defaults are the library's: the default rule, lambda chosen from the spectrum
    point = weights_from_embeddings(emb["embeddings"], "pretrain", domains=emb["domains"])
    assert doc["lambda"] == point.lam and doc["rule"] == point.rule and doc["lambda_selection"]["method"] == "auto"
    for d in doc["domains"]:  # the point estimate in weights.json is the plain path's
        assert doc["weights"][d] == pytest.approx(float(point.weights[emb["domains"].index(d)]), abs=1e-15)
    boot = U.bootstrap_weights([windows[d] for d in emb["domains"]], resamples=B, seed=0, point=point)
    expected = json.loads(json.dumps(boot.to_dict()))
    assert doc["bootstrap"] == expected
    # the scale-free lambda is chosen again per resample: its interval is recorded
    lam_iv = doc["bootstrap"]["lambda_interval"]
    assert lam_iv["point"] == doc["lambda"] and 0 < lam_iv["low"] <= lam_iv["high"]
    assert doc["bootstrap"]["resamples"] == B and doc["bootstrap"]["seed"] == 0
    assert doc["bootstrap"]["n_windows"] == {d: N_WINDOWS for d in doc["domains"]}
    assert doc["diagnostics"] == json.loads(json.dumps(U.diagnose(point, emb["embeddings"], boot).to_dict()))
    for d in doc["domains"]:
        lo, hi = doc["bootstrap"]["weights"]["low"][d], doc["bootstrap"]["weights"]["high"][d]
        assert lo <= doc["weights"][d] <= hi or hi - lo < 1e-12
    # Printed: the per-domain lines, the bootstrap table and the diagnostics.
    assert f"bootstrap: {B} resamples of {N_WINDOWS} windows, seed 0" in out
    assert "effective dimension sum(S) =" in out and "weight interval width by windows per domain" in out
    # Written beside the weights, listed by the output set, with error bars in weights.png.
    manifest = _json(work / "w1" / "manifest.json")
    assert {"weights.json", "domain_embeddings.pt", "window_embeddings.pt"} <= set(manifest["files"])
    if "weights.png" in manifest["files"]:  # matplotlib installed
        assert os.path.getsize(work / "w1" / "weights.png") > 0


def test_same_seed_same_intervals_and_the_cache_is_reused(work, first_run, capsys):
    _, doc = first_run
    _ok(_weights(work, "w2", "--bootstrap", B), capsys)
    again = _json(work / "w2" / "weights.json")
    assert again["embedding"]["embedded_now"] == []  # every domain (and its windows) from the cache
    assert again["bootstrap"] == doc["bootstrap"] and again["diagnostics"] == doc["diagnostics"]
    _ok(_weights(work, "w3", "--bootstrap", B, "--bootstrap-seed", 7), capsys)
    other = _json(work / "w3" / "weights.json")["bootstrap"]
    assert other["seed"] == 7 and other["weights"]["low"] != doc["bootstrap"]["weights"]["low"]
    # --seed is the default bootstrap seed
    _ok(["weights", "--embeddings", work / "w1" / "domain_embeddings.pt", "--out", work / "w4", "--seed", 7,
         "--bootstrap", B, *COMMON], capsys)
    assert _json(work / "w4" / "weights.json")["bootstrap"] == other


def test_embeddings_input_reads_the_window_file_beside_it(work, first_run, capsys):
    _, doc = first_run
    _ok(["weights", "--embeddings", work / "w1" / "domain_embeddings.pt", "--out", work / "e1", "--bootstrap", B,
         *COMMON], capsys)
    assert _json(work / "e1" / "weights.json")["bootstrap"] == doc["bootstrap"]
    # Without the window file: diagnostics only, and a note saying why.
    shutil.copy(work / "w1" / "domain_embeddings.pt", work / "lonely.pt")
    out = _ok(["weights", "--embeddings", work / "lonely.pt", "--out", work / "e2", *COMMON], capsys)
    assert "no window_embeddings.pt" in out
    lonely = _json(work / "e2" / "weights.json")
    assert lonely["bootstrap"] is None and lonely["diagnostics"]["windows"] is None
    assert lonely["diagnostics"]["effective_dimension"] == doc["diagnostics"]["effective_dimension"]


def test_bootstrap_zero_writes_diagnostics_and_old_caches_stay_valid(work, first_run, capsys):
    _, doc = first_run
    shutil.copytree(work / "cache", work / "old_cache")
    for path in glob.glob(str(work / "old_cache" / "*.windows.pt")):  # a cache from before the windows
        os.remove(path)
    out = _ok(_weights(work, "z", "--bootstrap", 0, cache="old_cache"), capsys)
    z = _json(work / "z" / "weights.json")
    assert z["embedding"]["embedded_now"] == [] and z["bootstrap"] is None
    assert z["weights"] == doc["weights"]
    assert z["diagnostics"]["effective_dimension"] == doc["diagnostics"]["effective_dimension"]
    assert z["diagnostics"]["windows"] is None and "bootstrap:" not in out and "effective dimension" in out
    assert not os.path.exists(work / "z" / "window_embeddings.pt")
    # The bootstrap on: the missing windows are a cache miss, recomputed with a warning.
    with pytest.warns(UserWarning, match="no per-window means"):
        _ok(_weights(work, "z2", "--bootstrap", B, cache="old_cache"), capsys)
    z2 = _json(work / "z2" / "weights.json")
    assert sorted(z2["embedding"]["embedded_now"]) == sorted(doc["domains"])
    assert z2["bootstrap"] == doc["bootstrap"]
    assert len(glob.glob(str(work / "old_cache" / "*.windows.pt"))) == len(doc["domains"])


def test_a_damaged_window_file_is_recomputed(work, first_run, capsys):
    _, doc = first_run
    shutil.copytree(work / "cache", work / "bad_cache")
    victim = sorted(glob.glob(str(work / "bad_cache" / "*.windows.pt")))[0]
    entry = io.read_torch(victim)
    entry["windows"][0, 0] += 1.0  # the checksum no longer matches
    io.save_torch(entry, victim)
    with pytest.warns(UserWarning, match="damaged"):
        _ok(_weights(work, "d", "--bootstrap", B, cache="bad_cache"), capsys)
    d = _json(work / "d" / "weights.json")
    assert d["embedding"]["embedded_now"] == [entry["domain"]]
    # Re-embedding one domain alone batches its windows differently from the first run, so the
    # forward pass may round differently in the last bits: equal up to that, not bit for bit.
    _assert_close_tree(d["bootstrap"], doc["bootstrap"], tol=1e-7)


def _assert_close_tree(a, b, tol, path="bootstrap"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            _assert_close_tree(a[key], b[key], tol, f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close_tree(x, y, tol, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= tol * max(1.0, abs(b)), (path, a, b)
    else:
        assert a == b, (path, a, b)


# --------------------------------------------------------------------------- chameleon sweep


LAMS, TEMPS = [0.1, 1.0, 10.0, 100.0, 1000.0], [1.0, 5.0]


def test_sweep_from_embeddings_equals_scalar_calls(work, first_run, capsys):
    emb_path = work / "w1" / "domain_embeddings.pt"
    out = _ok(["sweep", "--embeddings", emb_path, "--lam", ",".join(map(str, LAMS)), "--temperature", "1,5",
               "--mode", "finetune", "--out", work / "s", *COMMON], capsys)
    doc = _json(work / "s" / "sweep.json")
    emb = load_domain_embeddings(str(emb_path))
    assert doc["lambdas"] == LAMS and doc["temperatures"] == TEMPS and doc["mode"] == "finetune"
    assert len(doc["results"]) == len(LAMS) * len(TEMPS)
    for r in doc["results"]:
        plain = weights_from_embeddings(emb.embeddings, "finetune", lam=r["lambda"], temperature=r["temperature"],
                                        domains=emb.domains)
        for i, d in enumerate(emb.domains):
            assert r["weights"][d] == pytest.approx(float(plain.weights[i]), abs=1e-12)
    for i, lam in enumerate(LAMS):
        raw = weights_from_embeddings(emb.embeddings, lam=lam).leverage_raw
        assert doc["effective_dimension"][i] == pytest.approx(float(raw.sum()), abs=1e-12)
    assert "sum(S)" in out and len([l for l in out.splitlines() if l.strip().startswith("0.1 ")]) == 2
    if os.path.exists(work / "s" / "sweep.png"):  # matplotlib installed: one picture per temperature
        assert os.path.getsize(work / "s" / "sweep.png") > 0 and os.path.getsize(work / "s" / "sweep_T5.png") > 0


def test_sweep_from_data_and_proxy_uses_the_cache(work, first_run, capsys):
    _ok(["sweep", "--data", work / "data", "--proxy", work / "proxy" / "model.pt", "--embed-cache", work / "cache",
         *EMBED, "--out", work / "s2", "--no-plots", *COMMON], capsys)
    doc = _json(work / "s2" / "sweep.json")
    assert doc["lambdas"] == [float(x) for x in U.DEFAULT_SWEEP_LAMBDAS] and doc["temperatures"] == [W.RULE_DEFAULTS[W.DEFAULT_RULE]["temperature"]["pretrain"]]
    emb = load_domain_embeddings(str(work / "w1" / "domain_embeddings.pt"))
    plain = weights_from_embeddings(emb.embeddings, lam=10.0, domains=emb.domains)
    at10 = next(r for r in doc["results"] if r["lambda"] == 10.0)
    assert at10["weights"] == pytest.approx(dict(zip(emb.domains, plain.weights.tolist())), abs=1e-12)
    assert not os.path.exists(work / "s2" / "sweep.png")


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("argv, option", [
    (["weights", "--embeddings", "E", "--bootstrap", "-1"], "--bootstrap"),
    (["sweep", "--embeddings", "E", "--lam", ""], "--lam"),
    (["sweep", "--embeddings", "E", "--lam", "1,-2"], "--lam"),
    (["sweep", "--embeddings", "E", "--lam", "1,,2"], "--lam"),
    (["sweep", "--embeddings", "E", "--lam", "ten"], "--lam"),
    (["sweep", "--embeddings", "E", "--temperature", "0"], "--temperature"),
])
def test_bad_options_are_one_line_exit_2(work, capsys, argv, option):
    argv = [str(work / "w1" / "domain_embeddings.pt") if a == "E" else a for a in argv]
    code, out, err = _run(argv + ["--out", str(work / "bad"), *COMMON], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and option in err, err
    assert not os.path.exists(work / "bad" / "sweep.json")


# --------------------------------------------------------------------------- chameleon run, --help


def test_run_bootstraps_its_weights(tmp_path, capsys):
    data = write_text_domains(tmp_path / "data")
    out_dir = tmp_path / "run"
    out = _ok(["run", "--data", data, "--out", out_dir, "--preset", "tiny", "--proxy-steps", "3", "--steps", "3",
               "--block-size", "32", *EMBED, "--eval-windows", "2", "--batch-size", "4", "--bootstrap", 50,
               "--bootstrap-seed", 3, *COMMON], capsys)
    doc = _json(out_dir / "weights" / "weights.json")
    assert doc["bootstrap"]["resamples"] == 50 and doc["bootstrap"]["seed"] == 3
    assert "bootstrap: 50 resamples" in out and "effective dimension" in out
    # The same numbers from the library on the window file written beside the weights.
    emb = load_domain_embeddings(str(out_dir / "weights" / "domain_embeddings.pt"), windows=True)
    point = weights_from_embeddings(emb.embeddings, domains=emb.domains)
    boot = U.bootstrap_weights(emb.windows, resamples=50, seed=3, point=point)
    assert doc["bootstrap"] == json.loads(json.dumps(boot.to_dict()))


@pytest.mark.parametrize("command", ["weights", "run"])
def test_help_shows_the_library_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--bootstrap B" in out and f"(default: {U.DEFAULT_RESAMPLES})" in out and "--bootstrap-seed" in out


def test_a_window_file_for_other_domains_is_an_error(work, first_run, capsys):
    folder = work / "mismatch"
    folder.mkdir()
    shutil.copy(work / "w1" / "domain_embeddings.pt", folder / "domain_embeddings.pt")
    entry = embed_cache.pack_window_embeddings(torch.zeros(3, 8), key="other", domain="other")
    torch.save({"format": "chameleon_ext.window_embedding_set/1", "domains": ["other"], "entries": [entry]},
               folder / "window_embeddings.pt")
    code, _, err = _run(["weights", "--embeddings", folder / "domain_embeddings.pt", "--out", work / "mm", *COMMON],
                        capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "window_embeddings.pt" in err and "other" in err
    # --bootstrap 0 does not read it
    _ok(["weights", "--embeddings", folder / "domain_embeddings.pt", "--out", work / "mm", "--bootstrap", 0,
         *COMMON], capsys)


# --------------------------------------------------------------------------- --bootstrap bounded by memory


def test_bootstrap_bytes_is_what_the_bootstrap_holds():
    """The estimate counts each buffer that grows with the resamples (hand-computed for k = 3
    domains of 128 windows of 64 float32 values, 3 blocks: 1536 + 256 + 1536 + 432 + 216 + 96)."""
    assert U.bootstrap_bytes([128, 100, 128], 64, 1) == 4072
    assert U.bootstrap_bytes([128, 100, 128], 64, 10**9) == 4072 * 10**9
    assert U.bootstrap_bytes([5, 5], 8, 7, fractions=(), sum_bytes=8) == 7 * (5 * 16 + 64 + 128 + 64 + 48 + 64)


def test_a_bootstrap_too_large_for_memory_is_refused_before_any_allocation(monkeypatch):
    ws = [torch.randn(128, 64) for _ in range(3)]
    allocated = []
    monkeypatch.setattr(bootstrap_module, "_draw_counts", lambda *a: allocated.append(a) or (_ for _ in ()).throw(AssertionError))
    free = 3 * 2**30
    monkeypatch.setattr(bootstrap_module, "available_memory", lambda device="cpu": free)
    with pytest.raises(U.ChameleonUserError) as info:
        U.bootstrap_weights(ws, resamples=10**9)
    text = str(info.value)
    largest = free // 4072
    assert f"the largest --bootstrap that fits is {largest:,}" in text and "\n" not in text
    assert "--bootstrap" in text and "GiB" in text and not allocated
    assert U.bootstrap_bytes([128] * 3, 64, largest) <= free < U.bootstrap_bytes([128] * 3, 64, largest + 1)


@pytest.mark.parametrize("B", [10**7 * 4, 10**9])
def test_cli_bootstrap_too_large_is_one_line_before_embedding(work, capsys, monkeypatch, B):
    from chameleon_ext import pipeline

    monkeypatch.setattr(bootstrap_module, "available_memory", lambda device="cpu": 2**34)  # 16 GiB free
    monkeypatch.setattr(pipeline, "embed_domains", lambda *a, **k: pytest.fail("embedded before the check"))
    code, out, err = _run(_weights(work, "toolarge", "--bootstrap", B, cache="cache_toolarge"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--bootstrap) {B:,}" in err and "the largest --bootstrap that fits is" in err
    assert "Traceback" not in err


def test_sweep_and_weights_refuse_a_lambda_too_small_alike(work, capsys):
    """One checking path: the lambda below the affinity's rounding level is the same one-line
    exit 2 in `sweep` as in `weights`, not a ValueError traceback."""
    # (three domains in 16 dimensions: krls refuses lambda = 1e-300 for their affinity)
    X = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    emb = str(work / "spread.pt")
    torch.save({"domains": ["a", "b", "c"], "embeddings": X, "counts": [1] * 3, "settings": {}}, emb)
    errors = {}
    for command in ("weights", "sweep"):
        code, out, err = _run([command, "--embeddings", emb, "--lam", "1e-300", "--out", work / f"tiny_{command}",
                               "--no-plots", *COMMON], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        errors[command] = err
        assert "lam = 1e-300 is too small" in err and "use a larger lam" in err, err
    assert not os.path.exists(work / "tiny_sweep" / "sweep.json")
