//! A faithful port of DeepSeek's EPLB (`deepseek-ai/EPLB`, `eplb.py`, MIT): `balanced_packing`,
//! `replicate_experts`, `rebalance_experts_hierarchical` and `rebalance_experts`.
//!
//! Upstream converts loads to f32 (`weight.float()`) and does all its arithmetic in f32; so do we,
//! so that exact ties (which decide placements) fall the same way. Upstream leaves tie order to
//! `torch.sort`/`torch.max`; the README output is reproduced only with the rule we implement
//! (see `eplb_readme_example.json`): a stable descending sort, the lowest pack index among packs of
//! equal weight, and the lowest expert index in the replication argmax.
//!
//! The port works layer by layer with flat buffers reused across layers, so that planning the
//! DeepSeek-V3 shape (58 x 256 -> 320 slots on 64 GPUs) costs well under a millisecond per layer.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use thiserror::Error;

use super::expert_plan::{round_share, LayerPlan};
use super::load::LoadWindow;
use super::model::{ModelShape, ShapeError, Topology};

/// Invalid arguments to [`rebalance_experts`]. Upstream asserts; we return these instead.
#[derive(Debug, Error, PartialEq)]
pub enum EplbError {
    #[error("the weight matrix is empty: EPLB needs at least one layer and one expert")]
    Empty,
    #[error("weight row {layer} has {found} experts but row 0 has {expected}: every layer needs the same expert count")]
    Ragged {
        layer: usize,
        expected: usize,
        found: usize,
    },
    #[error("weight[{layer}][{expert}] = {value} is not a finite non-negative load")]
    BadLoad {
        layer: usize,
        expert: usize,
        value: f64,
    },
    #[error("{name} must be at least 1 (got 0)")]
    Zero { name: &'static str },
    #[error("num_gpus ({gpus}) must be a multiple of num_nodes ({nodes}): every node holds the same number of GPUs")]
    GpusNotMultipleOfNodes { gpus: usize, nodes: usize },
    #[error("num_replicas ({replicas}) must be a multiple of num_gpus ({gpus}): every GPU holds the same number of physical experts")]
    ReplicasNotMultipleOfGpus { replicas: usize, gpus: usize },
    #[error("num_replicas ({replicas}) is smaller than the number of logical experts ({experts}): every expert needs a slot")]
    TooFewReplicas { replicas: usize, experts: usize },
    #[error("the {experts} logical experts cannot be split into {groups} equal groups: num_groups must divide the expert count")]
    ExpertsNotDivisibleByGroups { experts: usize, groups: usize },
    /// [`eplb_plan`]: the load window does not fit the model.
    #[error(transparent)]
    Shape(#[from] ShapeError),
}

/// The output of [`rebalance_experts`], indexed by layer first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EplbResult {
    /// `phy2log[l][p]`: the logical expert held by physical slot `p`. GPU `g` holds the
    /// contiguous range `g * P/D .. (g + 1) * P/D`.
    pub phy2log: Vec<Vec<usize>>,
    /// `log2phy[l][e][r]`: the physical index of replica `r` of expert `e`, or -1 past `logcnt[l][e]`.
    /// Padded to the largest replica count over all layers, as upstream does.
    pub log2phy: Vec<Vec<Vec<i64>>>,
    /// `logcnt[l][e]`: the number of replicas of logical expert `e`.
    pub logcnt: Vec<Vec<usize>>,
}

/// Scratch buffers reused across layers (no allocation in the per-layer loops).
#[derive(Default)]
struct Scratch {
    order: Vec<usize>,
    pack_weight: Vec<f32>,
    pack_items: Vec<usize>,
    pack_index: Vec<usize>,
    rank_in_pack: Vec<usize>,
    tokens_per_group: Vec<f32>,
    log2mlog: Vec<usize>,
    mlog2log: Vec<usize>,
    tokens_per_mlog: Vec<f32>,
    phy2mlog: Vec<usize>,
    phyrank: Vec<usize>,
    mlogcnt: Vec<usize>,
    tokens_per_phy: Vec<f32>,
    pphy2phy: Vec<usize>,
    pack_heap: BinaryHeap<Reverse<(u32, usize)>>,
    rep_heap: BinaryHeap<(u32, Reverse<usize>)>,
}

/// Order key of a non-negative f32: the bit pattern orders like the value (`+ 0.0` folds -0.0).
fn key(x: f32) -> u32 {
    (x + 0.0).to_bits()
}

/// `balanced_packing`: put `weight.len()` items into `num_packs` packs of equal item count, heaviest
/// first, each into the lightest pack that still has room (lowest index on ties). Fills
/// `pack_index` and `rank_in_pack` (position of the item within its pack).
///
/// Upstream scans all packs per item; a min-heap on (weight, pack index) picks the same pack in
/// O(log packs), since Python's `min` returns the first (lowest-index) minimum.
fn balanced_packing(weight: &[f32], num_packs: usize, s: &mut Scratch) {
    let n = weight.len();
    let per_pack = n / num_packs;
    s.pack_index.clear();
    s.rank_in_pack.clear();
    if per_pack == 1 {
        // Upstream short-cuts this case to the identity without sorting.
        s.pack_index.extend(0..n);
        s.rank_in_pack.resize(n, 0);
        return;
    }
    s.pack_index.resize(n, usize::MAX);
    s.rank_in_pack.resize(n, usize::MAX);
    s.order.clear();
    s.order.extend(0..n);
    // Stable: equal weights keep ascending index order.
    s.order.sort_by(|&a, &b| {
        weight[b]
            .partial_cmp(&weight[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    s.pack_weight.clear();
    s.pack_weight.resize(num_packs, 0.0);
    s.pack_items.clear();
    s.pack_items.resize(num_packs, 0);
    s.pack_heap.clear();
    s.pack_heap
        .extend((0..num_packs).map(|p| Reverse((key(0.0), p))));
    for &item in &s.order {
        // Every pack with room is in the heap; n = packs x per_pack, so it is never empty here.
        let Some(Reverse((_, best))) = s.pack_heap.pop() else {
            break;
        };
        s.pack_index[item] = best;
        s.rank_in_pack[item] = s.pack_items[best];
        s.pack_weight[best] += weight[item];
        s.pack_items[best] += 1;
        if s.pack_items[best] < per_pack {
            s.pack_heap.push(Reverse((key(s.pack_weight[best]), best)));
        }
    }
}

/// `replicate_experts`: give the `num_phy - weight.len()` redundant slots one by one to the expert
/// with the highest load per replica (lowest index on ties). Fills `phy2mlog`, `phyrank`, `mlogcnt`.
///
/// Upstream takes the argmax of `weight / logcnt` per slot; a max-heap on (load per replica,
/// lowest index) gives the same expert, as only the chosen expert's value changes per step.
fn replicate_experts(weight: &[f32], num_phy: usize, s: &mut Scratch) {
    let num_log = weight.len();
    s.phy2mlog.clear();
    s.phy2mlog.extend(0..num_log);
    s.phyrank.clear();
    s.phyrank.resize(num_log, 0);
    s.mlogcnt.clear();
    s.mlogcnt.resize(num_log, 1);
    s.rep_heap.clear();
    s.rep_heap.extend(
        weight
            .iter()
            .enumerate()
            .map(|(e, &w)| (key(w), Reverse(e))),
    );
    for _ in num_log..num_phy {
        let Some((_, Reverse(best))) = s.rep_heap.pop() else {
            break;
        };
        s.phy2mlog.push(best);
        s.phyrank.push(s.mlogcnt[best]);
        s.mlogcnt[best] += 1;
        s.rep_heap
            .push((key(weight[best] / s.mlogcnt[best] as f32), Reverse(best)));
    }
}

/// One layer of `rebalance_experts_hierarchical`. Writes `phy2log`, `phyrank` (both of length
/// `num_phy`) and `logcnt` (length `weight.len()`).
#[allow(clippy::too_many_arguments)]
fn rebalance_layer(
    weight: &[f32],
    num_phy: usize,
    num_groups: usize,
    num_nodes: usize,
    num_gpus: usize,
    s: &mut Scratch,
    phy2log: &mut [usize],
    out_rank: &mut [usize],
    logcnt: &mut [usize],
) {
    let num_log = weight.len();
    let group_size = num_log / num_groups;
    let groups_per_node = num_groups / num_nodes;
    let phy_per_gpu = num_phy / num_gpus;
    let log_per_node = num_log / num_nodes;
    let phy_per_node = num_phy / num_nodes;

    // Step 1: pack groups to nodes. Sum in f64 and round once, which equals torch's f32 sum
    // whenever the loads are integers below 2^24 (the usual case) and is the correctly rounded sum
    // otherwise.
    s.tokens_per_group.clear();
    s.tokens_per_group.extend(
        weight
            .chunks_exact(group_size)
            .map(|g| g.iter().map(|&x| x as f64).sum::<f64>() as f32),
    );
    let tpg = std::mem::take(&mut s.tokens_per_group);
    balanced_packing(&tpg, num_nodes, s);
    s.tokens_per_group = tpg;
    s.log2mlog.clear();
    for g in 0..num_groups {
        let base = (s.pack_index[g] * groups_per_node + s.rank_in_pack[g]) * group_size;
        s.log2mlog.extend(base..base + group_size);
    }
    s.mlog2log.clear();
    s.mlog2log.resize(num_log, 0);
    for (log, &mlog) in s.log2mlog.iter().enumerate() {
        s.mlog2log[mlog] = log;
    }

    // Steps 2 and 3, node by node: replicate within the node, then pack its physical experts to
    // its GPUs.
    let gpus_per_node = num_gpus / num_nodes;
    for node in 0..num_nodes {
        let mlog0 = node * log_per_node;
        s.tokens_per_mlog.clear();
        s.tokens_per_mlog.extend(
            s.mlog2log[mlog0..mlog0 + log_per_node]
                .iter()
                .map(|&log| weight[log]),
        );
        let tpm = std::mem::take(&mut s.tokens_per_mlog);
        replicate_experts(&tpm, phy_per_node, s);
        s.tokens_per_phy.clear();
        s.tokens_per_phy
            .extend(s.phy2mlog.iter().map(|&m| tpm[m] / s.mlogcnt[m] as f32));
        s.tokens_per_mlog = tpm;
        let tpp = std::mem::take(&mut s.tokens_per_phy);
        balanced_packing(&tpp, gpus_per_node, s);
        s.tokens_per_phy = tpp;
        // inverse(phy2pphy)
        s.pphy2phy.clear();
        s.pphy2phy.resize(phy_per_node, 0);
        for phy in 0..phy_per_node {
            s.pphy2phy[s.pack_index[phy] * phy_per_gpu + s.rank_in_pack[phy]] = phy;
        }
        let pphy0 = node * phy_per_node;
        for pphy in 0..phy_per_node {
            let phy = s.pphy2phy[pphy];
            phy2log[pphy0 + pphy] = s.mlog2log[mlog0 + s.phy2mlog[phy]];
            out_rank[pphy0 + pphy] = s.phyrank[phy];
        }
        for m in 0..log_per_node {
            logcnt[s.mlog2log[mlog0 + m]] = s.mlogcnt[m];
        }
    }
}

fn check_args(
    layers: usize,
    experts: usize,
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_gpus: usize,
) -> Result<(), EplbError> {
    if layers == 0 || experts == 0 {
        return Err(EplbError::Empty);
    }
    for (name, v) in [
        ("num_replicas", num_replicas),
        ("num_groups", num_groups),
        ("num_nodes", num_nodes),
        ("num_gpus", num_gpus),
    ] {
        if v == 0 {
            return Err(EplbError::Zero { name });
        }
    }
    if !num_gpus.is_multiple_of(num_nodes) {
        return Err(EplbError::GpusNotMultipleOfNodes {
            gpus: num_gpus,
            nodes: num_nodes,
        });
    }
    if !num_replicas.is_multiple_of(num_gpus) {
        return Err(EplbError::ReplicasNotMultipleOfGpus {
            replicas: num_replicas,
            gpus: num_gpus,
        });
    }
    if num_replicas < experts {
        return Err(EplbError::TooFewReplicas {
            replicas: num_replicas,
            experts,
        });
    }
    // Upstream asserts this only on the hierarchical path; the global one uses a single group.
    if num_groups.is_multiple_of(num_nodes) && !experts.is_multiple_of(num_groups) {
        return Err(EplbError::ExpertsNotDivisibleByGroups {
            experts,
            groups: num_groups,
        });
    }
    Ok(())
}

/// `rebalance_experts`: the hierarchical policy when `num_groups % num_nodes == 0`, else the global
/// one (one group, one node). Loads are converted to f32 as upstream does.
///
/// Beyond upstream's asserts we also require `num_gpus % num_nodes == 0` in the global case (a
/// topology that breaks it is invalid for every other planner too).
pub fn rebalance_experts(
    weight: &[Vec<f32>],
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_gpus: usize,
) -> Result<EplbResult, EplbError> {
    let layers = weight.len();
    let experts = weight.first().map_or(0, Vec::len);
    check_args(
        layers,
        experts,
        num_replicas,
        num_groups,
        num_nodes,
        num_gpus,
    )?;
    for (l, row) in weight.iter().enumerate() {
        if row.len() != experts {
            return Err(EplbError::Ragged {
                layer: l,
                expected: experts,
                found: row.len(),
            });
        }
        if let Some(e) = row.iter().position(|w| !w.is_finite() || *w < 0.0) {
            return Err(EplbError::BadLoad {
                layer: l,
                expert: e,
                value: row[e] as f64,
            });
        }
    }
    let (groups, nodes) = if num_groups.is_multiple_of(num_nodes) {
        (num_groups, num_nodes)
    } else {
        (1, 1)
    };

    let mut s = Scratch::default();
    let mut phy2log = vec![vec![0usize; num_replicas]; layers];
    let mut phyrank = vec![0usize; num_replicas];
    let mut logcnt = vec![vec![0usize; experts]; layers];
    let mut ranks = Vec::with_capacity(layers);
    for l in 0..layers {
        rebalance_layer(
            &weight[l],
            num_replicas,
            groups,
            nodes,
            num_gpus,
            &mut s,
            &mut phy2log[l],
            &mut phyrank,
            &mut logcnt[l],
        );
        ranks.push(phyrank.clone());
    }
    let max_cnt = logcnt.iter().flatten().copied().max().unwrap_or(1);
    let log2phy = (0..layers)
        .map(|l| {
            let mut m = vec![vec![-1i64; max_cnt]; experts];
            for (p, (&e, &r)) in phy2log[l].iter().zip(&ranks[l]).enumerate() {
                m[e][r] = p as i64;
            }
            m
        })
        .collect();
    Ok(EplbResult {
        phy2log,
        log2phy,
        logcnt,
    })
}

/// Plan every layer of `window` with EPLB and convert the result to our [`LayerPlan`]s.
///
/// - Physical experts per GPU per layer: `ceil(E / D) + redundant_per_gpu_per_layer`, so that
///   `0` gives placement only (EPLB with no redundant experts) and DeepSeek's deployment of
///   256 experts on 64 GPUs with 320 slots is `1`.
/// - `num_groups`: the model's expert-group count (DeepSeek-V3's `n_group` = 8), used for the
///   hierarchical policy when it is a multiple of the node count. [`ModelShape`] carries no group
///   count, so `None` means one group, which is EPLB's global policy.
/// - Shares: `1 / logcnt` for every replica (EPLB splits evenly), rounded with [`round_share`];
///   the replica with the highest physical index takes the remainder so each expert's shares sum to 1.
pub fn eplb_plan(
    window: &LoadWindow,
    model: &ModelShape,
    topo: Topology,
    redundant_per_gpu_per_layer: usize,
    num_groups: Option<usize>,
) -> Result<Vec<LayerPlan>, EplbError> {
    let experts = window.experts();
    if experts != model.experts as usize {
        return Err(ShapeError::Experts {
            load: experts,
            model: model.experts,
        }
        .into());
    }
    if topo.gpus == 0 {
        return Err(EplbError::Zero { name: "gpus" });
    }
    let per_gpu = experts.div_ceil(topo.gpus) + redundant_per_gpu_per_layer;
    let num_replicas = per_gpu * topo.gpus;
    // Window totals in one sequential pass (batch-major storage), summed in batch order like
    // `LoadWindow::layer_totals`.
    let mut acc = vec![0.0f64; window.layers() * experts];
    for b in 0..window.batches() {
        for (l, a) in acc.chunks_exact_mut(experts).enumerate() {
            a.iter_mut()
                .zip(window.row(b, l))
                .for_each(|(a, c)| *a += c);
        }
    }
    let weight: Vec<Vec<f32>> = acc
        .chunks_exact(experts)
        .map(|t| t.iter().map(|&x| x as f32).collect())
        .collect();
    let res = rebalance_experts(
        &weight,
        num_replicas,
        num_groups.unwrap_or(1),
        topo.nodes,
        topo.gpus,
    )?;

    Ok(res
        .phy2log
        .iter()
        .enumerate()
        .map(|(l, p2l)| {
            let slots = p2l
                .chunks_exact(per_gpu)
                .map(|gpu| gpu.iter().map(|&e| e as u32).collect())
                .collect();
            even_split_plan(window.layer_ids()[l], slots, experts)
        })
        .collect())
}

/// A [`LayerPlan`] that splits every expert's tokens evenly among its replicas: each share is
/// `1 / replicas` rounded with [`round_share`], and the last replica (in GPU, then slot order)
/// takes the remainder so that the shares of an expert sum to 1.
pub(crate) fn even_split_plan(layer: u32, slots: Vec<Vec<u32>>, experts: usize) -> LayerPlan {
    let mut cnt = vec![0usize; experts];
    for &e in slots.iter().flatten() {
        if let Some(c) = cnt.get_mut(e as usize) {
            *c += 1;
        }
    }
    let mut seen = vec![0usize; experts];
    let mut share_sum = vec![0.0f64; experts];
    let shares = slots
        .iter()
        .map(|gpu| {
            gpu.iter()
                .map(|&e| {
                    let e = e as usize;
                    if e >= experts {
                        return 0.0;
                    }
                    seen[e] += 1;
                    let share = if seen[e] == cnt[e] {
                        round_share(1.0 - share_sum[e])
                    } else {
                        round_share(1.0 / cnt[e] as f64)
                    };
                    share_sum[e] += share;
                    share
                })
                .collect()
        })
        .collect();
    LayerPlan {
        layer,
        slots,
        shares,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::model::Dtype;
    use serde_json::Value;

    fn weight_of(v: &Value) -> Vec<Vec<f32>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect()
    }

    fn usize_rows(v: &Value) -> Vec<Vec<usize>> {
        serde_json::from_value(v.clone()).unwrap()
    }

    fn run_case(case: &Value) -> EplbResult {
        let i = &case["inputs"];
        let n = |k: &str| i[k].as_u64().unwrap() as usize;
        rebalance_experts(
            &weight_of(&i["weight"]),
            n("num_replicas"),
            n("num_groups"),
            n("num_nodes"),
            n("num_gpus"),
        )
        .unwrap()
    }

    fn check_case(case: &Value) {
        let r = run_case(case);
        assert_eq!(
            r.phy2log,
            usize_rows(&case["expected_phy2log"]),
            "{}",
            case["note"]
        );
        assert_eq!(
            r.logcnt,
            usize_rows(&case["expected_logcnt"]),
            "{}",
            case["note"]
        );
        if let Some(l2p) = case.get("expected_log2phy") {
            let want: Vec<Vec<Vec<i64>>> = serde_json::from_value(l2p.clone()).unwrap();
            assert_eq!(r.log2phy, want);
        }
    }

    #[test]
    fn readme_example_reproduces_exactly() {
        let case: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/eplb/eplb_readme_example.json"
        ))
        .unwrap();
        check_case(&case);
    }

    #[test]
    fn extra_cases_reproduce_exactly() {
        let cases: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/eplb/eplb_extra_cases.json"
        ))
        .unwrap();
        let cases = cases.as_array().unwrap();
        assert_eq!(cases.len(), 4);
        for case in cases {
            check_case(case);
        }
    }

    #[test]
    fn readme_per_gpu_loads_match_derivation() {
        let case: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/eplb/eplb_readme_example.json"
        ))
        .unwrap();
        let r = run_case(&case);
        let w = weight_of(&case["inputs"]["weight"]);
        let want: Vec<Vec<f64>> =
            serde_json::from_value(case["derived_per_gpu_load"].clone()).unwrap();
        for l in 0..2 {
            let loads: Vec<f64> = r.phy2log[l]
                .chunks(2)
                .map(|g| {
                    g.iter()
                        .map(|&e| w[l][e] as f64 / r.logcnt[l][e] as f64)
                        .sum()
                })
                .collect();
            assert_eq!(loads, want[l]);
        }
    }

    #[test]
    fn invalid_arguments_are_errors_not_panics() {
        let w = vec![vec![1.0f32; 8]];
        let e = |r, g, n, d| rebalance_experts(&w, r, g, n, d).unwrap_err();
        assert_eq!(
            e(10, 1, 1, 4),
            EplbError::ReplicasNotMultipleOfGpus {
                replicas: 10,
                gpus: 4
            }
        );
        assert_eq!(
            e(4, 1, 1, 4),
            EplbError::TooFewReplicas {
                replicas: 4,
                experts: 8
            }
        );
        assert_eq!(
            e(12, 1, 4, 6),
            EplbError::GpusNotMultipleOfNodes { gpus: 6, nodes: 4 }
        );
        assert_eq!(
            e(12, 3, 3, 6),
            EplbError::ExpertsNotDivisibleByGroups {
                experts: 8,
                groups: 3
            }
        );
        assert_eq!(
            e(0, 1, 1, 4),
            EplbError::Zero {
                name: "num_replicas"
            }
        );
        assert_eq!(e(8, 1, 0, 4), EplbError::Zero { name: "num_nodes" });
        assert_eq!(
            rebalance_experts(&[], 8, 1, 1, 4).unwrap_err(),
            EplbError::Empty
        );
        let ragged = vec![vec![1.0f32; 8], vec![1.0; 7]];
        assert!(matches!(
            rebalance_experts(&ragged, 8, 1, 1, 4),
            Err(EplbError::Ragged { layer: 1, .. })
        ));
        let nan = vec![vec![1.0, f32::NAN, 1.0, 1.0]];
        assert!(matches!(
            rebalance_experts(&nan, 4, 1, 1, 4),
            Err(EplbError::BadLoad {
                layer: 0,
                expert: 1,
                ..
            })
        ));
        let neg = vec![vec![1.0, 1.0, -1.0, 1.0]];
        assert!(rebalance_experts(&neg, 4, 1, 1, 4)
            .unwrap_err()
            .to_string()
            .contains("weight[0][2]"));
    }

    fn model(experts: u32) -> ModelShape {
        ModelShape {
            layers: 3,
            first_moe_layer: 1,
            experts,
            top_k: 2,
            hidden_size: 16,
            expert_intermediate_size: 8,
            dtype: Dtype::Bf16,
        }
    }

    #[test]
    fn eplb_plan_converts_to_layer_plans() {
        // Two MoE layers (model layers 1 and 2), 6 experts, 3 GPUs, one redundant slot per GPU.
        let counts: Vec<f64> = vec![
            25., 10., 10., 10., 5., 5., //
            1., 1., 1., 1., 1., 30.,
        ];
        let w = LoadWindow::new(vec![1, 2], 6, counts).unwrap();
        let topo = Topology::new(3, 1).unwrap();
        let plans = eplb_plan(&w, &model(6), topo, 1, None).unwrap();
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[0].layer, 1);
        assert_eq!(plans[1].layer, 2);
        for lp in &plans {
            assert_eq!(lp.slots.len(), 3);
            assert!(lp.slots.iter().all(|s| s.len() == 3));
            let reps = lp.replicas(6);
            for (e, r) in reps.iter().enumerate() {
                assert!(!r.is_empty(), "expert {e} has no replica");
                let sum: f64 = r.iter().map(|x| x.share).sum();
                assert!((sum - 1.0).abs() < 1e-9, "expert {e}: shares sum to {sum}");
            }
        }
        // Layer 1: 25 -> 12.5 -> 8.3 < 10, so expert 0 gets 3 replicas and expert 1 the third
        // redundant slot. Layer 2: 30/3 = 10 > 1, so the hot expert takes all 3 redundant slots.
        assert_eq!(plans[0].replicas(6)[0].len(), 3);
        assert_eq!(plans[0].replicas(6)[1].len(), 2);
        assert_eq!(plans[1].replicas(6)[5].len(), 4);
        // Shares are 1/3 rounded, the last replica takes the remainder.
        let shares: Vec<f64> = plans[0].replicas(6)[0].iter().map(|r| r.share).collect();
        assert_eq!(shares[..2], [0.333333, 0.333333]);
        assert_eq!(shares[2], round_share(1.0 - 0.666666));
    }

    #[test]
    fn eplb_plan_rejects_model_mismatch_and_pads_uneven_experts() {
        let w = LoadWindow::new(vec![0], 5, vec![1.0; 5]).unwrap();
        let err = eplb_plan(&w, &model(6), Topology::new(2, 1).unwrap(), 0, None).unwrap_err();
        assert_eq!(
            err,
            EplbError::Shape(ShapeError::Experts { load: 5, model: 6 })
        );
        assert!(err.to_string().contains("5 experts"), "{err}");
        // 5 experts on 2 GPUs: 3 slots per GPU, one of them redundant.
        let plans = eplb_plan(&w, &model(5), Topology::new(2, 1).unwrap(), 0, None).unwrap();
        assert_eq!(plans[0].physical_experts(), 6);
        // Groups that do not divide the experts are an error, not a panic.
        let err = eplb_plan(&w, &model(5), Topology::new(2, 1).unwrap(), 0, Some(2)).unwrap_err();
        assert!(
            matches!(err, EplbError::ExpertsNotDivisibleByGroups { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("num_groups"), "{err}");
    }

    #[test]
    fn hierarchical_keeps_groups_on_their_node() {
        // 16 experts in 4 groups on 2 nodes x 2 GPUs: every GPU's experts come from groups packed on
        // its node, so each node holds exactly 2 whole groups.
        let w: Vec<Vec<f32>> = vec![(0..16).map(|e| ((e * 37) % 11 + 1) as f32).collect()];
        let r = rebalance_experts(&w, 20, 4, 2, 4).unwrap();
        for node in 0..2 {
            let mut groups: Vec<usize> = r.phy2log[0][node * 10..(node + 1) * 10]
                .iter()
                .map(|e| e / 4)
                .collect();
            groups.sort();
            groups.dedup();
            assert_eq!(groups.len(), 2, "node {node} holds groups {groups:?}");
        }
        assert_eq!(r.logcnt[0].iter().sum::<usize>(), 20);
    }

    /// Upstream's `balanced_packing`, transcribed literally (linear scan), as an oracle for the heap.
    fn packing_oracle(weight: &[f32], num_packs: usize) -> (Vec<usize>, Vec<usize>) {
        let n = weight.len();
        let per_pack = n / num_packs;
        if per_pack == 1 {
            return ((0..n).collect(), vec![0; n]);
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| weight[b].partial_cmp(&weight[a]).unwrap());
        let (mut pw, mut pi) = (vec![0f32; num_packs], vec![0usize; num_packs]);
        let (mut idx, mut rank) = (vec![0; n], vec![0; n]);
        for item in order {
            let pack = (0..num_packs)
                .filter(|&p| pi[p] < per_pack)
                .min_by(|&a, &b| pw[a].partial_cmp(&pw[b]).unwrap())
                .unwrap();
            idx[item] = pack;
            rank[item] = pi[pack];
            pw[pack] += weight[item];
            pi[pack] += 1;
        }
        (idx, rank)
    }

    /// Upstream's `replicate_experts` (argmax per slot, first maximum wins), as an oracle.
    fn replicate_oracle(weight: &[f32], num_phy: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
        let mut p2l: Vec<usize> = (0..weight.len()).collect();
        let mut rank = vec![0; weight.len()];
        let mut cnt = vec![1usize; weight.len()];
        for _ in weight.len()..num_phy {
            let mut best = 0;
            for e in 1..weight.len() {
                if weight[e] / cnt[e] as f32 > weight[best] / cnt[best] as f32 {
                    best = e;
                }
            }
            p2l.push(best);
            rank.push(cnt[best]);
            cnt[best] += 1;
        }
        (p2l, rank, cnt)
    }

    proptest::proptest! {
        // Small integer loads make exact ties common, which is where the heaps could diverge.
        #[test]
        fn heaps_match_upstream_scans(
            w in proptest::collection::vec(0u32..6, 1..40),
            packs in 1usize..6,
            extra in 0usize..30,
        ) {
            let w: Vec<f32> = w.into_iter().map(|x| x as f32 * 0.5).collect();
            let mut s = Scratch::default();
            replicate_experts(&w, w.len() + extra, &mut s);
            let (p2l, rank, cnt) = replicate_oracle(&w, w.len() + extra);
            proptest::prop_assert_eq!(&s.phy2mlog, &p2l);
            proptest::prop_assert_eq!(&s.phyrank, &rank);
            proptest::prop_assert_eq!(&s.mlogcnt, &cnt);
            let n = w.len() / packs * packs;
            if n > 0 {
                balanced_packing(&w[..n], packs, &mut s);
                let (idx, r) = packing_oracle(&w[..n], packs);
                proptest::prop_assert_eq!(&s.pack_index, &idx);
                proptest::prop_assert_eq!(&s.rank_in_pack, &r);
            }
        }

        #[test]
        fn every_expert_gets_a_slot_and_slots_are_full(
            w in proptest::collection::vec(0u32..1000, 16..17),
            per_gpu in 4usize..7,
            hier in proptest::bool::ANY,
        ) {
            // 16 experts, 4 GPUs on 2 nodes, 4 groups (hierarchical) or 3 (global fallback).
            // 16 % 3 != 0 must not matter on the global path.
            let w = vec![w.into_iter().map(|x| x as f32).collect::<Vec<_>>()];
            let groups = if hier { 4 } else { 3 };
            let p = 4 * per_gpu;
            let r = rebalance_experts(&w, p, groups, 2, 4).unwrap();
            proptest::prop_assert_eq!(r.phy2log[0].len(), p);
            proptest::prop_assert_eq!(r.logcnt[0].iter().sum::<usize>(), p);
            for e in 0..16 {
                let n = r.phy2log[0].iter().filter(|&&x| x == e).count();
                proptest::prop_assert_eq!(n, r.logcnt[0][e]);
                proptest::prop_assert!(n >= 1);
                for (k, &ph) in r.log2phy[0][e].iter().enumerate() {
                    if k < n {
                        proptest::prop_assert_eq!(r.phy2log[0][ph as usize], e);
                    } else {
                        proptest::prop_assert_eq!(ph, -1);
                    }
                }
            }
        }
    }
}
