"""chameleon_ext: Chameleon leverage-score data mixing, with fused torch ops.

Importing the package loads the compiled ops (``torch.ops.chameleon.*``):

* :func:`masked_mean_pool`  hidden states ``[B, T, H]`` -> masked means ``[B, H]``
* :func:`domain_mean_pool`  the same, summed per domain in one pass -> ``(sums [D, H], counts [D])``
* :func:`krls`              kernel ridge leverage scores of a batch of kernels ``[..., k, k]`` -> ``[..., k]``
* :func:`krls_ex`           the same without host synchronisation -> ``(scores, info)``

and the method on top of them: :func:`weights_from_embeddings` (domain embeddings -> mixture
weights, the one entry point), with the variants :func:`weights_from_affinity` and
:func:`weights_from_scores`. The maths is written up in ``docs/method.md``.

If the compiled ops cannot be loaded (a broken or foreign build), the import still succeeds so
that pure-file work (``chameleon export``, :mod:`chameleon_ext.exports`) keeps working; the
first use of an op or of the weight functions raises an ImportError that says how to rebuild.
"""

import torch  # noqa: F401  (loads libtorch, which _C links against)

from ._version import __version__

_OPS_ERROR = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.chameleon.*)
except ImportError as e:  # exercised by test_faults_cli.py with the import blocked
    _C = None
    _OPS_ERROR = ImportError(
        "chameleon_ext's compiled ops (chameleon_ext._C) could not be loaded: "
        f"{e}. Build them against the installed torch with "
        "`pip install --no-build-isolation .` (or `make install`)."
    )


def require_ops() -> None:
    """Raise the ImportError of a failed ``_C`` load (a no-op when the ops are loaded)."""
    if _OPS_ERROR is not None:
        raise _OPS_ERROR


_OP_NAMES = ("masked_mean_pool", "domain_mean_pool", "krls", "krls_ex")
_WEIGHT_NAMES = ("DomainWeights", "DEFAULT_LAMBDA", "DEFAULT_TEMPERATURE", "DEFAULT_RULE", "RULE_DEFAULTS",
                 "select_lambda", "linear_affinity", "centered_affinity",
                 "weights_from_embeddings", "weights_from_affinity", "weights_from_scores",
                 "chameleon_weights", "domain_weights", "domain_weights_from_affinity")

if _OPS_ERROR is None:
    # Fake kernels and autograd formulas, so torch.ops.chameleon.* is complete after the import.
    from .ops import domain_mean_pool, krls, krls_ex, masked_mean_pool  # noqa: E402
    from .weights import (  # noqa: E402
        DEFAULT_LAMBDA,
        DEFAULT_RULE,
        DEFAULT_TEMPERATURE,
        RULE_DEFAULTS,
        DomainWeights,
        centered_affinity,
        chameleon_weights,
        domain_weights,
        domain_weights_from_affinity,
        linear_affinity,
        select_lambda,
        weights_from_affinity,
        weights_from_embeddings,
        weights_from_scores,
    )
else:

    def __getattr__(name):
        if name in _OP_NAMES or name in _WEIGHT_NAMES:
            raise _OPS_ERROR
        raise AttributeError(f"module 'chameleon_ext' has no attribute {name!r}")


def build_info() -> dict:
    """How the compiled ops were built: version, torch version, CUDA or CPU-only, arch list."""
    import torch

    require_ops()
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
    "weights_from_embeddings",
    "weights_from_affinity",
    "weights_from_scores",
    "DomainWeights",
    "DEFAULT_LAMBDA",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_RULE",
    "RULE_DEFAULTS",
    "select_lambda",
    "linear_affinity",
    "centered_affinity",
    # deprecated aliases of weights_from_embeddings / weights_from_affinity
    "domain_weights",
    "domain_weights_from_affinity",
    "chameleon_weights",
]
