//! Peak memory of a CRAFT plan on the Kimi-K2 shape (60 MoE layers x 384 experts, 64 GPUs on 8
//! nodes, 300 batches of 32,768 tokens): run under `/usr/bin/time -v` and read "Maximum resident
//! set size". The window itself (60 x 384 x 300 counts) is part of the figure.

use moe_operator::plan::craft::CraftOptions;
use moe_operator::plan::load_formats::synthetic_window;
use moe_operator::plan::planner::{make_plan, Budget, PlanRequest};
use moe_operator::plan::{Algorithm, Dtype, ModelShape, Topology};

fn main() {
    let w = synthetic_window(60, 384, 300, 32_768, 8, 0.3, 0.3, 1).expect("window");
    let model = ModelShape {
        layers: 60,
        first_moe_layer: 0,
        experts: 384,
        top_k: 8,
        hidden_size: 7168,
        expert_intermediate_size: 2048,
        dtype: Dtype::Fp8,
    };
    let req = PlanRequest {
        algorithm: Algorithm::Craft,
        model,
        topology: Topology::new(64, 8).expect("topology"),
        budget: Budget::ReplicasPerGpu(8),
        eplb_groups: None,
        craft: CraftOptions::default(),
    };
    let t = std::time::Instant::now();
    let plan = make_plan(&req, &w, None).expect("plan");
    println!(
        "kimi-k2 shape: craft R={} planned in {:.0} ms, balancedness {:.4}",
        plan.replicas_per_gpu,
        t.elapsed().as_secs_f64() * 1e3,
        plan.stats.as_ref().map_or(0.0, |s| s.balancedness)
    );
}
