//! Deterministic synthetic checkpoints in the real layouts, for tests, the demo and benchmarks.
//! Weights are N(0, 1/fan_in) (the scale of trained projections, so activations stay O(1)); the same
//! seed always writes the same bytes.

use std::path::{Path, PathBuf};

use half::bf16;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use super::safetensors::{shard_name, write_file, OwnedTensor, StDtype};
use super::{f32_to_fp8_e4m3, CheckpointError, Family};
use crate::plan::model::{Dtype, ModelShape};

/// `moectl gen-checkpoint`: writes config.json, safetensors shards and their index.
#[derive(Clone, Debug, clap::Args)]
pub struct GenCheckpointArgs {
    /// Checkpoint layout to write.
    #[arg(long, value_enum)]
    pub family: Family,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Decoder layers, dense ones included.
    #[arg(long, default_value_t = 4)]
    pub layers: u32,
    /// Leading dense layers (no experts written for them); must be 0 for Mixtral.
    #[arg(long, default_value_t = 0)]
    pub first_moe_layer: u32,
    #[arg(long, default_value_t = 8)]
    pub experts: u32,
    #[arg(long, default_value_t = 2)]
    pub top_k: u32,
    #[arg(long, default_value_t = 256)]
    pub hidden: u64,
    #[arg(long, default_value_t = 128)]
    pub intermediate: u64,
    /// Number of safetensors files; 1 writes a single model.safetensors without index.
    #[arg(long, default_value_t = 2)]
    pub shards: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the stacked 3-D layout (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I])
    /// instead of per-expert tensors; bf16 families only.
    #[arg(long)]
    pub stacked: bool,
}

impl GenCheckpointArgs {
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            layers: self.layers,
            first_moe_layer: self.first_moe_layer,
            experts: self.experts,
            top_k: self.top_k,
            hidden_size: self.hidden,
            expert_intermediate_size: self.intermediate,
            dtype: if self.family == Family::DeepseekV3 {
                Dtype::Fp8
            } else {
                Dtype::Bf16
            },
        }
    }

    pub fn run(&self) -> Result<(), CheckpointError> {
        write_synthetic_checkpoint(
            &self.out,
            self.family,
            &self.shape(),
            self.shards,
            self.seed,
            self.stacked,
        )
    }
}

/// The f32 weights (before bf16/FP8 rounding) of projection `proj` (0 gate, 1 up, 2 down) of one
/// expert, row-major [rows, cols]; the writer stores exactly these, rounded.
pub fn synthetic_projection(
    seed: u64,
    layer: u32,
    expert: u32,
    proj: u32,
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    let key = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(((layer as u64) << 40) | ((expert as u64) << 8) | proj as u64);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(key);
    let normal = Normal::new(0.0f32, 1.0 / (cols as f32).sqrt()).expect("valid std");
    (0..rows * cols).map(|_| normal.sample(&mut rng)).collect()
}

fn bf16_bytes(w: &[f32]) -> Vec<u8> {
    w.iter()
        .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
        .collect()
}

/// Block-quantises to FP8 E4M3 with one f32 `scale_inv` per 128x128 block (amax / 448, the
/// DeepSeek-V3 recipe): returns (fp8 bytes, scale_inv values row-major [ceil(r/128), ceil(c/128)]).
pub fn quantize_fp8_blocks(w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let (br, bc) = (rows.div_ceil(128), cols.div_ceil(128));
    let mut scales = vec![0f32; br * bc];
    for r in 0..rows {
        for c in 0..cols {
            let s = &mut scales[(r / 128) * bc + c / 128];
            *s = s.max(w[r * cols + c].abs());
        }
    }
    for s in &mut scales {
        *s = if *s > 0.0 { *s / 448.0 } else { 1.0 };
    }
    let mut q = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            q.push(f32_to_fp8_e4m3(
                w[r * cols + c] / scales[(r / 128) * bc + c / 128],
            ));
        }
    }
    (q, scales)
}

fn config_json(family: Family, s: &ModelShape) -> serde_json::Value {
    match family {
        Family::Mixtral => serde_json::json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "num_hidden_layers": s.layers,
            "hidden_size": s.hidden_size,
            "intermediate_size": s.expert_intermediate_size,
            "num_local_experts": s.experts,
            "num_experts_per_tok": s.top_k,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        }),
        Family::Qwen3Moe => serde_json::json!({
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "num_hidden_layers": s.layers,
            "hidden_size": s.hidden_size,
            "intermediate_size": s.expert_intermediate_size * 8,
            "moe_intermediate_size": s.expert_intermediate_size,
            "num_experts": s.experts,
            "num_experts_per_tok": s.top_k,
            "decoder_sparse_step": 1,
            "mlp_only_layers": (0..s.first_moe_layer).collect::<Vec<_>>(),
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        }),
        Family::DeepseekV3 => serde_json::json!({
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "num_hidden_layers": s.layers,
            "hidden_size": s.hidden_size,
            "intermediate_size": s.expert_intermediate_size * 9,
            "moe_intermediate_size": s.expert_intermediate_size,
            "n_routed_experts": s.experts,
            "n_shared_experts": 1,
            "num_experts_per_tok": s.top_k,
            "first_k_dense_replace": s.first_moe_layer,
            "moe_layer_freq": 1,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
            "quantization_config": {
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "quant_method": "fp8",
                "weight_block_size": [128, 128],
            },
        }),
    }
}

fn layer_tensors(
    family: Family,
    s: &ModelShape,
    layer: u32,
    seed: u64,
    stacked: bool,
) -> Vec<OwnedTensor> {
    let (h, i) = (s.hidden_size as usize, s.expert_intermediate_size as usize);
    let dims = [(i, h), (i, h), (h, i)];
    let mut out = Vec::new();
    if stacked {
        let (mut gu, mut dn) = (Vec::new(), Vec::new());
        for e in 0..s.experts {
            for p in 0..2 {
                gu.extend(bf16_bytes(&synthetic_projection(seed, layer, e, p, i, h)));
            }
            dn.extend(bf16_bytes(&synthetic_projection(seed, layer, e, 2, h, i)));
        }
        let e = s.experts as usize;
        let p = format!("model.layers.{layer}.mlp.experts");
        out.push(OwnedTensor {
            name: format!("{p}.gate_up_proj"),
            dtype: StDtype::Bf16,
            shape: vec![e, 2 * i, h],
            data: gu,
        });
        out.push(OwnedTensor {
            name: format!("{p}.down_proj"),
            dtype: StDtype::Bf16,
            shape: vec![e, h, i],
            data: dn,
        });
        return out;
    }
    for e in 0..s.experts {
        let names: [String; 3] = match family {
            Family::Mixtral => ["w1", "w3", "w2"]
                .map(|w| format!("model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight")),
            _ => ["gate_proj", "up_proj", "down_proj"]
                .map(|w| format!("model.layers.{layer}.mlp.experts.{e}.{w}.weight")),
        };
        for (p, name) in names.into_iter().enumerate() {
            let (r, c) = dims[p];
            let w = synthetic_projection(seed, layer, e, p as u32, r, c);
            if family == Family::DeepseekV3 {
                let (q, sc) = quantize_fp8_blocks(&w, r, c);
                out.push(OwnedTensor {
                    name: name.clone(),
                    dtype: StDtype::F8E4M3,
                    shape: vec![r, c],
                    data: q,
                });
                out.push(OwnedTensor {
                    name: format!("{name}_scale_inv"),
                    dtype: StDtype::F32,
                    shape: vec![r.div_ceil(128), c.div_ceil(128)],
                    data: sc.iter().flat_map(|x| x.to_le_bytes()).collect(),
                });
            } else {
                out.push(OwnedTensor {
                    name,
                    dtype: StDtype::Bf16,
                    shape: vec![r, c],
                    data: bf16_bytes(&w),
                });
            }
        }
    }
    out
}

/// Writes a synthetic checkpoint: `config.json`, then the MoE layers' expert tensors spread over
/// `shards` files by layer (`model.safetensors` when `shards == 1`, else `model-0000k-of-0000n`
/// files and `model.safetensors.index.json`).
pub fn write_synthetic_checkpoint(
    dir: &Path,
    family: Family,
    shape: &ModelShape,
    shards: usize,
    seed: u64,
    stacked: bool,
) -> Result<(), CheckpointError> {
    let cfg_err = |reason: String| CheckpointError::Config {
        file: dir.join("config.json"),
        reason,
    };
    let moe_layers = shape.moe_layers() as usize;
    if shards == 0 || shards > moe_layers.max(1) {
        return Err(cfg_err(format!(
            "--shards {shards}: must be between 1 and the number of MoE layers ({moe_layers})"
        )));
    }
    if family == Family::Mixtral && shape.first_moe_layer != 0 {
        return Err(cfg_err(
            "Mixtral has no dense layers: --first-moe-layer must be 0".into(),
        ));
    }
    if stacked && family == Family::DeepseekV3 {
        return Err(cfg_err(
            "--stacked is for bf16 families; DeepSeek-V3 FP8 experts are per-expert tensors".into(),
        ));
    }
    let want_dtype = if family == Family::DeepseekV3 {
        Dtype::Fp8
    } else {
        Dtype::Bf16
    };
    if shape.dtype != want_dtype {
        return Err(cfg_err(format!(
            "{family:?} checkpoints are {want_dtype:?}, the shape says {:?}",
            shape.dtype
        )));
    }
    // Round-trip through the parser so that we never write a config the loader refuses.
    let cfg = config_json(family, shape);
    let parsed = super::parse_config(&cfg.to_string()).map_err(cfg_err)?;
    if &parsed.shape != shape {
        return Err(cfg_err(format!(
            "shape {shape:?} does not survive config.json ({:?})",
            parsed.shape
        )));
    }
    let io = |file: PathBuf| move |e| CheckpointError::Io { file, source: e };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).expect("json"),
    )
    .map_err(io(dir.join("config.json")))?;
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for k in 0..shards {
        let layers = (0..moe_layers)
            .filter(|l| l * shards / moe_layers == k)
            .map(|l| l as u32 + shape.first_moe_layer);
        let tensors: Vec<OwnedTensor> = layers
            .flat_map(|l| layer_tensors(family, shape, l, seed, stacked))
            .collect();
        let name = if shards == 1 {
            PathBuf::from("model.safetensors")
        } else {
            shard_name(k, shards)
        };
        for t in &tensors {
            weight_map.insert(t.name.clone(), name.display().to_string().into());
            total += t.data.len();
        }
        write_file(&dir.join(&name), &tensors)?;
    }
    if shards > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        let p = dir.join("model.safetensors.index.json");
        std::fs::write(&p, serde_json::to_string_pretty(&index).expect("json"))
            .map_err(io(p.clone()))?;
    }
    Ok(())
}

/// Deterministic synthetic expert weights generated in memory, in the real layout (gate and up
/// [I, H], down [H, I], bf16): for benchmarks of shapes whose checkpoint would not fit on disk
/// (Qwen3-30B-A3B's experts are ~58 GB in bf16). Values are uniform with the variance of
/// N(0, 1/fan_in), the scale of [`synthetic_projection`], from a counter-based hash so that
/// gigabytes generate in seconds on all cores; the same seed always gives the same weights.
/// FP8 shapes get bf16 weights too: the backends compute in bf16 (they dequantise FP8 at load).
pub struct HashedWeights {
    shape: ModelShape,
    seed: u64,
}

impl HashedWeights {
    pub fn new(shape: ModelShape, seed: u64) -> Self {
        Self { shape, seed }
    }
}

fn mix(mut z: u64) -> u64 {
    // splitmix64's finaliser.
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` values uniform in ±std·√3 (variance std²) from stream `key`, bf16.
pub fn hashed_projection(key: u64, n: usize, std: f32) -> Vec<bf16> {
    use rayon::prelude::*;
    let a = std * 3f32.sqrt();
    let base = mix(key);
    (0..n)
        .into_par_iter()
        .with_min_len(1 << 14)
        .map(|k| {
            let u = (mix(base ^ (k as u64).wrapping_mul(0x2545_F491_4F6C_DD1D)) >> 40) as f32
                / (1u64 << 24) as f32;
            bf16::from_f32((2.0 * u - 1.0) * a)
        })
        .collect()
}

impl super::WeightSource for HashedWeights {
    fn shape(&self) -> &ModelShape {
        &self.shape
    }

    fn expert(&self, layer: u32, expert: u32) -> Result<super::ExpertWeights, CheckpointError> {
        self.check(layer, expert)?;
        let s = &self.shape;
        let (h, i) = (s.hidden_size as usize, s.expert_intermediate_size as usize);
        let [gate, up, down] = self.projections(layer, expert);
        if s.dtype == Dtype::Fp8 {
            // What an FP8 checkpoint holds, dequantized: the weights the FP8 path computes with.
            let deq = |w: &[bf16], r: usize, c: usize| {
                let f: Vec<f32> = w.iter().map(|x| x.to_f32()).collect();
                let (q, sc) = quantize_fp8_blocks(&f, r, c);
                crate::worker::fp8::dequantize_weight(&q, &sc, r, c)
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect()
            };
            return Ok(super::ExpertWeights {
                hidden: h,
                intermediate: i,
                gate: deq(&gate, i, h),
                up: deq(&up, i, h),
                down: deq(&down, h, i),
            });
        }
        Ok(super::ExpertWeights {
            hidden: h,
            intermediate: i,
            gate,
            up,
            down,
        })
    }

    fn expert_fp8(
        &self,
        layer: u32,
        expert: u32,
    ) -> Result<Option<crate::worker::fp8::Fp8Expert>, CheckpointError> {
        let s = &self.shape;
        let (h, i) = (s.hidden_size as usize, s.expert_intermediate_size as usize);
        if s.dtype != Dtype::Fp8 || crate::worker::fp8::fp8_shape_unsupported(h, i).is_some() {
            return Ok(None);
        }
        self.check(layer, expert)?;
        let [gate, up, down] = self.projections(layer, expert);
        let quant = |w: &[bf16], r: usize, c: usize| {
            let f: Vec<f32> = w.iter().map(|x| x.to_f32()).collect();
            quantize_fp8_blocks(&f, r, c)
        };
        let ((gq, gs), ((uq, us), (dq, ds))) = rayon::join(
            || quant(&gate, i, h),
            || rayon::join(|| quant(&up, i, h), || quant(&down, h, i)),
        );
        crate::worker::fp8::Fp8Expert::stack(h, i, &gq, &gs, &uq, &us, &dq, &ds)
            .map(Some)
            .map_err(|reason| CheckpointError::NotAnExpert {
                layer,
                expert,
                reason,
            })
    }
}

impl HashedWeights {
    fn check(&self, layer: u32, expert: u32) -> Result<(), CheckpointError> {
        let s = &self.shape;
        if layer < s.first_moe_layer || layer >= s.layers || expert >= s.experts {
            return Err(CheckpointError::NotAnExpert {
                layer,
                expert,
                reason: format!(
                    "synthetic weights cover MoE layers {}..{} and experts 0..{}",
                    s.first_moe_layer, s.layers, s.experts
                ),
            });
        }
        Ok(())
    }

    /// Gate, up and down in bf16, from the seed, layer and expert.
    fn projections(&self, layer: u32, expert: u32) -> [Vec<bf16>; 3] {
        let s = &self.shape;
        let (h, i) = (s.hidden_size as usize, s.expert_intermediate_size as usize);
        let key = |p: u64| {
            self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ ((layer as u64) << 40 | (expert as u64) << 8 | p)
        };
        [
            hashed_projection(key(0), i * h, 1.0 / (h as f32).sqrt()),
            hashed_projection(key(1), i * h, 1.0 / (h as f32).sqrt()),
            hashed_projection(key(2), h * i, 1.0 / (i as f32).sqrt()),
        ]
    }
}

#[cfg(test)]
mod hashed_tests {
    use super::*;
    use crate::worker::checkpoint::WeightSource;

    #[test]
    fn hashed_weights_are_deterministic_and_scaled() {
        let shape = ModelShape {
            layers: 3,
            first_moe_layer: 1,
            experts: 4,
            top_k: 2,
            hidden_size: 128,
            expert_intermediate_size: 64,
            dtype: Dtype::Bf16,
        };
        let a = HashedWeights::new(shape.clone(), 7);
        let w = a.expert(2, 3).unwrap();
        assert_eq!((w.gate.len(), w.up.len(), w.down.len()), (8192, 8192, 8192));
        assert_eq!(
            w,
            HashedWeights::new(shape.clone(), 7).expert(2, 3).unwrap()
        );
        assert_ne!(w.gate, a.expert(2, 2).unwrap().gate);
        assert_ne!(w.gate, w.up);
        assert_ne!(w, HashedWeights::new(shape, 8).expert(2, 3).unwrap());
        let var = w.gate.iter().map(|x| x.to_f64().powi(2)).sum::<f64>() / 8192.0;
        assert!((var * 128.0 - 1.0).abs() < 0.1, "{var}");
        assert!(a.expert(0, 0).is_err(), "dense layer");
        assert!(a.expert(1, 4).is_err(), "expert out of range");
    }
}
