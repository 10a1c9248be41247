//! End-to-end tests of the operator's rollouts and high availability on the local control plane,
//! with the harness of `tests/common/operator.rs` (chart installed, operators under the chart
//! ServiceAccount's token):
//! - a Recreate rollout of 4 process-backed workers with maxUnavailable 1, watched every 100 ms:
//!   never more than one rank down, never more worker (GPU) pods than the spec asks for; the
//!   operator is killed in the middle of it and started again, and the rollout finishes;
//! - two operator replicas: only the Lease holder acts (its /metrics counts reconciles, the
//!   other's stays at zero; every event names the leader); killing the leader hands over;
//! - `spec.initialLoad`: the first plan comes from the trace in a ConfigMap key; a missing key
//!   gives Degraded and a Warning event naming the ConfigMap and key, and is picked up once added.
//!
//! The tests take the plane one at a time (a lock): on 2 cores, two planes with CPU workers at
//! once would make their timing a test of the machine.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::operator::{
    condition, deployment, operator_metric, wait_every, wait_for, OperatorPlane, OP_NS, RELEASE,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use moe_operator::api::MoEDeployment;
use moe_operator::worker::wire::WorkerClient;
use serde_json::json;

mod common;

static ONE_PLANE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SPEC_HASH: &str = "moe.craft.dev/spec-hash";
const RANK: &str = "moe.craft.dev/node-rank";

fn annotation(p: &Pod, k: &str) -> Option<String> {
    p.metadata.annotations.as_ref()?.get(k).cloned()
}

fn gpu_request(p: &Pod) -> bool {
    p.spec.as_ref().is_some_and(|s| {
        s.containers.iter().any(|c| {
            c.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .is_some_and(|r| r.contains_key("nvidia.com/gpu"))
        })
    })
}

/// What one look at the cluster shows: pods (all, and those requesting GPUs) and ranks that no
/// live, ready worker serves (ready = its `/readyz` answers 200, asked directly).
#[derive(Debug, Default, Clone)]
struct Sample {
    at_ms: u128,
    pods: usize,
    gpu_pods: usize,
    down: Vec<u32>,
}

async fn sample(pods_api: &Api<Pod>, nodes: u32, t0: Instant) -> Option<Sample> {
    let all = pods_api.list(&ListParams::default()).await.ok()?.items;
    let gpu_pods = all.iter().filter(|p| gpu_request(p)).count();
    let pods: Vec<&Pod> = all
        .iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("moe.craft.dev/deployment"))
                .is_some_and(|d| d == "roll")
        })
        .collect();
    let mut serving = BTreeSet::new();
    let checks = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let rank: u32 = p.metadata.labels.as_ref()?.get(RANK)?.parse().ok()?;
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            Some(async move {
                let ready = WorkerClient::new()
                    .ready(&ip, 9401, Duration::from_secs(1))
                    .await;
                (rank, ready)
            })
        });
    for (rank, ok) in futures::future::join_all(checks).await {
        if ok {
            serving.insert(rank);
        }
    }
    Some(Sample {
        at_ms: t0.elapsed().as_millis(),
        pods: pods.len(),
        gpu_pods,
        down: (0..nodes).filter(|r| !serving.contains(r)).collect(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreate_rollout_keeps_max_unavailable_and_survives_an_operator_restart() {
    let _one = ONE_PLANE.lock().await;
    const NODES: u32 = 4;
    let mut plane = OperatorPlane::up("moe-e2e-recreate-", NODES as usize, "roll").await;
    let ns = plane.ns.clone();
    let long = Duration::from_secs(120);
    plane.start_operator("op-a");
    let ckpt = plane.checkpoint();
    let mds: Api<MoEDeployment> = Api::namespaced(plane.admin.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(plane.admin.clone(), &ns);
    let mut spec = deployment("roll", &ns, &ckpt, NODES, 1, true);
    spec["spec"]["rollout"] = json!({"strategy": "Recreate", "maxUnavailable": 1});
    let ssa = PatchParams::apply("e2e").force();
    mds.patch("roll", &ssa, &Patch::Apply(&spec))
        .await
        .expect("apply MoEDeployment roll");

    let ready = |gen_at_least: i64| {
        let mds = mds.clone();
        move || {
            let mds = mds.clone();
            async move {
                let md = mds.get("roll").await.map_err(|e| e.to_string())?;
                let st = md.status.clone().unwrap_or_default();
                let gen = md.metadata.generation.unwrap_or(0);
                match condition(&md, "Ready") {
                    Some((s, _, _))
                        if s == "True"
                            && gen >= gen_at_least
                            && st.observed_generation == Some(gen) =>
                    {
                        Ok(())
                    }
                    c => Err(format!(
                        "generation {gen}, Ready {c:?}, workers {:?}",
                        st.workers
                    )),
                }
            }
        }
    };
    wait_for("roll Ready on 4 workers", long, ready(1)).await;
    let old: BTreeMap<String, String> = plane
        .worker_pods("roll")
        .await
        .unwrap()
        .iter()
        .map(|p| {
            (
                p.metadata.name.clone().unwrap_or_default(),
                annotation(p, SPEC_HASH).unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(old.len(), NODES as usize, "{old:?}");
    let old_hashes: BTreeSet<String> = old.values().cloned().collect();

    // Watch the rollout every 100 ms from here on.
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (stop, pods_api) = (stop.clone(), pods_api.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(s) = sample(&pods_api, NODES, t0).await {
                    samples.push(s);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            samples
        })
    };

    // A worker env change: every pod spec changes, so every pod is replaced.
    spec["spec"]["worker"]["env"] = json!([{"name": "MOE_E2E_ROLL", "value": "2"}]);
    mds.patch("roll", &ssa, &Patch::Apply(&spec))
        .await
        .expect("change the worker env");

    // Kill the operator in the middle: a pod already replaced and another on its way out or not
    // yet back (the operator deleted it and must still create its successor).
    let midway = wait_every(
        "the rollout midway (a pod replaced, another rank being replaced)",
        long,
        Duration::from_millis(100),
        || async {
            let pods = plane.worker_pods("roll").await?;
            let new = pods
                .iter()
                .filter(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && annotation(p, SPEC_HASH).is_some_and(|h| !old_hashes.contains(&h))
                })
                .count();
            let live = pods
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .count();
            // Preferably caught with a rank deleted and not yet back; a later midpoint (two
            // replaced) still leaves work for the restarted operator.
            if new >= 1 && new < NODES as usize && (live < NODES as usize || new >= 2) {
                Ok(format!("{new} replaced, {live} live pods"))
            } else {
                Err(format!(
                    "{new} replaced, {live} live of {} pods",
                    pods.len()
                ))
            }
        },
    )
    .await;
    plane.kill_operator("op-a");
    eprintln!("killed the operator midway: {midway}");
    // Nothing moves while it is away (the deleted pod's successor is not created).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let md = mds.get("roll").await.unwrap();
    assert_ne!(
        condition(&md, "Ready").map(|c| c.0).as_deref(),
        Some("True"),
        "rollout finished without an operator"
    );
    plane.start_operator("op-a");
    let gen = md.metadata.generation.unwrap();
    wait_for("roll Ready again after the restart", long, ready(gen)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = monitor.await.expect("monitor task");

    let pods = plane.worker_pods("roll").await.unwrap();
    assert_eq!(pods.len(), NODES as usize);
    for p in &pods {
        let h = annotation(p, SPEC_HASH).unwrap_or_default();
        assert!(
            !old_hashes.contains(&h),
            "pod {:?} still runs the old spec {h}",
            p.metadata.name
        );
        let env = &p.spec.as_ref().unwrap().containers[0].env;
        assert!(
            env.iter()
                .flatten()
                .any(|e| e.name == "MOE_E2E_ROLL" && e.value.as_deref() == Some("2")),
            "pod {:?} lacks the new env",
            p.metadata.name
        );
    }
    assert!(
        samples.len() >= 10,
        "too few samples of the rollout: {}",
        samples.len()
    );
    let max_down = samples.iter().map(|s| s.down.len()).max().unwrap_or(0);
    let max_pods = samples.iter().map(|s| s.pods).max().unwrap_or(0);
    let max_gpu = samples.iter().map(|s| s.gpu_pods).max().unwrap_or(0);
    let saw_down = samples.iter().filter(|s| !s.down.is_empty()).count();
    eprintln!(
        "{} samples over {} ms: max ranks down {max_down}, max pods {max_pods}, max GPU pods {max_gpu}, {saw_down} samples with a rank down",
        samples.len(),
        samples.last().map(|s| s.at_ms).unwrap_or(0)
    );
    let bad: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.down.len() > 1 || s.pods > NODES as usize || s.gpu_pods > NODES as usize)
        .collect();
    assert!(
        bad.is_empty(),
        "maxUnavailable 1 / {NODES} GPU pods exceeded: {bad:?}"
    );
    // The watch did see the replacements (a test that cannot fail proves nothing).
    assert!(saw_down > 0, "no sample ever saw a rank being replaced");
}

fn trace_json(hot: [usize; 2]) -> String {
    let row = |h: usize| -> Vec<u32> { (0..8).map(|e| if e == h { 5000 } else { 100 }).collect() };
    json!({"format": "moe-load-trace/v1", "experts": 8, "layers": [0, 1],
           "batches": [{"tokens": [row(hot[0]), row(hot[1])]}]})
    .to_string()
}

async fn lease_holder(plane: &OperatorPlane) -> Option<String> {
    Api::<Lease>::namespaced(plane.admin.clone(), OP_NS)
        .get_opt(RELEASE)
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// The reporting instances of the events about `name`.
async fn event_instances(plane: &OperatorPlane, name: &str) -> Result<BTreeSet<String>, String> {
    Ok(Api::<Event>::namespaced(plane.admin.clone(), &plane.ns)
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| e.reporting_instance.clone().unwrap_or_default())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader_and_initial_load() {
    let _one = ONE_PLANE.lock().await;
    let mut plane = OperatorPlane::up("moe-e2e-ha-", 2, "ha").await;
    let ns = plane.ns.clone();
    let long = Duration::from_secs(90);
    let ckpt = plane.checkpoint();
    let mds: Api<MoEDeployment> = Api::namespaced(plane.admin.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(plane.admin.clone(), &ns);
    let ssa = PatchParams::apply("e2e").force();

    // op-a first, so it is the leader; then op-b, which must stay a standby.
    let port_a = plane.start_operator("op-a");
    wait_for("op-a to hold the Lease", long, || async {
        match lease_holder(&plane).await {
            Some(h) if h == "op-a" => Ok(()),
            h => Err(format!("holder {h:?}")),
        }
    })
    .await;
    let port_b = plane.start_operator("op-b");

    // initialLoad: a trace with experts 3 and 6 hot, and a deployment planned from it.
    let trace = cms
        .patch(
            "traces",
            &ssa,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "traces", "namespace": ns},
                "data": {"skewed.json": trace_json([3, 6])}})),
        )
        .await;
    trace.expect("ConfigMap traces");
    // Workers are kwok pods here (no processes): the plan is what is checked, not serving.
    let mut ha = deployment("ha", &ns, &ckpt, 2, 2, false);
    ha["spec"]["initialLoad"] = json!({"name": "traces", "key": "skewed.json"});
    mds.patch("ha", &ssa, &Patch::Apply(&ha))
        .await
        .expect("apply ha");
    let mut bad = deployment("ha-bad", &ns, &ckpt, 2, 2, false);
    bad["spec"]["initialLoad"] = json!({"name": "traces", "key": "later.json"});
    mds.patch("ha-bad", &ssa, &Patch::Apply(&bad))
        .await
        .expect("apply ha-bad");

    let plan = wait_for("ha planned from its initial load", long, || async {
        let md = mds.get("ha").await.map_err(|e| e.to_string())?;
        let cm = cms.get_opt("ha-plan").await.map_err(|e| e.to_string())?;
        match (md.status.and_then(|s| s.plan), cm) {
            (Some(p), Some(_)) => Ok(p),
            (p, cm) => Err(format!("plan {p:?}, ConfigMap {}", cm.is_some())),
        }
    })
    .await;
    // Without the trace the first plan would be placement-only with no replica.
    assert_eq!(
        (plan.algorithm.as_str(), plan.replicas_per_gpu),
        ("craft", 2),
        "{plan:?}"
    );
    let cm = cms.get("ha-plan").await.unwrap();
    let p: moe_operator::plan::ExpertPlan =
        serde_json::from_str(&cm.data.unwrap()["plan.json"]).unwrap();
    for (l, layer) in p.layers.iter().enumerate() {
        let hot = [3u32, 6][l];
        let copies = layer.slots.iter().flatten().filter(|&&e| e == hot).count();
        assert!(
            copies >= 2,
            "layer {l}: hot expert {hot} has {copies} replica(s): {layer:?}"
        );
    }

    let (msg, reason) = wait_for("ha-bad Degraded", long, || async {
        let md = mds.get("ha-bad").await.map_err(|e| e.to_string())?;
        match condition(&md, "Degraded") {
            Some((s, r, m)) if s == "True" => Ok((m, r)),
            c => Err(format!("{c:?}")),
        }
    })
    .await;
    assert_eq!(reason, "InitialLoadUnavailable");
    assert!(
        msg.contains(&format!("ConfigMap {ns}/traces has no key \"later.json\"")),
        "{msg}"
    );
    let md = mds.get("ha-bad").await.unwrap();
    assert_ne!(
        condition(&md, "Ready").map(|c| c.0).as_deref(),
        Some("True")
    );
    assert!(plane.worker_pods("ha-bad").await.unwrap().is_empty());
    wait_for("a Warning event naming the ConfigMap key", long, || async {
        let evs = Api::<Event>::namespaced(plane.admin.clone(), &ns)
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        evs.items
            .iter()
            .find(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.reason.as_deref() == Some("InitialLoadUnavailable")
                    && e.note.as_deref().is_some_and(|n| n.contains("later.json"))
            })
            .map(|_| ())
            .ok_or_else(|| format!("{} events, none matching", evs.items.len()))
    })
    .await;

    // Only the leader acted: op-b reconciled nothing, and every event names op-a.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (rec_a, rec_b) = (
        operator_metric(port_a, "moe_operator_reconciles_total").await,
        operator_metric(port_b, "moe_operator_reconciles_total").await,
    );
    assert!(
        rec_a.unwrap_or(0.0) > 0.0,
        "leader op-a: reconciles {rec_a:?}"
    );
    assert_eq!(rec_b, Some(0.0), "standby op-b reconciled");
    assert_eq!(
        operator_metric(port_b, "moe_operator_leader").await,
        Some(0.0)
    );
    assert_eq!(
        operator_metric(port_a, "moe_operator_leader").await,
        Some(1.0)
    );
    for name in ["ha", "ha-bad"] {
        let inst = event_instances(&plane, name).await.unwrap();
        assert_eq!(
            inst,
            BTreeSet::from(["op-a".to_string()]),
            "events of {name} from"
        );
    }
    assert_eq!(lease_holder(&plane).await.as_deref(), Some("op-a"));

    // The missing key appears, and the leader dies: op-b takes the Lease once it expires and
    // carries on (plans ha-bad from the new key, reconciles a new deployment).
    cms.patch(
        "traces",
        &ssa,
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "traces", "namespace": ns},
            "data": {"skewed.json": trace_json([3, 6]), "later.json": trace_json([1, 2])}})),
    )
    .await
    .expect("add later.json");
    plane.kill_operator("op-a");
    let killed = Instant::now();
    wait_for(
        "op-b to take the Lease",
        Duration::from_secs(60),
        || async {
            match lease_holder(&plane).await {
                Some(h) if h == "op-b" => Ok(()),
                h => Err(format!("holder {h:?}")),
            }
        },
    )
    .await;
    eprintln!(
        "op-b took over {:?} after op-a was killed",
        killed.elapsed()
    );
    mds.patch(
        "ha-2",
        &ssa,
        &Patch::Apply(deployment("ha-2", &ns, &ckpt, 2, 2, false)),
    )
    .await
    .expect("apply ha-2");
    wait_for("op-b to reconcile ha-2", long, || async {
        let cm = cms.get_opt("ha-2-plan").await.map_err(|e| e.to_string())?;
        let inst = event_instances(&plane, "ha-2").await?;
        if cm.is_some() && inst == BTreeSet::from(["op-b".to_string()]) {
            Ok(())
        } else {
            Err(format!("ConfigMap {}, events from {inst:?}", cm.is_some()))
        }
    })
    .await;
    let fixed = wait_for("ha-bad planned once its key exists", long, || async {
        let md = mds.get("ha-bad").await.map_err(|e| e.to_string())?;
        let degraded = condition(&md, "Degraded").map(|c| c.0);
        match md.status.and_then(|s| s.plan) {
            Some(p) if degraded.as_deref() == Some("False") => Ok(p),
            p => Err(format!("plan {p:?}, Degraded {degraded:?}")),
        }
    })
    .await;
    assert_eq!(fixed.algorithm, "craft", "{fixed:?}");
    assert!(
        operator_metric(port_b, "moe_operator_reconciles_total")
            .await
            .unwrap_or(0.0)
            > 0.0
    );
    assert_eq!(
        operator_metric(port_b, "moe_operator_leader").await,
        Some(1.0)
    );
}
