"""A line-by-line NumPy transliteration of the CUDA sweep kernel (krls_sweep_kernel in
csrc/cuda/krls_sweep.cuh, the v2 kernel for 16 < k <= 64), run on the CPU by the tests.

Every thread of a matrix is one entry of the leading axis of the arrays (``t``); each line of
the kernel is one vectorised statement over the threads that execute it, in program order.
Registers: ``x[t, r, g]`` is the kernel's ``x[r][g]``. Shuffles: ``v[t ^ o]`` is
``__shfl_xor_sync(v, o)`` (o < 32 stays inside the warp). Shared memory is a ``Shared``
object that also checks what the hardware would not: every access stays inside the block's
memory and its matrix's slot, nothing is read before it was written for the current matrix
(each matrix starts on NaN-poisoned memory), and between two barriers no address is written
by one thread and touched by another (a race), and each pivot step's named barrier counts
exactly the threads still in the loop. Global loads use the element strides of the input, so
transposed views exercise the same index formulas as the kernel.
"""

from __future__ import annotations

import numpy as np

SEG, SEG_PITCH = 16, 18  # kSeg, kSegPitch
STATUS_OK, NON_FINITE, NOT_SYMMETRIC, NOT_PD, LAM_TOO_SMALL, BAD_LAM = 0, 1, 2, 3, 4, 5
DBL_MAX = np.finfo(np.float64).max
DBL_EPSILON = np.finfo(np.float64).eps


class SweepShape:
    """SweepShape<KP>."""

    def __init__(self, KP: int):
        assert KP in (32, 64)
        self.segs = KP // SEG
        self.threads = KP // 2 * self.segs
        self.warps = self.threads // 32
        self.rows_per_warp = 64 // self.segs
        self.matrices = 4 if self.warps == 1 else 1
        self.block_threads = self.threads * self.matrices
        self.pivot_slot = self.segs * SEG_PITCH
        self.vec = self.pivot_slot + 2
        self.shared = (2 * self.vec + 2 * KP + 3 * self.warps + 1 + 1) // 2 * 2


def seg_index(m):
    return (m >> 4) * SEG_PITCH + (m & (SEG - 1))


class Shared:
    """The block's shared memory, with the checks described in the module docstring."""

    def __init__(self, size: int):
        self.mem = np.full(size, np.nan)
        self.written = np.zeros(size, dtype=bool)
        self.lo, self.hi = 0, size
        self.phase: list[tuple[np.ndarray, np.ndarray, bool]] = []
        self.barriers = 0

    def begin_matrix(self, lo: int, hi: int) -> None:
        """A new matrix in slot [lo, hi): its memory holds whatever was there (poisoned)."""
        self.lo, self.hi = lo, hi
        self.mem[lo:hi] = np.nan
        self.written[lo:hi] = False

    def _check(self, addr: np.ndarray) -> None:
        assert addr.size == 0 or (addr.min() >= self.lo and addr.max() < self.hi), "access outside the matrix's slot"

    def read(self, addr, threads) -> np.ndarray:
        addr, threads = np.broadcast_arrays(np.asarray(addr), np.asarray(threads))
        self._check(addr)
        assert self.written[addr].all(), "shared memory read before it was written for this matrix"
        self.phase.append((addr.ravel(), threads.ravel(), False))
        return self.mem[addr]

    def read2(self, addr, threads):
        """A 16-byte (double2) load: the address must be 16-byte aligned."""
        assert (np.asarray(addr) % 2 == 0).all(), "misaligned double2 access"
        return self.read(addr, threads), self.read(np.asarray(addr) + 1, threads)

    def write2(self, addr, threads, lo, hi) -> None:
        assert (np.asarray(addr) % 2 == 0).all(), "misaligned double2 access"
        self.write(addr, threads, lo)
        self.write(np.asarray(addr) + 1, threads, hi)

    def write(self, addr, threads, values) -> None:
        addr, threads = np.broadcast_arrays(np.asarray(addr), np.asarray(threads))
        self._check(addr)
        self.phase.append((addr.ravel(), threads.ravel(), True))
        self.mem[addr] = values
        self.written[addr] = True

    def barrier(self) -> None:
        """matrix_sync: every address written in this phase was touched by one thread only."""
        self.barriers += 1
        if self.phase:
            addr = np.concatenate([a for a, _, _ in self.phase])
            thr = np.concatenate([t for _, t, _ in self.phase])
            wrote = np.concatenate([np.full(a.size, w) for a, _, w in self.phase])
            for a in np.unique(addr[wrote]):
                touching = np.unique(thr[addr == a])
                assert touching.size == 1, f"race on shared address {a}: threads {touching.tolist()}"
        self.phase = []


def _global_view(K: np.ndarray):
    """The flat memory behind K [batch, k, k] (any non-negative strides) and its element strides."""
    item = K.itemsize
    strides = [s // item for s in K.strides]
    assert all(s >= 0 for s in strides)
    span = 1 + sum((n - 1) * s for n, s in zip(K.shape, strides))
    flat = np.lib.stride_tricks.as_strided(K, shape=(span,), strides=(item,))
    return flat, strides


def emulate_sweep_launch(K, lam, center=True, scale_by_k=True, KP=None, max_blocks=1 << 20):
    """launch_sweep + krls_sweep_kernel over a batch K [batch, k, k] (float32 or float64).
    ``lam`` is a float or a per-matrix float64 array. ``max_blocks`` caps the grid (kMaxBlocks)
    to exercise the grid-stride loop. Returns (out [batch, k] in K's dtype, status, detail)."""
    K = np.asarray(K)
    batch, k = K.shape[0], K.shape[-1]
    KP = KP or (32 if k <= 32 else 64)
    assert 1 <= k <= KP
    sh = SweepShape(KP)
    flat, (sb, sr, sc) = _global_view(K)
    lam_arr = None if np.isscalar(lam) else np.asarray(lam, dtype=np.float64)
    sym_tol = 1e-4 if K.dtype == np.float32 else 1e-8
    out = np.full(batch * k, np.nan, dtype=K.dtype)
    writes = np.zeros(batch * k, dtype=int)
    status = np.full(batch, -1, dtype=np.int32)
    detail = np.full(batch, -1, dtype=np.int32)
    blocks = min((batch + sh.matrices - 1) // sh.matrices, max_blocks)
    for block in range(blocks):
        smem = Shared(sh.matrices * sh.shared)
        for slot in range(sh.matrices):  # the block's matrices share nothing but the block
            b = block * sh.matrices + slot
            while b < batch:
                smem.begin_matrix(slot * sh.shared, (slot + 1) * sh.shared)
                # a failed factorisation runs on to the end in inf / NaN, as on the device
                with np.errstate(over="ignore", invalid="ignore"):
                    _matrix(sh, KP, smem, slot, b, flat, sb, sr, sc, k, lam, lam_arr, center, scale_by_k, sym_tol,
                            out, writes, status, detail)
                b += blocks * sh.matrices
    assert (writes == 1).all(), "every score is written exactly once"
    assert (status >= 0).all() and (detail >= 0).all()
    return out.reshape(batch, k), status, detail


def _matrix_mu(lam_scalar, lam_arr, b, k, scale_by_k):
    lv = lam_arr[b] if lam_arr is not None else lam_scalar
    m = lv * k if scale_by_k else lv
    ok = m > 0.0 and m <= DBL_MAX
    return (m if ok else 1.0), (STATUS_OK if ok else BAD_LAM)


def _matrix(sh, KP, smem, slot, b, flat, sb, sr, sc, k, lam_scalar, lam_arr, center, scale_by_k, sym_tol,
            out, writes, status, detail):
    t = np.arange(sh.threads)  # thread within its matrix
    tid = slot * sh.threads + t  # threadIdx.x, for the race check
    warp = t >> 5
    cs = t % sh.segs
    col0 = cs * SEG
    row0 = (t // sh.segs) * 2
    wlo = warp * sh.rows_per_warp
    whi = wlo + sh.rows_per_warp - 1
    vec0 = slot * sh.shared
    vec1 = vec0 + sh.vec
    dpiv = vec1 + sh.vec
    rinv = dpiv + KP
    red = rinv + KP
    first_fail = red + 3 * sh.warps
    inv_k = 1.0 / k

    # 1. load
    x = np.zeros((sh.threads, 2, SEG))
    maxabs = np.zeros(sh.threads)
    maxasym = np.zeros(sh.threads)
    finite = np.ones(sh.threads, dtype=np.int64)
    seg_cols = k - col0
    for r in range(2):
        live_row = row0 + r < k
        px = b * sb + (row0 + r) * sr + col0 * sc  # element offsets of K[i, col0], K[col0, i]
        py = b * sb + col0 * sr + (row0 + r) * sc
        for g in range(SEG):
            live = live_row & (g < seg_cols)
            xv = np.where(live, flat[np.where(live, px, 0)].astype(np.float64), 0.0)
            yv = np.where(live, flat[np.where(live, py, 0)].astype(np.float64), 0.0)
            px = px + sc
            py = py + sr
            finite &= np.isfinite(xv).astype(np.int64)
            ax, dxy = np.abs(xv), np.abs(xv - yv)
            maxabs = np.where(ax > maxabs, ax, maxabs)
            maxasym = np.where(dxy > maxasym, dxy, maxasym)
            x[:, r, g] = 0.5 * (xv + yv)
    o = 16
    while o > 0:
        maxabs = np.fmax(maxabs, maxabs[t ^ o])
        maxasym = np.fmax(maxasym, maxasym[t ^ o])
        finite = finite & finite[t ^ o]
        o >>= 1
    if sh.warps > 1:
        lead = t[(t & 31) == 0]
        smem.write(red + warp[lead] * 3 + 0, tid[lead], maxabs[lead])
        smem.write(red + warp[lead] * 3 + 1, tid[lead], maxasym[lead])
        smem.write(red + warp[lead] * 3 + 2, tid[lead], finite[lead].astype(np.float64))
        smem.barrier()
        for w in range(sh.warps):
            maxabs = np.fmax(maxabs, smem.read(red + w * 3 + 0, tid))
            maxasym = np.fmax(maxasym, smem.read(red + w * 3 + 1, tid))
            finite = finite & (smem.read(red + w * 3 + 2, tid) != 0.0).astype(np.int64)
    assert len(set(maxabs)) == 1 and len(set(finite)) == 1  # uniform per matrix from here
    maxabs, maxasym, finite = maxabs[0], maxasym[0], finite[0]
    mu, st = _matrix_mu(lam_scalar, lam_arr, b, k, scale_by_k)
    if st == STATUS_OK and not finite:
        st = NON_FINITE
    if st == STATUS_OK and maxasym > sym_tol * maxabs:
        st = NOT_SYMMETRIC
    if st != STATUS_OK:
        mu = 1.0
        x[:] = 0.0

    # 2. centre
    if center:
        rowmean = np.zeros((sh.threads, 2))
        for r in range(2):
            s = np.zeros(sh.threads)
            for g in range(SEG):
                s = s + x[:, r, g]
            o = 1
            while o < sh.segs:
                s = s + s[t ^ o]
                o <<= 1
            rowmean[:, r] = s * inv_k
        w0 = t[cs == 0]
        smem.write(vec1 + seg_index(row0[w0]), tid[w0], rowmean[w0, 0])
        smem.write(vec1 + seg_index(row0[w0] + 1), tid[w0], rowmean[w0, 1])
        smem.barrier()
        grand = np.zeros(sh.threads)
        for m in range(k):
            grand = grand + smem.read(vec1 + seg_index(m), tid)
        grand = grand * inv_k
        for g in range(SEG):
            rm = smem.read(vec1 + cs * SEG_PITCH + g, tid)
            for r in range(2):
                sel = (row0 + r < k) & (col0 + g < k)
                x[sel, r, g] += grand[sel] - rowmean[sel, r] - rm[sel]

    # 3. the sweep
    acc_cols = KP // 32
    acc_warp = warp == sh.warps - 1
    lane = t & 31
    acc = np.zeros((sh.threads, acc_cols))
    smem.write(first_fail + 0 * t[t == 0], tid[t == 0], -1.0)
    j_end = np.minimum(k, whi + 1)  # per thread (uniform per warp)
    for j in range(k):
        looping = j < j_end  # the threads still in the loop at step j
        if not looping.any():
            break
        v = vec1 if (j & 1) else vec0
        for r in range(2):
            wr = t[looping & (row0 + r == j)]
            for g in range(0, SEG, 2):  # double2 stores
                smem.write2(v + cs[wr] * SEG_PITCH + g, tid[wr], x[wr, r, g], x[wr, r, g + 1])
            pv = wr[(j >> 4) == cs[wr]]
            for p in pv:  # one thread: row j's owner in the segment holding column j
                d = smem.read(v + seg_index(j), tid[p])
                piv = d + mu
                ok = piv > 0.0 and piv <= DBL_MAX
                if not ok and smem.read(first_fail, tid[p]) < 0.0:
                    smem.write(first_fail, tid[p], float(j))
                rr = 1.0 / np.sqrt(piv if ok else 1.0)  # rsqrt
                smem.write2(v + sh.pivot_slot, tid[p], rr, rr * rr)
                smem.write(dpiv + j, tid[p], d)
                smem.write(rinv + j, tid[p], rr)
                smem.write(v + seg_index(j), tid[p], 0.0)
        # pivot_sync: the named barrier's count must be exactly the threads still looping
        assert 32 * (sh.warps - j // sh.rows_per_warp) == int(looping.sum())
        smem.barrier()
        lt = t[looping]
        rj, rj2 = smem.read2(v + sh.pivot_slot + 0 * lt, tid[lt])
        rj_t = np.zeros(sh.threads)
        rj2_t = np.zeros(sh.threads)
        rj_t[lt], rj2_t[lt] = rj, rj2
        aw = t[looping & acc_warp]
        for q in range(acc_cols):
            m = lane[aw] + 32 * q
            w = rj_t[aw] * smem.read(v + seg_index(m), tid[aw])
            acc[aw, q] = np.where(m < j, acc[aw, q] + w * w, acc[aw, q])
        active = t[looping & (whi > j) & (wlo < k)]
        a = np.zeros((sh.threads, 2))
        for r in range(2):
            i = row0[active] + r
            ci = smem.read(v + seg_index(i), tid[active])
            a[active, r] = np.where(i > j, rj2_t[active] * ci, 0.0)
        for g in range(0, SEG, 2):
            cx, cy = smem.read2(v + cs[active] * SEG_PITCH + g, tid[active])
            for r in range(2):
                x[active, r, g] = x[active, r, g] - a[active, r] * cx
                x[active, r, g + 1] = x[active, r, g + 1] - a[active, r] * cy
    smem.barrier()  # matrix_sync: every warp

    # 4. scores, by the last warp
    fail = int(smem.read(first_fail, tid)[0])
    if st == STATUS_OK and fail >= 0:
        st = LAM_TOO_SMALL if mu <= 1024.0 * k * DBL_EPSILON * maxabs else NOT_PD
    for tt in t[acc_warp]:
        for q in range(acc_cols):
            m = lane[tt] + 32 * q
            if m >= k:
                continue
            dm = smem.read(dpiv + m, tid[tt])
            rm = smem.read(rinv + m, tid[tt])
            w2 = rm * rm
            S = np.fmin(np.fmax(dm * w2 - mu * (w2 * w2 * acc[tt, q]), 0.0), 1.0)
            out[b * k + m] = S if st == STATUS_OK else np.nan
            writes[b * k + m] += 1
    status[b] = st
    detail[b] = 0 if st == STATUS_OK else (fail if fail >= 0 else 0)
    smem.barrier()


def cuda_krls_kernel_for(k: int, v2: bool = True) -> str:
    """Which kernel krls_cuda_result launches for k (CHAMELEON_KRLS_PATH=auto, no override)."""
    if k > 64:
        return "library"
    if k <= 8:
        return "registers<8>"
    if k <= 16:
        return "registers<16>"
    if v2:
        return "sweep<32>" if k <= 32 else "sweep<64>"
    return "registers<32>" if k <= 32 else "shared"
