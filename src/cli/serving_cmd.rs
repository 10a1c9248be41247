//! `moectl serving`: the serving model of [`crate::serving`] over a `moectl bench policies`
//! results file.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::plan::parse_byte_size;
use crate::serving::{model, parse_results, render, ServingConfig};

#[derive(Args, Debug)]
pub struct ServingArgs {
    /// Results of `moectl bench policies` (moe-bench-policies/v1 JSON).
    #[arg(long)]
    pub results: PathBuf,
    /// Memory of one GPU, e.g. 141GB (H200), 80GB (H100), 139GiB.
    #[arg(long, value_parser = parse_byte_size)]
    pub gpu_memory: u64,
    /// Fraction of GPU memory the engine may use (vLLM's gpu_memory_utilization).
    #[arg(long, default_value_t = 0.9)]
    pub utilization: f64,
    /// Model weights resident on each GPU without replicas, e.g. 10.5GB (671 GB of FP8 over 64 GPUs).
    #[arg(long, value_parser = parse_byte_size)]
    pub weight_bytes_per_gpu: u64,
    /// Memory per GPU for activations, CUDA graphs and communication buffers.
    #[arg(long, value_parser = parse_byte_size, default_value = "0")]
    pub reserve: u64,
    /// KV-cache bytes per token over all layers (DeepSeek-V3 MLA at bf16: (512 + 64) x 61 x 2 = 70272).
    #[arg(long)]
    pub kv_bytes_per_token: u64,
    /// KV tokens each running sequence holds; several (comma-separated) give one table each and
    /// the average and best CRAFT/EPLB ratio over them.
    #[arg(long, value_delimiter = ',', required = true)]
    pub context_tokens: Vec<u64>,
    /// Engine cap on running sequences per GPU.
    #[arg(long)]
    pub max_batch: Option<u64>,
    /// Per-step time that does not grow with the batch (attention/dense weight reads, all-to-all latency).
    #[arg(long, default_value_t = 0.0)]
    pub step_overhead_ms: f64,
    /// HBM bandwidth per GPU in bytes/s (H200 4.8e12, H100 3.35e12): count each step's KV reads.
    #[arg(long)]
    pub hbm_bandwidth: Option<f64>,
    /// Largest acceptable time per output token; batches are cut to meet it.
    #[arg(long)]
    pub tpot_slo_ms: Option<f64>,
    /// Use the replica bytes as measured even when the results hold a layer subset.
    #[arg(long)]
    pub as_measured: bool,
    /// GitHub markdown tables instead of text.
    #[arg(long)]
    pub markdown: bool,
    /// The model's tables as JSON instead of text.
    #[arg(long, conflicts_with = "markdown")]
    pub json: bool,
}

pub fn serving(a: ServingArgs) -> anyhow::Result<()> {
    let name = a.results.display().to_string();
    let bytes = std::fs::read(&a.results).with_context(|| format!("reading {name}"))?;
    let r = parse_results(&name, &bytes).map_err(anyhow::Error::msg)?;
    if !(a.utilization > 0.0 && a.utilization <= 1.0) {
        anyhow::bail!("--utilization {} must be in (0, 1]", a.utilization);
    }
    if a.kv_bytes_per_token == 0 || a.context_tokens.contains(&0) {
        anyhow::bail!("--kv-bytes-per-token and --context-tokens must be positive");
    }
    if !(a.step_overhead_ms >= 0.0 && a.step_overhead_ms.is_finite()) {
        anyhow::bail!("--step-overhead-ms must be a non-negative number");
    }
    let tables: Vec<_> = a
        .context_tokens
        .iter()
        .map(|&c| {
            model(
                &r,
                &ServingConfig {
                    gpu_memory: a.gpu_memory,
                    utilization: a.utilization,
                    weight_bytes_per_gpu: a.weight_bytes_per_gpu,
                    reserve_bytes: a.reserve,
                    kv_bytes_per_token: a.kv_bytes_per_token,
                    context_tokens: c,
                    max_batch: a.max_batch,
                    step_overhead_ms: a.step_overhead_ms,
                    hbm_bandwidth: a.hbm_bandwidth,
                    tpot_slo_ms: a.tpot_slo_ms,
                    scale_to_full_model: !a.as_measured,
                },
            )
        })
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&tables)?);
        return Ok(());
    }
    let cfg = ServingConfig {
        gpu_memory: a.gpu_memory,
        utilization: a.utilization,
        weight_bytes_per_gpu: a.weight_bytes_per_gpu,
        reserve_bytes: a.reserve,
        kv_bytes_per_token: a.kv_bytes_per_token,
        context_tokens: a.context_tokens[0],
        max_batch: a.max_batch,
        step_overhead_ms: a.step_overhead_ms,
        hbm_bandwidth: a.hbm_bandwidth,
        tpot_slo_ms: a.tpot_slo_ms,
        scale_to_full_model: !a.as_measured,
    };
    print!("{}", render(&r, &cfg, &tables, a.markdown));
    Ok(())
}
