//! End-to-end test of engine mode (`spec.engine`) on the local control plane (e2e/cluster.sh),
//! with a real Prometheus (`e2e/prometheus.sh`) between the engine pods and the operator.
//!
//! The worker pods run the stand-in engine (`e2e/engine-standin.py`) as vLLM would be run: the
//! operator mounts the plan's layout from the plan ConfigMap and appends `--eplb-config` with its
//! path and the redundant-expert count. The stand-in applies the loader's rules to the file (a
//! layout they refuse ends the process, so the pod never becomes Ready) and serves vLLM's
//! per-logical-expert gauge from a load file this test writes. Prometheus scrapes the pods (a file
//! of targets kept up to date with their IPs, as pods are replaced); the operator reads the load
//! through `seriesLabels` (vLLM's `layer_idx`, MoE layers from 0).
//!
//! Skewed load must make the operator re-plan and replace both pods onto the new layout, one at a
//! time; a load shift must do it again. After each rollout every pod reports the layout it
//! started on, which must be the ConfigMap's.
//!
//! Needs the binaries of `e2e/build.sh` and python3; without a Prometheus binary it fails when
//! `CI` is set and otherwise skips with a loud message.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use moe_operator::api::MoEDeployment;
use moe_operator::controller::prometheus::prometheus_query;
use moe_operator::worker::wire::HttpClient;
use serde_json::json;
use sha2::{Digest, Sha256};

mod common;
use common::operator::{condition, free_port, wait_for};

const NODES: usize = 2;
const NS: &str = "ml";
const PORT: u16 = 8000;
const EXPERTS: usize = 8;

struct Plane {
    state: PathBuf,
    children: Vec<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl Drop for Plane {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = common::cluster_script(&self.state, NODES, "down");
        if std::thread::panicking() {
            if let Some(t) = self._tmp.take() {
                eprintln!(
                    "e2e state kept in {} (operator.log, prometheus.log, pods/*/log)",
                    t.keep().display()
                );
            }
        }
    }
}

/// Per MoE layer, per expert: `hot` gets 40x the others (none: even load).
fn load(hot: Option<[usize; 2]>) -> serde_json::Value {
    let hot = hot.map_or([EXPERTS; 2], |h| h);
    json!(hot
        .iter()
        .map(|&h| (0..EXPERTS)
            .map(|e| if e == h { 4000 } else { 100 })
            .collect::<Vec<_>>())
        .collect::<Vec<_>>())
}

fn deployment(state: &std::path::Path, prometheus: &str) -> serde_json::Value {
    let standin = common::repo().join("e2e/engine-standin.py");
    json!({
        "apiVersion": "moe.craft.dev/v1alpha1",
        "kind": "MoEDeployment",
        "metadata": {"name": "eng", "namespace": NS,
                     "annotations": {"moe.craft.dev/process-backed": "true"}},
        "spec": {
            "model": {"layers": 3, "firstMoeLayer": 1, "experts": EXPERTS, "topK": 2,
                      "hiddenSize": 64, "expertIntermediateSize": 32,
                      "checkpoint": {"path": "/models/standin"}},
            "topology": {"nodes": NODES, "gpusPerNode": 2},
            "replication": {"policy": "Craft", "budget": {"replicasPerGpu": 2},
                            "minImprovement": 0.01, "cooldown": "1s", "window": 3},
            "metrics": {"source": "Prometheus", "interval": "2s",
                        "prometheus": {
                            "url": prometheus,
                            "query": "sum by (layer_idx, logical_expert_id) (vllm:eplb_tokens_routed_to_expert{job=\"engines\"})",
                            "seriesLabels": {"layer": "layer_idx", "expert": "logical_expert_id",
                                             "layerIndex": "MoELayer"}}},
            "rollout": {"maxUnavailable": 1},
            "worker": {"image": "standin-engine:dev", "nodeSelector": {"type": "kwok"}},
            "engine": {
                "kind": "VLLM",
                "command": ["python3", standin.display().to_string()],
                "args": ["--host", "$(POD_IP)", "--port", PORT.to_string(),
                         "--enable-expert-parallel", "--enable-eplb",
                         "--standin-layers", "3", "--standin-first-moe-layer", "1",
                         "--standin-experts", EXPERTS.to_string(),
                         "--standin-ep-size", "$(MOE_EP_SIZE)",
                         "--standin-load", state.join("load.json").display().to_string()]
            }
        }
    })
}

/// The running engine pods: (name, uid, IP, plan-hash annotation, ready).
async fn engine_pods(
    pods: &Api<Pod>,
) -> Result<Vec<(String, String, String, String, bool)>, String> {
    let list = pods
        .list(&ListParams::default().labels("moe.craft.dev/deployment=eng"))
        .await
        .map_err(|e| e.to_string())?;
    let mut out: Vec<_> = list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let st = p.status.as_ref()?;
            let ip = st.pod_ip.clone().filter(|ip| !ip.is_empty())?;
            let ready = st
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Some((
                p.name_any(),
                p.uid().unwrap_or_default(),
                ip,
                p.annotations()
                    .get("moe.craft.dev/plan-hash")
                    .cloned()
                    .unwrap_or_default(),
                ready,
            ))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// `standin_layout_info`'s labels, from the engine pod's own `/metrics`.
async fn layout_info(ip: &str) -> Result<BTreeMap<String, String>, String> {
    let r = HttpClient::new()
        .get(
            &format!("http://{ip}:{PORT}/metrics"),
            Duration::from_secs(3),
            1 << 20,
        )
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&r.body);
    let line = text
        .lines()
        .find(|l| l.starts_with("standin_layout_info{"))
        .ok_or_else(|| format!("no standin_layout_info at {ip}"))?;
    let inner = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
    Ok(inner
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.trim_matches('"').to_string()))
        })
        .collect())
}

/// Waits for a plan other than `after` on every engine pod, Ready, then checks that each pod
/// started on the ConfigMap's layout. Returns the plan hash and the pods' UIDs.
async fn rolled_out(
    mds: &Api<MoEDeployment>,
    pods: &Api<Pod>,
    cms: &Api<ConfigMap>,
    after: &str,
) -> (String, Vec<String>) {
    let hash = wait_for(
        &format!("a plan other than {after:.12} on both engine pods"),
        Duration::from_secs(180),
        || async {
            let md = mds.get("eng").await.map_err(|e| e.to_string())?;
            let st = md.status.clone().unwrap_or_default();
            let hash = st.plan.map(|p| p.hash).unwrap_or_default();
            let on = st.workers.map(|w| w.on_current_plan).unwrap_or(0);
            let ready = condition(&md, "Ready").map(|c| c.0);
            let running = engine_pods(pods).await?;
            let all_on = running.len() == NODES
                && running.iter().all(|(_, _, _, h, r)| *h == hash && *r);
            if !hash.is_empty()
                && hash != after
                && on == NODES as i32
                && ready.as_deref() == Some("True")
                && all_on
            {
                Ok(hash)
            } else {
                Err(format!(
                    "plan {hash:.12}, on current plan {on}, Ready {ready:?}, pods {running:?}, metrics {:?}",
                    condition(&md, "MetricsAvailable")
                ))
            }
        },
    )
    .await;
    let cm = cms.get("eng-plan").await.expect("plan ConfigMap");
    let data = cm.data.unwrap_or_default();
    assert_eq!(data["hash"], hash);
    let layout = &data["layout.json"];
    let want_sha = hex::encode(Sha256::digest(layout.as_bytes()));
    let redundant = &data["redundant-experts"];
    let running = engine_pods(pods).await.unwrap();
    for (name, _, ip, _, _) in &running {
        let info = layout_info(ip).await.unwrap();
        assert_eq!(info["sha256"], want_sha, "{name} started on another layout");
        assert_eq!(&info["redundant_experts"], redundant, "{name}");
    }
    eprintln!(
        "plan {hash:.12} on both engine pods: layout {want_sha:.12}, {redundant} redundant experts"
    );
    (hash, running.into_iter().map(|p| p.1).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_pods_follow_the_plan_from_the_engines_metrics() {
    let bin = common::operator::e2e_bin();
    let prom = Command::new(common::repo().join("e2e/prometheus.sh"))
        .arg("--path")
        .output()
        .expect("running e2e/prometheus.sh --path");
    if !prom.status.success() {
        let why = String::from_utf8_lossy(&prom.stderr);
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set and there is no Prometheus: run e2e/prometheus.sh first ({})",
            why.trim()
        );
        eprintln!(
            "\n!!!!!!!! SKIPPED engine_pods_follow_the_plan_from_the_engines_metrics: no Prometheus ({}).\n",
            why.trim()
        );
        return;
    }
    let prometheus_bin = PathBuf::from(String::from_utf8_lossy(&prom.stdout).trim());

    let tmp = tempfile::Builder::new()
        .prefix("moe-e2e-engine-")
        .tempdir()
        .expect("temp state dir");
    let mut plane = Plane {
        state: tmp.path().to_path_buf(),
        children: Vec::new(),
        _tmp: Some(tmp),
    };
    let state = plane.state.clone();
    common::run_cluster(&state, NODES, "up");
    let kc = state.join("kubeconfig");
    let admin = common::client_from(&kc).await;
    let kubectl = |args: &[&str]| common::operator::tool(&bin, "kubectl", args, &kc);
    let crd = common::repo().join("crds/moedeployments.moe.craft.dev.yaml");
    kubectl(&["apply", "--server-side", "-f", crd.to_str().unwrap()]);
    kubectl(&["create", "namespace", NS]);
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/moedeployments.moe.craft.dev",
        "--timeout=60s",
    ]);

    // Prometheus scrapes whatever the targets file lists, re-read as it changes.
    let targets = state.join("targets.json");
    std::fs::write(&targets, "[]").unwrap();
    let prom_port = free_port();
    let prom_url = format!("http://127.0.0.1:{prom_port}");
    let config = state.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: engines\n    file_sd_configs:\n      - files: [{}]\n        refresh_interval: 1s\n",
            targets.display()
        ),
    )
    .unwrap();
    plane.children.push(
        Command::new(&prometheus_bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                state.join("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(state.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", prometheus_bin.display())),
    );

    let metrics_port = free_port();
    plane.children.push(
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
            .env("MOE_OPERATOR_ALLOWED_PROMETHEUS_URL_PREFIXES", &prom_url)
            .env("RUST_LOG", "info,moe_operator=debug,kube=warn")
            .env("POD_NAME", "e2e-operator")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(state.join("operator.log")).unwrap())
            .spawn()
            .expect("starting moe-operator"),
    );

    let load_file = state.join("load.json");
    // Even load first: the first plan (placement only) is as good as any, so it stays until
    // the load is skewed.
    std::fs::write(&load_file, load(None).to_string()).unwrap();
    let mds: Api<MoEDeployment> = Api::namespaced(admin.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);

    // Keep Prometheus' targets on the engine pods' IPs, and count how often fewer than
    // nodes - maxUnavailable engine pods were Ready once both had been.
    let stop = Arc::new(AtomicBool::new(false));
    let under = Arc::new(AtomicUsize::new(0));
    let follower = {
        let (pods, stop, under, targets) =
            (pods.clone(), stop.clone(), under.clone(), targets.clone());
        tokio::spawn(async move {
            let mut both_seen = false;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(running) = engine_pods(&pods).await {
                    let ips: Vec<String> =
                        running.iter().map(|p| format!("{}:{PORT}", p.2)).collect();
                    let doc = json!([{"targets": ips}]).to_string();
                    if std::fs::read_to_string(&targets).ok().as_deref() != Some(doc.as_str()) {
                        let tmp = targets.with_extension("tmp");
                        std::fs::write(&tmp, &doc).unwrap();
                        std::fs::rename(&tmp, &targets).unwrap();
                    }
                    let ready = running.iter().filter(|p| p.4).count();
                    both_seen |= ready == NODES;
                    if both_seen && ready < NODES - 1 {
                        under.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    let md: MoEDeployment = serde_json::from_value(deployment(&state, &prom_url)).unwrap();
    mds.patch("eng", &PatchParams::apply("e2e"), &Patch::Apply(&md))
        .await
        .expect("apply MoEDeployment");

    // The first plan (placement only: no load yet), then the re-plan from the engines' metrics
    // once the load is skewed.
    let (first, _) = rolled_out(&mds, &pods, &cms, "").await;
    let series = wait_for(
        "Prometheus to have the engines' gauge",
        Duration::from_secs(60),
        || {
            let url = prom_url.clone();
            async move {
                let v = prometheus_query(
                    &url,
                    "count(vllm:eplb_tokens_routed_to_expert)",
                    Duration::from_secs(3),
                )
                .await
                .map_err(|e| e.to_string())?;
                match v.first() {
                    Some((_, n)) if *n == (2 * EXPERTS * NODES) as f64 => Ok(*n),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    eprintln!("Prometheus holds {series} engine series");
    std::fs::write(&load_file, load(Some([0, 1])).to_string()).unwrap();
    let (skewed, uids) = rolled_out(&mds, &pods, &cms, &first).await;
    let md = mds.get("eng").await.unwrap();
    let (ms, _, mmsg) = condition(&md, "MetricsAvailable").expect("MetricsAvailable");
    assert_eq!(ms, "True", "{mmsg}");
    assert!(mmsg.contains("the engine's metrics"), "{mmsg}");
    let observed = md.status.and_then(|s| s.observed).expect("observed load");
    assert!(observed.tokens > 0, "{observed:?}");

    // The load shifts: another re-plan, both pods replaced again.
    std::fs::write(&load_file, load(Some([5, 6])).to_string()).unwrap();
    let (shifted, uids2) = rolled_out(&mds, &pods, &cms, &skewed).await;
    assert_ne!(shifted, skewed);
    assert!(
        uids2.iter().all(|u| !uids.contains(u)),
        "every engine pod was replaced: {uids:?} -> {uids2:?}"
    );
    stop.store(true, Ordering::Relaxed);
    follower.await.unwrap();
    assert_eq!(
        under.load(Ordering::Relaxed),
        0,
        "a rollout left fewer than nodes - maxUnavailable engine pods Ready"
    );
    let log = std::fs::read_to_string(state.join("operator.log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "the operator panicked:\n{log}");
}
