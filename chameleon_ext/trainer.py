"""Minimal, exactly-resumable trainer for mixture training (proxy, base model, finetuning).

Chameleon trains twice: a small *proxy* on the uniform mixture of the k domains
(``docs/method.md``, step 1), then the base model with domain ``i`` sampled with probability
``alpha_i`` (step 6). Both are :func:`train` with different ``weights``; finetuning is
:func:`train` with ``init_from`` pointing at a trained model.

* **Data order is a pure function of the seed**
  (:class:`~chameleon_ext.data.sampler.WeightedDomainSampler`).
* **Exact resume.** A checkpoint (:mod:`chameleon_ext.checkpoint`) holds the model, optimiser,
  every rank's sampler, RNG and callback state, and the step, so stopping at step N and
  resuming gives bitwise the same parameters on CPU, and the same logged metrics, as an
  uninterrupted run. Resume verifies the checkpoint's hashes first.
* **Never saves a diverged model.** A step whose gradient is not finite is skipped; after
  ``TrainConfig.max_bad_steps`` such steps in a row the run stops (:class:`TrainingDiverged`)
  and the last good checkpoint stays.
* **Callbacks** (:mod:`chameleon_ext.callbacks`) see every batch (with hidden states at a
  layer they choose), every step, evaluation and save, and may change the mixture; logging
  and evaluation are callbacks themselves. One callback may replace the training loss (the
  loss hook, ``Callback.replaces_loss``/``compute_loss``: e.g. DoReMi's Group-DRO objective).
* **Data parallel on torch.distributed.** Under ``torchrun`` (after
  :func:`chameleon_ext.distributed.init_from_env`) the model is wrapped in
  ``DistributedDataParallel``; ``TrainConfig.batch_size`` stays the *global* batch, so the
  data, and the result up to float rounding, do not depend on the number of processes. Rank 0
  alone writes files. ``docs/distributed.md`` has the launch commands.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from . import checkpoint as ckpt_io
from . import distributed, io
from .callbacks import Batch, Callback, MetricsLog, PeriodicEval, TrainState
from .data.sampler import WeightedDomainSampler, WeightsLike
from .errors import ChameleonUserError
from .evaluation import evaluate
from .model import GPT, autocast, check_same_config, load_model, save_model
from .progress import Progress
from .train_config import CosineSchedule, TrainConfig

__all__ = ["TrainConfig", "CosineSchedule", "TrainingDiverged", "train", "evaluate"]

MODEL_NAME = "model.pt"
METRICS_NAME = "metrics.jsonl"


class TrainingDiverged(ChameleonUserError):
    """The loss or gradient stayed non-finite for ``max_bad_steps`` steps in a row."""


# ------------------------------------------------------------------------------------------
# the trainer


class _Trainer:
    """One run of :func:`train`: set-up, resume or initialise, steps, evaluation, saving."""

    def __init__(self, model: GPT, dataset, cfg: TrainConfig, callbacks: Sequence[Callback],
                 group: Optional[Any]):
        self.model, self.dataset, self.cfg, self.group = model, dataset, cfg, group
        di = distributed.info(group)
        self.rank, self.world, self.is_main = di.rank, di.world_size, di.rank == 0
        self.distributed = distributed.is_distributed(group)
        self.ckpt_path = os.path.join(cfg.out_dir, ckpt_io.CHECKPOINT_NAME)
        self.model_path = os.path.join(cfg.out_dir, MODEL_NAME)
        self.metrics = MetricsLog(os.path.join(cfg.out_dir, METRICS_NAME))
        self.callbacks = [self.metrics, PeriodicEval(), *callbacks]
        names = [cb.name for cb in self.callbacks]
        if len(set(names)) != len(names):
            raise ChameleonUserError(f"callbacks: names must be unique (they key checkpoint "
                                     f"state), got {names}")
        losses = [cb for cb in self.callbacks if cb.replaces_loss]
        if len(losses) > 1:
            raise ChameleonUserError(f"callbacks: at most one may replace the loss (replaces_loss), "
                                     f"got {[cb.name for cb in losses]}")
        self.loss_callback = losses[0] if losses else None
        self.notices: list[str] = []
        self.lock, self.progress, self.ddp, self._hooks = None, None, None, []
        self.step, self.last_ckpt, self.bad_streak = 0, -1, 0

    def collective(self, what: str, fn, flag=None) -> list:
        """Run ``fn`` on every rank, then agree on whether every rank got through."""
        error, value = None, 0
        try:
            result = fn()
            value = int(flag(result)) if flag else 0
        except Exception as exc:
            if not self.distributed:
                raise
            error = exc
        return distributed.agree(error, what, self.group, flag=value)

    # -- set-up (local work only; every rank then meets in agree) -----------------------------

    def setup(self, weights: WeightsLike, resume: bool) -> bool:
        cfg, model = self.cfg, self.model
        self.device = distributed.resolve_device(cfg.device, group=self.group)
        if self.distributed and self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL and object collectives use it
        if cfg.batch_size % self.world:
            raise ChameleonUserError(
                f"TrainConfig.batch_size: the global batch {cfg.batch_size} is not divisible by "
                f"the world size {self.world}; use a multiple of {self.world} (each rank takes "
                "batch_size / world_size rows per micro-batch)")
        self.T = cfg.block_size or model.config.block_size
        if self.T > model.config.block_size:
            raise ChameleonUserError(f"TrainConfig.block_size: {self.T} exceeds the model's "
                                     f"block_size {model.config.block_size}")
        self.dataset.check_vocab(model.config.vocab_size)
        self.sampler = WeightedDomainSampler(self.dataset, weights, self.T, seed=cfg.seed,
                                             rank=self.rank, world_size=self.world)
        self.fingerprints = {d: self.dataset.fingerprint(d) for d in self.dataset.domains}
        if self.is_main:
            self.lock = io.FolderLock(cfg.out_dir, "output folder (out_dir)",
                                      on_stale=self.notices.append).acquire()
            for path in io.remove_stale_temps(cfg.out_dir):
                self.notices.append(f"removed {path!r}, left by a writer that was killed")
        model.to(self.device)
        model.train()
        self.optimizer = _make_optimizer(model, cfg, self.device)
        self.schedule = CosineSchedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
        return bool(resume) and os.path.exists(self.ckpt_path)

    def resume(self, seen: list[int]) -> None:
        cfg, path = self.cfg, self.ckpt_path
        if any(seen) and not all(seen):
            raise ChameleonUserError(
                f"{path!r} exists for rank(s) {[r for r in range(self.world) if seen[r]]} but "
                f"not for rank(s) {[r for r in range(self.world) if not seen[r]]}: out_dir must "
                "be on a filesystem shared by all ranks")
        ckpt = ckpt_io.load_checkpoint(path)
        if int(ckpt["world_size"]) != self.world:
            w = int(ckpt["world_size"])
            raise ChameleonUserError(
                f"checkpoint {path!r} was written by a run with world size {w}, but this run "
                f"has world size {self.world}; resume with {w} process(es) in total (torchrun "
                f"--nnodes N --nproc_per_node M with N * M = {w}), or use a new out_dir / "
                "resume=False")
        check_same_config(self.model, ckpt["model_config"], f"checkpoint {path!r}")
        saved = ckpt["train_config"]
        cfg.check_resumable(saved, self.T, saved.get("block_size") or ckpt["model_config"]["block_size"])
        changed = [d for d, f in ckpt["fingerprints"].items() if self.fingerprints.get(d) != f]
        if changed:
            self.notices.append(
                f"note: the data of domain(s) {changed} changed since the checkpoint was written; "
                "resuming on the new data (the run no longer matches an uninterrupted one)")
        step = int(ckpt["step"])
        if saved.get("steps") != cfg.steps and step < cfg.steps:
            self.notices.append(f"note: steps changed from {saved.get('steps')} to {cfg.steps}; "
                                "the cosine schedule is stretched accordingly")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.sampler.load_state_dict(ckpt["samplers"][self.rank])
        ckpt_io.set_rng_state(ckpt["rngs"][self.rank], self.device)
        mine = ckpt["callbacks"][self.rank]
        for cb in self.callbacks:
            if cb.name in mine:
                cb.load_state_dict(mine[cb.name])
        self.step = self.last_ckpt = step
        why = ("every domain's data fingerprint matches" if not changed else
               f"the data of {changed} changed, see above")
        self.notices.append(f"resumed from {path} at step {step} (checked: the same model shape, training "
                            f"settings, domains and world size; {why})")
        if step > cfg.steps:
            self.notices.append(
                f"note: the checkpoint is at step {step}, past steps={cfg.steps}: the run already "
                "went further than asked, nothing to train (use a new out_dir for a shorter run)")
        elif step == cfg.steps:
            self.notices.append(f"the run in {cfg.out_dir!r} is complete (step {step} of "
                                f"{cfg.steps}); nothing to train")

    def initialise(self, init_from) -> None:
        if init_from is not None:
            src = load_model(init_from)  # verified: hash, shapes, finite weights
            check_same_config(self.model, src.config.to_dict(), f"init_from {os.fspath(init_from)!r}")
            with torch.no_grad():
                self.model.load_state_dict(src.state_dict())
            self.notices.append(f"initialised from {os.fspath(init_from)}")
        # Seed torch's global RNG (dropout) so a fresh run is reproducible; a resumed run
        # restores the saved state instead.
        torch.manual_seed(_rank_seed(self.cfg.seed, self.rank))

    def start(self, end: int) -> None:
        cfg = self.cfg
        self.forward = self.model
        if self.distributed:
            # DDP broadcasts rank 0's parameters (a no-op after a resume, where every rank
            # loaded the same checkpoint) and averages gradients across ranks in backward.
            self.ddp = distributed.wrap_ddp(self.model, self.device, self.group)
            _settle_ddp_buckets(self.ddp, self.model, cfg.batch_size // self.world, self.T,
                                self.device)
            self.forward = self.ddp
        self.progress = Progress(cfg.steps, initial=self.step, desc="train", unit="step",
                                 enabled=not cfg.quiet and self.is_main)
        for msg in self.notices:
            self.progress.write(msg)
        self.state = TrainState(
            config=cfg, model=self.model, optimizer=self.optimizer, sampler=self.sampler,
            domains=list(self.dataset.domains), device=self.device, rank=self.rank,
            world_size=self.world, group=self.group, out_dir=cfg.out_dir, step=self.step,
            start_step=self.step, end_step=end, progress=self.progress, evaluate=self.evaluate,
            tokens_per_step=cfg.batch_size * cfg.grad_accum * self.T)
        # Forward hooks for callbacks that asked for hidden states: they capture the layer's
        # output during the training forward itself, so no extra pass is needed (and nothing
        # during evaluation, which runs in eval mode).
        self._captured: dict = {}

        def capture(module, args, out, layer):
            if module.training:
                self._captured[layer] = out.detach()

        for layer in sorted({cb.hidden_layer for cb in self.callbacks if cb.hidden_layer is not None}):
            self._hooks.append(self.model.hidden_module(layer).register_forward_hook(
                lambda m, a, out, layer=layer: capture(m, a, out, layer)))
        for cb in self.callbacks:
            cb.on_train_start(self.state)

    # -- the step ---------------------------------------------------------------------------------

    def train_step(self) -> None:
        cfg, state = self.cfg, self.state
        state.lr = lr = self.schedule(self.step)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        for micro in range(cfg.grad_accum):
            x, y, dom = self.sampler.sample(cfg.batch_size)  # this rank's rows of the global batch
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # Gradients are all-reduced (averaged over ranks) on the last micro-step only.
            sync = (self.ddp.no_sync() if self.ddp is not None and micro < cfg.grad_accum - 1
                    else contextlib.nullcontext())
            with sync:
                with autocast(self.device):
                    if self.loss_callback is None:
                        _, loss = self.forward(x, y)
                    else:  # the loss hook: the callback turns the logits into the loss
                        logits, _ = self.forward(x)
                        loss = self.loss_callback.compute_loss(state, x, y, dom.to(self.device), logits)
                # Average over micro-batches (and, via DDP, over ranks, which hold equal shares
                # of the rows) so the gradient matches one big batch.
                (loss / cfg.grad_accum).backward()
            batch = Batch(x, y, dom, loss.detach(), micro, self._captured)
            self._captured = {}
            for cb in self.callbacks:
                cb.on_batch(state, batch)
        # The total gradient norm is identical on every rank (gradients are all-reduced), so
        # every rank takes the same decision below. max_norm=inf when clipping is off: the
        # norm is still needed, and a clip coefficient clamped to 1 leaves gradients unchanged.
        state.grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        # One host sync per step: cheap at these model sizes, and it keeps a non-finite update
        # (which would poison the model and the optimiser state) from ever being applied.
        state.skipped = not bool(torch.isfinite(state.grad_norm))
        if not state.skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_streak = self.bad_streak + 1 if state.skipped else 0
        self.step = state.step = self.step + 1
        self.progress.update(1)
        for cb in self.callbacks:
            cb.on_step_end(state)
        if self.bad_streak >= cfg.max_bad_steps:
            raise self.diverged(f"the loss or gradient was not finite for {self.bad_streak} "
                                f"consecutive steps (steps {self.step - self.bad_streak + 1}-"
                                f"{self.step})")

    def diverged(self, why: str) -> TrainingDiverged:
        kept = (f"the last good checkpoint {self.ckpt_path!r} (step {self.last_ckpt}) is kept"
                if self.last_ckpt >= 0 else "no checkpoint was written")
        return TrainingDiverged(f"training diverged: {why}; {kept}; lower the learning rate "
                                "(--lr) or raise TrainConfig.max_bad_steps")

    # -- evaluation and saving --------------------------------------------------------------------

    def evaluate(self) -> dict:
        cfg = self.cfg
        metrics = evaluate(self.model, self.dataset, cfg.eval_windows, self.T, seed=cfg.seed,
                           device=self.device, batch_size=cfg.eval_batch_size, group=self.group)
        for cb in self.callbacks:
            cb.on_eval(self.state, metrics)
        return metrics

    def _check_finite(self) -> None:
        # A model can turn non-finite in a step whose gradient was still finite (a huge lr);
        # refuse to write it over the last good file. Parameters are identical on every rank.
        for name, p in self.model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise self.diverged(f"parameter {name!r} is not finite at step {self.step}")

    def save_checkpoint(self) -> None:
        # Collective: every rank's sampler, RNG and callback state go to rank 0, which writes;
        # the closing agree is the barrier (nobody goes on while the file is half-written) and
        # tells every rank if the write failed.
        self._check_finite()
        gather = lambda obj: distributed.gather_objects(obj, self.group)  # noqa: E731
        samplers = gather(self.sampler.state_dict())
        rngs = gather(ckpt_io.rng_state(self.device, all_cuda=not self.distributed))
        cbs = gather({cb.name: cb.state_dict() for cb in self.callbacks})

        def write():
            if self.is_main:
                ckpt_io.save_checkpoint({
                    "step": self.step, "model": {k: v.detach().cpu() for k, v in
                                                 self.model.state_dict().items()},
                    "model_config": self.model.config.to_dict(),
                    "optimizer": self.optimizer.state_dict(), "world_size": self.world,
                    "samplers": samplers, "rngs": rngs, "callbacks": cbs,
                    "train_config": self.cfg.to_dict(), "domains": list(self.dataset.domains),
                    "weights": self.sampler.weights, "fingerprints": self.fingerprints,
                    "tokenizer": _tokenizer_record(self.dataset),
                }, self.ckpt_path)

        self.collective(f"rank 0 was writing {self.ckpt_path!r}", write)
        self.last_ckpt = self.step
        for cb in self.callbacks:
            cb.on_save(self.state)

    def save_model(self) -> None:
        self._check_finite()
        self.collective(f"rank 0 was writing {self.model_path!r}",
                        lambda: save_model(self.model_path, self.model, tokenizer=_tokenizer_record(self.dataset))
                        if self.is_main else None)

    # -- the run ----------------------------------------------------------------------------------

    def run(self, end: int) -> None:
        cfg = self.cfg
        while self.step < end:
            self.train_step()
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.save_checkpoint()
            # CHAMELEON_FAULT=train:step:N=kill: the process dies after step N (and its
            # checkpoint, if one is due), as a preempted job would (tests of exact resume).
            io.fault_point(f"train:step:{self.step}")
        if self.last_ckpt != self.step:
            self.save_checkpoint()
        if self.step == cfg.steps and (self.state.start_step < self.step
                                       or not os.path.exists(self.model_path)):
            self.save_model()
        for cb in self.callbacks:
            cb.on_train_end(self.state)

    def close(self) -> None:
        # No collectives here: on an error path the other ranks may be anywhere.
        for h in self._hooks:
            h.remove()
        if self.progress is not None:
            self.progress.close()
        if self.lock is not None:
            self.lock.release()


def train(model: GPT, dataset, weights: WeightsLike, config: TrainConfig, resume: bool = True,
          init_from: Optional[Union[str, os.PathLike]] = None, *, stop_at: Optional[int] = None,
          group: Optional[Any] = None, callbacks: Sequence[Callback] = ()) -> dict:
    """Train ``model`` on the mixture ``weights`` of ``dataset`` (AdamW, warm-up + cosine).

    Data parallel under torch.distributed: when the default process group is initialised
    (e.g. ``chameleon_ext.distributed.init_from_env()`` under ``torchrun``), or ``group`` is
    given, every rank of the group must call ``train`` with the same arguments.
    ``config.batch_size`` is the *global* batch, split evenly across the ranks. Rank 0 alone
    writes ``ckpt.pt`` (and ``ckpt.prev.pt``, the one before), ``model.pt`` and
    ``metrics.jsonl``, and holds a lock on ``out_dir`` (on a filesystem all ranks see). A
    checkpoint resumes with the same world size only.

    Args:
        model: the :class:`GPT` to train (updated in place; identical on every rank after).
        dataset: the domains.
        weights: mixture weights (see :func:`~chameleon_ext.data.sampler.normalize_weights`).
        config: hyper-parameters and ``out_dir``.
        resume: continue from ``out_dir/ckpt.pt`` when it exists (exactly: same parameters,
            bit for bit on CPU, as an uninterrupted run). A run already at ``config.steps``
            returns at once. With ``resume=False`` a fresh run overwrites it.
        init_from: a ``model.pt`` or ``ckpt.pt`` whose weights start a fresh run (finetuning);
            optimiser and data order start fresh. Ignored when resuming.
        stop_at: stop (with a checkpoint) once this global step is reached, without changing
            the schedule -- e.g. to split a run across time-limited jobs.
        group: torch.distributed process group (default: the default group if initialised).
        callbacks: :class:`~chameleon_ext.callbacks.Callback` objects, called in order after
            the built-in logging and evaluation.

    Returns:
        ``{"step", "loss", "eval", "tokens", "checkpoint", "model_path", "out_dir",
        "world_size", "complete", "notices"}`` (the same on every rank); ``model_path`` is None
        until the run reaches ``config.steps``; ``complete`` is True when the checkpoint
        already was at (or past) ``config.steps``.

    Raises:
        ChameleonUserError: invalid arguments, a checkpoint that is damaged or does not match,
            an output folder in use by another run.
        TrainingDiverged: the loss stayed non-finite (a ChameleonUserError).
        RuntimeError: under torch.distributed, another rank failed (it raises its own error).
    """
    if not isinstance(config, TrainConfig):
        raise ChameleonUserError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, GPT):
        raise ChameleonUserError(f"model: expected a chameleon_ext GPT, got {type(model).__name__}")
    if stop_at is not None and (not isinstance(stop_at, int) or stop_at < 0):
        raise ChameleonUserError(f"stop_at: expected None or a non-negative integer, got {stop_at!r}")
    env_world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if env_world > 1 and group is None and not distributed.is_initialized():
        raise ChameleonUserError(
            f"train: started as one of WORLD_SIZE={env_world} processes (torchrun) but "
            "torch.distributed is not initialised; call chameleon_ext.distributed."
            "init_from_env() first, otherwise every process would train alone and write the "
            "same out_dir")
    t = _Trainer(model, dataset, config, callbacks, group)
    try:
        seen = t.collective("setting up training", lambda: t.setup(weights, resume), flag=bool)
        t.collective("loading the checkpoint / starting the run",
                     lambda: t.resume(seen) if any(seen) else t.initialise(init_from))
        complete = t.step >= config.steps
        end = config.steps if stop_at is None else min(config.steps, stop_at)
        t.start(end)
        t.run(end)
    finally:
        t.close()
    done = t.step >= config.steps
    return {"step": t.step, "loss": t.metrics.last_loss, "eval": t.metrics.last_eval,
            "tokens": t.step * config.batch_size * config.grad_accum * t.T,
            "checkpoint": t.ckpt_path, "model_path": t.model_path if done else None,
            "out_dir": config.out_dir, "world_size": t.world, "complete": complete,
            "notices": list(t.notices)}


# ------------------------------------------------------------------------------------------
# helpers


def _rank_seed(seed: int, rank: int) -> int:
    """torch seed of ``rank`` (dropout masks). Rank 0 keeps ``seed`` itself, so a single process
    draws exactly what it did before data parallelism existed; the other ranks need their own
    streams (identical dropout masks on every rank would correlate the gradient noise), derived
    from ``(seed, rank)`` by numpy's SeedSequence so they are independent of each other."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint64)[0] >> 1)


def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    # Decay matrices and embeddings, not biases or LayerNorm parameters (nanoGPT's rule).
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kw)


def _settle_ddp_buckets(ddp: torch.nn.Module, model: GPT, rows: int, T: int,
                        device: torch.device) -> None:
    """One synchronised forward/backward of a zero loss, so that DDP's gradient buckets are
    re-laid-out (DDP does that once, in the order gradients became ready in the first
    backward) before the first real step. An uninterrupted run and a resumed one then reduce
    every step with the same bucket layout, hence the same summation order, which keeps
    resume bitwise exact for any world size. Eval mode: no dropout, so no RNG is consumed;
    the zero gradients are discarded."""
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(rows, T, dtype=torch.long, device=device)
        with autocast(device):
            _, loss = ddp(x, x)
        (loss * 0.0).backward()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)


def _tokenizer_record(dataset) -> Optional[dict]:
    """What model.pt / ckpt.pt record about the tokenizer of the training data (None if unknown)."""
    record = getattr(dataset, "tokenizer_record", None)
    return record() if callable(record) else None
