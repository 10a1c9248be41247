#!/usr/bin/env bash
# The image tools of scripts/images.sh and scripts/images-test.sh, from Debian's packages, unpacked
# (apt-get download + dpkg -x, as e2e/prometheus.sh does) into a cache instead of installed:
# mmdebstrap (root filesystems), umoci (OCI layouts), skopeo (copies to registries), runc (runs an
# image's entrypoint), docker-registry (Distribution, the local registry). Prints the directory;
# run tools from it with images/tools.sh --env (exports PATH, LD_LIBRARY_PATH, PERL5LIB).
#
#   images/tools.sh          unpack when missing; print the directory
#   eval "$(images/tools.sh --env)"
#
# Cache: ${MOE_IMAGES_CACHE:-~/.cache/moe-operator-images}/tools-<hash of the package list>.
set -euo pipefail

# skopeo links libgpgme (and it libassuan); containers-common has its default policy.json.
PACKAGES=(mmdebstrap umoci skopeo libgpgme11 libassuan0 golang-github-containers-common runc docker-registry)
CACHE="${MOE_IMAGES_CACHE:-$HOME/.cache/moe-operator-images}"
DEST="$CACHE/tools-$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-12)"

if [[ ! -x "$DEST/usr/bin/umoci" ]]; then
    command -v apt-get >/dev/null || { echo "images/tools.sh: needs apt-get (Debian or Ubuntu)" >&2; exit 1; }
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "images/tools.sh: fetching ${PACKAGES[*]} into $DEST" >&2
    if ! (cd "$tmp" && apt-get download "${PACKAGES[@]}" >&2 2>"$tmp/err"); then
        if [[ "$(id -u)" == 0 ]]; then
            apt-get update >&2
            (cd "$tmp" && apt-get download "${PACKAGES[@]}" >&2)
        else
            cat "$tmp/err" >&2
            echo "images/tools.sh: apt-get download failed; run 'sudo apt-get update' and retry" >&2
            exit 1
        fi
    fi
    rm -rf "$DEST.partial" && mkdir -p "$DEST.partial"
    for d in "$tmp"/*.deb; do dpkg -x "$d" "$DEST.partial"; done
    ls "$tmp"/*.deb | xargs -n1 basename > "$DEST.partial/packages.txt"
    rm -rf "$DEST" && mv "$DEST.partial" "$DEST"
fi

if [[ "${1:-}" == "--env" ]]; then
    printf 'export PATH=%q:%q:"$PATH"\n' "$DEST/usr/bin" "$DEST/usr/sbin"
    printf 'export LD_LIBRARY_PATH=%q"${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\n' "$DEST/usr/lib/x86_64-linux-gnu"
    printf 'export PERL5LIB=%q"${PERL5LIB:+:$PERL5LIB}"\n' "$DEST/usr/share/perl5"
    printf 'export MOE_IMAGE_TOOLS=%q\n' "$DEST"
else
    echo "$DEST"
fi
