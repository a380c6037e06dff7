"""Masked mean pooling: the ext kernel against eager PyTorch, torch.bmm, torch.compile,
and a plain ``hidden.sum(1)`` as the machine's practical read bandwidth.

Each case records in extra_info the bytes the op must read (valid tokens x H x element
size) and the achieved GB/s; benchmarks/summarize.py turns the JSON into ratio tables.
"""

import pytest
import torch

import chameleon_ext
from chameleon_ext import reference
from python_tests.factories import CUDA, make_domain_ids, make_hidden, make_random_mask

CASES = [(64, 512, 768), (64, 512, 4096)]
QUICK_CASES = [(8, 64, 96)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICE = "cuda" if CUDA else "cpu"
P_VALID = 0.8  # 20% of tokens masked, as in the measurements

_compiled = {}


def _compiled_reference():
    if "pool" not in _compiled:
        _compiled["pool"] = torch.compile(reference.masked_mean_pool, dynamic=False)
    return _compiled["pool"]


PROVIDERS = {
    "ext": lambda h, m: chameleon_ext.masked_mean_pool(h, m),
    "reference": reference.masked_mean_pool,
    "bmm": reference.masked_mean_pool_bmm,
    "compiled_reference": lambda h, m: _compiled_reference()(h, m),
    "sum": lambda h, m: h.sum(1),  # bandwidth yardstick: reads every token, no mask
}


def _tol(provider, dtype_name):
    # The ext op accumulates in float32 like the reference; torch.bmm on bf16 rounds its
    # output to bf16, so that baseline is only bf16-accurate.
    if provider == "ext" or dtype_name == "fp32":
        return dict(rtol=1e-4, atol=1e-4)
    return dict(rtol=6e-2, atol=6e-2)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _record(benchmark, hidden, mask, provider, shape, dtype_name):
    elem = hidden.element_size()
    H = hidden.shape[2]
    tokens = hidden.shape[0] * hidden.shape[1] if provider == "sum" else int(mask.sum())
    benchmark.extra_info.update(
        provider=provider, shape=list(shape), dtype=dtype_name, device=DEVICE, bytes_read=tokens * H * elem
    )


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def bench_masked_mean_pool(benchmark, provider, dtype_name, case):
    shape = case
    B, T, H = shape
    hidden = make_hidden(B, T, H, DTYPES[dtype_name], DEVICE)
    mask = make_random_mask(B, T, p_valid=P_VALID, device=DEVICE)
    fn = PROVIDERS[provider]
    benchmark.group = f"masked_mean_pool {list(shape)} {dtype_name} {DEVICE}"
    _record(benchmark, hidden, mask, provider, shape, dtype_name)
    fn(hidden, mask)  # warm up (and compile)
    _sync()

    def run():
        out = fn(hidden, mask)
        _sync()
        return out

    out = benchmark(run)
    if provider != "sum":
        torch.testing.assert_close(out.float(), reference.masked_mean_pool(hidden, mask).float(), **_tol(provider, dtype_name))


def _domain_index_add(hidden, mask, ids, D):
    means = reference.masked_mean_pool_bmm(hidden, mask)
    valid = mask.any(1)
    sums = torch.zeros(D, hidden.shape[2], dtype=means.dtype, device=means.device)
    sums.index_add_(0, ids[valid], means[valid])
    return sums, torch.bincount(ids[valid], minlength=D)


DOMAIN_PROVIDERS = {
    "ext": lambda h, m, i, D: chameleon_ext.domain_mean_pool(h, m, i, D),
    "reference": reference.domain_mean_pool,
    "bmm_index_add": _domain_index_add,
}


@pytest.mark.parametrize("provider", list(DOMAIN_PROVIDERS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def bench_domain_mean_pool(benchmark, provider, dtype_name, case):
    shape = case
    if shape[2] > 1024:
        pytest.skip("domain pooling is timed at the GPT-2 width only")
    B, T, H = shape
    D = 7
    hidden = make_hidden(B, T, H, DTYPES[dtype_name], DEVICE)
    mask = make_random_mask(B, T, p_valid=P_VALID, device=DEVICE)
    ids = make_domain_ids(B, D, DEVICE)
    fn = DOMAIN_PROVIDERS[provider]
    benchmark.group = f"domain_mean_pool {list(shape)} {dtype_name} D={D} {DEVICE}"
    _record(benchmark, hidden, mask, provider, shape, dtype_name)

    def run():
        out = fn(hidden, mask, ids, D)
        _sync()
        return out

    sums, counts = benchmark(run)
    ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, D)
    torch.testing.assert_close(sums.float(), ref_sums.float(), **_tol(provider, dtype_name))
    assert torch.equal(counts.cpu(), ref_counts.cpu())
