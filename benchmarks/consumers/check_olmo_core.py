"""OLMo-core: SourceMixtureList.from_yaml on the export (and its validate()), per run and
per schedule stage."""

import os
import tempfile

import yaml
from importlib.metadata import version

from common import close, load, report

from olmo_core.data.source_mixture import SourceMixtureList

work, exp = load()
try:
    worst = 0.0
    for run in ("plain", "budget"):
        mix = SourceMixtureList.from_yaml(os.path.join(work, run, "olmo_source_mixture.yaml"))
        mix.validate()
        for s in mix.sources:
            s.validate()
        worst = max(worst, close({s.source_name: s.target_ratio for s in mix.sources}, exp[run], run))
        if run == "budget":
            assert all(s.max_repetition_ratio == 1.0 for s in mix.sources)
    stages = yaml.safe_load(open(os.path.join(work, "schedule", "olmo_core_stages.yaml")))["stages"]
    for st, (start, w) in zip(stages, exp["schedule"]):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump({"sources": st["sources"]}, f)
        mix = SourceMixtureList.from_yaml(f.name)
        mix.validate()
        worst = max(worst, close({s.source_name: s.target_ratio for s in mix.sources}, w, f"stage {start}"))
    report("ai2-olmo-core", version("ai2-olmo-core"), "olmo-core, olmo_core_stages", True,
           f"SourceMixtureList.from_yaml + validate; max diff {worst:.1e}")
except Exception as exc:  # noqa: BLE001
    report("ai2-olmo-core", version("ai2-olmo-core"), "olmo-core", False, f"{type(exc).__name__}: {exc}")
