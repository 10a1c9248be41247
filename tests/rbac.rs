//! Least privilege of the chart's RBAC, held to what the operator really does: the API usage that
//! the end-to-end tests read from kube-apiserver's audit log (tests/common/audit.rs checks every
//! plane's log against `tests/fixtures/operator-api-usage.json`, and refuses any request the chart
//! did not grant). Here the chart, as `helm template` renders it, must grant exactly that usage:
//! nothing the operator never asks for, everything it does ask for, cluster-wide only what it asks
//! for across namespaces, and Secrets never listed, watched or deleted.

mod common;

use std::collections::BTreeSet;

use common::audit::{read_fixture, ApiUse};
use serde_json::Value;

/// Grants that no request of the operator's shows in an audit log, each with why it is needed.
const AUTHORIZATION_ONLY: &[(&str, &str, &str, &str, &str)] = &[(
    "update",
    "moe.craft.dev",
    "moedeployments",
    "finalizers",
    "the OwnerReferencesPermissionEnforcement admission plugin asks the authorizer whether the \
     creator of an object with blockOwnerDeletion may update its owner's finalizers; no request \
     is made (e2e/cluster.sh enables the plugin, so a missing grant fails every create)",
)];

/// One granted (verb, group, resource, subresource) of a rendered Role or ClusterRole.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    verb: String,
    group: String,
    resource: String,
    subresource: String,
    cluster: bool,
    names: Vec<String>,
}

fn grants(docs: &[Value]) -> Vec<Grant> {
    let mut out = Vec::new();
    for d in docs {
        let cluster = match d["kind"].as_str() {
            Some("ClusterRole") => true,
            Some("Role") => false,
            _ => continue,
        };
        for rule in d["rules"].as_array().into_iter().flatten() {
            let list = |k: &str| -> Vec<String> {
                rule[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            let names = list("resourceNames");
            for g in list("apiGroups") {
                for r in list("resources") {
                    let (resource, sub) = r.split_once('/').unwrap_or((&r, ""));
                    for v in list("verbs") {
                        assert!(
                            v != "*" && r != "*" && g != "*",
                            "wildcard in {}: {rule}",
                            d["metadata"]["name"]
                        );
                        out.push(Grant {
                            verb: v,
                            group: g.clone(),
                            resource: resource.into(),
                            subresource: sub.into(),
                            cluster,
                            names: names.clone(),
                        });
                    }
                }
            }
        }
    }
    out
}

fn same(g: &Grant, u: &ApiUse) -> bool {
    g.verb == u.verb
        && g.group == u.group
        && g.resource == u.resource
        && g.subresource == u.subresource
}

fn authorization_only(g: &Grant) -> bool {
    AUTHORIZATION_ONLY.iter().any(|(v, gr, r, s, _)| {
        g.verb == *v && g.group == *gr && g.resource == *r && g.subresource == *s
    })
}

/// The chart grants exactly what the operator was seen using, in both RBAC layouts.
#[test]
fn chart_rbac_grants_exactly_what_the_audit_log_saw_the_operator_use() {
    let used = read_fixture();
    assert!(
        !used.is_empty(),
        "tests/fixtures/operator-api-usage.json is empty: record it (tests/common/audit.rs)"
    );
    for (layout, args) in [
        ("all namespaces (ClusterRole)", &[][..]),
        ("watchNamespace (Role)", &["--set", "watchNamespace=ml"][..]),
    ] {
        let granted = grants(&common::chart::render(args));
        // Nothing granted that the operator never used.
        let mut unused: BTreeSet<String> = BTreeSet::new();
        for g in &granted {
            if !authorization_only(g) && !used.iter().any(|u| same(g, u)) {
                unused.insert(format!(
                    "{} {}/{}{}{}",
                    g.verb,
                    if g.group.is_empty() { "core" } else { &g.group },
                    g.resource,
                    if g.subresource.is_empty() { "" } else { "/" },
                    g.subresource
                ));
            }
        }
        assert!(
            unused.is_empty(),
            "{layout}: the chart grants what no e2e test saw the operator use (drop it from \
             charts/moe-operator/templates/rbac.yaml, or record the use): {unused:#?}"
        );
        // Everything used is granted; across namespaces only by a ClusterRole. With
        // watchNamespace the operator lists and watches one namespace, so every use is namespaced.
        let role_layout = !args.is_empty();
        for u in &used {
            let covered = granted
                .iter()
                .any(|g| same(g, u) && (g.cluster || u.scope == "namespaced" || role_layout));
            assert!(
                covered,
                "{layout}: the operator uses {u}, which the chart does not grant"
            );
        }
        // Secrets: never listed, watched or deleted (the operator reads and applies its own
        // admin-token Secret by name); no verb on every Secret of the cluster but those.
        for g in granted.iter().filter(|g| g.resource == "secrets") {
            assert!(
                ["get", "create", "patch"].contains(&g.verb.as_str()),
                "{layout}: the chart grants {} on Secrets",
                g.verb
            );
        }
        // The Lease: only in its namespace, only by name where RBAC can name it.
        for g in granted.iter().filter(|g| g.resource == "leases") {
            assert!(!g.cluster, "{layout}: leases granted cluster-wide");
            if g.verb != "create" {
                assert_eq!(
                    g.names,
                    ["moe-operator"],
                    "{layout}: {} on any Lease",
                    g.verb
                );
            }
        }
    }
    // The reasons above stay true: each authorization-only grant is in the chart.
    let granted = grants(&common::chart::render(&[]));
    for a in AUTHORIZATION_ONLY {
        assert!(
            granted
                .iter()
                .any(|g| authorization_only(g) && g.verb == a.0),
            "{a:?} is no longer granted: remove it from AUTHORIZATION_ONLY"
        );
    }
}

/// The audit reader sees what it should in a log line as kube-apiserver writes it.
#[test]
fn audit_lines_become_uses_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let line = |user: &str, verb: &str, ns: Option<&str>, sub: Option<&str>, code: u16| {
        serde_json::json!({
            "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata",
            "stage": "ResponseComplete", "requestURI": "/x", "verb": verb,
            "user": {"username": user},
            "objectRef": {"resource": "pods", "namespace": ns, "apiVersion": "v1",
                          "subresource": sub},
            "responseStatus": {"code": code}
        })
        .to_string()
    };
    let me = "system:serviceaccount:moe-system:moe-operator";
    std::fs::write(
        &log,
        [
            line(me, "list", None, None, 200),
            line(me, "get", Some("ml"), None, 200),
            line(me, "get", Some("ml"), None, 200),
            line(me, "delete", Some("ml"), Some("eviction"), 403),
            line(me, "patch", Some("ml"), None, 201),
            line(me, "patch", Some("ml"), None, 200),
            line("system:serviceaccount:moe-system:other", "create", Some("ml"), None, 201),
            r#"{"verb":"get","user":{"username":"system:serviceaccount:moe-system:moe-operator"},"requestURI":"/version"}"#.into(),
        ]
        .join("\n"),
    )
    .unwrap();
    let (uses, denied) = common::audit::uses_of(&log, me);
    let shown: Vec<String> = uses.iter().map(|u| u.to_string()).collect();
    assert_eq!(
        shown,
        [
            "create core/pods (namespaced)",
            "delete core/pods/eviction (namespaced)",
            "get core/pods (namespaced)",
            "list core/pods (cluster)",
            "patch core/pods (namespaced)"
        ]
    );
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(denied[0].contains("delete core/pods/eviction"));
}
