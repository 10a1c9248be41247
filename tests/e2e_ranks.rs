//! End-to-end test of the expert-parallel ranks on the local control plane, with the harness of
//! `tests/common/operator.rs`: a MoEDeployment of 3 nodes x 1 GPU (CPU workers, the synthetic
//! checkpoint) on the `tcp` transport with a 20 s rendezvous timeout, whose worker pods are real
//! `moe-worker` processes run by the launcher (e2e/pods), which emulates cluster DNS for rank 0's
//! address and the termination message.
//!
//! - Every worker forms the group: it logs "ep group formed" with its ranks and its /metrics says
//!   `moe_ep_group_formed 1`; the pod's env has its rank range and rank 0's DNS name, the process's
//!   env rank 0's pod IP (the DNS emulation) and the termination log's host path.
//! - Rank 2's process is SIGKILLed: within 60 s the MoEDeployment is Degraded=True, reason
//!   RankFailed, its message naming rank 2 (a surviving rank's termination message, "rank 2 went
//!   away"), and `status.rankFailure` records it (the MoEDeployment is watched, not polled: the
//!   restart can be over, and Degraded cleared, within a second); then the operator restarts the
//!   group: within 180 s three new pods (new uids) are Ready, each formed the group again, and
//!   Degraded is False.
//!
//! Needs the binaries of `e2e/build.sh`; fails (does not skip) without them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::operator::{condition, deployment, wait_for, OperatorPlane};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use log_support::strip_ansi;
use moe_operator::api::{reason, MoEDeployment};
use serde_json::json;

mod common;
mod log_support;

const NODES: u32 = 3;
const NS: &str = "ranks";
const NAME: &str = "tiny";
const EP_PORT: u16 = 9403;
const METRICS_PORT: u16 = 9401;

fn pod_dir(state: &Path, pod: &str) -> PathBuf {
    state.join("pods").join(format!("{NS}_{pod}"))
}

/// The pod's log, when the launcher's directory is this pod's (its uid file says so).
fn pod_log(state: &Path, pod: &Pod) -> Option<String> {
    let dir = pod_dir(state, &pod.name_any());
    let uid = std::fs::read_to_string(dir.join("uid")).ok()?;
    (Some(uid.as_str()) == pod.metadata.uid.as_deref())
        .then(|| std::fs::read_to_string(dir.join("log")).ok())
        .flatten()
        .map(|l| strip_ansi(&l))
}

fn read_pid(state: &Path, pod: &str) -> Option<u32> {
    std::fs::read_to_string(pod_dir(state, pod).join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The environment of a running process (`/proc/<pid>/environ`).
fn process_env(pid: u32) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

fn pod_env(p: &Pod, name: &str) -> Option<String> {
    p.spec.as_ref()?.containers[0]
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)?
        .value
        .clone()
}

fn pod_ip(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .pod_ip
        .clone()
        .filter(|ip| !ip.is_empty())
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn node_rank(p: &Pod) -> Option<u32> {
    p.labels().get("moe.craft.dev/node-rank")?.parse().ok()
}

/// A value of a worker's /metrics (`name` exactly as rendered, without labels).
async fn worker_metric(ip: &str, name: &str) -> Option<f64> {
    let r = moe_operator::worker::wire::HttpClient::new()
        .get(
            &format!("http://{ip}:{METRICS_PORT}/metrics"),
            Duration::from_secs(2),
            16 << 20,
        )
        .await
        .ok()?;
    String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The live worker pods (not terminating), by node rank.
async fn live_workers(pods: &Api<Pod>) -> Result<BTreeMap<u32, Pod>, String> {
    let list = pods
        .list(&ListParams::default().labels(&format!("moe.craft.dev/deployment={NAME}")))
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((node_rank(&p)?, p)))
        .collect())
}

/// What the worker pods' container statuses say of their terminations (for failure messages).
async fn terminations(pods: &Api<Pod>) -> String {
    let Ok(list) = pods
        .list(&ListParams::default().labels(&format!("moe.craft.dev/deployment={NAME}")))
        .await
    else {
        return "(pods not listed)".into();
    };
    list.items
        .iter()
        .map(|p| {
            let cs = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first());
            let t = |s: Option<&k8s_openapi::api::core::v1::ContainerState>| {
                s.and_then(|s| s.terminated.as_ref()).map(|t| {
                    format!(
                        "exit {} at {:?}: {:?}",
                        t.exit_code,
                        t.finished_at.as_ref().map(|f| f.0.to_string()),
                        t.message
                    )
                })
            };
            format!(
                "{} (deleting {}): restarts {:?}, state {:?}, lastState {:?}",
                p.name_any(),
                p.metadata.deletion_timestamp.is_some(),
                cs.map(|c| c.restart_count),
                t(cs.and_then(|c| c.state.as_ref())),
                t(cs.and_then(|c| c.last_state.as_ref())),
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The first version of the MoEDeployment after `version` that is Degraded=True with reason
/// RankFailed, watched (every status write is seen), within `timeout`: its Degraded message and
/// `status.rankFailure`.
async fn degraded_by_a_rank(
    mds: &Api<MoEDeployment>,
    pods: &Api<Pod>,
    mut version: String,
    timeout: Duration,
) -> (String, Option<moe_operator::api::RankFailureStatus>) {
    use futures::TryStreamExt;
    use kube::api::{WatchEvent, WatchParams};
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no change of the MoEDeployment");
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let wp = WatchParams::default()
            .fields(&format!("metadata.name={NAME}"))
            .timeout(left.as_secs().clamp(1, 290) as u32);
        let stream = mds
            .watch(&wp, &version)
            .await
            .unwrap_or_else(|e| panic!("watching the MoEDeployment from {version}: {e}"));
        let mut stream = std::pin::pin!(stream);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = match tokio::time::timeout(left, stream.try_next()).await {
                Err(_) => break,
                Ok(Err(e)) => panic!("the MoEDeployment's watch failed: {e}"),
                Ok(Ok(None)) => break, // the server ended the watch: watch again from `version`
                Ok(Ok(Some(ev))) => ev,
            };
            let md = match ev {
                WatchEvent::Added(md) | WatchEvent::Modified(md) => md,
                WatchEvent::Bookmark(b) => {
                    version = b.metadata.resource_version;
                    continue;
                }
                WatchEvent::Deleted(_) => panic!("the MoEDeployment was deleted"),
                WatchEvent::Error(e) => panic!("the MoEDeployment's watch: {e:?}"),
            };
            version = md.resource_version().unwrap_or(version);
            match condition(&md, "Degraded") {
                Some((s, r, m)) if s == "True" && r == reason::RANK_FAILED => {
                    return (m, md.status.and_then(|s| s.rank_failure));
                }
                c => {
                    last = format!(
                        "Degraded {c:?}, rankFailure {:?}",
                        md.status.and_then(|s| s.rank_failure)
                    )
                }
            }
        }
    }
    panic!(
        "timed out after {timeout:?} waiting for Degraded=True RankFailed; last seen: {last}; pods: {}",
        terminations(pods).await
    )
}

/// Waits until all `NODES` workers (none of whose uids is in `old_uids`) are Ready, logged "ep
/// group formed" with their rank and report `moe_ep_group_formed 1`; returns them by rank.
async fn group_formed(
    plane: &OperatorPlane,
    pods: &Api<Pod>,
    old_uids: &[String],
    timeout: Duration,
) -> BTreeMap<u32, Pod> {
    wait_for(
        "every worker Ready and in a formed EP group",
        timeout,
        || async {
            let live = live_workers(pods).await?;
            let mut missing = Vec::new();
            for rank in 0..NODES {
                let Some(p) = live.get(&rank) else {
                    missing.push(format!("rank {rank}: no pod"));
                    continue;
                };
                if old_uids.contains(&p.metadata.uid.clone().unwrap_or_default()) {
                    missing.push(format!("rank {rank}: still the old pod"));
                    continue;
                }
                let Some(ip) = pod_ip(p) else {
                    missing.push(format!("rank {rank}: no IP"));
                    continue;
                };
                if !pod_ready(p) {
                    missing.push(format!("rank {rank}: not Ready"));
                    continue;
                }
                let log = pod_log(&plane.state, p).unwrap_or_default();
                let logged = log.lines().any(|l| {
                    l.contains("ep group formed")
                        && l.contains(&format!("ranks={rank}..{}", rank + 1))
                });
                if !logged {
                    missing.push(format!("rank {rank}: no 'ep group formed' in its log"));
                    continue;
                }
                let gauge = worker_metric(&ip, "moe_ep_group_formed").await;
                if gauge != Some(1.0) {
                    missing.push(format!("rank {rank}: moe_ep_group_formed {gauge:?}"));
                }
            }
            if missing.is_empty() {
                Ok(live)
            } else {
                Err(missing.join("; "))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rank_degrades_the_deployment_and_the_group_restarts() {
    let t0 = Instant::now();
    let mut plane = OperatorPlane::up("moe-e2e-ranks-", NODES as usize, NS).await;
    let admin = plane.admin.clone();
    plane.start_operator("e2e-ranks");
    let ckpt = plane.checkpoint();
    let mds: Api<MoEDeployment> = Api::namespaced(admin.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let mut md = deployment(NAME, NS, &ckpt, NODES, 1, true);
    md["spec"]["dataPlane"] = json!({"transport": "tcp", "rendezvousTimeout": "20s"});
    let md: MoEDeployment = serde_json::from_value(md).unwrap();
    mds.patch(NAME, &PatchParams::apply("e2e"), &Patch::Apply(&md))
        .await
        .expect("apply MoEDeployment");

    // The group forms on every worker.
    let first = group_formed(&plane, &pods, &[], Duration::from_secs(180)).await;
    eprintln!("group formed after {:?}", t0.elapsed());
    let rank0_ip = pod_ip(&first[&0]).unwrap();
    let rendezvous_name = format!("{NAME}-worker-0.{NAME}-workers.{NS}.svc:{EP_PORT}");
    for (rank, p) in &first {
        let name = p.name_any();
        // The pod's env (the operator's): its rank range and rank 0's address by DNS name.
        for (k, v) in [
            ("MOE_NODE_RANK", rank.to_string()),
            ("MOE_GPUS_PER_NODE", "1".to_string()),
            ("MOE_EP_WORLD_SIZE", NODES.to_string()),
            ("MOE_EP_RENDEZVOUS", rendezvous_name.clone()),
            ("MOE_EP_LISTEN", format!("$(POD_IP):{EP_PORT}")),
            ("MOE_EP_TRANSPORT", "tcp".to_string()),
            ("MOE_EP_RENDEZVOUS_TIMEOUT_SECONDS", "20".to_string()),
        ] {
            assert_eq!(
                pod_env(p, k).as_deref(),
                Some(v.as_str()),
                "{name}: env {k}"
            );
        }
        // The process's env (the launcher's): the name resolved to rank 0's pod IP, its own IP
        // to listen on, and where its termination message goes.
        let pid = read_pid(&plane.state, &name).expect("a pid file");
        let env = process_env(pid);
        let ip = pod_ip(p).unwrap();
        assert_eq!(
            env.get("MOE_EP_RENDEZVOUS"),
            Some(&format!("{rank0_ip}:{EP_PORT}")),
            "{name}: the rendezvous name is not resolved to rank 0's pod IP"
        );
        assert_eq!(env.get("MOE_EP_LISTEN"), Some(&format!("{ip}:{EP_PORT}")));
        assert_eq!(env.get("MOE_NODE_RANK"), Some(&rank.to_string()));
        let term = pod_dir(&plane.state, &name).join("root/dev/termination-log");
        assert_eq!(
            env.get("MOE_TERMINATION_LOG").map(PathBuf::from),
            Some(term.clone()),
            "{name}"
        );
        assert!(term.exists(), "{} was not created", term.display());
    }
    let md_now = mds.get(NAME).await.unwrap();
    assert_ne!(
        condition(&md_now, "Degraded").map(|c| c.1),
        Some(reason::RANK_FAILED.to_string()),
        "Degraded before any rank was killed: {:?}",
        md_now.status
    );

    // SIGKILL rank 2's worker: the survivors name it, the deployment is Degraded (RankFailed).
    // The group restart can be over within a second on this plane, Degraded with it: the
    // MoEDeployment is watched from its version before the kill, so that no status write of it
    // is missed (a poll could fall between Degraded=True and its clearing).
    let version = mds
        .get(NAME)
        .await
        .unwrap()
        .resource_version()
        .expect("a resourceVersion");
    let victim = first[&2].name_any();
    let pid = read_pid(&plane.state, &victim).expect("rank 2's pid");
    // SAFETY: kill(2) takes no pointers; the pid is the launcher's child for rank 2's pod.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    let old_uids: Vec<String> = first
        .values()
        .map(|p| p.metadata.uid.clone().unwrap_or_default())
        .collect();
    let (msg, failure) = degraded_by_a_rank(&mds, &pods, version, Duration::from_secs(60)).await;
    eprintln!("Degraded {:?} after the kill: {msg}", killed.elapsed());
    assert!(msg.contains("rank 2 went away"), "{msg}");
    let failure = failure.expect("status.rankFailure");
    assert!(
        failure.rank != 2
            && failure.pod != victim
            && failure.message.contains("rank 2 went away")
            && failure.restarted_at.is_some(),
        "{failure:?}"
    );
    assert!(
        msg.contains(&format!(
            "EP rank {} failed in pod {}",
            failure.rank, failure.pod
        )),
        "{msg}"
    );

    // The operator restarts the group: new pods, the group formed again, Degraded cleared.
    let second = group_formed(&plane, &pods, &old_uids, Duration::from_secs(180)).await;
    eprintln!("group formed again {:?} after the kill", killed.elapsed());
    let rank0_ip = pod_ip(&second[&0]).unwrap();
    for p in second.values() {
        let pid = read_pid(&plane.state, &p.name_any()).expect("a pid file");
        assert_eq!(
            process_env(pid).get("MOE_EP_RENDEZVOUS"),
            Some(&format!("{rank0_ip}:{EP_PORT}")),
            "{}",
            p.name_any()
        );
    }
    wait_for(
        "Degraded cleared and Ready once the group is back",
        Duration::from_secs(60),
        || async {
            let md = mds.get(NAME).await.map_err(|e| e.to_string())?;
            let (d, r) = (condition(&md, "Degraded"), condition(&md, "Ready"));
            match (&d, &r) {
                (Some(d), Some(r)) if d.0 == "False" && r.0 == "True" => Ok(()),
                _ => Err(format!("Degraded {d:?}, Ready {r:?}")),
            }
        },
    )
    .await;
    eprintln!("whole test {:?}", t0.elapsed());
    plane.kill_operator("e2e-ranks");
}
