//! The worker's expert-parallel group (docs/data-plane.md, "The worker's ranks"): given the rank
//! environment the operator sets on a worker pod, `moe-worker` runs one thread per local rank that
//! joins the control mesh through rank 0 and then keeps the group's liveness with a heartbeat (an
//! all-to-all of empty messages every [`HEARTBEAT`]). A rank that fails (the rendezvous does not
//! complete in time, a peer goes away or stalls, a peer relays another rank's failure) ends the
//! process: `ep rank <r>: <error>` goes to the termination message and the process exits with
//! status 1, so that the operator restarts the group as a unit.
//!
//! Only the `tcp` transport gets ranks here: on `ipc` and `nccl` the engine's processes are the
//! ranks (the MoE-layer session, `ep::session`), not the worker.
//!
//! Pure: reading the environment ([`GroupEnv::from_env`]), the ranks and their listen addresses
//! ([`GroupEnv::ranks`]) and the termination message ([`failure_message`]). I/O: [`start`] (resolve
//! the rendezvous address, join, heartbeat) and [`exit_on_failure`] (write the termination
//! message, exit).

use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::Transport;
use crate::ep::mesh::{Mesh, MeshConfig, MeshError};
use crate::worker::metrics::EpMetrics;
use crate::worker::runtime::{parse_listen, split_host_port};

/// Ranks in the group (`nodes * gpusPerNode`); unset: the worker is in no group.
pub const WORLD_SIZE_ENV: &str = "MOE_EP_WORLD_SIZE";
/// `host:port` of rank 0's rendezvous listener.
pub const RENDEZVOUS_ENV: &str = "MOE_EP_RENDEZVOUS";
/// `ip:port` this worker's first rank listens at; local rank `i` listens at port + `i`.
pub const LISTEN_ENV: &str = "MOE_EP_LISTEN";
/// `tcp` (the default), `ipc` or `nccl`.
pub const TRANSPORT_ENV: &str = "MOE_EP_TRANSPORT";
/// How long the group may take to form, in whole seconds.
pub const RENDEZVOUS_TIMEOUT_ENV: &str = "MOE_EP_RENDEZVOUS_TIMEOUT_SECONDS";
/// Where the termination message goes (the container's `terminationMessagePath`).
pub const TERMINATION_LOG_ENV: &str = "MOE_TERMINATION_LOG";
pub const DEFAULT_TERMINATION_LOG: &str = "/dev/termination-log";
/// The rendezvous timeout when the environment gives none (the operator always does).
pub const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one heartbeat may wait for a peer before the peer counts as stalled.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Time between heartbeats.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Largest mesh message accepted: the worker's mesh carries empty heartbeats only.
const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// How often an unresolvable rendezvous name is tried again.
const RESOLVE_RETRY: Duration = Duration::from_millis(500);

/// A rank environment that cannot be used; the worker does not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("{name}={value:?}: {why}")]
    Env {
        name: &'static str,
        value: String,
        why: &'static str,
    },
    #[error(
        "this worker's ranks {ranks:?} are not all below the world size {world} ({WORLD_SIZE_ENV})"
    )]
    RanksOutsideWorld { ranks: Range<u32>, world: usize },
    #[error("this worker holds rank 0, which listens at port {listen} ({LISTEN_ENV}), but the rendezvous is at port {rendezvous} ({RENDEZVOUS_ENV}): rank 0 listens at the rendezvous address, the ports must be the same")]
    PortMismatch { listen: u16, rendezvous: u16 },
    #[error("local rank {local} would listen at port {port} + {local}, past 65535 ({LISTEN_ENV})")]
    PortRange { port: u16, local: usize },
    #[error("starting the thread of rank {rank}: {message}")]
    Spawn { rank: usize, message: String },
}

/// Why a rank left the group.
#[derive(Debug, thiserror::Error)]
pub enum RankError {
    #[error("rendezvous: {addr} did not resolve within {after:?}: {last}")]
    Resolve {
        addr: String,
        after: Duration,
        last: String,
    },
    #[error(transparent)]
    Mesh(#[from] MeshError),
}

/// One failed rank of this worker.
#[derive(Debug)]
pub struct Failure {
    /// The global rank that failed (it names the rank that caused it in `error`, where known).
    pub rank: usize,
    pub error: RankError,
}

impl Failure {
    /// The termination message: [`failure_message`].
    pub fn message(&self) -> String {
        failure_message(self.rank, &self.error)
    }
}

/// `ep rank <rank>: <error>` on one line: the operator reads the first line of the termination
/// message (`controller::ranks`).
pub fn failure_message(rank: usize, error: &dyn std::fmt::Display) -> String {
    let what = error.to_string().replace(['\r', '\n'], " ");
    format!("ep rank {rank}: {what}")
}

/// The rank environment of docs/data-plane.md, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEnv {
    pub world: usize,
    /// `host:port` (a name, resolved when a rank starts).
    pub rendezvous: String,
    pub rendezvous_port: u16,
    /// Where this worker's first rank listens.
    pub listen: SocketAddr,
    pub transport: Transport,
    pub rendezvous_timeout: Duration,
    pub termination_log: PathBuf,
}

/// One local rank: its global rank, its index in the worker and where it listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankSpec {
    pub rank: usize,
    pub local: usize,
    pub listen: SocketAddr,
}

fn env_error(name: &'static str, value: &str, why: &'static str) -> GroupError {
    GroupError::Env {
        name,
        value: value.to_string(),
        why,
    }
}

impl GroupEnv {
    /// The environment read through `get`; `Ok(None)` when [`WORLD_SIZE_ENV`] is unset (the
    /// worker is in no group).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, GroupError> {
        let Some(world_s) = get(WORLD_SIZE_ENV) else {
            return Ok(None);
        };
        let world: usize = world_s
            .trim()
            .parse()
            .ok()
            .filter(|&w| w > 0)
            .ok_or_else(|| env_error(WORLD_SIZE_ENV, &world_s, "not a positive integer"))?;
        let rendezvous = get(RENDEZVOUS_ENV)
            .ok_or_else(|| env_error(RENDEZVOUS_ENV, "", "unset: rank 0's host:port is needed"))?;
        let (_, rendezvous_port) = split_host_port(&rendezvous)
            .ok_or_else(|| env_error(RENDEZVOUS_ENV, &rendezvous, "not host:port"))?;
        let listen_s = get(LISTEN_ENV)
            .ok_or_else(|| env_error(LISTEN_ENV, "", "unset: this pod's ip:port is needed"))?;
        let listen = parse_listen(&listen_s).ok_or_else(|| {
            env_error(
                LISTEN_ENV,
                &listen_s,
                "not ip:port (is POD_IP set before it?)",
            )
        })?;
        let transport = match get(TRANSPORT_ENV).as_deref().map(str::trim) {
            None | Some("") | Some("tcp") => Transport::Tcp,
            Some("ipc") => Transport::Ipc,
            Some("nccl") => Transport::Nccl,
            Some(other) => return Err(env_error(TRANSPORT_ENV, other, "not tcp, ipc or nccl")),
        };
        let rendezvous_timeout = match get(RENDEZVOUS_TIMEOUT_ENV) {
            None => DEFAULT_RENDEZVOUS_TIMEOUT,
            Some(s) => s
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|&t| t > 0)
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    env_error(
                        RENDEZVOUS_TIMEOUT_ENV,
                        &s,
                        "not a positive number of seconds",
                    )
                })?,
        };
        let termination_log = get(TERMINATION_LOG_ENV)
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| DEFAULT_TERMINATION_LOG.into())
            .into();
        Ok(Some(Self {
            world,
            rendezvous,
            rendezvous_port,
            listen,
            transport,
            rendezvous_timeout,
            termination_log,
        }))
    }

    /// This worker's ranks (`ranks`, from `--node` and `--gpus-per-node`) with their listen
    /// addresses: local rank `i` at the listen port + `i`, so rank 0 at exactly the listen port,
    /// which must then be the rendezvous port.
    pub fn ranks(&self, ranks: Range<u32>) -> Result<Vec<RankSpec>, GroupError> {
        if ranks.is_empty() || ranks.end as usize > self.world {
            return Err(GroupError::RanksOutsideWorld {
                ranks,
                world: self.world,
            });
        }
        if ranks.start == 0 && self.listen.port() != self.rendezvous_port {
            return Err(GroupError::PortMismatch {
                listen: self.listen.port(),
                rendezvous: self.rendezvous_port,
            });
        }
        ranks
            .enumerate()
            .map(|(local, rank)| {
                let port = u16::try_from(local)
                    .ok()
                    .and_then(|l| self.listen.port().checked_add(l))
                    .ok_or(GroupError::PortRange {
                        port: self.listen.port(),
                        local,
                    })?;
                Ok(RankSpec {
                    rank: rank as usize,
                    local,
                    listen: SocketAddr::new(self.listen.ip(), port),
                })
            })
            .collect()
    }
}

/// What a rank failure sets off: [`exit_on_failure`] in the worker, a recorder in tests.
pub type OnFailure = Arc<dyn Fn(Failure) + Send + Sync>;

/// The running ranks of this worker.
pub struct Group {
    stopping: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Group {
    /// The worker is shutting down: from now on a rank that loses its group (its peers shutting
    /// down too) logs it and ends quietly; no failure is reported.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether every rank thread has ended.
    pub fn finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }
}

/// Starts this worker's ranks (`ranks`, the global ranks it serves) on the `tcp` transport, each on
/// its own thread; `None` (nothing started, the reason logged) on `ipc` and `nccl`. `metrics` gets
/// the group's state; a failed rank calls `on_failure` (after its mesh is closed, so that the
/// failure it relays to its peers has gone out).
pub fn start(
    env: &GroupEnv,
    ranks: Range<u32>,
    metrics: Arc<EpMetrics>,
    on_failure: OnFailure,
) -> Result<Option<Group>, GroupError> {
    if env.transport != Transport::Tcp {
        tracing::info!(
            transport = env.transport.as_str(),
            "ep: the worker starts no ranks on this transport: an engine process is each rank there (the MoE-layer session)"
        );
        return Ok(None);
    }
    let specs = env.ranks(ranks.clone())?;
    let started = Instant::now();
    let stopping = Arc::new(AtomicBool::new(false));
    let formed = Arc::new(AtomicUsize::new(0));
    let local = specs.len();
    let mut threads = Vec::with_capacity(local);
    for spec in specs {
        let (env, metrics, on_failure) = (env.clone(), metrics.clone(), on_failure.clone());
        let (stopping, formed, ranks) = (stopping.clone(), formed.clone(), ranks.clone());
        let rank = spec.rank;
        let t = std::thread::Builder::new()
            .name(format!("ep-rank-{rank}"))
            .spawn(move || {
                let on_formed = || {
                    if formed.fetch_add(1, Ordering::SeqCst) + 1 == local {
                        metrics.set_formed(true);
                        tracing::info!(
                            ranks = ?ranks,
                            world = env.world,
                            after_ms = started.elapsed().as_millis() as u64,
                            "ep group formed"
                        );
                    }
                };
                let Err(error) = run_rank(&env, &spec, started, &stopping, on_formed) else {
                    return;
                };
                if stopping.load(Ordering::SeqCst) {
                    tracing::info!(
                        rank,
                        "ep rank left its group while the worker shuts down: {error}"
                    );
                    return;
                }
                metrics.set_formed(false);
                metrics.count_failure();
                on_failure(Failure { rank, error });
            })
            .map_err(|e| GroupError::Spawn {
                rank,
                message: e.to_string(),
            })?;
        threads.push(t);
    }
    Ok(Some(Group { stopping, threads }))
}

/// One rank: resolve, join, heartbeat until an error (or the worker stops). The mesh is dropped
/// before this returns, which lets a failure relayed to the peers go out.
fn run_rank(
    env: &GroupEnv,
    spec: &RankSpec,
    started: Instant,
    stopping: &AtomicBool,
    on_formed: impl FnOnce(),
) -> Result<(), RankError> {
    let deadline = started + env.rendezvous_timeout;
    let rendezvous = resolve_until(&env.rendezvous, deadline, env.rendezvous_timeout)?;
    let mut cfg = MeshConfig::new(spec.rank, env.world, spec.listen, rendezvous);
    // What is left of the rendezvous timeout after the name resolved.
    cfg.rendezvous_timeout = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    cfg.step_timeout = STEP_TIMEOUT;
    cfg.max_message_bytes = MAX_MESSAGE_BYTES;
    tracing::debug!(rank = spec.rank, listen = %spec.listen, %rendezvous, "ep rank joining");
    let mut mesh = Mesh::join(&cfg)?;
    on_formed();
    while !stopping.load(Ordering::SeqCst) {
        std::thread::sleep(HEARTBEAT);
        mesh.all_to_all(vec![Vec::new(); env.world])?;
    }
    Ok(())
}

/// `addr` (`host:port`) resolved, retried until `deadline`: a pod's DNS name may appear only
/// after the pod is up.
fn resolve_until(addr: &str, deadline: Instant, after: Duration) -> Result<SocketAddr, RankError> {
    let fail = |last: String| RankError::Resolve {
        addr: addr.to_string(),
        after,
        last,
    };
    let (host, port) = split_host_port(addr).ok_or_else(|| fail("not host:port".into()))?;
    loop {
        let last = match (host, port).to_socket_addrs() {
            Ok(mut it) => match it.next() {
                Some(a) => return Ok(a),
                None => "no addresses".to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(fail(last));
        }
        std::thread::sleep(RESOLVE_RETRY);
    }
}

/// The worker's [`OnFailure`]: logs the failure at error level, writes its message to
/// `termination_log` (a write failure is logged, not fatal) and exits the process with status 1.
/// The first failure wins: a second rank failing meanwhile waits for the exit.
pub fn exit_on_failure(termination_log: PathBuf) -> OnFailure {
    let once = Arc::new(Mutex::new(()));
    Arc::new(move |f: Failure| {
        let _held = once.lock().unwrap_or_else(|e| e.into_inner());
        let msg = f.message();
        tracing::error!(rank = f.rank, "{msg}");
        if let Err(e) = write_termination_message(&termination_log, &msg) {
            tracing::error!(
                path = %termination_log.display(),
                "writing the termination message: {e}"
            );
        }
        std::process::exit(1);
    })
}

/// Writes `msg` (one line) to the termination message file.
pub fn write_termination_message(path: &Path, msg: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(msg.as_bytes())?;
    f.write_all(b"\n")?;
    f.flush()
}

#[cfg(test)]
mod tests;
