//! Fixtures of the data plane's tests: small CRAFT plans over synthetic load.

use rand::{Rng, SeedableRng};

use crate::plan::load_formats::synthetic_window;
use crate::plan::planner::{make_plan, Budget, PlanRequest};
use crate::plan::{Algorithm, Dtype, ExpertPlan, ModelShape, Topology};

pub fn shape(layers: u32, experts: u32, top_k: u32, hidden: u64, inter: u64) -> ModelShape {
    ModelShape {
        layers,
        first_moe_layer: 0,
        experts,
        top_k,
        hidden_size: hidden,
        expert_intermediate_size: inter,
        dtype: Dtype::Bf16,
    }
}

/// A CRAFT plan of `layers` MoE layers of `experts` experts on `gpus` GPUs (one node) with
/// `replicas` extra slots per GPU, from skewed synthetic load drawn with `seed`.
pub fn plan(layers: u32, experts: u32, gpus: u32, top_k: u32, replicas: u32) -> ExpertPlan {
    plan_seeded(shape(layers, experts, top_k, 16, 8), gpus, replicas, 3)
}

pub fn plan_seeded(model: ModelShape, gpus: u32, replicas: u32, seed: u64) -> ExpertPlan {
    let window = synthetic_window(
        model.layers as usize,
        model.experts as usize,
        3,
        512,
        model.top_k as usize,
        0.6,
        0.2,
        seed,
    )
    .expect("window");
    make_plan(
        &PlanRequest {
            algorithm: Algorithm::Craft,
            model,
            topology: Topology::new(gpus as usize, 1).expect("topology"),
            budget: Budget::ReplicasPerGpu(replicas),
            eplb_groups: None,
            craft: Default::default(),
        },
        &window,
        None,
    )
    .expect("plan")
}

/// One rank's tokens for one step: hidden rows, top-k ids (distinct per token) and weights.
pub struct Tokens {
    pub x: Vec<u16>,
    pub ids: Vec<i64>,
    pub w: Vec<f32>,
    pub n: usize,
}

pub fn tokens(seed: u64, n: usize, m: &ModelShape) -> Tokens {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (h, k, e) = (m.hidden_size as usize, m.top_k as usize, m.experts as usize);
    let x = (0..n * h)
        .map(|_| half::bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_bits())
        .collect();
    let mut ids = Vec::new();
    let mut w = Vec::new();
    for _ in 0..n {
        let mut picked: Vec<i64> = Vec::new();
        while picked.len() < k {
            let c = rng.random_range(0..e as i64);
            if !picked.contains(&c) {
                picked.push(c);
            }
        }
        ids.extend(picked);
        w.extend((0..k).map(|_| rng.random_range(0.05f32..1.0)));
    }
    Tokens { x, ids, w, n }
}
