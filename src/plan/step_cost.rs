//! A step-time model of the routed-expert FFN, for planning and dispatch that aim at step time
//! rather than at even token rows.
//!
//! Per EP rank and MoE layer, every expert the rank serves costs the longer of reading its weights
//! and computing its rows (a roofline per expert: the grouped GEMM streams one expert's weights
//! while it multiplies that expert's rows), and the layer costs one fixed launch on top. The layer
//! waits for its slowest rank; a step is the sum over the MoE layers. So a replica halves its
//! expert's rows on each GPU but makes a second GPU read the same weights: it pays where rows
//! dominate (prefill) and can cost more than it saves where weight reads dominate (decode).
//!
//! The constants are fitted to the worker's own kernel measurements ([`fit`] on
//! `examples/bench_ffn`'s JSON, which `benches/gpu/expert_ffn.py` writes); `moectl calibrate`
//! redoes the fit for another GPU (docs/planner.md, "Step time").

use serde::{Deserialize, Serialize};

use super::balance::{plan_layer, plan_replicas, LayerMatrix};
use super::expert_plan::ExpertPlan;
use super::load::LoadWindow;
use super::model::{ModelShape, ShapeError};

/// Launch cost, memory bandwidth and compute rate of one GPU's expert FFN.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CostModel {
    /// Fixed cost of one rank's layer (the kernels' launches and tails), seconds.
    pub launch_s: f64,
    /// Bytes of expert weights read per second.
    pub bytes_per_s: f64,
    /// FFN FLOP per second (`6 * rows * hidden * intermediate` per expert).
    pub flops_per_s: f64,
}

impl CostModel {
    /// One H200, bf16: [`fit`] of `benches/results/worker-gpu-2026-12-04-2124.json` (the test
    /// `the_h200_constants_are_the_fit_of_the_recorded_run` redoes it).
    pub const H200_BF16: CostModel = CostModel {
        launch_s: 1.20e-4,
        bytes_per_s: 4.22e12,
        flops_per_s: 5.42e14,
    };

    /// One expert's FFN over `rows` token rows: 0 without rows (its weights are not read).
    pub fn expert_s(&self, rows: f64, m: &ModelShape) -> f64 {
        if rows <= 0.0 {
            return 0.0;
        }
        let read = m.bytes_per_expert() as f64 / self.bytes_per_s;
        let compute = 6.0 * rows * m.hidden_size as f64 * m.expert_intermediate_size as f64
            / self.flops_per_s;
        read.max(compute)
    }

    /// One rank's layer: the launch, then each expert it serves with rows.
    pub fn rank_s(&self, rows: impl IntoIterator<Item = f64>, m: &ModelShape) -> f64 {
        self.launch_s + rows.into_iter().map(|r| self.expert_s(r, m)).sum::<f64>()
    }

    /// One layer of `gpus` ranks: each `(gpu, rows)` is one replica's rows on its GPU (GPUs out
    /// of range are ignored); the layer takes its slowest rank. `scratch` holds the ranks' times.
    pub fn layer_s(
        &self,
        m: &ModelShape,
        gpus: usize,
        replica_rows: impl IntoIterator<Item = (usize, f64)>,
        scratch: &mut Vec<f64>,
    ) -> f64 {
        scratch.clear();
        scratch.resize(gpus, self.launch_s);
        for (g, rows) in replica_rows {
            if let Some(t) = scratch.get_mut(g) {
                *t += self.expert_s(rows, m);
            }
        }
        scratch.iter().copied().fold(0.0, f64::max)
    }
}

/// The H200's copy bandwidth as measured on the device (issue "7 of 10"'s ceiling), bytes/s.
pub const H200_COPY_BYTES_PER_S: f64 = 4.22e12;

impl Default for CostModel {
    fn default() -> Self {
        Self::H200_BF16
    }
}

/// A cost model from a JSON file (`moectl calibrate -o`), or the H200 default without one.
/// Refuses constants that are not positive finite numbers (zero launch allowed).
pub fn read_cost_model(path: Option<&std::path::Path>) -> Result<CostModel, String> {
    let Some(p) = path else {
        return Ok(CostModel::default());
    };
    let text = std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()))?;
    let c: CostModel = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a cost model ({e})", p.display()))?;
    let ok = |x: f64| x.is_finite() && x > 0.0;
    if !(c.launch_s.is_finite() && c.launch_s >= 0.0 && ok(c.bytes_per_s) && ok(c.flops_per_s)) {
        return Err(format!(
            "{}: every constant must be a positive number",
            p.display()
        ));
    }
    Ok(c)
}

/// What a plan's step costs on a window, scaled to `tokens_per_step` tokens per step.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepEstimate {
    /// Mean over the window's batches of the step (the sum over MoE layers of the slowest rank).
    pub step_s: f64,
    /// The same step with every GPU's rows as even as the batch allows and no weight read twice:
    /// the bound a perfect plan approaches.
    pub ideal_step_s: f64,
    /// Per MoE layer (the window's order), mean over batches of the slowest rank.
    pub layer_s: Vec<f64>,
    pub tokens_per_step: f64,
}

/// How a step's rows of a replicated expert are split between its replicas.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "camelCase")]
pub enum Dispatch {
    /// The plan's fixed per-replica shares.
    #[default]
    Shares,
    /// Per batch and layer, [`super::dispatch::dispatch`]: the split the cost model prefers.
    Step,
}

/// The step time of `plan` on every batch of `window`, each batch scaled to `tokens_per_step`
/// tokens (each routed to `top_k` experts), the plan's shares splitting each expert's rows.
pub fn step_time(
    plan: &ExpertPlan,
    window: &LoadWindow,
    cost: &CostModel,
    tokens_per_step: f64,
) -> Result<StepEstimate, ShapeError> {
    step_time_dispatched(plan, window, cost, tokens_per_step, Dispatch::Shares)
}

/// [`step_time`] with the given dispatch.
pub fn step_time_dispatched(
    plan: &ExpertPlan,
    window: &LoadWindow,
    cost: &CostModel,
    tokens_per_step: f64,
    dispatch: Dispatch,
) -> Result<StepEstimate, ShapeError> {
    let m = &plan.model;
    if window.experts() != m.experts as usize {
        return Err(ShapeError::PlanExperts {
            load: window.experts(),
            plan: m.experts,
        });
    }
    let gpus = plan.gpus as usize;
    let rows_per_step = tokens_per_step * f64::from(m.top_k);
    let mut layer_s = vec![0.0; window.layers()];
    let (mut step, mut ideal) = (0.0, 0.0);
    let mut ranks = Vec::with_capacity(gpus);
    for (wl, &id) in window.layer_ids().iter().enumerate() {
        let lp = plan_layer(plan, id)?;
        // The GPUs of each expert's replicas, for the per-batch dispatch (once per layer).
        let mut hosts: Vec<Vec<usize>> = Vec::new();
        if dispatch == Dispatch::Step {
            hosts = vec![Vec::new(); window.experts()];
            for (g, e, _) in plan_replicas(lp) {
                if let Some(h) = hosts.get_mut(e) {
                    if g < gpus && !h.contains(&g) {
                        h.push(g);
                    }
                }
            }
        }
        for b in 0..window.batches() {
            let row = window.row(b, wl);
            let total: f64 = row.iter().sum();
            if total <= 0.0 {
                continue;
            }
            let scale = rows_per_step / total;
            let slowest = match dispatch {
                Dispatch::Shares => cost.layer_s(
                    m,
                    gpus,
                    plan_replicas(lp).filter_map(|(g, e, share)| {
                        Some((g, row.get(e)? * scale * f64::from(share)))
                    }),
                    &mut ranks,
                ),
                Dispatch::Step => {
                    let rows: Vec<f64> = row.iter().map(|c| c * scale).collect();
                    let split = super::dispatch::dispatch(&rows, &hosts, gpus, cost, m);
                    let placed = hosts
                        .iter()
                        .zip(&split)
                        .flat_map(|(h, s)| h.iter().copied().zip(s.iter().copied()));
                    cost.layer_s(m, gpus, placed, &mut ranks)
                }
            };
            layer_s[wl] += slowest;
            // Ideal: each expert's weights read once, the rows spread evenly over the GPUs.
            let active = row.iter().filter(|&&c| c > 0.0).count() as f64;
            let read = active * m.bytes_per_expert() as f64 / cost.bytes_per_s / gpus as f64;
            let compute =
                6.0 * rows_per_step * m.hidden_size as f64 * m.expert_intermediate_size as f64
                    / cost.flops_per_s
                    / gpus as f64;
            ideal += cost.launch_s + read.max(compute);
        }
    }
    let batches = window.batches().max(1) as f64;
    for s in &mut layer_s {
        *s /= batches;
        step += *s;
    }
    Ok(StepEstimate {
        step_s: step,
        ideal_step_s: ideal / batches,
        layer_s,
        tokens_per_step,
    })
}

/// The planner's step-time objective (`CraftOptions::step`): CRAFT's per-layer replica counts
/// chosen by the step time they save at `tokens_per_step` tokens per step, instead of the
/// balancedness they gain. The placement within a layer still levels token rows.
#[derive(Clone, Debug, PartialEq)]
pub struct StepObjective {
    pub cost: CostModel,
    pub tokens_per_step: f64,
    pub model: ModelShape,
}

impl StepObjective {
    /// Mean over `m`'s batches of the layer's slowest rank, the replicas `(gpu, expert, share)`
    /// splitting each expert's rows, each batch scaled to `tokens_per_step`.
    pub fn layer_s(
        &self,
        m: &LayerMatrix,
        gpus: usize,
        replicas: impl Iterator<Item = (usize, usize, f32)>,
    ) -> f64 {
        let replicas: Vec<(usize, usize, f32)> = replicas
            .filter(|&(g, e, _)| g < gpus && e < m.experts)
            .collect();
        let rows_per_step = self.tokens_per_step * f64::from(self.model.top_k);
        let mut ranks = Vec::with_capacity(gpus);
        let mut sum = 0.0;
        for b in 0..m.batches {
            let total = f64::from(m.batch_totals[b]);
            if total <= 0.0 {
                continue;
            }
            let scale = rows_per_step / total;
            let rows = replicas
                .iter()
                .map(|&(g, e, share)| (g, f64::from(m.expert(e)[b]) * scale * f64::from(share)));
            sum += self.cost.layer_s(&self.model, gpus, rows, &mut ranks);
        }
        sum / m.batches.max(1) as f64
    }
}

/// One measured FFN: a model shape, the rows each expert got, and the time it took.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub shape: ModelShape,
    pub rows: Vec<f64>,
    pub seconds: f64,
}

/// The model that best predicts `samples` (least squares on the log of predicted over measured
/// time, so that fast and slow rows weigh alike): a coordinate search over the three constants in
/// log space, from [`CostModel::H200_BF16`], the bandwidth held at or below `max_bytes_per_s` (the
/// device's measured copy bandwidth: left free, the fit trades launch time for a bandwidth the
/// memory cannot deliver). Returns the model and its largest relative error.
pub fn fit(samples: &[Sample], max_bytes_per_s: f64) -> (CostModel, f64) {
    let error = |c: &CostModel| -> f64 {
        samples
            .iter()
            .map(|s| {
                (c.rank_s(s.rows.iter().copied(), &s.shape) / s.seconds)
                    .ln()
                    .powi(2)
            })
            .sum()
    };
    let mut c = CostModel::H200_BF16;
    c.bytes_per_s = c.bytes_per_s.min(max_bytes_per_s);
    let mut best = error(&c);
    let mut step = 0.5f64;
    while step > 1e-4 {
        let mut moved = false;
        for k in 0..3 {
            for dir in [1.0, -1.0] {
                let f = (dir * step).exp();
                let mut t = c;
                match k {
                    0 => t.launch_s *= f,
                    1 => t.bytes_per_s *= f,
                    _ => t.flops_per_s *= f,
                }
                if t.bytes_per_s > max_bytes_per_s {
                    continue;
                }
                let e = error(&t);
                if e < best {
                    (c, best, moved) = (t, e, true);
                }
            }
        }
        if !moved {
            step /= 2.0;
        }
    }
    let worst = samples
        .iter()
        .map(|s| (c.rank_s(s.rows.iter().copied(), &s.shape) / s.seconds - 1.0).abs())
        .fold(0.0, f64::max);
    (c, worst)
}

/// `examples/bench_ffn`'s row counts (it calls this): `tpe * experts` rows, expert `e` a share
/// proportional to `1/(e+1)^0.7`, at least one row each, so that a fit sees the rows it timed.
pub fn bench_ffn_rows(experts: usize, tpe: usize) -> Vec<usize> {
    let total = tpe * experts;
    let w: Vec<f64> = (0..experts)
        .map(|e| 1.0 / ((e + 1) as f64).powf(0.7))
        .collect();
    let s: f64 = w.iter().sum();
    let mut c: Vec<usize> = w
        .iter()
        .map(|x| ((x / s * total as f64) as usize).max(1))
        .collect();
    let mut have: usize = c.iter().sum();
    let mut e = 0;
    while have < total {
        c[e % experts] += 1;
        have += 1;
        e += 1;
    }
    while have > total {
        let Some(m) = (0..experts).max_by_key(|&k| c[k]) else {
            break;
        };
        c[m] -= 1;
        have -= 1;
    }
    c
}

/// The samples of one `benches/gpu/expert_ffn.py` JSON (`rows[]` with `hidden`, `inter`,
/// `experts`, `tpe`, `ours_ms`; bf16).
pub fn samples_from_bench_json(doc: &serde_json::Value) -> Result<Vec<Sample>, String> {
    let rows = doc["rows"]
        .as_array()
        .ok_or("no \"rows\" list: give the JSON benches/gpu/expert_ffn.py writes")?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let n = |k: &str| {
                r[k].as_u64()
                    .ok_or_else(|| format!("rows[{i}].{k} is not a whole number"))
            };
            let ms = r["ours_ms"]
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| format!("rows[{i}].ours_ms is not a positive time"))?;
            let (experts, tpe) = (n("experts")? as usize, n("tpe")? as usize);
            if experts == 0 || experts > 4096 || tpe > 1 << 20 {
                return Err(format!(
                    "rows[{i}]: {experts} experts of {tpe} rows is out of range"
                ));
            }
            Ok(Sample {
                shape: ModelShape {
                    layers: 1,
                    first_moe_layer: 0,
                    experts: experts as u32,
                    top_k: 1,
                    hidden_size: n("hidden")?,
                    expert_intermediate_size: n("inter")?,
                    dtype: super::Dtype::Bf16,
                },
                rows: bench_ffn_rows(experts, tpe)
                    .into_iter()
                    .map(|x| x as f64)
                    .collect(),
                seconds: ms / 1e3,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::expert_plan::{Algorithm, LayerPlan, PLAN_FORMAT_VERSION};
    use crate::plan::Dtype;

    fn shape(h: u64, i: u64, e: u32) -> ModelShape {
        ModelShape {
            layers: 1,
            first_moe_layer: 0,
            experts: e,
            top_k: 1,
            hidden_size: h,
            expert_intermediate_size: i,
            dtype: Dtype::Bf16,
        }
    }

    #[test]
    fn an_expert_costs_its_weights_or_its_rows_whichever_is_longer() {
        let c = CostModel {
            launch_s: 1e-5,
            bytes_per_s: 1e12,
            flops_per_s: 1e14,
        };
        let m = shape(1024, 512, 4);
        // Weights: 3 * 1024 * 512 * 2 bytes = 3 MiB -> 3.1457 ms at 1 TB/s... in seconds:
        let read = 3.0 * 1024.0 * 512.0 * 2.0 / 1e12;
        assert_eq!(c.expert_s(0.0, &m), 0.0);
        assert!((c.expert_s(1.0, &m) - read).abs() < 1e-15);
        // Rows where compute takes over: 6 * r * 1024 * 512 / 1e14 = read  =>  r = 100.
        let flops = |r: f64| 6.0 * r * 1024.0 * 512.0 / 1e14;
        assert!((c.expert_s(100.0, &m) - read).abs() < 1e-12);
        assert!((c.expert_s(1000.0, &m) - flops(1000.0)).abs() < 1e-12);
        assert!((c.rank_s([1.0, 0.0, 1000.0], &m) - (1e-5 + read + flops(1000.0))).abs() < 1e-12);
    }

    /// 2 GPUs, 2 experts, expert 0 hot; `replicate` puts a second replica of expert 0 on GPU 1.
    fn two_gpu_plan(m: &ModelShape, replicate: bool) -> ExpertPlan {
        let (slots, shares) = if replicate {
            (vec![vec![0], vec![1, 0]], vec![vec![0.5], vec![1.0, 0.5]])
        } else {
            (vec![vec![0], vec![1]], vec![vec![1.0], vec![1.0]])
        };
        ExpertPlan {
            format_version: PLAN_FORMAT_VERSION,
            algorithm: Algorithm::Craft,
            gpus: 2,
            nodes: 1,
            replicas_per_gpu: u32::from(replicate),
            bytes_per_expert: m.bytes_per_expert(),
            replica_bytes_per_gpu: 0,
            model: m.clone(),
            layers: vec![LayerPlan {
                layer: 0,
                slots,
                shares,
            }],
            stats: None,
            transition: None,
            hash: String::new(),
        }
        .seal()
    }

    #[test]
    fn a_replica_pays_in_prefill_and_costs_in_decode() {
        let c = CostModel {
            launch_s: 0.0,
            bytes_per_s: 1e12,
            flops_per_s: 1e14,
        };
        let m = ModelShape {
            experts: 2,
            ..shape(1024, 512, 2)
        };
        // Expert 0 gets 3 of every 4 tokens.
        let w = LoadWindow::new(vec![0], 2, vec![3.0, 1.0]).unwrap();
        let (one, two) = (two_gpu_plan(&m, false), two_gpu_plan(&m, true));
        let read = 3.0 * 1024.0 * 512.0 * 2.0 / 1e12;
        let flops = |r: f64| 6.0 * r * 1024.0 * 512.0 / 1e14;
        // Decode, 8 tokens: every expert is weight-bound. One replica: the slowest GPU reads one
        // expert; with the replica GPU 1 reads two.
        let d1 = step_time(&one, &w, &c, 8.0).unwrap();
        let d2 = step_time(&two, &w, &c, 8.0).unwrap();
        assert!((d1.step_s - read).abs() < 1e-12, "{d1:?}");
        assert!((d2.step_s - 2.0 * read).abs() < 1e-12, "{d2:?}");
        // Prefill, 40000 tokens: rows dominate; expert 0's 30000 rows are split 15000/15000.
        let p1 = step_time(&one, &w, &c, 40_000.0).unwrap();
        let p2 = step_time(&two, &w, &c, 40_000.0).unwrap();
        assert!(
            (p1.step_s - flops(30_000.0)).abs() / p1.step_s < 1e-9,
            "{p1:?}"
        );
        assert!(
            (p2.step_s - (flops(15_000.0) + flops(10_000.0))).abs() / p2.step_s < 1e-9,
            "{p2:?}"
        );
        assert!(p2.step_s < p1.step_s && d2.step_s > d1.step_s);
        // The bound: both experts read once over two GPUs, or the rows spread evenly.
        assert!((p1.ideal_step_s - flops(20_000.0)).abs() / p1.ideal_step_s < 1e-9);
        assert!((d1.ideal_step_s - read).abs() < 1e-12);
    }

    #[test]
    fn the_planners_layer_time_is_the_evaluators() {
        let c = CostModel::H200_BF16;
        let m = ModelShape {
            experts: 2,
            ..shape(1024, 512, 2)
        };
        let w = LoadWindow::new(vec![0], 2, vec![3.0, 1.0, 1.0, 5.0]).unwrap();
        let obj = StepObjective {
            cost: c,
            tokens_per_step: 4096.0,
            model: m.clone(),
        };
        for replicate in [false, true] {
            let p = two_gpu_plan(&m, replicate);
            let lm = LayerMatrix::from_window(&w, 0);
            let a = obj.layer_s(&lm, 2, plan_replicas(&p.layers[0]));
            let b = step_time(&p, &w, &c, 4096.0).unwrap().step_s;
            assert!((a - b).abs() / b < 1e-6, "{a} {b}");
        }
    }

    #[test]
    fn the_h200_constants_are_the_fit_of_the_recorded_run() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/results/worker-gpu-2026-12-04-2124.json"
        );
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let samples = samples_from_bench_json(&doc).unwrap();
        assert_eq!(samples.len(), 12);
        let (c, worst) = fit(&samples, H200_COPY_BYTES_PER_S);
        let near = |a: f64, b: f64| (a / b - 1.0).abs() < 0.02;
        assert!(
            near(c.launch_s, CostModel::H200_BF16.launch_s)
                && near(c.bytes_per_s, CostModel::H200_BF16.bytes_per_s)
                && near(c.flops_per_s, CostModel::H200_BF16.flops_per_s),
            "refit {c:?} (worst row off by {worst:.2}): update CostModel::H200_BF16"
        );
        // A roofline misses the kernels' slow shapes; it must still be within 2.5x everywhere.
        assert!(worst < 1.5, "worst relative error {worst}");
    }

    #[test]
    fn bench_rows_sum_to_the_rows_timed() {
        for (e, t) in [(128, 8), (32, 2048), (8, 64), (3, 1)] {
            let r = bench_ffn_rows(e, t);
            assert_eq!(r.iter().sum::<usize>(), e * t);
            assert!(r.iter().all(|&x| x >= 1));
        }
        assert!(samples_from_bench_json(&serde_json::json!({"rows": [{"hidden": 1}]})).is_err());
    }
}
