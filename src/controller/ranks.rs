//! Which expert-parallel rank failed, from the worker pods' container statuses. Pure.
//!
//! A rank that fails (a rendezvous that does not complete in time, a peer gone) ends its process
//! with `ep rank <r>: <what happened>` in its termination message and a non-zero exit
//! (docs/data-plane.md, "Failures"). The kubelet keeps that message in the container's
//! `state.terminated`, and in `lastState.terminated` once it restarted the container. `decide`
//! restarts the whole worker group for the newest such failure it has not restarted for yet: a
//! group with a dead rank cannot step, and a rank restarted on its own would wait for peers that
//! are still in the old group.

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::rollout::{Step, WorkerState};
use crate::api::RankFailureStatus;

/// How a rank's termination message starts.
pub const MESSAGE_PREFIX: &str = "ep rank ";
/// The most characters of a rank's message kept (status, condition, event).
pub const MAX_MESSAGE_CHARS: usize = 200;

/// One failed rank, as its container's status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankFailure {
    /// The global EP rank.
    pub rank: u32,
    pub pod: String,
    pub container: String,
    /// What happened: the first line after `ep rank <r>: `, at most [`MAX_MESSAGE_CHARS`].
    pub message: String,
    /// The kubelet's `finishedAt` of the failed container.
    pub finished_at: Time,
}

impl RankFailure {
    /// Whether the group has not been restarted for this failure yet: it finished after the one
    /// recorded in `status.rankFailure`.
    ///
    /// Keyed on `finishedAt` rather than on the pod or its restart count: when a rank fails, its
    /// peers fail too, each in its own pod and within moments, and one restart is due for all of
    /// them; a failure that finished no later than the recorded one is part of what that restart
    /// handled. The record lives in the status (not an annotation) because the status is the
    /// operator's own, read fresh from the API server each reconcile (`fetch::status`) and
    /// written in the same patch as the Degraded condition. `finishedAt` comes from each node's
    /// clock: a node behind the one recorded could make a newer failure look handled, until the
    /// kubelet restarts that container and it fails again later than the record.
    pub fn is_new(&self, recorded: Option<&RankFailureStatus>) -> bool {
        recorded.is_none_or(|r| self.finished_at > r.finished_at)
    }

    /// The status record of this failure, restarted for at `now`.
    pub fn record(&self, now: &Time) -> RankFailureStatus {
        RankFailureStatus {
            rank: i32::try_from(self.rank).unwrap_or(i32::MAX),
            pod: self.pod.clone(),
            message: self.message.clone(),
            finished_at: self.finished_at.clone(),
            restarted_at: Some(now.clone()),
        }
    }
}

/// The rank and what happened, from a termination message that starts with `ep rank <r>:`.
pub fn parse_message(message: &str) -> Option<(u32, String)> {
    let line = message.lines().next()?;
    let (rank, what) = line.strip_prefix(MESSAGE_PREFIX)?.split_once(':')?;
    if rank.is_empty() || !rank.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let what: String = what.trim().chars().take(MAX_MESSAGE_CHARS).collect();
    Some((rank.parse().ok()?, what))
}

fn failure(pod: &str, container: &str, t: &ContainerStateTerminated) -> Option<RankFailure> {
    let (rank, message) = parse_message(t.message.as_deref()?)?;
    Some(RankFailure {
        rank,
        pod: pod.to_string(),
        container: container.to_string(),
        message,
        // The kubelet always sets it on a terminated container; without it there is no key.
        finished_at: t.finished_at.clone()?,
    })
}

/// The newest rank failure shown by the worker pods that are not being deleted (the ones being
/// deleted are on their way out with their group), if any. Ties (peers failing in the same
/// second) go to the first pod by name, then the lowest rank.
pub fn newest_failure(pods: &[Pod]) -> Option<RankFailure> {
    let mut found: Vec<RankFailure> = Vec::new();
    for p in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let name = p.name_any();
        let statuses = p
            .status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten());
        for cs in statuses {
            let states = [cs.state.as_ref(), cs.last_state.as_ref()];
            for t in states
                .into_iter()
                .flatten()
                .filter_map(|s| s.terminated.as_ref())
            {
                found.extend(failure(&name, &cs.name, t));
            }
        }
    }
    found.into_iter().max_by(|a, b| {
        a.finished_at
            .cmp(&b.finished_at)
            .then_with(|| b.pod.cmp(&a.pod))
            .then_with(|| b.rank.cmp(&a.rank))
    })
}

/// Why a rank of a restarting group is not ready, for status messages.
pub const RESTARTING: &str = "restarting with its EP group";

/// The rollout step of a group restart: every worker pod not already terminating is deleted,
/// nothing is created or pushed now. The next reconciles' rollout recreates the pods (once the
/// old ones are gone) on the plan and spec in force.
pub fn restart_step(workers: &[WorkerState], nodes: u32) -> Step {
    let mut delete: Vec<u32> = workers
        .iter()
        .filter(|w| !w.terminating)
        .map(|w| w.rank)
        .collect();
    delete.sort_unstable();
    delete.dedup();
    Step {
        delete,
        waiting: (0..nodes).map(|r| (r, RESTARTING)).collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStatus, PodStatus};
    use k8s_openapi::jiff::Timestamp;

    fn t(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn terminated(message: &str, at: i64) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 1,
                message: Some(message.into()),
                finished_at: Some(t(at)),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A worker pod whose container is in `state` with `last` as its last state.
    fn pod(name: &str, state: Option<ContainerState>, last: Option<ContainerState>) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.status = Some(PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                name: "worker".into(),
                state,
                last_state: last,
                ..Default::default()
            }]),
            ..Default::default()
        });
        p
    }

    #[test]
    fn messages_name_the_rank_on_their_first_line() {
        assert_eq!(
            parse_message("ep rank 3: rendezvous with demo-worker-0.demo-workers.ml.svc:9403 timed out after 120s\nbacktrace..."),
            Some((3, "rendezvous with demo-worker-0.demo-workers.ml.svc:9403 timed out after 120s".into()))
        );
        assert_eq!(
            parse_message("ep rank 12:peer 5 closed"),
            Some((12, "peer 5 closed".into()))
        );
        let long = format!("ep rank 0: {}", "x".repeat(500));
        assert_eq!(
            parse_message(&long).unwrap().1.chars().count(),
            MAX_MESSAGE_CHARS
        );
        for not in [
            "",
            "panicked at src/main.rs",
            "ep rank : x",
            "ep rank +3: x",
            "ep rank 3 x",
            "ep rank x: y",
            "EP rank 3: x",
            " ep rank 3: x",
            "error\nep rank 3: x",
        ] {
            assert_eq!(parse_message(not), None, "{not:?}");
        }
    }

    #[test]
    fn the_newest_failure_of_the_pods_not_being_deleted() {
        let running = ContainerState {
            running: Some(Default::default()),
            ..Default::default()
        };
        assert_eq!(
            newest_failure(&[pod("w-0", Some(running.clone()), None)]),
            None
        );
        // A crash that is not a rank's (FallbackToLogsOnError put the log's tail there).
        let crash = pod("w-0", None, Some(terminated("thread 'main' panicked", 50)));
        assert_eq!(newest_failure(std::slice::from_ref(&crash)), None);
        let pods = vec![
            crash,
            // Restarted by the kubelet: the failure is in lastState.
            pod(
                "w-1",
                Some(running),
                Some(terminated("ep rank 2: peer 0 went away", 100)),
            ),
            // Still terminated, newer.
            pod(
                "w-2",
                Some(terminated("ep rank 5: heartbeat timeout", 110)),
                None,
            ),
        ];
        let f = newest_failure(&pods).unwrap();
        assert_eq!(
            (
                f.rank,
                f.pod.as_str(),
                f.container.as_str(),
                f.message.as_str()
            ),
            (5, "w-2", "worker", "heartbeat timeout")
        );
        assert_eq!(f.finished_at, t(110));
        // The same second: the first pod by name.
        let tie = vec![
            pod("w-3", None, Some(terminated("ep rank 6: a", 110))),
            pods[2].clone(),
        ];
        assert_eq!(newest_failure(&tie).unwrap().pod, "w-2");
        // A pod being deleted is going with its group: not read.
        let mut gone = pods[2].clone();
        gone.metadata.deletion_timestamp = Some(t(120));
        let f = newest_failure(&[pods[1].clone(), gone]).unwrap();
        assert_eq!(f.rank, 2);
    }

    #[test]
    fn only_failures_after_the_recorded_one_are_new() {
        let f = RankFailure {
            rank: 1,
            pod: "w-0".into(),
            container: "worker".into(),
            message: "m".into(),
            finished_at: t(100),
        };
        assert!(f.is_new(None));
        let rec = f.record(&t(105));
        assert_eq!(rec.restarted_at, Some(t(105)));
        assert!(!f.is_new(Some(&rec)));
        // A peer's failure of the same moment, in another pod: the same restart handled it.
        let peer = RankFailure {
            rank: 3,
            pod: "w-1".into(),
            ..f.clone()
        };
        assert!(!peer.is_new(Some(&rec)));
        let later = RankFailure {
            finished_at: t(101),
            ..f
        };
        assert!(later.is_new(Some(&rec)));
    }

    #[test]
    fn a_restart_deletes_every_pod_not_already_going() {
        let w = |rank, terminating| WorkerState {
            group: 0,
            rank,
            terminating,
            ready: true,
            plan_hash: None,
            spec_hash: None,
            target_plan_hash: None,
            push_since_s: None,
            push_rejected: None,
            push_rejected_since_s: None,
        };
        let s = restart_step(&[w(1, false), w(0, false), w(2, true), w(3, false)], 3);
        assert_eq!(s.delete, vec![0, 1, 3]);
        assert!(s.create.is_empty() && s.push.is_empty() && s.in_flight.is_empty());
        assert!(!s.done && s.updated == 0);
        assert_eq!(s.waiting.len(), 3);
    }
}
