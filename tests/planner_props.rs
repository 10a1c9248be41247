//! Property tests of the planner's invariants (../shared/CRAFT.md and issue "1 of 5").

use moe_operator::plan::balance::{LayerMatrix, ReplayScratch};
use moe_operator::plan::craft::{self, allocate, candidate_set, CraftOptions};
use moe_operator::plan::limits::MAX_TOKEN_COUNT;
use moe_operator::plan::planner::{make_plan, Budget, PlanError, PlanRequest};
use moe_operator::plan::{
    Algorithm, Dtype, ExpertPlan, HashRule, LoadWindow, ModelShape, Topology,
};
use proptest::prelude::*;

fn model(layers: u32, experts: u32) -> ModelShape {
    ModelShape {
        layers,
        first_moe_layer: 0,
        experts,
        top_k: 2.min(experts),
        hidden_size: 64,
        expert_intermediate_size: 32,
        dtype: Dtype::Bf16,
    }
}

/// A skewed window: counts drawn from the strategy, with a few hot experts per layer.
fn window_strategy() -> impl Strategy<Value = (usize, usize, usize, Vec<f64>)> {
    (1usize..4, 2usize..5, 1usize..4).prop_flat_map(|(layers, experts_per_gpu, batches)| {
        let experts = experts_per_gpu * 4;
        let n = layers * experts * batches;
        (
            Just(layers),
            Just(experts),
            Just(batches),
            proptest::collection::vec(prop_oneof![4 => 0.0f64..50.0, 1 => 200.0f64..2000.0], n),
        )
    })
}

fn request(algo: Algorithm, m: &ModelShape, gpus: usize, nodes: usize, r: u32) -> PlanRequest {
    PlanRequest {
        algorithm: algo,
        model: m.clone(),
        topology: Topology::new(gpus, nodes).unwrap(),
        budget: Budget::ReplicasPerGpu(r),
        eplb_groups: None,
        craft: CraftOptions::default(),
    }
}

fn assert_invariants(plan: &ExpertPlan) {
    plan.check().unwrap();
    let d = plan.gpus as usize;
    let mut totals = vec![0usize; d];
    let mut physical = 0;
    for lp in &plan.layers {
        let mut count = vec![0usize; plan.model.experts as usize];
        for (g, slots) in lp.slots.iter().enumerate() {
            totals[g] += slots.len();
            for (i, &e) in slots.iter().enumerate() {
                count[e as usize] += 1;
                assert!(
                    !slots[..i].contains(&e),
                    "layer {} gpu {g} holds expert {e} twice",
                    lp.layer
                );
            }
        }
        assert!(
            count.iter().all(|&c| (1..=d).contains(&c)),
            "replica counts {count:?}"
        );
        physical += lp.physical_experts();
    }
    if physical % d == 0 {
        assert!(
            totals.iter().all(|&t| t == totals[0]),
            "unequal slot totals {totals:?}"
        );
    }
    let stats = plan.stats.as_ref().unwrap();
    assert!(stats.balancedness > 0.0 && stats.balancedness <= 1.0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn craft_plans_keep_every_invariant((layers, experts, batches, counts) in window_strategy(), r in 0u32..6) {
        let w = LoadWindow::new((0..layers as u32).collect(), experts, counts).unwrap();
        let m = model(layers as u32, experts as u32);
        let plan = make_plan(&request(Algorithm::Craft, &m, 4, 2, r), &w, None).unwrap();
        assert_invariants(&plan);
        prop_assert_eq!(plan.layers.iter().map(|l| l.physical_experts()).sum::<usize>(),
            layers * experts + plan.replicas_per_gpu as usize * 4);
        // Deterministic: the same input gives the same bytes.
        let again = make_plan(&request(Algorithm::Craft, &m, 4, 2, r), &w, None).unwrap();
        prop_assert_eq!(&plan.hash, &again.hash);
        let _ = batches;
    }

    #[test]
    fn baselines_keep_every_invariant((layers, experts, _b, counts) in window_strategy()) {
        let w = LoadWindow::new((0..layers as u32).collect(), experts, counts).unwrap();
        let m = model(layers as u32, experts as u32);
        for algo in [Algorithm::None, Algorithm::Placement] {
            assert_invariants(&make_plan(&request(algo, &m, 4, 2, 0), &w, None).unwrap());
        }
        let eplb = make_plan(&request(Algorithm::Eplb, &m, 4, 2, layers as u32), &w, None).unwrap();
        eplb.check().unwrap();
    }

    #[test]
    fn benefit_of_no_replicas_is_zero((layers, experts, _b, counts) in window_strategy()) {
        let w = LoadWindow::new((0..layers as u32).collect(), experts, counts).unwrap();
        let mats: Vec<LayerMatrix> = (0..layers).map(|l| LayerMatrix::from_window(&w, l)).collect();
        let topo = Topology::new(4, 2).unwrap();
        let t = craft::benefit_table(&mats, &candidate_set(8), topo, &CraftOptions::default());
        for row in &t {
            prop_assert_eq!(row[0], 0.0);
        }
    }

    #[test]
    fn knapsack_matches_brute_force(table in proptest::collection::vec(proptest::collection::vec(-0.2f64..0.5, 5), 1..4), total in 0usize..10) {
        let candidates = [0usize, 1, 2, 3, 4];
        let alloc = allocate(&table, &candidates, 12);
        // Enumerate every choice of one candidate per layer.
        let mut best: Option<f64> = None;
        let n = table.len();
        for code in 0..candidates.len().pow(n as u32) {
            let mut c = code;
            let (mut sum_k, mut val) = (0, 0.0);
            for row in &table {
                let i = c % candidates.len();
                c /= candidates.len();
                sum_k += candidates[i];
                val += (row[i] * 1e9).round() / 1e9;
            }
            if sum_k == total && best.is_none_or(|b| val > b) {
                best = Some(val);
            }
        }
        match (best, alloc.value(total)) {
            (None, None) => {}
            (Some(b), Some(v)) => {
                prop_assert!((b - v).abs() < 1e-6, "brute force {} dp {}", b, v);
                let ks = alloc.choose(total).unwrap();
                prop_assert_eq!(ks.iter().sum::<usize>(), total);
            }
            other => prop_assert!(false, "feasibility differs: {:?}", other),
        }
    }

    #[test]
    fn shares_balance_at_least_as_well_as_an_even_split_on_the_window(
        (layers, experts, _b, counts) in window_strategy(), extra in 1usize..8) {
        let w = LoadWindow::new((0..layers as u32).collect(), experts, counts).unwrap();
        let topo = Topology::new(4, 2).unwrap();
        let m = LayerMatrix::from_window(&w.slice_batches(0..1), 0);
        let order = craft::replication_order(&m.totals, extra, 4);
        let counts = craft::replica_counts(experts, &order);
        let caps = craft::layer_capacities(experts + order.len(), 4);
        let even = craft::place(&m.totals, &counts, &caps, topo, &CraftOptions::default());
        let mut balanced = even.clone();
        craft::balance_shares(&mut balanced, &m.totals);
        let mut s = ReplayScratch::default();
        let be = s.replay(&m, 4, even.replicas()).balancedness;
        let bb = s.replay(&m, 4, balanced.replicas()).balancedness;
        prop_assert!(bb >= be - 1e-4, "balanced shares {} < even split {}", bb, be);
    }
}

#[test]
fn previous_plan_keeps_slots_and_counts_loads() {
    let counts: Vec<f64> = (0..32)
        .map(|i| if i % 8 == 0 { 500.0 } else { 10.0 + i as f64 })
        .collect();
    let w = LoadWindow::new(vec![0, 1], 16, counts.clone()).unwrap();
    let m = model(2, 16);
    let first = make_plan(&request(Algorithm::Placement, &m, 4, 2, 0), &w, None).unwrap();
    // Same plan again from itself: nothing moves.
    let same = make_plan(
        &request(Algorithm::Placement, &m, 4, 2, 0),
        &w,
        Some(&first),
    )
    .unwrap();
    let t = same.transition.as_ref().unwrap();
    assert_eq!(t.previous_hash, first.hash);
    assert!(t.per_gpu.iter().all(|g| g.experts_to_load == 0), "{t:?}");
    assert_eq!(same.layers, first.layers);
    // CRAFT with replicas on top: every slot an expert kept is the same slot index.
    let next = make_plan(&request(Algorithm::Craft, &m, 4, 2, 2), &w, Some(&first)).unwrap();
    let t = next.transition.as_ref().unwrap();
    let loaded: u64 = t.per_gpu.iter().map(|g| g.experts_to_load).sum();
    assert!(
        loaded >= 8,
        "8 extra replicas must be loaded somewhere, got {loaded}"
    );
    for (old, new) in first.layers.iter().zip(&next.layers) {
        for g in 0..4 {
            for (i, e) in old.slots[g].iter().enumerate() {
                if new.slots[g].contains(e) && i < new.slots[g].len() {
                    assert_eq!(
                        new.slots[g][i], *e,
                        "layer {} gpu {g}: expert {e} moved slot",
                        old.layer
                    );
                }
            }
        }
    }
    assert_eq!(
        t.per_gpu.iter().map(|g| g.bytes_to_load).sum::<u64>(),
        loaded * m.bytes_per_expert()
    );
}

#[test]
fn errors_name_the_problem() {
    let w = LoadWindow::new(vec![0], 8, vec![1.0; 8]).unwrap();
    let err = make_plan(&request(Algorithm::Craft, &model(1, 16), 4, 2, 0), &w, None).unwrap_err();
    assert!(err.to_string().contains("8 experts"), "{err}");
    let err = make_plan(&request(Algorithm::Eplb, &model(1, 8), 4, 2, 3), &w, None);
    assert!(err.is_ok(), "3 is a multiple of 1 layer");
    let w2 = LoadWindow::new(vec![0, 1], 8, vec![1.0; 16]).unwrap();
    let err = make_plan(&request(Algorithm::Eplb, &model(2, 8), 4, 2, 3), &w2, None).unwrap_err();
    assert!(
        err.to_string().contains("multiple of the 2 MoE layers"),
        "{err}"
    );
}

#[test]
fn shapes_past_the_limits_are_refused_before_planning() {
    let w = LoadWindow::new(vec![0], 8, vec![1.0; 8]).unwrap();
    let refused = |req: PlanRequest| match make_plan(&req, &w, None) {
        Err(PlanError::Limit(m)) => m.to_string(),
        other => panic!("expected a limit error, got {other:?}"),
    };
    // Before: 4294967295 layers made the planner collect 4 billion layer ids (16 GiB).
    let mut m = model(1, 8);
    m.layers = u32::MAX;
    let e = refused(request(Algorithm::Craft, &m, 4, 1, 0));
    assert_eq!(
        e,
        "model layers is 4294967295, past the limit of 512 (plan::limits::MAX_LAYERS)"
    );
    let e = refused(request(Algorithm::Craft, &model(1, 8), 4, 1, u32::MAX));
    assert!(e.contains("MAX_REPLICAS_PER_GPU"), "{e}");
    let mut req = request(Algorithm::Craft, &model(1, 8), 4, 1, 0);
    req.topology = Topology::new(1 << 20, 1 << 10).unwrap();
    assert!(refused(req).starts_with("GPUs is 1048576"));
    // A memory budget of u64::MAX bytes over 1-byte experts is 1.8e19 replicas per GPU.
    let mut tiny = model(1, 8);
    tiny.hidden_size = 1;
    tiny.expert_intermediate_size = 1;
    let mut req = request(Algorithm::Craft, &tiny, 4, 1, 0);
    req.budget = Budget::MemoryPerGpu(u64::MAX);
    let e = refused(req);
    assert!(e.contains("past the limit of 4096 replicas per GPU"), "{e}");
    // The window widened to every MoE layer: 512 batches x 512 layers x 1024 experts.
    let wide = LoadWindow::new(vec![0], 1024, vec![1.0; 512 * 1024]).unwrap();
    let mut m = model(512, 1024);
    m.top_k = 8;
    let e = make_plan(&request(Algorithm::Craft, &m, 4, 1, 0), &wide, None).unwrap_err();
    assert!(e.to_string().contains("MAX_LOAD_CELLS_FILE"), "{e}");
}

#[test]
fn plans_of_the_largest_counts_have_finite_totals_and_read_back() {
    // Before: counts of 1e308 summed to infinity and the plan's windowTokens was written as null.
    // Counts are now at most MAX_TOKEN_COUNT, whose sums stay finite, and the plan reads back.
    let m = model(2, 8);
    let w = LoadWindow::new(vec![0, 1], 8, vec![MAX_TOKEN_COUNT; 3 * 2 * 8]).unwrap();
    for algo in [Algorithm::Craft, Algorithm::Eplb, Algorithm::None] {
        let r = if algo == Algorithm::Eplb { 2 } else { 1 };
        let r = if algo == Algorithm::None { 0 } else { r };
        let plan = make_plan(&request(algo, &m, 4, 1, r), &w, None).unwrap();
        let stats = plan.stats.as_ref().unwrap();
        assert_eq!(stats.window_tokens, MAX_TOKEN_COUNT * 48.0);
        let json = serde_json::to_vec(&plan).unwrap();
        assert_eq!(
            ExpertPlan::from_json_checked(&json, HashRule::Required).unwrap(),
            plan
        );
    }
    assert!(LoadWindow::new(vec![0], 2, vec![1e308, 1e308]).is_err());
}
