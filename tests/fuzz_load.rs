//! Fuzzing tier for the load trace parsers (`plan::load_formats`): random bytes and mutated valid
//! traces of every format. Whatever the bytes, a parser returns a window within its limits or an
//! error naming the file; it never panics, and never asks for more memory than the limits allow.
//!
//! Cases per property: `PROPTEST_CASES` (default `fuzz_support::CI_CASES`, a few seconds). `scripts/fuzz.sh`
//! runs every `tests/fuzz_*.rs` for longer.

mod fuzz_support;

use fuzz_support::{cases, largest_allocation, mutate, mutation};
use moe_operator::plan::limits::{MAX_EXPERTS, MAX_LAYERS, MAX_TOKEN_COUNT};
use moe_operator::plan::load_formats::{
    parse_load_bytes_with, synthetic_window, to_trace_json, to_trace_jsonl, LoadError, LoadLimits,
};
use moe_operator::plan::LoadWindow;
use proptest::prelude::*;

/// Cells allowed in these tests: small, so that an allocation past the limit stands out.
const CELLS: usize = 1 << 12;

/// The most one allocation of a parse may ask for: the counts (f64, twice for a growing vector)
/// and what serde holds of the input itself.
fn allocation_bound(input: usize) -> usize {
    2 * 8 * CELLS + 32 * input + (64 << 10)
}

/// Parse with the test's limits and check everything a caller relies on.
fn parse_checked(bytes: &[u8]) -> Result<LoadWindow, LoadError> {
    let limits = LoadLimits { max_cells: CELLS };
    let (r, peak) = largest_allocation(|| parse_load_bytes_with("fuzz.json", bytes, &limits));
    assert!(
        peak <= allocation_bound(bytes.len()),
        "one allocation of {peak} bytes for {} input bytes",
        bytes.len()
    );
    match &r {
        Ok(w) => {
            assert!(w.experts() >= 1 && w.experts() <= MAX_EXPERTS as usize);
            assert!(w.layers() >= 1 && w.layers() <= MAX_LAYERS as usize);
            assert!(w.layer_ids().iter().all(|&id| id < MAX_LAYERS));
            assert!(w.layer_ids().windows(2).all(|p| p[0] < p[1]));
            assert!(w.batches() * w.layers() * w.experts() <= CELLS);
            for b in 0..w.batches() {
                for l in 0..w.layers() {
                    assert!(w
                        .row(b, l)
                        .iter()
                        .all(|&c| c.is_finite() && (0.0..=MAX_TOKEN_COUNT).contains(&c)));
                }
            }
            assert!(w.total_tokens().is_finite());
        }
        Err(e) => assert_eq!(e.file, "fuzz.json", "{e}"),
    }
    r
}

/// Valid traces of every format the parsers sniff.
fn valid_trace() -> impl Strategy<Value = String> {
    (1usize..4, 2usize..9, 1usize..4, 0u64..1000, 0usize..5).prop_map(
        |(layers, experts, batches, seed, form)| {
            let w = synthetic_window(layers, experts, batches, 64, 2.min(experts), 1.0, 0.3, seed)
                .unwrap();
            let rows = |b: usize| {
                (0..w.layers())
                    .map(|l| format!("{:?}", w.row(b, l)))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            match form {
                0 => to_trace_json(&w, Some("fuzz")),
                1 => to_trace_jsonl(&w, None),
                2 => format!(
                    "{{\"logical_count\": [{}]}}",
                    (0..w.batches())
                        .map(|b| format!("[{}]", rows(b)))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                3 => format!("[{}]", rows(0)),
                _ => format!(
                    "{{\"num_experts\": {}, \"layers\": {:?}, \"counts\": [{}]}}",
                    w.experts(),
                    w.layer_ids(),
                    rows(0)
                ),
            }
        },
    )
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn random_bytes_are_errors_not_crashes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_checked(&bytes);
    }

    #[test]
    fn json_shaped_noise_is_errors_not_crashes(s in r#"[\[\]{}",:0-9.eE+\-a-z_ \n]{0,300}"#) {
        let _ = parse_checked(s.as_bytes());
        let _ = parse_checked(format!("{{\"logical_count\": {s}").as_bytes());
        let _ = parse_checked(
            format!("{{\"format\":\"moe-load-trace/v1\",\"experts\":2,\"layers\":[0]}}\n{s}").as_bytes(),
        );
    }

    #[test]
    fn valid_traces_parse(trace in valid_trace()) {
        prop_assert!(parse_checked(trace.as_bytes()).is_ok(), "{}", trace);
    }

    #[test]
    fn mutated_traces_are_windows_within_limits_or_errors(
        trace in valid_trace(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let bytes = mutate(trace.as_bytes(), &mutations);
        let _ = parse_checked(&bytes);
    }
}

#[test]
fn claimed_huge_shapes_are_refused_without_allocating() {
    // The probes of issue 19, through the same checks as the fuzzed inputs.
    for experts in ["1000000000000", "18446744073709551615", "4294967295"] {
        let doc = format!(
            r#"{{"format":"moe-load-trace/v1","experts":{experts},"layers":[0,1],"batches":[{{"tokens":[[1,2],[3,4]]}}]}}"#
        );
        assert!(parse_checked(doc.as_bytes()).is_err());
        let jl = format!(
            "{{\"format\":\"moe-load-trace/v1\",\"experts\":{experts},\"layers\":[0]}}\n{{\"tokens\":[[1]]}}\n"
        );
        assert!(parse_checked(jl.as_bytes()).is_err());
    }
    assert!(parse_checked(br#"{"logical_count": [[1e308, 1e308]]}"#).is_err());
}
