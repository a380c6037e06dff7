"""Mosaic Streaming: Stream(**kw) for every exported stream; the proportions it holds."""

import os

import yaml
from importlib.metadata import version

from common import close, load, report

from streaming import Stream

work, exp = load()
try:
    worst = 0.0
    for run in ("plain", "budget"):
        doc = yaml.safe_load(open(os.path.join(work, run, "mosaic_streams.yaml")))["streams"]
        streams = {d: Stream(**kw) for d, kw in doc.items()}
        worst = max(worst, close({d: s.proportion for d, s in streams.items()}, exp[run], run))
    report("mosaicml-streaming", version("mosaicml-streaming"), "mosaic", True,
           f"Stream(**kw); proportions max diff {worst:.1e} (StreamingDataset needs MDS shards: not built)")
except Exception as exc:  # noqa: BLE001
    report("mosaicml-streaming", version("mosaicml-streaming"), "mosaic", False, f"{type(exc).__name__}: {exc}")
