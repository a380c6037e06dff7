"""Mosaic Streaming: Stream(**kw) for every exported stream, then a StreamingDataset over
small MDS shards written with streaming's own MDSWriter: the samples it chooses per stream
and epoch must be within Mosaic's rounding (one sample) of proportion x epoch_size."""

import os
import shutil

import yaml
from importlib.metadata import version

from common import close, load, report

from streaming import MDSWriter, Stream, StreamingDataset

work, exp = load()
EPOCH = 100_000
try:
    worst = 0.0
    notes = []
    for run in ("plain", "budget"):
        doc = yaml.safe_load(open(os.path.join(work, run, "mosaic_streams.yaml")))["streams"]
        streams = {d: Stream(**kw) for d, kw in doc.items()}
        worst = max(worst, close({d: s.proportion for d, s in streams.items()}, exp[run], run))
        for d, kw in doc.items():  # a few samples per domain (the exported paths hold other formats' data)
            path = kw["local"] = os.path.join(work, "mds", d)
            if not os.path.exists(os.path.join(path, "index.json")):
                shutil.rmtree(path, ignore_errors=True)
                with MDSWriter(out=path, columns={"text": "str"}) as out:
                    for i in range(50):
                        out.write({"text": f"{d} {i}"})
        dataset = StreamingDataset(streams=[Stream(**kw) for kw in doc.values()], epoch_size=EPOCH,
                                   batch_size=1, shuffle=False)
        chosen = {d: int(s.choose) for d, s in zip(doc, dataset.streams)}
        off = max(abs(chosen[d] - exp[run][d] * EPOCH) for d in doc)
        if off > 1.0:
            raise AssertionError(f"{run}: StreamingDataset chose {chosen} per epoch of {EPOCH} (off by {off:.2f})")
        notes.append(f"{run} within {off:.2f} samples of proportion x {EPOCH}")
    report("mosaicml-streaming", version("mosaicml-streaming"), "mosaic", True,
           f"Stream(**kw) proportions max diff {worst:.1e}; StreamingDataset: {'; '.join(notes)}")
except Exception as exc:  # noqa: BLE001
    report("mosaicml-streaming", version("mosaicml-streaming"), "mosaic", False, f"{type(exc).__name__}: {exc}")
