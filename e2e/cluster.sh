#!/usr/bin/env bash
# A local Kubernetes control plane on loopback, from the binaries e2e/build.sh caches:
# etcd, kube-apiserver (RBAC, service-account signing keys, client-certificate admin), kube-controller-manager,
# kube-scheduler, kwok with fake GPU nodes, and moe-e2e-pods (process-backed pods).
#
#   e2e/cluster.sh up       start (a no-op when this state dir's plane is already up and healthy)
#   e2e/cluster.sh down     stop every process this state dir started, free its ports
#   e2e/cluster.sh status   print each component's state; exit 1 unless everything is up
#   e2e/cluster.sh env      print KEY=VALUE lines (KUBECONFIG, ...): `export $(e2e/cluster.sh env)`
#
# Environment:
#   MOE_E2E_STATE      state directory (default <repo>/.e2e/${MOE_E2E_NAME:-default}); two runs with different
#                      state dirs never collide: ports are chosen free at `up`, pod IPs from a per-run range
#   MOE_E2E_NODES      number of fake GPU nodes (default 2)
#   MOE_E2E_GPU_PRODUCT / MOE_E2E_GPU_MEMORY_MIB   node labels (default NVIDIA-H200 / 143771)
#   MOE_E2E_BIN        directory with the control-plane binaries (default: e2e/build.sh's cache)
#   MOE_E2E_PODS_BIN   path of moe-e2e-pods (default: `cargo build --bin moe-e2e-pods` in this repo)
#   MOE_E2E_UP_TIMEOUT seconds to wait for each component to become ready (default 120)
#   MOE_E2E_IMAGE_ENTRYPOINTS  space-separated REPOSITORY=PROGRAM: containers of these images without a
#                      command run PROGRAM from PATH (default: the chart's operator image runs moe-operator)
#   MOE_E2E_AUDIT_GROUPS  comma-separated user groups whose requests the API server's audit log records
#                      (level Metadata, $STATE/logs/audit.log; default system:serviceaccounts:moe-system,
#                      the operator's namespace in the tests); empty: no audit log
set -euo pipefail

E2E_DIR="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$E2E_DIR/.." && pwd)"
STATE="${MOE_E2E_STATE:-$REPO/.e2e/${MOE_E2E_NAME:-default}}"
NODES="${MOE_E2E_NODES:-2}"
GPU_PRODUCT="${MOE_E2E_GPU_PRODUCT:-NVIDIA-H200}"
GPU_MEMORY_MIB="${MOE_E2E_GPU_MEMORY_MIB:-143771}"
UP_TIMEOUT="${MOE_E2E_UP_TIMEOUT:-120}"
IMAGE_ENTRYPOINTS="${MOE_E2E_IMAGE_ENTRYPOINTS-ghcr.io/moe-operator/moe-operator=moe-operator}"
AUDIT_GROUPS="${MOE_E2E_AUDIT_GROUPS-system:serviceaccounts:moe-system}"
# Start order; `down` stops in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok moe-e2e-pods)

die() { echo "cluster.sh: $*" >&2; exit 1; }
log() { echo "==> $*" >&2; }
now_ms() { date +%s%3N; }

STATE="$(realpath -m "$STATE")"
PKI="$STATE/pki"
KUBECONFIG_ADMIN="$STATE/kubeconfig"

# --- process bookkeeping -------------------------------------------------------------------------

# pid_of NAME: the pid from NAME's pidfile when that process is alive and is ours (its command line
# names this state dir, so a recycled pid is never taken for ours).
pid_of() {
    local f="$STATE/pids/$1.pid" pid
    [[ -f "$f" ]] || return 1
    pid="$(cat "$f")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$STATE" || return 1
    echo "$pid"
}

# start NAME BINARY ARGS...: runs it in its own session (process group = its pid), output to logs/NAME.log.
start() {
    local name="$1"; shift
    mkdir -p "$STATE/pids" "$STATE/logs"
    setsid "$@" > "$STATE/logs/$name.log" 2>&1 < /dev/null &
    echo $! > "$STATE/pids/$name.pid"
}

# stop_groups PID...: TERM each process group, then KILL what is left after 10 s.
stop_groups() {
    local pid i left
    (( $# )) || return 0
    for pid in "$@"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
    for i in $(seq 1 100); do
        left=0
        for pid in "$@"; do
            if kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null; then left=1; fi
        done
        (( left )) || return 0
        sleep 0.1
    done
    for pid in "$@"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
}

# wait_for WHAT CMD...: retries CMD until it succeeds or UP_TIMEOUT passes; names the log on failure.
wait_for() {
    local what="$1" logname="$2"; shift 2
    local deadline=$(( $(date +%s) + UP_TIMEOUT ))
    until "$@" > /dev/null 2>&1; do
        if [[ -n "$logname" ]] && ! pid_of "$logname" > /dev/null; then
            tail -n 20 "$STATE/logs/$logname.log" >&2 || true
            die "$logname exited while waiting for $what; log: $STATE/logs/$logname.log"
        fi
        if (( $(date +%s) >= deadline )); then
            [[ -n "$logname" ]] && tail -n 20 "$STATE/logs/$logname.log" >&2
            die "timed out after ${UP_TIMEOUT}s waiting for $what${logname:+; log: $STATE/logs/$logname.log}"
        fi
        sleep 0.2
    done
}

# --- configuration -------------------------------------------------------------------------------

bin_dir() {
    if [[ -n "${MOE_E2E_BIN:-}" ]]; then echo "$MOE_E2E_BIN"; return; fi
    "$E2E_DIR/build.sh" --bin-dir 2> /dev/null \
        || die "control-plane binaries are not built: run e2e/build.sh (takes a while the first time)"
}

# free_ports N: N distinct free TCP ports on 127.0.0.1 (held open together so they differ).
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

gen_pki() {
    mkdir -p "$PKI"
    cd "$PKI"
    # EC keys: generated in milliseconds, accepted by every component.
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.crt -days 3650 -subj "/CN=moe-e2e-ca" 2> /dev/null
    openssl ecparam -name prime256v1 -genkey -noout -out sa.key.ec 2> /dev/null
    openssl pkcs8 -topk8 -nocrypt -in sa.key.ec -out sa.key && rm sa.key.ec
    openssl ec -in sa.key -pubout -out sa.pub 2> /dev/null
    cert() { # NAME SUBJECT [SAN]
        openssl req -new "${ec[@]}" -keyout "$1.key" -out "$1.csr" -subj "$2" 2> /dev/null
        local ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=${3:+serverAuth,}clientAuth${3:+
subjectAltName=$3}"
        openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 3650 \
            -extfile <(echo "$ext") 2> /dev/null
        rm "$1.csr"
    }
    cert apiserver "/CN=kube-apiserver" \
        "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    cert admin "/O=system:masters/CN=moe-e2e-admin"
    # Front proxy (aggregation layer): its own CA, so aggregated API servers can trust request headers.
    openssl req -x509 "${ec[@]}" -keyout front-proxy-ca.key -out front-proxy-ca.crt -days 3650 \
        -subj "/CN=moe-e2e-front-proxy-ca" 2> /dev/null
    openssl req -new "${ec[@]}" -keyout front-proxy-client.key -out front-proxy-client.csr \
        -subj "/CN=front-proxy-client" 2> /dev/null
    openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key \
        -CAcreateserial -out front-proxy-client.crt -days 3650 \
        -extfile <(printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n') 2> /dev/null
    rm front-proxy-client.csr
    cert controller-manager "/CN=system:kube-controller-manager"
    cert scheduler "/CN=system:kube-scheduler"
    cd - > /dev/null
}

# kubeconfig FILE CERT_NAME: a kubeconfig for the API server with PKI/CERT_NAME.{crt,key} embedded.
kubeconfig() {
    cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: moe-e2e
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 < "$PKI/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 < "$PKI/$2.crt")
    client-key-data: $(base64 -w0 < "$PKI/$2.key")
contexts:
- name: moe-e2e
  context: {cluster: moe-e2e, user: $2}
current-context: moe-e2e
EOF
    chmod 600 "$1"
}

# Fake GPU nodes for kwok: GPUs as an extended resource, labels as NVIDIA's GPU feature discovery
# sets them, and a taint so only pods that tolerate it (GPU workers) land there. Each node gets its own
# pod CIDR inside 127.0.0.0/8, so pod IPs are loopback addresses a local process can bind.
nodes_yaml() {
    local i
    for (( i = 0; i < NODES; i++ )); do
        cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: gpu-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: gpu-node-$i
    node-role.kubernetes.io/agent: ""
    nvidia.com/gpu.present: "true"
    nvidia.com/gpu.count: "8"
    nvidia.com/gpu.product: "$GPU_PRODUCT"
    nvidia.com/gpu.memory: "$GPU_MEMORY_MIB"
spec:
  podCIDR: 127.$POD_OCTET.$i.0/24
  podCIDRs: [127.$POD_OCTET.$i.0/24]
  taints:
  - key: nvidia.com/gpu
    value: present
    effect: NoSchedule
status:
  allocatable: {cpu: "64", memory: 1Ti, pods: "110", nvidia.com/gpu: "8", ephemeral-storage: 1Ti}
  capacity: {cpu: "64", memory: 1Ti, pods: "110", nvidia.com/gpu: "8", ephemeral-storage: 1Ti}
  nodeInfo: {architecture: amd64, operatingSystem: linux, kubeletVersion: fake, kubeProxyVersion: fake}
EOF
    done
}

pods_bin() {
    if [[ -n "${MOE_E2E_PODS_BIN:-}" ]]; then
        [[ -x "$MOE_E2E_PODS_BIN" ]] || die "MOE_E2E_PODS_BIN=$MOE_E2E_PODS_BIN is not an executable"
        echo "$MOE_E2E_PODS_BIN"; return
    fi
    log "building moe-e2e-pods (cargo build --bin moe-e2e-pods)"
    (cd "$REPO" && cargo build --quiet --bin moe-e2e-pods >&2) || die "cargo build --bin moe-e2e-pods failed"
    echo "${CARGO_TARGET_DIR:-$REPO/target}/debug/moe-e2e-pods"
}

# Pod IPs are 127.<octet>.<node>.x. Each running plane claims its octet with a directory under
# OCTETS (mkdir is atomic); a claim whose plane no longer runs is taken over. claim_pod_octet FIRST
# prints the first free octet from FIRST on.
OCTETS="${TMPDIR:-/tmp}/moe-e2e-pod-octets"
claim_pod_octet() {
    local o i owner
    mkdir -p "$OCTETS"
    for (( i = 0; i < 253; i++ )); do
        o=$(( 2 + ($1 - 2 + i) % 253 ))
        if mkdir "$OCTETS/$o" 2> /dev/null; then
            echo "$STATE" > "$OCTETS/$o/state"; echo "$o"; return
        fi
        owner="$(cat "$OCTETS/$o/state" 2> /dev/null || true)"
        if [[ "$owner" == "$STATE" || ! -d "$owner" ]] \
            || ! MOE_E2E_STATE="$owner" "$E2E_DIR/cluster.sh" status > /dev/null 2>&1; then
            echo "$STATE" > "$OCTETS/$o/state"; echo "$o"; return
        fi
    done
    die "no free pod IP range (127.2-254.x.x): every one is claimed under $OCTETS"
}

release_pod_octet() {
    [[ -n "${POD_OCTET:-}" ]] || return 0
    if [[ "$(cat "$OCTETS/$POD_OCTET/state" 2> /dev/null)" == "$STATE" ]]; then
        rm -rf "${OCTETS:?}/$POD_OCTET"
    fi
}

# --- verbs ---------------------------------------------------------------------------------------

load_ports() {
    [[ -f "$STATE/ports.env" ]] || return 1
    # shellcheck source=/dev/null
    source "$STATE/ports.env"
}

healthy() {
    local c
    load_ports || return 1
    for c in "${COMPONENTS[@]}"; do pid_of "$c" > /dev/null || return 1; done
    curl -sf --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
        "https://127.0.0.1:$API_PORT/readyz" > /dev/null
}

cmd_down() {
    local c pid f i pids=()
    # All components at once (each takes a second or two to shut down gracefully); the launcher stops
    # its pod processes on TERM.
    for (( i = ${#COMPONENTS[@]} - 1; i >= 0; i-- )); do
        c="${COMPONENTS[$i]}"
        if pid="$(pid_of "$c")"; then pids+=("$pid"); fi
    done
    stop_groups "${pids[@]}"
    for c in "${COMPONENTS[@]}"; do rm -f "$STATE/pids/$c.pid"; done
    # Process-backed pods run in their own groups; moe-e2e-pods stops them on TERM, this is the backstop
    # for a launcher that was killed hard.
    for f in "$STATE"/pods/*/pid; do
        [[ -f "$f" ]] || continue
        pid="$(cat "$f")"
        if [[ -n "$pid" && -r "/proc/$pid/environ" ]] && tr '\0' '\n' < "/proc/$pid/environ" 2> /dev/null \
            | grep -qxF -- "MOE_E2E_STATE=$STATE"; then
            stop_groups "$pid"
        fi
        rm -f "$f"
    done
    if load_ports; then
        for c in $ETCD_PORT $ETCD_PEER_PORT $API_PORT $KCM_PORT $SCHED_PORT $KWOK_PORT; do
            for i in $(seq 1 50); do
                ss -Htln "sport = :$c" | grep -q . || break
                sleep 0.1
            done
        done
    fi
    release_pod_octet
    log "down: $STATE"
}

cmd_up() {
    if healthy; then log "already up: $STATE"; return 0; fi
    cmd_down 2> /dev/null
    local t0 bin pods
    bin="$(bin_dir)"
    pods="$(pods_bin)"
    # A failed `up` stops whatever it started; the logs stay for the post-mortem.
    trap 'if (( $? )); then log "up failed: stopping what was started (logs: $STATE/logs)"; cmd_down 2> /dev/null; fi' EXIT
    t0=$(now_ms)
    rm -rf "$STATE/etcd-data" "$PKI" "$STATE/pods" "$STATE/logs" "$STATE/pids"
    mkdir -p "$STATE"
    mkdir -p "$STATE/logs" "$STATE/pids" "$STATE/pods"

    read -r ETCD_PORT ETCD_PEER_PORT API_PORT KCM_PORT SCHED_PORT KWOK_PORT < <(free_ports 6)
    POD_OCTET="${MOE_E2E_POD_OCTET:-$(claim_pod_octet $(( 2 + API_PORT % 253 )))}"
    cat > "$STATE/ports.env" <<EOF
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
API_PORT=$API_PORT
KCM_PORT=$KCM_PORT
SCHED_PORT=$SCHED_PORT
KWOK_PORT=$KWOK_PORT
POD_OCTET=$POD_OCTET
EOF
    gen_pki
    kubeconfig "$KUBECONFIG_ADMIN" admin
    kubeconfig "$STATE/controller-manager.kubeconfig" controller-manager
    kubeconfig "$STATE/scheduler.kubeconfig" scheduler

    start etcd "$bin/etcd" --name moe-e2e --data-dir "$STATE/etcd-data" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "moe-e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
        --unsafe-no-fsync --quota-backend-bytes 2147483648 --log-level warn
    wait_for "etcd on 127.0.0.1:$ETCD_PORT" etcd curl -sf "http://127.0.0.1:$ETCD_PORT/health"
    local t_etcd=$(now_ms)

    # OwnerReferencesPermissionEnforcement (admission, below): setting blockOwnerDeletion needs update
    # on the owner's finalizers, as on clusters that enable it; the chart's RBAC must grant that.
    # Audit: only the requests of AUDIT_GROUPS, metadata only (who, verb, resource, namespace, name),
    # one line each once answered; the least-privilege test reads what the operator really used.
    local audit=()
    if [[ -n "$AUDIT_GROUPS" ]]; then
        {
            echo "apiVersion: audit.k8s.io/v1"
            echo "kind: Policy"
            echo "omitStages: [RequestReceived, ResponseStarted]"
            echo "rules:"
            echo "- level: Metadata"
            echo "  userGroups: [$(sed 's/[^,][^,]*/"&"/g' <<< "$AUDIT_GROUPS")]"
            echo "- level: None"
        } > "$STATE/audit-policy.yaml"
        audit=(--audit-policy-file "$STATE/audit-policy.yaml" --audit-log-path "$STATE/logs/audit.log"
            --audit-log-format json --audit-log-maxbackup 1)
    fi
    start kube-apiserver "$bin/kube-apiserver" \
        "${audit[@]}" \
        --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
        --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
        --client-ca-file "$PKI/ca.crt" \
        --requestheader-client-ca-file "$PKI/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
        --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
        --requestheader-extra-headers-prefix X-Remote-Extra- \
        --proxy-client-cert-file "$PKI/front-proxy-client.crt" --proxy-client-key-file "$PKI/front-proxy-client.key" \
        --authorization-mode RBAC \
        --enable-admission-plugins NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota,Priority,PodSecurity,OwnerReferencesPermissionEnforcement \
        --service-account-issuer "https://kubernetes.default.svc.cluster.local" \
        --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
        --api-audiences "https://kubernetes.default.svc.cluster.local" \
        --service-cluster-ip-range 10.96.0.0/16 \
        --endpoint-reconciler-type none \
        --allow-privileged=true --profiling=false \
        --cert-dir "$STATE/apiserver-certs"
    wait_for "kube-apiserver /readyz on 127.0.0.1:$API_PORT" kube-apiserver \
        curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
        "https://127.0.0.1:$API_PORT/readyz"
    local t_api=$(now_ms)

    # Only the controllers a fake cluster needs: workloads, garbage collection, namespaces, service
    # accounts and their tokens, and node lifecycle (lifts the not-ready taint once kwok marks a node Ready).
    local controllers=deployment-controller,replicaset-controller,statefulset-controller,daemonset-controller
    controllers+=,job-controller,cronjob-controller,garbage-collector-controller,namespace-controller
    controllers+=,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller
    controllers+=,node-lifecycle-controller,pod-garbage-collector-controller,resourcequota-controller
    controllers+=,disruption-controller,ttl-after-finished-controller,endpointslice-controller
    start kube-controller-manager "$bin/kube-controller-manager" \
        --kubeconfig "$STATE/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --cert-dir "$STATE/kcm-certs" \
        --leader-elect=false --use-service-account-credentials \
        --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
        --controllers "$controllers" --concurrent-gc-syncs 5 --node-monitor-grace-period 60s
    start kube-scheduler "$bin/kube-scheduler" \
        --kubeconfig "$STATE/scheduler.kubeconfig" \
        --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
        --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --cert-dir "$STATE/scheduler-certs" \
        --leader-elect=false
    # Node leases: without them kwok sends no heartbeat for over a minute, the node lifecycle
    # controller (grace period 60 s) marks the nodes not ready and sets every pod's Ready to False, and
    # nothing sets it back (there is no kubelet), so a plane older than a minute had no ready pods.
    # kwok leaves process-backed pods entirely to moe-e2e-pods (their status, IPs and deletion):
    # its pod-ready stage would call them Ready before their process has loaded anything, and keep
    # them Ready after it died.
    start kwok "$bin/kwok" --kubeconfig "$KUBECONFIG_ADMIN" \
        --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake --node-lease-duration-seconds 40 \
        --disregard-status-with-label-selector moe.craft.dev/process-backed=true \
        --cidr "127.$POD_OCTET.255.0/24" --node-ip 127.0.0.1 \
        --server-address "127.0.0.1:$KWOK_PORT"
    # moe-e2e-pods, the kubelet of process-backed pods, hands out IPs from its own /24 (apart from
    # kwok's). It finds its state dir from MOE_E2E_STATE, which it also passes to every pod process
    # (so `down` can recognise stray ones).
    local entrypoints=() e
    for e in $IMAGE_ENTRYPOINTS; do entrypoints+=(--image-entrypoint "$e"); done
    start moe-e2e-pods env MOE_E2E_STATE="$STATE" "$pods" --kubeconfig "$KUBECONFIG_ADMIN" \
        --pods-dir "$STATE/pods" --pod-cidr "127.$POD_OCTET.254.0/24" --host-ip 127.0.0.1 \
        "${entrypoints[@]}"

    "$bin/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" apply -f <(nodes_yaml) > /dev/null \
        || die "creating the fake nodes failed"
    wait_for "kube-controller-manager /healthz" kube-controller-manager curl -skf "https://127.0.0.1:$KCM_PORT/healthz"
    wait_for "kube-scheduler /healthz" kube-scheduler curl -skf "https://127.0.0.1:$SCHED_PORT/healthz"
    wait_for "$NODES fake node(s) Ready and untainted by node lifecycle" kwok nodes_ready "$bin"
    # The ServiceAccount admission plugin refuses pods until the namespace's default account exists.
    wait_for "ServiceAccount default/default" kube-controller-manager \
        "$bin/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" -n default get serviceaccount default
    pid_of moe-e2e-pods > /dev/null || die "moe-e2e-pods exited; log: $STATE/logs/moe-e2e-pods.log"
    trap - EXIT
    local t_end=$(now_ms)
    log "up in $(( (t_end - t0) ))ms (etcd $(( t_etcd - t0 ))ms, apiserver ready $(( t_api - t0 ))ms): $STATE"
    log "export \$(e2e/cluster.sh env)   # then: \$MOE_E2E_BIN/kubectl get nodes"
}

# All fake nodes Ready and without the not-ready taint the node lifecycle controller lifts.
nodes_ready() {
    local out
    out="$("$1/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" get nodes -l type=kwok -o \
        'jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status} {.spec.taints[*].key}{"\n"}{end}')"
    [[ "$(grep -c ' True ' <<< "$out")" == "$NODES" ]] && ! grep -q 'node.kubernetes.io' <<< "$out"
}

cmd_status() {
    local c pid ok=0
    echo "state: $STATE"
    for c in "${COMPONENTS[@]}"; do
        if pid="$(pid_of "$c")"; then echo "$c: running (pid $pid)"; else echo "$c: stopped"; ok=1; fi
    done
    if load_ports && curl -sf --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" \
        --key "$PKI/admin.key" "https://127.0.0.1:$API_PORT/readyz" > /dev/null 2>&1; then
        echo "api: https://127.0.0.1:$API_PORT ready"
    else
        echo "api: not ready"; ok=1
    fi
    return $ok
}

cmd_env() {
    load_ports || die "no plane in $STATE: run e2e/cluster.sh up"
    local bin
    bin="${MOE_E2E_BIN:-$("$E2E_DIR/build.sh" --bin-dir 2> /dev/null || true)}"
    echo "KUBECONFIG=$KUBECONFIG_ADMIN"
    echo "MOE_E2E_STATE=$STATE"
    echo "MOE_E2E_BIN=$bin"
    echo "MOE_E2E_API=https://127.0.0.1:$API_PORT"
    echo "MOE_E2E_POD_CIDR=127.$POD_OCTET.0.0/16"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) die "usage: e2e/cluster.sh up|down|status|env (state dir: \$MOE_E2E_STATE, default .e2e/default)" ;;
esac
