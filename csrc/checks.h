// Argument validation shared by the CPU and CUDA kernels.
//
// Every op validates its inputs here, before any kernel runs, so both backends
// raise the same errors with the same wording: the argument, what was expected,
// what was given.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

namespace chameleon {

// Half inputs are pooled (and returned) in float32; float32/float64 keep their dtype.
inline at::ScalarType pooled_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    out += std::to_string(s[i]);
    if (i + 1 < s.size()) out += ", ";
  }
  return out + "]";
}

inline void check_hidden(const at::Tensor& hidden, const char* op) {
  TORCH_CHECK_VALUE(hidden.dim() == 3, op, ": hidden must be [B, T, H], got a ",
                    hidden.dim(), "-d tensor of shape ", shape_str(hidden.sizes()));
  const auto t = hidden.scalar_type();
  TORCH_CHECK_VALUE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                    op, ": hidden must be float32, float64, float16 or bfloat16, got ", t);
}

// Returns the mask as a contiguous bool [B, T] tensor on hidden's device, or an
// undefined tensor for "every token is valid". Integer masks count non-zero as valid.
inline at::Tensor normalized_mask(const at::Tensor& hidden, const c10::optional<at::Tensor>& mask,
                                  const char* op) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  const at::Tensor& m = *mask;
  const int64_t B = hidden.size(0), T = hidden.size(1);
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == T, op,
                    ": mask must be [B, T] = ", shape_str({B, T}), ", got ", shape_str(m.sizes()));
  TORCH_CHECK_VALUE(m.scalar_type() == at::kBool || at::isIntegralType(m.scalar_type(), false),
                    op, ": mask must be bool or an integer dtype (non-zero = valid token), got ",
                    m.scalar_type());
  TORCH_CHECK_VALUE(m.device() == hidden.device(), op, ": mask must be on hidden's device ",
                    hidden.device(), ", got ", m.device());
  at::Tensor b = m.scalar_type() == at::kBool ? m : m.ne(0);
  return b.contiguous();
}

inline at::Tensor normalized_domain_ids(const at::Tensor& hidden, const at::Tensor& ids,
                                        int64_t num_domains, const char* op) {
  const int64_t B = hidden.size(0);
  TORCH_CHECK_VALUE(num_domains >= 1, op, ": num_domains must be >= 1, got ", num_domains);
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == B, op, ": domain_ids must be [B] = [", B,
                    "], got ", shape_str(ids.sizes()));
  TORCH_CHECK_VALUE(at::isIntegralType(ids.scalar_type(), false), op,
                    ": domain_ids must be an integer dtype, got ", ids.scalar_type());
  // ids on the CPU are accepted for any hidden: a CUDA kernel then checks them on the host.
  TORCH_CHECK_VALUE(ids.device() == hidden.device() || ids.device().is_cpu(), op,
                    ": domain_ids must be on the CPU or on hidden's device ", hidden.device(),
                    ", got ", ids.device());
  return ids.to(at::kLong).contiguous();
}

[[noreturn]] inline void raise_bad_domain_id(int64_t row, int64_t id, int64_t num_domains,
                                             const char* op) {
  TORCH_CHECK_VALUE(false, op, ": domain_ids[", row, "] = ", id, " is outside [0, num_domains) = [0, ",
                    num_domains, ")");
  __builtin_unreachable();
}

// ---------------------------------------------------------------- krls

// K's checks, the same for both overloads (lam a number, lam a tensor).
inline void check_krls_K(const at::Tensor& K, const char* op) {
  TORCH_CHECK_VALUE(K.dim() >= 2, op, ": K must be [..., k, k], got shape ", shape_str(K.sizes()));
  const int64_t k = K.size(-1);
  TORCH_CHECK_VALUE(K.size(-2) == k, op, ": K must be square [..., k, k], got shape ",
                    shape_str(K.sizes()));
  TORCH_CHECK_VALUE(k >= 1, op, ": K must have k >= 1, got shape ", shape_str(K.sizes()));
  TORCH_CHECK_VALUE(K.scalar_type() == at::kFloat || K.scalar_type() == at::kDouble, op,
                    ": K must be float32 or float64, got ", K.scalar_type());
}

inline void check_krls_args(const at::Tensor& K, const at::Tensor& lam, const char* op) {
  check_krls_K(K, op);
  TORCH_CHECK_VALUE(at::isFloatingType(lam.scalar_type()) ||
                        at::isIntegralType(lam.scalar_type(), /*includeBool=*/false),
                    op, ": lam must be a real number or a real tensor, got dtype ", lam.scalar_type());
  TORCH_CHECK_VALUE(lam.device() == K.device() || lam.device().is_cpu(), op,
                    ": lam must be on K's device ", K.device(), " (or on the CPU), got ", lam.device());
  const at::IntArrayRef batch_shape = K.sizes().slice(0, K.dim() - 2);
  bool broadcasts = lam.dim() <= static_cast<int64_t>(batch_shape.size());
  for (int64_t d = 1; broadcasts && d <= lam.dim(); ++d) {
    const int64_t have = lam.size(lam.dim() - d), want = batch_shape[batch_shape.size() - d];
    broadcasts = have == 1 || have == want;
  }
  TORCH_CHECK_VALUE(broadcasts, op, ": lam must be a number or a tensor broadcastable to K's batch shape ",
                    shape_str(batch_shape), ", got shape ", shape_str(lam.sizes()));
}

// Relative tolerance for "K is symmetric": asymmetry above this times max|K| is an error.
// float32 kernels built by a matmul X @ X.T are symmetric only to rounding.
inline double krls_symmetry_tol(at::ScalarType t) { return t == at::kFloat ? 1e-4 : 1e-8; }

inline std::string batch_index_str(int64_t flat, at::IntArrayRef batch_shape) {
  if (batch_shape.empty()) return "";
  std::vector<int64_t> idx(batch_shape.size());
  for (int64_t d = (int64_t)batch_shape.size() - 1; d >= 0; --d) {
    idx[d] = flat % batch_shape[d];
    flat /= batch_shape[d];
  }
  std::string out = "[";
  for (size_t i = 0; i < idx.size(); ++i) {
    out += std::to_string(idx[i]);
    if (i + 1 < idx.size()) out += ", ";
  }
  return out + "]";
}

}  // namespace chameleon
