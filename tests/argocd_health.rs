//! The Argo CD health check (charts/moe-operator/argocd/moe.craft.dev/MoEDeployment/health.lua)
//! run as Argo CD runs it: a Lua 5.1 state (Argo CD's gopher-lua speaks 5.1) with the object as the
//! global `obj`, the returned table's `status` and `message` read. Every fixture of
//! health_test.yaml must map to its expected health, every health the script can return must have
//! a fixture, every fixture file must be listed, and the fixtures' conditions must be types the
//! operator writes.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use mlua::{Lua, LuaSerdeExt, Table};
use serde_json::Value;

fn dir() -> PathBuf {
    common::repo().join("charts/moe-operator/argocd/moe.craft.dev/MoEDeployment")
}

/// Runs the health script on `obj`: (status, message).
fn health(script: &str, obj: &Value) -> (String, String) {
    let lua = Lua::new();
    let obj = lua.to_value(obj).expect("the object converts to Lua");
    lua.globals().set("obj", obj).unwrap();
    let hs: Table = lua
        .load(script)
        .set_name("health.lua")
        .eval()
        .unwrap_or_else(|e| panic!("health.lua failed: {e}"));
    (hs.get("status").unwrap(), hs.get("message").unwrap())
}

fn yaml(path: &std::path::Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

#[test]
fn every_fixture_maps_to_its_health_and_every_health_has_a_fixture() {
    let script = std::fs::read_to_string(dir().join("health.lua")).unwrap();
    let tests = yaml(&dir().join("health_test.yaml"));
    let mut covered = BTreeSet::new();
    let mut listed = BTreeSet::new();
    for t in tests["tests"].as_array().expect("tests: [...]") {
        let input = t["inputPath"].as_str().unwrap();
        listed.insert(input.to_string());
        let obj = yaml(&dir().join(input));
        let want = (
            t["healthStatus"]["status"].as_str().unwrap().to_string(),
            t["healthStatus"]["message"].as_str().unwrap().to_string(),
        );
        assert_eq!(health(&script, &obj), want, "{input}");
        covered.insert(want.0);
    }
    // Every status the script returns has a fixture (Argo CD's own: Healthy, Progressing,
    // Degraded, Suspended, Missing, Unknown).
    let returned: BTreeSet<String> = script
        .lines()
        .filter_map(|l| l.trim().strip_prefix("hs.status = \""))
        .map(|s| s.trim_end_matches('"').to_string())
        .collect();
    assert_eq!(
        returned,
        ["Degraded", "Healthy", "Progressing", "Suspended"]
            .map(String::from)
            .into(),
        "health.lua's statuses"
    );
    assert_eq!(covered, returned, "statuses without a fixture");
    // No fixture left out of health_test.yaml.
    let files: BTreeSet<String> = std::fs::read_dir(dir().join("testdata"))
        .unwrap()
        .map(|e| format!("testdata/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    assert_eq!(files, listed, "testdata/ against health_test.yaml");
}

/// The fixtures speak the operator's status: its condition types (and the two issue 14 adds for
/// gang scheduling and `spec.suspend`), each condition with a status, reason and message.
#[test]
fn fixtures_use_the_operators_condition_types() {
    use moe_operator::api::condition;
    let known: BTreeSet<&str> = [
        condition::READY,
        condition::PROGRESSING,
        condition::DEGRADED,
        condition::PLAN_READY,
        condition::METRICS_AVAILABLE,
        "Unschedulable",
        "Suspended",
    ]
    .into();
    for e in std::fs::read_dir(dir().join("testdata")).unwrap() {
        let path = e.unwrap().path();
        let obj = yaml(&path);
        assert_eq!(obj["kind"], "MoEDeployment", "{}", path.display());
        for c in obj["status"]["conditions"].as_array().into_iter().flatten() {
            let t = c["type"].as_str().unwrap();
            assert!(known.contains(t), "{}: condition type {t}", path.display());
            for k in ["status", "reason", "message"] {
                assert!(c[k].is_string(), "{}: {t} without {k}", path.display());
            }
        }
    }
}

/// A script error (here: no `obj`) fails loudly instead of passing for a health.
#[test]
fn the_harness_fails_on_a_broken_object() {
    let script = std::fs::read_to_string(dir().join("health.lua")).unwrap();
    let r = std::panic::catch_unwind(|| health(&script, &Value::Null));
    assert!(r.is_err());
}
