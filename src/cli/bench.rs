//! `moectl bench policies` (the policy throughput testbed) and `moectl bench trace` (a seeded
//! skewed trace for it). The testbed itself is `crate::bench`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::bench::emulate::{run_emulated, CpuExec, CudaExec, RankExec, RunConfig};
use crate::bench::ranks::{
    d2d_copy_seconds, markdown, rank_main, result, run_emulated_sources, run_rank_processes,
    RankJob,
};
use crate::bench::workers::{run_workers, served_plan, Launch, WorkerPool};
use crate::bench::{
    first_moe_layers, fit_window, policy_specs, preset, BenchReport, Mode, PolicyResult, Regime,
    SCHEMA,
};
use crate::plan::craft::CraftOptions;
use crate::plan::load_formats::{read_load_file, synthetic_window, to_trace_json};
use crate::plan::planner::{make_plan, moe_layer_ids, Budget, PlanRequest};
use crate::plan::{Dtype, ExpertPlan, LoadWindow, ModelShape, Topology};
use crate::worker::checkpoint::synthetic::HashedWeights;
use crate::worker::checkpoint::WeightSource;
use crate::worker::device::DeviceSpec;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Plan each replication policy, run real expert compute on it under the same routed load,
    /// and report tokens/s, step times, balancedness and replica memory per GPU.
    Policies(Box<PoliciesArgs>),
    /// The pre-registered step-time benchmark: declared policies, several seeds, mean and spread.
    Steptime(Box<super::bench_steptime::SteptimeArgs>),
    /// Write a seeded skewed load trace (moe-load-trace/v1) of any shape.
    Trace(TraceArgs),
    /// One rank process of `bench policies --mode ranks` (started by it).
    #[command(hide = true)]
    EpRank(EpRankArgs),
}

#[derive(Args, Debug)]
pub struct EpRankArgs {
    #[arg(long)]
    pub job: PathBuf,
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.command {
        BenchCommand::Policies(p) => policies(&p).map(|_| ()),
        BenchCommand::Steptime(s) => super::bench_steptime::steptime(&s),
        BenchCommand::Trace(t) => trace(&t),
        BenchCommand::EpRank(r) => {
            crate::worker::runtime::init_logging(false);
            let b =
                std::fs::read(&r.job).with_context(|| format!("reading {}", r.job.display()))?;
            let job: RankJob = serde_json::from_slice(&b).context("the rank job")?;
            rank_main(&job)
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct PoliciesArgs {
    /// Load trace whose per-batch counts drive the routing (and the plans).
    #[arg(long)]
    pub load: PathBuf,
    /// How replicated experts' rows are split: the plans' `shares`, or per batch by `step`, the
    /// dispatch the default cost model prefers (docs/planner.md).
    #[arg(long, default_value = "shares")]
    pub dispatch: crate::plan::step_cost::Dispatch,
    /// A HuggingFace config.json or a ModelShape JSON.
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A named shape: qwen3-30b-a3b or deepseek-v3.
    #[arg(long)]
    pub preset: Option<String>,
    /// Decoder layers in all, with the shape flags (default: from the trace).
    #[arg(long)]
    pub model_layers: Option<u32>,
    #[arg(long)]
    pub first_moe_layer: Option<u32>,
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long)]
    pub hidden_size: Option<u64>,
    #[arg(long)]
    pub intermediate_size: Option<u64>,
    /// bf16 or fp8 (replica memory; compute is bf16 either way).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Plan and run only the model's first K MoE layers (a subset of a large model).
    #[arg(long)]
    pub layers: Option<u32>,
    /// EP ranks (D).
    #[arg(long)]
    pub gpus: usize,
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// CRAFT budgets: extra expert slots per GPU summed over layers (R).
    #[arg(long, value_delimiter = ',', default_value = "8,16")]
    pub budgets: Vec<u32>,
    /// cpu or cuda:N (workers mode: rank r on cuda:N+r).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, value_enum, default_value_t = Mode::Emulated)]
    pub mode: Mode,
    /// Tokens per batch; several (comma-separated) run one after another on the same weights.
    #[arg(long, value_delimiter = ',')]
    pub tokens: Vec<usize>,
    /// decode (16 tokens per expert) or prefill (256): sets --tokens; may be a list.
    #[arg(long, value_enum, value_delimiter = ',', conflicts_with = "tokens")]
    pub regime: Vec<Regime>,
    /// Measured batches per policy.
    #[arg(long, default_value_t = 20)]
    pub batches: usize,
    /// Unmeasured batches per policy first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Routing seed, the same for every policy (and the same draws as `moectl loadgen --seed`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seed of the synthetic expert weights.
    #[arg(long, default_value_t = 0)]
    pub weights_seed: u64,
    /// Stop measuring a policy after this many seconds (at least one batch).
    #[arg(long)]
    pub max_seconds_per_policy: Option<f64>,
    /// Results JSON (with several token sizes, one file per size: NAME-LABEL.json).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Also write the table in Markdown.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Workers mode: the moe-worker binary (default: next to this moectl).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// Workers and ranks modes: directory for plans and logs (default: a temporary one).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Ranks mode: the GPU transport, ipc (all ranks on --device) or nccl (rank r on cuda:N+r).
    #[arg(long, default_value = "ipc")]
    pub transport: String,
    /// Ranks mode: run the ranks once per value, 1 (one exchange pair a layer) or 2 (two
    /// pipelined micro-batches), on the same draws and plans.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub micro_batches: Vec<usize>,
    /// Run only these policies (none, placement, eplb, craft); default all.
    #[arg(long, value_delimiter = ',')]
    pub policies: Vec<String>,
}

impl PoliciesArgs {
    /// The model shape: preset, file or flags, then the flags on top.
    fn model(&self, window: &LoadWindow) -> anyhow::Result<ModelShape> {
        let mut m = if let Some(name) = &self.preset {
            preset(name).map_err(anyhow::Error::msg)?
        } else if let Some(path) = &self.model {
            super::plan_cmd::read_model_file(path)?
        } else {
            super::plan_cmd::shape_from_window(window)
        };
        super::plan_cmd::ShapeOverrides {
            layers: self.model_layers,
            first_moe_layer: self.first_moe_layer,
            top_k: self.top_k,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            dtype: self.dtype.as_deref(),
        }
        .apply(&mut m)?;
        if m.hidden_size == 0 || m.expert_intermediate_size == 0 {
            bail!("the expert shape is unknown: give --preset, --model config.json, or --hidden-size and --intermediate-size");
        }
        if m.experts as usize != window.experts() {
            bail!(
                "{}: the trace has {} experts per layer but the model {}: give a trace of this model (moectl bench trace --experts {})",
                self.load.display(),
                window.experts(),
                m.experts,
                m.experts
            );
        }
        if m.top_k == 0 || m.top_k > m.experts || m.first_moe_layer >= m.layers {
            bail!(
                "inconsistent model: top-k {} of {} experts, MoE layers {}..{}",
                m.top_k,
                m.experts,
                m.first_moe_layer,
                m.layers
            );
        }
        Ok(m)
    }

    /// (label, tokens per batch, regime) of each run.
    fn runs(&self, model: &ModelShape) -> anyhow::Result<Vec<(String, usize, Option<Regime>)>> {
        let runs: Vec<_> = if !self.tokens.is_empty() {
            self.tokens
                .iter()
                .map(|&t| (format!("t{t}"), t, None))
                .collect()
        } else {
            self.regime
                .iter()
                .map(|&r| (r.as_str().to_string(), r.tokens_per_batch(model), Some(r)))
                .collect()
        };
        if runs.is_empty() {
            bail!("give --tokens T (tokens per batch) or --regime decode|prefill");
        }
        if let Some((_, t, _)) = runs.iter().find(|r| r.1 == 0) {
            bail!("--tokens {t}: must be at least 1");
        }
        Ok(runs)
    }
}

/// `results.json` for one run, `results-LABEL.json` when there are several.
fn labelled(path: &Path, label: &str, several: bool) -> PathBuf {
    if !several {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("results");
    let name = match path.extension().and_then(|e| e.to_str()) {
        Some(ext) => format!("{stem}-{label}.{ext}"),
        None => format!("{stem}-{label}"),
    };
    path.with_file_name(name)
}

fn make_plans(
    model: &ModelShape,
    topology: Topology,
    budgets: &[u32],
    window: &LoadWindow,
) -> anyhow::Result<Vec<ExpertPlan>> {
    let mut plans = Vec::new();
    for spec in policy_specs(model.moe_layers(), budgets) {
        let req = PlanRequest {
            algorithm: spec.algorithm,
            model: model.clone(),
            topology,
            budget: Budget::ReplicasPerGpu(spec.replicas_per_gpu),
            eplb_groups: None,
            craft: CraftOptions::default(),
        };
        let t = Instant::now();
        let plan = make_plan(&req, window, None).with_context(|| {
            format!(
                "planning {} with R = {}",
                spec.algorithm, spec.replicas_per_gpu
            )
        })?;
        eprintln!(
            "planned {:<9} R = {:>3}: predicted balancedness {:.4}, {:.1} MiB of replicas per GPU ({:.1} s)",
            plan.algorithm.to_string(),
            plan.replicas_per_gpu,
            plan.stats.as_ref().map_or(0.0, |s| s.balancedness),
            plan.replica_bytes_per_gpu as f64 / (1u64 << 20) as f64,
            t.elapsed().as_secs_f64()
        );
        plans.push(plan);
    }
    Ok(plans)
}

/// Runs the testbed; returns one report per token size (also written to `--out`).
pub fn policies(a: &PoliciesArgs) -> anyhow::Result<Vec<BenchReport>> {
    let trace = read_load_file(&a.load).map_err(|e| anyhow::anyhow!("{e}"))?;
    let full = a.model(&trace)?;
    let model = match a.layers {
        Some(k) => first_moe_layers(&full, k).map_err(anyhow::Error::msg)?,
        None => full.clone(),
    };
    let runs = a.runs(&model)?;
    let topology =
        Topology::new(a.gpus, a.nodes).map_err(|e| anyhow::anyhow!("--gpus/--nodes: {e}"))?;
    let (window, trace_note) =
        fit_window(&trace, &moe_layer_ids(&model)).map_err(anyhow::Error::msg)?;
    let mut plans = make_plans(&model, topology, &a.budgets, &window)?;
    if !a.policies.is_empty() {
        plans.retain(|p| a.policies.iter().any(|n| *n == p.algorithm.to_string()));
        if plans.is_empty() {
            bail!(
                "--policies {:?}: none of none, placement, eplb, craft",
                a.policies
            );
        }
    }

    let mut notes = Vec::new();
    if let Some(n) = trace_note {
        notes.push(n);
    }
    notes.push(format!(
        "weights: deterministic synthetic bf16 (seed {}), all {} MoE layers x {} experts resident ({:.2} GiB in bf16)",
        a.weights_seed,
        model.moe_layers(),
        model.experts,
        (model.moe_layers() as u64 * model.experts as u64 * 6 * model.hidden_size * model.expert_intermediate_size) as f64
            / (1u64 << 30) as f64
    ));
    if model.dtype == Dtype::Fp8 {
        notes.push("replica memory is counted in FP8 (the model's dtype), but the backends compute in bf16, so each expert's weight reads are twice its FP8 bytes".into());
    }
    notes.push("predicted balancedness: the plan's on the whole trace; observed: on the rows routed in the measured batches (same seed for every policy, so every policy sees the same token draws)".into());
    if a.warmup > 0 {
        notes.push(format!(
            "{} warm-up batch(es) per policy, with their own draws, not measured",
            a.warmup
        ));
    }

    if a.mode == Mode::Ranks {
        return ranks_mode(a, &model, &runs, &window, &plans, notes).map(|_| Vec::new());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let shape_source = |m: &ModelShape| -> Arc<dyn WeightSource> {
        Arc::new(HashedWeights::new(m.clone(), a.weights_seed))
    };
    let layer_ids = moe_layer_ids(&model);

    enum Runner {
        Emulated(Box<dyn RankExec>),
        Workers(WorkerPool),
    }
    let t = Instant::now();
    let (mut runner, device, mode_note) = match a.mode {
        Mode::Emulated => {
            let exec: Box<dyn RankExec> = match a
                .device
                .parse::<DeviceSpec>()
                .map_err(anyhow::Error::msg)?
                .resolve()
            {
                DeviceSpec::Cuda(n) => {
                    Box::new(CudaExec::new(n, shape_source(&model), &layer_ids)?)
                }
                _ => Box::new(CpuExec::new(shape_source(&model), &layer_ids)?),
            };
            let device = exec.device();
            let note = format!(
                "emulated: {} ranks on one device, layer time = slowest rank; each rank's share of a layer runs on the device in turn and is timed on its own ({}); replicas of an expert on several emulated ranks share one weight buffer (each rank's call still reads the weights it uses)",
                a.gpus,
                exec.timing()
            );
            (Runner::Emulated(exec), device, note)
        }
        Mode::Ranks => unreachable!("ranks mode returned above"),
        Mode::Workers => {
            let bin = match &a.worker_bin {
                Some(b) => b.clone(),
                None => std::env::current_exe()
                    .context("locating moectl")?
                    .with_file_name("moe-worker"),
            };
            let dir = match &a.work_dir {
                Some(d) => d.clone(),
                None => std::env::temp_dir().join(format!("moe-bench-{}", std::process::id())),
            };
            let launch = Launch::Processes {
                bin,
                device: a.device.clone(),
                weights_seed: a.weights_seed,
                dir: dir.clone(),
            };
            let pool = rt.block_on(WorkerPool::start(&launch, &served_plan(&plans[0])))?;
            let device = match a.device.parse::<DeviceSpec>() {
                Ok(DeviceSpec::Cuda(n)) => format!("cuda:{}..cuda:{}", n, n + a.gpus - 1),
                _ => "cpu".to_string(),
            };
            let note = format!(
                "workers: {} moe-worker processes, one per rank (logs in {}), driven by the load generator over TCP; a layer's step runs from its first request to its last reply (the expert-parallel barrier), dispatch, protocol and host staging included",
                a.gpus,
                dir.display()
            );
            (Runner::Workers(pool), device, note)
        }
    };
    eprintln!(
        "{} ready on {device} in {:.1} s",
        a.mode.as_str(),
        t.elapsed().as_secs_f64()
    );
    println!("{mode_note}");

    let several = runs.len() > 1;
    let mut reports = Vec::new();
    let mut failure = None;
    'runs: for (label, tokens, regime) in &runs {
        let mut cfg = RunConfig::new(a.batches, *tokens, a.seed);
        cfg.warmup = a.warmup;
        cfg.max_seconds = a.max_seconds_per_policy;
        cfg.dispatch = step_dispatch(a.dispatch);
        let mut results = Vec::new();
        for plan in &plans {
            let t = Instant::now();
            let measured = match &mut runner {
                Runner::Emulated(exec) => run_emulated(plan, &window, &cfg, exec.as_mut()),
                Runner::Workers(pool) => rt.block_on(run_workers(pool, plan, &window, &cfg)),
            };
            let measured = match measured {
                Ok(m) => m,
                Err(e) => {
                    failure = Some(e.context(format!(
                        "{label}: policy {} (R = {})",
                        plan.algorithm, plan.replicas_per_gpu
                    )));
                    break 'runs;
                }
            };
            let mut r = PolicyResult::new(plan, &measured);
            // The cost model's layer step beside the measured one (issue "8 of 10").
            r.model_layer_ms = crate::plan::step_cost::step_time_dispatched(
                plan,
                &window,
                &Default::default(),
                *tokens as f64,
                a.dispatch,
            )
            .ok()
            .map(|e| e.step_s / window.layers().max(1) as f64 * 1e3);
            eprintln!(
                "{label}: {:<9} R = {:>3}: {:.0} tokens/s, step p50 {:.3} ms, observed balancedness {:.4} ({} batches, {:.1} s)",
                r.policy,
                r.replicas_per_gpu,
                r.tokens_per_s,
                r.step_ms.p50,
                r.observed_balancedness,
                r.batches,
                t.elapsed().as_secs_f64()
            );
            results.push(r);
        }
        let report = BenchReport {
            schema: SCHEMA.into(),
            mode: a.mode,
            device: device.clone(),
            model: model.clone(),
            gpus: a.gpus as u32,
            nodes: a.nodes as u32,
            tokens_per_batch: *tokens,
            batches: a.batches,
            policies: results,
            mode_note: mode_note.clone(),
            notes: notes.clone(),
            tokens_per_expert: *tokens as f64 * model.top_k as f64 / model.experts as f64,
            regime: regime.map(|r| r.as_str().to_string()),
            seed: a.seed,
            trace: a.load.display().to_string(),
            full_model: (full != model).then(|| full.clone()),
        };
        print!("{}", report.table());
        let out = labelled(&a.out, label, several);
        std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        println!("results written to {}", out.display());
        if let Some(md) = &a.markdown {
            let md = labelled(md, label, several);
            std::fs::write(&md, report.markdown())
                .with_context(|| format!("writing {}", md.display()))?;
        }
        reports.push(report);
    }
    if let Runner::Workers(pool) = runner {
        rt.block_on(pool.shutdown());
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(reports),
    }
}

#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    #[arg(long)]
    pub layers: usize,
    #[arg(long)]
    pub experts: usize,
    #[arg(long, default_value_t = 16)]
    pub batches: usize,
    /// Tokens per batch (each counted top-k times).
    #[arg(long, default_value_t = 4096)]
    pub tokens: u64,
    #[arg(long, default_value_t = 8)]
    pub top_k: usize,
    /// Zipf-like exponent of the expert popularity (0 is uniform); see `synthetic_window`.
    #[arg(long, default_value_t = 0.3)]
    pub skew: f64,
    /// Per-batch drift of the popularity.
    #[arg(long, default_value_t = 0.3)]
    pub drift: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, short)]
    pub out: PathBuf,
}

pub fn trace(a: &TraceArgs) -> anyhow::Result<()> {
    let w = synthetic_window(
        a.layers, a.experts, a.batches, a.tokens, a.top_k, a.skew, a.drift, a.seed,
    )
    .map_err(anyhow::Error::msg)?;
    let source = format!(
        "synthetic_window(layers={}, experts={}, batches={}, tokens_per_batch={}, top_k={}, skew={}, drift={}, seed={})",
        a.layers, a.experts, a.batches, a.tokens, a.top_k, a.skew, a.drift, a.seed
    );
    std::fs::write(&a.out, to_trace_json(&w, Some(&source)))
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("trace written to {}", a.out.display());
    Ok(())
}

/// `--mode ranks`: per policy, the emulated ranks and then one process per rank on the GPU
/// transport, on the same draws; a markdown table and JSON of both.
fn ranks_mode(
    a: &PoliciesArgs,
    model: &ModelShape,
    runs: &[(String, usize, Option<Regime>)],
    window: &LoadWindow,
    plans: &[ExpertPlan],
    mut notes: Vec<String>,
) -> anyhow::Result<()> {
    let ordinal = match a.device.parse::<DeviceSpec>().map_err(anyhow::Error::msg)? {
        DeviceSpec::Cuda(n) => n,
        _ => bail!("--mode ranks runs on GPUs: give --device cuda:N"),
    };
    if !matches!(a.transport.as_str(), "ipc" | "nccl") {
        bail!("--transport {:?}: ipc or nccl", a.transport);
    }
    if a.micro_batches.is_empty() || a.micro_batches.iter().any(|m| !(1..=2).contains(m)) {
        bail!("--micro-batches {:?}: give 1, 2 or 1,2", a.micro_batches);
    }
    let exe = std::env::current_exe().context("locating moectl")?;
    let dir = match &a.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("moe-bench-ranks-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let load = std::fs::canonicalize(&a.load)?;
    let layer_ids = moe_layer_ids(model);
    let source: Arc<dyn WeightSource> = Arc::new(HashedWeights::new(model.clone(), a.weights_seed));
    let t = Instant::now();
    let mut exec = CudaExec::new(ordinal, source, &layer_ids)?;
    eprintln!(
        "emulated ranks ready on cuda:{ordinal} in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    notes.push(format!(
        "ranks: {} processes, transport {}, {}; each rank takes 1/{} of every batch's tokens, routes them, dispatches rows to the replicas' ranks, computes its experts and combines the outputs back, layer after layer (wall clock of rank 0 per step). emulated: the same shares, each timed alone on the device with CUDA events (kernels only), layer = slowest rank; serial: the same shares one after another (what one device shared by all ranks can do at best)",
        a.gpus,
        a.transport,
        if a.transport == "ipc" { format!("all on cuda:{ordinal}") } else { format!("rank r on cuda:{ordinal}+r") },
        a.gpus
    ));
    let sizes: Vec<usize> = runs.iter().map(|r| r.1).collect();
    let mut rows = Vec::new();
    for plan in plans {
        let short = plan.short_hash().to_string();
        let plan_file = dir.join(format!("plan-{short}.json"));
        std::fs::write(&plan_file, serde_json::to_string(plan)?)?;
        let mut emulated = Vec::new();
        for (label, tokens, _) in runs {
            let mut cfg = RunConfig::new(a.batches, *tokens, a.seed);
            cfg.warmup = a.warmup;
            cfg.dispatch = step_dispatch(a.dispatch);
            let (m, serial) = run_emulated_sources(plan, window, &cfg, &mut exec)
                .with_context(|| format!("{label}: emulated, policy {}", plan.algorithm))?;
            emulated.push((m, serial));
        }
        for &micro in &a.micro_batches {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let jobs: Vec<RankJob> = (0..a.gpus)
                .map(|r| RankJob {
                    session: crate::ep::session::SessionConfig {
                        rank: r,
                        world: a.gpus,
                        rendezvous: format!("127.0.0.1:{port}"),
                        listen: None,
                        transport: a.transport.clone(),
                        device: if a.transport == "nccl" {
                            ordinal + r
                        } else {
                            ordinal
                        },
                        plan: plan_file.clone(),
                        epoch: 1,
                        checkpoint: None,
                        synthetic_weights: Some(a.weights_seed),
                        rendezvous_timeout_s: 300.0,
                        step_timeout_s: 120.0,
                        micro_batches: micro,
                    },
                    load: load.clone(),
                    tokens: sizes.clone(),
                    batches: a.batches,
                    warmup: a.warmup,
                    seed: a.seed,
                    comm_repeats: 3,
                    report: dir.join(format!("rank-{r}-{short}-m{micro}.report.json")),
                })
                .collect();
            let t = Instant::now();
            let reports =
                run_rank_processes(&exe, &jobs, &dir, std::time::Duration::from_secs(900))
                    .with_context(|| {
                        format!(
                            "ranks of policy {} (logs in {})",
                            plan.algorithm,
                            dir.display()
                        )
                    })?;
            eprintln!(
                "{} ranks of {} R={} done in {:.1} s",
                a.gpus,
                plan.algorithm,
                plan.replicas_per_gpu,
                t.elapsed().as_secs_f64()
            );
            for (i, (label, tokens, _)) in runs.iter().enumerate() {
                let bytes: f64 = reports.iter().map(|r| r.runs[i].comm_bytes_per_layer).sum();
                let d2d = d2d_copy_seconds(exec.device(), bytes as usize, 10)?;
                let (m, serial) = &emulated[i];
                let r = result(plan, micro, *tokens, m, *serial, &reports, i, d2d);
                eprintln!(
                    "{label}: {} R={} micro-batches {micro}: ranks {:.0} tok/s, emulated {:.0} ({:.3}x), serial {:.0} ({:.3}x); dispatch+combine {:.3} ms vs D2D {:.3} ms",
                    r.policy, r.replicas_per_gpu, r.ranks_tokens_per_s, r.emulated_tokens_per_s, r.ranks_over_emulated,
                    r.serial_tokens_per_s, r.ranks_over_serial, r.comm_ms_per_layer, r.d2d_ms_per_layer
                );
                rows.push(r);
            }
        }
    }
    let title = format!(
        "{} ranks over {} ({} MoE layers x {} experts, H {}, I {}, top-{})",
        a.gpus,
        a.transport,
        model.moe_layers(),
        model.experts,
        model.hidden_size,
        model.expert_intermediate_size,
        model.top_k
    );
    let md = markdown(&title, &rows)
        + "\n"
        + &notes.iter().map(|n| format!("- {n}\n")).collect::<String>();
    print!("{md}");
    let json = serde_json::json!({
        "schema": "moe-bench-ranks/v1",
        "device": exec.device().name(),
        "model": model,
        "gpus": a.gpus,
        "transport": a.transport,
        "seed": a.seed,
        "notes": notes,
        "results": rows,
    });
    std::fs::write(&a.out, serde_json::to_string_pretty(&json)? + "\n")?;
    if let Some(p) = &a.markdown {
        std::fs::write(p, md)?;
    }
    Ok(())
}

/// The emulated router's cost model for `--dispatch`.
fn step_dispatch(d: crate::plan::step_cost::Dispatch) -> Option<crate::plan::step_cost::CostModel> {
    match d {
        crate::plan::step_cost::Dispatch::Shares => None,
        crate::plan::step_cost::Dispatch::Step => Some(Default::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_paths() {
        let p = Path::new("out/results.json");
        assert_eq!(labelled(p, "decode", false), p);
        assert_eq!(
            labelled(p, "decode", true),
            Path::new("out/results-decode.json")
        );
        assert_eq!(labelled(Path::new("r"), "t64", true), Path::new("r-t64"));
    }
}
