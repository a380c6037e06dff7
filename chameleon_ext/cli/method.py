"""The method's commands: ``chameleon embed``, ``weights``, ``sweep`` and ``run`` (all of it)."""

from __future__ import annotations

import os
import time
from typing import List

from ..errors import ChameleonUserError
from ..io import write_json
from ..mixture import PIPELINE_MODES
from .checks import check_bootstrap_option, check_embedding_memory, check_training_memory
from .common import (BUILTIN, check_collapse, dataset, embed_config, init_distributed, model_and_dataset, print_table,
                     say, train_config)
from .options import add_bootstrap, add_common, add_embed, add_training, add_weights, positive_floats, rule_options


# The `run` command's budget on the built-in data.
RUN_STEPS, RUN_PROXY_STEPS = 300, 200


PROXY_HELP = "proxy model.pt/ckpt.pt (or the folder train-proxy wrote), or a local Hugging Face model folder"


def cmd_embed(args) -> int:
    from .. import distributed
    from ..embed import cache_reuse_line, embed_domains

    init_distributed(args)
    proxy, _, ds = model_and_dataset(args, args.proxy)
    cfg = embed_config(args, getattr(getattr(proxy, "config", None), "block_size", None))
    check_embedding_memory(cfg, proxy)
    cache = args.embed_cache or os.path.join(ds.cache_dir, "embeddings")
    emb = embed_domains(proxy, ds, cfg, device=args.device, cache_dir=cache, progress=not args.quiet)
    path = os.path.join(args.out, "domain_embeddings.pt")
    if distributed.info().is_main:
        emb.save(path)  # one file, replaced atomically: old or new, never a mix
    if cache_reuse_line(emb, cache):
        say(cache_reuse_line(emb, cache))
    say(f"embedded {len(emb.computed)} domain(s), {len(emb.domains) - len(emb.computed)} from the cache; "
         f"wrote {path}")
    return 0


def cmd_weights(args) -> int:
    from .. import distributed
    from ..embed import WINDOW_EMBEDDINGS_NAME, load_domain_embeddings
    from ..pipeline import assess_weights, compute_weights, weights_for_domains, write_weights

    init_distributed(args)
    if args.embeddings and args.token_budget is not None:
        raise ChameleonUserError("--token-budget needs the domains' token counts: give --data/--proxy, "
                                 "not --embeddings")
    if args.max_epochs is not None and args.token_budget is None:
        raise ChameleonUserError("--max-epochs caps repetition under a --token-budget: give --token-budget too")
    seed = bootstrap_seed(args)
    if args.embeddings:
        emb = load_domain_embeddings(args.embeddings, windows=args.bootstrap > 0)
        if args.bootstrap > 0 and emb.windows is None:
            say(f"note: no {WINDOW_EMBEDDINGS_NAME} beside {args.embeddings}: no bootstrap intervals "
                 "(diagnostics only); it is written by `chameleon weights` from --data/--proxy")
        result = weights_for_domains(emb, args.mode, args.lam, args.temperature, not args.no_normalize, args.rule,
                                     args.share, args.smoothing, notice=say)
        paths = {}
        if distributed.info().is_main:
            assess_weights(result, emb, args.bootstrap, seed)
            paths = write_weights(args.out, result, emb, {"embeddings": os.path.abspath(args.embeddings)},
                                  plots=not args.no_plots, notice=say)
    else:
        proxy, proxy_path, ds, cfg = proxy_to_embed(args)
        check_bootstrap_option(args.bootstrap, cfg, len(ds.domains), proxy.config.n_embd)
        result, emb, paths = compute_weights(
            ds, proxy_path, args.out, mode=args.mode, lam=args.lam, temperature=args.temperature,
            normalize=not args.no_normalize, embed_config=cfg, device=args.device,
            cache_dir=args.embed_cache, plots=not args.no_plots, progress=not args.quiet, proxy=proxy, notice=say,
            token_budget=args.token_budget, max_epochs=args.max_epochs, bootstrap=args.bootstrap, bootstrap_seed=seed,
            rule=args.rule, share=args.share, smoothing=args.smoothing)
        if args.mode == "transfer":
            say(f"transfer: embedded {emb.computed or 'no'} domain(s) with the frozen proxy; "
                 f"the rest came from the cache")
    say(rule_line(result))
    for d, w, s in zip(result.domains, result.weights.tolist(), result.leverage.tolist()):
        say(f"{d:<20} weight {w:.6f}   leverage {s:.6f}")
    say_assessment(result)
    if paths:
        say(f"wrote {paths['weights']}")
    check_collapse(args, dict(zip(result.domains, result.weights.tolist())), args.token_budget or train_tokens(),
                    result_fix(result), "mixture")
    return 0


def proxy_to_embed(args):
    """``(proxy, proxy path, dataset, EmbedConfig)`` of a command that embeds the domains itself
    (no --embeddings): --proxy is then required, --data defaults to the built-in dataset, and
    the embedding must fit in memory."""
    if not args.proxy:
        raise ChameleonUserError("--proxy: give the proxy checkpoint (or --embeddings FILE)")
    if getattr(args, "data", None) is None:
        args.data = BUILTIN
    proxy, proxy_path, ds = model_and_dataset(args, args.proxy)
    cfg = embed_config(args, getattr(getattr(proxy, "config", None), "block_size", None))
    check_embedding_memory(cfg, proxy)
    return proxy, proxy_path, ds, cfg


def rule_line(result) -> str:
    lam = (f"lambda {result.lam:.4g} (auto: effective dimension {result.effective_dimension:.3f} = "
           f"{result.share:g} of k - 1)" if result.lambda_method == "auto" else f"lambda {result.lam:g}")
    return (f"rule {result.rule} ({result.mode}), {lam}, temperature {result.temperature:.4g}, "
            f"smoothing {result.smoothing:g}")


def train_tokens() -> int:
    """Tokens of a `chameleon train` run with its defaults (the budget a weights file is shown against)."""
    from ..pipeline import DEFAULT_BLOCK_SIZE
    from ..trainer import TrainConfig

    c = TrainConfig()
    return c.steps * c.batch_size * c.grad_accum * DEFAULT_BLOCK_SIZE


def result_fix(result) -> str:
    from ..uncertainty import collapse_fix

    return collapse_fix(result)


def bootstrap_seed(args) -> int:
    return args.seed if args.bootstrap_seed is None else args.bootstrap_seed


def say_assessment(result, indent: str = "") -> None:
    """The bootstrap table (when it ran) and the diagnostics with their warnings (rank 0)."""
    from ..uncertainty import format_bootstrap_table, format_diagnostics

    parts = []
    if result.bootstrap is not None:
        parts.append(format_bootstrap_table(result.bootstrap))
    if result.diagnostics is not None:
        parts.append(format_diagnostics(result.diagnostics))
    for line in "\n".join(parts).splitlines():
        say(indent + line)


def cmd_sweep(args) -> int:
    """Weights at every (lambda, temperature) from one batched krls call: sweep.json,
    sweep.png and a table."""
    from .. import distributed
    from ..embed import cache_reuse_line, embed_domains, load_domain_embeddings
    from ..pipeline import sweep_for_domains
    from ..uncertainty import format_sweep_table

    init_distributed(args)
    if args.embeddings:
        emb = load_domain_embeddings(args.embeddings)
    else:
        proxy, _, ds, cfg = proxy_to_embed(args)
        cache = args.embed_cache or os.path.join(ds.cache_dir, "embeddings")
        emb = embed_domains(proxy, ds, cfg, device=args.device, cache_dir=cache, progress=not args.quiet)
        if cache_reuse_line(emb, cache):
            say(cache_reuse_line(emb, cache))
    sweep = sweep_for_domains(emb, args.lam, args.temperature, mode=args.mode, normalize=not args.no_normalize,
                              rule=args.rule, smoothing=args.smoothing, notice=say)
    say(format_sweep_table(sweep))
    for line in sweep_collapses(sweep):
        say(line)
    if distributed.info().is_main:
        path = write_json(os.path.join(args.out, "sweep.json"), sweep.to_dict(), "sweep file")
        say(f"wrote {path}")
        if not args.no_plots:
            from ..plots import plot_sweep

            # sweep.png at the first temperature, sweep_T<T>.png at each other one
            for j, T in enumerate(sweep.temperatures):
                name = "sweep.png" if j == 0 else f"sweep_T{T:g}.png"
                png = plot_sweep(sweep, os.path.join(args.out, name), temperature=T)
                if png:
                    say(f"wrote {png} (T = {T:g})")
    return 0


def sweep_collapses(sweep) -> List[str]:
    """One line per swept (lambda, T) whose mixture collapsed, and the default rule's result."""
    from ..uncertainty import COLLAPSED_WEIGHT

    hits = []
    for i, lam in enumerate(sweep.lambdas):
        for j, T in enumerate(sweep.temperatures):
            w = sweep.weights[i, j]
            top = int(w.argmax())
            if len(w) > 1 and float(w[top]) > COLLAPSED_WEIGHT:
                hits.append(f"lambda {lam:g}, T {T:g}: {sweep.domains[top]!r} {float(w[top]):.4f}")
    if not hits:
        return []
    return [f"WARNING: {len(hits)} of {len(sweep.lambdas) * len(sweep.temperatures)} swept settings give a collapsed "
            f"mixture (one domain > {COLLAPSED_WEIGHT}): " + "; ".join(hits),
            "  fix: `chameleon weights` with the default rule (no --rule paper) bounds every weight; see its output"]


def cmd_run(args) -> int:
    """The whole method on one dataset: proxy, weights, two base models, perplexity table."""
    from .. import distributed
    from ..model import GPTConfig
    from ..pipeline import check_weight_options, compare_mixtures, compute_weights, train_proxy

    init_distributed(args)
    t0 = time.perf_counter()
    check_weight_options(args.mode, args.lam, args.temperature, args.rule, args.share,
                         args.smoothing)  # fail before training, not after
    embedding = embed_config(args, args.block_size)
    ds = dataset(args)
    GPTConfig.preset(args.preset, ds.vocab_size, args.block_size)
    check_training_memory(args, ds.vocab_size, len(ds.domains), args.block_size)
    check_embedding_memory(embedding, None)
    check_bootstrap_option(args.bootstrap, embedding, len(ds.domains),
                            GPTConfig.preset(args.preset, ds.vocab_size, args.block_size).n_embd)
    out = args.out
    say(f"[1/4] data: {len(ds.domains)} domains from {ds.path}: {', '.join(ds.domains)}")
    say(f"[2/4] training the proxy ({args.preset}, {args.proxy_steps} steps, uniform mixture)")
    proxy = train_proxy(ds, os.path.join(out, "proxy"), preset=args.preset, block_size=args.block_size,
                        config=train_config(args, os.path.join(out, "proxy"), args.proxy_steps), seed=args.seed)
    say("[3/4] domain embeddings and Chameleon weights")
    result, emb, paths = compute_weights(
        ds, proxy, os.path.join(out, "weights"), mode=args.mode, lam=args.lam, temperature=args.temperature,
        normalize=not args.no_normalize, embed_config=embedding, device=args.device,
        cache_dir=args.embed_cache, plots=not args.no_plots, notice=say, bootstrap=args.bootstrap,
        bootstrap_seed=bootstrap_seed(args), rule=args.rule, share=args.share, smoothing=args.smoothing)
    say("      " + rule_line(result))
    for d, w in zip(result.domains, result.weights.tolist()):
        say(f"      {d:<16} {w:.4f}")
    say_assessment(result, indent="      ")
    check_collapse(args, dict(zip(result.domains, result.weights.tolist())),
                    args.steps * args.batch_size * args.grad_accum * args.block_size, result_fix(result),
                    "chameleon mixture")
    say(f"[4/4] base models on the same token budget ({args.steps} steps each): uniform vs chameleon")
    chameleon = dict(zip(result.domains, result.weights.tolist()))
    table = compare_mixtures(ds, {"uniform": "uniform", "chameleon": chameleon}, os.path.join(out, "base"),
                             preset=args.preset, block_size=args.block_size,
                             config=train_config(args, out, args.steps), eval_windows=args.eval_windows,
                             seed=args.seed)
    say("\nvalidation perplexity per domain (lower is better)")
    print_table(table, ds.domains)
    record = {"dataset": ds.path, "domains": ds.domains, "weights": chameleon, "perplexity": table,
              "seconds": time.perf_counter() - t0, "proxy": proxy, "weights_file": paths.get("weights")}
    if distributed.info().is_main:
        write_json(os.path.join(out, "results.json"), record, "results file")
        if not args.no_plots:
            from ..plots import plot_perplexity

            plot_perplexity(table, os.path.join(out, "perplexity.png"))
    say(f"\nwrote {os.path.join(out, 'results.json')} (and weights/, perplexity.png) "
         f"in {record['seconds']:.0f} s")
    return 0


def add_run(p):
    add_common(p)
    add_embed(p)
    add_weights(p)
    add_bootstrap(p)
    add_training(p, steps=RUN_STEPS)
    p.add_argument("--proxy-steps", type=int, default=RUN_PROXY_STEPS, help="proxy training steps")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.set_defaults(func=cmd_run)


def add_embed_command(p):
    add_common(p)
    add_embed(p)
    p.add_argument("--proxy", required=True, help=PROXY_HELP)
    p.add_argument("--out", default="runs/embeddings", help="output folder (domain_embeddings.pt)")
    p.set_defaults(func=cmd_embed)


def add_weights_command(p):
    add_common(p, data_default=None)
    add_embed(p)
    add_weights(p)
    add_bootstrap(p)
    p.add_argument("--proxy", default=None, help=PROXY_HELP)
    p.add_argument("--embeddings", default=None, help="use a domain_embeddings.pt instead of --data/--proxy")
    p.add_argument("--token-budget", type=int, default=None,
                   help="training tokens: report each domain's target tokens and epochs in weights.json")
    p.add_argument("--max-epochs", type=float, default=None,
                   help="cap each domain's repetition under --token-budget; the excess goes to the other "
                        "domains in proportion to their weights")
    p.add_argument("--out", default="runs/weights", help="output folder")
    p.set_defaults(func=cmd_weights)


def add_sweep_command(p):
    from ..uncertainty import DEFAULT_SWEEP_LAMBDAS

    add_common(p, data_default=None)
    add_embed(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--mode", default=PIPELINE_MODES[0], choices=list(PIPELINE_MODES),
                   help="softmax rule, as in `chameleon weights`")
    g.add_argument("--lam", type=positive_floats, default=",".join(f"{x:g}" for x in DEFAULT_SWEEP_LAMBDAS),
                   help="comma-separated ridge lambdas, all in one batched leverage call")
    g.add_argument("--temperature", type=positive_floats, default=None,
                   help="comma-separated temperatures of the rule (default: the rule's for the mode, as in "
                        "`chameleon weights`)")
    rule_options(g, sweep=True)
    g.add_argument("--no-normalize", action="store_true", help="skip S / sum(S) before the rule")
    g.add_argument("--no-plots", action="store_true", help="do not draw sweep.png")
    p.add_argument("--proxy", default=None, help=PROXY_HELP)
    p.add_argument("--embeddings", default=None, help="use a domain_embeddings.pt instead of --data/--proxy")
    p.add_argument("--out", default="runs/sweep", help="output folder (sweep.json, sweep.png)")
    p.set_defaults(func=cmd_sweep)
