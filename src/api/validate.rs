//! Validation of a `MoEDeployment` spec beyond the CRD's schema and CEL rules.
//!
//! The reconciler runs this before building anything; a non-empty result becomes a Degraded
//! condition and a Warning event naming each field, and nothing is rolled out. The cross-field
//! rules CEL already enforces are checked again here, because an object stored before the CRD was
//! updated (or applied with validation off) must not crash the operator or be served half-right.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::moedeployment::{
    EngineSpec, Gang, KeyRef, MetricsSource, MoEDeploymentSpec, ModelDtype, ModelSpec,
    PrometheusSpec, ReplicationPolicy, RolloutStrategy, SeriesLabels, Transport, WorkerDevice,
    BASIC_AUTH_PASSWORD_KEY, BASIC_AUTH_USERNAME_KEY, MAX_NCCL_ENV,
};
use super::pod_policy::{check_pod_policy, is_dns_subdomain, PodPolicy};
use super::pod_shape::check_pod_shape;
use super::units::{parse_duration, parse_quantity};
use crate::plan::craft::CraftOptions;
use crate::plan::limits;
use crate::plan::planner::{Budget, PlanRequest, DEFAULT_AUTO_MIN_GAIN};
use crate::plan::step_cost::{CostModel, StepObjective};
use crate::plan::{Algorithm, Dtype, ModelShape, Topology};

/// One problem in a spec: where, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path under the object, e.g. `spec.replication.budget.memoryPerGpu`.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Environment variables the operator sets on every worker; the spec may not override them.
pub const RESERVED_ENV: &[&str] = &[
    "MOE_NODE_RANK",
    "MOE_NODES",
    "MOE_GPUS_PER_NODE",
    "MOE_PLAN_FILE",
    "MOE_CHECKPOINT_DIR",
    "POD_IP",
    "MOE_ADMIN_TOKEN_FILE",
    "MOE_DEVICE",
    // The worker's first global rank: it conflicts with MOE_NODE_RANK in `moe-worker`'s flags.
    "MOE_RANK",
    "MOE_EP_WORLD_SIZE",
    "MOE_EP_RENDEZVOUS",
    "MOE_EP_LISTEN",
    "MOE_EP_TRANSPORT",
    "MOE_EP_RENDEZVOUS_TIMEOUT_SECONDS",
    // Engine pods (`spec.engine`).
    "MOE_EP_SIZE",
    "MOE_DIST_INIT_ADDR",
    "MOE_LAYOUT_FILE",
    "MOE_REDUNDANT_EXPERTS",
];

/// Engine flags the operator appends from the plan's layout (`spec.engine.args` may not hold them).
pub const ENGINE_LAYOUT_FLAGS: &[&str] = &[
    "--init-expert-location",
    "--ep-num-redundant-experts",
    "--eplb-config",
];

/// GPU resource name the operator requests per worker pod.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Shortest metrics interval: scraping faster than this loads the workers for no planning gain.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Bounds of `dataPlane.rendezvousTimeout`: long enough for every pod to be scheduled and start,
/// short enough that a group that cannot form is restarted within the hour.
pub const MIN_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(3600);

impl ModelSpec {
    /// The planner's view of the model. Fails on negative numbers, which the schema refuses.
    pub fn shape(&self) -> Result<ModelShape, FieldError> {
        fn nonneg<T: TryFrom<i64>>(v: i64, field: &str) -> Result<T, FieldError> {
            T::try_from(v).map_err(|_| FieldError {
                path: format!("spec.model.{field}"),
                message: format!("{v} is out of range: use a positive number"),
            })
        }
        Ok(ModelShape {
            layers: nonneg(self.layers.into(), "layers")?,
            first_moe_layer: nonneg(self.first_moe_layer.into(), "firstMoeLayer")?,
            experts: nonneg(self.experts.into(), "experts")?,
            top_k: nonneg(self.top_k.into(), "topK")?,
            hidden_size: nonneg(self.hidden_size, "hiddenSize")?,
            expert_intermediate_size: nonneg(
                self.expert_intermediate_size,
                "expertIntermediateSize",
            )?,
            dtype: match self.dtype {
                ModelDtype::Bf16 => Dtype::Bf16,
                ModelDtype::Fp8 => Dtype::Fp8,
            },
        })
    }
}

/// A spec that passed [`validate`], with every value the operator acts on resolved once: durations
/// as [`Duration`], counts and ports unsigned, the model shape, topology and budget in the
/// planner's types. Build and the reconcile pipeline take this, never the raw numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    pub shape: ModelShape,
    /// Worker pods, one per node.
    pub nodes: u32,
    pub gpus_per_node: u32,
    pub topology: Topology,
    pub policy: ReplicationPolicy,
    pub budget: Budget,
    pub min_improvement: f64,
    pub cooldown: Duration,
    /// How often load is read.
    pub interval: Duration,
    /// Metrics intervals the load window holds (at least 1).
    pub window_batches: usize,
    pub load_source: LoadSource,
    pub strategy: RolloutStrategy,
    /// At least 1, at most `nodes`: workers of one group.
    pub max_unavailable: u32,
    /// `spec.replicas`: EP groups.
    pub replicas: u32,
    /// Groups that may be out of service at once during a rollout.
    pub max_unavailable_groups: u32,
    /// Extra groups a Recreate of groups may start first.
    pub max_surge: u32,
    pub ports: Ports,
    pub data_plane: DataPlane,
    /// `spec.scheduling`, its default resolved.
    pub gang: GangSpec,
    /// `spec.engine`: the pods run this engine instead of `moe-worker` (and `strategy` is
    /// Recreate, the engines having no in-place plan update).
    pub engine: Option<ValidEngine>,
    /// `replication.stepTime`: CRAFT plans for step time, and re-plans are judged by the
    /// fraction of predicted step time they save.
    pub step_time: Option<StepObjective>,
}

/// `spec.engine`, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidEngine {
    pub kind: crate::plan::engines::Engine,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub port: u16,
    pub health_path: String,
    pub dist_init_port: u16,
}

/// Gang scheduling, resolved (`spec.scheduling`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GangSpec {
    pub gang: Gang,
    /// Set exactly when `gang` is Kueue.
    pub queue_name: Option<String>,
    /// Within [`MIN_GANG_TIMEOUT`]..=[`MAX_GANG_TIMEOUT`].
    pub timeout: Duration,
}

/// Bounds and default of `scheduling.timeout`.
pub const MIN_GANG_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_GANG_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_GANG_TIMEOUT: Duration = Duration::from_secs(300);

/// `spec.scheduling`, resolved when valid: the gang's default follows the data plane (a group
/// gets the guard), Kueue needs a queue, the timeout is a bounded duration.
fn check_scheduling(spec: &MoEDeploymentSpec, errs: &mut Errors) -> Option<GangSpec> {
    let s = &spec.scheduling;
    let gang = s
        .gang
        .unwrap_or(if spec.data_plane.transport == Transport::None {
            Gang::None
        } else {
            Gang::Guard
        });
    let mut ok = true;
    let timeout = match &s.timeout {
        None => DEFAULT_GANG_TIMEOUT,
        Some(t) => match parse_duration(t) {
            Ok(d) if (MIN_GANG_TIMEOUT..=MAX_GANG_TIMEOUT).contains(&d) => d,
            Ok(_) => {
                ok = false;
                errs.push(
                    "spec.scheduling.timeout",
                    format!("{t} is outside 10s..1h: the group waits this long to be scheduled whole, so use e.g. 5m"),
                );
                DEFAULT_GANG_TIMEOUT
            }
            Err(e) => {
                ok = false;
                errs.push("spec.scheduling.timeout", format!("{t:?}: {e}"));
                DEFAULT_GANG_TIMEOUT
            }
        },
    };
    match (gang, &s.queue_name) {
        (Gang::Kueue, None) => {
            ok = false;
            errs.push(
                "spec.scheduling.queueName",
                "required when scheduling.gang is Kueue: name the LocalQueue of the namespace"
                    .into(),
            );
        }
        (g, Some(_)) if g != Gang::Kueue => {
            ok = false;
            errs.push(
                "spec.scheduling.queueName",
                format!("set, but scheduling.gang is {g:?} so it would be ignored: set gang: Kueue or remove it"),
            );
        }
        _ => {}
    }
    ok.then(|| GangSpec {
        gang,
        queue_name: s.queue_name.clone().filter(|_| gang == Gang::Kueue),
        timeout,
    })
}

/// The expert-parallel data plane, resolved (`spec.dataPlane`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataPlane {
    pub transport: Transport,
    /// The ranks' mesh port (rank 0's rendezvous listener too); differs from the other ports.
    pub port: u16,
    /// Within [`MIN_RENDEZVOUS_TIMEOUT`]..=[`MAX_RENDEZVOUS_TIMEOUT`].
    pub rendezvous_timeout: Duration,
    /// Names match `^NCCL_[A-Z0-9_]+$`.
    pub nccl_env: BTreeMap<String, String>,
    /// The `/dev/shm` size limit as written (a valid quantity), and in bytes.
    pub shm_size: String,
    pub shm_bytes: u64,
    pub ipc_lock: bool,
}

/// Where the operator reads load.
// One per validated spec, never in a collection: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadSource {
    /// Every worker's `/metrics`.
    Workers,
    /// One PromQL query per interval, with the credentials and CA the spec names (read from the
    /// deployment's namespace when querying).
    Prometheus {
        url: String,
        query: String,
        auth: Option<AuthRef>,
        ca: Option<CaRef>,
        /// How the series name layer and expert (`metrics.prometheus.seriesLabels`).
        series: SeriesLabels,
    },
}

/// `spec.metrics.prometheus.auth`: which Secret holds the credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthRef {
    /// `Authorization: Bearer`, the token in key `key` of Secret `secret`.
    Bearer { secret: String, key: String },
    /// Basic auth, the `username` and `password` keys of Secret `secret`.
    Basic { secret: String },
}

impl AuthRef {
    /// The spec field that names it, for messages.
    pub fn field(&self) -> &'static str {
        match self {
            AuthRef::Bearer { .. } => "spec.metrics.prometheus.auth.bearerTokenSecret",
            AuthRef::Basic { .. } => "spec.metrics.prometheus.auth.basicAuthSecret",
        }
    }

    pub fn secret(&self) -> &str {
        match self {
            AuthRef::Bearer { secret, .. } | AuthRef::Basic { secret } => secret,
        }
    }

    /// The Secret's keys it reads.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            AuthRef::Bearer { key, .. } => vec![key.as_str()],
            AuthRef::Basic { .. } => vec![BASIC_AUTH_USERNAME_KEY, BASIC_AUTH_PASSWORD_KEY],
        }
    }
}

/// `spec.metrics.prometheus.ca`: which Secret or ConfigMap key holds the PEM CA bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaRef {
    Secret { name: String, key: String },
    ConfigMap { name: String, key: String },
}

impl CaRef {
    /// The spec field that names it, for messages.
    pub fn field(&self) -> &'static str {
        match self {
            CaRef::Secret { .. } => "spec.metrics.prometheus.ca.secret",
            CaRef::ConfigMap { .. } => "spec.metrics.prometheus.ca.configMap",
        }
    }

    /// `Secret ns/name key k` or `ConfigMap ns/name key k`, for messages.
    pub fn describe(&self, ns: &str) -> String {
        match self {
            CaRef::Secret { name, key } => format!("Secret {ns}/{name} key {key:?}"),
            CaRef::ConfigMap { name, key } => format!("ConfigMap {ns}/{name} key {key:?}"),
        }
    }
}

/// The worker's ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub dispatch: u16,
    pub metrics: u16,
    pub admin: u16,
}

impl ValidSpec {
    /// The planner's request for `algorithm` on this spec.
    pub fn plan_request(&self, algorithm: Algorithm) -> PlanRequest {
        PlanRequest {
            algorithm,
            model: self.shape.clone(),
            topology: self.topology,
            budget: self.budget,
            eplb_groups: None,
            craft: CraftOptions {
                step: self.step_time.clone(),
                ..CraftOptions::default()
            },
        }
    }

    /// The algorithm the policy plans with once load is known.
    pub fn algorithm(&self) -> Algorithm {
        match self.policy {
            ReplicationPolicy::Craft => Algorithm::Craft,
            ReplicationPolicy::Eplb => Algorithm::Eplb,
            ReplicationPolicy::PlacementOnly => Algorithm::Placement,
            ReplicationPolicy::None => Algorithm::None,
        }
    }
}

/// Collects the problems of one spec.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: &str, message: String) {
        self.0.push(FieldError {
            path: path.to_string(),
            message,
        });
    }
}

/// Check a spec against the product's rules and the cluster's [`PodPolicy`], and resolve what the
/// operator acts on. The errors name every field at fault; there is no check without the policy,
/// so nothing bypasses it.
pub fn validate(
    spec: &MoEDeploymentSpec,
    pod_policy: &PodPolicy,
) -> Result<ValidSpec, Vec<FieldError>> {
    let mut errs = Errors::default();
    check_model(spec, &mut errs);
    check_checkpoint(spec, &mut errs);
    let replication = check_replication(spec, &mut errs);
    let interval = check_metrics(spec, &mut errs);
    let window_batches = check_window(spec, interval, &mut errs);
    check_rollout(spec, &mut errs);
    check_worker(spec, &mut errs);
    let data_plane = check_data_plane(spec, &mut errs);
    let gang = check_scheduling(spec, &mut errs);
    check_engine(spec, &mut errs);
    if let Some(sel) = &spec.initial_load {
        if sel.name.trim().is_empty() || sel.key.trim().is_empty() {
            errs.push(
                "spec.initialLoad",
                "needs both name (the ConfigMap) and key (the trace in it)".into(),
            );
        }
    }
    errs.0.extend(check_pod_shape(spec));
    errs.0.extend(check_pod_policy(spec, pod_policy));
    match (interval, window_batches, replication, data_plane, gang) {
        (
            Some(interval),
            Some(window_batches),
            Some((budget, cooldown)),
            Some(data_plane),
            Some(gang),
        ) if errs.0.is_empty() => {
            let times = Times {
                interval,
                window_batches,
                cooldown,
            };
            resolve(spec, times, budget, data_plane, gang).map_err(|e| vec![e])
        }
        _ => Err(errs.0),
    }
}

/// The durations the checks parsed.
struct Times {
    interval: Duration,
    window_batches: usize,
    cooldown: Duration,
}

/// The resolved values of a spec whose checks passed (the conversions cannot fail then; they
/// still report a field rather than panic).
fn resolve(
    spec: &MoEDeploymentSpec,
    times: Times,
    budget: Budget,
    data_plane: DataPlane,
    gang: GangSpec,
) -> Result<ValidSpec, FieldError> {
    let Times {
        interval,
        window_batches,
        cooldown,
    } = times;
    let t = &spec.topology;
    let unsigned = |path: &str, v: i64| {
        u32::try_from(v).map_err(|_| FieldError {
            path: path.into(),
            message: format!("{v} is out of range"),
        })
    };
    let port = |path: &str, v: i32| {
        u16::try_from(v).map_err(|_| FieldError {
            path: path.into(),
            message: format!("{v} is not a port number (1..65535)"),
        })
    };
    let nodes = unsigned("spec.topology.nodes", t.nodes.into())?;
    let gpus_per_node = unsigned("spec.topology.gpusPerNode", t.gpus_per_node.into())?;
    let topology =
        Topology::new((nodes * gpus_per_node) as usize, nodes as usize).map_err(|e| {
            FieldError {
                path: "spec.topology".into(),
                message: e.to_string(),
            }
        })?;
    let load_source = match (spec.metrics.source, &spec.metrics.prometheus) {
        (MetricsSource::Prometheus, Some(p)) => {
            let auth = p.auth.as_ref().and_then(|a| {
                match (&a.bearer_token_secret, &a.basic_auth_secret) {
                    (Some(b), None) => Some(AuthRef::Bearer {
                        secret: b.name.clone(),
                        key: b.key.clone(),
                    }),
                    (None, Some(b)) => Some(AuthRef::Basic {
                        secret: b.name.clone(),
                    }),
                    _ => None,
                }
            });
            let ca =
                p.ca.as_ref()
                    .and_then(|c| match (&c.secret, &c.config_map) {
                        (Some(r), None) => Some(CaRef::Secret {
                            name: r.name.clone(),
                            key: r.key.clone(),
                        }),
                        (None, Some(r)) => Some(CaRef::ConfigMap {
                            name: r.name.clone(),
                            key: r.key.clone(),
                        }),
                        _ => None,
                    });
            LoadSource::Prometheus {
                url: p.url.clone(),
                query: p.query.clone(),
                auth,
                ca,
                series: p.series_labels.clone().unwrap_or_default(),
            }
        }
        _ => LoadSource::Workers,
    };
    let p = &spec.worker.ports;
    let shape = spec.model.shape()?;
    Ok(ValidSpec {
        shape: shape.clone(),
        nodes,
        gpus_per_node,
        topology,
        policy: spec.replication.policy,
        budget,
        min_improvement: spec.replication.min_improvement,
        cooldown,
        interval,
        window_batches,
        load_source,
        strategy: match &spec.engine {
            Some(_) => RolloutStrategy::Recreate,
            None => spec.rollout.strategy,
        },
        max_unavailable: unsigned(
            "spec.rollout.maxUnavailable",
            spec.rollout.max_unavailable.into(),
        )?,
        replicas: unsigned("spec.replicas", spec.replicas.into())?,
        max_unavailable_groups: unsigned(
            "spec.rollout.maxUnavailableGroups",
            spec.rollout.max_unavailable_groups.into(),
        )?,
        max_surge: unsigned("spec.rollout.maxSurge", spec.rollout.max_surge.into())?,
        ports: Ports {
            dispatch: port("spec.worker.ports.dispatch", p.dispatch)?,
            metrics: port("spec.worker.ports.metrics", p.metrics)?,
            admin: port("spec.worker.ports.admin", p.admin)?,
        },
        data_plane,
        gang,
        engine: spec
            .engine
            .as_ref()
            .map(|e| resolve_engine(e, &port))
            .transpose()?,
        step_time: spec.replication.step_time.as_ref().map(|st| StepObjective {
            cost: st
                .cost_model
                .as_ref()
                .map_or(CostModel::H200_BF16, |c| CostModel {
                    launch_s: c.launch_seconds,
                    bytes_per_s: c.bytes_per_second,
                    flops_per_s: c.flops_per_second,
                }),
            tokens_per_step: st.tokens_per_step as f64,
            model: shape.clone(),
        }),
    })
}

fn resolve_engine(
    e: &EngineSpec,
    port: &dyn Fn(&str, i32) -> Result<u16, FieldError>,
) -> Result<ValidEngine, FieldError> {
    Ok(ValidEngine {
        kind: e.kind.engine(),
        command: e.command.clone(),
        args: e.args.clone(),
        port: port("spec.engine.port", e.http_port())?,
        health_path: e.health_path.clone(),
        dist_init_port: port("spec.engine.distInitPort", e.dist_init_port)?,
    })
}

/// `spec.engine`: the layout flags are the operator's, the engine's load comes from Prometheus,
/// and the engine runs its own expert parallelism (no `moe-worker` data plane).
fn check_engine(spec: &MoEDeploymentSpec, errs: &mut Errors) {
    let Some(e) = &spec.engine else { return };
    if spec.metrics.source != MetricsSource::Prometheus {
        errs.push(
            "spec.metrics.source",
            "engine pods serve the engine's metrics, not moe-worker's: set source: Prometheus with a query over the engine's per-expert metric (docs/engines.md)".into(),
        );
    }
    if spec.data_plane.transport != Transport::None {
        errs.push(
            "spec.dataPlane.transport",
            format!(
                "{}: the engine runs its own expert parallelism, moe-worker's data plane is not started in engine pods: remove dataPlane.transport",
                spec.data_plane.transport.as_str()
            ),
        );
    }
    for (i, a) in e.args.iter().enumerate() {
        let flag = a.split('=').next().unwrap_or(a);
        if ENGINE_LAYOUT_FLAGS.contains(&flag) {
            errs.push(
                &format!("spec.engine.args[{i}]"),
                format!(
                    "{flag} is set by the operator from the plan's layout (the file it mounts): remove it"
                ),
            );
        }
    }
    for (i, c) in e.command.iter().enumerate() {
        if c.is_empty() {
            errs.push(&format!("spec.engine.command[{i}]"), "empty".into());
        }
    }
    let port = e.http_port();
    for (path, v) in [
        ("spec.engine.port", port),
        ("spec.engine.distInitPort", e.dist_init_port),
    ] {
        if !(1..=65535).contains(&v) {
            errs.push(path, format!("{v} is not a port number (1..65535)"));
        }
    }
    if port == e.dist_init_port {
        errs.push(
            "spec.engine.distInitPort",
            format!("{port} is also engine.port: choose another port for the distributed init"),
        );
    }
    if !e.health_path.starts_with('/') || e.health_path.chars().any(|c| !c.is_ascii_graphic()) {
        errs.push(
            "spec.engine.healthPath",
            format!("{:?}: give an absolute path such as /health", e.health_path),
        );
    }
}

/// Model and topology (also CEL / schema; see the module comment). The maxima are
/// `plan::limits`, which the CRD's schema also carries: an object stored before the CRD had them
/// must not reach the planner or an allocation sized by it.
fn check_model(spec: &MoEDeploymentSpec, errs: &mut Errors) {
    let mut err = |path: &str, message: String| errs.push(path, message);
    let m = &spec.model;
    let t = &spec.topology;

    for (path, v, max) in [
        (
            "spec.model.layers",
            i64::from(m.layers),
            u64::from(limits::MAX_LAYERS),
        ),
        (
            "spec.model.experts",
            m.experts.into(),
            limits::MAX_EXPERTS.into(),
        ),
        ("spec.model.topK", m.top_k.into(), limits::MAX_TOP_K.into()),
        (
            "spec.model.hiddenSize",
            m.hidden_size,
            limits::MAX_HIDDEN_SIZE,
        ),
        (
            "spec.model.expertIntermediateSize",
            m.expert_intermediate_size,
            limits::MAX_EXPERT_INTERMEDIATE_SIZE,
        ),
        (
            "spec.topology.nodes",
            t.nodes.into(),
            limits::MAX_NODES.into(),
        ),
        (
            "spec.topology.gpusPerNode",
            t.gpus_per_node.into(),
            limits::MAX_GPUS_PER_NODE.into(),
        ),
    ] {
        if v < 1 {
            err(path, format!("{v} must be at least 1"));
        } else if v as u64 > max {
            err(
                path,
                format!("{v} exceeds {max}, the largest the operator supports: use at most {max}"),
            );
        }
    }
    if m.first_moe_layer < 0 || m.first_moe_layer >= m.layers {
        err(
            "spec.model.firstMoeLayer",
            format!(
                "{} must be in 0..{} (less than model.layers)",
                m.first_moe_layer, m.layers
            ),
        );
    }
    if m.top_k > m.experts {
        err(
            "spec.model.topK",
            format!("{} exceeds model.experts ({})", m.top_k, m.experts),
        );
    }
    let ranks = i64::from(t.nodes.max(0)) * i64::from(t.gpus_per_node.max(0));
    if ranks > i64::from(limits::MAX_GPUS) {
        err(
            "spec.topology",
            format!(
                "{} nodes x {} gpusPerNode = {ranks} GPUs exceeds {}, the most one deployment supports: use fewer nodes",
                t.nodes,
                t.gpus_per_node,
                limits::MAX_GPUS
            ),
        );
    }
    let policy = spec.replication.policy;
    if ranks > 0 && policy != super::ReplicationPolicy::Craft && i64::from(m.experts) % ranks != 0 {
        err(
            "spec.model.experts",
            format!(
                "{} experts do not spread evenly over {ranks} GPUs, which replication.policy {policy:?} needs: use policy Craft or a topology whose GPU count divides the experts",
                m.experts
            ),
        );
    }
    if ranks > 0 && i64::from(m.experts) < ranks && policy != super::ReplicationPolicy::Craft {
        err(
            "spec.topology",
            format!(
                "{ranks} GPUs for {} experts leaves GPUs without an expert: use fewer GPUs",
                m.experts
            ),
        );
    }
}

fn check_checkpoint(spec: &MoEDeploymentSpec, errs: &mut Errors) {
    let mut err = |path: &str, message: String| errs.push(path, message);
    let m = &spec.model;
    let ck = &m.checkpoint;
    if !ck.path.starts_with('/') {
        err(
            "spec.model.checkpoint.path",
            format!("{:?} is not absolute: give the directory as the worker container sees it, e.g. /models/deepseek-v3", ck.path),
        );
    } else if ck.path.split('/').any(|c| c == "..") {
        err(
            "spec.model.checkpoint.path",
            format!("{:?} contains '..': give the path without it", ck.path),
        );
    } else if ck.path.trim_end_matches('/').is_empty() {
        err(
            "spec.model.checkpoint.path",
            "\"/\" is not a checkpoint directory: name the directory holding the shards".into(),
        );
    }
    if let Some(s3) = &ck.s3 {
        check_s3(spec, s3, &mut err);
    }
    if let Some(v) = &ck.volume {
        let forms =
            usize::from(v.persistent_volume_claim.is_some()) + usize::from(v.host_path.is_some());
        if forms != 1 {
            err(
                "spec.model.checkpoint.volume",
                format!("{forms} volume sources given: set exactly one of persistentVolumeClaim or hostPath"),
            );
        }
        if let Some(pvc) = &v.persistent_volume_claim {
            if pvc.claim_name.trim().is_empty() {
                err(
                    "spec.model.checkpoint.volume.persistentVolumeClaim.claimName",
                    "empty: name the PersistentVolumeClaim holding the checkpoint".into(),
                );
            }
        }
        if let Some(hp) = &v.host_path {
            if !hp.path.starts_with('/') {
                err(
                    "spec.model.checkpoint.volume.hostPath.path",
                    format!("{:?} is not an absolute host path", hp.path),
                );
            }
        }
    }
}

/// `model.checkpoint.s3` (the schema's patterns too, re-checked for objects stored without
/// them): a bucket name S3 accepts, an endpoint that is only a scheme and an authority, a cache
/// the init container can write, and moe-worker pods (an engine image has no fetcher).
fn check_s3(
    spec: &MoEDeploymentSpec,
    s3: &super::S3Checkpoint,
    err: &mut impl FnMut(&str, String),
) {
    let b = &s3.bucket;
    let bucket_ok = (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && !b.starts_with(['.', '-'])
        && !b.ends_with(['.', '-']);
    if !bucket_ok {
        err(
            "spec.model.checkpoint.s3.bucket",
            format!("{b:?} is not a bucket name: 3-63 lower-case letters, digits, dots and hyphens, starting and ending with a letter or digit"),
        );
    }
    if let Some(e) = &s3.endpoint {
        let rest = e
            .strip_prefix("https://")
            .or_else(|| e.strip_prefix("http://"));
        let ok = rest.is_some_and(|r| {
            let host = r.strip_suffix('/').unwrap_or(r);
            !host.is_empty()
                && !host.contains(['/', '?', '#', '@'])
                && !host.chars().any(char::is_whitespace)
        });
        if !ok {
            err(
                "spec.model.checkpoint.s3.endpoint",
                format!("{e:?} is not http(s)://host[:port]: give the store's URL without a path, query or credentials (those go in credentialsSecret)"),
            );
        }
    }
    if s3.prefix.starts_with('/') {
        err(
            "spec.model.checkpoint.s3.prefix",
            format!(
                "{:?} starts with '/': S3 keys have no leading slash; drop it",
                s3.prefix
            ),
        );
    }
    if ck_host_path(spec) {
        err(
            "spec.model.checkpoint.volume.hostPath",
            "a hostPath is never writable by the operator's pods, so it cannot be the cache model.checkpoint.s3 fetches into: use a persistentVolumeClaim, or no volume (an emptyDir per pod)".into(),
        );
    }
    if spec.engine.is_some() {
        err(
            "spec.model.checkpoint.s3",
            "not available with spec.engine (the engine image has no fetcher): fetch the checkpoint into a PersistentVolumeClaim and use model.checkpoint.volume".into(),
        );
    }
}

fn ck_host_path(spec: &MoEDeploymentSpec) -> bool {
    spec.model
        .checkpoint
        .volume
        .as_ref()
        .is_some_and(|v| v.host_path.is_some())
}

/// The budget and the cooldown, when they are valid.
/// `replication.stepTime` (also CEL and schema ranges, re-checked for objects stored without
/// them): CRAFT only, a sane token count, a cost model of positive finite constants.
fn check_step_time(spec: &MoEDeploymentSpec, errs: &mut Errors) {
    let Some(st) = &spec.replication.step_time else {
        return;
    };
    let path = "spec.replication.stepTime";
    if spec.replication.policy != ReplicationPolicy::Craft {
        errs.push(
            path,
            format!(
                "chooses CRAFT's per-layer replica counts, but policy is {:?}: set policy: Craft or remove stepTime",
                spec.replication.policy
            ),
        );
    }
    if !(1..=1 << 24).contains(&st.tokens_per_step) {
        errs.push(
            &format!("{path}.tokensPerStep"),
            format!(
                "{} is out of range: give 1 to 16777216 tokens per step",
                st.tokens_per_step
            ),
        );
    }
    if let Some(c) = &st.cost_model {
        for (field, v, min) in [
            ("launchSeconds", c.launch_seconds, 0.0),
            ("bytesPerSecond", c.bytes_per_second, 1e6),
            ("flopsPerSecond", c.flops_per_second, 1e6),
        ] {
            if !(v.is_finite() && v >= min) {
                errs.push(
                    &format!("{path}.costModel.{field}"),
                    format!("{v} is not a usable rate: give a finite number of at least {min} (moectl calibrate prints them)"),
                );
            }
        }
    }
}

fn check_replication(spec: &MoEDeploymentSpec, errs: &mut Errors) -> Option<(Budget, Duration)> {
    check_step_time(spec, errs);
    let mut err = |path: &str, message: String| errs.push(path, message);
    let m = &spec.model;
    let policy = spec.replication.policy;
    let b = &spec.replication.budget;
    let forms = usize::from(b.replicas_per_gpu.is_some())
        + usize::from(b.memory_per_gpu.is_some())
        + usize::from(b.auto == Some(true));
    if forms != 1 {
        err(
            "spec.replication.budget",
            format!("{forms} budget forms given: set exactly one of replicasPerGpu, memoryPerGpu or auto: true"),
        );
    }
    let mut budget = (b.auto == Some(true)).then_some(Budget::Auto {
        min_gain_per_replica: DEFAULT_AUTO_MIN_GAIN,
    });
    let moe_layers = i64::from(m.layers - m.first_moe_layer.max(0)).max(0);
    if let Some(r) = b.replicas_per_gpu {
        if r < 0 {
            err(
                "spec.replication.budget.replicasPerGpu",
                format!("{r} is negative: use 0 or more"),
            );
        } else if r as u32 > limits::MAX_REPLICAS_PER_GPU {
            err(
                "spec.replication.budget.replicasPerGpu",
                format!(
                    "{r} exceeds {}, the largest the operator supports: use a smaller number",
                    limits::MAX_REPLICAS_PER_GPU
                ),
            );
        } else if policy.replicates() && i64::from(r) > moe_layers * i64::from(m.experts) {
            err(
                "spec.replication.budget.replicasPerGpu",
                format!(
                    "{r} exceeds {moe_layers} MoE layers x {} experts, more replicas than a GPU can hold distinct experts for: use a smaller number",
                    m.experts
                ),
            );
        } else {
            budget = Some(Budget::ReplicasPerGpu(r.unsigned_abs()));
        }
    }
    if let Some(q) = &b.memory_per_gpu {
        match parse_quantity(q) {
            Err(e) => err(
                "spec.replication.budget.memoryPerGpu",
                format!("{e}: write a quantity such as 2Gi or 512Mi"),
            ),
            Ok(bytes) => {
                budget = Some(Budget::MemoryPerGpu(
                    u64::try_from(bytes).unwrap_or(u64::MAX),
                ));
                if let (true, Ok(shape)) = (policy.replicates(), m.shape()) {
                    let per_expert = u128::from(shape.bytes_per_expert());
                    if bytes < per_expert {
                        err(
                            "spec.replication.budget.memoryPerGpu",
                            format!(
                                "{q} ({bytes} bytes) holds no expert replica: one {:?} expert of this model takes {per_expert} bytes ({:.1} MiB); raise it or use replicasPerGpu",
                                m.dtype,
                                per_expert as f64 / (1u64 << 20) as f64
                            ),
                        );
                    }
                }
            }
        }
    }
    if !(0.0..=1.0).contains(&spec.replication.min_improvement) {
        err(
            "spec.replication.minImprovement",
            format!(
                "{} is outside 0..1: it is a balancedness difference, e.g. 0.02",
                spec.replication.min_improvement
            ),
        );
    }
    let cooldown = match parse_duration(&spec.replication.cooldown) {
        Ok(d) => Some(d),
        Err(e) => {
            err(
                "spec.replication.cooldown",
                format!("{e}: write a duration such as 5m"),
            );
            None
        }
    };
    budget.filter(|_| forms == 1).zip(cooldown)
}

/// The metrics interval, when it is valid.
fn check_metrics(spec: &MoEDeploymentSpec, errs: &mut Errors) -> Option<Duration> {
    let mut err = |path: &str, message: String| errs.push(path, message);
    let interval = match parse_duration(&spec.metrics.interval) {
        Err(e) => {
            err(
                "spec.metrics.interval",
                format!("{e}: write a duration such as 30s"),
            );
            None
        }
        Ok(d) if d < MIN_INTERVAL => {
            err(
                "spec.metrics.interval",
                format!(
                    "{} is shorter than {}s: use 1s or more",
                    spec.metrics.interval,
                    MIN_INTERVAL.as_secs()
                ),
            );
            None
        }
        Ok(d) => Some(d),
    };
    match (spec.metrics.source, &spec.metrics.prometheus) {
        (MetricsSource::Prometheus, None) => {
            err("spec.metrics.prometheus", "required when metrics.source is Prometheus: give url and query".into())
        }
        (MetricsSource::Prometheus, Some(p)) => {
            // The URL's form and whether this cluster allows it: check_pod_policy, below.
            if p.query.trim().is_empty() {
                err(
                    "spec.metrics.prometheus.query",
                    "empty: give a PromQL query with layer and expert labels, e.g. sum by (layer, expert) (increase(moe_expert_tokens_total[1m]))".into(),
                );
            }
            check_prometheus_access(p, errs);
            if let Some(l) = &p.series_labels {
                for (field, v) in [("layer", &l.layer), ("expert", &l.expert)] {
                    let ok = v.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !ok {
                        errs.push(
                            &format!("spec.metrics.prometheus.seriesLabels.{field}"),
                            format!("{v:?} is not a Prometheus label name"),
                        );
                    }
                }
                if l.layer == l.expert {
                    errs.push(
                        "spec.metrics.prometheus.seriesLabels",
                        format!("layer and expert are both {:?}: name two different labels", l.layer),
                    );
                }
            }
        }
        (MetricsSource::Workers, Some(_)) => err(
            "spec.metrics.prometheus",
            "set, but metrics.source is Workers so it would be ignored: set source: Prometheus or remove it".into(),
        ),
        (MetricsSource::Workers, None) => {}
    }

    interval
}

/// `metrics.prometheus.auth` and `.ca`: one reference each, to well-formed names, and only with
/// an https URL (the CRD's CEL says the same; this catches objects stored without it).
fn check_prometheus_access(p: &PrometheusSpec, errs: &mut Errors) {
    let https = p.url.starts_with("https://");
    let mut refs: Vec<(String, &KeyRef)> = Vec::new();
    if let Some(a) = &p.auth {
        let path = "spec.metrics.prometheus.auth";
        if !https {
            errs.push(
                path,
                "needs an https:// url: credentials are never sent over plain http; use the https URL of Prometheus, or remove auth".into(),
            );
        }
        match (&a.bearer_token_secret, &a.basic_auth_secret) {
            (Some(b), None) => refs.push((format!("{path}.bearerTokenSecret"), b)),
            (None, Some(b)) => {
                if !is_dns_subdomain(&b.name) {
                    errs.push(
                        &format!("{path}.basicAuthSecret.name"),
                        format!(
                            "{:?} is not a Secret name (a DNS subdomain such as prometheus-auth)",
                            b.name
                        ),
                    );
                }
            }
            _ => errs.push(
                path,
                "give exactly one of bearerTokenSecret (name, key) and basicAuthSecret (name)"
                    .into(),
            ),
        }
    }
    if let Some(c) = &p.ca {
        let path = "spec.metrics.prometheus.ca";
        if !https {
            errs.push(
                path,
                "needs an https:// url: a CA means nothing over plain http; use the https URL of Prometheus, or remove ca".into(),
            );
        }
        match (&c.secret, &c.config_map) {
            (Some(r), None) => refs.push((format!("{path}.secret"), r)),
            (None, Some(r)) => refs.push((format!("{path}.configMap"), r)),
            _ => errs.push(
                path,
                "give exactly one of secret (name, key) and configMap (name, key)".into(),
            ),
        }
    }
    for (path, r) in refs {
        if !is_dns_subdomain(&r.name) {
            errs.push(
                &format!("{path}.name"),
                format!(
                    "{:?} is not an object name (a DNS subdomain such as prometheus-auth)",
                    r.name
                ),
            );
        }
        let key_ok = !r.key.is_empty()
            && r.key.len() <= 253
            && r.key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !key_ok {
            errs.push(
                &format!("{path}.key"),
                format!(
                    "{:?} is not a data key (letters, digits, '-', '_', '.')",
                    r.key
                ),
            );
        }
    }
}

/// The load window in metrics intervals, when it and the interval are valid.
fn check_window(
    spec: &MoEDeploymentSpec,
    interval: Option<Duration>,
    errs: &mut Errors,
) -> Option<usize> {
    let mut err = |path: &str, message: String| errs.push(path, message);
    match &spec.replication.window {
        IntOrString::Int(n) if *n < 1 => {
            err(
                "spec.replication.window",
                format!("{n} intervals: use 1 or more"),
            );
        }
        IntOrString::Int(_) => {}
        IntOrString::String(s) => match parse_duration(s) {
            Err(e) => err(
                "spec.replication.window",
                format!("{e}: write a number of metrics intervals (10) or a duration (5m)"),
            ),
            Ok(w) => {
                if let Some(i) = interval {
                    if w < i {
                        err(
                            "spec.replication.window",
                            format!("{s} is shorter than one metrics.interval ({}): the window would hold no sample", spec.metrics.interval),
                        );
                    }
                }
            }
        },
    }
    // The operator holds the window in memory: batches x MoE layers x experts counts, bounded so
    // that one deployment cannot take the operator's memory for the whole cluster.
    let batches: Option<u64> = match (&spec.replication.window, interval) {
        (IntOrString::Int(n), _) => u64::try_from(*n).ok(),
        (IntOrString::String(s), Some(i)) => parse_duration(s)
            .ok()
            .map(|w| (w.as_secs_f64() / i.as_secs_f64()).ceil() as u64),
        (IntOrString::String(_), None) => None,
    };
    let moe_layers =
        u64::try_from(i64::from(spec.model.layers) - i64::from(spec.model.first_moe_layer))
            .unwrap_or(0);
    let experts = u64::try_from(spec.model.experts).unwrap_or(0);
    if let Some(b) = batches {
        let cells = b.saturating_mul(moe_layers).saturating_mul(experts);
        if cells > limits::MAX_LOAD_CELLS_OPERATOR as u64 {
            err(
                "spec.replication.window",
                format!(
                    "{b} intervals x {moe_layers} MoE layers x {experts} experts is {cells} token \
                     counts, more than the {} the operator keeps per deployment \
                     (plan::limits::MAX_LOAD_CELLS_OPERATOR): use a window of at most {} intervals",
                    limits::MAX_LOAD_CELLS_OPERATOR,
                    limits::MAX_LOAD_CELLS_OPERATOR as u64 / (moe_layers * experts).max(1)
                ),
            );
        }
    }
    batches
        .filter(|b| *b >= 1)
        .and_then(|b| usize::try_from(b).ok())
}

fn check_rollout(spec: &MoEDeploymentSpec, errs: &mut Errors) {
    let mut err = |path: &str, message: String| errs.push(path, message);
    let t = &spec.topology;
    let mu = spec.rollout.max_unavailable;
    if mu < 1 || mu > t.nodes.max(1) {
        err(
            "spec.rollout.maxUnavailable",
            format!("{mu} must be between 1 and topology.nodes ({})", t.nodes),
        );
    }
    let r = &spec.rollout;
    if spec.replicas < 0 || spec.replicas > crate::api::moedeployment::MAX_REPLICAS {
        err(
            "spec.replicas",
            format!(
                "{} must be between 0 and {} (EP groups)",
                spec.replicas,
                crate::api::moedeployment::MAX_REPLICAS
            ),
        );
    }
    if r.max_surge < 0 || r.max_surge > crate::api::moedeployment::MAX_SURGE {
        err(
            "spec.rollout.maxSurge",
            format!(
                "{} must be between 0 and {} (extra EP groups)",
                r.max_surge,
                crate::api::moedeployment::MAX_SURGE
            ),
        );
    }
    if r.max_unavailable_groups < 0 {
        err(
            "spec.rollout.maxUnavailableGroups",
            format!("{} must be at least 0", r.max_unavailable_groups),
        );
    } else if r.max_unavailable_groups == 0 && r.max_surge <= 0 {
        err(
            "spec.rollout.maxUnavailableGroups",
            "0 with rollout.maxSurge 0: a rollout could never take a group out of service nor add one first; set maxUnavailableGroups to 1 or maxSurge to 1".into(),
        );
    }
}

fn check_worker(spec: &MoEDeploymentSpec, errs: &mut Errors) {
    let mut err = |path: &str, message: String| errs.push(path, message);
    let t = &spec.topology;
    let w = &spec.worker;
    if w.image.trim().is_empty() {
        err(
            "spec.worker.image",
            "empty: name the moe-worker image, e.g. ghcr.io/moe-operator/moe-worker:0.1.0".into(),
        );
    } else if w.image.contains(char::is_whitespace) {
        err(
            "spec.worker.image",
            format!("{:?} contains whitespace", w.image),
        );
    }
    for (i, e) in w.env.iter().enumerate() {
        if RESERVED_ENV.contains(&e.name.as_str()) {
            err(
                &format!("spec.worker.env[{i}].name"),
                format!("{} is set by the operator from the spec: remove it", e.name),
            );
        }
    }
    if let Some(r) = &w.resources {
        for (kind, map) in [("requests", &r.requests), ("limits", &r.limits)] {
            if let Some(q) = map.as_ref().and_then(|m| m.get(GPU_RESOURCE)) {
                if q.0 != t.gpus_per_node.to_string() {
                    err(
                        &format!("spec.worker.resources.{kind}"),
                        format!(
                            "{GPU_RESOURCE}: {} disagrees with topology.gpusPerNode ({}): remove it, the operator sets it",
                            q.0, t.gpus_per_node
                        ),
                    );
                }
            }
        }
    }
    let p = &w.ports;
    for (field, v) in [
        ("dispatch", p.dispatch),
        ("metrics", p.metrics),
        ("admin", p.admin),
    ] {
        if !(1..=65535).contains(&v) {
            err(
                &format!("spec.worker.ports.{field}"),
                format!("{v} is not a port number (1..65535)"),
            );
        }
    }
    if p.dispatch == p.metrics || p.dispatch == p.admin || p.metrics == p.admin {
        err(
            "spec.worker.ports",
            "dispatch, metrics and admin must be three different ports".into(),
        );
    }

    if let Some(sel) = &spec.initial_load {
        if sel.name.trim().is_empty() || sel.key.trim().is_empty() {
            err(
                "spec.initialLoad",
                "needs both name (the ConfigMap) and key (the trace in it)".into(),
            );
        }
    }
}

/// Whether `name` is an NCCL setting: `^NCCL_[A-Z0-9_]+$`.
pub fn is_nccl_var(name: &str) -> bool {
    name.strip_prefix("NCCL_").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    })
}

/// `spec.dataPlane`, resolved when it is valid. The port must not clash with the worker's other
/// ports (also CEL), NCCL needs GPUs (also CEL), and `ipc` needs every rank of a node in one
/// process group: it is, since a node's ranks are all in its one worker pod.
fn check_data_plane(spec: &MoEDeploymentSpec, errs: &mut Errors) -> Option<DataPlane> {
    let mut err = |path: &str, message: String| errs.push(path, message);
    let d = &spec.data_plane;
    let w = &spec.worker;
    let mut ok = true;
    let port = u16::try_from(d.port).ok().filter(|p| *p >= 1);
    if port.is_none() {
        ok = false;
        err(
            "spec.dataPlane.port",
            format!("{} is not a port number (1..65535)", d.port),
        );
    }
    // Local rank i of a worker listens at port + i (docs/data-plane.md): with a group, the whole
    // range must stay clear of the worker's own ports and below 65536.
    let ranks = if d.transport == Transport::None {
        1
    } else {
        i64::from(spec.topology.gpus_per_node.max(1))
    };
    let last = i64::from(d.port) + ranks - 1;
    if port.is_some() && ranks > 1 && last > 65535 {
        ok = false;
        err(
            "spec.dataPlane.port",
            format!(
                "{}: a node's {ranks} ranks listen at {}..={last}, past 65535: give a lower port",
                d.port, d.port
            ),
        );
    }
    for (field, v) in [
        ("dispatch", w.ports.dispatch),
        ("metrics", w.ports.metrics),
        ("admin", w.ports.admin),
    ] {
        let inside = (i64::from(d.port)..=last).contains(&i64::from(v));
        if v != d.port && inside {
            ok = false;
            err(
                "spec.dataPlane.port",
                format!(
                    "{}: a node's {ranks} ranks listen at {}..={last}, which holds worker.ports.{field} ({v}): move one of them",
                    d.port, d.port
                ),
            );
        }
        if v == d.port {
            ok = false;
            err(
                "spec.dataPlane.port",
                format!(
                    "{} is also worker.ports.{field}: give the ranks' mesh a port of its own, e.g. 9403",
                    d.port
                ),
            );
        }
    }
    if d.transport == Transport::Nccl && w.device == WorkerDevice::Cpu {
        ok = false;
        err(
            "spec.dataPlane.transport",
            "nccl needs GPU workers but spec.worker.device is cpu: set worker.device to cuda, or use transport tcp for CPU workers".into(),
        );
    }
    let timeout = match parse_duration(&d.rendezvous_timeout) {
        Err(e) => {
            err(
                "spec.dataPlane.rendezvousTimeout",
                format!("{e}: write a duration such as 120s"),
            );
            None
        }
        Ok(t) if !(MIN_RENDEZVOUS_TIMEOUT..=MAX_RENDEZVOUS_TIMEOUT).contains(&t) => {
            err(
                "spec.dataPlane.rendezvousTimeout",
                format!(
                    "{} is outside 5s..1h: a rank waits this long for the whole group, so use e.g. 120s",
                    d.rendezvous_timeout
                ),
            );
            None
        }
        Ok(t) => Some(t),
    };
    if d.nccl_env.len() > MAX_NCCL_ENV as usize {
        ok = false;
        err(
            "spec.dataPlane.ncclEnv",
            format!("{} entries: use at most {MAX_NCCL_ENV}", d.nccl_env.len()),
        );
    }
    for name in d.nccl_env.keys() {
        if !is_nccl_var(name) {
            ok = false;
            err(
                &format!("spec.dataPlane.ncclEnv[{name}]"),
                format!("{name:?} is not an NCCL variable (^NCCL_[A-Z0-9_]+$): put other variables in worker.env"),
            );
        }
    }
    for (i, e) in w.env.iter().enumerate() {
        if d.nccl_env.contains_key(&e.name) {
            ok = false;
            err(
                &format!("spec.worker.env[{i}].name"),
                format!(
                    "{} is also in dataPlane.ncclEnv: set it in one place",
                    e.name
                ),
            );
        }
    }
    let shm_bytes = match parse_quantity(&d.shm_size) {
        Err(e) => {
            err(
                "spec.dataPlane.shmSize",
                format!("{e}: write a quantity such as 1Gi or 512Mi"),
            );
            None
        }
        Ok(0) => {
            err(
                "spec.dataPlane.shmSize",
                format!(
                    "{} is zero: the ranks need shared memory, use e.g. 1Gi",
                    d.shm_size
                ),
            );
            None
        }
        Ok(b) => Some(u64::try_from(b).unwrap_or(u64::MAX)),
    };
    let (rendezvous_timeout, shm_bytes) = (timeout?, shm_bytes?);
    ok.then(|| DataPlane {
        transport: d.transport,
        port: port.unwrap_or_default(),
        rendezvous_timeout,
        nccl_env: d.nccl_env.clone(),
        shm_size: d.shm_size.trim().to_string(),
        shm_bytes,
        ipc_lock: d.ipc_lock,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::moedeployment::*;
    use k8s_openapi::api::core::v1::{EnvVar, HostPathVolumeSource, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    /// The errors of a spec (none when it is valid).
    pub(crate) fn errors(spec: &MoEDeploymentSpec, policy: &PodPolicy) -> Vec<FieldError> {
        validate(spec, policy).err().unwrap_or_default()
    }

    pub(crate) fn demo_spec() -> MoEDeploymentSpec {
        serde_yaml::from_str(
            r#"
model:
  layers: 4
  firstMoeLayer: 1
  experts: 16
  topK: 2
  hiddenSize: 256
  expertIntermediateSize: 128
  dtype: bf16
  checkpoint:
    path: /models/tiny
topology: {nodes: 2, gpusPerNode: 2}
worker: {image: "moe-worker:dev"}
"#,
        )
        .unwrap()
    }

    #[test]
    fn a_step_time_objective_is_craft_only_with_usable_constants() {
        let mut s = demo_spec();
        s.replication.step_time = Some(
            serde_yaml::from_str("{tokensPerStep: 256, costModel: {launchSeconds: 1e-4, bytesPerSecond: 4.2e12, flopsPerSecond: 5e14}}")
                .unwrap(),
        );
        let v = validate(&s, &PodPolicy::default()).unwrap();
        let obj = v.plan_request(Algorithm::Craft).craft.step.unwrap();
        assert_eq!((obj.tokens_per_step, obj.cost.bytes_per_s), (256.0, 4.2e12));
        s.replication.policy = ReplicationPolicy::Eplb;
        let st = s.replication.step_time.as_mut().unwrap();
        st.tokens_per_step = 0;
        st.cost_model.as_mut().unwrap().bytes_per_second = f64::NAN;
        let paths: Vec<String> = errors(&s, &PodPolicy::default())
            .into_iter()
            .map(|e| e.path)
            .collect();
        for want in [
            "spec.replication.stepTime",
            "spec.replication.stepTime.tokensPerStep",
            "spec.replication.stepTime.costModel.bytesPerSecond",
        ] {
            assert!(paths.iter().any(|p| p == want), "{want} not in {paths:?}");
        }
    }

    #[test]
    fn engines_refuse_what_they_cannot_run_and_name_the_field() {
        let policy = PodPolicy {
            prometheus_url_prefixes: vec![super::super::pod_policy::HttpUrl::parse(
                "http://prom:9090",
            )
            .unwrap()],
            ..Default::default()
        };
        let engine = |yaml: &str| -> MoEDeploymentSpec {
            let mut s = demo_spec();
            s.engine = Some(serde_yaml::from_str(yaml).unwrap());
            s
        };
        // Without Prometheus: the engine's pods serve no moe-worker metrics.
        let s = engine("{kind: SGLang}");
        let e = errors(&s, &policy);
        assert!(e.iter().any(|e| e.path == "spec.metrics.source"), "{e:?}");
        let prom = |s: &mut MoEDeploymentSpec| {
            s.metrics = serde_yaml::from_str(
                "{source: Prometheus, prometheus: {url: 'http://prom:9090', query: q, seriesLabels: {layer: layer_idx, expert: logical_expert_id, layerIndex: MoELayer}}}",
            )
            .unwrap();
        };
        let mut s = engine("{kind: VLLM, args: [--enable-eplb, '--eplb-config={}', --tp, '2'], port: 8080, distInitPort: 8080}");
        prom(&mut s);
        s.data_plane.transport = Transport::Tcp;
        let paths: Vec<String> = errors(&s, &policy).into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            [
                "spec.dataPlane.transport",
                "spec.engine.args[1]",
                "spec.engine.distInitPort"
            ]
        );
        // A valid engine spec: Recreate whatever the strategy says, vLLM's labels resolved.
        let mut s = engine("{kind: VLLM}");
        prom(&mut s);
        let v = validate(&s, &policy).unwrap();
        assert_eq!(v.strategy, RolloutStrategy::Recreate);
        let e = v.engine.unwrap();
        assert_eq!(
            (e.port, e.dist_init_port, e.health_path.as_str()),
            (8000, 5000, "/health")
        );
        match v.load_source {
            LoadSource::Prometheus { series, .. } => {
                assert_eq!(series.layer, "layer_idx");
                assert_eq!(series.layer_index, super::super::LayerIndex::MoELayer);
            }
            other => panic!("{other:?}"),
        }
        let mut s = demo_spec();
        prom(&mut s);
        s.metrics.prometheus.as_mut().unwrap().series_labels =
            Some(serde_yaml::from_str("{layer: x, expert: x}").unwrap());
        let e = errors(&s, &policy);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].path, "spec.metrics.prometheus.seriesLabels");
    }

    #[test]
    fn defaults_fill_in_and_the_demo_is_valid() {
        let s = demo_spec();
        assert_eq!(s.replication.policy, ReplicationPolicy::Craft);
        assert_eq!(s.replication.budget.auto, Some(true));
        assert_eq!(s.rollout.max_unavailable, 1);
        assert_eq!(s.metrics.interval, "30s");
        assert_eq!(errors(&s, &PodPolicy::default()), vec![]);
        assert_eq!(s.model.shape().unwrap().moe_layers(), 3);
    }

    #[test]
    fn a_valid_spec_is_resolved_once() {
        let mut s = demo_spec();
        s.metrics.interval = "15s".into();
        s.replication.window = IntOrString::String("2m".into());
        s.replication.cooldown = "90s".into();
        s.replication.budget = BudgetSpec {
            replicas_per_gpu: None,
            memory_per_gpu: Some("1Gi".into()),
            auto: None,
        };
        s.rollout.max_unavailable = 2;
        let v = validate(&s, &PodPolicy::default()).unwrap();
        assert_eq!(v.interval, Duration::from_secs(15));
        assert_eq!(v.window_batches, 8, "2m of 15s intervals");
        assert_eq!(v.cooldown, Duration::from_secs(90));
        assert_eq!(v.budget, Budget::MemoryPerGpu(1 << 30));
        assert_eq!((v.nodes, v.gpus_per_node, v.topology.gpus), (2, 2, 4));
        assert_eq!(v.max_unavailable, 2);
        assert_eq!(v.load_source, LoadSource::Workers);
        assert_eq!(
            v.ports,
            Ports {
                dispatch: 9400,
                metrics: 9401,
                admin: 9402
            }
        );
        assert_eq!(v.shape, s.model.shape().unwrap());
        assert_eq!(
            v.data_plane,
            DataPlane {
                transport: Transport::None,
                port: 9403,
                rendezvous_timeout: Duration::from_secs(120),
                nccl_env: BTreeMap::new(),
                shm_size: "1Gi".into(),
                shm_bytes: 1 << 30,
                ipc_lock: false,
            },
            "the dataPlane defaults"
        );
        assert_eq!(v.plan_request(v.algorithm()).algorithm, Algorithm::Craft);
        // Defaults: an auto budget, a window of 10 intervals.
        let d = validate(&demo_spec(), &PodPolicy::default()).unwrap();
        assert!(matches!(d.budget, Budget::Auto { .. }));
        assert_eq!(
            (d.window_batches, d.cooldown),
            (10, Duration::from_secs(300))
        );
    }

    type Edit = fn(&mut MoEDeploymentSpec);

    #[test]
    fn each_bad_input_names_its_field() {
        let cases: Vec<(&str, Edit, &str, &str)> = vec![
            (
                "s3 bucket",
                |s| {
                    s.model.checkpoint.s3 = Some(crate::api::S3Checkpoint {
                        bucket: "Bad_Bucket".into(),
                        ..Default::default()
                    })
                },
                "spec.model.checkpoint.s3.bucket",
                "not a bucket name",
            ),
            (
                "s3 endpoint with a path",
                |s| {
                    s.model.checkpoint.s3 = Some(crate::api::S3Checkpoint {
                        bucket: "weights".into(),
                        endpoint: Some("https://minio:9000/bucket".into()),
                        ..Default::default()
                    })
                },
                "spec.model.checkpoint.s3.endpoint",
                "without a path",
            ),
            (
                "s3 credentials without the policy",
                |s| {
                    s.model.checkpoint.s3 = Some(crate::api::S3Checkpoint {
                        bucket: "weights".into(),
                        credentials_secret: Some("s3-creds".into()),
                        ..Default::default()
                    })
                },
                "spec.model.checkpoint.s3.credentialsSecret",
                "--allow-secret-volumes",
            ),
            (
                "s3 into a hostPath",
                |s| {
                    s.model.checkpoint.s3 = Some(crate::api::S3Checkpoint {
                        bucket: "weights".into(),
                        ..Default::default()
                    });
                    s.model.checkpoint.volume = Some(crate::api::CheckpointVolume {
                        host_path: Some(k8s_openapi::api::core::v1::HostPathVolumeSource {
                            path: "/data/m".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
                },
                "spec.model.checkpoint.volume.hostPath",
                "cannot be the cache",
            ),
            (
                "relative checkpoint",
                |s| s.model.checkpoint.path = "models/x".into(),
                "spec.model.checkpoint.path",
                "not absolute",
            ),
            (
                "dotdot checkpoint",
                |s| s.model.checkpoint.path = "/models/../etc".into(),
                "spec.model.checkpoint.path",
                "'..'",
            ),
            (
                "root checkpoint",
                |s| s.model.checkpoint.path = "/".into(),
                "spec.model.checkpoint.path",
                "not a checkpoint directory",
            ),
            (
                "relative hostPath",
                |s| {
                    s.model.checkpoint.volume = Some(CheckpointVolume {
                        host_path: Some(HostPathVolumeSource {
                            path: "x".into(),
                            ..Default::default()
                        }),
                        persistent_volume_claim: None,
                    })
                },
                "spec.model.checkpoint.volume.hostPath.path",
                "absolute",
            ),
            (
                "no volume source",
                |s| s.model.checkpoint.volume = Some(CheckpointVolume::default()),
                "spec.model.checkpoint.volume",
                "exactly one",
            ),
            (
                "bad memory quantity",
                |s| {
                    s.replication.budget = BudgetSpec {
                        memory_per_gpu: Some("2GB".into()),
                        auto: None,
                        replicas_per_gpu: None,
                    }
                },
                "spec.replication.budget.memoryPerGpu",
                "unknown suffix",
            ),
            // One bf16 expert here is 3*256*128*2 = 196608 bytes.
            (
                "memory fits no expert",
                |s| {
                    s.replication.budget = BudgetSpec {
                        memory_per_gpu: Some("100Ki".into()),
                        auto: None,
                        replicas_per_gpu: None,
                    }
                },
                "spec.replication.budget.memoryPerGpu",
                "196608 bytes",
            ),
            (
                "two budget forms",
                |s| s.replication.budget.replicas_per_gpu = Some(2),
                "spec.replication.budget",
                "exactly one",
            ),
            (
                "no budget form",
                |s| s.replication.budget.auto = Some(false),
                "spec.replication.budget",
                "exactly one",
            ),
            (
                "negative replicas",
                |s| {
                    s.replication.budget = BudgetSpec {
                        replicas_per_gpu: Some(-1),
                        auto: None,
                        memory_per_gpu: None,
                    }
                },
                "spec.replication.budget.replicasPerGpu",
                "negative",
            ),
            (
                "absurd replicas",
                |s| {
                    s.replication.budget = BudgetSpec {
                        replicas_per_gpu: Some(49),
                        auto: None,
                        memory_per_gpu: None,
                    }
                },
                "spec.replication.budget.replicasPerGpu",
                "exceeds 3 MoE layers x 16",
            ),
            (
                "min improvement",
                |s| s.replication.min_improvement = 1.5,
                "spec.replication.minImprovement",
                "outside 0..1",
            ),
            (
                "cooldown",
                |s| s.replication.cooldown = "5 minutes".into(),
                "spec.replication.cooldown",
                "duration",
            ),
            (
                "interval",
                |s| s.metrics.interval = "30".into(),
                "spec.metrics.interval",
                "no unit",
            ),
            (
                "interval too short",
                |s| s.metrics.interval = "100ms".into(),
                "spec.metrics.interval",
                "shorter than 1s",
            ),
            (
                "window zero",
                |s| s.replication.window = IntOrString::Int(0),
                "spec.replication.window",
                "1 or more",
            ),
            (
                "window bad",
                |s| s.replication.window = IntOrString::String("ten".into()),
                "spec.replication.window",
                "number of metrics intervals",
            ),
            (
                "window holds too many counts",
                |s| s.replication.window = IntOrString::Int(1_000_000),
                "spec.replication.window",
                "MAX_LOAD_CELLS_OPERATOR",
            ),
            (
                "window < interval",
                |s| s.replication.window = IntOrString::String("10s".into()),
                "spec.replication.window",
                "shorter than one metrics.interval",
            ),
            (
                "prometheus missing",
                |s| s.metrics.source = MetricsSource::Prometheus,
                "spec.metrics.prometheus",
                "required",
            ),
            (
                "prometheus url",
                |s| {
                    s.metrics.source = MetricsSource::Prometheus;
                    s.metrics.prometheus = Some(PrometheusSpec {
                        series_labels: None,
                        url: "prometheus:9090".into(),
                        query: "q".into(),
                        auth: None,
                        ca: None,
                    })
                },
                "spec.metrics.prometheus.url",
                "http(s) URL",
            ),
            (
                "prometheus query",
                |s| {
                    s.metrics.source = MetricsSource::Prometheus;
                    s.metrics.prometheus = Some(PrometheusSpec {
                        series_labels: None,
                        url: "http://p:9090".into(),
                        query: " ".into(),
                        auth: None,
                        ca: None,
                    })
                },
                "spec.metrics.prometheus.query",
                "PromQL",
            ),
            (
                "prometheus auth over http",
                |s| {
                    s.metrics.source = MetricsSource::Prometheus;
                    s.metrics.prometheus = Some(PrometheusSpec {
                        series_labels: None,
                        url: "http://p:9090".into(),
                        query: "q".into(),
                        auth: Some(PrometheusAuth {
                            basic_auth_secret: Some(NameRef {
                                name: "prom-auth".into(),
                            }),
                            ..Default::default()
                        }),
                        ca: None,
                    })
                },
                "spec.metrics.prometheus.auth",
                "credentials are never sent over plain http",
            ),
            (
                "prometheus auth with both",
                |s| {
                    s.metrics.source = MetricsSource::Prometheus;
                    let r = KeyRef {
                        name: "prom-auth".into(),
                        key: "token".into(),
                    };
                    s.metrics.prometheus = Some(PrometheusSpec {
                        series_labels: None,
                        url: "https://p:9090".into(),
                        query: "q".into(),
                        auth: Some(PrometheusAuth {
                            bearer_token_secret: Some(r),
                            basic_auth_secret: Some(NameRef {
                                name: "prom-auth".into(),
                            }),
                        }),
                        ca: None,
                    })
                },
                "spec.metrics.prometheus.auth",
                "exactly one of bearerTokenSecret",
            ),
            (
                "prometheus ca over http",
                |s| {
                    s.metrics.source = MetricsSource::Prometheus;
                    s.metrics.prometheus = Some(PrometheusSpec {
                        series_labels: None,
                        url: "http://p:9090".into(),
                        query: "q".into(),
                        auth: None,
                        ca: Some(PrometheusCa {
                            config_map: Some(KeyRef {
                                name: "prom-ca".into(),
                                key: "ca.crt".into(),
                            }),
                            ..Default::default()
                        }),
                    })
                },
                "spec.metrics.prometheus.ca",
                "needs an https:// url",
            ),
            (
                "prometheus ca key",
                |s| {
                    s.metrics.source = MetricsSource::Prometheus;
                    s.metrics.prometheus = Some(PrometheusSpec {
                        series_labels: None,
                        url: "https://p:9090".into(),
                        query: "q".into(),
                        auth: None,
                        ca: Some(PrometheusCa {
                            secret: Some(KeyRef {
                                name: "Prom_CA".into(),
                                key: "ca/crt".into(),
                            }),
                            ..Default::default()
                        }),
                    })
                },
                "spec.metrics.prometheus.ca.secret.key",
                "not a data key",
            ),
            (
                "prometheus ignored",
                |s| {
                    s.metrics.prometheus = Some(PrometheusSpec {
                        series_labels: None,
                        url: "http://p:9090".into(),
                        query: "q".into(),
                        auth: None,
                        ca: None,
                    })
                },
                "spec.metrics.prometheus",
                "ignored",
            ),
            (
                "image empty",
                |s| s.worker.image = " ".into(),
                "spec.worker.image",
                "empty",
            ),
            (
                "reserved env",
                |s| {
                    s.worker.env.push(EnvVar {
                        name: "MOE_NODE_RANK".into(),
                        value: Some("3".into()),
                        ..Default::default()
                    })
                },
                "spec.worker.env[0].name",
                "set by the operator",
            ),
            (
                "gpu resource mismatch",
                |s| {
                    s.worker.resources = Some(ResourceRequirements {
                        limits: Some([(GPU_RESOURCE.to_string(), Quantity("8".into()))].into()),
                        ..Default::default()
                    })
                },
                "spec.worker.resources.limits",
                "disagrees",
            ),
            (
                "same ports",
                |s| s.worker.ports.admin = s.worker.ports.metrics,
                "spec.worker.ports",
                "different",
            ),
            (
                "reserved EP env",
                |s| {
                    s.worker.env.push(EnvVar {
                        name: "MOE_RANK".into(),
                        value: Some("2".into()),
                        ..Default::default()
                    })
                },
                "spec.worker.env[0].name",
                "set by the operator",
            ),
            (
                "data plane port clashes",
                |s| s.data_plane.port = s.worker.ports.metrics,
                "spec.dataPlane.port",
                "also worker.ports.metrics",
            ),
            (
                "data plane port out of range",
                |s| s.data_plane.port = 70000,
                "spec.dataPlane.port",
                "not a port number",
            ),
            (
                "a node's rank ports reach a worker port",
                |s| {
                    s.data_plane.transport = Transport::Tcp;
                    s.topology.gpus_per_node = 4;
                    s.data_plane.port = s.worker.ports.admin - 2;
                },
                "spec.dataPlane.port",
                "which holds worker.ports.admin",
            ),
            (
                "a node's rank ports run past 65535",
                |s| {
                    s.data_plane.transport = Transport::Tcp;
                    s.topology.gpus_per_node = 4;
                    s.data_plane.port = 65534;
                },
                "spec.dataPlane.port",
                "past 65535",
            ),
            (
                "nccl on cpu",
                |s| {
                    s.data_plane.transport = Transport::Nccl;
                    s.worker.device = WorkerDevice::Cpu
                },
                "spec.dataPlane.transport",
                "worker.device",
            ),
            (
                "rendezvous timeout unparsable",
                |s| s.data_plane.rendezvous_timeout = "2 minutes".into(),
                "spec.dataPlane.rendezvousTimeout",
                "duration",
            ),
            (
                "rendezvous timeout too short",
                |s| s.data_plane.rendezvous_timeout = "1s".into(),
                "spec.dataPlane.rendezvousTimeout",
                "outside 5s..1h",
            ),
            (
                "rendezvous timeout too long",
                |s| s.data_plane.rendezvous_timeout = "2h".into(),
                "spec.dataPlane.rendezvousTimeout",
                "outside 5s..1h",
            ),
            (
                "nccl env name",
                |s| {
                    s.data_plane
                        .nccl_env
                        .insert("NCCL_ib_hca".into(), "mlx5".into());
                },
                "spec.dataPlane.ncclEnv[NCCL_ib_hca]",
                "not an NCCL variable",
            ),
            (
                "nccl env not nccl",
                |s| {
                    s.data_plane
                        .nccl_env
                        .insert("LD_PRELOAD".into(), "x".into());
                },
                "spec.dataPlane.ncclEnv[LD_PRELOAD]",
                "worker.env",
            ),
            (
                "nccl env set twice",
                |s| {
                    s.data_plane
                        .nccl_env
                        .insert("NCCL_DEBUG".into(), "INFO".into());
                    s.worker.env.push(EnvVar {
                        name: "NCCL_DEBUG".into(),
                        value: Some("WARN".into()),
                        ..Default::default()
                    })
                },
                "spec.worker.env[0].name",
                "also in dataPlane.ncclEnv",
            ),
            (
                "shm size",
                |s| s.data_plane.shm_size = "1GB".into(),
                "spec.dataPlane.shmSize",
                "unknown suffix",
            ),
            (
                "shm size zero",
                |s| s.data_plane.shm_size = "0".into(),
                "spec.dataPlane.shmSize",
                "zero",
            ),
            (
                "maxUnavailable > nodes",
                |s| s.rollout.max_unavailable = 3,
                "spec.rollout.maxUnavailable",
                "between 1 and",
            ),
            (
                "negative replicas",
                |s| s.replicas = -1,
                "spec.replicas",
                "between 0 and",
            ),
            (
                "no group budget and no surge",
                |s| {
                    s.rollout.max_unavailable_groups = 0;
                    s.rollout.max_surge = 0
                },
                "spec.rollout.maxUnavailableGroups",
                "maxSurge to 1",
            ),
            (
                "surge past the limit",
                |s| s.rollout.max_surge = 17,
                "spec.rollout.maxSurge",
                "between 0 and 16",
            ),
            (
                "topK > experts",
                |s| s.model.top_k = 17,
                "spec.model.topK",
                "exceeds",
            ),
            (
                "firstMoeLayer",
                |s| s.model.first_moe_layer = 4,
                "spec.model.firstMoeLayer",
                "less than model.layers",
            ),
            (
                "uneven experts for Eplb",
                |s| {
                    s.model.experts = 18;
                    s.replication.policy = ReplicationPolicy::Eplb
                },
                "spec.model.experts",
                "spread evenly",
            ),
            (
                "fewer experts than GPUs",
                |s| {
                    s.topology.nodes = 8;
                    s.topology.gpus_per_node = 4;
                    s.replication.policy = ReplicationPolicy::None;
                    s.model.experts = 16
                },
                "spec.topology",
                "without an expert",
            ),
        ];
        for (name, edit, path, needle) in cases {
            let mut s = demo_spec();
            edit(&mut s);
            let errs = errors(&s, &PodPolicy::default());
            assert!(
                errs.iter()
                    .any(|e| e.path == path && e.message.contains(needle)),
                "{name}: want {path} ~ {needle:?}, got {errs:?}"
            );
        }
    }

    #[test]
    fn scheduling_defaults_follow_the_group_and_refuse_what_would_be_ignored() {
        use crate::api::{Gang, SchedulingSpec};
        let mut s = demo_spec();
        let v = validate(&s, &PodPolicy::default()).unwrap();
        assert_eq!(v.gang.timeout, DEFAULT_GANG_TIMEOUT);
        s.data_plane.transport = Transport::None;
        assert_eq!(
            validate(&s, &PodPolicy::default()).unwrap().gang.gang,
            Gang::None
        );
        s.data_plane.transport = Transport::Tcp;
        assert_eq!(
            validate(&s, &PodPolicy::default()).unwrap().gang.gang,
            Gang::Guard
        );
        for (sched, path, needle) in [
            (
                SchedulingSpec {
                    gang: Some(Gang::Kueue),
                    ..Default::default()
                },
                "spec.scheduling.queueName",
                "LocalQueue",
            ),
            (
                SchedulingSpec {
                    gang: Some(Gang::Guard),
                    queue_name: Some("q".into()),
                    ..Default::default()
                },
                "spec.scheduling.queueName",
                "ignored",
            ),
            (
                SchedulingSpec {
                    timeout: Some("5s".into()),
                    ..Default::default()
                },
                "spec.scheduling.timeout",
                "10s..1h",
            ),
            (
                SchedulingSpec {
                    timeout: Some("2h".into()),
                    ..Default::default()
                },
                "spec.scheduling.timeout",
                "10s..1h",
            ),
        ] {
            let mut s = s.clone();
            s.scheduling = sched;
            let e = errors(&s, &PodPolicy::default());
            assert!(
                e.len() == 1 && e[0].path == path && e[0].message.contains(needle),
                "{e:?}"
            );
        }
    }

    #[test]
    fn a_data_plane_is_resolved_once() {
        let mut s = demo_spec();
        s.data_plane = serde_yaml::from_str(
            "{transport: nccl, port: 29500, rendezvousTimeout: 5m, shmSize: 16Gi, ipcLock: false, \
             ncclEnv: {NCCL_IB_HCA: mlx5, NCCL_SOCKET_IFNAME: eth0}}",
        )
        .unwrap();
        let d = validate(&s, &PodPolicy::default()).unwrap().data_plane;
        assert_eq!(d.transport, Transport::Nccl);
        assert_eq!(d.port, 29500);
        assert_eq!(d.rendezvous_timeout, Duration::from_secs(300));
        assert_eq!((d.shm_size.as_str(), d.shm_bytes), ("16Gi", 16 << 30));
        assert_eq!(
            d.nccl_env.keys().collect::<Vec<_>>(),
            ["NCCL_IB_HCA", "NCCL_SOCKET_IFNAME"]
        );
        // The bounds are inclusive.
        for t in ["5s", "1h"] {
            s.data_plane.rendezvous_timeout = t.into();
            assert_eq!(errors(&s, &PodPolicy::default()), vec![], "{t}");
        }
        assert!(is_nccl_var("NCCL_NET_GDR_LEVEL") && is_nccl_var("NCCL_P2P_DISABLE"));
        for bad in [
            "NCCL_",
            "NCCL",
            "nccl_debug",
            "NCCL_DEBUG-X",
            "XNCCL_DEBUG",
            "",
        ] {
            assert!(!is_nccl_var(bad), "{bad}");
        }
    }

    #[test]
    fn craft_accepts_uneven_experts_and_budgets_that_fit() {
        let mut s = demo_spec();
        s.model.experts = 18;
        s.replication.budget = BudgetSpec {
            memory_per_gpu: Some("1Mi".into()),
            auto: None,
            replicas_per_gpu: None,
        };
        assert_eq!(errors(&s, &PodPolicy::default()), vec![]);
        // Without replication the budget is not read, so a tiny one is fine.
        s.model.experts = 16;
        s.replication.policy = ReplicationPolicy::PlacementOnly;
        s.replication.budget.memory_per_gpu = Some("1Ki".into());
        assert_eq!(errors(&s, &PodPolicy::default()), vec![]);
    }

    /// Objects stored before the CRD had its maxima: every size field above `plan::limits` is
    /// refused by name, before anything is planned or allocated from it.
    #[test]
    fn sizes_above_the_limits_are_refused_by_name() {
        use crate::plan::limits::*;
        type Edit = fn(&mut MoEDeploymentSpec, i64);
        let cases: Vec<(&str, Edit, u64)> = vec![
            (
                "spec.model.layers",
                |s, v| s.model.layers = v as i32,
                MAX_LAYERS.into(),
            ),
            (
                "spec.model.experts",
                |s, v| s.model.experts = v as i32,
                MAX_EXPERTS.into(),
            ),
            (
                "spec.model.topK",
                |s, v| s.model.top_k = v as i32,
                MAX_TOP_K.into(),
            ),
            (
                "spec.model.hiddenSize",
                |s, v| s.model.hidden_size = v,
                MAX_HIDDEN_SIZE,
            ),
            (
                "spec.model.expertIntermediateSize",
                |s, v| s.model.expert_intermediate_size = v,
                MAX_EXPERT_INTERMEDIATE_SIZE,
            ),
            (
                "spec.topology.nodes",
                |s, v| s.topology.nodes = v as i32,
                MAX_NODES.into(),
            ),
            (
                "spec.topology.gpusPerNode",
                |s, v| s.topology.gpus_per_node = v as i32,
                MAX_GPUS_PER_NODE.into(),
            ),
            (
                "spec.replication.budget.replicasPerGpu",
                |s, v| {
                    s.replication.budget = BudgetSpec {
                        replicas_per_gpu: Some(v as i32),
                        auto: None,
                        memory_per_gpu: None,
                    }
                },
                MAX_REPLICAS_PER_GPU.into(),
            ),
        ];
        for (path, edit, max) in cases {
            for v in [max as i64 + 1, i64::from(i32::MAX)] {
                let mut s = demo_spec();
                edit(&mut s, v);
                let errs = errors(&s, &PodPolicy::default());
                assert!(
                    errs.iter()
                        .any(|e| e.path == path && e.message.contains(&format!("exceeds {max}"))),
                    "{path}={v}: {errs:?}"
                );
            }
        }
        // The largest model and topology the limits allow is valid (Craft: no divisibility).
        let mut s = demo_spec();
        s.model.layers = MAX_LAYERS as i32;
        s.model.experts = MAX_EXPERTS as i32;
        s.model.top_k = MAX_TOP_K as i32;
        s.model.hidden_size = MAX_HIDDEN_SIZE as i64;
        s.model.expert_intermediate_size = MAX_EXPERT_INTERMEDIATE_SIZE as i64;
        s.topology.nodes = (MAX_GPUS / MAX_GPUS_PER_NODE) as i32;
        s.topology.gpus_per_node = MAX_GPUS_PER_NODE as i32;
        // Its load window is bounded too: 8 intervals of 511 x 1024 counts is what the operator
        // keeps per deployment (the default 10 is refused, naming the largest window that fits).
        s.replication.window = IntOrString::Int(8);
        assert_eq!(errors(&s, &PodPolicy::default()), vec![]);
        // Each factor within its limit, the product not.
        s.topology.nodes = MAX_NODES as i32;
        let errs = errors(&s, &PodPolicy::default());
        assert!(
            errs.iter()
                .any(|e| e.path == "spec.topology" && e.message.contains("exceeds 4096")),
            "{errs:?}"
        );
    }

    #[test]
    fn shape_refuses_negative_numbers_without_panicking() {
        let mut s = demo_spec();
        s.model.hidden_size = -1;
        assert_eq!(s.model.shape().unwrap_err().path, "spec.model.hiddenSize");
        assert!(errors(&s, &PodPolicy::default())
            .iter()
            .any(|e| e.path == "spec.model.hiddenSize"));
    }
}
