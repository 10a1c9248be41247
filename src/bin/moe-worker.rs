//! moe-worker: the expert runtime of one node. See `moe_operator::worker::runtime`.

use anyhow::Context;
use clap::Parser;
use moe_operator::ep::group;
use moe_operator::worker::metrics::WorkerMetrics;
use moe_operator::worker::{backend_loader, runtime, weights};

/// Starts this worker's EP ranks next to the serving when the pod is in a group
/// (`MOE_EP_WORLD_SIZE` set): a rank failure writes `ep rank <r>: ...` to the termination message
/// and exits the process with status 1. On SIGTERM the ranks stop reporting failures (their peers
/// are going away with them).
fn start_ep_group(
    env: Option<group::GroupEnv>,
    ranks: std::ops::Range<u32>,
    metrics: &WorkerMetrics,
) -> anyhow::Result<runtime::OnShutdown> {
    let Some(env) = env else {
        return Ok(Box::new(|| {}));
    };
    let on_failure = group::exit_on_failure(env.termination_log.clone());
    match group::start(&env, ranks, metrics.ep(), on_failure)? {
        Some(g) => Ok(Box::new(move || g.stop())),
        None => Ok(Box::new(|| {})),
    }
}

/// `moe-worker fetch-weights ...`: the init container that fetches an S3 checkpoint
/// (`moe_operator::worker::weights`).
#[derive(Parser)]
#[command(
    name = "moe-worker fetch-weights",
    about = "Fetch a checkpoint from an S3-compatible object store into a directory"
)]
struct FetchCommand {
    #[command(flatten)]
    args: weights::fetch::FetchArgs,
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("fetch-weights") {
        let cmd = FetchCommand::parse_from(std::env::args().skip(1));
        runtime::init_logging(false);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return rt.block_on(weights::fetch::run(cmd.args));
    }
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
    // The EP group's environment (docs/data-plane.md), read before anything starts: a broken one
    // is a configuration error, not a rank failure.
    let ep_env = group::GroupEnv::from_env(|k| std::env::var(k).ok())
        .context("the expert-parallel rank environment")?;
    let loader = move |local_rank| match &synthetic {
        Some((seed, shape)) => runtime::synthetic_loader(&device, shape.clone(), *seed, local_rank),
        None => backend_loader(&device, checkpoint.as_deref(), local_rank),
    };
    let result = rt.block_on(runtime::run_with(args, loader, move |ranks, metrics| {
        start_ep_group(ep_env, ranks, metrics)
    }));
    // Connections still open and expert loads still running (a plan pushed just before SIGTERM)
    // must not keep the process from exiting: give them a moment, then go.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}
