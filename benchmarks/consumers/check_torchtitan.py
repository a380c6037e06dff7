"""torchtitan 0.3.0: HFDataSource(**source) in InterleavedHuggingFaceTextDataLoader.Config, and
the probabilities its InterleavedDataset computes from their weights."""

import json
import os

from importlib.metadata import version

from common import close, load, report

work, exp = load()
try:
    from torchtitan.hf_datasets.interleaved import InterleavedDataset
    from torchtitan.hf_datasets.text_datasets import HFDataSource, InterleavedHuggingFaceTextDataLoader

    class Source:  # stands in for a HuggingFaceTextDataset: InterleavedDataset only needs these
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    worst = 0.0
    for run in ("plain", "budget"):
        doc = json.load(open(os.path.join(work, run, "torchtitan_mixture.json")))
        cfg = InterleavedHuggingFaceTextDataLoader.Config(sources=[HFDataSource(**s) for s in doc["sources"]])
        mixed = InterleavedDataset(datasets=[Source() for _ in cfg.sources], weights=[s.weight for s in cfg.sources])
        worst = max(worst, close(dict(zip([s.dataset for s in cfg.sources], mixed._probs)), exp[run], run))
    report("torchtitan", version("torchtitan"), "torchtitan (sources)", True,
           f"HFDataSource config + InterleavedDataset probabilities; max diff {worst:.1e}")
except Exception as exc:  # noqa: BLE001
    report("torchtitan", version("torchtitan"), "torchtitan", False, f"{type(exc).__name__}: {exc}")
