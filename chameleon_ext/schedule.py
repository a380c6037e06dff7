"""Mixture schedules: domain weights that change during training, as one file (``schedule.json``).

A schedule is a list of entries ``{start_step, start_token, weights}``: from step
``start_step`` on (0-based: the number of optimiser steps completed before the entry's first
step) the trainer samples with ``weights``, until the next entry. The online trainer
(:mod:`chameleon_ext.online`) writes the schedule it followed, appending as it goes
(:class:`ScheduleWriter`); ``chameleon train --schedule`` follows any schedule, a user's own or
one replayed from an online run. Because the weights are a pure function of the step
(:meth:`Schedule.weights_at`), a resumed run samples exactly as an uninterrupted one.

The format (``"format": "chameleon_ext.schedule/1"``)::

    {"format": "chameleon_ext.schedule/1",
     "domains": ["web", "code"],
     "token_budget": 1000000,          # optional: tokens the run trains on (null if unknown)
     "tokens_per_step": 4096,          # optional: tokens per optimiser step (null if unknown)
     "entries": [{"start_step": 0,   "start_token": 0,      "weights": {"web": 0.5, "code": 0.5}},
                 {"start_step": 100, "start_token": 409600, "weights": {"web": 0.7, "code": 0.3}}]}

Rules, checked by :func:`validate_schedule` (one-line errors naming the file and the entry):
the first entry starts at step 0 and token 0; ``start_step`` strictly increases and
``start_token`` never decreases (integers >= 0); every entry's weights name exactly the
``domains``, are finite and >= 0 and sum to 1 within 1e-9. ``start_step`` is what a trainer
follows; ``start_token`` records the tokens trained before the entry, for trainers that count
tokens.

**Resume.** A checkpoint taken after step N (after that step's callbacks, so it includes any
entry starting at N) continues the schedule with the entries whose ``start_step <= N``;
:meth:`ScheduleWriter.open` with ``resume_step=N`` drops every later entry (the run that wrote
them died before its next checkpoint) and the resumed run appends them again, the same
entries, since the replay is exact.

Exports of a schedule for other trainers: :mod:`chameleon_ext.formats.schedules`.
"""

from __future__ import annotations

import bisect
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from . import io
from .errors import ChameleonUserError
from .mixture import WEIGHT_SUM_TOLERANCE, check_domain_names, check_same_domains, check_weights_for

__all__ = [
    "SCHEDULE_FORMAT",
    "SUM_TOLERANCE",
    "ScheduleEntry",
    "Schedule",
    "validate_schedule",
    "load_schedule",
    "write_schedule",
    "ScheduleWriter",
    "check_schedule_domains",
    "as_schedule",
]

SCHEDULE_FORMAT = "chameleon_ext.schedule/1"
SUM_TOLERANCE = WEIGHT_SUM_TOLERANCE  # the one tolerance (chameleon_ext.mixture)

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class ScheduleEntry:
    start_step: int
    start_token: int
    weights: Dict[str, float]  # ordered as the schedule's domains

    def as_dict(self) -> dict:
        return {"start_step": self.start_step, "start_token": self.start_token, "weights": dict(self.weights)}


@dataclass
class Schedule:
    """A validated schedule. Build one with :func:`validate_schedule` / :func:`load_schedule`."""

    domains: List[str]
    entries: List[ScheduleEntry]
    token_budget: Optional[int] = None
    tokens_per_step: Optional[int] = None
    _starts: List[int] = field(default_factory=list, repr=False)

    def __post_init__(self):
        self._starts = [e.start_step for e in self.entries]

    @property
    def end_step(self) -> Optional[int]:
        """The run's last step (exclusive) when the budget and the tokens per step are known:
        ``ceil(token_budget / tokens_per_step)``; else None (the last stage is open-ended)."""
        if self.token_budget is None or self.tokens_per_step is None:
            return None
        return -(-self.token_budget // self.tokens_per_step)

    def index_at(self, step: int) -> int:
        """Index of the entry in force at ``step`` (0-based step index)."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ChameleonUserError(f"step must be an integer >= 0, got {step!r}")
        return bisect.bisect_right(self._starts, int(step)) - 1  # entry 0 starts at 0

    def weights_at(self, step: int) -> Dict[str, float]:
        """The weights the trainer samples with at step index ``step`` (0-based)."""
        return dict(self.entries[self.index_at(step)].weights)

    def stages(self) -> List[dict]:
        """``[{start_step, end_step, start_token, weights}]`` with ``end_step`` exclusive (the
        next entry's start, or :attr:`end_step` / None for the last)."""
        out = []
        for i, e in enumerate(self.entries):
            end = self.entries[i + 1].start_step if i + 1 < len(self.entries) else self.end_step
            out.append({"start_step": e.start_step, "end_step": end, "start_token": e.start_token,
                        "weights": dict(e.weights)})
        return out

    def as_dict(self) -> dict:
        return {"format": SCHEDULE_FORMAT, "domains": list(self.domains), "token_budget": self.token_budget,
                "tokens_per_step": self.tokens_per_step, "entries": [e.as_dict() for e in self.entries]}

    def truncated(self, step: int) -> "Schedule":
        """The entries with ``start_step <= step`` (what a checkpoint after step ``step`` has seen)."""
        keep = [e for e in self.entries if e.start_step <= step]
        return Schedule(list(self.domains), keep, self.token_budget, self.tokens_per_step)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _int_field(value, name: str, where: str, minimum: int = 0, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ChameleonUserError(f"{where}: {name} must be an integer >= {minimum}"
                                 f"{' or null' if allow_none else ''}, got {value!r}")
    return int(value)


def check_entry_weights(weights, domains: Sequence[str], where: str) -> Dict[str, float]:
    """One entry's weights: exactly ``domains``, finite, >= 0, summing to 1 within
    :data:`SUM_TOLERANCE`; returned as floats in ``domains`` order. Accepts a mapping or
    ``len(domains)`` numbers (:func:`chameleon_ext.mixture.check_weights_for`)."""
    return check_weights_for(weights, domains, f"{where}: weights")


def validate_schedule(doc: Mapping[str, Any], source: str = "schedule") -> Schedule:
    """Check a schedule document (see the module docstring); return it as a :class:`Schedule`.

    Raises:
        ChameleonUserError: one line naming ``source`` and, for an entry, its index.
    """
    if not isinstance(doc, Mapping):
        raise ChameleonUserError(f"{source}: expected a JSON object, got {type(doc).__name__}")
    fmt = doc.get("format")
    if fmt != SCHEDULE_FORMAT:
        raise ChameleonUserError(f"{source}: unknown schedule format {fmt!r} (this version reads {SCHEDULE_FORMAT!r})")
    for key in ("domains", "entries"):
        if key not in doc:
            raise ChameleonUserError(f"{source}: missing required key {key!r}")
    domains = check_domain_names(doc["domains"], what=f"{source}: 'domains'")
    budget = _int_field(doc.get("token_budget"), "token_budget", source, 1, allow_none=True)
    per_step = _int_field(doc.get("tokens_per_step"), "tokens_per_step", source, 1, allow_none=True)
    raw = doc["entries"]
    if not isinstance(raw, list) or not raw:
        raise ChameleonUserError(f"{source}: 'entries' must be a non-empty list")
    entries: List[ScheduleEntry] = []
    for i, item in enumerate(raw):
        where = f"{source}: entry {i}"
        if not isinstance(item, Mapping):
            raise ChameleonUserError(
                f"{where}: expected an object {{start_step, start_token, weights}}, got {type(item).__name__}")
        unknown = sorted(set(item) - {"start_step", "start_token", "weights"})
        missing = [k for k in ("start_step", "start_token", "weights") if k not in item]
        if missing or unknown:
            raise ChameleonUserError(
                f"{where}: expected keys start_step, start_token, weights (missing {missing}, unknown {unknown})")
        step = _int_field(item["start_step"], "start_step", where)
        token = _int_field(item["start_token"], "start_token", where)
        if i == 0 and (step, token) != (0, 0):
            raise ChameleonUserError(
                f"{where}: the first entry must start at step 0 and token 0, got step {step}, token {token}")
        if entries and step <= entries[-1].start_step:
            raise ChameleonUserError(
                f"{where}: start_step {step} must be greater than the previous entry's {entries[-1].start_step}")
        if entries and token < entries[-1].start_token:
            raise ChameleonUserError(
                f"{where}: start_token {token} is below the previous entry's {entries[-1].start_token}")
        entries.append(ScheduleEntry(step, token, check_entry_weights(item["weights"], domains, where)))
    if budget is not None and entries[-1].start_token >= budget:
        raise ChameleonUserError(
            f"{source}: entry {len(entries) - 1} starts at token {entries[-1].start_token}, "
            f"at or past the token budget {budget}")
    return Schedule(domains, entries, budget, per_step)


def load_schedule(path: PathLike) -> Schedule:
    """Read and validate a ``schedule.json``."""
    source = os.fspath(path)
    return validate_schedule(io.read_json(source, "schedule file"), source)


def write_schedule(path: PathLike, schedule: Union[Schedule, Mapping]) -> str:
    """Validate and write a schedule atomically (:func:`chameleon_ext.io.write_json`)."""
    if not isinstance(schedule, Schedule):
        schedule = validate_schedule(schedule, os.fspath(path))
    return io.write_json(path, schedule.as_dict(), "schedule file")


class ScheduleWriter:
    """The schedule of a running trainer, rewritten atomically at every :meth:`append`.

    Readers (a plotting script, another trainer) always see a whole, valid file. A write every
    N steps rewrites a few KB: cheap next to a training step.
    """

    def __init__(self, path: PathLike, schedule: Schedule):
        self.path = os.fspath(path)
        self.schedule = schedule

    @classmethod
    def open(cls, path: PathLike, domains: Sequence[str], initial_weights, token_budget: Optional[int] = None,
             tokens_per_step: Optional[int] = None, resume_step: Optional[int] = None) -> "ScheduleWriter":
        """Start ``path`` with one entry (step 0, ``initial_weights``), or, with ``resume_step``
        N, continue the file there keeping only the entries with ``start_step <= N`` (the
        entries a checkpoint after step N has seen) and rewrite it. A resumed file must have
        the same domains; a missing one is an error (the checkpoint and the schedule belong
        together)."""
        where = os.fspath(path)
        domains = check_domain_names(domains, what=f"{where}: domains")
        if resume_step is not None:
            resume_step = _int_field(resume_step, "resume_step", where)
            old = load_schedule(where)
            if old.domains != domains:
                raise ChameleonUserError(f"{where}: schedule domains {old.domains} differ from the run's {domains}")
            writer = cls(where, old.truncated(resume_step))
        else:
            first = ScheduleEntry(0, 0, check_entry_weights(initial_weights, domains, f"{where}: entry 0"))
            doc = Schedule(domains, [first], token_budget, tokens_per_step)
            validate_schedule(doc.as_dict(), where)  # token_budget / tokens_per_step checks
            writer = cls(where, doc)
        writer.write()
        return writer

    def append(self, start_step: int, start_token: int, weights, skip_unchanged: bool = True) -> bool:
        """Add an entry and rewrite the file. Weights equal (bit for bit) to the last entry's
        are skipped with ``skip_unchanged`` (returns False); the file stays as it was."""
        where = f"{self.path}: entry {len(self.schedule.entries)}"
        w = check_entry_weights(weights, self.schedule.domains, where)
        if skip_unchanged and w == self.schedule.entries[-1].weights:
            return False
        entries = self.schedule.entries + [ScheduleEntry(int(start_step), int(start_token), w)]
        doc = dict(self.schedule.as_dict(), entries=[e.as_dict() for e in entries])
        self.schedule = validate_schedule(doc, self.path)  # increasing steps, budget
        self.write()
        return True

    def write(self) -> str:
        return io.write_json(self.path, self.schedule.as_dict(), "schedule file")


def as_schedule(schedule) -> Schedule:
    """A :class:`Schedule` from a Schedule, a path to a schedule.json or a schedule dict."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, (str, os.PathLike)):
        return load_schedule(schedule)
    return validate_schedule(schedule)


def check_schedule_domains(schedule: Schedule, domains: Sequence[str], source: str) -> None:
    """A schedule followed on a dataset must name exactly its domains (in any order): the
    schedule's domains against the data's, as :func:`~chameleon_ext.mixture.check_same_domains`
    words it (unknown: only in the schedule; missing: only in the data)."""
    check_same_domains(domains, schedule.domains, f"{source}: the schedule")
