# ctest install_find_package: installs the build tree into a scratch prefix, then configures, builds
# and runs the out-of-tree consumer app against it with find_package(loldu).
# -D: BUILD_DIR, WORK_DIR, CONSUMER_DIR, TORCH_DIR (torch's Torch_DIR), GENERATOR, BUILD_TYPE.
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "failed (${rc}): ${cmd}")
  endif()
endfunction()

set(prefix ${WORK_DIR}/prefix)
file(REMOVE_RECURSE ${prefix} ${WORK_DIR}/adapter)
run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})
foreach(f include/loldu/loldu.h include/loldu/merge.h include/loldu/adapter_file.h
          lib/cmake/loldu/lolduConfig.cmake lib/cmake/loldu/lolduConfigVersion.cmake lib/cmake/loldu/lolduTargets.cmake)
  if(NOT EXISTS ${prefix}/${f})
    message(FATAL_ERROR "cmake --install did not install ${f}")
  endif()
endforeach()
# torch's CMake prefix (<...>/share/cmake) from Torch_DIR (<...>/share/cmake/Torch): the consumer
# finds loldu in the scratch prefix and libtorch through loldu's find_dependency(Torch).
get_filename_component(torch_prefix ${TORCH_DIR} DIRECTORY)
run(${CMAKE_COMMAND} -E env CMAKE_PREFIX_PATH=${prefix}:${torch_prefix}
    ${CMAKE_COMMAND} -S ${CONSUMER_DIR} -B ${WORK_DIR}/build -G ${GENERATOR} -DCMAKE_BUILD_TYPE=${BUILD_TYPE})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run(${WORK_DIR}/build/consumer ${WORK_DIR}/adapter)
# The installed example app runs from the prefix (its RUNPATH finds libloldu and libtorch).
run(${prefix}/bin/apply_adapter --check ${WORK_DIR}/adapter)
