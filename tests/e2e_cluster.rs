//! Smoke test of the local control plane (e2e/cluster.sh): scheduling onto fake GPU nodes,
//! controller-manager workloads and garbage collection, RBAC, process-backed pods, and a clean `down`.
//!
//! Needs the binaries from `e2e/build.sh` (cached outside the repository); without them it fails and
//! says so. Each run uses its own state directory and free ports, so runs never collide.

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret, ServiceAccount};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
const NS: &str = "smoke";
const NODES: usize = 2;

/// The plane of one test: brought up in its own state dir, always torn down on drop. On a failure the
/// state dir (logs of every component and pod) is kept and its path printed.
struct Plane {
    state: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Plane {
    fn script(&self, verb: &str) -> std::process::Output {
        common::cluster_script(&self.state, NODES, verb)
    }

    fn run(&self, verb: &str) -> String {
        common::run_cluster(&self.state, NODES, verb)
    }

    async fn client(&self) -> Client {
        common::client_from(&self.state.join("kubeconfig")).await
    }

    /// Pids of every component (from the pidfiles) and every pod process.
    fn pids(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        for dir in ["pids", "pods"] {
            let Ok(rd) = std::fs::read_dir(self.state.join(dir)) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                let f = if p.is_dir() { p.join("pid") } else { p.clone() };
                if let Some(pid) = std::fs::read_to_string(&f)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                {
                    out.push((f.display().to_string(), pid));
                }
            }
        }
        out
    }

    fn ports(&self) -> Vec<u16> {
        std::fs::read_to_string(self.state.join("ports.env"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("_PORT="))
            .filter_map(|l| l.split_once('=')?.1.parse().ok())
            .collect()
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        let _ = self.script("down");
        if std::thread::panicking() {
            if let Some(t) = self._tmp.take() {
                let kept = t.keep();
                eprintln!("e2e state (logs) kept in {}", kept.display());
            }
        }
    }
}

/// Polls `check` until it returns Some, or fails naming `what` after `timeout`.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn obj<T: DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("test object deserialises")
}

fn pid_alive(pid: u32) -> bool {
    // A zombie is gone for our purposes; only count processes that still run.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn port_listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        .is_ok()
}

/// HTTP GET / against ip:port with a plain TCP stream; the body on a 200.
async fn http_get(ip: &str, port: u16) -> Option<String> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((ip, port)),
    )
    .await
    .ok()?
    .ok()?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| body.to_string())
}

async fn running_pod(pods: &Api<Pod>, name: &str) -> Option<Pod> {
    let p = pods.get_opt(name).await.ok()??;
    let st = p.status.as_ref()?;
    (st.phase.as_deref() == Some("Running") && st.pod_ip.is_some()).then_some(p)
}

/// The toleration and selector every pod here needs to land on a fake GPU node.
fn gpu_placement() -> serde_json::Value {
    json!({
        "nodeSelector": {"type": "kwok"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    })
}

fn gpu_pod(name: &str, gpus: u32) -> Pod {
    let mut spec = gpu_placement();
    spec["containers"] = json!([{
        "name": "worker", "image": "moe-worker:fake",
        "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}
    }]);
    obj(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}))
}

/// A process-backed pod: python3 answers HTTP on the pod IP with a Secret-sourced env value, the content
/// of a file from a ConfigMap volume (its mount path given in args and rewritten by the launcher) and its
/// own POD_IP.
fn responder_pod(name: &str) -> Pod {
    const SCRIPT: &str = r#"
import http.server, os, sys
body = "|".join([os.environ["GREETING"], open(sys.argv[1]).read(), os.environ["POD_IP"]]).encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
print("serving on", os.environ["POD_IP"], flush=True)
http.server.HTTPServer((os.environ["POD_IP"], int(sys.argv[2])), H).serve_forever()
"#;
    let mut spec = gpu_placement();
    spec["terminationGracePeriodSeconds"] = json!(2);
    spec["volumes"] = json!([{"name": "greet", "configMap": {"name": "greet"}}]);
    spec["containers"] = json!([{
        "name": "responder", "image": "python:fake",
        "command": ["python3", "-c", SCRIPT],
        "args": ["/etc/greet/message", "$(PORT)"],
        "env": [
            {"name": "PORT", "value": "8080"},
            {"name": "GREETING", "valueFrom": {"secretKeyRef": {"name": "greet", "key": "greeting"}}}
        ],
        "volumeMounts": [{"name": "greet", "mountPath": "/etc/greet", "readOnly": true}]
    }]);
    obj(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"moe.craft.dev/process-backed": "true"}},
        "spec": spec
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_smoke() {
    let bin_dir = Command::new(common::repo().join("e2e/build.sh"))
        .arg("--bin-dir")
        .output()
        .expect("running e2e/build.sh --bin-dir");
    assert!(
        bin_dir.status.success(),
        "the local control plane is not built: run e2e/build.sh first (it caches etcd, kube-apiserver, \
         kube-controller-manager, kube-scheduler, kubectl, kwok and helm outside the repo): {}",
        String::from_utf8_lossy(&bin_dir.stderr).trim()
    );

    let tmp = tempfile::Builder::new()
        .prefix("moe-e2e-smoke-")
        .tempdir()
        .expect("temp state dir");
    let plane = Plane {
        state: tmp.path().to_path_buf(),
        _tmp: Some(tmp),
    };
    let t0 = Instant::now();
    let up_log = plane.run("up");
    eprintln!("cluster up in {:?}:\n{up_log}", t0.elapsed());
    // `up` on a healthy plane is a no-op that succeeds.
    let again = plane.run("up");
    assert!(
        again.contains("already up"),
        "second `up` did not see the running plane: {again}"
    );
    plane.run("status");
    let env = plane.run("env");
    assert!(
        env.lines()
            .any(|l| l == format!("KUBECONFIG={}", plane.state.join("kubeconfig").display())),
        "`env` does not print the admin kubeconfig: {env}"
    );

    let client = plane.client().await;
    let long = Duration::from_secs(90);

    // Fake GPU nodes with 8 allocatable GPUs and the GPU feature-discovery labels.
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes
        .list(&ListParams::default().labels("type=kwok"))
        .await
        .expect("list nodes");
    assert_eq!(list.items.len(), NODES, "expected {NODES} fake nodes");
    for n in &list.items {
        let labels = n.metadata.labels.clone().unwrap_or_default();
        assert!(
            labels.contains_key("nvidia.com/gpu.product"),
            "node lacks gpu.product label"
        );
        assert!(
            labels
                .get("nvidia.com/gpu.memory")
                .is_some_and(|m| m.parse::<u64>().is_ok()),
            "node gpu.memory label is not MiB: {labels:?}"
        );
        let alloc = n
            .status
            .as_ref()
            .and_then(|s| s.allocatable.clone())
            .unwrap_or_default();
        assert_eq!(alloc.get("nvidia.com/gpu").map(|q| q.0.as_str()), Some("8"));
    }

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &obj(json!({"metadata": {"name": NS}})),
        )
        .await
        .expect("create namespace");
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    wait_for(
        "the default ServiceAccount in the test namespace",
        long,
        || async { sas.get_opt("default").await.ok().flatten() },
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pp = PostParams::default();

    // A Deployment: the controller-manager creates a ReplicaSet and pods, the scheduler binds them to
    // fake nodes, kwok marks them Running.
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let mut tmpl_spec = gpu_placement();
    tmpl_spec["containers"] = json!([{"name": "c", "image": "fake"}]);
    deploys
        .create(
            &pp,
            &obj(json!({
                "metadata": {"name": "web"},
                "spec": {
                    "replicas": 3,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}}, "spec": tmpl_spec}
                }
            })),
        )
        .await
        .expect("create deployment");
    let web = ListParams::default().labels("app=web");
    wait_for(
        "3 Running pods of Deployment web on fake GPU nodes",
        long,
        || async {
            let l = pods.list(&web).await.ok()?;
            let ok = l
                .items
                .iter()
                .filter(|p| {
                    p.spec
                        .as_ref()
                        .and_then(|s| s.node_name.as_deref())
                        .is_some_and(|n| n.starts_with("gpu-node-"))
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                })
                .count();
            (ok == 3).then_some(())
        },
    )
    .await;

    // Whole-node GPU pods: one per node fits, the next does not (the scheduler counts nvidia.com/gpu).
    for i in 0..NODES {
        pods.create(&pp, &gpu_pod(&format!("gpu-{i}"), 8))
            .await
            .expect("create gpu pod");
    }
    let mut gpu_nodes = Vec::new();
    for i in 0..NODES {
        let name = format!("gpu-{i}");
        let p = wait_for(
            &format!("pod {name} (nvidia.com/gpu: 8) Running"),
            long,
            || running_pod(&pods, &name),
        )
        .await;
        gpu_nodes.push(p.spec.and_then(|s| s.node_name).expect("bound"));
    }
    gpu_nodes.sort();
    gpu_nodes.dedup();
    assert_eq!(gpu_nodes.len(), NODES, "two 8-GPU pods shared a node");
    pods.create(&pp, &gpu_pod("gpu-extra", 8))
        .await
        .expect("create extra gpu pod");
    wait_for("gpu-extra to be reported Unschedulable", long, || async {
        let p = pods.get("gpu-extra").await.ok()?;
        let conds = p.status?.conditions?;
        conds
            .iter()
            .any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
            .then_some(())
    })
    .await;

    // Process-backed pod: its process answers on its pod IP with Secret and ConfigMap data.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    cms.create(
        &pp,
        &obj(json!({"metadata": {"name": "greet"}, "data": {"message": "hello from a configmap"}})),
    )
    .await
    .expect("create configmap");
    secrets
        .create(
            &pp,
            &obj(json!({"metadata": {"name": "greet"}, "stringData": {"greeting": "s3cret"}})),
        )
        .await
        .expect("create secret");
    pods.create(&pp, &responder_pod("responder"))
        .await
        .expect("create responder");
    pods.create(&pp, &responder_pod("survivor"))
        .await
        .expect("create survivor");
    let mut ips = Vec::new();
    for name in ["responder", "survivor"] {
        let p = wait_for(&format!("process-backed pod {name} Running"), long, || {
            running_pod(&pods, name)
        })
        .await;
        let ip = p.status.and_then(|s| s.pod_ip).expect("pod ip");
        assert!(
            ip.starts_with("127."),
            "pod IP {ip} is not a loopback address"
        );
        let body = wait_for(
            &format!(
                "pod {name}'s process to answer on {ip}:8080 (log: {}/pods/{NS}_{name}/log)",
                plane.state.display()
            ),
            long,
            || http_get(&ip, 8080),
        )
        .await;
        assert_eq!(body, format!("s3cret|hello from a configmap|{ip}"));
        ips.push(ip);
    }
    let pod_dir = plane.state.join(format!("pods/{NS}_responder"));
    let log = std::fs::read_to_string(pod_dir.join("log")).expect("pod log file");
    assert!(
        log.contains("serving on"),
        "pod stdout not kept in its log: {log}"
    );
    let pid: u32 = std::fs::read_to_string(pod_dir.join("pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(pid_alive(pid));
    // Deleting the pod stops its process.
    pods.delete("responder", &DeleteParams::default())
        .await
        .expect("delete responder");
    wait_for("the deleted pod's process to exit", long, || async {
        (!pid_alive(pid)).then_some(())
    })
    .await;
    assert!(
        http_get(&ips[0], 8080).await.is_none(),
        "deleted pod still answers"
    );

    // RBAC: a ServiceAccount with a valid token but no bindings is authenticated and then forbidden.
    sas.create(&pp, &obj(json!({"metadata": {"name": "nobody"}})))
        .await
        .expect("create sa");
    let token = common::service_account_token(&client, NS, "nobody", 600).await;
    let nobody_kc = plane.state.join("nobody.kubeconfig");
    common::write_token_kubeconfig(&plane.state.join("kubeconfig"), &token, &nobody_kc);
    let nobody = common::client_from(&nobody_kc).await;
    let err = Api::<Pod>::namespaced(nobody.clone(), NS)
        .list(&ListParams::default())
        .await
        .expect_err("a ServiceAccount without rights listed pods");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 403, "expected 403 Forbidden, got {s:?}");
            assert!(
                s.message.contains("system:serviceaccount:smoke:nobody"),
                "refusal does not name the ServiceAccount: {}",
                s.message
            );
        }
        other => panic!("expected an RBAC refusal, got {other}"),
    }

    // Garbage collection: dependents of a deleted owner go away (ConfigMap owner, and the Deployment's
    // ReplicaSet and pods).
    let owner = cms
        .create(&pp, &obj(json!({"metadata": {"name": "owner"}})))
        .await
        .expect("create owner");
    let uid = owner.metadata.uid.clone().expect("uid");
    cms.create(
        &pp,
        &obj(
            json!({"metadata": {"name": "dependent", "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
            ]}}),
        ),
    )
    .await
    .expect("create dependent");
    cms.delete("owner", &DeleteParams::background())
        .await
        .expect("delete owner");
    deploys
        .delete("web", &DeleteParams::background())
        .await
        .expect("delete deployment");
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), NS);
    wait_for(
        "garbage collection of the dependent ConfigMap, ReplicaSet and pods",
        long,
        || async {
            let cm_gone = cms.get_opt("dependent").await.ok()?.is_none();
            let rs_gone = rss
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty();
            let pods_gone = pods.list(&web).await.ok()?.items.is_empty();
            (cm_gone && rs_gone && pods_gone).then_some(())
        },
    )
    .await;

    // `down` stops every component and the remaining pod process, and frees every port.
    let pids = plane.pids();
    let ports = plane.ports();
    assert!(
        pids.len() >= 7,
        "expected 6 components and a pod process, found {pids:?}"
    );
    assert_eq!(ports.len(), 6, "ports.env: {ports:?}");
    let t_down = Instant::now();
    plane.run("down");
    eprintln!("cluster down in {:?}", t_down.elapsed());
    let alive: Vec<_> = pids.iter().filter(|(_, p)| pid_alive(*p)).collect();
    assert!(alive.is_empty(), "processes left after down: {alive:?}");
    let open: Vec<_> = ports.iter().filter(|p| port_listening(**p)).collect();
    assert!(
        open.is_empty(),
        "ports still listening after down: {open:?}"
    );
    assert!(
        http_get(&ips[1], 8080).await.is_none(),
        "pod process still answers after down"
    );
    let status = plane.script("status");
    assert!(
        !status.status.success(),
        "status reports a running plane after down"
    );
}
