"""Megatron-LM and NeMo: the ``--data-path`` blend, ``--per-split-data-args-path`` and NeMo's
``PreTrainingDataModule(paths=...)``, which all hold the flattened list ``w1 prefix1 w2 prefix2
...`` that megatron-core's dataset builder reads (NeMo <= 2.7 hands it to megatron-core).

Megatron weights each prefix on its own and normalises the blend. A domain with several
prefixes therefore gets its weight split over them in proportion to their tokens (read from
each ``prefix.idx``), so the domain's total is its weight.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Union

from ..errors import ChameleonUserError
from .paths import Prefixes, megatron_prefix, megatron_tokens, paths_of
from .text import format_weight
from ..mixture import check_named_weights, check_weight_map
from .weights_json import budget_weights

__all__ = ["megatron_blend", "parse_megatron_blend", "megatron_blend_list", "megatron_per_split_args", "nemo_paths"]

SplitPrefixes = Optional[Mapping[str, Mapping[str, Union[str, Sequence[str]]]]]


def megatron_blend_list(weights: Mapping[str, float], prefixes: Prefixes, fmt: str,
                        weighted: bool = True, default_to_name: bool = True) -> List[str]:
    """``["w1", "p1", "w2", "p2", ...]`` (or ``["p1", "p2", ...]``), domains in the order of
    ``weights``, prefixes distinct. A domain with several prefixes contributes one pair per
    prefix, its weight split by the prefixes' tokens."""
    if prefixes is not None and not isinstance(prefixes, Mapping):
        raise ChameleonUserError(f"{fmt}: prefixes must map domain -> prefix, got {type(prefixes).__name__}")
    owner: Dict[str, str] = {}
    out: List[str] = []
    for domain, weight in weights.items():
        if not default_to_name and domain not in prefixes:
            raise ChameleonUserError(f"{fmt}: no path for domain {domain!r}")
        paths = [megatron_prefix(domain, p, fmt) for p in paths_of(domain, prefixes, fmt)]
        for p in paths:
            if p in owner:
                # The trainer would read the same files as two domains and add their weights.
                raise ChameleonUserError(f"{fmt}: domains {owner[p]!r} and {domain!r} share the path {p!r}")
            owner[p] = domain
        if not weighted:
            out += paths
            continue
        if len(paths) == 1:
            out += [format_weight(weight), paths[0]]
            continue
        tokens = [megatron_tokens(domain, p, fmt) for p in paths]
        total = sum(tokens)
        if total == 0:
            raise ChameleonUserError(f"{fmt}: the prefixes of domain {domain!r} hold no tokens")
        for p, t in zip(paths, tokens):
            out += [format_weight(weight * t / total), p]
    return out


def megatron_blend(weights: Mapping[str, float], prefixes: Prefixes = None) -> str:
    """The Megatron-LM ``--data-path`` blend ``"w1 prefix1 w2 prefix2 ..."``.

    Domains keep the order of ``weights``. ``prefixes`` maps domains to their data prefix (the
    path of the ``.bin``/``.idx`` pair without extension) or a list of them; a domain it does
    not name (or every domain, without ``prefixes``) uses its own name; entries for other names
    are ignored. A prefix Megatron would misread (whitespace, a comma, a number) is refused, as
    are two domains sharing a prefix. Weights are not renormalised (Megatron normalises the
    blend itself).
    """
    weights = check_weight_map(weights, what="megatron_blend", relative=True)
    return " ".join(megatron_blend_list(weights, prefixes, "megatron"))


def parse_megatron_blend(blend: str) -> Dict[str, float]:
    """Inverse of :func:`megatron_blend`: ``"w1 p1 w2 p2 ..."`` -> ``{p1: w1, p2: w2, ...}``."""
    if not isinstance(blend, str):
        raise ChameleonUserError(f"Megatron blend must be a string, got {type(blend).__name__}")
    tokens = blend.split()
    if not tokens:
        raise ChameleonUserError("Megatron blend string is empty")
    if len(tokens) % 2:
        raise ChameleonUserError(
            f"Megatron blend must alternate weight and prefix (an even number of tokens), got {len(tokens)} tokens"
        )
    weights = [_number_or_text(w) for w in tokens[0::2]]
    # Megatron normalises the blend: relative weights, one message per fault as everywhere
    return check_named_weights(tokens[1::2], weights, what="Megatron blend", relative=True)


def _number_or_text(text: str):
    """A weight token as a float, or the text itself when it is none (the check names it)."""
    try:
        return float(text)
    except ValueError:
        return text



# -- per-split arguments and NeMo -------------------------------------------------------------


def _split_table(split_prefixes: SplitPrefixes, names: Sequence[str], fmt: str) -> Dict[str, Mapping]:
    if split_prefixes is None:
        return {}
    if not isinstance(split_prefixes, Mapping):
        raise ChameleonUserError(f"{fmt}: split_prefixes must map split -> {{domain: path}}")
    unknown = [s for s in split_prefixes if s not in names]
    if unknown:
        raise ChameleonUserError(f"{fmt}: unknown split(s) {unknown} in split_prefixes; expected {list(names)}")
    return {s: split_prefixes[s] for s in names if split_prefixes.get(s) is not None}


def _check_split_domains(table: Mapping, weights: Mapping[str, float], split: str, fmt: str) -> None:
    if not isinstance(table, Mapping):
        raise ChameleonUserError(f"{fmt}: split_prefixes[{split!r}] must map domain -> path")
    missing = [d for d in weights if d not in table]
    if missing:
        raise ChameleonUserError(f"{fmt}: split_prefixes[{split!r}] has no path for domains {missing}")


def megatron_per_split_args(weights: Mapping[str, float], prefixes: Prefixes = None,
                            split_prefixes: SplitPrefixes = None, budget=None) -> dict:
    """The JSON object for Megatron-LM ``--per-split-data-args-path``.

    ``{"train": ["w1", "prefix1", ...], "valid": [...] or null, "test": [...] or null}``: each
    split is megatron-core's flattened, zipped list of weights (as strings) and data prefixes.
    ``valid`` and ``test`` use the same weights over ``split_prefixes["valid"|"test"]``; without
    them they are null, and Megatron builds no dataset for that split (it then trains without
    evaluation: pass held-out prefixes to evaluate).
    """
    fmt = "megatron-per-split"
    weights = budget_weights(weights, budget, fmt)
    out: dict = {"train": megatron_blend_list(weights, prefixes, fmt), "valid": None, "test": None}
    for split, table in _split_table(split_prefixes, ("valid", "test"), fmt).items():
        _check_split_domains(table, weights, split, fmt)
        out[split] = megatron_blend_list(weights, table, fmt, default_to_name=False)
    return out


def nemo_paths(weights: Mapping[str, float], prefixes: Prefixes = None,
               split_prefixes: SplitPrefixes = None, budget=None) -> Union[list, dict]:
    """The ``paths`` argument of NeMo 2's ``PreTrainingDataModule``.

    Without ``split_prefixes``: the flattened, zipped list ``["w1", "prefix1", ...]``, from which
    NeMo draws train, validation and test by its ``split`` argument. With them: ``{"train":
    [weighted list], "validation": [prefixes], "test": [prefixes]}``; validation and test list the
    held-out prefixes without weights (NeMo documents that a full validation pass must not be
    weighted), so each domain's held-out set is evaluated whole.
    """
    fmt = "nemo"
    weights = budget_weights(weights, budget, fmt)
    train = megatron_blend_list(weights, prefixes, fmt)
    tables = _split_table(split_prefixes, ("validation", "test"), fmt)
    if not tables:
        return train
    out: dict = {"train": train}
    for split in ("validation", "test"):
        if split not in tables:
            raise ChameleonUserError(f"nemo: split_prefixes must give both 'validation' and 'test' (missing {split!r})")
        _check_split_domains(tables[split], weights, split, fmt)
        out[split] = megatron_blend_list(weights, tables[split], fmt, weighted=False, default_to_name=False)
    return out
