//! End-to-end tests of the production-cluster features on the local control plane (e2e/cluster.sh),
//! with the operator under the chart's ServiceAccount (tests/common/operator.rs), on one plane of
//! two fake GPU nodes (8 `nvidia.com/gpu` each):
//! - the CRD refuses the pod-shaping, scheduling, engine, series-label and step-time specs of
//!   examples/invalid/ with the messages docs/api.md quotes (or the schema's own);
//! - a shaped MoEDeployment's worker pod reaches the API server with the user's fields merged
//!   beside the operator's;
//! - `spec.suspend` scales real (process-backed) workers of an EP group to zero with no group
//!   restart, keeps the plan, and resumes on the same plan;
//! - the gang guard releases a group of three workers that only two nodes can hold, reporting
//!   `Unschedulable` with the GPUs missing.
//!
//! Needs the binaries of `e2e/build.sh`; fails (does not skip) without them.

use std::process::Command;
use std::time::Duration;

use common::operator::{condition, deployment, wait_for, OperatorPlane};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::Api;
use moe_operator::api::{reason, MoEDeployment};
use serde_json::json;

mod common;
const NODES: usize = 2;
const NS: &str = "ml";

/// Events of the namespace with `reason` about deployment `name`.
async fn events_for(events: &Api<Event>, name: &str, why: &str) -> Vec<Event> {
    events
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(why)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shaping_suspend_and_gang_guard_end_to_end() {
    let mut plane = OperatorPlane::up("moe-e2e-production-", NODES, NS).await;
    let admin = plane.admin.clone();
    let long = Duration::from_secs(180);
    let (bin, kc) = (plane.bin.clone(), plane.admin_kc.clone());

    // 1. The CRD's refusals, as docs/api.md quotes them.
    let repo = common::repo();
    for (file, want) in [
        ("pod-vol-ours.yaml", r#"spec.worker.volumes[0].name: Invalid value: "object": worker.volumes[].name: plan, admin-token, shm and checkpoint are the operator's volumes: choose another name"#),
        ("pod-vol-nosrc.yaml", r#"spec.worker.volumes[0]: Invalid value: "object": worker.volumes[] needs exactly one of configMap, secret, persistentVolumeClaim, emptyDir or hostPath"#),
        ("pod-shm-mount.yaml", r#"spec.worker.volumeMounts[0].mountPath: Invalid value: "object": worker.volumeMounts[].mountPath: /dev/shm is the operator's memory-backed volume: size it with dataPlane.shmSize"#),
        ("pod-cap.yaml", r#"spec.worker.securityContext.capabilities.add[0]: Invalid value: "sys_admin": spec.worker.securityContext.capabilities.add[0] in body should match '^[A-Z][A-Z0-9_]*$'"#),
        ("gang-kueue-noqueue.yaml", "spec.scheduling.queueName: Required value: scheduling.queueName (the Kueue LocalQueue) is required when scheduling.gang is Kueue"),
        ("gang-unknown.yaml", r#"spec.scheduling.gang: Unsupported value: "Volcano": supported values: "None", "Kueue", "PodGroup", "Guard""#),
        ("engine-workers.yaml", r#"spec.metrics.source: Invalid value: "object": engine pods serve the engine's metrics, not moe-worker's: set metrics.source to Prometheus with a query over the engine's per-expert metric (docs/engines.md)"#),
        ("engine-kind.yaml", r#"spec.engine.kind: Unsupported value: "TensorRT": supported values: "SGLang", "VLLM""#),
        ("series-label.yaml", "spec.metrics.prometheus.seriesLabels.layer in body should match '^[a-zA-Z_][a-zA-Z0-9_]*$'"),
        ("steptime-eplb.yaml", r#"spec.replication.stepTime: Invalid value: "object": replication.stepTime chooses CRAFT's per-layer replica counts: it needs policy Craft"#),
        ("steptime-tokens.yaml", "spec.replication.stepTime.tokensPerStep in body should be greater than or equal to 1"),
        ("replicas-neg.yaml", "spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal to 0"),
        ("groups-budget.yaml", r#"spec.rollout.maxUnavailableGroups: Invalid value: "object": rollout.maxUnavailableGroups and rollout.maxSurge cannot both be 0: a rollout could never take a group out of service nor add one first"#),
    ] {
        let path = repo.join("examples/invalid").join(file);
        let out = Command::new(bin.join("kubectl"))
            .args(["apply", "--dry-run=server", "-f", path.to_str().unwrap()])
            .env("KUBECONFIG", &kc)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} was accepted");
        assert!(err.contains(want), "{file}: {err}");
    }

    plane.start_operator("e2e-production");
    let ckpt = plane.checkpoint();
    let mds: Api<MoEDeployment> = Api::namespaced(admin.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let events: Api<Event> = Api::namespaced(admin.clone(), NS);
    let ssa = PatchParams::apply("e2e");

    // 2. A shaped deployment: its pod as the API server stores it. Not process-backed: kwok runs
    // it as a fake pod, which is all the assertion needs.
    let rc = json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                    "metadata": {"name": "nvidia"}, "handler": "nvidia"});
    let rcs: Api<k8s_openapi::api::node::v1::RuntimeClass> = Api::all(admin.clone());
    rcs.patch("nvidia", &ssa, &Patch::Apply(&rc))
        .await
        .expect("RuntimeClass");
    let mut shaped = deployment("shaped", NS, &ckpt, 1, 2, false);
    shaped["spec"]["worker"] = json!({
        "image": "moe-worker:dev", "device": "cpu", "nodeSelector": {"type": "kwok"},
        "podLabels": {"team": "serving"},
        "podAnnotations": {"example.com/owner": "ml-platform"},
        "imagePullSecrets": [{"name": "regcred"}],
        "schedulerName": "default-scheduler",
        "runtimeClassName": "nvidia",
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]}]}}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"team": "serving"}}}],
        "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE"]}, "runAsUser": 1000}
    });
    let md: MoEDeployment = serde_json::from_value(shaped).unwrap();
    mds.patch("shaped", &ssa, &Patch::Apply(&md))
        .await
        .expect("apply shaped");
    let pod = wait_for("the shaped worker pod", long, || async {
        pods.get_opt("shaped-worker-0")
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "not created".to_string())
    })
    .await;
    let l = pod.metadata.labels.as_ref().unwrap();
    assert_eq!(l["team"], "serving");
    assert_eq!(l["moe.craft.dev/deployment"], "shaped");
    let a = pod.metadata.annotations.as_ref().unwrap();
    assert_eq!(a["example.com/owner"], "ml-platform");
    assert!(a.contains_key("moe.craft.dev/spec-hash"));
    let s = pod.spec.as_ref().unwrap();
    assert_eq!(s.runtime_class_name.as_deref(), Some("nvidia"));
    assert_eq!(s.scheduler_name.as_deref(), Some("default-scheduler"));
    assert_eq!(s.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
    assert_eq!(
        s.topology_spread_constraints.as_ref().unwrap()[0].topology_key,
        "kubernetes.io/hostname"
    );
    let aff = s.affinity.as_ref().unwrap();
    assert!(aff.node_affinity.is_some());
    let anti = aff
        .pod_anti_affinity
        .as_ref()
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap();
    assert_eq!(
        anti[0].topology_key, "kubernetes.io/hostname",
        "the operator's one-per-node rule stays"
    );
    let vols: Vec<&str> = s
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        vols,
        ["plan", "admin-token", "shm", "checkpoint", "scratch"]
    );
    let c = &s.containers[0];
    let mounts: Vec<&str> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(
        mounts,
        [
            "/etc/moe/plan",
            "/etc/moe/admin",
            "/dev/shm",
            "/models/tiny",
            "/scratch"
        ]
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(1000));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_BIND_SERVICE".to_string()][..])
    );
    // A spec that reaches for the operator's label is held back by name, nothing else changes.
    let bad = json!({"apiVersion": "moe.craft.dev/v1alpha1", "kind": "MoEDeployment",
        "metadata": {"name": "shaped", "namespace": NS},
        "spec": {"worker": {"podLabels": {"team": "serving", "moe.craft.dev/node-rank": "7"}}}});
    mds.patch(
        "shaped",
        &PatchParams::apply("e2e-bad"),
        &Patch::Apply(&bad),
    )
    .await
    .expect("patch bad label");
    wait_for("Degraded InvalidSpec naming the label", long, || async {
        let md = mds.get("shaped").await.map_err(|e| e.to_string())?;
        match condition(&md, "Degraded") {
            Some((s, r, m)) if s == "True" && r == reason::INVALID_SPEC && m.contains("spec.worker.podLabels[\"moe.craft.dev/node-rank\"]: moe.craft.dev/node-rank is set by the operator") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        pods.get("shaped-worker-0").await.unwrap().metadata.uid,
        pod.metadata.uid,
        "the serving pod stays"
    );
    mds.delete("shaped", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_for("shaped workers gone", long, || async {
        match plane.worker_pods("shaped").await?.len() {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        }
    })
    .await;

    // 3. Suspend and resume real workers of an EP group (tcp ranks).
    let mut sus = deployment("sus", NS, &ckpt, 2, 1, true);
    sus["spec"]["dataPlane"] = json!({"transport": "tcp"});
    let md: MoEDeployment = serde_json::from_value(sus.clone()).unwrap();
    mds.patch("sus", &ssa, &Patch::Apply(&md))
        .await
        .expect("apply sus");
    let ready = |want: &'static str| {
        let mds = mds.clone();
        async move {
            let md = mds.get("sus").await.map_err(|e| e.to_string())?;
            match condition(&md, "Ready") {
                Some((s, _, _)) if s == want => Ok(md),
                other => Err(format!("Ready {other:?}")),
            }
        }
    };
    let before = wait_for("sus Ready", long, || ready("True")).await;
    let hash = before
        .status
        .as_ref()
        .unwrap()
        .plan
        .as_ref()
        .unwrap()
        .hash
        .clone();
    let uids: Vec<_> = plane
        .worker_pods("sus")
        .await
        .unwrap()
        .iter()
        .map(|p| p.metadata.uid.clone())
        .collect();
    assert_eq!(uids.len(), 2);
    sus["spec"]["suspend"] = json!(true);
    let md: MoEDeployment = serde_json::from_value(sus.clone()).unwrap();
    mds.patch("sus", &ssa, &Patch::Apply(&md))
        .await
        .expect("suspend");
    let suspended = wait_for("sus suspended, no worker pods", long, || async {
        let md = mds.get("sus").await.map_err(|e| e.to_string())?;
        let left = plane.worker_pods("sus").await?.len();
        match condition(&md, "Suspended") {
            Some((s, r, _)) if s == "True" && r == reason::SUSPENDED && left == 0 => Ok(md),
            other => Err(format!("Suspended {other:?}, {left} pod(s) left")),
        }
    })
    .await;
    let st = suspended.status.as_ref().unwrap();
    assert_eq!(st.plan.as_ref().unwrap().hash, hash, "status.plan kept");
    assert_eq!(condition(&suspended, "Ready").unwrap().1, reason::SUSPENDED);
    let cm = Api::<ConfigMap>::namespaced(admin.clone(), NS)
        .get("sus-plan")
        .await
        .unwrap();
    assert_eq!(cm.data.unwrap()["hash"], hash, "the plan ConfigMap kept");
    // Stays at zero: nothing recreated while suspended.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(plane.worker_pods("sus").await.unwrap().is_empty());
    assert!(
        events_for(&events, "sus", reason::RANK_FAILED)
            .await
            .is_empty(),
        "no group restart"
    );
    sus["spec"]["suspend"] = json!(false);
    let md: MoEDeployment = serde_json::from_value(sus.clone()).unwrap();
    mds.patch("sus", &ssa, &Patch::Apply(&md))
        .await
        .expect("resume");
    let after = wait_for("sus Ready again", long, || ready("True")).await;
    assert_eq!(
        after.status.as_ref().unwrap().plan.as_ref().unwrap().hash,
        hash,
        "resumed on the same plan"
    );
    assert_eq!(condition(&after, "Suspended").unwrap().1, reason::RESUMED);
    let new_uids: Vec<_> = plane
        .worker_pods("sus")
        .await
        .unwrap()
        .iter()
        .map(|p| p.metadata.uid.clone())
        .collect();
    assert!(new_uids.iter().all(|u| !uids.contains(u)), "new pods");
    assert_eq!(events_for(&events, "sus", reason::SUSPENDED).await.len(), 1);
    assert_eq!(events_for(&events, "sus", reason::RESUMED).await.len(), 1);
    assert!(
        events_for(&events, "sus", reason::PLAN_IMPROVED)
            .await
            .is_empty(),
        "no re-plan on resume"
    );
    assert!(
        events_for(&events, "sus", reason::RANK_FAILED)
            .await
            .is_empty(),
        "no group restart"
    );
    mds.delete("sus", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_for("sus workers gone", long, || async {
        match plane.worker_pods("sus").await?.len() {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        }
    })
    .await;

    // 4. The gang guard: 3 workers of 8 GPUs, one per node, on 2 nodes of 8 GPUs.
    let mut gang = deployment("gang", NS, &ckpt, 3, 8, false);
    gang["spec"]["model"]["experts"] = json!(24);
    gang["spec"]["scheduling"] = json!({"gang": "Guard", "timeout": "10s"});
    let md: MoEDeployment = serde_json::from_value(gang).unwrap_or_else(|e| panic!("{e}"));
    mds.patch("gang", &ssa, &Patch::Apply(&md))
        .await
        .expect("apply gang");
    let released = wait_for("gang released: Degraded Unschedulable", long, || async {
        let md = mds.get("gang").await.map_err(|e| e.to_string())?;
        match (
            condition(&md, "Degraded"),
            md.status.as_ref().and_then(|s| s.gang.clone()),
        ) {
            (Some((s, r, m)), Some(g)) if s == "True" && r == reason::UNSCHEDULABLE => Ok((m, g)),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (message, g) = released;
    assert!(message.starts_with("1 of 3 worker pods not scheduled within 10s: 8 nvidia.com/gpu missing (1 unscheduled pod(s) x 8 requested each); the scheduler says: 0/2 nodes are available"), "{message}");
    assert!(
        message.contains("deleted its 2 placed pod(s) (16 nvidia.com/gpu)"),
        "{message}"
    );
    assert_eq!((g.unscheduled_pods, g.missing_gpus), (1, 8));
    let warned = events_for(&events, "gang", reason::UNSCHEDULABLE).await;
    assert!(
        warned.iter().any(|e| e.type_.as_deref() == Some("Warning")),
        "{warned:?}"
    );
    // Released: the placed pods are gone (deleted), then the group is tried again after the
    // back-off, and released again: the GPUs are never held past the timeout.
    wait_for("the released group's pods gone", long, || async {
        let live = plane
            .worker_pods("gang")
            .await?
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .count();
        if live == 0 {
            Ok(())
        } else {
            Err(format!("{live} live pod(s)"))
        }
    })
    .await;
    let first_release = g.released_at.0;
    wait_for("a second attempt, released again", long, || async {
        let md = mds.get("gang").await.map_err(|e| e.to_string())?;
        match md.status.as_ref().and_then(|s| s.gang.as_ref()) {
            Some(g) if g.released_at.0 > first_release => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        condition(&mds.get("gang").await.unwrap(), "Ready")
            .unwrap()
            .0,
        "False"
    );
}
