//! The plan document: which logical expert each slot of each GPU holds, per MoE layer, and the share
//! of the expert's tokens each replica takes. This JSON is the contract between the planner, the
//! operator (plan ConfigMap), the workers and the load generator.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::model::{ModelShape, Topology};

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

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Algorithm::None),
            "placement" | "placementonly" | "placement-only" => Ok(Algorithm::Placement),
            "eplb" => Ok(Algorithm::Eplb),
            "craft" => Ok(Algorithm::Craft),
            "craft-reference" | "craftreference" => Ok(Algorithm::CraftReference),
            other => Err(format!(
                "unknown algorithm {other:?}: expected one of none, placement, eplb, craft, craft-reference"
            )),
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

    /// Check the invariants every consumer relies on. Returns a description of the first violation.
    pub fn check(&self) -> Result<(), String> {
        let d = self.gpus as usize;
        let e = self.model.experts as usize;
        if d == 0 || self.nodes == 0 || !d.is_multiple_of(self.nodes as usize) {
            return Err(format!(
                "gpus ({d}) must be a positive multiple of nodes ({})",
                self.nodes
            ));
        }
        for lp in &self.layers {
            let l = lp.layer;
            if lp.slots.len() != d || lp.shares.len() != d {
                return Err(format!(
                    "layer {l}: expected {d} GPUs, found {}",
                    lp.slots.len()
                ));
            }
            let mut share_sum = vec![0.0f64; e];
            let mut count = vec![0usize; e];
            for (g, (slots, shares)) in lp.slots.iter().zip(&lp.shares).enumerate() {
                if slots.len() != shares.len() {
                    return Err(format!(
                        "layer {l} gpu {g}: {} slots but {} shares",
                        slots.len(),
                        shares.len()
                    ));
                }
                for (&x, &s) in slots.iter().zip(shares) {
                    let x = x as usize;
                    if x >= e {
                        return Err(format!(
                            "layer {l} gpu {g}: expert {x} out of range (experts = {e})"
                        ));
                    }
                    if !(0.0..=1.0).contains(&s) {
                        return Err(format!(
                            "layer {l} gpu {g}: share {s} of expert {x} outside [0, 1]"
                        ));
                    }
                    share_sum[x] += s;
                    count[x] += 1;
                }
            }
            for x in 0..e {
                if count[x] == 0 {
                    return Err(format!("layer {l}: expert {x} has no replica"));
                }
                if (share_sum[x] - 1.0).abs() > 1e-4 {
                    return Err(format!(
                        "layer {l}: shares of expert {x} sum to {} instead of 1",
                        share_sum[x]
                    ));
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

    #[test]
    fn check_names_the_missing_expert() {
        let mut p = tiny();
        p.layers[0].slots[1][0] = 0;
        p.layers[0].shares = vec![vec![0.5], vec![0.5]];
        assert_eq!(p.check().unwrap_err(), "layer 0: expert 1 has no replica");
    }
}
