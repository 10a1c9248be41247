//! End-to-end test of S3 checkpoints (`model.checkpoint.s3`) on the local control plane: a real
//! S3-compatible server (moto's, from PyPI, found or installed by `e2e/s3.sh`) that checks every
//! request's SigV4 signature and IAM permission, the tiny checkpoint uploaded to it, and worker
//! pods whose `fetch-weights` init container (`moe-worker fetch-weights`, run by the e2e kubelet)
//! fetches it into the pod's emptyDir before the worker loads it.
//!
//! - a good fetch: the workers load the fetched safetensors and become Ready on the plan;
//! - wrong credentials, a missing bucket and a truncated object: Degraded, reason
//!   `WeightsFetchFailed`, naming the pod, the object and the cause, while the good deployment
//!   keeps serving;
//! - the good deployment switched to the wrong credentials: the replaced worker cannot fetch, the
//!   condition says so, and the worker still on the old spec keeps serving.
//!
//! moto 5.2.1 computes the signature of a query value holding `/` on its decoded form (botocore
//! fails there the same way), so the deployments' prefixes here have no `/` (`good` for the keys
//! `good/...`); the fetcher encodes query values
//! as SigV4 specifies, which the unit tests check against AWS's published examples.
//!
//! Needs the binaries of `e2e/build.sh`; fails without them. Without moto it fails when `CI` is
//! set and otherwise skips with a loud message.

use common::operator::{condition, deployment, wait_for, OperatorPlane};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use moe_operator::api::{reason, MoEDeployment};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;
const NODES: usize = 2;
const NS: &str = "ml";
const BUCKET: &str = "weights";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The moto server, killed on drop.
struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts moto on `port` with authentication after 3 requests; waits until it answers.
fn start_moto(python: &Path, port: u16, log: &Path) -> Moto {
    let log = std::fs::File::create(log).expect("moto log");
    let child = Command::new(python)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("starting moto");
    let moto = Moto(child);
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "moto did not listen on {port} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    moto
}

fn secret(name: &str, id: &str, key: &str) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "stringData": {"accessKeyId": id, "secretAccessKey": key}
    }))
    .unwrap()
}

/// A deployment of the tiny model fetched from `bucket`/`prefix` with the credentials in `secret`.
fn s3_deployment(
    name: &str,
    nodes: u32,
    endpoint: &str,
    bucket: &str,
    prefix: &str,
    secret: &str,
) -> MoEDeployment {
    // `deployment` gives the tiny model with a hostPath; the checkpoint here comes from S3.
    let mut d = deployment(name, NS, Path::new("/unused"), nodes, 1, true);
    d["spec"]["model"]["checkpoint"] = json!({
        "path": "/models/tiny",
        "s3": {"bucket": bucket, "prefix": prefix, "endpoint": endpoint,
               "credentialsSecret": secret}
    });
    serde_json::from_value(d).unwrap()
}

/// The Degraded condition once it is True for `why`, whose message contains every one of `want`.
async fn wait_degraded(mds: &Api<MoEDeployment>, name: &str, want: &[&str]) -> String {
    wait_for(
        &format!("{name}: Degraded/WeightsFetchFailed naming {want:?}"),
        Duration::from_secs(180),
        || async {
            let md = mds.get(name).await.map_err(|e| e.to_string())?;
            match condition(&md, "Degraded") {
                Some((s, r, m))
                    if s == "True"
                        && r == reason::WEIGHTS_FETCH_FAILED
                        && want.iter().all(|w| m.contains(w)) =>
                {
                    Ok(m)
                }
                c => Err(format!("{c:?}")),
            }
        },
    )
    .await
}

/// `s` without ANSI colour sequences (the worker logs to a terminal's taste).
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The ready worker pods of `name` (uid by pod name).
async fn ready_workers(plane: &OperatorPlane, name: &str) -> Result<Vec<(String, String)>, String> {
    let pods = plane.worker_pods(name).await?;
    Ok(pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_checkpoints() {
    let found = Command::new(common::repo().join("e2e/s3.sh"))
        .arg("--path")
        .output()
        .expect("running e2e/s3.sh --path");
    if !found.status.success() {
        let why = String::from_utf8_lossy(&found.stderr);
        assert!(
            !in_ci(),
            "CI is set and there is no moto server: run e2e/s3.sh first ({})",
            why.trim()
        );
        eprintln!(
            "\n!!!!!!!! SKIPPED s3_checkpoints: no S3-compatible server ({}).\n\
             !!!!!!!! Run e2e/s3.sh to install moto[server] from PyPI into the e2e cache.\n",
            why.trim()
        );
        return;
    }
    let python = PathBuf::from(String::from_utf8_lossy(&found.stdout).trim());

    let mut plane = OperatorPlane::up("moe-e2e-s3-", NODES, NS).await;
    let port = common::operator::free_port();
    let _moto = start_moto(&python, port, &plane.state.join("moto.log"));
    let endpoint = format!("http://127.0.0.1:{port}");

    // The tiny checkpoint twice: whole under `good`, with its shard cut in half under `cut`.
    let ckpt = plane.checkpoint();
    let shard = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .find(|n| n.ends_with(".safetensors"))
        .expect("a safetensors shard");
    let shard_len = std::fs::metadata(ckpt.join(&shard)).unwrap().len();
    let setup = Command::new(&python)
        .arg(common::repo().join("e2e/s3-setup.py"))
        .args([
            &endpoint,
            BUCKET,
            "--upload",
            "good/",
            ckpt.to_str().unwrap(),
            "--upload",
            "cut/",
            ckpt.to_str().unwrap(),
        ])
        .arg("--truncate")
        .arg(format!("cut/{shard}:{}", shard_len / 2))
        .output()
        .expect("running e2e/s3-setup.py");
    assert!(
        setup.status.success(),
        "s3-setup.py: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let keys = String::from_utf8_lossy(&setup.stdout).to_string();
    let mut keys = keys.lines();
    let (id, key) = (
        keys.next().unwrap().to_string(),
        keys.next().unwrap().to_string(),
    );

    let secrets: Api<Secret> = Api::namespaced(plane.admin.clone(), NS);
    for s in [
        secret("s3-creds", &id, &key),
        secret("s3-wrong", &id, "not-the-secret-key"),
    ] {
        secrets
            .create(&PostParams::default(), &s)
            .await
            .expect("creating a Secret");
    }
    // The credentials Secret is mounted into the init container: the pod policy must allow it.
    plane.start_operator_with("e2e-s3", &[("MOE_OPERATOR_ALLOW_SECRET_VOLUMES", "true")]);
    let mds: Api<MoEDeployment> = Api::namespaced(plane.admin.clone(), NS);
    let apply = |md: MoEDeployment| {
        let mds = mds.clone();
        async move {
            mds.patch(
                &md.name_any(),
                &PatchParams::apply("e2e").force(),
                &Patch::Apply(&md),
            )
            .await
            .expect("applying a MoEDeployment");
        }
    };
    let long = Duration::from_secs(240);

    // A good fetch: both workers fetch, load and serve.
    apply(s3_deployment(
        "good", 2, &endpoint, BUCKET, "good", "s3-creds",
    ))
    .await;
    wait_for("good: Ready with 2 workers", long, || async {
        let md = mds.get("good").await.map_err(|e| e.to_string())?;
        let ready = ready_workers(&plane, "good").await?;
        match condition(&md, "Ready") {
            Some((s, _, _)) if s == "True" && ready.len() == 2 => Ok(()),
            c => Err(format!("Ready {c:?}, ready workers {ready:?}")),
        }
    })
    .await;
    let serving = ready_workers(&plane, "good").await.unwrap();
    // The init container completed, and the worker read the checkpoint it fetched.
    for (pod, _) in &serving {
        let p: Pod = Api::namespaced(plane.admin.clone(), NS)
            .get(pod)
            .await
            .unwrap();
        let init = &p.status.unwrap().init_container_statuses.unwrap()[0];
        let t = init
            .state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .expect("fetch-weights terminated");
        assert_eq!((init.name.as_str(), t.exit_code), ("fetch-weights", 0));
        let log = plain(
            &std::fs::read_to_string(
                plane
                    .state
                    .join("pods")
                    .join(format!("{NS}_{pod}"))
                    .join("log"),
            )
            .unwrap(),
        );
        assert!(
            log.contains("fetched") && log.contains(&format!("s3://{BUCKET}/good/{shard}")),
            "{log}"
        );
        assert!(
            log.contains("checks=size,sha256,etag-md5,safetensors-header"),
            "{log}"
        );
    }

    // Wrong credentials, a missing bucket, a truncated object: each named, nothing else stops.
    apply(s3_deployment(
        "badkey", 1, &endpoint, BUCKET, "good", "s3-wrong",
    ))
    .await;
    apply(s3_deployment(
        "nobucket",
        1,
        &endpoint,
        "absent-bucket",
        "good",
        "s3-creds",
    ))
    .await;
    apply(s3_deployment(
        "cut", 1, &endpoint, BUCKET, "cut", "s3-creds",
    ))
    .await;
    let m = wait_degraded(
        &mds,
        "badkey",
        &[
            "badkey-worker-0",
            "s3://weights/good",
            "SignatureDoesNotMatch",
            "Secret s3-wrong",
        ],
    )
    .await;
    eprintln!("badkey: {m}");
    let m = wait_degraded(
        &mds,
        "nobucket",
        &[
            "s3://absent-bucket/good",
            "NoSuchBucket",
            "bucket absent-bucket does not exist",
        ],
    )
    .await;
    eprintln!("nobucket: {m}");
    let m = wait_degraded(
        &mds,
        "cut",
        &[
            &format!("s3://weights/cut/{shard}"),
            "not a whole safetensors file",
            "truncated",
        ],
    )
    .await;
    eprintln!("cut: {m}");
    assert_eq!(
        ready_workers(&plane, "good").await.unwrap(),
        serving,
        "the good deployment's workers were not touched"
    );

    // The serving deployment switched to the wrong key: the first worker replaced cannot fetch;
    // the rollout stops there and the other worker keeps serving.
    apply(s3_deployment(
        "good", 2, &endpoint, BUCKET, "good", "s3-wrong",
    ))
    .await;
    let m = wait_degraded(&mds, "good", &["SignatureDoesNotMatch", "Secret s3-wrong"]).await;
    eprintln!("good after the switch: {m}");
    // Under CPU load, re-read: one worker of the old spec stays Ready throughout.
    for _ in 0..10 {
        let ready = ready_workers(&plane, "good").await.unwrap();
        assert_eq!(ready.len(), 1, "one worker keeps serving: {ready:?}");
        assert!(
            serving.contains(&ready[0]),
            "it is one of the original pods: {ready:?} vs {serving:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Back to the right key: the rollout completes.
    apply(s3_deployment(
        "good", 2, &endpoint, BUCKET, "good", "s3-creds",
    ))
    .await;
    wait_for("good: Ready again, not Degraded", long, || async {
        let md = mds.get("good").await.map_err(|e| e.to_string())?;
        match (condition(&md, "Ready"), condition(&md, "Degraded")) {
            (Some((r, _, _)), Some((d, _, _))) if r == "True" && d == "False" => Ok(()),
            c => Err(format!("{c:?}")),
        }
    })
    .await;
}
