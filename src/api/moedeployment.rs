//! The `MoEDeployment` custom resource (`moe.craft.dev/v1alpha1`).
//!
//! Integers are `i32`/`i64` on purpose: unsigned Rust integers make schemars emit
//! `format: uint32/uint64`, which Kubernetes 1.34+ warns about. Every integer carries a minimum
//! instead, and [`super::validate`] converts to the planner's unsigned types.
//!
//! Cross-field rules live in CEL (`x-kubernetes-validations`) on the struct that holds all the
//! fields a rule reads, so the apiserver refuses bad objects at `kubectl apply`; what CEL cannot
//! express is checked by [`super::validate`].

// kube's `printcolumn(type_ = ..)` repeats per column, which clippy mistakes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ConfigMapKeySelector, ConfigMapVolumeSource, EmptyDirVolumeSource, EnvVar,
    HostPathVolumeSource, LocalObjectReference, PersistentVolumeClaimVolumeSource,
    ResourceRequirements, SecretVolumeSource, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::plan::limits;

/// Go-style duration (`30s`, `5m`, `1h30m`), as the apiserver's CEL `duration()` reads it.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// Serve a Mixture-of-Experts model on GPU worker pods and keep its experts balanced.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "moe.craft.dev",
    version = "v1alpha1",
    kind = "MoEDeployment",
    plural = "moedeployments",
    singular = "moedeployment",
    shortname = "moed",
    category = "moe",
    namespaced,
    status = "MoEDeploymentStatus",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    doc = "A Mixture-of-Experts model served by one worker pod per node, with an expert replication plan kept balanced by the operator.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Plan", type_ = "string", json_path = ".status.plan.shortHash"),
    printcolumn(
        name = "R",
        type_ = "integer",
        json_path = ".status.plan.replicasPerGpu",
        description = "extra expert replicas per GPU, summed over layers"
    ),
    printcolumn(
        name = "Balancedness",
        type_ = "string",
        json_path = ".status.observed.balancednessText",
        description = "observed mean/max GPU load over the last window, 3 digits (status.observed.balancedness has them all)"
    ),
    printcolumn(
        name = "Workers",
        type_ = "string",
        json_path = ".status.workers.summary",
        description = "ready/desired worker pods"
    ),
    printcolumn(
        name = "Groups",
        type_ = "string",
        json_path = ".status.groupsSummary",
        description = "ready/desired EP groups (spec.replicas)"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.replication.policy == 'Craft' || self.model.experts % (self.topology.nodes * self.topology.gpusPerNode) == 0",
        "message": "model.experts must be divisible by topology.nodes * topology.gpusPerNode (the EP ranks) unless replication.policy is Craft: Eplb, PlacementOnly and None give every GPU the same number of expert slots",
        "fieldPath": ".model.experts",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.engine) || (has(self.metrics) && has(self.metrics.source) && self.metrics.source == 'Prometheus')",
        "message": "engine pods serve the engine's metrics, not moe-worker's: set metrics.source to Prometheus with a query over the engine's per-expert metric (docs/engines.md)",
        "fieldPath": ".metrics.source",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "self.rollout.maxUnavailable <= self.topology.nodes",
        "message": "rollout.maxUnavailable must not exceed topology.nodes (there is one worker pod per node)",
        "fieldPath": ".rollout.maxUnavailable",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.dataPlane) || !has(self.dataPlane.port) || !has(self.worker.ports) || !(self.dataPlane.port in [self.worker.ports.dispatch, self.worker.ports.metrics, self.worker.ports.admin])",
        "message": "dataPlane.port must differ from worker.ports.dispatch, metrics and admin (the ranks' mesh needs a port of its own)",
        "fieldPath": ".dataPlane.port",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.dataPlane) || !has(self.dataPlane.transport) || self.dataPlane.transport != 'nccl' || !has(self.worker.device) || self.worker.device != 'cpu'",
        "message": "dataPlane.transport nccl needs GPU workers but worker.device is cpu: set worker.device to cuda, or use transport tcp for CPU workers",
        "fieldPath": ".dataPlane.transport",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct MoEDeploymentSpec {
    pub model: ModelSpec,
    pub topology: TopologySpec,
    /// Expert-parallel groups: each a full set of `topology.nodes` worker pods with its own ranks
    /// and rendezvous, all on the same model and plan (docs/api.md, "Scaling"). The `scale`
    /// subresource drives it (`kubectl scale`, a HorizontalPodAutoscaler). 0 deletes every
    /// worker like `suspend`, but as a size, not a pause (docs/api.md says how they differ).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = MAX_REPLICAS))]
    pub replicas: i32,
    #[serde(default)]
    pub replication: ReplicationSpec,
    #[serde(default)]
    pub metrics: MetricsSpec,
    #[serde(default)]
    pub rollout: RolloutSpec,
    pub worker: WorkerSpec,
    /// How the expert-parallel ranks find each other and exchange tokens (docs/data-plane.md).
    #[serde(default)]
    pub data_plane: DataPlaneSpec,
    /// A load trace (the format `moectl plan --load` reads) to plan from until the workers report
    /// load. Without it the first plan is placement-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_load: Option<ConfigMapKeySelector>,
    /// Scale the workers to zero (every worker pod deleted at once, gracefully), keeping the plan,
    /// its ConfigMap, the Service and the status; set back to false to bring the same workers back
    /// on the same plan. Condition `Suspended`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// Gang scheduling of the worker pods: all of the group scheduled, or none (docs/api.md,
    /// "Gang scheduling").
    #[serde(default)]
    pub scheduling: SchedulingSpec,
    /// Run a serving engine (SGLang or vLLM) in the worker pods instead of `moe-worker`, started
    /// on the plan in the engine's layout format (docs/engines.md). The pods keep everything of
    /// `worker` (image, resources, volumes, scheduling); the engine reads no plan at run time, so
    /// a new plan replaces the pods (Recreate) under `rollout.maxUnavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineSpec>,
}

/// Most `spec.replicas` (EP groups of one MoEDeployment).
pub const MAX_REPLICAS: i32 = 256;
/// Most `rollout.maxSurge` groups.
pub const MAX_SURGE: i32 = 16;

fn default_replicas() -> i32 {
    1
}

/// Which engine the worker pods run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EngineKind {
    /// `--init-expert-location` with `physical_to_logical_map`, one row per decoder layer.
    SGLang,
    /// `--eplb-config`'s `initial_expert_map_path`, one row per MoE layer.
    VLLM,
}

impl EngineKind {
    /// The planner's name for it.
    pub fn engine(self) -> crate::plan::engines::Engine {
        match self {
            EngineKind::SGLang => crate::plan::engines::Engine::Sglang,
            EngineKind::VLLM => crate::plan::engines::Engine::Vllm,
        }
    }

    /// The engine's own default HTTP port (`sglang.launch_server`, `vllm serve`).
    pub fn default_port(self) -> i32 {
        match self {
            EngineKind::SGLang => 30000,
            EngineKind::VLLM => 8000,
        }
    }
}

/// `spec.engine`: the engine process of each worker pod (the image is `worker.image`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    pub kind: EngineKind,
    /// The container's command; empty runs the image's entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub command: Vec<String>,
    /// The engine's arguments. The operator appends the layout flags (SGLang:
    /// `--init-expert-location`, `--ep-num-redundant-experts`; vLLM: `--eplb-config`), which may
    /// not appear here; `$(MOE_NODE_RANK)`, `$(MOE_NODES)`, `$(MOE_EP_SIZE)` and
    /// `$(MOE_DIST_INIT_ADDR)` (rank 0's `host:port`) are set for multi-node flags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub args: Vec<String>,
    /// The engine's HTTP port (readiness and `/metrics`); default 30000 for SGLang, 8000 for vLLM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// The readiness probe's path on `port`.
    #[serde(default = "default_health_path")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/[!-~]*$"))]
    pub health_path: String,
    /// The port of rank 0's distributed init (SGLang `--dist-init-addr`, the torch rendezvous),
    /// in `$(MOE_DIST_INIT_ADDR)`.
    #[serde(default = "default_dist_init_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub dist_init_port: i32,
}

impl EngineSpec {
    /// `port`, or the engine's own default.
    pub fn http_port(&self) -> i32 {
        self.port.unwrap_or_else(|| self.kind.default_port())
    }
}

fn default_health_path() -> String {
    "/health".into()
}

fn default_dist_init_port() -> i32 {
    5000
}

/// How the worker group is gang-scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Gang {
    /// No gang: each pod is scheduled on its own.
    None,
    /// Kueue's pod groups: the pods carry `kueue.x-k8s.io/pod-group-name`,
    /// `kueue.x-k8s.io/pod-group-total-count` and `kueue.x-k8s.io/queue-name` (`queueName`).
    Kueue,
    /// scheduler-plugins' coscheduling: a `scheduling.x-k8s.io/v1alpha1` PodGroup with
    /// `minMember` = the group's size, and the pods labelled `scheduling.x-k8s.io/pod-group`.
    /// The pods must go to that scheduler (`worker.schedulerName`, unless it is the default).
    PodGroup,
    /// The operator's own guard on any scheduler: a group not wholly scheduled within `timeout`
    /// is released (every pod deleted) and retried after `timeout`, with `Degraded=True`, reason
    /// `Unschedulable`, naming the GPUs missing.
    Guard,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.gang) || self.gang != 'Kueue' || has(self.queueName)",
        "message": "scheduling.queueName (the Kueue LocalQueue) is required when scheduling.gang is Kueue",
        "fieldPath": ".queueName",
        "reason": "FieldValueRequired"
    }
]))]
pub struct SchedulingSpec {
    /// Default: `Guard` when `dataPlane.transport` forms a group (not `none`), else `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<Gang>,
    /// Kueue's LocalQueue for `gang: Kueue`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub queue_name: Option<String>,
    /// How long a group may stay partly scheduled (`Guard`: then released; `PodGroup`: the
    /// PodGroup's `scheduleTimeoutSeconds`). 10s to 1h, default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 64))]
    pub timeout: Option<String>,
}

/// The model: the shape fields mirror [`crate::plan::ModelShape`] and cannot change after
/// creation (a different model is a different MoEDeployment); the checkpoint can.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.topK <= self.experts",
        "message": "model.topK must be at most model.experts",
        "fieldPath": ".topK",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "self.firstMoeLayer < self.layers",
        "message": "model.firstMoeLayer must be less than model.layers (at least one MoE layer)",
        "fieldPath": ".firstMoeLayer",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "self.layers == oldSelf.layers && self.firstMoeLayer == oldSelf.firstMoeLayer && self.experts == oldSelf.experts && self.topK == oldSelf.topK && self.hiddenSize == oldSelf.hiddenSize && self.expertIntermediateSize == oldSelf.expertIntermediateSize && self.dtype == oldSelf.dtype",
        "message": "the model shape (layers, firstMoeLayer, experts, topK, hiddenSize, expertIntermediateSize, dtype) is immutable: create a new MoEDeployment for a different model",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct ModelSpec {
    /// Total decoder layers, dense ones included.
    #[schemars(range(min = 1, max = limits::MAX_LAYERS))]
    pub layers: i32,
    /// Index of the first MoE layer; layers before it are dense.
    #[serde(default)]
    #[schemars(range(min = 0, max = limits::MAX_LAYERS - 1))]
    pub first_moe_layer: i32,
    /// Routed (logical) experts per MoE layer.
    #[schemars(range(min = 1, max = limits::MAX_EXPERTS))]
    pub experts: i32,
    /// Experts each token is routed to.
    #[schemars(range(min = 1, max = limits::MAX_TOP_K))]
    pub top_k: i32,
    #[schemars(range(min = 1, max = limits::MAX_HIDDEN_SIZE))]
    pub hidden_size: i64,
    /// Intermediate size of one routed expert's FFN.
    #[schemars(range(min = 1, max = limits::MAX_EXPERT_INTERMEDIATE_SIZE))]
    pub expert_intermediate_size: i64,
    #[serde(default)]
    pub dtype: ModelDtype,
    pub checkpoint: CheckpointSpec,
}

/// Weight precision of the routed experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelDtype {
    #[default]
    Bf16,
    /// FP8 E4M3 with 128x128 f32 block scales (DeepSeek-V3 layout).
    Fp8,
}

/// Where the safetensors shards are, as the worker sees them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// Absolute path of the checkpoint directory inside the worker container.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
    /// The volume mounted (read-only) at `path`. Without it the path must exist in the image.
    /// With `s3` it is the cache the objects are fetched into (a persistentVolumeClaim; without
    /// it, an emptyDir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<CheckpointVolume>,
    /// Fetch the checkpoint from an S3-compatible object store: an init container of each
    /// worker pod (`moe-worker fetch-weights`) downloads every object under the prefix into the
    /// cache volume at `path`, checked and resumable, before the worker starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Checkpoint>,
}

/// A checkpoint in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Checkpoint {
    /// The bucket: 3-63 lower-case letters, digits, dots and hyphens.
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"))]
    pub bucket: String,
    /// Key prefix of the checkpoint's objects (e.g. `models/olmoe/`); each object lands at its
    /// key's path below the prefix. Empty: the whole bucket.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 1024))]
    pub prefix: String,
    /// The store's URL, `http(s)://host[:port]`. Default: AWS, `https://s3.<region>.amazonaws.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^/?#@\s]+/?$"), length(max = 512))]
    pub endpoint: Option<String>,
    /// The region requests are signed for (SigV4). Default `us-east-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,64}$"))]
    pub region: Option<String>,
    /// Address the bucket in the path (`endpoint/bucket/key`) rather than in the host name
    /// (`bucket.endpoint/key`). Default: true with an `endpoint`, false for AWS's default one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// A Secret of the deployment's namespace with the keys `accessKeyId` and `secretAccessKey`
    /// (and optionally `sessionToken`), mounted into the init container only. Without it the
    /// requests are anonymous (a public bucket). Needs the pod policy's `allowSecretVolumes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,
}

impl S3Checkpoint {
    pub const DEFAULT_REGION: &'static str = "us-east-1";

    pub fn region(&self) -> &str {
        self.region.as_deref().unwrap_or(Self::DEFAULT_REGION)
    }

    /// The endpoint requests go to.
    pub fn endpoint(&self) -> String {
        match &self.endpoint {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => format!("https://s3.{}.amazonaws.com", self.region()),
        }
    }

    pub fn path_style(&self) -> bool {
        self.path_style.unwrap_or(self.endpoint.is_some())
    }
}

/// A volume source for the checkpoint: exactly one of the fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.persistentVolumeClaim) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) == 1",
        "message": "model.checkpoint.volume needs exactly one of persistentVolumeClaim or hostPath",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct CheckpointVolume {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolumeSource>,
}

/// Expert-parallel topology: `nodes` worker pods of `gpusPerNode` GPUs, D = nodes x gpusPerNode ranks.
/// D is at most 4096 (checked by the operator; `plan::limits::MAX_GPUS`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopologySpec {
    #[schemars(range(min = 1, max = limits::MAX_NODES))]
    pub nodes: i32,
    #[schemars(range(min = 1, max = limits::MAX_GPUS_PER_NODE))]
    pub gpus_per_node: i32,
}

/// How experts are placed and replicated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ReplicationPolicy {
    /// CRAFT: per-layer replica counts under one memory budget, uneven slot counts allowed.
    #[default]
    Craft,
    /// DeepSeek's EPLB: the same number of replicas in every layer.
    Eplb,
    /// Load-aware placement, no replicas.
    PlacementOnly,
    /// Contiguous placement, experts/D per GPU, never re-planned.
    None,
}

impl ReplicationPolicy {
    /// Whether the policy adds replicas (and so reads the budget).
    pub fn replicates(self) -> bool {
        matches!(self, ReplicationPolicy::Craft | ReplicationPolicy::Eplb)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.stepTime) || !has(self.policy) || self.policy == 'Craft'",
        "message": "replication.stepTime chooses CRAFT's per-layer replica counts: it needs policy Craft",
        "fieldPath": ".stepTime",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct ReplicationSpec {
    #[serde(default)]
    pub policy: ReplicationPolicy,
    /// Replica memory budget, read by Craft and Eplb.
    #[serde(default)]
    pub budget: BudgetSpec,
    /// Roll out a new plan only when its predicted balancedness beats the plan in force by at
    /// least this much (absolute, 0..1).
    #[serde(default = "default_min_improvement")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_improvement: f64,
    /// Least time between two rollouts of a new plan.
    #[serde(default = "default_cooldown")]
    #[schemars(
        regex(pattern = DURATION_PATTERN),
        length(max = 64)
    )]
    pub cooldown: String,
    /// The load window planned on: an integer counts metrics intervals, a string is a duration.
    #[serde(default = "default_window")]
    pub window: IntOrString,
    /// Plan for step time instead of balancedness (docs/planner.md, "Step time"): CRAFT's
    /// per-layer replica counts are chosen by the MoE step time they save at `tokensPerStep`,
    /// and `minImprovement` is then the fraction of predicted step time a new plan must save.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_time: Option<StepTimeSpec>,
}

/// `replication.stepTime`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepTimeSpec {
    /// Tokens per step the plan is made for: a decode batch (e.g. 256) or a prefill chunk.
    #[schemars(range(min = 1, max = 16777216))]
    pub tokens_per_step: i64,
    /// The GPU's cost model (`moectl calibrate` fits it); default: one H200, bf16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_model: Option<CostModelSpec>,
}

/// A GPU's expert-FFN cost model (`plan::step_cost::CostModel`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CostModelSpec {
    /// Fixed cost of one rank's layer, seconds.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub launch_seconds: f64,
    /// Expert weight bytes read per second.
    #[schemars(range(min = 1.0e6, max = 1.0e15))]
    pub bytes_per_second: f64,
    /// FFN FLOP per second.
    #[schemars(range(min = 1.0e6, max = 1.0e18))]
    pub flops_per_second: f64,
}

impl Default for ReplicationSpec {
    fn default() -> Self {
        Self {
            policy: ReplicationPolicy::default(),
            budget: BudgetSpec::default(),
            min_improvement: default_min_improvement(),
            cooldown: default_cooldown(),
            window: default_window(),
            step_time: None,
        }
    }
}

fn default_min_improvement() -> f64 {
    0.02
}
fn default_cooldown() -> String {
    "5m".into()
}
fn default_window() -> IntOrString {
    IntOrString::Int(10)
}

/// Replica memory per GPU, in exactly one form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.replicasPerGpu) ? 1 : 0) + (has(self.memoryPerGpu) ? 1 : 0) + (has(self.auto) && self.auto ? 1 : 0) == 1",
        "message": "replication.budget needs exactly one of replicasPerGpu, memoryPerGpu or auto: true",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.memoryPerGpu) || (isQuantity(self.memoryPerGpu) && !quantity(self.memoryPerGpu).isLessThan(quantity('0')))",
        "message": "replication.budget.memoryPerGpu must be a non-negative quantity such as 2Gi or 512Mi",
        "fieldPath": ".memoryPerGpu",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct BudgetSpec {
    /// Extra expert slots per GPU, summed over MoE layers (R).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = limits::MAX_REPLICAS_PER_GPU))]
    pub replicas_per_gpu: Option<i32>,
    /// Replica memory per GPU as a quantity (`2Gi`); R = floor(memoryPerGpu / bytes per expert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub memory_per_gpu: Option<String>,
    /// Let the planner choose R: the smallest R past which one more replica per GPU gains less
    /// than `minImprovement` in predicted balancedness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<bool>,
}

impl Default for BudgetSpec {
    fn default() -> Self {
        Self {
            replicas_per_gpu: None,
            memory_per_gpu: None,
            auto: Some(true),
        }
    }
}

/// Where per-expert load comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MetricsSource {
    /// Scrape each ready worker's `/metrics`.
    #[default]
    Workers,
    /// Query a Prometheus server.
    Prometheus,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.source != 'Prometheus' || has(self.prometheus)",
        "message": "metrics.prometheus (url and query) is required when metrics.source is Prometheus",
        "fieldPath": ".prometheus",
        "reason": "FieldValueRequired"
    }
]))]
pub struct MetricsSpec {
    #[serde(default)]
    pub source: MetricsSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSpec>,
    /// Time between two load samples.
    #[serde(default = "default_interval")]
    #[schemars(
        regex(pattern = DURATION_PATTERN),
        length(max = 64)
    )]
    pub interval: String,
}

impl Default for MetricsSpec {
    fn default() -> Self {
        Self {
            source: MetricsSource::default(),
            prometheus: None,
            interval: default_interval(),
        }
    }
}

fn default_interval() -> String {
    "30s".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.auth) || self.url.startsWith('https://')",
        "message": "metrics.prometheus.auth needs an https:// url: credentials are never sent over plain http",
        "fieldPath": ".auth",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.ca) || self.url.startsWith('https://')",
        "message": "metrics.prometheus.ca needs an https:// url: a CA means nothing over plain http",
        "fieldPath": ".ca",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct PrometheusSpec {
    /// Base URL of the Prometheus HTTP API, e.g. `http://prometheus.monitoring:9090`.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// PromQL giving per-expert token rates with `layer` and `expert` labels, e.g.
    /// `sum by (layer, expert) (increase(moe_expert_tokens_total{namespace="x"}[1m]))`.
    #[schemars(length(min = 1, max = 8192))]
    pub query: String,
    /// How the query's series name their layer and expert, when they are not our workers'
    /// `layer` (the model's layer id) and `expert`: e.g. vLLM's
    /// `{layer: layer_idx, expert: logical_expert_id, layerIndex: MoELayer}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series_labels: Option<SeriesLabels>,
    /// Credentials sent with every query, from a Secret of the MoEDeployment's namespace (read
    /// by name, once per metrics interval). Needs an `https://` url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<PrometheusAuth>,
    /// PEM CA certificates that signed Prometheus' certificate, trusted besides the system's and
    /// the operator's `--prometheus-ca-file`. Needs an `https://` url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PrometheusCa>,
}

/// What a layer label's value counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LayerIndex {
    /// The model's decoder layer id (`model.firstMoeLayer` .. `model.layers - 1`).
    #[default]
    ModelLayer,
    /// The MoE layers counted from 0 (the model layer is `model.firstMoeLayer` + the value).
    MoELayer,
}

/// The labels of `metrics.prometheus.query`'s series.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SeriesLabels {
    #[serde(default = "default_layer_label")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    )]
    pub layer: String,
    #[serde(default = "default_expert_label")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    )]
    pub expert: String,
    #[serde(default)]
    pub layer_index: LayerIndex,
}

impl Default for SeriesLabels {
    fn default() -> Self {
        Self {
            layer: default_layer_label(),
            expert: default_expert_label(),
            layer_index: LayerIndex::default(),
        }
    }
}

fn default_layer_label() -> String {
    "layer".into()
}

fn default_expert_label() -> String {
    "expert".into()
}

/// The keys of a `basicAuthSecret` (those of a `kubernetes.io/basic-auth` Secret).
pub const BASIC_AUTH_USERNAME_KEY: &str = "username";
pub const BASIC_AUTH_PASSWORD_KEY: &str = "password";

/// How the operator authenticates to Prometheus: exactly one of the two.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.bearerTokenSecret) != has(self.basicAuthSecret)",
        "message": "metrics.prometheus.auth takes exactly one of bearerTokenSecret and basicAuthSecret",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct PrometheusAuth {
    /// `Authorization: Bearer <token>`, the token (surrounding whitespace trimmed) in this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_secret: Option<KeyRef>,
    /// HTTP basic auth with the Secret's `username` and `password` keys (a
    /// `kubernetes.io/basic-auth` Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth_secret: Option<NameRef>,
}

/// Where the CA bundle is: exactly one of the two.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.secret) != has(self.configMap)",
        "message": "metrics.prometheus.ca takes exactly one of secret and configMap",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct PrometheusCa {
    /// A key of a Secret of the MoEDeployment's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<KeyRef>,
    /// A key of a ConfigMap of the MoEDeployment's namespace (`data` or `binaryData`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<KeyRef>,
}

/// An object of the MoEDeployment's namespace, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NameRef {
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
}

/// A key of an object of the MoEDeployment's namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KeyRef {
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME_PATTERN))]
    pub name: String,
    #[schemars(length(min = 1, max = 253), regex(pattern = DATA_KEY_PATTERN))]
    pub key: String,
}

/// A Secret's or ConfigMap's name (a DNS subdomain).
pub const OBJECT_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A key of a Secret's or ConfigMap's data.
pub const DATA_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";

/// How workers move to a new plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutStrategy {
    /// `PUT /v1/plan` to the running workers; pods stay.
    #[default]
    InPlace,
    /// Replace worker pods, each ready before the next.
    Recreate,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.maxUnavailableGroups) || !has(self.maxSurge) || self.maxUnavailableGroups + self.maxSurge >= 1",
        "message": "rollout.maxUnavailableGroups and rollout.maxSurge cannot both be 0: a rollout could never take a group out of service nor add one first",
        "fieldPath": ".maxUnavailableGroups",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct RolloutSpec {
    #[serde(default)]
    pub strategy: RolloutStrategy,
    /// Workers of one EP group that may be off the serving path at once (being updated or
    /// replaced).
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1, max = limits::MAX_NODES))]
    pub max_unavailable: i32,
    /// EP groups (`spec.replicas`) that may be out of service at once during a rollout: ready
    /// groups never drop below `replicas - maxUnavailableGroups`. Groups are updated one after
    /// the other within this budget.
    #[serde(default = "default_max_unavailable_groups")]
    #[schemars(range(min = 0, max = MAX_REPLICAS))]
    pub max_unavailable_groups: i32,
    /// Extra EP groups started on the new pod spec before an old group is replaced (a Recreate
    /// of groups), then removed when the rollout is done. Opt-in: each needs `topology.nodes`
    /// more nodes of free GPUs.
    #[serde(default)]
    #[schemars(range(min = 0, max = MAX_SURGE))]
    pub max_surge: i32,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            strategy: RolloutStrategy::default(),
            max_unavailable: default_max_unavailable(),
            max_unavailable_groups: default_max_unavailable_groups(),
            max_surge: 0,
        }
    }
}

fn default_max_unavailable_groups() -> i32 {
    1
}

fn default_max_unavailable() -> i32 {
    1
}

/// Which compute backend the worker runs its experts on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WorkerDevice {
    #[default]
    Cuda,
    Cpu,
}

impl WorkerDevice {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerDevice::Cuda => "cuda",
            WorkerDevice::Cpu => "cpu",
        }
    }
}

/// The worker pods.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// The `moe-worker` image.
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// Container resources. `nvidia.com/gpu` is set from `topology.gpusPerNode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Added to the `nvidia.com/gpu` toleration the operator always sets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    #[serde(default)]
    pub device: WorkerDevice,
    #[serde(default)]
    pub ports: WorkerPorts,
    /// Node and pod affinity, merged with the operator's own rule (one worker per node, a
    /// required pod anti-affinity on `kubernetes.io/hostname`), which is always kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// Secrets of the namespace the kubelet pulls `image` with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Added to the worker pods' labels; keys the operator sets (`app.kubernetes.io/*` of ours,
    /// `moe.craft.dev/*`, the gang schedulers' pod-group labels) are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub pod_labels: BTreeMap<String, String>,
    /// Added to the worker pods' annotations; `moe.craft.dev/*` and the gang schedulers' keys
    /// are the operator's and refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub pod_annotations: BTreeMap<String, String>,
    /// Extra volumes of the worker pods. `plan`, `admin-token`, `shm` and `checkpoint` are the
    /// operator's; a hostPath must be under a directory the cluster allows, and Secrets need
    /// `--allow-secret-volumes`. `/dev/shm` is `dataPlane.shmSize`'s.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub volumes: Vec<WorkerVolume>,
    /// Where the worker container mounts the extra `volumes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub volume_mounts: Vec<WorkerVolumeMount>,
    /// The worker container's security settings the operator lets a spec choose; the rest is
    /// fixed (no privilege escalation, every capability dropped, non-root, RuntimeDefault seccomp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<WorkerSecurityContext>,
    /// A scheduler other than the default one (e.g. the scheduler-plugins scheduler for
    /// `scheduling.gang: PodGroup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub scheduler_name: Option<String>,
    /// The RuntimeClass of the worker pods (e.g. `nvidia`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub runtime_class_name: Option<String>,
}

/// An extra volume of the worker pods: a name and exactly one source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.configMap) ? 1 : 0) + (has(self.secret) ? 1 : 0) + (has(self.persistentVolumeClaim) ? 1 : 0) + (has(self.emptyDir) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) == 1",
        "message": "worker.volumes[] needs exactly one of configMap, secret, persistentVolumeClaim, emptyDir or hostPath",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!(self.name in ['plan', 'admin-token', 'shm', 'checkpoint'])",
        "message": "worker.volumes[].name: plan, admin-token, shm and checkpoint are the operator's volumes: choose another name",
        "fieldPath": ".name",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct WorkerVolume {
    /// A DNS label, unique among the volumes.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolumeSource>,
}

/// Where the worker container mounts one of `worker.volumes`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.mountPath != '/dev/shm' && !self.mountPath.startsWith('/dev/shm/')",
        "message": "worker.volumeMounts[].mountPath: /dev/shm is the operator's memory-backed volume: size it with dataPlane.shmSize",
        "fieldPath": ".mountPath",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct WorkerVolumeMount {
    /// The name of one of `worker.volumes`.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Absolute path in the container; not one the operator mounts (or under it).
    #[schemars(length(min = 2, max = 4096), regex(pattern = "^/"))]
    pub mount_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// A path inside the volume to mount instead of its root (relative, no `..`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub sub_path: Option<String>,
}

/// The part of the worker container's securityContext a spec may set. Privilege escalation,
/// privileged mode and root stay off; capabilities are dropped, then `add`ed back one by one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSecurityContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<WorkerCapabilities>,
    /// UID of the worker process (not 0: the pods run as non-root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub run_as_user: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub run_as_group: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_root_filesystem: Option<bool>,
}

/// Capabilities of the worker container: ALL are dropped (always), then these added back.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCapabilities {
    /// `NET_BIND_SERVICE` is always allowed (as in the restricted Pod Security Standard); others
    /// only with the operator flag `--allow-capability=NAME`; `IPC_LOCK` is `dataPlane.ipcLock`'s.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(min = 1, max = 32), regex(pattern = "^[A-Z][A-Z0-9_]*$"))
    )]
    pub add: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl ImagePullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ImagePullPolicy::Always => "Always",
            ImagePullPolicy::IfNotPresent => "IfNotPresent",
            ImagePullPolicy::Never => "Never",
        }
    }
}

/// Container ports of the worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.dispatch != self.metrics && self.dispatch != self.admin && self.metrics != self.admin",
        "message": "worker.ports.dispatch, metrics and admin must be three different ports",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct WorkerPorts {
    /// Token dispatch (binary frames from the router/loadgen).
    #[serde(default = "default_dispatch_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub dispatch: i32,
    /// Prometheus `/metrics`, and the probes' `/healthz` and `/readyz`.
    #[serde(default = "default_metrics_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub metrics: i32,
    /// Admin API (`PUT`/`GET /v1/plan`), bearer token.
    #[serde(default = "default_admin_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub admin: i32,
}

impl Default for WorkerPorts {
    fn default() -> Self {
        Self {
            dispatch: default_dispatch_port(),
            metrics: default_metrics_port(),
            admin: default_admin_port(),
        }
    }
}

fn default_dispatch_port() -> i32 {
    9400
}
fn default_metrics_port() -> i32 {
    9401
}
fn default_admin_port() -> i32 {
    9402
}

/// How the expert-parallel ranks move token rows between them (docs/data-plane.md, "Transports").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// No expert-parallel group: the workers serve the dispatch protocol only (the default). A
    /// group restarts as a unit when one of its workers goes, rollouts included, so it is opt-in.
    #[default]
    None,
    /// Host memory over the control mesh's TCP sockets: CPU workers, tests, the demo.
    Tcp,
    /// GPU to GPU through CUDA IPC handles, between the ranks of one pod (all of a node's ranks
    /// are in its one worker pod).
    Ipc,
    /// NCCL send/recv on each rank's stream (NVLink in a node, the network between nodes).
    Nccl,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::None => "none",
            Transport::Tcp => "tcp",
            Transport::Ipc => "ipc",
            Transport::Nccl => "nccl",
        }
    }
}

/// The expert-parallel data plane: the ranks' rendezvous and mesh, the transport, and what NCCL
/// and RDMA need of the pod. The operator passes it to every worker as the environment of
/// docs/data-plane.md.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.shmSize) || (isQuantity(self.shmSize) && quantity(self.shmSize).isGreaterThan(quantity('0')))",
        "message": "dataPlane.shmSize must be a positive quantity such as 1Gi or 512Mi",
        "fieldPath": ".shmSize",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct DataPlaneSpec {
    #[serde(default)]
    pub transport: Transport,
    /// Port of each worker's rank mesh; rank 0 also listens for the rendezvous on it.
    #[serde(default = "default_ep_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// How long a rank waits for the whole group to join before it fails (5s to 1h).
    #[serde(default = "default_rendezvous_timeout")]
    #[schemars(
        regex(pattern = DURATION_PATTERN),
        length(max = 64)
    )]
    pub rendezvous_timeout: String,
    /// NCCL settings passed to every worker as environment variables, e.g. `NCCL_IB_HCA`,
    /// `NCCL_SOCKET_IFNAME`; names must match `^NCCL_[A-Z0-9_]+$`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "nccl_env_schema")]
    pub nccl_env: BTreeMap<String, String>,
    /// Size limit of the memory-backed `/dev/shm` of each worker pod (counts against its memory).
    #[serde(default = "default_shm_size")]
    #[schemars(length(min = 1, max = 64))]
    pub shm_size: String,
    /// Add the `IPC_LOCK` capability to the worker container (pinning memory for RDMA); the
    /// cluster's pod policy must allow it (`--allow-ipc-lock`).
    #[serde(default)]
    pub ipc_lock: bool,
}

impl Default for DataPlaneSpec {
    fn default() -> Self {
        Self {
            transport: Transport::default(),
            port: default_ep_port(),
            rendezvous_timeout: default_rendezvous_timeout(),
            nccl_env: BTreeMap::new(),
            shm_size: default_shm_size(),
            ipc_lock: false,
        }
    }
}

fn default_ep_port() -> i32 {
    9403
}
fn default_rendezvous_timeout() -> String {
    "120s".into()
}
fn default_shm_size() -> String {
    "1Gi".into()
}

/// Most `dataPlane.ncclEnv` entries.
pub const MAX_NCCL_ENV: u32 = 64;

/// `dataPlane.ncclEnv`: a bounded map of strings whose keys start with `NCCL_`. The apiserver's
/// CEL checks the prefix only: a regular expression on a map key, whose length no schema can
/// bound, is over the CRD's cost budget; `validate` checks the whole pattern.
fn nccl_env_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "NCCL settings passed to every worker as environment variables, e.g. `NCCL_IB_HCA`, `NCCL_SOCKET_IFNAME`; names must match `^NCCL_[A-Z0-9_]+$`.",
        "type": "object",
        "maxProperties": MAX_NCCL_ENV,
        "additionalProperties": {"type": "string", "maxLength": 4096},
        "x-kubernetes-validations": [{
            "rule": "self.all(k, k.startsWith('NCCL_'))",
            "message": "dataPlane.ncclEnv names must be NCCL_ variables (^NCCL_[A-Z0-9_]+$): put other variables in worker.env",
            "reason": "FieldValueInvalid"
        }]
    })
}

/// What the operator observed and did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoEDeploymentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded, PlanReady, MetricsAvailable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<ObservedLoad>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkersStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// The last EP rank failure the operator restarted the worker group for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_failure: Option<RankFailureStatus>,
    /// The gang guard's last release of a worker group it could not schedule whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<GangStatus>,
    /// EP groups with at least one live worker pod (the scale subresource's current size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// EP groups whose every worker pod is Ready (a surge group included while it serves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ready_groups: Option<i32>,
    /// `readyGroups/spec.replicas`, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_summary: Option<String>,
    /// The label selector of every worker pod of the deployment, as a string (the scale
    /// subresource's `labelSelectorPath`, which a HorizontalPodAutoscaler reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// `scheduling.gang: Guard`: when the group was last released, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GangStatus {
    pub released_at: Time,
    /// Worker pods not scheduled when the group was released.
    #[schemars(range(min = 0))]
    pub unscheduled_pods: i32,
    /// The GPUs those pods request (unscheduled pods x `gpusPerNode`).
    #[schemars(range(min = 0))]
    pub missing_gpus: i64,
    pub message: String,
}

/// The plan in force (or being rolled out).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanStatus {
    pub hash: String,
    /// First 12 hex digits of `hash`, for the printer column.
    pub short_hash: String,
    /// none, placement, eplb, craft.
    pub algorithm: String,
    #[schemars(range(min = 0))]
    pub replicas_per_gpu: i32,
    #[schemars(range(min = 0))]
    pub replica_bytes_per_gpu: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_balancedness: Option<f64>,
    /// Predicted balancedness of the plan this one replaced, on the same window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_balancedness: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computed_at: Option<Time>,
}

/// Load seen over the last window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservedLoad {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancedness: Option<f64>,
    /// `balancedness` with 3 digits (`0.982`), for the printer column: printer columns cannot
    /// format numbers, and 16 digits are not what a person reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub balancedness_text: Option<String>,
    #[schemars(range(min = 0))]
    pub tokens: i64,
    #[schemars(range(min = 0))]
    pub window_batches: i64,
}

impl ObservedLoad {
    /// The observed block, its printer text derived from `balancedness`.
    pub fn new(balancedness: Option<f64>, tokens: i64, window_batches: i64) -> Self {
        Self {
            balancedness,
            balancedness_text: balancedness.map(balancedness_text),
            tokens,
            window_batches,
        }
    }
}

/// How a balancedness is shown to people: 3 digits, in the printer columns and in `kubectl moe`.
pub fn balancedness_text(b: f64) -> String {
    format!("{b:.3}")
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkersStatus {
    #[schemars(range(min = 0))]
    pub desired: i32,
    #[schemars(range(min = 0))]
    pub ready: i32,
    #[schemars(range(min = 0))]
    pub on_current_plan: i32,
    /// `ready/desired`, for the printer column.
    pub summary: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    pub target_hash: String,
    #[schemars(range(min = 0))]
    pub updated: i32,
    #[schemars(range(min = 0))]
    pub total: i32,
}

/// An EP rank that ended with `ep rank <r>: ...` in its container's termination message
/// (docs/data-plane.md, "Failures"), and the group restart it caused. A failure that finished at
/// or before `finishedAt` never restarts the group again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RankFailureStatus {
    /// The global EP rank that failed.
    #[schemars(range(min = 0))]
    pub rank: i32,
    /// The worker pod it ran in.
    pub pod: String,
    /// What the rank wrote after `ep rank <r>: ` (the first line, at most 200 characters).
    pub message: String,
    /// When the failed container finished (the kubelet's `finishedAt`).
    pub finished_at: Time,
    /// When the operator restarted the group for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_at: Option<Time>,
}
