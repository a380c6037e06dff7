"""The ``chameleon`` command line (also ``python -m chameleon_ext``).

    chameleon run                                   # the whole method on the built-in data
    chameleon train-proxy --data DIR --out runs/proxy
    chameleon weights --data DIR --proxy runs/proxy/model.pt --mode pretrain --out runs/weights
    chameleon sweep --embeddings runs/weights/domain_embeddings.pt --lam 0.1,1,10,100,1000 --out runs/sweep
    chameleon train --data DIR --weights runs/weights/weights.json --out runs/base
    chameleon eval --data DIR --model runs/base/model.pt
    chameleon export --weights runs/weights/weights.json --out runs/exports
    chameleon train --data DIR --weights online --out runs/online     # also writes schedule.json
    chameleon train --data DIR --schedule runs/online/schedule.json --out runs/replay
    chameleon export --schedule runs/online/schedule.json --out runs/schedule_exports

User errors (bad paths, data, options) print one line and exit with status 2; every
command runs unchanged under ``torchrun`` (rank 0 writes and prints).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from typing import List, Optional

from .errors import ChameleonUserError

BUILTIN = "builtin"
# Only the domain-embedding sampling is smaller on the built-in data (its domains are ~100 KB);
# every other default is the library's (TrainConfig, EmbedConfig, weights.DEFAULT_*).
BUILTIN_EMBED = {"n_windows": 128, "window": 128}
# The `run` command's budget on the built-in data.
RUN_STEPS, RUN_PROXY_STEPS = 300, 200
SEED_MAX = 2**64 - 1
PROXY_HELP = "proxy model.pt/ckpt.pt (or the folder train-proxy wrote), or a local Hugging Face model folder"  # torch.manual_seed's range; numpy's generators take any of these


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
    return load_dataset(path, tokenizer=tok, cache_dir=args.cache_dir, val_fraction=args.val_fraction,
                        text_field=getattr(args, "text_field", "text"))


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

    library = EmbedConfig()
    defaults = BUILTIN_EMBED if args.data == BUILTIN else {"n_windows": library.n_windows, "window": library.window}
    # "is None", not "or": an explicit --window 0 / --n-windows 0 is an error, not the default
    window = defaults["window"] if args.window is None else args.window
    if args.window is None and proxy_block is not None and window > proxy_block:
        window = proxy_block  # default only: an explicit --window larger than the proxy is an error
    n_windows = defaults["n_windows"] if args.n_windows is None else args.n_windows
    return EmbedConfig(n_windows=n_windows, window=window,
                       batch_size=args.embed_batch_size, layer=args.layer, seed=args.seed,
                       pooling=args.pooling, split="train", precision=args.precision)


def _train_config(args, out_dir: str, steps: int, eval_at_end: bool = False):
    from .trainer import TrainConfig

    eval_every = args.eval_every
    if eval_at_end and eval_every == 0:
        eval_every = steps  # "0: at the end only", as --eval-every's help says
    return TrainConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       block_size=args.block_size, lr=args.lr, min_lr=None,
                       warmup_steps=min(args.warmup, max(steps - 1, 0)), eval_every=eval_every,
                       eval_windows=args.eval_windows, ckpt_every=args.ckpt_every, seed=args.seed,
                       device=args.device, out_dir=out_dir, quiet=args.quiet, max_bad_steps=args.max_bad_steps)


def _init_distributed(args):
    from . import distributed

    return distributed.init_from_env(args.device)


def _print_table(table: dict, domains: List[str]) -> None:
    runs = list(table)
    width = max(8, *(len(d) for d in domains + ["average"]))
    _say(f"{'domain':<{width}}  " + "  ".join(f"{r:>12}" for r in runs))
    for d in domains + ["average"]:
        _say(f"{d:<{width}}  " + "  ".join(f"{table[r][d]:>12.3f}" for r in runs))


# --------------------------------------------------------------------------- checks before any work


def _check_int(args, name: str, low: int, high: Optional[int] = None, what: str = "an integer") -> None:
    value = getattr(args, name.lstrip("-").replace("-", "_"), None)
    if value is None:
        return
    if value < low or (high is not None and value > high):
        raise ChameleonUserError(f"{name}: expected {what}, got {value}")


def _check_args(args) -> None:
    """Option values that are wrong whatever the data: one line, before anything is loaded."""
    _check_int(args, "--seed", 0, SEED_MAX, "an integer in [0, 2**64 - 1]")
    for name in ("--block-size", "--steps", "--proxy-steps", "--batch-size", "--grad-accum", "--embed-batch-size",
                 "--max-bad-steps"):
        _check_int(args, name, 1, None, "a positive integer")
    for name in ("--warmup", "--eval-every", "--eval-windows", "--ckpt-every"):
        _check_int(args, name, 0, None, "a non-negative integer")
    _check_int(args, "--token-budget", 1, None, "a positive integer")
    _check_int(args, "--bootstrap", 0, None, "an integer >= 0 (0: no bootstrap)")
    if getattr(args, "max_epochs", None) is not None and not (args.max_epochs > 0 and math.isfinite(args.max_epochs)):
        raise ChameleonUserError(f"--max-epochs: expected a positive number, got {args.max_epochs}")
    if args.command == "eval":  # in training 0 windows switches evaluation off; here it is all there is
        _check_int(args, "--eval-windows", 1, None, "a positive integer")
    if getattr(args, "embeddings", None):
        given = [opt for opt, value in (("--data", getattr(args, "data", None)), ("--proxy", args.proxy))
                 if value is not None]
        if given:
            raise ChameleonUserError(f"{' and '.join(given)} cannot be used with --embeddings: the weights come "
                                     "from the embeddings file alone; drop one or the other")
    if getattr(args, "data", None) == "":
        raise ChameleonUserError(f"--data: expected a dataset folder or {BUILTIN!r}, got an empty string")
    for name in ("embeddings", "proxy", "weights", "model", "init_from", "cache_dir", "embed_cache", "schedule",
                 "online_init"):
        if getattr(args, name, None) == "":
            raise ChameleonUserError(f"--{name.replace('_', '-')}: expected a path, got an empty string")


def _check_outputs(args) -> None:
    """Every output is writable before the long work starts (a read-only folder or a file in
    the place of the output folder is found now, not after an hour of training). Every rank
    checks, before the process group exists, so under torchrun all ranks stop alike instead of
    the others waiting for a rank 0 that has left."""
    from . import io

    if args.command == "eval":
        if args.out:
            if os.path.isdir(args.out):
                raise ChameleonUserError(f"--out {args.out!r} is a folder; expected the path of a JSON file")
            io.check_writable_folder(os.path.dirname(os.path.abspath(args.out)), "--out folder")
        return
    if getattr(args, "out", None) is not None:
        io.check_writable_folder(args.out, "--out")
        # Two runs writing one --out would interleave their files: the second stops here.
        # Rank 0 alone holds the lock (every rank of a torchrun job writes the same folder);
        # train and train-proxy are locked by the trainer itself (chameleon_ext.trainer).
        if int(os.environ.get("RANK", "0") or "0") == 0 and args.command not in ("train", "train-proxy"):
            _LOCKS.append(io.FolderLock(args.out, "--out", on_stale=_say).acquire())
    if getattr(args, "embed_cache", None):
        io.check_writable_folder(args.embed_cache, "--embed-cache")


_LOCKS: list = []  # output-folder locks of the running command, released when it ends


def _release_locks() -> None:
    while _LOCKS:
        _LOCKS.pop().release()


def _physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def _check_memory(option: str, value: int, need: float, detail: str) -> None:
    """An option whose value cannot fit in this machine's memory is an error saying how much
    it would need (a lower bound: ``detail`` says what was counted)."""
    total = _physical_memory()
    if total is not None and need > total:
        raise ChameleonUserError(f"{option} {value}: needs at least {_gib(need)} of memory ({detail}); "
                                 f"this machine has {_gib(total)}")


def _check_training_memory(args, vocab_size: int, n_domains: int, block: int) -> None:
    # One micro-batch on one rank (torchrun splits the global batch): int64 inputs and targets,
    # and float32 logits, their softmax and gradient.
    world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    rows = -(-args.batch_size // world)
    per_row = block * (16 + 12 * vocab_size)
    _check_memory("--batch-size", args.batch_size, rows * per_row,
                  f"{rows} x {block} tokens per rank of int64 ids and float32 logits over {vocab_size} ids")
    # Evaluation draws every domain's windows up front: int64 tokens, inputs and targets.
    eval_need = args.eval_windows * n_domains * (block + 1) * 8 * 3
    _check_memory("--eval-windows", args.eval_windows, eval_need,
                  f"{args.eval_windows} windows x {n_domains} domains x {block + 1} int64 tokens")


def _check_embedding_memory(cfg, proxy) -> None:
    # Per domain: the window starts (int64) and every window's float32 mean (kept for the
    # bootstrap); reference pooling also keeps the pooled float64 vector, for its de-duplication.
    hidden = getattr(getattr(proxy, "config", None), "n_embd", None) or 1
    per_window = 8 + 4 * hidden + (8 * hidden if cfg.pooling == "reference" else 0)
    what = (f"int64 window starts and float32 window means of {hidden} values"
            + (" and their float64 pooled vectors" if cfg.pooling == "reference" else ""))
    _check_memory("--n-windows", cfg.n_windows, cfg.n_windows * per_window, f"{cfg.n_windows} {what}")


def _check_bootstrap_memory(resamples, cfg, n_domains: int, hidden: int) -> None:
    # Before the proxy and the embeddings cost anything; bootstrap_weights checks again with
    # the windows it really got.
    from .uncertainty import DEFAULT_RESAMPLES, check_bootstrap_memory

    resamples = DEFAULT_RESAMPLES if resamples is None else resamples
    if isinstance(resamples, int) and not isinstance(resamples, bool):
        check_bootstrap_memory(resamples, [cfg.n_windows] * n_domains, hidden)


# --------------------------------------------------------------------------- commands


def cmd_train_proxy(args) -> int:
    from .model import GPTConfig
    from .pipeline import train_proxy

    _init_distributed(args)
    ds = _dataset(args)
    _check_training_memory(args, ds.vocab_size, len(ds.domains), args.block_size)
    GPTConfig.preset(args.preset, ds.vocab_size, args.block_size)  # a bad preset fails now
    done = []
    path = train_proxy(ds, args.out, preset=args.preset, block_size=args.block_size,
                       config=_train_config(args, args.out, args.steps, eval_at_end=True), seed=args.seed,
                       notice=done.append)
    if done:  # already at or past --steps: nothing was trained (the trainer's line says which)
        if args.quiet:
            _say(done[0])
        _say(f"proxy (unchanged) at {path}")
        return 0
    _say(f"proxy written to {path}")
    return 0


def cmd_embed(args) -> int:
    from . import distributed
    from .embed import cache_reuse_line, embed_domains

    _init_distributed(args)
    proxy, _, ds = _model_and_dataset(args, args.proxy)
    cfg = _embed_config(args, getattr(getattr(proxy, "config", None), "block_size", None))
    _check_embedding_memory(cfg, proxy)
    cache = args.embed_cache or os.path.join(ds.cache_dir, "embeddings")
    emb = embed_domains(proxy, ds, cfg, device=args.device, cache_dir=cache, progress=not args.quiet)
    path = os.path.join(args.out, "domain_embeddings.pt")
    if distributed.info().is_main:
        emb.save(path)  # one file, replaced atomically: old or new, never a mix
    if cache_reuse_line(emb, cache):
        _say(cache_reuse_line(emb, cache))
    _say(f"embedded {len(emb.computed)} domain(s), {len(emb.domains) - len(emb.computed)} from the cache; "
         f"wrote {path}")
    return 0


def cmd_weights(args) -> int:
    from . import distributed
    from .embed import WINDOW_EMBEDDINGS_NAME, load_domain_embeddings
    from .pipeline import assess_weights, compute_weights, weights_for_domains, write_weights

    _init_distributed(args)
    if args.embeddings and args.token_budget is not None:
        raise ChameleonUserError("--token-budget needs the domains' token counts: give --data/--proxy, "
                                 "not --embeddings")
    if args.max_epochs is not None and args.token_budget is None:
        raise ChameleonUserError("--max-epochs caps repetition under a --token-budget: give --token-budget too")
    seed = _bootstrap_seed(args)
    if args.embeddings:
        emb = load_domain_embeddings(args.embeddings, windows=args.bootstrap > 0)
        if args.bootstrap > 0 and emb.windows is None:
            _say(f"note: no {WINDOW_EMBEDDINGS_NAME} beside {args.embeddings}: no bootstrap intervals "
                 "(diagnostics only); it is written by `chameleon weights` from --data/--proxy")
        result = weights_for_domains(emb, args.mode, args.lam, args.temperature, not args.no_normalize, args.rule,
                                     args.share, args.smoothing, notice=_say)
        paths = {}
        if distributed.info().is_main:
            assess_weights(result, emb, args.bootstrap, seed)
            paths = write_weights(args.out, result, emb, {"embeddings": os.path.abspath(args.embeddings)},
                                  plots=not args.no_plots, notice=_say)
    else:
        if not args.proxy:
            raise ChameleonUserError("--proxy: give the proxy checkpoint (or --embeddings FILE)")
        if getattr(args, "data", None) is None:
            args.data = BUILTIN
        proxy, proxy_path, ds = _model_and_dataset(args, args.proxy)
        block = getattr(getattr(proxy, "config", None), "block_size", None)
        cfg = _embed_config(args, block)
        _check_embedding_memory(cfg, proxy)
        _check_bootstrap_memory(args.bootstrap, cfg, len(ds.domains), proxy.config.n_embd)
        result, emb, paths = compute_weights(
            ds, proxy_path, args.out, mode=args.mode, lam=args.lam, temperature=args.temperature,
            normalize=not args.no_normalize, embed_config=cfg, device=args.device,
            cache_dir=args.embed_cache, plots=not args.no_plots, progress=not args.quiet, proxy=proxy, notice=_say,
            token_budget=args.token_budget, max_epochs=args.max_epochs, bootstrap=args.bootstrap, bootstrap_seed=seed,
            rule=args.rule, share=args.share, smoothing=args.smoothing)
        if args.mode == "transfer":
            _say(f"transfer: embedded {emb.computed or 'no'} domain(s) with the frozen proxy; "
                 f"the rest came from the cache")
    _say(_rule_line(result))
    for d, w, s in zip(result.domains, result.weights.tolist(), result.leverage.tolist()):
        _say(f"{d:<20} weight {w:.6f}   leverage {s:.6f}")
    _say_assessment(result)
    if paths:
        _say(f"wrote {paths['weights']}")
    _check_collapse(args, dict(zip(result.domains, result.weights.tolist())), args.token_budget or _train_tokens(),
                    _result_fix(result), "mixture")
    return 0


def _rule_line(result) -> str:
    lam = (f"lambda {result.lam:.4g} (auto: effective dimension {result.effective_dimension:.3f} = "
           f"{result.share:g} of k - 1)" if result.lambda_method == "auto" else f"lambda {result.lam:g}")
    return (f"rule {result.rule} ({result.mode}), {lam}, temperature {result.temperature:.4g}, "
            f"smoothing {result.smoothing:g}")


def _train_tokens() -> int:
    """Tokens of a `chameleon train` run with its defaults (the budget a weights file is shown against)."""
    from .pipeline import DEFAULT_BLOCK_SIZE
    from .trainer import TrainConfig

    c = TrainConfig()
    return c.steps * c.batch_size * c.grad_accum * DEFAULT_BLOCK_SIZE


def _result_fix(result) -> str:
    from .uncertainty import collapse_fix

    return collapse_fix(result)


def _bootstrap_seed(args) -> int:
    return args.seed if args.bootstrap_seed is None else args.bootstrap_seed


def _say_assessment(result, indent: str = "") -> None:
    """The bootstrap table (when it ran) and the diagnostics with their warnings (rank 0)."""
    from .uncertainty import format_bootstrap_table, format_diagnostics

    parts = []
    if result.bootstrap is not None:
        parts.append(format_bootstrap_table(result.bootstrap))
    if result.diagnostics is not None:
        parts.append(format_diagnostics(result.diagnostics))
    for line in "\n".join(parts).splitlines():
        _say(indent + line)


def cmd_sweep(args) -> int:
    """Weights at every (lambda, temperature) from one batched krls call: sweep.json,
    sweep.png and a table."""
    from . import distributed
    from .embed import cache_reuse_line, embed_domains, load_domain_embeddings
    from .io import write_json
    from .pipeline import sweep_for_domains
    from .uncertainty import format_sweep_table

    _init_distributed(args)
    if args.embeddings:
        emb = load_domain_embeddings(args.embeddings)
    else:
        if not args.proxy:
            raise ChameleonUserError("--proxy: give the proxy checkpoint (or --embeddings FILE)")
        if getattr(args, "data", None) is None:
            args.data = BUILTIN
        proxy, _, ds = _model_and_dataset(args, args.proxy)
        cfg = _embed_config(args, getattr(getattr(proxy, "config", None), "block_size", None))
        _check_embedding_memory(cfg, proxy)
        cache = args.embed_cache or os.path.join(ds.cache_dir, "embeddings")
        emb = embed_domains(proxy, ds, cfg, device=args.device, cache_dir=cache, progress=not args.quiet)
        if cache_reuse_line(emb, cache):
            _say(cache_reuse_line(emb, cache))
    sweep = sweep_for_domains(emb, args.lam, args.temperature, mode=args.mode, normalize=not args.no_normalize,
                              rule=args.rule, smoothing=args.smoothing, notice=_say)
    _say(format_sweep_table(sweep))
    for line in _sweep_collapses(sweep):
        _say(line)
    if distributed.info().is_main:
        path = write_json(os.path.join(args.out, "sweep.json"), sweep.to_dict(), "sweep file")
        _say(f"wrote {path}")
        if not args.no_plots:
            from .plots import plot_sweep

            # sweep.png at the first temperature, sweep_T<T>.png at each other one
            for j, T in enumerate(sweep.temperatures):
                name = "sweep.png" if j == 0 else f"sweep_T{T:g}.png"
                png = plot_sweep(sweep, os.path.join(args.out, name), temperature=T)
                if png:
                    _say(f"wrote {png} (T = {T:g})")
    return 0


def _sweep_collapses(sweep) -> List[str]:
    """One line per swept (lambda, T) whose mixture collapsed, and the default rule's result."""
    from .uncertainty import COLLAPSED_WEIGHT

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


def _check_collapse(args, weights: dict, tokens: Optional[int], fix: Optional[str], what: str) -> None:
    """Print a collapsed mixture's warning (collapse_lines); with --strict, stop with exit 2."""
    from .uncertainty import COLLAPSED_WEIGHT, collapse_lines

    lines = collapse_lines(weights, tokens, fix, what)
    for line in lines:
        _say(line)
    if lines and getattr(args, "strict", False):
        top = max(weights, key=weights.get)
        raise ChameleonUserError(f"--strict: the {what} is collapsed ({top!r} {weights[top]:.4f} > "
                                 f"{COLLAPSED_WEIGHT}); not training on it")


def _file_collapse_fix(path: str) -> str:
    """Advice for a collapsed weights.json that is tried here: the default rule on the domain
    embeddings beside it (or, without them, on the file's leverage scores)."""
    from .embed import load_domain_embeddings
    from .exports import load_weights
    from .weights import DEFAULT_RULE, weights_from_embeddings, weights_from_scores

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


def cmd_train(args) -> int:
    from .model import GPT, GPTConfig
    from .pipeline import read_weights
    from .trainer import train

    _check_mixture_options(args)
    _init_distributed(args)
    init_from = None
    if args.init_from:
        model, init_from, ds = _model_and_dataset(args, args.init_from, "--init-from", gpt_only=True)
        block = model.config.block_size
    else:
        ds = _dataset(args)
    weights = args.weights if args.weights in ("uniform", ONLINE) else read_weights(args.weights, ds.domains)
    if isinstance(weights, dict):
        per_step = args.batch_size * args.grad_accum * (args.block_size or 0)
        _check_collapse(args, weights, per_step * args.steps or None, _file_collapse_fix(args.weights),
                        f"mixture of {args.weights}")
    if not args.init_from:
        block = args.block_size
        model = GPT(GPTConfig.preset(args.preset, ds.vocab_size, block), seed=args.seed)
    cfg = _train_config(args, args.out, args.steps, eval_at_end=True)
    if args.init_from and cfg.block_size and cfg.block_size > block:
        _say(f"note: --block-size {cfg.block_size} exceeds the block size {block} of --init-from "
             f"{args.init_from}; training with sequences of {block} tokens")
    cfg.block_size = min(cfg.block_size or block, block)
    _check_training_memory(args, ds.vocab_size, len(ds.domains), cfg.block_size)
    schedule_path = os.path.join(args.out, SCHEDULE_NAME)
    callbacks = []
    if weights == ONLINE:
        weights, callback = _online_callback(args, ds, model, schedule_path)
        callbacks.append(callback)
    elif args.schedule is not None:
        weights, callback = _schedule_callback(args, ds, cfg, schedule_path)
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
            _say(result["notices"][-1])  # complete, or past --steps: nothing was trained
        return 0
    loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"
    _say(f"trained to step {result['step']}, loss {loss}; model at {result['model_path']}")
    if callbacks:
        _say(f"mixture schedule followed: {schedule_path}")
    return 0


ONLINE = "online"
SCHEDULE_NAME = "schedule.json"  # the schedule a --weights online / --schedule run writes into --out
# --online-* option -> OnlineChameleon argument (their defaults are read from its signature)
ONLINE_OPTIONS = {"--online-every": "every", "--online-warmup": "warmup", "--online-decay": "decay",
                  "--online-floor": "floor", "--mode": "mode"}


def _online_defaults() -> dict:
    import inspect

    from .online import OnlineChameleon

    return {name: p.default for name, p in inspect.signature(OnlineChameleon).parameters.items()}


def _check_mixture_options(args) -> None:
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


def _online_callback(args, ds, model, schedule_path: str):
    """(initial sampler weights, the OnlineWeights callback) of --weights online."""
    from .online import OnlineChameleon, OnlineWeights
    from .pipeline import read_weights

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
    _say(f"online weights: layer {layer} of {n_layer}, {online.mode} rule, recomputed at step {first} and "
         f"every {online.every} steps after, EMA decay {online.decay:g}, floor {online.floor:g}; "
         f"before that {'--online-init ' + args.online_init if initial else 'uniform'}; schedule -> {schedule_path}")
    return online.weights.tolist(), OnlineWeights(online, layer, schedule_path)


def _schedule_callback(args, ds, cfg, schedule_path: str):
    """(initial sampler weights, the ScheduleWeights callback) of --schedule."""
    from .schedule import check_schedule_domains, load_schedule
    from .schedule_weights import ScheduleWeights

    source = f"--schedule {args.schedule!r}"
    schedule = load_schedule(args.schedule)
    check_schedule_domains(schedule, ds.domains, source)
    per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size
    if schedule.tokens_per_step is not None and schedule.tokens_per_step != per_step:
        _say(f"note: {source} was made for {schedule.tokens_per_step} tokens per step, this run takes {per_step}; "
             "it is followed by step (start_step), not by token")
    unused = [e.start_step for e in schedule.entries if e.start_step >= cfg.steps]
    if unused:
        _say(f"note: {source}: {len(unused)} entr{'y' if len(unused) == 1 else 'ies'} start at or after --steps "
             f"{cfg.steps} (from step {unused[0]}) and will not be used")
    _say(f"following {args.schedule}: {len(schedule.entries)} stage(s) at steps "
         f"{[e.start_step for e in schedule.entries]}; copied to {schedule_path}")
    callback = ScheduleWeights(schedule, copy_path=schedule_path, source=source)
    return callback.initial_weights(), callback


def cmd_eval(args) -> int:
    from . import distributed
    from .embed import check_proxy_tokenizer
    from .trainer import evaluate

    _init_distributed(args)
    model, _, ds = _model_and_dataset(args, args.model, "--model", gpt_only=True)
    check_proxy_tokenizer(model, ds)
    ds.check_vocab(model.config.vocab_size)  # else an id >= vocab fails deep inside the embedding
    block = min(args.block_size or model.config.block_size, model.config.block_size)
    _check_memory("--eval-windows", args.eval_windows, args.eval_windows * len(ds.domains) * (block + 1) * 24,
                  f"{args.eval_windows} windows x {len(ds.domains)} domains x {block + 1} int64 tokens")
    ev = evaluate(model, ds, args.eval_windows, block, seed=args.seed, device=args.device, progress=not args.quiet)
    table = {"ppl": {d: ev[d]["ppl"] for d in ds.domains}}
    table["ppl"]["average"] = ev["average"]["mean_ppl"]
    _print_table(table, ds.domains)
    if args.out and distributed.info().is_main:
        from .io import write_json

        write_json(args.out, ev, "evaluation results")
        _say(f"wrote {args.out}")
    return 0


def _prefix_map(items, option: str, domains: List[str], source: str) -> dict:
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
    from .exports import load_weights, write_exports

    if (args.weights is None) == (args.schedule is None):
        raise ChameleonUserError("give exactly one of --weights (a weights.json) and --schedule (a schedule.json)"
                                 + ("" if args.weights is None else ", not both"))
    formats = None
    if args.format:
        formats = [f.strip() for item in args.format for f in item.split(",") if f.strip()]
    if args.schedule is not None:
        return _export_schedule(args, formats)
    doc = load_weights(args.weights)
    prefixes = _prefix_map(args.prefix, "--prefix", doc["domains"], args.weights)
    splits = {name: _prefix_map(items, f"--{name}-prefix", doc["domains"], args.weights)
              for name, items in (("valid", args.valid_prefix), ("test", args.test_prefix))}
    paths = write_exports(doc, args.out, prefixes=prefixes or None, formats=formats,
                          split_prefixes={k: v for k, v in splits.items() if v} or None)
    for kind, path in paths.items():
        print(f"{kind}: {path}", flush=True)
    return 0


def _export_schedule(args, formats) -> int:
    """``chameleon export --schedule``: the per-stage exports of a mixture schedule and its plot."""
    from .formats.schedules import write_schedule_exports
    from .schedule import load_schedule

    given = [opt for opt, v in (("--valid-prefix", args.valid_prefix), ("--test-prefix", args.test_prefix)) if v]
    if given:
        raise ChameleonUserError(f"{', '.join(given)}: only used with --weights (the schedule exports take "
                                 "training prefixes only, --prefix)")
    schedule = load_schedule(args.schedule)
    prefixes = _prefix_map(args.prefix, "--prefix", schedule.domains, args.schedule)
    paths = write_schedule_exports(schedule, args.out, prefixes=prefixes or None, formats=formats)
    for kind, path in paths.items():
        print(f"{kind}: {path}", flush=True)
    return 0


def cmd_export_model(args) -> int:
    from .hf_export import export_hf

    tokenizer = None if args.tokenizer in (None, "byte") else args.tokenizer
    result = export_hf(args.model, args.hf, tokenizer=tokenizer, verify=not args.no_verify)
    diff = result.get("max_logit_diff")
    check = f"; transformers' logits match to {diff:.1e}" if diff is not None else ""
    _say(f"wrote a Hugging Face GPT-2 folder {result['out_dir']}{check}")
    return 0


def cmd_run(args) -> int:
    """The whole method on one dataset: proxy, weights, two base models, perplexity table."""
    from . import distributed
    from .io import write_json
    from .model import GPTConfig
    from .pipeline import check_weight_options, compare_mixtures, compute_weights, train_proxy

    _init_distributed(args)
    t0 = time.perf_counter()
    check_weight_options(args.mode, args.lam, args.temperature, args.rule, args.share,
                         args.smoothing)  # fail before training, not after
    embed_config = _embed_config(args, args.block_size)
    ds = _dataset(args)
    GPTConfig.preset(args.preset, ds.vocab_size, args.block_size)
    _check_training_memory(args, ds.vocab_size, len(ds.domains), args.block_size)
    _check_embedding_memory(embed_config, None)
    _check_bootstrap_memory(args.bootstrap, embed_config, len(ds.domains),
                            GPTConfig.preset(args.preset, ds.vocab_size, args.block_size).n_embd)
    out = args.out
    _say(f"[1/4] data: {len(ds.domains)} domains from {ds.path}: {', '.join(ds.domains)}")
    _say(f"[2/4] training the proxy ({args.preset}, {args.proxy_steps} steps, uniform mixture)")
    proxy = train_proxy(ds, os.path.join(out, "proxy"), preset=args.preset, block_size=args.block_size,
                        config=_train_config(args, os.path.join(out, "proxy"), args.proxy_steps), seed=args.seed)
    _say("[3/4] domain embeddings and Chameleon weights")
    result, emb, paths = compute_weights(
        ds, proxy, os.path.join(out, "weights"), mode=args.mode, lam=args.lam, temperature=args.temperature,
        normalize=not args.no_normalize, embed_config=embed_config, device=args.device,
        cache_dir=args.embed_cache, plots=not args.no_plots, notice=_say, bootstrap=args.bootstrap,
        bootstrap_seed=_bootstrap_seed(args), rule=args.rule, share=args.share, smoothing=args.smoothing)
    _say("      " + _rule_line(result))
    for d, w in zip(result.domains, result.weights.tolist()):
        _say(f"      {d:<16} {w:.4f}")
    _say_assessment(result, indent="      ")
    _check_collapse(args, dict(zip(result.domains, result.weights.tolist())),
                    args.steps * args.batch_size * args.grad_accum * args.block_size, _result_fix(result),
                    "chameleon mixture")
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
    if distributed.info().is_main:
        write_json(os.path.join(out, "results.json"), record, "results file")
        if not args.no_plots:
            from .plots import plot_perplexity

            plot_perplexity(table, os.path.join(out, "perplexity.png"))
    _say(f"\nwrote {os.path.join(out, 'results.json')} (and weights/, perplexity.png) "
         f"in {record['seconds']:.0f} s")
    return 0


def cmd_compare(args) -> int:
    """Every mixture method on the same trainer and token budget, several seeds, test split."""
    import shlex

    from .compare import CompareConfig, run_compare
    from .data import builtin_dataset_path, load_dataset

    new = _name_list(args.new_domains)
    finetune = bool(args.finetune_from or args.finetune_data or args.finetune_domains)
    if new and finetune:
        raise ChameleonUserError("--new-domains and the finetuning options are separate scenarios; run them "
                                 "one at a time (into the same --out to share finished units)")
    cfg = CompareConfig(
        mixtures=_name_list(args.mixtures), seeds=args.seeds, seed=args.seed, preset=args.preset,
        block_size=args.block_size, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        steps=args.steps, proxy_steps=args.proxy_steps, regmix_proxies=args.regmix_proxies,
        regmix_steps=args.regmix_steps, eval_windows=args.eval_windows, embed_windows=args.embed_windows,
        test_fraction=args.test_fraction, val_fraction=args.val_fraction, device=args.device,
        scenario="new_domains" if new else ("finetune" if finetune else "pretrain"), new_domains=new,
        finetune_domains=_name_list(args.finetune_domains), finetune_from=args.finetune_from,
        finetune_data=args.finetune_data, finetune_steps=args.finetune_steps, quiet=args.quiet, strict=args.strict,
        ckpt_every=args.ckpt_every)
    # --finetune-data replaces --data: the finetuning domains are the whole dataset then
    path = args.finetune_data or (builtin_dataset_path() if args.data == BUILTIN else args.data)
    ds = load_dataset(path, tokenizer=args.tokenizer or "byte", cache_dir=args.cache_dir,
                      val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                      text_field=args.text_field)
    command = ("chameleon " + " ".join(shlex.quote(a) for a in sys.argv[1:])
               if "compare" in sys.argv[1:2] else None)
    say = (lambda *a: None) if args.quiet else _say
    run_compare(ds, cfg, args.out, say=say, plots=not args.no_plots, command=command)
    return 0


def _name_list(text: Optional[str]) -> List[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


# --------------------------------------------------------------------------- parser
#
# Defaults and choices come from the library (TrainConfig, EmbedConfig, weights.DEFAULT_*,
# the model presets), so the command line and the Python API cannot drift apart. Each
# command's options are built only when that command runs: `export` then imports nothing that
# needs the compiled ops.


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say what the default is
    (and not for None or off switches, whose defaults say nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other user error
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _seed(text: str) -> int:
    value = int(text)  # argparse turns a ValueError into "invalid _seed value"
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64 - 1], got {text}")
    return value


_seed.__name__ = "seed"


def _positive_floats(text: str) -> List[float]:
    """``--lam 0.1,1,10``: a comma-separated list of finite numbers > 0, at least one."""
    values = []
    for item in text.split(","):
        try:
            v = float(item)
        except ValueError:
            v = math.nan
        if not math.isfinite(v) or v <= 0:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of finite numbers > 0, got {text!r}")
        values.append(v)
    return values


_positive_floats.__name__ = "list of numbers"


def _add_common(p, data=True, data_default=BUILTIN):
    from .trainer import TrainConfig

    library = TrainConfig()
    p.add_argument("--seed", type=_seed, default=library.seed, help="seed for sampling, initialisation and data order")
    p.add_argument("--device", default=library.device, choices=["auto", "cpu", "cuda"], help="where to compute")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output, and no warnings or loading bars from transformers/torch")
    if data:
        from .data import load_dataset
        import inspect

        params = inspect.signature(load_dataset).parameters
        # weights: no default in the namespace, so an explicit --data beside --embeddings is seen
        p.add_argument("--data", default=data_default if data_default == BUILTIN else argparse.SUPPRESS,
                       help="dataset folder (one subfolder per domain), or 'builtin' for the built-in data"
                            + ("" if data_default == BUILTIN else " (default: builtin, unless --embeddings)"))
        p.add_argument("--tokenizer", default=None,
                       help="'byte' or a local Hugging Face tokenizer folder (default: the proxy's or model's "
                            "own tokenizer -- the one a model.pt records, or the one saved in a Hugging Face "
                            "proxy folder -- and 'byte' when no model is given)")
        p.add_argument("--cache-dir", default=None, help="token cache folder (default: <data>/.chameleon_cache)")
        p.add_argument("--val-fraction", type=float, default=params["val_fraction"].default,
                       help="held-out share of each domain without val.bin: blocks spread evenly over its stream")
        p.add_argument("--text-field", default=params["text_field"].default,
                       help="JSON field / Parquet or Arrow column holding the text (default: text)")


def _add_embed(p):
    from .embed import POOLINGS, PRECISIONS, EmbedConfig

    library = EmbedConfig()
    g = p.add_argument_group("domain embeddings")
    g.add_argument("--n-windows", type=int, default=None,
                   help=f"windows per domain (default {library.n_windows}; "
                        f"{BUILTIN_EMBED['n_windows']} on the built-in data)")
    g.add_argument("--window", type=int, default=None,
                   help=f"tokens per window (default {library.window}, capped at the proxy's "
                        f"block size; {BUILTIN_EMBED['window']} on the built-in data)")
    g.add_argument("--layer", type=int, default=library.layer,
                   help="proxy layer to pool (default: the middle, as the reference)")
    g.add_argument("--pooling", default=library.pooling, choices=list(POOLINGS),
                   help="'reference' reproduces the reference implementation's pooling quirks")
    g.add_argument("--embed-batch-size", type=int, default=library.batch_size, help="windows per forward pass")
    g.add_argument("--precision", default=library.precision, choices=list(PRECISIONS),
                   help="proxy forward precision; auto: fp32 with --pooling reference (the reference's) and on "
                        "CPUs, bf16 autocast on CUDA")
    g.add_argument("--embed-cache", default=None, help="embedding cache folder (default: <cache-dir>/embeddings)")


def _lambda(text: str):
    """``--lam``: a finite number > 0 or 'auto'."""
    if text == "auto":
        return text
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0 or 'auto', got {text!r}")
    return v


_lambda.__name__ = "lambda"


def _rule_options(g, sweep: bool = False):
    """--rule, --smoothing (and, outside the sweep, --share): defaults from weights.RULE_DEFAULTS."""
    from .weights import DEFAULT_RULE, DEFAULT_SHARE, RULE_DEFAULTS, RULES

    temps = "; ".join(f"{r}: " + ", ".join(f"{t:g} {m}" for m, t in d["temperature"].items())
                      for r, d in RULE_DEFAULTS.items())
    g.add_argument("--rule", default=DEFAULT_RULE, choices=list(RULES),
                   help="how leverage becomes weights (docs/method.md, Rules): power (w ~ S^(-1/T), scale-free "
                        "lambda, smoothing toward uniform), paper (the paper's method exactly: lambda 10, "
                        "softmax(1/(T S)) / softmax(S/T)), calibrated (paper softmax, largest/smallest weight capped)")
    g.add_argument("--smoothing", type=float, default=None,
                   help="mix c of the uniform mixture into the weights, (1 - c) w + c/k (default: the rule's, "
                        + ", ".join(f"{r} {d['smoothing']:g}" for r, d in RULE_DEFAULTS.items()) + ")")
    if not sweep:
        g.add_argument("--share", type=float, default=None,
                       help=f"--lam auto: effective dimension sum(S) as this share of k - 1 (default {DEFAULT_SHARE:g})")
    return temps


def _add_weights(p):
    from .pipeline import MODES

    g = p.add_argument_group("weights")
    g.add_argument("--mode", default=MODES[0], choices=list(MODES),
                   help="pretrain: inverse leverage; finetune: leverage; transfer: new domains, frozen proxy, "
                        "pretrain rule")
    temps = _rule_options(g)
    g.add_argument("--lam", type=_lambda, default=None,
                   help="ridge lambda (mu = lambda * k), or 'auto': chosen so the effective dimension is --share "
                        "of k - 1, whatever the proxy's scale (default: the rule's; paper 10, otherwise auto)")
    g.add_argument("--temperature", type=float, default=None, help=f"the rule's temperature (default {temps})")
    g.add_argument("--no-normalize", action="store_true", help="skip S / sum(S) before the rule")
    g.add_argument("--no-plots", action="store_true", help="do not draw the PNG pictures")
    _add_strict(g)


def _add_strict(g):
    from .mixture import COLLAPSE_THRESHOLD

    g.add_argument("--strict", action="store_true",
                   help=f"exit with status 2 instead of training on a collapsed mixture (one domain above "
                        f"{COLLAPSE_THRESHOLD}); `weights` writes its files, then exits 2")


def _add_bootstrap(p):
    from .uncertainty import DEFAULT_RESAMPLES

    g = p.add_argument_group("intervals (docs/uncertainty.md)")
    g.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="B",
                   help="resamples of each domain's windows for the weights' 95%% intervals, in one batched "
                        "leverage call (0: none; the diagnostics are written anyway)")
    g.add_argument("--bootstrap-seed", type=_seed, default=None, help="seed of the resamples (default: --seed)")


def _add_training(p, steps: Optional[int] = None):
    from .model import GPTConfig
    from .pipeline import DEFAULT_BLOCK_SIZE, DEFAULT_PRESET
    from .trainer import TrainConfig

    library = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--preset", default=DEFAULT_PRESET, choices=GPTConfig.preset_names(), help="model size")
    g.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="sequence length")
    g.add_argument("--steps", type=int, default=library.steps if steps is None else steps, help="optimiser steps")
    g.add_argument("--batch-size", type=int, default=library.batch_size,
                   help="sequences per step (global across ranks)")
    g.add_argument("--grad-accum", type=int, default=library.grad_accum, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=library.lr, help="peak learning rate (cosine to lr/10)")
    g.add_argument("--warmup", type=int, default=library.warmup_steps, help="warm-up steps")
    g.add_argument("--eval-every", type=int, default=library.eval_every,
                   help="evaluate every N steps and at the end (0: at the end only)")
    g.add_argument("--eval-windows", type=int, default=library.eval_windows, help="held-out windows per domain")
    g.add_argument("--ckpt-every", type=int, default=library.ckpt_every, help="checkpoint every N steps")
    g.add_argument("--max-bad-steps", type=int, default=library.max_bad_steps,
                   help="stop (exit 2, last good checkpoint kept) after this many consecutive steps with a "
                        "non-finite loss or gradient")


def _add_run(p):
    _add_common(p)
    _add_embed(p)
    _add_weights(p)
    _add_bootstrap(p)
    _add_training(p, steps=RUN_STEPS)
    p.add_argument("--proxy-steps", type=int, default=RUN_PROXY_STEPS, help="proxy training steps")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.set_defaults(func=cmd_run)


def _add_train_proxy(p):
    _add_common(p)
    _add_training(p)
    p.add_argument("--out", default="runs/proxy", help="output folder (model.pt, ckpt.pt, metrics.jsonl)")
    p.set_defaults(func=cmd_train_proxy)


def _add_embed_command(p):
    _add_common(p)
    _add_embed(p)
    p.add_argument("--proxy", required=True, help=PROXY_HELP)
    p.add_argument("--out", default="runs/embeddings", help="output folder (domain_embeddings.pt)")
    p.set_defaults(func=cmd_embed)


def _add_weights_command(p):
    _add_common(p, data_default=None)
    _add_embed(p)
    _add_weights(p)
    _add_bootstrap(p)
    p.add_argument("--proxy", default=None, help=PROXY_HELP)
    p.add_argument("--embeddings", default=None, help="use a domain_embeddings.pt instead of --data/--proxy")
    p.add_argument("--token-budget", type=int, default=None,
                   help="training tokens: report each domain's target tokens and epochs in weights.json")
    p.add_argument("--max-epochs", type=float, default=None,
                   help="cap each domain's repetition under --token-budget; the excess goes to the other "
                        "domains in proportion to their weights")
    p.add_argument("--out", default="runs/weights", help="output folder")
    p.set_defaults(func=cmd_weights)


def _add_sweep_command(p):
    from .pipeline import MODES
    from .uncertainty import DEFAULT_SWEEP_LAMBDAS

    _add_common(p, data_default=None)
    _add_embed(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--mode", default=MODES[0], choices=list(MODES), help="softmax rule, as in `chameleon weights`")
    g.add_argument("--lam", type=_positive_floats, default=",".join(f"{x:g}" for x in DEFAULT_SWEEP_LAMBDAS),
                   help="comma-separated ridge lambdas, all in one batched leverage call")
    g.add_argument("--temperature", type=_positive_floats, default=None,
                   help="comma-separated temperatures of the rule (default: the rule's for the mode, as in "
                        "`chameleon weights`)")
    _rule_options(g, sweep=True)
    g.add_argument("--no-normalize", action="store_true", help="skip S / sum(S) before the rule")
    g.add_argument("--no-plots", action="store_true", help="do not draw sweep.png")
    p.add_argument("--proxy", default=None, help=PROXY_HELP)
    p.add_argument("--embeddings", default=None, help="use a domain_embeddings.pt instead of --data/--proxy")
    p.add_argument("--out", default="runs/sweep", help="output folder (sweep.json, sweep.png)")
    p.set_defaults(func=cmd_sweep)


def _add_train(p):
    _add_common(p)
    _add_training(p)
    p.add_argument("--weights", default="uniform",
                   help="a weights.json, 'uniform', or 'online': Chameleon weights recomputed during training from "
                        "the model's own hidden states (options below; writes --out/schedule.json)")
    p.add_argument("--schedule", default=None,
                   help="follow this mixture schedule (a schedule.json: weights from given steps on; e.g. one an "
                        "online run wrote); only with --weights uniform")
    p.add_argument("--init-from", default=None, help="start from this model.pt/ckpt.pt (finetuning)")
    p.add_argument("--out", default="runs/train", help="output folder")
    _add_strict(p)
    _add_online(p)
    p.set_defaults(func=cmd_train)


def _add_online(p):
    from .weights import MODES

    lib = _online_defaults()
    g = p.add_argument_group("online weights (--weights online)")
    g.add_argument("--online-every", type=int, default=None,
                   help=f"recompute the weights every N steps after the warm-up (default {lib['every']})")
    g.add_argument("--online-warmup", type=int, default=None,
                   help=f"steps before the first recomputation (default {lib['warmup']})")
    g.add_argument("--online-decay", type=float, default=None,
                   help=f"decay in [0, 1) of the moving average of per-domain hidden-state sums and counts "
                        f"(default {lib['decay']})")
    g.add_argument("--online-floor", type=float, default=None,
                   help=f"least weight of any domain after an update (default {lib['floor']})")
    g.add_argument("--online-layer", type=int, default=None,
                   help="layer of the trained model whose hidden states embed the domains (default: the middle)")
    g.add_argument("--online-init", default=None,
                   help="a weights.json to sample from until the first recomputation (default: uniform)")
    g.add_argument("--mode", default=None, choices=list(MODES),
                   help=f"pretrain: inverse leverage; finetune: leverage (default {lib['mode']})")


def _add_eval(p):
    from .trainer import TrainConfig

    _add_common(p)
    p.add_argument("--model", required=True, help="model.pt or ckpt.pt")
    p.add_argument("--eval-windows", type=int, default=TrainConfig().eval_windows, help="held-out windows per domain")
    p.add_argument("--block-size", type=int, default=None, help="window length (default: the model's)")
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    p.set_defaults(func=cmd_eval)


def _add_export(p):
    from .exports import export_formats
    from .formats.schedules import schedule_export_formats

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


def _add_export_model(p):
    p.add_argument("--model", required=True, help="model.pt or ckpt.pt written by chameleon_ext")
    p.add_argument("--hf", required=True, help="output folder for the Hugging Face model")
    p.add_argument("--tokenizer", default="byte", help="'byte' or the local Hugging Face tokenizer folder it was trained with")
    p.add_argument("--no-verify", action="store_true", help="skip comparing transformers' logits with the model's")
    p.set_defaults(func=cmd_export_model)


def _add_compare(p):
    from .compare import METHODS, CompareConfig
    from .model import GPTConfig

    library = CompareConfig()
    _add_common(p)
    p.add_argument("--mixtures", default=",".join(library.mixtures),
                   help=f"comma-separated methods ({', '.join(METHODS)}) or weights.json paths")
    p.add_argument("--seeds", type=int, default=library.seeds, help="base runs per mixture (seeds --seed, --seed+1, ...)")
    p.add_argument("--out", default="runs/compare", help="output folder (a rerun skips finished units)")
    p.add_argument("--no-plots", action="store_true", help="do not draw compare.png")
    _add_strict(p)
    g = p.add_argument_group("budget (defaults: about 15 minutes for everything on the built-in data, 2 CPU cores)")
    g.add_argument("--preset", default=library.preset, choices=GPTConfig.preset_names(), help="model size")
    g.add_argument("--block-size", type=int, default=library.block_size, help="sequence length")
    g.add_argument("--batch-size", type=int, default=library.batch_size, help="sequences per step")
    g.add_argument("--lr", type=float, default=library.lr, help="peak learning rate")
    g.add_argument("--warmup", type=int, default=library.warmup, help="warm-up steps")
    g.add_argument("--steps", type=int, default=library.steps, help="steps of every base run (same token budget for all)")
    g.add_argument("--proxy-steps", type=int, default=library.proxy_steps,
                   help="steps of the Chameleon proxy and the DoReMi reference and proxy")
    g.add_argument("--regmix-proxies", type=int, default=library.regmix_proxies, help="RegMix proxies")
    g.add_argument("--regmix-steps", type=int, default=library.regmix_steps, help="steps per RegMix proxy")
    g.add_argument("--eval-windows", type=int, default=library.eval_windows,
                   help="test windows per domain (fixed: the same for every run)")
    g.add_argument("--embed-windows", type=int, default=library.embed_windows, help="Chameleon embedding windows per domain")
    g.add_argument("--test-fraction", type=float, default=library.test_fraction,
                   help="held-out test share of each domain without test.bin (interleaved blocks, like validation)")
    g.add_argument("--ckpt-every", type=int, default=library.ckpt_every,
                   help="checkpoint every N steps of each training run (0: only at its end); an interrupted "
                        "run resumes from its last checkpoint. Large models on a GPU: a checkpoint can cost "
                        "more than the steps between two")
    s = p.add_argument_group("scenarios")
    s.add_argument("--new-domains", default=None,
                   help="comma-separated domains the proxies do not see (Chameleon: transfer mode; DoReMi, RegMix: retrain)")
    s.add_argument("--finetune-from", default=None, help="model.pt/ckpt.pt to finetune")
    s.add_argument("--finetune-data", default=None, help="dataset folder of the finetuning domains (with --finetune-from)")
    s.add_argument("--finetune-domains", default=None,
                   help="comma-separated finetuning domains of --data (the others pretrain the base model)")
    s.add_argument("--finetune-steps", type=int, default=library.finetune_steps, help="finetuning steps per run")
    p.set_defaults(func=cmd_compare)


# name -> (one-line help, function adding the command's options)
COMMANDS = {
    "run": ("proxy -> weights -> base models (uniform vs chameleon)", _add_run),
    "train-proxy": ("train the proxy on the uniform mixture", _add_train_proxy),
    "embed": ("domain embeddings with the proxy (cached)", _add_embed_command),
    "weights": ("domain weights -> weights.json, exports, pictures", _add_weights_command),
    "sweep": ("weights across lambdas and temperatures -> sweep.json, sweep.png", _add_sweep_command),
    "train": ("train a model on a weighted mixture", _add_train),
    "eval": ("per-domain validation perplexity of a model", _add_eval),
    "export": ("mixtures for Megatron, NeMo, OLMo-core, nanotron, Mosaic, TorchTitan, HF, YAML", _add_export),
    "export-model": ("a trained model as a Hugging Face GPT-2 folder", _add_export_model),
    "compare": ("every mixture method, several seeds, test split, intervals and cost", _add_compare),
}


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only``, one whose other commands have no options yet (what
    :func:`main` uses, so a command imports only what it needs)."""
    fmt = _HelpFormatter
    parser = _Parser(prog="chameleon", formatter_class=fmt,
                     description="Chameleon data mixing: domain weights from a proxy model's "
                                 "embeddings, and a minimal trainer.")
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"chameleon_ext {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, add) in COMMANDS.items():
        p = sub.add_parser(name, formatter_class=fmt, help=help_text)
        if only is None or only == name:
            add(p)
    return parser


def _command_of(argv: List[str]) -> Optional[str]:
    for arg in argv:
        if arg in COMMANDS:
            return arg
        if not arg.startswith("-"):
            return None
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    try:
        parser = build_parser(only=command or "")
    except ImportError as exc:  # the command's options come from modules that need the ops
        return _ops_missing(command, exc)
    args = parser.parse_args(argv)
    previous = _on_sigterm_interrupt()
    try:
        if not getattr(args, "quiet", False):  # silencing the libraries imports them: only when asked
            return _run_command(args)
        from .data.tokenizer import quiet_libraries

        with quiet_libraries(True):
            return _run_command(args)
    finally:
        _close_distributed()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's cancel, torchrun's shutdown) handled like Ctrl-C."""


def _on_sigterm_interrupt():
    def handler(signum, frame):
        raise _Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (main() called from a worker thread): leave it
        return None


def _close_distributed() -> None:
    # Under torchrun: tear the process group down while Python is fully alive. Only if
    # torch.distributed was ever imported (pure-JSON commands never load torch).
    if "torch.distributed" not in sys.modules:
        return
    from . import distributed

    distributed.shutdown()


def _run_command(args) -> int:
    try:
        _check_args(args)
        _check_outputs(args)
        try:
            return args.func(args)
        finally:
            _release_locks()
    except ChameleonUserError as exc:
        # One line, whatever the message holds (e.g. torch.load's multi-line explanations).
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"chameleon {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        name, code = ("SIGTERM", 128 + signal.SIGTERM) if isinstance(exc, _Terminated) else ("Ctrl-C", 130)
        what = "the last checkpoint is kept" if args.command in ("train", "train-proxy", "run") else "no file was mixed"
        print(f"chameleon {args.command}: interrupted by {name} ({what})", file=sys.stderr)
        return code
    except ImportError as exc:
        return _ops_missing(args.command, exc)


def _ops_missing(command: Optional[str], exc: ImportError) -> int:
    """A broken build of the compiled ops: one line saying how to rebuild (other ImportErrors
    are bugs and keep their traceback)."""
    if "chameleon_ext._C" not in str(exc):
        raise exc
    print(f"chameleon {command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
