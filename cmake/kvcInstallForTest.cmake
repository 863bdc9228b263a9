# cmake/kvcInstallForTest.cmake: installs a kvc build tree into a fresh prefix (the
# package.install test). Run with cmake -DBUILD_DIR=<build> -DPREFIX=<prefix> [-DCONFIG=<cfg>] -P.
foreach(var BUILD_DIR PREFIX)
  if(NOT ${var})
    message(FATAL_ERROR "kvcInstallForTest.cmake: pass -D${var}=...")
  endif()
endforeach()

file(REMOVE_RECURSE "${PREFIX}")
set(config_args)
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${config_args}
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install ${BUILD_DIR} --prefix ${PREFIX} failed (${rc})")
endif()
