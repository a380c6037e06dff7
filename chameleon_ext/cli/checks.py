"""Checks before any work: option values wrong whatever the data, outputs that cannot be
written (and the output-folder locks), and options whose values cannot fit in memory."""

from __future__ import annotations

import math
import os
from typing import Optional

from ..errors import ChameleonUserError
from ..memory import format_bytes, physical_memory
from .common import BUILTIN, SEED_MAX, say


def check_int(args, name: str, low: int, high: Optional[int] = None, what: str = "an integer") -> None:
    value = getattr(args, name.lstrip("-").replace("-", "_"), None)
    if value is None:
        return
    if value < low or (high is not None and value > high):
        raise ChameleonUserError(f"{name}: expected {what}, got {value}")


def check_args(args) -> None:
    """Option values that are wrong whatever the data: one line, before anything is loaded."""
    check_int(args, "--seed", 0, SEED_MAX, "an integer in [0, 2**64 - 1]")
    for name in ("--block-size", "--steps", "--proxy-steps", "--batch-size", "--grad-accum", "--embed-batch-size",
                 "--max-bad-steps"):
        check_int(args, name, 1, None, "a positive integer")
    for name in ("--warmup", "--eval-every", "--eval-windows", "--ckpt-every"):
        check_int(args, name, 0, None, "a non-negative integer")
    check_int(args, "--token-budget", 1, None, "a positive integer")
    check_int(args, "--bootstrap", 0, None, "an integer >= 0 (0: no bootstrap)")
    if getattr(args, "max_epochs", None) is not None and not (args.max_epochs > 0 and math.isfinite(args.max_epochs)):
        raise ChameleonUserError(f"--max-epochs: expected a positive number, got {args.max_epochs}")
    if args.command == "eval":  # in training 0 windows switches evaluation off; here it is all there is
        check_int(args, "--eval-windows", 1, None, "a positive integer")
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


def check_outputs(args) -> None:
    """Every output is writable before the long work starts (a read-only folder or a file in
    the place of the output folder is found now, not after an hour of training). Every rank
    checks, before the process group exists, so under torchrun all ranks stop alike instead of
    the others waiting for a rank 0 that has left."""
    from .. import io

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
            _LOCKS.append(io.FolderLock(args.out, "--out", on_stale=say).acquire())
    if getattr(args, "embed_cache", None):
        io.check_writable_folder(args.embed_cache, "--embed-cache")


_LOCKS: list = []  # output-folder locks of the running command, released when it ends


def release_locks() -> None:
    while _LOCKS:
        _LOCKS.pop().release()


def check_memory(option: str, value: int, need: float, detail: str) -> None:
    """An option whose value cannot fit in this machine's memory is an error saying how much
    it would need (a lower bound: ``detail`` says what was counted)."""
    total = physical_memory()
    if total is not None and need > total:
        raise ChameleonUserError(f"{option} {value}: needs at least {format_bytes(need)} of memory ({detail}); "
                                 f"this machine has {format_bytes(total)}")


def check_training_memory(args, vocab_size: int, n_domains: int, block: int) -> None:
    # One micro-batch on one rank (torchrun splits the global batch): int64 inputs and targets,
    # and float32 logits, their softmax and gradient.
    world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    rows = -(-args.batch_size // world)
    per_row = block * (16 + 12 * vocab_size)
    check_memory("--batch-size", args.batch_size, rows * per_row,
                  f"{rows} x {block} tokens per rank of int64 ids and float32 logits over {vocab_size} ids")
    # Evaluation draws every domain's windows up front: int64 tokens, inputs and targets.
    eval_need = args.eval_windows * n_domains * (block + 1) * 8 * 3
    check_memory("--eval-windows", args.eval_windows, eval_need,
                  f"{args.eval_windows} windows x {n_domains} domains x {block + 1} int64 tokens")


def check_embedding_memory(cfg, proxy) -> None:
    # Per domain: the window starts (int64) and every window's float32 mean (kept for the
    # bootstrap); reference pooling also keeps the pooled float64 vector, for its de-duplication.
    hidden = getattr(getattr(proxy, "config", None), "n_embd", None) or 1
    per_window = 8 + 4 * hidden + (8 * hidden if cfg.pooling == "reference" else 0)
    what = (f"int64 window starts and float32 window means of {hidden} values"
            + (" and their float64 pooled vectors" if cfg.pooling == "reference" else ""))
    check_memory("--n-windows", cfg.n_windows, cfg.n_windows * per_window, f"{cfg.n_windows} {what}")


def check_bootstrap_option(resamples, cfg, n_domains: int, hidden: int) -> None:
    # Before the proxy and the embeddings cost anything; bootstrap_weights checks again with
    # the windows it really got.
    from ..uncertainty import DEFAULT_RESAMPLES, check_bootstrap_memory

    resamples = DEFAULT_RESAMPLES if resamples is None else resamples
    if isinstance(resamples, int) and not isinstance(resamples, bool):
        check_bootstrap_memory(resamples, [cfg.n_windows] * n_domains, hidden)
