#!/usr/bin/env bash
# scripts/test.sh: build kvc (library checks, unit tests, examples, benchmarks) and run the
# whole test suite with ctest.
#
#   scripts/test.sh [cmake options...]        e.g. scripts/test.sh -DKVC_WERROR=ON
#
# Environment: KVC_BUILD_DIR (default build/release), KVC_BUILD_TYPE (default Release),
# KVC_JOBS (default: number of cores), KVC_NO_INSTALL=1 (never install packages).
set -euo pipefail
# shellcheck source=scripts/deps.sh
source "$(dirname "${BASH_SOURCE[0]}")/deps.sh"

build_dir="${KVC_BUILD_DIR:-build/release}"
[[ "$build_dir" == /* ]] || build_dir="$KVC_ROOT/$build_dir"
build_type="${KVC_BUILD_TYPE:-Release}"

deps=(cmake cxx eigen gtest gmock)
[[ " $* " == *" -DKVC_BUILD_BENCHMARKS=OFF "* ]] || deps+=(benchmark)
kvc_require "${deps[@]}"

kvc_step "Configuring $build_dir"
kvc_configure "$build_dir" -DCMAKE_BUILD_TYPE="$build_type" -DKVC_BUILD_TESTS=ON -DKVC_BUILD_EXAMPLES=ON "$@"

kvc_step "Building ($KVC_JOBS jobs)"
cmake --build "$build_dir" --parallel "$KVC_JOBS"

kvc_step "Running the tests"
cd "$build_dir"
ctest --parallel "$KVC_JOBS" --output-on-failure --progress --timeout 1800
