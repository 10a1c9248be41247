//! Fuzz target for the dispatch frame decoder (`worker::protocol`): arbitrary bytes, valid frames
//! with bytes flipped, cut or appended, and byte streams behind arbitrary length prefixes. Every
//! input must give a value or an error, never a panic, and the decoder must never allocate more
//! than the input it was given can justify (a claimed size is not a reason to allocate).
//!
//! Cases per property: `PROPTEST_CASES` (default 256, a few seconds). Longer runs:
//! `PROPTEST_CASES=200000 cargo test --release --test fuzz_dispatch`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use half::bf16;
use moe_operator::worker::protocol::{
    check_request_head, decode_reply, decode_request, encode_error, encode_output, peek_request_id,
    read_frame, DispatchRequest, ErrorCode, ProtocolError, ReadFrameError, HEADER_LEN,
    REQUEST_HEAD_LEN,
};
use proptest::prelude::*;

// ------------------------------------------------------------ allocation accounting

/// The system allocator, plus per-thread accounting while a thread has it armed.
struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static TOTAL: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the thread-locals may be gone while a thread exits.
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
            let _ = TOTAL.try_with(|t| t.set(t.get() + size));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// What `f` allocated on this thread: (largest single allocation, total bytes).
fn allocations<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    LARGEST.with(|l| l.set(0));
    TOTAL.with(|t| t.set(0));
    ARMED.with(|a| a.set(true));
    let out = f();
    ARMED.with(|a| a.set(false));
    (out, LARGEST.with(Cell::get), TOTAL.with(Cell::get))
}

/// Decode `body` every way the worker and its clients do; check the allocation bound.
fn decode_all(body: &[u8]) -> Result<(), TestCaseError> {
    let (_, largest, total) = allocations(|| {
        let req = decode_request(body);
        let reply = decode_reply(body);
        let head = check_request_head(&body[..body.len().min(REQUEST_HEAD_LEN)], body.len());
        let id = peek_request_id(body);
        (req, reply, head, id)
    });
    // Rows, weights and values are at most as many bytes as they took on the wire (bf16 stays 2
    // bytes, f32 stays 4, ids 4 for a 10-byte minimum row), plus an error message.
    let slack = 1024;
    prop_assert!(
        largest <= body.len() + slack,
        "a {}-byte body made the decoder allocate {largest} bytes at once",
        body.len()
    );
    prop_assert!(
        total <= 3 * body.len() + 4 * slack,
        "a {}-byte body made the decoder allocate {total} bytes in all",
        body.len()
    );
    // The head check the worker runs before buffering a body agrees with the full decoder.
    match check_request_head(&body[..body.len().min(REQUEST_HEAD_LEN)], body.len()) {
        Ok(()) => {
            if let Err(e) = decode_request(body) {
                prop_assert!(
                    matches!(e, ProtocolError::NonFinite { .. }),
                    "the head check passed but decoding failed with {e:?}"
                );
            }
        }
        Err(e) => prop_assert_eq!(decode_request(body).err(), Some(e)),
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn sample_request(rows: usize, hidden: usize, seed: u32) -> DispatchRequest {
    DispatchRequest {
        request_id: 7 + seed as u64,
        rank: seed % 16,
        layer: seed % 61,
        hidden_size: hidden as u32,
        experts: (0..rows as u32).map(|r| (r * 7 + seed) % 256).collect(),
        router_weights: (0..rows).map(|r| 0.1 + r as f32 * 0.01).collect(),
        hidden: (0..rows * hidden)
            .map(|i| bf16::from_f32(((i as f32) * 0.37 + seed as f32).sin()))
            .collect(),
    }
}

fn mutate(
    mut body: Vec<u8>,
    flips: &[(prop::sample::Index, u8)],
    cut: Option<prop::sample::Index>,
    extra: &[u8],
) -> Vec<u8> {
    if !body.is_empty() {
        for (at, v) in flips {
            let i = at.index(body.len());
            body[i] ^= v;
        }
    }
    if let Some(c) = cut {
        body.truncate(c.index(body.len() + 1));
    }
    body.extend_from_slice(extra);
    body
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Arbitrary bytes, and arbitrary bytes behind a valid magic and version.
    #[test]
    fn arbitrary_bodies_decode_or_fail_cleanly(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        framed in any::<bool>(), kind in 0u8..5, dtype in 0u8..4,
    ) {
        let body = if framed {
            let mut b = b"MOED".to_vec();
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&[kind, dtype]);
            b.extend_from_slice(&bytes);
            b
        } else {
            bytes
        };
        decode_all(&body)?;
    }

    /// Huge claimed shapes behind a valid header: refused without allocating by the claim.
    #[test]
    fn claimed_shapes_do_not_allocate(
        rows in any::<u32>(), hidden in any::<u32>(), kind in 1u8..4,
        tail in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut body = b"MOED".to_vec();
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&[kind, kind]);
        body.extend_from_slice(&42u64.to_le_bytes());
        for v in [3u32, 5, rows, hidden] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(&tail);
        prop_assert_eq!(body.len() - tail.len(), HEADER_LEN + 16);
        decode_all(&body)?;
    }

    /// Valid requests, outputs and errors with bytes flipped, cut or appended; unmutated, each
    /// decodes to what was encoded.
    #[test]
    fn mutated_valid_frames_decode_or_fail_cleanly(
        rows in 0usize..40, hidden in 1usize..64, seed in 0u32..10_000,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        extra in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let req = sample_request(rows, hidden, seed);
        let frame = req.encode();
        prop_assert_eq!(decode_request(&frame[4..]), Ok(req.clone()));
        prop_assert_eq!(check_request_head(&frame[4..4 + REQUEST_HEAD_LEN], frame.len() - 4), Ok(()));
        let out: Vec<f32> = req.hidden.iter().map(|x| x.to_f32()).collect();
        let reply = encode_output(req.request_id, req.rank, req.layer, req.hidden_size, &out);
        let err = encode_error(seed as u64, ErrorCode::from_u16(seed as u16 % 12), "not resident");
        for original in [frame, reply, err] {
            let body = mutate(original[4..].to_vec(), &flips, cut, &extra);
            decode_all(&body)?;
        }
    }

    /// Streams: an arbitrary (often huge) length prefix and whatever bytes follow. The reader
    /// refuses lengths over the maximum before reading, and never allocates by the claim alone.
    #[test]
    fn frame_streams_read_or_fail_cleanly(
        prefix in prop_oneof![any::<u32>(), 0u32..4096],
        body in proptest::collection::vec(any::<u8>(), 0..4096),
        max in prop_oneof![Just(1usize << 20), Just(64usize << 20), 0usize..4096],
    ) {
        let mut stream = prefix.to_le_bytes().to_vec();
        stream.extend_from_slice(&body);
        let (read, largest, _) = allocations(|| {
            let mut r = &stream[..];
            futures::executor::block_on(read_frame(&mut r, max))
        });
        let claimed = prefix as usize;
        match read {
            Ok(Some(b)) => {
                prop_assert!(claimed <= max);
                prop_assert_eq!(&b[..], &body[..claimed]);
            }
            Ok(None) => prop_assert!(false, "a stream with a prefix is not empty"),
            Err(ReadFrameError::Protocol(ProtocolError::FrameTooLarge { len, .. })) => {
                prop_assert!(claimed > max);
                prop_assert_eq!(len, claimed);
            }
            Err(ReadFrameError::Truncated { got, len }) => {
                prop_assert!(claimed <= max && body.len() < claimed);
                prop_assert_eq!((got, len), (body.len(), claimed));
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
        // At most the first chunk's reservation (1 MiB) or twice what arrived, never the claim.
        prop_assert!(
            largest <= (1 << 20).max(2 * body.len()) + 64,
            "a {claimed}-byte claim with {} bytes behind it allocated {largest} bytes",
            body.len()
        );
    }
}

/// The allocation accounting works (so that the bounds above can fail).
#[test]
fn allocation_accounting_sees_allocations() {
    let (v, largest, total) = allocations(|| vec![0u8; 100_000]);
    assert_eq!(v.len(), 100_000);
    assert!(largest >= 100_000 && total >= 100_000);
    let (_, largest, _) = allocations(|| ());
    assert_eq!(largest, 0);
}
