"""``chameleon compare``: every mixture method on the same trainer, several seeds, a held-out
test split, intervals and the compute each mixture cost.

For each mixture (``uniform``, ``natural``, ``chameleon``, ``doremi``, ``regmix``, ``online``,
or a ``weights.json``) the comparison

1. **builds the mixture**, training whatever proxies the method needs (Chameleon: a uniform
   proxy and the domain embeddings; DoReMi: a reference model on uniform and a Group-DRO
   proxy; RegMix: ``M`` small proxies on Dirichlet mixtures, scored on the *validation*
   split), once, with the comparison's ``seed``;
2. trains **one base model per mixture and seed** on the same token budget (``online``: the
   base model trained with :class:`~chameleon_ext.online.OnlineWeights`, whose weights follow
   the model);
3. evaluates each base model's per-domain perplexity on the **test** split (drawn from every
   domain's stream the same interleaved way as validation, see
   :mod:`chameleon_ext.data.dataset`), which nothing else looks at;
4. reports the mean and 95% interval over seeds and the paired difference to uniform
   (:mod:`chameleon_ext.compare_stats`), and the compute each mixture cost (FLOPs, 6 N per
   trained token and 2 N per forward-only token, and wall time) beside the base training.

Honesty rules (each tested): the mixtures are built on a :class:`DatasetView` that refuses the
test split, so no method can be tuned on it; every base run of a table has the same steps,
batch and block size (the same token budget) and is scored on the same test windows (a fixed
evaluation seed, independent of the training seed); seed ``s`` sets the model initialisation
(``GPT(seed=s)``) and the data order (``TrainConfig.seed = s``) for every mixture alike; the
table states the number of seeds and what the interval is.

Resumable: every finished unit (a mixture, a RegMix proxy, a base run) leaves a record under
``<out>/records``; a rerun skips it, and an interrupted training run resumes from its
checkpoint (the trainer's exact resume). Each record names what the unit was computed from
(each domain's data fingerprint, the tokenizer, the unit's settings, the chameleon_ext version,
a finetuning start model's hash): a rerun reuses a record only when all of them still hold and
says so; a record whose data (or any of the rest) changed is stale: the terminal says why and
the unit is recomputed, in a new work folder (named by the digest of what it is computed from,
so the old checkpoints are not resumed). Other settings than those pinned in
``compare_settings.json`` are refused instead (a new ``--out`` is the way to change them).

Scenarios (each writes its own ``compare*.json/md/png`` into the same ``out`` and shares the
finished units of the others):

* ``pretrain`` (default): ``compare.json``, ``compare.md``, ``compare.png``.
* ``new_domains``: the proxies of every method see only the other domains; Chameleon then
  embeds the new ones with its frozen proxy (transfer mode) and reuses the cached embeddings
  of the others; DoReMi and RegMix retrain on all domains. The table adds the extra compute
  each method spent to absorb the new domains. Files ``compare-new-domains.*``.
* ``finetune``: a base model (``finetune_from``, or one pretrained here on uniform over the
  non-finetuning domains) is finetuned on the finetuning domains with uniform, Chameleon's
  finetuning weights (``mode="finetune"``, embedded with the base model itself as the frozen
  proxy) and DoReMi's (reference: the uniform finetune), per seed; the report counts the
  finetuning domains whose test perplexity improved over uniform, with intervals. Files
  ``compare-finetune.*``.
"""

from __future__ import annotations

from .callbacks import DoReMiLoss
from ..data.view import DatasetView
from .config import METHODS, SCENARIOS, CompareConfig, pinned_settings
from .records import stale_reason
from .scenarios import FINETUNE_METHODS, run_compare
from .units import Comparison

__all__ = ["CompareConfig", "DatasetView", "DoReMiLoss", "run_compare", "METHODS", "SCENARIOS", "FINETUNE_METHODS",
           "Comparison", "pinned_settings", "stale_reason"]
