//! Fuzzing tier for the safetensors header reader (issue 19): random bytes, and valid files whose
//! header length, offsets, shapes, dtypes and bytes are mutated. The reader must never panic, must
//! accept only headers whose every tensor lies inside the file with a size that matches its dtype
//! and shape, and must never allocate more than a small multiple of the file it was given (a
//! claimed length is bounded before anything is allocated from it).
//!
//! Cases per property come from `PROPTEST_CASES` (proptest's default, 256, runs in seconds):
//! `PROPTEST_CASES=200000 cargo test --release --test fuzz_safetensors` for a longer run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

use moe_operator::worker::checkpoint::safetensors::{
    parse_header, read_header, TensorEntry, MAX_HEADER_BYTES,
};
use proptest::prelude::*;

/// The system allocator, recording the largest single allocation made by the current thread.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator; `note` does not allocate.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// Largest allocation allowed while reading a header of a `len`-byte file: JSON values cost a
/// bounded multiple of their text (a 2-byte array element is a 32-byte value, doubled by growth).
fn allocation_bound(len: usize) -> usize {
    64 * len + (64 << 10)
}

type Header = BTreeMap<String, TensorEntry>;

/// Parses `bytes` in memory and, where `via_file`, from a file too; checks the allocation bound,
/// that both agree, and that an accepted header satisfies every invariant the loader relies on.
fn check(bytes: &[u8], via_file: bool) -> Result<Header, String> {
    let path = Path::new("fuzz.safetensors");
    LARGEST.with(|l| l.set(0));
    let parsed = parse_header(path, bytes);
    let largest = LARGEST.with(|l| l.get());
    assert!(
        largest <= allocation_bound(bytes.len()),
        "parse_header of {} bytes allocated {largest} bytes at once",
        bytes.len()
    );
    if via_file {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("fuzz.safetensors");
        std::fs::write(&p, bytes).expect("write");
        let f = std::fs::File::open(&p).expect("open");
        LARGEST.with(|l| l.set(0));
        let from_file = read_header(&p, &f);
        let largest = LARGEST.with(|l| l.get());
        assert!(
            largest <= allocation_bound(bytes.len()),
            "read_header of a {}-byte file allocated {largest} bytes at once",
            bytes.len()
        );
        match (&parsed, &from_file) {
            (Ok(a), Ok((b, len))) => {
                assert_eq!(*len, bytes.len() as u64);
                assert_eq!(format!("{a:?}"), format!("{b:?}"));
            }
            (Err(_), Err(e)) => assert!(e.to_string().contains("fuzz.safetensors"), "{e}"),
            (a, b) => panic!("in memory {a:?}, from the file {b:?}"),
        }
    }
    let header = parsed.map_err(|e| {
        let e = e.to_string();
        assert!(
            e.contains("fuzz.safetensors"),
            "error without the file: {e}"
        );
        e
    })?;
    let len = bytes.len() as u64;
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    assert!(data_start - 8 <= MAX_HEADER_BYTES);
    for (name, e) in &header {
        assert!(
            data_start <= e.start && e.start <= e.end && e.end <= len,
            "tensor {name}: accepted range {}..{} in a {len}-byte file with data from {data_start}",
            e.start,
            e.end
        );
        if let Some(size) = e.dtype.size() {
            let numel = e
                .shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d as u64));
            assert_eq!(
                numel.and_then(|n| n.checked_mul(size)),
                Some(e.end - e.start),
                "tensor {name}: accepted size does not match {:?} x {}",
                e.shape,
                e.dtype.name()
            );
        }
    }
    Ok(header)
}

/// Numbers that break naive arithmetic, mixed with ordinary ones.
fn number() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..64,
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(u64::MAX / 2),
        Just(1 << 32),
        Just(1 << 63),
        Just(MAX_HEADER_BYTES),
        Just(MAX_HEADER_BYTES + 1),
        any::<u64>(),
    ]
}

#[derive(Clone, Debug)]
struct Spec {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        "[a-z.0-9_]{1,12}",
        prop::sample::select(vec![
            "BF16", "F8_E4M3", "F32", "F16", "I64", "BOOL", "F4", "??",
        ]),
        prop::collection::vec(0u64..6, 0..4),
    )
        .prop_map(|(name, dtype, shape)| Spec { name, dtype, shape })
}

fn elem_size(dtype: &str) -> u64 {
    match dtype {
        "BF16" | "F16" => 2,
        "F8_E4M3" | "BOOL" | "F4" | "??" => 1,
        "F32" => 4,
        _ => 8,
    }
}

/// A valid file of the given tensors (repeated names dropped; returned are the ones written):
/// header entries with consecutive offsets, then the data.
fn valid_file(specs: &[Spec]) -> (Vec<u8>, Vec<Spec>) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0u64;
    let mut kept = Vec::new();
    for s in specs {
        if header.contains_key(&s.name) {
            continue;
        }
        let n = s.shape.iter().product::<u64>() * elem_size(s.dtype);
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": s.dtype, "shape": s.shape, "data_offsets": [off, off + n]}),
        );
        off += n;
        kept.push(s.clone());
    }
    let json = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
    let mut b = (json.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&json);
    b.resize(b.len() + off as usize, 0xab);
    (b, kept)
}

/// One way of damaging a valid file.
#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the 8-byte header length.
    HeaderLen(u64),
    /// Truncate (or extend with zeros) to this fraction of the length, in 1/1000.
    Resize(u32),
    /// Set byte `at` (modulo the length) to `value`.
    Byte(usize, u8),
    /// Rewrite tensor `k`'s offsets, shape or dtype and re-serialise the header.
    Offsets(usize, u64, u64),
    Shape(usize, Vec<u64>),
    Dtype(usize, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        number().prop_map(Mutation::HeaderLen),
        (0u32..1500).prop_map(Mutation::Resize),
        (any::<usize>(), any::<u8>()).prop_map(|(a, v)| Mutation::Byte(a, v)),
        (any::<usize>(), number(), number()).prop_map(|(k, s, e)| Mutation::Offsets(k, s, e)),
        (any::<usize>(), prop::collection::vec(number(), 0..10))
            .prop_map(|(k, s)| Mutation::Shape(k, s)),
        (any::<usize>(), "[A-Z0-9_]{0,8}").prop_map(|(k, d)| Mutation::Dtype(k, d)),
    ]
}

/// Applies `m` to the file `b` whose tensors are `specs`.
fn mutate(b: &mut Vec<u8>, specs: &[Spec], m: &Mutation) {
    // Sets `field` of tensor `name`'s entry, where the header still has such an entry.
    let rewrite = |b: &mut Vec<u8>, name: String, field: &str, value: serde_json::Value| {
        let len = u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as usize;
        let mut header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&b[8..8 + len]).expect("valid header");
        if let Some(entry) = header.get_mut(&name).and_then(|v| v.as_object_mut()) {
            entry.insert(field.to_string(), value);
        }
        let json = serde_json::to_vec(&header).expect("json");
        let data = b[8 + len..].to_vec();
        b.clear();
        b.extend_from_slice(&(json.len() as u64).to_le_bytes());
        b.extend_from_slice(&json);
        b.extend_from_slice(&data);
    };
    let name = |k: usize| specs.get(k % specs.len().max(1)).map(|s| s.name.clone());
    match m {
        Mutation::HeaderLen(n) => b[..8].copy_from_slice(&n.to_le_bytes()),
        Mutation::Resize(f) => {
            let n = b.len() * *f as usize / 1000;
            b.resize(n, 0);
        }
        Mutation::Byte(at, v) => {
            let n = b.len();
            b[at % n] = *v;
        }
        Mutation::Offsets(k, s, e) => {
            if let Some(name) = name(*k) {
                rewrite(b, name, "data_offsets", serde_json::json!([s, e]));
            }
        }
        Mutation::Shape(k, shape) => {
            if let Some(name) = name(*k) {
                rewrite(b, name, "shape", serde_json::json!(shape));
            }
        }
        Mutation::Dtype(k, d) => {
            if let Some(name) = name(*k) {
                rewrite(b, name, "dtype", serde_json::json!(d));
            }
        }
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = check(&bytes, false);
    }

    /// Random bytes behind a header length that fits them (so the JSON parser sees them), and
    /// random JSON-ish text.
    #[test]
    fn random_headers_never_panic(
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..400),
            "[{}\\[\\]\":,0-9a-z_. -]{0,300}".prop_map(String::into_bytes),
        ],
        extra in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut b = (body.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(&body);
        b.extend_from_slice(&extra);
        let _ = check(&b, false);
    }

    #[test]
    fn valid_files_are_read_back(specs in prop::collection::vec(spec(), 0..6)) {
        let (b, kept) = valid_file(&specs);
        let h = check(&b, true).expect("a valid file is accepted");
        prop_assert_eq!(h.len(), kept.len());
        for s in &kept {
            let e = &h[&s.name];
            let want = if matches!(s.dtype, "F4" | "??") { "unknown" } else { s.dtype };
            prop_assert_eq!(e.dtype.name(), want);
            prop_assert_eq!(&e.shape.iter().map(|&d| d as u64).collect::<Vec<_>>(), &s.shape);
        }
    }

    #[test]
    fn mutated_files_never_panic_or_overreach(
        specs in prop::collection::vec(spec(), 1..6),
        mutations in prop::collection::vec(mutation(), 1..4),
        via_file in any::<bool>(),
    ) {
        let (mut b, specs) = valid_file(&specs);
        for m in &mutations {
            if b.len() < 8 {
                break;
            }
            let len = u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as usize;
            let header_intact = len <= b.len() - 8
                && serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&b[8..8 + len]).is_ok();
            if !header_intact && matches!(m, Mutation::Offsets(..) | Mutation::Shape(..) | Mutation::Dtype(..)) {
                continue;
            }
            mutate(&mut b, &specs, m);
        }
        let _ = check(&b, via_file);
    }
}

/// The probes of issue 19, pinned: `data_offsets [0, u64::MAX]`, a header length of u64::MAX, and
/// a shape whose size overflows, each refused with the file and the tensor named.
#[test]
fn issue_19_probes_are_refused() {
    let specs = [Spec {
        name: "w".into(),
        dtype: "BF16",
        shape: vec![2, 2],
    }];
    for m in [
        Mutation::Offsets(0, 0, u64::MAX),
        Mutation::Offsets(0, u64::MAX, u64::MAX),
        Mutation::HeaderLen(u64::MAX),
        Mutation::Shape(0, vec![1 << 32, 1 << 32, 1 << 32]),
    ] {
        let (mut b, _) = valid_file(&specs);
        mutate(&mut b, &specs, &m);
        let e = check(&b, true).expect_err("refused");
        assert!(
            matches!(m, Mutation::HeaderLen(_)) || e.contains("`w`"),
            "{m:?}: {e}"
        );
    }
}
