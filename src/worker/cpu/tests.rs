use std::sync::atomic::Ordering;

use super::*;
use crate::plan::model::{Dtype, ModelShape};
use crate::worker::checkpoint::{write_synthetic_checkpoint, Checkpoint, Family};
use crate::worker::testutil::{random_batch, rel_error, Counting};

/// Odd sizes on purpose: remainders in the 8-wide dot, partial row/column tiles and partial
/// 128x128 FP8 scale blocks.
fn shape(dtype: Dtype) -> ModelShape {
    ModelShape {
        layers: 3,
        first_moe_layer: 1,
        experts: 6,
        top_k: 2,
        hidden_size: 200,
        expert_intermediate_size: 72,
        dtype,
    }
}

fn check_family(family: Family, dtype: Dtype, stacked: bool) {
    let dir = tempfile::tempdir().unwrap();
    let s = shape(dtype);
    let first = if family == Family::Mixtral { 0 } else { 1 };
    let s = ModelShape {
        first_moe_layer: first,
        ..s
    };
    write_synthetic_checkpoint(dir.path(), family, &s, 2, 11, stacked).unwrap();
    let ck: Arc<dyn WeightSource> = Arc::new(Checkpoint::open(dir.path()).unwrap());
    let keys: Vec<ExpertKey> = vec![(2, 0), (2, 3), (2, 5), (1, 1)];
    let set = CpuLoader::new(ck.clone()).load(&keys, None).unwrap();
    assert_eq!(set.resident(), vec![(1, 1), (2, 0), (2, 3), (2, 5)]);
    let weights: HashMap<ExpertKey, ExpertWeights> = keys
        .iter()
        .map(|&(l, e)| ((l, e), ck.expert(l, e).unwrap()))
        .collect();
    // Fresh inputs each time; sizes cover one row, partial row blocks and several blocks.
    for (seed, rows) in [(1u64, 1usize), (2, 37), (3, 150)] {
        let b = random_batch(seed ^ (family as u64 * 1000), &[0, 3, 5], rows, 200);
        let batch = RowBatch {
            hidden_size: 200,
            experts: &b.experts,
            router_weights: &b.weights,
            hidden: &b.hidden,
        };
        let out = set.forward(2, &batch).unwrap();
        let err = rel_error(&weights, 2, &b, 200, &out);
        assert!(err < 1e-5, "{family:?} rows {rows}: relative error {err}");
    }
}

#[test]
fn mixtral_matches_reference() {
    check_family(Family::Mixtral, Dtype::Bf16, false);
}

#[test]
fn qwen3_stacked_matches_reference() {
    check_family(Family::Qwen3Moe, Dtype::Bf16, true);
}

#[test]
fn deepseek_fp8_matches_reference() {
    check_family(Family::DeepseekV3, Dtype::Fp8, false);
}

#[test]
fn rejects_bad_batches() {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_checkpoint(
        dir.path(),
        Family::Qwen3Moe,
        &shape(Dtype::Bf16),
        1,
        0,
        false,
    )
    .unwrap();
    let ck: Arc<dyn WeightSource> = Arc::new(Checkpoint::open(dir.path()).unwrap());
    let set = CpuLoader::new(ck).load(&[(1, 0)], None).unwrap();
    let b = random_batch(5, &[0], 3, 200);
    let mut batch = RowBatch {
        hidden_size: 200,
        experts: &b.experts,
        router_weights: &b.weights,
        hidden: &b.hidden,
    };
    assert!(matches!(
        set.forward(2, &batch),
        Err(ComputeError::NotResident {
            layer: 2,
            expert: 0
        })
    ));
    let wrong = [1u32, 0, 0];
    batch.experts = &wrong;
    assert!(matches!(
        set.forward(1, &batch),
        Err(ComputeError::NotResident {
            layer: 1,
            expert: 1
        })
    ));
    batch.experts = &b.experts;
    batch.hidden_size = 100;
    assert!(matches!(
        set.forward(1, &batch),
        Err(ComputeError::Shape(_))
    ));
    batch.hidden_size = 200;
    let nan_w = [0.5, f32::NAN, 0.5];
    batch.router_weights = &nan_w;
    let e = set.forward(1, &batch).unwrap_err().to_string();
    assert!(e.contains("row 1"), "{e}");
    batch.router_weights = &b.weights;
    batch.hidden = &b.hidden[..10];
    assert!(matches!(
        set.forward(1, &batch),
        Err(ComputeError::Shape(_))
    ));
    // Empty batch is fine.
    let out = set
        .forward(
            1,
            &RowBatch {
                hidden_size: 200,
                experts: &[],
                router_weights: &[],
                hidden: &[],
            },
        )
        .unwrap();
    assert!(out.is_empty());
}

#[test]
fn reuses_resident_experts_from_previous_set() {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_checkpoint(
        dir.path(),
        Family::Qwen3Moe,
        &shape(Dtype::Bf16),
        2,
        0,
        false,
    )
    .unwrap();
    let counting = Arc::new(Counting {
        inner: Arc::new(Checkpoint::open(dir.path()).unwrap()),
        reads: Default::default(),
    });
    let loader = CpuLoader::new(counting.clone());
    let a = loader.load(&[(1, 0), (1, 1), (2, 2)], None).unwrap();
    assert_eq!(counting.reads.load(Ordering::SeqCst), 3);
    // (1, 1) twice (a replica) and (2, 2) again: only (1, 4) is read.
    let b = loader
        .load(&[(1, 1), (1, 1), (2, 2), (1, 4)], Some(&a))
        .unwrap();
    assert_eq!(counting.reads.load(Ordering::SeqCst), 4);
    assert_eq!(b.resident(), vec![(1, 1), (1, 4), (2, 2)]);
    // Without a previous set nothing is assumed resident.
    drop((a, b));
    loader.load(&[(1, 0)], None).unwrap();
    assert_eq!(counting.reads.load(Ordering::SeqCst), 5);
    // A failed load (expert out of range) is an error, not a partial set.
    let e = loader
        .load(&[(1, 0), (1, 9)], None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("expert 9"), "{e}");
}
