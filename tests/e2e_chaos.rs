//! Chaos on the local control plane (e2e/cluster.sh), with the harness of `tests/common`:
//! - the launcher (e2e/pods) is the kubelet of process-backed pods: Ready comes from the readiness
//!   probe (False while the process loads, False again when it is frozen), an exited process is
//!   restarted, a rotated Secret reaches the process's files, a deleted pod is finalised, and pod
//!   IPs come from the launcher's own range;
//! - a spec rollout of 4 process-backed workers (maxUnavailable 1) that changes the metrics port
//!   (so every scrape of an old worker fails) while the kube-apiserver is paused for 20 s, one
//!   worker process is killed and another frozen: watched every 100 ms by asking each worker's
//!   `/readyz` directly, the operator never takes more than maxUnavailable workers down besides
//!   the ones the test broke itself, the rollout completes in bounded time and the MoEDeployment
//!   says what it waits for meanwhile.
//!
//! The tests take the plane one at a time (a lock): on 2 cores, two planes with CPU workers at
//! once would make their timing a test of the machine.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::operator::{condition, deployment, wait_every, wait_for, OperatorPlane};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use moe_operator::api::MoEDeployment;
use serde_json::json;

mod common;

static ONE_PLANE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SPEC_HASH: &str = "moe.craft.dev/spec-hash";
const RANK: &str = "moe.craft.dev/node-rank";

/// `kill -SIG pid`; false when the process is gone.
fn signal(pid: u32, sig: libc::c_int) -> bool {
    // SAFETY: kill(2) takes no pointers.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

/// Sends SIGCONT to a process the test froze when it goes out of scope, so that a failing test
/// never leaves the API server (or a worker) stopped behind it.
struct Frozen(u32);

impl Frozen {
    fn stop(pid: u32) -> Frozen {
        assert!(signal(pid, libc::SIGSTOP), "SIGSTOP {pid}: no such process");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: not a pid: {e}", path.display()))
}

fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The process-backed pod's pid file (written by the launcher at each start).
fn pid_file(state: &Path, ns: &str, pod: &str) -> PathBuf {
    state.join("pods").join(format!("{ns}_{pod}")).join("pid")
}

/// GET `path` on ip:port with a 1 s deadline: (status, body).
async fn get(ip: &str, port: u16, path: &str) -> Option<(u16, String)> {
    let r = moe_operator::worker::wire::WorkerClient::new()
        .get(ip, port, path, Duration::from_secs(1))
        .await
        .ok()?;
    Some((r.status, String::from_utf8_lossy(&r.body).to_string()))
}

fn pod_ready(p: &Pod) -> Option<bool> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status == "True")
}

fn restart_count(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .map(|c| c.restart_count)
        .unwrap_or(0)
}

fn pod_ip(p: &Pod) -> Option<String> {
    p.status.as_ref()?.pod_ip.clone()
}

/// A plane without the chart, torn down on drop (state kept on failure).
struct BarePlane {
    state: PathBuf,
    tmp: Option<tempfile::TempDir>,
}

impl Drop for BarePlane {
    fn drop(&mut self) {
        let _ = common::cluster_script(&self.state, 1, "down");
        if std::thread::panicking() {
            if let Some(t) = self.tmp.take() {
                eprintln!("e2e state kept in {}", t.keep().display());
            }
        }
    }
}

/// A process-backed pod whose process sleeps `delay` seconds (loading), then answers `/readyz`
/// and `/token` (the current content of its mounted Secret) on its pod IP, port 8080.
fn prober_pod(name: &str, delay: u32) -> Pod {
    const SCRIPT: &str = r#"
import http.server, os, sys, time
time.sleep(float(sys.argv[2]))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/readyz":
            body = b"ok"
        elif self.path == "/token":
            body = open(sys.argv[1], "rb").read()
        else:
            self.send_response(404); self.end_headers(); return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print("serving on", os.environ["POD_IP"], flush=True)
http.server.HTTPServer((os.environ["POD_IP"], 8080), H).serve_forever()
"#;
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"moe.craft.dev/process-backed": "true"}},
        "spec": {
            "nodeSelector": {"type": "kwok"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 3,
            "volumes": [{"name": "tok", "secret": {"secretName": "tok"}}],
            "containers": [{
                "name": "prober", "image": "python:fake",
                "command": ["python3", "-c", SCRIPT],
                "args": ["/var/run/tok/token", delay.to_string()],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"},
                                   "periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2},
                "volumeMounts": [{"name": "tok", "mountPath": "/var/run/tok", "readOnly": true}]
            }]
        }
    }))
    .expect("prober pod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launcher_is_the_kubelet_of_process_backed_pods() {
    let _one = ONE_PLANE.lock().await;
    let tmp = tempfile::Builder::new()
        .prefix("moe-e2e-kubelet-")
        .tempdir()
        .expect("temp state dir");
    let plane = BarePlane {
        state: tmp.path().to_path_buf(),
        tmp: Some(tmp),
    };
    let t_up = Instant::now();
    common::run_cluster(&plane.state, 1, "up");
    eprintln!("plane up in {:?}", t_up.elapsed());
    let octet = std::fs::read_to_string(plane.state.join("ports.env"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("POD_OCTET=").map(String::from))
        .expect("POD_OCTET in ports.env");
    let admin = common::client_from(&plane.state.join("kubeconfig")).await;
    let ns = "default";
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let pp = PostParams::default();
    let long = Duration::from_secs(60);
    let secret = |v: &str| -> Secret {
        serde_json::from_value(json!({"metadata": {"name": "tok"}, "stringData": {"token": v}}))
            .unwrap()
    };
    secrets
        .create(&pp, &secret("first"))
        .await
        .expect("Secret tok");
    pods.create(&pp, &prober_pod("prober", 4))
        .await
        .expect("create prober");

    // Ready is False while the process loads; the API never says Ready while the process does
    // not answer (kwok's pod-ready stage said so at once).
    let t0 = Instant::now();
    let (not_ready_seen, lies) = (Cell::new(0), RefCell::new(Vec::new()));
    let ip = wait_every(
        "the prober Ready and answering",
        long,
        Duration::from_millis(100),
        || async {
            let p = pods.get("prober").await.map_err(|e| e.to_string())?;
            let Some(ip) = pod_ip(&p) else {
                return Err("no pod IP yet".into());
            };
            // Read after the pod: a Ready pod's process answered the launcher's probe before.
            let answers = get(&ip, 8080, "/readyz").await.is_some_and(|r| r.0 == 200);
            match (pod_ready(&p), answers) {
                (Some(true), true) => Ok(ip),
                (Some(true), false) => {
                    lies.borrow_mut().push(t0.elapsed());
                    Err("Ready but not answering".into())
                }
                (r, a) => {
                    if r == Some(false) && !a {
                        not_ready_seen.set(not_ready_seen.get() + 1);
                    }
                    Err(format!("Ready {r:?}, answering {a}"))
                }
            }
        },
    )
    .await;
    let (not_ready_seen, lies) = (not_ready_seen.get(), lies.into_inner());
    eprintln!(
        "prober Ready after {:?} ({not_ready_seen} samples not ready while loading)",
        t0.elapsed()
    );
    assert!(
        lies.is_empty(),
        "pod Ready while its process did not answer, at {lies:?}"
    );
    assert!(
        not_ready_seen >= 10,
        "the 4 s load was not seen as not Ready ({not_ready_seen} samples)"
    );
    assert!(
        ip.starts_with(&format!("127.{octet}.254.")),
        "pod IP {ip} is not from the launcher's range 127.{octet}.254.0/24"
    );
    let p = pods.get("prober").await.unwrap();
    let st = p.status.clone().unwrap();
    assert_eq!(st.phase.as_deref(), Some("Running"));
    assert_eq!(st.host_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(
        st.pod_ips.as_ref().map(|v| v[0].ip.clone()),
        Some(ip.clone())
    );
    let conds: BTreeMap<String, String> = st
        .conditions
        .iter()
        .flatten()
        .map(|c| (c.type_.clone(), c.status.clone()))
        .collect();
    for c in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
        assert_eq!(conds.get(c).map(String::as_str), Some("True"), "{conds:?}");
    }

    // Frozen: not Ready after failureThreshold (2) periods of 1 s with a 1 s timeout; Ready again
    // once it runs.
    let pid = read_pid(&pid_file(&plane.state, ns, "prober"));
    let ready_is = |want: bool| {
        let pods = pods.clone();
        move || {
            let pods = pods.clone();
            async move {
                let p = pods.get("prober").await.map_err(|e| e.to_string())?;
                if pod_ready(&p) == Some(want) {
                    Ok(p)
                } else {
                    Err(format!("Ready {:?}", pod_ready(&p)))
                }
            }
        }
    };
    let frozen = Frozen::stop(pid);
    let t = Instant::now();
    wait_every(
        "Ready False while frozen",
        Duration::from_secs(10),
        Duration::from_millis(100),
        ready_is(false),
    )
    .await;
    let to_unready = t.elapsed();
    drop(frozen);
    let t = Instant::now();
    wait_every(
        "Ready True after SIGCONT",
        Duration::from_secs(10),
        Duration::from_millis(100),
        ready_is(true),
    )
    .await;
    eprintln!(
        "frozen: not Ready after {to_unready:?}; Ready again {:?} after SIGCONT",
        t.elapsed()
    );
    assert!(
        to_unready <= Duration::from_secs(6),
        "a frozen process stayed Ready for {to_unready:?}"
    );

    // Killed: restarted (back-off 1 s, 4 s load), restartCount 1, Ready False until it answers.
    assert!(signal(pid, libc::SIGKILL));
    let t = Instant::now();
    wait_every(
        "Ready False after SIGKILL",
        Duration::from_secs(5),
        Duration::from_millis(100),
        ready_is(false),
    )
    .await;
    let p = wait_for("the prober restarted and Ready", long, || async {
        let p = ready_is(true)().await?;
        if restart_count(&p) == 1 {
            Ok(p)
        } else {
            Err(format!("restartCount {}", restart_count(&p)))
        }
    })
    .await;
    eprintln!("killed: Ready again after {:?}", t.elapsed());
    let new_pid = read_pid(&pid_file(&plane.state, ns, "prober"));
    assert_ne!(new_pid, pid);
    assert!(pid_alive(new_pid));
    assert_eq!(
        pod_ip(&p).as_deref(),
        Some(ip.as_str()),
        "the restart kept the pod IP"
    );

    // A rotated Secret reaches the running process's mounted file.
    assert_eq!(
        get(&ip, 8080, "/token").await.map(|r| r.1).as_deref(),
        Some("first")
    );
    secrets
        .replace("tok", &pp, &{
            let mut s = secrets.get("tok").await.unwrap();
            s.data = None;
            s.string_data = Some([("token".to_string(), "second".to_string())].into());
            s
        })
        .await
        .expect("rotate Secret tok");
    let t = Instant::now();
    wait_for(
        "the rotated token in the process's file",
        Duration::from_secs(20),
        || async {
            match get(&ip, 8080, "/token").await {
                Some((200, b)) if b == "second" => Ok(()),
                r => Err(format!("{r:?}")),
            }
        },
    )
    .await;
    eprintln!("rotated Secret reached the process after {:?}", t.elapsed());

    // restartPolicy Never: a process that exits 3 leaves the pod Failed; its IP is its own.
    let mut once: Pod = prober_pod("once", 0);
    {
        let spec = once.spec.as_mut().unwrap();
        spec.restart_policy = Some("Never".into());
        let c = &mut spec.containers[0];
        c.command = Some(vec!["sh".into(), "-c".into(), "exit 3".into()]);
        c.args = None;
    }
    pods.create(&pp, &once).await.expect("create once");
    let failed = wait_for("pod once Failed", long, || async {
        let p = pods.get("once").await.map_err(|e| e.to_string())?;
        match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Failed") => Ok(p),
            ph => Err(format!("phase {ph:?}")),
        }
    })
    .await;
    let cs = &failed
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    let exit = cs
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .map(|t| t.exit_code);
    assert_eq!((exit, cs.restart_count), (Some(3), 0), "{cs:?}");
    let once_ip = pod_ip(&failed).expect("once has an IP");
    assert_ne!(once_ip, ip, "two live pods share an IP");

    // Deletion is finalised: the process stops and the pod leaves the API (kwok did this before).
    let pid = read_pid(&pid_file(&plane.state, ns, "prober"));
    let t = Instant::now();
    pods.delete("prober", &DeleteParams::default())
        .await
        .expect("delete prober");
    pods.delete("once", &DeleteParams::default())
        .await
        .expect("delete once");
    wait_for(
        "the deleted pods gone from the API",
        Duration::from_secs(20),
        || async {
            let left: Vec<String> = pods
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .iter()
                .map(|p| p.metadata.name.clone().unwrap_or_default())
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;
    eprintln!("deleted pods gone after {:?}", t.elapsed());
    assert!(
        !pid_alive(pid),
        "the deleted pod's process {pid} still runs"
    );
}

/// The metrics port a worker pod's container declares (the operator's readiness probe port).
fn metrics_port(p: &Pod) -> Option<u16> {
    p.spec
        .as_ref()?
        .containers
        .first()?
        .ports
        .as_ref()?
        .iter()
        .find(|cp| cp.name.as_deref() == Some("metrics"))
        .and_then(|cp| u16::try_from(cp.container_port).ok())
}

fn rank_of(p: &Pod) -> Option<u32> {
    p.metadata.labels.as_ref()?.get(RANK)?.parse().ok()
}

/// `name/uid`: a pod, told apart from its successor under the same name.
fn pod_id(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.name.as_deref().unwrap_or_default(),
        p.metadata.uid.as_deref().unwrap_or_default()
    )
}

fn annotation(p: &Pod, k: &str) -> Option<String> {
    p.metadata.annotations.as_ref()?.get(k).cloned()
}

/// What one 100 ms look shows.
#[derive(Debug, Clone)]
struct Sample {
    at_ms: u128,
    /// Ranks that no live (not terminating) pod serves: its `/readyz` does not answer 200.
    down: BTreeSet<u32>,
    /// Of those, the ranks the test itself broke (killed or frozen, not yet back).
    ours: BTreeSet<u32>,
    /// Whether the pod list came from the API (false: the API was paused, the last list was used).
    fresh: bool,
}

/// The test's own disruptions: rank -> when it was broken. A rank is excused from then until a
/// look that began after that moment sees it serve again.
type Broken = Arc<Mutex<BTreeMap<u32, Instant>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_under_chaos_keeps_max_unavailable() {
    let _one = ONE_PLANE.lock().await;
    const NODES: u32 = 4;
    let t_test = Instant::now();
    let mut plane = OperatorPlane::up("moe-e2e-chaos-", NODES as usize, "chaos").await;
    let ns = plane.ns.clone();
    plane.start_operator("op-a");
    let ckpt = plane.checkpoint();
    let mds: Api<MoEDeployment> = Api::namespaced(plane.admin.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(plane.admin.clone(), &ns);
    let ssa = PatchParams::apply("e2e").force();
    let mut spec = deployment("chaos", &ns, &ckpt, NODES, 1, true);
    spec["spec"]["rollout"] = json!({"strategy": "InPlace", "maxUnavailable": 1});
    mds.patch("chaos", &ssa, &Patch::Apply(&spec))
        .await
        .expect("apply MoEDeployment chaos");
    let ready = |gen_at_least: i64| {
        let mds = mds.clone();
        move || {
            let mds = mds.clone();
            async move {
                let md = mds.get("chaos").await.map_err(|e| e.to_string())?;
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
    wait_for(
        "chaos Ready on 4 workers",
        Duration::from_secs(90),
        ready(1),
    )
    .await;
    let old_hashes: BTreeSet<String> = plane
        .worker_pods("chaos")
        .await
        .unwrap()
        .iter()
        .filter_map(|p| annotation(p, SPEC_HASH))
        .collect();
    eprintln!("[{:?}] 4 workers Ready", t_test.elapsed());

    // The watcher: every 100 ms, each live worker's /readyz asked directly; the pod list from the
    // API when it answers within 1 s, else the last one (the API server is paused for a while).
    let broken: Broken = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let deleted: Arc<Mutex<BTreeMap<String, u128>>> = Arc::default();
    // Set once the monitor has listed every worker: the rollout starts only then, so that no
    // replacement can happen before the monitor knows the old pods.
    let primed = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (stop, pods_api, broken, deleted, primed) = (
            stop.clone(),
            pods_api.clone(),
            broken.clone(),
            deleted.clone(),
            primed.clone(),
        );
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut samples: Vec<Sample> = Vec::new();
            let mut last: Vec<Pod> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let began = Instant::now();
                let listed = tokio::time::timeout(
                    Duration::from_secs(1),
                    pods_api.list(&ListParams::default().labels("moe.craft.dev/deployment=chaos")),
                )
                .await;
                let fresh = matches!(listed, Ok(Ok(_)));
                if let Ok(Ok(l)) = listed {
                    // Deleted: terminating, or gone from a fresh list (the launcher finalises a
                    // deletion within moments, often between two looks).
                    let now_ids: BTreeSet<String> = l.items.iter().map(pod_id).collect();
                    let mut d = deleted.lock().unwrap();
                    let at = t0.elapsed().as_millis();
                    for p in &last {
                        if !now_ids.contains(&pod_id(p)) {
                            d.entry(pod_id(p)).or_insert(at);
                        }
                    }
                    for p in &l.items {
                        if p.metadata.deletion_timestamp.is_some() {
                            d.entry(pod_id(p)).or_insert(at);
                        }
                    }
                    last = l.items;
                    if last.len() >= NODES as usize {
                        primed.store(true, Ordering::Relaxed);
                    }
                }
                let checks = last
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter_map(|p| {
                        let (rank, ip, port) = (rank_of(p)?, pod_ip(p)?, metrics_port(p)?);
                        Some(async move {
                            (
                                rank,
                                get(&ip, port, "/readyz").await.is_some_and(|r| r.0 == 200),
                            )
                        })
                    });
                let serving: BTreeSet<u32> = futures::future::join_all(checks)
                    .await
                    .into_iter()
                    .filter_map(|(r, ok)| ok.then_some(r))
                    .collect();
                let down: BTreeSet<u32> = (0..NODES).filter(|r| !serving.contains(r)).collect();
                let ours = {
                    let mut b = broken.lock().unwrap();
                    // Back once a look that began after the break sees it serve.
                    b.retain(|r, at| !(serving.contains(r) && began > *at));
                    b.keys().copied().filter(|r| down.contains(r)).collect()
                };
                samples.push(Sample {
                    at_ms: t0.elapsed().as_millis(),
                    down,
                    ours,
                    fresh,
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            samples
        })
    };

    // What the MoEDeployment says while it rolls out.
    let said: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let status_watch = {
        let (stop, mds, said) = (stop.clone(), mds.clone(), said.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Ok(md)) =
                    tokio::time::timeout(Duration::from_secs(1), mds.get("chaos")).await
                {
                    if let Some(c) = condition(&md, "Progressing") {
                        let mut s = said.lock().unwrap();
                        if s.last() != Some(&c) {
                            s.push(c);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    // The rollout: a new metrics port. Every pod spec changes (every pod is replaced), and the
    // operator's scrapes of the old pods on the new port all fail: the original defect deleted
    // every worker within 94 ms.
    let t_primed = Instant::now();
    while !primed.load(Ordering::Relaxed) {
        assert!(
            t_primed.elapsed() < Duration::from_secs(30),
            "the monitor never listed the workers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t_roll = Instant::now();
    spec["spec"]["worker"]["ports"] = json!({"metrics": 9411});
    mds.patch("chaos", &ssa, &Patch::Apply(&spec))
        .await
        .expect("change the metrics port");
    let gen = mds.get("chaos").await.unwrap().metadata.generation.unwrap();

    // Midway (a rank on the new spec), two old workers break and the API server stops for 20 s.
    let old_hashes = &old_hashes;
    let (midway, old_live) = wait_every(
        "the rollout midway with two old workers left",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let pods = plane.worker_pods("chaos").await?;
            let live = |old: bool| {
                pods.iter()
                    .filter(move |p| {
                        p.metadata.deletion_timestamp.is_none()
                            && annotation(p, SPEC_HASH).is_some_and(|h| old_hashes.contains(&h))
                                == old
                    })
                    .filter_map(|p| Some((rank_of(p)?, p.metadata.name.clone()?)))
                    .filter(|(_, name)| plane.has_process(name))
                    .collect::<Vec<_>>()
            };
            let (new, old) = (live(false), live(true));
            if !new.is_empty() && old.len() >= 2 {
                Ok((
                    format!("{} on the new spec, {} old", new.len(), old.len()),
                    old,
                ))
            } else {
                Err(format!("new {new:?}, old {old:?}"))
            }
        },
    )
    .await;
    let (sleeper, victim) = (old_live[0].clone(), old_live[1].clone());

    // Frozen: its probe fails, but the API server is about to stop too, so its pod stays Ready
    // in the API until the launcher can write it.
    let sleeper_pid = read_pid(&pid_file(&plane.state, &ns, &sleeper.1));
    broken.lock().unwrap().insert(sleeper.0, Instant::now());
    let frozen = Frozen::stop(sleeper_pid);
    let apiserver = read_pid(&plane.state.join("pids/kube-apiserver.pid"));
    let paused = Frozen::stop(apiserver);
    eprintln!(
        "[{:?}] midway ({midway}): froze {} (rank {}), paused the kube-apiserver for 20 s",
        t_test.elapsed(),
        sleeper.1,
        sleeper.0
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Killed while the API is away: the launcher restarts it once it can read its volumes.
    let victim_pid = read_pid(&pid_file(&plane.state, &ns, &victim.1));
    broken.lock().unwrap().insert(victim.0, Instant::now());
    assert!(signal(victim_pid, libc::SIGKILL), "SIGKILL {victim_pid}");
    eprintln!(
        "[{:?}] killed {} (rank {})",
        t_test.elapsed(),
        victim.1,
        victim.0
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    drop(paused);
    eprintln!("[{:?}] kube-apiserver resumed", t_test.elapsed());
    // A leader that cannot renew its Lease exits (a 15 s Lease, a 20 s pause); its Deployment
    // would start it again.
    let mut restarts = 0;
    if plane.restart_if_exited("op-a") {
        restarts += 1;
        eprintln!(
            "[{:?}] the operator had exited (Lease lost): restarted",
            t_test.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The operator may have replaced it meanwhile (a frozen worker is not Ready; the launcher
    // sends SIGCONT with SIGTERM). Excused until it serves again, from the moment it runs again.
    drop(frozen);
    broken.lock().unwrap().insert(sleeper.0, Instant::now());
    eprintln!("[{:?}] thawed {}", t_test.elapsed(), sleeper.1);

    let t_wait = Instant::now();
    let check = ready(gen);
    loop {
        match check().await {
            Ok(()) => break,
            Err(last) => assert!(
                t_wait.elapsed() < Duration::from_secs(120),
                "the rollout did not complete within 120 s of the chaos; last seen: {last}"
            ),
        }
        if plane.restart_if_exited("op-a") {
            restarts += 1;
            eprintln!(
                "[{:?}] the operator had exited: restarted",
                t_test.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let roll_time = t_roll.elapsed();
    // A last few looks at the settled deployment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = monitor.await.expect("monitor task");
    status_watch.await.expect("status task");
    let said = said.lock().unwrap().clone();
    let deleted = deleted.lock().unwrap().clone();

    let pods = plane.worker_pods("chaos").await.unwrap();
    assert_eq!(pods.len(), NODES as usize, "{pods:?}");
    for p in &pods {
        assert_eq!(
            metrics_port(p),
            Some(9411),
            "pod {:?} on the old port",
            p.metadata.name
        );
        assert_eq!(
            pod_ready(p),
            Some(true),
            "pod {:?} not Ready",
            p.metadata.name
        );
    }
    let max_down = samples.iter().map(|s| s.down.len()).max().unwrap_or(0);
    let max_theirs = samples
        .iter()
        .map(|s| s.down.len() - s.ours.len())
        .max()
        .unwrap_or(0);
    let stale = samples.iter().filter(|s| !s.fresh).count();
    eprintln!(
        "rollout under chaos took {roll_time:?}; {} samples ({stale} while the API was away), max ranks down {max_down}, \
         max down by the operator {max_theirs}; the operator deleted {} pods: {deleted:?}",
        samples.len(),
        deleted.len()
    );
    for (s, r, m) in &said {
        eprintln!("  Progressing {s} {r}: {m}");
    }
    eprintln!(
        "operator restarts: {restarts}; test ran {:?}",
        t_test.elapsed()
    );
    let bad: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.down.len() - s.ours.len() > 1)
        .collect();
    assert!(
        bad.is_empty(),
        "the operator took more than maxUnavailable (1) workers down: {bad:?}"
    );
    // Looked at often enough to see what happened: a look waits at most 1 s for the API and 1 s
    // for the workers, so 3 s between two looks is the usual worst case; 5 s leaves room for a
    // loaded 2-core CI machine without letting a blind watcher pass.
    let max_gap = samples
        .windows(2)
        .map(|w| w[1].at_ms - w[0].at_ms)
        .max()
        .unwrap_or(u128::MAX);
    assert!(
        samples.len() >= 30 && max_gap <= 5000,
        "{} samples, largest gap {max_gap} ms",
        samples.len()
    );
    assert!(
        stale >= 5,
        "the watcher did not see the API pause ({stale} stale samples)"
    );
    // It did replace pods (a watcher that sees nothing proves nothing), all 4 of the old spec.
    assert!(
        deleted.len() >= NODES as usize,
        "the operator deleted only {deleted:?}"
    );
    assert!(
        samples.iter().any(|s| s.down.len() > s.ours.len()),
        "no sample saw a rank being replaced"
    );
    // While it waited, it said so: Progressing with the count on the plan and what it waits for.
    let waiting: Vec<&(String, String, String)> = said
        .iter()
        .filter(|(s, _, m)| {
            s == "True" && m.contains("workers ready on plan") && m.contains("waiting for: rank")
        })
        .collect();
    assert!(
        !waiting.is_empty(),
        "Progressing never said what the rollout waits for: {said:?}"
    );
    let last = said.last().expect("Progressing seen");
    assert_eq!(
        (last.0.as_str(), last.1.as_str()),
        ("False", "RolloutComplete"),
        "{said:?}"
    );
    assert!(
        roll_time < Duration::from_secs(150),
        "the rollout took {roll_time:?}"
    );
}
