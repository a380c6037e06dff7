"""megatron-core: its own blend parser (get_blend_from_list) and normaliser on the --data-path
text, the per-split JSON and each schedule stage; then its dataset builder
(BlendedMegatronDatasetBuilder over small indexed datasets written with its own
IndexedDatasetBuilder) draws N samples, and each domain's count must be within Megatron's
rounding of its weight (its blending index keeps every count within 1 of w_i N for the N
samples it draws).
A capped budget must reach it achievable. The schedule's exported launch arguments must carry
megatron-core's OptimizerParamScheduler through each stage change (megatron_resume.py)."""

import json
import os

from common import close, load, report
from megatron_resume import check_stage_resume

from megatron.core.datasets.utils import get_blend_from_list, normalize
from importlib.metadata import version

work, exp = load()
by_prefix = {p: d for d, p in exp["prefixes"].items()}


def through_megatron(tokens):
    prefixes, weights = get_blend_from_list(tokens)
    return {by_prefix[p]: w for p, w in zip(prefixes, normalize(weights))}


def builder_counts(work, exp, n_samples=20000):
    """Samples per domain drawn by megatron-core's dataset builder from the exported blend."""
    import numpy as np
    import torch
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from megatron.core.tokenizers import MegatronTokenizer

    if not torch.distributed.is_initialized():  # the builder asks for ranks: one process, one rank
        torch.distributed.init_process_group("gloo", init_method=f"file://{work}/pg", rank=0, world_size=1)
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(work, "data"), exist_ok=True)
    for d, prefix in exp["prefixes"].items():
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for _ in range(100):
            builder.add_item(torch.from_numpy(rng.integers(1, 999, int(rng.integers(40, 120))).astype(np.int64)))
            builder.end_document()
        builder.finalize(prefix + ".idx")
    tokenizer = MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=1000)
    notes = []
    for run in ("plain", "budget"):
        blend = get_blend_from_list(open(os.path.join(work, run, "megatron_data_path.txt")).read().split())
        config = GPTDatasetConfig(random_seed=1234, sequence_length=64, blend=blend, split="100,0,0",
                                  tokenizer=tokenizer, path_to_cache=os.path.join(work, "mcache", run),
                                  reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
        train = BlendedMegatronDatasetBuilder(GPTDataset, [n_samples, 0, 0], lambda: True, config).build()[0]
        counts = np.bincount(np.asarray(train.dataset_index), minlength=len(blend[0]))
        drawn = int(counts.sum())  # the builder may round the size up a little
        want = {d: w * drawn for d, w in exp[run].items()}
        got = {by_prefix[p]: int(c) for p, c in zip(blend[0], counts)}
        off = max(abs(got[d] - want[d]) for d in want)
        if off > 1.0:
            raise AssertionError(f"{run}: the builder drew {got}, expected {want} (off by {off:.2f} samples)")
        notes.append(f"{run} within {off:.2f} of w_i x {drawn} samples")
    return "; ".join(notes)


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
    counts_off = builder_counts(work, exp)
    resume = check_stage_resume(os.path.join(work, "schedule"), work)
    report("megatron-core", version("megatron-core"), "megatron, megatron-per-split, nemo, megatron_stages",
           True, f"get_blend_from_list + normalize: max diff {worst:.1e}; BlendedMegatronDatasetBuilder: "
                 f"{counts_off}; {resume}")
except Exception as exc:  # noqa: BLE001 - one line per consumer
    report("megatron-core", version("megatron-core"), "megatron", False, f"{type(exc).__name__}: {exc}")
