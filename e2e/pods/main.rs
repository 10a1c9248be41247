//! moe-e2e-pods: gives kwok's fake pods real local processes, for the local control plane
//! (e2e/cluster.sh starts it).
//!
//! A pod that carries the label `moe.craft.dev/process-backed: "true"` gets, once kwok has scheduled it
//! and given it an IP (kwok pod IPs are inside 127.0.0.0/8, so they are loopback addresses), its first
//! container's `command` + `args` started as a local process, with:
//! - the container's `env` and `envFrom` (values, ConfigMap and Secret key references, `fieldRef`),
//!   `$(VAR)` references expanded as the kubelet does, plus `POD_IP`, `POD_NAME`, `POD_NAMESPACE` and
//!   `POD_ROOT`;
//! - its volumes (ConfigMap, Secret, projected incl. a service-account token, downwardAPI, emptyDir,
//!   hostPath) materialised under `<pods-dir>/<ns>_<name>/volumes/<volume>`, each mount path
//!   `/a/b` reachable as `$POD_ROOT/a/b` (a symlink to the volume); command, args, env values and
//!   workingDir that name a path under a mount path are rewritten to that host path;
//! - stdout and stderr appended to `<pods-dir>/<ns>_<name>/log`, its pid in `.../pid`, its exit status
//!   in `.../exit`.
//!
//! The process runs in its own process group; it is sent SIGTERM (then SIGKILL after the pod's grace
//! period, at most `--max-grace-seconds`) when the pod is terminating or deleted, or when this launcher
//! gets SIGTERM/SIGINT. `command[0]` without a `/` is looked up on PATH (the pod's PATH if its env sets
//! one, else this launcher's). A process that exits is not restarted.

mod spec;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, EnvVar, Pod, Secret, ServiceAccount, Volume,
};
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client, Config, ResourceExt};
use spec::{Want, OPT_IN_LABEL};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(about = "Runs opted-in kwok pods as local processes bound to their (loopback) pod IPs")]
struct Args {
    /// Kubeconfig of the control plane.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Directory that gets one `<namespace>_<name>` directory per pod.
    #[arg(long)]
    pods_dir: PathBuf,
    /// Upper bound on the SIGTERM -> SIGKILL grace period, whatever the pod asks for.
    #[arg(long, default_value_t = 10)]
    max_grace_seconds: u64,
    /// How often pods whose start failed (e.g. a missing Secret) are retried.
    #[arg(long, default_value_t = 3)]
    retry_seconds: u64,
}

/// A pod's process (or its failed start, kept so it is retried on a timer, not on every event).
struct Proc {
    uid: String,
    pid: Option<u32>,
    grace: Duration,
    /// Becomes true once the process has exited.
    exited: watch::Receiver<bool>,
    failed_at: Option<Instant>,
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
    let kc = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading --kubeconfig {}", args.kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading --kubeconfig {}", args.kubeconfig.display()))?;
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    tokio::fs::create_dir_all(&args.pods_dir)
        .await
        .with_context(|| format!("creating --pods-dir {}", args.pods_dir.display()))?;
    let launcher = Launcher {
        client: client.clone(),
        pods_dir: args.pods_dir.clone(),
        max_grace: Duration::from_secs(args.max_grace_seconds),
        state_env: std::env::var("MOE_E2E_STATE").ok(),
    };
    launcher.run(Duration::from_secs(args.retry_seconds)).await
}

struct Launcher {
    client: Client,
    pods_dir: PathBuf,
    max_grace: Duration,
    /// Passed to every process so `cluster.sh down` can recognise strays of this plane.
    state_env: Option<String>,
}

impl Launcher {
    async fn run(&self, retry: Duration) -> Result<()> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let cfg = watcher::Config::default().labels(&format!("{OPT_IN_LABEL}=true"));
        let (store, writer) = reflector::store();
        let mut events = reflector(writer, watcher(api, cfg))
            .default_backoff()
            .boxed();
        let mut procs: HashMap<String, Proc> = HashMap::new();
        let mut init_seen: Option<HashSet<String>> = None;
        let mut stopping = tokio::task::JoinSet::new();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(retry);
        info!(pods_dir = %self.pods_dir.display(), "watching pods labelled {OPT_IN_LABEL}=true");
        loop {
            tokio::select! {
                ev = events.next() => match ev {
                    None => bail!("the pod watch stream ended"),
                    Some(Err(e)) => warn!("pod watch error (retrying with backoff): {e}"),
                    Some(Ok(watcher::Event::Init)) => init_seen = Some(HashSet::new()),
                    Some(Ok(watcher::Event::InitApply(pod))) => {
                        if let Some(seen) = init_seen.as_mut() { seen.insert(key(&pod)); }
                        self.sync(&pod, &mut procs, &mut stopping).await;
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        // Pods that went away while the watch was down.
                        let seen = init_seen.take().unwrap_or_default();
                        let gone: Vec<String> =
                            procs.keys().filter(|k| !seen.contains(*k)).cloned().collect();
                        for k in gone {
                            if let Some(p) = procs.remove(&k) { stopping.spawn(stop(k, p)); }
                        }
                    }
                    Some(Ok(watcher::Event::Apply(pod))) => self.sync(&pod, &mut procs, &mut stopping).await,
                    Some(Ok(watcher::Event::Delete(pod))) => {
                        let k = key(&pod);
                        if procs.get(&k).is_some_and(|p| Some(&p.uid) == pod.metadata.uid.as_ref()) {
                            let p = procs.remove(&k).expect("checked above");
                            stopping.spawn(stop(k, p));
                        }
                    }
                },
                _ = tick.tick() => {
                    let due: Vec<String> = procs.iter()
                        .filter(|(_, p)| p.failed_at.is_some_and(|t| t.elapsed() >= retry))
                        .map(|(k, _)| k.clone()).collect();
                    for k in due {
                        procs.remove(&k);
                        let pod = store.state().into_iter().find(|p| key(p) == k);
                        if let Some(pod) = pod { self.sync(&pod, &mut procs, &mut stopping).await; }
                    }
                }
                Some(_) = stopping.join_next(), if !stopping.is_empty() => {}
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        info!("stopping {} pod process(es)", procs.len());
        for (k, p) in procs.drain() {
            stopping.spawn(stop(k, p));
        }
        while stopping.join_next().await.is_some() {}
        Ok(())
    }

    /// Brings one pod's process in line with what the pod asks for.
    async fn sync(
        &self,
        pod: &Pod,
        procs: &mut HashMap<String, Proc>,
        stopping: &mut tokio::task::JoinSet<()>,
    ) {
        let k = key(pod);
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        match spec::want(pod) {
            Want::Run { pod_ip } => {
                match procs.get(&k) {
                    Some(p) if p.uid == uid => return,
                    Some(_) => {
                        // Same name, new pod: the old process must be gone before the new one binds.
                        let old = procs.remove(&k).expect("matched above");
                        stop(k.clone(), old).await;
                    }
                    None => {}
                }
                let proc = match self.start(pod, &pod_ip).await {
                    Ok(p) => p,
                    Err(e) => {
                        let msg = format!("moe-e2e-pods: cannot start pod {k}: {e:#}\n");
                        warn!("{}", msg.trim_end());
                        append(&self.pod_dir(pod).join("log"), &msg).await;
                        let (_tx, rx) = watch::channel(true);
                        Proc {
                            uid,
                            pid: None,
                            grace: Duration::ZERO,
                            exited: rx,
                            failed_at: Some(Instant::now()),
                        }
                    }
                };
                procs.insert(k, proc);
            }
            Want::Stop(reason) => {
                if let Some(p) = procs.remove(&k) {
                    info!(pod = %k, "{reason}: stopping its process");
                    stopping.spawn(stop(k, p));
                }
            }
            Want::Wait(_) => {}
        }
    }

    fn pod_dir(&self, pod: &Pod) -> PathBuf {
        self.pods_dir.join(spec::pod_dir_name(
            &pod.namespace().unwrap_or_default(),
            &pod.name_any(),
        ))
    }

    async fn start(&self, pod: &Pod, pod_ip: &str) -> Result<Proc> {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let pod_spec = pod.spec.as_ref().context("pod has no spec")?;
        let container = pod_spec
            .containers
            .first()
            .context("pod has no containers")?;
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
        let env = self
            .container_env(pod, container, pod_ip, &root, &mounts)
            .await?;
        let rewrite = |s: &str| spec::rewrite_mount_paths(&spec::expand_vars(s, &env), &mounts);
        let argv: Vec<String> = container
            .command
            .iter()
            .flatten()
            .chain(container.args.iter().flatten())
            .map(|a| rewrite(a))
            .collect();
        if container.command.as_ref().is_none_or(|c| c.is_empty()) {
            bail!(
                "container {:?} has no command: process-backed pods need spec.containers[0].command \
                 (there is no image to take an entrypoint from)",
                container.name
            );
        }
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

        let (tx, rx) = watch::channel(false);
        let exit_file = dir.join("exit");
        let log_file = log_path.clone();
        let pod_key = format!("{ns}/{name}");
        tokio::spawn(async move {
            let status = child.wait().await;
            let text = match &status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            info!(pod = %pod_key, pid, "process exited: {text}");
            let _ = tokio::fs::write(&exit_file, format!("{text}\n")).await;
            append(&log_file, &format!("moe-e2e-pods: process {pid} {text}\n")).await;
            let _ = tx.send(true);
        });
        let grace = pod_spec
            .termination_grace_period_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(Duration::from_secs(30))
            .min(self.max_grace);
        Ok(Proc {
            uid,
            pid: Some(pid),
            grace,
            exited: rx,
            failed_at: None,
        })
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
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        match api.get_opt(name).await? {
            Some(cm) => Ok(Some(cm)),
            None if optional => Ok(None),
            None => bail!("ConfigMap {ns}/{name} not found (the pod references it)"),
        }
    }

    async fn secret(&self, ns: &str, name: &str, optional: bool) -> Result<Option<Secret>> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        match api.get_opt(name).await? {
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
                self.write_volume(pod, &ns, v, &vdir)
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

    async fn write_volume(&self, pod: &Pod, ns: &str, v: &Volume, vdir: &Path) -> Result<()> {
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
                if let Some(t) = &s.service_account_token {
                    let sa = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.clone())
                        .unwrap_or_else(|| "default".into());
                    let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
                    let req = TokenRequest {
                        spec: TokenRequestSpec {
                            audiences: t.audience.iter().cloned().collect(),
                            expiration_seconds: t.expiration_seconds,
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    let tok = api
                        .create_token_request(&sa, &PostParams::default(), &req)
                        .await
                        .with_context(|| {
                            format!("requesting a token for ServiceAccount {ns}/{sa}")
                        })?;
                    let token = tok.status.map(|s| s.token).unwrap_or_default();
                    write_file(vdir, &t.path, token.as_bytes()).await?;
                }
            }
        } else if let Some(d) = &v.downward_api {
            write_downward(pod, d.items.as_deref().unwrap_or(&[]), vdir).await?;
        } else if v.empty_dir.is_none() && v.host_path.is_none() {
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

async fn write_file(vdir: &Path, rel: &str, bytes: &[u8]) -> Result<()> {
    let path = vdir.join(spec::safe_relative(rel).map_err(anyhow::Error::msg)?);
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    tokio::fs::write(&path, bytes)
        .await
        .with_context(|| format!("writing {}", path.display()))
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

/// SIGTERM to the process group, SIGKILL once the grace period is over.
async fn stop(key: String, mut p: Proc) {
    let Some(pid) = p.pid else { return };
    if *p.exited.borrow() {
        return;
    }
    signal_group(pid, "TERM").await;
    let exited = tokio::time::timeout(p.grace, p.exited.wait_for(|e| *e))
        .await
        .is_ok();
    if !exited {
        warn!(pod = %key, pid, "still running after {:?}: SIGKILL", p.grace);
        signal_group(pid, "KILL").await;
        let _ = tokio::time::timeout(Duration::from_secs(5), p.exited.wait_for(|e| *e)).await;
    }
    // Children that left the group's leader behind.
    signal_group(pid, "KILL").await;
    info!(pod = %key, pid, "process stopped");
}

/// kill(1) on the negative pid: the whole process group the pod's process leads.
async fn signal_group(pid: u32, sig: &str) {
    let _ = tokio::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}
