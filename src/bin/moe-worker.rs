//! moe-worker: the expert runtime of one node. See `moe_operator::worker::runtime`.

use anyhow::Context;
use clap::Parser;
use moe_operator::worker::{backend_loader, runtime};

fn main() -> anyhow::Result<()> {
    let args = runtime::WorkerArgs::parse();
    runtime::init_logging(args.log_json);
    // Before any thread allocates a frame buffer.
    let heap = moe_operator::worker::heap::retain_large_buffers();
    tracing::debug!(?heap, "frame buffers kept in the heap");
    let (device, checkpoint) = (args.device.clone(), args.checkpoint.clone());
    // Synthetic weights take the model shape from the start-up plan.
    let synthetic = match args.synthetic_weights {
        Some(seed) => {
            let plan = args.plan.as_deref().context(
                "--synthetic-weights needs --plan: the weights are generated for the plan's model shape",
            )?;
            Some((seed, runtime::read_plan(plan)?.model))
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(runtime::run(args, move |local_rank| match &synthetic {
        Some((seed, shape)) => runtime::synthetic_loader(&device, shape.clone(), *seed, local_rank),
        None => backend_loader(&device, checkpoint.as_deref(), local_rank),
    }));
    // Connections still open and expert loads still running (a plan pushed just before SIGTERM)
    // must not keep the process from exiting: give them a moment, then go.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}
