//! The operator's end-to-end harness: a local control plane with the chart installed (CRD, RBAC;
//! its in-cluster Deployment scaled to 0, or running as process-backed pods for the upgrade test),
//! operator processes run locally under the chart ServiceAccount's token (so the chart's RBAC is
//! what they get), a synthetic checkpoint, and the polling helpers the operator tests share.
#![allow(dead_code)] // each test binary uses its own part of the harness

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::ListParams;
use kube::{Api, Client};
use moe_operator::api::MoEDeployment;

pub const OP_NS: &str = "moe-system";
pub const RELEASE: &str = "moe-operator";

/// The control-plane binaries of `e2e/build.sh` (helm, kubectl, ...); fails, naming the fix, when
/// they are not built.
pub fn e2e_bin() -> PathBuf {
    let out = Command::new(super::repo().join("e2e/build.sh"))
        .arg("--bin-dir")
        .output()
        .expect("running e2e/build.sh --bin-dir");
    assert!(
        out.status.success(),
        "the local control plane is not built: run e2e/build.sh first: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    for b in ["helm", "kubectl"] {
        assert!(
            bin.join(b).exists(),
            "{b} missing in {}: rerun e2e/build.sh",
            bin.display()
        );
    }
    bin
}

/// Runs `bin/name args` with `kubeconfig`; its stdout, or a failure with its output.
pub fn tool(bin: &Path, name: &str, args: &[&str], kubeconfig: &Path) -> String {
    let out = Command::new(bin.join(name))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Polls `check` every `every` until it returns Ok, or fails naming `what` and the last state
/// after `timeout`.
pub async fn wait_every<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; last seen: {last}"
            ),
        }
        tokio::time::sleep(every).await;
    }
}

/// [`wait_every`] at 500 ms.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    wait_every(what, timeout, Duration::from_millis(500), check).await
}

/// A TCP port on 127.0.0.1 that was free when asked and that this process has not handed out
/// before: the kernel may give a just-released port again, so two calls could otherwise collide.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("binding an ephemeral port")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// (status, reason, message) of a condition.
pub fn condition(md: &MoEDeployment, kind: &str) -> Option<(String, String, String)> {
    md.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// A value of the operator's own `/metrics` on 127.0.0.1:`port` (`name` with its labels, as
/// rendered), or None when it does not answer or lacks the series.
pub async fn operator_metric(port: u16, name: &str) -> Option<f64> {
    let r = moe_operator::worker::wire::HttpClient::new()
        .get(
            &format!("http://127.0.0.1:{port}/metrics"),
            Duration::from_secs(2),
            64 << 20,
        )
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&r.body).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// One operator process.
pub struct Operator {
    pub identity: String,
    pub metrics_port: u16,
    child: Child,
}

/// A plane with the chart installed, torn down on drop with every operator killed. On a failure
/// the state dir (operator-*.log, pods/*/log, logs/) is kept and its path printed.
pub struct OperatorPlane {
    pub state: PathBuf,
    pub nodes: usize,
    pub bin: PathBuf,
    pub admin_kc: PathBuf,
    /// Kubeconfig with the chart ServiceAccount's token.
    pub sa_kc: PathBuf,
    pub admin: Client,
    /// The namespace the tests' MoEDeployments live in.
    pub ns: String,
    operators: Vec<Operator>,
    tmp: Option<tempfile::TempDir>,
}

impl OperatorPlane {
    /// Brings up a plane of `nodes` fake GPU nodes, installs the chart and creates `ns`.
    pub async fn up(prefix: &str, nodes: usize, ns: &str) -> Self {
        Self::up_with(prefix, nodes, ns, None, None).await
    }

    /// [`OperatorPlane::up`] with the chart installed from `chart` instead of the repository's
    /// (e.g. a copy whose `crds/` holds a previous CRD, as an earlier release installed it).
    pub async fn up_from_chart(prefix: &str, nodes: usize, ns: &str, chart: &Path) -> Self {
        Self::up_with(prefix, nodes, ns, None, Some(chart)).await
    }

    /// [`OperatorPlane::up`] with the chart's own Deployment running (not scaled to 0), installed
    /// with the values file `chart_values` written under the state dir by `values(state)`: its
    /// pods are process-backed when the values give them the opt-in label, the chart's image
    /// runs the `moe-operator` just built (e2e/cluster.sh maps it).
    pub async fn up_running_chart(
        prefix: &str,
        nodes: usize,
        ns: &str,
        values: impl FnOnce(&Path) -> String,
    ) -> Self {
        Self::up_with(prefix, nodes, ns, Some(Box::new(values)), None).await
    }

    #[allow(clippy::type_complexity)]
    async fn up_with(
        prefix: &str,
        nodes: usize,
        ns: &str,
        chart_values: Option<Box<dyn FnOnce(&Path) -> String + '_>>,
        chart: Option<&Path>,
    ) -> Self {
        let bin = e2e_bin();
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("temp state dir");
        let state = tmp.path().to_path_buf();
        // A failed `up` stops what it started (e2e/cluster.sh); from the struct on, Drop tears down.
        super::run_cluster(&state, nodes, "up");
        let admin = super::client_from(&state.join("kubeconfig")).await;
        let plane = OperatorPlane {
            admin_kc: state.join("kubeconfig"),
            sa_kc: state.join("operator.kubeconfig"),
            state,
            nodes,
            bin,
            admin,
            ns: ns.to_string(),
            operators: Vec::new(),
            tmp: Some(tmp),
        };
        let (bin, kc) = (plane.bin.clone(), plane.admin_kc.clone());
        let chart = chart
            .map(Path::to_path_buf)
            .unwrap_or_else(|| super::repo().join("charts/moe-operator"));
        let values_file = plane.state.join("chart-values.yaml");
        let running = chart_values.is_some();
        if let Some(values) = chart_values {
            std::fs::write(&values_file, values(&plane.state)).expect("writing chart values");
        } else {
            std::fs::write(&values_file, "{}\n").expect("writing chart values");
        }
        tool(
            &bin,
            "helm",
            &[
                "install",
                RELEASE,
                chart.to_str().unwrap(),
                "--namespace",
                OP_NS,
                "--create-namespace",
                "--wait=false",
                "-f",
                values_file.to_str().unwrap(),
            ],
            &kc,
        );
        if !running {
            // The chart's schema wants at least one replica; the operator runs as local processes
            // instead.
            tool(
                &bin,
                "kubectl",
                &[
                    "-n",
                    OP_NS,
                    "scale",
                    &format!("deployment/{RELEASE}"),
                    "--replicas=0",
                ],
                &kc,
            );
        }
        tool(&bin, "kubectl", &["create", "namespace", ns], &kc);
        tool(
            &bin,
            "kubectl",
            &[
                "wait",
                "--for=condition=Established",
                "crd/moedeployments.moe.craft.dev",
                "--timeout=60s",
            ],
            &kc,
        );
        let token = super::service_account_token(&plane.admin, OP_NS, RELEASE, 3600).await;
        super::write_token_kubeconfig(&plane.admin_kc, &token, &plane.sa_kc);
        plane
    }

    /// Starts an operator process with leader election under `identity` (its Lease identity and
    /// event instance), logging JSON to `operator-<identity>.log` (appended across restarts).
    /// Returns its `/metrics` port.
    pub fn start_operator(&mut self, identity: &str) -> u16 {
        self.start_operator_with(identity, &[])
    }

    /// [`Self::start_operator`] with more environment (e.g. pod-policy variables).
    pub fn start_operator_with(&mut self, identity: &str, env: &[(&str, &str)]) -> u16 {
        let metrics_port = free_port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.join(format!("operator-{identity}.log")))
            .expect("operator log");
        let child = Command::new(super::own_bin(env!("CARGO_BIN_EXE_moe-operator")))
            .args([
                "run",
                "--metrics-listen",
                &format!("127.0.0.1:{metrics_port}"),
                "--health-listen",
                "127.0.0.1:0",
                "--leader-election-namespace",
                OP_NS,
                "--log-format",
                "json",
            ])
            .env("KUBECONFIG", &self.sa_kc)
            // The pod policy: the tests' checkpoints are hostPaths under the plane's state dir.
            .env("MOE_OPERATOR_ALLOW_HOST_PATH_PREFIXES", &self.state)
            .env("RUST_LOG", "info,moe_operator=debug,kube=warn")
            .env("POD_NAME", identity)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting moe-operator");
        self.operators.push(Operator {
            identity: identity.to_string(),
            metrics_port,
            child,
        });
        metrics_port
    }

    /// SIGKILL the operator `identity` (no graceful shutdown, no Lease release) and reap it.
    pub fn kill_operator(&mut self, identity: &str) {
        if let Some(i) = self.operators.iter().position(|o| o.identity == identity) {
            let mut o = self.operators.remove(i);
            let _ = o.child.kill();
            let _ = o.child.wait();
        }
    }

    /// Starts the operator `identity` again if its process has exited, as its Deployment would
    /// restart it (it exits when it loses the leader Lease); true when it did.
    pub fn restart_if_exited(&mut self, identity: &str) -> bool {
        let Some(i) = self.operators.iter().position(|o| o.identity == identity) else {
            return false;
        };
        if self.operators[i].child.try_wait().ok().flatten().is_none() {
            return false;
        }
        let mut o = self.operators.remove(i);
        let _ = o.child.wait();
        self.start_operator(identity);
        true
    }

    /// Whether the operator `identity` still runs (it never exits on its own while healthy).
    pub fn operator_running(&mut self, identity: &str) -> bool {
        self.operators
            .iter_mut()
            .find(|o| o.identity == identity)
            .is_some_and(|o| o.child.try_wait().ok().flatten().is_none())
    }

    /// The process id of the operator `identity`.
    pub fn operator_pid(&self, identity: &str) -> Option<u32> {
        self.operators
            .iter()
            .find(|o| o.identity == identity)
            .map(|o| o.child.id())
    }

    /// The synthetic checkpoint of [`tiny_checkpoint`] under the state dir.
    pub fn checkpoint(&self) -> PathBuf {
        tiny_checkpoint(&self.state)
    }

    /// The worker pods of deployment `name` (terminating ones included).
    pub async fn worker_pods(&self, name: &str) -> Result<Vec<Pod>, String> {
        Api::<Pod>::namespaced(self.admin.clone(), &self.ns)
            .list(&ListParams::default().labels(&format!("moe.craft.dev/deployment={name}")))
            .await
            .map(|l| l.items)
            .map_err(|e| e.to_string())
    }

    /// Whether the launcher runs a process for pod `name` (process-backed pods).
    pub fn has_process(&self, pod: &str) -> bool {
        self.state
            .join("pods")
            .join(format!("{}_{pod}", self.ns))
            .join("pid")
            .exists()
    }
}

/// The user the operator acts as: the chart ServiceAccount's token, in processes and in pods.
pub fn operator_user() -> String {
    format!("system:serviceaccount:{OP_NS}:{RELEASE}")
}

impl Drop for OperatorPlane {
    fn drop(&mut self) {
        for mut o in self.operators.drain(..) {
            let _ = o.child.kill();
            let _ = o.child.wait();
        }
        // Least privilege, from the API server's audit log: what the operator did here was granted
        // and is in the usage fixture tests/rbac.rs holds the chart's RBAC to.
        let problems = if std::thread::panicking() {
            Vec::new()
        } else {
            super::audit::check_plane(&self.state.join("logs/audit.log"), &operator_user())
        };
        let _ = super::cluster_script(&self.state, self.nodes, "down");
        if !problems.is_empty() {
            let kept = self.tmp.take().map(|t| t.keep());
            panic!(
                "the operator's API use (audit log{}):\n{}",
                kept.map(|k| format!(" in {}/logs", k.display()))
                    .unwrap_or_default(),
                problems.join("\n")
            );
        }
        if std::thread::panicking() {
            if let Some(t) = self.tmp.take() {
                let kept = t.keep();
                eprintln!(
                    "e2e state kept in {} (operator-*.log, pods/*/log, logs/)",
                    kept.display()
                );
            }
        }
    }
}

/// A synthetic Mixtral-layout checkpoint (2 layers, 8 experts, top-2, hidden 64, intermediate 32)
/// under `state`; written on the first call.
pub fn tiny_checkpoint(state: &Path) -> PathBuf {
    let ckpt = state.join("checkpoint");
    if ckpt.exists() {
        return ckpt;
    }
    let gen = Command::new(super::own_bin(env!("CARGO_BIN_EXE_moectl")))
        .args([
            "gen-checkpoint",
            "--family",
            "mixtral",
            "--out",
            ckpt.to_str().unwrap(),
            "--layers",
            "2",
            "--first-moe-layer",
            "0",
            "--experts",
            "8",
            "--top-k",
            "2",
            "--hidden",
            "64",
            "--intermediate",
            "32",
            "--shards",
            "1",
        ])
        .output()
        .expect("running moectl");
    assert!(
        gen.status.success(),
        "moectl gen-checkpoint failed: {}",
        String::from_utf8_lossy(&gen.stderr)
    );
    ckpt
}

/// One round of skewed traffic: the plan in force (from the deployment's plan ConfigMap) and
/// `moectl loadgen` with 50 batches of 256 tokens from `trace` through `workers`. A failed run is
/// logged, not fatal: the caller polls for what the traffic should bring about.
pub async fn loadgen_round(
    cms: &Api<ConfigMap>,
    configmap: &str,
    plan_file: &Path,
    workers: &str,
    trace: &Path,
) -> Result<(), String> {
    let cm = cms.get(configmap).await.map_err(|e| e.to_string())?;
    let data = cm.data.unwrap_or_default();
    std::fs::write(plan_file, &data["plan.json"]).map_err(|e| e.to_string())?;
    let out = Command::new(super::own_bin(env!("CARGO_BIN_EXE_moectl")))
        .args([
            "loadgen",
            "--plan",
            plan_file.to_str().unwrap(),
            "--workers",
            workers,
            "--load",
            trace.to_str().unwrap(),
            "--batches",
            "50",
            "--tokens",
            "256",
        ])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        eprintln!("loadgen: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A MoEDeployment of the checkpoint's tiny model on `nodes` x `gpus` GPUs, worker pods run as
/// real `moe-worker` processes when `process_backed`.
pub fn deployment(
    name: &str,
    ns: &str,
    checkpoint: &Path,
    nodes: u32,
    gpus: u32,
    process_backed: bool,
) -> serde_json::Value {
    let mut ann = serde_json::Map::new();
    if process_backed {
        ann.insert("moe.craft.dev/process-backed".into(), "true".into());
    }
    serde_json::json!({
        "apiVersion": "moe.craft.dev/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": name, "namespace": ns, "annotations": ann},
        "spec": {
            "model": {"layers": 2, "firstMoeLayer": 0, "experts": 8, "topK": 2, "hiddenSize": 64,
                      "expertIntermediateSize": 32, "dtype": "bf16",
                      "checkpoint": {"path": "/models/tiny",
                                     "volume": {"hostPath": {"path": checkpoint.display().to_string()}}}},
            "topology": {"nodes": nodes, "gpusPerNode": gpus},
            "replication": {"policy": "Craft", "budget": {"replicasPerGpu": 2},
                            "minImprovement": 0.01, "cooldown": "1s"},
            "metrics": {"source": "Workers", "interval": "2s"},
            "rollout": {"strategy": "InPlace", "maxUnavailable": 1},
            "worker": {"image": "moe-worker:dev", "device": "cpu",
                       "nodeSelector": {"type": "kwok"}}
        }
    })
}
