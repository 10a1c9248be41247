//! The CRAFT authors' reference algorithm (github.com/Accelsnow/CRAFT_core, Python, MIT, commit
//! 57e1260), ported as a baseline: a benefit table over K = {0, 4, 8, 16, 32}, a threshold heuristic
//! that picks each layer's replica count, padding to a multiple of D by doubling the smallest
//! layers, and tokens split evenly among replicas.
//!
//! Where each piece comes from:
//! - [`interleaved_capacities`]: `craft_core.py`, `create_balanced_tensor_interleaved`.
//! - `replicate_capped`: `eplb_craft.py`, `replicate_experts` (EPLB's greedy with at most D
//!   replicas per expert).
//! - `place_unique_gpunode`: `eplb_craft.py`, `balanced_packing_gpu_unique_gpunode` (replicate_mode 2,
//!   the mode `craft_core.py` uses): heaviest replica first onto the lightest GPU with a free slot,
//!   preferring a node, then a GPU, that does not hold the expert yet.
//! - `layer_balancedness`: `craft_core.py`, `run_bal_trials` (replay with
//!   `floor(count / replicas)` per replica, `(mean + 1e-5) / (max + 1e-5)`, mean over batches).
//! - [`reference_allocation`]: `craft_core.py`, `craft_expert_replica_allocation` with
//!   `compute_replicate_benefits` and `round_final_alloc`; it drops batches with fewer than a tenth
//!   of the mean tokens, as the script does before anything else.
//!
//! Deviations, all small: we compute in f64 where the script mixes f32 tensors and Python floats
//! (weights and per-replica loads stay f32 as in the script); sorts are stable descending (torch
//! leaves tie order unspecified); capacities are computed over the window's MoE layers only (the
//! script also walks the dense layers, which shifts which GPUs get the remainder slots); and the
//! script never builds a final multi-layer placement (it evaluates each layer on its own), so
//! [`reference_plan`] places every layer with [`interleaved_capacities`] over all layers, which
//! keeps every GPU's slot total equal. Fitting the allocation to a given R ([`fit_to_budget`]) is
//! ours, so that the baseline can be compared at equal memory.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::eplb::even_split_plan;
use super::expert_plan::LayerPlan;
use super::load::LoadWindow;
use super::model::{ModelShape, ShapeError, Topology, TopologyError};

/// The reference code's candidate replica counts per layer (`replica_sizes` in `craft_core.py`).
pub const REFERENCE_K: [usize; 5] = [0, 4, 8, 16, 32];

/// `torch.linspace(0, end, steps).long()` in f32 as torch's CPU kernel computes it (from the start
/// for the first half, from the end for the second), truncated toward zero.
fn linspace_trunc(end: usize, steps: usize) -> Vec<usize> {
    if steps == 1 {
        return vec![0];
    }
    let (start, end_f) = (0.0f32, end as f32);
    let step = (end_f - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            let v = if i < half {
                start + step * i as f32
            } else {
                end_f - step * (steps - i - 1) as f32
            };
            v as usize
        })
        .collect()
}

/// Slots per (layer, GPU) for `per_layer[l]` physical experts in layer `l` (`create_balanced_tensor_
/// interleaved`): every GPU gets `P div D`; the `P mod D` extra slots go to the GPUs with the fewest
/// extras so far, ties broken at evenly spaced GPU indices.
pub fn interleaved_capacities(gpus: usize, per_layer: &[usize]) -> Vec<Vec<usize>> {
    let mut load = vec![0usize; gpus];
    let mut sorted = vec![0usize; gpus];
    per_layer
        .iter()
        .map(|&p| {
            let mut caps = vec![p / gpus; gpus];
            let r = p % gpus;
            if r > 0 {
                sorted.clear();
                sorted.extend_from_slice(&load);
                sorted.sort_unstable();
                let cutoff = sorted[r - 1];
                let must: Vec<usize> = (0..gpus).filter(|&g| load[g] < cutoff).collect();
                let ties: Vec<usize> = (0..gpus).filter(|&g| load[g] == cutoff).collect();
                let picks = r - must.len();
                let mut chosen = must;
                if picks > 0 {
                    chosen.extend(
                        linspace_trunc(ties.len() - 1, picks)
                            .into_iter()
                            .map(|i| ties[i]),
                    );
                }
                for g in chosen {
                    caps[g] += 1;
                    load[g] += 1;
                }
            }
            caps
        })
        .collect()
}

/// Order key of a non-negative f32 (bit pattern orders like the value; `+ 0.0` folds -0.0).
fn key(x: f32) -> u32 {
    (x + 0.0).to_bits()
}

/// `replicate_experts` of `eplb_craft.py`: each extra slot goes to argmax `w / n` over experts with
/// `n < gpus` (an expert at `gpus` replicas scores 0, as `w / inf`), lowest index on ties.
/// Returns (phy2log, logcnt).
fn replicate_capped(weight: &[f32], num_phy: usize, gpus: usize) -> (Vec<usize>, Vec<usize>) {
    let mut phy2log: Vec<usize> = (0..weight.len()).collect();
    let mut cnt = vec![1usize; weight.len()];
    let score = |w: f32, n: usize| if n >= gpus { 0.0 } else { w / n as f32 };
    let mut heap: BinaryHeap<(u32, Reverse<usize>)> = weight
        .iter()
        .enumerate()
        .map(|(e, &w)| (key(score(w, 1)), Reverse(e)))
        .collect();
    for _ in weight.len()..num_phy {
        let Some((_, Reverse(e))) = heap.pop() else {
            break;
        };
        phy2log.push(e);
        cnt[e] += 1;
        heap.push((key(score(weight[e], cnt[e])), Reverse(e)));
    }
    (phy2log, cnt)
}

/// One layer placed the reference way.
struct Placement {
    /// `slots[g]`: logical experts on GPU `g`, in slot (rank) order.
    slots: Vec<Vec<u32>>,
    logcnt: Vec<usize>,
}

/// `balanced_packing_gpu_unique_gpunode` for one layer, then the slot order of
/// `rebalance_experts_hierarchical` (rank within the GPU).
fn place_layer(weight: &[f32], caps: &[usize], nodes: usize) -> Placement {
    let experts = weight.len();
    let gpus = caps.len();
    let gpus_per_node = gpus / nodes;
    let num_phy: usize = caps.iter().sum();
    let (phy2log, logcnt) = replicate_capped(weight, num_phy, gpus);
    let tokens: Vec<f32> = phy2log
        .iter()
        .map(|&e| weight[e] / logcnt[e] as f32)
        .collect();
    let mut order: Vec<usize> = (0..num_phy).collect();
    order.sort_by(|&a, &b| tokens[b].total_cmp(&tokens[a]));

    let mut gpu_w = vec![0.0f64; gpus];
    let mut slots: Vec<Vec<u32>> = caps.iter().map(|&c| Vec::with_capacity(c)).collect();
    // The script's per-GPU and per-node sets of logical experts, as flags plus a member count so
    // that "every GPU (node) holds it" (which empties the sets for that expert) is O(1).
    let mut on_gpu = vec![false; gpus * experts];
    let mut on_gpu_n = vec![0usize; experts];
    let mut on_node = vec![false; nodes * experts];
    let mut on_node_n = vec![0usize; experts];
    for &p in &order {
        let e = phy2log[p];
        let free = |g: usize| slots[g].len() < caps[g];
        let pick = |ok: &dyn Fn(usize) -> bool| {
            let mut best: Option<(usize, f64)> = None;
            for g in 0..gpus {
                if free(g) && ok(g) {
                    // Load first, free capacity as tie-breaker: the script's `w * 1000 + cap`.
                    let k = gpu_w[g] * 1000.0 + caps[g] as f64;
                    if best.is_none_or(|(_, bk)| k < bk) {
                        best = Some((g, k));
                    }
                }
            }
            best.map(|(g, _)| g)
        };
        let g = pick(&|g| !on_node[(g / gpus_per_node) * experts + e])
            .or_else(|| pick(&|g| !on_gpu[g * experts + e]))
            .or_else(|| pick(&|_| true))
            .unwrap_or(0);
        slots[g].push(e as u32);
        gpu_w[g] += tokens[p] as f64;
        if !on_gpu[g * experts + e] {
            on_gpu[g * experts + e] = true;
            on_gpu_n[e] += 1;
            if on_gpu_n[e] == gpus {
                (0..gpus).for_each(|x| on_gpu[x * experts + e] = false);
                on_gpu_n[e] = 0;
            }
        }
        let n = g / gpus_per_node;
        if !on_node[n * experts + e] {
            on_node[n * experts + e] = true;
            on_node_n[e] += 1;
            if on_node_n[e] == nodes {
                (0..nodes).for_each(|x| on_node[x * experts + e] = false);
                on_node_n[e] = 0;
            }
        }
    }
    Placement { slots, logcnt }
}

/// `run_bal_trials` for one layer: replay `batches` with `floor(count / replicas)` tokens per replica
/// and return the mean over batches of `(mean_g + 1e-5) / (max_g + 1e-5)`.
fn layer_balancedness(window: &LoadWindow, layer: usize, batches: &[usize], pl: &Placement) -> f64 {
    let gpus = pl.slots.len();
    let mut load = vec![0.0f64; gpus];
    let mut sum = 0.0;
    for &b in batches {
        let row = window.row(b, layer);
        for (g, slots) in pl.slots.iter().enumerate() {
            load[g] = slots
                .iter()
                .map(|&e| (row[e as usize] / pl.logcnt[e as usize] as f64).floor())
                .sum();
        }
        let mean = load.iter().sum::<f64>() / gpus as f64;
        let max = load.iter().copied().fold(0.0, f64::max);
        sum += (mean + 1e-5) / (max + 1e-5);
    }
    sum / batches.len() as f64
}

/// Batches the script keeps: total tokens at least a tenth of the mean batch.
fn kept_batches(window: &LoadWindow) -> Vec<usize> {
    let per_batch: Vec<f64> = (0..window.batches())
        .map(|b| {
            (0..window.layers())
                .map(|l| window.row(b, l).iter().sum::<f64>())
                .sum()
        })
        .collect();
    let mean = per_batch.iter().sum::<f64>() / per_batch.len() as f64;
    (0..per_batch.len())
        .filter(|&b| per_batch[b] >= mean / 10.0)
        .collect()
}

fn layer_weights(window: &LoadWindow, batches: &[usize]) -> Vec<Vec<f32>> {
    (0..window.layers())
        .map(|l| {
            let mut w = vec![0.0f64; window.experts()];
            for &b in batches {
                w.iter_mut()
                    .zip(window.row(b, l))
                    .for_each(|(a, c)| *a += c);
            }
            w.into_iter().map(|x| x as f32).collect()
        })
        .collect()
}

/// What the reference heuristic chose, and the table it chose from.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceAllocation {
    /// Extra replicas per layer the threshold heuristic picked, before padding.
    pub heuristic: Vec<usize>,
    /// After `round_final_alloc`: the sum is a multiple of D.
    pub per_layer: Vec<usize>,
    /// `per_layer` sum / D (the script's "replication factor R").
    pub replicas_per_gpu: usize,
    /// `balancedness[i][l]`: replayed balancedness of layer `l` with `REFERENCE_K[i]` extra replicas.
    pub balancedness: Vec<Vec<f64>>,
    /// Mean per-replica benefit over every k > 0 and layer (the heuristic's threshold).
    pub benefit_avg: f64,
}

/// The threshold heuristic of `craft_expert_replica_allocation`, per layer: walk k = 4, 8, 16, 32;
/// while the layer is not "high benefit" and k <= 16, take k if its per-replica benefit is at least
/// half the average, or if it beats the best benefit seen so far; take any k whose benefit reaches
/// the average and mark the layer high benefit.
fn threshold_pick(benefit: &[Vec<f64>], avg: f64, layer: usize) -> usize {
    let mut pick = 0;
    let mut max_benefit = 0.0;
    let mut high = false;
    for (i, &k) in REFERENCE_K.iter().enumerate().skip(1) {
        let b = benefit[i][layer];
        if !high && k <= 16 {
            if b >= avg / 2.0 {
                pick = k;
            } else if b > max_benefit {
                max_benefit = b;
                pick = k;
            }
        }
        if b >= avg {
            pick = k;
            high = true;
        }
    }
    pick
}

/// `round_final_alloc` generalised to any target at or above the sum: until the sum reaches
/// `target`, double the smallest layer (first on ties; 0 becomes 1), topping up the last step
/// exactly. With `target` = the next multiple of D it is the script's function.
fn pad_to(alloc: &mut [usize], target: usize) {
    let mut sum: usize = alloc.iter().sum();
    while sum < target {
        let (i, &min) = alloc
            .iter()
            .enumerate()
            .min_by_key(|&(i, &v)| (v, i))
            .expect("at least one layer");
        let inc = min.max(1);
        if sum + inc > target {
            alloc[i] += target - sum;
            break;
        }
        alloc[i] += inc;
        sum += inc;
    }
}

/// Fit an allocation to exactly `target` extra replicas (ours, for comparisons at equal R): halve
/// the largest layer (first on ties) while the sum is above the target, stopping exactly on it,
/// then pad with [`pad_to`].
pub fn fit_to_budget(alloc: &mut [usize], target: usize) {
    let mut sum: usize = alloc.iter().sum();
    while sum > target {
        let (i, &max) = alloc
            .iter()
            .enumerate()
            .max_by_key(|&(i, &v)| (v, Reverse(i)))
            .expect("at least one layer");
        let cut = (max - max / 2).min(sum - target);
        alloc[i] -= cut;
        sum -= cut;
    }
    pad_to(alloc, target);
}

/// Why the reference algorithm could not plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("the load window holds no tokens: nothing to plan from")]
    NoTokens,
    /// [`reference_layer_plans`]: one replica count per layer of the window.
    #[error("{given} per-layer replica counts for a window of {layers} layers")]
    PerLayerCounts { given: usize, layers: usize },
    #[error(transparent)]
    Shape(#[from] ShapeError),
}

fn check_inputs(window: &LoadWindow, topo: Topology) -> Result<(), ReferenceError> {
    Topology::new(topo.gpus, topo.nodes)?;
    if window.total_tokens() <= 0.0 {
        return Err(ReferenceError::NoTokens);
    }
    Ok(())
}

/// The reference allocation: benefit table over [`REFERENCE_K`], threshold heuristic, padding to
/// a multiple of D. Each k is evaluated with `E + k` physical experts in every layer and the
/// capacities of [`interleaved_capacities`] over all layers, as `run_bal_trials` does.
pub fn reference_allocation(
    window: &LoadWindow,
    topo: Topology,
) -> Result<ReferenceAllocation, ReferenceError> {
    check_inputs(window, topo)?;
    let (layers, experts) = (window.layers(), window.experts());
    let kept = kept_batches(window);
    let weights = layer_weights(window, &kept);
    let balancedness: Vec<Vec<f64>> = REFERENCE_K
        .iter()
        .map(|&k| {
            let caps = interleaved_capacities(topo.gpus, &vec![experts + k; layers]);
            (0..layers)
                .map(|l| {
                    let pl = place_layer(&weights[l], &caps[l], topo.nodes);
                    layer_balancedness(window, l, &kept, &pl)
                })
                .collect()
        })
        .collect();
    // compute_replicate_benefits: per-replica gain over k = 0.
    let benefit: Vec<Vec<f64>> = REFERENCE_K
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            (0..layers)
                .map(|l| {
                    if k == 0 {
                        0.0
                    } else {
                        (balancedness[i][l] - balancedness[0][l]) / k as f64
                    }
                })
                .collect()
        })
        .collect();
    let benefit_avg =
        benefit[1..].iter().flatten().sum::<f64>() / ((REFERENCE_K.len() - 1) * layers) as f64;
    let heuristic: Vec<usize> = (0..layers)
        .map(|l| threshold_pick(&benefit, benefit_avg, l))
        .collect();
    let mut per_layer = heuristic.clone();
    let sum: usize = per_layer.iter().sum();
    if !sum.is_multiple_of(topo.gpus) {
        pad_to(&mut per_layer, (sum / topo.gpus + 1) * topo.gpus);
    }
    let replicas_per_gpu = per_layer.iter().sum::<usize>() / topo.gpus;
    Ok(ReferenceAllocation {
        heuristic,
        per_layer,
        replicas_per_gpu,
        balancedness,
        benefit_avg,
    })
}

/// Place every layer with `per_layer[l]` extra replicas, capacities interleaved over all layers,
/// tokens split evenly among an expert's replicas.
pub fn reference_layer_plans(
    window: &LoadWindow,
    topo: Topology,
    per_layer: &[usize],
) -> Result<Vec<LayerPlan>, ReferenceError> {
    check_inputs(window, topo)?;
    if per_layer.len() != window.layers() {
        return Err(ReferenceError::PerLayerCounts {
            given: per_layer.len(),
            layers: window.layers(),
        });
    }
    let experts = window.experts();
    let kept = kept_batches(window);
    let weights = layer_weights(window, &kept);
    let phys: Vec<usize> = per_layer.iter().map(|k| experts + k).collect();
    let caps = interleaved_capacities(topo.gpus, &phys);
    Ok((0..window.layers())
        .map(|l| {
            let pl = place_layer(&weights[l], &caps[l], topo.nodes);
            even_split_plan(window.layer_ids()[l], pl.slots, experts)
        })
        .collect())
}

/// The reference algorithm's plan with exactly `replicas_per_gpu` (R) extra slots per GPU: the
/// heuristic's allocation fitted to `R * D` with [`fit_to_budget`], then placed.
pub fn reference_plan(
    window: &LoadWindow,
    model: &ModelShape,
    topo: Topology,
    replicas_per_gpu: usize,
) -> Result<Vec<LayerPlan>, ReferenceError> {
    if window.experts() != model.experts as usize {
        return Err(ShapeError::Experts {
            load: window.experts(),
            model: model.experts,
        }
        .into());
    }
    let mut alloc = reference_allocation(window, topo)?.per_layer;
    fit_to_budget(&mut alloc, replicas_per_gpu * topo.gpus);
    reference_layer_plans(window, topo, &alloc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::load_formats::{sample_batches_from_totals, synthetic_window};
    use crate::plan::model::Dtype;

    #[test]
    fn linspace_matches_torch() {
        // torch.linspace(0, 7, 3).long() == [0, 3, 7]; torch.linspace(0, 63, 4).long() == [0, 21, 42, 63]
        assert_eq!(linspace_trunc(7, 3), vec![0, 3, 7]);
        assert_eq!(linspace_trunc(63, 4), vec![0, 21, 42, 63]);
        assert_eq!(linspace_trunc(10, 4), vec![0, 3, 6, 10]);
        assert_eq!(linspace_trunc(5, 1), vec![0]);
    }

    #[test]
    fn interleaved_capacities_spread_and_even_out() {
        // 8 GPUs, 3 layers of 10, 10 and 12 slots: extras at evenly spaced GPUs, then the GPUs with
        // fewest extras; totals end equal because 32 is a multiple of 8.
        let caps = interleaved_capacities(8, &[10, 10, 12]);
        assert_eq!(caps[0], vec![2, 1, 1, 1, 1, 1, 1, 2]);
        assert_eq!(caps[1], vec![1, 2, 1, 1, 1, 1, 2, 1]);
        let totals: Vec<usize> = (0..8).map(|g| caps.iter().map(|c| c[g]).sum()).collect();
        assert!(totals.iter().all(|&t| t == 4), "{totals:?}");
        for layers in [vec![5usize, 9, 13, 7], vec![64 + 4; 58], vec![3, 3, 3]] {
            let caps = interleaved_capacities(8, &layers);
            for (c, &p) in caps.iter().zip(&layers) {
                assert_eq!(c.iter().sum::<usize>(), p);
            }
            let mut running = vec![0usize; 8];
            for c in &caps {
                running.iter_mut().zip(c).for_each(|(r, x)| *r += x);
                let (lo, hi) = (running.iter().min().unwrap(), running.iter().max().unwrap());
                assert!(hi - lo <= 1, "{running:?}");
            }
        }
    }

    #[test]
    fn replicate_caps_at_gpu_count() {
        let (p2l, cnt) = replicate_capped(&[100.0, 1.0, 1.0, 1.0], 8, 2);
        // Expert 0 stops at 2 replicas; then the others (1.0 each, lowest index first).
        assert_eq!(cnt, vec![2, 2, 2, 2]);
        assert_eq!(p2l, vec![0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn placement_spreads_replicas_over_nodes_then_gpus() {
        // 4 experts, expert 0 very hot with 4 replicas; 4 GPUs on 2 nodes, 2 slots each.
        let w = [400.0f32, 10.0, 10.0, 10.0];
        let pl = place_layer(&w, &[2, 2, 2, 2], 2);
        assert_eq!(pl.logcnt, vec![4, 2, 1, 1]);
        for (g, s) in pl.slots.iter().enumerate() {
            assert_eq!(s.len(), 2);
            assert_eq!(s.iter().filter(|&&e| e == 0).count(), 1, "gpu {g}: {s:?}");
        }
        // Expert 0 went to GPUs 0, 2 (the other node), 1, 3; expert 1's second replica finds no
        // free slot on the node without it (node 0 is full), so it takes another GPU of node 1.
        assert_eq!(
            pl.slots,
            vec![vec![0, 2], vec![0, 3], vec![0, 1], vec![0, 1]]
        );
    }

    #[test]
    fn threshold_heuristic_follows_the_script() {
        // One layer; per-replica benefits for k = 4, 8, 16, 32 against an average of 0.01.
        let table = |b: [f64; 4]| {
            let mut t = vec![vec![0.0]];
            t.extend(b.iter().map(|&x| vec![x]));
            t
        };
        // Every benefit at least half the average: the largest k <= 16 wins.
        assert_eq!(
            threshold_pick(&table([0.006, 0.006, 0.006, 0.001]), 0.01, 0),
            16
        );
        // Above the average at k = 32: high-benefit layer takes 32.
        assert_eq!(
            threshold_pick(&table([0.001, 0.001, 0.001, 0.02]), 0.01, 0),
            32
        );
        // Small benefits: the best one so far (k = 8).
        assert_eq!(
            threshold_pick(&table([0.001, 0.003, 0.002, 0.0]), 0.01, 0),
            8
        );
        // High benefit at k = 4 stops the "half" rule; later k only if they reach the average.
        assert_eq!(
            threshold_pick(&table([0.02, 0.006, 0.011, 0.0]), 0.01, 0),
            16
        );
        // No benefit anywhere: no replicas.
        assert_eq!(
            threshold_pick(&table([-0.01, 0.0, -0.001, -0.002]), 0.01, 0),
            0
        );
    }

    #[test]
    fn padding_doubles_the_smallest_layers() {
        // round_final_alloc([4, 0, 8], 8): 12 -> 16: 0 -> 1 (13), 1 -> 2 (14), 2 -> 4 (16).
        let mut a = vec![4, 0, 8];
        pad_to(&mut a, 16);
        assert_eq!(a, vec![4, 4, 8]);
        let mut b = vec![16, 16, 4];
        pad_to(&mut b, 40);
        // 36 -> 40: double 4 -> 8 exactly.
        assert_eq!(b, vec![16, 16, 8]);
        let mut c = vec![32, 32, 16, 4];
        fit_to_budget(&mut c, 16);
        assert_eq!(c.iter().sum::<usize>(), 16);
        let mut d = vec![0, 0];
        fit_to_budget(&mut d, 3);
        assert_eq!(d, vec![2, 1]);
    }

    fn model(experts: u32) -> ModelShape {
        ModelShape {
            layers: 16,
            first_moe_layer: 0,
            experts,
            top_k: 8,
            hidden_size: 2048,
            expert_intermediate_size: 1024,
            dtype: Dtype::Bf16,
        }
    }

    #[test]
    fn reference_plan_on_olmoe_meets_the_budget_and_invariants() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/traces/olmoe-arxiv.json"
        );
        let totals = crate::plan::load_formats::read_load_file(path).unwrap();
        let w = sample_batches_from_totals(&totals, 40, 4096, 0.2, 3).unwrap();
        let topo = Topology::new(16, 2).unwrap();
        let alloc = reference_allocation(&w, topo).unwrap();
        assert_eq!(alloc.per_layer.iter().sum::<usize>() % 16, 0);
        assert_eq!(
            alloc.per_layer.iter().sum::<usize>(),
            alloc.replicas_per_gpu * 16
        );
        assert!(alloc.heuristic.iter().all(|k| REFERENCE_K.contains(k)));
        // Replication helps a skewed layer: k = 32 is better balanced than k = 0 everywhere.
        for l in 0..3 {
            assert!(
                alloc.balancedness[4][l] > alloc.balancedness[0][l],
                "{:?}",
                alloc.balancedness
            );
            assert!(alloc
                .balancedness
                .iter()
                .all(|b| b[l] > 0.0 && b[l] <= 1.0 + 1e-9));
        }
        for r in [0, 2, 4, 8] {
            let plans = reference_plan(&w, &model(64), topo, r).unwrap();
            let slots: usize = plans.iter().map(|p| p.physical_experts()).sum();
            assert_eq!(slots, 3 * 64 + r * 16);
            // Equal slot totals per GPU across layers.
            let per_gpu: Vec<usize> = (0..16)
                .map(|g| plans.iter().map(|p| p.slots[g].len()).sum())
                .collect();
            assert!(
                per_gpu.iter().all(|&n| n == per_gpu[0]),
                "R={r}: {per_gpu:?}"
            );
            // The script's mode-2 packing checks only the node set in its first pass, and with 2
            // nodes that set clears every second replica, so hot experts do get co-located
            // replicas (11 replicas of one expert on 6 GPUs at R = 8 here). We keep that.
            for p in &plans {
                for (e, reps) in p.replicas(64).iter().enumerate() {
                    assert!(!reps.is_empty() && reps.len() <= 16, "expert {e}");
                    let s: f64 = reps.iter().map(|x| x.share).sum();
                    assert!((s - 1.0).abs() < 1e-9);
                }
            }
        }
        let e = reference_plan(&w, &model(32), topo, 2).unwrap_err();
        assert_eq!(
            e,
            ReferenceError::Shape(ShapeError::Experts {
                load: 64,
                model: 32
            })
        );
        assert!(e.to_string().contains("64 experts"), "{e}");
    }

    #[test]
    fn reference_plan_is_deterministic_and_spends_where_skew_is() {
        let w = synthetic_window(8, 32, 30, 2048, 4, 1.0, 0.3, 11).unwrap();
        let topo = Topology::new(8, 2).unwrap();
        let a = reference_allocation(&w, topo).unwrap();
        assert_eq!(a, reference_allocation(&w, topo).unwrap());
        let p = reference_plan(&w, &model(32), topo, 4).unwrap();
        assert_eq!(p, reference_plan(&w, &model(32), topo, 4).unwrap());
        assert_eq!(
            p.iter().map(|l| l.physical_experts()).sum::<usize>(),
            8 * 32 + 32
        );
    }
}
