#!/usr/bin/env bash
# Finds or installs an S3-compatible server for the end-to-end test of S3 checkpoints
# (tests/e2e_s3.rs): moto's server (PyPI `moto[server]`, pinned below), which checks SigV4
# signatures and IAM permissions once told to (INITIAL_NO_AUTH_ACTION_COUNT), with boto3 for the
# test's uploads. Installed with pip into a virtual environment in the e2e cache; no root needed.
#
#   e2e/s3.sh          locate it, installing it when missing; print the Python interpreter to run
#                      `python -m moto.server` and e2e/s3-setup.py with
#   e2e/s3.sh --path   only print it (exit 1 when there is none)
#
# Looked up in order: $MOE_S3_PYTHON, `python3` on PATH when it has moto $MOTO_VERSION with its
# server and boto3, the cache (${MOE_E2E_CACHE:-~/.cache/moe-operator-e2e}/moto-$MOTO_VERSION).
set -euo pipefail

MOTO_VERSION=5.2.1
CACHE_ROOT="${MOE_E2E_CACHE:-$HOME/.cache/moe-operator-e2e}"
DEST="$CACHE_ROOT/moto-$MOTO_VERSION"
CACHED="$DEST/bin/python"

has_moto() {
    "$1" - "$MOTO_VERSION" >/dev/null 2>&1 <<'PY'
import sys
import boto3, flask, moto, moto.server  # noqa: F401  (flask: the server's extra)
sys.exit(0 if moto.__version__ == sys.argv[1] else 1)
PY
}

locate() {
    if [[ -n "${MOE_S3_PYTHON:-}" ]]; then
        has_moto "$MOE_S3_PYTHON" || { echo "MOE_S3_PYTHON=$MOE_S3_PYTHON has no moto $MOTO_VERSION server and boto3" >&2; return 1; }
        echo "$MOE_S3_PYTHON"; return 0
    fi
    if command -v python3 >/dev/null 2>&1 && has_moto "$(command -v python3)"; then command -v python3; return 0; fi
    if [[ -x "$CACHED" ]] && has_moto "$CACHED"; then echo "$CACHED"; return 0; fi
    return 1
}

if [[ "${1:-}" == "--path" ]]; then
    locate || { echo "no moto $MOTO_VERSION server: run e2e/s3.sh (needs python3 -m venv and PyPI)" >&2; exit 1; }
    exit 0
fi

if p="$(locate)"; then echo "$p"; exit 0; fi

command -v python3 >/dev/null || { echo "e2e/s3.sh: no python3; install one, or set MOE_S3_PYTHON" >&2; exit 1; }
echo "e2e/s3.sh: installing moto[server]==$MOTO_VERSION into $DEST" >&2
rm -rf "$DEST.partial"
python3 -m venv "$DEST.partial" >&2
"$DEST.partial/bin/python" -m pip install --quiet "moto[server]==$MOTO_VERSION" >&2
rm -rf "$DEST" && mv "$DEST.partial" "$DEST"
# A moved venv still runs through its interpreter: `python -m` finds its site-packages by pyvenv.cfg.
has_moto "$CACHED" || { echo "e2e/s3.sh: the installed moto does not import" >&2; exit 1; }
echo "$CACHED"
