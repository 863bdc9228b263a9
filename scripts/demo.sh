#!/usr/bin/env bash
# scripts/demo.sh: build and run the quick-start example (examples/quickstart.cpp).
#
# Environment: KVC_BUILD_DIR (default build/release), KVC_BUILD_TYPE (default Release),
# KVC_JOBS (default: number of cores), KVC_NO_INSTALL=1 (never install packages).
set -euo pipefail
# shellcheck source=scripts/deps.sh
source "$(dirname "${BASH_SOURCE[0]}")/deps.sh"

build_dir="${KVC_BUILD_DIR:-build/release}"
[[ "$build_dir" == /* ]] || build_dir="$KVC_ROOT/$build_dir"
build_type="${KVC_BUILD_TYPE:-Release}"

kvc_require cmake cxx eigen

kvc_step "Configuring $build_dir"
kvc_configure "$build_dir" -DCMAKE_BUILD_TYPE="$build_type" -DKVC_BUILD_EXAMPLES=ON -DKVC_BUILD_TESTS=OFF \
  -DKVC_BUILD_BENCHMARKS=OFF "$@"

kvc_step "Building kvc_quickstart"
cmake --build "$build_dir" --parallel "$KVC_JOBS" --target kvc_quickstart

kvc_step "Running examples/quickstart.cpp"
"$build_dir/examples/kvc_quickstart"
