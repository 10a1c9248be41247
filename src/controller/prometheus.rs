//! The operator's Prometheus client: `/api/v1/query` instant queries, for deployments whose load
//! comes from Prometheus (`spec.metrics.source: Prometheus`). It runs over the wire's HTTP layer
//! ([`crate::worker::wire::http`]: pooled hyper client, http or https with rustls, deadlines,
//! a size cap), and fetches only URLs under the policy's `--allowed-prometheus-url-prefix`.

use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;

use crate::api::pod_policy::{HttpUrl, PodPolicy};
use crate::worker::wire::http::native_roots;
use crate::worker::wire::{
    excerpt, HttpClient, HttpError, WorkerSample, EXPERT_LABEL, LAYER_LABEL,
};

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

/// The operator's Prometheus client: the system's CA certificates plus `--prometheus-ca-file`
/// for https, no redirects followed, an answer of at most [`MAX_PROMETHEUS_RESPONSE_BYTES`], and
/// only URLs under the policy's `--allowed-prometheus-url-prefix` (checked again here, so a spec
/// that skipped `validate` still cannot make the operator fetch anything else).
#[derive(Clone)]
pub struct PrometheusClient {
    http: HttpClient,
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
        use rustls::pki_types::CertificateDer;
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
        let http =
            HttpClient::with_roots(roots).map_err(|e| PrometheusSetupError::Tls(e.to_string()))?;
        Ok(Self { http, allowed })
    }

    /// The HTTP client under this one, to share its pool (and its trust) with other clients.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// Run an instant query; returns `(labels, value)` per series.
    pub async fn query(
        &self,
        url: &str,
        query: &str,
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
        let req = hyper::Request::get(format!("{u}/api/v1/query?query={}", encode(query)))
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::<Bytes>::default())
            .map_err(|e| garbled(format!("request: {e}")))?;
        let r = self
            .http
            .send(req, timeout, MAX_PROMETHEUS_RESPONSE_BYTES)
            .await?;
        let target = r.target.clone();
        let body = r.ok()?;
        parse_prometheus_vector(&body).map_err(|message| HttpError::Garbled { target, message })
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

/// Turn a Prometheus vector of `{layer, expert}` counters into one sample, as if scraped from
/// one worker that holds every expert.
pub fn sample_from_prometheus(
    series: &[(std::collections::BTreeMap<String, String>, f64)],
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
                        "series {} has no {k} label: sum by (layer, expert)",
                        shown()
                    )
                })?
                .parse()
                .map_err(|_| format!("series {}: {k} is not a number", shown()))
        };
        *s.tokens
            .entry((get(LAYER_LABEL)?, get(EXPERT_LABEL)?))
            .or_insert(0.0) += v;
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
        let s = sample_from_prometheus(&v).unwrap();
        assert_eq!(s.tokens[&(1, 0)], 15.0);
        assert_eq!(s.tokens[&(1, 3)], 2.5);
        let err =
            parse_prometheus_vector(br#"{"status":"error","error":"parse error"}"#).unwrap_err();
        assert!(err.contains("parse error"), "{err}");
        let missing = vec![(
            std::collections::BTreeMap::from([("layer".to_string(), "1".to_string())]),
            1.0,
        )];
        assert!(sample_from_prometheus(&missing)
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
        assert_eq!(e.reason(), "Unreachable");
        assert!(e.to_string().contains("TLS"), "{e}");
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
