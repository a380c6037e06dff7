"""CompareConfig holds the base runs' TrainConfig and Chameleon's EmbedConfig; what an out folder
pins and what each unit's record names keep the keys the previous (flat) layout wrote, so an
out folder written before is read and compared the same; a setting that the previous layout
could not change is pinned only when it is changed, and then refused against an old folder."""

from __future__ import annotations

import dataclasses

import pytest

from chameleon_ext.compare import CompareConfig, Comparison, stale_reason
from chameleon_ext.compare.config import (COMMON_KEYS, EXTRA_KEYS, KIND_KEYS, changed_settings, compare_embed_config,
                                          compare_train_config, pinned_extras, pinned_settings)
from chameleon_ext.embed import EmbedConfig
from chameleon_ext.errors import ChameleonUserError
from chameleon_ext.train_config import TrainConfig

# Written by the previous layout (flat CompareConfig) for `chameleon compare --mixtures
# uniform,chameleon,doremi,regmix,online --seeds 2 --steps 3 --block-size 16 --batch-size 4
# --eval-windows 2 --warmup 1 --proxy-steps 2 --regmix-proxies 3 --regmix-steps 2
# --embed-windows 4 --ckpt-every 2`: compare_settings.json (less its data fingerprints) and the
# "settings" of three records' provenance.
OLD_SETTINGS_FILE = {"seed": 0, "preset": "tiny", "block_size": 16, "batch_size": 4, "lr": 0.003, "warmup": 1,
                     "eval_windows": 2, "eval_seed": 0, "test_fraction": 0.1, "val_fraction": 0.1, "steps": 3,
                     "proxy_steps": 2, "embed_windows": 4, "regmix_proxies": 3, "regmix_steps": 2}
_COMMON = {"seed": 0, "preset": "tiny", "block_size": 16, "batch_size": 4, "lr": 0.003, "warmup": 1,
           "eval_windows": 2, "eval_seed": 0, "test_fraction": 0.1, "val_fraction": 0.1}
OLD_RECORD_SETTINGS = {"chameleon": {**_COMMON, "proxy_steps": 2, "embed_windows": 4, "mode_lam": None},
                       "base": {**_COMMON, "steps": 3},
                       "regmix": {**_COMMON, "regmix_proxies": 3, "regmix_steps": 2}}


def _cfg(train=None, embed=None, **kw):
    kw = {"mixtures": ["uniform", "chameleon", "doremi", "regmix", "online"], "seeds": 2, "proxy_steps": 2,
          "regmix_proxies": 3, "regmix_steps": 2, **kw}
    return CompareConfig(**kw, train=compare_train_config(**{
        "steps": 3, "block_size": 16, "batch_size": 4, "eval_windows": 2, "warmup_steps": 1, "ckpt_every": 2,
        **(train or {})}), embed=compare_embed_config(**{"n_windows": 4, **(embed or {})}))


class _Data:
    """What Comparison.provenance reads of a dataset."""

    domains = ["alpha", "digits", "dna"]
    vocab_size = 256

    def n_tokens(self, d, split):
        return 100

    def fingerprint(self, d):
        return "fp-" + d

    def tokenizer_record(self):
        return {"sha256": "tok"}


def _provenance(cfg, kind, tmp_path):
    return Comparison(_Data(), cfg, str(tmp_path)).provenance(_Data(), kind)


def test_defaults_are_the_comparisons_not_the_trainers():
    cfg = CompareConfig()
    t, e = cfg.train, cfg.embed
    assert (t.steps, t.block_size, t.batch_size, t.warmup_steps, t.ckpt_every, t.lr, t.eval_windows, t.seed) == \
        (60, 64, 16, 10, 20, 3e-3, 32, 0)
    assert (e.n_windows, cfg.proxy_steps, cfg.regmix_proxies, cfg.regmix_steps, cfg.seeds, cfg.preset) == \
        (128, 40, 16, 30, 3, "tiny")
    assert cfg.tokens_per_run == 60 * 16 * 64
    # the fields not named by the comparison are TrainConfig's / EmbedConfig's own defaults
    for f in ("weight_decay", "beta1", "beta2", "grad_clip", "grad_accum", "max_bad_steps", "device"):
        assert getattr(t, f) == getattr(TrainConfig(), f)
    assert dataclasses.replace(e, n_windows=EmbedConfig().n_windows) == EmbedConfig()


def test_settings_keep_the_previous_layouts_keys(tmp_path):
    cfg = _cfg()
    assert cfg.settings(pinned_settings(cfg), pinned_extras(cfg)) == OLD_SETTINGS_FILE
    assert changed_settings(OLD_SETTINGS_FILE, cfg) == []
    for kind, old in OLD_RECORD_SETTINGS.items():
        now = _provenance(cfg, kind, tmp_path)
        assert now["settings"] == old
        saved = {**now, "settings": old}  # a record the previous layout wrote for this unit
        assert stale_reason(saved, now) is None


@pytest.mark.parametrize("train,embed,key", [
    ({"steps": 4}, None, "steps"), ({"warmup_steps": 2}, None, "warmup"), ({"seed": 1}, None, "seed"),
    (None, {"n_windows": 8}, "embed_windows"), ({"grad_accum": 2}, None, "grad_accum"),
    ({"weight_decay": 0.0}, None, "weight_decay"), ({"min_lr": 1e-4}, None, "min_lr"),
    (None, {"pooling": "reference"}, "embed_pooling"), (None, {"window": 8}, "embed_window"),
    (None, {"precision": "fp32"}, "embed_precision"), (None, {"layer": 1}, "embed_layer"),
])
def test_a_changed_setting_is_refused_against_an_old_folder_and_makes_records_stale(train, embed, key, tmp_path):
    cfg = _cfg(train, embed)
    assert changed_settings(OLD_SETTINGS_FILE, cfg) == [key]
    assert changed_settings({}, cfg) == []  # a new out folder takes any settings
    kind = "chameleon" if key.startswith("embed") else "base"
    now = _provenance(cfg, kind, tmp_path)
    why = stale_reason({**now, "settings": OLD_RECORD_SETTINGS[kind]}, now)
    assert why == f"settings [{key!r}] changed"


def test_min_lr_follows_lr_by_default(tmp_path):
    cfg = _cfg({"lr": 1e-3})  # min_lr lr/10: not a change of its own
    assert changed_settings({**OLD_SETTINGS_FILE, "lr": 1e-3}, cfg) == []
    assert "min_lr" not in _provenance(cfg, "base", tmp_path)["settings"]


def test_an_extra_setting_written_before_is_compared():
    cfg = _cfg({"weight_decay": 0.0})
    assert changed_settings({**OLD_SETTINGS_FILE, "weight_decay": 0.0}, cfg) == []
    assert changed_settings({**OLD_SETTINGS_FILE, "weight_decay": 0.0}, _cfg()) == ["weight_decay"]
    assert set(pinned_extras(_cfg(mixtures=["uniform"]))) == set(EXTRA_KEYS["common"])  # no Chameleon: no embedding


def test_old_flat_arguments_and_fields_set_per_run_are_refused():
    with pytest.raises(TypeError, match="steps"):
        CompareConfig(steps=3)  # 0.1.0: the training settings are in train= (CHANGELOG)
    with pytest.raises(ChameleonUserError, match=r"train: expected a TrainConfig \(compare_train_config"):
        CompareConfig(train={"steps": 3})
    with pytest.raises(ChameleonUserError, match="train.out_dir: set by the comparison"):
        CompareConfig(train=compare_train_config(out_dir="x"))
    with pytest.raises(ChameleonUserError, match="train.eval_every: set by the comparison"):
        CompareConfig(train=compare_train_config(eval_every=5))
    with pytest.raises(ChameleonUserError, match="embed.seed: set by the comparison"):
        CompareConfig(embed=compare_embed_config(seed=3))
    with pytest.raises(ChameleonUserError, match="train.block_size: the comparison needs a block size"):
        CompareConfig(train=TrainConfig())
    # the contained configs check their own fields
    with pytest.raises(ChameleonUserError, match="TrainConfig.warmup_steps"):
        compare_train_config(warmup_steps=-1)
    with pytest.raises(ChameleonUserError, match="pooling"):
        compare_embed_config(pooling="nope")


def test_the_contained_settings_reach_every_run_and_the_embedding(tmp_path, monkeypatch):
    import chameleon_ext.trainer as trainer_mod

    cfg = _cfg({"weight_decay": 0.0, "grad_accum": 2, "beta2": 0.9, "max_bad_steps": 7, "device": "cpu"},
               {"pooling": "reference", "precision": "fp32", "batch_size": 3, "window": 512})
    seen = []
    monkeypatch.setattr(trainer_mod, "train", lambda model, data, weights, config, **k: seen.append(config))
    c = Comparison(_Data(), cfg, str(tmp_path))
    monkeypatch.setattr(c, "_model", lambda vocab, seed, like=None: None)
    c.train_model(_Data(), "uniform", str(tmp_path / "run"), steps=5, seed=4)
    run = seen[0]
    assert (run.weight_decay, run.grad_accum, run.beta2, run.max_bad_steps, run.device) == (0.0, 2, 0.9, 7, "cpu")
    assert (run.steps, run.seed, run.out_dir, run.eval_every, run.warmup_steps) == (5, 4, str(tmp_path / "run"), 0, 1)
    assert (run.batch_size, run.block_size, run.lr, run.ckpt_every) == (4, 16, 3e-3, 2)
    emb = cfg.embed_config()  # the window capped at the proxy's block size, the comparison's seed
    assert (emb.window, emb.seed, emb.pooling, emb.precision, emb.batch_size, emb.n_windows) == \
        (16, 0, "reference", "fp32", 3, 4)
    assert cfg.tokens(5) == 5 * 4 * 2 * 16
