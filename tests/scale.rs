//! Scale measurements of the operator on the local control plane (ignored by default: they take
//! minutes and print figures rather than check a contract). Run one at a time:
//!
//! ```sh
//! cargo test --test scale -- --ignored --nocapture --test-threads 1
//! ```
//!
//! - `operator_memory_with_many_deployments`: 50 MoEDeployments of 8 workers each (kwok-simulated
//!   pods, so their metrics are unreachable and MetricsAvailable is False; the operator still
//!   reconciles, plans, applies and scrapes them). Prints the operator's RSS (VmRSS over a minute
//!   of steady state, and VmHWM) and the time until every deployment had its plan and 8 Running
//!   pods. `MOE_SCALE_DEPLOYMENTS` and `MOE_SCALE_WORKERS` change the 50 and 8, and
//!   `MOE_SCALE_GROUPS` (default 1) gives each deployment that many EP groups (`spec.replicas`)
//!   of `MOE_SCALE_WORKERS` workers.
//! - `load_shift_to_new_plan_in_force`: 2 process-backed CPU workers (2 nodes x 2 GPUs) under
//!   `moectl loadgen` traffic with experts 0 and 1 hot; the traffic then shifts to experts 5 and 6,
//!   and the time from the first shifted batch to every worker reporting a new plan hash is
//!   measured, `MOE_SCALE_SHIFTS` times (default 3), alternating the two traces.
//!
//! Figures and the machine they were taken on: `benches/results/operator.md`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::operator::{deployment, operator_metric, wait_every, wait_for, OperatorPlane};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use moe_operator::api::MoEDeployment;
use moe_operator::worker::wire::WorkerClient;
use serde_json::json;

mod common;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (VmRSS, VmHWM) of a process in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| -> Option<u64> {
        s.lines()
            .find(|l| l.starts_with(k))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale measurement: minutes; run with --ignored (see the module docs)"]
async fn operator_memory_with_many_deployments() {
    let deployments = env_usize("MOE_SCALE_DEPLOYMENTS", 50);
    let workers = env_usize("MOE_SCALE_WORKERS", 8);
    let groups = env_usize("MOE_SCALE_GROUPS", 1);
    // One GPU per worker; nodes with 8 GPUs each, with room to spare so that the one-worker-per-
    // node anti-affinity of each deployment never leaves a pod unschedulable.
    let nodes = (deployments * groups * workers).div_ceil(8) * 5 / 4 + groups * workers;
    let t_up = Instant::now();
    let mut plane = OperatorPlane::up("moe-scale-mem-", nodes, "scale").await;
    eprintln!("plane with {nodes} nodes up in {:?}", t_up.elapsed());
    let port = plane.start_operator("op-scale");
    let pid = plane.operator_pid("op-scale").expect("operator pid");
    let ckpt = plane.checkpoint();
    let mds: Api<MoEDeployment> = Api::namespaced(plane.admin.clone(), "scale");
    let pods: Api<Pod> = Api::namespaced(plane.admin.clone(), "scale");
    let ssa = PatchParams::apply("e2e").force();
    let idle = rss_kib(pid);
    let t0 = Instant::now();
    for i in 0..deployments {
        let name = format!("m{i:03}");
        let mut d = deployment(&name, "scale", &ckpt, workers as u32, 1, false);
        d["spec"]["metrics"]["interval"] = json!("15s");
        d["spec"]["replicas"] = json!(groups);
        mds.patch(&name, &ssa, &Patch::Apply(&d))
            .await
            .unwrap_or_else(|e| panic!("apply {name}: {e}"));
    }
    let applied = t0.elapsed();
    let want = deployments * groups * workers;
    wait_every(
        "every deployment planned with all its pods Running",
        Duration::from_secs(900),
        Duration::from_secs(2),
        || async {
            let planned = mds
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .iter()
                .filter(|m| m.status.as_ref().is_some_and(|s| s.plan.is_some()))
                .count();
            let running = pods
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            if planned == deployments && running == want {
                Ok(())
            } else {
                Err(format!(
                    "{planned}/{deployments} planned, {running}/{want} pods Running"
                ))
            }
        },
    )
    .await;
    let converged = t0.elapsed();
    // Steady state: a minute of metrics intervals (15 s) and busy requeues.
    let mut max_rss = 0u64;
    let mut last = (0u64, 0u64);
    let t_steady = Instant::now();
    while t_steady.elapsed() < Duration::from_secs(60) {
        if let Some(r) = rss_kib(pid) {
            max_rss = max_rss.max(r.0);
            last = r;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let reconciles = operator_metric(port, "moe_operator_reconciles_total").await;
    let sum = operator_metric(port, "moe_operator_reconcile_duration_seconds_sum").await;
    let count = operator_metric(port, "moe_operator_reconcile_duration_seconds_count").await;
    assert!(plane.operator_running("op-scale"), "the operator exited");
    let mib = |k: u64| k as f64 / 1024.0;
    eprintln!(
        "SCALE {deployments} deployments x {groups} groups x {workers} workers ({want} pods): applied in {applied:?}, \
         all planned and Running after {converged:?}; operator RSS idle {:.1} MiB, steady max {:.1} MiB, \
         last {:.1} MiB, peak (VmHWM) {:.1} MiB; {reconciles:?} reconciles, mean {:.1} ms",
        mib(idle.map(|r| r.0).unwrap_or(0)),
        mib(max_rss),
        mib(last.0),
        mib(last.1),
        match (sum, count) {
            (Some(s), Some(c)) if c > 0.0 => s / c * 1000.0,
            _ => f64::NAN,
        }
    );
    assert!(max_rss > 0, "could not read the operator's RSS");
}

fn shifted_trace(dir: &Path, hot: [usize; 2]) -> PathBuf {
    let row = |h: usize| -> Vec<u32> { (0..8).map(|e| if e == h { 4000 } else { 100 }).collect() };
    let path = dir.join(format!("hot-{}-{}.json", hot[0], hot[1]));
    std::fs::write(
        &path,
        json!({"logical_count": [row(hot[0]), row(hot[1])]}).to_string(),
    )
    .unwrap();
    path
}

/// The plan hash each worker reports, in rank order.
async fn worker_hashes(ips: &[String]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for ip in ips {
        out.push(
            WorkerClient::new()
                .scrape(ip, 9401, Duration::from_secs(2))
                .await
                .ok()
                .and_then(|s| s.plan_hash),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale measurement: minutes; run with --ignored (see the module docs)"]
async fn load_shift_to_new_plan_in_force() {
    let shifts = env_usize("MOE_SCALE_SHIFTS", 3);
    let mut plane = OperatorPlane::up("moe-scale-shift-", 2, "shift").await;
    plane.start_operator("op-shift");
    let ckpt = plane.checkpoint();
    let mds: Api<MoEDeployment> = Api::namespaced(plane.admin.clone(), "shift");
    let cms: Api<ConfigMap> = Api::namespaced(plane.admin.clone(), "shift");
    let mut d = deployment("shift", "shift", &ckpt, 2, 2, true);
    d["spec"]["replication"]["window"] = json!(2);
    mds.patch(
        "shift",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&d),
    )
    .await
    .expect("apply shift");
    let long = Duration::from_secs(120);
    let ips: Vec<String> = wait_for("2 workers serving", long, || async {
        let mut pods = plane.worker_pods("shift").await?;
        pods.sort_by_key(|p| p.metadata.name.clone());
        let ips: Vec<String> = pods
            .iter()
            .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
            .collect();
        let hashes = worker_hashes(&ips).await;
        if ips.len() == 2 && hashes.iter().all(Option::is_some) {
            Ok(ips)
        } else {
            Err(format!("{ips:?}: {hashes:?}"))
        }
    })
    .await;
    let workers = ips
        .iter()
        .map(|ip| format!("{ip}:9400"))
        .collect::<Vec<_>>()
        .join(",");

    // Traffic: loadgen runs back to back on the current trace, each run on the plan in the
    // ConfigMap at its start; `started` is when the first run on the current trace began.
    let traces = [
        shifted_trace(&plane.state, [0, 1]),
        shifted_trace(&plane.state, [5, 6]),
    ];
    let current: Arc<Mutex<(usize, Option<Instant>)>> = Arc::new(Mutex::new((0, None)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (current, stop, traces, cms) =
            (current.clone(), stop.clone(), traces.clone(), cms.clone());
        let plan_file = plane.state.join("loadgen-plan.json");
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(cm) = cms.get("shift-plan").await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let plan = cm
                    .data
                    .unwrap_or_default()
                    .remove("plan.json")
                    .unwrap_or_default();
                std::fs::write(&plan_file, plan).unwrap();
                let trace = {
                    let mut c = current.lock().unwrap();
                    c.1.get_or_insert_with(Instant::now);
                    traces[c.0].clone()
                };
                let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_moectl"))
                    .args([
                        "loadgen",
                        "--plan",
                        plan_file.to_str().unwrap(),
                        "--workers",
                    ])
                    .arg(&workers)
                    .args([
                        "--load",
                        trace.to_str().unwrap(),
                        "--batches",
                        "20",
                        "--tokens",
                        "256",
                    ])
                    .output()
                    .await
                    .expect("running moectl loadgen");
                if !out.status.success() {
                    eprintln!("loadgen: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
            }
        })
    };

    let mut figures = Vec::new();
    let mut in_force = worker_hashes(&ips).await[0].clone().unwrap();
    for shift in 0..=shifts {
        // Shift 0 only brings the first trace's plan in; the later ones are measured.
        if shift > 0 {
            let mut c = current.lock().unwrap();
            *c = ((c.0 + 1) % 2, None);
        }
        let t = wait_every(
            "every worker on a new plan after the shift",
            long,
            Duration::from_millis(200),
            || async {
                let hashes = worker_hashes(&ips).await;
                let first = hashes[0].clone();
                let started = current.lock().unwrap().1;
                match (started, &first) {
                    (Some(s), Some(h)) if *h != in_force && hashes.iter().all(|x| x == &first) => {
                        Ok((s.elapsed(), h.clone()))
                    }
                    _ => Err(format!("in force {in_force:.12}, workers {hashes:?}")),
                }
            },
        )
        .await;
        in_force = t.1.clone();
        if shift > 0 {
            eprintln!(
                "shift {shift}: new plan {:.12} in force on every worker {:?} after the shift",
                t.1, t.0
            );
            figures.push(t.0);
        }
        // Let the window fill with the new trace (plans made from mixed windows may follow) so
        // that the next shift starts from a settled plan.
        let settle = Instant::now();
        let mut last = in_force.clone();
        let mut since = Instant::now();
        while since.elapsed() < Duration::from_secs(8) && settle.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let h = worker_hashes(&ips).await;
            if let Some(Some(x)) = h.first() {
                if h.iter().all(|y| y.as_ref() == Some(x)) && *x != last {
                    last = x.clone();
                    since = Instant::now();
                }
            }
        }
        in_force = last;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = traffic.await;
    let mut ms: Vec<u128> = figures.iter().map(|d| d.as_millis()).collect();
    ms.sort_unstable();
    eprintln!(
        "SHIFT metrics interval 2s, window 2 intervals, cooldown 1s, maxUnavailable 1: time from the \
         shift to the new plan on every worker, ms (sorted): {ms:?}"
    );
    assert_eq!(ms.len(), shifts);
}
