"""The ``chameleon`` command line (also ``python -m chameleon_ext``).

    chameleon run                                   # the whole method on the built-in data
    chameleon train-proxy --data DIR --out runs/proxy
    chameleon weights --data DIR --proxy runs/proxy/model.pt --mode pretrain --out runs/weights
    chameleon train --data DIR --weights runs/weights/weights.json --out runs/base
    chameleon eval --data DIR --model runs/base/model.pt
    chameleon export --weights runs/weights/weights.json --out runs/exports

User errors (bad paths, data, options) print one line and exit with status 2; every
command runs unchanged under ``torchrun`` (rank 0 writes and prints).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from .errors import ChameleonUserError

BUILTIN = "builtin"
# The reference's embedding settings, and the smaller ones used on the built-in data.
DEFAULT_EMBED = {"n_windows": 2048, "window": 512}
BUILTIN_EMBED = {"n_windows": 128, "window": 128}
PROXY_HELP = "proxy model.pt/ckpt.pt (or the folder train-proxy wrote), or a local Hugging Face model folder"


# --------------------------------------------------------------------------- helpers


def _say(*args) -> None:
    from . import distributed

    if distributed.info().is_main:
        print(*args, flush=True)


def _dataset(args, tokenizer=None):
    """The dataset of ``--data``, tokenised with ``tokenizer`` (a model's, already resolved)
    or else ``--tokenizer`` (default: the byte tokenizer)."""
    from .data import builtin_dataset_path, load_dataset

    path = builtin_dataset_path() if args.data == BUILTIN else args.data
    tok = tokenizer if tokenizer is not None else (args.tokenizer or "byte")
    return load_dataset(path, tokenizer=tok, cache_dir=args.cache_dir, val_fraction=args.val_fraction)


def _model_and_dataset(args, path: str, option: str = "--proxy", gpt_only: bool = False):
    """``(model, path, dataset)``: a proxy/model, the file it came from, and the dataset
    tokenised with the tokenizer the model expects (its own unless --tokenizer overrides it;
    see pipeline.load_proxy_and_tokenizer). ``gpt_only``: the command trains or evaluates
    the model, so a Hugging Face folder is refused."""
    from .pipeline import load_proxy_and_tokenizer, resolve_proxy_path

    kind, resolved = resolve_proxy_path(path)
    if gpt_only and kind != "gpt":
        raise ChameleonUserError(f"{option}: expected a chameleon_ext model.pt or ckpt.pt, got the Hugging Face "
                                 f"folder {path!r} (Hugging Face proxies embed domains only)")
    model, tok = load_proxy_and_tokenizer(resolved, args.tokenizer)
    return model, resolved, _dataset(args, tok)


def _embed_config(args, proxy_block: Optional[int] = None):
    from .embed import EmbedConfig

    defaults = BUILTIN_EMBED if args.data == BUILTIN else DEFAULT_EMBED
    # "is None", not "or": an explicit --window 0 / --n-windows 0 is an error, not the default
    window = defaults["window"] if args.window is None else args.window
    if args.window is None and proxy_block is not None and window > proxy_block:
        window = proxy_block  # default only: an explicit --window larger than the proxy is an error
    n_windows = defaults["n_windows"] if args.n_windows is None else args.n_windows
    return EmbedConfig(n_windows=n_windows, window=window,
                       batch_size=args.embed_batch_size, layer=args.layer, seed=args.seed,
                       pooling=args.pooling, split="train", precision=args.precision)


def _train_config(args, out_dir: str, steps: int):
    from .trainer import TrainConfig

    return TrainConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       block_size=args.block_size, lr=args.lr, min_lr=args.lr / 10,
                       warmup_steps=min(args.warmup, max(steps - 1, 0)), eval_every=args.eval_every,
                       eval_windows=args.eval_windows, ckpt_every=args.ckpt_every, seed=args.seed,
                       device=args.device, out_dir=out_dir, quiet=args.quiet)


def _init_distributed(args):
    from . import distributed

    return distributed.init_from_env(args.device)


def _print_table(table: dict, domains: List[str]) -> None:
    runs = list(table)
    width = max(8, *(len(d) for d in domains + ["average"]))
    _say(f"{'domain':<{width}}  " + "  ".join(f"{r:>12}" for r in runs))
    for d in domains + ["average"]:
        _say(f"{d:<{width}}  " + "  ".join(f"{table[r][d]:>12.3f}" for r in runs))


# --------------------------------------------------------------------------- commands


def cmd_train_proxy(args) -> int:
    from .pipeline import train_proxy

    _init_distributed(args)
    ds = _dataset(args)
    path = train_proxy(ds, args.out, preset=args.preset, block_size=args.block_size,
                       config=_train_config(args, args.out, args.steps), seed=args.seed)
    _say(f"proxy written to {path}")
    return 0


def cmd_embed(args) -> int:
    from . import distributed
    from .embed import embed_domains

    _init_distributed(args)
    proxy, _, ds = _model_and_dataset(args, args.proxy)
    cfg = _embed_config(args, getattr(getattr(proxy, "config", None), "block_size", None))
    cache = args.embed_cache or os.path.join(ds.cache_dir, "embeddings")
    emb = embed_domains(proxy, ds, cfg, device=args.device, cache_dir=cache, progress=not args.quiet)
    if distributed.info().is_main:
        os.makedirs(args.out, exist_ok=True)
        emb.save(os.path.join(args.out, "domain_embeddings.pt"))
    _say(f"embedded {len(emb.computed)} domain(s), {len(emb.domains) - len(emb.computed)} from the cache; "
         f"wrote {os.path.join(args.out, 'domain_embeddings.pt')}")
    return 0


def cmd_weights(args) -> int:
    from . import distributed
    from .embed import load_domain_embeddings
    from .pipeline import compute_weights, weights_from_embeddings, write_weights

    _init_distributed(args)
    if args.embeddings:
        emb = load_domain_embeddings(args.embeddings)
        result = weights_from_embeddings(emb, args.mode, args.lam, args.temperature, not args.no_normalize)
        paths = write_weights(args.out, result, emb, {"embeddings": os.path.abspath(args.embeddings)},
                              plots=not args.no_plots) if distributed.info().is_main else {}
    else:
        if not args.proxy:
            raise ChameleonUserError("--proxy: give the proxy checkpoint (or --embeddings FILE)")
        proxy, proxy_path, ds = _model_and_dataset(args, args.proxy)
        block = getattr(getattr(proxy, "config", None), "block_size", None)
        result, emb, paths = compute_weights(
            ds, proxy_path, args.out, mode=args.mode, lam=args.lam, temperature=args.temperature,
            normalize=not args.no_normalize, embed_config=_embed_config(args, block), device=args.device,
            cache_dir=args.embed_cache, plots=not args.no_plots, progress=not args.quiet, proxy=proxy)
        if args.mode == "transfer":
            _say(f"transfer: embedded {emb.computed or 'no'} domain(s) with the frozen proxy; "
                 f"the rest came from the cache")
    for d, w, s in zip(result.domains, result.weights.tolist(), result.krls.tolist()):
        _say(f"{d:<20} weight {w:.6f}   krls {s:.6f}")
    if paths:
        _say(f"wrote {paths['weights']}")
    return 0


def cmd_train(args) -> int:
    from .model import GPT, GPTConfig
    from .pipeline import read_weights
    from .trainer import train

    _init_distributed(args)
    init_from = None
    if args.init_from:
        model, init_from, ds = _model_and_dataset(args, args.init_from, "--init-from", gpt_only=True)
        block = model.config.block_size
    else:
        ds = _dataset(args)
    weights = "uniform" if args.weights == "uniform" else read_weights(args.weights, ds.domains)
    if not args.init_from:
        block = args.block_size
        model = GPT(GPTConfig.preset(args.preset, ds.vocab_size, block), seed=args.seed)
    cfg = _train_config(args, args.out, args.steps)
    cfg.block_size = min(cfg.block_size or block, block)
    result = train(model, ds, weights, cfg, init_from=init_from)
    _say(f"trained to step {result['step']}, loss {result['loss']:.4f}; model at {result['model_path']}")
    return 0


def cmd_eval(args) -> int:
    from . import distributed
    from .embed import check_proxy_tokenizer
    from .trainer import evaluate

    _init_distributed(args)
    model, _, ds = _model_and_dataset(args, args.model, "--model", gpt_only=True)
    check_proxy_tokenizer(model, ds)
    ds.check_vocab(model.config.vocab_size)  # else an id >= vocab fails deep inside the embedding
    block = args.block_size or model.config.block_size
    ev = evaluate(model, ds, args.eval_windows, min(block, model.config.block_size), seed=args.seed,
                  device=args.device)
    table = {"ppl": {d: ev[d]["ppl"] for d in ds.domains}}
    table["ppl"]["average"] = ev["average"]["mean_ppl"]
    _print_table(table, ds.domains)
    if args.out and distributed.info().is_main:
        from .pipeline import write_json_atomic

        write_json_atomic(args.out, ev)
        _say(f"wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    from .exports import load_weights, write_exports

    prefixes = {}
    for item in args.prefix or []:
        if "=" not in item:
            raise ChameleonUserError(f"--prefix: expected DOMAIN=PATH, got {item!r}")
        d, p = item.split("=", 1)
        prefixes[d] = p
    doc = load_weights(args.weights)
    unknown = sorted(set(prefixes) - set(doc["domains"]))
    if unknown:
        raise ChameleonUserError(f"--prefix: {unknown} are not domains of {args.weights} ({doc['domains']})")
    paths = write_exports(doc, args.out, prefixes=prefixes or None)
    for kind, path in paths.items():
        _say(f"{kind}: {path}")
    return 0


def cmd_run(args) -> int:
    """The whole method on one dataset: proxy, weights, two base models, perplexity table."""
    from .pipeline import check_weight_options, compare_mixtures, compute_weights, train_proxy, write_json_atomic

    _init_distributed(args)
    t0 = time.perf_counter()
    check_weight_options(args.mode, args.lam, args.temperature)  # fail before training, not after
    embed_config = _embed_config(args, args.block_size)
    ds = _dataset(args)
    out = args.out
    _say(f"[1/4] data: {len(ds.domains)} domains from {ds.path}: {', '.join(ds.domains)}")
    _say(f"[2/4] training the proxy ({args.preset}, {args.proxy_steps} steps, uniform mixture)")
    proxy = train_proxy(ds, os.path.join(out, "proxy"), preset=args.preset, block_size=args.block_size,
                        config=_train_config(args, os.path.join(out, "proxy"), args.proxy_steps), seed=args.seed)
    _say("[3/4] domain embeddings and Chameleon weights")
    result, emb, paths = compute_weights(
        ds, proxy, os.path.join(out, "weights"), mode=args.mode, lam=args.lam, temperature=args.temperature,
        normalize=not args.no_normalize, embed_config=embed_config, device=args.device,
        cache_dir=args.embed_cache, plots=not args.no_plots)
    for d, w in zip(result.domains, result.weights.tolist()):
        _say(f"      {d:<16} {w:.4f}")
    _say(f"[4/4] base models on the same token budget ({args.steps} steps each): uniform vs chameleon")
    chameleon = dict(zip(result.domains, result.weights.tolist()))
    table = compare_mixtures(ds, {"uniform": "uniform", "chameleon": chameleon}, os.path.join(out, "base"),
                             preset=args.preset, block_size=args.block_size,
                             config=_train_config(args, out, args.steps), eval_windows=args.eval_windows,
                             seed=args.seed)
    _say("\nvalidation perplexity per domain (lower is better)")
    _print_table(table, ds.domains)
    record = {"dataset": ds.path, "domains": ds.domains, "weights": chameleon, "perplexity": table,
              "seconds": time.perf_counter() - t0, "proxy": proxy, "weights_file": paths.get("weights")}
    from . import distributed

    if distributed.info().is_main:
        write_json_atomic(os.path.join(out, "results.json"), record)
        if not args.no_plots:
            from .plots import plot_perplexity

            plot_perplexity(table, os.path.join(out, "perplexity.png"))
    _say(f"\nwrote {os.path.join(out, 'results.json')} (and weights/, perplexity.png) "
         f"in {record['seconds']:.0f} s")
    return 0


# --------------------------------------------------------------------------- parser


def _add_common(p, data=True):
    p.add_argument("--seed", type=int, default=0, help="seed for sampling, initialisation and data order")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output, and no warnings or loading bars from transformers/torch")
    if data:
        p.add_argument("--data", default=BUILTIN,
                       help="dataset folder (one subfolder per domain), or 'builtin' for the built-in data")
        p.add_argument("--tokenizer", default=None,
                       help="'byte' or a local Hugging Face tokenizer folder (default: the proxy's or model's "
                            "own tokenizer -- the one a model.pt records, or the one saved in a Hugging Face "
                            "proxy folder -- and 'byte' when no model is given)")
        p.add_argument("--cache-dir", default=None, help="token cache folder (default: <data>/.chameleon_cache)")
        p.add_argument("--val-fraction", type=float, default=0.1,
                       help="held-out share of each domain without val.bin: blocks spread evenly over its stream")


def _add_embed(p):
    g = p.add_argument_group("domain embeddings")
    g.add_argument("--n-windows", type=int, default=None,
                   help=f"windows per domain (default {DEFAULT_EMBED['n_windows']}; "
                        f"{BUILTIN_EMBED['n_windows']} on the built-in data)")
    g.add_argument("--window", type=int, default=None,
                   help=f"tokens per window (default {DEFAULT_EMBED['window']}, capped at the proxy's "
                        f"block size; {BUILTIN_EMBED['window']} on the built-in data)")
    g.add_argument("--layer", type=int, default=None, help="proxy layer to pool (default: the middle, as the reference)")
    g.add_argument("--pooling", default="masked", choices=["masked", "reference"],
                   help="'reference' reproduces the reference implementation's pooling quirks")
    g.add_argument("--embed-batch-size", type=int, default=16, help="windows per forward pass")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="proxy forward precision; auto: fp32 with --pooling reference (the reference's) and on "
                        "CPUs, bf16 autocast on CUDA")
    g.add_argument("--embed-cache", default=None, help="embedding cache folder (default: <cache-dir>/embeddings)")


def _add_weights(p):
    g = p.add_argument_group("weights")
    g.add_argument("--mode", default="pretrain", choices=["pretrain", "finetune", "transfer"],
                   help="pretrain: inverse KRLS; finetune: KRLS; transfer: new domains, frozen proxy, pretrain rule")
    g.add_argument("--lam", type=float, default=10.0, help="ridge lambda (mu = lambda * k)")
    g.add_argument("--temperature", type=float, default=None, help="softmax temperature (default 5 pretrain, 0.2 finetune)")
    g.add_argument("--no-normalize", action="store_true", help="skip S / sum(S) before the softmax")
    g.add_argument("--no-plots", action="store_true", help="do not draw the PNG pictures")


def _add_training(p, steps: int):
    g = p.add_argument_group("training")
    g.add_argument("--preset", default="small", help="model size: tiny, small, proxy (6x768), base (12x768)")
    g.add_argument("--block-size", type=int, default=128, help="sequence length")
    g.add_argument("--steps", type=int, default=steps, help="optimiser steps")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per step (global across ranks)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine to lr/10)")
    g.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    g.add_argument("--eval-windows", type=int, default=32, help="held-out windows per domain")
    g.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say what the default is
    (and not for None or off switches, whose defaults say nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog="chameleon", formatter_class=fmt,
                                     description="Chameleon data mixing: domain weights from a proxy model's "
                                                 "embeddings, and a minimal trainer.")
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"chameleon_ext {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", formatter_class=fmt, help="proxy -> weights -> base models (uniform vs chameleon)")
    _add_common(p)
    _add_embed(p)
    _add_weights(p)
    _add_training(p, steps=300)
    p.add_argument("--proxy-steps", type=int, default=200, help="proxy training steps")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train-proxy", formatter_class=fmt, help="train the proxy on the uniform mixture")
    _add_common(p)
    _add_training(p, steps=1000)
    p.add_argument("--out", default="runs/proxy", help="output folder (model.pt, ckpt.pt, metrics.jsonl)")
    p.set_defaults(func=cmd_train_proxy)

    p = sub.add_parser("embed", formatter_class=fmt, help="domain embeddings with the proxy (cached)")
    _add_common(p)
    _add_embed(p)
    p.add_argument("--proxy", required=True, help=PROXY_HELP)
    p.add_argument("--out", default="runs/embeddings", help="output folder (domain_embeddings.pt)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("weights", formatter_class=fmt, help="domain weights -> weights.json, exports, pictures")
    _add_common(p)
    _add_embed(p)
    _add_weights(p)
    p.add_argument("--proxy", default=None, help=PROXY_HELP)
    p.add_argument("--embeddings", default=None, help="use a domain_embeddings.pt instead of --data/--proxy")
    p.add_argument("--out", default="runs/weights", help="output folder")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("train", formatter_class=fmt, help="train a model on a weighted mixture")
    _add_common(p)
    _add_training(p, steps=1000)
    p.add_argument("--weights", default="uniform", help="a weights.json, or 'uniform'")
    p.add_argument("--init-from", default=None, help="start from this model.pt/ckpt.pt (finetuning)")
    p.add_argument("--out", default="runs/train", help="output folder")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", formatter_class=fmt, help="per-domain validation perplexity of a model")
    _add_common(p)
    p.add_argument("--model", required=True, help="model.pt or ckpt.pt")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per domain")
    p.add_argument("--block-size", type=int, default=None, help="window length (default: the model's)")
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", formatter_class=fmt, help="Megatron / HF datasets / YAML mixtures from weights.json")
    _add_common(p, data=False)
    p.add_argument("--weights", required=True, help="weights.json")
    p.add_argument("--out", default="runs/exports", help="output folder")
    p.add_argument("--prefix", action="append", help="DOMAIN=PATH data prefix for the Megatron blend (repeatable)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .data.tokenizer import quiet_libraries

    args = build_parser().parse_args(argv)
    try:
        with quiet_libraries(bool(getattr(args, "quiet", False))):
            return _run_command(args)
    finally:
        _close_distributed()


def _close_distributed() -> None:
    # Under torchrun: tear the process group down while Python is fully alive (gloo's
    # threads can otherwise abort the process during interpreter shutdown).
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run_command(args) -> int:
    try:
        return args.func(args)
    except ChameleonUserError as exc:
        # One line, whatever the message holds (e.g. torch.load's multi-line explanations).
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"chameleon {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chameleon {args.command}: interrupted (the last checkpoint is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
