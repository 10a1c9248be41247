//! End-to-end test of the operator's Prometheus metrics source against a real Prometheus server
//! (Debian's package, found or unpacked by `e2e/prometheus.sh`), and of the `kubectl moe` plugin
//! on the same deployment, on the local control plane (e2e/cluster.sh).
//!
//! Prometheus scrapes the process-backed `moe-worker`s on their pod IPs; the MoEDeployment says
//! `metrics.source: Prometheus`, so the operator reads the load only through Prometheus' query API
//! (`increase()` of the workers' counters). Skewed traffic from `moectl loadgen` must show up in
//! status and make the operator re-plan and roll out in place; stopping Prometheus must turn
//! MetricsAvailable False. Then `kubectl moe status|plan|explain` (through kubectl's plugin
//! lookup, `kubectl-moe` being a link to `moectl`) must describe what happened.
//!
//! Needs the binaries of `e2e/build.sh`; fails without them. Without a Prometheus binary it fails
//! when `CI` is set (`.ci/run` sets it) and otherwise skips with a loud message.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use moe_operator::api::MoEDeployment;
use moe_operator::controller::prometheus::prometheus_query;
use moe_operator::worker::wire::{WorkerClient, TOKENS_METRIC};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;
use common::operator::{
    condition, free_port, loadgen_round, operator_metric, tiny_checkpoint, wait_for,
};
const NODES: usize = 2;
const NS: &str = "ml";

/// The plane (own state dir, always torn down) and the processes the test started (always killed).
struct Plane {
    state: PathBuf,
    children: Vec<(&'static str, Child)>,
    _tmp: Option<tempfile::TempDir>,
}

impl Plane {
    fn stop(&mut self, which: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| *n == which) {
            let (_, mut c) = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = common::cluster_script(&self.state, NODES, "down");
        if std::thread::panicking() {
            if let Some(t) = self._tmp.take() {
                let kept = t.keep();
                eprintln!(
                    "e2e state kept in {} (operator.log, prometheus.log, prometheus.yml, pods/*/log)",
                    kept.display()
                );
            }
        }
    }
}

/// The hash of the plan in force by the deployment's status ("" before the first plan).
async fn plan_in_force(mds: &Api<MoEDeployment>) -> String {
    mds.get("tiny")
        .await
        .ok()
        .and_then(|md| md.status?.plan)
        .map(|p| p.hash)
        .unwrap_or_default()
}

/// Runs `run` and returns the short hash of the plan in force around it with its output. The
/// load keeps moving while Prometheus' rate window drains, so the operator may re-plan between
/// any two reads: the plan is read before and after, and a change in between only retries.
async fn stable_read(
    mds: &Api<MoEDeployment>,
    what: &str,
    run: impl Fn() -> String,
) -> (String, String) {
    for _ in 0..10 {
        let before = plan_in_force(mds).await;
        let out = run();
        if plan_in_force(mds).await == before && before.len() >= 12 {
            return (before[..12].to_string(), out);
        }
        eprintln!("re-planned during {what}; reading again");
    }
    panic!("the plan in force kept changing during {what}");
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `CI` set to anything but empty, 0 or false.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The deployment's load query.
fn query() -> String {
    format!("sum by (layer, expert) (increase({TOKENS_METRIC}[10s]))")
}

fn deployment(checkpoint: &Path, prometheus: &str) -> serde_json::Value {
    json!({
        "apiVersion": "moe.craft.dev/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": "tiny", "namespace": NS,
                     "annotations": {"moe.craft.dev/process-backed": "true"}},
        "spec": {
            "model": {"layers": 2, "firstMoeLayer": 0, "experts": 8, "topK": 2, "hiddenSize": 64,
                      "expertIntermediateSize": 32, "dtype": "bf16",
                      "checkpoint": {"path": "/models/tiny",
                                     "volume": {"hostPath": {"path": checkpoint.display().to_string()}}}},
            "topology": {"nodes": 2, "gpusPerNode": 2},
            "replication": {"policy": "Craft", "budget": {"replicasPerGpu": 2},
                            "minImprovement": 0.01, "cooldown": "1s", "window": 5},
            "metrics": {"source": "Prometheus", "interval": "2s",
                        "prometheus": {"url": prometheus, "query": query()}},
            "rollout": {"strategy": "InPlace", "maxUnavailable": 1},
            "worker": {"image": "moe-worker:dev", "device": "cpu",
                       "nodeSelector": {"type": "kwok"}}
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_source_and_kubectl_plugin() {
    let bin_dir = Command::new(common::repo().join("e2e/build.sh"))
        .arg("--bin-dir")
        .output()
        .expect("running e2e/build.sh --bin-dir");
    assert!(
        bin_dir.status.success(),
        "the local control plane is not built: run e2e/build.sh first: {}",
        String::from_utf8_lossy(&bin_dir.stderr).trim()
    );
    let bin = PathBuf::from(String::from_utf8_lossy(&bin_dir.stdout).trim());
    let prom = Command::new(common::repo().join("e2e/prometheus.sh"))
        .arg("--path")
        .output()
        .expect("running e2e/prometheus.sh --path");
    if !prom.status.success() {
        let why = String::from_utf8_lossy(&prom.stderr);
        assert!(
            !in_ci(),
            "CI is set and there is no Prometheus: run e2e/prometheus.sh first ({})",
            why.trim()
        );
        eprintln!(
            "\n!!!!!!!! SKIPPED prometheus_source_and_kubectl_plugin: no Prometheus binary ({}).\n\
             !!!!!!!! Run e2e/prometheus.sh to install Debian's package into the e2e cache.\n",
            why.trim()
        );
        return;
    }
    let prometheus_bin = PathBuf::from(String::from_utf8_lossy(&prom.stdout).trim());

    let tmp = tempfile::Builder::new()
        .prefix("moe-e2e-prometheus-")
        .tempdir()
        .expect("temp state dir");
    let mut plane = Plane {
        state: tmp.path().to_path_buf(),
        children: Vec::new(),
        _tmp: Some(tmp),
    };
    common::run_cluster(&plane.state, NODES, "up");
    let kc = plane.state.join("kubeconfig");
    let admin = common::client_from(&kc).await;
    let long = Duration::from_secs(120);
    let kubectl = |args: &[&str]| {
        run_ok(
            Command::new(bin.join("kubectl"))
                .args(args)
                .env("KUBECONFIG", &kc),
            &format!("kubectl {}", args.join(" ")),
        )
    };
    let crd = common::repo().join("crds/moedeployments.moe.craft.dev.yaml");
    kubectl(&["apply", "--server-side", "-f", crd.to_str().unwrap()]);
    kubectl(&["create", "namespace", NS]);
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/moedeployments.moe.craft.dev",
        "--timeout=60s",
    ]);

    let prom_port = free_port();
    let prom_url = format!("http://127.0.0.1:{prom_port}");
    let metrics_port = free_port();
    // The operator, with the admin kubeconfig (RBAC is the operator test's subject, not this one's).
    let log = std::fs::File::create(plane.state.join("operator.log")).unwrap();
    plane.children.push((
        "operator",
        Command::new(common::own_bin(env!("CARGO_BIN_EXE_moe-operator")))
            .args([
                "run",
                "--metrics-listen",
                &format!("127.0.0.1:{metrics_port}"),
                "--health-listen",
                "127.0.0.1:0",
                "--leader-election-namespace",
                "default",
            ])
            .env("KUBECONFIG", &kc)
            // The pod policy: the checkpoint's hostPath and this Prometheus are allowed.
            .env("MOE_OPERATOR_ALLOW_HOST_PATH_PREFIXES", &plane.state)
            .env("MOE_OPERATOR_ALLOWED_PROMETHEUS_URL_PREFIXES", &prom_url)
            .env("RUST_LOG", "info,moe_operator=debug,kube=warn")
            .env("POD_NAME", "e2e-operator")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting moe-operator"),
    ));

    let ckpt = tiny_checkpoint(&plane.state);

    let mds: Api<MoEDeployment> = Api::namespaced(admin.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let md: MoEDeployment = serde_json::from_value(deployment(&ckpt, &prom_url)).unwrap();
    mds.patch("tiny", &PatchParams::apply("e2e"), &Patch::Apply(&md))
        .await
        .expect("apply MoEDeployment");

    // Worker pods running as real moe-worker processes on their pod IPs.
    let running: Vec<(String, String)> = wait_for("2 worker pods running", long, || async {
        let list = pods
            .list(&ListParams::default().labels("moe.craft.dev/deployment=tiny"))
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for p in &list.items {
            let name = p.metadata.name.clone().unwrap_or_default();
            let st = p.status.clone().unwrap_or_default();
            let pid = plane.state.join("pods").join(format!("{NS}_{name}/pid"));
            if st.phase.as_deref() == Some("Running") && pid.exists() {
                out.push((name, st.pod_ip.unwrap_or_default()));
            }
        }
        out.sort();
        if out.len() == NODES {
            Ok(out)
        } else {
            Err(format!("{out:?} of {} pods", list.items.len()))
        }
    })
    .await;

    // Prometheus scrapes the workers' /metrics on their pod IPs every second.
    let targets: Vec<String> = running
        .iter()
        .map(|(_, ip)| format!("\"{ip}:9401\""))
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: moe-workers\n    static_configs:\n      - targets: [{}]\n        labels: {{namespace: {NS}, deployment: tiny}}\n",
        targets.join(", ")
    );
    let config_path = plane.state.join("prometheus.yml");
    std::fs::write(&config_path, &config).unwrap();
    let plog = std::fs::File::create(plane.state.join("prometheus.log")).unwrap();
    plane.children.push((
        "prometheus",
        Command::new(&prometheus_bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                plane.state.join("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(plog)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", prometheus_bin.display())),
    ));
    let up_query = "sum(up{job=\"moe-workers\"})";
    wait_for("Prometheus to scrape both workers", long, || async {
        let v = prometheus_query(&prom_url, up_query, Duration::from_secs(3))
            .await
            .map_err(|e| e.to_string())?;
        match v.first() {
            Some((_, up)) if *up == NODES as f64 => Ok(()),
            other => Err(format!("{up_query} = {other:?}")),
        }
    })
    .await;

    let first_hash = wait_for("Ready on the initial plan", long, || async {
        let md = mds.get("tiny").await.map_err(|e| e.to_string())?;
        let hash = md
            .status
            .as_ref()
            .and_then(|s| s.plan.as_ref())
            .map(|p| p.hash.clone());
        match (condition(&md, "Ready"), hash) {
            (Some((s, _, _)), Some(h)) if s == "True" => Ok(h),
            (c, h) => Err(format!("Ready {c:?}, plan {h:?}")),
        }
    })
    .await;

    // Skewed traffic: expert 0 of layer 0 and expert 1 of layer 1 are hot.
    let trace = plane.state.join("skewed.json");
    let row =
        |hot: u32| -> Vec<u32> { (0..8).map(|e| if e == hot { 4000 } else { 100 }).collect() };
    std::fs::write(
        &trace,
        json!({"logical_count": [row(0), row(1)]}).to_string(),
    )
    .unwrap();
    let workers: String = running
        .iter()
        .map(|(_, ip)| format!("{ip}:9400"))
        .collect::<Vec<_>>()
        .join(",");
    let cms = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(admin.clone(), NS);
    let plan_file = plane.state.join("plan.json");
    let (new_hash, st) = wait_for(
        "a re-plan from Prometheus' load rolled out on every worker",
        Duration::from_secs(180),
        || async {
            loadgen_round(&cms, "tiny-plan", &plan_file, &workers, &trace).await?;
            let md = mds.get("tiny").await.map_err(|e| e.to_string())?;
            let st = md.status.clone().unwrap_or_default();
            let hash = st.plan.as_ref().map(|p| p.hash.clone()).unwrap_or_default();
            let on = st.workers.as_ref().map(|w| w.on_current_plan).unwrap_or(0);
            let ready = condition(&md, "Ready").map(|c| c.0);
            if hash != first_hash && on == NODES as i32 && ready.as_deref() == Some("True") {
                Ok((hash, st))
            } else {
                Err(format!(
                    "plan {:?}, workers {:?}, observed {:?}, metrics {:?}",
                    st.plan,
                    st.workers,
                    st.observed,
                    condition(&md, "MetricsAvailable")
                ))
            }
        },
    )
    .await;
    let md_now = mds.get("tiny").await.unwrap();
    let (ms, _, mmsg) = condition(&md_now, "MetricsAvailable").expect("MetricsAvailable");
    assert_eq!(ms, "True", "{mmsg}");
    assert!(mmsg.contains("load from Prometheus"), "{mmsg}");
    let p = st.plan.clone().expect("plan status");
    assert_eq!(p.algorithm, "craft", "{p:?}");
    assert!(
        p.predicted_balancedness.unwrap_or(0.0) > p.previous_balancedness.unwrap_or(1.0),
        "{p:?}"
    );
    let observed = st.observed.clone().expect("observed load in status");
    assert!(observed.tokens > 0, "{observed:?}");
    // The tokens in status are what Prometheus says, not a worker scrape: the same query agrees
    // on the order of magnitude (it moves on with time, so no exact match).
    let series = prometheus_query(
        &prom_url,
        &format!("sum({TOKENS_METRIC})"),
        Duration::from_secs(3),
    )
    .await
    .expect("Prometheus answers");
    assert!(series.first().is_some_and(|(_, v)| *v > 0.0), "{series:?}");
    eprintln!("re-planned from Prometheus: {new_hash} {p:?}; observed {observed:?}");
    // The operator's /metrics counts the decisions: the first plan and the re-plan applied, and
    // (traffic going on, the re-plan in force) a candidate kept for too small a gain or no change.
    let applied =
        "moe_operator_replan_decisions_total{outcome=\"applied\",reason=\"PlanImproved\"}";
    let initial = "moe_operator_replan_decisions_total{outcome=\"applied\",reason=\"InitialPlan\"}";
    assert!(
        operator_metric(metrics_port, applied).await >= Some(1.0),
        "{applied}"
    );
    assert_eq!(
        operator_metric(metrics_port, initial).await,
        Some(1.0),
        "{initial}"
    );
    let kept = wait_for("a re-plan kept", long, || async {
        loadgen_round(&cms, "tiny-plan", &plan_file, &workers, &trace).await?;
        let mut kept = 0.0;
        for r in ["GainBelowMinImprovement", "PlanUnchanged", "CoolingDown"] {
            let name =
                format!("moe_operator_replan_decisions_total{{outcome=\"kept\",reason=\"{r}\"}}");
            kept += operator_metric(metrics_port, &name).await.unwrap_or(0.0);
        }
        if kept > 0.0 {
            Ok(kept)
        } else {
            Err("no kept decision counted yet".to_string())
        }
    })
    .await;
    eprintln!("kept re-plans counted: {kept}");
    // The loadgen rounds of the wait above may have brought yet another re-plan (the load keeps
    // moving): every worker serves the plan the status says is in force, once it has rolled out.
    wait_for("every worker on the plan in force", long, || async {
        let md = mds.get("tiny").await.map_err(|e| e.to_string())?;
        let st = md.status.unwrap_or_default();
        let in_force = st.plan.map(|p| p.hash).unwrap_or_default();
        if in_force != new_hash {
            eprintln!("re-planned again since: {in_force}");
        }
        for (_, ip) in &running {
            let r = WorkerClient::new()
                .scrape(ip, 9401, Duration::from_secs(5))
                .await
                .map_err(|e| format!("worker {ip}: {e}"))?;
            if r.plan_hash.as_deref() != Some(in_force.as_str()) {
                return Err(format!(
                    "worker {ip} serves {:?}, the plan in force is {in_force}",
                    r.plan_hash
                ));
            }
        }
        Ok(())
    })
    .await;

    // kubectl moe, found by kubectl on PATH as kubectl-moe (a link to moectl).
    let plugin_dir = plane.state.join("plugins");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    std::os::unix::fs::symlink(
        common::own_bin(env!("CARGO_BIN_EXE_moectl")),
        plugin_dir.join("kubectl-moe"),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        plugin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let moe = |args: &[&str]| {
        run_ok(
            Command::new(bin.join("kubectl"))
                .arg("moe")
                .args(args)
                .env("KUBECONFIG", &kc)
                .env("PATH", &path),
            &format!("kubectl moe {}", args.join(" ")),
        )
    };
    // The load keeps moving while Prometheus' rate window drains, so the operator may re-plan
    // between any two reads: each output is checked against the plan in force around it (read
    // before and after; a change in between only retries).
    let (short, status) =
        stable_read(&mds, "kubectl moe status", || moe(&["status", "-n", NS])).await;
    eprintln!("kubectl moe status:\n{status}");
    let line = status
        .lines()
        .find(|l| l.starts_with("tiny "))
        .unwrap_or_else(|| panic!("no line for tiny:\n{status}"));
    for want in ["True", short.as_str(), "craft", "2/2"] {
        assert!(line.contains(want), "{want} missing: {line}");
    }
    let all = moe(&["status", "-A"]);
    assert!(all.starts_with("NAMESPACE") && all.contains("ml "), "{all}");
    let (short, plan) = stable_read(&mds, "kubectl moe plan", || {
        moe(&["plan", "tiny", "-n", NS])
    })
    .await;
    eprintln!("kubectl moe plan tiny:\n{plan}");
    assert!(
        plan.starts_with(&format!("Plan {short} (craft) of ml/tiny")),
        "{plan}"
    );
    assert!(plan.contains("R = 2 extra slots per GPU"), "{plan}");
    assert!(
        plan.contains("Per layer:") && plan.contains("Per GPU:"),
        "{plan}"
    );
    // Without a trace, the per-layer column is the plan's own prediction on its window.
    assert!(
        plan.contains("predicted on the window the plan was made from"),
        "{plan}"
    );
    // The trace replayed on the plan gives a per-layer balancedness for both layers.
    let replayed = moe(&["plan", "tiny", "-n", NS, "--load", trace.to_str().unwrap()]);
    assert!(replayed.contains("Replayed:   balancedness"), "{replayed}");
    // A re-plan just made is still rolling out: the explanation is read again until the
    // rollout it reports is complete (the other lines hold in every read).
    let explain = wait_for(
        "kubectl moe explain with the rollout complete",
        long,
        || async {
            let explain = moe(&["explain", "tiny", "-n", NS]);
            for want in ["Conditions:", "MetricsAvailable", "PlanImproved"] {
                assert!(explain.contains(want), "{want} missing:\n{explain}");
            }
            if explain.contains("last re-plan rolled out") && explain.contains("complete") {
                Ok(explain)
            } else {
                Err(format!("rollout not complete yet:\n{explain}"))
            }
        },
    )
    .await;
    eprintln!("kubectl moe explain tiny:\n{explain}");
    // Direct invocation with --kubeconfig (no KUBECONFIG) works the same way.
    let (short, direct) = stable_read(&mds, "kubectl-moe --kubeconfig status", || {
        run_ok(
            Command::new(plugin_dir.join("kubectl-moe"))
                .args(["--kubeconfig", kc.to_str().unwrap(), "-n", NS, "status"])
                .env_remove("KUBECONFIG"),
            "kubectl-moe --kubeconfig",
        )
    })
    .await;
    assert!(direct.contains(&short), "{direct}");
    let missing = Command::new(plugin_dir.join("kubectl-moe"))
        .args([
            "--kubeconfig",
            kc.to_str().unwrap(),
            "-n",
            NS,
            "plan",
            "nope",
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("MoEDeployment ml/nope not found"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // Without Prometheus the operator reports the source unreachable and keeps the plan.
    plane.stop("prometheus");
    let msg = wait_for(
        "MetricsAvailable=False after Prometheus stops",
        long,
        || async {
            let md = mds.get("tiny").await.map_err(|e| e.to_string())?;
            match condition(&md, "MetricsAvailable") {
                Some((s, r, m)) if s == "False" => Ok(format!("{r}: {m}")),
                c => Err(format!("{c:?}")),
            }
        },
    )
    .await;
    assert!(
        msg.starts_with("Unreachable") && msg.contains(&prom_url),
        "{msg}"
    );
    // ... and counts the failed readings for this deployment, on its /metrics.
    let failures = "moe_operator_scrape_failures_total{namespace=\"ml\",name=\"tiny\",source=\"prometheus\",reason=\"Unreachable\"}";
    assert!(
        operator_metric(metrics_port, failures).await >= Some(1.0),
        "{failures}"
    );
    // No load is read from now on, so nothing may change the plan: it stays over several
    // metrics intervals (2 s each).
    let kept_plan = plan_in_force(&mds).await;
    assert!(!kept_plan.is_empty());
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        plan_in_force(&mds).await,
        kept_plan,
        "the plan in force is kept"
    );
    let explain = moe(&["explain", "tiny", "-n", NS]);
    assert!(
        explain.contains("load is not being measured (Unreachable)"),
        "{explain}"
    );
    plane.stop("operator");
}
