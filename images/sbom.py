#!/usr/bin/env python3
"""SPDX 2.3 JSON software bill of materials of one image, written by scripts/images.sh.

Lists the image's Debian packages (name, version, .deb sha256, source package), the NVIDIA wheels
its CUDA libraries come from (version, wheel sha256, licence from the wheel's METADATA), our
binaries (sha256) and the crates they link: the normal (not dev, not build) dependencies of the
moe-operator package as `cargo tree` resolves them from Cargo.lock, each with Cargo.lock's checksum.
Deterministic: the same inputs give the same bytes (SOURCE_DATE_EPOCH is the creation time).

usage: sbom.py --image images/NAME.json --version V --revision R --source URL
               --debs debs.tsv --crates crates.txt --cargo-lock Cargo.lock
               [--wheel FILE.whl ...] [--binary PATH ...] > sbom.spdx.json
"""
import argparse
import datetime
import hashlib
import json
import os
import re
import sys
import tomllib
import zipfile


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def spdx_id(kind, name, version):
    return "SPDXRef-%s-%s" % (kind, re.sub(r"[^A-Za-z0-9.-]", "-", "%s-%s" % (name, version)))


def package(kind, name, version, purl, sha=None, licence="NOASSERTION", download="NOASSERTION",
            comment=None):
    p = {
        "SPDXID": spdx_id(kind, name, version),
        "name": name,
        "versionInfo": version,
        "downloadLocation": download,
        "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": licence,
        "copyrightText": "NOASSERTION",
        "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                          "referenceLocator": purl}],
    }
    if sha:
        p["checksums"] = [{"algorithm": "SHA256", "checksumValue": sha}]
    if comment:
        p["comment"] = comment
    return p


def spdx_licence(expr):
    """A crate's licence expression as SPDX (`MIT/Apache-2.0` is the old `OR` spelling)."""
    if not expr:
        return "NOASSERTION"
    expr = expr.replace("/", " OR ")
    return expr if re.fullmatch(r"[A-Za-z0-9.+() -]+", expr) else "NOASSERTION"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--revision", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--debs", required=True)
    ap.add_argument("--crates", required=True)
    ap.add_argument("--cargo-lock", required=True)
    ap.add_argument("--wheel", action="append", default=[])
    ap.add_argument("--binary", action="append", default=[])
    a = ap.parse_args()

    spec = json.load(open(a.image))
    name = spec["name"]
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    image = package("Image", name, a.version, "pkg:oci/%s@%s" % (name, a.version),
                    licence="NOASSERTION", download=a.source,
                    comment="revision %s" % a.revision)
    packages = [image]

    for line in open(a.debs):
        p, v, arch, src, sha = line.rstrip("\n").split("\t")
        packages.append(package(
            "Deb", p, v, "pkg:deb/debian/%s@%s?arch=%s&distro=debian-12" % (p, v, arch), sha,
            comment="Debian source package %s; licences in /usr/share/doc/%s/copyright" % (src, p)))

    for w in sorted(a.wheel):
        with zipfile.ZipFile(w) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(meta).decode()
        field = lambda k: next((l.split(":", 1)[1].strip() for l in text.splitlines()
                                if l.startswith(k + ":")), "")
        wname, wver = field("Name"), field("Version")
        packages.append(package(
            "Wheel", wname, wver, "pkg:pypi/%s@%s" % (wname.lower(), wver), sha256(w),
            licence="LicenseRef-NVIDIA-Proprietary",
            download="https://pypi.org/project/%s/%s/" % (wname, wver),
            comment="%s; licence: %s" % (os.path.basename(w), field("License") or "see the wheel")))

    for b in sorted(a.binary):
        bname = os.path.basename(b)
        packages.append(package("Binary", bname, a.version, "pkg:cargo/moe-operator@%s" % a.version,
                                sha256(b), licence="Apache-2.0", download=a.source,
                                comment="/usr/local/bin/%s, built from revision %s" % (bname, a.revision)))

    lock = tomllib.load(open(a.cargo_lock, "rb"))
    checksums = {(p["name"], p["version"]): p.get("checksum") for p in lock["package"]}
    crates = set()
    for line in open(a.crates):
        # `cargo tree --prefix none --format '{p} {l}'`: "name vX.Y.Z [(source)] [licence]"
        line = line.strip().removesuffix(" (*)")
        m = re.match(r"(\S+) v(\S+)(?: \(([^)]*)\))?(?: (.*))?$", line)
        if not m or m.group(1) == "moe-operator":
            continue
        crates.add((m.group(1), m.group(2), m.group(4) or ""))
    for cname, cver, licence in sorted(crates):
        packages.append(package(
            "Crate", cname, cver, "pkg:cargo/%s@%s" % (cname, cver), checksums.get((cname, cver)),
            licence=spdx_licence(licence),
            download="https://crates.io/api/v1/crates/%s/%s/download" % (cname, cver)))

    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": "%s-%s" % (name, a.version),
        "documentNamespace": "%s/sbom/%s-%s-%s" % (a.source.rstrip("/"), name, a.version, a.revision),
        "creationInfo": {"created": created, "creators": ["Tool: moe-operator images/sbom.py"]},
        "packages": packages,
        "relationships": [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                           "relatedSpdxElement": image["SPDXID"]}]
        + [{"spdxElementId": image["SPDXID"], "relationshipType": "CONTAINS",
            "relatedSpdxElement": p["SPDXID"]} for p in packages[1:]],
    }
    json.dump(doc, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
