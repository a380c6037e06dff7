"""nanotron: the PyPI wheel (0.4), or its source tree when NANOTRON_SRC names one (its ``src``
folder on PYTHONPATH): NanosetDatasetsArgs / DatasetStageArgs built from the exports."""

import os
import sys

import yaml
from importlib.metadata import version

from common import close, load, report

work, exp = load()
src = os.environ.get("NANOTRON_SRC")
label = f"source tree {src}" if src else version("nanotron")
if src:
    sys.path.insert(0, os.path.join(src, "src"))
try:
    from nanotron.config.config import DataArgs, DatasetStageArgs, NanosetDatasetsArgs
except Exception as exc:  # noqa: BLE001 - the import itself is what fails
    report("nanotron", label, "nanotron, nanotron_data_stages", "skipped",
           f"nanotron.config does not import here ({type(exc).__name__}: {str(exc)[:100]})")
    sys.exit(0)
try:
    by_folder = {p: d for d, p in exp["prefixes"].items()}
    worst = 0.0
    for run in ("plain", "budget"):
        ds = NanosetDatasetsArgs(**yaml.safe_load(open(os.path.join(work, run, "nanotron_dataset.yaml")))["dataset"])
        worst = max(worst, close({by_folder[f]: w for f, w in zip(ds.dataset_folder, ds.dataset_weights)}, exp[run], run))
    stages = yaml.safe_load(open(os.path.join(work, "schedule", "nanotron_data_stages.yaml")))["data_stages"]
    for st, (start, w) in zip(stages, exp["schedule"]):
        stage = DatasetStageArgs(name=st["name"], start_training_step=st["start_training_step"],
                                 data=DataArgs(dataset=NanosetDatasetsArgs(**st["data"]["dataset"]), seed=0))
        assert stage.start_training_step == start + 1  # nanotron counts steps from 1
        got = dict(zip(stage.data.dataset.dataset_folder, stage.data.dataset.dataset_weights))
        worst = max(worst, close({by_folder[f]: v for f, v in got.items()}, w, f"stage {start}"))
    report("nanotron", label, "nanotron, nanotron_data_stages", True, f"NanosetDatasetsArgs; max diff {worst:.1e}")
except Exception as exc:  # noqa: BLE001
    report("nanotron", label, "nanotron", False, f"{type(exc).__name__}: {exc}")
