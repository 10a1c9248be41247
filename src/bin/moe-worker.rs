//! moe-worker: the expert runtime of one node. See `moe_operator::worker::runtime`.

use clap::Parser;
use moe_operator::worker::{backend_loader, runtime};

fn main() -> anyhow::Result<()> {
    let args = runtime::WorkerArgs::parse();
    runtime::init_logging(args.log_json);
    let (device, checkpoint) = (args.device.clone(), args.checkpoint.clone());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(runtime::run(args, move |local_rank| {
            backend_loader(&device, checkpoint.as_deref(), local_rank)
        }))
}
