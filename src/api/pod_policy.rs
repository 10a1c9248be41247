//! The one gate between a MoEDeployment's author and what the operator does for them.
//!
//! Creating a MoEDeployment is creating pods: the operator builds worker pods from the spec with
//! its own rights, so whoever may create a MoEDeployment could otherwise mount any host path,
//! run under any ServiceAccount of the namespace, or read the namespace's Secrets through `env`,
//! without the RBAC rights to do any of that themselves; and with `metrics.prometheus.url` they
//! could make the operator fetch any URL from inside the cluster. A [`PodPolicy`], set once per
//! cluster by the cluster admin (operator flags, [`PodPolicyArgs`]; chart values `podPolicy.*`),
//! says what of that is allowed; its [`Default`] allows none of it.
//!
//! Two checks use it, and every pod-affecting field must go through both:
//! - [`check_pod_policy`] on the spec, from `validate`, with the field path and the flag that
//!   would allow it. A refused spec is never built.
//! - [`check_pod`] on every pod the operator built, before it is applied: whatever spec field a
//!   later change maps onto the pod, a host path, ServiceAccount, image, Secret reference or
//!   privileged setting that the policy does not allow is caught here even if the spec check
//!   forgot it. Privileged containers, host namespaces and host ports have no spec field and no
//!   knob: the operator never sets them, and a change that does fails this check. The one added
//!   capability is `IPC_LOCK` (`spec.dataPlane.ipcLock`, for RDMA), and RDMA device-plugin
//!   resources (`rdma/*`, `*/rdma*`) in `worker.resources`: each only when the admin allows it.
//!
//! None of this can live in the CRD's schema or CEL rules: they are the same in every cluster,
//! while what is allowed is each cluster's admin's decision. See docs/security.md.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, PodSpec, ResourceRequirements};

use super::moedeployment::{MetricsSource, MoEDeploymentSpec};
use super::pod_shape::{SAFE_CAPABILITIES, VOLUME_ADMIN_TOKEN};
use super::validate::FieldError;

/// The operator's flags that set the [`PodPolicy`]; flattened into `moe-operator run`.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct PodPolicyArgs {
    /// Let a MoEDeployment mount its checkpoint from a hostPath under this absolute host directory
    /// (a whole path component: /data allows /data/m, not /database). Repeat for more. Default:
    /// no hostPath at all. Mounts are always read-only.
    #[arg(
        long = "allow-host-path-prefix",
        value_name = "DIR",
        env = "MOE_OPERATOR_ALLOW_HOST_PATH_PREFIXES",
        value_delimiter = ','
    )]
    pub host_path_prefixes: Vec<String>,
    /// Let a MoEDeployment run its workers under this ServiceAccount of its namespace (`*`: any).
    /// Repeat for more. Default: only the namespace's `default` ServiceAccount.
    #[arg(
        long = "allow-service-account",
        value_name = "NAME",
        env = "MOE_OPERATOR_ALLOW_SERVICE_ACCOUNTS",
        value_delimiter = ','
    )]
    pub service_accounts: Vec<String>,
    /// Only worker images starting with this prefix, which must end in `/`, `:` or `@` (a
    /// registry path, a repository's tags, a repository's digests). Repeat for more. Default: any
    /// image.
    #[arg(
        long = "allowed-image-prefix",
        value_name = "PREFIX",
        env = "MOE_OPERATOR_ALLOWED_IMAGE_PREFIXES",
        value_delimiter = ','
    )]
    pub image_prefixes: Vec<String>,
    /// Let `worker.env` read Secrets of the namespace (`valueFrom.secretKeyRef`). Default: no.
    #[arg(long, env = "MOE_OPERATOR_ALLOW_ENV_SECRET_REFS")]
    pub allow_env_secret_refs: bool,
    /// Let `metrics.source: Prometheus` query URLs under this prefix (scheme, host and port exact,
    /// then whole path segments), e.g. `http://prometheus.monitoring:9090`. Repeat for more.
    /// Default: none, so the Prometheus source is refused.
    #[arg(
        long = "allowed-prometheus-url-prefix",
        value_name = "URL",
        env = "MOE_OPERATOR_ALLOWED_PROMETHEUS_URL_PREFIXES",
        value_delimiter = ','
    )]
    pub prometheus_url_prefixes: Vec<String>,
    /// PEM file of CA certificates trusted for `https://` Prometheus URLs, added to the system's.
    #[arg(long, value_name = "FILE", env = "MOE_OPERATOR_PROMETHEUS_CA_FILE")]
    pub prometheus_ca_file: Option<PathBuf>,
    /// Let `dataPlane.ipcLock: true` add the IPC_LOCK capability to the worker container (locking
    /// memory for RDMA registration). Default: no.
    #[arg(long, env = "MOE_OPERATOR_ALLOW_IPC_LOCK")]
    pub allow_ipc_lock: bool,
    /// Let `worker.resources` ask for RDMA device-plugin resources (`rdma/*` or `*/rdma*`, e.g.
    /// `rdma/hca_shared_devices_a`). Default: no.
    #[arg(long, env = "MOE_OPERATOR_ALLOW_RDMA_RESOURCES")]
    pub allow_rdma_resources: bool,
    /// Let `worker.securityContext.capabilities.add` add this Linux capability (e.g. SYS_PTRACE
    /// for a profiler). Repeat for more. NET_BIND_SERVICE is always allowed; IPC_LOCK is
    /// `--allow-ipc-lock`'s. Default: no other.
    #[arg(
        long = "allow-capability",
        value_name = "NAME",
        env = "MOE_OPERATOR_ALLOW_CAPABILITIES",
        value_delimiter = ','
    )]
    pub capabilities: Vec<String>,
    /// Let `worker.volumes` mount Secrets of the namespace (the operator, not the author, would be
    /// reading them into the pod). Default: no.
    #[arg(long, env = "MOE_OPERATOR_ALLOW_SECRET_VOLUMES")]
    pub allow_secret_volumes: bool,
}

/// What the cluster admin allows MoEDeployment authors; the default allows nothing optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodPolicy {
    /// Host directories a checkpoint hostPath may be in (normalised, absolute).
    pub host_path_prefixes: Vec<String>,
    /// ServiceAccounts the workers may run under besides `default`; `*` allows any.
    pub service_accounts: Vec<String>,
    /// Image prefixes; empty allows any image (see docs/security.md for why that is the default).
    pub image_prefixes: Vec<String>,
    pub allow_env_secret_refs: bool,
    /// Prometheus URL prefixes; empty refuses the Prometheus metrics source.
    pub prometheus_url_prefixes: Vec<HttpUrl>,
    /// Extra CA certificates for https Prometheus (read by the Prometheus client, not here).
    pub prometheus_ca_file: Option<PathBuf>,
    /// The IPC_LOCK capability (`dataPlane.ipcLock`), the only capability a worker may add.
    pub allow_ipc_lock: bool,
    /// RDMA device-plugin resources ([`is_rdma_resource`]) in `worker.resources`.
    pub allow_rdma_resources: bool,
    /// Capabilities `worker.securityContext.capabilities.add` may add besides
    /// [`SAFE_CAPABILITIES`] (never IPC_LOCK, which is [`Self::allow_ipc_lock`]'s).
    pub capabilities: Vec<String>,
    /// Secret volumes in `worker.volumes`.
    pub allow_secret_volumes: bool,
}

/// The capability `dataPlane.ipcLock` adds.
pub const IPC_LOCK: &str = "IPC_LOCK";

/// Whether a resource name is an RDMA device plugin's: `rdma/<anything>` or `<vendor>/rdma<...>`
/// (`rdma/hca_shared_devices_a`, `nvidia.com/rdma_shared_device_a`).
pub fn is_rdma_resource(name: &str) -> bool {
    name.split_once('/').is_some_and(|(domain, rest)| {
        domain.eq_ignore_ascii_case("rdma") || rest.to_ascii_lowercase().starts_with("rdma")
    })
}

/// A flag value the policy cannot use; names the flag and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--{flag}={value:?}: {problem}")]
pub struct PolicyArgError {
    pub flag: &'static str,
    pub value: String,
    pub problem: String,
}

impl PodPolicy {
    /// The policy the flags describe; refuses values that would not mean what they say.
    pub fn from_args(a: &PodPolicyArgs) -> Result<Self, PolicyArgError> {
        let bad = |flag: &'static str, value: &str, problem: &str| PolicyArgError {
            flag,
            value: value.to_string(),
            problem: problem.to_string(),
        };
        let mut p = PodPolicy {
            allow_env_secret_refs: a.allow_env_secret_refs,
            prometheus_ca_file: a.prometheus_ca_file.clone(),
            allow_ipc_lock: a.allow_ipc_lock,
            allow_rdma_resources: a.allow_rdma_resources,
            allow_secret_volumes: a.allow_secret_volumes,
            ..Default::default()
        };
        for v in &a.capabilities {
            let name = v.strip_prefix("CAP_").unwrap_or(v);
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(bad(
                    "allow-capability",
                    v,
                    "not a Linux capability name such as SYS_PTRACE",
                ));
            }
            if name == "ALL" || name == IPC_LOCK || name == "SYS_ADMIN" {
                return Err(bad(
                    "allow-capability",
                    v,
                    "ALL and SYS_ADMIN amount to a privileged container, which the operator never builds; IPC_LOCK is --allow-ipc-lock's",
                ));
            }
            p.capabilities.push(name.to_string());
        }
        for v in &a.host_path_prefixes {
            let n = normalise_abs_path(v).ok_or_else(|| {
                bad(
                    "allow-host-path-prefix",
                    v,
                    "give an absolute host directory without '.' or '..' components, e.g. /var/lib/moe",
                )
            })?;
            if n == "/" {
                return Err(bad(
                    "allow-host-path-prefix",
                    v,
                    "'/' would allow every host file, the kubelet's and the node's credentials included: name the directory holding checkpoints",
                ));
            }
            p.host_path_prefixes.push(n);
        }
        for v in &a.service_accounts {
            if v != "*" && !is_dns_subdomain(v) {
                return Err(bad(
                    "allow-service-account",
                    v,
                    "not a ServiceAccount name (lowercase DNS subdomain) or '*'",
                ));
            }
            p.service_accounts.push(v.clone());
        }
        for v in &a.image_prefixes {
            if !v.ends_with(['/', ':', '@']) || v.contains(char::is_whitespace) {
                return Err(bad(
                    "allowed-image-prefix",
                    v,
                    "end the prefix with '/', ':' or '@' (registry.example/ml/, ghcr.io/moe-operator/moe-worker:), so it cannot also match a longer repository name",
                ));
            }
            p.image_prefixes.push(v.clone());
        }
        for v in &a.prometheus_url_prefixes {
            let u = HttpUrl::parse(v).map_err(|e| bad("allowed-prometheus-url-prefix", v, &e))?;
            p.prometheus_url_prefixes.push(u);
        }
        Ok(p)
    }

    /// Whether a checkpoint may be mounted from host directory `path`.
    pub fn host_path_allowed(&self, path: &str) -> bool {
        normalise_abs_path(path).is_some_and(|p| {
            self.host_path_prefixes
                .iter()
                .any(|prefix| path_under(&p, prefix))
        })
    }

    /// Whether a spec may add capability `name` (IPC_LOCK is `dataPlane.ipcLock`'s, not here).
    pub fn capability_allowed(&self, name: &str) -> bool {
        SAFE_CAPABILITIES.contains(&name) || self.capabilities.iter().any(|c| c == name)
    }

    /// Whether workers may run under ServiceAccount `name` (`default` always may).
    pub fn service_account_allowed(&self, name: &str) -> bool {
        name == "default" || self.service_accounts.iter().any(|a| a == "*" || a == name)
    }

    pub fn image_allowed(&self, image: &str) -> bool {
        self.image_prefixes.is_empty() || self.image_prefixes.iter().any(|p| image.starts_with(p))
    }

    /// Whether the operator may query the Prometheus at `url`; the parse error otherwise names
    /// what is wrong with the URL itself.
    pub fn prometheus_url_allowed(&self, url: &str) -> Result<bool, String> {
        let u = HttpUrl::parse(url)?;
        Ok(self
            .prometheus_url_prefixes
            .iter()
            .any(|p| u.starts_with(p)))
    }
}

/// `/a/b` with empty components dropped; `None` when relative or holding `.` or `..`.
fn normalise_abs_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix('/')?;
    let mut out = String::new();
    for c in rest.split('/').filter(|c| !c.is_empty()) {
        if c == "." || c == ".." || c.contains('\0') {
            return None;
        }
        out.push('/');
        out.push_str(c);
    }
    Some(if out.is_empty() { "/".into() } else { out })
}

/// Whether normalised `path` is `prefix` or inside it (whole components).
fn path_under(path: &str, prefix: &str) -> bool {
    path == prefix
        || prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A DNS subdomain (RFC 1123): what Kubernetes object names such as Secrets and ConfigMaps are.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// An `http://` or `https://` URL of the strict form the operator fetches: a host (DNS name, IPv4
/// or bracketed IPv6), an optional port and a path of plain segments; no user info, query,
/// fragment, percent-encoding, `.` or `..` segments, so that prefix matching cannot be fooled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub https: bool,
    /// Lowercase; IPv6 keeps its brackets.
    pub host: String,
    pub port: u16,
    /// Path segments (no empty ones).
    pub segments: Vec<String>,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let example = "e.g. http://prometheus.monitoring:9090";
        let (https, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!(
                "{url:?} is not an http(s) URL with a host, {example}"
            ));
        };
        if let Some(c) = url
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#' | '%' | '\\'))
        {
            return Err(format!(
                "{url:?} contains {c:?}: give the base URL of the Prometheus HTTP API without query, fragment or escapes, {example}"
            ));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') {
            return Err(format!(
                "{url:?} has user info ('@'): put no credentials in the URL"
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && (!h.starts_with('[') || h.ends_with(']')) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| format!("{url:?}: bad port {p:?}"))?;
                (h, port)
            }
            _ => (authority, if https { 443 } else { 80 }),
        };
        let host = host.to_ascii_lowercase();
        let valid_host =
            if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                inner.parse::<std::net::Ipv6Addr>().is_ok()
            } else {
                !host.is_empty()
                    && host.len() <= 253
                    && host.split('.').all(|l| {
                        !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    })
            };
        if !valid_host {
            return Err(format!(
                "{url:?} is not an http(s) URL with a host, {example}"
            ));
        }
        let mut segments = Vec::new();
        for s in path.split('/').filter(|s| !s.is_empty()) {
            if s == "." || s == ".." {
                return Err(format!("{url:?} has a {s:?} path segment: remove it"));
            }
            segments.push(s.to_string());
        }
        Ok(HttpUrl {
            https,
            host,
            port,
            segments,
        })
    }

    /// Same scheme, host and port, and `prefix`'s path segments lead this one's.
    pub fn starts_with(&self, prefix: &HttpUrl) -> bool {
        self.https == prefix.https
            && self.host == prefix.host
            && self.port == prefix.port
            && self.segments.starts_with(&prefix.segments)
    }

    /// The host as a socket address wants it (IPv6 without brackets).
    pub fn connect_host(&self) -> &str {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
    }

    /// `/seg/seg` (empty for the root).
    pub fn path(&self) -> String {
        self.segments.iter().map(|s| format!("/{s}")).collect()
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path())
    }
}

/// How a cluster admin allows something, for error messages.
fn how_to_allow(flag: &str, example: &str, chart_value: &str) -> String {
    format!("a cluster admin can allow it with the operator flag --{flag}={example} (chart value podPolicy.{chart_value})")
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Check every field of `spec` that reaches a pod, or that the operator acts on (the Prometheus
/// URL), against `policy`. Called by `validate`; each error names the field and how to allow it.
pub fn check_pod_policy(spec: &MoEDeploymentSpec, policy: &PodPolicy) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut err = |path: String, message: String| errs.push(FieldError { path, message });

    if let Some(hp) = spec
        .model
        .checkpoint
        .volume
        .as_ref()
        .and_then(|v| v.host_path.as_ref())
    {
        if !policy.host_path_allowed(&hp.path) {
            let dir = normalise_abs_path(&hp.path).unwrap_or_else(|| "/var/lib/moe".into());
            err(
                "spec.model.checkpoint.volume.hostPath.path".into(),
                format!(
                    "{:?} is not under a host directory this cluster allows (allowed: {}): a hostPath gives the pod the node's files; use a persistentVolumeClaim, or {}",
                    hp.path,
                    list_or_none(&policy.host_path_prefixes),
                    how_to_allow("allow-host-path-prefix", &dir, "hostPathPrefixes"),
                ),
            );
        }
    }

    let w = &spec.worker;
    if let Some(sa) = &w.service_account_name {
        if !policy.service_account_allowed(sa) {
            err(
                "spec.worker.serviceAccountName".into(),
                format!(
                    "{sa:?} is not a ServiceAccount this cluster lets MoEDeployments choose (allowed besides default: {}): the workers would get its API rights; remove it, or {}",
                    list_or_none(&policy.service_accounts),
                    how_to_allow("allow-service-account", sa, "serviceAccounts"),
                ),
            );
        }
    }
    if !policy.image_allowed(&w.image) {
        err(
            "spec.worker.image".into(),
            format!(
                "{:?} does not start with an image prefix this cluster allows ({}): use an allowed image, or {}",
                w.image,
                policy.image_prefixes.join(", "),
                how_to_allow("allowed-image-prefix", "registry.example/ml/", "imagePrefixes"),
            ),
        );
    }
    for (i, e) in w.env.iter().enumerate() {
        if env_reads_secret(e) && !policy.allow_env_secret_refs {
            err(
                format!("spec.worker.env[{i}].valueFrom.secretKeyRef"),
                format!(
                    "{} reads a Secret, which this cluster does not let MoEDeployments do (the operator, not you, would be reading it): remove it, or {}",
                    e.name,
                    how_to_allow("allow-env-secret-refs", "true", "allowEnvSecretRefs"),
                ),
            );
        }
    }

    if let Some(r) = &w.resources {
        for (kind, name) in rdma_resources(r) {
            if !policy.allow_rdma_resources {
                err(
                    format!("spec.worker.resources.{kind}"),
                    format!(
                        "{name} is an RDMA device-plugin resource, which this cluster does not let MoEDeployments ask for (it gives the pod the node's RDMA devices): remove it, or {}",
                        how_to_allow("allow-rdma-resources", "true", "allowRdmaResources"),
                    ),
                );
            }
        }
    }
    for (i, v) in w.volumes.iter().enumerate() {
        if let Some(hp) = &v.host_path {
            if !policy.host_path_allowed(&hp.path) {
                let dir = normalise_abs_path(&hp.path).unwrap_or_else(|| "/var/lib/moe".into());
                err(
                    format!("spec.worker.volumes[{i}].hostPath.path"),
                    format!(
                        "{:?} is not under a host directory this cluster allows (allowed: {}): a hostPath gives the pod the node's files; use a persistentVolumeClaim, or {}",
                        hp.path,
                        list_or_none(&policy.host_path_prefixes),
                        how_to_allow("allow-host-path-prefix", &dir, "hostPathPrefixes"),
                    ),
                );
            }
            for (j, m) in w.volume_mounts.iter().enumerate() {
                if m.name == v.name && m.read_only != Some(true) {
                    err(
                        format!("spec.worker.volumeMounts[{j}].readOnly"),
                        format!("{} mounts the hostPath volume {}: host directories are mounted read-only, set readOnly: true", m.mount_path, v.name),
                    );
                }
            }
        }
        if v.secret.is_some() && !policy.allow_secret_volumes {
            err(
                format!("spec.worker.volumes[{i}].secret"),
                format!(
                    "{} mounts a Secret, which this cluster does not let MoEDeployments do (the operator, not you, would be reading it): remove it, or {}",
                    v.name,
                    how_to_allow("allow-secret-volumes", "true", "allowSecretVolumes"),
                ),
            );
        }
    }
    let s3_secret = spec
        .model
        .checkpoint
        .s3
        .as_ref()
        .and_then(|s| s.credentials_secret.as_ref());
    if let (Some(name), false) = (s3_secret, policy.allow_secret_volumes) {
        err(
            "spec.model.checkpoint.s3.credentialsSecret".into(),
            format!(
                "Secret {name} would be mounted into the fetch-weights init container, which this cluster does not let MoEDeployments do (the operator, not you, would be reading it): remove it for a public bucket, or {}",
                how_to_allow("allow-secret-volumes", "true", "allowSecretVolumes"),
            ),
        );
    }
    let adds = w
        .security_context
        .iter()
        .flat_map(|s| s.capabilities.iter())
        .flat_map(|c| c.add.iter());
    for (i, cap) in adds.enumerate() {
        // IPC_LOCK, ALL and CAP_ spellings are refused by pod_shape with their own fix.
        if cap == IPC_LOCK || cap == "ALL" || cap.starts_with("CAP_") {
            continue;
        }
        if !policy.capability_allowed(cap) {
            err(
                format!("spec.worker.securityContext.capabilities.add[{i}]"),
                format!(
                    "{cap} is not a capability this cluster lets MoEDeployments add (always allowed: {}; allowed here: {}): remove it, or {}",
                    SAFE_CAPABILITIES.join(", "),
                    list_or_none(&policy.capabilities),
                    how_to_allow("allow-capability", cap, "capabilities"),
                ),
            );
        }
    }
    if spec.data_plane.ipc_lock && !policy.allow_ipc_lock {
        err(
            "spec.dataPlane.ipcLock".into(),
            format!(
                "adds the IPC_LOCK capability, which this cluster does not let MoEDeployments do (it lets the worker lock unbounded memory): set it false, or {}",
                how_to_allow("allow-ipc-lock", "true", "allowIpcLock"),
            ),
        );
    }

    if let (MetricsSource::Prometheus, Some(p)) = (spec.metrics.source, &spec.metrics.prometheus) {
        match policy.prometheus_url_allowed(&p.url) {
            Err(e) => err("spec.metrics.prometheus.url".into(), e),
            Ok(true) => {}
            Ok(false) => {
                let example = HttpUrl::parse(&p.url)
                    .map(|u| {
                        let scheme = if u.https { "https" } else { "http" };
                        format!("{scheme}://{}:{}", u.host, u.port)
                    })
                    .unwrap_or_default();
                let allowed: Vec<String> = policy
                    .prometheus_url_prefixes
                    .iter()
                    .map(|u| u.to_string())
                    .collect();
                err(
                    "spec.metrics.prometheus.url".into(),
                    format!(
                        "{:?} is not under a Prometheus URL this cluster allows (allowed: {}): the operator fetches it from inside the cluster; use source: Workers, or {}",
                        p.url,
                        list_or_none(&allowed),
                        how_to_allow("allowed-prometheus-url-prefix", &example, "prometheusUrlPrefixes"),
                    ),
                );
            }
        }
    }
    errs
}

/// The RDMA resources (`requests` or `limits`, and the name) of a container's resources.
fn rdma_resources(r: &ResourceRequirements) -> Vec<(&'static str, &str)> {
    [("requests", &r.requests), ("limits", &r.limits)]
        .into_iter()
        .flat_map(|(kind, map)| {
            map.iter()
                .flat_map(|m| m.keys())
                .filter(|k| is_rdma_resource(k))
                .map(move |k| (kind, k.as_str()))
        })
        .collect()
}

fn env_reads_secret(e: &EnvVar) -> bool {
    e.value_from
        .as_ref()
        .is_some_and(|v| v.secret_key_ref.is_some())
}

/// Check a pod the operator built, before it is applied: the backstop for fields a spec check
/// missed. Returns what is wrong; non-empty means do not apply the pod.
pub fn check_pod(pod: &Pod, policy: &PodPolicy) -> Vec<String> {
    let mut out = Vec::new();
    let name = pod.metadata.name.as_deref().unwrap_or("<unnamed>");
    let Some(spec) = &pod.spec else {
        return vec![format!("pod {name} has no spec")];
    };
    check_pod_spec(name, spec, policy, &mut out);
    out
}

fn check_pod_spec(name: &str, s: &PodSpec, policy: &PodPolicy, out: &mut Vec<String>) {
    let mut no = |what: String| out.push(format!("pod {name}: {what}"));
    for (flag, set) in [
        ("hostNetwork", s.host_network),
        ("hostPID", s.host_pid),
        ("hostIPC", s.host_ipc),
    ] {
        if set == Some(true) {
            no(format!("{flag} is set; the operator never allows it"));
        }
    }
    for sa in [&s.service_account_name, &s.service_account]
        .into_iter()
        .flatten()
    {
        if !policy.service_account_allowed(sa) {
            no(format!("ServiceAccount {sa:?} is not allowed"));
        }
    }
    for v in s.volumes.iter().flatten() {
        if v.secret.is_some() && v.name != VOLUME_ADMIN_TOKEN && !policy.allow_secret_volumes {
            no(format!(
                "volume {} mounts a Secret, which is not allowed",
                v.name
            ));
        }
        if v.host_path.is_some() {
            let writable = s
                .containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .flat_map(|c| c.volume_mounts.iter().flatten())
                .any(|m| m.name == v.name && m.read_only != Some(true));
            if writable {
                no(format!("hostPath volume {} is mounted writable", v.name));
            }
        }
        let kind_ok = v.config_map.is_some()
            || v.secret.is_some()
            || v.persistent_volume_claim.is_some()
            || v.empty_dir.is_some()
            || v.downward_api.is_some()
            || v.projected.is_some();
        if let Some(hp) = &v.host_path {
            if !policy.host_path_allowed(&hp.path) {
                no(format!(
                    "volume {} mounts host path {:?}, not under an allowed prefix",
                    v.name, hp.path
                ));
            }
        } else if !kind_ok {
            no(format!(
                "volume {} is of a kind the policy has no rule for: add one to api::pod_policy before building it",
                v.name
            ));
        }
    }
    let containers = s
        .containers
        .iter()
        .chain(s.init_containers.iter().flatten());
    for c in containers {
        check_container(c, policy, &mut no);
    }
    if s.ephemeral_containers
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        no("has ephemeral containers".into());
    }
}

fn check_container(c: &Container, policy: &PodPolicy, no: &mut impl FnMut(String)) {
    let n = &c.name;
    match &c.image {
        Some(i) if !policy.image_allowed(i) => {
            no(format!("container {n}: image {i:?} is not allowed"))
        }
        Some(_) => {}
        None => no(format!("container {n} has no image")),
    }
    for e in c.env.iter().flatten() {
        if env_reads_secret(e) && !policy.allow_env_secret_refs {
            no(format!("container {n}: env {} reads a Secret", e.name));
        }
    }
    for e in c.env_from.iter().flatten() {
        if e.secret_ref.is_some() && !policy.allow_env_secret_refs {
            no(format!("container {n}: envFrom reads a Secret"));
        }
    }
    for p in c.ports.iter().flatten() {
        if p.host_port.is_some() {
            no(format!(
                "container {n}: port {} has a hostPort",
                p.container_port
            ));
        }
    }
    let sc = c.security_context.as_ref();
    if sc.and_then(|s| s.privileged) == Some(true) {
        no(format!("container {n} is privileged"));
    }
    if sc.and_then(|s| s.allow_privilege_escalation) != Some(false) {
        no(format!(
            "container {n} does not set allowPrivilegeEscalation: false"
        ));
    }
    // IPC_LOCK when allowed, the safe set and the admin's list; every other capability never.
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    if !caps
        .and_then(|c| c.drop.as_ref())
        .is_some_and(|d| d.iter().any(|c| c == "ALL"))
    {
        no(format!("container {n} does not drop ALL capabilities"));
    }
    for cap in caps.and_then(|c| c.add.as_ref()).into_iter().flatten() {
        let ok = if cap == IPC_LOCK {
            policy.allow_ipc_lock
        } else {
            policy.capability_allowed(cap)
        };
        if !ok {
            no(format!("container {n} adds capabilities ({cap})"));
        }
    }
    if let Some(r) = &c.resources {
        for (kind, name) in rdma_resources(r) {
            if !policy.allow_rdma_resources {
                no(format!(
                    "container {n} asks for the RDMA resource {name} ({kind}), which is not allowed"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::moedeployment::*;
    use crate::api::validate::tests::errors;
    use k8s_openapi::api::core::v1::{
        EnvVarSource, HostPathVolumeSource, PersistentVolumeClaimVolumeSource, SecretKeySelector,
        SecurityContext, Volume,
    };

    /// The validation tests' spec, with an image under a registry path the image tests use.
    fn spec() -> MoEDeploymentSpec {
        let mut s = crate::api::validate::tests::demo_spec();
        s.worker.image = "ghcr.io/moe-operator/moe-worker:0.1.0".into();
        s
    }

    fn args(f: impl FnOnce(&mut PodPolicyArgs)) -> PodPolicy {
        let mut a = PodPolicyArgs::default();
        f(&mut a);
        PodPolicy::from_args(&a).unwrap()
    }

    fn host_path(s: &mut MoEDeploymentSpec, p: &str) {
        s.model.checkpoint.volume = Some(CheckpointVolume {
            host_path: Some(HostPathVolumeSource {
                path: p.into(),
                ..Default::default()
            }),
            persistent_volume_claim: None,
        });
    }

    fn only(errs: &[FieldError], path: &str) -> String {
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].path, path);
        errs[0].message.clone()
    }

    #[test]
    fn default_policy_refuses_host_paths_naming_the_flag_and_chart_value() {
        let mut s = spec();
        host_path(&mut s, "/var/lib/moe/ckpt");
        let m = only(
            &errors(&s, &PodPolicy::default()),
            "spec.model.checkpoint.volume.hostPath.path",
        );
        assert!(m.contains("allowed: none"), "{m}");
        assert!(
            m.contains("--allow-host-path-prefix=/var/lib/moe/ckpt"),
            "{m}"
        );
        assert!(m.contains("podPolicy.hostPathPrefixes"), "{m}");
        // A PVC is the author's own storage: always allowed.
        s.model.checkpoint.volume = Some(CheckpointVolume {
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: "ckpt".into(),
                read_only: Some(true),
            }),
            host_path: None,
        });
        assert_eq!(errors(&s, &PodPolicy::default()), vec![]);
    }

    #[test]
    fn host_path_prefixes_match_whole_components() {
        let p = args(|a| a.host_path_prefixes = vec!["/data/".into()]);
        assert_eq!(p.host_path_prefixes, vec!["/data".to_string()]);
        for ok in ["/data", "/data/", "/data/models/x", "//data//m"] {
            assert!(p.host_path_allowed(ok), "{ok}");
        }
        for bad in [
            "/database",
            "/dat",
            "/",
            "/etc",
            "/data/../etc",
            "/data/./x",
            "data/x",
            "",
        ] {
            assert!(!p.host_path_allowed(bad), "{bad}");
        }
        let mut s = spec();
        host_path(&mut s, "/data/deepseek");
        assert_eq!(errors(&s, &p), vec![]);
        host_path(&mut s, "/var/lib/kubelet");
        let m = only(
            &errors(&s, &p),
            "spec.model.checkpoint.volume.hostPath.path",
        );
        assert!(m.contains("allowed: /data"), "{m}");
    }

    #[test]
    fn flag_values_that_would_not_mean_what_they_say_are_refused() {
        for (f, want) in [
            (
                (|a: &mut PodPolicyArgs| a.host_path_prefixes = vec!["/".into()])
                    as fn(&mut PodPolicyArgs),
                "allow-host-path-prefix",
            ),
            (
                |a| a.host_path_prefixes = vec!["data".into()],
                "allow-host-path-prefix",
            ),
            (
                |a| a.host_path_prefixes = vec!["/data/../etc".into()],
                "allow-host-path-prefix",
            ),
            (
                |a| a.image_prefixes = vec!["ghcr.io/moe-operator/moe-worker".into()],
                "allowed-image-prefix",
            ),
            (
                |a| a.service_accounts = vec!["Admin SA".into()],
                "allow-service-account",
            ),
            (
                |a| a.prometheus_url_prefixes = vec!["prometheus:9090".into()],
                "allowed-prometheus-url-prefix",
            ),
            (
                |a| a.prometheus_url_prefixes = vec!["http://u:p@prom:9090".into()],
                "allowed-prometheus-url-prefix",
            ),
        ] {
            let mut a = PodPolicyArgs::default();
            f(&mut a);
            let e = PodPolicy::from_args(&a).unwrap_err();
            assert_eq!(e.flag, want, "{e}");
        }
    }

    #[test]
    fn service_account_only_default_unless_allowed() {
        let mut s = spec();
        s.worker.service_account_name = Some("default".into());
        assert_eq!(errors(&s, &PodPolicy::default()), vec![]);
        s.worker.service_account_name = Some("cluster-admin-sa".into());
        let m = only(
            &errors(&s, &PodPolicy::default()),
            "spec.worker.serviceAccountName",
        );
        assert!(
            m.contains("--allow-service-account=cluster-admin-sa")
                && m.contains("podPolicy.serviceAccounts"),
            "{m}"
        );
        let p = args(|a| a.service_accounts = vec!["model-reader".into()]);
        assert_eq!(errors(&s, &p).len(), 1);
        s.worker.service_account_name = Some("model-reader".into());
        assert_eq!(errors(&s, &p), vec![]);
        let any = args(|a| a.service_accounts = vec!["*".into()]);
        s.worker.service_account_name = Some("anything".into());
        assert_eq!(errors(&s, &any), vec![]);
    }

    #[test]
    fn image_prefixes_when_set() {
        let mut s = spec();
        assert!(PodPolicy::default().image_allowed("evil.example/x:1"));
        let p = args(|a| {
            a.image_prefixes = vec![
                "ghcr.io/moe-operator/moe-worker:".into(),
                "registry.example/ml/".into(),
            ]
        });
        assert_eq!(errors(&s, &p), vec![]);
        s.worker.image = "ghcr.io/moe-operator/moe-worker-evil:1".into();
        let m = only(&errors(&s, &p), "spec.worker.image");
        assert!(m.contains("--allowed-image-prefix"), "{m}");
        s.worker.image = "registry.example/ml/moe-worker@sha256:00".into();
        assert_eq!(errors(&s, &p), vec![]);
    }

    #[test]
    fn env_secret_refs_only_when_allowed() {
        let mut s = spec();
        s.worker.env.push(EnvVar {
            name: "HF_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: "other-team".into(),
                    key: "token".into(),
                    optional: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let m = only(
            &errors(&s, &PodPolicy::default()),
            "spec.worker.env[0].valueFrom.secretKeyRef",
        );
        assert!(m.contains("--allow-env-secret-refs"), "{m}");
        let p = args(|a| a.allow_env_secret_refs = true);
        assert_eq!(errors(&s, &p), vec![]);
    }

    fn prometheus(s: &mut MoEDeploymentSpec, url: &str) {
        s.metrics.source = MetricsSource::Prometheus;
        s.metrics.prometheus = Some(PrometheusSpec {
            series_labels: None,
            url: url.into(),
            query: "sum by (layer, expert) (x)".into(),
            auth: None,
            ca: None,
        });
    }

    #[test]
    fn prometheus_urls_only_under_allowed_prefixes() {
        let mut s = spec();
        prometheus(&mut s, "https://prometheus.monitoring:9091/prom");
        // Default: no Prometheus at all, the flag named.
        let m = only(
            &errors(&s, &PodPolicy::default()),
            "spec.metrics.prometheus.url",
        );
        assert!(
            m.contains("allowed: none")
                && m.contains("--allowed-prometheus-url-prefix=https://prometheus.monitoring:9091")
                && m.contains("podPolicy.prometheusUrlPrefixes"),
            "{m}"
        );
        // https is accepted when allowed.
        let p = args(|a| {
            a.prometheus_url_prefixes = vec!["https://Prometheus.monitoring:9091/prom/".into()]
        });
        assert_eq!(errors(&s, &p), vec![]);
        // Anything else on that host, or another host, scheme or port, is not.
        for url in [
            "http://prometheus.monitoring:9091/prom",
            "https://prometheus.monitoring:9092/prom",
            "https://prometheus.monitoring:9091/prometheus",
            "https://prometheus.monitoring:9091/",
            "https://prometheus.monitoring:9091.evil.example/prom",
            "https://prometheus.monitoring.evil.example:9091/prom",
            "http://169.254.169.254/latest/meta-data",
            "http://kubernetes.default.svc:443",
        ] {
            prometheus(&mut s, url);
            let errs = errors(&s, &p);
            assert!(
                errs.iter().any(|e| e.path == "spec.metrics.prometheus.url"),
                "{url} accepted: {errs:?}"
            );
        }
        // URLs that could fool a textual prefix match are refused outright.
        for url in [
            "https://prometheus.monitoring:9091@evil.example/prom",
            "https://prometheus.monitoring:9091/prom/../../admin",
            "https://prometheus.monitoring:9091/prom/%2e%2e/x",
            "https://prometheus.monitoring:9091/prom?x=1",
            "https://prometheus.monitoring:9091/prom#x",
        ] {
            prometheus(&mut s, url);
            assert!(
                p.prometheus_url_allowed(url).is_err(),
                "{url} parsed as a URL"
            );
            assert!(!errors(&s, &p).is_empty(), "{url} accepted");
        }
        // Default ports are the same as explicit ones; deeper paths are under the prefix.
        let p = args(|a| a.prometheus_url_prefixes = vec!["http://prom".into()]);
        assert_eq!(p.prometheus_url_allowed("http://prom:80/x/y"), Ok(true));
        assert_eq!(p.prometheus_url_allowed("https://prom:443"), Ok(false));
        assert_eq!(
            HttpUrl::parse("https://[::1]:9/a").unwrap().connect_host(),
            "::1"
        );
    }

    fn demo_md(s: MoEDeploymentSpec) -> MoEDeployment {
        let mut md = MoEDeployment::new("demo", s);
        md.metadata.namespace = Some("ns".into());
        md.metadata.uid = Some("u-1".into());
        md
    }

    /// What the spec check lets through, the pod check passes: every field that reaches the pod
    /// is covered by both, for the pods `controller::build` really builds.
    #[test]
    fn built_pods_pass_the_pod_check_exactly_when_the_spec_check_does() {
        let allow = args(|a| {
            a.host_path_prefixes = vec!["/data".into()];
            a.service_accounts = vec!["reader".into()];
            a.allow_env_secret_refs = true;
            a.image_prefixes = vec!["ghcr.io/moe-operator/".into()];
            a.allow_ipc_lock = true;
            a.allow_rdma_resources = true;
        });
        let mut s = spec();
        host_path(&mut s, "/data/m");
        s.data_plane.ipc_lock = true;
        s.worker.resources = Some(rdma("rdma/hca_shared_devices_a"));
        s.worker.service_account_name = Some("reader".into());
        s.worker.env.push(EnvVar {
            name: "T".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: "s".into(),
                    key: "k".into(),
                    optional: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let md = demo_md(s.clone());
        let valid = crate::api::validate::validate(&s, &allow).unwrap();
        let pod = crate::controller::build::worker_pod(&md, &valid, 0, "h").unwrap();
        assert_eq!(check_pod_policy(&s, &allow), vec![]);
        assert_eq!(check_pod(&pod, &allow), Vec::<String>::new());
        // Under the default policy both refuse the same five things.
        let spec_errs = check_pod_policy(&s, &PodPolicy::default());
        let pod_errs = check_pod(&pod, &PodPolicy::default());
        assert_eq!(spec_errs.len(), 5, "{spec_errs:#?}");
        assert_eq!(pod_errs.len(), 5, "{pod_errs:#?}");
        assert!(pod_errs.iter().any(|e| e.contains("/data/m")));
        assert!(pod_errs.iter().any(|e| e.contains("reader")));
        assert!(pod_errs.iter().any(|e| e.contains("reads a Secret")));
        assert!(pod_errs
            .iter()
            .any(|e| e.contains("adds capabilities (IPC_LOCK)")));
        assert!(pod_errs
            .iter()
            .any(|e| e.contains("RDMA resource rdma/hca_shared_devices_a")));
        // Each allowance on its own lets only its own field through.
        for (allow, left) in [
            (
                args(|a| a.allow_ipc_lock = true),
                "spec.worker.resources.limits",
            ),
            (
                args(|a| a.allow_rdma_resources = true),
                "spec.dataPlane.ipcLock",
            ),
        ] {
            let mut s = spec();
            s.data_plane.ipc_lock = true;
            s.worker.resources = Some(rdma("rdma/hca_shared_devices_a"));
            let m = only(&errors(&s, &allow), left);
            assert!(m.contains("--allow-"), "{m}");
            let pod = crate::controller::build::worker_pod(&demo_md(s.clone()), &valid, 0, "h");
            assert_eq!(check_pod(&pod.unwrap(), &allow).len(), 1);
        }
    }

    fn rdma(name: &str) -> ResourceRequirements {
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        ResourceRequirements {
            limits: Some([(name.to_string(), Quantity("1".into()))].into()),
            ..Default::default()
        }
    }

    /// RDMA for NCCL: IPC_LOCK and the RDMA device plugin's resources, each refused by default
    /// naming the field and the flag, and allowed by its flag, which allows exactly that.
    #[test]
    fn ipc_lock_and_rdma_resources_only_when_allowed() {
        let mut s = spec();
        s.data_plane.ipc_lock = true;
        let m = only(&errors(&s, &PodPolicy::default()), "spec.dataPlane.ipcLock");
        assert!(
            m.contains("--allow-ipc-lock=true") && m.contains("podPolicy.allowIpcLock"),
            "{m}"
        );
        let lock = args(|a| a.allow_ipc_lock = true);
        assert_eq!(errors(&s, &lock), vec![]);
        let mut s = spec();
        s.worker.resources = Some(rdma("nvidia.com/rdma_shared_device_a"));
        let m = only(
            &errors(&s, &PodPolicy::default()),
            "spec.worker.resources.limits",
        );
        assert!(
            m.contains("nvidia.com/rdma_shared_device_a")
                && m.contains("--allow-rdma-resources=true")
                && m.contains("podPolicy.allowRdmaResources"),
            "{m}"
        );
        assert_eq!(errors(&s, &args(|a| a.allow_rdma_resources = true)), vec![]);
        for yes in [
            "rdma/hca_shared_devices_a",
            "rdma/rdma_shared_device_a",
            "nvidia.com/rdma_shared_device_a",
            "example.com/RDMA",
        ] {
            assert!(is_rdma_resource(yes), "{yes}");
        }
        for no in [
            "nvidia.com/gpu",
            "memory",
            "cpu",
            "rdma",
            "hugepages-2Mi",
            "x/hca_rdma",
        ] {
            assert!(!is_rdma_resource(no), "{no}");
        }
        // The pod check with IPC_LOCK allowed: IPC_LOCK passes, any other capability does not.
        let md = demo_md(spec());
        let valid = crate::api::validate::validate(&md.spec, &lock).unwrap();
        let mut pod = crate::controller::build::worker_pod(&md, &valid, 0, "h").unwrap();
        let set = |p: &mut Pod, add: &[&str]| {
            p.spec.as_mut().unwrap().containers[0]
                .security_context
                .as_mut()
                .unwrap()
                .capabilities
                .as_mut()
                .unwrap()
                .add = Some(add.iter().map(|c| c.to_string()).collect());
        };
        set(&mut pod, &["IPC_LOCK"]);
        assert_eq!(check_pod(&pod, &lock), Vec::<String>::new());
        assert_eq!(check_pod(&pod, &PodPolicy::default()).len(), 1);
        for other in [
            &["IPC_LOCK", "SYS_ADMIN"][..],
            &["NET_RAW"],
            &["CAP_IPC_LOCK"],
        ] {
            set(&mut pod, other);
            let errs = check_pod(&pod, &lock);
            assert_eq!(errs.len(), 1, "{other:?}: {errs:?}");
        }
    }

    /// The shaped fields of `spec.worker` that reach the node: hostPath volumes (allowed prefix,
    /// read-only), Secret volumes and capabilities, each refused by default naming the field and
    /// the flag, and by the pod check of the pod really built.
    #[test]
    fn shaped_volumes_and_capabilities_go_through_the_gate() {
        let shaped = |s: &mut MoEDeploymentSpec| {
            s.worker.volumes = vec![
                WorkerVolume {
                    name: "hp".into(),
                    host_path: Some(HostPathVolumeSource {
                        path: "/data/tok".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                WorkerVolume {
                    name: "sec".into(),
                    secret: Some(Default::default()),
                    ..Default::default()
                },
            ];
            s.worker.volume_mounts = vec![
                WorkerVolumeMount {
                    name: "hp".into(),
                    mount_path: "/tok".into(),
                    read_only: Some(true),
                    ..Default::default()
                },
                WorkerVolumeMount {
                    name: "sec".into(),
                    mount_path: "/sec".into(),
                    ..Default::default()
                },
            ];
            s.worker.security_context = Some(WorkerSecurityContext {
                capabilities: Some(WorkerCapabilities {
                    add: vec!["NET_BIND_SERVICE".into(), "SYS_PTRACE".into()],
                }),
                ..Default::default()
            });
        };
        let mut s = spec();
        shaped(&mut s);
        let e = errors(&s, &PodPolicy::default());
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "spec.worker.volumes[0].hostPath.path",
                "spec.worker.volumes[1].secret",
                "spec.worker.securityContext.capabilities.add[1]"
            ],
            "{e:#?}"
        );
        assert!(e[0].message.contains("--allow-host-path-prefix=/data/tok"));
        assert!(
            e[1].message.contains("--allow-secret-volumes=true")
                && e[1].message.contains("podPolicy.allowSecretVolumes")
        );
        assert!(
            e[2].message.contains("--allow-capability=SYS_PTRACE")
                && e[2].message.contains("podPolicy.capabilities")
        );
        let allow = args(|a| {
            a.host_path_prefixes = vec!["/data".into()];
            a.allow_secret_volumes = true;
            a.capabilities = vec!["SYS_PTRACE".into()];
        });
        assert_eq!(errors(&s, &allow), vec![]);
        // The pod built from it passes the pod check exactly under the policy that allows it.
        let md = demo_md(s.clone());
        let valid = crate::api::validate::validate(&s, &allow).unwrap();
        let pod = crate::controller::build::worker_pod(&md, &valid, 0, "h").unwrap();
        assert_eq!(check_pod(&pod, &allow), Vec::<String>::new());
        let pod_errs = check_pod(&pod, &PodPolicy::default());
        assert_eq!(pod_errs.len(), 3, "{pod_errs:#?}");
        // A writable mount of a hostPath is refused even where the path is allowed.
        s.worker.volume_mounts[0].read_only = None;
        let m = only(&errors(&s, &allow), "spec.worker.volumeMounts[0].readOnly");
        assert!(m.contains("readOnly: true"), "{m}");
        let mut pod = pod;
        pod.spec.as_mut().unwrap().containers[0]
            .volume_mounts
            .as_mut()
            .unwrap()[3]
            .read_only = None;
        let pe = check_pod(&pod, &allow);
        assert!(
            pe.len() == 1 && pe[0].contains("mounted writable"),
            "{pe:?}"
        );
        // Flags that would amount to privilege are refused.
        for bad in ["ALL", "SYS_ADMIN", "IPC_LOCK", "sys_ptrace", ""] {
            let e = PodPolicy::from_args(&PodPolicyArgs {
                capabilities: vec![bad.into()],
                ..Default::default()
            })
            .unwrap_err();
            assert_eq!(e.flag, "allow-capability");
        }
        assert_eq!(
            args(|a| a.capabilities = vec!["CAP_SYS_PTRACE".into()]).capabilities,
            ["SYS_PTRACE"]
        );
    }

    #[test]
    fn pod_check_refuses_privileged_settings_no_spec_field_can_set() {
        let md = demo_md(spec());
        let p = PodPolicy::default();
        let valid = crate::api::validate::validate(&md.spec, &p).unwrap();
        let base = crate::controller::build::worker_pod(&md, &valid, 0, "h").unwrap();
        assert_eq!(check_pod(&base, &p), Vec::<String>::new());
        type Edit = fn(&mut Pod);
        let edits: Vec<(Edit, &str)> = vec![
            (
                |p| p.spec.as_mut().unwrap().host_network = Some(true),
                "hostNetwork",
            ),
            (
                |p| p.spec.as_mut().unwrap().host_pid = Some(true),
                "hostPID",
            ),
            (
                |p| p.spec.as_mut().unwrap().host_ipc = Some(true),
                "hostIPC",
            ),
            (
                |p| {
                    p.spec.as_mut().unwrap().containers[0].security_context =
                        Some(SecurityContext {
                            privileged: Some(true),
                            allow_privilege_escalation: Some(false),
                            ..Default::default()
                        })
                },
                "privileged",
            ),
            (
                |p| p.spec.as_mut().unwrap().containers[0].security_context = None,
                "allowPrivilegeEscalation",
            ),
            (
                |p| {
                    let sc = p.spec.as_mut().unwrap().containers[0]
                        .security_context
                        .as_mut()
                        .unwrap();
                    sc.capabilities.as_mut().unwrap().add = Some(vec!["SYS_ADMIN".into()]);
                },
                "adds capabilities",
            ),
            (
                |p| {
                    let sc = p.spec.as_mut().unwrap().containers[0]
                        .security_context
                        .as_mut()
                        .unwrap();
                    sc.capabilities.as_mut().unwrap().add = Some(vec![IPC_LOCK.into()]);
                },
                "adds capabilities (IPC_LOCK)",
            ),
            (
                |p| p.spec.as_mut().unwrap().containers[0].resources = Some(rdma("rdma/hca")),
                "RDMA resource rdma/hca",
            ),
            (
                |p| {
                    p.spec.as_mut().unwrap().containers[0]
                        .ports
                        .as_mut()
                        .unwrap()[0]
                        .host_port = Some(80)
                },
                "hostPort",
            ),
            (
                |p| {
                    p.spec
                        .as_mut()
                        .unwrap()
                        .volumes
                        .as_mut()
                        .unwrap()
                        .push(Volume {
                            name: "nfs".into(),
                            nfs: Some(Default::default()),
                            ..Default::default()
                        })
                },
                "no rule for",
            ),
            (
                |p| p.spec.as_mut().unwrap().service_account_name = Some("admin".into()),
                "ServiceAccount",
            ),
        ];
        for (edit, needle) in edits {
            let mut pod = base.clone();
            edit(&mut pod);
            let errs = check_pod(&pod, &p);
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
    }

    #[test]
    fn flags_parse_from_the_command_line_and_env_lists() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            p: PodPolicyArgs,
        }
        let c = Cli::try_parse_from([
            "x",
            "--allow-host-path-prefix=/data",
            "--allow-host-path-prefix=/models,/scratch",
            "--allowed-prometheus-url-prefix",
            "https://prom:9090",
            "--allow-env-secret-refs",
            "--allow-ipc-lock",
            "--allow-rdma-resources",
        ])
        .unwrap();
        let p = PodPolicy::from_args(&c.p).unwrap();
        assert_eq!(p.host_path_prefixes, ["/data", "/models", "/scratch"]);
        assert!(p.allow_env_secret_refs && p.allow_ipc_lock && p.allow_rdma_resources);
        assert_eq!(
            p.prometheus_url_prefixes[0].to_string(),
            "https://prom:9090"
        );
        let d = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(PodPolicy::from_args(&d.p).unwrap(), PodPolicy::default());
    }
}
