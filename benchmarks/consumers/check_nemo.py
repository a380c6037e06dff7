"""NeMo <= 2.7: PreTrainingDataModule hands ``paths`` to megatron-core's blend parser, checked
here through NeMo's own import of it."""

import json
import os

from importlib.metadata import version

from common import close, load, report

work, exp = load()
try:
    from megatron.core.datasets.utils import get_blend_from_list, normalize
    from nemo.collections.llm.gpt.data.pre_training import PreTrainingDataModule  # noqa: F401

    by_prefix = {p: d for d, p in exp["prefixes"].items()}
    worst = 0.0
    for run in ("plain", "budget"):
        prefixes, weights = get_blend_from_list(json.load(open(os.path.join(work, run, "nemo_paths.json"))))
        got = {by_prefix[p]: w for p, w in zip(prefixes, normalize(weights))}
        worst = max(worst, close(got, exp[run], run, normalise=True))
    report("nemo_toolkit", version("nemo_toolkit"), "nemo", True, f"max diff {worst:.1e}")
except Exception as exc:  # noqa: BLE001
    report("nemo_toolkit", version("nemo_toolkit"), "nemo", False, f"{type(exc).__name__}: {str(exc)[:160]}")
