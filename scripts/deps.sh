# shellcheck shell=bash
# scripts/deps.sh: shared by the scripts in this directory (source it, do not run it).
#
#   kvc_require cmake cxx eigen gtest gmock benchmark clang-format matplotlib
#       checks each dependency; installs the missing ones with apt-get when running as root
#       with apt-get available, otherwise stops with the command to run.
#   kvc_python                                  prints a Python 3 that imports matplotlib
#   kvc_configure <build-dir> [cmake args...]    configure quietly, show errors
#   kvc_step "text"                             print a step header
#
# Dependencies map to Debian 12 packages: cmake, g++, make, libeigen3-dev, libgtest-dev,
# libgmock-dev, libbenchmark-dev, clang-format, python3-matplotlib. Set KVC_NO_INSTALL=1 to
# never install.

KVC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KVC_JOBS="${KVC_JOBS:-$(nproc 2>/dev/null || echo 2)}"
KVC_MIN_CMAKE=3.16

kvc_step() { printf '\n==> %s\n' "$*"; }
kvc_die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# True when a header is found in the usual include directories.
kvc_have_header() {
  local dir
  for dir in /usr/include /usr/local/include; do
    [[ -f "$dir/$1" ]] && return 0
  done
  return 1
}

# The Python 3 interpreter that imports matplotlib: Debian's /usr/bin/python3 first (where
# python3-matplotlib installs it, whatever python3 comes first on PATH), then python3.
kvc_python() {
  local py
  for py in /usr/bin/python3 "$(command -v python3 2>/dev/null || true)"; do
    if [[ -n "$py" && -x "$py" ]] && "$py" -c 'import matplotlib' >/dev/null 2>&1; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

kvc_cmake_ok() {
  command -v cmake >/dev/null 2>&1 || return 1
  local v
  v="$(cmake --version 2>/dev/null | sed -n 's/^cmake version \([0-9.]*\).*/\1/p')"
  [[ -n "$v" ]] || return 1
  [[ "$(printf '%s\n%s\n' "$KVC_MIN_CMAKE" "$v" | sort -V | head -n1)" == "$KVC_MIN_CMAKE" ]]
}

# kvc_check <dependency>: succeeds when it is present; prints its Debian package otherwise.
kvc_check() {
  case "$1" in
    cmake) kvc_cmake_ok || echo cmake ;;
    cxx) command -v "${CXX:-g++}" >/dev/null 2>&1 || echo g++ ;;
    build-tool)
      if [[ "${CMAKE_GENERATOR:-}" == Ninja* ]]; then
        command -v ninja >/dev/null 2>&1 || echo ninja-build
      else
        command -v make >/dev/null 2>&1 || echo make
      fi
      ;;
    eigen) kvc_have_header eigen3/Eigen/Core || echo libeigen3-dev ;;
    gtest) kvc_have_header gtest/gtest.h || echo libgtest-dev ;;
    gmock) kvc_have_header gmock/gmock.h || echo libgmock-dev ;;
    benchmark) kvc_have_header benchmark/benchmark.h || echo libbenchmark-dev ;;
    clang-format) command -v clang-format >/dev/null 2>&1 || echo clang-format ;;
    matplotlib) kvc_python >/dev/null || echo python3-matplotlib ;;
    *) kvc_die "deps.sh: unknown dependency '$1'" ;;
  esac
}

kvc_missing() {
  local dep
  for dep in "$@"; do kvc_check "$dep"; done | sort -u | tr '\n' ' ' | sed 's/ $//'
}

kvc_apt_install() {
  local log
  log="$(mktemp)"
  export DEBIAN_FRONTEND=noninteractive
  # The package lists may be missing or stale on a fresh machine: update only if needed.
  if apt-get install -y -q --no-install-recommends "$@" >"$log" 2>&1 ||
    { echo "    (apt-get install failed; running apt-get update and retrying)" &&
      apt-get update -q >>"$log" 2>&1 &&
      apt-get install -y -q --no-install-recommends "$@" >>"$log" 2>&1; }; then
    rm -f "$log"
    return 0
  fi
  echo "apt-get output (last 20 lines):" >&2
  tail -n 20 "$log" >&2
  rm -f "$log"
  return 1
}

# kvc_require <dependency>...: cmake, cxx, eigen, gtest, gmock, benchmark, clang-format,
# matplotlib.
# A C++ build also needs make (or ninja when CMAKE_GENERATOR=Ninja): added with cmake.
kvc_require() {
  local deps=("$@")
  [[ " ${deps[*]} " == *" cmake "* ]] && deps+=(build-tool)
  local missing
  missing="$(kvc_missing "${deps[@]}")"
  [[ -z "$missing" ]] && return 0

  # shellcheck disable=SC2086  # $missing is a list of package names
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1 && [[ "${KVC_NO_INSTALL:-0}" != 1 ]]; then
    kvc_step "Installing missing packages: $missing"
    kvc_apt_install $missing || kvc_die "could not install: $missing"
    missing="$(kvc_missing "${deps[@]}")"
    [[ -z "$missing" ]] || kvc_die "still missing after apt-get install: $missing"
    return 0
  fi

  {
    echo "error: missing dependencies (Debian packages): $missing"
    if command -v apt-get >/dev/null 2>&1; then
      if [[ "$(id -u)" == 0 ]]; then
        echo "Install them with:"
        echo "    apt-get update && apt-get install -y $missing"
      else
        echo "Install them with:"
        echo "    sudo apt-get update && sudo apt-get install -y $missing"
      fi
    else
      echo "Install the equivalent packages with your system's package manager (CMake >= $KVC_MIN_CMAKE, Eigen >= 3.4)."
    fi
  } >&2
  exit 1
}

# kvc_configure <build-dir> [cmake args...]: configure, printing only warnings and errors.
kvc_configure() {
  local dir="$1"
  shift
  local log="$dir/configure.log"
  mkdir -p "$dir"
  if ! cmake -S "$KVC_ROOT" -B "$dir" "$@" >"$log" 2>&1; then
    cat "$log" >&2
    kvc_die "cmake configure failed (log: $log)"
  fi
  # Show CMake warnings, if any, but not the usual status lines.
  if grep -q "CMake Warning" "$log"; then cat "$log"; fi
  echo "configured $dir ($(sed -n 's/^CMAKE_BUILD_TYPE:STRING=//p' "$dir/CMakeCache.txt"))"
}
