# Finds the Torch that is installed in the build's Python (build with --no-build-isolation).
# Defines TORCH_LIBRARIES, MOEDIFFUSEQ_TORCH_PYTHON_LIBRARY and MOEDIFFUSEQ_TORCH_HAS_CUDA, and
# with a CUDA torch the architecture list MOEDIFFUSEQ_CUDA_ARCHITECTURES (cuda_archs.cmake).
moediffuseq_python_query(MOEDIFFUSEQ_TORCH_PREFIX "import torch.utils; print(torch.utils.cmake_prefix_path)")
moediffuseq_python_query(MOEDIFFUSEQ_TORCH_CUDA_VERSION "import torch; print(torch.version.cuda or '')")
list(APPEND CMAKE_PREFIX_PATH "${MOEDIFFUSEQ_TORCH_PREFIX}")

if(MOEDIFFUSEQ_TORCH_CUDA_VERSION STREQUAL "")
  set(MOEDIFFUSEQ_TORCH_HAS_CUDA OFF)
else()
  set(MOEDIFFUSEQ_TORCH_HAS_CUDA ON)
endif()

# A CPU build of torch must not make Caffe2's CMake look for CUDA. With a CUDA torch, Caffe2's
# CMake turns TORCH_CUDA_ARCH_LIST into -gencode flags in CMAKE_CUDA_FLAGS (with no GPU visible
# and no list: compute_50 ... 12.0a, which nvcc 13 refuses): it gets our one list (no GPU probe)
# and its flags are removed afterwards; the targets' CUDA_ARCHITECTURES alone choose the code.
include(cuda_archs)
if(NOT MOEDIFFUSEQ_TORCH_HAS_CUDA)
  set(USE_CUDA OFF)
else()
  moediffuseq_resolve_cuda_archs()
  set(TORCH_CUDA_ARCH_LIST "${MOEDIFFUSEQ_TORCH_CUDA_ARCH_LIST}")
endif()
find_package(Torch REQUIRED)
if(MOEDIFFUSEQ_TORCH_HAS_CUDA)
  moediffuseq_strip_torch_arch_flags()
endif()

# torch_python carries the pybind11 type casters for tensors; it sits beside libtorch.
find_library(MOEDIFFUSEQ_TORCH_PYTHON_LIBRARY torch_python
  PATHS "${TORCH_INSTALL_PREFIX}/lib" NO_DEFAULT_PATH REQUIRED)
