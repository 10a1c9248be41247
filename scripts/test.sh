#!/usr/bin/env bash
# Runs every test tier that needs no GPU: format, lints, unit/property/golden tests, and the
# end-to-end tests on the local control plane. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> e2e/build.sh (local control plane binaries; cached, seconds when warm)"
e2e/build.sh
echo "==> e2e/build-scheduler-plugins.sh (the coscheduling scheduler for tests/e2e_coscheduling.rs; cached)"
if [[ -n "${CI:-}" && "${CI}" != 0 && "${CI}" != false ]]; then
    e2e/build-scheduler-plugins.sh
else
    e2e/build-scheduler-plugins.sh || echo "warning: no coscheduling scheduler; tests/e2e_coscheduling.rs will skip (it fails under CI)"
fi
echo "==> e2e/prometheus.sh (Debian's Prometheus for the metrics-source e2e test; cached)"
if [[ -n "${CI:-}" && "${CI}" != 0 && "${CI}" != false ]]; then
    e2e/prometheus.sh
else
    e2e/prometheus.sh || echo "warning: no Prometheus; tests/e2e_prometheus*.rs and tests/e2e_engine.rs will skip (they fail under CI)"
fi
echo "==> e2e/s3.sh (moto's S3 server from PyPI for the S3 checkpoint e2e test; cached)"
if [[ -n "${CI:-}" && "${CI}" != 0 && "${CI}" != false ]]; then
    e2e/s3.sh
else
    e2e/s3.sh || echo "warning: no S3 server; tests/e2e_s3.rs will skip (it fails under CI)"
fi
echo "==> cargo test"
cargo test --locked --all-targets
echo "==> scripts/demo.sh --short (the README's demo through the operator and its chart, shortened)"
MOE_DEMO_PREBUILT=1 scripts/demo.sh --short --out target/demo-short
python3 scripts/demo_report.py --check target/demo-short/report.json
