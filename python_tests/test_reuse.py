"""Commands that reuse earlier work say on the terminal what they reused and why it still holds:
a resumed training run, a rerun past its ``--steps``, the embedding cache of ``embed`` and
``weights``. (The comparison's records: test_compare.py.)"""

from __future__ import annotations

import pytest

from .factories import ok_cli, write_text_domains

TRAIN = ["--preset", "tiny", "--block-size", "16", "--batch-size", "2", "--warmup", "1", "--eval-windows", "2",
         "--device", "cpu"]
EMBED = ["--n-windows", "4", "--window", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_text_domains(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def proxy(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("proxy")
    from chameleon_ext.cli import main

    assert main(["train-proxy", "--data", data, "--out", str(out), "--steps", "4", "--ckpt-every", "2",
                 "--quiet", *TRAIN]) == 0
    return out


@pytest.mark.parametrize("quiet", [True, False])
def test_train_proxy_past_its_steps_says_so(proxy, data, capsys, quiet):
    out = ok_cli(["train-proxy", "--data", data, "--out", proxy, "--steps", "2", *TRAIN]
                 + (["--quiet"] if quiet else []), capsys)
    assert out.count("past steps=2") == 1 and "nothing to train" in out
    assert "proxy written" not in out and "unchanged" in out


def test_train_past_its_steps_says_so_once(proxy, data, tmp_path, capsys):
    ok_cli(["train", "--data", data, "--out", tmp_path, "--steps", "3", "--ckpt-every", "1", "--quiet", *TRAIN],
           capsys)
    out = ok_cli(["train", "--data", data, "--out", tmp_path, "--steps", "2", *TRAIN], capsys)
    assert out.count("past steps=2") == 1
    assert "resumed from" in out and "every domain's data fingerprint matches" in out


def test_embed_and_weights_say_what_came_from_the_cache(proxy, data, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = ok_cli(["embed", "--data", data, "--proxy", proxy, "--out", tmp_path / "e1", "--embed-cache", cache,
                    "--quiet", *EMBED], capsys)
    assert "reused from the cache" not in first
    again = ok_cli(["embed", "--data", data, "--proxy", proxy, "--out", tmp_path / "e2", "--embed-cache", cache,
                    "--quiet", *EMBED], capsys)
    assert "embeddings of 3 domain(s) ['alpha', 'digits', 'dna'] reused from the cache" in again
    assert "data fingerprint" in again
    w = ok_cli(["weights", "--data", data, "--proxy", proxy, "--out", tmp_path / "w", "--embed-cache", cache,
                "--quiet", "--bootstrap", "0", "--no-plots", *EMBED], capsys)
    assert "reused from the cache" in w and "proxy's content hash" in w


def test_a_single_domain_is_a_note_not_a_raw_warning(proxy, tmp_path, capsys):
    import warnings

    write_text_domains(tmp_path / "one", names=["dna"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ok_cli(["weights", "--data", tmp_path / "one", "--proxy", proxy, "--out", tmp_path / "w", "--quiet",
                      "--no-plots", "--bootstrap", "5", *EMBED], capsys)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert "note: only one domain: its weight is 1.0" in out
