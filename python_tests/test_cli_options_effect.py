"""Every option a command accepts has an effect.

For every command and every option of its parser (read from the parser itself, so a new
option is covered without editing this file), the command runs twice with the library's
entry points replaced by recorders: once without the option and once with a value other than
its default. The option has an effect when the calls the command made into the library (their
arguments: configs, datasets, paths, flags) or its exit status differ. An option accepted and
then dropped on the way (``chameleon compare --text-field`` once was) records the same calls
twice and fails here. Nothing is trained: each recorder returns a small stand-in."""

from __future__ import annotations

import dataclasses
import functools
import sys

import pytest

import chameleon_ext.cli.method as cli_method
import chameleon_ext.cli.train as cli_train
from chameleon_ext.cli import build_parser, main

DOMAINS = ["a", "b", "c"]

# Options without an effect on the library to observe, each with the reason.
NO_EFFECT = {
    "-h": "--help prints the help and exits",
}

# The arguments every run of a command has (its required options and an input).
BASE = {
    "run": [],
    "train-proxy": [],
    "embed": ["--proxy", "proxy.pt"],
    "weights": ["--proxy", "proxy.pt"],
    "sweep": ["--proxy", "proxy.pt"],
    "train": [],
    "eval": ["--model", "model.pt"],
    "export": ["--weights", "base.json"],
    "export-model": ["--model", "model.pt", "--hf", "hf"],
    "compare": [],
}

# Options that act only beside others: (command, option) -> the arguments that replace BASE in
# both runs (the option's effect is then seen against that run).
CONTEXT = {
    ("train", "--online-every"): ["--weights", "online"],
    ("train", "--online-warmup"): ["--weights", "online"],
    ("train", "--online-decay"): ["--weights", "online"],
    ("train", "--online-floor"): ["--weights", "online"],
    ("train", "--online-layer"): ["--weights", "online"],
    ("train", "--online-init"): ["--weights", "online"],
    ("train", "--mode"): ["--weights", "online"],
    ("train", "--strict"): ["--weights", "collapsed.json"],
    ("weights", "--strict"): ["--proxy", "proxy.pt", "--lam", "7"],  # the stand-in result collapses at lam 7
    ("run", "--strict"): ["--lam", "7"],
    ("weights", "--max-epochs"): ["--proxy", "proxy.pt", "--token-budget", "1000"],
    ("compare", "--finetune-from"): ["--finetune-domains", "a"],
    ("compare", "--finetune-data"): ["--finetune-from", "start.pt", "--finetune-domains", "a"],
    ("compare", "--finetune-steps"): ["--finetune-domains", "a"],
}
# Given alone, these replace the input of BASE: the run with the option has nothing else.
ALONE = {("weights", "--embeddings"), ("sweep", "--embeddings"), ("export", "--schedule")}

# Values for options whose default gives no hint (text options).
VALUES = {
    "--data": "otherdata", "--tokenizer": "tok", "--cache-dir": "cache2", "--text-field": "body",
    "--weights": "w.json", "--schedule": "s.json", "--init-from": "start.pt", "--online-init": "init.json",
    "--embed-cache": "ecache", "--embeddings": "emb.pt", "--proxy": "proxy2.pt", "--model": "model2.pt",
    "--hf": "hf2", "--format": "megatron", "--prefix": "a=/p/a", "--valid-prefix": "a=/v/a",
    "--test-prefix": "a=/t/a", "--mixtures": "uniform,natural", "--new-domains": "a",
    "--finetune-from": "start.pt", "--finetune-data": "ftdata", "--finetune-domains": "a,b",
}
# The exit status a run with the option ends with, where it is not 0.
EXIT = {("train", "--strict"): 2, ("weights", "--strict"): 2, ("run", "--strict"): 2}


def _commands():
    sub = build_parser()._subparsers._group_actions[0].choices
    return [(name, action) for name, p in sub.items() for action in p._actions
            if action.option_strings and action.option_strings[0] not in NO_EFFECT]


def _value(action) -> list:
    flag = action.option_strings[0]
    if action.nargs == 0:  # a switch
        return [flag]
    if flag in VALUES:
        return [flag, VALUES[flag]]
    if action.choices:
        return [flag, next(str(c) for c in action.choices if c != action.default)]
    default = action.default
    name = getattr(action.type, "__name__", "")
    if name == "list of numbers":
        return [flag, "2"]
    if name == "lambda":
        return [flag, "3"]
    if default is None:
        return [flag, "0.5" if action.type is float else "3" if action.type is not None else "x"]
    if isinstance(default, int):
        return [flag, str(default + 1)]
    if isinstance(default, float):
        return [flag, repr(default / 2)]
    return [flag, f"other-{flag.lstrip('-')}"]


# -- stand-ins for what the library returns -----------------------------------------------------

class Fake:
    def __init__(self, tag: str, **attrs):
        self.tag = tag
        self.__dict__.update(attrs)


class Floats(list):
    def tolist(self):
        return list(self)


def _dataset(path="data", **kw):
    return Fake("dataset", domains=list(DOMAINS), vocab_size=256, cache_dir="cache", path=str(path),
                check_vocab=lambda n: None)


def _model():
    config = Fake("model config", block_size=64, n_layer=4, n_embd=32, vocab_size=256)
    return Fake("model", config=config, default_embedding_layer=2, n_layer=4)


def _result(*args, **kw):
    lam = kw.get("lam", args[2] if len(args) > 2 else None)
    weights = Floats([0.98, 0.01, 0.01] if lam == 7 else [0.3, 0.3, 0.4])
    return Fake("weights result", domains=list(DOMAINS), weights=weights, leverage=Floats([0.5, 0.5, 0.5]),
                lam=1.0, lambda_method="auto", effective_dimension=1.0, share=0.5, rule="power", mode="pretrain",
                temperature=1.0, smoothing=0.1, bootstrap=None, diagnostics=None)


def _emb(calls):
    return Fake("embeddings", domains=list(DOMAINS), computed=list(DOMAINS), windows=None,
                save=lambda path: calls.append(("DomainEmbeddings.save", path)))


def _sweep(emb, lams, temps, **kw):
    import numpy as np

    lams = list(lams) if isinstance(lams, (list, tuple)) else [1.0]
    temps = list(temps) if isinstance(temps, (list, tuple)) else [1.0]
    w = np.full((len(lams), len(temps), 3), 1 / 3)
    return Fake("sweep", lambdas=lams, temperatures=temps, weights=w, domains=list(DOMAINS), to_dict=lambda: {})


def _normal(x):
    """What a recorded argument says: configs as their fields, stand-ins as their tag."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x).__name__, _normal(dataclasses.asdict(x)))
    if isinstance(x, Fake):
        return x.tag
    if isinstance(x, dict):
        return {str(k): _normal(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_normal(v) for v in x]
    if isinstance(x, (str, int, float, bool, type(None))):
        return x
    if callable(x):
        return "callable"
    return type(x).__name__


@pytest.fixture
def library(monkeypatch, tmp_path):
    """Replace the library's entry points the commands call with recorders; the calls land in
    the returned list."""
    import chameleon_ext.compare as compare_mod
    import chameleon_ext.data as data_mod
    import chameleon_ext.distributed as distributed_mod
    import chameleon_ext.embed as embed_mod
    import chameleon_ext.exports as exports_mod
    import chameleon_ext.formats.schedules as schedules_mod
    import chameleon_ext.hf_export as hf_mod
    import chameleon_ext.io as io_mod
    import chameleon_ext.model as model_mod
    import chameleon_ext.online as online_mod
    import chameleon_ext.pipeline as pipeline_mod
    import chameleon_ext.plots as plots_mod
    import chameleon_ext.schedule as schedule_mod
    import chameleon_ext.schedule_weights as schedule_weights_mod
    import chameleon_ext.trainer as trainer_mod
    import chameleon_ext.uncertainty as uncertainty_mod

    monkeypatch.chdir(tmp_path)
    calls = []

    def record(module, name, returns=None):
        @functools.wraps(getattr(module, name))  # its signature stays (options read defaults from some)
        def fake(*args, **kwargs):
            calls.append((name, _normal(list(args)), _normal(kwargs)))
            return returns(*args, **kwargs) if callable(returns) else returns

        original = getattr(module, name)
        monkeypatch.setattr(module, name, fake)
        # A command module that imported the name itself holds its own reference: replace it
        # there too, so the harness does not depend on how a command imports the library.
        for mod_name, mod in list(sys.modules.items()):
            if mod_name.startswith("chameleon_ext.") and mod is not module and getattr(mod, name, None) is original:
                monkeypatch.setattr(mod, name, fake)

    record(data_mod, "load_dataset", _dataset)
    record(data_mod, "builtin_dataset_path", "builtin-data")
    record(distributed_mod, "init_from_env", None)
    record(pipeline_mod, "resolve_proxy_path", lambda path: ("gpt", path))
    record(pipeline_mod, "load_proxy_and_tokenizer", lambda path, tok: (_model(), tok or "byte"))
    record(pipeline_mod, "train_proxy", "proxy/model.pt")
    record(pipeline_mod, "compute_weights", lambda *a, **k: (_result(*a, **k), _emb(calls), {"weights": "w.json"}))
    record(pipeline_mod, "weights_for_domains", _result)
    record(pipeline_mod, "assess_weights", None)
    record(pipeline_mod, "write_weights", {"weights": "w.json"})
    record(pipeline_mod, "sweep_for_domains", _sweep)
    record(pipeline_mod, "compare_mixtures",
           {m: {**{d: 1.0 for d in DOMAINS}, "average": 1.0} for m in ("uniform", "chameleon")})
    record(pipeline_mod, "read_weights",
           lambda path, domains: ({"a": 0.98, "b": 0.01, "c": 0.01} if "collapsed" in path
                                  else {"a": 0.2, "b": 0.3, "c": 0.5}))
    record(model_mod, "GPT", lambda *a, **k: _model())
    record(trainer_mod, "train", {"complete": False, "loss": 1.0, "step": 3, "model_path": "m.pt", "notices": ["n"]})
    record(trainer_mod, "evaluate",
           {**{d: {"ppl": 2.0, "loss": 0.7} for d in DOMAINS}, "average": {"mean_ppl": 2.0}})
    record(online_mod, "OnlineChameleon",
           lambda domains, **k: Fake("online", warmup=10, every=5, mode="pretrain", decay=0.9, floor=0.01,
                                     weights=Floats([1 / 3] * 3)))
    record(online_mod, "OnlineWeights", lambda *a: Fake("online weights"))
    record(schedule_mod, "load_schedule",
           lambda path: Fake("schedule", entries=[Fake("entry", start_step=0)], tokens_per_step=None,
                             domains=list(DOMAINS)))
    record(schedule_mod, "check_schedule_domains", None)
    record(schedule_weights_mod, "ScheduleWeights",
           lambda *a, **k: Fake("schedule weights", initial_weights=lambda: [1 / 3] * 3))
    record(embed_mod, "embed_domains", lambda *a, **k: _emb(calls))
    record(embed_mod, "load_domain_embeddings", lambda *a, **k: _emb(calls))
    record(embed_mod, "check_proxy_tokenizer", None)
    record(embed_mod, "cache_reuse_line", None)
    record(exports_mod, "load_weights", {"domains": list(DOMAINS), "weights": {d: 1 / 3 for d in DOMAINS}})
    record(exports_mod, "write_exports", {"yaml": "x.yaml"})
    record(schedules_mod, "write_schedule_exports", {"yaml": "x.yaml"})
    record(hf_mod, "export_hf", lambda model, out, **k: {"out_dir": out, "max_logit_diff": None})
    record(io_mod, "write_json", lambda path, *a, **k: path)
    record(plots_mod, "plot_sweep", None)
    record(plots_mod, "plot_perplexity", None)
    record(uncertainty_mod, "format_sweep_table", "")
    record(compare_mod, "run_compare", {})
    for module in (cli_train, cli_method):  # memory checks: the commands' guards, not their work
        for name in ("check_training_memory", "check_memory", "check_embedding_memory", "check_bootstrap_option"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, lambda *a, **k: None)
    monkeypatch.setattr(cli_method, "time", Fake("clock", perf_counter=lambda: 0.0))  # results.json's seconds
    monkeypatch.setattr(cli_train, "file_collapse_fix", lambda path: "a fix")
    monkeypatch.setattr(cli_method, "result_fix", lambda result: "a fix")
    return calls


def _observe(calls, argv):
    calls.clear()
    code = main(argv)
    return code, list(calls)


@pytest.mark.parametrize("command,action", _commands(),
                         ids=lambda x: x if isinstance(x, str) else "/".join(x.option_strings))
def test_every_option_has_an_effect(library, command, action, capsys):
    flag = action.option_strings[0]
    given = _value(action)
    context = CONTEXT.get((command, flag))
    base = list(BASE[command] if context is None else context)
    before = _observe(library, [command] + base)
    assert before[0] == 0, (command, base, capsys.readouterr().err)
    assert _observe(library, [command] + base) == before  # what is observed does not vary by itself
    if (command, flag) in ALONE:
        base = []
    elif given[0] in base and len(given) == 2:  # an input BASE gives: the run with another value
        i = base.index(given[0])
        base = base[:i] + base[i + 2:]
    after = _observe(library, [command] + base + given)
    err = capsys.readouterr().err
    assert after[0] == EXIT.get((command, flag), 0), (command, given, err)
    assert after != before, f"chameleon {command} {' '.join(given)}: accepted, but nothing it calls changed"


def test_the_harness_catches_an_ignored_option(library, monkeypatch):
    """The class of bug this file is for: `compare --text-field` parsed, then not passed on."""
    import chameleon_ext.cli.compare as cli_compare

    real = cli_compare.cmd_compare

    def dropped(args):
        args.text_field = "text"  # what the old command did: load the data without it
        return real(args)

    monkeypatch.setattr(cli_compare, "cmd_compare", dropped)  # bound when compare's options are built
    assert _observe(library, ["compare", "--text-field", "body"]) == _observe(library, ["compare"])
    monkeypatch.setattr(cli_compare, "cmd_compare", real)
    assert _observe(library, ["compare", "--text-field", "body"]) != _observe(library, ["compare"])
