//! CRAFT (Zhao et al., MLSys 2026): per-layer replica counts chosen by their measured benefit,
//! under one memory budget. The steps follow ../shared/CRAFT.md:
//! 1. [`replication_order`]: which experts get the extra slots (greedy on `w_e / n_e`);
//! 2. [`layer_capacities`] / [`capacities`]: slots per (layer, GPU);
//! 3. [`place`] and [`balance_shares`]: which GPU holds each replica and the share of tokens it takes;
//! 4. [`benefit_table`]: replay the window for every candidate replica count of every layer;
//! 5. [`allocate`]: exact multiple-choice knapsack over layers;
//! 6. [`craft_layers`]: the final plan with the chosen counts.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::balance::{LayerMatrix, ReplayScratch};
use super::model::Topology;
use super::step_cost::StepObjective;

/// Benefit values are kept in fixed point so that the DP is exact and its ties deterministic.
const FIXED_POINT: f64 = 1e9;

/// Knobs of the planner. The defaults are the variants that measured best (see
/// `benches/results/planner-quality.md`).
#[derive(Clone, Debug, PartialEq)]
pub struct CraftOptions {
    /// Choose per-replica token shares that balance GPU load instead of an even split.
    pub balanced_shares: bool,
    /// Swap replicas between GPUs afterwards when that lowers the replayed objective.
    pub local_search: bool,
    /// Prefer a node that does not hold the expert yet when placing a replica.
    pub spread_across_nodes: bool,
    /// Largest replica count per layer considered in the benefit table (None: the larger of
    /// `gpus` and four times the budget's average per layer).
    pub max_extra_per_layer: Option<usize>,
    /// Weight of per-batch spread: replicate and place by `mean + z * std` of each replica's
    /// per-batch load (GPU spreads add in quadrature) instead of the mean alone. 0 is the paper.
    pub risk_z: f64,
    /// Improving swaps the local search makes at most per layer.
    pub local_search_rounds: usize,
    /// Score the benefit table out of sample: place on the first half of the window's batches and
    /// replay the second half, so that the knapsack does not favour layers whose gain is noise.
    pub benefit_holdout: bool,
    /// Score the benefit table by the step time saved (fraction of the layer's step with no
    /// extra replica) instead of the balancedness gained (`moectl plan --step-tokens`).
    pub step: Option<StepObjective>,
}

impl Default for CraftOptions {
    fn default() -> Self {
        Self {
            balanced_shares: true,
            local_search: true,
            spread_across_nodes: true,
            max_extra_per_layer: None,
            risk_z: 0.0,
            local_search_rounds: LOCAL_SEARCH_ROUNDS,
            benefit_holdout: false,
            step: None,
        }
    }
}

/// Total-order wrapper for the greedy heaps.
#[derive(Clone, Copy, PartialEq)]
struct Score(f64);
impl Eq for Score {}
impl PartialOrd for Score {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Score {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// Step 1. The experts that receive extra replicas, in greedy order: each extra slot goes to
/// `argmax_e w_e / n_e` among experts with fewer than `max_replicas` copies (lowest index on ties).
/// The first `k` entries are the greedy choice for `k` extra replicas.
pub fn replication_order(w: &[f64], extra: usize, max_replicas: usize) -> Vec<u32> {
    let mut n = vec![1u32; w.len()];
    let mut heap: BinaryHeap<(Score, std::cmp::Reverse<usize>)> = w
        .iter()
        .enumerate()
        .filter(|_| max_replicas > 1)
        .map(|(e, &x)| (Score(x), std::cmp::Reverse(e)))
        .collect();
    let mut order = Vec::with_capacity(extra);
    while order.len() < extra {
        let Some((_, std::cmp::Reverse(e))) = heap.pop() else {
            break;
        };
        order.push(e as u32);
        n[e] += 1;
        if (n[e] as usize) < max_replicas {
            heap.push((Score(w[e] / n[e] as f64), std::cmp::Reverse(e)));
        }
    }
    order
}

/// Replica counts per expert after the first `k` picks of a replication order.
pub fn replica_counts(experts: usize, order: &[u32]) -> Vec<u32> {
    let mut n = vec![1u32; experts];
    for &e in order {
        n[e as usize] += 1;
    }
    n
}

/// `count` GPU indices spread evenly over `0..len` (so extras land on different nodes).
fn evenly_spaced(len: usize, count: usize) -> impl Iterator<Item = usize> {
    (0..count).map(move |i| i * len / count.max(1))
}

/// Step 2 for one layer on its own: `p` physical experts over `d` GPUs, the remainder spread.
pub fn layer_capacities(p: usize, d: usize) -> Vec<u32> {
    let mut caps = vec![(p / d) as u32; d];
    for g in evenly_spaced(d, p % d) {
        caps[g] += 1;
    }
    caps
}

/// Step 2 across layers: every GPU gets `P_l div D` slots in layer `l`; the `P_l mod D` extras go
/// to the GPUs with the fewest slots so far, evenly spaced among them. After every layer the
/// per-GPU totals differ by at most one.
pub fn capacities(physical_per_layer: &[usize], gpus: usize) -> Vec<Vec<u32>> {
    let mut totals = vec![0usize; gpus];
    let mut out = Vec::with_capacity(physical_per_layer.len());
    for &p in physical_per_layer {
        let mut caps = vec![(p / gpus) as u32; gpus];
        let mut extra = p % gpus;
        let min = totals.iter().copied().min().unwrap_or(0);
        let low: Vec<usize> = (0..gpus).filter(|&g| totals[g] == min).collect();
        if extra >= low.len() {
            for &g in &low {
                caps[g] += 1;
            }
            extra -= low.len();
            // Everyone is level now; spread the rest over all GPUs.
            for g in evenly_spaced(gpus, extra) {
                caps[g] += 1;
            }
        } else {
            for i in evenly_spaced(low.len(), extra) {
                caps[low[i]] += 1;
            }
        }
        for g in 0..gpus {
            totals[g] += caps[g] as usize;
        }
        out.push(caps);
    }
    out
}

/// A layer's placement: per GPU, the logical expert of each slot and its token share.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub slots: Vec<Vec<u32>>,
    pub shares: Vec<Vec<f32>>,
}

impl Placement {
    pub fn replicas(&self) -> impl Iterator<Item = (usize, usize, f32)> + '_ {
        self.slots
            .iter()
            .zip(&self.shares)
            .enumerate()
            .flat_map(|(g, (s, sh))| s.iter().zip(sh).map(move |(&e, &x)| (g, e as usize, x)))
    }

    /// Mean-load per GPU implied by window totals `w`.
    fn gpu_loads(&self, w: &[f64]) -> Vec<f64> {
        let mut loads = vec![0.0; self.slots.len()];
        for (g, e, s) in self.replicas() {
            loads[g] += s as f64 * w[e];
        }
        loads
    }
}

/// Contiguous placement with no replicas (the `None` baseline): expert `e` on the GPU whose slot
/// range covers it.
pub fn contiguous(experts: usize, caps: &[u32]) -> Placement {
    let mut slots = Vec::with_capacity(caps.len());
    let mut next = 0u32;
    for &c in caps {
        slots.push((next..next + c).collect::<Vec<u32>>());
        next += c;
    }
    debug_assert_eq!(next as usize, experts);
    let shares = slots.iter().map(|s| vec![1.0; s.len()]).collect();
    Placement { slots, shares }
}

/// Step 3: longest-processing-time greedy. Replicas in descending `w_e / n_e` (all replicas of an
/// expert are adjacent); each goes to the least-loaded GPU with a free slot, preferring a node that
/// does not hold the expert yet, then a GPU that does not. Two replicas of one expert share a GPU
/// only when the free slots leave no other choice.
pub fn place(
    w: &[f64],
    counts: &[u32],
    caps: &[u32],
    topo: Topology,
    opts: &CraftOptions,
) -> Placement {
    place_with_risk(w, &[], counts, caps, topo, opts)
}

/// [`place`], scoring each GPU by `mean + z * sqrt(variance)` of its per-batch load when
/// `opts.risk_z > 0` and `spread` (per-expert standard deviation, in the units of `w`) is given.
pub fn place_with_risk(
    w: &[f64],
    spread: &[f64],
    counts: &[u32],
    caps: &[u32],
    topo: Topology,
    opts: &CraftOptions,
) -> Placement {
    let d = topo.gpus;
    let z = if spread.len() == w.len() {
        opts.risk_z
    } else {
        0.0
    };
    let sd = |e: usize| if z > 0.0 { spread[e] } else { 0.0 };
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by(|&a, &b| {
        let x = (w[a] + z * sd(a)) / counts[a] as f64;
        let y = (w[b] + z * sd(b)) / counts[b] as f64;
        y.total_cmp(&x).then(a.cmp(&b))
    });
    let mut var = vec![0f64; d];
    let mut load = vec![0f64; d];
    let mut slots: Vec<Vec<u32>> = caps
        .iter()
        .map(|&c| Vec::with_capacity(c as usize))
        .collect();
    let mut on_gpu = vec![false; d];
    let mut on_node = vec![false; topo.nodes];
    let mut used_gpus = Vec::new();
    let mut open: BinaryHeap<(std::cmp::Reverse<Score>, std::cmp::Reverse<usize>)> = (0..d)
        .filter(|&g| caps[g] > 0)
        .map(|g| (std::cmp::Reverse(Score(0.0)), std::cmp::Reverse(g)))
        .collect();
    let mut stale = vec![false; d];
    for e in order {
        let per = w[e] / counts[e] as f64;
        for &g in &used_gpus {
            on_gpu[g] = false;
            on_node[topo.node_of(g)] = false;
        }
        used_gpus.clear();
        for _ in 0..counts[e] {
            if counts[e] == 1 && z == 0.0 {
                // A lone replica has no sibling to avoid: the least-loaded open GPU, from the heap.
                let g = loop {
                    let (_, std::cmp::Reverse(g)) =
                        open.pop().expect("capacities cover every replica");
                    if slots[g].len() < caps[g] as usize && !stale[g] {
                        break g;
                    }
                    stale[g] = false;
                    if slots[g].len() < caps[g] as usize {
                        open.push((std::cmp::Reverse(Score(load[g])), std::cmp::Reverse(g)));
                    }
                };
                slots[g].push(e as u32);
                load[g] += per;
                if slots[g].len() < caps[g] as usize {
                    open.push((std::cmp::Reverse(Score(load[g])), std::cmp::Reverse(g)));
                }
                continue;
            }
            let mut best: Option<(bool, bool, f64, usize)> = None;
            for g in 0..d {
                if slots[g].len() >= caps[g] as usize {
                    continue;
                }
                let risk = if z > 0.0 {
                    let s = sd(e) / counts[e] as f64;
                    z * (var[g] + s * s).sqrt()
                } else {
                    0.0
                };
                let key = (
                    opts.spread_across_nodes && on_node[topo.node_of(g)],
                    on_gpu[g],
                    load[g] + risk,
                    g,
                );
                let better = match &best {
                    None => true,
                    Some(b) => {
                        (key.0, key.1).cmp(&(b.0, b.1)).then(key.2.total_cmp(&b.2))
                            == Ordering::Less
                    }
                };
                if better {
                    best = Some(key);
                }
            }
            let g = best.map(|b| b.3).expect("capacities cover every replica");
            slots[g].push(e as u32);
            load[g] += per;
            let s = sd(e) / counts[e] as f64;
            var[g] += s * s;
            // The heap entry of g now holds an old load: refresh it lazily when it surfaces.
            stale[g] = true;
            on_gpu[g] = true;
            on_node[topo.node_of(g)] = true;
            used_gpus.push(g);
        }
    }
    separate_copies(&mut slots, w, counts);
    let shares = slots
        .iter()
        .map(|s| s.iter().map(|&e| 1.0 / counts[e as usize] as f32).collect())
        .collect();
    Placement { slots, shares }
}

/// Where the greedy had to put two replicas of one expert on one GPU (its last free slots), swap
/// one of them with a replica elsewhere whose per-replica load is closest, so that no GPU holds an
/// expert twice unless no such swap exists.
fn separate_copies(slots: &mut [Vec<u32>], w: &[f64], counts: &[u32]) {
    let per = |e: u32| w[e as usize] / counts[e as usize] as f64;
    for g in 0..slots.len() {
        let mut i = 0;
        while i < slots[g].len() {
            let e = slots[g][i];
            if !slots[g][..i].contains(&e) {
                i += 1;
                continue;
            }
            let mut best: Option<(f64, usize, usize)> = None;
            for h in (0..slots.len()).filter(|&h| h != g && !slots[h].contains(&e)) {
                for (j, &x) in slots[h].iter().enumerate() {
                    if slots[g].contains(&x) {
                        continue;
                    }
                    let cost = (per(x) - per(e)).abs();
                    if best.is_none_or(|b| cost < b.0) {
                        best = Some((cost, h, j));
                    }
                }
            }
            if let Some((_, h, j)) = best {
                let x = slots[h][j];
                slots[h][j] = e;
                slots[g][i] = x;
            }
            i += 1;
        }
    }
}

/// Water-filling: split each replicated expert's tokens over its replicas so that the GPUs holding
/// them end as level as possible, given everything else on those GPUs. A few Gauss-Seidel sweeps,
/// hottest experts first.
pub fn balance_shares(p: &mut Placement, w: &[f64]) {
    let mut where_: Vec<Vec<(usize, usize)>> = vec![Vec::new(); w.len()];
    for (g, s) in p.slots.iter().enumerate() {
        for (i, &e) in s.iter().enumerate() {
            where_[e as usize].push((g, i));
        }
    }
    let mut hot: Vec<usize> = (0..w.len())
        .filter(|&e| where_[e].len() > 1 && w[e] > 0.0)
        .collect();
    if hot.is_empty() {
        return;
    }
    hot.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
    let mut loads = p.gpu_loads(w);
    let mut base: Vec<(f64, usize)> = Vec::new();
    for _sweep in 0..4 {
        for &e in &hot {
            let reps = &where_[e];
            base.clear();
            for (j, &(g, i)) in reps.iter().enumerate() {
                loads[g] -= p.shares[g][i] as f64 * w[e];
                base.push((loads[g], j));
            }
            base.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            // Level λ with Σ max(0, λ - base_j) = w_e over the lowest j that it covers.
            let mut acc = 0.0;
            let mut level = base[0].0 + w[e];
            for j in 0..base.len() {
                acc += base[j].0;
                let lam = (w[e] + acc) / (j + 1) as f64;
                if j + 1 == base.len() || lam <= base[j + 1].0 {
                    level = lam;
                    break;
                }
            }
            for &(b, j) in &base {
                let (g, i) = reps[j];
                let s = ((level - b).max(0.0) / w[e]) as f32;
                p.shares[g][i] = s;
                loads[g] += s as f64 * w[e];
            }
        }
    }
}

/// Objective of the local search: Σ_b max_g load_g(b). The per-batch mean is fixed, so lowering
/// it raises balancedness.
fn sum_of_max(loads: &[f32], gpus: usize, batches: usize) -> f64 {
    (0..batches)
        .map(|b| {
            (0..gpus)
                .map(|g| loads[g * batches + b])
                .fold(0f32, f32::max) as f64
        })
        .sum()
}

/// Swaps whose exact effect the local search replays per round.
const SCREENED_SWAPS: usize = 8;

/// Swap two replicas between the bottleneck GPU and another when that lowers Σ_b max_g load.
/// Bounded: at most `rounds` improving swaps; each round tries the hottest GPU against all others.
pub fn local_search(p: &mut Placement, m: &LayerMatrix, rounds: usize) {
    let d = p.slots.len();
    let bsz = m.batches;
    let mut scratch = ReplayScratch::default();
    let mut loads = scratch.gpu_loads(m, d, p.replicas()).to_vec();
    let mut cur = sum_of_max(&loads, d, bsz);
    // Window load per GPU, kept up to date across swaps.
    let mut gpu_sum = p.gpu_loads(&m.totals);
    // Best, second and third GPU per batch, to know the max of the GPUs a swap leaves alone.
    let mut top = vec![[(f32::MIN, usize::MAX); 3]; bsz];
    for _ in 0..rounds {
        for (b, t) in top.iter_mut().enumerate() {
            *t = [(f32::MIN, usize::MAX); 3];
            for g in 0..d {
                let x = loads[g * bsz + b];
                if x > t[0].0 {
                    t[2] = t[1];
                    t[1] = t[0];
                    t[0] = (x, g);
                } else if x > t[1].0 {
                    t[2] = t[1];
                    t[1] = (x, g);
                } else if x > t[2].0 {
                    t[2] = (x, g);
                }
            }
        }
        // The GPU that is the bottleneck in the most batches.
        let mut hits = vec![0usize; d];
        for t in &top {
            if t[0].1 < d {
                hits[t[0].1] += 1;
            }
        }
        let hot = (0..d)
            .max_by_key(|&g| (hits[g], std::cmp::Reverse(g)))
            .unwrap_or(0);
        // Screen every swap by the window-mean loads it leaves on the two GPUs, then replay only
        // the most promising few over every batch: the exact check is O(batches) per candidate.
        let hot_mean = gpu_sum[hot];
        let mut screened: Vec<(f64, usize, usize, usize)> = Vec::new();
        for other in (0..d).filter(|&o| o != hot) {
            let other_mean = gpu_sum[other];
            for (ia, &ea) in p.slots[hot].iter().enumerate() {
                let wa = p.shares[hot][ia] as f64 * m.totals[ea as usize];
                for (ic, &ec) in p.slots[other].iter().enumerate() {
                    let wc = p.shares[other][ic] as f64 * m.totals[ec as usize];
                    if wc >= wa
                        || ea == ec
                        || p.slots[other].contains(&ea)
                        || p.slots[hot].contains(&ec)
                    {
                        continue;
                    }
                    let worst = (hot_mean - wa + wc).max(other_mean + wa - wc);
                    screened.push((worst, ia, other, ic));
                }
            }
        }
        screened.sort_by(|a, b| {
            a.0.total_cmp(&b.0)
                .then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
        });
        screened.truncate(SCREENED_SWAPS);
        let mut best: Option<(f64, usize, usize, usize)> = None;
        for &(_, ia, other, ic) in &screened {
            let (ea, ec) = (p.slots[hot][ia], p.slots[other][ic]);
            let (sa, sc) = (p.shares[hot][ia], p.shares[other][ic]);
            let (xa, xc) = (m.expert(ea as usize), m.expert(ec as usize));
            let mut total = 0f64;
            for b in 0..bsz {
                let delta = sc * xc[b] - sa * xa[b];
                let t = &top[b];
                let rest = t
                    .iter()
                    .find(|(_, g)| *g != hot && *g != other)
                    .map_or(0.0, |x| x.0);
                total += (loads[hot * bsz + b] + delta)
                    .max(loads[other * bsz + b] - delta)
                    .max(rest) as f64;
            }
            if total < cur - 1e-6 * cur.abs().max(1.0) && best.is_none_or(|bb| total < bb.0) {
                best = Some((total, ia, other, ic));
            }
        }
        let Some((total, ia, other, ic)) = best else {
            break;
        };
        let ea = p.slots[hot][ia];
        let ec = p.slots[other][ic];
        let (sa, sc) = (p.shares[hot][ia], p.shares[other][ic]);
        let (xa, xc) = (m.expert(ea as usize), m.expert(ec as usize));
        for b in 0..bsz {
            let delta = sc * xc[b] - sa * xa[b];
            loads[hot * bsz + b] += delta;
            loads[other * bsz + b] -= delta;
        }
        let moved = sc as f64 * m.totals[ec as usize] - sa as f64 * m.totals[ea as usize];
        gpu_sum[hot] += moved;
        gpu_sum[other] -= moved;
        p.slots[hot][ia] = ec;
        p.shares[hot][ia] = sc;
        p.slots[other][ic] = ea;
        p.shares[other][ic] = sa;
        cur = total;
    }
}

/// Improving swaps the local search makes at most per layer.
pub const LOCAL_SEARCH_ROUNDS: usize = 16;

/// Steps 1 to 3 for one layer with `extra` replicas and the given slot capacities.
pub fn plan_layer(
    m: &LayerMatrix,
    order: &[u32],
    extra: usize,
    caps: &[u32],
    topo: Topology,
    opts: &CraftOptions,
    polish: bool,
) -> Placement {
    let counts = replica_counts(m.experts, &order[..extra.min(order.len())]);
    let spread = if opts.risk_z > 0.0 {
        m.spread()
    } else {
        Vec::new()
    };
    let mut p = place_with_risk(&m.totals, &spread, &counts, caps, topo, opts);
    if opts.balanced_shares {
        balance_shares(&mut p, &m.totals);
    }
    if polish && opts.local_search {
        local_search(&mut p, m, opts.local_search_rounds);
        if opts.balanced_shares {
            balance_shares(&mut p, &m.totals);
        }
    }
    p
}

/// Candidate replica counts per layer: dense at first, then coarser, up to `max`. Dense enough that
/// the knapsack can meet any total exactly (1 is always a candidate).
pub fn candidate_set(max: usize) -> Vec<usize> {
    let mut k = Vec::new();
    let mut x = 0;
    while x <= max {
        k.push(x);
        x += match x {
            0..8 => 1,
            8..16 => 2,
            16..32 => 4,
            32..64 => 8,
            64..128 => 16,
            _ => 32,
        };
    }
    if k.last() != Some(&max) {
        k.push(max);
    }
    k
}

/// Step 4. `T[l][i]`: the balancedness gained in layer `l` with `candidates[i]` extra replicas over
/// none, measured by replaying the window. Layers run on all available threads.
pub fn benefit_table(
    mats: &[LayerMatrix],
    candidates: &[usize],
    topo: Topology,
    opts: &CraftOptions,
) -> Vec<Vec<f64>> {
    let kmax = candidates.last().copied().unwrap_or(0);
    let one_layer = |full: &LayerMatrix| -> Vec<f64> {
        let halves;
        let (m, judge) = if opts.benefit_holdout && full.batches >= 2 {
            let h = full.batches / 2;
            halves = (
                full.slice_batches(0..h),
                full.slice_batches(h..full.batches),
            );
            (&halves.0, &halves.1)
        } else {
            (full, full)
        };
        let order = replication_order(&m.risk_weights(opts.risk_z), kmax, topo.gpus);
        let mut scratch = ReplayScratch::default();
        let mut out = Vec::with_capacity(candidates.len());
        let mut base = 0.0;
        for (i, &k) in candidates.iter().enumerate() {
            if k > order.len() {
                // More replicas than the layer can hold (every expert on every GPU): no further gain.
                out.push(*out.last().unwrap_or(&0.0));
                continue;
            }
            let caps = layer_capacities(m.experts + k, topo.gpus);
            let p = plan_layer(m, &order, k, &caps, topo, opts, false);
            match &opts.step {
                // Step time saved, as a fraction of the layer's step with no extra replica: may
                // be negative (a replica that reads weights again and saves no rows).
                Some(obj) => {
                    let s = obj.layer_s(judge, topo.gpus, p.replicas());
                    if i == 0 {
                        base = s;
                    }
                    out.push(if base > 0.0 { (base - s) / base } else { 0.0 });
                }
                None => {
                    let bal = scratch.replay(judge, topo.gpus, p.replicas()).balancedness;
                    if i == 0 {
                        base = bal;
                    }
                    out.push(bal - base);
                }
            }
        }
        out
    };
    parallel_map(mats, one_layer)
}

/// Map over layers on the available cores; results keep the input order.
pub fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len().max(1));
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    let chunks: Vec<Vec<(usize, R)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= items.len() {
                            break;
                        }
                        mine.push((i, f(&items[i])));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("planner thread"))
            .collect()
    });
    for (i, r) in chunks.into_iter().flatten() {
        results[i] = Some(r);
    }
    results
        .into_iter()
        .map(|r| r.expect("every layer planned"))
        .collect()
}

/// Step 5. The exact multiple-choice knapsack: `dp[c]` is the best total benefit of the layers so
/// far with exactly `c` extra replicas. One pass answers every total up to `max_total`;
/// [`Allocation::choose`] reads back the per-layer counts for one of them.
pub struct Allocation {
    candidates: Vec<usize>,
    /// `best[c]`: best value for total `c` over all layers (`i64::MIN` if unreachable).
    best: Vec<i64>,
    /// `choice[l][c]`: index into `candidates` chosen for layer `l` when layers `0..=l` sum to `c`.
    choice: Vec<Vec<u16>>,
}

pub fn allocate(table: &[Vec<f64>], candidates: &[usize], max_total: usize) -> Allocation {
    let fixed: Vec<Vec<i64>> = table
        .iter()
        .map(|row| {
            row.iter()
                .map(|&x| (x * FIXED_POINT).round() as i64)
                .collect()
        })
        .collect();
    let mut dp = vec![i64::MIN; max_total + 1];
    dp[0] = 0;
    let mut choice = Vec::with_capacity(table.len());
    for row in &fixed {
        let mut next = vec![i64::MIN; max_total + 1];
        let mut pick = vec![0u16; max_total + 1];
        for c in 0..=max_total {
            // Ascending k and a strict comparison: ties keep the smaller count.
            for (i, &k) in candidates.iter().enumerate() {
                if k > c {
                    break;
                }
                let prev = dp[c - k];
                if prev == i64::MIN {
                    continue;
                }
                let v = prev + row[i];
                if v > next[c] {
                    next[c] = v;
                    pick[c] = i as u16;
                }
            }
        }
        dp = next;
        choice.push(pick);
    }
    Allocation {
        candidates: candidates.to_vec(),
        best: dp,
        choice,
    }
}

impl Allocation {
    /// Best total benefit (sum over layers of balancedness gained) at exactly `total` extras.
    pub fn value(&self, total: usize) -> Option<f64> {
        self.best
            .get(total)
            .filter(|&&v| v != i64::MIN)
            .map(|&v| v as f64 / FIXED_POINT)
    }

    /// Per-layer extra replicas that reach the best value at exactly `total`.
    pub fn choose(&self, total: usize) -> Option<Vec<usize>> {
        self.value(total)?;
        let mut out = vec![0; self.choice.len()];
        let mut c = total;
        for l in (0..self.choice.len()).rev() {
            let k = self.candidates[self.choice[l][c] as usize];
            out[l] = k;
            c -= k;
        }
        Some(out)
    }

    pub fn max_total(&self) -> usize {
        self.best.len() - 1
    }
}

/// Step 6. Final placements for the chosen per-layer counts, with capacities balanced across
/// layers, polished by the local search.
pub fn craft_layers(
    mats: &[LayerMatrix],
    extra: &[usize],
    caps: &[Vec<u32>],
    topo: Topology,
    opts: &CraftOptions,
) -> Vec<Placement> {
    let work: Vec<(usize, &LayerMatrix)> = mats.iter().enumerate().collect();
    parallel_map(&work, |&(l, m)| {
        let order = replication_order(&m.risk_weights(opts.risk_z), extra[l], topo.gpus);
        plan_layer(m, &order, extra[l], &caps[l], topo, opts, true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_order_takes_the_hottest_per_replica_load() {
        // 10/1 > 6 > 10/2 = 5 > 4 > 10/3.
        assert_eq!(replication_order(&[10.0, 6.0, 4.0], 3, 8), vec![0, 1, 0]);
        // No expert gets more copies than GPUs.
        assert_eq!(
            replica_counts(2, &replication_order(&[100.0, 1.0], 5, 3)),
            vec![3, 3]
        );
    }

    #[test]
    fn capacities_stay_level_across_layers() {
        let caps = capacities(&[10, 10, 10, 10], 8);
        let mut totals = [0u32; 8];
        for layer in &caps {
            assert_eq!(layer.iter().sum::<u32>(), 10);
            for g in 0..8 {
                totals[g] += layer[g];
            }
            let (mn, mx) = (totals.iter().min().unwrap(), totals.iter().max().unwrap());
            assert!(mx - mn <= 1, "{totals:?}");
        }
        assert!(totals.iter().all(|&t| t == 5));
    }

    #[test]
    fn candidate_set_is_dense_then_coarse() {
        let k = candidate_set(40);
        assert_eq!(&k[..9], &(0..=8).collect::<Vec<_>>()[..]);
        assert_eq!(&k[9..], &[10, 12, 14, 16, 20, 24, 28, 32, 40]);
        assert_eq!(candidate_set(5), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn water_filling_levels_two_gpus() {
        // Expert 0 (load 10) on both GPUs; GPU 1 also holds expert 1 (load 4).
        let mut p = Placement {
            slots: vec![vec![0], vec![0, 1]],
            shares: vec![vec![0.5], vec![0.5, 1.0]],
        };
        balance_shares(&mut p, &[10.0, 4.0]);
        assert!((p.shares[0][0] - 0.7).abs() < 1e-6 && (p.shares[1][0] - 0.3).abs() < 1e-6);
    }
}
