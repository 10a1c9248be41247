//! The reconciler: fetch -> validate -> plan -> build -> apply -> roll -> status, driven by
//! kube's `Controller` on MoEDeployments and the objects they own. The pure steps live in
//! `validate`, `build`, `replan`, `rollout` and `status`; this module does the I/O around them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use super::build::{
    self, admin_secret_name, plan_config_map_name, Desired, ANNOTATION_SPEC_HASH, FIELD_MANAGER,
    LABEL_DEPLOYMENT, TOKEN_KEY,
};
use super::initial_load::initial_load_window;
use super::load::ScrapeWindow;
use super::prometheus::{sample_from_prometheus, PrometheusClient, PrometheusSetupError};
use super::replan::{decide, Current};
use super::rollout::{
    next_step, RolloutGoal, Step, WorkerState, ANNOTATION_PUSH_REJECTED,
    ANNOTATION_PUSH_REJECTED_SINCE, ANNOTATION_TARGET_PLAN, ANNOTATION_TARGET_SINCE,
};
use super::status::{plan_status, set_condition, workers_status};
use super::telemetry::Metrics;
use crate::api::pod_policy::{check_pod, PodPolicy};
use crate::api::units::{parse_duration, parse_quantity};
use crate::api::validate::validate;
use crate::api::{
    MetricsSource, MoEDeployment, MoEDeploymentStatus, ObservedLoad, ReplicationPolicy,
    RolloutStatus,
};
use crate::plan::balance::evaluate;
use crate::plan::craft::CraftOptions;
use crate::plan::planner::{make_plan, moe_layer_ids, Budget, PlanRequest, DEFAULT_AUTO_MIN_GAIN};
use crate::plan::{Algorithm, ExpertPlan, LoadWindow, Topology};
use crate::worker::wire::{HttpError, WorkerClient, WorkerSample};

/// Timeout of one worker or Prometheus request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for how long an in-place push may take (loading the experts a plan adds, on the
/// slowest storage we expect) before the worker is replaced instead.
pub const DEFAULT_PUSH_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a worker may refuse pushes for holding another admin token before it is replaced:
/// the kubelet brings a re-created Secret to the mounted file within about a minute (its sync
/// period plus cache), and the worker re-reads the file when it changes.
const PUSH_REFUSAL_GRACE: Duration = Duration::from_secs(120);
/// Requeue while a rollout or start-up is in progress.
const BUSY_REQUEUE: Duration = Duration::from_secs(2);

/// Errors of one reconcile; each has a metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building owned objects: {0}")]
    Build(#[from] build::BuildError),
    #[error("planning: {0}")]
    Plan(#[from] crate::plan::planner::PlanError),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Build(e) => e.metric_label(),
            Error::Plan(e) => e.reason(),
            Error::Other(_) => "other",
        }
    }
}

/// Per-deployment memory that is only an optimisation or a measurement: the load window (lost on
/// restart, refilled by the next scrapes). The rollout itself is read from the cluster.
struct Tracked {
    uid: String,
    window: ScrapeWindow,
    last_scrape: Option<Instant>,
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
    workers: WorkerClient,
    tracked: Mutex<HashMap<String, Tracked>>,
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
            tracked: Mutex::new(HashMap::new()),
        })
    }
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

fn wall_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn event(ctx: &Context, md: &MoEDeployment, warning: bool, reason: &str, note: String) {
    event_about(ctx, md, None, warning, reason, note).await
}

/// An Event about `md` that concerns one of its pods. The pod is the Event's related object: the
/// recorder folds Events with the same reason and objects into one series and keeps only the
/// first note, so without it "pushed to worker-1" would count as a repeat of "pushed to worker-0".
async fn event_about(
    ctx: &Context,
    md: &MoEDeployment,
    related: Option<&Pod>,
    warning: bool,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: related.map(|p| p.object_ref(&())),
    };
    if let Err(e) = ctx.recorder.publish(&ev, &md.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "publishing event failed");
    }
}

/// Server-side apply under the operator's field manager, taking ownership of conflicting fields.
async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = obj
        .meta()
        .name
        .clone()
        .ok_or_else(|| Error::Other("object without a name".into()))?;
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(&name, &pp, &Patch::Apply(obj)).await?)
}

/// The algorithm a policy plans with once load is known.
fn algorithm(policy: ReplicationPolicy) -> Algorithm {
    match policy {
        ReplicationPolicy::Craft => Algorithm::Craft,
        ReplicationPolicy::Eplb => Algorithm::Eplb,
        ReplicationPolicy::PlacementOnly => Algorithm::Placement,
        ReplicationPolicy::None => Algorithm::None,
    }
}

/// The planner request for a spec (validated: numbers are in range).
fn plan_request(md: &MoEDeployment, algorithm: Algorithm) -> Result<PlanRequest, Error> {
    let spec = &md.spec;
    let model = spec
        .model
        .shape()
        .map_err(|e| Error::Other(e.to_string()))?;
    let b = &spec.replication.budget;
    let budget = if let Some(r) = b.replicas_per_gpu {
        Budget::ReplicasPerGpu(r.max(0) as u32)
    } else if let Some(m) = &b.memory_per_gpu {
        let bytes = parse_quantity(m)
            .map_err(|e| Error::Other(format!("spec.replication.budget.memoryPerGpu: {e}")))?;
        Budget::MemoryPerGpu(u64::try_from(bytes).unwrap_or(u64::MAX))
    } else {
        Budget::Auto {
            min_gain_per_replica: DEFAULT_AUTO_MIN_GAIN,
        }
    };
    let t = &spec.topology;
    let topology = Topology::new(
        (t.nodes.max(0) as usize) * (t.gpus_per_node.max(0) as usize),
        t.nodes.max(0) as usize,
    )
    .map_err(|e| Error::Other(format!("spec.topology: {e}")))?;
    Ok(PlanRequest {
        algorithm,
        model,
        topology,
        budget,
        eplb_groups: None,
        craft: CraftOptions::default(),
    })
}

/// The plan before any load is measured and without `spec.initialLoad`: placement only on a zero
/// load (contiguous for policy None).
fn initial_plan(md: &MoEDeployment) -> Result<ExpertPlan, Error> {
    let alg = match md.spec.replication.policy {
        ReplicationPolicy::None => Algorithm::None,
        _ => Algorithm::Placement,
    };
    let req = plan_request(md, alg)?;
    let ids = moe_layer_ids(&req.model);
    let e = req.model.experts as usize;
    let zero = LoadWindow::new(ids.clone(), e, vec![0.0; ids.len() * e]).map_err(Error::Other)?;
    Ok(make_plan(&req, &zero, None)?)
}

fn window_batches(md: &MoEDeployment, interval: Duration) -> usize {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match &md.spec.replication.window {
        IntOrString::Int(n) => (*n).max(1) as usize,
        IntOrString::String(s) => parse_duration(s)
            .map(|d| (d.as_secs_f64() / interval.as_secs_f64().max(1e-3)).ceil() as usize)
            .unwrap_or(10)
            .max(1),
    }
}

fn pod_ip(p: &Pod) -> Option<String> {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .filter(|s| !s.is_empty())
}

/// Main reconcile entry.
pub async fn reconcile(md: Arc<MoEDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    // One span per reconcile, so a log reader can follow one deployment through every step.
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
    Action::requeue(Duration::from_secs(10))
}

async fn reconcile_inner(md: &MoEDeployment, ctx: &Context) -> Result<Action, Error> {
    let ns = md
        .namespace()
        .ok_or_else(|| Error::Other("MoEDeployment without a namespace".into()))?;
    let name = md.name_any();
    let key = format!("{ns}/{name}");
    if md.metadata.deletion_timestamp.is_some() {
        // Being deleted: garbage collection removes what it owns; applying now would recreate it.
        ctx.tracked.lock().expect("tracked lock").remove(&key);
        ctx.metrics.set_balancedness(&key, None);
        return Ok(Action::await_change());
    }
    let gen = md.metadata.generation;
    let now = now_time();
    let client = ctx.client.clone();
    let mds: Api<MoEDeployment> = Api::namespaced(client.clone(), &ns);
    // Start from the status in the API server, not the watch cache: the cache can still hold the
    // status before our own last write, and building on it would undo that write (a plan's
    // predecessor balancedness, its computed-at time).
    let mut status = match mds.get_opt(&name).await? {
        Some(fresh) => fresh.status.unwrap_or_default(),
        None => return Ok(Action::await_change()),
    };
    let old_status = status.clone();

    // Validate: an invalid spec is reported, never acted on and never Ready.
    let errs = validate(&md.spec, &ctx.pod_policy);
    if !errs.is_empty() {
        let msg = errs
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        ctx.metrics.set_balancedness(&key, None);
        let held = Held {
            reason: "InvalidSpec",
            message: msg,
            retry: Duration::from_secs(300),
        };
        return hold_back(ctx, md, &mds, status, &old_status, &now, held).await;
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);

    // The plan in force: the ConfigMap's, when it still fits the spec.
    let current: Option<ExpertPlan> = cms
        .get_opt(&plan_config_map_name(md))
        .await?
        .and_then(|cm| build::stored_plan(&cm))
        .and_then(Result::ok)
        .filter(|p| build::check_plan(md, p).is_ok());

    // No plan yet and an initial load in the spec: the first plan comes from it. A trace that
    // cannot be read holds the deployment back (Degraded, not Ready) rather than silently planning
    // without it; the ConfigMap is not watched, so this re-checks every 30 s.
    let initial_window = match (&current, &md.spec.initial_load) {
        (None, Some(sel)) => {
            let cm = cms.get_opt(&sel.name).await?;
            let optional_missing = sel.optional == Some(true)
                && cm.as_ref().is_none_or(|c| {
                    !c.data.as_ref().is_some_and(|d| d.contains_key(&sel.key))
                        && !c
                            .binary_data
                            .as_ref()
                            .is_some_and(|d| d.contains_key(&sel.key))
                });
            let shape = md
                .spec
                .model
                .shape()
                .map_err(|e| Error::Other(e.to_string()))?;
            match initial_load_window(&ns, &sel.name, &sel.key, cm.as_ref(), &shape) {
                Ok(w) => Some(w),
                Err(_) if optional_missing => None,
                Err(e) => {
                    let held = Held {
                        reason: "InitialLoadUnavailable",
                        message: e.to_string(),
                        retry: Duration::from_secs(30),
                    };
                    return hold_back(ctx, md, &mds, status, &old_status, &now, held).await;
                }
            }
        }
        _ => None,
    };
    set_condition(
        &mut status.conditions,
        "Degraded",
        false,
        "SpecValid",
        "",
        gen,
        &now,
    );
    let stored_token = secrets
        .get_opt(&admin_secret_name(md))
        .await?
        .and_then(|s| s.data.and_then(|mut d| d.remove(TOKEN_KEY)))
        .and_then(|b| String::from_utf8(b.0).ok())
        .filter(|t| !t.is_empty());
    let minted = stored_token.is_none();
    let token = stored_token.unwrap_or_else(build::new_admin_token);

    let pods: Vec<Pod> = pods_api
        .list(&ListParams::default().labels(&format!("{LABEL_DEPLOYMENT}={name}")))
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == md.metadata.uid.as_ref())
        })
        .collect();
    if minted && !pods.is_empty() {
        // Never rotate silently: running workers hold the old token until they re-read the
        // Secret's file; a worker that refuses a push with it is replaced (PlanPushRefused).
        event(
            ctx,
            md,
            true,
            "AdminTokenRotated",
            format!(
                "Secret {} was missing: minted a new admin token; workers re-read it from their \
                 mounted Secret, and those that refuse a plan push with it are replaced",
                admin_secret_name(md)
            ),
        )
        .await;
    }

    // Load: scrape every worker each time (also how readiness and plan hashes are confirmed),
    // and feed the window once per metrics interval.
    let interval = parse_duration(&md.spec.metrics.interval).unwrap_or(Duration::from_secs(15));
    let metrics_port = md.spec.worker.ports.metrics as u16;
    let mut scraped: HashMap<String, WorkerSample> = HashMap::new();
    let mut failures: Vec<String> = Vec::new();
    for p in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let Some(ip) = pod_ip(p) else { continue };
        match ctx.workers.scrape(&ip, metrics_port, HTTP_TIMEOUT).await {
            Ok(s) => {
                scraped.insert(p.name_any(), s);
            }
            Err(e) => failures.push(format!("{} ({})", e, e.reason())),
        }
    }
    let (window, mut window_changed) = {
        let layer_ids = moe_layer_ids(
            &md.spec
                .model
                .shape()
                .map_err(|e| Error::Other(e.to_string()))?,
        );
        let mut tracked = ctx.tracked.lock().expect("tracked lock");
        let uid = md.metadata.uid.clone().unwrap_or_default();
        let t = tracked.entry(key.clone()).or_insert_with(|| Tracked {
            uid: uid.clone(),
            window: ScrapeWindow::new(
                layer_ids.clone(),
                md.spec.model.experts.max(0) as u32,
                window_batches(md, interval),
            ),
            last_scrape: None,
        });
        if t.uid != uid {
            *t = Tracked {
                uid,
                window: ScrapeWindow::new(
                    layer_ids,
                    md.spec.model.experts.max(0) as u32,
                    window_batches(md, interval),
                ),
                last_scrape: None,
            };
        }
        let due = t.last_scrape.is_none_or(|at| at.elapsed() >= interval);
        let mut changed = false;
        if due {
            t.last_scrape = Some(Instant::now());
            let samples: Option<Vec<(String, WorkerSample)>> = match md.spec.metrics.source {
                MetricsSource::Workers => Some(
                    scraped
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                ),
                MetricsSource::Prometheus => None,
            };
            if let Some(samples) = samples {
                let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
                t.window.retain_workers(|w| names.iter().any(|n| n == w));
                if let Err(e) = t.window.record(&samples) {
                    failures.push(format!("{e} (GarbledMetrics)"));
                } else {
                    changed = !samples.is_empty();
                }
            }
        }
        (t.window.load_window(), (changed, due))
    };
    // Prometheus source: one query per interval; its answer is that interval's per-expert load
    // (the query takes increase() or rate() of the counters), one batch of the window.
    let window = if md.spec.metrics.source == MetricsSource::Prometheus && window_changed.1 {
        let (url, query) = md
            .spec
            .metrics
            .prometheus
            .as_ref()
            .map(|p| (p.url.clone(), p.query.clone()))
            .unwrap_or_default();
        match ctx.prometheus.query(&url, &query, HTTP_TIMEOUT).await {
            Ok(series) => match sample_from_prometheus(&series) {
                Ok(s) => {
                    let mut tracked = ctx.tracked.lock().expect("tracked lock");
                    let t = tracked.get_mut(&key).expect("inserted above");
                    match t
                        .window
                        .push_amounts(&format!("Prometheus query at {url}"), &s)
                    {
                        Ok(any) => window_changed.0 = any,
                        Err(e) => failures.push(format!("{e} (GarbledMetrics)")),
                    }
                    t.window.load_window()
                }
                Err(e) => {
                    failures.push(format!("{e} (GarbledMetrics)"));
                    window
                }
            },
            Err(e) => {
                failures.push(format!("{e} ({})", e.reason()));
                window
            }
        }
    } else {
        window
    };
    // Between two Prometheus queries the last answer stands: a reconcile that did not query must
    // not turn a failed query's MetricsAvailable=False back to True.
    let queried = md.spec.metrics.source != MetricsSource::Prometheus || window_changed.1;
    if failures.is_empty() && queried {
        set_condition(
            &mut status.conditions,
            "MetricsAvailable",
            true,
            "Scraped",
            &match md.spec.metrics.source {
                MetricsSource::Prometheus => {
                    format!("load from Prometheus; {} worker(s) answered", scraped.len())
                }
                MetricsSource::Workers => format!("{} worker(s) answered", scraped.len()),
            },
            gen,
            &now,
        );
    } else if !failures.is_empty() {
        let reason = failures
            .first()
            .and_then(|f| {
                f.rsplit_once('(')
                    .map(|(_, r)| r.trim_end_matches(')').to_string())
            })
            .unwrap_or_else(|| "ScrapeFailed".into());
        set_condition(
            &mut status.conditions,
            "MetricsAvailable",
            false,
            &reason,
            &failures.join("; "),
            gen,
            &now,
        );
    }

    // Plan: the one in force, a first one, or a better one from the window.
    let mut plan = match current.clone() {
        Some(p) => p,
        None => {
            let (p, from) = match (&initial_window, &md.spec.initial_load) {
                (Some(w), Some(sel)) => (
                    make_plan(
                        &plan_request(md, algorithm(md.spec.replication.policy))?,
                        w,
                        None,
                    )?,
                    format!(
                        "from the initial load in ConfigMap {ns}/{} key {:?}",
                        sel.name, sel.key
                    ),
                ),
                _ => (initial_plan(md)?, "before any load is measured".to_string()),
            };
            event(
                ctx,
                md,
                false,
                "InitialPlan",
                format!(
                    "plan {} ({}, R={}) {from}",
                    p.short_hash(),
                    p.algorithm,
                    p.replicas_per_gpu
                ),
            )
            .await;
            status.plan = Some(plan_status(&p, None, Some(now.clone())));
            p
        }
    };
    if let (Some(w), true) = (
        &window,
        md.spec.replication.policy != ReplicationPolicy::None,
    ) {
        if window_changed.0 && w.total_tokens() > 0.0 {
            let req = plan_request(md, algorithm(md.spec.replication.policy))?;
            match make_plan(&req, w, Some(&plan)) {
                Ok(candidate) => {
                    let cur_b = evaluate(&plan, w).map(|e| e.balancedness).unwrap_or(0.0);
                    let cand_b = evaluate(&candidate, w)
                        .map(|e| e.balancedness)
                        .unwrap_or(0.0);
                    status.observed = Some(ObservedLoad {
                        balancedness: Some(cur_b),
                        tokens: w.total_tokens() as i64,
                        window_batches: w.batches() as i64,
                    });
                    let rolled_at = status
                        .plan
                        .as_ref()
                        .and_then(|p| p.computed_at.as_ref())
                        .map(|t| t.0.as_second() as f64)
                        .unwrap_or(0.0);
                    let cooldown = parse_duration(&md.spec.replication.cooldown)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(300.0);
                    let d = decide(
                        Some(&Current {
                            hash: &plan.hash,
                            balancedness: cur_b,
                            rolled_out_at_s: rolled_at,
                        }),
                        &candidate.hash,
                        cand_b,
                        md.spec.replication.min_improvement,
                        cooldown,
                        wall_s(),
                    );
                    if d.rolls_out() {
                        event(
                            ctx,
                            md,
                            false,
                            d.reason(),
                            format!(
                                "plan {} ({}, R={}): predicted balancedness {:.3} over {:.3} of plan {}",
                                candidate.short_hash(),
                                candidate.algorithm,
                                candidate.replicas_per_gpu,
                                cand_b,
                                cur_b,
                                plan.short_hash()
                            ),
                        )
                        .await;
                        status.plan = Some(plan_status(&candidate, Some(cur_b), Some(now.clone())));
                        plan = candidate;
                    } else {
                        tracing::debug!(deployment = %key, reason = d.reason(), "plan kept");
                    }
                }
                Err(e) => {
                    event(ctx, md, true, "PlanFailed", e.to_string()).await;
                }
            }
        }
    }
    if status.plan.as_ref().map(|p| p.hash.as_str()) != Some(plan.hash.as_str()) {
        status.plan = Some(plan_status(&plan, None, Some(now.clone())));
    }
    ctx.metrics
        .set_balancedness(&key, plan.stats.as_ref().map(|s| s.balancedness));
    set_condition(
        &mut status.conditions,
        "PlanReady",
        true,
        "Planned",
        &format!("plan {} ({})", plan.short_hash(), plan.algorithm),
        gen,
        &now,
    );

    // Build and apply the owned objects (the ConfigMap first, so replaced pods start on it).
    let desired: Desired = match build::build(md, &plan, &token) {
        Ok(d) => d,
        // A plan that cannot be stored (too large for its ConfigMap) holds the deployment back
        // with the limit named, as an invalid spec does; the pods keep the plan they have.
        Err(e @ build::BuildError::PlanTooLarge(_)) => {
            let held = Held {
                reason: "PlanTooLarge",
                message: e.to_string(),
                retry: Duration::from_secs(300),
            };
            return hold_back(ctx, md, &mds, status, &old_status, &now, held).await;
        }
        Err(e) => return Err(e.into()),
    };
    // The backstop of the pod policy: whatever a spec field maps onto a pod, a pod that asks for
    // what the cluster admin did not allow is never applied.
    let refused: Vec<String> = desired
        .pods
        .iter()
        .flat_map(|p| check_pod(p, &ctx.pod_policy))
        .collect();
    if !refused.is_empty() {
        let held = Held {
            reason: "PodPolicy",
            message: refused.join("; "),
            retry: Duration::from_secs(300),
        };
        return hold_back(ctx, md, &mds, status, &old_status, &now, held).await;
    }
    apply(&cms, &desired.plan_config_map).await?;
    apply(&secrets, &desired.admin_secret).await?;
    apply(
        &Api::<Service>::namespaced(client.clone(), &ns),
        &desired.service,
    )
    .await?;
    apply(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns),
        &desired.pdb,
    )
    .await?;

    // Roll: the state machine on cluster state (pod annotations and scraped hashes).
    let workers: Vec<WorkerState> = pods
        .iter()
        .filter_map(|p| {
            // Readiness is the pod's Ready condition (the kubelet probes `/readyz`); a scrape
            // that fails (a changed metrics port, a network blip) says nothing about serving.
            let s = scraped.get(&p.name_any());
            WorkerState::from_pod(p, s.and_then(|s| s.plan_hash.as_deref()))
        })
        .collect();
    let goal = RolloutGoal {
        plan_hash: plan.hash.clone(),
        spec_hashes: desired
            .pods
            .iter()
            .map(|p| {
                p.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_SPEC_HASH).cloned())
                    .unwrap_or_default()
            })
            .collect(),
        strategy: md.spec.rollout.strategy,
        max_unavailable: md.spec.rollout.max_unavailable.max(1) as u32,
        push_timeout_s: i64::try_from(ctx.push_timeout.as_secs()).unwrap_or(i64::MAX),
        refusal_grace_s: PUSH_REFUSAL_GRACE.as_secs() as i64,
        now_s: wall_s() as i64,
    };
    let step = next_step(&goal, &workers);
    execute(ctx, md, &pods_api, &pods, &desired, &plan, &token, &step).await?;

    // Status.
    let nodes = goal.nodes();
    status.workers = Some(workers_status(nodes, &workers, &step));
    status.rollout = Some(RolloutStatus {
        target_hash: plan.hash.clone(),
        updated: step.updated as i32,
        total: nodes as i32,
    });
    ctx.metrics.set_rollout(&key, step.updated, nodes);
    let mut ready_msg = format!(
        "{}/{} workers ready on plan {}",
        step.updated,
        nodes,
        plan.short_hash()
    );
    if !step.waiting.is_empty() {
        ready_msg.push_str(&format!("; waiting for: {}", step.waiting_summary(8)));
    }
    set_condition(
        &mut status.conditions,
        "Ready",
        step.done,
        if step.done {
            "WorkersReady"
        } else {
            "RollingOut"
        },
        &ready_msg,
        gen,
        &now,
    );
    set_condition(
        &mut status.conditions,
        "Progressing",
        !step.done,
        if step.done {
            "RolloutComplete"
        } else {
            "RollingOut"
        },
        &ready_msg,
        gen,
        &now,
    );
    status.observed_generation = gen;
    if status != old_status {
        patch_status(&mds, &name, &status).await?;
    }
    Ok(Action::requeue(if step.done {
        interval
    } else {
        BUSY_REQUEUE.min(interval)
    }))
}

#[allow(clippy::too_many_arguments)]
async fn execute(
    ctx: &Context,
    md: &MoEDeployment,
    pods_api: &Api<Pod>,
    pods: &[Pod],
    desired: &Desired,
    plan: &ExpertPlan,
    token: &str,
    step: &Step,
) -> Result<(), Error> {
    let by_rank = |rank: u32| -> Vec<&Pod> {
        pods.iter()
            .filter(|p| {
                p.labels().get(build::LABEL_NODE_RANK).map(String::as_str)
                    == Some(rank.to_string().as_str())
            })
            .collect()
    };
    for &rank in &step.expired {
        for p in by_rank(rank) {
            event_about(
                ctx,
                md,
                Some(p),
                true,
                "PlanPushExpired",
                format!(
                    "{} did not take plan {} in place (refused, or in flight past {:?}): replacing it",
                    p.name_any(),
                    plan.short_hash(),
                    ctx.push_timeout
                ),
            )
            .await;
        }
    }
    for &rank in &step.delete {
        for p in by_rank(rank)
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
        {
            pods_api
                .delete(&p.name_any(), &DeleteParams::default())
                .await?;
            event_about(
                ctx,
                md,
                Some(p),
                false,
                "WorkerReplaced",
                format!("deleted {} (rank {rank}) to replace it", p.name_any()),
            )
            .await;
        }
    }
    for &rank in &step.create {
        if let Some(p) = desired.pods.get(rank as usize) {
            let created = apply(pods_api, p).await?;
            event_about(
                ctx,
                md,
                Some(&created),
                false,
                "WorkerCreated",
                format!("created {}", p.name_any()),
            )
            .await;
        }
    }
    let admin_port = md.spec.worker.ports.admin as u16;
    let json = serde_json::to_vec(plan).map_err(|e| Error::Other(e.to_string()))?;
    for &rank in step.push.iter().chain(step.in_flight.iter()) {
        for p in by_rank(rank) {
            let Some(ip) = pod_ip(p) else { continue };
            if step.push.contains(&rank) {
                // Record the target before the PUT so a restarted operator knows a push is on,
                // and when it began, so that a push that never completes expires.
                let patch = serde_json::json!({"metadata": {"annotations": {
                    ANNOTATION_TARGET_PLAN: plan.hash,
                    ANNOTATION_TARGET_SINCE: format!("{:.0}", wall_s()),
                }}});
                pods_api
                    .patch(
                        &p.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
            }
            let push_span = tracing::info_span!(
                "push",
                pod = %p.name_any(),
                rank,
                plan = %plan.short_hash()
            );
            match ctx
                .workers
                .put_plan(&ip, admin_port, token, &json, Duration::from_secs(60))
                .instrument(push_span.clone())
                .await
            {
                Ok(()) => {
                    tracing::info!(parent: &push_span, "plan pushed");
                    if step.push.contains(&rank) {
                        event_about(
                            ctx,
                            md,
                            Some(p),
                            false,
                            "PlanPushed",
                            format!("plan {} pushed to {}", plan.short_hash(), p.name_any()),
                        )
                        .await;
                    }
                }
                Err(e) => {
                    tracing::warn!(parent: &push_span, error = %e, "plan push failed");
                    let refused = matches!(
                        e,
                        HttpError::Status {
                            status: 401 | 403,
                            ..
                        }
                    );
                    let first_refusal =
                        p.annotations().get(ANNOTATION_PUSH_REJECTED) != Some(&plan.hash);
                    if refused && first_refusal {
                        // The worker holds another admin token (the Secret was re-created). It
                        // re-reads its token file, which the kubelet updates within about a
                        // minute; past the refusal grace the rollout replaces it.
                        let patch = serde_json::json!({"metadata": {"annotations": {
                            ANNOTATION_PUSH_REJECTED: plan.hash,
                            ANNOTATION_PUSH_REJECTED_SINCE: format!("{:.0}", wall_s()),
                        }}});
                        pods_api
                            .patch(
                                &p.name_any(),
                                &PatchParams::default(),
                                &Patch::Merge(&patch),
                            )
                            .await?;
                    }
                    event_about(
                        ctx,
                        md,
                        Some(p),
                        true,
                        if refused {
                            "PlanPushRefused"
                        } else {
                            "PlanPushFailed"
                        },
                        format!("{}: {e}", p.name_any()),
                    )
                    .await;
                }
            }
        }
    }
    Ok(())
}

/// Why a reconcile holds the deployment back before applying anything.
struct Held {
    /// The reason of the Degraded and Ready conditions and of the Warning event.
    reason: &'static str,
    message: String,
    /// When to look again (the objects it depends on may not be watched).
    retry: Duration,
}

/// Hold the deployment back: Degraded=True and Ready=False with the reason and message, a
/// Warning event and a status write when that changes the status, nothing applied or rolled.
async fn hold_back(
    ctx: &Context,
    md: &MoEDeployment,
    mds: &Api<MoEDeployment>,
    mut status: MoEDeploymentStatus,
    old_status: &MoEDeploymentStatus,
    now: &Time,
    held: Held,
) -> Result<Action, Error> {
    let gen = md.metadata.generation;
    for kind in ["Degraded", "Ready"] {
        set_condition(
            &mut status.conditions,
            kind,
            kind == "Degraded",
            held.reason,
            &held.message,
            gen,
            now,
        );
    }
    status.observed_generation = gen;
    if &status != old_status {
        event(ctx, md, true, held.reason, held.message).await;
        patch_status(mds, &md.name_any(), &status).await?;
    }
    Ok(Action::requeue(held.retry))
}

async fn patch_status(
    api: &Api<MoEDeployment>,
    name: &str,
    status: &MoEDeploymentStatus,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "apiVersion": "moe.craft.dev/v1alpha1",
        "kind": "MoEDeployment",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_survive_a_json_round_trip() {
        let md: MoEDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "moe.craft.dev/v1alpha1", "kind": "MoEDeployment",
            "metadata": {"name": "t", "namespace": "n", "uid": "u"},
            "spec": {"model": {"layers": 3, "firstMoeLayer": 1, "experts": 8, "topK": 2,
                               "hiddenSize": 64, "expertIntermediateSize": 32,
                               "checkpoint": {"path": "/m"}},
                     "topology": {"nodes": 2, "gpusPerNode": 2},
                     "replication": {"budget": {"replicasPerGpu": 2}},
                     "worker": {"image": "w"}}
        }))
        .unwrap();
        let req = plan_request(&md, Algorithm::Craft).unwrap();
        // Skewed loads like the e2e test's (scraped token deltas); some of them gave plans whose
        // JSON did not parse back to the same hash before serde_json's `float_roundtrip`.
        let zero = initial_plan(&md).unwrap();
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
            let back: ExpertPlan =
                serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
            assert_eq!(back.compute_hash(), p.hash);
        }
        let p = make_plan(
            &req,
            &LoadWindow::new(vec![1, 2], 8, vec![1.0; 16]).unwrap(),
            None,
        )
        .unwrap();
        let back: ExpertPlan = serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(back.compute_hash(), p.hash);
        let pretty: ExpertPlan =
            serde_json::from_str(&serde_json::to_string_pretty(&p).unwrap()).unwrap();
        assert_eq!(pretty.compute_hash(), p.hash);
        let initial = zero;
        assert_eq!(initial.algorithm, Algorithm::Placement);
        assert_eq!(initial.replicas_per_gpu, 0);
    }
}
