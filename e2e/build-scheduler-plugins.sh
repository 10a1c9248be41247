#!/usr/bin/env bash
# Builds the scheduler of sigs.k8s.io/scheduler-plugins (kube-scheduler with the coscheduling
# plugin) from the pin in e2e/scheduler-plugins.env, and copies the PodGroup CRD from that same
# module's manifests. Cached like e2e/build.sh, but under its own key (a hash of its own pin file),
# so the Kubernetes binaries of e2e/versions.env stay valid.
#
#   e2e/build-scheduler-plugins.sh            build if missing, print the bin directory last
#   e2e/build-scheduler-plugins.sh --bin-dir  only print it (exit 1 if incomplete)
set -euo pipefail

E2E_DIR="$(cd "$(dirname "$0")" && pwd)"
PINS="$E2E_DIR/scheduler-plugins.env"
# shellcheck source=scheduler-plugins.env
source "$PINS"
KEY="sp-$(sha256sum "$PINS" | cut -c1-16)"
CACHE="${MOE_E2E_CACHE:-$HOME/.cache/moe-operator-e2e}/$KEY"
BIN="$CACHE/bin"
CRD="$BIN/podgroups.scheduling.x-k8s.io.yaml"

complete() { [[ -x "$BIN/scheduler-plugins-scheduler" && -s "$CRD" ]]; }
if [[ "${1:-}" == "--bin-dir" ]]; then
    if complete; then echo "$BIN"; exit 0; fi
    echo "scheduler-plugins missing in $BIN: run e2e/build-scheduler-plugins.sh" >&2
    exit 1
fi
if complete; then echo "==> scheduler-plugins: cached"; echo "$BIN"; exit 0; fi

export GOTOOLCHAIN=local GOFLAGS="${GOFLAGS:--buildvcs=false}"
GO_SCRATCH="$CACHE/go"
export GOMODCACHE="$GO_SCRATCH/mod" GOCACHE="$GO_SCRATCH/build"
mkdir -p "$BIN" "$CACHE/logs"
t0=$(date +%s)
mod="$SCHEDULER_PLUGINS_MODULE" ver="$SCHEDULER_PLUGINS_VERSION"
echo "==> scheduler-plugins: building $mod@$ver (log: $CACHE/logs/build.log)"
src="$CACHE/src"
mkdir -p "$src"
(
    cd "$src"
    if [[ ! -x "$BIN/scheduler-plugins-scheduler" ]]; then
        # The module has no replace directives, so a throwaway module requiring it builds its
        # code as released (go.sum filled by `go get`).
        printf 'module moe-e2e-scheduler-plugins\n\ngo 1.23\n' > go.mod
        go get "$mod/cmd/scheduler@$ver"
        go build -trimpath -ldflags="-s -w" -o "$BIN/scheduler-plugins-scheduler" "$mod/cmd/scheduler"
    fi
    # The PodGroup CRD as the same release ships it for the coscheduling plugin.
    dir="$(go mod download -json "$mod@$ver" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
    cp "$dir/manifests/coscheduling/crd.yaml" "$CRD"
    chmod u+w "$CRD"
) > "$CACHE/logs/build.log" 2>&1 || {
    echo "build-scheduler-plugins.sh: build failed; last lines of $CACHE/logs/build.log:" >&2
    tail -n 30 "$CACHE/logs/build.log" >&2
    exit 1
}
chmod -R u+w "$GO_SCRATCH" 2>/dev/null || true
rm -rf "$GO_SCRATCH"
complete || { echo "build-scheduler-plugins.sh: $BIN incomplete after build" >&2; exit 1; }
echo "==> scheduler-plugins: built in $(( $(date +%s) - t0 ))s"
echo "$BIN"
