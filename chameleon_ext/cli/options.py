"""The option groups the commands share (data, seed, device, quiet, training, embedding,
weights, bootstrap, strict, online) and the argparse types and formatter they use.

Defaults and choices come from the library (TrainConfig, EmbedConfig, weights.DEFAULT_*,
the model presets), so the command line and the Python API cannot drift apart; an option
that sets a config field is made from the dataclass by :func:`config_option`. Each
command's options are built only when that command runs: `export` then imports nothing that
needs the compiled ops."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
from typing import List, Optional

from ..mixture import COLLAPSE_THRESHOLD, MODES, PIPELINE_MODES
from .common import BUILTIN, BUILTIN_EMBED, SEED_MAX


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say what the default is
    (and not for None or off switches, whose defaults say nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other user error
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def seed_type(text: str) -> int:
    value = int(text)  # argparse turns a ValueError into "invalid seed value"
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64 - 1], got {text}")
    return value


seed_type.__name__ = "seed"


def _finite_positive(text: str) -> Optional[float]:
    """``text`` as a finite number > 0, or None."""
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) and v > 0 else None


def positive_floats(text: str) -> List[float]:
    """``--lam 0.1,1,10``: a comma-separated list of finite numbers > 0, at least one."""
    values = [_finite_positive(item) for item in text.split(",")]
    if None in values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of finite numbers > 0, got {text!r}")
    return values


positive_floats.__name__ = "list of numbers"


def lambda_value(text: str):
    """``--lam``: a finite number > 0 or 'auto'."""
    if text == "auto":
        return text
    v = _finite_positive(text)
    if v is None:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0 or 'auto', got {text!r}")
    return v


lambda_value.__name__ = "lambda"


ONLINE = "online"


# --online-* option -> OnlineChameleon argument (their defaults are read from its signature)
ONLINE_OPTIONS = {"--online-every": "every", "--online-warmup": "warmup", "--online-decay": "decay",
                  "--online-floor": "floor", "--mode": "mode"}


def online_defaults() -> dict:
    from ..online import OnlineChameleon

    return {name: p.default for name, p in inspect.signature(OnlineChameleon).parameters.items()}


def add_common(p, data=True, data_default=BUILTIN, defaults=None):
    """--seed, --device, --quiet and the data options; ``defaults``: as in :func:`add_training`."""
    from ..trainer import TrainConfig

    config_option(p, TrainConfig, "seed", type=seed_type, defaults=defaults)
    config_option(p, TrainConfig, "device", choices=["auto", "cpu", "cuda"], defaults=defaults)
    p.add_argument("--quiet", action="store_true",
                   help="no progress output, and no warnings or loading bars from transformers/torch")
    if data:
        from ..data import load_dataset

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


def add_embed(p):
    from ..embed import POOLINGS, PRECISIONS, EmbedConfig

    library = EmbedConfig()
    g = p.add_argument_group("domain embeddings")
    g.add_argument("--n-windows", type=int, default=None,
                   help=f"windows per domain (default {library.n_windows}; "
                        f"{BUILTIN_EMBED['n_windows']} on the built-in data)")
    g.add_argument("--window", type=int, default=None,
                   help=f"tokens per window (default {library.window}, capped at the proxy's "
                        f"block size; {BUILTIN_EMBED['window']} on the built-in data)")
    config_option(g, EmbedConfig, "layer", type=int)
    config_option(g, EmbedConfig, "pooling", choices=list(POOLINGS))
    config_option(g, EmbedConfig, "batch_size", "--embed-batch-size")
    config_option(g, EmbedConfig, "precision", choices=list(PRECISIONS))
    g.add_argument("--embed-cache", default=None, help="embedding cache folder (default: <cache-dir>/embeddings)")


def rule_options(g, sweep: bool = False):
    """--rule, --smoothing (and, outside the sweep, --share): defaults from weights.RULE_DEFAULTS."""
    from ..weights import DEFAULT_RULE, DEFAULT_SHARE, RULE_DEFAULTS, RULES

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


def add_weights(p):
    g = p.add_argument_group("weights")
    g.add_argument("--mode", default=PIPELINE_MODES[0], choices=list(PIPELINE_MODES),
                   help="pretrain: inverse leverage; finetune: leverage; transfer: new domains, frozen proxy, "
                        "pretrain rule")
    temps = rule_options(g)
    g.add_argument("--lam", type=lambda_value, default=None,
                   help="ridge lambda (mu = lambda * k), or 'auto': chosen so the effective dimension is --share "
                        "of k - 1, whatever the proxy's scale (default: the rule's; paper 10, otherwise auto)")
    g.add_argument("--temperature", type=float, default=None, help=f"the rule's temperature (default {temps})")
    g.add_argument("--no-normalize", action="store_true", help="skip S / sum(S) before the rule")
    g.add_argument("--no-plots", action="store_true", help="do not draw the PNG pictures")
    add_strict(g)


def add_strict(g):
    g.add_argument("--strict", action="store_true",
                   help=f"exit with status 2 instead of training on a collapsed mixture (one domain above "
                        f"{COLLAPSE_THRESHOLD}); `weights` writes its files, then exits 2")


def add_bootstrap(p):
    from ..uncertainty import DEFAULT_RESAMPLES

    g = p.add_argument_group("intervals (docs/uncertainty.md)")
    g.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="B",
                   help="resamples of each domain's windows for the weights' 95%% intervals, in one batched "
                        "leverage call (0: none; the diagnostics are written anyway)")
    g.add_argument("--bootstrap-seed", type=seed_type, default=None, help="seed of the resamples (default: --seed)")


def add_training(p, steps: Optional[int] = None, defaults=None, preset: Optional[str] = None,
                 per_run=False):
    """The training options, from :class:`TrainConfig` (``steps``: another default than the
    library's). ``defaults``: a function returning the TrainConfig whose values are the
    defaults (the comparison's), which also gives --block-size its default; ``per_run``: the
    command sets the evaluation period of each run itself (no --eval-every)."""
    from ..model import GPTConfig
    from ..pipeline import DEFAULT_BLOCK_SIZE, DEFAULT_PRESET
    from ..trainer import TrainConfig

    g = p.add_argument_group("training")
    g.add_argument("--preset", default=preset or DEFAULT_PRESET, choices=GPTConfig.preset_names(), help="model size")
    if defaults is None:
        g.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="sequence length")
    else:
        config_option(g, TrainConfig, "block_size", defaults=defaults, type=int)
    config_option(g, TrainConfig, "steps", defaults=defaults, **({} if steps is None else {"default": steps}))
    for name in ("batch_size", "grad_accum", "lr"):
        config_option(g, TrainConfig, name, defaults=defaults)
    config_option(g, TrainConfig, "warmup_steps", "--warmup", defaults=defaults)
    for name in ("eval_windows", "ckpt_every", "max_bad_steps") if per_run else (
            "eval_every", "eval_windows", "ckpt_every", "max_bad_steps"):
        config_option(g, TrainConfig, name, defaults=defaults)
    return g


def add_online(p):
    lib = online_defaults()
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


# --------------------------------------------------------------------------- options from the configs
#
# An option that sets a field of a library config (TrainConfig, EmbedConfig, CompareConfig)
# takes its default from the dataclass itself, its help from the table of that config below,
# and its type from the default: the default lives in the dataclass alone.

FIELD_HELP = {
    "TrainConfig": {
        "seed": "seed for sampling, initialisation and data order",
        "device": "where to compute",
        "steps": "optimiser steps",
        "block_size": "sequence length",
        "batch_size": "sequences per step (global across ranks)",
        "grad_accum": "micro-batches per step",
        "lr": "peak learning rate (cosine to lr/10)",
        "warmup_steps": "warm-up steps",
        "eval_every": "evaluate every N steps and at the end (0: at the end only)",
        "eval_windows": "held-out windows per domain",
        "ckpt_every": "checkpoint every N steps (0: only at the end); an interrupted run resumes from its last "
                      "checkpoint",
        "max_bad_steps": "stop (exit 2, last good checkpoint kept) after this many consecutive steps with a "
                         "non-finite loss or gradient",
    },
    "EmbedConfig": {
        "layer": "proxy layer to pool (default: the middle, as the reference)",
        "pooling": "'reference' reproduces the reference implementation's pooling quirks",
        "batch_size": "windows per forward pass",
        "precision": "proxy forward precision; auto: fp32 with --pooling reference (the reference's) and on "
                     "CPUs, bf16 autocast on CUDA",
    },
    "CompareConfig": {
        "seeds": "base runs per mixture (seeds --seed, --seed+1, ...)",
        "preset": "model size",
        "proxy_steps": "steps of the Chameleon proxy and the DoReMi reference and proxy",
        "regmix_proxies": "RegMix proxies",
        "regmix_steps": "steps per RegMix proxy",
        "test_fraction": "held-out test share of each domain without test.bin (interleaved blocks, like validation)",
        "finetune_steps": "finetuning steps per run",
    },
}


def field_default(config, name: str, defaults=None):
    """The default of field ``name`` of the dataclass ``config``, or its value in ``defaults()``
    (an instance with other defaults, e.g. the comparison's TrainConfig); a list default as
    the comma-separated text its option takes."""
    if defaults is not None:
        value = getattr(defaults(), name)
    else:
        spec = {f.name: f for f in dataclasses.fields(config)}[name]
        value = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
    return ",".join(value) if isinstance(value, list) else value


def config_option(group, config, name: str, flag: Optional[str] = None, defaults=None, **kwargs):
    """Add the option of ``config``'s field ``name`` (``--name-with-dashes`` unless ``flag``):
    default, help and type from the dataclass (or from ``defaults()``, a function returning the
    instance whose values are the defaults) and :data:`FIELD_HELP` unless given in ``kwargs``.
    The action records where its default comes from (``action.config_field``: the dataclass or
    ``defaults``, and the field) so the defaults can be checked against the library."""
    default = field_default(config, name, defaults)
    if "help" not in kwargs:
        kwargs["help"] = FIELD_HELP[config.__name__][name]
    if type(default) in (int, float):
        kwargs.setdefault("type", type(default))
    from_config = "default" not in kwargs
    kwargs.setdefault("default", default)
    action = group.add_argument(flag or "--" + name.replace("_", "-"), **kwargs)
    action.config_field = (defaults or config, name) if from_config else None
    return action
