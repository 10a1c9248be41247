//! Expert weights from Hugging Face checkpoints: model shape from `config.json`, tensors from
//! (sharded) safetensors files, read with positioned reads so that a rank reads only the experts it
//! owns.
//!
//! The files are read, not memory-mapped: a mapped file truncated or rewritten under a running
//! worker (a re-download, a full disk, a careless `cp`) raises SIGBUS on the next access to a page
//! past its new end, killing the process. With `read_exact_at` into owned buffers a changed file
//! is an error naming the file and tensor; each read is first checked against the file's current
//! length.
//!
//! Tensor layouts understood (L = layer, E = expert, H = hidden, I = expert intermediate size):
//! - Mixtral: `model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight`, w1 = gate [I, H],
//!   w3 = up [I, H], w2 = down [H, I], bf16.
//! - Qwen3-MoE: `model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight`, bf16.
//! - DeepSeek-V3: the Qwen3-MoE names in FP8 E4M3, each with an f32 `...weight_scale_inv` of shape
//!   [ceil(rows/128), ceil(cols/128)]: weight = fp8 * scale_inv of its 128x128 block.
//! - Stacked (any family, bf16): the fused layout of transformers 5 (`MixtralExperts`,
//!   `Qwen3MoeExperts`): `model.layers.L.mlp.experts.gate_up_proj` [E, 2I, H] (rows 0..I the gate,
//!   I..2I the up projection) and `model.layers.L.mlp.experts.down_proj` [E, H, I].

pub mod safetensors;
pub mod synthetic;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::bf16;
use serde::Deserialize;

use crate::plan::model::{Dtype, ModelShape};

pub use self::safetensors::{f32_to_fp8_e4m3, fp8_e4m3_to_f32};
pub use synthetic::{write_synthetic_checkpoint, GenCheckpointArgs};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", file.display())]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", file.display())]
    Config { file: PathBuf, reason: String },
    #[error("{}: {reason}", file.display())]
    BadFile { file: PathBuf, reason: String },
    #[error("tensor `{tensor}` is missing from {}", file.display())]
    MissingTensor { tensor: String, file: PathBuf },
    #[error("tensor `{tensor}` in {} has shape {found:?}, expected {expected:?} for this model's config.json", file.display())]
    WrongShape {
        tensor: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{tensor}` in {} has dtype {found}, expected {expected}", file.display())]
    WrongDtype {
        tensor: String,
        file: PathBuf,
        expected: &'static str,
        found: &'static str,
    },
    #[error("tensor `{tensor}` in {}: {reason}", file.display())]
    Changed {
        tensor: String,
        file: PathBuf,
        reason: String,
    },
    #[error("layer {layer} expert {expert}: {reason}")]
    NotAnExpert {
        layer: u32,
        expert: u32,
        reason: String,
    },
}

/// The checkpoint families whose expert naming we know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Family {
    #[value(name = "mixtral")]
    Mixtral,
    #[value(name = "qwen3-moe")]
    Qwen3Moe,
    #[value(name = "deepseek-v3")]
    DeepseekV3,
}

/// One routed expert's weights in bf16, row-major as in the checkpoint (PyTorch `Linear` layout):
/// gate and up are [intermediate, hidden], down is [hidden, intermediate].
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertWeights {
    pub hidden: usize,
    pub intermediate: usize,
    pub gate: Vec<bf16>,
    pub up: Vec<bf16>,
    pub down: Vec<bf16>,
}

/// Where backends get expert weights from: a checkpoint, or generated weights in benchmarks.
pub trait WeightSource: Send + Sync {
    fn shape(&self) -> &ModelShape;
    fn expert(&self, layer: u32, expert: u32) -> Result<ExpertWeights, CheckpointError>;
    /// The expert's FP8 weights with their block scales, as stored, for backends that compute in
    /// FP8; None where the source is not FP8 or the shape cannot stay FP8
    /// ([`crate::worker::fp8::fp8_shape_unsupported`]): such experts are read with
    /// [`Self::expert`], dequantized.
    fn expert_fp8(
        &self,
        _layer: u32,
        _expert: u32,
    ) -> Result<Option<crate::worker::fp8::Fp8Expert>, CheckpointError> {
        Ok(None)
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    num_hidden_layers: Option<u32>,
    hidden_size: Option<u64>,
    intermediate_size: Option<u64>,
    moe_intermediate_size: Option<u64>,
    num_local_experts: Option<u32>,
    num_experts: Option<u32>,
    n_routed_experts: Option<u32>,
    num_experts_per_tok: Option<u32>,
    first_k_dense_replace: Option<u32>,
    moe_layer_freq: Option<u32>,
    decoder_sparse_step: Option<u32>,
    mlp_only_layers: Option<Vec<u32>>,
    quantization_config: Option<QuantConfig>,
}

#[derive(Deserialize)]
struct QuantConfig {
    quant_method: Option<String>,
    fmt: Option<String>,
    weight_block_size: Option<Vec<u64>>,
}

/// What `config.json` tells the loader.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointConfig {
    pub family: Family,
    pub shape: ModelShape,
}

/// Reads the model shape from the text of a Hugging Face `config.json` (pure; errors name the field).
pub fn parse_config(text: &str) -> Result<CheckpointConfig, String> {
    let c: HfConfig =
        serde_json::from_str(text).map_err(|e| format!("not a valid config.json: {e}"))?;
    let model_type = c
        .model_type
        .clone()
        .ok_or("field `model_type` is missing")?;
    let family = match model_type.as_str() {
        "mixtral" => Family::Mixtral,
        "qwen3_moe" | "qwen2_moe" => Family::Qwen3Moe,
        "deepseek_v3" | "deepseek_v2" | "kimi_k2" => Family::DeepseekV3,
        other => {
            return Err(format!(
                "`model_type` is {other:?}; supported: mixtral, qwen3_moe, deepseek_v3"
            ))
        }
    };
    let need = |v: Option<u64>, name: &str| v.ok_or(format!("field `{name}` is missing"));
    let layers = c
        .num_hidden_layers
        .ok_or("field `num_hidden_layers` is missing")?;
    let hidden = need(c.hidden_size, "hidden_size")?;
    let top_k = c
        .num_experts_per_tok
        .ok_or("field `num_experts_per_tok` is missing")?;
    let (experts, inter, first, dtype) = match family {
        Family::Mixtral => (
            c.num_local_experts
                .or(c.num_experts)
                .ok_or("field `num_local_experts` is missing")?,
            need(c.intermediate_size, "intermediate_size")?,
            0,
            Dtype::Bf16,
        ),
        Family::Qwen3Moe => {
            if c.decoder_sparse_step.unwrap_or(1) != 1 {
                return Err(
                    "`decoder_sparse_step` other than 1 (MoE every n-th layer) is not supported"
                        .into(),
                );
            }
            // Dense layers must form a prefix so that MoE layers are first..layers.
            let dense = c.mlp_only_layers.clone().unwrap_or_default();
            if dense.iter().enumerate().any(|(i, &l)| l != i as u32) {
                return Err(format!(
                    "`mlp_only_layers` {dense:?} is not a prefix 0..k of the layers; only leading dense layers are supported"
                ));
            }
            (
                // transformers 5 writes the common name `num_local_experts`.
                c.num_experts
                    .or(c.num_local_experts)
                    .ok_or("field `num_experts` (or `num_local_experts`) is missing")?,
                need(c.moe_intermediate_size, "moe_intermediate_size")?,
                dense.len() as u32,
                Dtype::Bf16,
            )
        }
        Family::DeepseekV3 => {
            if c.moe_layer_freq.unwrap_or(1) != 1 {
                return Err("`moe_layer_freq` other than 1 is not supported".into());
            }
            let dtype = match &c.quantization_config {
                None => Dtype::Bf16,
                Some(q) => {
                    let method = q.quant_method.as_deref().unwrap_or("");
                    if method != "fp8" {
                        return Err(format!("`quantization_config.quant_method` is {method:?}; only \"fp8\" is supported"));
                    }
                    if let Some(f) = q.fmt.as_deref() {
                        if f != "e4m3" {
                            return Err(format!(
                                "`quantization_config.fmt` is {f:?}; only \"e4m3\" is supported"
                            ));
                        }
                    }
                    let block = q.weight_block_size.clone().unwrap_or(vec![128, 128]);
                    if block != [128, 128] {
                        return Err(format!("`quantization_config.weight_block_size` is {block:?}; only [128, 128] is supported"));
                    }
                    Dtype::Fp8
                }
            };
            (
                c.n_routed_experts
                    .ok_or("field `n_routed_experts` is missing")?,
                need(c.moe_intermediate_size, "moe_intermediate_size")?,
                c.first_k_dense_replace.unwrap_or(0),
                dtype,
            )
        }
    };
    if first > layers || experts == 0 || hidden == 0 || inter == 0 || top_k == 0 || top_k > experts
    {
        return Err(format!(
            "inconsistent shape: layers {layers}, first MoE layer {first}, experts {experts}, top-k {top_k}, hidden {hidden}, intermediate {inter}"
        ));
    }
    // Bound every size before anything is allocated from it (a rank reads experts of hidden x
    // intermediate elements): the maxima of plan::limits, which follow from real models.
    use crate::plan::limits as lim;
    for (what, value, max) in [
        ("num_hidden_layers", layers as u64, lim::MAX_LAYERS as u64),
        ("routed experts", experts as u64, lim::MAX_EXPERTS as u64),
        ("num_experts_per_tok", top_k as u64, lim::MAX_TOP_K as u64),
        ("hidden_size", hidden, lim::MAX_HIDDEN_SIZE),
        (
            "expert intermediate size",
            inter,
            lim::MAX_EXPERT_INTERMEDIATE_SIZE,
        ),
    ] {
        if value > max {
            return Err(format!(
                "{what} is {value}, over the supported maximum {max} (plan::limits)"
            ));
        }
    }
    Ok(CheckpointConfig {
        family,
        shape: ModelShape {
            layers,
            first_moe_layer: first,
            experts,
            top_k,
            hidden_size: hidden,
            expert_intermediate_size: inter,
            dtype,
        },
    })
}

struct ShardFile {
    path: PathBuf,
    file: std::fs::File,
    /// Length when opened (what the header was checked against), for error messages.
    len: u64,
    tensors: BTreeMap<String, safetensors::TensorEntry>,
}

/// An opened checkpoint directory: each shard's header is read and checked at open; tensors are
/// read when asked for, so only the experts a rank owns are ever read.
pub struct Checkpoint {
    dir: PathBuf,
    config: CheckpointConfig,
    files: Vec<ShardFile>,
    /// Tensor name -> index into `files`.
    tensor_file: HashMap<String, usize>,
    /// What a missing tensor's error names: the index file, or the single model.safetensors.
    listing: PathBuf,
}

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// Largest `config.json` read (real ones are a few KB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest `model.safetensors.index.json` read (DeepSeek-V3's, ~91,000 tensors, is ~9 MB).
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// Reads a small text file whole, refusing one over `max` bytes before reading it.
fn read_text(path: &Path, max: u64) -> Result<String, CheckpointError> {
    use std::io::Read;
    let io = |e| CheckpointError::Io {
        file: path.to_path_buf(),
        source: e,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len > max {
        return Err(CheckpointError::BadFile {
            file: path.to_path_buf(),
            reason: format!("{len} bytes, over the {max}-byte limit for this file"),
        });
    }
    let mut text = String::with_capacity(len as usize);
    // `take` in case the file grows between the check and the read.
    f.take(max).read_to_string(&mut text).map_err(io)?;
    Ok(text)
}

fn open_shard(path: &Path) -> Result<ShardFile, CheckpointError> {
    let file = std::fs::File::open(path).map_err(|e| CheckpointError::Io {
        file: path.to_path_buf(),
        source: e,
    })?;
    let (tensors, len) = safetensors::read_header(path, &file)?;
    Ok(ShardFile {
        path: path.to_path_buf(),
        file,
        len,
        tensors,
    })
}

impl ShardFile {
    /// Reads `buf.len()` bytes of tensor `name` at absolute offset `at`, after checking that they
    /// lie inside the file as it is now: a file truncated since it was opened gives an error
    /// naming it and the tensor, as does a read that comes up short (a truncation racing the read).
    fn read_at(&self, name: &str, at: u64, buf: &mut [u8]) -> Result<(), CheckpointError> {
        let changed = |reason: String| CheckpointError::Changed {
            tensor: name.to_string(),
            file: self.path.clone(),
            reason,
        };
        let end = at + buf.len() as u64;
        let now = self
            .file
            .metadata()
            .map_err(|e| changed(format!("cannot stat the file: {e}")))?
            .len();
        if end > now {
            return Err(changed(format!(
                "bytes {at}..{end} lie past the end of the file, now {now} bytes ({} when opened): the file was truncated or replaced under the worker; restore the checkpoint and restart the worker",
                self.len
            )));
        }
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, at).map_err(|e| {
            changed(format!(
                "reading bytes {at}..{end}: {e} (file {} bytes when opened): the file changed under the worker; restore the checkpoint and restart the worker",
                self.len
            ))
        })
    }
}

impl Checkpoint {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let dir = dir.as_ref().to_path_buf();
        let cfg_path = dir.join("config.json");
        let text = read_text(&cfg_path, MAX_CONFIG_BYTES)?;
        let config = parse_config(&text).map_err(|reason| CheckpointError::Config {
            file: cfg_path.clone(),
            reason,
        })?;
        let index_path = dir.join(INDEX);
        let mut files = Vec::new();
        let mut tensor_file = HashMap::new();
        let listing = if index_path.exists() {
            let text = read_text(&index_path, MAX_INDEX_BYTES)?;
            let index: IndexFile =
                serde_json::from_str(&text).map_err(|e| CheckpointError::BadFile {
                    file: index_path.clone(),
                    reason: format!("not a valid safetensors index (needs `weight_map`): {e}"),
                })?;
            let mut by_name: HashMap<String, usize> = HashMap::new();
            for (tensor, file) in index.weight_map {
                if file.contains('/') || file.contains("..") {
                    return Err(CheckpointError::BadFile {
                        file: index_path.clone(),
                        reason: format!(
                            "tensor `{tensor}` maps to {file:?}, outside the checkpoint directory"
                        ),
                    });
                }
                let i = match by_name.get(&file) {
                    Some(&i) => i,
                    None => {
                        files.push(open_shard(&dir.join(&file))?);
                        by_name.insert(file.clone(), files.len() - 1);
                        files.len() - 1
                    }
                };
                tensor_file.insert(tensor, i);
            }
            index_path
        } else {
            let single = dir.join(SINGLE);
            if !single.exists() {
                return Err(CheckpointError::BadFile {
                    file: dir.clone(),
                    reason: format!("neither {INDEX} nor {SINGLE} is in this directory"),
                });
            }
            let f = open_shard(&single)?;
            for name in f.tensors.keys() {
                tensor_file.insert(name.clone(), 0);
            }
            files.push(f);
            single
        };
        Ok(Self {
            dir,
            config,
            files,
            tensor_file,
            listing,
        })
    }

    pub fn config(&self) -> &CheckpointConfig {
        &self.config
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lookup(
        &self,
        name: &str,
    ) -> Result<(&ShardFile, &safetensors::TensorEntry), CheckpointError> {
        let i = *self
            .tensor_file
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                tensor: name.to_string(),
                file: self.listing.clone(),
            })?;
        let f = &self.files[i];
        let e = f
            .tensors
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                tensor: name.to_string(),
                file: f.path.clone(),
            })?;
        Ok((f, e))
    }

    /// Checks dtype and shape; returns the file and entry of the tensor.
    fn checked(
        &self,
        name: &str,
        dtype: safetensors::StDtype,
        shape: &[usize],
    ) -> Result<(&ShardFile, &safetensors::TensorEntry), CheckpointError> {
        let (f, e) = self.lookup(name)?;
        if e.dtype != dtype {
            return Err(CheckpointError::WrongDtype {
                tensor: name.into(),
                file: f.path.clone(),
                expected: dtype.name(),
                found: e.dtype.name(),
            });
        }
        if e.shape != shape {
            return Err(CheckpointError::WrongShape {
                tensor: name.into(),
                file: f.path.clone(),
                expected: shape.to_vec(),
                found: e.shape.clone(),
            });
        }
        Ok((f, e))
    }

    /// Bytes `range` (relative to the tensor's start; whole tensor if `None`) of a checked tensor.
    fn read_bytes(
        &self,
        name: &str,
        dtype: safetensors::StDtype,
        shape: &[usize],
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Vec<u8>, CheckpointError> {
        let (f, e) = self.checked(name, dtype, shape)?;
        let r = range.unwrap_or(0..e.end - e.start);
        debug_assert!(r.start <= r.end && r.end <= e.end - e.start);
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        f.read_at(name, e.start + r.start, &mut buf)?;
        Ok(buf)
    }

    /// Like [`Self::read_bytes`] for a bf16 tensor, read straight into the returned buffer.
    fn read_bf16(
        &self,
        name: &str,
        shape: &[usize],
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Vec<bf16>, CheckpointError> {
        let (f, e) = self.checked(name, safetensors::StDtype::Bf16, shape)?;
        let r = range.unwrap_or(0..e.end - e.start);
        debug_assert!(
            r.start <= r.end && r.end <= e.end - e.start && (r.end - r.start).is_multiple_of(2)
        );
        let n = ((r.end - r.start) / 2) as usize;
        let mut out = vec![bf16::ZERO; n];
        // SAFETY: bf16 is a 2-byte plain value (repr(transparent) over u16) for which every bit
        // pattern is valid; the byte slice covers exactly `out`'s n elements and is dropped before
        // `out` is used again.
        let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), n * 2) };
        f.read_at(name, e.start + r.start, bytes)?;
        if cfg!(target_endian = "big") {
            for x in &mut out {
                *x = bf16::from_bits(u16::from_le(x.to_bits()));
            }
        }
        Ok(out)
    }

    fn per_expert_names(&self, layer: u32, expert: u32) -> [String; 3] {
        let p = format!("model.layers.{layer}");
        match self.config.family {
            Family::Mixtral => ["w1", "w3", "w2"]
                .map(|w| format!("{p}.block_sparse_moe.experts.{expert}.{w}.weight")),
            Family::Qwen3Moe | Family::DeepseekV3 => ["gate_proj", "up_proj", "down_proj"]
                .map(|w| format!("{p}.mlp.experts.{expert}.{w}.weight")),
        }
    }

    /// One projection of one expert, per-expert 2-D layout, dequantised to bf16.
    fn projection(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<bf16>, CheckpointError> {
        use safetensors::StDtype;
        match self.config.shape.dtype {
            Dtype::Bf16 => self.read_bf16(name, &[rows, cols], None),
            Dtype::Fp8 => {
                let q = self.read_bytes(name, StDtype::F8E4M3, &[rows, cols], None)?;
                let scale_name = format!("{name}_scale_inv");
                let (br, bc) = (rows.div_ceil(128), cols.div_ceil(128));
                let s =
                    f32_from_le(&self.read_bytes(&scale_name, StDtype::F32, &[br, bc], None)?);
                Ok(dequant_fp8(&q, &s, rows, cols))
            }
        }
    }

    fn check_key(&self, layer: u32, expert: u32) -> Result<(), CheckpointError> {
        let s = &self.config.shape;
        if layer < s.first_moe_layer || layer >= s.layers {
            return Err(CheckpointError::NotAnExpert {
                layer,
                expert,
                reason: format!(
                    "MoE layers of this model are {}..{} (config.json)",
                    s.first_moe_layer, s.layers
                ),
            });
        }
        if expert >= s.experts {
            return Err(CheckpointError::NotAnExpert {
                layer,
                expert,
                reason: format!("the model has {} routed experts (config.json)", s.experts),
            });
        }
        Ok(())
    }
}

impl WeightSource for Checkpoint {
    fn shape(&self) -> &ModelShape {
        &self.config.shape
    }

    fn expert_fp8(
        &self,
        layer: u32,
        expert: u32,
    ) -> Result<Option<crate::worker::fp8::Fp8Expert>, CheckpointError> {
        let s = &self.config.shape;
        let (h, i) = (s.hidden_size as usize, s.expert_intermediate_size as usize);
        if s.dtype != Dtype::Fp8 || crate::worker::fp8::fp8_shape_unsupported(h, i).is_some() {
            return Ok(None);
        }
        self.check_key(layer, expert)?;
        let [g, u, d] = self.per_expert_names(layer, expert);
        let raw = |name: &str,
                   rows: usize,
                   cols: usize|
         -> Result<(Vec<u8>, Vec<f32>), CheckpointError> {
            use safetensors::StDtype;
            let q = self.read_bytes(name, StDtype::F8E4M3, &[rows, cols], None)?;
            let sname = format!("{name}_scale_inv");
            let sc = f32_from_le(&self.read_bytes(
                &sname,
                StDtype::F32,
                &[rows / 128, cols / 128],
                None,
            )?);
            Ok((q, sc))
        };
        let (gq, gs) = raw(&g, i, h)?;
        let (uq, us) = raw(&u, i, h)?;
        let (dq, ds) = raw(&d, h, i)?;
        crate::worker::fp8::Fp8Expert::stack(h, i, &gq, &gs, &uq, &us, &dq, &ds)
            .map(Some)
            .map_err(|reason| {
                let file = self
                    .lookup(&g)
                    .map(|(f, _)| f.path.clone())
                    .unwrap_or_default();
                CheckpointError::BadFile { file, reason }
            })
    }

    fn expert(&self, layer: u32, expert: u32) -> Result<ExpertWeights, CheckpointError> {
        self.check_key(layer, expert)?;
        let h = self.config.shape.hidden_size as usize;
        let i = self.config.shape.expert_intermediate_size as usize;
        let [g, u, d] = self.per_expert_names(layer, expert);
        let stacked_gu = format!("model.layers.{layer}.mlp.experts.gate_up_proj");
        if !self.tensor_file.contains_key(&g) && self.tensor_file.contains_key(&stacked_gu) {
            let e = self.config.shape.experts as usize;
            let stacked_d = format!("model.layers.{layer}.mlp.experts.down_proj");
            if self.config.shape.dtype != Dtype::Bf16 {
                let (f, _) = self.lookup(&stacked_gu)?;
                return Err(CheckpointError::BadFile {
                    file: f.path.clone(),
                    reason: format!("stacked expert tensor `{stacked_gu}` with FP8 weights is not supported; use per-expert tensors"),
                });
            }
            // Only this expert's slices of the stacked tensors are read. Sizes are bounded by
            // plan::limits (parse_config), so these products fit in 64 bits.
            let ex = expert as u64;
            let per = (i * h * 2) as u64;
            let gu = (&stacked_gu, &[e, 2 * i, h][..]);
            return Ok(ExpertWeights {
                hidden: h,
                intermediate: i,
                gate: self.read_bf16(gu.0, gu.1, Some(2 * ex * per..(2 * ex + 1) * per))?,
                up: self.read_bf16(gu.0, gu.1, Some((2 * ex + 1) * per..(2 * ex + 2) * per))?,
                down: self.read_bf16(&stacked_d, &[e, h, i], Some(ex * per..(ex + 1) * per))?,
            });
        }
        Ok(ExpertWeights {
            hidden: h,
            intermediate: i,
            gate: self.projection(&g, i, h)?,
            up: self.projection(&u, i, h)?,
            down: self.projection(&d, h, i)?,
        })
    }
}

fn f32_from_le(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// FP8 weights times their 128x128 block `scale_inv`, rounded to bf16.
fn dequant_fp8(q: &[u8], scale_inv: &[f32], rows: usize, cols: usize) -> Vec<bf16> {
    let lut: Vec<f32> = (0..=255u8).map(fp8_e4m3_to_f32).collect();
    let bc = cols.div_ceil(128);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let srow = &scale_inv[(r / 128) * bc..(r / 128 + 1) * bc];
        for (c, &b) in q[r * cols..(r + 1) * cols].iter().enumerate() {
            out.push(bf16::from_f32(lut[b as usize] * srow[c / 128]));
        }
    }
    out
}

#[cfg(test)]
mod tests;
