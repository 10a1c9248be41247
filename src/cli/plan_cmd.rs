//! `moectl plan`, `evaluate` and `compare`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use crate::charts::{self, Heatmap, Series};
use crate::plan::balance::{evaluate as replay, Evaluation, LayerMatrix, ReplayScratch};
use crate::plan::craft::CraftOptions;
use crate::plan::load_formats::read_load_file;
use crate::plan::planner::{make_plan, Budget, PlanRequest, DEFAULT_AUTO_MIN_GAIN};
use crate::plan::step_cost::{step_time_dispatched, CostModel, Dispatch, StepObjective};
use crate::plan::{
    parse_byte_size, Algorithm, Dtype, ExpertPlan, HashRule, LoadWindow, ModelShape, Topology,
};
use crate::text::human_bytes;

/// Model shape: from a config file, else from flags, else what the load file implies.
#[derive(Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// A HuggingFace config.json, or a ModelShape JSON (camelCase fields of the plan's `model`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Total decoder layers (default: one past the highest layer in the load).
    #[arg(long)]
    pub layers: Option<u32>,
    /// First MoE layer (default: the lowest layer in the load).
    #[arg(long)]
    pub first_moe_layer: Option<u32>,
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long)]
    pub hidden_size: Option<u64>,
    #[arg(long)]
    pub intermediate_size: Option<u64>,
    /// bf16 or fp8.
    #[arg(long)]
    pub dtype: Option<String>,
}

impl ModelArgs {
    pub fn resolve(&self, window: &LoadWindow) -> anyhow::Result<ModelShape> {
        let mut m = match &self.model {
            Some(path) => read_model_file(path)?,
            None => shape_from_window(window),
        };
        ShapeOverrides {
            layers: self.layers,
            first_moe_layer: self.first_moe_layer,
            top_k: self.top_k,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            dtype: self.dtype.as_deref(),
        }
        .apply(&mut m)?;
        Ok(m)
    }
}

/// The shape a load trace implies when no model is given: its layers and experts, top-8, and an
/// unknown expert size (replica bytes then need the size flags).
pub fn shape_from_window(window: &LoadWindow) -> ModelShape {
    let ids = window.layer_ids();
    ModelShape {
        layers: ids.iter().max().map_or(1, |x| x + 1),
        first_moe_layer: ids.iter().min().copied().unwrap_or(0),
        experts: window.experts() as u32,
        top_k: 8.min(window.experts() as u32),
        hidden_size: 0,
        expert_intermediate_size: 0,
        dtype: Dtype::Bf16,
    }
}

/// Shape flags given on the command line, applied over a model file, preset or trace.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShapeOverrides<'a> {
    pub layers: Option<u32>,
    pub first_moe_layer: Option<u32>,
    pub top_k: Option<u32>,
    pub hidden_size: Option<u64>,
    pub intermediate_size: Option<u64>,
    pub dtype: Option<&'a str>,
}

impl ShapeOverrides<'_> {
    pub fn apply(&self, m: &mut ModelShape) -> anyhow::Result<()> {
        if let Some(x) = self.layers {
            m.layers = x;
        }
        if let Some(x) = self.first_moe_layer {
            m.first_moe_layer = x;
        }
        if let Some(x) = self.top_k {
            m.top_k = x;
        }
        if let Some(x) = self.hidden_size {
            m.hidden_size = x;
        }
        if let Some(x) = self.intermediate_size {
            m.expert_intermediate_size = x;
        }
        if let Some(d) = self.dtype {
            m.dtype = match d.to_ascii_lowercase().as_str() {
                "bf16" | "bfloat16" => Dtype::Bf16,
                "fp8" | "fp8_e4m3" | "float8_e4m3fn" => Dtype::Fp8,
                other => bail!("--dtype {other:?}: expected bf16 or fp8"),
            };
        }
        Ok(())
    }
}

/// A model shape file: our own `ModelShape` JSON, or a HuggingFace `config.json`.
pub fn read_model_file(path: &Path) -> anyhow::Result<ModelShape> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    if v.get("expertIntermediateSize").is_some() {
        return serde_json::from_value(v)
            .with_context(|| format!("{}: not a model shape", path.display()));
    }
    crate::plan::model::from_hf_config(&v).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[derive(Args, Debug, Clone)]
pub struct BudgetArgs {
    /// Extra expert slots per GPU, summed over layers (R).
    #[arg(long, group = "budget_form")]
    pub replicas_per_gpu: Option<u32>,
    /// Replica memory per GPU, e.g. 2GiB or 512Mi.
    #[arg(long, group = "budget_form")]
    pub memory_per_gpu: Option<String>,
    /// `auto`: the knee of balancedness against replica memory.
    #[arg(long, group = "budget_form")]
    pub budget: Option<String>,
}

impl BudgetArgs {
    fn resolve(&self) -> anyhow::Result<Budget> {
        if let Some(r) = self.replicas_per_gpu {
            return Ok(Budget::ReplicasPerGpu(r));
        }
        if let Some(m) = &self.memory_per_gpu {
            return Ok(Budget::MemoryPerGpu(
                parse_byte_size(m).map_err(|e| anyhow::anyhow!("--memory-per-gpu: {e}"))?,
            ));
        }
        match self.budget.as_deref() {
            None => Ok(Budget::ReplicasPerGpu(0)),
            Some("auto") => Ok(Budget::Auto {
                min_gain_per_replica: DEFAULT_AUTO_MIN_GAIN,
            }),
            Some(other) => bail!("--budget {other:?}: the only named budget is `auto`"),
        }
    }
}

/// Planner variants, for measuring each improvement on its own.
#[derive(Args, Debug, Clone, Default)]
pub struct VariantArgs {
    /// Split an expert's tokens evenly over its replicas (the paper) instead of balancing GPUs.
    #[arg(long)]
    pub even_shares: bool,
    /// Skip the local search on the final placement.
    #[arg(long)]
    pub no_local_search: bool,
    /// Expert groups for EPLB's hierarchical policy (default: 1, the global policy).
    #[arg(long)]
    pub eplb_groups: Option<usize>,
    /// What CRAFT's per-layer replica counts maximise: `balancedness` (the paper), or
    /// `step-time` saved by the cost model at `--step-tokens` (docs/planner.md).
    #[arg(long, default_value = "balancedness")]
    pub objective: Objective,
}

/// CRAFT's objective (`--objective`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Objective {
    #[default]
    Balancedness,
    StepTime,
}

impl VariantArgs {
    /// The planner's options; `step` (the cost model and tokens per step) is required for the
    /// step-time objective.
    fn options(
        &self,
        model: &ModelShape,
        step: Option<(CostModel, f64)>,
    ) -> anyhow::Result<CraftOptions> {
        let step = match (self.objective, step) {
            (Objective::Balancedness, _) => None,
            (Objective::StepTime, Some((cost, tokens_per_step))) => Some(StepObjective {
                cost,
                tokens_per_step,
                model: model.clone(),
            }),
            (Objective::StepTime, None) => {
                bail!("--objective step-time needs --step-tokens (the tokens per step to plan for)")
            }
        };
        Ok(CraftOptions {
            balanced_shares: !self.even_shares,
            local_search: !self.no_local_search,
            step,
            ..CraftOptions::default()
        })
    }
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Load file: SGLang expert distribution, OLMoE/Mixtral routing counts, or a moe-load-trace.
    #[arg(long)]
    pub load: PathBuf,
    #[arg(long)]
    pub gpus: usize,
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    #[arg(long, default_value = "craft")]
    pub algo: Algorithm,
    #[command(flatten)]
    pub budget: BudgetArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub variant: VariantArgs,
    #[command(flatten)]
    pub step: StepArgs,
    /// The plan in force: replicas that stay on a GPU keep their slot.
    #[arg(long)]
    pub previous: Option<PathBuf>,
    #[arg(long, short)]
    pub out: PathBuf,
    /// Also draw per-layer x per-GPU load before (no replication) and after this plan.
    #[arg(long)]
    pub heatmap: Option<PathBuf>,
    /// Also write the plan as this engine's expert layout (sglang or vllm; `moectl export` does
    /// the same for a plan already written), to `--emit-out`.
    #[arg(long, requires = "emit_out")]
    pub emit: Option<crate::plan::engines::Engine>,
    #[arg(long, requires = "emit")]
    pub emit_out: Option<PathBuf>,
}

fn load(path: &Path) -> anyhow::Result<LoadWindow> {
    read_load_file(path).map_err(|e| anyhow::anyhow!("{e}"))
}

/// A plan file through the one checked reader ([`ExpertPlan::read_file_checked`]). `hash` says
/// whether a hand-written plan without a hash is acceptable here.
pub fn read_plan(path: &Path, hash: HashRule) -> anyhow::Result<ExpertPlan> {
    ExpertPlan::read_file_checked(path, hash)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub fn plan(a: PlanArgs) -> anyhow::Result<()> {
    let window = load(&a.load)?;
    let model = a.model.resolve(&window)?;
    let topology =
        Topology::new(a.gpus, a.nodes).map_err(|e| anyhow::anyhow!("--gpus/--nodes: {e}"))?;
    // The previous plan's hash is recorded in the transition: it must be the sealed one in force.
    let previous = a
        .previous
        .as_deref()
        .map(|p| read_plan(p, HashRule::Required))
        .transpose()?;
    let req = PlanRequest {
        algorithm: a.algo,
        model: model.clone(),
        topology,
        budget: a.budget.resolve()?,
        eplb_groups: a.variant.eplb_groups,
        craft: a.variant.options(&model, a.step.resolve()?)?,
    };
    let t = Instant::now();
    let plan = make_plan(&req, &window, previous.as_ref())?;
    let took = t.elapsed();
    let json = serde_json::to_string_pretty(&plan)?;
    std::fs::write(&a.out, json + "\n").with_context(|| format!("writing {}", a.out.display()))?;
    let stats = plan.stats.as_ref().expect("plans carry stats");
    println!(
        "{} plan {} written to {}: R = {} ({} per GPU), balancedness {:.4} (vLLM form {:.4}), planned in {:.1} ms",
        plan.algorithm,
        plan.short_hash(),
        a.out.display(),
        plan.replicas_per_gpu,
        human_bytes(plan.replica_bytes_per_gpu),
        stats.balancedness,
        stats.balancedness_vllm,
        took.as_secs_f64() * 1e3
    );
    if let Some(t) = &plan.transition {
        let experts: u64 = t.per_gpu.iter().map(|g| g.experts_to_load).sum();
        let worst = t.per_gpu.iter().map(|g| g.bytes_to_load).max().unwrap_or(0);
        println!(
            "from {}: {experts} experts to load in all, at most {} on one GPU",
            &t.previous_hash[..t.previous_hash.len().min(12)],
            human_bytes(worst)
        );
    }
    if let Some(path) = &a.heatmap {
        let mut none_req = req.clone();
        none_req.algorithm = Algorithm::None;
        none_req.budget = Budget::ReplicasPerGpu(0);
        let before = make_plan(&none_req, &window, None)?;
        let svg = charts::heatmaps_svg(&[
            heatmap_panel("before: contiguous, no replicas", &before, &window),
            heatmap_panel(
                &format!("after: {} R={}", plan.algorithm, plan.replicas_per_gpu),
                &plan,
                &window,
            ),
        ])
        .map_err(anyhow::Error::msg)?;
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
        println!("heatmap written to {}", path.display());
    }
    if let (Some(engine), Some(out)) = (a.emit, &a.emit_out) {
        let (file, r) = export_plan(&plan, engine, Some(&window))?;
        std::fs::write(out, serde_json::to_string(&file)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        print_export(&plan, out, &r);
    }
    Ok(())
}

/// Per-layer x per-GPU window load under a plan, relative to each layer's mean.
pub fn heatmap_panel(title: &str, plan: &ExpertPlan, window: &LoadWindow) -> Heatmap {
    let d = plan.gpus as usize;
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    let mut scratch = ReplayScratch::default();
    for (wl, &id) in window.layer_ids().iter().enumerate() {
        let Some(lp) = plan.layers.iter().find(|l| l.layer == id) else {
            continue;
        };
        let m = LayerMatrix::from_window(window, wl);
        let loads = scratch.gpu_loads(&m, d, crate::plan::balance::plan_replicas(lp));
        let per_gpu: Vec<f64> = (0..d)
            .map(|g| {
                loads[g * m.batches..(g + 1) * m.batches]
                    .iter()
                    .map(|&x| x as f64)
                    .sum()
            })
            .collect();
        let mean = per_gpu.iter().sum::<f64>() / d as f64;
        rows.push(
            per_gpu
                .iter()
                .map(|x| if mean > 0.0 { x / mean } else { 1.0 })
                .collect(),
        );
        labels.push(id.to_string());
    }
    Heatmap {
        title: title.to_string(),
        row_labels: labels,
        values: rows,
    }
}

/// The step-time model's inputs (`docs/planner.md`, "Step time").
#[derive(Args, Debug, Clone)]
pub struct StepArgs {
    /// Also predict the step time of the MoE layers at this many tokens per step (e.g. a decode
    /// batch of 256, or a prefill chunk of 16384), from the cost model.
    #[arg(long)]
    pub step_tokens: Option<f64>,
    /// Cost model JSON (`moectl calibrate` writes it); default: one H200, bf16.
    #[arg(long, requires = "step_tokens")]
    pub cost_model: Option<PathBuf>,
    /// How the predicted step splits a replicated expert's rows: the plan's `shares`, or `step`,
    /// the per-batch dispatch that minimises the cost model (`plan::dispatch`).
    #[arg(long, default_value = "shares", requires = "step_tokens")]
    pub dispatch: Dispatch,
}

impl StepArgs {
    /// The cost model and tokens per step, when a step time is asked for.
    pub fn resolve(&self) -> anyhow::Result<Option<(CostModel, f64)>> {
        let Some(t) = self.step_tokens else {
            return Ok(None);
        };
        if !(t.is_finite() && t > 0.0) {
            anyhow::bail!("--step-tokens {t}: give a positive number of tokens");
        }
        let cost = crate::plan::step_cost::read_cost_model(self.cost_model.as_deref())
            .map_err(anyhow::Error::msg)?;
        Ok(Some((cost, t)))
    }
}

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// JSON of `benches/gpu/expert_ffn.py` (our kernels timed on the target GPU).
    #[arg(long)]
    pub bench_json: PathBuf,
    /// The GPU's measured copy bandwidth, bytes/s: the fit stays at or below it.
    #[arg(long, default_value_t = crate::plan::step_cost::H200_COPY_BYTES_PER_S)]
    pub max_bandwidth: f64,
    /// Write the cost model here (for `--cost-model`); default: print it.
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
}

/// Fit the step-time cost model to measured kernel times and say how well it predicts each.
pub fn calibrate(a: CalibrateArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.bench_json)
        .with_context(|| format!("reading {}", a.bench_json.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not JSON", a.bench_json.display()))?;
    let samples = crate::plan::step_cost::samples_from_bench_json(&doc)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.bench_json.display()))?;
    if samples.is_empty() {
        anyhow::bail!("{}: no rows to fit", a.bench_json.display());
    }
    if !(a.max_bandwidth.is_finite() && a.max_bandwidth > 0.0) {
        anyhow::bail!("--max-bandwidth {}: give bytes per second", a.max_bandwidth);
    }
    let (c, worst) = crate::plan::step_cost::fit(&samples, a.max_bandwidth);
    println!(
        "launch {:.1} us, {:.2} TB/s, {:.0} TFLOP/s; worst row off by {:.0}%",
        c.launch_s * 1e6,
        c.bytes_per_s / 1e12,
        c.flops_per_s / 1e12,
        worst * 100.0
    );
    println!(
        "{:>6} {:>6} {:>5} {:>8} {:>11} {:>11}",
        "H", "I", "E", "rows", "measured ms", "model ms"
    );
    for s in &samples {
        println!(
            "{:>6} {:>6} {:>5} {:>8} {:>11.3} {:>11.3}",
            s.shape.hidden_size,
            s.shape.expert_intermediate_size,
            s.shape.experts,
            s.rows.iter().sum::<f64>(),
            s.seconds * 1e3,
            c.rank_s(s.rows.iter().copied(), &s.shape) * 1e3
        );
    }
    let json = serde_json::to_string_pretty(&c)?;
    match &a.out {
        Some(p) => {
            std::fs::write(p, json + "\n").with_context(|| format!("writing {}", p.display()))?;
            println!("cost model written to {}", p.display());
        }
        None => println!("{json}"),
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    #[arg(long)]
    pub plan: PathBuf,
    /// Load to replay; may differ from the one the plan was made from (how stale plans are judged).
    #[arg(long)]
    pub load: PathBuf,
    #[command(flatten)]
    pub step: StepArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn evaluate(a: EvaluateArgs) -> anyhow::Result<()> {
    // Plans written by hand to try a placement need no hash; one that has a hash must match it.
    let plan = read_plan(&a.plan, HashRule::MayBeEmpty)?;
    let window = load(&a.load)?;
    let ev = replay(&plan, &window).map_err(|e| anyhow::anyhow!("{}: {e}", a.load.display()))?;
    let step = match a.step.resolve()? {
        Some((cost, tokens)) => Some(
            step_time_dispatched(
                &plan,
                &window.with_layers(&ev_layer_ids(&ev))?,
                &cost,
                tokens,
                a.step.dispatch,
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", a.load.display()))?,
        ),
        None => None,
    };
    if a.json {
        let mut v = serde_json::to_value(&ev)?;
        if let Some(s) = &step {
            v["step"] = serde_json::to_value(s)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_evaluation(&plan, &ev);
    if let Some(s) = step {
        println!(
            "step time at {} tokens per step (MoE layers, cost model): {:.3} ms; bound {:.3} ms",
            s.tokens_per_step,
            s.step_s * 1e3,
            s.ideal_step_s * 1e3
        );
    }
    Ok(())
}

/// The layer ids an evaluation replayed (the plan's layers the window holds).
fn ev_layer_ids(ev: &Evaluation) -> Vec<u32> {
    ev.layers.iter().map(|l| l.layer).collect()
}

fn print_evaluation(plan: &ExpertPlan, ev: &Evaluation) {
    println!(
        "plan {} ({}, R = {}, {} replica memory per GPU) on {} batches",
        plan.short_hash(),
        plan.algorithm,
        plan.replicas_per_gpu,
        human_bytes(plan.replica_bytes_per_gpu),
        ev.batches
    );
    println!(
        "{:>6} {:>14} {:>10} {:>9} {:>8}",
        "layer", "balancedness", "vLLM form", "max/mean", "extra"
    );
    for l in &ev.layers {
        println!(
            "{:>6} {:>14.4} {:>10.4} {:>9.3} {:>8}",
            l.layer, l.balancedness, l.balancedness_vllm, l.max_over_mean, l.extra_replicas
        );
    }
    println!(
        "{:>6} {:>14.4} {:>10.4} {:>9.3}",
        "all", ev.balancedness, ev.balancedness_vllm, ev.max_over_mean
    );
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    #[arg(long)]
    pub load: PathBuf,
    #[arg(long)]
    pub gpus: usize,
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Replica budgets R (extra slots per GPU) to try for CRAFT.
    #[arg(long, value_delimiter = ',', default_value = "0,2,4,8,16,32")]
    pub budgets: Vec<u32>,
    /// Algorithms to compare.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,placement,eplb,craft-reference,craft"
    )]
    pub algos: Vec<Algorithm>,
    /// Fraction of batches held out for evaluation (plans never see them); 0 evaluates in-sample.
    #[arg(long, default_value_t = 0.5)]
    pub holdout: f64,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub variant: VariantArgs,
    /// Write the chart of balancedness against replica memory per GPU.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub step: StepArgs,
    /// Print JSON rows instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One cell of the comparison.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompareRow {
    pub algorithm: String,
    pub replicas_per_gpu: u32,
    pub replica_bytes_per_gpu: u64,
    pub balancedness: f64,
    pub balancedness_vllm: f64,
    pub plan_ms: f64,
    /// Predicted step time of the MoE layers (`--step-tokens`), held-out batches, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_ms: Option<f64>,
}

/// Split a window into the batches plans see and those they are judged on.
pub fn split_holdout(window: &LoadWindow, holdout: f64) -> (LoadWindow, LoadWindow) {
    let b = window.batches();
    if b < 2 || holdout <= 0.0 {
        return (window.clone(), window.clone());
    }
    let test = ((b as f64 * holdout).round() as usize).clamp(1, b - 1);
    (
        window.slice_batches(0..b - test),
        window.slice_batches(b - test..b),
    )
}

/// How [`compare_rows`] judges the plans: the held-out fraction, and the step-time model with
/// its tokens per step when a step time is asked for.
pub struct Judge {
    pub holdout: f64,
    pub step: Option<(CostModel, f64)>,
    pub dispatch: Dispatch,
}

pub fn compare_rows(
    window: &LoadWindow,
    model: &ModelShape,
    topology: Topology,
    budgets: &[u32],
    algos: &[Algorithm],
    variant: &VariantArgs,
    judge: Judge,
) -> anyhow::Result<Vec<CompareRow>> {
    let Judge {
        holdout,
        step,
        dispatch,
    } = judge;
    let (train, test) = split_holdout(window, holdout);
    let moe_layers = model.moe_layers();
    let mut rows = Vec::new();
    for &algo in algos {
        let rs: Vec<u32> = match algo {
            Algorithm::None | Algorithm::Placement => vec![0],
            // EPLB replicates uniformly: one and two redundant experts per GPU in every layer.
            Algorithm::Eplb => vec![moe_layers, 2 * moe_layers],
            Algorithm::Craft | Algorithm::CraftReference => budgets.to_vec(),
        };
        for r in rs {
            let req = PlanRequest {
                algorithm: algo,
                model: model.clone(),
                topology,
                budget: Budget::ReplicasPerGpu(r),
                eplb_groups: variant.eplb_groups,
                craft: variant.options(model, step)?,
            };
            let t = Instant::now();
            let plan =
                make_plan(&req, &train, None).with_context(|| format!("{algo} at R = {r}"))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let ev = replay(&plan, &test).map_err(anyhow::Error::msg)?;
            let step_ms = match &step {
                Some((cost, tokens)) => Some(
                    step_time_dispatched(
                        &plan,
                        &test.with_layers(&ev_layer_ids(&ev))?,
                        cost,
                        *tokens,
                        dispatch,
                    )
                    .map_err(anyhow::Error::msg)?
                    .step_s
                        * 1e3,
                ),
                None => None,
            };
            rows.push(CompareRow {
                algorithm: algo.to_string(),
                replicas_per_gpu: plan.replicas_per_gpu,
                replica_bytes_per_gpu: plan.replica_bytes_per_gpu,
                balancedness: ev.balancedness,
                balancedness_vllm: ev.balancedness_vllm,
                plan_ms: ms,
                step_ms,
            });
        }
    }
    Ok(rows)
}

pub fn compare(a: CompareArgs) -> anyhow::Result<()> {
    let window = load(&a.load)?;
    let model = a.model.resolve(&window)?;
    let topology =
        Topology::new(a.gpus, a.nodes).map_err(|e| anyhow::anyhow!("--gpus/--nodes: {e}"))?;
    let step = a.step.resolve()?;
    let judge = Judge {
        holdout: a.holdout,
        step,
        dispatch: a.step.dispatch,
    };
    let rows = compare_rows(
        &window, &model, topology, &a.budgets, &a.algos, &a.variant, judge,
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        let (train, test) = split_holdout(&window, a.holdout);
        println!(
            "{} batches: plans made on {}, judged on {}{}",
            window.batches(),
            train.batches(),
            test.batches(),
            if window.batches() < 2 {
                " (in-sample: the load has one batch)"
            } else {
                ""
            }
        );
        println!(
            "{:<16} {:>4} {:>14} {:>13} {:>10} {:>10}{}",
            "algorithm",
            "R",
            "replica mem",
            "balancedness",
            "vLLM form",
            "plan ms",
            step.map_or(String::new(), |(_, t)| format!(
                " {:>16}",
                format!("step ms @{t}")
            ))
        );
        for r in &rows {
            println!(
                "{:<16} {:>4} {:>14} {:>13.4} {:>10.4} {:>10.1}{}",
                r.algorithm,
                r.replicas_per_gpu,
                human_bytes(r.replica_bytes_per_gpu),
                r.balancedness,
                r.balancedness_vllm,
                r.plan_ms,
                r.step_ms.map_or(String::new(), |s| format!(" {s:>16.3}"))
            );
        }
    }
    if let Some(path) = &a.plot {
        let use_bytes = model.bytes_per_expert() > 0;
        let mut series: Vec<Series> = Vec::new();
        for r in &rows {
            let x = if use_bytes {
                r.replica_bytes_per_gpu as f64 / (1u64 << 30) as f64
            } else {
                r.replicas_per_gpu as f64
            };
            match series.iter_mut().find(|s| s.name == r.algorithm) {
                Some(s) => s.points.push((x, r.balancedness)),
                None => series.push(Series {
                    name: r.algorithm.clone(),
                    points: vec![(x, r.balancedness)],
                }),
            }
        }
        let x_label = if use_bytes {
            "replica memory per GPU (GiB)"
        } else {
            "replica slots per GPU (R)"
        };
        let svg = charts::line_chart_svg(
            "balancedness against replica memory",
            x_label,
            "balancedness",
            &series,
        )
        .map_err(anyhow::Error::msg)?;
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
        println!("chart written to {}", path.display());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The plan (as `moectl plan` or the plan ConfigMap writes it).
    #[arg(long)]
    pub plan: PathBuf,
    /// sglang (`--init-expert-location`) or vllm (`eplb_config.initial_expert_map_path`).
    #[arg(long)]
    pub engine: crate::plan::engines::Engine,
    /// Where the engine's layout goes (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// A load to choose padding replicas by and to predict the layout's balancedness on (the one
    /// the plan was made from, or a later one).
    #[arg(long)]
    pub load: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `moectl export` reports besides the file.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportReport {
    #[serde(flatten)]
    pub export: crate::plan::engines::Export,
    /// On `--load`: the plan as planned (its own shares), and the layout under the engine's even
    /// split (what the engine will see).
    pub plan_balancedness: Option<f64>,
    pub layout_balancedness: Option<f64>,
}

/// The engine layout of `plan` and its report; pure apart from nothing (the caller writes).
pub fn export_plan(
    plan: &ExpertPlan,
    engine: crate::plan::engines::Engine,
    window: Option<&LoadWindow>,
) -> anyhow::Result<(serde_json::Value, ExportReport)> {
    use crate::plan::engines;
    let totals: Option<Vec<(u32, Vec<f64>)>> = window.map(|w| {
        w.layer_ids()
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, w.layer_totals(i)))
            .collect()
    });
    let weight = |layer: u32, e: u32| {
        totals
            .as_ref()
            .and_then(|t| t.iter().find(|(id, _)| *id == layer))
            .and_then(|(_, v)| v.get(e as usize).copied())
            .unwrap_or(1.0)
    };
    let w: &dyn Fn(u32, u32) -> f64 = &weight;
    let (file, export) = engines::export(engine, plan, Some(w))?;
    let (mut pb, mut lb) = (None, None);
    if let Some(win) = window {
        let layout = engines::check_layout(engine, &plan.model, plan.gpus, &file)?;
        pb = Some(replay(plan, win)?.balancedness);
        lb = Some(replay(&engines::as_plan(plan, &layout), win)?.balancedness);
    }
    Ok((
        file,
        ExportReport {
            export,
            plan_balancedness: pb,
            layout_balancedness: lb,
        },
    ))
}

pub fn export(a: ExportArgs) -> anyhow::Result<()> {
    let plan = read_plan(&a.plan, HashRule::MayBeEmpty)?;
    let window = a.load.as_deref().map(load).transpose()?;
    let (file, r) = export_plan(&plan, a.engine, window.as_ref())?;
    std::fs::write(&a.out, serde_json::to_string(&file)? + "\n")
        .with_context(|| format!("writing {}", a.out.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    print_export(&plan, &a.out, &r);
    Ok(())
}

fn print_export(plan: &ExpertPlan, out: &Path, r: &ExportReport) {
    let e = &r.export;
    println!(
        "{} layout of plan {} ({}, R = {}) written to {}",
        e.engine,
        plan.short_hash(),
        plan.algorithm,
        plan.replicas_per_gpu,
        out.display()
    );
    println!(
        "  {} physical experts per MoE layer ({} per GPU, {} redundant)",
        e.physical_experts, e.slots_per_gpu, e.redundant_experts
    );
    if e.padded_slots == 0 {
        println!("  the plan fits the engine as it is: no slot added");
    } else {
        println!(
            "  the engine keeps {} experts per GPU in every layer: {} slots added to the plan's {} ({} more expert memory on the fullest GPU); replica memory per GPU {} against the plan's {}",
            e.slots_per_gpu,
            e.padded_slots,
            e.plan_slots,
            human_bytes(e.padded_bytes_per_gpu),
            human_bytes(e.layout_replica_bytes_per_gpu),
            human_bytes(e.plan_replica_bytes_per_gpu)
        );
        let base = plan.model.experts.div_ceil(plan.gpus);
        let r_eplb = (e.slots_per_gpu - base) * plan.model.moe_layers();
        println!(
            "  what the engine holds without padding at the same memory: moectl plan --algo eplb --replicas-per-gpu {r_eplb} ({} redundant experts in every layer)",
            e.redundant_experts
        );
    }
    if let (Some(p), Some(l)) = (r.plan_balancedness, r.layout_balancedness) {
        println!("  balancedness on the load: plan {p:.4}, engine layout (even split) {l:.4}");
    }
    println!("  engine flags:");
    for f in &e.flags {
        println!("    {f}");
    }
}
