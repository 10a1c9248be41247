//! The gang guard (`scheduling.gang: Guard`): on a scheduler without gang scheduling, the worker
//! group is scheduled whole or its pods are released. Pure: from the worker pods' placement, the
//! time and the last release, what to do now.
//!
//! A group that is not wholly scheduled within `scheduling.timeout` of its oldest unscheduled pod
//! holds the GPUs of the pods that were placed while it cannot serve (an EP group needs every
//! rank). The guard then deletes every worker pod (the placed ones free their GPUs) and creates
//! none for another `timeout`, so other work can use the GPUs, then tries again. It reports the
//! unscheduled pods and the GPUs they request: that is what the group misses, counted from the
//! pods' requests (`gpusPerNode` each), not from the nodes' free capacity.

use k8s_openapi::api::core::v1::Pod;

use super::build::LABEL_NODE_RANK;
use crate::api::validate::GPU_RESOURCE;

/// A worker pod's placement as the guard reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub rank: u32,
    /// The scheduler bound it to a node.
    pub placed: bool,
    pub terminating: bool,
    /// Its creation, in seconds since the Unix epoch.
    pub created_s: i64,
    /// The scheduler's last word on it (the PodScheduled=False message), if any.
    pub scheduler_message: Option<String>,
}

impl Placement {
    pub fn from_pod(p: &Pod) -> Option<Self> {
        let rank = p
            .metadata
            .labels
            .as_ref()?
            .get(LABEL_NODE_RANK)?
            .parse()
            .ok()?;
        let scheduler_message = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            })
            .and_then(|c| c.message.clone());
        Some(Placement {
            rank,
            placed: p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some(),
            terminating: p.metadata.deletion_timestamp.is_some(),
            created_s: p
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or(0),
            scheduler_message,
        })
    }
}

/// What the guard found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing unscheduled: carry on.
    Whole,
    /// Some pods unscheduled, within the timeout.
    Waiting,
    /// Past the timeout with pods placed: delete every worker pod (these ranks); the message
    /// names what is missing.
    Release { ranks: Vec<u32>, message: String },
    /// Past the timeout with nothing placed: nothing is held, the pods keep waiting.
    Unschedulable { message: String },
    /// Released at `released_at_s`: create nothing until `until_s`.
    BackingOff { until_s: i64, message: String },
}

/// The guard's inputs besides the pods.
pub struct Guard {
    pub nodes: u32,
    pub gpus_per_node: u32,
    pub timeout_s: i64,
    pub now_s: i64,
    /// When the guard last released the group (`status.gang.releasedAt`).
    pub released_at_s: Option<i64>,
}

impl Guard {
    pub fn check(&self, pods: &[Placement]) -> Verdict {
        if let Some(r) = self.released_at_s {
            let until_s = r.saturating_add(self.timeout_s);
            if self.now_s < until_s {
                return Verdict::BackingOff {
                    until_s,
                    message: format!(
                        "the worker group could not be scheduled whole and was released; the next attempt creates its pods in {}s",
                        until_s - self.now_s
                    ),
                };
            }
        }
        let live: Vec<&Placement> = pods
            .iter()
            .filter(|p| !p.terminating && p.rank < self.nodes)
            .collect();
        let unscheduled: Vec<&&Placement> = live.iter().filter(|p| !p.placed).collect();
        let Some(oldest) = unscheduled.iter().map(|p| p.created_s).min() else {
            return Verdict::Whole;
        };
        if self.now_s - oldest < self.timeout_s {
            return Verdict::Waiting;
        }
        let placed: Vec<u32> = live.iter().filter(|p| p.placed).map(|p| p.rank).collect();
        let u = unscheduled.len() as u64;
        let g = u64::from(self.gpus_per_node);
        let said = unscheduled
            .iter()
            .find_map(|p| p.scheduler_message.as_deref())
            .map(|m| format!("; the scheduler says: {m}"))
            .unwrap_or_default();
        let missing = format!(
            "{u} of {} worker pods not scheduled within {}s: {} {GPU_RESOURCE} missing ({u} unscheduled pod(s) x {g} requested each){said}",
            self.nodes,
            self.timeout_s,
            u * g,
        );
        if placed.is_empty() {
            return Verdict::Unschedulable { message: missing };
        }
        let mut ranks: Vec<u32> = live.iter().map(|p| p.rank).collect();
        ranks.sort_unstable();
        ranks.dedup();
        Verdict::Release {
            message: format!(
                "{missing}; released the group: deleted its {} placed pod(s) ({} {GPU_RESOURCE}) and its unscheduled ones, next attempt in {}s",
                placed.len(),
                placed.len() as u64 * g,
                self.timeout_s
            ),
            ranks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(rank: u32, placed: bool, created_s: i64) -> Placement {
        Placement {
            rank,
            placed,
            terminating: false,
            created_s,
            scheduler_message: (!placed)
                .then(|| "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.".to_string()),
        }
    }

    fn guard(now_s: i64, released_at_s: Option<i64>) -> Guard {
        Guard {
            nodes: 3,
            gpus_per_node: 8,
            timeout_s: 60,
            now_s,
            released_at_s,
        }
    }

    #[test]
    fn a_whole_group_or_one_within_the_timeout_is_left_alone() {
        let all = [pod(0, true, 0), pod(1, true, 0), pod(2, true, 0)];
        assert_eq!(guard(1000, None).check(&all), Verdict::Whole);
        let part = [pod(0, true, 0), pod(1, true, 0), pod(2, false, 100)];
        assert_eq!(guard(159, None).check(&part), Verdict::Waiting);
        // No pods at all (before the first create): nothing to guard.
        assert_eq!(guard(1000, None).check(&[]), Verdict::Whole);
    }

    #[test]
    fn past_the_timeout_the_placed_pods_are_released_naming_the_missing_gpus() {
        let part = [pod(0, true, 0), pod(1, true, 0), pod(2, false, 100)];
        let Verdict::Release { ranks, message } = guard(160, None).check(&part) else {
            panic!("expected a release");
        };
        assert_eq!(ranks, vec![0, 1, 2]);
        assert!(
            message.starts_with("1 of 3 worker pods not scheduled within 60s: 8 nvidia.com/gpu missing (1 unscheduled pod(s) x 8 requested each); the scheduler says: 0/2 nodes are available"),
            "{message}"
        );
        assert!(
            message.contains("deleted its 2 placed pod(s) (16 nvidia.com/gpu)"),
            "{message}"
        );
        // Terminating pods are neither counted nor deleted again.
        let mut going = part.clone();
        going[0].terminating = true;
        let Verdict::Release { ranks, .. } = guard(160, None).check(&going) else {
            panic!()
        };
        assert_eq!(ranks, vec![1, 2]);
    }

    #[test]
    fn nothing_placed_is_reported_not_released_and_a_release_backs_off() {
        let none = [pod(0, false, 0), pod(1, false, 0), pod(2, false, 0)];
        match guard(60, None).check(&none) {
            Verdict::Unschedulable { message } => {
                assert!(
                    message.contains("3 of 3 worker pods")
                        && message.contains("24 nvidia.com/gpu missing"),
                    "{message}"
                )
            }
            v => panic!("{v:?}"),
        }
        // Released at 200: until 260 nothing is created, whatever the pods.
        assert!(matches!(
            guard(259, Some(200)).check(&none),
            Verdict::BackingOff { until_s: 260, .. }
        ));
        // After the back-off, a new attempt is judged afresh from its pods' creation.
        let fresh = [pod(0, true, 261), pod(1, false, 261), pod(2, false, 261)];
        assert_eq!(guard(300, Some(200)).check(&fresh), Verdict::Waiting);
    }
}
