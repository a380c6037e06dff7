#!/usr/bin/env bash
# Builds the op library with CMake against the venv's libtorch and checks it from Python
# (without importing chameleon_ext, whose own copy of the ops would clash).
set -euo pipefail
PY=${1:-.venv/bin/python}
BUILD=cmake-build
# No GPU to detect on a build machine: the same default as setup.py.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
prefix=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-S . -B "$BUILD" -DCMAKE_PREFIX_PATH="$prefix")
cuda_home=$($PY -c 'import setup; print(setup.find_cuda_home() or "")')
has_cuda=$($PY -c 'import torch; print(int(torch.version.cuda is not None))')
if [[ "$has_cuda" == 1 && -n "$cuda_home" ]]; then
  includes=$($PY -c 'import setup; print(";".join(setup.nvidia_wheel_includes()))')
  # libtorch's CMake config wants libnvrtc, which pip installs inside the nvidia-* wheels.
  nvrtc=$($PY -c 'import setup; print(setup.nvidia_wheel_library("libnvrtc"))')
  [[ -n "$nvrtc" ]] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
  arch=${TORCH_CUDA_ARCH_LIST:-9.0}
  arch=${arch//./}; arch=${arch//+PTX/}
  args+=(-DCHAMELEON_WITH_CUDA=ON -DCUDA_TOOLKIT_ROOT_DIR="$cuda_home" -DCUDAToolkit_ROOT="$cuda_home" -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc"
         -DCMAKE_CUDA_ARCHITECTURES="$arch" -DCHAMELEON_EXTRA_INCLUDE_DIRS="$includes")
else
  args+=(-DCHAMELEON_WITH_CUDA=OFF)
fi
# The venv's CMake (requirements-dev.txt): Debian's 3.25 knows no C++20 flags for nvcc.
CMAKE=$(dirname "$PY")/cmake
[[ -x "$CMAKE" ]] || CMAKE=cmake
"$CMAKE" "${args[@]}"
"$CMAKE" --build "$BUILD" -j "${MAX_JOBS:-2}"
$PY .ci/cmake_smoke.py "$BUILD/libchameleon_ops.so"
