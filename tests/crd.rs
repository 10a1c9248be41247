//! The checked-in CRD matches the generator, and the schema has the shape Kubernetes 1.34+ wants.
//!
//! When `crd_file_is_up_to_date` fails, regenerate with:
//!   cargo run --bin moe-operator -- crd > crds/moedeployments.moe.craft.dev.yaml
//!   cp crds/moedeployments.moe.craft.dev.yaml charts/moe-operator/crds/

use std::path::Path;

use moe_operator::api::{crd_yaml, CRD_FILE};
use serde_json::Value;

const REGENERATE: &str = "regenerate with `cargo run --bin moe-operator -- crd > crds/moedeployments.moe.craft.dev.yaml && cp crds/moedeployments.moe.craft.dev.yaml charts/moe-operator/crds/`";

fn repo(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("read {}: {e}; {REGENERATE}", p.display()))
}

#[test]
fn crd_file_is_up_to_date() {
    assert!(
        repo(CRD_FILE) == crd_yaml(),
        "{CRD_FILE} differs from `moe-operator crd`: {REGENERATE}"
    );
}

#[test]
fn chart_crd_is_the_same_file() {
    let chart = "charts/moe-operator/crds/moedeployments.moe.craft.dev.yaml";
    assert!(
        repo(chart) == repo(CRD_FILE),
        "{chart} differs from {CRD_FILE}: {REGENERATE}"
    );
}

fn schema() -> Value {
    let crd: Value = serde_yaml::from_str(&repo(CRD_FILE)).expect("CRD file is YAML");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Subtrees whose schema comes from Kubernetes' own types (k8s-openapi), not from us.
const UPSTREAM: &[&str] = &[
    "env",
    "tolerations",
    "resources",
    "persistentVolumeClaim",
    "hostPath",
    "conditions",
    "initialLoad",
];

fn walk(v: &Value, path: &str, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) => {
            out.push((path.to_string(), v.clone()));
            for (k, child) in m {
                walk(child, &format!("{path}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                walk(child, &format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn no_unsigned_formats_and_our_integers_are_bounded() {
    let mut nodes = Vec::new();
    walk(&schema(), "", &mut nodes);
    for (path, node) in &nodes {
        if let Some(f) = node.get("format").and_then(Value::as_str) {
            assert!(
                !f.starts_with("uint"),
                "{path}: format {f} (Kubernetes 1.34+ warns on uint formats)"
            );
        }
        let ours = !UPSTREAM
            .iter()
            .any(|u| path.contains(&format!("/properties/{u}/")));
        if ours && node.get("type").and_then(Value::as_str) == Some("integer") {
            assert!(
                node.get("minimum").is_some(),
                "{path}: integer without a minimum"
            );
        }
    }
}

#[test]
fn cel_rules_are_present_with_messages() {
    let mut nodes = Vec::new();
    walk(&schema(), "", &mut nodes);
    let mut rules = Vec::new();
    for (path, node) in &nodes {
        if let Some(list) = node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        {
            for r in list {
                let rule = r["rule"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{path}: rule without text"));
                assert!(
                    r["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{path}: rule {rule:?} without a message"
                );
                rules.push(rule.to_string());
            }
        }
    }
    for want in [
        "self.topK <= self.experts",
        "self.firstMoeLayer < self.layers",
        "self.model.experts % (self.topology.nodes * self.topology.gpusPerNode) == 0",
        "self.rollout.maxUnavailable <= self.topology.nodes",
        "has(self.replicasPerGpu) ? 1 : 0",
        "!quantity(self.memoryPerGpu).isLessThan(quantity('0'))",
        "self.layers == oldSelf.layers",
        "self.source != 'Prometheus' || has(self.prometheus)",
    ] {
        assert!(
            rules.iter().any(|r| r.contains(want)),
            "no CEL rule containing {want:?} in {rules:#?}"
        );
    }
}

#[test]
fn names_columns_and_subresources() {
    let crd: Value = serde_yaml::from_str(&repo(CRD_FILE)).unwrap();
    assert_eq!(crd["metadata"]["name"], "moedeployments.moe.craft.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "moed");
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert!(v["subresources"]["status"].is_object());
    let cols: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        cols,
        ["Ready", "Plan", "R", "Balancedness", "Workers", "Age"]
    );
    // Immutable fields and required ones.
    let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let required: Vec<&str> = spec["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for f in ["model", "topology", "worker"] {
        assert!(required.contains(&f), "spec.{f} should be required");
    }
    assert_eq!(
        spec["properties"]["rollout"]["properties"]["maxUnavailable"]["minimum"].as_f64(),
        Some(1.0)
    );
}

/// Every size field carries the maximum of `plan::limits`, so the apiserver refuses at apply what
/// the planner, the readers and the worker would refuse later (the CRD had 4096 layers, 65536
/// experts and top-k, hidden sizes of 2^20 and 64 GPUs per node).
#[test]
fn size_fields_carry_the_limits() {
    use moe_operator::plan::limits::*;
    let spec = &schema()["properties"]["spec"]["properties"];
    for (path, max) in [
        ("model/layers", u64::from(MAX_LAYERS)),
        ("model/firstMoeLayer", u64::from(MAX_LAYERS - 1)),
        ("model/experts", MAX_EXPERTS.into()),
        ("model/topK", MAX_TOP_K.into()),
        ("model/hiddenSize", MAX_HIDDEN_SIZE),
        ("model/expertIntermediateSize", MAX_EXPERT_INTERMEDIATE_SIZE),
        ("topology/nodes", MAX_NODES.into()),
        ("topology/gpusPerNode", MAX_GPUS_PER_NODE.into()),
        (
            "replication/budget/replicasPerGpu",
            MAX_REPLICAS_PER_GPU.into(),
        ),
        ("rollout/maxUnavailable", MAX_NODES.into()),
    ] {
        let mut node = spec;
        for (i, part) in path.split('/').enumerate() {
            node = if i == 0 {
                &node[part]
            } else {
                &node["properties"][part]
            };
        }
        assert_eq!(
            node["maximum"].as_f64(),
            Some(max as f64),
            "spec.{path}: maximum should be {max}; {REGENERATE}"
        );
    }
}

/// The README's "Bad input" table quotes every CEL message; keep them in step with the CRD.
#[test]
fn readme_quotes_every_cel_message() {
    let readme = repo("README.md");
    let mut nodes = Vec::new();
    walk(&schema(), "", &mut nodes);
    for (path, node) in &nodes {
        for r in node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let msg = r["message"].as_str().unwrap();
            assert!(
                readme.contains(msg),
                "README.md does not quote the CEL message at {path}: {msg:?}"
            );
        }
    }
}
