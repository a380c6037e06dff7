"""The natural mixture: token shares."""

import pytest

from chameleon_ext.baselines import dataset_token_counts, natural_weights
from chameleon_ext.data.dataset import load_dataset
from chameleon_ext.errors import ChameleonUserError


def test_token_shares_by_hand():
    assert natural_weights({"a": 1, "b": 3, "c": 0}) == {"a": 0.25, "b": 0.75, "c": 0.0}
    w = natural_weights({"x": 7, "y": 13})
    assert list(w) == ["x", "y"] and w["x"] == 7 / 20 and w["y"] == 13 / 20


def test_equal_token_shares_of_a_dataset(tmp_path):
    sizes = {"alpha": 3000, "beta": 1000, "gamma": 6000}
    for name, n in sizes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "doc.txt").write_text("ab" * (n // 2))
    ds = load_dataset(tmp_path, cache_dir=tmp_path / ".cache")
    counts = dataset_token_counts(ds)
    assert counts == {d: len(ds.tokens(d, "train")) for d in ds.domains}
    w = natural_weights(counts)
    total = sum(len(ds.tokens(d, "train")) for d in ds.domains)
    for d in ds.domains:
        assert w[d] == pytest.approx(len(ds.tokens(d, "train")) / total, abs=1e-15)
    # byte tokenizer: shares follow the byte counts up to the per-domain split rounding
    assert w["gamma"] == pytest.approx(0.6, abs=0.01) and w["beta"] == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("bad", [{}, {"a": -1}, {"a": 0, "b": 0}, {"a": float("nan")}, {"a": True}])
def test_bad_counts_raise(bad):
    with pytest.raises(ChameleonUserError, match="token_counts"):
        natural_weights(bad)
