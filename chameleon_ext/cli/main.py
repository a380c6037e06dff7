"""The parser of every command, :func:`main`, and how a command ends: one line and exit 2
on a user error, 130 on Ctrl-C, 128 + SIGTERM on SIGTERM, the output locks released."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import List, Optional

from .._version import __version__
from ..errors import ChameleonUserError
from .checks import check_args, check_outputs, release_locks
from .compare import add_compare
from .exports import add_export, add_export_model
from .method import add_embed_command, add_run, add_sweep_command, add_weights_command
from .options import HelpFormatter, Parser
from .train import add_eval, add_train, add_train_proxy


# name -> (one-line help, function adding the command's options)
COMMANDS = {
    "run": ("proxy -> weights -> base models (uniform vs chameleon)", add_run),
    "train-proxy": ("train the proxy on the uniform mixture", add_train_proxy),
    "embed": ("domain embeddings with the proxy (cached)", add_embed_command),
    "weights": ("domain weights -> weights.json, exports, pictures", add_weights_command),
    "sweep": ("weights across lambdas and temperatures -> sweep.json, sweep.png", add_sweep_command),
    "train": ("train a model on a weighted mixture", add_train),
    "eval": ("per-domain validation perplexity of a model", add_eval),
    "export": ("mixtures for Megatron, NeMo, OLMo-core, nanotron, Mosaic, TorchTitan, HF, YAML", add_export),
    "export-model": ("a trained model as a Hugging Face GPT-2 folder", add_export_model),
    "compare": ("every mixture method, several seeds, test split, intervals and cost", add_compare),
}


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only``, one whose other commands have no options yet (what
    :func:`main` uses, so a command imports only what it needs)."""
    fmt = HelpFormatter
    parser = Parser(prog="chameleon", formatter_class=fmt,
                     description="Chameleon data mixing: domain weights from a proxy model's "
                                 "embeddings, and a minimal trainer.")
    parser.add_argument("--version", action="version", version=f"chameleon_ext {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
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
        from ..data.tokenizer import quiet_libraries

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
    from .. import distributed

    distributed.shutdown()


def _run_command(args) -> int:
    try:
        check_args(args)
        check_outputs(args)
        try:
            return args.func(args)
        finally:
            release_locks()
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
