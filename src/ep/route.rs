//! Pure routing of one rank's tokens for one MoE layer: which rank computes each (token, choice),
//! in what order rows leave and arrive, and where each output comes back. No I/O, no device.
//!
//! Rows leave grouped by destination rank and, within one destination, by expert, so that the
//! receiver gets each source's rows already in expert runs. Outputs come back in the order the
//! rows were sent, so the combine step only needs, per (token, choice), the row's send position.

use crate::plan::ExpertPlan;

/// Why a layer's routing inputs were refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("layer {layer} has no plan (planned MoE layers: {planned})")]
    NoLayer { layer: u32, planned: String },
    #[error("{what} has {got} entries, expected {want} ({tokens} tokens x top-k {top_k})")]
    Length {
        what: &'static str,
        got: usize,
        want: usize,
        tokens: usize,
        top_k: usize,
    },
    #[error("token {token} choice {choice}: expert id {expert} is not below the model's {experts} experts")]
    Expert {
        token: usize,
        choice: usize,
        expert: i64,
        experts: u32,
    },
    #[error("token {token} choice {choice}: router weight {weight} is not finite")]
    Weight {
        token: usize,
        choice: usize,
        weight: f32,
    },
    #[error("layer {layer} expert {expert} has no replica in the plan")]
    NoReplica { layer: u32, expert: u32 },
    #[error("rank {rank} sent {rows} rows for expert {expert} of layer {layer}, which this rank does not hold")]
    NotHeld {
        rank: usize,
        rows: usize,
        layer: u32,
        expert: u32,
    },
}

/// One layer's replicas: per logical expert, (rank, share, current credit) of each replica.
type LayerReplicas = Vec<Vec<(u32, f64, f64)>>;

/// Replica choice by the plan's shares: smooth weighted round robin per (layer, expert), so that
/// over any run of tokens each replica gets its share to within one row, deterministically.
pub struct Router {
    experts: u32,
    /// Per planned layer: (model layer, its replicas).
    layers: Vec<(u32, LayerReplicas)>,
}

impl Router {
    pub fn new(plan: &ExpertPlan) -> Self {
        let experts = plan.model.experts;
        let layers = plan
            .layers
            .iter()
            .map(|lp| {
                let reps = lp
                    .replicas(experts as usize)
                    .into_iter()
                    .map(|list| {
                        let total: f64 = list.iter().map(|r| r.share.max(0.0)).sum();
                        list.iter()
                            .map(|r| {
                                // Shares that sum to nothing split evenly.
                                let s = if total > 0.0 {
                                    r.share.max(0.0) / total
                                } else {
                                    1.0 / list.len() as f64
                                };
                                (r.gpu, s, 0.0)
                            })
                            .collect()
                    })
                    .collect();
                (lp.layer, reps)
            })
            .collect();
        Self { experts, layers }
    }

    pub fn experts(&self) -> u32 {
        self.experts
    }

    fn layer_mut(&mut self, layer: u32) -> Result<&mut LayerReplicas, RouteError> {
        let pos = self.layers.iter().position(|(l, _)| *l == layer);
        match pos {
            Some(i) => Ok(&mut self.layers[i].1),
            None => Err(RouteError::NoLayer {
                layer,
                planned: self.planned(),
            }),
        }
    }

    fn planned(&self) -> String {
        match (self.layers.first(), self.layers.last()) {
            (Some(a), Some(b)) => format!("{}..={} ({} layers)", a.0, b.0, self.layers.len()),
            _ => "none".into(),
        }
    }

    /// The rank that computes the next row of `expert` in `layer`.
    pub fn pick(&mut self, layer: u32, expert: u32) -> Result<u32, RouteError> {
        let reps = self.layer_mut(layer)?;
        let list = reps
            .get_mut(expert as usize)
            .filter(|l| !l.is_empty())
            .ok_or(RouteError::NoReplica { layer, expert })?;
        if list.len() == 1 {
            return Ok(list[0].0);
        }
        for r in list.iter_mut() {
            r.2 += r.1;
        }
        let mut best = 0;
        // Pick the largest credit (first on ties), then charge it one whole row.
        for i in 1..list.len() {
            if list[i].2 > list[best].2 {
                best = i;
            }
        }
        list[best].2 -= 1.0;
        Ok(list[best].0)
    }
}

/// `ids` and `weights` must be `tokens x top_k`.
pub fn check_lengths(
    tokens: usize,
    top_k: usize,
    ids: &[i64],
    weights: &[f32],
) -> Result<(), RouteError> {
    let want = tokens * top_k;
    for (what, got) in [("top-k ids", ids.len()), ("top-k weights", weights.len())] {
        if got != want {
            return Err(RouteError::Length {
                what,
                got,
                want,
                tokens,
                top_k,
            });
        }
    }
    Ok(())
}

/// What one rank sends for one layer: rows grouped by destination, then by expert.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Dispatch {
    /// Token index of each sent row, in send order.
    pub send_tokens: Vec<u32>,
    /// Rows to each rank (send order is rank 0's rows, then rank 1's, ...).
    pub send_counts: Vec<usize>,
    /// Logical expert of each sent row, in send order.
    pub experts: Vec<u32>,
    /// Router weight of each sent row, in send order.
    pub weights: Vec<f32>,
    /// For token `t` and choice `j`, the send position of its row (`combine[t * k + j]`); the
    /// output of that row comes back at the same position.
    pub combine: Vec<u32>,
}

impl Dispatch {
    /// Routes `tokens` tokens: `ids[t * k + j]` is token `t`'s `j`-th expert, `weights` the same
    /// shape. Ids arrive as i64 (what engines' top-k returns) and are checked here.
    pub fn build(
        router: &mut Router,
        layer: u32,
        world: usize,
        tokens: usize,
        top_k: usize,
        ids: &[i64],
        weights: &[f32],
    ) -> Result<Self, RouteError> {
        check_lengths(tokens, top_k, ids, weights)?;
        let want = tokens * top_k;
        let experts = router.experts();
        let mut dest = Vec::with_capacity(want);
        for (i, (&e, &w)) in ids.iter().zip(weights).enumerate() {
            let (token, choice) = (i / top_k.max(1), i % top_k.max(1));
            if e < 0 || e >= i64::from(experts) {
                return Err(RouteError::Expert {
                    token,
                    choice,
                    expert: e,
                    experts,
                });
            }
            if !w.is_finite() {
                return Err(RouteError::Weight {
                    token,
                    choice,
                    weight: w,
                });
            }
            let r = router.pick(layer, e as u32)? as usize;
            dest.push(r.min(world.saturating_sub(1)));
        }
        // Counting sort by (destination, expert); stable, so tokens keep their order in a run.
        let e_n = experts as usize;
        let mut start = vec![0usize; world * e_n + 1];
        for (i, &d) in dest.iter().enumerate() {
            start[d * e_n + ids[i] as usize + 1] += 1;
        }
        for b in 1..start.len() {
            start[b] += start[b - 1];
        }
        let mut send_counts = vec![0usize; world];
        for (d, c) in send_counts.iter_mut().enumerate() {
            *c = start[(d + 1) * e_n] - start[d * e_n];
        }
        let mut out = Self {
            send_tokens: vec![0; want],
            send_counts,
            experts: vec![0; want],
            weights: vec![0.0; want],
            combine: vec![0; want],
        };
        for (i, &d) in dest.iter().enumerate() {
            let b = d * e_n + ids[i] as usize;
            let p = start[b];
            start[b] += 1;
            out.send_tokens[p] = (i / top_k) as u32;
            out.experts[p] = ids[i] as u32;
            out.weights[p] = weights[i];
            out.combine[i] = p as u32;
        }
        Ok(out)
    }

    /// Send-order offsets of each destination's rows (`world + 1` entries).
    pub fn offsets(&self) -> Vec<usize> {
        offsets(&self.send_counts)
    }
}

/// Prefix sums: `out[i]` is where run `i` starts, `out[len]` the total.
pub fn offsets(counts: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(counts.len() + 1);
    let mut acc = 0;
    out.push(0);
    for &c in counts {
        acc += c;
        out.push(acc);
    }
    out
}

/// What one rank received for one layer, in the grouping its expert kernels want.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Arrivals {
    /// Rows from each source rank (they arrive source after source).
    pub recv_counts: Vec<usize>,
    /// Per arrived row (arrival order): its expert and router weight.
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
    /// Expert order: the distinct experts with rows, ascending, and their row counts.
    pub groups: Vec<(u32, usize)>,
    /// `gather[p]`: the arrival position of expert-order row `p`.
    pub gather: Vec<u32>,
    /// `scatter[i]`: the expert-order position of arrival row `i` (the inverse of `gather`).
    pub scatter: Vec<u32>,
    /// Router weights in expert order.
    pub group_weights: Vec<f32>,
}

impl Arrivals {
    /// From each source's (experts, weights) of its rows to this rank, in arrival order; refuses
    /// an expert this rank does not hold (`held`), naming the source.
    pub fn build(
        layer: u32,
        from: &[(Vec<u32>, Vec<f32>)],
        experts: u32,
        held: impl Fn(u32) -> bool,
    ) -> Result<Self, RouteError> {
        let total: usize = from.iter().map(|(e, _)| e.len()).sum();
        let mut out = Self {
            recv_counts: from.iter().map(|(e, _)| e.len()).collect(),
            experts: Vec::with_capacity(total),
            weights: Vec::with_capacity(total),
            ..Default::default()
        };
        let mut per = vec![0usize; experts as usize];
        for (rank, (es, ws)) in from.iter().enumerate() {
            for &e in es {
                match per.get_mut(e as usize) {
                    Some(c) if held(e) => *c += 1,
                    _ => {
                        return Err(RouteError::NotHeld {
                            rank,
                            rows: es.iter().filter(|&&x| x == e).count(),
                            layer,
                            expert: e,
                        })
                    }
                }
            }
            out.experts.extend_from_slice(es);
            out.weights.extend_from_slice(ws);
        }
        let mut start = vec![0usize; experts as usize + 1];
        for (e, &c) in per.iter().enumerate() {
            start[e + 1] = start[e] + c;
            if c > 0 {
                out.groups.push((e as u32, c));
            }
        }
        out.gather = vec![0; total];
        out.scatter = vec![0; total];
        out.group_weights = vec![0.0; total];
        for (i, &e) in out.experts.iter().enumerate() {
            let p = start[e as usize];
            start[e as usize] += 1;
            out.gather[p] = i as u32;
            out.scatter[i] = p as u32;
            out.group_weights[p] = out.weights[i];
        }
        Ok(out)
    }

    pub fn rows(&self) -> usize {
        self.experts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::expert_plan::LayerPlan;

    /// 4 experts on 2 ranks; expert 0 replicated on both with shares 3/4 and 1/4.
    fn two_rank_plan() -> ExpertPlan {
        let mut plan = crate::ep::testutil::plan(1, 4, 2, 2, 0);
        plan.layers = vec![LayerPlan {
            layer: plan.layers[0].layer,
            slots: vec![vec![0, 1, 2], vec![3, 0]],
            shares: vec![vec![0.75, 1.0, 1.0], vec![1.0, 0.25]],
        }];
        plan
    }

    #[test]
    fn round_robin_gives_each_replica_its_share_exactly() {
        let plan = two_rank_plan();
        let l = plan.layers[0].layer;
        let mut r = Router::new(&plan);
        let picks: Vec<u32> = (0..8).map(|_| r.pick(l, 0).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&g| g == 1).count(), 2, "{picks:?}");
        assert_eq!(r.pick(l, 3).unwrap(), 1);
        assert_eq!(r.pick(l, 1).unwrap(), 0);
        assert!(matches!(
            r.pick(l + 100, 0),
            Err(RouteError::NoLayer { .. })
        ));
    }

    #[test]
    fn dispatch_groups_by_rank_then_expert_and_combine_points_back() {
        let plan = two_rank_plan();
        let l = plan.layers[0].layer;
        let mut r = Router::new(&plan);
        // 3 tokens, top-2.
        let ids = [3i64, 1, 2, 1, 1, 3];
        let w = [0.5f32, 0.5, 0.25, 0.75, 0.9, 0.1];
        let d = Dispatch::build(&mut r, l, 2, 3, 2, &ids, &w).unwrap();
        assert_eq!(d.send_counts, vec![4, 2]);
        assert_eq!(d.experts, vec![1, 1, 1, 2, 3, 3]);
        assert_eq!(d.send_tokens, vec![0, 1, 2, 1, 0, 2]);
        for (i, &p) in d.combine.iter().enumerate() {
            assert_eq!(d.experts[p as usize] as i64, ids[i]);
            assert_eq!(d.weights[p as usize], w[i]);
            assert_eq!(d.send_tokens[p as usize] as usize, i / 2);
        }
        assert_eq!(d.offsets(), vec![0, 4, 6]);
    }

    #[test]
    fn bad_inputs_are_named() {
        let plan = two_rank_plan();
        let l = plan.layers[0].layer;
        let mut r = Router::new(&plan);
        let e = Dispatch::build(&mut r, l, 2, 1, 2, &[0, 9], &[0.5, 0.5]).unwrap_err();
        assert!(e.to_string().contains("expert id 9"), "{e}");
        let e = Dispatch::build(&mut r, l, 2, 1, 2, &[0], &[0.5, 0.5]).unwrap_err();
        assert!(e.to_string().contains("top-k ids has 1 entries"), "{e}");
        let e = Dispatch::build(&mut r, l, 2, 1, 1, &[0], &[f32::NAN]).unwrap_err();
        assert!(e.to_string().contains("not finite"), "{e}");
    }

    #[test]
    fn arrivals_group_by_expert_and_refuse_what_is_not_held() {
        let from = vec![
            (vec![1, 2], vec![0.1, 0.2]),
            (vec![], vec![]),
            (vec![0, 1], vec![0.3, 0.4]),
        ];
        let a = Arrivals::build(5, &from, 4, |e| e < 3).unwrap();
        assert_eq!(a.recv_counts, vec![2, 0, 2]);
        assert_eq!(a.groups, vec![(0, 1), (1, 2), (2, 1)]);
        assert_eq!(a.gather, vec![2, 0, 3, 1]);
        assert_eq!(a.group_weights, vec![0.3, 0.1, 0.4, 0.2]);
        for (i, &p) in a.scatter.iter().enumerate() {
            assert_eq!(a.gather[p as usize] as usize, i);
        }
        let e = Arrivals::build(5, &from, 4, |e| e != 1).unwrap_err();
        assert_eq!(
            e,
            RouteError::NotHeld {
                rank: 0,
                rows: 1,
                layer: 5,
                expert: 1
            }
        );
    }
}
