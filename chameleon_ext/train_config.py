"""The trainer's settings (:class:`TrainConfig`) and learning-rate schedule
(:class:`CosineSchedule`): plain Python, importable without building anything, so the command
line can take its defaults from here."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

from .errors import ChameleonUserError

__all__ = ["TrainConfig", "CosineSchedule"]


@dataclass
class TrainConfig:
    """Training hyper-parameters and bookkeeping options.

    Attributes:
        steps: optimiser steps in total (a resumed run continues up to this step).
        batch_size: sequences per micro-batch in total over all processes (the *global*
            micro-batch); one step sees ``batch_size * grad_accum`` sequences of
            ``block_size`` tokens whatever the world size. Under torch.distributed it must be
            divisible by the world size; each rank takes ``batch_size / world_size`` rows.
        grad_accum: micro-batches accumulated per step.
        block_size: sequence length T; default the model's ``block_size``.
        lr, min_lr: peak and final learning rate of the cosine schedule; ``min_lr=None``
            means ``lr / 10``. The defaults (lr 3e-3, warm-up 30, 32 evaluation windows) are
            the ones the README's runs use on the small presets; see docs/cli.md, "Defaults".
        warmup_steps: linear warm-up steps from ~0 to ``lr``.
        weight_decay: AdamW decoupled weight decay, applied to matrices and embeddings only.
        beta1, beta2: AdamW betas.
        grad_clip: clip the global gradient norm to this value (0 disables).
        eval_every: evaluate on the fixed held-out windows every this many steps and at the
            end (0 disables evaluation).
        eval_windows: held-out windows per domain for evaluation.
        eval_batch_size: windows per forward pass during evaluation.
        ckpt_every: checkpoint every this many steps (0: only at the end / at ``stop_at``).
        seed: seeds the sampler, the evaluation windows and torch's RNG (dropout).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        out_dir: where ``ckpt.pt``, ``model.pt`` and ``metrics.jsonl`` are written.
        log_every: log the training loss every this many steps.
        quiet: no progress bar and no printed lines (metrics are still written).
        max_bad_steps: stop with :class:`TrainingDiverged` after this many consecutive steps
            whose loss or gradient is not finite (each is skipped: no update is made).
    """

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    block_size: Optional[int] = None
    lr: float = 3e-3
    min_lr: Optional[float] = None
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 0
    eval_windows: int = 32
    eval_batch_size: int = 16
    ckpt_every: int = 100
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/train"
    log_every: int = 10
    quiet: bool = False
    max_bad_steps: int = 3

    def __post_init__(self):
        def need(name, ok, what):
            if not ok:
                raise ChameleonUserError(
                    f"TrainConfig.{name}: expected {what}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batch_size",
                     "max_bad_steps"):
            need(name, is_int(getattr(self, name)) and getattr(self, name) > 0, "a positive integer")
        for name in ("warmup_steps", "eval_every", "eval_windows", "ckpt_every", "seed"):
            need(name, is_int(getattr(self, name)) and getattr(self, name) >= 0,
                 "a non-negative integer")
        need("block_size", self.block_size is None or (is_int(self.block_size) and self.block_size > 0),
             "None or a positive integer")
        if self.min_lr is None and isinstance(self.lr, (int, float)):
            self.min_lr = self.lr / 10
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            need(name, isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                 and v >= 0, "a finite number >= 0")
        need("lr", self.lr > 0, "a positive learning rate")
        need("min_lr", self.min_lr <= self.lr, f"a value <= lr ({self.lr})")
        for name in ("beta1", "beta2"):
            need(name, isinstance(getattr(self, name), (int, float)) and 0 <= getattr(self, name) < 1,
                 "a value in [0, 1)")
        need("device", isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda")
                                                         or self.device.startswith("cuda:")),
             "'auto', 'cpu', 'cuda' or 'cuda:N'")
        self.out_dir = os.fspath(self.out_dir)

    def to_dict(self) -> dict:
        return asdict(self)

    def check_resumable(self, saved: dict, block_size: int, saved_block_size: int) -> None:
        """Raise unless this config continues the trajectory of ``saved`` (a checkpoint's
        config): the options in :data:`TRAJECTORY_FIELDS` must be equal; ``steps`` may grow."""
        for key in TRAJECTORY_FIELDS:
            cur, old = ((block_size, saved_block_size) if key == "block_size"
                        else (getattr(self, key), saved.get(key)))
            if cur != old:
                raise ChameleonUserError(
                    f"TrainConfig.{key} is {cur!r} but the checkpoint in {self.out_dir!r} was "
                    f"trained with {old!r}; use the same value to resume, or a new out_dir / "
                    "resume=False")


# Options that change the training trajectory: a resumed run must use the saved values.
TRAJECTORY_FIELDS = ("batch_size", "grad_accum", "block_size", "lr", "min_lr", "warmup_steps",
                      "weight_decay", "beta1", "beta2", "grad_clip", "seed")


class CosineSchedule:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at
    ``steps``: a pure function of the step, so resuming needs no state of its own."""

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, steps: int):
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.warmup_steps, self.steps = int(warmup_steps), int(steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)
