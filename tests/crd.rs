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
    // Helm installs every file of crds/: a second copy under another name (once written by a
    // regeneration that copied to the directory) would install whichever it read last.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/moe-operator/crds");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("the chart's crds/")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["moedeployments.moe.craft.dev.yaml"],
        "charts/moe-operator/crds/ must hold exactly the one CRD file: {REGENERATE}"
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
    "affinity",
    "topologySpreadConstraints",
    "imagePullSecrets",
    "configMap",
    "secret",
    "emptyDir",
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
        "!(self.dataPlane.port in [self.worker.ports.dispatch",
        "self.dataPlane.transport != 'nccl' || !has(self.worker.device) || self.worker.device != 'cpu'",
        "self.all(k, k.startsWith('NCCL_'))",
        "quantity(self.shmSize).isGreaterThan(quantity('0'))",
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
    // The scale subresource: `kubectl scale` and a HorizontalPodAutoscaler size the EP groups.
    let scale = &v["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.replicas");
    assert_eq!(scale["statusReplicasPath"], ".status.replicas");
    assert_eq!(scale["labelSelectorPath"], ".status.selector");
    let replicas = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["replicas"];
    assert_eq!(replicas["minimum"], 0.0);
    assert_eq!(replicas["default"], 1);
    let cols: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        cols,
        [
            "Ready",
            "Plan",
            "R",
            "Balancedness",
            "Workers",
            "Groups",
            "Age"
        ]
    );
    // Printer columns cannot format numbers: a float column prints 16 digits
    // (`0.9817604634467675`). Floats are shown through a 3-digit string field instead.
    for c in v["additionalPrinterColumns"].as_array().unwrap() {
        assert_ne!(
            c["type"], "number",
            "printer column {} is a float: {c:?}",
            c["name"]
        );
    }
    let bal = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "Balancedness")
        .unwrap();
    assert_eq!(bal["jsonPath"], ".status.observed.balancednessText");
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

/// The "Bad input" table of docs/api.md quotes every CEL message; keep them in step with the CRD.
#[test]
fn api_doc_quotes_every_cel_message() {
    let doc = repo("docs/api.md");
    let start = doc
        .find("## Bad input")
        .expect("docs/api.md has a \"## Bad input\" section");
    let bad_input = &doc[start..];
    let mut nodes = Vec::new();
    let mut checked = 0;
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
                bad_input.contains(msg),
                "docs/api.md (\"Bad input\") does not quote the CEL message at {path}: {msg:?}"
            );
            checked += 1;
        }
    }
    assert!(
        checked > 0,
        "the CRD has no CEL messages: is the schema walk broken?"
    );
}

/// `helm` from the e2e build (e2e/build.sh) or PATH. Without it the chart-rendering tests fail
/// under CI and are skipped, loudly, elsewhere.
fn helm() -> Option<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let from_build = std::process::Command::new(root.join("e2e/build.sh"))
        .arg("--bin-dir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| Path::new(String::from_utf8_lossy(&o.stdout).trim()).join("helm"));
    let found = from_build.filter(|p| p.exists()).or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("helm"))
                .find(|p| p.exists())
        })
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set and there is no helm: run e2e/build.sh first"
        );
        eprintln!("!!!!!!!! no helm (run e2e/build.sh): chart rendering not tested");
    }
    found
}

/// KUBERNETES_VERSION of e2e/versions.env.
fn kube_version() -> String {
    repo("e2e/versions.env")
        .lines()
        .find_map(|l| l.strip_prefix("KUBERNETES_VERSION="))
        .expect("KUBERNETES_VERSION in e2e/versions.env")
        .trim()
        .to_string()
}

/// `helm template` of the chart with `args`, as YAML documents.
fn render(helm: &Path, args: &[&str]) -> Vec<Value> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/moe-operator");
    let out = std::process::Command::new(helm)
        .args([
            "template",
            "rel",
            chart.to_str().unwrap(),
            "--namespace",
            "ops",
            // A helm built from its Go module assumes Kubernetes 1.20, below the chart's
            // kubeVersion: render for the version the local control plane runs.
            "--kube-version",
            &kube_version(),
        ])
        .args(args)
        .output()
        .expect("running helm template");
    assert!(
        out.status.success(),
        "helm template {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.split("\n---")
        .filter_map(|d| serde_yaml::from_str::<Value>(d).ok())
        .filter(|v| v.is_object())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The chart's NetworkPolicy selects exactly the pods `controller::build` makes workers of, by
/// their labels, and names their ports as build names them: the admin port only from the
/// operator's own pods (the Deployment's pod labels, in the release namespace), the EP ranks' `ep`
/// ports (`ep`, `ep-1`, ... for local ranks past the first) only from worker pods of the
/// namespace, dispatch and metrics from anywhere.
#[test]
fn network_policy_opens_the_admin_port_to_the_operator_only() {
    use moe_operator::api::MoEDeployment;
    let Some(helm) = helm() else { return };
    let md: MoEDeployment = serde_yaml::from_str(&repo("examples/demo.yaml")).unwrap();
    let mut md = md;
    md.metadata.uid = Some("u".into());
    // An EP group on nodes of the most GPUs a node may have: every rank port the policy names.
    md.spec.data_plane.transport = moe_operator::api::Transport::Tcp;
    md.spec.topology.gpus_per_node = moe_operator::plan::limits::MAX_GPUS_PER_NODE as i32;
    let policy = moe_operator::api::pod_policy::PodPolicy {
        host_path_prefixes: vec!["/var/lib/moe".into()],
        ..Default::default()
    };
    let spec = moe_operator::api::validate::validate(&md.spec, &policy).unwrap();
    let pod = moe_operator::controller::build::worker_pod(&md, &spec, 0, "h").unwrap();
    let pod_labels = pod.metadata.labels.clone().unwrap();
    let port_names: Vec<String> = pod.spec.as_ref().unwrap().containers[0]
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();

    let docs = render(&helm, &["--set", "networkPolicy.namespaces={ml,ml-2}"]);
    let nps = of_kind(&docs, "NetworkPolicy");
    assert_eq!(nps.len(), 2, "one NetworkPolicy per namespace");
    let operator_labels =
        &of_kind(&docs, "Deployment")[0]["spec"]["template"]["metadata"]["labels"];
    for (np, ns) in nps.iter().zip(["ml", "ml-2"]) {
        assert_eq!(np["metadata"]["namespace"], ns);
        let spec = &np["spec"];
        for (k, v) in spec["podSelector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(
                pod_labels.get(k).map(String::as_str),
                v.as_str(),
                "worker pods lack the selector label {k}"
            );
        }
        assert_eq!(spec["policyTypes"], serde_json::json!(["Ingress"]));
        let rules = spec["ingress"].as_array().unwrap();
        assert_eq!(rules.len(), 3, "{rules:?}");
        let names = |r: &Value| -> Vec<String> {
            r["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["port"].as_str().unwrap().to_string())
                .collect()
        };
        for r in rules {
            for n in names(r) {
                assert!(
                    port_names.contains(&n),
                    "worker pods have no port named {n}"
                );
            }
        }
        assert_eq!(names(&rules[0]), ["admin"]);
        let from = rules[0]["from"].as_array().unwrap();
        assert_eq!(from.len(), 1);
        assert_eq!(
            from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "ops"
        );
        for (k, v) in from[0]["podSelector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&operator_labels[k], v, "operator pods lack {k}");
        }
        // The EP ranks' port: from worker pods of the namespace only (the peers).
        let ep: Vec<String> = std::iter::once("ep".to_string())
            .chain((1..moe_operator::plan::limits::MAX_GPUS_PER_NODE).map(|i| format!("ep-{i}")))
            .collect();
        assert_eq!(names(&rules[1]), ep);
        let from = rules[1]["from"].as_array().unwrap();
        assert_eq!(from.len(), 1);
        assert!(from[0].get("namespaceSelector").is_none());
        for (k, v) in from[0]["podSelector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(
                pod_labels.get(k).map(String::as_str),
                v.as_str(),
                "worker pods lack the peer selector label {k}"
            );
        }
        assert_eq!(names(&rules[2]), ["dispatch", "metrics"]);
        assert!(
            rules[2].get("from").is_none(),
            "dispatch and metrics stay open"
        );
    }
    // watchNamespace is the default namespace list; without either there is nothing to protect,
    // and the value turns it off.
    let docs = render(&helm, &["--set", "watchNamespace=ml"]);
    assert_eq!(
        of_kind(&docs, "NetworkPolicy")[0]["metadata"]["namespace"],
        "ml"
    );
    assert!(of_kind(&render(&helm, &[]), "NetworkPolicy").is_empty());
    let off = render(
        &helm,
        &[
            "--set",
            "networkPolicy.namespaces={ml}",
            "--set",
            "networkPolicy.enabled=false",
        ],
    );
    assert!(of_kind(&off, "NetworkPolicy").is_empty());
}

/// The chart's `podPolicy` values reach the operator as the flags `PodPolicyArgs` defines, and
/// mean the policy they say.
#[test]
fn chart_pod_policy_values_become_operator_flags() {
    use clap::Parser;
    use moe_operator::api::pod_policy::{PodPolicy, PodPolicyArgs};
    let Some(helm) = helm() else { return };
    let values =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/moe-operator/ci/full-values.yaml");
    let docs = render(&helm, &["-f", values.to_str().unwrap()]);
    let args: Vec<String> = of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"]
        ["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .filter(|a| a.starts_with("--allow") || a.starts_with("--prometheus"))
        .collect();
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        policy: PodPolicyArgs,
    }
    let cli = Cli::try_parse_from(std::iter::once("moe-operator".to_string()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let p = PodPolicy::from_args(&cli.policy).unwrap();
    assert_eq!(p.host_path_prefixes, ["/var/lib/moe"]);
    assert_eq!(p.service_accounts, ["model-reader"]);
    assert_eq!(p.image_prefixes, ["ghcr.io/moe-operator/moe-worker:"]);
    assert!(p.allow_env_secret_refs);
    assert_eq!(
        p.prometheus_url_prefixes[0].to_string(),
        "https://prometheus.monitoring:9090"
    );
    assert_eq!(
        p.prometheus_ca_file.as_deref(),
        Some(Path::new("/etc/moe-operator/prometheus-ca/ca.crt"))
    );
    assert!(p.allow_ipc_lock && p.allow_rdma_resources);
    assert_eq!(p.capabilities, ["SYS_PTRACE"]);
    assert!(p.allow_secret_volumes);
    // The defaults pass no policy flag: the operator's restrictive default.
    let docs = render(&helm, &[]);
    let default_args = of_kind(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
        ["args"]
        .to_string();
    assert!(!default_args.contains("--allow"), "{default_args}");
}
