//! Shared by the fuzz targets (`tests/fuzz_*.rs`): the case count, an allocator that records the
//! largest single allocation of the running thread, and byte-level mutations of valid inputs.
//!
//! A directory, not `tests/fuzz_support.rs`, so that cargo does not build it as a target of its own
//! and `scripts/fuzz.sh` does not run it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use proptest::test_runner::Config;

/// Cases per property when `PROPTEST_CASES` is not set: a few seconds in CI.
pub const CI_CASES: u32 = 256;

/// The proptest configuration of every fuzz property: `PROPTEST_CASES` cases (default
/// [`CI_CASES`]), bounded shrinking, and no regression files written into the source tree.
pub fn cases() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CI_CASES);
    Config {
        cases,
        max_shrink_iters: 2048,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Any single allocation past this fails at once (the process aborts with "memory allocation of N
/// bytes failed") instead of taking the machine's memory: a parser that sizes a buffer from a
/// claimed dimension is a failed case either way.
const REFUSE_ABOVE: usize = 4 << 30;

pub struct PeakAlloc;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = PEAK.try_with(|p| {
        if size > p.get() {
            p.set(size)
        }
    });
}

// SAFETY: every call is passed on to `System` unchanged, or refused with a null pointer (which
// the `GlobalAlloc` contract allows for any allocation).
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        if layout.size() > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        if layout.size() > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        if new_size > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Run `f` and return its result with the largest single allocation it made on this thread.
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    PEAK.with(|p| p.set(0));
    let r = f();
    (r, PEAK.with(|p| p.get()))
}

/// Values a mutation puts where a number was: the extremes that broke the readers before, and
/// values of other JSON types.
const EXTREMES: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "0.5",
    "-0",
    "99",
    "512",
    "1024",
    "1025",
    "4096",
    "4294967295",
    "4294967296",
    "1000000000000",
    "18446744073709551615",
    "18446744073709551616",
    "1e12",
    "1e15",
    "1e16",
    "1e308",
    "-1e308",
    "1e400",
    "NaN",
    "null",
    "[]",
    "[[]]",
    "{}",
    "\"x\"",
    "true",
];

/// One edit of a valid input.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Replace the `index`-th number (modulo the count) with `EXTREMES[value]`.
    Number { index: usize, value: usize },
    /// Remove `len` bytes at `at` (both modulo the input).
    Delete { at: usize, len: usize },
    /// Insert bytes at `at`.
    Insert { at: usize, bytes: Vec<u8> },
    /// Repeat the `len` bytes at `at` right after them.
    Duplicate { at: usize, len: usize },
    /// Keep only the first `at` bytes.
    Truncate { at: usize },
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0..EXTREMES.len())
            .prop_map(|(index, value)| Mutation::Number { index, value }),
        1 => (any::<usize>(), 1usize..16).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => (any::<usize>(), proptest::collection::vec(
            prop_oneof![Just(b'['), Just(b']'), Just(b'{'), Just(b'}'), Just(b','), Just(b'"'),
                        Just(b':'), Just(b'\n'), Just(b'0'), Just(b'9'), any::<u8>()],
            1..8,
        ))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), 1usize..200).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

/// Byte spans of the JSON numbers in `s`.
fn number_spans(s: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let starts =
            s[i].is_ascii_digit() || (s[i] == b'-' && s.get(i + 1).is_some_and(u8::is_ascii_digit));
        // A digit inside a string (e.g. "moe-load-trace/v1") is not a number.
        let after_word = i > 0 && (s[i - 1].is_ascii_alphabetic() || s[i - 1] == b'/');
        if starts && !after_word {
            let start = i;
            i += 1;
            while i < s.len() && matches!(s[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                i += 1;
            }
            spans.push((start, i));
        } else {
            i += 1;
        }
    }
    spans
}

/// `input` with `mutations` applied in order.
pub fn mutate(input: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut s = input.to_vec();
    for m in mutations {
        let n = s.len().max(1);
        match m {
            Mutation::Number { index, value } => {
                let spans = number_spans(&s);
                if let Some(&(a, b)) = spans.get(index % spans.len().max(1)) {
                    s.splice(a..b, EXTREMES[*value].bytes());
                }
            }
            Mutation::Delete { at, len } => {
                let a = at % n;
                let b = (a + len).min(s.len());
                s.drain(a.min(b)..b);
            }
            Mutation::Insert { at, bytes } => {
                let a = at % (s.len() + 1);
                s.splice(a..a, bytes.iter().copied());
            }
            Mutation::Duplicate { at, len } => {
                let a = at % n;
                let b = (a + len).min(s.len());
                let part = s[a.min(b)..b].to_vec();
                s.splice(b..b, part);
            }
            Mutation::Truncate { at } => s.truncate(at % n),
        }
    }
    s
}
