//! Where CRAFT at small R loses to EPLB on held-out batches: per-layer and per-R diagnostics.
//!
//! `cargo run --release --example planner_gap [skew drift]`

use moe_operator::plan::balance::{evaluate_routed, Routing};
use moe_operator::plan::craft::CraftOptions;
use moe_operator::plan::load_formats::synthetic_window;
use moe_operator::plan::planner::{make_plan, Budget, PlanRequest};
use moe_operator::plan::{Algorithm, Dtype, ExpertPlan, LoadWindow, ModelShape, Topology};

fn model() -> ModelShape {
    ModelShape {
        layers: 58,
        first_moe_layer: 0,
        experts: 256,
        top_k: 8,
        hidden_size: 7168,
        expert_intermediate_size: 2048,
        dtype: Dtype::Fp8,
    }
}

fn plan(algo: Algorithm, r: u32, opts: CraftOptions, w: &LoadWindow) -> ExpertPlan {
    let req = PlanRequest {
        algorithm: algo,
        model: model(),
        topology: Topology::new(64, 8).unwrap(),
        budget: Budget::ReplicasPerGpu(r),
        eplb_groups: None,
        craft: opts,
    };
    make_plan(&req, w, None).unwrap()
}

fn main() {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (skew, drift) = (
        args.first().copied().unwrap_or(0.3),
        args.get(1).copied().unwrap_or(0.3),
    );
    let w = synthetic_window(58, 256, 300, 32_768, 8, skew, drift, 1).unwrap();
    let (train, test) = (w.slice_batches(0..150), w.slice_batches(150..300));
    println!("skew {skew} drift {drift}");
    let ev = |p: &ExpertPlan, w: &LoadWindow, r: Routing| evaluate_routed(p, w, r).unwrap();
    let eplb = plan(Algorithm::Eplb, 58, CraftOptions::default(), &train);
    let eplb_oracle = plan(Algorithm::Eplb, 58, CraftOptions::default(), &test);
    println!("| policy | R | held-out shares | held-out least-loaded | in-sample | oracle (planned on test) |");
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, r: u32, p: &ExpertPlan, o: &ExpertPlan| {
        println!(
            "| {name} | {r} | {:.4} | {:.4} | {:.4} | {:.4} |",
            ev(p, &test, Routing::Shares).balancedness,
            ev(p, &test, Routing::LeastLoaded).balancedness,
            ev(p, &train, Routing::Shares).balancedness,
            ev(o, &test, Routing::Shares).balancedness,
        )
    };
    row("EPLB", 58, &eplb, &eplb_oracle);
    let mut craft8 = None;
    for r in [8u32, 16, 32, 58] {
        let p = plan(Algorithm::Craft, r, CraftOptions::default(), &train);
        let o = plan(Algorithm::Craft, r, CraftOptions::default(), &test);
        row("CRAFT", r, &p, &o);
        if r == 8 {
            craft8 = Some(p);
        }
    }
    let craft8 = craft8.unwrap();
    let paper = CraftOptions {
        balanced_shares: false,
        local_search: false,
        ..CraftOptions::default()
    };
    let variants = [
        (
            "placement only",
            Algorithm::Placement,
            0,
            CraftOptions::default(),
        ),
        ("CRAFT paper", Algorithm::Craft, 8, paper.clone()),
        (
            "CRAFT + shares",
            Algorithm::Craft,
            8,
            CraftOptions {
                balanced_shares: true,
                ..paper.clone()
            },
        ),
        ("CRAFT paper", Algorithm::Craft, 58, paper.clone()),
        (
            "CRAFT default",
            Algorithm::Craft,
            58,
            CraftOptions::default(),
        ),
    ];
    let deep = CraftOptions {
        local_search_rounds: 400,
        ..CraftOptions::default()
    };
    let q = plan(Algorithm::Craft, 8, deep.clone(), &test);
    let p = plan(Algorithm::Craft, 8, deep, &train);
    row("CRAFT, 400 local-search rounds", 8, &p, &q);
    let holdout = CraftOptions {
        benefit_holdout: true,
        ..CraftOptions::default()
    };
    let q = plan(Algorithm::Craft, 8, holdout.clone(), &test);
    let p = plan(Algorithm::Craft, 8, holdout, &train);
    row("CRAFT, out-of-sample benefit table", 8, &p, &q);
    for (name, algo, r, o) in variants {
        let p = plan(algo, r, o.clone(), &train);
        let q = plan(algo, r, o, &test);
        row(name, r, &p, &q);
    }
    // Per layer: skew of the training totals, CRAFT's extras, held-out balancedness of both.
    let ec = ev(&craft8, &test, Routing::Shares);
    let ee = ev(&eplb, &test, Routing::Shares);
    let ecin = ev(&craft8, &train, Routing::Shares);
    let eein = ev(&eplb, &train, Routing::Shares);
    let mut rows: Vec<(f64, usize, f64, f64, f64, f64)> = (0..58)
        .map(|l| {
            let t = train.layer_totals(l);
            let mean = t.iter().sum::<f64>() / t.len() as f64;
            let mx = t.iter().cloned().fold(0.0, f64::max);
            (
                mx / mean,
                ec.layers[l].extra_replicas,
                ec.layers[l].balancedness,
                ee.layers[l].balancedness,
                ecin.layers[l].balancedness,
                eein.layers[l].balancedness,
            )
        })
        .collect();
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    println!("\n| layer max/mean | CRAFT extras | CRAFT held-out | EPLB held-out | diff | CRAFT in | EPLB in |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {:.2} | {} | {:.4} | {:.4} | {:+.4} | {:.4} | {:.4} |",
            r.0,
            r.1,
            r.2,
            r.3,
            r.2 - r.3,
            r.4,
            r.5
        );
    }
}
