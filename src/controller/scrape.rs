//! The operator's HTTP/1.1 client for the workers: `GET /metrics` (load and plan hash) and
//! `PUT /v1/plan` (in-place rollout), and Prometheus' `/api/v1/query`. Workers and Prometheus are
//! plain HTTP inside the cluster, so a small client over a TCP stream does; each request uses its
//! own connection (`Connection: close`) and a deadline.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::api::pod_policy::{HttpUrl, PodPolicy};
use crate::worker::wire::{parse_worker_metrics, WorkerSample};

/// One series of a Prometheus instant vector: its labels and value.
pub type Series = (std::collections::BTreeMap<String, String>, f64);

/// Largest response read (a worker's `/metrics` with many experts is well below this).
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Why a request failed; `reason` is the CamelCase reason for conditions and the metric label.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{target}: {message}")]
    Unreachable { target: String, message: String },
    #[error("{target}: HTTP {status}: {body}")]
    Status {
        target: String,
        status: u16,
        body: String,
    },
    #[error("{target}: {message}")]
    Garbled { target: String, message: String },
    #[error("{target}: not under an --allowed-prometheus-url-prefix of this operator")]
    NotAllowed { target: String },
}

impl HttpError {
    pub fn reason(&self) -> &'static str {
        match self {
            HttpError::Unreachable { .. } => "Unreachable",
            HttpError::Status { .. } => "HttpError",
            HttpError::Garbled { .. } => "GarbledResponse",
            HttpError::NotAllowed { .. } => "NotAllowed",
        }
    }
}

/// A response: status code and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One request to `host:port` (`host` may be an IP or a name). `headers` are extra header lines.
pub async fn request(
    method: &str,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Response, HttpError> {
    let target = format!("{method} http://{host}:{port}{path}");
    let unreachable = |message: String| HttpError::Unreachable {
        target: target.clone(),
        message,
    };
    let run = async {
        let mut stream = TcpStream::connect((host, port))
            .await
            .map_err(|e| unreachable(format!("connect: {e}")))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| unreachable(format!("write: {e}")))?;
        stream
            .write_all(body)
            .await
            .map_err(|e| unreachable(format!("write: {e}")))?;
        let mut raw = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE_BYTES as u64 + 1)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| unreachable(format!("read: {e}")))?;
        Ok(raw)
    };
    let raw = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout:?}")))??;
    parse_response(&raw).map_err(|message| HttpError::Garbled { target, message })
}

/// Parse an HTTP/1.1 response read to EOF (content-length, chunked or close-delimited body).
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    if raw.len() > MAX_RESPONSE_BYTES {
        return Err(format!("response larger than {MAX_RESPONSE_BYTES} bytes"));
    }
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of the response head")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = Some(v.parse::<usize>().map_err(|_| "bad content-length")?);
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or("body shorter than content-length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(rest.get(..size).ok_or("truncated chunk")?);
        rest = rest.get(size + 2..).ok_or("truncated chunk")?;
    }
}

fn ok_body(target: String, r: Response) -> Result<Vec<u8>, HttpError> {
    if (200..300).contains(&r.status) {
        Ok(r.body)
    } else {
        Err(HttpError::Status {
            target,
            status: r.status,
            body: excerpt(&r.body),
        })
    }
}

/// Scrape one worker's `/metrics`.
pub async fn scrape_worker(
    ip: &str,
    port: u16,
    timeout: Duration,
) -> Result<WorkerSample, HttpError> {
    let target = format!("GET http://{ip}:{port}/metrics");
    let r = request("GET", ip, port, "/metrics", &[], &[], timeout).await?;
    let body = ok_body(target.clone(), r)?;
    let text = String::from_utf8(body).map_err(|_| HttpError::Garbled {
        target: target.clone(),
        message: "body is not UTF-8".into(),
    })?;
    parse_worker_metrics(&text).map_err(|e| HttpError::Garbled {
        target,
        message: e.to_string(),
    })
}

/// Push a plan (its JSON) to one worker's admin API.
pub async fn put_plan(
    ip: &str,
    port: u16,
    token: &str,
    plan_json: &[u8],
    timeout: Duration,
) -> Result<(), HttpError> {
    let auth = format!("Bearer {token}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let target = format!("PUT http://{ip}:{port}/v1/plan");
    let r = request("PUT", ip, port, "/v1/plan", &headers, plan_json, timeout).await?;
    ok_body(target, r).map(|_| ())
}

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
/// Longest wait for the TCP connection (the whole exchange has the caller's deadline too).
pub const PROMETHEUS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for any one read of the answer once the connection is up.
pub const PROMETHEUS_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Characters of an error body kept in an error (and so in status and events).
pub const ERROR_EXCERPT_CHARS: usize = 200;

/// A short, printable excerpt of a body for an error message: at most [`ERROR_EXCERPT_CHARS`]
/// characters, control characters and runs of whitespace folded to one space, and the full size
/// named when cut. Bodies come from whatever answered, so they never go into status whole.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    let mut n = 0;
    let mut space = false;
    for c in text.chars() {
        if n == ERROR_EXCERPT_CHARS {
            out.push_str(&format!("... ({} bytes)", body.len()));
            return out;
        }
        if c.is_whitespace() || c.is_control() {
            if !space && n > 0 {
                out.push(' ');
                n += 1;
            }
            space = true;
        } else {
            out.push(c);
            n += 1;
            space = false;
        }
    }
    out.trim_end().to_string()
}

/// Why the Prometheus client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusSetupError {
    #[error("--prometheus-ca-file {path}: {message}: give a PEM file of CA certificates")]
    CaFile { path: String, message: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// The operator's Prometheus client: HTTP/1.1 over TCP or TLS (rustls, the system's CA
/// certificates plus `--prometheus-ca-file`), one connection per query, connect and read
/// timeouts, a size cap on the answer, no redirects followed, and only URLs under the policy's
/// `--allowed-prometheus-url-prefix` (checked again here, so a spec that skipped `validate`
/// still cannot make the operator fetch anything else).
#[derive(Clone)]
pub struct PrometheusClient {
    tls: std::sync::Arc<rustls::ClientConfig>,
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
        let mut roots = rustls::RootCertStore::empty();
        // Unreadable system certificates are skipped: an https Prometheus signed by one of them
        // then fails its handshake, naming the certificate problem, and --prometheus-ca-file helps.
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
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
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PrometheusSetupError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: std::sync::Arc::new(cfg),
            allowed,
        })
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
        let path = format!("{}/api/v1/query?query={}", u.path(), encode(query));
        let r = self.get(&u, &path, &target, timeout).await?;
        let body = ok_body(target.clone(), r)?;
        parse_prometheus_vector(&body).map_err(garbled)
    }

    /// One GET on its own connection, all of it within `timeout`.
    async fn get(
        &self,
        u: &HttpUrl,
        path: &str,
        target: &str,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let unreachable = |message: String| HttpError::Unreachable {
            target: target.to_string(),
            message,
        };
        let run = async {
            let tcp = tokio::time::timeout(
                PROMETHEUS_CONNECT_TIMEOUT.min(timeout),
                TcpStream::connect((u.connect_host(), u.port)),
            )
            .await
            .map_err(|_| unreachable("connect: timed out".into()))?
            .map_err(|e| unreachable(format!("connect: {e}")))?;
            let authority = if (u.https && u.port == 443) || (!u.https && u.port == 80) {
                u.host.clone()
            } else {
                format!("{}:{}", u.host, u.port)
            };
            if u.https {
                let name = rustls::pki_types::ServerName::try_from(u.connect_host().to_string())
                    .map_err(|e| unreachable(format!("TLS server name: {e}")))?;
                let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| unreachable(format!("TLS: {e}")))?;
                exchange(tls, &authority, path, target).await
            } else {
                exchange(tcp, &authority, path, target).await
            }
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
    }
}

/// GET `path` over `io` with hyper's HTTP/1.1 client; the body is read frame by frame, each within
/// [`PROMETHEUS_READ_TIMEOUT`], up to [`MAX_PROMETHEUS_RESPONSE_BYTES`].
async fn exchange<IO>(
    io: IO,
    authority: &str,
    path: &str,
    target: &str,
) -> Result<Response, HttpError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let unreachable = |message: String| HttpError::Unreachable {
        target: target.to_string(),
        message,
    };
    let garbled = |message: String| HttpError::Garbled {
        target: target.to_string(),
        message,
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| unreachable(format!("HTTP handshake: {e}")))?;
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::USER_AGENT, "moe-operator")
        .header(hyper::header::CONNECTION, "close")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| garbled(format!("request: {e}")))?;
    let work = async {
        let resp = tokio::time::timeout(PROMETHEUS_READ_TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no response head within {PROMETHEUS_READ_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| unreachable(format!("request: {e}")))?;
        let status = resp.status().as_u16();
        let declared = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_PROMETHEUS_RESPONSE_BYTES as u64) {
            return Err(garbled(format!(
                "answer of {} bytes is larger than {MAX_PROMETHEUS_RESPONSE_BYTES}: narrow the query",
                declared.unwrap_or_default()
            )));
        }
        let mut body = resp.into_body();
        let mut out = Vec::new();
        loop {
            let frame = tokio::time::timeout(PROMETHEUS_READ_TIMEOUT, body.frame())
                .await
                .map_err(|_| {
                    unreachable(format!("answer stalled for {PROMETHEUS_READ_TIMEOUT:?}"))
                })?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| unreachable(format!("read: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > MAX_PROMETHEUS_RESPONSE_BYTES {
                    return Err(garbled(format!(
                        "answer larger than {MAX_PROMETHEUS_RESPONSE_BYTES} bytes: narrow the query"
                    )));
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(Response { status, body: out })
    };
    // Drive the connection in this task (not a spawned one), so that a deadline that drops this
    // future closes the connection too.
    let mut conn = std::pin::pin!(conn);
    let mut work = std::pin::pin!(work);
    let mut conn_done = false;
    loop {
        tokio::select! {
            r = &mut work => return r,
            c = &mut conn, if !conn_done => {
                conn_done = true;
                if let Err(e) = c {
                    return Err(unreachable(format!("connection: {e}")));
                }
            }
        }
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
            .entry((get("layer")?, get("expert")?))
            .or_insert(0.0) += v;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_chunked_and_close_delimited_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (503, &b"abcde"[..]));
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\nall of it").unwrap();
        assert_eq!(r.body, b"all of it");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nab").is_err());
    }

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

    #[tokio::test]
    async fn refused_connection_is_unreachable() {
        // A socket bound but never listening holds a port that refuses connections, and no
        // other test can take it meanwhile (as it could a port bound and released).
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = held.local_addr().unwrap().port();
        let e = scrape_worker("127.0.0.1", port, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "Unreachable");
    }

    /// A one-purpose HTTP server on 127.0.0.1: for each connection (at most `max_conns`) it reads
    /// the request head, records its first line and writes `answer`; optionally over TLS with the
    /// test certificate in testdata/prometheus-tls (a CA and a leaf for 127.0.0.1, test-only keys).
    struct TestServer {
        port: u16,
        accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }

    const CA_PEM: &[u8] = include_bytes!("testdata/prometheus-tls/ca.pem");
    const SERVER_PEM: &[u8] = include_bytes!("testdata/prometheus-tls/server.pem");
    const SERVER_KEY: &[u8] = include_bytes!("testdata/prometheus-tls/server.key");

    fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(SERVER_PEM)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(SERVER_KEY).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg))
    }

    async fn serve<S>(
        mut s: S,
        answer: std::sync::Arc<dyn Fn() -> Vec<u8> + Send + Sync>,
    ) -> Option<String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.write_all(&answer())).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), s.shutdown()).await;
        Some(line)
    }

    async fn server(tls: bool, answer: impl Fn() -> Vec<u8> + Send + Sync + 'static) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let answer: std::sync::Arc<dyn Fn() -> Vec<u8> + Send + Sync> = std::sync::Arc::new(answer);
        let (a, r) = (accepted.clone(), requests.clone());
        tokio::spawn(async move {
            for _ in 0..8 {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (answer, r) = (answer.clone(), r.clone());
                tokio::spawn(async move {
                    let line = if tls {
                        match tls_acceptor().accept(sock).await {
                            Ok(t) => serve(t, answer).await,
                            Err(_) => None,
                        }
                    } else {
                        serve(sock, answer).await
                    };
                    if let Some(l) = line {
                        r.lock().unwrap().push(l);
                    }
                });
            }
        });
        TestServer {
            port,
            accepted,
            requests,
        }
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
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        if ca {
            for c in rustls::pki_types::CertificateDer::pem_slice_iter(CA_PEM) {
                roots.add(c.unwrap()).unwrap();
            }
        }
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
        assert_eq!(
            srv.requests.lock().unwrap()[0],
            "GET /prom/api/v1/query?query=sum%20by%20%28layer%2C%20expert%29%20%28x%29 HTTP/1.1"
        );
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
        assert_eq!(srv.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
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
        assert_eq!(
            elsewhere.accepted.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
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
