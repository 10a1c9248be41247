//! The seam between serving (protocol, server, plan swaps) and the compute backends (CPU, CUDA).

use std::sync::Arc;

/// (model layer index, logical expert id).
pub type ExpertKey = (u32, u32);

/// Rows routed to one rank for one layer: row `r` goes to logical expert `experts[r]` with router
/// weight `router_weights[r]`; its hidden vector is `hidden[r * hidden_size..(r + 1) * hidden_size]`.
#[derive(Clone, Copy, Debug)]
pub struct RowBatch<'a> {
    pub hidden_size: usize,
    pub experts: &'a [u32],
    pub router_weights: &'a [f32],
    pub hidden: &'a [half::bf16],
}

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("layer {layer} expert {expert} is not resident on this worker")]
    NotResident { layer: u32, expert: u32 },
    #[error("batch shape: {0}")]
    Shape(String),
    #[error("device: {0}")]
    Device(String),
}

/// A set of resident experts ready to compute. Immutable once built: a plan swap builds a new one
/// and swaps the `Arc`, so the old set keeps serving until the swap.
pub trait ExpertCompute: Send + Sync {
    /// For every row, `router_weight * down(silu(gate(x)) * up(x))` of its expert, row-major
    /// `rows x hidden_size`, in f32.
    fn forward(&self, layer: u32, batch: &RowBatch<'_>) -> Result<Vec<f32>, ComputeError>;
    /// The experts this set holds.
    fn resident(&self) -> Vec<ExpertKey>;
    /// Backend name for logs and metrics ("cpu", "cuda:0").
    fn backend(&self) -> String;
}

/// Builds resident expert sets, reusing what a previous set already holds where it can
/// (a replica copied on the device instead of read again from the checkpoint).
pub trait ExpertLoader: Send + Sync {
    fn load(
        &self,
        wanted: &[ExpertKey],
        previous: Option<&Arc<dyn ExpertCompute>>,
    ) -> anyhow::Result<Arc<dyn ExpertCompute>>;
}
