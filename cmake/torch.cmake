# The torch installed in the build's Python (build with --no-build-isolation), taken from Python
# as torch.utils.cpp_extension takes it: include directories, the library directory and the C++
# ABI flag. Caffe2's own CMake config (find_package(Torch)) is not used: for a CUDA build of torch
# it demands the CUDA toolkit before this project can decide to build its CPU kernels only (the
# usual pip or conda CUDA torch without nvcc), and it adds -gencode flags of its own.
#
# Defines:
#   moediffuseq::torch         imported target: c10, torch, torch_cpu, torch_python, headers, ABI
#   moediffuseq_torch_library(<name> <out-var>)   the full path of torch's lib<name>.so
#                              (cmake/cuda.cmake takes c10_cuda and torch_cuda with it)
#   MOEDIFFUSEQ_TORCH_VERSION, MOEDIFFUSEQ_TORCH_CUDA_VERSION ("" for a CPU build),
#   MOEDIFFUSEQ_TORCH_HAS_CUDA, MOEDIFFUSEQ_TORCH_LIB_DIR
moediffuseq_python_query(_moediffuseq_torch_info [=[
import os, torch
from torch.utils import cpp_extension
print("|".join([torch.__version__, torch.version.cuda or "", str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
                os.path.join(os.path.dirname(torch.__file__), "lib"), ";".join(cpp_extension.include_paths())]))
]=])
string(REPLACE "|" ";" _moediffuseq_torch_info "${_moediffuseq_torch_info}")
list(POP_FRONT _moediffuseq_torch_info MOEDIFFUSEQ_TORCH_VERSION MOEDIFFUSEQ_TORCH_CUDA_VERSION _abi
     MOEDIFFUSEQ_TORCH_LIB_DIR)
set(_includes ${_moediffuseq_torch_info})  # the rest: the include directories

if(MOEDIFFUSEQ_TORCH_CUDA_VERSION STREQUAL "")
  set(MOEDIFFUSEQ_TORCH_HAS_CUDA OFF)
else()
  set(MOEDIFFUSEQ_TORCH_HAS_CUDA ON)
endif()

# One imported library per torch shared object, by full path (NO_DEFAULT_PATH: never another torch).
function(moediffuseq_torch_library name out)
  find_library(MOEDIFFUSEQ_TORCH_LIB_${name} ${name} PATHS "${MOEDIFFUSEQ_TORCH_LIB_DIR}" NO_DEFAULT_PATH)
  if(NOT MOEDIFFUSEQ_TORCH_LIB_${name})
    message(FATAL_ERROR "moediffuseq: lib${name}.so not found in ${MOEDIFFUSEQ_TORCH_LIB_DIR} "
                        "(torch ${MOEDIFFUSEQ_TORCH_VERSION})")
  endif()
  set(${out} "${MOEDIFFUSEQ_TORCH_LIB_${name}}" PARENT_SCOPE)
endfunction()

add_library(moediffuseq::torch INTERFACE IMPORTED)
set(_libs "")
foreach(name c10 torch torch_cpu torch_python)
  moediffuseq_torch_library(${name} path)
  list(APPEND _libs "${path}")
endforeach()
target_include_directories(moediffuseq::torch SYSTEM INTERFACE ${_includes})
target_compile_definitions(moediffuseq::torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_abi})
target_link_libraries(moediffuseq::torch INTERFACE ${_libs})

if(MOEDIFFUSEQ_TORCH_HAS_CUDA)
  set(_kind "CUDA ${MOEDIFFUSEQ_TORCH_CUDA_VERSION}")
else()
  set(_kind "CPU build")
endif()
message(STATUS "moediffuseq: torch ${MOEDIFFUSEQ_TORCH_VERSION} (${_kind}) from ${MOEDIFFUSEQ_TORCH_LIB_DIR}")
