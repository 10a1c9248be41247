//! moe-e2e-pods: the kubelet of the local control plane's process-backed pods (e2e/cluster.sh
//! starts it; kwok is told to leave these pods alone with `--disregard-status-with-label-selector`).
//!
//! A pod that carries the label `moe.craft.dev/process-backed: "true"` gets, once the scheduler has
//! bound it to a node:
//! - an IP from this launcher's own loopback /24 (`--pod-cidr`; any 127.x.y.z is bindable locally),
//!   unique among its live pods, and a status written as a kubelet writes it: phase, podIP(s),
//!   hostIP, startTime, the Initialized/ContainersReady/Ready conditions and containerStatuses;
//! - its first container's `command` + `args` started as a local process, with the container's
//!   `env` and `envFrom` (values, ConfigMap and Secret key references, `fieldRef`), `$(VAR)`
//!   references expanded as the kubelet does, plus `POD_IP`, `POD_NAME`, `POD_NAMESPACE` and
//!   `POD_ROOT`; its volumes (ConfigMap, Secret, projected incl. a service-account token,
//!   downwardAPI, emptyDir, hostPath) materialised under `<pods-dir>/<ns>_<name>/volumes/<volume>`,
//!   each mount path `/a/b` reachable as `$POD_ROOT/a/b` (a symlink to the volume); command, args,
//!   env values and workingDir that name a path under a mount path are rewritten to that host path;
//!   stdout and stderr appended to `<pods-dir>/<ns>_<name>/log`, its pid in `.../pid`, its last
//!   exit status in `.../exit`;
//! - cluster DNS for env values: a value holding a pod's name through a headless Service,
//!   `<hostname>.<subdomain>.<ns>.svc` (or `...svc.cluster.local`) followed by `:port`, gets that
//!   pod's IP instead (the pod that answers to it: its namespace, `spec.subdomain` and
//!   `spec.hostname` or name; the Service itself is not checked). While the named pod has no IP
//!   the start waits (the container Waiting, retried every second), at most 60 s, then starts with
//!   the name left as it is and logs it. Arguments that use `$(VAR)` get the rewritten value;
//!   nothing else resolves these names (there is no DNS server);
//! - the container's `terminationMessagePath` (default `/dev/termination-log`): an empty file at
//!   `$POD_ROOT<path>` created before each start, its host path passed in `MOE_TERMINATION_LOG`;
//!   when the process exits, its content (at most 4 KiB), or with `FallbackToLogsOnError`, an
//!   empty file and a non-zero exit the tail of that run's log (80 lines, 2 KiB at most), becomes
//!   `state.terminated.message` next to exitCode, reason and finishedAt, and
//!   `lastState.terminated.message` once the container is restarted, as a kubelet reports it;
//! - its readiness probe (httpGet or tcpSocket, with periodSeconds, timeoutSeconds,
//!   successThreshold, failureThreshold, initialDelaySeconds) run against the process: Ready is
//!   False until the probe passes and turns False again after failureThreshold failed periods
//!   (a stopped or dead process), as on a real node. Without a probe Ready follows "running";
//! - restarts of an exited process under restartPolicy Always/OnFailure, after a back-off of 1 s
//!   doubling to 10 s (Ready False meanwhile, restartCount counted); under Never (or OnFailure
//!   after exit 0) the pod ends Succeeded/Failed;
//! - ConfigMap, Secret and downwardAPI volume contents re-synced every `--volume-sync-seconds`
//!   (the kubelet does it about once a minute), each file replaced atomically, so a rotated Secret
//!   reaches a running process;
//! - on deletion (deletionTimestamp set): SIGTERM to the process group, SIGKILL after the pod's
//!   grace period (at most `--max-grace-seconds`), then the pod deleted with gracePeriodSeconds=0,
//!   as a kubelet does once its containers are gone.
//!
//! - images: a container without `command` whose image's repository is mapped by
//!   `--image-entrypoint REPOSITORY=PROGRAM` runs PROGRAM with its `args` (the image's ENTRYPOINT
//!   stands in for the binary just built, e.g. the chart's operator image for `moe-operator`);
//! - pod networking: `0.0.0.0:<port>` in args and env values is narrowed to the pod IP (each pod
//!   has its own network namespace; here they share the host's);
//! - in-cluster API access: a container that mounts its ServiceAccount token (the projected
//!   volume at `/var/run/secrets/kubernetes.io/serviceaccount`) and sets no `KUBECONFIG` gets
//!   `KUBECONFIG` naming a kubeconfig with the API server and that token file and CA, so a client
//!   that infers its configuration acts with the pod's ServiceAccount, as in a cluster.
//!
//! Liveness and startup probes are not run. `command[0]` without a `/` is looked up on PATH (the
//! pod's PATH if its env sets one, else this launcher's). On SIGTERM/SIGINT the launcher stops
//! every process and leaves the pods as they are. Every API call has a deadline, and status that
//! could not be written (the API server away) is written again until the API shows it.

mod spec;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, EnvVar, Pod, Secret, ServiceAccount, Volume,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config, ResourceExt};
use spec::{ContainerState, IpPool, PodView, ProbeCheck, ProbeSpec, Readiness, Want, OPT_IN_LABEL};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Deadline of one API call; the API server may be paused (the chaos test stops it), and a call
/// that never returns would stall a pod's kubelet loop.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Restart back-off: first delay, and the cap it doubles up to.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A process that ran this long restarts after the first delay again.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// How often a pod's loop looks at what is due (probes, restarts, status writes).
const TICK: Duration = Duration::from_millis(100);
/// How long a status the API does not show yet is left before it is written again.
const STATUS_RECHECK: Duration = Duration::from_secs(2);
/// How long a start waits for the pods its env names by DNS to get IPs, and how often it looks.
const DNS_WAIT: Duration = Duration::from_secs(60);
const DNS_RETRY: Duration = Duration::from_secs(1);
/// The env variable that carries the host path of the container's terminationMessagePath.
const TERMINATION_LOG_ENV: &str = "MOE_TERMINATION_LOG";

#[derive(Parser, Debug)]
#[command(
    about = "The kubelet of process-backed pods: runs them as local processes on loopback pod IPs"
)]
struct Args {
    /// Kubeconfig of the control plane.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Directory that gets one `<namespace>_<name>` directory per pod.
    #[arg(long)]
    pods_dir: PathBuf,
    /// The loopback /24 pod IPs come from (keep it apart from kwok's --cidr).
    #[arg(long)]
    pod_cidr: String,
    /// The pods' status.hostIP (kwok's --node-ip).
    #[arg(long, default_value = "127.0.0.1")]
    host_ip: String,
    /// Upper bound on the SIGTERM -> SIGKILL grace period, whatever the pod asks for.
    #[arg(long, default_value_t = 10)]
    max_grace_seconds: u64,
    /// How often pods whose start failed (e.g. a missing Secret) are retried.
    #[arg(long, default_value_t = 3)]
    retry_seconds: u64,
    /// How often ConfigMap, Secret and downwardAPI volume contents are re-synced.
    #[arg(long, default_value_t = 3)]
    volume_sync_seconds: u64,
    /// `REPOSITORY=PROGRAM`: containers of that image (any tag) without a `command` run PROGRAM
    /// (looked up on PATH) with their `args`. Repeatable.
    #[arg(long = "image-entrypoint", value_parser = spec::parse_image_entrypoint)]
    image_entrypoints: Vec<(String, String)>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();
    let ips = IpPool::new(&args.pod_cidr).map_err(anyhow::Error::msg)?;
    let kc = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading --kubeconfig {}", args.kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading --kubeconfig {}", args.kubeconfig.display()))?;
    let api_server = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    tokio::fs::create_dir_all(&args.pods_dir)
        .await
        .with_context(|| format!("creating --pods-dir {}", args.pods_dir.display()))?;
    let launcher = Arc::new(Launcher {
        client,
        pods_dir: args.pods_dir.clone(),
        host_ip: args.host_ip.clone(),
        max_grace: Duration::from_secs(args.max_grace_seconds),
        retry: Duration::from_secs(args.retry_seconds.max(1)),
        volume_sync: Duration::from_secs(args.volume_sync_seconds.max(1)),
        state_env: std::env::var("MOE_E2E_STATE").ok(),
        ips: Mutex::new(ips),
        image_entrypoints: args.image_entrypoints,
        api_server,
    });
    launcher.run().await
}

struct Launcher {
    client: Client,
    pods_dir: PathBuf,
    host_ip: String,
    max_grace: Duration,
    retry: Duration,
    volume_sync: Duration,
    /// Passed to every process so `e2e/cluster.sh down` can recognise strays of this plane.
    state_env: Option<String>,
    ips: Mutex<IpPool>,
    /// `--image-entrypoint`: image repository -> the program standing in for its ENTRYPOINT.
    image_entrypoints: Vec<(String, String)>,
    /// The API server's URL, for the pods' in-cluster kubeconfig.
    api_server: String,
}

/// The loop that acts as one pod's kubelet, and how to reach it.
struct Entry {
    uid: String,
    /// The pod as last seen; None once it is gone from the API.
    tx: watch::Sender<Option<Pod>>,
    handle: JoinHandle<()>,
}

/// `fut` with [`API_TIMEOUT`], its error naming `what`.
async fn api<T, E: std::fmt::Display>(
    what: impl std::fmt::Display,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(API_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => bail!("{what}: {e}"),
        Err(_) => bail!("{what}: no answer within {API_TIMEOUT:?}"),
    }
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn lock_ips(l: &Launcher) -> std::sync::MutexGuard<'_, IpPool> {
    l.ips.lock().unwrap_or_else(|e| e.into_inner())
}

impl Launcher {
    async fn run(self: Arc<Self>) -> Result<()> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let cfg = watcher::Config::default().labels(&format!("{OPT_IN_LABEL}=true"));
        let mut events = watcher(api, cfg).default_backoff().boxed();
        let mut entries: HashMap<String, Entry> = HashMap::new();
        let mut detached: Vec<JoinHandle<()>> = Vec::new();
        // Uids whose loop has ended (pruned from `entries`).
        let mut finished: HashSet<String> = HashSet::new();
        // A (re)list's pods, dispatched together at its end so that the IPs pods already carry
        // are claimed before any new pod is given one.
        let mut init: Option<Vec<Pod>> = None;
        let (shutdown_tx, shutdown) = watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut prune = tokio::time::interval(Duration::from_secs(5));
        info!(pods_dir = %self.pods_dir.display(), "watching pods labelled {OPT_IN_LABEL}=true");
        loop {
            tokio::select! {
                ev = events.next() => match ev {
                    None => bail!("the pod watch stream ended"),
                    Some(Err(e)) => warn!("pod watch error (retrying with backoff): {e}"),
                    Some(Ok(watcher::Event::Init)) => init = Some(Vec::new()),
                    Some(Ok(watcher::Event::InitApply(pod))) => match init.as_mut() {
                        Some(buf) => buf.push(pod),
                        None => self.dispatch(pod, &mut entries, &mut detached, &finished, &shutdown),
                    },
                    Some(Ok(watcher::Event::InitDone)) => {
                        let pods = init.take().unwrap_or_default();
                        {
                            let mut ips = lock_ips(&self);
                            for p in &pods {
                                if let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
                                    ips.reserve(ip, &uid_of(p));
                                }
                            }
                        }
                        // Pods that went away while the watch was down.
                        let seen: HashSet<String> = pods.iter().map(key).collect();
                        let gone: Vec<String> =
                            entries.keys().filter(|k| !seen.contains(*k)).cloned().collect();
                        for k in gone {
                            if let Some(e) = entries.remove(&k) {
                                e.tx.send_replace(None);
                                detached.push(e.handle);
                            }
                        }
                        for p in pods {
                            self.dispatch(p, &mut entries, &mut detached, &finished, &shutdown);
                        }
                    }
                    Some(Ok(watcher::Event::Apply(pod))) => {
                        self.dispatch(pod, &mut entries, &mut detached, &finished, &shutdown)
                    }
                    Some(Ok(watcher::Event::Delete(pod))) => {
                        let k = key(&pod);
                        if entries.get(&k).is_some_and(|e| e.uid == uid_of(&pod)) {
                            let e = entries.remove(&k).expect("checked above");
                            e.tx.send_replace(None);
                            detached.push(e.handle);
                        }
                    }
                },
                _ = prune.tick() => {
                    detached.retain(|h| !h.is_finished());
                    entries.retain(|_, e| {
                        let done = e.handle.is_finished();
                        if done {
                            finished.insert(e.uid.clone());
                        }
                        !done
                    });
                    // Late events come within moments; a bounded memory of finished pods is enough.
                    if finished.len() > 4096 {
                        finished.clear();
                    }
                }
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        info!("stopping {} pod(s)", entries.len());
        shutdown_tx.send_replace(true);
        let all = entries
            .into_values()
            .map(|e| e.handle)
            .chain(detached)
            .collect::<Vec<_>>();
        let bound = self.max_grace + Duration::from_secs(10);
        if tokio::time::timeout(bound, futures::future::join_all(all))
            .await
            .is_err()
        {
            warn!("pod processes still stopping after {bound:?}; leaving");
        }
        Ok(())
    }

    /// Hands `pod` to its loop, starting one for a pod newly bound to a node.
    fn dispatch(
        self: &Arc<Self>,
        pod: Pod,
        entries: &mut HashMap<String, Entry>,
        detached: &mut Vec<JoinHandle<()>>,
        finished: &HashSet<String>,
        shutdown: &watch::Receiver<bool>,
    ) {
        let k = key(&pod);
        let uid = uid_of(&pod);
        if let Some(e) = entries.get(&k) {
            if e.uid == uid {
                // A finished loop is done with this pod for good (it finalised the deletion, or
                // the pod went away): a late event about it starts nothing.
                if !e.handle.is_finished() {
                    e.tx.send_replace(Some(pod));
                }
                return;
            }
        }
        if finished.contains(&uid) {
            return;
        }
        if matches!(spec::want(&pod), Want::Wait(_) | Want::Stop(_)) {
            return;
        }
        // Same name, new pod: the old one's process must be gone before the new one starts in
        // the same pod directory.
        let prev = entries.remove(&k).map(|old| {
            old.tx.send_replace(None);
            old.handle
        });
        let (tx, rx) = watch::channel(Some(pod));
        let handle = tokio::spawn(pod_loop(self.clone(), rx, prev, shutdown.clone()));
        if let Some(old) = entries.insert(k, Entry { uid, tx, handle }) {
            detached.push(old.handle);
        }
    }

    fn pod_dir(&self, pod: &Pod) -> PathBuf {
        self.pods_dir.join(spec::pod_dir_name(
            &pod.namespace().unwrap_or_default(),
            &pod.name_any(),
        ))
    }
}

/// How a process ended, as the kubelet reports it.
#[derive(Clone, Debug)]
struct Exit {
    code: i32,
    reason: String,
    /// The termination message (the file at terminationMessagePath, or the log's tail).
    message: String,
}

/// A running process of a pod.
struct Running {
    /// The init container it runs (its index), or None for the pod's container.
    init: Option<usize>,
    pid: u32,
    started: Instant,
    started_at: String,
    /// Some once the process has exited.
    exited: watch::Receiver<Option<Exit>>,
}

fn now() -> String {
    Timestamp::from_second(Timestamp::now().as_second())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The exit of the running process, if any (a select branch that never fires without one).
async fn exit_of(p: &mut Option<Running>) -> Exit {
    match p {
        Some(r) => {
            let _ = r.exited.wait_for(|e| e.is_some()).await;
            let e = r.exited.borrow().clone();
            e.unwrap_or(Exit {
                code: -1,
                reason: "Unknown".into(),
                message: String::new(),
            })
        }
        None => std::future::pending().await,
    }
}

async fn join_opt<T>(h: &mut Option<JoinHandle<T>>) -> Option<T> {
    match h {
        Some(h) => h.await.ok(),
        None => std::future::pending().await,
    }
}

/// One pod's kubelet: from its binding to its deletion (or the launcher's shutdown).
async fn pod_loop(
    l: Arc<Launcher>,
    mut rx: watch::Receiver<Option<Pod>>,
    prev: Option<JoinHandle<()>>,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Some(h) = prev {
        let _ = h.await;
    }
    let Some(first) = rx.borrow_and_update().clone() else {
        return;
    };
    let k = key(&first);
    let uid = uid_of(&first);
    let wanted_ip = first.status.as_ref().and_then(|s| s.pod_ip.clone());
    // An IP for the pod's lifetime; a pod that finished before we saw it needs none.
    let mut ip = lock_ips(&l).assign(wanted_ip.as_deref(), &uid);
    while ip.is_none() && matches!(spec::want(&first), Want::Run) {
        warn!(pod = %k, "no free pod IP in --pod-cidr; retrying");
        tokio::select! {
            _ = tokio::time::sleep(l.retry) => {}
            _ = shutdown.changed() => return,
            r = rx.changed() => if r.is_err() || rx.borrow().is_none() { return },
        }
        ip = lock_ips(&l).assign(wanted_ip.as_deref(), &uid);
    }
    let ip = ip.unwrap_or_default();
    let mut k8s = PodKubelet::new(l.clone(), &first, ip.clone());
    k8s.run(&mut rx, &mut shutdown).await;
    lock_ips(&l).release(&ip, &uid);
}

struct PodKubelet {
    l: Arc<Launcher>,
    key: String,
    pods: Api<Pod>,
    pod: Pod,
    ip: String,
    container: String,
    image: String,
    probe: Option<ProbeSpec>,
    readiness: Readiness,
    restart_count: i32,
    backoff: Duration,
    next_start: Instant,
    next_probe: Instant,
    next_sync: Instant,
    state: ContainerState,
    last_state: Option<ContainerState>,
    /// Succeeded/Failed once the process ended for good.
    finished: Option<&'static str>,
    start_time: String,
    ready_since: String,
    /// The view the API last acknowledged, and when it was written.
    acked: Option<(PodView, Instant)>,
    patch_retry_at: Instant,
    /// Since when a start has waited for a pod named by DNS in the env to get an IP.
    dns_wait_since: Option<Instant>,
    /// The pod's init containers, run one after the other (each to a zero exit) before the
    /// first container; `inits_done` of them have completed.
    inits: Vec<InitStatus>,
    inits_done: usize,
}

/// One init container and its status.
#[derive(Clone, Debug)]
struct InitStatus {
    container: Container,
    state: ContainerState,
    last_state: Option<ContainerState>,
    restart_count: i32,
}

impl PodKubelet {
    fn new(l: Arc<Launcher>, pod: &Pod, ip: String) -> Self {
        let c = pod.spec.as_ref().and_then(|s| s.containers.first());
        let t = now();
        let probe = match c.map(spec::readiness_probe).transpose() {
            Ok(p) => p.flatten(),
            Err(e) => {
                warn!(pod = %key(pod), "{e}; Ready follows whether the process runs");
                None
            }
        };
        PodKubelet {
            pods: Api::namespaced(l.client.clone(), &pod.namespace().unwrap_or_default()),
            l,
            key: key(pod),
            pod: pod.clone(),
            ip,
            container: c.map(|c| c.name.clone()).unwrap_or_default(),
            image: c.and_then(|c| c.image.clone()).unwrap_or_default(),
            probe,
            readiness: Readiness::default(),
            restart_count: 0,
            backoff: BACKOFF_START,
            next_start: Instant::now(),
            next_probe: Instant::now(),
            next_sync: Instant::now(),
            state: ContainerState::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            },
            last_state: None,
            finished: None,
            start_time: pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0.to_string())
                .unwrap_or_else(|| t.clone()),
            ready_since: t,
            acked: None,
            patch_retry_at: Instant::now(),
            dns_wait_since: None,
            inits: pod
                .spec
                .iter()
                .flat_map(|s| s.init_containers.iter().flatten())
                .map(|c| InitStatus {
                    container: c.clone(),
                    state: ContainerState::Waiting {
                        reason: "PodInitializing".into(),
                        message: String::new(),
                    },
                    last_state: None,
                    restart_count: 0,
                })
                .collect(),
            inits_done: 0,
        }
    }

    /// The init container to run next, while any has not completed.
    fn pending_init(&self) -> Option<usize> {
        (self.inits_done < self.inits.len()).then_some(self.inits_done)
    }

    fn view(&self, pid: Option<u32>) -> PodView {
        let initializing = self.pending_init().is_some();
        PodView {
            phase: self.finished.unwrap_or(match self.state {
                _ if initializing => "Pending",
                ContainerState::Running { .. } => "Running",
                _ if self.restart_count > 0 || self.last_state.is_some() => "Running",
                _ => "Pending",
            }),
            pod_ip: self.ip.clone(),
            host_ip: self.l.host_ip.clone(),
            start_time: self.start_time.clone(),
            ready: self.readiness.ready,
            ready_since: self.ready_since.clone(),
            initialized_at: self.start_time.clone(),
            container: self.container.clone(),
            image: self.image.clone(),
            pid,
            state: self.state.clone(),
            last_state: self.last_state.clone(),
            restart_count: self.restart_count,
            inits: self
                .inits
                .iter()
                .map(|i| spec::InitView {
                    name: i.container.name.clone(),
                    image: i.container.image.clone().unwrap_or_default(),
                    state: i.state.clone(),
                    last_state: i.last_state.clone(),
                    restart_count: i.restart_count,
                })
                .collect(),
            initialized: !initializing,
        }
    }

    fn set_ready(&mut self, ready: bool) {
        if self.readiness.ready != ready {
            self.readiness.ready = ready;
            self.ready_since = now();
            info!(pod = %self.key, ready, "readiness changed");
        }
    }

    async fn run(
        &mut self,
        rx: &mut watch::Receiver<Option<Pod>>,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let mut proc: Option<Running> = None;
        let mut probe_task: Option<JoinHandle<bool>> = None;
        let mut patch_task: Option<JoinHandle<Result<PodView, String>>> = None;
        let mut sync_task: Option<JoinHandle<()>> = None;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            match spec::want(&self.pod) {
                Want::Terminate => {
                    if let Some(h) = patch_task.take() {
                        h.abort();
                    }
                    self.terminate(proc.take(), rx, shutdown).await;
                    return;
                }
                Want::Stop(reason) => {
                    info!(pod = %self.key, "{reason}");
                    stop(&self.key, proc.take(), self.grace(None)).await;
                    return;
                }
                Want::Finished if self.finished.is_none() && proc.is_none() => {
                    // Finished before this loop began (e.g. the launcher was restarted).
                    return self.idle_until_deleted(rx, shutdown).await;
                }
                _ => {}
            }
            tokio::select! {
                r = rx.changed() => {
                    let gone = r.is_err() || rx.borrow().is_none();
                    if gone {
                        stop(&self.key, proc.take(), self.grace(None)).await;
                        return;
                    }
                    if let Some(p) = rx.borrow_and_update().clone() { self.pod = p; }
                }
                _ = shutdown.changed() => {
                    stop(&self.key, proc.take(), self.grace(None)).await;
                    return;
                }
                exit = exit_of(&mut proc) => {
                    let r = proc.take().expect("exit_of waits on a running process");
                    match r.init {
                        Some(i) => self.init_exited(i, r, exit),
                        None => self.exited(r, exit),
                    }
                }
                ok = join_opt(&mut probe_task) => {
                    probe_task = None;
                    // A result that arrives after the process it probed exited is stale.
                    if let (Some(ok), Some(p)) = (ok, self.probe.clone()) {
                        if proc.as_ref().is_some_and(|p| p.init.is_none()) {
                            let before = self.readiness.ready;
                            if self.readiness.observe(ok, &p) {
                                // Through set_ready, for the transition time and the log line.
                                self.readiness.ready = before;
                                self.set_ready(!before);
                            }
                        }
                    }
                }
                r = join_opt(&mut patch_task) => {
                    patch_task = None;
                    match r {
                        Some(Ok(v)) => self.acked = Some((v, Instant::now())),
                        Some(Err(e)) => {
                            debug!(pod = %self.key, "status not written (retrying): {e}");
                            self.patch_retry_at = Instant::now() + Duration::from_secs(1);
                        }
                        None => self.patch_retry_at = Instant::now() + Duration::from_secs(1),
                    }
                }
                _ = join_opt(&mut sync_task) => sync_task = None,
                _ = tick.tick() => {
                    let now_i = Instant::now();
                    if proc.is_none() && self.finished.is_none() && now_i >= self.next_start {
                        proc = self.start().await;
                    }
                    if proc.as_ref().is_some_and(|p| p.init.is_none()) {
                        match &self.probe {
                            None => self.set_ready(true),
                            Some(p) if probe_task.is_none() && now_i >= self.next_probe => {
                                self.next_probe = now_i + p.period;
                                let (ip, p) = (self.ip.clone(), p.clone());
                                probe_task = Some(tokio::spawn(async move { probe(&ip, &p).await }));
                            }
                            Some(_) => {}
                        }
                    }
                    if sync_task.is_none() && proc.is_some() && now_i >= self.next_sync {
                        self.next_sync = now_i + self.l.volume_sync;
                        let (l, pod) = (self.l.clone(), self.pod.clone());
                        sync_task = Some(tokio::spawn(async move {
                            let _ = tokio::time::timeout(3 * API_TIMEOUT, l.refresh_volumes(&pod)).await;
                        }));
                    }
                    if patch_task.is_none() && now_i >= self.patch_retry_at {
                        let v = self.view(proc.as_ref().map(|r| r.pid));
                        let due = match &self.acked {
                            None => true,
                            Some((a, _)) if *a != v => true,
                            // Written, but the API (as watched) shows something else: an older
                            // write that landed later, or a write lost to a paused API server.
                            Some((_, at)) => at.elapsed() >= STATUS_RECHECK && !v.shown_by(&self.pod),
                        };
                        if due {
                            let (pods, name) = (self.pods.clone(), self.pod.name_any());
                            patch_task = Some(tokio::spawn(async move {
                                api(
                                    format!("writing the status of pod {name}"),
                                    pods.patch_status(&name, &PatchParams::default(), &Patch::Strategic(v.status_patch())),
                                )
                                .await
                                .map(|_| v)
                                .map_err(|e| format!("{e:#}"))
                            }));
                        }
                    }
                }
            }
        }
    }

    /// Pod grace period: the deletion's (when given) or the spec's, at most `--max-grace-seconds`.
    fn grace(&self, deletion: Option<i64>) -> Duration {
        let spec = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30);
        Duration::from_secs(deletion.unwrap_or(spec).max(0) as u64).min(self.l.max_grace)
    }

    /// Starts the process; on failure the pod waits with the reason and is retried.
    async fn start(&mut self) -> Option<Running> {
        let mut pod = self.pod.clone();
        let st = pod.status.get_or_insert_with(Default::default);
        st.pod_ip = Some(self.ip.clone());
        st.host_ip = Some(self.l.host_ip.clone());
        let dns_wait_over = self.dns_wait_since.is_some_and(|t| t.elapsed() >= DNS_WAIT);
        let init = self.pending_init();
        let container = match init {
            Some(i) => self.inits[i].container.clone(),
            None => match pod.spec.as_ref().and_then(|s| s.containers.first()) {
                Some(c) => c.clone(),
                None => {
                    self.state = ContainerState::Waiting {
                        reason: "CreateContainerConfigError".into(),
                        message: "pod has no containers".into(),
                    };
                    self.next_start = Instant::now() + self.l.retry;
                    return None;
                }
            },
        };
        let started = tokio::time::timeout(
            4 * API_TIMEOUT,
            self.l.start(&pod, &container, &self.ip, dns_wait_over),
        )
        .await
        .map(|r| {
            r.map(|mut run| {
                run.init = init;
                run
            })
        });
        if let (Some(i), Ok(Ok(r))) = (init, &started) {
            let st = &mut self.inits[i];
            if st.last_state.is_some() {
                st.restart_count += 1;
            }
            st.state = ContainerState::Running {
                started_at: r.started_at.clone(),
            };
            self.dns_wait_since = None;
            info!(pod = %self.key, container = %st.container.name, "init container started");
            return started.ok().and_then(Result::ok);
        }
        match started
            .unwrap_or_else(|_| Err(anyhow::anyhow!("starting took over {:?}", 4 * API_TIMEOUT)))
        {
            Err(e) if e.downcast_ref::<DnsPending>().is_some() => {
                if self.dns_wait_since.is_none() {
                    info!(pod = %self.key, "{e}");
                    self.dns_wait_since = Some(Instant::now());
                }
                self.state = ContainerState::Waiting {
                    reason: "ContainerCreating".into(),
                    message: e.to_string(),
                };
                self.next_start = Instant::now() + DNS_RETRY;
                None
            }
            Ok(r) => {
                self.dns_wait_since = None;
                if self.last_state.is_some() {
                    self.restart_count += 1;
                }
                self.state = ContainerState::Running {
                    started_at: r.started_at.clone(),
                };
                self.readiness = Readiness::default();
                self.readiness.ready = false;
                let delay = self
                    .probe
                    .as_ref()
                    .map(|p| p.initial_delay)
                    .unwrap_or_default();
                self.next_probe = Instant::now() + delay;
                self.next_sync = Instant::now() + self.l.volume_sync;
                Some(r)
            }
            Err(e) => {
                let msg = format!("moe-e2e-pods: cannot start pod {}: {e:#}\n", self.key);
                warn!("{}", msg.trim_end());
                append(&self.l.pod_dir(&self.pod).join("log"), &msg).await;
                self.state = ContainerState::Waiting {
                    reason: "CreateContainerConfigError".into(),
                    message: format!("{e:#}"),
                };
                self.next_start = Instant::now() + self.l.retry;
                None
            }
        }
    }

    /// An init container ended: on a zero exit the next one (or the pod's container) starts;
    /// otherwise it runs again after a back-off (restartPolicy Always/OnFailure, as the kubelet
    /// does: Init:CrashLoopBackOff) or the pod fails (Never).
    fn init_exited(&mut self, i: usize, r: Running, exit: Exit) {
        let started_at = match &self.inits[i].state {
            ContainerState::Running { started_at } => started_at.clone(),
            _ => r.started_at.clone(),
        };
        let ended = ContainerState::Terminated {
            exit_code: exit.code,
            reason: exit.reason.clone(),
            message: exit.message,
            started_at,
            finished_at: now(),
        };
        let name = self.inits[i].container.name.clone();
        if exit.code == 0 {
            info!(pod = %self.key, container = %name, "init container completed");
            self.inits[i].state = ended;
            self.inits_done += 1;
            self.next_start = Instant::now();
            self.backoff = BACKOFF_START;
            return;
        }
        let policy = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        if policy == "Never" {
            self.inits[i].state = ended;
            self.finished = Some("Failed");
            return;
        }
        if r.started.elapsed() >= BACKOFF_RESET_AFTER {
            self.backoff = BACKOFF_START;
        }
        self.next_start = Instant::now() + self.backoff;
        info!(pod = %self.key, container = %name, code = exit.code, "init container failed; running it again in {:?}", self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.inits[i].last_state = Some(ended);
        self.inits[i].state = ContainerState::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: format!(
                "back-off restarting the init container (exit {}, {})",
                exit.code, exit.reason
            ),
        };
    }

    /// The process ended: restart it after a back-off, or finish the pod, per restartPolicy.
    fn exited(&mut self, r: Running, exit: Exit) {
        let Exit {
            code,
            reason,
            message,
        } = exit;
        self.set_ready(false);
        self.readiness = Readiness::default();
        let started_at = match &self.state {
            ContainerState::Running { started_at } => started_at.clone(),
            _ => r.started_at.clone(),
        };
        let ended = ContainerState::Terminated {
            exit_code: code,
            reason: reason.clone(),
            message,
            started_at,
            finished_at: now(),
        };
        let policy = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let restart = policy == "Always" || (policy == "OnFailure" && code != 0);
        if restart {
            if r.started.elapsed() >= BACKOFF_RESET_AFTER {
                self.backoff = BACKOFF_START;
            }
            self.next_start = Instant::now() + self.backoff;
            info!(pod = %self.key, code, "restarting in {:?} (restartPolicy {policy})", self.backoff);
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            self.last_state = Some(ended);
            self.state = ContainerState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: format!("back-off restarting the process (exit {code}, {reason})"),
            };
        } else {
            self.finished = Some(if code == 0 { "Succeeded" } else { "Failed" });
            self.state = ended;
        }
    }

    /// Deletion: stop the process within the grace period, then remove the pod from the API.
    async fn terminate(
        &mut self,
        proc: Option<Running>,
        rx: &mut watch::Receiver<Option<Pod>>,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let grace = self.grace(self.pod.metadata.deletion_grace_period_seconds);
        info!(pod = %self.key, "terminating: stopping its process (grace {grace:?})");
        stop(&self.key, proc, grace).await;
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: self.pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        let name = self.pod.name_any();
        loop {
            match tokio::time::timeout(API_TIMEOUT, self.pods.delete(&name, &dp)).await {
                Ok(Ok(_)) => {
                    info!(pod = %self.key, "deleted");
                    return;
                }
                // Gone already, or the name belongs to a newer pod now.
                Ok(Err(kube::Error::Api(e))) if e.code == 404 || e.code == 409 => return,
                Ok(Err(e)) => warn!(pod = %self.key, "deleting (retrying): {e}"),
                Err(_) => {
                    warn!(pod = %self.key, "deleting: no answer within {API_TIMEOUT:?} (retrying)")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                r = rx.changed() => if r.is_err() || rx.borrow().is_none() { return },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// A finished pod: nothing runs; only its deletion needs finalising.
    async fn idle_until_deleted(
        &mut self,
        rx: &mut watch::Receiver<Option<Pod>>,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        loop {
            if matches!(spec::want(&self.pod), Want::Terminate) {
                return self.terminate(None, rx, shutdown).await;
            }
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() { return }
                    match rx.borrow_and_update().clone() {
                        Some(p) => self.pod = p,
                        None => return,
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// One probe of the process on the pod IP: true on success.
async fn probe(ip: &str, p: &ProbeSpec) -> bool {
    let attempt = async {
        match &p.check {
            ProbeCheck::Tcp { port } => tokio::net::TcpStream::connect((ip, *port)).await.is_ok(),
            ProbeCheck::Http { path, port } => {
                let Ok(mut s) = tokio::net::TcpStream::connect((ip, *port)).await else {
                    return false;
                };
                let req = format!(
                    "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/moe-e2e-pods\r\n\
                     Accept: */*\r\nConnection: close\r\n\r\n"
                );
                if s.write_all(req.as_bytes()).await.is_err() {
                    return false;
                }
                // The status line is all a probe needs; read at most 1 KiB of it.
                let mut buf = Vec::with_capacity(128);
                let mut chunk = [0u8; 256];
                while buf.len() < 1024 && !buf.contains(&b'\n') {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&buf);
                spec::http_probe_ok(text.lines().next().unwrap_or(""))
            }
        }
    };
    tokio::time::timeout(p.timeout, attempt)
        .await
        .unwrap_or(false)
}

/// A pod DNS name in the container's env names a pod that has no IP yet: the start is retried.
#[derive(Debug)]
struct DnsPending(String);

impl std::fmt::Display for DnsPending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "waiting for the IP of {} (cluster DNS emulation)",
            self.0
        )
    }
}

impl std::error::Error for DnsPending {}

impl Launcher {
    /// Starts the pod's process. With `dns_wait_over` false, a pod DNS name in the env whose pod
    /// has no IP yet fails the start with [`DnsPending`]; with it true the name is left as it is.
    async fn start(
        &self,
        pod: &Pod,
        container: &Container,
        pod_ip: &str,
        dns_wait_over: bool,
    ) -> Result<Running> {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let pod_spec = pod.spec.as_ref().context("pod has no spec")?;
        if pod_spec.containers.len() > 1 {
            warn!(pod = %format!("{ns}/{name}"), "only the first container gets a process");
        }
        let dir = self.pod_dir(pod);
        // A new pod under a reused name starts from a clean directory.
        let uid_file = dir.join("uid");
        if tokio::fs::read_to_string(&uid_file).await.ok().as_deref() != Some(uid.as_str()) {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        let root = dir.join("root");
        for d in [&dir, &root] {
            tokio::fs::create_dir_all(d)
                .await
                .with_context(|| format!("creating {}", d.display()))?;
        }
        tokio::fs::write(&uid_file, &uid).await?;

        let mounts = self
            .materialise_volumes(pod, container, &dir, &root)
            .await?;
        let mut env = self
            .container_env(pod, container, pod_ip, &root, &mounts)
            .await?;
        self.resolve_pod_dns(pod, pod_ip, &mut env, dns_wait_over)
            .await?;
        // terminationMessagePath: a fresh empty file for each start, its host path in
        // MOE_TERMINATION_LOG; read back when the process exits.
        let term_path = container
            .termination_message_path
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| spec::DEFAULT_TERMINATION_MESSAGE_PATH.into());
        let term_file = spec::host_path(&root, &term_path);
        if let Some(parent) = term_file.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        tokio::fs::write(&term_file, b"").await.with_context(|| {
            format!("creating {} (terminationMessagePath)", term_file.display())
        })?;
        env.retain(|(k, _)| k != TERMINATION_LOG_ENV);
        env.push((TERMINATION_LOG_ENV.into(), term_file.display().to_string()));
        // In-cluster configuration: the pod's mounted ServiceAccount token, through KUBECONFIG.
        if !env.iter().any(|(k, _)| k == "KUBECONFIG") {
            if let Some((_, sa_dir)) = mounts
                .iter()
                .find(|(mp, _)| mp.trim_end_matches('/') == spec::SERVICE_ACCOUNT_MOUNT)
            {
                let kc = dir.join("in-cluster.kubeconfig");
                tokio::fs::write(
                    &kc,
                    spec::in_cluster_kubeconfig(&self.api_server, sa_dir, &ns),
                )
                .await
                .with_context(|| format!("writing {}", kc.display()))?;
                env.push(("KUBECONFIG".into(), kc.display().to_string()));
            }
        }
        for (_, v) in env.iter_mut() {
            *v = spec::narrow_wildcard_bind(v, pod_ip);
        }
        let term_policy = container.termination_message_policy.clone();
        let rewrite = |s: &str| {
            spec::narrow_wildcard_bind(
                &spec::rewrite_mount_paths(&spec::expand_vars(s, &env), &mounts),
                pod_ip,
            )
        };
        let image = container.image.clone().unwrap_or_default();
        let entrypoint: Vec<String> = match container.command.as_deref() {
            Some(c) if !c.is_empty() => c.to_vec(),
            _ => match spec::image_entrypoint(&image, &self.image_entrypoints) {
                Some(prog) => vec![prog.to_string()],
                None => bail!(
                    "container {:?} has no command and image {image:?} is not mapped: process-backed \
                     pods need the container's command, or the launcher's --image-entrypoint \
                     {}=PROGRAM (there is no image to take an entrypoint from)",
                    container.name,
                    spec::image_repository(&image)
                ),
            },
        };
        let argv: Vec<String> = entrypoint
            .iter()
            .chain(container.args.iter().flatten())
            .map(|a| rewrite(a))
            .collect();
        let program = resolve_program(&argv[0], &env)?;
        let cwd = match container.working_dir.as_deref() {
            Some(w) => PathBuf::from(rewrite(w)),
            None => root.clone(),
        };

        let log_path = dir.join("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        // Where this start's output begins: the fallback message is the tail of this run's log.
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {} (cwd {})", program.display(), cwd.display()))?;
        let pid = child.id().context("child exited before its pid was read")?;
        tokio::fs::write(dir.join("pid"), pid.to_string()).await?;
        let _ = tokio::fs::remove_file(dir.join("exit")).await;
        info!(pod = %format!("{ns}/{name}"), pid, ip = pod_ip, "started {}", argv.join(" "));

        let (tx, rx) = watch::channel(None);
        let exit_file = dir.join("exit");
        let log_file = log_path.clone();
        let pod_key = format!("{ns}/{name}");
        tokio::spawn(async move {
            let status = child.wait().await;
            let (text, code, reason) = match &status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    let code = s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
                    let reason = if s.success() { "Completed" } else { "Error" };
                    (s.to_string(), code, reason)
                }
                Err(e) => (format!("wait failed: {e}"), -1, "Unknown"),
            };
            info!(pod = %pod_key, pid, "process exited: {text}");
            let file = read_bounded(&term_file, 0, spec::MAX_TERMINATION_MESSAGE_BYTES).await;
            let log_tail = read_tail(&log_file, log_start, spec::FALLBACK_LOG_BYTES).await;
            let message =
                spec::termination_message(&file, term_policy.as_deref(), code != 0, &log_tail);
            if !message.is_empty() {
                info!(pod = %pod_key, pid, "termination message: {}", message.lines().next().unwrap_or(""));
            }
            let _ = tokio::fs::write(&exit_file, format!("{text}\n")).await;
            append(&log_file, &format!("moe-e2e-pods: process {pid} {text}\n")).await;
            let _ = tx.send(Some(Exit {
                code,
                reason: reason.to_string(),
                message,
            }));
        });
        Ok(Running {
            init: None,
            pid,
            started: Instant::now(),
            started_at: now(),
            exited: rx,
        })
    }

    /// Emulates cluster DNS for the env: a value naming a pod as `<hostname>.<subdomain>.<ns>.svc`
    /// (or `...svc.cluster.local`) followed by `:port` gets that pod's IP instead of the name
    /// (this pod's own IP is known before the API shows it). A named pod without an IP yet fails
    /// the start with [`DnsPending`], unless `wait_over`: then the name stays and it is logged.
    async fn resolve_pod_dns(
        &self,
        pod: &Pod,
        pod_ip: &str,
        env: &mut [(String, String)],
        wait_over: bool,
    ) -> Result<()> {
        let mut names: Vec<spec::PodDnsName> = env
            .iter()
            .flat_map(|(_, v)| spec::pod_dns_names(v))
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        names.sort();
        names.dedup();
        let mut ips: HashMap<spec::PodDnsName, String> = HashMap::new();
        let namespaces: HashSet<String> = names.iter().map(|n| n.namespace.clone()).collect();
        for ns in namespaces {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            let list = api(
                format!("listing the pods of namespace {ns} (DNS emulation)"),
                pods.list(&Default::default()),
            )
            .await?;
            for n in names.iter().filter(|n| n.namespace == ns) {
                let ip = list
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter(|p| spec::pod_answers_to(p, n))
                    .find_map(|p| {
                        if p.metadata.uid.is_some() && p.metadata.uid == pod.metadata.uid {
                            return Some(pod_ip.to_string());
                        }
                        p.status
                            .as_ref()
                            .and_then(|s| s.pod_ip.clone())
                            .filter(|ip| !ip.is_empty())
                    });
                if let Some(ip) = ip {
                    ips.insert(n.clone(), ip);
                }
            }
        }
        let missing: Vec<String> = names
            .iter()
            .filter(|n| !ips.contains_key(n))
            .map(ToString::to_string)
            .collect();
        if !missing.is_empty() {
            if !wait_over {
                return Err(DnsPending(missing.join(", ")).into());
            }
            warn!(pod = %key(pod), "no IP for {} after {DNS_WAIT:?}: starting with the name(s) unresolved", missing.join(", "));
        }
        for (k, v) in env.iter_mut() {
            let new = spec::rewrite_pod_dns(v, |n| ips.get(n).cloned());
            if new != *v {
                debug!(pod = %key(pod), "DNS emulation: {k}={v} -> {new}");
                *v = new;
            }
        }
        Ok(())
    }

    /// The process env: a minimal base (PATH, HOME, the pod's identity and IP, POD_ROOT), then
    /// `envFrom`, then `env`, in the kubelet's order, so the pod's own entries win.
    async fn container_env(
        &self,
        pod: &Pod,
        c: &Container,
        pod_ip: &str,
        root: &Path,
        mounts: &[(String, PathBuf)],
    ) -> Result<Vec<(String, String)>> {
        let ns = pod.namespace().unwrap_or_default();
        let mut env: Vec<(String, String)> = Vec::new();
        for k in ["PATH", "HOME", "TMPDIR", "LANG"] {
            if let Ok(v) = std::env::var(k) {
                env.push((k.into(), v));
            }
        }
        env.push(("POD_NAME".into(), pod.name_any()));
        env.push(("POD_NAMESPACE".into(), ns.clone()));
        env.push(("POD_IP".into(), pod_ip.into()));
        env.push(("POD_ROOT".into(), root.display().to_string()));
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            if let Some(r) = &from.config_map_ref {
                let cm = self
                    .config_map(&ns, &r.name, r.optional.unwrap_or(false))
                    .await?;
                for (k, v) in cm.iter().flat_map(|cm| cm.data.iter().flatten()) {
                    env.push((format!("{prefix}{k}"), v.clone()));
                }
            }
            if let Some(r) = &from.secret_ref {
                let s = self
                    .secret(&ns, &r.name, r.optional.unwrap_or(false))
                    .await?;
                for (k, v) in s.iter().flat_map(|s| s.data.iter().flatten()) {
                    env.push((format!("{prefix}{k}"), String::from_utf8_lossy(&v.0).into()));
                }
            }
        }
        for e in c.env.iter().flatten() {
            if let Some(v) = self.env_value(pod, &ns, e).await? {
                let v = spec::rewrite_mount_paths(&spec::expand_vars(&v, &env), mounts);
                env.push((e.name.clone(), v));
            }
        }
        if let Some(s) = &self.state_env {
            env.push(("MOE_E2E_STATE".into(), s.clone()));
        }
        // Last definition wins; keep one entry per name for the child.
        let mut dedup: Vec<(String, String)> = Vec::new();
        for (k, v) in env {
            dedup.retain(|(k2, _)| *k2 != k);
            dedup.push((k, v));
        }
        Ok(dedup)
    }

    /// One `env` entry's value; None for an optional reference that is missing.
    async fn env_value(&self, pod: &Pod, ns: &str, e: &EnvVar) -> Result<Option<String>> {
        let Some(from) = &e.value_from else {
            return Ok(Some(e.value.clone().unwrap_or_default()));
        };
        if let Some(r) = &from.config_map_key_ref {
            let optional = r.optional.unwrap_or(false);
            let cm = self.config_map(ns, &r.name, optional).await?;
            let v = cm.and_then(|cm| cm.data.and_then(|mut d| d.remove(&r.key)));
            return match v {
                Some(v) => Ok(Some(v)),
                None if optional => Ok(None),
                None => bail!(
                    "env {}: ConfigMap {ns}/{} has no key {:?}",
                    e.name,
                    r.name,
                    r.key
                ),
            };
        }
        if let Some(r) = &from.secret_key_ref {
            let optional = r.optional.unwrap_or(false);
            let s = self.secret(ns, &r.name, optional).await?;
            let v = s.and_then(|s| s.data.and_then(|mut d| d.remove(&r.key)));
            return match v {
                Some(v) => Ok(Some(String::from_utf8_lossy(&v.0).into())),
                None if optional => Ok(None),
                None => bail!(
                    "env {}: Secret {ns}/{} has no key {:?}",
                    e.name,
                    r.name,
                    r.key
                ),
            };
        }
        if let Some(f) = &from.field_ref {
            return spec::field_ref(pod, f)
                .map(Some)
                .map_err(|m| anyhow::anyhow!("env {}: {m}", e.name));
        }
        bail!(
            "env {}: only value, configMapKeyRef, secretKeyRef and fieldRef are supported",
            e.name
        )
    }

    async fn config_map(&self, ns: &str, name: &str, optional: bool) -> Result<Option<ConfigMap>> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        match api(format!("reading ConfigMap {ns}/{name}"), cms.get_opt(name)).await? {
            Some(cm) => Ok(Some(cm)),
            None if optional => Ok(None),
            None => bail!("ConfigMap {ns}/{name} not found (the pod references it)"),
        }
    }

    async fn secret(&self, ns: &str, name: &str, optional: bool) -> Result<Option<Secret>> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        match api(format!("reading Secret {ns}/{name}"), secrets.get_opt(name)).await? {
            Some(s) => Ok(Some(s)),
            None if optional => Ok(None),
            None => bail!("Secret {ns}/{name} not found (the pod references it)"),
        }
    }

    /// Writes every volume the container mounts under `<dir>/volumes/<volume>` and links each mount path
    /// under `root` to it. Returns (mountPath, host path) pairs for path rewriting.
    async fn materialise_volumes(
        &self,
        pod: &Pod,
        c: &Container,
        dir: &Path,
        root: &Path,
    ) -> Result<Vec<(String, PathBuf)>> {
        let ns = pod.namespace().unwrap_or_default();
        let volumes: &[Volume] = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_deref())
            .unwrap_or(&[]);
        let mut done: HashSet<String> = HashSet::new();
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let v = volumes
                .iter()
                .find(|v| v.name == m.name)
                .with_context(|| format!("volumeMount {:?} names no volume of the pod", m.name))?;
            let vdir = dir.join("volumes").join(&v.name);
            if done.insert(v.name.clone()) {
                tokio::fs::create_dir_all(&vdir).await?;
                self.write_volume(pod, &ns, v, &vdir, false)
                    .await
                    .with_context(|| format!("volume {:?}", v.name))?;
            }
            let mut target = match &v.host_path {
                Some(hp) => PathBuf::from(&hp.path),
                None => vdir,
            };
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                target = target.join(spec::safe_relative(sub).map_err(anyhow::Error::msg)?);
            }
            let link = spec::host_path(root, &m.mount_path);
            if let Some(parent) = link.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            let _ = tokio::fs::remove_file(&link).await;
            tokio::fs::symlink(&target, &link)
                .await
                .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
            mounts.push((m.mount_path.clone(), link));
        }
        Ok(mounts)
    }

    /// Re-syncs the contents of the ConfigMap, Secret and downwardAPI volumes the running process
    /// mounts (service-account tokens are left as issued). A source that cannot be read now keeps
    /// its files, as on a kubelet.
    async fn refresh_volumes(&self, pod: &Pod) {
        let ns = pod.namespace().unwrap_or_default();
        let Some(c) = pod.spec.as_ref().and_then(|s| s.containers.first()) else {
            return;
        };
        let volumes: &[Volume] = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_deref())
            .unwrap_or(&[]);
        let dir = self.pod_dir(pod);
        let mut done: HashSet<&str> = HashSet::new();
        for m in c.volume_mounts.iter().flatten() {
            let Some(v) = volumes.iter().find(|v| v.name == m.name) else {
                continue;
            };
            if !done.insert(&v.name) {
                continue;
            }
            let vdir = dir.join("volumes").join(&v.name);
            if let Err(e) = self.write_volume(pod, &ns, v, &vdir, true).await {
                debug!(pod = %key(pod), volume = %v.name, "volume not re-synced: {e:#}");
            }
        }
    }

    /// Writes one volume's files; with `refresh`, service-account tokens are not requested again.
    async fn write_volume(
        &self,
        pod: &Pod,
        ns: &str,
        v: &Volume,
        vdir: &Path,
        refresh: bool,
    ) -> Result<()> {
        if let Some(src) = &v.config_map {
            let optional = src.optional.unwrap_or(false);
            if let Some(cm) = self.config_map(ns, &src.name, optional).await? {
                write_config_map(
                    &cm,
                    src.items.as_deref(),
                    vdir,
                    &format!("ConfigMap {ns}/{}", src.name),
                )
                .await?;
            }
        } else if let Some(src) = &v.secret {
            let name = src.secret_name.clone().unwrap_or_default();
            let optional = src.optional.unwrap_or(false);
            if let Some(s) = self.secret(ns, &name, optional).await? {
                write_secret(
                    &s,
                    src.items.as_deref(),
                    vdir,
                    &format!("Secret {ns}/{name}"),
                )
                .await?;
            }
        } else if let Some(p) = &v.projected {
            for s in p.sources.iter().flatten() {
                if let Some(src) = &s.config_map {
                    if let Some(cm) = self
                        .config_map(ns, &src.name, src.optional.unwrap_or(false))
                        .await?
                    {
                        write_config_map(
                            &cm,
                            src.items.as_deref(),
                            vdir,
                            &format!("ConfigMap {ns}/{}", src.name),
                        )
                        .await?;
                    }
                }
                if let Some(src) = &s.secret {
                    if let Some(sec) = self
                        .secret(ns, &src.name, src.optional.unwrap_or(false))
                        .await?
                    {
                        write_secret(
                            &sec,
                            src.items.as_deref(),
                            vdir,
                            &format!("Secret {ns}/{}", src.name),
                        )
                        .await?;
                    }
                }
                if let Some(d) = &s.downward_api {
                    write_downward(pod, d.items.as_deref().unwrap_or(&[]), vdir).await?;
                }
                if let Some(t) = s.service_account_token.as_ref().filter(|_| !refresh) {
                    let sa = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.clone())
                        .unwrap_or_else(|| "default".into());
                    let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
                    let req = TokenRequest {
                        spec: TokenRequestSpec {
                            audiences: t.audience.iter().cloned().collect(),
                            expiration_seconds: t.expiration_seconds,
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    let tok = api(
                        format!("requesting a token for ServiceAccount {ns}/{sa}"),
                        sas.create_token_request(&sa, &PostParams::default(), &req),
                    )
                    .await?;
                    let token = tok.status.map(|s| s.token).unwrap_or_default();
                    write_file(vdir, &t.path, token.as_bytes()).await?;
                }
            }
        } else if let Some(d) = &v.downward_api {
            write_downward(pod, d.items.as_deref().unwrap_or(&[]), vdir).await?;
        } else if v.empty_dir.is_none() && v.host_path.is_none() && !refresh {
            warn!(volume = %v.name, "volume type not materialised; the process gets an empty directory");
        }
        Ok(())
    }
}

async fn write_config_map(
    cm: &ConfigMap,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    vdir: &Path,
    what: &str,
) -> Result<()> {
    let mut data: HashMap<String, Vec<u8>> = HashMap::new();
    for (k, v) in cm.data.iter().flatten() {
        data.insert(k.clone(), v.clone().into_bytes());
    }
    for (k, v) in cm.binary_data.iter().flatten() {
        data.insert(k.clone(), v.0.clone());
    }
    write_keys(&data, items, vdir, what).await
}

async fn write_secret(
    s: &Secret,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    vdir: &Path,
    what: &str,
) -> Result<()> {
    let data: HashMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    write_keys(&data, items, vdir, what).await
}

async fn write_keys(
    data: &HashMap<String, Vec<u8>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    vdir: &Path,
    what: &str,
) -> Result<()> {
    let mut keys: Vec<String> = data.keys().cloned().collect();
    keys.sort();
    for (rel, k) in spec::volume_files(&keys, items, what).map_err(anyhow::Error::msg)? {
        write_file(vdir, &rel, &data[&k]).await?;
    }
    Ok(())
}

async fn write_downward(pod: &Pod, items: &[DownwardAPIVolumeFile], vdir: &Path) -> Result<()> {
    for it in items {
        if let Some(f) = &it.field_ref {
            let v = spec::field_ref(pod, f).map_err(anyhow::Error::msg)?;
            write_file(vdir, &it.path, v.as_bytes()).await?;
        } else {
            warn!(path = %it.path, "downwardAPI item without fieldRef is not materialised");
        }
    }
    Ok(())
}

/// Writes a volume file when its content differs, through a rename so that a process reading it
/// (a re-read token file) sees the old or the new content, never a partial one.
async fn write_file(vdir: &Path, rel: &str, bytes: &[u8]) -> Result<()> {
    let path = vdir.join(spec::safe_relative(rel).map_err(anyhow::Error::msg)?);
    if tokio::fs::read(&path).await.is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let parent = path.parent().unwrap_or(vdir);
    tokio::fs::create_dir_all(parent).await?;
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!("..{file_name}.tmp"));
    tokio::fs::write(&tmp, bytes)
        .await
        .with_context(|| format!("writing {}", tmp.display()))?;
    tokio::fs::rename(&tmp, &path)
        .await
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// `command[0]` as given when it contains a `/`, else the first executable of that name on PATH.
fn resolve_program(arg0: &str, env: &[(String, String)]) -> Result<PathBuf> {
    if arg0.contains('/') {
        return Ok(PathBuf::from(arg0));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    for d in std::env::split_paths(&path) {
        let cand = d.join(arg0);
        if let Ok(md) = std::fs::metadata(&cand) {
            use std::os::unix::fs::PermissionsExt;
            if md.is_file() && md.permissions().mode() & 0o111 != 0 {
                return Ok(cand);
            }
        }
    }
    bail!("command {arg0:?} not found on PATH ({path}); put its directory on the launcher's PATH or use an absolute path")
}

fn key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// At most `max` bytes of `path` from `offset` on (empty when it cannot be read).
async fn read_bounded(path: &Path, offset: u64, max: usize) -> Vec<u8> {
    use tokio::io::AsyncSeekExt;
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max as u64).read_to_end(&mut buf).await;
    buf
}

/// The last `max` bytes of `path` past `from` (a log's tail since a process started).
async fn read_tail(path: &Path, from: u64, max: usize) -> Vec<u8> {
    let len = tokio::fs::metadata(path)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let start = len.saturating_sub(max as u64).max(from);
    read_bounded(path, start, max).await
}

async fn append(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        let _ = tokio::fs::create_dir_all(parent).await;
    }
    if let Ok(mut f) = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
    {
        let _ = f.write_all(text.as_bytes()).await;
    }
}

/// SIGTERM to the process group, SIGKILL once `grace` is over (a stopped process gets SIGCONT
/// too, so that it can act on the SIGTERM).
async fn stop(key: &str, p: Option<Running>, grace: Duration) {
    let Some(mut p) = p else { return };
    if p.exited.borrow().is_some() {
        return;
    }
    signal_group(p.pid, libc::SIGTERM);
    signal_group(p.pid, libc::SIGCONT);
    let exited = tokio::time::timeout(grace, p.exited.wait_for(|e| e.is_some()))
        .await
        .is_ok();
    if !exited {
        warn!(pod = %key, pid = p.pid, "still running after {grace:?}: SIGKILL");
        signal_group(p.pid, libc::SIGKILL);
        let _ =
            tokio::time::timeout(Duration::from_secs(5), p.exited.wait_for(|e| e.is_some())).await;
    }
    // Children that outlived the group's leader.
    signal_group(p.pid, libc::SIGKILL);
    info!(pod = %key, pid = p.pid, "process stopped");
}

/// `sig` to the whole process group the pod's process leads.
fn signal_group(pid: u32, sig: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes no pointers; a group that is gone gives ESRCH, which is fine.
    unsafe {
        libc::kill(-pgid, sig);
    }
}
