#!/usr/bin/env bash
# Builds the operator and worker images as OCI image layouts, without a container daemon:
#   - a minimal Debian 12 root filesystem (mmdebstrap, variant extract: only the packages of
#     images/NAME.json and their dependencies, at the versions and sha256 of images/NAME.debian.lock),
#   - for the worker, the CUDA 13 libraries it loads at run time from NVIDIA's PyPI wheels
#     (images/cuda-wheels.txt, pinned by sha256; the files of images/moe-worker-cuda-libs.txt),
#   - our release binaries (cargo build --release --locked, paths remapped, debug info stripped),
#   - the image config of images/NAME.json (non-root user, entrypoint, ports, environment), OCI
#     labels (source, revision, version, created) and an SPDX SBOM (Debian packages, wheels, crates),
#     in the image at /usr/share/doc/NAME/sbom.spdx.json and beside the layout.
# Reproducible: every timestamp is SOURCE_DATE_EPOCH (the commit's time unless set), every input is
# pinned, the layers are written in name order with numeric owners; the same commit gives the same
# image digests (scripts/images-test.sh --reproducible builds twice and compares).
#
#   scripts/images.sh [--out DIR] [--skip-build] [--update-lock] [NAME...]
#
#   NAME          moe-operator, moe-worker (default: both)
#   --out DIR     where the layouts go (default target/images/out): DIR/NAME is an OCI layout with
#                 the tag VERSION, DIR/NAME.spdx.json its SBOM, DIR/NAME.digest its manifest digest
#   --skip-build  use the binaries already in target/images/release (or $MOE_IMAGE_BIN_DIR)
#   --update-lock resolve the Debian packages anew (the mirror's current versions), rewrite
#                 images/NAME.debian.lock and stop (after a Debian point release drops a version)
# Environment: MOE_IMAGE_SOURCE (label org.opencontainers.image.source; default the chart's
# `sources`), MOE_IMAGE_VERSION (default Cargo.toml's version), MOE_DEBIAN_MIRROR
# (default http://deb.debian.org), CARGO_BUILD_JOBS. Needs apt-get, dpkg, python3, pip, root (mmdebstrap's
# root mode and the layers' file owners; run it in a throwaway VM or CI job, not on a workstation
# you care about). Publishing: scripts/images-test.sh pushes to a local registry; for your own
# registry see docs/images.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
umask 022 # the layers' modes do not depend on the caller's

OUT="$ROOT/target/images/out"
SKIP_BUILD=0
UPDATE_LOCK=0
NAMES=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="$(realpath -m "$2")"; shift 2 ;;
        --skip-build) SKIP_BUILD=1; shift ;;
        --update-lock) UPDATE_LOCK=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        moe-operator|moe-worker) NAMES+=("$1"); shift ;;
        *) echo "scripts/images.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ ${#NAMES[@]} -gt 0 ]] || NAMES=(moe-operator moe-worker)
[[ "$(id -u)" == 0 ]] || { echo "scripts/images.sh: run as root (mmdebstrap --mode=root; root-owned layers)" >&2; exit 1; }

T0=$(date +%s)
step() { echo "==> [$(( $(date +%s) - T0 ))s] $*" >&2; }

# The tools' PATH, LD_LIBRARY_PATH (Debian libraries unpacked into the cache) and PERL5LIB are set
# after cargo has run: the build sees the caller's environment only.
tools_env() { eval "$(images/tools.sh --env)"; }
MIRROR="${MOE_DEBIAN_MIRROR:-http://deb.debian.org}"
CACHE="${MOE_IMAGES_CACHE:-$HOME/.cache/moe-operator-images}"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}"
CREATED="$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
REVISION="$(git rev-parse HEAD)"
git diff --quiet HEAD -- || REVISION="$REVISION-dirty"
VERSION="${MOE_IMAGE_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}"
SOURCE="${MOE_IMAGE_SOURCE:-$(sed -n 's/^sources: \[\(.*\)\]/\1/p' charts/moe-operator/Chart.yaml)}"
json() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))[sys.argv[2]]; print(json.dumps(v) if not isinstance(v,str) else v)' "$@"; }
WORK="$ROOT/target/images/work"
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"

# The root filesystem of image $1 into $2/rootfs.tar: every package of the image's lock at its
# version (the hook checks the sha256s and that nothing else came), or with --update-lock the
# packages of images/$1.json resolved anew and the lock rewritten.
rootfs() {
    local NAME="$1" W="$2" SPEC="images/$1.json" LOCK="images/$1.debian.lock" pkgs include uid
    pkgs="$(json "$SPEC" debian | python3 -c 'import json,sys; print(",".join(json.load(sys.stdin)))')"
    if [[ $UPDATE_LOCK == 1 ]]; then
        step "$NAME: resolving $pkgs anew for $LOCK"
        include="$pkgs"
        export MOE_IMAGE_LOCK_OUT="$W/lock.new"
    else
        [[ -f "$LOCK" ]] || { echo "scripts/images.sh: no $LOCK: run with --update-lock" >&2; exit 1; }
        include="$(grep -v '^#' "$LOCK" | awk 'NF {printf "%s%s=%s", sep, $1, $2; sep=","}')"
        unset MOE_IMAGE_LOCK_OUT
    fi
    step "$NAME: mmdebstrap (bookworm, variant extract)"
    uid="$(json "$SPEC" user)"; uid="${uid%%:*}"
    MOE_IMAGE_LOCK="$ROOT/$LOCK" MOE_IMAGE_DEBS_OUT="$W/debs.tsv" MOE_IMAGE_UID="$uid" \
    mmdebstrap --quiet --mode=root --variant=extract --format=tar --architectures=amd64 \
        --include="$include" --extract-hook="$ROOT/images/rootfs-hook.sh \"\$1\"" \
        bookworm "$W/rootfs.tar" \
        "deb $MIRROR/debian bookworm main" "deb $MIRROR/debian bookworm-updates main" \
        "deb $MIRROR/debian-security bookworm-security main"
    if [[ $UPDATE_LOCK == 1 ]]; then
        { echo "# $NAME's Debian packages (bookworm, amd64): package version sha256 of the .deb."
          echo "# Written by scripts/images.sh --update-lock from images/$NAME.json's list and its dependencies."
          cat "$W/lock.new"; } > "$LOCK"
        echo "wrote $LOCK" >&2
    fi
}

if [[ $UPDATE_LOCK == 1 ]]; then
    tools_env
    for NAME in "${NAMES[@]}"; do mkdir -p "$WORK/$NAME"; rootfs "$NAME" "$WORK/$NAME"; done
    rm -rf "$WORK"
    exit 0
fi

# 1. Release binaries. Their own target dir (RUSTFLAGS differ from a plain release build), paths
# remapped so the checkout's and the cargo home's locations do not end up in the binaries.
BIN="${MOE_IMAGE_BIN_DIR:-$ROOT/target/images/release}"
if [[ $SKIP_BUILD == 0 ]]; then
    step "cargo build --release (target/images)"
    CARGO_TARGET_DIR="$ROOT/target/images" \
    RUSTFLAGS="--remap-path-prefix=$ROOT=/build --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo" \
        cargo build --release --locked --bin moe-operator --bin moe-worker --bin moectl
fi
mkdir -p "$WORK/bin"
for b in moe-operator moe-worker moectl; do
    [[ -x "$BIN/$b" ]] || { echo "scripts/images.sh: no $BIN/$b (drop --skip-build)" >&2; exit 1; }
    strip --strip-debug -o "$WORK/bin/$b" "$BIN/$b"
done
cargo tree --locked --offline -e normal --prefix none --format '{p} {l}' \
    --target x86_64-unknown-linux-gnu > "$WORK/crates.txt"

tools_env

# 2. The CUDA wheels (pip checks each sha256; the cache keeps them between runs).
wheels=()
need_wheels=0
for NAME in "${NAMES[@]}"; do
    [[ "$(json "images/$NAME.json" cudaWheels)" != true ]] || need_wheels=1
done
if [[ $need_wheels == 1 ]]; then
    step "CUDA wheels (images/cuda-wheels.txt)"
    mkdir -p "$CACHE/wheels"
    pip download --quiet --no-deps --require-hashes --only-binary=:all: \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_18_x86_64 \
        --platform manylinux_2_12_x86_64 -r images/cuda-wheels.txt -d "$CACHE/wheels"
    while read -r req; do
        n="${req%%==*}"; v="${req#*==}"; v="${v%% *}"
        f=$(ls "$CACHE/wheels/${n//-/_}-$v-"*.whl)
        wheels+=("$f")
    done < <(grep -v '^#' images/cuda-wheels.txt | grep .)
fi

# A layer from a directory: name order, numeric root owners unless the files say otherwise,
# SOURCE_DATE_EPOCH for every time, no atime/ctime.
layer_tar() {
    tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --clamp-mtime --numeric-owner \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
        --format=posix -C "$1" -cf "$2" .
}


for NAME in "${NAMES[@]}"; do
    SPEC="images/$NAME.json"
    W="$WORK/$NAME"
    mkdir -p "$W"
    # 3. The root filesystem.
    rootfs "$NAME" "$W"
    layers=("$W/rootfs.tar")

    # 4. The CUDA libraries (worker).
    if [[ "$(json "$SPEC" cudaWheels)" == true ]]; then
        step "$NAME: CUDA libraries layer"
        C="$W/cuda"
        mkdir -p "$C/usr/local/cuda/lib64" "$C/etc/ld.so.conf.d" "$W/unzipped"
        for w in "${wheels[@]}"; do
            python3 -m zipfile -e "$w" "$W/unzipped"
            d="$C/usr/share/doc/$(basename "$w" | cut -d- -f1 | tr _ -)"
            mkdir -p "$d"
            cp "$W/unzipped/"*.dist-info/METADATA "$d/METADATA"
            cp "$W/unzipped/"*.dist-info/License.txt "$d/" 2>/dev/null || true
            rm -rf "$W/unzipped/"*.dist-info
        done
        while read -r path link; do
            [[ -f "$W/unzipped/$path" ]] || { echo "scripts/images.sh: $path is in no wheel of images/cuda-wheels.txt" >&2; exit 1; }
            install -m 0644 "$W/unzipped/$path" "$C/usr/local/cuda/lib64/"
            [[ -z "$link" ]] || ln -s "$(basename "$path")" "$C/usr/local/cuda/lib64/$link"
        done < <(grep -v '^#' images/moe-worker-cuda-libs.txt | grep .)
        echo /usr/local/cuda/lib64 > "$C/etc/ld.so.conf.d/moe-cuda.conf"
        layer_tar "$C" "$W/cuda.tar"
        layers+=("$W/cuda.tar")
    fi

    # 5. Our binaries and the SBOM.
    step "$NAME: binaries and SBOM"
    A="$W/app"
    mkdir -p "$A/usr/local/bin" "$A/usr/share/doc/$NAME"
    binaries=()
    for b in $(json "$SPEC" binaries | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)))'); do
        install -m 0755 "$WORK/bin/$b" "$A/usr/local/bin/$b"
        binaries+=(--binary "$A/usr/local/bin/$b")
    done
    wheel_args=()
    if [[ "$(json "$SPEC" cudaWheels)" == true ]]; then
        for w in "${wheels[@]}"; do wheel_args+=(--wheel "$w"); done
    fi
    python3 images/sbom.py --image "$SPEC" --version "$VERSION" --revision "$REVISION" \
        --source "$SOURCE" --debs "$W/debs.tsv" --crates "$WORK/crates.txt" --cargo-lock Cargo.lock \
        "${wheel_args[@]}" "${binaries[@]}" > "$A/usr/share/doc/$NAME/sbom.spdx.json"
    layer_tar "$A" "$W/app.tar"
    layers+=("$W/app.tar")

    # 6. The OCI layout: layers, config, labels.
    step "$NAME: OCI layout"
    L="$OUT/$NAME"
    rm -rf "$L"
    umoci init --layout "$L"
    umoci new --image "$L:$VERSION"
    for t in "${layers[@]}"; do
        umoci raw add-layer --image "$L:$VERSION" --history.created "$CREATED" \
            --history.created_by "scripts/images.sh: $(basename "$t")" "$t"
    done
    cfg=(--created "$CREATED" --author "moe-operator" --architecture amd64 --os linux
         --config.user "$(json "$SPEC" user)" --config.workingdir /)
    while read -r e; do cfg+=(--config.entrypoint "$e"); done < <(json "$SPEC" entrypoint | python3 -c 'import json,sys; [print(x) for x in json.load(sys.stdin)]')
    while read -r c; do cfg+=(--config.cmd "$c"); done < <(json "$SPEC" cmd | python3 -c 'import json,sys; [print(x) for x in json.load(sys.stdin)]')
    cfg+=(--config.env "PATH=/usr/local/bin:/usr/bin:/bin")
    while read -r e; do cfg+=(--config.env "$e"); done < <(json "$SPEC" env | python3 -c 'import json,sys; [print(x) for x in json.load(sys.stdin)]')
    for p in $(json "$SPEC" expose | python3 -c 'import json,sys; print(" ".join(map(str, json.load(sys.stdin))))'); do
        cfg+=(--config.exposedports "$p/tcp")
    done
    labels=(
        "org.opencontainers.image.title=$(json "$SPEC" title)"
        "org.opencontainers.image.description=$(json "$SPEC" description)"
        "org.opencontainers.image.source=$SOURCE"
        "org.opencontainers.image.revision=$REVISION"
        "org.opencontainers.image.version=$VERSION"
        "org.opencontainers.image.created=$CREATED"
        "org.opencontainers.image.licenses=Apache-2.0"
    )
    for l in "${labels[@]}"; do cfg+=(--config.label "$l" --manifest.annotation "$l"); done
    umoci config --image "$L:$VERSION" --no-history "${cfg[@]}"
    umoci gc --layout "$L"
    cp "$A/usr/share/doc/$NAME/sbom.spdx.json" "$OUT/$NAME.spdx.json"
    python3 - "$L" "$VERSION" > "$OUT/$NAME.digest" <<'PY'
import json, sys
index = json.load(open(sys.argv[1] + "/index.json"))
m = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == sys.argv[2])
print(m["digest"])
PY
    size=$(du -sm "$L" | cut -f1)
    step "$NAME: $L:$VERSION $(cat "$OUT/$NAME.digest") (${size} MiB)"
done
rm -rf "$WORK"
step "done"
