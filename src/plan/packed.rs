//! The plan document as stored where room is scarce: the plan ConfigMap, which the API server
//! caps at 1 MiB. A plan is kept as compact JSON; when that is larger than [`CONFIG_MAP_PLAN_MAX`]
//! (a DeepSeek-V3-sized plan over hundreds of GPUs can be), it is stored gzip-compressed as binary
//! data under the same key, and readers recognise it by the gzip magic bytes. A plan that does not
//! fit even compressed is refused with both sizes and the limit named.

use std::io::{Read, Write};

use super::expert_plan::ExpertPlan;
use super::limits::MAX_PLAN_BYTES;

/// Bytes the plan may take in its ConfigMap: the API server's 1 MiB for the whole object, less
/// room for the hash key and the metadata.
pub const CONFIG_MAP_PLAN_MAX: usize = 1_000_000;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A plan ready to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packed {
    /// Compact JSON, for the ConfigMap's `data`.
    Json(String),
    /// Gzip-compressed compact JSON, for the ConfigMap's `binaryData`.
    Gzip(Vec<u8>),
}

/// Why a plan could not be packed or unpacked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    #[error(
        "the plan is {json} bytes of JSON and {gzip} bytes compressed, over the {limit} bytes a \
         ConfigMap can hold: use fewer GPUs, layers or replicas per GPU"
    )]
    TooLarge {
        json: usize,
        gzip: usize,
        limit: usize,
    },
    #[error("the stored plan is not valid gzip: {0}")]
    Corrupt(String),
    #[error("the stored plan unpacks to more than {limit} bytes")]
    Unbounded { limit: usize },
    #[error("the plan does not serialise: {0}")]
    Serialise(String),
}

/// Pack `plan` for a store that holds at most `limit` bytes.
pub fn pack(plan: &ExpertPlan, limit: usize) -> Result<Packed, PackError> {
    let json = serde_json::to_string(plan).map_err(|e| PackError::Serialise(e.to_string()))?;
    if json.len() <= limit {
        return Ok(Packed::Json(json));
    }
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(json.as_bytes())
        .and_then(|_| enc.try_finish())
        .map_err(|e| PackError::Serialise(e.to_string()))?;
    let gz = enc
        .finish()
        .map_err(|e| PackError::Serialise(e.to_string()))?;
    if gz.len() > limit {
        return Err(PackError::TooLarge {
            json: json.len(),
            gzip: gz.len(),
            limit,
        });
    }
    Ok(Packed::Gzip(gz))
}

/// The JSON bytes of a stored plan: gzip is recognised by its magic bytes and inflated up to
/// [`MAX_PLAN_BYTES`] (a small compressed value cannot make the reader allocate without bound);
/// anything else is returned as it is.
pub fn unpack(stored: &[u8]) -> Result<Vec<u8>, PackError> {
    if !stored.starts_with(&GZIP_MAGIC) {
        if stored.len() > MAX_PLAN_BYTES {
            return Err(PackError::Unbounded {
                limit: MAX_PLAN_BYTES,
            });
        }
        return Ok(stored.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(stored)
        .take(MAX_PLAN_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| PackError::Corrupt(e.to_string()))?;
    if out.len() > MAX_PLAN_BYTES {
        return Err(PackError::Unbounded {
            limit: MAX_PLAN_BYTES,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::expert_plan::{Algorithm, LayerPlan, PLAN_FORMAT_VERSION};
    use crate::plan::model::{Dtype, ModelShape};

    /// A plan of DeepSeek-V3's shape (58 MoE layers x 256 experts) over `gpus` GPUs, with one
    /// replica per GPU in every layer (EPLB's layout, the largest the issue measured).
    fn deepseek_plan(gpus: u32) -> ExpertPlan {
        let experts = 256u32;
        let per_gpu = experts / gpus.min(experts);
        let layers = (3..61)
            .map(|layer| {
                let mut slots = Vec::new();
                let mut shares = Vec::new();
                for g in 0..gpus {
                    let mut s: Vec<u32> =
                        (0..per_gpu).map(|i| (g * per_gpu + i) % experts).collect();
                    let mut sh = vec![1.0; s.len()];
                    // A replica of a hot expert: shares like 0.523411 cost the most bytes.
                    s.push((g * 7 + layer) % experts);
                    sh.push(0.0);
                    slots.push(s);
                    shares.push(sh.iter().map(|x: &f64| x * 0.523411).collect());
                }
                LayerPlan {
                    layer,
                    slots,
                    shares,
                }
            })
            .collect();
        ExpertPlan {
            format_version: PLAN_FORMAT_VERSION,
            algorithm: Algorithm::Eplb,
            model: ModelShape {
                layers: 61,
                first_moe_layer: 3,
                experts,
                top_k: 8,
                hidden_size: 7168,
                expert_intermediate_size: 2048,
                dtype: Dtype::Fp8,
            },
            gpus,
            nodes: gpus / 8,
            replicas_per_gpu: 58,
            bytes_per_expert: 44_040_192,
            replica_bytes_per_gpu: 58 * 44_040_192,
            layers,
            stats: None,
            transition: None,
            hash: String::new(),
        }
        .seal()
    }

    #[test]
    fn a_deepseek_v3_plan_at_256_gpus_fits_a_config_map() {
        let plan = deepseek_plan(256);
        let pretty = serde_json::to_string_pretty(&plan).unwrap().len();
        assert!(
            pretty > 1 << 20,
            "pretty-printed it did not fit ({pretty} bytes)"
        );
        let packed = pack(&plan, CONFIG_MAP_PLAN_MAX).unwrap();
        let bytes = match &packed {
            Packed::Json(s) => s.as_bytes().to_vec(),
            Packed::Gzip(b) => b.clone(),
        };
        assert!(bytes.len() <= CONFIG_MAP_PLAN_MAX);
        eprintln!(
            "DeepSeek-V3 plan, 256 GPUs: {pretty} bytes pretty, {} bytes stored ({})",
            bytes.len(),
            if matches!(packed, Packed::Gzip(_)) {
                "gzip"
            } else {
                "compact JSON"
            }
        );
        let back: ExpertPlan = serde_json::from_slice(&unpack(&bytes).unwrap()).unwrap();
        assert_eq!(back.compute_hash(), plan.hash);
    }

    #[test]
    fn large_plans_are_compressed_and_read_back() {
        let plan = deepseek_plan(64);
        let json = serde_json::to_string(&plan).unwrap();
        let packed = pack(&plan, json.len() / 2).unwrap();
        let Packed::Gzip(gz) = packed else {
            panic!("expected gzip over the limit")
        };
        assert!(gz.len() < json.len() / 2);
        assert_eq!(unpack(&gz).unwrap(), json.as_bytes());
    }

    #[test]
    fn plans_too_large_even_compressed_name_the_limit() {
        let e = pack(&deepseek_plan(64), 1000).unwrap_err().to_string();
        assert!(
            e.contains("over the 1000 bytes a ConfigMap can hold"),
            "{e}"
        );
    }

    #[test]
    fn gzip_bombs_and_garbage_are_refused() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(MAX_PLAN_BYTES >> 20) + 1 {
            enc.write_all(&zeros).unwrap();
        }
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 1 << 20);
        assert!(matches!(unpack(&bomb), Err(PackError::Unbounded { .. })));
        assert!(matches!(
            unpack(&[0x1f, 0x8b, 1, 2, 3]),
            Err(PackError::Corrupt(_))
        ));
        assert_eq!(unpack(b"{}").unwrap(), b"{}");
    }
}
