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

/// A model shape that cannot be planned, or a load or plan that does not fit the model it is
/// used with. Each names the field and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("model.topK ({top_k}) must be between 1 and model.experts ({experts})")]
    TopK { top_k: u32, experts: u32 },
    #[error(
        "model.firstMoeLayer ({first_moe_layer}) must be less than model.layers ({layers}): the \
         model has no MoE layer"
    )]
    NoMoeLayer { first_moe_layer: u32, layers: u32 },
    #[error(
        "the load has {load} experts per layer but the model has {model}: is this load from \
         another model?"
    )]
    Experts { load: usize, model: u32 },
    /// A layer of the load outside the model's MoE layers `first..end`.
    #[error(
        "layer {layer} of the load is not a MoE layer of the model (MoE layers are {first}..{end}): \
         check --first-moe-layer and the layer count"
    )]
    LayerNotMoe { layer: u32, first: u32, end: u32 },
    #[error("the load has {load} experts per layer but the plan's model has {plan}")]
    PlanExperts { load: usize, plan: u32 },
    #[error("the load has layer {layer} but the plan has no such MoE layer (plan layers: {plan_layers:?})")]
    PlanLayer { layer: u32, plan_layers: Vec<u32> },
}

/// Why [`Topology::new`] refused a topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("gpus and nodes must be at least 1")]
    Zero { gpus: usize, nodes: usize },
    #[error(
        "gpus ({gpus}) must be a multiple of nodes ({nodes}): every node holds the same number of GPUs"
    )]
    Uneven { gpus: usize, nodes: usize },
}

/// Expert-parallel topology: `gpus` EP ranks spread evenly over `nodes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Topology {
    pub gpus: usize,
    pub nodes: usize,
}

impl Topology {
    pub fn new(gpus: usize, nodes: usize) -> Result<Self, TopologyError> {
        if gpus == 0 || nodes == 0 {
            return Err(TopologyError::Zero { gpus, nodes });
        }
        if !gpus.is_multiple_of(nodes) {
            return Err(TopologyError::Uneven { gpus, nodes });
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
        let e = Topology::new(10, 4).unwrap_err();
        assert_eq!(e, TopologyError::Uneven { gpus: 10, nodes: 4 });
        assert!(e.to_string().contains("multiple of nodes"), "{e}");
        assert_eq!(Topology::new(64, 8).unwrap().node_of(17), 2);
    }
}

/// Why [`parse_byte_size`] refused its input (`input` as given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ByteSizeError {
    #[error(
        "{input:?} is not a size: expected a number with an optional unit, e.g. 2GiB or 512Mi"
    )]
    NotANumber { input: String },
    #[error("{input:?}: unknown unit {unit:?}; use B, KiB, MiB, GiB, TiB or K, M, G, T")]
    UnknownUnit { input: String, unit: String },
    #[error("{input:?} is out of range")]
    OutOfRange { input: String },
}

/// Parse a byte size: a plain number of bytes, or a number with a unit. Binary units (`Ki`, `Mi`,
/// `Gi`, `Ti`, with or without a trailing `B`) are powers of 1024, as in Kubernetes quantities;
/// decimal units (`k`/`K`, `M`, `G`, `T`, optionally with `B`) are powers of 1000.
pub fn parse_byte_size(s: &str) -> Result<u64, ByteSizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| ByteSizeError::NotANumber {
        input: s.to_string(),
    })?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        other => {
            return Err(ByteSizeError::UnknownUnit {
                input: s.to_string(),
                unit: other.to_string(),
            })
        }
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(ByteSizeError::OutOfRange {
            input: s.to_string(),
        });
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod size_tests {
    use super::{parse_byte_size, ByteSizeError};

    #[test]
    fn sizes_in_both_unit_systems() {
        assert_eq!(parse_byte_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_byte_size("2Gi").unwrap(), 2 << 30);
        assert_eq!(parse_byte_size("1.5G").unwrap(), 1_500_000_000);
        assert_eq!(parse_byte_size("4096").unwrap(), 4096);
        let e = parse_byte_size("2 parsecs").unwrap_err();
        assert_eq!(
            e,
            ByteSizeError::UnknownUnit {
                input: "2 parsecs".into(),
                unit: "parsecs".into()
            }
        );
        assert!(e.to_string().contains("unknown unit"), "{e}");
        assert!(matches!(
            parse_byte_size("GiB"),
            Err(ByteSizeError::NotANumber { .. })
        ));
    }
}

/// Why a HuggingFace `config.json` gave no plannable MoE shape; each names the config field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HfConfigError {
    /// None of the keys that may hold this number is there (as a non-negative integer).
    #[error("config.json has none of {keys:?} (a positive integer)")]
    Missing { keys: &'static [&'static str] },
    #[error(
        "config.json: `{key}` is {value} (MoE only in some layers); only 1, MoE in every layer \
         after the leading dense ones, is supported"
    )]
    SparseLayers {
        key: &'static str,
        value: serde_json::Value,
    },
    #[error("config.json: `mlp_only_layers` is {value}; expected a list of layer indices")]
    DenseLayersNotList { value: serde_json::Value },
    #[error(
        "config.json: `mlp_only_layers` {layers:?} is not a prefix 0..k of the layers; only \
         leading dense layers are supported"
    )]
    DenseLayersNotPrefix { layers: Vec<u64> },
    #[error("config.json: {what} {value} is too large")]
    TooLarge { what: &'static str, value: u64 },
    #[error(
        "config.json: inconsistent shape (layers {layers}, first MoE layer {first_moe_layer}, \
         experts {experts}, top-k {top_k})"
    )]
    Inconsistent {
        layers: u32,
        first_moe_layer: u32,
        experts: u32,
        top_k: u32,
    },
}

/// The shape of a MoE model from a HuggingFace `config.json` (Mixtral, Qwen2/3-MoE, OLMoE,
/// DeepSeek-V2/V3 field names).
pub fn from_hf_config(v: &serde_json::Value) -> Result<ModelShape, HfConfigError> {
    let int = |keys: &[&str]| -> Option<u64> {
        keys.iter().find_map(|k| v.get(*k).and_then(|x| x.as_u64()))
    };
    let need = |keys: &'static [&'static str]| -> Result<u64, HfConfigError> {
        int(keys).ok_or(HfConfigError::Missing { keys })
    };
    let layers = need(&["num_hidden_layers"])?;
    let experts = need(&["num_local_experts", "num_experts", "n_routed_experts"])?;
    let top_k = need(&["num_experts_per_tok"])?;
    let hidden_size = need(&["hidden_size"])?;
    let expert_intermediate_size = need(&["moe_intermediate_size", "intermediate_size"])?;
    // Plans number MoE layers first_moe_layer..layers, so dense layers must lead: Qwen's
    // `mlp_only_layers` as a prefix 0..k, DeepSeek's `first_k_dense_replace`, and MoE in every
    // layer after them.
    for key in ["decoder_sparse_step", "moe_layer_freq"] {
        if let Some(n) = v.get(key).filter(|x| !x.is_null()) {
            if n.as_u64() != Some(1) {
                return Err(HfConfigError::SparseLayers {
                    key,
                    value: n.clone(),
                });
            }
        }
    }
    let dense: Vec<u64> = match v.get("mlp_only_layers").filter(|x| !x.is_null()) {
        None => Vec::new(),
        Some(x) => x
            .as_array()
            .and_then(|a| a.iter().map(|l| l.as_u64()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| HfConfigError::DenseLayersNotList { value: x.clone() })?,
    };
    if dense.iter().enumerate().any(|(i, &l)| l != i as u64) {
        return Err(HfConfigError::DenseLayersNotPrefix { layers: dense });
    }
    let first_moe_layer = int(&["first_k_dense_replace"])
        .unwrap_or(0)
        .max(dense.len() as u64);
    let fp8 = v
        .pointer("/quantization_config/quant_method")
        .and_then(|x| x.as_str())
        .is_some_and(|m| m.eq_ignore_ascii_case("fp8"));
    let small = |value: u64, what: &'static str| {
        u32::try_from(value).map_err(|_| HfConfigError::TooLarge { what, value })
    };
    let shape = ModelShape {
        layers: small(layers, "num_hidden_layers")?,
        first_moe_layer: small(first_moe_layer, "first_k_dense_replace")?,
        experts: small(experts, "number of experts")?,
        top_k: small(top_k, "num_experts_per_tok")?,
        hidden_size,
        expert_intermediate_size,
        dtype: if fp8 { Dtype::Fp8 } else { Dtype::Bf16 },
    };
    if shape.first_moe_layer >= shape.layers || shape.top_k == 0 || shape.top_k > shape.experts {
        return Err(HfConfigError::Inconsistent {
            layers: shape.layers,
            first_moe_layer: shape.first_moe_layer,
            experts: shape.experts,
            top_k: shape.top_k,
        });
    }
    Ok(shape)
}

#[cfg(test)]
mod hf_tests {
    use super::*;

    #[test]
    fn deepseek_v3_config() {
        let v = serde_json::json!({
            "num_hidden_layers": 61, "n_routed_experts": 256, "num_experts_per_tok": 8,
            "hidden_size": 7168, "moe_intermediate_size": 2048, "intermediate_size": 18432,
            "first_k_dense_replace": 3, "quantization_config": {"quant_method": "fp8"}
        });
        let m = from_hf_config(&v).unwrap();
        assert_eq!(
            (
                m.layers,
                m.first_moe_layer,
                m.experts,
                m.expert_intermediate_size
            ),
            (61, 3, 256, 2048)
        );
        assert_eq!(m.dtype, Dtype::Fp8);
        let e = from_hf_config(&serde_json::json!({"num_hidden_layers": 2})).unwrap_err();
        assert!(matches!(e, HfConfigError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("num_local_experts"), "{e}");
    }

    #[test]
    fn qwen3_dense_layers_and_sparse_steps() {
        let qwen = |extra: serde_json::Value| {
            let mut v = serde_json::json!({
                "model_type": "qwen3_moe", "num_hidden_layers": 48, "num_experts": 128,
                "num_experts_per_tok": 8, "hidden_size": 2048, "intermediate_size": 6144,
                "moe_intermediate_size": 768, "decoder_sparse_step": 1, "mlp_only_layers": []
            });
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            from_hf_config(&v)
        };
        let m = qwen(serde_json::json!({})).unwrap();
        assert_eq!(
            (m.first_moe_layer, m.expert_intermediate_size, m.dtype),
            (0, 768, Dtype::Bf16)
        );
        let m = qwen(serde_json::json!({"mlp_only_layers": [0, 1]})).unwrap();
        assert_eq!(m.first_moe_layer, 2);
        let e = qwen(serde_json::json!({"mlp_only_layers": [3]})).unwrap_err();
        assert_eq!(e, HfConfigError::DenseLayersNotPrefix { layers: vec![3] });
        assert!(
            e.to_string()
                .contains("`mlp_only_layers` [3] is not a prefix"),
            "{e}"
        );
        let e = qwen(serde_json::json!({"mlp_only_layers": "all"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a list of layer indices"), "{e}");
        let e = qwen(serde_json::json!({"decoder_sparse_step": 2}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`decoder_sparse_step` is 2"), "{e}");
        let e = qwen(serde_json::json!({"moe_layer_freq": 2})).unwrap_err();
        assert_eq!(
            e,
            HfConfigError::SparseLayers {
                key: "moe_layer_freq",
                value: serde_json::json!(2)
            }
        );
        assert!(e.to_string().contains("`moe_layer_freq` is 2"), "{e}");
    }
}
