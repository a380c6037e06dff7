// CUDA kernel for krls: one thread block per kernel matrix, the matrix kept in shared
// memory in float64 from load to leverage scores; only k numbers (and a status word) go
// back to global memory. Thousands of small matrices cost one launch.
//
// Per matrix: load + symmetry/finiteness check, centring, A = Kc + mu I, right-looking
// Cholesky in shared memory, then thread i solves L w = e_i and S_i = 1 - mu ||w||^2.
// Above kFusedMaxK the matrix no longer fits on chip comfortably and the cuSOLVER path
// (krls_library) is used instead.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"

namespace chameleon {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kFusedMaxK = 64;

__device__ __forceinline__ double warp_max(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <typename scalar_t, int KMAX>
__global__ void __launch_bounds__(kThreads)
    krls_fused_kernel(const scalar_t* __restrict__ K, int64_t sb, int64_t sr, int64_t sc, int k,
                      double lam, bool center, bool scale_by_k, double sym_tol,
                      scalar_t* __restrict__ out, int* __restrict__ status, int* __restrict__ detail) {
  __shared__ double A[KMAX * KMAX];
  __shared__ double rowmean[KMAX];
  __shared__ double s_max[2][kWarps];
  __shared__ int s_nonfinite;
  __shared__ int s_fail;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.x;
  const scalar_t* Kb = K + b * sb;
  const double mu = scale_by_k ? lam * k : lam;
  if (tid == 0) {
    s_nonfinite = 0;
    s_fail = 0;
  }
  __syncthreads();

  // 1. Load the symmetric part; measure max|K| and max|K - K^T|.
  double maxabs = 0.0, maxasym = 0.0;
  for (int e = tid; e < k * k; e += kThreads) {
    const int i = e / k, j = e % k;
    const double x = static_cast<double>(Kb[i * sr + j * sc]);
    const double y = static_cast<double>(Kb[j * sr + i * sc]);
    if (!isfinite(x)) s_nonfinite = 1;
    maxabs = fmax(maxabs, fabs(x));
    maxasym = fmax(maxasym, fabs(x - y));
    A[i * KMAX + j] = 0.5 * (x + y);
  }
  maxabs = warp_max(maxabs);
  maxasym = warp_max(maxasym);
  if (lane == 0) {
    s_max[0][warp] = maxabs;
    s_max[1][warp] = maxasym;
  }
  __syncthreads();
  if (tid == 0) {
    double ma = 0.0, mas = 0.0;
    for (int w = 0; w < kWarps; ++w) {
      ma = fmax(ma, s_max[0][w]);
      mas = fmax(mas, s_max[1][w]);
    }
    if (s_nonfinite) s_fail = kKrlsNonFinite;
    else if (mas > sym_tol * ma) s_fail = kKrlsNotSymmetric;
  }
  __syncthreads();
  if (s_fail) {
    if (tid == 0) status[b] = s_fail;
    return;
  }

  // 2. Centre (H K H) and add mu on the diagonal.
  if (center) {
    for (int i = tid; i < k; i += kThreads) {
      double s = 0.0;
      for (int j = 0; j < k; ++j) s += A[i * KMAX + j];
      rowmean[i] = s / k;
    }
    __syncthreads();
  }
  double grand = 0.0;
  if (center) {
    for (int i = 0; i < k; ++i) grand += rowmean[i];
    grand /= k;
  }
  for (int e = tid; e < k * k; e += kThreads) {
    const int i = e / k, j = e % k;
    double a = A[i * KMAX + j];
    if (center) a += grand - rowmean[i] - rowmean[j];
    if (i == j) a += mu;
    A[i * KMAX + j] = a;
  }
  __syncthreads();

  // 3. Right-looking Cholesky on the lower triangle.
  for (int j = 0; j < k; ++j) {
    if (tid == 0) {
      const double d = A[j * KMAX + j];
      if (!(d > 0.0) || !isfinite(d)) s_fail = kKrlsNotPositiveDefinite;
      else A[j * KMAX + j] = sqrt(d);
    }
    __syncthreads();
    if (s_fail) {
      if (tid == 0) {
        status[b] = s_fail;
        detail[b] = j;
      }
      return;
    }
    const double ljj = A[j * KMAX + j];
    for (int i = j + 1 + tid; i < k; i += kThreads) A[i * KMAX + j] /= ljj;
    __syncthreads();
    const int m = k - j - 1;
    for (int e = tid; e < m * m; e += kThreads) {
      const int i = j + 1 + e / m, l = j + 1 + e % m;
      if (l <= i) A[i * KMAX + l] -= A[i * KMAX + j] * A[l * KMAX + j];
    }
    __syncthreads();
  }

  // 4. S_i = 1 - mu ||L^-1 e_i||^2, one column of L^-1 per thread.
  for (int i = tid; i < k; i += kThreads) {
    double w[KMAX];
    double norm2 = 0.0;
    for (int j = i; j < k; ++j) {
      double s = (j == i) ? 1.0 : 0.0;
      for (int p = i; p < j; ++p) s -= A[j * KMAX + p] * w[p];
      w[j] = s / A[j * KMAX + j];
      norm2 += w[j] * w[j];
    }
    out[b * k + i] = static_cast<scalar_t>(fmin(fmax(1.0 - mu * norm2, 0.0), 1.0));
  }
}

template <typename scalar_t, int KMAX>
void launch_fused(const at::Tensor& Kf, double lam, bool center, bool scale_by_k, at::Tensor& out,
                  at::Tensor& status, at::Tensor& detail) {
  const int64_t batch = Kf.size(0);
  krls_fused_kernel<scalar_t, KMAX><<<batch, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      Kf.const_data_ptr<scalar_t>(), Kf.stride(0), Kf.stride(1), Kf.stride(2),
      static_cast<int>(Kf.size(1)), lam, center, scale_by_k, krls_symmetry_tol(Kf.scalar_type()),
      out.data_ptr<scalar_t>(), status.data_ptr<int>(), detail.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor krls_cuda(const at::Tensor& K, double lam, bool center, bool scale_by_k) {
  check_krls_args(K, lam, "krls");
  const c10::cuda::CUDAGuard guard(K.device());
  if (K.numel() == 0) return at::empty(K.sizes().slice(0, K.dim() - 1), K.options());
  const int64_t k = K.size(-1);
  if (k > kFusedMaxK || !krls_use_fused(true)) return krls_library(K, lam, center, scale_by_k);

  const int64_t batch = K.numel() / (k * k);
  const at::Tensor Kf = K.reshape({batch, k, k});
  at::Tensor out = at::empty({batch, k}, K.options());
  // status and detail share one buffer: a single copy to the host checks the whole batch.
  at::Tensor info = at::zeros({2, batch}, K.options().dtype(at::kInt));
  at::Tensor status = info[0], detail = info[1];
  AT_DISPATCH_FLOATING_TYPES(K.scalar_type(), "krls_cuda", [&] {
    if (k <= 16) launch_fused<scalar_t, 16>(Kf, lam, center, scale_by_k, out, status, detail);
    else if (k <= 32) launch_fused<scalar_t, 32>(Kf, lam, center, scale_by_k, out, status, detail);
    else launch_fused<scalar_t, 64>(Kf, lam, center, scale_by_k, out, status, detail);
  });
  const at::Tensor info_cpu = info.cpu();
  raise_krls_failures(info_cpu[0].contiguous(), info_cpu[1].contiguous(), K.sizes(), "krls");
  std::vector<int64_t> shape(K.sizes().begin(), K.sizes().end() - 1);
  return out.reshape(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(chameleon, CUDA, m) { m.impl("krls", &krls_cuda); }

}  // namespace chameleon
