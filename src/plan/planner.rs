//! The planner's front door: a request (algorithm, model, topology, budget) and a load window in,
//! a sealed [`ExpertPlan`] out. Deterministic: the same input gives the same plan, byte for byte.

use super::balance::{evaluate_layers, LayerMatrix};
use super::craft::{self, CraftOptions, Placement};
use super::eplb::EplbError;
use super::expert_plan::{
    round_share, Algorithm, ExpertPlan, GpuTransition, InvariantError, LayerBalance, LayerPlan,
    PlanStats, Transition, PLAN_FORMAT_VERSION,
};
use super::limits::{
    checked_cells, LimitError, MAX_EXPERTS, MAX_EXPERT_INTERMEDIATE_SIZE, MAX_GPUS,
    MAX_GPUS_PER_NODE, MAX_HIDDEN_SIZE, MAX_LAYERS, MAX_LOAD_CELLS_FILE, MAX_NODES,
    MAX_REPLICAS_PER_GPU, MAX_TOP_K,
};
use super::load::LoadWindow;
use super::model::{ModelShape, ShapeError, Topology};
use super::reference::ReferenceError;

/// How much memory each GPU may spend on replicas.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// R: extra expert slots per GPU, summed over layers.
    ReplicasPerGpu(u32),
    /// Bytes per GPU; R is the number of whole experts that fit.
    MemoryPerGpu(u64),
    /// The knee of predicted balancedness against R: the largest R before the marginal gain of one
    /// more slot per GPU falls below `min_gain_per_replica`.
    Auto { min_gain_per_replica: f64 },
}

/// Marginal balancedness one more slot per GPU must buy for `Budget::Auto` to take it.
pub const DEFAULT_AUTO_MIN_GAIN: f64 = 0.002;
/// The largest R an auto budget considers.
pub const AUTO_MAX_REPLICAS_PER_GPU: usize = 64;

#[derive(Clone, Debug)]
pub struct PlanRequest {
    pub algorithm: Algorithm,
    pub model: ModelShape,
    pub topology: Topology,
    pub budget: Budget,
    /// Expert groups for EPLB's hierarchical policy (None: one group, the global policy).
    pub eplb_groups: Option<usize>,
    pub craft: CraftOptions,
}

/// Why [`make_plan`] made no plan. The four kinds are the metric labels of [`PlanError::reason`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    /// The model's shape cannot be planned, or the load does not fit it.
    #[error("load does not fit the model: {0}")]
    Load(#[from] ShapeError),
    #[error("budget: {0}")]
    Budget(#[from] BudgetError),
    #[error("{0}")]
    Algorithm(#[from] AlgorithmError),
    /// A shape or budget past `plan::limits`: refused before anything is sized by it.
    #[error("{0}")]
    Limit(#[from] LimitError),
}

/// A budget the request's algorithm cannot spend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "EPLB replicates every layer alike, so replicas per GPU ({replicas}) must be a multiple of \
         the {layers} MoE layers (one redundant expert per GPU per layer is {layers})"
    )]
    EplbNotPerLayer { replicas: usize, layers: usize },
    #[error(
        "a memory budget needs the model's hidden and expert intermediate sizes (--model or the \
         shape flags)"
    )]
    MemoryWithoutSizes,
    #[error(
        "an auto budget is only supported by the craft algorithm; give replicas or memory per GPU"
    )]
    AutoNeedsCraft,
    #[error("no allocation places exactly {replicas} replicas")]
    NoAllocation { replicas: usize },
}

/// The algorithm could not place the experts, or placed them wrongly (`internal`).
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum AlgorithmError {
    #[error("policy none needs at least as many experts ({experts}) as GPUs ({gpus})")]
    NoneNeedsExperts { experts: usize, gpus: usize },
    #[error(transparent)]
    Eplb(#[from] EplbError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// A bug: the plan made breaks an invariant of [`ExpertPlan::check`].
    #[error("internal: the plan breaks an invariant: {0}")]
    Invariant(InvariantError),
    /// A bug: the plan's predicted figures are not finite ([`ExpertPlan::check_stats`]).
    #[error("internal: the plan's figures: {0}")]
    Stats(InvariantError),
}

impl PlanError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PlanError::Load(_) => "load",
            PlanError::Budget(_) => "budget",
            PlanError::Algorithm(_) => "algorithm",
            PlanError::Limit(_) => "limit",
        }
    }
}

/// Refuse a request whose model, topology or window is past `plan::limits`, before anything is
/// sized by it (the MoE layer ids, the window over them, the per-GPU tables).
pub fn check_request_limits(req: &PlanRequest, window: &LoadWindow) -> Result<(), PlanError> {
    let m = &req.model;
    let t = req.topology;
    let over = LimitError::over;
    let checks = [
        over(
            "model layers",
            m.layers.into(),
            MAX_LAYERS.into(),
            "MAX_LAYERS",
        ),
        over(
            "experts per layer",
            m.experts.into(),
            MAX_EXPERTS.into(),
            "MAX_EXPERTS",
        ),
        over("top-k", m.top_k.into(), MAX_TOP_K.into(), "MAX_TOP_K"),
        over(
            "hidden size",
            m.hidden_size,
            MAX_HIDDEN_SIZE,
            "MAX_HIDDEN_SIZE",
        ),
        over(
            "expert intermediate size",
            m.expert_intermediate_size,
            MAX_EXPERT_INTERMEDIATE_SIZE,
            "MAX_EXPERT_INTERMEDIATE_SIZE",
        ),
        over("GPUs", t.gpus as u64, MAX_GPUS.into(), "MAX_GPUS"),
        over("nodes", t.nodes as u64, MAX_NODES.into(), "MAX_NODES"),
        over(
            "GPUs per node",
            (t.gpus / t.nodes.max(1)) as u64,
            MAX_GPUS_PER_NODE.into(),
            "MAX_GPUS_PER_NODE",
        ),
    ];
    if let Some(e) = checks.into_iter().flatten().next() {
        return Err(e.into());
    }
    if let Budget::ReplicasPerGpu(r) = req.budget {
        if let Some(e) = over(
            "replicas per GPU",
            r.into(),
            MAX_REPLICAS_PER_GPU.into(),
            "MAX_REPLICAS_PER_GPU",
        ) {
            return Err(e.into());
        }
    }
    // The window is widened to every MoE layer of the model before planning.
    let cells = [
        window.batches(),
        m.moe_layers() as usize,
        m.experts as usize,
    ];
    if checked_cells(&cells, MAX_LOAD_CELLS_FILE).is_none() {
        return Err(LimitError::Cells {
            batches: cells[0],
            layers: cells[1],
            experts: cells[2],
            limit: MAX_LOAD_CELLS_FILE,
        }
        .into());
    }
    Ok(())
}

/// MoE layer ids of a model.
pub fn moe_layer_ids(model: &ModelShape) -> Vec<u32> {
    (model.first_moe_layer..model.layers).collect()
}

/// Make a plan. `previous`, when given, keeps every replica that stays on its GPU in its slot and
/// records what each GPU must load.
pub fn make_plan(
    req: &PlanRequest,
    window: &LoadWindow,
    previous: Option<&ExpertPlan>,
) -> Result<ExpertPlan, PlanError> {
    check_request_limits(req, window)?;
    let model = &req.model;
    let topo = req.topology;
    let e = model.experts as usize;
    if window.experts() != e {
        return Err(ShapeError::Experts {
            load: window.experts(),
            model: model.experts,
        }
        .into());
    }
    if model.top_k == 0 || model.top_k > model.experts {
        return Err(ShapeError::TopK {
            top_k: model.top_k,
            experts: model.experts,
        }
        .into());
    }
    let ids = moe_layer_ids(model);
    if ids.is_empty() {
        return Err(ShapeError::NoMoeLayer {
            first_moe_layer: model.first_moe_layer,
            layers: model.layers,
        }
        .into());
    }
    // Plan every MoE layer; layers the load lacks count as idle. No copy when the load already
    // covers exactly the model's MoE layers.
    let full = if window.layer_ids() == ids.as_slice() {
        std::borrow::Cow::Borrowed(window)
    } else {
        std::borrow::Cow::Owned(window.with_layers(&ids)?)
    };
    let layer_index: Vec<usize> = (0..full.layers()).collect();
    let mats = craft::parallel_map(&layer_index, |&l| LayerMatrix::from_window(&full, l));
    let bytes = model.bytes_per_expert();
    let layers = ids.len();

    let (placements, r): (Vec<Placement>, usize) = match req.algorithm {
        Algorithm::None => {
            if e < topo.gpus {
                return Err(AlgorithmError::NoneNeedsExperts {
                    experts: e,
                    gpus: topo.gpus,
                }
                .into());
            }
            let caps = craft::capacities(&vec![e; layers], topo.gpus);
            (caps.iter().map(|c| craft::contiguous(e, c)).collect(), 0)
        }
        Algorithm::Placement => {
            let caps = craft::capacities(&vec![e; layers], topo.gpus);
            let ones = vec![1u32; e];
            let ps = mats
                .iter()
                .zip(&caps)
                .map(|(m, c)| craft::place(&m.totals, &ones, c, topo, &req.craft))
                .collect();
            (ps, 0)
        }
        Algorithm::Eplb => {
            let r = replicas_per_gpu(req.budget, bytes)?;
            if r % layers != 0 {
                return Err(BudgetError::EplbNotPerLayer {
                    replicas: r,
                    layers,
                }
                .into());
            }
            let lps = super::eplb::eplb_plan(&full, model, topo, r / layers, req.eplb_groups)
                .map_err(AlgorithmError::from)?;
            return finish(req, window, &mats, previous, lps, r);
        }
        Algorithm::CraftReference => {
            let r = replicas_per_gpu(req.budget, bytes)?;
            let lps = super::reference::reference_plan(&full, model, topo, r)
                .map_err(AlgorithmError::from)?;
            let r = lps
                .iter()
                .map(|lp| lp.physical_experts() - e)
                .sum::<usize>()
                / topo.gpus;
            return finish(req, window, &mats, previous, lps, r);
        }
        Algorithm::Craft => craft_plan(req, &mats, bytes)?,
    };
    let lps = ids
        .iter()
        .zip(placements)
        .map(|(&layer, p)| layer_plan(layer, p, e))
        .collect();
    finish(req, window, &mats, previous, lps, r)
}

/// R for an explicit budget.
fn replicas_per_gpu(budget: Budget, bytes_per_expert: u64) -> Result<usize, PlanError> {
    match budget {
        Budget::ReplicasPerGpu(r) => Ok(r as usize),
        Budget::MemoryPerGpu(b) => {
            if bytes_per_expert == 0 {
                return Err(BudgetError::MemoryWithoutSizes.into());
            }
            let r = b / bytes_per_expert;
            if r > MAX_REPLICAS_PER_GPU.into() {
                return Err(LimitError::MemoryBudget {
                    bytes: b,
                    replicas: r,
                    bytes_per_expert,
                    limit: MAX_REPLICAS_PER_GPU,
                }
                .into());
            }
            Ok(r as usize)
        }
        Budget::Auto { .. } => Err(BudgetError::AutoNeedsCraft.into()),
    }
}

fn craft_plan(
    req: &PlanRequest,
    mats: &[LayerMatrix],
    bytes: u64,
) -> Result<(Vec<Placement>, usize), PlanError> {
    let topo = req.topology;
    let e = req.model.experts as usize;
    let d = topo.gpus;
    // One layer can usefully hold every expert on every GPU at most.
    let per_layer_cap = e * (d - 1);
    let r_max = match req.budget {
        Budget::Auto { .. } => AUTO_MAX_REPLICAS_PER_GPU,
        b => replicas_per_gpu(b, bytes)?,
    };
    // Candidate counts per layer: at least D, and four times the average share of the budget so
    // that a model with few layers can put most of it where it pays.
    let total = r_max * d;
    let default_max = d.max(4 * total.div_ceil(mats.len().max(1)));
    let kmax = req
        .craft
        .max_extra_per_layer
        .unwrap_or(default_max)
        .min(per_layer_cap)
        .min(total);
    let candidates = craft::candidate_set(kmax);
    let table = craft::benefit_table(mats, &candidates, topo, &req.craft);
    // The most the candidate set can place, rounded down to whole slots per GPU.
    let reachable = (kmax * mats.len()).min(r_max * d) / d;
    let alloc = craft::allocate(&table, &candidates, reachable * d);
    let r = match req.budget {
        Budget::Auto {
            min_gain_per_replica,
        } => {
            let per_layer = |r: usize| alloc.value(r * d).unwrap_or(f64::MIN) / mats.len() as f64;
            let mut best = 0;
            for r in 1..=reachable {
                if per_layer(r) - per_layer(r - 1) < min_gain_per_replica {
                    break;
                }
                best = r;
            }
            best
        }
        _ => reachable,
    };
    let extra = alloc
        .choose(r * d)
        .ok_or(BudgetError::NoAllocation { replicas: r * d })?;
    let physical: Vec<usize> = extra.iter().map(|k| e + k).collect();
    let caps = craft::capacities(&physical, d);
    Ok((
        craft::craft_layers(mats, &extra, &caps, topo, &req.craft),
        r,
    ))
}

/// A placement as a plan layer, shares rounded so the JSON is stable and summing to one exactly
/// where rounding would leave a residue.
pub fn layer_plan(layer: u32, p: Placement, experts: usize) -> LayerPlan {
    let mut shares: Vec<Vec<f64>> = p
        .shares
        .iter()
        .map(|s| s.iter().map(|&x| round_share(x as f64)).collect())
        .collect();
    let mut sum = vec![0.0; experts];
    let mut last = vec![None; experts];
    for (g, slots) in p.slots.iter().enumerate() {
        for (i, &x) in slots.iter().enumerate() {
            sum[x as usize] += shares[g][i];
            if shares[g][i] > 0.0 || last[x as usize].is_none() {
                last[x as usize] = Some((g, i));
            }
        }
    }
    for x in 0..experts {
        if let Some((g, i)) = last[x] {
            shares[g][i] = round_share((shares[g][i] + 1.0 - sum[x]).clamp(0.0, 1.0));
        }
    }
    LayerPlan {
        layer,
        slots: p.slots,
        shares,
    }
}

fn finish(
    req: &PlanRequest,
    window: &LoadWindow,
    mats: &[LayerMatrix],
    previous: Option<&ExpertPlan>,
    mut layers: Vec<LayerPlan>,
    r: usize,
) -> Result<ExpertPlan, PlanError> {
    let bytes = req.model.bytes_per_expert();
    let transition = previous.map(|prev| keep_slots(prev, &mut layers, bytes, req.topology.gpus));
    let mut plan = ExpertPlan {
        format_version: PLAN_FORMAT_VERSION,
        algorithm: req.algorithm,
        model: req.model.clone(),
        gpus: req.topology.gpus as u32,
        nodes: req.topology.nodes as u32,
        replicas_per_gpu: r as u32,
        bytes_per_expert: bytes,
        replica_bytes_per_gpu: r as u64 * bytes,
        layers,
        stats: None,
        transition,
        hash: String::new(),
    };
    plan.check().map_err(AlgorithmError::Invariant)?;
    // Judge the plan on the layers the load has (the matrices are already built).
    let have: Vec<usize> = (0..plan.layers.len())
        .filter(|&l| window.layer_ids().contains(&plan.layers[l].layer))
        .collect();
    let ev = evaluate_layers(
        &plan,
        have.iter().map(|&l| (&plan.layers[l], &mats[l])),
        window.batches(),
    );
    plan.stats = Some(PlanStats {
        balancedness: ev.balancedness,
        balancedness_vllm: ev.balancedness_vllm,
        window_batches: window.batches() as u64,
        window_tokens: window.total_tokens(),
        per_layer: ev
            .layers
            .iter()
            .map(|l| LayerBalance {
                layer: l.layer,
                balancedness: l.balancedness,
            })
            .collect(),
    });
    // serde_json writes a NaN or an infinity as null, which no reader takes back: never write one.
    plan.check_stats().map_err(AlgorithmError::Stats)?;
    Ok(plan.seal())
}

/// Reorder each GPU's slots so that experts it already held keep their slot index, and count what
/// each GPU must load (experts it did not hold in that layer).
fn keep_slots(prev: &ExpertPlan, layers: &mut [LayerPlan], bytes: u64, gpus: usize) -> Transition {
    let mut per_gpu = vec![
        GpuTransition {
            experts_to_load: 0,
            bytes_to_load: 0
        };
        gpus
    ];
    for lp in layers.iter_mut() {
        let old = prev.layers.iter().find(|o| o.layer == lp.layer);
        for (g, moved) in per_gpu.iter_mut().enumerate() {
            let old_slots: &[u32] = old
                .and_then(|o| o.slots.get(g))
                .map_or(&[], |v| v.as_slice());
            let new_slots = std::mem::take(&mut lp.slots[g]);
            let new_shares = std::mem::take(&mut lp.shares[g]);
            let n = new_slots.len();
            let mut taken = vec![false; n];
            let mut out: Vec<Option<(u32, f64)>> = vec![None; n];
            // First pass: an expert that sat in slot i keeps slot i.
            for (i, &x) in old_slots.iter().enumerate().take(n) {
                if let Some(j) = (0..n).find(|&j| !taken[j] && new_slots[j] == x) {
                    taken[j] = true;
                    out[i] = Some((x, new_shares[j]));
                }
            }
            // The rest fill the free slots in order; those the GPU did not hold must be loaded.
            let mut free = (0..n)
                .filter(|&i| out[i].is_none())
                .collect::<Vec<_>>()
                .into_iter();
            let mut held: Vec<u32> = old_slots.to_vec();
            for j in (0..n).filter(|&j| !taken[j]) {
                let i = free.next().expect("as many free slots as untaken replicas");
                out[i] = Some((new_slots[j], new_shares[j]));
                if let Some(pos) = held.iter().position(|&x| x == new_slots[j]) {
                    // Held in another slot index: reused on the device, not loaded again.
                    held.swap_remove(pos);
                } else {
                    moved.experts_to_load += 1;
                    moved.bytes_to_load += bytes;
                }
            }
            let (s, sh): (Vec<u32>, Vec<f64>) = out
                .into_iter()
                .map(|o| o.expect("every slot filled"))
                .unzip();
            lp.slots[g] = s;
            lp.shares[g] = sh;
        }
    }
    Transition {
        previous_hash: prev.hash.clone(),
        per_gpu,
    }
}
