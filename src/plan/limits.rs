//! The largest shapes the product accepts, in one place: the CRD schema, `validate`, the plan and
//! load readers, the worker's checkpoint reader and the dispatch decoder all bound what they read
//! by these numbers *before* they allocate anything sized by it.
//!
//! Each maximum follows from real models and clusters with headroom, not from what fits in a
//! `u32`: the largest public MoE models have 61 to 94 layers (DeepSeek-V3, Qwen3-235B), 384 to 512
//! routed experts (Kimi-K2, Qwen3-Next), top-8 to top-10 routing, hidden sizes up to 8192 and expert
//! intermediate sizes up to 32768 (Grok-1's dense-style experts). Raising one is a product decision:
//! change it here and the CRD (`moe-operator crd`) follows.

/// Decoder layers of a model, dense ones included.
pub const MAX_LAYERS: u32 = 512;
/// Routed (logical) experts per MoE layer.
pub const MAX_EXPERTS: u32 = 1024;
/// Experts each token is routed to.
pub const MAX_TOP_K: u32 = 64;
/// Hidden size (the model dimension).
pub const MAX_HIDDEN_SIZE: u64 = 65_536;
/// Intermediate size of one routed expert's FFN.
pub const MAX_EXPERT_INTERMEDIATE_SIZE: u64 = 131_072;
/// Worker pods (nodes) of one deployment.
pub const MAX_NODES: u32 = 1024;
/// GPUs (EP ranks) per worker pod.
pub const MAX_GPUS_PER_NODE: u32 = 16;
/// EP ranks of one deployment.
pub const MAX_GPUS: u32 = 4096;
/// Extra expert slots per GPU summed over the MoE layers (R). EPLB's one replica per GPU in every
/// layer of the deepest model is `MAX_LAYERS`; a few per layer is already more memory than a GPU has.
pub const MAX_REPLICAS_PER_GPU: u32 = 8 * MAX_LAYERS;
/// Physical experts (slots) one GPU holds in one layer.
pub const MAX_SLOTS_PER_GPU_LAYER: u32 = MAX_EXPERTS;

/// Cells (batches x layers x experts) of a load window read by `moectl` from a file. Each cell is an
/// `f64`, so this is 1 GiB: more than any trace we ship (DeepSeek-V3's 58 x 256 per batch is
/// 14,848 cells) but not so much that a file claiming a huge shape can exhaust the machine.
pub const MAX_LOAD_CELLS_FILE: usize = 1 << 27;
/// Cells of a load window the operator reads from a user's `initialLoad` ConfigMap (32 MiB): one
/// namespace's object must not be able to take the operator's memory for the whole cluster.
pub const MAX_LOAD_CELLS_OPERATOR: usize = 1 << 22;
/// Bytes of a load file `moectl` reads from disk (16 bytes per cell at [`MAX_LOAD_CELLS_FILE`]):
/// larger files, or endless ones such as a pipe, are refused rather than buffered.
pub const MAX_LOAD_FILE_BYTES: u64 = 2 << 30;
/// Largest token count a load format may give one cell; larger (or non-finite) values are refused
/// so that sums over a window stay finite and every plan's totals serialise as numbers.
pub const MAX_TOKEN_COUNT: f64 = 1e15;

/// Bytes of a plan document any reader accepts. A DeepSeek-V3 plan at 256 GPUs is about 1.5 MB
/// pretty-printed; the largest shape above fits in this with its shares.
pub const MAX_PLAN_BYTES: usize = 64 << 20;

/// A size past one of the limits above, refused before anything is sized by it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// One number past its maximum: `field` names it as the reader or request spells it.
    #[error("{field} is {value}, past the limit of {limit} (plan::limits::{constant})")]
    Over {
        field: String,
        value: u64,
        limit: u64,
        constant: &'static str,
    },
    /// The planner's window over every MoE layer of the model would hold more than `limit` counts.
    #[error(
        "{batches} batches x {layers} MoE layers x {experts} experts is more than {limit} counts \
         (plan::limits::MAX_LOAD_CELLS_FILE): plan from fewer batches"
    )]
    Cells {
        batches: usize,
        layers: usize,
        experts: usize,
        limit: usize,
    },
    /// A memory budget that holds more replicas per GPU than [`MAX_REPLICAS_PER_GPU`].
    #[error(
        "a memory budget of {bytes} bytes per GPU holds {replicas} experts of {bytes_per_expert} \
         bytes, past the limit of {limit} replicas per GPU (plan::limits::MAX_REPLICAS_PER_GPU)"
    )]
    MemoryBudget {
        bytes: u64,
        replicas: u64,
        bytes_per_expert: u64,
        limit: u32,
    },
}

impl LimitError {
    /// `Some(LimitError::Over)` when `value` is past `limit`.
    pub fn over(field: &str, value: u64, limit: u64, constant: &'static str) -> Option<Self> {
        (value > limit).then(|| LimitError::Over {
            field: field.to_string(),
            value,
            limit,
            constant,
        })
    }
}

/// Whether `cells` (a product of claimed dimensions, computed with overflow checks) fits `max`.
/// Returns `None` on overflow or when it does not fit.
pub fn checked_cells(dims: &[usize], max: usize) -> Option<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&c| c <= max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_refuse_overflow_and_excess() {
        assert_eq!(
            checked_cells(&[10, 58, 256], MAX_LOAD_CELLS_FILE),
            Some(148_480)
        );
        assert_eq!(checked_cells(&[usize::MAX, 2], usize::MAX), None);
        assert_eq!(
            checked_cells(&[1 << 20, 1 << 20], MAX_LOAD_CELLS_FILE),
            None
        );
    }

    #[test]
    fn limits_cover_real_models() {
        // DeepSeek-V3, Kimi-K2, Qwen3-235B-A22B, Mixtral-8x22B, Qwen3-Next-80B.
        for (layers, experts, top_k, hidden, inter) in [
            (61, 256, 8, 7168, 2048),
            (61, 384, 8, 7168, 2048),
            (94, 128, 8, 4096, 1536),
            (56, 8, 2, 6144, 16384),
            (48, 512, 10, 2048, 512),
        ] {
            assert!(layers <= MAX_LAYERS && experts <= MAX_EXPERTS && top_k <= MAX_TOP_K);
            assert!(hidden <= MAX_HIDDEN_SIZE && inter <= MAX_EXPERT_INTERMEDIATE_SIZE);
        }
        const { assert!(MAX_NODES * MAX_GPUS_PER_NODE >= MAX_GPUS) };
    }
}
