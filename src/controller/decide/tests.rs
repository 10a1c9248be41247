//! The reconcile's decisions, case by case, without a cluster: the cases the e2e tests drive
//! through a real API server (first plan, workers coming up, Ready, a better plan rolled in place
//! one worker at a time, cooldown, invalid specs, a missing initial load, token rotation, failed
//! scrapes, the pod-policy backstop, a failed EP rank's group restart), each from the state the
//! cluster would show.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{ConfigMap, PodCondition, PodStatus};
use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::api::validate::validate;
use crate::api::MoEDeploymentSpec;
use crate::controller::observe::{MetricsFailure, Source};
use crate::worker::wire::WorkerSample;

const NOW: i64 = 1_800_000_000;

fn t(s: i64) -> Time {
    Time(Timestamp::from_second(s).unwrap())
}

/// The demo deployment (2 nodes x 2 GPUs, 16 experts in 3 MoE layers), with `extra` YAML merged
/// over its spec.
fn deployment(extra: &str) -> MoEDeployment {
    let mut spec: serde_json::Value = serde_yaml::from_str(
        r#"
model: {layers: 4, firstMoeLayer: 1, experts: 16, topK: 2, hiddenSize: 64,
        expertIntermediateSize: 32, checkpoint: {path: /models/tiny}}
topology: {nodes: 2, gpusPerNode: 2}
worker: {image: "moe-worker:dev"}
"#,
    )
    .unwrap();
    let extra: serde_json::Value = serde_yaml::from_str(extra).unwrap();
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    let spec: MoEDeploymentSpec = serde_json::from_value(spec).unwrap();
    let mut md = MoEDeployment::new("demo", spec);
    md.metadata.namespace = Some("ml".into());
    md.metadata.uid = Some("uid-1".into());
    md.metadata.generation = Some(1);
    md
}

fn spec_of(md: &MoEDeployment) -> ValidSpec {
    validate(&md.spec, &PodPolicy::default()).unwrap()
}

fn fetched(status: MoEDeploymentStatus, plan: Option<ExpertPlan>, pods: Vec<Pod>) -> Fetched {
    Fetched {
        status,
        stored_plan: plan,
        initial_load: None,
        token: "tok".into(),
        minted: false,
        pods,
    }
}

fn run_with(
    md: &MoEDeployment,
    f: &Fetched,
    o: &Observed,
    policy: &PodPolicy,
    now_s: i64,
) -> Decision {
    let spec = spec_of(md);
    decide(&Inputs {
        md,
        spec: &spec,
        fetched: f,
        observed: o,
        pod_policy: policy,
        push_timeout: Duration::from_secs(600),
        now: &t(now_s),
        now_s: now_s as f64,
    })
    .unwrap()
}

fn run(md: &MoEDeployment, f: &Fetched, o: &Observed) -> Decision {
    run_with(md, f, o, &PodPolicy::default(), NOW)
}

use k8s_openapi::api::core::v1::Pod;

/// The desired pods as the kubelet would show them: running, Ready, on `plan` per their scrape.
fn running(d: &Decision, plan: &str) -> (Vec<Pod>, HashMap<String, WorkerSample>) {
    let pods: Vec<Pod> = d
        .rollout
        .as_ref()
        .unwrap()
        .desired
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut p = p.clone();
            p.status = Some(PodStatus {
                pod_ip: Some(format!("10.0.0.{i}")),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            });
            p
        })
        .collect();
    let scraped = pods
        .iter()
        .map(|p| {
            let s = WorkerSample {
                tokens: BTreeMap::new(),
                plan_hash: Some(plan.to_string()),
            };
            (p.name_any(), s)
        })
        .collect();
    (pods, scraped)
}

fn cond<'a>(s: &'a MoEDeploymentStatus, kind: &str) -> (&'a str, &'a str) {
    let c = s.conditions.iter().find(|c| c.type_ == kind).unwrap();
    (c.status.as_str(), c.reason.as_str())
}

/// The plan decisions of `d` as (outcome, reason), as the operator's counter labels them.
fn verdicts(d: &Decision) -> Vec<(&'static str, &'static str)> {
    d.replans
        .iter()
        .map(|v| (v.outcome.label(), v.reason))
        .collect()
}

fn reasons(d: &Decision) -> Vec<&'static str> {
    d.events.iter().map(|n| n.reason).collect()
}

/// A window where each layer's first two experts take most tokens.
fn skewed(spec: &ValidSpec) -> LoadWindow {
    let ids = moe_layer_ids(&spec.shape);
    let e = spec.shape.experts as usize;
    let counts = (0..ids.len() * e)
        .map(|i| if i % e < 2 { 50_000.0 } else { 100.0 })
        .collect();
    LoadWindow::new(ids, e, counts).unwrap()
}

fn fresh() -> Observed {
    Observed {
        fresh: true,
        ..Default::default()
    }
}

#[test]
fn first_reconcile_plans_placement_and_creates_every_worker() {
    let md = deployment("{}");
    let d = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    assert_eq!(reasons(&d), vec![reason::INITIAL_PLAN]);
    assert_eq!(verdicts(&d), vec![("applied", reason::INITIAL_PLAN)]);
    let r = d.rollout.as_ref().unwrap();
    assert_eq!(r.plan.algorithm, Algorithm::Placement);
    assert_eq!(r.step0().create, vec![0, 1]);
    assert!(r.step0().delete.is_empty() && r.step0().push.is_empty());
    assert_eq!(r.desired.pods.len(), 2);
    let s = d.status.as_ref().unwrap();
    assert_eq!(s.plan.as_ref().unwrap().hash, r.plan.hash);
    assert_eq!(cond(s, condition::DEGRADED), ("False", reason::SPEC_VALID));
    assert_eq!(cond(s, condition::PLAN_READY), ("True", reason::PLANNED));
    assert_eq!(cond(s, condition::READY), ("False", reason::ROLLING_OUT));
    assert_eq!(
        cond(s, condition::PROGRESSING),
        ("True", reason::ROLLING_OUT)
    );
    assert_eq!(
        cond(s, condition::METRICS_AVAILABLE),
        ("True", reason::SCRAPED)
    );
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(d.requeue, BUSY_REQUEUE);
    // Policy None plans a contiguous layout instead.
    let none = deployment("{replication: {policy: None}}");
    let d = run(&none, &fetched(Default::default(), None, vec![]), &fresh());
    assert_eq!(d.rollout.unwrap().plan.algorithm, Algorithm::None);
}

#[test]
fn workers_ready_on_the_plan_make_it_ready_and_then_nothing_changes() {
    let md = deployment("{}");
    let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    let plan = first.rollout.as_ref().unwrap().plan.clone();
    let status = first.status.clone().unwrap();
    let (pods, scraped) = running(&first, &plan.hash);
    let obs = Observed {
        scraped,
        fresh: true,
        ..Default::default()
    };
    let d = run(
        &md,
        &fetched(status, Some(plan.clone()), pods.clone()),
        &obs,
    );
    assert!(d.events.is_empty(), "{:?}", d.events);
    let r = d.rollout.as_ref().unwrap();
    assert!(r.step0().done && r.step0().create.is_empty() && r.step0().push.is_empty());
    let s = d.status.clone().unwrap();
    assert_eq!(cond(&s, condition::READY), ("True", reason::WORKERS_READY));
    assert_eq!(
        cond(&s, condition::PROGRESSING),
        ("False", reason::ROLLOUT_COMPLETE)
    );
    assert_eq!(s.workers.as_ref().unwrap().summary, "2/2");
    assert_eq!(d.requeue, Duration::from_secs(30), "the metrics interval");
    // The same world again, later: no status write, no Event.
    let again = run_with(
        &md,
        &fetched(s, Some(plan), pods),
        &obs,
        &PodPolicy::default(),
        NOW + 60,
    );
    assert_eq!(again.status, None);
    assert!(again.events.is_empty());
    assert!(again.replans.is_empty(), "no load: nothing decided");
}

#[test]
fn a_better_plan_rolls_in_place_one_worker_at_a_time_after_the_cooldown() {
    let md = deployment("{replication: {budget: {replicasPerGpu: 2}, cooldown: 5m}}");
    let spec = spec_of(&md);
    let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    let plan = first.rollout.as_ref().unwrap().plan.clone();
    let mut status = first.status.clone().unwrap();
    let (pods, scraped) = running(&first, &plan.hash);
    let obs = Observed {
        scraped,
        window: Some(skewed(&spec)),
        window_changed: true,
        fresh: true,
        ..Default::default()
    };
    // Within the cooldown of the plan in force: kept, the observed load recorded.
    let d = run(
        &md,
        &fetched(status.clone(), Some(plan.clone()), pods.clone()),
        &obs,
    );
    assert!(d.events.is_empty(), "{:?}", d.events);
    assert_eq!(d.rollout.as_ref().unwrap().plan.hash, plan.hash);
    let o = d.status.as_ref().unwrap().observed.clone().unwrap();
    // The printer column's text is the number with 3 digits.
    assert_eq!(
        o.balancedness_text.as_deref(),
        Some(format!("{:.3}", o.balancedness.unwrap()).as_str())
    );
    assert_eq!(o.balancedness_text.as_ref().unwrap().len(), 5);
    assert_eq!(verdicts(&d), vec![("kept", reason::COOLING_DOWN)]);
    // Past it: the candidate rolls out, one worker pushed at a time (maxUnavailable 1).
    status.plan.as_mut().unwrap().computed_at = Some(t(NOW - 301));
    let d = run(
        &md,
        &fetched(status.clone(), Some(plan.clone()), pods.clone()),
        &obs,
    );
    assert_eq!(reasons(&d), vec![reason::PLAN_IMPROVED]);
    assert_eq!(verdicts(&d), vec![("applied", reason::PLAN_IMPROVED)]);
    // Once the candidate is the plan in force, the same window gives nothing better: kept.
    let candidate = d.rollout.as_ref().unwrap().plan.clone();
    let same = run(&md, &fetched(status, Some(candidate), pods), &obs);
    assert_eq!(
        verdicts(&same),
        vec![("kept", reason::GAIN_BELOW_MIN_IMPROVEMENT)]
    );
    let r = d.rollout.as_ref().unwrap();
    assert_ne!(r.plan.hash, plan.hash);
    assert_eq!(r.plan.algorithm, Algorithm::Craft);
    assert_eq!(r.step0().push, vec![0]);
    assert!(r.step0().delete.is_empty());
    let s = d.status.as_ref().unwrap();
    let ps = s.plan.as_ref().unwrap();
    assert_eq!(ps.hash, r.plan.hash);
    assert!(ps.previous_balancedness.unwrap() < ps.predicted_balancedness.unwrap());
    assert_eq!(cond(s, condition::READY), ("False", reason::ROLLING_OUT));
}

#[test]
fn a_replan_the_planner_cannot_make_is_counted_rejected() {
    let md = deployment("{replication: {budget: {replicasPerGpu: 2}}}");
    let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    let plan = first.rollout.as_ref().unwrap().plan.clone();
    let (pods, scraped) = running(&first, &plan.hash);
    // A window of another model's shape (one layer of three experts): the planner refuses it.
    let obs = Observed {
        scraped,
        window: Some(LoadWindow::new(vec![0], 3, vec![1.0, 2.0, 3.0]).unwrap()),
        window_changed: true,
        fresh: true,
        ..Default::default()
    };
    let d = run(
        &md,
        &fetched(first.status.unwrap(), Some(plan.clone()), pods),
        &obs,
    );
    assert_eq!(verdicts(&d), vec![("rejected", reason::PLAN_FAILED)]);
    assert_eq!(reasons(&d), vec![reason::PLAN_FAILED]);
    assert_eq!(
        d.rollout.unwrap().plan.hash,
        plan.hash,
        "the plan in force stays"
    );
}

#[test]
fn recreate_replaces_at_most_max_unavailable_workers() {
    let md = deployment("{rollout: {strategy: Recreate, maxUnavailable: 1}}");
    let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    let plan = first.rollout.as_ref().unwrap().plan.clone();
    let (pods, scraped) = running(&first, "an-older-plan");
    let obs = Observed {
        scraped,
        fresh: true,
        ..Default::default()
    };
    let d = run(&md, &fetched(first.status.unwrap(), Some(plan), pods), &obs);
    let step = &d.rollout.unwrap().step0();
    assert_eq!(step.delete.len(), 1, "{step:?}");
    assert!(step.push.is_empty());
}

#[test]
fn held_back_deployments_apply_nothing_and_say_why() {
    type Case = (
        &'static str,
        &'static str,
        Option<Option<ConfigMap>>,
        PodPolicy,
        &'static str,
        Duration,
    );
    let strict = PodPolicy {
        image_prefixes: vec!["registry.example/".into()],
        ..Default::default()
    };
    let trace = "{initialLoad: {name: trace, key: load.json}}";
    let cases: Vec<Case> = vec![
        (
            "initial load ConfigMap missing",
            trace,
            Some(None),
            PodPolicy::default(),
            reason::INITIAL_LOAD_UNAVAILABLE,
            INITIAL_LOAD_RETRY,
        ),
        (
            "initial load key missing",
            trace,
            Some(Some(ConfigMap::default())),
            PodPolicy::default(),
            reason::INITIAL_LOAD_UNAVAILABLE,
            INITIAL_LOAD_RETRY,
        ),
        (
            "pod refused by the pod policy backstop",
            "{}",
            None,
            strict,
            reason::POD_POLICY,
            HELD_RETRY,
        ),
    ];
    for (name, extra, initial, policy, why, retry) in cases {
        let md = deployment(extra);
        let mut f = fetched(Default::default(), None, vec![]);
        f.initial_load = initial;
        let d = run_with(&md, &f, &fresh(), &policy, NOW);
        assert!(d.rollout.is_none(), "{name}: applies nothing");
        let s = d.status.as_ref().unwrap();
        assert_eq!(cond(s, condition::DEGRADED), ("True", why), "{name}");
        assert_eq!(cond(s, condition::READY), ("False", why), "{name}");
        assert_eq!(
            d.events.last().map(|n| (n.warning, n.reason)),
            Some((true, why)),
            "{name}"
        );
        assert_eq!(d.requeue, retry, "{name}");
        // Held again in the same state: no new Event, no status write.
        let mut again = fetched(s.clone(), None, vec![]);
        again.initial_load = f.initial_load.clone();
        let d = run_with(&md, &again, &fresh(), &policy, NOW + 1);
        assert_eq!(d.status, None, "{name}");
        assert!(!d.events.iter().any(|n| n.reason == why), "{name}");
    }
}

#[test]
fn an_optional_initial_load_that_is_missing_plans_without_it() {
    let md = deployment("{initialLoad: {name: trace, key: load.json, optional: true}}");
    let mut f = fetched(Default::default(), None, vec![]);
    f.initial_load = Some(None);
    let d = run(&md, &f, &fresh());
    assert_eq!(reasons(&d), vec![reason::INITIAL_PLAN]);
    assert!(d.events[0].message.contains("before any load is measured"));
}

#[test]
fn an_initial_load_makes_the_first_plan() {
    let md = deployment(
        "{initialLoad: {name: trace, key: load.json}, replication: {budget: {replicasPerGpu: 1}}}",
    );
    let spec = spec_of(&md);
    let w = skewed(&spec);
    let trace = crate::plan::load_formats::to_trace_json(&w, None);
    let cm = ConfigMap {
        data: Some(BTreeMap::from([("load.json".to_string(), trace)])),
        ..Default::default()
    };
    let mut f = fetched(Default::default(), None, vec![]);
    f.initial_load = Some(Some(cm));
    let d = run(&md, &f, &fresh());
    assert_eq!(reasons(&d), vec![reason::INITIAL_PLAN]);
    assert!(
        d.events[0].message.contains("ConfigMap ml/trace"),
        "{}",
        d.events[0].message
    );
    assert_eq!(d.rollout.unwrap().plan.algorithm, Algorithm::Craft);
}

#[test]
fn an_invalid_spec_is_degraded_once() {
    let md = deployment("{}");
    let errors = vec![FieldError {
        path: "spec.worker.image".into(),
        message: "empty".into(),
    }];
    let d = invalid(&md, &Default::default(), &errors, &t(NOW));
    let s = d.status.clone().unwrap();
    assert_eq!(
        cond(&s, condition::DEGRADED),
        ("True", reason::INVALID_SPEC)
    );
    assert_eq!(cond(&s, condition::READY), ("False", reason::INVALID_SPEC));
    assert_eq!(d.events.len(), 1);
    assert!(d.events[0].warning && d.events[0].message.contains("spec.worker.image: empty"));
    assert!(d.rollout.is_none());
    let again = invalid(&md, &s, &errors, &t(NOW + 5));
    assert_eq!((again.status, again.events.len()), (None, 0));
}

#[test]
fn a_minted_token_under_running_workers_is_announced() {
    let md = deployment("{}");
    let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    let plan = first.rollout.as_ref().unwrap().plan.clone();
    let (pods, _) = running(&first, &plan.hash);
    let mut f = fetched(first.status.clone().unwrap(), Some(plan), pods);
    f.minted = true;
    let d = run(&md, &f, &fresh());
    assert_eq!(reasons(&d), vec![reason::ADMIN_TOKEN_ROTATED]);
    assert!(d.events[0].warning);
    // Without pods a minted token is just the first one.
    let d = run(
        &md,
        &Fetched {
            minted: true,
            ..fetched(Default::default(), None, vec![])
        },
        &fresh(),
    );
    assert_eq!(reasons(&d), vec![reason::INITIAL_PLAN]);
}

#[test]
fn metrics_available_follows_the_readings() {
    let md = deployment("{}");
    let failing = Observed {
        failures: vec![
            MetricsFailure {
                source: Source::Workers,
                reason: "Unreachable",
                degrades: false,
                message: "GET http://10.0.0.1:9401/metrics: connect: refused".into(),
            },
            MetricsFailure {
                source: Source::Workers,
                reason: reason::GARBLED_METRICS,
                degrades: false,
                message: "metrics line 3: bad".into(),
            },
        ],
        fresh: true,
        ..Default::default()
    };
    let d = run(&md, &fetched(Default::default(), None, vec![]), &failing);
    let s = d.status.unwrap();
    let c = s
        .conditions
        .iter()
        .find(|c| c.type_ == condition::METRICS_AVAILABLE)
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Unreachable")
    );
    assert!(c.message.contains("(GarbledMetrics)"), "{}", c.message);
    // A reconcile between two Prometheus readings leaves the last answer standing.
    let prom = deployment(
        "{metrics: {source: Prometheus, prometheus: {url: 'http://prometheus:9090', query: q}}}",
    );
    let spec = validate(
        &prom.spec,
        &PodPolicy {
            prometheus_url_prefixes: vec![crate::api::pod_policy::HttpUrl::parse(
                "http://prometheus:9090",
            )
            .unwrap()],
            ..Default::default()
        },
    );
    assert!(spec.is_ok(), "{spec:?}");
    let mut status = s.clone();
    status
        .conditions
        .retain(|c| c.type_ == condition::METRICS_AVAILABLE);
    let stale = Observed::default();
    let d = decide(&Inputs {
        md: &prom,
        spec: &spec.unwrap(),
        fetched: &fetched(status, None, vec![]),
        observed: &stale,
        pod_policy: &PodPolicy::default(),
        push_timeout: Duration::from_secs(600),
        now: &t(NOW),
        now_s: NOW as f64,
    })
    .unwrap();
    let s = d.status.unwrap();
    assert_eq!(
        cond(&s, condition::METRICS_AVAILABLE),
        ("False", "Unreachable")
    );
}

#[test]
fn a_load_source_the_spec_misconfigures_degrades_without_stopping_the_workers() {
    let md = deployment("{}");
    let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    let plan = first.rollout.as_ref().unwrap().plan.clone();
    let (pods, scraped) = running(&first, &plan.hash);
    let refused = MetricsFailure {
        source: Source::Prometheus,
        reason: reason::PROMETHEUS_AUTH_REFUSED,
        message: "spec.metrics.prometheus.auth.basicAuthSecret: refused (HTTP 401)".into(),
        degrades: true,
    };
    let obs = Observed {
        scraped: scraped.clone(),
        failures: vec![refused.clone()],
        fresh: true,
        ..Default::default()
    };
    let d = run(
        &md,
        &fetched(
            first.status.clone().unwrap(),
            Some(plan.clone()),
            pods.clone(),
        ),
        &obs,
    );
    let r = d
        .rollout
        .as_ref()
        .expect("not held: the workers keep serving");
    assert!(r.step0().done && r.step0().delete.is_empty() && r.step0().create.is_empty());
    let s = d.status.clone().unwrap();
    assert_eq!(
        cond(&s, condition::DEGRADED),
        ("True", reason::PROMETHEUS_AUTH_REFUSED)
    );
    assert_eq!(
        message_of(&s, condition::DEGRADED),
        refused.message.as_str()
    );
    assert_eq!(cond(&s, condition::READY), ("True", reason::WORKERS_READY));
    assert_eq!(
        cond(&s, condition::METRICS_AVAILABLE),
        ("False", reason::PROMETHEUS_AUTH_REFUSED)
    );
    assert_eq!(
        d.events
            .iter()
            .map(|n| (n.warning, n.reason))
            .collect::<Vec<_>>(),
        vec![(true, reason::PROMETHEUS_AUTH_REFUSED)]
    );
    // The same failure again: no new Event. Between two readings: it stands.
    let again = run(
        &md,
        &fetched(s.clone(), Some(plan.clone()), pods.clone()),
        &obs,
    );
    assert!(again.events.is_empty(), "{:?}", again.events);
    let between = Observed {
        scraped: scraped.clone(),
        ..Default::default()
    };
    let d = run(
        &md,
        &fetched(s.clone(), Some(plan.clone()), pods.clone()),
        &between,
    );
    let st = d.status.unwrap_or(s.clone());
    assert_eq!(
        cond(&st, condition::DEGRADED),
        ("True", reason::PROMETHEUS_AUTH_REFUSED)
    );
    // A reading that works clears it.
    let ok = Observed {
        scraped,
        fresh: true,
        ..Default::default()
    };
    let d = run(&md, &fetched(s, Some(plan), pods), &ok);
    let st = d.status.unwrap();
    assert_eq!(
        cond(&st, condition::DEGRADED),
        ("False", reason::SPEC_VALID)
    );
}

#[test]
fn stored_plans_that_no_longer_fit_the_spec_are_replaced() {
    let small = deployment("{}");
    let first = run(&small, &fetched(Default::default(), None, vec![]), &fresh());
    let old = first.rollout.unwrap().plan;
    // The topology grew: the stored plan is for 4 GPUs, the spec now has 8.
    let grown = deployment("{topology: {nodes: 4, gpusPerNode: 2}}");
    let d = run(
        &grown,
        &fetched(first.status.unwrap(), Some(old.clone()), vec![]),
        &fresh(),
    );
    let r = d.rollout.unwrap();
    assert_ne!(r.plan.hash, old.hash);
    assert_eq!(r.plan.gpus, 8);
    assert_eq!(r.step0().create, vec![0, 1, 2, 3]);
}

#[test]
fn plans_survive_a_json_round_trip() {
    // Skewed loads like the e2e test's (scraped token deltas); some of them gave plans whose JSON
    // did not parse back to the same hash before serde_json's `float_roundtrip`.
    let md = deployment("{model: {layers: 3, firstMoeLayer: 1, experts: 8, topK: 2, hiddenSize: 64, expertIntermediateSize: 32, checkpoint: {path: /m}}, replication: {budget: {replicasPerGpu: 2}}}");
    let spec = spec_of(&md);
    let req = spec.plan_request(Algorithm::Craft);
    let zero = initial_plan(&spec).unwrap();
    assert_eq!(
        (zero.algorithm, zero.replicas_per_gpu),
        (Algorithm::Placement, 0)
    );
    let mut seed = 12345u64;
    for _ in 0..200 {
        let counts: Vec<f64> = (0..16)
            .map(|i| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = (seed >> 40) % 997;
                (if i % 8 == (i / 8) { 19_000 } else { 700 } + noise) as f64
            })
            .collect();
        let w = LoadWindow::new(vec![1, 2], 8, counts).unwrap();
        let p = make_plan(&req, &w, Some(&zero)).unwrap();
        let back: ExpertPlan = serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(back.compute_hash(), p.hash);
    }
    let p = make_plan(
        &req,
        &LoadWindow::new(vec![1, 2], 8, vec![1.0; 16]).unwrap(),
        None,
    )
    .unwrap();
    let pretty: ExpertPlan =
        serde_json::from_str(&serde_json::to_string_pretty(&p).unwrap()).unwrap();
    assert_eq!(pretty.compute_hash(), p.hash);
}

/// `pod` whose worker container was restarted by the kubelet after ending with `message` at `at`.
fn with_failure(pod: &Pod, message: &str, at: i64) -> Pod {
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, ContainerStatus};
    let mut p = pod.clone();
    let status = p.status.get_or_insert_with(Default::default);
    status.container_statuses = Some(vec![ContainerStatus {
        name: "worker".into(),
        restart_count: 1,
        state: Some(ContainerState {
            running: Some(Default::default()),
            ..Default::default()
        }),
        last_state: Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 1,
                message: Some(message.into()),
                finished_at: Some(t(at)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }]);
    p
}

fn message_of<'a>(s: &'a MoEDeploymentStatus, kind: &str) -> &'a str {
    &s.conditions
        .iter()
        .find(|c| c.type_ == kind)
        .unwrap()
        .message
}

/// A rank that ends with `ep rank <r>: ...` restarts the worker group once per failure: Degraded
/// (RankFailed) naming the rank, the pod and the worker's message, a Warning event, every worker
/// pod deleted; the same failure seen again restarts nothing, a newer one restarts again.
#[test]
fn a_failed_rank_restarts_the_worker_group_once_per_failure() {
    let md = deployment("{}");
    let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    let plan = first.rollout.as_ref().unwrap().plan.clone();
    let (pods, scraped) = running(&first, &plan.hash);
    let obs = Observed {
        scraped,
        fresh: true,
        ..Default::default()
    };
    let ready = run(
        &md,
        &fetched(
            first.status.clone().unwrap(),
            Some(plan.clone()),
            pods.clone(),
        ),
        &obs,
    )
    .status
    .unwrap();
    let failed = |node: usize, message: &str, at: i64| {
        let mut ps = pods.clone();
        ps[node] = with_failure(&ps[node], message, at);
        ps
    };
    let rank3 = failed(
        1,
        "ep rank 3: peer 0 went away (connection closed)\nstack...",
        NOW - 10,
    );
    let once = run(
        &md,
        &fetched(ready.clone(), Some(plan.clone()), rank3.clone()),
        &obs,
    );
    let restarted = once.status.clone().unwrap();
    // A newer failure of another rank, after the restart was recorded.
    let rank0 = failed(0, "ep rank 0: rendezvous timed out after 120s", NOW - 5);

    type Case<'a> = (
        &'static str,
        Vec<Pod>,
        &'a MoEDeploymentStatus,
        Option<(u32, &'static str, &'static str)>,
    );
    let cases: Vec<Case> = vec![
        ("no failure", pods.clone(), &ready, None),
        (
            "one failed rank",
            rank3.clone(),
            &ready,
            Some((3, "demo-worker-1", "peer 0 went away (connection closed)")),
        ),
        ("the same failure seen again", rank3, &restarted, None),
        (
            "a newer failure",
            rank0,
            &restarted,
            Some((0, "demo-worker-0", "rendezvous timed out after 120s")),
        ),
    ];
    for (name, pods, status, restart) in cases {
        let d = run(
            &md,
            &fetched(status.clone(), Some(plan.clone()), pods),
            &obs,
        );
        let r = d.rollout.as_ref().unwrap();
        let rank_events: Vec<&Note> = d
            .events
            .iter()
            .filter(|n| n.reason == reason::RANK_FAILED)
            .collect();
        let Some((rank, pod, message)) = restart else {
            assert!(rank_events.is_empty(), "{name}: {:?}", d.events);
            assert_eq!(r.group_restart, None, "{name}");
            assert!(r.step0().delete.is_empty(), "{name}: {:?}", r.steps);
            assert!(r.step0().done, "{name}: the workers are ready on the plan");
            let s = d.status.as_ref().unwrap_or(status);
            assert_eq!(s.rank_failure, status.rank_failure, "{name}: record kept");
            continue;
        };
        assert_eq!(rank_events.len(), 1, "{name}: {:?}", d.events);
        let ev = rank_events[0];
        assert!(ev.warning, "{name}");
        for want in [&format!("EP rank {rank}"), pod, message] {
            assert!(ev.message.contains(want), "{name}: {}", ev.message);
        }
        // Every worker pod deleted, nothing created or pushed until they are gone.
        assert_eq!(
            r.group_restart.as_ref().map(|f| f.rank),
            Some(rank),
            "{name}"
        );
        assert_eq!(r.step0().delete, vec![0, 1], "{name}");
        assert!(
            r.step0().create.is_empty() && r.step0().push.is_empty(),
            "{name}"
        );
        assert_eq!(d.requeue, BUSY_REQUEUE, "{name}");
        let s = d.status.as_ref().unwrap();
        let rec = s.rank_failure.as_ref().unwrap();
        assert_eq!(
            (rec.rank, rec.pod.as_str(), rec.message.as_str()),
            (rank as i32, pod, message),
            "{name}"
        );
        assert_eq!(rec.restarted_at, Some(t(NOW)), "{name}");
        assert_eq!(
            cond(s, condition::DEGRADED),
            ("True", reason::RANK_FAILED),
            "{name}"
        );
        let m = message_of(s, condition::DEGRADED);
        for want in [&format!("EP rank {rank}"), pod, message] {
            assert!(m.contains(want), "{name}: {m}");
        }
        assert_eq!(
            cond(s, condition::READY),
            ("False", reason::RANK_FAILED),
            "{name}"
        );
    }
}

/// After a group restart the deployment stays Degraded (RankFailed) while the pods go and come
/// back, without another restart or a status write per reconcile, and is Ready again once every
/// worker is.
#[test]
fn a_restarted_group_is_degraded_until_every_worker_is_back() {
    let md = deployment("{}");
    let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    let plan = first.rollout.as_ref().unwrap().plan.clone();
    let (pods, scraped) = running(&first, &plan.hash);
    let obs = Observed {
        scraped,
        fresh: true,
        ..Default::default()
    };
    let mut failing = pods.clone();
    failing[0] = with_failure(&pods[0], "ep rank 1: heartbeat timeout", NOW - 3);
    let status = first.status.clone().unwrap();
    let d = run(
        &md,
        &fetched(status, Some(plan.clone()), failing.clone()),
        &obs,
    );
    let restarted = d.status.unwrap();
    // The pods are terminating: nothing to do but wait; still Degraded, nothing rewritten.
    let going: Vec<Pod> = failing
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p.metadata.deletion_timestamp = Some(t(NOW));
            p
        })
        .collect();
    let d = run_with(
        &md,
        &fetched(restarted.clone(), Some(plan.clone()), going),
        &obs,
        &PodPolicy::default(),
        NOW + 2,
    );
    assert!(d.events.is_empty(), "{:?}", d.events);
    let r = d.rollout.as_ref().unwrap();
    assert!(
        r.group_restart.is_none() && r.step0().delete.is_empty() && r.step0().create.is_empty()
    );
    let s = d.status.as_ref().unwrap_or(&restarted);
    assert_eq!(cond(s, condition::DEGRADED), ("True", reason::RANK_FAILED));
    assert_eq!(cond(s, condition::READY).0, "False");
    // They are gone: recreated by the rollout, still Degraded.
    let d = run_with(
        &md,
        &fetched(s.clone(), Some(plan.clone()), vec![]),
        &obs,
        &PodPolicy::default(),
        NOW + 40,
    );
    assert_eq!(d.rollout.as_ref().unwrap().step0().create, vec![0, 1]);
    let s = d.status.unwrap_or_else(|| s.clone());
    assert_eq!(cond(&s, condition::DEGRADED), ("True", reason::RANK_FAILED));
    // Every worker ready on the plan: no longer Degraded, Ready, the record kept.
    let d = run_with(
        &md,
        &fetched(s, Some(plan), pods),
        &obs,
        &PodPolicy::default(),
        NOW + 90,
    );
    let s = d.status.unwrap();
    assert_eq!(cond(&s, condition::DEGRADED), ("False", reason::SPEC_VALID));
    assert_eq!(cond(&s, condition::READY), ("True", reason::WORKERS_READY));
    assert_eq!(s.rank_failure.unwrap().rank, 1);
}

/// `spec.suspend`: every worker deleted in one step and none created, the plan kept (no re-plan,
/// even on a window that would give a better one), `Suspended` and the status kept; then resumed
/// on the same plan, with no re-plan because of the resume.
#[test]
fn suspend_deletes_every_worker_at_once_keeps_the_plan_and_resumes_on_it() {
    let mut md = deployment("{replication: {budget: {replicasPerGpu: 2}, cooldown: 1s}}");
    let spec = spec_of(&md);
    let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    let plan = first.rollout.as_ref().unwrap().plan.clone();
    let (pods, scraped) = running(&first, &plan.hash);
    let ready = run(
        &md,
        &fetched(
            first.status.clone().unwrap(),
            Some(plan.clone()),
            pods.clone(),
        ),
        &Observed {
            scraped: scraped.clone(),
            fresh: true,
            ..Default::default()
        },
    );
    let status = ready.status.clone().unwrap();
    assert_eq!(
        cond(&status, condition::READY),
        ("True", reason::WORKERS_READY)
    );
    // A skewed window past the cooldown: unsuspended, this re-plans (PlanImproved).
    let skew = Observed {
        scraped,
        window: Some(skewed(&spec)),
        window_changed: true,
        fresh: true,
        ..Default::default()
    };
    let later = NOW + 600;
    let unsuspended = run_with(
        &md,
        &fetched(status.clone(), Some(plan.clone()), pods.clone()),
        &skew,
        &PodPolicy::default(),
        later,
    );
    assert_eq!(reasons(&unsuspended), vec![reason::PLAN_IMPROVED]);

    md.spec.suspend = true;
    let d = run_with(
        &md,
        &fetched(status.clone(), Some(plan.clone()), pods.clone()),
        &skew,
        &PodPolicy::default(),
        later,
    );
    assert_eq!(reasons(&d), vec![reason::SUSPENDED]);
    let r = d.rollout.as_ref().unwrap();
    assert_eq!(r.plan.hash, plan.hash, "no re-plan while suspended");
    assert_eq!(r.cause, DeleteCause::Suspend);
    assert_eq!(r.step0().delete, vec![0, 1], "every worker in one step");
    assert!(r.step0().create.is_empty() && r.step0().push.is_empty() && r.group_restart.is_none());
    let s = d.status.clone().unwrap();
    assert_eq!(cond(&s, condition::SUSPENDED), ("True", reason::SUSPENDED));
    assert_eq!(cond(&s, condition::READY), ("False", reason::SUSPENDED));
    assert_eq!(
        cond(&s, condition::PROGRESSING),
        ("True", reason::SUSPENDED)
    );
    assert_eq!(cond(&s, condition::DEGRADED).0, "False");
    assert_eq!(s.plan, status.plan, "status.plan kept");
    assert_eq!(s.workers.as_ref().unwrap().desired, 0);
    assert_eq!(d.requeue, BUSY_REQUEUE);

    // The pods terminating, their ranks failing on the way out: nothing deleted twice, no group
    // restart, no Event.
    let now = t(later);
    let going: Vec<Pod> = pods
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p.metadata.deletion_timestamp = Some(now.clone());
            p
        })
        .collect();
    let d2 = run_with(
        &md,
        &fetched(s.clone(), Some(plan.clone()), going),
        &fresh(),
        &PodPolicy::default(),
        later + 1,
    );
    assert!(d2.events.is_empty(), "{:?}", d2.events);
    let r2 = d2.rollout.as_ref().unwrap();
    assert!(
        r2.step0().delete.is_empty() && r2.step0().create.is_empty() && r2.group_restart.is_none()
    );
    // All gone: done, nothing to do, the plan still stored.
    let s2 = d2.status.clone().unwrap_or(s);
    let d3 = run_with(
        &md,
        &fetched(s2.clone(), Some(plan.clone()), vec![]),
        &fresh(),
        &PodPolicy::default(),
        later + 30,
    );
    let r3 = d3.rollout.as_ref().unwrap();
    assert!(r3.step0().done && r3.step0().create.is_empty());
    assert_eq!(
        r3.desired.plan_config_map.data.as_ref().unwrap()[build::HASH_KEY],
        plan.hash
    );
    let s3 = d3.status.clone().unwrap_or(s2);
    assert_eq!(
        cond(&s3, condition::PROGRESSING),
        ("False", reason::SUSPENDED)
    );
    assert_eq!(cond(&s3, condition::READY), ("False", reason::SUSPENDED));
    assert_eq!(s3.workers.as_ref().unwrap().summary, "0/0");
    assert_eq!(d3.requeue, HELD_RETRY);

    // Resume: the same plan, every worker created, Suspended=False (Resumed).
    md.spec.suspend = false;
    let d4 = run_with(
        &md,
        &fetched(s3.clone(), Some(plan.clone()), vec![]),
        &fresh(),
        &PodPolicy::default(),
        later + 60,
    );
    assert_eq!(reasons(&d4), vec![reason::RESUMED]);
    let r4 = d4.rollout.as_ref().unwrap();
    assert_eq!(r4.plan.hash, plan.hash, "resumed on the plan it had");
    assert_eq!(r4.step0().create, vec![0, 1]);
    assert_eq!(
        r4.desired.pods,
        first.rollout.as_ref().unwrap().desired.pods,
        "the same pods as before"
    );
    let s4 = d4.status.clone().unwrap();
    assert_eq!(cond(&s4, condition::SUSPENDED), ("False", reason::RESUMED));
    assert_eq!(cond(&s4, condition::READY), ("False", reason::ROLLING_OUT));
    assert_eq!(s4.plan, status.plan);
    // A deployment never suspended has no Suspended condition.
    assert!(status
        .conditions
        .iter()
        .all(|c| c.type_ != condition::SUSPENDED));
}

/// `scheduling.gang: Guard` (the default with an EP group): a group one pod short of whole past
/// `scheduling.timeout` is released with Unschedulable naming the GPUs missing, backs off, tries
/// again, and clears once whole.
#[test]
fn the_gang_guard_releases_a_partly_scheduled_group_and_backs_off() {
    let md = deployment("{dataPlane: {transport: tcp}, worker: {image: 'moe-worker:dev', device: cpu}, scheduling: {timeout: 60s}}");
    assert_eq!(
        spec_of(&md).gang.gang,
        crate::api::Gang::Guard,
        "the default with a group"
    );
    let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    let plan = first.rollout.as_ref().unwrap().plan.clone();
    let status = first.status.clone().unwrap();
    let placed = |rank: usize, node: Option<&str>, created: i64| {
        let mut p = first.rollout.as_ref().unwrap().desired.pods[rank].clone();
        p.metadata.creation_timestamp = Some(t(created));
        p.spec.as_mut().unwrap().node_name = node.map(str::to_string);
        if node.is_none() {
            p.status = Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "PodScheduled".into(),
                    status: "False".into(),
                    reason: Some("Unschedulable".into()),
                    message: Some(
                        "0/1 nodes are available: 1 node(s) didn't match pod anti-affinity rules."
                            .into(),
                    ),
                    ..Default::default()
                }]),
                ..Default::default()
            });
        }
        p
    };
    let pods = vec![
        placed(0, Some("node-0"), NOW - 30),
        placed(1, None, NOW - 30),
    ];
    // Within the timeout: waiting, not degraded.
    let d = run(
        &md,
        &fetched(status.clone(), Some(plan.clone()), pods.clone()),
        &fresh(),
    );
    assert!(d.rollout.as_ref().unwrap().step0().delete.is_empty());
    assert_eq!(
        cond(d.status.as_ref().unwrap_or(&status), condition::DEGRADED).0,
        "False"
    );
    // Past it: every pod deleted, Unschedulable with the missing GPUs.
    let d = run_with(
        &md,
        &fetched(status.clone(), Some(plan.clone()), pods),
        &fresh(),
        &PodPolicy::default(),
        NOW + 31,
    );
    assert_eq!(reasons(&d), vec![reason::UNSCHEDULABLE]);
    let m = &d.events[0].message;
    assert!(m.starts_with("1 of 2 worker pods not scheduled within 60s: 2 nvidia.com/gpu missing (1 unscheduled pod(s) x 2 requested each); the scheduler says: 0/1 nodes"), "{m}");
    let r = d.rollout.as_ref().unwrap();
    assert_eq!(
        (r.step0().delete.clone(), r.cause),
        (vec![0, 1], DeleteCause::GangRelease)
    );
    assert!(r.step0().create.is_empty());
    let s = d.status.clone().unwrap();
    assert_eq!(
        cond(&s, condition::DEGRADED),
        ("True", reason::UNSCHEDULABLE)
    );
    assert_eq!(cond(&s, condition::READY), ("False", reason::UNSCHEDULABLE));
    let g = s.gang.clone().unwrap();
    assert_eq!((g.unscheduled_pods, g.missing_gpus), (1, 2));
    assert_eq!(s.plan, status.plan, "the plan is kept");
    // Backing off: the pods gone, nothing created for the timeout.
    let d = run_with(
        &md,
        &fetched(s.clone(), Some(plan.clone()), vec![]),
        &fresh(),
        &PodPolicy::default(),
        NOW + 60,
    );
    let r = d.rollout.as_ref().unwrap();
    assert!(
        r.step0().create.is_empty() && !r.step0().done && d.events.is_empty(),
        "{:?}",
        r.step0()
    );
    let s = d.status.clone().unwrap_or(s);
    assert_eq!(
        cond(&s, condition::DEGRADED),
        ("True", reason::UNSCHEDULABLE)
    );
    // After it: the whole group is created again, still Unschedulable until it is whole.
    let d = run_with(
        &md,
        &fetched(s.clone(), Some(plan.clone()), vec![]),
        &fresh(),
        &PodPolicy::default(),
        NOW + 92,
    );
    assert_eq!(d.rollout.as_ref().unwrap().step0().create, vec![0, 1]);
    let s = d.status.clone().unwrap_or(s);
    assert_eq!(
        cond(&s, condition::DEGRADED),
        ("True", reason::UNSCHEDULABLE)
    );
    // Whole: cleared.
    let pods = vec![
        placed(0, Some("node-0"), NOW + 92),
        placed(1, Some("node-1"), NOW + 92),
    ];
    let d = run_with(
        &md,
        &fetched(s.clone(), Some(plan.clone()), pods),
        &fresh(),
        &PodPolicy::default(),
        NOW + 95,
    );
    let s = d.status.clone().unwrap();
    assert_eq!(s.gang, None);
    assert_eq!(cond(&s, condition::DEGRADED), ("False", reason::SPEC_VALID));
    // Without a group the default is no gang: the same world is never released.
    let plain = deployment("{}");
    assert_eq!(spec_of(&plain).gang.gang, crate::api::Gang::None);
}

#[test]
fn a_step_time_objective_judges_replans_by_the_step_they_save() {
    for (tokens, want) in [
        // Decode: each GPU reads its experts' weights whatever their rows; nothing saves 2%.
        (64, reason::GAIN_BELOW_MIN_IMPROVEMENT),
        // Prefill: the hot experts' rows dominate; spreading them saves most of the step.
        (1 << 20, reason::PLAN_IMPROVED),
    ] {
        let md = deployment(&format!(
            "{{model: {{layers: 4, firstMoeLayer: 1, experts: 16, topK: 2, hiddenSize: 2048, \
             expertIntermediateSize: 768, checkpoint: {{path: /models/tiny}}}}, \
             replication: {{budget: {{auto: true}}, stepTime: {{tokensPerStep: {tokens}}}}}}}"
        ));
        let spec = spec_of(&md);
        assert!(spec.step_time.is_some());
        let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
        let plan = first.rollout.as_ref().unwrap().plan.clone();
        let mut status = first.status.clone().unwrap();
        status.plan.as_mut().unwrap().computed_at = Some(t(NOW - 3600));
        let (pods, scraped) = running(&first, &plan.hash);
        let obs = Observed {
            scraped,
            window: Some(skewed(&spec)),
            window_changed: true,
            fresh: true,
            ..Default::default()
        };
        let d = run(&md, &fetched(status, Some(plan), pods), &obs);
        let v = verdicts(&d);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].1, want, "{tokens} tokens per step: {v:?}");
        if want == reason::PLAN_IMPROVED {
            let note = &d.events[0].message;
            assert!(note.contains("predicted MoE step"), "{note}");
        }
    }
}

#[test]
fn a_plan_that_cannot_be_stored_is_neither_announced_nor_put_in_status() {
    // An SGLang layout of 400 layers x 1024 experts is over a MiB of JSON: nothing fits beside it.
    let md = deployment(
        "{model: {layers: 400, firstMoeLayer: 0, experts: 1024, topK: 8, hiddenSize: 64, \
         expertIntermediateSize: 32, checkpoint: {path: /models/tiny}}, \
         metrics: {source: Prometheus, prometheus: {url: 'http://prom:9090', query: q}}, \
         engine: {kind: SGLang}}",
    );
    let policy = PodPolicy {
        prometheus_url_prefixes: vec![
            crate::api::pod_policy::HttpUrl::parse("http://prom:9090").unwrap()
        ],
        ..Default::default()
    };
    let spec = validate(&md.spec, &policy).unwrap();
    let f = fetched(Default::default(), None, vec![]);
    let d = decide(&Inputs {
        md: &md,
        spec: &spec,
        fetched: &f,
        observed: &fresh(),
        pod_policy: &policy,
        push_timeout: Duration::from_secs(600),
        now: &t(NOW),
        now_s: NOW as f64,
    })
    .unwrap();
    assert_eq!(reasons(&d), vec![reason::PLAN_TOO_LARGE]);
    assert_eq!(verdicts(&d), vec![("rejected", reason::PLAN_TOO_LARGE)]);
    assert!(d.rollout.is_none());
    let s = d.status.as_ref().unwrap();
    assert_eq!(s.plan, None, "a plan never stored is not the plan in force");
    let (status, why) = cond(s, condition::DEGRADED);
    assert_eq!((status, why), ("True", reason::PLAN_TOO_LARGE));
    let msg = &d.events[0].message;
    assert!(
        msg.contains("the layout is") && msg.contains("bytes"),
        "{msg}"
    );
}

/// Scaling 1 -> 3 creates two whole groups on the plan in force and leaves group 0 alone (its
/// old pods, without the group label, are only labelled); 3 -> 2 deletes group 2's pods and
/// nothing else; the status reports the groups and the selector the scale subresource reads.
#[test]
fn scaling_adds_and_removes_whole_groups_and_touches_no_other() {
    let md = deployment("{}");
    let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    let plan = first.rollout.as_ref().unwrap().plan.clone();
    let (mut pods, scraped) = running(&first, &plan.hash);
    // Pods made before groups existed carry no group label.
    for p in pods.iter_mut() {
        p.metadata.labels.as_mut().unwrap().remove(LABEL_GROUP);
    }
    let obs = Observed {
        scraped,
        fresh: true,
        ..Default::default()
    };
    let status = first.status.clone().unwrap();
    let md3 = deployment("{replicas: 3}");
    let d = run(
        &md3,
        &fetched(status.clone(), Some(plan.clone()), pods.clone()),
        &obs,
    );
    let r = d.rollout.as_ref().unwrap();
    assert_eq!(r.plan.hash, plan.hash, "scaling does not re-plan");
    assert_eq!(r.relabel, vec!["demo-worker-0", "demo-worker-1"]);
    let g0 = &r.steps.group(0).unwrap().step;
    assert!(
        g0.done && g0.delete.is_empty() && g0.push.is_empty(),
        "{g0:?}"
    );
    for g in [1, 2] {
        let s = &r.steps.group(g).unwrap().step;
        assert_eq!(s.create, vec![0, 1], "group {g}");
        for rank in 0..2 {
            let p = r.desired.pod(g, rank).unwrap();
            assert_eq!(p.annotations()[build::ANNOTATION_PLAN_HASH], plan.hash);
        }
    }
    let s = d.status.as_ref().unwrap();
    assert_eq!((s.replicas, s.ready_groups), (Some(1), Some(1)));
    assert_eq!(s.groups_summary.as_deref(), Some("1/3"));
    assert_eq!(
        s.selector.as_deref(),
        Some("app.kubernetes.io/instance=demo,app.kubernetes.io/name=moe-worker,moe.craft.dev/deployment=demo")
    );
    assert_eq!(cond(s, condition::READY), ("False", reason::ROLLING_OUT));
    assert_eq!(s.workers.as_ref().unwrap().summary, "2/6");

    // All three groups serve; then 3 -> 2.
    let d3 = run(
        &md3,
        &fetched(Default::default(), Some(plan.clone()), vec![]),
        &fresh(),
    );
    let (pods3, scraped3) = running(&d3, &plan.hash);
    let obs3 = Observed {
        scraped: scraped3,
        fresh: true,
        ..Default::default()
    };
    let d = run(
        &md3,
        &fetched(Default::default(), Some(plan.clone()), pods3.clone()),
        &obs3,
    );
    assert!(d.rollout.as_ref().unwrap().steps.done);
    let s = d.status.as_ref().unwrap();
    assert_eq!((s.replicas, s.ready_groups), (Some(3), Some(3)));
    assert_eq!(cond(s, condition::READY), ("True", reason::WORKERS_READY));
    let md2 = deployment("{replicas: 2}");
    let d = run(
        &md2,
        &fetched(s.clone(), Some(plan.clone()), pods3.clone()),
        &obs3,
    );
    let r = d.rollout.as_ref().unwrap();
    let g2 = r.steps.group(2).unwrap();
    assert_eq!(
        (g2.role, g2.step.delete.clone()),
        (Role::Removed, vec![0, 1])
    );
    for g in [0, 1] {
        let s = &r.steps.group(g).unwrap().step;
        assert!(s.done && s.delete.is_empty(), "group {g}: {s:?}");
    }
    assert!(!r.steps.done);
}

/// `replicas: 0` is a size: every group removed, then Ready (nothing to serve is what was asked),
/// no Suspended condition; `suspend` is a pause: Ready=False, Suspended, and `replicas` kept for
/// the resume.
#[test]
fn zero_replicas_is_a_size_and_suspend_a_pause() {
    let md = deployment("{replicas: 2}");
    let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    let plan = first.rollout.as_ref().unwrap().plan.clone();
    let (pods, scraped) = running(&first, &plan.hash);
    assert_eq!(pods.len(), 4);
    let obs = Observed {
        scraped,
        fresh: true,
        ..Default::default()
    };
    for (extra, suspended) in [
        ("{replicas: 0}", false),
        ("{replicas: 2, suspend: true}", true),
    ] {
        let md = deployment(extra);
        let d = run(
            &md,
            &fetched(Default::default(), Some(plan.clone()), pods.clone()),
            &obs,
        );
        let r = d.rollout.as_ref().unwrap();
        let deleted: usize = r.steps.groups.iter().map(|s| s.step.delete.len()).sum();
        assert_eq!(deleted, 4, "{extra}: every worker of both groups");
        assert!(r
            .steps
            .groups
            .iter()
            .all(|s| s.role == Role::Removed && s.step.create.is_empty()));
        let gone = run(
            &md,
            &fetched(Default::default(), Some(plan.clone()), vec![]),
            &fresh(),
        );
        let s = gone.status.as_ref().unwrap();
        assert_eq!(s.replicas, Some(0), "{extra}");
        assert_eq!(s.workers.as_ref().unwrap().summary, "0/0", "{extra}");
        if suspended {
            assert_eq!(cond(s, condition::READY), ("False", reason::SUSPENDED));
            assert_eq!(cond(s, condition::SUSPENDED), ("True", reason::SUSPENDED));
            assert_eq!(s.groups_summary.as_deref(), Some("0/2"));
        } else {
            assert_eq!(cond(s, condition::READY), ("True", reason::WORKERS_READY));
            assert!(s.conditions.iter().all(|c| c.type_ != condition::SUSPENDED));
            assert_eq!(s.groups_summary.as_deref(), Some("0/0"));
        }
    }
}

/// A failed rank restarts its own group only.
#[test]
fn a_failed_rank_restarts_only_its_group() {
    let md = deployment("{replicas: 2}");
    let first = run(&md, &fetched(Default::default(), None, vec![]), &fresh());
    let plan = first.rollout.as_ref().unwrap().plan.clone();
    let (mut pods, scraped) = running(&first, &plan.hash);
    let obs = Observed {
        scraped,
        fresh: true,
        ..Default::default()
    };
    pods[3] = with_failure(&pods[3], "ep rank 3: peer 2 closed the mesh", 1_000);
    let d = run(&md, &fetched(Default::default(), Some(plan), pods), &obs);
    let r = d.rollout.as_ref().unwrap();
    assert!(r.group_restart.is_some());
    assert_eq!(r.steps.group(1).unwrap().step.delete, vec![0, 1]);
    let g0 = &r.steps.group(0).unwrap().step;
    assert!(g0.delete.is_empty() && g0.done, "{g0:?}");
    assert!(d
        .events
        .iter()
        .any(|e| e.message.contains("restarting worker group 1")));
}
