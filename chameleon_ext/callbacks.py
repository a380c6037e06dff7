"""The trainer's plug-in points: :class:`Callback`, what it sees (:class:`TrainState`,
:class:`Batch`), and the two callbacks every run uses (:class:`MetricsLog`, :class:`PeriodicEval`).

A callback is called on every rank, in the order given (the built-in ones first):

* ``on_train_start(state)`` once, after set-up and resume;
* ``on_batch(state, batch)`` after each micro-batch's forward and backward: the rows' inputs,
  targets, domain ids, the loss and, for a callback whose ``hidden_layer`` is set, the hidden
  states ``[b, T, H]`` at that layer (Hugging Face numbering: 0 = embedding output), captured
  by a forward hook during the training forward itself (no extra pass; detached);
* ``on_step_end(state)`` after the optimiser step (``state.step`` is the step just done);
* ``on_eval(state, metrics)`` after each evaluation (``metrics`` as :func:`evaluate` returns);
* ``on_save(state)`` after a checkpoint is written;
* ``on_train_end(state)`` once, when the run reaches its end.

``state.set_weights(w)`` changes the mixture the following batches are drawn from (every
rank must set the same weights at the same step). A callback with state that must survive a
resume returns it from ``state_dict()`` (plain Python values and CPU tensors) and takes it back
in ``load_state_dict()``; each rank's state is stored in the checkpoint under the callback's
``name``, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import distributed, io

__all__ = ["Batch", "Callback", "MetricsLog", "PeriodicEval", "TrainState"]


@dataclass
class Batch:
    """One micro-batch as the model saw it (this rank's rows)."""

    x: torch.Tensor  # [b, T] input ids
    y: torch.Tensor  # [b, T] next-token targets
    domain: torch.Tensor  # [b] domain index of each row, into dataset.domains (CPU)
    loss: torch.Tensor  # scalar float32, detached: the micro-batch's mean loss
    micro: int  # index of the micro-batch within the step (0 .. grad_accum - 1)
    hidden: dict = field(default_factory=dict)  # {layer: [b, T, H]} for layers callbacks asked for


@dataclass
class TrainState:
    """What callbacks see; the trainer updates it in place."""

    config: Any  # the TrainConfig
    model: torch.nn.Module  # the plain model (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    sampler: Any  # the WeightedDomainSampler
    domains: list
    device: torch.device
    rank: int = 0
    world_size: int = 1
    group: Any = None
    out_dir: str = ""
    step: int = 0  # optimiser steps done
    start_step: int = 0  # where this process started (after a resume)
    end_step: int = 0  # where this process stops (config.steps, or stop_at)
    tokens_per_step: int = 0
    lr: float = 0.0
    grad_norm: Optional[torch.Tensor] = None  # total gradient norm of the last step
    skipped: bool = False  # the last step's loss or gradient was not finite; no update made
    progress: Any = None  # the Progress display (rank 0 prints)
    evaluate: Any = None  # callable: run the evaluation now, call on_eval, return the metrics

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def set_weights(self, weights) -> None:
        """Draw the following batches from the mixture ``weights`` (see normalize_weights)."""
        self.sampler.set_weights(weights)


class Callback:
    """Base class: override what you need. ``name`` keys the callback's checkpoint state."""

    hidden_layer: Optional[int] = None  # set to receive Batch.hidden[hidden_layer]

    @property
    def name(self) -> str:
        return type(self).__name__

    def on_train_start(self, state: TrainState) -> None: ...

    # The loss hook: a callback that sets ``replaces_loss = True`` computes each micro-batch's
    # training loss itself (e.g. DoReMi's Group-DRO objective). The trainer then runs the
    # forward without targets and backpropagates ``compute_loss(state, x, y, domain, logits)``
    # (divided by grad_accum) instead of the mean token loss; it is called exactly once per
    # micro-batch, in order, before ``on_batch``. At most one callback may replace the loss;
    # whatever state the loss keeps belongs in state_dict() so resume stays exact.
    replaces_loss: bool = False

    def compute_loss(self, state: TrainState, x: torch.Tensor, y: torch.Tensor,
                     domain: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} sets replaces_loss but has no compute_loss")

    def on_batch(self, state: TrainState, batch: Batch) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def on_eval(self, state: TrainState, metrics: dict) -> None: ...
    def on_save(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _finite(v):
    """``v`` for a JSON record: non-finite floats become None (JSON has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return v


class MetricsLog(Callback):
    """The training loss averaged over the steps since the last log line (over all ranks),
    written every ``log_every`` steps to ``metrics.jsonl`` with the evaluations, and shown by
    the progress display.

    ``metrics.jsonl`` is only ever appended to (one fsynced line per record), or, on resume,
    replaced whole through a temp file (dropping records of steps after the checkpoint, which
    are about to be recomputed), so a kill can lose at most the line being written. The
    running loss sum is part of the checkpoint, so the logged losses after a resume equal an
    uninterrupted run's.
    """

    def __init__(self, path: str):
        self.path = path
        self.loss_sum: Optional[torch.Tensor] = None  # this rank's sum over the window's good steps
        self.good_steps = self.window_steps = self.skipped_total = 0
        self.last_loss: Optional[float] = None
        self.last_eval: Optional[dict] = None
        self._before = None
        self._t0 = time.perf_counter()

    def on_train_start(self, state: TrainState) -> None:
        if self.loss_sum is None:
            self.loss_sum = torch.zeros((), device=state.device)
        else:
            self.loss_sum = self.loss_sum.to(state.device)
        if state.is_main:
            self._keep_records_until(state.start_step)
        self._t0 = time.perf_counter()

    def _keep_records_until(self, step: int) -> None:
        kept = []
        if step > 0 and os.path.exists(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line from a kill
                    if isinstance(rec, dict) and rec.get("step", 0) <= step:
                        kept.append(line.rstrip("\n") + "\n")
        io.write_text(self.path, "".join(kept), "metrics log")

    def on_batch(self, state: TrainState, batch: Batch) -> None:
        if batch.micro == 0:
            self._before = self.loss_sum.clone()  # to drop this step if it turns out bad
        self.loss_sum += batch.loss / state.config.grad_accum

    def on_step_end(self, state: TrainState) -> None:
        cfg = state.config
        self.window_steps += 1
        if state.skipped:
            self.loss_sum, self.skipped_total = self._before, self.skipped_total + 1
        else:
            self.good_steps += 1
        # Not at stop_at: the window carries over in the checkpoint instead, so a split run
        # logs the same lines as an uninterrupted one.
        if state.step % cfg.log_every and state.step != cfg.steps:
            return
        distributed.all_reduce_sum_(self.loss_sum, state.group)  # equal shares of the rows
        total = float(self.loss_sum) / state.world_size  # one host sync per log step
        self.last_loss = total / self.good_steps if self.good_steps else None
        tps = self.window_steps * state.tokens_per_step / max(time.perf_counter() - self._t0, 1e-9)
        rec = {"kind": "train", "step": state.step, "loss": self.last_loss, "lr": state.lr,
               "tokens_per_s": tps, "tokens": state.step * state.tokens_per_step}
        if cfg.grad_clip > 0 and state.grad_norm is not None:
            rec["grad_norm"] = float(state.grad_norm)
        if self.skipped_total:
            rec["skipped_steps"] = self.skipped_total
        if state.world_size > 1:
            rec["world_size"] = state.world_size
        self.write(state, rec)
        loss = "n/a" if self.last_loss is None else f"{self.last_loss:.4f}"
        state.progress.log(f"step {state.step}/{cfg.steps}  loss {loss}  lr {state.lr:.2e}  "
                           f"{tps:,.0f} tok/s")
        self.loss_sum.zero_()
        self.good_steps = self.window_steps = 0
        self._t0 = time.perf_counter()

    def on_eval(self, state: TrainState, metrics: dict) -> None:
        self.last_eval = metrics
        self.write(state, {"kind": "eval", "step": state.step, "eval": metrics})
        state.progress.write(f"eval step {state.step}: " + "  ".join(
            f"{d} {r['ppl']:.2f}" for d, r in metrics.items()) + " (ppl)")

    def write(self, state: TrainState, rec: dict) -> None:
        if state.is_main:
            rec = _finite(rec)
            io.append_line(self.path, json.dumps(rec, sort_keys=True, allow_nan=False), "metrics log")

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum.detach().cpu().clone(), "good_steps": self.good_steps,
                "window_steps": self.window_steps, "skipped_total": self.skipped_total,
                "last_loss": self.last_loss, "last_eval": self.last_eval}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum = state["loss_sum"].clone()
        self.good_steps, self.window_steps = int(state["good_steps"]), int(state["window_steps"])
        self.skipped_total = int(state["skipped_total"])
        self.last_loss, self.last_eval = state["last_loss"], state["last_eval"]


class PeriodicEval(Callback):
    """Evaluate on the fixed held-out windows every ``eval_every`` steps and at the last step."""

    def on_step_end(self, state: TrainState) -> None:
        cfg = state.config
        if cfg.eval_every and cfg.eval_windows and (state.step % cfg.eval_every == 0
                                                    or state.step == cfg.steps):
            state.evaluate()
