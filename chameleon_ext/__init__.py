"""chameleon_ext: Chameleon leverage-score data mixing, with fused torch ops.

The compiled ops (``torch.ops.chameleon.*``) and the method's functions:

* :func:`masked_mean_pool`  hidden states ``[B, T, H]`` -> masked means ``[B, H]``
* :func:`domain_mean_pool`  the same, summed per domain in one pass -> ``(sums [D, H], counts [D])``
* :func:`krls`              kernel ridge leverage scores of a batch of kernels ``[..., k, k]`` -> ``[..., k]``
* :func:`krls_ex`           the same without host synchronisation -> ``(scores, info)``

and the method on top of them: :func:`weights_from_embeddings` (domain embeddings -> mixture
weights, the one entry point), with the variants :func:`weights_from_affinity` and
:func:`weights_from_scores`. The maths is written up in ``docs/method.md``.

Importing the package is cheap: torch, the compiled ops and the weight functions load on the
first use of one of these names (module ``__getattr__``), so pure-file work (``chameleon
--help``, ``chameleon export``, :mod:`chameleon_ext.exports`) never loads torch. When torch
is already imported, the ops are registered at import, so ``import torch, chameleon_ext``
makes ``torch.ops.chameleon.*`` usable at once. If the compiled ops cannot be loaded (a broken
or foreign build), the first use of an op or of the weight functions raises an ImportError
that says how to rebuild.
"""

import sys

from ._version import __version__

_OP_NAMES = ("masked_mean_pool", "domain_mean_pool", "krls", "krls_ex")
_WEIGHT_NAMES = ("DomainWeights", "DEFAULT_LAMBDA", "DEFAULT_TEMPERATURE", "DEFAULT_RULE", "RULE_DEFAULTS",
                 "select_lambda", "linear_affinity", "centered_affinity",
                 "weights_from_embeddings", "weights_from_affinity", "weights_from_scores")
_ops_state = {"loaded": False, "error": None}


def _load_ops() -> None:
    """Load libtorch and the compiled ops once; remember the error of a failed load."""
    if _ops_state["loaded"]:
        return
    _ops_state["loaded"] = True
    import torch  # noqa: F401  (loads libtorch, which _C links against)

    try:
        from . import _C  # noqa: F401  (registers torch.ops.chameleon.*)
    except ImportError as e:  # exercised by test_faults_cli.py with the import blocked
        _ops_state["error"] = ImportError(
            "chameleon_ext's compiled ops (chameleon_ext._C) could not be loaded: "
            f"{e}. Build them against the installed torch with "
            "`pip install --no-build-isolation .` (or `make install`)."
        )


def require_ops() -> None:
    """Load the compiled ops, or raise the ImportError of a failed load."""
    _load_ops()
    if _ops_state["error"] is not None:
        raise _ops_state["error"]


def __getattr__(name):
    if name in _OP_NAMES or name in _WEIGHT_NAMES:
        require_ops()
        # importing ops also adds the fake kernels and autograd formulas of torch.ops.chameleon.*
        from . import ops, weights

        value = getattr(ops if name in _OP_NAMES else weights, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'chameleon_ext' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_OP_NAMES) | set(_WEIGHT_NAMES))


def build_info() -> dict:
    """How the compiled ops were built: version, torch version, CUDA or CPU-only, arch list."""
    import torch

    require_ops()
    from . import _C

    info = dict(_C.build_info())
    info["torch_version_runtime"] = torch.__version__
    return info


if "torch" in sys.modules:  # libtorch is loaded already: registering the ops costs little
    _load_ops()
    if _ops_state["error"] is None:
        from . import ops as _ops  # noqa: F401  (fake kernels and autograd formulas)

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
]
