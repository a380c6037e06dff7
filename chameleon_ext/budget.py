"""Token budgets and repetition caps: what a mixture asks of each domain, and what it can get.

Chameleon can weight a small domain far beyond its size (on the built-in data one domain gets
54%). Given a training budget of ``N`` tokens and each domain's token count ``n_i``, a mixture
``w`` asks domain ``i`` for ``w_i N`` tokens, i.e. ``w_i N / n_i`` epochs over it.

Repetition cap (``max_epochs = r``). No domain may be read more than ``r`` times: its target is
at most ``c_i = r n_i`` tokens. A domain whose share would exceed its cap is pinned at the cap,
and the tokens it cannot supply go to the uncapped domains in proportion to their weights; as
that raises their shares, more of them may hit their caps, so the step repeats until no new
domain is capped (at most k rounds; each round caps at least one more domain). This is the
"water-filling" solution:

    t_i = min(c_i, s w_i N)   with the one scale s >= 1 that makes sum_i t_i = N,

so uncapped domains keep their requested relative proportions exactly. OLMo-core's
``max_repetition_ratio`` expresses the same cap (``population x max_repetition_ratio`` tokens
per source); OLMo-core itself refuses a mixture that needs more, rather than redistributing, so
the achievable weights computed here are what its ``target_ratio`` should be set to.

When even capping every weighted domain cannot fill the budget (``sum_i c_i < N`` over domains
with ``w_i > 0``), there is no mixture to train on and :func:`plan_token_budget` raises a
:class:`~chameleon_ext.errors.ChameleonUserError` naming the budget, the caps and the shortfall.

Token counts may be exact or estimated (e.g. from the sampled windows when counting would read a
terabyte corpus); each count carries its ``source`` so the report says which numbers are guesses.

:func:`token_share_report` is the other end: the trainer counts the tokens it actually drew
from each domain and compares their shares with the target weights at the end of a run.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Union

from .errors import ChameleonUserError
from .mixture import check_same_domains, check_weight_map

__all__ = [
    "TokenCount",
    "DomainBudget",
    "BudgetPlan",
    "cap_repetition",
    "plan_token_budget",
    "DomainTokenShare",
    "TokenShareReport",
    "token_share_report",
    "DomainTokenCounter",
]

# A count given as a bare integer was counted, not estimated.
COUNTED = "counted"


@dataclass(frozen=True)
class TokenCount:
    """A domain's size in tokens and where the number comes from ("counted", or e.g.
    "estimated from 2048 sampled windows"). A counted size must be a whole number; an estimate
    may be fractional and is rounded to the nearest token."""

    tokens: int
    source: str = COUNTED


@dataclass(frozen=True)
class DomainBudget:
    """One domain's line of a :class:`BudgetPlan`."""

    domain: str
    requested_weight: float  # the mixture's weight, normalised to sum 1
    achievable_weight: float  # its share after the repetition cap, target_tokens / budget
    token_count: int  # n_i
    token_count_source: str
    target_tokens: int  # whole tokens; the targets sum to the budget exactly
    epochs: float  # target_tokens / token_count (0 for an empty, unweighted domain)
    capped: bool  # at its cap max_epochs * token_count: it cannot take a token more
    cap_tokens: Optional[int]  # floor(max_epochs * token_count), None without a cap


@dataclass
class BudgetPlan:
    """Targets for a token budget: per-domain lines in the mixture's domain order."""

    token_budget: int
    max_epochs: Optional[float]
    domains: List[DomainBudget] = field(default_factory=list)

    def _column(self, name: str) -> dict:
        return {d.domain: getattr(d, name) for d in self.domains}

    @property
    def requested_weights(self) -> Dict[str, float]:
        return self._column("requested_weight")

    @property
    def achievable_weights(self) -> Dict[str, float]:
        return self._column("achievable_weight")

    @property
    def target_tokens(self) -> Dict[str, int]:
        return self._column("target_tokens")

    @property
    def epochs(self) -> Dict[str, float]:
        return self._column("epochs")

    @property
    def capped_domains(self) -> List[str]:
        return [d.domain for d in self.domains if d.capped]

    def as_dict(self) -> dict:
        """A JSON-ready record (the ``budget`` block of weights.json): the budget, the cap and,
        per domain, requested and achievable weights, tokens, epochs and whether it was capped."""
        return {
            "token_budget": self.token_budget,
            "max_epochs": self.max_epochs,
            "capped_domains": self.capped_domains,
            "requested_weights": self.requested_weights,
            "achievable_weights": self.achievable_weights,
            "target_tokens": self.target_tokens,
            "epochs": self.epochs,
            "token_counts": self._column("token_count"),
            "token_count_sources": self._column("token_count_source"),
        }

    def format(self) -> str:
        """A table for the terminal, one line per domain."""
        width = max(6, max(len(d.domain) for d in self.domains))
        cap = "none" if self.max_epochs is None else f"{self.max_epochs:g} epochs"
        lines = [f"token budget {self.token_budget:,} tokens, repetition cap {cap}",
                 f"{'domain':<{width}}  {'requested':>9}  {'achievable':>10}  {'target tokens':>15}  "
                 f"{'tokens':>15}  {'epochs':>8}"]
        for d in self.domains:
            note = " (capped)" if d.capped else ""
            estimate = "" if d.token_count_source == COUNTED else f" [{d.token_count_source}]"
            lines.append(f"{d.domain:<{width}}  {d.requested_weight:>9.4f}  {d.achievable_weight:>10.4f}  "
                         f"{d.target_tokens:>15,}  {d.token_count:>15,}  {d.epochs:>8.3f}{note}{estimate}")
        return "\n".join(lines)


# -- validation ------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ChameleonUserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif math.isfinite(value) and float(value).is_integer():  # 1e9 from a config file
        value = int(value)
    else:
        raise ChameleonUserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ChameleonUserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_max_epochs(max_epochs) -> Optional[float]:
    if max_epochs is None:
        return None
    ok = isinstance(max_epochs, numbers.Real) and not isinstance(max_epochs, bool)
    if not ok or not math.isfinite(max_epochs) or max_epochs <= 0:
        raise ChameleonUserError(f"max_epochs must be a finite number > 0 (or None for no cap), got {max_epochs!r}")
    return float(max_epochs)


def _check_counts(token_counts, domains: List[str]) -> Dict[str, TokenCount]:
    if not isinstance(token_counts, Mapping):
        raise ChameleonUserError(
            f"token_counts must map domain -> token count, got {type(token_counts).__name__}")
    # unknown: counted but not weighted; missing: weighted but not counted
    check_same_domains(domains, list(token_counts), "token_counts")
    out = {}
    for d in domains:
        c = token_counts[d]
        if isinstance(c, Mapping):  # {"tokens": n, "source": "..."} as read back from JSON
            if "tokens" not in c:
                raise ChameleonUserError(f"token count of domain {d!r} has no 'tokens' entry: {dict(c)!r}")
            c = TokenCount(c["tokens"], str(c.get("source", COUNTED)))
        elif not isinstance(c, TokenCount):
            c = TokenCount(c)
        tokens = c.tokens
        if c.source != COUNTED and isinstance(tokens, numbers.Real) and not isinstance(tokens, bool) \
                and math.isfinite(tokens) and tokens >= 0:
            tokens = round(tokens)  # an estimate (e.g. size x tokens per byte) need not be whole
        out[d] = TokenCount(_check_int(f"token count of domain {d!r}", tokens, 0), c.source)
    return out


# -- the cap ---------------------------------------------------------------------------------


def cap_repetition(weights: Mapping[str, float], token_counts: Mapping[str, float],
                   token_budget: float, max_epochs: Optional[float]) -> tuple:
    """Water-filling of a budget under per-domain caps (plain floats, no rounding).

    Returns ``(targets, capped)``: target tokens per domain (floats summing to the budget) and
    the list of capped domains, in the order of ``weights``. Raises ChameleonUserError when the
    caps of all weighted domains together hold fewer tokens than the budget.
    """
    total_weight = math.fsum(weights.values())
    share = {d: w / total_weight for d, w in weights.items()}
    if max_epochs is None:
        return {d: s * token_budget for d, s in share.items()}, []
    cap = {d: max_epochs * token_counts[d] for d in weights}
    weighted = [d for d in weights if share[d] > 0]
    capacity = math.fsum(cap[d] for d in weighted)
    if capacity < token_budget:
        worst = sorted(weighted, key=lambda d: share[d] * token_budget - cap[d], reverse=True)[:3]
        detail = ", ".join(f"{d!r} needs {share[d] * token_budget:,.0f} but holds {cap[d]:,.0f} "
                           f"({max_epochs:g} x {token_counts[d]:,})" for d in worst)
        raise ChameleonUserError(
            f"token budget {token_budget:,} is infeasible with max_epochs {max_epochs:g}: even capping "
            f"every weighted domain gives only {capacity:,.0f} tokens ({token_budget - capacity:,.0f} short); "
            f"{detail}. Lower the budget to at most {math.floor(capacity):,} tokens, raise max_epochs to at "
            f"least {max_epochs * token_budget / capacity:.4g}, or add data")
    capped: List[str] = []
    while True:
        free = [d for d in weighted if d not in capped]
        remaining = token_budget - math.fsum(cap[d] for d in capped)
        free_weight = math.fsum(share[d] for d in free)
        if not free or free_weight <= 0:
            break
        scale = remaining / free_weight  # tokens per unit of weight for the uncapped domains
        newly = [d for d in free if share[d] * scale > cap[d]]
        if not newly:
            break
        capped += newly
    targets = {}
    for d in weights:
        if d in capped:
            targets[d] = cap[d]
        elif share[d] > 0:
            targets[d] = share[d] * scale
            # Filled to its cap by the redistribution (to rounding): it is capped too, since
            # it cannot take a token more.
            if targets[d] >= cap[d] * (1 - 1e-12):
                targets[d] = cap[d]
                capped.append(d)
        else:
            targets[d] = 0.0
    return targets, [d for d in weights if d in capped]


def _whole_tokens(targets: Dict[str, float], limits: Dict[str, Optional[int]], budget: int) -> Dict[str, int]:
    """Round the targets to whole tokens summing to ``budget`` (largest remainder), never above
    a domain's limit."""
    whole = {d: min(math.floor(t), limits[d]) if limits[d] is not None else math.floor(t)
             for d, t in targets.items()}
    short = budget - sum(whole.values())
    order = sorted(targets, key=lambda d: (targets[d] - whole[d]), reverse=True)
    while short > 0:
        progressed = False
        for d in order:
            if short == 0:
                break
            if targets[d] <= 0 or (limits[d] is not None and whole[d] >= limits[d]):
                continue
            whole[d] += 1
            short -= 1
            progressed = True
        if not progressed:
            raise ChameleonUserError(
                f"token budget {budget:,} cannot be met in whole tokens: the capped domains' floors "
                f"leave {short:,} tokens unplaced; lower the budget by that much")
    return whole


def plan_token_budget(weights: Mapping[str, float],
                      token_counts: Mapping[str, Union[int, TokenCount, Mapping]],
                      token_budget: int, max_epochs: Optional[float] = None) -> BudgetPlan:
    """Each domain's target tokens and epochs for ``token_budget`` tokens, with repetition capped
    at ``max_epochs`` (None: no cap, epochs may exceed 1 and are only reported).

    Args:
        weights: domain -> weight (>= 0, normalised here), in the order the plan keeps.
        token_counts: domain -> tokens, as an int, a :class:`TokenCount` or
            ``{"tokens": n, "source": "..."}``; exactly the domains of ``weights``.
        token_budget: total training tokens N (an integer >= 1).
        max_epochs: the cap r > 0; a domain never gets more than ``r x`` its tokens.

    Raises:
        ChameleonUserError: bad input, a weighted domain with no tokens and no cap, or a budget
            that cannot be filled under the cap (the message names the numbers).
    """
    weights = check_weight_map(weights, what="plan_token_budget", relative=True)
    domains = list(weights)
    counts = _check_counts(token_counts, domains)
    token_budget = _check_int("token_budget", token_budget, 1)
    max_epochs = _check_max_epochs(max_epochs)
    total_weight = math.fsum(weights.values())
    if max_epochs is None:
        empty = [d for d in domains if weights[d] > 0 and counts[d].tokens == 0]
        if empty:
            raise ChameleonUserError(
                f"domains {empty} have weight but no tokens: without max_epochs they would be repeated "
                "without end; drop them or pass max_epochs so their weight is redistributed")
    targets, capped = cap_repetition(weights, {d: counts[d].tokens for d in domains}, token_budget, max_epochs)
    limits = {d: (math.floor(max_epochs * counts[d].tokens) if max_epochs is not None else None) for d in domains}
    whole = _whole_tokens(targets, limits, token_budget)
    lines = []
    for d in domains:
        n = counts[d].tokens
        lines.append(DomainBudget(
            domain=d,
            requested_weight=weights[d] / total_weight,
            achievable_weight=targets[d] / token_budget,
            token_count=n,
            token_count_source=counts[d].source,
            target_tokens=whole[d],
            epochs=whole[d] / n if n else 0.0,
            capped=d in capped,
            cap_tokens=limits[d],
        ))
    return BudgetPlan(token_budget=token_budget, max_epochs=max_epochs, domains=lines)


# -- after training: achieved versus target shares -------------------------------------------


@dataclass(frozen=True)
class DomainTokenShare:
    domain: str
    tokens: int  # tokens the run drew from the domain
    achieved_share: float  # tokens / total tokens
    target_share: float  # the mixture weight, normalised
    difference: float  # achieved - target


@dataclass
class TokenShareReport:
    total_tokens: int
    domains: List[DomainTokenShare]

    @property
    def max_abs_difference(self) -> float:
        return max(abs(d.difference) for d in self.domains)

    def as_dict(self) -> dict:
        return {
            "total_tokens": self.total_tokens,
            "tokens": {d.domain: d.tokens for d in self.domains},
            "achieved_shares": {d.domain: d.achieved_share for d in self.domains},
            "target_shares": {d.domain: d.target_share for d in self.domains},
            "max_abs_difference": self.max_abs_difference,
        }

    def format(self) -> str:
        width = max(6, max(len(d.domain) for d in self.domains))
        lines = [f"token shares over {self.total_tokens:,} training tokens (achieved vs target)"]
        for d in self.domains:
            lines.append(f"{d.domain:<{width}}  {d.tokens:>15,}  {d.achieved_share:>8.4f}  vs {d.target_share:>8.4f}"
                         f"  ({d.difference:+.4f})")
        return "\n".join(lines)


def token_share_report(target_weights: Mapping[str, float], tokens_seen: Mapping[str, int]) -> TokenShareReport:
    """Compare the tokens a run drew from each domain (counted in tokens, not windows) with the
    mixture it was asked to follow. Domains absent from ``tokens_seen`` drew 0 tokens; a domain
    the mixture does not name is an error (the counts come from another mixture)."""
    weights = check_weight_map(target_weights, what="token_share_report", relative=True)
    total_weight = math.fsum(weights.values())
    if not isinstance(tokens_seen, Mapping):
        raise ChameleonUserError(f"tokens_seen must map domain -> tokens, got {type(tokens_seen).__name__}")
    extra = [d for d in tokens_seen if d not in weights]
    if extra:
        raise ChameleonUserError(f"tokens_seen names domains {extra} that the target weights do not have")
    counts = {d: _check_int(f"tokens seen in domain {d!r}", tokens_seen.get(d, 0), 0) for d in weights}
    total = sum(counts.values())
    if total == 0:
        raise ChameleonUserError("token_share_report: no tokens were counted in any domain")
    rows = []
    for d, w in weights.items():
        achieved, target = counts[d] / total, w / total_weight
        rows.append(DomainTokenShare(d, counts[d], achieved, target, achieved - target))
    return TokenShareReport(total_tokens=total, domains=rows)


class DomainTokenCounter:
    """Tokens drawn per domain during a run, for :func:`token_share_report` at its end.

    ``add(domain_ids, tokens)`` takes one batch: ``domain_ids`` ``[B]`` (the domain index of each
    row) and ``tokens`` ``[B]`` (the tokens each row trains on, e.g. ``(targets != -1).sum(1)``)
    or one int for every row. Counts are exact int64 on the CPU; :attr:`counts` is the ``[k]``
    tensor a distributed trainer all-reduces (SUM) before reporting.
    """

    def __init__(self, domains):
        self.domains = list(domains)
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ChameleonUserError(f"DomainTokenCounter: domains must be distinct names, got {self.domains!r}")
        import torch

        self.counts = torch.zeros(len(self.domains), dtype=torch.int64)

    def add(self, domain_ids, tokens) -> None:
        import torch

        ids = torch.as_tensor(domain_ids, device="cpu").reshape(-1).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.domains)):
            raise ChameleonUserError(
                f"DomainTokenCounter.add: domain ids must be in [0, {len(self.domains)}), got "
                f"{int(ids.min())}..{int(ids.max())}")
        n = torch.as_tensor(tokens, device="cpu").long()
        n = n.expand(ids.shape) if n.dim() == 0 else n.reshape(-1)
        if n.shape != ids.shape:
            raise ChameleonUserError(
                f"DomainTokenCounter.add: tokens must be one int or [B] = [{ids.numel()}], got {tuple(n.shape)}")
        if n.numel() and int(n.min()) < 0:
            raise ChameleonUserError("DomainTokenCounter.add: token counts must be >= 0")
        self.counts.index_add_(0, ids, n)

    def as_dict(self) -> Dict[str, int]:
        return {d: int(c) for d, c in zip(self.domains, self.counts.tolist())}

    def report(self, target_weights: Mapping[str, float]) -> TokenShareReport:
        return token_share_report(target_weights, self.as_dict())
