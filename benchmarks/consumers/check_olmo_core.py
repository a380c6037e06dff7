"""OLMo-core: SourceMixtureList.from_yaml on the export (and its validate()), per run and
per schedule stage; then SourceMixtureDatasetConfig.build() over token files of the planned
sizes: the budget's mixture must build with each source's share within one instance of its
achievable weight, and the requested weights must be refused (they need more than the cap)."""

import os
import tempfile

import yaml
from importlib.metadata import version

from common import close, load, report

from olmo_core.data.source_mixture import SourceMixtureList

work, exp = load()


def build_mixture(work, exp, seq=64, batch=8):
    import numpy as np
    from olmo_core.data.source_mixture import SourceMixtureDatasetConfig

    os.makedirs(os.path.join(work, "data"), exist_ok=True)
    for d, path in exp["prefixes"].items():  # raw uint16 token files of the planned sizes
        np.zeros(exp["token_counts"][d], dtype=np.uint16).tofile(path)

    def build(run):
        config = SourceMixtureDatasetConfig(
            source_list=SourceMixtureList.from_yaml(os.path.join(work, run, "olmo_source_mixture.yaml")),
            requested_tokens=exp["token_budget"], global_batch_size=seq * batch, render_tables=False, quiet=True)
        return config.build(npdtype=np.uint16, sequence_length=seq)

    from olmo_core.exceptions import OLMoConfigurationError

    try:
        build("plain")
        raise AssertionError("the requested weights built, though they need more than the 1-epoch cap")
    except OLMoConfigurationError as exc:  # OLMo-core refuses, as it should
        if "Insufficient tokens" not in str(exc):
            raise
    outcome = build("budget")
    tokens = {s.name: sum(p.tokens for p in s.path_tokens) for s in outcome.sources}
    total = sum(tokens.values())
    off = max(abs(tokens[d] / total - w) for d, w in exp["budget"].items())
    limit = 2 * seq * len(tokens) / total  # OLMo-core rounds each source to whole instances
    if off > limit:
        raise AssertionError(f"built shares {tokens} are off by {off:.3g} (> {limit:.3g})")
    return f"budget mixture built, shares within {off:.1e} (instance rounding {limit:.1e}); requested weights refused"


def mixing_sizes(work, exp):
    """The composable API: MixingTokenSourceSpecConfig per exported spec, and the tokens
    MixingTokenSource takes from each (its calculate_sample_sizes, on the planned sizes)."""
    from olmo_core.data.composable import MixingTokenSourceSpecConfig, NumpyDocumentSourceConfig
    from olmo_core.data.composable.utils import calculate_sample_sizes
    from olmo_core.data.tokenizer import TokenizerConfig
    from olmo_core.exceptions import OLMoConfigurationError

    def sizes(run):
        specs = yaml.safe_load(open(os.path.join(work, run, "olmo_mixing_specs.yaml")))["specs"]
        configs = [MixingTokenSourceSpecConfig(
            source=NumpyDocumentSourceConfig(source_paths=s["paths"], tokenizer=TokenizerConfig.dolma2()),
            ratio=s["ratio"], max_repetition_factor=s["max_repetition_factor"], label=s["label"]) for s in specs]
        got = calculate_sample_sizes([exp["token_counts"][c.label] for c in configs], [c.ratio for c in configs],
                                     [c.max_repetition_factor for c in configs], target_size=exp["token_budget"],
                                     labels=[c.label for c in configs])
        return {c.label: int(n) for c, n in zip(configs, got)}

    try:
        sizes("plain")
        raise AssertionError("the requested weights were sampled, though they need more than the 1-epoch cap")
    except OLMoConfigurationError:
        pass
    got = sizes("budget")
    off = max(abs(got[d] - w * exp["token_budget"]) for d, w in exp["budget"].items())
    if off > len(got):  # whole tokens per source
        raise AssertionError(f"MixingTokenSource would take {got} tokens, off by {off:.1f}")
    return f"MixingTokenSource sizes within {off:.1f} tokens of the budget's targets; requested weights refused"


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
    built = build_mixture(work, exp)
    mixing = mixing_sizes(work, exp)
    report("ai2-olmo-core", version("ai2-olmo-core"), "olmo-core, olmo-core-mixing, olmo_core_stages", True,
           f"SourceMixtureList.from_yaml + validate: max diff {worst:.1e}; SourceMixtureDatasetConfig.build: {built}; composable API: {mixing}")
except Exception as exc:  # noqa: BLE001
    report("ai2-olmo-core", version("ai2-olmo-core"), "olmo-core", False, f"{type(exc).__name__}: {exc}")
