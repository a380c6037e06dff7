"""datasets: interleave_datasets with the exported probabilities; the probabilities its
map-style interleaving receives are captured and compared."""

import json
import os

import datasets
from datasets import Dataset, interleave_datasets

from common import close, load, report

work, exp = load()
seen = []
original = datasets.arrow_dataset._interleave_map_style_datasets


def capture(dsets, probabilities=None, *args, **kwargs):
    seen.append(list(probabilities))
    return original(dsets, probabilities, *args, **kwargs)


datasets.combine._interleave_map_style_datasets = capture
try:
    worst = 0.0
    runs = [("plain", json.load(open(os.path.join(work, "plain", "hf_interleave_probabilities.json")))),
            ("budget", json.load(open(os.path.join(work, "budget", "hf_interleave_probabilities.json"))))]
    stages = json.load(open(os.path.join(work, "schedule", "hf_interleave_stages.json")))
    runs += [(f"stage {st['start_step']}", {"domains": stages["domains"], "probabilities": st["probabilities"]})
             for st in stages["stages"]]
    wants = [exp["plain"], exp["budget"]] + [w for _, w in exp["schedule"]]
    for (name, doc), want in zip(runs, wants):
        parts = [Dataset.from_dict({"text": [f"{d} {i}" for i in range(50)]}) for d in doc["domains"]]
        mixed = interleave_datasets(parts, probabilities=doc["probabilities"], seed=0,
                                    stopping_strategy="first_exhausted")
        assert len(mixed) > 0
        worst = max(worst, close(dict(zip(doc["domains"], seen[-1])), want, name))
    report("datasets", datasets.__version__, "hf_interleave, hf_interleave_stages", True,
           f"interleave_datasets accepts; probabilities received max diff {worst:.1e}")
except Exception as exc:  # noqa: BLE001
    report("datasets", datasets.__version__, "hf_interleave", False, f"{type(exc).__name__}: {exc}")
