#!/usr/bin/env bash
# Policy throughput testbed on one GPU (issue 6): every replication policy (none, placement, EPLB
# with one redundant expert per GPU per layer, CRAFT at two budgets) planned, then run on real
# expert FFN compute with D emulated expert-parallel ranks (layer time = slowest rank), on skewed
# synthetic traces, in a decode-like (16 tokens per expert) and a prefill-like (256) regime:
#   1. Qwen3-30B-A3B shape: 48 MoE layers x 128 experts, H 2048, I 768, top-8; 32 ranks on 4 nodes;
#      all 6,144 experts resident (~58 GB bf16, synthetic weights generated in memory).
#   2. DeepSeek-V3 shape, first 4 MoE layers: 256 experts, H 7168, I 2048, top-8; 64 ranks on 8
#      nodes (~90 GB of bf16 weights resident).
# Each model runs both regimes in one process (weights generated and uploaded once). About 3-4
# minutes of device time on an H200; every run has a time limit.
#
# On the device machine (no Rust; moectl and moe-worker prebuilt into .devrun/):
#   benches/gpu/policies.sh                    # results under $OUT/policies/
# Test-sized dry run on the CPU (tiny shapes, same commands):
#   MOE_BENCH_DRY=1 BIN=target/debug OUT=/tmp/policies-dry benches/gpu/policies.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.devrun}
OUT=${OUT:?set OUT to the output directory}
R="$OUT/policies"
mkdir -p "$R"
DEVICE=${DEVICE:-cuda:0}
SEED=${SEED:-1}

if [ "${MOE_BENCH_DRY:-0}" = 1 ]; then
    DEVICE=cpu
    # Tiny stand-ins with the same structure (layers, ranks, nodes scaled down).
    Q_TRACE=(--layers 2 --experts 16 --tokens 512)
    Q_MODEL=(--hidden-size 32 --intermediate-size 16 --top-k 4 --gpus 8 --nodes 2 --budgets 1,2)
    D_TRACE=(--layers 2 --experts 32 --tokens 512)
    D_MODEL=(--hidden-size 48 --intermediate-size 16 --top-k 4 --model-layers 6 --first-moe-layer 3 --layers 2
        --gpus 16 --nodes 4 --budgets 1,2)
    RUN=(--batches 3 --max-seconds-per-policy 2)
    LIMIT=120
else
    Q_TRACE=(--layers 48 --experts 128 --tokens 4096)
    Q_MODEL=(--preset qwen3-30b-a3b --gpus 32 --nodes 4 --budgets 8,16)
    D_TRACE=(--layers 4 --experts 256 --tokens 8192)
    D_MODEL=(--preset deepseek-v3 --layers 4 --gpus 64 --nodes 8 --budgets 1,2)
    # Decode batches are quick (20 run); prefill stops after ~8 s per policy (a few batches).
    RUN=(--batches 20 --max-seconds-per-policy 8)
    LIMIT=200
fi

echo "== $(date -u +%FT%TZ) policy testbed on $DEVICE (binaries in $BIN, results in $R)"
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
"$BIN/moectl" --version

# Skewed traces (seeded; max/mean expert load per layer median ~3.7x, as in real routing).
"$BIN/moectl" bench trace "${Q_TRACE[@]}" --batches 16 --top-k 8 --skew 0.3 --drift 0.3 --seed "$SEED" \
    --out "$R/qwen3-30b-a3b.trace.json" || exit 1
"$BIN/moectl" bench trace "${D_TRACE[@]}" --batches 16 --top-k 8 --skew 0.3 --drift 0.3 --seed "$((SEED + 1))" \
    --out "$R/deepseek-v3-4layers.trace.json" || exit 1

status=0
run() {
    local name=$1
    shift
    local t0=$SECONDS
    echo "== $name: moectl bench policies $*"
    timeout --signal=TERM --kill-after=15 "$LIMIT" "$BIN/moectl" bench policies "$@" \
        --regime decode,prefill --seed "$SEED" "${RUN[@]}" --device "$DEVICE" \
        --out "$R/$name.json" --markdown "$R/$name.md" >"$R/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    grep -v '^\s*$' "$R/$name.log" | grep -v 'INFO' | tail -n 40
    [ $rc = 0 ] || status=1
}

run qwen3-30b-a3b --load "$R/qwen3-30b-a3b.trace.json" "${Q_MODEL[@]}"
run deepseek-v3-4layers --load "$R/deepseek-v3-4layers.trace.json" "${D_MODEL[@]}"

echo "== $(date -u +%FT%TZ) done; files:"
ls -la "$R"
exit $status
