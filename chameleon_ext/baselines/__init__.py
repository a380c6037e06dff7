"""The mixtures Chameleon is compared with, written from their papers onto this trainer.

* :mod:`.natural`: token-proportional weights.
* :mod:`.doremi`: DoReMi (Xie et al., NeurIPS 2023), Group DRO domain weights of a proxy
  trained against a reference model; averaged over the proxy's training.
* :mod:`.regmix`: RegMix (Liu et al., ICLR 2025), a regression from mixture to validation
  loss fitted on many small proxies, then the best of 100k simulated mixtures.

Each module is self-contained maths plus a small state object a training loop drives; the
``chameleon compare`` command wires them to the trainer.
"""

# The package's names are its modules' public names (each module's __all__), listed once there.
from . import doremi, natural, regmix
from .doremi import *  # noqa: F401,F403
from .natural import *  # noqa: F401,F403
from .regmix import *  # noqa: F401,F403

__all__ = [*natural.__all__, *doremi.__all__, *regmix.__all__]
