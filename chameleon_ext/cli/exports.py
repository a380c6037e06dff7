"""``chameleon export`` (a weights.json or schedule.json for other trainers) and
``export-model`` (a Hugging Face folder). Pure file work except export-model."""

from __future__ import annotations

from typing import List

from ..errors import ChameleonUserError
from .common import say


def prefix_map(items, option: str, domains: List[str], source: str) -> dict:
    """``{domain: path}``, or ``{domain: [paths]}`` for a domain given several times (every
    path is kept: OLMo-core and the Megatron formats take several per domain)."""
    prefixes: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ChameleonUserError(f"{option}: expected DOMAIN=PATH, got {item!r}")
        d, p = item.split("=", 1)
        if d in prefixes:
            given = prefixes[d] if isinstance(prefixes[d], list) else [prefixes[d]]
            if p in given:
                raise ChameleonUserError(f"{option}: {d}={p} is given twice")
            prefixes[d] = given + [p]
        else:
            prefixes[d] = p
    unknown = sorted(set(prefixes) - set(domains))
    if unknown:
        raise ChameleonUserError(f"{option}: {unknown} are not domains of {source} ({domains})")
    return prefixes


def cmd_export(args) -> int:
    # Pure file work: nothing here may import the compiled ops (test_faults_cli.py checks).
    from ..exports import load_weights, write_exports

    if (args.weights is None) == (args.schedule is None):
        raise ChameleonUserError("give exactly one of --weights (a weights.json) and --schedule (a schedule.json)"
                                 + ("" if args.weights is None else ", not both"))
    formats = None
    if args.format:
        formats = [f.strip() for item in args.format for f in item.split(",") if f.strip()]
    if args.schedule is not None:
        return export_schedule(args, formats)
    doc = load_weights(args.weights)
    prefixes = prefix_map(args.prefix, "--prefix", doc["domains"], args.weights)
    splits = {name: prefix_map(items, f"--{name}-prefix", doc["domains"], args.weights)
              for name, items in (("valid", args.valid_prefix), ("test", args.test_prefix))}
    paths = write_exports(doc, args.out, prefixes=prefixes or None, formats=formats,
                          split_prefixes={k: v for k, v in splits.items() if v} or None)
    for kind, path in paths.items():
        print(f"{kind}: {path}", flush=True)
    return 0


def export_schedule(args, formats) -> int:
    """``chameleon export --schedule``: the per-stage exports of a mixture schedule and its plot."""
    from ..formats.schedules import write_schedule_exports
    from ..schedule import load_schedule

    given = [opt for opt, v in (("--valid-prefix", args.valid_prefix), ("--test-prefix", args.test_prefix)) if v]
    if given:
        raise ChameleonUserError(f"{', '.join(given)}: only used with --weights (the schedule exports take "
                                 "training prefixes only, --prefix)")
    schedule = load_schedule(args.schedule)
    prefixes = prefix_map(args.prefix, "--prefix", schedule.domains, args.schedule)
    paths = write_schedule_exports(schedule, args.out, prefixes=prefixes or None, formats=formats)
    for kind, path in paths.items():
        print(f"{kind}: {path}", flush=True)
    return 0


def cmd_export_model(args) -> int:
    from ..hf_export import export_hf

    tokenizer = None if args.tokenizer in (None, "byte") else args.tokenizer
    result = export_hf(args.model, args.hf, tokenizer=tokenizer, verify=not args.no_verify)
    diff = result.get("max_logit_diff")
    check = f"; transformers' logits match to {diff:.1e}" if diff is not None else ""
    say(f"wrote a Hugging Face GPT-2 folder {result['out_dir']}{check}")
    return 0


def add_export(p):
    from ..exports import export_formats
    from ..formats.schedules import schedule_export_formats

    p.add_argument("--weights", default=None, help="weights.json (or give --schedule)")
    p.add_argument("--schedule", default=None,
                   help="schedule.json: per-stage exports (nanotron data_stages, Megatron per stage, OLMo-core, Levanter, YAML, "
                        "HF per stage) and a plot of the weights over training")
    p.add_argument("--out", default="runs/exports", help="output folder")
    p.add_argument("--format", action="append", metavar="NAME",
                   help=f"export only these (repeatable or comma-separated; default: all of {', '.join(export_formats())} "
                        f"for --weights, all of {', '.join(schedule_export_formats())} for --schedule)")
    p.add_argument("--prefix", action="append",
                   help="DOMAIN=PATH data prefix of a domain's training data (repeatable; a domain given several "
                        "times keeps every path: OLMo-core lists them, the Megatron formats split the domain's "
                        "weight over them by their tokens)")
    p.add_argument("--valid-prefix", action="append", default=None,
                   help="DOMAIN=PATH validation data prefix (Megatron per-split and NeMo exports)")
    p.add_argument("--test-prefix", action="append", default=None,
                   help="DOMAIN=PATH test data prefix (Megatron per-split and NeMo exports)")
    p.set_defaults(func=cmd_export)


def add_export_model(p):
    p.add_argument("--model", required=True, help="model.pt or ckpt.pt written by chameleon_ext")
    p.add_argument("--hf", required=True, help="output folder for the Hugging Face model")
    p.add_argument("--tokenizer", default="byte", help="'byte' or the local Hugging Face tokenizer folder it was trained with")
    p.add_argument("--no-verify", action="store_true", help="skip comparing transformers' logits with the model's")
    p.set_defaults(func=cmd_export_model)
