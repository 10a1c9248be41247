//! CPU expert backend: one layer's FFN for batches of rows routed over 8 resident experts
//! (hidden 1024, expert intermediate 512, bf16 weights from a synthetic Qwen3-MoE checkpoint).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use moe_operator::plan::model::{Dtype, ModelShape};
use moe_operator::worker::checkpoint::{
    write_synthetic_checkpoint, Checkpoint, Family, WeightSource,
};
use moe_operator::worker::compute::{ExpertLoader, RowBatch};
use moe_operator::worker::cpu::CpuLoader;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let shape = ModelShape {
        layers: 1,
        first_moe_layer: 0,
        experts: 8,
        top_k: 2,
        hidden_size: 1024,
        expert_intermediate_size: 512,
        dtype: Dtype::Bf16,
    };
    write_synthetic_checkpoint(dir.path(), Family::Qwen3Moe, &shape, 1, 0, false)
        .expect("checkpoint");
    let ck: Arc<dyn WeightSource> = Arc::new(Checkpoint::open(dir.path()).expect("open"));
    let keys: Vec<(u32, u32)> = (0..8).map(|e| (0, e)).collect();
    let set = CpuLoader::new(ck).load(&keys, None).expect("load");
    let mut g = c.benchmark_group("cpu_expert_ffn_h1024_i512");
    g.sample_size(10);
    for rows in [1usize, 16, 128, 512] {
        let experts: Vec<u32> = (0..rows).map(|r| ((r * 7) % 8) as u32).collect();
        let weights = vec![0.5f32; rows];
        let hidden: Vec<bf16> = (0..rows * 1024)
            .map(|k| bf16::from_f32(((k * 37 % 101) as f32 - 50.0) / 50.0))
            .collect();
        g.throughput(Throughput::Elements(rows as u64));
        g.bench_with_input(BenchmarkId::from_parameter(rows), &rows, |b, _| {
            b.iter(|| {
                let batch = RowBatch {
                    hidden_size: 1024,
                    experts: &experts,
                    router_weights: &weights,
                    hidden: &hidden,
                };
                black_box(set.forward(0, &batch).expect("forward"))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
