//! What the operator's ServiceAccount did, read from the local control plane's audit log
//! (e2e/cluster.sh logs every request of the `moe-system` ServiceAccounts to `logs/audit.log`):
//! each distinct (verb, API group, resource, subresource, scope), and the requests it was denied.
//! The e2e harness checks every plane's record against `tests/fixtures/operator-api-usage.json`,
//! the operator's known API usage, which tests/rbac.rs checks the chart's RBAC against.
#![allow(dead_code)] // each test binary uses its own part of the harness

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One kind of request: `scope` is `namespaced` (the request names a namespace) or `cluster`
/// (list/watch across all namespaces, or a cluster-scoped resource).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ApiUse {
    pub verb: String,
    pub group: String,
    pub resource: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subresource: String,
    pub scope: String,
}

impl std::fmt::Display for ApiUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        let sub = if self.subresource.is_empty() {
            String::new()
        } else {
            format!("/{}", self.subresource)
        };
        write!(
            f,
            "{} {group}/{}{sub} ({})",
            self.verb, self.resource, self.scope
        )
    }
}

/// What `username` did according to the JSON-lines audit log `path`: the distinct requests (and
/// the `create` a creating server-side apply is authorized as), and a line for each one the API
/// server refused with 403.
pub fn uses_of(path: &Path, username: &str) -> (BTreeSet<ApiUse>, Vec<String>) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading the audit log {}: {e}", path.display()));
    let mut uses = BTreeSet::new();
    let mut denied = Vec::new();
    for line in text.lines() {
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if ev["user"]["username"] != username {
            continue;
        }
        let o = &ev["objectRef"];
        let Some(resource) = o["resource"].as_str() else {
            // Non-resource URLs (discovery, /version): every authenticated user may.
            continue;
        };
        let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let u = ApiUse {
            verb: s(&ev["verb"]),
            group: s(&o["apiGroup"]),
            resource: resource.to_string(),
            subresource: s(&o["subresource"]),
            scope: if o["namespace"].as_str().is_some_and(|n| !n.is_empty()) {
                "namespaced".into()
            } else {
                "cluster".into()
            },
        };
        let code = &ev["responseStatus"]["code"];
        if code == 403 {
            denied.push(format!("{u}: {}", s(&ev["requestURI"])));
        }
        // A server-side apply (a PATCH) that creates the object answers 201; the API server
        // authorized it as `create` as well (the patch handler's create check), so the operator
        // needs that verb though no request of its says it.
        if u.verb == "patch" && code == 201 {
            uses.insert(ApiUse {
                verb: "create".into(),
                ..u.clone()
            });
        }
        uses.insert(u);
    }
    (uses, denied)
}

/// The committed record of what the operator uses.
pub fn fixture_path() -> PathBuf {
    super::repo().join("tests/fixtures/operator-api-usage.json")
}

pub fn read_fixture() -> BTreeSet<ApiUse> {
    let path = fixture_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Checks a plane's audit log: the operator was refused nothing (the chart grants what it uses),
/// and used nothing the fixture does not list. With `MOE_E2E_RECORD_API_USAGE=1` the uses are
/// merged into the fixture instead of checked against it (then review the diff, and the chart's
/// RBAC with tests/rbac.rs). Returns the problems found, empty when none.
pub fn check_plane(audit_log: &Path, username: &str) -> Vec<String> {
    if !audit_log.exists() {
        return vec![format!(
            "no audit log at {} (e2e/cluster.sh writes it unless MOE_E2E_AUDIT_GROUPS is empty)",
            audit_log.display()
        )];
    }
    let (uses, denied) = uses_of(audit_log, username);
    let mut problems: Vec<String> = denied
        .into_iter()
        .map(|d| format!("the chart's RBAC refused the operator: {d}"))
        .collect();
    if std::env::var_os("MOE_E2E_RECORD_API_USAGE").is_some_and(|v| v == "1") {
        // Tests of one binary run in parallel: one writer at a time (mkdir is atomic).
        let lock = fixture_path().with_extension("lock");
        while std::fs::create_dir(&lock).is_err() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let mut all = read_fixture();
        all.extend(uses);
        let text = serde_json::to_string_pretty(&all).expect("usage serialises");
        let written = std::fs::write(fixture_path(), text + "\n");
        let _ = std::fs::remove_dir(&lock);
        written.expect("writing the API usage fixture");
        return problems;
    }
    let known = read_fixture();
    for u in uses.difference(&known) {
        problems.push(format!(
            "the operator used {u}, which tests/fixtures/operator-api-usage.json does not list: \
             add it (MOE_E2E_RECORD_API_USAGE=1 merges what a run saw) and grant it in \
             charts/moe-operator/templates/rbac.yaml"
        ));
    }
    problems
}
