// CPU kernels for masked_mean_pool and domain_mean_pool.
//
// Pooling is memory-bound: the goal is to read each valid hidden row exactly once and
// never touch masked ones. Work is split over (row, H-chunk) tasks; each task gathers
// the valid token indices of its row, then adds them into an L1-resident accumulator
// eight rows at a time. Half inputs accumulate in float32, float64 in float64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "clones.h"

namespace chameleon {
namespace {

inline float bf16_to_float(uint16_t bits) {
  uint32_t w = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
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
#define CHAMELEON_HALF(x) static_cast<float>(x)

CHAMELEON_CLONES void add8_f32(float* __restrict acc, const float* const* r, int64_t n) { CHAMELEON_SUM8(CHAMELEON_AS_IS) }
CHAMELEON_CLONES void add1_f32(float* __restrict acc, const float* r0, int64_t n) { CHAMELEON_SUM1(CHAMELEON_AS_IS) }
CHAMELEON_CLONES void add8_f64(double* __restrict acc, const double* const* r, int64_t n) { CHAMELEON_SUM8(CHAMELEON_AS_IS) }
CHAMELEON_CLONES void add1_f64(double* __restrict acc, const double* r0, int64_t n) { CHAMELEON_SUM1(CHAMELEON_AS_IS) }
CHAMELEON_CLONES void add8_bf16(float* __restrict acc, const uint16_t* const* r, int64_t n) { CHAMELEON_SUM8(CHAMELEON_BF16) }
CHAMELEON_CLONES void add1_bf16(float* __restrict acc, const uint16_t* r0, int64_t n) { CHAMELEON_SUM1(CHAMELEON_BF16) }
void add8_f16(float* __restrict acc, const at::Half* const* r, int64_t n) { CHAMELEON_SUM8(CHAMELEON_HALF) }
void add1_f16(float* __restrict acc, const at::Half* r0, int64_t n) { CHAMELEON_SUM1(CHAMELEON_HALF) }

inline void add8(float* a, const float* const* r, int64_t n) { add8_f32(a, r, n); }
inline void add1(float* a, const float* r0, int64_t n) { add1_f32(a, r0, n); }
inline void add8(double* a, const double* const* r, int64_t n) { add8_f64(a, r, n); }
inline void add1(double* a, const double* r0, int64_t n) { add1_f64(a, r0, n); }
inline void add8(float* a, const at::BFloat16* const* r, int64_t n) {
  add8_bf16(a, reinterpret_cast<const uint16_t* const*>(r), n);
}
inline void add1(float* a, const at::BFloat16* r0, int64_t n) { add1_bf16(a, reinterpret_cast<const uint16_t*>(r0), n); }
inline void add8(float* a, const at::Half* const* r, int64_t n) { add8_f16(a, r, n); }
inline void add1(float* a, const at::Half* r0, int64_t n) { add1_f16(a, r0, n); }

// Masked mean of every row into means [B, H] (acc_t) and valid-token counts [B].
// hidden must have unit stride along H; rows and tokens may be strided.
template <typename scalar_t, typename acc_t>
void row_means(const at::Tensor& hidden, const at::Tensor& mask, acc_t* means, int64_t* counts) {
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  const int64_t sB = hidden.stride(0), sT = hidden.stride(1);
  const scalar_t* base = hidden.const_data_ptr<scalar_t>();
  const bool* mk = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;

  // Split H when there are too few rows to keep every thread busy.
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  while (B * chunks < 4 * threads && H / (chunks * 2) >= 256) chunks *= 2;
  const int64_t chunk = (H + chunks - 1) / chunks;

  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> valid;
    valid.reserve(T);
    int64_t valid_row = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, h0 = (task % chunks) * chunk;
      const int64_t n = std::min(chunk, H - h0);
      if (b != valid_row) {
        valid.clear();
        for (int64_t t = 0; t < T; ++t)
          if (mk == nullptr || mk[b * T + t]) valid.push_back(t);
        valid_row = b;
      }
      acc_t* acc = means + b * H + h0;
      std::fill(acc, acc + n, acc_t(0));
      const scalar_t* row = base + b * sB + h0;
      const int64_t nv = static_cast<int64_t>(valid.size());
      int64_t i = 0;
      const scalar_t* rows[8];
      for (; i + 8 <= nv; i += 8) {
        for (int r = 0; r < 8; ++r) rows[r] = row + valid[i + r] * sT;
        add8(acc, rows, n);
      }
      for (; i < nv; ++i) add1(acc, row + valid[i] * sT, n);
      if (nv > 0) {
        const acc_t inv = acc_t(1) / static_cast<acc_t>(nv);
        for (int64_t h = 0; h < n; ++h) acc[h] *= inv;
      }
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
  at::Tensor sums = at::zeros({num_domains, H}, hidden.options().dtype(out_t));
  at::Tensor counts = at::zeros({num_domains}, hidden.options().dtype(at::kLong));
  at::Tensor means = at::empty({B, H}, hidden.options().dtype(out_t));
  std::vector<int64_t> row_counts(B);
  dispatch_pool(hidden.scalar_type(), [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    acc_t* m = means.data_ptr<acc_t>();
    row_means<scalar_t, acc_t>(hidden, mask, m, row_counts.data());
    // Rows are added in order: the result is deterministic whatever the thread count.
    acc_t* S = sums.data_ptr<acc_t>();
    int64_t* C = counts.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      if (row_counts[b] == 0) continue;
      acc_t* dst = S + id[b] * H;
      const acc_t* src = m + b * H;
      for (int64_t h = 0; h < H; ++h) dst[h] += src[h];
      C[id[b]] += 1;
    }
  });
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(chameleon, CPU, m) {
  m.impl("masked_mean_pool", &masked_mean_pool_cpu);
  m.impl("domain_mean_pool", &domain_mean_pool_cpu);
}

}  // namespace chameleon
