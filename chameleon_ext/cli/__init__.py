"""The ``chameleon`` command line (also ``python -m chameleon_ext``).

    chameleon run                                   # the whole method on the built-in data
    chameleon train-proxy --data DIR --out runs/proxy
    chameleon weights --data DIR --proxy runs/proxy/model.pt --mode pretrain --out runs/weights
    chameleon sweep --embeddings runs/weights/domain_embeddings.pt --lam 0.1,1,10,100,1000 --out runs/sweep
    chameleon train --data DIR --weights runs/weights/weights.json --out runs/base
    chameleon eval --data DIR --model runs/base/model.pt
    chameleon export --weights runs/weights/weights.json --out runs/exports
    chameleon train --data DIR --weights online --out runs/online     # also writes schedule.json
    chameleon train --data DIR --schedule runs/online/schedule.json --out runs/replay
    chameleon export --schedule runs/online/schedule.json --out runs/schedule_exports

User errors (bad paths, data, options) print one line and exit with status 2; every
command runs unchanged under ``torchrun`` (rank 0 writes and prints).

The package: ``main`` (parser, exit codes, signals), ``options`` (the shared option groups),
``checks`` (before any work), ``common`` (what the commands share), and the commands by job:
``train``, ``method``, ``exports``, ``compare``. No module here imports torch at load time.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
