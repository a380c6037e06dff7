"""Records of finished units: one JSON file per unit under ``<out>/records``, holding what
the unit was computed from (its provenance), and the compute ledger's entries."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

from .. import io

RECORD_FORMAT = "chameleon_ext.compare_unit/1"


def digest(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


class Records:
    """One JSON record per finished unit under ``<out>/records``, named by the unit (what it
    is: method, domains, seed); the record holds the unit's *provenance* (what it was computed
    from) and the name of its work folder, which carries the provenance's digest, so a unit
    recomputed from other data never resumes the old checkpoints."""

    def __init__(self, out: str):
        self.folder = os.path.join(out, "records")

    def path(self, unit: str) -> str:
        return os.path.join(self.folder, unit + ".json")

    def get(self, unit: str) -> Optional[dict]:
        rec = io.read_json_or_none(self.path(unit))
        return rec if rec and rec.get("format") == RECORD_FORMAT else None

    def put(self, unit: str, key: str, provenance: dict, rec: dict) -> dict:
        rec = {"format": RECORD_FORMAT, "unit": unit, "key": key, "provenance": provenance, **rec}
        io.write_json(self.path(unit), rec, "comparison record")
        return rec


def stale_reason(saved: Optional[dict], now: dict) -> Optional[str]:
    """Why a record computed from provenance ``saved`` no longer holds for ``now`` (None: it
    does). A provenance is ``{"data": {domain: fingerprint}, "tokenizer", "settings",
    "library", ...}``."""
    if not saved:
        return "it does not record what it was computed from (written by an older chameleon_ext)"
    reasons = []
    data_then, data_now = saved.get("data") or {}, now.get("data") or {}
    changed = [d for d in data_now if data_then.get(d) != data_now[d]]
    if changed or set(data_then) != set(data_now):
        reasons.append(f"the data of domain(s) {changed or sorted(set(data_then) ^ set(data_now))} changed")
    if saved.get("tokenizer") != now.get("tokenizer"):
        reasons.append("the tokenizer changed")
    then_s, now_s = saved.get("settings") or {}, now.get("settings") or {}
    settings = sorted(k for k in set(then_s) | set(now_s) if then_s.get(k) != now_s.get(k))
    if settings:
        reasons.append(f"settings {settings} changed")
    if saved.get("library") != now.get("library"):
        reasons.append(f"chameleon_ext {saved.get('library')} wrote it, this is {now.get('library')}")
    others = sorted(k for k in set(saved) | set(now) if k not in ("data", "tokenizer", "settings", "library")
                    and saved.get(k) != now.get(k))
    if others:
        reasons.append(f"its inputs {others} changed")
    return "; ".join(reasons) or None


def ledger_entry(method: str, name: str, kind: str, n_params: int, tokens: int, wall_s: float) -> dict:
    return {"method": method, "name": name, "kind": kind, "n_params": int(n_params),
            "tokens": int(tokens), "wall_s": float(wall_s)}
