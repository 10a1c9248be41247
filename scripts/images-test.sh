#!/usr/bin/env bash
# Checks the images scripts/images.sh built, with Debian's runc and Distribution registry (from
# images/tools.sh), and pushes them to a local registry:
#   1. each image runs its entrypoint under runc as its non-root user: `--version` names the binary
#      and Cargo.toml's version; the operator's `crd` prints exactly crds/moedeployments.moe.craft.dev.yaml;
#      in the worker image the dynamic loader resolves every library moe-worker and its CUDA libraries
#      need (ld.so --list: nothing "not found"), and the names cudarc opens are there;
#   2. the image config: numeric non-root USER, the ports of images/NAME.json, the OCI labels, the SBOM
#      lists the Debian packages, the wheels and the crates;
#   3. a local registry (docker-registry on 127.0.0.1) receives both images with skopeo, keeps their
#      digests, and the chart rendered with `image.repository` pointing there runs that image;
#   4. with --reproducible: the operator image built again from the same binaries has the same digest.
#
#   scripts/images-test.sh [--out DIR] [--reproducible] [--keep-registry]
#
# DIR is scripts/images.sh's --out (default target/images/out). Needs root (runc without user
# namespaces; the bundles' files are owned as in the image). --keep-registry leaves the registry
# running (its address and the helm values to use are printed) instead of stopping it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

OUT="$ROOT/target/images/out"
REPRO=0
KEEP=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="$(realpath -m "$2")"; shift 2 ;;
        --reproducible) REPRO=1; shift ;;
        --keep-registry) KEEP=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "scripts/images-test.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ "$(id -u)" == 0 ]] || { echo "scripts/images-test.sh: run as root (runc)" >&2; exit 1; }
eval "$(images/tools.sh --env)"
VERSION="${MOE_IMAGE_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}"
T0=$(date +%s)
step() { echo "==> [$(( $(date +%s) - T0 ))s] $*" >&2; }
fail() { echo "FAIL: $*" >&2; exit 1; }

TMP="$(mktemp -d /tmp/moe-images-test.XXXXXX)"
REGISTRY_PID=""
cleanup() {
    for id in $(runc --root "$TMP/runc" list -q 2>/dev/null); do runc --root "$TMP/runc" delete -f "$id" || true; done
    if [[ -n "$REGISTRY_PID" && $KEEP == 0 ]]; then kill "$REGISTRY_PID" 2>/dev/null || true; wait "$REGISTRY_PID" 2>/dev/null || true; fi
    rm -rf "$TMP/bundle-"* "$TMP/runc"
    [[ $KEEP == 1 ]] || rm -rf "$TMP"
}
trap cleanup EXIT

for NAME in moe-operator moe-worker; do
    [[ -f "$OUT/$NAME/index.json" ]] || fail "no image $OUT/$NAME: run scripts/images.sh first"
done

# Runs ARGS... in image NAME's unpacked bundle under runc (the image's user, env, namespaces);
# stdout to $TMP/out, stderr to $TMP/err; returns runc's exit status.
run_in() {
    local name="$1"; shift
    python3 - "$TMP/bundle-$name/config.json" "$@" <<'PY'
import json, sys
path, args = sys.argv[1], sys.argv[2:]
c = json.load(open(path))
c["process"]["terminal"] = False
c["process"]["args"] = args
json.dump(c, open(path, "w"), indent=1)
PY
    local id="moe-test-$name-$RANDOM"
    runc --root "$TMP/runc" run --bundle "$TMP/bundle-$name" "$id" < /dev/null > "$TMP/out" 2> "$TMP/err"
}

for NAME in moe-operator moe-worker; do
    SPEC="images/$NAME.json"
    step "$NAME: unpacking $OUT/$NAME:$VERSION"
    umoci unpack --image "$OUT/$NAME:$VERSION" "$TMP/bundle-$NAME" > /dev/null
    entry="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["entrypoint"][0])' "$SPEC")"

    # 2. The config as the image carries it.
    python3 - "$OUT/$NAME" "$VERSION" "$SPEC" "$TMP/bundle-$NAME/config.json" "$OUT/$NAME.spdx.json" <<'PY'
import json, sys
layout, version, spec_path, bundle_cfg, sbom_path = sys.argv[1:]
spec = json.load(open(spec_path))
blob = lambda d: json.load(open("%s/blobs/%s" % (layout, d.replace(":", "/"))))
index = json.load(open(layout + "/index.json"))
m = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == version)
manifest = blob(m["digest"])
cfg = blob(manifest["config"]["digest"])
c = cfg["config"]
problems = []
uid, gid = (int(x) for x in c["User"].split(":"))
if uid == 0 or gid == 0:
    problems.append("User %s is root" % c["User"])
if c["Entrypoint"] != spec["entrypoint"] or (c.get("Cmd") or []) != spec["cmd"]:
    problems.append("Entrypoint/Cmd %s %s" % (c["Entrypoint"], c.get("Cmd")))
ports = sorted(int(p.split("/")[0]) for p in c.get("ExposedPorts", {}))
if ports != sorted(spec["expose"]):
    problems.append("ExposedPorts %s, images/%s.json says %s" % (ports, spec["name"], spec["expose"]))
labels = c.get("Labels", {})
for k in ("source", "revision", "version", "created"):
    if not labels.get("org.opencontainers.image." + k):
        problems.append("label org.opencontainers.image.%s missing" % k)
if labels.get("org.opencontainers.image.version") != version:
    problems.append("version label %s" % labels.get("org.opencontainers.image.version"))
run = json.load(open(bundle_cfg))["process"]["user"]
if run.get("uid") != uid:
    problems.append("runc would run as uid %s" % run.get("uid"))
sbom = json.load(open(sbom_path))
kinds = {}
for p in sbom["packages"]:
    kind = p["SPDXID"].split("-")[1]
    kinds[kind] = kinds.get(kind, 0) + 1
want = {"Deb", "Crate", "Binary"} | ({"Wheel"} if spec["cudaWheels"] else set())
if not want <= set(kinds):
    problems.append("SBOM lacks %s (has %s)" % (want - set(kinds), kinds))
if problems:
    sys.exit("%s: %s" % (spec["name"], "; ".join(problems)))
size = sum(l["size"] for l in manifest["layers"])
print("%s: user %s, ports %s, %d layers (%d MiB compressed), SBOM %s, revision %s" % (
    spec["name"], c["User"], ports, len(manifest["layers"]), size >> 20,
    ", ".join("%d %s" % (n, k) for k, n in sorted(kinds.items())),
    labels["org.opencontainers.image.revision"]))
PY

    # 1. The entrypoint, run as the image says.
    step "$NAME: runc run $entry --version"
    run_in "$NAME" "$entry" --version || fail "$NAME --version: $(cat "$TMP/err")"
    grep -qx "$NAME $VERSION" "$TMP/out" || fail "$NAME --version printed '$(cat "$TMP/out")', not '$NAME $VERSION'"
    echo "    $(cat "$TMP/out")"
    if [[ $NAME == moe-operator ]]; then
        step "$NAME: runc run $entry crd"
        run_in "$NAME" "$entry" crd || fail "$NAME crd: $(cat "$TMP/err")"
        cmp -s "$TMP/out" crds/moedeployments.moe.craft.dev.yaml \
            || fail "the image's 'moe-operator crd' differs from crds/moedeployments.moe.craft.dev.yaml"
        echo "    crd: $(wc -l < "$TMP/out") lines, identical to crds/moedeployments.moe.craft.dev.yaml"
    fi
    # Every ELF the image runs or loads resolves inside the image (the loader itself says so).
    libs=("$entry" /usr/local/bin/moectl)
    if [[ $NAME == moe-worker ]]; then
        while read -r path link; do
            libs+=("/usr/local/cuda/lib64/$(basename "$path")")
            [[ -z "$link" ]] || libs+=("/usr/local/cuda/lib64/$link")
        done < <(grep -v '^#' images/moe-worker-cuda-libs.txt | grep .)
    fi
    for f in "${libs[@]}"; do
        run_in "$NAME" /lib64/ld-linux-x86-64.so.2 --list "$f" || fail "$NAME: ld.so --list $f: $(cat "$TMP/err")"
        if grep -q "not found" "$TMP/out"; then fail "$NAME: $f needs what the image lacks: $(grep 'not found' "$TMP/out")"; fi
        echo "    $f: $(grep -c '=>' "$TMP/out") libraries resolved"
    done
done
# The names cudarc's dynamic loading tries first for each library (get_lib_name_candidates).
for want in libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libnccl.so; do
    [[ -e "$TMP/bundle-moe-worker/rootfs/usr/local/cuda/lib64/$want" ]] || fail "moe-worker: no /usr/local/cuda/lib64/$want"
done

# 3. A local registry, the images pushed, the digests kept.
step "local registry (docker-registry) and skopeo copy"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$TMP/registry"
cat > "$TMP/registry.yml" <<EOF
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $TMP/registry}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$PORT}
EOF
docker-registry serve "$TMP/registry.yml" > "$TMP/registry.log" 2>&1 &
REGISTRY_PID=$!
for _ in $(seq 1 50); do curl -fsS "http://127.0.0.1:$PORT/v2/" > /dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "http://127.0.0.1:$PORT/v2/" > /dev/null || fail "the registry did not answer: $(cat "$TMP/registry.log")"
REG="127.0.0.1:$PORT/moe-operator"
for NAME in moe-operator moe-worker; do
    t=$(date +%s)
    skopeo --insecure-policy copy --quiet --dest-tls-verify=false \
        "oci:$OUT/$NAME:$VERSION" "docker://$REG/$NAME:$VERSION"
    pushed="sha256:$(skopeo inspect --raw --tls-verify=false "docker://$REG/$NAME:$VERSION" | sha256sum | cut -d' ' -f1)"
    [[ "$pushed" == "$(cat "$OUT/$NAME.digest")" ]] || fail "$NAME: the registry has $pushed, the layout $(cat "$OUT/$NAME.digest")"
    echo "    $REG/$NAME:$VERSION@$pushed ($(( $(date +%s) - t ))s)"
done
tags=$(curl -fsS "http://127.0.0.1:$PORT/v2/moe-operator/moe-worker/tags/list")
[[ "$tags" == *"\"$VERSION\""* ]] || fail "tags/list: $tags"

# The chart pointed at the registry: its Deployment runs the pushed operator image, its pod policy
# admits the pushed worker image.
if HELM_BIN="$(e2e/build.sh --bin-dir 2>/dev/null)" && [[ -x "$HELM_BIN/helm" ]]; then
    cat > "$TMP/values.yaml" <<EOF
image:
  repository: $REG/moe-operator
  tag: "$VERSION"
podPolicy:
  imagePrefixes: ["$REG/moe-worker:"]
EOF
    kv="$(sed -n 's/^KUBERNETES_VERSION=//p' e2e/versions.env)"
    "$HELM_BIN/helm" template moe-operator charts/moe-operator -n moe-system --kube-version "$kv" \
        -f "$TMP/values.yaml" > "$TMP/chart.yaml"
    grep -q "image: \"\?$REG/moe-operator:$VERSION\"\?" "$TMP/chart.yaml" \
        || fail "the chart does not run $REG/moe-operator:$VERSION: $(grep 'image:' "$TMP/chart.yaml")"
    grep -q -- "--allowed-image-prefix=$REG/moe-worker:" "$TMP/chart.yaml" \
        || grep -q "$REG/moe-worker:" "$TMP/chart.yaml" \
        || fail "the chart's pod policy does not name $REG/moe-worker:"
    echo "    helm values (the chart renders image: $REG/moe-operator:$VERSION):"
    sed 's/^/      /' "$TMP/values.yaml"
    echo "    and in each MoEDeployment: spec.worker.image: $REG/moe-worker:$VERSION"
else
    echo "    (no helm from e2e/build.sh: the chart rendering check is skipped)"
fi

# 4. The same inputs, the same digest.
if [[ $REPRO == 1 ]]; then
    step "reproducibility: moe-operator built again from the same binaries"
    scripts/images.sh --skip-build --out "$TMP/again" moe-operator
    a="$(cat "$OUT/moe-operator.digest")"; b="$(cat "$TMP/again/moe-operator.digest")"
    [[ "$a" == "$b" ]] || fail "moe-operator built twice: $a then $b"
    echo "    moe-operator: $a both times"
fi

if [[ $KEEP == 1 ]]; then
    echo "registry left running at 127.0.0.1:$PORT (pid $REGISTRY_PID, storage $TMP/registry)"
fi
step "images OK"
