// krls through ATen's blocked Cholesky (LAPACK on CPU, cuSOLVER/MAGMA on CUDA).
//
// Used for large k, where a blocked library factorisation beats the fused per-matrix
// kernels. Same maths, same checks, same errors as the fused kernels:
//   A = H K H + mu I = L L^T,  S_i = 1 - mu * ||L^-1 e_i||^2  with L^-1 from a batched
// triangular solve. Malformed matrices are reported before anything is factorised.
#include <ATen/ATen.h>

#include "checks.h"

namespace chameleon {

at::Tensor krls_factor_scores(const at::Tensor& A, double mu, at::IntArrayRef K_shape, at::ScalarType out_dtype) {
  const int64_t batch = A.size(0), k = A.size(1);
  auto [L, info] = at::linalg_cholesky_ex(A, /*upper=*/false, /*check_errors=*/false);
  const at::Tensor failed = info.gt(0);
  if (failed.any().item<bool>()) {
    at::Tensor status = (failed.to(at::kInt) * static_cast<int>(kKrlsNotPositiveDefinite)).cpu();
    at::Tensor detail = (info - 1).clamp_min(0).to(at::kInt).cpu();
    raise_krls_failures(status, detail, K_shape, "krls");
  }
  // Columns of L^-1 by one batched triangular solve: S_i = 1 - mu ||L^-1 e_i||^2.
  at::Tensor eye = at::eye(k, A.options()).expand({batch, k, k});
  at::Tensor W = at::linalg_solve_triangular(L, eye, /*upper=*/false);
  at::Tensor S = (1.0 - mu * W.square().sum(1)).clamp(0.0, 1.0).to(out_dtype);
  std::vector<int64_t> shape(K_shape.begin(), K_shape.end() - 1);
  return S.reshape(shape);
}

at::Tensor krls_library(const at::Tensor& K, double lam, bool center, bool scale_by_k) {
  const int64_t k = K.size(-1);
  const int64_t batch = K.numel() / (k * k);
  const double mu = scale_by_k ? lam * static_cast<double>(k) : lam;
  at::Tensor A = K.reshape({batch, k, k}).to(at::kDouble);

  // Checks, batched on the tensor's own device, then one small copy to the host.
  at::Tensor finite = at::isfinite(A).flatten(1).all(1);
  at::Tensor A_safe = at::where(finite.view({batch, 1, 1}), A, at::zeros_like(A));
  at::Tensor asym = (A_safe - A_safe.transpose(1, 2)).abs().amax({1, 2});
  at::Tensor scale = A_safe.abs().amax({1, 2});
  at::Tensor symmetric = asym.le(scale * krls_symmetry_tol(K.scalar_type()));
  // A non-finite matrix reports that, not its symmetry.
  at::Tensor status = at::zeros({batch}, finite.options().dtype(at::kInt));
  status.masked_fill_(symmetric.logical_not(), static_cast<int64_t>(kKrlsNotSymmetric));
  status.masked_fill_(finite.logical_not(), static_cast<int64_t>(kKrlsNonFinite));
  status = status.cpu();
  raise_krls_failures(status, at::zeros({batch}, at::kInt), K.sizes(), "krls");

  A = 0.5 * (A + A.transpose(1, 2));
  if (center) {
    at::Tensor rowmean = A.mean(2, /*keepdim=*/true);      // [batch, k, 1]
    at::Tensor grand = rowmean.mean(1, /*keepdim=*/true);  // [batch, 1, 1]
    A = A - rowmean - rowmean.transpose(1, 2) + grand;
  }
  A.diagonal(0, 1, 2).add_(mu);
  return krls_factor_scores(A, mu, K.sizes(), K.scalar_type());
}

}  // namespace chameleon
