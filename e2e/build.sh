#!/usr/bin/env bash
# Builds the local control plane's binaries (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm) from the pins in e2e/versions.env into a cache directory outside
# the repository, keyed by a hash of the pin file. Components already in the cache are skipped, so a
# warm machine returns in well under a second.
#
#   e2e/build.sh            build what is missing, print the bin directory on the last line
#   e2e/build.sh --bin-dir  only print the bin directory (exit 1 if the cache is incomplete)
#
# MOE_E2E_CACHE overrides the cache root (default ~/.cache/moe-operator-e2e).
#
# Why a wrapper module: k8s.io/kubernetes (and etcd's server module) point their sibling modules at
# local directories with `replace`, so `go install mod@version` refuses them. A throwaway module that
# requires the pinned module and replaces each sibling by its published version builds the same code.
set -euo pipefail

E2E_DIR="$(cd "$(dirname "$0")" && pwd)"
PINS="$E2E_DIR/versions.env"
# shellcheck source=versions.env
source "$PINS"

KEY="$(sha256sum "$PINS" | cut -c1-16)"
CACHE_ROOT="${MOE_E2E_CACHE:-$HOME/.cache/moe-operator-e2e}"
CACHE="$CACHE_ROOT/$KEY"
BIN="$CACHE/bin"
ALL_BINS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)

complete() {
    local b
    for b in "${ALL_BINS[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
}

if [[ "${1:-}" == "--bin-dir" ]]; then
    if complete; then echo "$BIN"; exit 0; fi
    echo "control plane binaries missing in $BIN: run e2e/build.sh" >&2
    exit 1
fi

export GOTOOLCHAIN=local GOFLAGS="${GOFLAGS:--buildvcs=false}"
mkdir -p "$BIN" "$CACHE/logs"
# Go's module and build caches for Kubernetes take several GiB; once the binaries are in $BIN they are
# not needed again, so they live under $CACHE/go and go away after a successful build (CI's disk is
# shared with the cargo build that follows). MOE_E2E_KEEP_GO_CACHE=1 keeps them for a developer
# rebuilding against other pins.
GO_SCRATCH="$CACHE/go"
if [[ -z "${MOE_E2E_KEEP_GO_CACHE:-}" ]]; then
    export GOMODCACHE="$GO_SCRATCH/mod" GOCACHE="$GO_SCRATCH/build"
fi
drop_go_scratch() {
    [[ -d "$GO_SCRATCH" ]] || return 0
    chmod -R u+w "$GO_SCRATCH" 2>/dev/null || true # the module cache is read-only
    rm -rf "$GO_SCRATCH"
}

# wrapper_module DIR MODULE VERSION SIBLING_VERSION
# Writes DIR/go.mod requiring MODULE@VERSION, with every local-path replace of MODULE's go.mod turned
# into a replace by the published sibling module at SIBLING_VERSION, and other replaces copied as is.
wrapper_module() {
    local dir="$1" mod="$2" ver="$3" sib="$4" gomod
    rm -rf "$dir" && mkdir -p "$dir"
    gomod="$(go mod download -json "$mod@$ver" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
    [[ -f "$gomod" ]] || { echo "build.sh: could not download go.mod of $mod@$ver" >&2; exit 1; }
    {
        echo "module moe-e2e-wrapper"
        echo
        grep -m1 '^go ' "$gomod"
        echo
        echo "require $mod $ver"
        echo
        echo "replace ("
        # Both the block form and single-line `replace a => b` forms.
        awk '
            /^replace[[:space:]]*\(/ { inblock = 1; next }
            inblock && /^\)/ { inblock = 0; next }
            inblock { print; next }
            /^replace[[:space:]]/ { sub(/^replace[[:space:]]+/, ""); print }
        ' "$gomod" | sed 's://.*$::' | awk -v sib="$sib" '
            NF == 0 { next }
            {
                split($0, lr, "=>")
                left = lr[1]; right = lr[2]
                gsub(/^[[:space:]]+|[[:space:]]+$/, "", left); gsub(/^[[:space:]]+|[[:space:]]+$/, "", right)
                split(left, l, /[[:space:]]+/)
                if (right !~ /^\.\.?\//) { printf "\t%s => %s\n", left, right; next }
                # A local sibling becomes the published module at SIBLING_VERSION. Guards such as
                # etcd'"'"'s `go.etcd.io/etcd => ./FORBIDDEN_DEPENDENCY` (a major version that cannot
                # match) are dropped: the build never needs them.
                want = "v0|v1"; if (match(l[1], /\/v[0-9]+$/)) want = substr(l[1], RSTART + 1)
                split(sib, sv, "."); sibmajor = sv[1]
                if (want == sibmajor || (want == "v0|v1" && (sibmajor == "v0" || sibmajor == "v1")))
                    printf "\t%s => %s %s\n", l[1], l[1], sib
            }'
        echo ")"
    } > "$dir/go.mod"
}

# build_component NAME MODULE VERSION SIBLING_VERSION LDFLAGS PKG:BINARY...
build_component() {
    local name="$1" mod="$2" ver="$3" sib="$4" ldflags="$5"; shift 5
    local spec pkgs=() bins=() missing=0 dir out t0
    for spec in "$@"; do pkgs+=("${spec%%:*}"); bins+=("${spec##*:}"); done
    for spec in "${bins[@]}"; do [[ -x "$BIN/$spec" ]] || missing=1; done
    if [[ $missing == 0 ]]; then echo "==> $name: cached"; return; fi
    t0=$(date +%s)
    echo "==> $name: building $mod@$ver (log: $CACHE/logs/$name.log)"
    dir="$CACHE/src/$name"
    wrapper_module "$dir" "$mod" "$ver" "$sib"
    out="$CACHE/tmp-$name"
    rm -rf "$out" && mkdir -p "$out"
    (
        cd "$dir"
        # `go get pkg@version` (a bare `go get pkg` would upgrade the module) resolves the full build
        # list and fills go.sum.
        go get "${pkgs[@]/%/@$ver}"
        # One package: name the binary; several: a directory, each binary named after its package.
        local dest="$out/"
        [[ ${#pkgs[@]} == 1 ]] && dest="$out/${bins[0]}"
        go build -trimpath -ldflags="-s -w $ldflags" -o "$dest" "${pkgs[@]}"
    ) > "$CACHE/logs/$name.log" 2>&1 || {
        echo "build.sh: building $name failed; last lines of $CACHE/logs/$name.log:" >&2
        tail -n 30 "$CACHE/logs/$name.log" >&2
        exit 1
    }
    local b
    for b in "${bins[@]}"; do mv "$out/$b" "$BIN/$b"; done
    rm -rf "$out"
    echo "==> $name: built in $(( $(date +%s) - t0 ))s"
}

T_START=$(date +%s)

K8S_MINOR="${KUBERNETES_VERSION#v1.}"; K8S_MINOR="${K8S_MINOR%%.*}"
K8S_LDFLAGS=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    K8S_LDFLAGS+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$K8S_MINOR"
    K8S_LDFLAGS+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
# One `go build` for the four Kubernetes binaries so their shared packages compile once.
build_component kubernetes "$KUBERNETES_MODULE" "$KUBERNETES_VERSION" "$KUBERNETES_STAGING_VERSION" "$K8S_LDFLAGS" \
    k8s.io/kubernetes/cmd/kube-apiserver:kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager:kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler:kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl:kubectl
build_component etcd "$ETCD_MODULE" "$ETCD_VERSION" "$ETCD_VERSION" "" \
    "$ETCD_MODULE:etcd"
build_component kwok "$KWOK_MODULE" "$KWOK_VERSION" "$KWOK_VERSION" "" \
    sigs.k8s.io/kwok/cmd/kwok:kwok
build_component helm "$HELM_MODULE" "$HELM_VERSION" "$HELM_VERSION" \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    helm.sh/helm/v3/cmd/helm:helm

complete || { echo "build.sh: cache $BIN incomplete after build" >&2; exit 1; }
[[ -n "${MOE_E2E_KEEP_GO_CACHE:-}" ]] || drop_go_scratch
echo "==> all binaries in $BIN ($(( $(date +%s) - T_START ))s)"
echo "$BIN"
