//! `moectl bench steptime`: the pre-registered step-time benchmark of issue "8 of 10". The
//! declared policies ([`crate::bench::steptime::declared`]) on seeded synthetic traces, one per
//! seed, each planned on the trace's first half and run (emulated ranks, real expert compute) on
//! draws from its second half, in every regime, in one process on one set of resident weights.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use crate::bench::emulate::{run_emulated, CpuExec, CudaExec, RankExec, RunConfig};
use crate::bench::steptime::{declared, markdown, summarise, Objective, Sample, Variant};
use crate::bench::{
    first_moe_layers, fit_window, preset, BenchReport, Mode, PolicyResult, Regime, SCHEMA,
};
use crate::plan::craft::CraftOptions;
use crate::plan::load_formats::synthetic_window;
use crate::plan::planner::{make_plan, moe_layer_ids, Budget, PlanRequest};
use crate::plan::step_cost::{step_time_dispatched, CostModel, Dispatch, StepObjective};
use crate::plan::{ExpertPlan, LoadWindow, ModelShape, Topology};
use crate::worker::checkpoint::synthetic::HashedWeights;
use crate::worker::checkpoint::WeightSource;
use crate::worker::device::DeviceSpec;

#[derive(Args, Debug, Clone)]
pub struct SteptimeArgs {
    /// A named shape: qwen3-30b-a3b or deepseek-v3.
    #[arg(long)]
    pub preset: String,
    /// Plan and run only the model's first K MoE layers (a subset of a large model).
    #[arg(long)]
    pub layers: Option<u32>,
    /// Override the shape (a test-sized dry run).
    #[arg(long)]
    pub hidden_size: Option<u64>,
    #[arg(long)]
    pub intermediate_size: Option<u64>,
    #[arg(long)]
    pub experts: Option<u32>,
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long)]
    pub gpus: usize,
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Trace seeds, one trace each; the routing draws use the same seed.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5")]
    pub seeds: Vec<u64>,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "decode,prefill"
    )]
    pub regime: Vec<Regime>,
    /// Batches in each trace: the first half plans, the second half is drawn from.
    #[arg(long, default_value_t = 16)]
    pub trace_batches: usize,
    /// Trace skew and drift (`moectl bench trace`).
    #[arg(long, default_value_t = 0.3)]
    pub skew: f64,
    #[arg(long, default_value_t = 0.3)]
    pub drift: f64,
    /// Measured batches per policy.
    #[arg(long, default_value_t = 10)]
    pub batches: usize,
    #[arg(long)]
    pub max_seconds_per_policy: Option<f64>,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Directory for the per-seed reports and the summary.
    #[arg(long, short)]
    pub out: PathBuf,
}

impl SteptimeArgs {
    fn model(&self) -> anyhow::Result<ModelShape> {
        let mut m = preset(&self.preset).map_err(anyhow::Error::msg)?;
        if let Some(h) = self.hidden_size {
            m.hidden_size = h;
        }
        if let Some(i) = self.intermediate_size {
            m.expert_intermediate_size = i;
        }
        if let Some(e) = self.experts {
            m.experts = e;
        }
        if let Some(k) = self.top_k {
            m.top_k = k;
        }
        if m.top_k == 0 || m.top_k > m.experts {
            bail!("--top-k {} of {} experts", m.top_k, m.experts);
        }
        match self.layers {
            Some(k) => first_moe_layers(&m, k).map_err(anyhow::Error::msg),
            None => Ok(m),
        }
    }
}

fn plan_variant(
    v: &Variant,
    model: &ModelShape,
    topology: Topology,
    train: &LoadWindow,
    tokens: usize,
) -> anyhow::Result<ExpertPlan> {
    let craft = CraftOptions {
        step: (v.objective == Objective::StepTime).then(|| StepObjective {
            cost: CostModel::default(),
            tokens_per_step: tokens as f64,
            model: model.clone(),
        }),
        ..CraftOptions::default()
    };
    let req = PlanRequest {
        algorithm: v.algorithm,
        model: model.clone(),
        topology,
        budget: Budget::ReplicasPerGpu(v.replicas_per_gpu),
        eplb_groups: None,
        craft,
    };
    make_plan(&req, train, None).with_context(|| format!("planning {}", v.label))
}

pub fn steptime(a: &SteptimeArgs) -> anyhow::Result<()> {
    let model = a.model()?;
    let topology =
        Topology::new(a.gpus, a.nodes).map_err(|e| anyhow::anyhow!("--gpus/--nodes: {e}"))?;
    if a.seeds.is_empty() || a.regime.is_empty() {
        bail!("give at least one --seeds and one --regime");
    }
    if a.trace_batches < 2 {
        bail!(
            "--trace-batches {}: at least 2 (half plan, half run)",
            a.trace_batches
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let ids = moe_layer_ids(&model);
    let variants = declared(model.moe_layers());
    println!(
        "declared policies (fixed before measuring):\n{}",
        serde_json::to_string_pretty(&variants)?
    );

    let source: Arc<dyn WeightSource> = Arc::new(HashedWeights::new(model.clone(), 0));
    let t = Instant::now();
    let mut exec: Box<dyn RankExec> = match a
        .device
        .parse::<DeviceSpec>()
        .map_err(anyhow::Error::msg)?
        .resolve()
    {
        DeviceSpec::Cuda(n) => Box::new(CudaExec::new(n, source, &ids)?),
        _ => Box::new(CpuExec::new(source, &ids)?),
    };
    let device = exec.device();
    eprintln!(
        "weights resident on {device} in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let mut samples = Vec::new();
    for &seed in &a.seeds {
        let trace = synthetic_window(
            model.moe_layers() as usize,
            model.experts as usize,
            a.trace_batches,
            4096,
            model.top_k as usize,
            a.skew,
            a.drift,
            seed,
        )
        .map_err(anyhow::Error::msg)?;
        let (window, _) = fit_window(&trace, &ids).map_err(anyhow::Error::msg)?;
        let (train, test) = super::plan_cmd::split_holdout(&window, 0.5);
        for regime in &a.regime {
            let tokens = regime.tokens_per_batch(&model);
            let mut results = Vec::new();
            for v in &variants {
                let plan = plan_variant(v, &model, topology, &train, tokens)?;
                let mut cfg = RunConfig::new(a.batches, tokens, seed);
                cfg.max_seconds = a.max_seconds_per_policy;
                cfg.dispatch = (v.dispatch == Dispatch::Step).then(CostModel::default);
                let t = Instant::now();
                let measured = run_emulated(&plan, &test, &cfg, exec.as_mut())
                    .with_context(|| format!("seed {seed}, {}: {}", regime.as_str(), v.label))?;
                let mut r = PolicyResult::new(&plan, &measured);
                r.model_layer_ms = step_time_dispatched(
                    &plan,
                    &test,
                    &CostModel::default(),
                    tokens as f64,
                    v.dispatch,
                )
                .ok()
                .map(|e| e.step_s / test.layers().max(1) as f64 * 1e3);
                eprintln!(
                    "seed {seed} {:<7} {:<13} R = {:>3}: {:.0} tokens/s, layer p50 {:.3} ms (model {:.3}), observed balancedness {:.4} ({} batches, {:.1} s)",
                    regime.as_str(),
                    v.label,
                    r.replicas_per_gpu,
                    r.tokens_per_s,
                    r.step_ms.p50,
                    r.model_layer_ms.unwrap_or(f64::NAN),
                    r.observed_balancedness,
                    r.batches,
                    t.elapsed().as_secs_f64()
                );
                samples.push(Sample {
                    seed,
                    regime: regime.as_str().into(),
                    label: v.label.clone(),
                    tokens_per_s: r.tokens_per_s,
                    step_p50_ms: r.step_ms.p50,
                    replica_mib_per_gpu: r.replica_mib_per_gpu,
                    model_layer_ms: r.model_layer_ms,
                    observed_balancedness: r.observed_balancedness,
                });
                r.policy = v.label.clone();
                results.push(r);
            }
            // The per-seed document `moectl serving` reads (policy = the declared label).
            let report = BenchReport {
                schema: SCHEMA.into(),
                mode: Mode::Emulated,
                device: device.clone(),
                model: model.clone(),
                gpus: a.gpus as u32,
                nodes: a.nodes as u32,
                tokens_per_batch: tokens,
                batches: a.batches,
                policies: results,
                mode_note: "emulated ranks on one device, layer time = slowest rank".into(),
                notes: vec![format!(
                    "trace: synthetic_window(seed={seed}, skew={}, drift={}, batches={}); planned on the first half, drawn from the second",
                    a.skew, a.drift, a.trace_batches
                )],
                tokens_per_expert: tokens as f64 * model.top_k as f64 / model.experts as f64,
                regime: Some(regime.as_str().into()),
                seed,
                trace: format!("synthetic seed {seed}"),
                full_model: None,
            };
            let path = a.out.join(format!("seed{seed}-{}.json", regime.as_str()));
            std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    let rows = summarise(&samples);
    let md = markdown(&rows);
    print!("{md}");
    std::fs::write(a.out.join("summary.md"), &md)?;
    std::fs::write(
        a.out.join("summary.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "device": device,
            "model": model,
            "gpus": a.gpus,
            "nodes": a.nodes,
            "seeds": a.seeds,
            "declared": variants,
            "samples": samples,
            "summary": rows,
        }))? + "\n",
    )?;
    println!("results in {}", a.out.display());
    Ok(())
}
