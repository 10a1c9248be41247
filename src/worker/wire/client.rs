//! The client side of the worker's HTTP contract: scrape `/metrics`, push a plan to the admin
//! API, ask `/readyz`. Used by the operator (one client per controller, so its connections are
//! reused across reconciles), `moectl observe`, the testbed (`bench/`) and the tests.

use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;

use super::http::{authority, HttpClient, HttpError, Response};
use super::sample::{parse_worker_metrics, WorkerSample};
use super::{bearer, ADMIN_AUTH_HEADER, METRICS_PATH, PLAN_PATH, READYZ_PATH};

/// Largest answer read from a worker (a `/metrics` with many experts is well below this).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// A worker's HTTP client. Cheap to clone; clones share one connection pool.
#[derive(Clone, Debug, Default)]
pub struct WorkerClient {
    http: HttpClient,
    /// The admin API over TLS only ([`Self::with_admin_tls`]): plan pushes, and so the token,
    /// never go over plain http with such a client.
    admin_tls: bool,
}

impl WorkerClient {
    /// A client of its own (https trusting the system's CAs; workers serve plain http).
    pub fn new() -> Self {
        Self::default()
    }

    /// A client over `http`, sharing its pool (the operator shares one with its Prometheus
    /// client).
    pub fn with_http(http: HttpClient) -> Self {
        Self {
            http,
            admin_tls: false,
        }
    }

    /// A client whose plan pushes go over https only, verified with `tls`
    /// (`worker::admin_tls::client_config`: the operator's CA and the workers' certificate name).
    pub fn with_admin_tls(tls: rustls::ClientConfig) -> Self {
        Self {
            http: HttpClient::with_tls(tls),
            admin_tls: true,
        }
    }

    /// `http://host:port/path`; `host` is a name or an address (IPv6 with or without brackets).
    pub fn url(host: &str, port: u16, path: &str) -> String {
        format!("http://{}{path}", authority(host, port))
    }

    /// `GET path` on `host:port`; any status is an answer.
    pub async fn get(
        &self,
        host: &str,
        port: u16,
        path: &str,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        self.http
            .get(&Self::url(host, port, path), timeout, MAX_RESPONSE_BYTES)
            .await
    }

    /// Whether the worker's `/readyz` on `host:port` answers 200 within `timeout`.
    pub async fn ready(&self, host: &str, port: u16, timeout: Duration) -> bool {
        self.get(host, port, READYZ_PATH, timeout)
            .await
            .is_ok_and(|r| r.status == 200)
    }

    /// Scrape one worker's `/metrics` (its metrics port).
    pub async fn scrape(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<WorkerSample, HttpError> {
        let r = self.get(host, port, METRICS_PATH, timeout).await?;
        let target = r.target.clone();
        let text = String::from_utf8(r.ok()?).map_err(|_| HttpError::Garbled {
            target: target.clone(),
            message: "body is not UTF-8".into(),
        })?;
        parse_worker_metrics(&text).map_err(|e| HttpError::Garbled {
            target,
            message: e.to_string(),
        })
    }

    /// Push a plan (its JSON) to one worker's admin API (its admin port) with the admin token.
    /// The worker answers once the plan is in force, so `timeout` must cover loading its experts.
    pub async fn put_plan(
        &self,
        host: &str,
        port: u16,
        token: &str,
        plan_json: &[u8],
        timeout: Duration,
    ) -> Result<(), HttpError> {
        let url = if self.admin_tls {
            format!("https://{}{PLAN_PATH}", authority(host, port))
        } else {
            Self::url(host, port, PLAN_PATH)
        };
        let req = hyper::Request::put(&url)
            .header(ADMIN_AUTH_HEADER, bearer(token))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::copy_from_slice(plan_json)))
            .map_err(|e| HttpError::Garbled {
                target: format!("PUT {url}"),
                message: format!("building the request: {e}"),
            })?;
        self.http
            .send(req, timeout, MAX_RESPONSE_BYTES)
            .await?
            .ok()
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{keep_alive_server, refusing_port, server};
    use super::super::{PLAN_INFO_METRIC, TOKENS_METRIC};
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn answer(status: &str, body: String) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn scrape_reads_the_sample() {
        let text = format!(
            "# TYPE {TOKENS_METRIC} counter\n{TOKENS_METRIC}{{layer=\"2\",expert=\"5\"}} 42\n{PLAN_INFO_METRIC}{{hash=\"h1\"}} 1\n"
        );
        let srv = server(false, move || answer("200 OK", text.clone())).await;
        let c = WorkerClient::new();
        let s = c.scrape("127.0.0.1", srv.port, 5 * SECOND).await.unwrap();
        assert_eq!(s.tokens[&(2, 5)], 42.0);
        assert_eq!(s.plan_hash.as_deref(), Some("h1"));
        assert_eq!(
            srv.requests.lock().unwrap()[0].first_line(),
            "GET /metrics HTTP/1.1"
        );
        // Something else on the port: garbled, naming the target and the line.
        let srv = server(false, || answer("200 OK", "<html>hi</html>".into())).await;
        let e = c
            .scrape("127.0.0.1", srv.port, 5 * SECOND)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "GarbledResponse", "{e}");
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!(
                "GET http://127.0.0.1:{}/metrics: metrics line 1",
                srv.port
            )),
            "{shown}"
        );
        // A worker that answers 503.
        let srv = server(false, || {
            answer("503 Service Unavailable", "loading".into())
        })
        .await;
        let e = c
            .scrape("127.0.0.1", srv.port, 5 * SECOND)
            .await
            .unwrap_err();
        assert!(matches!(e, HttpError::Status { status: 503, .. }), "{e}");
    }

    #[tokio::test]
    async fn put_plan_sends_the_token_and_the_plan() {
        let srv = server(false, || answer("200 OK", "{}".into())).await;
        let c = WorkerClient::new();
        c.put_plan("127.0.0.1", srv.port, "s3cret", b"{\"plan\":1}", 5 * SECOND)
            .await
            .unwrap();
        let seen = srv.requests.lock().unwrap()[0].clone();
        assert_eq!(seen.first_line(), "PUT /v1/plan HTTP/1.1");
        assert_eq!(
            seen.header("authorization").as_deref(),
            Some("Bearer s3cret")
        );
        assert_eq!(
            seen.header("content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(seen.header("content-length").as_deref(), Some("10"));
        assert_eq!(seen.body, b"{\"plan\":1}");
        // A worker holding another token refuses: the operator matches on the status.
        let srv = server(false, || {
            answer(
                "401 Unauthorized",
                "{\"error\":\"missing or wrong bearer token\"}".into(),
            )
        })
        .await;
        let e = c
            .put_plan("127.0.0.1", srv.port, "old", b"{}", 5 * SECOND)
            .await
            .unwrap_err();
        assert!(matches!(e, HttpError::Status { status: 401, .. }), "{e}");
        assert!(
            e.to_string().starts_with(&format!(
                "PUT http://127.0.0.1:{}/v1/plan: HTTP 401",
                srv.port
            )),
            "{e}"
        );
    }

    #[tokio::test]
    async fn readiness_and_unreachable_workers() {
        let srv = keep_alive_server("ready").await;
        let c = WorkerClient::new();
        assert!(c.ready("127.0.0.1", srv.port, 5 * SECOND).await);
        let r = c
            .get("127.0.0.1", srv.port, "/healthz", 5 * SECOND)
            .await
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ready"[..]));
        assert_eq!(
            srv.accepted(),
            1,
            "the second request reused the connection"
        );
        let (_held, port) = refusing_port();
        assert!(!c.ready("127.0.0.1", port, 2 * SECOND).await);
        let e = c.scrape("127.0.0.1", port, 2 * SECOND).await.unwrap_err();
        assert_eq!(e.reason(), "Unreachable");
        assert!(
            e.to_string()
                .starts_with(&format!("GET http://127.0.0.1:{port}/metrics: connect: ")),
            "{e}"
        );
    }

    #[test]
    fn urls() {
        assert_eq!(
            WorkerClient::url("10.1.2.3", 9401, METRICS_PATH),
            "http://10.1.2.3:9401/metrics"
        );
        assert_eq!(
            WorkerClient::url("fd00::1", 9402, PLAN_PATH),
            "http://[fd00::1]:9402/v1/plan"
        );
    }
}
