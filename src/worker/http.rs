//! The worker's HTTP endpoints: `/metrics`, `/healthz`, `/readyz` on the metrics port, and the
//! admin API (`GET`/`PUT /v1/plan`, bearer token) on a separate port.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sha2::{Digest, Sha256};

use crate::plan::ExpertPlan;
use crate::worker::metrics::CONTENT_TYPE;
use crate::worker::server::Worker;

/// Largest plan document the admin API accepts.
pub const MAX_PLAN_BYTES: usize = 64 << 20;

/// The admin bearer token, kept as a digest so that comparing takes the same time whatever the
/// candidate (length included).
pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    /// A token must not be empty: an empty one would let anybody in.
    pub fn new(token: &str) -> anyhow::Result<Self> {
        let token = token.trim();
        anyhow::ensure!(!token.is_empty(), "the admin token is empty");
        Ok(Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Constant-time check of an `Authorization` header value.
    pub fn verify(&self, authorization: Option<&str>) -> bool {
        let Some(candidate) = authorization.and_then(|v| v.strip_prefix("Bearer ")) else {
            return false;
        };
        let d: [u8; 32] = Sha256::digest(candidate.trim().as_bytes()).into();
        d.iter()
            .zip(&self.digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
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
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        worker.metrics.render(),
    )
        .into_response()
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn metrics_router(worker: Arc<Worker>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(worker)
}

#[derive(Clone)]
struct AdminState {
    worker: Arc<Worker>,
    token: Arc<AdminToken>,
}

/// `None` when the request carries the token, else the 401 to answer with.
fn authorize(state: &AdminState, headers: &HeaderMap) -> Option<Response> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
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

async fn put_plan(State(state): State<AdminState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = authorize(&state, &headers) {
        return r;
    }
    let plan: ExpertPlan = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "request body is not a plan document: {e} (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            )
        }
    };
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
    Router::new()
        .route("/v1/plan", get(get_plan).put(put_plan))
        .route("/healthz", get(healthz))
        .route("/readyz", get(admin_readyz))
        .layer(DefaultBodyLimit::max(MAX_PLAN_BYTES))
        .with_state(AdminState { worker, token })
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
}
