"""The comparison's settings (:class:`CompareConfig`, the settings each kind of unit is
computed from) and the view of the data every mixture is built on (:class:`DatasetView`)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

from ..errors import ChameleonUserError
from ..mixture import check_domain_names

METHODS = ("uniform", "natural", "chameleon", "chameleon-paper", "doremi", "regmix", "online")
# Chameleon's two variants: the library's default rule, and the paper's method exactly (rule="paper").
CHAMELEON_RULES = {"chameleon": None, "chameleon-paper": "paper"}
SCENARIOS = ("pretrain", "new_domains", "finetune")
OUTPUT_STEM = {"pretrain": "compare", "new_domains": "compare-new-domains", "finetune": "compare-finetune"}
# Settings every unit is computed from; a unit of a method adds that method's own (below).
# compare_settings.json pins the settings of the units an out folder holds: a rerun with other
# values is refused rather than mixing incompatible runs in one table.
COMMON_KEYS = ("seed", "preset", "block_size", "batch_size", "lr", "warmup", "eval_windows", "eval_seed",
               "test_fraction", "val_fraction")
KIND_KEYS = {"base": ("steps",), "start": ("steps",), "finetune": ("finetune_steps",),
             "chameleon": ("proxy_steps", "embed_windows", "mode_lam"), "doremi": ("proxy_steps",),
             "regmix": ("regmix_proxies", "regmix_steps")}


@dataclass
class CompareConfig:
    """Settings of one comparison. The defaults fit the built-in data on a 2-core CPU (all six
    mixtures, 3 seeds, about 15 minutes): the ``tiny`` preset, 64-token blocks, far fewer steps
    than ``chameleon run``. The optimiser's settings are :class:`~chameleon_ext.trainer.TrainConfig`'s
    except the warm-up, shortened to fit the short runs.

    Attributes:
        mixtures: method names (:data:`METHODS`) or paths of ``weights.json`` files.
        seeds: base runs per mixture; seeds ``seed .. seed + seeds - 1``.
        seed: the first base seed, and the seed of every proxy (a mixture is built once).
        steps: optimiser steps of every base run (the token budget: ``steps * batch_size *
            block_size`` tokens per run).
        proxy_steps: steps of Chameleon's proxy and of DoReMi's reference and proxy.
        regmix_proxies, regmix_steps: RegMix's number of proxies and their steps.
        eval_windows: test (and RegMix validation) windows per domain; ``eval_seed`` picks
            them, the same for every run.
        embed_windows: windows per domain for Chameleon's embeddings (``block_size`` tokens).
        online_every, online_warmup: :class:`~chameleon_ext.online.OnlineChameleon`'s update
            period and warm-up; None scales the library's defaults (50 and 100 steps of a
            1000-step run) to ``steps``.
        test_fraction: the test split's share of each stream (where there is no ``test.bin``).
        new_domains: the ``new_domains`` scenario's new domains.
        finetune_domains / finetune_from / finetune_data / finetune_steps: the ``finetune``
            scenario (see the module doc).
    """

    mixtures: List[str] = field(default_factory=lambda: list(METHODS))
    seeds: int = 3
    seed: int = 0
    preset: str = "tiny"
    block_size: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 10
    steps: int = 60
    proxy_steps: int = 40
    regmix_proxies: int = 16
    regmix_steps: int = 30
    eval_windows: int = 32
    eval_seed: int = 0
    embed_windows: int = 128
    mode_lam: Optional[float] = None  # Chameleon's lambda (None: the library's default)
    online_every: Optional[int] = None
    online_warmup: Optional[int] = None
    test_fraction: float = 0.1
    val_fraction: float = 0.1
    device: str = "cpu"
    scenario: str = "pretrain"
    new_domains: List[str] = field(default_factory=list)
    finetune_domains: List[str] = field(default_factory=list)
    finetune_from: Optional[str] = None
    finetune_data: Optional[str] = None
    finetune_steps: int = 40
    ckpt_every: int = 20
    quiet: bool = False
    strict: bool = False  # stop (ChameleonUserError) before training on a collapsed mixture

    def __post_init__(self):
        def positive(name, minimum=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ChameleonUserError(f"{name}: expected an integer >= {minimum}, got {v!r}")

        for name in ("seeds", "block_size", "batch_size", "steps", "proxy_steps", "regmix_steps",
                     "eval_windows", "embed_windows", "finetune_steps"):
            positive(name)
        positive("regmix_proxies", 3)
        for name in ("seed", "eval_seed", "warmup", "ckpt_every"):
            positive(name, 0)
        if not isinstance(self.mixtures, (list, tuple)) or not self.mixtures:
            raise ChameleonUserError(f"mixtures: expected a non-empty list of names, got {self.mixtures!r}")
        self.mixtures = [str(m).strip() for m in self.mixtures]
        if len(set(self.mixtures)) != len(self.mixtures) or not all(self.mixtures):
            raise ChameleonUserError(f"mixtures: names must be non-empty and distinct, got {self.mixtures}")
        for m in self.mixtures:
            if m not in METHODS and not (m.endswith(".json") or os.path.isfile(m)):
                raise ChameleonUserError(
                    f"mixtures: {m!r} is neither a method ({', '.join(METHODS)}) nor a weights.json file")
        if self.scenario not in SCENARIOS:
            raise ChameleonUserError(f"scenario: expected one of {SCENARIOS}, got {self.scenario!r}")
        if not (0.0 < float(self.test_fraction) < 1.0):
            raise ChameleonUserError(f"test_fraction: expected a number in (0, 1), got {self.test_fraction!r}")
        for name in ("new_domains", "finetune_domains"):
            if getattr(self, name):  # stored twice, a domain would be counted twice in every table
                check_domain_names(getattr(self, name), what=name)
        if self.scenario == "new_domains" and not self.new_domains:
            raise ChameleonUserError("new_domains: the new-domains scenario needs at least one domain name")
        if self.scenario == "finetune" and not (self.finetune_domains or self.finetune_data):
            raise ChameleonUserError("finetune: give finetune_data (with finetune_from) or finetune_domains")
        if self.finetune_data and not self.finetune_from:
            raise ChameleonUserError("finetune_data: needs finetune_from (the model to continue training)")

    @property
    def seed_list(self) -> List[int]:
        return [self.seed + i for i in range(self.seeds)]

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.batch_size * self.block_size

    def to_dict(self) -> dict:
        return asdict(self)




def pinned_settings(cfg: CompareConfig) -> tuple:
    """The settings compare_settings.json pins for ``cfg``: those of the units it runs (RegMix's
    only when RegMix is run, the proxies' only when a method trains one)."""
    keys = COMMON_KEYS + ("steps",)
    mixtures = set(cfg.mixtures)
    for kind in ("chameleon", "doremi", "regmix"):
        if kind in mixtures or (kind == "chameleon" and mixtures & set(CHAMELEON_RULES)):
            keys += tuple(k for k in KIND_KEYS[kind] if k not in keys and k != "mode_lam")
    return keys


def rule_of(method: str) -> str:
    """The weight rule a Chameleon method of the comparison uses (``chameleon``: the library's
    default; ``chameleon-paper``: the paper's)."""
    from ..weights import DEFAULT_RULE

    return CHAMELEON_RULES.get(method) or DEFAULT_RULE
