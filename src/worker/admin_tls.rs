//! TLS for the worker's admin API (`--admin-tls-cert`, `--admin-tls-key`): the operator's plan
//! pushes and their bearer token travel encrypted, to a server whose certificate the operator's
//! CA signed. The certificate follows its files: they are a mounted Secret, which the kubelet
//! replaces when the operator re-issues it, and the next handshake after a change (looked at most
//! every `recheck`) uses the new pair, without a restart. A pair that cannot be read or does not
//! match keeps the last good one (logged once). The metrics port stays plain HTTP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::mpsc;

use super::http::{TimedIo, TimedListener};

/// Longest TLS handshake a client gets before its connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate and key read from PEM files.
pub fn load_pair(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    use anyhow::Context;
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the certificate {}", cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate in it",
        cert.display()
    );
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key {}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .with_context(|| format!("{}: not a usable private key", key.display()))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match()
        .with_context(|| format!("{} and {} are not a pair", cert.display(), key.display()))?;
    Ok(ck)
}

fn stamp(p: &Path) -> Option<(u64, Option<SystemTime>, u64)> {
    let m = std::fs::metadata(p).ok()?;
    #[cfg(unix)]
    let ino = {
        use std::os::unix::fs::MetadataExt;
        m.ino()
    };
    #[cfg(not(unix))]
    let ino = 0;
    Some((m.len(), m.modified().ok(), ino))
}

type Stamps = (
    Option<(u64, Option<SystemTime>, u64)>,
    Option<(u64, Option<SystemTime>, u64)>,
);

/// The server certificate, reloaded from its files when they change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    recheck: Duration,
    current: ArcSwap<CertifiedKey>,
    state: Mutex<(Stamps, Instant, Option<String>)>,
}

impl ReloadingCert {
    pub fn new(cert: &Path, key: &Path, recheck: Duration) -> anyhow::Result<Self> {
        let ck = load_pair(cert, key)?;
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            recheck,
            current: ArcSwap::from_pointee(ck),
            state: Mutex::new(((stamp(cert), stamp(key)), Instant::now(), None)),
        })
    }

    /// Reload when the files changed since the last look (at most every `recheck`).
    pub fn refresh(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.1.elapsed() < self.recheck {
            return;
        }
        st.1 = Instant::now();
        let now = (stamp(&self.cert), stamp(&self.key));
        if now == st.0 {
            return;
        }
        match load_pair(&self.cert, &self.key) {
            Ok(ck) => {
                self.current.store(Arc::new(ck));
                st.0 = now;
                st.2 = None;
                tracing::info!(cert = %self.cert.display(), "admin TLS certificate reloaded");
            }
            Err(e) => {
                // The kubelet swaps both files at once; a half-written pair is retried.
                let m = format!("{e:#}");
                if st.2.as_deref() != Some(m.as_str()) {
                    tracing::warn!(error = %m, "admin TLS certificate not reloaded; keeping the last good one");
                    st.2 = Some(m);
                }
            }
        }
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.refresh();
        Some(self.current())
    }
}

/// The server config of the admin listener: TLS 1.2/1.3, HTTP/1.1, the reloading certificate.
pub fn server_config(cert: Arc<ReloadingCert>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A listener of TLS connections over [`TimedListener`]'s: handshakes run in their own tasks
/// (at most [`HANDSHAKE_TIMEOUT`] each), so a slow client never holds up the others.
pub struct TlsListener {
    rx: mpsc::Receiver<(tokio_rustls::server::TlsStream<TimedIo>, SocketAddr)>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsListener {
    pub fn new(mut inner: TimedListener, cfg: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        use axum::serve::Listener as _;
        let addr = inner.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let task = tokio::spawn(async move {
            loop {
                let (io, peer) = inner.accept().await;
                let (tx, acceptor) = (tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "admin TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "admin TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { rx, addr, task })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TimedIo>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Verifies a worker's certificate against the operator's CA for one name, whatever address was
/// dialled: the operator pushes to pod IPs, and one certificate per deployment names its headless
/// Service (`<svc>.<namespace>.svc`) rather than every pod's IP.
#[derive(Debug)]
pub struct NamedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: rustls::pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client config of plan pushes: certificates must chain to `ca_pem` and name `name`.
pub fn client_config(ca_pem: &[u8], name: &str) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "the CA bundle holds no certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let name = rustls::pki_types::ServerName::try_from(name.to_string())?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NamedVerifier { inner, name }))
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    use crate::controller::admin_pki::{issue, new_ca, Pem};
    use crate::worker::http::{serve_http, HttpConfig};
    use crate::worker::wire::{HttpError, WorkerClient};

    fn write(dir: &Path, leaf: &Pem) {
        // As the kubelet updates a Secret volume: new files renamed over the old ones.
        let tmp = dir.join("..new");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("tls.crt"), &leaf.cert).unwrap();
        std::fs::write(tmp.join("tls.key"), &leaf.key).unwrap();
        std::fs::rename(tmp.join("tls.crt"), dir.join("tls.crt")).unwrap();
        std::fs::rename(tmp.join("tls.key"), dir.join("tls.key")).unwrap();
    }

    async fn push(ca: &Pem, name: &str, port: u16) -> Result<(), HttpError> {
        // A fresh client each time: a pooled connection keeps the certificate it shook hands with.
        let c = WorkerClient::with_admin_tls(client_config(ca.cert.as_bytes(), name).unwrap());
        c.put_plan("127.0.0.1", port, "tok", b"{}", Duration::from_secs(5))
            .await
    }

    #[tokio::test]
    async fn plan_pushes_go_over_tls_to_the_ca_and_name_and_follow_a_rotation() {
        // The handshake checks validity against the real clock.
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        let name = "tiny-workers.ml.svc".to_string();
        let (ca1, ca2) = (
            new_ca("ca one", now).unwrap(),
            new_ca("ca two", now).unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            &issue(&ca1, std::slice::from_ref(&name), now).unwrap(),
        );
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let cert = Arc::new(ReloadingCert::new(&c, &k, Duration::ZERO).unwrap());
        let cfg = HttpConfig {
            admin_tls: Some(server_config(cert).unwrap()),
            ..Default::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let router = axum::Router::new().route(
            crate::worker::wire::PLAN_PATH,
            axum::routing::put(|| async { "ok" }),
        );
        let (_stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move { serve_http(listener, router, &cfg, rx, "admin").await });

        push(&ca1, &name, port).await.unwrap();
        // Another CA, another name: refused in the handshake, the cause named.
        let e = push(&ca2, &name, port).await.unwrap_err();
        assert!(
            matches!(e, HttpError::Tls { .. }) && e.to_string().contains("UnknownIssuer"),
            "{e}"
        );
        let e = push(&ca1, "other.ml.svc", port).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("certificate not valid for name \"other.ml.svc\""),
            "{e}"
        );
        // Plain http to the TLS port gets nowhere.
        assert!(WorkerClient::new()
            .put_plan("127.0.0.1", port, "tok", b"{}", Duration::from_secs(5))
            .await
            .is_err());

        // Re-issued from the other CA, without a restart: the next handshake uses it.
        write(
            dir.path(),
            &issue(&ca2, std::slice::from_ref(&name), now).unwrap(),
        );
        push(&ca2, &name, port).await.unwrap();
        let e = push(&ca1, &name, port).await.unwrap_err();
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    }

    #[test]
    fn a_rotated_pair_is_picked_up_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (c1, k1) = pair("one.example");
        std::fs::write(&c, &c1).unwrap();
        std::fs::write(&k, &k1).unwrap();
        let r = ReloadingCert::new(&c, &k, Duration::ZERO).unwrap();
        let first = r.current().cert[0].clone();
        // A key that does not match the certificate: the last good pair stays.
        let (_, k2) = pair("two.example");
        std::fs::write(&k, &k2).unwrap();
        r.refresh();
        assert_eq!(r.current().cert[0], first);
        // The whole new pair, written the way the kubelet swaps a Secret: picked up.
        let (c2, k2) = pair("two.example");
        let tmp = dir.path().join("new");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("tls.crt"), &c2).unwrap();
        std::fs::write(tmp.join("tls.key"), &k2).unwrap();
        std::fs::rename(tmp.join("tls.crt"), &c).unwrap();
        std::fs::rename(tmp.join("tls.key"), &k).unwrap();
        r.refresh();
        assert_ne!(r.current().cert[0], first);
        assert!(ReloadingCert::new(&dir.path().join("nope"), &k, Duration::ZERO).is_err());
    }
}
