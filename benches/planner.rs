//! Planner speed on the shapes of issue "1 of 5": a DeepSeek-V3-shaped window (58 MoE layers x 256
//! experts, 64 GPUs on 8 nodes, 300 batches of 32,768 tokens, top-8) and a Kimi-K2 shape
//! (60 x 384, 64 GPUs). Results are recorded in benches/results/planner-speed.md.

use criterion::{criterion_group, criterion_main, Criterion};
use moe_operator::plan::craft::CraftOptions;
use moe_operator::plan::eplb::rebalance_experts;
use moe_operator::plan::load_formats::synthetic_window;
use moe_operator::plan::planner::{make_plan, Budget, PlanRequest};
use moe_operator::plan::{Algorithm, Dtype, LoadWindow, ModelShape, Topology};

fn shape(layers: u32, experts: u32) -> ModelShape {
    ModelShape {
        layers,
        first_moe_layer: 0,
        experts,
        top_k: 8,
        hidden_size: 7168,
        expert_intermediate_size: 2048,
        dtype: Dtype::Fp8,
    }
}

fn request(algorithm: Algorithm, model: &ModelShape, r: u32) -> PlanRequest {
    PlanRequest {
        algorithm,
        model: model.clone(),
        topology: Topology::new(64, 8).unwrap(),
        budget: Budget::ReplicasPerGpu(r),
        eplb_groups: None,
        craft: CraftOptions::default(),
    }
}

fn window(layers: usize, experts: usize) -> LoadWindow {
    synthetic_window(layers, experts, 300, 32_768, 8, 0.3, 0.3, 1).unwrap()
}

fn planner(c: &mut Criterion) {
    let ds = window(58, 256);
    let ds_model = shape(58, 256);
    let mut g = c.benchmark_group("deepseek-v3 58x256, 64 GPUs, 300 batches");
    g.sample_size(10);
    g.bench_function("craft R=8 (benefit table, DP, final placement)", |b| {
        b.iter(|| make_plan(&request(Algorithm::Craft, &ds_model, 8), &ds, None).unwrap())
    });
    g.bench_function(
        "eplb plan R=58 (one redundant expert per GPU per layer)",
        |b| b.iter(|| make_plan(&request(Algorithm::Eplb, &ds_model, 58), &ds, None).unwrap()),
    );
    // DeepSeek's function alone on the 58 x 256 aggregate -> 320 slots, as its Python was timed.
    let totals: Vec<Vec<f32>> = (0..58)
        .map(|l| ds.layer_totals(l).iter().map(|&x| x as f32).collect())
        .collect();
    g.bench_function("eplb rebalance_experts 58x256 -> 320 hierarchical", |b| {
        b.iter(|| rebalance_experts(&totals, 320, 8, 8, 64).unwrap())
    });
    g.bench_function("eplb rebalance_experts 58x256 -> 320 global", |b| {
        b.iter(|| rebalance_experts(&totals, 320, 1, 1, 64).unwrap())
    });
    g.finish();

    let kimi = window(60, 384);
    let kimi_model = shape(60, 384);
    let mut g = c.benchmark_group("kimi-k2 60x384, 64 GPUs, 300 batches");
    g.sample_size(10);
    g.bench_function("craft R=8", |b| {
        b.iter(|| make_plan(&request(Algorithm::Craft, &kimi_model, 8), &kimi, None).unwrap())
    });
    g.finish();
}

criterion_group!(benches, planner);
criterion_main!(benches);
