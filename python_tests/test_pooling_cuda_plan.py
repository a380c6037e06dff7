"""The CUDA pooling kernels' work decomposition, transliterated to NumPy and run on the CPU.

No GPU is needed: this checks the index arithmetic of csrc/cuda/pooling_cuda.cu (vector
width from strides and alignment, the misaligned head and ragged tail in the edge strip, the
split of T, the warps' 32-token chunks and their ballot order, the compensated float64
totals, the fixed-order combines, and the device-side CSR segments of domain_mean_pool)
against the float64 oracles. It asserts what a wrong index would break on the device: every
load in bounds and vector loads aligned, every output element written exactly once, every
valid token counted once. Keep it in step with the kernel's constants and formulas.
"""

import numpy as np
import pytest
import torch

from chameleon_ext import reference

from .factories import make_domain_ids, make_random_mask

K_WARPS, K_CHUNK_T = 8, 32
K_SPLIT_ROUND = K_WARPS * K_CHUNK_T  # 256
K_TARGET_ITEMS = 2048
K_SEG_CHUNK = 32


def pick_vec(elem, size, stride):
    V = 16 // elem
    sB = stride[0] if size[0] > 1 else 0
    sT = stride[1] if size[1] > 1 else 0
    while V > 1 and (sB % V or sT % V):
        V //= 2
    return V


def make_geom(size, stride, offset, V):
    """offset: the view's storage offset in elements (allocations are 16-byte aligned)."""
    B, T, H = size
    g = dict(B=B, T=T, H=H, sB=stride[0], sT=stride[1])
    g["head"] = min(H, (V - offset % V) % V)
    g["n_vec"] = (H - g["head"]) // V
    g["body_end"] = g["head"] + g["n_vec"] * V
    g["n_vec_strips"] = (g["n_vec"] + 31) // 32
    g["n_strips"] = g["n_vec_strips"] + (1 if g["head"] > 0 or g["body_end"] < H else 0)
    base = B * g["n_strips"]
    splits = 1
    if 0 < base < K_TARGET_ITEMS and T > K_SPLIT_ROUND:
        splits = min(-(-K_TARGET_ITEMS // base), -(-T // K_SPLIT_ROUND))
    per = -(-T // splits)
    g["split_T"] = max(K_SPLIT_ROUND, -(-per // K_SPLIT_ROUND) * K_SPLIT_ROUND)
    g["n_splits"] = -(-T // g["split_T"]) if T > 0 else 1
    return g


def red_index(lane, v):
    """Where row_item keeps value v of lane `lane` in its shared buffer s_red[warp][32 * V]."""
    return v * 32 + lane


def _emulate(storage, elem, offset, size, stride, mask, acc):
    """row_means_kernel (+ combine_splits_kernel) over a view of `storage` (1-D NumPy array
    of the input's values), elements of `elem` bytes, accumulating chunks in `acc`.
    Returns (means [B, H], counts [B], V, geometry)."""
    B, T, H = size
    V = pick_vec(elem, size, stride)
    g = make_geom(size, stride, offset, V)
    means = np.full((B, H), np.nan)
    counts = np.full(B, -1, dtype=np.int64)
    ws_sum = np.full((g["n_splits"], B, H), np.nan)
    ws_cnt = np.full((g["n_splits"], B), -1, dtype=np.int64)
    writes = np.zeros((g["n_splits"], B, H), dtype=np.int64)
    assert g["head"] + (H - g["body_end"]) <= 32

    def load(b, t, cols, W):
        addr = offset + b * g["sB"] + t * g["sT"] + cols  # [lanes, W]
        assert addr.min() >= 0 and addr.max() < storage.size, "load out of bounds"
        if W > 1:
            assert np.all(addr[:, 0] % W == 0), "misaligned vector load"
            assert np.all(np.diff(addr, axis=1) == 1)
        return storage[addr].astype(acc)

    items = B * g["n_splits"] * g["n_strips"]
    for item in range(items):
        strip = item % g["n_strips"]
        rest = item // g["n_strips"]
        split, b = rest % g["n_splits"], rest // g["n_splits"]
        lanes = np.arange(32)
        if strip < g["n_vec_strips"]:
            W = V
            vi = strip * 32 + lanes
            active = vi < g["n_vec"]
            h = g["head"] + vi * V
        else:
            W = 1
            tail = H - g["body_end"]
            h = np.where(lanes < g["head"], lanes, g["body_end"] + (lanes - g["head"]))
            active = lanes < g["head"] + tail
        cols = h[active][:, None] + np.arange(W)[None, :]
        t_begin = split * g["split_T"]
        t_end = min(g["T"], t_begin + g["split_T"])
        totals, n = [], 0
        for warp in range(K_WARPS):
            total = np.zeros(cols.shape)
            comp = np.zeros(cols.shape)
            count = 0
            for c0 in range(t_begin + warp * K_CHUNK_T, t_end, K_SPLIT_ROUND):
                js = [j for j in range(32) if c0 + j < t_end and (mask is None or mask[b, c0 + j])]
                count += len(js)
                a = np.zeros(cols.shape, dtype=acc)
                i = 0
                while len(js) - i >= 4:
                    x0, x1, x2, x3 = (load(b, c0 + js[i + k], cols, W) for k in range(4))
                    a = a + ((x0 + x1) + (x2 + x3))
                    i += 4
                for j in js[i:]:
                    a = a + load(b, c0 + j, cols, W)
                y = a.astype(np.float64) - comp
                t = total + y
                comp = (t - total) - y
                total = t
            totals.append(total)
            n += count
        # through the block's shared buffer, as the kernel does (every lane writes W values)
        s_red = np.full((K_WARPS, 32 * V), np.nan)
        slots = red_index(lanes[:, None], np.arange(W)[None, :])  # [32, W]
        assert slots.max() < 32 * V and len(np.unique(slots)) == slots.size
        for w in range(K_WARPS):
            full = np.zeros((32, W))
            full[active] = totals[w]
            s_red[w, slots] = full
        s = np.zeros(cols.shape)
        for w in range(K_WARPS):
            s = s + s_red[w, slots[active]]
        c = cols
        writes[split, b, c.ravel()] += 1
        if g["n_splits"] == 1:
            means[b, c] = (s / n).astype(acc) if n > 0 else 0.0
            if strip == 0:
                counts[b] = n
        else:
            ws_sum[split, b, c] = s
            if strip == 0:
                ws_cnt[split, b] = n
    assert np.all(writes == 1), "every (split, row, column) written exactly once"
    if g["n_splits"] > 1:
        combine_splits(ws_sum, ws_cnt, acc, means, counts)
    return means, counts, V, g


def combine_splits(ws_sum, ws_cnt, acc, means, counts):
    """combine_splits_kernel (v1 and v2): the splits added in split order, then the mean."""
    n_splits, B, H = ws_sum.shape
    for b in range(B):
        for hh in range(H):
            s, c = 0.0, 0
            for k in range(n_splits):
                s += ws_sum[k, b, hh]
                c += ws_cnt[k, b]
            means[b, hh] = np.float64(acc(s / c)) if c > 0 else 0.0
            if hh == 0:
                counts[b] = c


def strided_view(dtype, size, stride, offset, seed=0):
    """A view of random storage, and the storage as a NumPy array (float32 for half types)."""
    B, T, H = size
    need = offset + (B - 1) * stride[0] + (T - 1) * stride[1] + H if B and T and H else offset + 1
    g = torch.Generator().manual_seed(seed)
    storage = torch.randn(need, generator=g).to(dtype)
    hidden = storage.as_strided(size, stride, offset)
    np_storage = storage.float().numpy() if dtype != torch.float64 else storage.numpy()
    return hidden, np_storage


# (dtype, size, stride, offset, expected V): each vector width, heads and tails, T splits.
CASES = [
    (torch.bfloat16, (3, 40, 300), (40 * 304, 304, 1), 0, 8),  # V = 8, ragged tail (300 % 8)
    (torch.bfloat16, (2, 30, 77), (30 * 88, 88, 1), 3, 8),  # misaligned head and tail
    (torch.float16, (2, 20, 50), (20 * 52, 52, 1), 1, 4),  # strides multiple of 4 only
    (torch.bfloat16, (2, 20, 50), (20 * 50, 50, 1), 1, 2),  # strides multiple of 2 only
    (torch.bfloat16, (2, 20, 51), (20 * 51, 51, 1), 0, 1),  # odd stride: scalar body
    (torch.float32, (2, 33, 70), (33 * 72, 72, 1), 2, 4),
    (torch.float32, (2, 33, 3), (33 * 4, 4, 1), 1, 4),  # H < V: the edge strip only
    (torch.float64, (3, 17, 9), (17 * 10, 10, 1), 1, 2),
    (torch.float32, (1, 1500, 40), (1500 * 40, 40, 1), 0, 4),  # T split (one row)
    (torch.float64, (2, 700, 6), (700 * 6, 6, 1), 0, 2),  # T split, uneven last split
    (torch.float32, (2, 0, 8), (0, 8, 1), 0, 4),  # T = 0
]


@pytest.mark.parametrize("dtype,size,stride,offset,V", CASES)
@pytest.mark.parametrize("masked", [True, False])
def test_row_means_plan_matches_reference(dtype, size, stride, offset, V, masked):
    hidden, storage = strided_view(dtype, size, stride, offset)
    B, T, H = size
    mask = make_random_mask(B, T, p_valid=0.6, seed=7) if masked else None
    if masked and B > 1:
        mask[0] = False  # an empty row
    acc = np.float64 if dtype == torch.float64 else np.float32
    elem = torch.empty((), dtype=dtype).element_size()
    means, counts, got_V, g = _emulate(storage, elem, offset, size, stride, None if mask is None else mask.numpy(), acc)
    assert got_V == V
    if T > 1000:
        assert g["n_splits"] > 1
    want = reference.masked_mean_pool(hidden.double(), mask).numpy()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    np.testing.assert_allclose(means, want, rtol=tol, atol=tol)
    want_counts = mask.sum(1).numpy() if mask is not None else np.full(B, T)
    np.testing.assert_array_equal(counts, want_counts)


def test_split_geometry_is_shape_only_and_bounded():
    """Splits in multiples of 256 tokens, never more than needed for 2048 work items, and a
    workspace independent of T (2**31 tokens in one row: 2048 splits of 2**20)."""
    g = make_geom((1, 2**31, 768), (2**31 * 768, 768, 1), 0, 8)
    assert g["n_splits"] * g["split_T"] >= 2**31 and g["split_T"] % 256 == 0
    assert g["n_splits"] <= K_TARGET_ITEMS
    g = make_geom((64, 512, 768), (512 * 768, 768, 1), 0, 8)
    assert (g["n_strips"], g["n_splits"], g["split_T"]) == (3, 2, 256)
    g = make_geom((4096, 512, 768), (512 * 768, 768, 1), 0, 8)
    assert g["n_splits"] == 1


# --------------------------------------------------------------------------- domain segments


def chunk_domain(chunk_off, D, g):
    lo, hi = 0, D
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if chunk_off[mid] <= g:
            lo = mid
        else:
            hi = mid
    return lo


def emulate_domain_segments(means, row_counts, ids, D):
    B, H = means.shape
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    offsets = np.searchsorted(sorted_ids, np.arange(D + 1), side="left")
    lengths = offsets[1:] - offsets[:-1]
    chunk_off = np.concatenate([[0], np.cumsum((lengths + K_SEG_CHUNK - 1) // K_SEG_CHUNK)])
    max_chunks = B // K_SEG_CHUNK + D
    assert chunk_off[D] <= max_chunks
    partial = np.full((max_chunks, H), np.nan)
    seen = np.zeros(B, dtype=np.int64)
    for g in range(max_chunks):
        if g >= chunk_off[D]:
            continue
        d = chunk_domain(chunk_off, D, g)
        assert chunk_off[d] <= g < chunk_off[d + 1]
        p0 = offsets[d] + (g - chunk_off[d]) * K_SEG_CHUNK
        p1 = min(p0 + K_SEG_CHUNK, offsets[d + 1])
        s = np.zeros(H)
        for p in range(p0, p1):
            assert ids[order[p]] == d
            seen[order[p]] += 1
            s = s + means[order[p]].astype(np.float64)
        partial[g] = s
    assert np.all(seen == 1), "every row in exactly one chunk"
    sums = np.zeros((D, H))
    for d in range(D):
        s = np.zeros(H)
        for g in range(chunk_off[d], chunk_off[d + 1]):
            s = s + partial[g]
        sums[d] = s
    counts = np.zeros(D, dtype=np.int64)
    for b in range(B):
        if row_counts[b] > 0:
            counts[ids[b]] += 1
    return sums, counts


@pytest.mark.parametrize("B,D", [(0, 3), (1, 1), (31, 2), (33, 1), (200, 9), (97, 40)])
def test_domain_segments_plan_matches_reference(B, D):
    T, H = 6, 5
    g = torch.Generator().manual_seed(B + D)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    mask = make_random_mask(B, T, p_valid=0.5, seed=B)
    ids = make_domain_ids(B, max(1, D - 1), seed=D)  # leaves the last domain empty
    means = reference.masked_mean_pool(hidden, mask).numpy()
    sums, counts = emulate_domain_segments(means, mask.sum(1).numpy(), ids.numpy(), D)
    ref_sums, ref_counts = reference.domain_mean_pool(hidden, mask, ids, D)
    np.testing.assert_allclose(sums, ref_sums.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(counts, ref_counts.numpy())


def _max_bank_conflict(double_indices):
    """Largest number of distinct 8-byte words one warp access touches in one shared-memory
    bank pair (32 banks of 4 bytes; a 64-bit access by 32 lanes is served in two halves of 16
    lanes, each conflict-free when its 16 words fall in 16 different bank pairs)."""
    worst = 1
    for half in (double_indices[:16], double_indices[16:]):
        words = np.unique(half)
        worst = max(worst, int(np.bincount(words % 16).max()))
    return worst


@pytest.mark.parametrize("V", [1, 2, 4, 8])
def test_reduction_buffer_layout_is_one_to_one_and_conflict_free(V):
    lanes = np.arange(32)
    for W in sorted({1, V}):  # the edge strip (W = 1) and the vector body (W = V)
        slots = red_index(lanes[:, None], np.arange(W)[None, :])
        assert slots.min() >= 0 and slots.max() < 32 * V
        assert len(np.unique(slots)) == slots.size
        for v in range(W):  # one store (and one load) instruction per v, all 32 lanes
            assert _max_bank_conflict(slots[:, v]) == 1
    # the lane-major layout it replaced: 16-way conflicts at W = 8
    if V == 8:
        assert _max_bank_conflict(lanes * 8) == 8 and _max_bank_conflict(lanes * 8 + 1) == 8
