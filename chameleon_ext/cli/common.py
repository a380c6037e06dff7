"""What every command shares once its options are parsed: the rank-0 printer, the dataset
and proxy of ``--data``/``--proxy``, the library configs built from the options, and the
collapsed-mixture warning."""

from __future__ import annotations

from typing import List, Optional

from ..errors import ChameleonUserError


BUILTIN = "builtin"


# Only the domain-embedding sampling is smaller on the built-in data (its domains are ~100 KB);
# every other default is the library's (TrainConfig, EmbedConfig, weights.DEFAULT_*).
BUILTIN_EMBED = {"n_windows": 128, "window": 128}


SEED_MAX = 2**64 - 1  # torch.manual_seed's range; numpy's generators take any of these


def say(*args) -> None:
    from .. import distributed

    if distributed.info().is_main:
        print(*args, flush=True)


def dataset(args, tokenizer=None):
    """The dataset of ``--data``, tokenised with ``tokenizer`` (a model's, already resolved)
    or else ``--tokenizer`` (default: the byte tokenizer)."""
    from ..data import builtin_dataset_path, load_dataset

    path = builtin_dataset_path() if args.data == BUILTIN else args.data
    tok = tokenizer if tokenizer is not None else (args.tokenizer or "byte")
    return load_dataset(path, tokenizer=tok, cache_dir=args.cache_dir, val_fraction=args.val_fraction,
                        text_field=getattr(args, "text_field", "text"))


def model_and_dataset(args, path: str, option: str = "--proxy", gpt_only: bool = False):
    """``(model, path, dataset)``: a proxy/model, the file it came from, and the dataset
    tokenised with the tokenizer the model expects (its own unless --tokenizer overrides it;
    see pipeline.load_proxy_and_tokenizer). ``gpt_only``: the command trains or evaluates
    the model, so a Hugging Face folder is refused."""
    from ..pipeline import load_proxy_and_tokenizer, resolve_proxy_path

    kind, resolved = resolve_proxy_path(path)
    if gpt_only and kind != "gpt":
        raise ChameleonUserError(f"{option}: expected a chameleon_ext model.pt or ckpt.pt, got the Hugging Face "
                                 f"folder {path!r} (Hugging Face proxies embed domains only)")
    model, tok = load_proxy_and_tokenizer(resolved, args.tokenizer)
    return model, resolved, dataset(args, tok)


def embed_config(args, proxy_block: Optional[int] = None):
    from ..embed import EmbedConfig

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


def train_fields(args) -> dict:
    """The TrainConfig fields that the training options (add_common, add_training) set."""
    return dict(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, block_size=args.block_size,
                lr=args.lr, warmup_steps=args.warmup, eval_windows=args.eval_windows, ckpt_every=args.ckpt_every,
                seed=args.seed, device=args.device, quiet=args.quiet, max_bad_steps=args.max_bad_steps)


def train_config(args, out_dir: str, steps: int, eval_at_end: bool = False):
    from ..trainer import TrainConfig

    eval_every = args.eval_every
    if eval_at_end and eval_every == 0:
        eval_every = steps  # "0: at the end only", as --eval-every's help says
    return TrainConfig(**{**train_fields(args), "steps": steps, "warmup_steps": min(args.warmup, max(steps - 1, 0)),
                          "eval_every": eval_every, "out_dir": out_dir, "min_lr": None})


def init_distributed(args):
    from .. import distributed

    return distributed.init_from_env(args.device)


def print_table(table: dict, domains: List[str]) -> None:
    runs = list(table)
    width = max(8, *(len(d) for d in domains + ["average"]))
    say(f"{'domain':<{width}}  " + "  ".join(f"{r:>12}" for r in runs))
    for d in domains + ["average"]:
        say(f"{d:<{width}}  " + "  ".join(f"{table[r][d]:>12.3f}" for r in runs))


def name_list(text: Optional[str]) -> List[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def check_collapse(args, weights: dict, tokens: Optional[int], fix: Optional[str], what: str) -> None:
    """Print a collapsed mixture's warning (collapse_lines); with --strict, stop with exit 2."""
    from ..uncertainty import COLLAPSED_WEIGHT, collapse_lines

    lines = collapse_lines(weights, tokens, fix, what)
    for line in lines:
        say(line)
    if lines and getattr(args, "strict", False):
        top = max(weights, key=weights.get)
        raise ChameleonUserError(f"--strict: the {what} is collapsed ({top!r} {weights[top]:.4f} > "
                                 f"{COLLAPSED_WEIGHT}); not training on it")
