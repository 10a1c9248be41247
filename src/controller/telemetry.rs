//! The operator's own `/metrics` (Prometheus text), `/healthz` and `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeploymentLabel {
    pub deployment: String,
}

/// `moe_operator_replan_decisions_total`'s labels: what became of a plan decision and why
/// (`controller::replan::Verdict`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplanLabels {
    pub outcome: &'static str,
    pub reason: &'static str,
}

/// `moe_operator_scrape_failures_total`'s labels: the deployment, where its load was read
/// (`workers` or `prometheus`) and the MetricsAvailable reason of the failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScrapeFailureLabels {
    pub namespace: String,
    pub name: String,
    pub source: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub deployment: String,
    pub condition: String,
}

/// Operator metrics, and `ready`: whether this replica serves its part, leading or standing by (it
/// has heard from the API server and is not shutting down). Readiness must not hang on leading:
/// a rolling update waits for the new pod to be Ready before the old one (the leader) stops, and a
/// standby that is never Ready keeps `helm upgrade --wait` from ever finishing.
pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Counter,
    errors: Family<ReasonLabel, Counter>,
    duration: Histogram,
    balancedness: Family<DeploymentLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    rollout_updated: Family<DeploymentLabel, Gauge>,
    rollout_total: Family<DeploymentLabel, Gauge>,
    conditions: Family<ConditionLabels, Gauge>,
    /// The condition series set so far, so that a deleted deployment's can be removed.
    condition_series: Mutex<std::collections::HashSet<ConditionLabels>>,
    leader: Gauge,
    replans: Family<ReplanLabels, Counter>,
    scrape_failures: Family<ScrapeFailureLabels, Counter>,
    /// The label sets `scrape_failures` holds (the family cannot list them), to drop a deleted
    /// deployment's.
    scrape_failure_series: Mutex<std::collections::HashSet<ScrapeFailureLabels>>,
    ready: AtomicBool,
    leading: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("moe_operator");
        let reconciles = Counter::default();
        let errors = Family::<ReasonLabel, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let balancedness = Family::default();
        let rollout_updated = Family::default();
        let rollout_total = Family::default();
        let conditions = Family::default();
        let leader = Gauge::default();
        let replans = Family::<ReplanLabels, Counter>::default();
        let scrape_failures = Family::<ScrapeFailureLabels, Counter>::default();
        r.register("reconciles", "Reconciles run", reconciles.clone());
        r.register(
            "reconcile_errors",
            "Reconcile errors by reason",
            errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            duration.clone(),
        );
        r.register(
            "plan_balancedness",
            "Predicted balancedness of the plan in force",
            balancedness.clone(),
        );
        r.register(
            "rollout_workers_updated",
            "Workers ready on the current plan",
            rollout_updated.clone(),
        );
        r.register(
            "rollout_workers_desired",
            "Workers the deployment asks for",
            rollout_total.clone(),
        );
        r.register(
            "deployment_condition",
            "1 while the deployment's status condition is True, 0 otherwise (alerts on Degraded)",
            conditions.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the Lease",
            leader.clone(),
        );
        r.register(
            "replan_decisions",
            "Plan decisions by outcome (applied, kept, rejected) and reason",
            replans.clone(),
        );
        r.register(
            "scrape_failures",
            "Failed load readings per deployment, by source (workers, prometheus) and reason",
            scrape_failures.clone(),
        );
        Self {
            registry: Mutex::new(r),
            reconciles,
            errors,
            duration,
            balancedness,
            rollout_updated,
            rollout_total,
            conditions,
            condition_series: Mutex::default(),
            leader,
            replans,
            scrape_failures,
            scrape_failure_series: Mutex::default(),
            ready: AtomicBool::new(false),
            leading: AtomicBool::new(false),
        }
    }

    pub fn observe_reconcile(&self, took: Duration, error: Option<&str>) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(reason) = error {
            self.errors
                .get_or_create(&ReasonLabel {
                    reason: reason.into(),
                })
                .inc();
        }
    }

    pub fn set_balancedness(&self, deployment: &str, b: Option<f64>) {
        let l = DeploymentLabel {
            deployment: deployment.into(),
        };
        match b {
            Some(b) => {
                self.balancedness.get_or_create(&l).set(b);
            }
            None => {
                self.balancedness.remove(&l);
            }
        }
    }

    pub fn set_rollout(&self, deployment: &str, updated: u32, total: u32) {
        let l = DeploymentLabel {
            deployment: deployment.into(),
        };
        self.rollout_updated.get_or_create(&l).set(updated.into());
        self.rollout_total.get_or_create(&l).set(total.into());
    }

    /// Count one plan decision (outcome and reason come from fixed sets).
    pub fn count_replan(&self, outcome: &'static str, reason: &'static str) {
        self.replans
            .get_or_create(&ReplanLabels { outcome, reason })
            .inc();
    }

    /// Count one failed load reading of deployment `namespace/name`.
    pub fn count_scrape_failure(
        &self,
        namespace: &str,
        name: &str,
        source: &'static str,
        reason: &'static str,
    ) {
        let l = ScrapeFailureLabels {
            namespace: namespace.into(),
            name: name.into(),
            source,
            reason,
        };
        self.scrape_failures.get_or_create(&l).inc();
        self.scrape_failure_series
            .lock()
            .expect("series lock")
            .insert(l);
    }

    /// Drop the series of a deleted deployment, so that deleted deployments leave none behind.
    pub fn forget_deployment(&self, namespace: &str, name: &str) {
        self.scrape_failure_series
            .lock()
            .expect("series lock")
            .retain(|l| {
                let gone = l.namespace == namespace && l.name == name;
                if gone {
                    self.scrape_failures.remove(l);
                }
                !gone
            });
    }

    /// `moe_operator_deployment_condition`: each status condition of `deployment` as written.
    pub fn set_conditions(
        &self,
        deployment: &str,
        conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    ) {
        for c in conditions {
            let l = ConditionLabels {
                deployment: deployment.into(),
                condition: c.type_.clone(),
            };
            self.conditions
                .get_or_create(&l)
                .set((c.status == "True").into());
            self.condition_series
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(l);
        }
    }

    /// Drops every per-deployment series of `deployment` (it is being deleted).
    pub fn forget(&self, deployment: &str) {
        self.set_balancedness(deployment, None);
        let l = DeploymentLabel {
            deployment: deployment.into(),
        };
        self.rollout_updated.remove(&l);
        self.rollout_total.remove(&l);
        self.condition_series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|l| {
                if l.deployment == deployment {
                    self.conditions.remove(l);
                }
                l.deployment != deployment
            });
    }

    /// `moe_operator_leader` (1 while this replica holds the Lease and runs the controller).
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(leading.into());
        self.leading.store(leading, Ordering::SeqCst);
    }

    /// Readiness: true once the replica knows its role, false again when it starts shutting down.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// `/readyz`'s answer: (ready, what the body says).
    pub fn readiness(&self) -> (bool, &'static str) {
        match (
            self.ready.load(Ordering::SeqCst),
            self.leading.load(Ordering::SeqCst),
        ) {
            (true, true) => (true, "ready: leading\n"),
            (true, false) => (true, "ready: standby\n"),
            (false, _) => (false, "not ready: starting or shutting down\n"),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().expect("registry lock");
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

/// `/metrics` router.
pub fn metrics_router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move { m.encode() }),
        )
        .with_state(m)
}

/// `/healthz` (the process serves) and `/readyz` (it has heard from the API server and is not
/// shutting down, leading or standing by; `moe_operator_leader` and the Lease say who leads).
pub fn health_router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                match m.readiness() {
                    (true, body) => (StatusCode::OK, body),
                    (false, body) => (StatusCode::SERVICE_UNAVAILABLE, body),
                }
            }),
        )
        .with_state(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_reconciles_errors_and_gauges() {
        let m = Metrics::new();
        m.observe_reconcile(Duration::from_millis(20), None);
        m.observe_reconcile(Duration::from_millis(20), Some("kube"));
        m.set_balancedness("ml/demo", Some(0.75));
        m.set_rollout("ml/demo", 1, 2);
        let t = m.encode();
        assert!(t.contains("moe_operator_reconciles_total 2"), "{t}");
        assert!(
            t.contains("moe_operator_reconcile_errors_total{reason=\"kube\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("moe_operator_plan_balancedness{deployment=\"ml/demo\"} 0.75"),
            "{t}"
        );
        assert!(
            t.contains("moe_operator_rollout_workers_updated{deployment=\"ml/demo\"} 1"),
            "{t}"
        );
        m.set_balancedness("ml/demo", None);
        assert!(!m.encode().contains("plan_balancedness{"));
        m.count_replan("kept", "CoolingDown");
        m.count_replan("kept", "CoolingDown");
        m.count_scrape_failure("ml", "demo", "prometheus", "Unreachable");
        m.count_scrape_failure("ml", "other", "workers", "GarbledMetrics");
        let t = m.encode();
        assert!(
            t.contains(
                "moe_operator_replan_decisions_total{outcome=\"kept\",reason=\"CoolingDown\"} 2"
            ),
            "{t}"
        );
        assert!(
            t.contains("moe_operator_scrape_failures_total{namespace=\"ml\",name=\"demo\",source=\"prometheus\",reason=\"Unreachable\"} 1"),
            "{t}"
        );
        m.forget_deployment("ml", "demo");
        let t = m.encode();
        assert!(!t.contains("name=\"demo\""), "{t}");
        assert!(t.contains("name=\"other\""), "{t}");
    }

    #[test]
    fn conditions_become_gauges_and_go_with_the_deployment() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
        let m = Metrics::new();
        let c = |t: &str, s: &str| Condition {
            type_: t.into(),
            status: s.into(),
            reason: "R".into(),
            message: String::new(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
            observed_generation: None,
        };
        m.set_conditions("ml/demo", &[c("Degraded", "True"), c("Ready", "False")]);
        let t = m.encode();
        assert!(
            t.contains(
                "moe_operator_deployment_condition{deployment=\"ml/demo\",condition=\"Degraded\"} 1"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "moe_operator_deployment_condition{deployment=\"ml/demo\",condition=\"Ready\"} 0"
            ),
            "{t}"
        );
        m.set_rollout("ml/demo", 1, 2);
        m.forget("ml/demo");
        assert!(!m.encode().contains("ml/demo"), "{}", m.encode());
    }

    #[test]
    fn readiness_follows_the_role_being_known_not_leadership() {
        let m = Metrics::new();
        assert!(!m.readiness().0, "not ready before the API server answered");
        m.set_ready(true);
        assert_eq!(m.readiness(), (true, "ready: standby\n"));
        assert!(m.encode().contains("moe_operator_leader 0"));
        m.set_leader(true);
        assert_eq!(m.readiness(), (true, "ready: leading\n"));
        assert!(m.encode().contains("moe_operator_leader 1"));
        m.set_ready(false);
        assert!(!m.readiness().0, "shutting down");
    }
}
