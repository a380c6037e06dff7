// CUDA kernels for masked_mean_pool and domain_mean_pool.
//
// Memory-bound: every valid hidden row is read once with 16-byte loads and masked rows
// are never read. A block owns one row b and a 32*VEC-wide strip of H; its 8 warps take
// interleaved valid tokens. Valid token indices are compacted per tile of 1024 tokens
// (ballot + prefix, so the order is fixed), which keeps the inner loop branch-free with
// four independent loads in flight. Partial sums are combined in a fixed order: results
// are deterministic. domain_mean_pool sums the row means per domain in batch order
// (rows grouped by a stable counting sort on the host), also deterministic.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"

namespace chameleon {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileT = 1024;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void add_vec(acc_t (&acc)[VEC], const scalar_t* p) {
  const Vec<scalar_t, VEC> x = *reinterpret_cast<const Vec<scalar_t, VEC>*>(p);
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] += static_cast<acc_t>(x.v[v]);
}

// means [B, H] (acc_t) and counts [B]; hidden has unit stride along H.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    row_means_kernel(const scalar_t* __restrict__ hidden, const bool* __restrict__ mask, int64_t T,
                     int64_t H, int64_t sB, int64_t sT, int64_t n_strips, acc_t* __restrict__ means,
                     int64_t* __restrict__ counts) {
  __shared__ int s_idx[kTileT];
  __shared__ int s_warp[kWarps];
  __shared__ acc_t s_red[kWarps][32 * VEC];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.x / n_strips;
  const int64_t strip = blockIdx.x % n_strips;
  const int64_t h0 = strip * (32 * VEC) + lane * VEC;
  const bool active = h0 < H;  // vector path: H % VEC == 0, so a vector is all in or all out
  const scalar_t* row = hidden + b * sB + (active ? h0 : 0);

  acc_t acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = acc_t(0);
  int64_t total = 0;

  for (int64_t t0 = 0; t0 < T; t0 += kTileT) {
    const int n_t = static_cast<int>(T - t0 < kTileT ? T - t0 : kTileT);
    int n_valid = 0;
    if (mask == nullptr) {
      for (int i = tid; i < n_t; i += kThreads) s_idx[i] = i;
      n_valid = n_t;
    } else {
      const bool* mrow = mask + b * T + t0;
      for (int c = 0; c < n_t; c += kThreads) {
        const int t = c + tid;
        const bool valid = t < n_t && mrow[t];
        const unsigned ballot = __ballot_sync(0xffffffffu, valid);
        if (lane == 0) s_warp[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, chunk_total = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          before += (w < warp) ? s_warp[w] : 0;
          chunk_total += s_warp[w];
        }
        if (valid) s_idx[n_valid + before + __popc(ballot & ((1u << lane) - 1u))] = t;
        n_valid += chunk_total;
        __syncthreads();  // s_warp is rewritten by the next chunk
      }
    }
    __syncthreads();
    if (active) {
      int i = warp;
      for (; i + 3 * kWarps < n_valid; i += 4 * kWarps) {
        const scalar_t* p0 = row + (t0 + s_idx[i]) * sT;
        const scalar_t* p1 = row + (t0 + s_idx[i + kWarps]) * sT;
        const scalar_t* p2 = row + (t0 + s_idx[i + 2 * kWarps]) * sT;
        const scalar_t* p3 = row + (t0 + s_idx[i + 3 * kWarps]) * sT;
        const Vec<scalar_t, VEC> x0 = *reinterpret_cast<const Vec<scalar_t, VEC>*>(p0);
        const Vec<scalar_t, VEC> x1 = *reinterpret_cast<const Vec<scalar_t, VEC>*>(p1);
        const Vec<scalar_t, VEC> x2 = *reinterpret_cast<const Vec<scalar_t, VEC>*>(p2);
        const Vec<scalar_t, VEC> x3 = *reinterpret_cast<const Vec<scalar_t, VEC>*>(p3);
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          acc[v] += (static_cast<acc_t>(x0.v[v]) + static_cast<acc_t>(x1.v[v])) +
                    (static_cast<acc_t>(x2.v[v]) + static_cast<acc_t>(x3.v[v]));
      }
      for (; i < n_valid; i += kWarps) add_vec<scalar_t, acc_t, VEC>(acc, row + (t0 + s_idx[i]) * sT);
    }
    total += n_valid;
    __syncthreads();  // s_idx is rewritten by the next tile
  }

#pragma unroll
  for (int v = 0; v < VEC; ++v) s_red[warp][lane * VEC + v] = acc[v];
  __syncthreads();
  if (warp == 0 && active) {
    const acc_t inv = total > 0 ? acc_t(1) / static_cast<acc_t>(total) : acc_t(0);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      acc_t s = acc_t(0);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += s_red[w][lane * VEC + v];
      means[b * H + h0 + v] = s * inv;
    }
  }
  if (strip == 0 && tid == 0) counts[b] = total;
}

// sums[d, :] = sum of means[r, :] over the non-empty rows r of domain d, in batch order.
template <typename acc_t>
__global__ void domain_sum_kernel(const acc_t* __restrict__ means, const int64_t* __restrict__ row_counts,
                                  const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                  int64_t H, int64_t n_strips, acc_t* __restrict__ sums,
                                  int64_t* __restrict__ counts) {
  const int64_t d = blockIdx.x / n_strips;
  const int64_t h = (blockIdx.x % n_strips) * blockDim.x + threadIdx.x;
  acc_t acc = acc_t(0);
  int64_t c = 0;
  for (int64_t j = offsets[d]; j < offsets[d + 1]; ++j) {
    const int64_t r = order[j];
    if (row_counts[r] > 0) {
      if (h < H) acc += means[r * H + h];
      ++c;
    }
  }
  if (h < H) sums[d * H + h] = acc;
  if (blockIdx.x % n_strips == 0 && threadIdx.x == 0) counts[d] = c;
}

template <typename scalar_t, typename acc_t, int VEC>
void launch_row_means(const at::Tensor& hidden, const at::Tensor& mask, at::Tensor& means,
                      at::Tensor& counts) {
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  const int64_t n_strips = (H + 32 * VEC - 1) / (32 * VEC);
  const int64_t blocks = B * n_strips;
  if (blocks == 0) return;
  row_means_kernel<scalar_t, acc_t, VEC><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      hidden.const_data_ptr<scalar_t>(), mask.defined() ? mask.const_data_ptr<bool>() : nullptr, T, H,
      hidden.stride(0), hidden.stride(1), n_strips, means.data_ptr<acc_t>(), counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Row means [B, H] in the pooled dtype and valid-token counts [B] (int64).
std::tuple<at::Tensor, at::Tensor> row_means_cuda(const at::Tensor& hidden_in, const at::Tensor& mask) {
  const at::Tensor hidden =
      (hidden_in.stride(2) == 1 || hidden_in.size(2) == 1) ? hidden_in : hidden_in.contiguous();
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  at::Tensor means = at::zeros({B, H}, hidden.options().dtype(pooled_dtype(hidden.scalar_type())));
  at::Tensor counts;
  if (H == 0) {  // nothing to read; counts straight from the mask
    counts = mask.defined() ? mask.sum(1).to(at::kLong) : at::full({B}, T, hidden.options().dtype(at::kLong));
    return {means, counts};
  }
  counts = at::empty({B}, hidden.options().dtype(at::kLong));
  auto launch = [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    constexpr int V = 16 / sizeof(scalar_t);
    const bool aligned = reinterpret_cast<uintptr_t>(hidden.const_data_ptr()) % 16 == 0;
    const bool vec_ok = aligned && H % V == 0 && hidden.stride(0) % V == 0 && hidden.stride(1) % V == 0;
    if (vec_ok) launch_row_means<scalar_t, acc_t, V>(hidden, mask, means, counts);
    else launch_row_means<scalar_t, acc_t, 1>(hidden, mask, means, counts);
  };
  switch (hidden.scalar_type()) {
    case at::kFloat: launch(float{}, float{}); break;
    case at::kDouble: launch(double{}, double{}); break;
    case at::kHalf: launch(at::Half{}, float{}); break;
    case at::kBFloat16: launch(at::BFloat16{}, float{}); break;
    default: TORCH_CHECK(false, "unreachable dtype ", hidden.scalar_type());
  }
  return {means, counts};
}

at::Tensor masked_mean_pool_cuda(const at::Tensor& hidden, const c10::optional<at::Tensor>& mask_in) {
  const char* op = "masked_mean_pool";
  check_hidden(hidden, op);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor mask = normalized_mask(hidden, mask_in, op);
  return std::get<0>(row_means_cuda(hidden, mask));
}

std::tuple<at::Tensor, at::Tensor> domain_mean_pool_cuda(const at::Tensor& hidden,
                                                         const c10::optional<at::Tensor>& mask_in,
                                                         const at::Tensor& domain_ids_in,
                                                         int64_t num_domains) {
  const char* op = "domain_mean_pool";
  check_hidden(hidden, op);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor mask = normalized_mask(hidden, mask_in, op);
  const at::Tensor ids = normalized_domain_ids(hidden, domain_ids_in, num_domains, op);
  const int64_t B = hidden.size(0), H = hidden.size(2), D = num_domains;

  // The ids come to the host once (B int64s): every id is checked before any write, and
  // rows are grouped by domain with a stable counting sort, which fixes the summation order.
  const at::Tensor ids_cpu = ids.cpu();
  const int64_t* id = ids_cpu.const_data_ptr<int64_t>();
  std::vector<int64_t> offsets(D + 1, 0), order(B);
  for (int64_t b = 0; b < B; ++b) {
    if (id[b] < 0 || id[b] >= D) raise_bad_domain_id(b, id[b], D, op);
    ++offsets[id[b] + 1];
  }
  for (int64_t d = 0; d < D; ++d) offsets[d + 1] += offsets[d];
  {
    std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
    for (int64_t b = 0; b < B; ++b) order[next[id[b]]++] = b;
  }
  const auto long_opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor order_d = at::from_blob(order.data(), {B}, long_opts).to(hidden.device());
  at::Tensor offsets_d = at::from_blob(offsets.data(), {D + 1}, long_opts).to(hidden.device());

  auto [means, row_counts] = row_means_cuda(hidden, mask);
  at::Tensor sums = at::empty({D, H}, means.options());
  at::Tensor counts = at::empty({D}, hidden.options().dtype(at::kLong));
  constexpr int threads = 256;
  const int64_t n_strips = std::max<int64_t>(1, (H + threads - 1) / threads);
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "domain_sum_cuda", [&] {
    domain_sum_kernel<scalar_t><<<D * n_strips, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        means.const_data_ptr<scalar_t>(), row_counts.const_data_ptr<int64_t>(),
        order_d.const_data_ptr<int64_t>(), offsets_d.const_data_ptr<int64_t>(), H, n_strips,
        sums.data_ptr<scalar_t>(), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(chameleon, CUDA, m) {
  m.impl("masked_mean_pool", &masked_mean_pool_cuda);
  m.impl("domain_mean_pool", &domain_mean_pool_cuda);
}

}  // namespace chameleon
