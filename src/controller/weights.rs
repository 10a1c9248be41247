//! Whether a worker pod could not fetch its checkpoint, from the fetch-weights init container's
//! status (`model.checkpoint.s3`). Pure.
//!
//! The fetcher ends with `fetch-weights: s3://<bucket>/<key>: <what>: <why>` in its termination
//! message (`worker::weights`); the kubelet keeps it in `state.terminated`, and in
//! `lastState.terminated` while it waits to run the container again (Init:CrashLoopBackOff).
//! `decide` reports it as Degraded, reason `WeightsFetchFailed`; the pod itself never becomes
//! ready, so the rollout does not go past it and the workers still on the old spec keep serving.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::ResourceExt;

use crate::api::pod_shape::FETCH_CONTAINER;

/// The most characters of a fetch failure kept (condition, event).
pub const MAX_MESSAGE_CHARS: usize = 400;

/// A pod whose fetch-weights init container failed, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchFailure {
    pub pod: String,
    /// The first line of the termination message, without the `fetch-weights: ` prefix.
    pub message: String,
    /// How many times the kubelet ran the container again.
    pub restarts: i32,
}

impl FetchFailure {
    /// The Degraded condition's message.
    pub fn condition_message(&self) -> String {
        format!(
            "pod {} cannot fetch its checkpoint: {} (the init container retries with back-off; pods that were serving keep serving)",
            self.pod, self.message
        )
    }
}

/// The failure an init container status shows, if it is failing now: terminated with a non-zero
/// code, or waiting to run again after such an exit. A container that since completed is fine.
fn failing(cs: &ContainerStatus) -> Option<String> {
    let state = cs.state.as_ref();
    if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
        return (t.exit_code != 0).then(|| message(t.message.as_deref(), t.exit_code));
    }
    // Waiting to run again, or running again: the last failure says why it restarted.
    let last = cs.last_state.as_ref()?.terminated.as_ref()?;
    (last.exit_code != 0).then(|| message(last.message.as_deref(), last.exit_code))
}

fn message(m: Option<&str>, code: i32) -> String {
    let m = m.unwrap_or("").trim();
    // The fetcher's own line, wherever the log tail put it (FallbackToLogsOnError).
    let line = m
        .lines()
        .rev()
        .find_map(|l| {
            l.split_once(crate::worker::weights::MESSAGE_PREFIX)
                .map(|(_, r)| r)
        })
        .or_else(|| m.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("");
    if line.is_empty() {
        return format!("the init container exited with code {code} and no message");
    }
    line.trim().chars().take(MAX_MESSAGE_CHARS).collect()
}

/// The fetch failures the live worker pods show, by pod name.
pub fn fetch_failures(pods: &[Pod]) -> Vec<FetchFailure> {
    let mut out: Vec<FetchFailure> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let cs = p
                .status
                .as_ref()?
                .init_container_statuses
                .iter()
                .flatten()
                .find(|c| c.name == FETCH_CONTAINER)?;
            Some(FetchFailure {
                pod: p.name_any(),
                message: failing(cs)?,
                restarts: cs.restart_count,
            })
        })
        .collect();
    out.sort_by(|a, b| a.pod.cmp(&b.pod));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        PodStatus,
    };

    fn term(code: i32, msg: &str) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                message: Some(msg.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(name: &str, state: ContainerState, last: Option<ContainerState>) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.status = Some(PodStatus {
            init_container_statuses: Some(vec![ContainerStatus {
                name: FETCH_CONTAINER.into(),
                state: Some(state),
                last_state: last,
                restart_count: 2,
                ..Default::default()
            }]),
            ..Default::default()
        });
        p
    }

    const BAD: &str = "fetch-weights: s3://w/m/: listing the prefix: HTTP 403 SignatureDoesNotMatch: x (the secretAccessKey in Secret c does not belong to its accessKeyId)";

    #[test]
    fn failing_and_backing_off_init_containers_are_reported() {
        let waiting = ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some("CrashLoopBackOff".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let running = ContainerState {
            running: Some(ContainerStateRunning::default()),
            ..Default::default()
        };
        let pods = vec![
            pod(
                "w-1",
                waiting,
                Some(term(1, &format!("some log line\n{BAD}\n"))),
            ),
            pod("w-0", term(1, BAD), None),
            // Completed after an earlier failure: fine.
            pod("w-2", term(0, ""), Some(term(1, BAD))),
            pod("w-3", running, Some(term(2, ""))),
        ];
        let f = fetch_failures(&pods);
        assert_eq!(f.len(), 3, "{f:?}");
        assert_eq!(f[0].pod, "w-0");
        assert!(
            f[0].message
                .starts_with("s3://w/m/: listing the prefix: HTTP 403 SignatureDoesNotMatch"),
            "{}",
            f[0].message
        );
        assert_eq!(
            f[1].message, f[0].message,
            "the fetcher's line from a log tail"
        );
        assert_eq!(
            f[2].message,
            "the init container exited with code 2 and no message"
        );
        assert!(f[0]
            .condition_message()
            .starts_with("pod w-0 cannot fetch its checkpoint: s3://w/m/"));
    }

    #[test]
    fn pods_without_the_init_container_or_terminating_are_not() {
        let mut p = pod("w-0", term(1, BAD), None);
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(fetch_failures(&[p, Pod::default()]).is_empty());
    }
}
