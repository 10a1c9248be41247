//! Workers mode: one real `moe-worker` per rank (local processes, or in-process workers for tests),
//! each plan pushed to them with `PUT /v1/plan`, and the load generator driving them with the
//! expert-parallel barrier.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::emulate::{RunConfig, WARMUP_SEED_XOR};
use super::{LayerResult, Measured, StepMs};
use crate::loadgen::{run_loadgen, LoadgenConfig, LoadgenReport, StepStats};
use crate::plan::{ExpertPlan, LoadWindow};
use crate::worker::runtime::BoundAddresses;
use crate::worker::wire::WorkerClient;

/// How the workers are started.
#[derive(Clone, Debug)]
pub enum Launch {
    /// `moe-worker` processes from this binary, one per rank; `device` is `cpu` or `cuda:N`
    /// (rank r then uses `cuda:N+r`).
    Processes {
        bin: PathBuf,
        device: String,
        weights_seed: u64,
        /// Plans and worker logs go here.
        dir: PathBuf,
    },
    /// Workers in this process on the CPU backend (tests).
    InProcess { weights_seed: u64 },
}

/// The plan as the workers serve it: one worker per rank, so as many nodes as ranks. The planner's
/// node count only shaped the placement; routing and compute do not depend on it.
pub fn served_plan(plan: &ExpertPlan) -> ExpertPlan {
    let mut p = plan.clone();
    p.nodes = p.gpus;
    p.transition = None;
    p.seal()
}

const TOKEN: &str = "moe-bench-policies";
/// Largest dispatch frame the workers accept (a prefill layer's rows for one rank).
const MAX_FRAME_BYTES: usize = 1 << 30;

/// Running workers, one per rank.
pub struct WorkerPool {
    /// Dispatch address per rank.
    pub dispatch: Vec<String>,
    /// Admin (host, port) per rank.
    admin: Vec<(String, u16)>,
    children: Vec<Child>,
    handles: Vec<crate::worker::runtime::WorkerHandle>,
    logs: Vec<PathBuf>,
    /// Asks for readiness and pushes plans.
    client: WorkerClient,
}

/// The last lines of a worker's log before any backtrace: the error and its causes, which a
/// backtrace (RUST_BACKTRACE=1) would otherwise push out of view.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .take_while(|l| {
            !l.trim_start()
                .to_ascii_lowercase()
                .starts_with("stack backtrace:")
        })
        .collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl WorkerPool {
    /// Starts one worker per rank of `first` (a served plan) and waits until all serve it.
    pub async fn start(launch: &Launch, first: &ExpertPlan) -> anyhow::Result<Self> {
        let d = first.gpus as usize;
        let mut pool = WorkerPool {
            dispatch: Vec::new(),
            admin: Vec::new(),
            children: Vec::new(),
            handles: Vec::new(),
            logs: Vec::new(),
            client: WorkerClient::new(),
        };
        match launch {
            Launch::InProcess { weights_seed } => {
                use crate::worker::runtime::{start, WorkerOptions};
                use crate::worker::server::ServeConfig;
                let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
                for r in 0..d as u32 {
                    let source =
                        Arc::new(crate::worker::checkpoint::synthetic::HashedWeights::new(
                            first.model.clone(),
                            *weights_seed,
                        ));
                    let loader: Arc<dyn crate::worker::compute::ExpertLoader> =
                        Arc::new(crate::worker::cpu::CpuLoader::new(source));
                    let mut serve = ServeConfig::new(r, 1);
                    serve.previous_plan_grace = Duration::ZERO;
                    serve.max_frame_bytes = MAX_FRAME_BYTES;
                    serve.max_inflight_bytes = 4 * MAX_FRAME_BYTES;
                    let h = start(
                        WorkerOptions {
                            serve,
                            listen: any,
                            metrics_listen: any,
                            admin_listen: any,
                            admin_token: TOKEN.into(),
                            initial_plan: Some(first.clone()),
                        },
                        vec![loader],
                    )
                    .await
                    .with_context(|| format!("starting the in-process worker of rank {r}"))?;
                    pool.dispatch.push(h.dispatch_addr.to_string());
                    pool.admin
                        .push((h.admin_addr.ip().to_string(), h.admin_addr.port()));
                    pool.handles.push(h);
                }
            }
            Launch::Processes {
                bin,
                device,
                weights_seed,
                dir,
            } => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let plan_path = dir.join("plan-start.json");
                std::fs::write(&plan_path, serde_json::to_vec(first)?)
                    .with_context(|| format!("writing {}", plan_path.display()))?;
                let base = match device.parse::<crate::worker::device::DeviceSpec>() {
                    Ok(crate::worker::device::DeviceSpec::Cuda(n)) => Some(n),
                    Ok(crate::worker::device::DeviceSpec::Cpu) => None,
                    _ => anyhow::bail!(
                        "--device {device:?}: workers mode takes cpu or cuda:N (rank r runs on cuda:N+r)"
                    ),
                };
                let mut addr_files = Vec::new();
                for r in 0..d {
                    let addr_file = dir.join(format!("worker-{r}.addresses.json"));
                    let _ = std::fs::remove_file(&addr_file);
                    let dev = base.map_or("cpu".to_string(), |n| format!("cuda:{}", n + r));
                    let log = dir.join(format!("worker-{r}.log"));
                    let out = std::fs::File::create(&log)
                        .with_context(|| format!("creating {}", log.display()))?;
                    let child = Command::new(bin)
                        .args(["--plan", &plan_path.display().to_string()])
                        .args(["--synthetic-weights", &weights_seed.to_string()])
                        .args(["--node", &r.to_string(), "--gpus-per-node", "1"])
                        .args(["--device", &dev])
                        // Each worker binds free ports itself and reports them: ports picked
                        // here and released before the worker binds them can be taken meanwhile.
                        .args(["--listen", "127.0.0.1:0"])
                        .args(["--metrics-listen", "127.0.0.1:0"])
                        .args(["--admin-listen", "127.0.0.1:0"])
                        .args(["--addresses-file", &addr_file.display().to_string()])
                        .args(["--previous-plan-grace-seconds", "0"])
                        // Prefill-sized layers send one rank hundreds of MB at once.
                        .args(["--max-frame-bytes", &MAX_FRAME_BYTES.to_string()])
                        .args(["--max-inflight-bytes", &(4 * MAX_FRAME_BYTES).to_string()])
                        .env("MOE_ADMIN_TOKEN", TOKEN)
                        .stdin(Stdio::null())
                        .stdout(out.try_clone()?)
                        .stderr(out)
                        .spawn()
                        .with_context(|| {
                            format!(
                                "starting {} (build it with `cargo build --bin moe-worker`, or give --worker-bin)",
                                bin.display()
                            )
                        })?;
                    pool.children.push(child);
                    pool.logs.push(log);
                    addr_files.push(addr_file);
                }
                // Synthetic weights of a large model take a while to generate and upload.
                let deadline = Instant::now() + Duration::from_secs(900);
                for (r, addr_file) in addr_files.iter().enumerate() {
                    loop {
                        if let Some(status) = pool.children[r].try_wait()? {
                            anyhow::bail!(
                                "the worker of rank {r} exited ({status}) before it was ready; its log {}:\n{}",
                                pool.logs[r].display(),
                                log_tail(&pool.logs[r])
                            );
                        }
                        // Written once the worker listens and serves its start-up plan.
                        if let Some(a) = BoundAddresses::read(addr_file)? {
                            let ready = pool
                                .client
                                .ready(
                                    &a.metrics.ip().to_string(),
                                    a.metrics.port(),
                                    Duration::from_secs(2),
                                )
                                .await;
                            if ready {
                                pool.dispatch.push(a.dispatch.to_string());
                                pool.admin.push((a.admin.ip().to_string(), a.admin.port()));
                                break;
                            }
                        }
                        if Instant::now() > deadline {
                            anyhow::bail!(
                                "the worker of rank {r} was not ready within 900 s; its log {}:\n{}",
                                pool.logs[r].display(),
                                log_tail(&pool.logs[r])
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        Ok(pool)
    }

    /// Pushes a served plan to every worker (each answers once it serves it).
    pub async fn apply(&self, plan: &ExpertPlan) -> anyhow::Result<()> {
        let json = serde_json::to_vec(plan)?;
        for (r, (host, port)) in self.admin.iter().enumerate() {
            self.client
                .put_plan(host, *port, TOKEN, &json, Duration::from_secs(900))
                .await
                .with_context(|| format!("pushing plan {} to rank {r}", plan.short_hash()))?;
        }
        Ok(())
    }

    /// Stops the workers this pool started.
    pub async fn shutdown(mut self) {
        for h in self.handles.drain(..) {
            h.shutdown().await;
        }
        for c in &mut self.children {
            // SIGTERM lets the worker shut down cleanly; kill() is the fallback.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in &mut self.children {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        for c in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn ms(s: &StepStats) -> StepMs {
    StepMs {
        p50: s.p50 * 1e3,
        p90: s.p90 * 1e3,
        p99: s.p99 * 1e3,
        mean: s.mean * 1e3,
    }
}

/// Figures of a load generator run.
pub fn measured_from(report: &LoadgenReport) -> Measured {
    let compute_seconds = if report.served_tokens_per_second > 0.0 {
        report.tokens as f64 / report.served_tokens_per_second
    } else {
        0.0
    };
    Measured {
        batches: report.batches,
        tokens: report.tokens,
        rows: report.rows,
        compute_seconds,
        wall_seconds: report.wall_seconds,
        step_ms: ms(&report.step_seconds),
        layers: report
            .layers
            .iter()
            .map(|l| LayerResult {
                layer: l.layer,
                step_ms: ms(&l.step_seconds),
                observed_balancedness: l.balancedness,
            })
            .collect(),
        observed_balancedness: report.balancedness,
        rank_rows: Vec::new(),
    }
}

/// Serves `plan` on the pool and drives it with the load generator (warm-up first, own draws).
pub async fn run_workers(
    pool: &WorkerPool,
    plan: &ExpertPlan,
    window: &LoadWindow,
    cfg: &RunConfig,
) -> anyhow::Result<Measured> {
    let served = served_plan(plan);
    pool.apply(&served).await?;
    let mut lg = LoadgenConfig::new(served, pool.dispatch.clone(), window.clone());
    lg.tokens_per_batch = cfg.tokens_per_batch;
    lg.hidden_pool = cfg.hidden_pool;
    lg.dispatch = cfg.dispatch;
    if cfg.warmup > 0 {
        lg.batches = cfg.warmup;
        lg.seed = cfg.seed ^ WARMUP_SEED_XOR;
        run_loadgen(&lg).await.context("warm-up batches")?;
    }
    lg.batches = cfg.batches;
    lg.seed = cfg.seed;
    let timer = cfg.max_seconds.map(|secs| {
        let stop = Arc::new(AtomicBool::new(false));
        lg.stop = Some(stop.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    });
    let report = run_loadgen(&lg).await;
    if let Some(t) = timer {
        t.abort();
    }
    let report = report?;
    if report.failed_requests > 0 || report.non_finite_outputs > 0 {
        anyhow::bail!(
            "{} failed requests and {} non-finite outputs on plan {}: {:?}",
            report.failed_requests,
            report.non_finite_outputs,
            plan.short_hash(),
            report.errors
        );
    }
    Ok(measured_from(&report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_shows_the_error_not_the_backtrace() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("worker-0.log");
        let mut text = String::from("INFO starting\nError: binding --listen 127.0.0.1:1\n\nCaused by:\n    Address in use\n\nStack backtrace:\n");
        for i in 0..40 {
            text.push_str(&format!("  {i}: frame\n"));
        }
        std::fs::write(&log, text).unwrap();
        let tail = log_tail(&log);
        assert!(tail.contains("Error: binding --listen"), "{tail}");
        assert!(tail.contains("Address in use"), "{tail}");
        assert!(!tail.contains("frame"), "{tail}");
    }
}
