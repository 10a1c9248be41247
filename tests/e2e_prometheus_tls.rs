//! End-to-end test of the Prometheus metrics source over https with credentials from Secrets, on
//! the local control plane (e2e/cluster.sh) with the chart installed and the operator run under
//! the chart ServiceAccount's token (so the chart's RBAC is what it reads Secrets with).
//!
//! - Debian's Prometheus (e2e/prometheus.sh) serves its API over TLS with basic auth
//!   (`--web.config.file`: a server certificate from a CA made for this run, and the bcrypt hash
//!   of a random password); the MoEDeployment names the password in `metrics.prometheus.auth.
//!   basicAuthSecret` and the CA in `metrics.prometheus.ca.secret`. The load must come through
//!   (MetricsAvailable, observed tokens).
//! - A wrong password, a wrong CA and a missing Secret each make the deployment Degraded with a
//!   Warning naming the field to fix, while its workers keep serving the plan in force (same
//!   pods, still Ready); fixing the Secret clears it.
//! - Prometheus' own server does not take bearer tokens: a TLS reverse proxy in this process
//!   checks `Authorization: Bearer` and forwards to Prometheus (basic auth), so the bearer path
//!   (`auth.bearerTokenSecret`, CA from `ca.configMap`) runs over a real https hop to real
//!   Prometheus answers; a wrong token is refused by name.
//! - The CRD refuses credentials over http and ambiguous references at `kubectl apply`.
//! - No credential appears in the operator's log or in the deployment's status.
//!
//! Needs the binaries of `e2e/build.sh`; without a Prometheus binary it fails when `CI` is set
//! and otherwise skips with a loud message.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use moe_operator::api::pod_policy::{HttpUrl, PodPolicy};
use moe_operator::api::MoEDeployment;
use moe_operator::controller::prometheus::{Access, Auth, PrometheusClient};
use moe_operator::worker::wire::{HttpClient, WorkerClient, TOKENS_METRIC};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::operator::{
    condition, deployment, free_port, loadgen_round, operator_metric, wait_for, OperatorPlane,
};

const NODES: usize = 2;
const NS: &str = "ml";
const USER: &str = "moe-operator";

/// `CI` set to anything but empty, 0 or false.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// A random secret of 32 hex digits.
fn random_secret() -> String {
    use rand::Rng;
    let mut b = [0u8; 16];
    rand::rng().fill(&mut b);
    hex::encode(b)
}

/// A CA made for this run (named `ca_name`) and a server certificate it signed for 127.0.0.1 and
/// localhost (PEM).
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn pki(ca_name: &str) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("moe-operator e2e CA {ca_name}"));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut srv = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    srv.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    srv.distinguished_name
        .push(DnType::CommonName, "prometheus e2e");
    let key = KeyPair::generate().unwrap();
    let cert = srv.signed_by(&key, &issuer).unwrap();
    Pki {
        ca: ca_cert.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn tls_acceptor(pki: &Pki) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(pki.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pki.key.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

/// A TLS reverse proxy on `listener` in front of the Prometheus at `upstream`: a request whose
/// `Authorization` is `Bearer <token>` is forwarded (with `upstream_auth`) and its answer passed
/// back; any other gets 401. Counts the requests it forwarded.
async fn bearer_proxy(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    token: String,
    upstream: String,
    upstream_client: HttpClient,
    upstream_auth: String,
    forwarded: Arc<AtomicUsize>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let (acceptor, token, upstream, client, auth, forwarded) = (
            acceptor.clone(),
            token.clone(),
            upstream.clone(),
            upstream_client.clone(),
            upstream_auth.clone(),
            forwarded.clone(),
        );
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).to_string();
            let path = head
                .lines()
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .unwrap_or("/")
                .to_string();
            let bearer = head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("authorization")
                    .then(|| v.trim().to_string())
            });
            let (status, body) = if bearer.as_deref() == Some(&format!("Bearer {token}")) {
                forwarded.fetch_add(1, Ordering::SeqCst);
                let req = hyper::Request::get(format!("{upstream}{path}"))
                    .header(hyper::header::AUTHORIZATION, auth)
                    .body(Full::<Bytes>::default())
                    .unwrap();
                match client.send(req, Duration::from_secs(5), 64 << 20).await {
                    Ok(r) => (r.status, r.body),
                    Err(e) => (502, e.to_string().into_bytes()),
                }
            } else {
                (401, b"Unauthorized\n".to_vec())
            };
            let mut out = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            out.extend_from_slice(&body);
            let _ = tls.write_all(&out).await;
            let _ = tls.shutdown().await;
        });
    }
}

/// Prometheus, killed on drop.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// (status, reason, message) of the Degraded condition, or an error naming what it is.
async fn degraded(mds: &Api<MoEDeployment>) -> Result<(String, String, String), String> {
    let md = mds.get("tiny").await.map_err(|e| e.to_string())?;
    condition(&md, "Degraded").ok_or_else(|| "no Degraded condition".to_string())
}

/// Waits until the deployment is Degraded for `reason`; returns the message.
async fn wait_degraded(mds: &Api<MoEDeployment>, reason: &str) -> String {
    wait_for(
        &format!("Degraded={reason}"),
        Duration::from_secs(60),
        || async {
            match degraded(mds).await? {
                (s, r, m) if s == "True" && r == reason => Ok(m),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
}

/// Waits until the deployment is not Degraded and reads its load from Prometheus again.
async fn wait_healthy(mds: &Api<MoEDeployment>, what: &str) {
    wait_for(what, Duration::from_secs(60), || async {
        let md = mds.get("tiny").await.map_err(|e| e.to_string())?;
        let d = condition(&md, "Degraded");
        let m = condition(&md, "MetricsAvailable");
        match (&d, &m) {
            (Some((ds, _, _)), Some((ms, _, mm)))
                if ds == "False" && ms == "True" && mm.contains("load from Prometheus") =>
            {
                Ok(())
            }
            _ => Err(format!("Degraded {d:?}, MetricsAvailable {m:?}")),
        }
    })
    .await
}

/// The worker pods' (name, uid), sorted.
async fn pod_ids(pods: &Api<Pod>) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pods
        .list(&ListParams::default().labels("moe.craft.dev/deployment=tiny"))
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect();
    v.sort();
    v
}

/// The deployment still serves as before: Ready, the same pods, every worker answering with the
/// plan in force.
async fn still_serving(
    mds: &Api<MoEDeployment>,
    pods: &Api<Pod>,
    ids: &[(String, String)],
    ips: &[String],
) {
    let md = mds.get("tiny").await.unwrap();
    let ready = condition(&md, "Ready").unwrap();
    assert_eq!(ready.0, "True", "Ready while Degraded: {ready:?}");
    assert_eq!(pod_ids(pods).await, ids, "the worker pods are the same");
    let hash = md.status.and_then(|s| s.plan).map(|p| p.hash).unwrap();
    for ip in ips {
        let s = WorkerClient::new()
            .scrape(ip, 9401, Duration::from_secs(5))
            .await
            .expect("worker answers /metrics");
        assert_eq!(s.plan_hash.as_deref(), Some(hash.as_str()), "worker {ip}");
    }
}

fn secret(name: &str, data: serde_json::Value) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "stringData": data
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_over_tls_with_credentials_from_secrets() {
    let prom = Command::new(common::repo().join("e2e/prometheus.sh"))
        .arg("--path")
        .output()
        .expect("running e2e/prometheus.sh --path");
    if !prom.status.success() {
        let why = String::from_utf8_lossy(&prom.stderr);
        assert!(
            !in_ci(),
            "CI is set and there is no Prometheus: run e2e/prometheus.sh first ({})",
            why.trim()
        );
        eprintln!(
            "\n!!!!!!!! SKIPPED prometheus_over_tls_with_credentials_from_secrets: no Prometheus binary ({}).\n\
             !!!!!!!! Run e2e/prometheus.sh to install Debian's package into the e2e cache.\n",
            why.trim()
        );
        return;
    }
    let prometheus_bin = PathBuf::from(String::from_utf8_lossy(&prom.stdout).trim());

    let mut plane = OperatorPlane::up("moe-e2e-prom-tls-", NODES, NS).await;
    let state = plane.state.clone();
    let good = pki("good");
    let wrong = pki("wrong");
    let password = random_secret();
    let token = random_secret();
    let (prom_port, proxy_port) = (free_port(), free_port());
    let prom_url = format!("https://127.0.0.1:{prom_port}");
    let proxy_url = format!("https://127.0.0.1:{proxy_port}");
    let allowed = format!("{prom_url},{proxy_url}");
    let metrics_port = plane.start_operator_with(
        "tls-op",
        &[("MOE_OPERATOR_ALLOWED_PROMETHEUS_URL_PREFIXES", &allowed)],
    );

    let admin = plane.admin.clone();
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    let mds: Api<MoEDeployment> = Api::namespaced(admin.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let ssa = PatchParams::apply("e2e").force();
    let put_secret = |name: &'static str, data: serde_json::Value| {
        let secrets = secrets.clone();
        let ssa = ssa.clone();
        async move {
            secrets
                .patch(name, &ssa, &Patch::Apply(&secret(name, data)))
                .await
                .unwrap_or_else(|e| panic!("Secret {name}: {e}"));
        }
    };
    put_secret(
        "prom-basic",
        json!({"username": USER, "password": password}),
    )
    .await;
    put_secret("prom-ca", json!({"ca.crt": good.ca})).await;
    put_secret("prom-token", json!({"token": format!("{token}\n")})).await;
    let ca_cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "prom-ca", "namespace": NS},
        "data": {"ca.crt": good.ca}
    }))
    .unwrap();
    cms.patch("prom-ca", &ssa, &Patch::Apply(&ca_cm))
        .await
        .unwrap();

    let query = format!("sum by (layer, expert) (increase({TOKENS_METRIC}[10s]))");
    let mut md = deployment("tiny", NS, &plane.checkpoint(), NODES as u32, 2, true);
    md["spec"]["metrics"] = json!({
        "source": "Prometheus", "interval": "2s",
        "prometheus": {
            "url": prom_url, "query": query,
            "auth": {"basicAuthSecret": {"name": "prom-basic"}},
            "ca": {"secret": {"name": "prom-ca", "key": "ca.crt"}}
        }
    });
    let md: MoEDeployment = serde_json::from_value(md).unwrap();
    mds.patch("tiny", &ssa, &Patch::Apply(&md))
        .await
        .expect("apply MoEDeployment");

    let running: Vec<String> = wait_for(
        "2 worker pods running",
        Duration::from_secs(120),
        || async {
            let list = plane.worker_pods("tiny").await?;
            let mut ips: Vec<String> = list
                .iter()
                .filter(|p| {
                    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                        && plane.has_process(&p.name_any())
                })
                .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                .collect();
            ips.sort();
            if ips.len() == NODES {
                Ok(ips)
            } else {
                Err(format!("{ips:?} of {} pods", list.len()))
            }
        },
    )
    .await;

    // Prometheus: scrapes the workers over http, serves its API over TLS with basic auth only.
    let dir = state.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cert = file("server.pem", &good.cert);
    let key = file("server.key", &good.key);
    let ca_file = file("ca.pem", &good.ca);
    let hash = bcrypt::hash_with_result(&password, 4)
        .unwrap()
        .format_for_version(bcrypt::Version::TwoA);
    let web = file(
        "web.yml",
        &format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  {USER}: '{hash}'\n",
            cert.display(),
            key.display()
        ),
    );
    let targets: Vec<String> = running.iter().map(|ip| format!("\"{ip}:9401\"")).collect();
    let config = file(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: moe-workers\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    );
    let plog = std::fs::File::create(state.join("prometheus.log")).unwrap();
    let _prometheus = Prometheus(
        Command::new(&prometheus_bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--web.config.file={}", web.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(plog)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", prometheus_bin.display())),
    );
    // The operator's own client, as a test client: this CA, these credentials.
    let client = PrometheusClient::new(&PodPolicy {
        prometheus_url_prefixes: vec![HttpUrl::parse(&prom_url).unwrap()],
        prometheus_ca_file: Some(ca_file.clone()),
        ..Default::default()
    })
    .unwrap();
    let mut access = Access::default();
    access.auth = Some(Auth::Basic {
        username: USER.into(),
        password: password.clone(),
    });
    let up = "sum(up{job=\"moe-workers\"})";
    wait_for(
        "Prometheus (TLS, basic auth) scraping both workers",
        Duration::from_secs(60),
        || async {
            let v = client
                .query_with(&prom_url, up, &access, Duration::from_secs(3))
                .await
                .map_err(|e| e.to_string())?;
            match v.first() {
                Some((_, n)) if *n == NODES as f64 => Ok(()),
                other => Err(format!("{up} = {other:?}")),
            }
        },
    )
    .await;
    // Without credentials Prometheus refuses: the auth is real.
    let open = client
        .query(&prom_url, up, Duration::from_secs(3))
        .await
        .unwrap_err();
    assert!(open.to_string().contains("HTTP 401"), "{open}");

    // The load arrives over https with basic auth and the CA from the Secret.
    wait_healthy(&mds, "MetricsAvailable from Prometheus over TLS").await;
    let trace = state.join("skewed.json");
    let row =
        |hot: u32| -> Vec<u32> { (0..8).map(|e| if e == hot { 4000 } else { 100 }).collect() };
    std::fs::write(
        &trace,
        json!({"logical_count": [row(0), row(1)]}).to_string(),
    )
    .unwrap();
    let workers: String = running
        .iter()
        .map(|ip| format!("{ip}:9400"))
        .collect::<Vec<_>>()
        .join(",");
    let plan_file = state.join("plan.json");
    let observed = wait_for(
        "tokens observed through Prometheus",
        Duration::from_secs(120),
        || async {
            loadgen_round(&cms, "tiny-plan", &plan_file, &workers, &trace).await?;
            let md = mds.get("tiny").await.map_err(|e| e.to_string())?;
            let st = md.status.clone().unwrap_or_default();
            let ready = condition(&md, "Ready").map(|c| c.0);
            match (st.observed, ready.as_deref()) {
                (Some(o), Some("True")) if o.tokens > 0 => Ok(o),
                (o, r) => Err(format!("observed {o:?}, Ready {r:?}")),
            }
        },
    )
    .await;
    eprintln!("load over https + basic auth: {observed:?}");
    wait_for("the rollout settled", Duration::from_secs(60), || async {
        let md = mds.get("tiny").await.map_err(|e| e.to_string())?;
        match condition(&md, "Progressing") {
            Some((s, _, _)) if s == "False" => Ok(()),
            c => Err(format!("{c:?}")),
        }
    })
    .await;
    let ids = pod_ids(&pods).await;

    // A wrong password: refused by Prometheus, reported on the field, nothing stops serving.
    let wrong_password = random_secret();
    put_secret(
        "prom-basic",
        json!({"username": USER, "password": wrong_password}),
    )
    .await;
    let msg = wait_degraded(&mds, "PrometheusAuthRefused").await;
    eprintln!("wrong password: {msg}");
    assert!(
        msg.starts_with("spec.metrics.prometheus.auth.basicAuthSecret: ")
            && msg.contains("HTTP 401")
            && msg.contains("Secret ml/prom-basic"),
        "{msg}"
    );
    still_serving(&mds, &pods, &ids, &running).await;
    let md = mds.get("tiny").await.unwrap();
    let (ms, mr, _) = condition(&md, "MetricsAvailable").unwrap();
    assert_eq!(
        (ms.as_str(), mr.as_str()),
        ("False", "PrometheusAuthRefused")
    );
    let events: Api<Event> = Api::namespaced(admin.clone(), NS);
    wait_for(
        "a Warning event naming the field",
        Duration::from_secs(30),
        || async {
            let list = events
                .list(&ListParams::default().fields("involvedObject.name=tiny"))
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .find(|e| {
                    e.type_.as_deref() == Some("Warning")
                        && e.reason.as_deref() == Some("PrometheusAuthRefused")
                        && e.message
                            .as_deref()
                            .is_some_and(|m| m.contains("auth.basicAuthSecret"))
                })
                .map(|_| ())
                .ok_or_else(|| format!("{} events, none PrometheusAuthRefused", list.items.len()))
        },
    )
    .await;
    let failures = "moe_operator_scrape_failures_total{namespace=\"ml\",name=\"tiny\",source=\"prometheus\",reason=\"PrometheusAuthRefused\"}";
    assert!(
        operator_metric(metrics_port, failures).await >= Some(1.0),
        "{failures}"
    );
    put_secret(
        "prom-basic",
        json!({"username": USER, "password": password}),
    )
    .await;
    wait_healthy(&mds, "healthy again with the right password").await;

    // A CA that did not sign Prometheus' certificate.
    put_secret("prom-ca", json!({"ca.crt": wrong.ca})).await;
    let msg = wait_degraded(&mds, "PrometheusTLSFailed").await;
    eprintln!("wrong CA: {msg}");
    assert!(
        msg.starts_with("spec.metrics.prometheus.ca.secret: ")
            && msg.contains("Secret ml/prom-ca key \"ca.crt\"")
            && msg.contains("certificate"),
        "{msg}"
    );
    still_serving(&mds, &pods, &ids, &running).await;
    // Not a certificate at all.
    put_secret("prom-ca", json!({"ca.crt": "not a certificate"})).await;
    let msg = wait_degraded(&mds, "PrometheusCredentialsInvalid").await;
    assert!(
        msg.starts_with("spec.metrics.prometheus.ca.secret: ")
            && msg.contains("no PEM certificate"),
        "{msg}"
    );
    put_secret("prom-ca", json!({"ca.crt": good.ca})).await;
    wait_healthy(&mds, "healthy again with the right CA").await;

    // A Secret that does not exist.
    let merge = PatchParams::default();
    let patch_prometheus = |p: serde_json::Value| {
        let mds = mds.clone();
        let merge = merge.clone();
        async move {
            mds.patch(
                "tiny",
                &merge,
                &Patch::Merge(json!({"spec": {"metrics": {"prometheus": p}}})),
            )
            .await
            .expect("patch metrics.prometheus");
        }
    };
    patch_prometheus(json!({"auth": {"basicAuthSecret": {"name": "nope"}}})).await;
    let msg = wait_degraded(&mds, "PrometheusCredentialsInvalid").await;
    assert!(
        msg.starts_with("spec.metrics.prometheus.auth.basicAuthSecret: Secret ml/nope not found"),
        "{msg}"
    );
    still_serving(&mds, &pods, &ids, &running).await;

    // Bearer token through the TLS proxy, CA from a ConfigMap.
    let mut roots = rustls::RootCertStore::empty();
    {
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(good.ca.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let forwarded = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", proxy_port))
        .await
        .unwrap();
    let proxy = tokio::spawn(bearer_proxy(
        listener,
        tls_acceptor(&good),
        token.clone(),
        prom_url.clone(),
        HttpClient::with_roots(roots).unwrap(),
        basic(USER, &password),
        forwarded.clone(),
    ));
    patch_prometheus(json!({
        "url": proxy_url,
        "auth": {"basicAuthSecret": null, "bearerTokenSecret": {"name": "prom-token", "key": "token"}},
        "ca": {"secret": null, "configMap": {"name": "prom-ca", "key": "ca.crt"}}
    }))
    .await;
    wait_healthy(&mds, "load through the bearer-token proxy").await;
    assert!(forwarded.load(Ordering::SeqCst) > 0, "the proxy forwarded");
    let wrong_token = random_secret();
    put_secret("prom-token", json!({"token": wrong_token})).await;
    let msg = wait_degraded(&mds, "PrometheusAuthRefused").await;
    eprintln!("wrong token: {msg}");
    assert!(
        msg.starts_with("spec.metrics.prometheus.auth.bearerTokenSecret: ")
            && msg.contains("Secret ml/prom-token"),
        "{msg}"
    );
    still_serving(&mds, &pods, &ids, &running).await;
    proxy.abort();

    // The CRD refuses what it can see at apply time.
    let mut bad = deployment("bad", NS, &plane.checkpoint(), NODES as u32, 2, false);
    let cases = [
        (
            json!({"url": "http://127.0.0.1:9090", "query": "q",
                   "auth": {"basicAuthSecret": {"name": "prom-basic"}}}),
            "metrics.prometheus.auth needs an https:// url: credentials are never sent over plain http",
        ),
        (
            json!({"url": "https://127.0.0.1:9090", "query": "q",
                   "auth": {"basicAuthSecret": {"name": "prom-basic"},
                            "bearerTokenSecret": {"name": "prom-token", "key": "token"}}}),
            "metrics.prometheus.auth takes exactly one of bearerTokenSecret and basicAuthSecret",
        ),
        (
            json!({"url": "https://127.0.0.1:9090", "query": "q", "ca": {}}),
            "metrics.prometheus.ca takes exactly one of secret and configMap",
        ),
    ];
    for (p, want) in cases {
        bad["spec"]["metrics"] = json!({"source": "Prometheus", "prometheus": p});
        let md: MoEDeployment = serde_json::from_value(bad.clone()).unwrap();
        let e = mds
            .create(&PostParams::default(), &md)
            .await
            .expect_err("the CRD refuses it");
        assert!(e.to_string().contains(want), "{e}");
    }

    // A worker that stops answering: its scrapes fail and are counted per deployment, with the
    // workers as their source (the Prometheus ones above had Prometheus).
    let pod = pod_ids(&pods).await[0].0.clone();
    let pid: i32 = std::fs::read_to_string(state.join("pods").join(format!("{NS}_{pod}/pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let worker_failures = "moe_operator_scrape_failures_total{namespace=\"ml\",name=\"tiny\",source=\"workers\",reason=\"Unreachable\"}";
    // SAFETY: kill(2) takes no pointers.
    assert_eq!(
        unsafe { libc::kill(pid, libc::SIGSTOP) },
        0,
        "SIGSTOP {pid}"
    );
    let counted = wait_for(
        "a failed worker scrape counted",
        Duration::from_secs(60),
        || async {
            match operator_metric(metrics_port, worker_failures).await {
                Some(n) if n >= 1.0 => Ok(n),
                other => Err(format!("{worker_failures} = {other:?}")),
            }
        },
    )
    .await;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    eprintln!("failed worker scrapes counted: {counted}");

    // No credential in the operator's log or in status.
    let log = std::fs::read_to_string(state.join("operator-tls-op.log")).unwrap();
    let status = serde_json::to_string(&mds.get("tiny").await.unwrap().status).unwrap();
    for (what, s) in [
        ("password", &password),
        ("wrong password", &wrong_password),
        ("token", &token),
        ("wrong token", &wrong_token),
    ] {
        assert!(
            !log.contains(s.as_str()),
            "the {what} is in the operator's log"
        );
        assert!(!status.contains(s.as_str()), "the {what} is in status");
    }
    assert!(
        !log.contains(&basic(USER, &password)[6..]),
        "basic credentials in the log"
    );
    plane.kill_operator("tls-op");
}
