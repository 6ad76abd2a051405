# trainscope_build_info.json, beside the libraries in the build tree and in the installed package:
# what trainscope.build_info() reports and what the package checks before loading the op library
# (the torch it was built against).
if(TRAINSCOPE_WITH_CUDA)
  set(TRAINSCOPE_INFO_CUDA "true")
  set(TRAINSCOPE_INFO_CUDA_VERSION "\"${CMAKE_CUDA_COMPILER_VERSION}\"")
  set(TRAINSCOPE_INFO_ARCHS "")
  foreach(arch IN LISTS TRAINSCOPE_CUDA_ARCHITECTURES)
    list(APPEND TRAINSCOPE_INFO_ARCHS "\"${arch}\"")
  endforeach()
  list(JOIN TRAINSCOPE_INFO_ARCHS ", " TRAINSCOPE_INFO_ARCHS)
else()
  set(TRAINSCOPE_INFO_CUDA "false")
  set(TRAINSCOPE_INFO_CUDA_VERSION "null")
  set(TRAINSCOPE_INFO_ARCHS "")
endif()
file(WRITE ${CMAKE_BINARY_DIR}/trainscope_build_info.json.in
"{
  \"version\": \"${PROJECT_VERSION}\",
  \"torch\": \"${Torch_VERSION}\",
  \"cuda\": ${TRAINSCOPE_INFO_CUDA},
  \"cuda_version\": ${TRAINSCOPE_INFO_CUDA_VERSION},
  \"cuda_architectures\": [${TRAINSCOPE_INFO_ARCHS}],
  \"build_type\": \"${CMAKE_BUILD_TYPE}\"
}
")
configure_file(${CMAKE_BINARY_DIR}/trainscope_build_info.json.in ${CMAKE_BINARY_DIR}/trainscope_build_info.json COPYONLY)
