//! A CRD upgrade on the local control plane, the documented way (docs/upgrades.md): Helm installs
//! a chart's `crds/` on first install only and never upgrades them, so the CRD is brought up to
//! date with a server-side apply of the chart's `crds/` before `helm upgrade`.
//!
//! The chart is installed as an earlier release shipped it (its `crds/` holding the CRD of commit
//! 9f3a279, tests/fixtures/crd-upgrade/), MoEDeployments are created under that CRD as a client of
//! then wrote them, and the chart is upgraded to this one: Helm leaves the old CRD. Then the
//! documented command applies the new CRD, and the old objects must still validate (a no-op update
//! passes; a dry-run create of the same spec, which CRD validation ratcheting cannot excuse,
//! passes), read back with the new fields' defaults, and reconcile under this operator, a spec
//! change included. One old object the new CRD refuses (its admin port is the new
//! `spec.dataPlane.port`'s default): its no-op update still passes (validation ratcheting), the
//! operator holds it back with `Degraded`/`InvalidSpec` naming the field, and it runs once fixed.
//!
//! Needs the binaries of `e2e/build.sh`; fails (does not skip) without them.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::operator::{condition, deployment, tool, wait_for, OperatorPlane, OP_NS, RELEASE};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use moe_operator::api::MoEDeployment;
use serde_json::{json, Value};

mod common;

const NS: &str = "ml";
const CRD: &str = "moedeployments.moe.craft.dev";
const PREVIOUS_CRD: &str = "tests/fixtures/crd-upgrade/moedeployments.moe.craft.dev.9f3a279.yaml";
/// The upgrade step of docs/upgrades.md (and the chart's NOTES on upgrade), run from the
/// repository's root. `--force-conflicts`: Helm created the CRD, so its fields belong to the
/// field manager `helm`; without it the apply stops at a conflict on every field that changed.
const APPLY_CRDS: &str =
    "kubectl apply --server-side --force-conflicts -f charts/moe-operator/crds/";
/// Fields of `spec` the new CRD has and the previous one lacks (with defaults: `dataPlane`).
const NEW_FIELDS: [&str; 4] = ["dataPlane", "engine", "scheduling", "suspend"];

/// The property names of the served CRD's `spec`.
async fn spec_fields(admin: &Client) -> BTreeSet<String> {
    let crd = Api::<CustomResourceDefinition>::all(admin.clone())
        .get(CRD)
        .await
        .unwrap();
    let v = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
    v["openAPIV3Schema"]["properties"]["spec"]["properties"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// Two MoEDeployments as a client of the previous CRD wrote them: the e2e tests' tiny model, one
/// with the fields the previous CRD defaulted left out, one setting more of them.
fn previous_objects(ckpt: &Path) -> Vec<Value> {
    let mut alpha = deployment("alpha", NS, ckpt, 1, 2, false);
    let spec = alpha["spec"].as_object_mut().unwrap();
    spec.remove("rollout");
    spec["metrics"] = json!({"interval": "2s"});
    let mut beta = deployment("beta", NS, ckpt, 1, 2, false);
    beta["spec"]["worker"]["env"] = json!([{"name": "RUST_LOG", "value": "info"}]);
    beta["spec"]["worker"]["tolerations"] =
        json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]);
    beta["spec"]["worker"]["ports"] = json!({"dispatch": 9500, "metrics": 9501, "admin": 9502});
    vec![alpha, beta]
}

/// Valid under the previous CRD, refused by the new one: its admin port is the port the new
/// `spec.dataPlane.port` defaults to (docs/upgrades.md, "What an upgrade keeps").
fn clashing_object(ckpt: &Path) -> Value {
    let mut gamma = deployment("gamma", NS, ckpt, 1, 2, false);
    gamma["spec"]["worker"]["ports"] = json!({"dispatch": 9400, "metrics": 9401, "admin": 9403});
    gamma
}

/// Waits until `name`'s status says it reconciled its current generation, with a plan and every
/// worker Ready; returns the generation.
async fn reconciled(admin: &Client, name: &str, timeout: Duration) -> i64 {
    let mds: Api<MoEDeployment> = Api::namespaced(admin.clone(), NS);
    wait_for(
        &format!("MoEDeployment {name} reconciled"),
        timeout,
        || async {
            let md = mds.get(name).await.map_err(|e| e.to_string())?;
            let g = md.metadata.generation.unwrap_or(0);
            let st = md.status.clone().unwrap_or_default();
            let workers = st.workers.as_ref().map(|w| (w.ready, w.desired));
            match (st.observed_generation, &st.plan, workers) {
                (Some(o), Some(_), Some((r, d))) if o == g && r == d && d > 0 => Ok(g),
                _ => Err(format!(
                    "generation {g}, observed {:?}, plan {}, workers (ready, desired) {workers:?}, \
                     conditions {:?}",
                    st.observed_generation,
                    st.plan.is_some(),
                    st.conditions
                        .iter()
                        .map(|c| format!("{}={} {}", c.type_, c.status, c.reason))
                        .collect::<Vec<_>>()
                )),
            }
        },
    )
    .await
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

#[test]
fn the_docs_and_the_chart_give_the_tested_command() {
    for f in [
        "docs/upgrades.md",
        "charts/moe-operator/templates/NOTES.txt",
    ] {
        let text = std::fs::read_to_string(common::repo().join(f)).unwrap();
        assert!(
            text.contains(APPLY_CRDS),
            "{f} does not give `{APPLY_CRDS}`"
        );
    }
    let readme = std::fs::read_to_string(common::repo().join("README.md")).unwrap();
    assert!(
        readme.contains(APPLY_CRDS) && readme.contains("docs/upgrades.md"),
        "README.md's upgrade step is not `{APPLY_CRDS}` with a link to docs/upgrades.md"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moedeployments_of_the_previous_crd_validate_and_reconcile_after_the_upgrade() {
    let t0 = Instant::now();
    let repo = common::repo();
    // The chart as the previous release shipped it, as far as the CRD goes.
    let old = tempfile::tempdir().unwrap();
    let old_chart = old.path().join("moe-operator");
    copy_dir(&repo.join("charts/moe-operator"), &old_chart);
    std::fs::copy(
        repo.join(PREVIOUS_CRD),
        old_chart.join("crds/moedeployments.moe.craft.dev.yaml"),
    )
    .unwrap();
    let mut plane = OperatorPlane::up_from_chart("moe-e2e-crd-upgrade-", 2, NS, &old_chart).await;
    let admin = plane.admin.clone();
    let fields = spec_fields(&admin).await;
    for f in NEW_FIELDS {
        assert!(!fields.contains(f), "the previous CRD already has spec.{f}");
    }

    // MoEDeployments written under the previous CRD, before this operator ever ran.
    let ckpt = plane.checkpoint();
    let objects = previous_objects(&ckpt);
    let gamma = clashing_object(&ckpt);
    for o in objects.iter().chain([&gamma]) {
        let file = plane
            .state
            .join(format!("{}.json", o["metadata"]["name"].as_str().unwrap()));
        std::fs::write(&file, o.to_string()).unwrap();
        tool(
            &plane.bin,
            "kubectl",
            &["create", "-f", file.to_str().unwrap()],
            &plane.admin_kc,
        );
    }
    let ar = ApiResource::erase::<MoEDeployment>(&());
    let raw: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &ar);
    let stored = raw.get("alpha").await.unwrap();
    assert!(
        stored.data["spec"].get("dataPlane").is_none(),
        "{}",
        stored.data
    );

    // `helm upgrade` to this chart leaves the CRD as it was.
    let chart = repo.join("charts/moe-operator");
    tool(
        &plane.bin,
        "helm",
        &[
            "upgrade",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            OP_NS,
            "--reuse-values",
        ],
        &plane.admin_kc,
    );
    let fields = spec_fields(&admin).await;
    assert!(
        !fields.contains("dataPlane"),
        "helm upgrade changed the CRD: {fields:?}"
    );

    // The documented step, as written.
    let args: Vec<&str> = APPLY_CRDS.split_whitespace().skip(1).collect();
    let out = std::process::Command::new(plane.bin.join("kubectl"))
        .args(&args)
        .current_dir(&repo)
        .env("KUBECONFIG", &plane.admin_kc)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{APPLY_CRDS}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    tool(
        &plane.bin,
        "kubectl",
        &[
            "wait",
            "--for=condition=Established",
            &format!("crd/{CRD}"),
            "--timeout=30s",
        ],
        &plane.admin_kc,
    );
    // The served schema is the chart's.
    let want: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart.join("crds/moedeployments.moe.craft.dev.yaml")).unwrap(),
    )
    .unwrap();
    let served = Api::<CustomResourceDefinition>::all(admin.clone())
        .get(CRD)
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&served.spec.versions[0].schema).unwrap()["openAPIV3Schema"],
        want["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
        "the served CRD schema is not charts/moe-operator/crds/'s"
    );
    let fields = spec_fields(&admin).await;
    for f in NEW_FIELDS {
        assert!(fields.contains(f), "spec.{f} missing after the upgrade");
    }

    // The old objects: read with the new defaults, a no-op update passes, and the same spec
    // passes a full validation as a new object would (dry-run create).
    for o in &objects {
        let name = o["metadata"]["name"].as_str().unwrap();
        let obj = raw.get(name).await.unwrap();
        assert_eq!(
            obj.data["spec"]["dataPlane"]["port"], 9403,
            "{name}: spec.dataPlane's default is not applied on read: {}",
            obj.data
        );
        let rv = obj.metadata.resource_version.clone();
        let updated = raw
            .replace(name, &PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("{name}: a no-op update under the new CRD: {e}"));
        eprintln!(
            "{name}: no-op update accepted (resourceVersion {rv:?} -> {:?})",
            updated.metadata.resource_version
        );
        let mut copy = DynamicObject::new(&format!("{name}-copy"), &ar).within(NS);
        copy.data = json!({"spec": obj.data["spec"].clone()});
        raw.create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &copy,
        )
        .await
        .unwrap_or_else(|e| panic!("{name}'s spec as a new object under the new CRD: {e}"));
        // The typed client of this operator reads it.
        Api::<MoEDeployment>::namespaced(admin.clone(), NS)
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("{name} does not deserialise as this MoEDeployment: {e}"));
    }

    // The object the new default clashes with: its no-op update passes (ratcheting: nothing
    // changed), the same spec as a new object is refused with the CRD's message.
    let obj = raw.get("gamma").await.unwrap();
    raw.replace("gamma", &PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("gamma: a no-op update under the new CRD: {e}"));
    let mut copy = DynamicObject::new("gamma-copy", &ar).within(NS);
    copy.data = json!({"spec": obj.data["spec"].clone()});
    let refused = raw
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &copy,
        )
        .await
        .expect_err("gamma's spec as a new object");
    assert!(
        refused
            .to_string()
            .contains("dataPlane.port must differ from worker.ports"),
        "{refused}"
    );

    // This operator reconciles them, and a later spec change.
    plane.start_operator("op-0");
    for o in &objects {
        reconciled(
            &admin,
            o["metadata"]["name"].as_str().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    }
    let mds: Api<MoEDeployment> = Api::namespaced(admin.clone(), NS);
    let g = mds.get("beta").await.unwrap().metadata.generation.unwrap();
    mds.patch(
        "beta",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"metrics": {"interval": "3s"}}})),
    )
    .await
    .unwrap();
    assert_eq!(
        reconciled(&admin, "beta", Duration::from_secs(30)).await,
        g + 1
    );

    // gamma is held back with the field and the fix named, then runs once the port moves.
    wait_for(
        "gamma Degraded: InvalidSpec",
        Duration::from_secs(30),
        || async {
            let md = mds.get("gamma").await.map_err(|e| e.to_string())?;
            match condition(&md, "Degraded") {
                Some((s, r, m))
                    if s == "True" && r == "InvalidSpec" && m.contains("spec.dataPlane.port") =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(plane.worker_pods("gamma").await.unwrap().is_empty());
    mds.patch(
        "gamma",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"dataPlane": {"port": 9503}}})),
    )
    .await
    .unwrap();
    reconciled(&admin, "gamma", Duration::from_secs(60)).await;
    eprintln!("CRD upgrade test took {:?}", t0.elapsed());
}
