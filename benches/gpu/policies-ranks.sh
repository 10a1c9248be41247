#!/usr/bin/env bash
# Real ranks against emulated ranks (issue 7): on a host with D GPUs, the same policies, shape,
# trace and seed run once with D emulated ranks on cuda:0 and once with D real moe-worker processes
# (rank r on cuda:r) driven by the load generator. Both modes route identically (their observed
# balancedness matches exactly); tokens/s differ by what each mode times (see docs/benchmarks.md, Policy testbed).
#
# On the device machine (moectl and moe-worker prebuilt into .devrun/):
#   benches/gpu/policies-ranks.sh              # D = number of GPUs; results under $OUT/ranks/
# Test-sized dry run on the CPU:
#   MOE_BENCH_DRY=1 BIN=target/debug OUT=/tmp/ranks-dry benches/gpu/policies-ranks.sh
# Knobs: TOKENS=256,1024 runs those batch sizes instead of the decode and prefill regimes;
# MODES="emulated workers workers-heap" picks the runs. workers-heap is the workers mode with glibc
# malloc kept off mmap for large buffers (MALLOC_MMAP_MAX_=0, no trimming), to measure what fresh
# pages (page faults on every frame-sized allocation) cost the host path.
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.devrun}
OUT=${OUT:?set OUT to the output directory}
R="$OUT/ranks"
mkdir -p "$R"
SEED=${SEED:-1}

if [ "${MOE_BENCH_DRY:-0}" = 1 ]; then
    D=${D:-2}
    DEVICE=cpu
    TRACE=(--layers 2 --experts 16 --tokens 512)
    MODEL=(--hidden-size 32 --intermediate-size 16 --top-k 4 --budgets 1,2)
    RUN=(--batches 3 --max-seconds-per-policy 2)
    LIMIT=120
else
    D=${D:-$(nvidia-smi -L | wc -l)}
    DEVICE=cuda:0
    TRACE=(--layers 48 --experts 128 --tokens 4096)
    # 2 ranks hold ~29 GB of experts each; R = 8 and 16 are a sixth and a third of EPLB's 48.
    MODEL=(--preset qwen3-30b-a3b --budgets 8,16)
    RUN=(--batches 10 --max-seconds-per-policy ${MAX_SECONDS:-8})
    LIMIT=${LIMIT:-420}
fi
echo "== $(date -u +%FT%TZ) $D real ranks vs $D emulated ranks (binaries in $BIN, results in $R)"
"$BIN/moectl" bench trace "${TRACE[@]}" --batches 16 --top-k 8 --skew 0.3 --drift 0.3 --seed "$SEED" \
    --out "$R/trace.json" || exit 1

if [ -n "${TOKENS:-}" ]; then SIZES=(--tokens "$TOKENS"); else SIZES=(--regime decode,prefill); fi
status=0
for mode in ${MODES:-emulated workers}; do
    t0=$SECONDS
    echo "== $mode"
    envs=()
    case $mode in
        workers-heap) envs=(MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=268435456) ;;
    esac
    env "${envs[@]}" timeout --signal=TERM --kill-after=15 "$LIMIT" "$BIN/moectl" bench policies \
        --load "$R/trace.json" "${MODEL[@]}" --gpus "$D" --nodes 1 --device "$DEVICE" \
        --mode "${mode%-heap}" "${SIZES[@]}" --seed "$SEED" "${RUN[@]}" --worker-bin "$BIN/moe-worker" \
        --work-dir "$R/$mode-workers" --out "$R/$mode.json" --markdown "$R/$mode.md" >"$R/$mode.log" 2>&1
    rc=$?
    echo "== $mode: exit $rc after $((SECONDS - t0)) s"
    grep -v 'INFO' "$R/$mode.log" | tail -n 30
    [ $rc = 0 ] || status=1
done
ls -la "$R"
exit $status
