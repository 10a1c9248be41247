//! The dispatch protocol between the router (the serving engine, or `moectl loadgen`) and a worker.
//!
//! # Wire format (version 1)
//!
//! Every message is one frame: a little-endian `u32` body length, then the body. The length does
//! not count its own 4 bytes and must not exceed the receiver's maximum frame size (the worker's
//! `--max-frame-bytes`, 64 MiB by default); a larger length is refused before any body byte is read.
//! All integers and floats are little-endian.
//!
//! ```text
//! body   = header request | header output | header error
//! header = magic "MOED" (4 bytes) | version u16 = 1 | kind u8 | dtype u8 | request_id u64     (16 bytes)
//!          kind: 1 = dispatch request, 2 = expert output, 3 = error
//!          dtype: request 1 = bf16 hidden vectors; output 2 = f32; error 0
//!          request_id: chosen by the client, echoed in the reply
//! request = rank u32 | layer u32 | rows u32 | hidden u32                                       (16 bytes)
//!           then `rows` times: expert u32 | router_weight f32 | hidden x bf16
//! output  = rank u32 | layer u32 | rows u32 | hidden u32                                       (16 bytes)
//!           then rows x hidden f32: row r is router_weight_r * FFN_{expert_r}(x_r)
//! error   = code u16 | reserved u16 = 0 | message_len u32 | message (UTF-8, at most 4 KiB)
//! ```
//!
//! - `rank` is the global expert-parallel rank the rows are for. A worker serves one node, ranks
//!   `node * gpusPerNode .. (node + 1) * gpusPerNode`, on one dispatch port; the rank field picks
//!   the GPU (and its resident expert set). A router keeps one connection per rank.
//! - `layer` is the model layer index (as in the plan), not the index among MoE layers.
//! - Outputs are f32: the backends accumulate in f32 and the router sums each token's top-k outputs,
//!   so rounding them to bf16 before that sum would add error for a 2x smaller reply.
//! - Replies on one connection come in request order; a client may pipeline requests.
//! - A frame that cannot be decoded (bad magic, version, kind or dtype; sizes that disagree with the
//!   length; non-finite router weights or hidden values; truncated; oversized) gets an error reply
//!   and the worker closes that connection. A well-formed request that cannot be served (rank not on
//!   this worker, wrong hidden size, expert not resident, no plan yet, compute failure) gets an error
//!   reply and the connection stays open.
//! - A frame must arrive whole within the worker's frame-read timeout of its first byte, and a
//!   reply must be taken by the client within its write timeout; otherwise the worker closes the
//!   connection (a stalled frame gets a `malformed` reply first). A connection with no frame for the
//!   idle timeout is closed without a reply. A request that waits past its frame-read timeout for the
//!   worker's in-flight byte budget, or a connection over the worker's connection cap, gets a `busy`
//!   reply (code 9) and is closed: the client may retry.
//!
//! Encoding and decoding here are pure functions over byte slices; decoding never panics on any
//! input (property-tested below). The async helpers at the end only move frames over a stream.

use half::bf16;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Frame magic, the first 4 body bytes.
pub const MAGIC: [u8; 4] = *b"MOED";
/// Protocol version this code speaks.
pub const VERSION: u16 = 1;
/// Bytes of the common header (magic, version, kind, dtype, request id).
pub const HEADER_LEN: usize = 16;
/// Bytes of the request/output sub-header (rank, layer, rows, hidden).
pub const SHAPE_LEN: usize = 16;
/// Longest error message carried in an error reply; longer ones are cut at a char boundary.
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// Default maximum frame size (body bytes).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 << 20;
/// Bytes at the front of a request body that identify it and fix its size (header and shape):
/// enough to refuse a frame before its body is buffered.
pub const REQUEST_HEAD_LEN: usize = HEADER_LEN + SHAPE_LEN;

const KIND_REQUEST: u8 = 1;
const KIND_OUTPUT: u8 = 2;
const KIND_ERROR: u8 = 3;
const DTYPE_BF16: u8 = 1;
const DTYPE_F32: u8 = 2;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame body of {len} bytes is shorter than the {need}-byte header")]
    TooShort { len: usize, need: usize },
    #[error("bad magic {0:02x?}: expected \"MOED\" (is this a dispatch-protocol client?)")]
    BadMagic([u8; 4]),
    #[error("protocol version {0} is not supported (this worker speaks version {VERSION})")]
    UnsupportedVersion(u16),
    #[error("frame kind {found}: expected {expected}")]
    UnexpectedKind { expected: &'static str, found: u8 },
    #[error("dtype code {found}: expected {expected}")]
    UnsupportedDtype { expected: &'static str, found: u8 },
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error(
        "{rows} rows of hidden size {hidden} need {expected} payload bytes, the frame has {found}"
    )]
    LengthMismatch {
        rows: u32,
        hidden: u32,
        expected: u128,
        found: usize,
    },
    #[error("hidden size is 0")]
    ZeroHidden,
    #[error("row {row}: {what} is not finite")]
    NonFinite { row: u32, what: &'static str },
    #[error("error reply message of {len} bytes runs past the frame end ({available} bytes left)")]
    MessageLength { len: u32, available: usize },
    #[error("error reply message is not UTF-8")]
    MessageNotUtf8,
}

/// Error codes carried in error replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame could not be decoded; the connection is closed.
    Malformed,
    /// The frame exceeded the maximum size; the connection is closed.
    FrameTooLarge,
    /// The rank is not served by this worker.
    WrongRank,
    /// The hidden size differs from the model's.
    HiddenSizeMismatch,
    /// A row names an expert this rank does not hold for that layer.
    NotResident,
    /// No plan has been applied yet.
    NotReady,
    /// The compute backend failed.
    Compute,
    /// Something inside the worker failed (a bug or a crashed compute thread).
    Internal,
    /// The worker could not take the request in time (in-flight byte budget full past the frame
    /// timeout, or too many connections); the connection is closed and the client may retry.
    Busy,
    /// A code this version does not know (sent by a newer peer).
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Malformed => 1,
            ErrorCode::FrameTooLarge => 2,
            ErrorCode::WrongRank => 3,
            ErrorCode::HiddenSizeMismatch => 4,
            ErrorCode::NotResident => 5,
            ErrorCode::NotReady => 6,
            ErrorCode::Compute => 7,
            ErrorCode::Internal => 8,
            ErrorCode::Busy => 9,
            ErrorCode::Other(c) => c,
        }
    }

    pub fn from_u16(c: u16) -> Self {
        match c {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::FrameTooLarge,
            3 => ErrorCode::WrongRank,
            4 => ErrorCode::HiddenSizeMismatch,
            5 => ErrorCode::NotResident,
            6 => ErrorCode::NotReady,
            7 => ErrorCode::Compute,
            8 => ErrorCode::Internal,
            9 => ErrorCode::Busy,
            other => ErrorCode::Other(other),
        }
    }

    /// Short snake-case name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::WrongRank => "wrong_rank",
            ErrorCode::HiddenSizeMismatch => "hidden_size_mismatch",
            ErrorCode::NotResident => "not_resident",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::Compute => "compute",
            ErrorCode::Internal => "internal",
            ErrorCode::Busy => "busy",
            ErrorCode::Other(_) => "other",
        }
    }
}

/// A decoded dispatch request: the rows one rank computes for one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchRequest {
    pub request_id: u64,
    pub rank: u32,
    pub layer: u32,
    pub hidden_size: u32,
    pub experts: Vec<u32>,
    pub router_weights: Vec<f32>,
    /// Row-major `rows x hidden_size`.
    pub hidden: Vec<bf16>,
}

impl DispatchRequest {
    pub fn rows(&self) -> usize {
        self.experts.len()
    }

    /// The rows as the compute seam takes them.
    pub fn as_batch(&self) -> crate::worker::compute::RowBatch<'_> {
        crate::worker::compute::RowBatch {
            hidden_size: self.hidden_size as usize,
            experts: &self.experts,
            router_weights: &self.router_weights,
            hidden: &self.hidden,
        }
    }

    /// The whole frame, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let h = self.hidden_size as usize;
        encode_request(
            self.request_id,
            self.rank,
            self.layer,
            self.hidden_size,
            self.experts
                .iter()
                .zip(&self.router_weights)
                .enumerate()
                .map(|(r, (&e, &w))| (e, w, &self.hidden[r * h..(r + 1) * h])),
        )
    }
}

/// A successful reply: the weighted expert outputs of every row of the request, in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertOutput {
    pub request_id: u64,
    pub rank: u32,
    pub layer: u32,
    pub rows: u32,
    pub hidden_size: u32,
    /// Row-major `rows x hidden_size`.
    pub output: Vec<f32>,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub request_id: u64,
    pub code: ErrorCode,
    pub message: String,
}

/// What a worker sends back.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Output(ExpertOutput),
    Error(ErrorReply),
}

fn header(out: &mut Vec<u8>, kind: u8, dtype: u8, request_id: u64) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(kind);
    out.push(dtype);
    out.extend_from_slice(&request_id.to_le_bytes());
}

fn shape(out: &mut Vec<u8>, rank: u32, layer: u32, rows: u32, hidden: u32) {
    for v in [rank, layer, rows, hidden] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Write the body length into the 4 bytes reserved at the front.
fn finish(out: &mut [u8]) {
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
}

/// Encode a dispatch request frame (length prefix included) from its rows, without first copying
/// them into a [`DispatchRequest`]. Every hidden slice must have `hidden` elements.
pub fn encode_request<'a>(
    request_id: u64,
    rank: u32,
    layer: u32,
    hidden: u32,
    rows: impl ExactSizeIterator<Item = (u32, f32, &'a [bf16])>,
) -> Vec<u8> {
    let mut out = Vec::new();
    encode_request_into(&mut out, request_id, rank, layer, hidden, rows);
    out
}

/// [`encode_request`] into `out` (cleared first), so that a client can reuse one buffer.
pub fn encode_request_into<'a>(
    out: &mut Vec<u8>,
    request_id: u64,
    rank: u32,
    layer: u32,
    hidden: u32,
    rows: impl ExactSizeIterator<Item = (u32, f32, &'a [bf16])>,
) {
    let n = rows.len();
    let h = hidden as usize;
    out.clear();
    out.reserve(4 + HEADER_LEN + SHAPE_LEN + n * (8 + 2 * h));
    out.extend_from_slice(&[0; 4]);
    header(out, KIND_REQUEST, DTYPE_BF16, request_id);
    shape(out, rank, layer, n as u32, hidden);
    for (expert, weight, x) in rows {
        debug_assert_eq!(x.len(), h, "hidden vector length");
        out.extend_from_slice(&expert.to_le_bytes());
        out.extend_from_slice(&weight.to_le_bytes());
        put_bf16(out, x);
    }
    finish(out);
}

/// Encode an output reply frame (length prefix included). `output.len()` must be `rows * hidden`.
pub fn encode_output(
    request_id: u64,
    rank: u32,
    layer: u32,
    hidden: u32,
    output: &[f32],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUTPUT_HEAD_LEN + 4 * output.len());
    out.extend_from_slice(&output_head(request_id, rank, layer, hidden, output.len()));
    out.extend_from_slice(&f32_bytes(output));
    out
}

/// Bytes of an output frame before its values (length prefix, header, shape).
pub const OUTPUT_HEAD_LEN: usize = 4 + HEADER_LEN + SHAPE_LEN;

/// The head of an output frame carrying `values` f32 values (`rows * hidden`): a writer sends
/// it and then [`f32_bytes`] of the values, without building the frame.
pub fn output_head(
    request_id: u64,
    rank: u32,
    layer: u32,
    hidden: u32,
    values: usize,
) -> [u8; OUTPUT_HEAD_LEN] {
    let rows = if hidden == 0 {
        0
    } else {
        values / hidden as usize
    };
    let mut head = Vec::with_capacity(OUTPUT_HEAD_LEN);
    head.extend_from_slice(&((HEADER_LEN + SHAPE_LEN + 4 * values) as u32).to_le_bytes());
    header(&mut head, KIND_OUTPUT, DTYPE_F32, request_id);
    shape(&mut head, rank, layer, rows as u32, hidden);
    head.try_into().expect("the head's fixed size")
}

/// f32 values as little-endian bytes: borrowed as they are on a little-endian target.
pub fn f32_bytes(x: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: any f32 is 4 plain bytes, already in wire order on a little-endian target;
        // the view borrows `x`.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), 4 * x.len())
        })
    }
    #[cfg(not(target_endian = "little"))]
    std::borrow::Cow::Owned(x.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Encode an error reply frame (length prefix included); the message is cut to
/// [`MAX_ERROR_MESSAGE`] bytes at a char boundary.
pub fn encode_error(request_id: u64, code: ErrorCode, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut out = Vec::with_capacity(4 + HEADER_LEN + 8 + msg.len());
    out.extend_from_slice(&[0; 4]);
    header(&mut out, KIND_ERROR, 0, request_id);
    out.extend_from_slice(&code.to_u16().to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(msg);
    finish(&mut out);
    out
}

/// Append bf16 values as little-endian bytes.
fn put_bf16(out: &mut Vec<u8>, x: &[bf16]) {
    let start = out.len();
    out.resize(start + 2 * x.len(), 0);
    for (dst, v) in out[start..].chunks_exact_mut(2).zip(x) {
        dst.copy_from_slice(&v.to_bits().to_le_bytes());
    }
}

/// True when a bf16 bit pattern is infinite or NaN (all exponent bits set).
fn bf16_bits_non_finite(bits: u16) -> bool {
    bits & 0x7f80 == 0x7f80
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

struct Header {
    kind: u8,
    dtype: u8,
    request_id: u64,
}

fn decode_header(body: &[u8]) -> Result<Header, ProtocolError> {
    if body.len() < HEADER_LEN {
        return Err(ProtocolError::TooShort {
            len: body.len(),
            need: HEADER_LEN,
        });
    }
    let magic = [body[0], body[1], body[2], body[3]];
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = u16_at(body, 4);
    if version != VERSION {
        return Err(ProtocolError::UnsupportedVersion(version));
    }
    Ok(Header {
        kind: body[6],
        dtype: body[7],
        request_id: u64_at(body, 8),
    })
}

/// The request id of a frame body, if its header is intact (for error replies to bad frames).
pub fn peek_request_id(body: &[u8]) -> u64 {
    decode_header(body).map(|h| h.request_id).unwrap_or(0)
}

/// (rank, layer, rows, hidden) and the payload after them, checking the payload length.
fn decode_shape(
    body: &[u8],
    bytes_per_row_base: u128,
    bytes_per_hidden: u128,
) -> Result<(u32, u32, u32, u32, &[u8]), ProtocolError> {
    let need = HEADER_LEN + SHAPE_LEN;
    if body.len() < need {
        return Err(ProtocolError::TooShort {
            len: body.len(),
            need,
        });
    }
    let at = HEADER_LEN;
    let (rank, layer, rows, hidden) = (
        u32_at(body, at),
        u32_at(body, at + 4),
        u32_at(body, at + 8),
        u32_at(body, at + 12),
    );
    if hidden == 0 {
        return Err(ProtocolError::ZeroHidden);
    }
    let payload = &body[need..];
    // u128 so that no product of two u32 values can overflow.
    let expected = rows as u128 * (bytes_per_row_base + bytes_per_hidden * hidden as u128);
    if expected != payload.len() as u128 {
        return Err(ProtocolError::LengthMismatch {
            rows,
            hidden,
            expected,
            found: payload.len(),
        });
    }
    Ok((rank, layer, rows, hidden, payload))
}

/// The header of a request body, its kind and dtype checked.
fn decode_request_header(body: &[u8]) -> Result<Header, ProtocolError> {
    let h = decode_header(body)?;
    if h.kind != KIND_REQUEST {
        return Err(ProtocolError::UnexpectedKind {
            expected: "1 (dispatch request)",
            found: h.kind,
        });
    }
    if h.dtype != DTYPE_BF16 {
        return Err(ProtocolError::UnsupportedDtype {
            expected: "1 (bf16)",
            found: h.dtype,
        });
    }
    Ok(h)
}

/// Check the head of a request body of `len` bytes before the rest of it is read: `head` is its
/// first `min(len, REQUEST_HEAD_LEN)` bytes. Magic, version, kind and dtype are checked, and the
/// rows and hidden size must account for exactly `len` bytes. A body that passes may still fail
/// [`decode_request`] (non-finite values); one that fails here fails there with the same error.
pub fn check_request_head(head: &[u8], len: usize) -> Result<(), ProtocolError> {
    let head = &head[..head.len().min(REQUEST_HEAD_LEN)];
    decode_request_header(head)?;
    if head.len() < REQUEST_HEAD_LEN || len < REQUEST_HEAD_LEN {
        return Err(ProtocolError::TooShort {
            len: len.min(head.len()),
            need: REQUEST_HEAD_LEN,
        });
    }
    let (rows, hidden) = (u32_at(head, HEADER_LEN + 8), u32_at(head, HEADER_LEN + 12));
    if hidden == 0 {
        return Err(ProtocolError::ZeroHidden);
    }
    let expected = rows as u128 * (8 + 2 * hidden as u128);
    let found = len - REQUEST_HEAD_LEN;
    if expected != found as u128 {
        return Err(ProtocolError::LengthMismatch {
            rows,
            hidden,
            expected,
            found,
        });
    }
    Ok(())
}

/// Decode a dispatch request body (the bytes after the length prefix).
pub fn decode_request(body: &[u8]) -> Result<DispatchRequest, ProtocolError> {
    let h = decode_request_header(body)?;
    let (rank, layer, rows, hidden, payload) = decode_shape(body, 8, 2)?;
    // The length check above bounds rows and hidden by the frame size, so these fit in memory.
    let (n, hs) = (rows as usize, hidden as usize);
    let row_bytes = 8 + 2 * hs;
    let mut experts = Vec::with_capacity(n);
    let mut router_weights = Vec::with_capacity(n);
    let mut hidden_vals = Vec::with_capacity(n * hs);
    for (r, row) in payload.chunks_exact(row_bytes).enumerate() {
        experts.push(u32_at(row, 0));
        let w = f32::from_le_bytes([row[4], row[5], row[6], row[7]]);
        if !w.is_finite() {
            return Err(ProtocolError::NonFinite {
                row: r as u32,
                what: "router weight",
            });
        }
        router_weights.push(w);
        let x = &row[8..];
        // Check first, then convert: two simple loops the compiler vectorises.
        if x.chunks_exact(2)
            .any(|v| bf16_bits_non_finite(u16::from_le_bytes([v[0], v[1]])))
        {
            return Err(ProtocolError::NonFinite {
                row: r as u32,
                what: "hidden value",
            });
        }
        hidden_vals.extend(
            x.chunks_exact(2)
                .map(|v| bf16::from_bits(u16::from_le_bytes([v[0], v[1]]))),
        );
    }
    Ok(DispatchRequest {
        request_id: h.request_id,
        rank,
        layer,
        hidden_size: hidden,
        experts,
        router_weights,
        hidden: hidden_vals,
    })
}

/// An output reply read in place: its f32 values stay in the frame's bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutputRef<'a> {
    pub request_id: u64,
    pub rank: u32,
    pub layer: u32,
    pub rows: u32,
    pub hidden_size: u32,
    /// `rows x hidden_size` little-endian f32 values.
    pub bytes: &'a [u8],
}

impl OutputRef<'_> {
    /// The values in row-major order, decoded as they are read.
    pub fn values(&self) -> impl ExactSizeIterator<Item = f32> + '_ {
        self.bytes
            .chunks_exact(4)
            .map(|v| f32::from_le_bytes([v[0], v[1], v[2], v[3]]))
    }

    pub fn to_output(&self) -> ExpertOutput {
        ExpertOutput {
            request_id: self.request_id,
            rank: self.rank,
            layer: self.layer,
            rows: self.rows,
            hidden_size: self.hidden_size,
            output: self.values().collect(),
        }
    }
}

/// A reply decoded without copying its outputs.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyRef<'a> {
    Output(OutputRef<'a>),
    Error(ErrorReply),
}

/// Decode a reply body (the bytes after the length prefix).
pub fn decode_reply(body: &[u8]) -> Result<Reply, ProtocolError> {
    Ok(match decode_reply_ref(body)? {
        ReplyRef::Output(o) => Reply::Output(o.to_output()),
        ReplyRef::Error(e) => Reply::Error(e),
    })
}

/// Decode a reply body in place: the outputs are read from `body` when used.
pub fn decode_reply_ref(body: &[u8]) -> Result<ReplyRef<'_>, ProtocolError> {
    let h = decode_header(body)?;
    match h.kind {
        KIND_OUTPUT => {
            if h.dtype != DTYPE_F32 {
                return Err(ProtocolError::UnsupportedDtype {
                    expected: "2 (f32)",
                    found: h.dtype,
                });
            }
            let (rank, layer, rows, hidden, payload) = decode_shape(body, 0, 4)?;
            Ok(ReplyRef::Output(OutputRef {
                request_id: h.request_id,
                rank,
                layer,
                rows,
                hidden_size: hidden,
                bytes: payload,
            }))
        }
        KIND_ERROR => {
            let need = HEADER_LEN + 8;
            if body.len() < need {
                return Err(ProtocolError::TooShort {
                    len: body.len(),
                    need,
                });
            }
            let code = ErrorCode::from_u16(u16_at(body, HEADER_LEN));
            let len = u32_at(body, HEADER_LEN + 4);
            let rest = &body[need..];
            if len as usize != rest.len() {
                return Err(ProtocolError::MessageLength {
                    len,
                    available: rest.len(),
                });
            }
            let message = std::str::from_utf8(rest)
                .map_err(|_| ProtocolError::MessageNotUtf8)?
                .to_string();
            Ok(ReplyRef::Error(ErrorReply {
                request_id: h.request_id,
                code,
                message,
            }))
        }
        found => Err(ProtocolError::UnexpectedKind {
            expected: "2 (expert output) or 3 (error)",
            found,
        }),
    }
}

/// Check a frame length prefix against the maximum frame size.
pub fn check_frame_len(prefix: [u8; 4], max_frame_bytes: usize) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max_frame_bytes {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    Ok(len)
}

/// Writes an output reply frame: its head, then the values' bytes as they are (no frame is built,
/// so the reply is not copied), with vectored writes so that a small reply leaves in one segment.
pub async fn write_output<W: AsyncWrite + Unpin>(
    w: &mut W,
    request_id: u64,
    rank: u32,
    layer: u32,
    hidden: u32,
    output: &[f32],
) -> std::io::Result<()> {
    let head = output_head(request_id, rank, layer, hidden, output.len());
    let body = f32_bytes(output);
    let (mut a, mut b) = (&head[..], &body[..]);
    while !a.is_empty() || !b.is_empty() {
        let n = w
            .write_vectored(&[std::io::IoSlice::new(a), std::io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// Why reading a frame from a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("truncated frame: the stream ended after {got} of {len} body bytes")]
    Truncated { got: usize, len: usize },
    #[error("stream ended inside a frame length prefix")]
    TruncatedPrefix,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Read a frame length prefix. `Ok(None)` on a clean end of stream before the prefix.
pub async fn read_frame_len<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame_bytes: usize,
) -> Result<Option<usize>, ReadFrameError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut prefix[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ReadFrameError::TruncatedPrefix)
            };
        }
        got += n;
    }
    Ok(Some(check_frame_len(prefix, max_frame_bytes)?))
}

/// Read a frame body of `len` bytes.
pub async fn read_frame_body<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
) -> Result<Vec<u8>, ReadFrameError> {
    let mut body = Vec::new();
    read_frame_body_into(r, len, &mut body).await?;
    Ok(body)
}

/// [`read_frame_body`] into `body` (cleared first): a reused buffer keeps its capacity, so a
/// client reading frame after frame allocates and grows it once.
pub async fn read_frame_body_into<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
    body: &mut Vec<u8>,
) -> Result<(), ReadFrameError> {
    body.clear();
    // The buffer grows with the bytes that arrive, so a peer that claims a large frame and sends
    // little makes the reader hold little.
    body.reserve(len.min(1 << 20));
    (&mut *r).take(len as u64).read_to_end(body).await?;
    if body.len() < len {
        return Err(ReadFrameError::Truncated {
            got: body.len(),
            len,
        });
    }
    Ok(())
}

pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame_bytes: usize,
) -> Result<Option<Vec<u8>>, ReadFrameError> {
    let mut body = Vec::new();
    Ok(read_frame_into(r, max_frame_bytes, &mut body)
        .await?
        .then_some(body))
}

/// [`read_frame`] into a reused buffer; `Ok(false)` on a clean end of stream.
pub async fn read_frame_into<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame_bytes: usize,
    body: &mut Vec<u8>,
) -> Result<bool, ReadFrameError> {
    match read_frame_len(r, max_frame_bytes).await? {
        None => Ok(false),
        Some(len) => {
            read_frame_body_into(r, len, body).await?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_request(rows: usize, hidden: usize, seed: u32) -> DispatchRequest {
        DispatchRequest {
            request_id: 7 + seed as u64,
            rank: 3,
            layer: 5,
            hidden_size: hidden as u32,
            experts: (0..rows as u32).map(|r| (r * 7 + seed) % 64).collect(),
            router_weights: (0..rows).map(|r| 0.1 + r as f32 * 0.01).collect(),
            hidden: (0..rows * hidden)
                .map(|i| bf16::from_f32(((i as f32) * 0.37 + seed as f32).sin()))
                .collect(),
        }
    }

    #[test]
    fn request_round_trips() {
        let req = sample_request(5, 16, 1);
        let frame = req.encode();
        let len = check_frame_len(frame[..4].try_into().unwrap(), DEFAULT_MAX_FRAME_BYTES).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(len, HEADER_LEN + SHAPE_LEN + 5 * (8 + 32));
        assert_eq!(decode_request(&frame[4..]).unwrap(), req);
    }

    #[test]
    fn replies_round_trip() {
        let out: Vec<f32> = (0..24).map(|i| i as f32 * -0.5).collect();
        let frame = encode_output(9, 2, 4, 8, &out);
        match decode_reply(&frame[4..]).unwrap() {
            Reply::Output(o) => {
                assert_eq!(
                    (o.request_id, o.rank, o.layer, o.rows, o.hidden_size),
                    (9, 2, 4, 3, 8)
                );
                assert_eq!(o.output, out);
            }
            other => panic!("expected output, got {other:?}"),
        }
        let frame = encode_error(
            11,
            ErrorCode::NotResident,
            "layer 3 expert 9 is not resident",
        );
        assert_eq!(
            decode_reply(&frame[4..]).unwrap(),
            Reply::Error(ErrorReply {
                request_id: 11,
                code: ErrorCode::NotResident,
                message: "layer 3 expert 9 is not resident".into()
            })
        );
    }

    #[test]
    fn a_reply_read_in_place_equals_the_owned_decode() {
        let out: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
        let frame = encode_output(3, 1, 2, 4, &out);
        assert_eq!(frame.len(), OUTPUT_HEAD_LEN + 4 * out.len());
        let ReplyRef::Output(o) = decode_reply_ref(&frame[4..]).unwrap() else {
            panic!("expected an output")
        };
        assert_eq!((o.rows, o.hidden_size), (3, 4));
        assert_eq!(o.values().collect::<Vec<_>>(), out);
        assert_eq!(
            decode_reply(&frame[4..]).unwrap(),
            Reply::Output(o.to_output())
        );
    }

    #[tokio::test]
    async fn a_written_output_is_the_encoded_frame_even_in_short_writes() {
        let out: Vec<f32> = (0..300).map(|i| (i as f32).sin()).collect();
        // A pipe of 7 bytes makes every vectored write partial.
        let (mut w, mut r) = tokio::io::duplex(7);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got
        });
        write_output(&mut w, 5, 2, 9, 30, &out).await.unwrap();
        drop(w);
        assert_eq!(reader.await.unwrap(), encode_output(5, 2, 9, 30, &out));
    }

    #[test]
    fn error_message_is_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_MESSAGE); // 2 bytes each
        let frame = encode_error(1, ErrorCode::Internal, &long);
        let Reply::Error(e) = decode_reply(&frame[4..]).unwrap() else {
            panic!("expected an error reply")
        };
        assert_eq!(e.message.len(), MAX_ERROR_MESSAGE);
    }

    #[test]
    fn decoder_names_what_is_wrong() {
        let req = sample_request(2, 4, 0);
        let mut frame = req.encode();
        frame[4] = b'X';
        assert!(matches!(
            decode_request(&frame[4..]),
            Err(ProtocolError::BadMagic(_))
        ));

        let mut frame = req.encode();
        frame[8] = 9;
        assert_eq!(
            decode_request(&frame[4..]),
            Err(ProtocolError::UnsupportedVersion(9))
        );

        let frame = req.encode();
        let short = &frame[4..frame.len() - 1];
        assert!(matches!(
            decode_request(short),
            Err(ProtocolError::LengthMismatch { rows: 2, .. })
        ));

        let mut bad = req.clone();
        bad.router_weights[1] = f32::NAN;
        assert_eq!(
            decode_request(&bad.encode()[4..]),
            Err(ProtocolError::NonFinite {
                row: 1,
                what: "router weight"
            })
        );
        assert_eq!(
            check_frame_len((1u32 << 30).to_le_bytes(), 1 << 20),
            Err(ProtocolError::FrameTooLarge {
                len: 1 << 30,
                max: 1 << 20
            })
        );
        // A request is not a reply and vice versa.
        assert!(matches!(
            decode_reply(&frame[4..]),
            Err(ProtocolError::UnexpectedKind { found: 1, .. })
        ));
        let err = encode_error(0, ErrorCode::Compute, "x");
        assert!(matches!(
            decode_request(&err[4..]),
            Err(ProtocolError::UnexpectedKind { found: 3, .. })
        ));
    }

    #[test]
    fn non_finite_check_matches_bf16_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            assert_eq!(
                bf16_bits_non_finite(bits),
                !bf16::from_bits(bits).is_finite(),
                "{bits:#06x}"
            );
        }
        let mut req = sample_request(3, 4, 1);
        req.hidden[9] = bf16::INFINITY;
        assert_eq!(
            decode_request(&req.encode()[4..]),
            Err(ProtocolError::NonFinite {
                row: 2,
                what: "hidden value"
            })
        );
    }

    #[test]
    fn huge_declared_shape_is_rejected_without_allocating() {
        let mut frame = sample_request(1, 4, 0).encode();
        // rows = u32::MAX, hidden = u32::MAX: the product must not overflow or allocate.
        frame[4 + HEADER_LEN + 8..4 + HEADER_LEN + 16].copy_from_slice(&[0xff; 8]);
        assert!(matches!(
            decode_request(&frame[4..]),
            Err(ProtocolError::LengthMismatch { .. })
        ));
    }

    #[tokio::test]
    async fn stream_helpers_read_frames_and_report_truncation() {
        let a = sample_request(3, 8, 2);
        let mut bytes = a.encode();
        bytes.extend(encode_error(1, ErrorCode::Compute, "boom"));
        let mut r = &bytes[..];
        let body = read_frame(&mut r, 1 << 20).await.unwrap().unwrap();
        assert_eq!(decode_request(&body).unwrap(), a);
        let body = read_frame(&mut r, 1 << 20).await.unwrap().unwrap();
        assert!(matches!(decode_reply(&body).unwrap(), Reply::Error(_)));
        assert!(read_frame(&mut r, 1 << 20).await.unwrap().is_none());

        let frame = a.encode();
        let mut cut = &frame[..frame.len() - 3];
        assert!(matches!(
            read_frame(&mut cut, 1 << 20).await,
            Err(ReadFrameError::Truncated { .. })
        ));
        let mut big = &frame[..];
        assert!(matches!(
            read_frame(&mut big, 10).await,
            Err(ReadFrameError::Protocol(
                ProtocolError::FrameTooLarge { .. }
            ))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Fuzz: arbitrary bytes never panic either decoder.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&bytes);
            let _ = decode_reply(&bytes);
            let _ = peek_request_id(&bytes);
        }

        /// Fuzz: random bytes behind a valid header (so decoding gets past the magic) never panic.
        #[test]
        fn random_payload_after_valid_header_never_panics(
            kind in 0u8..5, dtype in 0u8..4,
            tail in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut body = Vec::new();
            header(&mut body, kind, dtype, 42);
            body.extend_from_slice(&tail);
            let _ = decode_request(&body);
            let _ = decode_reply(&body);
        }

        /// Fuzz: valid frames with bytes flipped, cut or appended decode to a value or an error,
        /// never a panic; and an unmutated frame decodes to what was encoded.
        #[test]
        fn mutated_valid_frames_never_panic(
            rows in 0usize..6, hidden in 1usize..9, seed in 0u32..1000,
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(), do_cut in any::<bool>(),
            extra in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let req = sample_request(rows, hidden, seed);
            let frame = req.encode();
            let decoded = decode_request(&frame[4..]);
            prop_assert_eq!(decoded, Ok(req.clone()));
            let out: Vec<f32> = req.hidden.iter().map(|x| x.to_f32()).collect();
            let reply = encode_output(req.request_id, req.rank, req.layer, req.hidden_size, &out);
            let err = encode_error(seed as u64, ErrorCode::from_u16(seed as u16 % 10), "not resident");
            for original in [frame, reply, err] {
                let mut body = original[4..].to_vec();
                for (at, v) in &flips {
                    let i = at.index(body.len());
                    body[i] ^= v;
                }
                if do_cut {
                    body.truncate(cut.index(body.len() + 1));
                }
                body.extend_from_slice(&extra);
                let _ = decode_request(&body);
                let _ = decode_reply(&body);
            }
        }

        #[test]
        fn error_codes_round_trip(c in any::<u16>()) {
            prop_assert_eq!(ErrorCode::from_u16(c).to_u16(), c);
        }
    }
}
