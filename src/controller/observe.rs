//! The reconcile's observation step: scrape every worker (its plan hash, and its load when the
//! source is Workers) and, once per metrics interval, read the load from Prometheus, into the
//! deployment's load window. I/O only; what to make of it is `decide`'s.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{Client, ResourceExt};

use super::fetch::prometheus_access;
use super::load::ScrapeWindow;
use super::prometheus::{sample_from_prometheus, Access, PrometheusClient, Series};
use crate::api::reason;
use crate::api::validate::{AuthRef, CaRef, LoadSource, ValidSpec};
use crate::plan::planner::moe_layer_ids;
use crate::plan::LoadWindow;
use crate::worker::wire::HttpError;
use crate::worker::wire::{WorkerClient, WorkerSample};

/// Timeout of one worker or Prometheus request.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Workers of one deployment scraped at once.
const SCRAPE_CONCURRENCY: usize = 16;

/// Where a load reading came from (the `source` label of `moe_operator_scrape_failures_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A worker's `/metrics`.
    Workers,
    /// The Prometheus query of `spec.metrics.prometheus`.
    Prometheus,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Workers => "workers",
            Source::Prometheus => "prometheus",
        }
    }
}

/// One failed load reading: where, the MetricsAvailable reason and what went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsFailure {
    pub source: Source,
    pub reason: &'static str,
    pub message: String,
    /// The spec is at fault (`metrics.prometheus.auth` or `.ca`: a missing Secret, refused
    /// credentials, a CA that does not verify): the deployment is Degraded until it is fixed,
    /// and keeps serving meanwhile. The message starts with the field.
    pub degrades: bool,
}

/// What the workers and the load source showed this reconcile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// Per pod name, the last scrape that answered.
    pub scraped: HashMap<String, WorkerSample>,
    pub failures: Vec<MetricsFailure>,
    /// The load window (None until it holds a batch).
    pub window: Option<LoadWindow>,
    /// The window took new load this time.
    pub window_changed: bool,
    /// The load source was read this time (the workers' scrapes always are; Prometheus once per
    /// interval). Between two readings the last one's MetricsAvailable stands.
    pub fresh: bool,
}

/// Per-deployment memory that is only an optimisation or a measurement: the load window (lost on
/// restart, refilled by the next scrapes). The rollout itself is read from the cluster.
struct Tracked {
    uid: String,
    window: ScrapeWindow,
    last_read: Option<Instant>,
}

/// The load windows of every deployment this operator reconciles, keyed `namespace/name`.
#[derive(Default)]
pub struct LoadWindows(Mutex<HashMap<String, Tracked>>);

impl LoadWindows {
    /// Drop a deployment's window (it is being deleted).
    pub fn forget(&self, key: &str) {
        self.0.lock().expect("load windows lock").remove(key);
    }

    /// Run `f` on the deployment's window, starting a new one for a new object (another uid).
    fn with<R>(
        &self,
        key: &str,
        uid: &str,
        spec: &ValidSpec,
        f: impl FnOnce(&mut Tracked) -> R,
    ) -> R {
        let mut all = self.0.lock().expect("load windows lock");
        let fresh = || Tracked {
            uid: uid.to_string(),
            window: ScrapeWindow::new(
                moe_layer_ids(&spec.shape),
                spec.shape.experts,
                spec.window_batches,
            ),
            last_read: None,
        };
        let t = all.entry(key.to_string()).or_insert_with(fresh);
        if t.uid != uid {
            *t = fresh();
        }
        f(t)
    }
}

/// Where and how the reconcile reads: the clients, and the deployment's namespace (where the
/// Prometheus source's Secrets are read).
pub struct Readers<'a> {
    pub client: &'a Client,
    pub workers: &'a WorkerClient,
    pub prometheus: &'a PrometheusClient,
    pub namespace: &'a str,
}

/// Scrape the deployment's workers and read its load source.
pub async fn observe(
    windows: &LoadWindows,
    readers: &Readers<'_>,
    key: &str,
    uid: &str,
    spec: &ValidSpec,
    pods: &[Pod],
) -> Observed {
    let workers = readers.workers;
    let mut obs = Observed::default();
    // Engine pods serve the engine's metrics, not moe-worker's: their plan is the one they were
    // started on (the pod's annotation), their load comes from Prometheus.
    // Scraped concurrently (at most SCRAPE_CONCURRENCY at once, answers kept in pod order): with
    // several EP groups a deployment has hundreds of workers, and one after the other a reconcile
    // would take their sum.
    let targets: Vec<(String, String)> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && spec.engine.is_none())
        .filter_map(|p| Some((p.name_any(), pod_ip(p)?)))
        .collect();
    let answers: Vec<_> = futures::stream::iter(targets)
        .map(|(name, ip)| async move {
            let r = workers.scrape(&ip, spec.ports.metrics, HTTP_TIMEOUT).await;
            (name, r)
        })
        .buffered(SCRAPE_CONCURRENCY)
        .collect()
        .await;
    for (name, r) in answers {
        match r {
            Ok(s) => {
                obs.scraped.insert(name, s);
            }
            Err(e) => obs.failures.push(MetricsFailure {
                source: Source::Workers,
                reason: e.reason(),
                message: e.to_string(),
                degrades: false,
            }),
        }
    }
    let due = windows.with(key, uid, spec, |t| {
        let due = t.last_read.is_none_or(|at| at.elapsed() >= spec.interval);
        if due {
            t.last_read = Some(Instant::now());
        }
        due
    });
    match &spec.load_source {
        LoadSource::Workers => {
            obs.fresh = true;
            if due {
                let samples: Vec<(String, WorkerSample)> = obs
                    .scraped
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
                windows.with(key, uid, spec, |t| {
                    t.window.retain_workers(|w| names.iter().any(|n| n == w));
                    match t.window.record(&samples) {
                        Ok(()) => obs.window_changed = !samples.is_empty(),
                        Err(e) => obs.failures.push(garbled(Source::Workers, e.to_string())),
                    }
                });
            }
        }
        // One query per interval; its answer is that interval's per-expert load (the query takes
        // increase() or rate() of the counters), one batch of the window.
        LoadSource::Prometheus {
            url,
            query,
            auth,
            ca,
            series,
        } if due => {
            obs.fresh = true;
            let read = read_prometheus(readers, url, query, auth.as_ref(), ca.as_ref())
                .await
                .and_then(|s| {
                    sample_from_prometheus(&s, series, spec.shape.first_moe_layer)
                        .map_err(|e| garbled(Source::Prometheus, e))
                });
            match read {
                Ok(s) => windows.with(key, uid, spec, |t| {
                    match t
                        .window
                        .push_amounts(&format!("Prometheus query at {url}"), &s)
                    {
                        Ok(any) => obs.window_changed = any,
                        Err(e) => obs.failures.push(garbled(Source::Prometheus, e)),
                    }
                }),
                Err(f) => obs.failures.push(f),
            }
        }
        LoadSource::Prometheus { .. } => {}
    }
    obs.window = windows.with(key, uid, spec, |t| t.window.load_window());
    obs
}

/// One Prometheus reading: the credentials and CA the spec names (read from the deployment's
/// namespace), then the query; its answer as one sample.
async fn read_prometheus(
    readers: &Readers<'_>,
    url: &str,
    query: &str,
    auth: Option<&AuthRef>,
    ca: Option<&CaRef>,
) -> Result<Vec<Series>, MetricsFailure> {
    let ns = readers.namespace;
    let access = prometheus_access(readers.client, ns, auth, ca)
        .await
        .map_err(|e| MetricsFailure {
            source: Source::Prometheus,
            reason: reason::PROMETHEUS_CREDENTIALS_INVALID,
            message: e.to_string(),
            degrades: true,
        })?;
    let series = readers
        .prometheus
        .query_with(url, query, &access, HTTP_TIMEOUT)
        .await
        .map_err(|e| query_failure(&e, url, ns, auth, ca, &access))?;
    Ok(series)
}

/// A failed query: refused credentials and failed TLS handshakes name the spec field to fix and
/// degrade the deployment; anything else (Prometheus down, a bad answer) is only a failed reading.
/// `e`'s text has no credential in it ([`PrometheusClient::query_with`]).
fn query_failure(
    e: &HttpError,
    url: &str,
    ns: &str,
    auth: Option<&AuthRef>,
    ca: Option<&CaRef>,
    access: &Access,
) -> MetricsFailure {
    let (reason, message) = match (e, auth, ca) {
        (HttpError::Status { status: s @ (401 | 403), body, .. }, Some(a), _) => (
            reason::PROMETHEUS_AUTH_REFUSED,
            format!(
                "{}: Prometheus at {url} refused the credentials in Secret {ns}/{} (HTTP {s}: {body}): put ones it accepts in the Secret",
                a.field(),
                a.secret()
            ),
        ),
        (HttpError::Status { status: s @ (401 | 403), body, .. }, None, _) => (
            reason::PROMETHEUS_AUTH_REFUSED,
            format!(
                "spec.metrics.prometheus.auth: Prometheus at {url} asks for credentials (HTTP {s}: {body}): set auth.basicAuthSecret or auth.bearerTokenSecret"
            ),
        ),
        (HttpError::Tls { message, .. }, _, Some(c)) => (
            reason::PROMETHEUS_TLS_FAILED,
            format!(
                "{}: TLS with Prometheus at {url} failed ({message}): the CA bundle in {} does not verify its certificate; give the CA that signed it",
                c.field(),
                c.describe(ns)
            ),
        ),
        (HttpError::Tls { message, .. }, _, None) => (
            reason::PROMETHEUS_TLS_FAILED,
            format!(
                "spec.metrics.prometheus.ca: TLS with Prometheus at {url} failed ({message}): if a private CA signed its certificate, give it in ca.secret or ca.configMap"
            ),
        ),
        _ => {
            return MetricsFailure {
                source: Source::Prometheus,
                reason: e.reason(),
                message: e.to_string(),
                degrades: false,
            }
        }
    };
    MetricsFailure {
        source: Source::Prometheus,
        reason,
        message: access.redact(&message),
        degrades: true,
    }
}

fn garbled(source: Source, message: String) -> MetricsFailure {
    MetricsFailure {
        degrades: false,
        source,
        reason: reason::GARBLED_METRICS,
        message,
    }
}

/// The pod's IP, once it has one.
pub fn pod_ip(p: &Pod) -> Option<String> {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .filter(|s| !s.is_empty())
}
