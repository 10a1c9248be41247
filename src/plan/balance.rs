//! The objective: balancedness of GPU load, and the replay of a load window through a placement.
//!
//! For one layer and one batch, `bal = mean_g(load_g) / max_g(load_g)`, where `load_g` is the tokens
//! GPU `g` computes for that layer; a batch with no tokens counts as perfectly balanced. The plan
//! figure is the mean over batches, then over layers. vLLM's form is `Σ mean_g / Σ max_g` over all
//! (layer, batch) pairs.

use super::expert_plan::{ExpertPlan, LayerPlan};
use super::load::LoadWindow;
use super::model::ShapeError;

/// One layer's loads in the layout the replay wants: expert-major, `data[e * batches + b]`, f32 so
/// that the inner loop (one AXPY per replica over the batches) vectorises.
#[derive(Clone, Debug)]
pub struct LayerMatrix {
    pub experts: usize,
    pub batches: usize,
    pub data: Vec<f32>,
    /// Window totals per expert.
    pub totals: Vec<f64>,
    /// Tokens per batch.
    pub batch_totals: Vec<f32>,
}

impl LayerMatrix {
    pub fn from_window(window: &LoadWindow, layer: usize) -> Self {
        let (experts, batches) = (window.experts(), window.batches());
        let mut data = vec![0f32; experts * batches];
        let mut totals = vec![0f64; experts];
        let mut batch_totals = vec![0f32; batches];
        // Batch-major reads, expert-major writes: consecutive batches write the same cache line of
        // each expert, so one layer's lines stay in L1.
        for b in 0..batches {
            let row = window.row(b, layer);
            let mut sum = 0f64;
            for (e, &c) in row.iter().enumerate() {
                data[e * batches + b] = c as f32;
                totals[e] += c;
                sum += c;
            }
            batch_totals[b] = sum as f32;
        }
        Self {
            experts,
            batches,
            data,
            totals,
            batch_totals,
        }
    }

    /// Per-expert standard deviation of the per-batch load, scaled by the batch count so that it is
    /// in the units of `totals`.
    pub fn spread(&self) -> Vec<f64> {
        let b = self.batches.max(1) as f64;
        (0..self.experts)
            .map(|e| {
                let mean = self.totals[e] / b;
                let var = self
                    .expert(e)
                    .iter()
                    .map(|&v| (v as f64 - mean).powi(2))
                    .sum::<f64>()
                    / b;
                var.sqrt() * b
            })
            .collect()
    }

    /// Window load plus `z` standard deviations, per expert: what replication ranks experts by.
    pub fn risk_weights(&self, z: f64) -> Vec<f64> {
        if z == 0.0 {
            return self.totals.clone();
        }
        self.totals
            .iter()
            .zip(self.spread())
            .map(|(w, s)| w + z * s)
            .collect()
    }

    /// The batches `range` of this layer as a matrix of their own.
    pub fn slice_batches(&self, range: std::ops::Range<usize>) -> Self {
        let batches = range.len();
        let mut data = Vec::with_capacity(self.experts * batches);
        let mut totals = Vec::with_capacity(self.experts);
        for e in 0..self.experts {
            let x = &self.expert(e)[range.clone()];
            data.extend_from_slice(x);
            totals.push(x.iter().map(|&v| v as f64).sum());
        }
        Self {
            experts: self.experts,
            batches,
            data,
            totals,
            batch_totals: self.batch_totals[range].to_vec(),
        }
    }

    pub fn expert(&self, e: usize) -> &[f32] {
        &self.data[e * self.batches..(e + 1) * self.batches]
    }
}

/// Balancedness of one layer over a window, both forms' ingredients.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerBalance {
    /// Mean over batches of mean_g / max_g.
    pub balancedness: f64,
    /// Σ_b mean_g(b) and Σ_b max_g(b): the ingredients of vLLM's form.
    pub sum_mean: f64,
    pub sum_max: f64,
}

/// Reusable buffers for replays, so the benefit table allocates nothing per candidate.
#[derive(Default)]
pub struct ReplayScratch {
    gpu_loads: Vec<f32>,
}

impl ReplayScratch {
    /// Per-GPU loads of every batch, `[g * batches + b]`, for the replicas `(gpu, expert, share)`.
    pub fn gpu_loads<'a>(
        &'a mut self,
        m: &LayerMatrix,
        gpus: usize,
        replicas: impl Iterator<Item = (usize, usize, f32)>,
    ) -> &'a [f32] {
        let bsz = m.batches;
        self.gpu_loads.clear();
        self.gpu_loads.resize(gpus * bsz, 0.0);
        for (g, e, share) in replicas {
            let dst = &mut self.gpu_loads[g * bsz..(g + 1) * bsz];
            for (d, s) in dst.iter_mut().zip(m.expert(e)) {
                *d += share * s;
            }
        }
        &self.gpu_loads
    }

    /// Replay the window through the replicas and measure the layer's balancedness.
    pub fn replay(
        &mut self,
        m: &LayerMatrix,
        gpus: usize,
        replicas: impl Iterator<Item = (usize, usize, f32)>,
    ) -> LayerBalance {
        let loads = self.gpu_loads(m, gpus, replicas);
        balance_of(loads, gpus, m.batches, &m.batch_totals)
    }
}

/// How a router splits a replicated expert's tokens among its replicas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Routing {
    /// By the plan's fixed per-replica shares (what the plan predicts).
    #[default]
    Shares,
    /// Each token to the replica whose GPU has the fewest tokens so far in this batch and layer.
    /// With tokens in random order this ends where per-batch water-filling ends: the replicas'
    /// GPUs as level as the batch's other load allows. The replay models it by that water-filling.
    LeastLoaded,
}

impl ReplayScratch {
    /// Per-GPU loads `[g * batches + b]` under least-loaded routing: experts with one replica put
    /// all their tokens on its GPU; each replicated expert's tokens of each batch are water-filled
    /// over its replicas' GPUs (hottest expert first, then a few Gauss-Seidel sweeps so that
    /// experts sharing GPUs settle jointly). Shares of the replicas are ignored.
    pub fn gpu_loads_least_loaded<'a>(
        &'a mut self,
        m: &LayerMatrix,
        gpus: usize,
        replicas: impl Iterator<Item = (usize, usize, f32)>,
    ) -> &'a [f32] {
        let bsz = m.batches;
        let mut hosts: Vec<Vec<usize>> = vec![Vec::new(); m.experts];
        for (g, e, _) in replicas {
            if e < m.experts && g < gpus && !hosts[e].contains(&g) {
                hosts[e].push(g);
            }
        }
        let single = (0..m.experts)
            .filter(|&e| hosts[e].len() == 1)
            .map(|e| (hosts[e][0], e, 1.0f32));
        self.gpu_loads(m, gpus, single);
        let flex: Vec<usize> = (0..m.experts).filter(|&e| hosts[e].len() > 1).collect();
        if flex.is_empty() {
            return &self.gpu_loads;
        }
        let mut col = vec![0f64; gpus];
        let mut order = flex.clone();
        // Per flex expert and host: tokens assigned in this batch.
        let mut given: Vec<Vec<f64>> = flex.iter().map(|&e| vec![0.0; hosts[e].len()]).collect();
        let mut base: Vec<(f64, usize)> = Vec::new();
        let slot_of: Vec<usize> = {
            let mut s = vec![usize::MAX; m.experts];
            for (i, &e) in flex.iter().enumerate() {
                s[e] = i;
            }
            s
        };
        for b in 0..bsz {
            for (g, c) in col.iter_mut().enumerate() {
                *c = self.gpu_loads[g * bsz + b] as f64;
            }
            order.sort_by(|&x, &y| m.expert(y)[b].total_cmp(&m.expert(x)[b]).then(x.cmp(&y)));
            for gv in given.iter_mut() {
                gv.iter_mut().for_each(|x| *x = 0.0);
            }
            for _sweep in 0..3 {
                for &e in &order {
                    let w = m.expert(e)[b] as f64;
                    if w <= 0.0 {
                        continue;
                    }
                    let gv = &mut given[slot_of[e]];
                    base.clear();
                    for (j, &g) in hosts[e].iter().enumerate() {
                        col[g] -= gv[j];
                        base.push((col[g], j));
                    }
                    let level = water_level(&mut base, w);
                    for &(l, j) in &base {
                        let x = (level - l).max(0.0);
                        gv[j] = x;
                        col[hosts[e][j]] += x;
                    }
                }
            }
            for (g, &c) in col.iter().enumerate() {
                self.gpu_loads[g * bsz + b] = c as f32;
            }
        }
        &self.gpu_loads
    }

    /// [`ReplayScratch::replay`] under the given routing.
    pub fn replay_routed(
        &mut self,
        m: &LayerMatrix,
        gpus: usize,
        replicas: impl Iterator<Item = (usize, usize, f32)>,
        routing: Routing,
    ) -> LayerBalance {
        let loads = match routing {
            Routing::Shares => self.gpu_loads(m, gpus, replicas),
            Routing::LeastLoaded => self.gpu_loads_least_loaded(m, gpus, replicas),
        };
        balance_of(loads, gpus, m.batches, &m.batch_totals)
    }
}

/// The level λ with Σ_j max(0, λ - base_j) = w. Sorts `base` ascending by load.
pub fn water_level(base: &mut [(f64, usize)], w: f64) -> f64 {
    base.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut acc = 0.0;
    for j in 0..base.len() {
        acc += base[j].0;
        let lam = (w + acc) / (j + 1) as f64;
        if j + 1 == base.len() || lam <= base[j + 1].0 {
            return lam;
        }
    }
    base.first().map_or(w, |b| b.0 + w)
}

/// Balancedness from per-GPU loads `[g * batches + b]`.
pub fn balance_of(
    loads: &[f32],
    gpus: usize,
    batches: usize,
    batch_totals: &[f32],
) -> LayerBalance {
    let mut max = vec![0f32; batches];
    for g in 0..gpus {
        for (m, &x) in max.iter_mut().zip(&loads[g * batches..(g + 1) * batches]) {
            *m = m.max(x);
        }
    }
    let mut out = LayerBalance::default();
    for (b, &mx) in max.iter().enumerate() {
        let mean = batch_totals[b] as f64 / gpus as f64;
        out.sum_mean += mean;
        out.sum_max += mx as f64;
        out.balancedness += if mx > 0.0 {
            (mean / mx as f64).min(1.0)
        } else {
            1.0
        };
    }
    out.balancedness /= batches.max(1) as f64;
    out
}

/// The plan's layer with model layer id `id`, or the error that names the plan's layers.
pub fn plan_layer(plan: &ExpertPlan, id: u32) -> Result<&LayerPlan, ShapeError> {
    plan.layers
        .iter()
        .find(|lp| lp.layer == id)
        .ok_or_else(|| ShapeError::PlanLayer {
            layer: id,
            plan_layers: plan.layers.iter().map(|l| l.layer).collect(),
        })
}

/// The replicas of a layer plan as `(gpu, expert, share)`.
pub fn plan_replicas(lp: &LayerPlan) -> impl Iterator<Item = (usize, usize, f32)> + '_ {
    lp.slots
        .iter()
        .zip(&lp.shares)
        .enumerate()
        .flat_map(|(g, (slots, shares))| {
            slots
                .iter()
                .zip(shares)
                .map(move |(&e, &s)| (g, e as usize, s as f32))
        })
}

/// How a plan does on a window: per layer and overall.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Evaluation {
    pub layers: Vec<LayerEvaluation>,
    /// Mean over layers of the per-layer balancedness.
    pub balancedness: f64,
    /// vLLM's form: Σ mean_g / Σ max_g over layers and batches.
    pub balancedness_vllm: f64,
    /// Mean over layers and batches of max_g / mean_g (the slowdown the hottest GPU causes).
    pub max_over_mean: f64,
    pub replica_bytes_per_gpu: u64,
    pub batches: usize,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerEvaluation {
    pub layer: u32,
    pub balancedness: f64,
    pub balancedness_vllm: f64,
    pub max_over_mean: f64,
    /// Extra replicas in this layer (physical experts minus logical experts).
    pub extra_replicas: usize,
}

/// Replay `window` through `plan`. The window's layers are matched to the plan's by model layer
/// index, so a plan can be judged on a load it was not made from.
pub fn evaluate(plan: &ExpertPlan, window: &LoadWindow) -> Result<Evaluation, ShapeError> {
    evaluate_routed(plan, window, Routing::Shares)
}

/// [`evaluate`] under a given router policy (see [`Routing`]).
pub fn evaluate_routed(
    plan: &ExpertPlan,
    window: &LoadWindow,
    routing: Routing,
) -> Result<Evaluation, ShapeError> {
    if window.experts() != plan.model.experts as usize {
        return Err(ShapeError::PlanExperts {
            load: window.experts(),
            plan: plan.model.experts,
        });
    }
    let mut pairs = Vec::new();
    for (wl, &id) in window.layer_ids().iter().enumerate() {
        pairs.push((plan_layer(plan, id)?, LayerMatrix::from_window(window, wl)));
    }
    Ok(evaluate_layers_routed(
        plan,
        pairs.iter().map(|(lp, m)| (*lp, m)),
        window.batches(),
        routing,
    ))
}

/// Replay pairs of (plan layer, that layer's load matrix).
pub fn evaluate_layers<'a>(
    plan: &ExpertPlan,
    pairs: impl Iterator<Item = (&'a LayerPlan, &'a LayerMatrix)>,
    batches: usize,
) -> Evaluation {
    evaluate_layers_routed(plan, pairs, batches, Routing::Shares)
}

/// [`evaluate_layers`] under a given router policy.
pub fn evaluate_layers_routed<'a>(
    plan: &ExpertPlan,
    pairs: impl Iterator<Item = (&'a LayerPlan, &'a LayerMatrix)>,
    batches: usize,
    routing: Routing,
) -> Evaluation {
    let d = plan.gpus as usize;
    let mut scratch = ReplayScratch::default();
    let mut layers = Vec::new();
    let (mut sum_mean, mut sum_max) = (0.0, 0.0);
    for (lp, m) in pairs {
        let loads = match routing {
            Routing::Shares => scratch.gpu_loads(m, d, plan_replicas(lp)),
            Routing::LeastLoaded => scratch.gpu_loads_least_loaded(m, d, plan_replicas(lp)),
        };
        let lb = balance_of(loads, d, m.batches, &m.batch_totals);
        let mut max = vec![0f32; m.batches];
        for g in 0..d {
            for (x, &l) in max
                .iter_mut()
                .zip(&loads[g * m.batches..(g + 1) * m.batches])
            {
                *x = x.max(l);
            }
        }
        let mom: f64 = (0..m.batches)
            .map(|b| {
                let mean = m.batch_totals[b] as f64 / d as f64;
                if mean > 0.0 {
                    max[b] as f64 / mean
                } else {
                    1.0
                }
            })
            .sum();
        sum_mean += lb.sum_mean;
        sum_max += lb.sum_max;
        layers.push(LayerEvaluation {
            layer: lp.layer,
            balancedness: lb.balancedness,
            balancedness_vllm: ratio(lb.sum_mean, lb.sum_max),
            max_over_mean: mom / m.batches.max(1) as f64,
            extra_replicas: lp.physical_experts().saturating_sub(m.experts),
        });
    }
    let n = layers.len().max(1) as f64;
    Evaluation {
        balancedness: layers.iter().map(|l| l.balancedness).sum::<f64>() / n,
        max_over_mean: layers.iter().map(|l| l.max_over_mean).sum::<f64>() / n,
        balancedness_vllm: ratio(sum_mean, sum_max),
        replica_bytes_per_gpu: plan.replica_bytes_per_gpu,
        batches,
        layers,
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        (a / b).min(1.0)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfectly_even_load_is_one_and_skew_is_less() {
        let w = LoadWindow::new(
            vec![0],
            4,
            vec![10.0, 10.0, 10.0, 10.0, 40.0, 0.0, 0.0, 0.0],
        )
        .unwrap();
        let m = LayerMatrix::from_window(&w, 0);
        let mut s = ReplayScratch::default();
        let lb = s.replay(&m, 4, (0..4).map(|e| (e, e, 1.0)));
        // Batch 0 is even (1.0); batch 1 puts everything on GPU 0 (mean 10 / max 40).
        assert!((lb.balancedness - (1.0 + 0.25) / 2.0).abs() < 1e-9);
        assert!((lb.sum_mean - 20.0).abs() < 1e-9 && (lb.sum_max - 50.0).abs() < 1e-9);
    }

    #[test]
    fn least_loaded_routing_levels_each_batch_and_fixed_shares_do_not() {
        // Expert 0 on GPUs 0 and 1 (shares 0.5 / 0.5), expert 1 only on GPU 1, expert 2 only on
        // GPU 0. Batch 0: loads 10, 4, 0; batch 1: loads 10, 0, 4.
        let w = LoadWindow::new(vec![0], 3, vec![10.0, 4.0, 0.0, 10.0, 0.0, 4.0]).unwrap();
        let m = LayerMatrix::from_window(&w, 0);
        let reps = [(0, 0, 0.5f32), (1, 0, 0.5), (1, 1, 1.0), (0, 2, 1.0)];
        let mut s = ReplayScratch::default();
        let fixed = s.replay_routed(&m, 2, reps.iter().copied(), Routing::Shares);
        // Fixed shares: 5 / 9 then 9 / 5, balancedness 7/9 in both batches.
        assert!((fixed.balancedness - 7.0 / 9.0).abs() < 1e-6);
        let loads = s
            .gpu_loads_least_loaded(&m, 2, reps.iter().copied())
            .to_vec();
        assert_eq!(loads, vec![7.0, 7.0, 7.0, 7.0]);
        let ll = s.replay_routed(&m, 2, reps.iter().copied(), Routing::LeastLoaded);
        assert!((ll.balancedness - 1.0).abs() < 1e-9);
        // Without replicated experts both routers agree.
        let one = [(0, 0, 1.0f32), (1, 1, 1.0), (1, 2, 1.0)];
        assert_eq!(
            s.replay_routed(&m, 2, one.iter().copied(), Routing::Shares),
            s.replay_routed(&m, 2, one.iter().copied(), Routing::LeastLoaded)
        );
    }
}
