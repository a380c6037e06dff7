"""Input factories shared by the tests and the benchmarks, so a benchmark always measures
inputs of the kind the tests verify."""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
# The CUDA leg carries the `gpu` marker: the GPU check selects GPU tests with `-m gpu`.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="CUDA not available on this machine")])]

# The reference implementation's golden vectors, kept in the repository (a missing file fails
# the tests that read it; nothing is skipped).
GOLDEN_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "krls_reference.json")

# The small text dataset every test uses unless it needs special content.
TEXT_DOMAINS = ("alpha", "digits", "dna", "zeta")
DEFAULT_TEXT_DOMAINS = ("alpha", "digits", "dna")


def write_text_domains(root, names=DEFAULT_TEXT_DOMAINS, seed=0) -> str:
    """Small text domains with clearly different statistics (a few KB each) under ``root``:
    ``alpha`` words, ``digits`` numbers, ``dna`` letters, ``zeta`` key=value records. ``names``
    picks which (any of :data:`TEXT_DOMAINS`); the same ``seed`` writes the same bytes.
    Returns ``root`` as a string (pass it to ``load_dataset``)."""
    import numpy as np

    unknown = sorted(set(names) - set(TEXT_DOMAINS))
    if unknown:
        raise ValueError(f"write_text_domains: unknown domains {unknown}; expected some of {TEXT_DOMAINS}")
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over the lazy dog".split()
    texts = {
        "alpha": [" ".join(words[i] for i in rng.integers(0, 9, 250)) for _ in range(3)],
        "digits": [" ".join(str(v) for v in rng.integers(0, 10**5, 120)) for _ in range(4)],
        "dna": ["".join("ACGT"[i] for i in rng.integers(0, 4, 3000))],
        "zeta": [" ".join(f"item_{i}: value={i * 7 % 13};" for i in range(150))],
    }
    for name in names:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for j, text in enumerate(texts[name]):
            with open(os.path.join(root, name, f"part{j}.txt"), "w", encoding="utf-8") as f:
                f.write(text)
    return str(root)


def make_hidden(B, T, H, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    """Hidden states ``[B, T, H]`` with a per-row offset, so rows differ in their means."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g, dtype=torch.float32) + torch.randn(B, 1, 1, generator=g)
    return x.to(dtype=dtype, device=device)


def make_mask(B, T, p_valid=0.8, dtype=torch.bool, device="cpu", seed=1, empty_rows=()) -> torch.Tensor:
    """Mask ``[B, T]``: right-padded rows of random lengths (as batches of windows are),
    with the given rows fully masked."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.binomial(torch.full((B,), float(T)), torch.full((B,), p_valid), generator=g).long()
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    for r in empty_rows:
        mask[r] = False
    return mask.to(dtype=dtype, device=device)


def make_random_mask(B, T, p_valid=0.7, dtype=torch.bool, device="cpu", seed=2) -> torch.Tensor:
    """Mask ``[B, T]`` with valid tokens scattered anywhere (not only right padding)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, T, generator=g) < p_valid).to(dtype=dtype, device=device)


def make_domain_ids(B, num_domains, device="cpu", seed=3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_domains, (B,), generator=g).to(device)


def make_kernels(batch, k, d: Optional[int] = None, dtype=torch.float64, device="cpu", seed=4, scales=None):
    """PSD linear kernels ``[batch, k, k]`` = X X^T from embeddings ``[batch, k, d]``.

    ``scales`` (length batch) multiplies each kernel, to mix conditioning in one batch.
    """
    g = torch.Generator().manual_seed(seed)
    d = d if d is not None else max(2, k // 2)
    X = torch.randn(batch, k, d, generator=g, dtype=torch.float64) + torch.randn(batch, 1, d, generator=g, dtype=torch.float64)
    K = X @ X.mT
    if scales is not None:
        K = K * torch.as_tensor(scales, dtype=torch.float64).view(-1, 1, 1)
    return K.to(dtype=dtype, device=device)


def exit_spawned_worker() -> None:
    """End a spawned torch.distributed worker that finished its work, skipping interpreter
    finalisation: at that point gloo's C++ threads can still hold objects whose teardown
    aborts the process ("terminate called without an active exception", SIGABRT), which
    would fail a run whose results are already written. Call it after
    ``destroy_process_group()`` on the success path only; errors still propagate to
    ``torch.multiprocessing.spawn`` as usual."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------- torch.distributed workers


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_worker_env(rank: int, world: int, port: int, timeout_s=None) -> None:
    """The environment torchrun gives a worker, on loopback, one thread per worker (2 workers
    share 2 cores); then ``chameleon_ext.distributed.init_from_env`` sets the group up."""
    import sys

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "RANK": str(rank), "LOCAL_RANK": str(rank)}
    if timeout_s is not None:
        env["CHAMELEON_DIST_TIMEOUT"] = str(timeout_s)
    os.environ.update(env)
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)


def spawn_workers(fn, world: int, *args) -> None:
    """``fn(rank, world, port, *args)`` in ``world`` fresh processes on a free port. A port
    found free can be taken before the workers bind it: only that failure is retried."""
    import torch.multiprocessing as mp

    for attempt in range(3):
        try:
            mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)
            return
        except Exception as exc:  # noqa: BLE001
            if "address already in use" not in str(exc).lower() or attempt == 2:
                raise


def run_cli(argv, capsys):
    """``chameleon_ext.cli.main(argv)`` in-process -> ``(exit status, stdout, stderr)``; an
    argparse exit (``--help``, a bad option) counts as the status it exits with."""
    from chameleon_ext.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def ok_cli(argv, capsys) -> str:
    """:func:`run_cli` that must succeed; returns stdout."""
    code, out, err = run_cli(argv, capsys)
    assert code == 0, f"{argv[0]} failed with {code}: {err}"
    return out


def perturb_vectors_(model, seed: int):
    """Add noise to every 1-D parameter (biases, LayerNorm gains) in place, so a freshly
    initialised model's hidden states are O(1) and differ between domains and layers (a fresh
    init is nearly constant). Returns the model in eval mode."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def oracle_lambda(K: np.ndarray, share: float, span: float = 60.0, steps: int = 300) -> float:
    """lambda (mu = lambda k) at which sum_j s_j / (s_j + mu) = share * (k - 1), from the
    eigenvalues of the centred kernel, by bisection in log mu over max(s) e^(+-span) (float64).
    The tests' oracle; with fewer steps, the benchmark's plain NumPy alternative."""
    k = K.shape[0]
    H = np.eye(k) - 1.0 / k
    s = np.clip(np.linalg.eigvalsh(H @ K @ H), 0.0, None)
    target = share * (k - 1)
    lo, hi = math.log(s.max()) - span, math.log(s.max()) + span
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if (s / (s + math.exp(mid))).sum() > target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi)) / k
