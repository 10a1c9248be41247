//! The operator's Prometheus client: `/api/v1/query` instant queries, for deployments whose load
//! comes from Prometheus (`spec.metrics.source: Prometheus`). It runs over the wire's HTTP layer
//! ([`crate::worker::wire::http`]: pooled hyper client, http or https with rustls, deadlines,
//! a size cap), and fetches only URLs under the policy's `--allowed-prometheus-url-prefix`.
//!
//! A deployment's [`Access`] (`metrics.prometheus.auth` and `.ca`, read from its namespace by
//! `fetch::prometheus_access`) adds an `Authorization` header and CA certificates to its
//! queries. Credentials never reach a log or a message: [`Access`] prints redacted, and every
//! error of a query with credentials has them cut out ([`Access::redact`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;

use rustls::pki_types::CertificateDer;

use crate::api::pod_policy::{HttpUrl, PodPolicy};
use crate::api::validate::AuthRef;
use crate::api::{LayerIndex, SeriesLabels};
use crate::api::{BASIC_AUTH_PASSWORD_KEY, BASIC_AUTH_USERNAME_KEY};
use crate::worker::wire::http::native_roots;
use crate::worker::wire::{excerpt, HttpClient, HttpError, WorkerSample};

/// One series of a Prometheus instant vector: its labels and value.
pub type Series = (std::collections::BTreeMap<String, String>, f64);

/// Percent-encode a query parameter value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Largest Prometheus answer read. One series is about 100 bytes of JSON, so this holds the
/// largest load the CRD allows (`MAX_LAYERS` x `MAX_EXPERTS` = 512Ki series) with room for labels.
pub const MAX_PROMETHEUS_RESPONSE_BYTES: usize = 64 << 20;

/// Why the Prometheus client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusSetupError {
    #[error("--prometheus-ca-file {path}: {message}: give a PEM file of CA certificates")]
    CaFile { path: String, message: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// How a query authenticates: the `Authorization` header's scheme and secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    Bearer(String),
    Basic { username: String, password: String },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::Bearer(_) => "Bearer (redacted)",
            Auth::Basic { .. } => "Basic (redacted)",
        })
    }
}

/// What one deployment's queries carry besides the URL: credentials and extra CA certificates
/// (`spec.metrics.prometheus.auth` and `.ca`). The default is an open Prometheus whose
/// certificate (for https) the system's CAs and `--prometheus-ca-file` verify.
#[derive(Clone, Default)]
pub struct Access {
    pub auth: Option<Auth>,
    /// The CA bundle's certificates, and its SHA-256 (the key of its client).
    ca: Option<(Vec<CertificateDer<'static>>, [u8; 32])>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("auth", &self.auth)
            .field(
                "ca_certificates",
                &self.ca.as_ref().map_or(0, |c| c.0.len()),
            )
            .finish()
    }
}

/// Secret values shorter than this are not cut out of messages (they would cut common words);
/// no real token or password is this short.
const MIN_REDACTED_LEN: usize = 4;

impl Access {
    /// Trust the PEM certificates in `pem` too; the message says what is wrong with it.
    pub fn with_ca_pem(mut self, pem: &[u8]) -> Result<Self, String> {
        use rustls::pki_types::pem::PemObject;
        use sha2::Digest;
        let mut certs = Vec::new();
        for c in CertificateDer::pem_slice_iter(pem) {
            certs.push(c.map_err(|e| format!("not a PEM certificate bundle: {e}"))?);
        }
        if certs.is_empty() {
            return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
        }
        // Each must be one rustls can use as a trust anchor.
        let mut roots = rustls::RootCertStore::empty();
        for c in &certs {
            roots
                .add(c.clone())
                .map_err(|e| format!("a certificate cannot be a trust anchor: {e}"))?;
        }
        self.ca = Some((certs, sha2::Sha256::digest(pem).into()));
        Ok(self)
    }

    /// The `Authorization` header, marked sensitive (hyper keeps it out of its own debug output).
    fn authorization(&self) -> Result<Option<hyper::header::HeaderValue>, String> {
        use base64::Engine;
        let value = match &self.auth {
            None => return Ok(None),
            Some(Auth::Bearer(t)) => format!("Bearer {t}"),
            Some(Auth::Basic { username, password }) => format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            ),
        };
        let mut v = hyper::header::HeaderValue::from_str(&value).map_err(|_| {
            "the credentials hold characters an HTTP header cannot carry (control characters or non-ASCII)".to_string()
        })?;
        v.set_sensitive(true);
        Ok(Some(v))
    }

    /// `message` with every credential cut out, for errors of queries that carried them.
    pub fn redact(&self, message: &str) -> String {
        use base64::Engine;
        let secrets: Vec<String> = match &self.auth {
            None => return message.to_string(),
            Some(Auth::Bearer(t)) => vec![t.clone()],
            Some(Auth::Basic { username, password }) => vec![
                password.clone(),
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}")),
            ],
        };
        let mut out = message.to_string();
        for s in secrets.iter().filter(|s| s.len() >= MIN_REDACTED_LEN) {
            out = out.replace(s.as_str(), "[redacted]");
        }
        out
    }
}

/// Most clients kept for deployments' own CA bundles; past it the cache starts over (a bundle
/// that changes every interval must not grow memory).
const MAX_CA_CLIENTS: usize = 64;

/// The operator's Prometheus client: the system's CA certificates plus `--prometheus-ca-file`
/// for https, no redirects followed, an answer of at most [`MAX_PROMETHEUS_RESPONSE_BYTES`], and
/// only URLs under the policy's `--allowed-prometheus-url-prefix` (checked again here, so a spec
/// that skipped `validate` still cannot make the operator fetch anything else).
#[derive(Clone)]
pub struct PrometheusClient {
    http: HttpClient,
    /// What `http` trusts, to which a deployment's CA bundle is added.
    roots: Arc<rustls::RootCertStore>,
    /// One client per deployment CA bundle (by its SHA-256), each with its own pool.
    ca_clients: Arc<Mutex<HashMap<[u8; 32], HttpClient>>>,
    allowed: Vec<HttpUrl>,
}

impl std::fmt::Debug for PrometheusClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusClient")
            .field("allowed", &self.allowed)
            .finish_non_exhaustive()
    }
}

impl PrometheusClient {
    /// A client for the URLs `policy` allows, trusting the system's CAs and the policy's CA file.
    pub fn new(policy: &PodPolicy) -> Result<Self, PrometheusSetupError> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = (*native_roots()).clone();
        if let Some(path) = &policy.prometheus_ca_file {
            let ca_err = |message: String| PrometheusSetupError::CaFile {
                path: path.display().to_string(),
                message,
            };
            let mut n = 0;
            for c in CertificateDer::pem_file_iter(path).map_err(|e| ca_err(e.to_string()))? {
                let c = c.map_err(|e| ca_err(e.to_string()))?;
                roots.add(c).map_err(|e| ca_err(e.to_string()))?;
                n += 1;
            }
            if n == 0 {
                return Err(ca_err("no certificate in it".into()));
            }
        }
        Self::with_roots(roots, policy.prometheus_url_prefixes.clone())
    }

    fn with_roots(
        roots: rustls::RootCertStore,
        allowed: Vec<HttpUrl>,
    ) -> Result<Self, PrometheusSetupError> {
        let http = HttpClient::with_roots(roots.clone())
            .map_err(|e| PrometheusSetupError::Tls(e.to_string()))?;
        Ok(Self {
            http,
            roots: Arc::new(roots),
            ca_clients: Arc::default(),
            allowed,
        })
    }

    /// The client for `access`: the shared one, or the one that trusts its CA bundle too.
    fn http_for(&self, access: &Access, target: &str) -> Result<HttpClient, HttpError> {
        let Some((certs, hash)) = &access.ca else {
            return Ok(self.http.clone());
        };
        let mut clients = self.ca_clients.lock().expect("CA clients lock");
        if let Some(c) = clients.get(hash) {
            return Ok(c.clone());
        }
        let mut roots = (*self.roots).clone();
        for c in certs {
            // Checked when the bundle was read (Access::with_ca_pem).
            let _ = roots.add(c.clone());
        }
        let c = HttpClient::with_roots(roots).map_err(|e| HttpError::Tls {
            target: target.to_string(),
            message: format!("TLS setup: {e}"),
        })?;
        if clients.len() >= MAX_CA_CLIENTS {
            clients.clear();
        }
        clients.insert(*hash, c.clone());
        Ok(c)
    }

    /// The HTTP client under this one, to share its pool (and its trust) with other clients.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// Run an instant query on an open Prometheus; returns `(labels, value)` per series.
    pub async fn query(
        &self,
        url: &str,
        query: &str,
        timeout: Duration,
    ) -> Result<Vec<Series>, HttpError> {
        self.query_with(url, query, &Access::default(), timeout)
            .await
    }

    /// Run an instant query with `access`'s credentials and CA; errors carry no credential.
    pub async fn query_with(
        &self,
        url: &str,
        query: &str,
        access: &Access,
        timeout: Duration,
    ) -> Result<Vec<Series>, HttpError> {
        self.query_inner(url, query, access, timeout)
            .await
            .map_err(|e| redact_error(e, access))
    }

    async fn query_inner(
        &self,
        url: &str,
        query: &str,
        access: &Access,
        timeout: Duration,
    ) -> Result<Vec<Series>, HttpError> {
        let target = format!("GET {url}/api/v1/query");
        let garbled = |message: String| HttpError::Garbled {
            target: target.clone(),
            message,
        };
        let u = HttpUrl::parse(url).map_err(garbled)?;
        if !self.allowed.iter().any(|p| u.starts_with(p)) {
            return Err(HttpError::NotAllowed {
                target: target.clone(),
            });
        }
        let mut req = hyper::Request::get(format!("{u}/api/v1/query?query={}", encode(query)))
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::<Bytes>::default())
            .map_err(|e| garbled(format!("request: {e}")))?;
        if let Some(v) = access.authorization().map_err(garbled)? {
            if !u.https {
                // validate refuses auth without https; this holds for a spec that skipped it.
                return Err(garbled(
                    "refusing to send credentials over plain http: use an https:// url".into(),
                ));
            }
            req.headers_mut().insert(hyper::header::AUTHORIZATION, v);
        }
        let r = self
            .http_for(access, &target)?
            .send(req, timeout, MAX_PROMETHEUS_RESPONSE_BYTES)
            .await?;
        let target = r.target.clone();
        let body = r.ok()?;
        parse_prometheus_vector(&body).map_err(|message| HttpError::Garbled { target, message })
    }
}

/// The credentials `r` names, from its Secret's `data` (`None`: the Secret does not exist);
/// the message (no credential in it) says what is wrong and how to fix it.
pub fn auth_from_secret(
    r: &AuthRef,
    ns: &str,
    data: Option<&std::collections::BTreeMap<String, Vec<u8>>>,
) -> Result<Auth, String> {
    let secret = format!("Secret {ns}/{}", r.secret());
    let keys = r.keys();
    let Some(data) = data else {
        return Err(format!(
            "{secret} not found: create it with the key{} {}",
            if keys.len() > 1 { "s" } else { "" },
            keys.join(" and ")
        ));
    };
    let text = |key: &str| -> Result<String, String> {
        let v = data
            .get(key)
            .ok_or_else(|| format!("{secret} has no key {key:?}: add it"))?;
        let v = std::str::from_utf8(v)
            .map_err(|_| format!("key {key:?} of {secret} is not UTF-8 text"))?
            .trim();
        if v.is_empty() {
            return Err(format!("key {key:?} of {secret} is empty"));
        }
        Ok(v.to_string())
    };
    match r {
        AuthRef::Bearer { key, .. } => {
            let t = text(key)?;
            if t.chars().any(char::is_control) {
                return Err(format!(
                    "key {key:?} of {secret} holds control characters, which an HTTP header cannot carry"
                ));
            }
            Ok(Auth::Bearer(t))
        }
        AuthRef::Basic { .. } => {
            let username = text(BASIC_AUTH_USERNAME_KEY)?;
            if username.contains(':') {
                return Err(format!(
                    "the {BASIC_AUTH_USERNAME_KEY} in {secret} contains ':', which basic auth cannot carry"
                ));
            }
            Ok(Auth::Basic {
                username,
                password: text(BASIC_AUTH_PASSWORD_KEY)?,
            })
        }
    }
}

/// `e` with `access`'s credentials cut out of its text.
fn redact_error(e: HttpError, access: &Access) -> HttpError {
    let r = |s: String| access.redact(&s);
    match e {
        HttpError::Unreachable { target, message } => HttpError::Unreachable {
            target,
            message: r(message),
        },
        HttpError::Tls { target, message } => HttpError::Tls {
            target,
            message: r(message),
        },
        HttpError::Status {
            target,
            status,
            body,
        } => HttpError::Status {
            target,
            status,
            body: r(body),
        },
        HttpError::Garbled { target, message } => HttpError::Garbled {
            target,
            message: r(message),
        },
        e @ HttpError::NotAllowed { .. } => e,
    }
}

/// Run an instant query against the Prometheus at `url` with a client that allows only that
/// URL and trusts the system's CAs: for tools and tests. The operator uses its
/// [`PrometheusClient`], built from the cluster's policy.
pub async fn prometheus_query(
    url: &str,
    query: &str,
    timeout: Duration,
) -> Result<Vec<Series>, HttpError> {
    let u = HttpUrl::parse(url).map_err(|message| HttpError::Garbled {
        target: format!("GET {url}/api/v1/query"),
        message,
    })?;
    let policy = PodPolicy {
        prometheus_url_prefixes: vec![u],
        ..Default::default()
    };
    let client = PrometheusClient::new(&policy).map_err(|e| HttpError::Unreachable {
        target: format!("GET {url}/api/v1/query"),
        message: e.to_string(),
    })?;
    client.query(url, query, timeout).await
}

/// Parse an instant-vector answer of `/api/v1/query`.
pub fn parse_prometheus_vector(body: &[u8]) -> Result<Vec<Series>, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        status: String,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        data: Option<Data>,
    }
    #[derive(serde::Deserialize)]
    struct Data {
        #[serde(rename = "resultType")]
        result_type: String,
        result: Vec<PromSeries>,
    }
    #[derive(serde::Deserialize)]
    struct PromSeries {
        metric: std::collections::BTreeMap<String, String>,
        value: (f64, String),
    }
    let a: Answer =
        serde_json::from_slice(body).map_err(|e| format!("not a Prometheus answer: {e}"))?;
    if a.status != "success" {
        return Err(format!(
            "query failed: {}",
            excerpt(a.error.unwrap_or_else(|| a.status.clone()).as_bytes())
        ));
    }
    let d = a.data.ok_or("answer has no data")?;
    if d.result_type != "vector" {
        return Err(format!(
            "query returns a {}, not an instant vector: sum by (layer, expert) a counter",
            excerpt(d.result_type.as_bytes())
        ));
    }
    d.result
        .into_iter()
        .map(|s| {
            let v: f64 = s
                .value
                .1
                .parse()
                .map_err(|_| format!("sample value {:?}", excerpt(s.value.1.as_bytes())))?;
            Ok((s.metric, v))
        })
        .collect()
}

/// Turn a Prometheus vector of per-expert counters into one sample, as if scraped from one
/// worker that holds every expert. `series` names the labels (our workers' `layer` and `expert`
/// by default) and what the layer label counts; `first_moe_layer` turns a MoE-layer index into
/// the model's layer id.
pub fn sample_from_prometheus(
    series: &[(std::collections::BTreeMap<String, String>, f64)],
    names: &SeriesLabels,
    first_moe_layer: u32,
) -> Result<WorkerSample, String> {
    let mut s = WorkerSample::default();
    for (labels, v) in series {
        // Labels come from the server: only an excerpt of them goes into an error.
        let shown = || excerpt(format!("{labels:?}").as_bytes());
        let get = |k: &str| -> Result<u32, String> {
            labels
                .get(k)
                .ok_or_else(|| {
                    format!(
                        "series {} has no {k} label: sum by ({}, {})",
                        shown(),
                        names.layer,
                        names.expert
                    )
                })?
                .parse()
                .map_err(|_| format!("series {}: {k} is not a number", shown()))
        };
        let layer = get(&names.layer)?;
        let layer = match names.layer_index {
            LayerIndex::ModelLayer => layer,
            LayerIndex::MoELayer => layer
                .checked_add(first_moe_layer)
                .ok_or_else(|| format!("series {}: MoE layer {layer} is out of range", shown()))?,
        };
        *s.tokens.entry((layer, get(&names.expert)?)).or_insert(0.0) += v;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::wire::http::ERROR_EXCERPT_CHARS;
    use crate::worker::wire::testing::{server, test_roots, CA_PEM};

    #[test]
    fn urls_and_prometheus_answers() {
        assert_eq!(encode("sum(x{a=\"b\"})"), "sum%28x%7Ba%3D%22b%22%7D%29");
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"layer":"1","expert":"0"},"value":[1.5,"10"]},
            {"metric":{"layer":"1","expert":"0","pod":"b"},"value":[1.5,"5"]},
            {"metric":{"layer":"1","expert":"3"},"value":[1.5,"2.5"]}]}}"#;
        let v = parse_prometheus_vector(body).unwrap();
        let ours = SeriesLabels::default();
        let s = sample_from_prometheus(&v, &ours, 1).unwrap();
        assert_eq!(s.tokens[&(1, 0)], 15.0);
        assert_eq!(s.tokens[&(1, 3)], 2.5);
        // vLLM's gauge: its own label names, MoE layers counted from 0.
        let vllm = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"layer_idx":"0","logical_expert_id":"2"},"value":[1.5,"4"]},
            {"metric":{"layer_idx":"1","logical_expert_id":"2"},"value":[1.5,"6"]}]}}"#;
        let names = SeriesLabels {
            layer: "layer_idx".into(),
            expert: "logical_expert_id".into(),
            layer_index: LayerIndex::MoELayer,
        };
        let s = sample_from_prometheus(&parse_prometheus_vector(vllm).unwrap(), &names, 3).unwrap();
        assert_eq!(s.tokens[&(3, 2)], 4.0);
        assert_eq!(s.tokens[&(4, 2)], 6.0);
        let err = sample_from_prometheus(&v, &names, 3).unwrap_err();
        assert!(
            err.contains("no layer_idx label: sum by (layer_idx, logical_expert_id)"),
            "{err}"
        );
        let err =
            parse_prometheus_vector(br#"{"status":"error","error":"parse error"}"#).unwrap_err();
        assert!(err.contains("parse error"), "{err}");
        let missing = vec![(
            std::collections::BTreeMap::from([("layer".to_string(), "1".to_string())]),
            1.0,
        )];
        assert!(sample_from_prometheus(&missing, &ours, 0)
            .unwrap_err()
            .contains("expert"));
    }

    const VECTOR: &str = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"layer":"1","expert":"2"},"value":[1.5,"7"]}]}}"#;

    fn ok_answer() -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{VECTOR}",
            VECTOR.len()
        )
        .into_bytes()
    }

    fn client(prefix: &str, ca: bool) -> PrometheusClient {
        let roots = if ca {
            test_roots()
        } else {
            rustls::RootCertStore::empty()
        };
        PrometheusClient::with_roots(roots, vec![HttpUrl::parse(prefix).unwrap()]).unwrap()
    }

    #[tokio::test]
    async fn http_query_with_path_prefix_and_encoded_query() {
        let srv = server(false, ok_answer).await;
        let url = format!("http://127.0.0.1:{}/prom", srv.port);
        let c = client(&url, false);
        let v = c
            .query(&url, "sum by (layer, expert) (x)", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].1, 7.0);
        let seen = srv.requests.lock().unwrap()[0].clone();
        assert_eq!(
            seen.first_line(),
            "GET /prom/api/v1/query?query=sum%20by%20%28layer%2C%20expert%29%20%28x%29 HTTP/1.1"
        );
        assert_eq!(seen.header("accept").as_deref(), Some("application/json"));
        // Chunked answers are read too.
        let chunked = server(false, || {
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{VECTOR}\r\n0\r\n\r\n",
                VECTOR.len()
            )
            .into_bytes()
        })
        .await;
        let url = format!("http://127.0.0.1:{}", chunked.port);
        assert_eq!(
            client(&url, false)
                .query(&url, "q", Duration::from_secs(5))
                .await
                .unwrap()
                .len(),
            1
        );
    }

    /// The old hand-written client refused every https URL at run time ("only http:// URLs are
    /// supported") although validation accepted it.
    #[tokio::test]
    async fn https_query_verifies_the_server_certificate() {
        let srv = server(true, ok_answer).await;
        let url = format!("https://127.0.0.1:{}", srv.port);
        let v = client(&url, true)
            .query(&url, "q", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(v[0].1, 7.0);
        // Without the CA the handshake fails, naming TLS; nothing is read.
        let e = client(&url, false)
            .query(&url, "q", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "TLSFailed");
        assert!(e.to_string().contains("TLS: "), "{e}");
        // --prometheus-ca-file loads the same CA from a file.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, CA_PEM).unwrap();
        let policy = PodPolicy {
            prometheus_url_prefixes: vec![HttpUrl::parse(&url).unwrap()],
            prometheus_ca_file: Some(ca.clone()),
            ..Default::default()
        };
        let v = PrometheusClient::new(&policy)
            .unwrap()
            .query(&url, "q", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(v.len(), 1);
        std::fs::write(&ca, b"not a certificate").unwrap();
        let e = PrometheusClient::new(&policy).unwrap_err();
        assert!(e.to_string().contains("--prometheus-ca-file"), "{e}");
    }

    fn basic(password: &str) -> Access {
        Access {
            auth: Some(Auth::Basic {
                username: "moe".into(),
                password: password.into(),
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn credentials_go_in_the_header_and_never_into_errors() {
        use base64::Engine;
        let srv = server(true, ok_answer).await;
        let url = format!("https://127.0.0.1:{}", srv.port);
        let c = client(&url, true);
        let t = Duration::from_secs(5);
        c.query_with(&url, "q", &basic("s3cret-pw"), t)
            .await
            .unwrap();
        let bearer = Access {
            auth: Some(Auth::Bearer("tok-123456".into())),
            ..Default::default()
        };
        c.query_with(&url, "q", &bearer, t).await.unwrap();
        let seen = srv.requests.lock().unwrap().clone();
        let b64 = base64::engine::general_purpose::STANDARD.encode("moe:s3cret-pw");
        assert_eq!(
            seen[0].header("authorization").as_deref(),
            Some(format!("Basic {b64}").as_str())
        );
        assert_eq!(
            seen[1].header("authorization").as_deref(),
            Some("Bearer tok-123456")
        );
        // A server that echoes the credentials back: the error shows them redacted.
        let echoed = b64.clone();
        let echo = server(true, move || {
            let body = format!("bad user moe:s3cret-pw ({echoed}) tok-123456");
            format!(
                "HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        })
        .await;
        let url = format!("https://127.0.0.1:{}", echo.port);
        let c = client(&url, true);
        for (a, secret) in [
            (basic("s3cret-pw"), "s3cret-pw"),
            (bearer.clone(), "tok-123456"),
        ] {
            let e = c.query_with(&url, "q", &a, t).await.unwrap_err();
            let m = e.to_string();
            assert!(matches!(e, HttpError::Status { status: 401, .. }), "{m}");
            assert!(m.contains("[redacted]") && !m.contains(secret), "{m}");
            if secret == "s3cret-pw" {
                assert!(!m.contains(&b64), "{m}");
            }
        }
        assert!(!format!("{:?}", basic("s3cret-pw")).contains("s3cret"));
    }

    #[tokio::test]
    async fn credentials_are_never_sent_over_plain_http() {
        let srv = server(false, ok_answer).await;
        let url = format!("http://127.0.0.1:{}", srv.port);
        let e = client(&url, false)
            .query_with(&url, "q", &basic("s3cret-pw"), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("plain http"), "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(srv.accepted(), 0);
    }

    #[tokio::test]
    async fn a_deployments_ca_is_trusted_for_its_queries_only() {
        let srv = server(true, ok_answer).await;
        let url = format!("https://127.0.0.1:{}", srv.port);
        let c = client(&url, false);
        let t = Duration::from_secs(5);
        let with_ca = Access::default().with_ca_pem(CA_PEM).unwrap();
        assert_eq!(c.query_with(&url, "q", &with_ca, t).await.unwrap().len(), 1);
        let e = c.query(&url, "q", t).await.unwrap_err();
        assert_eq!(e.reason(), "TLSFailed", "{e}");
        // The same bundle again reuses its client.
        c.query_with(&url, "q", &with_ca, t).await.unwrap();
        assert_eq!(c.ca_clients.lock().unwrap().len(), 1);
        for bad in [&b""[..], b"not a certificate"] {
            let e = Access::default().with_ca_pem(bad).unwrap_err();
            assert!(e.contains("no PEM certificate"), "{e}");
        }
    }

    #[test]
    fn secrets_become_credentials_or_say_what_is_missing() {
        use std::collections::BTreeMap;
        let basic_ref = AuthRef::Basic {
            secret: "prom".into(),
        };
        let bearer_ref = AuthRef::Bearer {
            secret: "prom".into(),
            key: "token".into(),
        };
        let data = |kv: &[(&str, &[u8])]| -> BTreeMap<String, Vec<u8>> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect()
        };
        let e = auth_from_secret(&basic_ref, "ml", None).unwrap_err();
        assert_eq!(
            e,
            "Secret ml/prom not found: create it with the keys username and password"
        );
        let d = data(&[("username", b"moe")]);
        let e = auth_from_secret(&basic_ref, "ml", Some(&d)).unwrap_err();
        assert_eq!(e, "Secret ml/prom has no key \"password\": add it");
        let d = data(&[("username", b"a:b"), ("password", b"pw")]);
        assert!(auth_from_secret(&basic_ref, "ml", Some(&d))
            .unwrap_err()
            .contains("contains ':'"));
        let d = data(&[("token", b"  abc\n")]);
        assert!(matches!(
            auth_from_secret(&bearer_ref, "ml", Some(&d)),
            Ok(Auth::Bearer(t)) if t == "abc"
        ));
        let d = data(&[("token", b"ab\x01cd")]);
        assert!(auth_from_secret(&bearer_ref, "ml", Some(&d))
            .unwrap_err()
            .contains("control characters"));
        let d = data(&[("token", b"\n")]);
        assert!(auth_from_secret(&bearer_ref, "ml", Some(&d))
            .unwrap_err()
            .contains("is empty"));
        let d = data(&[("token", &[0xff, 0xfe])]);
        assert!(auth_from_secret(&bearer_ref, "ml", Some(&d))
            .unwrap_err()
            .contains("not UTF-8"));
    }

    #[tokio::test]
    async fn urls_outside_the_allowlist_are_never_fetched() {
        let srv = server(false, ok_answer).await;
        let allowed = format!("http://127.0.0.1:{}/prom", srv.port);
        let c = client(&allowed, false);
        for url in [
            format!("http://127.0.0.1:{}", srv.port),
            format!("http://127.0.0.1:{}/other", srv.port),
            format!("https://127.0.0.1:{}/prom", srv.port),
            format!("http://localhost:{}/prom", srv.port),
        ] {
            let e = c
                .query(&url, "q", Duration::from_secs(5))
                .await
                .unwrap_err();
            assert_eq!(e.reason(), "NotAllowed", "{url}: {e}");
        }
        let e = c
            .query(
                &format!("http://127.0.0.1:{}/prom/../x", srv.port),
                "q",
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "GarbledResponse", "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(srv.accepted(), 0);
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let elsewhere = server(false, ok_answer).await;
        let port = elsewhere.port;
        let srv = server(false, move || {
            format!("HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/\r\nContent-Length: 0\r\n\r\n")
                .into_bytes()
        })
        .await;
        let url = format!("http://127.0.0.1:{}", srv.port);
        let e = client(&url, false)
            .query(&url, "q", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, HttpError::Status { status: 302, .. }), "{e}");
        assert_eq!(elsewhere.accepted(), 0);
    }

    /// The old client copied 300 characters of any error body, control characters included, into
    /// the MetricsAvailable condition and events.
    #[tokio::test]
    async fn error_bodies_are_cut_to_a_printable_excerpt() {
        let srv = server(false, || {
            let body = format!(
                "{}\x1b[31m\r\nsecret-ish {}",
                "E".repeat(150),
                "x".repeat(20_000)
            );
            format!(
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        })
        .await;
        let url = format!("http://127.0.0.1:{}", srv.port);
        let e = client(&url, false)
            .query(&url, "q", Duration::from_secs(5))
            .await
            .unwrap_err();
        let HttpError::Status { status, body, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(*status, 500);
        assert!(body.chars().all(|c| !c.is_control()), "{body:?}");
        let sent = 150 + "\x1b[31m\r\nsecret-ish ".len() + 20_000;
        assert!(body.ends_with(&format!("... ({sent} bytes)")), "{body}");
        assert!(body.chars().count() <= ERROR_EXCERPT_CHARS + 20, "{body}");
        assert!(e.to_string().len() < 400, "{e}");
        // Prometheus' own error text is cut the same way.
        let long = format!(r#"{{"status":"error","error":"{}"}}"#, "y".repeat(5000));
        let m = parse_prometheus_vector(long.as_bytes()).unwrap_err();
        assert!(m.len() < 300, "{m}");
        assert_eq!(excerpt(b"  short\n\tbody \x00 "), "short body");
    }

    #[tokio::test]
    async fn oversized_and_stalled_answers_end_in_time() {
        // A declared length past the cap is refused before any of it is read.
        let srv = server(false, || {
            b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n{".to_vec()
        })
        .await;
        let url = format!("http://127.0.0.1:{}", srv.port);
        let e = client(&url, false)
            .query(&url, "q", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        // An endless chunked body stops at the cap.
        let srv = server(false, || {
            let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, "a".repeat(1 << 20));
            let mut v = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..(MAX_PROMETHEUS_RESPONSE_BYTES >> 20) + 2 {
                v.extend_from_slice(chunk.as_bytes());
            }
            v
        })
        .await;
        let url = format!("http://127.0.0.1:{}", srv.port);
        let e = client(&url, false)
            .query(&url, "q", Duration::from_secs(20))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        // A server that accepts and never answers: the caller's deadline holds.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..2 {
                if let Ok((s, _)) = listener.accept().await {
                    held.push(s);
                }
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let url = format!("http://127.0.0.1:{port}");
        let started = std::time::Instant::now();
        let e = client(&url, false)
            .query(&url, "q", Duration::from_millis(500))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "Unreachable", "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        hold.abort();
    }
}
