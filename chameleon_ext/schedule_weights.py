"""The trainer callback of ``chameleon train --schedule``: follow a mixture schedule
(:mod:`chameleon_ext.schedule`). Apart from :mod:`chameleon_ext.schedule` because it needs the
trainer's callback interface (torch), which the schedule's file work and exports do not."""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

from .callbacks import Callback
from .errors import ChameleonUserError
from .schedule import PathLike, as_schedule, check_schedule_domains, validate_schedule, write_schedule

__all__ = ["ScheduleWeights"]


class ScheduleWeights(Callback):
    """The trainer callback that follows a mixture schedule: from each entry's ``start_step``
    on, the sampler draws with the entry's weights. Start the trainer's sampler with
    :meth:`initial_weights`.

    The weights are a pure function of the step, so a resumed run draws exactly as an
    uninterrupted one: the sampler's checkpoint restores the weights in force, and this
    callback sets ``weights_at(step)`` again at the start (the same numbers). The checkpoint
    keeps the schedule followed; a resume refuses a schedule whose entries up to the
    checkpoint's step differ from it (later entries may change), and a checkpoint that did not
    follow a schedule. Rank 0 copies the schedule to ``copy_path`` (the run folder's
    ``schedule.json``), so the run folder says what it followed.
    """

    name = "schedule_weights"

    def __init__(self, schedule, copy_path: Optional[PathLike] = None, source: str = "schedule"):
        self.schedule = as_schedule(schedule)
        self.copy_path = None if copy_path is None else os.fspath(copy_path)
        self.source = source
        self._restored: Optional[dict] = None  # the schedule the checkpoint followed

    def initial_weights(self) -> Dict[str, float]:
        return self.schedule.weights_at(0)

    def on_train_start(self, state) -> None:
        check_schedule_domains(self.schedule, state.domains, self.source)
        start = state.start_step
        if start > 0:
            if self._restored is None:
                raise ChameleonUserError(
                    f"{self.source}: the checkpoint in {state.out_dir!r} (step {start}) was not written by a run "
                    "following a schedule; resume it as it was started, or use a new output folder")
            saved = validate_schedule(self._restored, f"the schedule of the checkpoint in {state.out_dir!r}")
            old, new = saved.truncated(start).entries, self.schedule.truncated(start).entries
            if old != new:
                i = next((j for j, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
                raise ChameleonUserError(
                    f"{self.source}: entry {i} differs from the schedule the checkpoint at step {start} followed "
                    f"(entries up to the checkpoint's step must stay the same; later ones may change)")
        if self.copy_path is not None and state.is_main:
            write_schedule(self.copy_path, self.schedule)
        state.set_weights(self.schedule.weights_at(start))  # the weights in force (a no-op on resume)

    def on_step_end(self, state) -> None:
        entry = self.schedule.index_at(state.step)
        if entry != self.schedule.index_at(state.step - 1):
            state.set_weights(self.schedule.entries[entry].weights)

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.as_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._restored = dict(state["schedule"])
