//! Write a seeded synthetic load trace (`moe-load-trace/v1` JSON) to stdout.
//!
//! Usage: `cargo run --example synthetic_trace -- LAYERS EXPERTS BATCHES TOKENS_PER_BATCH TOP_K SKEW DRIFT SEED`
//! See `moe_operator::plan::load_formats::synthetic_window` for the model.

use anyhow::{bail, Context, Result};
use moe_operator::plan::load_formats::{synthetic_window, to_trace_json};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 8 {
        bail!(
            "usage: synthetic_trace LAYERS EXPERTS BATCHES TOKENS_PER_BATCH TOP_K SKEW DRIFT SEED"
        );
    }
    let int = |i: usize, name: &str| -> Result<u64> {
        args[i]
            .parse()
            .with_context(|| format!("{name} must be a whole number, got {:?}", args[i]))
    };
    let float = |i: usize, name: &str| -> Result<f64> {
        args[i]
            .parse()
            .with_context(|| format!("{name} must be a number, got {:?}", args[i]))
    };
    let (layers, experts, batches) = (int(0, "LAYERS")?, int(1, "EXPERTS")?, int(2, "BATCHES")?);
    let (tokens, top_k) = (int(3, "TOKENS_PER_BATCH")?, int(4, "TOP_K")?);
    let (skew, drift, seed) = (float(5, "SKEW")?, float(6, "DRIFT")?, int(7, "SEED")?);
    let w = synthetic_window(
        layers as usize,
        experts as usize,
        batches as usize,
        tokens,
        top_k as usize,
        skew,
        drift,
        seed,
    )
    .map_err(anyhow::Error::msg)?;
    let source = format!(
        "synthetic_window(layers={layers}, experts={experts}, batches={batches}, tokens_per_batch={tokens}, \
         top_k={top_k}, skew={skew}, drift={drift}, seed={seed})"
    );
    print!("{}", to_trace_json(&w, Some(&source)));
    Ok(())
}
