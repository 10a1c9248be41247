//! End-to-end test of the operator on the local control plane (e2e/cluster.sh): the CRD and chart
//! installed with Helm (its in-cluster Deployment scaled to 0: there is no image here), the operator
//! run as a local process under the chart's ServiceAccount (a kubeconfig from a TokenRequest, so the
//! chart's RBAC is what it gets), a MoEDeployment of 2 nodes x 2 GPUs whose worker pods are real
//! `moe-worker` processes, an invalid spec, and garbage collection on delete. The harness is
//! `tests/common/operator.rs`.
//!
//! Needs the binaries of `e2e/build.sh`; fails (does not skip) without them.

use common::operator::{condition, deployment, loadgen_round, wait_for, OperatorPlane};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::Api;
use moe_operator::api::{reason, MoEDeployment};
use moe_operator::worker::wire::WorkerClient;
use serde_json::json;
use std::time::Duration;

mod common;
const NODES: usize = 2;
const NS: &str = "ml";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_end_to_end() {
    let mut plane = OperatorPlane::up("moe-e2e-operator-", NODES, NS).await;
    let admin = plane.admin.clone();
    let long = Duration::from_secs(120);
    plane.start_operator("e2e-operator");
    // Synthetic checkpoint in the Mixtral layout, served by the workers' CPU backend.
    let ckpt = plane.checkpoint();

    let mds: Api<MoEDeployment> = Api::namespaced(admin.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let md: MoEDeployment =
        serde_json::from_value(deployment("tiny", NS, &ckpt, 2, 2, true)).unwrap();
    mds.patch("tiny", &PatchParams::apply("e2e"), &Patch::Apply(&md))
        .await
        .expect("apply MoEDeployment");

    // Owned objects appear, applied by the operator under its ServiceAccount.
    let plan_hash = wait_for("status.plan.hash and the plan ConfigMap", long, || async {
        let md = mds.get("tiny").await.map_err(|e| e.to_string())?;
        let hash = md
            .status
            .as_ref()
            .and_then(|s| s.plan.as_ref())
            .map(|p| p.hash.clone());
        let cm = Api::<ConfigMap>::namespaced(admin.clone(), NS)
            .get_opt("tiny-plan")
            .await
            .map_err(|e| e.to_string())?;
        match (hash, cm) {
            (Some(h), Some(cm)) if cm.data.as_ref().and_then(|d| d.get("hash")) == Some(&h) => {
                Ok(h)
            }
            (h, cm) => Err(format!(
                "status hash {h:?}, ConfigMap present: {}",
                cm.is_some()
            )),
        }
    })
    .await;
    assert_eq!(plan_hash.len(), 64, "plan hash is SHA-256 hex: {plan_hash}");
    for (what, present) in [
        (
            "Secret tiny-admin-token",
            Api::<Secret>::namespaced(admin.clone(), NS)
                .get_opt("tiny-admin-token")
                .await
                .unwrap()
                .is_some(),
        ),
        (
            "Service tiny-workers",
            Api::<Service>::namespaced(admin.clone(), NS)
                .get_opt("tiny-workers")
                .await
                .unwrap()
                .is_some(),
        ),
        (
            "PDB tiny-workers",
            Api::<PodDisruptionBudget>::namespaced(admin.clone(), NS)
                .get_opt("tiny-workers")
                .await
                .unwrap()
                .is_some(),
        ),
    ] {
        assert!(present, "{what} was not created");
    }

    // Worker pods Running on fake GPU nodes, each a real moe-worker process.
    let running = wait_for("2 worker pods Running with a process", long, || async {
        let list = pods
            .list(&ListParams::default().labels("moe.craft.dev/deployment=tiny"))
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for p in &list.items {
            let name = p.metadata.name.clone().unwrap_or_default();
            let phase = p
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            if phase == "Running" && plane.has_process(&name) {
                out.push((
                    name,
                    p.status
                        .as_ref()
                        .and_then(|s| s.pod_ip.clone())
                        .unwrap_or_default(),
                ));
            }
        }
        if out.len() == NODES {
            Ok(out)
        } else {
            Err(format!(
                "{} of {} pods running with a process: {out:?}",
                out.len(),
                list.items.len()
            ))
        }
    })
    .await;
    // The launcher ran each pod's command with $(POD_IP) expanded to that pod's own address.
    let launcher =
        std::fs::read_to_string(plane.state.join("logs/moe-e2e-pods.log")).unwrap_or_default();
    for (name, ip) in &running {
        let line = launcher
            .lines()
            .find(|l| l.contains("started moe-worker") && l.contains(&format!("pod={NS}/{name}")))
            .unwrap_or_else(|| panic!("launcher never started moe-worker for {name}:\n{launcher}"));
        assert!(
            line.contains(&format!(
                "--listen {ip}:9400 --metrics-listen {ip}:9401 --admin-listen {ip}:9402"
            )) && line.contains("--device cpu")
                && line.contains("--gpus-per-node 2"),
            "pod {name} (IP {ip}) started with unexpected arguments: {line}"
        );
    }

    // Ready: every worker answers /metrics with the plan's hash.
    wait_for("MoEDeployment Ready", long, || async {
        let md = mds.get("tiny").await.map_err(|e| e.to_string())?;
        match condition(&md, "Ready") {
            Some((s, _, _)) if s == "True" => Ok(()),
            c => Err(format!(
                "Ready condition {c:?}, workers {:?}",
                md.status.as_ref().and_then(|s| s.workers.clone())
            )),
        }
    })
    .await;

    // Skewed traffic through the loadgen: the operator sees it, plans with CRAFT, and rolls the
    // new plan out in place; every worker reports the new hash.
    let trace = plane.state.join("skewed.json");
    let row =
        |hot: u32| -> Vec<u32> { (0..8).map(|e| if e == hot { 4000 } else { 100 }).collect() };
    std::fs::write(
        &trace,
        json!({"logical_count": [row(0), row(1)]}).to_string(),
    )
    .unwrap();
    let workers = running
        .iter()
        .map(|(n, ip)| {
            (
                n.trim_start_matches("tiny-worker-").parse::<u32>().unwrap(),
                ip.clone(),
            )
        })
        .collect::<std::collections::BTreeMap<_, _>>()
        .values()
        .map(|ip| format!("{ip}:9400"))
        .collect::<Vec<_>>()
        .join(",");
    let cms = Api::<ConfigMap>::namespaced(admin.clone(), NS);
    let plan_file = plane.state.join("plan.json");
    let new_hash = wait_for(
        "a new plan rolled out on every worker under skewed load",
        long,
        || async {
            loadgen_round(&cms, "tiny-plan", &plan_file, &workers, &trace).await?;
            let md = mds.get("tiny").await.map_err(|e| e.to_string())?;
            let st = md.status.clone().unwrap_or_default();
            let hash = st.plan.as_ref().map(|p| p.hash.clone()).unwrap_or_default();
            let on = st.workers.as_ref().map(|w| w.on_current_plan).unwrap_or(0);
            let ready = condition(&md, "Ready").map(|c| c.0);
            if hash != plan_hash && on == NODES as i32 && ready.as_deref() == Some("True") {
                Ok((hash, st))
            } else {
                Err(format!(
                    "plan {:?}, workers {:?}, observed {:?}",
                    st.plan, st.workers, st.observed
                ))
            }
        },
    )
    .await;
    let (hash, st) = new_hash;
    let p = st.plan.expect("plan status");
    assert_eq!(p.algorithm, "craft", "{p:?}");
    assert!(
        p.predicted_balancedness.unwrap_or(0.0) > p.previous_balancedness.unwrap_or(1.0),
        "new plan does not predict better balance: {p:?}"
    );
    let observed = st.observed.expect("observed load in status");
    assert!(observed.tokens > 0, "{observed:?}");
    eprintln!("rolled out {hash}: {p:?}; observed {observed:?}");
    // Every worker reports the new hash in moe_worker_plan_info.
    for (_, ip) in &running {
        let r = WorkerClient::new()
            .scrape(ip, 9401, Duration::from_secs(5))
            .await
            .expect("worker answers /metrics");
        assert_eq!(r.plan_hash.as_deref(), Some(hash.as_str()), "worker {ip}");
    }
    // One PlanPushed Event per worker, each related to its pod (not folded into one series).
    let events: Api<Event> = Api::namespaced(admin.clone(), NS);
    let short = &hash[..12];
    for (pod, _) in &running {
        wait_for_event(
            &events,
            &format!("a PlanPushed event for {pod}"),
            long,
            |e| {
                e.reason.as_deref() == Some("PlanPushed")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("tiny")
                    && e.related.as_ref().and_then(|r| r.name.as_deref()) == Some(pod.as_str())
                    && e.note.as_deref().is_some_and(|n| n.contains(short))
            },
        )
        .await;
    }

    // Token rotation: the admin Secret deleted under running workers. Before, the operator minted
    // a token the workers never read (28 failed pushes in 45 s, the rollout stuck at 0/2). Now it
    // says so with a Warning, the workers re-read the Secret's file (re-synced like a kubelet
    // does), and a worker that still refuses a push is replaced: the next plan reaches them all.
    let secrets = Api::<Secret>::namespaced(admin.clone(), NS);
    let token_of = |s: &Secret| {
        s.data
            .as_ref()
            .and_then(|d| d.get("token"))
            .map(|b| b.0.clone())
    };
    let old_token = token_of(&secrets.get("tiny-admin-token").await.expect("admin Secret"));
    secrets
        .delete("tiny-admin-token", &DeleteParams::default())
        .await
        .expect("delete the admin Secret");
    wait_for("an AdminTokenRotated warning", long, || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        if list.items.iter().any(|e| {
            e.reason.as_deref() == Some(reason::ADMIN_TOKEN_ROTATED)
                && e.type_.as_deref() == Some("Warning")
        }) {
            return Ok(());
        }
        // A reconcile that read the Secret just before it went applies it again with the token it
        // read (the workers keep working): delete it again until a reconcile finds it missing.
        if let Some(s) = secrets
            .get_opt("tiny-admin-token")
            .await
            .map_err(|e| e.to_string())?
        {
            if token_of(&s) == old_token {
                let _ = secrets
                    .delete("tiny-admin-token", &DeleteParams::default())
                    .await;
                return Err("the Secret came back with the old token: deleted it again".into());
            }
        }
        Err(format!("{} events, none matching", list.items.len()))
    })
    .await;
    // The load shifts (the hot experts swap), so CRAFT plans again and rolls the plan out.
    std::fs::write(
        &trace,
        json!({"logical_count": [row(1), row(0)]}).to_string(),
    )
    .unwrap();
    let after_rotation = wait_for(
        "a plan made after the token rotation rolled out on every worker",
        long,
        || async {
            loadgen_round(&cms, "tiny-plan", &plan_file, &workers, &trace).await?;
            let md = mds.get("tiny").await.map_err(|e| e.to_string())?;
            let st = md.status.clone().unwrap_or_default();
            let h = st.plan.as_ref().map(|p| p.hash.clone()).unwrap_or_default();
            let on = st.workers.as_ref().map(|w| w.on_current_plan).unwrap_or(0);
            let ready = condition(&md, "Ready").map(|c| c.0);
            if h != hash && on == NODES as i32 && ready.as_deref() == Some("True") {
                Ok(h)
            } else {
                Err(format!("plan {h}, {on} workers on it, Ready {ready:?}"))
            }
        },
    )
    .await;
    eprintln!("after the token rotation, plan {after_rotation} rolled out on every worker");

    // Invalid spec past CEL (validated by the operator): Degraded and a Warning event naming the field.
    let mut bad = deployment("bad", NS, &ckpt, 2, 2, true);
    bad["spec"]["metrics"]["interval"] = json!("10ms");
    let bad_md: MoEDeployment = serde_json::from_value(bad).unwrap();
    match mds
        .patch("bad", &PatchParams::apply("e2e"), &Patch::Apply(&bad_md))
        .await
    {
        Err(e) => eprintln!("invalid spec refused at apply: {e}"),
        Ok(_) => {
            let msg = wait_for("bad: Degraded=True", long, || async {
                let md = mds.get("bad").await.map_err(|e| e.to_string())?;
                match condition(&md, "Degraded") {
                    Some((s, _, m)) if s == "True" => Ok(m),
                    c => Err(format!("{c:?}")),
                }
            })
            .await;
            assert!(
                msg.contains("spec.metrics.interval"),
                "Degraded message does not name the field: {msg}"
            );
            let md = mds.get("bad").await.unwrap();
            assert_ne!(condition(&md, "Ready").map(|c| c.0), Some("True".into()));
            wait_for_event(&events, "a Warning event for bad", long, |e| {
                e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("bad")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.contains("spec.metrics.interval"))
            })
            .await;
            let bad_pods = pods
                .list(&ListParams::default().labels("moe.craft.dev/deployment=bad"))
                .await
                .unwrap();
            assert!(
                bad_pods.items.is_empty(),
                "pods created for an invalid spec"
            );
        }
    }

    // The operator is alive (never crash-looped on the bad spec).
    assert!(
        plane.operator_running("e2e-operator"),
        "moe-operator exited"
    );

    // Delete: everything it owned goes (garbage collection through owner references).
    mds.delete("tiny", &DeleteParams::foreground())
        .await
        .expect("delete tiny");
    wait_for(
        "tiny's pods, ConfigMap and Secret to be gone",
        long,
        || async {
            let p = pods
                .list(&ListParams::default().labels("moe.craft.dev/deployment=tiny"))
                .await
                .map_err(|e| e.to_string())?;
            let cm = Api::<ConfigMap>::namespaced(admin.clone(), NS)
                .get_opt("tiny-plan")
                .await
                .map_err(|e| e.to_string())?;
            let s = Api::<Secret>::namespaced(admin.clone(), NS)
                .get_opt("tiny-admin-token")
                .await
                .map_err(|e| e.to_string())?;
            if p.items.is_empty() && cm.is_none() && s.is_none() {
                Ok(())
            } else {
                Err(format!(
                    "{} pods, ConfigMap {}, Secret {}",
                    p.items.len(),
                    cm.is_some(),
                    s.is_some()
                ))
            }
        },
    )
    .await;
    plane.kill_operator("e2e-operator");
}

/// Wait until an Event in the namespace matches `pred`.
async fn wait_for_event(
    events: &Api<Event>,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Event) -> bool,
) {
    wait_for(what, timeout, || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .find(|e| pred(e))
            .map(|_| ())
            .ok_or_else(|| format!("{} events, none matching", list.items.len()))
    })
    .await;
}
