//! The safetensors container, read and written by hand: an 8-byte little-endian header length, a
//! JSON header (`name -> {dtype, shape, data_offsets}` plus `__metadata__`), then the raw data.
//! Parsing the header ourselves lets the loader map the file and touch only the byte ranges of the
//! experts a rank owns.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::CheckpointError;

/// Element types the expert loader understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StDtype {
    Bf16,
    F8E4M3,
    F32,
    /// Any other safetensors dtype, kept by name for the error message.
    Other(&'static str),
}

impl StDtype {
    fn parse(s: &str) -> Self {
        match s {
            "BF16" => Self::Bf16,
            "F8_E4M3" => Self::F8E4M3,
            "F32" => Self::F32,
            "F16" => Self::Other("F16"),
            "F64" => Self::Other("F64"),
            "F8_E5M2" => Self::Other("F8_E5M2"),
            "I8" => Self::Other("I8"),
            "U8" => Self::Other("U8"),
            "I32" => Self::Other("I32"),
            "I64" => Self::Other("I64"),
            "BOOL" => Self::Other("BOOL"),
            _ => Self::Other("unknown"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "BF16",
            Self::F8E4M3 => "F8_E4M3",
            Self::F32 => "F32",
            Self::Other(s) => s,
        }
    }

    pub fn size(self) -> Option<usize> {
        match self {
            Self::Bf16 => Some(2),
            Self::F8E4M3 => Some(1),
            Self::F32 => Some(4),
            Self::Other(_) => None,
        }
    }
}

/// One tensor's entry in a header; offsets are absolute within the file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// Parses a safetensors header from the first bytes of `bytes` (the mapped file) and checks every
/// tensor's byte range against its shape and the file length.
pub fn parse_header(
    path: &Path,
    bytes: &[u8],
) -> Result<BTreeMap<String, TensorEntry>, CheckpointError> {
    let bad = |reason: String| CheckpointError::BadFile {
        file: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 8 {
        return Err(bad(format!(
            "{} bytes long, shorter than the 8-byte header length",
            bytes.len()
        )));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let data_start = 8usize
        .checked_add(header_len)
        .ok_or_else(|| bad("header length overflows".into()))?;
    if data_start > bytes.len() {
        return Err(bad(format!(
            "header says {header_len} header bytes but the file has only {} after the length: truncated file",
            bytes.len() - 8
        )));
    }
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let e: RawEntry = serde_json::from_value(value)
            .map_err(|e| bad(format!("header entry for tensor `{name}`: {e}")))?;
        let dtype = StDtype::parse(&e.dtype);
        let [s, t] = e.data_offsets;
        if t < s {
            return Err(bad(format!(
                "tensor `{name}` has data_offsets [{s}, {t}] that end before they start"
            )));
        }
        if let Some(size) = dtype.size() {
            let numel = e
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("tensor `{name}` shape overflows")))?;
            if numel.checked_mul(size) != Some(t - s) {
                return Err(bad(format!(
                    "tensor `{name}` of shape {:?} and dtype {} needs {} bytes but data_offsets span {}",
                    e.shape,
                    e.dtype,
                    numel.saturating_mul(size),
                    t - s
                )));
            }
        }
        let (start, end) = (data_start + s, data_start + t);
        if end > bytes.len() {
            return Err(bad(format!(
                "tensor `{name}` ends at byte {end} but the file is {} bytes: file shorter than its header says (truncated download?)",
                bytes.len()
            )));
        }
        out.insert(
            name,
            TensorEntry {
                dtype,
                shape: e.shape,
                start,
                end,
            },
        );
    }
    Ok(out)
}

/// A tensor to write: name, dtype name, shape and raw little-endian bytes.
pub struct OwnedTensor {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Writes tensors as one safetensors file (header padded to 8 bytes, as the reference writer does).
pub fn write_file(path: &Path, tensors: &[OwnedTensor]) -> Result<(), CheckpointError> {
    let io = |e: std::io::Error| CheckpointError::Io {
        file: path.to_path_buf(),
        source: e,
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for t in tensors {
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.dtype.name(),
                "shape": t.shape,
                "data_offsets": [offset, offset + t.data.len()],
            }),
        );
        offset += t.data.len();
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::new(file);
    w.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&json).map_err(io)?;
    for t in tensors {
        w.write_all(&t.data).map_err(io)?;
    }
    w.flush().map_err(io)
}

/// `model-00001-of-00004.safetensors`, the Hugging Face shard naming.
pub fn shard_name(index: usize, count: usize) -> PathBuf {
    PathBuf::from(format!(
        "model-{:05}-of-{:05}.safetensors",
        index + 1,
        count
    ))
}

/// FP8 E4M3 (the `float8_e4m3fn` of PyTorch: no infinities, 0x7f/0xff are NaN, max 448) to f32.
pub fn fp8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * (2.0f32).powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * (2.0f32).powi(exp - 7)
    }
}

/// f32 to FP8 E4M3 with round-to-nearest-even, saturating at +-448 (the finite range).
pub fn f32_to_fp8_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    // Positive codes 0x00..=0x7e are monotonic in value: pick the nearest, ties to the even code.
    let (mut lo, mut hi) = (0u8, 0x7eu8);
    if a >= fp8_e4m3_to_f32(hi) {
        return sign | hi;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fp8_e4m3_to_f32(mid) <= a {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (dl, dh) = (a - fp8_e4m3_to_f32(lo), fp8_e4m3_to_f32(hi) - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) {
        lo
    } else {
        hi
    };
    sign | code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_roundtrip_and_known_values() {
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0);
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(fp8_e4m3_to_f32(0x7f).is_nan());
        for b in 0..=255u8 {
            let v = fp8_e4m3_to_f32(b);
            if v.is_nan() || (v == 0.0 && b == 0x80) {
                continue;
            }
            assert_eq!(f32_to_fp8_e4m3(v), b, "code {b:#x} value {v}");
        }
        assert_eq!(f32_to_fp8_e4m3(1e6), 0x7e);
        assert_eq!(f32_to_fp8_e4m3(-1e6), 0xfe);
        // 1.0625 lies halfway between 1.0 (0x38, even) and 1.125 (0x39): ties to even.
        assert_eq!(f32_to_fp8_e4m3(1.0625), 0x38);
    }

    #[test]
    fn header_roundtrip_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let t = OwnedTensor {
            name: "x".into(),
            dtype: StDtype::Bf16,
            shape: vec![2, 3],
            data: vec![7u8; 12],
        };
        write_file(&p, &[t]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let h = parse_header(&p, &bytes).unwrap();
        assert_eq!(h["x"].shape, vec![2, 3]);
        assert_eq!(&bytes[h["x"].start..h["x"].end], &[7u8; 12]);
        let err = parse_header(&p, &bytes[..bytes.len() - 1])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`x`") && err.contains("a.safetensors") && err.contains("shorter"),
            "{err}"
        );
        let err = parse_header(&p, &bytes[..20]).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
