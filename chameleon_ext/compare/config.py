"""The comparison's settings (:class:`CompareConfig`, the settings each kind of unit is
computed from) and the view of the data every mixture is built on (:class:`DatasetView`)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import List, Optional, Sequence

from ..embed import EmbedConfig
from ..errors import ChameleonUserError
from ..mixture import check_domain_names
from ..train_config import TrainConfig

METHODS = ("uniform", "natural", "chameleon", "chameleon-paper", "doremi", "regmix", "online")
# Chameleon's two variants: the library's default rule, and the paper's method exactly (rule="paper").
CHAMELEON_RULES = {"chameleon": None, "chameleon-paper": "paper"}
SCENARIOS = ("pretrain", "new_domains", "finetune")
OUTPUT_STEM = {"pretrain": "compare", "new_domains": "compare-new-domains", "finetune": "compare-finetune"}
# Settings every unit is computed from; a unit of a method adds that method's own (below).
# compare_settings.json pins the settings of the units an out folder holds: a rerun with other
# values is refused rather than mixing incompatible runs in one table. The names are those the
# records and compare_settings.json have always held; SETTINGS says where each is read.
COMMON_KEYS = ("seed", "preset", "block_size", "batch_size", "lr", "warmup", "eval_windows", "eval_seed",
               "test_fraction", "val_fraction")
KIND_KEYS = {"base": ("steps",), "start": ("steps",), "finetune": ("finetune_steps",),
             "chameleon": ("proxy_steps", "embed_windows", "mode_lam"), "doremi": ("proxy_steps",),
             "regmix": ("regmix_proxies", "regmix_steps")}
# Settings that change what a unit computes but that earlier layouts did not record (they were
# fixed at the library's defaults then): pinned only at another value than the comparison's
# default, so the records and settings files of an earlier out folder still hold unchanged.
EXTRA_KEYS = {"common": ("grad_accum", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip"),
              "chameleon": ("embed_window", "embed_layer", "embed_pooling", "embed_precision", "embed_split")}
# setting -> (contained config or None for CompareConfig itself, field)
SETTINGS = {
    **{k: ("train", k) for k in ("seed", "block_size", "batch_size", "lr", "eval_windows", "steps")},
    "warmup": ("train", "warmup_steps"), "embed_windows": ("embed", "n_windows"),
    **{k: (None, k) for k in ("preset", "eval_seed", "test_fraction", "val_fraction", "finetune_steps",
                              "proxy_steps", "mode_lam", "regmix_proxies", "regmix_steps")},
    **{k: ("train", k) for k in EXTRA_KEYS["common"]},
    **{"embed_" + k: ("embed", k) for k in ("window", "layer", "pooling", "precision", "split")},
}
# The base runs' training settings where the comparison's defaults differ from TrainConfig's:
# short runs of the tiny preset on 64-token blocks (about 15 minutes for everything on 2 CPU
# cores), a warm-up shortened to fit, a checkpoint every 20 steps.
TRAIN_DEFAULTS = {"steps": 60, "block_size": 64, "warmup_steps": 10, "ckpt_every": 20}
# Chameleon's embedding: fewer windows than EmbedConfig's (the built-in domains are small).
EMBED_DEFAULTS = {"n_windows": 128}
# Fields of the contained configs that the comparison sets itself for each run (its folder,
# its logging, the seed every proxy and embedding is drawn with): another value would have no
# effect, so it is refused.
SET_BY_COMPARE = {"train": ("out_dir", "eval_every", "log_every"), "embed": ("seed",)}


def compare_train_config(**fields) -> TrainConfig:
    """The base runs' :class:`~chameleon_ext.train_config.TrainConfig` with the comparison's
    defaults (:data:`TRAIN_DEFAULTS`), ``fields`` overriding them."""
    return TrainConfig(**{**TRAIN_DEFAULTS, **fields})


def compare_embed_config(**fields) -> EmbedConfig:
    """Chameleon's :class:`~chameleon_ext.embed.EmbedConfig` with the comparison's defaults
    (:data:`EMBED_DEFAULTS`), ``fields`` overriding them."""
    return EmbedConfig(**{**EMBED_DEFAULTS, **fields})


@dataclass
class CompareConfig:
    """Settings of one comparison. The defaults fit the built-in data on a 2-core CPU (all six
    mixtures, 3 seeds, about 15 minutes): the ``tiny`` preset, 64-token blocks, far fewer steps
    than ``chameleon run``.

    Attributes:
        mixtures: method names (:data:`METHODS`) or paths of ``weights.json`` files.
        seeds: base runs per mixture; seeds ``train.seed .. train.seed + seeds - 1``.
        preset: the model size of every proxy and base run.
        train: the base runs' training settings (:func:`compare_train_config`: steps, batch,
            block size, optimiser, ``eval_windows`` test windows per domain, ``ckpt_every``,
            ``device``, ``quiet``). ``train.seed`` is the first base seed and the seed of every
            proxy and of Chameleon's embedding windows (a mixture is built once); every
            proxy trains with these settings and its own steps. ``out_dir``, ``eval_every``
            and ``log_every`` are set per run.
        embed: Chameleon's domain embeddings (:func:`compare_embed_config`); the window is
            capped at ``train.block_size`` (the proxy's context) and drawn with ``train.seed``.
        proxy_steps: steps of Chameleon's proxy and of DoReMi's reference and proxy.
        regmix_proxies, regmix_steps: RegMix's number of proxies and their steps.
        eval_seed: picks the test (and RegMix validation) windows, the same for every run.
        mode_lam: Chameleon's lambda (None: the library's default).
        online_every, online_warmup: :class:`~chameleon_ext.online.OnlineChameleon`'s update
            period and warm-up; None scales the library's defaults (50 and 100 steps of a
            1000-step run) to ``train.steps``.
        test_fraction, val_fraction: the test and validation splits' shares of each stream
            (where there is no ``test.bin`` / ``val.bin``).
        scenario: ``pretrain``, ``new_domains`` or ``finetune`` (:data:`SCENARIOS`).
        new_domains: the ``new_domains`` scenario's new domains.
        finetune_domains / finetune_from / finetune_data / finetune_steps: the ``finetune``
            scenario (see the module doc).
        strict: stop (ChameleonUserError) before training on a collapsed mixture.
    """

    mixtures: List[str] = field(default_factory=lambda: list(METHODS))
    seeds: int = 3
    preset: str = "tiny"
    train: TrainConfig = field(default_factory=compare_train_config)
    embed: EmbedConfig = field(default_factory=compare_embed_config)
    proxy_steps: int = 40
    regmix_proxies: int = 16
    regmix_steps: int = 30
    eval_seed: int = 0
    mode_lam: Optional[float] = None
    online_every: Optional[int] = None
    online_warmup: Optional[int] = None
    test_fraction: float = 0.1
    val_fraction: float = 0.1
    scenario: str = "pretrain"
    new_domains: List[str] = field(default_factory=list)
    finetune_domains: List[str] = field(default_factory=list)
    finetune_from: Optional[str] = None
    finetune_data: Optional[str] = None
    finetune_steps: int = 40
    strict: bool = False

    def __post_init__(self):
        def positive(name, minimum=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ChameleonUserError(f"{name}: expected an integer >= {minimum}, got {v!r}")

        for name, kind in (("train", TrainConfig), ("embed", EmbedConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ChameleonUserError(f"{name}: expected a {kind.__name__} (compare_{name}_config(...) gives "
                                         f"one with the comparison's defaults), got {getattr(self, name)!r}")
        for name, fields in SET_BY_COMPARE.items():
            library = type(getattr(self, name))()
            for f in fields:
                if getattr(getattr(self, name), f) != getattr(library, f):
                    raise ChameleonUserError(
                        f"{name}.{f}: set by the comparison for each run (" + (
                            "every proxy and embedding uses train.seed" if f == "seed" else "folders under out") +
                        f"); leave it at {getattr(library, f)!r}, got {getattr(getattr(self, name), f)!r}")
        if self.train.block_size is None:
            raise ChameleonUserError("train.block_size: the comparison needs a block size (every run uses it), got None")
        for name in ("seeds", "proxy_steps", "regmix_steps", "finetune_steps"):
            positive(name)
        positive("regmix_proxies", 3)
        positive("eval_seed", 0)
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
        return [self.train.seed + i for i in range(self.seeds)]

    def tokens(self, steps: int) -> int:
        """Training tokens of a run of ``steps`` steps."""
        t = self.train
        return steps * t.batch_size * t.grad_accum * t.block_size

    @property
    def tokens_per_run(self) -> int:
        return self.tokens(self.train.steps)

    def embed_config(self) -> EmbedConfig:
        """The embedding settings Chameleon uses: ``embed`` with the window capped at the
        proxy's context and the comparison's seed."""
        return replace(self.embed, window=min(self.embed.window, self.train.block_size), seed=self.train.seed)

    def setting(self, key: str):
        """The value of the pinned setting ``key`` (:data:`SETTINGS`)."""
        holder, name = SETTINGS[key]
        return getattr(self if holder is None else getattr(self, holder), name)

    def settings(self, keys: Sequence[str], extra: Sequence[str] = ()) -> dict:
        """``{key: value}`` of ``keys``, and of the ``extra`` keys (:data:`EXTRA_KEYS`) whose value
        is not the comparison's default."""
        out = {k: self.setting(k) for k in keys}
        defaults = default_settings(self)
        out.update({k: self.setting(k) for k in extra if self.setting(k) != defaults[k]})
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def default_settings(cfg: CompareConfig) -> dict:
    """The comparison's default value of every extra setting (:data:`EXTRA_KEYS`) for ``cfg``
    (min_lr's default follows ``cfg``'s lr)."""
    ref = CompareConfig(mixtures=["uniform"], train=compare_train_config(lr=cfg.train.lr))
    return {k: ref.setting(k) for keys in EXTRA_KEYS.values() for k in keys}


def pinned_settings(cfg: CompareConfig) -> tuple:
    """The settings compare_settings.json pins for ``cfg``: those of the units it runs (RegMix's
    only when RegMix is run, the proxies' only when a method trains one)."""
    keys = COMMON_KEYS + ("steps",)
    mixtures = set(cfg.mixtures)
    for kind in ("chameleon", "doremi", "regmix"):
        if kind in mixtures or (kind == "chameleon" and mixtures & set(CHAMELEON_RULES)):
            keys += tuple(k for k in KIND_KEYS[kind] if k not in keys and k != "mode_lam")
    return keys


def pinned_extras(cfg: CompareConfig) -> tuple:
    """The extra settings (:data:`EXTRA_KEYS`) compare_settings.json pins for ``cfg`` when not
    at their defaults."""
    chameleon = bool(set(cfg.mixtures) & set(CHAMELEON_RULES))
    return EXTRA_KEYS["common"] + (EXTRA_KEYS["chameleon"] if chameleon else ())


def changed_settings(saved: dict, cfg: CompareConfig) -> list:
    """The pinned settings of ``cfg`` whose value differs from ``saved`` (a
    compare_settings.json, empty for a new out folder): a key ``saved`` lacks is new to it,
    except an extra key, which a folder holds only when not at its default."""
    mine = cfg.settings(pinned_settings(cfg))
    changed = [k for k in mine if k in saved and saved[k] != mine[k]]
    if set(COMMON_KEYS) & set(saved):  # (a new out folder holds no comparison to differ from)
        defaults = default_settings(cfg)
        changed += [k for k in pinned_extras(cfg) if saved.get(k, defaults[k]) != cfg.setting(k)]
    return sorted(changed)


def rule_of(method: str) -> str:
    """The weight rule a Chameleon method of the comparison uses (``chameleon``: the library's
    default; ``chameleon-paper``: the paper's)."""
    from ..weights import DEFAULT_RULE

    return CHAMELEON_RULES.get(method) or DEFAULT_RULE
