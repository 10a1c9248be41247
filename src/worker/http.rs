//! The worker's HTTP endpoints: `/metrics`, `/healthz`, `/readyz` on the metrics port, and the
//! admin API (`GET`/`PUT /v1/plan`, bearer token) on a separate port.
//!
//! Both listeners bound what a client can hold (see [`TimedIo`]): a request head must arrive
//! within `header_timeout` of its first byte, an idle keep-alive connection is closed after
//! `idle_timeout`, a response must be taken within `write_timeout`, and at most `max_connections`
//! are open. `PUT /v1/plan` checks the bearer token from the head before it reads a body byte, then
//! reads at most `max_plan_bytes` within `body_timeout`. Shutdown waits at most `shutdown_drain`
//! for open requests.

use std::future::{Future as _, IntoFuture};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::plan::expert_plan::{HashRule, PlanReadError};
use crate::plan::{limits, ExpertPlan};
use crate::worker::server::Worker;
use crate::worker::wire::{
    ADMIN_AUTH_HEADER, BEARER_PREFIX, HEALTHZ_PATH, METRICS_CONTENT_TYPE, METRICS_PATH, PLAN_PATH,
    READYZ_PATH,
};

/// Limits of the metrics and admin HTTP listeners.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Time from a request's first byte until its whole head (request line and headers) is in.
    pub header_timeout: Duration,
    /// Time allowed for reading a `PUT /v1/plan` body, once the head is in.
    pub body_timeout: Duration,
    /// Time a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Time allowed for writing a response; a client that does not read it is disconnected.
    pub write_timeout: Duration,
    /// Connections open at once per listener; further ones are closed on accept.
    pub max_connections: usize,
    /// After shutdown is asked for, how long open requests may still finish.
    pub shutdown_drain: Duration,
    /// Largest `PUT /v1/plan` body.
    pub max_plan_bytes: usize,
    /// The file the admin token came from (a mounted Secret): re-read when it changes, so that a
    /// rotated token is honoured without a restart.
    pub admin_token_file: Option<PathBuf>,
    /// Least time between two looks at `admin_token_file`.
    pub token_recheck: Duration,
    /// TLS of the admin listener (`--admin-tls-cert`/`--admin-tls-key`), its certificate reloaded
    /// from the files when they change (`worker::admin_tls`).
    pub admin_tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            max_connections: 256,
            shutdown_drain: Duration::from_secs(5),
            max_plan_bytes: limits::MAX_PLAN_BYTES,
            admin_token_file: None,
            token_recheck: Duration::from_secs(1),
            admin_tls: None,
        }
    }
}

/// The admin bearer token, kept as a digest so that comparing takes the same time whatever the
/// candidate (length included). Read from a file, it follows the file: see [`AdminToken::verify`].
pub struct AdminToken {
    digest: RwLock<[u8; 32]>,
    file: Option<TokenFile>,
}

struct TokenFile {
    path: PathBuf,
    recheck: Duration,
    state: Mutex<TokenFileState>,
}

#[derive(Default)]
struct TokenFileState {
    /// The file as last read into `digest`.
    seen: Option<Fingerprint>,
    checked: Option<Instant>,
    /// A problem already logged, so that it is logged once, not at every check.
    warned: Option<String>,
}

/// What changes when a file is rewritten or (as the kubelet updates a Secret) swapped by rename.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    inode: (u64, u64),
}

impl Fingerprint {
    fn of(path: &Path) -> io::Result<Self> {
        let m = std::fs::metadata(path)?;
        #[cfg(unix)]
        let inode = {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        };
        #[cfg(not(unix))]
        let inode = (0, 0);
        Ok(Self {
            len: m.len(),
            modified: m.modified().ok(),
            inode,
        })
    }
}

/// Longest token file read: a token is a few dozen bytes, the file is a Secret's key.
const MAX_TOKEN_FILE_BYTES: u64 = 64 << 10;

fn digest_of(token: &str) -> anyhow::Result<[u8; 32]> {
    let token = token.trim();
    anyhow::ensure!(!token.is_empty(), "the admin token is empty");
    Ok(Sha256::digest(token.as_bytes()).into())
}

fn read_token_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_TOKEN_FILE_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
}

impl AdminToken {
    /// A fixed token. It must not be empty: an empty one would let anybody in.
    pub fn new(token: &str) -> anyhow::Result<Self> {
        Ok(Self {
            digest: RwLock::new(digest_of(token)?),
            file: None,
        })
    }

    /// The token in `path`, re-read when the file changes (looked at most every `recheck`, and on
    /// a failed check). The file must hold a token now; later, an unreadable or empty file keeps
    /// the last good token (and logs a warning).
    pub fn from_file(path: &Path, recheck: Duration) -> anyhow::Result<Self> {
        let seen = Fingerprint::of(path).ok();
        let text = read_token_file(path).map_err(|e| {
            anyhow::anyhow!(
                "reading the admin token file {} (--admin-token-file): {e}",
                path.display()
            )
        })?;
        let digest = digest_of(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Self {
            digest: RwLock::new(digest),
            file: Some(TokenFile {
                path: path.to_path_buf(),
                recheck,
                state: Mutex::new(TokenFileState {
                    seen,
                    checked: Some(Instant::now()),
                    warned: None,
                }),
            }),
        })
    }

    fn matches(&self, candidate: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(candidate.trim().as_bytes()).into();
        let current = *self.digest.read().unwrap_or_else(|p| p.into_inner());
        d.iter()
            .zip(&current)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// Re-read the token file if it changed. `failed`: a check just failed, so look sooner (a tenth
    /// of `recheck`) than the periodic look. Returns whether the token changed.
    fn refresh(&self, failed: bool) -> bool {
        let Some(f) = &self.file else { return false };
        let mut st = f.state.lock().unwrap_or_else(|p| p.into_inner());
        let every = if failed { f.recheck / 10 } else { f.recheck };
        if st.checked.is_some_and(|t| t.elapsed() < every) {
            return false;
        }
        st.checked = Some(Instant::now());
        let warn = |st: &mut TokenFileState, problem: String| {
            if st.warned.as_ref() != Some(&problem) {
                tracing::warn!(file = %f.path.display(), %problem, "admin token file unusable; keeping the last good token");
                st.warned = Some(problem);
            }
        };
        let fp = match Fingerprint::of(&f.path) {
            Ok(fp) => fp,
            Err(e) => {
                warn(&mut st, format!("cannot read it: {e}"));
                return false;
            }
        };
        if st.seen.as_ref() == Some(&fp) {
            return false;
        }
        let digest = match read_token_file(&f.path).and_then(|t| digest_of(&t)) {
            Ok(d) => d,
            Err(e) => {
                warn(&mut st, format!("{e}"));
                return false;
            }
        };
        st.seen = Some(fp);
        st.warned = None;
        let mut cur = self.digest.write().unwrap_or_else(|p| p.into_inner());
        let changed = *cur != digest;
        *cur = digest;
        if changed {
            tracing::info!(file = %f.path.display(), "admin token file changed: using the new token");
        }
        changed
    }

    /// Constant-time check of an `Authorization` header value against the current token. With a
    /// token file, the file is looked at (cheaply: its size, time and inode) at most every
    /// `recheck`, and again on a failed check, so a rotated Secret is honoured within seconds.
    pub fn verify(&self, authorization: Option<&str>) -> bool {
        self.refresh(false);
        let Some(candidate) = authorization.and_then(|v| v.strip_prefix(BEARER_PREFIX)) else {
            return false;
        };
        self.matches(candidate) || (self.refresh(true) && self.matches(candidate))
    }
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

fn readiness(worker: &Worker) -> Response {
    match worker.readiness() {
        Ok(hash) => (StatusCode::OK, format!("ready: plan {hash}\n")).into_response(),
        Err(msg) => (StatusCode::SERVICE_UNAVAILABLE, format!("{msg}\n")).into_response(),
    }
}

async fn readyz(State(worker): State<Arc<Worker>>) -> Response {
    readiness(&worker)
}

async fn metrics(State(worker): State<Arc<Worker>>) -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        worker.metrics.render(),
    )
        .into_response()
}

/// `/metrics`, `/healthz`, `/readyz`. No route reads a body, so none is buffered.
pub fn metrics_router(worker: Arc<Worker>) -> Router {
    Router::new()
        .route(METRICS_PATH, get(metrics))
        .route(HEALTHZ_PATH, get(healthz))
        .route(READYZ_PATH, get(readyz))
        .layer(DefaultBodyLimit::max(0))
        .with_state(worker)
}

#[derive(Clone)]
struct AdminState {
    worker: Arc<Worker>,
    token: Arc<AdminToken>,
    max_plan_bytes: usize,
    body_timeout: Duration,
}

/// `None` when the request carries the token, else the 401 to answer with.
fn authorize(state: &AdminState, headers: &HeaderMap) -> Option<Response> {
    let value = headers.get(ADMIN_AUTH_HEADER).and_then(|v| v.to_str().ok());
    if state.token.verify(value) {
        None
    } else {
        let mut r = json_error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer <token from the admin Secret>)",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        Some(r)
    }
}

async fn get_plan(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(r) = authorize(&state, &headers) {
        return r;
    }
    match state.worker.active() {
        Some(a) => {
            let ranks = state.worker.config().ranks();
            Json(serde_json::json!({
                "hash": a.plan.hash,
                "algorithm": a.plan.algorithm.to_string(),
                "epoch": a.epoch,
                "ranks": [ranks.start, ranks.end],
            }))
            .into_response()
        }
        None => json_error(StatusCode::NOT_FOUND, "no plan applied yet"),
    }
}

/// Read a request body of at most `limit` bytes; `Err` is the response to give instead.
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Vec<u8>, Response> {
    let too_large = |what: String| {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{what} exceeds the largest plan this worker accepts ({limit} bytes, --max-plan-bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        return Err(too_large(format!("the declared body of {n} bytes")));
    }
    // The buffer grows with what arrives, never by the declared length alone.
    let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(1 << 20) as usize);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            json_error(
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {e}"),
            )
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large("the body".into()));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

async fn put_plan(State(state): State<AdminState>, headers: HeaderMap, body: Body) -> Response {
    // The token comes from the head: nobody without it gets a byte of the body read.
    if let Some(r) = authorize(&state, &headers) {
        return r;
    }
    let bytes = match tokio::time::timeout(
        state.body_timeout,
        read_body(body, &headers, state.max_plan_bytes),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(r)) => return r,
        Err(_) => {
            return json_error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the plan body did not arrive within {:?} (--http-body-timeout-seconds)",
                    state.body_timeout
                ),
            )
        }
    };
    // The one plan reader: format version first, sizes bounded before anything is allocated.
    let plan: ExpertPlan = match ExpertPlan::from_json_checked(&bytes, HashRule::MayBeEmpty) {
        Ok(p) => p,
        // Not JSON of a plan: 400. A plan document this worker must refuse (version, hash,
        // sizes, layers): 422, as the worker's own checks against its model answer.
        Err(e) => {
            let status = match e {
                PlanReadError::Json { .. } | PlanReadError::TooLarge { .. } => {
                    StatusCode::BAD_REQUEST
                }
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            return json_error(
                status,
                format!("request body is not a plan this worker can take: {e}"),
            );
        }
    };
    drop(bytes);
    // `apply_plan` checks the document (format version, hash, sizes) before anything else.
    match state.worker.apply_plan(plan).await {
        Ok(outcome) => Json(outcome).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "plan not applied");
            let status =
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            json_error(status, e.to_string())
        }
    }
}

async fn admin_readyz(State(state): State<AdminState>) -> Response {
    readiness(&state.worker)
}

/// `GET`/`PUT /v1/plan` behind the bearer token, plus unauthenticated `/healthz` and `/readyz`.
pub fn admin_router(worker: Arc<Worker>, token: Arc<AdminToken>) -> Router {
    let cfg = worker.config().http.clone();
    Router::new()
        .route(PLAN_PATH, get(get_plan).put(put_plan))
        .route(HEALTHZ_PATH, get(healthz))
        .route(READYZ_PATH, get(admin_readyz))
        .layer(DefaultBodyLimit::max(cfg.max_plan_bytes))
        .with_state(AdminState {
            worker,
            token,
            max_plan_bytes: cfg.max_plan_bytes,
            body_timeout: cfg.body_timeout,
        })
}

/// Serve `router` on `listener` until `stop` changes (or its sender is dropped), then give open
/// requests at most `shutdown_drain` to finish before returning: a client holding a connection
/// open cannot keep the worker from exiting.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    cfg: &HttpConfig,
    stop: watch::Receiver<bool>,
    name: &'static str,
) {
    let timed = TimedListener::new(listener, cfg);
    match &cfg.admin_tls {
        // Only the admin listener is named "admin"; the metrics port stays plain HTTP.
        Some(tls) if name == "admin" => {
            let tls = super::admin_tls::TlsListener::new(timed, tls.clone());
            match tls {
                Ok(l) => serve_on(l, router, cfg, stop, name).await,
                Err(e) => tracing::error!(listener = name, error = %e, "admin TLS listener failed"),
            }
        }
        _ => serve_on(timed, router, cfg, stop, name).await,
    }
}

async fn serve_on<L>(
    listener: L,
    router: Router,
    cfg: &HttpConfig,
    stop: watch::Receiver<bool>,
    name: &'static str,
) where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let mut graceful = stop.clone();
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = graceful.changed().await;
        })
        .into_future();
    let mut deadline = stop;
    let drain = cfg.shutdown_drain;
    tokio::select! {
        r = served => if let Err(e) = r {
            tracing::error!(listener = name, error = %e, "http server failed");
        },
        _ = async move {
            let _ = deadline.changed().await;
            tokio::time::sleep(drain).await;
        } => {
            tracing::warn!(listener = name, ?drain, "requests still open after the shutdown drain; closing them");
        }
    }
}

/// A TCP listener that hands out [`TimedIo`] connections, at most `max_connections` at once.
pub struct TimedListener {
    inner: TcpListener,
    limits: IoLimits,
    slots: Arc<Semaphore>,
    max: usize,
}

#[derive(Clone, Copy, Debug)]
struct IoLimits {
    header: Duration,
    idle: Duration,
    write: Duration,
}

impl TimedListener {
    pub fn new(inner: TcpListener, cfg: &HttpConfig) -> Self {
        let max = cfg.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            inner,
            limits: IoLimits {
                header: cfg.header_timeout,
                idle: cfg.idle_timeout,
                write: cfg.write_timeout,
            },
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl axum::serve::Listener for TimedListener {
    type Io = TimedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match self.slots.clone().try_acquire_owned() {
                    Ok(slot) => return (TimedIo::new(stream, self.limits, slot), addr),
                    Err(_) => {
                        tracing::warn!(%addr, max = self.max, "http connection refused: at the connection cap");
                        drop(stream);
                    }
                },
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Where a connection is in its request cycle, as seen from the bytes that pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of a request (after accept, or after a response was written).
    Idle,
    /// Inside a request head (no blank line yet).
    Head,
    /// The head is in: the handler runs and reads the body under its own limit and timeout.
    Request,
}

/// A connection with deadlines on what the peer controls: hyper (as axum runs it) has no header
/// read timeout and no write timeout, so they are kept here, from the bytes that pass:
/// - `Idle`: a read that waits past `idle` fails (the connection closes; no request is lost);
/// - `Head`: from the first byte of a request, its blank line must come within `header`;
/// - `Request`: no read deadline: the handler is working, and bounds its own body read;
/// - a write that waits past `write` fails.
///
/// A response written returns the connection to `Idle`.
pub struct TimedIo {
    inner: TcpStream,
    limits: IoLimits,
    phase: Phase,
    /// The last four bytes of the head read so far, to find its blank line (`\r\n\r\n`).
    window: u32,
    read_deadline: Pin<Box<Sleep>>,
    write_deadline: Option<Pin<Box<Sleep>>>,
    _slot: OwnedSemaphorePermit,
}

impl TimedIo {
    fn new(inner: TcpStream, limits: IoLimits, slot: OwnedSemaphorePermit) -> Self {
        Self {
            inner,
            limits,
            phase: Phase::Idle,
            window: 0,
            read_deadline: Box::pin(tokio::time::sleep(limits.idle)),
            write_deadline: None,
            _slot: slot,
        }
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.window = 0;
        let after = match phase {
            Phase::Idle => self.limits.idle,
            Phase::Head => self.limits.header,
            // No read deadline while the handler works (see the type's doc).
            Phase::Request => return,
        };
        self.read_deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + after);
    }

    fn saw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.phase == Phase::Idle {
            self.enter(Phase::Head);
        }
        if self.phase == Phase::Head {
            for &b in bytes {
                self.window = (self.window << 8) | b as u32;
                if self.window == u32::from_be_bytes(*b"\r\n\r\n") {
                    self.enter(Phase::Request);
                    break;
                }
            }
        }
    }

    fn poll_write_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limits.write;
        let timer = self
            .write_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client did not take the response within {limit:?}"),
            )),
            Poll::Pending => Poll::Pending,
        }
    }

    fn write_result<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.write_deadline = None;
                Poll::Ready(r)
            }
            Poll::Pending => match self.poll_write_deadline(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.saw(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.phase == Phase::Request => Poll::Pending,
            Poll::Pending => match this.read_deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let what = if this.phase == Phase::Idle {
                        format!("no request within {:?} (idle connection)", this.limits.idle)
                    } else {
                        format!("request head not complete within {:?}", this.limits.header)
                    };
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 && this.phase != Phase::Idle {
                // A response is going out: the next bytes read start the next request.
                this.enter(Phase::Idle);
            }
        }
        this.write_result(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 && this.phase != Phase::Idle {
                this.enter(Phase::Idle);
            }
        }
        this.write_result(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.write_result(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.write_result(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_check_needs_the_exact_bearer_token() {
        let t = AdminToken::new("s3cret\n").unwrap();
        assert!(t.verify(Some("Bearer s3cret")));
        assert!(!t.verify(Some("Bearer s3cre")));
        assert!(!t.verify(Some("Bearer s3cretx")));
        assert!(!t.verify(Some("s3cret")));
        assert!(!t.verify(Some("Basic s3cret")));
        assert!(!t.verify(None));
        assert!(AdminToken::new("  \n").is_err());
    }

    #[test]
    fn a_token_file_is_followed_and_a_broken_one_keeps_the_last_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let t = AdminToken::from_file(&path, Duration::from_millis(50)).unwrap();
        assert!(t.verify(Some("Bearer first")));
        // Rotated the way the kubelet does it: a new file renamed over the old one.
        let tmp = dir.path().join("token.new");
        std::fs::write(&tmp, "second\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(t.verify(Some("Bearer second")));
        assert!(!t.verify(Some("Bearer first")));
        // Rewritten in place with a token of another length.
        std::fs::write(&path, "third-token").unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(t.verify(Some("Bearer third-token")));
        // Emptied, then removed: the last good token stays.
        std::fs::write(&path, "  \n").unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(t.verify(Some("Bearer third-token")));
        std::fs::remove_file(&path).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(t.verify(Some("Bearer third-token")));
        assert!(!t.verify(Some("Bearer ")));
        // A file that starts out empty is refused at start.
        std::fs::write(&path, "\n").unwrap();
        assert!(AdminToken::from_file(&path, Duration::from_secs(1)).is_err());
    }
}
