"""``chameleon train-proxy``, ``train`` (fixed, online or scheduled mixtures) and ``eval``."""

from __future__ import annotations

import os

from ..errors import ChameleonUserError
from ..io import write_json
from .checks import check_memory, check_training_memory
from .common import check_collapse, dataset, init_distributed, model_and_dataset, print_table, say, train_config
from .options import ONLINE, ONLINE_OPTIONS, add_common, add_online, add_strict, add_training, config_option


SCHEDULE_NAME = "schedule.json"  # the schedule a --weights online / --schedule run writes into --out


def cmd_train_proxy(args) -> int:
    from ..model import GPTConfig
    from ..pipeline import train_proxy

    init_distributed(args)
    ds = dataset(args)
    check_training_memory(args, ds.vocab_size, len(ds.domains), args.block_size)
    GPTConfig.preset(args.preset, ds.vocab_size, args.block_size)  # a bad preset fails now
    done = []
    path = train_proxy(ds, args.out, preset=args.preset, block_size=args.block_size,
                       config=train_config(args, args.out, args.steps, eval_at_end=True), seed=args.seed,
                       notice=done.append)
    if done:  # already at or past --steps: nothing was trained (the trainer's line says which)
        if args.quiet:
            say(done[0])
        say(f"proxy (unchanged) at {path}")
        return 0
    say(f"proxy written to {path}")
    return 0


def cmd_train(args) -> int:
    from ..model import GPT, GPTConfig
    from ..pipeline import read_weights
    from ..trainer import train

    check_mixture_options(args)
    init_distributed(args)
    init_from = None
    if args.init_from:
        model, init_from, ds = model_and_dataset(args, args.init_from, "--init-from", gpt_only=True)
        block = model.config.block_size
    else:
        ds = dataset(args)
    weights = args.weights if args.weights in ("uniform", ONLINE) else read_weights(args.weights, ds.domains)
    if isinstance(weights, dict):
        per_step = args.batch_size * args.grad_accum * (args.block_size or 0)
        check_collapse(args, weights, per_step * args.steps or None, file_collapse_fix(args.weights),
                        f"mixture of {args.weights}")
    if not args.init_from:
        block = args.block_size
        model = GPT(GPTConfig.preset(args.preset, ds.vocab_size, block), seed=args.seed)
    cfg = train_config(args, args.out, args.steps, eval_at_end=True)
    if args.init_from and cfg.block_size and cfg.block_size > block:
        say(f"note: --block-size {cfg.block_size} exceeds the block size {block} of --init-from "
             f"{args.init_from}; training with sequences of {block} tokens")
    cfg.block_size = min(cfg.block_size or block, block)
    check_training_memory(args, ds.vocab_size, len(ds.domains), cfg.block_size)
    schedule_path = os.path.join(args.out, SCHEDULE_NAME)
    callbacks = []
    if weights == ONLINE:
        weights, callback = online_callback(args, ds, model, schedule_path)
        callbacks.append(callback)
    elif args.schedule is not None:
        weights, callback = schedule_callback(args, ds, cfg, schedule_path)
        callbacks.append(callback)
    elif os.path.exists(os.path.join(args.out, "ckpt.pt")) and os.path.exists(schedule_path):
        # (the callbacks themselves refuse the other mismatches: a plain checkpoint resumed
        # online or on a schedule, an online one on a schedule and the reverse)
        raise ChameleonUserError(f"--out {args.out!r} holds a run that followed a mixture schedule ({schedule_path}); "
                                 "resume it with the --weights online / --schedule it was started with, or use a "
                                 "new --out")
    result = train(model, ds, weights, cfg, init_from=init_from, callbacks=callbacks)
    if result["complete"]:
        if args.quiet:  # (otherwise the trainer has printed it)
            say(result["notices"][-1])  # complete, or past --steps: nothing was trained
        return 0
    loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"
    say(f"trained to step {result['step']}, loss {loss}; model at {result['model_path']}")
    if callbacks:
        say(f"mixture schedule followed: {schedule_path}")
    return 0


def check_mixture_options(args) -> None:
    """--weights, --schedule and the online options go together in a few ways only; checked
    before anything is loaded."""
    online_given = [opt for opt in (*ONLINE_OPTIONS, "--online-layer", "--online-init")
                    if getattr(args, opt.lstrip("-").replace("-", "_")) is not None]
    if args.schedule is not None:
        if args.weights != "uniform":
            what = ("--weights online writes its own schedule.json" if args.weights == ONLINE
                    else "the schedule sets the weights")
            raise ChameleonUserError(f"--schedule cannot be used with --weights {args.weights}: {what}; "
                                     "give one or the other")
    if online_given and args.weights != ONLINE:
        raise ChameleonUserError(f"{', '.join(online_given)}: only used with --weights online "
                                 f"(got --weights {args.weights})")


def online_callback(args, ds, model, schedule_path: str):
    """(initial sampler weights, the OnlineWeights callback) of --weights online."""
    from ..online import OnlineChameleon, OnlineWeights
    from ..pipeline import read_weights

    n_layer = model.config.n_layer
    layer = model.default_embedding_layer if args.online_layer is None else args.online_layer
    if not 0 <= layer <= n_layer:
        raise ChameleonUserError(f"--online-layer: expected an integer in [0, {n_layer}] (0 = embedding output) "
                                 f"for a model of {n_layer} blocks, got {layer}")
    options = {name: getattr(args, opt.lstrip("-").replace("-", "_")) for opt, name in ONLINE_OPTIONS.items()}
    options = {k: v for k, v in options.items() if v is not None}  # the rest: OnlineChameleon's defaults
    initial = read_weights(args.online_init, ds.domains) if args.online_init else None
    try:
        online = OnlineChameleon(ds.domains, initial_weights=initial, **options)
    except ChameleonUserError as exc:  # "every must be ..." -> "--online-every must be ..."
        text = str(exc)
        for opt, name in ONLINE_OPTIONS.items():
            if text.startswith(f"{name} "):
                text = opt + text[len(name):]
        raise ChameleonUserError(text) from None
    first = online.warmup if online.warmup > 0 else online.every  # OnlineChameleon.update_due
    say(f"online weights: layer {layer} of {n_layer}, {online.mode} rule, recomputed at step {first} and "
         f"every {online.every} steps after, EMA decay {online.decay:g}, floor {online.floor:g}; "
         f"before that {'--online-init ' + args.online_init if initial else 'uniform'}; schedule -> {schedule_path}")
    return online.weights.tolist(), OnlineWeights(online, layer, schedule_path)


def schedule_callback(args, ds, cfg, schedule_path: str):
    """(initial sampler weights, the ScheduleWeights callback) of --schedule."""
    from ..schedule import check_schedule_domains, load_schedule
    from ..schedule_weights import ScheduleWeights

    source = f"--schedule {args.schedule!r}"
    schedule = load_schedule(args.schedule)
    check_schedule_domains(schedule, ds.domains, source)
    per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size
    if schedule.tokens_per_step is not None and schedule.tokens_per_step != per_step:
        say(f"note: {source} was made for {schedule.tokens_per_step} tokens per step, this run takes {per_step}; "
             "it is followed by step (start_step), not by token")
    unused = [e.start_step for e in schedule.entries if e.start_step >= cfg.steps]
    if unused:
        say(f"note: {source}: {len(unused)} entr{'y' if len(unused) == 1 else 'ies'} start at or after --steps "
             f"{cfg.steps} (from step {unused[0]}) and will not be used")
    say(f"following {args.schedule}: {len(schedule.entries)} stage(s) at steps "
         f"{[e.start_step for e in schedule.entries]}; copied to {schedule_path}")
    callback = ScheduleWeights(schedule, copy_path=schedule_path, source=source)
    return callback.initial_weights(), callback


def file_collapse_fix(path: str) -> str:
    """Advice for a collapsed weights.json that is tried here: the default rule on the domain
    embeddings beside it (or, without them, on the file's leverage scores)."""
    from ..embed import load_domain_embeddings
    from ..exports import load_weights
    from ..weights import DEFAULT_RULE, weights_from_embeddings, weights_from_scores

    doc = load_weights(path)
    direction = "finetune" if doc.get("mode") == "finetune" else "pretrain"
    emb_path = os.path.join(os.path.dirname(os.path.abspath(path)), "domain_embeddings.pt")
    try:
        emb = load_domain_embeddings(emb_path)
        w = weights_from_embeddings(emb.embeddings, direction, rule=DEFAULT_RULE).weights
        return (f"`chameleon weights --embeddings {emb_path}` (the default {DEFAULT_RULE} rule) gives at most "
                f"{float(w.max()):.3f} on the same embeddings")
    except (ChameleonUserError, OSError, ValueError):  # no usable embeddings beside it: the file's own scores
        lev = doc.get("leverage")
        if isinstance(lev, dict) and set(lev) == set(doc["domains"]):
            w = weights_from_scores([lev[d] for d in doc["domains"]], direction, rule=DEFAULT_RULE)
            return (f"recompute with `chameleon weights` (the default {DEFAULT_RULE} rule): on this file's leverage "
                    f"scores it gives at most {float(w.max()):.3f}")
        return f"recompute with `chameleon weights` (the default {DEFAULT_RULE} rule, which smooths toward uniform)"


def cmd_eval(args) -> int:
    from .. import distributed
    from ..embed import check_proxy_tokenizer
    from ..trainer import evaluate

    init_distributed(args)
    model, _, ds = model_and_dataset(args, args.model, "--model", gpt_only=True)
    check_proxy_tokenizer(model, ds)
    ds.check_vocab(model.config.vocab_size)  # else an id >= vocab fails deep inside the embedding
    block = min(args.block_size or model.config.block_size, model.config.block_size)
    check_memory("--eval-windows", args.eval_windows, args.eval_windows * len(ds.domains) * (block + 1) * 24,
                  f"{args.eval_windows} windows x {len(ds.domains)} domains x {block + 1} int64 tokens")
    ev = evaluate(model, ds, args.eval_windows, block, seed=args.seed, device=args.device, progress=not args.quiet)
    table = {"ppl": {d: ev[d]["ppl"] for d in ds.domains}}
    table["ppl"]["average"] = ev["average"]["mean_ppl"]
    print_table(table, ds.domains)
    if args.out and distributed.info().is_main:
        write_json(args.out, ev, "evaluation results")
        say(f"wrote {args.out}")
    return 0


def add_train_proxy(p):
    add_common(p)
    add_training(p)
    p.add_argument("--out", default="runs/proxy", help="output folder (model.pt, ckpt.pt, metrics.jsonl)")
    p.set_defaults(func=cmd_train_proxy)


def add_train(p):
    add_common(p)
    add_training(p)
    p.add_argument("--weights", default="uniform",
                   help="a weights.json, 'uniform', or 'online': Chameleon weights recomputed during training from "
                        "the model's own hidden states (options below; writes --out/schedule.json)")
    p.add_argument("--schedule", default=None,
                   help="follow this mixture schedule (a schedule.json: weights from given steps on; e.g. one an "
                        "online run wrote); only with --weights uniform")
    p.add_argument("--init-from", default=None, help="start from this model.pt/ckpt.pt (finetuning)")
    p.add_argument("--out", default="runs/train", help="output folder")
    add_strict(p)
    add_online(p)
    p.set_defaults(func=cmd_train)


def add_eval(p):
    from ..trainer import TrainConfig

    add_common(p)
    p.add_argument("--model", required=True, help="model.pt or ckpt.pt")
    config_option(p, TrainConfig, "eval_windows")
    p.add_argument("--block-size", type=int, default=None, help="window length (default: the model's)")
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    p.set_defaults(func=cmd_eval)
