#!/usr/bin/env bash
# scripts/check-format.sh: check every .hpp/.cpp in the repository (tracked, or new and not
# ignored) against .clang-format. Fix with: clang-format -i <file>...
set -euo pipefail
# shellcheck source=scripts/deps.sh
source "$(dirname "${BASH_SOURCE[0]}")/deps.sh"

kvc_require clang-format
cd "$KVC_ROOT"

files=()
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  while IFS= read -r f; do
    [[ -f "$f" ]] && files+=("$f")
  done < <(git ls-files --cached --others --exclude-standard -- '*.hpp' '*.cpp' | sort -u)
else
  while IFS= read -r f; do files+=("$f"); done < <(find include tests bench examples -type f \
    \( -name '*.hpp' -o -name '*.cpp' \) 2>/dev/null | sort)
fi
[[ ${#files[@]} -gt 0 ]] || kvc_die "no .hpp/.cpp files found"

kvc_step "clang-format check: ${#files[@]} files ($(clang-format --version | sed 's/^.*version //'))"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if clang-format --dry-run --Werror "${files[@]}" >"$log" 2>&1; then
  echo "all ${#files[@]} files are formatted"
  exit 0
fi
bad=()
while IFS= read -r f; do bad+=("$f"); done < <(sed -n 's/^\([^:]*\.[ch]pp\):[0-9]*:[0-9]*: error:.*/\1/p' "$log" | sort -u)
head -n 20 "$log"
[[ $(wc -l <"$log") -le 20 ]] || echo "... ($(wc -l <"$log") lines in all)"
echo
echo "error: ${#bad[@]} file(s) not formatted:"
printf '    %s\n' "${bad[@]}"
echo "fix with: clang-format -i ${bad[*]}"
exit 1
