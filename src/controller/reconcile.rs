//! The reconcile driver: fetch -> validate -> observe -> decide -> apply, run by kube's
//! `Controller` on MoEDeployments and the objects they own. The I/O steps are `fetch`, `observe`
//! and `apply`; every decision is `decide`'s, a pure function tested without a cluster.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, ResourceExt};
use tracing::Instrument;

use super::apply::apply;
use super::build::{self, LABEL_DEPLOYMENT};
use super::decide::{self, Inputs};
use super::fetch;
use super::observe::{observe, LoadWindows, Readers};
use super::prometheus::{PrometheusClient, PrometheusSetupError};
use super::telemetry::Metrics;
use crate::api::pod_policy::PodPolicy;
use crate::api::validate::validate;
use crate::api::MoEDeployment;
use crate::worker::wire::WorkerClient;

/// Default for how long an in-place push may take (loading the experts a plan adds, on the
/// slowest storage we expect) before the worker is replaced instead.
pub const DEFAULT_PUSH_TIMEOUT: Duration = Duration::from_secs(600);
/// Requeue after a failed reconcile.
const ERROR_REQUEUE: Duration = Duration::from_secs(10);

/// Errors of one reconcile; each has a metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building owned objects: {0}")]
    Build(#[from] build::BuildError),
    #[error("planning: {0}")]
    Plan(#[from] crate::plan::planner::PlanError),
    #[error("load window: {0}")]
    Window(#[from] crate::plan::WindowError),
    #[error("encoding the plan: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("object without {0} (objects read from the API server always have it)")]
    MissingMetadata(&'static str),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Build(e) => e.metric_label(),
            Error::Plan(e) => e.reason(),
            Error::Window(_) => "load_window",
            Error::Encode(_) => "encode",
            Error::MissingMetadata(_) => "missing_metadata",
        }
    }
}

/// Shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// How long an in-place push may stay in flight before its pod is replaced.
    pub push_timeout: Duration,
    /// What MoEDeployment authors may ask of the pods (the one gate, `api::pod_policy`).
    pub pod_policy: PodPolicy,
    prometheus: PrometheusClient,
    /// Scrapes workers and pushes plans; shares the Prometheus client's connection pool.
    pub(super) workers: WorkerClient,
    windows: LoadWindows,
}

impl Context {
    /// `pod_policy` is what the cluster admin allows MoEDeployment authors (the operator's flags).
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        instance: Option<String>,
        pod_policy: PodPolicy,
    ) -> Result<Self, PrometheusSetupError> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "moe-operator".into(),
                instance,
            },
        );
        let prometheus = PrometheusClient::new(&pod_policy)?;
        Ok(Self {
            client,
            recorder,
            metrics,
            push_timeout: DEFAULT_PUSH_TIMEOUT,
            workers: WorkerClient::with_http(prometheus.http().clone()),
            prometheus,
            pod_policy,
            windows: LoadWindows::default(),
        })
    }
}

/// Main reconcile entry: one span per reconcile, so a log reader can follow one deployment.
pub async fn reconcile(md: Arc<MoEDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let span = tracing::info_span!(
        "reconcile",
        deployment = %format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any()),
        generation = md.metadata.generation.unwrap_or_default(),
    );
    let r = reconcile_inner(&md, &ctx).instrument(span).await;
    ctx.metrics.observe_reconcile(
        started.elapsed(),
        r.as_ref().err().map(|e| e.metric_label()),
    );
    r
}

/// Requeue with backoff on errors; the error is logged and counted already.
pub fn error_policy(md: Arc<MoEDeployment>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(deployment = %md.name_any(), error = %err, "reconcile failed");
    Action::requeue(ERROR_REQUEUE)
}

async fn reconcile_inner(md: &MoEDeployment, ctx: &Context) -> Result<Action, Error> {
    let ns = md
        .namespace()
        .ok_or(Error::MissingMetadata("metadata.namespace"))?;
    let name = md.name_any();
    let key = format!("{ns}/{name}");
    if md.metadata.deletion_timestamp.is_some() {
        // Being deleted: garbage collection removes what it owns; applying now would recreate it.
        ctx.windows.forget(&key);
        ctx.metrics.forget(&key);
        ctx.metrics.forget_deployment(&ns, &name);
        return Ok(Action::await_change());
    }
    let mds: Api<MoEDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(status) = fetch::status(&mds, &name).await? else {
        return Ok(Action::await_change());
    };
    let (now, now_s) = clock();
    let spec = match validate(&md.spec, &ctx.pod_policy) {
        Ok(spec) => spec,
        Err(errors) => {
            let d = decide::invalid(md, &status, &errors, &now);
            apply(ctx, md, &ns, &key, &[], &d).await?;
            return Ok(Action::requeue(d.requeue));
        }
    };
    let fetched = fetch::fetch(&ctx.client, md, &ns, &spec, status).await?;
    let uid = md.metadata.uid.clone().unwrap_or_default();
    let readers = Readers {
        client: &ctx.client,
        workers: &ctx.workers,
        prometheus: &ctx.prometheus,
        namespace: &ns,
    };
    let observed = observe(&ctx.windows, &readers, &key, &uid, &spec, &fetched.pods).await;
    for f in &observed.failures {
        ctx.metrics
            .count_scrape_failure(&ns, &name, f.source.label(), f.reason);
    }
    let d = decide::decide(&Inputs {
        md,
        spec: &spec,
        fetched: &fetched,
        observed: &observed,
        pod_policy: &ctx.pod_policy,
        push_timeout: ctx.push_timeout,
        now: &now,
        now_s,
    })?;
    for v in &d.replans {
        ctx.metrics.count_replan(v.outcome.label(), v.reason);
    }
    apply(ctx, md, &ns, &key, &fetched.pods, &d).await?;
    Ok(Action::requeue(d.requeue))
}

/// Now, as a condition timestamp and in seconds since the Unix epoch.
fn clock() -> (Time, f64) {
    (Time(Timestamp::now()), wall_s())
}

/// Seconds since the Unix epoch (the rollout's annotations and the cooldown count in these).
pub(super) fn wall_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Run the controller until `shutdown` resolves.
/// `watch_client` serves the watches (long polls); reconciles use the context's client.
pub async fn run_controller(
    ctx: Arc<Context>,
    watch_client: Client,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = watch_client;
    let (mds, pods, cms): (Api<MoEDeployment>, Api<Pod>, Api<ConfigMap>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let owned = watcher::Config::default().labels(LABEL_DEPLOYMENT);
    Controller::new(mds, watcher::Config::default())
        .owns(pods, owned.clone())
        .owns(cms, owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
}
