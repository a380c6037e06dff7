// The CUDA sweep kernel for krls at 16 < k <= 64 (the default, v2; launched from
// krls_cuda.cu, which also keeps the previous kernels). Checked on the CPU, line by line, by
// python_tests/krls_sweep_emulation.py: change the two together.
#pragma once

#include <cfloat>
#include <cstdint>

#include "../krls.h"
#include "krls_device.cuh"

namespace chameleon {

// One pass over the pivots j = 0..k-1 builds W = L^-1 in place of the matrix (a triangular
// sweep, no separate triangular solve). With X = Kc and r_j = rsqrt(d_j + mu), step j is the
// rank-1 update
//   X[i][m] -= r_j^2 X[i][j] c_m   for every row i > j and every column m != j,
// where c = row j of X (c_j := 0). Columns m > j hold the Schur complement of the pivots
// before j (kept symmetric, so row j right of the diagonal is also column j below it: the
// row alone is the broadcast), and d_j = X[j][j] is the pivot without mu. Columns m < j hold
// L^-1 with a lazy scale: W[p][m] = -r_p r_m^2 X[p][m], frozen once row p is published (at
// step p), and column j is never touched again by its own step, so no element needs a
// special case. Hence
//   S_i = d_i W_ii^2 - mu sum_{p>i} W_pi^2 = r_i^2 (d_i - mu r_i^2 acc_i),
//   acc_i = sum_{p>i} (r_p X[p][i])^2,
// accumulated as each row p is broadcast. Work: k^3/3 fused multiply-adds, as Cholesky plus a
// triangular inverse, but every step is the same dense update.
//
// Layout: the matrix is padded to KP = 32 (k = 17..32) or 64 (k = 33..64); a thread holds 2
// rows x 16 columns in registers (static indices only), so a matrix takes KP^2 / 32 threads:
// one warp (4 matrices per block) or four warps (one matrix per block). Per step a thread
// reads 8 16-byte broadcasts of c (from shared memory, segments padded 4 banks apart) and
// does 32 FMAs; the only per-matrix shared memory is c, double-buffered (one barrier per
// step), its pivots and a 3-value reduction per warp. A warp whose rows are all padding skips
// the update, and a warp leaves the pivot loop once its last row is published (warps own
// consecutive rows, so at step j the last kWarps - j / kRowsPerWarp warps remain).
constexpr int kSeg = 16;       // columns per thread (one segment)
constexpr int kSegPitch = 18;  // doubles per segment in shared memory: 16 + 2 of padding

template <int KP>
struct SweepShape {
  static_assert(KP == 32 || KP == 64, "the sweep kernel pads k to 32 or 64");
  static constexpr int kSegs = KP / kSeg;               // threads sharing a row pair
  static constexpr int kThreads = KP / 2 * kSegs;       // per matrix: 32 or 128
  static constexpr int kWarps = kThreads / 32;          // per matrix: 1 or 4
  static constexpr int kRowsPerWarp = 64 / kSegs;       // consecutive rows of one warp
  static constexpr int kMatrices = kWarps == 1 ? 4 : 1;  // per block
  static constexpr int kBlockThreads = kThreads * kMatrices;  // 128
  static constexpr int kPivotSlot = kSegs * kSegPitch;  // r_j and r_j^2 travel here, beside c
  static constexpr int kVec = kPivotSlot + 2;           // one broadcast vector (even: 16-byte aligned)
  // doubles per matrix (two vectors, d and r per pivot, the reduction, the first failed
  // pivot), even so that every matrix's vectors stay 16-byte aligned
  static constexpr int kShared = (2 * kVec + 2 * KP + 3 * kWarps + 1 + 1) / 2 * 2;
};

// Where column m of the broadcast vector lives (its segment is padded).
__device__ __forceinline__ int seg_index(int m) { return (m >> 4) * kSegPitch + (m & (kSeg - 1)); }

// A barrier over the threads of one matrix: its warp, or (four warps) its block.
template <int WARPS>
__device__ __forceinline__ void matrix_sync() {
  if constexpr (WARPS == 1) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// The barrier of one pivot step over the `threads` threads of the warps still in the loop
// (a named barrier, so warps that have left do not hold it up).
template <int WARPS>
__device__ __forceinline__ void pivot_sync(int threads) {
  if constexpr (WARPS == 1) {
    __syncwarp();
  } else {
    asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
  }
}

template <typename scalar_t, int KP>
__global__ void __launch_bounds__(SweepShape<KP>::kBlockThreads, 4)
    krls_sweep_kernel(const scalar_t* __restrict__ K, int64_t batch, int64_t sb, int64_t sr, int64_t sc, int k,
                      double lam_scalar, const double* __restrict__ lam, bool center, bool scale_by_k,
                      double sym_tol, scalar_t* __restrict__ out, int* __restrict__ status,
                      int* __restrict__ detail) {
  using Shape = SweepShape<KP>;
  constexpr int kSegs = Shape::kSegs;
  __shared__ __align__(16) double smem[Shape::kMatrices * Shape::kShared];
  const int t = threadIdx.x % Shape::kThreads;     // thread within its matrix
  const int slot = threadIdx.x / Shape::kThreads;  // matrix within the block
  const int warp = t >> 5;                         // warp within the matrix
  const int cs = t % kSegs;                        // column segment: columns col0 .. col0 + 15
  const int col0 = cs * kSeg;
  const int row0 = (t / kSegs) * 2;                // rows row0 and row0 + 1
  const int wlo = warp * Shape::kRowsPerWarp, whi = wlo + Shape::kRowsPerWarp - 1;  // this warp's rows
  double* const vec0 = smem + slot * Shape::kShared;  // the broadcast vectors of even / odd steps
  double* const vec1 = vec0 + Shape::kVec;
  double* const dpiv = vec1 + Shape::kVec;  // [KP]: d_j, the pivots without mu
  double* const rinv = dpiv + KP;            // [KP]: r_j = rsqrt(d_j + mu)
  double* const red = rinv + KP;             // [kWarps][3]: max|K|, max asymmetry, all finite
  double* const first_fail = red + 3 * Shape::kWarps;  // the first pivot that failed, or -1
  const double inv_k = 1.0 / k;

  for (int64_t b = static_cast<int64_t>(blockIdx.x) * Shape::kMatrices + slot; b < batch;
       b += static_cast<int64_t>(gridDim.x) * Shape::kMatrices) {
    const scalar_t* Kb = K + b * sb;

    // 1. Load the thread's 2 x 16 block, symmetrised (K[i, m] and K[m, i]); padding stays 0.
    //    Every element of the matrix is some thread's K[i, m], so max|K|, finiteness and the
    //    asymmetry are reduced over those alone (NaN is ignored by the max, as by fmax).
    double x[2][kSeg];
    double maxabs = 0.0, maxasym = 0.0;
    int finite = 1;
    const int seg_cols = k - col0;  // columns of this segment inside the matrix (may be <= 0)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool live_row = row0 + r < k;
      const scalar_t* px = Kb + static_cast<int64_t>(row0 + r) * sr + static_cast<int64_t>(col0) * sc;  // K[i, col0]
      const scalar_t* py = Kb + static_cast<int64_t>(col0) * sr + static_cast<int64_t>(row0 + r) * sc;  // K[col0, i]
#pragma unroll
      for (int g = 0; g < kSeg; ++g) {
        double xv = 0.0, yv = 0.0;
        if (live_row && g < seg_cols) {
          xv = static_cast<double>(*px);
          yv = static_cast<double>(*py);
        }
        px += sc;
        py += sr;
        finite &= isfinite(xv) ? 1 : 0;
        const double ax = fabs(xv), dxy = fabs(xv - yv);
        maxabs = ax > maxabs ? ax : maxabs;
        maxasym = dxy > maxasym ? dxy : maxasym;
        x[r][g] = 0.5 * (xv + yv);
      }
    }
    // Reduce over the matrix: the warp (every lane belongs to this matrix), then its warps.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      maxabs = fmax(maxabs, __shfl_xor_sync(kFullMask, maxabs, o));
      maxasym = fmax(maxasym, __shfl_xor_sync(kFullMask, maxasym, o));
      finite &= __shfl_xor_sync(kFullMask, finite, o);
    }
    if constexpr (Shape::kWarps > 1) {
      if ((t & 31) == 0) {
        red[warp * 3 + 0] = maxabs;
        red[warp * 3 + 1] = maxasym;
        red[warp * 3 + 2] = finite;
      }
      matrix_sync<Shape::kWarps>();
#pragma unroll
      for (int w = 0; w < Shape::kWarps; ++w) {
        maxabs = fmax(maxabs, red[w * 3 + 0]);
        maxasym = fmax(maxasym, red[w * 3 + 1]);
        finite &= red[w * 3 + 2] != 0.0 ? 1 : 0;
      }
    }
    double mu;
    int st = matrix_mu(lam_scalar, lam, b, k, scale_by_k, &mu);
    if (st == kKrlsOk && !finite) st = kKrlsNonFinite;
    if (st == kKrlsOk && maxasym > sym_tol * maxabs) st = kKrlsNotSymmetric;
    if (st != kKrlsOk) {  // uniform per matrix: factorise Kc = 0, mu = 1 harmlessly
      mu = 1.0;
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int g = 0; g < kSeg; ++g) x[r][g] = 0.0;
    }

    // 2. Centre: row means from the kSegs adjacent lanes of a row pair, column means and the
    //    grand mean from shared memory (vec1, first overwritten at step 1, after a barrier).
    if (center) {
      double rowmean[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        double s = 0.0;
#pragma unroll
        for (int g = 0; g < kSeg; ++g) s += x[r][g];
#pragma unroll
        for (int o = 1; o < kSegs; o <<= 1) s += __shfl_xor_sync(kFullMask, s, o);
        rowmean[r] = s * inv_k;  // 0 on padding rows
      }
      if (cs == 0) {
        vec1[seg_index(row0)] = rowmean[0];
        vec1[seg_index(row0 + 1)] = rowmean[1];
      }
      matrix_sync<Shape::kWarps>();
      double grand = 0.0;
      for (int m = 0; m < k; ++m) grand += vec1[seg_index(m)];
      grand *= inv_k;
#pragma unroll
      for (int g = 0; g < kSeg; ++g) {
        const double rm = vec1[cs * kSegPitch + g];
#pragma unroll
        for (int r = 0; r < 2; ++r)
          if (row0 + r < k && col0 + g < k) x[r][g] += grand - rowmean[r] - rm;
      }
    }

    // 3. The sweep (see the comment above the kernel). Row j's publisher also computes r_j
    //    (so the rsqrt is done once per step) and records a failed pivot; at step 0 that is
    //    thread 0, which also reset the record. A warp leaves the loop after publishing its
    //    last row: the barrier of step j counts only the warps still in it (the last
    //    kWarps - j / kRowsPerWarp). The last warp, always in, accumulates the column sums
    //    acc_m = sum_{p>m} (r_p X[p][m])^2, lane l for columns l and l + 32.
    constexpr int kAccCols = KP / 32;
    const bool acc_warp = warp == Shape::kWarps - 1;
    const int lane = t & 31;
    double acc[kAccCols];
#pragma unroll
    for (int q = 0; q < kAccCols; ++q) acc[q] = 0.0;
    if (t == 0) *first_fail = -1.0;
    const int j_end = min(k, whi + 1);
    for (int j = 0; j < j_end; ++j) {
      double* const v = (j & 1) ? vec1 : vec0;
      // The owners of row j publish it (updated through step j - 1); the pivot moves to its own
      // slot and leaves a 0, so the update below leaves column j alone.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (row0 + r == j) {
          double2* dst = reinterpret_cast<double2*>(v + cs * kSegPitch);
#pragma unroll
          for (int g = 0; g < kSeg; g += 2) dst[g / 2] = make_double2(x[r][g], x[r][g + 1]);
          if ((j >> 4) == cs) {
            const double d = v[seg_index(j)];
            const double piv = d + mu;
            const bool ok = piv > 0.0 && piv <= DBL_MAX;
            if (!ok && *first_fail < 0.0) *first_fail = j;
            const double rr = rsqrt(ok ? piv : 1.0);
            *reinterpret_cast<double2*>(v + Shape::kPivotSlot) = make_double2(rr, rr * rr);
            dpiv[j] = d;
            rinv[j] = rr;
            v[seg_index(j)] = 0.0;
          }
        }
      }
      pivot_sync<Shape::kWarps>(32 * (Shape::kWarps - j / Shape::kRowsPerWarp));
      const double2 rr = *reinterpret_cast<const double2*>(v + Shape::kPivotSlot);
      const double rj = rr.x, rj2 = rr.y;
      if (acc_warp) {
#pragma unroll
        for (int q = 0; q < kAccCols; ++q) {
          const int m = lane + 32 * q;
          const double w = rj * v[seg_index(m)];  // r_j X[j][m]: row j of W left of the pivot
          if (m < j) acc[q] += w * w;
        }
      }
      if (whi > j && wlo < k) {  // else every row of this warp is finished or padding: a = 0
        double a[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = row0 + r;
          a[r] = i > j ? rj2 * v[seg_index(i)] : 0.0;  // r_j^2 X[i][j]: column j below the pivot
        }
        const double2* src = reinterpret_cast<const double2*>(v + cs * kSegPitch);
#pragma unroll
        for (int g = 0; g < kSeg; g += 2) {
          const double2 c2 = src[g / 2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            x[r][g] = fma(-a[r], c2.x, x[r][g]);
            x[r][g + 1] = fma(-a[r], c2.y, x[r][g + 1]);
          }
        }
      }
    }
    matrix_sync<Shape::kWarps>();  // every warp: the pivots, r and the failure record are complete

    // 4. Scores, written by the last warp (it holds the column sums), coalesced.
    const int fail = static_cast<int>(*first_fail);
    if (st == kKrlsOk && fail >= 0) st = krls_lam_too_small(mu, k, maxabs) ? kKrlsLamTooSmall : kKrlsNotPositiveDefinite;
    if (acc_warp) {
#pragma unroll
      for (int q = 0; q < kAccCols; ++q) {
        const int m = lane + 32 * q;
        if (m >= k) continue;
        const double dm = dpiv[m], rm = rinv[m];
        const double w2 = rm * rm;
        const double S = fmin(fmax(dm * w2 - mu * (w2 * w2 * acc[q]), 0.0), 1.0);
        out[b * k + m] = st == kKrlsOk ? static_cast<scalar_t>(S) : static_cast<scalar_t>(NAN);
      }
    }
    if (t == 0) {
      status[b] = st;
      detail[b] = st == kKrlsOk ? 0 : (fail >= 0 ? fail : 0);
    }
    matrix_sync<Shape::kWarps>();  // the next matrix overwrites this one's shared memory
  }
}

}  // namespace chameleon
