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


# Pools every width around the CPU kernel's H-split boundaries under one thread count and
# checks each result against a float64 mean; run in a fresh process per thread count.
_THREADS_SCRIPT = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
import chameleon_ext
threads = torch.get_num_threads()
# the kernel splits H into at most 4 x threads power-of-two chunks of >= 256 columns
widths = sorted({w for c in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if c <= 4 * threads
                 for w in (512 * c - 1, 512 * c, 512 * c + 1, 257 * c, 257 * c + 1)} | {1, 255, 256, 131073})
g = torch.Generator().manual_seed(0)
for B in (1, 3):
    for H in widths:
        x = torch.randn(B, 2, H, generator=g)
        mask = torch.tensor([[True, False], [True, True], [False, False]][:B])
        want = (x.double() * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        got = chameleon_ext.masked_mean_pool(x, mask)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6, msg=f"B={B} H={H}")
        sums, counts = chameleon_ext.domain_mean_pool(x, mask, torch.zeros(B, dtype=torch.long), 1)
        torch.testing.assert_close(sums.double()[0], want[mask.any(1)].sum(0), rtol=1e-6, atol=1e-6, msg=f"B={B} H={H}")
        assert counts.tolist() == [int(mask.any(1).sum())]
print("ok", len(widths))
"""


@pytest.mark.parametrize("threads", [1, 3, 64, 72, 128, 257])
def test_pooling_under_many_thread_counts(threads):
    """Regression: with 128 threads and one row, H = 131073 was split into tasks of which the
    last started past H (a segfault). Every chunk-boundary width, each thread count in its own
    process (changing the thread count in this process would upset a later LAPACK call)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")  # 257 spinning threads on 2 cores would crawl
    proc = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(threads)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"threads={threads}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.stdout.startswith("ok")


# --------------------------------------------------------------------------- long rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_long_rows_keep_their_precision(device, dtype):
    """2**25 tokens, as an expanded view of one token row (stride 0 along T: no memory).
    A float32 running sum stops growing at 2**24 (ones would pool to 0.5); blocked sums
    added in float64 pool a constant row to itself. The mask keeps every third token, so
    the count (not T) is what divides."""
    T = 2**25
    row = torch.tensor([1.0, 0.1, -3.75, 1e-3, 7.0], dtype=dtype, device=device)
    hidden = row.view(1, 1, -1).expand(2, T, -1)
    mask = (torch.arange(T, device=device) % 3 == 0).unsqueeze(0).expand(2, T).clone()
    mask[1, : T // 2] = False
    want = row.double().expand(2, -1)  # the mean of identical rows is the row
    out = chameleon_ext.masked_mean_pool(hidden, mask)
    # Sums of at most 512 tokens (CPU; 32 on CUDA) in float32 (float64), added in compensated
    # float64: the error of one such sum, 64 x 2**-24 (64 x 2**-53), whatever T.
    rtol = 1e-14 if dtype == torch.float64 else 4e-6
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=0)
    torch.testing.assert_close(chameleon_ext.masked_mean_pool(hidden).double(), want, rtol=rtol, atol=0)
    sums, counts = chameleon_ext.domain_mean_pool(hidden, mask, torch.tensor([0, 0], device=device), 1)
    torch.testing.assert_close(sums.double(), 2 * want[:1], rtol=rtol, atol=0)
    assert counts.tolist() == [2]


@pytest.mark.parametrize("device", DEVICES)
def test_long_random_row_against_float64(device):
    """Random values over 2**21 tokens (4096 distinct rows repeated), against a float64 sum:
    the error stays at float32 rounding of the inputs' scale."""
    base = make_hidden(1, 4096, 3, torch.float32, device, seed=5)
    T = 2**21
    hidden = base.repeat(1, T // 4096, 1)
    want = hidden.double().mean(1)
    torch.testing.assert_close(chameleon_ext.masked_mean_pool(hidden).double(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5, 4), (3, 0, 4), (3, 5, 0), (0, 0, 0), (1, 1, 1), (1, 5, 1), (1, 1, 9)])
def test_empty_and_unit_shapes(device, shape):
    B, T, H = shape
    hidden = make_hidden(B, T, H, torch.float32, device)
    mask = make_random_mask(B, T, device=device)
    out = chameleon_ext.masked_mean_pool(hidden, mask)
    assert out.shape == (B, H)
    torch.testing.assert_close(out, reference.masked_mean_pool(hidden, mask), **tol(torch.float32))
    ids = make_domain_ids(B, 3, device)
    sums, counts = chameleon_ext.domain_mean_pool(hidden, mask, ids, 3)
    ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, 3)
    assert sums.shape == (3, H) and torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, **tol(torch.float32))


def test_cpu_tensor_with_a_meta_argument_raises():
    """The dispatcher sends any call with a meta tensor to the meta kernel: it must not hand
    back an uninitialised CPU tensor."""
    hidden = make_hidden(3, 5, 7)
    meta_mask = torch.ones(3, 5, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="mask must be on hidden's device cpu, got meta"):
        chameleon_ext.masked_mean_pool(hidden, meta_mask)
    with pytest.raises(ValueError, match="mask must be on hidden's device"):
        chameleon_ext.domain_mean_pool(hidden, meta_mask, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="domain_ids must be on the CPU or on hidden's device cpu, got meta"):
        chameleon_ext.domain_mean_pool(hidden, None, torch.zeros(3, dtype=torch.long, device="meta"), 2)
    # all-meta is shape inference and stays allowed
    out = chameleon_ext.masked_mean_pool(hidden.to("meta"), meta_mask)
    assert out.device.type == "meta" and out.shape == (3, 7)


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
        # ids on the CPU (any hidden): checked on the host. Bad ids on a GPU are a device-side
        # assert instead (test_bad_device_id_is_a_device_assert).
        (lambda: chameleon_ext.domain_mean_pool(hidden, None, torch.tensor([0, 2]), 2),
         "domain_ids\\[1\\] = 2 is outside \\[0, num_domains\\)"),
        (lambda: chameleon_ext.domain_mean_pool(hidden, None, torch.tensor([-1, 0]), 2),
         "domain_ids\\[0\\] = -1 is outside"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()


def test_bad_domain_id_writes_nothing_and_raises():
    hidden = make_hidden(3, 4, 5)
    with pytest.raises(ValueError, match="outside"):
        chameleon_ext.domain_mean_pool(hidden, None, torch.tensor([0, 1, 10**9]), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA not available on this machine")
def test_mask_on_other_device_is_rejected():
    hidden = make_hidden(2, 4, 3, torch.float32, "cuda")
    with pytest.raises(ValueError, match="mask must be on hidden's device"):
        chameleon_ext.masked_mean_pool(hidden, torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    "op", ["masked_mean_pool", "domain_mean_pool", "krls", "krls.lam_tensor", "krls_ex", "krls_ex.lam_tensor"]
)
def test_every_op_has_a_cuda_kernel_registered(op):
    # CUDA builds register the kernels; CPU-only builds register stubs that raise "built without
    # CUDA kernels" (csrc/cpu_only_build.cpp). Either way a CUDA tensor never falls through to a
    # missing-kernel dispatcher error. Checked on the registration, so it runs without a GPU.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"chameleon::{op}", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"chameleon::{op}", "CPU")


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


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(0, 6),
    T=st.integers(0, 600),
    H=st.integers(0, 70),
    offset=st.integers(0, 7),
    p=st.floats(0.0, 1.0),
    D=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_fuzz_pooling_against_reference(device, B, T, H, offset, p, D, dtype, seed):
    # offset: a view starting `offset` columns into a wider tensor (misaligned head, ragged tail)
    hidden = make_hidden(B, T, H + offset, dtype, device, seed=seed)[:, :, offset:]
    mask = make_random_mask(B, T, p_valid=p, seed=seed + 1, device=device)
    ids = make_domain_ids(B, D, device, seed=seed + 2)
    torch.testing.assert_close(chameleon_ext.masked_mean_pool(hidden, mask), reference.masked_mean_pool(hidden, mask), **tol(dtype))
    sums, counts = chameleon_ext.domain_mean_pool(hidden, mask, ids, D)
    ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, D)
    torch.testing.assert_close(sums, ref_sums, **tol(dtype))
    assert torch.equal(counts, ref_counts)


# --------------------------------------------------------------------------- CUDA only


def cuda_only(test):
    """Needs a GPU: skipped without one, and marked `gpu` (the GPU check runs `-m gpu`)."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="CUDA not available on this machine")(test))


@pytest.fixture(params=["v1", "v2"])
def pool_kernels(request, monkeypatch):
    """Both CUDA pooling kernel sets: v2 (the default: warp items for short rows, 8 loads in
    flight, sort-free sums for few domains) and v1, kept for A/B until v2 is measured."""
    monkeypatch.setenv("CHAMELEON_POOL_CUDA_KERNEL", request.param)
    return request.param


def _strided_view(dtype, size, stride, offset, device="cuda", seed=0):
    B, T, H = size
    need = offset + (B - 1) * stride[0] + (T - 1) * stride[1] + H
    g = torch.Generator().manual_seed(seed)
    storage = torch.randn(need, generator=g).to(dtype=dtype, device=device)
    return storage.as_strided(size, stride, offset)


# Each row-means instantiation: 16-byte vectors, narrower ones forced by the strides, the
# scalar body (odd stride), a misaligned head and ragged tail, H below one vector, T splits.
CUDA_VIEWS = [
    ((3, 40, 300), (40 * 304, 304, 1), 0),
    ((2, 30, 77), (30 * 88, 88, 1), 3),
    ((2, 20, 50), (20 * 52, 52, 1), 1),
    ((2, 20, 50), (20 * 50, 50, 1), 1),
    ((2, 20, 51), (20 * 51, 51, 1), 0),
    ((2, 33, 3), (33 * 4, 4, 1), 1),
    ((1, 3000, 40), (3000 * 40, 40, 1), 0),
    ((2, 700, 6), (700 * 6, 6, 1), 2),
]
# v2's warp items (rows of <= 256 tokens, >= 1024 (row, strip) items) at each vector width:
# the row strides 24, 12, 10 and 11 give 16-, 8-, 4-byte and scalar loads for 2-byte types;
# a misaligned head, the edge strip alone (H < V), several chunks per row.
CUDA_WARP_VIEWS = [
    ((1024, 5, 20), (5 * 24, 24, 1), 3),
    ((1100, 5, 10), (5 * 12, 12, 1), 0),
    ((1100, 5, 9), (5 * 10, 10, 1), 1),
    ((1100, 5, 11), (5 * 11, 11, 1), 0),
    ((1100, 7, 3), (7 * 4, 4, 1), 1),
    ((1030, 128, 44), (128 * 48, 48, 1), 0),
    ((1024, 256, 40), (256 * 40, 40, 1), 0),
]


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size,stride,offset", CUDA_VIEWS + CUDA_WARP_VIEWS)
def test_cuda_every_instantiation(dtype, size, stride, offset, pool_kernels):
    hidden = _strided_view(dtype, size, stride, offset)
    B, T, H = size
    mask = make_random_mask(B, T, p_valid=0.6, seed=7, device="cuda")
    mask[0, : T // 2] = False
    mask[1::7] = False  # empty rows
    for m in (mask, None):
        out = chameleon_ext.masked_mean_pool(hidden, m)
        torch.testing.assert_close(out, reference.masked_mean_pool(hidden, m), **tol(dtype))
        cpu = chameleon_ext.masked_mean_pool(hidden.cpu(), None if m is None else m.cpu())
        torch.testing.assert_close(out.cpu(), cpu, **tol(dtype))
    for D in (3, 40):  # v2: the sort-free sums, then the sorted segments
        ids = make_domain_ids(B, D, "cuda")
        sums, counts = chameleon_ext.domain_mean_pool(hidden, mask, ids, D)
        ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, D)
        torch.testing.assert_close(sums, ref_sums, **tol(dtype))
        assert torch.equal(counts, ref_counts)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_many_work_items_and_large_batch_domains(dtype, pool_kernels):
    """More (row, strip) items than the grid-stride launch has blocks, and many rows per
    domain (several segment chunks each, one domain empty)."""
    B, T, H, D = 5000, 3, 300, 4
    hidden = make_hidden(B, T, H, dtype, "cuda")
    mask = make_random_mask(B, T, device="cuda")
    ids = make_domain_ids(B, D - 1, "cuda")
    torch.testing.assert_close(chameleon_ext.masked_mean_pool(hidden, mask), reference.masked_mean_pool(hidden, mask), **tol(dtype))
    sums, counts = chameleon_ext.domain_mean_pool(hidden, mask, ids, D)
    ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, D)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-4, atol=1e-4)
    assert torch.equal(counts, ref_counts) and counts[D - 1] == 0


@cuda_only
@pytest.mark.parametrize("B,T,D", [(64, 1200, 3), (300, 128, 7), (1100, 128, 7), (1100, 128, 40)])
def test_cuda_results_are_deterministic(B, T, D, pool_kernels):
    """Bitwise the same run to run: block items with a T split (1200) and for short rows of a
    small batch (300 x 128), v2's warp items (1100 x 128), the sort-free sums for few domains
    (3, 7) and the sorted segments (40)."""
    hidden = make_hidden(B, T, 96, torch.bfloat16, "cuda")
    mask = make_random_mask(B, T, device="cuda")
    ids = make_domain_ids(B, D, "cuda")
    first = chameleon_ext.masked_mean_pool(hidden, mask)
    s1, c1 = chameleon_ext.domain_mean_pool(hidden, mask, ids, D)
    for _ in range(3):
        assert torch.equal(chameleon_ext.masked_mean_pool(hidden, mask), first)
        s2, c2 = chameleon_ext.domain_mean_pool(hidden, mask, ids, D)
        assert torch.equal(s1, s2) and torch.equal(c1, c2)
    # CPU ids give the same numbers as device ids
    s3, c3 = chameleon_ext.domain_mean_pool(hidden, mask, ids.cpu(), D)
    assert torch.equal(s1, s3) and torch.equal(c1, c3)


# Row lengths on both sides of the warp-item limit (256) and of one chunk (32), a T split
# (4097), batches that are not a multiple of a block's 8 warps, H not a multiple of the
# vector width, small batches and v2's warp items (1100 rows); domains 1, at the sort-free
# limit (16), past it (17) and many (300).
V2_SHAPES = [(3, 1, 20), (13, 127, 300), (5, 128, 77), (9, 129, 50), (7, 256, 768), (5, 257, 51), (3, 512, 70),
             (2, 4097, 40), (1100, 1, 20), (1100, 127, 40), (1100, 129, 40)]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("B,T,H", V2_SHAPES)
def test_cuda_short_and_long_rows_both_kernels(dtype, B, T, H, pool_kernels):
    hidden = make_hidden(B, T, H, dtype, "cuda")
    mask = make_random_mask(B, T, p_valid=0.6, seed=3, device="cuda")
    mask[0] = False  # an empty row
    for m in (mask, None, torch.zeros_like(mask)):
        want = reference.masked_mean_pool(hidden, m)
        torch.testing.assert_close(chameleon_ext.masked_mean_pool(hidden, m), want, **tol(dtype))
    for D in (1, 16, 17, 300):
        ids = make_domain_ids(B, D, "cuda")
        sums, counts = chameleon_ext.domain_mean_pool(hidden, mask, ids, D)
        ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, D)
        torch.testing.assert_close(sums, ref_sums, **tol(dtype))
        assert torch.equal(counts, ref_counts)


@cuda_only
def test_cuda_sort_free_domain_sums_many_chunks(pool_kernels):
    """num_domains <= 16 with more rows than 128 chunks of 128 (chunk size from B), the last
    domain empty; against the float64 oracle and the other kernel set."""
    B, T, H, D = 17000, 2, 40, 16
    hidden = make_hidden(B, T, H, torch.float32, "cuda")
    mask = make_random_mask(B, T, device="cuda")
    ids = make_domain_ids(B, D - 1, "cuda")
    sums, counts = chameleon_ext.domain_mean_pool(hidden, mask, ids, D)
    ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, D)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-4, atol=1e-4)
    assert torch.equal(counts, ref_counts) and counts[D - 1] == 0 and bool((sums[D - 1] == 0).all())


@cuda_only
def test_cuda_pool_kernel_switch_rejects_unknown_values(monkeypatch):
    hidden = make_hidden(2, 4, 8, torch.float32, "cuda")
    monkeypatch.setenv("CHAMELEON_POOL_CUDA_KERNEL", "v3")
    with pytest.raises(ValueError, match="CHAMELEON_POOL_CUDA_KERNEL must be 'v1' or 'v2'"):
        chameleon_ext.masked_mean_pool(hidden, None)
    with pytest.raises(ValueError, match="CHAMELEON_POOL_CUDA_KERNEL"):
        chameleon_ext.domain_mean_pool(hidden, None, torch.tensor([0, 1], device="cuda"), 2)


@cuda_only
def test_cuda_ids_on_the_cpu_and_wrong_devices():
    hidden = make_hidden(4, 6, 8, torch.float32, "cuda")
    ids = torch.tensor([0, 1, 1, 0], dtype=torch.int32)
    sums, counts = chameleon_ext.domain_mean_pool(hidden, None, ids, 2)
    assert sums.device == hidden.device and counts.device == hidden.device
    torch.testing.assert_close(sums, reference.domain_mean_pool(hidden, None, ids.cuda(), 2)[0])
    with pytest.raises(ValueError, match="mask must be on hidden's device"):
        chameleon_ext.domain_mean_pool(hidden, torch.ones(4, 6, dtype=torch.bool), ids, 2)
    with pytest.raises(ValueError, match="outside"):
        chameleon_ext.domain_mean_pool(hidden, None, torch.tensor([0, 5, 0, 0]), 2)
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="domain_ids must be on the CPU or on hidden's device"):
            chameleon_ext.domain_mean_pool(hidden, None, ids.to("cuda:1"), 2)
        with pytest.raises(ValueError, match="mask must be on hidden's device"):
            chameleon_ext.masked_mean_pool(hidden, torch.ones(4, 6, dtype=torch.bool, device="cuda:1"))


_DEVICE_ASSERT_SCRIPT = """
import torch, chameleon_ext
h = torch.randn(3, 4, 5, device="cuda")
try:
    chameleon_ext.domain_mean_pool(h, None, torch.tensor([0, 7, 1], device="cuda"), 2)
    torch.cuda.synchronize()
except RuntimeError as e:
    print("raised", "device-side assert" in str(e) or "assert" in str(e).lower())
else:
    print("no error")
"""


@cuda_only
def test_bad_device_id_is_a_device_assert():
    """Ids on the GPU are never read back (sync-free); a bad one trips a device-side assert,
    which poisons the CUDA context, hence a fresh process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _DEVICE_ASSERT_SCRIPT], cwd=root, capture_output=True, text=True, timeout=300)
    assert "raised True" in proc.stdout, proc.stdout + proc.stderr[-2000:]


@cuda_only
def test_cuda_non_default_stream():
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        hidden = make_hidden(8, 600, 256, torch.bfloat16, "cuda")
        mask = make_random_mask(8, 600, device="cuda")
        ids = make_domain_ids(8, 3, "cuda")
        out = chameleon_ext.masked_mean_pool(hidden, mask)
        sums, counts = chameleon_ext.domain_mean_pool(hidden, mask, ids, 3)
        want = reference.masked_mean_pool(hidden, mask)
        ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, 3)
    stream.synchronize()
    torch.testing.assert_close(out, want, **tol(torch.bfloat16))
    torch.testing.assert_close(sums, ref_sums, rtol=1e-4, atol=1e-4)
    assert torch.equal(counts, ref_counts)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_cuda_second_device():
    with torch.cuda.device(0):
        hidden = make_hidden(5, 300, 72, torch.float16, "cuda:1")
        mask = make_random_mask(5, 300, device="cuda:1")
        ids = make_domain_ids(5, 2, "cuda:1")
        out = chameleon_ext.masked_mean_pool(hidden, mask)
        sums, counts = chameleon_ext.domain_mean_pool(hidden, mask, ids, 2)
    assert out.device == hidden.device and sums.device == hidden.device
    torch.testing.assert_close(out, reference.masked_mean_pool(hidden, mask), **tol(torch.float16))
    ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, 2)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-4, atol=1e-4)
    assert torch.equal(counts, ref_counts)


@cuda_only
def test_cuda_compile_reduce_overhead_fullgraph():
    """torch.compile's CUDA graphs (mode="reduce-overhead") over both sync-free ops."""
    hidden = make_hidden(16, 300, 64, torch.bfloat16, "cuda")
    mask = make_random_mask(16, 300, device="cuda")
    ids = make_domain_ids(16, 3, "cuda")

    @torch.compile(mode="reduce-overhead", fullgraph=True)
    def embed(h, m, i):
        pooled = chameleon_ext.masked_mean_pool(h, m) * 2.0
        sums, counts = chameleon_ext.domain_mean_pool(h, m, i, 3)
        return pooled, sums / counts.clamp_min(1).unsqueeze(1)

    ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, 3)
    for _ in range(3):  # warm-up, record, replay
        pooled, emb = embed(hidden, mask, ids)
        torch.testing.assert_close(pooled, 2.0 * reference.masked_mean_pool(hidden, mask), **tol(torch.bfloat16))
        torch.testing.assert_close(emb, ref_sums / ref_counts.clamp_min(1).unsqueeze(1), rtol=1e-4, atol=1e-4)


@cuda_only
def test_cuda_graph_capture_of_an_embedding_step():
    """A small forward pass, then both pooling ops, captured once and replayed on new data."""
    torch.manual_seed(0)
    B, T, H, D = 8, 128, 64, 3
    model = torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.GELU(), torch.nn.Linear(H, H)).cuda()
    x = torch.randn(B, T, H, device="cuda")
    mask = make_random_mask(B, T, device="cuda")
    ids = make_domain_ids(B, D, "cuda")

    def step():
        with torch.no_grad():
            hidden = model(x)
            return chameleon_ext.masked_mean_pool(hidden, mask), chameleon_ext.domain_mean_pool(hidden, mask, ids, D)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pooled, (sums, counts) = step()
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(B, T, H, device="cuda", generator=g))
        mask.copy_(torch.rand(B, T, device="cuda", generator=g) < 0.7)
        ids.copy_(torch.randint(0, D, (B,), device="cuda", generator=g))
        graph.replay()
        with torch.no_grad():
            hidden = model(x)
        torch.testing.assert_close(pooled, reference.masked_mean_pool(hidden, mask), rtol=1e-5, atol=1e-5)
        ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, D)
        torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-5)
        assert torch.equal(counts, ref_counts)
