#!/bin/sh
# The --extract-hook scripts/images.sh gives mmdebstrap (variant extract: the packages are unpacked,
# no maintainer script runs). $1 is the root filesystem; the .debs apt fetched are still in its
# /var/cache/apt/archives. Environment from scripts/images.sh:
#   MOE_IMAGE_LOCK       the image's lock (package version sha256); the fetched set must equal it
#   MOE_IMAGE_LOCK_OUT   instead: write the fetched set there (scripts/images.sh --update-lock)
#   MOE_IMAGE_DEBS_OUT   where to write what the SBOM needs (package version arch source sha256)
#   MOE_IMAGE_UID        the image's non-root uid (and gid)
set -eu
root="$1"
archives="$root/var/cache/apt/archives"

fetched="$(for d in "$archives"/*.deb; do
    printf '%s %s %s\n' "$(dpkg-deb -f "$d" Package)" "$(dpkg-deb -f "$d" Version)" \
        "$(sha256sum "$d" | cut -d' ' -f1)"
done | LC_ALL=C sort)"
if [ -n "${MOE_IMAGE_LOCK_OUT:-}" ]; then
    printf '%s\n' "$fetched" > "$MOE_IMAGE_LOCK_OUT"
else
    want="$(grep -v '^#' "$MOE_IMAGE_LOCK" | grep . | LC_ALL=C sort)"
    if [ "$fetched" != "$want" ]; then
        echo "rootfs-hook: the packages fetched differ from $MOE_IMAGE_LOCK:" >&2
        t="$(mktemp -d)"
        printf '%s\n' "$want" > "$t/lock"; printf '%s\n' "$fetched" > "$t/fetched"
        diff "$t/lock" "$t/fetched" >&2 || true
        rm -rf "$t"
        echo "rootfs-hook: a pinned version left the mirror or the lock is stale: scripts/images.sh --update-lock" >&2
        exit 1
    fi
fi

# What scanners (Trivy, Grype, Syft) read when dpkg's own database is absent, as distroless does;
# and the SBOM's list.
mkdir -p "$root/var/lib/dpkg/status.d"
: > "${MOE_IMAGE_DEBS_OUT:-/dev/null}"
for d in "$archives"/*.deb; do
    p="$(dpkg-deb -f "$d" Package)"
    { dpkg-deb -f "$d" Package; echo "Status: install ok installed"
      dpkg-deb -f "$d" | grep -v '^Package:'; } > "$root/var/lib/dpkg/status.d/$p"
    src="$(dpkg-deb -f "$d" Source | cut -d' ' -f1)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$p" "$(dpkg-deb -f "$d" Version)" "$(dpkg-deb -f "$d" Architecture)" \
        "${src:-$p}" "$(sha256sum "$d" | cut -d' ' -f1)" >> "${MOE_IMAGE_DEBS_OUT:-/dev/null}"
done

# No maintainer script ran: the accounts base-passwd would make, the non-root user, and the CA
# bundle update-ca-certificates would build (every Mozilla certificate, in name order).
uid="${MOE_IMAGE_UID:-65532}"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnonroot:x:%s:%s:nonroot:/home/nonroot:/usr/sbin/nologin\n' \
    "$uid" "$uid" > "$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:%s:\n' "$uid" > "$root/etc/group"
mkdir -p "$root/home/nonroot" "$root/root" "$root/tmp"
chown "$uid:$uid" "$root/home/nonroot"
chmod 0700 "$root/root" "$root/home/nonroot"
chmod 1777 "$root/tmp"
if [ -d "$root/usr/share/ca-certificates/mozilla" ]; then
    mkdir -p "$root/etc/ssl/certs"
    find "$root/usr/share/ca-certificates/mozilla" -name '*.crt' | LC_ALL=C sort | xargs cat \
        > "$root/etc/ssl/certs/ca-certificates.crt"
fi

# Documentation but the copyright files (the licences travel with the binaries), man pages,
# translations.
find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root/usr/share/man" "$root/usr/share/info" "$root/usr/share/locale" "$root/usr/share/lintian"
