"""One progress display for embedding, training and evaluation.

On a terminal (stderr is a TTY) with ``tqdm`` installed, a tqdm bar with a status postfix;
otherwise plain lines on stdout, so logs of batch jobs stay readable: one line per
:meth:`Progress.log` call and, with ``plain_every``, one line per that fraction of the work.
Disabled (``enabled=False``, e.g. ``quiet`` or ranks other than 0) it prints nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

__all__ = ["Progress"]


class Progress:
    """Progress over ``total`` units (steps, windows).

    Args:
        total: units of the whole job.
        initial: units already done (a resumed run).
        desc: a short label ("train", "embed rank 0").
        unit: the unit's name, singular.
        enabled: False prints nothing at all.
        plain_every: without a bar, print a line each time this fraction of ``total`` is done
            (and at the end); None prints only :meth:`log` lines.
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", unit: str = "step",
                 enabled: bool = True, plain_every: Optional[float] = None):
        self.total, self.done, self.desc, self.unit = int(total), int(initial), desc, unit
        self.enabled, self.plain_every = enabled, plain_every
        self.bar = None
        self._t0 = time.perf_counter()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm is optional: fall back to plain lines
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=self.total, initial=self.done, desc=desc or None,
                                unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, extra: str = "") -> None:
        """``n`` more units done; ``extra`` ("12,000 tokens/s") goes on the plain line."""
        before, self.done = self.done, self.done + n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        if self.plain_every:
            step = max(1, int(self.total * self.plain_every))
            if self.done >= self.total or self.done // step > before // step:
                label = f"{self.desc}: " if self.desc else ""
                tail = f", {extra}" if extra else ""
                print(f"{label}{self.done}/{self.total} {self.unit}s{tail}", flush=True)

    def log(self, status: str) -> None:
        """A status line (loss, rate): the bar's postfix, or one printed line."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(status)
        else:
            print(status, flush=True)

    def write(self, message: str) -> None:
        """A message of its own (a notice, an evaluation), printed without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def elapsed(self) -> float:
        """Seconds since this display started."""
        return time.perf_counter() - self._t0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
