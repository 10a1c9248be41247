//! The controller binary: `moe-operator crd` prints the CRD, `moe-operator run` runs the controller.

use std::net::SocketAddr;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "moe-operator",
    version,
    about = "Serve Mixture-of-Experts models on Kubernetes and keep their experts balanced"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the MoEDeployment CustomResourceDefinition as YAML.
    Crd,
    /// Run the controller against the cluster of the ambient kubeconfig or service account.
    Run(Box<RunArgs>),
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(
        long,
        env = "MOE_OPERATOR_METRICS_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    metrics_listen: SocketAddr,
    /// Address of `/healthz` and `/readyz`.
    #[arg(
        long,
        env = "MOE_OPERATOR_HEALTH_LISTEN",
        default_value = "0.0.0.0:8081"
    )]
    health_listen: SocketAddr,
    /// Namespace of the leader-election Lease; defaults to the pod's own namespace.
    #[arg(long, env = "MOE_OPERATOR_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "MOE_OPERATOR_LEADER_ELECTION_NAME",
        default_value = "moe-operator"
    )]
    leader_election_name: String,
    #[arg(
        long,
        env = "MOE_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Only watch MoEDeployments in this namespace (all namespaces when unset).
    #[arg(long, env = "MOE_OPERATOR_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// How long an in-place plan push may stay in flight (the worker loading the experts the plan
    /// adds) before the worker's pod is replaced instead (e.g. `10m`, `90s`).
    #[arg(long, env = "MOE_OPERATOR_PUSH_TIMEOUT", default_value = "10m", value_parser = moe_operator::api::units::parse_duration)]
    push_timeout: std::time::Duration,
    /// Deadline of each request/response call to the Kubernetes API (watches keep the client's
    /// long-poll timeout). A frozen API server then fails calls instead of hanging reconciles.
    #[arg(long, env = "MOE_OPERATOR_API_TIMEOUT", default_value = "30s", value_parser = moe_operator::api::units::parse_duration)]
    api_timeout: std::time::Duration,
    /// How long a shutdown (SIGTERM) waits for the reconciles in flight before stopping them and
    /// releasing the leader Lease; keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "MOE_OPERATOR_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = moe_operator::api::units::parse_duration)]
    shutdown_timeout: std::time::Duration,
    /// What MoEDeployment authors may ask of the worker pods (docs/security.md).
    #[command(flatten)]
    pod_policy: moe_operator::api::pod_policy::PodPolicyArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", moe_operator::api::crd_yaml());
            Ok(())
        }
        Command::Run(args) => run(*args),
    }
}

#[tokio::main]
async fn run(args: RunArgs) -> Result<()> {
    use anyhow::Context as _;
    use moe_operator::controller::{leader, reconcile, telemetry};
    use std::sync::Arc;
    use std::time::Duration;

    moe_operator::worker::runtime::init_logging(args.log_format == LogFormat::Json);
    let mut config = kube::Config::infer()
        .await
        .context("connecting to the Kubernetes API (kubeconfig or in-cluster service account)")?;
    config.connect_timeout = Some(Duration::from_secs(10));
    // Watches long-poll (the server ends each after about 5 minutes), so only their client keeps
    // the long read timeout; every other call, the Lease's included, runs under --api-timeout.
    let watch_client = kube::Client::try_from(config.clone()).context("building the API client")?;
    config.read_timeout = Some(args.api_timeout);
    config.write_timeout = Some(args.api_timeout);
    let client = kube::Client::try_from(config).context("building the API client")?;
    let metrics = Arc::new(telemetry::Metrics::new());
    for (addr, router, what) in [
        (
            args.metrics_listen,
            telemetry::metrics_router(metrics.clone()),
            "--metrics-listen",
        ),
        (
            args.health_listen,
            telemetry::health_router(metrics.clone()),
            "--health-listen",
        ),
    ] {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {what} {addr}"))?;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "http server failed");
            }
        });
    }
    let namespace = match args.leader_election_namespace {
        Some(ns) => ns,
        None => std::env::var("POD_NAMESPACE")
            .ok()
            .or_else(|| {
                std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                    .ok()
            })
            .map(|s| s.trim().to_string())
            .context(
                "no --leader-election-namespace, POD_NAMESPACE or service account namespace",
            )?,
    };
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "moe-operator".into()),
            std::process::id()
        )
    });
    let cfg = leader::LeaseConfig {
        namespace,
        name: args.leader_election_name,
        identity: identity.clone(),
        duration: Duration::from_secs(15),
        renew: Duration::from_secs(5),
        retry: Duration::from_secs(2),
    };
    // SIGTERM (the kubelet stopping the pod: a rollout, a drain) and Ctrl-C both mean a graceful
    // shutdown, in every state; the handler is installed before anything waits.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    };
    tokio::pin!(stop);
    tracing::info!(lease = %cfg.name, namespace = %cfg.namespace, %identity, "waiting for the Lease");
    let acquired = tokio::select! {
        at = leader::acquire(client.clone(), &cfg, || metrics.set_ready(true)) => at,
        _ = &mut stop => {
            // A standby has nothing to hand over.
            tracing::info!("shutting down as a standby");
            return Ok(());
        }
    };
    tracing::info!(%identity, "leading: starting the controller");
    metrics.set_leader(true);
    let policy = moe_operator::api::pod_policy::PodPolicy::from_args(&args.pod_policy)?;
    let mut ctx = reconcile::Context::new(client.clone(), metrics.clone(), Some(identity), policy)
        .context("setting up the Prometheus client")?;
    ctx.push_timeout = args.push_timeout;
    let ctx = Arc::new(ctx);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut controller = tokio::spawn(reconcile::run_controller(
        ctx,
        watch_client,
        args.watch_namespace,
        async move {
            let _ = stop_rx.await;
        },
    ));
    // The Lease is renewed until the controller has stopped, draining included: it must not
    // expire (and another replica start acting) while this one still reconciles.
    let hold = leader::hold(client.clone(), cfg.clone(), acquired);
    tokio::pin!(hold);
    tokio::select! {
        _ = &mut hold => return lost(&metrics, controller),
        _ = &mut stop => {},
        r = &mut controller => {
            metrics.set_leader(false);
            anyhow::bail!("the controller stopped on its own ({r:?}); exiting so that a restart takes over");
        }
    }
    tracing::info!(timeout = ?args.shutdown_timeout, "shutting down: finishing the reconciles in flight");
    metrics.set_ready(false);
    let _ = stop_tx.send(());
    tokio::select! {
        _ = &mut hold => return lost(&metrics, controller),
        r = tokio::time::timeout(args.shutdown_timeout, &mut controller) => {
            if r.is_err() {
                tracing::warn!("reconciles still running after --shutdown-timeout: stopping them");
                controller.abort();
            }
        }
    }
    // Nothing acts any more: hand the Lease over at once instead of letting it run out.
    metrics.set_leader(false);
    leader::release(client, &cfg).await;
    tracing::info!("shut down");
    Ok(())
}

/// The Lease was lost (another holder, or no renewal in time): another replica may act in moments,
/// so stop at once, without draining, and exit so that a restart starts as a standby.
fn lost(
    metrics: &moe_operator::controller::telemetry::Metrics,
    controller: tokio::task::JoinHandle<()>,
) -> Result<()> {
    controller.abort();
    metrics.set_leader(false);
    metrics.set_ready(false);
    anyhow::bail!("lost the leader Lease; exiting so that a restart starts as a standby")
}
