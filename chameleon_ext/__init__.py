"""chameleon_ext: Chameleon leverage-score data mixing, with fused torch ops.

Importing the package loads the compiled ops (``torch.ops.chameleon.*``):

* :func:`masked_mean_pool`  hidden states ``[B, T, H]`` -> masked means ``[B, H]``
* :func:`domain_mean_pool`  the same, summed per domain in one pass -> ``(sums [D, H], counts [D])``
* :func:`krls`              kernel ridge leverage scores of a batch of kernels ``[..., k, k]`` -> ``[..., k]``
* :func:`krls_ex`           the same without host synchronisation -> ``(scores, info)``

and the method on top of them: :func:`domain_weights` (embeddings -> mixture weights).
"""

import torch  # noqa: F401  (loads libtorch, which _C links against)

from ._version import __version__

try:
    from . import _C  # noqa: F401  (registers torch.ops.chameleon.*)
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "chameleon_ext's compiled ops (chameleon_ext._C) could not be loaded: "
        f"{e}. Build them against the installed torch with "
        "`pip install --no-build-isolation .` (or `make install`)."
    ) from e

from . import reference  # noqa: E402
from .ops import domain_mean_pool, krls, krls_ex, masked_mean_pool  # noqa: E402
from .weights import (  # noqa: E402
    DomainWeights,
    centered_affinity,
    chameleon_weights,
    domain_weights,
    domain_weights_from_affinity,
    linear_affinity,
    weights_from_scores,
)


def build_info() -> dict:
    """How the compiled ops were built: version, torch version, CUDA or CPU-only, arch list."""
    import torch

    info = dict(_C.build_info())
    info["torch_version_runtime"] = torch.__version__
    return info


__all__ = [
    "__version__",
    "build_info",
    "masked_mean_pool",
    "domain_mean_pool",
    "krls",
    "krls_ex",
    "domain_weights",
    "domain_weights_from_affinity",
    "chameleon_weights",
    "DomainWeights",
    "linear_affinity",
    "centered_affinity",
    "weights_from_scores",
    "reference",
]
