//! The safetensors container, read and written by hand: an 8-byte little-endian header length, a
//! JSON header (`name -> {dtype, shape, data_offsets}` plus `__metadata__`), then the raw data.
//! Parsing the header ourselves lets the loader read only the byte ranges of the experts a rank
//! owns. Every number in a header is checked before it is used: the header length against
//! [`MAX_HEADER_BYTES`] and the file before anything is allocated, every tensor's offsets against
//! each other, the file and its dtype x shape (with overflow checks), so that a damaged or hostile
//! file is refused with its name and the tensor's, never a panic, an overflow or a huge allocation.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::CheckpointError;

/// Largest JSON header read (the reference implementation's limit, 100 MB). Real headers are far
/// smaller: DeepSeek-V3's largest shard lists ~2,600 tensors in ~400 KB.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Most dimensions a tensor may have; real checkpoints use at most 3.
pub const MAX_TENSOR_RANK: usize = 8;

/// Element types the expert loader understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StDtype {
    Bf16,
    F8E4M3,
    F32,
    /// Any other safetensors dtype, kept by name for the error message, with its element size in
    /// bytes where it is a whole number (sub-byte types such as `F4` have none).
    Other(&'static str, Option<u64>),
}

impl StDtype {
    fn parse(s: &str) -> Self {
        match s {
            "BF16" => Self::Bf16,
            "F8_E4M3" => Self::F8E4M3,
            "F32" => Self::F32,
            "F16" => Self::Other("F16", Some(2)),
            "F64" => Self::Other("F64", Some(8)),
            "F8_E5M2" => Self::Other("F8_E5M2", Some(1)),
            "F8_E8M0" => Self::Other("F8_E8M0", Some(1)),
            "I8" => Self::Other("I8", Some(1)),
            "U8" => Self::Other("U8", Some(1)),
            "I16" => Self::Other("I16", Some(2)),
            "U16" => Self::Other("U16", Some(2)),
            "I32" => Self::Other("I32", Some(4)),
            "U32" => Self::Other("U32", Some(4)),
            "I64" => Self::Other("I64", Some(8)),
            "U64" => Self::Other("U64", Some(8)),
            "BOOL" => Self::Other("BOOL", Some(1)),
            _ => Self::Other("unknown", None),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "BF16",
            Self::F8E4M3 => "F8_E4M3",
            Self::F32 => "F32",
            Self::Other(s, _) => s,
        }
    }

    /// Bytes per element, where the dtype is known and whole-byte.
    pub fn size(self) -> Option<u64> {
        match self {
            Self::Bf16 => Some(2),
            Self::F8E4M3 => Some(1),
            Self::F32 => Some(4),
            Self::Other(_, s) => s,
        }
    }
}

/// One tensor's entry in a header; offsets are absolute within the file (`start <= end <= file
/// length` when parsed).
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The JSON header's length from the file's first 8 bytes, checked against [`MAX_HEADER_BYTES`]
/// and the file's length before anything is read or allocated.
pub fn header_len(path: &Path, first: &[u8], file_len: u64) -> Result<u64, CheckpointError> {
    let bad = |reason: String| CheckpointError::BadFile {
        file: path.to_path_buf(),
        reason,
    };
    let Some(prefix) = first.get(..8) else {
        return Err(bad(format!(
            "{file_len} bytes long, shorter than the 8-byte header length: truncated or not a safetensors file"
        )));
    };
    let len = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header length {len} exceeds the {MAX_HEADER_BYTES}-byte limit: not a safetensors file, or a damaged one"
        )));
    }
    if len > file_len.saturating_sub(8) {
        return Err(bad(format!(
            "header says {len} header bytes but the file has only {} after the length: truncated file",
            file_len.saturating_sub(8)
        )));
    }
    Ok(len)
}

/// Parses the JSON header `json` of a file of `file_len` bytes whose data starts right after it,
/// checking every tensor: offsets in order and inside the file, size equal to dtype x shape
/// (overflow-checked), rank at most [`MAX_TENSOR_RANK`].
pub fn parse_header_json(
    path: &Path,
    json: &[u8],
    file_len: u64,
) -> Result<BTreeMap<String, TensorEntry>, CheckpointError> {
    let bad = |reason: String| CheckpointError::BadFile {
        file: path.to_path_buf(),
        reason,
    };
    let data_start = 8u64
        .checked_add(json.len() as u64)
        .filter(|&d| d <= file_len)
        .ok_or_else(|| {
            bad(format!(
                "a {}-byte header does not fit in the {file_len}-byte file",
                json.len()
            ))
        })?;
    let data_len = file_len - data_start;
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(json)
        .map_err(|e| bad(format!("header is not a valid JSON object: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let bad_tensor = |reason: String| bad(format!("tensor `{name}`: {reason}"));
        let e: RawEntry = serde_json::from_value(value).map_err(|e| {
            bad_tensor(format!(
                "header entry is not {{dtype, shape, data_offsets}}: {e}"
            ))
        })?;
        let dtype = StDtype::parse(&e.dtype);
        if e.shape.len() > MAX_TENSOR_RANK {
            return Err(bad_tensor(format!(
                "shape has {} dimensions, more than the {MAX_TENSOR_RANK} allowed",
                e.shape.len()
            )));
        }
        let [s, t] = e.data_offsets;
        if t < s {
            return Err(bad_tensor(format!(
                "data_offsets [{s}, {t}] end before they start"
            )));
        }
        if t > data_len {
            return Err(bad_tensor(format!(
                "data_offsets [{s}, {t}] end past the {data_len} data bytes of the file ({file_len} bytes in all): file shorter than its header says (truncated download?)"
            )));
        }
        let numel = e
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad_tensor(format!("shape {:?} overflows 64 bits", e.shape)))?;
        if let Some(size) = dtype.size() {
            let need = numel.checked_mul(size);
            if need != Some(t - s) {
                return Err(bad_tensor(format!(
                    "shape {:?} of dtype {} needs {} bytes but data_offsets [{s}, {t}] span {}",
                    e.shape,
                    e.dtype,
                    need.map_or("more than 2^64".to_string(), |n| n.to_string()),
                    t - s
                )));
            }
        }
        let shape = e
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                bad_tensor(format!(
                    "shape {:?} does not fit this machine's word",
                    e.shape
                ))
            })?;
        out.insert(
            name,
            TensorEntry {
                dtype,
                shape,
                start: data_start + s,
                end: data_start + t,
            },
        );
    }
    Ok(out)
}

/// Parses the header of a whole safetensors file held in memory (tests and fuzzing; the loader
/// reads headers from files with [`read_header`]).
pub fn parse_header(
    path: &Path,
    bytes: &[u8],
) -> Result<BTreeMap<String, TensorEntry>, CheckpointError> {
    let len = header_len(path, bytes, bytes.len() as u64)?;
    // header_len checked 8 + len <= bytes.len().
    parse_header_json(path, &bytes[8..8 + len as usize], bytes.len() as u64)
}

/// Reads and parses the header of an open safetensors file; returns the tensors and the file's
/// length. Reads the 8-byte length, bounds it, and only then allocates and reads the header.
pub fn read_header(
    path: &Path,
    file: &std::fs::File,
) -> Result<(BTreeMap<String, TensorEntry>, u64), CheckpointError> {
    let io = |e| CheckpointError::Io {
        file: path.to_path_buf(),
        source: e,
    };
    let file_len = file.metadata().map_err(io)?.len();
    let mut first = [0u8; 8];
    let got = if file_len >= 8 {
        file.read_exact_at(&mut first, 0).map_err(io)?;
        &first[..]
    } else {
        &first[..0]
    };
    let len = header_len(path, got, file_len)?;
    let mut json = vec![0u8; len as usize];
    file.read_exact_at(&mut json, 8).map_err(io)?;
    let tensors = parse_header_json(path, &json, file_len)?;
    Ok((tensors, file_len))
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
        assert_eq!(
            &bytes[h["x"].start as usize..h["x"].end as usize],
            &[7u8; 12]
        );
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

#[cfg(test)]
mod header_checks {
    use super::*;

    /// A file of one tensor `w` with the given header entry (as JSON) and `data` bytes.
    fn file_with(entry: &str, data: usize) -> Vec<u8> {
        let json = format!(r#"{{"__metadata__":{{"format":"pt"}},"w":{entry}}}"#);
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.resize(b.len() + data, 0);
        b
    }

    fn err(bytes: &[u8]) -> String {
        parse_header(Path::new("/ck/bad.safetensors"), bytes)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn offsets_overflowing_or_out_of_order_are_refused() {
        // Issue 19: [0, u64::MAX] overflowed `data_start + end` (a panic in debug builds, a wrapped
        // offset in release).
        let e = err(&file_with(
            r#"{"dtype":"BF16","shape":[2],"data_offsets":[0,18446744073709551615]}"#,
            4,
        ));
        assert!(
            e.contains("bad.safetensors") && e.contains("`w`") && e.contains("past the"),
            "{e}"
        );
        let e = err(&file_with(
            r#"{"dtype":"BF16","shape":[2],"data_offsets":[18446744073709551615,18446744073709551615]}"#,
            4,
        ));
        assert!(e.contains("`w`") && e.contains("past the"), "{e}");
        let e = err(&file_with(
            r#"{"dtype":"BF16","shape":[2],"data_offsets":[4,0]}"#,
            4,
        ));
        assert!(
            e.contains("`w`") && e.contains("end before they start"),
            "{e}"
        );
        // Not representable in 64 bits: a JSON error naming the tensor.
        let e = err(&file_with(
            r#"{"dtype":"BF16","shape":[2],"data_offsets":[0,99999999999999999999]}"#,
            4,
        ));
        assert!(e.contains("`w`"), "{e}");
    }

    #[test]
    fn size_must_match_dtype_times_shape() {
        let ok = file_with(r#"{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}"#, 24);
        let h = parse_header(Path::new("ok.safetensors"), &ok).unwrap();
        assert_eq!(h["w"].end - h["w"].start, 24);
        let e = err(&file_with(
            r#"{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}"#,
            24,
        ));
        assert!(e.contains("`w`") && e.contains("needs 24 bytes"), "{e}");
        // Overflowing shape products, and a product that overflows only times the dtype size.
        let e = err(&file_with(
            r#"{"dtype":"BF16","shape":[4294967296,4294967296,4],"data_offsets":[0,0]}"#,
            0,
        ));
        assert!(e.contains("`w`") && e.contains("overflows"), "{e}");
        let e = err(&file_with(
            r#"{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}"#,
            0,
        ));
        assert!(e.contains("`w`") && e.contains("more than 2^64"), "{e}");
        // A shape of zero elements in a sub-byte (unknown) dtype is fine; too many dimensions not.
        let z = file_with(r#"{"dtype":"F4","shape":[0,7],"data_offsets":[0,0]}"#, 0);
        assert!(parse_header(Path::new("z.safetensors"), &z).is_ok());
        let e = err(&file_with(
            r#"{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]}"#,
            1,
        ));
        assert!(e.contains("`w`") && e.contains("9 dimensions"), "{e}");
    }

    #[test]
    fn header_length_is_bounded_before_reading() {
        // u64::MAX, and a length over the limit in a file that is long enough for neither.
        for len in [u64::MAX, MAX_HEADER_BYTES + 1] {
            let mut b = len.to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            let e = err(&b);
            assert!(e.contains("bad.safetensors") && e.contains("limit"), "{e}");
        }
        // Within the limit but longer than the file.
        let mut b = 1000u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert!(err(&b).contains("truncated"));
        // The file reader checks the same before allocating: a 16-byte file claiming 99 MB.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.safetensors");
        let mut b = (MAX_HEADER_BYTES - 1).to_le_bytes().to_vec();
        b.extend_from_slice(b"{}      ");
        std::fs::write(&p, &b).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let e = read_header(&p, &f).unwrap_err().to_string();
        assert!(
            e.contains("big.safetensors") && e.contains("truncated"),
            "{e}"
        );
        // Short files and headers that are not a JSON object of entries.
        assert!(err(&[1, 2, 3]).contains("shorter than the 8-byte"));
        let mut b = 2u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"[]");
        assert!(err(&b).contains("not a valid JSON object"));
        let e = err(&file_with(
            r#"{"dtype":"BF16","shape":[-1],"data_offsets":[0,0]}"#,
            0,
        ));
        assert!(e.contains("`w`"), "{e}");
    }
}
