//! Helpers shared by the backend tests: fresh random batches and the f64 reference.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use half::bf16;
use rand::{Rng, SeedableRng};

use super::checkpoint::{CheckpointError, ExpertWeights, WeightSource};
use super::compute::ExpertKey;
use super::cpu::reference_row;
use crate::plan::model::ModelShape;

/// A batch of `rows` rows over `experts` with skewed counts (expert i drawn with weight 1/(i+1)),
/// hidden values N(0,1)-ish in bf16 and router weights in (0, 1].
pub struct Batch {
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
    pub hidden: Vec<bf16>,
}

pub fn random_batch(seed: u64, experts: &[u32], rows: usize, hidden: usize) -> Batch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let total: f64 = (0..experts.len()).map(|i| 1.0 / (i + 1) as f64).sum();
    let pick = |rng: &mut rand_chacha::ChaCha8Rng| {
        let mut u = rng.random::<f64>() * total;
        for (i, &e) in experts.iter().enumerate() {
            u -= 1.0 / (i + 1) as f64;
            if u <= 0.0 {
                return e;
            }
        }
        *experts.last().expect("experts")
    };
    let ids: Vec<u32> = (0..rows).map(|_| pick(&mut rng)).collect();
    let weights = (0..rows).map(|_| rng.random_range(0.05f32..1.0)).collect();
    let hidden = (0..rows * hidden)
        .map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0)))
        .collect();
    Batch {
        experts: ids,
        weights,
        hidden,
    }
}

/// ‖out − ref‖ / ‖ref‖ against the f64 reference, panicking on any non-finite output.
pub fn rel_error(
    weights: &HashMap<ExpertKey, ExpertWeights>,
    layer: u32,
    b: &Batch,
    hidden: usize,
    out: &[f32],
) -> f64 {
    assert_eq!(out.len(), b.experts.len() * hidden);
    assert!(out.iter().all(|v| v.is_finite()), "non-finite output");
    let (mut num, mut den) = (0f64, 0f64);
    for (r, &e) in b.experts.iter().enumerate() {
        let want = reference_row(
            &weights[&(layer, e)],
            &b.hidden[r * hidden..(r + 1) * hidden],
            b.weights[r],
        );
        for (k, w) in want.iter().enumerate() {
            num += (out[r * hidden + k] as f64 - w).powi(2);
            den += w * w;
        }
    }
    (num / den).sqrt()
}

/// Wraps a source and counts expert reads (to check that resident experts are reused).
pub struct Counting {
    pub inner: Arc<dyn WeightSource>,
    pub reads: AtomicUsize,
}

impl WeightSource for Counting {
    fn shape(&self) -> &ModelShape {
        self.inner.shape()
    }
    fn expert(&self, layer: u32, expert: u32) -> Result<ExpertWeights, CheckpointError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.expert(layer, expert)
    }
}
