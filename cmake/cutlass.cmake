# moediffuseq_find_cutlass()
# Locates the CUTLASS/CuTe headers shipped by the pinned `nvidia-cutlass` wheel
# (cutlass_library/source/include) through the build's Python; nothing is downloaded.
# Sets MOEDIFFUSEQ_CUTLASS_INCLUDE_DIR and MOEDIFFUSEQ_CUTLASS_VERSION in the caller's scope.
function(moediffuseq_find_cutlass)
  moediffuseq_python_query(root
    "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))")
  set(include_dir "${root}/include")
  if(NOT EXISTS "${include_dir}/cutlass/version.h")
    message(FATAL_ERROR "moediffuseq: CUTLASS headers not found under ${include_dir}; install the pinned nvidia-cutlass "
                        "with the other build tools: pip install -r cmake/build-requirements.txt")
  endif()
  file(STRINGS "${include_dir}/cutlass/version.h" lines REGEX "#define CUTLASS_(MAJOR|MINOR|PATCH) [0-9]+")
  foreach(part MAJOR MINOR PATCH)
    string(REGEX MATCH "CUTLASS_${part} ([0-9]+)" _ "${lines}")
    set(v_${part} "${CMAKE_MATCH_1}")
  endforeach()
  set(MOEDIFFUSEQ_CUTLASS_INCLUDE_DIR "${include_dir}" PARENT_SCOPE)
  set(MOEDIFFUSEQ_CUTLASS_VERSION "${v_MAJOR}.${v_MINOR}.${v_PATCH}" PARENT_SCOPE)
endfunction()

# Compile options shared by every CUDA kernel file, in the extension and in the compile check.
set(MOEDIFFUSEQ_CUDA_FLAGS --expt-relaxed-constexpr -O3 -lineinfo)
