// CPU kernel for krls: kernel ridge leverage scores of a batch of small kernels.
//
// For each matrix, in float64 whatever the input dtype:
//   Kc = H K H (centring, optional), A = Kc + mu I = L L^T,
//   S_i = [Kc A^-1]_ii = 1 - mu * ||L^-1 e_i||^2.
// Small matrices are latency-bound one at a time (short dot products, a sqrt and a
// division on every step's critical path), so kLanes matrices are solved together with
// their elements interleaved: every scalar step of the algorithm becomes one operation
// over kLanes independent matrices, which the compiler turns into SIMD instructions.
// Groups are spread over threads with at::parallel_for. Above kFusedMaxK the blocked
// LAPACK path (krls_library) is faster and is used instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "clones.h"

namespace chameleon {
namespace {

// Largest k for the fused kernel (its group buffer is k * k * kLanes doubles per thread);
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


// The solve for one group. a: [k, k, kLanes] (lower triangle used; symmetric, checked
// input), scratch: [3, k, kLanes]. Writes S [k, kLanes] and, per lane, the first failing
// Cholesky pivot (-1 if none) into pivot.
CHAMELEON_CLONES void krls_group(double* __restrict a, double* __restrict scratch, int64_t k, double mu,
                                 bool center, double* __restrict S, int32_t* __restrict pivot) {
  double* rowmean = scratch;               // [k, L]
  double* inv_diag = scratch + k * kLanes;  // [k, L]: 1 / L_jj
  double* w = scratch + 2 * k * kLanes;     // [k, L]: a column of L^-1
  auto A = [&](int64_t i, int64_t j) { return a + (i * k + j) * kLanes; };
  LANES pivot[l] = -1;

  if (center) {
    for (int64_t i = 0; i < k; ++i) LANES rowmean[i * kLanes + l] = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j < i; ++j) {
        const double* x = A(i, j);
        LANES {
          rowmean[i * kLanes + l] += x[l];
          rowmean[j * kLanes + l] += x[l];
        }
      }
      const double* x = A(i, i);
      LANES rowmean[i * kLanes + l] += x[l];
    }
    double grand[kLanes] = {};
    const double inv_k = 1.0 / static_cast<double>(k);
    for (int64_t i = 0; i < k; ++i) LANES {
        rowmean[i * kLanes + l] *= inv_k;
        grand[l] += rowmean[i * kLanes + l];
      }
    LANES grand[l] *= inv_k;
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j <= i; ++j) {
        double* x = A(i, j);
        LANES x[l] += grand[l] - rowmean[i * kLanes + l] - rowmean[j * kLanes + l];
      }
  }
  for (int64_t i = 0; i < k; ++i) {
    double* x = A(i, i);
    LANES x[l] += mu;
  }

  // Cholesky-Banachiewicz, row by row, in place. Each step is a short dot product; with
  // kLanes matrices side by side it is kLanes/4 independent vector chains. A lane that
  // fails gets a unit pivot so the group carries on; the caller discards its result.
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      double s[kLanes];
      const double* x = A(i, j);
      LANES s[l] = x[l];
      for (int64_t p = 0; p < j; ++p) {
        const double* li = A(i, p);
        const double* lj = A(j, p);
        LANES s[l] -= li[l] * lj[l];
      }
      double* out = A(i, j);
      if (j < i) {
        const double* d = inv_diag + j * kLanes;
        LANES out[l] = s[l] * d[l];
      } else {
        LANES {
          const bool ok = s[l] > 0.0 && s[l] <= 1.7976931348623157e308;
          pivot[l] = (!ok && pivot[l] < 0) ? static_cast<int32_t>(i) : pivot[l];
          const double r = std::sqrt(ok ? s[l] : 1.0);
          out[l] = r;
          inv_diag[i * kLanes + l] = 1.0 / r;
        }
      }
    }
  }

  // S_i = 1 - mu ||L^-1 e_i||^2: column i of L^-1 by forward substitution.
  for (int64_t i = 0; i < k; ++i) {
    double norm2[kLanes];
    LANES {
      w[i * kLanes + l] = inv_diag[i * kLanes + l];
      norm2[l] = w[i * kLanes + l] * w[i * kLanes + l];
    }
    for (int64_t j = i + 1; j < k; ++j) {
      double s[kLanes] = {};
      for (int64_t p = i; p < j; ++p) {
        const double* lj = A(j, p);
        const double* wp = w + p * kLanes;
        LANES s[l] -= lj[l] * wp[l];
      }
      const double* d = inv_diag + j * kLanes;
      LANES {
        const double v = s[l] * d[l];
        w[j * kLanes + l] = v;
        norm2[l] += v * v;
      }
    }
    // Exact arithmetic keeps S in [0, 1); clamp the last-ulp excursions.
    LANES S[i * kLanes + l] = min_d(max_d(1.0 - mu * norm2[l], 0.0), 1.0);
  }
}

#undef LANES

// Loads matrices b0 .. b0+kLanes-1 (a group) into the interleaved buffer a [k, k, kLanes]
// and measures per lane max|K|, max|K - K^T| and finiteness, keeping the symmetric part in
// the lower triangle. Lane l reads base + off[l]; every offset points at a real matrix (the
// caller repeats the last one to pad a short group). The copy is one lane at a time
// (contiguous reads); the checks then run across lanes, as vector instructions.
template <typename scalar_t>
inline void load_group_impl(const scalar_t* __restrict base, const int64_t* off, int64_t sr, int64_t sc, int64_t k,
                            double* __restrict a, double* __restrict maxabs, double* __restrict maxasym,
                            double* __restrict bad) {
  for (int l = 0; l < kLanes; ++l) {
    const scalar_t* src = base + off[l];
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) a[(i * k + j) * kLanes + l] = static_cast<double>(src[i * sr + j * sc]);
  }
  for (int l = 0; l < kLanes; ++l) maxabs[l] = maxasym[l] = bad[l] = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      double* lower = a + (i * k + j) * kLanes;
      const double* upper = a + (j * k + i) * kLanes;
      for (int l = 0; l < kLanes; ++l) {
        const double x = lower[l], y = upper[l];
        // x - x is 0 for finite x and NaN for NaN/Inf; accumulating it keeps the loop branch-free.
        bad[l] += (x - x) + (y - y);
        maxabs[l] = max_d(maxabs[l], max_d(std::fabs(x), std::fabs(y)));
        maxasym[l] = max_d(maxasym[l], std::fabs(x - y));
        lower[l] = 0.5 * (x + y);
      }
    }
  }
}

CHAMELEON_CLONES void load_group(const double* base, const int64_t* off, int64_t sr, int64_t sc, int64_t k,
                                 double* a, double* maxabs, double* maxasym, double* bad) {
  load_group_impl(base, off, sr, sc, k, a, maxabs, maxasym, bad);
}
CHAMELEON_CLONES void load_group(const float* base, const int64_t* off, int64_t sr, int64_t sc, int64_t k,
                                 double* a, double* maxabs, double* maxasym, double* bad) {
  load_group_impl(base, off, sr, sc, k, a, maxabs, maxasym, bad);
}

// A lane whose input is rejected (or that pads the last group) solves the identity instead.
void identity_lane(int64_t k, double* a, int l) {
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j <= i; ++j) a[(i * k + j) * kLanes + l] = (i == j) ? 1.0 : 0.0;
}

at::Tensor krls_fused_cpu(const at::Tensor& K, double lam, bool center, bool scale_by_k) {
  const int64_t k = K.size(-1);
  const int64_t batch = K.numel() / (k * k);
  const double mu = scale_by_k ? lam * static_cast<double>(k) : lam;
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
    at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> a(k * k * kLanes), scratch(3 * k * kLanes), S(k * kLanes);
      int32_t pivot[kLanes];
      int64_t off[kLanes];
      double maxabs[kLanes], maxasym[kLanes], bad[kLanes];
      for (int64_t g = begin; g < end; ++g) {
        const int64_t b0 = g * kLanes;
        for (int l = 0; l < kLanes; ++l) off[l] = std::min(b0 + l, batch - 1) * sb;
        load_group(base, off, sr, sc, k, a.data(), maxabs, maxasym, bad);
        for (int l = 0; l < kLanes; ++l) {
          const int64_t b = b0 + l;
          int32_t s = kKrlsOk;
          if (!(bad[l] == 0.0)) s = kKrlsNonFinite;
          else if (maxasym[l] > tol * maxabs[l]) s = kKrlsNotSymmetric;
          if (b < batch) st[b] = s;
          if (b >= batch || s != kKrlsOk) identity_lane(k, a.data(), l);
        }
        krls_group(a.data(), scratch.data(), k, mu, center, S.data(), pivot);
        for (int l = 0; l < kLanes && b0 + l < batch; ++l) {
          const int64_t b = b0 + l;
          if (st[b] == kKrlsOk && pivot[l] >= 0) {
            st[b] = kKrlsNotPositiveDefinite;
            de[b] = pivot[l];
          }
          for (int64_t i = 0; i < k; ++i) o[b * k + i] = static_cast<scalar_t>(S[i * kLanes + l]);
        }
      }
    });
  });
  raise_krls_failures(status, detail, K.sizes(), "krls");
  std::vector<int64_t> shape(K.sizes().begin(), K.sizes().end() - 1);
  return out.reshape(shape);
}

// The library path's preparation on CPU, one pass per matrix: checks, symmetric part,
// centring and mu on the diagonal, into a fresh float64 [batch, k, k]. (ATen elementwise
// ops would take several passes and allocations over the whole batch.)
at::Tensor prepare_library_cpu(const at::Tensor& K, double mu, bool center) {
  const int64_t k = K.size(-1);
  const int64_t batch = K.numel() / (k * k);
  const at::Tensor Kf = K.reshape({batch, k, k});
  at::Tensor A = at::empty({batch, k, k}, K.options().dtype(at::kDouble));
  at::Tensor status = at::zeros({batch}, at::kInt);
  int32_t* st = status.data_ptr<int32_t>();
  double* out = A.data_ptr<double>();
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
        if (!finite) st[b] = kKrlsNonFinite;
        else if (maxasym > tol * maxabs) st[b] = kKrlsNotSymmetric;
        if (st[b] != kKrlsOk) continue;
        double grand = 0.0;
        if (center) {
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
        for (int64_t i = 0; i < k; ++i) a[i * k + i] += mu;
      }
    });
  });
  raise_krls_failures(status, at::zeros({batch}, at::kInt), K.sizes(), "krls");
  return A;
}

at::Tensor krls_cpu(const at::Tensor& K, double lam, bool center, bool scale_by_k) {
  check_krls_args(K, lam, "krls");
  if (K.numel() == 0) return at::empty(K.sizes().slice(0, K.dim() - 1), K.options());
  const int64_t k = K.size(-1);
  const int64_t batch = K.numel() / (k * k);
  // The fused kernel wins while there are enough groups of kLanes matrices to keep every
  // thread busy; a few large matrices are better served by multithreaded blocked LAPACK.
  const int64_t groups = (batch + kLanes - 1) / kLanes;
  const bool fused_by_default = k <= 32 || (k <= kFusedMaxK && groups >= at::get_num_threads());
  if (k <= kFusedMaxK && krls_use_fused(fused_by_default)) return krls_fused_cpu(K, lam, center, scale_by_k);
  const double mu = scale_by_k ? lam * static_cast<double>(k) : lam;
  return krls_factor_scores(prepare_library_cpu(K, mu, center), mu, K.sizes(), K.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(chameleon, CPU, m) { m.impl("krls", &krls_cpu); }

}  // namespace chameleon
