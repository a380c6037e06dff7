// The Python extension module chameleon_ext._C. Importing it registers the ops (the
// TORCH_LIBRARY blocks in the other translation units); it also reports how it was built.
#include <torch/extension.h>

#ifndef CHAMELEON_VERSION
#define CHAMELEON_VERSION "unknown"
#endif
#ifndef CHAMELEON_TORCH_VERSION
#define CHAMELEON_TORCH_VERSION "unknown"
#endif
#ifndef CHAMELEON_CUDA_ARCH_LIST
#define CHAMELEON_CUDA_ARCH_LIST ""
#endif
#ifndef CHAMELEON_CUDA_VERSION
#define CHAMELEON_CUDA_VERSION ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "chameleon_ext compiled ops (registered under torch.ops.chameleon)";
  m.def("build_info", []() {
    pybind11::dict info;
    info["version"] = CHAMELEON_VERSION;
    info["torch_version"] = CHAMELEON_TORCH_VERSION;
#ifdef CHAMELEON_WITH_CUDA
    info["cuda"] = true;
    info["cuda_version"] = CHAMELEON_CUDA_VERSION;
    info["cuda_arch_list"] = CHAMELEON_CUDA_ARCH_LIST;
#else
    info["cuda"] = false;
    info["cuda_version"] = pybind11::none();
    info["cuda_arch_list"] = pybind11::none();
#endif
    return info;
  });
}
