//! `moectl`: plan offline, evaluate and compare plans, drive workers, inspect deployments.

pub mod bench;
mod bench_steptime;
pub mod kube_view;
pub mod kubectl;
mod observe;
mod plan_cmd;
mod serving_cmd;

use clap::{Parser, Subcommand};

pub use plan_cmd::{CompareArgs, EvaluateArgs, PlanArgs};

#[derive(Parser, Debug)]
#[command(
    name = "moectl",
    version,
    about = "Plan, evaluate and drive Mixture-of-Experts expert placement"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Compute an expert replication plan from a load file.
    Plan(PlanArgs),
    /// Replay a load file through a plan and report balancedness.
    Evaluate(EvaluateArgs),
    /// Compare algorithms across replica budgets (table and chart).
    Compare(CompareArgs),
    /// Write a plan as a serving engine's expert layout (SGLang, vLLM) and say what it changed.
    Export(plan_cmd::ExportArgs),
    /// Fit the step-time cost model (`--step-tokens`) to kernel times measured on a GPU.
    Calibrate(plan_cmd::CalibrateArgs),
    /// Scrape workers' expert-load counters into a load trace (what the operator plans from).
    Observe(observe::ObserveArgs),
    /// Write a deterministic synthetic checkpoint in a real layout (Mixtral, Qwen3-MoE, DeepSeek-V3).
    GenCheckpoint(crate::worker::checkpoint::synthetic::GenCheckpointArgs),
    /// Drive workers with routed token batches drawn from a load trace (the router side).
    Loadgen(crate::loadgen::LoadgenArgs),
    /// Policy throughput testbed (`bench policies`) and its synthetic traces (`bench trace`).
    Bench(bench::BenchArgs),
    /// Inspect MoEDeployments in a cluster (what `kubectl moe` runs): status, plan NAME, explain NAME.
    Kube(kubectl::KubeArgs),
    /// Serving model: the KV cache each policy's replica memory leaves and the goodput it implies.
    Serving(serving_cmd::ServingArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Plan(a) => plan_cmd::plan(a),
        Command::Evaluate(a) => plan_cmd::evaluate(a),
        Command::Compare(a) => plan_cmd::compare(a),
        Command::Export(a) => plan_cmd::export(a),
        Command::Calibrate(a) => plan_cmd::calibrate(a),
        Command::GenCheckpoint(a) => Ok(a.run()?),
        Command::Observe(a) => observe::observe(a),
        Command::Bench(a) => bench::run(a),
        Command::Kube(a) => kubectl::run(a),
        Command::Serving(a) => serving_cmd::serving(a),
        Command::Loadgen(a) => {
            let window = crate::plan::load_formats::read_load_file(&a.load)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            a.run_blocking(window).map(|_| ())
        }
    }
}
