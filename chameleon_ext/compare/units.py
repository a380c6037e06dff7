"""The units of a comparison: proxies and mixtures (the registry of methods,
:meth:`Comparison.build_mixture`), and the base runs, each reused from its record when it
was computed from the same data, tokenizer, settings and library version."""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

from .. import io
from ..compare_stats import FORWARD, TRAIN, non_embedding_parameters
from ..errors import ChameleonUserError
from ..progress import Progress
from .callbacks import DoReMiLoss, StepProgress, Timed
from ..data.view import DatasetView
from .config import CHAMELEON_RULES, COMMON_KEYS, EXTRA_KEYS, KIND_KEYS, CompareConfig, rule_of
from .records import Records, digest, ledger_entry, stale_reason


class Comparison:
    """One comparison into ``out``: builds mixtures and trains base runs as units
    (:meth:`unit`), each reused from its record when what it was computed from still holds."""

    def __init__(self, dataset, cfg: CompareConfig, out: str, say=print):
        self.ds, self.cfg, self.out, self.say = dataset, cfg, out, say
        self.records = Records(out)
        self.progress: Optional[Progress] = None
        self._model_hashes: dict = {}
        if not all(dataset.n_tokens(d, "test") for d in dataset.domains):
            raise ChameleonUserError("the dataset has no test split: load it with test_fraction > 0 "
                                     "(or give every domain a test.bin)")

    # -- training helpers -------------------------------------------------------------------

    def _model(self, vocab: int, seed: int, like: Optional[str] = None):
        """A fresh GPT of the comparison's preset, or shaped like the model file ``like`` (a
        finetuning start, whose weights the trainer then loads)."""
        from ..model import GPT, GPTConfig, load_model

        if like is not None:
            return GPT(load_model(like).config, seed=seed)
        return GPT(GPTConfig.preset(self.cfg.preset, vocab, self.cfg.train.block_size), seed=seed)

    def train_model(self, data, weights, out_dir: str, steps: int, seed: int, callbacks=(),
               init_from=None):
        """Train one model; ``(model, seconds)``. Resumes an interrupted run exactly."""
        from dataclasses import replace

        from ..trainer import train

        # the comparison's training settings, with this run's steps, seed and folder
        cfg = replace(self.cfg.train, steps=steps, warmup_steps=min(self.cfg.train.warmup_steps, max(steps - 1, 0)),
                      seed=seed, out_dir=out_dir, quiet=True, log_every=max(1, steps))
        model = self._model(data.vocab_size, seed, like=init_from)
        cbs = list(callbacks) + ([StepProgress(self.progress)] if self.progress is not None else [])
        t0 = time.perf_counter()
        train(model, data, weights, cfg, callbacks=cbs, init_from=init_from)
        return model, time.perf_counter() - t0

    def _eval(self, model, data, split: str) -> dict:
        from ..evaluation import evaluate

        return evaluate(model, data, self.cfg.train.eval_windows, self.cfg.train.block_size, seed=self.cfg.eval_seed,
                        device=self.cfg.train.device, split=split)

    def provenance(self, data, kind: str, **inputs) -> dict:
        """What a unit of ``kind`` trained or scored on ``data`` is computed from: each domain's
        data fingerprint (which covers the tokenizer's name), the tokenizer's content hash, the
        settings of that kind of unit, the library version, and ``inputs`` (e.g. the hash of a
        finetuning start model)."""
        from .. import __version__

        record = data.tokenizer_record() if hasattr(data, "tokenizer_record") else None
        keys = COMMON_KEYS + KIND_KEYS.get(kind, ())
        return {"data": {d: data.fingerprint(d) for d in data.domains},
                "tokenizer": None if record is None else record["sha256"],
                "settings": self.cfg.settings(keys, EXTRA_KEYS["common"] + EXTRA_KEYS.get(kind, ())), "library": __version__, **inputs}

    def unit(self, unit: str, what: str, provenance: dict, build) -> dict:
        """The record of ``unit``: reused when it was computed from ``provenance``, else
        (re)computed by ``build(key)`` in work folders named ``key`` (unit + provenance digest)."""
        key = f"{unit}-{digest(provenance, 8)}"
        rec = self.records.get(unit)
        if rec is not None:
            why = stale_reason(rec.get("provenance"), provenance)
            if why is None:
                self.say(f"  {what}: reused (record {self.records.path(unit)}: computed from the same data "
                         "fingerprints, tokenizer, settings and chameleon_ext version), skipped")
                if self.progress is not None:
                    self.progress.update(rec.get("steps_planned", 0))
                return rec
            self.say(f"  {what}: the record {self.records.path(unit)} is stale ({why}); recomputing")
        else:
            self.say(f"  {what} ...")
        return self.records.put(unit, key, provenance, build(key))

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
                             **self._online_settings(self.cfg.train.steps)}}
        if name == "natural":
            from ..baselines import natural_weights
            from ..baselines.natural import dataset_token_counts

            return {"weights": natural_weights(dataset_token_counts(view, "train")), "entries": [],
                    "info": {"rule": "token shares of the training split"}}
        unit = f"mixture-{name}-{digest([view.domains, tag])}"
        if name in CHAMELEON_RULES:  # the rule is part of what the mixture is computed from
            return self.unit(unit, f"{name} mixture ({k} domains)",
                             self.provenance(view, "chameleon", rule=rule_of(name)),
                             lambda key: self._chameleon(view, key, name))
        build = {"doremi": self._doremi, "regmix": self._regmix}.get(name)
        if build is not None:
            return self.unit(unit, f"{name} mixture ({k} domains)", self.provenance(view, name),
                              lambda key: build(view, key))
        from ..pipeline import read_weights

        return {"weights": read_weights(name, view.domains), "entries": [],
                "info": {"file": os.path.abspath(name), "cost": "not known (given as a file)"}}

    def _proxy(self, view, folder: str, method: str, name: str = "proxy") -> tuple:
        """A proxy trained on uniform over ``view``: ``(model, path, ledger entry)``."""
        model, wall = self.train_model(view, "uniform", folder, self.cfg.proxy_steps, self.cfg.train.seed)
        tokens = self.cfg.tokens(self.cfg.proxy_steps)
        return model, os.path.join(folder, "model.pt"), ledger_entry(
            method, name, TRAIN, non_embedding_parameters(model), tokens, wall)

    def chameleon_weights(self, view, proxy, proxy_path, out_dir, mode, embedded: Sequence[str], method):
        from ..embed import cache_reuse_line
        from ..pipeline import compute_weights

        t0 = time.perf_counter()
        result, emb, _ = compute_weights(view, proxy_path, out_dir, mode=mode, lam=self.cfg.mode_lam,
                                         rule=rule_of(method),
                                         embed_config=self.cfg.embed_config(), device=self.cfg.train.device,
                                         cache_dir=os.path.join(self.out, "embeddings"), plots=False,
                                         proxy=proxy, notice=lambda line: self.say("  " + line))
        reuse = cache_reuse_line(emb, os.path.join(self.out, "embeddings"))
        if reuse is not None:
            self.say("  " + reuse)
        tokens = len(embedded) * self.cfg.embed.n_windows * self.cfg.embed_config().window
        entry = ledger_entry(method, f"embedding pass ({len(embedded)} domains)", FORWARD,
                       non_embedding_parameters(proxy), tokens, time.perf_counter() - t0)
        return dict(zip(result.domains, result.weights.tolist())), entry

    def _chameleon(self, view, key, method: str = "chameleon"):
        folder = os.path.join(self.out, "mixtures", key)
        proxy, path, e1 = self._proxy(view, os.path.join(folder, "proxy"), method)
        weights, e2 = self.chameleon_weights(view, proxy, path, os.path.join(folder, "weights"),
                                             "pretrain", view.domains, method)
        return {"weights": weights, "entries": [e1, e2], "steps_planned": self.cfg.proxy_steps,
                "info": {"proxy": path, "mode": "pretrain", "rule": rule_of(method)}}

    def _doremi(self, view, key):
        from ..baselines.doremi import DoReMiObjective, DoReMiWeights

        folder = os.path.join(self.out, "mixtures", key)
        reference, _, e1 = self._proxy(view, os.path.join(folder, "reference"), "doremi", "reference model")
        objective = DoReMiObjective(reference, DoReMiWeights(view.domains), grad_accum=self.cfg.train.grad_accum)
        proxy, wall = self.train_model(view, "uniform", os.path.join(folder, "proxy"), self.cfg.proxy_steps,
                                  self.cfg.train.seed, callbacks=[DoReMiLoss(objective)])
        tokens = self.cfg.tokens(self.cfg.proxy_steps)
        n = non_embedding_parameters(proxy)
        # The proxy's wall time includes the reference's forwards; the ledger splits FLOPs only.
        e2 = ledger_entry("doremi", "Group-DRO proxy", TRAIN, n, tokens, wall)
        e3 = ledger_entry("doremi", "reference forward on the proxy's batches", FORWARD,
                    non_embedding_parameters(reference), objective.reference_tokens, 0.0)
        result = objective.weights.result().as_dict()
        return {"weights": result["weights"], "entries": [e1, e2, e3],
                "steps_planned": 2 * self.cfg.proxy_steps, "info": result}

    def _regmix(self, view, key):
        from ..baselines import natural_weights
        from ..baselines.natural import dataset_token_counts
        from ..baselines.regmix import RegMixSearch

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
            search = RegMixSearch(natural_weights(dataset_token_counts(view, "train")), c.regmix_proxies, c.train.seed)
            entries = []
        tokens = c.tokens(c.regmix_steps)
        for i in search.pending():
            model, wall = self.train_model(view, search.mixtures[i], os.path.join(folder, f"proxy{i:03d}"),
                                      c.regmix_steps, c.train.seed)
            t0 = time.perf_counter()
            ev = self._eval(model, view, "val")  # RegMix fits on validation loss, never test
            n = non_embedding_parameters(model)
            entries.append(ledger_entry("regmix", f"proxy {i}", TRAIN, n, tokens, wall))
            entries.append(ledger_entry("regmix", f"proxy {i} validation pass", FORWARD, n,
                                  len(view.domains) * c.train.eval_windows * c.train.block_size, time.perf_counter() - t0))
            search.record(i, {d: ev[d]["loss"] for d in view.domains})
            io.write_json(state_path, {"search": search.to_dict(), "entries": entries}, "RegMix search")
        result = search.result().as_dict()
        return {"weights": result["weights"], "entries": entries,
                "steps_planned": c.regmix_proxies * c.regmix_steps, "info": result}

    # -- base runs --------------------------------------------------------------------------

    def _online_settings(self, steps: int) -> dict:
        import inspect

        from ..online import OnlineChameleon
        from ..train_config import TrainConfig

        c = self.cfg
        # OnlineChameleon's defaults (an update every 50 steps after a 100-step warm-up) are
        # for TrainConfig's 1000 steps; shorter runs keep the same proportions.
        library = inspect.signature(OnlineChameleon).parameters
        span = TrainConfig().steps
        every = c.online_every if c.online_every is not None else max(1, round(steps * library["every"].default / span))
        warmup = (c.online_warmup if c.online_warmup is not None
                  else max(1, round(steps * library["warmup"].default / span)))
        return {"every": every, "warmup": warmup}

    def base_run(self, mixture: str, weights: dict, seed: int, data, steps: int, init_from=None,
                 tag: str = "base", online_mode: str = "pretrain") -> dict:
        """One base model on ``weights`` (or the online method) with ``seed``, scored on test."""
        from ..model import state_dict_sha256

        online = mixture == "online"
        settings = self._online_settings(steps) if online else None
        # Base runs' steps are fixed for the whole out folder (compare_settings.json); the
        # finetuning runs' steps (finetune_steps) may change, so they are part of the key.
        what = [weights, settings, data.domains, init_from and os.path.abspath(init_from),
                online_mode if online else None] + ([] if tag == "base" else [steps])
        unit = f"{tag}-{mixture}-{digest(what)}-seed{seed}"
        inputs = {"init_sha256": self.model_hash(init_from)} if init_from is not None else {}
        provenance = self.provenance(data, "base" if tag == "base" else tag, **inputs)

        def build(key):
            folder = os.path.join(self.out, "runs", key)
            init = self._model(data.vocab_size, seed, like=init_from)
            init_hash = state_dict_sha256(init.state_dict())
            callbacks, timed = [], None
            if online:
                from ..online import OnlineChameleon, OnlineWeights

                oc = OnlineChameleon(data.domains, mode=online_mode, **settings)
                timed = Timed(OnlineWeights(oc, init.default_embedding_layer,
                                             os.path.join(folder, "schedule.jsonl")))
                callbacks.append(timed)
            model, wall = self.train_model(DatasetView(data), "uniform" if online else weights, folder, steps,
                                      seed, callbacks, init_from=init_from)
            t0 = time.perf_counter()
            ev = self._eval(model, data, "test")
            n = non_embedding_parameters(model)
            tokens = self.cfg.tokens(steps)
            entries = [ledger_entry("base", f"{mixture} seed {seed}", TRAIN, n, tokens, wall)]
            if online:
                entries.append(ledger_entry("online", f"online updates, seed {seed} (hidden states from the "
                                      "training forward: no extra pass)", FORWARD, n, 0, timed.seconds))
            if init_from is not None:  # what the run starts from: the finetuned model's weights
                from ..model import load_model

                init_hash = state_dict_sha256(load_model(init_from).state_dict())
            return {"mixture": mixture, "seed": seed, "data_seed": seed, "init_seed": seed,
                    "init_sha256": init_hash, "weights": weights, "online": settings,
                    "steps": steps, "batch_size": self.cfg.train.batch_size, "block_size": self.cfg.train.block_size,
                    "tokens": tokens, "init_from": init_from, "steps_planned": steps,
                    "evaluation": {"split": "test", "windows": self.cfg.train.eval_windows,
                                   "window_tokens": self.cfg.train.block_size + 1, "seed": self.cfg.eval_seed},
                    "test": {d: ev[d]["ppl"] for d in data.domains},
                    "test_loss": {d: ev[d]["loss"] for d in data.domains},
                    "eval_wall_s": time.perf_counter() - t0, "entries": entries}

        return self.unit(unit, f"{tag} run: {mixture}, seed {seed}", provenance, build)

    def model_hash(self, path: str) -> str:
        """Content hash of the model file ``path`` (a finetuning start), read once."""
        path = os.path.abspath(path)
        if path not in self._model_hashes:
            from ..model import load_model

            self._model_hashes[path] = load_model(path).content_hash
        return self._model_hashes[path]
