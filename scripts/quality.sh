#!/usr/bin/env bash
# scripts/quality.sh: the quality evaluation (bench/quality/README.md) in one command. Installs
# what it needs, builds kvc_quality natively in Release, runs every scorer x budget at every
# compression ratio (and, with --rows codecs, eviction, quantization and both at equal bytes),
# and writes, in bench/quality/results/:
#   <name>.csv                  every row (kvc_quality --csv)
#   <name>.txt                  the tables kvc_quality prints
#   <name>.md                   markdown tables (bench/quality/table.py)
#   <name>.png, <name>_budgets.png   accuracy against compression ratio (bench/quality/plot.py)
#   <name>_bytes.png            the codec rows: error against bytes (bench/quality/plot.py)
#
#   scripts/quality.sh                                   the synthetic suites, <name> = synthetic
#   scripts/quality.sh --rows codecs --results codecs    the codec rows on the synthetic suites
#   scripts/quality.sh --npy-dir DIR --rope-theta 500000 a model's dump, <name> = DIR's name
#   scripts/quality.sh --results NAME [...]              choose <name>
# Every argument other than --results NAME goes to kvc_quality (kvc_quality --help lists them).
# Exits with kvc_quality's status (1 when a sanity check failed or a policy could not
# compress) after writing whatever it could.
#
# Environment: KVC_BUILD_DIR (default build/quality-native), KVC_RESULTS_DIR (default
# bench/quality/results), KVC_JOBS (default: number of cores), KVC_NO_INSTALL=1 (never
# install packages).
set -euo pipefail
# shellcheck source=scripts/deps.sh
source "$(dirname "${BASH_SOURCE[0]}")/deps.sh"

build_dir="${KVC_BUILD_DIR:-build/quality-native}"
[[ "$build_dir" == /* ]] || build_dir="$KVC_ROOT/$build_dir"
results_dir="${KVC_RESULTS_DIR:-bench/quality/results}"
[[ "$results_dir" == /* ]] || results_dir="$KVC_ROOT/$results_dir"

# --results NAME is ours; the rest goes to kvc_quality.
name=""
npy_dir=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --results)
      [[ $# -ge 2 ]] || kvc_die "--results needs a name"
      name="$2"
      shift 2
      ;;
    --npy-dir)
      [[ $# -ge 2 ]] || kvc_die "--npy-dir needs a directory"
      npy_dir="$2"
      args+=("$1" "$2")
      shift 2
      ;;
    *)
      args+=("$1")
      shift
      ;;
  esac
done
if [[ -z "$name" ]]; then
  if [[ -n "$npy_dir" ]]; then
    name="$(basename "${npy_dir%/}")"
  else
    name=synthetic
  fi
fi
[[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || kvc_die "--results: '$name' is not a plain file name"

# The benchmark library too: configuring with KVC_BUILD_BENCHMARKS=ON looks for it.
kvc_require cmake cxx eigen benchmark matplotlib
python="$(kvc_python)"

kvc_step "Configuring $build_dir (Release, -O3 -march=native)"
kvc_configure "$build_dir" -DCMAKE_BUILD_TYPE=Release -DKVC_NATIVE=ON -DKVC_BUILD_BENCHMARKS=ON \
  -DKVC_BUILD_TESTS=OFF -DKVC_BUILD_EXAMPLES=OFF

kvc_step "Building kvc_quality ($KVC_JOBS jobs)"
cmake --build "$build_dir" --parallel "$KVC_JOBS" --target kvc_quality

mkdir -p "$results_dir"
csv="$results_dir/$name.csv"
txt="$results_dir/$name.txt"
kvc_step "Running kvc_quality${args[*]:+ ${args[*]}} -> $results_dir/$name.*"
start=$SECONDS
set +e
"$build_dir/bench/kvc_quality" --check --csv "$csv" "${args[@]}" | tee "$txt"
status=${PIPESTATUS[0]}
set -e
elapsed=$((SECONDS - start))
echo "kvc_quality: ${elapsed} s, exit status $status"
[[ -s "$csv" ]] || kvc_die "kvc_quality wrote no CSV (exit status $status)"

kvc_step "Tables and plots"
shape="$(sed -n 's/^   \([0-9]* layers, .*\)$/\1/p' "$txt" | head -n 1)"
note="Shape: ${shape}. Reproduce with \`scripts/quality.sh${args[*]:+ ${args[*]}}\`."
"$python" "$KVC_ROOT/bench/quality/table.py" "$csv" --note "$note" >"$results_dir/$name.md"
echo "wrote $results_dir/$name.md"
"$python" "$KVC_ROOT/bench/quality/plot.py" "$csv" --out "$results_dir/$name"

if [[ $status -ne 0 ]]; then
  echo "error: kvc_quality exited with status $status (see the messages above)" >&2
fi
exit "$status"
