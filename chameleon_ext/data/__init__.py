"""Data layer: tokenizers, multi-domain datasets (cached memmaps) and the built-in dataset.

    from chameleon_ext.data import load_dataset, builtin_dataset_path
    ds = load_dataset(builtin_dataset_path(), tokenizer="byte")
    ds.domains                          # ['books', 'code', 'dna', ...]
    ds.sample_windows("code", n=8, length=128, rng=np.random.default_rng(0))  # [8, 128] int64
"""

from .builtin import BUILTIN_DOMAINS, builtin_dataset_path, write_builtin_dataset
from .dataset import MixtureDataset, load_dataset
from .view import DatasetView
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "BUILTIN_DOMAINS",
    "ByteTokenizer",
    "DatasetView",
    "HFTokenizer",
    "MixtureDataset",
    "builtin_dataset_path",
    "load_dataset",
    "load_tokenizer",
    "write_builtin_dataset",
]
