# ctest driver: install the C++ package from the build tree into a scratch prefix, then configure,
# build and run a consumer project against it.
set(prefix "${WORK_DIR}/prefix")
file(REMOVE_RECURSE "${WORK_DIR}")
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}")
  endif()
endfunction()
run("${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}" --component cpp)
run("${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}/build" -G Ninja
    "-Dtrainscope_DIR=${prefix}/lib/cmake/trainscope" "-DTorch_DIR=${TORCH_PREFIX}/Torch"
    -DCMAKE_BUILD_TYPE=Release "-DTORCH_CUDA_ARCH_LIST=8.0 9.0")
run("${CMAKE_COMMAND}" --build "${WORK_DIR}/build")
run("${WORK_DIR}/build/consumer")
