// CPU kernel for krls: kernel ridge leverage scores of a batch of small kernels.
//
// For each matrix, in float64 whatever the input dtype, the cancellation-free form of krls.h:
//   Kc = H K H (centring, optional), A = Kc + mu I = L L^T, W = L^-1,
//   S_i = d_i W_ii^2 - mu sum_{p>i} W_pi^2, d_i = Kc_ii - sum_{p<i} L_ip^2 (pivots of Kc).
// Small matrices are latency-bound one at a time (short dot products, a sqrt and a
// division on every step's critical path), so kLanes matrices are solved together with
// their elements interleaved: every scalar step of the algorithm becomes one operation
// over kLanes independent matrices, which the compiler turns into SIMD instructions.
// Groups are spread over threads with at::parallel_for. Above kFusedMaxK the blocked
// LAPACK path (krls_library) is faster and is used instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../krls.h"
#include "clones.h"

namespace chameleon {
namespace {

// Largest k for the fused kernel (its group buffer is k (k + 1) / 2 * kLanes doubles per thread,
// plus k * k * kLanes for float32 input);
// the batch-dependent crossover is in krls_cpu, picked with benchmarks/bench_krls.py.
constexpr int64_t kFusedMaxK = 512;
// Matrices per group: four AVX2 registers of doubles, enough independent work to hide the
// latency of the dependent multiply-add chains (16 measured 25% faster than 8 at k = 16).
constexpr int kLanes = 16;

#define LANES for (int l = 0; l < kLanes; ++l)

// Branch-free max/min that compile to single vector instructions (std::fmax/fmin are
// library calls unless NaN semantics are relaxed). NaN never reaches them: inputs are
// checked for finiteness first.
inline double max_d(double a, double b) { return a > b ? a : b; }
inline double min_d(double a, double b) { return a < b ? a : b; }


// Offset of element (i, j), j <= i, in the packed lower triangle (row-major, rows of
// i + 1 elements). Packing halves the working set of a group against a full k x k buffer:
// at k = 16 the group's matrices (17 KB) and scratch (10 KB) fit a 32 KB L1 together, which
// the full layout (32 KB for the matrices alone) did not.
inline int64_t tri(int64_t i) { return i * (i + 1) / 2; }

// Four lanes as one GCC vector. The loops below are written on these explicitly: left to
// itself, GCC vectorised the kernel's loops over the matrix index instead of over the lanes,
// with shuffles. aligned(8): any double pointer may be viewed as one (the buffers are 64-byte
// aligned for speed only); may_alias: the same memory is also read as doubles.
typedef double vd __attribute__((vector_size(32), aligned(8), may_alias));
typedef int64_t vm __attribute__((vector_size(32)));  // a comparison's lane mask
constexpr int kVecs = kLanes / 4;
#define VECS for (int q = 0; q < kVecs; ++q)
inline vd* vec(double* p) { return reinterpret_cast<vd*>(p); }
inline const vd* vec(const double* p) { return reinterpret_cast<const vd*>(p); }
// Helpers and lambdas of the cloned functions must be inlined into them: an out-of-line one is
// compiled for the baseline ISA only (the pivot step ran as SSE2 code, and so did the load
// once GCC stopped inlining it: k = 7 took twice as long).
#define CHAMELEON_INLINE __attribute__((always_inline))
// The krls kernels add an x86-64-v4 clone to clones.h's two: AVX-512VL's 32 vector registers
// (used at 256 bits) keep the two-row tiles and their operands out of memory, about 7% faster
// at k = 16 on this project's AMD Zen 4 machines than the x86-64-v3 clone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CHAMELEON_KRLS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CHAMELEON_KRLS_CLONES CHAMELEON_CLONES
#endif

// The solve for one group. a: packed lower triangles [k (k + 1) / 2, kLanes] (symmetric,
// checked input), mu: [kLanes], scratch: [5, k, kLanes]. Writes S [k, kLanes] and, per lane,
// the first failing Cholesky pivot (-1 if none) into pivot. next (or nullptr): the next
// group's kLanes input matrices, next_bytes each, prefetched a slice per Cholesky column (see
// krls_fused_cpu).
// KC > 0: compiled for k = KC (k_arg is then KC too).
template <int KC>
CHAMELEON_INLINE inline void krls_group_impl(double* __restrict a, double* __restrict scratch, int64_t k_arg,
                                             const double* __restrict mu, bool center, double* __restrict S,
                                             int32_t* __restrict pivot, const char* const* next,
                                             int64_t next_bytes) {
  const int64_t k = KC > 0 ? KC : k_arg;
  // Every element of the group (k x k entry, or a per-row value) is kLanes doubles = kVecs vectors.
  vd* rowmean = vec(scratch);               // [k]
  double* inv_diag = scratch + k * kLanes;  // [k]: 1 / L_jj
  vd* dpiv = vec(scratch + 2 * k * kLanes);  // [k]: d_j, the pivots of Kc (L_jj^2 - mu, exactly)
  vd* w0 = vec(scratch + 3 * k * kLanes);   // [k]: two columns of L^-1
  vd* w1 = vec(scratch + 4 * k * kLanes);
  vd* inv = vec(inv_diag);
  auto row = [&](int64_t i) CHAMELEON_INLINE { return vec(a + tri(i) * kLanes); };
  vd failed[kVecs], muv[kVecs];  // per lane: the first failing pivot (-1 if none), mu
  VECS {
    failed[q] = vd{} - 1.0;
    muv[q] = vec(mu)[q];
  }

  if (center) {
    // Row sums in the order j = 0 .. k-1 for every row: row i's own entries, then column i of
    // the rows below it.
    for (int64_t i = 0; i < k; ++i) {
      const vd* r = row(i);
      vd acc[kVecs] = {};
      for (int64_t j = 0; j < i; ++j) VECS {
          acc[q] += r[j * kVecs + q];
          rowmean[j * kVecs + q] += r[j * kVecs + q];
        }
      VECS rowmean[i * kVecs + q] = acc[q] + r[i * kVecs + q];
    }
    vd grand[kVecs] = {};
    const double inv_k = 1.0 / static_cast<double>(k);
    for (int64_t i = 0; i < k; ++i) VECS {
        rowmean[i * kVecs + q] *= inv_k;
        grand[q] += rowmean[i * kVecs + q];
      }
    VECS grand[q] *= inv_k;
    for (int64_t i = 0; i < k; ++i) {
      vd* r = row(i);
      for (int64_t j = 0; j <= i; ++j) VECS r[j * kVecs + q] += grand[q] - rowmean[i * kVecs + q] - rowmean[j * kVecs + q];
    }
  }

  // Cholesky (Crout, column by column) of Kc + mu I, in place. mu is added only when a pivot
  // is taken, so the diagonal's running value is d_j, the pivot of Kc itself, kept exactly
  // for the scores. Below the pivot, a column's entries are independent dot products (taken
  // row by row, each entry in turn waited on the one before it through the row), done two
  // rows at a time to share the loads of row j; every entry's terms are summed in the same
  // order (p ascending) as the row-by-row form, so the factor is bitwise the same.
  // A lane that fails gets a unit pivot so the group carries on; the caller discards its result.
  auto take_pivot = [&](int64_t i, vd* out, const vd* s) CHAMELEON_INLINE {
    const vd row_index = vd{} + static_cast<double>(i);
    VECS {
      const vd pv = s[q] + muv[q];
      const vm ok = (pv > 0.0) & (pv <= 1.7976931348623157e308);
      failed[q] = ((ok == 0) & (failed[q] < 0.0)) ? row_index : failed[q];
      const vd safe = ok ? pv : vd{} + 1.0;
      vd r;
      for (int e = 0; e < 4; ++e) r[e] = std::sqrt(safe[e]);  // one vector sqrt
      out[q] = r;
      dpiv[i * kVecs + q] = s[q];
      inv[i * kVecs + q] = 1.0 / r;
    }
  };
  for (int64_t j = 0; j < k; ++j) {
    if (next != nullptr) {  // column j's share of the next group's input, into L2
      const int64_t lo = next_bytes * j / k / 64 * 64, hi = next_bytes * (j + 1) / k;
      for (int l = 0; l < kLanes; ++l)
        for (int64_t o = lo; o < hi; o += 64) __builtin_prefetch(next[l] + o, 0, 2);
    }
    vd* rj = row(j);
    {
      vd s[kVecs];
      VECS s[q] = rj[j * kVecs + q];
      for (int64_t p = 0; p < j; ++p) VECS s[q] -= rj[p * kVecs + q] * rj[p * kVecs + q];
      take_pivot(j, rj + j * kVecs, s);
    }
    int64_t i = j + 1;
    for (; i + 1 < k; i += 2) {  // rows i and i + 1 share the loads of row j
      vd* r0 = row(i);
      vd* r1 = row(i + 1);
      vd s0[kVecs], s1[kVecs];
      VECS {
        s0[q] = r0[j * kVecs + q];
        s1[q] = r1[j * kVecs + q];
      }
      for (int64_t p = 0; p < j; ++p) VECS {
          const vd y = rj[p * kVecs + q];
          s0[q] -= r0[p * kVecs + q] * y;
          s1[q] -= r1[p * kVecs + q] * y;
        }
      VECS {
        r0[j * kVecs + q] = s0[q] * inv[j * kVecs + q];
        r1[j * kVecs + q] = s1[q] * inv[j * kVecs + q];
      }
    }
    if (i < k) {
      vd* r0 = row(i);
      vd s0[kVecs];
      VECS s0[q] = r0[j * kVecs + q];
      for (int64_t p = 0; p < j; ++p) VECS s0[q] -= r0[p * kVecs + q] * rj[p * kVecs + q];
      VECS r0[j * kVecs + q] = s0[q] * inv[j * kVecs + q];
    }
  }
  const double* failed_l = reinterpret_cast<const double*>(failed);
  LANES pivot[l] = static_cast<int32_t>(failed_l[l]);

  // S_i = d_i W_ii^2 - mu sum_{j>i} W_ji^2: columns of W = L^-1 by forward substitution, two
  // at a time (c, c + 1), sharing the loads of L; each sum in the same order as one at a time.
  auto score = [&](int64_t c, const vd* norm2) CHAMELEON_INLINE {
    const double* n = reinterpret_cast<const double*>(norm2);
    const double* r = inv_diag + c * kLanes;
    const double* d = reinterpret_cast<const double*>(dpiv + c * kVecs);
    // Exact arithmetic keeps S in [0, 1); clamp the last-ulp excursions.
    LANES S[c * kLanes + l] = min_d(max_d(d[l] * r[l] * r[l] - mu[l] * n[l], 0.0), 1.0);
  };
  int64_t c = 0;
  for (; c + 1 < k; c += 2) {
    vd n0[kVecs] = {}, n1[kVecs] = {};  // sums over the entries below the diagonal
    {
      const vd* r1 = row(c + 1);
      VECS {
        w0[c * kVecs + q] = inv[c * kVecs + q];
        vd s = {};
        s -= r1[c * kVecs + q] * w0[c * kVecs + q];
        const vd v = s * inv[(c + 1) * kVecs + q];
        w0[(c + 1) * kVecs + q] = v;
        n0[q] += v * v;
        w1[(c + 1) * kVecs + q] = inv[(c + 1) * kVecs + q];
      }
    }
    for (int64_t j = c + 2; j < k; ++j) {
      const vd* rj = row(j);
      vd s0[kVecs] = {}, s1[kVecs] = {};
      VECS s0[q] -= rj[c * kVecs + q] * w0[c * kVecs + q];
      for (int64_t p = c + 1; p < j; ++p) VECS {
          const vd y = rj[p * kVecs + q];
          s0[q] -= y * w0[p * kVecs + q];
          s1[q] -= y * w1[p * kVecs + q];
        }
      VECS {
        const vd v0 = s0[q] * inv[j * kVecs + q], v1 = s1[q] * inv[j * kVecs + q];
        w0[j * kVecs + q] = v0;
        w1[j * kVecs + q] = v1;
        n0[q] += v0 * v0;
        n1[q] += v1 * v1;
      }
    }
    score(c, n0);
    score(c + 1, n1);
  }
  if (c < k) {  // the last column alone: no entries below the diagonal
    const vd n[kVecs] = {};
    score(c, n);
  }
}
#undef LANES
#undef VECS

// The k <= kFixedMaxK cases, each compiled for its own k: with every loop bound a constant the
// loops unroll and the packed rows' offsets fold, about 10% faster at k = 7 and 16 than the
// same code with a run-time k. Larger k take the run-time-k code (KC = 0).
constexpr int64_t kFixedMaxK = 16;
#define CHAMELEON_FIXED_K_SWITCH(k, CALL)                                                             \
  switch (k) {                                                                                        \
    case 1: CALL(1); case 2: CALL(2); case 3: CALL(3); case 4: CALL(4); case 5: CALL(5);              \
    case 6: CALL(6); case 7: CALL(7); case 8: CALL(8); case 9: CALL(9); case 10: CALL(10);            \
    case 11: CALL(11); case 12: CALL(12); case 13: CALL(13); case 14: CALL(14); case 15: CALL(15);    \
    case 16: CALL(16); default: CALL(0);                                                              \
  }

CHAMELEON_KRLS_CLONES void krls_group(double* __restrict a, double* __restrict scratch, int64_t k,
                                      const double* __restrict mu, bool center, double* __restrict S,
                                      int32_t* __restrict pivot, const char* const* next, int64_t next_bytes) {
  static_assert(kFixedMaxK == 16, "CHAMELEON_FIXED_K_SWITCH lists k = 1 .. 16");
#define CALL(KC) return krls_group_impl<KC>(a, scratch, k, mu, center, S, pivot, next, next_bytes)
  CHAMELEON_FIXED_K_SWITCH(k, CALL)
#undef CALL
}

// Loads matrices b0 .. b0+kLanes-1 (a group) into the packed lower triangles a, keeping the
// symmetric part, and measures per lane max|K|, max|K - K^T| and finiteness. Lane l reads
// base + off[l]; every offset points at a real matrix (the caller repeats the last one to pad
// a short group). Each (i, j) pair is read straight from the 16 matrices (K[i, j] and
// K[j, i]) and checked across lanes; a staging copy of the full matrices (k * k * kLanes
// doubles, then read back transposed) cost more than the solve itself at k <= 16.
// KC > 0: compiled for k = KC and contiguous rows (sr = KC, sc = 1).
template <int KC, typename scalar_t>
CHAMELEON_INLINE inline void load_group_impl(const scalar_t* __restrict base, const int64_t* off, int64_t sr,
                                             int64_t sc, int64_t k_arg, double* __restrict a,
                                             double* __restrict maxabs, double* __restrict maxasym,
                                             double* __restrict bad, double* __restrict stage) {
  const int64_t k = KC > 0 ? KC : k_arg;
  if constexpr (KC > 0) {
    sr = KC;
    sc = 1;
  }
  // float32 input: each lane's matrix is first converted to float64 row by row (the
  // conversion vectorises along a row; converting each element as it is gathered measured
  // about 10% slower), then read as below from that copy.
  const double* src[kLanes];
  int64_t r = sr, c = sc;
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int l = 0; l < kLanes; ++l) src[l] = base + off[l];
  } else {
    for (int l = 0; l < kLanes; ++l) {
      const scalar_t* m = base + off[l];
      double* out = stage + l * k * k;
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j) out[i * k + j] = static_cast<double>(m[i * sr + j * sc]);
      src[l] = out;
    }
    r = k;
    c = 1;
  }
  for (int l = 0; l < kLanes; ++l) maxabs[l] = maxasym[l] = bad[l] = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      const int64_t lower = i * r + j * c, upper = j * r + i * c;
      double* dst = a + (tri(i) + j) * kLanes;
      for (int l = 0; l < kLanes; ++l) {
        const double x = src[l][lower], y = src[l][upper];
        // x - x is 0 for finite x and NaN for NaN/Inf; accumulating it keeps the loop branch-free.
        bad[l] += (x - x) + (y - y);
        maxabs[l] = max_d(maxabs[l], max_d(std::fabs(x), std::fabs(y)));
        maxasym[l] = max_d(maxasym[l], std::fabs(x - y));
        dst[l] = 0.5 * (x + y);
      }
    }
  }
}

// Contiguous row-major matrices up to kFixedMaxK take code compiled for their k (the float32
// conversion then vectorises along whole rows: about 25% faster at k = 7).
#define CALL(KC) return load_group_impl<KC>(base, off, sr, sc, k, a, maxabs, maxasym, bad, stage)
CHAMELEON_KRLS_CLONES void load_group(const double* base, const int64_t* off, int64_t sr, int64_t sc, int64_t k,
                                      double* a, double* maxabs, double* maxasym, double* bad, double* stage) {
  if (sc != 1 || sr != k) CALL(0);
  CHAMELEON_FIXED_K_SWITCH(k, CALL)
}
CHAMELEON_KRLS_CLONES void load_group(const float* base, const int64_t* off, int64_t sr, int64_t sc, int64_t k,
                                      double* a, double* maxabs, double* maxasym, double* bad, double* stage) {
  if (sc != 1 || sr != k) CALL(0);
  CHAMELEON_FIXED_K_SWITCH(k, CALL)
}
#undef CALL
#undef CHAMELEON_FIXED_K_SWITCH

inline int64_t round_up_8(int64_t n) { return (n + 7) / 8 * 8; }
inline double* align_64(double* p) {
  return reinterpret_cast<double*>((reinterpret_cast<uintptr_t>(p) + 63) / 64 * 64);
}

// A lane whose input is rejected (or that pads the last group) solves the identity instead.
void identity_lane(int64_t k, double* a, int l) {
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j <= i; ++j) a[(tri(i) + j) * kLanes + l] = (i == j) ? 1.0 : 0.0;
}

// One matrix's lam checked and turned into mu; a bad lam gives status kKrlsBadLam.
inline int32_t lane_mu(const KrlsLam& lam, const double* lamp, int64_t b, int64_t k, bool scale_by_k, double* mu) {
  const double lv = lamp != nullptr ? lamp[b] : lam.scalar;
  const double m = scale_by_k ? lv * static_cast<double>(k) : lv;
  const bool ok = m > 0.0 && m <= 1.7976931348623157e308;
  *mu = ok ? m : 1.0;
  return ok ? kKrlsOk : kKrlsBadLam;
}

KrlsResult krls_fused_cpu(const at::Tensor& K, const KrlsLam& lam, bool center, bool scale_by_k) {
  const int64_t k = K.size(-1);
  const int64_t batch = K.numel() / (k * k);
  const double* lamp = lam.ptr();
  at::Tensor Kf = K.reshape({batch, k, k});
  at::Tensor out = at::empty({batch, k}, K.options());
  at::Tensor status = at::zeros({batch}, at::kInt), detail = at::zeros({batch}, at::kInt);
  int32_t* st = status.data_ptr<int32_t>();
  int32_t* de = detail.data_ptr<int32_t>();
  const double tol = krls_symmetry_tol(K.scalar_type());
  const int64_t groups = (batch + kLanes - 1) / kLanes;
  AT_DISPATCH_FLOATING_TYPES(K.scalar_type(), "krls_cpu", [&] {
    const scalar_t* base = Kf.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t sb = Kf.stride(0), sr = Kf.stride(1), sc = Kf.stride(2);
    const int64_t grain = std::max<int64_t>(1, 2048 / (k * k * k + 1));
    // Reading K from memory would otherwise stall the start of every group (at batch 4096,
    // k = 16, K is 8 MB, beyond the cache one core gets): the next group's matrices are
    // prefetched while this one is solved, spread over its Cholesky columns (one burst of k * k
    // * kLanes lines measured slower: it fills the miss queues). Only for matrices whose
    // k * k elements are dense in memory (any order), the usual case.
    const bool dense = sr >= 0 && sc >= 0 && (k - 1) * (sr + sc) + 1 == k * k;
    at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
      // One buffer per thread, every part 64-byte aligned: with the lane vectors straddling
      // cache lines the group solve measured up to 25% slower (which allocation straddled
      // depended on the input dtype).
      const int64_t n_a = round_up_8(tri(k) * kLanes), n_scratch = round_up_8(5 * k * kLanes);
      const int64_t n_S = round_up_8(k * kLanes);
      const int64_t n_stage = std::is_same_v<scalar_t, double> ? 0 : k * k * kLanes;  // float32 input only
      std::vector<double> buffer(n_a + n_scratch + n_S + n_stage + 8);
      double* a = align_64(buffer.data());
      double* scratch = a + n_a;
      double* S = scratch + n_scratch;
      double* stage = S + n_S;
      int32_t pivot[kLanes];
      int64_t off[kLanes];
      const char* next[kLanes];
      double maxabs[kLanes], maxasym[kLanes], bad[kLanes], mu[kLanes];
      for (int64_t g = begin; g < end; ++g) {
        const int64_t b0 = g * kLanes;
        for (int l = 0; l < kLanes; ++l) off[l] = std::min(b0 + l, batch - 1) * sb;
        load_group(base, off, sr, sc, k, a, maxabs, maxasym, bad, stage);
        const bool prefetch = dense && g + 1 < end;
        for (int l = 0; prefetch && l < kLanes; ++l)
          next[l] = reinterpret_cast<const char*>(base + std::min(b0 + kLanes + l, batch - 1) * sb);
        for (int l = 0; l < kLanes; ++l) {
          const int64_t b = std::min(b0 + l, batch - 1);
          int32_t s = lane_mu(lam, lamp, b, k, scale_by_k, &mu[l]);
          if (s == kKrlsOk && !(bad[l] == 0.0)) s = kKrlsNonFinite;
          if (s == kKrlsOk && maxasym[l] > tol * maxabs[l]) s = kKrlsNotSymmetric;
          if (b0 + l < batch) st[b] = s;
          if (b0 + l >= batch || s != kKrlsOk) {
            identity_lane(k, a, l);
            mu[l] = 1.0;
          }
        }
        krls_group(a, scratch, k, mu, center, S, pivot, prefetch ? next : nullptr,
                   k * k * static_cast<int64_t>(sizeof(scalar_t)));
        for (int l = 0; l < kLanes && b0 + l < batch; ++l) {
          const int64_t b = b0 + l;
          if (st[b] == kKrlsOk && pivot[l] >= 0) {
            st[b] = krls_lam_too_small(mu[l], k, maxabs[l]) ? kKrlsLamTooSmall : kKrlsNotPositiveDefinite;
            de[b] = pivot[l];
          }
          const bool ok = st[b] == kKrlsOk;
          for (int64_t i = 0; i < k; ++i)
            o[b * k + i] = ok ? static_cast<scalar_t>(S[i * kLanes + l]) : std::numeric_limits<scalar_t>::quiet_NaN();
        }
      }
    });
  });
  return {out, status, detail};
}

// The library path's preparation on CPU, one pass per matrix: checks, symmetric part and
// centring into a fresh float64 Kc [batch, k, k] (mu is added by krls_factor_scores). ATen
// elementwise ops would take several passes and allocations over the whole batch.
KrlsResult library_cpu(const at::Tensor& K, const KrlsLam& lam, bool center, bool scale_by_k) {
  const int64_t k = K.size(-1);
  const int64_t batch = K.numel() / (k * k);
  const double* lamp = lam.ptr();
  const at::Tensor Kf = K.reshape({batch, k, k});
  at::Tensor A = at::empty({batch, k, k}, K.options().dtype(at::kDouble));
  at::Tensor status = at::zeros({batch}, at::kInt);
  at::Tensor mu_t = at::empty({batch}, K.options().dtype(at::kDouble));
  at::Tensor maxabs_t = at::empty({batch}, K.options().dtype(at::kDouble));
  int32_t* st = status.data_ptr<int32_t>();
  double* out = A.data_ptr<double>();
  double* mu_out = mu_t.data_ptr<double>();
  double* maxabs_out = maxabs_t.data_ptr<double>();
  const double tol = krls_symmetry_tol(K.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(K.scalar_type(), "krls_prepare_cpu", [&] {
    const scalar_t* base = Kf.const_data_ptr<scalar_t>();
    const int64_t sb = Kf.stride(0), sr = Kf.stride(1), sc = Kf.stride(2);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> rowmean(k);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* src = base + b * sb;
        double* a = out + b * k * k;
        double maxabs = 0.0, maxasym = 0.0;
        bool finite = true;
        for (int64_t i = 0; i < k; ++i)
          for (int64_t j = 0; j <= i; ++j) {
            const double x = static_cast<double>(src[i * sr + j * sc]);
            const double y = static_cast<double>(src[j * sr + i * sc]);
            finite = finite && std::isfinite(x) && std::isfinite(y);
            maxabs = max_d(maxabs, max_d(std::fabs(x), std::fabs(y)));
            maxasym = max_d(maxasym, std::fabs(x - y));
            a[i * k + j] = a[j * k + i] = 0.5 * (x + y);
          }
        maxabs_out[b] = maxabs;
        st[b] = lane_mu(lam, lamp, b, k, scale_by_k, &mu_out[b]);
        if (st[b] == kKrlsOk && !finite) st[b] = kKrlsNonFinite;
        if (st[b] == kKrlsOk && maxasym > tol * maxabs) st[b] = kKrlsNotSymmetric;
        if (st[b] != kKrlsOk) {
          // Factorised as Kc = 0, mu = 1; its scores are replaced by NaN.
          std::fill(a, a + k * k, 0.0);
          mu_out[b] = 1.0;
          continue;
        }
        if (center) {
          double grand = 0.0;
          for (int64_t i = 0; i < k; ++i) {
            double sum = 0.0;
            for (int64_t j = 0; j < k; ++j) sum += a[i * k + j];
            rowmean[i] = sum / static_cast<double>(k);
            grand += rowmean[i];
          }
          grand /= static_cast<double>(k);
          for (int64_t i = 0; i < k; ++i)
            for (int64_t j = 0; j < k; ++j) a[i * k + j] += grand - rowmean[i] - rowmean[j];
        }
      }
    });
  });
  return krls_factor_scores(A, mu_t, maxabs_t, status, K.scalar_type());
}

KrlsResult krls_cpu_result(const at::Tensor& K, const KrlsLam& lam, bool center, bool scale_by_k) {
  if (K.numel() == 0) return krls_empty_result(K);
  const int64_t k = K.size(-1);
  const int64_t batch = K.numel() / (k * k);
  // The fused kernel wins while there are enough groups of kLanes matrices to keep every
  // thread busy; a few large matrices are better served by multithreaded blocked LAPACK.
  const int64_t groups = (batch + kLanes - 1) / kLanes;
  const bool fused_by_default = k <= 32 || groups >= at::get_num_threads();
  if (krls_use_fused(fused_by_default, k, kFusedMaxK, "CPU")) return krls_fused_cpu(K, lam, center, scale_by_k);
  return library_cpu(K, lam, center, scale_by_k);
}

at::Tensor krls_cpu(const at::Tensor& K, double lam, bool center, bool scale_by_k) {
  check_krls_K(K, "krls");
  const KrlsLam l = krls_lam(lam, "krls");
  return krls_checked_scores(krls_cpu_result(K, l, center, scale_by_k), l, K, scale_by_k, "krls");
}

at::Tensor krls_lam_tensor_cpu(const at::Tensor& K, const at::Tensor& lam, bool center, bool scale_by_k) {
  check_krls_args(K, lam, "krls");
  const KrlsLam l = krls_lam(K, lam, "krls");
  return krls_checked_scores(krls_cpu_result(K, l, center, scale_by_k), l, K, scale_by_k, "krls");
}

std::tuple<at::Tensor, at::Tensor> krls_ex_cpu(const at::Tensor& K, double lam, bool center, bool scale_by_k) {
  check_krls_K(K, "krls_ex");
  return krls_ex_outputs(krls_cpu_result(K, krls_lam(lam, "krls_ex"), center, scale_by_k), K);
}

std::tuple<at::Tensor, at::Tensor> krls_ex_lam_tensor_cpu(const at::Tensor& K, const at::Tensor& lam, bool center,
                                                          bool scale_by_k) {
  check_krls_args(K, lam, "krls_ex");
  return krls_ex_outputs(krls_cpu_result(K, krls_lam(K, lam, "krls_ex"), center, scale_by_k), K);
}

}  // namespace

TORCH_LIBRARY_IMPL(chameleon, CPU, m) {
  m.impl("krls", &krls_cpu);
  m.impl("krls.lam_tensor", &krls_lam_tensor_cpu);
  m.impl("krls_ex", &krls_ex_cpu);
  m.impl("krls_ex.lam_tensor", &krls_ex_lam_tensor_cpu);
}

}  // namespace chameleon
