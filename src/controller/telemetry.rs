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

/// Operator metrics; `ready` is whether this replica leads and runs the controller.
pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Counter,
    errors: Family<ReasonLabel, Counter>,
    duration: Histogram,
    balancedness: Family<DeploymentLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    rollout_updated: Family<DeploymentLabel, Gauge>,
    rollout_total: Family<DeploymentLabel, Gauge>,
    leader: Gauge,
    replans: Family<ReplanLabels, Counter>,
    scrape_failures: Family<ScrapeFailureLabels, Counter>,
    /// The label sets `scrape_failures` holds (the family cannot list them), to drop a deleted
    /// deployment's.
    scrape_failure_series: Mutex<std::collections::HashSet<ScrapeFailureLabels>>,
    pub ready: AtomicBool,
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
            leader,
            replans,
            scrape_failures,
            scrape_failure_series: Mutex::default(),
            ready: AtomicBool::new(false),
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

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(leading.into());
        self.ready.store(leading, Ordering::SeqCst);
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

/// `/healthz` (the process serves) and `/readyz` (this replica leads and runs the controller;
/// a standby replica is alive but not ready).
pub fn health_router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if m.ready.load(Ordering::SeqCst) {
                    (StatusCode::OK, "leading\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "standby: not the leader\n")
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
}
