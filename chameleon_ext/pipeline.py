"""The method end to end: proxy -> domain embeddings -> weights -> files other trainers read
(docs/method.md, steps 1-6).

The command line (``chameleon``) is a thin layer over these functions:

    proxy = train_proxy(dataset, out_dir="runs/proxy")                 # uniform mixture
    result = compute_weights(dataset, proxy_path, out_dir="runs/w")   # weights.json & co.
    compare_mixtures(dataset, {"uniform": ..., "chameleon": ...})     # base models, perplexity
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Dict, Mapping, Optional, Sequence

from . import distributed, io, mixture
from ._version import __version__
from .budget import TokenCount, plan_token_budget
from .data.tokenizer import HFTokenizer, check_same_tokenizer, has_tokenizer_files, load_tokenizer, tokenizer_record
from .embed import WINDOW_EMBEDDINGS_NAME, DomainEmbeddings, EmbedConfig, cache_reuse_line, embed_domains
from .errors import ChameleonUserError
from .exports import WEIGHTS_FORMAT, load_weights, trainer_weights, write_exports
from .formats.weights_json import write_weights_json
from .manifest import begin_set, finish_set
from .model import GPT, HF_MODEL_FILES, GPTConfig, load_hf_model, load_model
from .plots import plot_affinity, plot_bootstrap, plot_weights
from .trainer import TrainConfig, evaluate, train
from .weights import DEFAULT_RULE, DomainWeights, rule_settings, weights_from_embeddings as _weights_from_embeddings

__all__ = [
    "DEFAULT_PRESET",
    "DEFAULT_BLOCK_SIZE",
    "check_weight_options",
    "train_proxy",
    "load_proxy",
    "load_proxy_and_tokenizer",
    "resolve_proxy_path",
    "compute_weights",
    "assess_weights",
    "weights_for_domains",
    "write_weights",
    "read_weights",
    "compare_mixtures",
]

# "transfer": new or changed domains with the proxy frozen; the pretraining rule applies.
# The model every command creates unless told otherwise: the small preset at 128 tokens (what
# `make run` and `chameleon run` use (docs/cli.md, "Defaults"); TrainConfig holds the optimiser's defaults).
DEFAULT_PRESET = "small"
DEFAULT_BLOCK_SIZE = 128


def train_proxy(dataset, out_dir: str, preset: str = DEFAULT_PRESET, block_size: int = DEFAULT_BLOCK_SIZE,
                config: Optional[TrainConfig] = None, model_overrides: Optional[dict] = None,
                seed: int = 0, notice: Optional[Callable[[str], None]] = None) -> str:
    """Train a proxy GPT on the uniform mixture; return the path of its ``model.pt``.
    ``notice``: given the trainer's line when the run in ``out_dir`` was already complete (at or
    past ``config.steps``), so a quiet caller still says that nothing was trained."""
    cfg = config or TrainConfig(out_dir=out_dir, seed=seed, block_size=block_size)
    cfg.out_dir = out_dir
    model = GPT(GPTConfig.preset(preset, dataset.vocab_size, block_size, **(model_overrides or {})), seed=seed)
    result = train(model, dataset, "uniform", cfg)
    if result["complete"] and notice is not None:
        notice(result["notices"][-1])
    return result["model_path"] or os.path.join(out_dir, "model.pt")


def resolve_proxy_path(path) -> tuple:
    """``(kind, path)`` of a ``--proxy`` argument: ``("gpt", file)`` for a chameleon_ext
    ``model.pt``/``ckpt.pt`` (a folder holding ``model.pt``, such as the one ``train-proxy``
    writes, means that file) or ``("hf", folder)`` for a Hugging Face model folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("model.pt", "ckpt.pt"):  # what train-proxy writes, final model first
            if os.path.isfile(os.path.join(path, name)):
                return "gpt", os.path.join(path, name)
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf", path
        raise ChameleonUserError(
            f"proxy: the folder {path!r} holds neither a chameleon_ext model.pt nor a Hugging Face "
            "model (config.json + weights)"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) in HF_MODEL_FILES or path.endswith(".safetensors"):
        if os.path.isfile(os.path.join(folder, "config.json")):
            raise ChameleonUserError(
                f"proxy: {path!r} is a file of a Hugging Face model; pass its folder instead: --proxy {folder}"
            )
    return "gpt", path


def load_proxy(path: str, device="cpu", tokenizer=None):
    """A proxy from a chameleon_ext ``model.pt``/``ckpt.pt`` (or the folder holding it), or a
    local Hugging Face model folder (its base model, see :class:`~chameleon_ext.model.HFCausalLM`).

    The proxy's ``tokenizer_record`` says which tokenizer its input must come from, and
    :func:`~chameleon_ext.embed.embed_domains` refuses data tokenised otherwise: for a
    chameleon_ext model, the tokenizer recorded in the file at training time (``tokenizer``,
    if given, must be the same); for a Hugging Face folder, ``tokenizer`` if given (an
    explicit override), else the tokenizer saved in the folder.
    """
    proxy, _ = load_proxy_and_tokenizer(path, tokenizer, device=device, need_tokenizer=False)
    return proxy


def load_proxy_and_tokenizer(path: str, tokenizer=None, device="cpu", need_tokenizer: bool = True):
    """``(proxy, tokenizer)``: the proxy at ``path`` and the tokenizer to tokenise data with.

    ``tokenizer``: ``None`` (use the proxy's own: the one a chameleon_ext ``model.pt``
    records, or the one saved in a Hugging Face folder), ``"byte"``, a tokenizer folder or
    object. Errors: a Hugging Face folder without tokenizer files and no ``tokenizer``; a
    ``tokenizer`` different from the one a chameleon_ext proxy records (naming both); a
    recorded tokenizer folder that is gone or changed. With ``need_tokenizer=False`` a proxy
    whose tokenizer cannot be found loads anyway (the tokenizer is then None).
    """
    kind, path = resolve_proxy_path(path)
    if kind == "hf":
        # the tokenizer first: its errors come before loading a possibly large model
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)  # an explicit override of the folder's tokenizer
        elif has_tokenizer_files(path):
            tok = HFTokenizer(path)
        elif need_tokenizer:
            raise ChameleonUserError(
                f"tokenizer: the Hugging Face proxy folder {path!r} holds no tokenizer files (tokenizer.json, "
                "vocab.json + merges.txt, ...); pass --tokenizer FOLDER with the tokenizer the model was trained with"
            )
        else:
            tok = None
        proxy = load_hf_model(path, map_location=device)
        proxy.tokenizer_record = None if tok is None else tokenizer_record(tok)
        return proxy, tok

    proxy = load_model(path, map_location=device)
    recorded = proxy.tokenizer_record
    what = f"the proxy {path!r}"
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if recorded:
            check_same_tokenizer(recorded, tok, what)
        return proxy, tok
    if not recorded or recorded.get("path") is None:
        # no record (a model.pt from before tokenizers were recorded, or pre-tokenised data):
        # the byte tokenizer, chameleon_ext's default; a recorded byte tokenizer is checked
        tok = load_tokenizer("byte")
        if recorded:
            check_same_tokenizer(recorded, tok, what)
        return proxy, tok
    folder = recorded["path"]
    if not os.path.isdir(folder):
        if not need_tokenizer:
            return proxy, None
        raise ChameleonUserError(
            f"tokenizer: {what} was trained with the tokenizer in {folder!r}, which no longer exists; "
            "pass --tokenizer FOLDER holding that tokenizer"
        )
    tok = HFTokenizer(folder)
    check_same_tokenizer(recorded, tok, what)
    return proxy, tok


# The command-line option of each mixture setting, added to the mixture module's messages.
_OPTION_OF = {"mode": "--mode", "rule": "--rule", "lambda": "--lam", "temperature": "--temperature",
              "share": "--share", "smoothing": "--smoothing"}


def check_weight_options(mode: str, lam=None, temperature: Optional[float] = None, rule: str = DEFAULT_RULE,
                         share: Optional[float] = None, smoothing: Optional[float] = None) -> None:
    """Raise ChameleonUserError for a bad mode, rule, lambda, temperature, share or smoothing
    (before any work is done). ``None`` stands for the rule's default. The checks are
    :mod:`chameleon_ext.mixture`'s; the message gains the option's name ("lambda (--lam): ...")."""
    try:
        direction = mixture.rule_of_mode(mode)
        rule_settings(mixture.check_rule(rule), direction, lam, temperature, share, smoothing)
    except ChameleonUserError as exc:
        name, _, rest = str(exc).partition(":")
        if name not in _OPTION_OF:
            raise
        raise ChameleonUserError(f"{name} ({_OPTION_OF[name]}):{rest}") from None


def weights_for_domains(emb: DomainEmbeddings, mode: str = "pretrain", lam=None,
                        temperature: Optional[float] = None, normalize: bool = True, rule: str = DEFAULT_RULE,
                        share: Optional[float] = None, smoothing: Optional[float] = None,
                        notice: Optional[Callable[[str], None]] = None) -> DomainWeights:
    """:func:`chameleon_ext.weights_from_embeddings` for a :class:`DomainEmbeddings`, with the
    pipeline's modes (``transfer`` applies the pretraining rule) and user-facing errors.
    ``rule="paper"`` is the paper's method; ``None`` settings are the rule's defaults.
    ``notice``: given the library's remarks (one domain, identical embeddings) as ``note:``
    lines instead of warnings, so a command line prints them its own way (or not, quiet)."""
    check_weight_options(mode, lam, temperature, rule, share, smoothing)
    mixture.check_domain_names(emb.domains)
    direction = mixture.rule_of_mode(mode)
    with _library_notes(notice), _leverage_errors():
        result = _weights_from_embeddings(emb.embeddings, direction, lam=lam, temperature=temperature,
                                          normalize=normalize, domains=emb.domains, rule=rule, share=share,
                                          smoothing=smoothing)
    result.mode = mode
    return result


@contextlib.contextmanager
def _library_notes(notice: Optional[Callable[[str], None]]):
    """Collects the UserWarnings of the block (the weights' remarks) and hands each to
    ``notice`` as a ``note:`` line; without ``notice`` they are warned as before."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if notice is not None and issubclass(w.category, UserWarning):
            notice(f"note: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def sweep_for_domains(emb: DomainEmbeddings, lams: Sequence[float], temperatures: Optional[Sequence[float]] = None,
                      mode: str = "pretrain", normalize: bool = True, rule: str = DEFAULT_RULE,
                      smoothing: Optional[float] = None, notice: Optional[Callable[[str], None]] = None):
    """:func:`chameleon_ext.uncertainty.sweep_weights` for a :class:`DomainEmbeddings`, checked
    as :func:`weights_for_domains` checks one (lambda, temperature): the same options and
    the same one-line error for a lambda too small for the embeddings."""
    from .uncertainty import sweep_weights

    for lam in lams:
        for temperature in (temperatures or [None]):
            check_weight_options(mode, lam, temperature, rule, None, smoothing)
    with _library_notes(notice), _leverage_errors():
        return sweep_weights(emb.embeddings, lams, temperatures, mode=mode, normalize=normalize, domains=emb.domains,
                             rule=rule, smoothing=smoothing)


@contextlib.contextmanager
def _leverage_errors():
    """The leverage computation's ValueError (krls: a lambda below the rounding level of the
    affinity, non-finite embeddings) as a ChameleonUserError naming the embeddings."""
    try:
        yield
    except ChameleonUserError:
        raise
    except ValueError as exc:
        raise ChameleonUserError(f"domain embeddings: {exc}") from None


def check_resamples(resamples) -> int:
    """Raise ChameleonUserError unless ``resamples`` (``--bootstrap``) is an integer >= 0."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 0:
        raise ChameleonUserError(f"bootstrap (--bootstrap): expected an integer >= 0 (0: no bootstrap), "
                                 f"got {resamples!r}")
    return resamples


def assess_weights(result: DomainWeights, emb: DomainEmbeddings, resamples: Optional[int] = None,
                   seed: int = 0) -> DomainWeights:
    """How far to trust ``result`` (docs/uncertainty.md): bootstrap intervals over the
    windows (``resamples`` of them, default :data:`chameleon_ext.uncertainty.DEFAULT_RESAMPLES`;
    0, or embeddings without per-window means, skips them) and the diagnostics, set as
    ``result.bootstrap`` and ``result.diagnostics``. Returns ``result``."""
    from .uncertainty import DEFAULT_RESAMPLES, bootstrap_weights, diagnose

    resamples = check_resamples(DEFAULT_RESAMPLES if resamples is None else resamples)
    boot = None
    with _leverage_errors():
        if resamples > 0 and emb.windows is not None:
            boot = bootstrap_weights(emb.windows, resamples=resamples, seed=seed, point=result)
        result.bootstrap = boot
        result.diagnostics = diagnose(result, emb.embeddings, boot)
    return result


def weights_document(result: DomainWeights, emb: DomainEmbeddings, proxy: Optional[dict] = None) -> dict:
    """The weights.json document (format :data:`chameleon_ext.exports.WEIGHTS_FORMAT`), with
    ``bootstrap`` (null when it did not run) and ``diagnostics`` (always; computed here when
    :func:`assess_weights` has not run)."""
    from .uncertainty import diagnose

    doc = {"format": WEIGHTS_FORMAT, "method": "chameleon", "version": __version__}
    doc.update(result.as_dict())
    doc["proxy"] = proxy or {}
    doc["embedding"] = {k: emb.settings.get(k) for k in ("n_windows", "window", "seed", "pooling", "layer", "split",
                                                          "batch_size", "precision")}
    doc["embedding"]["counts"] = dict(zip(emb.domains, emb.counts))
    doc["embedding"]["embedded_now"] = list(emb.computed)
    doc["bootstrap"] = result.bootstrap.to_dict() if result.bootstrap is not None else None
    diagnostics = result.diagnostics if result.diagnostics is not None else diagnose(result, emb.embeddings)
    doc["diagnostics"] = diagnostics.to_dict()
    return doc


def write_weights(out_dir: str, result: DomainWeights, emb: DomainEmbeddings, proxy: Optional[dict] = None,
                  plots: bool = True, exports: bool = True,
                  notice: Optional[Callable[[str], None]] = None, budget: Optional[dict] = None) -> Dict[str, str]:
    """Write ``weights.json``, ``domain_embeddings.pt`` (and ``window_embeddings.pt`` when
    ``emb`` has per-window means), the exports and the pictures as one output set (:mod:`chameleon_ext.manifest`): a kill part-way leaves a folder every reader
    refuses, never a new weights.json beside an older run's exports.

    An export the domain names cannot go into (whitespace in a Megatron prefix) is skipped
    with a line to ``notice`` (default: a warning); the other files are written.

    ``budget``: a token-budget plan (:meth:`chameleon_ext.budget.BudgetPlan.as_dict`) recorded
    under ``budget``; the trainer exports then carry its achievable weights."""
    doc = weights_document(result, emb, proxy)
    if budget is not None:
        doc["budget"] = budget
    io.check_writable_folder(out_dir, "weights output folder")
    begin_set(out_dir)
    paths = {"weights": write_weights_json(os.path.join(out_dir, "weights.json"), doc)}
    emb_path = os.path.join(out_dir, "domain_embeddings.pt")
    emb.save(emb_path)
    paths["embeddings"] = emb_path
    if emb.windows is not None:
        paths["window_embeddings"] = os.path.join(out_dir, WINDOW_EMBEDDINGS_NAME)
        emb.save_windows(paths["window_embeddings"])
    if exports:
        say = notice or (lambda line: warnings.warn(line, stacklevel=3))
        paths.update(write_exports(doc, out_dir, on_skip=say))
    if plots:
        title = (f"Chameleon {result.mode} weights ({result.rule} rule, lambda={result.lam:.3g}, "
                 f"T={result.temperature:g}, smoothing={result.smoothing:g})")
        if result.bootstrap is not None:  # the same picture with the intervals as error bars
            p = plot_bootstrap(result.bootstrap, os.path.join(out_dir, "weights.png"), title=title)
        else:
            p = plot_weights(result.domains, result.weights.tolist(), os.path.join(out_dir, "weights.png"),
                             title=title, scores=result.leverage.tolist())
        if p:
            paths["weights_png"] = p
        p = plot_affinity(result.domains, result.affinity.numpy(), os.path.join(out_dir, "affinity.png"),
                          title="Centred affinity of the domain embeddings")
        if p:
            paths["affinity_png"] = p
    paths["manifest"] = finish_set(out_dir, paths.values())
    return paths


def read_weights(path: str, domains: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """``{domain: weight}`` from a weights.json, checked against ``domains`` when given: the
    weights a trainer follows, i.e. the budget's achievable weights when the file has a token
    budget (the requested ones would over-read a capped domain)."""
    doc = load_weights(path)
    weights = trainer_weights(doc)
    if domains is not None:  # unknown: only in the weights; missing: only in the data
        mixture.check_same_domains(list(domains), list(weights), f"weights file {path!r} and the data")
    return weights


def compute_weights(dataset, proxy_path: str, out_dir: str, mode: str = "pretrain", lam=None,
                    temperature: Optional[float] = None, normalize: bool = True,
                    embed_config: Optional[EmbedConfig] = None, device=None, cache_dir: Optional[str] = None,
                    plots: bool = True, progress: bool = False, group=None, proxy=None,
                    notice: Optional[Callable[[str], None]] = None, token_budget: Optional[int] = None,
                    max_epochs: Optional[float] = None, bootstrap: Optional[int] = None,
                    bootstrap_seed: Optional[int] = None, rule: str = DEFAULT_RULE, share: Optional[float] = None,
                    smoothing: Optional[float] = None):
    """Embed the domains with the proxy (cached), compute the weights, write the files.

    ``rule``, ``lam``, ``temperature``, ``share``, ``smoothing``: as in
    :func:`chameleon_ext.weights_from_embeddings` (``rule="paper"``: the paper's method).

    ``bootstrap``: resamples of the windows for the intervals (default
    :data:`chameleon_ext.uncertainty.DEFAULT_RESAMPLES`; 0: none), seeded with
    ``bootstrap_seed`` (default: the embedding seed); see :func:`assess_weights`. On rank 0 the
    returned weights carry ``.bootstrap`` and ``.diagnostics`` (both also in weights.json).

    ``proxy``: the model already loaded from ``proxy_path``, if the caller has it (loading
    verifies the file's hash, which costs a pass over a large proxy).
    ``token_budget`` (with an optional repetition cap ``max_epochs``) adds a token-budget plan
    (:func:`plan_budget`) to weights.json.
    Returns ``(DomainWeights, DomainEmbeddings, paths)``; only rank 0 writes.
    """
    from .uncertainty import DEFAULT_RESAMPLES

    check_weight_options(mode, lam, temperature, rule, share, smoothing)
    bootstrap = check_resamples(DEFAULT_RESAMPLES if bootstrap is None else bootstrap)
    if proxy is None:
        proxy = load_proxy(proxy_path, device="cpu")
    if cache_dir is None:
        cache_dir = os.path.join(getattr(dataset, "cache_dir", None) or out_dir, "embeddings")
    emb = embed_domains(proxy, dataset, embed_config, device=device, cache_dir=cache_dir, group=group,
                        progress=progress, windows=bootstrap > 0)
    reuse = cache_reuse_line(emb, cache_dir)
    if reuse is not None and notice is not None and distributed.info(group).is_main:
        notice(reuse)
    result = weights_for_domains(emb, mode, lam, temperature, normalize, rule, share, smoothing, notice=notice)
    budget = plan_budget(dataset, result, token_budget, max_epochs) if token_budget is not None else None
    paths = {}
    if distributed.info(group).is_main:
        seed = (embed_config or EmbedConfig()).seed if bootstrap_seed is None else bootstrap_seed
        assess_weights(result, emb, bootstrap, seed)
        proxy_info = {"path": os.path.abspath(proxy_path), "sha256": emb.settings["proxy_sha256"],
                      "layer": emb.settings["layer"], "n_layer": getattr(proxy, "n_layer", None)}
        paths = write_weights(out_dir, result, emb, proxy_info, plots=plots, notice=notice,
                              budget=budget.as_dict() if budget is not None else None)
        if budget is not None and notice is not None:
            notice(budget.format())
    distributed.barrier(group)
    return result, emb, paths


def plan_budget(dataset, result: DomainWeights, token_budget: int, max_epochs: Optional[float] = None):
    """The token-budget plan of ``result``'s weights over ``dataset``'s training tokens
    (counted exactly from the token caches and pre-tokenised files; estimated from a sample
    for streamed domains, and recorded as such): target tokens and epochs per domain, with
    repetition capped at ``max_epochs`` (:func:`chameleon_ext.budget.plan_token_budget`)."""
    def count(d):
        c = dataset.token_count(d, "train") if hasattr(dataset, "token_count") else None
        if c is None or c.source == "counted":
            return TokenCount(dataset.n_tokens(d, "train"), "counted (training split)")
        return TokenCount(c.tokens, f"{c.source} (training split)")

    counts = {d: count(d) for d in result.domains}
    return plan_token_budget(dict(zip(result.domains, result.weights.tolist())), counts, token_budget, max_epochs)


def compare_mixtures(dataset, mixtures: Mapping[str, object], out_dir: str, preset: str = DEFAULT_PRESET,
                     block_size: int = DEFAULT_BLOCK_SIZE, config: Optional[TrainConfig] = None,
                     eval_windows: Optional[int] = None, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Train one base model per mixture on the same token budget and return the per-domain
    validation perplexity table ``{mixture: {domain: ppl, ..., "average": ppl}}``.
    ``eval_windows`` defaults to the config's (``TrainConfig.eval_windows``)."""
    if eval_windows is None:
        eval_windows = (config or TrainConfig()).eval_windows
    table = {}
    for name, weights in mixtures.items():
        cfg = TrainConfig(**{**(config or TrainConfig()).to_dict(), "out_dir": os.path.join(out_dir, name),
                             "block_size": block_size, "seed": seed})
        model = GPT(GPTConfig.preset(preset, dataset.vocab_size, block_size), seed=seed)
        train(model, dataset, weights, cfg)
        ev = evaluate(model, dataset, eval_windows, block_size, seed=seed, device=cfg.device)
        table[name] = {d: ev[d]["ppl"] for d in dataset.domains}
        table[name]["average"] = ev["average"]["mean_ppl"]
    return table

