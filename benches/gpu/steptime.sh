#!/usr/bin/env bash
# The pre-registered step-time benchmark (issue "8 of 10"): `moectl bench steptime`, the declared
# policies (src/bench/steptime.rs: ours = CRAFT at a sixth of EPLB's memory, planned for step
# time, per-batch dispatch; baselines none, EPLB fixed shares, EPLB with our dispatch, CRAFT for
# balancedness) on five seeded traces, decode and prefill, Qwen3-30B-A3B shape on 32 emulated
# ranks of 4 nodes, all in one process on one H200 (weights resident once).
#   BIN=.devbin OUT=... benches/gpu/steptime.sh
# Dry run on the CPU (tiny shapes): MOE_BENCH_DRY=1 BIN=target/debug OUT=/tmp/st benches/gpu/steptime.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.devbin}
OUT=${OUT:?set OUT to the output directory}
SEEDS=${SEEDS:-1,2,3,4,5}
if [ "${MOE_BENCH_DRY:-0}" = 1 ]; then
    ARGS=(--preset qwen3-30b-a3b --layers 2 --hidden-size 32 --intermediate-size 16 --gpus 8 --nodes 2
        --regime decode --batches 2 --device cpu)
else
    ARGS=(--preset qwen3-30b-a3b --gpus 32 --nodes 4 --batches 10 --max-seconds-per-policy 3 --device cuda:0)
fi
echo "== $(date -u +%FT%TZ) step-time benchmark, seeds $SEEDS"
[ "${MOE_BENCH_DRY:-0}" = 1 ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout --signal=TERM --kill-after=15 "${LIMIT:-420}" \
    "$BIN/moectl" bench steptime "${ARGS[@]}" --seeds "$SEEDS" --out "$OUT/steptime" 2>"$OUT/steptime.log"
rc=$?
grep -v INFO "$OUT/steptime.log" | tail -n 60
echo "== $(date -u +%FT%TZ) exit $rc"
exit $rc
