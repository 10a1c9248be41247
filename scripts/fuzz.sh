#!/usr/bin/env bash
# The long fuzzing run: every proptest fuzz target in tests/fuzz_*.rs (the load formats, the plan
# reader, the dispatch decoder, the safetensors header, and any added later), each with many more
# cases than CI's `cargo test` runs (PROPTEST_CASES, default in tests/fuzz_support: a few seconds).
#
# Usage: scripts/fuzz.sh [--cases N] [--minutes M] [TARGET...]
#   --cases N     cases per property (default 200000)
#   --minutes M   wall-clock bound per target (default 10); a target still running then is stopped,
#                 and passes if it printed no failure
#   TARGET        fuzz_load, fuzz_plan, ... (default: every tests/fuzz_*.rs that exists)
#
# Builds the targets once (test profile), then runs each binary directly. Exits non-zero if any
# target failed; a failing case is printed by proptest, shrunk, with the seed to reproduce it.
set -euo pipefail
cd "$(dirname "$0")/.."

cases=200000
minutes=10
targets=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cases) cases="$2"; shift 2 ;;
        --minutes) minutes="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
if [[ ${#targets[@]} -eq 0 ]]; then
    for f in tests/fuzz_*.rs; do
        [[ -e "$f" ]] && targets+=("$(basename "$f" .rs)")
    done
fi
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "no tests/fuzz_*.rs targets" >&2
    exit 2
fi

args=()
for t in "${targets[@]}"; do args+=(--test "$t"); done
echo "==> building ${targets[*]}"
# One JSON line per artifact; keep each test target's executable.
mapfile -t exes < <(cargo test --locked "${args[@]}" --no-run --message-format=json \
    | grep '"executable":"/' | grep -F '"kind":["test"]' \
    | sed 's/.*"name":"\([^"]*\)".*"executable":"\([^"]*\)".*/\1 \2/')

failed=()
for line in "${exes[@]}"; do
    name="${line%% *}"
    exe="${line#* }"
    log="$(mktemp)"
    echo "==> $name: PROPTEST_CASES=$cases, at most $minutes min"
    start=$SECONDS
    set +e
    PROPTEST_CASES="$cases" timeout "$((minutes * 60))" "$exe" --test-threads 2 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    if grep -qE "panicked|minimal failing input|test result: FAILED|memory allocation of" "$log"; then
        failed+=("$name")
    elif [[ $rc -eq 124 ]]; then
        echo "==> $name: stopped after $minutes min with no failure"
    elif [[ $rc -ne 0 ]]; then
        failed+=("$name")
    fi
    echo "==> $name: $((SECONDS - start)) s"
    rm -f "$log"
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "all fuzz targets passed: ${targets[*]}"
