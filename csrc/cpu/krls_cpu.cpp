// CPU kernel for krls: kernel ridge leverage scores of a batch of small kernels.
//
// For each matrix, in float64 whatever the input dtype:
//   Kc = H K H (centring, optional), A = Kc + mu I = L L^T,
//   S_i = [Kc A^-1]_ii = 1 - mu * ||L^-1 e_i||^2.
// Everything for one matrix stays in one k*k buffer (in cache for the sizes this path
// serves); matrices are spread over threads with at::parallel_for. Above
// kFusedMaxK the blocked LAPACK path (krls_library) is faster and is used instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"

namespace chameleon {
namespace {

// Crossover picked by benchmarks/bench_krls.py on a 2-core x86 CPU (see RESULTS.md).
constexpr int64_t kFusedMaxK = 128;

struct Failure {
  int32_t status;
  int32_t detail;
};

// Solves one matrix. `a` is k*k scratch; `K` points at the input with row stride sr and
// column stride sc. Writes S into out[0..k).
template <typename scalar_t>
Failure krls_one(const scalar_t* K, int64_t sr, int64_t sc, int64_t k, double lam, bool center,
                 bool scale_by_k, double sym_tol, double* a, double* rowmean, scalar_t* out) {
  const double mu = scale_by_k ? lam * static_cast<double>(k) : lam;
  // Load, checking finiteness and symmetry, and keep the symmetric part (lower triangle).
  double maxabs = 0.0, maxasym = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      const double x = static_cast<double>(K[i * sr + j * sc]);
      const double y = static_cast<double>(K[j * sr + i * sc]);
      if (!std::isfinite(x) || !std::isfinite(y)) return {kKrlsNonFinite, 0};
      maxabs = std::max(maxabs, std::max(std::abs(x), std::abs(y)));
      maxasym = std::max(maxasym, std::abs(x - y));
      a[i * k + j] = 0.5 * (x + y);
    }
  }
  if (maxasym > sym_tol * maxabs) return {kKrlsNotSymmetric, 0};

  if (center) {
    // Row means of the symmetric matrix from its lower triangle.
    for (int64_t i = 0; i < k; ++i) rowmean[i] = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j < i; ++j) {
        rowmean[i] += a[i * k + j];
        rowmean[j] += a[i * k + j];
      }
      rowmean[i] += a[i * k + i];
    }
    double grand = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      rowmean[i] /= static_cast<double>(k);
      grand += rowmean[i];
    }
    grand /= static_cast<double>(k);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j <= i; ++j) a[i * k + j] += grand - rowmean[i] - rowmean[j];
  }
  for (int64_t i = 0; i < k; ++i) a[i * k + i] += mu;

  // Cholesky-Banachiewicz, row by row, in place in the lower triangle.
  for (int64_t i = 0; i < k; ++i) {
    double* Li = a + i * k;
    for (int64_t j = 0; j <= i; ++j) {
      const double* Lj = a + j * k;
      double s = Li[j];
      for (int64_t p = 0; p < j; ++p) s -= Li[p] * Lj[p];
      if (j < i) {
        Li[j] = s / Lj[j];
      } else {
        if (!(s > 0.0) || !std::isfinite(s)) return {kKrlsNotPositiveDefinite, static_cast<int32_t>(i)};
        Li[i] = std::sqrt(s);
      }
    }
  }

  // Column i of W = L^-1 by forward substitution (entries above the diagonal are zero);
  // rowmean is reused as the solution vector.
  double* w = rowmean;
  for (int64_t i = 0; i < k; ++i) {
    double norm2 = 0.0;
    for (int64_t j = i; j < k; ++j) {
      const double* Lj = a + j * k;
      double s = (j == i) ? 1.0 : 0.0;
      for (int64_t p = i; p < j; ++p) s -= Lj[p] * w[p];
      w[j] = s / Lj[j];
      norm2 += w[j] * w[j];
    }
    // Exact arithmetic keeps this in [0, 1); clamp the last-ulp excursions.
    const double S = std::min(std::max(1.0 - mu * norm2, 0.0), 1.0);
    out[i] = static_cast<scalar_t>(S);
  }
  return {kKrlsOk, 0};
}

at::Tensor krls_fused_cpu(const at::Tensor& K, double lam, bool center, bool scale_by_k) {
  const int64_t k = K.size(-1);
  const int64_t batch = K.numel() / (k * k);
  at::Tensor Kf = K.reshape({batch, k, k});
  at::Tensor out = at::empty({batch, k}, K.options());
  std::vector<Failure> failures(batch, Failure{kKrlsOk, 0});
  const double tol = krls_symmetry_tol(K.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(K.scalar_type(), "krls_cpu", [&] {
    const scalar_t* base = Kf.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t sb = Kf.stride(0), sr = Kf.stride(1), sc = Kf.stride(2);
    // Small matrices are cheap: give each thread many of them.
    const int64_t grain = std::max<int64_t>(1, 4096 / (k * k * k + 1));
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> a(k * k), v(k);
      for (int64_t b = begin; b < end; ++b)
        failures[b] = krls_one<scalar_t>(base + b * sb, sr, sc, k, lam, center, scale_by_k, tol,
                                         a.data(), v.data(), o + b * k);
    });
  });
  at::Tensor status = at::empty({batch}, at::kInt), detail = at::empty({batch}, at::kInt);
  for (int64_t b = 0; b < batch; ++b) {
    status.data_ptr<int32_t>()[b] = failures[b].status;
    detail.data_ptr<int32_t>()[b] = failures[b].detail;
  }
  raise_krls_failures(status, detail, K.sizes(), "krls");
  std::vector<int64_t> shape(K.sizes().begin(), K.sizes().end() - 1);
  return out.reshape(shape);
}

at::Tensor krls_cpu(const at::Tensor& K, double lam, bool center, bool scale_by_k) {
  check_krls_args(K, lam, "krls");
  if (K.numel() == 0) return at::empty(K.sizes().slice(0, K.dim() - 1), K.options());
  if (K.size(-1) <= kFusedMaxK) return krls_fused_cpu(K, lam, center, scale_by_k);
  return krls_library(K, lam, center, scale_by_k);
}

}  // namespace

TORCH_LIBRARY_IMPL(chameleon, CPU, m) { m.impl("krls", &krls_cpu); }

}  // namespace chameleon
