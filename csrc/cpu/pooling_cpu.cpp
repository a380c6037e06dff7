// CPU kernels for masked_mean_pool and domain_mean_pool.
//
// Pooling is memory-bound: the goal is to read each valid hidden row exactly once and
// never touch masked ones. Work is split over (row, H-chunk) tasks. A task walks its row
// in tiles of kTileT tokens: it gathers the tile's valid token indices (a fixed-size
// buffer, so memory does not grow with T), adds those rows into an L1-resident
// accumulator eight rows at a time, then adds the tile's sum into a compensated float64
// total. The running sum in the input's accumulation type never spans more than kTileT
// tokens, so the error stays bounded for any T (a float32 running sum over 2**28 ones stops
// at 2**24). Half and float32 inputs accumulate tiles in float32, float64 in float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../checks.h"
#include "clones.h"

namespace chameleon {
namespace {

// Tokens per tile: 512 x 8 bytes of indices, and at most 64 sums of 8 rows in one float32
// running sum before it is flushed into float64 (relative error below 64 x 2^-24 ~ 4e-6,
// whatever T). One pass over the task's columns per tile is the flush's whole cost.
constexpr int64_t kTileT = 512;

inline float bf16_to_float(uint16_t bits) {
  uint32_t w = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

// IEEE half -> float with integer operations and a bit mask (the method of FP16/c10, written
// here so that it is inlined and vectorised inside the x86-64-v3 clones; at::Half's own
// conversion is an out-of-line call per element there).
inline float f16_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  uint32_t nbits = (two_w >> 4) + (0xE0u << 23);
  float normalized;
  std::memcpy(&normalized, &nbits, sizeof(float));
  normalized *= 0x1.0p-112f;
  uint32_t dbits = (two_w >> 17) | (126u << 23);
  float denormalized;
  std::memcpy(&denormalized, &dbits, sizeof(float));
  denormalized -= 0.5f;
  uint32_t nb, db;
  std::memcpy(&nb, &normalized, sizeof(float));
  std::memcpy(&db, &denormalized, sizeof(float));
  // A mask rather than `?:`, which GCC treats as control flow and then does not vectorise.
  const uint32_t denormal = 0u - static_cast<uint32_t>(two_w < (1u << 27));
  const uint32_t out = sign | (db & denormal) | (nb & ~denormal);
  float f;
  std::memcpy(&f, &out, sizeof(float));
  return f;
}

// acc[h] += sum of 8 rows: one pass over acc per 8 rows, and 8 independent read streams
// (measured ~35% faster than 4 rows at a time on a 2-core x86 VM).
#define CHAMELEON_SUM8(load) \
  for (int64_t h = 0; h < n; ++h)  \
    acc[h] += ((load(r[0][h]) + load(r[1][h])) + (load(r[2][h]) + load(r[3][h]))) + \
              ((load(r[4][h]) + load(r[5][h])) + (load(r[6][h]) + load(r[7][h])));
#define CHAMELEON_SUM1(load) \
  for (int64_t h = 0; h < n; ++h) acc[h] += load(r0[h]);
#define CHAMELEON_AS_IS(x) (x)
#define CHAMELEON_BF16(x) bf16_to_float(x)
#define CHAMELEON_F16(x) f16_to_float(x)

CHAMELEON_CLONES void add8_f32(float* __restrict acc, const float* const* r, int64_t n) { CHAMELEON_SUM8(CHAMELEON_AS_IS) }
CHAMELEON_CLONES void add1_f32(float* __restrict acc, const float* r0, int64_t n) { CHAMELEON_SUM1(CHAMELEON_AS_IS) }
CHAMELEON_CLONES void add8_f64(double* __restrict acc, const double* const* r, int64_t n) { CHAMELEON_SUM8(CHAMELEON_AS_IS) }
CHAMELEON_CLONES void add1_f64(double* __restrict acc, const double* r0, int64_t n) { CHAMELEON_SUM1(CHAMELEON_AS_IS) }
CHAMELEON_CLONES void add8_bf16(float* __restrict acc, const uint16_t* const* r, int64_t n) { CHAMELEON_SUM8(CHAMELEON_BF16) }
CHAMELEON_CLONES void add1_bf16(float* __restrict acc, const uint16_t* r0, int64_t n) { CHAMELEON_SUM1(CHAMELEON_BF16) }
CHAMELEON_CLONES void add8_f16_generic(float* __restrict acc, const uint16_t* const* r, int64_t n) { CHAMELEON_SUM8(CHAMELEON_F16) }
CHAMELEON_CLONES void add1_f16_generic(float* __restrict acc, const uint16_t* r0, int64_t n) { CHAMELEON_SUM1(CHAMELEON_F16) }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// fp16 on x86-64-v3: F16C converts eight halves in one instruction, where the integer
// conversion above costs about ten. Same summation order as the generic loop, so the two
// give identical results; picked once by the CPU's features, like the clones.
#define CHAMELEON_LOAD_F16X8(k) _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r[k] + h)))
__attribute__((target("avx2,f16c,fma"))) void add8_f16_v3(float* __restrict acc, const uint16_t* const* r, int64_t n) {
  int64_t h = 0;
  for (; h + 8 <= n; h += 8) {
    const __m256 s = _mm256_add_ps(
        _mm256_add_ps(_mm256_add_ps(CHAMELEON_LOAD_F16X8(0), CHAMELEON_LOAD_F16X8(1)),
                      _mm256_add_ps(CHAMELEON_LOAD_F16X8(2), CHAMELEON_LOAD_F16X8(3))),
        _mm256_add_ps(_mm256_add_ps(CHAMELEON_LOAD_F16X8(4), CHAMELEON_LOAD_F16X8(5)),
                      _mm256_add_ps(CHAMELEON_LOAD_F16X8(6), CHAMELEON_LOAD_F16X8(7))));
    _mm256_storeu_ps(acc + h, _mm256_add_ps(_mm256_loadu_ps(acc + h), s));
  }
  if (h < n) {
    const uint16_t* tail[8];
    for (int k = 0; k < 8; ++k) tail[k] = r[k] + h;
    add8_f16_generic(acc + h, tail, n - h);
  }
}
__attribute__((target("avx2,f16c,fma"))) void add1_f16_v3(float* __restrict acc, const uint16_t* r0, int64_t n) {
  int64_t h = 0;
  for (; h + 8 <= n; h += 8)
    _mm256_storeu_ps(acc + h, _mm256_add_ps(_mm256_loadu_ps(acc + h),
                                            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + h)))));
  if (h < n) add1_f16_generic(acc + h, r0 + h, n - h);
}
#undef CHAMELEON_LOAD_F16X8
inline bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
}
void add8_f16(float* acc, const uint16_t* const* r, int64_t n) {
  if (has_f16c()) add8_f16_v3(acc, r, n);
  else add8_f16_generic(acc, r, n);
}
void add1_f16(float* acc, const uint16_t* r0, int64_t n) {
  if (has_f16c()) add1_f16_v3(acc, r0, n);
  else add1_f16_generic(acc, r0, n);
}
#else
void add8_f16(float* acc, const uint16_t* const* r, int64_t n) { add8_f16_generic(acc, r, n); }
void add1_f16(float* acc, const uint16_t* r0, int64_t n) { add1_f16_generic(acc, r0, n); }
#endif

// total[h] += tile[h] in float64 with Kahan compensation (comp[h]): the tiles' sum loses no
// more than a few float64 ulps however many tiles there are, so with float64 inputs too the
// error is that of one tile, whatever T.
template <typename tile_t>
inline void kahan_flush(double* __restrict total, double* __restrict comp, const tile_t* __restrict tile, int64_t n) {
  for (int64_t h = 0; h < n; ++h) {
    const double y = static_cast<double>(tile[h]) - comp[h];
    const double t = total[h] + y;
    comp[h] = (t - total[h]) - y;
    total[h] = t;
  }
}
CHAMELEON_CLONES void flush_f32(double* total, double* comp, const float* tile, int64_t n) { kahan_flush(total, comp, tile, n); }
CHAMELEON_CLONES void flush_f64(double* total, double* comp, const double* tile, int64_t n) { kahan_flush(total, comp, tile, n); }

inline void add8(float* a, const float* const* r, int64_t n) { add8_f32(a, r, n); }
inline void add1(float* a, const float* r0, int64_t n) { add1_f32(a, r0, n); }
inline void add8(double* a, const double* const* r, int64_t n) { add8_f64(a, r, n); }
inline void add1(double* a, const double* r0, int64_t n) { add1_f64(a, r0, n); }
inline void add8(float* a, const at::BFloat16* const* r, int64_t n) {
  add8_bf16(a, reinterpret_cast<const uint16_t* const*>(r), n);
}
inline void add1(float* a, const at::BFloat16* r0, int64_t n) { add1_bf16(a, reinterpret_cast<const uint16_t*>(r0), n); }
inline void add8(float* a, const at::Half* const* r, int64_t n) {
  add8_f16(a, reinterpret_cast<const uint16_t* const*>(r), n);
}
inline void add1(float* a, const at::Half* r0, int64_t n) { add1_f16(a, reinterpret_cast<const uint16_t*>(r0), n); }
inline void flush(double* total, double* comp, const float* tile, int64_t n) { flush_f32(total, comp, tile, n); }
inline void flush(double* total, double* comp, const double* tile, int64_t n) { flush_f64(total, comp, tile, n); }

// How H is split into tasks: `chunks` tasks of `chunk` columns per row, every task
// starting inside the row (h0 < H). Rounding `chunk` up can leave fewer chunks than asked
// for (H = 131073 asked as 128 chunks is 1025 columns each, so 128 chunks of which the last
// would start past H): the count is recomputed from the chunk width.
struct HSplit {
  int64_t chunks, chunk;
};

HSplit split_h(int64_t B, int64_t H, int64_t threads) {
  int64_t chunks = 1;
  while (B * chunks < 4 * threads && H / (chunks * 2) >= 256) chunks *= 2;
  const int64_t chunk = (H + chunks - 1) / chunks;
  if (chunk == 0) return {1, 0};  // H == 0: one empty task per row (it writes the count)
  return {(H + chunk - 1) / chunk, chunk};
}

// Masked mean of every row into means [B, H] (acc_t) and valid-token counts [B].
// hidden must have unit stride along H; rows and tokens may be strided.
template <typename scalar_t, typename acc_t>
void row_means(const at::Tensor& hidden, const at::Tensor& mask, acc_t* means, int64_t* counts) {
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  const int64_t sB = hidden.stride(0), sT = hidden.stride(1);
  const scalar_t* base = hidden.const_data_ptr<scalar_t>();
  const bool* mk = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;

  // Split H when there are too few rows to keep every thread busy.
  const HSplit split = split_h(B, H, at::get_num_threads());
  const int64_t chunks = split.chunks, chunk = split.chunk;

  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> valid(static_cast<size_t>(std::min(T, kTileT)));
    std::vector<acc_t> acc(static_cast<size_t>(chunk));
    const size_t wide = static_cast<size_t>(T > kTileT ? chunk : 0);  // rows of several tiles
    std::vector<double> total(wide), comp(wide);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, h0 = (task % chunks) * chunk;
      const int64_t n = std::min(chunk, H - h0);  // >= 0 by split_h
      const scalar_t* row = base + b * sB + h0;
      // A row of one tile (T <= kTileT, the common case) needs no float64 total.
      const bool one_tile = T <= kTileT;
      if (!one_tile) {
        std::fill(total.begin(), total.begin() + n, 0.0);
        std::fill(comp.begin(), comp.begin() + n, 0.0);
      }
      int64_t nv = 0;
      for (int64_t t0 = 0; t0 < T; t0 += kTileT) {
        const int64_t t1 = std::min(T, t0 + kTileT);
        int64_t nt = 0;
        for (int64_t t = t0; t < t1; ++t)
          if (mk == nullptr || mk[b * T + t]) valid[nt++] = t;
        if (nt == 0) continue;
        nv += nt;
        std::fill(acc.begin(), acc.begin() + n, acc_t(0));
        int64_t i = 0;
        const scalar_t* rows[8];
        for (; i + 8 <= nt; i += 8) {
          for (int r = 0; r < 8; ++r) rows[r] = row + valid[i + r] * sT;
          add8(acc.data(), rows, n);
        }
        for (; i < nt; ++i) add1(acc.data(), row + valid[i] * sT, n);
        if (!one_tile) flush(total.data(), comp.data(), acc.data(), n);
      }
      acc_t* out = means + b * H + h0;
      const double inv = nv > 0 ? 1.0 / static_cast<double>(nv) : 0.0;
      if (nv == 0) std::fill(out, out + n, acc_t(0));
      else if (one_tile)
        for (int64_t h = 0; h < n; ++h) out[h] = static_cast<acc_t>(static_cast<double>(acc[h]) * inv);
      else
        for (int64_t h = 0; h < n; ++h) out[h] = static_cast<acc_t>(total[h] * inv);
      if (h0 == 0) counts[b] = nv;
    }
  });
}

at::Tensor hidden_with_unit_h_stride(const at::Tensor& hidden) {
  return hidden.stride(2) == 1 || hidden.size(2) == 1 ? hidden : hidden.contiguous();
}

template <typename F>
void dispatch_pool(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kHalf: f(at::Half{}, float{}); break;
    case at::kBFloat16: f(at::BFloat16{}, float{}); break;
    default: TORCH_CHECK(false, "unreachable dtype ", t);
  }
}

at::Tensor masked_mean_pool_cpu(const at::Tensor& hidden_in, const c10::optional<at::Tensor>& mask_in) {
  const char* op = "masked_mean_pool";
  check_hidden(hidden_in, op);
  const at::Tensor mask = normalized_mask(hidden_in, mask_in, op);
  const at::Tensor hidden = hidden_with_unit_h_stride(hidden_in);
  const int64_t B = hidden.size(0), H = hidden.size(2);
  const auto out_t = pooled_dtype(hidden.scalar_type());
  at::Tensor out = at::empty({B, H}, hidden.options().dtype(out_t));
  std::vector<int64_t> counts(B);
  dispatch_pool(hidden.scalar_type(), [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    row_means<scalar_t, acc_t>(hidden, mask, out.data_ptr<acc_t>(), counts.data());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> domain_mean_pool_cpu(const at::Tensor& hidden_in,
                                                        const c10::optional<at::Tensor>& mask_in,
                                                        const at::Tensor& domain_ids_in,
                                                        int64_t num_domains) {
  const char* op = "domain_mean_pool";
  check_hidden(hidden_in, op);
  const at::Tensor mask = normalized_mask(hidden_in, mask_in, op);
  const at::Tensor ids = normalized_domain_ids(hidden_in, domain_ids_in, num_domains, op);
  const int64_t B = hidden_in.size(0), H = hidden_in.size(2);
  const int64_t* id = ids.const_data_ptr<int64_t>();
  // Validate every id before anything is written.
  for (int64_t b = 0; b < B; ++b)
    if (id[b] < 0 || id[b] >= num_domains) raise_bad_domain_id(b, id[b], num_domains, op);

  const at::Tensor hidden = hidden_with_unit_h_stride(hidden_in);
  const auto out_t = pooled_dtype(hidden.scalar_type());
  at::Tensor sums = at::empty({num_domains, H}, hidden.options().dtype(out_t));
  at::Tensor counts = at::zeros({num_domains}, hidden.options().dtype(at::kLong));
  at::Tensor means = at::empty({B, H}, hidden.options().dtype(out_t));
  std::vector<int64_t> row_counts(B);
  // Row means are added in batch order into float64 sums: the result is deterministic
  // whatever the thread count, and its error does not grow with B in float32.
  std::vector<double> total(static_cast<size_t>(num_domains * H), 0.0);
  dispatch_pool(hidden.scalar_type(), [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    const acc_t* m = means.data_ptr<acc_t>();
    row_means<scalar_t, acc_t>(hidden, mask, means.data_ptr<acc_t>(), row_counts.data());
    int64_t* C = counts.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      if (row_counts[b] == 0) continue;
      double* dst = total.data() + id[b] * H;
      const acc_t* src = m + b * H;
      for (int64_t h = 0; h < H; ++h) dst[h] += static_cast<double>(src[h]);
      C[id[b]] += 1;
    }
    acc_t* S = sums.data_ptr<acc_t>();
    for (int64_t i = 0; i < num_domains * H; ++i) S[i] = static_cast<acc_t>(total[i]);
  });
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(chameleon, CPU, m) {
  m.impl("masked_mean_pool", &masked_mean_pool_cpu);
  m.impl("domain_mean_pool", &domain_mean_pool_cpu);
}

}  // namespace chameleon
