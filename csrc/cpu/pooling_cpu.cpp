// CPU kernels for masked_mean_pool and domain_mean_pool.
//
// Pooling is memory-bound: the goal is to read each valid hidden row exactly once and
// never touch masked ones. Work is split over (row, H-chunk) tasks; each task gathers
// the valid token indices of its row, then adds them into an L1-resident accumulator
// four rows at a time. Half inputs accumulate in float32, float64 in float64.
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

// acc[h] += r0[h] + r1[h] + r2[h] + r3[h]; fewer passes over acc than one row at a time.
CHAMELEON_CLONES void add4_f32(float* __restrict acc, const float* r0, const float* r1,
                               const float* r2, const float* r3, int64_t n) {
  for (int64_t h = 0; h < n; ++h) acc[h] += (r0[h] + r1[h]) + (r2[h] + r3[h]);
}
CHAMELEON_CLONES void add1_f32(float* __restrict acc, const float* r0, int64_t n) {
  for (int64_t h = 0; h < n; ++h) acc[h] += r0[h];
}
CHAMELEON_CLONES void add4_f64(double* __restrict acc, const double* r0, const double* r1,
                               const double* r2, const double* r3, int64_t n) {
  for (int64_t h = 0; h < n; ++h) acc[h] += (r0[h] + r1[h]) + (r2[h] + r3[h]);
}
CHAMELEON_CLONES void add1_f64(double* __restrict acc, const double* r0, int64_t n) {
  for (int64_t h = 0; h < n; ++h) acc[h] += r0[h];
}
CHAMELEON_CLONES void add4_bf16(float* __restrict acc, const uint16_t* r0, const uint16_t* r1,
                                const uint16_t* r2, const uint16_t* r3, int64_t n) {
  for (int64_t h = 0; h < n; ++h)
    acc[h] += (bf16_to_float(r0[h]) + bf16_to_float(r1[h])) +
              (bf16_to_float(r2[h]) + bf16_to_float(r3[h]));
}
CHAMELEON_CLONES void add1_bf16(float* __restrict acc, const uint16_t* r0, int64_t n) {
  for (int64_t h = 0; h < n; ++h) acc[h] += bf16_to_float(r0[h]);
}
void add4_f16(float* __restrict acc, const at::Half* r0, const at::Half* r1, const at::Half* r2,
              const at::Half* r3, int64_t n) {
  for (int64_t h = 0; h < n; ++h)
    acc[h] += (static_cast<float>(r0[h]) + static_cast<float>(r1[h])) +
              (static_cast<float>(r2[h]) + static_cast<float>(r3[h]));
}
void add1_f16(float* __restrict acc, const at::Half* r0, int64_t n) {
  for (int64_t h = 0; h < n; ++h) acc[h] += static_cast<float>(r0[h]);
}

inline void add4(float* a, const float* r0, const float* r1, const float* r2, const float* r3,
                 int64_t n) { add4_f32(a, r0, r1, r2, r3, n); }
inline void add1(float* a, const float* r0, int64_t n) { add1_f32(a, r0, n); }
inline void add4(double* a, const double* r0, const double* r1, const double* r2,
                 const double* r3, int64_t n) { add4_f64(a, r0, r1, r2, r3, n); }
inline void add1(double* a, const double* r0, int64_t n) { add1_f64(a, r0, n); }
inline void add4(float* a, const at::BFloat16* r0, const at::BFloat16* r1, const at::BFloat16* r2,
                 const at::BFloat16* r3, int64_t n) {
  add4_bf16(a, reinterpret_cast<const uint16_t*>(r0), reinterpret_cast<const uint16_t*>(r1),
            reinterpret_cast<const uint16_t*>(r2), reinterpret_cast<const uint16_t*>(r3), n);
}
inline void add1(float* a, const at::BFloat16* r0, int64_t n) {
  add1_bf16(a, reinterpret_cast<const uint16_t*>(r0), n);
}
inline void add4(float* a, const at::Half* r0, const at::Half* r1, const at::Half* r2,
                 const at::Half* r3, int64_t n) { add4_f16(a, r0, r1, r2, r3, n); }
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
      for (; i + 4 <= nv; i += 4)
        add4(acc, row + valid[i] * sT, row + valid[i + 1] * sT, row + valid[i + 2] * sT,
             row + valid[i + 3] * sT, n);
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
