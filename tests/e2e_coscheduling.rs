//! `scheduling.gang: PodGroup` against the real coscheduling plugin: the scheduler of
//! sigs.k8s.io/scheduler-plugins (built from its Go module by e2e/build-scheduler-plugins.sh, with
//! the PodGroup CRD of the same release) runs as a second scheduler beside kube-scheduler on the
//! local control plane of two fake GPU nodes (8 `nvidia.com/gpu` each). The operator (under the
//! chart's ServiceAccount, so the chart's `podgroups` rule is what it has) applies the PodGroup;
//! a group that fits is scheduled whole, and a group of three 8-GPU workers on two nodes is not
//! scheduled at all: no pod holds a GPU.
//!
//! Fails when `CI` is set and the scheduler is not built; otherwise skips with a loud message.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::operator::{deployment, free_port, tool, wait_for, OperatorPlane};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::Api;
use moe_operator::api::MoEDeployment;
use serde_json::json;

mod common;
const NS: &str = "ml";
const SCHEDULER: &str = "scheduler-plugins-scheduler";

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The scheduler-plugins bin dir, or None (skip) off CI when it is not built.
fn scheduler_plugins() -> Option<PathBuf> {
    let out = Command::new(common::repo().join("e2e/build-scheduler-plugins.sh"))
        .arg("--bin-dir")
        .output()
        .expect("running e2e/build-scheduler-plugins.sh --bin-dir");
    if out.status.success() {
        return Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        !ci(),
        "CI is set and the coscheduling scheduler is not built: {why}"
    );
    eprintln!("SKIPPED: no coscheduling scheduler ({why}); run e2e/build-scheduler-plugins.sh");
    None
}

/// The scheduler process, killed on drop.
struct Scheduler(Child);
impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn node_names(pods: &[Pod]) -> Vec<Option<String>> {
    pods.iter()
        .map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_group_gangs_are_scheduled_whole_or_not_at_all() {
    let Some(sp) = scheduler_plugins() else {
        return;
    };
    let mut plane = OperatorPlane::up("moe-e2e-cosched-", 2, NS).await;
    let (bin, kc) = (plane.bin.clone(), plane.admin_kc.clone());
    let crd = sp.join("podgroups.scheduling.x-k8s.io.yaml");
    tool(
        &bin,
        "kubectl",
        &["apply", "-f", crd.to_str().unwrap()],
        &kc,
    );
    tool(
        &bin,
        "kubectl",
        &[
            "wait",
            "--for=condition=Established",
            "crd/podgroups.scheduling.x-k8s.io",
            "--timeout=60s",
        ],
        &kc,
    );
    // The coscheduling plugin as its release's example configures it, under its own name.
    let config = plane.state.join("scheduler-plugins.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
leaderElection: {{leaderElect: false}}
clientConnection: {{kubeconfig: {kc:?}}}
profiles:
- schedulerName: {SCHEDULER}
  plugins:
    multiPoint: {{enabled: [{{name: Coscheduling}}]}}
    queueSort: {{enabled: [{{name: Coscheduling}}], disabled: [{{name: \"*\"}}]}}
  pluginConfig:
  - name: Coscheduling
    args: {{permitWaitingTimeSeconds: 10}}
"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(plane.state.join("scheduler-plugins.log")).unwrap();
    let _sched = Scheduler(
        Command::new(sp.join("scheduler-plugins-scheduler"))
            .args([
                "--config",
                config.to_str().unwrap(),
                "--authentication-kubeconfig",
                kc.to_str().unwrap(),
                "--authorization-kubeconfig",
                kc.to_str().unwrap(),
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                &free_port().to_string(),
                "--cert-dir",
                plane
                    .state
                    .join("scheduler-plugins-certs")
                    .to_str()
                    .unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the scheduler-plugins scheduler"),
    );
    plane.start_operator("e2e-cosched");
    let admin = plane.admin.clone();
    let long = Duration::from_secs(120);
    let ckpt = plane.checkpoint();
    let mds: Api<MoEDeployment> = Api::namespaced(admin.clone(), NS);
    let pgs: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        NS,
        &ApiResource {
            group: "scheduling.x-k8s.io".into(),
            version: "v1alpha1".into(),
            api_version: "scheduling.x-k8s.io/v1alpha1".into(),
            kind: "PodGroup".into(),
            plural: "podgroups".into(),
        },
    );
    let gang = |name: &str, nodes: u32| {
        let mut d = deployment(name, NS, &ckpt, nodes, 8, false);
        d["spec"]["model"]["experts"] = json!(24);
        d["spec"]["scheduling"] = json!({"gang": "PodGroup", "timeout": "30s"});
        d["spec"]["worker"]["schedulerName"] = json!(SCHEDULER);
        serde_json::from_value::<MoEDeployment>(d).unwrap()
    };

    // A group that fits (2 workers, 2 nodes): its PodGroup, then both pods bound.
    mds.patch(
        "fits",
        &PatchParams::apply("e2e"),
        &Patch::Apply(&gang("fits", 2)),
    )
    .await
    .expect("apply fits");
    let pg = wait_for("PodGroup fits-workers", long, || async {
        pgs.get_opt("fits-workers")
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "absent".to_string())
    })
    .await;
    assert_eq!(pg.data["spec"]["minMember"], 2);
    assert_eq!(pg.data["spec"]["scheduleTimeoutSeconds"], 30);
    assert_eq!(
        pg.metadata.owner_references.as_ref().unwrap()[0].name,
        "fits",
        "deleted with its MoEDeployment"
    );
    let bound = wait_for(
        "both fits pods bound by the coscheduling scheduler",
        long,
        || async {
            let pods = plane.worker_pods("fits").await?;
            let nodes = node_names(&pods);
            if pods.len() == 2 && nodes.iter().all(Option::is_some) {
                Ok(pods)
            } else {
                Err(format!("{nodes:?}"))
            }
        },
    )
    .await;
    for p in &bound {
        assert_eq!(
            p.spec.as_ref().unwrap().scheduler_name.as_deref(),
            Some(SCHEDULER)
        );
        assert_eq!(
            p.metadata.labels.as_ref().unwrap()["scheduling.x-k8s.io/pod-group"],
            "fits-workers"
        );
    }
    mds.delete("fits", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_for("fits pods gone", long, || async {
        match plane.worker_pods("fits").await?.len() {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        }
    })
    .await;

    // A group that does not fit (3 workers of 8 GPUs, 2 nodes of 8): the scheduler looks at
    // every pod, and binds none of them, so no GPU is held by a group that cannot serve.
    mds.patch(
        "toobig",
        &PatchParams::apply("e2e"),
        &Patch::Apply(&gang("toobig", 3)),
    )
    .await
    .expect("apply toobig");
    wait_for(
        "every toobig pod seen and refused by the scheduler",
        long,
        || async {
            let pods = plane.worker_pods("toobig").await?;
            let refused = pods
                .iter()
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c.type_ == "PodScheduled" && c.status == "False")
                        })
                })
                .count();
            if pods.len() == 3 && refused == 3 {
                Ok(())
            } else {
                Err(format!(
                    "{} pods, {refused} with PodScheduled=False",
                    pods.len()
                ))
            }
        },
    )
    .await;
    // Past the plugin's permit wait (10s) and more: still nothing bound.
    for _ in 0..20 {
        let pods = plane.worker_pods("toobig").await.unwrap();
        assert_eq!(pods.len(), 3);
        assert!(
            node_names(&pods).iter().all(Option::is_none),
            "a pod of an incomplete gang was bound: {:?}",
            node_names(&pods)
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
