// Op schemas for the `chameleon` namespace. Backends register their kernels in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; the Python face (fake tensors, autograd) is
// chameleon_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(chameleon, m) {
  // hidden [B, T, H], mask [B, T] (bool/int, None = all valid) -> [B, H]
  m.def("masked_mean_pool(Tensor hidden, Tensor? mask) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // hidden [B, T, H], mask [B, T], domain_ids [B] -> (sums [D, H], counts [D] int64)
  m.def(
      "domain_mean_pool(Tensor hidden, Tensor? mask, Tensor domain_ids, int num_domains) "
      "-> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // K [..., k, k] -> leverage scores [..., k]. Two overloads, as aten does for Scalar/Tensor
  // arguments: the default takes lam as a number (torch.ops.chameleon.krls(K, 10.0)); .lam_tensor
  // takes lam as a tensor broadcastable to K's batch shape [...] (one lambda per matrix; a 0-d
  // CPU tensor is read on the host).
  m.def("krls(Tensor K, float lam, bool center=True, bool scale_by_k=True) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("krls.lam_tensor(Tensor K, Tensor lam, bool center=True, bool scale_by_k=True) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // As krls, but never synchronises: -> (scores [..., k], info [...] int32), info 0 = ok, else
  // a status code (KrlsStatus in csrc/krls.h); failed matrices get NaN scores.
  m.def("krls_ex(Tensor K, float lam, bool center=True, bool scale_by_k=True) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("krls_ex.lam_tensor(Tensor K, Tensor lam, bool center=True, bool scale_by_k=True) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}
