#!/usr/bin/env bash
# The local demo: real CPU moe-workers serve a synthetic checkpoint in the Qwen3-MoE layout, skewed
# traffic is routed to them from real OLMoE routing counts, the per-expert load is scraped from their
# /metrics, a CRAFT plan is made from it and rolled out in place (PUT /v1/plan, one worker at a time),
# and the same traffic runs again. It prints a summary and writes an HTML report.
#
#   scripts/demo.sh            # ends by itself and cleans up
#   MOE_DEMO_OUT=dir scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${MOE_DEMO_OUT:-target/demo}
BATCHES=${MOE_DEMO_BATCHES:-60}
TOKENS=${MOE_DEMO_TOKENS:-512}
TOKEN=demo-admin-token
rm -rf "$OUT" && mkdir -p "$OUT"
step() { printf '\n==> %s\n' "$*"; }
pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

step "building moectl and moe-worker (release)"
cargo build --release --bin moectl --bin moe-worker
BIN=target/release

step "writing a synthetic checkpoint (Qwen3-MoE layout: 3 MoE layers x 64 experts, top-8)"
$BIN/moectl gen-checkpoint --family qwen3-moe --out "$OUT/ckpt" --layers 3 --experts 64 --top-k 8 \
    --hidden 256 --intermediate 128 --shards 2

step "turning the real OLMoE arxiv routing counts (layers 0, 7, 15) into a 3-layer trace"
python3 - "$OUT/olmoe-3layer.trace.json" <<'PY'
import json, sys
src = json.load(open("examples/traces/olmoe-arxiv.json"))
json.dump({"format": "moe-load-trace/v1", "experts": src["num_experts"], "layers": [0, 1, 2],
           "source": "OLMoE-1B-7B arxiv routing counts, layers 0/7/15 (Apache-2.0)",
           "batches": [{"tokens": src["counts"]}]}, open(sys.argv[1], "w"))
PY

step "initial plan: contiguous placement, no replicas (what a deployment starts with)"
$BIN/moectl plan --load "$OUT/olmoe-3layer.trace.json" --model "$OUT/ckpt/config.json" \
    --gpus 4 --nodes 2 --algo none --out "$OUT/plan-0.json"

step "starting 2 workers (2 nodes x 2 GPU ranks, CPU backend)"
for n in 0 1; do
    MOE_ADMIN_TOKEN=$TOKEN $BIN/moe-worker --plan "$OUT/plan-0.json" --checkpoint "$OUT/ckpt" \
        --node $n --gpus-per-node 2 --device cpu \
        --listen 127.0.0.1:$((19400 + 10 * n)) --metrics-listen 127.0.0.1:$((19401 + 10 * n)) \
        --admin-listen 127.0.0.1:$((19402 + 10 * n)) >"$OUT/worker-$n.log" 2>&1 &
    pids+=($!)
done
for n in 0 1; do
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$((19401 + 10 * n))/readyz" >/dev/null && break
        sleep 0.2
    done
    curl -sf "http://127.0.0.1:$((19401 + 10 * n))/readyz" >/dev/null || { cat "$OUT/worker-$n.log"; exit 1; }
done
echo "workers ready"
WORKERS=127.0.0.1:19400,127.0.0.1:19410

step "generation 0: skewed traffic on the initial plan, while the load is observed from /metrics"
$BIN/moectl observe --metrics 127.0.0.1:19401,127.0.0.1:19411 --layers 0,1,2 --experts 64 \
    --interval 1 --intervals 3 --out "$OUT/observed.trace.json" &
obs=$!
$BIN/moectl loadgen --plan "$OUT/plan-0.json" --workers $WORKERS --load "$OUT/olmoe-3layer.trace.json" \
    --batches "$BATCHES" --tokens "$TOKENS" --json >"$OUT/loadgen-0.json"
wait $obs

step "planning with CRAFT from the observed load (R = 4 extra expert slots per GPU)"
$BIN/moectl plan --load "$OUT/observed.trace.json" --model "$OUT/ckpt/config.json" --gpus 4 --nodes 2 \
    --algo craft --replicas-per-gpu 4 --previous "$OUT/plan-0.json" --out "$OUT/plan-1.json" \
    --heatmap "$OUT/heatmap.svg"
HASH=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["hash"])' "$OUT/plan-1.json")

step "rolling out in place, one worker at a time (maxUnavailable 1)"
for n in 0 1; do
    curl -sf -X PUT -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
        --data-binary @"$OUT/plan-1.json" "http://127.0.0.1:$((19402 + 10 * n))/v1/plan" >/dev/null
    curl -sf "http://127.0.0.1:$((19401 + 10 * n))/metrics" | grep -q "moe_worker_plan_info{hash=\"$HASH\"} 1" \
        || { echo "worker $n does not report plan $HASH"; exit 1; }
    echo "worker $n serves plan ${HASH:0:12}"
done

step "generation 1: the same traffic on the CRAFT plan"
$BIN/moectl loadgen --plan "$OUT/plan-1.json" --workers $WORKERS --load "$OUT/olmoe-3layer.trace.json" \
    --batches "$BATCHES" --tokens "$TOKENS" --json >"$OUT/loadgen-1.json"

step "summary"
python3 scripts/demo_report.py "$OUT"
