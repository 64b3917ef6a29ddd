# Finds the Torch that is installed in the build's Python (build with --no-build-isolation).
# Defines TORCH_LIBRARIES, MOEDIFFUSEQ_TORCH_PYTHON_LIBRARY and MOEDIFFUSEQ_TORCH_HAS_CUDA.
moediffuseq_python_query(MOEDIFFUSEQ_TORCH_PREFIX "import torch.utils; print(torch.utils.cmake_prefix_path)")
moediffuseq_python_query(MOEDIFFUSEQ_TORCH_CUDA_VERSION "import torch; print(torch.version.cuda or '')")
list(APPEND CMAKE_PREFIX_PATH "${MOEDIFFUSEQ_TORCH_PREFIX}")

if(MOEDIFFUSEQ_TORCH_CUDA_VERSION STREQUAL "")
  set(MOEDIFFUSEQ_TORCH_HAS_CUDA OFF)
else()
  set(MOEDIFFUSEQ_TORCH_HAS_CUDA ON)
endif()

# A CPU build of torch must not make Caffe2's CMake look for CUDA.
if(NOT MOEDIFFUSEQ_TORCH_HAS_CUDA)
  set(USE_CUDA OFF)
endif()
find_package(Torch REQUIRED)

# torch_python carries the pybind11 type casters for tensors; it sits beside libtorch.
find_library(MOEDIFFUSEQ_TORCH_PYTHON_LIBRARY torch_python
  PATHS "${TORCH_INSTALL_PREFIX}/lib" NO_DEFAULT_PATH REQUIRED)
