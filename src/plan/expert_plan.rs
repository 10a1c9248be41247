//! The plan document: which logical expert each slot of each GPU holds, per MoE layer, and the share
//! of the expert's tokens each replica takes. This JSON is the contract between the planner, the
//! operator (plan ConfigMap), the workers and the load generator.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::limits::{
    LimitError, MAX_EXPERTS, MAX_EXPERT_INTERMEDIATE_SIZE, MAX_GPUS, MAX_GPUS_PER_NODE,
    MAX_HIDDEN_SIZE, MAX_LAYERS, MAX_NODES, MAX_PLAN_BYTES, MAX_REPLICAS_PER_GPU,
    MAX_SLOTS_PER_GPU_LAYER, MAX_TOP_K,
};
use super::model::{ModelShape, ShapeError, Topology};

/// Version of the plan document format.
pub const PLAN_FORMAT_VERSION: u32 = 1;

/// Which policy produced a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Contiguous placement, E/D experts per GPU, no replicas.
    None,
    /// Load-aware placement with no replicas.
    Placement,
    /// DeepSeek's EPLB: the same number of replicas in every layer.
    Eplb,
    /// CRAFT: per-layer replica counts under one memory budget.
    Craft,
    /// The authors' reference CRAFT (threshold heuristic, even split), kept for comparison.
    CraftReference,
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Algorithm::None => "none",
            Algorithm::Placement => "placement",
            Algorithm::Eplb => "eplb",
            Algorithm::Craft => "craft",
            Algorithm::CraftReference => "craft-reference",
        };
        f.write_str(s)
    }
}

/// A name [`Algorithm::from_str`](std::str::FromStr) does not know (lowercased as compared).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown algorithm {name:?}: expected one of none, placement, eplb, craft, craft-reference"
)]
pub struct UnknownAlgorithm {
    pub name: String,
}

impl std::str::FromStr for Algorithm {
    type Err = UnknownAlgorithm;
    fn from_str(s: &str) -> Result<Self, UnknownAlgorithm> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Algorithm::None),
            "placement" | "placementonly" | "placement-only" => Ok(Algorithm::Placement),
            "eplb" => Ok(Algorithm::Eplb),
            "craft" => Ok(Algorithm::Craft),
            "craft-reference" | "craftreference" => Ok(Algorithm::CraftReference),
            other => Err(UnknownAlgorithm {
                name: other.to_string(),
            }),
        }
    }
}

/// One MoE layer of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerPlan {
    /// Model layer index (dense layers before `firstMoeLayer` have no plan).
    pub layer: u32,
    /// `slots[g][s]`: the logical expert held by slot `s` of GPU `g`.
    pub slots: Vec<Vec<u32>>,
    /// `shares[g][s]`: the fraction of its expert's tokens that slot `s` of GPU `g` computes.
    /// The shares of one expert's replicas sum to 1.
    pub shares: Vec<Vec<f64>>,
}

impl LayerPlan {
    /// Physical experts (slots) in this layer.
    pub fn physical_experts(&self) -> usize {
        self.slots.iter().map(Vec::len).sum()
    }

    /// For each logical expert, its replicas as (gpu, slot, share).
    pub fn replicas(&self, experts: usize) -> Vec<Vec<Replica>> {
        let mut out = vec![Vec::new(); experts];
        for (g, (slots, shares)) in self.slots.iter().zip(&self.shares).enumerate() {
            for (s, (&e, &share)) in slots.iter().zip(shares).enumerate() {
                if let Some(list) = out.get_mut(e as usize) {
                    list.push(Replica {
                        gpu: g as u32,
                        slot: s as u32,
                        share,
                    });
                }
            }
        }
        out
    }
}

/// One physical copy of a logical expert.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Replica {
    pub gpu: u32,
    pub slot: u32,
    pub share: f64,
}

/// What a GPU must load to move from the previous plan to this one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuTransition {
    pub experts_to_load: u64,
    pub bytes_to_load: u64,
}

/// The change from a previous plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    pub previous_hash: String,
    /// Indexed by GPU.
    pub per_gpu: Vec<GpuTransition>,
}

/// Figures predicted for a plan on the window it was made from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanStats {
    /// Mean over layers of the mean over batches of mean_g(load) / max_g(load).
    pub balancedness: f64,
    /// vLLM's form: sum over layers of mean_g / sum over layers of max_g (on window totals).
    pub balancedness_vllm: f64,
    /// Batches in the window the plan was made from.
    pub window_batches: u64,
    /// Tokens (routed expert-token pairs) in that window.
    pub window_tokens: f64,
    /// Each MoE layer's balancedness on that window, so that `kubectl moe plan` can show where
    /// the plan is weak without a trace. Absent in plans written before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_layer: Vec<LayerBalance>,
}

/// One layer's predicted balancedness.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerBalance {
    pub layer: u32,
    pub balancedness: f64,
}

/// A complete expert placement and replication plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExpertPlan {
    pub format_version: u32,
    pub algorithm: Algorithm,
    pub model: ModelShape,
    pub gpus: u32,
    pub nodes: u32,
    /// Extra expert slots per GPU, summed over layers (R).
    pub replicas_per_gpu: u32,
    pub bytes_per_expert: u64,
    /// Replica memory per GPU in bytes (R x bytes per expert).
    pub replica_bytes_per_gpu: u64,
    pub layers: Vec<LayerPlan>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<PlanStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transition: Option<Transition>,
    /// SHA-256 of the canonical JSON of everything else (see [`ExpertPlan::compute_hash`]).
    #[serde(default)]
    pub hash: String,
}

/// What a plan document's `hash` may be when it is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashRule {
    /// The hash must be present and match the content: plans the planner or the operator wrote,
    /// a `--previous` plan, what the workers serve.
    Required,
    /// An empty (or absent) hash is filled in with the content's; a non-empty one must match.
    /// For plans a person may write by hand, e.g. `moectl evaluate --plan`.
    MayBeEmpty,
}

/// An invariant of a plan that every consumer relies on, broken ([`ExpertPlan::check`],
/// [`ExpertPlan::check_stats`]). Layers are model layer ids.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvariantError {
    #[error("gpus ({gpus}) must be a positive multiple of nodes ({nodes})")]
    Topology { gpus: usize, nodes: u32 },
    #[error("layer {layer}: expected {expected} GPUs, found {found}")]
    Gpus {
        layer: u32,
        expected: usize,
        found: usize,
    },
    #[error("layer {layer} gpu {gpu}: {slots} slots but {shares} shares")]
    SlotsShares {
        layer: u32,
        gpu: usize,
        slots: usize,
        shares: usize,
    },
    #[error("layer {layer} gpu {gpu}: expert {expert} out of range (experts = {experts})")]
    ExpertOutOfRange {
        layer: u32,
        gpu: usize,
        expert: usize,
        experts: usize,
    },
    #[error("layer {layer} gpu {gpu}: share {share} of expert {expert} outside [0, 1]")]
    ShareOutOfRange {
        layer: u32,
        gpu: usize,
        expert: usize,
        share: f64,
    },
    #[error("layer {layer}: expert {expert} has no replica")]
    NoReplica { layer: u32, expert: usize },
    #[error("layer {layer}: shares of expert {expert} sum to {sum} instead of 1")]
    ShareSum { layer: u32, expert: usize, sum: f64 },
    /// `field` names the statistic in the document (`stats.windowTokens`, ...).
    #[error("{field} is {value}, not a finite number")]
    NonFiniteStat { field: &'static str, value: f64 },
}

/// What is wrong with `layers[index]` of a plan document (see [`PlanReadError::Layer`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerError {
    /// `layer` is outside the model's MoE layers `first..end`.
    #[error("layer {layer} is not a MoE layer of the model (MoE layers are {first}..{end})")]
    NotMoe { layer: u32, first: u32, end: u32 },
    #[error(
        "layer {layer} after layer {previous}: layers must be listed once each, in increasing order"
    )]
    NotIncreasing { layer: u32, previous: u32 },
}

/// Why a plan document was refused by [`ExpertPlan::from_json_checked`] or
/// [`ExpertPlan::checked`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanReadError {
    #[error("cannot read the plan file: {0}")]
    Io(String),
    #[error(
        "the plan document is {bytes} bytes, more than the limit of {limit} \
         (plan::limits::MAX_PLAN_BYTES)"
    )]
    TooLarge { bytes: usize, limit: usize },
    #[error("not a plan document: {message}")]
    Json {
        message: String,
        line: usize,
        column: usize,
    },
    #[error(
        "formatVersion {found} is not supported: this build reads formatVersion {supported}; \
         write the plan again with this version's `moectl plan`"
    )]
    UnsupportedVersion { found: u64, supported: u32 },
    #[error("invalid plan: formatVersion is {found}; expected the number {supported}")]
    VersionNotANumber {
        found: serde_json::Value,
        supported: u32,
    },
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("layers[{index}]: {problem}")]
    Layer { index: usize, problem: LayerError },
    #[error(
        "invalid plan: `layers` is empty: a plan places the experts of at least one MoE layer"
    )]
    NoLayers,
    /// The model's shape cannot be planned (top-k, MoE layers).
    #[error("invalid plan: {0}")]
    Shape(#[from] ShapeError),
    #[error("invalid plan: {0}")]
    Invalid(#[from] InvariantError),
    #[error(
        "field `hash` is missing or empty; this reader needs a sealed plan: write it with \
         `moectl plan` (the content hashes to {computed})"
    )]
    HashMissing { computed: String },
    #[error(
        "field `hash` is {found} but the plan's content hashes to {computed}: the plan was \
         edited or damaged after it was sealed; write it again with `moectl plan`"
    )]
    HashMismatch { found: String, computed: String },
}

/// Decimal places kept for token shares, so that the JSON (and its hash) is stable.
const SHARE_DECIMALS: f64 = 1e6;

/// Round a share so that it survives a JSON round trip bit for bit.
pub fn round_share(x: f64) -> f64 {
    (x * SHARE_DECIMALS).round() / SHARE_DECIMALS
}

impl ExpertPlan {
    pub fn topology(&self) -> Topology {
        Topology {
            gpus: self.gpus as usize,
            nodes: self.nodes as usize,
        }
    }

    /// SHA-256 over the canonical JSON of the plan with an empty hash field. Field order is fixed by
    /// the struct, maps are not used, and floats are rounded before they are stored, so the same
    /// plan always gives the same bytes.
    pub fn compute_hash(&self) -> String {
        let mut body = self.clone();
        body.hash = String::new();
        let bytes = serde_json::to_vec(&body).expect("plan serialises");
        hex::encode(Sha256::digest(&bytes))
    }

    /// Fill in `hash`.
    pub fn seal(mut self) -> Self {
        self.hash = self.compute_hash();
        self
    }

    /// Short form of the hash for names and printer columns.
    pub fn short_hash(&self) -> &str {
        &self.hash[..self.hash.len().min(12)]
    }

    /// The one reader of plan documents from files, ConfigMaps and the wire: at most
    /// [`MAX_PLAN_BYTES`], [`PLAN_FORMAT_VERSION`] only, then [`ExpertPlan::checked`]. Nothing is
    /// allocated from a size in the document before it is bounded (serde's own vectors are bounded
    /// by the byte length).
    pub fn from_json_checked(bytes: &[u8], hash: HashRule) -> Result<ExpertPlan, PlanReadError> {
        if bytes.len() > MAX_PLAN_BYTES {
            return Err(PlanReadError::TooLarge {
                bytes: bytes.len(),
                limit: MAX_PLAN_BYTES,
            });
        }
        let json = |e: serde_json::Error| PlanReadError::Json {
            message: e.to_string(),
            line: e.line(),
            column: e.column(),
        };
        // The version first: another version's document may not parse as this one, and saying
        // "unsupported version" beats a missing-field error.
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Version {
            format_version: Option<serde_json::Value>,
        }
        let v: Version = serde_json::from_slice(bytes).map_err(json)?;
        if let Some(found) = v.format_version {
            if found.as_u64() != Some(PLAN_FORMAT_VERSION as u64) {
                return Err(match found.as_u64() {
                    Some(found) => PlanReadError::UnsupportedVersion {
                        found,
                        supported: PLAN_FORMAT_VERSION,
                    },
                    None => PlanReadError::VersionNotANumber {
                        found,
                        supported: PLAN_FORMAT_VERSION,
                    },
                });
            }
        }
        let plan: ExpertPlan = serde_json::from_slice(bytes).map_err(json)?;
        plan.checked(hash)
    }

    /// [`ExpertPlan::from_json_checked`] on a file, reading no more than [`MAX_PLAN_BYTES`] of it
    /// (one byte more, to refuse a larger or endless file without buffering it).
    pub fn read_file_checked(
        path: &std::path::Path,
        hash: HashRule,
    ) -> Result<ExpertPlan, PlanReadError> {
        use std::io::Read;
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_PLAN_BYTES as u64 + 1).read_to_end(&mut bytes))
            .map_err(|e| PlanReadError::Io(e.to_string()))?;
        Self::from_json_checked(&bytes, hash)
    }

    /// Everything [`ExpertPlan::from_json_checked`] checks after parsing, for plans built or
    /// decoded otherwise: every size within `plan::limits` (before [`ExpertPlan::check`] allocates
    /// per expert), MoE layers strictly increasing within `[firstMoeLayer, layers)`, the
    /// invariants of [`ExpertPlan::check`], finite stats, and the hash by `hash`. Returns the plan
    /// with its hash filled in.
    pub fn checked(mut self, hash: HashRule) -> Result<ExpertPlan, PlanReadError> {
        if self.format_version != PLAN_FORMAT_VERSION {
            return Err(PlanReadError::UnsupportedVersion {
                found: self.format_version as u64,
                supported: PLAN_FORMAT_VERSION,
            });
        }
        self.check_limits()?;
        self.check_layer_ids()?;
        self.check()?;
        self.check_stats()?;
        let computed = self.compute_hash();
        if self.hash.is_empty() {
            if hash == HashRule::Required {
                return Err(PlanReadError::HashMissing { computed });
            }
            self.hash = computed;
        } else if self.hash != computed {
            return Err(PlanReadError::HashMismatch {
                found: self.hash,
                computed,
            });
        }
        Ok(self)
    }

    /// Every size in the model, the topology and the slots within `plan::limits`.
    fn check_limits(&self) -> Result<(), PlanReadError> {
        let m = &self.model;
        let limit = |field: &str, value: u64, limit: u64, constant: &'static str| {
            LimitError::over(field, value, limit, constant).map_or(Ok(()), Err)
        };
        limit(
            "model.layers",
            m.layers.into(),
            MAX_LAYERS.into(),
            "MAX_LAYERS",
        )?;
        limit(
            "model.experts",
            m.experts.into(),
            MAX_EXPERTS.into(),
            "MAX_EXPERTS",
        )?;
        limit("model.topK", m.top_k.into(), MAX_TOP_K.into(), "MAX_TOP_K")?;
        limit(
            "model.hiddenSize",
            m.hidden_size,
            MAX_HIDDEN_SIZE,
            "MAX_HIDDEN_SIZE",
        )?;
        limit(
            "model.expertIntermediateSize",
            m.expert_intermediate_size,
            MAX_EXPERT_INTERMEDIATE_SIZE,
            "MAX_EXPERT_INTERMEDIATE_SIZE",
        )?;
        limit("gpus", self.gpus.into(), MAX_GPUS.into(), "MAX_GPUS")?;
        limit("nodes", self.nodes.into(), MAX_NODES.into(), "MAX_NODES")?;
        if let Some(per_node) = self.gpus.checked_div(self.nodes) {
            limit(
                "gpus / nodes",
                per_node.into(),
                MAX_GPUS_PER_NODE.into(),
                "MAX_GPUS_PER_NODE",
            )?;
        }
        limit(
            "replicasPerGpu",
            self.replicas_per_gpu.into(),
            MAX_REPLICAS_PER_GPU.into(),
            "MAX_REPLICAS_PER_GPU",
        )?;
        if m.experts == 0 || m.top_k == 0 || m.top_k > m.experts {
            return Err(ShapeError::TopK {
                top_k: m.top_k,
                experts: m.experts,
            }
            .into());
        }
        for (i, lp) in self.layers.iter().enumerate() {
            if let Some((g, slots)) = lp
                .slots
                .iter()
                .enumerate()
                .find(|(_, s)| s.len() > MAX_SLOTS_PER_GPU_LAYER as usize)
            {
                return Err(LimitError::Over {
                    field: format!("layers[{i}].slots[{g}] (layer {})", lp.layer),
                    value: slots.len() as u64,
                    limit: MAX_SLOTS_PER_GPU_LAYER.into(),
                    constant: "MAX_SLOTS_PER_GPU_LAYER",
                }
                .into());
            }
        }
        Ok(())
    }

    /// MoE layers: at least one, strictly increasing (no duplicate), within the model's MoE layers.
    fn check_layer_ids(&self) -> Result<(), PlanReadError> {
        let m = &self.model;
        if m.first_moe_layer >= m.layers {
            return Err(ShapeError::NoMoeLayer {
                first_moe_layer: m.first_moe_layer,
                layers: m.layers,
            }
            .into());
        }
        if self.layers.is_empty() {
            return Err(PlanReadError::NoLayers);
        }
        for (i, lp) in self.layers.iter().enumerate() {
            if lp.layer < m.first_moe_layer || lp.layer >= m.layers {
                return Err(PlanReadError::Layer {
                    index: i,
                    problem: LayerError::NotMoe {
                        layer: lp.layer,
                        first: m.first_moe_layer,
                        end: m.layers,
                    },
                });
            }
            if i > 0 && lp.layer <= self.layers[i - 1].layer {
                return Err(PlanReadError::Layer {
                    index: i,
                    problem: LayerError::NotIncreasing {
                        layer: lp.layer,
                        previous: self.layers[i - 1].layer,
                    },
                });
            }
        }
        Ok(())
    }

    /// Every figure in `stats` finite: serde_json writes NaN and infinities as `null`, which no
    /// reader takes back.
    pub fn check_stats(&self) -> Result<(), InvariantError> {
        let Some(s) = &self.stats else {
            return Ok(());
        };
        let named = [
            ("stats.balancedness", s.balancedness),
            ("stats.balancednessVllm", s.balancedness_vllm),
            ("stats.windowTokens", s.window_tokens),
        ];
        let per_layer = s
            .per_layer
            .iter()
            .map(|l| ("stats.perLayer[].balancedness", l.balancedness));
        match named
            .into_iter()
            .chain(per_layer)
            .find(|(_, x)| !x.is_finite())
        {
            Some((field, value)) => Err(InvariantError::NonFiniteStat { field, value }),
            None => Ok(()),
        }
    }

    /// Check the invariants every consumer relies on. Returns a description of the first violation.
    /// Allocates per expert: on a plan from outside, bound it first ([`ExpertPlan::checked`]).
    pub fn check(&self) -> Result<(), InvariantError> {
        let d = self.gpus as usize;
        let e = self.model.experts as usize;
        if d == 0 || self.nodes == 0 || !d.is_multiple_of(self.nodes as usize) {
            return Err(InvariantError::Topology {
                gpus: d,
                nodes: self.nodes,
            });
        }
        for lp in &self.layers {
            let l = lp.layer;
            if lp.slots.len() != d || lp.shares.len() != d {
                return Err(InvariantError::Gpus {
                    layer: l,
                    expected: d,
                    found: lp.slots.len(),
                });
            }
            let mut share_sum = vec![0.0f64; e];
            let mut count = vec![0usize; e];
            for (g, (slots, shares)) in lp.slots.iter().zip(&lp.shares).enumerate() {
                if slots.len() != shares.len() {
                    return Err(InvariantError::SlotsShares {
                        layer: l,
                        gpu: g,
                        slots: slots.len(),
                        shares: shares.len(),
                    });
                }
                for (&x, &s) in slots.iter().zip(shares) {
                    let x = x as usize;
                    if x >= e {
                        return Err(InvariantError::ExpertOutOfRange {
                            layer: l,
                            gpu: g,
                            expert: x,
                            experts: e,
                        });
                    }
                    if !(0.0..=1.0).contains(&s) {
                        return Err(InvariantError::ShareOutOfRange {
                            layer: l,
                            gpu: g,
                            expert: x,
                            share: s,
                        });
                    }
                    share_sum[x] += s;
                    count[x] += 1;
                }
            }
            for x in 0..e {
                if count[x] == 0 {
                    return Err(InvariantError::NoReplica {
                        layer: l,
                        expert: x,
                    });
                }
                if (share_sum[x] - 1.0).abs() > 1e-4 {
                    return Err(InvariantError::ShareSum {
                        layer: l,
                        expert: x,
                        sum: share_sum[x],
                    });
                }
            }
        }
        Ok(())
    }

    /// The (layer, expert) pairs GPU `gpu` holds, slot order, one entry per slot.
    pub fn experts_on(&self, gpu: usize) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        for lp in &self.layers {
            if let Some(slots) = lp.slots.get(gpu) {
                out.extend(slots.iter().map(|&e| (lp.layer, e)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::model::Dtype;

    fn tiny() -> ExpertPlan {
        ExpertPlan {
            format_version: PLAN_FORMAT_VERSION,
            algorithm: Algorithm::None,
            model: ModelShape {
                layers: 1,
                first_moe_layer: 0,
                experts: 2,
                top_k: 1,
                hidden_size: 4,
                expert_intermediate_size: 8,
                dtype: Dtype::Bf16,
            },
            gpus: 2,
            nodes: 1,
            replicas_per_gpu: 0,
            bytes_per_expert: 192,
            replica_bytes_per_gpu: 0,
            layers: vec![LayerPlan {
                layer: 0,
                slots: vec![vec![0], vec![1]],
                shares: vec![vec![1.0], vec![1.0]],
            }],
            stats: None,
            transition: None,
            hash: String::new(),
        }
    }

    #[test]
    fn hash_is_stable_through_json() {
        let p = tiny().seal();
        let back: ExpertPlan =
            serde_json::from_str(&serde_json::to_string_pretty(&p).unwrap()).unwrap();
        assert_eq!(back.compute_hash(), p.hash);
        assert_eq!(p.hash.len(), 64);
        p.check().unwrap();
    }

    #[test]
    fn hash_survives_json_for_awkward_floats() {
        // serde_json parses floats correctly rounded only with `float_roundtrip`; without it some
        // values come back one ulp off and a sealed plan no longer matches its hash.
        let mut p = tiny();
        p.stats = Some(PlanStats {
            balancedness: 0.9974755796250538,
            balancedness_vllm: 0.997491532638424,
            window_batches: 3,
            window_tokens: 368640.0,
            per_layer: vec![LayerBalance {
                layer: 0,
                balancedness: 0.9974755796250538,
            }],
        });
        for i in 0..2000u64 {
            let x = (i as f64 * 0.7548776662466927).fract();
            p.stats.as_mut().unwrap().balancedness = x;
            let sealed = p.clone().seal();
            let back: ExpertPlan =
                serde_json::from_str(&serde_json::to_string(&sealed).unwrap()).unwrap();
            assert_eq!(back.compute_hash(), sealed.hash, "{x:?}");
        }
    }

    fn read(p: &ExpertPlan, hash: HashRule) -> Result<ExpertPlan, PlanReadError> {
        ExpertPlan::from_json_checked(&serde_json::to_vec(p).unwrap(), hash)
    }

    /// Two MoE layers (1 and 2) after a dense layer 0.
    fn two_layers() -> ExpertPlan {
        let mut p = tiny();
        p.model.layers = 3;
        p.model.first_moe_layer = 1;
        p.layers[0].layer = 1;
        let mut second = p.layers[0].clone();
        second.layer = 2;
        p.layers.push(second);
        p
    }

    #[test]
    fn the_checked_reader_reads_what_the_planner_writes() {
        let p = two_layers().seal();
        let pretty = serde_json::to_vec_pretty(&p).unwrap();
        assert_eq!(
            ExpertPlan::from_json_checked(&pretty, HashRule::Required).unwrap(),
            p
        );
    }

    #[test]
    fn unknown_format_versions_are_refused() {
        // Before: formatVersion 99 was read as version 1.
        let mut p = two_layers();
        p.format_version = 99;
        let e = read(&p.seal(), HashRule::Required).unwrap_err();
        assert_eq!(
            e,
            PlanReadError::UnsupportedVersion {
                found: 99,
                supported: 1
            }
        );
        assert!(e.to_string().contains("this build reads formatVersion 1"));
        // A version that is not a number, and one whose body would not even parse as version 1.
        let e = ExpertPlan::from_json_checked(br#"{"formatVersion": "2"}"#, HashRule::Required)
            .unwrap_err();
        assert!(e.to_string().contains("expected the number 1"), "{e}");
        let e = ExpertPlan::from_json_checked(
            br#"{"formatVersion": 2, "shards": []}"#,
            HashRule::Required,
        )
        .unwrap_err();
        assert!(
            matches!(e, PlanReadError::UnsupportedVersion { found: 2, .. }),
            "{e}"
        );
    }

    #[test]
    fn hashes_are_checked_by_the_callers_rule() {
        // Before: a plan whose hash did not match its content was accepted.
        let sealed = two_layers().seal();
        let mut wrong = sealed.clone();
        wrong.hash = "0".repeat(64);
        let e = read(&wrong, HashRule::MayBeEmpty).unwrap_err();
        assert_eq!(
            e,
            PlanReadError::HashMismatch {
                found: "0".repeat(64),
                computed: sealed.hash.clone()
            }
        );
        // Edited after sealing: the content no longer matches.
        let mut edited = sealed.clone();
        edited.layers[0].shares = vec![vec![1.0], vec![1.0]];
        edited.replicas_per_gpu = 1;
        assert!(matches!(
            read(&edited, HashRule::Required),
            Err(PlanReadError::HashMismatch { .. })
        ));
        let unsealed = two_layers();
        let e = read(&unsealed, HashRule::Required).unwrap_err();
        assert!(e.to_string().contains("needs a sealed plan"), "{e}");
        assert_eq!(read(&unsealed, HashRule::MayBeEmpty).unwrap(), sealed);
    }

    #[test]
    fn layers_must_be_moe_layers_once_each_in_order() {
        // Before: a duplicated layer was accepted.
        let mut dup = two_layers();
        dup.layers[1].layer = 1;
        let e = read(&dup.seal(), HashRule::Required).unwrap_err();
        assert_eq!(
            e.to_string(),
            "layers[1]: layer 1 after layer 1: layers must be listed once each, in increasing order"
        );
        let mut unordered = two_layers();
        unordered.layers.swap(0, 1);
        assert!(matches!(
            read(&unordered.seal(), HashRule::Required),
            Err(PlanReadError::Layer { index: 1, .. })
        ));
        for bad in [0, 3] {
            let mut outside = two_layers();
            outside.layers[1].layer = bad;
            let e = read(&outside.seal(), HashRule::Required).unwrap_err();
            assert!(
                e.to_string()
                    .contains("is not a MoE layer of the model (MoE layers are 1..3)"),
                "{e}"
            );
        }
        let mut none = two_layers();
        none.layers.clear();
        let e = read(&none.seal(), HashRule::Required).unwrap_err();
        assert!(e.to_string().contains("`layers` is empty"), "{e}");
    }

    #[test]
    fn sizes_are_bounded_before_check_allocates() {
        // Before: 4294967295 experts made check() allocate 34 GB (the process aborted).
        let mut p = two_layers();
        p.model.experts = u32::MAX;
        let e = read(&p.seal(), HashRule::Required).unwrap_err();
        assert_eq!(
            e.to_string(),
            "model.experts is 4294967295, past the limit of 1024 (plan::limits::MAX_EXPERTS)"
        );
        let mut p = two_layers();
        p.gpus = 1 << 20;
        p.nodes = 1 << 10;
        assert!(read(&p.seal(), HashRule::Required)
            .unwrap_err()
            .to_string()
            .starts_with("gpus is 1048576, past the limit of 4096"));
        let mut p = two_layers();
        p.model.hidden_size = u64::MAX;
        assert!(matches!(
            read(&p.seal(), HashRule::Required),
            Err(PlanReadError::Limit(LimitError::Over {
                constant: "MAX_HIDDEN_SIZE",
                ..
            }))
        ));
        let mut p = two_layers();
        p.layers[0].slots[0] = vec![0; 1025];
        p.layers[0].shares[0] = vec![0.0; 1025];
        let e = read(&p.seal(), HashRule::Required).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("layers[0].slots[0] (layer 1) is 1025"),
            "{e}"
        );
        let big = vec![b' '; MAX_PLAN_BYTES + 1];
        assert_eq!(
            ExpertPlan::from_json_checked(&big, HashRule::Required).unwrap_err(),
            PlanReadError::TooLarge {
                bytes: MAX_PLAN_BYTES + 1,
                limit: MAX_PLAN_BYTES
            }
        );
    }

    #[test]
    fn non_finite_stats_are_refused() {
        let mut p = two_layers();
        p.stats = Some(PlanStats {
            balancedness: 1.0,
            balancedness_vllm: 1.0,
            window_batches: 1,
            window_tokens: f64::INFINITY,
            per_layer: Vec::new(),
        });
        let e = p.check_stats().unwrap_err();
        assert_eq!(
            e,
            InvariantError::NonFiniteStat {
                field: "stats.windowTokens",
                value: f64::INFINITY
            }
        );
        assert_eq!(
            e.to_string(),
            "stats.windowTokens is inf, not a finite number"
        );
        // Written, the infinity is a null that no reader takes back.
        let json = serde_json::to_vec(&p).unwrap();
        assert!(ExpertPlan::from_json_checked(&json, HashRule::MayBeEmpty).is_err());
        assert!(matches!(
            p.checked(HashRule::MayBeEmpty),
            Err(PlanReadError::Invalid(_))
        ));
    }

    #[test]
    fn check_names_the_missing_expert() {
        let mut p = tiny();
        p.layers[0].slots[1][0] = 0;
        p.layers[0].shares = vec![vec![0.5], vec![0.5]];
        let e = p.check().unwrap_err();
        assert_eq!(
            e,
            InvariantError::NoReplica {
                layer: 0,
                expert: 1
            }
        );
        assert_eq!(e.to_string(), "layer 0: expert 1 has no replica");
    }
}
