#!/usr/bin/env bash
# The local demo, through the operator and its Helm chart on the local control plane (e2e/):
#
#   build -> e2e/build.sh (cached) -> e2e/cluster.sh up -> helm install charts/moe-operator ->
#   moe-operator (a local process under the chart ServiceAccount's token) -> moectl gen-checkpoint ->
#   kubectl apply examples/demo.yaml (+ local-run patches) -> moectl loadgen with the OLMoE arxiv
#   routing counts, in chunks, routed by whichever plan every worker confirms -> the operator scrapes
#   the workers, plans with CRAFT and rolls the plan out in place -> report (HTML + JSON).
#
#   scripts/demo.sh            ends by itself (a few minutes once built) and cleans up
#   scripts/demo.sh --short    fewer, smaller batches (what scripts/test.sh runs)
#   scripts/demo.sh --follow   keeps driving traffic until Ctrl-C; the report is rewritten every chunk
#   scripts/demo.sh --out DIR  where the report goes (default target/demo)
#
# Nothing here is a container: there is no image runtime on the local plane, so the operator runs as
# a local process with the chart's ServiceAccount token (the chart's RBAC is all it gets) and the
# worker pods are `moe-worker` processes started by e2e/pods on their loopback pod IPs.
# Knobs (environment): MOE_DEMO_BATCHES, MOE_DEMO_TOKENS (per chunk), MOE_DEMO_AFTER_CHUNKS,
# MOE_DEMO_DEADLINE (s), MOE_DEMO_INTERVAL, MOE_DEMO_WINDOW, MOE_DEMO_COOLDOWN, MOE_DEMO_OPERATOR_LOG,
# MOE_DEMO_PREBUILT=1 (use target/debug's binaries as they are, e.g. right after `cargo test`).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

OUT=target/demo
SHORT=0
FOLLOW=0
while (($#)); do
    case "$1" in
        --short) SHORT=1 ;;
        --follow) FOLLOW=1 ;;
        --out) OUT=${2:?--out needs a directory}; shift ;;
        -h | --help) sed -n '2,20p' "$REPO/scripts/demo.sh" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if ((SHORT)); then
    BATCHES=${MOE_DEMO_BATCHES:-6}    # batches per loadgen chunk
    TOKENS=${MOE_DEMO_TOKENS:-256}    # tokens per batch
    AFTER=${MOE_DEMO_AFTER_CHUNKS:-3} # chunks on the new plan before ending
    DEADLINE=${MOE_DEMO_DEADLINE:-150}
    COOLDOWN=${MOE_DEMO_COOLDOWN:-30s}
else
    BATCHES=${MOE_DEMO_BATCHES:-10}
    TOKENS=${MOE_DEMO_TOKENS:-512}
    AFTER=${MOE_DEMO_AFTER_CHUNKS:-8}
    DEADLINE=${MOE_DEMO_DEADLINE:-300}
    COOLDOWN=${MOE_DEMO_COOLDOWN:-60s}
fi
# Local-run overrides of examples/demo.yaml, so the loop closes within a minute; printed below. The
# cooldown counts from the initial plan (made when the MoEDeployment is created), so it also sets how
# long the skewed traffic runs on the initial plan before the operator may replace it.
INTERVAL=${MOE_DEMO_INTERVAL:-2s}
WINDOW=${MOE_DEMO_WINDOW:-8}
NAME=demo
NS=default
OP_NS=moe-system
RELEASE=moe-operator

T0=$(date +%s)
step() { printf '\n==> [%3ds] %s\n' $(($(date +%s) - T0)) "$*"; }
die() { echo "demo.sh: $*" >&2; exit 1; }

# The output dir is replaced, so only an empty one or an earlier demo's (marked) is accepted.
if [[ -d "$OUT" && -n "$(ls -A "$OUT")" && ! -f "$OUT/.moe-demo" && ! -f "$OUT/report.html" ]]; then
    die "$OUT exists and is not an earlier demo's output: give --out a new or empty directory"
fi
rm -rf "$OUT" && mkdir -p "$OUT/plans" "$OUT/loadgen" "$OUT/logs" && touch "$OUT/.moe-demo"
OUT=$(cd "$OUT" && pwd)
# A fresh state dir per run: two demos (or a demo and the e2e tests) never share a plane.
STATE=$(mktemp -d "${TMPDIR:-/tmp}/moe-demo.XXXXXX")
OPERATOR_PID=
LOADGEN_PID=
CLUSTER_UP=0
FINISHED=0

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [[ -n "$LOADGEN_PID" ]] && kill "$LOADGEN_PID" 2>/dev/null && wait "$LOADGEN_PID" 2>/dev/null
    if [[ -n "$OPERATOR_PID" ]]; then
        kill "$OPERATOR_PID" 2>/dev/null
        wait "$OPERATOR_PID" 2>/dev/null
    fi
    # The report from whatever ran (also after Ctrl-C in --follow mode).
    if ((!FINISHED)) && [[ -s "$OUT/timeline.jsonl" ]]; then
        python3 scripts/demo_report.py "$OUT" >/dev/null 2>&1 && echo "report (partial run): $OUT/report.html"
    fi
    cp "$STATE"/operator.log "$OUT/logs/" 2>/dev/null
    for d in "$STATE"/pods/*/; do
        [[ -f "$d/log" ]] && cp "$d/log" "$OUT/logs/$(basename "$d").log"
    done
    cp "$STATE"/logs/*.log "$OUT/logs/" 2>/dev/null
    if ((CLUSTER_UP)); then
        echo "==> stopping the local control plane and its pods"
        MOE_E2E_STATE="$STATE" e2e/cluster.sh down 2>&1 | tail -n 1
    fi
    if ((rc == 0 || rc == 130)); then
        rm -rf "$STATE"
    else
        echo "demo.sh: failed (exit $rc); logs in $OUT/logs, plane state kept in $STATE" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- build -------------------------------------------------------------------------------------------
# The test profile (debug, our crate at opt-level 1, dependencies at 2). Why not release: the
# measurements are in docs/development.md ("Build profile"). `cargo test` builds these binaries into the same place, but with
# the dev-dependencies' features, so a plain build would compile the crate again (3-4 min on 2 cores):
# scripts/test.sh, right after `cargo test`, sets MOE_DEMO_PREBUILT=1 to use its binaries.
BIN=$REPO/target/debug
if [ "${MOE_DEMO_PREBUILT:-0}" = 1 ] && [ -x "$BIN/moectl" ] && [ -x "$BIN/moe-worker" ] \
    && [ -x "$BIN/moe-operator" ] && [ -x "$BIN/moe-e2e-pods" ]; then
    step "using the binaries cargo test just built in $BIN (MOE_DEMO_PREBUILT=1)"
else
    step "building moectl, moe-worker, moe-operator and moe-e2e-pods (cargo build --profile test)"
    cargo build --bins --profile test
fi
step "local control-plane binaries: e2e/build.sh (cached by version pins; about 25 min cold on 2 cores)"
e2e/build.sh
K8S_BIN=$(e2e/build.sh --bin-dir)
kubectl() { "$K8S_BIN/kubectl" --kubeconfig "$STATE/kubeconfig" "$@"; }
helm() { "$K8S_BIN/helm" --kubeconfig "$STATE/kubeconfig" "$@"; }

# --- cluster, chart, operator -------------------------------------------------------------------------
step "starting the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok: 2 fake 8-GPU nodes) in $STATE"
CLUSTER_UP=1
# Our build first on PATH: process-backed pods run `moe-worker` from there.
PATH="$BIN:$PATH" MOE_E2E_STATE="$STATE" MOE_E2E_NODES=2 MOE_E2E_PODS_BIN="$BIN/moe-e2e-pods" e2e/cluster.sh up
kubectl get nodes -L nvidia.com/gpu.product

step "helm install $RELEASE charts/moe-operator (the CRD comes from the chart's crds/)"
helm install "$RELEASE" charts/moe-operator --namespace "$OP_NS" --create-namespace --wait=false
kubectl wait --for=condition=Established crd/moedeployments.moe.craft.dev --timeout=60s
# There is no image runtime here: the chart's Deployment is scaled to 0 and the same binary runs as a
# local process with the chart ServiceAccount's token instead, so it acts with exactly the chart's RBAC.
kubectl -n "$OP_NS" scale "deployment/$RELEASE" --replicas=0
TOKEN=$(kubectl -n "$OP_NS" create token "$RELEASE" --duration=2h)
API=$(MOE_E2E_STATE="$STATE" e2e/cluster.sh env | sed -n 's/^MOE_E2E_API=//p')
cat >"$STATE/operator.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "$API", certificate-authority-data: $(base64 -w0 <"$STATE/pki/ca.crt")}
users:
- name: $RELEASE
  user: {token: "$TOKEN"}
contexts:
- name: local
  context: {cluster: local, user: $RELEASE}
current-context: local
EOF
chmod 600 "$STATE/operator.kubeconfig"
step "running moe-operator as a local process under ServiceAccount $OP_NS/$RELEASE (log: $OUT/logs/operator.log)"
KUBECONFIG="$STATE/operator.kubeconfig" POD_NAME=demo-operator RUST_LOG=${MOE_DEMO_OPERATOR_LOG:-info,kube=warn} \
    "$BIN/moe-operator" run --metrics-listen 127.0.0.1:0 --health-listen 127.0.0.1:0 \
    --leader-election-namespace "$OP_NS" --log-format text \
    --allow-host-path-prefix "$OUT" >"$STATE/operator.log" 2>&1 &
OPERATOR_PID=$!
echo "moe-operator pid $OPERATOR_PID; RBAC check: $(kubectl auth can-i patch moedeployments/status \
    --as "system:serviceaccount:$OP_NS:$RELEASE" -n "$NS") to patch moedeployments/status, $(kubectl auth can-i \
    delete nodes --as "system:serviceaccount:$OP_NS:$RELEASE") to delete nodes"

# --- checkpoint and MoEDeployment -----------------------------------------------------------------------
kubectl create --dry-run=client -o json -f examples/demo.yaml >"$OUT/demo.yaml.json"
CKPT=$OUT/checkpoint
read -r LAYERS FIRST EXPERTS TOPK HIDDEN INTER < <(python3 -c '
import json, sys
m = json.load(open(sys.argv[1]))["spec"]["model"]
print(m["layers"], m.get("firstMoeLayer", 0), m["experts"], m["topK"], m["hiddenSize"], m["expertIntermediateSize"])
' "$OUT/demo.yaml.json")
step "writing a synthetic checkpoint (Qwen3-MoE layout, $LAYERS layers from $FIRST on MoE, $EXPERTS experts, top-$TOPK, hidden $HIDDEN, expert intermediate $INTER)"
"$BIN/moectl" gen-checkpoint --family qwen3-moe --out "$CKPT" --layers "$LAYERS" --first-moe-layer "$FIRST" \
    --experts "$EXPERTS" --top-k "$TOPK" --hidden "$HIDDEN" --intermediate "$INTER" --shards 2
du -sh "$CKPT"

TRACE=examples/traces/olmoe-arxiv.json
step "applying examples/demo.yaml, patched for this machine"
cat <<EOF
  metadata.annotations[moe.craft.dev/process-backed]: "true"   (e2e/pods runs the worker pods as local processes)
  spec.model.checkpoint.volume.hostPath.path: $CKPT
  spec.metrics.interval: $INTERVAL, spec.replication.window: $WINDOW, spec.replication.cooldown: $COOLDOWN
      (so the loop closes within a minute; the sample's own values suit a real cluster)
EOF
python3 - "$OUT/demo.yaml.json" "$OUT/demo.applied.json" "$CKPT" "$INTERVAL" "$WINDOW" "$COOLDOWN" <<'PY'
import json, sys
src, dst, ckpt, interval, window, cooldown = sys.argv[1:]
md = json.load(open(src))
md["metadata"].setdefault("annotations", {})["moe.craft.dev/process-backed"] = "true"
md["spec"]["model"]["checkpoint"]["volume"]["hostPath"]["path"] = ckpt
md["spec"]["metrics"]["interval"] = interval
md["spec"]["replication"]["window"] = int(window)
md["spec"]["replication"]["cooldown"] = cooldown
json.dump(md, open(dst, "w"), indent=2)
PY
kubectl apply -f "$OUT/demo.applied.json"

md_json() { kubectl -n "$NS" get moed "$NAME" -o json; }
step "waiting for the operator: initial plan, worker pods Running (moe-worker processes), Ready"
ready=0
for _ in $(seq 1 240); do
    if md_json >"$STATE/md.json" 2>/dev/null && python3 - "$STATE/md.json" <<'PY'; then ready=1; break; fi
import json, sys
st = json.load(open(sys.argv[1])).get("status", {})
ok = any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))
sys.exit(0 if ok else 1)
PY
    sleep 0.5
done
((ready)) || { kubectl -n "$NS" get moed,pods -o wide; die "MoEDeployment $NAME did not become Ready in 120 s"; }
kubectl -n "$NS" get moed "$NAME"
kubectl -n "$NS" get pods -l "moe.craft.dev/deployment=$NAME" -o wide
kubectl -n "$NS" get pods -l "moe.craft.dev/deployment=$NAME" -o json >"$STATE/pods.json"
WORKERS=$(python3 - "$STATE/pods.json" <<'PY'
import json, sys
pods = json.load(open(sys.argv[1]))["items"]
pods.sort(key=lambda p: int(p["metadata"]["labels"]["moe.craft.dev/node-rank"]))
print(",".join(p["status"]["podIP"] + ":9400" for p in pods))
PY
)
echo "worker dispatch addresses (node order): $WORKERS"

# --- traffic and the loop --------------------------------------------------------------------------------
# The routing plan: the plan ConfigMap's, once the status says every worker confirmed that hash
# (until then the previous one: a worker keeps serving the plan it replaced for a grace period).
routing_plan() {
    kubectl -n "$NS" get configmap "$NAME-plan" -o json >"$STATE/cm.json" || return 1
    md_json >"$STATE/md.json" || return 1
    python3 - "$STATE/cm.json" "$STATE/md.json" "$OUT/plans" <<'PY'
import json, os, sys
cm, md, plans = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
st = md.get("status", {})
h = cm["data"]["hash"]
nodes = md["spec"]["topology"]["nodes"]
ready = any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))
if st.get("plan", {}).get("hash") == h and ready and st.get("workers", {}).get("onCurrentPlan") == nodes:
    path = os.path.join(plans, h + ".json")
    if not os.path.exists(path):
        open(path, "w").write(cm["data"]["plan.json"])
    print(path)
PY
}

step "driving skewed traffic: moectl loadgen, $BATCHES batches x $TOKENS tokens per chunk, from the OLMoE-1B-7B arxiv routing counts ($TRACE)"
echo "  balancedness = mean over layers and batches of (mean rows per GPU / max rows per GPU), as the router saw it"
echo "  gen = plan generation (0 = the operator's initial plan); operator = status.observed.balancedness (plan in force, replayed on the scraped window)"
printf '%6s %4s %-13s %-10s %13s %9s %10s  %s\n' time gen plan algorithm balancedness tokens/s operator "status"
PLAN=
GEN=-1
declare -A GEN_OF=()
chunk=0
after=0
CLOSED=1
T_TRAFFIC=$(date +%s)
: >"$OUT/timeline.jsonl"
while :; do
    if p=$(routing_plan) && [[ -n "$p" && "$p" != "$PLAN" ]]; then
        PLAN=$p
        h=$(basename "$PLAN" .json)
        if [[ -z "${GEN_OF[$h]:-}" ]]; then
            GEN=$((GEN + 1))
            GEN_OF[$h]=$GEN
            if ((GEN > 0)); then
                printf '  ** plan generation %d (%s) rolled out on every worker: routing by it now\n' "$GEN" "${h:0:12}"
            fi
        fi
    fi
    [[ -n "$PLAN" ]] || die "no plan confirmed by every worker"
    h=$(basename "$PLAN" .json)
    t_start=$(date +%s.%N)
    "$BIN/moectl" loadgen --plan "$PLAN" --workers "$WORKERS" --load "$TRACE" --batches "$BATCHES" \
        --tokens "$TOKENS" --seed "$chunk" --json >"$OUT/loadgen/$chunk.json" 2>"$STATE/loadgen.err" &
    LOADGEN_PID=$!
    wait "$LOADGEN_PID" || { cat "$STATE/loadgen.err" >&2; die "loadgen failed (chunk $chunk)"; }
    LOADGEN_PID=
    t_end=$(date +%s.%N)
    md_json >"$STATE/md.json"
    python3 - "$OUT" "$chunk" "${GEN_OF[$h]}" "$PLAN" "$t_start" "$t_end" "$T_TRAFFIC" "$STATE/md.json" <<'PY'
import json, sys
out, chunk, gen, plan_path, t0, t1, tt, md_path = sys.argv[1:]
rep = json.load(open(f"{out}/loadgen/{chunk}.json"))
plan = json.load(open(plan_path))
st = json.load(open(md_path)).get("status", {})
row = {"chunk": int(chunk), "generation": int(gen), "planHash": plan["hash"], "algorithm": plan["algorithm"],
       "replicasPerGpu": plan["replicasPerGpu"], "start": float(t0) - float(tt), "end": float(t1) - float(tt),
       "balancedness": rep["balancedness"], "tokensPerSecond": rep["tokensPerSecond"],
       "stepP50": rep["stepSeconds"]["p50"], "failedRequests": rep["failedRequests"], "tokens": rep["tokens"],
       "expertRows": rep["expertRows"], "status": {k: st.get(k) for k in ("plan", "observed", "workers", "rollout")}}
with open(f"{out}/timeline.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
obs = (st.get("observed") or {}).get("balancedness")
sp = st.get("plan") or {}
note = f"status plan {sp.get('shortHash', '?')} ({sp.get('algorithm', '?')}), workers on it {(st.get('workers') or {}).get('onCurrentPlan', '?')}"
if sp.get("hash") != plan["hash"]:
    note += "  <- the operator has a new plan"
print(f"{row['end']:5.0f}s {gen:>4} {plan['hash'][:12]:<13} {plan['algorithm']:<10} {row['balancedness']:13.4f} "
      f"{row['tokensPerSecond']:9.0f} {('%.4f' % obs) if obs is not None else '-':>10}  {note}"
      + (f"  FAILED REQUESTS {rep['failedRequests']}" if rep["failedRequests"] else ""))
PY
    chunk=$((chunk + 1))
    if ((FOLLOW)); then
        python3 scripts/demo_report.py "$OUT" --quiet
        continue
    fi
    if ((GEN > 0)); then
        after=$((after + 1))
        ((after >= AFTER)) && break
    elif (($(date +%s) - T_TRAFFIC > DEADLINE)); then
        echo "demo.sh: no new plan was rolled out within ${DEADLINE}s of traffic (see $OUT/logs/operator.log)" >&2
        CLOSED=0
        break
    fi
done

step "the operator's view"
kubectl -n "$NS" get moed "$NAME"
kubectl -n "$NS" get events --field-selector "involvedObject.name=$NAME" --sort-by=.metadata.creationTimestamp \
    -o custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message | tail -n 8

step "summary"
python3 scripts/demo_report.py "$OUT"
FINISHED=1
((CLOSED)) || exit 1
