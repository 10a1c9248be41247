//! Parsers and writers for the per-expert load formats we read, and a seeded synthetic trace
//! generator for tests and benchmarks.
//!
//! Formats (sniffed by [`parse_load_bytes`]):
//! - SGLang expert-distribution JSON: `{"logical_count": [L][E]}` or `[B][L][E]`. Layers whose rows
//!   are all zero in every batch are dense layers; they are dropped and the model layer index of
//!   every remaining layer is kept. A bare top-level `[L][E]` or `[B][L][E]` array reads the same way.
//! - OLMoE/Mixtral routing counts (`allenai/OLMoE` `scripts/routing_output`, converted to JSON):
//!   `{"num_experts", "layers": [0, 7, 15], "counts": [[int; E]; 3], ...}`, one batch.
//! - Our trace format `moe-load-trace/v1`, as one JSON document or as JSON Lines (a header line,
//!   then one batch per line). See docs/load-format.md.
//!
//! Everything here is pure except [`read_load_file`], which reads the file and calls
//! [`parse_load_bytes`].
//!
//! Every size a file claims (experts, layer ids, the batches x layers x experts product) and every
//! count read is bounded by [`LoadLimits`] and `plan::limits` before anything is allocated from it:
//! the operator reads these formats from users' ConfigMaps ([`LoadLimits::operator`]).

use std::cell::Cell;
use std::fmt;
use std::io::Read;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use thiserror::Error;

use super::limits::{
    checked_cells, MAX_EXPERTS, MAX_LAYERS, MAX_LOAD_CELLS_FILE, MAX_LOAD_CELLS_OPERATOR,
    MAX_LOAD_FILE_BYTES, MAX_TOKEN_COUNT,
};
use super::load::{LoadWindow, WindowError};
use super::model::{ModelShape, ShapeError};

/// The `format` value of our trace format.
pub const TRACE_FORMAT: &str = "moe-load-trace/v1";

/// Deepest nesting a count array may have (`[batch][layer][expert]`).
const MAX_DIM: usize = 3;

/// How much a load parser may read: the cells (batches x layers x experts counts) of one window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadLimits {
    /// Counts in the whole document (all batches); each becomes an `f64`.
    pub max_cells: usize,
}

impl LoadLimits {
    /// Files given to `moectl` ([`MAX_LOAD_CELLS_FILE`]).
    pub const fn file() -> Self {
        Self {
            max_cells: MAX_LOAD_CELLS_FILE,
        }
    }

    /// A user's `initialLoad` ConfigMap read by the operator ([`MAX_LOAD_CELLS_OPERATOR`]).
    pub const fn operator() -> Self {
        Self {
            max_cells: MAX_LOAD_CELLS_OPERATOR,
        }
    }
}

thread_local! {
    /// (cells left, the limit) for the parse running on this thread. The count arrays are parsed
    /// by serde's derived code, which cannot pass them a shared budget, and a trace's limit is on
    /// all its batches together, not on each array: [`parse_load_bytes_with`] sets this for the
    /// whole document.
    static CELL_BUDGET: Cell<(usize, usize)> =
        const { Cell::new((MAX_LOAD_CELLS_FILE, MAX_LOAD_CELLS_FILE)) };
}

/// Sets the cell budget for one parse and restores the previous one when dropped.
struct CellBudget((usize, usize));

impl CellBudget {
    fn enter(max_cells: usize) -> Self {
        Self(CELL_BUDGET.replace((max_cells, max_cells)))
    }
}

impl Drop for CellBudget {
    fn drop(&mut self) {
        CELL_BUDGET.set(self.0);
    }
}

/// A load file that could not be read, with the file, the position in it, and the problem.
#[derive(Debug, Clone, Error, PartialEq)]
#[error("{file}: {}{problem}", position.as_ref().map(|p| format!("{p}: ")).unwrap_or_default())]
pub struct LoadError {
    pub file: String,
    /// Where in the file: a JSON line:column, a field, or a batch/layer/expert index.
    pub position: Option<String>,
    pub problem: LoadProblem,
}

/// What is wrong with a load file (see [`LoadError`] for where).
#[derive(Debug, Clone, Error, PartialEq)]
pub enum LoadProblem {
    /// The JSON does not parse, or a count array is malformed (negative or non-finite counts,
    /// ragged or unevenly nested rows, too many counts): serde_json's message.
    #[error("{message} (is this a load file? see docs/load-format.md)")]
    Json { message: String },
    #[error("not UTF-8 text (expected JSON)")]
    NotUtf8,
    #[error("the file is empty")]
    EmptyFile,
    #[error("cannot read: {message}")]
    Unreadable { message: String },
    #[error(
        "the file is larger than the limit of {max} bytes (plan::limits::MAX_LOAD_FILE_BYTES): \
         split the trace or aggregate its batches"
    )]
    FileTooLarge { max: u64 },
    #[error(
        "not a known load format: expected \"logical_count\" (SGLang), \"format\": {trace:?}, \
         or \"counts\" with \"layers\" (OLMoE/Mixtral routing)",
        trace = TRACE_FORMAT
    )]
    UnknownFormat,
    #[error("unsupported format {format:?}: expected {trace:?}", trace = TRACE_FORMAT)]
    UnsupportedFormat { format: String },
    /// A field the format needs; `hint` says what it holds.
    #[error("missing field {field:?}{}", hint.map(|h| format!(" ({h})")).unwrap_or_default())]
    MissingField {
        field: &'static str,
        hint: Option<&'static str>,
    },
    #[error("must be at least 1")]
    NoExperts,
    #[error("no layers listed")]
    NoLayers,
    #[error("no batches")]
    NoBatches,
    #[error("the trace header is not followed by any batch line")]
    NoBatchLines,
    #[error("every layer is all zero: no MoE load was recorded")]
    AllZero,
    #[error(
        "layer id {id} is past the limit of {max} layers (plan::limits::MAX_LAYERS)",
        max = MAX_LAYERS
    )]
    LayerIdPastLimit { id: u32 },
    #[error("layer ids must be strictly increasing ({id} after {previous})")]
    LayerIdsNotIncreasing { id: u32, previous: u32 },
    #[error(
        "{experts} experts per layer is more than the limit of {max} (plan::limits::MAX_EXPERTS)",
        max = MAX_EXPERTS
    )]
    TooManyExperts { experts: usize },
    #[error(
        "{layers} layers is more than the limit of {max} (plan::limits::MAX_LAYERS)",
        max = MAX_LAYERS
    )]
    TooManyLayers { layers: usize },
    /// More counts than [`LoadLimits::max_cells`].
    #[error(
        "{batches} batches x {layers} layers x {experts} experts is more than {max} counts, the \
         limit for this reader: split the trace or aggregate its batches"
    )]
    TooManyCells {
        batches: usize,
        layers: usize,
        experts: usize,
        max: usize,
    },
    /// A count array with the wrong number of dimensions; `expected` says which.
    #[error("{expected}, found {found} dimension(s)")]
    Dimensions {
        expected: &'static str,
        found: usize,
    },
    /// OLMoE/Mixtral: `counts` is `layers x experts` but the file lists other sizes.
    #[error(
        "counts is {layers} x {experts} but the file lists {listed_layers} layers and \
         num_experts = {num_experts}"
    )]
    CountsShape {
        layers: usize,
        experts: usize,
        listed_layers: usize,
        num_experts: usize,
    },
    /// A trace batch whose `tokens` is not the header's `layers x experts`.
    #[error(
        "tokens is {layers} layers x {experts} experts but the header says {header_layers} layers \
         x {header_experts} experts"
    )]
    TokensShape {
        layers: usize,
        experts: usize,
        header_layers: usize,
        header_experts: usize,
    },
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error(transparent)]
    Shape(#[from] ShapeError),
}

impl LoadError {
    fn new(file: &str, position: Option<String>, problem: impl Into<LoadProblem>) -> Self {
        Self {
            file: file.to_string(),
            position,
            problem: problem.into(),
        }
    }

    /// A serde_json error: the message without serde's own position suffix, which goes to `position`.
    fn json(file: &str, line_offset: usize, e: &serde_json::Error) -> Self {
        let msg = e.to_string();
        let problem = match msg.rsplit_once(" at line ") {
            Some((p, _)) => p.to_string(),
            None => msg,
        };
        let position = (e.line() > 0)
            .then(|| format!("line {} column {}", e.line() + line_offset, e.column()));
        Self::new(file, position, LoadProblem::Json { message: problem })
    }
}

// ---------------------------------------------------------------------------------------------
// A nested array of non-negative numbers, checked while it is parsed so that errors carry both the
// index path and serde_json's line:column.

#[derive(Debug, Default)]
struct Tensor {
    /// Length of every list at each depth, `shape.len()` = number of dimensions.
    shape: Vec<usize>,
    /// Row-major values.
    data: Vec<f64>,
}

#[derive(Default)]
struct TensorBuilder {
    ndim: Option<usize>,
    lens: [Option<usize>; MAX_DIM],
    path: Vec<usize>,
    data: Vec<f64>,
}

impl TensorBuilder {
    fn at(&self) -> String {
        if self.path.is_empty() {
            "top level".to_string()
        } else {
            self.path.iter().map(|i| format!("[{i}]")).collect()
        }
    }

    fn leaf<E: de::Error>(&mut self, depth: usize, v: f64) -> Result<(), E> {
        match self.ndim {
            None if depth == 0 => {
                return Err(E::custom("expected a list of counts, found a number"))
            }
            None => self.ndim = Some(depth),
            Some(n) if n != depth => {
                return Err(E::custom(format!(
                    "{}: expected a list, found a number (rows nested unevenly)",
                    self.at()
                )))
            }
            Some(_) => {}
        }
        if !v.is_finite() || v < 0.0 {
            return Err(E::custom(format!(
                "{}: count {v} is negative or not finite; counts are token numbers >= 0",
                self.at()
            )));
        }
        if v > MAX_TOKEN_COUNT {
            return Err(E::custom(format!(
                "{}: count {v:e} is more than the limit of {MAX_TOKEN_COUNT:e} tokens per cell \
                 (plan::limits::MAX_TOKEN_COUNT), so sums over the window could not stay finite",
                self.at()
            )));
        }
        let (left, max) = CELL_BUDGET.get();
        if left == 0 {
            return Err(E::custom(format!(
                "{}: more than {max} counts in this load (the limit on batches x layers x experts \
                 for this reader): split the trace or aggregate its batches",
                self.at()
            )));
        }
        CELL_BUDGET.set((left - 1, max));
        self.data.push(v);
        Ok(())
    }
}

struct TensorSeed<'a> {
    b: &'a mut TensorBuilder,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for TensorSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TensorSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "a non-negative number or a list of them at {}",
            self.b.at()
        )
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.b.leaf(self.depth, v as f64)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.b.leaf(self.depth, v as f64)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.b.leaf(self.depth, v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let d = self.depth;
        if self.b.ndim.is_some_and(|n| d >= n) {
            return Err(de::Error::custom(format!(
                "{}: expected a number, found a list (rows nested unevenly)",
                self.b.at()
            )));
        }
        if d >= MAX_DIM {
            return Err(de::Error::custom(format!(
                "{}: lists nested deeper than [batch][layer][expert]",
                self.b.at()
            )));
        }
        self.b.path.push(0);
        let mut count = 0;
        loop {
            self.b.path[d] = count;
            let seed = TensorSeed {
                b: &mut *self.b,
                depth: d + 1,
            };
            if seq.next_element_seed(seed)?.is_none() {
                break;
            }
            count += 1;
        }
        self.b.path.pop();
        if count == 0 {
            return Err(de::Error::custom(format!("{}: empty list", self.b.at())));
        }
        match self.b.lens[d] {
            None => self.b.lens[d] = Some(count),
            Some(n) if n != count => {
                return Err(de::Error::custom(format!(
                    "{}: {count} entries where the first list at this depth has {n} (ragged rows)",
                    self.b.at()
                )))
            }
            Some(_) => {}
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Tensor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut b = TensorBuilder::default();
        TensorSeed {
            b: &mut b,
            depth: 0,
        }
        .deserialize(d)?;
        let ndim = b.ndim.unwrap_or(0);
        Ok(Tensor {
            shape: b.lens[..ndim].iter().map(|l| l.unwrap_or(0)).collect(),
            data: b.data,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Documents.

/// Every top-level field of every object format, so that one parse tells the formats apart.
#[derive(Deserialize)]
struct AnyDoc {
    format: Option<String>,
    // moe-load-trace/v1
    experts: Option<usize>,
    layers: Option<Vec<u32>>,
    batches: Option<Vec<TraceBatch>>,
    // SGLang
    logical_count: Option<Tensor>,
    // OLMoE/Mixtral
    num_experts: Option<usize>,
    counts: Option<Tensor>,
}

#[derive(Deserialize)]
struct TraceBatch {
    tokens: Tensor,
}

/// The header line of a JSON Lines trace.
#[derive(Deserialize)]
struct TraceHeader {
    format: String,
    experts: usize,
    layers: Vec<u32>,
    batches: Option<serde::de::IgnoredAny>,
}

fn window(
    file: &str,
    layer_ids: Vec<u32>,
    experts: usize,
    counts: Vec<f64>,
) -> Result<LoadWindow, LoadError> {
    LoadWindow::new(layer_ids, experts, counts).map_err(|p| LoadError::new(file, None, p))
}

/// The first limit a claimed `(batches, layers, experts)` shape is past, if any.
fn shape_problem(
    (batches, layers, experts): (usize, usize, usize),
    limits: &LoadLimits,
) -> Option<LoadProblem> {
    if experts > MAX_EXPERTS as usize {
        return Some(LoadProblem::TooManyExperts { experts });
    }
    if layers > MAX_LAYERS as usize {
        return Some(LoadProblem::TooManyLayers { layers });
    }
    if checked_cells(&[batches, layers, experts], limits.max_cells).is_none() {
        return Some(LoadProblem::TooManyCells {
            batches,
            layers,
            experts,
            max: limits.max_cells,
        });
    }
    None
}

/// Refuse a claimed shape past `plan::limits` or `limits` before anything is sized by it.
fn check_shape(
    file: &str,
    field: &str,
    shape: (usize, usize, usize),
    limits: &LoadLimits,
) -> Result<(), LoadError> {
    match shape_problem(shape, limits) {
        Some(p) => Err(LoadError::new(file, Some(field.to_string()), p)),
        None => Ok(()),
    }
}

/// Turn `[B][L][E]` (or `[L][E]`) SGLang counts into a window, dropping dense (all-zero) layers.
fn from_logical_count(file: &str, t: Tensor, limits: &LoadLimits) -> Result<LoadWindow, LoadError> {
    let (batches, layers, experts) = match t.shape[..] {
        [l, e] => (1, l, e),
        [b, l, e] => (b, l, e),
        _ => {
            return Err(LoadError::new(
                file,
                Some("logical_count".into()),
                LoadProblem::Dimensions {
                    expected: "expected [layer][expert] or [batch][layer][expert] counts",
                    found: t.shape.len(),
                },
            ))
        }
    };
    check_shape(file, "logical_count", (batches, layers, experts), limits)?;
    let row = |b: usize, l: usize| &t.data[(b * layers + l) * experts..][..experts];
    let keep: Vec<usize> = (0..layers)
        .filter(|&l| (0..batches).any(|b| row(b, l).iter().any(|&c| c > 0.0)))
        .collect();
    if keep.is_empty() {
        return Err(LoadError::new(
            file,
            Some("logical_count".into()),
            LoadProblem::AllZero,
        ));
    }
    let mut counts = Vec::with_capacity(batches * keep.len() * experts);
    for b in 0..batches {
        for &l in &keep {
            counts.extend_from_slice(row(b, l));
        }
    }
    window(
        file,
        keep.iter().map(|&l| l as u32).collect(),
        experts,
        counts,
    )
}

fn check_layer_ids(file: &str, field: &str, ids: &[u32]) -> Result<(), LoadError> {
    if ids.is_empty() {
        return Err(LoadError::new(
            file,
            Some(field.into()),
            LoadProblem::NoLayers,
        ));
    }
    if let Some(i) = ids.iter().position(|&id| id >= MAX_LAYERS) {
        return Err(LoadError::new(
            file,
            Some(format!("{field}[{i}]")),
            LoadProblem::LayerIdPastLimit { id: ids[i] },
        ));
    }
    if let Some(i) = (1..ids.len()).find(|&i| ids[i] <= ids[i - 1]) {
        return Err(LoadError::new(
            file,
            Some(format!("{field}[{i}]")),
            LoadProblem::LayerIdsNotIncreasing {
                id: ids[i],
                previous: ids[i - 1],
            },
        ));
    }
    Ok(())
}

fn from_olmoe(
    file: &str,
    num_experts: usize,
    layers: Vec<u32>,
    t: Tensor,
    limits: &LoadLimits,
) -> Result<LoadWindow, LoadError> {
    check_layer_ids(file, "layers", &layers)?;
    check_shape(file, "num_experts", (1, layers.len(), num_experts), limits)?;
    match t.shape[..] {
        [l, e] if l == layers.len() && e == num_experts => {
            window(file, layers, num_experts, t.data)
        }
        [l, e] => Err(LoadError::new(
            file,
            Some("counts".into()),
            LoadProblem::CountsShape {
                layers: l,
                experts: e,
                listed_layers: layers.len(),
                num_experts,
            },
        )),
        _ => Err(LoadError::new(
            file,
            Some("counts".into()),
            LoadProblem::Dimensions {
                expected: "expected [layer][expert] counts",
                found: t.shape.len(),
            },
        )),
    }
}

/// Check one trace batch against the header and append its counts.
fn push_batch(
    file: &str,
    where_: &str,
    experts: usize,
    layers: &[u32],
    t: &Tensor,
    out: &mut Vec<f64>,
) -> Result<(), LoadError> {
    match t.shape[..] {
        [l, e] if l == layers.len() && e == experts => {
            out.extend_from_slice(&t.data);
            Ok(())
        }
        [l, e] => Err(LoadError::new(
            file,
            Some(where_.to_string()),
            LoadProblem::TokensShape {
                layers: l,
                experts: e,
                header_layers: layers.len(),
                header_experts: experts,
            },
        )),
        _ => Err(LoadError::new(
            file,
            Some(where_.to_string()),
            LoadProblem::Dimensions {
                expected: "tokens must be [layer][expert] counts",
                found: t.shape.len(),
            },
        )),
    }
}

fn check_trace_header(
    file: &str,
    format: &str,
    experts: usize,
    layers: &[u32],
    limits: &LoadLimits,
) -> Result<(), LoadError> {
    if format != TRACE_FORMAT {
        return Err(LoadError::new(
            file,
            Some("format".into()),
            LoadProblem::UnsupportedFormat {
                format: format.to_string(),
            },
        ));
    }
    if experts == 0 {
        return Err(LoadError::new(
            file,
            Some("experts".into()),
            LoadProblem::NoExperts,
        ));
    }
    check_layer_ids(file, "layers", layers)?;
    check_shape(file, "experts", (1, layers.len(), experts), limits)
}

fn from_any_doc(file: &str, doc: AnyDoc, limits: &LoadLimits) -> Result<LoadWindow, LoadError> {
    if let Some(t) = doc.logical_count {
        return from_logical_count(file, t, limits);
    }
    if let Some(format) = doc.format {
        let missing =
            |field, hint| LoadError::new(file, None, LoadProblem::MissingField { field, hint });
        let experts = doc
            .experts
            .ok_or_else(|| missing("experts", Some("experts per layer")))?;
        let layers = doc
            .layers
            .ok_or_else(|| missing("layers", Some("model layer ids")))?;
        check_trace_header(file, &format, experts, &layers, limits)?;
        let batches = doc.batches.ok_or_else(|| missing("batches", None))?;
        if batches.is_empty() {
            return Err(LoadError::new(
                file,
                Some("batches".into()),
                LoadProblem::NoBatches,
            ));
        }
        check_shape(
            file,
            "batches",
            (batches.len(), layers.len(), experts),
            limits,
        )?;
        let mut counts = Vec::with_capacity(batches.len() * layers.len() * experts);
        for (b, batch) in batches.iter().enumerate() {
            push_batch(
                file,
                &format!("batch {b}"),
                experts,
                &layers,
                &batch.tokens,
                &mut counts,
            )?;
        }
        return window(file, layers, experts, counts);
    }
    if let Some(t) = doc.counts {
        let layers = doc.layers.ok_or_else(|| {
            LoadError::new(
                file,
                None,
                LoadProblem::MissingField {
                    field: "layers",
                    hint: Some("which layers the counts are for"),
                },
            )
        })?;
        let e = t.shape.last().copied().unwrap_or(0);
        return from_olmoe(file, doc.num_experts.unwrap_or(e), layers, t, limits);
    }
    Err(LoadError::new(file, None, LoadProblem::UnknownFormat))
}

fn parse_jsonl(
    file: &str,
    text: &str,
    header: TraceHeader,
    limits: &LoadLimits,
) -> Result<LoadWindow, LoadError> {
    check_trace_header(file, &header.format, header.experts, &header.layers, limits)?;
    let mut counts = Vec::new();
    let mut batches = 0;
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let batch: TraceBatch =
            serde_json::from_str(line).map_err(|e| LoadError::json(file, i, &e))?;
        push_batch(
            file,
            &format!("line {} (batch {batches})", i + 1),
            header.experts,
            &header.layers,
            &batch.tokens,
            &mut counts,
        )?;
        batches += 1;
    }
    if batches == 0 {
        return Err(LoadError::new(file, None, LoadProblem::NoBatchLines));
    }
    window(file, header.layers, header.experts, counts)
}

/// Parse a load file's bytes, sniffing the format, within [`LoadLimits::file`]. `file` names the
/// file in errors.
pub fn parse_load_bytes(file: &str, bytes: &[u8]) -> Result<LoadWindow, LoadError> {
    parse_load_bytes_with(file, bytes, &LoadLimits::file())
}

/// [`parse_load_bytes`] within `limits`: the operator reads users' ConfigMaps with
/// [`LoadLimits::operator`]. Nothing is allocated past the limits, whatever the bytes claim.
pub fn parse_load_bytes_with(
    file: &str,
    bytes: &[u8],
    limits: &LoadLimits,
) -> Result<LoadWindow, LoadError> {
    let _budget = CellBudget::enter(limits.max_cells);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        LoadError::new(
            file,
            Some(format!("byte {}", e.valid_up_to())),
            LoadProblem::NotUtf8,
        )
    })?;
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Err(LoadError::new(file, None, LoadProblem::EmptyFile));
    }
    if trimmed.starts_with('[') {
        let t: Tensor = serde_json::from_str(text).map_err(|e| LoadError::json(file, 0, &e))?;
        return from_logical_count(file, t, limits);
    }
    // JSON Lines trace: the first line alone is a complete trace header without batches.
    // Headers are short; skip the probe on a long first line (a one-line document) so that big
    // files are not parsed twice.
    if let Some(first) = text.lines().next().filter(|l| l.len() < 1 << 16) {
        if let Ok(h) = serde_json::from_str::<TraceHeader>(first) {
            if h.batches.is_none() && h.format == TRACE_FORMAT {
                return parse_jsonl(file, text, h, limits);
            }
        }
    }
    let doc: AnyDoc = serde_json::from_str(text).map_err(|e| LoadError::json(file, 0, &e))?;
    from_any_doc(file, doc, limits)
}

/// Read a load file in any supported format (see the module docs).
pub fn read_load_file(path: impl AsRef<Path>) -> Result<LoadWindow, LoadError> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let bytes = read_bounded(path, MAX_LOAD_FILE_BYTES)?;
    parse_load_bytes(&name, &bytes)
}

/// The bytes of `path`, refused when there are more than `max`: one byte past the limit is read,
/// so that a larger (or endless, e.g. a pipe) file is refused rather than buffered.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, LoadError> {
    let name = path.display().to_string();
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max.saturating_add(1)).read_to_end(&mut bytes))
        .map_err(|e| {
            let message = e.to_string();
            LoadError::new(&name, None, LoadProblem::Unreadable { message })
        })?;
    if bytes.len() as u64 > max {
        return Err(LoadError::new(
            &name,
            None,
            LoadProblem::FileTooLarge { max },
        ));
    }
    Ok(bytes)
}

/// [`read_load_file`], then [`LoadWindow::check_against`] the model the plan is for.
pub fn read_load_file_for(
    path: impl AsRef<Path>,
    model: &ModelShape,
) -> Result<LoadWindow, LoadError> {
    let path = path.as_ref();
    let w = read_load_file(path)?;
    w.check_against(model)
        .map_err(|p| LoadError::new(&path.display().to_string(), None, p))?;
    Ok(w)
}

impl LoadWindow {
    /// Check that this window fits `model`: same experts per layer, MoE layer ids only, no more
    /// layers than the model has MoE layers.
    pub fn check_against(&self, model: &ModelShape) -> Result<(), ShapeError> {
        if self.experts() != model.experts as usize {
            return Err(ShapeError::Experts {
                load: self.experts(),
                model: model.experts,
            });
        }
        if let Some(&layer) = self
            .layer_ids()
            .iter()
            .find(|&&l| l < model.first_moe_layer || l >= model.layers)
        {
            return Err(ShapeError::LayerNotMoe {
                layer,
                first: model.first_moe_layer,
                end: model.layers,
            });
        }
        Ok(())
    }

    /// Sum of all batches, as a one-batch window.
    pub fn totals(&self) -> LoadWindow {
        let mut counts = Vec::with_capacity(self.layers() * self.experts());
        for l in 0..self.layers() {
            counts.extend(self.layer_totals(l));
        }
        LoadWindow::new(self.layer_ids().to_vec(), self.experts(), counts)
            .expect("totals of a valid window are valid")
    }
}

// ---------------------------------------------------------------------------------------------
// Writers.

fn push_num(out: &mut String, x: f64) {
    use std::fmt::Write;
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        let _ = write!(out, "{}", x as i64);
    } else {
        let _ = write!(out, "{x}");
    }
}

fn push_batch_tokens(out: &mut String, w: &LoadWindow, b: usize) {
    out.push_str("{\"tokens\":[");
    for l in 0..w.layers() {
        if l > 0 {
            out.push(',');
        }
        out.push('[');
        for (e, &c) in w.row(b, l).iter().enumerate() {
            if e > 0 {
                out.push(',');
            }
            push_num(out, c);
        }
        out.push(']');
    }
    out.push_str("]}");
}

fn header_fields(w: &LoadWindow, source: Option<&str>) -> String {
    let mut h = format!(
        "\"format\":\"{TRACE_FORMAT}\",\"experts\":{},\"layers\":{}",
        w.experts(),
        serde_json::to_string(w.layer_ids()).unwrap_or_default()
    );
    if let Some(s) = source {
        h.push_str(",\"source\":");
        h.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
    h
}

/// The window as one `moe-load-trace/v1` JSON document, one batch per line. Whole counts are
/// written as integers.
pub fn to_trace_json(w: &LoadWindow, source: Option<&str>) -> String {
    let mut out = format!("{{{},\"batches\":[\n", header_fields(w, source));
    for b in 0..w.batches() {
        push_batch_tokens(&mut out, w, b);
        out.push_str(if b + 1 < w.batches() { ",\n" } else { "\n" });
    }
    out.push_str("]}\n");
    out
}

/// The window as `moe-load-trace/v1` JSON Lines: the header, then one batch per line.
pub fn to_trace_jsonl(w: &LoadWindow, source: Option<&str>) -> String {
    let mut out = format!("{{{}}}\n", header_fields(w, source));
    for b in 0..w.batches() {
        push_batch_tokens(&mut out, w, b);
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Synthetic traces.

/// Correlation of an expert's log-share drift from one batch to the next (AR(1) coefficient).
const DRIFT_CORRELATION: f64 = 0.8;

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    rng.sample::<f64, _>(StandardNormal)
}

/// Cap every share at `cap` (an expert cannot get more than one of a token's top-k slots) and give
/// the excess to the uncapped experts in proportion, until nothing exceeds the cap.
fn cap_shares(q: &mut [f64], cap: f64) {
    for _ in 0..q.len() {
        let over: f64 = q.iter().filter(|&&x| x > cap).map(|x| x - cap).sum();
        if over <= 1e-12 {
            return;
        }
        let free: f64 = q.iter().filter(|&&x| x < cap).sum();
        if free <= 0.0 {
            return;
        }
        for x in q.iter_mut() {
            if *x > cap {
                *x = cap;
            } else {
                *x += over * *x / free;
            }
        }
    }
}

/// Draw integer counts summing exactly to `total` with expected shares `q` (which sum to 1):
/// a normal approximation of the multinomial (binomial variance per expert), then largest-remainder
/// rounding to the exact total, with no expert above `max_each` (one slot per token). `frac` and
/// `order` are scratch buffers.
#[allow(clippy::too_many_arguments)]
fn draw_counts(
    rng: &mut ChaCha8Rng,
    q: &[f64],
    total: u64,
    max_each: u64,
    out: &mut [f64],
    frac: &mut Vec<f64>,
    order: &mut Vec<usize>,
) {
    let t = total as f64;
    let mut sum = 0.0;
    for (o, &p) in out.iter_mut().zip(q) {
        let mu = t * p;
        *o = (mu + (mu * (1.0 - p)).max(0.0).sqrt() * normal(rng)).max(0.0);
        sum += *o;
    }
    if sum <= 0.0 {
        out.iter_mut().zip(q).for_each(|(o, &p)| *o = t * p);
        sum = t;
    }
    let scale = t / sum;
    frac.clear();
    let mut floor_sum = 0u64;
    for o in out.iter_mut() {
        let x = *o * scale;
        let f = x.floor();
        frac.push(x - f);
        *o = f;
        floor_sum += f as u64;
    }
    let rest = total.saturating_sub(floor_sum) as usize;
    order.clear();
    order.extend(0..out.len());
    order.sort_by(|&a, &b| frac[b].total_cmp(&frac[a]).then(a.cmp(&b)));
    for &e in order.iter().take(rest) {
        out[e] += 1.0;
    }
    // Noise can push an expert past `max_each` (one slot per token); move the excess to the
    // experts with room, in a fixed order.
    let max_each = max_each as f64;
    let mut excess = 0.0;
    for o in out.iter_mut() {
        if *o > max_each {
            excess += *o - max_each;
            *o = max_each;
        }
    }
    for o in out.iter_mut() {
        if excess <= 0.0 {
            break;
        }
        let add = (max_each - *o).min(excess);
        *o += add;
        excess -= add;
    }
}

/// Per-batch multiplicative drift of every expert's share: `exp(x)` with `x` an AR(1) process per
/// expert (correlation [`DRIFT_CORRELATION`] between consecutive batches, stationary standard
/// deviation `drift`), so `drift = 0.3` moves shares by about +-30% with runs of similar batches.
struct Drift {
    x: Vec<f64>,
    sigma: f64,
}

impl Drift {
    fn new(rng: &mut ChaCha8Rng, experts: usize, sigma: f64) -> Self {
        Self {
            x: (0..experts).map(|_| sigma * normal(rng)).collect(),
            sigma,
        }
    }
    fn step(&mut self, rng: &mut ChaCha8Rng) {
        let k = (1.0 - DRIFT_CORRELATION * DRIFT_CORRELATION).sqrt() * self.sigma;
        for x in &mut self.x {
            *x = DRIFT_CORRELATION * *x + k * normal(rng);
        }
    }
    /// `q_e * exp(x_e)`, renormalised to sum 1, into `out`.
    fn apply(&self, q: &[f64], out: &mut [f64]) {
        let mut s = 0.0;
        for ((o, &p), &x) in out.iter_mut().zip(q).zip(&self.x) {
            *o = p * x.exp();
            s += *o;
        }
        out.iter_mut().for_each(|o| *o /= s);
    }
}

/// Why a synthetic window could not be generated ([`synthetic_window`],
/// [`sample_batches_from_totals`]); each names the argument.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SyntheticError {
    /// `names` lists the arguments that must be positive.
    #[error("{names} must all be at least 1")]
    Zero { names: &'static str },
    #[error("top_k ({top_k}) must be between 1 and the expert count ({experts})")]
    TopK { top_k: usize, experts: usize },
    #[error("skew ({skew}) and drift ({drift}) must be finite and >= 0")]
    SkewDrift { skew: f64, drift: f64 },
    #[error("drift ({drift}) must be finite and >= 0")]
    Drift { drift: f64 },
    /// The window would be past [`LoadLimits::file`] or `plan::limits`.
    #[error("synthetic trace: size: {0}")]
    Size(LoadProblem),
    #[error(
        "tokens_per_batch ({tokens_per_batch}) x top_k ({top_k}) is more than the limit of \
         {max:e} tokens per cell (plan::limits::MAX_TOKEN_COUNT)",
        max = MAX_TOKEN_COUNT
    )]
    TokensPerCell { tokens_per_batch: u64, top_k: usize },
    #[error(
        "tokens_per_batch ({tokens_per_batch}) is more than the limit of {max:e} tokens per cell \
         (plan::limits::MAX_TOKEN_COUNT)",
        max = MAX_TOKEN_COUNT
    )]
    TokensPerBatch { tokens_per_batch: u64 },
    /// A layer of the totals with no tokens: there are no shares to sample.
    #[error("layer {layer} has no load to sample from")]
    NoLoad { layer: u32 },
    #[error(transparent)]
    Window(#[from] WindowError),
}

/// A seeded synthetic load window shaped like real MoE traces (e.g. DeepSeek-V3's).
///
/// Model, per layer `l`:
/// - a skew exponent `s_l = skew * m_l` with `m_l` lognormal (median 1, sigma 0.6), so that a few
///   layers are much more skewed than the rest, as in DeepSeek-V3 traces;
/// - expert popularity `p_e ∝ rank_e^(-s_l) * exp(0.3 z_e)`: Zipf-like over a random permutation of
///   the experts (the hot experts differ between layers) with lognormal noise;
/// - per batch, each expert's share is multiplied by `exp(x_be)` where `x_be` is an AR(1) process over
///   batches with correlation 0.8 and standard deviation `drift` (tens of percent for 0.2 to 0.4);
/// - shares are capped at `1 / top_k` (a token uses an expert at most once) and counts summing to
///   exactly `tokens_per_batch * top_k` per layer are drawn (normal approximation of a multinomial,
///   largest-remainder rounding).
///
/// Layers get model ids `0..layers`. Same arguments, same window.
///
/// Per-layer max/mean expert load for 58 layers x 256 experts, top-8 (seed 1, no drift):
///
/// | skew | min | median | p90 | max |
/// |---|---|---|---|---|
/// | 0.2 | 2.0 | 2.9 | 5.6 | 30.0 |
/// | 0.3 | 2.0 | 3.7 | 10.8 | 31.9 |
/// | 0.4 | 2.2 | 5.3 | 20.9 | 31.9 |
/// | 0.5 | 2.5 | 7.2 | 28.1 | 32.0 |
///
/// (32 is the top-8 cap: one expert gets at most every token.)
#[allow(clippy::too_many_arguments)]
pub fn synthetic_window(
    layers: usize,
    experts: usize,
    batches: usize,
    tokens_per_batch: u64,
    top_k: usize,
    skew: f64,
    drift: f64,
    seed: u64,
) -> Result<LoadWindow, SyntheticError> {
    if layers == 0 || experts == 0 || batches == 0 || tokens_per_batch == 0 {
        return Err(SyntheticError::Zero {
            names: "layers, experts, batches and tokens_per_batch",
        });
    }
    if top_k == 0 || top_k > experts {
        return Err(SyntheticError::TopK { top_k, experts });
    }
    if !(skew.is_finite() && skew >= 0.0 && drift.is_finite() && drift >= 0.0) {
        return Err(SyntheticError::SkewDrift { skew, drift });
    }
    check_synthetic_size(batches, layers, experts)?;
    let per_layer = tokens_per_batch
        .checked_mul(top_k as u64)
        .filter(|&t| t as f64 <= MAX_TOKEN_COUNT)
        .ok_or(SyntheticError::TokensPerCell {
            tokens_per_batch,
            top_k,
        })?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut base = Vec::with_capacity(layers);
    for _ in 0..layers {
        let s = skew * (0.6 * normal(&mut rng)).exp();
        let mut perm: Vec<usize> = (0..experts).collect();
        for i in (1..experts).rev() {
            perm.swap(i, rng.random_range(0..=i));
        }
        let mut q: Vec<f64> = perm
            .iter()
            .map(|&r| ((r + 1) as f64).powf(-s) * (0.3 * normal(&mut rng)).exp())
            .collect();
        let sum: f64 = q.iter().sum();
        q.iter_mut().for_each(|x| *x /= sum);
        base.push(q);
    }
    sample_batches(
        &base,
        (0..layers as u32).collect(),
        batches,
        per_layer,
        top_k as u64,
        drift,
        &mut rng,
    )
}

/// A generated window is held like a file's: refuse shapes past [`LoadLimits::file`] and
/// `plan::limits` before allocating them.
fn check_synthetic_size(
    batches: usize,
    layers: usize,
    experts: usize,
) -> Result<(), SyntheticError> {
    match shape_problem((batches, layers, experts), &LoadLimits::file()) {
        Some(p) => Err(SyntheticError::Size(p)),
        None => Ok(()),
    }
}

/// Shared by [`synthetic_window`] and [`sample_batches_from_totals`]: per-batch drifted shares of
/// `base[l]`, capped at `1 / top_k`, drawn to `per_layer_total` counts (at most
/// `per_layer_total / top_k` each).
fn sample_batches(
    base: &[Vec<f64>],
    layer_ids: Vec<u32>,
    batches: usize,
    per_layer_total: u64,
    top_k: u64,
    drift: f64,
    rng: &mut ChaCha8Rng,
) -> Result<LoadWindow, SyntheticError> {
    let cap = 1.0 / top_k as f64;
    let max_each = per_layer_total / top_k;
    let layers = base.len();
    let experts = base[0].len();
    let mut drifts: Vec<Drift> = (0..layers)
        .map(|_| Drift::new(rng, experts, drift))
        .collect();
    let mut counts = vec![0.0; batches * layers * experts];
    let (mut q, mut frac, mut order) = (vec![0.0; experts], Vec::new(), Vec::new());
    for b in 0..batches {
        for l in 0..layers {
            if b > 0 {
                drifts[l].step(rng);
            }
            drifts[l].apply(&base[l], &mut q);
            cap_shares(&mut q, cap);
            let start = (b * layers + l) * experts;
            draw_counts(
                rng,
                &q,
                per_layer_total,
                max_each,
                &mut counts[start..start + experts],
                &mut frac,
                &mut order,
            );
        }
    }
    Ok(LoadWindow::new(layer_ids, experts, counts)?)
}

/// Per-batch windows drawn around aggregate counts (e.g. the OLMoE/Mixtral files), for held-out
/// evaluation: expert shares are the totals' shares of each layer (all batches of `totals` summed),
/// drifted per batch as in [`synthetic_window`], and each batch holds `tokens_per_batch` routed
/// (token, expert) assignments per layer, i.e. tokens x top-k. Layer ids are kept.
pub fn sample_batches_from_totals(
    totals: &LoadWindow,
    batches: usize,
    tokens_per_batch: u64,
    drift: f64,
    seed: u64,
) -> Result<LoadWindow, SyntheticError> {
    if batches == 0 || tokens_per_batch == 0 {
        return Err(SyntheticError::Zero {
            names: "batches and tokens_per_batch",
        });
    }
    if !(drift.is_finite() && drift >= 0.0) {
        return Err(SyntheticError::Drift { drift });
    }
    check_synthetic_size(batches, totals.layers(), totals.experts())?;
    if tokens_per_batch as f64 > MAX_TOKEN_COUNT {
        return Err(SyntheticError::TokensPerBatch { tokens_per_batch });
    }
    let mut base = Vec::with_capacity(totals.layers());
    for l in 0..totals.layers() {
        let t = totals.layer_totals(l);
        let s: f64 = t.iter().sum();
        if s <= 0.0 {
            return Err(SyntheticError::NoLoad {
                layer: totals.layer_ids()[l],
            });
        }
        base.push(t.into_iter().map(|x| x / s).collect::<Vec<_>>());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    sample_batches(
        &base,
        totals.layer_ids().to_vec(),
        batches,
        tokens_per_batch,
        1,
        drift,
        &mut rng,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::model::Dtype;

    fn parse(s: &str) -> Result<LoadWindow, LoadError> {
        parse_load_bytes("t.json", s.as_bytes())
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn sglang_two_and_three_dims_drop_dense_layers() {
        let w = parse(r#"{"logical_count": [[0,0,0],[1,2,3],[0,0,0],[4,5.5,0]]}"#).unwrap();
        assert_eq!(w.layer_ids(), &[1, 3]);
        assert_eq!((w.batches(), w.experts()), (1, 3));
        assert_eq!(w.row(0, 1), &[4.0, 5.5, 0.0]);
        // Layer 1 is zero in batch 0 but not in batch 1, so it stays.
        let w = parse(r#"{"logical_count": [[[0,0],[0,0],[1,1]],[[0,0],[2,0],[3,1]]]}"#).unwrap();
        assert_eq!(w.layer_ids(), &[1, 2]);
        assert_eq!(w.batches(), 2);
        assert_eq!(w.row(0, 0), &[0.0, 0.0]);
        assert_eq!(w.row(1, 1), &[3.0, 1.0]);
        // A bare array reads as logical_count.
        assert_eq!(parse("[[1,2],[3,4]]").unwrap().layer_ids(), &[0, 1]);
    }

    #[test]
    fn olmoe_and_mixtral_files_read() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/traces/olmoe-arxiv.json"
        );
        let w = read_load_file(dir).unwrap();
        assert_eq!(
            (w.layer_ids(), w.experts(), w.batches()),
            (&[0u32, 7, 15][..], 64, 1)
        );
        assert_eq!(w.row(0, 0)[0], 204013.0);
        // Every OLMoE top-k layer counts 208,896 tokens x 8.
        for l in 0..3 {
            assert_eq!(w.layer_totals(l).iter().sum::<f64>(), 208896.0 * 8.0);
        }
        let m = parse(r#"{"model":"mistralai/Mixtral-8x7B-v0.1","num_experts":2,"top_k_counted":2,"layers":[0,7],"counts":[[1,2],[3,4]],"tokens_per_layer":5}"#).unwrap();
        assert_eq!(m.layer_ids(), &[0, 7]);
    }

    #[test]
    fn trace_json_and_jsonl_round_trip() {
        let w = synthetic_window(3, 8, 5, 100, 2, 1.0, 0.3, 7).unwrap();
        let j = to_trace_json(&w, Some("test \"quoted\""));
        assert_eq!(parse(&j).unwrap(), w);
        let jl = to_trace_jsonl(&w, None);
        assert_eq!(parse(&jl).unwrap(), w);
        let ids = LoadWindow::new(vec![3, 5], 2, vec![0.5, 1.0, 2.0, 0.0]).unwrap();
        assert_eq!(parse(&to_trace_jsonl(&ids, None)).unwrap(), ids);
        assert!(to_trace_json(&ids, None).contains("[[0.5,1],[2,0]]"));
    }

    #[test]
    fn malformed_inputs_name_the_position_and_problem() {
        let e = err(r#"{"logical_count": [[1,2,3],[1,2]]}"#);
        assert!(
            e.contains("[1]: 2 entries where the first list at this depth has 3"),
            "{e}"
        );
        assert!(e.contains("line 1 column"), "{e}");
        let e = err(r#"{"logical_count": [[1,-2,3]]}"#);
        assert!(e.contains("[0][1]: count -2 is negative"), "{e}");
        let e = err(r#"{"logical_count": [[1,NaN,3]]}"#);
        assert!(e.starts_with("t.json: line 1 column"), "{e}");
        let e = err(r#"{"logical_count": [[1,"x",3]]}"#);
        assert!(e.contains("invalid type: string"), "{e}");
        let e = err(r#"{"logical_count": [[1,2],3]}"#);
        assert!(e.contains("[1]: expected a list, found a number"), "{e}");
        let e = err(r#"{"logical_count": [[[[1]]]]}"#);
        assert!(e.contains("deeper"), "{e}");
        let e = err(r#"{"logical_count": []}"#);
        assert!(e.contains("empty list"), "{e}");
        let e = err(r#"{"logical_count": [[0,0],[0,0]]}"#);
        assert!(e.contains("all zero"), "{e}");
        assert_eq!(err("   \n"), "t.json: the file is empty");
        assert!(err("hello").contains("line 1 column 1"));
        assert!(err(r#"{"foo": 1}"#).contains("not a known load format"));
        assert!(parse_load_bytes("b.bin", &[0xff, 0xfe])
            .unwrap_err()
            .to_string()
            .contains("not UTF-8"));
        let e = err(r#"{"format":"moe-load-trace/v2","experts":2,"layers":[0],"batches":[]}"#);
        assert!(e.contains("format: unsupported format"), "{e}");
        let e = err(
            r#"{"format":"moe-load-trace/v1","experts":2,"layers":[0],"batches":[{"tokens":[[1,2]]},{"tokens":[[1,2,3]]}]}"#,
        );
        assert!(
            e.contains("batch 1: tokens is 1 layers x 3 experts but the header says 1 layers x 2"),
            "{e}"
        );
        let e = err(
            r#"{"format":"moe-load-trace/v1","experts":2,"layers":[3,3],"batches":[{"tokens":[[1,2],[1,2]]}]}"#,
        );
        assert!(
            e.contains("layers[1]: layer ids must be strictly increasing"),
            "{e}"
        );
        let e = err(r#"{"format":"moe-load-trace/v1","experts":2,"layers":[0],"batches":[]}"#);
        assert!(e.contains("batches: no batches"), "{e}");
        let jl = "{\"format\":\"moe-load-trace/v1\",\"experts\":2,\"layers\":[0]}\n{\"tokens\":[[1,2]]}\n{\"tokens\":[[1,-2]]}\n";
        let e = err(jl);
        assert!(
            e.contains("line 3 column") && e.contains("[0][1]: count -2"),
            "{e}"
        );
        let e = err("{\"format\":\"moe-load-trace/v1\",\"experts\":2,\"layers\":[0]}\n\n");
        assert!(e.contains("not followed by any batch"), "{e}");
        let e = err(r#"{"num_experts":3,"layers":[0,7],"counts":[[1,2,3]]}"#);
        assert!(
            e.contains("counts: counts is 1 x 3 but the file lists 2 layers"),
            "{e}"
        );
        let e = parse(r#"{"num_experts":3,"layers":[0,7],"counts":[[1,2,3]]}"#).unwrap_err();
        assert_eq!(e.position.as_deref(), Some("counts"));
        assert_eq!(
            e.problem,
            LoadProblem::CountsShape {
                layers: 1,
                experts: 3,
                listed_layers: 2,
                num_experts: 3
            }
        );
        let e = parse(r#"{"format":"moe-load-trace/v1","layers":[0],"batches":[]}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.json: missing field \"experts\" (experts per layer)"
        );
        // On two lines, so that the first is no JSON Lines header.
        let e =
            parse("{\"format\":\"moe-load-trace/v1\",\n\"experts\":2,\"layers\":[0]}").unwrap_err();
        assert_eq!(
            e.problem,
            LoadProblem::MissingField {
                field: "batches",
                hint: None
            }
        );
        assert_eq!(e.to_string(), "t.json: missing field \"batches\"");
        let e = read_load_file("/nonexistent/load.json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/load.json: cannot read"), "{e}");
    }

    #[test]
    fn claimed_sizes_are_bounded_before_allocating() {
        // Before: 1e12 experts aborted the process (allocation of 8 TB), u64::MAX panicked on
        // the overflowing product.
        let trace = |experts: &str, layers: &str| {
            format!(
                r#"{{"format":"moe-load-trace/v1","experts":{experts},"layers":{layers},"batches":[{{"tokens":[[1,2]]}}]}}"#
            )
        };
        let e = err(&trace("1000000000000", "[0]"));
        assert!(
            e.starts_with(
                "t.json: experts: 1000000000000 experts per layer is more than the limit of 1024"
            ),
            "{e}"
        );
        let e = err(&trace("18446744073709551615", "[0,1]"));
        assert!(e.contains("MAX_EXPERTS"), "{e}");
        let e = err(&trace("2", "[0, 4294967295]"));
        assert!(
            e.contains("layers[1]: layer id 4294967295 is past the limit of 512"),
            "{e}"
        );
        // The same in the JSON Lines header.
        let e = err("{\"format\":\"moe-load-trace/v1\",\"experts\":18446744073709551615,\"layers\":[0]}\n{\"tokens\":[[1]]}\n");
        assert!(
            e.contains("experts: 18446744073709551615 experts per layer is more"),
            "{e}"
        );
        // OLMoE's num_experts and SGLang's row length.
        let e = err(r#"{"num_experts":1000000000000,"layers":[0],"counts":[[1]]}"#);
        assert!(e.contains("num_experts: 1000000000000 experts"), "{e}");
        let wide = format!("{{\"logical_count\": [[{}]]}}", vec!["1"; 1025].join(","));
        let e = err(&wide);
        assert!(e.contains("logical_count: 1025 experts per layer"), "{e}");
    }

    #[test]
    fn cells_are_bounded_over_the_whole_document() {
        let small = LoadLimits { max_cells: 5 };
        let one = |s: &str| parse_load_bytes_with("cm/key", s.as_bytes(), &small);
        assert!(one(r#"{"logical_count": [[1,2],[3,4]]}"#).is_ok());
        // Three batches of two cells: each array is small, the document is not.
        let doc = r#"{"format":"moe-load-trace/v1","experts":2,"layers":[0],"batches":[{"tokens":[[1,2]]},{"tokens":[[1,2]]},{"tokens":[[1,2]]}]}"#;
        let e = one(doc).unwrap_err().to_string();
        assert!(
            e.starts_with("cm/key: line 1 column") && e.contains("more than 5 counts in this load"),
            "{e}"
        );
        let jl = "{\"format\":\"moe-load-trace/v1\",\"experts\":2,\"layers\":[0]}\n{\"tokens\":[[1,2]]}\n{\"tokens\":[[1,2]]}\n{\"tokens\":[[1,2]]}\n";
        let e = one(jl).unwrap_err().to_string();
        assert!(
            e.contains("line 4 column") && e.contains("more than 5 counts"),
            "{e}"
        );
        // A header that alone is past the limit is refused before any batch is read, and a claimed
        // shape past the limit before anything is sized by it.
        let e = one("{\"format\":\"moe-load-trace/v1\",\"experts\":3,\"layers\":[0,1]}\n{\"tokens\":[[1,2,3],[1,2,3]]}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("experts: 1 batches x 2 layers x 3 experts is more than 5 counts"),
            "{e}"
        );
        let e = one(r#"{"format":"moe-load-trace/v1","experts":3,"layers":[0,1],"batches":[{"tokens":[[1]]}]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("experts: 1 batches x 2 layers x 3 experts is more than 5 counts"),
            "{e}"
        );
        // The budget is per parse: the next parse starts afresh, and the file limits are larger.
        assert!(one(r#"{"logical_count": [[1,2],[3,4]]}"#).is_ok());
        assert!(parse(doc).is_ok());
        assert_eq!(LoadLimits::operator().max_cells, MAX_LOAD_CELLS_OPERATOR);
        assert_eq!(LoadLimits::file().max_cells, MAX_LOAD_CELLS_FILE);
        let big = r#"{"logical_count": [[[1]]]}"#
            .replace("[[[1]]]", &format!("[{}]", ["[[1]]"; 6].join(",")));
        assert!(one(&big).is_err());
    }

    #[test]
    fn huge_counts_are_refused_so_sums_stay_finite() {
        // Before: two counts of 1e308 made a plan whose windowTokens was written as null.
        let e = err(r#"{"logical_count": [[1e308,1e308]]}"#);
        assert!(
            e.contains("[0][0]: count 1e308 is more than the limit of 1e15 tokens"),
            "{e}"
        );
        let e = err(
            r#"{"format":"moe-load-trace/v1","experts":2,"layers":[0],"batches":[{"tokens":[[1e16,1]]}]}"#,
        );
        assert!(e.contains("MAX_TOKEN_COUNT"), "{e}");
        assert!(parse(r#"{"logical_count": [[1e15,1e15]]}"#).is_ok());
        assert!(LoadWindow::new(vec![0], 1, vec![2e15]).is_err());
    }

    #[test]
    fn files_past_the_byte_limit_are_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(&path, r#"{"logical_count": [[1,2]]}"#).unwrap();
        assert_eq!(read_bounded(&path, 64).unwrap().len(), 26);
        let e = read_bounded(&path, 25).unwrap_err().to_string();
        assert!(e.contains("larger than the limit of 25 bytes"), "{e}");
    }

    #[test]
    fn synthetic_sizes_are_bounded() {
        let e = synthetic_window(512, 1024, 1 << 20, 10, 1, 1.0, 0.0, 0).unwrap_err();
        assert_eq!(
            e,
            SyntheticError::Size(LoadProblem::TooManyCells {
                batches: 1 << 20,
                layers: 512,
                experts: 1024,
                max: MAX_LOAD_CELLS_FILE
            })
        );
        assert!(
            e.to_string().contains("is more than 134217728 counts"),
            "{e}"
        );
        let e = synthetic_window(1, 4, 1, u64::MAX, 2, 1.0, 0.0, 0).unwrap_err();
        assert!(
            matches!(e, SyntheticError::TokensPerCell { top_k: 2, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("MAX_TOKEN_COUNT"), "{e}");
    }

    fn model(experts: u32) -> ModelShape {
        ModelShape {
            layers: 16,
            first_moe_layer: 1,
            experts,
            top_k: 8,
            hidden_size: 2048,
            expert_intermediate_size: 1024,
            dtype: Dtype::Bf16,
        }
    }

    #[test]
    fn check_against_the_model() {
        let w = LoadWindow::new(vec![1, 15], 4, vec![1.0; 8]).unwrap();
        w.check_against(&model(4)).unwrap();
        let e = w.check_against(&model(8)).unwrap_err();
        assert_eq!(e, ShapeError::Experts { load: 4, model: 8 });
        assert!(
            e.to_string()
                .contains("4 experts per layer but the model has 8"),
            "{e}"
        );
        let dense = LoadWindow::new(vec![0, 5], 4, vec![1.0; 8]).unwrap();
        let e = dense.check_against(&model(4)).unwrap_err();
        assert!(
            e.to_string()
                .contains("layer 0 of the load is not a MoE layer"),
            "{e}"
        );
        let past = LoadWindow::new(vec![16], 4, vec![1.0; 4]).unwrap();
        assert!(past.check_against(&model(4)).is_err());
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/traces/olmoe-arxiv.json"
        );
        let e = read_load_file_for(path, &model(32))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("olmoe-arxiv.json: the load has 64 experts"),
            "{e}"
        );
    }

    #[test]
    fn synthetic_windows_have_exact_totals_skew_and_drift() {
        let w = synthetic_window(6, 64, 40, 4096, 8, 1.0, 0.3, 42).unwrap();
        assert_eq!(
            w,
            synthetic_window(6, 64, 40, 4096, 8, 1.0, 0.3, 42).unwrap()
        );
        assert_ne!(
            w,
            synthetic_window(6, 64, 40, 4096, 8, 1.0, 0.3, 43).unwrap()
        );
        let mut max_over_mean = Vec::new();
        for l in 0..6 {
            for b in 0..40 {
                let r = w.row(b, l);
                assert_eq!(r.iter().sum::<f64>(), 4096.0 * 8.0);
                assert!(r.iter().all(|&c| c.fract() == 0.0 && c <= 4096.0));
            }
            let t = w.layer_totals(l);
            let mean = t.iter().sum::<f64>() / 64.0;
            max_over_mean.push(t.iter().cloned().fold(0.0, f64::max) / mean);
        }
        // Skewed (max/mean well above 1), and layers differ in skew.
        assert!(max_over_mean.iter().all(|&m| m > 1.5), "{max_over_mean:?}");
        let (lo, hi) = max_over_mean
            .iter()
            .fold((f64::MAX, 0.0f64), |(a, b), &m| (a.min(m), b.max(m)));
        assert!(hi / lo > 1.3, "{max_over_mean:?}");
        // Drift: in the least skewed layer, the 5th most loaded expert (well below the 1/top_k cap)
        // has a per-batch share that moves by tens of percent around its mean.
        let l = (0..6)
            .min_by(|&a, &b| max_over_mean[a].total_cmp(&max_over_mean[b]))
            .unwrap();
        let t = w.layer_totals(l);
        let mut by_load: Vec<usize> = (0..64).collect();
        by_load.sort_by(|&a, &b| t[b].total_cmp(&t[a]));
        let shares: Vec<f64> = (0..40)
            .map(|b| w.row(b, l)[by_load[4]] / (4096.0 * 8.0))
            .collect();
        let mean = shares.iter().sum::<f64>() / 40.0;
        let sd = (shares.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / 40.0).sqrt();
        assert!(
            sd / mean > 0.1 && sd / mean < 0.8,
            "relative sd {}",
            sd / mean
        );
        // No drift: shares stay within sampling noise.
        let still = synthetic_window(1, 64, 40, 4096, 8, 1.0, 0.0, 42).unwrap();
        let t = still.layer_totals(0);
        let hot = (0..64).max_by(|&a, &b| t[a].total_cmp(&t[b])).unwrap();
        let shares: Vec<f64> = (0..40).map(|b| still.row(b, 0)[hot]).collect();
        let mean = shares.iter().sum::<f64>() / 40.0;
        let sd = (shares.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / 40.0).sqrt();
        assert!(sd / mean < 0.05, "relative sd without drift {}", sd / mean);
        assert!(synthetic_window(1, 4, 1, 1, 5, 1.0, 0.1, 0).is_err());
    }

    #[test]
    fn batches_sampled_from_totals_follow_the_totals() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/traces/olmoe-arxiv.json"
        );
        let totals = read_load_file(path).unwrap();
        let w = sample_batches_from_totals(&totals, 200, 8192, 0.2, 1).unwrap();
        assert_eq!(
            (w.layer_ids(), w.batches(), w.experts()),
            (totals.layer_ids(), 200, 64)
        );
        for l in 0..3 {
            assert!((0..200).all(|b| w.row(b, l).iter().sum::<f64>() == 8192.0));
            let (a, b) = (totals.layer_totals(l), w.layer_totals(l));
            let (sa, sb): (f64, f64) = (a.iter().sum(), b.iter().sum());
            for e in 0..64 {
                // Hot experts keep their share within 15% over 200 batches (drift sd 0.2 with
                // correlation 0.8 leaves about 22 independent batches: sd of the mean ~4%).
                if a[e] / sa > 0.03 {
                    let ratio = (b[e] / sb) / (a[e] / sa);
                    assert!(
                        (0.85..1.15).contains(&ratio),
                        "layer {l} expert {e}: ratio {ratio}"
                    );
                }
            }
        }
    }

    #[test]
    fn synthetic_small_example_is_reproducible() {
        // examples/traces/README.md documents this command; the file must match it.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/traces/synthetic-small.trace.json"
        );
        let file = std::fs::read_to_string(path).unwrap();
        let w = synthetic_window(4, 16, 8, 256, 2, 1.2, 0.3, 2026).unwrap();
        assert_eq!(file, to_trace_json(&w, Some(SYNTHETIC_SMALL_SOURCE)));
        assert_eq!(read_load_file(path).unwrap(), w);
    }

    /// The `source` written into examples/traces/synthetic-small.trace.json.
    const SYNTHETIC_SMALL_SOURCE: &str =
        "synthetic_window(layers=4, experts=16, batches=8, tokens_per_batch=256, top_k=2, skew=1.2, drift=0.3, seed=2026)";

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_load_bytes("r", &bytes);
        }

        #[test]
        fn json_like_noise_never_panics(s in r#"[\[\]{}",:0-9.\-e a-z\n]{0,120}"#) {
            let _ = parse_load_bytes("r", s.as_bytes());
            let _ = parse_load_bytes("r", format!("{{\"logical_count\": {s}").as_bytes());
            let _ = parse_load_bytes("r", format!("{{\"format\":\"moe-load-trace/v1\",\"experts\":2,\"layers\":[0]}}\n{s}").as_bytes());
        }
    }
}
