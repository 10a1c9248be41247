//! The chart's PrometheusRule (charts/moe-operator/templates/prometheusrule.yaml): it renders only
//! when asked for; every metric its expressions read is one the operator or the worker really
//! exports (their registries rendered here, every family populated, not a grep), or a series it
//! records itself, or Prometheus's own `up`; and, with Debian's promtool (e2e/prometheus.sh),
//! the rules load and compute what they say on synthetic series (`promtool test rules`).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

fn rule(args: &[&str]) -> Option<Value> {
    common::chart::render(args)
        .into_iter()
        .find(|d| d["kind"] == "PrometheusRule")
}

/// Names of the samples in a text exposition.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// Every series name the operator and a worker (with EP ranks) export, each family populated.
fn exported() -> BTreeSet<String> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use moe_operator::worker::metrics::WorkerMetrics;
    let op = moe_operator::controller::telemetry::Metrics::new();
    op.observe_reconcile(Duration::from_millis(5), Some("kube"));
    op.set_balancedness("ml/d", Some(0.9));
    op.set_rollout("ml/d", 1, 2);
    op.set_leader(true);
    op.set_conditions(
        "ml/d",
        &[Condition {
            type_: "Degraded".into(),
            status: "True".into(),
            reason: "InvalidSpec".into(),
            message: String::new(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
            observed_generation: None,
        }],
    );
    op.count_replan("applied", "PlanImproved");
    op.count_scrape_failure("ml", "d", "prometheus", "Unreachable");
    let mut names = sample_names(&op.encode());

    let w = WorkerMetrics::new();
    w.init_counters(&moe_operator::plan::ModelShape {
        layers: 2,
        first_moe_layer: 0,
        experts: 4,
        top_k: 2,
        hidden_size: 8,
        expert_intermediate_size: 4,
        dtype: moe_operator::plan::Dtype::Bf16,
    });
    w.counters().unwrap().add_rows(1, &[0]);
    w.set_plan("h", 2);
    w.observe_step(0.001);
    w.count_error(moe_operator::worker::protocol::ErrorCode::NotResident);
    w.ep().count_failure();
    names.extend(sample_names(&w.render()));
    names
}

/// (recorded names, metric names read, expressions) of the rule.
fn names_in(rule: &Value) -> (BTreeSet<String>, BTreeSet<String>, Vec<String>) {
    let mut recorded = BTreeSet::new();
    let mut read = BTreeSet::new();
    let mut exprs = Vec::new();
    for g in rule["spec"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            if let Some(rec) = r["record"].as_str() {
                recorded.insert(rec.to_string());
            }
            let expr = r["expr"].as_str().unwrap().to_string();
            // Identifiers outside string literals and label matchers' values.
            let mut in_string = false;
            let mut ident = String::new();
            for ch in expr.chars().chain(std::iter::once(' ')) {
                if ch == '"' {
                    in_string = !in_string;
                    ident.clear();
                    continue;
                }
                if in_string {
                    continue;
                }
                if ch.is_ascii_alphanumeric() || ch == '_' || ch == ':' {
                    ident.push(ch);
                } else {
                    if ident.starts_with("moe") || ident == "up" {
                        read.insert(ident.clone());
                    }
                    ident.clear();
                }
            }
            exprs.push(expr);
        }
    }
    (recorded, read, exprs)
}

#[test]
fn rules_render_on_request_and_read_only_exported_metrics() {
    assert!(rule(&[]).is_none(), "the PrometheusRule is opt-in");
    let r = rule(&["--set", "prometheusRule.enabled=true"]).expect("rendered when enabled");
    let (recorded, read, _) = names_in(&r);
    let exported = exported();
    assert!(exported.contains("moe_expert_tokens_total"), "{exported:?}");
    let mut unknown = Vec::new();
    for name in &read {
        let ok = recorded.contains(name) || exported.contains(name) || name == "up";
        if !ok {
            unknown.push(name.clone());
        }
    }
    assert!(
        unknown.is_empty(),
        "the PrometheusRule reads series nothing exports: {unknown:?}\nexported: {exported:?}"
    );
    // Recording rules follow level:metric:operations and every one is used or meant for panels.
    for rec in &recorded {
        assert_eq!(rec.matches(':').count(), 2, "{rec}");
        assert!(rec.starts_with("moe:"), "{rec}");
    }
}

/// promtool of the Debian package e2e/prometheus.sh unpacks (next to its prometheus).
fn promtool() -> Option<PathBuf> {
    let out = std::process::Command::new(common::repo().join("e2e/prometheus.sh"))
        .arg("--path")
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        .parent()?
        .join("promtool");
    let found = out.status.success() && p.exists();
    let ci = std::env::var("CI")
        .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"));
    assert!(
        found || !ci,
        "CI is set and there is no promtool: run e2e/prometheus.sh"
    );
    if !found {
        eprintln!("!!!!!!!! no promtool (run e2e/prometheus.sh): the rules' PromQL is not checked");
    }
    found.then_some(p)
}

#[test]
fn promtool_loads_the_rules_and_they_compute_what_they_say() {
    let Some(promtool) = promtool() else { return };
    let r = rule(&["--set", "prometheusRule.enabled=true"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, serde_yaml::to_string(&r["spec"]).unwrap()).unwrap();
    let check = std::process::Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // Deployment ml/d: expert 0 of layer 1 served by two workers at 10 tokens/s each, expert 1 by
    // one at 5/s; its Degraded condition True; one worker target down.
    let tests = serde_json::json!({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": "moe_expert_tokens_total{namespace=\"ml\",deployment=\"d\",pod=\"w0\",layer=\"1\",expert=\"0\"}", "values": "0+600x20"},
                {"series": "moe_expert_tokens_total{namespace=\"ml\",deployment=\"d\",pod=\"w1\",layer=\"1\",expert=\"0\"}", "values": "0+600x20"},
                {"series": "moe_expert_tokens_total{namespace=\"ml\",deployment=\"d\",pod=\"w0\",layer=\"1\",expert=\"1\"}", "values": "0+300x20"},
                {"series": "moe_operator_deployment_condition{deployment=\"ml/d\",condition=\"Degraded\"}", "values": "1x20"},
                {"series": "moe_operator_deployment_condition{deployment=\"ml/e\",condition=\"Degraded\"}", "values": "0x20"},
                {"series": "up{namespace=\"ml\",deployment=\"d\",pod=\"w0\"}", "values": "1x20"},
                {"series": "up{namespace=\"ml\",deployment=\"d\",pod=\"w1\"}", "values": "0x20"},
                {"series": "moe_operator_leader{pod=\"op-a\"}", "values": "1x20"},
                {"series": "moe_operator_leader{pod=\"op-b\"}", "values": "0x20"},
                {"series": "moe_operator_scrape_failures_total{namespace=\"ml\",name=\"d\",source=\"prometheus\",reason=\"PrometheusAuthRefused\"}", "values": "0+1x20"},
                {"series": "moe_operator_scrape_failures_total{namespace=\"ml\",name=\"e\",source=\"workers\",reason=\"Unreachable\"}", "values": "0x20"},
                {"series": "moe_operator_replan_decisions_total{outcome=\"kept\",reason=\"CoolingDown\"}", "values": "0+60x120"}
            ],
            // Exact label sets: the recorded series keep no pod or instance.
            "promql_expr_test": [
                {"expr": "moe:layer_tokens:rate5m", "eval_time": "10m",
                 "exp_samples": [{"labels": "moe:layer_tokens:rate5m{namespace=\"ml\",deployment=\"d\",layer=\"1\"}", "value": 25}]},
                {"expr": "moe:deployment_tokens:rate5m", "eval_time": "10m",
                 "exp_samples": [{"labels": "moe:deployment_tokens:rate5m{namespace=\"ml\",deployment=\"d\"}", "value": 25}]},
                {"expr": "moe:layer_expert_evenness:5m", "eval_time": "10m",
                 "exp_samples": [{"labels": "moe:layer_expert_evenness:5m{namespace=\"ml\",deployment=\"d\",layer=\"1\"}", "value": 0.625}]},
                {"expr": "moe:layer_worker_balancedness:5m", "eval_time": "10m",
                 "exp_samples": [{"labels": "moe:layer_worker_balancedness:5m{namespace=\"ml\",deployment=\"d\",layer=\"1\"}", "value": 0.8333333333333334}]},
                {"expr": "moe:deployment_worker_balancedness:5m", "eval_time": "10m",
                 "exp_samples": [{"labels": "moe:deployment_worker_balancedness:5m{namespace=\"ml\",deployment=\"d\"}", "value": 0.8333333333333334}]},
                {"expr": "moe:operator_replan_decisions:rate1h", "eval_time": "100m",
                 "exp_samples": [{"labels": "moe:operator_replan_decisions:rate1h{outcome=\"kept\",reason=\"CoolingDown\"}", "value": 1}]}
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "MoEDeploymentDegraded", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "deployment": "ml/d"},
                    "exp_annotations": {
                        "summary": "MoEDeployment ml/d is Degraded",
                        "description": "The operator holds ml/d back (an invalid spec, a refused pod field, a failed EP rank); `kubectl moe explain` names the reason."
                    }
                }]},
                {"eval_time": "10m", "alertname": "MoEWorkerScrapeFailing", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "namespace": "ml", "deployment": "d"},
                    "exp_annotations": {
                        "summary": "Prometheus cannot scrape workers of ml/d",
                        "description": "The load the operator plans from is not being collected (workerServiceMonitor)."
                    }
                }]},
                {"eval_time": "10m", "alertname": "MoEOperatorNoLeader", "exp_alerts": []},
                // One failure a minute: 15 in 15 minutes for ml/d; none for ml/e.
                {"eval_time": "16m", "alertname": "MoEOperatorLoadUnavailable", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "namespace": "ml", "name": "d", "source": "prometheus", "reason": "PrometheusAuthRefused"},
                    "exp_annotations": {
                        "summary": "The operator cannot read the load of ml/d (prometheus, PrometheusAuthRefused)",
                        "description": "More than 3 failed load readings in 15 minutes; the deployment keeps its plan but is not re-planned (its MetricsAvailable condition says why)."
                    }
                }]}
            ]
        }]
    });
    let test_file = dir.path().join("tests.yaml");
    std::fs::write(&test_file, serde_yaml::to_string(&tests).unwrap()).unwrap();
    let out = std::process::Command::new(&promtool)
        .args(["test", "rules"])
        .arg(&test_file)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
