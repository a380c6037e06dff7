"""TorchTitan main (the Grain data stack, since 2026-08-19; not on PyPI): WeightedDataset(
dataset=..., weight=...) per exported ``datasets`` entry in a DatasetMixConfig, built with
Grain; the weights it mixes with and the children it draws over many elements are compared.
Needs TORCHTITAN_SRC, a checkout of TorchTitan main (its folder holding ``torchtitan/``)."""

import json
import os
import sys

from common import close, load, report

work, exp = load()
src = os.environ.get("TORCHTITAN_SRC")
if not src:
    report("torchtitan main", "", "torchtitan (datasets)", "skipped",
           "set TORCHTITAN_SRC to a checkout of TorchTitan main (its Grain data stack is not on PyPI)")
    sys.exit(0)
sys.path.insert(0, src)
try:
    import grain.python as grain
    import numpy as np

    from torchtitan.components.data.dataset import DatasetMixConfig, WeightedDataset
    from torchtitan.components.data.types import DatasetIterationPolicy

    class Rows:  # a map-style child whose rows say which domain they come from
        def __init__(self, index):
            self.index = index

        def build(self, *, context, dataset_iteration_policy):
            return grain.MapDataset.range(1000).map(lambda _, i=self.index: i)

    policy_fields = DatasetIterationPolicy.__dataclass_fields__
    policy = DatasetIterationPolicy(**{k: v for k, v in dict(
        seed=0, shuffle=False, repeat=True, dp_rank=0, dp_world_size=1, streaming_shuffle_buffer_size=1).items()
        if k in policy_fields})
    worst, notes = 0.0, []
    n = 200_000
    for run in ("plain", "budget"):
        doc = json.load(open(os.path.join(work, run, "torchtitan_mixture.json")))
        mix = DatasetMixConfig(datasets=tuple(WeightedDataset(dataset=Rows(i), weight=d["weight"])
                                              for i, d in enumerate(doc["datasets"])))
        names = [d["name"] for d in doc["datasets"]]
        want = {d: w for d, w in exp[run].items() if w > 0}
        worst = max(worst, close({d.get("name"): d["weight"] for d in doc["datasets"]}, want, run))
        built = mix.build(context=None, dataset_iteration_policy=policy)
        drawn = np.bincount([built[i] for i in range(n)], minlength=len(names)) / n
        off = max(abs(drawn[i] - want[d]) for i, d in enumerate(names))
        if off > 1e-3:
            raise AssertionError(f"{run}: Grain's mix drew {dict(zip(names, drawn))}, off by {off:.2g}")
        notes.append(f"{run} drawn within {off:.1e} over {n} elements")
    report("torchtitan main", os.environ.get("TORCHTITAN_REV", "source tree"), "torchtitan (datasets)", True,
           f"WeightedDataset weights max diff {worst:.1e}; DatasetMixConfig.build: {'; '.join(notes)}")
except Exception as exc:  # noqa: BLE001
    report("torchtitan main", os.environ.get("TORCHTITAN_REV", "source tree"), "torchtitan", False, f"{type(exc).__name__}: {str(exc)[:200]}")
