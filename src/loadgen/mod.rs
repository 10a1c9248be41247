//! `moectl loadgen`: the router side of serving, for tests, benchmarks and the demo.
//!
//! Per batch and MoE layer it draws each token's top-k distinct experts from the trace's per-batch
//! counts for that layer (the window's batches taken cyclically), picks a replica of each by the
//! plan's shares, sends every rank its rows over the dispatch protocol (one connection per rank, to
//! the worker of the rank's node), and waits for all replies before the next layer: the
//! expert-parallel barrier, so the slowest GPU sets the pace as it does in production.
//!
//! Hidden vectors are drawn (seeded) from a pool of random bf16 vectors, so that building frames
//! does not dominate the router's time at large hidden sizes.
//!
//! Every connect, write and read has a deadline ([`LoadgenConfig::io_timeout`], `--timeout`): a
//! worker that accepts and never answers ends the run with an error naming it, not a hang. A reply
//! may be no larger than the request it answers needs.

pub mod route;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use half::bf16;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::plan::step_cost::{CostModel, Dispatch};
use crate::plan::{ExpertPlan, HashRule, LoadWindow};
use crate::worker::protocol::{
    decode_reply_ref, encode_request_into, read_frame_into, ReplyRef, HEADER_LEN,
    MAX_ERROR_MESSAGE, SHAPE_LEN,
};
use route::{
    balancedness, hidden_pool, layer_pickers, percentile, LayerRouter, ReplicaPicker, RoutedRow,
    TopKSampler,
};

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadgenConfig {
    pub plan: ExpertPlan,
    /// One dispatch address (`host:port`) per node, node order.
    pub workers: Vec<String>,
    pub window: LoadWindow,
    pub batches: usize,
    pub tokens_per_batch: usize,
    pub seed: u64,
    /// Random hidden vectors to draw from.
    pub hidden_pool: usize,
    /// Largest reply frame accepted (a reply is also refused past what its request needs).
    pub max_frame_bytes: usize,
    /// Deadline of every connect, request write and reply read.
    pub io_timeout: Duration,
    /// When set (by another task), the run ends after the batch in progress.
    pub stop: Option<Arc<AtomicBool>>,
    /// Split replicated experts' rows per batch by the step-time dispatch with this cost model,
    /// instead of token by token by the plan's shares.
    pub dispatch: Option<CostModel>,
}

impl LoadgenConfig {
    pub fn new(plan: ExpertPlan, workers: Vec<String>, window: LoadWindow) -> Self {
        Self {
            plan,
            workers,
            window,
            batches: 100,
            tokens_per_batch: 1024,
            seed: 0,
            hidden_pool: 64,
            max_frame_bytes: 1 << 30,
            io_timeout: DEFAULT_IO_TIMEOUT,
            stop: None,
            dispatch: None,
        }
    }
}

/// Default of [`LoadgenConfig::io_timeout`]: far above any layer step of the workers we run
/// (milliseconds on GPUs, under a second on CPU workers), far below "is it hung?".
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest reply frame that can answer a request of `rows` x `hidden`: the output, or an error.
fn reply_limit(rows: usize, hidden: usize) -> usize {
    let output =
        (HEADER_LEN + SHAPE_LEN).saturating_add(rows.saturating_mul(hidden).saturating_mul(4));
    let error = HEADER_LEN + 8 + MAX_ERROR_MESSAGE;
    output.max(error)
}

/// Step-time percentiles of one layer (or all layers), seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepStats {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

impl StepStats {
    /// Percentiles and mean of unsorted samples (0 for none).
    pub fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let mean = if samples.is_empty() {
            0.0
        } else {
            samples.iter().sum::<f64>() / samples.len() as f64
        };
        Self {
            p50: percentile(&samples, 0.5),
            p90: percentile(&samples, 0.9),
            p99: percentile(&samples, 0.99),
            mean,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerReport {
    /// Model layer index.
    pub layer: u32,
    pub step_seconds: StepStats,
    /// Mean over batches of mean_g / max_g of the rows per GPU.
    pub balancedness: f64,
    pub rows: u64,
}

/// What a run measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadgenReport {
    pub plan_hash: String,
    pub workers: usize,
    pub ranks: u32,
    /// Batches run (fewer than asked when stopped early).
    pub batches: usize,
    pub tokens_per_batch: usize,
    pub top_k: u32,
    /// Tokens through every MoE layer (batches x tokens per batch).
    pub tokens: u64,
    /// Rows sent (token, expert pairs, all layers).
    pub rows: u64,
    pub wall_seconds: f64,
    /// Tokens over the wall time, the router's own work included.
    pub tokens_per_second: f64,
    /// Tokens over the summed barrier steps only (what the workers sustained).
    pub served_tokens_per_second: f64,
    /// One layer step: from the first request sent to the last reply received.
    pub step_seconds: StepStats,
    /// Mean over layers of the per-layer balancedness (../shared/CRAFT.md's definition, on rows per GPU).
    pub balancedness: f64,
    pub failed_requests: u64,
    /// The first few error replies.
    pub errors: Vec<String>,
    pub non_finite_outputs: u64,
    pub layers: Vec<LayerReport>,
    /// Rows sent per MoE layer (plan order) and logical expert.
    pub expert_rows: Vec<Vec<u64>>,
}

impl LoadgenReport {
    /// Human-readable table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "plan {}  workers {}  ranks {}  batches {}  tokens/batch {}  top-k {}\n\
             tokens/s {:.0} (served {:.0})  rows {}  wall {:.3} s  balancedness {:.4}  failed requests {}\n\
             {:>6} {:>10} {:>10} {:>10} {:>10} {:>13}\n",
            &self.plan_hash[..self.plan_hash.len().min(12)],
            self.workers,
            self.ranks,
            self.batches,
            self.tokens_per_batch,
            self.top_k,
            self.tokens_per_second,
            self.served_tokens_per_second,
            self.rows,
            self.wall_seconds,
            self.balancedness,
            self.failed_requests,
            "layer",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "rows",
            "balancedness",
        );
        let mut line = |name: String, st: &StepStats, rows: u64, bal: f64| {
            s.push_str(&format!(
                "{name:>6} {:>10.3} {:>10.3} {:>10.3} {rows:>10} {bal:>13.4}\n",
                st.p50 * 1e3,
                st.p90 * 1e3,
                st.p99 * 1e3
            ));
        };
        for l in &self.layers {
            line(l.layer.to_string(), &l.step_seconds, l.rows, l.balancedness);
        }
        line(
            "all".into(),
            &self.step_seconds,
            self.rows,
            self.balancedness,
        );
        for e in &self.errors {
            s.push_str(&format!("error: {e}\n"));
        }
        s
    }
}

/// Errors that stop a run (error replies do not: they are counted in the report).
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("worker {addr} (rank {rank}): {message}")]
    Worker {
        addr: String,
        rank: u32,
        message: String,
    },
}

/// One rank's connection, with its request and reply buffers reused layer after layer.
struct RankConn {
    rank: u32,
    addr: String,
    stream: BufReader<TcpStream>,
    request: Vec<u8>,
    reply: Vec<u8>,
}

impl RankConn {
    fn fail(&self, message: impl Into<String>) -> LoadgenError {
        LoadgenError::Worker {
            addr: self.addr.clone(),
            rank: self.rank,
            message: message.into(),
        }
    }

    /// Sends the encoded `request` and reads the reply frame into `reply`.
    async fn call(
        &mut self,
        max: usize,
        timeout: Duration,
        layer: u32,
    ) -> Result<(), LoadgenError> {
        let secs = timeout.as_secs_f64();
        let sent = tokio::time::timeout(timeout, self.stream.get_mut().write_all(&self.request));
        sent.await
            .map_err(|_| {
                self.fail(format!(
                    "sending the layer {layer} request ({} bytes) timed out after {secs} s: the worker \
                     is not reading (raise --timeout if it is only slow)",
                    self.request.len()
                ))
            })?
            .map_err(|e| self.fail(format!("sending: {e}")))?;
        let read = read_frame_into(&mut self.stream, max, &mut self.reply);
        let got = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| {
                self.fail(format!(
                    "no reply to the layer {layer} request within {secs} s: the worker accepted \
                     the request but did not answer (raise --timeout if it is only slow)"
                ))
            })?
            .map_err(|e| self.fail(format!("reading the reply: {e}")))?;
        if !got {
            return Err(self.fail("the worker closed the connection"));
        }
        Ok(())
    }
}

/// For each plan layer, the window layer whose counts drive it: by model layer id, or by position
/// when the trace numbers its MoE layers differently but has as many.
pub fn layer_map(plan: &ExpertPlan, window: &LoadWindow) -> Result<Vec<usize>, LoadgenError> {
    let by_id: Option<Vec<usize>> = plan
        .layers
        .iter()
        .map(|lp| window.layer_ids().iter().position(|&id| id == lp.layer))
        .collect();
    match by_id {
        Some(m) => Ok(m),
        None if window.layers() == plan.layers.len() => Ok((0..plan.layers.len()).collect()),
        None => Err(LoadgenError::Config(format!(
            "the load trace has layers {:?} but the plan has layers {:?}: give a trace of the same model",
            window.layer_ids(),
            plan.layers.iter().map(|l| l.layer).collect::<Vec<_>>()
        ))),
    }
}

/// Drive the workers with the trace's load; see the module documentation.
pub async fn run_loadgen(cfg: &LoadgenConfig) -> Result<LoadgenReport, LoadgenError> {
    // Bounded and consistent before anything is sized by it (pickers, per-expert counters).
    let plan = &cfg
        .plan
        .clone()
        .checked(HashRule::Required)
        .map_err(|e| LoadgenError::Config(format!("plan: {e}")))?;
    if cfg.io_timeout.is_zero() {
        return Err(LoadgenError::Config(
            "the I/O timeout must be more than 0 s".into(),
        ));
    }
    let experts = plan.model.experts as usize;
    if cfg.window.experts() != experts {
        return Err(LoadgenError::Config(format!(
            "the load trace has {} experts per layer, the plan's model {experts}",
            cfg.window.experts()
        )));
    }
    if cfg.workers.len() != plan.nodes as usize {
        return Err(LoadgenError::Config(format!(
            "{} worker addresses for a plan of {} nodes: give one --workers address per node, in node order",
            cfg.workers.len(),
            plan.nodes
        )));
    }
    if plan.layers.is_empty() {
        return Err(LoadgenError::Config("the plan has no MoE layers".into()));
    }
    let layer_of = layer_map(plan, &cfg.window)?;
    let d = plan.gpus as usize;
    let per_node = d / plan.nodes as usize;
    let hidden = plan.model.hidden_size as usize;
    let top_k = plan.model.top_k as usize;
    let h32 = u32::try_from(hidden)
        .map_err(|_| LoadgenError::Config("hidden size exceeds u32".into()))?;

    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let pool_n = cfg.hidden_pool.max(1);
    let pool: Vec<bf16> = hidden_pool(&mut rng, pool_n, hidden);
    let pickers: Vec<ReplicaPicker> = layer_pickers(plan, cfg.dispatch);

    let mut conns: Vec<Option<RankConn>> = Vec::with_capacity(d);
    for rank in 0..d as u32 {
        let addr = cfg.workers[rank as usize / per_node].clone();
        let fail = |message: String| LoadgenError::Worker {
            addr: addr.clone(),
            rank,
            message,
        };
        let stream = tokio::time::timeout(cfg.io_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| {
                fail(format!(
                    "connecting timed out after {} s",
                    cfg.io_timeout.as_secs_f64()
                ))
            })?
            .map_err(|e| fail(format!("connecting: {e}")))?;
        let _ = stream.set_nodelay(true);
        conns.push(Some(RankConn {
            rank,
            addr,
            stream: BufReader::with_capacity(256 << 10, stream),
            request: Vec::new(),
            reply: Vec::new(),
        }));
    }

    let n_layers = plan.layers.len();
    let mut step_samples: Vec<Vec<f64>> = vec![Vec::with_capacity(cfg.batches.min(4096)); n_layers];
    let mut bal_sum = vec![0.0f64; n_layers];
    let mut bal_n = vec![0u64; n_layers];
    let mut expert_rows = vec![vec![0u64; experts]; n_layers];
    let mut failed_requests = 0u64;
    let mut errors = Vec::new();
    let mut non_finite_outputs = 0u64;
    let mut rows_total = 0u64;
    let mut served_seconds = 0.0f64;
    let mut request_id = 0u64;
    let mut router = LayerRouter::default();
    let mut rows: Vec<Vec<RoutedRow>> = vec![Vec::new(); d];
    let started = Instant::now();

    let mut batches_done = 0;
    for b in 0..cfg.batches {
        if cfg.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
        batches_done += 1;
        for (li, lp) in plan.layers.iter().enumerate() {
            let sampler = TopKSampler::new(cfg.window.row(b % cfg.window.batches(), layer_of[li]));
            // check() guarantees every expert has a replica.
            router.route(
                &mut rng,
                &sampler,
                &pickers[li],
                top_k,
                cfg.tokens_per_batch,
                pool_n as u32,
                &mut rows,
                &mut expert_rows[li],
            );
            let counts: Vec<u64> = rows.iter().map(|r| r.len() as u64).collect();
            rows_total += counts.iter().sum::<u64>();
            if let Some(bal) = balancedness(&counts) {
                bal_sum[li] += bal;
                bal_n[li] += 1;
            }

            let mut set = JoinSet::new();
            let step_start = Instant::now();
            for (g, grows) in rows.iter().enumerate() {
                if grows.is_empty() {
                    continue;
                }
                request_id += 1;
                let mut conn = conns[g]
                    .take()
                    .expect("connection is back from the previous layer");
                encode_request_into(
                    &mut conn.request,
                    request_id,
                    g as u32,
                    lp.layer,
                    h32,
                    grows.iter().map(|&(e, w, x)| {
                        let at = x as usize * hidden;
                        (e, w, &pool[at..at + hidden])
                    }),
                );
                let (id, n_rows) = (request_id, grows.len() as u32);
                let max = reply_limit(grows.len(), hidden).min(cfg.max_frame_bytes);
                let (timeout, layer) = (cfg.io_timeout, lp.layer);
                set.spawn(async move {
                    let called = conn.call(max, timeout, layer).await;
                    (conn, id, n_rows, called)
                });
            }
            let mut first_error = None;
            while let Some(joined) = set.join_next().await {
                let (conn, id, n_rows, called) =
                    joined.map_err(|e| LoadgenError::Config(format!("router task: {e}")))?;
                let reply = called.and_then(|()| {
                    decode_reply_ref(&conn.reply)
                        .map_err(|e| conn.fail(format!("bad reply frame: {e}")))
                });
                match reply {
                    Ok(ReplyRef::Output(o)) => {
                        if o.request_id != id
                            || o.rows != n_rows
                            || o.hidden_size != h32
                            || o.bytes.len() != n_rows as usize * hidden * 4
                        {
                            first_error.get_or_insert(conn.fail(format!(
                                "reply {} with {} rows x {} does not answer request {id} of {n_rows} rows x {hidden}",
                                o.request_id, o.rows, o.hidden_size
                            )));
                        }
                        non_finite_outputs += o.values().filter(|v| !v.is_finite()).count() as u64;
                    }
                    Ok(ReplyRef::Error(e)) => {
                        failed_requests += 1;
                        if errors.len() < 10 {
                            errors.push(format!(
                                "rank {} layer {}: {} ({})",
                                conn.rank,
                                lp.layer,
                                e.message,
                                e.code.as_str()
                            ));
                        }
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
                let g = conn.rank as usize;
                conns[g] = Some(conn);
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            let step = step_start.elapsed().as_secs_f64();
            served_seconds += step;
            step_samples[li].push(step);
        }
    }
    let wall = started.elapsed();
    let tokens = (batches_done as u64).saturating_mul(cfg.tokens_per_batch as u64);
    let layers: Vec<LayerReport> = plan
        .layers
        .iter()
        .enumerate()
        .map(|(li, lp)| LayerReport {
            layer: lp.layer,
            step_seconds: StepStats::of(step_samples[li].clone()),
            balancedness: if bal_n[li] > 0 {
                bal_sum[li] / bal_n[li] as f64
            } else {
                0.0
            },
            rows: expert_rows[li].iter().sum(),
        })
        .collect();
    let balancedness = layers.iter().map(|l| l.balancedness).sum::<f64>() / n_layers as f64;
    let per_sec = |secs: f64| {
        if secs > 0.0 {
            tokens as f64 / secs
        } else {
            0.0
        }
    };
    Ok(LoadgenReport {
        plan_hash: plan.hash.clone(),
        workers: cfg.workers.len(),
        ranks: plan.gpus,
        batches: batches_done,
        tokens_per_batch: cfg.tokens_per_batch,
        top_k: plan.model.top_k,
        tokens,
        rows: rows_total,
        wall_seconds: wall.as_secs_f64(),
        tokens_per_second: per_sec(wall.as_secs_f64()),
        served_tokens_per_second: per_sec(served_seconds),
        step_seconds: StepStats::of(step_samples.into_iter().flatten().collect()),
        balancedness,
        failed_requests,
        errors,
        non_finite_outputs,
        layers,
        expert_rows,
    })
}

/// `moectl loadgen` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadgenArgs {
    /// Plan JSON (what `moectl plan` writes and the workers serve).
    #[arg(long)]
    pub plan: PathBuf,
    /// Dispatch addresses of the workers, one per node in node order: HOST:PORT,HOST:PORT,...
    #[arg(long, value_delimiter = ',', required = true)]
    pub workers: Vec<String>,
    /// Load trace whose per-batch counts drive the routing.
    #[arg(long)]
    pub load: PathBuf,
    /// Batches to send.
    #[arg(long, default_value_t = 100)]
    pub batches: usize,
    /// Tokens per batch.
    #[arg(long, default_value_t = 1024)]
    pub tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Seconds each connect, request write and reply read may take before the run fails.
    #[arg(long, default_value_t = DEFAULT_IO_TIMEOUT.as_secs_f64(), value_name = "SECONDS")]
    pub timeout: f64,
    /// How a replicated expert's rows are split between its replicas: by the plan's `shares`,
    /// token by token, or per batch by `step`, the dispatch the cost model prefers
    /// (docs/planner.md, "Per-batch dispatch").
    #[arg(long, default_value = "shares")]
    pub dispatch: Dispatch,
    /// Cost model JSON for `--dispatch step` (`moectl calibrate`); default: one H200, bf16.
    #[arg(long)]
    pub cost_model: Option<PathBuf>,
}

impl LoadgenArgs {
    /// The run configuration, with the plan read from `--plan` and the trace already parsed
    /// (the caller reads `--load` with the trace parsers of `crate::plan`).
    pub fn config(&self, window: LoadWindow) -> anyhow::Result<LoadgenConfig> {
        // The workers serve sealed plans; a plan whose hash does not match is not the one they hold.
        let plan =
            ExpertPlan::read_file_checked(&self.plan, HashRule::Required).with_context(|| {
                format!(
                    "reading plan file {} as a plan document",
                    self.plan.display()
                )
            })?;
        if !(self.timeout.is_finite() && self.timeout > 0.0 && self.timeout <= 1e6) {
            anyhow::bail!(
                "--timeout {}: expected seconds, more than 0 and at most 1e6",
                self.timeout
            );
        }
        let mut cfg = LoadgenConfig::new(plan, self.workers.clone(), window);
        cfg.batches = self.batches;
        cfg.tokens_per_batch = self.tokens;
        cfg.seed = self.seed;
        cfg.io_timeout = Duration::from_secs_f64(self.timeout);
        if self.cost_model.is_some() && self.dispatch == Dispatch::Shares {
            anyhow::bail!(
                "--cost-model is read by --dispatch step only: add it, or drop --cost-model"
            );
        }
        cfg.dispatch = match self.dispatch {
            Dispatch::Shares => None,
            Dispatch::Step => Some(
                crate::plan::step_cost::read_cost_model(self.cost_model.as_deref())
                    .map_err(anyhow::Error::msg)?,
            ),
        };
        Ok(cfg)
    }

    /// Run and print the report (table or JSON) to stdout.
    pub async fn run(&self, window: LoadWindow) -> anyhow::Result<LoadgenReport> {
        let cfg = self.config(window)?;
        let report = run_loadgen(&cfg).await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.table());
        }
        Ok(report)
    }

    /// [`LoadgenArgs::run`] on a runtime of its own, for a synchronous `main`.
    pub fn run_blocking(&self, window: LoadWindow) -> anyhow::Result<LoadgenReport> {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(self.run(window))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    #[test]
    fn args_parse_and_read_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let plan = dir.path().join("plan.json");
        let cli = Cli::try_parse_from([
            "loadgen",
            "--plan",
            plan.to_str().unwrap(),
            "--workers",
            "10.0.0.1:9400,10.0.0.2:9400",
            "--load",
            "trace.json",
            "--batches",
            "7",
            "--tokens",
            "256",
            "--seed",
            "3",
            "--json",
        ])
        .unwrap();
        let a = cli.args;
        assert_eq!(a.workers, vec!["10.0.0.1:9400", "10.0.0.2:9400"]);
        assert_eq!((a.batches, a.tokens, a.seed, a.json), (7, 256, 3, true));
        assert!(Cli::try_parse_from(["loadgen", "--plan", "p", "--load", "l"]).is_err());

        let window = LoadWindow::new(vec![0], 2, vec![1.0, 1.0]).unwrap();
        let e = a.config(window.clone()).unwrap_err();
        assert!(format!("{e:#}").contains("plan.json"), "{e:#}");
        std::fs::write(&plan, "not json").unwrap();
        let e = a.config(window.clone()).unwrap_err();
        assert!(format!("{e:#}").contains("as a plan document"), "{e:#}");
        assert_eq!(a.timeout, DEFAULT_IO_TIMEOUT.as_secs_f64());

        // The plan goes through the checked reader: a sealed plan edited afterwards is refused.
        let mut p = one_rank_plan(64);
        std::fs::write(&plan, serde_json::to_vec(&p).unwrap()).unwrap();
        let cfg = a.config(window.clone()).unwrap();
        assert_eq!(cfg.io_timeout, DEFAULT_IO_TIMEOUT);
        p.replicas_per_gpu += 1;
        std::fs::write(&plan, serde_json::to_vec(&p).unwrap()).unwrap();
        let e = a.config(window).unwrap_err();
        assert!(format!("{e:#}").contains("hashes to"), "{e:#}");
    }

    /// A sealed plan of one MoE layer with two experts on one GPU.
    fn one_rank_plan(hidden: u64) -> ExpertPlan {
        use crate::plan::planner::{make_plan, Budget, PlanRequest};
        use crate::plan::{Algorithm, Dtype, ModelShape, Topology};
        let req = PlanRequest {
            algorithm: Algorithm::None,
            model: ModelShape {
                layers: 1,
                first_moe_layer: 0,
                experts: 2,
                top_k: 1,
                hidden_size: hidden,
                expert_intermediate_size: 16,
                dtype: Dtype::Bf16,
            },
            topology: Topology::new(1, 1).unwrap(),
            budget: Budget::ReplicasPerGpu(0),
            eplb_groups: None,
            craft: Default::default(),
        };
        let w = LoadWindow::new(vec![0], 2, vec![1.0, 1.0]).unwrap();
        make_plan(&req, &w, None).unwrap()
    }

    /// A worker that accepts connections and never reads or answers; keeps them open until the
    /// returned task is aborted.
    async fn silent_worker() -> (String, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        (addr, task)
    }

    async fn run_against_silent_worker(hidden: u64, tokens: usize) -> (String, Duration) {
        let (addr, task) = silent_worker().await;
        let window = LoadWindow::new(vec![0], 2, vec![1.0, 1.0]).unwrap();
        let mut cfg = LoadgenConfig::new(one_rank_plan(hidden), vec![addr.clone()], window);
        cfg.batches = 1;
        cfg.tokens_per_batch = tokens;
        cfg.io_timeout = Duration::from_millis(300);
        let t = Instant::now();
        // The outer deadline only keeps a regression from hanging the test suite.
        let r = tokio::time::timeout(Duration::from_secs(20), run_loadgen(&cfg))
            .await
            .expect("loadgen hung against a worker that never answers");
        task.abort();
        let e = r.expect_err("a worker that never answers cannot give a report");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("worker {addr} (rank 0): ")),
            "{msg}"
        );
        (msg, t.elapsed())
    }

    #[tokio::test]
    async fn a_worker_that_never_answers_times_out() {
        // Before: the run waited for the reply forever.
        let (msg, took) = run_against_silent_worker(64, 16).await;
        assert!(
            msg.contains("no reply to the layer 0 request within 0.3 s"),
            "{msg}"
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test]
    async fn a_worker_that_never_reads_times_out() {
        // 4096 rows x 8192 bf16 = 64 MiB: more than the socket buffers hold, so the write blocks.
        let (msg, took) = run_against_silent_worker(8192, 4096).await;
        assert!(msg.contains("sending the layer 0 request"), "{msg}");
        assert!(msg.contains("timed out after 0.3 s"), "{msg}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[test]
    fn replies_are_bounded_by_their_request() {
        assert_eq!(reply_limit(0, 4096), HEADER_LEN + 8 + MAX_ERROR_MESSAGE);
        assert_eq!(reply_limit(10, 4096), 32 + 10 * 4096 * 4);
        assert_eq!(reply_limit(usize::MAX, 2), usize::MAX);
    }
}
