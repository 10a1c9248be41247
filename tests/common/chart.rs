//! The chart rendered offline: `helm template` with the helm of e2e/build.sh, for the Kubernetes
//! version the local control plane runs (e2e/versions.env): a helm built from its Go module
//! assumes 1.20 otherwise, below the chart's `kubeVersion`.
#![allow(dead_code)] // each test binary uses its own part of the harness

use std::path::PathBuf;

use serde_json::Value;

/// The helm of e2e/build.sh; fails, naming the fix, when it is not built.
pub fn helm() -> PathBuf {
    let out = std::process::Command::new(super::repo().join("e2e/build.sh"))
        .arg("--bin-dir")
        .output()
        .expect("running e2e/build.sh --bin-dir");
    let helm = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("helm");
    assert!(
        out.status.success() && helm.exists(),
        "no helm: run e2e/build.sh first"
    );
    helm
}

/// KUBERNETES_VERSION of e2e/versions.env, e.g. `v1.34.4`.
pub fn kube_version() -> String {
    let pins = std::fs::read_to_string(super::repo().join("e2e/versions.env"))
        .expect("reading e2e/versions.env");
    pins.lines()
        .find_map(|l| l.strip_prefix("KUBERNETES_VERSION="))
        .expect("KUBERNETES_VERSION in e2e/versions.env")
        .trim()
        .to_string()
}

/// `helm template rel charts/moe-operator -n ops <args>` as YAML documents.
pub fn render(args: &[&str]) -> Vec<Value> {
    let chart = super::repo().join("charts/moe-operator");
    let out = std::process::Command::new(helm())
        .args(["template", "rel", chart.to_str().unwrap(), "-n", "ops"])
        .args(["--kube-version", &kube_version()])
        .args(args)
        .output()
        .expect("running helm template");
    assert!(
        out.status.success(),
        "helm template {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split("\n---")
        .filter_map(|d| serde_yaml::from_str::<Value>(d).ok())
        .filter(|v| v.is_object())
        .collect()
}
