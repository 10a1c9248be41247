//! Pure routing for the load generator: draw each token's top-k experts from a layer's load,
//! pick a replica by the plan's shares, and measure the balance that results. Seeded, no I/O.

use rand::Rng;

use crate::plan::expert_plan::Replica;
use crate::plan::step_cost::CostModel;
use crate::plan::ModelShape;

/// Successive weighted sampling without replacement over one layer's expert loads.
pub struct TopKSampler {
    /// Prefix sums of the weights (exclusive of index): `cum[e + 1] - cum[e] = w[e]`.
    cum: Vec<f64>,
    positive: usize,
}

impl TopKSampler {
    /// `weights` are one batch's token counts per expert (finite, non-negative).
    pub fn new(weights: &[f64]) -> Self {
        let mut cum = Vec::with_capacity(weights.len() + 1);
        let mut acc = 0.0;
        cum.push(0.0);
        let mut positive = 0;
        for &w in weights {
            let w = if w.is_finite() && w > 0.0 { w } else { 0.0 };
            positive += usize::from(w > 0.0);
            acc += w;
            cum.push(acc);
        }
        Self { cum, positive }
    }

    pub fn experts(&self) -> usize {
        self.cum.len() - 1
    }

    fn weight(&self, e: usize) -> f64 {
        self.cum[e + 1] - self.cum[e]
    }

    /// Draw `k` distinct experts into `out` (cleared first). Each draw picks among the experts not
    /// yet drawn with probability proportional to its weight (rejection on already drawn ones,
    /// which is the same distribution). When fewer than `k` experts have weight, the rest are drawn
    /// uniformly among the weightless ones. `k` is clamped to the number of experts.
    pub fn sample<R: Rng>(&self, rng: &mut R, k: usize, out: &mut Vec<u32>) {
        out.clear();
        let n = self.experts();
        let k = k.min(n);
        let total = self.cum[n];
        let mut positive_left = self.positive;
        while out.len() < k {
            let pick = if positive_left > 0 {
                self.draw_weighted(rng, total, out)
            } else {
                self.draw_uniform_weightless(rng, out)
            };
            if self.weight(pick) > 0.0 {
                positive_left -= 1;
            }
            out.push(pick as u32);
        }
    }

    fn draw_weighted<R: Rng>(&self, rng: &mut R, total: f64, taken: &[u32]) -> usize {
        let n = self.experts();
        // Rejection is cheap while the drawn experts hold little of the mass; fall back to an
        // exact scan over the rest when they hold most of it.
        for _ in 0..32 {
            let r = rng.random::<f64>() * total;
            // First e with cum[e + 1] > r.
            let e = self.cum[1..].partition_point(|&c| c <= r).min(n - 1);
            if self.weight(e) > 0.0 && !taken.contains(&(e as u32)) {
                return e;
            }
        }
        let rest: f64 = (0..n)
            .filter(|e| !taken.contains(&(*e as u32)))
            .map(|e| self.weight(e))
            .sum();
        let mut r = rng.random::<f64>() * rest;
        let mut last = None;
        for e in (0..n).filter(|e| !taken.contains(&(*e as u32))) {
            let w = self.weight(e);
            if w <= 0.0 {
                continue;
            }
            last = Some(e);
            if r < w {
                return e;
            }
            r -= w;
        }
        last.expect("a weighted expert is left")
    }

    fn draw_uniform_weightless<R: Rng>(&self, rng: &mut R, taken: &[u32]) -> usize {
        let free: Vec<usize> = (0..self.experts())
            .filter(|&e| self.weight(e) <= 0.0 && !taken.contains(&(e as u32)))
            .collect();
        free[rng.random_range(0..free.len())]
    }
}

/// Replica choice for one expert: by the plan's token shares, or per batch by the step-time
/// dispatch ([`ReplicaPicker::with_step_dispatch`]).
pub struct ReplicaPicker {
    /// Per expert: (gpu, cumulative share).
    per_expert: Vec<Vec<(u32, f64)>>,
    step: Option<StepPick>,
}

/// What the step-time dispatch needs: each expert's replica GPUs and the cost model.
struct StepPick {
    hosts: Vec<Vec<usize>>,
    cost: CostModel,
    model: ModelShape,
}

impl ReplicaPicker {
    /// Each batch's rows of a replicated expert split by [`crate::plan::dispatch::dispatch`]
    /// (the split the cost model prefers) instead of token by token by the shares. The tokens
    /// drawn are the same as with the shares (the same random numbers are consumed).
    pub fn with_step_dispatch(
        replicas: &[Vec<Replica>],
        cost: CostModel,
        model: ModelShape,
    ) -> Self {
        let mut p = Self::new(replicas);
        let hosts = replicas
            .iter()
            .map(|list| {
                let mut h: Vec<usize> = Vec::new();
                for r in list {
                    if !h.contains(&(r.gpu as usize)) {
                        h.push(r.gpu as usize);
                    }
                }
                h
            })
            .collect();
        p.step = Some(StepPick { hosts, cost, model });
        p
    }

    pub fn new(replicas: &[Vec<Replica>]) -> Self {
        let per_expert = replicas
            .iter()
            .map(|list| {
                let mut acc = 0.0;
                list.iter()
                    .map(|r| {
                        acc += r.share.max(0.0);
                        (r.gpu, acc)
                    })
                    .collect()
            })
            .collect();
        Self {
            per_expert,
            step: None,
        }
    }

    /// The GPU that computes this token of `expert`; `None` for an expert without replicas.
    pub fn pick<R: Rng>(&self, rng: &mut R, expert: u32) -> Option<u32> {
        let list = self.per_expert.get(expert as usize)?;
        let &(last_gpu, total) = list.last()?;
        if list.len() == 1 {
            return Some(last_gpu);
        }
        if total <= 0.0 {
            return Some(list[rng.random_range(0..list.len())].0);
        }
        let r = rng.random::<f64>() * total;
        Some(
            list.iter()
                .find(|(_, c)| r < *c)
                .map_or(last_gpu, |(g, _)| *g),
        )
    }
}

/// The pickers of every layer of `plan`: by the plan's shares, or (with a cost model) by the
/// step-time dispatch.
pub fn layer_pickers(
    plan: &crate::plan::ExpertPlan,
    dispatch: Option<CostModel>,
) -> Vec<ReplicaPicker> {
    let experts = plan.model.experts as usize;
    plan.layers
        .iter()
        .map(|lp| match dispatch {
            Some(cost) => {
                ReplicaPicker::with_step_dispatch(&lp.replicas(experts), cost, plan.model.clone())
            }
            None => ReplicaPicker::new(&lp.replicas(experts)),
        })
        .collect()
}

/// One routed row: (logical expert, router weight, index of its hidden vector in the pool).
pub type RoutedRow = (u32, f32, u32);

/// `n` random hidden vectors of `hidden` bf16 values in [-1, 1), drawn from `rng`: rows point into
/// this pool so that building inputs does not dominate the router's time at large hidden sizes.
pub fn hidden_pool<R: Rng>(rng: &mut R, n: usize, hidden: usize) -> Vec<half::bf16> {
    (0..n * hidden)
        .map(|_| half::bf16::from_f32(rng.random::<f32>() * 2.0 - 1.0))
        .collect()
}

/// Routes one batch of one layer: per token, its top-k experts, router weights, a pool vector and
/// a replica of each expert. The router of `moectl loadgen` and the policy testbed's emulation
/// both call this, so that the same seed gives them the same token draws.
#[derive(Default)]
pub struct LayerRouter {
    picks: Vec<u32>,
    weights: Vec<f32>,
    /// The step-time dispatch's batch: every drawn (expert, weight, pool index), then per expert
    /// the rows left to give each replica.
    drawn: Vec<RoutedRow>,
    quota: Vec<Vec<u64>>,
}

/// Whole rows per replica from a split of `n` rows: the floors, then one more to the largest
/// fractions (the lower index on a tie) until all `n` are given. Empty without replicas.
fn whole_rows(n: u64, split: &[f64], out: &mut Vec<u64>) {
    out.clear();
    if split.is_empty() {
        return;
    }
    out.extend(split.iter().map(|&x| x.max(0.0).floor() as u64));
    // Floors above `n` (float noise) come back off the largest first.
    while out.iter().sum::<u64>() > n {
        let j = (0..out.len()).max_by_key(|&j| out[j]).unwrap_or(0);
        out[j] -= 1;
    }
    let mut order: Vec<usize> = (0..split.len()).collect();
    order.sort_by(|&a, &b| {
        let fa = split[a] - split[a].floor();
        let fb = split[b] - split[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    let mut rest = n - out.iter().sum::<u64>();
    while rest > 0 {
        for &j in &order {
            if rest == 0 {
                break;
            }
            out[j] += 1;
            rest -= 1;
        }
    }
}

impl LayerRouter {
    /// Fills `rows[g]` (cleared first) with the rows GPU `g` computes, and adds each expert's rows
    /// to `expert_rows`. Experts without a replica go to GPU 0 (a checked plan has none).
    #[allow(clippy::too_many_arguments)]
    pub fn route<R: Rng>(
        &mut self,
        rng: &mut R,
        sampler: &TopKSampler,
        picker: &ReplicaPicker,
        top_k: usize,
        tokens: usize,
        pool: u32,
        rows: &mut [Vec<RoutedRow>],
        expert_rows: &mut [u64],
    ) {
        for r in rows.iter_mut() {
            r.clear();
        }
        if let Some(step) = &picker.step {
            self.route_step(
                rng,
                sampler,
                picker,
                step,
                top_k,
                tokens,
                pool,
                rows,
                expert_rows,
            );
            return;
        }
        for _ in 0..tokens {
            sampler.sample(rng, top_k, &mut self.picks);
            router_weights(rng, self.picks.len(), &mut self.weights);
            let x = rng.random_range(0..pool.max(1));
            for (&e, &w) in self.picks.iter().zip(&self.weights) {
                let g = picker.pick(rng, e).unwrap_or(0) as usize;
                rows[g].push((e, w, x));
                if let Some(c) = expert_rows.get_mut(e as usize) {
                    *c += 1;
                }
            }
        }
    }
}

impl LayerRouter {
    /// [`LayerRouter::route`] with the step-time dispatch: draw the batch (consuming the shares
    /// router's random numbers), split each expert's rows over its replicas by the cost model,
    /// then hand the rows out in draw order.
    #[allow(clippy::too_many_arguments)]
    fn route_step<R: Rng>(
        &mut self,
        rng: &mut R,
        sampler: &TopKSampler,
        picker: &ReplicaPicker,
        step: &StepPick,
        top_k: usize,
        tokens: usize,
        pool: u32,
        rows: &mut [Vec<RoutedRow>],
        expert_rows: &mut [u64],
    ) {
        let experts = step.hosts.len();
        self.drawn.clear();
        let mut counts = vec![0u64; experts];
        for _ in 0..tokens {
            sampler.sample(rng, top_k, &mut self.picks);
            router_weights(rng, self.picks.len(), &mut self.weights);
            let x = rng.random_range(0..pool.max(1));
            for (&e, &w) in self.picks.iter().zip(&self.weights) {
                // The shares router's draw, so that both routers see the same tokens.
                let _ = picker.pick(rng, e);
                self.drawn.push((e, w, x));
                if let Some(c) = counts.get_mut(e as usize) {
                    *c += 1;
                }
            }
        }
        let want: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
        let split = crate::plan::dispatch::dispatch(
            &want,
            &step.hosts,
            rows.len(),
            &step.cost,
            &step.model,
        );
        self.quota.resize_with(experts, Vec::new);
        for e in 0..experts {
            let mut q = std::mem::take(&mut self.quota[e]);
            whole_rows(counts[e], &split[e], &mut q);
            self.quota[e] = q;
        }
        for &(e, w, x) in &self.drawn {
            let ei = e as usize;
            let g = match (step.hosts.get(ei), self.quota.get_mut(ei)) {
                (Some(h), Some(q)) if !h.is_empty() => {
                    let j = q.iter().position(|&n| n > 0).unwrap_or(0);
                    if let Some(n) = q.get_mut(j) {
                        *n = n.saturating_sub(1);
                    }
                    h[j]
                }
                _ => 0,
            };
            if let Some(r) = rows.get_mut(g) {
                r.push((e, w, x));
            }
            if let Some(c) = expert_rows.get_mut(ei) {
                *c += 1;
            }
        }
    }
}

/// Random router weights for one token's top-k experts, summing to 1.
pub fn router_weights<R: Rng>(rng: &mut R, k: usize, out: &mut Vec<f32>) {
    out.clear();
    let mut sum = 0.0f32;
    for _ in 0..k {
        let w = 0.05 + rng.random::<f32>();
        sum += w;
        out.push(w);
    }
    for w in out.iter_mut() {
        *w /= sum;
    }
}

/// mean_g / max_g of the rows each GPU got; `None` when no GPU got any.
pub fn balancedness(rows_per_gpu: &[u64]) -> Option<f64> {
    let max = *rows_per_gpu.iter().max()?;
    if max == 0 {
        return None;
    }
    let mean = rows_per_gpu.iter().sum::<u64>() as f64 / rows_per_gpu.len() as f64;
    Some(mean / max as f64)
}

/// Nearest-rank percentile of sorted values (`p` in 0..=1); 0 for no values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn top_k_is_distinct_and_follows_the_weights() {
        let weights = [10.0, 0.0, 30.0, 60.0, 0.0, 0.0];
        let s = TopKSampler::new(&weights);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut out = Vec::new();
        let mut first = [0u32; 6];
        for _ in 0..20_000 {
            s.sample(&mut rng, 2, &mut out);
            assert_eq!(out.len(), 2);
            assert_ne!(out[0], out[1]);
            assert!(out.iter().all(|&e| weights[e as usize] > 0.0), "{out:?}");
            first[out[0] as usize] += 1;
        }
        // The first draw is proportional to the weights: 10% / 30% / 60%.
        let f = |e: usize| first[e] as f64 / 20_000.0;
        assert!((f(0) - 0.1).abs() < 0.015, "{first:?}");
        assert!((f(2) - 0.3).abs() < 0.02, "{first:?}");
        assert!((f(3) - 0.6).abs() < 0.02, "{first:?}");
    }

    #[test]
    fn top_k_fills_with_weightless_experts_when_too_few_have_load() {
        let s = TopKSampler::new(&[0.0, 5.0, 0.0, 0.0]);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut out = Vec::new();
        for _ in 0..100 {
            s.sample(&mut rng, 3, &mut out);
            assert_eq!(out[0], 1);
            let mut sorted = out.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), 3);
        }
        // k larger than the expert count is clamped.
        s.sample(&mut rng, 9, &mut out);
        assert_eq!(out.len(), 4);
        // All weightless: uniform, still distinct.
        TopKSampler::new(&[0.0; 5]).sample(&mut rng, 5, &mut out);
        out.sort();
        assert_eq!(out, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn top_k_handles_one_dominant_expert() {
        // The rejection loop mostly hits the drawn expert; the exact fallback must take over.
        let s = TopKSampler::new(&[1e12, 1.0, 1.0]);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut out = Vec::new();
        s.sample(&mut rng, 3, &mut out);
        assert_eq!(out[0], 0);
        out.sort();
        assert_eq!(out, vec![0, 1, 2]);
    }

    #[test]
    fn the_step_dispatch_routes_the_same_tokens_on_existing_replicas() {
        let r = |gpu| Replica {
            gpu,
            slot: 0,
            share: 0.5,
        };
        // Expert 0 on GPUs 0 and 1; experts 1 and 2 alone.
        let replicas = vec![vec![r(0), r(1)], vec![r(0)], vec![r(1)]];
        let model = |h: u64, i: u64| ModelShape {
            layers: 1,
            first_moe_layer: 0,
            experts: 3,
            top_k: 1,
            hidden_size: h,
            expert_intermediate_size: i,
            dtype: crate::plan::Dtype::Bf16,
        };
        let sampler = TopKSampler::new(&[80.0, 10.0, 10.0]);
        let route = |picker: &ReplicaPicker, tokens: usize| {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let mut rows = vec![Vec::new(); 2];
            let mut expert_rows = vec![0u64; 3];
            LayerRouter::default().route(
                &mut rng,
                &sampler,
                picker,
                1,
                tokens,
                8,
                &mut rows,
                &mut expert_rows,
            );
            (rows, expert_rows)
        };
        let cost = CostModel::H200_BF16;
        for (h, i, tokens, spread) in [(2048, 768, 64, false), (2048, 768, 100_000, true)] {
            let (shares, counted) = route(&ReplicaPicker::new(&replicas), tokens);
            let step = ReplicaPicker::with_step_dispatch(&replicas, cost, model(h, i));
            let (dispatched, counted2) = route(&step, tokens);
            // The same tokens (expert, weight, pool row), only on other replicas.
            assert_eq!(counted, counted2);
            let sorted = |rows: &[Vec<RoutedRow>]| {
                let mut all: Vec<(u32, u32, u32)> = rows
                    .iter()
                    .flatten()
                    .map(|&(e, w, x)| (e, w.to_bits(), x))
                    .collect();
                all.sort();
                all
            };
            assert_eq!(sorted(&shares), sorted(&dispatched));
            // Experts 1 and 2 stay on their one GPU.
            assert!(dispatched[1].iter().all(|row| row.0 != 1));
            assert!(dispatched[0].iter().all(|row| row.0 != 2));
            // Decode keeps expert 0 on one replica; a large batch spreads it over both.
            let on = |g: usize| dispatched[g].iter().filter(|row| row.0 == 0).count();
            assert_eq!(on(0) > 0 && on(1) > 0, spread, "{} {}", on(0), on(1));
        }
    }

    #[test]
    fn whole_rows_give_exactly_n() {
        let mut out = Vec::new();
        for (n, split) in [
            (10u64, vec![3.3, 3.3, 3.4]),
            (7, vec![7.0]),
            (5, vec![0.0, 5.0]),
            (3, vec![1.0000000001, 1.0000000001, 0.9999999998]),
            (0, vec![0.0, 0.0]),
        ] {
            whole_rows(n, &split, &mut out);
            assert_eq!(out.iter().sum::<u64>(), n, "{split:?} {out:?}");
        }
        whole_rows(4, &[], &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn replicas_are_picked_by_share() {
        let r = |gpu, share| Replica {
            gpu,
            slot: 0,
            share,
        };
        let p = ReplicaPicker::new(&[vec![r(0, 1.0)], vec![r(1, 0.25), r(3, 0.75)], vec![]]);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        assert_eq!(p.pick(&mut rng, 0), Some(0));
        assert_eq!(p.pick(&mut rng, 2), None);
        assert_eq!(p.pick(&mut rng, 7), None);
        let on3 = (0..10_000)
            .filter(|_| p.pick(&mut rng, 1) == Some(3))
            .count();
        assert!((on3 as f64 / 10_000.0 - 0.75).abs() < 0.02, "{on3}");
    }

    #[test]
    fn balance_and_percentiles() {
        assert_eq!(balancedness(&[2, 2, 2, 2]), Some(1.0));
        assert_eq!(balancedness(&[4, 0, 0, 0]), Some(0.25));
        assert_eq!(balancedness(&[0, 0]), None);
        assert_eq!(balancedness(&[]), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut w = Vec::new();
        router_weights(&mut rng, 8, &mut w);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}
