// krls through ATen's blocked Cholesky (LAPACK on CPU, cuSOLVER/MAGMA on CUDA).
//
// Used for large k, where a blocked library factorisation beats the fused per-matrix
// kernels. Same maths, same checks, same errors as the fused kernels:
//   A = H K H + mu I = L L^T,  S_i = 1 - mu * (A^-1)_ii  with A^-1 from cholesky_inverse.
#include <ATen/ATen.h>

#include "checks.h"

namespace chameleon {

at::Tensor krls_library(const at::Tensor& K, double lam, bool center, bool scale_by_k) {
  const int64_t k = K.size(-1);
  const int64_t batch = K.numel() / (k * k);
  const double mu = scale_by_k ? lam * static_cast<double>(k) : lam;
  at::Tensor A = K.reshape({batch, k, k}).to(at::kDouble);

  // Checks, computed batched on the tensor's own device, then one small copy to host.
  at::Tensor finite = at::isfinite(A).flatten(1).all(1);
  at::Tensor A_safe = at::where(finite.view({batch, 1, 1}), A, at::zeros_like(A));
  at::Tensor asym = (A_safe - A_safe.transpose(1, 2)).abs().amax({1, 2});
  at::Tensor scale = A_safe.abs().amax({1, 2});
  at::Tensor symmetric = asym.le(scale * krls_symmetry_tol(K.scalar_type()));

  A = 0.5 * (A_safe + A_safe.transpose(1, 2));
  if (center) {
    at::Tensor rowmean = A.mean(2, /*keepdim=*/true);            // [batch, k, 1]
    at::Tensor grand = rowmean.mean(1, /*keepdim=*/true);        // [batch, 1, 1]
    A = A - rowmean - rowmean.transpose(1, 2) + grand;
  }
  A.diagonal(0, 1, 2).add_(mu);
  // Only well-formed matrices are factorised; the others get I so the call cannot fail.
  at::Tensor ok = finite.logical_and(symmetric);
  A = at::where(ok.view({batch, 1, 1}), A, at::eye(k, A.options()).expand({batch, k, k}));
  auto [L, info] = at::linalg_cholesky_ex(A, /*upper=*/false, /*check_errors=*/false);

  // Later fills win: a non-finite matrix reports that, not its symmetry or pivot.
  at::Tensor status = at::zeros({batch}, info.options().dtype(at::kInt));
  status.masked_fill_(info.gt(0), static_cast<int64_t>(kKrlsNotPositiveDefinite));
  status.masked_fill_(symmetric.logical_not(), static_cast<int64_t>(kKrlsNotSymmetric));
  status.masked_fill_(finite.logical_not(), static_cast<int64_t>(kKrlsNonFinite));
  status = status.cpu();
  at::Tensor detail = (info - 1).clamp_min(0).to(at::kInt).cpu();
  raise_krls_failures(status, detail, K.sizes(), "krls");

  at::Tensor diag_inv = at::cholesky_inverse(L).diagonal(0, 1, 2);  // [batch, k]
  at::Tensor S = (1.0 - mu * diag_inv).clamp(0.0, 1.0).to(K.scalar_type());
  std::vector<int64_t> shape(K.sizes().begin(), K.sizes().end() - 1);
  return S.reshape(shape);
}

}  // namespace chameleon
