//! What the end-to-end tests share: the path of the repository, `e2e/cluster.sh` driven with a
//! test's own state directory, and a client from a kubeconfig.

pub mod audit;
pub mod chart;
pub mod operator;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A binary of this package, given as `env!("CARGO_BIN_EXE_<name>")`: the copy in
/// `$MOE_E2E_OWN_BIN` when that is set, else cargo's. Worktrees that share one target dir
/// overwrite each other's `target/debug/*`; a test run from copies keeps running the build it was
/// started with.
pub fn own_bin(cargo_path: &str) -> PathBuf {
    let cargo_path = Path::new(cargo_path);
    match std::env::var_os("MOE_E2E_OWN_BIN") {
        Some(dir) => {
            let p = PathBuf::from(dir).join(cargo_path.file_name().expect("a binary's file name"));
            assert!(p.exists(), "MOE_E2E_OWN_BIN has no {}", p.display());
            p
        }
        None => cargo_path.to_path_buf(),
    }
}

/// `e2e/cluster.sh <verb>` on the plane in `state` with `nodes` fake GPU nodes. The test's own
/// binaries (target/debug, or `$MOE_E2E_OWN_BIN`) come first on PATH so process-backed pods run
/// this build.
pub fn cluster_script(state: &Path, nodes: usize, verb: &str) -> Output {
    let pods_bin = own_bin(env!("CARGO_BIN_EXE_moe-e2e-pods"));
    let target_debug = pods_bin.parent().expect("binary has a parent dir");
    let path = format!(
        "{}:{}",
        target_debug.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new(repo().join("e2e/cluster.sh"))
        .arg(verb)
        .env("MOE_E2E_STATE", state)
        .env("MOE_E2E_NODES", nodes.to_string())
        .env("MOE_E2E_PODS_BIN", &pods_bin)
        .env("PATH", path)
        .output()
        .unwrap_or_else(|e| panic!("running e2e/cluster.sh {verb}: {e}"))
}

/// [`cluster_script`] that must succeed; its stdout and stderr.
pub fn run_cluster(state: &Path, nodes: usize, verb: &str) -> String {
    let out = cluster_script(state, nodes, verb);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "e2e/cluster.sh {verb} failed ({}):\n{stderr}\nlogs: {}/logs",
        out.status,
        state.display()
    );
    format!("{}{stderr}", String::from_utf8_lossy(&out.stdout))
}

pub async fn client_from(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kubeconfig.display()));
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig loads");
    Client::try_from(cfg).expect("client builds")
}

/// A token of ServiceAccount `ns/name` from a TokenRequest, valid for `seconds`.
pub async fn service_account_token(admin: &Client, ns: &str, name: &str, seconds: i64) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let tr = kube::Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create_token_request(
            name,
            &kube::api::PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec![],
                    expiration_seconds: Some(seconds),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for ServiceAccount {ns}/{name}: {e}"));
    tr.status.expect("TokenRequest status").token
}

/// Writes to `out` the admin kubeconfig with its user's credentials replaced by `token`: a client
/// of it has only the token's rights.
pub fn write_token_kubeconfig(admin_kubeconfig: &Path, token: &str, out: &Path) {
    let mut kc = Kubeconfig::read_from(admin_kubeconfig)
        .unwrap_or_else(|e| panic!("reading {}: {e}", admin_kubeconfig.display()));
    for a in &mut kc.auth_infos {
        if let Some(ai) = a.auth_info.as_mut() {
            *ai = Default::default();
            ai.token = Some(token.to_string().into());
        }
    }
    std::fs::write(
        out,
        serde_yaml::to_string(&kc).expect("kubeconfig serialises"),
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}
