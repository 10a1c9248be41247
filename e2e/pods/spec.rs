//! Pure parts of the process-backed pod launcher: which pods to run, their IPs, readiness from
//! probe results, the status written for them, and how a container's command, env and mount paths
//! map onto a local process. No I/O here, so all of it is unit-tested.

use k8s_openapi::api::core::v1::{Container, KeyToPath, ObjectFieldSelector, Pod};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The label a pod carries to opt in to getting a real local process.
pub const OPT_IN_LABEL: &str = "moe.craft.dev/process-backed";

/// Directory name of a pod's files under the pods dir: `<namespace>_<name>` (neither may contain `_`
/// ambiguity issues: names are DNS labels/subdomains, which have no `_`).
pub fn pod_dir_name(namespace: &str, name: &str) -> String {
    format!("{namespace}_{name}")
}

/// What the launcher should do about a pod right now.
#[derive(Debug, PartialEq, Eq)]
pub enum Want {
    /// Run its process (and be its kubelet: IP, status, probes, restarts).
    Run,
    /// The pod is terminating: stop its process, then delete it for good (gracePeriodSeconds=0),
    /// as a kubelet does once the containers are gone.
    Terminate,
    /// The pod has finished (phase Succeeded/Failed): no process, nothing to restart.
    Finished,
    /// Not (or no longer) ours; the reason is logged.
    Stop(&'static str),
    /// Not yet: the pod is not scheduled.
    Wait(&'static str),
}

/// Whether the pod carries the opt-in label.
pub fn opted_in(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(OPT_IN_LABEL))
        .is_some_and(|v| v == "true")
}

/// What the launcher should do about `pod`.
pub fn want(pod: &Pod) -> Want {
    if !opted_in(pod) {
        return Want::Stop("pod does not carry the opt-in label");
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Want::Terminate;
    }
    if let Some(phase) = pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        if phase == "Succeeded" || phase == "Failed" {
            return Want::Finished;
        }
    }
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_none()
    {
        return Want::Wait("pod is not scheduled yet");
    }
    Want::Run
}

/// The pod IPs this launcher hands out: the host addresses .1-.254 of one loopback /24 (any
/// 127.x.y.0/24 is bindable locally), each held by one pod uid at a time. Addresses are handed out
/// round-robin, so a freed address is reused only after the others, as IPAM plugins tend to.
#[derive(Debug)]
pub struct IpPool {
    prefix: [u8; 3],
    owners: BTreeMap<u8, String>,
    next: u8,
}

impl IpPool {
    /// `cidr` must be a /24 inside 127.0.0.0/8, e.g. `127.9.254.0/24`.
    pub fn new(cidr: &str) -> Result<Self, String> {
        let bad = || format!("--pod-cidr {cidr:?}: expected a loopback /24 such as 127.9.254.0/24");
        let (net, len) = cidr.split_once('/').ok_or_else(bad)?;
        if len != "24" {
            return Err(bad());
        }
        let o: Vec<u8> = net
            .split('.')
            .map(|x| x.parse::<u8>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        if o.len() != 4 || o[0] != 127 || o[3] != 0 {
            return Err(bad());
        }
        Ok(IpPool {
            prefix: [o[0], o[1], o[2]],
            owners: BTreeMap::new(),
            next: 1,
        })
    }

    fn host(&self, ip: &str) -> Option<u8> {
        let o: Vec<u8> = ip
            .split('.')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        (o.len() == 4 && o[..3] == self.prefix && (1..=254).contains(&o[3])).then_some(o[3])
    }

    fn ip(&self, host: u8) -> String {
        let [a, b, c] = self.prefix;
        format!("{a}.{b}.{c}.{host}")
    }

    /// Claims `ip` for `uid` when it is in range and free (or already `uid`'s).
    pub fn reserve(&mut self, ip: &str, uid: &str) -> bool {
        let Some(h) = self.host(ip) else { return false };
        match self.owners.get(&h) {
            Some(o) => o == uid,
            None => {
                self.owners.insert(h, uid.to_string());
                true
            }
        }
    }

    /// The address `uid` holds, else `wanted` when it can be claimed, else the next free one;
    /// None when all 254 are held.
    pub fn assign(&mut self, wanted: Option<&str>, uid: &str) -> Option<String> {
        if let Some((h, _)) = self.owners.iter().find(|(_, o)| *o == uid) {
            return Some(self.ip(*h));
        }
        if let Some(ip) = wanted.filter(|ip| self.reserve(ip, uid)) {
            return Some(ip.to_string());
        }
        for i in 0..254u16 {
            let h = ((self.next as u16 - 1 + i) % 254 + 1) as u8;
            if let std::collections::btree_map::Entry::Vacant(e) = self.owners.entry(h) {
                e.insert(uid.to_string());
                self.next = h % 254 + 1;
                return Some(self.ip(h));
            }
        }
        None
    }

    /// Frees `ip` if `uid` holds it.
    pub fn release(&mut self, ip: &str, uid: &str) {
        if let Some(h) = self.host(ip) {
            if self.owners.get(&h).is_some_and(|o| o == uid) {
                self.owners.remove(&h);
            }
        }
    }
}

/// How a probe checks the container (the kinds this launcher can run against a local process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeCheck {
    /// GET `path` on the pod IP and `port`; 200-399 is a success, as for the kubelet.
    Http { path: String, port: u16 },
    /// A TCP connect to the pod IP and `port`.
    Tcp { port: u16 },
}

/// A container probe with the kubelet's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub check: ProbeCheck,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// The container's readiness probe: Ok(None) when it has none (Ready follows "running"), an error
/// naming the field for a probe this launcher cannot run (exec, gRPC) or a port it cannot resolve.
pub fn readiness_probe(c: &Container) -> Result<Option<ProbeSpec>, String> {
    let Some(p) = &c.readiness_probe else {
        return Ok(None);
    };
    let port = |what: &str, port: &IntOrString| -> Result<u16, String> {
        let n = match port {
            IntOrString::Int(n) => *n,
            IntOrString::String(name) => match c
                .ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            {
                Some(cp) => cp.container_port,
                None => name.parse().map_err(|_| {
                    format!(
                        "container {:?}: readinessProbe.{what}.port {name:?} names no container port",
                        c.name
                    )
                })?,
            },
        };
        u16::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
            format!(
                "container {:?}: readinessProbe.{what}.port {n} is not a TCP port",
                c.name
            )
        })
    };
    let check = if let Some(h) = &p.http_get {
        if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
            return Err(format!(
                "container {:?}: readinessProbe.httpGet.scheme {:?}: only HTTP is supported",
                c.name, h.scheme
            ));
        }
        let path = h
            .path
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into());
        ProbeCheck::Http {
            path,
            port: port("httpGet", &h.port)?,
        }
    } else if let Some(t) = &p.tcp_socket {
        ProbeCheck::Tcp {
            port: port("tcpSocket", &t.port)?,
        }
    } else {
        return Err(format!(
            "container {:?}: only httpGet and tcpSocket readiness probes are supported",
            c.name
        ));
    };
    let secs = |v: Option<i32>, default: i32, min: i32| {
        Duration::from_secs(v.unwrap_or(default).max(min) as u64)
    };
    Ok(Some(ProbeSpec {
        check,
        initial_delay: secs(p.initial_delay_seconds, 0, 0),
        period: secs(p.period_seconds, 10, 1),
        timeout: secs(p.timeout_seconds, 1, 1),
        success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
    }))
}

/// Readiness from consecutive probe results, as the kubelet's prober keeps it: not ready until
/// `success_threshold` successes in a row, not ready again after `failure_threshold` failures in
/// a row.
#[derive(Debug, Default, Clone)]
pub struct Readiness {
    pub ready: bool,
    successes: u32,
    failures: u32,
}

impl Readiness {
    /// Records one probe result; true when `ready` changed.
    pub fn observe(&mut self, ok: bool, p: &ProbeSpec) -> bool {
        let before = self.ready;
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= p.success_threshold {
                self.ready = true;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= p.failure_threshold {
                self.ready = false;
            }
        }
        before != self.ready
    }
}

/// Whether the first line of an HTTP response (`HTTP/1.1 200 OK`) is a probe success (200-399).
pub fn http_probe_ok(status_line: &str) -> bool {
    let mut parts = status_line.split_whitespace();
    parts.next().is_some_and(|v| v.starts_with("HTTP/"))
        && parts
            .next()
            .and_then(|c| c.parse::<u16>().ok())
            .is_some_and(|c| (200..400).contains(&c))
}

/// The state of the pod's (first) container, as containerStatuses reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started_at: String,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        /// The termination message (empty: none).
        message: String,
        started_at: String,
        finished_at: String,
    },
}

impl ContainerState {
    fn json(&self) -> serde_json::Value {
        match self {
            ContainerState::Waiting { reason, message } => {
                json!({"waiting": {"reason": reason, "message": message}})
            }
            ContainerState::Running { started_at } => json!({"running": {"startedAt": started_at}}),
            ContainerState::Terminated {
                exit_code,
                reason,
                message,
                started_at,
                finished_at,
            } => {
                let mut t = json!({"exitCode": exit_code, "reason": reason,
                                   "startedAt": started_at, "finishedAt": finished_at});
                if !message.is_empty() {
                    t["message"] = json!(message);
                }
                json!({ "terminated": t })
            }
        }
    }
}

/// The status the launcher wants a pod to have (what it writes to the status subresource).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub phase: &'static str,
    pub pod_ip: String,
    pub host_ip: String,
    pub start_time: String,
    pub ready: bool,
    /// When Ready last changed (also Initialized's time before the first change).
    pub ready_since: String,
    pub initialized_at: String,
    pub container: String,
    pub image: String,
    pub pid: Option<u32>,
    pub state: ContainerState,
    pub last_state: Option<ContainerState>,
    pub restart_count: i32,
    /// The init containers' statuses, in order.
    pub inits: Vec<InitView>,
    /// Whether every init container has completed.
    pub initialized: bool,
}

/// One init container's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitView {
    pub name: String,
    pub image: String,
    pub state: ContainerState,
    pub last_state: Option<ContainerState>,
    pub restart_count: i32,
}

impl PodView {
    /// A strategic-merge patch of the status subresource (conditions merge by type, so the
    /// scheduler's PodScheduled stays).
    pub fn status_patch(&self) -> serde_json::Value {
        let ready = if self.ready { "True" } else { "False" };
        let cond = |t: &str| {
            let mut c = json!({"type": t, "status": ready, "lastTransitionTime": self.ready_since,
                               "lastProbeTime": null});
            if !self.ready {
                let (reason, msg) = if matches!(self.phase, "Succeeded" | "Failed") {
                    ("PodCompleted", String::new())
                } else {
                    (
                        "ContainersNotReady",
                        format!("containers with unready status: [{}]", self.container),
                    )
                };
                c["reason"] = json!(reason);
                c["message"] = json!(msg);
            }
            c
        };
        let started = matches!(self.state, ContainerState::Running { .. });
        let state = if self.initialized {
            self.state.clone()
        } else {
            ContainerState::Waiting {
                reason: "PodInitializing".into(),
                message: String::new(),
            }
        };
        let mut cs = json!({
            "name": self.container, "image": self.image, "imageID": "",
            "ready": self.ready, "started": started, "restartCount": self.restart_count,
            "state": state.json(),
            "lastState": self.last_state.as_ref().map(|s| s.json()).unwrap_or(json!({})),
        });
        if let Some(pid) = self.pid {
            cs["containerID"] = json!(format!("moe-e2e-pods://{pid}"));
        }
        let mut initialized = json!({"type": "Initialized", "status": "True",
                                     "lastTransitionTime": self.initialized_at, "lastProbeTime": null});
        if !self.initialized {
            let pending: Vec<&str> = self
                .inits
                .iter()
                .filter(|i| !matches!(i.state, ContainerState::Terminated { exit_code: 0, .. }))
                .map(|i| i.name.as_str())
                .collect();
            initialized["status"] = json!("False");
            initialized["reason"] = json!("ContainersNotInitialized");
            initialized["message"] = json!(format!(
                "containers with incomplete status: [{}]",
                pending.join(" ")
            ));
        }
        let inits: Vec<serde_json::Value> = self
            .inits
            .iter()
            .map(|i| {
                let done = matches!(i.state, ContainerState::Terminated { exit_code: 0, .. });
                json!({
                    "name": i.name, "image": i.image, "imageID": "",
                    "ready": done, "started": matches!(i.state, ContainerState::Running { .. }),
                    "restartCount": i.restart_count,
                    "state": i.state.json(),
                    "lastState": i.last_state.as_ref().map(|s| s.json()).unwrap_or(json!({})),
                })
            })
            .collect();
        let mut out = json!({"status": {
            "phase": self.phase,
            "hostIP": self.host_ip, "hostIPs": [{"ip": self.host_ip}],
            "podIP": self.pod_ip, "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "conditions": [
                initialized,
                cond("ContainersReady"),
                cond("Ready"),
            ],
            "containerStatuses": [cs],
        }});
        if !inits.is_empty() {
            out["status"]["initContainerStatuses"] = json!(inits);
        }
        out
    }

    /// Whether `pod`'s status (as last seen from the API) already says what this view says, in
    /// the fields that matter to readers: phase, pod IP, Ready and the restart count.
    pub fn shown_by(&self, pod: &Pod) -> bool {
        let Some(st) = pod.status.as_ref() else {
            return false;
        };
        let ready = st
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status == "True");
        let restarts = st
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == self.container)
            .map(|c| c.restart_count);
        st.phase.as_deref() == Some(self.phase)
            && st.pod_ip.as_deref() == Some(self.pod_ip.as_str())
            && ready == Some(self.ready)
            && restarts == Some(self.restart_count)
    }
}

/// Expands `$(NAME)` references as the kubelet does for command, args and env values: a defined
/// variable is substituted, an undefined reference is kept verbatim, and `$$` escapes a `$`.
pub fn expand_vars(input: &str, env: &[(String, String)]) -> String {
    let lookup = |name: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(end) => {
                    let name = &body[..end];
                    match lookup(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &body[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = body;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The kubelet's default `terminationMessagePath`.
pub const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// The most bytes of a termination message kept (the kubelet's 4 KiB per container).
pub const MAX_TERMINATION_MESSAGE_BYTES: usize = 4096;
/// With `FallbackToLogsOnError`, the log's tail: at most this many lines...
pub const FALLBACK_LOG_LINES: usize = 80;
/// ...and at most this many bytes (the kubelet's limits).
pub const FALLBACK_LOG_BYTES: usize = 2048;

/// The container's termination message as the kubelet reports it: the file at its
/// `terminationMessagePath` (at most 4 KiB), or, when that is empty, the process failed and the
/// policy is `FallbackToLogsOnError`, the tail of its log (80 lines, 2 KiB at most).
pub fn termination_message(file: &[u8], policy: Option<&str>, failed: bool, log: &[u8]) -> String {
    if !file.is_empty() {
        let b = &file[..file.len().min(MAX_TERMINATION_MESSAGE_BYTES)];
        return String::from_utf8_lossy(b).into_owned();
    }
    if !(failed && policy == Some("FallbackToLogsOnError")) {
        return String::new();
    }
    let tail = &log[log.len().saturating_sub(FALLBACK_LOG_BYTES)..];
    let text = String::from_utf8_lossy(tail);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(FALLBACK_LOG_LINES)..].join("\n")
}

/// A pod's DNS name through a headless Service, `<hostname>.<subdomain>.<namespace>.svc` (or
/// `...svc.cluster.local`), as found in a value followed by `:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodDnsName {
    pub hostname: String,
    pub subdomain: String,
    pub namespace: String,
}

impl std::fmt::Display for PodDnsName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}.{}.svc",
            self.hostname, self.subdomain, self.namespace
        )
    }
}

/// The pod DNS names in `value` (each followed by `:port`), with their byte ranges.
fn pod_dns_spans(value: &str) -> Vec<(std::ops::Range<usize>, PodDnsName)> {
    let is_dns = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '-';
    let b = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !is_dns(b[i] as char) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && is_dns(b[i] as char) {
            i += 1;
        }
        let followed_by_port =
            b.get(i) == Some(&b':') && b.get(i + 1).is_some_and(u8::is_ascii_digit);
        if !followed_by_port {
            continue;
        }
        let run = value[start..i].to_ascii_lowercase();
        let Some(stem) = run
            .strip_suffix(".svc.cluster.local")
            .or_else(|| run.strip_suffix(".svc"))
        else {
            continue;
        };
        let labels: Vec<&str> = stem.split('.').collect();
        if labels.len() == 3 && labels.iter().all(|l| !l.is_empty()) {
            out.push((
                start..i,
                PodDnsName {
                    hostname: labels[0].into(),
                    subdomain: labels[1].into(),
                    namespace: labels[2].into(),
                },
            ));
        }
    }
    out
}

/// The pod DNS names an env value holds (`<pod>.<service>.<ns>.svc[.cluster.local]:<port>`).
pub fn pod_dns_names(value: &str) -> Vec<PodDnsName> {
    pod_dns_spans(value).into_iter().map(|(_, n)| n).collect()
}

/// `value` with every pod DNS name that `resolve` knows replaced by its IP (an IPv6 one in
/// brackets); the `:port` after it stays.
pub fn rewrite_pod_dns(value: &str, resolve: impl Fn(&PodDnsName) -> Option<String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut at = 0;
    for (span, name) in pod_dns_spans(value) {
        if let Some(ip) = resolve(&name) {
            out.push_str(&value[at..span.start]);
            if ip.contains(':') {
                out.push_str(&format!("[{ip}]"));
            } else {
                out.push_str(&ip);
            }
            at = span.end;
        }
    }
    out.push_str(&value[at..]);
    out
}

/// Whether `pod` answers to `name` in cluster DNS: its namespace, its `subdomain` and its
/// `hostname` (or, without one, its name). The Service behind the subdomain is not checked.
pub fn pod_answers_to(pod: &Pod, name: &PodDnsName) -> bool {
    let spec = pod.spec.as_ref();
    let hostname = spec
        .and_then(|s| s.hostname.clone())
        .or_else(|| pod.metadata.name.clone());
    pod.metadata.namespace.as_deref() == Some(name.namespace.as_str())
        && spec.and_then(|s| s.subdomain.as_deref()) == Some(name.subdomain.as_str())
        && hostname.as_deref() == Some(name.hostname.as_str())
}

/// Where each container mount path lives on the host: `<root><mountPath>`.
pub fn host_path(root: &Path, mount_path: &str) -> PathBuf {
    root.join(mount_path.trim_start_matches('/'))
}

/// Rewrites a value that names a file under one of the container's mount paths to the host path where
/// that volume was materialised; `--flag=/mount/x` is rewritten after the `=`. Other values pass
/// through unchanged. The longest matching mount path wins (as nested mounts shadow their parent).
pub fn rewrite_mount_paths(value: &str, mounts: &[(String, PathBuf)]) -> String {
    let (prefix, path) = match value.split_once('=') {
        Some((flag, p)) if flag.starts_with('-') && p.starts_with('/') => {
            (&value[..flag.len() + 1], p)
        }
        _ => ("", value),
    };
    if !path.starts_with('/') {
        return value.to_string();
    }
    let best = mounts
        .iter()
        .filter(|(mp, _)| {
            let mp = mp.trim_end_matches('/');
            path == mp || path.strip_prefix(mp).is_some_and(|r| r.starts_with('/'))
        })
        .max_by_key(|(mp, _)| mp.trim_end_matches('/').len());
    match best {
        Some((mp, host)) => {
            let rel = path[mp.trim_end_matches('/').len()..].trim_start_matches('/');
            let mapped = if rel.is_empty() {
                host.clone()
            } else {
                host.join(rel)
            };
            format!("{prefix}{}", mapped.display())
        }
        None => value.to_string(),
    }
}

/// The files a ConfigMap or Secret volume holds: every key, or only `items` (key -> relative path).
/// Returns (relative path, key) pairs; a listed key missing from the data is an error naming it.
pub fn volume_files(
    keys: &[String],
    items: Option<&[KeyToPath]>,
    what: &str,
) -> Result<Vec<(String, String)>, String> {
    match items {
        None => Ok(keys.iter().map(|k| (k.clone(), k.clone())).collect()),
        Some(items) => items
            .iter()
            .map(|it| {
                if keys.contains(&it.key) {
                    Ok((it.path.clone(), it.key.clone()))
                } else {
                    Err(format!(
                        "{what} has no key {:?} (listed in the volume's items)",
                        it.key
                    ))
                }
            })
            .collect(),
    }
}

/// A relative path from a volume item must stay inside the volume directory.
pub fn safe_relative(path: &str) -> Result<&str, String> {
    let p = Path::new(path);
    if path.is_empty()
        || p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!(
            "volume item path {path:?} must be relative and must not contain '..'"
        ));
    }
    Ok(path)
}

/// Resolves a downward-API `fieldRef` (the subset the kubelet supports for env).
pub fn field_ref(pod: &Pod, sel: &ObjectFieldSelector) -> Result<String, String> {
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    let spec = pod.spec.as_ref();
    let map_key = |m: Option<&BTreeMap<String, String>>, key: &str| {
        m.and_then(|m| m.get(key)).cloned().unwrap_or_default()
    };
    let path = sel.field_path.as_str();
    let v = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()).unwrap_or_default(),
        _ => {
            if let Some(key) = bracket_key(path, "metadata.labels") {
                map_key(meta.labels.as_ref(), key)
            } else if let Some(key) = bracket_key(path, "metadata.annotations") {
                map_key(meta.annotations.as_ref(), key)
            } else {
                return Err(format!(
                    "fieldRef {path:?} is not supported by moe-e2e-pods"
                ));
            }
        }
    };
    Ok(v)
}

/// `metadata.labels['key']` -> `key`.
fn bracket_key<'a>(path: &'a str, field: &str) -> Option<&'a str> {
    path.strip_prefix(field)?
        .strip_prefix("['")?
        .strip_suffix("']")
}

/// Where a pod's ServiceAccount token, CA and namespace are mounted (the ServiceAccount admission
/// plugin adds the projected volume there).
pub const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// An image's repository: without its digest (`@sha256:...`) and tag (a `:` after the last `/`).
pub fn image_repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => &image[..last_slash + i],
        None => image,
    }
}

/// One `--image-entrypoint REPOSITORY=PROGRAM`: a container of an image of that repository (any tag)
/// that sets no `command` runs PROGRAM, as the image's ENTRYPOINT would, with its `args`.
pub fn parse_image_entrypoint(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((repo, prog)) if !repo.is_empty() && !prog.is_empty() && !repo.contains(':') => {
            Ok((repo.to_string(), prog.to_string()))
        }
        _ => Err(format!(
            "--image-entrypoint {s:?}: want REPOSITORY=PROGRAM, the repository without a tag \
             (e.g. ghcr.io/moe-operator/moe-operator=moe-operator)"
        )),
    }
}

/// The program standing in for `image`'s ENTRYPOINT, from the `--image-entrypoint` map.
pub fn image_entrypoint<'a>(image: &str, map: &'a [(String, String)]) -> Option<&'a str> {
    let repo = image_repository(image);
    map.iter()
        .find(|(r, _)| r == repo)
        .map(|(_, prog)| prog.as_str())
}

/// A wildcard listen address (`0.0.0.0:port`) narrowed to the pod's IP. In a pod it binds the
/// pod's own network namespace; here every pod shares the host's, and two replicas of a pod would
/// otherwise take the same host port.
pub fn narrow_wildcard_bind(value: &str, pod_ip: &str) -> String {
    value.replace("0.0.0.0:", &format!("{pod_ip}:"))
}

/// The kubeconfig that stands in for in-cluster configuration (a process cannot see the pod's
/// `/var/run/secrets/...`): the API server, and the pod's own mounted ServiceAccount token and CA
/// from `sa_dir` (read from the files, so a refreshed token is used), in `namespace`.
pub fn in_cluster_kubeconfig(server: &str, sa_dir: &Path, namespace: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "in-cluster", "cluster": {
            "server": server,
            "certificate-authority": sa_dir.join("ca.crt").display().to_string(),
        }}],
        "users": [{"name": "service-account", "user": {
            "tokenFile": sa_dir.join("token").display().to_string(),
        }}],
        "contexts": [{"name": "in-cluster", "context": {
            "cluster": "in-cluster", "user": "service-account", "namespace": namespace,
        }}],
        "current-context": "in-cluster",
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(label: Option<&str>, node: Option<&str>, ip: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("w-0".into()),
                namespace: Some("ns".into()),
                labels: label.map(|v| [(OPT_IN_LABEL.to_string(), v.to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(String::from),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: ip.map(String::from),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn want_follows_label_node_deletion_and_phase() {
        // The launcher assigns IPs itself: a scheduled pod runs without one.
        assert_eq!(want(&pod(Some("true"), Some("n"), None)), Want::Run);
        assert!(matches!(
            want(&pod(Some("false"), Some("n"), Some("127.9.0.3"))),
            Want::Stop(_)
        ));
        assert!(matches!(
            want(&pod(None, Some("n"), Some("127.9.0.3"))),
            Want::Stop(_)
        ));
        assert!(matches!(
            want(&pod(Some("true"), None, None)),
            Want::Wait(_)
        ));
        let mut p = pod(Some("true"), Some("n"), Some("127.9.0.3"));
        p.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(want(&p), Want::Terminate);
        let mut p = pod(Some("true"), Some("n"), Some("127.9.0.3"));
        p.status.as_mut().unwrap().phase = Some("Failed".into());
        assert_eq!(want(&p), Want::Finished);
        // A finished pod that is deleted still needs its deletion finalised.
        p.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(want(&p), Want::Terminate);
    }

    #[test]
    fn ip_pool_hands_out_unique_addresses_and_reuses_freed_ones() {
        assert!(IpPool::new("127.9.254.0/16").is_err());
        assert!(IpPool::new("10.0.0.0/24").is_err());
        assert!(IpPool::new("127.9.254.7/24").is_err());
        let mut pool = IpPool::new("127.9.254.0/24").unwrap();
        let a = pool.assign(None, "a").unwrap();
        assert_eq!(a, "127.9.254.1");
        // Asking again for the same uid gives the same address.
        assert_eq!(pool.assign(None, "a").unwrap(), a);
        // An address a pod already carries is kept when free, refused when taken or out of range.
        assert_eq!(
            pool.assign(Some("127.9.254.77"), "b").unwrap(),
            "127.9.254.77"
        );
        assert_ne!(
            pool.assign(Some("127.9.254.77"), "c").unwrap(),
            "127.9.254.77"
        );
        assert!(!pool.reserve("127.9.255.3", "d"));
        assert!(!pool.reserve(&a, "d"));
        assert!(pool.reserve(&a, "a"));
        let mut seen = std::collections::BTreeSet::new();
        let mut pool = IpPool::new("127.9.254.0/24").unwrap();
        for i in 0..254 {
            assert!(seen.insert(pool.assign(None, &format!("u{i}")).unwrap()));
        }
        assert_eq!(pool.assign(None, "full"), None);
        // A release by a uid that does not hold the address changes nothing.
        pool.release("127.9.254.5", "u0");
        assert_eq!(pool.assign(None, "full"), None);
        pool.release("127.9.254.5", "u4");
        assert_eq!(pool.assign(None, "new").as_deref(), Some("127.9.254.5"));
    }

    fn container_with_probe(probe: serde_json::Value) -> Container {
        serde_json::from_value(json!({
            "name": "worker",
            "ports": [{"name": "metrics", "containerPort": 9401}],
            "readinessProbe": probe,
        }))
        .unwrap()
    }

    #[test]
    fn readiness_probe_fills_kubelet_defaults_and_resolves_named_ports() {
        let p = readiness_probe(&container_with_probe(
            json!({"httpGet": {"path": "/readyz", "port": "metrics"}}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            p,
            ProbeSpec {
                check: ProbeCheck::Http {
                    path: "/readyz".into(),
                    port: 9401
                },
                initial_delay: Duration::ZERO,
                period: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
                success_threshold: 1,
                failure_threshold: 3,
            }
        );
        let p = readiness_probe(&container_with_probe(json!({
            "httpGet": {"port": 8080}, "periodSeconds": 5, "timeoutSeconds": 2,
            "successThreshold": 2, "failureThreshold": 1, "initialDelaySeconds": 3
        })))
        .unwrap()
        .unwrap();
        assert_eq!(
            p.check,
            ProbeCheck::Http {
                path: "/".into(),
                port: 8080
            }
        );
        assert_eq!(
            (
                p.period,
                p.timeout,
                p.success_threshold,
                p.failure_threshold,
                p.initial_delay
            ),
            (
                Duration::from_secs(5),
                Duration::from_secs(2),
                2,
                1,
                Duration::from_secs(3)
            )
        );
        assert_eq!(
            readiness_probe(&container_with_probe(
                json!({"tcpSocket": {"port": "metrics"}})
            ))
            .unwrap()
            .unwrap()
            .check,
            ProbeCheck::Tcp { port: 9401 }
        );
        let e = readiness_probe(&container_with_probe(json!({"httpGet": {"port": "admin"}})))
            .unwrap_err();
        assert!(e.contains("\"admin\" names no container port"), "{e}");
        assert!(
            readiness_probe(&container_with_probe(json!({"httpGet": {"port": 70000}}))).is_err()
        );
        assert!(readiness_probe(&container_with_probe(
            json!({"exec": {"command": ["true"]}})
        ))
        .is_err());
        assert!(readiness_probe(&container_with_probe(
            json!({"httpGet": {"port": 1, "scheme": "HTTPS"}})
        ))
        .is_err());
        let none: Container = serde_json::from_value(json!({"name": "c"})).unwrap();
        assert_eq!(readiness_probe(&none).unwrap(), None);
    }

    #[test]
    fn readiness_needs_consecutive_results() {
        let p = readiness_probe(&container_with_probe(json!({
            "httpGet": {"port": 1}, "successThreshold": 2, "failureThreshold": 3
        })))
        .unwrap()
        .unwrap();
        let mut r = Readiness::default();
        assert!(!r.observe(true, &p) && !r.ready);
        assert!(r.observe(true, &p) && r.ready);
        // Two failures, a success (resets the count), then three failures.
        assert!(!r.observe(false, &p) && !r.observe(false, &p));
        assert!(!r.observe(true, &p) && r.ready);
        assert!(!r.observe(false, &p) && !r.observe(false, &p));
        assert!(r.observe(false, &p) && !r.ready);
        // One success is not enough to come back.
        assert!(!r.observe(true, &p) && !r.ready);
    }

    #[test]
    fn http_probe_status_lines() {
        assert!(http_probe_ok("HTTP/1.1 200 OK"));
        assert!(http_probe_ok("HTTP/1.0 302 Found"));
        assert!(!http_probe_ok("HTTP/1.1 503 Service Unavailable"));
        assert!(!http_probe_ok("HTTP/1.1 404"));
        assert!(!http_probe_ok("SSH-2.0-OpenSSH"));
        assert!(!http_probe_ok(""));
    }

    fn view(ready: bool) -> PodView {
        PodView {
            phase: "Running",
            pod_ip: "127.9.254.1".into(),
            host_ip: "127.0.0.1".into(),
            start_time: "2026-01-01T00:00:00Z".into(),
            ready,
            ready_since: "2026-01-01T00:00:05Z".into(),
            initialized_at: "2026-01-01T00:00:00Z".into(),
            container: "worker".into(),
            image: "moe-worker:dev".into(),
            pid: Some(42),
            state: ContainerState::Running {
                started_at: "2026-01-01T00:00:01Z".into(),
            },
            last_state: None,
            restart_count: 2,
            inits: Vec::new(),
            initialized: true,
        }
    }

    #[test]
    fn init_containers_are_reported_until_they_complete() {
        let mut v = view(false);
        v.phase = "Pending";
        v.initialized = false;
        v.inits = vec![InitView {
            name: "fetch-weights".into(),
            image: "moe-worker:dev".into(),
            state: ContainerState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: "back-off".into(),
            },
            last_state: Some(ContainerState::Terminated {
                exit_code: 1,
                reason: "Error".into(),
                message: "fetch-weights: s3://b/k: no".into(),
                started_at: "2026-01-01T00:00:01Z".into(),
                finished_at: "2026-01-01T00:00:02Z".into(),
            }),
            restart_count: 1,
        }];
        let status: PodStatus = serde_json::from_value(v.status_patch()["status"].clone()).unwrap();
        let init = &status.init_container_statuses.as_ref().unwrap()[0];
        assert_eq!(
            (init.name.as_str(), init.restart_count),
            ("fetch-weights", 1)
        );
        let last = init
            .last_state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap();
        assert_eq!(
            (last.exit_code, last.message.as_deref()),
            (1, Some("fetch-weights: s3://b/k: no"))
        );
        let cond = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Initialized")
            .unwrap();
        assert_eq!(
            (cond.status.as_str(), cond.message.as_deref()),
            (
                "False",
                Some("containers with incomplete status: [fetch-weights]")
            )
        );
        let main = &status.container_statuses.unwrap()[0];
        assert_eq!(
            main.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("PodInitializing")
        );
    }

    #[test]
    fn status_patch_round_trips_through_pod_status() {
        for ready in [false, true] {
            let v = view(ready);
            let patch = v.status_patch();
            let status: PodStatus = serde_json::from_value(patch["status"].clone()).unwrap();
            let conds = status.conditions.clone().unwrap();
            let get = |t: &str| conds.iter().find(|c| c.type_ == t).unwrap().status.clone();
            let want = if ready { "True" } else { "False" };
            assert_eq!(
                (get("Ready"), get("ContainersReady")),
                (want.into(), want.into())
            );
            assert_eq!(get("Initialized"), "True");
            assert_eq!(status.pod_ips.as_ref().unwrap()[0].ip, "127.9.254.1");
            assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
            let cs = &status.container_statuses.as_ref().unwrap()[0];
            assert_eq!((cs.ready, cs.restart_count), (ready, 2));
            assert_eq!(cs.container_id.as_deref(), Some("moe-e2e-pods://42"));
            let mut p = pod(Some("true"), Some("n"), None);
            p.status = Some(status);
            assert!(v.shown_by(&p));
            assert!(!view(!ready).shown_by(&p));
            let mut restarted = view(ready);
            restarted.restart_count = 3;
            assert!(!restarted.shown_by(&p));
        }
        // kwok's or nobody's status is not ours.
        assert!(!view(false).shown_by(&pod(Some("true"), Some("n"), None)));
    }

    #[test]
    fn termination_message_is_the_file_or_the_logs_tail() {
        let fallback = Some("FallbackToLogsOnError");
        assert_eq!(
            termination_message(b"ep rank 1: rank 2 went away\n", fallback, true, b"log"),
            "ep rank 1: rank 2 went away\n"
        );
        let big = vec![b'x'; 5000];
        assert_eq!(termination_message(&big, None, true, b"").len(), 4096);
        // Empty file: the log's tail, only on a failure and with FallbackToLogsOnError.
        let log: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let tail = termination_message(b"", fallback, true, log.as_bytes());
        assert!(
            tail.starts_with("line 20\n") && tail.ends_with("line 99"),
            "{tail}"
        );
        assert_eq!(tail.lines().count(), 80);
        let long = "y".repeat(3000);
        assert_eq!(
            termination_message(b"", fallback, true, long.as_bytes()).len(),
            2048
        );
        assert_eq!(
            termination_message(b"", fallback, false, log.as_bytes()),
            ""
        );
        assert_eq!(
            termination_message(b"", Some("File"), true, log.as_bytes()),
            ""
        );
        assert_eq!(termination_message(b"", None, true, log.as_bytes()), "");
    }

    #[test]
    fn status_patch_carries_the_termination_message() {
        let mut v = view(false);
        v.last_state = Some(ContainerState::Terminated {
            exit_code: 1,
            reason: "Error".into(),
            message: "ep rank 0: rank 2 went away".into(),
            started_at: "2026-01-01T00:00:01Z".into(),
            finished_at: "2026-01-01T00:00:09Z".into(),
        });
        let status: PodStatus = serde_json::from_value(v.status_patch()["status"].clone()).unwrap();
        let t = status.container_statuses.unwrap()[0]
            .last_state
            .clone()
            .unwrap()
            .terminated
            .unwrap();
        assert_eq!(t.exit_code, 1);
        assert_eq!(t.message.as_deref(), Some("ep rank 0: rank 2 went away"));
        assert!(t.finished_at.is_some());
        // No message: the field is left out.
        let s = ContainerState::Terminated {
            exit_code: 0,
            reason: "Completed".into(),
            message: String::new(),
            started_at: String::new(),
            finished_at: String::new(),
        };
        assert!(s.json()["terminated"].get("message").is_none());
    }

    #[test]
    fn pod_dns_names_are_found_and_rewritten() {
        let name = |h: &str, s: &str, n: &str| PodDnsName {
            hostname: h.into(),
            subdomain: s.into(),
            namespace: n.into(),
        };
        let v = "tiny-worker-0.tiny-workers.ml.svc:9403";
        assert_eq!(
            pod_dns_names(v),
            vec![name("tiny-worker-0", "tiny-workers", "ml")]
        );
        let ips = |n: &PodDnsName| match n.hostname.as_str() {
            "tiny-worker-0" => Some("127.9.254.3".to_string()),
            "v6" => Some("fd00::1".to_string()),
            _ => None,
        };
        assert_eq!(rewrite_pod_dns(v, ips), "127.9.254.3:9403");
        assert_eq!(
            rewrite_pod_dns(
                "--peers=tiny-worker-0.tiny-workers.ml.svc.cluster.local:1,v6.s.n.svc:2,gone.s.n.svc:3",
                ips
            ),
            "--peers=127.9.254.3:1,[fd00::1]:2,gone.s.n.svc:3"
        );
        // Not a pod's name: a Service's (two labels), no port, another suffix, an empty label.
        for v in [
            "svc-name.ns.svc:80",
            "tiny-worker-0.tiny-workers.ml.svc",
            "a.b.c.svc.example.com:80",
            "a..c.svc:80",
            "a.b.c.svc:http",
            "http://example.com:80/x",
        ] {
            assert_eq!(pod_dns_names(v), vec![], "{v}");
            assert_eq!(rewrite_pod_dns(v, |_| Some("1.2.3.4".into())), v);
        }
        let mut p = pod(Some("true"), Some("n"), Some("127.9.0.3"));
        let n = name("w-0", "svc", "ns");
        assert!(!pod_answers_to(&p, &n), "no subdomain");
        p.spec.as_mut().unwrap().subdomain = Some("svc".into());
        assert!(pod_answers_to(&p, &n));
        p.spec.as_mut().unwrap().hostname = Some("other".into());
        assert!(!pod_answers_to(&p, &n));
        assert!(pod_answers_to(&p, &name("other", "svc", "ns")));
        assert!(!pod_answers_to(&p, &name("other", "svc", "ns2")));
    }

    #[test]
    fn expand_vars_matches_kubelet_rules() {
        let e = env(&[("POD_IP", "127.1.0.2"), ("PORT", "8080")]);
        assert_eq!(expand_vars("$(POD_IP):$(PORT)", &e), "127.1.0.2:8080");
        assert_eq!(expand_vars("$(MISSING)-x", &e), "$(MISSING)-x");
        assert_eq!(expand_vars("$$(POD_IP) $5 $", &e), "$(POD_IP) $5 $");
        assert_eq!(expand_vars("$(unterminated", &e), "$(unterminated");
        // Later definitions win, as in a container's env list.
        assert_eq!(expand_vars("$(A)", &env(&[("A", "1"), ("A", "2")])), "2");
    }

    #[test]
    fn rewrite_mount_paths_maps_longest_mount() {
        let mounts = vec![
            ("/etc/moe".to_string(), PathBuf::from("/s/root/etc/moe")),
            (
                "/etc/moe/plan/".to_string(),
                PathBuf::from("/s/root/etc/moe/plan"),
            ),
        ];
        assert_eq!(rewrite_mount_paths("/etc/moe", &mounts), "/s/root/etc/moe");
        assert_eq!(
            rewrite_mount_paths("/etc/moe/a.json", &mounts),
            "/s/root/etc/moe/a.json"
        );
        assert_eq!(
            rewrite_mount_paths("/etc/moe/plan/p.json", &mounts),
            "/s/root/etc/moe/plan/p.json"
        );
        assert_eq!(
            rewrite_mount_paths("--plan=/etc/moe/plan/p.json", &mounts),
            "--plan=/s/root/etc/moe/plan/p.json"
        );
        assert_eq!(rewrite_mount_paths("/etc/moexyz", &mounts), "/etc/moexyz");
        assert_eq!(
            rewrite_mount_paths("relative/etc/moe", &mounts),
            "relative/etc/moe"
        );
        assert_eq!(rewrite_mount_paths("a=/etc/moe", &mounts), "a=/etc/moe");
    }

    #[test]
    fn volume_files_lists_keys_or_items() {
        let keys = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            volume_files(&keys, None, "cm").unwrap(),
            vec![("a".into(), "a".into()), ("b".into(), "b".into())]
        );
        let items = [KeyToPath {
            key: "b".into(),
            path: "sub/b.txt".into(),
            mode: None,
        }];
        assert_eq!(
            volume_files(&keys, Some(&items), "cm").unwrap(),
            vec![("sub/b.txt".into(), "b".into())]
        );
        let bad = [KeyToPath {
            key: "zz".into(),
            path: "zz".into(),
            mode: None,
        }];
        assert!(volume_files(&keys, Some(&bad), "ConfigMap ns/cm")
            .unwrap_err()
            .contains("\"zz\""));
    }

    #[test]
    fn safe_relative_refuses_escapes() {
        assert!(safe_relative("a/b").is_ok());
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("/x").is_err());
        assert!(safe_relative("").is_err());
    }

    #[test]
    fn field_ref_resolves_supported_paths() {
        let mut p = pod(Some("true"), Some("node-1"), Some("127.9.0.3"));
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("app".into(), "w".into());
        let sel = |f: &str| ObjectFieldSelector {
            field_path: f.into(),
            api_version: None,
        };
        assert_eq!(field_ref(&p, &sel("metadata.name")).unwrap(), "w-0");
        assert_eq!(field_ref(&p, &sel("metadata.namespace")).unwrap(), "ns");
        assert_eq!(field_ref(&p, &sel("status.podIP")).unwrap(), "127.9.0.3");
        assert_eq!(field_ref(&p, &sel("spec.nodeName")).unwrap(), "node-1");
        assert_eq!(field_ref(&p, &sel("metadata.labels['app']")).unwrap(), "w");
        assert!(field_ref(&p, &sel("status.phase")).is_err());
    }

    #[test]
    fn image_entrypoints_match_the_repository_whatever_the_tag() {
        assert_eq!(image_repository("ghcr.io/a/op:0.1.0"), "ghcr.io/a/op");
        assert_eq!(
            image_repository("localhost:5000/a/op:v1@sha256:ab"),
            "localhost:5000/a/op"
        );
        assert_eq!(image_repository("localhost:5000/op"), "localhost:5000/op");
        assert_eq!(image_repository("op"), "op");
        let map = vec![parse_image_entrypoint("ghcr.io/a/op=moe-operator").unwrap()];
        assert_eq!(
            image_entrypoint("ghcr.io/a/op:0.1.0", &map),
            Some("moe-operator")
        );
        assert_eq!(image_entrypoint("ghcr.io/a/op", &map), Some("moe-operator"));
        assert_eq!(image_entrypoint("ghcr.io/a/other:0.1.0", &map), None);
        assert!(parse_image_entrypoint("ghcr.io/a/op:1=x").is_err());
        assert!(parse_image_entrypoint("noprogram").is_err());
    }

    #[test]
    fn wildcard_binds_narrow_to_the_pod_ip_and_in_cluster_config_reads_the_mounted_token() {
        assert_eq!(
            narrow_wildcard_bind("--metrics-listen=0.0.0.0:8080", "127.3.254.2"),
            "--metrics-listen=127.3.254.2:8080"
        );
        assert_eq!(
            narrow_wildcard_bind("127.0.0.1:80", "127.3.254.2"),
            "127.0.0.1:80"
        );
        let kc: serde_json::Value = serde_json::from_str(&in_cluster_kubeconfig(
            "https://127.0.0.1:6443",
            Path::new("/p/sa"),
            "ops",
        ))
        .unwrap();
        assert_eq!(kc["users"][0]["user"]["tokenFile"], "/p/sa/token");
        assert_eq!(
            kc["clusters"][0]["cluster"]["certificate-authority"],
            "/p/sa/ca.crt"
        );
        assert_eq!(kc["contexts"][0]["context"]["namespace"], "ops");
    }
}
