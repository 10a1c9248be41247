//! Worker metrics in the contract names of [`crate::worker::wire`], rendered in the
//! Prometheus/OpenMetrics text format by prometheus-client.
//!
//! The per-expert token counts are plain atomics, one per (MoE layer, logical expert), bumped by the
//! compute threads with a relaxed add and read only when `/metrics` is scraped: no lock and no map
//! lookup on the compute path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwapOption;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::plan::ModelShape;
use crate::worker::protocol::ErrorCode;
use crate::worker::wire::{
    EP_GROUP_FORMED_METRIC, EP_RANK_FAILURES_FAMILY, EXPERT_LABEL, LAYER_LABEL, PLAN_HASH_LABEL,
    PLAN_INFO_METRIC, REQUEST_ERRORS_FAMILY, RESIDENT_EXPERTS_METRIC, STEP_SECONDS_METRIC,
    TOKENS_FAMILY,
};

/// Token counters for every (MoE layer, logical expert) of one model shape.
#[derive(Debug)]
pub struct ExpertCounters {
    first_layer: u32,
    layers: u32,
    experts: u32,
    counts: Box<[AtomicU64]>,
}

impl ExpertCounters {
    pub fn new(model: &ModelShape) -> Self {
        let layers = model.moe_layers();
        let n = layers as usize * model.experts as usize;
        Self {
            first_layer: model.first_moe_layer,
            layers,
            experts: model.experts,
            counts: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn slot(&self, layer: u32, expert: u32) -> Option<&AtomicU64> {
        let l = layer.checked_sub(self.first_layer)?;
        if l >= self.layers || expert >= self.experts {
            return None;
        }
        self.counts
            .get(l as usize * self.experts as usize + expert as usize)
    }

    /// Count one computed row per entry of `experts` (a layer's batch). Ids outside the model are
    /// ignored; the server has already refused them.
    pub fn add_rows(&self, layer: u32, experts: &[u32]) {
        for &e in experts {
            if let Some(c) = self.slot(layer, e) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn get(&self, layer: u32, expert: u32) -> u64 {
        self.slot(layer, expert)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// (layer, expert, count) of every non-zero counter.
    pub fn nonzero(&self) -> Vec<(u32, u32, u64)> {
        let e = self.experts as usize;
        self.counts
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let v = c.load(Ordering::Relaxed);
                (v > 0).then(|| (self.first_layer + (i / e) as u32, (i % e) as u32, v))
            })
            .collect()
    }
}

/// The state of this worker's expert-parallel ranks (docs/data-plane.md, "The worker's ranks"),
/// set by whoever runs them (the `moe-worker` binary's EP group). Rendered only once a worker has
/// asked for it ([`WorkerMetrics::ep`]): a worker that starts no ranks shows none of it.
#[derive(Debug, Default)]
pub struct EpMetrics {
    formed: AtomicBool,
    failures: AtomicU64,
}

impl EpMetrics {
    /// Whether every local rank is in a formed group.
    pub fn set_formed(&self, formed: bool) {
        self.formed.store(formed, Ordering::Relaxed);
    }

    pub fn formed(&self) -> bool {
        self.formed.load(Ordering::Relaxed)
    }

    /// A rank of this worker failed (its group is broken).
    pub fn count_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// Renders the per-expert counters, the plan info and the EP group's state at scrape time.
#[derive(Debug, Default)]
struct ScrapeCollector {
    counters: Arc<OnceLock<ExpertCounters>>,
    plan_hash: Arc<ArcSwapOption<String>>,
    ep: Arc<OnceLock<Arc<EpMetrics>>>,
}

impl prometheus_client::collector::Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(counters) = self.counters.get() {
            // Counters get `_total` appended by the encoder: this is TOKENS_METRIC.
            let mut family = encoder.encode_descriptor(
                TOKENS_FAMILY,
                "Rows (token, expert pairs) computed per logical expert, summed over this worker's replicas",
                None,
                MetricType::Counter,
            )?;
            for (layer, expert, v) in counters.nonzero() {
                let labels = [(LAYER_LABEL, layer), (EXPERT_LABEL, expert)];
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
        if let Some(hash) = self.plan_hash.load_full() {
            let mut family = encoder.encode_descriptor(
                PLAN_INFO_METRIC,
                "1 for the expert plan in force on this worker",
                None,
                MetricType::Gauge,
            )?;
            let labels = [(PLAN_HASH_LABEL, hash.as_str())];
            family.encode_family(&labels)?.encode_gauge(&1i64)?;
        }
        if let Some(ep) = self.ep.get() {
            let mut gauge = encoder.encode_descriptor(
                EP_GROUP_FORMED_METRIC,
                "1 while this worker's expert-parallel ranks are in a formed group",
                None,
                MetricType::Gauge,
            )?;
            gauge.encode_gauge(&i64::from(ep.formed()))?;
            // Counters get `_total` appended by the encoder.
            let mut counter = encoder.encode_descriptor(
                EP_RANK_FAILURES_FAMILY,
                "Expert-parallel rank failures this worker process saw (it exits after one)",
                None,
                MetricType::Counter,
            )?;
            counter.encode_counter::<NoLabelSet, _, u64>(&ep.failures(), None)?;
        }
        Ok(())
    }
}

/// Everything `/metrics` reports.
#[derive(Debug)]
pub struct WorkerMetrics {
    registry: Registry,
    counters: Arc<OnceLock<ExpertCounters>>,
    plan_hash: Arc<ArcSwapOption<String>>,
    ep: Arc<OnceLock<Arc<EpMetrics>>>,
    step_seconds: Histogram,
    resident: Gauge,
    errors: Family<[(&'static str, &'static str); 1], Counter>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let counters = Arc::new(OnceLock::new());
        let plan_hash = Arc::new(ArcSwapOption::empty());
        let ep = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(ScrapeCollector {
            counters: counters.clone(),
            plan_hash: plan_hash.clone(),
            ep: ep.clone(),
        }));
        // 50 us .. ~1.6 s: a step is one backend call for one (rank, layer) batch.
        let step_seconds = Histogram::new(exponential_buckets(50e-6, 2.0, 16));
        registry.register(
            STEP_SECONDS_METRIC,
            "Time of one compute step (one rank, one layer, the rows batched together)",
            step_seconds.clone(),
        );
        let resident = Gauge::default();
        registry.register(
            RESIDENT_EXPERTS_METRIC,
            "Expert replicas resident on this worker (all its ranks) for the plan in force",
            resident.clone(),
        );
        let errors = Family::default();
        registry.register(
            REQUEST_ERRORS_FAMILY,
            "Dispatch requests answered with an error reply, by error code",
            errors.clone(),
        );
        Self {
            registry,
            counters,
            plan_hash,
            ep,
            step_seconds,
            resident,
            errors,
        }
    }

    /// Size the per-expert counters for the model; the first call wins (a worker serves one model).
    pub fn init_counters(&self, model: &ModelShape) {
        let _ = self.counters.get_or_init(|| ExpertCounters::new(model));
    }

    pub fn counters(&self) -> Option<&ExpertCounters> {
        self.counters.get()
    }

    /// The EP group's metrics, rendered from the first call on.
    pub fn ep(&self) -> Arc<EpMetrics> {
        self.ep.get_or_init(Arc::default).clone()
    }

    pub fn set_plan(&self, hash: &str, resident_experts: usize) {
        self.plan_hash.store(Some(Arc::new(hash.to_string())));
        self.resident.set(resident_experts as i64);
    }

    pub fn observe_step(&self, seconds: f64) {
        self.step_seconds.observe(seconds);
    }

    pub fn count_error(&self, code: ErrorCode) {
        self.errors.get_or_create(&[("code", code.as_str())]).inc();
    }

    /// The text exposition (OpenMetrics flavour of the Prometheus text format, served as
    /// [`crate::worker::wire::METRICS_CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Dtype;

    fn model() -> ModelShape {
        ModelShape {
            layers: 4,
            first_moe_layer: 1,
            experts: 8,
            top_k: 2,
            hidden_size: 16,
            expert_intermediate_size: 32,
            dtype: Dtype::Bf16,
        }
    }

    #[test]
    fn counters_render_with_contract_names() {
        let m = WorkerMetrics::new();
        m.init_counters(&model());
        let c = m.counters().unwrap();
        c.add_rows(1, &[0, 0, 7]);
        c.add_rows(3, &[5]);
        c.add_rows(0, &[1]); // dense layer: ignored
        c.add_rows(4, &[1]); // past the last layer: ignored
        c.add_rows(2, &[8]); // expert out of range: ignored
        assert_eq!(c.get(1, 0), 2);
        assert_eq!(c.nonzero(), vec![(1, 0, 2), (1, 7, 1), (3, 5, 1)]);
        m.set_plan("abc123", 5);
        m.observe_step(0.001);
        m.count_error(ErrorCode::NotResident);
        let text = m.render();
        // The exact text, literally: this test pins the wire format the names in
        // `worker::wire` stand for (and that dashboards and Prometheus queries use).
        assert!(
            text.contains("moe_expert_tokens_total{layer=\"1\",expert=\"0\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("moe_expert_tokens_total{layer=\"3\",expert=\"5\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("layer=\"0\""), "{text}");
        assert!(
            text.contains("moe_worker_plan_info{hash=\"abc123\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("moe_worker_resident_experts 5\n"), "{text}");
        assert!(text.contains("moe_worker_step_seconds_count 1\n"), "{text}");
        assert!(
            text.contains("moe_worker_request_errors_total{code=\"not_resident\"} 1\n"),
            "{text}"
        );
        // No EP ranks asked for: none of their metrics.
        assert!(!text.contains("moe_ep_"), "{text}");
    }

    #[test]
    fn ep_metrics_render_once_asked_for() {
        let m = WorkerMetrics::new();
        let ep = m.ep();
        let text = m.render();
        assert!(text.contains("moe_ep_group_formed 0\n"), "{text}");
        assert!(text.contains("moe_ep_rank_failures_total 0\n"), "{text}");
        ep.set_formed(true);
        assert!(m.render().contains("moe_ep_group_formed 1\n"));
        ep.set_formed(false);
        m.ep().count_failure();
        let text = m.render();
        assert!(text.contains("moe_ep_group_formed 0\n"), "{text}");
        assert!(text.contains("moe_ep_rank_failures_total 1\n"), "{text}");
    }
}
