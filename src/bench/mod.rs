//! The policy throughput testbed (`moectl bench policies`): plan each replication policy, run real
//! expert FFN compute on the plan, driven by the same per-batch top-k routing as `moectl loadgen`,
//! and report tokens/s, step-time percentiles, balancedness and replica memory per GPU.
//!
//! This module holds the pure parts (policy list, model presets, trace fitting, splitting a rank's
//! rows by expert, aggregating step times, the report and its JSON schema). [`emulate`] runs the
//! ranks on one device, [`workers`] runs real `moe-worker`s; the CLI is `crate::cli::bench`.

pub mod emulate;
pub mod ranks;
pub mod steptime;
pub mod workers;

use serde::{Deserialize, Serialize};

use crate::loadgen::route::{balancedness, percentile, RoutedRow};
use crate::plan::{Algorithm, Dtype, LoadWindow, ModelShape};

/// The `schema` field of the results JSON.
pub const SCHEMA: &str = "moe-bench-policies/v1";

/// How the ranks ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// D ranks on one device, one after another; a layer takes as long as its slowest rank.
    Emulated,
    /// One real `moe-worker` per rank, driven by the load generator over the dispatch protocol.
    Workers,
    /// One process per rank on a GPU transport (the data plane, `--transport`), next to the
    /// emulated ranks on the same draws.
    Ranks,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Emulated => "emulated",
            Mode::Workers => "workers",
            Mode::Ranks => "ranks",
        }
    }
}

/// One policy of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicySpec {
    pub algorithm: Algorithm,
    /// Extra expert slots per GPU summed over layers (R).
    pub replicas_per_gpu: u32,
}

/// The policies in report order: none, placement only, EPLB with one redundant expert per GPU per
/// layer (R = MoE layers), then CRAFT at each budget.
pub fn policy_specs(moe_layers: u32, budgets: &[u32]) -> Vec<PolicySpec> {
    let mut v = vec![
        PolicySpec {
            algorithm: Algorithm::None,
            replicas_per_gpu: 0,
        },
        PolicySpec {
            algorithm: Algorithm::Placement,
            replicas_per_gpu: 0,
        },
        PolicySpec {
            algorithm: Algorithm::Eplb,
            replicas_per_gpu: moe_layers,
        },
    ];
    v.extend(budgets.iter().map(|&r| PolicySpec {
        algorithm: Algorithm::Craft,
        replicas_per_gpu: r,
    }));
    v
}

/// Named model shapes (`--preset`).
pub fn preset(name: &str) -> Result<ModelShape, String> {
    match name {
        "qwen3-30b-a3b" => Ok(ModelShape {
            layers: 48,
            first_moe_layer: 0,
            experts: 128,
            top_k: 8,
            hidden_size: 2048,
            expert_intermediate_size: 768,
            dtype: Dtype::Bf16,
        }),
        "deepseek-v3" => Ok(ModelShape {
            layers: 61,
            first_moe_layer: 3,
            experts: 256,
            top_k: 8,
            hidden_size: 7168,
            expert_intermediate_size: 2048,
            dtype: Dtype::Fp8,
        }),
        other => Err(format!(
            "--preset {other:?}: expected qwen3-30b-a3b or deepseek-v3"
        )),
    }
}

/// Batch sizes by regime, in tokens per expert (tokens x top-k / experts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Regime {
    /// 16 tokens per expert: weight reads dominate (memory-bound).
    Decode,
    /// 256 tokens per expert: the GEMMs dominate (compute-bound).
    Prefill,
}

impl Regime {
    pub fn tokens_per_expert(self) -> u64 {
        match self {
            Regime::Decode => 16,
            Regime::Prefill => 256,
        }
    }

    /// Tokens per batch that give this many tokens per expert on average.
    pub fn tokens_per_batch(self, model: &ModelShape) -> usize {
        let t = self.tokens_per_expert() * model.experts as u64 / model.top_k.max(1) as u64;
        t.max(1) as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Regime::Decode => "decode",
            Regime::Prefill => "prefill",
        }
    }
}

/// The model limited to its first `k` MoE layers (a layer subset of a large model).
pub fn first_moe_layers(model: &ModelShape, k: u32) -> Result<ModelShape, String> {
    if k == 0 || k > model.moe_layers() {
        return Err(format!(
            "--layers {k}: must be between 1 and the model's {} MoE layers",
            model.moe_layers()
        ));
    }
    Ok(ModelShape {
        layers: model.first_moe_layer + k,
        ..model.clone()
    })
}

/// The trace as a window over exactly the model layers `ids`: the trace's own layers when it has
/// them all, else its layers by position, cycled when it has fewer than the model (the note says
/// which). Errors when the expert counts differ.
pub fn fit_window(
    window: &LoadWindow,
    ids: &[u32],
) -> Result<(LoadWindow, Option<String>), String> {
    let e = window.experts();
    if ids.is_empty() {
        return Err("the model has no MoE layer to run".into());
    }
    let by_id: Option<Vec<usize>> = ids
        .iter()
        .map(|id| window.layer_ids().iter().position(|x| x == id))
        .collect();
    let (map, note) = match by_id {
        Some(m) => (m, None),
        None => {
            let n = window.layers();
            let m: Vec<usize> = (0..ids.len()).map(|i| i % n).collect();
            let note = format!(
                "the trace's layers {:?} do not name the model's MoE layers {}..={}: trace layer i drives MoE layer i{}",
                window.layer_ids(),
                ids[0],
                ids[ids.len() - 1],
                if n < ids.len() {
                    format!(" (the trace's {n} layers cycled over {} MoE layers)", ids.len())
                } else {
                    String::new()
                }
            );
            (m, Some(note))
        }
    };
    let mut counts = Vec::with_capacity(window.batches() * ids.len() * e);
    for b in 0..window.batches() {
        for &l in &map {
            counts.extend_from_slice(window.row(b, l));
        }
    }
    let fitted = LoadWindow::new(ids.to_vec(), e, counts).map_err(|e| e.to_string())?;
    Ok((fitted, note))
}

/// One rank's rows of one layer, grouped by expert (ascending), as a backend wants them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RankShare {
    /// Distinct experts with rows, ascending.
    pub experts: Vec<u32>,
    /// Rows of each of `experts`.
    pub counts: Vec<usize>,
    /// Per row, in expert order: the logical expert (repeated), router weight and pool index.
    pub row_experts: Vec<u32>,
    pub weights: Vec<f32>,
    pub pool_rows: Vec<u32>,
}

impl RankShare {
    /// Groups routed rows by expert, keeping the routing order within an expert.
    pub fn from_rows(rows: &[RoutedRow]) -> Self {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].0);
        let mut s = RankShare::default();
        for i in order {
            let (e, w, x) = rows[i];
            if s.experts.last() != Some(&e) {
                s.experts.push(e);
                s.counts.push(0);
            }
            *s.counts.last_mut().expect("pushed") += 1;
            s.row_experts.push(e);
            s.weights.push(w);
            s.pool_rows.push(x);
        }
        s
    }

    pub fn rows(&self) -> usize {
        self.row_experts.len()
    }

    /// The rows' hidden vectors gathered from the pool, row-major.
    pub fn gather<T: Copy>(&self, pool: &[T], hidden: usize) -> Vec<T> {
        let mut x = Vec::with_capacity(self.rows() * hidden);
        for &p in &self.pool_rows {
            let at = p as usize * hidden;
            x.extend_from_slice(&pool[at..at + hidden]);
        }
        x
    }
}

/// Step-time percentiles in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

impl StepMs {
    /// From unsorted samples in seconds.
    pub fn of_seconds(samples: &[f64]) -> Self {
        let mut s: Vec<f64> = samples.iter().map(|x| x * 1e3).collect();
        s.sort_by(f64::total_cmp);
        let mean = if s.is_empty() {
            0.0
        } else {
            s.iter().sum::<f64>() / s.len() as f64
        };
        Self {
            p50: percentile(&s, 0.5),
            p90: percentile(&s, 0.9),
            p99: percentile(&s, 0.99),
            mean,
        }
    }
}

/// Per-layer figures of one policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerResult {
    pub layer: u32,
    pub step_ms: StepMs,
    pub observed_balancedness: f64,
}

/// What one policy's run measured (before the plan's figures are added).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    pub batches: usize,
    pub tokens: u64,
    pub rows: u64,
    /// Summed layer steps: the time the expert compute took.
    pub compute_seconds: f64,
    /// The whole run, routing and input staging included.
    pub wall_seconds: f64,
    /// One layer's step over every (batch, layer).
    pub step_ms: StepMs,
    pub layers: Vec<LayerResult>,
    pub observed_balancedness: f64,
    /// Per rank, rows over the run (emulated mode) or empty.
    pub rank_rows: Vec<u64>,
}

/// Collects the emulation's per-rank times: a layer takes as long as its slowest rank (the
/// expert-parallel barrier) and a batch as long as its layers together.
pub struct StepRecorder {
    layer_ids: Vec<u32>,
    per_layer: Vec<Vec<f64>>,
    bal_sum: Vec<f64>,
    bal_n: Vec<u64>,
    rank_rows: Vec<u64>,
    rows: u64,
    batches: usize,
}

impl StepRecorder {
    pub fn new(layer_ids: Vec<u32>, ranks: usize) -> Self {
        let n = layer_ids.len();
        Self {
            layer_ids,
            per_layer: vec![Vec::new(); n],
            bal_sum: vec![0.0; n],
            bal_n: vec![0; n],
            rank_rows: vec![0; ranks],
            rows: 0,
            batches: 0,
        }
    }

    /// One layer of one batch: each rank's seconds and rows. Returns the layer's time.
    pub fn layer(&mut self, li: usize, rank_seconds: &[f64], rank_rows: &[u64]) -> f64 {
        let step = rank_seconds.iter().copied().fold(0.0, f64::max);
        self.per_layer[li].push(step);
        if let Some(b) = balancedness(rank_rows) {
            self.bal_sum[li] += b;
            self.bal_n[li] += 1;
        }
        for (t, r) in self.rank_rows.iter_mut().zip(rank_rows) {
            *t += r;
        }
        self.rows += rank_rows.iter().sum::<u64>();
        step
    }

    pub fn end_batch(&mut self) {
        self.batches += 1;
    }

    pub fn finish(self, tokens_per_batch: usize, wall_seconds: f64) -> Measured {
        let layers: Vec<LayerResult> = self
            .layer_ids
            .iter()
            .enumerate()
            .map(|(li, &layer)| LayerResult {
                layer,
                step_ms: StepMs::of_seconds(&self.per_layer[li]),
                observed_balancedness: if self.bal_n[li] > 0 {
                    self.bal_sum[li] / self.bal_n[li] as f64
                } else {
                    0.0
                },
            })
            .collect();
        let observed = if layers.is_empty() {
            0.0
        } else {
            layers.iter().map(|l| l.observed_balancedness).sum::<f64>() / layers.len() as f64
        };
        let steps: Vec<f64> = self.per_layer.into_iter().flatten().collect();
        Measured {
            batches: self.batches,
            tokens: self.batches as u64 * tokens_per_batch as u64,
            rows: self.rows,
            compute_seconds: steps.iter().sum(),
            wall_seconds,
            step_ms: StepMs::of_seconds(&steps),
            layers,
            observed_balancedness: observed,
            rank_rows: self.rank_rows,
        }
    }
}

/// One policy's line of the results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyResult {
    /// "none", "placement", "eplb" or "craft".
    pub policy: String,
    pub replicas_per_gpu: u32,
    pub replica_bytes_per_gpu: u64,
    pub replica_mib_per_gpu: f64,
    /// Tokens over the summed layer steps (the expert compute; routing and staging excluded).
    pub tokens_per_s: f64,
    /// One layer's step (its slowest rank), over every batch and layer.
    pub step_ms: StepMs,
    /// Mean over layers and batches of mean/max rows per GPU, as routed.
    pub observed_balancedness: f64,
    /// The plan's balancedness on the trace it was made from.
    pub predicted_balancedness: f64,
    pub plan_hash: String,
    pub batches: usize,
    pub tokens: u64,
    pub rows: u64,
    /// Tokens over the run's wall time, routing and input staging included.
    pub wall_tokens_per_s: f64,
    pub layers: Vec<LayerResult>,
    /// The step-time model's mean layer step for this plan and trace at the run's tokens per
    /// batch and dispatch (`plan::step_cost`, one H200 in bf16), next to the measured `step_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_layer_ms: Option<f64>,
}

impl PolicyResult {
    pub fn new(plan: &crate::plan::ExpertPlan, m: &Measured) -> Self {
        let per = |secs: f64| {
            if secs > 0.0 {
                m.tokens as f64 / secs
            } else {
                0.0
            }
        };
        PolicyResult {
            policy: plan.algorithm.to_string(),
            replicas_per_gpu: plan.replicas_per_gpu,
            replica_bytes_per_gpu: plan.replica_bytes_per_gpu,
            replica_mib_per_gpu: plan.replica_bytes_per_gpu as f64 / (1u64 << 20) as f64,
            tokens_per_s: per(m.compute_seconds),
            step_ms: m.step_ms.clone(),
            observed_balancedness: m.observed_balancedness,
            predicted_balancedness: plan.stats.as_ref().map_or(0.0, |s| s.balancedness),
            plan_hash: plan.hash.clone(),
            batches: m.batches,
            tokens: m.tokens,
            rows: m.rows,
            wall_tokens_per_s: per(m.wall_seconds),
            layers: m.layers.clone(),
            model_layer_ms: None,
        }
    }
}

/// The results document (`moe-bench-policies/v1`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub schema: String,
    pub mode: Mode,
    pub device: String,
    /// The model as planned and run (a `--layers` subset has fewer layers).
    pub model: ModelShape,
    pub gpus: u32,
    pub nodes: u32,
    pub tokens_per_batch: usize,
    pub batches: usize,
    pub policies: Vec<PolicyResult>,
    /// What the mode means for these figures, in words.
    pub mode_note: String,
    /// Notes on the weights, the trace and anything else that bears on the figures.
    pub notes: Vec<String>,
    /// Average tokens per expert per layer (tokens x top-k / experts).
    pub tokens_per_expert: f64,
    pub regime: Option<String>,
    pub seed: u64,
    pub trace: String,
    /// The whole model when `model` is a layer subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_model: Option<ModelShape>,
}

impl BenchReport {
    /// The table printed on stdout.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{} mode on {}: {} ranks ({} nodes), {} MoE layers x {} experts (top-{}, H {}, I {}), {} tokens/batch ({:.1} per expert), {} batches\n{}\n",
            self.mode.as_str(),
            self.device,
            self.gpus,
            self.nodes,
            self.model.moe_layers(),
            self.model.experts,
            self.model.top_k,
            self.model.hidden_size,
            self.model.expert_intermediate_size,
            self.tokens_per_batch,
            self.tokens_per_expert,
            self.batches,
            self.mode_note,
        );
        s.push_str(&format!(
            "{:<10} {:>4} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9}\n",
            "policy",
            "R",
            "replica MiB",
            "tokens/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "observed",
            "predicted",
            "vs none",
            "model ms"
        ));
        let base = self
            .policies
            .iter()
            .find(|p| p.policy == "none")
            .map(|p| p.tokens_per_s);
        for p in &self.policies {
            let rel = match base {
                Some(b) if b > 0.0 => format!("{:.3}x", p.tokens_per_s / b),
                _ => "-".into(),
            };
            s.push_str(&format!(
                "{:<10} {:>4} {:>12.1} {:>12.0} {:>9.3} {:>9.3} {:>9.3} {:>9.4} {:>9.4} {:>8} {:>9}\n",
                p.policy,
                p.replicas_per_gpu,
                p.replica_mib_per_gpu,
                p.tokens_per_s,
                p.step_ms.p50,
                p.step_ms.p90,
                p.step_ms.p99,
                p.observed_balancedness,
                p.predicted_balancedness,
                rel,
                p.model_layer_ms.map_or("-".into(), |m| format!("{m:.3}"))
            ));
        }
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        s
    }

    /// The same table in Markdown, for `benches/results/`.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "**{}** mode on `{}`: {} ranks on {} nodes, {} MoE layers x {} experts, top-{}, hidden {}, expert intermediate {}; {} tokens per batch ({:.1} per expert{}), {} batches, seed {}, trace `{}`.\n\n{}\n\n",
            self.mode.as_str(),
            self.device,
            self.gpus,
            self.nodes,
            self.model.moe_layers(),
            self.model.experts,
            self.model.top_k,
            self.model.hidden_size,
            self.model.expert_intermediate_size,
            self.tokens_per_batch,
            self.tokens_per_expert,
            self.regime.as_ref().map(|r| format!(", {r}")).unwrap_or_default(),
            self.batches,
            self.seed,
            self.trace,
            self.mode_note,
        );
        s.push_str("| policy | R | replica MiB/GPU | tokens/s | step p50 ms | p90 ms | p99 ms | observed bal. | predicted bal. | model step ms |\n|---|---|---|---|---|---|---|---|---|---|\n");
        for p in &self.policies {
            s.push_str(&format!(
                "| {} | {} | {:.1} | {:.0} | {:.3} | {:.3} | {:.3} | {:.4} | {:.4} | {} |\n",
                p.policy,
                p.replicas_per_gpu,
                p.replica_mib_per_gpu,
                p.tokens_per_s,
                p.step_ms.p50,
                p.step_ms.p90,
                p.step_ms.p99,
                p.observed_balancedness,
                p.predicted_balancedness,
                p.model_layer_ms.map_or("-".into(), |m| format!("{m:.3}"))
            ));
        }
        for n in &self.notes {
            s.push_str(&format!("\n- {n}"));
        }
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_come_in_report_order() {
        let p = policy_specs(48, &[8, 16]);
        let names: Vec<String> = p.iter().map(|s| s.algorithm.to_string()).collect();
        assert_eq!(names, ["none", "placement", "eplb", "craft", "craft"]);
        assert_eq!(
            p.iter().map(|s| s.replicas_per_gpu).collect::<Vec<_>>(),
            [0, 0, 48, 8, 16]
        );
    }

    #[test]
    fn presets_and_regimes() {
        let q = preset("qwen3-30b-a3b").unwrap();
        assert_eq!(q.moe_layers(), 48);
        // ~58 GB of experts in bf16.
        let all = q.bytes_per_expert() * 48 * 128;
        assert!((57e9..60e9).contains(&(all as f64)), "{all}");
        assert_eq!(Regime::Decode.tokens_per_batch(&q), 256);
        assert_eq!(Regime::Prefill.tokens_per_batch(&q), 4096);
        let d = preset("deepseek-v3").unwrap();
        assert_eq!((d.moe_layers(), d.experts), (58, 256));
        let sub = first_moe_layers(&d, 4).unwrap();
        assert_eq!(
            (sub.first_moe_layer, sub.layers, sub.moe_layers()),
            (3, 7, 4)
        );
        assert!(first_moe_layers(&d, 59)
            .unwrap_err()
            .contains("58 MoE layers"));
        assert!(preset("gpt-4").unwrap_err().contains("qwen3-30b-a3b"));
    }

    fn window(ids: Vec<u32>, e: usize, batches: usize) -> LoadWindow {
        let n = ids.len() * e * batches;
        LoadWindow::new(ids, e, (0..n).map(|i| i as f64).collect()).unwrap()
    }

    #[test]
    fn fit_window_by_id_by_position_and_cycled() {
        let w = window(vec![3, 4, 5], 2, 2);
        let (f, note) = fit_window(&w, &[4, 5]).unwrap();
        assert!(note.is_none());
        assert_eq!(f.row(1, 0), w.row(1, 1));
        let (f, note) = fit_window(&w, &[10, 11, 12, 13]).unwrap();
        assert!(note.unwrap().contains("cycled"));
        assert_eq!(f.layer_ids(), [10, 11, 12, 13]);
        assert_eq!(f.row(1, 3), w.row(1, 0));
        assert_eq!(f.row(0, 2), w.row(0, 2));
        let (_, note) = fit_window(&w, &[0, 1]).unwrap();
        assert!(!note.unwrap().contains("cycled"));
    }

    #[test]
    fn rank_share_groups_rows_by_expert_and_keeps_them() {
        let rows: Vec<RoutedRow> = vec![
            (5, 0.1, 0),
            (2, 0.2, 1),
            (5, 0.3, 2),
            (2, 0.4, 3),
            (9, 0.5, 4),
        ];
        let s = RankShare::from_rows(&rows);
        assert_eq!(s.experts, [2, 5, 9]);
        assert_eq!(s.counts, [2, 2, 1]);
        assert_eq!(s.row_experts, [2, 2, 5, 5, 9]);
        assert_eq!(s.weights, [0.2, 0.4, 0.1, 0.3, 0.5]);
        assert_eq!(s.pool_rows, [1, 3, 0, 2, 4]);
        let pool: Vec<u16> = (0..10).collect();
        assert_eq!(s.gather(&pool, 2), [2, 3, 6, 7, 0, 1, 4, 5, 8, 9]);
        assert_eq!(RankShare::from_rows(&[]).rows(), 0);
    }

    #[test]
    fn recorder_takes_the_slowest_rank_and_sums_layers() {
        let mut r = StepRecorder::new(vec![0, 1], 2);
        assert_eq!(r.layer(0, &[0.001, 0.003], &[10, 30]), 0.003);
        assert_eq!(r.layer(1, &[0.002, 0.002], &[20, 20]), 0.002);
        r.end_batch();
        r.layer(0, &[0.004, 0.001], &[40, 0]);
        r.layer(1, &[0.001, 0.001], &[5, 5]);
        r.end_batch();
        let m = r.finish(100, 1.0);
        assert_eq!((m.batches, m.tokens, m.rows), (2, 200, 130));
        assert!((m.compute_seconds - 0.010).abs() < 1e-12);
        assert_eq!(m.rank_rows, [75, 55]);
        // Layer 0: (20/30 + 20/40) / 2; layer 1: 1.
        let l0 = (20.0 / 30.0 + 0.5) / 2.0;
        assert!((m.layers[0].observed_balancedness - l0).abs() < 1e-12);
        assert!((m.observed_balancedness - (l0 + 1.0) / 2.0).abs() < 1e-12);
        assert_eq!(m.layers[0].step_ms.p50, 3.0);
        assert_eq!(m.step_ms.p99, 4.0);
    }
}
