# The CUDA architectures of the kernels: ONE list, from the first of these that is set
#   MOEDIFFUSEQ_CUDA_ARCHS   (-D or environment)   e.g. 90a    80;90a    90a-real
#   TORCH_CUDA_ARCH_LIST     (-D or environment)   e.g. 9.0a   8.0 9.0a  9.0a+PTX
#   the default              9.0a
# Either variable takes either format, entry by entry (separated by ';', ',' or spaces):
#   torch  X.Y[a|f][+PTX]            SASS for sm_XY[a|f]; +PTX adds its PTX (compute_XY[a|f])
#   CMake  XY[a|f][-real|-virtual]   as CUDA_ARCHITECTURES: SASS and PTX / SASS only / PTX only
# sm_90a code (wgmma, TMA) runs only on capability 9.0 exactly; see
# csrc/common/cuda/cuda_arch_support.h for what each entry runs on.
#
# moediffuseq_resolve_cuda_archs() sets, in the caller's scope:
#   MOEDIFFUSEQ_CUDA_ARCHS_REQUESTED   the list as given (cmake/check_cuda_archs.py takes it as is)
#   MOEDIFFUSEQ_CUDA_ARCHITECTURES     the CUDA_ARCHITECTURES list, e.g. 90a-real
# The targets' CUDA_ARCHITECTURES is the only source of architectures: torch's CMake config,
# which would add -gencode flags of its own, is not used (cmake/torch.cmake).

set(MOEDIFFUSEQ_CUDA_ARCHS "" CACHE STRING
    "CUDA architectures of the kernels (empty: TORCH_CUDA_ARCH_LIST, else 9.0a); e.g. 90a or 9.0a")

function(moediffuseq_resolve_cuda_archs)
  set(requested "")
  foreach(source MOEDIFFUSEQ_CUDA_ARCHS TORCH_CUDA_ARCH_LIST)
    if(requested STREQUAL "" AND NOT "${${source}}" STREQUAL "")
      set(requested "${${source}}")
      set(origin "${source}")
    elseif(requested STREQUAL "" AND NOT "$ENV{${source}}" STREQUAL "")
      set(requested "$ENV{${source}}")
      set(origin "environment ${source}")
    endif()
  endforeach()
  if(requested STREQUAL "")
    set(requested "9.0a")
    set(origin "default")
  endif()

  string(REGEX REPLACE "[;, \t]+" ";" entries "${requested}")
  list(REMOVE_ITEM entries "")
  set(cmake_list "")
  foreach(entry IN LISTS entries)
    if(entry MATCHES "^([0-9]+)\\.([0-9])([af]?)(\\+PTX)?$")
      set(arch "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
      if(CMAKE_MATCH_4)
        set(cmake_entry "${arch}")
      else()
        set(cmake_entry "${arch}-real")
      endif()
    elseif(entry MATCHES "^([0-9]+)([0-9])([af]?)(-real|-virtual)?$")
      set(cmake_entry "${entry}")
    else()
      message(FATAL_ERROR "moediffuseq: CUDA architecture '${entry}' (from ${origin} = '${requested}') is "
                          "neither X.Y[a|f][+PTX] (e.g. 9.0a) nor XY[a|f][-real|-virtual] (e.g. 90a)")
    endif()
    list(APPEND cmake_list "${cmake_entry}")
  endforeach()
  list(REMOVE_DUPLICATES cmake_list)
  if(cmake_list STREQUAL "")
    message(FATAL_ERROR "moediffuseq: empty CUDA architecture list from ${origin}")
  endif()
  message(STATUS "moediffuseq: CUDA architectures ${cmake_list} (${origin}: ${requested})")
  set(MOEDIFFUSEQ_CUDA_ARCHS_REQUESTED "${requested}" PARENT_SCOPE)
  set(MOEDIFFUSEQ_CUDA_ARCHITECTURES "${cmake_list}" PARENT_SCOPE)
endfunction()
