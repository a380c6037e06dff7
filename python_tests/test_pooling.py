"""masked_mean_pool and domain_mean_pool against the plain-PyTorch oracles."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chameleon_ext
from chameleon_ext import reference

from .factories import CUDA, DEVICES, make_domain_ids, make_hidden, make_mask, make_random_mask

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Awkward shapes: singletons, odd widths, a width past 4096, rows longer than a GPU tile.
SHAPES = [(1, 1, 1), (2, 3, 7), (3, 17, 4097), (4, 33, 64), (5, 1, 9), (1, 100, 1), (2, 1500, 24), (7, 64, 768)]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64]


def tol(dtype):
    # Both sides accumulate in float32 (float64 for float64) from the same inputs; they
    # differ only in summation order.
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def expected_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_mean_pool_matches_reference(device, dtype, shape):
    B, T, H = shape
    hidden = make_hidden(B, T, H, dtype, device)
    mask = make_mask(B, T, device=device, empty_rows=[0] if B > 1 else [])
    out = chameleon_ext.masked_mean_pool(hidden, mask)
    assert out.dtype == expected_dtype(dtype) and out.shape == (B, H) and out.device == hidden.device
    torch.testing.assert_close(out, reference.masked_mean_pool(hidden, mask), **tol(dtype))
    if B > 1:
        assert torch.all(out[0] == 0), "a row with no valid token must pool to zeros"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_mean_pool_without_mask(device, dtype):
    hidden = make_hidden(3, 19, 33, dtype, device)
    out = chameleon_ext.masked_mean_pool(hidden)
    torch.testing.assert_close(out, hidden.to(out.dtype).mean(1), **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_mask_dtypes_count_nonzero_as_valid(device, mask_dtype):
    hidden = make_hidden(4, 23, 40, torch.float32, device)
    mask_bool = make_random_mask(4, 23, device=device)
    mask = mask_bool.to(mask_dtype)
    if mask_dtype != torch.bool:
        mask = mask * 3  # any non-zero value is "valid"
    out = chameleon_ext.masked_mean_pool(hidden, mask)
    torch.testing.assert_close(out, reference.masked_mean_pool(hidden, mask_bool), **tol(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_all_masked_gives_zeros_not_nan(device):
    hidden = make_hidden(3, 5, 8, torch.float32, device)
    mask = torch.zeros(3, 5, dtype=torch.bool, device=device)
    out = chameleon_ext.masked_mean_pool(hidden, mask)
    assert torch.equal(out, torch.zeros_like(out))
    sums, counts = chameleon_ext.domain_mean_pool(hidden, mask, torch.tensor([0, 1, 0], device=device), 2)
    assert torch.equal(sums, torch.zeros_like(sums)) and counts.tolist() == [0, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_non_contiguous_inputs(device, dtype):
    base = make_hidden(6, 40, 48, dtype, device)
    mask_full = make_random_mask(6, 80, device=device)
    cases = {
        "token_stride": (base[:, ::2, :], mask_full[:, ::4]),  # mask [6, 20]
        "batch_major": (base.transpose(0, 1).contiguous().transpose(0, 1), mask_full[:, :40].t().contiguous().t()),
        "hidden_stride": (make_hidden(6, 48, 40, dtype, device).transpose(1, 2), mask_full[:, 40:]),
        "sliced_h": (base[:, :, 3:40], mask_full[:, 40:]),
    }
    for name, (hidden, mask) in cases.items():
        assert not hidden.is_contiguous(), name
        out = chameleon_ext.masked_mean_pool(hidden, mask)
        torch.testing.assert_close(out, reference.masked_mean_pool(hidden, mask), **tol(dtype), msg=name)


# --------------------------------------------------------------------------- domain pool


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,num_domains", [((1, 1, 1), 1), ((9, 13, 7), 4), ((16, 70, 130), 5), ((3, 5, 4097), 7)])
def test_domain_mean_pool_matches_reference(device, dtype, shape, num_domains):
    B, T, H = shape
    hidden = make_hidden(B, T, H, dtype, device)
    mask = make_mask(B, T, device=device, empty_rows=[B - 1] if B > 2 else [])
    ids = make_domain_ids(B, num_domains, device)
    sums, counts = chameleon_ext.domain_mean_pool(hidden, mask, ids, num_domains)
    ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, num_domains)
    assert sums.dtype == expected_dtype(dtype) and sums.shape == (num_domains, H)
    assert counts.dtype == torch.int64 and torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_domain_mean_pool_empty_domain_and_int32_ids(device):
    hidden = make_hidden(6, 10, 12, torch.float32, device)
    ids = torch.tensor([0, 0, 2, 2, 2, 0], dtype=torch.int32, device=device)
    sums, counts = chameleon_ext.domain_mean_pool(hidden, None, ids, 4)
    assert counts.tolist() == [3, 0, 3, 0]
    assert torch.equal(sums[1], torch.zeros_like(sums[1]))
    torch.testing.assert_close(sums[2], hidden[2:5].mean(1).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_domain_mean_pool_accumulates_across_batches(device):
    """sums/counts from two half-batches add up to those of the whole batch."""
    hidden = make_hidden(10, 21, 16, torch.float64, device)
    mask = make_mask(10, 21, device=device, empty_rows=[3])
    ids = make_domain_ids(10, 3, device)
    whole = chameleon_ext.domain_mean_pool(hidden, mask, ids, 3)
    a = chameleon_ext.domain_mean_pool(hidden[:5], mask[:5], ids[:5], 3)
    b = chameleon_ext.domain_mean_pool(hidden[5:], mask[5:], ids[5:], 3)
    torch.testing.assert_close(a[0] + b[0], whole[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(a[1] + b[1], whole[1])


_DETERMINISM_SCRIPT = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
import chameleon_ext
from python_tests.factories import make_domain_ids, make_hidden, make_random_mask
sums, counts = chameleon_ext.domain_mean_pool(make_hidden(64, 50, 96), make_random_mask(64, 50), make_domain_ids(64, 3), 3)
print(hashlib.sha256(sums.numpy().tobytes() + counts.numpy().tobytes()).hexdigest())
"""


def test_domain_mean_pool_is_deterministic_across_thread_counts():
    # Fresh processes: changing the thread count inside one process upsets torch's LAPACK.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = {
        n: subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT, str(n)], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()
        for n in (1, 2)
    }
    assert digests[1] == digests[2] and len(digests[1]) == 64


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("device", DEVICES)
def test_pooling_bad_inputs_name_the_argument(device):
    hidden = make_hidden(2, 4, 3, torch.float32, device)
    ids = torch.tensor([0, 1], device=device)
    cases = [
        (lambda: chameleon_ext.masked_mean_pool(hidden[0]), "hidden must be \\[B, T, H\\]"),
        (lambda: chameleon_ext.masked_mean_pool(hidden.long()), "hidden must be float32"),
        (lambda: chameleon_ext.masked_mean_pool(hidden, torch.ones(2, 5, dtype=torch.bool, device=device)),
         "mask must be \\[B, T\\] = \\[2, 4\\], got \\[2, 5\\]"),
        (lambda: chameleon_ext.masked_mean_pool(hidden, torch.ones(2, 4, device=device)), "mask must be bool or an integer"),
        (lambda: chameleon_ext.domain_mean_pool(hidden, None, ids, 0), "num_domains must be >= 1"),
        (lambda: chameleon_ext.domain_mean_pool(hidden, None, ids[:1], 2), "domain_ids must be \\[B\\] = \\[2\\]"),
        (lambda: chameleon_ext.domain_mean_pool(hidden, None, ids.float(), 2), "domain_ids must be an integer"),
        (lambda: chameleon_ext.domain_mean_pool(hidden, None, torch.tensor([0, 2], device=device), 2),
         "domain_ids\\[1\\] = 2 is outside \\[0, num_domains\\)"),
        (lambda: chameleon_ext.domain_mean_pool(hidden, None, torch.tensor([-1, 0], device=device), 2),
         "domain_ids\\[0\\] = -1 is outside"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()


def test_bad_domain_id_writes_nothing_and_raises():
    hidden = make_hidden(3, 4, 5)
    with pytest.raises(ValueError, match="outside"):
        chameleon_ext.domain_mean_pool(hidden, None, torch.tensor([0, 1, 10**9]), 2)


@pytest.mark.skipif(not CUDA, reason="CUDA not available on this machine")
def test_mask_on_other_device_is_rejected():
    hidden = make_hidden(2, 4, 3, torch.float32, "cuda")
    with pytest.raises(ValueError, match="mask must be on hidden's device"):
        chameleon_ext.masked_mean_pool(hidden, torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.skipif(CUDA, reason="only meaningful without a GPU")
def test_cpu_only_build_reports_missing_cuda_kernels_clearly():
    if chameleon_ext.build_info()["cuda"]:
        pytest.skip("this is a CUDA build; its CUDA kernels need a GPU to run")
    pytest.skip("no CUDA device to create CUDA tensors on; the CPU-only build registers CUDA kernels that raise "
                "'built without CUDA kernels' (csrc/cuda/cuda_unavailable.cpp)")


# --------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("device", DEVICES)
def test_masked_mean_pool_gradcheck(device):
    hidden = make_hidden(3, 6, 5, torch.float64, device).requires_grad_()
    mask = make_mask(3, 6, device=device, empty_rows=[1])
    assert torch.autograd.gradcheck(lambda h: chameleon_ext.masked_mean_pool(h, mask), (hidden,))
    assert torch.autograd.gradcheck(lambda h: chameleon_ext.masked_mean_pool(h, None), (hidden,))
    assert torch.autograd.gradgradcheck(lambda h: chameleon_ext.masked_mean_pool(h, mask), (hidden,))


@pytest.mark.parametrize("device", DEVICES)
def test_domain_mean_pool_gradcheck(device):
    hidden = make_hidden(5, 4, 3, torch.float64, device).requires_grad_()
    mask = make_mask(5, 4, device=device, empty_rows=[2])
    ids = torch.tensor([1, 0, 1, 1, 0], device=device)
    assert torch.autograd.gradcheck(lambda h: chameleon_ext.domain_mean_pool(h, mask, ids, 3)[0], (hidden,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_gradient_matches_reference(dtype):
    hidden = make_hidden(2, 7, 6, dtype).requires_grad_()
    mask = make_mask(2, 7)
    g = torch.randn(2, 6)
    (chameleon_ext.masked_mean_pool(hidden, mask) * g).sum().backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    (reference.masked_mean_pool(hidden, mask) * g).sum().backward()
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, hidden.grad)


# --------------------------------------------------------------------------- dispatcher / compile


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_pooling(device):
    hidden = make_hidden(3, 9, 10, torch.float32, device).requires_grad_()
    mask = make_mask(3, 9, device=device)
    ids = torch.tensor([0, 2, 0], device=device)
    torch.library.opcheck(torch.ops.chameleon.masked_mean_pool.default, (hidden, mask))
    torch.library.opcheck(torch.ops.chameleon.masked_mean_pool.default, (hidden, None))
    torch.library.opcheck(torch.ops.chameleon.domain_mean_pool.default, (hidden, mask, ids, 3))


def test_pooling_under_torch_compile_fullgraph():
    hidden = make_hidden(4, 12, 16)
    mask = make_mask(4, 12)
    ids = torch.tensor([0, 1, 1, 0])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def embed(h, m, i):
        pooled = chameleon_ext.masked_mean_pool(h, m) * 2.0
        sums, counts = chameleon_ext.domain_mean_pool(h, m, i, 2)
        return pooled, sums / counts.clamp_min(1).unsqueeze(1)

    pooled, emb = embed(hidden, mask, ids)
    torch.testing.assert_close(pooled, 2.0 * reference.masked_mean_pool(hidden, mask))
    ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, 2)
    torch.testing.assert_close(emb, ref_sums / ref_counts.clamp_min(1).unsqueeze(1))


# --------------------------------------------------------------------------- fuzzing


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 6),
    T=st.integers(1, 40),
    H=st.integers(1, 70),
    p=st.floats(0.0, 1.0),
    D=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_pooling_against_reference(B, T, H, p, D, dtype, seed):
    hidden = make_hidden(B, T, H, dtype, seed=seed)
    mask = make_random_mask(B, T, p_valid=p, seed=seed + 1)
    ids = make_domain_ids(B, D, seed=seed + 2)
    torch.testing.assert_close(chameleon_ext.masked_mean_pool(hidden, mask), reference.masked_mean_pool(hidden, mask), **tol(dtype))
    sums, counts = chameleon_ext.domain_mean_pool(hidden, mask, ids, D)
    ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, D)
    torch.testing.assert_close(sums, ref_sums, **tol(dtype))
    assert torch.equal(counts, ref_counts)
