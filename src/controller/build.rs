//! Pure builders of the objects a `MoEDeployment` owns: the plan ConfigMap, one worker Pod per
//! node, a headless Service, a PodDisruptionBudget and the admin-token Secret. No I/O: the
//! reconciler fetches the deployment, the plan and the token, calls [`build`], and applies the
//! result server-side under one field manager.
//!
//! # Worker contract
//! Each worker pod runs (flags of `moe-worker`, see `crate::worker::runtime::WorkerArgs`)
//! ```text
//! moe-worker --plan $(MOE_PLAN_FILE) --checkpoint $(MOE_CHECKPOINT_DIR)
//!            --node $(MOE_NODE_RANK) --gpus-per-node $(MOE_GPUS_PER_NODE)
//!            --listen $(POD_IP):<dispatch> --metrics-listen $(POD_IP):<metrics>
//!            --admin-listen $(POD_IP):<admin> --admin-token-file $(MOE_ADMIN_TOKEN_FILE)
//!            --device <cuda|cpu>
//! ```
//! with the same values also in the environment (`MOE_NODE_RANK`, `MOE_NODES`,
//! `MOE_GPUS_PER_NODE`, `MOE_PLAN_FILE`, `MOE_CHECKPOINT_DIR`, `MOE_ADMIN_TOKEN_FILE`,
//! `MOE_DEVICE`) and `POD_IP` from the downward API. Binding the pod IP rather than 0.0.0.0 lets
//! process-backed test pods share one loopback, each on its own 127.x address.
//! Node rank `n` serves EP ranks `n*gpusPerNode .. (n+1)*gpusPerNode`. The plan file is the plan
//! ConfigMap's `plan.json`; the admin token file is the Secret's `token`. `/readyz` and `/healthz`
//! are served on the metrics port without the token (probes carry none).
//!
//! The expert-parallel data plane's environment is docs/data-plane.md's: `MOE_EP_WORLD_SIZE`,
//! `MOE_EP_RENDEZVOUS` (rank 0's pod through the headless Service), `MOE_EP_LISTEN`,
//! `MOE_EP_TRANSPORT`, `MOE_EP_RENDEZVOUS_TIMEOUT_SECONDS` and `spec.dataPlane.ncclEnv`, with the
//! container port `ep`, a memory-backed `/dev/shm` and the termination message the operator reads
//! a failed rank from. `MOE_RANK` is not set: `moe-worker` refuses it together with
//! `MOE_NODE_RANK` (`--rank` conflicts with `--node`), and the first rank is
//! `MOE_NODE_RANK * MOE_GPUS_PER_NODE`.
//!
//! # Test hook
//! A MoEDeployment annotated `moe.craft.dev/process-backed: "true"` gets worker pods labelled
//! `moe.craft.dev/process-backed=true`, which the local control plane's launcher (e2e/pods) runs as
//! real local processes. It has no effect on a real cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapKeySelector, ConfigMapVolumeSource, Container,
    ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, Probe,
    ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::api::pod_policy::IPC_LOCK;
use crate::api::pod_shape::{
    KUEUE_POD_GROUP_NAME, KUEUE_POD_GROUP_TOTAL_COUNT, KUEUE_QUEUE_NAME, POD_GROUP_LABEL,
};
use crate::api::validate::{ValidEngine, ValidSpec, GPU_RESOURCE};
use crate::api::{Gang, MoEDeployment, WorkerSecurityContext, WorkerSpec};
use crate::plan::engines;
use crate::plan::engines::Engine;
use crate::plan::expert_plan::HashRule;
use crate::plan::packed::{self, Packed};
use crate::plan::ExpertPlan;
use crate::worker::wire::{HEALTHZ_PATH, READYZ_PATH};
use kube::api::{ApiResource, DynamicObject};

/// Label naming the owning MoEDeployment on every object it owns (also the orphan selector).
pub const LABEL_DEPLOYMENT: &str = "moe.craft.dev/deployment";
/// Label carrying a worker pod's EP group (`spec.replicas`); a worker pod without it (made
/// before groups existed) is group 0's. Also on each group's Service.
pub const LABEL_GROUP: &str = "moe.craft.dev/group";
/// Label telling the Services apart: `deployment` (every worker) or `group` (one group's).
pub const LABEL_SERVICE_SCOPE: &str = "moe.craft.dev/service-scope";
/// Label carrying a worker pod's node rank.
pub const LABEL_NODE_RANK: &str = "moe.craft.dev/node-rank";
/// Annotation: hash of the plan a worker pod was started with.
pub const ANNOTATION_PLAN_HASH: &str = "moe.craft.dev/plan-hash";
/// Annotation: hash of the built pod spec; a different desired hash means the pod must be recreated.
pub const ANNOTATION_SPEC_HASH: &str = "moe.craft.dev/spec-hash";
/// Annotation on a MoEDeployment asking for process-backed worker pods (test hook, see above).
pub const ANNOTATION_PROCESS_BACKED: &str = "moe.craft.dev/process-backed";
/// Label the e2e pod launcher looks for.
pub const LABEL_PROCESS_BACKED: &str = "moe.craft.dev/process-backed";
/// The field manager for server-side apply.
pub const FIELD_MANAGER: &str = "moe-operator";

/// Key of the plan document in the plan ConfigMap.
pub const PLAN_KEY: &str = "plan.json";
/// Key of the plan hash in the plan ConfigMap.
pub const HASH_KEY: &str = "hash";
/// Key of the bearer token in the admin Secret.
pub const TOKEN_KEY: &str = "token";
/// Keys of the plan ConfigMap of an engine deployment (`spec.engine`): the plan in the engine's
/// layout format, and the `num_redundant_experts` the engine must be started with for it.
pub const LAYOUT_KEY: &str = "layout.json";
pub const REDUNDANT_EXPERTS_KEY: &str = "redundant-experts";

pub use crate::api::pod_shape::SHM_DIR;
use crate::api::pod_shape::{
    ADMIN_DIR, FETCH_CONTAINER, PLAN_DIR, S3_CREDENTIALS_DIR, VOLUME_ADMIN_TOKEN,
    VOLUME_CHECKPOINT, VOLUME_PLAN, VOLUME_S3_CREDENTIALS, VOLUME_SHM,
};

const CONTAINER: &str = "worker";
/// The names of an engine pod's ports.
pub const ENGINE_HTTP_PORT: &str = "http";
pub const ENGINE_DIST_INIT_PORT: &str = "dist-init";

/// What went wrong building; each names what to fix.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BuildError {
    #[error("MoEDeployment has no {0} (objects read from the apiserver always do)")]
    MissingMetadata(&'static str),
    #[error("plan is for {plan_gpus} GPUs on {plan_nodes} nodes but spec.topology gives {spec_gpus} GPUs on {spec_nodes} nodes: re-plan for the spec's topology")]
    TopologyMismatch {
        plan_gpus: u32,
        plan_nodes: u32,
        spec_gpus: u64,
        spec_nodes: u32,
    },
    #[error("plan is for a different model than spec.model: re-plan for the spec's model")]
    ModelMismatch,
    #[error("plan has no hash: seal it before building")]
    UnsealedPlan,
    #[error("plan ConfigMap: {0}")]
    PlanTooLarge(#[from] packed::PackError),
    #[error("spec.engine: the plan has no layout the engine accepts: {0}")]
    EngineLayout(String),
}

impl BuildError {
    /// Short label for the errors-by-reason metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            BuildError::MissingMetadata(_) => "missing_metadata",
            BuildError::TopologyMismatch { .. } => "plan_topology_mismatch",
            BuildError::ModelMismatch => "plan_model_mismatch",
            BuildError::UnsealedPlan => "unsealed_plan",
            BuildError::PlanTooLarge(_) => "plan_too_large",
            BuildError::EngineLayout(_) => "engine_layout",
        }
    }
}

/// Everything a MoEDeployment should own, as it should be.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub plan_config_map: ConfigMap,
    /// Indexed by node rank.
    pub pods: Vec<Pod>,
    /// Headless, every worker of every group: the deployment's front door for a router, and the
    /// DNS subdomain of group 0's pods.
    pub service: Service,
    /// One headless Service per group `0..replicas + maxSurge` (indexed by group); group `g > 0`'s
    /// pods take their DNS names from theirs. Only those of live groups are applied.
    pub group_services: Vec<Service>,
    pub pdb: PodDisruptionBudget,
    pub admin_secret: Secret,
    /// The scheduler-plugins PodGroup of each group (`scheduling.gang: PodGroup`), indexed by
    /// group like `group_services`.
    pub pod_groups: Vec<DynamicObject>,
}

impl Desired {
    /// The pod of node rank `rank` of group `group` (`pods` holds the groups one after the other).
    pub fn pod(&self, group: u32, rank: u32) -> Option<&Pod> {
        let groups = self.group_services.len().max(1);
        let nodes = self.pods.len() / groups;
        (rank < nodes as u32)
            .then(|| self.pods.get(group as usize * nodes + rank as usize))
            .flatten()
    }
}

/// The PodGroup kind of sigs.k8s.io/scheduler-plugins' coscheduling plugin.
pub fn pod_group_resource() -> ApiResource {
    ApiResource {
        group: "scheduling.x-k8s.io".into(),
        version: "v1alpha1".into(),
        api_version: "scheduling.x-k8s.io/v1alpha1".into(),
        kind: "PodGroup".into(),
        plural: "podgroups".into(),
    }
}

/// The name of group `group`'s gang: the PodGroup's, and Kueue's pod-group name
/// (`<name>-workers` for group 0, as before groups existed; `<name>-g<g>-workers` after).
pub fn pod_group_name(md: &MoEDeployment, group: u32) -> String {
    group_subdomain(md, group)
}

/// The prefix of group `group`'s object names: the deployment's name for group 0 (so a
/// deployment made before groups existed keeps its pods), `<name>-g<group>` for the others.
pub fn group_prefix(md: &MoEDeployment, group: u32) -> String {
    match group {
        0 => md.name_any(),
        g => format!("{}-g{g}", md.name_any()),
    }
}

/// Group `group`'s PodGroup: the whole group (`minMember` = nodes) or none, within
/// `scheduling.timeout` (`scheduleTimeoutSeconds`).
pub fn pod_group(
    md: &MoEDeployment,
    spec: &ValidSpec,
    group: u32,
) -> Result<DynamicObject, BuildError> {
    let name = pod_group_name(md, group);
    let mut pg = DynamicObject::new(&name, &pod_group_resource());
    pg.metadata = meta(md, name, "worker")?;
    pg.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(LABEL_GROUP.into(), group.to_string());
    pg.data = serde_json::json!({
        "spec": {
            "minMember": spec.nodes,
            "scheduleTimeoutSeconds": spec.gang.timeout.as_secs(),
        }
    });
    Ok(pg)
}

/// The gang schedulers' labels and annotations of a worker pod (`scheduling.gang`).
fn gang_metadata(
    md: &MoEDeployment,
    spec: &ValidSpec,
    group: u32,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut labels = BTreeMap::new();
    let mut annotations = BTreeMap::new();
    match spec.gang.gang {
        Gang::Kueue => {
            labels.insert(KUEUE_POD_GROUP_NAME.into(), pod_group_name(md, group));
            if let Some(q) = &spec.gang.queue_name {
                labels.insert(KUEUE_QUEUE_NAME.into(), q.clone());
            }
            annotations.insert(KUEUE_POD_GROUP_TOTAL_COUNT.into(), spec.nodes.to_string());
        }
        Gang::PodGroup => {
            labels.insert(POD_GROUP_LABEL.into(), pod_group_name(md, group));
        }
        Gang::None | Gang::Guard => {}
    }
    (labels, annotations)
}

pub fn plan_config_map_name(md: &MoEDeployment) -> String {
    format!("{}-plan", md.name_any())
}
/// Group 0's worker pod of node rank `rank`.
pub fn worker_pod_name(md: &MoEDeployment, rank: u32) -> String {
    group_pod_name(md, 0, rank)
}
/// `<name>-worker-<rank>` in group 0, `<name>-g<group>-worker-<rank>` in the others.
pub fn group_pod_name(md: &MoEDeployment, group: u32, rank: u32) -> String {
    format!("{}-worker-{rank}", group_prefix(md, group))
}
/// The Service of every worker of the deployment (and group 0's pods' DNS subdomain).
pub fn service_name(md: &MoEDeployment) -> String {
    format!("{}-workers", md.name_any())
}
/// The DNS subdomain of group `group`'s pods: the deployment's Service for group 0, its own
/// group Service for the others.
pub fn group_subdomain(md: &MoEDeployment, group: u32) -> String {
    format!("{}-workers", group_prefix(md, group))
}
/// Group `group`'s own Service: `<name>-g<group>-workers` (group 0's too: its pods keep the
/// deployment's Service as their subdomain, so that they survive the upgrade to groups).
pub fn group_service_name(md: &MoEDeployment, group: u32) -> String {
    format!("{}-g{group}-workers", md.name_any())
}
pub fn pdb_name(md: &MoEDeployment) -> String {
    format!("{}-workers", md.name_any())
}
pub fn admin_secret_name(md: &MoEDeployment) -> String {
    format!("{}-admin-token", md.name_any())
}

/// A fresh admin token: 32 random bytes, hex. Generated once, then read back from the Secret.
pub fn new_admin_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Labels shared by every owned object; the first three select the worker pods.
pub fn selector_labels(md: &MoEDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "moe-worker".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), md.name_any()),
        (LABEL_DEPLOYMENT.to_string(), md.name_any()),
    ])
}

fn common_labels(md: &MoEDeployment, component: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(md);
    l.insert("app.kubernetes.io/component".into(), component.into());
    l.insert("app.kubernetes.io/part-of".into(), "moe-operator".into());
    l.insert("app.kubernetes.io/managed-by".into(), "moe-operator".into());
    l
}

fn owner(md: &MoEDeployment) -> Result<OwnerReference, BuildError> {
    if md.meta().uid.is_none() {
        return Err(BuildError::MissingMetadata("metadata.uid"));
    }
    let mut r = md
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingMetadata("metadata.name"))?;
    // Foreground deletion of the MoEDeployment waits for its workers to go.
    r.block_owner_deletion = Some(true);
    Ok(r)
}

fn meta(md: &MoEDeployment, name: String, component: &str) -> Result<ObjectMeta, BuildError> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(
            md.namespace()
                .ok_or(BuildError::MissingMetadata("metadata.namespace"))?,
        ),
        labels: Some(common_labels(md, component)),
        owner_references: Some(vec![owner(md)?]),
        ..Default::default()
    })
}

/// Build every owned object. `admin_token` is the existing token (or a [`new_admin_token`]).
pub fn build(
    md: &MoEDeployment,
    spec: &ValidSpec,
    plan: &ExpertPlan,
    admin_token: &str,
) -> Result<Desired, BuildError> {
    check_plan(spec, plan)?;
    let groups = spec.replicas + spec.max_surge;
    let mut pods = Vec::with_capacity((groups * spec.nodes) as usize);
    for group in 0..groups {
        for rank in 0..spec.nodes {
            pods.push(group_worker_pod(md, spec, group, rank, &plan.hash)?);
        }
    }
    Ok(Desired {
        plan_config_map: plan_config_map(md, plan)?,
        pods,
        service: service(md, spec)?,
        group_services: (0..groups)
            .map(|g| group_service(md, spec, g))
            .collect::<Result<_, _>>()?,
        pdb: pdb(md, spec)?,
        admin_secret: admin_secret(md, admin_token)?,
        pod_groups: match spec.gang.gang {
            Gang::PodGroup => (0..groups)
                .map(|g| pod_group(md, spec, g))
                .collect::<Result<_, _>>()?,
            _ => Vec::new(),
        },
    })
}

/// The plan must fit the spec it is rolled onto.
pub fn check_plan(spec: &ValidSpec, plan: &ExpertPlan) -> Result<(), BuildError> {
    let spec_gpus = spec.topology.gpus as u64;
    if u64::from(plan.gpus) != spec_gpus || plan.nodes != spec.nodes {
        return Err(BuildError::TopologyMismatch {
            plan_gpus: plan.gpus,
            plan_nodes: plan.nodes,
            spec_gpus,
            spec_nodes: spec.nodes,
        });
    }
    if spec.shape != plan.model {
        return Err(BuildError::ModelMismatch);
    }
    if plan.hash.is_empty() {
        return Err(BuildError::UnsealedPlan);
    }
    Ok(())
}

/// `<name>-plan`: `plan.json` (the plan document) and `hash`.
/// The plan is compact JSON, or gzip in `binaryData` under the same key when the JSON would not fit
/// ([`crate::plan::packed`]); a plan too large even then is refused with the limit named.
pub fn plan_config_map(md: &MoEDeployment, plan: &ExpertPlan) -> Result<ConfigMap, BuildError> {
    // An engine deployment's layout goes beside the plan, out of the same 1 MiB.
    let layout = match &md.spec.engine {
        Some(e) => {
            let (file, report) = engines::export(e.kind.engine(), plan, None)
                .map_err(|e| BuildError::EngineLayout(e.to_string()))?;
            let json = serde_json::to_string(&file)
                .map_err(|e| BuildError::EngineLayout(e.to_string()))?;
            if json.len() >= packed::CONFIG_MAP_PLAN_MAX {
                return Err(BuildError::EngineLayout(format!(
                    "the layout is {} bytes of JSON, over the {} bytes the plan ConfigMap holds beside the plan: use fewer layers, experts or GPUs",
                    json.len(),
                    packed::CONFIG_MAP_PLAN_MAX
                )));
            }
            Some((json, report.redundant_experts))
        }
        None => None,
    };
    let room = packed::CONFIG_MAP_PLAN_MAX.saturating_sub(layout.as_ref().map_or(0, |l| l.0.len()));
    let packed = packed::pack(plan, room)?;
    let mut m = meta(md, plan_config_map_name(md), "plan")?;
    m.annotations = Some(BTreeMap::from([(
        ANNOTATION_PLAN_HASH.to_string(),
        plan.hash.clone(),
    )]));
    let mut data = BTreeMap::from([(HASH_KEY.to_string(), plan.hash.clone())]);
    if let Some((json, redundant)) = layout {
        data.insert(LAYOUT_KEY.to_string(), json);
        data.insert(REDUNDANT_EXPERTS_KEY.to_string(), redundant.to_string());
    }
    let mut binary_data = None;
    match packed {
        Packed::Json(json) => {
            data.insert(PLAN_KEY.to_string(), json);
        }
        Packed::Gzip(gz) => {
            binary_data = Some(BTreeMap::from([(PLAN_KEY.to_string(), ByteString(gz))]));
        }
    }
    Ok(ConfigMap {
        metadata: m,
        data: Some(data),
        binary_data,
        ..Default::default()
    })
}

/// The plan stored in a plan ConfigMap (as [`plan_config_map`] writes it), if it holds one.
pub fn stored_plan(cm: &ConfigMap) -> Option<Result<ExpertPlan, String>> {
    let bytes: &[u8] = match (&cm.data, &cm.binary_data) {
        (Some(d), _) if d.contains_key(PLAN_KEY) => d[PLAN_KEY].as_bytes(),
        (_, Some(b)) if b.contains_key(PLAN_KEY) => &b[PLAN_KEY].0,
        _ => return None,
    };
    Some(
        packed::unpack(bytes)
            .map_err(|e| e.to_string())
            .and_then(|json| {
                ExpertPlan::from_json_checked(&json, HashRule::Required).map_err(|e| e.to_string())
            }),
    )
}

/// `<name>-admin-token`: the bearer token of the workers' admin API.
pub fn admin_secret(md: &MoEDeployment, token: &str) -> Result<Secret, BuildError> {
    Ok(Secret {
        metadata: meta(md, admin_secret_name(md), "admin-token")?,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_string(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Default::default()
    })
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The spec's container resources with `nvidia.com/gpu` requested and limited to the node's GPUs.
fn gpu_resources(w: &WorkerSpec, gpus: &str) -> ResourceRequirements {
    let mut resources = w.resources.clone().unwrap_or_default();
    for map in [&mut resources.requests, &mut resources.limits] {
        map.get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.into(), Quantity(gpus.to_string()));
    }
    resources
}

/// `POD_IP` from the pod's status (the downward API).
fn pod_ip_env() -> EnvVar {
    EnvVar {
        name: "POD_IP".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "status.podIP".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: i32, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

/// `host:port` of rank 0's rendezvous listener: its pod's stable DNS name through the headless
/// Service (published before the pod is ready, so the group can form).
pub fn rendezvous_address(
    md: &MoEDeployment,
    spec: &ValidSpec,
    group: u32,
) -> Result<String, BuildError> {
    let ns = md
        .namespace()
        .ok_or(BuildError::MissingMetadata("metadata.namespace"))?;
    Ok(format!(
        "{}.{}.{ns}.svc:{}",
        group_pod_name(md, group, 0),
        group_subdomain(md, group),
        spec.data_plane.port
    ))
}

/// Group 0's worker pod of node rank `rank`, started on the plan with hash `plan_hash`.
pub fn worker_pod(
    md: &MoEDeployment,
    spec: &ValidSpec,
    rank: u32,
    plan_hash: &str,
) -> Result<Pod, BuildError> {
    group_worker_pod(md, spec, 0, rank, plan_hash)
}

/// The worker pod of node rank `rank` of EP group `group`, started on the plan with hash
/// `plan_hash`. Groups differ only in their names, DNS subdomain, rendezvous and gang: group 0's
/// pod spec is the one a deployment had before groups existed.
pub fn group_worker_pod(
    md: &MoEDeployment,
    spec: &ValidSpec,
    group: u32,
    rank: u32,
    plan_hash: &str,
) -> Result<Pod, BuildError> {
    let name = group_pod_name(md, group, rank);
    let (volumes, mounts) = volumes(md, spec);
    let (container, component) = match &spec.engine {
        Some(e) => (
            engine_container(
                md,
                spec,
                e,
                rank,
                &engine_init_address(md, e, group)?,
                mounts,
            ),
            "engine",
        ),
        None => {
            let rendezvous = rendezvous_address(md, spec, group)?;
            (
                worker_container(md, spec, rank, &rendezvous, mounts),
                "worker",
            )
        }
    };
    let mut pod_spec = pod_spec(md, &name, &group_subdomain(md, group), container, volumes);
    pod_spec.init_containers = fetch_container(md, spec).map(|c| vec![c]);
    let mut m = meta(md, name, component)?;
    let labels = m.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(LABEL_NODE_RANK.into(), rank.to_string());
    labels.insert(LABEL_GROUP.into(), group.to_string());
    if process_backed(md) {
        m.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(LABEL_PROCESS_BACKED.into(), "true".into());
    }
    // The spec's labels and annotations beside ours (validation refused any key we own); they are
    // part of the spec hash, so changing them replaces the pods like any other pod field.
    let w = &md.spec.worker;
    // The gang schedulers' keys likewise: a pod must carry them from its creation on.
    let (mut shaped_labels, mut shaped_annotations) = gang_metadata(md, spec, group);
    shaped_labels.extend(w.pod_labels.clone());
    shaped_annotations.extend(w.pod_annotations.clone());
    let labels = m.labels.get_or_insert_with(BTreeMap::new);
    for (k, v) in &shaped_labels {
        labels.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let mut annotations = shaped_annotations.clone();
    annotations.insert(ANNOTATION_PLAN_HASH.to_string(), plan_hash.to_string());
    annotations.insert(
        ANNOTATION_SPEC_HASH.to_string(),
        shaped_spec_hash(&pod_spec, &shaped_labels, &shaped_annotations),
    );
    m.annotations = Some(annotations);
    Ok(Pod {
        metadata: m,
        spec: Some(pod_spec),
        status: None,
    })
}

/// `host:port` of rank 0's distributed init for an engine (`$(MOE_DIST_INIT_ADDR)`), through the
/// headless Service like the workers' rendezvous.
fn engine_init_address(
    md: &MoEDeployment,
    e: &ValidEngine,
    group: u32,
) -> Result<String, BuildError> {
    let ns = md
        .namespace()
        .ok_or(BuildError::MissingMetadata("metadata.namespace"))?;
    Ok(format!(
        "{}.{}.{ns}.svc:{}",
        group_pod_name(md, group, 0),
        group_subdomain(md, group),
        e.dist_init_port
    ))
}

/// The flags that start an engine on the mounted layout. The values come from the environment
/// (`$(VAR)`), the redundant-expert count from the plan ConfigMap, so the pod spec does not
/// change with the plan.
fn engine_layout_args(kind: Engine) -> Vec<String> {
    match kind {
        Engine::Sglang => vec![
            "--init-expert-location".into(),
            "$(MOE_LAYOUT_FILE)".into(),
            "--ep-num-redundant-experts".into(),
            "$(MOE_REDUNDANT_EXPERTS)".into(),
        ],
        Engine::Vllm => vec![
            "--eplb-config".into(),
            r#"{"initial_expert_map_path": "$(MOE_LAYOUT_FILE)", "num_redundant_experts": $(MOE_REDUNDANT_EXPERTS)}"#.into(),
        ],
    }
}

/// An engine pod's container (`spec.engine`): the spec's command and arguments with the layout
/// flags appended, the rank environment for multi-node flags, the GPUs, the HTTP port's probes.
fn engine_container(
    md: &MoEDeployment,
    vspec: &ValidSpec,
    e: &ValidEngine,
    rank: u32,
    init_address: &str,
    mounts: Vec<VolumeMount>,
) -> Container {
    let spec = &md.spec;
    let w = &spec.worker;
    let gpus = spec.topology.gpus_per_node.to_string();
    let mut envs = vec![
        pod_ip_env(),
        env("MOE_NODE_RANK", rank.to_string()),
        env("MOE_NODES", spec.topology.nodes.to_string()),
        env("MOE_GPUS_PER_NODE", gpus.clone()),
        env(
            "MOE_EP_SIZE",
            (u64::from(vspec.nodes) * u64::from(vspec.gpus_per_node)).to_string(),
        ),
        env("MOE_DIST_INIT_ADDR", init_address),
        env("MOE_LAYOUT_FILE", format!("{PLAN_DIR}/{LAYOUT_KEY}")),
        EnvVar {
            name: "MOE_REDUNDANT_EXPERTS".into(),
            value_from: Some(EnvVarSource {
                config_map_key_ref: Some(ConfigMapKeySelector {
                    name: plan_config_map_name(md),
                    key: REDUNDANT_EXPERTS_KEY.into(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        env("MOE_CHECKPOINT_DIR", spec.model.checkpoint.path.clone()),
    ];
    envs.extend(w.env.iter().cloned());
    let mut args = e.args.clone();
    args.extend(engine_layout_args(e.kind));

    let resources = gpu_resources(w, &gpus);
    let port = |name: &str, n: u16| ContainerPort {
        name: Some(name.into()),
        container_port: n.into(),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let http = i32::from(e.port);
    Container {
        name: CONTAINER.into(),
        image: Some(w.image.clone()),
        image_pull_policy: w.image_pull_policy.map(|p| p.as_str().to_string()),
        command: (!e.command.is_empty()).then(|| e.command.clone()),
        args: Some(args),
        env: Some(envs),
        ports: Some(vec![
            port(ENGINE_HTTP_PORT, e.port),
            port(ENGINE_DIST_INIT_PORT, e.dist_init_port),
        ]),
        resources: Some(resources),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        // Engines load the checkpoint and capture CUDA graphs before they answer: up to an hour.
        startup_probe: Some(http_probe(&e.health_path, http, 10, 360)),
        liveness_probe: Some(http_probe(&e.health_path, http, 10, 3)),
        readiness_probe: Some(http_probe(&e.health_path, http, 5, 1)),
        security_context: Some(container_security(vspec, w.security_context.as_ref())),
        ..Default::default()
    }
}

/// The worker container's ports. With an EP group, local rank `i` of a node listens at
/// `dataPlane.port + i`; ranks past the first get the named ports `ep-1`, `ep-2`, ..., so that the
/// chart's NetworkPolicy (which admits them by name) lets peers reach every rank.
fn worker_ports<P>(spec: &ValidSpec, port: impl Fn(&str, i32) -> P) -> Vec<P> {
    let p = &spec.ports;
    let ep = i32::from(spec.data_plane.port);
    let mut out = vec![
        port("dispatch", p.dispatch.into()),
        port("metrics", p.metrics.into()),
        port("admin", p.admin.into()),
        port("ep", ep),
    ];
    if spec.data_plane.transport != crate::api::Transport::None {
        for i in 1..spec.gpus_per_node {
            out.push(port(&format!("ep-{i}"), ep + i as i32));
        }
    }
    out
}

/// The data plane's environment of docs/data-plane.md ("Rank environment"); `$(POD_IP)` refers
/// to the variable defined before it.
fn data_plane_env(spec: &ValidSpec, rendezvous: &str) -> Vec<EnvVar> {
    let d = &spec.data_plane;
    if d.transport == crate::api::Transport::None {
        // No group: the worker starts no ranks without MOE_EP_WORLD_SIZE.
        return Vec::new();
    }
    let timeout_s = d.rendezvous_timeout.as_secs_f64().ceil() as u64;
    let mut envs = vec![
        env(
            "MOE_EP_WORLD_SIZE",
            (u64::from(spec.nodes) * u64::from(spec.gpus_per_node)).to_string(),
        ),
        env("MOE_EP_RENDEZVOUS", rendezvous),
        env("MOE_EP_LISTEN", format!("$(POD_IP):{}", d.port)),
        env("MOE_EP_TRANSPORT", d.transport.as_str()),
        env("MOE_EP_RENDEZVOUS_TIMEOUT_SECONDS", timeout_s.to_string()),
    ];
    envs.extend(d.nccl_env.iter().map(|(k, v)| env(k, v.as_str())));
    envs
}

/// The worker container: the rank's environment, the `moe-worker` command line, the GPUs, the
/// probes on the metrics port, the data plane's port and termination message.
fn worker_container(
    md: &MoEDeployment,
    vspec: &ValidSpec,
    rank: u32,
    rendezvous: &str,
    mounts: Vec<VolumeMount>,
) -> Container {
    let spec = &md.spec;
    let w = &spec.worker;
    let gpus = spec.topology.gpus_per_node.to_string();
    let plan_file = format!("{PLAN_DIR}/{PLAN_KEY}");
    let token_file = format!("{ADMIN_DIR}/{TOKEN_KEY}");
    let ckpt = spec.model.checkpoint.path.clone();

    let mut envs = vec![
        pod_ip_env(),
        env("MOE_NODE_RANK", rank.to_string()),
        env("MOE_NODES", spec.topology.nodes.to_string()),
        env("MOE_GPUS_PER_NODE", gpus.clone()),
        env("MOE_PLAN_FILE", plan_file),
        env("MOE_CHECKPOINT_DIR", ckpt),
        env("MOE_ADMIN_TOKEN_FILE", token_file),
        env("MOE_DEVICE", w.device.as_str()),
    ];
    envs.extend(data_plane_env(vspec, rendezvous));
    envs.extend(w.env.iter().cloned());

    let p = &w.ports;
    let args: Vec<String> = [
        "--plan",
        "$(MOE_PLAN_FILE)",
        "--checkpoint",
        "$(MOE_CHECKPOINT_DIR)",
        "--node",
        "$(MOE_NODE_RANK)",
        "--gpus-per-node",
        "$(MOE_GPUS_PER_NODE)",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--listen".into(),
        format!("$(POD_IP):{}", p.dispatch),
        "--metrics-listen".into(),
        format!("$(POD_IP):{}", p.metrics),
        "--admin-listen".into(),
        format!("$(POD_IP):{}", p.admin),
        "--admin-token-file".into(),
        "$(MOE_ADMIN_TOKEN_FILE)".into(),
        "--device".into(),
        w.device.as_str().into(),
    ])
    .collect();

    let resources = gpu_resources(w, &gpus);

    let port = |name: &str, n: i32| ContainerPort {
        name: Some(name.into()),
        container_port: n,
        protocol: Some("TCP".into()),
        ..Default::default()
    };

    Container {
        name: CONTAINER.into(),
        image: Some(w.image.clone()),
        image_pull_policy: w.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec!["moe-worker".into()]),
        args: Some(args),
        env: Some(envs),
        ports: Some(worker_ports(vspec, |name, n| port(name, n))),
        resources: Some(resources),
        volume_mounts: Some(mounts),
        // A rank that fails writes `ep rank <r>: ...` to /dev/termination-log, which the operator
        // reads back from the container's status (`controller::ranks`); a crash that wrote
        // nothing leaves the log's tail there instead.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        // Loading a large checkpoint takes minutes: the startup probe allows up to an hour
        // before liveness takes over.
        startup_probe: Some(http_probe(HEALTHZ_PATH, p.metrics, 10, 360)),
        liveness_probe: Some(http_probe(HEALTHZ_PATH, p.metrics, 10, 3)),
        readiness_probe: Some(http_probe(READYZ_PATH, p.metrics, 5, 1)),
        security_context: Some(container_security(vspec, w.security_context.as_ref())),
        ..Default::default()
    }
}

/// The init container of `model.checkpoint.s3`: `moe-worker fetch-weights` from the worker
/// image, writing the checkpoint volume (read-only to the worker) before the worker starts, with
/// the credentials Secret mounted here only. Its failure message (`fetch-weights: s3://...: ...`)
/// is the container's termination message, which `controller::weights` reports.
fn fetch_container(md: &MoEDeployment, vspec: &ValidSpec) -> Option<Container> {
    let s3 = md.spec.model.checkpoint.s3.as_ref()?;
    let w = &md.spec.worker;
    let mut args: Vec<String> = vec![
        "fetch-weights".into(),
        "--endpoint".into(),
        s3.endpoint(),
        "--region".into(),
        s3.region().into(),
        "--bucket".into(),
        s3.bucket.clone(),
        "--prefix".into(),
        s3.prefix.clone(),
        "--path-style".into(),
        s3.path_style().to_string(),
        "--dest".into(),
        md.spec.model.checkpoint.path.clone(),
    ];
    let mut mounts = vec![VolumeMount {
        name: VOLUME_CHECKPOINT.into(),
        mount_path: md.spec.model.checkpoint.path.clone(),
        ..Default::default()
    }];
    if let Some(secret) = &s3.credentials_secret {
        args.extend([
            "--credentials-dir".into(),
            S3_CREDENTIALS_DIR.into(),
            "--credentials-secret".into(),
            secret.clone(),
        ]);
        mounts.push(VolumeMount {
            name: VOLUME_S3_CREDENTIALS.into(),
            mount_path: S3_CREDENTIALS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let user = w.security_context.as_ref();
    Some(Container {
        name: FETCH_CONTAINER.into(),
        image: Some(w.image.clone()),
        image_pull_policy: w.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec!["moe-worker".into()]),
        args: Some(args),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        // Like the worker's, without any capability: it only reads the network and writes files.
        security_context: Some(SecurityContext {
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..container_security(vspec, user)
        }),
        ..Default::default()
    })
}

/// The container's security context: no privilege escalation and every capability dropped, then
/// IPC_LOCK (`dataPlane.ipcLock`) and the spec's own additions (`worker.securityContext`, allowed
/// by the pod policy) added back.
fn container_security(vspec: &ValidSpec, user: Option<&WorkerSecurityContext>) -> SecurityContext {
    let mut add: Vec<String> = vspec
        .data_plane
        .ipc_lock
        .then(|| IPC_LOCK.to_string())
        .into_iter()
        .collect();
    add.extend(
        user.and_then(|u| u.capabilities.as_ref())
            .into_iter()
            .flat_map(|c| c.add.iter().cloned()),
    );
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: (!add.is_empty()).then_some(add),
        }),
        run_as_user: user.and_then(|u| u.run_as_user),
        run_as_group: user.and_then(|u| u.run_as_group),
        read_only_root_filesystem: user.and_then(|u| u.read_only_root_filesystem),
        ..Default::default()
    }
}

/// The plan ConfigMap, the admin token Secret, the shared memory and the checkpoint volume, with
/// their mounts, then the spec's own.
fn volumes(md: &MoEDeployment, spec: &ValidSpec) -> (Vec<Volume>, Vec<VolumeMount>) {
    let ckpt = md.spec.model.checkpoint.path.clone();
    let engine = spec.engine.is_some();
    // An engine reads its layout; moe-worker reads the plan.
    let item = |key: &str| KeyToPath {
        key: key.into(),
        path: key.into(),
        ..Default::default()
    };
    let mut volumes = vec![
        Volume {
            name: VOLUME_PLAN.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: plan_config_map_name(md),
                items: Some(if engine {
                    vec![item(LAYOUT_KEY), item(PLAN_KEY)]
                } else {
                    vec![item(PLAN_KEY)]
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: VOLUME_ADMIN_TOKEN.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(admin_secret_name(md)),
                default_mode: Some(0o400),
                ..Default::default()
            }),
            ..Default::default()
        },
        // The container runtime's /dev/shm is 64 MiB; the ranks' host-side buffers and NCCL's
        // shared-memory transport need more. Memory-backed, so it counts against the pod's memory.
        Volume {
            name: VOLUME_SHM.into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity(spec.data_plane.shm_size.clone())),
            }),
            ..Default::default()
        },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: VOLUME_PLAN.into(),
            mount_path: PLAN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: VOLUME_ADMIN_TOKEN.into(),
            mount_path: ADMIN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: VOLUME_SHM.into(),
            mount_path: SHM_DIR.into(),
            ..Default::default()
        },
    ];
    if engine {
        // The engine has no admin API: no token in its pods.
        volumes.retain(|v| v.name != VOLUME_ADMIN_TOKEN);
        mounts.retain(|m| m.name != VOLUME_ADMIN_TOKEN);
    }
    let checkpoint = &md.spec.model.checkpoint;
    let ckpt_volume = match (&checkpoint.volume, &checkpoint.s3) {
        (Some(v), _) => Some(Volume {
            name: VOLUME_CHECKPOINT.into(),
            persistent_volume_claim: v.persistent_volume_claim.clone(),
            host_path: v.host_path.clone(),
            ..Default::default()
        }),
        // An S3 checkpoint without a cache volume: fetched into the pod's own emptyDir.
        (None, Some(_)) => Some(Volume {
            name: VOLUME_CHECKPOINT.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        }),
        (None, None) => None,
    };
    if let Some(v) = ckpt_volume {
        volumes.push(v);
        mounts.push(VolumeMount {
            name: VOLUME_CHECKPOINT.into(),
            mount_path: ckpt,
            read_only: Some(true),
            ..Default::default()
        });
    }
    // The S3 credentials: a volume of the pod, mounted by the fetch-weights init container only
    // (`fetch_container`), never by the worker.
    if let Some(secret) = checkpoint
        .s3
        .as_ref()
        .and_then(|s| s.credentials_secret.clone())
    {
        volumes.push(Volume {
            name: VOLUME_S3_CREDENTIALS.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret),
                default_mode: Some(0o400),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    // The spec's own volumes and mounts, after ours: validation refused any that reuse our names
    // or paths.
    let w = &md.spec.worker;
    volumes.extend(w.volumes.iter().map(|v| Volume {
        name: v.name.clone(),
        config_map: v.config_map.clone(),
        secret: v.secret.clone(),
        persistent_volume_claim: v.persistent_volume_claim.clone(),
        empty_dir: v.empty_dir.clone(),
        host_path: v.host_path.clone(),
        ..Default::default()
    }));
    mounts.extend(w.volume_mounts.iter().map(|m| VolumeMount {
        name: m.name.clone(),
        mount_path: m.mount_path.clone(),
        read_only: m.read_only,
        sub_path: m.sub_path.clone(),
        ..Default::default()
    }));

    (volumes, mounts)
}

/// The pod spec around the container: scheduling (one worker per node, GPU tolerations), a
/// stable DNS name per rank, and a locked-down security context.
fn pod_spec(
    md: &MoEDeployment,
    name: &str,
    subdomain: &str,
    container: Container,
    volumes: Vec<Volume>,
) -> PodSpec {
    let w = &md.spec.worker;
    let mut tolerations = vec![Toleration {
        key: Some(GPU_RESOURCE.into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    }];
    tolerations.extend(w.tolerations.iter().cloned());

    PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        tolerations: Some(tolerations),
        node_selector: (!w.node_selector.is_empty()).then(|| w.node_selector.clone()),
        service_account_name: w.service_account_name.clone(),
        // The worker never calls the API server: no token in its pods unless a ServiceAccount
        // was chosen on purpose (and allowed by the pod policy).
        automount_service_account_token: w.service_account_name.is_none().then_some(false),
        priority_class_name: w.priority_class_name.clone(),
        // Stable DNS per rank: <name>-worker-<n>.<name>-workers.<namespace>.svc (group 0),
        // <name>-g<g>-worker-<n>.<name>-g<g>-workers.<namespace>.svc (group g).
        hostname: Some(name.to_string()),
        subdomain: Some(subdomain.to_string()),
        restart_policy: Some("Always".into()),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(30),
        affinity: Some(affinity(md)),
        topology_spread_constraints: (!w.topology_spread_constraints.is_empty())
            .then(|| w.topology_spread_constraints.clone()),
        image_pull_secrets: (!w.image_pull_secrets.is_empty())
            .then(|| w.image_pull_secrets.clone()),
        scheduler_name: w.scheduler_name.clone(),
        runtime_class_name: w.runtime_class_name.clone(),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The spec's affinity with the operator's rule added: one worker per node (each pod takes all the
/// GPUs of its node that the spec asks for), a required pod anti-affinity that is always kept.
fn affinity(md: &MoEDeployment) -> Affinity {
    let ours = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                LABEL_DEPLOYMENT.to_string(),
                md.name_any(),
            )])),
            ..Default::default()
        }),
        topology_key: "kubernetes.io/hostname".into(),
        ..Default::default()
    };
    let mut a = md.spec.worker.affinity.clone().unwrap_or_default();
    let anti = a
        .pod_anti_affinity
        .get_or_insert_with(PodAntiAffinity::default);
    let required = anti
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(Vec::new);
    if !required.contains(&ours) {
        required.insert(0, ours);
    }
    a
}

/// Whether the deployment asks for process-backed worker pods (the e2e test hook).
pub fn process_backed(md: &MoEDeployment) -> bool {
    md.annotations()
        .get(ANNOTATION_PROCESS_BACKED)
        .is_some_and(|v| v == "true")
}

/// SHA-256 (first 16 hex digits) of a pod spec's JSON. Pod specs are immutable in the fields we
/// set, so a changed hash means the pod must be replaced (a Recreate rollout).
pub fn spec_hash(spec: &PodSpec) -> String {
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))[..16].to_string()
}

/// [`spec_hash`] of the pod spec, with the spec's own pod labels and annotations folded in when
/// there are any (so a pod without them keeps the hash it had before they existed).
fn shaped_spec_hash(
    spec: &PodSpec,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> String {
    if labels.is_empty() && annotations.is_empty() {
        return spec_hash(spec);
    }
    let bytes = serde_json::to_vec(&(spec, labels, annotations)).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))[..16].to_string()
}

/// Headless Service giving each worker a stable DNS name; not-ready workers are published too,
/// because every EP rank must be addressable while the group starts (rank 0's rendezvous name
/// resolves before any worker is ready).
pub fn service(md: &MoEDeployment, spec: &ValidSpec) -> Result<Service, BuildError> {
    let mut s = headless_service(md, spec, service_name(md), selector_labels(md))?;
    s.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(LABEL_SERVICE_SCOPE.into(), "deployment".into());
    Ok(s)
}

/// Group `group`'s headless Service: its workers only, labelled with the group so that a router
/// finds the groups by listing `moe.craft.dev/deployment=<name>,moe.craft.dev/service-scope=group`.
pub fn group_service(
    md: &MoEDeployment,
    spec: &ValidSpec,
    group: u32,
) -> Result<Service, BuildError> {
    let mut selector = selector_labels(md);
    selector.insert(LABEL_GROUP.into(), group.to_string());
    let mut s = headless_service(md, spec, group_service_name(md, group), selector)?;
    let labels = s.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(LABEL_SERVICE_SCOPE.into(), "group".into());
    labels.insert(LABEL_GROUP.into(), group.to_string());
    Ok(s)
}

fn headless_service(
    md: &MoEDeployment,
    spec: &ValidSpec,
    name: String,
    selector: BTreeMap<String, String>,
) -> Result<Service, BuildError> {
    let p = &spec.ports;
    let port = |name: &str, n: u16| ServicePort {
        name: Some(name.into()),
        port: n.into(),
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    Ok(Service {
        metadata: meta(md, name, "worker")?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector),
            publish_not_ready_addresses: Some(true),
            ports: Some(match &spec.engine {
                Some(e) => vec![
                    port(ENGINE_HTTP_PORT, e.port),
                    port(ENGINE_DIST_INIT_PORT, e.dist_init_port),
                ],
                None => vec![
                    port("dispatch", p.dispatch),
                    port("metrics", p.metrics),
                    port("admin", p.admin),
                    port("ep", spec.data_plane.port),
                ],
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// PodDisruptionBudget for the workers. Bare pods owned by a custom resource without a scale
/// subresource only support an integer `minAvailable` (the disruption controller cannot resolve
/// `maxUnavailable` for them), so `rollout.maxUnavailable` is expressed as
/// `minAvailable = replicas x nodes - maxUnavailable` (the workers of every group, less the
/// workers one group may have off the serving path).
pub fn pdb(md: &MoEDeployment, spec: &ValidSpec) -> Result<PodDisruptionBudget, BuildError> {
    let min_available = (spec.replicas * spec.nodes)
        .saturating_sub(spec.max_unavailable.clamp(1, spec.nodes.max(1)));
    let min_available = i32::try_from(min_available).unwrap_or(i32::MAX);
    Ok(PodDisruptionBudget {
        metadata: meta(md, pdb_name(md), "worker")?,
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(min_available)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(md)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CheckpointVolume, MoEDeploymentSpec, RolloutStrategy, WorkerDevice};
    use crate::plan::{Algorithm, LayerPlan};
    use k8s_openapi::api::core::v1::PersistentVolumeClaimVolumeSource;
    use k8s_openapi::api::core::v1::ResourceRequirements;

    fn deployment() -> MoEDeployment {
        let spec: MoEDeploymentSpec = serde_yaml::from_str(
            r#"
model:
  layers: 2
  firstMoeLayer: 1
  experts: 8
  topK: 2
  hiddenSize: 64
  expertIntermediateSize: 32
  checkpoint: {path: /models/tiny}
topology: {nodes: 2, gpusPerNode: 2}
rollout: {maxUnavailable: 1}
worker:
  image: moe-worker:dev
  env: [{name: RUST_LOG, value: debug}]
  nodeSelector: {gpu: h200}
"#,
        )
        .unwrap();
        let mut md = MoEDeployment::new("demo", spec);
        md.metadata.namespace = Some("ml".into());
        md.metadata.uid = Some("uid-1".into());
        md
    }

    fn plan(md: &MoEDeployment) -> ExpertPlan {
        let model = md.spec.model.shape().unwrap();
        let gpus = 4u32;
        ExpertPlan {
            format_version: crate::plan::expert_plan::PLAN_FORMAT_VERSION,
            algorithm: Algorithm::None,
            bytes_per_expert: model.bytes_per_expert(),
            model,
            gpus,
            nodes: 2,
            replicas_per_gpu: 0,
            replica_bytes_per_gpu: 0,
            layers: vec![LayerPlan {
                layer: 1,
                slots: (0..gpus).map(|g| vec![2 * g, 2 * g + 1]).collect(),
                shares: vec![vec![1.0, 1.0]; gpus as usize],
            }],
            stats: None,
            transition: None,
            hash: String::new(),
        }
        .seal()
    }

    fn valid(md: &MoEDeployment) -> ValidSpec {
        valid_with(md, false)
    }

    fn valid_with(md: &MoEDeployment, allow_ipc_lock: bool) -> ValidSpec {
        let policy = crate::api::pod_policy::PodPolicy {
            allow_ipc_lock,
            ..Default::default()
        };
        crate::api::validate::validate(&md.spec, &policy).unwrap()
    }

    fn container(p: &Pod) -> &Container {
        &p.spec.as_ref().unwrap().containers[0]
    }

    fn env_of(p: &Pod, name: &str) -> Option<String> {
        container(p)
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    /// The container every rank gets: GPUs, the command line, the probes and ports.
    fn assert_worker_container(c: &Container) {
        let res = c.resources.as_ref().unwrap();
        assert_eq!(
            res.requests.as_ref().unwrap()[GPU_RESOURCE],
            Quantity("2".into())
        );
        assert_eq!(
            res.limits.as_ref().unwrap()[GPU_RESOURCE],
            Quantity("2".into())
        );
        let args = c.args.as_ref().unwrap().join(" ");
        assert!(args.starts_with("--plan $(MOE_PLAN_FILE) --checkpoint $(MOE_CHECKPOINT_DIR) --node $(MOE_NODE_RANK) --gpus-per-node $(MOE_GPUS_PER_NODE)"), "{args}");
        assert!(
            args.contains("--listen $(POD_IP):9400 --metrics-listen $(POD_IP):9401 --admin-listen $(POD_IP):9402")
                && args.ends_with("--device cuda"),
            "{args}"
        );
        let pod_ip = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "POD_IP")
            .unwrap();
        assert_eq!(
            pod_ip
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "status.podIP"
        );
        for probe in [&c.readiness_probe, &c.liveness_probe, &c.startup_probe] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.port, IntOrString::Int(9401));
        }
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/readyz")
        );
        let ports: Vec<_> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.clone().unwrap(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [
                ("dispatch".into(), 9400),
                ("metrics".into(), 9401),
                ("admin".into(), 9402),
                ("ep".into(), 9403)
            ]
        );
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
    }

    /// Group 0 is the deployment as it was before groups: the same names, DNS and pod spec hash
    /// (so an upgrade restarts nothing); the other groups have their own names, DNS subdomain,
    /// rendezvous and Service, and the deployment's Service selects every group.
    #[test]
    fn groups_have_their_own_names_and_rendezvous_and_group_0_is_unchanged() {
        let mut md = deployment();
        md.spec.data_plane.transport = crate::api::Transport::Tcp;
        let plan = plan(&md);
        let one = build(&md, &valid(&md), &plan, "tok").unwrap();
        let mut md3 = md.clone();
        md3.spec.replicas = 3;
        md3.spec.rollout.max_surge = 1;
        let three = build(&md3, &valid(&md3), &plan, "tok").unwrap();
        assert_eq!(three.pods.len(), 8, "3 groups + 1 surge group of 2");
        assert_eq!(three.group_services.len(), 4);
        for rank in 0..2 {
            let (a, b) = (&one.pods[rank], &three.pods[rank]);
            assert_eq!(a.spec, b.spec, "group 0's pod spec does not change");
            assert_eq!(
                a.annotations()[ANNOTATION_SPEC_HASH],
                b.annotations()[ANNOTATION_SPEC_HASH]
            );
            assert_eq!(b.labels()[LABEL_GROUP], "0");
        }
        let g2 = three.pod(2, 1).unwrap();
        assert_eq!(g2.name_any(), "demo-g2-worker-1");
        assert_eq!(g2.labels()[LABEL_GROUP], "2");
        assert_eq!(g2.labels()[LABEL_NODE_RANK], "1");
        let ps = g2.spec.as_ref().unwrap();
        assert_eq!(ps.hostname.as_deref(), Some("demo-g2-worker-1"));
        assert_eq!(ps.subdomain.as_deref(), Some("demo-g2-workers"));
        assert_eq!(
            env_of(g2, "MOE_EP_RENDEZVOUS").as_deref(),
            Some("demo-g2-worker-0.demo-g2-workers.ml.svc:9403")
        );
        assert_ne!(
            g2.annotations()[ANNOTATION_SPEC_HASH],
            three.pods[1].annotations()[ANNOTATION_SPEC_HASH]
        );
        assert!(three.pod(4, 0).is_none() && three.pod(0, 2).is_none());
        // The Services: one for every worker, one per group, told apart by labels.
        let all = &three.service;
        assert_eq!(all.name_any(), "demo-workers");
        assert_eq!(all.labels()[LABEL_SERVICE_SCOPE], "deployment");
        assert!(!all
            .spec
            .as_ref()
            .unwrap()
            .selector
            .as_ref()
            .unwrap()
            .contains_key(LABEL_GROUP));
        for (g, s) in three.group_services.iter().enumerate() {
            assert_eq!(s.name_any(), format!("demo-g{g}-workers"));
            assert_eq!(s.labels()[LABEL_SERVICE_SCOPE], "group");
            assert_eq!(s.labels()[LABEL_GROUP], g.to_string());
            assert_eq!(
                s.spec.as_ref().unwrap().selector.as_ref().unwrap()[LABEL_GROUP],
                g.to_string()
            );
        }
        // The disruption budget counts every serving group's workers.
        let pdb = three.pdb.spec.unwrap();
        assert_eq!(pdb.min_available, Some(IntOrString::Int(5)));
    }

    #[test]
    fn one_pod_per_node_with_rank_env_gpus_and_owner() {
        let md = deployment();
        let plan = plan(&md);
        plan.check().unwrap();
        let d = build(&md, &valid(&md), &plan, "tok").unwrap();
        assert_eq!(d.pods.len(), 2);
        for (rank, pod) in d.pods.iter().enumerate() {
            assert_eq!(
                pod.metadata.name.as_deref(),
                Some(format!("demo-worker-{rank}").as_str())
            );
            assert_eq!(pod.metadata.namespace.as_deref(), Some("ml"));
            let labels = pod.metadata.labels.as_ref().unwrap();
            assert_eq!(labels[LABEL_DEPLOYMENT], "demo");
            assert_eq!(labels[LABEL_NODE_RANK], rank.to_string());
            assert_eq!(labels["app.kubernetes.io/managed-by"], "moe-operator");
            assert_eq!(
                pod.metadata.annotations.as_ref().unwrap()[ANNOTATION_PLAN_HASH],
                plan.hash
            );
            assert_eq!(env_of(pod, "MOE_NODE_RANK"), Some(rank.to_string()));
            assert_eq!(env_of(pod, "MOE_GPUS_PER_NODE").as_deref(), Some("2"));
            assert_eq!(env_of(pod, "MOE_NODES").as_deref(), Some("2"));
            assert_eq!(
                env_of(pod, "MOE_PLAN_FILE").as_deref(),
                Some("/etc/moe/plan/plan.json")
            );
            assert_eq!(
                env_of(pod, "MOE_CHECKPOINT_DIR").as_deref(),
                Some("/models/tiny")
            );
            assert_eq!(
                env_of(pod, "MOE_ADMIN_TOKEN_FILE").as_deref(),
                Some("/etc/moe/admin/token")
            );
            assert_eq!(env_of(pod, "RUST_LOG").as_deref(), Some("debug"));
            let c = container(pod);
            assert_worker_container(c);
            assert!(!labels.contains_key(LABEL_PROCESS_BACKED));
            let spec = pod.spec.as_ref().unwrap();
            assert!(spec
                .tolerations
                .as_ref()
                .unwrap()
                .iter()
                .any(|t| t.key.as_deref() == Some(GPU_RESOURCE)));
            assert_eq!(spec.node_selector.as_ref().unwrap()["gpu"], "h200");
            assert_eq!(spec.subdomain.as_deref(), Some("demo-workers"));
            let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
                ("MoEDeployment", "demo", "uid-1")
            );
            assert_eq!(owner.controller, Some(true));
        }
        // Same spec on every rank except the rank itself, so spec hashes differ per pod.
        let h: Vec<_> = d
            .pods
            .iter()
            .map(|p| p.metadata.annotations.as_ref().unwrap()[ANNOTATION_SPEC_HASH].clone())
            .collect();
        assert_ne!(h[0], h[1]);
    }

    /// Without `dataPlane.transport` the workers form no EP group: none of its variables.
    #[test]
    fn no_group_by_default() {
        let md = deployment();
        let pod = worker_pod(&md, &valid(&md), 1, "h").unwrap();
        for name in [
            "MOE_EP_WORLD_SIZE",
            "MOE_EP_RENDEZVOUS",
            "MOE_EP_LISTEN",
            "MOE_EP_TRANSPORT",
        ] {
            assert_eq!(env_of(&pod, name), None, "{name}");
        }
        // No group, no rank ports past the first.
        assert!(container(&pod)
            .ports
            .iter()
            .flatten()
            .all(|p| p.name.as_deref() != Some("ep-1")));
    }

    /// docs/data-plane.md's rank environment, the `ep` port on the pod and the Service, the
    /// memory-backed /dev/shm, and IPC_LOCK only when asked for.
    #[test]
    fn every_pod_gets_the_data_plane_of_docs_data_plane_md() {
        let mut md = deployment();
        md.spec.data_plane = serde_yaml::from_str(
            "{transport: nccl, port: 29500, rendezvousTimeout: 90.5s, shmSize: 8Gi, \
             ncclEnv: {NCCL_IB_HCA: mlx5, NCCL_DEBUG: WARN}}",
        )
        .unwrap();
        let d = build(&md, &valid(&md), &plan(&md), "t").unwrap();
        for (node, pod) in d.pods.iter().enumerate() {
            for (name, want) in [
                ("MOE_EP_WORLD_SIZE", "4"),
                (
                    "MOE_EP_RENDEZVOUS",
                    "demo-worker-0.demo-workers.ml.svc:29500",
                ),
                ("MOE_EP_LISTEN", "$(POD_IP):29500"),
                ("MOE_EP_TRANSPORT", "nccl"),
                ("MOE_EP_RENDEZVOUS_TIMEOUT_SECONDS", "91"),
                ("NCCL_IB_HCA", "mlx5"),
                ("NCCL_DEBUG", "WARN"),
            ] {
                assert_eq!(env_of(pod, name).as_deref(), Some(want), "{name}");
            }
            // The first rank is MOE_NODE_RANK * MOE_GPUS_PER_NODE: MOE_RANK would make
            // moe-worker refuse to start (its --rank conflicts with --node).
            assert_eq!(env_of(pod, "MOE_NODE_RANK"), Some(node.to_string()));
            assert_eq!(env_of(pod, "MOE_RANK"), None);
            // $(POD_IP) expands only from a variable defined before it.
            let names: Vec<&str> = container(pod)
                .env
                .iter()
                .flatten()
                .map(|e| e.name.as_str())
                .collect();
            let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
            assert!(pos("POD_IP") < pos("MOE_EP_LISTEN"));
            let c = container(pod);
            let ep = c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some("ep"))
                .unwrap();
            assert_eq!((ep.container_port, ep.host_port), (29500, None));
            // Local rank i listens at port + i, named ep-i (the NetworkPolicy admits them).
            let g = valid(&md).gpus_per_node as i32;
            let eps: Vec<(String, i32)> = c
                .ports
                .iter()
                .flatten()
                .filter(|p| p.name.as_deref().is_some_and(|n| n.starts_with("ep")))
                .map(|p| (p.name.clone().unwrap(), p.container_port))
                .collect();
            let want: Vec<(String, i32)> = (0..g)
                .map(|i| {
                    let name = if i == 0 {
                        "ep".into()
                    } else {
                        format!("ep-{i}")
                    };
                    (name, 29500 + i)
                })
                .collect();
            assert_eq!(eps, want);
            let shm = pod
                .spec
                .as_ref()
                .unwrap()
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == "shm")
                .and_then(|v| v.empty_dir.clone())
                .unwrap();
            assert_eq!(shm.medium.as_deref(), Some("Memory"));
            assert_eq!(shm.size_limit, Some(Quantity("8Gi".into())));
            let mount = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == "shm")
                .unwrap();
            assert_eq!(
                (mount.mount_path.as_str(), mount.read_only),
                (SHM_DIR, None)
            );
            let caps = c.security_context.as_ref().unwrap().capabilities.as_ref();
            assert_eq!(caps.unwrap().add, None);
        }
        let svc = d.service.spec.as_ref().unwrap();
        assert_eq!(svc.publish_not_ready_addresses, Some(true));
        let ep = svc
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("ep"))
            .unwrap();
        assert_eq!(
            (ep.port, ep.target_port.clone()),
            (29500, Some(IntOrString::String("ep".into())))
        );
        // ipcLock adds IPC_LOCK and nothing else; everything else stays dropped.
        md.spec.data_plane.ipc_lock = true;
        let pod = worker_pod(&md, &valid_with(&md, true), 0, "h").unwrap();
        let caps = container(&pod)
            .security_context
            .clone()
            .unwrap()
            .capabilities
            .unwrap();
        assert_eq!(caps.add, Some(vec![IPC_LOCK.to_string()]));
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    }

    /// The environment the pods get is what `moe-worker` parses: its flags (what the operator
    /// passes) with `--rank` beside `--node` would be refused, which is why MOE_RANK is not set.
    #[test]
    fn the_worker_refuses_a_rank_beside_the_node_rank() {
        use clap::Parser;
        let args = ["moe-worker", "--node", "1", "--gpus-per-node", "2"];
        assert!(crate::worker::runtime::WorkerArgs::try_parse_from(args).is_ok());
        let both = ["moe-worker", "--node", "1", "--rank", "2"];
        assert!(crate::worker::runtime::WorkerArgs::try_parse_from(both).is_err());
    }

    #[test]
    fn config_map_service_pdb_secret() {
        let md = deployment();
        let plan = plan(&md);
        let d = build(&md, &valid(&md), &plan, "s3cret").unwrap();
        let cm = &d.plan_config_map;
        assert_eq!(cm.metadata.name.as_deref(), Some("demo-plan"));
        let data = cm.data.as_ref().unwrap();
        assert_eq!(data[HASH_KEY], plan.hash);
        let back: ExpertPlan = serde_json::from_str(&data[PLAN_KEY]).unwrap();
        assert_eq!(back.compute_hash(), plan.hash);

        let svc = d.service.spec.as_ref().unwrap();
        assert_eq!(svc.cluster_ip.as_deref(), Some("None"));
        assert_eq!(svc.selector.as_ref().unwrap(), &selector_labels(&md));
        // The service selects exactly the worker pods.
        for p in &d.pods {
            let l = p.metadata.labels.as_ref().unwrap();
            assert!(svc
                .selector
                .as_ref()
                .unwrap()
                .iter()
                .all(|(k, v)| l.get(k) == Some(v)));
        }
        assert_eq!(
            d.pdb.spec.as_ref().unwrap().min_available,
            Some(IntOrString::Int(1))
        );
        assert_eq!(
            d.admin_secret.metadata.name.as_deref(),
            Some("demo-admin-token")
        );
        assert_eq!(
            d.admin_secret.data.as_ref().unwrap()[TOKEN_KEY],
            ByteString(b"s3cret".to_vec())
        );
        for m in [
            &cm.metadata,
            &d.service.metadata,
            &d.pdb.metadata,
            &d.admin_secret.metadata,
        ] {
            assert_eq!(
                m.owner_references.as_ref().unwrap()[0].controller,
                Some(true)
            );
        }
    }

    #[test]
    fn an_s3_checkpoint_is_fetched_by_an_init_container_into_an_empty_dir() {
        use crate::api::pod_policy::{check_pod, PodPolicy};
        let mut md = deployment();
        md.spec.model.checkpoint.s3 = Some(crate::api::S3Checkpoint {
            bucket: "weights".into(),
            prefix: "models/tiny/".into(),
            endpoint: Some("http://minio.storage:9000".into()),
            credentials_secret: Some("s3-creds".into()),
            ..Default::default()
        });
        let plan = plan(&md);
        let vspec = crate::api::validate::validate(
            &md.spec,
            &PodPolicy {
                allow_secret_volumes: true,
                ..Default::default()
            },
        )
        .unwrap();
        let pod = worker_pod(&md, &vspec, 0, &plan.hash).unwrap();
        let spec = pod.spec.as_ref().unwrap();
        let vols = spec.volumes.as_ref().unwrap();
        let ckpt = vols.iter().find(|v| v.name == "checkpoint").unwrap();
        assert!(ckpt.empty_dir.is_some(), "{ckpt:?}");
        let creds = vols.iter().find(|v| v.name == "s3-credentials").unwrap();
        assert_eq!(
            creds.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("s3-creds")
        );
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.name, "fetch-weights");
        assert_eq!(init.image, container(&pod).image);
        assert_eq!(
            init.args.as_ref().unwrap().join(" "),
            "fetch-weights --endpoint http://minio.storage:9000 --region us-east-1 --bucket weights \
             --prefix models/tiny/ --path-style true --dest /models/tiny \
             --credentials-dir /etc/moe/s3 --credentials-secret s3-creds"
        );
        let mounts = init.volume_mounts.as_ref().unwrap();
        assert_eq!(
            mounts
                .iter()
                .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
                .collect::<Vec<_>>(),
            [
                ("checkpoint", "/models/tiny", None),
                ("s3-credentials", "/etc/moe/s3", Some(true))
            ]
        );
        let sc = init.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.as_ref().unwrap().add, None);
        // The worker reads the checkpoint read-only and never sees the credentials.
        let worker_mounts = container(&pod).volume_mounts.clone().unwrap();
        assert!(worker_mounts
            .iter()
            .any(|m| m.name == "checkpoint" && m.read_only == Some(true)));
        assert!(!worker_mounts.iter().any(|m| m.name == "s3-credentials"));
        // The pod policy sees the Secret volume: refused unless allowed.
        let refused = check_pod(&pod, &PodPolicy::default());
        assert!(
            refused
                .iter()
                .any(|r| r.contains("volume s3-credentials mounts a Secret")),
            "{refused:?}"
        );
        let allowed = PodPolicy {
            allow_secret_volumes: true,
            ..Default::default()
        };
        assert_eq!(check_pod(&pod, &allowed), Vec::<String>::new());
        // A writable hostPath in an init container is refused like one in the worker.
        let mut hp = pod.clone();
        let s = hp.spec.as_mut().unwrap();
        let mut vols = s.volumes.as_mut().unwrap().iter_mut();
        let v = vols.find(|v| v.name == "checkpoint").unwrap();
        v.empty_dir = None;
        v.host_path = Some(k8s_openapi::api::core::v1::HostPathVolumeSource {
            path: "/data".into(),
            ..Default::default()
        });
        let refused = check_pod(&hp, &allowed);
        assert!(
            refused.iter().any(|r| r.contains("mounted writable")),
            "{refused:?}"
        );
    }

    #[test]
    fn checkpoint_volume_device_and_user_resources() {
        let mut md = deployment();
        md.spec.model.checkpoint.volume = Some(CheckpointVolume {
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: "weights".into(),
                read_only: Some(true),
            }),
            host_path: None,
        });
        md.spec.worker.device = WorkerDevice::Cpu;
        md.spec.worker.resources = Some(ResourceRequirements {
            requests: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("64Gi".into()),
            )])),
            ..Default::default()
        });
        let plan = plan(&md);
        let pod = worker_pod(&md, &valid(&md), 1, &plan.hash).unwrap();
        let spec = pod.spec.as_ref().unwrap();
        let vol = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "checkpoint")
            .unwrap();
        assert_eq!(
            vol.persistent_volume_claim.as_ref().unwrap().claim_name,
            "weights"
        );
        let c = container(&pod);
        let mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "checkpoint")
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/models/tiny", Some(true))
        );
        assert!(c
            .args
            .as_ref()
            .unwrap()
            .ends_with(&["--device".to_string(), "cpu".to_string()]));
        let req = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(req["memory"], Quantity("64Gi".into()));
        assert_eq!(req[GPU_RESOURCE], Quantity("2".into()));
        // Changing the image changes the spec hash (a Recreate rollout); the plan hash does not.
        let before = worker_pod(&md, &valid(&md), 1, "a").unwrap();
        let same = worker_pod(&md, &valid(&md), 1, "b").unwrap();
        md.spec.worker.image = "moe-worker:2".into();
        let after = worker_pod(&md, &valid(&md), 1, "a").unwrap();
        let sh = |p: &Pod| p.metadata.annotations.as_ref().unwrap()[ANNOTATION_SPEC_HASH].clone();
        assert_eq!(sh(&before), sh(&same));
        assert_ne!(sh(&before), sh(&after));
    }

    #[test]
    fn refuses_plans_that_do_not_fit_the_spec() {
        let md = deployment();
        let mut p = plan(&md);
        p.gpus = 8;
        assert!(matches!(
            build(&md, &valid(&md), &p, "t"),
            Err(BuildError::TopologyMismatch { plan_gpus: 8, .. })
        ));
        let mut p = plan(&md);
        p.model.experts = 16;
        assert_eq!(
            build(&md, &valid(&md), &p, "t").unwrap_err(),
            BuildError::ModelMismatch
        );
        let mut p = plan(&md);
        p.hash.clear();
        assert_eq!(
            build(&md, &valid(&md), &p, "t").unwrap_err(),
            BuildError::UnsealedPlan
        );
        let mut no_uid = md.clone();
        no_uid.metadata.uid = None;
        assert_eq!(
            build(&no_uid, &valid(&no_uid), &plan(&md), "t").unwrap_err(),
            BuildError::MissingMetadata("metadata.uid")
        );
    }

    #[test]
    fn process_backed_label_only_on_request() {
        let mut md = deployment();
        md.metadata.annotations = Some(BTreeMap::from([(
            ANNOTATION_PROCESS_BACKED.to_string(),
            "true".to_string(),
        )]));
        let plan = plan(&md);
        let d = build(&md, &valid(&md), &plan, "t").unwrap();
        for p in &d.pods {
            assert_eq!(
                p.metadata.labels.as_ref().unwrap()[LABEL_PROCESS_BACKED],
                "true"
            );
        }
        // Only on pods: the launcher acts on pods, and other objects have no process.
        assert!(!d
            .service
            .metadata
            .labels
            .as_ref()
            .unwrap()
            .contains_key(LABEL_PROCESS_BACKED));
        md.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ANNOTATION_PROCESS_BACKED.into(), "false".into());
        assert!(!process_backed(&md));
    }

    /// A shaped deployment: every `spec.worker` pod field, as an author would write it.
    fn shaped() -> MoEDeployment {
        let mut md = deployment();
        md.spec.worker = serde_yaml::from_str(
            r#"
image: moe-worker:dev
env: [{name: RUST_LOG, value: debug}]
nodeSelector: {gpu: h200}
podLabels: {team: serving, example.com/tier: gold}
podAnnotations: {example.com/owner: ml-platform}
imagePullSecrets: [{name: regcred}]
schedulerName: gang-scheduler
runtimeClassName: nvidia
priorityClassName: high
affinity:
  nodeAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      nodeSelectorTerms:
      - matchExpressions: [{key: gpu.product, operator: In, values: [H200]}]
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 10
      podAffinityTerm: {topologyKey: zone, labelSelector: {matchLabels: {app: other}}}
topologySpreadConstraints:
- {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway,
   labelSelector: {matchLabels: {moe.craft.dev/deployment: demo}}}
volumes:
- {name: scratch, emptyDir: {sizeLimit: 10Gi}}
- {name: tokenizer, configMap: {name: tok}}
volumeMounts:
- {name: scratch, mountPath: /scratch}
- {name: tokenizer, mountPath: /etc/tokenizer, readOnly: true}
securityContext:
  capabilities: {add: [NET_BIND_SERVICE]}
  runAsUser: 1000
  runAsGroup: 1000
  readOnlyRootFilesystem: true
"#,
        )
        .unwrap();
        md
    }

    #[test]
    fn a_shaped_pod_is_what_the_user_wrote_plus_what_the_operator_owns() {
        let md = shaped();
        let plain = worker_pod(&deployment(), &valid(&deployment()), 1, "h").unwrap();
        let p = worker_pod(&md, &valid(&md), 1, "h").unwrap();
        let labels = p.metadata.labels.as_ref().unwrap();
        // Ours, all kept, and the user's beside them.
        for (k, v) in plain.metadata.labels.as_ref().unwrap() {
            assert_eq!(labels.get(k), Some(v), "{k}");
        }
        assert_eq!(labels["team"], "serving");
        assert_eq!(labels["example.com/tier"], "gold");
        let ann = p.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann["example.com/owner"], "ml-platform");
        assert_eq!(ann[ANNOTATION_PLAN_HASH], "h");
        // The shaping is part of the spec hash: changing it replaces the pods.
        assert_ne!(
            ann[ANNOTATION_SPEC_HASH],
            plain.metadata.annotations.as_ref().unwrap()[ANNOTATION_SPEC_HASH]
        );
        let mut relabelled = md.clone();
        relabelled
            .spec
            .worker
            .pod_labels
            .insert("team".into(), "research".into());
        let q = worker_pod(&relabelled, &valid(&relabelled), 1, "h").unwrap();
        assert_ne!(
            q.metadata.annotations.as_ref().unwrap()[ANNOTATION_SPEC_HASH],
            ann[ANNOTATION_SPEC_HASH]
        );

        let s = p.spec.as_ref().unwrap();
        let ps = plain.spec.as_ref().unwrap();
        assert_eq!(s.scheduler_name.as_deref(), Some("gang-scheduler"));
        assert_eq!(s.runtime_class_name.as_deref(), Some("nvidia"));
        assert_eq!(s.priority_class_name.as_deref(), Some("high"));
        assert_eq!(s.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
        assert_eq!(
            s.topology_spread_constraints.as_ref().unwrap()[0].max_skew,
            1
        );
        // Affinity: the user's node affinity and preferred anti-affinity, and our required term first.
        let a = s.affinity.as_ref().unwrap();
        assert!(a.node_affinity.is_some());
        let anti = a.pod_anti_affinity.as_ref().unwrap();
        assert_eq!(
            anti.required_during_scheduling_ignored_during_execution,
            ps.affinity
                .as_ref()
                .unwrap()
                .pod_anti_affinity
                .as_ref()
                .unwrap()
                .required_during_scheduling_ignored_during_execution
        );
        assert_eq!(
            anti.preferred_during_scheduling_ignored_during_execution
                .as_ref()
                .unwrap()[0]
                .weight,
            10
        );
        // Volumes and mounts: ours first, unchanged, then the user's.
        let vols: Vec<&str> = s
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(vols, ["plan", "admin-token", "shm", "scratch", "tokenizer"]);
        assert_eq!(
            s.volumes.as_ref().unwrap()[..3],
            ps.volumes.as_ref().unwrap()[..]
        );
        let c = container(&p);
        let mounts: Vec<(&str, &str)> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("plan", "/etc/moe/plan"),
                ("admin-token", "/etc/moe/admin"),
                ("shm", "/dev/shm"),
                ("scratch", "/scratch"),
                ("tokenizer", "/etc/tokenizer")
            ]
        );
        // Security: ours fixed, the user's added.
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(
            caps.add.as_deref(),
            Some(&["NET_BIND_SERVICE".to_string()][..])
        );
        assert_eq!(
            (
                sc.run_as_user,
                sc.run_as_group,
                sc.read_only_root_filesystem
            ),
            (Some(1000), Some(1000), Some(true))
        );
        assert_eq!(s.security_context, ps.security_context);
        // Everything else is what the unshaped pod has.
        let mut rest = s.clone();
        let mut prest = ps.clone();
        for x in [&mut rest, &mut prest] {
            x.affinity = None;
            x.volumes = None;
            x.scheduler_name = None;
            x.runtime_class_name = None;
            x.image_pull_secrets = None;
            x.topology_spread_constraints = None;
            x.containers[0].volume_mounts = None;
            x.containers[0].security_context = None;
        }
        prest.priority_class_name = Some("high".into());
        assert_eq!(rest, prest);
        // And the pod passes the pod check under the default policy.
        assert_eq!(
            crate::api::pod_policy::check_pod(&p, &Default::default()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn an_unshaped_pod_keeps_its_spec_hash_and_ipc_lock_comes_first() {
        let md = deployment();
        let p = worker_pod(&md, &valid(&md), 0, "h").unwrap();
        assert_eq!(
            p.metadata.annotations.as_ref().unwrap()[ANNOTATION_SPEC_HASH],
            spec_hash(p.spec.as_ref().unwrap())
        );
        let mut md = shaped();
        md.spec.data_plane.ipc_lock = true;
        let p = worker_pod(&md, &valid_with(&md, true), 0, "h").unwrap();
        let add = container(&p)
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap()
            .add
            .clone();
        assert_eq!(add.unwrap(), ["IPC_LOCK", "NET_BIND_SERVICE"]);
    }

    /// Every label, annotation, volume and mount path the operator puts on a worker pod is one a
    /// spec is refused for: the owned names of `api::pod_shape` cover what build really writes.
    #[test]
    fn everything_build_owns_on_a_pod_is_refused_to_the_user() {
        use crate::api::pod_shape::{check_pod_shape, owned_key};
        use crate::api::{WorkerVolume, WorkerVolumeMount};
        let mut md = deployment();
        md.spec.model.checkpoint.volume = Some(CheckpointVolume {
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: "c".into(),
                read_only: Some(true),
            }),
            host_path: None,
        });
        md.metadata.annotations =
            Some([(ANNOTATION_PROCESS_BACKED.to_string(), "true".to_string())].into());
        let p = worker_pod(&md, &valid(&md), 0, "h").unwrap();
        let m = &p.metadata;
        for k in m
            .labels
            .as_ref()
            .unwrap()
            .keys()
            .chain(m.annotations.as_ref().unwrap().keys())
        {
            assert!(
                owned_key(k),
                "{k} is set by build but not refused by pod_shape"
            );
        }
        let s = p.spec.as_ref().unwrap();
        for v in s.volumes.as_ref().unwrap() {
            let mut spec = md.spec.clone();
            spec.worker.volumes = vec![WorkerVolume {
                name: v.name.clone(),
                empty_dir: Some(Default::default()),
                ..Default::default()
            }];
            assert!(!check_pod_shape(&spec).is_empty(), "volume {}", v.name);
        }
        for vm in container(&p).volume_mounts.as_ref().unwrap() {
            let mut spec = md.spec.clone();
            spec.worker.volumes = vec![WorkerVolume {
                name: "mine".into(),
                empty_dir: Some(Default::default()),
                ..Default::default()
            }];
            spec.worker.volume_mounts = vec![WorkerVolumeMount {
                name: "mine".into(),
                mount_path: vm.mount_path.clone(),
                ..Default::default()
            }];
            let e = check_pod_shape(&spec);
            assert_eq!(e.len(), 1, "mount path {}: {e:?}", vm.mount_path);
        }
    }

    /// `scheduling.gang`: Kueue's pod-group labels and annotation, or scheduler-plugins' PodGroup
    /// (minMember = the group's size) with the pods labelled for it; nothing for None and Guard.
    #[test]
    fn gang_schedulers_get_what_they_read() {
        let mut md = deployment();
        md.spec.scheduling.gang = Some(Gang::Kueue);
        md.spec.scheduling.queue_name = Some("gpu-queue".into());
        let v = valid(&md);
        let d = build(&md, &v, &plan(&md), "t").unwrap();
        assert!(d.pod_groups.is_empty());
        for p in &d.pods {
            let l = p.metadata.labels.as_ref().unwrap();
            assert_eq!(l[KUEUE_POD_GROUP_NAME], "demo-workers");
            assert_eq!(l[KUEUE_QUEUE_NAME], "gpu-queue");
            assert_eq!(
                p.metadata.annotations.as_ref().unwrap()[KUEUE_POD_GROUP_TOTAL_COUNT],
                "2"
            );
            assert!(!l.contains_key(POD_GROUP_LABEL));
        }
        md.spec.scheduling = crate::api::SchedulingSpec {
            gang: Some(Gang::PodGroup),
            queue_name: None,
            timeout: Some("90s".into()),
        };
        let v = valid(&md);
        let d = build(&md, &v, &plan(&md), "t").unwrap();
        let pg = &d.pod_groups[0];
        assert_eq!(pg.metadata.name.as_deref(), Some("demo-workers"));
        assert_eq!(pg.metadata.namespace.as_deref(), Some("ml"));
        assert_eq!(
            pg.metadata.owner_references.as_ref().unwrap()[0].name,
            "demo"
        );
        assert_eq!(pg.data["spec"]["minMember"], 2);
        assert_eq!(pg.data["spec"]["scheduleTimeoutSeconds"], 90);
        let json = serde_json::to_value(pg).unwrap();
        assert_eq!(json["apiVersion"], "scheduling.x-k8s.io/v1alpha1");
        assert_eq!(json["kind"], "PodGroup");
        for p in &d.pods {
            let l = p.metadata.labels.as_ref().unwrap();
            assert_eq!(l[POD_GROUP_LABEL], "demo-workers");
            assert!(!l.contains_key(KUEUE_POD_GROUP_NAME));
        }
        // Switching the gang replaces the pods (their keys are part of the spec hash).
        let kueue_hash = {
            let mut k = md.clone();
            k.spec.scheduling.gang = Some(Gang::Kueue);
            k.spec.scheduling.queue_name = Some("q".into());
            build(&k, &valid(&k), &plan(&k), "t").unwrap().pods[0].annotations()
                [ANNOTATION_SPEC_HASH]
                .clone()
        };
        assert_ne!(d.pods[0].annotations()[ANNOTATION_SPEC_HASH], kueue_hash);
        for g in [Gang::None, Gang::Guard] {
            md.spec.scheduling = crate::api::SchedulingSpec {
                gang: Some(g),
                ..Default::default()
            };
            let d = build(&md, &valid(&md), &plan(&md), "t").unwrap();
            assert!(d.pod_groups.is_empty());
            let l = d.pods[0].metadata.labels.as_ref().unwrap();
            assert!(!l.keys().any(|k| k.contains("x-k8s.io")), "{l:?}");
        }
    }

    /// The demo deployment running vLLM (its load from Prometheus, as an engine's must be).
    fn engine_deployment(kind: &str) -> MoEDeployment {
        let mut md = deployment();
        md.spec.metrics = serde_yaml::from_str(
            "{source: Prometheus, prometheus: {url: 'http://prom:9090', query: 'q'}}",
        )
        .unwrap();
        md.spec.engine = Some(
            serde_yaml::from_str(&format!(
                "{{kind: {kind}, command: [python3, -m, engine], args: [--tp, '2', --nnodes, '$(MOE_NODES)']}}"
            ))
            .unwrap(),
        );
        md
    }

    #[test]
    fn engine_pods_start_the_engine_on_the_mounted_layout() {
        for (kind, flags) in [
            (
                "SGLang",
                vec![
                    "--init-expert-location",
                    "$(MOE_LAYOUT_FILE)",
                    "--ep-num-redundant-experts",
                    "$(MOE_REDUNDANT_EXPERTS)",
                ],
            ),
            (
                "VLLM",
                vec![
                    "--eplb-config",
                    r#"{"initial_expert_map_path": "$(MOE_LAYOUT_FILE)", "num_redundant_experts": $(MOE_REDUNDANT_EXPERTS)}"#,
                ],
            ),
        ] {
            let md = engine_deployment(kind);
            let policy = crate::api::pod_policy::PodPolicy {
                prometheus_url_prefixes: vec![crate::api::pod_policy::HttpUrl::parse(
                    "http://prom:9090",
                )
                .unwrap()],
                ..Default::default()
            };
            let v = crate::api::validate::validate(&md.spec, &policy).unwrap();
            assert_eq!(
                v.strategy,
                RolloutStrategy::Recreate,
                "engines have no in-place update"
            );
            let p = plan(&md);
            let d = build(&md, &v, &p, "t").unwrap();
            let pod = &d.pods[1];
            let c = container(pod);
            assert_eq!(c.command.as_deref().unwrap(), ["python3", "-m", "engine"]);
            let mut want: Vec<String> = ["--tp", "2", "--nnodes", "$(MOE_NODES)"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            want.extend(flags.iter().map(|s| s.to_string()));
            assert_eq!(c.args.as_ref().unwrap(), &want, "{kind}");
            assert_eq!(env_of(pod, "MOE_NODE_RANK").as_deref(), Some("1"));
            assert_eq!(env_of(pod, "MOE_EP_SIZE").as_deref(), Some("4"));
            assert_eq!(
                env_of(pod, "MOE_DIST_INIT_ADDR").as_deref(),
                Some("demo-worker-0.demo-workers.ml.svc:5000")
            );
            assert_eq!(
                env_of(pod, "MOE_LAYOUT_FILE").as_deref(),
                Some(format!("{PLAN_DIR}/{LAYOUT_KEY}").as_str())
            );
            // The redundant count comes from the plan ConfigMap, so the pod spec is the same
            // for every plan (a new plan replaces pods through the Recreate strategy).
            let redundant = c
                .env
                .as_ref()
                .unwrap()
                .iter()
                .find(|e| e.name == "MOE_REDUNDANT_EXPERTS")
                .and_then(|e| e.value_from.as_ref()?.config_map_key_ref.clone())
                .unwrap();
            assert_eq!(
                (redundant.name.as_str(), redundant.key.as_str()),
                ("demo-plan", REDUNDANT_EXPERTS_KEY)
            );
            let mut other = p.clone();
            other.layers[0].slots.swap(0, 1);
            let other = other.seal();
            let d2 = build(&md, &v, &other, "t").unwrap();
            assert_eq!(
                pod.annotations()[ANNOTATION_SPEC_HASH],
                d2.pods[1].annotations()[ANNOTATION_SPEC_HASH]
            );
            // The ConfigMap holds the layout the engine's loader accepts, and the count.
            let data = d.plan_config_map.data.as_ref().unwrap();
            let file: serde_json::Value = serde_json::from_str(&data[LAYOUT_KEY]).unwrap();
            let engine = md.spec.engine.as_ref().unwrap().kind.engine();
            let l = engines::check_layout(engine, &p.model, 4, &file).unwrap();
            assert_eq!(
                data[REDUNDANT_EXPERTS_KEY],
                l.redundant_experts().to_string()
            );
            // Probes and ports on the engine's HTTP port; no admin token, no data plane.
            let port = md.spec.engine.as_ref().unwrap().kind.default_port();
            let probe = c
                .readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .clone()
                .unwrap();
            assert_eq!(
                (probe.path.as_deref(), probe.port.clone()),
                (Some("/health"), IntOrString::Int(port))
            );
            let ports: Vec<_> = c
                .ports
                .as_ref()
                .unwrap()
                .iter()
                .map(|p| (p.name.clone().unwrap(), p.container_port))
                .collect();
            assert_eq!(
                ports,
                [("http".to_string(), port), ("dist-init".to_string(), 5000)]
            );
            let vols = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
            assert!(vols.iter().all(|v| v.name != VOLUME_ADMIN_TOKEN));
            assert!(c
                .env
                .as_ref()
                .unwrap()
                .iter()
                .all(|e| !e.name.starts_with("MOE_EP_W")));
            assert_eq!(pod.labels()["app.kubernetes.io/component"], "engine");
            assert_eq!(
                c.resources.as_ref().unwrap().limits.as_ref().unwrap()[GPU_RESOURCE].0,
                "2"
            );
        }
    }

    #[test]
    fn tokens_are_fresh_and_long() {
        let (a, b) = (new_admin_token(), new_admin_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
