"""Trainer callbacks of the comparison: the DoReMi proxy's loss, the overall progress, the
wall time of the online method's updates."""

from __future__ import annotations

import time

from ..callbacks import Callback
from ..progress import Progress


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


class StepProgress(Callback):
    """Advances the comparison's overall progress by one per optimiser step."""

    name = "compare_progress"

    def __init__(self, progress: Progress):
        self.progress = progress

    def on_step_end(self, state) -> None:
        self.progress.update(1)


class Timed(Callback):
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
