//! Process wiring for `moe-worker`: arguments, listeners, start-up plan, shutdown. The binary's
//! `main` only parses arguments, sets up logging and calls [`run`] with the backend's loaders.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::plan::expert_plan::HashRule;
use crate::plan::{limits, ExpertPlan, ModelShape};
use crate::worker::compute::ExpertLoader;
use crate::worker::http::{admin_router, metrics_router, serve_http, AdminToken};
use crate::worker::metrics::WorkerMetrics;
use crate::worker::protocol::DEFAULT_MAX_FRAME_BYTES;
use crate::worker::server::{check_plan_document, serve_dispatch, ServeConfig, Worker};

/// `host:port` split at its last `:`; `[v6]:port` loses its brackets.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host, port.parse().ok()?))
}

/// `ip:port`, `[ip6]:port`, or an IPv6 address and port without brackets (`$(POD_IP):<port>` with
/// an IPv6 pod IP).
pub fn parse_listen(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    let (host, port) = split_host_port(s)?;
    Some(SocketAddr::new(
        host.parse::<std::net::IpAddr>().ok()?,
        port,
    ))
}

fn listen_arg(s: &str) -> Result<SocketAddr, String> {
    parse_listen(s).ok_or_else(|| format!("{s:?} is not ip:port"))
}

/// `moe-worker` command line. Every flag can also come from the pod's environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "moe-worker",
    version,
    about = "Expert runtime of one node: serves the experts the plan gives its GPUs"
)]
pub struct WorkerArgs {
    /// Plan JSON to apply at start (the plan ConfigMap, mounted). Without it the worker starts
    /// unready and waits for `PUT /v1/plan`.
    #[arg(long, env = "MOE_PLAN_FILE")]
    pub plan: Option<PathBuf>,
    /// Directory of the model checkpoint (config.json and safetensors shards).
    #[arg(long, env = "MOE_CHECKPOINT_DIR")]
    pub checkpoint: Option<PathBuf>,
    /// Generate deterministic synthetic weights from this seed for the plan's model instead of
    /// reading a checkpoint (benchmarks of shapes too large for disk); needs --plan.
    #[arg(long, env = "MOE_SYNTHETIC_WEIGHTS", conflicts_with = "checkpoint")]
    pub synthetic_weights: Option<u64>,
    /// Node index of this worker; it serves EP ranks node*G .. (node+1)*G.
    #[arg(long, env = "MOE_NODE_RANK", default_value_t = 0)]
    pub node: u32,
    /// First global EP rank of this worker, instead of --node (a multiple of --gpus-per-node).
    #[arg(long, env = "MOE_RANK", conflicts_with = "node")]
    pub rank: Option<u32>,
    /// EP ranks (GPUs) on this node. Default: the plan's gpus / nodes.
    #[arg(long, env = "MOE_GPUS_PER_NODE")]
    pub gpus_per_node: Option<u32>,
    /// Dispatch protocol listen address (`ip:port`; an IPv6 address may come without brackets,
    /// as `$(POD_IP):<port>` gives it on an IPv6 cluster).
    #[arg(long, env = "MOE_LISTEN", default_value = "0.0.0.0:9400", value_parser = listen_arg)]
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    #[arg(long, env = "MOE_METRICS_LISTEN", default_value = "0.0.0.0:9401", value_parser = listen_arg)]
    pub metrics_listen: SocketAddr,
    /// Admin API (`/v1/plan`), bearer token required.
    #[arg(long, env = "MOE_ADMIN_LISTEN", default_value = "0.0.0.0:9402", value_parser = listen_arg)]
    pub admin_listen: SocketAddr,
    /// File holding the admin bearer token; otherwise the MOE_ADMIN_TOKEN environment variable.
    #[arg(long, env = "MOE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Serve the admin API over TLS with this certificate (PEM; a mounted Secret's `tls.crt`),
    /// reloaded when the file changes. Needs --admin-tls-key.
    #[arg(long, env = "MOE_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    pub admin_tls_cert: Option<PathBuf>,
    /// The private key of --admin-tls-cert (PEM).
    #[arg(long, env = "MOE_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<PathBuf>,
    /// Compute device: cpu, cuda:N (local rank i uses cuda:N+i) or auto.
    #[arg(long, env = "MOE_DEVICE", default_value = "auto")]
    pub device: String,
    /// Log as JSON lines.
    #[arg(long, env = "MOE_LOG_JSON")]
    pub log_json: bool,
    /// Largest dispatch frame accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// Dispatch frame bytes buffered or computing at once, over all connections.
    #[arg(long, default_value_t = 1 << 30)]
    pub max_inflight_bytes: usize,
    /// Rows batched into one compute step of one rank.
    #[arg(long, default_value_t = 16384)]
    pub max_batch_rows: usize,
    /// Seconds a replaced plan keeps serving requests routed by it.
    #[arg(long, default_value_t = 30)]
    pub previous_plan_grace_seconds: u64,
    /// Dispatch connections open at once; more are answered `busy` and closed.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Seconds a dispatch connection may stay open with no frame started.
    #[arg(long, default_value_t = 300)]
    pub idle_timeout_seconds: u64,
    /// Seconds a dispatch frame may take to arrive whole once its first byte has (the wait for
    /// in-flight budget included); a frame late past it is answered `malformed` and closed.
    #[arg(long, default_value_t = 10)]
    pub frame_read_timeout_seconds: u64,
    /// Seconds a client may take to read one dispatch reply before it is disconnected.
    #[arg(long, default_value_t = 10)]
    pub write_timeout_seconds: u64,
    /// Seconds an HTTP request head may take to arrive once it has started (metrics and admin).
    #[arg(long, default_value_t = 10)]
    pub http_header_timeout_seconds: u64,
    /// Seconds a `PUT /v1/plan` body may take to arrive.
    #[arg(long, default_value_t = 60)]
    pub http_body_timeout_seconds: u64,
    /// Seconds an idle HTTP keep-alive connection stays open.
    #[arg(long, default_value_t = 60)]
    pub http_idle_timeout_seconds: u64,
    /// Seconds an HTTP client may take to read a response.
    #[arg(long, default_value_t = 10)]
    pub http_write_timeout_seconds: u64,
    /// HTTP connections open at once, per listener.
    #[arg(long, default_value_t = 256)]
    pub http_max_connections: usize,
    /// Seconds open HTTP requests may still run after SIGTERM before the worker exits.
    #[arg(long, default_value_t = 5)]
    pub shutdown_drain_seconds: u64,
    /// Largest plan accepted on `PUT /v1/plan` or in --plan, in bytes (at most plan::limits::MAX_PLAN_BYTES).
    #[arg(long, default_value_t = limits::MAX_PLAN_BYTES)]
    pub max_plan_bytes: usize,
    /// Write the bound addresses here as JSON (`{"dispatch", "metrics", "admin"}`) once the worker
    /// listens and its start-up plan is in force. With port 0 in the listen flags, this is how a
    /// launcher learns the ports without picking free ones itself (which races with other
    /// processes).
    #[arg(long, env = "MOE_ADDRESSES_FILE")]
    pub addresses_file: Option<PathBuf>,
}

/// What `--addresses-file` holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BoundAddresses {
    pub dispatch: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
}

impl BoundAddresses {
    /// Writes the file whole or not at all (a temporary file renamed into place), so that a reader
    /// polling for it never sees half of it.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {} (--addresses-file)", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }

    /// Reads the file; `Ok(None)` while it does not exist yet.
    pub fn read(path: &Path) -> anyhow::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("parsing {} as the worker's addresses", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// Set up tracing (RUST_LOG, default info).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The compute backend's loader for one local rank. Placeholder until the backends are merged:
/// the lead replaces this body with `loader_for_device(device, checkpoint, local_rank)`.
pub fn backend_loader(
    device: &str,
    checkpoint: Option<&Path>,
    local_rank: u32,
) -> anyhow::Result<Arc<dyn ExpertLoader>> {
    use super::device::loader_for_device;
    let dir = checkpoint.ok_or_else(|| {
        anyhow::anyhow!("--checkpoint is required: the directory holding config.json and the safetensors shards")
    })?;
    let ckpt = super::checkpoint::Checkpoint::open(dir)
        .map_err(|e| anyhow::anyhow!("opening checkpoint {}: {e}", dir.display()))?;
    loader_for_device(&rank_device(device, local_rank)?, Arc::new(ckpt))
}

/// The `--device` of one local rank: each local rank of a node drives its own GPU, and `cuda:N`
/// names the node's first one.
fn rank_device(device: &str, local_rank: u32) -> anyhow::Result<String> {
    use super::device::DeviceSpec;
    Ok(
        match device.parse::<DeviceSpec>().map_err(anyhow::Error::msg)? {
            DeviceSpec::Cuda(n) => format!("cuda:{}", n + local_rank as usize),
            DeviceSpec::Auto if super::cuda::cuda_available() => format!("cuda:{local_rank}"),
            _ => device.to_string(),
        },
    )
}

/// The loader for one local rank over deterministic synthetic weights
/// (`--synthetic-weights SEED`) of `shape`, instead of a checkpoint.
pub fn synthetic_loader(
    device: &str,
    shape: crate::plan::ModelShape,
    seed: u64,
    local_rank: u32,
) -> anyhow::Result<Arc<dyn ExpertLoader>> {
    let source = super::checkpoint::synthetic::HashedWeights::new(shape, seed);
    super::device::loader_for_device(&rank_device(device, local_rank)?, Arc::new(source))
}

/// Everything a worker needs to start, resolved from the arguments (or built by a test).
pub struct WorkerOptions {
    pub serve: ServeConfig,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: String,
    pub initial_plan: Option<ExpertPlan>,
}

impl std::fmt::Debug for WorkerOptions {
    /// The admin token is left out so that it never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerOptions")
            .field("serve", &self.serve)
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("admin_listen", &self.admin_listen)
            .field("admin_token", &"<redacted>")
            .field(
                "initial_plan",
                &self.initial_plan.as_ref().map(|p| p.hash.as_str()),
            )
            .finish()
    }
}

/// A started worker: its bound addresses and the way to stop it.
pub struct WorkerHandle {
    pub worker: Arc<Worker>,
    pub dispatch_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Stop accepting and wait for the servers to end: HTTP requests still open get the shutdown
    /// drain (`http.shutdown_drain`) to finish; dispatch connections end with their timeouts.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {flag} {addr} (is another process on that port?)"))
}

/// Bind the three ports, start serving, then apply the start-up plan if there is one (the health
/// endpoints answer meanwhile; `/readyz` turns ready when the plan is in force).
pub async fn start(
    opts: WorkerOptions,
    loaders: Vec<Arc<dyn ExpertLoader>>,
) -> anyhow::Result<WorkerHandle> {
    start_with(opts, loaders, |_| Ok(())).await
}

/// [`start`], with `beside` called once the worker exists, before its ports are bound and its
/// start-up plan loads (what runs next to the serving, e.g. the EP group's ranks, must not wait
/// for the weights).
pub async fn start_with(
    opts: WorkerOptions,
    loaders: Vec<Arc<dyn ExpertLoader>>,
    beside: impl FnOnce(&Arc<Worker>) -> anyhow::Result<()>,
) -> anyhow::Result<WorkerHandle> {
    let token = Arc::new(match &opts.serve.http.admin_token_file {
        Some(path) => AdminToken::from_file(path, opts.serve.http.token_recheck)?,
        None => AdminToken::new(&opts.admin_token).context("admin token")?,
    });
    let http = opts.serve.http.clone();
    let worker = Worker::start(opts.serve, loaders)?;
    beside(&worker)?;
    let dispatch = bind(opts.listen, "--listen").await?;
    let metrics = bind(opts.metrics_listen, "--metrics-listen").await?;
    let admin = bind(opts.admin_listen, "--admin-listen").await?;
    let (dispatch_addr, metrics_addr, admin_addr) = (
        dispatch.local_addr()?,
        metrics.local_addr()?,
        admin.local_addr()?,
    );
    let (tx, rx) = watch::channel(false);
    let mut tasks = vec![tokio::spawn(serve_dispatch(
        worker.clone(),
        dispatch,
        rx.clone(),
    ))];
    for (listener, router, name) in [
        (metrics, metrics_router(worker.clone()), "metrics"),
        (admin, admin_router(worker.clone(), token), "admin"),
    ] {
        let (stop, http) = (rx.clone(), http.clone());
        tasks.push(tokio::spawn(async move {
            serve_http(listener, router, &http, stop, name).await;
        }));
    }
    tracing::info!(%dispatch_addr, %metrics_addr, %admin_addr, ranks = ?worker.config().ranks(), "worker listening");
    let handle = WorkerHandle {
        worker,
        dispatch_addr,
        metrics_addr,
        admin_addr,
        shutdown: tx,
        tasks,
    };
    if let Some(plan) = opts.initial_plan {
        if let Err(e) = handle.worker.apply_plan(plan).await {
            handle.shutdown().await;
            return Err(anyhow::Error::new(e).context("applying the start-up plan (--plan)"));
        }
    }
    Ok(handle)
}

/// Reads a plan file (`--plan`): at most `max_bytes` (and never more than
/// `plan::limits::MAX_PLAN_BYTES`), then the document checks (format version, hash, sizes) before
/// anything else uses it.
pub fn read_plan(path: &Path) -> anyhow::Result<ExpertPlan> {
    read_plan_bounded(path, limits::MAX_PLAN_BYTES)
}

fn read_plan_bounded(path: &Path, max_bytes: usize) -> anyhow::Result<ExpertPlan> {
    use std::io::Read;
    let max = max_bytes.min(limits::MAX_PLAN_BYTES);
    let file = std::fs::File::open(path)
        .with_context(|| format!("reading plan file {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading plan file {}", path.display()))?;
    anyhow::ensure!(
        bytes.len() <= max,
        "plan file {} is larger than {max} bytes (--max-plan-bytes, plan::limits::MAX_PLAN_BYTES)",
        path.display()
    );
    // A plan ConfigMap's file is gzip when the plan was too large for it as JSON (plan::packed).
    let bytes = crate::plan::packed::unpack(&bytes)
        .map_err(|e| anyhow::anyhow!("plan file {}: {e}", path.display()))?;
    let plan = ExpertPlan::from_json_checked(&bytes, HashRule::MayBeEmpty)
        .map_err(|e| anyhow::anyhow!("plan file {}: {e}", path.display()))?;
    check_plan_document(plan).map_err(|e| anyhow::anyhow!("plan file {}: {e}", path.display()))
}

/// The model shape of a checkpoint directory, from its `config.json` (read bounded).
pub fn checkpoint_model(dir: &Path) -> anyhow::Result<ModelShape> {
    use std::io::Read;
    const MAX_CONFIG_BYTES: u64 = 4 << 20;
    let path = dir.join("config.json");
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_CONFIG_BYTES).read_to_string(&mut text))
        .with_context(|| format!("reading {} (--checkpoint)", path.display()))?;
    let config = super::checkpoint::parse_config(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(config.shape)
}

fn read_token(args: &WorkerArgs) -> anyhow::Result<String> {
    if let Some(path) = &args.admin_token_file {
        use std::io::Read;
        let mut token = String::new();
        // A Secret's key holds a token of a few dozen bytes; read no more than 64 KiB of it.
        return std::fs::File::open(path)
            .and_then(|f| f.take(64 << 10).read_to_string(&mut token))
            .map(|_| token)
            .with_context(|| {
                format!(
                    "reading the admin token file {} (--admin-token-file)",
                    path.display()
                )
            });
    }
    std::env::var("MOE_ADMIN_TOKEN").map_err(|_| {
        anyhow::anyhow!("the admin API needs a bearer token: pass --admin-token-file FILE or set MOE_ADMIN_TOKEN")
    })
}

/// Resolve the arguments into options: node and ranks per node (from the flags or the plan).
pub fn resolve(args: &WorkerArgs) -> anyhow::Result<WorkerOptions> {
    anyhow::ensure!(
        args.max_plan_bytes <= limits::MAX_PLAN_BYTES,
        "--max-plan-bytes {} is over plan::limits::MAX_PLAN_BYTES ({})",
        args.max_plan_bytes,
        limits::MAX_PLAN_BYTES
    );
    let plan = args
        .plan
        .as_deref()
        .map(|p| read_plan_bounded(p, args.max_plan_bytes))
        .transpose()?;
    let gpus_per_node = match (args.gpus_per_node, &plan) {
        (Some(g), _) => g,
        (None, Some(p)) if p.nodes > 0 => p.gpus / p.nodes,
        _ => anyhow::bail!(
            "--gpus-per-node (or MOE_GPUS_PER_NODE) is required when no --plan is given"
        ),
    };
    anyhow::ensure!(gpus_per_node > 0, "--gpus-per-node must be at least 1");
    let node = match args.rank {
        Some(r) => {
            anyhow::ensure!(
                r % gpus_per_node == 0,
                "--rank {r} is not the first rank of a node ({gpus_per_node} ranks per node); use --node"
            );
            r / gpus_per_node
        }
        None => args.node,
    };
    let mut serve = ServeConfig::new(node, gpus_per_node);
    serve.max_frame_bytes = args.max_frame_bytes;
    serve.max_inflight_bytes = args.max_inflight_bytes;
    serve.max_batch_rows = args.max_batch_rows;
    serve.previous_plan_grace = Duration::from_secs(args.previous_plan_grace_seconds);
    serve.max_connections = args.max_connections;
    serve.idle_timeout = Duration::from_secs(args.idle_timeout_seconds);
    serve.frame_read_timeout = Duration::from_secs(args.frame_read_timeout_seconds);
    serve.write_timeout = Duration::from_secs(args.write_timeout_seconds);
    serve.http.header_timeout = Duration::from_secs(args.http_header_timeout_seconds);
    serve.http.body_timeout = Duration::from_secs(args.http_body_timeout_seconds);
    serve.http.idle_timeout = Duration::from_secs(args.http_idle_timeout_seconds);
    serve.http.write_timeout = Duration::from_secs(args.http_write_timeout_seconds);
    serve.http.max_connections = args.http_max_connections;
    serve.http.shutdown_drain = Duration::from_secs(args.shutdown_drain_seconds);
    serve.http.max_plan_bytes = args.max_plan_bytes;
    serve.http.admin_token_file = args.admin_token_file.clone();
    if let (Some(cert), Some(key)) = (&args.admin_tls_cert, &args.admin_tls_key) {
        let reloading =
            super::admin_tls::ReloadingCert::new(cert, key, serve.http.token_recheck)
                .context("the admin API's TLS certificate (--admin-tls-cert, --admin-tls-key)")?;
        serve.http.admin_tls = Some(super::admin_tls::server_config(Arc::new(reloading))?);
    }
    // The model the weights are for: plans for another shape are refused (see Worker::validate).
    serve.model = match (&args.checkpoint, args.synthetic_weights, &plan) {
        (Some(dir), _, _) => Some(checkpoint_model(dir)?),
        (None, Some(_), Some(p)) => Some(p.model.clone()),
        _ => None,
    };
    Ok(WorkerOptions {
        serve,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        admin_listen: args.admin_listen,
        admin_token: read_token(args)?,
        initial_plan: plan,
    })
}

/// Run a worker until SIGTERM or Ctrl-C. `loader_for_rank(i)` gives the loader of local rank `i`.
pub async fn run(
    args: WorkerArgs,
    loader_for_rank: impl Fn(u32) -> anyhow::Result<Arc<dyn ExpertLoader>>,
) -> anyhow::Result<()> {
    run_with(args, loader_for_rank, |_, _| Ok(Box::new(|| {}))).await
}

/// Told that the worker is shutting down (SIGTERM), before its HTTP requests drain.
pub type OnShutdown = Box<dyn FnOnce() + Send>;

/// [`run`], with `beside` started next to the serving: it gets the global ranks this worker
/// serves and its metrics, before the start-up plan's weights load, and returns what to do when
/// the worker begins to shut down. `moe-worker` starts its EP group here (the worker does not
/// know the data plane; the binary does).
pub async fn run_with(
    args: WorkerArgs,
    loader_for_rank: impl Fn(u32) -> anyhow::Result<Arc<dyn ExpertLoader>>,
    beside: impl FnOnce(Range<u32>, &WorkerMetrics) -> anyhow::Result<OnShutdown>,
) -> anyhow::Result<()> {
    let opts = resolve(&args)?;
    let loaders = (0..opts.serve.gpus_per_node)
        .map(&loader_for_rank)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut on_shutdown: Option<OnShutdown> = None;
    let handle = start_with(opts, loaders, |w| {
        on_shutdown = Some(beside(w.config().ranks(), &w.metrics)?);
        Ok(())
    })
    .await?;
    if let Some(path) = &args.addresses_file {
        BoundAddresses {
            dispatch: handle.dispatch_addr,
            metrics: handle.metrics_addr,
            admin: handle.admin_addr,
        }
        .write(path)?;
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    if let Some(f) = on_shutdown {
        f();
    }
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str], token: &Path) -> WorkerArgs {
        let mut argv = vec!["moe-worker", "--admin-token-file", token.to_str().unwrap()];
        argv.extend_from_slice(extra);
        WorkerArgs::try_parse_from(argv).unwrap()
    }

    #[test]
    fn addresses_file_is_absent_then_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.addresses.json");
        assert_eq!(BoundAddresses::read(&path).unwrap(), None);
        let a = BoundAddresses {
            dispatch: "127.0.0.1:40001".parse().unwrap(),
            metrics: "127.0.0.1:40002".parse().unwrap(),
            admin: "[::1]:40003".parse().unwrap(),
        };
        a.write(&path).unwrap();
        assert_eq!(BoundAddresses::read(&path).unwrap(), Some(a));
        assert!(!path.with_extension("tmp").exists());
        std::fs::write(&path, b"{\"dispatch\":").unwrap();
        let e = BoundAddresses::read(&path).unwrap_err();
        assert!(format!("{e:#}").contains("worker.addresses.json"), "{e:#}");
    }

    #[test]
    fn ranks_come_from_node_or_first_rank() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "abc\n").unwrap();

        let o = resolve(&args(&["--gpus-per-node", "4", "--node", "3"], &token)).unwrap();
        assert_eq!(o.serve.ranks(), 12..16);
        assert_eq!(o.admin_token, "abc\n");
        assert!(o.initial_plan.is_none());

        let o = resolve(&args(&["--gpus-per-node", "2", "--rank", "6"], &token)).unwrap();
        assert_eq!(o.serve.ranks(), 6..8);
        let e = resolve(&args(&["--gpus-per-node", "2", "--rank", "5"], &token)).unwrap_err();
        assert!(
            e.to_string().contains("not the first rank of a node"),
            "{e}"
        );

        let e = resolve(&args(&[], &token)).unwrap_err();
        assert!(e.to_string().contains("--gpus-per-node"), "{e}");

        let e = resolve(&args(&["--plan", "/nonexistent/plan.json"], &token)).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/plan.json"), "{e:#}");

        let bad = dir.path().join("plan.json");
        std::fs::write(&bad, "{\"formatVersion\": 1}").unwrap();
        let e = resolve(&args(&["--plan", bad.to_str().unwrap()], &token)).unwrap_err();
        assert!(format!("{e:#}").contains("not a plan document"), "{e:#}");

        assert!(WorkerArgs::try_parse_from(["moe-worker", "--node", "1", "--rank", "2"]).is_err());
    }

    #[test]
    fn listen_flags_take_an_ipv6_pod_ip_without_brackets() {
        // `$(POD_IP):<port>` on an IPv6 cluster.
        let a = WorkerArgs::try_parse_from([
            "moe-worker",
            "--listen",
            "fd00:10:244::5:9400",
            "--metrics-listen",
            "[fd00:10:244::5]:9401",
            "--admin-listen",
            "10.0.0.7:9402",
        ])
        .unwrap();
        assert_eq!(a.listen.to_string(), "[fd00:10:244::5]:9400");
        assert_eq!(a.metrics_listen.to_string(), "[fd00:10:244::5]:9401");
        assert_eq!(a.admin_listen.to_string(), "10.0.0.7:9402");
        let e = WorkerArgs::try_parse_from(["moe-worker", "--listen", "pod:9400"]).unwrap_err();
        assert!(e.to_string().contains("\"pod:9400\" is not ip:port"), "{e}");
    }
}
