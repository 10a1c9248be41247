//! What per-batch replica dispatch (`plan::dispatch`) costs where it runs (the router, on the
//! CPU, once per batch and MoE layer), next to the layer step it schedules (the cost model's
//! prediction for the same batch): Qwen3-30B-A3B's expert shape (128 experts, H 2048, I 768) on
//! 8 GPUs, 16 extra replicas in the layer (two per GPU), a decode batch (256 tokens, top-8) and a
//! prefill chunk (16384 tokens).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use moe_operator::plan::dispatch::dispatch;
use moe_operator::plan::step_cost::CostModel;
use moe_operator::plan::{Dtype, ModelShape};

const EXPERTS: usize = 128;
const GPUS: usize = 8;
const EXTRA: usize = 16;

fn model() -> ModelShape {
    ModelShape {
        layers: 1,
        first_moe_layer: 0,
        experts: EXPERTS as u32,
        top_k: 8,
        hidden_size: 2048,
        expert_intermediate_size: 768,
        dtype: Dtype::Bf16,
    }
}

/// Skewed rows (share ∝ 1/(e+1)^0.7) of `tokens * 8` routed rows; the 16 hottest experts get a
/// second replica on the next GPU.
fn batch(tokens: f64) -> (Vec<f64>, Vec<Vec<usize>>) {
    let w: Vec<f64> = (0..EXPERTS)
        .map(|e| 1.0 / ((e + 1) as f64).powf(0.7))
        .collect();
    let s: f64 = w.iter().sum();
    let rows = w.iter().map(|x| x / s * tokens * 8.0).collect();
    let hosts = (0..EXPERTS)
        .map(|e| {
            let home = e * GPUS / EXPERTS;
            if e < EXTRA {
                vec![home, (home + 1 + e % (GPUS - 1)) % GPUS]
            } else {
                vec![home]
            }
        })
        .collect();
    (rows, hosts)
}

fn bench(c: &mut Criterion) {
    let cost = CostModel::H200_BF16;
    let m = model();
    let mut g = c.benchmark_group("dispatch");
    for tokens in [256.0, 16384.0] {
        let (rows, hosts) = batch(tokens);
        let split = dispatch(&rows, &hosts, GPUS, &cost, &m);
        let placed = hosts
            .iter()
            .zip(&split)
            .flat_map(|(h, s)| h.iter().copied().zip(s.iter().copied()));
        let step = cost.layer_s(&m, GPUS, placed, &mut Vec::new());
        eprintln!("tokens {tokens}: predicted layer step {:.1} us", step * 1e6);
        g.bench_with_input(
            BenchmarkId::new("tokens", tokens as u64),
            &tokens,
            |b, _| b.iter(|| black_box(dispatch(black_box(&rows), &hosts, GPUS, &cost, &m))),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
