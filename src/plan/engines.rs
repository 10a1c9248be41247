//! Our plans in the expert layouts that serving engines read at start-up, and the rules their
//! loaders apply to them. Pure: plan in, layout and report out.
//!
//! Both engines describe a layer as a physical-to-logical map: physical expert (slot) `p` holds
//! logical expert `map[p]`, and EP rank `r` owns slots `r * S .. (r + 1) * S`. Both keep the same
//! number of physical experts in every MoE layer and on every GPU (`P = S * gpus =
//! experts + redundant`), and both split an expert's tokens evenly between its replicas (SGLang's
//! `static` dispatch prefers a replica on the token's own GPU). Our plans may hold a different number
//! of slots per layer and per GPU (CRAFT) and uneven shares, so a layout is the plan padded to the
//! largest slot count: [`Export`] says how many slots were added, what they cost and what the engine's
//! even split predicts.
//!
//! - SGLang (`--init-expert-location FILE.json`, sgl-project/sglang
//!   `python/sglang/srt/eplb/expert_location.py`): `{"physical_to_logical_map": [[..P..]; L]}` with
//!   one row per decoder layer (`num_hidden_layers`, dense layers included) and no other key (the
//!   loader passes the keys as arguments); `--ep-num-redundant-experts P - experts`.
//! - vLLM (`--eplb-config '{"initial_expert_map_path": FILE, "num_redundant_experts": P - experts}'`,
//!   vllm-project/vllm PR #49572): a JSON list of one row per MoE layer (or one row for all).
//!
//! Rules both loaders enforce, which [`check_layout`] applies: `P` divisible by the EP size, every
//! id in `0..experts`, every logical expert present at least once in every layer (SGLang fails in
//! its dispatch table otherwise, vLLM refuses the file), rows of equal length `P >= experts`.

use serde::Serialize;

use super::expert_plan::{ExpertPlan, LayerPlan};
use super::model::ModelShape;

/// A serving engine whose expert layout we write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Sglang,
    Vllm,
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "sglang" => Ok(Engine::Sglang),
            "vllm" => Ok(Engine::Vllm),
            other => Err(format!("engine {other:?}: expected sglang or vllm")),
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Sglang => "sglang",
            Engine::Vllm => "vllm",
        })
    }
}

/// The engine-shaped layout of a plan: for every MoE layer, `S` slots on each of `gpus` GPUs.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub experts: u32,
    pub gpus: u32,
    pub slots_per_gpu: u32,
    /// (model layer id, physical-to-logical map of `gpus * slots_per_gpu` entries).
    pub layers: Vec<(u32, Vec<u32>)>,
}

impl Layout {
    pub fn physical_experts(&self) -> u32 {
        self.gpus * self.slots_per_gpu
    }

    /// The `num_redundant_experts` / `--ep-num-redundant-experts` the engine must be started with.
    pub fn redundant_experts(&self) -> u32 {
        self.physical_experts() - self.experts
    }
}

/// What exporting a plan did.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Export {
    pub engine: Engine,
    pub slots_per_gpu: u32,
    pub physical_experts: u32,
    pub redundant_experts: u32,
    /// Slots the plan holds over all MoE layers, and the slots the layout adds to reach `S`
    /// everywhere (each a replica the engine keeps resident).
    pub plan_slots: u64,
    pub padded_slots: u64,
    /// Extra expert memory per GPU the padding costs, worst GPU.
    pub padded_bytes_per_gpu: u64,
    /// Replica memory per GPU of the layout (slots beyond `experts / gpus`, summed over layers),
    /// against the plan's `replicaBytesPerGpu`.
    pub layout_replica_bytes_per_gpu: u64,
    pub plan_replica_bytes_per_gpu: u64,
    /// The engine start-up flags the layout needs.
    pub flags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("layer {layer}: {what}")]
    Layer { layer: String, what: String },
    #[error("{0}")]
    Shape(String),
}

/// The per-expert weights that decide which expert a padding slot replicates: the plan's own
/// estimate of each expert's token share when given (per MoE layer, `experts` long), otherwise
/// each expert's share as the plan's replica shares imply it (all equal).
pub type ExpertWeights<'a> = Option<&'a dyn Fn(u32, u32) -> f64>;

/// The plan padded to the engine's shape. A padding slot on GPU `g` takes a replica of the expert
/// not yet on `g` whose load per replica (under the engine's even split) is highest, so padding
/// spends its memory where it lowers the hottest replicas' load.
pub fn layout(
    plan: &ExpertPlan,
    weight: ExpertWeights<'_>,
) -> Result<(Layout, Export), LayoutError> {
    let m = &plan.model;
    let (e, g) = (m.experts, plan.gpus);
    if g == 0 || e == 0 {
        return Err(LayoutError::Shape(
            "the plan has no GPUs or no experts".into(),
        ));
    }
    let planned = |layer: u32| plan.layers.iter().find(|l| l.layer == layer);
    let moe: Vec<u32> = (m.first_moe_layer..m.layers).collect();
    // Layers the plan leaves out get the contiguous placement the engines start from.
    let contiguous = |layer: u32| LayerPlan {
        layer,
        slots: (0..g)
            .map(|gpu| (0..e).filter(|x| (x * g / e) == gpu).collect())
            .collect(),
        shares: vec![],
    };
    let mut per_layer: Vec<(u32, Vec<Vec<u32>>)> = Vec::with_capacity(moe.len());
    for &l in &moe {
        let lp = planned(l).cloned().unwrap_or_else(|| contiguous(l));
        if lp.slots.len() != g as usize {
            return Err(LayoutError::Layer {
                layer: l.to_string(),
                what: format!(
                    "{} GPUs in the plan's layer, {g} in the plan",
                    lp.slots.len()
                ),
            });
        }
        per_layer.push((l, lp.slots));
    }
    let s = per_layer
        .iter()
        .flat_map(|(_, gs)| gs.iter().map(Vec::len))
        .max()
        .unwrap_or(0)
        .max(e.div_ceil(g) as usize) as u32;
    let plan_slots: u64 = per_layer
        .iter()
        .map(|(_, gs)| gs.iter().map(|v| v.len() as u64).sum::<u64>())
        .sum();
    let mut padded_per_gpu = vec![0u64; g as usize];
    let mut layers = Vec::with_capacity(per_layer.len());
    for (l, mut gs) in per_layer {
        let w = |x: u32| weight.map_or(1.0, |f| f(l, x)).max(0.0);
        let mut replicas = vec![0u32; e as usize];
        for gpu in &gs {
            for &x in gpu {
                if let Some(r) = replicas.get_mut(x as usize) {
                    *r += 1;
                }
            }
        }
        if let Some(x) = replicas.iter().position(|&r| r == 0) {
            return Err(LayoutError::Layer {
                layer: l.to_string(),
                what: format!("logical expert {x} has no slot"),
            });
        }
        for (gpu, slots) in gs.iter_mut().enumerate() {
            while (slots.len() as u32) < s {
                let pick = (0..e)
                    .filter(|x| !slots.contains(x))
                    .max_by(|&a, &b| {
                        let (pa, pb) = (
                            w(a) / f64::from(replicas[a as usize]),
                            w(b) / f64::from(replicas[b as usize]),
                        );
                        pa.total_cmp(&pb).then(b.cmp(&a))
                    })
                    // Every expert is already on this GPU: a second copy of the first one.
                    .unwrap_or(slots[0]);
                replicas[pick as usize] += 1;
                slots.push(pick);
                padded_per_gpu[gpu] += 1;
            }
        }
        layers.push((l, gs.into_iter().flatten().collect()));
    }
    let out = Layout {
        experts: e,
        gpus: g,
        slots_per_gpu: s,
        layers,
    };
    let bpe = plan.bytes_per_expert;
    let base = u64::from(e.div_ceil(g));
    let export = Export {
        engine: Engine::Sglang,
        slots_per_gpu: s,
        physical_experts: out.physical_experts(),
        redundant_experts: out.redundant_experts(),
        plan_slots,
        padded_slots: padded_per_gpu.iter().sum(),
        padded_bytes_per_gpu: padded_per_gpu.iter().max().copied().unwrap_or(0) * bpe,
        layout_replica_bytes_per_gpu: (u64::from(s) - base) * moe.len() as u64 * bpe,
        plan_replica_bytes_per_gpu: plan.replica_bytes_per_gpu,
        flags: vec![],
    };
    Ok((out, export))
}

/// The engine's file for a layout, and the start-up flags it needs.
pub fn engine_file(engine: Engine, m: &ModelShape, l: &Layout) -> (serde_json::Value, Vec<String>) {
    let rows: Vec<&Vec<u32>> = l.layers.iter().map(|(_, r)| r).collect();
    let p = l.physical_experts();
    match engine {
        Engine::Sglang => {
            // One row per decoder layer; dense layers get the trivial map SGLang itself writes.
            let all: Vec<Vec<u32>> = (0..m.layers)
                .map(|layer| match l.layers.iter().find(|(x, _)| *x == layer) {
                    Some((_, r)) => r.clone(),
                    None => (0..p).map(|i| i % l.experts).collect(),
                })
                .collect();
            (
                serde_json::json!({ "physical_to_logical_map": all }),
                vec![
                    "--init-expert-location <file>.json".into(),
                    format!("--ep-num-redundant-experts {}", l.redundant_experts()),
                    format!("--ep-size {}", l.gpus),
                ],
            )
        }
        Engine::Vllm => (
            serde_json::json!(rows),
            vec![
                "--enable-expert-parallel".into(),
                "--enable-eplb".into(),
                format!(
                    "--eplb-config '{{\"initial_expert_map_path\": \"<file>.json\", \"num_redundant_experts\": {}}}'",
                    l.redundant_experts()
                ),
            ],
        ),
    }
}

/// Reads an engine file back into a layout, applying the rules the engine's loader applies
/// (module docs), for `gpus` EP ranks of a model of `m`'s shape.
pub fn check_layout(
    engine: Engine,
    m: &ModelShape,
    gpus: u32,
    file: &serde_json::Value,
) -> Result<Layout, LayoutError> {
    let bad = |what: String| Err(LayoutError::Shape(what));
    let rows = match (engine, file) {
        (Engine::Sglang, serde_json::Value::Object(o)) => {
            if o.len() != 1 || !o.contains_key("physical_to_logical_map") {
                return bad(format!(
                    "SGLang reads exactly one key, physical_to_logical_map (its loader passes the keys as arguments); found {:?}",
                    o.keys().collect::<Vec<_>>()
                ));
            }
            &o["physical_to_logical_map"]
        }
        (Engine::Sglang, _) => return bad("SGLang's file is a JSON object".into()),
        (Engine::Vllm, v) => v,
    };
    let Some(rows) = rows.as_array() else {
        return bad("the map is not a JSON list".into());
    };
    let parse_row = |v: &serde_json::Value| -> Option<Vec<u32>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect()
    };
    let moe: Vec<u32> = (m.first_moe_layer..m.layers).collect();
    let rows: Vec<Vec<u32>> = match engine {
        Engine::Sglang => {
            if rows.len() != m.layers as usize {
                return bad(format!(
                    "{} rows: SGLang wants one per decoder layer ({})",
                    rows.len(),
                    m.layers
                ));
            }
            rows.iter()
                .map(parse_row)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| LayoutError::Shape("a row is not a list of ids".into()))?
                .into_iter()
                .skip(m.first_moe_layer as usize)
                .collect()
        }
        Engine::Vllm => {
            // One flat row stands for every MoE layer.
            if let Some(one) = parse_row(&serde_json::Value::Array(rows.clone())) {
                vec![one; moe.len()]
            } else {
                let r = rows
                    .iter()
                    .map(parse_row)
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| LayoutError::Shape("a row is not a list of ids".into()))?;
                if r.len() != moe.len() {
                    return bad(format!(
                        "{} rows: vLLM wants one per MoE layer ({}) or one for all",
                        r.len(),
                        moe.len()
                    ));
                }
                r
            }
        }
    };
    let p = rows.first().map_or(0, Vec::len);
    if p < m.experts as usize {
        return bad(format!(
            "{p} physical experts, fewer than the model's {} logical ones",
            m.experts
        ));
    }
    if gpus == 0 || !p.is_multiple_of(gpus as usize) {
        return bad(format!(
            "{p} physical experts do not split evenly over {gpus} EP ranks"
        ));
    }
    let mut layers = Vec::with_capacity(rows.len());
    for (&l, row) in moe.iter().zip(rows) {
        let layer = || l.to_string();
        if row.len() != p {
            return Err(LayoutError::Layer {
                layer: layer(),
                what: format!("{} physical experts, the first row has {p}", row.len()),
            });
        }
        let mut seen = vec![false; m.experts as usize];
        for &x in &row {
            match seen.get_mut(x as usize) {
                Some(s) => *s = true,
                None => {
                    return Err(LayoutError::Layer {
                        layer: layer(),
                        what: format!("logical id {x} is not below {}", m.experts),
                    })
                }
            }
        }
        if let Some(x) = seen.iter().position(|s| !s) {
            return Err(LayoutError::Layer {
                layer: layer(),
                what: format!("logical expert {x} has no physical expert"),
            });
        }
        layers.push((l, row));
    }
    Ok(Layout {
        experts: m.experts,
        gpus,
        slots_per_gpu: (p / gpus as usize) as u32,
        layers,
    })
}

/// A layout as a plan with the engine's even split, for our evaluator: what the engine will see.
pub fn as_plan(like: &ExpertPlan, l: &Layout) -> ExpertPlan {
    let s = l.slots_per_gpu as usize;
    let layers = l
        .layers
        .iter()
        .map(|(layer, row)| {
            let mut count = vec![0u32; l.experts as usize];
            for &x in row {
                count[x as usize] += 1;
            }
            let slots: Vec<Vec<u32>> = row.chunks(s).map(<[u32]>::to_vec).collect();
            let shares = slots
                .iter()
                .map(|g| {
                    g.iter()
                        .map(|&x| 1.0 / f64::from(count[x as usize]))
                        .collect()
                })
                .collect();
            LayerPlan {
                layer: *layer,
                slots,
                shares,
            }
        })
        .collect();
    let base = l.experts.div_ceil(l.gpus);
    let replicas = (l.slots_per_gpu - base) * l.layers.len() as u32;
    ExpertPlan {
        replicas_per_gpu: replicas,
        replica_bytes_per_gpu: u64::from(replicas) * like.bytes_per_expert,
        layers,
        stats: None,
        transition: None,
        hash: String::new(),
        ..like.clone()
    }
    .seal()
}

/// [`layout`] and [`engine_file`] together, the report filled in.
pub fn export(
    engine: Engine,
    plan: &ExpertPlan,
    weight: ExpertWeights<'_>,
) -> Result<(serde_json::Value, Export), LayoutError> {
    let (l, mut report) = layout(plan, weight)?;
    let (file, flags) = engine_file(engine, &plan.model, &l);
    report.engine = engine;
    report.flags = flags;
    Ok((file, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::balance::evaluate;
    use crate::plan::craft::CraftOptions;
    use crate::plan::expert_plan::{Algorithm, PLAN_FORMAT_VERSION};
    use crate::plan::planner::{make_plan, Budget, PlanRequest};
    use crate::plan::{Dtype, LoadWindow, Topology};

    fn model(layers: u32, first: u32, experts: u32) -> ModelShape {
        ModelShape {
            layers,
            first_moe_layer: first,
            experts,
            top_k: 2,
            hidden_size: 64,
            expert_intermediate_size: 32,
            dtype: Dtype::Bf16,
        }
    }

    /// Two MoE layers (1 and 2) of 4 experts on 2 GPUs; layer 1 replicates expert 0.
    fn small_plan() -> ExpertPlan {
        let m = model(3, 1, 4);
        ExpertPlan {
            format_version: PLAN_FORMAT_VERSION,
            algorithm: Algorithm::Craft,
            gpus: 2,
            nodes: 1,
            replicas_per_gpu: 1,
            bytes_per_expert: m.bytes_per_expert(),
            replica_bytes_per_gpu: m.bytes_per_expert(),
            model: m,
            layers: vec![
                LayerPlan {
                    layer: 1,
                    slots: vec![vec![0, 1, 0], vec![2, 3]],
                    shares: vec![vec![0.5, 1.0, 0.5], vec![1.0, 1.0]],
                },
                LayerPlan {
                    layer: 2,
                    slots: vec![vec![0, 1], vec![2, 3]],
                    shares: vec![vec![1.0, 1.0], vec![1.0, 1.0]],
                },
            ],
            stats: None,
            transition: None,
            hash: String::new(),
        }
        .seal()
    }

    #[test]
    fn golden_layouts_for_a_fixed_plan() {
        let p = small_plan();
        let (sg, r) = export(Engine::Sglang, &p, None).unwrap();
        // Padding takes the expert with the most load per replica not yet on the GPU (all
        // weights equal here; ties to the lower id).
        assert_eq!(
            sg,
            serde_json::json!({"physical_to_logical_map": [
                [0, 1, 2, 3, 0, 1],
                [0, 1, 0, 2, 3, 1],
                [0, 1, 2, 2, 3, 0],
            ]})
        );
        let (vl, _) = export(Engine::Vllm, &p, None).unwrap();
        assert_eq!(
            vl,
            serde_json::json!([[0, 1, 0, 2, 3, 1], [0, 1, 2, 2, 3, 0]])
        );
        assert_eq!(
            (r.slots_per_gpu, r.physical_experts, r.redundant_experts),
            (3, 6, 2)
        );
        assert_eq!((r.plan_slots, r.padded_slots), (9, 3));
        assert_eq!(r.padded_bytes_per_gpu, 2 * p.bytes_per_expert);
        assert_eq!(r.layout_replica_bytes_per_gpu, 2 * p.bytes_per_expert);
        assert!(r
            .flags
            .contains(&"--ep-num-redundant-experts 2".to_string()));
    }

    #[test]
    fn padding_follows_the_load() {
        let p = small_plan();
        // Expert 3 is hot in layer 2: the GPU without it takes a replica of it.
        let w = |layer: u32, e: u32| if layer == 2 && e == 3 { 10.0 } else { 1.0 };
        let (l, _) = layout(&p, Some(&w)).unwrap();
        assert_eq!(l.layers[1].1[..3], [0, 1, 3]);
    }

    #[test]
    fn what_we_write_the_loader_rules_accept_and_read_back() {
        let p = small_plan();
        for engine in [Engine::Sglang, Engine::Vllm] {
            let (l, _) = layout(&p, None).unwrap();
            let (file, _) = engine_file(engine, &p.model, &l);
            assert_eq!(
                check_layout(engine, &p.model, 2, &file).unwrap(),
                l,
                "{engine}"
            );
        }
        // vLLM's one row for every MoE layer.
        let one = serde_json::json!([0, 1, 2, 3]);
        let l = check_layout(Engine::Vllm, &p.model, 2, &one).unwrap();
        assert_eq!(l.layers.len(), 2);
        assert_eq!(l.slots_per_gpu, 2);
    }

    #[test]
    fn the_checker_names_what_each_loader_refuses() {
        let m = model(3, 1, 4);
        let err = |engine, v: serde_json::Value, gpus| {
            check_layout(engine, &m, gpus, &v).unwrap_err().to_string()
        };
        let sg = |rows: serde_json::Value| serde_json::json!({ "physical_to_logical_map": rows });
        let ok_rows = serde_json::json!([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]);
        let mut extra = sg(ok_rows.clone());
        extra["comment"] = "x".into();
        assert!(err(Engine::Sglang, extra, 2).contains("exactly one key"));
        assert!(
            err(Engine::Sglang, sg(serde_json::json!([[0, 1, 2, 3]])), 2)
                .contains("one per decoder layer (3)")
        );
        assert!(err(Engine::Sglang, sg(ok_rows.clone()), 3).contains("do not split evenly"));
        assert!(err(
            Engine::Vllm,
            serde_json::json!([[0, 1, 2, 3], [0, 1, 2, 4]]),
            2
        )
        .contains("layer 2: logical id 4 is not below 4"));
        assert!(err(
            Engine::Vllm,
            serde_json::json!([[0, 1, 2, 3], [0, 1, 2, 2]]),
            2
        )
        .contains("layer 2: logical expert 3 has no physical expert"));
        assert!(err(Engine::Vllm, serde_json::json!([0, 1, 2]), 1).contains("fewer than"));
        assert!(err(
            Engine::Vllm,
            serde_json::json!([[0, 1, 2, 3], [0, 1, 2, 3, 0, 1]]),
            2
        )
        .contains("layer 2: 6 physical experts, the first row has 4"));
        assert!(
            err(Engine::Vllm, serde_json::json!([[0, -1, 2, 3]]), 2).contains("not a list of ids")
        );
    }

    fn skewed_window() -> LoadWindow {
        // 4 MoE layers (2..6) of 16 experts, 8 batches, a different hot set per layer.
        let (layers, experts, batches) = (4usize, 16usize, 8usize);
        let counts: Vec<f64> = (0..batches * layers * experts)
            .map(|i| {
                let e = i % experts;
                let l = (i / experts) % layers;
                let b = i / (experts * layers);
                1.0 + 200.0 / (1.0 + ((e * 7 + l * 3 + b) % experts) as f64)
            })
            .collect();
        LoadWindow::new((2..6).collect(), experts, counts).unwrap()
    }

    fn planned(algorithm: Algorithm, replicas: u32, w: &LoadWindow) -> ExpertPlan {
        let req = PlanRequest {
            algorithm,
            model: model(6, 2, 16),
            topology: Topology::new(4, 1).unwrap(),
            budget: Budget::ReplicasPerGpu(replicas),
            eplb_groups: None,
            craft: CraftOptions::default(),
        };
        make_plan(&req, w, None).unwrap()
    }

    #[test]
    fn an_eplb_plan_fits_the_engines_as_it_is_and_evaluates_the_same() {
        let w = skewed_window();
        // One redundant expert per GPU in each of the 4 layers.
        let plan = planned(Algorithm::Eplb, 4, &w);
        for engine in [Engine::Sglang, Engine::Vllm] {
            let (file, r) = export(engine, &plan, None).unwrap();
            assert_eq!(r.padded_slots, 0, "{engine}");
            assert_eq!((r.slots_per_gpu, r.redundant_experts), (5, 4));
            let l = check_layout(engine, &plan.model, plan.gpus, &file).unwrap();
            let even = as_plan(&plan, &l);
            even.check().unwrap();
            let (a, b) = (evaluate(&plan, &w).unwrap(), evaluate(&even, &w).unwrap());
            assert!(
                (a.balancedness - b.balancedness).abs() < 1e-9,
                "{a:?} {b:?}"
            );
        }
    }

    #[test]
    fn a_craft_plan_is_padded_to_its_fullest_gpu_and_says_so() {
        let w = skewed_window();
        let plan = planned(Algorithm::Craft, 3, &w);
        let totals: Vec<Vec<f64>> = (0..4).map(|i| w.layer_totals(i)).collect();
        let weight = |layer: u32, e: u32| totals[(layer - 2) as usize][e as usize];
        for engine in [Engine::Sglang, Engine::Vllm] {
            let (file, r) = export(engine, &plan, Some(&weight)).unwrap();
            let l = check_layout(engine, &plan.model, plan.gpus, &file).unwrap();
            let fullest = plan
                .layers
                .iter()
                .flat_map(|lp| lp.slots.iter().map(Vec::len))
                .max();
            assert_eq!(Some(l.slots_per_gpu as usize), fullest);
            let total = u64::from(l.physical_experts()) * l.layers.len() as u64;
            assert_eq!(r.plan_slots + r.padded_slots, total);
            // Every slot of the plan is still there, on its GPU.
            for (lp, (_, row)) in plan.layers.iter().zip(&l.layers) {
                for (g, slots) in lp.slots.iter().enumerate() {
                    let s = l.slots_per_gpu as usize;
                    assert_eq!(&row[g * s..g * s + slots.len()], &slots[..]);
                }
            }
            let b = evaluate(&as_plan(&plan, &l), &w).unwrap().balancedness;
            assert!(b > 0.0 && b <= 1.0, "{b}");
        }
    }
}
