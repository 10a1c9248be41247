//! Fixtures of the data plane's tests: small CRAFT plans over synthetic load.

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
