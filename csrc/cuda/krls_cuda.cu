// CUDA kernels for krls: kernel ridge leverage scores of a batch of small kernels, the way
// batched small-matrix libraries (MAGMA's batched potf2, KBLAS) do it: the matrix in
// registers, little shared memory, one reciprocal square root per pivot, and only k scores
// (and a status word) written back per matrix. The maths (cancellation-free scores) is in krls.h:
//   S_i = d_i W_ii^2 - mu sum_{p>i} W_pi^2,  W = L^-1,  d_i = pivot of Kc (without mu).
//
// k <= 16: a group of KMAX lanes (KMAX = 8 or 16; 32 / KMAX matrices per warp) per matrix.
//   Lane r holds row r of the matrix in registers; pivots and rows travel by width-KMAX
//   shuffles, so loops over columns are unrolled at compile time (no div/mod, no local
//   memory). Lane i then computes column i of W by forward substitution.
// 16 < k <= 64 (v2, the default): the sweep kernel, padded to 32 or 64, 2 x 16 elements per
//   thread, one or four warps per matrix (krls_sweep.cuh, see its comment).
// 16 < k <= 64 (v1, CHAMELEON_KRLS_CUDA_KERNEL=v1, kept for A/B timing on a device): the
//   register kernel above at KMAX = 32 (fully unrolled: 28.6k SASS instructions, 160
//   registers), and for k > 32 one warp per matrix with the matrix in shared memory (k + 1
//   pitch; lane l owns rows/columns l and 63 - l).
// Above the crossover: the cuSOLVER path (krls_library). Every loop over matrices is
// grid-strided, so any batch size fits the grid.
//
// The fused/library crossover is not measured yet: no GPU was available when these kernels
// were written. It is kFusedMaxK (64, the fused kernels' limit) unless CHAMELEON_KRLS_FUSED_MAX
// lowers it; benchmarks/gpu_report.py times both paths (and both kernel generations) at
// k = 7..64 so a device run can set it.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "../krls.h"
#include "krls_device.cuh"
#include "krls_sweep.cuh"

namespace chameleon {
namespace {

constexpr int64_t kFusedMaxK = 64;  // the fused kernels' limit; the crossover is measured (header comment)
constexpr int kWarpThreads = 128;   // block size of the register kernel (4 warps)
constexpr int kMaxSharedBytes = 48 * 1024;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this

// ------------------------------------------------------------------ k <= 32: registers

template <typename scalar_t, int KMAX>
__global__ void __launch_bounds__(kWarpThreads)
    krls_registers_kernel(const scalar_t* __restrict__ K, int64_t batch, int64_t sb, int64_t sr, int64_t sc, int k,
                          double lam_scalar, const double* __restrict__ lam, bool center, bool scale_by_k,
                          double sym_tol, scalar_t* __restrict__ out, int* __restrict__ status,
                          int* __restrict__ detail) {
  static_assert(KMAX == 8 || KMAX == 16 || KMAX == 32, "KMAX must divide the warp");
  constexpr int kGroups = 32 / KMAX;  // matrices per warp
  const int lane = threadIdx.x & 31;
  const int row = lane & (KMAX - 1);  // this lane's row of its matrix
  const int group = lane / KMAX;      // compile-time power of two: a shift
  const int64_t warps_per_block = blockDim.x >> 5;
  const int64_t warp_id = static_cast<int64_t>(blockIdx.x) * warps_per_block + (threadIdx.x >> 5);
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  const double inv_k = 1.0 / k;

  // The loop bound is uniform per warp, so every shuffle below has all 32 lanes present.
  for (int64_t base = warp_id * kGroups; base < batch; base += warp_stride * kGroups) {
    const int64_t b = base + group;
    const bool live = b < batch;
    const bool has_row = live && row < k;
    const scalar_t* Kb = K + (live ? b : 0) * sb;

    // 1. Load row `row` (and column `row`, for the symmetry check); padding stays 0.
    double a[KMAX];
    double maxabs = 0.0, maxasym = 0.0;
    int finite = 1;
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      double x = 0.0, y = 0.0;
      if (has_row && j < k) {
        y = static_cast<double>(Kb[j * sr + row * sc]);  // K[j, row]: coalesced across lanes
        x = static_cast<double>(Kb[row * sr + j * sc]);  // K[row, j]: same lines, from cache
      }
      finite &= (isfinite(x) && isfinite(y)) ? 1 : 0;
      maxabs = fmax(maxabs, fmax(fabs(x), fabs(y)));
      maxasym = fmax(maxasym, fabs(x - y));
      a[j] = 0.5 * (x + y);
    }
    // Reduce over the KMAX lanes of this matrix (xor offsets < KMAX stay inside the group).
#pragma unroll
    for (int o = KMAX / 2; o > 0; o >>= 1) {
      maxabs = fmax(maxabs, __shfl_xor_sync(kFullMask, maxabs, o));
      maxasym = fmax(maxasym, __shfl_xor_sync(kFullMask, maxasym, o));
      finite &= __shfl_xor_sync(kFullMask, finite, o);
    }
    double mu;
    int st = matrix_mu(lam_scalar, lam, live ? b : 0, k, scale_by_k, &mu);
    if (st == kKrlsOk && !finite) st = kKrlsNonFinite;
    if (st == kKrlsOk && maxasym > sym_tol * maxabs) st = kKrlsNotSymmetric;
    if (st != kKrlsOk) {  // uniform per group: factorise Kc = 0, mu = 1 harmlessly
      mu = 1.0;
#pragma unroll
      for (int j = 0; j < KMAX; ++j) a[j] = 0.0;
    }

    // 2. Centre: Kc = K - rowmean_i - rowmean_j + grand.
    if (center) {
      double rowmean = 0.0;
#pragma unroll
      for (int j = 0; j < KMAX; ++j) rowmean += a[j];
      rowmean *= inv_k;  // 0 on padding rows
      double grand = rowmean;
#pragma unroll
      for (int o = KMAX / 2; o > 0; o >>= 1) grand += __shfl_xor_sync(kFullMask, grand, o);
      grand *= inv_k;
#pragma unroll
      for (int j = 0; j < KMAX; ++j) {
        const double rm_j = __shfl_sync(kFullMask, rowmean, j, KMAX);
        if (row < k && j < k) a[j] += grand - rowmean - rm_j;
      }
    }

    // 3. Right-looking Cholesky of Kc + mu I, mu added only at the pivot: the diagonal keeps
    //    d_j (the pivot of Kc). Afterwards a[j] = L[row, j] for j < row.
    double rinv = 1.0, d_own = 0.0;
    int fail = -1;
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      if (j < k) {  // uniform
        const double dj = __shfl_sync(kFullMask, a[j], j, KMAX);
        const double piv = dj + mu;
        const bool ok = piv > 0.0 && piv <= DBL_MAX;
        if (!ok && fail < 0) fail = j;
        const double r = 1.0 / sqrt(ok ? piv : 1.0);
        if (row == j) {
          rinv = r;
          d_own = dj;
        }
        const double lij = row > j ? a[j] * r : 0.0;
        if (row > j) a[j] = lij;
#pragma unroll
        for (int m = j + 1; m < KMAX; ++m) {
          if (m < k) {
            const double lmj = __shfl_sync(kFullMask, lij, m, KMAX);
            if (m <= row) a[m] -= lij * lmj;
          }
        }
      }
    }

    // 4. Column `row` of W = L^-1, all lanes at once: w_p = (delta_{p,row} - sum_{q<p} L_pq w_q) / L_pp,
    //    with L_pq broadcast from lane p. S_row = d_row W_rr^2 - mu sum_{p>row} W_p,row^2.
    double w[KMAX];
    double below = 0.0;
#pragma unroll
    for (int p = 0; p < KMAX; ++p) {
      w[p] = 0.0;
      if (p < k) {
        double s = (p == row) ? 1.0 : 0.0;
#pragma unroll
        for (int q = 0; q < p; ++q) s -= __shfl_sync(kFullMask, a[q], p, KMAX) * w[q];
        w[p] = s * __shfl_sync(kFullMask, rinv, p, KMAX);
        if (p > row) below += w[p] * w[p];
      }
    }

    if (st == kKrlsOk && fail >= 0) st = krls_lam_too_small(mu, k, maxabs) ? kKrlsLamTooSmall : kKrlsNotPositiveDefinite;
    if (has_row) {
      const double S = fmin(fmax(d_own * rinv * rinv - mu * below, 0.0), 1.0);
      out[b * k + row] = st == kKrlsOk ? static_cast<scalar_t>(S) : static_cast<scalar_t>(NAN);
    }
    if (live && row == 0) {
      status[b] = st;
      detail[b] = st == kKrlsOk ? 0 : (fail >= 0 ? fail : 0);
    }
  }
}

// ------------------------------------------------------------------ 32 < k <= 64: shared memory

// Per warp: the matrix [k, k + 1] then rowmean, d and 1/L_jj [k] each, in doubles.
__host__ __device__ inline int64_t shared_doubles_per_matrix(int64_t k) { return k * (k + 1) + 3 * k; }

template <typename scalar_t>
__global__ void krls_shared_kernel(const scalar_t* __restrict__ K, int64_t batch, int64_t sb, int64_t sr, int64_t sc,
                                   int k, double lam_scalar, const double* __restrict__ lam, bool center,
                                   bool scale_by_k, double sym_tol, scalar_t* __restrict__ out,
                                   int* __restrict__ status, int* __restrict__ detail) {
  extern __shared__ double smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps_per_block = blockDim.x >> 5;
  const int ld = k + 1;
  double* A = smem + static_cast<int64_t>(warp) * shared_doubles_per_matrix(k);
  double* rowmean = A + k * ld;
  double* dpiv = rowmean + k;
  double* rinv = dpiv + k;
  // Rows / columns owned by this lane: l and 63 - l (so each lane's triangular work is about
  // equal); an index >= k is skipped.
  const int own[2] = {lane, 63 - lane};
  const double inv_k = 1.0 / k;

  for (int64_t b = static_cast<int64_t>(blockIdx.x) * warps_per_block + warp; b < batch;
       b += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const scalar_t* Kb = K + b * sb;
    // 1. Load (coalesced along rows), then symmetrise pair by pair: pair (i, j), j < i, is
    //    read and written only by the lane owning column j.
    for (int i = 0; i < k; ++i)
      for (int j = lane; j < k; j += 32) A[i * ld + j] = static_cast<double>(Kb[i * sr + j * sc]);
    __syncwarp();
    double maxabs = 0.0, maxasym = 0.0;
    int finite = 1;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = own[h];
      if (j >= k) continue;
      const double djj = A[j * ld + j];
      finite &= isfinite(djj) ? 1 : 0;
      maxabs = fmax(maxabs, fabs(djj));
      for (int i = j + 1; i < k; ++i) {
        const double x = A[i * ld + j], y = A[j * ld + i];
        finite &= (isfinite(x) && isfinite(y)) ? 1 : 0;
        maxabs = fmax(maxabs, fmax(fabs(x), fabs(y)));
        maxasym = fmax(maxasym, fabs(x - y));
        A[i * ld + j] = A[j * ld + i] = 0.5 * (x + y);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      maxabs = fmax(maxabs, __shfl_xor_sync(kFullMask, maxabs, o));
      maxasym = fmax(maxasym, __shfl_xor_sync(kFullMask, maxasym, o));
      finite &= __shfl_xor_sync(kFullMask, finite, o);
    }
    double mu;
    int st = matrix_mu(lam_scalar, lam, b, k, scale_by_k, &mu);
    if (st == kKrlsOk && !finite) st = kKrlsNonFinite;
    if (st == kKrlsOk && maxasym > sym_tol * maxabs) st = kKrlsNotSymmetric;
    __syncwarp();
    if (st != kKrlsOk) {  // uniform per warp: factorise Kc = 0, mu = 1 harmlessly
      mu = 1.0;
      for (int i = 0; i < k; ++i)
        for (int j = lane; j < k; j += 32) A[i * ld + j] = 0.0;
      __syncwarp();
    }

    // 2. Centre.
    if (center) {
      double partial = 0.0;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = own[h];
        if (i >= k) continue;
        double s = 0.0;
        for (int j = 0; j < k; ++j) s += A[i * ld + j];
        rowmean[i] = s * inv_k;
        partial += s * inv_k;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) partial += __shfl_xor_sync(kFullMask, partial, o);
      const double grand = partial * inv_k;
      __syncwarp();
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = own[h];
        if (i >= k) continue;
        const double rm_i = rowmean[i];
        for (int j = 0; j < k; ++j) A[i * ld + j] += grand - rm_i - rowmean[j];
      }
      __syncwarp();
    }

    // 3. Right-looking Cholesky on the lower triangle; mu enters only at the pivot.
    int fail = -1;
    for (int j = 0; j < k; ++j) {
      const double dj = A[j * ld + j];
      const double piv = dj + mu;
      const bool ok = piv > 0.0 && piv <= DBL_MAX;
      if (!ok && fail < 0) fail = j;
      const double r = 1.0 / sqrt(ok ? piv : 1.0);
      if (lane == 0) {
        dpiv[j] = dj;
        rinv[j] = r;
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = own[h];
        if (i > j && i < k) A[i * ld + j] *= r;
      }
      __syncwarp();
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = own[h];
        if (i <= j || i >= k) continue;
        const double lij = A[i * ld + j];
        for (int m = j + 1; m <= i; ++m) A[i * ld + m] -= lij * A[m * ld + j];
      }
      __syncwarp();
    }

    // 4. Column c of W = L^-1 for the lane's own c, stored in the free upper triangle
    //    (W_pc at A[c, p], p > c): every lane solves at once.
    if (st == kKrlsOk && fail >= 0) st = krls_lam_too_small(mu, k, maxabs) ? kKrlsLamTooSmall : kKrlsNotPositiveDefinite;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = own[h];
      if (c >= k) continue;
      const double wc = rinv[c];
      double below = 0.0;
      for (int p = c + 1; p < k; ++p) {
        double s = -A[p * ld + c] * wc;
        for (int q = c + 1; q < p; ++q) s -= A[p * ld + q] * A[c * ld + q];
        const double wp = s * rinv[p];
        A[c * ld + p] = wp;
        below += wp * wp;
      }
      const double S = fmin(fmax(dpiv[c] * wc * wc - mu * below, 0.0), 1.0);
      out[b * k + c] = st == kKrlsOk ? static_cast<scalar_t>(S) : static_cast<scalar_t>(NAN);
    }
    if (lane == 0) {
      status[b] = st;
      detail[b] = st == kKrlsOk ? 0 : (fail >= 0 ? fail : 0);
    }
    __syncwarp();  // the next matrix overwrites this warp's shared memory
  }
}

// ------------------------------------------------------------------ launch

template <typename scalar_t, int KMAX>
void launch_registers(const at::Tensor& Kf, const KrlsLam& lam, bool center, bool scale_by_k, at::Tensor& out,
                      at::Tensor& status, at::Tensor& detail) {
  const int64_t batch = Kf.size(0);
  const int64_t per_block = (kWarpThreads / 32) * (32 / KMAX);
  const int64_t blocks = std::min<int64_t>((batch + per_block - 1) / per_block, kMaxBlocks);
  krls_registers_kernel<scalar_t, KMAX><<<blocks, kWarpThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      Kf.const_data_ptr<scalar_t>(), batch, Kf.stride(0), Kf.stride(1), Kf.stride(2), static_cast<int>(Kf.size(1)),
      lam.scalar, lam.ptr(), center, scale_by_k, krls_symmetry_tol(Kf.scalar_type()), out.data_ptr<scalar_t>(),
      status.data_ptr<int>(), detail.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_shared(const at::Tensor& Kf, const KrlsLam& lam, bool center, bool scale_by_k, at::Tensor& out,
                   at::Tensor& status, at::Tensor& detail) {
  const int64_t batch = Kf.size(0), k = Kf.size(1);
  const int64_t bytes_per_matrix = shared_doubles_per_matrix(k) * static_cast<int64_t>(sizeof(double));
  const int64_t warps = std::max<int64_t>(1, std::min<int64_t>(4, kMaxSharedBytes / bytes_per_matrix));
  const int64_t blocks = std::min<int64_t>((batch + warps - 1) / warps, kMaxBlocks);
  krls_shared_kernel<scalar_t><<<blocks, warps * 32, warps * bytes_per_matrix, at::cuda::getCurrentCUDAStream()>>>(
      Kf.const_data_ptr<scalar_t>(), batch, Kf.stride(0), Kf.stride(1), Kf.stride(2), static_cast<int>(k), lam.scalar,
      lam.ptr(), center, scale_by_k, krls_symmetry_tol(Kf.scalar_type()), out.data_ptr<scalar_t>(),
      status.data_ptr<int>(), detail.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int KP>
void launch_sweep(const at::Tensor& Kf, const KrlsLam& lam, bool center, bool scale_by_k, at::Tensor& out,
                  at::Tensor& status, at::Tensor& detail) {
  using Shape = SweepShape<KP>;
  const int64_t batch = Kf.size(0);
  const int64_t blocks = std::min<int64_t>((batch + Shape::kMatrices - 1) / Shape::kMatrices, kMaxBlocks);
  krls_sweep_kernel<scalar_t, KP><<<blocks, Shape::kBlockThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      Kf.const_data_ptr<scalar_t>(), batch, Kf.stride(0), Kf.stride(1), Kf.stride(2), static_cast<int>(Kf.size(1)),
      lam.scalar, lam.ptr(), center, scale_by_k, krls_symmetry_tol(Kf.scalar_type()), out.data_ptr<scalar_t>(),
      status.data_ptr<int>(), detail.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Which kernels serve 16 < k <= 64: CHAMELEON_KRLS_CUDA_KERNEL=v2 (default: the sweep kernel)
// or v1 (the previous ones: unrolled registers for k <= 32, one warp per matrix in shared
// memory above), kept selectable for A/B timing on a device. Read at every call, like
// CHAMELEON_KRLS_PATH, so a test or benchmark can switch it in-process.
bool krls_cuda_use_v2() {
  const char* env = std::getenv("CHAMELEON_KRLS_CUDA_KERNEL");
  if (env == nullptr || env[0] == '\0') return true;
  const std::string v(env);
  TORCH_CHECK_VALUE(v == "v1" || v == "v2", "CHAMELEON_KRLS_CUDA_KERNEL must be 'v1' or 'v2', got '", v, "'");
  return v == "v2";
}

// The largest k that `auto` sends to the fused kernels: kFusedMaxK unless
// CHAMELEON_KRLS_FUSED_MAX (an integer 0..kFusedMaxK) lowers it, so a device run can time
// both sides of the crossover without a rebuild.
int64_t krls_cuda_crossover() {
  const char* env = std::getenv("CHAMELEON_KRLS_FUSED_MAX");
  if (env == nullptr || env[0] == '\0') return kFusedMaxK;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && v >= 0 && v <= kFusedMaxK,
                    "CHAMELEON_KRLS_FUSED_MAX must be an integer from 0 to ", kFusedMaxK, ", got '", env, "'");
  return v;
}

KrlsResult krls_cuda_result(const at::Tensor& K, const KrlsLam& lam, bool center, bool scale_by_k) {
  if (K.numel() == 0) return krls_empty_result(K);
  const int64_t k = K.size(-1);
  if (!krls_use_fused(k <= krls_cuda_crossover(), k, kFusedMaxK, "CUDA")) return krls_library(K, lam, center, scale_by_k);
  const bool v2 = krls_cuda_use_v2();
  const int64_t batch = K.numel() / (k * k);
  const at::Tensor Kf = K.reshape({batch, k, k});
  at::Tensor out = at::empty({batch, k}, K.options());
  // Every matrix's status and detail are written by the kernels: no zero fill needed.
  at::Tensor status = at::empty({batch}, K.options().dtype(at::kInt));
  at::Tensor detail = at::empty({batch}, K.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(K.scalar_type(), "krls_cuda", [&] {
    if (k <= 8) launch_registers<scalar_t, 8>(Kf, lam, center, scale_by_k, out, status, detail);
    else if (k <= 16) launch_registers<scalar_t, 16>(Kf, lam, center, scale_by_k, out, status, detail);
    else if (v2 && k <= 32) launch_sweep<scalar_t, 32>(Kf, lam, center, scale_by_k, out, status, detail);
    else if (v2) launch_sweep<scalar_t, 64>(Kf, lam, center, scale_by_k, out, status, detail);
    else if (k <= 32) launch_registers<scalar_t, 32>(Kf, lam, center, scale_by_k, out, status, detail);
    else launch_shared<scalar_t>(Kf, lam, center, scale_by_k, out, status, detail);
  });
  return {out, status, detail};
}

at::Tensor krls_cuda(const at::Tensor& K, double lam, bool center, bool scale_by_k) {
  check_krls_K(K, "krls");
  const c10::cuda::CUDAGuard guard(K.device());
  const KrlsLam l = krls_lam(lam, "krls");
  return krls_checked_scores(krls_cuda_result(K, l, center, scale_by_k), l, K, scale_by_k, "krls");
}

at::Tensor krls_lam_tensor_cuda(const at::Tensor& K, const at::Tensor& lam, bool center, bool scale_by_k) {
  check_krls_args(K, lam, "krls");
  const c10::cuda::CUDAGuard guard(K.device());
  const KrlsLam l = krls_lam(K, lam, "krls");
  return krls_checked_scores(krls_cuda_result(K, l, center, scale_by_k), l, K, scale_by_k, "krls");
}

std::tuple<at::Tensor, at::Tensor> krls_ex_cuda(const at::Tensor& K, double lam, bool center, bool scale_by_k) {
  check_krls_K(K, "krls_ex");
  const c10::cuda::CUDAGuard guard(K.device());
  return krls_ex_outputs(krls_cuda_result(K, krls_lam(lam, "krls_ex"), center, scale_by_k), K);
}

std::tuple<at::Tensor, at::Tensor> krls_ex_lam_tensor_cuda(const at::Tensor& K, const at::Tensor& lam, bool center,
                                                           bool scale_by_k) {
  check_krls_args(K, lam, "krls_ex");
  const c10::cuda::CUDAGuard guard(K.device());
  return krls_ex_outputs(krls_cuda_result(K, krls_lam(K, lam, "krls_ex"), center, scale_by_k), K);
}

}  // namespace

TORCH_LIBRARY_IMPL(chameleon, CUDA, m) {
  m.impl("krls", &krls_cuda);
  m.impl("krls.lam_tensor", &krls_lam_tensor_cuda);
  m.impl("krls_ex", &krls_ex_cuda);
  m.impl("krls_ex.lam_tensor", &krls_ex_lam_tensor_cuda);
}

}  // namespace chameleon
