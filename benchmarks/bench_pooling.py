"""Masked mean pooling and domain pooling: the ext ops against eager PyTorch (reference),
torch.bmm, torch.compile(reference), and a plain ``hidden.sum(1)`` as a read-bandwidth
yardstick.

Inputs are made once per case (every provider of a case reads the same tensors): on the CPU
by the tests' factories, on CUDA directly on the device (host generation of the 2e9 values of
the largest case would take minutes). Every provider's output is checked against the oracle. Each case records in extra_info the bytes the op must read (valid tokens x H x
element size); on CUDA also the device time (CUDA events, L2 flushed before each round,
see benchmarks/timing.py) and the copy bandwidth measured in the same run, so
benchmarks/summarize.py reports GB/s and the fraction of copy bandwidth. The CUDA shapes
are far beyond the H200's 60 MB L2.
"""

import functools

import pytest
import torch

import chameleon_ext
from chameleon_ext import reference
from python_tests.factories import CUDA, make_domain_ids, make_hidden, make_random_mask

from .timing import run_timed

DEVICE = "cuda" if CUDA else "cpu"
# (B, T, H, dtype): on CPU the shapes of RESULTS.md; on CUDA inputs of 0.8 to 4.3 GB.
if CUDA:
    CASES = [(1024, 512, 768, "bf16"), (256, 2048, 4096, "bf16")]
    DOMAIN_CASES = [(1024, 512, 768, "bf16", 7), (4096, 128, 768, "bf16", 7), (4096, 128, 768, "bf16", 1)]
else:
    CASES = [(64, 512, s, d) for s in (768, 4096) for d in ("fp32", "bf16", "fp16")]
    DOMAIN_CASES = [(64, 512, 768, d, 7) for d in ("fp32", "bf16", "fp16")]
QUICK_CASES = [(8, 64, 96, "bf16"), (4, 300, 40, "fp16")]
DOMAIN_QUICK_CASES = [(8, 64, 96, "bf16", 3)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
P_VALID = 0.8  # 20% of tokens masked, as in the measurements

_compiled_fns = {}


@functools.lru_cache(maxsize=1)
def _inputs(B, T, H, dtype_name, D=None):
    """(hidden, mask, ids) for a case; only the last case is kept (the largest is 4.3 GB)."""
    if not CUDA:
        hidden = make_hidden(B, T, H, DTYPES[dtype_name], DEVICE)
        mask = make_random_mask(B, T, p_valid=P_VALID, device=DEVICE)
        return hidden, mask, make_domain_ids(B, D, DEVICE) if D else None
    g = torch.Generator(device="cuda").manual_seed(B * 31 + T * 7 + H)
    hidden = torch.randn(B, T, H, generator=g, device="cuda", dtype=DTYPES[dtype_name])
    hidden += torch.randn(B, 1, 1, generator=g, device="cuda", dtype=DTYPES[dtype_name])
    mask = torch.rand(B, T, generator=g, device="cuda") < P_VALID
    ids = torch.randint(0, D, (B,), generator=g, device="cuda") if D else None
    return hidden, mask, ids


def _compiled(name, fn):
    if name not in _compiled_fns:
        _compiled_fns[name] = torch.compile(fn, dynamic=False)
    return _compiled_fns[name]


PROVIDERS = {
    "ext": chameleon_ext.masked_mean_pool,
    "reference": reference.masked_mean_pool,
    "bmm": reference.masked_mean_pool_bmm,
    "compiled_reference": lambda h, m: _compiled("pool", reference.masked_mean_pool)(h, m),
    "sum": lambda h, m: h.sum(1),  # bandwidth yardstick: reads every token, no mask
}


def _tol(provider, dtype_name):
    # The ext op accumulates in float32 like the reference; torch.bmm on half inputs rounds
    # its output to half, so that baseline is only half-accurate.
    if provider == "ext" or dtype_name == "fp32":
        return dict(rtol=1e-4, atol=1e-4)
    return dict(rtol=6e-2, atol=6e-2)


def _record(benchmark, hidden, mask, provider, shape, dtype_name):
    elem = hidden.element_size()
    H = hidden.shape[2]
    tokens = hidden.shape[0] * hidden.shape[1] if provider == "sum" else int(mask.sum())
    benchmark.extra_info.update(
        provider=provider, shape=list(shape), dtype=dtype_name, device=DEVICE, bytes_read=tokens * H * elem
    )


@pytest.mark.parametrize("provider", list(PROVIDERS))
def bench_masked_mean_pool(benchmark, provider, case):
    B, T, H, dtype_name = case
    shape = (B, T, H)
    hidden, mask, _ = _inputs(B, T, H, dtype_name)
    benchmark.group = f"masked_mean_pool {list(shape)} {dtype_name} {DEVICE}"
    _record(benchmark, hidden, mask, provider, shape, dtype_name)
    out = run_timed(benchmark, PROVIDERS[provider], hidden, mask)
    if provider != "sum":
        torch.testing.assert_close(out.float(), reference.masked_mean_pool(hidden, mask).float(), **_tol(provider, dtype_name))


def _domain_bmm(hidden, mask, ids, D):
    means = reference.masked_mean_pool_bmm(hidden, mask)
    valid = mask.any(1)
    sums = torch.zeros(D, hidden.shape[2], dtype=means.dtype, device=means.device)
    sums.index_add_(0, ids[valid], means[valid])
    return sums, torch.bincount(ids[valid], minlength=D)


DOMAIN_PROVIDERS = {
    "ext": chameleon_ext.domain_mean_pool,
    "reference": reference.domain_mean_pool,
    "bmm": _domain_bmm,
    "compiled_reference": lambda h, m, i, D: _compiled("domain", reference.domain_mean_pool)(h, m, i, D),
}


@pytest.mark.parametrize("provider", list(DOMAIN_PROVIDERS))
def bench_domain_mean_pool(benchmark, provider, domain_case):
    B, T, H, dtype_name, D = domain_case
    shape = (B, T, H)
    hidden, mask, ids = _inputs(B, T, H, dtype_name, D)
    benchmark.group = f"domain_mean_pool {list(shape)} {dtype_name} D={D} {DEVICE}"
    _record(benchmark, hidden, mask, provider, shape, dtype_name)
    sums, counts = run_timed(benchmark, DOMAIN_PROVIDERS[provider], hidden, mask, ids, D)
    ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, D)
    torch.testing.assert_close(sums.float(), ref_sums.float(), **_tol(provider, dtype_name))
    assert torch.equal(counts.cpu(), ref_counts.cpu())
