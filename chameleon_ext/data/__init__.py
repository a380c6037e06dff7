"""Data layer: tokenizers, multi-domain datasets (cached memmaps) and the built-in dataset.

    from chameleon_ext.data import load_dataset, builtin_dataset_path
    ds = load_dataset(builtin_dataset_path(), tokenizer="byte")
    ds.domains                          # ['books', 'code', 'dna', ...]
    ds.sample_windows("code", n=8, length=128, rng=np.random.default_rng(0))  # [8, 128] int64

The names below load their module on first use, so importing one submodule (say the
tokenizer, for the command line) does not import the whole reading stack.
"""

import importlib

_EXPORTS = {
    "BUILTIN_DOMAINS": "builtin",
    "builtin_dataset_path": "builtin",
    "write_builtin_dataset": "builtin",
    "MixtureDataset": "dataset",
    "load_dataset": "dataset",
    "DatasetView": "view",
    "ByteTokenizer": "tokenizer",
    "HFTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'chameleon_ext.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
