//! Pod shaping: what of the worker pods a spec may add to (`spec.worker` affinity, topology
//! spread, imagePullSecrets, pod labels and annotations, volumes and mounts, securityContext,
//! schedulerName, runtimeClassName) and what stays the operator's.
//!
//! The generated pod is what the user wrote plus what the operator owns; the two never overlap.
//! This module is the one home of what the operator owns in a worker pod (label and annotation
//! keys, volume names, mount paths) and of the checks that refuse a spec reaching for them, by
//! field and with the fix. `controller::build` builds from these names; whether a shaped field is
//! *allowed* in this cluster (hostPath, Secret volumes, capabilities) is `pod_policy`'s.

use std::collections::BTreeSet;

use super::moedeployment::MoEDeploymentSpec;
use super::pod_policy::is_dns_subdomain;
use super::validate::FieldError;

/// The operator's label and annotation domain: every `moe.craft.dev/` key on a worker pod is ours.
pub const OWNED_KEY_PREFIX: &str = "moe.craft.dev/";
/// The `app.kubernetes.io/` labels the operator sets on every object it owns.
pub const OWNED_APP_LABELS: &[&str] = &[
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
];

/// Kueue's pod-group label: the group's name (`scheduling.gang: Kueue`).
pub const KUEUE_POD_GROUP_NAME: &str = "kueue.x-k8s.io/pod-group-name";
/// Kueue's pod-group annotation: how many pods the group has.
pub const KUEUE_POD_GROUP_TOTAL_COUNT: &str = "kueue.x-k8s.io/pod-group-total-count";
/// Kueue's queue label (`scheduling.queueName`).
pub const KUEUE_QUEUE_NAME: &str = "kueue.x-k8s.io/queue-name";
/// scheduler-plugins' coscheduling label naming a pod's PodGroup (`scheduling.gang: PodGroup`).
pub const POD_GROUP_LABEL: &str = "scheduling.x-k8s.io/pod-group";
/// The gang schedulers' keys: the operator sets them from `spec.scheduling`, never the user.
pub const GANG_KEYS: &[&str] = &[
    KUEUE_POD_GROUP_NAME,
    KUEUE_POD_GROUP_TOTAL_COUNT,
    KUEUE_QUEUE_NAME,
    POD_GROUP_LABEL,
];

/// The operator's volumes of a worker pod.
pub const VOLUME_PLAN: &str = "plan";
pub const VOLUME_ADMIN_TOKEN: &str = "admin-token";
pub const VOLUME_SHM: &str = "shm";
pub const VOLUME_CHECKPOINT: &str = "checkpoint";
/// `model.checkpoint.s3.credentialsSecret`, mounted into the fetch-weights init container only.
pub const VOLUME_S3_CREDENTIALS: &str = "s3-credentials";
pub const OWNED_VOLUMES: &[&str] = &[
    VOLUME_PLAN,
    VOLUME_ADMIN_TOKEN,
    VOLUME_SHM,
    VOLUME_CHECKPOINT,
    VOLUME_S3_CREDENTIALS,
];
/// Where the fetch-weights init container reads the S3 credentials Secret's keys.
pub const S3_CREDENTIALS_DIR: &str = "/etc/moe/s3";
/// The init container that fetches an S3 checkpoint (`model.checkpoint.s3`).
pub const FETCH_CONTAINER: &str = "fetch-weights";

/// Where the plan ConfigMap is mounted.
pub const PLAN_DIR: &str = "/etc/moe/plan";
/// Where the admin token Secret is mounted.
pub const ADMIN_DIR: &str = "/etc/moe/admin";
/// Where the memory-backed shared memory volume (`dataPlane.shmSize`) is mounted.
pub const SHM_DIR: &str = "/dev/shm";

/// Capabilities a spec may always add: the restricted Pod Security Standard's one.
pub const SAFE_CAPABILITIES: &[&str] = &["NET_BIND_SERVICE"];

/// Whether the operator owns label or annotation `key` on a worker pod.
pub fn owned_key(key: &str) -> bool {
    key.starts_with(OWNED_KEY_PREFIX) || OWNED_APP_LABELS.contains(&key) || GANG_KEYS.contains(&key)
}

/// The mount paths the operator uses in the worker container, with the field that owns each.
pub fn owned_mount_paths(spec: &MoEDeploymentSpec) -> Vec<(String, &'static str)> {
    let mut v = vec![
        (PLAN_DIR.to_string(), "the plan ConfigMap"),
        (ADMIN_DIR.to_string(), "the admin token"),
        (
            SHM_DIR.to_string(),
            "the memory-backed /dev/shm: size it with dataPlane.shmSize",
        ),
    ];
    // Even without a checkpoint volume: the checkpoint's one home is model.checkpoint.
    v.push((
        normalise(&spec.model.checkpoint.path),
        "the checkpoint (model.checkpoint.path): mount it with model.checkpoint.volume",
    ));
    v
}

/// `/a/b` without empty or trailing components (the path as a mount compares).
fn normalise(p: &str) -> String {
    let s: String = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(|c| format!("/{c}"))
        .collect();
    if s.is_empty() {
        "/".into()
    } else {
        s
    }
}

/// Whether normalised `path` is `base` or under it.
fn at_or_under(path: &str, base: &str) -> bool {
    path == base
        || base == "/"
        || path
            .strip_prefix(base)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A Kubernetes qualified name (`prefix/name` or `name`), as label and annotation keys are.
fn qualified_name_problem(key: &str) -> Option<&'static str> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if !is_dns_subdomain(p) {
            return Some("its prefix (before '/') must be a DNS subdomain such as example.com");
        }
    }
    if name.is_empty() || name.len() > 63 {
        return Some("its name (after any '/') must be 1 to 63 characters");
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    (!ok).then_some(
        "its name must be alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric",
    )
}

fn is_label_value(v: &str) -> bool {
    v.is_empty() || (v.len() <= 63 && qualified_name_problem(v).is_none() && !v.contains('/'))
}

/// Check `spec.worker`'s pod shaping for conflicts with what the operator owns and for what the
/// apiserver would refuse when the pod is created (so the author hears it on the MoEDeployment,
/// by field, not as a failed pod). Called by `validate`.
pub fn check_pod_shape(spec: &MoEDeploymentSpec) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut err = |path: String, message: String| errs.push(FieldError { path, message });
    let w = &spec.worker;

    for (kind, map) in [
        ("podLabels", &w.pod_labels),
        ("podAnnotations", &w.pod_annotations),
    ] {
        for (k, v) in map {
            let path = format!("spec.worker.{kind}[{k:?}]");
            if owned_key(k) {
                let fix = if GANG_KEYS.contains(&k.as_str()) {
                    "set spec.scheduling instead, the operator writes it from there"
                } else {
                    "remove it or use a key of your own domain"
                };
                err(
                    path,
                    format!("{k} is set by the operator on every worker pod: {fix}"),
                );
            } else if let Some(problem) = qualified_name_problem(k) {
                err(path, format!("{k:?} is not a valid key: {problem}"));
            } else if kind == "podLabels" && !is_label_value(v) {
                err(
                    path,
                    format!("{v:?} is not a valid label value: at most 63 alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"),
                );
            }
        }
    }
    let annotation_bytes: usize = w
        .pod_annotations
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if annotation_bytes > 128 * 1024 {
        err(
            "spec.worker.podAnnotations".into(),
            format!("{annotation_bytes} bytes in all; keep them under 128 KiB (the apiserver refuses a pod's annotations over 256 KiB, and the operator adds its own)"),
        );
    }

    for (i, s) in w.image_pull_secrets.iter().enumerate() {
        if !is_dns_subdomain(&s.name) {
            err(
                format!("spec.worker.imagePullSecrets[{i}].name"),
                format!(
                    "{:?} is not a Secret name (a lowercase DNS subdomain)",
                    s.name
                ),
            );
        }
    }
    for (field, v) in [
        ("schedulerName", &w.scheduler_name),
        ("runtimeClassName", &w.runtime_class_name),
    ] {
        if let Some(v) = v {
            if !is_dns_subdomain(v) {
                err(
                    format!("spec.worker.{field}"),
                    format!("{v:?} is not a valid name (a lowercase DNS subdomain)"),
                );
            }
        }
    }

    let mut names = BTreeSet::new();
    for (i, v) in w.volumes.iter().enumerate() {
        let path = format!("spec.worker.volumes[{i}].name");
        if OWNED_VOLUMES.contains(&v.name.as_str()) {
            err(
                path,
                format!(
                    "{} is one of the operator's volumes ({}): choose another name",
                    v.name,
                    OWNED_VOLUMES.join(", ")
                ),
            );
        } else if !names.insert(v.name.as_str()) {
            err(
                path,
                format!("{} is named twice: volume names must be unique", v.name),
            );
        }
        let sources = [
            v.config_map.is_some(),
            v.secret.is_some(),
            v.persistent_volume_claim.is_some(),
            v.empty_dir.is_some(),
            v.host_path.is_some(),
        ]
        .into_iter()
        .filter(|s| *s)
        .count();
        if sources != 1 {
            err(
                format!("spec.worker.volumes[{i}]"),
                format!("{} has {sources} sources: give exactly one of configMap, secret, persistentVolumeClaim, emptyDir or hostPath", v.name),
            );
        }
    }

    let owned_paths = owned_mount_paths(spec);
    let mut paths = BTreeSet::new();
    for (i, m) in w.volume_mounts.iter().enumerate() {
        if OWNED_VOLUMES.contains(&m.name.as_str()) {
            err(
                format!("spec.worker.volumeMounts[{i}].name"),
                format!("{} is the operator's volume, mounted by the operator: mount a volume of spec.worker.volumes", m.name),
            );
        } else if !names.contains(m.name.as_str()) {
            err(
                format!("spec.worker.volumeMounts[{i}].name"),
                format!(
                    "{} names no volume of spec.worker.volumes: add it there, or fix the name",
                    m.name
                ),
            );
        }
        let mp = normalise(&m.mount_path);
        if !m.mount_path.starts_with('/') || m.mount_path.split('/').any(|c| c == "..") {
            err(
                format!("spec.worker.volumeMounts[{i}].mountPath"),
                format!("{:?} must be an absolute path without '..'", m.mount_path),
            );
        } else if let Some((p, what)) = owned_paths.iter().find(|(p, _)| at_or_under(&mp, p)) {
            err(
                format!("spec.worker.volumeMounts[{i}].mountPath"),
                format!(
                    "{} is at or under {p}, where the operator mounts {what}: choose another path",
                    m.mount_path
                ),
            );
        } else if !paths.insert(mp.clone()) {
            err(
                format!("spec.worker.volumeMounts[{i}].mountPath"),
                format!(
                    "{} is mounted twice: mount paths must be unique",
                    m.mount_path
                ),
            );
        }
        if let Some(sp) = &m.sub_path {
            if sp.starts_with('/') || sp.split('/').any(|c| c == "..") {
                err(
                    format!("spec.worker.volumeMounts[{i}].subPath"),
                    format!("{sp:?} must be a relative path without '..'"),
                );
            }
        }
    }

    if let Some(sc) = &w.security_context {
        if sc.run_as_user == Some(0) {
            err(
                "spec.worker.securityContext.runAsUser".into(),
                "0 is root, and the worker pods run as non-root: choose another UID".into(),
            );
        }
        let mut seen = BTreeSet::new();
        for (i, c) in sc
            .capabilities
            .iter()
            .flat_map(|c| c.add.iter())
            .enumerate()
        {
            let path = format!("spec.worker.securityContext.capabilities.add[{i}]");
            let name = c.strip_prefix("CAP_").unwrap_or(c);
            if name == super::pod_policy::IPC_LOCK {
                err(
                    path,
                    "IPC_LOCK is added by spec.dataPlane.ipcLock: set that instead".into(),
                );
            } else if name == "ALL" {
                err(
                    path,
                    "ALL would add every capability: name the ones the worker needs".into(),
                );
            } else if c.starts_with("CAP_") {
                err(
                    path,
                    format!("{c}: write it without the CAP_ prefix, as {name}"),
                );
            } else if !seen.insert(name) {
                err(path, format!("{c} is listed twice"));
            }
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::moedeployment::*;
    use k8s_openapi::api::core::v1::{EmptyDirVolumeSource, LocalObjectReference};

    fn spec() -> MoEDeploymentSpec {
        crate::api::validate::tests::demo_spec()
    }

    fn paths(s: &MoEDeploymentSpec) -> Vec<String> {
        check_pod_shape(s).into_iter().map(|e| e.path).collect()
    }

    fn one(s: &MoEDeploymentSpec, path: &str) -> String {
        let e = check_pod_shape(s);
        assert_eq!(e.len(), 1, "{e:#?}");
        assert_eq!(e[0].path, path, "{e:#?}");
        e[0].message.clone()
    }

    fn vol(name: &str) -> WorkerVolume {
        WorkerVolume {
            name: name.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        }
    }

    fn mount(name: &str, path: &str) -> WorkerVolumeMount {
        WorkerVolumeMount {
            name: name.into(),
            mount_path: path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_plain_shape_passes() {
        let mut s = spec();
        s.worker
            .pod_labels
            .insert("team".into(), "ml-serving".into());
        s.worker
            .pod_labels
            .insert("example.com/tier".into(), "gold".into());
        s.worker
            .pod_annotations
            .insert("example.com/owner".into(), "a b c / anything".into());
        s.worker.volumes.push(vol("scratch"));
        s.worker.volume_mounts.push(mount("scratch", "/scratch"));
        s.worker.image_pull_secrets.push(LocalObjectReference {
            name: "regcred".into(),
        });
        s.worker.scheduler_name = Some("scheduler-plugins-scheduler".into());
        s.worker.runtime_class_name = Some("nvidia".into());
        s.worker.security_context = Some(WorkerSecurityContext {
            capabilities: Some(WorkerCapabilities {
                add: vec!["NET_BIND_SERVICE".into()],
            }),
            run_as_user: Some(1000),
            ..Default::default()
        });
        assert_eq!(check_pod_shape(&s), vec![]);
    }

    #[test]
    fn labels_and_annotations_the_operator_owns_are_refused_by_key() {
        for key in [
            "moe.craft.dev/deployment",
            "moe.craft.dev/node-rank",
            "moe.craft.dev/anything",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
        ] {
            let mut s = spec();
            s.worker.pod_labels.insert(key.into(), "x".into());
            let m = one(&s, &format!("spec.worker.podLabels[{key:?}]"));
            assert!(
                m.contains("set by the operator") && m.contains("remove it"),
                "{m}"
            );
        }
        let mut s = spec();
        s.worker
            .pod_annotations
            .insert("moe.craft.dev/spec-hash".into(), "x".into());
        one(
            &s,
            "spec.worker.podAnnotations[\"moe.craft.dev/spec-hash\"]",
        );
        // The gang schedulers' keys point at spec.scheduling.
        let mut s = spec();
        s.worker
            .pod_labels
            .insert(POD_GROUP_LABEL.into(), "g".into());
        let m = one(&s, &format!("spec.worker.podLabels[{POD_GROUP_LABEL:?}]"));
        assert!(m.contains("spec.scheduling"), "{m}");
        // app.kubernetes.io/version is not ours.
        let mut s = spec();
        s.worker
            .pod_labels
            .insert("app.kubernetes.io/version".into(), "1.2".into());
        assert_eq!(check_pod_shape(&s), vec![]);
    }

    #[test]
    fn malformed_keys_and_label_values_are_refused() {
        let mut s = spec();
        s.worker.pod_labels.insert("Bad Key".into(), "x".into());
        s.worker.pod_labels.insert("ok".into(), "has space".into());
        s.worker
            .pod_annotations
            .insert("UPPER.example/x".into(), "v".into());
        assert_eq!(
            paths(&s),
            [
                "spec.worker.podLabels[\"Bad Key\"]",
                "spec.worker.podLabels[\"ok\"]",
                "spec.worker.podAnnotations[\"UPPER.example/x\"]"
            ]
        );
    }

    #[test]
    fn volumes_named_like_ours_or_twice_are_refused() {
        for name in OWNED_VOLUMES {
            let mut s = spec();
            s.worker.volumes.push(vol(name));
            let m = one(&s, "spec.worker.volumes[0].name");
            assert!(
                m.contains("operator's volumes") && m.contains("another name"),
                "{m}"
            );
        }
        let mut s = spec();
        s.worker.volumes.push(vol("a"));
        s.worker.volumes.push(vol("a"));
        one(&s, "spec.worker.volumes[1].name");
        let mut s = spec();
        s.worker.volumes.push(WorkerVolume {
            name: "none".into(),
            ..Default::default()
        });
        assert!(one(&s, "spec.worker.volumes[0]").contains("exactly one"));
    }

    #[test]
    fn mounts_of_our_paths_or_volumes_are_refused_naming_the_fix() {
        let mut s = spec();
        s.worker.volumes.push(vol("x"));
        // The demo's checkpoint has a volume, mounted at its path.
        let ckpt = s.model.checkpoint.path.clone();
        for (p, want) in [
            ("/dev/shm", "dataPlane.shmSize"),
            ("/dev/shm/sub", "dataPlane.shmSize"),
            ("/etc/moe/plan", "plan"),
            ("/etc/moe/admin/", "admin token"),
            (ckpt.as_str(), "model.checkpoint.path"),
        ] {
            let mut s = s.clone();
            s.worker.volume_mounts.push(mount("x", p));
            let m = one(&s, "spec.worker.volumeMounts[0].mountPath");
            assert!(
                m.contains(want) && m.contains("choose another path"),
                "{p}: {m}"
            );
        }
        // /etc/moe itself, above our mounts, is the user's to use.
        let mut ok = s.clone();
        ok.worker.volume_mounts.push(mount("x", "/etc/moe-extra"));
        assert_eq!(check_pod_shape(&ok), vec![]);
        // Our volume names cannot be mounted again; unknown names are named.
        let mut t = s.clone();
        t.worker.volume_mounts.push(mount("plan", "/p"));
        assert!(one(&t, "spec.worker.volumeMounts[0].name").contains("operator's volume"));
        let mut t = s.clone();
        t.worker.volume_mounts.push(mount("nope", "/p"));
        assert!(one(&t, "spec.worker.volumeMounts[0].name").contains("names no volume"));
        let mut t = s.clone();
        t.worker.volume_mounts.push(mount("x", "/p"));
        t.worker.volume_mounts.push(mount("x", "/p/"));
        assert!(one(&t, "spec.worker.volumeMounts[1].mountPath").contains("twice"));
        let mut t = s;
        let mut m = mount("x", "/p");
        m.sub_path = Some("../etc".into());
        t.worker.volume_mounts.push(m);
        one(&t, "spec.worker.volumeMounts[0].subPath");
    }

    #[test]
    fn capabilities_ipc_lock_all_and_root_are_refused() {
        let mut s = spec();
        s.worker.security_context = Some(WorkerSecurityContext {
            capabilities: Some(WorkerCapabilities {
                add: vec![
                    "IPC_LOCK".into(),
                    "ALL".into(),
                    "CAP_SYS_ADMIN".into(),
                    "NET_RAW".into(),
                    "NET_RAW".into(),
                ],
            }),
            run_as_user: Some(0),
            ..Default::default()
        });
        let e = check_pod_shape(&s);
        let m: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert_eq!(e.len(), 5, "{m:#?}");
        assert!(m[0].contains("runAsUser") && m[0].contains("root"));
        assert!(m[1].contains("add[0]") && m[1].contains("dataPlane.ipcLock"));
        assert!(m[2].contains("add[1]") && m[2].contains("every capability"));
        assert!(m[3].contains("add[2]") && m[3].contains("as SYS_ADMIN"));
        assert!(m[4].contains("add[4]") && m[4].contains("twice"));
    }

    #[test]
    fn names_must_be_dns_subdomains() {
        let mut s = spec();
        s.worker.scheduler_name = Some("My Scheduler".into());
        s.worker.runtime_class_name = Some("".into());
        s.worker
            .image_pull_secrets
            .push(LocalObjectReference { name: "".into() });
        assert_eq!(
            paths(&s),
            [
                "spec.worker.imagePullSecrets[0].name",
                "spec.worker.schedulerName",
                "spec.worker.runtimeClassName"
            ]
        );
    }
}
