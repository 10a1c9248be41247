//! Fuzzing tier for the plan reader (`ExpertPlan::from_json_checked`): random bytes, byte-level
//! mutations of valid plans, and edits of their fields (sizes, layers, shares) re-sealed or not.
//! Whatever the bytes, the reader returns a plan every consumer can rely on or a typed error; it
//! never panics and never asks for memory in proportion to a size it read rather than to the bytes.
//!
//! Cases per property: `PROPTEST_CASES` (default `fuzz_support::CI_CASES`, a few seconds).
//! `scripts/fuzz.sh` runs every `tests/fuzz_*.rs` for longer.

mod fuzz_support;

use fuzz_support::{cases, largest_allocation, mutate, mutation};
use moe_operator::plan::craft::CraftOptions;
use moe_operator::plan::limits::{
    MAX_EXPERTS, MAX_GPUS, MAX_LAYERS, MAX_NODES, MAX_REPLICAS_PER_GPU, MAX_SLOTS_PER_GPU_LAYER,
};
use moe_operator::plan::load_formats::synthetic_window;
use moe_operator::plan::planner::{make_plan, Budget, PlanRequest};
use moe_operator::plan::{
    Algorithm, Dtype, ExpertPlan, HashRule, LoadWindow, ModelShape, PlanReadError, Topology,
};
use proptest::prelude::*;
use serde_json::Value;

/// The most one allocation of a read may ask for: what serde holds of the input, the re-serialised
/// plan the hash is computed over, and per-expert tables of at most `MAX_EXPERTS`.
fn allocation_bound(input: usize) -> usize {
    32 * input + (1 << 20)
}

/// Read with `rule` and check everything a consumer relies on.
fn read_checked(bytes: &[u8], rule: HashRule) -> Result<ExpertPlan, PlanReadError> {
    let (r, peak) = largest_allocation(|| ExpertPlan::from_json_checked(bytes, rule));
    assert!(
        peak <= allocation_bound(bytes.len()),
        "one allocation of {peak} bytes for {} input bytes",
        bytes.len()
    );
    if let Ok(p) = &r {
        let m = &p.model;
        assert!(m.layers <= MAX_LAYERS && m.experts <= MAX_EXPERTS && m.experts >= 1);
        assert!(p.gpus <= MAX_GPUS && p.nodes <= MAX_NODES);
        assert!(p.replicas_per_gpu <= MAX_REPLICAS_PER_GPU);
        assert!(!p.layers.is_empty());
        assert!(p.layers.windows(2).all(|w| w[0].layer < w[1].layer));
        assert!(p
            .layers
            .iter()
            .all(|l| (m.first_moe_layer..m.layers).contains(&l.layer)));
        assert!(p
            .layers
            .iter()
            .flat_map(|l| &l.slots)
            .all(|s| s.len() <= MAX_SLOTS_PER_GPU_LAYER as usize));
        p.check().unwrap();
        p.check_stats().unwrap();
        assert_eq!(p.hash, p.compute_hash());
        // What was read is written back and read again as the same plan.
        let again =
            ExpertPlan::from_json_checked(&serde_json::to_vec(p).unwrap(), HashRule::Required);
        assert_eq!(again.as_ref(), Ok(p));
    }
    r
}

/// Sealed plans the planner makes, of every algorithm, as pretty JSON (what the files hold).
fn valid_plan() -> impl Strategy<Value = ExpertPlan> {
    (
        1u32..4,
        0u32..3,
        1usize..5,
        prop::sample::select(vec![1usize, 2, 4]),
        0u64..100,
        0usize..4,
    )
        .prop_map(|(moe_layers, first, experts_per_gpu, gpus, seed, algo)| {
            let experts = experts_per_gpu * gpus;
            let model = ModelShape {
                layers: first + moe_layers,
                first_moe_layer: first,
                experts: experts as u32,
                top_k: 2.min(experts as u32),
                hidden_size: 64,
                expert_intermediate_size: 32,
                dtype: Dtype::Bf16,
            };
            // Synthetic counts, renumbered to the model's MoE layers.
            let synthetic = synthetic_window(
                moe_layers as usize,
                experts,
                3,
                64,
                model.top_k as usize,
                1.0,
                0.3,
                seed,
            )
            .unwrap();
            let counts = (0..3)
                .flat_map(|b| (0..moe_layers as usize).map(move |l| (b, l)))
                .flat_map(|(b, l)| synthetic.row(b, l).to_vec())
                .collect();
            let w =
                LoadWindow::new((first..first + moe_layers).collect(), experts, counts).unwrap();
            let (algorithm, r) = match algo {
                0 => (Algorithm::None, 0),
                1 => (Algorithm::Eplb, moe_layers),
                2 => (Algorithm::CraftReference, 1),
                _ => (Algorithm::Craft, 2),
            };
            let req = PlanRequest {
                algorithm,
                model,
                topology: Topology::new(gpus, 1).unwrap(),
                budget: Budget::ReplicasPerGpu(r),
                eplb_groups: None,
                craft: CraftOptions::default(),
            };
            make_plan(&req, &w, None).unwrap()
        })
}

/// Edits of a plan's fields: sizes set to extremes, layers duplicated, reordered or dropped.
#[derive(Clone, Debug)]
enum Edit {
    /// Set the `index`-th number (modulo the count) to `value`.
    Number {
        index: usize,
        value: Value,
    },
    DuplicateLayer(usize),
    SwapLayers(usize, usize),
    DropLayer(usize),
    DropGpu(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let extreme = prop_oneof![
        prop::sample::select(vec![
            0u64,
            1,
            2,
            99,
            1024,
            1025,
            4096,
            u32::MAX as u64,
            1 << 32,
            u64::MAX
        ])
        .prop_map(Value::from),
        prop::sample::select(vec![-1.0f64, 0.5, 1.5, 1e15, 1e308, -1e308]).prop_map(Value::from),
    ];
    prop_oneof![
        4 => (any::<usize>(), extreme).prop_map(|(index, value)| Edit::Number { index, value }),
        1 => any::<usize>().prop_map(Edit::DuplicateLayer),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLayers(a, b)),
        1 => any::<usize>().prop_map(Edit::DropLayer),
        1 => any::<usize>().prop_map(Edit::DropGpu),
    ]
}

fn count_numbers(v: &Value) -> usize {
    match v {
        Value::Number(_) => 1,
        Value::Array(a) => a.iter().map(count_numbers).sum(),
        Value::Object(o) => o.values().map(count_numbers).sum(),
        _ => 0,
    }
}

/// Set the `n`-th number leaf (depth first) to `value`; `n` counts down the leaves passed.
fn set_number(v: &mut Value, n: &mut usize, value: &Value) -> bool {
    match v {
        Value::Number(_) if *n == 0 => {
            *v = value.clone();
            true
        }
        Value::Number(_) => {
            *n -= 1;
            false
        }
        Value::Array(a) => a.iter_mut().any(|x| set_number(x, n, value)),
        Value::Object(o) => o.values_mut().any(|x| set_number(x, n, value)),
        _ => false,
    }
}

fn apply(v: &mut Value, e: &Edit) {
    match e {
        Edit::Number { index, value } => {
            let count = count_numbers(v);
            if count > 0 {
                set_number(v, &mut (index % count), value);
            }
        }
        Edit::DuplicateLayer(i) | Edit::DropLayer(i) => {
            let layers = v["layers"].as_array_mut().unwrap();
            if !layers.is_empty() {
                let i = i % layers.len();
                if matches!(e, Edit::DuplicateLayer(_)) {
                    let l = layers[i].clone();
                    layers.insert(i, l);
                } else {
                    layers.remove(i);
                }
            }
        }
        Edit::SwapLayers(a, b) => {
            let layers = v["layers"].as_array_mut().unwrap();
            if !layers.is_empty() {
                let n = layers.len();
                layers.swap(a % n, b % n);
            }
        }
        Edit::DropGpu(g) => {
            for l in v["layers"].as_array_mut().unwrap() {
                for key in ["slots", "shares"] {
                    let per_gpu = l[key].as_array_mut().unwrap();
                    if !per_gpu.is_empty() {
                        let n = per_gpu.len();
                        per_gpu.remove(g % n);
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn random_bytes_are_errors_not_crashes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_checked(&bytes, HashRule::MayBeEmpty);
    }

    #[test]
    fn valid_plans_read_back(plan in valid_plan()) {
        let pretty = serde_json::to_vec_pretty(&plan).unwrap();
        prop_assert_eq!(read_checked(&pretty, HashRule::Required).unwrap(), plan);
    }

    #[test]
    fn mutated_plan_bytes_are_plans_or_errors(
        plan in valid_plan(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let bytes = mutate(&serde_json::to_vec_pretty(&plan).unwrap(), &mutations);
        let _ = read_checked(&bytes, HashRule::MayBeEmpty);
        if read_checked(&bytes, HashRule::Required).is_ok() {
            // Only a change serde cannot see (whitespace, a number written another way) keeps the hash.
            prop_assert_eq!(read_checked(&bytes, HashRule::Required).unwrap(), plan);
        }
    }

    #[test]
    fn edited_plans_are_plans_or_errors(
        plan in valid_plan(),
        edits in proptest::collection::vec(edit(), 1..4),
        reseal in any::<bool>(),
    ) {
        let mut v = serde_json::to_value(&plan).unwrap();
        for e in &edits {
            apply(&mut v, e);
        }
        if reseal {
            // As a hand-written plan: no hash, read by a caller that allows that.
            v["hash"] = Value::from("");
            let _ = read_checked(&serde_json::to_vec(&v).unwrap(), HashRule::MayBeEmpty);
        } else {
            // Edited after sealing: refused unless the edits changed nothing.
            let bytes = serde_json::to_vec(&v).unwrap();
            match read_checked(&bytes, HashRule::Required) {
                Ok(p) => prop_assert_eq!(p, plan),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
