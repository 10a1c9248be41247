//! Pure status helpers: conditions that keep their transition time while unchanged, and the
//! status blocks built from a plan and the worker states.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::build::selector_labels;
use super::groups::GroupsStep;
use super::rollout::WorkerState;
use crate::api::{MoEDeployment, MoEDeploymentStatus, PlanStatus, WorkersStatus};
use crate::plan::ExpertPlan;

/// Set a condition of `kind`, keeping `lastTransitionTime` when the status does not change.
/// Returns whether anything changed (so status is written only when it does).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> bool {
    let status = if status { "True" } else { "False" };
    let next = |last: Time| Condition {
        type_: kind.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: last,
    };
    match conditions.iter_mut().find(|c| c.type_ == kind) {
        Some(c) => {
            let last = if c.status == status {
                c.last_transition_time.clone()
            } else {
                now.clone()
            };
            let updated = next(last);
            let changed = *c != updated;
            *c = updated;
            changed
        }
        None => {
            conditions.push(next(now.clone()));
            true
        }
    }
}

/// Whether condition `kind` is present and True.
pub fn is_true(conditions: &[Condition], kind: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == kind && c.status == "True")
}

/// The `status.plan` block for a plan; `previous` is the balancedness of the plan it replaced.
pub fn plan_status(
    plan: &ExpertPlan,
    previous: Option<f64>,
    computed_at: Option<Time>,
) -> PlanStatus {
    PlanStatus {
        hash: plan.hash.clone(),
        short_hash: plan.short_hash().to_string(),
        algorithm: plan.algorithm.to_string(),
        replicas_per_gpu: i32::try_from(plan.replicas_per_gpu).unwrap_or(i32::MAX),
        replica_bytes_per_gpu: i64::try_from(plan.replica_bytes_per_gpu).unwrap_or(i64::MAX),
        predicted_balancedness: plan.stats.as_ref().map(|s| s.balancedness),
        previous_balancedness: previous,
        computed_at,
    }
}

/// The `status.workers` block from the observed workers of the serving groups (`replicas`
/// groups of `nodes` ranks) and how many of them are ready on the desired spec and plan.
pub fn workers_status(
    nodes: u32,
    replicas: u32,
    workers: &[WorkerState],
    updated: u32,
) -> WorkersStatus {
    let ready = workers
        .iter()
        .filter(|w| w.group < replicas && w.rank < nodes && w.ready && !w.terminating)
        .count() as i32;
    let desired = (nodes * replicas) as i32;
    WorkersStatus {
        desired,
        ready,
        on_current_plan: updated as i32,
        summary: format!("{ready}/{desired}"),
    }
}

/// The scale subresource's view: live and ready groups, and the label selector of the workers.
pub fn groups_status(
    md: &MoEDeployment,
    status: &mut MoEDeploymentStatus,
    steps: &GroupsStep,
    replicas: u32,
) {
    status.replicas = Some(steps.live_groups as i32);
    status.ready_groups = Some(steps.ready_groups as i32);
    status.groups_summary = Some(format!("{}/{replicas}", steps.ready_groups));
    status.selector = Some(
        selector_labels(md)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut cs = Vec::new();
        assert!(set_condition(
            &mut cs,
            "Ready",
            false,
            "Starting",
            "0/2 ready",
            Some(1),
            &t(10)
        ));
        assert!(!set_condition(
            &mut cs,
            "Ready",
            false,
            "Starting",
            "0/2 ready",
            Some(1),
            &t(20)
        ));
        assert_eq!(cs[0].last_transition_time, t(10));
        // Message changes are written, the transition time stays.
        assert!(set_condition(
            &mut cs,
            "Ready",
            false,
            "Starting",
            "1/2 ready",
            Some(1),
            &t(30)
        ));
        assert_eq!(cs[0].last_transition_time, t(10));
        assert!(set_condition(
            &mut cs,
            "Ready",
            true,
            "AllWorkersReady",
            "2/2 ready",
            Some(1),
            &t(40)
        ));
        assert_eq!(cs[0].last_transition_time, t(40));
        assert!(is_true(&cs, "Ready") && !is_true(&cs, "Degraded"));
        assert!(set_condition(
            &mut cs,
            "Degraded",
            false,
            "AsExpected",
            "",
            Some(1),
            &t(40)
        ));
        assert_eq!(cs.len(), 2);
    }

    #[test]
    fn workers_summary_counts_ready_desired_ranks() {
        let w = |rank, ready| WorkerState {
            group: 0,
            rank,
            terminating: false,
            ready,
            plan_hash: None,
            spec_hash: None,
            target_plan_hash: None,
            push_since_s: None,
            push_rejected: None,
            push_rejected_since_s: None,
        };
        let ws = [w(0, true), w(1, false), w(5, true)];
        let s = workers_status(2, 1, &ws, 1);
        assert_eq!(
            (s.desired, s.ready, s.on_current_plan, s.summary.as_str()),
            (2, 1, 1, "1/2")
        );
    }
}
