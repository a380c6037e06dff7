"""``chameleon compare``: every mixture method on the same trainer, several seeds, a held-out
test split, intervals and the compute each mixture cost.

For each mixture (``uniform``, ``natural``, ``chameleon``, ``doremi``, ``regmix``, ``online``,
or a ``weights.json``) the comparison

1. **builds the mixture**, training whatever proxies the method needs (Chameleon: a uniform
   proxy and the domain embeddings; DoReMi: a reference model on uniform and a Group-DRO
   proxy; RegMix: ``M`` small proxies on Dirichlet mixtures, scored on the *validation*
   split), once, with the comparison's ``seed``;
2. trains **one base model per mixture and seed** on the same token budget (``online``: the
   base model trained with :class:`~chameleon_ext.online.OnlineWeights`, whose weights follow
   the model);
3. evaluates each base model's per-domain perplexity on the **test** split (drawn from every
   domain's stream the same interleaved way as validation, see
   :mod:`chameleon_ext.data.dataset`), which nothing else looks at;
4. reports the mean and 95% interval over seeds and the paired difference to uniform
   (:mod:`chameleon_ext.compare_stats`), and the compute each mixture cost (FLOPs, 6 N per
   trained token and 2 N per forward-only token, and wall time) beside the base training.

Honesty rules (each tested): the mixtures are built on a :class:`DatasetView` that refuses the
test split, so no method can be tuned on it; every base run of a table has the same steps,
batch and block size (the same token budget) and is scored on the same test windows (a fixed
evaluation seed, independent of the training seed); seed ``s`` sets the model initialisation
(``GPT(seed=s)``) and the data order (``TrainConfig.seed = s``) for every mixture alike; the
table states the number of seeds and what the interval is.

Resumable: every finished unit (a mixture, a RegMix proxy, a base run) leaves a record under
``<out>/records``; a rerun skips it, and an interrupted training run resumes from its
checkpoint (the trainer's exact resume).

Scenarios (each writes its own ``compare*.json/md/png`` into the same ``out`` and shares the
finished units of the others):

* ``pretrain`` (default): ``compare.json``, ``compare.md``, ``compare.png``.
* ``new_domains``: the proxies of every method see only the other domains; Chameleon then
  embeds the new ones with its frozen proxy (transfer mode) and reuses the cached embeddings
  of the others; DoReMi and RegMix retrain on all domains. The table adds the extra compute
  each method spent to absorb the new domains. Files ``compare-new-domains.*``.
* ``finetune``: a base model (``finetune_from``, or one pretrained here on uniform over the
  non-finetuning domains) is finetuned on the finetuning domains with uniform, Chameleon's
  finetuning weights (``mode="finetune"``, embedded with the base model itself as the frozen
  proxy) and DoReMi's (reference: the uniform finetune), per seed; the report counts the
  finetuning domains whose test perplexity improved over uniform, with intervals. Files
  ``compare-finetune.*``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional, Sequence

from . import io
from .callbacks import Callback
from .compare_stats import (AVERAGE, FORWARD, TRAIN, ComputeLedger, compare_perplexities,
                            format_comparison_table, non_embedding_parameters)
from .errors import ChameleonUserError
from .progress import Progress

__all__ = ["CompareConfig", "DatasetView", "DoReMiLoss", "run_compare", "METHODS", "SCENARIOS"]

METHODS = ("uniform", "natural", "chameleon", "chameleon-paper", "doremi", "regmix", "online")
# Chameleon's two variants: the library's default rule, and the paper's method exactly (rule="paper").
CHAMELEON_RULES = {"chameleon": None, "chameleon-paper": "paper"}
SCENARIOS = ("pretrain", "new_domains", "finetune")
RECORD_FORMAT = "chameleon_ext.compare_unit/1"
OUTPUT_STEM = {"pretrain": "compare", "new_domains": "compare-new-domains", "finetune": "compare-finetune"}
# Settings that change what a finished unit holds: a rerun into the same out with other values
# is refused rather than mixing incompatible runs in one table.
_UNIT_KEYS = ("seed", "preset", "block_size", "batch_size", "lr", "warmup", "steps", "proxy_steps",
              "regmix_proxies", "regmix_steps", "eval_windows", "eval_seed", "embed_windows",
              "test_fraction", "val_fraction")


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


# ------------------------------------------------------------------------------------------
# the data each method may see


class DatasetView:
    """A :class:`~chameleon_ext.data.dataset.MixtureDataset` seen with only ``domains`` and,
    with ``hide_test`` (the default), without its test split: any read of it raises. Every
    mixture is built on such a view, so no method can be fitted on the test split."""

    def __init__(self, base, domains: Optional[Sequence[str]] = None, hide_test: bool = True):
        self._base = getattr(base, "_base", base)
        self.domains = list(base.domains if domains is None else domains)
        unknown = [d for d in self.domains if d not in self._base.domains]
        if unknown:
            raise ChameleonUserError(f"domains {unknown} are not in the dataset (it has {self._base.domains})")
        if not self.domains:
            raise ChameleonUserError("a dataset view needs at least one domain")
        self.hide_test = hide_test

    def __getattr__(self, name):
        attr = getattr(self._base, name)
        if not callable(attr):
            return attr

        def guarded(*args, **kwargs):  # any other reader given split="test" is refused too
            if kwargs.get("split") == "test":
                self._split("test")
            return attr(*args, **kwargs)

        return guarded

    def _split(self, split: str) -> str:
        if split == "test" and self.hide_test:
            raise ChameleonUserError("the test split is held out: no mixture method may read it "
                                     "(only the final evaluation of the base models does)")
        return split

    def _domain(self, name: str) -> str:
        if name not in self.domains:
            raise ChameleonUserError(f"domain {name!r} is not in this view of the data ({self.domains})")
        return name

    def tokens(self, name, split="train"):
        return self._base.tokens(self._domain(name), self._split(split))

    def test_tokens(self, name):
        return self.tokens(name, "test")

    def n_tokens(self, name, split="train"):
        return self._base.n_tokens(self._domain(name), self._split(split))

    def sample_windows(self, name, n, length, rng, split="train"):
        return self._base.sample_windows(self._domain(name), n, length, rng, self._split(split))

    def sample_window(self, name, length, rng, split="train"):
        return self._base.sample_window(self._domain(name), length, rng, self._split(split))

    def draw_windows(self, name, n, length, rng, split="train"):  # the streamed-data reader
        return self._base.draw_windows(self._domain(name), n, length, rng, self._split(split))

    def windows_at(self, name, starts, length, split="train"):
        return self._base.windows_at(self._domain(name), starts, length, self._split(split))

    def check_window(self, length, split="train", domains=None):
        return self._base.check_window(length, self._split(split),
                                       [self._domain(d) for d in (domains or self.domains)])


# ------------------------------------------------------------------------------------------
# trainer callbacks


class DoReMiLoss(Callback):
    """The DoReMi proxy's loss through the trainer's loss hook: each micro-batch's loss is
    :class:`~chameleon_ext.baselines.doremi.DoReMiObjective` (the Group-DRO reweighted loss),
    and the objective's state (alpha, the running average, the reference's token count) is
    saved in every checkpoint, so a resumed proxy is exact."""

    name = "doremi"
    replaces_loss = True

    def __init__(self, objective):
        self.objective = objective

    def compute_loss(self, state, x, y, domain, logits):
        return self.objective(x, y, domain, logits)

    def state_dict(self) -> dict:
        return self.objective.state_dict()

    def load_state_dict(self, state) -> None:
        self.objective.load_state_dict(state)


class _StepProgress(Callback):
    """Advances the comparison's overall progress by one per optimiser step."""

    name = "compare_progress"

    def __init__(self, progress: Progress):
        self.progress = progress

    def on_step_end(self, state) -> None:
        self.progress.update(1)


class _Timed(Callback):
    """Wraps a callback and adds up the wall time spent in it (the online method's cost)."""

    def __init__(self, inner: Callback):
        self.inner, self.seconds = inner, 0.0
        self.hidden_layer = inner.hidden_layer

    @property
    def name(self) -> str:
        return self.inner.name

    def _time(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def on_train_start(self, state):
        self._time(self.inner.on_train_start, state)

    def on_batch(self, state, batch):
        self._time(self.inner.on_batch, state, batch)

    def on_step_end(self, state):
        self._time(self.inner.on_step_end, state)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


# ------------------------------------------------------------------------------------------
# records of finished units


def _digest(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


class _Records:
    """One JSON record per finished unit under ``<out>/records``; a rerun skips them."""

    def __init__(self, out: str):
        self.folder = os.path.join(out, "records")

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key + ".json")

    def get(self, key: str) -> Optional[dict]:
        rec = io.read_json_or_none(self.path(key))
        return rec if rec and rec.get("format") == RECORD_FORMAT else None

    def put(self, key: str, rec: dict) -> dict:
        rec = {"format": RECORD_FORMAT, "key": key, **rec}
        io.write_json(self.path(key), rec, "comparison record")
        return rec


def _entry(method: str, name: str, kind: str, n_params: int, tokens: int, wall_s: float) -> dict:
    return {"method": method, "name": name, "kind": kind, "n_params": int(n_params),
            "tokens": int(tokens), "wall_s": float(wall_s)}


# ------------------------------------------------------------------------------------------
# the comparison


class _Compare:
    def __init__(self, dataset, cfg: CompareConfig, out: str, say=print):
        self.ds, self.cfg, self.out, self.say = dataset, cfg, out, say
        self.records = _Records(out)
        self.progress: Optional[Progress] = None
        if not all(dataset.n_tokens(d, "test") for d in dataset.domains):
            raise ChameleonUserError("the dataset has no test split: load it with test_fraction > 0 "
                                     "(or give every domain a test.bin)")

    # -- training helpers -------------------------------------------------------------------

    def _model(self, vocab: int, seed: int, like: Optional[str] = None):
        """A fresh GPT of the comparison's preset, or shaped like the model file ``like`` (a
        finetuning start, whose weights the trainer then loads)."""
        from .model import GPT, GPTConfig, load_model

        if like is not None:
            return GPT(load_model(like).config, seed=seed)
        return GPT(GPTConfig.preset(self.cfg.preset, vocab, self.cfg.block_size), seed=seed)

    def _train(self, data, weights, out_dir: str, steps: int, seed: int, callbacks=(),
               init_from=None):
        """Train one model; ``(model, seconds)``. Resumes an interrupted run exactly."""
        from .trainer import TrainConfig, train

        c = self.cfg
        cfg = TrainConfig(steps=steps, batch_size=c.batch_size, block_size=c.block_size, lr=c.lr,
                          warmup_steps=min(c.warmup, max(steps - 1, 0)), eval_every=0,
                          eval_windows=c.eval_windows, ckpt_every=c.ckpt_every, seed=seed,
                          device=c.device, out_dir=out_dir, quiet=True, log_every=max(1, steps))
        model = self._model(data.vocab_size, seed, like=init_from)
        cbs = list(callbacks) + ([_StepProgress(self.progress)] if self.progress is not None else [])
        t0 = time.perf_counter()
        train(model, data, weights, cfg, callbacks=cbs, init_from=init_from)
        return model, time.perf_counter() - t0

    def _eval(self, model, data, split: str) -> dict:
        from .evaluation import evaluate

        return evaluate(model, data, self.cfg.eval_windows, self.cfg.block_size, seed=self.cfg.eval_seed,
                        device=self.cfg.device, split=split)

    def _unit(self, key: str, what: str, build) -> dict:
        rec = self.records.get(key)
        if rec is not None:
            self.say(f"  {what}: done before (record {self.records.path(key)}), skipped")
            if self.progress is not None:
                self.progress.update(rec.get("steps_planned", 0))
            return rec
        self.say(f"  {what} ...")
        return self.records.put(key, build())

    # -- mixtures ---------------------------------------------------------------------------

    def build_mixture(self, name: str, view: DatasetView, tag: str = "") -> dict:
        """``{"weights", "entries", "info"}`` of mixture ``name`` built on ``view``."""
        k = len(view.domains)
        if name == "uniform":
            return {"weights": {d: 1.0 / k for d in view.domains}, "entries": [], "info": {}}
        if name == "online":
            return {"weights": {d: 1.0 / k for d in view.domains}, "entries": [],
                    "info": {"rule": "the initial weights; OnlineWeights recomputes them during each base "
                                     "run (its schedule.jsonl in the run's folder)",
                             **self._online_settings(self.cfg.steps)}}
        if name == "natural":
            from .baselines import natural_weights
            from .baselines.natural import dataset_token_counts

            return {"weights": natural_weights(dataset_token_counts(view, "train")), "entries": [],
                    "info": {"rule": "token shares of the training split"}}
        # Chameleon's key holds its rule: a record made under another default is never reused.
        rule = [_rule_of(name)] if name in CHAMELEON_RULES else []
        key = f"mixture-{name}-{_digest([view.domains, tag] + rule)}"
        if name in CHAMELEON_RULES:
            return self._unit(key, f"{name} mixture ({k} domains)", lambda: self._chameleon(view, key, name))
        if name == "doremi":
            return self._unit(key, f"doremi mixture ({k} domains)", lambda: self._doremi(view, key))
        if name == "regmix":
            return self._unit(key, f"regmix mixture ({k} domains)", lambda: self._regmix(view, key))
        from .pipeline import read_weights

        return {"weights": read_weights(name, view.domains), "entries": [],
                "info": {"file": os.path.abspath(name), "cost": "not known (given as a file)"}}

    def _proxy(self, view, folder: str, method: str, name: str = "proxy") -> tuple:
        """A proxy trained on uniform over ``view``: ``(model, path, ledger entry)``."""
        model, wall = self._train(view, "uniform", folder, self.cfg.proxy_steps, self.cfg.seed)
        tokens = self.cfg.proxy_steps * self.cfg.batch_size * self.cfg.block_size
        return model, os.path.join(folder, "model.pt"), _entry(
            method, name, TRAIN, non_embedding_parameters(model), tokens, wall)

    def _embed_config(self):
        from .embed import EmbedConfig

        return EmbedConfig(n_windows=self.cfg.embed_windows, window=self.cfg.block_size, seed=self.cfg.seed)

    def _chameleon_weights(self, view, proxy, proxy_path, out_dir, mode, embedded: Sequence[str], method):
        from .weights import DEFAULT_RULE
        from .pipeline import compute_weights

        t0 = time.perf_counter()
        rule = CHAMELEON_RULES.get(method) or DEFAULT_RULE
        result, emb, _ = compute_weights(view, proxy_path, out_dir, mode=mode, lam=self.cfg.mode_lam, rule=rule,
                                         embed_config=self._embed_config(), device=self.cfg.device,
                                         cache_dir=os.path.join(self.out, "embeddings"), plots=False,
                                         proxy=proxy)
        tokens = len(embedded) * self.cfg.embed_windows * self.cfg.block_size
        entry = _entry(method, f"embedding pass ({len(embedded)} domains)", FORWARD,
                       non_embedding_parameters(proxy), tokens, time.perf_counter() - t0)
        return dict(zip(result.domains, result.weights.tolist())), entry

    def _chameleon(self, view, key, method: str = "chameleon"):
        folder = os.path.join(self.out, "mixtures", key)
        proxy, path, e1 = self._proxy(view, os.path.join(folder, "proxy"), method)
        weights, e2 = self._chameleon_weights(view, proxy, path, os.path.join(folder, "weights"),
                                              "pretrain", view.domains, method)
        return {"weights": weights, "entries": [e1, e2], "steps_planned": self.cfg.proxy_steps,
                "info": {"proxy": path, "mode": "pretrain", "rule": _rule_of(method)}}

    def _doremi(self, view, key):
        from .baselines.doremi import DoReMiObjective, DoReMiWeights

        folder = os.path.join(self.out, "mixtures", key)
        reference, _, e1 = self._proxy(view, os.path.join(folder, "reference"), "doremi", "reference model")
        objective = DoReMiObjective(reference, DoReMiWeights(view.domains), grad_accum=1)
        proxy, wall = self._train(view, "uniform", os.path.join(folder, "proxy"), self.cfg.proxy_steps,
                                  self.cfg.seed, callbacks=[DoReMiLoss(objective)])
        tokens = self.cfg.proxy_steps * self.cfg.batch_size * self.cfg.block_size
        n = non_embedding_parameters(proxy)
        # The proxy's wall time includes the reference's forwards; the ledger splits FLOPs only.
        e2 = _entry("doremi", "Group-DRO proxy", TRAIN, n, tokens, wall)
        e3 = _entry("doremi", "reference forward on the proxy's batches", FORWARD,
                    non_embedding_parameters(reference), objective.reference_tokens, 0.0)
        result = objective.weights.result().as_dict()
        return {"weights": result["weights"], "entries": [e1, e2, e3],
                "steps_planned": 2 * self.cfg.proxy_steps, "info": result}

    def _regmix(self, view, key):
        from .baselines import natural_weights
        from .baselines.natural import dataset_token_counts
        from .baselines.regmix import RegMixSearch

        c = self.cfg
        folder = os.path.join(self.out, "mixtures", key)
        state_path = os.path.join(folder, "search.json")
        saved = io.read_json_or_none(state_path)
        if saved is not None:
            search, entries = RegMixSearch.from_dict(saved["search"]), list(saved["entries"])
            done = len(search.mixtures) - len(search.pending())
            if self.progress is not None:
                self.progress.update(done * c.regmix_steps)
        else:
            search = RegMixSearch(natural_weights(dataset_token_counts(view, "train")), c.regmix_proxies, c.seed)
            entries = []
        tokens = c.regmix_steps * c.batch_size * c.block_size
        for i in search.pending():
            model, wall = self._train(view, search.mixtures[i], os.path.join(folder, f"proxy{i:03d}"),
                                      c.regmix_steps, c.seed)
            t0 = time.perf_counter()
            ev = self._eval(model, view, "val")  # RegMix fits on validation loss, never test
            n = non_embedding_parameters(model)
            entries.append(_entry("regmix", f"proxy {i}", TRAIN, n, tokens, wall))
            entries.append(_entry("regmix", f"proxy {i} validation pass", FORWARD, n,
                                  len(view.domains) * c.eval_windows * c.block_size, time.perf_counter() - t0))
            search.record(i, {d: ev[d]["loss"] for d in view.domains})
            io.write_json(state_path, {"search": search.to_dict(), "entries": entries}, "RegMix search")
        result = search.result().as_dict()
        return {"weights": result["weights"], "entries": entries,
                "steps_planned": c.regmix_proxies * c.regmix_steps, "info": result}

    # -- base runs --------------------------------------------------------------------------

    def _online_settings(self, steps: int) -> dict:
        c = self.cfg
        # The library's defaults (update every 50 steps after a 100-step warm-up) are for
        # TrainConfig's 1000 steps; shorter runs keep the same proportions.
        every = c.online_every if c.online_every is not None else max(1, round(steps * 50 / 1000))
        warmup = c.online_warmup if c.online_warmup is not None else max(1, round(steps * 100 / 1000))
        return {"every": every, "warmup": warmup}

    def base_run(self, mixture: str, weights: dict, seed: int, data, steps: int, init_from=None,
                 tag: str = "base", online_mode: str = "pretrain") -> dict:
        """One base model on ``weights`` (or the online method) with ``seed``, scored on test."""
        from .model import state_dict_sha256

        online = mixture == "online"
        settings = self._online_settings(steps) if online else None
        # Base runs' steps are fixed for the whole out folder (compare_settings.json); the
        # finetuning runs' steps (finetune_steps) may change, so they are part of the key.
        what = [weights, settings, data.domains, init_from and os.path.abspath(init_from),
                online_mode if online else None] + ([] if tag == "base" else [steps])
        key = f"{tag}-{mixture}-{_digest(what)}-seed{seed}"

        def build():
            folder = os.path.join(self.out, "runs", key)
            init = self._model(data.vocab_size, seed, like=init_from)
            init_hash = state_dict_sha256(init.state_dict())
            callbacks, timed = [], None
            if online:
                from .online import OnlineChameleon, OnlineWeights

                oc = OnlineChameleon(data.domains, mode=online_mode, **settings)
                timed = _Timed(OnlineWeights(oc, init.default_embedding_layer,
                                             os.path.join(folder, "schedule.jsonl")))
                callbacks.append(timed)
            model, wall = self._train(DatasetView(data), "uniform" if online else weights, folder, steps,
                                      seed, callbacks, init_from=init_from)
            t0 = time.perf_counter()
            ev = self._eval(model, data, "test")
            n = non_embedding_parameters(model)
            tokens = steps * self.cfg.batch_size * self.cfg.block_size
            entries = [_entry("base", f"{mixture} seed {seed}", TRAIN, n, tokens, wall)]
            if online:
                entries.append(_entry("online", f"online updates, seed {seed} (hidden states from the "
                                      "training forward: no extra pass)", FORWARD, n, 0, timed.seconds))
            if init_from is not None:  # what the run starts from: the finetuned model's weights
                from .model import load_model

                init_hash = state_dict_sha256(load_model(init_from).state_dict())
            return {"mixture": mixture, "seed": seed, "data_seed": seed, "init_seed": seed,
                    "init_sha256": init_hash, "weights": weights, "online": settings,
                    "steps": steps, "batch_size": self.cfg.batch_size, "block_size": self.cfg.block_size,
                    "tokens": tokens, "init_from": init_from, "steps_planned": steps,
                    "evaluation": {"split": "test", "windows": self.cfg.eval_windows,
                                   "window_tokens": self.cfg.block_size + 1, "seed": self.cfg.eval_seed},
                    "test": {d: ev[d]["ppl"] for d in data.domains},
                    "test_loss": {d: ev[d]["loss"] for d in data.domains},
                    "eval_wall_s": time.perf_counter() - t0, "entries": entries}

        return self._unit(key, f"{tag} run: {mixture}, seed {seed}", build)


# ------------------------------------------------------------------------------------------
# reporting


def _ledger(entries: Sequence[dict]) -> ComputeLedger:
    return ComputeLedger.from_dict({"entries": list(entries)})


def _plot(stats, ledger: ComputeLedger, path: str, title: str) -> Optional[str]:
    """Per-domain bars with error bars (95% intervals), and the average perplexity against the
    mixture's cost on a log axis (a free mixture is drawn at the axis' left edge)."""
    from .plots import _new_figure, _save_png

    doms = list(stats.domains) + [AVERAGE]
    mixes = list(stats.mixtures)
    fig = _new_figure((max(9.0, 1.2 * len(doms) + 6.0), 4.8), "compare", path)
    if fig is None:
        return None
    ax, ax2 = fig.subplots(1, 2, width_ratios=[2.2, 1])
    width = 0.8 / len(mixes)
    for r, m in enumerate(mixes):
        ivs = [stats.mixtures[m].perplexity[d] for d in doms]
        xs = [c - 0.4 + width * (r + 0.5) for c in range(len(doms))]
        err = [iv.half_width or 0.0 for iv in ivs]
        ax.bar(xs, [iv.mean for iv in ivs], width=width, yerr=err, capsize=2, label=m)
    ax.set_xticks(range(len(doms)), labels=doms, rotation=30, ha="right")
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    costs = {m: ledger.flops(m) if m in ledger.methods() else 0.0 for m in mixes}
    positive = [v for v in costs.values() if v > 0]
    floor = min(positive) / 10 if positive else 1.0
    free = 0
    for m in mixes:
        iv = stats.mixtures[m].perplexity[AVERAGE]
        x = costs[m] if costs[m] > 0 else floor
        ax2.errorbar([x], [iv.mean], yerr=[[iv.half_width or 0.0], [iv.half_width or 0.0]], fmt="o", capsize=3)
        # the free mixtures share one x: their labels are stacked so they stay readable
        dy = 4 if costs[m] > 0 else 4 + 10 * free
        free += costs[m] <= 0
        ax2.annotate(m + ("" if costs[m] > 0 else " (free)"), (x, iv.mean), textcoords="offset points",
                     xytext=(4, dy), fontsize=8)
    ax2.set_xscale("log")
    ax2.set_xlabel("mixture cost (FLOPs, log scale)")
    ax2.set_ylabel("average test perplexity")
    ax2.grid(alpha=0.3)
    return _save_png(fig, path)


def _write_outputs(out: str, stem: str, doc: dict, md: str, stats, ledger, title: str, plots: bool) -> dict:
    paths = {"json": io.write_json(os.path.join(out, stem + ".json"), doc, "comparison"),
             "md": io.write_text(os.path.join(out, stem + ".md"), md, "comparison table")}
    if plots:
        paths["png"] = _plot(stats, ledger, os.path.join(out, stem + ".png"), title)
    return paths


def _header(cfg: CompareConfig, title: str, domains: Sequence[str], tokens: int) -> str:
    return (f"# {title}\n\n"
            f"Every base run: {cfg.preset} model, {tokens:,} training tokens "
            f"({tokens // (cfg.batch_size * cfg.block_size)} steps x {cfg.batch_size} x {cfg.block_size}), "
            f"seeds {cfg.seed_list} (the seed sets initialisation and data order for every mixture alike). "
            f"Perplexity on the held-out **test** split ({cfg.eval_windows} windows of {cfg.block_size + 1} "
            f"tokens per domain, evaluation seed {cfg.eval_seed}, the same windows for every run); no "
            f"method saw the test split (RegMix is fitted on validation loss). Domains: "
            f"{', '.join(domains)}.\n\n")


def run_compare(dataset, cfg: CompareConfig, out: str, say=print, plots: bool = True,
                command: Optional[str] = None) -> dict:
    """Run the comparison of ``cfg`` on ``dataset`` (loaded with a test split) into ``out``.
    Returns the document written to ``compare*.json``."""
    out = os.fspath(out)
    io.check_writable_folder(out, "--out")
    settings_path = os.path.join(out, "compare_settings.json")
    mine = {k: getattr(cfg, k) for k in _UNIT_KEYS}
    mine["dataset"] = {d: dataset.fingerprint(d) for d in dataset.domains}
    saved = io.read_json_or_none(settings_path)
    if saved is not None:
        changed = sorted(k for k in mine if k in saved and saved[k] != mine[k] and k != "dataset")
        if changed:
            raise ChameleonUserError(
                f"--out {out!r} holds a comparison made with other settings ({', '.join(changed)}: "
                f"{[saved[k] for k in changed]} there, {[mine[k] for k in changed]} now); use a new "
                "--out or the same settings")
    io.write_json(settings_path, {**(saved or {}), **mine}, "comparison settings")
    c = _Compare(dataset, cfg, out, say)
    if cfg.scenario == "finetune":
        return _finetune(c, dataset, cfg, out, say, plots, command)
    return _pretrain(c, dataset, cfg, out, say, plots, command)


def _plan_steps(cfg: CompareConfig, mixtures: Sequence[str], extra: int = 0) -> int:
    per = {"chameleon": cfg.proxy_steps, "chameleon-paper": cfg.proxy_steps, "doremi": 2 * cfg.proxy_steps,
           "regmix": cfg.regmix_proxies * cfg.regmix_steps}
    return sum(per.get(m, 0) for m in mixtures) + extra + len(mixtures) * cfg.seeds * cfg.steps


def _say_budget(cfg: CompareConfig, say, total_steps: int, what: str) -> None:
    tok = cfg.batch_size * cfg.block_size
    say(f"budget ({what}): {cfg.preset} models, {cfg.block_size}-token blocks, batch {cfg.batch_size}; "
        f"base runs {len(cfg.mixtures)} mixtures x {cfg.seeds} seeds x {cfg.steps} steps "
        f"({cfg.tokens_per_run:,} tokens each); proxies {cfg.proxy_steps} steps; RegMix "
        f"{cfg.regmix_proxies} x {cfg.regmix_steps} steps; {total_steps:,} training steps "
        f"({total_steps * tok:,} tokens) in all, before skipping finished units")


def _pretrain(c: _Compare, ds, cfg: CompareConfig, out: str, say, plots: bool, command) -> dict:
    new = list(cfg.new_domains) if cfg.scenario == "new_domains" else []
    unknown = [d for d in new if d not in ds.domains]
    if unknown:
        raise ChameleonUserError(f"--new-domains: {unknown} are not domains of the data ({ds.domains})")
    if new and len(new) >= len(ds.domains):
        raise ChameleonUserError("--new-domains: at least one domain must stay old")
    old = [d for d in ds.domains if d not in new]
    full = DatasetView(ds)
    extra = cfg.proxy_steps * sum(m in CHAMELEON_RULES for m in cfg.mixtures) if new else 0
    total = _plan_steps(cfg, cfg.mixtures, extra)
    _say_budget(cfg, say, total, cfg.scenario)
    c.progress = Progress(total, desc="compare", unit="step", enabled=not cfg.quiet, plain_every=0.05)
    try:
        say(f"[1/2] mixtures: {', '.join(cfg.mixtures)}" + (f" (new domains: {', '.join(new)})" if new else ""))
        mixtures, absorb = {}, {}
        for name in cfg.mixtures:
            label = name if name in METHODS else _file_label(name)
            if new and name in CHAMELEON_RULES:
                mixtures[label], absorb[label] = _chameleon_transfer(c, ds, old, new, name)
            else:
                mixtures[label] = c.build_mixture(name, full)
                if new:  # every other method simply rebuilds on all domains
                    absorb[label] = _ledger([_as_method(e, label) for e in mixtures[label]["entries"]])
        collapsed = _check_collapsed(mixtures, cfg, cfg.tokens_per_run, say)
        say(f"[2/2] base runs: {len(mixtures)} mixtures x seeds {cfg.seed_list}, {cfg.steps} steps each")
        runs = {label: {s: c.base_run(label, m["weights"], s, ds, cfg.steps) for s in cfg.seed_list}
                for label, m in mixtures.items()}
    finally:
        c.progress.close()
    results = {label: {str(s): r["test"] for s, r in by.items()} for label, by in runs.items()}
    stats = compare_perplexities(results, baseline="uniform" if "uniform" in results else None)
    entries = [_as_method(e, label) for label, m in mixtures.items() for e in m["entries"]]
    entries += [e for by in runs.values() for r in by.values() for e in r["entries"]]
    ledger = _ledger(entries)
    title = ("Pretraining: test perplexity by mixture" if not new else
             f"New domains ({', '.join(new)}): test perplexity by mixture")
    md = _header(cfg, title, ds.domains, cfg.tokens_per_run) + format_comparison_table(stats, ledger)
    md += _collapsed_note(collapsed)
    if new:
        md += ("\nExtra compute each method spent to absorb the new domains (Chameleon: embedding "
               "them with its frozen proxy, the other domains' embeddings from the cache; DoReMi "
               "and RegMix: retraining every proxy on all domains; uniform, natural, online: none):\n\n"
               "| mixture | extra FLOPs | extra wall s |\n|---|---:|---:|\n")
        for label in mixtures:
            led = absorb.get(label)
            md += (f"| {label} | {led.flops():.3g} | {led.wall_s():.1f} |\n" if led is not None
                   else f"| {label} | 0 | 0 |\n")
    if command:
        md += f"\nCommand: `{command}`\n"
    doc = {"format": "chameleon_ext.compare/1", "scenario": cfg.scenario, "command": command,
           "config": cfg.to_dict(), "domains": list(ds.domains), "new_domains": new,
           "seeds": cfg.seed_list, "tokens_per_run": cfg.tokens_per_run,
           "evaluation": {"split": "test", "windows": cfg.eval_windows, "seed": cfg.eval_seed,
                          "window_tokens": cfg.block_size + 1},
           "mixtures": {label: {"weights": m["weights"], "info": m.get("info", {})} for label, m in mixtures.items()},
           "runs": {label: {str(s): {k: r[k] for k in ("test", "test_loss", "tokens", "init_sha256",
                                                       "data_seed", "init_seed", "evaluation", "steps")}
                            for s, r in by.items()} for label, by in runs.items()},
           "stats": stats.as_dict(), "compute": ledger.to_dict(),
           "absorb_new_domains": {k: v.to_dict() for k, v in absorb.items()} if new else None,
           "collapsed": collapsed,
           "table": md}
    paths = _write_outputs(out, OUTPUT_STEM[cfg.scenario], doc, md, stats, ledger, title, plots)
    say("\n" + md)
    say("wrote " + ", ".join(p for p in paths.values() if p))
    return doc


def _file_label(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    if base == "weights.json":
        return os.path.basename(os.path.dirname(os.path.abspath(path))) or "weights"
    return os.path.splitext(base)[0]


def _as_method(entry: dict, method: str) -> dict:
    return {**entry, "method": method}


def _rule_of(method: str) -> str:
    from .weights import DEFAULT_RULE

    return CHAMELEON_RULES.get(method) or DEFAULT_RULE


def _check_collapsed(mixtures: dict, cfg: CompareConfig, tokens: int, say) -> dict:
    """``{label: {"domain", "weight"}}`` of the mixtures with one domain above the collapse
    threshold, each announced with its tokens per domain; ``cfg.strict`` stops here instead."""
    from .uncertainty import COLLAPSED_WEIGHT, collapse_lines
    from .weights import DEFAULT_RULE

    out = {}
    default = mixtures.get("chameleon")
    for label, m in mixtures.items():
        fix = None
        if label == "chameleon-paper" and default is not None:  # the default rule on the same proxy's data
            fix = (f"the chameleon mixture in this table (the default {DEFAULT_RULE} rule) puts at most "
                   f"{max(default['weights'].values()):.3f} on one domain")
        lines = collapse_lines(m["weights"], tokens, fix, f"mixture {label!r}")
        if lines:
            top = max(m["weights"], key=m["weights"].get)
            out[label] = {"domain": top, "weight": float(m["weights"][top])}
            for line in lines:
                say(line)
    if out and cfg.strict:
        raise ChameleonUserError(f"--strict: collapsed mixture(s) {sorted(out)} (one domain > {COLLAPSED_WEIGHT}); "
                                 "not training on them")
    return out


def _collapsed_note(collapsed: dict) -> str:
    if not collapsed:
        return ""
    items = "; ".join(f"**{label}** ({v['domain']} {v['weight']:.4f})" for label, v in collapsed.items())
    return f"\nCOLLAPSED mixtures (one domain above 0.9 of the data): {items}.\n"


def _chameleon_transfer(c: _Compare, ds, old: List[str], new: List[str], method: str = "chameleon"):
    """Chameleon in the new-domains scenario: the proxy trained and the embeddings computed on
    the old domains only; then the new domains embedded with the frozen proxy (transfer mode),
    the old ones read from the embedding cache. Returns (mixture, ledger of the extra cost)."""
    old_view = DatasetView(ds, old)
    base = c.build_mixture(method, old_view)  # what existed before the new domains came
    key = f"mixture-{method}-transfer-{_digest([old, new, _rule_of(method)])}"

    def build():
        from .pipeline import load_proxy

        path = base["info"]["proxy"]
        proxy = load_proxy(path, device="cpu")
        weights, entry = c._chameleon_weights(DatasetView(ds), proxy, path, os.path.join(
            c.out, "mixtures", key, "weights"), "transfer", new, method)
        return {"weights": weights, "entries": [entry], "info": {"proxy": path, "mode": "transfer",
                                                                  "new_domains": new, "rule": _rule_of(method)}}

    rec = c._unit(key, f"{method} transfer to {', '.join(new)}", build)
    mixture = {"weights": rec["weights"], "entries": base["entries"] + rec["entries"], "info": rec["info"]}
    return mixture, _ledger(rec["entries"])


FINETUNE_METHODS = ("uniform", "natural", "chameleon", "chameleon-paper", "doremi")


def _finetune(c: _Compare, ds, cfg: CompareConfig, out: str, say, plots: bool, command) -> dict:
    """The finetuning scenario (module doc): one start model, finetuned per mixture and seed."""
    from .model import load_model

    if cfg.finetune_from:
        fdoms = list(cfg.finetune_domains or ds.domains)
    else:
        fdoms = list(cfg.finetune_domains)
    unknown = [d for d in fdoms if d not in ds.domains]
    if unknown:
        raise ChameleonUserError(f"--finetune-domains: {unknown} are not domains of the data ({ds.domains})")
    pre = [d for d in ds.domains if d not in fdoms]
    if not cfg.finetune_from and not pre:
        raise ChameleonUserError("--finetune-domains: leave at least one domain to pretrain the base model on "
                                 "(or give --finetune-from)")
    skipped = [m for m in cfg.mixtures if m in METHODS and m not in FINETUNE_METHODS]
    mixes = [m for m in cfg.mixtures if m not in skipped]
    if "uniform" not in mixes:
        mixes.insert(0, "uniform")
    if len(fdoms) == 2 and any(m in CHAMELEON_RULES for m in mixes):
        say("note: with 2 finetuning domains both always have the same leverage, so Chameleon's "
            "finetuning weights are uniform; use 3 or more domains to tell them apart")
    fview = DatasetView(ds, fdoms)
    scored = DatasetView(ds, fdoms, hide_test=False)
    total = (0 if cfg.finetune_from else cfg.steps) + len(mixes) * cfg.seeds * cfg.finetune_steps
    total += (2 * cfg.finetune_steps) if "doremi" in mixes else 0
    say(f"budget (finetune): start model {'given' if cfg.finetune_from else f'pretrained here ({cfg.steps} steps, uniform over {pre})'}; "
        f"{len(mixes)} mixtures x {cfg.seeds} seeds x {cfg.finetune_steps} finetuning steps "
        f"({cfg.finetune_steps * cfg.batch_size * cfg.block_size:,} tokens each) on {fdoms}; {total:,} training steps in all"
        + (f"; not part of this scenario: {skipped}" if skipped else ""))
    c.progress = Progress(total, desc="compare", unit="step", enabled=not cfg.quiet, plain_every=0.05)
    shared = []
    try:
        if cfg.finetune_from:
            start = os.path.abspath(cfg.finetune_from)
            load_model(start)  # verified now, not after the first mixture
        else:
            rec = c.base_run("uniform", {d: 1.0 / len(pre) for d in pre}, cfg.seed, DatasetView(ds, pre, hide_test=False),
                             cfg.steps, tag="start")
            start = os.path.join(c.out, "runs", rec["key"], "model.pt")
            shared = [_as_method(e, "start model (shared)") for e in rec["entries"]]
        say(f"[1/2] finetuning mixtures: {', '.join(mixes)} on {', '.join(fdoms)}")
        mixtures = {}
        for name in mixes:
            label = name if name in METHODS else _file_label(name)
            if name in CHAMELEON_RULES:
                mixtures[label] = c._unit(f"finetune-{name}-{_digest([start, fdoms, _rule_of(name)])}",
                                          f"{name} finetuning weights",
                                          lambda: _chameleon_finetune(c, fview, start, name))
            elif name == "doremi":
                mixtures[label] = c._unit(f"finetune-doremi-{_digest([start, fdoms, cfg.finetune_steps])}", "doremi finetuning weights",
                                          lambda: _doremi_finetune(c, fview, start))
            else:
                mixtures[label] = c.build_mixture(name, fview)
        collapsed = _check_collapsed(mixtures, cfg, cfg.finetune_steps * cfg.batch_size * cfg.block_size, say)
        say(f"[2/2] finetuning runs: {len(mixtures)} mixtures x seeds {cfg.seed_list}, {cfg.finetune_steps} steps each")
        runs = {label: {s: c.base_run(label, m["weights"], s, scored, cfg.finetune_steps, init_from=start, tag="finetune")
                        for s in cfg.seed_list} for label, m in mixtures.items()}
    finally:
        c.progress.close()
    results = {label: {str(s): r["test"] for s, r in by.items()} for label, by in runs.items()}
    stats = compare_perplexities(results, baseline="uniform")
    entries = [_as_method(e, label) for label, m in mixtures.items() for e in m["entries"]]
    entries += [e for by in runs.values() for r in by.values() for e in r["entries"]] + shared
    ledger = _ledger(entries)
    improved = {}
    for label, ms in stats.mixtures.items():
        if ms.difference is None:
            continue
        diffs = {d: ms.difference[d] for d in fdoms}
        improved[label] = {"domains": len(fdoms),
                           "improved_mean": sorted(d for d, iv in diffs.items() if iv.mean < 0),
                           "improved_interval": sorted(d for d, iv in diffs.items()
                                                       if iv.high is not None and iv.high < 0),
                           "worse_interval": sorted(d for d, iv in diffs.items()
                                                    if iv.low is not None and iv.low > 0)}
    title = f"Finetuning on {', '.join(fdoms)}: test perplexity by finetuning mixture"
    md = (_header(cfg, title, fdoms, cfg.finetune_steps * cfg.batch_size * cfg.block_size)
          + f"Every run continues the same start model ({start}).\n\n" + format_comparison_table(stats, ledger))
    md += _collapsed_note(collapsed)
    md += "\nFinetuning domains improved over uniform (paired, same seeds):\n\n"
    md += "| mixture | mean lower | 95% interval below 0 | 95% interval above 0 (worse) |\n|---|---:|---:|---:|\n"
    for label, imp in improved.items():
        n = imp["domains"]
        md += (f"| {label} | {len(imp['improved_mean'])} of {n} | {len(imp['improved_interval'])} of {n} | "
               f"{len(imp['worse_interval'])} of {n} |\n")
    if shared:
        md += f"\nThe start model's pretraining (shared by every mixture): {_ledger(shared).flops():.3g} FLOPs.\n"
    if command:
        md += f"\nCommand: `{command}`\n"
    doc = {"format": "chameleon_ext.compare/1", "scenario": "finetune", "command": command,
           "config": cfg.to_dict(), "domains": fdoms, "pretrain_domains": pre, "start_model": start,
           "seeds": cfg.seed_list, "tokens_per_run": cfg.finetune_steps * cfg.batch_size * cfg.block_size,
           "evaluation": {"split": "test", "windows": cfg.eval_windows, "seed": cfg.eval_seed,
                          "window_tokens": cfg.block_size + 1},
           "mixtures": {label: {"weights": m["weights"], "info": m.get("info", {})} for label, m in mixtures.items()},
           "runs": {label: {str(s): {k: r[k] for k in ("test", "test_loss", "tokens", "init_sha256",
                                                       "data_seed", "init_seed", "evaluation", "steps")}
                            for s, r in by.items()} for label, by in runs.items()},
           "improved": improved, "not_in_scenario": skipped, "collapsed": collapsed,
           "stats": stats.as_dict(), "compute": ledger.to_dict(), "table": md}
    paths = _write_outputs(out, OUTPUT_STEM["finetune"], doc, md, stats, ledger, title, plots)
    say("\n" + md)
    say("wrote " + ", ".join(p for p in paths.values() if p))
    return doc


def _chameleon_finetune(c: _Compare, fview, start: str, method: str = "chameleon") -> dict:
    """Chameleon's finetuning weights: the finetuning domains embedded with the start model
    itself as the frozen proxy (no proxy training), leverage-proportional (``mode="finetune"``)."""
    from .model import load_model

    model = load_model(start)
    key = f"finetune-{method}-{_digest([start, fview.domains, _rule_of(method)])}"
    weights, entry = c._chameleon_weights(fview, model, start, os.path.join(c.out, "mixtures", key, "weights"),
                                          "finetune", fview.domains, method)
    return {"weights": weights, "entries": [entry], "info": {"proxy": start, "mode": "finetune",
                                                             "rule": _rule_of(method)}}


def _doremi_finetune(c: _Compare, fview, start: str) -> dict:
    """DoReMi on the finetuning domains: the reference is the start model finetuned on
    uniform; the Group-DRO proxy is finetuned from the start model too."""
    from .baselines.doremi import DoReMiObjective, DoReMiWeights

    cfg = c.cfg
    folder = os.path.join(c.out, "mixtures", f"finetune-doremi-{_digest([start, fview.domains, cfg.finetune_steps])}")
    ref, wall1 = c._train(fview, "uniform", os.path.join(folder, "reference"), cfg.finetune_steps, cfg.seed,
                          init_from=start)
    objective = DoReMiObjective(ref, DoReMiWeights(fview.domains), grad_accum=1)
    proxy, wall2 = c._train(fview, "uniform", os.path.join(folder, "proxy"), cfg.finetune_steps, cfg.seed,
                            callbacks=[DoReMiLoss(objective)], init_from=start)
    n, tokens = non_embedding_parameters(proxy), cfg.finetune_steps * cfg.batch_size * cfg.block_size
    entries = [_entry("doremi", "reference finetune", TRAIN, n, tokens, wall1),
               _entry("doremi", "Group-DRO proxy finetune", TRAIN, n, tokens, wall2),
               _entry("doremi", "reference forward on the proxy's batches", FORWARD, n, objective.reference_tokens, 0.0)]
    result = objective.weights.result().as_dict()
    return {"weights": result["weights"], "entries": entries, "steps_planned": 2 * cfg.finetune_steps,
            "info": result}
