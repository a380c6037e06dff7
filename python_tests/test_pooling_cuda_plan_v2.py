"""The v2 CUDA pooling kernels (csrc/cuda/pooling_cuda.cu, CHAMELEON_POOL_CUDA_KERNEL=v2, the
default) transliterated to NumPy and run on the CPU, line by line:

- row_means_warp_v2 (rows of at most 256 tokens, at least 1024 (row, strip) items): one warp
  per (row, strip) work item, the warps walking the items in a grid stride, all 32-token
  chunks of the row in order;
- row_means_block_v2 (longer rows, or few items): the block items of v1 (row, T split, strip);
- both: eight valid rows loaded per group (a missing row reads a 16-byte zero row in device
  memory), and each warp's mask bit for its next chunk or its next item's first chunk
  prefetched (checked here against the bit actually used);
- domain_sums_small (num_domains <= 16): per-chunk partial sums in batch order (4, 8 or 16
  accumulators per thread, each row adding its value or +0.0 to every one, 32 rows' ids per
  warp load, 8 rows' values per group), one combine in chunk order, no sort.

Every load is checked in bounds and aligned, every output written exactly once, and the
results are compared with the float64 oracles. Determinism: the emulations give bitwise
the same results for any grid size (the summation order depends on the shapes only).
Keep in step with the kernels' constants and formulas; v1 is in test_pooling_cuda_plan.py.
"""

import numpy as np
import pytest
import torch

from chameleon_ext import reference

from .factories import make_domain_ids, make_random_mask
from .test_pooling_cuda_plan import (K_CHUNK_T, K_SPLIT_ROUND, K_WARPS, combine_splits, make_geom, pick_vec,
                                     red_index, strided_view)

K_WARP_ROW_MAX_T = K_SPLIT_ROUND  # 256
K_WARP_ITEMS_MIN = 1024
K_GROUP = 8
K_SMALL_DOMAINS = 16
K_DOM_CHUNK_MIN = 32
K_DOM_MAX_CHUNKS = 128
K_DOM_THREADS = 256
K_DOM_ROW_GROUP = 8
LANES = np.arange(32)


class RowsV2:
    """The v2 row-means launch over a view of `storage` (1-D NumPy array of the input's
    values, elements of `elem` bytes) with `grid` blocks of 8 warps; chunk sums in `acc`."""

    def __init__(self, storage, elem, offset, size, stride, mask, acc):
        self.storage, self.offset, self.mask, self.acc = storage, offset, mask, acc
        self.B, self.T, self.H = size
        self.V = pick_vec(elem, size, stride)
        self.g = make_geom(size, stride, offset, self.V)
        assert self.g["head"] + (self.H - self.g["body_end"]) <= 32

    # -- helpers shared by both kernels

    def chunk_bit(self, start):
        """chunk_bit(next.mrow, next.c0, next.end, lane) for all lanes; start = (b, c0, end)."""
        b, c0, end = start
        t = c0 + LANES
        ok = t < end
        if self.mask is not None and b is not None:
            ok &= self.mask[b, np.minimum(t, self.T - 1)] if self.T > 0 else False
        return ok

    def lanes_of(self, strip):
        """(W, h per lane, active per lane) of a strip: the vector body or the edge strip."""
        g = self.g
        if strip < g["n_vec_strips"]:
            vi = strip * 32 + LANES
            return self.V, g["head"] + vi * self.V, vi < g["n_vec"]
        tail = self.H - g["body_end"]
        h = np.where(LANES < g["head"], LANES, g["body_end"] + (LANES - g["head"]))
        return 1, h, LANES < g["head"] + tail

    def load(self, b, t, cols, W):
        g = self.g
        addr = self.offset + b * g["sB"] + t * g["sT"] + cols  # [active lanes, W]
        assert addr.min() >= 0 and addr.max() < self.storage.size, "load out of bounds"
        if W > 1:
            assert np.all(addr[:, 0] % W == 0), "misaligned vector load"
        return self.storage[addr].astype(self.acc)

    def chunk_sums(self, b, c0, bits, cols, W):
        """chunk_sums_v2: the valid rows of the chunk, eight per group, pairwise tree."""
        js = [j for j in range(32) if bits[j]]
        a = np.zeros(cols.shape, dtype=self.acc)
        for i in range(0, len(js), K_GROUP):
            group = js[i:i + K_GROUP]
            xs = []
            for k in range(K_GROUP):
                # a missing row reads kZeroRow (16 zero bytes: W elements of any dtype)
                xs.append(self.load(b, c0 + group[k], cols, W) if k < len(group) else np.zeros(cols.shape, self.acc))
            a = a + (((xs[0] + xs[1]) + (xs[2] + xs[3])) + ((xs[4] + xs[5]) + (xs[6] + xs[7])))
        return a

    def span_sums(self, b, strip, W, cols, c_first, t_end, step, valid, nxt, kahan, log):
        """warp_span_sums: (total, count, bit handed back). `valid` is the prefetched bit of
        chunk c_first; it must equal the mask bit the chunk really has."""
        total = np.zeros(cols.shape)
        comp = np.zeros(cols.shape)
        count = 0
        if c_first >= t_end:
            assert not valid.any()
            return total, count, self.chunk_bit(nxt)
        c0 = c_first
        while c0 < t_end:
            c1 = c0 + step
            next_valid = self.chunk_bit((b, c1, t_end)) if c1 < t_end else self.chunk_bit(nxt)
            truth = self.chunk_bit((b, c0, t_end))
            assert np.array_equal(valid, truth), "prefetched mask bit differs from the chunk's"
            bits = valid
            valid = next_valid
            count += int(bits.sum())
            log.append((b, c0, strip))
            a = self.chunk_sums(b, c0, bits, cols, W).astype(np.float64)
            if kahan:
                y = a - comp
                t = total + y
                comp = (t - total) - y
                total = t
            else:
                total = total + a
            c0 += step
        return total, count, valid

    # -- the launches

    def path(self):
        """launch_row_means_v2's choice, from the shapes only."""
        g = self.g
        return "warp" if self.T <= K_WARP_ROW_MAX_T and self.B * g["n_strips"] >= K_WARP_ITEMS_MIN else "block"

    def run(self, grid, path=None):
        """path: the kernel to emulate; None = the launcher's choice. Forcing "warp" on a
        small batch checks the warp kernel's index arithmetic without 1024 rows."""
        g = self.g
        path = path or self.path()
        B, H = self.B, self.H
        self.means = np.full((B, H), np.nan)
        self.counts = np.full(B, -1, dtype=np.int64)
        self.writes = np.zeros((g["n_splits"], B, H), dtype=np.int64)
        self.count_writes = np.zeros((g["n_splits"], B), dtype=np.int64)
        self.chunks = []  # (b, c0) of every chunk any warp summed
        if path == "warp":
            assert self.T <= K_WARP_ROW_MAX_T and g["n_splits"] == 1
            self._warp_kernel(grid)
        else:
            self._block_kernel(grid)
        assert np.all(self.writes == 1), "every (split, row, column) written exactly once"
        assert np.all(self.count_writes == 1), "every (split, row) count written once"
        return self.means, self.counts

    def _warp_kernel(self, grid):
        g = self.g
        items = self.B * g["n_strips"]
        stride = grid * K_WARPS

        def start(item):
            return (item // g["n_strips"], 0, self.T) if item < items else (None, 0, 0)

        for blk in range(grid):
            for warp in range(K_WARPS):
                first = blk * K_WARPS + warp
                valid = self.chunk_bit(start(first))
                for item in range(first, items, stride):
                    b, strip = item // g["n_strips"], item % g["n_strips"]
                    W, h, active = self.lanes_of(strip)
                    cols = h[active][:, None] + np.arange(W)[None, :]
                    total, count, valid = self.span_sums(b, strip, W, cols, 0, self.T, K_CHUNK_T, valid,
                                                         start(item + stride), False, self.chunks)
                    self.means[b, cols] = (total / count).astype(self.acc) if count > 0 else 0.0
                    self.writes[0, b, cols.ravel()] += 1
                    if strip == 0:
                        self.counts[b] = count
                        self.count_writes[0, b] += 1

    def _block_kernel(self, grid):
        g = self.g
        B, H = self.B, self.H
        items = B * g["n_splits"] * g["n_strips"]
        ws_sum = np.full((g["n_splits"], B, H), np.nan)
        ws_cnt = np.full((g["n_splits"], B), -1, dtype=np.int64)

        def item_pos(item):
            strip = item % g["n_strips"]
            rest = item // g["n_strips"]
            return rest // g["n_splits"], rest % g["n_splits"], strip

        def block_item_start(item, warp):
            if item >= items:
                return (None, 0, 0)
            b, split, _ = item_pos(item)
            t_begin = split * g["split_T"]
            return (b, t_begin + warp * K_CHUNK_T, min(t_begin + g["split_T"], self.T))

        for blk in range(grid):
            here = [block_item_start(blk, w) for w in range(K_WARPS)]
            valid = [self.chunk_bit(here[w]) for w in range(K_WARPS)]
            for item in range(blk, items, grid):
                b, split, strip = item_pos(item)
                W, h, active = self.lanes_of(strip)
                cols = h[active][:, None] + np.arange(W)[None, :]
                s_red = np.full((K_WARPS, 32 * self.V), np.nan)
                slots = red_index(LANES[:, None], np.arange(W)[None, :])
                n = 0
                for w in range(K_WARPS):
                    nxt = block_item_start(item + grid, w)
                    hb, c0, end = here[w]
                    assert hb == b
                    total, count, valid[w] = self.span_sums(b, strip, W, cols, c0, end, K_SPLIT_ROUND, valid[w],
                                                            nxt, True, self.chunks)
                    full = np.zeros((32, W))
                    full[active] = total
                    s_red[w, slots] = full
                    n += count
                    here[w] = nxt
                s = np.zeros(cols.shape)
                for w in range(K_WARPS):
                    s = s + s_red[w, slots[active]]
                self.writes[split, b, cols.ravel()] += 1
                if g["n_splits"] == 1:
                    self.means[b, cols] = (s / n).astype(self.acc) if n > 0 else 0.0
                else:
                    ws_sum[split, b, cols] = s
                if strip == 0:
                    self.count_writes[split, b] += 1
                    if g["n_splits"] == 1:
                        self.counts[b] = n
                    else:
                        ws_cnt[split, b] = n
        if g["n_splits"] > 1:  # combine_splits_kernel, shared with v1
            combine_splits(ws_sum, ws_cnt, self.acc, self.means, self.counts)


def domain_chunk_rows(B, D):
    return max(K_DOM_CHUNK_MIN, 8 * D, -(-B // K_DOM_MAX_CHUNKS))


def emulate_domain_small(means, row_counts, ids, D):
    """domain_partials_kernel + domain_combine_kernel (1 <= D <= 16, B > 0, H > 0)."""
    B, H = means.shape
    assert 1 <= D <= K_SMALL_DOMAINS and B > 0 and H > 0
    chunk_rows = domain_chunk_rows(B, D)
    n_chunks = -(-B // chunk_rows)
    n_strips = -(-H // K_DOM_THREADS)
    assert n_chunks <= K_DOM_MAX_CHUNKS
    partial = np.full((n_chunks, D, H), np.nan)
    chunk_cnt = np.full((n_chunks, D), -1, dtype=np.int64)
    writes = np.zeros((n_chunks, D, H), dtype=np.int64)
    cnt_writes = np.zeros((n_chunks, D), dtype=np.int64)
    seen = np.zeros(B, dtype=np.int64)
    for item in range(n_chunks * n_strips):
        c, strip = item // n_strips, item % n_strips
        b0, b1 = c * chunk_rows, min(B, c * chunk_rows + chunk_rows)
        if strip == 0:
            for mine in range(min(D, K_DOM_THREADS)):  # threads < D
                n = 0
                for b in range(b0, b1):
                    if mine == 0:
                        assert 0 <= ids[b] < D, "device-side assert"
                        seen[b] += 1
                    n += 1 if (ids[b] == mine and row_counts[b] > 0) else 0
                chunk_cnt[c, mine] = n
                cnt_writes[c, mine] += 1
        h = strip * K_DOM_THREADS + np.arange(K_DOM_THREADS)
        hc = np.where(h < H, h, 0)  # every lane runs the loop; lanes past H read column 0
        kD = 4 if D <= 4 else 8 if D <= 8 else K_SMALL_DOMAINS  # accumulators per thread
        acc = np.zeros((kD, h.size))
        for b in range(b0, b1, 32):  # 32 rows: lane l loads ids[b + l], shuffled to all
            lane_d = [int(ids[b + lane]) if b + lane < b1 and 0 <= ids[b + lane] < D else -1 for lane in range(32)]
            n = min(b1 - b, 32)
            for r0 in range(0, n, K_DOM_ROW_GROUP):
                d, x = [], []
                for r in range(K_DOM_ROW_GROUP):  # rows past the chunk read row b
                    j = r0 + r
                    assert j <= 31
                    d.append(lane_d[j])
                    x.append(means[b + j if j < n else b, hc].astype(np.float64))
                for r in range(K_DOM_ROW_GROUP):
                    dr = d[r] if r0 + r < n else -1
                    for k in range(kD):  # every domain gets the row's value or +0.0
                        acc[k] = acc[k] + (x[r] if dr == k else 0.0)
        for k in range(kD):
            if k < D:
                partial[c, k, h[h < H]] = acc[k][h < H]
                writes[c, k, h[h < H]] += 1
    assert np.all(writes == 1) and np.all(cnt_writes == 1), "every partial written once"
    assert np.all(seen == 1), "every id checked once"
    sums = np.zeros((D, H))
    counts = np.zeros(D, dtype=np.int64)
    for d in range(D):
        for hh in range(H):
            s = 0.0
            for c in range(n_chunks):  # chunk order
                s += partial[c, d, hh]
            sums[d, hh] = s
        counts[d] = sum(int(chunk_cnt[c, d]) for c in range(n_chunks))
    return sums, counts


def _contig(B, T, H):
    return (B, T, H), (T * H, H, 1)


# (dtype, size, stride, offset): short rows (warp items) at T = 1, 127, 128 and the limit
# 256; long rows (block items) at 129..., 257, 512 and a split 4097; H not a multiple of
# the vector width, misaligned starts, every vector width, batches not a multiple of 8 warps.
V2_CASES = [
    (torch.bfloat16, *_contig(3, 1, 20), 0),
    (torch.bfloat16, *_contig(5, 127, 40), 0),
    (torch.bfloat16, (13, 128, 300), (128 * 304, 304, 1), 0),  # V = 8, ragged tail, 13 rows
    (torch.bfloat16, (3, 128, 77), (128 * 88, 88, 1), 3),  # misaligned head and tail
    (torch.float16, (2, 129, 50), (129 * 52, 52, 1), 1),  # V = 4
    (torch.bfloat16, *_contig(2, 256, 50), 1),  # V = 2, the warp kernel's longest rows
    (torch.bfloat16, *_contig(2, 257, 51), 0),  # V = 1, the block kernel's shortest rows
    (torch.float32, (3, 512, 70), (512 * 72, 72, 1), 2),
    (torch.float32, *_contig(2, 33, 3), 1),  # H < V: the edge strip only
    (torch.float64, (3, 17, 9), (17 * 10, 10, 1), 1),
    (torch.float32, *_contig(1, 4097, 40), 0),  # T split, last split of one token
    (torch.float64, *_contig(2, 700, 6), 0),  # T split, uneven last split
    (torch.float32, *_contig(2, 0, 8), 0),  # T = 0
]


def _ids(case):
    dtype, size, stride, offset = case
    return f"{str(dtype)[6:]}-{'x'.join(map(str, size))}-o{offset}"


@pytest.mark.parametrize("case", V2_CASES, ids=[_ids(c) for c in V2_CASES])
@pytest.mark.parametrize("masked", ["random", "none", "empty_rows"])
def test_rows_v2_plan_matches_reference_for_any_grid(case, masked):
    dtype, size, stride, offset = case
    hidden, storage = strided_view(dtype, size, stride, offset)
    B, T, H = size
    mask = None
    if masked != "none":
        mask = make_random_mask(B, T, p_valid=0.6, seed=7)
        mask[0] = False  # an empty row
        if masked == "empty_rows":
            mask[:] = False
            if B > 1 and T > 0:
                mask[-1, T - 1] = True  # one row with only its last token
    acc = np.float64 if dtype == torch.float64 else np.float32
    elem = torch.empty((), dtype=dtype).element_size()
    np_mask = None if mask is None else mask.numpy()
    want = reference.masked_mean_pool(hidden.double(), mask).numpy()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    want_counts = mask.sum(1).numpy() if mask is not None else np.full(B, T)
    # short rows: both kernels (the warp kernel is chosen for >= 1024 items; forced here)
    for path in ("warp", "block") if T <= K_WARP_ROW_MAX_T else ("block",):
        results = []
        for grid in (1, 3, 64):  # one block, a few (grid-stride loops), more blocks than items
            em = RowsV2(storage, elem, offset, size, stride, np_mask, acc)
            means, counts = em.run(grid, path)
            results.append((means, counts))
            # every valid chunk visited once per strip
            assert len(em.chunks) == len(set(em.chunks))
        for means, counts in results[1:]:  # determinism: the grid changes nothing
            assert np.array_equal(means, results[0][0]) and np.array_equal(counts, results[0][1])
        means, counts = results[0]
        if T > 1000:
            assert em.g["n_splits"] > 1
        if 0 < T <= K_WARP_ROW_MAX_T:
            assert em.g["n_splits"] == 1
        np.testing.assert_allclose(means, want, rtol=tol, atol=tol)
        np.testing.assert_array_equal(counts, want_counts)


@pytest.mark.parametrize("size,path", [
    ((4096, 128, 768), "warp"),  # the T = 128 goal's shape: 4096 x 3 items
    ((8, 128, 64), "block"),  # a small batch keeps 8 warps per row
    ((1024, 256, 8), "warp"),  # one strip per row: exactly 1024 items
    ((1023, 256, 8), "block"),
    ((1024, 257, 8), "block"),  # past the warp items' row length
    ((512, 1, 1000), "warp"),  # 4 vector strips + the edge strip per row
])
def test_rows_v2_kernel_choice_depends_on_shapes_only(size, path):
    B, T, H = size
    em = RowsV2(np.zeros(1, dtype=np.float32), 2, 0, size, (T * H, H, 1), None, np.float32)
    assert em.path() == path


def test_group_of_eight_with_missing_rows_sums_exactly():
    """Hand-computed: 11 valid rows of a chunk are two groups (8 + 3 and 5 zeros); with
    powers of two the float32 tree is exact, so the sum is known."""
    T, H = 32, 8
    storage = np.zeros(T * H, dtype=np.float32)
    for t in range(T):
        storage[t * H:(t + 1) * H] = 2.0 ** (t % 8)
    mask = np.zeros((1, T), dtype=bool)
    mask[0, [0, 1, 2, 5, 8, 9, 13, 20, 21, 30, 31]] = True
    em = RowsV2(storage, 4, 0, (1, T, H), (T * H, H, 1), mask, np.float32)
    means, counts = em.run(1)
    want = sum(2.0 ** (t % 8) for t in np.flatnonzero(mask[0])) / 11
    assert counts[0] == 11
    np.testing.assert_array_equal(means[0], np.full(H, np.float32(want)))


@pytest.mark.parametrize("B,D", [(1, 1), (7, 3), (127, 16), (128, 5), (129, 2), (300, 9), (5000, 7), (17000, 4)])
def test_domain_small_plan_matches_reference(B, D):
    T, H = 3, 300  # H over one strip of 256 threads and not a multiple of it
    g = torch.Generator().manual_seed(B + D)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    mask = make_random_mask(B, T, p_valid=0.5, seed=B)
    ids = make_domain_ids(B, max(1, D - 1), seed=D)  # leaves the last domain empty when D > 1
    means = reference.masked_mean_pool(hidden, mask).numpy().astype(np.float32)
    sums, counts = emulate_domain_small(means, mask.sum(1).numpy(), ids.numpy(), D)
    ref_sums, ref_counts = reference.domain_mean_pool(torch.from_numpy(means.astype(np.float64)).unsqueeze(1),
                                                      None, ids, D)
    ref_counts = torch.bincount(ids[mask.sum(1) > 0], minlength=D)
    np.testing.assert_allclose(sums, ref_sums.numpy(), rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(counts, ref_counts.numpy())
    if D > 1:
        assert counts[D - 1] == 0 and np.all(sums[D - 1] == 0)


def test_domain_small_combine_order_is_fixed_by_shape():
    """The chunking depends on B only (not on the device or the grid), and the sums are the
    chunks' partials added in chunk order: recomputed that way independently, bitwise equal.
    A different association (one running sum over the batch) rounds differently here, so
    the test would see an order change."""
    B, H, D = 1000, 4, 3
    rng = np.random.default_rng(0)
    means = (rng.standard_normal((B, H)) * 10.0 ** rng.integers(-6, 6, (B, 1))).astype(np.float32)
    ids = rng.integers(0, D, B)
    sums, _ = emulate_domain_small(means, np.ones(B, dtype=np.int64), ids, D)
    chunk = domain_chunk_rows(B, D)
    assert chunk == 32
    want = np.zeros((D, H))
    running = np.zeros((D, H))
    for d in range(D):
        for hh in range(H):
            parts = []
            for c0 in range(0, B, chunk):
                p = 0.0
                for b in range(c0, min(B, c0 + chunk)):
                    if ids[b] == d:
                        p += float(means[b, hh])
                parts.append(p)
            s = 0.0
            for p in parts:
                s += p
            want[d, hh] = s
            r = 0.0
            for b in range(B):
                if ids[b] == d:
                    r += float(means[b, hh])
            running[d, hh] = r
    assert np.array_equal(sums, want)
    assert not np.array_equal(sums, running)


def test_domain_small_sizes_are_bounded():
    """Partials at most a quarter of the float32 means (+ one chunk's rounding), chunks at
    most 128 for any B and D."""
    for D in (1, 2, 7, 16):
        for B in (1, 31, 32, 127, 128, 129, 4096, 16384, 16385, 10**6, 2**31):
            rows = domain_chunk_rows(B, D)
            n_chunks = -(-B // rows)
            assert n_chunks <= K_DOM_MAX_CHUNKS and rows >= 8 * D
            # bytes per column: partials n_chunks * D * 8 against the means' B * 4
            assert n_chunks * D * 8 <= B * 4 / 4 + D * 8
