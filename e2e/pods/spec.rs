//! Pure parts of the process-backed pod launcher: which pods to run, and how a container's command,
//! env and mount paths map onto a local process. No I/O here, so all of it is unit-tested.

use k8s_openapi::api::core::v1::{KeyToPath, ObjectFieldSelector, Pod};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The label a pod carries to opt in to getting a real local process.
pub const OPT_IN_LABEL: &str = "moe.craft.dev/process-backed";

/// Directory name of a pod's files under the pods dir: `<namespace>_<name>` (neither may contain `_`
/// ambiguity issues: names are DNS labels/subdomains, which have no `_`).
pub fn pod_dir_name(namespace: &str, name: &str) -> String {
    format!("{namespace}_{name}")
}

/// Why a pod should (not) have a running process right now.
#[derive(Debug, PartialEq, Eq)]
pub enum Want {
    /// Run it, bound to this IP.
    Run { pod_ip: String },
    /// Not (or no longer) wanted; the reason is logged.
    Stop(&'static str),
    /// Not yet: the pod has no node or IP yet.
    Wait(&'static str),
}

/// What the launcher should do about `pod`.
pub fn want(pod: &Pod) -> Want {
    let opted_in = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(OPT_IN_LABEL))
        .is_some_and(|v| v == "true");
    if !opted_in {
        return Want::Stop("pod does not carry the opt-in label");
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Want::Stop("pod is terminating");
    }
    let status = pod.status.as_ref();
    if let Some(phase) = status.and_then(|s| s.phase.as_deref()) {
        if phase == "Succeeded" || phase == "Failed" {
            return Want::Stop("pod has finished");
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
    match status.and_then(|s| s.pod_ip.as_ref()) {
        Some(ip) if !ip.is_empty() => Want::Run { pod_ip: ip.clone() },
        _ => Want::Wait("pod has no IP yet"),
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
    fn want_follows_label_node_ip_and_deletion() {
        assert_eq!(
            want(&pod(Some("true"), Some("n"), Some("127.9.0.3"))),
            Want::Run {
                pod_ip: "127.9.0.3".into()
            }
        );
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
        assert!(matches!(
            want(&pod(Some("true"), Some("n"), None)),
            Want::Wait(_)
        ));
        let mut p = pod(Some("true"), Some("n"), Some("127.9.0.3"));
        p.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(want(&p), Want::Stop("pod is terminating"));
        let mut p = pod(Some("true"), Some("n"), Some("127.9.0.3"));
        p.status.as_mut().unwrap().phase = Some("Failed".into());
        assert_eq!(want(&p), Want::Stop("pod has finished"));
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
}
