//! The sample MoEDeployments parse as the API types and pass validation.

use moe_operator::api::pod_policy::{PodPolicy, PodPolicyArgs};
use moe_operator::api::validate::validate;

/// The policy of a cluster whose admin allows the examples' checkpoint host directory
/// (`--allow-host-path-prefix=/var/lib/moe`, chart value podPolicy.hostPathPrefixes) and their
/// Prometheus: the invalid examples must be refused for their own defect, not for their hostPath
/// or their Prometheus URL.
fn policy() -> PodPolicy {
    PodPolicy::from_args(&PodPolicyArgs {
        host_path_prefixes: vec!["/var/lib/moe".into()],
        prometheus_url_prefixes: vec!["http://prometheus.monitoring:9090".into()],
        ..Default::default()
    })
    .unwrap()
}
use moe_operator::api::MoEDeployment;

#[test]
fn demo_example_is_a_valid_moedeployment() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let md: MoEDeployment = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(md.metadata.name.as_deref(), Some("demo"));
    let spec = validate(&md.spec, &policy());
    assert!(spec.is_ok(), "{path}: {spec:?}");
    // The demo stays within what CEL checks too.
    let s = &md.spec;
    assert!(s.model.top_k <= s.model.experts && s.model.first_moe_layer < s.model.layers);
    assert!(s.rollout.max_unavailable <= s.topology.nodes);
}

/// Every spec in examples/invalid/ (each refused by the CRD's schema or CEL rules, see the "Bad
/// input" table of docs/api.md) is also refused by the operator's own checks: it fails to parse as
/// the API types, or validation reports it. So an object that slipped past an outdated CRD is still
/// caught.
#[test]
fn invalid_examples_are_refused_by_parsing_or_validation() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/invalid");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        seen += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        match serde_yaml::from_str::<MoEDeployment>(&text) {
            Err(_) => {}
            Ok(md) => assert!(
                validate(&md.spec, &policy()).is_err(),
                "{}: validation accepts it",
                path.display()
            ),
        }
    }
    assert!(seen >= 20, "only {seen} invalid examples in {dir}");
}

/// The invalid examples of `spec.engine`, `metrics.prometheus.seriesLabels` and
/// `replication.stepTime` are refused for their own field (None: they do not even parse).
#[test]
fn engine_series_and_step_time_examples_name_their_own_field() {
    for (file, want) in [
        ("engine-workers.yaml", Some("spec.metrics.source")),
        ("engine-layout-flag.yaml", Some("spec.engine.args[2]")),
        ("engine-kind.yaml", None),
        (
            "series-label.yaml",
            Some("spec.metrics.prometheus.seriesLabels.layer"),
        ),
        (
            "series-label-same.yaml",
            Some("spec.metrics.prometheus.seriesLabels"),
        ),
        ("steptime-eplb.yaml", Some("spec.replication.stepTime")),
        (
            "steptime-tokens.yaml",
            Some("spec.replication.stepTime.tokensPerStep"),
        ),
    ] {
        let path = format!("{}/examples/invalid/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed = serde_yaml::from_str::<MoEDeployment>(&text);
        match (want, parsed) {
            (None, parsed) => assert!(parsed.is_err(), "{file} parses"),
            (Some(field), Ok(md)) => {
                let errs = validate(&md.spec, &policy()).expect_err(file);
                let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
                assert_eq!(paths, [field], "{file}: {errs:?}");
            }
            (Some(_), Err(e)) => panic!("{file} does not parse: {e}"),
        }
    }
}
