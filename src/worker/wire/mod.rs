//! The worker's wire contract, in one place: what the worker serves over HTTP and what the
//! operator, `moectl` and the testbed read from it.
//!
//! - Names: the paths of the metrics and admin ports, the admin API's bearer header, the metric
//!   names and labels of `/metrics` and its content type ([`WorkerMetrics`] renders with them).
//! - [`sample`]: a scrape of `/metrics` read back as a [`WorkerSample`] (token counters and the
//!   plan in force).
//! - [`http`]: the one HTTP client layer (hyper's pooled client over TCP or rustls TLS, deadlines,
//!   a cap on what is read, [`HttpError`] with the reasons conditions and metric labels use). The
//!   operator's Prometheus client runs over it too.
//! - [`client`]: the [`WorkerClient`]: scrape a worker, push a plan, ask for readiness.
//!
//! The dispatch protocol (port 9400) has its own module, [`crate::worker::protocol`].
//!
//! [`WorkerMetrics`]: crate::worker::metrics::WorkerMetrics

pub mod client;
pub mod http;
pub mod sample;
#[cfg(test)]
pub(crate) mod testing;

pub use client::{WorkerClient, MAX_RESPONSE_BYTES};
pub use http::{excerpt, HttpClient, HttpError, Response};
pub use sample::{parse_worker_metrics, ParseError, WorkerSample};

/// Metrics port: the Prometheus text exposition of the worker.
pub const METRICS_PATH: &str = "/metrics";
/// Metrics and admin ports: the process serves (liveness, start-up probe).
pub const HEALTHZ_PATH: &str = "/healthz";
/// Metrics and admin ports: 200 once the weights are loaded and a plan is in force, else 503
/// (readiness probe; the availability the rollout counts).
pub const READYZ_PATH: &str = "/readyz";
/// Admin port: `GET` the plan in force, `PUT` a plan (its JSON) to apply in place.
pub const PLAN_PATH: &str = "/v1/plan";

/// The admin API's credential header: `Authorization: Bearer <token from the admin Secret>`
/// (header names are case-insensitive; this is the lowercase form `HeaderName` takes).
pub const ADMIN_AUTH_HEADER: &str = "authorization";
/// The scheme prefix of [`ADMIN_AUTH_HEADER`]'s value.
pub const BEARER_PREFIX: &str = "Bearer ";

/// The value of [`ADMIN_AUTH_HEADER`] carrying `token`.
pub fn bearer(token: &str) -> String {
    format!("{BEARER_PREFIX}{token}")
}

/// The content type of `/metrics` (OpenMetrics flavour of the Prometheus text format).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Counter of rows (token, expert pairs) computed per logical expert, labelled
/// [`LAYER_LABEL`] and [`EXPERT_LABEL`]: the load the operator plans from.
pub const TOKENS_METRIC: &str = "moe_expert_tokens_total";
/// [`TOKENS_METRIC`] without the `_total` that the text encoder appends to a counter's family.
pub const TOKENS_FAMILY: &str = "moe_expert_tokens";
/// Info gauge, 1 for the plan in force, labelled [`PLAN_HASH_LABEL`].
pub const PLAN_INFO_METRIC: &str = "moe_worker_plan_info";
/// Histogram of compute step times (seconds).
pub const STEP_SECONDS_METRIC: &str = "moe_worker_step_seconds";
/// Gauge of expert replicas resident on the worker for the plan in force.
pub const RESIDENT_EXPERTS_METRIC: &str = "moe_worker_resident_experts";
/// Counter family of dispatch requests answered with an error reply, labelled `code` (rendered
/// with `_total`).
pub const REQUEST_ERRORS_FAMILY: &str = "moe_worker_request_errors";

/// Gauge, 1 while this worker's expert-parallel ranks are in a formed group (0 while it forms or
/// after it broke); only rendered by a worker that starts EP ranks (docs/data-plane.md).
pub const EP_GROUP_FORMED_METRIC: &str = "moe_ep_group_formed";
/// Counter family of EP rank failures this worker process saw (rendered with `_total`; the process
/// exits right after one, so it is mostly 0).
pub const EP_RANK_FAILURES_FAMILY: &str = "moe_ep_rank_failures";

/// The MoE layer index (as in the plan) of a [`TOKENS_METRIC`] series.
pub const LAYER_LABEL: &str = "layer";
/// The logical expert of a [`TOKENS_METRIC`] series.
pub const EXPERT_LABEL: &str = "expert";
/// The plan hash of a [`PLAN_INFO_METRIC`] series.
pub const PLAN_HASH_LABEL: &str = "hash";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Dtype, ModelShape};
    use crate::worker::metrics::WorkerMetrics;

    #[test]
    fn counter_name_is_its_family_with_total() {
        assert_eq!(TOKENS_METRIC, format!("{TOKENS_FAMILY}_total"));
        assert_eq!(hyper::header::AUTHORIZATION, ADMIN_AUTH_HEADER);
        assert_eq!(bearer("t"), "Bearer t");
    }

    /// What the worker renders is what the operator reads: the one test of both ends together.
    #[test]
    fn the_workers_rendering_parses_back() {
        let m = WorkerMetrics::new();
        m.init_counters(&ModelShape {
            layers: 3,
            first_moe_layer: 1,
            experts: 4,
            top_k: 2,
            hidden_size: 8,
            expert_intermediate_size: 16,
            dtype: Dtype::Bf16,
        });
        let c = m.counters().unwrap();
        c.add_rows(1, &[0, 0, 3]);
        c.add_rows(2, &[2]);
        m.set_plan("0123abcd", 4);
        m.observe_step(0.01);
        let s = parse_worker_metrics(&m.render()).unwrap();
        assert_eq!(s.plan_hash.as_deref(), Some("0123abcd"));
        assert_eq!(
            s.tokens.into_iter().collect::<Vec<_>>(),
            vec![((1, 0), 2.0), ((1, 3), 1.0), ((2, 2), 1.0)]
        );
    }
}
