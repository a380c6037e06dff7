"""Shared by the per-consumer checkers: the expected weights and one JSON result line."""

import json
import math
import os
import sys

TOL = 1e-9


def load():
    work = sys.argv[1]
    with open(os.path.join(work, "expected.json")) as f:
        return work, json.load(f)


def close(got: dict, want: dict, what: str, normalise: bool = False):
    """Raise AssertionError unless ``got`` equals ``want`` (same keys, each within 1e-9)."""
    if list(got) != list(want):
        raise AssertionError(f"{what}: keys {list(got)} != {list(want)}")
    if normalise:
        total = math.fsum(want.values())
        want = {k: v / total for k, v in want.items()}
    worst = max(abs(got[k] - want[k]) for k in want)
    if worst > TOL:
        raise AssertionError(f"{what}: max |difference| {worst:.3g} > {TOL:g}")
    return worst


def report(consumer: str, version: str, formats, ok, detail: str):
    """``ok``: True (pass), False (FAIL) or a string such as "skipped" (the consumer cannot run
    here, for the reason in ``detail``)."""
    result = ok if isinstance(ok, str) else "pass" if ok else "FAIL"
    print(json.dumps({"consumer": consumer, "version": version, "formats": formats,
                      "result": result, "detail": detail}))
