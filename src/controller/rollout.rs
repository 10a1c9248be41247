//! The rollout state machine: given the desired plan and pod spec and what the cluster shows of
//! each worker, decide the next actions. Pure, and a function of cluster state only, so an
//! operator restart resumes a rollout exactly where the cluster says it is.
//!
//! Rules:
//! - A desired rank (< `nodes`) is *unavailable* when its pod is missing, terminating or not
//!   ready, or when an in-place push to it is in flight. Actions never raise the count of
//!   unavailable ranks above `maxUnavailable` (if the cluster is already past it, they never
//!   raise it further).
//! - Never more worker pods than `nodes`: a missing rank is created only while fewer than `nodes`
//!   pods (terminating ones included, they still hold GPUs) exist.
//! - A pod whose spec hash differs from the desired one is replaced (Recreate), whatever the
//!   strategy: pod specs are immutable. A pod on the right spec but an old plan gets the plan by
//!   `PUT /v1/plan` (InPlace) or is replaced (Recreate); the plan ConfigMap must hold the desired
//!   plan before any pod is created or deleted, so replacements start on it.
//! - An in-place push is recorded on the pod (annotation [`ANNOTATION_TARGET_PLAN`]) before the
//!   `PUT`, and is in flight until the worker's `moe_worker_plan_info` reports the hash. Re-sending
//!   the `PUT` for an in-flight push is safe (the worker treats the same plan as a no-op or joins
//!   the load in progress), which is how a restarted operator finishes one.
//! - A push expires: when the worker has refused it for longer than the refusal grace (its token
//!   differs, recorded in [`ANNOTATION_PUSH_REJECTED`] from [`ANNOTATION_PUSH_REJECTED_SINCE`]; the
//!   grace lets the kubelet bring a re-created Secret to the worker's file, which it re-reads) or
//!   it has been in flight longer than the push timeout (since [`ANNOTATION_TARGET_SINCE`]), the
//!   pod is replaced. It is already counted unavailable, so the
//!   replacement costs no budget, and the new pod starts on the plan ConfigMap's plan.
//! - Availability is the pod's Ready condition (the kubelet's readiness probe on `/readyz`), never
//!   whether the operator's own scrape reached the worker: a scrape outage must not make every
//!   worker look down and so free to replace.

use k8s_openapi::api::core::v1::Pod;

use super::build::{ANNOTATION_PLAN_HASH, ANNOTATION_SPEC_HASH, LABEL_GROUP, LABEL_NODE_RANK};
use crate::api::RolloutStrategy;

/// Annotation written on a worker pod just before its plan is pushed in place.
pub const ANNOTATION_TARGET_PLAN: &str = "moe.craft.dev/target-plan-hash";
/// When the push of [`ANNOTATION_TARGET_PLAN`] began (seconds since the Unix epoch).
pub const ANNOTATION_TARGET_SINCE: &str = "moe.craft.dev/target-plan-since";
/// The plan hash whose push the worker refused (401/403: it holds another admin token).
pub const ANNOTATION_PUSH_REJECTED: &str = "moe.craft.dev/push-rejected";
/// When the worker first refused the push of [`ANNOTATION_PUSH_REJECTED`] (seconds since the epoch).
pub const ANNOTATION_PUSH_REJECTED_SINCE: &str = "moe.craft.dev/push-rejected-since";

/// What the cluster shows of one worker pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerState {
    /// The EP group (`moe.craft.dev/group`; 0 when the pod predates groups).
    pub group: u32,
    pub rank: u32,
    /// The pod has a deletion timestamp.
    pub terminating: bool,
    /// The pod's Ready condition (the worker's `/readyz`: weights loaded, plan applied).
    pub ready: bool,
    /// Plan hash in force: `moe_worker_plan_info{hash}` when scraped, else the pod's
    /// `moe.craft.dev/plan-hash` annotation; `None` when neither is known.
    pub plan_hash: Option<String>,
    /// The pod's `moe.craft.dev/spec-hash` annotation.
    pub spec_hash: Option<String>,
    /// The pod's [`ANNOTATION_TARGET_PLAN`] annotation.
    pub target_plan_hash: Option<String>,
    /// The pod's [`ANNOTATION_TARGET_SINCE`] annotation, in seconds since the Unix epoch.
    pub push_since_s: Option<i64>,
    /// The pod's [`ANNOTATION_PUSH_REJECTED`] annotation.
    pub push_rejected: Option<String>,
    /// The pod's [`ANNOTATION_PUSH_REJECTED_SINCE`] annotation.
    pub push_rejected_since_s: Option<i64>,
}

impl WorkerState {
    /// Read a worker pod as the rollout sees it. `scraped_plan_hash` is the hash its
    /// `moe_worker_plan_info` reports, when the last scrape reached it. `None` for pods that are not
    /// worker pods (no numeric node-rank label).
    pub fn from_pod(pod: &Pod, scraped_plan_hash: Option<&str>) -> Option<Self> {
        let labels = pod.metadata.labels.as_ref()?;
        let rank = labels.get(LABEL_NODE_RANK)?.parse().ok()?;
        let group = match labels.get(LABEL_GROUP) {
            Some(g) => g.parse().ok()?,
            None => 0,
        };
        let ann = |k: &str| {
            pod.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(k))
                .cloned()
        };
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Some(WorkerState {
            group,
            rank,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            ready,
            plan_hash: scraped_plan_hash
                .map(str::to_string)
                .or_else(|| ann(ANNOTATION_PLAN_HASH)),
            spec_hash: ann(ANNOTATION_SPEC_HASH),
            target_plan_hash: ann(ANNOTATION_TARGET_PLAN),
            push_since_s: ann(ANNOTATION_TARGET_SINCE).and_then(|v| v.parse::<i64>().ok()),
            push_rejected: ann(ANNOTATION_PUSH_REJECTED),
            push_rejected_since_s: ann(ANNOTATION_PUSH_REJECTED_SINCE)
                .and_then(|v| v.parse::<i64>().ok()),
        })
    }
}

/// The rollout's goal and limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutGoal {
    pub plan_hash: String,
    /// Desired spec hash of each rank's pod, indexed by rank; its length is the node count.
    pub spec_hashes: Vec<String>,
    pub strategy: RolloutStrategy,
    pub max_unavailable: u32,
    /// How long an in-place push may stay in flight before the pod is replaced, in seconds.
    pub push_timeout_s: i64,
    /// How long a worker may refuse a push (another admin token) before its pod is replaced.
    pub refusal_grace_s: i64,
    /// The time the step is decided at (seconds since the Unix epoch).
    pub now_s: i64,
}

impl RolloutGoal {
    pub fn nodes(&self) -> u32 {
        self.spec_hashes.len() as u32
    }
}

/// The next actions, each list in rank order. The caller performs them in this order: delete,
/// create, push (annotate then `PUT`), then requeues.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Pods to delete: extra ranks, and outdated pods within the unavailability budget.
    pub delete: Vec<u32>,
    /// Ranks whose pod is missing and may be created now.
    pub create: Vec<u32>,
    /// Ranks to push the desired plan to in place (annotate, then `PUT /v1/plan`).
    pub push: Vec<u32>,
    /// Ranks with a push in flight (safe to re-send if it seems lost).
    pub in_flight: Vec<u32>,
    /// Ranks whose push expired (refused or timed out): their pod is in `delete` too.
    pub expired: Vec<u32>,
    /// Why each desired rank that is not yet ready on the desired spec and plan is not, in rank
    /// order: what the rollout waits for, for status messages.
    pub waiting: Vec<(u32, &'static str)>,
    /// Desired ranks ready on the desired spec and plan.
    pub updated: u32,
    /// Whether every rank is ready on the desired spec and plan, with no extra pods.
    pub done: bool,
}

impl Step {
    /// Nothing to do now but wait for pods or pushes to progress.
    pub fn is_wait(&self) -> bool {
        !self.done && self.delete.is_empty() && self.create.is_empty() && self.push.is_empty()
    }
}

impl Step {
    /// What the rollout waits for, e.g. `rank 1 starting (not Ready yet); rank 3 plan push in
    /// flight`, at most `max` ranks named (the rest counted).
    pub fn waiting_summary(&self, max: usize) -> String {
        let mut parts: Vec<String> = self
            .waiting
            .iter()
            .take(max)
            .map(|(r, why)| format!("rank {r} {why}"))
            .collect();
        if self.waiting.len() > max {
            parts.push(format!("{} more", self.waiting.len() - max));
        }
        parts.join("; ")
    }
}

/// Per-rank classification of the observed pods.
struct Ranked<'a> {
    /// `pods[r]`: the pods observed for desired rank `r` (normally 0 or 1).
    pods: Vec<Vec<&'a WorkerState>>,
    extra: Vec<&'a WorkerState>,
}

fn classify<'a>(goal: &RolloutGoal, workers: &'a [WorkerState]) -> Ranked<'a> {
    let mut pods = vec![Vec::new(); goal.nodes() as usize];
    let mut extra = Vec::new();
    for w in workers {
        match pods.get_mut(w.rank as usize) {
            Some(slot) => slot.push(w),
            None => extra.push(w),
        }
    }
    Ranked { pods, extra }
}

fn spec_current(goal: &RolloutGoal, w: &WorkerState) -> bool {
    w.spec_hash.as_deref() == goal.spec_hashes.get(w.rank as usize).map(String::as_str)
}

fn plan_current(goal: &RolloutGoal, w: &WorkerState) -> bool {
    w.plan_hash.as_deref() == Some(goal.plan_hash.as_str())
}

fn pushing(goal: &RolloutGoal, w: &WorkerState) -> bool {
    w.target_plan_hash.as_deref() == Some(goal.plan_hash.as_str()) && !plan_current(goal, w)
}

/// A push in flight that will not complete: the worker refused this plan's push, or it has been
/// in flight past the timeout. A push without a start time (written by an older operator) only
/// expires when refused.
fn push_expired(goal: &RolloutGoal, w: &WorkerState) -> bool {
    pushing(goal, w)
        && ((w.push_rejected.as_deref() == Some(goal.plan_hash.as_str())
            && w.push_rejected_since_s
                .is_some_and(|t| goal.now_s.saturating_sub(t) > goal.refusal_grace_s))
            || w.push_since_s
                .is_some_and(|t| goal.now_s.saturating_sub(t) > goal.push_timeout_s))
}

/// Whether a desired rank's worker counts as unavailable.
fn unavailable(goal: &RolloutGoal, pods: &[&WorkerState]) -> bool {
    match pods {
        [w] => w.terminating || !w.ready || pushing(goal, w),
        // Missing, or duplicates (a stray pod with the same rank label): not serving as one rank.
        _ => true,
    }
}

/// Whether a group's workers all serve: every desired rank has exactly one pod, Ready, not
/// terminating, with no push in flight.
pub fn group_serving(goal: &RolloutGoal, workers: &[WorkerState]) -> bool {
    classify(goal, workers)
        .pods
        .iter()
        .all(|pods| !unavailable(goal, pods))
}

/// Whether a live worker of a desired rank must be replaced: its spec changed, or the strategy is
/// Recreate and its plan is old.
pub fn needs_replacement(goal: &RolloutGoal, workers: &[WorkerState]) -> bool {
    workers.iter().any(|w| {
        !w.terminating
            && w.rank < goal.nodes()
            && (!spec_current(goal, w)
                || (goal.strategy == RolloutStrategy::Recreate && !plan_current(goal, w)))
    })
}

/// Whether a live worker of a desired rank is outdated (its spec or its plan): what a surge
/// group stands in for while its group is updated.
pub fn outdated(goal: &RolloutGoal, workers: &[WorkerState]) -> bool {
    workers.iter().any(|w| {
        !w.terminating && w.rank < goal.nodes() && !(spec_current(goal, w) && plan_current(goal, w))
    })
}

/// Decide the next step of the rollout from cluster state alone.
pub fn next_step(goal: &RolloutGoal, workers: &[WorkerState]) -> Step {
    let r = classify(goal, workers);
    let mut step = Step::default();
    let budget = goal.max_unavailable.max(1);

    // Pods beyond the topology go at once: they serve no desired rank.
    step.delete
        .extend(r.extra.iter().filter(|w| !w.terminating).map(|w| w.rank));
    step.delete.sort_unstable();
    step.delete.dedup();

    let mut down: u32 = 0;
    for pods in &r.pods {
        if unavailable(goal, pods) {
            down += 1;
        }
    }

    // Existing pods, terminating ones included, against the one-pod-per-node ceiling. Deleting
    // does not free a GPU until the pod is gone, so deletions made now do not make room.
    let mut total = workers.len() as u32;
    for (rank, pods) in r.pods.iter().enumerate() {
        let rank = rank as u32;
        let live: Vec<&&WorkerState> = pods.iter().filter(|w| !w.terminating).collect();
        match (pods.len(), live.len()) {
            (0, _) => {
                if total < goal.nodes() {
                    step.create.push(rank);
                    total += 1;
                    step.waiting.push((rank, "being created"));
                } else {
                    step.waiting.push((
                        rank,
                        "missing; waiting for a terminating pod to free its GPU",
                    ));
                }
            }
            (_, 0) => step.waiting.push((rank, "terminating")), // its successor comes after
            (_, 1) if pods.len() == 1 => {
                let w = live[0];
                let current = spec_current(goal, w) && plan_current(goal, w);
                if current && w.ready {
                    step.updated += 1;
                    continue;
                }
                if current {
                    step.waiting.push((rank, "starting (not Ready yet)"));
                    continue;
                }
                let is_down = unavailable(goal, pods);
                let recreate = !spec_current(goal, w) || goal.strategy == RolloutStrategy::Recreate;
                if recreate {
                    // Replacing a pod that is already down costs no availability.
                    if is_down {
                        step.delete.push(rank);
                        step.waiting.push((rank, "not Ready; being replaced"));
                    } else if down < budget {
                        step.delete.push(rank);
                        down += 1;
                        step.waiting.push((rank, "being replaced"));
                    } else {
                        step.waiting
                            .push((rank, "outdated; waiting for the maxUnavailable budget"));
                    }
                } else if push_expired(goal, w) {
                    // Already counted down: replacing it costs no budget.
                    step.delete.push(rank);
                    step.expired.push(rank);
                    step.waiting
                        .push((rank, "plan push refused or timed out; being replaced"));
                } else if pushing(goal, w) {
                    step.in_flight.push(rank);
                    step.waiting.push((rank, "plan push in flight"));
                } else if w.ready && down < budget {
                    step.push.push(rank);
                    down += 1;
                    step.waiting.push((rank, "plan being pushed"));
                } else if w.ready {
                    step.waiting
                        .push((rank, "old plan; waiting for the maxUnavailable budget"));
                } else {
                    // A not-ready pod on the right spec gets its plan once it is ready.
                    step.waiting
                        .push((rank, "not Ready; gets the plan once Ready"));
                }
            }
            _ => {
                // Several live pods claim this rank (a stray copy): keep the first current one,
                // delete the rest. Deleting duplicates cannot lower availability: the rank is
                // already counted down.
                let keep = live
                    .iter()
                    .position(|w| spec_current(goal, w) && plan_current(goal, w))
                    .unwrap_or(0);
                for (i, _) in live.iter().enumerate() {
                    if i != keep {
                        step.delete.push(rank);
                    }
                }
                step.waiting
                    .push((rank, "several pods claim this rank; deleting extras"));
            }
        }
    }
    step.delete.sort_unstable();
    step.done =
        r.extra.is_empty() && step.updated == goal.nodes() && workers.len() as u32 == goal.nodes();
    step
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn goal(nodes: u32, strategy: RolloutStrategy, max_unavailable: u32) -> RolloutGoal {
        RolloutGoal {
            plan_hash: "new".into(),
            spec_hashes: (0..nodes).map(|r| format!("spec{r}")).collect(),
            strategy,
            max_unavailable,
            push_timeout_s: 600,
            refusal_grace_s: 120,
            now_s: 10_000,
        }
    }

    fn worker(rank: u32, plan: &str) -> WorkerState {
        WorkerState {
            group: 0,
            rank,
            terminating: false,
            ready: true,
            plan_hash: Some(plan.into()),
            spec_hash: Some(format!("spec{rank}")),
            target_plan_hash: None,
            push_since_s: None,
            push_rejected: None,
            push_rejected_since_s: None,
        }
    }

    #[test]
    fn worker_state_from_pod() {
        use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
        let mut pod = Pod::default();
        assert_eq!(WorkerState::from_pod(&pod, None), None);
        pod.metadata.labels = Some([(LABEL_NODE_RANK.to_string(), "3".to_string())].into());
        pod.metadata.annotations = Some(
            [
                (ANNOTATION_PLAN_HASH.to_string(), "started".to_string()),
                (ANNOTATION_SPEC_HASH.to_string(), "spec".to_string()),
                (ANNOTATION_TARGET_PLAN.to_string(), "next".to_string()),
            ]
            .into(),
        );
        pod.status = Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let w = WorkerState::from_pod(&pod, None).unwrap();
        assert_eq!((w.rank, w.ready, w.terminating), (3, true, false));
        assert_eq!(w.plan_hash.as_deref(), Some("started"));
        assert_eq!(w.target_plan_hash.as_deref(), Some("next"));
        // What the worker reports wins over the annotation it was started with.
        assert_eq!(
            WorkerState::from_pod(&pod, Some("next"))
                .unwrap()
                .plan_hash
                .as_deref(),
            Some("next")
        );
    }

    #[test]
    fn in_place_pushes_at_most_max_unavailable() {
        let g = goal(4, RolloutStrategy::InPlace, 2);
        let ws: Vec<_> = (0..4).map(|r| worker(r, "old")).collect();
        let s = next_step(&g, &ws);
        assert_eq!(s.push, [0, 1]);
        assert!(s.delete.is_empty() && s.create.is_empty() && !s.done);
    }

    #[test]
    fn in_flight_pushes_hold_the_budget_across_a_restart() {
        let g = goal(3, RolloutStrategy::InPlace, 1);
        let mut ws: Vec<_> = (0..3).map(|r| worker(r, "old")).collect();
        ws[1].target_plan_hash = Some("new".into());
        let s = next_step(&g, &ws);
        assert_eq!(
            (s.push.as_slice(), s.in_flight.as_slice()),
            (&[][..], &[1][..])
        );
        assert!(s.is_wait());
        // The worker reports the new hash: the next rank gets it.
        ws[1].plan_hash = Some("new".into());
        let s = next_step(&g, &ws);
        assert_eq!(s.push, [0]);
        assert_eq!(s.updated, 1);
    }

    #[test]
    fn recreate_replaces_one_at_a_time_and_waits_for_ready() {
        let g = goal(3, RolloutStrategy::Recreate, 1);
        let mut ws: Vec<_> = (0..3).map(|r| worker(r, "old")).collect();
        assert_eq!(next_step(&g, &ws).delete, [0]);
        ws[0].terminating = true;
        assert!(next_step(&g, &ws).is_wait());
        ws.remove(0);
        let s = next_step(&g, &ws);
        assert_eq!(
            (s.create.as_slice(), s.delete.as_slice()),
            (&[0][..], &[][..])
        );
        let mut fresh = worker(0, "new");
        fresh.ready = false;
        ws.insert(0, fresh);
        assert!(next_step(&g, &ws).is_wait());
        ws[0].ready = true;
        assert_eq!(next_step(&g, &ws).delete, [1]);
    }

    #[test]
    fn spec_changes_recreate_even_in_place() {
        let g = goal(2, RolloutStrategy::InPlace, 1);
        let mut ws: Vec<_> = (0..2).map(|r| worker(r, "new")).collect();
        ws[1].spec_hash = Some("older-image".into());
        let s = next_step(&g, &ws);
        assert_eq!(
            (s.delete.as_slice(), s.push.as_slice()),
            (&[1][..], &[][..])
        );
    }

    #[test]
    fn extra_pods_go_and_missing_ones_wait_for_room() {
        let g = goal(2, RolloutStrategy::InPlace, 1);
        let ws = vec![worker(0, "new"), worker(2, "new"), worker(3, "new")];
        let s = next_step(&g, &ws);
        assert_eq!(s.delete, [2, 3]);
        assert!(
            s.create.is_empty(),
            "3 pods exist for 2 nodes: no creation until the extras are gone"
        );
        let s = next_step(&g, &ws[..1]);
        assert_eq!(s.create, [1]);
    }

    #[test]
    fn done_when_all_ready_and_current() {
        let g = goal(2, RolloutStrategy::Recreate, 1);
        let ws: Vec<_> = (0..2).map(|r| worker(r, "new")).collect();
        let s = next_step(&g, &ws);
        assert!(s.done && s.updated == 2 && !s.is_wait());
    }

    #[test]
    fn down_pods_are_replaced_without_spending_budget() {
        let g = goal(3, RolloutStrategy::Recreate, 1);
        let mut ws: Vec<_> = (0..3).map(|r| worker(r, "old")).collect();
        ws[2].ready = false;
        // Rank 2 is already down, so replacing it is free; rank 0 would be a second one down.
        assert_eq!(next_step(&g, &ws).delete, [2]);
    }

    #[test]
    fn the_step_says_what_it_waits_for() {
        let g = goal(4, RolloutStrategy::InPlace, 1);
        let mut ws: Vec<_> = (0..4).map(|r| worker(r, "old")).collect();
        ws[0].plan_hash = Some("new".into());
        ws[1].target_plan_hash = Some("new".into());
        ws[2].ready = false;
        ws.remove(3);
        let s = next_step(&g, &ws);
        assert_eq!(
            s.waiting_summary(8),
            "rank 1 plan push in flight; rank 2 not Ready; gets the plan once Ready; \
             rank 3 being created"
        );
        assert_eq!(s.waiting_summary(1), "rank 1 plan push in flight; 2 more");
        assert!(
            next_step(&g, &(0..4).map(|r| worker(r, "new")).collect::<Vec<_>>())
                .waiting
                .is_empty()
        );
    }

    #[test]
    fn refused_or_stale_pushes_expire_into_a_replacement() {
        let g = goal(3, RolloutStrategy::InPlace, 1);
        let mut ws: Vec<_> = (0..3).map(|r| worker(r, "old")).collect();
        ws[1].target_plan_hash = Some("new".into());
        ws[1].push_since_s = Some(g.now_s - 60);
        assert_eq!(next_step(&g, &ws).in_flight, [1]);
        // The worker answered 401: it holds another token. Within the grace it may still read
        // the re-created Secret, so the push stays in flight; past it, the pod is replaced.
        ws[1].push_rejected = Some("new".into());
        ws[1].push_rejected_since_s = Some(g.now_s - 60);
        assert_eq!(next_step(&g, &ws).in_flight, [1]);
        ws[1].push_rejected_since_s = Some(g.now_s - 121);
        let s = next_step(&g, &ws);
        assert_eq!(
            (s.delete.as_slice(), s.expired.as_slice()),
            (&[1][..], &[1][..])
        );
        assert!(
            s.push.is_empty(),
            "the budget stays with the rank being replaced"
        );
        // A refusal of an older plan does not expire this push, but the timeout does.
        ws[1].push_rejected = Some("older".into());
        assert!(next_step(&g, &ws).expired.is_empty());
        ws[1].push_since_s = Some(g.now_s - 601);
        assert_eq!(next_step(&g, &ws).expired, [1]);
    }

    #[test]
    fn a_spec_rollout_with_every_scrape_failing_replaces_one_pod_at_a_time() {
        // The probe of issue 19: the metrics port changed, so scrapes of the old pods fail; their
        // Ready condition still says they serve. Plan hashes fall back to the pods' annotations.
        let g = goal(2, RolloutStrategy::InPlace, 1);
        let mut ws: Vec<_> = (0..2).map(|r| worker(r, "new")).collect();
        for w in &mut ws {
            w.spec_hash = Some("old-ports".into());
        }
        assert_eq!(next_step(&g, &ws).delete, [0]);
        ws[0].terminating = true;
        assert!(next_step(&g, &ws).delete.is_empty());
    }

    /// A simulated cluster that the step's actions are applied to.
    #[derive(Clone, Debug)]
    struct Sim {
        workers: Vec<WorkerState>,
    }

    fn count_down(goal: &RolloutGoal, ws: &[WorkerState]) -> u32 {
        let r = classify(goal, ws);
        r.pods.iter().filter(|p| unavailable(goal, p)).count() as u32
    }

    impl Sim {
        fn apply(&mut self, goal: &RolloutGoal, s: &Step) {
            for &rank in &s.delete {
                // Duplicates: the step lists a rank once per copy to delete; mark one copy.
                if let Some(w) = self
                    .workers
                    .iter_mut()
                    .find(|w| w.rank == rank && !w.terminating)
                {
                    w.terminating = true;
                }
            }
            for &rank in &s.create {
                self.workers.push(WorkerState {
                    group: 0,
                    rank,
                    terminating: false,
                    ready: false,
                    plan_hash: Some(goal.plan_hash.clone()),
                    spec_hash: Some(goal.spec_hashes[rank as usize].clone()),
                    target_plan_hash: None,
                    push_since_s: None,
                    push_rejected: None,
                    push_rejected_since_s: None,
                });
            }
            for &rank in &s.push {
                for w in self
                    .workers
                    .iter_mut()
                    .filter(|w| w.rank == rank && !w.terminating)
                {
                    w.target_plan_hash = Some(goal.plan_hash.clone());
                }
            }
        }

        /// The world moves on: each flag is one pod's chance to progress this tick.
        fn progress(&mut self, goal: &RolloutGoal, luck: &[bool]) {
            let mut i = 0;
            let mut next = || {
                i += 1;
                luck.get(i % luck.len().max(1)).copied().unwrap_or(true)
            };
            let mut kept = Vec::new();
            for mut w in self.workers.drain(..) {
                let lucky = next();
                if w.terminating {
                    if !lucky {
                        kept.push(w);
                    }
                    continue;
                }
                if lucky {
                    if pushing(goal, &w) {
                        w.plan_hash = w.target_plan_hash.clone();
                    } else if !w.ready {
                        w.ready = true;
                    }
                }
                kept.push(w);
            }
            self.workers = kept;
        }
    }

    fn arb_worker(nodes: u32) -> impl Strategy<Value = WorkerState> {
        (
            0..nodes + 2,
            any::<bool>(),
            prop_oneof![
                Just(None),
                Just(Some("old".to_string())),
                Just(Some("new".to_string()))
            ],
            prop_oneof![Just(true), Just(false)],
            prop_oneof![
                Just(None),
                Just(Some("new".to_string())),
                Just(Some("stale".to_string()))
            ],
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
        )
            .prop_map(
                |(rank, ready, plan_hash, spec_ok, target_plan_hash, terminating, rejected)| {
                    WorkerState {
                        group: 0,
                        rank,
                        terminating,
                        ready,
                        plan_hash,
                        spec_hash: Some(if spec_ok {
                            format!("spec{rank}")
                        } else {
                            "old-spec".into()
                        }),
                        target_plan_hash,
                        push_since_s: None,
                        push_rejected: rejected.then(|| "new".to_string()),
                        push_rejected_since_s: rejected.then_some(0),
                    }
                },
            )
    }

    fn arb_case() -> impl Strategy<Value = (RolloutGoal, Vec<WorkerState>, Vec<bool>)> {
        (1u32..7, any::<bool>()).prop_flat_map(|(nodes, recreate)| {
            let strategy = if recreate {
                RolloutStrategy::Recreate
            } else {
                RolloutStrategy::InPlace
            };
            (
                (1..=nodes).prop_map(move |mu| goal(nodes, strategy, mu)),
                prop::collection::vec(arb_worker(nodes), 0..(nodes as usize + 3)),
                prop::collection::vec(prop::bool::weighted(0.4), 1..16),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// No step takes more ranks down than maxUnavailable allows, no step grows the pod count
        /// past the node count, and the rollout finishes once pods and pushes make progress.
        #[test]
        fn steps_respect_limits_and_terminate((g, ws, luck) in arb_case()) {
            let mut sim = Sim { workers: ws };
            let mut finished = false;
            for tick in 0..400 {
                let before_down = count_down(&g, &sim.workers);
                let before_pods = sim.workers.len() as u32;
                let step = next_step(&g, &sim.workers);
                if step.done {
                    // Done means every rank serves the desired spec and plan.
                    for w in &sim.workers {
                        prop_assert!(w.ready && !w.terminating && plan_current(&g, w) && spec_current(&g, w));
                    }
                    prop_assert_eq!(sim.workers.len() as u32, g.nodes());
                    finished = true;
                    break;
                }
                sim.apply(&g, &step);
                let after_down = count_down(&g, &sim.workers);
                prop_assert!(
                    after_down <= before_down.max(g.max_unavailable),
                    "tick {}: {} -> {} down with maxUnavailable {}: {:?}", tick, before_down, after_down, g.max_unavailable, step
                );
                prop_assert!(sim.workers.len() as u32 <= before_pods.max(g.nodes()), "tick {}: pod count grew past nodes", tick);
                // Progress is random early on, then certain, so every run can finish.
                if tick < 50 { sim.progress(&g, &luck) } else { sim.progress(&g, &[true]) }
            }
            prop_assert!(finished, "rollout did not finish: {:?}", sim.workers);
        }

        /// The step is a function of the observed state only (restart safety): the order in which
        /// the pods are listed does not change it.
        #[test]
        fn step_ignores_listing_order((g, ws, _luck) in arb_case()) {
            let mut rev = ws.clone();
            rev.reverse();
            let (a, b) = (next_step(&g, &ws), next_step(&g, &rev));
            prop_assert_eq!((a.create, a.push, a.in_flight, a.updated, a.done), (b.create, b.push, b.in_flight, b.updated, b.done));
        }
    }
}
