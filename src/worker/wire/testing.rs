//! Test servers for the wire's clients: one-purpose HTTP servers on 127.0.0.1 that answer with
//! fixed bytes (so malformed, oversized and stalled answers can be sent), optionally over TLS with
//! the test certificate in `testdata/tls` (a CA, and a leaf for 127.0.0.1 and localhost that it
//! signed; test-only keys, valid until 2126).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const CA_PEM: &[u8] = include_bytes!("testdata/tls/ca.pem");
const SERVER_PEM: &[u8] = include_bytes!("testdata/tls/server.pem");
const SERVER_KEY: &[u8] = include_bytes!("testdata/tls/server.key");

/// Roots holding only the test CA.
pub fn test_roots() -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(CA_PEM) {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(SERVER_PEM)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(SERVER_KEY).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

/// One request as the server read it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The request head, lines without their CRLF.
    pub head: Vec<String>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn first_line(&self) -> &str {
        self.head.first().map_or("", |l| l.as_str())
    }

    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.iter().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

pub struct TestServer {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
    pub requests: Arc<Mutex<Vec<Seen>>>,
}

impl TestServer {
    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Append what one read gives to `buf`; `None` at EOF, on an error or after 5 s.
async fn read_more<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
        .await
        .ok()?
        .ok()?;
    (n > 0).then(|| buf.extend_from_slice(&chunk[..n]))
}

/// Read one request (head, and a body of its `Content-Length`); `None` at EOF or after 5 s.
async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Option<Seen> {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > 65536 {
            return None;
        }
        read_more(s, &mut buf).await?;
    };
    let head: Vec<String> = String::from_utf8_lossy(&buf[..end])
        .split("\r\n")
        .map(str::to_string)
        .collect();
    let mut seen = Seen {
        head,
        body: buf[end + 4..].to_vec(),
    };
    let len: usize = seen
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while seen.body.len() < len {
        read_more(s, &mut seen.body).await?;
    }
    Some(seen)
}

type Answer = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// For each connection: read one request, record it, write `answer` and then close (or, with
/// `hold`, keep the connection open for 30 s without writing more).
async fn serve_one<S>(mut s: S, answer: Answer, hold: bool, seen: Arc<Mutex<Vec<Seen>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(r) = read_request(&mut s).await else {
        return;
    };
    seen.lock().unwrap().push(r);
    let _ = tokio::time::timeout(Duration::from_secs(10), s.write_all(&answer())).await;
    let _ = s.flush().await;
    if hold {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), s.shutdown()).await;
}

async fn start(tls: bool, hold: bool, answer: Answer) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (a, r) = (accepted.clone(), requests.clone());
    tokio::spawn(async move {
        for _ in 0..8 {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            a.fetch_add(1, Ordering::SeqCst);
            let (answer, r) = (answer.clone(), r.clone());
            tokio::spawn(async move {
                if tls {
                    if let Ok(t) = tls_acceptor().accept(sock).await {
                        serve_one(t, answer, hold, r).await;
                    }
                } else {
                    serve_one(sock, answer, hold, r).await;
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

/// A server answering every request (one per connection) with `answer`'s bytes, then closing.
pub async fn server(tls: bool, answer: impl Fn() -> Vec<u8> + Send + Sync + 'static) -> TestServer {
    start(tls, false, Arc::new(answer)).await
}

/// A server that writes `answer` (a head and part of a body, say) and then holds the connection.
pub async fn stalling_server(answer: &'static [u8]) -> TestServer {
    start(false, true, Arc::new(move || answer.to_vec())).await
}

/// A keep-alive server: on each connection, answers every request with `body` (200) until the
/// client closes.
pub async fn keep_alive_server(body: &'static str) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (a, r) = (accepted.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                while let Some(seen) = read_request(&mut sock).await {
                    r.lock().unwrap().push(seen);
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if sock.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
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

/// A port that refuses connections: a socket bound but never listening holds it, and no other
/// test can take it meanwhile (as it could a port bound and released). Keep the socket.
pub fn refusing_port() -> (tokio::net::TcpSocket, u16) {
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = held.local_addr().unwrap().port();
    (held, port)
}
