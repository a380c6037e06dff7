"""Online Chameleon: mixture weights that follow the model being trained.

The method embeds every domain with a separately trained proxy (docs/method.md, step 2). During
training the model computes the same kind of hidden states at every step, for batches whose
rows' domains are known, so the domain embeddings can come from the training model itself:

    per step t:   s_t [k, H], c_t [k] = domain_mean_pool(hidden at layer L, mask, domain ids)
                  S_t = decay * S_{t-1} + (1 - decay) * s_t      (EMA of per-domain sums)
                  C_t = decay * C_{t-1} + (1 - decay) * c_t      (EMA of per-domain row counts)
    every N steps after the warm-up:
                  x_i = S_i / C_i  (domain embeddings)  ->  weights_from_embeddings(x, mode)
                  w = (1 - k * floor) * w + floor        (no domain starves)

:class:`OnlineChameleon` is the logic of the trainer callback, independent of any trainer: the
trainer hands it each micro-batch's hidden states (:meth:`~OnlineChameleon.observe`, from a
forward hook: no extra forward pass) and closes each optimiser step
(:meth:`~OnlineChameleon.end_step`), which returns new weights when an update is due.

Design points:

* **No bias correction is needed.** Both EMAs start at zero and carry the same factor
  ``1 - decay^t``; the embedding is their ratio, so the factor cancels: ``S_i / C_i`` is the
  mean of the rows seen so far, each weighted by ``decay^age``, exact from the first step.
* **Domains not seen yet.** A domain whose EMA count is zero (no row with a valid token so far;
  or, after thousands of steps without one, a count below :data:`MIN_COUNT`) has no embedding.
  It keeps its share of the previous method weights (before the floor), and the seen domains
  share the rest in proportion to their Chameleon weights computed among themselves. With
  fewer than two seen domains there is nothing to compare and the previous weights stay.
* **Cheap.** :meth:`observe` runs the fused op under ``torch.no_grad`` on detached states and
  adds into ``[k, H]`` float64 accumulators on the states' device: no host synchronisation
  (the op takes the ``[B]`` domain ids on the CPU, as the sampler makes them, and copies them
  to the device without waiting). The host sees the EMA only at an update, every N steps.
* **Distributed.** Each rank keeps the EMA of its own rows. The EMA is linear, so the sum of
  the ranks' EMAs is the EMA of the global batch: at an update the sums and counts are
  all-reduced (:func:`chameleon_ext.distributed.all_reduce_sum_`) and every rank computes the
  same weights from the same reduced numbers. The state is per rank (like a sampler with its
  own stream): a checkpoint keeps every rank's :meth:`state_dict`, and a resume needs the same
  world size.
* **Exact resume.** :meth:`state_dict` holds the EMA tensors, the pending micro-batch sums, the
  step counter and the current weights; a restored object continues bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from . import distributed as _dist
from .callbacks import Callback
from .errors import ChameleonUserError
from .mixture import MODES, check_domain_names, check_mode, check_positive, check_temperature, check_weights_for
from .schedule import ScheduleWriter
from .weights import DEFAULT_LAMBDA, weights_from_embeddings

__all__ = ["OnlineChameleon", "OnlineUpdate", "ONLINE_FORMAT", "MIN_COUNT", "floor_weights"]

ONLINE_FORMAT = "chameleon_ext.online/1"
# An EMA count below this is treated as "not seen": after ~4000 steps without a row at decay
# 0.9 the count approaches float64's subnormal range, where S / C loses its digits.
MIN_COUNT = 1e-200

# Options that change the trajectory of the weights: a resumed run must use the saved values.
_TRAJECTORY_KEYS = ("domains", "every", "warmup", "decay", "floor", "mode", "lam", "temperature")

WeightsLike = Union[None, Sequence[float], Mapping[str, float], Tensor]


@dataclass
class OnlineUpdate:
    """One recomputation of the weights (what :meth:`OnlineChameleon.end_step` returns).

    ``step`` is the number of steps completed: the new ``weights`` apply from step index
    ``step`` (0-based) on, i.e. to the batches drawn after this call.
    """

    step: int
    weights: Tensor  # [k] float64, sums to 1, each >= floor: what the sampler uses
    method_weights: Tensor  # [k] float64: Chameleon's weights before the floor
    leverage: Optional[Tensor]  # [k] normalised leverage scores; NaN for domains not seen
    seen: Tensor  # [k] bool: domains with an embedding at this update
    embeddings: Tensor  # [k, H] float64 domain embeddings (zeros where not seen)

    def as_dict(self, domains: Sequence[str]) -> dict:
        """A JSON-able record for metrics.jsonl."""
        lev = self.leverage.tolist() if self.leverage is not None else [math.nan] * len(domains)
        return {"kind": "online_weights", "step": self.step,
                "weights": dict(zip(domains, self.weights.tolist())),
                "method_weights": dict(zip(domains, self.method_weights.tolist())),
                "leverage": {d: (None if math.isnan(s) else s) for d, s in zip(domains, lev)},
                "seen": [d for d, s in zip(domains, self.seen.tolist()) if s]}


def floor_weights(weights: Tensor, floor: float) -> Tensor:
    """``(1 - k * floor) * w + floor``, renormalised: every entry >= floor (up to rounding),
    the sum 1, the order of the entries kept. ``floor * k`` must be < 1."""
    k = weights.numel()
    out = (1.0 - k * floor) * weights.to(torch.float64) + floor
    return out / out.sum()


def _number(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ChameleonUserError(f"{name} must be a number in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return float(value)


def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ChameleonUserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class OnlineChameleon:
    """Chameleon weights recomputed during training from the model's own hidden states.

    Args:
        domains: the k domain names, in the order of the domain ids (``dataset.domains``).
        every: recompute the weights every this many steps after the warm-up (default 50).
        warmup: steps before the first recomputation (default 100); until then
            :attr:`weights` are ``initial_weights``. The first update is at step ``warmup``
            (or ``every`` when ``warmup`` is 0), then every ``every`` steps.
        decay: EMA decay of the per-domain sums and counts, in [0, 1) (default 0.9; 0 keeps
            only the last step).
        floor: every domain gets at least this weight after an update; ``floor * k < 1``
            (default 0.01).
        mode: ``"pretrain"`` (default) or ``"finetune"``: the softmax rule of docs/method.md step 5.
        lam, temperature: as in :func:`chameleon_ext.weights_from_embeddings`.
        initial_weights: weights before the first update: None (uniform), k numbers in
            ``domains`` order, or a ``{domain: weight}`` mapping; normalised to sum 1.
        group: torch.distributed process group (default: the default group if initialised).

    Raises:
        ChameleonUserError: an invalid option, naming it.
    """

    def __init__(self, domains: Sequence[str], every: int = 50, warmup: int = 100, decay: float = 0.9,
                 floor: float = 0.01, mode: str = "pretrain", lam: float = DEFAULT_LAMBDA,
                 temperature: Optional[float] = None, initial_weights: WeightsLike = None,
                 group: Optional[Any] = None):
        self.domains = check_domain_names(domains, what="OnlineChameleon: domains")
        k = self.k = len(self.domains)
        self.every = _integer("every", every, 1)
        self.warmup = _integer("warmup", warmup, 0)
        self.decay = _number("decay", decay, 0.0, 1.0)
        self.floor = _number("floor", floor, 0.0, 1.0)
        if self.floor * k >= 1.0:
            raise ChameleonUserError(
                f"floor must be < 1/k = {1.0 / k:.6g} for k = {k} domains (floor * k < 1), got {floor!r}")
        self.mode = check_mode(mode, MODES)
        self.lam = check_positive("lam", lam)
        self.temperature = None if temperature is None else check_temperature(temperature)
        self.group = group
        self.initial_weights = self._check_initial(initial_weights)
        self.weights = self.initial_weights.clone()  # [k] float64: what the sampler uses now
        self.method_weights = self.initial_weights.clone()  # before the floor
        self.step = 0  # optimiser steps completed (end_step calls)
        self.last_update_step: Optional[int] = None
        # Accumulators, allocated on the hidden states' device at the first observe().
        self._ema_sums: Optional[Tensor] = None  # [k, H] float64
        self._ema_counts: Optional[Tensor] = None  # [k] float64
        self._step_sums: Optional[Tensor] = None  # [k, H] float64: this step's micro-batches
        self._step_counts: Optional[Tensor] = None  # [k] float64
        self._pending = False  # observe() called since the last end_step()

    # -- inputs --------------------------------------------------------------------------------

    def _check_initial(self, weights: WeightsLike) -> Tensor:
        source = "initial_weights"
        if weights is None:
            return torch.full((self.k,), 1.0 / self.k, dtype=torch.float64)
        values = list(check_weights_for(weights, self.domains, source, relative=True).values())
        w = torch.tensor(values, dtype=torch.float64)
        total = math.fsum(values)
        return w if total == 1.0 else w / total  # weights that sum to 1 are kept bit for bit

    # -- per step ------------------------------------------------------------------------------

    def observe(self, hidden: Tensor, mask: Optional[Tensor], domain_ids: Tensor) -> None:
        """Add one (micro-)batch: ``hidden`` ``[B, T, H]`` at the chosen layer, ``mask``
        ``[B, T]`` or None (all tokens valid), ``domain_ids`` ``[B]`` on the CPU or on
        hidden's device (CPU ids for CUDA states are copied over without a host sync).

        Runs under ``torch.no_grad`` on ``hidden.detach()``; nothing leaves the device. Call it
        once per micro-batch (several per step with gradient accumulation), then
        :meth:`end_step` once per optimiser step.
        """
        from .ops import domain_mean_pool  # the compiled ops; the rest of the module needs none

        with torch.no_grad():
            sums, counts = domain_mean_pool(hidden.detach(), mask, domain_ids, self.k)
            if self._step_sums is None or self._step_sums.device != sums.device \
                    or self._step_sums.shape[1] != sums.shape[1]:
                self._allocate(sums.shape[1], sums.device)
            self._step_sums.add_(sums)  # float32 -> float64 in place
            self._step_counts.add_(counts)
        self._pending = True

    def _allocate(self, width: int, device: torch.device) -> None:
        if self._ema_sums is not None and self._ema_sums.shape[1] != width:
            raise ChameleonUserError(
                f"observe: hidden width changed from {self._ema_sums.shape[1]} to {width}; the "
                "online weights must see the same layer of the same model throughout")
        zeros = dict(dtype=torch.float64, device=device)
        if self._ema_sums is None:
            self._ema_sums = torch.zeros(self.k, width, **zeros)
            self._ema_counts = torch.zeros(self.k, **zeros)
        else:  # restored from a state_dict on the CPU: follow the model to its device
            self._ema_sums = self._ema_sums.to(device)
            self._ema_counts = self._ema_counts.to(device)
        if self._step_sums is None:
            self._step_sums = torch.zeros(self.k, width, **zeros)
            self._step_counts = torch.zeros(self.k, **zeros)
        else:
            self._step_sums = self._step_sums.to(device)
            self._step_counts = self._step_counts.to(device)

    def update_due(self, step: int) -> bool:
        """Whether the weights are recomputed when ``step`` steps are completed."""
        return step >= self.warmup and step > 0 and (step - self.warmup) % self.every == 0

    def end_step(self, discard: bool = False) -> Optional[OnlineUpdate]:
        """Close one optimiser step: fold its observations into the EMA (a step without any
        decays the EMA all the same) and, when an update is due, recompute the weights.

        ``discard=True`` drops the step's observations first (pass the trainer's
        ``state.skipped``: a step whose loss or gradient was not finite may have non-finite
        hidden states, which would poison the EMA for good); the step still counts and decays.

        Collective under torch.distributed when an update is due (every rank must call it at
        every step, with the same ``discard``). Returns the :class:`OnlineUpdate` (the new
        weights apply from the next batch on), or None.
        """
        if discard and self._step_sums is not None:
            self._step_sums.zero_()
            self._step_counts.zero_()
        if self._ema_sums is not None:
            one_minus = 1.0 - self.decay
            self._ema_sums.mul_(self.decay).add_(self._step_sums, alpha=one_minus)
            self._ema_counts.mul_(self.decay).add_(self._step_counts, alpha=one_minus)
            self._step_sums.zero_()
            self._step_counts.zero_()
        self._pending = False
        self.step += 1
        if not self.update_due(self.step):
            return None
        return self._update()

    def ema_state(self):
        """This rank's EMA ``(sums [k, H], counts [k])`` as float64 CPU copies (None, None
        before the first observation). A host sync: for tests and logging, not every step."""
        if self._ema_sums is None:
            return None, None
        return self._ema_sums.detach().cpu().clone(), self._ema_counts.detach().cpu().clone()

    def _reduced_ema(self):
        """(sums [k, H], counts [k]) of all ranks, float64 on the CPU (one host sync)."""
        if self._ema_sums is None:
            sums = torch.zeros(self.k, 0, dtype=torch.float64)
            counts = torch.zeros(self.k, dtype=torch.float64)
            if _dist.is_distributed(self.group):
                # Every rank must join the collective; a rank that saw nothing adds zeros.
                raise ChameleonUserError(
                    "OnlineChameleon: an update is due but this rank never observed a batch; "
                    "every rank must call observe() before the first update")
            return sums, counts
        packed = torch.cat([self._ema_sums, self._ema_counts.unsqueeze(1)], dim=1)  # [k, H + 1]
        _dist.all_reduce_sum_(packed, self.group)  # one collective; the same bits on every rank
        packed = packed.cpu()
        return packed[:, :-1], packed[:, -1]

    def _update(self) -> OnlineUpdate:
        sums, counts = self._reduced_ema()
        seen = counts > MIN_COUNT
        embeddings = torch.zeros_like(sums)
        embeddings[seen] = sums[seen] / counts[seen].unsqueeze(1)
        method = self.method_weights.clone()
        leverage = torch.full((self.k,), math.nan, dtype=torch.float64)
        n_seen = int(seen.sum())
        if n_seen >= 2:
            # The online method keeps the paper's rule with its own lambda and temperature
            # (its floor bounds every weight from below; see docs/online.md).
            dw = weights_from_embeddings(embeddings[seen], mode=self.mode, lam=self.lam,
                                         temperature=self.temperature, rule="paper")
            # The unseen domains keep their previous share; the seen ones split the rest.
            if n_seen == self.k:
                method = dw.weights.clone()  # exactly the method's weights (no second rounding)
            else:
                mass = 1.0 - float(self.method_weights[~seen].sum())
                method[seen] = mass * dw.weights
                method = method / method.sum()
            leverage[seen] = dw.leverage
        self.method_weights = method
        self.weights = floor_weights(method, self.floor)
        self.last_update_step = self.step
        return OnlineUpdate(self.step, self.weights.clone(), method.clone(), leverage, seen, embeddings)

    # -- checkpoints ---------------------------------------------------------------------------

    def _config(self) -> dict:
        return {"domains": list(self.domains), "every": self.every, "warmup": self.warmup,
                "decay": self.decay, "floor": self.floor, "mode": self.mode, "lam": self.lam,
                "temperature": self.temperature}

    def state_dict(self) -> dict:
        """This rank's state (tensors on the CPU; loadable with ``torch.load(weights_only=True)``).

        Under torch.distributed every rank's state differs (each holds the EMA of its own
        rows): keep one per rank, as the trainer does for samplers."""
        def cpu(t):
            return None if t is None else t.detach().to("cpu", copy=True)

        di = _dist.info(self.group)
        return {"format": ONLINE_FORMAT, **self._config(), "step": self.step,
                "last_update_step": self.last_update_step,
                "weights": self.weights.tolist(), "method_weights": self.method_weights.tolist(),
                "initial_weights": self.initial_weights.tolist(),
                "ema_sums": cpu(self._ema_sums), "ema_counts": cpu(self._ema_counts),
                "step_sums": cpu(self._step_sums) if self._pending else None,
                "step_counts": cpu(self._step_counts) if self._pending else None,
                "rank": di.rank, "world_size": di.world_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the options that shape the weights must match.

        Raises:
            ChameleonUserError: another format, other options, or a state of another rank or
                world size, naming what differs.
        """
        if not isinstance(state, Mapping) or state.get("format") != ONLINE_FORMAT:
            raise ChameleonUserError(f"online state: expected format {ONLINE_FORMAT!r}, got "
                                     f"{state.get('format') if isinstance(state, Mapping) else type(state).__name__!r}")
        mine = self._config()
        for key in _TRAJECTORY_KEYS:
            saved = list(state[key]) if key == "domains" else state.get(key)
            if saved != mine[key]:
                raise ChameleonUserError(
                    f"online state: {key} was {saved!r} when saved, now {mine[key]!r}; use the same "
                    "value to resume, or start a new run")
        di = _dist.info(self.group)
        if (int(state.get("rank", 0)), int(state.get("world_size", 1))) != (di.rank, di.world_size):
            raise ChameleonUserError(
                f"online state: saved by rank {state.get('rank', 0)} of {state.get('world_size', 1)}, "
                f"loaded by rank {di.rank} of {di.world_size}; each rank must load its own state")
        self.step = int(state["step"])
        self.last_update_step = None if state["last_update_step"] is None else int(state["last_update_step"])
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)
        self.method_weights = torch.tensor(state["method_weights"], dtype=torch.float64)
        self.initial_weights = torch.tensor(state["initial_weights"], dtype=torch.float64)

        def restore(t):
            return None if t is None else t.to(torch.float64).clone()

        self._ema_sums, self._ema_counts = restore(state["ema_sums"]), restore(state["ema_counts"])
        self._pending = state.get("step_sums") is not None
        if self._pending:
            self._step_sums, self._step_counts = restore(state["step_sums"]), restore(state["step_counts"])
        elif self._ema_sums is not None:
            self._step_sums = torch.zeros_like(self._ema_sums)
            self._step_counts = torch.zeros_like(self._ema_counts)
        else:
            self._step_sums = self._step_counts = None


# -- the trainer callback ----------------------------------------------------------------------


class OnlineWeights(Callback):
    """The trainer callback that runs :class:`OnlineChameleon` inside training: it reads the
    batch's hidden states at ``layer`` through the trainer's forward hook (no extra forward),
    hands the new weights to the sampler after each update, and (rank 0) appends them to the
    mixture schedule at ``schedule_path`` (:mod:`chameleon_ext.schedule`), so the run can be
    replayed with ``chameleon train --schedule``. Its state (the moving averages) is saved in
    every checkpoint, so a resumed run continues with the same weights and data order.

    An update at the final step is not applied (no batch would use it). A resume needs the
    online state in the checkpoint: resuming a run that was not online is refused.
    """

    name = "online_weights"

    def __init__(self, online: "OnlineChameleon", layer: int, schedule_path: Optional[str] = None):
        self.online = online
        self.hidden_layer = int(layer)
        self.schedule_path = schedule_path
        self.writer = None
        self._restored = False

    def on_train_start(self, state) -> None:
        if state.start_step > 0 and not self._restored:
            raise ChameleonUserError(
                f"online weights: the checkpoint in {state.out_dir!r} (step {state.start_step}) was not written "
                "by an online run (--weights online); resume it as it was started, or use a new output folder")
        if self.schedule_path is None or not state.is_main:
            return
        resume = state.start_step if state.start_step > 0 else None
        self.writer = ScheduleWriter.open(self.schedule_path, state.domains, self.online.weights,
                                          token_budget=state.config.steps * state.tokens_per_step,
                                          tokens_per_step=state.tokens_per_step, resume_step=resume)

    def on_batch(self, state, batch) -> None:
        # The domain ids stay on the CPU: domain_mean_pool takes host ids for CUDA states and
        # copies them without waiting, where ``.to(device)`` from pageable memory would
        # synchronise the host with the device at every micro-batch.
        self.online.observe(batch.hidden[self.hidden_layer], None, batch.domain)

    def on_step_end(self, state) -> None:
        update = self.online.end_step(discard=state.skipped)
        if update is None or state.step >= state.config.steps:
            return
        state.set_weights(update.weights.tolist())
        if self.writer is not None:
            self.writer.append(update.step, update.step * state.tokens_per_step, update.weights)

    def state_dict(self) -> dict:
        return self.online.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.online.load_state_dict(state)
        self._restored = True
