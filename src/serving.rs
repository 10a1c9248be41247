//! Serving model: what a replication policy's replica memory costs in a real server. Replica
//! slots take GPU memory that would otherwise hold KV cache; less KV cache means fewer sequences
//! decoded at once, and (when the step time does not grow in proportion to the batch) less
//! goodput. This turns the policy testbed's measurements (`moe-bench-policies/v1`) into that
//! trade-off, so that the CRAFT paper's serving claim (CRAFT at R = 8 against EPLB with one
//! redundant expert per GPU per layer, 58 on DeepSeek-V3: 1.14x average goodput, up to 1.2x) can be
//! reproduced and challenged. Pure: the caller reads the file and prints.
//!
//! The model, per GPU (every input is a flag of `moectl serving`):
//!
//! ```text
//! kv_bytes   = gpu_memory x utilization - weight_bytes - replica_bytes(policy) - reserve
//! kv_tokens  = kv_bytes / kv_bytes_per_token
//! batch      = min(floor(kv_tokens / context_tokens), max_batch, largest batch meeting the TPOT SLO)
//! step(B)    = overhead + B x D / tokens_per_s(policy) + B x context_tokens x kv_bytes_per_token / hbm_bandwidth
//! goodput    = B x D / step(B)      (decode tokens per second over the D GPUs)
//! ```
//!
//! - One decode token per sequence per step; every sequence holds `context_tokens` of KV (a
//!   steady state of equal-length requests; paged allocation with no fragmentation).
//! - `tokens_per_s(policy)` is the MoE throughput the testbed measured for the policy (slowest
//!   rank per layer), assumed to scale linearly to the serving batch (`B x D` tokens per step):
//!   fair in the compute-bound regime the testbed measured, optimistic far below it.
//! - `overhead` is the per-step time that does not depend on the batch (attention and dense
//!   layers' weight reads, all-to-all latency, scheduling). With no overhead and no KV reads
//!   the batch cancels out and goodput is the measured throughput: replica memory then costs
//!   nothing. With a large overhead goodput is proportional to the batch, so the policy that
//!   leaves more KV cache wins by the ratio of the batches. Real decode is in between; the
//!   table shows both ends and the `--step-overhead-ms` you choose.
//! - KV reads are counted only when `hbm_bandwidth` is given (attention reads each sequence's
//!   KV once per step).
//! - Replica bytes are the plan's (`R x bytes per expert`). When the testbed ran a layer subset
//!   and recorded the full model, EPLB's replicas are scaled to the full model's MoE layers (one
//!   per GPU per layer) while CRAFT's budget R stays what it was (R is a total over layers).

use serde::{Deserialize, Serialize};

use crate::plan::ModelShape;

/// Schema name of the testbed's results document.
pub const RESULTS_SCHEMA: &str = "moe-bench-policies/v1";

/// Step-time percentiles of one policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// One policy's measurement (the fields this model reads; others are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyMeasurement {
    pub policy: String,
    pub replicas_per_gpu: u32,
    pub replica_bytes_per_gpu: u64,
    pub tokens_per_s: f64,
    #[serde(default)]
    pub step_ms: StepMs,
    #[serde(default)]
    pub observed_balancedness: f64,
    #[serde(default)]
    pub predicted_balancedness: f64,
}

/// The testbed's results document (`moe-bench-policies/v1`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchResults {
    pub schema: String,
    #[serde(default)]
    pub mode: serde_json::Value,
    #[serde(default)]
    pub device: String,
    /// The model as run (possibly a layer subset).
    pub model: Option<ModelShape>,
    pub gpus: u32,
    #[serde(default)]
    pub nodes: u32,
    pub tokens_per_batch: u64,
    #[serde(default)]
    pub batches: u64,
    pub policies: Vec<PolicyMeasurement>,
    /// The whole model when `model` is a layer subset.
    #[serde(default)]
    pub full_model: Option<ModelShape>,
}

/// Parse and check a results document; errors name the file and the field.
pub fn parse_results(name: &str, bytes: &[u8]) -> Result<BenchResults, String> {
    let r: BenchResults = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "{name}: not a {RESULTS_SCHEMA} document: {e} (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    if r.schema != RESULTS_SCHEMA {
        return Err(format!(
            "{name}: schema is {:?}, expected {RESULTS_SCHEMA:?} (written by `moectl bench policies`)",
            r.schema
        ));
    }
    if r.gpus == 0 {
        return Err(format!("{name}: gpus is 0"));
    }
    if r.policies.is_empty() {
        return Err(format!("{name}: policies is empty"));
    }
    for (i, p) in r.policies.iter().enumerate() {
        if !p.tokens_per_s.is_finite() || p.tokens_per_s <= 0.0 {
            return Err(format!(
                "{name}: policies[{i}] ({}) has tokens_per_s {}: every policy needs a positive measured throughput",
                p.policy, p.tokens_per_s
            ));
        }
    }
    Ok(r)
}

/// The server the model assumes; all sizes in bytes, times in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct ServingConfig {
    pub gpu_memory: u64,
    /// Fraction of GPU memory the engine may use (vLLM's `gpu_memory_utilization`).
    pub utilization: f64,
    /// Model weights resident on each GPU without any replica.
    pub weight_bytes_per_gpu: u64,
    /// Activations, CUDA graphs, communication buffers: memory neither weights nor KV.
    pub reserve_bytes: u64,
    pub kv_bytes_per_token: u64,
    /// KV tokens each running sequence holds (prompt plus generated so far, on average).
    pub context_tokens: u64,
    /// Engine cap on running sequences per GPU.
    pub max_batch: Option<u64>,
    /// Per-step time independent of the batch.
    pub step_overhead_ms: f64,
    /// Bytes per second; when set, each step also reads every running sequence's KV.
    pub hbm_bandwidth: Option<f64>,
    /// Largest acceptable time per output token (step time); batches that miss it are cut.
    pub tpot_slo_ms: Option<f64>,
    /// Scale EPLB's replicas to the full model when the results hold a layer subset.
    pub scale_to_full_model: bool,
}

/// What limited a policy's batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BatchLimit {
    KvCache,
    MaxBatch,
    Slo,
    /// Not even one sequence fits (or meets the SLO).
    None,
}

impl BatchLimit {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchLimit::KvCache => "kv-cache",
            BatchLimit::MaxBatch => "max-batch",
            BatchLimit::Slo => "slo",
            BatchLimit::None => "nothing fits",
        }
    }
}

/// The model's answer for one policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyServing {
    /// `craft R=8`, `eplb R=58`, ...
    pub label: String,
    pub policy: String,
    /// R as served (after scaling EPLB to the full model).
    pub replicas_per_gpu: u64,
    pub replica_bytes_per_gpu: u64,
    pub kv_bytes_per_gpu: u64,
    pub kv_tokens_per_gpu: u64,
    pub batch_per_gpu: u64,
    pub limit: BatchLimit,
    pub step_ms: f64,
    /// Decode tokens per second over all GPUs.
    pub goodput: f64,
    pub measured_tokens_per_s: f64,
}

/// The table for one context length.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServingTable {
    pub context_tokens: u64,
    pub rows: Vec<PolicyServing>,
}

impl ServingTable {
    /// Goodput of the best CRAFT entry over EPLB's (None when either is missing or EPLB has none).
    pub fn craft_over_eplb(&self) -> Option<f64> {
        let best = |p: &str| {
            self.rows
                .iter()
                .filter(|r| r.policy == p)
                .map(|r| r.goodput)
                .fold(None, |a: Option<f64>, g| Some(a.map_or(g, |a| a.max(g))))
        };
        let (c, e) = (best("craft")?, best("eplb")?);
        (e > 0.0).then_some(c / e)
    }
}

/// Replicas and bytes of a policy as served.
fn served_replicas(r: &BenchResults, p: &PolicyMeasurement, cfg: &ServingConfig) -> (u64, u64) {
    let (Some(run), Some(full), true) = (&r.model, &r.full_model, cfg.scale_to_full_model) else {
        return (p.replicas_per_gpu as u64, p.replica_bytes_per_gpu);
    };
    if p.policy != "eplb" || run.moe_layers() == 0 || p.replicas_per_gpu == 0 {
        // CRAFT's R is a total over layers: the same budget on the full model.
        let bytes = if p.policy == "craft" {
            p.replicas_per_gpu as u64 * full.bytes_per_expert()
        } else {
            p.replica_bytes_per_gpu
        };
        return (p.replicas_per_gpu as u64, bytes);
    }
    // EPLB: replicas per layer per GPU stay; the layer count becomes the full model's.
    let per_layer = p.replicas_per_gpu as f64 / run.moe_layers() as f64;
    let rr = (per_layer * full.moe_layers() as f64).round() as u64;
    (rr, rr * full.bytes_per_expert())
}

/// Batch per GPU meeting the memory, the engine cap and the SLO; and the step time at that batch.
fn batch_and_step(
    cfg: &ServingConfig,
    gpus: u64,
    tokens_per_s: f64,
    kv_tokens: u64,
) -> (u64, BatchLimit, f64) {
    let per_seq_ms = {
        let moe = gpus as f64 / tokens_per_s * 1e3;
        let kv = cfg.hbm_bandwidth.filter(|b| *b > 0.0).map_or(0.0, |bw| {
            (cfg.context_tokens * cfg.kv_bytes_per_token) as f64 / bw * 1e3
        });
        moe + kv
    };
    let step = |b: u64| cfg.step_overhead_ms + b as f64 * per_seq_ms;
    let mut b = kv_tokens / cfg.context_tokens.max(1);
    let mut limit = BatchLimit::KvCache;
    if let Some(m) = cfg.max_batch {
        if m < b {
            b = m;
            limit = BatchLimit::MaxBatch;
        }
    }
    if let Some(slo) = cfg.tpot_slo_ms {
        let fit = if per_seq_ms > 0.0 {
            ((slo - cfg.step_overhead_ms) / per_seq_ms).floor().max(0.0) as u64
        } else {
            u64::MAX
        };
        if fit < b {
            b = fit;
            limit = BatchLimit::Slo;
        }
    }
    if b == 0 {
        limit = BatchLimit::None;
    }
    (b, limit, step(b))
}

/// The serving model for every policy of `r` at one context length.
pub fn model(r: &BenchResults, cfg: &ServingConfig) -> ServingTable {
    let usable = (cfg.gpu_memory as f64 * cfg.utilization.clamp(0.0, 1.0)) as u64;
    let rows = r
        .policies
        .iter()
        .map(|p| {
            let (rr, bytes) = served_replicas(r, p, cfg);
            let kv = usable.saturating_sub(cfg.weight_bytes_per_gpu + bytes + cfg.reserve_bytes);
            let kv_tokens = kv / cfg.kv_bytes_per_token.max(1);
            let (b, limit, step_ms) = batch_and_step(cfg, r.gpus as u64, p.tokens_per_s, kv_tokens);
            let goodput = if step_ms > 0.0 {
                (b * r.gpus as u64) as f64 / step_ms * 1e3
            } else {
                0.0
            };
            PolicyServing {
                label: format!("{} R={rr}", p.policy),
                policy: p.policy.clone(),
                replicas_per_gpu: rr,
                replica_bytes_per_gpu: bytes,
                kv_bytes_per_gpu: kv,
                kv_tokens_per_gpu: kv_tokens,
                batch_per_gpu: b,
                limit,
                step_ms,
                goodput,
                measured_tokens_per_s: p.tokens_per_s,
            }
        })
        .collect();
    ServingTable {
        context_tokens: cfg.context_tokens,
        rows,
    }
}

/// KV capacity per GPU at which CRAFT's extra KV (EPLB's replica bytes minus CRAFT's) buys
/// `ratio` more sequences: capacity-bound goodput reaches `ratio` only at or below it.
pub fn break_even_kv_bytes(
    eplb_replica_bytes: u64,
    craft_replica_bytes: u64,
    ratio: f64,
) -> Option<f64> {
    let saved = eplb_replica_bytes.saturating_sub(craft_replica_bytes) as f64;
    (ratio > 1.0 && saved > 0.0).then(|| saved / (ratio - 1.0))
}

fn gb(b: f64) -> String {
    format!("{:.2} GB", b / 1e9)
}

/// The tables as text (`markdown = false`) or GitHub markdown, with the CRAFT/EPLB summary.
pub fn render(
    r: &BenchResults,
    cfg: &ServingConfig,
    tables: &[ServingTable],
    markdown: bool,
) -> String {
    let mut out = String::new();
    let head = [
        "policy",
        "replica mem/GPU",
        "KV cache/GPU",
        "KV tokens/GPU",
        "seqs/GPU",
        "limit",
        "step ms",
        "goodput tok/s",
        "vs eplb",
    ];
    let usable = cfg.gpu_memory as f64 * cfg.utilization;
    let setup = format!(
        "{} GPUs ({}, mode {}); per GPU: memory {} x {} usable = {}, weights {}, reserve {}; KV {} bytes/token; overhead {} ms/step{}{}{}",
        r.gpus,
        if r.device.is_empty() { "device ?" } else { r.device.as_str() },
        r.mode.as_str().unwrap_or("?"),
        gb(cfg.gpu_memory as f64),
        cfg.utilization,
        gb(usable),
        gb(cfg.weight_bytes_per_gpu as f64),
        gb(cfg.reserve_bytes as f64),
        cfg.kv_bytes_per_token,
        cfg.step_overhead_ms,
        cfg.hbm_bandwidth.map(|b| format!(", KV reads at {:.2} TB/s", b / 1e12)).unwrap_or_default(),
        cfg.max_batch.map(|m| format!(", max batch {m}")).unwrap_or_default(),
        cfg.tpot_slo_ms.map(|s| format!(", TPOT SLO {s} ms")).unwrap_or_default(),
    );
    if markdown {
        out.push_str(&format!("Serving model: {setup}\n\n"));
    } else {
        out.push_str(&format!("serving model: {setup}\n"));
    }
    if let (Some(run), Some(full), true) = (&r.model, &r.full_model, cfg.scale_to_full_model) {
        if run.moe_layers() != full.moe_layers() {
            out.push_str(&format!(
                "{}EPLB replicas scaled from the {} MoE layers run to the full model's {} (one per GPU per layer); CRAFT keeps its R; bytes per expert {} (full model)\n{}",
                if markdown { "" } else { "note: " },
                run.moe_layers(),
                full.moe_layers(),
                full.bytes_per_expert(),
                if markdown { "\n" } else { "" }
            ));
        }
    }
    let mut ratios = Vec::new();
    for t in tables {
        let eplb = t
            .rows
            .iter()
            .filter(|x| x.policy == "eplb")
            .map(|x| x.goodput)
            .fold(0.0, f64::max);
        let rows: Vec<Vec<String>> = t
            .rows
            .iter()
            .map(|x| {
                vec![
                    x.label.clone(),
                    gb(x.replica_bytes_per_gpu as f64),
                    gb(x.kv_bytes_per_gpu as f64),
                    x.kv_tokens_per_gpu.to_string(),
                    x.batch_per_gpu.to_string(),
                    x.limit.as_str().to_string(),
                    format!("{:.2}", x.step_ms),
                    format!("{:.0}", x.goodput),
                    if eplb > 0.0 {
                        format!("{:.3}x", x.goodput / eplb)
                    } else {
                        "-".into()
                    },
                ]
            })
            .collect();
        if markdown {
            out.push_str(&format!("Context {} tokens:\n\n", t.context_tokens));
            out.push_str(&format!("| {} |\n", head.join(" | ")));
            out.push_str(&format!("|{}\n", "---|".repeat(head.len())));
            for r in &rows {
                out.push_str(&format!("| {} |\n", r.join(" | ")));
            }
            out.push('\n');
        } else {
            out.push_str(&format!("\ncontext {} tokens:\n", t.context_tokens));
            out.push_str(&crate::text::table(&head, &rows));
        }
        if let Some(x) = t.craft_over_eplb() {
            ratios.push((t.context_tokens, x));
        }
    }
    if !ratios.is_empty() {
        let mean = ratios.iter().map(|r| r.1).sum::<f64>() / ratios.len() as f64;
        let (ctx, max) = ratios
            .iter()
            .copied()
            .fold((0, f64::MIN), |a, r| if r.1 > a.1 { r } else { a });
        out.push_str(&format!(
            "\nCRAFT over EPLB goodput: {mean:.3}x on average over {} context length(s), up to {max:.3}x (context {ctx}); the paper reports 1.14x average, up to 1.2x: {}\n",
            ratios.len(),
            if mean >= 1.14 { "reproduced" } else { "not reproduced with these inputs" }
        ));
        let bytes = |p: &str, pick: fn(u64, u64) -> u64| {
            tables.first().and_then(|t| {
                t.rows
                    .iter()
                    .filter(|x| x.policy == p)
                    .map(|x| x.replica_bytes_per_gpu)
                    .reduce(pick)
            })
        };
        if let (Some(e), Some(c)) = (bytes("eplb", u64::max), bytes("craft", u64::min)) {
            if let Some(k) = break_even_kv_bytes(e, c, 1.14) {
                out.push_str(&format!(
                    "when batches are KV-bound and goodput follows the batch, 1.14x needs EPLB's KV cache at or below {} per GPU (CRAFT frees {} per GPU); here EPLB has {}\n",
                    gb(k),
                    gb(e.saturating_sub(c) as f64),
                    gb(tables
                        .first()
                        .and_then(|t| t.rows.iter().find(|x| x.policy == "eplb"))
                        .map_or(0.0, |x| x.kv_bytes_per_gpu as f64))
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(layers: u32, first: u32, experts: u32, h: u64, i: u64) -> ModelShape {
        ModelShape {
            layers,
            first_moe_layer: first,
            experts,
            top_k: 8,
            hidden_size: h,
            expert_intermediate_size: i,
            dtype: crate::plan::Dtype::Fp8,
        }
    }

    fn results(eplb_tps: f64, craft_tps: f64) -> BenchResults {
        let p = |name: &str, r: u32, bytes: u64, tps: f64| PolicyMeasurement {
            policy: name.into(),
            replicas_per_gpu: r,
            replica_bytes_per_gpu: bytes,
            tokens_per_s: tps,
            step_ms: StepMs::default(),
            observed_balancedness: 0.9,
            predicted_balancedness: 0.9,
        };
        BenchResults {
            schema: RESULTS_SCHEMA.into(),
            mode: serde_json::json!("emulated"),
            device: "cuda:0".into(),
            model: None,
            gpus: 64,
            nodes: 8,
            tokens_per_batch: 4096,
            batches: 10,
            policies: vec![
                p("none", 0, 0, 0.8 * eplb_tps),
                p("eplb", 58, 58 * 1_000_000_000 / 20, eplb_tps),
                p("craft", 8, 8 * 1_000_000_000 / 20, craft_tps),
            ],
            full_model: None,
        }
    }

    fn cfg(mem: u64, overhead: f64) -> ServingConfig {
        ServingConfig {
            gpu_memory: mem,
            utilization: 1.0,
            weight_bytes_per_gpu: 10_000_000_000,
            reserve_bytes: 0,
            kv_bytes_per_token: 70_272,
            context_tokens: 4096,
            max_batch: None,
            step_overhead_ms: overhead,
            hbm_bandwidth: None,
            tpot_slo_ms: None,
            scale_to_full_model: true,
        }
    }

    #[test]
    fn kv_capacity_and_batch_follow_the_memory_left() {
        let r = results(1e6, 1e6);
        let t = model(&r, &cfg(30_000_000_000, 0.0));
        let e = &t.rows[1];
        // 30 GB - 10 GB weights - 2.9 GB replicas = 17.1 GB of KV.
        assert_eq!(e.kv_bytes_per_gpu, 17_100_000_000);
        assert_eq!(e.kv_tokens_per_gpu, 17_100_000_000 / 70_272);
        assert_eq!(e.batch_per_gpu, 17_100_000_000 / 70_272 / 4096);
        assert_eq!(e.limit, BatchLimit::KvCache);
        // Without per-step overhead the batch cancels out: goodput = the measured throughput.
        for row in &t.rows {
            assert!(
                (row.goodput - row.measured_tokens_per_s).abs() < 1e-6 * row.goodput,
                "{row:?}"
            );
        }
        assert!((t.craft_over_eplb().unwrap() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn overhead_dominated_goodput_follows_the_batch() {
        let r = results(1e6, 1e6);
        let t = model(&r, &cfg(30_000_000_000, 1e6));
        let (e, c) = (&t.rows[1], &t.rows[2]);
        let want = c.batch_per_gpu as f64 / e.batch_per_gpu as f64;
        let got = t.craft_over_eplb().unwrap();
        assert!((got - want).abs() < 1e-3, "{got} vs batch ratio {want}");
        assert!(got > 1.1, "{got}: 2.5 GB more KV on 17 GB");
        // On an H200-sized GPU the same replicas barely matter.
        let big = model(&r, &cfg(141_000_000_000, 1e6))
            .craft_over_eplb()
            .unwrap();
        assert!(big < 1.03, "{big}");
    }

    #[test]
    fn caps_slo_and_nothing_fits() {
        let r = results(1e6, 1e6);
        let mut c = cfg(141_000_000_000, 5.0);
        c.max_batch = Some(16);
        let t = model(&r, &c);
        assert!(t
            .rows
            .iter()
            .all(|x| x.batch_per_gpu == 16 && x.limit == BatchLimit::MaxBatch));
        // Equal batches: the measured throughput decides (none is slower).
        assert!(t.rows[0].goodput < t.rows[1].goodput);
        let mut c = cfg(141_000_000_000, 5.0);
        // per sequence: 64 / 1e6 s = 0.064 ms; (10 - 5) / 0.064 = 78 sequences.
        c.tpot_slo_ms = Some(10.0);
        let t = model(&r, &c);
        assert_eq!(
            (t.rows[1].batch_per_gpu, t.rows[1].limit),
            (78, BatchLimit::Slo)
        );
        assert!(t.rows[1].step_ms <= 10.0);
        let t = model(&r, &cfg(12_000_000_000, 0.0));
        assert_eq!(
            (t.rows[1].batch_per_gpu, t.rows[1].limit, t.rows[1].goodput),
            (0, BatchLimit::None, 0.0)
        );
        assert_eq!(t.craft_over_eplb(), None, "EPLB serves nothing");
    }

    #[test]
    fn kv_reads_count_with_a_bandwidth() {
        let r = results(1e6, 1e6);
        let mut c = cfg(141_000_000_000, 0.0);
        c.hbm_bandwidth = Some(4.8e12);
        let t = model(&r, &c);
        let e = &t.rows[1];
        let per_seq = 64.0 / 1e6 * 1e3 + 4096.0 * 70_272.0 / 4.8e12 * 1e3;
        assert!((e.step_ms - e.batch_per_gpu as f64 * per_seq).abs() < 1e-9);
    }

    #[test]
    fn eplb_scales_to_the_full_model_and_craft_keeps_its_budget() {
        let mut r = results(1e6, 1e6);
        r.model = Some(shape(7, 3, 256, 7168, 2048)); // 4 MoE layers run
        r.full_model = Some(shape(61, 3, 256, 7168, 2048)); // 58 in the model
        r.policies[1].replicas_per_gpu = 4;
        let bpe = shape(61, 3, 256, 7168, 2048).bytes_per_expert();
        let t = model(&r, &cfg(141_000_000_000, 0.0));
        assert_eq!(
            (t.rows[1].replicas_per_gpu, t.rows[1].replica_bytes_per_gpu),
            (58, 58 * bpe)
        );
        assert_eq!(
            (t.rows[2].replicas_per_gpu, t.rows[2].replica_bytes_per_gpu),
            (8, 8 * bpe)
        );
        assert_eq!(t.rows[0].replica_bytes_per_gpu, 0);
        let mut c = cfg(141_000_000_000, 0.0);
        c.scale_to_full_model = false;
        assert_eq!(model(&r, &c).rows[1].replicas_per_gpu, 4);
    }

    #[test]
    fn break_even_and_rendering() {
        // 2.5 GB freed buys 14% more only on at most 17.86 GB of KV.
        let k = break_even_kv_bytes(2_900_000_000, 400_000_000, 1.14).unwrap();
        assert!((k - 2.5e9 / 0.14).abs() < 1.0);
        assert_eq!(break_even_kv_bytes(1, 2, 1.14), None);
        let r = results(1e6, 0.98e6);
        let c = cfg(30_000_000_000, 1e6);
        let t = model(&r, &c);
        let text = render(&r, &c, std::slice::from_ref(&t), false);
        assert!(text.contains("context 4096 tokens:"), "{text}");
        assert!(
            text.contains("eplb R=58") && text.contains("1.000x"),
            "{text}"
        );
        assert!(
            text.contains("CRAFT over EPLB goodput:") && text.contains("1.2x: reproduced"),
            "{text}"
        );
        let md = render(&r, &c, &[t], true);
        assert!(md.contains("| policy | replica mem/GPU |"), "{md}");
        assert!(md.contains("|---|---|"), "{md}");
    }

    #[test]
    fn results_are_checked() {
        let ok = serde_json::to_vec(&results(1.0, 1.0)).unwrap();
        assert!(parse_results("r.json", &ok).is_ok());
        let mut bad = results(1.0, 1.0);
        bad.schema = "other".into();
        let e = parse_results("r.json", &serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(
            e.contains("r.json") && e.contains("moe-bench-policies/v1"),
            "{e}"
        );
        let mut bad = results(1.0, 1.0);
        bad.policies[2].tokens_per_s = 0.0;
        let e = parse_results("r.json", &serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(e.contains("policies[2] (craft)"), "{e}");
        let e = parse_results("r.json", b"{\"schema\": 3}").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
    }
}
