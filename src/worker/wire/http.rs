//! The one HTTP client layer of the wire, shared by the [`super::WorkerClient`] and the operator's
//! Prometheus client: hyper-util's pooled client, HTTP/1.1 over TCP or TLS (rustls with the ring
//! provider; the system's CA certificates, plus any the caller adds).
//!
//! Every request has a deadline for all of it (connect, TLS handshake, request, response head
//! and body) and a cap on the body it reads; the TCP connect has its own shorter deadline
//! ([`CONNECT_TIMEOUT`]). The body is read frame by frame and refused as soon as it passes the
//! cap (a declared `Content-Length` past the cap is refused before any of it is read), so no
//! answer makes the caller buffer more than the cap. Redirects are never followed.
//!
//! Connections are kept for reuse: the operator scrapes every worker every reconcile, and a
//! pooled connection saves a TCP (and TLS) handshake each time. An idle connection is dropped
//! after [`POOL_IDLE_TIMEOUT`], before the worker's own idle timeout (60 s) closes it. A request
//! that fails or runs past its deadline closes its connection rather than returning it. Clones
//! of an [`HttpClient`] share one pool.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Longest wait for a TCP connection (the request's own deadline applies too).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an idle pooled connection is kept. Below the worker's HTTP idle timeout (60 s), so
/// the client gives a connection up before the server closes it under a new request.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per host (scheme, host and port).
pub const POOL_MAX_IDLE_PER_HOST: usize = 2;
/// Characters of an error body kept in an error (and so in status and events).
pub const ERROR_EXCERPT_CHARS: usize = 200;
/// The `User-Agent` of every request.
pub const USER_AGENT: &str = "moe-operator";

/// Why a request failed; `reason` is the CamelCase reason for conditions and the metric label.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{target}: {message}")]
    Unreachable { target: String, message: String },
    /// The TLS handshake of an https request failed (the certificate does not verify, the server
    /// speaks no TLS, ...): the server was reached, so this is not `Unreachable`.
    #[error("{target}: TLS: {message}")]
    Tls { target: String, message: String },
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
            HttpError::Tls { .. } => "TLSFailed",
            HttpError::Status { .. } => "HttpError",
            HttpError::Garbled { .. } => "GarbledResponse",
            HttpError::NotAllowed { .. } => "NotAllowed",
        }
    }
}

/// A response read whole: status code and body (at most the request's cap).
#[derive(Debug)]
pub struct Response {
    /// What was asked, for errors: `METHOD scheme://host:port/path` (no query).
    pub target: String,
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// The body of a 2xx answer; any other status is [`HttpError::Status`] with an excerpt of
    /// the body.
    pub fn ok(self) -> Result<Vec<u8>, HttpError> {
        if (200..300).contains(&self.status) {
            Ok(self.body)
        } else {
            Err(HttpError::Status {
                body: excerpt(&self.body),
                target: self.target,
                status: self.status,
            })
        }
    }
}

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

/// The system's CA certificates, read once per process. Unreadable ones are skipped: an https
/// server signed by one of them then fails its handshake, naming the certificate problem.
pub fn native_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
            Arc::new(roots)
        })
        .clone()
}

/// The authority part of a URL for `host` (a name, an IPv4 address, or an IPv6 address with or
/// without brackets) and `port`.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The pooled HTTP/1.1 client over TCP or TLS. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<Client<HttpsConnector<HttpConnector>, Full<Bytes>>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").finish_non_exhaustive()
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A client trusting the system's CA certificates.
    pub fn new() -> Self {
        Self::with_roots((*native_roots()).clone())
            .expect("the ring provider supports the default protocol versions")
    }

    /// A client trusting exactly `roots` for https.
    pub fn with_roots(roots: rustls::RootCertStore) -> Result<Self, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self::with_tls(tls))
    }

    /// A client with its own TLS configuration (e.g. the admin API's verifier,
    /// `worker::admin_tls::client_config`).
    pub fn with_tls(mut tls: rustls::ClientConfig) -> Self {
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut tcp = HttpConnector::new();
        // https URLs reach the TLS layer through this connector too.
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        tcp.set_nodelay(true);
        let connector = HttpsConnector::from((tcp, tls));
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// `GET url` (see [`Self::send`]).
    pub async fn get(
        &self,
        url: &str,
        timeout: Duration,
        max_body_bytes: usize,
    ) -> Result<Response, HttpError> {
        let req = hyper::Request::get(url)
            .body(Full::default())
            .map_err(|e| HttpError::Garbled {
                target: format!("GET {url}"),
                message: format!("building the request: {e}"),
            })?;
        self.send(req, timeout, max_body_bytes).await
    }

    /// Send `req` and read its answer, all within `timeout`, reading at most `max_body_bytes`
    /// of body. Any status is an answer; [`Response::ok`] checks it.
    pub async fn send(
        &self,
        mut req: hyper::Request<Full<Bytes>>,
        timeout: Duration,
        max_body_bytes: usize,
    ) -> Result<Response, HttpError> {
        let u = req.uri();
        let target = format!(
            "{} {}://{}{}",
            req.method(),
            u.scheme_str().unwrap_or("http"),
            u.authority().map_or("", |a| a.as_str()),
            u.path()
        );
        let https = u.scheme_str() == Some("https");
        req.headers_mut()
            .entry(hyper::header::USER_AGENT)
            .or_insert(hyper::header::HeaderValue::from_static(USER_AGENT));
        let run = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| request_error(&target, https, &e))?;
            let status = resp.status().as_u16();
            let declared = resp
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if let Some(n) = declared.filter(|&n| n > max_body_bytes as u64) {
                return Err(HttpError::Garbled {
                    target: target.clone(),
                    message: format!("answer of {n} bytes is larger than {max_body_bytes}"),
                });
            }
            // The buffer grows with what arrives, never by the declared length alone.
            let mut body = resp.into_body();
            let mut out = Vec::with_capacity(declared.unwrap_or(0).min(1 << 20) as usize);
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| body_error(&target, &e))?;
                if let Ok(data) = frame.into_data() {
                    if out.len() + data.len() > max_body_bytes {
                        return Err(HttpError::Garbled {
                            target: target.clone(),
                            message: format!("answer larger than {max_body_bytes} bytes"),
                        });
                    }
                    out.extend_from_slice(&data);
                }
            }
            Ok(Response {
                target: target.clone(),
                status,
                body: out,
            })
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Unreachable {
                target: target.clone(),
                message: format!("no answer within {timeout:?}"),
            }),
        }
    }
}

/// A response whose body is still to be read, frame by frame ([`HttpClient::open`]).
pub struct Streaming {
    /// As in [`Response::target`].
    pub target: String,
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: hyper::body::Incoming,
}

impl Streaming {
    /// The next chunk of the body (None at its end), or an error when nothing came within
    /// `idle` or the body broke off.
    pub async fn chunk(&mut self, idle: Duration) -> Result<Option<Bytes>, HttpError> {
        loop {
            let frame = match tokio::time::timeout(idle, self.body.frame()).await {
                Err(_) => {
                    return Err(HttpError::Unreachable {
                        target: self.target.clone(),
                        message: format!("reading the body: nothing received for {idle:?}"),
                    })
                }
                Ok(None) => return Ok(None),
                Ok(Some(f)) => f.map_err(|e| body_error(&self.target, &e))?,
            };
            if let Ok(data) = frame.into_data() {
                return Ok(Some(data));
            }
        }
    }

    /// The whole body of an answer, at most `max` bytes (error bodies, listings).
    pub async fn read_all(mut self, idle: Duration, max: usize) -> Result<Vec<u8>, HttpError> {
        let mut out = Vec::new();
        while let Some(d) = self.chunk(idle).await? {
            if out.len() + d.len() > max {
                return Err(HttpError::Garbled {
                    target: self.target.clone(),
                    message: format!("answer larger than {max} bytes"),
                });
            }
            out.extend_from_slice(&d);
        }
        Ok(out)
    }
}

impl HttpClient {
    /// Send `req` and return the answer's head within `head_timeout`; the body is the caller's
    /// to read ([`Streaming::chunk`], each chunk with its own idle deadline), for downloads too
    /// large to hold or to finish within one deadline.
    pub async fn open(
        &self,
        mut req: hyper::Request<Full<Bytes>>,
        head_timeout: Duration,
    ) -> Result<Streaming, HttpError> {
        let u = req.uri();
        let target = format!(
            "{} {}://{}{}",
            req.method(),
            u.scheme_str().unwrap_or("http"),
            u.authority().map_or("", |a| a.as_str()),
            u.path()
        );
        let https = u.scheme_str() == Some("https");
        req.headers_mut()
            .entry(hyper::header::USER_AGENT)
            .or_insert(hyper::header::HeaderValue::from_static(USER_AGENT));
        match tokio::time::timeout(head_timeout, self.inner.request(req)).await {
            Err(_) => Err(HttpError::Unreachable {
                target,
                message: format!("no answer within {head_timeout:?}"),
            }),
            Ok(Err(e)) => Err(request_error(&target, https, &e)),
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                let (parts, body) = resp.into_parts();
                Ok(Streaming {
                    target,
                    status,
                    headers: parts.headers,
                    body,
                })
            }
        }
    }
}

/// The messages of `e` and its sources, each once.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

/// Whether `e` or an error under it (io errors included) is a TLS error.
fn is_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.is::<rustls::Error>() {
        return true;
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        if is_tls(inner) {
            return true;
        }
    }
    e.source().is_some_and(is_tls)
}

/// The hyper error under `e`, if any.
fn hyper_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a hyper::Error> {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if let Some(h) = x.downcast_ref::<hyper::Error>() {
            return Some(h);
        }
        cur = x.source();
    }
    None
}

/// An answer that is not HTTP, or ends before it is whole: a parse error, or a body that is cut
/// short or badly framed (hyper reports those as io errors of these kinds).
fn garbled(e: &(dyn std::error::Error + 'static)) -> bool {
    if hyper_error(e)
        .is_some_and(|h| h.is_parse() || h.is_parse_status() || h.is_incomplete_message())
    {
        return true;
    }
    let mut cur = Some(e);
    while let Some(x) = cur {
        if let Some(io) = x.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{InvalidData, InvalidInput, UnexpectedEof};
            return matches!(io.kind(), UnexpectedEof | InvalidData | InvalidInput);
        }
        cur = x.source();
    }
    false
}

fn request_error(target: &str, https: bool, e: &hyper_util::client::legacy::Error) -> HttpError {
    // The client's own message ("client error (Connect)") says less than its sources.
    let detail = std::error::Error::source(e).map_or_else(|| e.to_string(), chain);
    let target = target.to_string();
    if e.is_connect() {
        if https && is_tls(e) {
            return HttpError::Tls {
                target,
                message: detail,
            };
        }
        return HttpError::Unreachable {
            target,
            message: format!("connect: {detail}"),
        };
    }
    let message = format!("response: {detail}");
    if garbled(e) {
        HttpError::Garbled { target, message }
    } else {
        HttpError::Unreachable { target, message }
    }
}

fn body_error(target: &str, e: &hyper::Error) -> HttpError {
    let target = target.to_string();
    let message = format!("reading the body: {}", chain(e));
    if garbled(e) {
        HttpError::Garbled { target, message }
    } else {
        HttpError::Unreachable { target, message }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{self, server, TestServer};
    use super::*;

    fn get(url: &str) -> hyper::Request<Full<Bytes>> {
        hyper::Request::get(url).body(Full::default()).unwrap()
    }

    fn url(srv: &TestServer, https: bool, path: &str) -> String {
        let scheme = if https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", srv.port)
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn authorities_bracket_ipv6() {
        assert_eq!(authority("10.0.0.7", 9401), "10.0.0.7:9401");
        assert_eq!(authority("fd00::7", 9401), "[fd00::7]:9401");
        assert_eq!(authority("[fd00::7]", 9401), "[fd00::7]:9401");
        assert_eq!(authority("w-0.ns.svc", 80), "w-0.ns.svc:80");
    }

    #[tokio::test]
    async fn bodies_by_length_chunked_and_close() {
        let c = HttpClient::with_roots(rustls::RootCertStore::empty()).unwrap();
        for answer in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello",
        ] {
            let srv = server(false, move || answer.as_bytes().to_vec()).await;
            let r = c
                .send(get(&url(&srv, false, "/x")), 5 * SECOND, 1024)
                .await
                .unwrap();
            assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]), "{answer}");
            assert_eq!(r.target, format!("GET {}", url(&srv, false, "/x")));
            let line = srv.requests.lock().unwrap()[0].clone();
            assert_eq!(line.first_line(), "GET /x HTTP/1.1");
            assert_eq!(
                line.header("user-agent").as_deref(),
                Some(USER_AGENT),
                "{line:?}"
            );
            assert_eq!(
                line.header("host"),
                Some(format!("127.0.0.1:{}", srv.port))
            );
        }
    }

    #[tokio::test]
    async fn statuses_other_than_2xx_are_errors_with_a_printable_excerpt() {
        let srv = server(false, || {
            let body = format!("{}\x1b[31m\r\nmore {}", "E".repeat(150), "x".repeat(20_000));
            format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        })
        .await;
        let r = HttpClient::new()
            .send(get(&url(&srv, false, "/readyz")), 5 * SECOND, 1 << 20)
            .await
            .unwrap();
        assert_eq!(r.status, 503, "an answer, whatever its status");
        let e = r.ok().unwrap_err();
        let HttpError::Status { status, body, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!((*status, e.reason()), (503, "HttpError"));
        assert!(body.chars().all(|c| !c.is_control()), "{body:?}");
        assert!(body.ends_with("bytes)"), "{body}");
        assert!(body.chars().count() <= ERROR_EXCERPT_CHARS + 20, "{body}");
        assert!(e.to_string().contains("/readyz: HTTP 503"), "{e}");
        assert_eq!(excerpt(b"  short\n\tbody \x00 "), "short body");
        // Redirects are answers, not followed.
        let srv = server(false, || {
            b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/\r\nContent-Length: 0\r\n\r\n"
                .to_vec()
        })
        .await;
        let r = HttpClient::new()
            .send(get(&url(&srv, false, "/")), 5 * SECOND, 1024)
            .await
            .unwrap();
        assert_eq!(r.status, 302);
    }

    #[tokio::test]
    async fn answers_past_the_cap_are_refused_while_reading() {
        let c = HttpClient::new();
        // A declared length past the cap is refused before any of it is read.
        let srv = server(false, || {
            b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n{".to_vec()
        })
        .await;
        let e = c
            .send(get(&url(&srv, false, "/")), 5 * SECOND, 1 << 20)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "GarbledResponse", "{e}");
        assert!(e.to_string().contains("larger than 1048576"), "{e}");
        // An endless chunked body stops at the cap, not at the end of what the server sends.
        let srv = server(false, || {
            let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, "a".repeat(64 << 10));
            let mut v = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..64 {
                v.extend_from_slice(chunk.as_bytes());
            }
            v
        })
        .await;
        let e = c
            .send(get(&url(&srv, false, "/")), 10 * SECOND, 1 << 20)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("larger than 1048576 bytes"), "{e}");
        // A body just at the cap is read.
        let srv = server(false, || {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n{}",
                "b".repeat(1024)
            )
            .into_bytes()
        })
        .await;
        let r = c
            .send(get(&url(&srv, false, "/")), 5 * SECOND, 1024)
            .await
            .unwrap();
        assert_eq!(r.body.len(), 1024);
    }

    #[tokio::test]
    async fn garbled_and_truncated_answers_are_garbled() {
        let c = HttpClient::new();
        for answer in [
            &b"<html>not http</html>\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n",
        ] {
            let srv = server(false, move || answer.to_vec()).await;
            let e = c
                .send(get(&url(&srv, false, "/")), 5 * SECOND, 1024)
                .await
                .unwrap_err();
            assert_eq!(
                e.reason(),
                "GarbledResponse",
                "{}: {e}",
                String::from_utf8_lossy(answer)
            );
            assert!(e.to_string().starts_with("GET http://127.0.0.1:"), "{e}");
        }
    }

    #[tokio::test]
    async fn refused_and_silent_servers_are_unreachable_in_time() {
        let c = HttpClient::new();
        let (held, port) = testing::refusing_port();
        let e = c
            .send(get(&format!("http://127.0.0.1:{port}/")), 2 * SECOND, 1024)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "Unreachable", "{e}");
        assert!(e.to_string().contains("connect"), "{e}");
        drop(held);
        // A server that accepts and never answers: the request's deadline holds.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let started = std::time::Instant::now();
        let e = c
            .send(
                get(&format!("http://127.0.0.1:{port}/metrics")),
                Duration::from_millis(300),
                1024,
            )
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "Unreachable", "{e}");
        assert!(e.to_string().contains("no answer within 300ms"), "{e}");
        assert!(started.elapsed() < 2 * SECOND, "{:?}", started.elapsed());
        // A server that sends the head and then stalls in the body: the same deadline.
        let srv =
            testing::stalling_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab").await;
        let started = std::time::Instant::now();
        let e = c
            .send(
                get(&url(&srv, false, "/")),
                Duration::from_millis(300),
                1024,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no answer within"), "{e}");
        assert!(started.elapsed() < 2 * SECOND, "{:?}", started.elapsed());
        hold.abort();
    }

    #[tokio::test]
    async fn connections_are_reused() {
        let srv = testing::keep_alive_server("ok").await;
        let c = HttpClient::new();
        for _ in 0..5 {
            let r = c
                .send(get(&url(&srv, false, "/metrics")), 5 * SECOND, 1024)
                .await
                .unwrap();
            assert_eq!(r.body, b"ok");
        }
        assert_eq!(srv.accepted(), 1, "one connection for five requests");
        // A clone shares the pool.
        let r = c
            .clone()
            .send(get(&url(&srv, false, "/metrics")), 5 * SECOND, 1024)
            .await
            .unwrap();
        assert_eq!((r.status, srv.accepted()), (200, 1));
        assert_eq!(srv.requests.lock().unwrap().len(), 6);
    }

    #[tokio::test]
    async fn https_verifies_the_server_certificate() {
        let srv = server(true, || {
            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecure".to_vec()
        })
        .await;
        let r = HttpClient::with_roots(testing::test_roots())
            .unwrap()
            .send(get(&url(&srv, true, "/q")), 5 * SECOND, 1024)
            .await
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"secure"[..]));
        assert_eq!(
            srv.requests.lock().unwrap()[0].first_line(),
            "GET /q HTTP/1.1"
        );
        // Without the CA the handshake fails, naming TLS and the certificate.
        let e = HttpClient::new()
            .send(get(&url(&srv, true, "/q")), 5 * SECOND, 1024)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "TLSFailed");
        assert!(matches!(e, HttpError::Tls { .. }), "{e}");
        assert!(e.to_string().contains(": TLS: "), "{e}");
        assert!(e.to_string().contains("certificate"), "{e}");
    }
}
