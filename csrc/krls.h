// What the krls backends share: per-matrix status codes and the errors made of them, the
// regulariser argument (one lambda, or one per matrix), the switch between the fused kernels
// and the library path, and the library path itself (krls_library.cpp).
//
// The maths, the same in every backend and path (all in float64):
//   Kc = H K H (optional centring), A = Kc + mu I = L L^T, W = L^-1,
//   S_i = [Kc A^-1]_ii = d_i W_ii^2 - mu sum_{p>i} W_pi^2,
// where d_i = Kc_ii - sum_{p<i} L_ip^2 is the i-th pivot of the factorisation of Kc itself
// (the pivot of A is d_i + mu). This equals 1 - mu ||W e_i||^2 in exact arithmetic, but never
// subtracts two numbers close to 1: when the kernel is small against mu, S_i ~ Kc_ii / mu
// comes out with full relative precision, where 1 - mu ||W e_i||^2 would cancel.
#pragma once

#include <ATen/ATen.h>

#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <string>

#include "checks.h"

#ifdef __CUDACC__
#define CHAMELEON_HOST_DEVICE __host__ __device__
#else
#define CHAMELEON_HOST_DEVICE
#endif

namespace chameleon {

// Per-matrix status written by the krls kernels (the `info` of krls_ex); krls raises on it.
enum KrlsStatus : int32_t {
  kKrlsOk = 0,
  kKrlsNonFinite = 1,
  kKrlsNotSymmetric = 2,
  kKrlsNotPositiveDefinite = 3,
  kKrlsLamTooSmall = 4,  // factorisation failed, but mu is below K's rounding level
  kKrlsBadLam = 5,       // this matrix's lam is not a finite number > 0
};

// A failed Cholesky pivot blames lam, not K, when mu is so small against max|K| that the
// rounding of the centring alone (about k eps max|K|) can make Kc + mu I indefinite.
CHAMELEON_HOST_DEVICE inline bool krls_lam_too_small(double mu, int64_t k, double maxabs) {
  return mu <= 1024.0 * static_cast<double>(k) * DBL_EPSILON * maxabs;
}

// The regulariser as the kernels see it: one host value (a 0-d CPU tensor, which is what a
// Python float becomes) or one float64 value per matrix on K's device.
struct KrlsLam {
  double scalar = 1.0;
  at::Tensor per_matrix;  // [batch] float64, contiguous, on K's device; undefined for a scalar
  const double* ptr() const { return per_matrix.defined() ? per_matrix.const_data_ptr<double>() : nullptr; }
};

// The float overloads' lam (krls(Tensor K, float lam, ...)): validated at once.
inline KrlsLam krls_lam(double lam, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam > 0, op, ": lam must be a finite number > 0, got ", lam);
  KrlsLam out;
  out.scalar = lam;
  return out;
}

// The tensor overloads' lam (krls.lam_tensor), checked by check_krls_args first. A host scalar is validated here (a bad one raises at
// once); per-matrix values are validated by the kernels (kKrlsBadLam), so nothing syncs.
inline KrlsLam krls_lam(const at::Tensor& K, const at::Tensor& lam, const char* op) {
  KrlsLam out;
  if (lam.dim() == 0 && lam.device().is_cpu()) {
    out.scalar = lam.item<double>();
    TORCH_CHECK_VALUE(std::isfinite(out.scalar) && out.scalar > 0, op,
                      ": lam must be a finite number > 0, got ", out.scalar);
    return out;
  }
  const at::IntArrayRef batch_shape = K.sizes().slice(0, K.dim() - 2);
  const int64_t batch = c10::multiply_integers(batch_shape);
  out.per_matrix = lam.to(K.device(), at::kDouble).expand(batch_shape).reshape({batch}).contiguous();
  return out;
}

// The result of one krls evaluation, before any check: scores [batch, k] in K's dtype (NaN
// rows for failed matrices), status [batch] int32 (KrlsStatus) and detail [batch] int32 (the
// failing pivot), all on K's device.
struct KrlsResult {
  at::Tensor S, status, detail;
};

// Raises for the first failed matrix. `status`, `detail` on the CPU; `lam` as given to the op.
inline void raise_krls_failures(const at::Tensor& status, const at::Tensor& detail, const KrlsLam& lam,
                                at::IntArrayRef K_shape, bool scale_by_k, const char* op) {
  const int32_t* s = status.const_data_ptr<int32_t>();
  const int32_t* d = detail.const_data_ptr<int32_t>();
  const int64_t n = status.numel();
  const at::IntArrayRef batch_shape = K_shape.slice(0, K_shape.size() - 2);
  const int64_t k = K_shape.back();
  for (int64_t b = 0; b < n; ++b) {
    if (s[b] == kKrlsOk) continue;
    const std::string where = "K" + batch_index_str(b, batch_shape) + " (batch index " + std::to_string(b) + ")";
    const double lam_b = lam.per_matrix.defined() ? lam.per_matrix[b].item<double>() : lam.scalar;
    TORCH_CHECK_VALUE(s[b] != kKrlsBadLam, op, ": lam for ", where, " must be a finite number > 0, got ",
                      lam_b, scale_by_k ? " (or lam * k overflows)" : "");
    TORCH_CHECK_VALUE(s[b] != kKrlsNonFinite, op, ": ", where, " holds NaN or Inf");
    TORCH_CHECK_VALUE(s[b] != kKrlsNotSymmetric, op, ": ", where,
                      " is not symmetric: K must be a symmetric PSD kernel matrix");
    TORCH_CHECK_VALUE(s[b] != kKrlsLamTooSmall, op, ": lam = ", lam_b, " is too small for ", where,
                      ": mu = ", scale_by_k ? lam_b * static_cast<double>(k) : lam_b,
                      " is below the float64 rounding level of K (about 2e-13 * k * max|K|), so the "
                      "centred K + mu I is not numerically positive definite; use a larger lam");
    TORCH_CHECK_LINALG(false, op, ": ", where,
                       " is not positive definite after centring and adding mu*I (Cholesky "
                       "pivot ", d[b], " failed): K must be a symmetric positive semi-definite "
                       "kernel matrix");
  }
}

// The checked op: the result's scores with K's leading shape, or an error for a failed matrix
// (copies the status to the host: this is where krls synchronises and krls_ex does not).
inline at::Tensor krls_checked_scores(const KrlsResult& r, const KrlsLam& lam, const at::Tensor& K,
                                      bool scale_by_k, const char* op) {
  const at::Tensor info = at::stack({r.status, r.detail}).cpu();
  raise_krls_failures(info[0].contiguous(), info[1].contiguous(), lam, K.sizes(), scale_by_k, op);
  return r.S.reshape(K.sizes().slice(0, K.dim() - 1));
}

inline std::tuple<at::Tensor, at::Tensor> krls_ex_outputs(const KrlsResult& r, const at::Tensor& K) {
  return {r.S.reshape(K.sizes().slice(0, K.dim() - 1)), r.status.reshape(K.sizes().slice(0, K.dim() - 2))};
}

// Result of an empty batch (no matrix): nothing to compute.
inline KrlsResult krls_empty_result(const at::Tensor& K) {
  const int64_t k = K.size(-1);
  const int64_t batch = K.numel() / k / k;
  const auto int_opts = K.options().dtype(at::kInt);
  return {at::empty({batch, k}, K.options()), at::zeros({batch}, int_opts), at::zeros({batch}, int_opts)};
}

// Which krls path to take. CHAMELEON_KRLS_PATH=fused|library forces one (benchmarks and tests
// compare the two at the same sizes); `auto` or unset lets `fused_by_default` decide. Forcing
// `fused` above the fused kernel's size limit is an error, not silently ignored.
inline bool krls_use_fused(bool fused_by_default, int64_t k, int64_t fused_max_k, const char* backend) {
  const char* env = std::getenv("CHAMELEON_KRLS_PATH");
  if (env == nullptr || env[0] == '\0' || std::string(env) == "auto") return fused_by_default && k <= fused_max_k;
  const std::string v(env);
  TORCH_CHECK_VALUE(v == "fused" || v == "library",
                    "CHAMELEON_KRLS_PATH must be 'fused', 'library' or 'auto', got '", v, "'");
  TORCH_CHECK_VALUE(v == "library" || k <= fused_max_k, "CHAMELEON_KRLS_PATH=fused: the fused ", backend,
                    " krls kernel handles k <= ", fused_max_k, ", got k = ", k,
                    " (use 'library' or 'auto' for this size)");
  return v == "fused";
}

// The library path (LAPACK on CPU, cuSOLVER on CUDA, through ATen): the whole evaluation with
// batched ATen ops on K's device, never synchronising.
KrlsResult krls_library(const at::Tensor& K, const KrlsLam& lam, bool center, bool scale_by_k);
// Its second half, for backends with their own preparation. Kc [batch, k, k] float64 is the
// checked, symmetrised, centred kernel WITHOUT mu (overwritten: it becomes Kc + mu I) (its diagonal must stay exact for the
// cancellation-free scores); mu [batch] float64 (1 for rejected matrices); maxabs [batch]
// float64 = max|K| per matrix; status [batch] int32 from the checks.
KrlsResult krls_factor_scores(const at::Tensor& Kc, const at::Tensor& mu, const at::Tensor& maxabs,
                              const at::Tensor& status, at::ScalarType out_dtype);
// mu per matrix [batch] float64 on K's device, and whether each matrix's lam is valid.
std::tuple<at::Tensor, at::Tensor> krls_mu(const at::Tensor& K, const KrlsLam& lam, bool scale_by_k);

}  // namespace chameleon
