//! End-to-end test of scaling (`spec.replicas`, EP groups) on the local control plane, with the
//! harness of `tests/common/operator.rs` (chart installed, the operator under the chart
//! ServiceAccount's token, process-backed CPU workers of 2 nodes per group):
//! - scale 1 -> 3 through the `scale` subresource: the new groups start on the plan in force, group
//!   0 is not restarted (pod UIDs unchanged), each group gets its Service, and the subresource
//!   reports the groups and the label selector a HorizontalPodAutoscaler reads;
//! - a plan push (skewed load sent to group 1 only, so the window merges groups) reaches every
//!   group, in place;
//! - a Recreate rollout of the 3 groups with `maxUnavailableGroups: 1`, sampled every 100 ms
//!   (each worker's `/readyz` asked directly), never has fewer than 2 ready groups, and the
//!   operator is killed in the middle of it and started again;
//! - scale 3 -> 2 through the subresource: group 2's pods and Service are gone, groups 0 and 1
//!   are not restarted;
//! - a Recreate with `maxSurge: 1` and `maxUnavailableGroups: 0`: an extra group serves first, so
//!   the 2 groups never drop below 2 ready, and it is gone at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::operator::{condition, deployment, loadgen_round, wait_every, wait_for, OperatorPlane};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use moe_operator::api::MoEDeployment;
use moe_operator::worker::wire::WorkerClient;
use serde_json::json;

mod common;

const NAME: &str = "sc";
const NODES: u32 = 2;
const GROUP: &str = "moe.craft.dev/group";
const RANK: &str = "moe.craft.dev/node-rank";
const SPEC_HASH: &str = "moe.craft.dev/spec-hash";

fn label(p: &Pod, k: &str) -> Option<String> {
    p.metadata.labels.as_ref()?.get(k).cloned()
}

fn group_of(p: &Pod) -> u32 {
    label(p, GROUP).and_then(|g| g.parse().ok()).unwrap_or(0)
}

fn live(pods: &[Pod]) -> Vec<&Pod> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// name -> UID of the live pods of `groups`.
fn uids(pods: &[Pod], groups: &[u32]) -> BTreeMap<String, String> {
    live(pods)
        .into_iter()
        .filter(|p| groups.contains(&group_of(p)))
        .map(|p| {
            (
                p.metadata.name.clone().unwrap_or_default(),
                p.metadata.uid.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// One look: the groups whose every rank has a live worker answering `/readyz`, and the groups
/// with any pod (terminating ones included: they still hold their GPUs).
async fn ready_groups(pods_api: &Api<Pod>) -> Option<(BTreeSet<u32>, BTreeSet<u32>)> {
    let pods = pods_api
        .list(&ListParams::default().labels(&format!("moe.craft.dev/deployment={NAME}")))
        .await
        .ok()?
        .items;
    let holding: BTreeSet<u32> = pods.iter().map(group_of).collect();
    let checks = live(&pods).into_iter().filter_map(|p| {
        let rank: u32 = label(p, RANK)?.parse().ok()?;
        let group = group_of(p);
        let ip = p.status.as_ref()?.pod_ip.clone()?;
        Some(async move {
            let ok = WorkerClient::new()
                .ready(&ip, 9401, Duration::from_secs(1))
                .await;
            (group, rank, ok)
        })
    });
    let mut serving: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for (g, r, ok) in futures::future::join_all(checks).await {
        if ok {
            serving.entry(g).or_default().insert(r);
        }
    }
    let ready = serving
        .into_iter()
        .filter(|(_, ranks)| ranks.len() as u32 == NODES)
        .map(|(g, _)| g)
        .collect();
    Some((ready, holding))
}

type Samples = Vec<(u128, BTreeSet<u32>, BTreeSet<u32>)>;

/// Look every 100 ms until `stop`.
fn watch(pods_api: Api<Pod>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Samples> {
    tokio::spawn(async move {
        let t = Instant::now();
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Some((ready, holding)) = ready_groups(&pods_api).await {
                samples.push((t.elapsed().as_millis(), ready, holding));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        samples
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_subresource_group_rollouts_and_plan_pushes() {
    let t0 = Instant::now();
    // 3 groups of 2 workers, one worker per node.
    let mut plane = OperatorPlane::up("moe-e2e-scale-", 6, "scale").await;
    let ns = plane.ns.clone();
    let long = Duration::from_secs(120);
    plane.start_operator("op-a");
    let ckpt = plane.checkpoint();
    let mds: Api<MoEDeployment> = Api::namespaced(plane.admin.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(plane.admin.clone(), &ns);
    let services: Api<Service> = Api::namespaced(plane.admin.clone(), &ns);
    let mut spec = deployment(NAME, &ns, &ckpt, NODES, 1, true);
    // A group's workers are replaced together (maxUnavailable = nodes); one group at a time.
    spec["spec"]["rollout"] = json!({"strategy": "InPlace", "maxUnavailable": NODES,
                                     "maxUnavailableGroups": 1});
    let ssa = PatchParams::apply("e2e").force();
    mds.patch(NAME, &ssa, &Patch::Apply(&spec))
        .await
        .expect("apply the MoEDeployment");

    // Ready with `groups` groups ready, on generation >= `gen`; returns the status.
    let ready = |groups: i32, gen: i64| {
        let mds = mds.clone();
        move || {
            let mds = mds.clone();
            async move {
                let md = mds.get(NAME).await.map_err(|e| e.to_string())?;
                let st = md.status.clone().unwrap_or_default();
                let g = md.metadata.generation.unwrap_or(0);
                match condition(&md, "Ready") {
                    Some((s, _, _))
                        if s == "True"
                            && g >= gen
                            && st.observed_generation == Some(g)
                            && st.ready_groups == Some(groups)
                            && st.replicas == Some(groups) =>
                    {
                        Ok(st)
                    }
                    c => Err(format!(
                        "generation {g}, Ready {c:?}, groups {:?}/{:?}, workers {:?}",
                        st.ready_groups, st.replicas, st.workers
                    )),
                }
            }
        }
    };
    let st = wait_for("one group Ready", long, ready(1, 1)).await;
    let plan0 = st.plan.as_ref().expect("status.plan").hash.clone();
    let pods = plane.worker_pods(NAME).await.unwrap();
    let group0 = uids(&pods, &[0]);
    assert_eq!(group0.len(), NODES as usize, "{group0:?}");
    eprintln!("[{:?}] one group ready on plan {plan0}", t0.elapsed());

    // 1 -> 3 through the scale subresource.
    let scale = |n: i32| {
        let mds = mds.clone();
        async move {
            mds.patch_scale(
                NAME,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": n}})),
            )
            .await
            .unwrap_or_else(|e| panic!("patch /scale to {n}: {e}"))
        }
    };
    scale(3).await;
    let md = mds.get(NAME).await.unwrap();
    assert_eq!(
        md.spec.replicas, 3,
        "the scale subresource writes spec.replicas"
    );
    let st = wait_for(
        "three groups Ready",
        long,
        ready(3, md.metadata.generation.unwrap()),
    )
    .await;
    eprintln!("[{:?}] three groups ready", t0.elapsed());
    let s = mds.get_scale(NAME).await.expect("GET /scale");
    let sst = s.status.expect("scale status");
    assert_eq!(sst.replicas, 3);
    let selector = sst.selector.expect("scale status selector");
    assert!(
        selector.contains(&format!("moe.craft.dev/deployment={NAME}")),
        "{selector}"
    );
    // The selector finds exactly the workers of the three groups.
    let selected = pods_api
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items;
    assert_eq!(live(&selected).len(), 3 * NODES as usize);
    let pods = plane.worker_pods(NAME).await.unwrap();
    assert_eq!(
        uids(&pods, &[0]),
        group0,
        "group 0 restarted by the scale-out"
    );
    let plan = st.plan.as_ref().unwrap().hash.clone();
    assert_eq!(plan, plan0, "a scale-out does not re-plan");
    // Every group serves the plan in force (what the workers report).
    let ips = |pods: &[Pod]| -> BTreeMap<(u32, u32), String> {
        live(pods)
            .into_iter()
            .filter_map(|p| {
                let rank: u32 = label(p, RANK)?.parse().ok()?;
                Some(((group_of(p), rank), p.status.as_ref()?.pod_ip.clone()?))
            })
            .collect()
    };
    let on_plan = |ips: BTreeMap<(u32, u32), String>, hash: String| async move {
        for ((g, r), ip) in &ips {
            let s = WorkerClient::new()
                .scrape(ip, 9401, Duration::from_secs(5))
                .await
                .map_err(|e| format!("group {g} rank {r}: {e}"))?;
            if s.plan_hash.as_deref() != Some(hash.as_str()) {
                return Err(format!("group {g} rank {r} on {:?}", s.plan_hash));
            }
        }
        Ok(())
    };
    let all = ips(&pods);
    assert_eq!(all.len(), 3 * NODES as usize, "{all:?}");
    on_plan(all.clone(), plan.clone()).await.unwrap();
    // A Service per group, labelled for a router, and the deployment's own.
    for g in 0..3 {
        let svc = services
            .get(&format!("{NAME}-g{g}-workers"))
            .await
            .unwrap_or_else(|e| panic!("group {g}'s Service: {e}"));
        let l = svc.metadata.labels.unwrap_or_default();
        assert_eq!(
            l.get(GROUP).map(String::as_str),
            Some(g.to_string().as_str())
        );
        assert_eq!(
            l.get("moe.craft.dev/service-scope").map(String::as_str),
            Some("group")
        );
    }
    services
        .get(&format!("{NAME}-workers"))
        .await
        .expect("the deployment's Service");

    // A plan push reaches every group: skewed load sent to group 1's workers only.
    let trace = plane.state.join("skewed.json");
    let row =
        |hot: u32| -> Vec<u32> { (0..8).map(|e| if e == hot { 4000 } else { 100 }).collect() };
    std::fs::write(
        &trace,
        json!({"logical_count": [row(0), row(1)]}).to_string(),
    )
    .unwrap();
    let group1 = (0..NODES)
        .map(|r| format!("{}:9400", all[&(1, r)]))
        .collect::<Vec<_>>()
        .join(",");
    let cms = Api::<ConfigMap>::namespaced(plane.admin.clone(), &ns);
    let plan_file = plane.state.join("plan.json");
    let pushed = wait_for(
        "a new plan on every worker of every group",
        long,
        || async {
            loadgen_round(&cms, &format!("{NAME}-plan"), &plan_file, &group1, &trace).await?;
            let md = mds.get(NAME).await.map_err(|e| e.to_string())?;
            let st = md.status.clone().unwrap_or_default();
            let hash = st.plan.as_ref().map(|p| p.hash.clone()).unwrap_or_default();
            let on = st.workers.as_ref().map(|w| w.on_current_plan).unwrap_or(0);
            let ready = condition(&md, "Ready").map(|c| c.0);
            if hash != plan && on == 3 * NODES as i32 && ready.as_deref() == Some("True") {
                Ok(hash)
            } else {
                Err(format!("plan {:?}, workers {:?}", st.plan, st.workers))
            }
        },
    )
    .await;
    on_plan(all.clone(), pushed.clone()).await.unwrap();
    let pods = plane.worker_pods(NAME).await.unwrap();
    let before_roll = uids(&pods, &[0, 1, 2]);
    assert_eq!(before_roll.len(), 3 * NODES as usize);
    assert!(
        group0.iter().all(|(n, u)| before_roll.get(n) == Some(u)),
        "an in-place push restarted group 0"
    );
    eprintln!("[{:?}] plan {pushed} pushed to every group", t0.elapsed());

    // A Recreate rollout of the 3 groups, watched every 100 ms: never fewer than
    // replicas - maxUnavailableGroups = 2 ready groups.
    let old_hashes: BTreeSet<String> = pods
        .iter()
        .filter_map(|p| p.metadata.annotations.as_ref()?.get(SPEC_HASH).cloned())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = watch(pods_api.clone(), stop.clone());
    spec["spec"]["replicas"] = json!(3);
    spec["spec"]["rollout"]["strategy"] = json!("Recreate");
    spec["spec"]["worker"]["env"] = json!([{"name": "MOE_E2E_ROLL", "value": "2"}]);
    mds.patch(NAME, &ssa, &Patch::Apply(&spec))
        .await
        .expect("change the worker env");
    // Kill the operator once a group is replaced and another still old.
    let midway = wait_every(
        "the rollout midway (a group replaced, another still old)",
        long,
        Duration::from_millis(100),
        || async {
            let pods = plane.worker_pods(NAME).await?;
            let mut new_groups = BTreeSet::new();
            let mut old_groups = BTreeSet::new();
            for p in live(&pods) {
                let h = p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(SPEC_HASH));
                if h.is_some_and(|h| old_hashes.contains(h)) {
                    old_groups.insert(group_of(p));
                } else {
                    new_groups.insert(group_of(p));
                }
            }
            if !new_groups.is_empty() && !old_groups.is_empty() {
                Ok(format!("new {new_groups:?}, old {old_groups:?}"))
            } else {
                Err(format!("new {new_groups:?}, old {old_groups:?}"))
            }
        },
    )
    .await;
    plane.kill_operator("op-a");
    eprintln!("[{:?}] killed the operator midway: {midway}", t0.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    plane.start_operator("op-a");
    let gen = mds.get(NAME).await.unwrap().metadata.generation.unwrap();
    wait_for("three groups Ready after the rollout", long, ready(3, gen)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = monitor.await.expect("monitor task");
    let pods = plane.worker_pods(NAME).await.unwrap();
    assert_eq!(live(&pods).len(), 3 * NODES as usize);
    for p in live(&pods) {
        let h = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SPEC_HASH));
        assert!(
            h.is_some_and(|h| !old_hashes.contains(h)),
            "pod {:?} still runs the old spec",
            p.metadata.name
        );
    }
    let min = samples.iter().map(|(_, s, _)| s.len()).min().unwrap_or(0);
    let dips = samples.iter().filter(|(_, s, _)| s.len() < 3).count();
    eprintln!(
        "[{:?}] rollout: {} samples over {} ms, fewest ready groups {min}, {dips} samples below 3",
        t0.elapsed(),
        samples.len(),
        samples.last().map(|s| s.0).unwrap_or(0)
    );
    assert!(samples.len() >= 10, "too few samples: {}", samples.len());
    let bad: Vec<_> = samples.iter().filter(|(_, s, _)| s.len() < 2).collect();
    assert!(bad.is_empty(), "fewer than 2 ready groups: {bad:?}");
    // The watch saw groups being replaced (a test that cannot fail proves nothing).
    assert!(dips > 0, "no sample saw a group out of service");

    // 3 -> 2 through the scale subresource: group 2 goes, groups 0 and 1 stay as they are.
    let kept = uids(&pods, &[0, 1]);
    scale(2).await;
    let gen = mds.get(NAME).await.unwrap().metadata.generation.unwrap();
    wait_for("two groups Ready, group 2 gone", long, || async {
        let pods = plane.worker_pods(NAME).await?;
        if pods.iter().any(|p| group_of(p) == 2) {
            return Err(format!("{} pods left in group 2", pods.len()));
        }
        ready(2, gen)().await.map(|_| ())
    })
    .await;
    let pods = plane.worker_pods(NAME).await.unwrap();
    assert_eq!(uids(&pods, &[0, 1]), kept, "a group other than 2 restarted");
    assert_eq!(pods.len(), 2 * NODES as usize);
    wait_for("group 2's Service deleted", long, || async {
        match services.get_opt(&format!("{NAME}-g2-workers")).await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        mds.get_scale(NAME).await.unwrap().status.unwrap().replicas,
        2
    );
    eprintln!("[{:?}] scaled in to 2 groups", t0.elapsed());

    // A Recreate with maxSurge 1 and maxUnavailableGroups 0: a third group serves first, then
    // the two are replaced one at a time, then the extra group goes. Never fewer than 2 ready
    // groups, never more than 3 groups of pods (the GPUs of 6 nodes).
    let old_hashes: BTreeSet<String> = pods
        .iter()
        .filter_map(|p| p.metadata.annotations.as_ref()?.get(SPEC_HASH).cloned())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = watch(pods_api.clone(), stop.clone());
    spec["spec"]["replicas"] = json!(2);
    spec["spec"]["rollout"]["maxUnavailableGroups"] = json!(0);
    spec["spec"]["rollout"]["maxSurge"] = json!(1);
    spec["spec"]["worker"]["env"] = json!([{"name": "MOE_E2E_ROLL", "value": "3"}]);
    mds.patch(NAME, &ssa, &Patch::Apply(&spec))
        .await
        .expect("a surge rollout");
    let gen = mds.get(NAME).await.unwrap().metadata.generation.unwrap();
    wait_for("two groups Ready after the surge rollout", long, || async {
        let pods = plane.worker_pods(NAME).await?;
        if pods.iter().any(|p| group_of(p) == 2) {
            return Err("the surge group is still there".into());
        }
        ready(2, gen)().await.map(|_| ())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let samples = monitor.await.expect("monitor task");
    let pods = plane.worker_pods(NAME).await.unwrap();
    for p in &pods {
        let h = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SPEC_HASH));
        assert!(
            h.is_some_and(|h| !old_hashes.contains(h)),
            "pod {:?} still runs the old spec",
            p.metadata.name
        );
    }
    let min = samples.iter().map(|(_, s, _)| s.len()).min().unwrap_or(0);
    let most = samples.iter().map(|(_, _, h)| h.len()).max().unwrap_or(0);
    let surge = samples.iter().filter(|(_, s, _)| s.contains(&2)).count();
    eprintln!(
        "[{:?}] surge rollout: {} samples, fewest ready groups {min}, most groups with pods {most}, {surge} samples with the surge group serving",
        t0.elapsed(),
        samples.len()
    );
    assert!(
        min >= 2,
        "fewer than 2 ready groups with maxUnavailableGroups 0"
    );
    assert!(most <= 3, "more than one surge group");
    assert!(surge > 0, "no sample saw the surge group serve");
}
