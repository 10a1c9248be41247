//! `helm upgrade` of the operator itself, on the local control plane: the chart's own Deployment
//! runs (its pods process-backed, the chart's image mapped to the `moe-operator` just built by
//! e2e/cluster.sh, each pod under the chart's ServiceAccount through its mounted token), with one
//! replica and then two. Each upgrade rolls the pods (a pod annotation changes) and must finish
//! (`helm upgrade --wait`): the new pods Ready, the old ones gone, the old leader released the
//! Lease before the new one started acting (no two leaders at once), the new leader took over
//! within seconds and reconciles a spec change within a bounded time, and what the deployments
//! own was not touched again (same worker pods, plan and owned objects' resourceVersions).
//!
//! Needs the binaries of `e2e/build.sh`; fails (does not skip) without them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::operator::{deployment, tool, wait_for, OperatorPlane, OP_NS, RELEASE};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use moe_operator::api::MoEDeployment;
use serde_json::json;

mod common;

const NS: &str = "ml";
const DEPLOYMENTS: [&str; 2] = ["alpha", "beta"];
/// From the last release of the Lease to the new leader holding it: a standby looks every 2 s.
const HANDOVER: Duration = Duration::from_secs(6);
/// From a spec change to the new leader's status for it.
const RECONCILE: Duration = Duration::from_secs(30);

fn operator_selector() -> String {
    format!("app.kubernetes.io/name=moe-operator,app.kubernetes.io/instance={RELEASE}")
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The operator's pods: (name, ready, terminating).
async fn operator_pods(admin: &Client) -> Result<Vec<(String, bool, bool)>, String> {
    let pods = Api::<Pod>::namespaced(admin.clone(), OP_NS)
        .list(&ListParams::default().labels(&operator_selector()))
        .await
        .map_err(|e| e.to_string())?;
    Ok(pods
        .items
        .iter()
        .map(|p| {
            (
                p.name_any(),
                ready(p),
                p.metadata.deletion_timestamp.is_some(),
            )
        })
        .collect())
}

/// (holder, transitions, acquireTime in ms) of the operator's Lease.
async fn lease(admin: &Client) -> Result<(String, i32, Option<i64>), String> {
    let l = Api::<Lease>::namespaced(admin.clone(), OP_NS)
        .get(RELEASE)
        .await
        .map_err(|e| e.to_string())?;
    let s = l.spec.unwrap_or_default();
    Ok((
        s.holder_identity.unwrap_or_default(),
        s.lease_transitions.unwrap_or(0),
        s.acquire_time.map(|t| t.0.as_millisecond()),
    ))
}

/// A value of the operator's own `/metrics` at the pod's IP (process-backed pods listen there).
async fn pod_metric(admin: &Client, pod: &str, name: &str) -> Option<f64> {
    let p = Api::<Pod>::namespaced(admin.clone(), OP_NS)
        .get(pod)
        .await
        .ok()?;
    let ip = p.status?.pod_ip?;
    let r = moe_operator::worker::wire::HttpClient::new()
        .get(
            &format!("http://{ip}:8080/metrics"),
            Duration::from_secs(2),
            1 << 20,
        )
        .await
        .ok()?;
    String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// When (ms since the epoch) operator pod `pod` first logged a message containing `what` (its
/// JSON log, as the launcher keeps it).
fn logged_at(state: &Path, pod: &str, what: &str) -> Option<i64> {
    let path = state
        .join("pods")
        .join(format!("{OP_NS}_{pod}"))
        .join("log");
    let text = std::fs::read_to_string(&path).ok()?;
    text.lines().find_map(|l| {
        let l: serde_json::Value = serde_json::from_str(l).ok()?;
        if !l["fields"]["message"].as_str()?.contains(what) {
            return None;
        }
        let ts: k8s_openapi::jiff::Timestamp = l["timestamp"].as_str()?.parse().ok()?;
        Some(ts.as_millisecond())
    })
}

/// What a deployment owns that a second actor, or a leader redoing the first one's work, would
/// change: the worker pods' UIDs, the plan hash, the owned objects' resourceVersions.
async fn owned_state(admin: &Client, name: &str) -> Result<BTreeMap<String, String>, String> {
    let e = |e: kube::Error| format!("{name}: {e}");
    let mut out = BTreeMap::new();
    let pods = Api::<Pod>::namespaced(admin.clone(), NS)
        .list(&ListParams::default().labels(&format!("moe.craft.dev/deployment={name}")))
        .await
        .map_err(e)?;
    for p in pods.items {
        out.insert(format!("pod {}", p.name_any()), p.uid().unwrap_or_default());
    }
    let rv = |o: &dyn Fn() -> Option<String>| o().unwrap_or_default();
    let cm = Api::<ConfigMap>::namespaced(admin.clone(), NS)
        .get(&format!("{name}-plan"))
        .await
        .map_err(e)?;
    out.insert("configmap".into(), rv(&|| cm.resource_version()));
    let s = Api::<Secret>::namespaced(admin.clone(), NS)
        .get(&format!("{name}-admin-token"))
        .await
        .map_err(e)?;
    out.insert("secret".into(), rv(&|| s.resource_version()));
    let svc = Api::<Service>::namespaced(admin.clone(), NS)
        .get(&format!("{name}-workers"))
        .await
        .map_err(e)?;
    out.insert("service".into(), rv(&|| svc.resource_version()));
    let pdb = Api::<PodDisruptionBudget>::namespaced(admin.clone(), NS)
        .get(&format!("{name}-workers"))
        .await
        .map_err(e)?;
    out.insert("pdb".into(), rv(&|| pdb.resource_version()));
    let md = Api::<MoEDeployment>::namespaced(admin.clone(), NS)
        .get(name)
        .await
        .map_err(e)?;
    let plan = md.status.and_then(|s| s.plan).map(|p| p.hash);
    out.insert("plan".into(), plan.unwrap_or_default());
    Ok(out)
}

/// Waits until `name`'s status says it reconciled its current generation, with a plan and all
/// its workers Ready; returns the generation.
async fn reconciled(admin: &Client, name: &str, timeout: Duration) -> i64 {
    let mds: Api<MoEDeployment> = Api::namespaced(admin.clone(), NS);
    wait_for(
        &format!("MoEDeployment {name} reconciled"),
        timeout,
        || async {
            let md = mds.get(name).await.map_err(|e| e.to_string())?;
            let g = md.metadata.generation.unwrap_or(0);
            let st = md.status.clone().unwrap_or_default();
            let workers = st.workers.as_ref().map(|w| (w.ready, w.desired));
            match (st.observed_generation, &st.plan, workers) {
                (Some(o), Some(_), Some((r, d))) if o == g && r == d && d > 0 => Ok(g),
                _ => Err(format!(
                    "generation {g}, observed {:?}, plan {}, workers (ready, desired) {workers:?}",
                    st.observed_generation,
                    st.plan.is_some()
                )),
            }
        },
    )
    .await
}

/// `helm upgrade --wait` with `set`, the rest of the values kept; how long it took.
fn helm_upgrade(plane: &OperatorPlane, set: &[&str]) -> Duration {
    let chart = common::repo().join("charts/moe-operator");
    let mut args = vec![
        "upgrade",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        OP_NS,
        "--reuse-values",
        "--wait",
        "--timeout",
        "120s",
    ];
    for s in set {
        // Annotation values are strings; the schema refuses `rev=2` as a number.
        let flag = if s.starts_with("podAnnotations.") {
            "--set-string"
        } else {
            "--set"
        };
        args.extend([flag, s]);
    }
    let t = Instant::now();
    tool(&plane.bin, "helm", &args, &plane.admin_kc);
    t.elapsed()
}

/// Rolls the operator with `set` and checks the handover; `replicas` is the count after it.
async fn roll(plane: &OperatorPlane, set: &[&str], replicas: usize) {
    let admin = plane.admin.clone();
    let before: Vec<String> = operator_pods(&admin)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.0)
        .collect();
    let (old_leader, transitions, _) = lease(&admin).await.unwrap();
    let mut owned = BTreeMap::new();
    for d in DEPLOYMENTS {
        owned.insert(d, owned_state(&admin, d).await.unwrap());
    }

    let took = helm_upgrade(plane, set);
    eprintln!("helm upgrade {set:?} finished in {took:?}");

    // The new pods Ready, the old ones gone.
    let now = wait_for(
        "the old operator pods gone and the new ones Ready",
        Duration::from_secs(60),
        || async {
            let pods = operator_pods(&admin).await?;
            let old: Vec<_> = pods.iter().filter(|p| before.contains(&p.0)).collect();
            let new: Vec<_> = pods.iter().filter(|p| !before.contains(&p.0)).collect();
            if old.is_empty() && new.len() == replicas && new.iter().all(|p| p.1 && !p.2) {
                Ok(new.iter().map(|p| p.0.clone()).collect::<Vec<_>>())
            } else {
                Err(format!("{pods:?} (old: {before:?})"))
            }
        },
    )
    .await;

    // A new leader, one of the new pods, from the Lease and from the pods' own metric.
    let (leader, new_transitions, acquired) = wait_for(
        "a new pod holding the Lease",
        HANDOVER + Duration::from_secs(20),
        || async {
            let l = lease(&admin).await?;
            if now.contains(&l.0) {
                Ok(l)
            } else {
                Err(format!("Lease {l:?}, pods {now:?}"))
            }
        },
    )
    .await;
    // With two replicas the Lease may pass through the old standby on its way (it may be stopped
    // after the leader); each step is a release and a take-over.
    let handovers = new_transitions - transitions;
    assert!(
        (1..=replicas as i32).contains(&handovers),
        "{handovers} Lease transitions from {old_leader} to {leader}"
    );
    for p in &now {
        let want = if *p == leader { 1.0 } else { 0.0 };
        wait_for(
            &format!("moe_operator_leader {want} on {p}"),
            Duration::from_secs(10),
            || async {
                match pod_metric(&admin, p, "moe_operator_leader").await {
                    Some(v) if v == want => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
    }

    // Every old leader stopped acting and released the Lease before the next one started, and
    // the new one took over within a standby's retry, not once the Lease ran out (15 s).
    assert!(
        logged_at(&plane.state, &old_leader, "released the Lease").is_some(),
        "{old_leader} did not log releasing the Lease"
    );
    let released = before
        .iter()
        .filter_map(|p| logged_at(&plane.state, p, "released the Lease"))
        .max()
        .unwrap();
    let started = logged_at(&plane.state, &leader, "leading: starting the controller")
        .unwrap_or_else(|| panic!("{leader} did not log leading"));
    assert!(
        released <= started,
        "{leader} started acting {} ms before the last old leader released the Lease",
        released - started
    );
    let acquired = acquired.expect("acquireTime");
    assert!(
        acquired - released <= HANDOVER.as_millis() as i64,
        "{leader} took the Lease {} ms after it was released",
        acquired - released
    );
    eprintln!(
        "handover {old_leader} -> {leader} ({handovers} transition(s)): {} ms from the last \
         release to the new acquireTime",
        acquired - released
    );

    // Nothing any deployment owns was touched again by the handover.
    for d in DEPLOYMENTS {
        assert_eq!(
            owned_state(&admin, d).await.unwrap(),
            owned[d],
            "{d}'s owned objects changed across the handover"
        );
    }
    // The new leader reconciles: a spec change to one deployment is observed within RECONCILE,
    // and the other is still reconciled at its generation.
    let mds: Api<MoEDeployment> = Api::namespaced(admin.clone(), NS);
    let md = mds.get(DEPLOYMENTS[0]).await.unwrap();
    let interval = if md.spec.metrics.interval == "2s" {
        "3s"
    } else {
        "2s"
    };
    mds.patch(
        DEPLOYMENTS[0],
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"metrics": {"interval": interval}}})),
    )
    .await
    .unwrap();
    let t = Instant::now();
    let g = reconciled(&admin, DEPLOYMENTS[0], RECONCILE).await;
    assert_eq!(g, md.metadata.generation.unwrap() + 1);
    eprintln!(
        "the new leader reconciled a spec change in {:?}",
        t.elapsed()
    );
    reconciled(&admin, DEPLOYMENTS[1], RECONCILE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_rolls_the_operator_with_one_and_two_replicas() {
    let plane = OperatorPlane::up_running_chart("moe-e2e-upgrade-", 2, NS, |state| {
        format!(
            "replicaCount: 1\n\
             logFormat: json\n\
             logLevel: info,moe_operator=debug,kube=warn\n\
             podLabels: {{moe.craft.dev/process-backed: \"true\"}}\n\
             tolerations: [{{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}}]\n\
             podPolicy: {{hostPathPrefixes: [{:?}]}}\n",
            state.display().to_string()
        )
    })
    .await;
    let admin = plane.admin.clone();

    // The first pod comes up Ready and leads.
    let first = wait_for(
        "the operator pod Ready",
        Duration::from_secs(90),
        || async {
            match operator_pods(&admin).await?.as_slice() {
                [(name, true, false)] => Ok(name.clone()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    wait_for("the first pod leading", Duration::from_secs(30), || async {
        let l = lease(&admin).await?;
        if l.0 == first {
            Ok(())
        } else {
            Err(format!("{l:?}"))
        }
    })
    .await;

    let ckpt = plane.checkpoint();
    let mds: Api<MoEDeployment> = Api::namespaced(admin.clone(), NS);
    for d in DEPLOYMENTS {
        let md: MoEDeployment =
            serde_json::from_value(deployment(d, NS, &ckpt, 1, 2, false)).unwrap();
        mds.patch(d, &PatchParams::apply("e2e"), &Patch::Apply(&md))
            .await
            .unwrap();
    }
    for d in DEPLOYMENTS {
        reconciled(&admin, d, Duration::from_secs(90)).await;
    }

    // One replica: surge a Ready standby, then stop the leader.
    roll(&plane, &["podAnnotations.rev=2"], 1).await;
    // Scale to two (a rollout too: the annotation changes with it), then roll the pair.
    roll(&plane, &["replicaCount=2", "podAnnotations.rev=3"], 2).await;
    roll(&plane, &["podAnnotations.rev=4"], 2).await;
}
