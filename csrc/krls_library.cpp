// krls through ATen's blocked Cholesky (LAPACK on CPU, cuSOLVER/MAGMA on CUDA).
//
// Used for large k, where a blocked library factorisation beats the fused per-matrix
// kernels. Same maths, same checks, same status codes as the fused kernels (see krls.h):
//   A = Kc + mu I = L L^T, W = L^-1 by one batched triangular solve,
//   S_i = d_i W_ii^2 - mu sum_{p>i} W_pi^2,  d_i = Kc_ii - sum_{p<i} L_ip^2.
// Everything stays on K's device as batched tensor ops: nothing here synchronises.
#include <ATen/ATen.h>

#include "krls.h"

namespace chameleon {

std::tuple<at::Tensor, at::Tensor> krls_mu(const at::Tensor& K, const KrlsLam& lam, bool scale_by_k) {
  const int64_t k = K.size(-1);
  const int64_t batch = K.numel() / (k * k);
  const double factor = scale_by_k ? static_cast<double>(k) : 1.0;
  const auto opts = K.options().dtype(at::kDouble);
  at::Tensor mu = lam.per_matrix.defined() ? lam.per_matrix * factor : at::full({batch}, lam.scalar * factor, opts);
  // lam > 0 and lam * k finite; NaN fails the comparison.
  at::Tensor ok = mu.gt(0.0).logical_and(mu.le(DBL_MAX));
  return {mu, ok};
}

KrlsResult krls_factor_scores(const at::Tensor& Kc, const at::Tensor& mu, const at::Tensor& maxabs,
                              const at::Tensor& status, at::ScalarType out_dtype) {
  const int64_t batch = Kc.size(0), k = Kc.size(1);
  // Kc becomes A = Kc + mu I in place; only its diagonal is needed afterwards.
  const at::Tensor kc_diag = Kc.diagonal(0, 1, 2).clone();  // [batch, k]
  at::Tensor A = Kc;
  A.diagonal(0, 1, 2).add_(mu.unsqueeze(1));
  auto [L, info] = at::linalg_cholesky_ex(A, /*upper=*/false, /*check_errors=*/false);
  at::Tensor eye = at::eye(k, Kc.options()).expand({batch, k, k});
  at::Tensor W = at::linalg_solve_triangular(L, eye, /*upper=*/false);
  // d_i = Kc_ii - sum_{p<i} L_ip^2 (strictly below the diagonal: L_ii^2 = d_i + mu would cancel).
  L.square_();
  L.diagonal(0, 1, 2).zero_();
  const at::Tensor d = kc_diag - L.sum(2);  // [batch, k]
  const at::Tensor w_diag = W.diagonal(0, 1, 2).clone();
  W.square_();
  W.diagonal(0, 1, 2).zero_();
  const at::Tensor below = W.sum(1);  // [batch, k]: sum_{p>i} W_pi^2 (W is lower triangular)
  at::Tensor S = (d * w_diag.square() - mu.unsqueeze(1) * below).clamp(0.0, 1.0);

  // A failed pivot (only meaningful for a matrix that passed the checks) blames lam when mu
  // is below K's rounding level, else K.
  const at::Tensor pivot_failed = info.gt(0).logical_and(status.eq(kKrlsOk));
  const at::Tensor lam_small = mu.le(maxabs * (1024.0 * static_cast<double>(k) * DBL_EPSILON));
  at::Tensor pivot_status = at::where(lam_small, at::full({}, static_cast<int64_t>(kKrlsLamTooSmall), status.options()),
                                      at::full({}, static_cast<int64_t>(kKrlsNotPositiveDefinite), status.options()));
  at::Tensor out_status = at::where(pivot_failed, pivot_status, status).to(at::kInt);
  at::Tensor detail = at::where(pivot_failed, info - 1, at::zeros_like(info)).to(at::kInt);
  S = at::where(out_status.eq(kKrlsOk).unsqueeze(1), S, at::full({}, NAN, S.options()));
  return {S.to(out_dtype), out_status, detail};
}

KrlsResult krls_library(const at::Tensor& K, const KrlsLam& lam, bool center, bool scale_by_k) {
  const int64_t k = K.size(-1);
  const int64_t batch = K.numel() / (k * k);
  at::Tensor A = K.reshape({batch, k, k}).to(at::kDouble);
  auto [mu, lam_ok] = krls_mu(K, lam, scale_by_k);

  // Checks, batched on the tensor's own device.
  at::Tensor finite = at::isfinite(A).flatten(1).all(1);
  at::Tensor A_safe = at::where(finite.view({batch, 1, 1}), A, at::zeros_like(A));
  at::Tensor asym = (A_safe - A_safe.transpose(1, 2)).abs().amax({1, 2});
  at::Tensor maxabs = A_safe.abs().amax({1, 2});
  at::Tensor symmetric = asym.le(maxabs * krls_symmetry_tol(K.scalar_type()));
  // Precedence as in the fused kernels: lam, then non-finite, then symmetry.
  at::Tensor status = at::zeros({batch}, K.options().dtype(at::kInt));
  status.masked_fill_(symmetric.logical_not(), static_cast<int64_t>(kKrlsNotSymmetric));
  status.masked_fill_(finite.logical_not(), static_cast<int64_t>(kKrlsNonFinite));
  status.masked_fill_(lam_ok.logical_not(), static_cast<int64_t>(kKrlsBadLam));
  const at::Tensor ok = status.eq(kKrlsOk);

  // Rejected matrices are factorised as mu = 1, Kc = 0 (their scores are replaced by NaN).
  A = at::where(ok.view({batch, 1, 1}), 0.5 * (A_safe + A_safe.transpose(1, 2)), at::zeros_like(A));
  mu = at::where(ok, mu, at::ones_like(mu));
  if (center) {
    at::Tensor rowmean = A.mean(2, /*keepdim=*/true);      // [batch, k, 1]
    at::Tensor grand = rowmean.mean(1, /*keepdim=*/true);  // [batch, 1, 1]
    A = A - rowmean - rowmean.transpose(1, 2) + grand;
  }
  return krls_factor_scores(A, mu, maxabs, status, K.scalar_type());
}

}  // namespace chameleon
