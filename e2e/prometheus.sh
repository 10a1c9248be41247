#!/usr/bin/env bash
# Finds or installs a Prometheus server for the end-to-end test of the operator's Prometheus metrics
# source (tests/e2e_prometheus.rs). Debian's `prometheus` package (2.42 on bookworm) is unpacked into
# the e2e cache with `apt-get download` + `dpkg -x`, so no service is started and no root is needed.
#
#   e2e/prometheus.sh          locate it, installing it when missing; print the binary's path
#   e2e/prometheus.sh --path   only print the path (exit 1 when there is none)
#
# Looked up in order: $MOE_PROMETHEUS_BIN, `prometheus` on PATH, the cache
# (${MOE_E2E_CACHE:-~/.cache/moe-operator-e2e}/prometheus/usr/bin/prometheus).
set -euo pipefail

CACHE_ROOT="${MOE_E2E_CACHE:-$HOME/.cache/moe-operator-e2e}"
DEST="$CACHE_ROOT/prometheus"
CACHED="$DEST/usr/bin/prometheus"

locate() {
    if [[ -n "${MOE_PROMETHEUS_BIN:-}" ]]; then
        [[ -x "$MOE_PROMETHEUS_BIN" ]] || { echo "MOE_PROMETHEUS_BIN=$MOE_PROMETHEUS_BIN is not executable" >&2; return 1; }
        echo "$MOE_PROMETHEUS_BIN"; return 0
    fi
    if command -v prometheus >/dev/null 2>&1; then command -v prometheus; return 0; fi
    if [[ -x "$CACHED" ]]; then echo "$CACHED"; return 0; fi
    return 1
}

if [[ "${1:-}" == "--path" ]]; then
    locate || { echo "no prometheus binary: run e2e/prometheus.sh (needs apt-get and Debian's archive)" >&2; exit 1; }
    exit 0
fi

if p="$(locate)"; then echo "$p"; exit 0; fi

command -v apt-get >/dev/null || { echo "e2e/prometheus.sh: no apt-get; install Prometheus 2.x and set MOE_PROMETHEUS_BIN" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "e2e/prometheus.sh: downloading Debian's prometheus package into $DEST" >&2
if ! (cd "$tmp" && apt-get download prometheus >&2); then
    # The package lists may be missing on a fresh machine; refresh them when allowed to.
    if [[ "$(id -u)" == 0 ]]; then
        apt-get update >&2
        (cd "$tmp" && apt-get download prometheus >&2)
    else
        echo "e2e/prometheus.sh: apt-get download failed; run 'sudo apt-get update' and retry" >&2
        exit 1
    fi
fi
rm -rf "$DEST.partial" && mkdir -p "$DEST.partial"
dpkg -x "$tmp"/prometheus_*.deb "$DEST.partial"
rm -rf "$DEST" && mv "$DEST.partial" "$DEST"
"$CACHED" --version >&2
echo "$CACHED"
