"""megatron-core: its own blend parser (get_blend_from_list) and normaliser on the --data-path
text, the per-split JSON and each schedule stage; a capped budget must reach it achievable."""

import json
import os

from common import close, load, report

from megatron.core.datasets.utils import get_blend_from_list, normalize
from importlib.metadata import version

work, exp = load()
by_prefix = {p: d for d, p in exp["prefixes"].items()}


def through_megatron(tokens):
    prefixes, weights = get_blend_from_list(tokens)
    return {by_prefix[p]: w for p, w in zip(prefixes, normalize(weights))}


try:
    worst = 0.0
    for run in ("plain", "budget"):
        text = open(os.path.join(work, run, "megatron_data_path.txt")).read().split()
        worst = max(worst, close(through_megatron(text), exp[run], f"{run} --data-path", normalise=True))
        split = json.load(open(os.path.join(work, run, "megatron_per_split_data_args.json")))
        worst = max(worst, close(through_megatron(split["train"]), exp[run], f"{run} per-split", normalise=True))
        nemo = json.load(open(os.path.join(work, run, "nemo_paths.json")))  # NeMo hands this list to megatron-core
        worst = max(worst, close(through_megatron(nemo), exp[run], f"{run} nemo paths", normalise=True))
    stages = json.load(open(os.path.join(work, "schedule", "megatron_stages.json")))
    for st, (start, w) in zip(stages["stages"], exp["schedule"]):
        assert st["start_iteration"] == start
        worst = max(worst, close(through_megatron(st["data_path"].split()), w, f"stage {start}", normalise=True))
    assert stages["phase_transition_iterations"] == [s for s, _ in exp["schedule"][1:]]
    report("megatron-core", version("megatron-core"), "megatron, megatron-per-split, nemo, megatron_stages",
           True, f"get_blend_from_list + normalize; max diff {worst:.1e}")
except Exception as exc:  # noqa: BLE001 - one line per consumer
    report("megatron-core", version("megatron-core"), "megatron", False, f"{type(exc).__name__}: {exc}")
