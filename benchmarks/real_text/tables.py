"""Summary tables of the real-text evidence: one row per mixture, for each scenario the
average test perplexity, its paired difference to uniform and the mixture's largest weight,
read from the compare*.json files run_evidence.sh writes (the per-domain tables are in each
compare*.md).

    python benchmarks/real_text/tables.py OUT/default OUT/default-finetune [--title "default budget"]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

SCENARIO_FILES = (("pretrain", "compare.json"), ("new domains", "compare-new-domains.json"),
                  ("finetune", "compare-finetune.json"))


def _interval(iv: Optional[dict], signed: bool = False) -> str:
    if not iv:
        return "—"
    half = (iv["high"] - iv["low"]) / 2 if iv.get("high") is not None else float("nan")
    return f"{iv['mean']:+.2f} ± {half:.2f}" if signed else f"{iv['mean']:.2f} ± {half:.2f}"


def load_docs(folders: Sequence[str]) -> List[tuple]:
    docs = []
    for label, name in SCENARIO_FILES:
        for folder in folders:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as fh:
                    docs.append((label, json.load(fh)))
                break
    return docs


def summary_table(docs: List[tuple]) -> str:
    """Markdown: mixture x scenario (average perplexity, Δ vs uniform, largest weight)."""
    mixtures: List[str] = []
    for _, doc in docs:
        mixtures += [m for m in doc["stats"]["mixtures"] if m not in mixtures]
    head = "| mixture |" + "".join(f" {lab}: avg ppl | Δ vs uniform | largest weight |" for lab, _ in docs)
    rule = "|---|" + "---:|---:|---|" * len(docs)
    rows = [head, rule]
    for m in mixtures:
        cells = []
        for _, doc in docs:
            st = doc["stats"]["mixtures"].get(m)
            if st is None:
                cells += ["not run", "", ""]
                continue
            diff = (st.get("difference_to_baseline") or {}).get("average")
            w = doc["mixtures"][m]["weights"]
            top = max(w, key=w.get)
            mark = " **COLLAPSED**" if m in (doc.get("collapsed") or {}) else ""
            cells += [_interval(st["perplexity"]["average"]), _interval(diff, signed=True),
                      f"{top} {w[top]:.3f}{mark}"]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    notes = []
    for lab, doc in docs:
        if doc.get("improved"):
            parts = [f"{m} {len(v['improved_mean'])}/{v['domains']} lower on average, "
                     f"{len(v['improved_interval'])} significantly, {len(v['worse_interval'])} significantly worse"
                     for m, v in doc["improved"].items()]
            notes.append(f"{lab} domains improved over uniform: " + "; ".join(parts) + ".")
        seeds = doc.get("seeds")
        notes.append(f"{lab}: seeds {seeds}, {doc['tokens_per_run']:,} tokens per run; command: "
                     f"`{doc.get('command')}`")
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="compare --out folders (the first holding a scenario's json wins)")
    ap.add_argument("--title", default=None, help="a heading line above the table")
    args = ap.parse_args(argv)
    docs = load_docs(args.folders)
    if not docs:
        print(f"no compare*.json in {args.folders}", file=sys.stderr)
        return 2
    if args.title:
        print(f"**{args.title}**\n")
    print(summary_table(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
