"""The mixtures Chameleon is compared with, written from their papers onto this trainer.

* :mod:`.natural`: token-proportional weights.
* :mod:`.doremi`: DoReMi (Xie et al., NeurIPS 2023), Group DRO domain weights of a proxy
  trained against a reference model; averaged over the proxy's training.
* :mod:`.regmix`: RegMix (Liu et al., ICLR 2025), a regression from mixture to validation
  loss fitted on many small proxies, then the best of 100k simulated mixtures.

Each module is self-contained maths plus a small state object a training loop drives; the
``chameleon compare`` command wires them to the trainer.
"""

from .doremi import (
    DoReMiObjective,
    DoReMiResult,
    DoReMiWeights,
    domain_excess_loss,
    dro_loss,
    per_token_loss,
)
from .natural import dataset_token_counts, natural_weights
from .regmix import (
    RegMixResult,
    RegMixSearch,
    RidgeRegression,
    fit_regression,
    mixture_features,
    propose_mixtures,
    regmix_weights,
    sample_mixtures,
)

__all__ = [
    "natural_weights",
    "dataset_token_counts",
    "DoReMiWeights",
    "DoReMiObjective",
    "DoReMiResult",
    "per_token_loss",
    "domain_excess_loss",
    "dro_loss",
    "sample_mixtures",
    "propose_mixtures",
    "mixture_features",
    "RidgeRegression",
    "fit_regression",
    "regmix_weights",
    "RegMixResult",
    "RegMixSearch",
]
