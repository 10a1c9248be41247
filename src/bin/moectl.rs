use clap::Parser;

fn main() {
    // The load generator moves frame-sized buffers too (see worker::heap).
    let _ = moe_operator::worker::heap::retain_large_buffers();
    // Linked or copied as `kubectl-moe`, this binary is the kubectl plugin (`kubectl moe ...`).
    let as_plugin = std::env::args_os()
        .next()
        .is_some_and(|a| moe_operator::cli::kubectl::invoked_as_plugin(&a));
    let result = if as_plugin {
        moe_operator::cli::kubectl::run(moe_operator::cli::kubectl::KubectlMoe::parse().args)
    } else {
        moe_operator::cli::run(moe_operator::cli::Cli::parse())
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
