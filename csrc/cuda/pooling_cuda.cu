// CUDA kernels for masked_mean_pool and domain_mean_pool.
//
// Two kernel sets, chosen by CHAMELEON_POOL_CUDA_KERNEL: v2 (the default; its section below
// lists how it differs) and v1, described here, kept until v2 has been measured on a device
// (then v1 can go, with its transliteration python_tests/test_pooling_cuda_plan.py).
//
// Row means (both ops). Memory-bound: every valid hidden row is read once with the widest
// aligned loads and masked rows are never read. Work items are (row b, T-split, H-strip):
//  - H: a strip is 32 lanes x V elements. The tensor's alignment and strides fix V (16-byte
//    loads when they allow it); a misaligned head and a ragged tail (< V elements each) go
//    to one extra "edge" strip with scalar loads, so an odd H or an offset view keeps the
//    vector body.
//  - T: rows longer than needed to fill the GPU are split into kSplitRound-token multiples;
//    each split writes a float64 partial and a second kernel adds the splits in order.
//    The split count depends only on the shapes, never on the device.
//  - Tokens: warp w takes the 32-token chunks w, w + 8, ... of its split. The warp ballots
//    the chunk's mask bits (no shared memory, no block barrier), prefetches the next
//    chunk's mask while it loads this chunk's valid rows four at a time, and adds the
//    chunk's sum (at most 32 rows, in float32 or float64) into a compensated float64
//    total, so the error stays bounded for any T, in registers (no memory grows with T).
//  - The 8 warps' totals are added in warp order; splits in split order: deterministic.
// Launches loop over work items (grid-stride), so no shape can exceed the grid limit.
//
// domain_mean_pool then reduces the row means per domain without leaving the device (v2
// with at most 16 domains: per-chunk partial sums, see below; otherwise): a stable sort of
// the ids gives each domain's rows in batch order (CSR offsets by searchsorted), each
// domain's rows are summed in fixed chunks of kSegChunk rows in parallel, and the chunks
// are added in order. Nothing goes to the host, so the op can be
// captured in a CUDA graph; ids on the device are checked there (a device-side assert).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "../checks.h"

namespace chameleon {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunkT = 32;                          // tokens per warp chunk (one ballot)
constexpr int64_t kSplitRound = kWarps * kChunkT;    // 256: a split is a multiple of this
constexpr int64_t kTargetItems = 2048;               // work items wanted before splitting T
constexpr int kSegChunk = 32;                        // rows per chunk of a domain's segment
constexpr unsigned kFull = 0xffffffffu;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Geometry of one row-means launch, fixed on the host from shapes, strides and alignment.
struct PoolGeom {
  int64_t B, T, H, sB, sT;
  int64_t head;          // columns [0, head) are the misaligned head (scalar, edge strip)
  int64_t n_vec;         // vectors of V columns in the body [head, body_end)
  int64_t body_end;      // head + n_vec * V; columns [body_end, H) are the tail (edge strip)
  int64_t n_vec_strips;  // ceil(n_vec / 32)
  int64_t n_strips;      // n_vec_strips + (head or tail ? 1 : 0)
  int64_t n_splits, split_T;
};

// Loads W consecutive columns at p (W-aligned when W > 1) as acc_t.
template <typename scalar_t, typename acc_t, int W>
__device__ __forceinline__ void load_cols(const scalar_t* p, acc_t (&x)[W]) {
  if constexpr (W == 1) {
    x[0] = static_cast<acc_t>(p[0]);
  } else {
    const Vec<scalar_t, W> v = *reinterpret_cast<const Vec<scalar_t, W>*>(p);
#pragma unroll
    for (int i = 0; i < W; ++i) x[i] = static_cast<acc_t>(v.v[i]);
  }
}

// One warp's share of tokens [t_begin, t_end) of a row: float64 sums of its W columns
// (at `col`, valid for this lane when `active`) and the number of valid tokens it saw
// (the same on every lane). Every lane of the warp must call this together.
template <typename scalar_t, typename acc_t, int W>
__device__ __forceinline__ void warp_row_sums(const scalar_t* __restrict__ col, bool active,
                                              const bool* __restrict__ mrow, int64_t t_begin,
                                              int64_t t_end, int64_t sT, int warp, int lane,
                                              double (&total)[W], double (&comp)[W], int64_t& count) {
  int64_t c0 = t_begin + static_cast<int64_t>(warp) * kChunkT;
  bool next_valid = c0 + lane < t_end && (mrow == nullptr || mrow[c0 + lane]);
  for (; c0 < t_end; c0 += kSplitRound) {
    const bool valid = next_valid;
    const int64_t c1 = c0 + kSplitRound;  // prefetch the next chunk's mask bit
    next_valid = c1 + lane < t_end && (mrow == nullptr || mrow[c1 + lane]);
    unsigned bits = __ballot_sync(kFull, valid);
    count += __popc(bits);
    if (!active) continue;
    const scalar_t* base = col + c0 * sT;
    acc_t acc[W];
#pragma unroll
    for (int v = 0; v < W; ++v) acc[v] = acc_t(0);
    while (__popc(bits) >= 4) {
      const int j0 = __ffs(bits) - 1;
      bits &= bits - 1;
      const int j1 = __ffs(bits) - 1;
      bits &= bits - 1;
      const int j2 = __ffs(bits) - 1;
      bits &= bits - 1;
      const int j3 = __ffs(bits) - 1;
      bits &= bits - 1;
      acc_t x0[W], x1[W], x2[W], x3[W];
      load_cols<scalar_t, acc_t, W>(base + j0 * sT, x0);
      load_cols<scalar_t, acc_t, W>(base + j1 * sT, x1);
      load_cols<scalar_t, acc_t, W>(base + j2 * sT, x2);
      load_cols<scalar_t, acc_t, W>(base + j3 * sT, x3);
#pragma unroll
      for (int v = 0; v < W; ++v) acc[v] += (x0[v] + x1[v]) + (x2[v] + x3[v]);
    }
    while (bits) {
      const int j = __ffs(bits) - 1;
      bits &= bits - 1;
      acc_t x[W];
      load_cols<scalar_t, acc_t, W>(base + j * sT, x);
#pragma unroll
      for (int v = 0; v < W; ++v) acc[v] += x[v];
    }
#pragma unroll
    for (int v = 0; v < W; ++v) {  // compensated (Kahan) float64 add: bounded error for any T
      const double y = static_cast<double>(acc[v]) - comp[v];
      const double t = total[v] + y;
      comp[v] = (t - total[v]) - y;
      total[v] = t;
    }
  }
}

// The end of a block work item: the 8 warps' totals added in warp order (and their valid-token
// counts), written as the mean (one split) or the float64 partial (several splits). Every
// thread of the block must call this together.
template <typename acc_t, int W, int V>
__device__ __forceinline__ void block_item_write(const PoolGeom& g, int64_t b, int64_t split, int64_t strip, int64_t h,
                                                 bool active, const double (&total)[W], int64_t count,
                                                 double (*s_red)[32 * V], int64_t* s_cnt, acc_t* __restrict__ means,
                                                 int64_t* __restrict__ counts, double* __restrict__ ws_sum,
                                                 int64_t* __restrict__ ws_cnt) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Value v of each lane at [v * 32 + lane]: the 32 lanes store (and warp 0 later reads) 32
  // consecutive doubles, which is free of shared-memory bank conflicts; the lane-major layout
  // [lane * W + v] put lanes W doubles apart: for W = 8, 8-way conflicts in each half warp
  // (16 shared-memory wavefronts per access instead of 2).
#pragma unroll
  for (int v = 0; v < W; ++v) s_red[warp][v * 32 + lane] = total[v];
  if (lane == 0) s_cnt[warp] = count;
  __syncthreads();
  if (warp == 0) {
    int64_t n = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) n += s_cnt[w];
    if (active) {
#pragma unroll
      for (int v = 0; v < W; ++v) {
        double s = 0.0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += s_red[w][v * 32 + lane];
        if (g.n_splits == 1)
          means[b * g.H + h + v] = n > 0 ? static_cast<acc_t>(s / static_cast<double>(n)) : acc_t(0);
        else
          ws_sum[(split * g.B + b) * g.H + h + v] = s;
      }
    }
    if (strip == 0 && lane == 0) {
      if (g.n_splits == 1) counts[b] = n;
      else ws_cnt[split * g.B + b] = n;
    }
  }
  __syncthreads();  // s_red and s_cnt are rewritten by the block's next item
}

// One work item (b, split, strip) with W columns per lane starting at column h (active
// lanes only). Writes the mean (one split) or the float64 partial (several splits).
template <typename scalar_t, typename acc_t, int W, int V>
__device__ __forceinline__ void row_item(const scalar_t* __restrict__ hidden, const bool* __restrict__ mask,
                                         const PoolGeom& g, int64_t b, int64_t split, int64_t strip,
                                         int64_t h, bool active, double (*s_red)[32 * V],
                                         int64_t* s_cnt, acc_t* __restrict__ means,
                                         int64_t* __restrict__ counts, double* __restrict__ ws_sum,
                                         int64_t* __restrict__ ws_cnt) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t t_begin = split * g.split_T;
  const int64_t t_end = t_begin + g.split_T < g.T ? t_begin + g.split_T : g.T;
  const scalar_t* col = hidden + b * g.sB + (active ? h : 0);
  const bool* mrow = mask == nullptr ? nullptr : mask + b * g.T;

  double total[W], comp[W];
#pragma unroll
  for (int v = 0; v < W; ++v) total[v] = comp[v] = 0.0;
  int64_t count = 0;
  warp_row_sums<scalar_t, acc_t, W>(col, active, mrow, t_begin, t_end, g.sT, warp, lane, total, comp, count);

  block_item_write<acc_t, W, V>(g, b, split, strip, h, active, total, count, s_red, s_cnt, means, counts, ws_sum,
                                ws_cnt);
}

// At least 3 blocks (24 warps) per SM: enough 16-byte loads in flight to cover HBM latency.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads, 3)
    row_means_kernel(const scalar_t* __restrict__ hidden, const bool* __restrict__ mask, PoolGeom g,
                     acc_t* __restrict__ means, int64_t* __restrict__ counts, double* __restrict__ ws_sum,
                     int64_t* __restrict__ ws_cnt) {
  __shared__ double s_red[kWarps][32 * V];
  __shared__ int64_t s_cnt[kWarps];
  const int lane = threadIdx.x & 31;
  const int64_t items = g.B * g.n_splits * g.n_strips;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    // strip fastest, so neighbouring blocks read neighbouring columns of the same rows
    const int64_t strip = item % g.n_strips;
    const int64_t rest = item / g.n_strips;
    const int64_t split = rest % g.n_splits;
    const int64_t b = rest / g.n_splits;
    if (strip < g.n_vec_strips) {
      const int64_t vi = strip * 32 + lane;
      row_item<scalar_t, acc_t, V, V>(hidden, mask, g, b, split, strip, g.head + vi * V, vi < g.n_vec,
                                      s_red, s_cnt, means, counts, ws_sum, ws_cnt);
    } else {  // the edge strip: lanes [0, head) take the head, the next ones the tail
      const int64_t tail = g.H - g.body_end;
      const int64_t h = lane < g.head ? lane : g.body_end + (lane - g.head);
      row_item<scalar_t, acc_t, 1, V>(hidden, mask, g, b, split, strip, h, lane < g.head + tail, s_red,
                                      s_cnt, means, counts, ws_sum, ws_cnt);
    }
  }
}

// means[b, h] = (sum over splits, in order) / (valid tokens of row b), and counts[b].
template <typename acc_t>
__global__ void combine_splits_kernel(const double* __restrict__ ws_sum, const int64_t* __restrict__ ws_cnt,
                                      int64_t n_splits, int64_t B, int64_t H, acc_t* __restrict__ means,
                                      int64_t* __restrict__ counts) {
  const int64_t n = B * H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / H, h = i - b * H;
    double s = 0.0;
    int64_t c = 0;
    for (int64_t k = 0; k < n_splits; ++k) {
      s += ws_sum[(k * B + b) * H + h];
      c += ws_cnt[k * B + b];
    }
    means[i] = c > 0 ? static_cast<acc_t>(s / static_cast<double>(c)) : acc_t(0);
    if (h == 0) counts[b] = c;
  }
}

// Blocks for a grid-stride launch over `items`: enough to fill the device several times,
// never more than the items nor the grid limit.
int64_t grid_for(int64_t items, int64_t per_sm) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min(items, sms * per_sm));
}

// The widest vector (in elements, a power of two <= 16 bytes) that every row start shares.
template <typename scalar_t>
int pick_vec(const at::Tensor& hidden) {
  int V = 16 / static_cast<int>(sizeof(scalar_t));
  const int64_t sB = hidden.size(0) > 1 ? hidden.stride(0) : 0;
  const int64_t sT = hidden.size(1) > 1 ? hidden.stride(1) : 0;
  while (V > 1 && (sB % V != 0 || sT % V != 0)) V /= 2;
  return V;
}

PoolGeom make_geom(const at::Tensor& hidden, int V) {
  PoolGeom g{};
  g.B = hidden.size(0);
  g.T = hidden.size(1);
  g.H = hidden.size(2);
  g.sB = hidden.stride(0);
  g.sT = hidden.stride(1);
  const int64_t elem = static_cast<int64_t>(hidden.element_size());
  const int64_t misalign = (reinterpret_cast<uintptr_t>(hidden.const_data_ptr()) / elem) % V;
  g.head = std::min<int64_t>(g.H, (V - misalign) % V);
  g.n_vec = (g.H - g.head) / V;
  g.body_end = g.head + g.n_vec * V;
  g.n_vec_strips = (g.n_vec + 31) / 32;
  g.n_strips = g.n_vec_strips + ((g.head > 0 || g.body_end < g.H) ? 1 : 0);
  // Split T only as far as needed to reach kTargetItems work items, in multiples of
  // kSplitRound tokens (one chunk per warp).
  const int64_t base = g.B * g.n_strips;
  int64_t splits = 1;
  if (base > 0 && base < kTargetItems && g.T > kSplitRound)
    splits = std::min((kTargetItems + base - 1) / base, (g.T + kSplitRound - 1) / kSplitRound);
  const int64_t per = (g.T + splits - 1) / splits;
  g.split_T = std::max<int64_t>(kSplitRound, (per + kSplitRound - 1) / kSplitRound * kSplitRound);
  g.n_splits = g.T > 0 ? (g.T + g.split_T - 1) / g.split_T : 1;
  return g;
}

// A launch of block work items (v1's row_means_kernel or v2's row_means_block_v2, same
// parameters), then the combine of the T splits if there are several.
template <typename scalar_t, typename acc_t, typename Kernel>
void launch_block_items(Kernel kernel, const at::Tensor& hidden, const bool* mask, const PoolGeom& g,
                        at::Tensor& means, at::Tensor& counts) {
  const int64_t items = g.B * g.n_splits * g.n_strips;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor ws_sum, ws_cnt;
  if (g.n_splits > 1) {  // every element is written by the first kernel: no zero fill
    ws_sum = at::empty({g.n_splits, g.B, g.H}, hidden.options().dtype(at::kDouble));
    ws_cnt = at::empty({g.n_splits, g.B}, hidden.options().dtype(at::kLong));
  }
  kernel<<<grid_for(items, 16), kThreads, 0, stream>>>(
      hidden.const_data_ptr<scalar_t>(), mask, g, means.data_ptr<acc_t>(), counts.data_ptr<int64_t>(),
      g.n_splits > 1 ? ws_sum.data_ptr<double>() : nullptr, g.n_splits > 1 ? ws_cnt.data_ptr<int64_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (g.n_splits > 1) {
    combine_splits_kernel<acc_t><<<grid_for((g.B * g.H + 255) / 256, 8), 256, 0, stream>>>(
        ws_sum.const_data_ptr<double>(), ws_cnt.const_data_ptr<int64_t>(), g.n_splits, g.B, g.H,
        means.data_ptr<acc_t>(), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename acc_t, int V>
void launch_row_means(const at::Tensor& hidden, const bool* mask, const PoolGeom& g, at::Tensor& means,
                      at::Tensor& counts) {
  launch_block_items<scalar_t, acc_t>(row_means_kernel<scalar_t, acc_t, V>, hidden, mask, g, means, counts);
}

// ---------------------------------------------------------------- row means, v2
//
// v2 differs from v1 (above, still selectable: CHAMELEON_POOL_CUDA_KERNEL=v1) in three ways:
//  - Short rows (T <= kWarpRowMaxT) are warp work items when there are at least
//    kWarpItemsMin of them: one warp takes a whole (row, strip), all its chunks in order,
//    with no shared memory and no block barrier. In v1 a row of 128 tokens has 4 chunks for 8
//    warps, so half of every block waited at the barrier. Fewer items (a small batch) keep
//    block items: 8 warps per row finish a lone row sooner than one warp would. The choice
//    depends on the shapes only.
//  - Eight valid rows are loaded per group instead of four, and a group's missing rows read
//    a zero row rather than the rest being loaded one by one: every lane keeps 8 loads in
//    flight.
//  - The warp's mask bit for the first chunk of its next item is loaded with the last chunk
//    of the current one, so no item starts with a lone dependent mask load.
// Each warp still adds its chunks in a fixed order into a compensated float64 total, and a
// block adds its warps in warp order: the result depends on the shapes only.

constexpr int64_t kWarpRowMaxT = kSplitRound;  // rows this short are warp work items (no T split)
constexpr int64_t kWarpItemsMin = 1024;        // ... if there are this many (row, strip) items
constexpr int kGroup = 8;                      // valid rows loaded together by each lane

// The mask bit of this lane's token in the chunk at c0 of a row (mrow) ending at t_end:
// false past the end, so t_end = 0 means "no chunk".
__device__ __forceinline__ bool chunk_bit(const bool* __restrict__ mrow, int64_t c0, int64_t t_end, int lane) {
  return c0 + lane < t_end && (mrow == nullptr || mrow[c0 + lane]);
}

// Where a warp's next item starts: its row's mask, the warp's first chunk, the row's end.
struct NextChunk {
  const bool* mrow;
  int64_t c0, end;  // end = 0: no next item
};

// 16 zero bytes in device memory: what a group's missing rows read.
__device__ const Vec<uint32_t, 4> kZeroRow = {{0u, 0u, 0u, 0u}};

// acc += the rows of `bits` (chunk positions, ascending) at base + j * sT, eight at a time:
// (((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))), a missing row being 0. The eight
// loads are unconditional, a missing row reading kZeroRow: a load under a branch was
// compiled as load-then-use, one at a time, and zeroing a loaded value afterwards made
// ptxas wait for some loads before issuing the next ones.
template <typename scalar_t, typename acc_t, int W>
__device__ __forceinline__ void chunk_sums_v2(const scalar_t* __restrict__ base, int64_t sT, unsigned bits,
                                              acc_t (&acc)[W]) {
  while (bits) {
    int j[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      j[k] = __ffs(bits) - 1;  // -1 once bits is empty
      bits &= bits - 1;
    }
    // all eight raw loads first, conversions after: converting each load as it arrived let
    // the compiler reuse its registers and wait on it before issuing the next loads
    Vec<scalar_t, W> raw[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k)
      raw[k] = *(j[k] >= 0 ? reinterpret_cast<const Vec<scalar_t, W>*>(base + j[k] * sT)
                           : reinterpret_cast<const Vec<scalar_t, W>*>(&kZeroRow));
    acc_t x[kGroup][W];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
#pragma unroll
      for (int v = 0; v < W; ++v) x[k][v] = static_cast<acc_t>(raw[k].v[v]);
    }
#pragma unroll
    for (int v = 0; v < W; ++v)
      acc[v] += ((x[0][v] + x[1][v]) + (x[2][v] + x[3][v])) + ((x[4][v] + x[5][v]) + (x[6][v] + x[7][v]));
  }
}

// One warp's chunks c_first, c_first + step, ... (< t_end) of a row, as warp_row_sums, with
// the chunk's mask bit `valid` handed in (prefetched) and the bit of `next` handed back.
// kKahan: compensated float64 adds of the chunk sums (any T); without it, plain float64 adds
// (for at most kWarpRowMaxT / kChunkT = 8 chunks, whose float64 rounding is ~1e-15 relative,
// far below the float32 output's; it saves 2 W registers per lane).
// Every lane of the warp must call this together.
template <typename scalar_t, typename acc_t, int W, bool kKahan>
__device__ __forceinline__ bool warp_span_sums(const scalar_t* __restrict__ col, bool active,
                                               const bool* __restrict__ mrow, int64_t c_first, int64_t t_end,
                                               int64_t step, int64_t sT, int lane, bool valid, const NextChunk& next,
                                               double (&total)[W], double (&comp)[W], int64_t& count) {
  if (c_first >= t_end) return chunk_bit(next.mrow, next.c0, next.end, lane);  // no chunk here
  for (int64_t c0 = c_first; c0 < t_end; c0 += step) {
    const int64_t c1 = c0 + step;
    const bool more = c1 < t_end;  // prefetch the next chunk's bit, or the next item's first
    const bool next_valid = more ? chunk_bit(mrow, c1, t_end, lane) : chunk_bit(next.mrow, next.c0, next.end, lane);
    const unsigned bits = __ballot_sync(kFull, valid);
    valid = next_valid;
    count += __popc(bits);
    if (!active) continue;
    acc_t acc[W];
#pragma unroll
    for (int v = 0; v < W; ++v) acc[v] = acc_t(0);
    chunk_sums_v2<scalar_t, acc_t, W>(col + c0 * sT, sT, bits, acc);
#pragma unroll
    for (int v = 0; v < W; ++v) {
      if constexpr (kKahan) {  // compensated float64 add, as in v1
        const double y = static_cast<double>(acc[v]) - comp[v];
        const double t = total[v] + y;
        comp[v] = (t - total[v]) - y;
        total[v] = t;
      } else {
        total[v] += static_cast<double>(acc[v]);
      }
    }
  }
  return valid;
}

// Item index -> (row, split, strip), strip fastest (as in v1).
struct ItemPos {
  int64_t b, split, strip;
};
__device__ __forceinline__ ItemPos item_pos(const PoolGeom& g, int64_t item) {
  ItemPos p;
  p.strip = item % g.n_strips;
  const int64_t rest = item / g.n_strips;
  p.split = rest % g.n_splits;
  p.b = rest / g.n_splits;
  return p;
}

// Where warp `warp` of the block starts `item` (the block kernel: chunk `warp` of its split);
// end = 0 when item is past the last one.
__device__ __forceinline__ NextChunk block_item_start(const PoolGeom& g, const bool* __restrict__ mask,
                                                      int64_t item, int64_t items, int warp) {
  if (item >= items) return NextChunk{nullptr, 0, 0};
  const ItemPos p = item_pos(g, item);
  const int64_t t_begin = p.split * g.split_T;
  const int64_t t_end = t_begin + g.split_T < g.T ? t_begin + g.split_T : g.T;
  return NextChunk{mask == nullptr ? nullptr : mask + p.b * g.T, t_begin + static_cast<int64_t>(warp) * kChunkT, t_end};
}

// One block work item, as row_item (v1) but through warp_span_sums; returns the warp's bit
// for its next item.
template <typename scalar_t, typename acc_t, int W, int V>
__device__ __forceinline__ bool row_item_v2(const scalar_t* __restrict__ hidden, const PoolGeom& g, const ItemPos& p,
                                            const NextChunk& here, const NextChunk& next, bool valid, int64_t h,
                                            bool active, double (*s_red)[32 * V], int64_t* s_cnt,
                                            acc_t* __restrict__ means, int64_t* __restrict__ counts,
                                            double* __restrict__ ws_sum, int64_t* __restrict__ ws_cnt) {
  const int lane = threadIdx.x & 31;
  const scalar_t* col = hidden + p.b * g.sB + (active ? h : 0);
  double total[W], comp[W];
#pragma unroll
  for (int v = 0; v < W; ++v) total[v] = comp[v] = 0.0;
  int64_t count = 0;
  valid = warp_span_sums<scalar_t, acc_t, W, true>(col, active, here.mrow, here.c0, here.end, kSplitRound, g.sT, lane,
                                                   valid, next, total, comp, count);
  block_item_write<acc_t, W, V>(g, p.b, p.split, p.strip, h, active, total, count, s_red, s_cnt, means, counts,
                                ws_sum, ws_cnt);
  return valid;
}

// Rows longer than kWarpRowMaxT: block work items (row, split, strip), 8 warps per item.
// 16-byte vectors need more than the 80 registers of 3 blocks per SM (8 loads of 16 bytes
// in flight, the float sums, the float64 totals and compensations per lane): with 80, the
// half-precision kernels spilled and the float/double ones reused a load's registers, which
// serialised the loads. kMinBlocks gives them 2 blocks per SM: 16 warps with 8 loads of 512
// bytes each in flight, 64 KB per SM, about three times what covers the memory latency.
template <typename scalar_t, int V>
constexpr int kMinBlocks = V * sizeof(scalar_t) == 16 ? 2 : 3;

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t, V>)
    row_means_block_v2(const scalar_t* __restrict__ hidden, const bool* __restrict__ mask, PoolGeom g,
                       acc_t* __restrict__ means, int64_t* __restrict__ counts, double* __restrict__ ws_sum,
                       int64_t* __restrict__ ws_cnt) {
  __shared__ double s_red[kWarps][32 * V];
  __shared__ int64_t s_cnt[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t items = g.B * g.n_splits * g.n_strips;
  NextChunk here = block_item_start(g, mask, blockIdx.x, items, warp);
  bool valid = chunk_bit(here.mrow, here.c0, here.end, lane);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const ItemPos p = item_pos(g, item);
    const NextChunk next = block_item_start(g, mask, item + gridDim.x, items, warp);
    if (p.strip < g.n_vec_strips) {
      const int64_t vi = p.strip * 32 + lane;
      valid = row_item_v2<scalar_t, acc_t, V, V>(hidden, g, p, here, next, valid, g.head + vi * V, vi < g.n_vec,
                                                 s_red, s_cnt, means, counts, ws_sum, ws_cnt);
    } else {  // the edge strip, as in v1
      const int64_t tail = g.H - g.body_end;
      const int64_t h = lane < g.head ? lane : g.body_end + (lane - g.head);
      valid = row_item_v2<scalar_t, acc_t, 1, V>(hidden, g, p, here, next, valid, h, lane < g.head + tail, s_red,
                                                 s_cnt, means, counts, ws_sum, ws_cnt);
    }
    here = next;
  }
}

// One warp work item (row b, strip) of a short row: the mean of W columns per lane.
template <typename scalar_t, typename acc_t, int W>
__device__ __forceinline__ bool warp_item(const scalar_t* __restrict__ hidden, const bool* __restrict__ mask,
                                          const PoolGeom& g, int64_t b, int64_t strip, int64_t h, bool active,
                                          bool valid, const NextChunk& next, acc_t* __restrict__ means,
                                          int64_t* __restrict__ counts) {
  const int lane = threadIdx.x & 31;
  const scalar_t* col = hidden + b * g.sB + (active ? h : 0);
  double total[W], comp[W];
#pragma unroll
  for (int v = 0; v < W; ++v) total[v] = comp[v] = 0.0;
  int64_t count = 0;
  const bool* mrow = mask == nullptr ? nullptr : mask + b * g.T;
  valid = warp_span_sums<scalar_t, acc_t, W, false>(col, active, mrow, 0, g.T, kChunkT, g.sT, lane, valid, next, total,
                                                    comp, count);
  if (active) {
#pragma unroll
    for (int v = 0; v < W; ++v)
      means[b * g.H + h + v] = count > 0 ? static_cast<acc_t>(total[v] / static_cast<double>(count)) : acc_t(0);
  }
  if (strip == 0 && lane == 0) counts[b] = count;
  return valid;
}

// Rows of at most kWarpRowMaxT tokens (never split): warp work items (row, strip), strip
// fastest; each warp walks the items gw, gw + (all warps of the grid), ... Registers as in
// row_means_block_v2.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t, V>)
    row_means_warp_v2(const scalar_t* __restrict__ hidden, const bool* __restrict__ mask, PoolGeom g,
                      acc_t* __restrict__ means, int64_t* __restrict__ counts) {
  const int lane = threadIdx.x & 31;
  const int64_t items = g.B * g.n_strips;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  auto start = [&](int64_t item) {
    if (item >= items) return NextChunk{nullptr, 0, 0};
    return NextChunk{mask == nullptr ? nullptr : mask + (item / g.n_strips) * g.T, 0, g.T};
  };
  const NextChunk s0 = start(first);
  bool valid = chunk_bit(s0.mrow, s0.c0, s0.end, lane);
  for (int64_t item = first; item < items; item += stride) {
    const int64_t b = item / g.n_strips, strip = item % g.n_strips;
    const NextChunk next = start(item + stride);
    if (strip < g.n_vec_strips) {
      const int64_t vi = strip * 32 + lane;
      valid = warp_item<scalar_t, acc_t, V>(hidden, mask, g, b, strip, g.head + vi * V, vi < g.n_vec, valid, next,
                                            means, counts);
    } else {  // the edge strip, as in the block kernels
      const int64_t tail = g.H - g.body_end;
      const int64_t h = lane < g.head ? lane : g.body_end + (lane - g.head);
      valid = warp_item<scalar_t, acc_t, 1>(hidden, mask, g, b, strip, h, lane < g.head + tail, valid, next, means,
                                            counts);
    }
  }
}

template <typename scalar_t, typename acc_t, int V>
void launch_row_means_v2(const at::Tensor& hidden, const bool* mask, const PoolGeom& g, at::Tensor& means,
                         at::Tensor& counts) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (g.T <= kWarpRowMaxT && g.B * g.n_strips >= kWarpItemsMin) {  // make_geom never splits such rows
    const int64_t items = g.B * g.n_strips;
    row_means_warp_v2<scalar_t, acc_t, V><<<grid_for((items + kWarps - 1) / kWarps, 16), kThreads, 0, stream>>>(
        hidden.const_data_ptr<scalar_t>(), mask, g, means.data_ptr<acc_t>(), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  launch_block_items<scalar_t, acc_t>(row_means_block_v2<scalar_t, acc_t, V>, hidden, mask, g, means, counts);
}

// Which pooling kernels run: CHAMELEON_POOL_CUDA_KERNEL=v1|v2 (default v2). v1 (the block
// kernel for every T, sort-based domain segments) is kept for A/B timing and as a fallback
// until v2 has been measured on a device. Read on every call, like CHAMELEON_KRLS_PATH, so a
// test or a benchmark can switch in-process (a getenv is negligible next to a launch).
enum class PoolKernels { kV1, kV2 };

PoolKernels pool_kernels() {
  const char* env = std::getenv("CHAMELEON_POOL_CUDA_KERNEL");
  if (env == nullptr || *env == '\0') return PoolKernels::kV2;
  const std::string v(env);
  if (v == "v2") return PoolKernels::kV2;
  TORCH_CHECK_VALUE(v == "v1", "CHAMELEON_POOL_CUDA_KERNEL must be 'v1' or 'v2', got '", v, "'");
  return PoolKernels::kV1;
}

// Row means [B, H] in the pooled dtype and valid-token counts [B] (int64).
std::tuple<at::Tensor, at::Tensor> row_means_cuda(const at::Tensor& hidden_in, const at::Tensor& mask,
                                                  PoolKernels which) {
  const at::Tensor hidden =
      (hidden_in.stride(2) == 1 || hidden_in.size(2) == 1) ? hidden_in : hidden_in.contiguous();
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  at::Tensor means = at::empty({B, H}, hidden.options().dtype(pooled_dtype(hidden.scalar_type())));
  at::Tensor counts;
  if (H == 0 || B == 0) {  // nothing to read; counts straight from the mask
    counts = mask.defined() ? mask.sum(1).to(at::kLong) : at::full({B}, T, hidden.options().dtype(at::kLong));
    return {means, counts};
  }
  counts = at::empty({B}, hidden.options().dtype(at::kLong));
  const bool* mk = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  auto launch = [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    const int V = pick_vec<scalar_t>(hidden);
    const PoolGeom g = make_geom(hidden, V);
    // pick_vec never exceeds 16 bytes: 8 only for 2-byte types, 4 for 2- and 4-byte ones.
    auto run = [&](auto vec) {
      constexpr int kV = decltype(vec)::value;
      if (which == PoolKernels::kV1) launch_row_means<scalar_t, acc_t, kV>(hidden, mk, g, means, counts);
      else launch_row_means_v2<scalar_t, acc_t, kV>(hidden, mk, g, means, counts);
    };
    switch (V) {
      case 8:
        if constexpr (sizeof(scalar_t) == 2) run(std::integral_constant<int, 8>{});
        break;
      case 4:
        if constexpr (sizeof(scalar_t) <= 4) run(std::integral_constant<int, 4>{});
        break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      default: run(std::integral_constant<int, 1>{}); break;
    }
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

// ---------------------------------------------------------------- domain segments

// counts[d] = rows of domain d with at least one valid token (integer adds: any order gives
// the same result). Ids that reached the device unchecked are checked here.
__global__ void domain_counts_kernel(const int64_t* __restrict__ ids, const int64_t* __restrict__ row_counts,
                                     int64_t B, int64_t D, unsigned long long* __restrict__ counts) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = ids[b];
    CUDA_KERNEL_ASSERT(d >= 0 && d < D && "domain_mean_pool: a domain id is outside [0, num_domains)");
    if (d >= 0 && d < D && row_counts[b] > 0) atomicAdd(counts + d, 1ull);
  }
}

// The domain owning global chunk g: the last d with chunk_off[d] <= g (chunk_off is
// non-decreasing, chunk_off[0] = 0, g < chunk_off[D]).
__device__ __forceinline__ int64_t chunk_domain(const int64_t* __restrict__ chunk_off, int64_t D, int64_t g) {
  int64_t lo = 0, hi = D;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (chunk_off[mid] <= g) lo = mid;
    else hi = mid;
  }
  return lo;
}

// partial[g, h] = sum of means[order[p], h] over the kSegChunk (or fewer) sorted positions p
// of chunk g, in order. Items are (chunk, strip of blockDim.x columns); chunks at or past
// chunk_off[D] (the launch is sized for the worst case) do nothing.
template <typename acc_t>
__global__ void segment_chunks_kernel(const acc_t* __restrict__ means, const int64_t* __restrict__ order,
                                      const int64_t* __restrict__ offsets, const int64_t* __restrict__ chunk_off,
                                      int64_t D, int64_t H, int64_t max_chunks, int64_t n_strips,
                                      double* __restrict__ partial) {
  const int64_t items = max_chunks * n_strips;
  const int64_t n_chunks = chunk_off[D];
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t g = item / n_strips;
    if (g >= n_chunks) continue;  // uniform over the block
    const int64_t h = (item % n_strips) * blockDim.x + threadIdx.x;
    if (h >= H) continue;
    const int64_t d = chunk_domain(chunk_off, D, g);
    const int64_t p0 = offsets[d] + (g - chunk_off[d]) * kSegChunk;
    const int64_t p1 = p0 + kSegChunk < offsets[d + 1] ? p0 + kSegChunk : offsets[d + 1];
    double s = 0.0;
    int64_t p = p0;
    for (; p + 4 <= p1; p += 4) {
      const acc_t x0 = means[order[p] * H + h], x1 = means[order[p + 1] * H + h];
      const acc_t x2 = means[order[p + 2] * H + h], x3 = means[order[p + 3] * H + h];
      s += static_cast<double>(x0);
      s += static_cast<double>(x1);
      s += static_cast<double>(x2);
      s += static_cast<double>(x3);
    }
    for (; p < p1; ++p) s += static_cast<double>(means[order[p] * H + h]);
    partial[g * H + h] = s;
  }
}

// sums[d, h] = the chunks of domain d added in order (zero for a domain with no rows).
template <typename acc_t>
__global__ void segment_combine_kernel(const double* __restrict__ partial, const int64_t* __restrict__ chunk_off,
                                       int64_t D, int64_t H, acc_t* __restrict__ sums) {
  const int64_t n = D * H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i / H, h = i - d * H;
    double s = 0.0;
    for (int64_t g = chunk_off[d]; g < chunk_off[d + 1]; ++g) s += partial[g * H + h];
    sums[i] = static_cast<acc_t>(s);
  }
}

// ------------------------------------------------- domain sums for few domains (v2)
//
// For num_domains <= kSmallDomains, no sort: the batch is cut into chunks of `chunk_rows`
// consecutive rows; one kernel sums each chunk's row means per domain, in batch order, into
// float64 partials [n_chunks, D, H] (and counts each chunk's non-empty rows per domain); a
// second adds the chunks in chunk order. Two launches after the row means instead of about
// fifteen (sort, searchsorted, cumsum, ...), and the order of every addition is fixed by B
// and D alone: deterministic. A chunk has at least 8 D rows, so the partials are at most a
// quarter of the means' size (8 D bytes per column and chunk against 4 bytes per row of
// float32 means), at least kDomChunkMin rows (short serial loops, many blocks), and there are
// at most kDomMaxChunks chunks, which bounds the combine's serial loop.

constexpr int kSmallDomains = 16;
constexpr int64_t kDomChunkMin = 32;
constexpr int64_t kDomMaxChunks = 128;
constexpr int kDomThreads = 256;
constexpr int kDomRowGroup = 8;  // rows whose loads are issued together

int64_t domain_chunk_rows(int64_t B, int64_t D) {
  return std::max<int64_t>(std::max<int64_t>(kDomChunkMin, 8 * D), (B + kDomMaxChunks - 1) / kDomMaxChunks);
}

// partial[c, d, h] = sum of means[b, h] over the rows b of chunk c with ids[b] = d, in batch
// order; chunk_cnt[c, d] = those rows with at least one valid token. Items are (chunk,
// strip of kDomThreads columns), strip fastest. Ids that reached the device unchecked are
// checked here (each row once: by thread 0 of its chunk's first strip). kD >= D
// accumulators per thread, in registers: each row adds its value to its domain and 0.0 to
// the others (branch-free; adding +0.0 leaves a sum that started at +0.0 unchanged), after
// the loads of kDomRowGroup rows were issued together; a warp loads 32 rows' ids at once and
// shuffles them. A select of the domain by branches (an earlier form) waited on one row's
// load at a time.
template <typename acc_t, int kD>
__global__ void __launch_bounds__(kDomThreads)
    domain_partials_kernel(const acc_t* __restrict__ means, const int64_t* __restrict__ row_counts,
                           const int64_t* __restrict__ ids, int64_t B, int64_t H, int64_t D, int64_t chunk_rows,
                           int64_t n_chunks, int64_t n_strips, double* __restrict__ partial,
                           int64_t* __restrict__ chunk_cnt) {
  const int64_t items = n_chunks * n_strips;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t c = item / n_strips, strip = item % n_strips;
    const int64_t b0 = c * chunk_rows, b1 = b0 + chunk_rows < B ? b0 + chunk_rows : B;
    if (strip == 0 && threadIdx.x < D) {
      const int64_t mine = threadIdx.x;
      int64_t n = 0;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t d = ids[b];
        if (mine == 0)
          CUDA_KERNEL_ASSERT(d >= 0 && d < D && "domain_mean_pool: a domain id is outside [0, num_domains)");
        n += (d == mine && row_counts[b] > 0) ? 1 : 0;
      }
      chunk_cnt[c * D + mine] = n;
    }
    // Every lane runs the row loop (its shuffles need the whole warp); a lane past H reads
    // column 0 and writes nothing.
    const int64_t h = strip * kDomThreads + threadIdx.x;
    const int64_t hc = h < H ? h : 0;
    const int lane = threadIdx.x & 31;
    double acc[kD];
#pragma unroll
    for (int k = 0; k < kD; ++k) acc[k] = 0.0;
    for (int64_t b = b0; b < b1; b += 32) {  // 32 rows: one coalesced load of their ids
      const int64_t id = b + lane < b1 ? ids[b + lane] : -1;
      const int lane_d = id >= 0 && id < D ? static_cast<int>(id) : -1;  // -1: no domain
      const int n = b1 - b < 32 ? static_cast<int>(b1 - b) : 32;
      for (int r0 = 0; r0 < n; r0 += kDomRowGroup) {
        int d[kDomRowGroup];
        double x[kDomRowGroup];
#pragma unroll
        for (int r = 0; r < kDomRowGroup; ++r) {  // rows past the chunk read row b
          const int j = r0 + r;  // <= 31
          d[r] = __shfl_sync(kFull, lane_d, j);
          x[r] = static_cast<double>(means[(j < n ? b + j : b) * H + hc]);
        }
#pragma unroll
        for (int r = 0; r < kDomRowGroup; ++r) {
          const int dr = r0 + r < n ? d[r] : -1;
#pragma unroll
          for (int k = 0; k < kD; ++k) acc[k] += dr == k ? x[r] : 0.0;
        }
      }
    }
    if (h < H) {
#pragma unroll
      for (int k = 0; k < kD; ++k)
        if (k < D) partial[(c * D + k) * H + h] = acc[k];
    }
  }
}

// sums[d, h] = the chunks' partials added in chunk order; counts[d] likewise.
template <typename acc_t>
__global__ void domain_combine_kernel(const double* __restrict__ partial, const int64_t* __restrict__ chunk_cnt,
                                      int64_t D, int64_t H, int64_t n_chunks, acc_t* __restrict__ sums,
                                      int64_t* __restrict__ counts) {
  const int64_t n = D * H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i / H, h = i - d * H;
    double s = 0.0;
    for (int64_t c = 0; c < n_chunks; ++c) s += partial[(c * D + d) * H + h];
    sums[i] = static_cast<acc_t>(s);
    if (h == 0) {
      int64_t k = 0;
      for (int64_t c = 0; c < n_chunks; ++c) k += chunk_cnt[c * D + d];
      counts[d] = k;
    }
  }
}

// sums [D, H] and counts [D] for 1 <= D <= kSmallDomains, B > 0, H > 0.
std::tuple<at::Tensor, at::Tensor> domain_sums_small(const at::Tensor& means, const at::Tensor& row_counts,
                                                     const at::Tensor& ids, int64_t D) {
  const int64_t B = means.size(0), H = means.size(1);
  const int64_t chunk_rows = domain_chunk_rows(B, D);
  const int64_t n_chunks = (B + chunk_rows - 1) / chunk_rows;
  const int64_t n_strips = (H + kDomThreads - 1) / kDomThreads;
  const auto long_opts = means.options().dtype(at::kLong);
  // every element of these is written once by the kernels: no fills
  at::Tensor partial = at::empty({n_chunks, D, H}, means.options().dtype(at::kDouble));
  at::Tensor chunk_cnt = at::empty({n_chunks, D}, long_opts);
  at::Tensor sums = at::empty({D, H}, means.options());
  at::Tensor counts = at::empty({D}, long_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "domain_sums_small_cuda", [&] {
    auto partials = [&](auto kd) {  // as few accumulators as cover D
      domain_partials_kernel<scalar_t, decltype(kd)::value>
          <<<grid_for(n_chunks * n_strips, 16), kDomThreads, 0, stream>>>(
              means.const_data_ptr<scalar_t>(), row_counts.const_data_ptr<int64_t>(), ids.const_data_ptr<int64_t>(),
              B, H, D, chunk_rows, n_chunks, n_strips, partial.data_ptr<double>(), chunk_cnt.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (D <= 4) partials(std::integral_constant<int, 4>{});
    else if (D <= 8) partials(std::integral_constant<int, 8>{});
    else partials(std::integral_constant<int, kSmallDomains>{});
    domain_combine_kernel<scalar_t><<<grid_for((D * H + 255) / 256, 8), 256, 0, stream>>>(
        partial.const_data_ptr<double>(), chunk_cnt.const_data_ptr<int64_t>(), D, H, n_chunks,
        sums.data_ptr<scalar_t>(), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, counts};
}

at::Tensor masked_mean_pool_cuda(const at::Tensor& hidden, const c10::optional<at::Tensor>& mask_in) {
  const char* op = "masked_mean_pool";
  check_hidden(hidden, op);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor mask = normalized_mask(hidden, mask_in, op);
  return std::get<0>(row_means_cuda(hidden, mask, pool_kernels()));
}

std::tuple<at::Tensor, at::Tensor> domain_mean_pool_cuda(const at::Tensor& hidden,
                                                         const c10::optional<at::Tensor>& mask_in,
                                                         const at::Tensor& domain_ids_in,
                                                         int64_t num_domains) {
  const char* op = "domain_mean_pool";
  check_hidden(hidden, op);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor mask = normalized_mask(hidden, mask_in, op);
  at::Tensor ids = normalized_domain_ids(hidden, domain_ids_in, num_domains, op);
  const int64_t B = hidden.size(0), H = hidden.size(2), D = num_domains;
  if (ids.device().is_cpu()) {
    // Ids given on the host are checked there before anything runs, then copied over
    // without waiting for the device.
    const int64_t* id = ids.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      if (id[b] < 0 || id[b] >= D) raise_bad_domain_id(b, id[b], D, op);
    ids = ids.to(hidden.device(), at::kLong, /*non_blocking=*/true);
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const PoolKernels which = pool_kernels();
  const auto row = row_means_cuda(hidden, mask, which);
  const at::Tensor& means = std::get<0>(row);
  const at::Tensor& row_counts = std::get<1>(row);
  if (which == PoolKernels::kV2 && B > 0 && H > 0 && D <= kSmallDomains)
    return domain_sums_small(means, row_counts, ids, D);
  const auto long_opts = hidden.options().dtype(at::kLong);
  at::Tensor counts = at::zeros({D}, long_opts);  // atomically incremented: needs zeros
  at::Tensor sums = at::empty({D, H}, means.options());
  if (B > 0) {
    domain_counts_kernel<<<grid_for((B + 255) / 256, 4), 256, 0, stream>>>(
        ids.const_data_ptr<int64_t>(), row_counts.const_data_ptr<int64_t>(), B, D,
        reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (H == 0) return {sums, counts};

  // CSR segments on the device: a stable sort keeps batch order within a domain.
  const auto sorted = at::sort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted_ids = std::get<0>(sorted);
  const at::Tensor order = std::get<1>(sorted);
  const at::Tensor offsets = at::searchsorted(sorted_ids, at::arange(D + 1, long_opts));  // [D + 1]
  const at::Tensor lengths = offsets.slice(0, 1) - offsets.slice(0, 0, D);
  const at::Tensor chunk_off = at::cat({at::zeros({1}, long_opts), at::floor_divide(lengths + (kSegChunk - 1), kSegChunk).cumsum(0)});
  // sum_d ceil(len_d / c) <= B / c + D: the launch and the partials are sized for that.
  const int64_t max_chunks = B / kSegChunk + D;
  at::Tensor partial = at::empty({max_chunks, H}, hidden.options().dtype(at::kDouble));
  constexpr int threads = 256;
  const int64_t n_strips = (H + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "domain_segments_cuda", [&] {
    segment_chunks_kernel<scalar_t><<<grid_for(max_chunks * n_strips, 16), threads, 0, stream>>>(
        means.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
        chunk_off.const_data_ptr<int64_t>(), D, H, max_chunks, n_strips, partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    segment_combine_kernel<scalar_t><<<grid_for((D * H + threads - 1) / threads, 8), threads, 0, stream>>>(
        partial.const_data_ptr<double>(), chunk_off.const_data_ptr<int64_t>(), D, H, sums.data_ptr<scalar_t>());
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
