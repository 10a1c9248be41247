#!/usr/bin/env bash
# The data plane on the GPU machine (issue "3 of 10"): GPU tests of the transports, the HF model
# through the MoE-layer API, and ranks as processes over CUDA IPC against emulated ranks.
#
# On the device machine, with moectl, libmoe_ep.so and the lib's test binary built here and
# stripped into .devbin/ (see docs/development.md, "GPU runs"):
#   OUT=/tmp/out benches/gpu/ep.sh
# Knobs: PARTS="tests hf ranks", WORLDS="4 8", LAYERS=16, BATCHES=10, MICRO=1,2.
set -uo pipefail
cd "$(dirname "$0")/../.."
B=${BIN:-.devbin}
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export MOE_KERNEL_CACHE_DIR=/tmp/moe-kernels
status=0
if [ "${MPS:-0}" = 1 ]; then
    # A private MPS control daemon (no GPU setting changes): kernels of the rank processes then
    # share the GPU concurrently instead of time-slicing between their contexts.
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d && echo "== MPS daemon started" || echo "== MPS daemon did not start"
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi
echo "== $(date -u +%FT%TZ) $(nvidia-smi -L | head -8 | tr '\n' ';')"
for part in ${PARTS:-tests hf ranks}; do
    t0=$SECONDS
    case $part in
    tests)
        "$B/moe_operator-test" ep::cuda --test-threads 1 --nocapture >"$OUT/gpu-tests.log" 2>&1
        rc=$?
        grep -E '^test |test result|skipping|panicked' "$OUT/gpu-tests.log" | tail -20 ;;
    hf)
        python3 benches/gpu/hf_model.py --moectl "$B/moectl" --lib "$B/libmoe_ep.so" --work /tmp/hf \
            --ranks "${HF_RANKS:-1,2,4}" --out "$OUT/hf-model.json" >"$OUT/hf-model.log" 2>&1
        rc=$?
        grep -v Warning "$OUT/hf-model.log" | tail -20 ;;
    ranks)
        "$B/moectl" bench trace --layers 48 --experts 128 --tokens 4096 --batches 16 --top-k 8 \
            --skew 0.3 --drift 0.3 --seed 1 --out /tmp/trace-qwen.json >/dev/null || exit 1
        rc=0
        for D in ${WORLDS:-4 8}; do
            timeout 560 "$B/moectl" bench policies --load /tmp/trace-qwen.json --preset qwen3-30b-a3b \
                --layers "${LAYERS:-16}" --gpus "$D" --budgets 8 --policies "${POLICIES:-eplb,craft}" \
                --device cuda:0 --mode ranks --transport ipc --regime decode,prefill \
                --batches "${BATCHES:-10}" --warmup 2 --seed 1 --work-dir "/tmp/ranks-$D" --micro-batches "${MICRO:-1,2}" \
                --out "$OUT/ranks-ipc-$D.json" --markdown "$OUT/ranks-ipc-$D.md" >"$OUT/ranks-ipc-$D.log" 2>&1
            r=$?
            [ $r = 0 ] || rc=$r
            grep -v ' INFO ' "$OUT/ranks-ipc-$D.log" | tail -12
            [ $r = 0 ] || for f in /tmp/ranks-$D/rank-*.log; do echo "-- $f"; tail -5 "$f"; done
        done ;;
    esac
    echo "== $part: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || status=1
done
exit $status
