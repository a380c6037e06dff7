"""NeMo <= 2.7: PreTrainingDataModule(paths=<nemo_paths.json>) over small indexed datasets
(written with megatron-core's IndexedDatasetBuilder, since NeMo checks the files exist); the
blend it hands to megatron-core (``build_kwargs["blend"]``) must carry the achievable weights."""

import json
import os

from importlib.metadata import version

from common import close, load, report

work, exp = load()
try:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from megatron.core.datasets.utils import normalize
    from nemo.collections.common.tokenizers.null_tokenizer import NullTokenizer
    from nemo.collections.llm.gpt.data.pre_training import PreTrainingDataModule

    os.makedirs(os.path.join(work, "data"), exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in exp["prefixes"].values():
        if not os.path.exists(prefix + ".idx"):
            builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
            for _ in range(20):
                builder.add_item(torch.from_numpy(rng.integers(1, 999, 64).astype(np.int64)))
                builder.end_document()
            builder.finalize(prefix + ".idx")
    by_prefix = {p: d for d, p in exp["prefixes"].items()}
    worst = 0.0
    for run in ("plain", "budget"):
        paths = json.load(open(os.path.join(work, run, "nemo_paths.json")))
        module = PreTrainingDataModule(paths=paths, seq_length=64, tokenizer=NullTokenizer(1000), micro_batch_size=1, global_batch_size=1,
                                       split="100,0,0", num_workers=0)
        prefixes, weights = module.build_kwargs["blend"]
        got = {by_prefix[p]: w for p, w in zip(prefixes, normalize(weights))}
        worst = max(worst, close(got, exp[run], run, normalise=True))
    report("nemo_toolkit", version("nemo_toolkit"), "nemo", True,
           f"PreTrainingDataModule(paths=...) blend for megatron-core: max diff {worst:.1e}")
except Exception as exc:  # noqa: BLE001
    report("nemo_toolkit", version("nemo_toolkit"), "nemo", False, f"{type(exc).__name__}: {str(exc)[:160]}")
