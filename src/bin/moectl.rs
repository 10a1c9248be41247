use clap::Parser;

fn main() {
    let cli = moe_operator::cli::Cli::parse();
    if let Err(e) = moe_operator::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
