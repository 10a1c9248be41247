//! Model shape and cluster topology: what a plan needs to know about the model and the GPUs.

use serde::{Deserialize, Serialize};

/// Weight precision of the routed experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    Bf16,
    /// FP8 E4M3 weights with 128x128 block scales in f32 (DeepSeek-V3 layout).
    Fp8,
}

/// Side of the square weight-scale blocks in FP8 checkpoints (DeepSeek-V3 `weight_block_size`).
pub const FP8_SCALE_BLOCK: u64 = 128;

/// The shape of a Mixture-of-Experts model, as far as planning and serving need it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelShape {
    /// Total decoder layers, dense ones included.
    pub layers: u32,
    /// Index of the first MoE layer; layers before it are dense.
    pub first_moe_layer: u32,
    /// Routed (logical) experts per MoE layer.
    pub experts: u32,
    /// Experts each token is routed to.
    pub top_k: u32,
    pub hidden_size: u64,
    /// Intermediate size of one routed expert's FFN.
    pub expert_intermediate_size: u64,
    #[serde(default)]
    pub dtype: Dtype,
}

impl ModelShape {
    /// Number of MoE layers.
    pub fn moe_layers(&self) -> u32 {
        self.layers.saturating_sub(self.first_moe_layer)
    }

    /// Bytes of one expert's weights (gate, up and down projections), scales included.
    pub fn bytes_per_expert(&self) -> u64 {
        let (h, i) = (self.hidden_size, self.expert_intermediate_size);
        match self.dtype {
            Dtype::Bf16 => 3 * h * i * 2,
            Dtype::Fp8 => {
                let blocks = h.div_ceil(FP8_SCALE_BLOCK) * i.div_ceil(FP8_SCALE_BLOCK);
                3 * (h * i + blocks * 4)
            }
        }
    }
}

/// Expert-parallel topology: `gpus` EP ranks spread evenly over `nodes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Topology {
    pub gpus: usize,
    pub nodes: usize,
}

impl Topology {
    pub fn new(gpus: usize, nodes: usize) -> Result<Self, String> {
        if gpus == 0 || nodes == 0 {
            return Err("gpus and nodes must be at least 1".into());
        }
        if gpus % nodes != 0 {
            return Err(format!(
                "gpus ({gpus}) must be a multiple of nodes ({nodes}): every node holds the same number of GPUs"
            ));
        }
        Ok(Self { gpus, nodes })
    }

    pub fn gpus_per_node(&self) -> usize {
        self.gpus / self.nodes
    }

    pub fn node_of(&self, gpu: usize) -> usize {
        gpu / self.gpus_per_node()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_per_expert_matches_known_models() {
        // DeepSeek-V3: hidden 7168, expert intermediate 2048, FP8 with 128x128 f32 scales.
        let ds = ModelShape {
            layers: 61,
            first_moe_layer: 3,
            experts: 256,
            top_k: 8,
            hidden_size: 7168,
            expert_intermediate_size: 2048,
            dtype: Dtype::Fp8,
        };
        assert_eq!(ds.moe_layers(), 58);
        assert_eq!(ds.bytes_per_expert(), 3 * (7168 * 2048 + 56 * 16 * 4));
        let qwen = ModelShape {
            dtype: Dtype::Bf16,
            hidden_size: 2048,
            expert_intermediate_size: 768,
            ..ds
        };
        assert_eq!(qwen.bytes_per_expert(), 3 * 2048 * 768 * 2);
    }

    #[test]
    fn topology_rejects_uneven_nodes() {
        assert!(Topology::new(64, 8).is_ok());
        assert!(Topology::new(10, 4).unwrap_err().contains("multiple of nodes"));
        assert_eq!(Topology::new(64, 8).unwrap().node_of(17), 2);
    }
}
