//! The condition types and reasons the operator writes on a MoEDeployment, and the reasons of the
//! Events it records: one set of names that the controller, `moectl` and the tests share, because
//! users alert on them (`kubectl wait --for=condition=Ready`, event reason selectors).

/// Condition types in `status.conditions`.
pub mod condition {
    /// Every worker serves the plan in force.
    pub const READY: &str = "Ready";
    /// A rollout is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// The operator holds the deployment back (the reason says why); nothing is applied.
    pub const DEGRADED: &str = "Degraded";
    /// A plan is in force.
    pub const PLAN_READY: &str = "PlanReady";
    /// The last load reading succeeded.
    pub const METRICS_AVAILABLE: &str = "MetricsAvailable";
    /// `spec.suspend`: the workers are scaled to zero, the plan kept.
    pub const SUSPENDED: &str = "Suspended";
}

/// Reasons of conditions and Events. A reason that holds the deployment back is both the
/// Degraded condition's reason and a Warning Event's.
pub mod reason {
    // Held back (Degraded=True, Ready=False, Warning event).
    /// The spec breaks a rule the CRD cannot express; the message names each field.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// `spec.initialLoad` names a trace that cannot be read.
    pub const INITIAL_LOAD_UNAVAILABLE: &str = "InitialLoadUnavailable";
    /// The plan does not fit in its ConfigMap.
    pub const PLAN_TOO_LARGE: &str = "PlanTooLarge";
    /// A worker pod would ask for what the operator's pod policy does not allow.
    pub const POD_POLICY: &str = "PodPolicy";

    // Degraded=True without holding back: the operator acts on it.
    /// An EP rank ended with `ep rank <r>: ...` (docs/data-plane.md, "Failures"): Degraded=True
    /// and Ready=False until the group is back, a Warning event, and the worker group restarted.
    pub const RANK_FAILED: &str = "RankFailed";
    /// `scheduling.gang: Guard`: the worker group was not scheduled whole within
    /// `scheduling.timeout`: Degraded=True and Ready=False naming the GPUs missing, a Warning
    /// event, and the placed pods released.
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    /// `model.checkpoint.s3`: a worker pod's fetch-weights init container failed (credentials,
    /// a missing bucket, a truncated object): Degraded=True naming the pod, the object and the
    /// cause, and a Warning event; the rollout waits on that pod, the others keep serving.
    pub const WEIGHTS_FETCH_FAILED: &str = "WeightsFetchFailed";

    // Conditions when all is well.
    /// Degraded=False.
    pub const SPEC_VALID: &str = "SpecValid";
    /// MetricsAvailable=True.
    pub const SCRAPED: &str = "Scraped";
    /// MetricsAvailable=False when no more specific reason is known.
    pub const SCRAPE_FAILED: &str = "ScrapeFailed";
    /// MetricsAvailable=False: an answer that is not the metrics contract.
    pub const GARBLED_METRICS: &str = "GarbledMetrics";
    /// MetricsAvailable=False and Degraded=True: the Secret or ConfigMap that
    /// `metrics.prometheus.auth` or `.ca` names is missing or unusable.
    pub const PROMETHEUS_CREDENTIALS_INVALID: &str = "PrometheusCredentialsInvalid";
    /// MetricsAvailable=False and Degraded=True: Prometheus answered 401 or 403.
    pub const PROMETHEUS_AUTH_REFUSED: &str = "PrometheusAuthRefused";
    /// MetricsAvailable=False and Degraded=True: the TLS handshake with Prometheus failed (its
    /// certificate does not verify against the trusted CAs, or it speaks no TLS).
    pub const PROMETHEUS_TLS_FAILED: &str = "PrometheusTLSFailed";
    /// PlanReady=True.
    pub const PLANNED: &str = "Planned";
    /// Ready=True.
    pub const WORKERS_READY: &str = "WorkersReady";
    /// Ready=False and Progressing=True.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// Progressing=False.
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
    /// Suspended=True (and Ready=False): `spec.suspend` is true; also its Event.
    pub const SUSPENDED: &str = "Suspended";
    /// Suspended=False after a suspension: the workers are brought back; also its Event.
    pub const RESUMED: &str = "Resumed";

    // Planning Events (also `replan::Decision::reason`).
    /// The first plan of a deployment.
    pub const INITIAL_PLAN: &str = "InitialPlan";
    /// A better plan replaces the one in force.
    pub const PLAN_IMPROVED: &str = "PlanImproved";
    /// A candidate kept back: its gain is below `minImprovement`.
    pub const GAIN_BELOW_MIN_IMPROVEMENT: &str = "GainBelowMinImprovement";
    /// A candidate kept back until the cooldown passes.
    pub const COOLING_DOWN: &str = "CoolingDown";
    /// The candidate is the plan in force.
    pub const PLAN_UNCHANGED: &str = "PlanUnchanged";
    /// The planner failed on the window (Warning).
    pub const PLAN_FAILED: &str = "PlanFailed";

    // Worker Events.
    /// The admin Secret was missing and a new token minted (Warning).
    pub const ADMIN_TOKEN_ROTATED: &str = "AdminTokenRotated";
    pub const WORKER_CREATED: &str = "WorkerCreated";
    pub const WORKER_REPLACED: &str = "WorkerReplaced";
    pub const PLAN_PUSHED: &str = "PlanPushed";
    /// A worker refused a push (401/403: it holds another admin token) (Warning).
    pub const PLAN_PUSH_REFUSED: &str = "PlanPushRefused";
    /// A push failed otherwise (Warning).
    pub const PLAN_PUSH_FAILED: &str = "PlanPushFailed";
    /// A worker did not take a plan in place in time and is replaced (Warning).
    pub const PLAN_PUSH_EXPIRED: &str = "PlanPushExpired";
}
