//! Per-batch replica dispatch for step time: given one batch's rows per expert in one layer and
//! the GPUs holding each expert's replicas, decide how many rows each replica serves so that the
//! slowest GPU finishes first under the step-time model ([`CostModel`]).
//!
//! Where rows dominate (prefill) this water-fills an expert's rows over its replicas' GPUs; where
//! weight reads dominate (decode) it consolidates an expert onto fewer replicas, because every
//! replica given a row reads the expert's whole weights. Fixed shares ([`super::balance::Routing`])
//! stay the default; a plan made for this dispatch is judged with it.
//!
//! Cost: `O(E log E + Σ_e k_e · r_e log r_e)` per batch and layer (E experts, r_e replicas of
//! expert e, k_e ≤ r_e candidates tried), two sweeps; `benches/dispatch_cost.rs` times it against
//! the layer step it schedules.

use super::model::ModelShape;
use super::step_cost::CostModel;

/// Per expert, the rows each of its hosts serves (`out[e][j]` for `hosts[e][j]`). Every expert's
/// rows are conserved exactly and only its hosts serve them; an expert with one host gets all of
/// its rows there (fixed routing). Experts without a host keep no rows (the plan must cover them).
pub fn dispatch(
    rows: &[f64],
    hosts: &[Vec<usize>],
    gpus: usize,
    cost: &CostModel,
    model: &ModelShape,
) -> Vec<Vec<f64>> {
    let experts = rows.len().min(hosts.len());
    let mut out: Vec<Vec<f64>> = hosts.iter().map(|h| vec![0.0; h.len()]).collect();
    let mut t = vec![cost.launch_s; gpus];
    let valid = |g: usize| g < gpus;
    // Single-host experts first: their time is fixed.
    for e in 0..experts {
        if let [g] = hosts[e][..] {
            if valid(g) && rows[e] > 0.0 {
                out[e][0] = rows[e];
                t[g] += cost.expert_s(rows[e], model);
            }
        }
    }
    let mut flex: Vec<usize> = (0..experts)
        .filter(|&e| hosts[e].len() > 1 && rows[e] > 0.0)
        .collect();
    flex.sort_by(|&a, &b| rows[b].total_cmp(&rows[a]).then(a.cmp(&b)));
    // Two sweeps: the first places the hottest first, the second re-places each expert against
    // what the others settled on.
    for sweep in 0..2 {
        for &e in &flex {
            if sweep > 0 {
                for (j, &g) in hosts[e].iter().enumerate() {
                    if valid(g) && out[e][j] > 0.0 {
                        t[g] -= cost.expert_s(out[e][j], model);
                    }
                }
            }
            let split = best_split(rows[e], &hosts[e], &t, gpus, cost, model);
            for (j, &g) in hosts[e].iter().enumerate() {
                out[e][j] = split[j];
                if valid(g) && split[j] > 0.0 {
                    t[g] += cost.expert_s(split[j], model);
                }
            }
        }
    }
    out
}

/// The split of `r` rows over `hosts` (current GPU times `t`) that leaves the latest of them
/// earliest: for each k, the k hosts free soonest share the rows so as to finish together (a water
/// level on compute time, each active host also paying the weight read); the best k wins, the
/// fewest replicas on a tie.
fn best_split(
    r: f64,
    hosts: &[usize],
    t: &[f64],
    gpus: usize,
    cost: &CostModel,
    model: &ModelShape,
) -> Vec<f64> {
    let mut order: Vec<usize> = (0..hosts.len()).filter(|&j| hosts[j] < gpus).collect();
    order.sort_by(|&a, &b| t[hosts[a]].total_cmp(&t[hosts[b]]).then(a.cmp(&b)));
    let mut best: Option<(f64, Vec<f64>)> = None;
    for k in 1..=order.len() {
        let chosen = &order[..k];
        let split = level(r, chosen, hosts, t, cost, model);
        let finish = chosen
            .iter()
            .map(|&j| t[hosts[j]] + cost.expert_s(split[j], model))
            .fold(0.0, f64::max);
        if best
            .as_ref()
            .is_none_or(|(f, _)| finish < *f * (1.0 - 1e-9))
        {
            best = Some((finish, split));
        }
    }
    best.map_or_else(|| vec![0.0; hosts.len()], |(_, s)| s)
}

/// Rows per host (index into `hosts`) for the `chosen` hosts: each host's finish time
/// `t + max(read, rows * c)` as level as the rows allow, by bisection on the level. Conserves `r`.
fn level(
    r: f64,
    chosen: &[usize],
    hosts: &[usize],
    t: &[f64],
    cost: &CostModel,
    model: &ModelShape,
) -> Vec<f64> {
    let per_row =
        6.0 * model.hidden_size as f64 * model.expert_intermediate_size as f64 / cost.flops_per_s;
    let read = model.bytes_per_expert() as f64 / cost.bytes_per_s;
    let mut split = vec![0.0; hosts.len()];
    if chosen.len() == 1 || per_row <= 0.0 {
        // One host, or rows cost nothing: everything to the first (soonest free).
        split[chosen[0]] = r;
        return split;
    }
    // Rows a host takes for a finish level L: it finishes at t + read until its rows' compute
    // passes the read, then at t + rows * per_row.
    let take = |j: usize, lvl: f64| -> f64 {
        let start = t[hosts[j]];
        if lvl < start + read {
            0.0
        } else {
            (lvl - start) / per_row
        }
    };
    let total = |lvl: f64| chosen.iter().map(|&j| take(j, lvl)).sum::<f64>();
    let lo_start = chosen
        .iter()
        .map(|&j| t[hosts[j]])
        .fold(f64::INFINITY, f64::min);
    let (mut lo, mut hi) = (lo_start, lo_start + read + r * per_row);
    while total(hi) < r {
        hi += hi - lo;
    }
    // 40 halvings: the level to 1e-12 of its bracket; the rescale below makes the rows exact.
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if total(mid) >= r {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let mut given = 0.0;
    for &j in chosen {
        split[j] = take(j, hi);
        given += split[j];
    }
    // Hand back the bisection's excess from the largest share, so the rows are conserved.
    if given > 0.0 {
        let scale = r / given;
        for &j in chosen {
            split[j] *= scale;
        }
    }
    split
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Dtype;
    use proptest::prelude::*;

    fn model() -> ModelShape {
        ModelShape {
            layers: 1,
            first_moe_layer: 0,
            experts: 4,
            top_k: 2,
            hidden_size: 2048,
            expert_intermediate_size: 768,
            dtype: Dtype::Bf16,
        }
    }

    fn finish(out: &[Vec<f64>], hosts: &[Vec<usize>], gpus: usize, c: &CostModel) -> f64 {
        let placed = hosts
            .iter()
            .zip(out)
            .flat_map(|(h, o)| h.iter().copied().zip(o.iter().copied()));
        c.layer_s(&model(), gpus, placed, &mut Vec::new())
    }

    #[test]
    fn decode_consolidates_and_prefill_spreads() {
        let c = CostModel::H200_BF16;
        let m = model();
        // Expert 0 on both GPUs, experts 1 and 2 alone on GPU 0 and 1.
        let hosts = vec![vec![0, 1], vec![0], vec![1]];
        // Decode: 8 rows of expert 0. Reading its weights twice costs more than its rows: one
        // replica serves them all.
        let d = dispatch(&[8.0, 4.0, 4.0], &hosts, 2, &c, &m);
        assert_eq!(d[0].iter().filter(|&&x| x > 0.0).count(), 1, "{d:?}");
        assert_eq!(d[0].iter().sum::<f64>(), 8.0);
        // Prefill: 20000 rows; split so that both GPUs finish together.
        let p = dispatch(&[20_000.0, 4000.0, 100.0], &hosts, 2, &c, &m);
        assert!(p[0].iter().all(|&x| x > 0.0), "{p:?}");
        assert!((p[0].iter().sum::<f64>() - 20_000.0).abs() < 1e-6);
        // GPU 1 (lighter) takes more of expert 0.
        assert!(p[0][1] > p[0][0], "{p:?}");
        let even = vec![vec![10_000.0, 10_000.0], vec![4000.0], vec![100.0]];
        assert!(finish(&p, &hosts, 2, &c) < finish(&even, &hosts, 2, &c));
    }

    proptest! {
        #[test]
        fn rows_are_conserved_on_existing_replicas_and_single_hosts_route_fixed(
            rows in prop::collection::vec(0.0f64..5000.0, 1..12),
            seed in any::<u64>(),
            gpus in 1usize..6,
        ) {
            let c = CostModel::H200_BF16;
            let m = model();
            let mut s = seed;
            let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (s >> 33) as usize };
            let hosts: Vec<Vec<usize>> = rows.iter().map(|_| {
                let k = 1 + next() % gpus;
                let mut h: Vec<usize> = (0..gpus).collect();
                for i in 0..gpus { let j = next() % gpus; h.swap(i, j); }
                h.truncate(k);
                h
            }).collect();
            let out = dispatch(&rows, &hosts, gpus, &c, &m);
            for (e, r) in rows.iter().enumerate() {
                prop_assert_eq!(out[e].len(), hosts[e].len());
                prop_assert!(out[e].iter().all(|&x| x >= 0.0 && x.is_finite()));
                prop_assert!((out[e].iter().sum::<f64>() - r).abs() <= 1e-6 * r.max(1.0), "{:?} {}", out[e], r);
                if hosts[e].len() == 1 {
                    prop_assert_eq!(out[e][0], *r);
                }
            }
            // Never worse than splitting every expert evenly over its replicas.
            let even: Vec<Vec<f64>> = rows.iter().zip(&hosts).map(|(r, h)| vec![r / h.len() as f64; h.len()]).collect();
            prop_assert!(finish(&out, &hosts, gpus, &c) <= finish(&even, &hosts, gpus, &c) * (1.0 + 1e-9) + 1e-12);
        }
    }
}
