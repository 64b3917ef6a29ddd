# Optional CUDA backend: MOEDIFFUSEQ_CUDA = AUTO | ON | OFF (environment or -D).
# AUTO builds it when nvcc is found *and* the installed torch is a CUDA build; ON fails loudly
# when either is missing. CUTLASS/CuTe headers come from the pinned `nvidia-cutlass` package.
# A CUDA torch without nvcc (the usual pip or conda install) gets the CPU kernels under AUTO.
# The architectures come from cmake/cuda_archs.cmake. Defines MOEDIFFUSEQ_WITH_CUDA and
# moediffuseq_add_cuda_sources(<target>).
include(cuda_archs)  # moediffuseq_resolve_cuda_archs()

if(DEFINED ENV{MOEDIFFUSEQ_CUDA} AND NOT DEFINED MOEDIFFUSEQ_CUDA)
  set(MOEDIFFUSEQ_CUDA "$ENV{MOEDIFFUSEQ_CUDA}")
endif()
set(MOEDIFFUSEQ_CUDA "AUTO" CACHE STRING "Build the CUDA kernels: AUTO, ON or OFF")
string(TOUPPER "${MOEDIFFUSEQ_CUDA}" MOEDIFFUSEQ_CUDA)
if(NOT MOEDIFFUSEQ_CUDA MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "MOEDIFFUSEQ_CUDA must be AUTO, ON or OFF, got '${MOEDIFFUSEQ_CUDA}'")
endif()

set(MOEDIFFUSEQ_WITH_CUDA OFF)
if(NOT MOEDIFFUSEQ_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  set(reason "")
  if(NOT CMAKE_CUDA_COMPILER)
    set(reason "no nvcc found")
  elseif(NOT MOEDIFFUSEQ_TORCH_HAS_CUDA)
    set(reason "the installed torch is a CPU build")
  endif()
  if(reason STREQUAL "")
    set(MOEDIFFUSEQ_WITH_CUDA ON)
  elseif(MOEDIFFUSEQ_CUDA STREQUAL "ON")
    message(FATAL_ERROR "moediffuseq: MOEDIFFUSEQ_CUDA=ON but ${reason}: install the CUDA toolkit "
                        "(nvcc on PATH or CUDACXX) and a CUDA build of torch, or build with MOEDIFFUSEQ_CUDA=AUTO")
  else()
    message(NOTICE "moediffuseq: building the CPU kernels only (${reason}; MOEDIFFUSEQ_CUDA=ON makes this an error)")
  endif()
endif()

# At file scope: enable_language() inside a function leaves the CUDA rules out of the build.
if(MOEDIFFUSEQ_WITH_CUDA)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)  # CUDA::cudart: the runtime headers the torch glue includes
  moediffuseq_resolve_cuda_archs()
endif()

include(cutlass)  # moediffuseq_find_cutlass(), MOEDIFFUSEQ_CUDA_FLAGS

# Adds csrc/<subject>/cuda/*.cu and cuda/instantiations/*.cu (torch-free kernels, compiled by
# nvcc alone) and csrc/<subject>/cuda/*.cpp
# (their torch-facing glue) to <target>, with CUTLASS on the include path.
function(moediffuseq_add_cuda_sources target)
  moediffuseq_find_cutlass()
  file(GLOB cu_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/csrc/*/cuda/*.cu ${PROJECT_SOURCE_DIR}/csrc/*/cuda/*.cpp
    ${PROJECT_SOURCE_DIR}/csrc/*/cuda/instantiations/*.cu)
  target_sources(${target} PRIVATE ${cu_sources})
  # Shared cudart: the kernels and torch then use one runtime (one set of streams and contexts).
  set_target_properties(${target} PROPERTIES
    CUDA_ARCHITECTURES "${MOEDIFFUSEQ_CUDA_ARCHITECTURES}"
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    CUDA_RUNTIME_LIBRARY Shared)
  target_include_directories(${target} PRIVATE ${MOEDIFFUSEQ_CUTLASS_INCLUDE_DIR})
  moediffuseq_torch_library(c10_cuda c10_cuda)
  moediffuseq_torch_library(torch_cuda torch_cuda)
  target_link_libraries(${target} PRIVATE "${c10_cuda}" "${torch_cuda}" CUDA::cudart)
  target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CUDA>:${MOEDIFFUSEQ_CUDA_FLAGS}>")
  # The built list, comma-separated (a ';' would split the definition): build_info().cuda_archs
  # and the device check of the CUDA glue (csrc/common/cuda/device_check.cpp) read it.
  string(REPLACE ";" "," archs "${MOEDIFFUSEQ_CUDA_ARCHITECTURES}")
  target_compile_definitions(${target} PRIVATE
    MOEDIFFUSEQ_WITH_CUDA=1
    MOEDIFFUSEQ_CUDA_ARCHS="${archs}"
    MOEDIFFUSEQ_CUTLASS_VERSION="${MOEDIFFUSEQ_CUTLASS_VERSION}")
  # What was asked, for cmake/check_cuda_archs.py --archs (make cuda-build reads it).
  file(WRITE "${CMAKE_BINARY_DIR}/moediffuseq_cuda_archs.txt" "${MOEDIFFUSEQ_CUDA_ARCHS_REQUESTED}\n")
  message(STATUS "moediffuseq: CUDA kernels for ${archs}, CUTLASS ${MOEDIFFUSEQ_CUTLASS_VERSION}")
endfunction()
