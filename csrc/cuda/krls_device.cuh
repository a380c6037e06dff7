// Device helpers shared by the CUDA krls kernels (krls_cuda.cu, krls_sweep.cuh).
#pragma once

#include <cfloat>
#include <cstdint>

#include "../krls.h"

namespace chameleon {

constexpr unsigned kFullMask = 0xffffffffu;

// Per-matrix regulariser: mu, or kKrlsBadLam.
__device__ __forceinline__ int matrix_mu(double lam_scalar, const double* __restrict__ lam, int64_t b, int k,
                                         bool scale_by_k, double* mu) {
  const double lv = lam != nullptr ? lam[b] : lam_scalar;
  const double m = scale_by_k ? lv * k : lv;
  const bool ok = m > 0.0 && m <= DBL_MAX;
  *mu = ok ? m : 1.0;
  return ok ? kKrlsOk : kKrlsBadLam;
}

}  // namespace chameleon
