# moediffuseq_python_query(<out-var> <python code>)
# Runs a line of Python with the interpreter setup.py was started from and stores its stripped
# stdout in <out-var>. Used to locate Torch, pybind11 and CUTLASS from the installed packages,
# so the build never downloads anything.
function(moediffuseq_python_query out code)
  if(NOT Python_EXECUTABLE)
    find_package(Python REQUIRED COMPONENTS Interpreter)
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "${code}"
    OUTPUT_VARIABLE result
    RESULT_VARIABLE status
    ERROR_VARIABLE err
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "moediffuseq: python query failed: ${code}\n${err}")
  endif()
  set(${out} "${result}" PARENT_SCOPE)
endfunction()
