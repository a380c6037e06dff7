// Compiled only into CPU-only builds (setup.py and CMakeLists.txt add it when the CUDA kernels
// are not built): CUDA tensors reaching a chameleon op get a clear error instead of the
// dispatcher's generic "no kernel for CUDA".
#include <torch/library.h>

#include <ATen/ATen.h>

namespace chameleon {
namespace {

[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, "chameleon::", op,
              ": got CUDA tensors, but chameleon_ext was built without CUDA kernels (CPU-only "
              "build). Rebuild with a CUDA build of torch and nvcc available, or set "
              "CHAMELEON_FORCE_CUDA=1 to make the build fail loudly when it cannot compile them.");
  __builtin_unreachable();
}

at::Tensor masked_mean_pool_nocuda(const at::Tensor&, const c10::optional<at::Tensor>&) {
  no_cuda("masked_mean_pool");
}
std::tuple<at::Tensor, at::Tensor> domain_mean_pool_nocuda(const at::Tensor&,
                                                           const c10::optional<at::Tensor>&,
                                                           const at::Tensor&, int64_t) {
  no_cuda("domain_mean_pool");
}
at::Tensor krls_nocuda(const at::Tensor&, double, bool, bool) { no_cuda("krls"); }
at::Tensor krls_lam_tensor_nocuda(const at::Tensor&, const at::Tensor&, bool, bool) { no_cuda("krls"); }
std::tuple<at::Tensor, at::Tensor> krls_ex_nocuda(const at::Tensor&, double, bool, bool) { no_cuda("krls_ex"); }
std::tuple<at::Tensor, at::Tensor> krls_ex_lam_tensor_nocuda(const at::Tensor&, const at::Tensor&, bool, bool) {
  no_cuda("krls_ex");
}

}  // namespace

TORCH_LIBRARY_IMPL(chameleon, CUDA, m) {
  m.impl("masked_mean_pool", &masked_mean_pool_nocuda);
  m.impl("domain_mean_pool", &domain_mean_pool_nocuda);
  m.impl("krls", &krls_nocuda);
  m.impl("krls.lam_tensor", &krls_lam_tensor_nocuda);
  m.impl("krls_ex", &krls_ex_nocuda);
  m.impl("krls_ex.lam_tensor", &krls_ex_lam_tensor_nocuda);
}

}  // namespace chameleon
