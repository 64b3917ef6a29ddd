# Chooses the vector ISA of the C++ CPU kernels:
# MOEDIFFUSEQ_CPU_ISA = auto | avx512_bf16 | avx512 | avx2 | default.
# "auto" takes the best level the build machine runs. avx512_bf16 adds the AVX512-BF16 dot
# products used by the bfloat16 tile products (csrc/attention/cpu/tile_gemm.h). The level selects both the compiler flags
# and ATen's at::vec implementation (CPU_CAPABILITY), exactly as PyTorch builds its own kernels,
# and is reported at run time as moediffuseq._C.cpu_isa.
# Defines MOEDIFFUSEQ_CPU_FLAGS and MOEDIFFUSEQ_CPU_DEFINES.
set(MOEDIFFUSEQ_CPU_ISA "auto" CACHE STRING "CPU ISA of the C++ kernels: auto, avx512_bf16, avx512, avx2 or default")
set_property(CACHE MOEDIFFUSEQ_CPU_ISA PROPERTY STRINGS auto avx512_bf16 avx512 avx2 default)

include(CheckCXXSourceRuns)
function(moediffuseq_host_supports out features)
  set(test "int main() { __builtin_cpu_init(); return (1")
  foreach(f IN LISTS features)
    string(APPEND test " && __builtin_cpu_supports(\"${f}\")")
  endforeach()
  string(APPEND test ") ? 0 : 1; }")
  check_cxx_source_runs("${test}" ${out})
  set(${out} ${${out}} PARENT_SCOPE)
endfunction()

set(MOEDIFFUSEQ_ISA_LEVEL "${MOEDIFFUSEQ_CPU_ISA}")
if(MOEDIFFUSEQ_ISA_LEVEL STREQUAL "auto")
  set(MOEDIFFUSEQ_ISA_LEVEL default)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64")
    moediffuseq_host_supports(MOEDIFFUSEQ_HOST_AVX2 "avx2;fma")
    moediffuseq_host_supports(MOEDIFFUSEQ_HOST_AVX512 "avx512f;avx512bw;avx512vl;avx512dq")
    moediffuseq_host_supports(MOEDIFFUSEQ_HOST_AVX512BF16 "avx512f;avx512bw;avx512vl;avx512dq;avx512bf16")
    if(MOEDIFFUSEQ_HOST_AVX512BF16)
      set(MOEDIFFUSEQ_ISA_LEVEL avx512_bf16)
    elseif(MOEDIFFUSEQ_HOST_AVX512)
      set(MOEDIFFUSEQ_ISA_LEVEL avx512)
    elseif(MOEDIFFUSEQ_HOST_AVX2)
      set(MOEDIFFUSEQ_ISA_LEVEL avx2)
    endif()
  endif()
endif()

if(MOEDIFFUSEQ_ISA_LEVEL STREQUAL "avx512_bf16")
  set(MOEDIFFUSEQ_CPU_FLAGS -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16)
  set(MOEDIFFUSEQ_CPU_DEFINES CPU_CAPABILITY=AVX512 CPU_CAPABILITY_AVX512)
elseif(MOEDIFFUSEQ_ISA_LEVEL STREQUAL "avx512")
  set(MOEDIFFUSEQ_CPU_FLAGS -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq)
  set(MOEDIFFUSEQ_CPU_DEFINES CPU_CAPABILITY=AVX512 CPU_CAPABILITY_AVX512)
elseif(MOEDIFFUSEQ_ISA_LEVEL STREQUAL "avx2")
  set(MOEDIFFUSEQ_CPU_FLAGS -mavx2 -mfma -mf16c)
  set(MOEDIFFUSEQ_CPU_DEFINES CPU_CAPABILITY=AVX2 CPU_CAPABILITY_AVX2)
elseif(MOEDIFFUSEQ_ISA_LEVEL STREQUAL "default")
  set(MOEDIFFUSEQ_CPU_FLAGS "")
  set(MOEDIFFUSEQ_CPU_DEFINES CPU_CAPABILITY=DEFAULT)
else()
  message(FATAL_ERROR "MOEDIFFUSEQ_CPU_ISA must be auto, avx512_bf16, avx512, avx2 or default, got '${MOEDIFFUSEQ_CPU_ISA}'")
endif()
# at::parallel_for is header code that expands to `#pragma omp parallel` in an OpenMP build of
# torch (the pip wheels): compile with -fopenmp, and let the GOMP symbols resolve to the OpenMP
# runtime libtorch_cpu already loads (linking a second runtime would start a second pool).
list(APPEND MOEDIFFUSEQ_CPU_FLAGS -O3 -fopenmp)
message(STATUS "moediffuseq: CPU kernels built for ${MOEDIFFUSEQ_ISA_LEVEL}")
