"""DoReMi (Xie et al., NeurIPS 2023): domain weights from a proxy trained with Group DRO.

DoReMi trains a *reference* model on a fixed mixture (here: uniform), then a *proxy* of the
same shape on uniformly sampled batches whose loss is reweighted per domain by weights
``alpha`` that an adversary moves towards the domains where the proxy lags the reference most.
The output mixture is the average of ``alpha`` over the proxy's training. Per step ``t``
(the paper's Algorithm 1):

1. excess loss per domain, over the domain's tokens in the batch, clipped at 0 per token::

       lambda_t[i] = sum_{tokens of domain i} max(l_proxy - l_ref, 0) / (tokens of domain i)

2. exponentiated-gradient ascent on the log-weights, step size ``eta`` (paper: 1)::

       alpha'_t = softmax(log alpha_{t-1} + eta * lambda_t)

3. smoothing with the uniform distribution ``u``, ``c`` = 1e-3 in the paper::

       alpha_t = (1 - c) alpha'_t + c u

4. the proxy takes an optimiser step on ``L(theta, alpha_t) = sum_i alpha_t[i] L_i(theta)``,
   ``L_i`` the mean token loss of domain ``i`` (:func:`dro_loss`).

The result is ``mean(alpha_1 .. alpha_T)`` (alpha_0, the start, is not part of the average).

**Domains absent from a batch.** Algorithm 1 leaves ``lambda_t[i]`` undefined when a batch
holds no token of domain ``i`` (0 / 0). Here it is 0 (``absent="zero"``, the default): the
domain contributes no evidence that step, and its weight only moves through the softmax
renormalisation (it falls slightly if another domain's excess is positive). The authors'
public code instead carries the domain's last observed excess over (``absent="carry"``,
available for comparison). With uniform sampling and batches of many rows per domain the two
rarely differ.

Everything here works on per-token losses ``[B, T]`` with a token mask and per-row domain ids
``[B]`` (each row of a batch is one window of one domain, as
:class:`~chameleon_ext.trainer.WeightedDomainSampler` draws them). The weight statistics are
accumulated in float64; ``alpha`` and its running sum live in float64 on the CPU, so resuming
from :meth:`DoReMiWeights.state_dict` continues bit for bit.

:class:`DoReMiObjective` packages the whole per-micro-batch recipe (reference forward, excess
statistics, weight update at the end of each optimiser step, reweighted loss) behind one call
for a training loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import all_reduce_sum_
from ..distributed import info as dist_info
from ..errors import ChameleonUserError

__all__ = [
    "DEFAULT_ETA",
    "DEFAULT_SMOOTHING",
    "DoReMiWeights",
    "DoReMiObjective",
    "DoReMiResult",
    "per_token_loss",
    "domain_excess_loss",
    "dro_loss",
]

DEFAULT_ETA = 1.0  # the paper's step size for the domain weights
DEFAULT_SMOOTHING = 1e-3  # the paper's c: mixing weight of the uniform distribution
STATE_FORMAT = "chameleon_ext.doremi/1"
ABSENT_RULES = ("zero", "carry")
REDUCTIONS = ("domain", "token")


# ------------------------------------------------------------------------------------------
# per-token losses and their per-domain reductions


def per_token_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy per position: ``(losses [B, T] float32, mask [B, T] bool)``.

    ``logits`` ``[B, T, V]``, ``targets`` ``[B, T]`` with -1 marking ignored positions (the
    convention of :func:`chameleon_ext.model.next_token_loss`); ignored positions get loss 0
    and mask False. The mean of ``losses[mask]`` equals ``next_token_loss(logits, targets)``.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ChameleonUserError(
            f"per_token_loss: logits must be [B, T, V] and targets [B, T], got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    B, T, V = logits.shape
    losses = F.cross_entropy(logits.float().reshape(B * T, V), targets.reshape(B * T),
                             ignore_index=-1, reduction="none").view(B, T)
    return losses, targets != -1


def _check_batch(token_losses: Tensor, domain_ids: Tensor, n_domains: int,
                 mask: Optional[Tensor], what: str) -> Tensor:
    """Validate shapes and ids; return the mask as a float64 tensor ``[B, T]``."""
    if not isinstance(token_losses, Tensor) or token_losses.dim() != 2:
        raise ChameleonUserError(
            f"{what}: token_losses must be a [B, T] tensor, got "
            f"{tuple(token_losses.shape) if isinstance(token_losses, Tensor) else type(token_losses).__name__}")
    B, T = token_losses.shape
    if not isinstance(domain_ids, Tensor) or domain_ids.shape != (B,):
        raise ChameleonUserError(
            f"{what}: domain_ids must be [B] = [{B}], got "
            f"{tuple(domain_ids.shape) if isinstance(domain_ids, Tensor) else type(domain_ids).__name__}")
    if domain_ids.dtype.is_floating_point or domain_ids.dtype == torch.bool:
        raise ChameleonUserError(f"{what}: domain_ids must be an integer tensor, got {domain_ids.dtype}")
    if B and (int(domain_ids.min()) < 0 or int(domain_ids.max()) >= n_domains):
        raise ChameleonUserError(
            f"{what}: domain_ids must lie in [0, {n_domains}), got values in "
            f"[{int(domain_ids.min())}, {int(domain_ids.max())}]")
    if mask is None:
        return torch.ones(B, T, dtype=torch.float64, device=token_losses.device)
    if mask.shape != (B, T):
        raise ChameleonUserError(f"{what}: mask must be [B, T] = [{B}, {T}], got {tuple(mask.shape)}")
    return mask.to(device=token_losses.device, dtype=torch.float64)


def _one_hot(domain_ids: Tensor, k: int, device, dtype) -> Tensor:
    return F.one_hot(domain_ids.to(device=device, dtype=torch.long), k).to(dtype)


def domain_excess_loss(token_losses: Tensor, ref_token_losses: Tensor, domain_ids: Tensor,
                       n_domains: int, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per-domain sums of the clipped per-token excess loss, and per-domain token counts.

    Returns ``(excess_sum [k], token_count [k])`` in float64 on the losses' device, where
    ``excess_sum[i] = sum over the masked tokens of rows of domain i of max(l - l_ref, 0)``.
    ``excess_sum / token_count`` is the paper's ``lambda_t`` for the domains present.
    """
    m = _check_batch(token_losses, domain_ids, n_domains, mask, "domain_excess_loss")
    if ref_token_losses.shape != token_losses.shape:
        raise ChameleonUserError(
            f"domain_excess_loss: ref_token_losses must be [B, T] = {list(token_losses.shape)}, "
            f"got {list(ref_token_losses.shape)}")
    excess = (token_losses.detach().double() - ref_token_losses.detach().double()).clamp_min(0.0)
    # Masked positions contribute nothing, even if their loss is garbage (but NaN * 0 is NaN).
    excess = torch.where(m > 0, excess, torch.zeros_like(excess))
    # One-hot matmul rather than index_add_: deterministic on CUDA too (no atomics).
    onehot = _one_hot(domain_ids, n_domains, token_losses.device, torch.float64)  # [B, k]
    row_sum = excess.sum(1)
    bad_row = ~torch.isfinite(row_sum)
    excess_sum = onehot.T @ torch.where(bad_row, torch.zeros_like(row_sum), row_sum)
    # A NaN/Inf row marks its own domain only (in a matmul, NaN * 0 would reach every domain).
    excess_sum = torch.where(onehot.T @ bad_row.double() > 0, torch.full_like(excess_sum, math.nan), excess_sum)
    return excess_sum, onehot.T @ m.sum(1)


def dro_loss(token_losses: Tensor, domain_ids: Tensor, alpha: Union[Tensor, Sequence[float]],
             mask: Optional[Tensor] = None, reduction: str = "domain",
             group: Optional[Any] = None) -> Tensor:
    """The proxy's Group DRO training loss: per-domain token losses weighted by ``alpha``.

    Args:
        token_losses: ``[B, T]`` per-token losses of the proxy (differentiable).
        domain_ids: ``[B]`` each row's domain index.
        alpha: ``[k]`` current domain weights (not differentiated).
        mask: ``[B, T]`` tokens that count (default: all).
        reduction:
            * ``"domain"`` (default, the paper's objective): ``sum_i alpha_i L_i`` with ``L_i``
              the mean loss over the batch's tokens of domain ``i``. When a domain has no
              token in the batch its term is unavailable; the weights of the domains present
              are then renormalised to sum to 1 (``sum_{i present} alpha_i L_i / sum_{i
              present} alpha_i``), so the loss stays a weighted mean of token losses. With
              every domain present this is exactly ``sum_i alpha_i L_i``.
            * ``"token"`` (the authors' public code): every token weighted by its domain's
              ``alpha``, ``sum_t alpha_{d(t)} l_t / sum_t alpha_{d(t)}``. Under uniform
              sampling it has the same expectation up to the normaliser.

        group: under torch.distributed (default: the default group when initialised), each
            rank passes its own rows; the normalisers (per-domain token counts, or the total
            token weight) are summed over ranks and the rank's share is scaled by the world
            size, so that DDP's gradient *average* is exactly the gradient of the loss of the
            whole global batch. The global loss value is then the mean of the ranks' values.

    Returns:
        A scalar in the losses' dtype; its gradient flows into ``token_losses`` only.
    """
    if reduction not in REDUCTIONS:
        raise ChameleonUserError(f"dro_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    a = torch.as_tensor(alpha, dtype=torch.float64).detach()
    if a.dim() != 1 or a.numel() < 1:
        raise ChameleonUserError(f"dro_loss: alpha must be a [k] vector, got shape {tuple(a.shape)}")
    k = a.numel()
    m = _check_batch(token_losses, domain_ids, k, mask, "dro_loss").to(token_losses.dtype)
    dev, dt = token_losses.device, token_losses.dtype
    a = a.to(device=dev, dtype=dt)
    world = dist_info(group).world_size
    onehot = _one_hot(domain_ids, k, dev, dt)  # [B, k]
    # masked positions must not leak NaN (NaN * 0 is NaN), in the value or the gradient
    losses = torch.where(m > 0, token_losses, torch.zeros_like(token_losses))
    if reduction == "token":
        w = (onehot @ a).unsqueeze(1) * m  # [B, T]: each token's domain weight
        total = all_reduce_sum_(w.sum().detach().clone(), group)
        if not total > 0:
            raise ChameleonUserError("dro_loss: the batch has no token with positive weight")
        return world * (losses * w).sum() / total
    loss_sum = onehot.T @ (losses * m).sum(1)  # [k]
    count = (onehot.T @ m.sum(1)).detach().clone()
    all_reduce_sum_(count, group)  # global token count per domain
    present = count > 0
    if not bool(present.any()):
        raise ChameleonUserError("dro_loss: the batch has no unmasked token")
    domain_mean = loss_sum / count.clamp_min(1.0)  # [k]; this rank's share of each domain mean
    w = torch.where(present, a, torch.zeros_like(a))
    return world * (w * domain_mean).sum() / w.sum()


# ------------------------------------------------------------------------------------------
# the domain-weight state


@dataclass
class DoReMiResult:
    """What a DoReMi run produces: the averaged weights (the mixture) and how they were made."""

    weights: dict  # {domain: average alpha over the proxy's steps}; the output mixture
    final_alpha: dict  # alpha_T, the last step's weights
    steps: int
    eta: float
    smoothing: float
    absent: str

    def as_dict(self) -> dict:
        return {"method": "doremi", "weights": dict(self.weights), "final_alpha": dict(self.final_alpha),
                "steps": self.steps, "eta": self.eta, "smoothing": self.smoothing, "absent": self.absent}


class DoReMiWeights:
    """Group DRO's domain weights over a proxy's training (the paper's Algorithm 1, step 2).

    Feed it each micro-batch's per-token losses of the proxy and the reference with
    :meth:`accumulate`, and call :meth:`step` once per optimiser step (or :meth:`update`, which
    does both, when a step is one batch). :attr:`alpha` is the current ``alpha_t`` (weight the
    proxy's loss with it, :func:`dro_loss`); :attr:`average` is the output mixture.

    Args:
        domains: the domain names (their order is the order of the domain ids), or their count.
        eta: step size of the exponentiated-gradient update (paper: 1).
        smoothing: ``c``, the uniform distribution's share after each update (paper: 1e-3).
        initial: ``alpha_0`` (default uniform); a ``[k]`` sequence or ``{domain: weight}``.
        absent: ``"zero"`` (default) or ``"carry"``: the excess of a domain with no token in
            the step's batches (see the module docstring).
    """

    def __init__(self, domains: Union[int, Sequence[str]], eta: float = DEFAULT_ETA,
                 smoothing: float = DEFAULT_SMOOTHING,
                 initial: Optional[Union[Sequence[float], Mapping[str, float]]] = None,
                 absent: str = "zero"):
        if isinstance(domains, bool) or not isinstance(domains, (int, Sequence)) or isinstance(domains, str):
            raise ChameleonUserError(f"domains: expected a list of names or a count, got {domains!r}")
        names = [str(i) for i in range(domains)] if isinstance(domains, int) else [str(d) for d in domains]
        if len(names) < 1 or len(set(names)) != len(names):
            raise ChameleonUserError(f"domains: expected at least one domain, names unique, got {names}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
            raise ChameleonUserError(f"eta: expected a finite number > 0, got {eta!r}")
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing <= 1:
            raise ChameleonUserError(f"smoothing: expected a number in [0, 1], got {smoothing!r}")
        if absent not in ABSENT_RULES:
            raise ChameleonUserError(f"absent: expected one of {ABSENT_RULES}, got {absent!r}")
        self.domains: List[str] = names
        self.eta, self.smoothing, self.absent = float(eta), float(smoothing), absent
        k = len(names)
        self.initial = self._initial(initial, k)
        self.alpha = self.initial.clone()  # alpha_t, float64 [k], CPU
        self.weight_sum = torch.zeros(k, dtype=torch.float64)  # sum of alpha_1 .. alpha_t
        self.last_excess = torch.zeros(k, dtype=torch.float64)  # lambda_t of the last step
        self.steps = 0
        self._excess_sum = torch.zeros(k, dtype=torch.float64)  # this step's, not yet applied
        self._token_count = torch.zeros(k, dtype=torch.float64)

    def _initial(self, initial, k: int) -> Tensor:
        if initial is None:
            return torch.full((k,), 1.0 / k, dtype=torch.float64)
        if isinstance(initial, Mapping):
            missing = [d for d in self.domains if d not in initial]
            extra = [d for d in initial if d not in self.domains]
            if missing or extra:
                raise ChameleonUserError(
                    f"initial: must name exactly the domains {self.domains}; missing {missing}, unknown {extra}")
            values = [initial[d] for d in self.domains]
        else:
            values = list(initial)
        w = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if w.numel() != k or not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
            raise ChameleonUserError(
                f"initial: expected {k} finite weights > 0 (log-weights must exist), got {values}")
        return w / w.sum()

    @property
    def n_domains(self) -> int:
        return len(self.domains)

    # -- the update --------------------------------------------------------------------------

    def accumulate(self, token_losses: Tensor, ref_token_losses: Tensor, domain_ids: Tensor,
                   mask: Optional[Tensor] = None) -> None:
        """Add one micro-batch's clipped excess losses to the current step's statistics.

        ``token_losses`` (proxy) and ``ref_token_losses`` (reference) are ``[B, T]``, the same
        tokens; ``domain_ids`` ``[B]``; ``mask`` ``[B, T]`` (default all tokens count).
        """
        s, c = domain_excess_loss(token_losses, ref_token_losses, domain_ids, self.n_domains, mask)
        # The pending sums live on the losses' device: no host sync until step().
        self._excess_sum = self._excess_sum.to(s.device) + s
        self._token_count = self._token_count.to(c.device) + c

    def step(self, group: Optional[Any] = None) -> Tensor:
        """Apply the step's statistics: ``alpha_{t-1} -> alpha_t``; returns ``alpha_t`` ``[k]``.

        Under torch.distributed (``group``, default the default group when initialised) the
        statistics are summed over ranks first, so every rank computes the same ``alpha_t``
        from the whole global batch. Call it on every rank, once per optimiser step.
        """
        stats = torch.cat([self._excess_sum, self._token_count])
        all_reduce_sum_(stats, group)  # no-op in a single process; on the losses' device
        stats = stats.cpu()
        k = self.n_domains
        excess_sum, count = stats[:k], stats[k:]
        if not bool(torch.isfinite(excess_sum).all()):
            bad = [self.domains[i] for i in torch.nonzero(~torch.isfinite(excess_sum)).flatten().tolist()]
            self._excess_sum = torch.zeros(k, dtype=torch.float64)
            self._token_count = torch.zeros(k, dtype=torch.float64)
            raise ChameleonUserError(
                f"DoReMi step: the per-token losses of domain(s) {bad} hold NaN or Inf this step "
                "(the proxy or the reference diverged); alpha was not updated")
        present = count > 0
        excess = torch.where(present, excess_sum / count.clamp_min(1.0),
                             self.last_excess if self.absent == "carry" else torch.zeros(k, dtype=torch.float64))
        logits = torch.log(self.alpha) + self.eta * excess
        updated = torch.softmax(logits, dim=0)  # exponentiated gradient, renormalised
        self.alpha = (1.0 - self.smoothing) * updated + self.smoothing / k
        self.weight_sum += self.alpha
        self.last_excess = excess
        self.steps += 1
        self._excess_sum = torch.zeros(k, dtype=torch.float64)
        self._token_count = torch.zeros(k, dtype=torch.float64)
        return self.alpha.clone()

    def update(self, token_losses: Tensor, ref_token_losses: Tensor, domain_ids: Tensor,
               mask: Optional[Tensor] = None, group: Optional[Any] = None) -> Tensor:
        """:meth:`accumulate` one batch and :meth:`step`: one optimiser step of one batch."""
        self.accumulate(token_losses, ref_token_losses, domain_ids, mask)
        return self.step(group)

    # -- results -------------------------------------------------------------------------------

    @property
    def average(self) -> Tensor:
        """``mean(alpha_1 .. alpha_t)`` ``[k]`` float64: DoReMi's output mixture."""
        if self.steps == 0:
            raise ChameleonUserError("DoReMi weights: no step has been taken yet, there is no average")
        return self.weight_sum / self.steps

    def result(self) -> DoReMiResult:
        return DoReMiResult(
            weights={d: float(w) for d, w in zip(self.domains, self.average.tolist())},
            final_alpha={d: float(w) for d, w in zip(self.domains, self.alpha.tolist())},
            steps=self.steps, eta=self.eta, smoothing=self.smoothing, absent=self.absent)

    # -- exact resume --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit (tensors are float64 CPU copies)."""
        return {"format": STATE_FORMAT, "domains": list(self.domains), "eta": self.eta,
                "smoothing": self.smoothing, "absent": self.absent, "steps": self.steps,
                "initial": self.initial.clone(), "alpha": self.alpha.clone(),
                "weight_sum": self.weight_sum.clone(), "last_excess": self.last_excess.clone(),
                "pending_excess": self._excess_sum.detach().cpu().clone(),
                "pending_tokens": self._token_count.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the domains and hyper-parameters must match."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ChameleonUserError("DoReMi state: not a chameleon_ext DoReMi state (format mismatch)")
        if list(state["domains"]) != self.domains:
            raise ChameleonUserError(
                f"DoReMi state: saved for domains {list(state['domains'])}, now {self.domains}")
        for key in ("eta", "smoothing", "absent"):
            if state[key] != getattr(self, key):
                raise ChameleonUserError(
                    f"DoReMi state: saved with {key} = {state[key]!r}, now {getattr(self, key)!r}")
        k = self.n_domains
        tensors = {}
        for key in ("initial", "alpha", "weight_sum", "last_excess", "pending_excess", "pending_tokens"):
            t = torch.as_tensor(state[key])
            if t.shape != (k,) or t.dtype != torch.float64:
                raise ChameleonUserError(f"DoReMi state: {key} must be float64 [{k}], got {t.dtype} {tuple(t.shape)}")
            tensors[key] = t.detach().cpu().clone()
        self.initial, self.alpha = tensors["initial"], tensors["alpha"]
        self.weight_sum, self.last_excess = tensors["weight_sum"], tensors["last_excess"]
        self._excess_sum, self._token_count = tensors["pending_excess"], tensors["pending_tokens"]
        self.steps = int(state["steps"])


# ------------------------------------------------------------------------------------------
# the per-micro-batch recipe, for a training loop


class DoReMiObjective:
    """DoReMi's proxy training objective, one call per micro-batch.

    ``loss = objective(x, y, domain_ids, logits)`` computes the proxy's per-token losses from
    its ``logits`` ``[B, T, V]``, runs the frozen ``reference`` model on the same inputs
    ``x`` ``[B, T]`` (no gradient, eval mode), adds the clipped excess to :attr:`weights`, and,
    at the last micro-batch of an optimiser step (every ``grad_accum`` calls), updates
    ``alpha``. It returns :func:`dro_loss` with the weights current at that moment, to be
    backpropagated in place of the plain mean loss.

    With ``grad_accum == 1`` this is the paper's order exactly (``alpha_t`` from the batch,
    then the step on ``L(theta, alpha_t)``). With ``grad_accum > 1`` the statistics of all
    micro-batches of the step feed one update, which lands before the step's last micro-batch
    is weighted (earlier micro-batches use ``alpha_{t-1}``), as in the authors' public code.

    The data must be sampled *uniformly* over domains (the paper's proxy batches come from
    the uniform mixture; the reweighting happens in the loss, not in the sampler).

    Under torch.distributed (``group``, default the default group when initialised) each
    rank calls it with its own rows: the weight statistics and the loss normalisers are summed
    over ranks, so every rank holds the same ``alpha`` and DDP's averaged gradient is the
    gradient of the global batch's loss (see :func:`dro_loss`).

    :attr:`reference_tokens` counts the tokens the reference has scored (for the compute
    ledger: a forward-only pass, ``2 N tokens``). :meth:`state_dict` holds the weights and the
    micro-batch counter; save it with every checkpoint and restore it on resume.
    """

    def __init__(self, reference: torch.nn.Module, weights: DoReMiWeights, grad_accum: int = 1,
                 reduction: str = "domain", group: Optional[Any] = None):
        if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
            raise ChameleonUserError(f"grad_accum: expected a positive integer, got {grad_accum!r}")
        if reduction not in REDUCTIONS:
            raise ChameleonUserError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        if not isinstance(weights, DoReMiWeights):
            raise ChameleonUserError(f"weights: expected a DoReMiWeights, got {type(weights).__name__}")
        self.reference = reference
        self.reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.weights, self.grad_accum, self.reduction, self.group = weights, grad_accum, reduction, group
        self.micro = 0  # micro-batches seen in the current optimiser step
        self.reference_tokens = 0

    @torch.no_grad()
    def reference_token_losses(self, x: Tensor, y: Tensor) -> Tensor:
        """The reference's per-token losses ``[B, T]`` on inputs ``x`` and targets ``y``."""
        dev = next(self.reference.parameters()).device
        logits, _ = self.reference(x.to(dev))
        losses, mask = per_token_loss(logits, y.to(dev))
        self.reference_tokens += int(mask.sum())
        return losses

    def __call__(self, x: Tensor, y: Tensor, domain_ids: Tensor, logits: Tensor) -> Tensor:
        losses, mask = per_token_loss(logits, y)
        ref = self.reference_token_losses(x, y).to(losses.device)
        self.weights.accumulate(losses.detach(), ref, domain_ids, mask)
        self.micro += 1
        if self.micro == self.grad_accum:
            self.weights.step(self.group)
            self.micro = 0
        return dro_loss(losses, domain_ids, self.weights.alpha, mask, self.reduction, self.group)

    def state_dict(self) -> dict:
        return {"weights": self.weights.state_dict(), "micro": self.micro,
                "reference_tokens": self.reference_tokens, "grad_accum": self.grad_accum,
                "reduction": self.reduction}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["grad_accum"] != self.grad_accum or state["reduction"] != self.reduction:
            raise ChameleonUserError(
                f"DoReMi objective state: saved with grad_accum {state['grad_accum']} and reduction "
                f"{state['reduction']!r}, now {self.grad_accum} and {self.reduction!r}")
        self.weights.load_state_dict(state["weights"])
        self.micro, self.reference_tokens = int(state["micro"]), int(state["reference_tokens"])
